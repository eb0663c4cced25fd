//! Sphinx packets (crate `sphinx-packet`), with one fixed size on the wire.
//!
//! * [`build_packet`] wraps a payload for a route of 1–[`HOPS_MAX`] hops, with a delay for
//!   each hop but the last and a [`DestinationAddress`] that only the last hop learns.
//! * [`process_packet`] peels one layer at a hop: "forward to X after delay D", or "final
//!   payload for destination Y", or "SURB reply for destination Y". It also returns the
//!   packet's [`ReplayTag`], which the node keeps per key epoch ([`ReplayFilter`]).
//! * [`create_surb`] / [`use_surb`] / [`SurbRecovery::open`]: single-use reply blocks in the
//!   single-seed form (`sphinx-packet` version 260): the node that uses the SURB holds only the
//!   last hop's payload seed, so nobody but the SURB's creator can read the reply.
//!
//! Packet size: a [`HEADER_SIZE`]-byte header (5 hops × 60 bytes of routing information,
//! the 32-byte group element and a 16-byte MAC) and a [`PAYLOAD_SIZE`] = 2 KiB payload, so
//! [`PACKET_SIZE`] = 2396 bytes. 2 KiB holds a typical chat message with its sealed-sender
//! envelope and an ack SURB in one packet (padding waste stays small for short messages),
//! while a 1 MiB message still needs only 874 packets; it is the payload size Loopix and Nym
//! use for the same trade-off. See `docs/protocol.md`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sphinx_packet::constants::{NODE_ADDRESS_LENGTH, PAYLOAD_KEY_SEED_SIZE};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::payload::{PAYLOAD_OVERHEAD_SIZE, Payload};
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;
use sphinx_packet::{
    ProcessedPacketData, SURB, SURBMaterial, SphinxPacket, SphinxPacketBuilder, SurbReplyRecovery,
};
use zeroize::Zeroizing;

use crate::{DestinationAddress, Error, KeyEpoch, NodeId, Result, SurbId};

pub use x25519_dalek::{PublicKey as SphinxPublicKey, StaticSecret as SphinxSecretKey};

/// Size of a Sphinx header.
pub const HEADER_SIZE: usize = sphinx_packet::header::HEADER_SIZE;
/// Size of a Sphinx payload (fixed for the whole network).
pub const PAYLOAD_SIZE: usize = 2048;
/// Size of every packet on the mesh.
pub const PACKET_SIZE: usize = HEADER_SIZE + PAYLOAD_SIZE;
/// Largest plaintext a packet (or a SURB reply) carries.
pub const PLAINTEXT_LEN_MAX: usize = PAYLOAD_SIZE - PAYLOAD_OVERHEAD_SIZE;
/// Most hops a route may have (edge, mix layers and destination together).
pub const HOPS_MAX: usize = sphinx_packet::constants::MAX_PATH_LENGTH;
/// Size of an encoded SURB: header, first hop address and one payload key seed.
pub const SURB_SIZE: usize = HEADER_SIZE + NODE_ADDRESS_LENGTH + PAYLOAD_KEY_SEED_SIZE;
/// Largest per-hop delay a packet may ask for; a hop refuses packets asking for more. Mixing
/// delays are a second or less; longer holds go to timer nodes. Bounding the hop delay bounds
/// how long one packet can occupy a mixing queue (security review, finding 4).
pub const HOP_DELAY_MAX: Duration = Duration::from_secs(60);
/// Size of a replay tag.
pub const REPLAY_TAG_SIZE: usize = sphinx_packet::constants::REPLAY_TAG_SIZE;

/// One hop of a route: the node and its Sphinx public key for the epoch the packet will use.
#[derive(Clone, Debug)]
pub struct RouteHop {
    /// The node (its identity key is its Sphinx address).
    pub node: NodeId,
    /// Its Sphinx public key for the key epoch in use.
    pub sphinx_key: SphinxPublicKey,
}

/// A packet of exactly [`PACKET_SIZE`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Packet(Vec<u8>);

impl Packet {
    /// Takes wire bytes; anything but exactly [`PACKET_SIZE`] bytes is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Packet> {
        if bytes.len() != PACKET_SIZE {
            return Err(Error::BadLength {
                what: "sphinx packet",
                len: bytes.len(),
                expected: PACKET_SIZE,
            });
        }
        Ok(Packet(bytes.to_vec()))
    }

    fn from_sphinx(packet: &SphinxPacket) -> Result<Packet> {
        let bytes = packet.to_bytes();
        if bytes.len() != PACKET_SIZE {
            return Err(Error::Crypto("sphinx packet of unexpected size"));
        }
        Ok(Packet(bytes))
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The wire bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packet({} bytes)", self.0.len())
    }
}

/// A packet's replay tag: equal for every copy of one packet at one hop.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplayTag(pub [u8; REPLAY_TAG_SIZE]);

impl std::fmt::Debug for ReplayTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayTag(..)")
    }
}

fn sphinx_err(what: &'static str) -> impl Fn(sphinx_packet::Error) -> Error {
    move |_| Error::InvalidPacket(what)
}

fn check_route(route: &[RouteHop], delays: &[Duration]) -> Result<()> {
    if route.is_empty() || route.len() > HOPS_MAX {
        return Err(Error::InvalidArgument("a route has 1 to 5 hops"));
    }
    if delays.len().saturating_add(1) != route.len() {
        return Err(Error::InvalidArgument(
            "a route of n hops takes n - 1 delays (the last hop delivers at once)",
        ));
    }
    if delays.iter().any(|d| *d > HOP_DELAY_MAX) {
        return Err(Error::InvalidArgument("a hop delay is above HOP_DELAY_MAX"));
    }
    Ok(())
}

fn sphinx_route(route: &[RouteHop], delays: &[Duration]) -> (Vec<Node>, Vec<Delay>) {
    let nodes = route
        .iter()
        .map(|hop| Node::new(NodeAddressBytes::from_bytes(hop.node.0), hop.sphinx_key))
        .collect();
    // sphinx-packet takes one delay per hop; the last one is never read (final hop).
    let delays = delays
        .iter()
        .chain(std::iter::once(&Duration::ZERO))
        .map(|d| Delay::new_from_nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
        .collect();
    (nodes, delays)
}

/// Builds a packet carrying `plaintext` (at most [`PLAINTEXT_LEN_MAX`] bytes) along `route`.
///
/// `delays[i]` is how long hop `i` holds the packet before forwarding it; the last hop
/// delivers to `destination` at once, so there are `route.len() - 1` delays.
pub fn build_packet<R: rand::CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: DestinationAddress,
    plaintext: &[u8],
) -> Result<Packet> {
    check_route(route, delays)?;
    if plaintext.len() > PLAINTEXT_LEN_MAX {
        return Err(Error::TooLarge {
            what: "packet plaintext",
            len: plaintext.len(),
            max: PLAINTEXT_LEN_MAX,
        });
    }
    let (nodes, sphinx_delays) = sphinx_route(route, delays);
    let initial_secret = SphinxSecretKey::random_from_rng(rng);
    // A zero SURB identifier marks a forward packet at the final hop.
    let destination = Destination::new(
        DestinationAddressBytes::from_bytes(destination.0),
        [0u8; 16],
    );
    let packet = SphinxPacketBuilder::new()
        .with_payload_size(PAYLOAD_SIZE)
        .with_initial_secret(&initial_secret)
        .build_packet(plaintext, &nodes, &destination, &sphinx_delays)
        .map_err(|_| Error::InvalidArgument("sphinx-packet refused the route"))?;
    Packet::from_sphinx(&packet)
}

/// What a hop does with a packet it processed.
#[derive(Debug)]
pub enum HopAction {
    /// Hold the packet for `delay`, then send it to `next_hop`.
    Forward {
        /// The next node.
        next_hop: NodeId,
        /// How long to hold the packet first.
        delay: Duration,
        /// The re-wrapped packet (same size).
        packet: Packet,
    },
    /// We are the final hop: deliver `plaintext` (a [`crate::wire::FinalPayload`]) to
    /// `destination`.
    Deliver {
        /// Where the sender addressed it.
        destination: DestinationAddress,
        /// The payload plaintext.
        plaintext: Vec<u8>,
    },
    /// We are the final hop of a SURB reply: store `sealed` for `destination`; only the
    /// SURB's creator can open it ([`SurbRecovery::open`]).
    DeliverSurbReply {
        /// The SURB creator's mailbox.
        destination: DestinationAddress,
        /// The SURB's identifier, by which its creator finds the recovery material.
        surb_id: SurbId,
        /// The reply, still sealed.
        sealed: Vec<u8>,
    },
}

/// The result of [`process_packet`].
#[derive(Debug)]
pub struct Processed {
    /// Check it against the replay filter of `key_index`'s epoch before acting.
    pub replay_tag: ReplayTag,
    /// Which of the keys passed to [`process_packet`] opened the header.
    pub key_index: usize,
    /// What to do.
    pub action: HopAction,
}

/// Peels one layer off `bytes` with the first of `keys` that authenticates the header (pass
/// the current epoch's key first, then the previous epoch's).
///
/// Errors are all peer-caused: wrong size, header MAC failing under every key, unknown Sphinx
/// version, a delay above [`HOP_DELAY_MAX`], or a final payload with broken padding (which is
/// how a flipped payload bit shows at the last hop).
pub fn process_packet(keys: &[&SphinxSecretKey], bytes: &[u8]) -> Result<Processed> {
    let packet = Packet::from_bytes(bytes)?;
    let packet =
        SphinxPacket::from_bytes(&packet.0).map_err(sphinx_err("undecodable sphinx packet"))?;
    let (key_index, expanded) = keys
        .iter()
        .enumerate()
        .find_map(|(index, key)| {
            let expanded = packet.header.compute_expanded_shared_secret(key);
            packet
                .header
                .ensure_header_integrity(&expanded)
                .ok()
                .map(|()| (index, expanded))
        })
        .ok_or(Error::HeaderIntegrity)?;
    let replay_tag = ReplayTag(*expanded.replay_tag());
    let processed = packet
        .process_with_expanded_secret(&expanded)
        .map_err(sphinx_err("sphinx processing failed"))?;
    if processed.version != SINGLE_SEED_SURB_VERSION {
        return Err(Error::InvalidPacket("unsupported sphinx version"));
    }
    let action = match processed.data {
        ProcessedPacketData::ForwardHop {
            next_hop_packet,
            next_hop_address,
            delay,
        } => {
            let delay = delay.to_duration();
            if delay > HOP_DELAY_MAX {
                return Err(Error::InvalidPacket("hop delay above HOP_DELAY_MAX"));
            }
            HopAction::Forward {
                next_hop: NodeId(next_hop_address.to_bytes()),
                delay,
                packet: Packet::from_sphinx(&next_hop_packet)
                    .map_err(|_| Error::InvalidPacket("re-wrapped packet of unexpected size"))?,
            }
        }
        ProcessedPacketData::FinalHop {
            destination,
            identifier,
            payload,
        } => {
            let destination = DestinationAddress(destination.as_bytes());
            if identifier == [0u8; 16] {
                HopAction::Deliver {
                    destination,
                    plaintext: payload
                        .recover_plaintext()
                        .map_err(sphinx_err("final payload failed its padding check"))?,
                }
            } else {
                HopAction::DeliverSurbReply {
                    destination,
                    surb_id: SurbId(identifier),
                    sealed: payload.into_bytes(),
                }
            }
        }
    };
    Ok(Processed {
        replay_tag,
        key_index,
        action,
    })
}

/// What a router does to peel one layer off a packet: [`process_packet`] in production
/// ([`SphinxProcessor`]). The simulator's `fast` mode plugs a cheap codec in here so that the
/// same router code handles 10⁶ packets a second; nothing else in the router changes.
pub trait PacketProcessor: Send + Sync + std::fmt::Debug {
    /// Same contract as [`process_packet`]: `keys` are the current then the previous epoch's.
    fn process(&self, keys: &[&SphinxSecretKey], bytes: &[u8]) -> Result<Processed>;
}

/// The production [`PacketProcessor`]: Sphinx.
#[derive(Clone, Copy, Debug, Default)]
pub struct SphinxProcessor;

impl PacketProcessor for SphinxProcessor {
    fn process(&self, keys: &[&SphinxSecretKey], bytes: &[u8]) -> Result<Processed> {
        process_packet(keys, bytes)
    }
}

/// A single-use reply block, as carried in envelopes ([`SURB_SIZE`] bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Surb(Vec<u8>);

impl Surb {
    /// Takes wire bytes, checking that they parse as a single-seed SURB.
    pub fn from_bytes(bytes: &[u8]) -> Result<Surb> {
        if bytes.len() != SURB_SIZE {
            return Err(Error::BadLength {
                what: "surb",
                len: bytes.len(),
                expected: SURB_SIZE,
            });
        }
        let surb = SURB::from_bytes(bytes).map_err(sphinx_err("undecodable surb"))?;
        if surb.materials_count() != 1 {
            return Err(Error::InvalidPacket("surb is not single-seed"));
        }
        Ok(Surb(bytes.to_vec()))
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Surb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Surb(..)")
    }
}

/// What the creator of a SURB keeps to read the reply. Secret: zeroed on drop.
#[derive(Clone)]
pub struct SurbRecovery {
    inner: SurbReplyRecovery,
}

impl std::fmt::Debug for SurbRecovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SurbRecovery(..)")
    }
}

impl SurbRecovery {
    /// The SURB's identifier (what the reply arrives with).
    pub fn surb_id(&self) -> SurbId {
        SurbId(*self.inner.identifier())
    }

    /// Opens a reply delivered as [`HopAction::DeliverSurbReply`]. Fails for any other SURB's
    /// reply, or if the reply was tampered with.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() != PAYLOAD_SIZE {
            return Err(Error::BadLength {
                what: "surb reply",
                len: sealed.len(),
                expected: PAYLOAD_SIZE,
            });
        }
        let payload = Payload::from_bytes(sealed).map_err(|_| Error::Decrypt("surb reply"))?;
        self.inner
            .recover_plaintext(payload)
            .map_err(|_| Error::Decrypt("surb reply"))
    }

    /// Serialises it for the creator's own storage (secret!).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.inner.to_bytes())
    }

    /// Reads back [`SurbRecovery::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<SurbRecovery> {
        SurbReplyRecovery::from_bytes(bytes)
            .map(|inner| SurbRecovery { inner })
            .map_err(|_| Error::Malformed {
                what: "surb recovery",
                reason: "not 16 bytes of id and 1 to 5 seeds",
            })
    }
}

/// Creates a SURB through `route` (its last hop is the creator's mailbox node) to
/// `destination` (the creator's mailbox), identified by `surb_id` (must not be zero).
pub fn create_surb<R: rand::CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: DestinationAddress,
    surb_id: SurbId,
) -> Result<(Surb, SurbRecovery)> {
    check_route(route, delays)?;
    if surb_id.0 == [0u8; 16] {
        return Err(Error::InvalidArgument("a SURB id must not be zero"));
    }
    let (nodes, sphinx_delays) = sphinx_route(route, delays);
    let material = SURBMaterial::new(
        nodes,
        sphinx_delays,
        Destination::new(
            DestinationAddressBytes::from_bytes(destination.0),
            surb_id.0,
        ),
        SINGLE_SEED_SURB_VERSION,
    );
    let (surb, recovery) =
        SURB::new_recoverable(SphinxSecretKey::random_from_rng(rng), material)
            .map_err(|_| Error::InvalidArgument("sphinx-packet refused the SURB route"))?;
    let bytes = surb.to_bytes();
    if bytes.len() != SURB_SIZE {
        return Err(Error::Crypto("surb of unexpected size"));
    }
    Ok((Surb(bytes), SurbRecovery { inner: recovery }))
}

/// Uses a SURB to send `reply` (at most [`PLAINTEXT_LEN_MAX`] bytes): returns the first hop to
/// send the packet to, and the packet.
pub fn use_surb(surb: &Surb, reply: &[u8]) -> Result<(NodeId, Packet)> {
    if reply.len() > PLAINTEXT_LEN_MAX {
        return Err(Error::TooLarge {
            what: "surb reply",
            len: reply.len(),
            max: PLAINTEXT_LEN_MAX,
        });
    }
    let parsed = SURB::from_bytes(&surb.0).map_err(sphinx_err("undecodable surb"))?;
    let (packet, first_hop) = parsed
        .use_surb(reply, PAYLOAD_SIZE)
        .map_err(sphinx_err("surb could not wrap the reply"))?;
    Ok((NodeId(first_hop.to_bytes()), Packet::from_sphinx(&packet)?))
}

/// Replay tags per key epoch, for the current and the previous epoch, in bounded memory.
///
/// In-memory; the relay persists the tags it accepts so that a restart does not reopen
/// replays. An epoch's tags are kept exactly up to [`ReplayFilter::EXACT_TAGS_MAX`] (or the
/// capacity, if smaller), then in a Bloom filter sized for `tags_per_epoch_max` tags at a
/// false-positive rate of [`ReplayFilter::FALSE_POSITIVE_RATE`]. A replay is always refused
/// (a Bloom filter has no false negatives) and the memory never grows past the filter's
/// size; past the capacity a fresh packet is refused as a replay with a probability that
/// grows slowly (about 0.3 % at twice the capacity, 7 % at three times), so that someone
/// flooding the filter degrades it gradually instead of shutting the relay for the rest of
/// the epoch, and the sender of a refused packet retransmits through another route.
#[derive(Clone)]
pub struct ReplayFilter {
    tags_per_epoch_max: usize,
    seed: u128,
    epochs: BTreeMap<KeyEpoch, EpochTags>,
}

impl std::fmt::Debug for ReplayFilter {
    // The seed (someone who knows it can craft tags that collide in the Bloom filter) and
    // the tags (they link packets) stay out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("tags_per_epoch_max", &self.tags_per_epoch_max)
            .field("epochs", &self.epochs.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum EpochTags {
    Exact(HashSet<ReplayTag>),
    Bloom {
        filter: fastbloom::BloomFilter,
        len: usize,
    },
}

impl EpochTags {
    fn len(&self) -> usize {
        match self {
            EpochTags::Exact(tags) => tags.len(),
            EpochTags::Bloom { len, .. } => *len,
        }
    }
}

impl ReplayFilter {
    /// Tags kept exactly per epoch before switching to the Bloom filter (about 4 MiB).
    pub const EXACT_TAGS_MAX: usize = 1 << 16;
    /// The Bloom filter's false-positive rate at its capacity.
    pub const FALSE_POSITIVE_RATE: f64 = 1e-6;

    /// A filter sized for `tags_per_epoch_max` tags per epoch, with a fixed hashing seed.
    pub fn new(tags_per_epoch_max: usize) -> ReplayFilter {
        ReplayFilter::with_seed(tags_per_epoch_max, 0)
    }

    /// [`ReplayFilter::new`] with the Bloom filter's hashing seed (nodes use their own, so
    /// that no two relays' filters collide on the same tags; the simulator stays
    /// deterministic).
    pub fn with_seed(tags_per_epoch_max: usize, seed: u128) -> ReplayFilter {
        ReplayFilter {
            tags_per_epoch_max: tags_per_epoch_max.max(1),
            seed,
            epochs: BTreeMap::new(),
        }
    }

    /// Records `tag` for `epoch`; [`Error::Replayed`] if it was seen before (or, past the
    /// exact part, may have been). Epochs older than `epoch`'s predecessor are forgotten
    /// (their keys are gone, so their packets cannot be processed any more).
    pub fn check_and_insert(&mut self, epoch: KeyEpoch, tag: ReplayTag) -> Result<()> {
        let oldest_kept = epoch.previous().unwrap_or(epoch);
        self.epochs.retain(|e, _| *e >= oldest_kept);
        let exact_max = self.tags_per_epoch_max.min(Self::EXACT_TAGS_MAX);
        let tags = self
            .epochs
            .entry(epoch)
            .or_insert_with(|| EpochTags::Exact(HashSet::new()));
        if let EpochTags::Exact(set) = tags
            && set.len() >= exact_max
            && !set.contains(&tag)
        {
            let mut filter = fastbloom::BloomFilter::with_false_pos(Self::FALSE_POSITIVE_RATE)
                .seed(&self.seed)
                .expected_items(self.tags_per_epoch_max);
            for t in set.iter() {
                filter.insert(t);
            }
            *tags = EpochTags::Bloom {
                filter,
                len: set.len(),
            };
        }
        match tags {
            EpochTags::Exact(set) => {
                if !set.insert(tag) {
                    return Err(Error::Replayed);
                }
            }
            EpochTags::Bloom { filter, len } => {
                if filter.contains(&tag) {
                    return Err(Error::Replayed);
                }
                filter.insert(&tag);
                *len = len.saturating_add(1);
            }
        }
        Ok(())
    }

    /// Number of tags recorded, over all epochs.
    pub fn len(&self) -> usize {
        self.epochs.values().map(EpochTags::len).sum()
    }

    /// True when no tag is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
