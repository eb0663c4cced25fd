//! The simulated network: real routers ([`whispr_relay::router::Router`]), real mailbox cores
//! ([`whispr_mailbox::core::MailboxCore`] over the in-memory store) and real timer cores
//! ([`whispr_timer_service::holds::HoldAssembler`] and
//! [`whispr_timer_service::queue::TimerQueue`] over the in-memory task store), joined by
//! simulated links, driven by simulated clients, one event at a time.
//!
//! Clients are the real client core ([`whispr_client::ClientCore`]), the one the `whispr`
//! command drives: one mailbox per contact relationship (set up before the start with real
//! invitations and hellos, carried out of band), Olm sessions and windows, sealed-sender
//! envelopes, routes that avoid suspect mixes, ack SURBs, the retransmission plan, timer
//! holds, receipts and cover. The simulator is its driver: it carries the core's packets to
//! edge relays over simulated links, fetches its mailboxes through the mailbox cores' owner
//! API when something is stored for it and it is online, and calls it when its timers are
//! due. In `fast` mode the core's packet codec is swapped for the fast one, as the routers'
//! is. The observer and the metrics see everything; the nodes see only what the real nodes
//! would.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use whispr_client::core::owner_key;
use whispr_client::{
    ClientCore, Output as ClientOutput, PacketCodec, SendOptions, Settings, StoredMessage,
};
use whispr_mailbox::config::CoreConfig;
use whispr_mailbox::core::{
    CreateMailbox, Incoming, MailboxCore, MessageBody, Output as CoreOutput,
};
use whispr_mailbox::crypto::MasterKey;
use whispr_mailbox::store::MemoryStore;
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::envelope::Envelope;
use whispr_protocol::mailbox_api::{create_transcript, create_transcript_v2};
use whispr_protocol::payload::{FinalMessage, HeldPacketPart, Reply};
use whispr_protocol::replica::ReplicaMessage;
use whispr_protocol::sphinx::{
    HopAction, RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, SurbRecovery,
};
use whispr_protocol::{DedupId, DestinationAddress, KeyEpoch, MailboxId, NodeId, SurbId, UnixTime};
use whispr_relay::router::{
    ClientId, Delivery, Input, Output as RouterOutput, RateLimit, Router, RouterConfig, Source,
};
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::deferred::{DeferredSend, release_task};
use whispr_timer_service::holds::{HoldAssembler, HoldConfig, PartOutcome};
use whispr_timer_service::queue::TimerQueue;
use whispr_timer_service::store::MemoryStore as TaskStore;

use crate::anonymity::{self, Entry};
use crate::codec::{Mode, Recovery};
use crate::engine::{EventQueue, RngTree};
use crate::links::{Link, Partition};
use crate::scenario::{ChurnAction, GraphSpec, Scenario, ScenarioError, SizeSpec};

/// Simulated time zero (2027-01-15): a fixed date, so runs do not depend on the clock.
pub const START_MS: u64 = 1_800_000_000_000;
const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Edge relay.
    Edge,
    /// Mix of a layer (1-based).
    Mix(u32),
    /// Mailbox node.
    Mailbox,
    /// Timer node.
    Timer,
}

struct TimerCore {
    holds: HoldAssembler,
    queue: TimerQueue<TaskStore, ChaCha20Rng>,
}

struct Node {
    name: String,
    kind: NodeKind,
    id: NodeId,
    keys: Vec<(KeyEpoch, [u8; 32])>,
    descriptor: SignedDescriptor,
    router: Router,
    up: bool,
    in_directory: bool,
    compromised: bool,
    wake_at: Option<u64>,
    mailbox: Option<MailboxCore<MemoryStore, ChaCha20Rng>>,
    master: [u8; 32],
    timer: Option<TimerCore>,
    timer_due: Option<u64>,
    /// When the mailbox core's replication tick is scheduled.
    replica_due: Option<u64>,
    /// No replication tick before this time: at the start every mailbox node begins its
    /// anti-entropy rounds at a phase of its own within the first interval, as nodes that
    /// did not start in the same millisecond would (see `open_destinations`).
    replica_phase_until: u64,
    persisted_tags: Vec<(KeyEpoch, whispr_protocol::sphinx::ReplayTag)>,
    restarts: u64,
    peak_bytes: u64,
    peak_messages: u64,
}

/// What the simulator learns from a packet a client core builds (its codec sees the route
/// and delays the Sphinx header hides).
#[derive(Debug)]
struct Build {
    route: Vec<NodeId>,
    delays_ms: Vec<u64>,
    kind: BuildKind,
}

#[derive(Debug)]
enum BuildKind {
    /// A deposit (dedup id, mailbox).
    Deposit(DedupId, MailboxId),
    /// A part of a timer hold.
    Hold,
    /// Anything else (cancels, prekey requests).
    Other,
}

/// The client core's packet codec in the simulator: the run's mode (Sphinx or fast), and a
/// record of every packet built.
struct SimCodec {
    mode: Mode,
    builds: Arc<Mutex<Vec<Build>>>,
}

impl PacketCodec for SimCodec {
    fn build_packet(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        plaintext: &[u8],
    ) -> whispr_protocol::Result<Vec<u8>> {
        let kind = match FinalMessage::decode_for(destination, plaintext) {
            Ok(FinalMessage::Deposit(e)) => {
                BuildKind::Deposit(e.outer.dedup_id, e.outer.mailbox_id)
            }
            Ok(FinalMessage::Hold(_)) => BuildKind::Hold,
            _ => BuildKind::Other,
        };
        if let Ok(mut b) = self.builds.lock() {
            b.push(Build {
                route: route.iter().map(|h| h.node).collect(),
                delays_ms: delays.iter().map(|d| d.as_millis() as u64).collect(),
                kind,
            });
        }
        self.mode
            .build_packet(rng, route, delays, destination, plaintext)
            .map(|p| p.into_bytes())
    }

    fn create_surb(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        surb_id: SurbId,
    ) -> whispr_protocol::Result<(Surb, Vec<u8>)> {
        self.mode
            .create_surb(rng, route, delays, destination, surb_id)
            .map(|(s, r)| match r {
                Recovery::Real(r) => (s, r.to_bytes().to_vec()),
                Recovery::Fast => (s, Vec::new()),
            })
    }

    fn open_reply(&self, recovery: &[u8], sealed: &[u8]) -> whispr_protocol::Result<Vec<u8>> {
        if recovery.is_empty() {
            Recovery::Fast.open(sealed)
        } else {
            SurbRecovery::from_bytes(recovery)?.open(sealed)
        }
    }
}

struct Client {
    /// The real client core.
    core: ClientCore,
    /// The user whose device this is (its own index for a user's primary device).
    user: u32,
    /// What its codec built since the simulator last looked.
    builds: Arc<Mutex<Vec<Build>>>,
    contacts: Vec<u32>,
    sender: bool,
    online: bool,
    fetch_scheduled: bool,
    /// When the core's next timeout is scheduled.
    wake_at: Option<u64>,
    /// Workload draws: the same in both modes.
    work: ChaCha20Rng,
    /// The core's local id of each outgoing message → the message's index.
    outgoing: HashMap<u64, u32>,
    /// Its mailboxes something was stored into since it last fetched them (a fetch of the
    /// others would return nothing: they are not fetched, which keeps a popular user with
    /// thousands of relationships from costing thousands of empty fetches per message).
    dirty: std::collections::BTreeSet<[u8; 32]>,
    /// Its sessions: (mailbox, replica node) → the node's incarnation (restarts) it logged
    /// in at. A node's sessions live in its memory: a restart ends them.
    sessions: HashMap<([u8; 32], [u8; 32]), u64>,
}

/// The core's name for client `c` (contacts are named after the simulated user).
fn name_of(c: u32) -> String {
    format!("u{c}")
}

/// A message's text: its index (so that the recipient's core names it back) padded to its
/// drawn size.
fn message_text(m: u32, size: u64) -> String {
    let mut t = format!("{m:010}");
    while (t.len() as u64) < size {
        t.push('x');
    }
    t
}

fn message_index(text: &str) -> Option<u32> {
    text.get(..10).and_then(|d| d.parse().ok())
}

#[derive(Clone, Debug)]
struct Frag {
    /// Packets built for it (the first send, then retransmissions).
    builds: u8,
    stored: bool,
    fetched: bool,
    /// First attempt's route (node indices), chosen delays and arrival at the mailbox node,
    /// for sampled messages.
    trace: Option<Trace>,
}

#[derive(Clone, Debug)]
struct Trace {
    route: Vec<u32>,
    delays_ms: Vec<u64>,
    exit_ms: Option<u64>,
}

struct Msg {
    from: u32,
    to: u32,
    sent_ms: u64,
    size: u64,
    frags: Vec<Frag>,
    stored_frags: u16,
    fetched_frags: u16,
    stored_ms: Option<u64>,
    delivered_ms: Option<u64>,
    acked_ms: Option<u64>,
    expires_ms: Option<u64>,
    failed: bool,
    sampled: bool,
    /// The node of the recipient's mailbox it is deposited into.
    dest_node: Option<u32>,
    /// The recipient's mailbox.
    mailbox: Option<MailboxId>,
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Frag(u32, u16),
    Cover(u32),
    /// A cover packet fetched already (a replica read after a failover serves it again).
    CoverFetched(u32),
    /// A hello or a receipt (the client's own traffic, not a workload message).
    Control,
}

#[derive(Clone, Copy, Debug)]
enum From {
    Peer(u32),
    Client(u32),
}

#[derive(Debug)]
enum Ev {
    Arrive {
        node: u32,
        from: From,
        bytes: Vec<u8>,
    },
    Wake {
        node: u32,
    },
    NextMessage {
        client: u32,
    },
    Cover {
        client: u32,
    },
    /// A client core's timer (retransmissions, receipts, queued sends).
    ClientWake {
        client: u32,
    },
    Toggle {
        client: u32,
    },
    Fetch {
        client: u32,
    },
    Sweep {
        node: u32,
    },
    TimerDue {
        node: u32,
    },
    Churn {
        node: u32,
        action: ChurnAction,
    },
    RandomCrash {
        node: u32,
    },
    /// A replica message between mailbox nodes (over their authenticated node link).
    Replica {
        from: u32,
        to: u32,
        /// The destination's incarnation when sent (a restart breaks the connection).
        incarnation: u64,
        bytes: Vec<u8>,
    },
    /// A mailbox core's replication tick (held receipts' deadlines, anti-entropy).
    ReplicaTick {
        node: u32,
    },
    Sample,
    Final,
}

impl Ev {
    fn label(&self) -> &'static str {
        match self {
            Ev::Arrive { .. } => "arrive",
            Ev::Wake { .. } => "wake",
            Ev::NextMessage { .. } => "message",
            Ev::Cover { .. } => "cover",
            Ev::ClientWake { .. } => "client_wake",
            Ev::Toggle { .. } => "toggle",
            Ev::Fetch { .. } => "fetch",
            Ev::Sweep { .. } => "sweep",
            Ev::TimerDue { .. } => "timer",
            Ev::Churn { .. } => "churn",
            Ev::RandomCrash { .. } => "crash",
            Ev::Replica { .. } => "replica",
            Ev::ReplicaTick { .. } => "replica_tick",
            Ev::Sample => "sample",
            Ev::Final => "final",
        }
    }

    fn subject(&self) -> i64 {
        match self {
            Ev::Arrive { node, .. }
            | Ev::Wake { node }
            | Ev::Sweep { node }
            | Ev::TimerDue { node }
            | Ev::Churn { node, .. }
            | Ev::RandomCrash { node }
            | Ev::ReplicaTick { node }
            | Ev::Replica { to: node, .. } => i64::from(*node),
            Ev::NextMessage { client }
            | Ev::Cover { client }
            | Ev::Toggle { client }
            | Ev::Fetch { client }
            | Ev::ClientWake { client } => i64::from(*client),
            Ev::Sample | Ev::Final => -1,
        }
    }
}

/// Counters gathered during a run.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Messages the workload created.
    pub messages_sent: u64,
    /// Of which scheduled sends.
    pub scheduled_sent: u64,
    /// Fragments sent (first attempts).
    pub fragments_sent: u64,
    /// Retransmitted fragment packets.
    pub retransmissions: u64,
    /// Cover packets sent.
    pub cover_sent: u64,
    /// Cover packets fetched back.
    pub cover_received: u64,
    /// Hellos and receipts deposited by clients (their own traffic besides messages and
    /// cover).
    pub control_sent: u64,
    /// Hold-part packets sent to timer nodes.
    pub hold_parts_sent: u64,
    /// Packets put on any link (client or node).
    pub link_packets: u64,
    /// Bytes put on any link.
    pub wire_bytes: u64,
    /// Packets lost on links (loss probability).
    pub lost_link: u64,
    /// Packets lost to partitions.
    pub lost_partition: u64,
    /// Packets sent to a node that was down.
    pub lost_down: u64,
    /// Router drops by reason.
    pub router_drops: BTreeMap<String, u64>,
    /// Deposits refused by mailbox cores, by reason.
    pub deposit_refusals: BTreeMap<String, u64>,
    /// Final payloads refused (wrong kind for the node).
    pub payloads_refused: u64,
    /// SURB replies (deposit and hold acks) fetched by clients.
    pub acks_received: u64,
    /// Transport duplicates a recipient fetched (suppressed by its dedup).
    pub duplicate_fragments_fetched: u64,
    /// Messages the sender's core gave up on (no route, or attempts exhausted).
    pub fragments_failed: u64,
    /// Route selections that failed.
    pub no_route: u64,
    /// Holds accepted and scheduled by timer nodes.
    pub holds_scheduled: u64,
    /// Holds released by timer nodes.
    pub holds_released: u64,
    /// Releases whose first hop was down (retried later by the timer queue).
    pub hold_release_retries: u64,
    /// Packets clients built on a route through a Sybil node (one not run by the network).
    pub sybil_routes: u64,
    /// Packets sent to a Sybil node (lost to the network).
    pub lost_sybil: u64,
    /// Node crashes (scripted and random).
    pub crashes: u64,
    /// Crashes that lost the node's disk.
    pub disks_lost: u64,
    /// Samples of owned mailboxes (one per mailbox per sample) and those readable then (one
    /// of their nodes up): availability is their ratio.
    pub mailbox_samples: u64,
    /// See `mailbox_samples`.
    pub mailbox_samples_readable: u64,
    /// Replica messages mailbox cores sent to their peers.
    pub replica_messages: u64,
    /// Their bytes (encoded; not in `wire_bytes`, which counts packets).
    pub replica_bytes: u64,
    /// Replica messages lost: the destination was down (or restarted before they arrived),
    /// or a partition separated the nodes.
    pub replica_lost: u64,
    /// Fetches that found the replica read from down or without the mailbox, and failed
    /// over to the next replica of the set.
    pub failovers: u64,
    /// Events by kind.
    pub events: BTreeMap<&'static str, u64>,
    /// Replies that could not be sent through their SURB.
    pub replies_failed: u64,
    /// Packet hops processed by routers (packets offered to a router).
    pub packet_hops: u64,
}

/// One time-series sample.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    /// Simulated seconds since the start.
    pub t_s: f64,
    /// Messages sent so far.
    pub sent: u64,
    /// Messages delivered so far.
    pub delivered: u64,
    /// Messages fully acknowledged so far.
    pub acked: u64,
    /// Messages failed so far.
    pub failed: u64,
    /// Events waiting in the queue (packets in flight and timers).
    pub pending_events: u64,
    /// Bytes put on links so far.
    pub wire_bytes: u64,
    /// Bytes stored on all mailbox nodes now.
    pub stored_bytes: u64,
    /// Nodes up now.
    pub nodes_up: u64,
}

/// One sampled message's (entropy bits, anonymity set, normalised degree, whether the
/// timing attack named the true sender).
pub type MessageAnonymity = (f64, f64, f64, bool);

/// Per-message results the report needs.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Delivery latencies, ms (send or release → recipient has every fragment).
    pub latency_ms: Vec<f64>,
    /// Network latencies, ms (send or release → last fragment stored at the mailbox).
    pub network_latency_ms: Vec<f64>,
    /// Delivery time (s since start) of each delivered message.
    pub delivered_at_s: Vec<f64>,
    /// Per sampled message: (entropy bits, anonymity set, normalised degree, attack right).
    pub anonymity: Vec<MessageAnonymity>,
    /// Sampled messages whose whole route was compromised (sender linked to recipient).
    pub fully_traced: u64,
    /// Messages sent, delivered, acknowledged, failed, expired undelivered.
    pub sent: u64,
    /// Delivered.
    pub delivered: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Failed.
    pub failed: u64,
    /// Expired before delivery.
    pub expired_undelivered: u64,
    /// Acknowledged, never delivered, not expired by the end.
    pub acked_lost: u64,
    /// Of those, messages a fragment of which is still stored on a replica of the recipient's
    /// mailbox at the end (not destroyed: not repaired onto the replica read in time, or
    /// skipped by a stale cursor there).
    pub acked_lost_still_stored: u64,
    /// Delivered messages' fragments.
    pub delivered_fragments: u64,
    /// Delivered messages' bytes.
    pub delivered_bytes: u64,
    /// Invariant violations (empty when the run is correct).
    pub violations: Vec<String>,
    /// Counters.
    pub counters: Counters,
    /// Time series.
    pub samples: Vec<Sample>,
    /// Per mailbox node: peak stored bytes and messages.
    pub mailbox_peaks: Vec<(u64, u64)>,
    /// Events processed.
    pub events: u64,
    /// Number of nodes and clients.
    pub nodes: usize,
    /// Clients.
    pub clients: usize,
    /// Messages whose recipient's mailbox node is compromised.
    pub recipient_node_compromised: u64,
    /// Linked devices (`workload.devices_per_user` > 1), besides the users' primaries.
    pub linked_devices: usize,
    /// Messages received by a linked device of their recipient (each device counts).
    pub device_deliveries: u64,
    /// (message delivered to its recipient, linked device of the recipient) pairs where
    /// the device did not get the message.
    pub device_missing: u64,
    /// Setup: acknowledgements of a new device's link request that the link mailbox's node
    /// refused (see `World::link_devices`).
    pub link_acks_refused: u64,
}

/// A simulation ready to run.
pub struct World {
    sc: Scenario,
    tree: RngTree,
    mode: Mode,
    q: EventQueue<Ev>,
    link_rng: ChaCha20Rng,
    work_rng: ChaCha20Rng,
    /// Latencies of replica messages between mailbox nodes (a stream of their own, so that
    /// replication does not shift the packets' draws).
    replica_rng: ChaCha20Rng,
    /// Replicas per mailbox: `topology.replicas`, at most the mailbox nodes.
    replicas: usize,
    nodes: Vec<Node>,
    index: HashMap<NodeId, u32>,
    clients: Vec<Client>,
    by_mailbox: HashMap<MailboxId, u32>,
    /// Each owned mailbox's login public key per device (from its seed: a scalar
    /// multiplication, which every read and acknowledgement would otherwise repeat).
    owner_pubs: HashMap<(MailboxId, u32), [u8; 32]>,
    /// Users (the first `users` clients; the others are their linked devices).
    users: usize,
    /// Each user's linked devices (client indices), with `workload.devices_per_user` > 1.
    devices_of: BTreeMap<u32, Vec<u32>>,
    /// Per linked device: the messages it received (each once).
    device_received: HashMap<u32, HashSet<u32>>,
    /// The link mailboxes made to link devices.
    link_mailboxes: HashSet<MailboxId>,
    /// Acknowledgements (SURB replies) into a link mailbox its node refused.
    link_acks_refused: u64,
    directory: Arc<Directory>,
    /// The simulated directory authorities' keys.
    authorities: Vec<SigningKey>,
    /// Sybil mix descriptors offered to the authorities (and, without authorities, in the
    /// directory).
    sybils: Vec<SignedDescriptor>,
    /// Directory rebuilds so far (the consensus epoch).
    directory_epoch: u64,
    node_link: Link,
    client_link: Link,
    node_latency_mean: f64,
    client_latency_mean: f64,
    partitions: Vec<Partition>,
    msgs: Vec<Msg>,
    side: HashMap<DedupId, Side>,
    entries: Vec<Entry>,
    counters: Counters,
    samples: Vec<Sample>,
    end_ms: u64,
    send_end_ms: u64,
    sample_stride: u64,
    keep_tags: bool,
    timers: Vec<u32>,
    log: Option<Box<dyn Write>>,
    violations: Vec<String>,
    stop_after: Option<u64>,
}

fn ms(t: UnixTime) -> u64 {
    t.0
}

fn exp_ms<R: Rng + ?Sized>(rng: &mut R, mean_ms: f64) -> f64 {
    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    -u.ln() * mean_ms
}

fn poisson_gap<R: Rng + ?Sized>(rng: &mut R, per_min: f64) -> Option<u64> {
    if per_min <= 0.0 {
        return None;
    }
    let gap = exp_ms(rng, 60_000.0 / per_min).ceil();
    Some((gap as u64).max(1))
}

fn node_name(kind: NodeKind, i: usize) -> String {
    match kind {
        NodeKind::Edge => format!("edge-{i}"),
        NodeKind::Mix(l) => format!("mix-{l}-{i}"),
        NodeKind::Mailbox => format!("mailbox-{i}"),
        NodeKind::Timer => format!("timer-{i}"),
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl World {
    /// Builds the network for `sc` with `seed`. `base` is the scenario file's directory (for
    /// latency matrices). Optionally logs every event to `log`.
    pub fn new(
        sc: Scenario,
        seed: u64,
        base: &std::path::Path,
        log: Option<Box<dyn Write>>,
    ) -> Result<World, ScenarioError> {
        let tree = RngTree::new(seed);
        let mode = sc.mode;
        let node_link = sc.node_link(base)?;
        let client_link = sc.client_link(base)?;
        let node_latency_mean = sc.links.latency.mean_ms(&node_link.latency);
        let client_latency_mean = sc.links.client_latency.mean_ms(&client_link.latency);
        let start = UnixTime(START_MS);
        let send_end_ms = START_MS + (sc.duration_s * 1000.0) as u64;
        let end_ms = send_end_ms + (sc.drain_s * 1000.0) as u64;
        let horizon = end_ms + (sc.workload.schedule_ahead_s * 1000.0) as u64 + 3_600_000;
        let epoch_len = whispr_protocol::KEY_EPOCH_LEN.as_millis() as u64;
        let first_epoch = START_MS / epoch_len;
        let last_epoch = horizon / epoch_len;
        if last_epoch - first_epoch >= 16 {
            return Err(ScenarioError::Invalid(
                "duration + drain + schedule_ahead + 1 h must fit in the 16 key epochs a descriptor carries".into(),
            ));
        }
        let t = &sc.topology;
        let mut kinds: Vec<(NodeKind, usize, bool)> = Vec::new();
        for i in 0..t.edges {
            kinds.push((NodeKind::Edge, i, true));
        }
        for layer in 1..=t.mix_layers {
            for i in 0..t.mixes_per_layer + sc.churn.late_mixes_per_layer {
                kinds.push((NodeKind::Mix(layer), i, i < t.mixes_per_layer));
            }
        }
        for i in 0..t.mailboxes {
            kinds.push((NodeKind::Mailbox, i, true));
        }
        for i in 0..t.timers {
            kinds.push((NodeKind::Timer, i, true));
        }
        let mut adversary = tree.stream("adversary", 0);
        let mut nodes = Vec::with_capacity(kinds.len());
        let mut index = HashMap::new();
        for (n, (kind, i, present)) in kinds.into_iter().enumerate() {
            let mut rng = tree.stream("node", n as u64);
            let mut seed_bytes = [0u8; 32];
            rng.fill_bytes(&mut seed_bytes);
            let identity = SigningKey::from_bytes(&seed_bytes);
            let id = NodeId(identity.verifying_key().to_bytes());
            let mut keys = Vec::new();
            let mut public = BTreeMap::new();
            for e in first_epoch..=last_epoch {
                let mut k = [0u8; 32];
                rng.fill_bytes(&mut k);
                let secret = SphinxSecretKey::from(k);
                public.insert(KeyEpoch(e), SphinxPublicKey::from(&secret));
                keys.push((KeyEpoch(e), k));
            }
            let (roles, layer) = match kind {
                NodeKind::Edge => (vec![Role::Edge], 0),
                NodeKind::Mix(l) => (vec![Role::Mix], l),
                NodeKind::Mailbox => (vec![Role::Mailbox], 0),
                NodeKind::Timer => (vec![Role::Timer], 0),
            };
            let descriptor = NodeDescriptor {
                node_id: id,
                peer_id: id.libp2p_peer_id_bytes(),
                roles: roles.into_iter().collect(),
                mix_layer: layer,
                addresses: Vec::new(),
                api_url: None,
                sphinx_keys: public,
                published_at: start,
                expires_at: UnixTime(horizon + 86_400_000),
            }
            .sign(&identity)
            .map_err(|e| ScenarioError::Invalid(format!("descriptor: {e}")))?;
            let fraction = match kind {
                NodeKind::Edge | NodeKind::Mix(_) => sc.adversary.compromised_relays,
                NodeKind::Mailbox => sc.adversary.compromised_mailboxes,
                NodeKind::Timer => sc.adversary.compromised_timers,
            };
            let compromised = fraction > 0.0 && adversary.random_range(0.0..1.0) < fraction;
            let mut master = [0u8; 32];
            rng.fill_bytes(&mut master);
            let mut node = Node {
                name: node_name(kind, i),
                kind,
                id,
                keys,
                descriptor,
                router: Router::new(id, RouterConfig::default(), false),
                up: present,
                in_directory: present,
                compromised,
                wake_at: None,
                mailbox: None,
                master,
                timer: None,
                timer_due: None,
                replica_due: None,
                replica_phase_until: 0,
                persisted_tags: Vec::new(),
                restarts: 0,
                peak_bytes: 0,
                peak_messages: 0,
            };
            index.insert(id, n as u32);
            node.router = Self::make_router(&sc, mode, &node);
            nodes.push(node);
        }
        let keep_tags = !sc.churn.events.is_empty() || sc.churn.relay_crashes_per_hour > 0.0;
        let mut world = World {
            tree,
            mode,
            q: EventQueue::new(start),
            link_rng: tree.stream("links", 0),
            work_rng: tree.stream("workload", 0),
            replica_rng: tree.stream("replica-links", 0),
            replicas: sc.topology.replicas.clamp(1, sc.topology.mailboxes.max(1)),
            nodes,
            index,
            clients: Vec::new(),
            by_mailbox: HashMap::new(),
            owner_pubs: HashMap::new(),
            users: 0,
            devices_of: BTreeMap::new(),
            device_received: HashMap::new(),
            link_mailboxes: HashSet::new(),
            link_acks_refused: 0,
            directory: Arc::new(Directory::default()),
            authorities: Vec::new(),
            sybils: Vec::new(),
            directory_epoch: 0,
            node_link,
            client_link,
            node_latency_mean,
            client_latency_mean,
            partitions: Vec::new(),
            msgs: Vec::new(),
            side: HashMap::new(),
            entries: Vec::new(),
            counters: Counters::default(),
            samples: Vec::new(),
            end_ms,
            send_end_ms,
            sample_stride: 1,
            keep_tags,
            timers: Vec::new(),
            log,
            violations: Vec::new(),
            stop_after: None,
            sc,
        };
        world.partitions = world.resolve_partitions()?;
        world.authorities = (0..world.sc.topology.authorities)
            .map(|i| {
                let mut seed = [0u8; 32];
                tree.stream("authority", i as u64).fill_bytes(&mut seed);
                SigningKey::from_bytes(&seed)
            })
            .collect();
        world.sybils = world.make_sybils(&tree, first_epoch, last_epoch, horizon)?;
        world.rebuild_directory();
        world.open_destinations(start)?;
        world.make_clients(&tree, start)?;
        world.schedule_start(&tree);
        Ok(world)
    }

    /// Stops after `events` events (for benchmarks of a prefix of a long run).
    pub fn stop_after(&mut self, events: u64) {
        self.stop_after = Some(events);
    }

    fn make_router(sc: &Scenario, mode: Mode, node: &Node) -> Router {
        let client_rate = match sc.limits.client_packets_per_min {
            0 => RateLimit::unlimited(),
            n => RateLimit {
                per_minute: n,
                burst: n,
                ..RateLimit::per_connection()
            },
        };
        let config = RouterConfig {
            queue_max: sc.limits.router_queue_max,
            replay_tags_per_epoch_max: sc.limits.replay_tags_per_epoch_max,
            peer_rate: RateLimit::unlimited(),
            client_rate,
            edge: node.kind == NodeKind::Edge,
            ..RouterConfig::default()
        };
        let has_destination = matches!(node.kind, NodeKind::Mailbox | NodeKind::Timer);
        let mut router = Router::with_processor(node.id, config, has_destination, mode.processor());
        router.set_keys(
            node.keys
                .iter()
                .map(|(e, k)| (*e, SphinxSecretKey::from(*k)))
                .collect(),
        );
        router
    }

    fn resolve_partitions(&self) -> Result<Vec<Partition>, ScenarioError> {
        let mut out = Vec::new();
        for p in &self.sc.links.partitions {
            let mut groups = Vec::new();
            for g in &p.groups {
                let members: Vec<usize> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| g.iter().any(|pat| matches(pat, &n.name)))
                    .map(|(i, _)| i)
                    .collect();
                if members.is_empty() {
                    return Err(ScenarioError::Invalid(format!(
                        "partition group {g:?} names no node"
                    )));
                }
                groups.push(members);
            }
            out.push(Partition {
                start_ms: START_MS + (p.start_s * 1000.0) as u64,
                end_ms: START_MS + (p.end_s * 1000.0) as u64,
                groups,
            });
        }
        Ok(out)
    }

    /// Sybil mix descriptors: `sybil_fraction` of all mix descriptors offered, validly
    /// self-signed, of nodes that are not simulated.
    fn make_sybils(
        &self,
        tree: &RngTree,
        first_epoch: u64,
        last_epoch: u64,
        horizon: u64,
    ) -> Result<Vec<SignedDescriptor>, ScenarioError> {
        let f = self.sc.adversary.sybil_fraction;
        let t = &self.sc.topology;
        let honest = (t.mixes_per_layer * t.mix_layers as usize) as f64;
        let count = (f / (1.0 - f) * honest).round() as usize;
        let mut rng = tree.stream("sybil", 0);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let identity = SigningKey::from_bytes(&seed);
            let id = NodeId(identity.verifying_key().to_bytes());
            let mut public = BTreeMap::new();
            for e in first_epoch..=last_epoch {
                let mut k = [0u8; 32];
                rng.fill_bytes(&mut k);
                public.insert(
                    KeyEpoch(e),
                    SphinxPublicKey::from(&SphinxSecretKey::from(k)),
                );
            }
            let descriptor = NodeDescriptor {
                node_id: id,
                peer_id: id.libp2p_peer_id_bytes(),
                roles: [Role::Mix].into_iter().collect(),
                mix_layer: (i as u32 % t.mix_layers.max(1)) + 1,
                addresses: Vec::new(),
                api_url: None,
                sphinx_keys: public,
                published_at: UnixTime(START_MS),
                expires_at: UnixTime(horizon + 86_400_000),
            }
            .sign(&identity)
            .map_err(|e| ScenarioError::Invalid(format!("sybil descriptor: {e}")))?;
            out.push(descriptor);
        }
        Ok(out)
    }

    /// The directory every node and client uses: with authorities, their consensus (each
    /// honest authority admits the nodes in the directory; a minority also admits the
    /// Sybils), signed and verified as clients verify it; without, every descriptor offered.
    fn build_directory(&mut self, descriptors: Vec<SignedDescriptor>) -> Directory {
        use whispr_protocol::consensus::{
            Authority, Consensus, Network, VoteContent, compute_consensus,
        };
        let start = UnixTime(START_MS);
        if self.authorities.is_empty() {
            let mut all = descriptors;
            all.extend(self.sybils.iter().cloned());
            return Directory::build(start, &all).0;
        }
        self.directory_epoch += 1;
        let epoch = self.directory_epoch;
        let network = match Network::new(
            self.authorities
                .iter()
                .map(|k| Authority {
                    key: k.verifying_key().to_bytes(),
                    url: String::new(),
                })
                .collect(),
            None,
        ) {
            Ok(n) => n,
            Err(e) => {
                self.violations.push(format!("authorities: {e}"));
                return Directory::default();
            }
        };
        let valid_after = start;
        let valid_until = UnixTime(START_MS + 3 * 24 * 3600 * 1000 - 1);
        let malicious = if self.sybils.is_empty() {
            0
        } else {
            (self.authorities.len() - 1) / 2
        };
        let mut votes = Vec::new();
        for (i, k) in self.authorities.iter().enumerate() {
            let mut admitted = descriptors.clone();
            if i < malicious {
                admitted.extend(self.sybils.iter().cloned());
            }
            let vote = VoteContent {
                authority: k.verifying_key().to_bytes(),
                epoch,
                valid_after,
                valid_until,
                descriptors: admitted,
            }
            .sign(k)
            .and_then(|v| v.verify(&network));
            match vote {
                Ok(v) => votes.push(v),
                Err(e) => self.violations.push(format!("vote: {e}")),
            }
        }
        let verified = compute_consensus(&network, epoch, valid_after, valid_until, &votes)
            .and_then(|body| {
                let mut c = Consensus::new(&body);
                for k in &self.authorities {
                    c.sign(k);
                }
                c.verify(UnixTime(self.q.now().0.max(START_MS)), &network)
            });
        match verified {
            Ok(v) => Directory::from_consensus(start, &v),
            Err(e) => {
                self.violations.push(format!("consensus: {e}"));
                Directory::default()
            }
        }
    }

    fn rebuild_directory(&mut self) {
        let descriptors: Vec<SignedDescriptor> = self
            .nodes
            .iter()
            .filter(|n| n.in_directory)
            .map(|n| n.descriptor.clone())
            .collect();
        let directory = self.build_directory(descriptors);
        self.directory = Arc::new(directory);
        for c in &mut self.clients {
            c.core.set_directory(self.directory.clone());
        }
        let now = self.q.now();
        for n in &mut self.nodes {
            let _ = n
                .router
                .handle_input(now, Input::Directory(self.directory.clone()));
        }
        self.timers = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.in_directory && n.kind == NodeKind::Timer)
            .map(|(i, _)| i as u32)
            .collect();
    }

    fn core_config(&self, id: NodeId) -> CoreConfig {
        let l = &self.sc.limits;
        CoreConfig {
            deposits_per_min: l.deposits_per_mailbox_per_min,
            // One mailbox per contact relationship and side.
            mailboxes_max: self.sc.topology.clients.saturating_mul(64).max(64),
            // A node names itself (its mesh id) only when it replicates: with one replica
            // nothing ticks, as before replication.
            node_id: (self.replicas > 1).then_some(id.0),
            replica_ack_timeout_ms: l.replica_ack_timeout_ms,
            replica_repair_interval_ms: l.replica_repair_interval_ms,
            replica_repair_batch: l.replica_repair_batch,
            ..CoreConfig::default()
        }
    }

    fn open_destinations(&mut self, now: UnixTime) -> Result<(), ScenarioError> {
        // Each mailbox core runs its first anti-entropy round when it starts, then one per
        // interval: cores all opened in the same millisecond would send every summary of the
        // network at once (at 1,000 mailbox nodes, 8 KiB to each of ~1,000 peers each, 8 GB in
        // flight at one instant). Real nodes do not start together: each starts its rounds at
        // a phase of its own, drawn uniformly within the first interval. A restart (churn)
        // starts its rounds at once, as a restarted node does.
        let interval = self.sc.limits.replica_repair_interval_ms.max(1);
        let mut phases = self.tree.stream("replica-phase", 0);
        for n in &mut self.nodes {
            if n.kind == NodeKind::Mailbox {
                n.replica_phase_until = ms(now) + phases.random_range(0..interval);
            }
        }
        for i in 0..self.nodes.len() {
            self.open_destination(i, MemoryStore::new(), TaskStore::new(), now)?;
        }
        Ok(())
    }

    fn open_destination(
        &mut self,
        i: usize,
        store: MemoryStore,
        tasks: TaskStore,
        now: UnixTime,
    ) -> Result<(), ScenarioError> {
        let config = self.core_config(self.get(i).map_or(NodeId([0; 32]), |n| n.id));
        // One stream per node and incarnation (a restarted core draws afresh).
        let stream = ((i as u64) << 24) | self.get(i).map_or(0, |n| n.restarts);
        let Some(node) = self.nodes.get_mut(i) else {
            return Ok(());
        };
        match node.kind {
            NodeKind::Mailbox => {
                let rng = self.tree.stream("mailbox-core", stream);
                let core =
                    MailboxCore::open(config, store, MasterKey::from_bytes(&node.master), rng, now)
                        .map_err(|e| ScenarioError::Invalid(format!("mailbox core: {e}")))?;
                node.mailbox = Some(core);
            }
            NodeKind::Timer => {
                let rng = self.tree.stream("timer-core", stream);
                let queue = TimerQueue::open(QueueConfig::default(), tasks, rng)
                    .map_err(|e| ScenarioError::Invalid(format!("timer queue: {e}")))?;
                node.timer = Some(TimerCore {
                    holds: HoldAssembler::new(HoldConfig::default()),
                    queue,
                });
            }
            _ => {}
        }
        self.drain_core(i);
        Ok(())
    }

    fn get(&self, i: usize) -> Option<&Node> {
        self.nodes.get(i)
    }

    fn client_settings(&self) -> Settings {
        let r = &self.sc.retransmit;
        Settings {
            receipts: self.sc.workload.receipts,
            mix_layers: Some(self.sc.topology.mix_layers),
            mix_delay_ms: self.sc.mixing.delay_ms_mean.round() as u64,
            // Without retransmission nothing is ever due again (nor given up).
            retransmit_after_ms: if r.enabled { r.after_ms } else { u64::MAX / 4 },
            attempts_max: r.attempts_max.max(1),
            retention_ms: RETENTION_MS,
            replicas: self.replicas,
            // One ready Olm session per client, the others pickled (1.1–2.8 KB against 3.7
            // KiB): 4 % off the peak of the 2,000-user cut of large.toml (docs/benchmarks.md,
            // round 6). Pickling is exact and draws nothing, so no decision changes.
            olm_sessions_live: 1,
            ..Settings::default()
        }
    }

    fn make_clients(&mut self, tree: &RngTree, now: UnixTime) -> Result<(), ScenarioError> {
        let n = self.sc.topology.clients;
        self.users = n;
        for c in 0..n {
            self.new_client(tree, "client", c as u64, c as u32);
        }
        self.make_graph();
        self.introduce(now)?;
        self.link_devices(tree, now)?;
        // Setup is not part of the run.
        for c in &mut self.clients {
            c.dirty.clear();
            if let Ok(mut b) = c.builds.lock() {
                b.clear();
            }
            c.core.take_notices();
            c.core.take_unread();
        }
        self.side.clear();
        self.counters = Counters::default();
        Ok(())
    }

    /// A new client (a user's primary device, or a device to link to `user`), its streams
    /// named `label` and numbered `k`.
    fn new_client(&mut self, tree: &RngTree, label: &str, k: u64, user: u32) {
        // Decisions and ids from one stream, key material and packet randomness from
        // another: the same decisions in both modes.
        let mut seed = [0u8; 32];
        tree.stream(&format!("{label}-route"), k)
            .fill_bytes(&mut seed);
        let rng = StdRng::from_seed(seed);
        tree.stream(label, k).fill_bytes(&mut seed);
        let crypto_rng = StdRng::from_seed(seed);
        let mut core = ClientCore::new("sim://directory", self.client_settings(), rng, crypto_rng);
        let builds = Arc::new(Mutex::new(Vec::new()));
        core.set_codec(Box::new(SimCodec {
            mode: self.mode,
            builds: builds.clone(),
        }));
        core.set_directory(self.directory.clone());
        self.clients.push(Client {
            core,
            user,
            builds,
            contacts: Vec::new(),
            sender: false,
            online: true,
            fetch_scheduled: false,
            wake_at: None,
            work: tree.stream(&format!("{label}-work"), k),
            outgoing: HashMap::new(),
            dirty: std::collections::BTreeSet::new(),
            sessions: HashMap::new(),
        });
    }

    /// With `workload.devices_per_user` > 1: every user links its other devices after its
    /// contacts are set up, through the real cores' linking, the world playing the drivers
    /// (`whispr_client::Client::link`, `link_request`, `link_confirm`): it creates the link
    /// and sync mailboxes as for an invitation, registers the new device's login keys on
    /// every mailbox of the account (the mailbox core's `add_device`, owner-signed, as its
    /// HTTP handler does), and carries packets out of band as the rest of the setup. Then
    /// everyone reads what is left (contacts learn the new device lists).
    fn link_devices(&mut self, tree: &RngTree, now: UnixTime) -> Result<(), ScenarioError> {
        let extra = self.sc.workload.devices_per_user.saturating_sub(1);
        if extra == 0 {
            return Ok(());
        }
        let t = ms(now);
        let invalid = |e: whispr_client::ClientError| ScenarioError::Invalid(format!("link: {e}"));
        for u in 0..self.users as u32 {
            for k in 0..extra {
                let d = self.clients.len() as u32;
                self.new_client(tree, "device", u64::from(d), u);
                self.devices_of.entry(u).or_default().push(d);
                // The primary: `whispr link`.
                let mut plan = self
                    .client_mut(u)?
                    .core
                    .link_prepare(t, &format!("device{}", k + 2))
                    .map_err(invalid)?;
                if let Some((mut sync, key)) = plan.sync.take() {
                    self.create_mailbox(u, &mut sync, key, RETENTION_MS, now)?;
                    plan.sync = Some((sync, key));
                }
                let mut mailbox = plan.mailbox.clone();
                self.create_mailbox(u, &mut mailbox, plan.mailbox_key, plan.retention_ms, now)?;
                self.link_mailboxes.insert(MailboxId(mailbox.id));
                plan.mailbox = mailbox;
                let code = self
                    .client_mut(u)?
                    .core
                    .link_commit(t, plan)
                    .map_err(invalid)?;
                self.drive_client(u, true);
                // The new device: `whispr init --link CODE`.
                let short = self
                    .client_mut(d)?
                    .core
                    .link_request(t, &code)
                    .map_err(invalid)?;
                self.drive_client(d, true);
                // The primary reads the request; its user types the short code.
                self.fetch_client(u, true, true);
                let regs = self
                    .client_mut(u)?
                    .core
                    .link_confirm(t, &short)
                    .map_err(invalid)?;
                for (m, key) in regs {
                    self.add_device(&m, &key)?;
                }
                self.client_mut(u)?.core.link_finish(t).map_err(invalid)?;
                self.drive_client(u, true);
                // The new device reads the account, tells the primary it has it.
                self.fetch_client(d, true, true);
                if !self.client_mut(d)?.core.is_linked() {
                    return Err(ScenarioError::Invalid(format!(
                        "link: device {d} of user {u} did not get the account"
                    )));
                }
                self.drive_client(d, true);
                self.fetch_client(u, true, true);
                if !self.client_mut(u)?.core.link_done() {
                    return Err(ScenarioError::Invalid(format!(
                        "link: user {u} did not hear that device {d} has the account"
                    )));
                }
                self.client_mut(u)?.core.link_abort();
                self.drive_client(u, true);
                self.register_due(u)?;
            }
        }
        // Contacts learn the new device lists, devices the sync messages: a few rounds of
        // reads of whatever was stored.
        for _ in 0..4 {
            for c in 0..self.clients.len() as u32 {
                self.fetch_client(c, true, true);
                if c < self.users as u32 {
                    self.register_due(c)?;
                }
            }
        }
        Ok(())
    }

    /// The primary `user` registers its linked devices on its mailboxes made since they
    /// were linked (`whispr_client::Client`'s `register_devices`).
    fn register_due(&mut self, user: u32) -> Result<(), ScenarioError> {
        let due = self.client_mut(user)?.core.registrations_due();
        for (m, curve, login) in due {
            self.add_device(&m, &login)?;
            self.client_mut(user)?.core.registration_done(&m.id, &curve);
        }
        Ok(())
    }

    /// Registers device login key `device` on every replica of `m` (what the mailbox's
    /// `POST /v1/mailboxes/{id}/devices` does, with the owner's signature).
    fn add_device(
        &mut self,
        m: &whispr_client::state::OwnedMailbox,
        device: &[u8; 32],
    ) -> Result<(), ScenarioError> {
        let mailbox = MailboxId(m.id);
        let signature = ed25519_dalek::Signer::sign(
            &owner_key(m),
            &whispr_protocol::mailbox_api::device_transcript(&mailbox, device),
        )
        .to_bytes();
        let set: Vec<[u8; 32]> = if m.replicas.is_empty() {
            vec![m.node]
        } else {
            m.replicas.iter().map(|r| r.node).collect()
        };
        for node in set {
            let i = *self
                .index
                .get(&NodeId(node))
                .ok_or_else(|| ScenarioError::Invalid("mailbox node unknown".into()))?;
            if let Some(core) = self
                .nodes
                .get_mut(i as usize)
                .and_then(|n| n.mailbox.as_mut())
            {
                core.add_device(&mailbox, *device, &signature)
                    .map_err(|e| ScenarioError::Invalid(format!("add device: {e}")))?;
            }
        }
        Ok(())
    }

    /// Every pair of users with an edge in the contact graph becomes a relationship before
    /// the start: the lower index invites, the other accepts and sends its hello; packets
    /// are carried out of band (no link, no delay, no router queue), so that the run starts
    /// with established contacts and nothing of the setup in its metrics.
    fn introduce(&mut self, now: UnixTime) -> Result<(), ScenarioError> {
        let mut pairs = BTreeSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            for &j in &c.contacts {
                let i = i as u32;
                pairs.insert((i.min(j), i.max(j)));
            }
        }
        let t = ms(now);
        let invalid = |e: whispr_client::ClientError| ScenarioError::Invalid(format!("setup: {e}"));
        for (a, b) in pairs {
            let mut plan = self
                .client_mut(a)?
                .core
                .prepare_invite(t, Some(&name_of(b)), true)
                .map_err(invalid)?;
            self.create_mailbox(
                a,
                &mut plan.mailbox,
                plan.mailbox_key,
                plan.retention_ms,
                now,
            )?;
            let text = self.client_mut(a)?.core.commit_invite(t, plan);
            let mut accept = self
                .client_mut(b)?
                .core
                .accept_start(t, &text, &name_of(a))
                .map_err(invalid)?;
            self.create_mailbox(
                b,
                &mut accept.mailbox,
                accept.mailbox_key,
                accept.retention_ms,
                now,
            )?;
            self.client_mut(b)?.core.mailbox_created(&accept.mailbox);
            let otk = accept
                .invitation
                .one_time_key
                .ok_or_else(|| ScenarioError::Invalid("setup: no one-time key".into()))?;
            self.client_mut(b)?
                .core
                .accept_finish(t, &name_of(a), &accept.invitation, otk)
                .map_err(invalid)?;
            self.drive_client(b, true);
            // Each reads the mailboxes something was stored into since it last read them
            // (the setup deposits mark them as the run's do): reading the others returns
            // nothing, and reading every mailbox at every pair made the setup quadratic in a
            // popular user's relationships.
            self.fetch_client(a, true, false);
            self.fetch_client(b, true, false);
        }
        Ok(())
    }

    fn client_mut(&mut self, c: u32) -> Result<&mut Client, ScenarioError> {
        self.clients
            .get_mut(c as usize)
            .ok_or_else(|| ScenarioError::Invalid("no such client".into()))
    }

    /// Creates mailbox `m` of client `owner` on each node of its replica set (what the
    /// client's driver does over HTTP): with one replica a v1 request, else a v2 request
    /// naming the set; records in `m` that it exists there (the prekeys go with the
    /// invitation, inline).
    fn create_mailbox(
        &mut self,
        owner: u32,
        m: &mut whispr_client::state::OwnedMailbox,
        mailbox_key: [u8; 32],
        retention_ms: u64,
        now: UnixTime,
    ) -> Result<(), ScenarioError> {
        let mailbox_id = MailboxId(m.id);
        let set: Vec<NodeId> = if m.replicas.is_empty() {
            vec![NodeId(m.node)]
        } else {
            m.replicas.iter().map(|r| NodeId(r.node)).collect()
        };
        let owner_key = owner_key(m);
        let owner_pub = owner_key.verifying_key().to_bytes();
        self.owner_pubs.insert((mailbox_id, owner), owner_pub);
        let hash: [u8; 32] = Sha256::digest(m.access).into();
        let transcript = if set.len() > 1 {
            create_transcript_v2(
                &mailbox_id,
                &mailbox_key,
                &owner_pub,
                &hash,
                Some(&m.reply_key),
                retention_ms,
                &set,
            )
            .ok_or_else(|| ScenarioError::Invalid("replica set too large".into()))?
        } else {
            create_transcript(
                &mailbox_id,
                &mailbox_key,
                &owner_pub,
                &hash,
                Some(&m.reply_key),
                retention_ms,
            )
        };
        let request = CreateMailbox {
            mailbox_id,
            mailbox_key,
            owner_key: owner_pub,
            access_key_hash: hash,
            reply_key: Some(m.reply_key),
            retention_ms,
            signature: ed25519_dalek::Signer::sign(&owner_key, &transcript).to_bytes(),
        };
        for node in &set {
            let i = *self
                .index
                .get(node)
                .ok_or_else(|| ScenarioError::Invalid("mailbox node unknown".into()))?;
            if let Some(core) = self
                .nodes
                .get_mut(i as usize)
                .and_then(|n| n.mailbox.as_mut())
            {
                let created = if set.len() > 1 {
                    core.create_replicated(now, request.clone(), set.clone())
                } else {
                    core.create_mailbox(now, request.clone())
                };
                created.map_err(|e| ScenarioError::Invalid(format!("create mailbox: {e}")))?;
            }
        }
        for r in &mut m.replicas {
            r.created = true;
            r.prekeys = None;
        }
        self.by_mailbox.insert(mailbox_id, owner);
        Ok(())
    }

    fn make_graph(&mut self) {
        let n = self.clients.len();
        let w = self.sc.workload.clone();
        let rng = &mut self.work_rng;
        // Senders.
        for c in &mut self.clients {
            c.sender = w.senders_fraction >= 1.0 || rng.random_range(0.0..1.0) < w.senders_fraction;
        }
        match w.graph {
            GraphSpec::Uniform { contacts } => {
                for (i, c) in self.clients.iter_mut().enumerate() {
                    let mut set = Vec::with_capacity(contacts);
                    while set.len() < contacts.min(n - 1) {
                        let j = rng.random_range(0..n) as u32;
                        if j as usize != i && !set.contains(&j) {
                            set.push(j);
                        }
                    }
                    c.contacts = set;
                }
            }
            GraphSpec::PowerLaw {
                exponent,
                max_contacts,
                popularity,
            } => {
                // Popularity: a random ranking, weight rank^-popularity; cumulative table.
                let mut order: Vec<u32> = (0..n as u32).collect();
                for i in (1..n).rev() {
                    let j = rng.random_range(0..=i);
                    order.swap(i, j);
                }
                let mut cumulative = Vec::with_capacity(n);
                let mut total = 0.0;
                for rank in 0..n {
                    total += ((rank + 1) as f64).powf(-popularity);
                    cumulative.push(total);
                }
                // Degree: P(k) ∝ k^-exponent on [1, max], by inverse transform on a table.
                let kmax = max_contacts.min(n - 1).max(1);
                let mut degree_cdf = Vec::with_capacity(kmax);
                let mut dt = 0.0;
                for k in 1..=kmax {
                    dt += (k as f64).powf(-exponent);
                    degree_cdf.push(dt);
                }
                for (i, c) in self.clients.iter_mut().enumerate() {
                    let u = rng.random_range(0.0..dt);
                    let k = degree_cdf.partition_point(|x| *x < u) + 1;
                    let mut set = Vec::with_capacity(k);
                    let mut tries = 0;
                    while set.len() < k && tries < 50 * k {
                        tries += 1;
                        let u = rng.random_range(0.0..total);
                        let rank = cumulative.partition_point(|x| *x < u).min(n - 1);
                        let j = order.get(rank).copied().unwrap_or(0);
                        if j as usize != i && !set.contains(&j) {
                            set.push(j);
                        }
                    }
                    if set.is_empty() {
                        set.push(((i + 1) % n) as u32);
                    }
                    c.contacts = set;
                }
            }
        }
    }

    fn schedule_start(&mut self, tree: &RngTree) {
        let now = START_MS;
        let w = self.sc.workload.clone();
        let expected = self.clients.iter().filter(|c| c.sender).count() as f64
            * w.rate_per_client_per_min
            * self.sc.duration_s
            / 60.0;
        let sample = self.sc.adversary.anonymity_sample.max(1) as f64;
        self.sample_stride = ((expected / sample).floor() as u64).max(1);
        let on = w.online.on_mean_s * 1000.0;
        let off = w.online.off_mean_s * 1000.0;
        // Linked devices only read (and are always online).
        for c in 0..self.users.min(self.clients.len()) {
            let Some(client) = self.clients.get_mut(c) else {
                continue;
            };
            if client.sender
                && let Some(gap) = poisson_gap(&mut client.work, w.rate_per_client_per_min)
            {
                self.q
                    .schedule(UnixTime(now + gap), Ev::NextMessage { client: c as u32 });
            }
            if let Some(gap) = poisson_gap(&mut client.work, w.cover_per_min) {
                self.q
                    .schedule(UnixTime(now + gap), Ev::Cover { client: c as u32 });
            }
            if on > 0.0 {
                client.online = client.work.random_range(0.0..1.0) < on / (on + off).max(1.0);
                let mean = if client.online { on } else { off };
                let gap = exp_ms(&mut client.work, mean).ceil() as u64;
                self.q
                    .schedule(UnixTime(now + gap.max(1)), Ev::Toggle { client: c as u32 });
            }
        }
        for e in self.sc.churn.events.clone() {
            if let Some(node) = self.nodes.iter().position(|n| n.name == e.node) {
                self.q.schedule(
                    UnixTime(now + (e.at_s * 1000.0) as u64),
                    Ev::Churn {
                        node: node as u32,
                        action: e.action,
                    },
                );
            } else {
                self.violations
                    .push(format!("churn event names unknown node {:?}", e.node));
            }
        }
        if self.sc.churn.late_mixes_per_layer > 0 {
            let at = now + (self.sc.churn.join_at_s * 1000.0) as u64;
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.in_directory {
                    self.q.schedule(
                        UnixTime(at),
                        Ev::Churn {
                            node: i as u32,
                            action: ChurnAction::Join,
                        },
                    );
                }
            }
        }
        if self.sc.churn.relay_crashes_per_hour > 0.0
            || self.sc.churn.mailbox_crashes_per_hour > 0.0
        {
            let mut rng = tree.stream("churn", 0);
            for (i, n) in self.nodes.iter().enumerate() {
                let per_min = self.crashes_per_min(n.kind);
                if per_min > 0.0
                    && let Some(gap) = poisson_gap(&mut rng, per_min)
                {
                    self.q
                        .schedule(UnixTime(now + gap), Ev::RandomCrash { node: i as u32 });
                }
            }
        }
        self.q.schedule(UnixTime(now), Ev::Sample);
        self.q.schedule(UnixTime(self.end_ms), Ev::Final);
    }

    /// Runs to the end; `progress` is called now and then with (simulated fraction done,
    /// events processed).
    pub fn run(mut self, mut progress: impl FnMut(f64, u64)) -> Results {
        let span = (self.end_ms - START_MS).max(1) as f64;
        let mut next_report = 0u64;
        while let Some((at, ev)) = self.q.pop() {
            if ms(at) > self.end_ms {
                break;
            }
            if let Some(max) = self.stop_after
                && self.q.processed() > max
            {
                break;
            }
            let label = ev.label();
            *self.counters.events.entry(label).or_insert(0) += 1;
            if let Some(log) = self.log.as_mut() {
                let _ = writeln!(log, "{} {} {}", ms(at) - START_MS, label, ev.subject());
            }
            let is_final = matches!(ev, Ev::Final);
            self.handle(ev);
            if is_final {
                break;
            }
            if self.q.processed() >= next_report {
                next_report = self.q.processed() + 200_000;
                progress((ms(at) - START_MS) as f64 / span, self.q.processed());
            }
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
        progress(1.0, self.q.processed());
        self.finish()
    }

    fn now(&self) -> u64 {
        ms(self.q.now())
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive { node, from, bytes } => self.arrive(node, from, bytes),
            Ev::Wake { node } => {
                let now = self.now();
                if let Some(n) = self.nodes.get_mut(node as usize) {
                    if n.wake_at == Some(now) {
                        n.wake_at = None;
                    }
                    if n.up {
                        let _ = n.router.handle_input(UnixTime(now), Input::Timeout);
                        self.drain_router(node as usize);
                    }
                }
            }
            Ev::NextMessage { client } => self.next_message(client),
            Ev::Cover { client } => self.cover(client),
            Ev::ClientWake { client } => self.client_wake(client),
            Ev::Toggle { client } => self.toggle(client),
            Ev::Fetch { client } => self.fetch_client(client, false, false),
            Ev::Sweep { node } => {
                let now = UnixTime(self.now());
                if let Some(n) = self.nodes.get_mut(node as usize)
                    && n.up
                    && let Some(core) = n.mailbox.as_mut()
                {
                    let _ = core.sweep_expired(now);
                }
                self.drain_core(node as usize);
            }
            Ev::TimerDue { node } => self.timer_due(node),
            Ev::Churn { node, action } => self.churn(node, action),
            Ev::RandomCrash { node } => self.random_crash(node),
            Ev::Replica {
                from,
                to,
                incarnation,
                bytes,
            } => self.replica_arrive(from, to, incarnation, &bytes),
            Ev::ReplicaTick { node } => self.replica_tick(node),
            Ev::Sample => self.sample(),
            Ev::Final => {
                // Everyone comes online one last time and fetches.
                for c in 0..self.clients.len() as u32 {
                    self.fetch_client(c, false, true);
                }
                self.sample();
            }
        }
    }

    // ---------------------------------------------------------------- links

    fn transmit(&mut self, from: From, to: u32, bytes: Vec<u8>) {
        let now = self.now();
        self.counters.link_packets += 1;
        self.counters.wire_bytes += bytes.len() as u64;
        let (link, from_index) = match from {
            From::Peer(n) => (&self.node_link, n as usize),
            From::Client(c) => {
                self.entries.push(Entry {
                    sender: c as usize,
                    at_ms: (now - START_MS) as f64,
                });
                (&self.client_link, self.nodes.len() + c as usize)
            }
        };
        if let From::Peer(n) = from
            && self
                .partitions
                .iter()
                .any(|p| p.separates(n as usize, to as usize, now))
        {
            self.counters.lost_partition += 1;
            return;
        }
        match link.transmit(&mut self.link_rng, from_index, to as usize, bytes.len()) {
            None => self.counters.lost_link += 1,
            Some(d) => {
                let at = now + d.as_millis() as u64;
                self.q.schedule(
                    UnixTime(at),
                    Ev::Arrive {
                        node: to,
                        from,
                        bytes,
                    },
                );
            }
        }
    }

    fn arrive(&mut self, node: u32, from: From, bytes: Vec<u8>) {
        let now = UnixTime(self.now());
        let source = match from {
            From::Peer(p) => match self.nodes.get(p as usize) {
                Some(n) => Source::Peer(n.id),
                None => return,
            },
            From::Client(c) => Source::Client(ClientId(u64::from(c))),
        };
        let Some(n) = self.nodes.get_mut(node as usize) else {
            return;
        };
        if !n.up {
            self.counters.lost_down += 1;
            return;
        }
        self.counters.packet_hops += 1;
        let _ = n.router.handle_input(
            now,
            Input::Packet {
                from: source,
                bytes,
            },
        );
        self.drain_router(node as usize);
    }

    fn drain_router(&mut self, i: usize) {
        let now = self.now();
        loop {
            let Some(n) = self.nodes.get_mut(i) else {
                return;
            };
            let Some(out) = n.router.poll_output() else {
                break;
            };
            match out {
                RouterOutput::Send { to, packet, .. } => {
                    if let Some(&to) = self.index.get(&to) {
                        self.transmit(From::Peer(i as u32), to, packet.into_bytes());
                    } else {
                        self.counters.lost_sybil += 1;
                    }
                }
                RouterOutput::Deliver(d) => self.deliver(i, d),
                RouterOutput::PersistTags { batch, tags } => {
                    if self.keep_tags {
                        n.persisted_tags.extend(tags);
                    }
                    let _ = n
                        .router
                        .handle_input(UnixTime(now), Input::TagsDurable { batch });
                }
                RouterOutput::Drop { reason } => {
                    *self
                        .counters
                        .router_drops
                        .entry(reason.label().to_string())
                        .or_insert(0) += 1;
                }
            }
        }
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        if let Some(t) = n.router.poll_timeout() {
            let t = ms(t).max(now);
            if n.wake_at.is_none_or(|w| t < w) {
                n.wake_at = Some(t);
                self.q.schedule(UnixTime(t), Ev::Wake { node: i as u32 });
            }
        }
    }

    // ---------------------------------------------------------------- destinations

    fn deliver(&mut self, i: usize, d: Delivery) {
        let kind = match self.nodes.get(i) {
            Some(n) => n.kind,
            None => return,
        };
        match (kind, d) {
            (
                NodeKind::Mailbox,
                Delivery::Final {
                    destination,
                    plaintext,
                },
            ) => match FinalMessage::decode_for(destination, &plaintext) {
                Ok(FinalMessage::Deposit(env)) => {
                    let dedup = env.outer.dedup_id;
                    let mailbox = env.outer.mailbox_id;
                    self.deposit(i, Incoming::Deposit(env), mailbox, Some(dedup));
                }
                _ => self.counters.payloads_refused += 1,
            },
            (
                NodeKind::Mailbox,
                Delivery::SurbReply {
                    destination,
                    surb_id,
                    sealed,
                },
            ) => {
                let mailbox = MailboxId(destination.0);
                self.deposit(
                    i,
                    Incoming::SurbReply {
                        mailbox_id: mailbox,
                        surb_id,
                        payload: sealed,
                    },
                    mailbox,
                    None,
                );
            }
            (
                NodeKind::Timer,
                Delivery::Final {
                    destination,
                    plaintext,
                },
            ) => match FinalMessage::decode_for(destination, &plaintext) {
                Ok(FinalMessage::Hold(part)) => self.hold(i, part),
                _ => self.counters.payloads_refused += 1,
            },
            _ => self.counters.payloads_refused += 1,
        }
    }

    fn deposit(
        &mut self,
        i: usize,
        incoming: Incoming,
        mailbox: MailboxId,
        dedup: Option<DedupId>,
    ) {
        let now = self.now();
        let Some(core) = self.nodes.get_mut(i).and_then(|n| n.mailbox.as_mut()) else {
            return;
        };
        let result = core
            .deposit_many(UnixTime(now), vec![incoming])
            .pop()
            .unwrap_or(Err(whispr_mailbox::MailboxError::InvalidArgument(
                "no result",
            )));
        match result {
            Ok(receipt) => {
                if !receipt.duplicate {
                    self.on_stored(i, mailbox, dedup);
                }
            }
            Err(e) => {
                *self
                    .counters
                    .deposit_refusals
                    .entry(e.kind().to_string())
                    .or_insert(0) += 1;
            }
        }
        self.drain_core(i);
    }

    fn drain_core(&mut self, i: usize) {
        loop {
            let Some(n) = self.nodes.get_mut(i) else {
                return;
            };
            let Some(core) = n.mailbox.as_mut() else {
                return;
            };
            let Some(out) = core.poll_output() else {
                break;
            };
            match out {
                CoreOutput::Reply { surb, reply } => {
                    let sent = reply
                        .encode()
                        .and_then(|bytes| self.mode.use_surb(&surb, &bytes));
                    match sent {
                        Ok((first, packet)) => {
                            if let Some(&to) = self.index.get(&first) {
                                self.transmit(From::Peer(i as u32), to, packet.into_bytes());
                            }
                        }
                        Err(_) => self.counters.replies_failed += 1,
                    }
                }
                CoreOutput::ScheduleSweep { at } => {
                    self.q.schedule(at, Ev::Sweep { node: i as u32 });
                }
                CoreOutput::Replica { peer, message } => self.send_replica(i, peer, &message),
            }
        }
        self.schedule_replica_tick(i);
    }

    /// Sends a replica message from mailbox node `from` to its peer over their node link
    /// (Noise over TCP in the real mesh: the link's latency, no packet loss; lost when the
    /// destination is down when it arrives, or a partition separates them).
    fn send_replica(&mut self, from: usize, peer: NodeId, message: &ReplicaMessage) {
        let now = self.now();
        let bytes = message.encode();
        self.counters.replica_messages += 1;
        self.counters.replica_bytes += bytes.len() as u64;
        let Some(&to) = self.index.get(&peer) else {
            self.counters.replica_lost += 1;
            return;
        };
        if self
            .partitions
            .iter()
            .any(|p| p.separates(from, to as usize, now))
        {
            self.counters.replica_lost += 1;
            return;
        }
        let d = self
            .node_link
            .latency
            .sample(&mut self.replica_rng, from, to as usize)
            + self.node_link.serialisation(bytes.len());
        let incarnation = self.get(to as usize).map_or(0, |n| n.restarts);
        self.q.schedule(
            UnixTime(now + d.as_millis() as u64),
            Ev::Replica {
                from: from as u32,
                to,
                incarnation,
                bytes,
            },
        );
    }

    /// A replica message reaches mailbox node `to`: its core handles it, and the owner is
    /// told when it stored messages there (as its stream would push them).
    fn replica_arrive(&mut self, from: u32, to: u32, incarnation: u64, bytes: &[u8]) {
        let now = self.now();
        let Some(from_id) = self.get(from as usize).map(|n| n.id) else {
            return;
        };
        let Some(core) = self
            .nodes
            .get_mut(to as usize)
            .filter(|n| n.up && n.restarts == incarnation)
            .and_then(|n| n.mailbox.as_mut())
        else {
            self.counters.replica_lost += 1;
            return;
        };
        let message = match ReplicaMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.violations
                    .push(format!("replica message does not decode: {e}"));
                return;
            }
        };
        let pushed = match &message {
            ReplicaMessage::Push { mailbox_id, items } => Some((
                *mailbox_id,
                items.iter().map(|i| DedupId(i.id)).collect::<Vec<_>>(),
            )),
            _ => None,
        };
        let before = core.replica_stats().stored_from_peers;
        if let Err(e) = core.handle_replica(UnixTime(now), from_id, message) {
            self.violations
                .push(format!("replica message refused by its core: {e}"));
        }
        let stored = core.replica_stats().stored_from_peers > before;
        if stored && let Some((mailbox, ids)) = pushed {
            for id in ids {
                self.on_stored(to as usize, mailbox, Some(id));
            }
        }
        self.drain_core(to as usize);
    }

    /// Schedules mailbox node `i`'s replication tick when its core asks for it.
    fn schedule_replica_tick(&mut self, i: usize) {
        let now = self.now();
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        let Some(t) = n.mailbox.as_ref().and_then(|c| c.replica_timeout()) else {
            return;
        };
        if !n.up {
            return;
        }
        let t = ms(t).max(now).max(n.replica_phase_until);
        if n.replica_due.is_none_or(|d| t < d) {
            n.replica_due = Some(t);
            self.q
                .schedule(UnixTime(t), Ev::ReplicaTick { node: i as u32 });
        }
    }

    fn replica_tick(&mut self, node: u32) {
        let now = self.now();
        let Some(n) = self.nodes.get_mut(node as usize) else {
            return;
        };
        if n.replica_due != Some(now) {
            // Superseded, or the node crashed since.
            return;
        }
        n.replica_due = None;
        if let Some(core) = n.mailbox.as_mut().filter(|_| n.up)
            && let Err(e) = core.tick(UnixTime(now))
        {
            self.violations.push(format!("replica tick: {e}"));
        }
        self.drain_core(node as usize);
    }

    fn on_stored(&mut self, node: usize, mailbox: MailboxId, dedup: Option<DedupId>) {
        let now = self.now();
        let Some(&client) = self.by_mailbox.get(&mailbox) else {
            return;
        };
        let side = dedup.and_then(|d| self.side.get(&d).copied());
        // Hellos and receipts wait for their recipient like messages; acks and cover are
        // fetched by the (awake) sender.
        let is_message = matches!(side, Some(Side::Frag(..) | Side::Control));
        if let Some(Side::Frag(m, f)) = side
            && let Some(msg) = self.msgs.get_mut(m as usize)
            && let Some(frag) = msg.frags.get_mut(f as usize)
            && !frag.stored
        {
            frag.stored = true;
            if let Some(trace) = frag.trace.as_mut()
                && frag.builds == 1
                && trace.exit_ms.is_none()
            {
                trace.exit_ms = Some(now);
            }
            msg.stored_frags += 1;
            if usize::from(msg.stored_frags) == msg.frags.len() {
                msg.stored_ms = Some(now);
            }
        }
        // The owner's devices (one unless the user linked others).
        let mut devices = vec![client];
        if let Some(more) = self.devices_of.get(&client) {
            devices.extend(more.iter().copied());
        }
        for client in devices {
            let (online, current) = match self.clients.get_mut(client as usize) {
                Some(c) => {
                    c.dirty.insert(mailbox.0);
                    let current = c
                        .core
                        .owned_mailbox(&mailbox.0)
                        .and_then(|m| m.current().map(|r| r.node));
                    (c.online, current)
                }
                None => (false, None),
            };
            // The owner's stream is on the replica it reads: it hears of what is stored
            // there (a copy pushed by the entry replica tells it when that arrives), or, when
            // that replica is down or lost the mailbox, of what is stored anywhere (its
            // stream broke: it fails over).
            let here = current.is_none_or(|c| {
                self.index.get(&NodeId(c)) == Some(&(node as u32)) || !self.readable(&c, &mailbox)
            });
            if here && (!is_message || online) {
                self.schedule_fetch(client, node);
            }
        }
    }

    /// The user client `client` is a device of.
    fn user_of(&self, client: u32) -> u32 {
        self.clients.get(client as usize).map_or(client, |c| c.user)
    }

    /// Whether mailbox node `node` is up and holds `mailbox`.
    fn readable(&self, node: &[u8; 32], mailbox: &MailboxId) -> bool {
        self.index
            .get(&NodeId(*node))
            .and_then(|&i| self.nodes.get(i as usize))
            .filter(|n| n.up)
            .and_then(|n| n.mailbox.as_ref())
            .is_some_and(|c| c.last_seq(mailbox).is_ok())
    }

    fn schedule_fetch(&mut self, client: u32, node: usize) {
        let now = self.now();
        let delay = self.sc.workload.fetch_delay_ms;
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if c.fetch_scheduled {
            return;
        }
        c.fetch_scheduled = true;
        let endpoint = self.nodes.len() + client as usize;
        let push = self
            .client_link
            .latency
            .sample(&mut self.link_rng, node, endpoint)
            .as_millis() as u64;
        self.q.schedule(
            UnixTime(now + push + delay.ceil() as u64),
            Ev::Fetch { client },
        );
    }

    /// Client `client` fetches every mailbox it owns (as its `sync` does), hands what comes
    /// back to its core and carries out what the core asks for. `offline`: during setup.
    /// `all`: every mailbox the client owns (setup, the final round), else those something
    /// was stored into since they were last fetched.
    fn fetch_client(&mut self, client: u32, offline: bool, all: bool) {
        let now = self.now();
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        c.fetch_scheduled = false;
        let boxes = if all {
            c.dirty.clear();
            c.core.owned_mailboxes()
        } else {
            std::mem::take(&mut c.dirty)
                .into_iter()
                .filter_map(|id| c.core.owned_mailbox(&id))
                .collect()
        };
        let mut any_down = false;
        for m in boxes {
            // The replica read from now; when it is down or does not hold the mailbox (it
            // lost its disk and is not repaired yet), the next one of the set, within the
            // round, as the real client's sync does.
            let mut read = false;
            for _ in 0..m.replicas.len().max(1) {
                let Some(r) = self
                    .clients
                    .get(client as usize)
                    .and_then(|c| c.core.owned_mailbox_ref(&m.id))
                    .and_then(|m| m.current().map(|r| r.node))
                else {
                    break;
                };
                if self.readable(&r, &MailboxId(m.id)) {
                    if let Some(&node) = self.index.get(&NodeId(r)) {
                        self.read_replica(client, &m, r, node as usize, offline);
                        read = true;
                    }
                    break;
                }
                let moved = self
                    .clients
                    .get_mut(client as usize)
                    .and_then(|c| c.core.fail_over(&m.id))
                    .is_some_and(|n| n != r);
                if !moved {
                    break;
                }
                self.counters.failovers += 1;
            }
            if !read {
                any_down = true;
                if let Some(c) = self.clients.get_mut(client as usize) {
                    c.dirty.insert(m.id);
                }
            }
        }
        if any_down && !offline {
            // A mailbox node is down: try again in a second.
            if let Some(c) = self.clients.get_mut(client as usize) {
                c.fetch_scheduled = true;
            }
            if now + 1000 < self.end_ms {
                self.q.schedule(UnixTime(now + 1000), Ev::Fetch { client });
            }
        }
        // Like the real client's round: receipts, retransmissions, queued sends.
        if let Some(c) = self.clients.get_mut(client as usize) {
            let _ = c.core.handle_timeout(now);
        }
        self.drive_client(client, offline);
    }

    /// Client `client` reads its mailbox `m` on replica `node` (index `i`), page by page
    /// after its cursor there, hands each page to its core and acknowledges there what the
    /// core processed. A cursor beyond the replica's last message (it lost its disk and
    /// numbers anew) is reset and the replica read from the start, as the real client does
    /// on `bad_cursor`.
    fn read_replica(
        &mut self,
        client: u32,
        m: &whispr_client::state::OwnedMailbox,
        node: [u8; 32],
        i: usize,
        offline: bool,
    ) {
        let now = self.now();
        let batch = self.sc.limits.fetch_batch.max(1);
        let mailbox = MailboxId(m.id);
        let owner = self.owner_pub(client, m);
        // A new session (the first read there, or the node restarted since and lost ours)
        // reads the replica from the start, as the real client does: a node that lost its
        // disk and was repaired numbers its messages anew, possibly past our old cursor.
        let incarnation = self.get(i).map_or(0, |n| n.restarts);
        if let Some(c) = self.clients.get_mut(client as usize)
            && c.sessions.insert((m.id, node), incarnation) != Some(incarnation)
        {
            c.core.reset_cursor(&m.id, &node);
        }
        loop {
            let cursor = self
                .clients
                .get(client as usize)
                .and_then(|c| c.core.owned_mailbox_ref(&m.id))
                .and_then(|m| m.replica(&node).map(|r| r.cursor))
                .unwrap_or(0);
            let Some(core) = self.nodes.get_mut(i).and_then(|n| n.mailbox.as_mut()) else {
                break;
            };
            let got = match core.fetch(UnixTime(now), &mailbox, &owner, Some(cursor), batch) {
                Ok(g) => g,
                Err(whispr_mailbox::MailboxError::BadCursor(_)) if cursor != 0 => {
                    if let Some(c) = self.clients.get_mut(client as usize) {
                        c.core.reset_cursor(&m.id, &node);
                    }
                    continue;
                }
                Err(e) => {
                    self.violations
                        .push(format!("fetch by client {client} refused: {e}"));
                    break;
                }
            };
            let Some(last) = got.last().map(|m| m.seq) else {
                break;
            };
            let full = got.len() >= batch;
            let mut messages = Vec::with_capacity(got.len());
            for m in got {
                if m.expires_at.0 <= now {
                    self.violations.push(format!(
                        "message served {} ms after its expiry",
                        now - m.expires_at.0
                    ));
                }
                messages.push(self.fetched(client, m.seq, m.body));
            }
            let Some(c) = self.clients.get_mut(client as usize) else {
                return;
            };
            c.core.handle_fetched_from(now, &m.id, &node, &messages);
            let acked = self.drive_client(client, offline);
            // The core acknowledges what it processed; nothing new means it had read
            // these already (and a page that is not acknowledged would come back).
            if !full
                || !acked
                    .iter()
                    .any(|(id, up_to)| *id == m.id && *up_to >= last)
            {
                break;
            }
        }
        if offline {
            self.drain_core_offline(i);
        } else {
            self.drain_core(i);
        }
    }

    /// A message a mailbox core returned, as the mailbox API gives it to a client; follows
    /// the fragments and cover it carries.
    fn fetched(&mut self, client: u32, seq: u64, body: MessageBody) -> StoredMessage {
        let b64 = base64::engine::general_purpose::STANDARD;
        match body {
            MessageBody::Envelope(bytes) => {
                match Envelope::decode(&bytes) {
                    Ok(env) => self.follow_fetched(client, env.outer.dedup_id),
                    Err(_) => self
                        .violations
                        .push("stored envelope does not decode".into()),
                }
                StoredMessage {
                    seq,
                    kind: "envelope".into(),
                    envelope: Some(b64.encode(bytes)),
                    surb_id: None,
                    payload: None,
                    expires_at_ms: None,
                }
            }
            MessageBody::SurbReply { surb_id, payload } => {
                self.counters.acks_received += 1;
                StoredMessage {
                    seq,
                    kind: "surb_reply".into(),
                    envelope: None,
                    surb_id: Some(hex::encode(surb_id.as_bytes())),
                    payload: Some(b64.encode(payload)),
                    expires_at_ms: None,
                }
            }
        }
    }

    fn follow_fetched(&mut self, client: u32, dedup: DedupId) {
        match self.side.get(&dedup).copied() {
            Some(Side::Cover(owner)) => {
                if owner != self.user_of(client) {
                    self.violations
                        .push("cover packet delivered to a wrong mailbox".into());
                }
                self.counters.cover_received += 1;
                self.side.insert(dedup, Side::CoverFetched(owner));
            }
            Some(Side::CoverFetched(owner)) => {
                if owner != self.user_of(client) {
                    self.violations
                        .push("cover packet delivered to a wrong mailbox".into());
                }
                self.counters.duplicate_fragments_fetched += 1;
            }
            Some(Side::Frag(m, f)) => {
                let user = self.user_of(client);
                let Some(msg) = self.msgs.get_mut(m as usize) else {
                    return;
                };
                if msg.to != user {
                    self.violations
                        .push(format!("message {m} delivered to a wrong mailbox"));
                    return;
                }
                if client != user {
                    // A linked device: its deliveries are counted apart (the fragment
                    // counts follow the primary's reads).
                    return;
                }
                let Some(frag) = msg.frags.get_mut(f as usize) else {
                    return;
                };
                if frag.fetched {
                    self.counters.duplicate_fragments_fetched += 1;
                    return;
                }
                frag.fetched = true;
                msg.fetched_frags += 1;
            }
            Some(Side::Control) => {}
            None => self
                .violations
                .push("fetched an envelope nobody sent".into()),
        }
    }

    /// Carries out what client `client`'s core asks for: packets to their edge (or, during
    /// setup, straight through the nodes), acknowledgements to mailbox cores. Then follows
    /// what it built and what it told its user, and schedules its next timeout. The
    /// acknowledgements made.
    fn drive_client(&mut self, client: u32, offline: bool) -> Vec<([u8; 32], u64)> {
        let now = self.now();
        let mut acked = Vec::new();
        loop {
            let Some(c) = self.clients.get_mut(client as usize) else {
                return acked;
            };
            let Some(out) = c.core.poll_output() else {
                break;
            };
            match out {
                ClientOutput::Transmit { edge, packet } => {
                    if offline {
                        self.carry_offline(edge, packet);
                    } else if let Some(&to) = self.index.get(&edge) {
                        self.transmit(From::Client(client), to, packet);
                    }
                }
                ClientOutput::Save => {}
                ClientOutput::Ack {
                    mailbox,
                    node,
                    up_to,
                } => {
                    let Some(m) = c.core.owned_mailbox(&mailbox) else {
                        continue;
                    };
                    let owner = self.owner_pub(client, &m);
                    if let Some(core) = self
                        .index
                        .get(&NodeId(node))
                        .and_then(|&n| self.nodes.get_mut(n as usize))
                        .filter(|n| n.up)
                        .and_then(|n| n.mailbox.as_mut())
                        && core.ack(&MailboxId(mailbox), &owner, up_to).is_ok()
                    {
                        acked.push((mailbox, up_to));
                    }
                }
            }
        }
        self.account_builds(client);
        self.client_events(client, now);
        if !offline {
            self.schedule_wake(client);
        }
        acked
    }

    /// Follows the packets client `client` built: first sends and retransmissions of
    /// message fragments (with the sampled messages' routes), cover, hellos and receipts,
    /// hold parts.
    fn account_builds(&mut self, client: u32) {
        let Some(c) = self.clients.get(client as usize) else {
            return;
        };
        let builds = match c.builds.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return,
        };
        for b in builds {
            if b.route.iter().any(|n| !self.index.contains_key(n)) {
                self.counters.sybil_routes += 1;
            }
            let dedup_mailbox = match b.kind {
                BuildKind::Deposit(d, m) => (d, m),
                BuildKind::Hold => {
                    self.counters.hold_parts_sent += 1;
                    continue;
                }
                BuildKind::Other => continue,
            };
            let (dedup, mailbox) = dedup_mailbox;
            match self.side.get(&dedup).copied() {
                Some(Side::Frag(m, f)) => {
                    let route: Vec<u32> = b
                        .route
                        .iter()
                        .filter_map(|n| self.index.get(n).copied())
                        .collect();
                    let Some(msg) = self.msgs.get_mut(m as usize) else {
                        continue;
                    };
                    let sampled = msg.sampled && f == 0;
                    if msg.dest_node.is_none() {
                        msg.dest_node = route.last().copied();
                    }
                    msg.mailbox.get_or_insert(mailbox);
                    let Some(frag) = msg.frags.get_mut(f as usize) else {
                        continue;
                    };
                    frag.builds = frag.builds.saturating_add(1);
                    if frag.builds == 1 {
                        self.counters.fragments_sent += 1;
                        if sampled {
                            frag.trace = Some(Trace {
                                route,
                                delays_ms: b.delays_ms,
                                exit_ms: None,
                            });
                        }
                    } else {
                        self.counters.retransmissions += 1;
                    }
                }
                Some(Side::Cover(_) | Side::CoverFetched(_) | Side::Control) => {
                    self.counters.retransmissions += 1;
                }
                None => {
                    let sync = self
                        .clients
                        .get(client as usize)
                        .and_then(|c| c.core.sync_mailbox());
                    if self.by_mailbox.get(&mailbox) == Some(&client) && sync != Some(mailbox.0) {
                        self.counters.cover_sent += 1;
                        self.side.insert(dedup, Side::Cover(client));
                    } else {
                        self.counters.control_sent += 1;
                        self.side.insert(dedup, Side::Control);
                    }
                }
            }
        }
    }

    /// What client `client`'s core told its user: messages received, stored and failed
    /// sends, and anything that would be a bug.
    fn client_events(&mut self, client: u32, now: u64) {
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        let notices = c.core.take_notices();
        let unread = c.core.take_unread();
        for n in notices {
            let m = n.id.and_then(|id| c.outgoing.get(&id).copied());
            match (n.kind.as_str(), m) {
                ("stored", Some(m)) => {
                    if let Some(msg) = self.msgs.get_mut(m as usize) {
                        msg.acked_ms.get_or_insert(now);
                    }
                }
                ("failed", Some(m)) => {
                    if let Some(msg) = self.msgs.get_mut(m as usize)
                        && !msg.failed
                    {
                        msg.failed = true;
                        self.counters.fragments_failed += 1;
                    }
                }
                ("undecryptable" | "identity_changed" | "invitation_reused", _) => self
                    .violations
                    .push(format!("client {client}: {}: {}", n.kind, n.text)),
                _ => {}
            }
        }
        for r in unread {
            let Some(m) = message_index(&r.text) else {
                self.violations.push(format!(
                    "client {client} received a text the workload never sent"
                ));
                continue;
            };
            let user = self.clients.get(client as usize).map_or(client, |c| c.user);
            let Some(msg) = self.msgs.get_mut(m as usize) else {
                continue;
            };
            if msg.to != user || r.from != name_of(msg.from) {
                self.violations.push(format!(
                    "message {m} received by the wrong client or from the wrong contact"
                ));
                continue;
            }
            if user != client {
                // A linked device of the recipient: each gets each message once.
                if !self.device_received.entry(client).or_default().insert(m) {
                    self.violations
                        .push(format!("message {m} delivered twice to device {client}"));
                }
                continue;
            }
            if msg.delivered_ms.is_some() {
                self.violations.push(format!("message {m} delivered twice"));
                continue;
            }
            msg.delivered_ms = Some(now);
        }
    }

    fn schedule_wake(&mut self, client: u32) {
        let now = self.now();
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        let Some(t) = c.core.poll_timeout() else {
            return;
        };
        // A core that wants to run "now" again runs at the next millisecond at the earliest,
        // so that a core that cannot make progress does not spin.
        let t = t.max(now + 1);
        if c.wake_at.is_none_or(|w| t < w || w < now) && t <= self.end_ms {
            c.wake_at = Some(t);
            self.q.schedule(UnixTime(t), Ev::ClientWake { client });
        }
    }

    fn client_wake(&mut self, client: u32) {
        let now = self.now();
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if c.wake_at != Some(now) {
            // Superseded by an earlier wake that rescheduled.
            return;
        }
        c.wake_at = None;
        let _ = c.core.handle_timeout(now);
        self.drive_client(client, false);
    }

    /// Setup: a client's packet goes through the nodes at once (no link, no queue, no
    /// router), and what the destination answers comes back the same way.
    fn carry_offline(&mut self, first: NodeId, packet: Vec<u8>) {
        let now = self.now();
        let epoch = KeyEpoch(now / whispr_protocol::KEY_EPOCH_LEN.as_millis() as u64);
        let processor = self.mode.processor();
        let mut node = first;
        let mut bytes = packet;
        for _ in 0..16 {
            let Some(&i) = self.index.get(&node) else {
                return;
            };
            let Some(key) = self
                .nodes
                .get(i as usize)
                .and_then(|n| n.keys.iter().find(|(e, _)| *e == epoch))
                .map(|(_, k)| SphinxSecretKey::from(*k))
            else {
                return;
            };
            let Ok(processed) = processor.process(&[&key], &bytes) else {
                self.violations.push("setup packet does not open".into());
                return;
            };
            let delivery = match processed.action {
                HopAction::Forward {
                    next_hop, packet, ..
                } => {
                    node = next_hop;
                    bytes = packet.into_bytes();
                    continue;
                }
                HopAction::Deliver {
                    destination,
                    plaintext,
                } => match FinalMessage::decode_for(destination, &plaintext) {
                    Ok(FinalMessage::Deposit(env)) => Incoming::Deposit(env),
                    _ => return,
                },
                HopAction::DeliverSurbReply {
                    destination,
                    surb_id,
                    sealed,
                } => Incoming::SurbReply {
                    mailbox_id: MailboxId(destination.0),
                    surb_id,
                    payload: sealed,
                },
            };
            let Some(core) = self
                .nodes
                .get_mut(i as usize)
                .and_then(|n| n.mailbox.as_mut())
            else {
                return;
            };
            let (mailbox, surb) = match &delivery {
                Incoming::Deposit(env) => (env.outer.mailbox_id, false),
                Incoming::SurbReply { mailbox_id, .. } => (*mailbox_id, true),
            };
            match core.deposit_many(UnixTime(now), vec![delivery]).pop() {
                // A new device's SURBs for acknowledgements into the link mailbox are
                // minted with a reply key of its own, not the link mailbox's (the code does
                // not carry it): the node refuses those acks. Counted, not a violation.
                Some(Err(whispr_mailbox::MailboxError::Unauthorized(_)))
                    if surb && self.link_mailboxes.contains(&mailbox) =>
                {
                    self.link_acks_refused += 1;
                }
                Some(Err(e)) => self.violations.push(format!("setup deposit refused: {e}")),
                _ => {
                    if let Some(c) = self
                        .by_mailbox
                        .get(&mailbox)
                        .and_then(|&c| self.clients.get_mut(c as usize))
                    {
                        c.dirty.insert(mailbox.0);
                    }
                }
            }
            self.drain_core_offline(i as usize);
            return;
        }
    }

    /// Setup: a mailbox core's replies go back out of band.
    fn drain_core_offline(&mut self, i: usize) {
        loop {
            let Some(core) = self.nodes.get_mut(i).and_then(|n| n.mailbox.as_mut()) else {
                return;
            };
            let Some(out) = core.poll_output() else {
                break;
            };
            match out {
                CoreOutput::Reply { surb, reply } => {
                    if let Ok((first, packet)) = reply
                        .encode()
                        .and_then(|bytes| self.mode.use_surb(&surb, &bytes))
                    {
                        self.carry_offline(first, packet.into_bytes());
                    }
                }
                CoreOutput::ScheduleSweep { at } => {
                    self.q.schedule(at, Ev::Sweep { node: i as u32 });
                }
                // At once, like the packets.
                CoreOutput::Replica { peer, message } => {
                    let now = UnixTime(self.now());
                    let from = self.get(i).map(|n| n.id);
                    if let (Some(from), Some(&to)) = (from, self.index.get(&peer))
                        && let Some(core) = self
                            .nodes
                            .get_mut(to as usize)
                            .and_then(|n| n.mailbox.as_mut())
                    {
                        self.counters.replica_messages += 1;
                        let bytes = message.encode();
                        self.counters.replica_bytes += bytes.len() as u64;
                        match ReplicaMessage::decode(&bytes) {
                            Ok(m) => {
                                if let Err(e) = core.handle_replica(now, from, m) {
                                    self.violations.push(format!("setup replica message: {e}"));
                                }
                            }
                            Err(e) => self.violations.push(format!("setup replica message: {e}")),
                        }
                        self.drain_core_offline(to as usize);
                    }
                }
            }
        }
        self.schedule_replica_tick(i);
    }

    fn hold(&mut self, i: usize, part: HeldPacketPart) {
        let now = UnixTime(self.now());
        let Some(timer) = self.nodes.get_mut(i).and_then(|n| n.timer.as_mut()) else {
            return;
        };
        let (hold_id, ack_surb) = (part.hold_id, part.ack_surb.clone());
        let outcome = timer.holds.accept(now, part);
        if outcome.is_ok()
            && let Some(surb) = ack_surb
        {
            // The timer node acknowledges each part it took, as the real one does.
            let sent = Reply::HoldAck {
                hold_id,
                cancelled: false,
            }
            .encode()
            .and_then(|bytes| self.mode.use_surb(&surb, &bytes));
            match sent {
                Ok((first, packet)) => {
                    if let Some(&to) = self.index.get(&first) {
                        self.transmit(From::Peer(i as u32), to, packet.into_bytes());
                    }
                }
                Err(_) => self.counters.replies_failed += 1,
            }
        }
        let Some(timer) = self.nodes.get_mut(i).and_then(|n| n.timer.as_mut()) else {
            return;
        };
        let hold = match outcome {
            Ok(PartOutcome::Complete(h)) => h,
            Ok(PartOutcome::Incomplete) => return,
            Err(_) => {
                self.counters.payloads_refused += 1;
                return;
            }
        };
        let (task_id, task) = release_task(hold);
        let scheduled = timer.queue.schedule_with_id(now, task_id, task);
        if scheduled.is_ok() {
            self.counters.holds_scheduled += 1;
        } else {
            self.counters.payloads_refused += 1;
        }
        self.schedule_timer(i);
    }

    fn schedule_timer(&mut self, i: usize) {
        let now = self.now();
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        let Some(timer) = n.timer.as_ref() else {
            return;
        };
        if let Some(t) = timer.queue.poll_timeout() {
            let t = ms(t).max(now);
            if n.timer_due.is_none_or(|d| t < d) {
                n.timer_due = Some(t);
                self.q
                    .schedule(UnixTime(t), Ev::TimerDue { node: i as u32 });
            }
        }
    }

    fn timer_due(&mut self, node: u32) {
        let now = self.now();
        let i = node as usize;
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        if n.timer_due == Some(now) {
            n.timer_due = None;
        }
        if !n.up {
            return;
        }
        let Some(timer) = n.timer.as_mut() else {
            return;
        };
        let fired = timer
            .queue
            .poll_due(UnixTime(now), 10_000)
            .unwrap_or_default();
        let mut sends = Vec::new();
        for task in fired {
            match DeferredSend::decode(&task.payload) {
                Ok(send) => sends.push((task.id, send)),
                Err(_) => {
                    let _ = timer.queue.complete(&task.id);
                }
            }
        }
        for (id, send) in sends {
            // As the real timer node does: a release completes only once its first hop took
            // it; a first hop that is down fails the task, which is retried with back-off and
            // quarantined after the bound (security review finding 9).
            let to = self.index.get(&send.first_hop).copied();
            let accepted = to.is_some_and(|t| self.nodes.get(t as usize).is_some_and(|n| n.up));
            if let Some(timer) = self.nodes.get_mut(i).and_then(|n| n.timer.as_mut()) {
                if accepted {
                    let _ = timer.queue.complete(&id);
                } else {
                    let _ = timer.queue.fail(UnixTime(now), &id);
                    self.counters.hold_release_retries += 1;
                    continue;
                }
            }
            self.counters.holds_released += 1;
            if let Some(to) = to {
                self.transmit(From::Peer(node), to, send.packet.into_bytes());
            }
        }
        self.schedule_timer(i);
    }

    // ---------------------------------------------------------------- clients

    fn draw_size(&mut self, client: u32) -> u64 {
        let spec = self.sc.workload.message_size.clone();
        let Some(c) = self.clients.get_mut(client as usize) else {
            return 0;
        };
        match spec {
            SizeSpec::Constant { bytes } => bytes,
            SizeSpec::Uniform { min, max } => c.work.random_range(min..=max),
            SizeSpec::LogNormal { median, sigma, max } => {
                let u1: f64 = c.work.random_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = c.work.random_range(0.0..1.0);
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                ((median.ln() + sigma * z).exp().round() as u64).min(max)
            }
        }
    }

    fn next_message(&mut self, client: u32) {
        let now = self.now();
        let w = self.sc.workload.clone();
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if let Some(gap) = poisson_gap(&mut c.work, w.rate_per_client_per_min)
            && now + gap < self.send_end_ms
        {
            self.q
                .schedule(UnixTime(now + gap), Ev::NextMessage { client });
        }
        if c.contacts.is_empty() {
            return;
        }
        let to = c
            .contacts
            .get(c.work.random_range(0..c.contacts.len()))
            .copied()
            .unwrap_or(0);
        let scheduled = w.scheduled_fraction > 0.0
            && !self.timers.is_empty()
            && c.work.random_range(0.0..1.0) < w.scheduled_fraction;
        let size = self.draw_size(client);
        let release = if scheduled {
            now + (w.schedule_ahead_s * 1000.0) as u64
        } else {
            now
        };
        let id = self.msgs.len() as u32;
        let sampled = !scheduled && u64::from(id) % self.sample_stride == 0;
        let expires_ms =
            (w.expire_after_s > 0.0).then(|| release + (w.expire_after_s * 1000.0) as u64);
        let opts = SendOptions {
            at_ms: scheduled.then_some(release),
            expire_after: (w.expire_after_s > 0.0)
                .then(|| Duration::from_secs_f64(w.expire_after_s)),
        };
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        let sent = c
            .core
            .send(now, &name_of(to), &message_text(id, size), opts);
        let mut frags = Vec::new();
        let failed = match sent {
            Ok(local) => {
                c.outgoing.insert(local, id);
                for (f, dedup) in c.core.fragment_dedups(local).into_iter().enumerate() {
                    let dedup = DedupId(dedup);
                    self.side.insert(dedup, Side::Frag(id, f as u16));
                    frags.push(Frag {
                        builds: 0,
                        stored: false,
                        fetched: false,
                        trace: None,
                    });
                }
                false
            }
            Err(_) => {
                // No route (or no timer): the core refuses and forgets it.
                self.counters.no_route += 1;
                self.counters.fragments_failed += 1;
                true
            }
        };
        self.msgs.push(Msg {
            from: client,
            to,
            sent_ms: release,
            size,
            frags,
            stored_frags: 0,
            fetched_frags: 0,
            stored_ms: None,
            delivered_ms: None,
            acked_ms: None,
            expires_ms,
            failed,
            sampled,
            dest_node: None,
            mailbox: None,
        });
        self.counters.messages_sent += 1;
        if scheduled {
            self.counters.scheduled_sent += 1;
        }
        self.drive_client(client, false);
    }

    fn cover(&mut self, client: u32) {
        let now = self.now();
        let per_min = self.sc.workload.cover_per_min;
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if let Some(gap) = poisson_gap(&mut c.work, per_min)
            && now + gap < self.end_ms
        {
            self.q.schedule(UnixTime(now + gap), Ev::Cover { client });
        }
        if !c.online {
            return;
        }
        if c.core.send_cover(now).is_err() {
            self.counters.no_route += 1;
        }
        self.drive_client(client, false);
    }

    fn toggle(&mut self, client: u32) {
        let now = self.now();
        let on = self.sc.workload.online.on_mean_s * 1000.0;
        let off = self.sc.workload.online.off_mean_s * 1000.0;
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        c.online = !c.online;
        let mean = if c.online { on } else { off };
        let gap = exp_ms(&mut c.work, mean).ceil() as u64;
        let online = c.online;
        self.q
            .schedule(UnixTime(now + gap.max(1)), Ev::Toggle { client });
        if online {
            // The push latency of the client's first mailbox node stands for its polls'.
            let node = c
                .core
                .owned_mailboxes_iter()
                .next()
                .and_then(|m| self.index.get(&NodeId(m.node)).copied())
                .unwrap_or(0);
            self.schedule_fetch(client, node as usize);
        }
    }

    // ---------------------------------------------------------------- churn

    fn churn(&mut self, node: u32, action: ChurnAction) {
        let now = UnixTime(self.now());
        let i = node as usize;
        match action {
            ChurnAction::Crash | ChurnAction::Leave | ChurnAction::LoseDisk => {
                let Some(n) = self.nodes.get_mut(i) else {
                    return;
                };
                if n.up {
                    self.counters.crashes += 1;
                }
                n.up = false;
                n.wake_at = None;
                n.timer_due = None;
                n.replica_due = None;
                let mailbox_node = n.kind == NodeKind::Mailbox;
                if action == ChurnAction::LoseDisk {
                    // The restart opens empty stores (`churn` below: nothing to take).
                    self.counters.disks_lost += 1;
                    n.mailbox = None;
                    n.timer = None;
                    n.persisted_tags.clear();
                }
                if action == ChurnAction::Leave {
                    n.in_directory = false;
                    self.rebuild_directory();
                }
                if mailbox_node && self.replicas > 1 {
                    self.streams_broken(i);
                }
            }
            ChurnAction::Restart | ChurnAction::Join => {
                let Some(n) = self.nodes.get_mut(i) else {
                    return;
                };
                if n.up {
                    return;
                }
                n.restarts += 1;
                // Memory is lost; what the real node keeps on disk comes back.
                let mut router = Self::make_router(&self.sc, self.mode, n);
                router.restore_replay_tags(n.persisted_tags.iter().copied());
                let _ = router.handle_input(now, Input::Directory(self.directory.clone()));
                n.router = router;
                n.up = true;
                let store = n.mailbox.take().map(|c| c.store().clone());
                let tasks = n.timer.take().map(|t| t.queue.store().clone());
                let kind = n.kind;
                let join = action == ChurnAction::Join && !n.in_directory;
                if join {
                    n.in_directory = true;
                }
                if matches!(kind, NodeKind::Mailbox | NodeKind::Timer)
                    && let Err(e) = self.open_destination(
                        i,
                        store.unwrap_or_default(),
                        tasks.unwrap_or_default(),
                        now,
                    )
                {
                    self.violations.push(format!("restart of node {i}: {e}"));
                }
                if join {
                    self.rebuild_directory();
                }
                self.schedule_timer(i);
            }
        }
    }

    /// Mailbox node `i` went down: the online owners reading a mailbox there see their
    /// stream break and read again (failing over to the next replica).
    fn streams_broken(&mut self, i: usize) {
        let Some(id) = self.get(i).map(|n| n.id.0) else {
            return;
        };
        let mut readers = Vec::new();
        for (c, client) in self.clients.iter_mut().enumerate() {
            if !client.online {
                continue;
            }
            let mut any = false;
            for m in client.core.owned_mailboxes_iter() {
                if m.current().is_some_and(|r| r.node == id) {
                    client.dirty.insert(m.id);
                    any = true;
                }
            }
            if any {
                readers.push(c as u32);
            }
        }
        for c in readers {
            self.schedule_fetch(c, i);
        }
    }

    /// Random crashes per node per minute for nodes of `kind`.
    fn crashes_per_min(&self, kind: NodeKind) -> f64 {
        match kind {
            NodeKind::Edge | NodeKind::Mix(_) => self.sc.churn.relay_crashes_per_hour / 60.0,
            NodeKind::Mailbox => self.sc.churn.mailbox_crashes_per_hour / 60.0,
            _ => 0.0,
        }
    }

    fn random_crash(&mut self, node: u32) {
        let now = self.now();
        let kind = self.get(node as usize).map(|n| n.kind);
        let per_min = kind.map_or(0.0, |k| self.crashes_per_min(k));
        let down = self.sc.churn.down_mean_s * 1000.0;
        let down_for = (exp_ms(&mut self.work_rng, down).ceil() as u64).max(1);
        let lose_disk = kind == Some(NodeKind::Mailbox)
            && self.sc.churn.disk_loss_fraction > 0.0
            && self.work_rng.random::<f64>() < self.sc.churn.disk_loss_fraction;
        self.churn(
            node,
            if lose_disk {
                ChurnAction::LoseDisk
            } else {
                ChurnAction::Crash
            },
        );
        self.q.schedule(
            UnixTime(now + down_for),
            Ev::Churn {
                node,
                action: ChurnAction::Restart,
            },
        );
        if let Some(gap) = poisson_gap(&mut self.work_rng, per_min) {
            self.q
                .schedule(UnixTime(now + down_for + gap), Ev::RandomCrash { node });
        }
    }

    // ---------------------------------------------------------------- metrics

    fn sample(&mut self) {
        let now = self.now();
        let mut stored = 0;
        for n in &mut self.nodes {
            if let Some(core) = n.mailbox.as_ref() {
                let s = core.stats();
                stored += s.bytes;
                n.peak_bytes = n.peak_bytes.max(s.bytes);
                n.peak_messages = n.peak_messages.max(s.messages);
            }
        }
        // Availability: an owned mailbox is readable when one of its replicas is up and
        // holds it (a node that lost its disk holds it again once repaired).
        let (mut owned, mut readable) = (0u64, 0u64);
        for c in &self.clients {
            for m in c.core.owned_mailboxes_iter() {
                owned += 1;
                let id = MailboxId(m.id);
                let any = if m.replicas.is_empty() {
                    self.readable(&m.node, &id)
                } else {
                    m.replicas.iter().any(|r| self.readable(&r.node, &id))
                };
                readable += u64::from(any);
            }
        }
        self.counters.mailbox_samples += owned;
        self.counters.mailbox_samples_readable += readable;
        let (mut delivered, mut acked, mut failed) = (0, 0, 0);
        for m in &self.msgs {
            delivered += u64::from(m.delivered_ms.is_some());
            acked += u64::from(m.acked_ms.is_some());
            failed += u64::from(m.failed);
        }
        self.samples.push(Sample {
            t_s: (now - START_MS) as f64 / 1000.0,
            sent: self.counters.messages_sent,
            delivered,
            acked,
            failed,
            pending_events: self.q.len() as u64,
            wire_bytes: self.counters.wire_bytes,
            stored_bytes: stored,
            nodes_up: self.nodes.iter().filter(|n| n.up).count() as u64,
        });
        let every = (self.sc.output.sample_every_s * 1000.0) as u64;
        if now + every < self.end_ms {
            self.q.schedule(UnixTime(now + every.max(1)), Ev::Sample);
        }
    }

    fn anonymity_of(&self, msg: &Msg) -> Option<(MessageAnonymity, bool)> {
        let trace = msg.frags.first()?.trace.as_ref()?;
        let exit = trace.exit_ms?;
        let population = self.users;
        // Trace back through compromised hops from the end of the route: the observer then
        // knows when the packet reached the first hop of that compromised suffix.
        let hops = trace.route.len().saturating_sub(1); // delaying hops (all but the last)
        let mut j = hops; // index of the hop whose arrival time the observer knows
        let mut known_ms = exit as f64;
        while j > 0 {
            let prev = j - 1;
            let compromised = trace
                .route
                .get(prev)
                .and_then(|n| self.nodes.get(*n as usize))
                .is_some_and(|n| n.compromised);
            if !compromised {
                break;
            }
            let held = trace.delays_ms.get(prev).copied().unwrap_or(0) as f64;
            known_ms -= held + self.node_latency_mean;
            j = prev;
        }
        if j == 0 {
            // Every delaying hop is compromised: the edge saw the sender.
            return Some(((0.0, 1.0, 0.0, true), true));
        }
        // The client's link and j node links lie before hop j (index 0 is the edge).
        let fixed = self.client_latency_mean + j as f64 * self.node_latency_mean;
        let mean = self.sc.mixing.delay_ms_mean;
        let k = j as u32;
        let exit_rel = known_ms - START_MS as f64;
        // Entries that could explain the exit: within [exit - fixed - window, exit - fixed].
        let window = if mean > 0.0 {
            mean * (k as f64 + 12.0 * (k as f64).sqrt() + 12.0)
        } else {
            0.0
        };
        let tolerance = 1.0;
        let hi = exit_rel - fixed + tolerance;
        let lo = exit_rel - fixed - window - tolerance;
        let from = self.entries.partition_point(|e| e.at_ms < lo);
        let to = self.entries.partition_point(|e| e.at_ms <= hi);
        let window_entries = self.entries.get(from..to)?;
        let weights = anonymity::timing_distribution(
            window_entries,
            exit_rel,
            fixed,
            k,
            mean,
            population,
            tolerance,
        );
        let a = anonymity::anonymity(&weights, population);
        let right = anonymity::best_guess(&weights) == Some(msg.from as usize);
        Some((
            (a.entropy_bits, a.anonymity_set, a.normalised_degree, right),
            false,
        ))
    }

    /// The owner public key of an owned mailbox (cached from its creation).
    fn owner_pub(&mut self, client: u32, m: &whispr_client::state::OwnedMailbox) -> [u8; 32] {
        *self
            .owner_pubs
            .entry((MailboxId(m.id), client))
            .or_insert_with(|| owner_key(m).verifying_key().to_bytes())
    }

    /// Whether a fragment of message `i` is still stored on a replica of its recipient's
    /// mailbox (up or down), not acknowledged there by the owner.
    fn still_stored(&self, i: usize) -> bool {
        let Some(mailbox) = self.msgs.get(i).and_then(|m| m.mailbox) else {
            return false;
        };
        let Some((owner, m)) = self.by_mailbox.get(&mailbox).and_then(|&c| {
            self.clients
                .get(c as usize)
                .and_then(|x| x.core.owned_mailbox(&mailbox.0))
                .map(|m| (c, m))
        }) else {
            return false;
        };
        let device = self
            .owner_pubs
            .get(&(mailbox, owner))
            .copied()
            .unwrap_or_else(|| owner_key(&m).verifying_key().to_bytes());
        let ids: BTreeSet<[u8; 16]> = self
            .side
            .iter()
            .filter(|(_, s)| matches!(s, Side::Frag(x, _) if *x as usize == i))
            .map(|(d, _)| d.0)
            .collect();
        let now = UnixTime(self.now());
        m.replicas.iter().any(|r| {
            let Some(core) = self
                .index
                .get(&NodeId(r.node))
                .and_then(|&n| self.nodes.get(n as usize))
                .and_then(|n| n.mailbox.as_ref())
            else {
                return false;
            };
            let mut after = 0;
            while let Ok(got) = core.fetch(now, &mailbox, &device, Some(after), 1000) {
                if got.iter().any(|g| ids.contains(&g.id)) {
                    return true;
                }
                match got.last() {
                    Some(last) => after = last.seq,
                    None => break,
                }
            }
            false
        })
    }

    fn finish(mut self) -> Results {
        let end = self.now();
        let mut r = Results {
            nodes: self.nodes.len(),
            clients: self.users,
            linked_devices: self.clients.len().saturating_sub(self.users),
            link_acks_refused: self.link_acks_refused,
            events: self.q.processed(),
            ..Results::default()
        };
        for (i, m) in self.msgs.iter().enumerate() {
            r.sent += 1;
            if m.failed {
                r.failed += 1;
            }
            if m.acked_ms.is_some() {
                r.acked += 1;
            }
            if m.dest_node
                .and_then(|n| self.nodes.get(n as usize))
                .is_some_and(|n| n.compromised)
            {
                r.recipient_node_compromised += 1;
            }
            match m.delivered_ms {
                Some(d) => {
                    r.delivered += 1;
                    r.delivered_fragments += m.frags.len() as u64;
                    r.delivered_bytes += m.size;
                    r.latency_ms.push(d.saturating_sub(m.sent_ms) as f64);
                    r.delivered_at_s.push((d - START_MS) as f64 / 1000.0);
                    if let Some(s) = m.stored_ms {
                        r.network_latency_ms
                            .push(s.saturating_sub(m.sent_ms) as f64);
                    }
                }
                None => {
                    let expired = m.expires_ms.is_some_and(|e| e <= end);
                    if expired {
                        r.expired_undelivered += 1;
                    }
                    if m.acked_ms.is_some() && !expired {
                        r.acked_lost += 1;
                        r.acked_lost_still_stored += u64::from(self.still_stored(i));
                        self.violations.push(format!(
                            "message {i} was acknowledged but never delivered nor expired"
                        ));
                    }
                }
            }
            for d in self.devices_of.get(&m.to).into_iter().flatten() {
                let got = self
                    .device_received
                    .get(d)
                    .is_some_and(|s| s.contains(&(i as u32)));
                if got {
                    r.device_deliveries += 1;
                } else if m.delivered_ms.is_some() {
                    r.device_missing += 1;
                }
            }
            if m.sampled
                && let Some((a, traced)) = self.anonymity_of(m)
            {
                r.anonymity.push(a);
                r.fully_traced += u64::from(traced);
            }
        }
        r.mailbox_peaks = self
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Mailbox)
            .map(|n| (n.peak_bytes, n.peak_messages))
            .collect();
        r.violations = std::mem::take(&mut self.violations);
        r.counters = std::mem::take(&mut self.counters);
        r.samples = std::mem::take(&mut self.samples);
        r
    }
}
