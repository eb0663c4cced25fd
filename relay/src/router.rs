//! The router core, sans-IO in the style of quinn-proto and str0m: the driver feeds it
//! [`Input`]s with the current time, then drains [`Router::poll_output`] and sleeps until
//! [`Router::poll_timeout`]. It never reads a clock, a socket or a file, so the real nodes and
//! the simulator run exactly this code.
//!
//! What it does with a packet:
//! 1. Rate limits its source (a peer, a client connection): within the budget it passes; a
//!    little past it, it is held for a growing extra delay; further past it, it is refused.
//! 2. Peels one Sphinx layer with the key of the current or the previous key epoch.
//! 3. Checks the replay tag against that epoch's filter (bounded); the new tag must be made
//!    durable by the driver ([`Output::PersistTags`]) before the packet leaves this node, so a
//!    crash and restart cannot reopen a replay.
//! 4. Holds a forward packet for the delay the sender chose for this hop (at most the relay's
//!    `hop_delay_max_ms`), in a bounded queue shared fairly between sources (when a source is
//!    over its share, or the queue is full, new packets are refused; accepted ones are never
//!    dropped), then emits [`Output::Send`]; a final payload becomes [`Output::Deliver`] for
//!    the local destination. A route that comes back to this node at once is processed again
//!    as its original source's packet: rate limit and queue share included.
//!
//! Every refusal is counted by reason in [`RouterStats`] and reported as [`Output::Drop`];
//! neither carries an identifier.
//!
//! Step 2 is pure (it reads only the keys), so a driver may run it elsewhere: [`Router::admit`]
//! does step 1 and hands out a [`PeelTicket`], [`PeelTicket::peel`] peels on any thread, and
//! [`Router::finish`] does the rest. Tickets finished in the order they were issued give the
//! outputs of [`Input::Packet`] (the relay's driver peels in a worker pool this way; the
//! simulator feeds [`Input::Packet`]).

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use whispr_protocol::directory::Directory;
use whispr_protocol::sphinx::{
    HOP_DELAY_MAX, HopAction, Packet, PacketProcessor, Processed, ReplayFilter, ReplayTag,
    SphinxProcessor, SphinxSecretKey,
};
use whispr_protocol::{
    DestinationAddress, Error as ProtocolError, KeyEpoch, NodeId, SurbId, UnixTime,
};

/// An opaque id the driver gives each client connection (libp2p stream or HTTP connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// Where a packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Another node of the mesh.
    Peer(NodeId),
    /// A client connection (accepted only by edge relays).
    Client(ClientId),
    /// This node itself (a SURB reply or a deferred send it originates).
    Local,
}

/// A rate limit: `per_minute` packets on average with bursts of `burst`; past the budget the
/// next `penalty_packets` are accepted with a growing extra delay (up to `delay_max_ms`),
/// then refused until the bucket refills.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Sustained rate.
    pub per_minute: u32,
    /// Bucket size.
    pub burst: u32,
    /// Packets accepted (delayed) past the budget before refusing.
    pub penalty_packets: u32,
    /// Longest extra delay given to a packet past the budget.
    pub delay_max_ms: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        // The messaging policy: 100 messages/min per user.
        RateLimit {
            per_minute: 100,
            burst: 100,
            penalty_packets: 20,
            delay_max_ms: 2_000,
        }
    }
}

impl RateLimit {
    /// The policy's 200 operations/min per connection.
    pub fn per_connection() -> RateLimit {
        RateLimit {
            per_minute: 200,
            burst: 200,
            penalty_packets: 40,
            delay_max_ms: 2_000,
        }
    }

    /// Between nodes: relays forward many users' packets, so the budget is far above one
    /// user's; it bounds a misbehaving peer, not the traffic.
    pub fn per_peer() -> RateLimit {
        RateLimit {
            per_minute: 600_000,
            burst: 20_000,
            penalty_packets: 10_000,
            delay_max_ms: 1_000,
        }
    }

    /// Effectively unlimited (between nodes of a test or a trusted cluster).
    pub fn unlimited() -> RateLimit {
        RateLimit {
            per_minute: u32::MAX,
            burst: u32::MAX,
            penalty_packets: 0,
            delay_max_ms: 0,
        }
    }
}

/// Router limits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Packets held for their mixing delay (and awaiting a durable replay tag), at most.
    pub queue_max: usize,
    /// Replay tags per key epoch the filter is sized for: kept exactly up to 65 536, then in
    /// a Bloom filter of about 3.6 bytes a tag at this capacity (10 M: 36 MB an epoch, two
    /// epochs held). Past it, fresh packets start being refused as replays, gradually.
    pub replay_tags_per_epoch_max: usize,
    /// Limit per peer node. A table giving only some keys keeps this limit's defaults for
    /// the others (not the generic [`RateLimit::default`]).
    #[serde(deserialize_with = "peer_rate")]
    pub peer_rate: RateLimit,
    /// Limit per client connection (edge relays); partial tables as for `peer_rate`.
    #[serde(deserialize_with = "client_rate")]
    pub client_rate: RateLimit,
    /// Sources tracked by the rate limiter, at most (least recently seen forgotten first).
    pub rate_sources_max: usize,
    /// Accept packets from clients (edge role).
    pub edge: bool,
    /// Length of a key epoch, in milliseconds.
    pub epoch_len_ms: u64,
    /// Longest delay this relay holds a packet for at one hop, in milliseconds (at most the
    /// protocol's [`HOP_DELAY_MAX`]); longer ones are refused (`delay_too_long`). Long holds
    /// belong to timer nodes, not to mixing queues.
    pub hop_delay_max_ms: u64,
}

/// Some keys of a rate-limit table; the others come from the limit's own default.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRateLimit {
    per_minute: Option<u32>,
    burst: Option<u32>,
    penalty_packets: Option<u32>,
    delay_max_ms: Option<u64>,
}

impl PartialRateLimit {
    fn over(self, base: RateLimit) -> RateLimit {
        RateLimit {
            per_minute: self.per_minute.unwrap_or(base.per_minute),
            burst: self.burst.unwrap_or(base.burst),
            penalty_packets: self.penalty_packets.unwrap_or(base.penalty_packets),
            delay_max_ms: self.delay_max_ms.unwrap_or(base.delay_max_ms),
        }
    }
}

fn peer_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RateLimit, D::Error> {
    <PartialRateLimit as serde::Deserialize>::deserialize(d).map(|p| p.over(RateLimit::per_peer()))
}

fn client_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RateLimit, D::Error> {
    <PartialRateLimit as serde::Deserialize>::deserialize(d)
        .map(|p| p.over(RateLimit::per_connection()))
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            queue_max: 100_000,
            replay_tags_per_epoch_max: 10_000_000,
            peer_rate: RateLimit::per_peer(),
            client_rate: RateLimit::per_connection(),
            rate_sources_max: 100_000,
            edge: false,
            epoch_len_ms: 3_600_000,
            hop_delay_max_ms: u64::try_from(HOP_DELAY_MAX.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Why a packet was refused or dropped. Counted; never logged with identifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum DropReason {
    /// Not exactly one packet's size.
    #[error("packet of the wrong size")]
    WrongSize,
    /// The header authenticates under none of our keys (another node's packet, or a key
    /// epoch we no longer or do not yet hold).
    #[error("header does not authenticate under a current key (unknown epoch?)")]
    UnknownEpoch,
    /// An undecodable packet or a Sphinx version we do not speak.
    #[error("malformed packet or unsupported version")]
    Malformed,
    /// The same packet was seen before in this key epoch.
    #[error("replayed packet")]
    Replay,
    /// The replay filter of the epoch is full.
    #[error("replay filter full")]
    ReplayFilterFull,
    /// The mixing queue is full (backpressure).
    #[error("queue full")]
    QueueFull,
    /// The source holds its fair share of the mixing queue already.
    #[error("source over its queue share")]
    QueueShare,
    /// The source is over its rate limit.
    #[error("rate limited")]
    RateLimited,
    /// A client sent a packet to a node that is not an edge relay.
    #[error("this node takes no client packets")]
    NotEdge,
    /// The next hop is not in the directory.
    #[error("next hop unknown")]
    UnknownNextHop,
    /// A final payload reached a node with no local destination.
    #[error("no local destination")]
    NoDestination,
    /// The hop delay is above the maximum.
    #[error("hop delay too long")]
    DelayTooLong,
}

impl DropReason {
    /// Every reason, for metrics.
    pub const ALL: [DropReason; 12] = [
        DropReason::WrongSize,
        DropReason::UnknownEpoch,
        DropReason::Malformed,
        DropReason::Replay,
        DropReason::ReplayFilterFull,
        DropReason::QueueFull,
        DropReason::RateLimited,
        DropReason::NotEdge,
        DropReason::UnknownNextHop,
        DropReason::NoDestination,
        DropReason::DelayTooLong,
        DropReason::QueueShare,
    ];

    /// A stable label (metrics, API errors).
    pub fn label(self) -> &'static str {
        match self {
            DropReason::WrongSize => "wrong_size",
            DropReason::UnknownEpoch => "unknown_epoch",
            DropReason::Malformed => "malformed",
            DropReason::Replay => "replay",
            DropReason::ReplayFilterFull => "replay_filter_full",
            DropReason::QueueFull => "queue_full",
            DropReason::RateLimited => "rate_limited",
            DropReason::NotEdge => "not_edge",
            DropReason::UnknownNextHop => "unknown_next_hop",
            DropReason::NoDestination => "no_destination",
            DropReason::DelayTooLong => "delay_too_long",
            DropReason::QueueShare => "queue_share",
        }
    }

    fn from_protocol(e: &ProtocolError) -> DropReason {
        match e {
            ProtocolError::BadLength { .. } => DropReason::WrongSize,
            ProtocolError::HeaderIntegrity => DropReason::UnknownEpoch,
            ProtocolError::InvalidPacket(what) if what.contains("delay") => {
                DropReason::DelayTooLong
            }
            _ => DropReason::Malformed,
        }
    }
}

/// A final payload for this node's local destination (mailbox or timer core).
#[derive(Debug)]
pub enum Delivery {
    /// A forward packet's plaintext (a `FinalPayload`).
    Final {
        /// The destination address the sender chose.
        destination: DestinationAddress,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// A SURB reply, still sealed for the SURB's creator.
    SurbReply {
        /// The creator's mailbox.
        destination: DestinationAddress,
        /// The SURB id.
        surb_id: SurbId,
        /// The sealed reply.
        sealed: Vec<u8>,
    },
}

/// Inputs.
#[derive(Debug)]
pub enum Input {
    /// A packet arrived.
    Packet {
        /// From whom.
        from: Source,
        /// Its bytes (checked here).
        bytes: Vec<u8>,
    },
    /// The time in `poll_timeout` was reached (or the driver just woke up).
    Timeout,
    /// A new validated directory.
    Directory(Arc<Directory>),
    /// The driver made the tags of [`Output::PersistTags`] `batch` durable.
    TagsDurable {
        /// The batch number.
        batch: u64,
    },
    /// A client connection closed (its rate state can go).
    ClientClosed(ClientId),
}

/// Outputs.
#[derive(Debug)]
pub enum Output {
    /// Send `packet` to the peer `to` now.
    Send {
        /// The next hop.
        to: NodeId,
        /// The packet.
        packet: Packet,
        /// How long it was held here (for the delay histogram).
        held: Duration,
    },
    /// Deliver to the local destination.
    Deliver(Delivery),
    /// Make these replay tags durable, then answer with [`Input::TagsDurable`].
    PersistTags {
        /// Batch number.
        batch: u64,
        /// The tags, by epoch.
        tags: Vec<(KeyEpoch, ReplayTag)>,
    },
    /// A packet was refused or dropped.
    Drop {
        /// Why.
        reason: DropReason,
    },
}

/// Counters (monotonic) and gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Packets offered, from peers.
    pub in_peer: u64,
    /// Packets offered, from clients.
    pub in_client: u64,
    /// Packets offered by this node itself.
    pub in_local: u64,
    /// Packets sent on.
    pub out: u64,
    /// Final payloads delivered locally.
    pub delivered: u64,
    /// Packets accepted past a rate budget with an extra delay.
    pub rate_delayed: u64,
    /// Drops by reason.
    pub dropped: BTreeMap<DropReason, u64>,
}

#[derive(Debug)]
struct Held {
    release_at: UnixTime,
    seq: u64,
    batch: u64,
    action: Pending,
    accepted_at: UnixTime,
    /// The source the packet came from (a self-loop keeps its first source).
    origin: Source,
}

#[derive(Debug)]
enum Pending {
    Send { to: NodeId, packet: Packet },
    Deliver(Delivery),
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.release_at, self.seq) == (other.release_at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap, we want the earliest release first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.release_at, other.seq).cmp(&(self.release_at, self.seq))
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: UnixTime,
    penalty_used: u32,
    touched: u64,
}

/// Decision of the rate limiter.
enum Admit {
    Now,
    Delayed(Duration),
    Refuse,
}

fn admit(bucket: &mut Bucket, limit: &RateLimit, now: UnixTime) -> Admit {
    let per_ms = f64::from(limit.per_minute) / 60_000.0;
    let elapsed = now.0.saturating_sub(bucket.last.0) as f64;
    bucket.tokens = (bucket.tokens + elapsed * per_ms).min(f64::from(limit.burst));
    bucket.last = UnixTime(bucket.last.0.max(now.0));
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        // A full token resets the penalty run.
        if bucket.tokens >= 1.0 {
            bucket.penalty_used = 0;
        }
        return Admit::Now;
    }
    if bucket.penalty_used >= limit.penalty_packets {
        return Admit::Refuse;
    }
    bucket.penalty_used = bucket.penalty_used.saturating_add(1);
    // Progressive: each packet past the budget waits longer, up to the maximum.
    let step = limit.delay_max_ms / u64::from(limit.penalty_packets.max(1));
    let delay = step
        .saturating_mul(u64::from(bucket.penalty_used))
        .min(limit.delay_max_ms);
    Admit::Delayed(Duration::from_millis(delay))
}

/// The keys a packet is peeled with: the current key epoch's, then the previous one's.
struct PeelKeys {
    epochs: Vec<KeyEpoch>,
    keys: Vec<SphinxSecretKey>,
}

/// A packet [`Router::admit`] let in, waiting to be peeled ([`PeelTicket::peel`], a pure
/// function the driver may run on any thread, e.g. in a worker pool) and handed back with
/// [`Router::finish`]. Until then the packet holds a place in the queue (counted by
/// [`Router::queue_len`] and in its source's share), so tickets must not be lost: hand each
/// one back to the router that issued it, peeled or with [`Router::abandon`].
pub struct PeelTicket {
    from: Source,
    extra: Duration,
    keys: Arc<PeelKeys>,
    processor: Arc<dyn PacketProcessor>,
}

impl std::fmt::Debug for PeelTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No keys, no source identifiers.
        f.debug_struct("PeelTicket").finish_non_exhaustive()
    }
}

/// One layer peeled by [`PeelTicket::peel`], for [`Router::finish`].
#[derive(Debug)]
pub struct Peeled(Result<(KeyEpoch, Processed), DropReason>);

impl PeelTicket {
    /// Peels one Sphinx layer off `bytes` with the keys the router held at admission (the
    /// current epoch's, then the previous one's). Pure: no router state is read or written,
    /// so any thread may run it.
    pub fn peel(&self, bytes: &[u8]) -> Peeled {
        let key_refs: Vec<&SphinxSecretKey> = self.keys.keys.iter().collect();
        Peeled(
            self.processor
                .process(&key_refs, bytes)
                .map_err(|e| DropReason::from_protocol(&e))
                .and_then(|processed| {
                    self.keys
                        .epochs
                        .get(processed.key_index)
                        .map(|epoch| (*epoch, processed))
                        .ok_or(DropReason::UnknownEpoch)
                }),
        )
    }
}

/// The router of one node.
pub struct Router {
    local: NodeId,
    processor: Arc<dyn PacketProcessor>,
    config: RouterConfig,
    keys: Vec<(KeyEpoch, SphinxSecretKey)>,
    /// The keys tickets carry, for the epoch they were selected at (cleared by `set_keys`).
    peel_keys: Option<(KeyEpoch, Arc<PeelKeys>)>,
    /// Tickets issued and not yet finished or abandoned.
    peeling: usize,
    has_destination: bool,
    directory: Arc<Directory>,
    filter: ReplayFilter,
    queue: BinaryHeap<Held>,
    seq: u64,
    /// Tags accepted but not yet handed to the driver.
    unpersisted: Vec<(KeyEpoch, ReplayTag)>,
    next_batch: u64,
    /// Highest batch the driver reported durable (batches complete in order).
    durable_batch: u64,
    /// Due packets waiting for their batch to be durable, in release order.
    waiting_durable: VecDeque<Held>,
    /// `durable_batch` at the last scan of `waiting_durable`.
    scanned_durable: u64,
    buckets: HashMap<Source, Bucket>,
    /// Buckets by last use (`Bucket::touched`), for O(log n) eviction of the oldest.
    bucket_lru: BTreeMap<u64, Source>,
    touch: u64,
    /// Packets held per source (queue and waiting for durable tags); `Local` is not counted.
    held_by: HashMap<Source, usize>,
    outputs: VecDeque<Output>,
    stats: RouterStats,
    now: UnixTime,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("queue", &self.queue.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router for node `local`. `has_destination`: this node has a local destination
    /// (mailbox or timer core) for final payloads.
    pub fn new(local: NodeId, config: RouterConfig, has_destination: bool) -> Router {
        Router::with_processor(local, config, has_destination, Arc::new(SphinxProcessor))
    }

    /// [`Router::new`] with another packet processor (the simulator's `fast` codec).
    pub fn with_processor(
        local: NodeId,
        config: RouterConfig,
        has_destination: bool,
        processor: Arc<dyn PacketProcessor>,
    ) -> Router {
        // The Bloom part of the filter is seeded with the node's id: deterministic (the
        // simulator replays runs), and different on every relay.
        let mut seed = [0u8; 16];
        seed.copy_from_slice(local.0.get(..16).unwrap_or(&[0u8; 16]));
        let filter =
            ReplayFilter::with_seed(config.replay_tags_per_epoch_max, u128::from_le_bytes(seed));
        Router {
            local,
            processor,
            config,
            keys: Vec::new(),
            peel_keys: None,
            peeling: 0,
            has_destination,
            directory: Arc::new(Directory::default()),
            filter,
            queue: BinaryHeap::new(),
            seq: 0,
            unpersisted: Vec::new(),
            next_batch: 1,
            durable_batch: 0,
            waiting_durable: VecDeque::new(),
            scanned_durable: 0,
            buckets: HashMap::new(),
            bucket_lru: BTreeMap::new(),
            touch: 0,
            held_by: HashMap::new(),
            outputs: VecDeque::new(),
            stats: RouterStats::default(),
            now: UnixTime(0),
        }
    }

    /// The node's Sphinx secret keys by epoch. Packets are processed with the current
    /// epoch's key and the previous one's; other epochs' packets are refused.
    pub fn set_keys(&mut self, keys: Vec<(KeyEpoch, SphinxSecretKey)>) {
        self.keys = keys;
        self.peel_keys = None;
    }

    /// Restores replay tags made durable before a restart (they count as durable).
    pub fn restore_replay_tags(&mut self, tags: impl IntoIterator<Item = (KeyEpoch, ReplayTag)>) {
        for (epoch, tag) in tags {
            // A duplicate is known either way; a full filter keeps refusing the epoch.
            let _ = self.filter.check_and_insert(epoch, tag);
        }
    }

    /// This node's id.
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// Counters.
    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// Packets held (mixing queue plus those awaiting durable tags, plus those admitted and
    /// still being peeled).
    pub fn queue_len(&self) -> usize {
        self.queue
            .len()
            .saturating_add(self.waiting_durable.len())
            .saturating_add(self.peeling)
    }

    /// Tickets of [`Router::admit`] not yet finished or abandoned.
    pub fn peeling(&self) -> usize {
        self.peeling
    }

    /// Whether a new packet would fit in the queue at all.
    pub fn has_capacity(&self) -> bool {
        self.queue_len() < self.config.queue_max
    }

    /// Whether a new packet from `source` would be admitted to the queue. The driver stops
    /// reading from a peer while this is false for it (backpressure on that peer only).
    ///
    /// The queue is shared between the sources that hold packets in it: with `n` of them
    /// (counting `source`), each may hold at most `queue_max / (n + 1)`, and a source that
    /// already holds packets may add more only while a share, `queue_max / (n + 1)`, stays
    /// free; so a source that holds nothing yet always finds room, and a few sources cannot
    /// take the queue from everyone else. The node's own packets (`Local`) need only room.
    pub fn has_capacity_for(&self, source: Source) -> bool {
        let len = self.queue_len();
        if len >= self.config.queue_max {
            return false;
        }
        if source == Source::Local {
            return true;
        }
        let held = self.held_by.get(&source).copied().unwrap_or(0);
        let sources = self.held_by.len() + usize::from(held == 0);
        let share = (self.config.queue_max / sources.saturating_add(1)).max(1);
        held == 0 || (held < share && len < self.config.queue_max.saturating_sub(share))
    }

    /// Peers whose packets [`Router::has_capacity_for`] would refuse now (all of them when the
    /// queue is full), for the driver's per-peer backpressure. `None`: every peer is blocked.
    pub fn blocked_peers(&self) -> Option<Vec<NodeId>> {
        if !self.has_capacity() {
            return None;
        }
        Some(
            self.held_by
                .keys()
                .filter_map(|s| match s {
                    Source::Peer(node) if !self.has_capacity_for(*s) => Some(*node),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Replay tags held, all epochs.
    pub fn replay_tags(&self) -> usize {
        self.filter.len()
    }

    /// The epoch that contains `now`.
    pub fn epoch_at(&self, now: UnixTime) -> KeyEpoch {
        KeyEpoch::containing(now, Duration::from_millis(self.config.epoch_len_ms.max(1)))
    }

    /// Epochs whose tags are still needed at `now` (current and previous); the driver may
    /// delete persisted tags of older epochs.
    pub fn live_epochs(&self, now: UnixTime) -> (KeyEpoch, Option<KeyEpoch>) {
        let current = self.epoch_at(now);
        (current, current.previous())
    }

    /// Feeds one input. For a packet, `Err` says why it was refused (also counted and
    /// emitted as [`Output::Drop`]); the driver answers a client with it.
    pub fn handle_input(&mut self, now: UnixTime, input: Input) -> Result<(), DropReason> {
        self.now = UnixTime(self.now.0.max(now.0));
        let result = match input {
            Input::Packet { from, bytes } => self.handle_packet(from, &bytes, false),
            Input::Timeout => Ok(()),
            Input::Directory(directory) => {
                self.directory = directory;
                Ok(())
            }
            Input::TagsDurable { batch } => {
                self.durable_batch = self.durable_batch.max(batch);
                Ok(())
            }
            Input::ClientClosed(id) => {
                // A closed client's packets still held keep its budget: a loop coming round
                // must not find a fresh one.
                let source = Source::Client(id);
                if !self.held_by.contains_key(&source)
                    && let Some(bucket) = self.buckets.remove(&source)
                {
                    self.bucket_lru.remove(&bucket.touched);
                }
                Ok(())
            }
        };
        if let Err(reason) = result {
            self.drop_packet(reason);
        }
        self.release_due();
        self.flush_tags();
        result
    }

    /// Next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the driver must call back with [`Input::Timeout`] at the latest.
    pub fn poll_timeout(&self) -> Option<UnixTime> {
        self.queue.peek().map(|h| h.release_at)
    }

    /// The first half of [`Input::Packet`], for a driver that peels elsewhere (a worker
    /// pool): counts the packet, checks the source's role, the queue and its share, and the
    /// rate limit, in that order, as [`Input::Packet`] does. On `Ok` the packet holds its
    /// place in the queue; peel it with [`PeelTicket::peel`] and hand both to
    /// [`Router::finish`]. `Err` is counted and emitted as [`Output::Drop`] as for a packet
    /// input. Handing tickets back in the order they were issued gives exactly the outputs of
    /// [`Input::Packet`].
    pub fn admit(&mut self, now: UnixTime, from: Source) -> Result<PeelTicket, DropReason> {
        self.now = UnixTime(self.now.0.max(now.0));
        let result = self.admit_packet(from, false);
        if let Err(reason) = &result {
            self.drop_packet(*reason);
        }
        self.release_due();
        self.flush_tags();
        result
    }

    /// The second half of [`Input::Packet`]: the replay filter, the next hop's and the
    /// delay's checks, and the queue. `Err` says why the packet was refused (counted and
    /// emitted as [`Output::Drop`]).
    pub fn finish(
        &mut self,
        now: UnixTime,
        ticket: PeelTicket,
        peeled: Peeled,
    ) -> Result<(), DropReason> {
        self.now = UnixTime(self.now.0.max(now.0));
        let result = self.finish_packet(ticket, peeled);
        if let Err(reason) = &result {
            self.drop_packet(*reason);
        }
        self.release_due();
        self.flush_tags();
        result
    }

    /// Gives back a ticket that will not be peeled (the driver is stopping): its place in
    /// the queue is freed. Not counted as a drop.
    pub fn abandon(&mut self, ticket: PeelTicket) {
        self.release_ticket(&ticket);
    }

    fn drop_packet(&mut self, reason: DropReason) {
        *self.stats.dropped.entry(reason).or_insert(0) += 1;
        self.outputs.push_back(Output::Drop { reason });
    }

    /// `looped`: the packet is the next layer of one that this node just forwarded to itself;
    /// `from` is then the source of the packet that started the loop, charged again.
    fn handle_packet(
        &mut self,
        from: Source,
        bytes: &[u8],
        looped: bool,
    ) -> Result<(), DropReason> {
        let ticket = self.admit_packet(from, looped)?;
        let peeled = ticket.peel(bytes);
        self.finish_packet(ticket, peeled)
    }

    fn admit_packet(&mut self, from: Source, looped: bool) -> Result<PeelTicket, DropReason> {
        match from {
            _ if looped => self.stats.in_local += 1,
            Source::Peer(_) => self.stats.in_peer += 1,
            Source::Client(_) => self.stats.in_client += 1,
            Source::Local => self.stats.in_local += 1,
        }
        if matches!(from, Source::Client(_)) && !self.config.edge {
            return Err(DropReason::NotEdge);
        }
        if !self.has_capacity() {
            return Err(DropReason::QueueFull);
        }
        if !self.has_capacity_for(from) {
            return Err(DropReason::QueueShare);
        }
        let extra = self.rate_check(from)?;
        let keys = self.current_peel_keys();
        // The packet holds its place (and its source's share) while it is peeled.
        self.peeling = self.peeling.saturating_add(1);
        if from != Source::Local {
            *self.held_by.entry(from).or_insert(0) += 1;
        }
        Ok(PeelTicket {
            from,
            extra,
            keys,
            processor: self.processor.clone(),
        })
    }

    /// The keys of the current and the previous epoch (the ones held), cached per epoch.
    fn current_peel_keys(&mut self) -> Arc<PeelKeys> {
        let current = self.epoch_at(self.now);
        if let Some((epoch, keys)) = &self.peel_keys
            && *epoch == current
        {
            return keys.clone();
        }
        let mut epochs = Vec::new();
        let mut keys = Vec::new();
        for epoch in [Some(current), current.previous()].into_iter().flatten() {
            if let Some((_, key)) = self.keys.iter().find(|(k, _)| *k == epoch) {
                epochs.push(epoch);
                keys.push(key.clone());
            }
        }
        let keys = Arc::new(PeelKeys { epochs, keys });
        self.peel_keys = Some((current, keys.clone()));
        keys
    }

    fn release_ticket(&mut self, ticket: &PeelTicket) {
        self.peeling = self.peeling.saturating_sub(1);
        if ticket.from != Source::Local
            && let Some(n) = self.held_by.get_mut(&ticket.from)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held_by.remove(&ticket.from);
            }
        }
    }

    fn finish_packet(&mut self, ticket: PeelTicket, peeled: Peeled) -> Result<(), DropReason> {
        self.release_ticket(&ticket);
        let PeelTicket { from, extra, .. } = ticket;
        let (epoch, processed) = peeled.0?;
        // The key's epoch must still be live now: a packet admitted just before an epoch
        // boundary and finished after it could otherwise carry a tag of an epoch whose tags
        // the filter has already forgotten (a replay). Inline peels never hit this (same now).
        let current = self.epoch_at(self.now);
        if epoch != current && Some(epoch) != current.previous() {
            return Err(DropReason::UnknownEpoch);
        }
        match self.filter.check_and_insert(epoch, processed.replay_tag) {
            Ok(()) => {}
            Err(ProtocolError::Replayed) => return Err(DropReason::Replay),
            Err(_) => return Err(DropReason::ReplayFilterFull),
        }
        self.unpersisted.push((epoch, processed.replay_tag));
        let (delay, action) = match processed.action {
            HopAction::Forward {
                next_hop,
                delay,
                packet,
            } => {
                if next_hop != self.local && self.directory.get(&next_hop).is_none() {
                    return Err(DropReason::UnknownNextHop);
                }
                if delay > Duration::from_millis(self.config.hop_delay_max_ms) {
                    return Err(DropReason::DelayTooLong);
                }
                (
                    delay,
                    Pending::Send {
                        to: next_hop,
                        packet,
                    },
                )
            }
            HopAction::Deliver {
                destination,
                plaintext,
            } => {
                if !self.has_destination {
                    return Err(DropReason::NoDestination);
                }
                (
                    Duration::ZERO,
                    Pending::Deliver(Delivery::Final {
                        destination,
                        plaintext,
                    }),
                )
            }
            HopAction::DeliverSurbReply {
                destination,
                surb_id,
                sealed,
            } => {
                if !self.has_destination {
                    return Err(DropReason::NoDestination);
                }
                (
                    Duration::ZERO,
                    Pending::Deliver(Delivery::SurbReply {
                        destination,
                        surb_id,
                        sealed,
                    }),
                )
            }
        };
        let hold = delay.saturating_add(extra);
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        self.seq = self.seq.wrapping_add(1);
        self.queue.push(Held {
            release_at: self.now.saturating_add(Duration::from_millis(hold_ms)),
            seq: self.seq,
            batch: self.next_batch,
            action,
            accepted_at: self.now,
            origin: from,
        });
        if from != Source::Local {
            *self.held_by.entry(from).or_insert(0) += 1;
        }
        Ok(())
    }

    fn rate_check(&mut self, from: Source) -> Result<Duration, DropReason> {
        let limit = match from {
            Source::Peer(_) => self.config.peer_rate.clone(),
            Source::Client(_) => self.config.client_rate.clone(),
            Source::Local => return Ok(Duration::ZERO),
        };
        if self.buckets.len() >= self.config.rate_sources_max && !self.buckets.contains_key(&from) {
            self.evict_bucket();
        }
        self.touch = self.touch.wrapping_add(1);
        let now = self.now;
        let touch = self.touch;
        let bucket = self.buckets.entry(from).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            last: now,
            penalty_used: 0,
            touched: touch,
        });
        self.bucket_lru.remove(&bucket.touched);
        self.bucket_lru.insert(touch, from);
        bucket.touched = touch;
        match admit(bucket, &limit, now) {
            Admit::Now => Ok(Duration::ZERO),
            Admit::Delayed(d) => {
                self.stats.rate_delayed += 1;
                Ok(d)
            }
            Admit::Refuse => Err(DropReason::RateLimited),
        }
    }

    fn evict_bucket(&mut self) {
        // Forget the least recently seen source: O(log n), so that a stream of new
        // connections costs the router thread nothing more than their packets.
        if let Some((_, oldest)) = self.bucket_lru.pop_first() {
            self.buckets.remove(&oldest);
        }
    }

    fn flush_tags(&mut self) {
        if self.unpersisted.is_empty() {
            return;
        }
        let tags = std::mem::take(&mut self.unpersisted);
        let batch = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        self.outputs.push_back(Output::PersistTags { batch, tags });
    }

    fn release_due(&mut self) {
        let mut moved = false;
        while self.queue.peek().is_some_and(|h| h.release_at <= self.now) {
            if let Some(held) = self.queue.pop() {
                self.waiting_durable.push_back(held);
                moved = true;
            }
        }
        // Rescan the packets waiting for their tags only when something can have changed.
        if !moved && self.durable_batch == self.scanned_durable {
            return;
        }
        self.scanned_durable = self.durable_batch;
        // Release in order, only packets whose replay tag is on disk.
        let mut still_waiting = VecDeque::new();
        while let Some(held) = self.waiting_durable.pop_front() {
            if held.batch > self.durable_batch {
                still_waiting.push_back(held);
                continue;
            }
            let held_for = self.now.saturating_since(held.accepted_at);
            if let Some(n) = self.held_by.get_mut(&held.origin) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.held_by.remove(&held.origin);
                }
            }
            match held.action {
                Pending::Send { to, packet } if to == self.local => {
                    // A route through this node twice: process the next layer here, as a new
                    // packet of the same source (its rate and queue share pay for it).
                    let bytes = packet.into_bytes();
                    if let Err(reason) = self.handle_packet(held.origin, &bytes, true) {
                        self.drop_packet(reason);
                    }
                }
                Pending::Send { to, packet } => {
                    self.stats.out += 1;
                    self.outputs.push_back(Output::Send {
                        to,
                        packet,
                        held: held_for,
                    });
                }
                Pending::Deliver(delivery) => {
                    self.stats.delivered += 1;
                    self.outputs.push_back(Output::Deliver(delivery));
                }
            }
        }
        self.waiting_durable = still_waiting;
    }
}
