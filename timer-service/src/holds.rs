//! Held packets: the reassembly of [`HeldPacketPart`]s into the Sphinx packet a timer node
//! holds until its release time.
//!
//! A client sends a held packet ([`PACKET_SIZE`] bytes) to a timer node in 1 to
//! [`HOLD_PARTS_MAX`] parts, each in its own forward packet. [`HoldAssembler`] collects the
//! parts of each `hold_id` until all have arrived, then returns the packet made of their data
//! concatenated in `part_index` order ([`CompletedHold`]); the node schedules it as a
//! deferred send (see [`crate::node::TimerNode::accept_hold_part`]).
//!
//! Rules (the protocol leaves them open, `docs/protocol.md` §12 Q9; these are the timer
//! node's):
//!
//! * every part of a hold carries the same `part_count`, `release_at`, `cancel_hash` and
//!   `first_hop`; a part that disagrees with the parts already held is refused
//!   ([`HoldError::Mismatch`]);
//! * `part_count` is 1 to [`HOLD_PARTS_MAX`], `part_index < part_count`, a part is at most
//!   [`PACKET_SIZE`] bytes ([`HoldError::PartOutOfRange`]), and the parts of a hold together
//!   never exceed [`PACKET_SIZE`] bytes ([`HoldError::TooLong`]); a second part with an index
//!   already held is refused ([`HoldError::DuplicatePart`]);
//! * the complete data must be exactly [`PACKET_SIZE`] bytes ([`HoldError::BadLength`]; the
//!   partial hold is then dropped, since no later part can fix it);
//! * `release_at` may be at most [`HoldConfig::release_ahead_max_ms`] ahead of now and at most
//!   [`HoldConfig::release_late_max_ms`] behind it;
//! * at most [`HoldConfig::partial_max`] holds are being assembled at once: a part that would
//!   start another one makes room by dropping the partial hold whose first part arrived first
//!   (counted, [`HoldAssembler::evicted_total`]; its sender retransmits, having had no
//!   acknowledgement). Refusing instead let anyone lock every new hold out by keeping the table
//!   full with first parts (security review, finding 14: about 17 parts/s at the defaults);
//!   now a flood must drop a real hold between the arrival of its first and last parts, a few
//!   seconds, so it needs about `partial_max` / that gap parts per second. Only with
//!   `partial_max = 0` is a part refused ([`HoldError::TableFull`]). A partial hold is also
//!   dropped [`HoldConfig::partial_ttl_secs`] after its first part arrived.
//!
//! A refused part changes nothing. The assembler is sans-IO: it never reads a clock (every
//! call takes `now`) and keeps its state in memory only (partial holds are lost on restart;
//! the client retransmits the parts it got no acknowledgement for).
//!
//! Memory: a partial hold keeps at most [`PACKET_SIZE`] bytes of data plus one ack SURB per
//! part (4 × [`whispr_protocol::sphinx::SURB_SIZE`]), about 4 KiB, so the default bound of
//! 10,000 partial holds is about 40 MiB.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use whispr_protocol::payload::{HOLD_PARTS_MAX, HeldPacketPart};
use whispr_protocol::sphinx::{PACKET_SIZE, Packet, Surb};
use whispr_protocol::{HoldId, NodeId, UnixTime};

const DAY_MS: u64 = 24 * 3600 * 1000;

/// `[holds]`: limits on held packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HoldConfig {
    /// Most holds being assembled (some parts arrived, not all) at once; a new one drops the
    /// oldest when full. Default 10,000 (about 40 MiB at most).
    pub partial_max: usize,
    /// A partial hold is dropped this long after its first part arrived. Default 600 s.
    pub partial_ttl_secs: u64,
    /// Furthest release time accepted, in milliseconds from now. Default 1 day: a held
    /// packet is built with the Sphinx keys of its release epoch, which nodes publish
    /// `mesh.sphinx_keys_ahead` (12) hours ahead.
    pub release_ahead_max_ms: u64,
    /// A release time further in the past than this is refused (the packet's Sphinx keys have
    /// most likely expired by then). Default 1 hour (one key epoch).
    pub release_late_max_ms: u64,
    /// Most holds a timer node stores at once: held sends waiting for their release (retrying
    /// or quarantined included) and the tombstones of cancelled holds, which keep a cancelled
    /// hold's id until no part of it can be accepted any more. A hold that would go over it is
    /// refused, and so is the cancel of a hold still being assembled (its tombstone needs a
    /// place; the sender retries). The cancel of a stored hold never needs one: its tombstone
    /// takes the hold's place. Each place costs a sender two packets (two parts, or a part and
    /// a cancel) and lasts until the release time plus `release_late_max_ms`. Used by the timer
    /// node, not by the assembler. Default 1,000,000.
    pub held_max: usize,
    /// Final payloads (hold parts, cancels) from the mesh handled at once, each on a blocking
    /// thread (a synced write); more are dropped and counted (senders retransmit what is not
    /// acknowledged). Used by the timer node's mesh layer. Default 64.
    pub deliveries_in_flight_max: usize,
}

impl Default for HoldConfig {
    fn default() -> Self {
        HoldConfig {
            partial_max: 10_000,
            partial_ttl_secs: 600,
            release_ahead_max_ms: DAY_MS,
            release_late_max_ms: 3600 * 1000,
            held_max: 1_000_000,
            deliveries_in_flight_max: 64,
        }
    }
}

/// Why a part of a held packet was refused. Nothing is changed by a refused part (except
/// [`HoldError::BadLength`], which drops the hold it completes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HoldError {
    /// `part_count` is 0 or above [`HOLD_PARTS_MAX`], `part_index` is not below it, or the
    /// part is longer than a packet.
    #[error("part index, count or size out of range")]
    PartOutOfRange,
    /// The part disagrees with the parts of its hold already held (`part_count`,
    /// `release_at`, `cancel_hash` or `first_hop`), or with the hold already scheduled.
    #[error("part does not agree with the rest of its hold")]
    Mismatch,
    /// A part with this index is held already.
    #[error("part {index} of this hold arrived already")]
    DuplicatePart {
        /// The part's index.
        index: u32,
    },
    /// The parts of the hold would add up to more than a packet.
    #[error("parts add up to more than a packet ({max} bytes)")]
    TooLong {
        /// [`PACKET_SIZE`].
        max: usize,
    },
    /// All parts arrived but do not make exactly one packet; the hold is dropped.
    #[error("parts add up to {len} bytes, not a packet's {expected}")]
    BadLength {
        /// Their total length.
        len: usize,
        /// [`PACKET_SIZE`].
        expected: usize,
    },
    /// [`HoldConfig::partial_max`] is 0: a hold of more than one part is refused.
    #[error("too many partial holds ({max})")]
    TableFull {
        /// The bound.
        max: usize,
    },
    /// `release_at` is further ahead than [`HoldConfig::release_ahead_max_ms`].
    #[error("release time more than {max_ms} ms ahead")]
    ReleaseTooFar {
        /// The limit.
        max_ms: u64,
    },
    /// `release_at` is further in the past than [`HoldConfig::release_late_max_ms`].
    #[error("release time more than {max_ms} ms in the past")]
    ReleaseTooLate {
        /// The limit.
        max_ms: u64,
    },
}

/// A held packet whose parts have all arrived.
#[derive(Clone, PartialEq, Eq)]
pub struct CompletedHold {
    /// Its id.
    pub hold_id: HoldId,
    /// When to inject it.
    pub release_at: UnixTime,
    /// Where to send it.
    pub first_hop: NodeId,
    /// The packet: the parts' data in `part_index` order.
    pub packet: Packet,
    /// SHA-256 of the capability that cancels it.
    pub cancel_hash: [u8; 32],
    /// The parts' ack SURBs, in `part_index` order (parts without one are skipped).
    pub ack_surbs: Vec<Surb>,
}

impl fmt::Debug for CompletedHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletedHold")
            .field("hold_id", &self.hold_id)
            .field("release_at", &self.release_at)
            .field("first_hop", &self.first_hop)
            .field("ack_surbs", &self.ack_surbs.len())
            .finish_non_exhaustive()
    }
}

/// What [`HoldAssembler::accept`] did with a part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartOutcome {
    /// The part is held; others of its hold are still missing.
    Incomplete,
    /// It was the last missing part (or the only one): the hold is complete and no longer in
    /// the assembler.
    Complete(CompletedHold),
}

/// The parts of one hold received so far.
struct Partial {
    part_count: u32,
    release_at: UnixTime,
    cancel_hash: [u8; 32],
    first_hop: NodeId,
    started_at: UnixTime,
    /// Data and ack SURB by part index.
    parts: BTreeMap<u32, (Vec<u8>, Option<Surb>)>,
    bytes: usize,
}

impl Partial {
    fn agrees_with(&self, part: &HeldPacketPart) -> bool {
        self.part_count == part.part_count
            && self.release_at == part.release_at
            && self.cancel_hash == part.cancel_hash
            && self.first_hop == part.first_hop
    }
}

/// The reassembly table of held packets. See the module documentation for the rules.
pub struct HoldAssembler {
    config: HoldConfig,
    partials: BTreeMap<HoldId, Partial>,
    /// The same holds ordered by when their first part arrived, for expiry.
    by_start: BTreeSet<(UnixTime, HoldId)>,
    /// Partial holds dropped to make room, since start.
    evicted: u64,
}

impl fmt::Debug for HoldAssembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldAssembler")
            .field("config", &self.config)
            .field("partial", &self.partials.len())
            .finish_non_exhaustive()
    }
}

/// Checks a part on its own: its numbering and size.
pub fn check_part(part: &HeldPacketPart) -> Result<(), HoldError> {
    if part.part_count == 0
        || part.part_count > HOLD_PARTS_MAX
        || part.part_index >= part.part_count
        || part.data.len() > PACKET_SIZE
    {
        return Err(HoldError::PartOutOfRange);
    }
    Ok(())
}

impl HoldAssembler {
    /// An empty table with these limits.
    pub fn new(config: HoldConfig) -> HoldAssembler {
        HoldAssembler {
            config,
            partials: BTreeMap::new(),
            by_start: BTreeSet::new(),
            evicted: 0,
        }
    }

    /// Partial holds dropped so far to make room for new ones (a counter for metrics).
    pub fn evicted_total(&self) -> u64 {
        self.evicted
    }

    /// The release time of a hold being assembled.
    pub fn release_at(&self, hold_id: &HoldId) -> Option<UnixTime> {
        self.partials.get(hold_id).map(|p| p.release_at)
    }

    /// The limits in force.
    pub fn config(&self) -> &HoldConfig {
        &self.config
    }

    /// Holds being assembled.
    pub fn len(&self) -> usize {
        self.partials.len()
    }

    /// True when no hold is being assembled.
    pub fn is_empty(&self) -> bool {
        self.partials.is_empty()
    }

    /// Whether parts of `hold_id` are held.
    pub fn contains(&self, hold_id: &HoldId) -> bool {
        self.partials.contains_key(hold_id)
    }

    /// The cancel hash of a hold being assembled.
    pub fn cancel_hash(&self, hold_id: &HoldId) -> Option<&[u8; 32]> {
        self.partials.get(hold_id).map(|p| &p.cancel_hash)
    }

    /// Drops the parts of `hold_id`; false if there were none.
    pub fn discard(&mut self, hold_id: &HoldId) -> bool {
        match self.partials.remove(hold_id) {
            Some(partial) => {
                self.by_start.remove(&(partial.started_at, *hold_id));
                true
            }
            None => false,
        }
    }

    /// Drops the partial holds whose first part arrived [`HoldConfig::partial_ttl_secs`] or
    /// more before `now`; returns how many.
    pub fn expire(&mut self, now: UnixTime) -> usize {
        let ttl_ms = self.config.partial_ttl_secs.saturating_mul(1000);
        let expired: Vec<(UnixTime, HoldId)> = self
            .by_start
            .iter()
            .take_while(|(started, _)| started.0.saturating_add(ttl_ms) <= now.0)
            .copied()
            .collect();
        for (started, id) in &expired {
            self.by_start.remove(&(*started, *id));
            self.partials.remove(id);
        }
        expired.len()
    }

    fn check_release(&self, now: UnixTime, release_at: UnixTime) -> Result<(), HoldError> {
        if release_at.0 > now.0.saturating_add(self.config.release_ahead_max_ms) {
            return Err(HoldError::ReleaseTooFar {
                max_ms: self.config.release_ahead_max_ms,
            });
        }
        if release_at.0.saturating_add(self.config.release_late_max_ms) < now.0 {
            return Err(HoldError::ReleaseTooLate {
                max_ms: self.config.release_late_max_ms,
            });
        }
        Ok(())
    }

    /// Takes one part received at `now` (partial holds that expired by `now` are dropped
    /// first). Returns [`PartOutcome::Complete`] when it was the last missing part of its
    /// hold; a refused part changes nothing (but see [`HoldError::BadLength`]).
    pub fn accept(
        &mut self,
        now: UnixTime,
        part: HeldPacketPart,
    ) -> Result<PartOutcome, HoldError> {
        self.expire(now);
        check_part(&part)?;
        self.check_release(now, part.release_at)?;
        match self.partials.get(&part.hold_id) {
            Some(partial) => {
                if !partial.agrees_with(&part) {
                    return Err(HoldError::Mismatch);
                }
                if partial.parts.contains_key(&part.part_index) {
                    return Err(HoldError::DuplicatePart {
                        index: part.part_index,
                    });
                }
                if partial.bytes.saturating_add(part.data.len()) > PACKET_SIZE {
                    return Err(HoldError::TooLong { max: PACKET_SIZE });
                }
            }
            None if part.part_count == 1 => {
                // A hold in one part needs no room in the table.
                return complete(
                    part.hold_id,
                    part.release_at,
                    part.first_hop,
                    part.cancel_hash,
                    vec![(part.data, part.ack_surb)],
                )
                .map(PartOutcome::Complete);
            }
            None if self.config.partial_max == 0 => {
                return Err(HoldError::TableFull { max: 0 });
            }
            None => {
                // Full: the oldest partial hold makes room.
                while self.partials.len() >= self.config.partial_max {
                    let Some((_, oldest)) = self.by_start.pop_first() else {
                        break;
                    };
                    self.partials.remove(&oldest);
                    self.evicted = self.evicted.saturating_add(1);
                }
            }
        }
        // The part is accepted from here on.
        let hold_id = part.hold_id;
        let partial = self.partials.entry(hold_id).or_insert_with(|| {
            self.by_start.insert((now, hold_id));
            Partial {
                part_count: part.part_count,
                release_at: part.release_at,
                cancel_hash: part.cancel_hash,
                first_hop: part.first_hop,
                started_at: now,
                parts: BTreeMap::new(),
                bytes: 0,
            }
        });
        partial.bytes = partial.bytes.saturating_add(part.data.len());
        partial
            .parts
            .insert(part.part_index, (part.data, part.ack_surb));
        let held = u32::try_from(partial.parts.len()).unwrap_or(u32::MAX);
        if held < partial.part_count {
            return Ok(PartOutcome::Incomplete);
        }
        let Some(partial) = self.partials.remove(&hold_id) else {
            return Ok(PartOutcome::Incomplete);
        };
        self.by_start.remove(&(partial.started_at, hold_id));
        complete(
            hold_id,
            partial.release_at,
            partial.first_hop,
            partial.cancel_hash,
            partial.parts.into_values().collect(),
        )
        .map(PartOutcome::Complete)
    }
}

/// Joins the parts (in index order) into the completed hold.
fn complete(
    hold_id: HoldId,
    release_at: UnixTime,
    first_hop: NodeId,
    cancel_hash: [u8; 32],
    parts: Vec<(Vec<u8>, Option<Surb>)>,
) -> Result<CompletedHold, HoldError> {
    let len = parts
        .iter()
        .map(|(data, _)| data.len())
        .fold(0usize, usize::saturating_add);
    if len != PACKET_SIZE {
        return Err(HoldError::BadLength {
            len,
            expected: PACKET_SIZE,
        });
    }
    let mut bytes = Vec::with_capacity(PACKET_SIZE);
    let mut ack_surbs = Vec::new();
    for (data, surb) in parts {
        bytes.extend_from_slice(&data);
        ack_surbs.extend(surb);
    }
    let packet = Packet::from_bytes(&bytes).map_err(|_| HoldError::BadLength {
        len,
        expected: PACKET_SIZE,
    })?;
    Ok(CompletedHold {
        hold_id,
        release_at,
        first_hop,
        packet,
        cancel_hash,
        ack_surbs,
    })
}
