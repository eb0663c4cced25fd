//! Mailbox replication in the core (`docs/replication.md`), sans-IO like the rest of it:
//! inputs are [`MailboxCore::handle_replica`] (a message from a peer replica) and
//! [`MailboxCore::tick`] (receipt timeouts, anti-entropy rounds, at
//! [`MailboxCore::replica_timeout`]); outputs are [`Output::Replica`] for the driver to send.
//!
//! - A deposit into a replicated mailbox is stored (synced) here, pushed to every peer, and
//!   its receipt held until `write_quorum − 1` peers acknowledged the push (or dropped after
//!   `replica_ack_timeout_ms`: the sender retransmits, and dedup stores nothing twice).
//! - Messages are named by their id (the dedup id) across replicas; the owner's acks travel
//!   as ids, every replica records per message which devices acknowledged it, and deletes it
//!   once all have. A deleted message's dedup entry stays until its expiry: a tombstone,
//!   "gone" in anti-entropy, never stored again.
//! - Anti-entropy: every round, to each peer, a summary of the mailboxes both hold in 256
//!   buckets (by mailbox id); for a differing bucket, the digests of its mailboxes (a digest
//!   per mailbox of its (id, live or gone) entries, cached until the mailbox changes or an
//!   entry expires); for a differing digest, the id lists; then pulls of what is missing and
//!   tombstones of what is gone. Record repair: a replica
//!   that does not know a mailbox a peer names asks for the owner-signed records and
//!   verifies them before recreating.
//!
//! Peers are trusted only for the mailboxes whose owner-signed replica set names them and
//! this node. Nothing here logs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::ControlFlow;

use sha2::{Digest, Sha256};
use whispr_protocol::payload::Reply;
use whispr_protocol::replica::{
    DeviceRegistration, DigestEntry, IDS_MAX, IdEntry, ItemId, MAILBOXES_MAX, MessageKind,
    PUSH_ITEMS_MAX, PushItem, RECORDS_MAX, REPLICA_MESSAGE_MAX, RecordCopy, ReplicaMessage,
    SUMMARY_BUCKETS, SignedCreate,
};
use whispr_protocol::sphinx::Surb;
use whispr_protocol::{DedupId, MailboxId, NodeId, UnixTime};

use super::{
    CreateMailbox, KIND_ENVELOPE, KIND_SURB_REPLY, MailboxCore, MessageBody, MessageInfo, Output,
    TAG_ACKS, TAG_ERASED, TAG_SEQ_FLOOR, bucket_of, dedup_key, envelope_key, expiry_key,
    key_tag_bytes, key2, sid_end, u64_at,
};
use crate::crypto::StorageId;
use crate::error::{MailboxError, Result};
use crate::store::{Cf, MailboxStore, Op};

/// Most SURBs held per message (retransmissions of one deposit waiting together).
const SURBS_PER_HELD_MAX: usize = 4;
/// A cached mailbox digest is recomputed after this many repair intervals even if nothing
/// seems to have changed (a safety net: the cache is keyed by the mailbox's sequence counter
/// and message count, which every write changes).
const DIGEST_MAX_AGE_ROUNDS: u64 = 10;

/// Replication counters (no ids).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Deposit receipts held waiting for peers.
    pub receipts_held: u64,
    /// Held receipts released (write quorum reached).
    pub receipts_released: u64,
    /// Held receipts dropped because too few peers acknowledged in time.
    pub receipts_timed_out: u64,
    /// Receipts dropped because the held table was full.
    pub receipts_dropped: u64,
    /// Messages pushed to peers (one per peer).
    pub pushed: u64,
    /// Messages stored from peers' pushes.
    pub stored_from_peers: u64,
    /// Pushed messages or whole replica messages refused (not a replica of the mailbox,
    /// expired, tombstoned, malformed, over quota).
    pub refused: u64,
    /// Device acknowledgements applied from peers.
    pub acks_applied: u64,
    /// Messages deleted or tombstones written because a peer had them gone.
    pub tombstones_applied: u64,
    /// Messages asked from peers by anti-entropy.
    pub pulled: u64,
    /// Anti-entropy summaries sent (one per peer per round).
    pub summaries_sent: u64,
    /// Summaries received from peers.
    pub summaries_received: u64,
    /// Summaries received that differed from ours in at least one bucket (each answered by
    /// digests): a share that stays high means a replica lags.
    pub summaries_differing: u64,
    /// Summary buckets that differed from ours.
    pub bucket_mismatches: u64,
    /// Mailbox digests computed (cache misses: a scan of the mailbox's ids).
    pub digests_computed: u64,
    /// Digests sent.
    pub digests_sent: u64,
    /// Digests that differed from ours.
    pub digest_mismatches: u64,
    /// Mailbox records recreated from peers (owner signatures verified).
    pub records_repaired: u64,
    /// Records refused (bad signature, not naming this node or the sender).
    pub records_refused: u64,
    /// Mailboxes erased because a peer erased them.
    pub erased_by_peer: u64,
}

struct Held {
    reply: Reply,
    surbs: Vec<Surb>,
    acked_by: BTreeSet<NodeId>,
    needed: usize,
    deadline: u64,
}

/// A mailbox's anti-entropy digest as computed, valid while the mailbox's sequence counter
/// and message count are unchanged and before `valid_until`.
struct CachedDigest {
    next_seq: u64,
    live: usize,
    valid_until: u64,
    digest: [u8; 32],
    /// SHA-256(mailbox id ‖ digest): what the mailbox adds (XOR) to its summary bucket.
    leaf: [u8; 32],
}

/// The core's replication state (in memory; receipts held are lost at a restart, which the
/// sender's retransmission covers).
pub(super) struct ReplicaState {
    held: BTreeMap<(StorageId, ItemId), Held>,
    deadlines: BTreeSet<(u64, StorageId, ItemId)>,
    next_repair_at: u64,
    /// One entry per replicated mailbox at most (pruned every round).
    digests: BTreeMap<StorageId, CachedDigest>,
    erased: BTreeSet<StorageId>,
    erased_order: VecDeque<StorageId>,
    /// The number of the last erasure marker written (orders them across restarts).
    erased_seq: u64,
    stats: ReplicaStats,
    /// Peer → the mailboxes here it replicates (by storage id), for [`MailboxCore::shared_with`]
    /// (one call per summary received: without it, every call scanned every mailbox).
    shared: SharedIndex,
}

/// Which mailboxes each peer shares with this node, derived from the mailboxes' records
/// (their replica lists never change once created). Kept valid without hooks in every path
/// that adds a mailbox: a mailbox leaves only through an erasure, which calls
/// [`MailboxCore::forget_digest`] (that takes it out here), and one is added only with a new
/// storage id, which makes the core's count differ from `indexed`: the index is then built
/// again from the mailboxes (once, not once per summary).
#[derive(Default)]
struct SharedIndex {
    /// Every mailbox accounted for (replicated or not).
    indexed: BTreeSet<StorageId>,
    by_peer: BTreeMap<[u8; 32], BTreeSet<StorageId>>,
}

impl ReplicaState {
    pub(super) fn new(now: UnixTime) -> ReplicaState {
        ReplicaState {
            held: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_repair_at: now.0,
            digests: BTreeMap::new(),
            erased: BTreeSet::new(),
            erased_order: VecDeque::new(),
            erased_seq: 0,
            stats: ReplicaStats::default(),
            shared: SharedIndex::default(),
        }
    }
}

/// A mailbox's (live, gone) ids not expired at `now`, and their digest.
struct IdLists {
    live: Vec<IdEntry>,
    gone: Vec<IdEntry>,
    digest: [u8; 32],
    /// The earliest expiry among the ids (`u64::MAX` if none): the digest changes then.
    valid_until: u64,
}

/// A node's summary buckets for one peer, and the digests of their mailboxes by bucket.
type SharedSummary = (Vec<[u8; 32]>, Vec<Vec<DigestEntry>>);

fn xor_into(acc: &mut [u8; 32], leaf: &[u8; 32]) {
    for (a, l) in acc.iter_mut().zip(leaf) {
        *a ^= l;
    }
}

fn bucket_index(mailbox_id: &[u8; 32]) -> usize {
    usize::from(mailbox_id[0])
}

fn body_bytes(body: MessageBody) -> (MessageKind, Vec<u8>) {
    match body {
        MessageBody::Envelope(b) => (MessageKind::Envelope, b),
        MessageBody::SurbReply { surb_id, payload } => {
            let mut b = surb_id.as_bytes().to_vec();
            b.extend_from_slice(&payload);
            (MessageKind::SurbReply, b)
        }
    }
}

/// At most `max` entries of `list`, starting at a random point and wrapping around, so that
/// successive rounds cover a list longer than one message holds.
fn rotated<T: Copy>(list: &[T], start: usize, max: usize) -> Vec<T> {
    if list.len() <= max {
        return list.to_vec();
    }
    let start = start % list.len();
    list.iter().cycle().skip(start).take(max).copied().collect()
}

impl<S: MailboxStore, R: rand::CryptoRng> MailboxCore<S, R> {
    fn own_id(&self) -> Option<NodeId> {
        self.config.node_id.map(NodeId)
    }

    /// The other replicas of a mailbox (empty for a mailbox on this node only).
    pub(super) fn peers_of(&self, m: &super::Mailbox) -> Vec<NodeId> {
        let own = self.config.node_id;
        m.record
            .replicas
            .iter()
            .filter(|r| Some(**r) != own)
            .map(|r| NodeId(*r))
            .collect()
    }

    /// True when `from` is a replica of `m` and so is this node.
    fn shares(&self, m: &super::Mailbox, from: &NodeId) -> bool {
        let Some(own) = self.config.node_id else {
            return false;
        };
        from.0 != own && m.record.replicas.contains(&from.0) && m.record.replicas.contains(&own)
    }

    /// Counters.
    pub fn replica_stats(&self) -> ReplicaStats {
        self.replica.stats
    }

    /// Receipts currently held.
    pub fn receipts_held(&self) -> usize {
        self.replica.held.len()
    }

    /// When to call [`Self::tick`] next: the first held receipt's deadline or the next
    /// anti-entropy round.
    pub fn replica_timeout(&self) -> Option<UnixTime> {
        let held = self.replica.deadlines.first().map(|(at, _, _)| *at);
        let repair = self.config.node_id.map(|_| self.replica.next_repair_at);
        match (held, repair) {
            (Some(a), Some(b)) => Some(UnixTime(a.min(b))),
            (a, b) => a.or(b).map(UnixTime),
        }
    }

    /// Creates a replicated mailbox: `request.signature` is over the v2 transcript naming
    /// `replicas`, which must name this node.
    pub fn create_replicated(
        &mut self,
        now: UnixTime,
        request: CreateMailbox,
        replicas: Vec<NodeId>,
    ) -> Result<()> {
        let own = self.own_id().ok_or(MailboxError::InvalidArgument(
            "this node has no node id (not in a mesh): replicated mailboxes are refused",
        ))?;
        if !replicas.contains(&own) {
            return Err(MailboxError::InvalidArgument(
                "the replica set does not name this node",
            ));
        }
        let distinct: BTreeSet<&NodeId> = replicas.iter().collect();
        if distinct.len() != replicas.len() {
            return Err(MailboxError::InvalidArgument("a replica is named twice"));
        }
        let sid = self.master.storage_id(&request.mailbox_id);
        self.create_inner(now, request, replicas, false)?;
        // The owner created it again on purpose.
        self.replica.erased.remove(&sid);
        Ok(())
    }

    /// Remembers (durably, one synced write) that replicated mailbox `sid` was erased here,
    /// forgetting the oldest past `replica_erased_max`. Called after the erasure's writes,
    /// which delete the mailbox's whole key range.
    pub(super) fn remember_erased(&mut self, sid: StorageId) -> Result<()> {
        let max = self.config.replica_erased_max;
        if max == 0 {
            return Ok(());
        }
        let mut ops = Vec::new();
        if self.replica.erased.insert(sid) {
            self.replica.erased_order.push_back(sid);
        }
        self.replica.erased_seq = self.replica.erased_seq.saturating_add(1);
        ops.push(Op::Put {
            cf: Cf::Mailboxes,
            key: key2(&sid, TAG_ERASED),
            value: self.replica.erased_seq.to_be_bytes().to_vec(),
        });
        while self.replica.erased_order.len() > max {
            if let Some(old) = self.replica.erased_order.pop_front() {
                self.replica.erased.remove(&old);
                ops.push(Op::Delete {
                    cf: Cf::Mailboxes,
                    key: key2(&old, TAG_ERASED),
                });
            }
        }
        self.store.write(ops, true)?;
        Ok(())
    }

    /// At open: the erasure markers found, in erasure order (the newest
    /// `replica_erased_max` kept, older markers deleted).
    pub(super) fn load_erased(&mut self, markers: Vec<(u64, StorageId)>) -> Result<()> {
        let max = self.config.replica_erased_max;
        let excess = markers.len().saturating_sub(max);
        let mut ops = Vec::new();
        for (i, (n, sid)) in markers.into_iter().enumerate() {
            self.replica.erased_seq = self.replica.erased_seq.max(n);
            if i < excess {
                ops.push(Op::Delete {
                    cf: Cf::Mailboxes,
                    key: key2(&sid, TAG_ERASED),
                });
            } else if self.replica.erased.insert(sid) {
                self.replica.erased_order.push_back(sid);
            }
        }
        if !ops.is_empty() {
            self.store.write(ops, true)?;
        }
        Ok(())
    }

    fn send(&mut self, peer: NodeId, message: ReplicaMessage) {
        self.outputs.push_back(Output::Replica { peer, message });
    }

    /// Tells the peers that `device` acknowledged `ids`.
    pub(super) fn announce_acked(&mut self, sid: &StorageId, device: [u8; 32], ids: Vec<ItemId>) {
        let Some(m) = self.mailboxes.get(sid) else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let mailbox_id = MailboxId(m.record.mailbox_id);
        for peer in self.peers_of(m) {
            for chunk in ids.chunks(IDS_MAX) {
                self.send(
                    peer,
                    ReplicaMessage::Acked {
                        mailbox_id,
                        device,
                        ids: chunk.to_vec(),
                    },
                );
            }
        }
    }

    fn record_copy(m: &super::Mailbox) -> Option<RecordCopy> {
        let signature = <[u8; 64]>::try_from(m.record.create_signature.as_slice()).ok()?;
        let devices = m
            .record
            .device_signatures
            .iter()
            .filter(|(d, _)| m.has_device(d))
            .filter_map(|(d, s)| {
                Some(DeviceRegistration {
                    device_key: *d,
                    signature: <[u8; 64]>::try_from(s.as_slice()).ok()?,
                })
            })
            .take(whispr_protocol::replica::DEVICES_MAX)
            .collect();
        Some(RecordCopy {
            create: SignedCreate {
                mailbox_id: MailboxId(m.record.mailbox_id),
                mailbox_key: m.record.mailbox_key,
                owner_key: m.record.owner_key,
                access_key_hash: m.record.access_key_hash,
                reply_key: m.record.reply_key,
                retention_ms: m.record.retention_ms,
                replicas: m.record.replicas.iter().map(|r| NodeId(*r)).collect(),
                signature,
            },
            devices,
        })
    }

    /// Sends the mailbox's signed record to its peers (after a device registration).
    pub(super) fn announce_record(&mut self, sid: &StorageId) {
        let Some(m) = self.mailboxes.get(sid) else {
            return;
        };
        let Some(copy) = Self::record_copy(m) else {
            return;
        };
        for peer in self.peers_of(m) {
            self.send(
                peer,
                ReplicaMessage::Records {
                    records: vec![copy.clone()],
                },
            );
        }
    }

    /// The stored message `seq` as a push item, if it is still stored.
    pub(super) fn push_item_of(&self, sid: &StorageId, seq: u64) -> Result<Option<PushItem>> {
        let Some(m) = self.mailboxes.get(sid) else {
            return Ok(None);
        };
        let Some(info) = m.messages.get(&seq) else {
            return Ok(None);
        };
        let (id, expires_at) = (info.id, info.expires_at);
        let Some(message) = self.read_message(m, seq)? else {
            return Ok(None);
        };
        let (kind, body) = body_bytes(message.body);
        Ok(Some(PushItem {
            id,
            kind,
            expires_at: UnixTime(expires_at),
            body,
        }))
    }

    fn push_chunks(mailbox_id: MailboxId, items: Vec<PushItem>) -> Vec<ReplicaMessage> {
        let mut out = Vec::new();
        let mut chunk: Vec<PushItem> = Vec::new();
        let mut size = 64;
        for item in items {
            let len = item.encoded_len();
            if !chunk.is_empty()
                && (chunk.len() >= PUSH_ITEMS_MAX || size + len > REPLICA_MESSAGE_MAX)
            {
                out.push(ReplicaMessage::Push {
                    mailbox_id,
                    items: std::mem::take(&mut chunk),
                });
                size = 64;
            }
            size += len;
            chunk.push(item);
        }
        if !chunk.is_empty() {
            out.push(ReplicaMessage::Push {
                mailbox_id,
                items: chunk,
            });
        }
        out
    }

    /// Pushes `items` of mailbox `sid` to every peer.
    pub(super) fn push_to_peers(&mut self, sid: &StorageId, items: Vec<PushItem>) {
        let Some(m) = self.mailboxes.get(sid) else {
            return;
        };
        let mailbox_id = MailboxId(m.record.mailbox_id);
        let peers = self.peers_of(m);
        let count = items.len() as u64;
        let messages = Self::push_chunks(mailbox_id, items);
        for peer in peers {
            self.replica.stats.pushed = self.replica.stats.pushed.saturating_add(count);
            for message in &messages {
                self.send(peer, message.clone());
            }
        }
    }

    /// Holds a deposit receipt until the write quorum is reached (or releases it now when
    /// the mailbox has no peer to wait for).
    pub(super) fn hold_receipt(
        &mut self,
        now: UnixTime,
        sid: StorageId,
        id: ItemId,
        surb: Surb,
        reply: Reply,
    ) {
        let peers = self
            .mailboxes
            .get(&sid)
            .map_or(0, |m| self.peers_of(m).len());
        let needed = self.config.write_quorum.saturating_sub(1).min(peers);
        if needed == 0 {
            self.outputs.push_back(Output::Reply { surb, reply });
            return;
        }
        let deadline = now.0.saturating_add(self.config.replica_ack_timeout_ms);
        let state = &mut self.replica;
        if let Some(held) = state.held.get_mut(&(sid, id)) {
            // A retransmission: it waits again, with the new SURB.
            if held.surbs.len() >= SURBS_PER_HELD_MAX {
                held.surbs.remove(0);
            }
            held.surbs.push(surb);
            state.deadlines.remove(&(held.deadline, sid, id));
            held.deadline = deadline;
            state.deadlines.insert((deadline, sid, id));
            state.stats.receipts_held = state.stats.receipts_held.saturating_add(1);
            return;
        }
        if state.held.len() >= self.config.replica_held_max {
            state.stats.receipts_dropped = state.stats.receipts_dropped.saturating_add(1);
            return;
        }
        state.held.insert(
            (sid, id),
            Held {
                reply,
                surbs: vec![surb],
                acked_by: BTreeSet::new(),
                needed,
                deadline,
            },
        );
        state.deadlines.insert((deadline, sid, id));
        state.stats.receipts_held = state.stats.receipts_held.saturating_add(1);
    }

    /// Drops held receipts past their deadline and runs an anti-entropy round when due.
    pub fn tick(&mut self, now: UnixTime) -> Result<()> {
        while let Some((at, sid, id)) = self.replica.deadlines.first().copied() {
            if at > now.0 {
                break;
            }
            self.replica.deadlines.remove(&(at, sid, id));
            if let Some(held) = self.replica.held.remove(&(sid, id)) {
                let n = held.surbs.len() as u64;
                self.replica.stats.receipts_timed_out =
                    self.replica.stats.receipts_timed_out.saturating_add(n);
            }
        }
        if self.config.node_id.is_some() && now.0 >= self.replica.next_repair_at {
            self.replica.next_repair_at = now
                .0
                .saturating_add(self.config.replica_repair_interval_ms.max(1));
            self.repair_round(now)?;
        }
        Ok(())
    }

    /// The digest of a replicated mailbox (cached) and its summary leaf; `None` if the
    /// mailbox is not here.
    fn digest_of(
        &mut self,
        now: UnixTime,
        sid: &StorageId,
    ) -> Result<Option<([u8; 32], [u8; 32])>> {
        let Some(m) = self.mailboxes.get(sid) else {
            return Ok(None);
        };
        let (next_seq, live) = (m.next_seq, m.messages.len());
        if let Some(c) = self.replica.digests.get(sid)
            && c.next_seq == next_seq
            && c.live == live
            && now.0 < c.valid_until
        {
            return Ok(Some((c.digest, c.leaf)));
        }
        let mailbox_id = m.record.mailbox_id;
        let lists = self.id_lists(now, sid)?;
        self.replica.stats.digests_computed = self.replica.stats.digests_computed.saturating_add(1);
        let mut leaf = Sha256::new();
        leaf.update(mailbox_id);
        leaf.update(lists.digest);
        let leaf: [u8; 32] = leaf.finalize().into();
        let max_age = self
            .config
            .replica_repair_interval_ms
            .max(1)
            .saturating_mul(DIGEST_MAX_AGE_ROUNDS);
        self.replica.digests.insert(
            *sid,
            CachedDigest {
                next_seq,
                live,
                valid_until: lists.valid_until.min(now.0.saturating_add(max_age)),
                digest: lists.digest,
                leaf,
            },
        );
        Ok(Some((lists.digest, leaf)))
    }

    /// Drops the cached digest of an erased mailbox.
    pub(super) fn forget_digest(&mut self, sid: &StorageId) {
        self.replica.digests.remove(sid);
        let shared = &mut self.replica.shared;
        if shared.indexed.remove(sid) {
            shared.by_peer.retain(|_, sids| {
                sids.remove(sid);
                !sids.is_empty()
            });
        }
    }

    /// The replicated mailboxes here: (storage id, mailbox id, peers).
    fn replicated(&self) -> Vec<(StorageId, [u8; 32], Vec<NodeId>)> {
        self.mailboxes
            .values()
            .filter(|m| !m.record.replicas.is_empty())
            .map(|m| (m.sid, m.record.mailbox_id, self.peers_of(m)))
            .collect()
    }

    /// Sends every peer the summary of the mailboxes it shares with this node.
    fn repair_round(&mut self, now: UnixTime) -> Result<()> {
        let replicated = self.replicated();
        let known: BTreeSet<StorageId> = replicated.iter().map(|(sid, _, _)| *sid).collect();
        self.replica.digests.retain(|sid, _| known.contains(sid));
        let mut per_peer: BTreeMap<NodeId, Vec<[u8; 32]>> = BTreeMap::new();
        for (sid, mailbox_id, peers) in replicated {
            let Some((_, leaf)) = self.digest_of(now, &sid)? else {
                continue;
            };
            for peer in peers {
                let buckets = per_peer
                    .entry(peer)
                    .or_insert_with(|| vec![[0; 32]; SUMMARY_BUCKETS]);
                if let Some(b) = buckets.get_mut(bucket_index(&mailbox_id)) {
                    xor_into(b, &leaf);
                }
            }
        }
        for (peer, buckets) in per_peer {
            self.replica.stats.summaries_sent = self.replica.stats.summaries_sent.saturating_add(1);
            self.send(peer, ReplicaMessage::Summary { buckets });
        }
        Ok(())
    }

    /// This node's summary buckets for `peer`, and the digests of the shared mailboxes by
    /// bucket.
    fn shared_with(&mut self, now: UnixTime, peer: &NodeId) -> Result<SharedSummary> {
        let mut buckets = vec![[0u8; 32]; SUMMARY_BUCKETS];
        let mut entries: Vec<Vec<DigestEntry>> = vec![Vec::new(); SUMMARY_BUCKETS];
        // The mailboxes `peer` replicates with this node (what `replicated` lists with `peer`
        // among its peers), from the index (see [`SharedIndex`]): a node answers one summary
        // per peer and round, so a scan of every mailbox here ran peers × mailboxes times per
        // round.
        if self.config.node_id == Some(peer.0) {
            return Ok((buckets, entries));
        }
        if self.replica.shared.indexed.len() != self.mailboxes.len() {
            let mut index = SharedIndex::default();
            for m in self.mailboxes.values() {
                index.indexed.insert(m.sid);
                for r in &m.record.replicas {
                    if self.config.node_id != Some(*r) {
                        index.by_peer.entry(*r).or_default().insert(m.sid);
                    }
                }
            }
            self.replica.shared = index;
        }
        // Storage-id order, as the scan of `mailboxes` gave.
        let shared: Vec<(StorageId, [u8; 32])> = self
            .replica
            .shared
            .by_peer
            .get(&peer.0)
            .into_iter()
            .flatten()
            .filter_map(|sid| self.mailboxes.get(sid))
            .map(|m| (m.sid, m.record.mailbox_id))
            .collect();
        for (sid, mailbox_id) in shared {
            let Some((digest, leaf)) = self.digest_of(now, &sid)? else {
                continue;
            };
            let i = bucket_index(&mailbox_id);
            if let (Some(b), Some(e)) = (buckets.get_mut(i), entries.get_mut(i)) {
                xor_into(b, &leaf);
                e.push(DigestEntry {
                    mailbox_id: MailboxId(mailbox_id),
                    digest,
                });
            }
        }
        Ok((buckets, entries))
    }

    /// The digest entries of `buckets` (in that order) within the per-answer budget; the
    /// buckets covered are those whose entries were all taken.
    fn entries_of(
        &self,
        buckets: &[u8],
        by_bucket: &mut [Vec<DigestEntry>],
    ) -> (Vec<u8>, Vec<DigestEntry>) {
        let budget = self.config.replica_repair_mailboxes.max(1);
        let mut covered = Vec::new();
        let mut out: Vec<DigestEntry> = Vec::new();
        for &b in buckets {
            let Some(e) = by_bucket.get_mut(usize::from(b)) else {
                continue;
            };
            if !out.is_empty() && out.len().saturating_add(e.len()) > budget {
                break;
            }
            out.append(e);
            covered.push(b);
        }
        (covered, out)
    }

    fn send_digests(&mut self, to: NodeId, entries: Vec<DigestEntry>, reply: bool) {
        for chunk in entries.chunks(MAILBOXES_MAX) {
            self.replica.stats.digests_sent = self
                .replica
                .stats
                .digests_sent
                .saturating_add(chunk.len() as u64);
            let entries = chunk.to_vec();
            self.send(
                to,
                if reply {
                    ReplicaMessage::DigestReply { entries }
                } else {
                    ReplicaMessage::Digest { entries }
                },
            );
        }
    }

    /// A peer's summary: for the buckets that differ (from a random one on, within
    /// `replica_repair_mailboxes`), send our digests and ask for theirs.
    fn on_summary(&mut self, now: UnixTime, from: NodeId, theirs: &[[u8; 32]]) -> Result<()> {
        let (ours, mut by_bucket) = self.shared_with(now, &from)?;
        let differing: Vec<u8> = (0..SUMMARY_BUCKETS)
            .filter(|&i| ours.get(i) != theirs.get(i))
            .filter_map(|i| u8::try_from(i).ok())
            .collect();
        self.replica.stats.summaries_received =
            self.replica.stats.summaries_received.saturating_add(1);
        if differing.is_empty() {
            return Ok(());
        }
        self.replica.stats.summaries_differing =
            self.replica.stats.summaries_differing.saturating_add(1);
        self.replica.stats.bucket_mismatches = self
            .replica
            .stats
            .bucket_mismatches
            .saturating_add(differing.len() as u64);
        let start = usize::try_from(self.rng.next_u32()).unwrap_or(0) % differing.len();
        let order = rotated(&differing, start, differing.len());
        let (covered, entries) = self.entries_of(&order, &mut by_bucket);
        self.send_digests(from, entries, false);
        self.send(from, ReplicaMessage::DigestRequest { buckets: covered });
        Ok(())
    }

    /// A peer asks for our digests of the shared mailboxes in `buckets`.
    fn on_digest_request(&mut self, now: UnixTime, from: NodeId, buckets: &[u8]) -> Result<()> {
        let (_, mut by_bucket) = self.shared_with(now, &from)?;
        let (_, entries) = self.entries_of(buckets, &mut by_bucket);
        self.send_digests(from, entries, true);
        Ok(())
    }

    /// A peer's digests we asked for: look only for mailboxes we do not hold.
    fn on_digest_reply(&mut self, from: NodeId, entries: &[DigestEntry]) {
        let mut unknown = Vec::new();
        for entry in entries {
            let sid = self.master.storage_id(&entry.mailbox_id);
            if self.mailboxes.contains_key(&sid) {
                continue;
            }
            if self.replica.erased.contains(&sid) {
                self.send(
                    from,
                    ReplicaMessage::Erase {
                        mailbox_id: entry.mailbox_id,
                    },
                );
            } else {
                unknown.push(entry.mailbox_id);
            }
        }
        for chunk in unknown.chunks(MAILBOXES_MAX) {
            self.send(
                from,
                ReplicaMessage::RecordRequest {
                    mailbox_ids: chunk.to_vec(),
                },
            );
        }
    }

    /// The mailbox's live and gone ids not expired at `now` (a bounded prefix scan of its
    /// dedup range), sorted by id, and their digest.
    fn id_lists(&self, now: UnixTime, sid: &StorageId) -> Result<IdLists> {
        let mut entries: Vec<(ItemId, u64, u64)> = Vec::new();
        self.store
            .scan(Cf::Dedup, sid, &sid_end(sid), &mut |k, v| {
                if let (Some(id), Some(seq), Some(exp)) = (
                    k.get(super::SID_LEN..)
                        .and_then(|b| <[u8; 16]>::try_from(b).ok()),
                    u64_at(v, 0),
                    u64_at(v, 8),
                ) && k.get(..super::SID_LEN) == Some(sid.as_slice())
                    && exp > now.0
                {
                    entries.push((id, seq, exp));
                }
                ControlFlow::Continue(())
            })?;
        let m = self.mailboxes.get(sid);
        let mut hash = Sha256::new();
        let mut lists = IdLists {
            live: Vec::new(),
            gone: Vec::new(),
            digest: [0; 32],
            valid_until: u64::MAX,
        };
        for (id, seq, exp) in entries {
            lists.valid_until = lists.valid_until.min(exp);
            let live = m
                .and_then(|m| m.messages.get(&seq))
                .is_some_and(|i| i.expires_at == exp && i.id == id);
            hash.update(id);
            hash.update([u8::from(live)]);
            let e = IdEntry {
                id,
                expires_at: UnixTime(exp),
            };
            if live {
                lists.live.push(e);
            } else {
                lists.gone.push(e);
            }
        }
        lists.digest = hash.finalize().into();
        Ok(lists)
    }

    /// The sequence number of message `id` in mailbox `sid`, if its dedup entry exists, and
    /// whether the message is still stored.
    fn lookup(&self, sid: &StorageId, id: &ItemId) -> Result<Option<(u64, bool)>> {
        let Some(v) = self.store.get(Cf::Dedup, &dedup_key(sid, &DedupId(*id)))? else {
            return Ok(None);
        };
        let seq = u64_at(&v, 0).ok_or(MailboxError::Corrupt("dedup entry"))?;
        let exp = u64_at(&v, 8).ok_or(MailboxError::Corrupt("dedup entry"))?;
        let live = self
            .mailboxes
            .get(sid)
            .and_then(|m| m.messages.get(&seq))
            .is_some_and(|i| i.expires_at == exp);
        Ok(Some((seq, live)))
    }

    fn refused(&mut self, n: u64) {
        self.replica.stats.refused = self.replica.stats.refused.saturating_add(n);
    }

    /// Handles a message from the peer replica `from` (its identity authenticated by the
    /// mesh). Errors are the node's own (storage); what a peer gets wrong is refused and
    /// counted in [`ReplicaStats::refused`].
    pub fn handle_replica(
        &mut self,
        now: UnixTime,
        from: NodeId,
        message: ReplicaMessage,
    ) -> Result<()> {
        self.check_writable()?;
        if self.config.node_id.is_none() {
            self.refused(1);
            return Ok(());
        }
        match message {
            ReplicaMessage::Push { mailbox_id, items } => {
                self.on_push(now, from, mailbox_id, items)
            }
            ReplicaMessage::PushAck { mailbox_id, ids } => {
                self.on_push_ack(from, mailbox_id, &ids);
                Ok(())
            }
            ReplicaMessage::Acked {
                mailbox_id,
                device,
                ids,
            } => self.on_acked(from, mailbox_id, device, &ids),
            ReplicaMessage::Digest { entries } => self.on_digest(now, from, entries),
            ReplicaMessage::Summary { buckets } => self.on_summary(now, from, &buckets),
            ReplicaMessage::DigestRequest { buckets } => {
                self.on_digest_request(now, from, &buckets)
            }
            ReplicaMessage::DigestReply { entries } => {
                self.on_digest_reply(from, &entries);
                Ok(())
            }
            ReplicaMessage::Ids {
                mailbox_id,
                answer,
                live,
                gone,
            } => self.on_ids(now, from, mailbox_id, answer, &live, &gone),
            ReplicaMessage::Pull { mailbox_id, ids } => self.on_pull(from, mailbox_id, &ids),
            ReplicaMessage::RecordRequest { mailbox_ids } => {
                self.on_record_request(from, &mailbox_ids);
                Ok(())
            }
            ReplicaMessage::Records { records } => self.on_records(now, from, records),
            ReplicaMessage::RemoveDevice { mailbox_id, device } => {
                let sid = self.master.storage_id(&mailbox_id);
                match self.mailboxes.get(&sid) {
                    Some(m) if self.shares(m, &from) => {
                        match self.remove_device_here(&mailbox_id, &device) {
                            Ok(()) => {}
                            Err(MailboxError::UnknownDevice) => {
                                // Its registration has not reached us: refuse it when it does.
                                self.remember_removed_here(&mailbox_id, &device)?;
                            }
                            Err(e) if !e.is_caller_error() => return Err(e),
                            // Already removed, never registered here, or the owner key.
                            Err(_) => self.refused(1),
                        }
                    }
                    Some(_) => self.refused(1),
                    None => {}
                }
                Ok(())
            }
            ReplicaMessage::Erase { mailbox_id } => {
                let sid = self.master.storage_id(&mailbox_id);
                match self.mailboxes.get(&sid) {
                    Some(m) if self.shares(m, &from) => {
                        self.erase_sid(&sid)?;
                        self.remember_erased(sid)?;
                        self.replica.stats.erased_by_peer =
                            self.replica.stats.erased_by_peer.saturating_add(1);
                    }
                    Some(_) => self.refused(1),
                    None => {}
                }
                Ok(())
            }
        }
    }

    /// Asks `from` for the record of a mailbox this node does not hold (unless it erased it).
    fn want_record(&mut self, from: NodeId, mailbox_id: MailboxId) {
        let sid = self.master.storage_id(&mailbox_id);
        if self.replica.erased.contains(&sid) {
            self.send(from, ReplicaMessage::Erase { mailbox_id });
        } else {
            self.send(
                from,
                ReplicaMessage::RecordRequest {
                    mailbox_ids: vec![mailbox_id],
                },
            );
        }
    }

    /// A peer checked body: the stored envelope or SURB reply of `mailbox_id` named `id`.
    fn body_ok(mailbox_id: &MailboxId, item: &PushItem) -> bool {
        match item.kind {
            MessageKind::Envelope => whispr_protocol::envelope::Envelope::decode(&item.body)
                .is_ok_and(|e| e.outer.mailbox_id == *mailbox_id && e.outer.dedup_id.0 == item.id),
            MessageKind::SurbReply => item.body.get(..16) == Some(item.id.as_slice()),
        }
    }

    fn on_push(
        &mut self,
        now: UnixTime,
        from: NodeId,
        mailbox_id: MailboxId,
        items: Vec<PushItem>,
    ) -> Result<()> {
        let sid = self.master.storage_id(&mailbox_id);
        let Some(m) = self.mailboxes.get(&sid) else {
            self.refused(items.len() as u64);
            self.want_record(from, mailbox_id);
            return Ok(());
        };
        if !self.shares(m, &from) {
            self.refused(items.len() as u64);
            return Ok(());
        }
        // Rounded up like the origin's (`expiry_granularity_ms`), so that an item within its
        // retention keeps the expiry the origin gave it.
        let cap = bucket_of(
            now.0
                .saturating_add(m.record.retention_ms.min(self.config.retention_ms_max)),
            self.config.expiry_granularity_ms,
        );
        let mut stored_ids: Vec<ItemId> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut added: Vec<(u64, MessageInfo)> = Vec::new();
        let mut refused = 0u64;
        let mut next_seq = m.next_seq;
        let mut bytes = 0u64;
        for item in items {
            if item.expires_at.0 <= now.0 || !Self::body_ok(&mailbox_id, &item) {
                refused += 1;
                continue;
            }
            if added.iter().any(|(_, i)| i.id == item.id) {
                continue;
            }
            // Stored already, or delivered and deleted (a tombstone): durable either way,
            // and never stored again.
            if self.lookup(&sid, &item.id)?.is_some() {
                stored_ids.push(item.id);
                continue;
            }
            let Some(m) = self.mailboxes.get(&sid) else {
                break;
            };
            let value_len = (8 + crate::crypto::SEAL_OVERHEAD + 9 + item.body.len()) as u64;
            if (m.messages.len() + added.len()) as u64 >= self.config.mailbox_messages_max
                || m.bytes.saturating_add(bytes).saturating_add(value_len)
                    > self.config.mailbox_bytes_max
            {
                refused += 1;
                continue;
            }
            let expires_at = item.expires_at.0.min(cap);
            let seq = next_seq;
            next_seq = next_seq.saturating_add(1);
            let ekey = envelope_key(&sid, seq);
            let mut plain = Vec::with_capacity(9 + item.body.len());
            plain.extend_from_slice(&now.0.to_be_bytes());
            plain.push(match item.kind {
                MessageKind::Envelope => KIND_ENVELOPE,
                MessageKind::SurbReply => KIND_SURB_REPLY,
            });
            plain.extend_from_slice(&item.body);
            let sealed = m.key.seal(&mut self.rng, &[b"env", &ekey], &plain);
            let value_len = super::envelope_puts(
                &mut ops,
                ekey,
                super::body_key(&m.body_prefix, seq),
                expires_at,
                &item.id,
                sealed,
                self.inline_bodies,
            );
            bytes = bytes.saturating_add(value_len);
            added.push((
                seq,
                MessageInfo {
                    value_len,
                    expires_at,
                    id: item.id,
                    acked: Vec::new(),
                },
            ));
            let mut dedup_value = seq.to_be_bytes().to_vec();
            dedup_value.extend_from_slice(&expires_at.to_be_bytes());
            ops.push(Op::Put {
                cf: Cf::Dedup,
                key: dedup_key(&sid, &DedupId(item.id)),
                value: dedup_value,
            });
            ops.push(Op::Put {
                cf: Cf::Expiry,
                key: expiry_key(expires_at, &sid, seq),
                value: item.id.to_vec(),
            });
            stored_ids.push(item.id);
        }
        self.refused(refused);
        if !ops.is_empty() {
            self.store.write(ops, true)?;
        }
        let bucket_ms = self.config.expiry_bucket_ms;
        let mut buckets = BTreeSet::new();
        if let Some(m) = self.mailboxes.get_mut(&sid) {
            m.next_seq = m.next_seq.max(next_seq);
            m.bytes = m.bytes.saturating_add(bytes);
            for (seq, info) in added.iter().cloned() {
                buckets.insert(bucket_of(info.expires_at, bucket_ms));
                m.messages.insert(seq, info);
            }
        }
        self.replica.stats.stored_from_peers = self
            .replica
            .stats
            .stored_from_peers
            .saturating_add(added.len() as u64);
        for at in buckets {
            self.want_sweep(at);
        }
        if !stored_ids.is_empty() {
            self.send(
                from,
                ReplicaMessage::PushAck {
                    mailbox_id,
                    ids: stored_ids,
                },
            );
        }
        Ok(())
    }

    fn on_push_ack(&mut self, from: NodeId, mailbox_id: MailboxId, ids: &[ItemId]) {
        let sid = self.master.storage_id(&mailbox_id);
        match self.mailboxes.get(&sid) {
            Some(m) if self.shares(m, &from) => {}
            _ => {
                self.refused(1);
                return;
            }
        }
        for id in ids {
            let done = match self.replica.held.get_mut(&(sid, *id)) {
                Some(held) => {
                    held.acked_by.insert(from);
                    held.acked_by.len() >= held.needed
                }
                None => false,
            };
            if done && let Some(held) = self.replica.held.remove(&(sid, *id)) {
                self.replica.deadlines.remove(&(held.deadline, sid, *id));
                self.replica.stats.receipts_released = self
                    .replica
                    .stats
                    .receipts_released
                    .saturating_add(held.surbs.len() as u64);
                for surb in held.surbs {
                    self.outputs.push_back(Output::Reply {
                        surb,
                        reply: held.reply.clone(),
                    });
                }
            }
        }
    }

    fn on_acked(
        &mut self,
        from: NodeId,
        mailbox_id: MailboxId,
        device: [u8; 32],
        ids: &[ItemId],
    ) -> Result<()> {
        let sid = self.master.storage_id(&mailbox_id);
        let Some(m) = self.mailboxes.get(&sid) else {
            self.want_record(from, mailbox_id);
            return Ok(());
        };
        if !self.shares(m, &from) || !m.has_device(&device) {
            // A device registered at the peer and not yet here: the record announcement
            // follows; anti-entropy deletes what every device acknowledged.
            self.refused(1);
            return Ok(());
        }
        let mut ops = Vec::new();
        let mut deleted: Vec<u64> = Vec::new();
        let mut marked: Vec<(u64, Vec<[u8; 32]>)> = Vec::new();
        for id in ids {
            let Some((seq, true)) = self.lookup(&sid, id)? else {
                continue;
            };
            let Some(m) = self.mailboxes.get(&sid) else {
                break;
            };
            let Some(info) = m.messages.get(&seq) else {
                continue;
            };
            if info.acked.contains(&device) || m.cursors.get(&device).is_some_and(|c| *c >= seq) {
                continue;
            }
            let mut info = info.clone();
            info.acked.push(device);
            if Self::fully_acked(&m.record.devices, &m.cursors, seq, &info) {
                ops.extend(Self::delete_message_ops(&sid, &m.body_prefix, seq));
                deleted.push(seq);
            } else {
                let k = key_tag_bytes(&sid, TAG_ACKS, &seq.to_be_bytes());
                let plain: Vec<u8> = info.acked.iter().flatten().copied().collect();
                let value = m.key.seal(&mut self.rng, &[b"ack", &k], &plain);
                ops.push(Op::Put {
                    cf: Cf::Mailboxes,
                    key: k,
                    value,
                });
                marked.push((seq, info.acked));
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.store.write(ops, true)?;
        self.replica.stats.acks_applied = self
            .replica
            .stats
            .acks_applied
            .saturating_add((deleted.len() + marked.len()) as u64);
        if let Some(m) = self.mailboxes.get_mut(&sid) {
            for seq in deleted {
                if let Some(info) = m.messages.remove(&seq) {
                    m.bytes = m.bytes.saturating_sub(info.value_len);
                }
            }
            for (seq, acked) in marked {
                if let Some(info) = m.messages.get_mut(&seq) {
                    info.acked = acked;
                }
            }
        }
        Ok(())
    }

    fn on_digest(
        &mut self,
        now: UnixTime,
        from: NodeId,
        entries: Vec<whispr_protocol::replica::DigestEntry>,
    ) -> Result<()> {
        let mut unknown = Vec::new();
        for entry in entries {
            let sid = self.master.storage_id(&entry.mailbox_id);
            let Some(m) = self.mailboxes.get(&sid) else {
                if self.replica.erased.contains(&sid) {
                    self.send(
                        from,
                        ReplicaMessage::Erase {
                            mailbox_id: entry.mailbox_id,
                        },
                    );
                } else {
                    unknown.push(entry.mailbox_id);
                }
                continue;
            };
            if !self.shares(m, &from) {
                self.refused(1);
                continue;
            }
            let Some((digest, _)) = self.digest_of(now, &sid)? else {
                continue;
            };
            if digest != entry.digest {
                self.replica.stats.digest_mismatches =
                    self.replica.stats.digest_mismatches.saturating_add(1);
                let lists = self.id_lists(now, &sid)?;
                self.send_ids(from, entry.mailbox_id, true, &lists);
            }
        }
        for chunk in unknown.chunks(MAILBOXES_MAX) {
            self.send(
                from,
                ReplicaMessage::RecordRequest {
                    mailbox_ids: chunk.to_vec(),
                },
            );
        }
        Ok(())
    }

    fn send_ids(&mut self, to: NodeId, mailbox_id: MailboxId, answer: bool, lists: &IdLists) {
        let mut start = [0u8; 8];
        self.rng.fill_bytes(&mut start);
        let start = usize::try_from(u64::from_be_bytes(start) % (1 << 30)).unwrap_or(0);
        self.send(
            to,
            ReplicaMessage::Ids {
                mailbox_id,
                answer,
                live: rotated(&lists.live, start, IDS_MAX),
                gone: rotated(&lists.gone, start, IDS_MAX),
            },
        );
    }

    fn on_ids(
        &mut self,
        now: UnixTime,
        from: NodeId,
        mailbox_id: MailboxId,
        answer: bool,
        live: &[IdEntry],
        gone: &[IdEntry],
    ) -> Result<()> {
        let sid = self.master.storage_id(&mailbox_id);
        let Some(m) = self.mailboxes.get(&sid) else {
            self.want_record(from, mailbox_id);
            return Ok(());
        };
        if !self.shares(m, &from) {
            self.refused(1);
            return Ok(());
        }
        // Rounded up like the origin's (`expiry_granularity_ms`), so that an item within its
        // retention keeps the expiry the origin gave it.
        let cap = bucket_of(
            now.0
                .saturating_add(m.record.retention_ms.min(self.config.retention_ms_max)),
            self.config.expiry_granularity_ms,
        );
        let budget = self.config.replica_repair_batch.max(1);
        let mut pull = Vec::new();
        for e in live {
            if pull.len() >= budget {
                break;
            }
            if e.expires_at.0 > now.0 && self.lookup(&sid, &e.id)?.is_none() {
                pull.push(e.id);
            }
        }
        // Gone there: delete here (keeping the id), or remember the id as gone.
        let mut ops = Vec::new();
        let mut deleted = Vec::new();
        let mut tombstones = 0u64;
        let mut next_seq = m.next_seq;
        let prefix = m.body_prefix;
        for e in gone {
            if deleted.len() as u64 + tombstones >= budget as u64 {
                break;
            }
            if e.expires_at.0 <= now.0 {
                continue;
            }
            match self.lookup(&sid, &e.id)? {
                Some((seq, true)) => {
                    ops.extend(Self::delete_message_ops(&sid, &prefix, seq));
                    deleted.push(seq);
                }
                Some((_, false)) => {}
                None => {
                    let seq = next_seq;
                    next_seq = next_seq.saturating_add(1);
                    let expires_at = e.expires_at.0.min(cap);
                    let mut v = seq.to_be_bytes().to_vec();
                    v.extend_from_slice(&expires_at.to_be_bytes());
                    ops.push(Op::Put {
                        cf: Cf::Dedup,
                        key: dedup_key(&sid, &DedupId(e.id)),
                        value: v,
                    });
                    ops.push(Op::Put {
                        cf: Cf::Expiry,
                        key: expiry_key(expires_at, &sid, seq),
                        value: e.id.to_vec(),
                    });
                    tombstones += 1;
                }
            }
        }
        if !ops.is_empty() {
            ops.push(Op::Put {
                cf: Cf::Mailboxes,
                key: key2(&sid, TAG_SEQ_FLOOR),
                value: next_seq.to_be_bytes().to_vec(),
            });
            self.store.write(ops, true)?;
            self.replica.stats.tombstones_applied = self
                .replica
                .stats
                .tombstones_applied
                .saturating_add(deleted.len() as u64 + tombstones);
            if let Some(m) = self.mailboxes.get_mut(&sid) {
                m.next_seq = m.next_seq.max(next_seq);
                for seq in deleted {
                    if let Some(info) = m.messages.remove(&seq) {
                        m.bytes = m.bytes.saturating_sub(info.value_len);
                    }
                }
            }
        }
        if !pull.is_empty() {
            self.replica.stats.pulled = self.replica.stats.pulled.saturating_add(pull.len() as u64);
            self.send(
                from,
                ReplicaMessage::Pull {
                    mailbox_id,
                    ids: pull,
                },
            );
        }
        if answer {
            let lists = self.id_lists(now, &sid)?;
            self.send_ids(from, mailbox_id, false, &lists);
        }
        Ok(())
    }

    fn on_pull(&mut self, from: NodeId, mailbox_id: MailboxId, ids: &[ItemId]) -> Result<()> {
        let sid = self.master.storage_id(&mailbox_id);
        match self.mailboxes.get(&sid) {
            Some(m) if self.shares(m, &from) => {}
            _ => {
                self.refused(1);
                return Ok(());
            }
        }
        let budget = self.config.replica_repair_batch.max(1);
        let mut items = Vec::new();
        for id in ids.iter().take(budget) {
            if let Some((seq, true)) = self.lookup(&sid, id)?
                && let Some(item) = self.push_item_of(&sid, seq)?
            {
                items.push(item);
            }
        }
        for message in Self::push_chunks(mailbox_id, items) {
            self.send(from, message);
        }
        Ok(())
    }

    fn on_record_request(&mut self, from: NodeId, mailbox_ids: &[MailboxId]) {
        let mut records = Vec::new();
        for id in mailbox_ids {
            let sid = self.master.storage_id(id);
            if let Some(m) = self.mailboxes.get(&sid)
                && self.shares(m, &from)
                && let Some(copy) = Self::record_copy(m)
            {
                records.push(copy);
            }
        }
        for chunk in records.chunks(RECORDS_MAX) {
            self.send(
                from,
                ReplicaMessage::Records {
                    records: chunk.to_vec(),
                },
            );
        }
    }

    fn on_records(&mut self, now: UnixTime, from: NodeId, records: Vec<RecordCopy>) -> Result<()> {
        let Some(own) = self.own_id() else {
            return Ok(());
        };
        for record in records {
            let c = record.create;
            if !c.replicas.contains(&own) || !c.replicas.contains(&from) || from == own {
                self.replica.stats.records_refused =
                    self.replica.stats.records_refused.saturating_add(1);
                continue;
            }
            let sid = self.master.storage_id(&c.mailbox_id);
            if self.replica.erased.contains(&sid) {
                continue;
            }
            if !self.mailboxes.contains_key(&sid) {
                let request = CreateMailbox {
                    mailbox_id: c.mailbox_id,
                    mailbox_key: c.mailbox_key,
                    owner_key: c.owner_key,
                    access_key_hash: c.access_key_hash,
                    reply_key: c.reply_key,
                    retention_ms: c.retention_ms,
                    signature: c.signature,
                };
                // Verifies the owner's v2 signature over the whole record, replica set
                // included. Used: a replica of a mailbox in use elsewhere.
                match self.create_inner(now, request, c.replicas.clone(), true) {
                    Ok(()) => {
                        self.replica.stats.records_repaired =
                            self.replica.stats.records_repaired.saturating_add(1);
                    }
                    Err(e) if !e.is_caller_error() => return Err(e),
                    Err(_) => {
                        self.replica.stats.records_refused =
                            self.replica.stats.records_refused.saturating_add(1);
                        continue;
                    }
                }
            } else if self
                .mailboxes
                .get(&sid)
                .is_some_and(|m| m.record.owner_key != c.owner_key || !self.shares(m, &from))
            {
                self.replica.stats.records_refused =
                    self.replica.stats.records_refused.saturating_add(1);
                continue;
            }
            for d in record.devices {
                // Verified against the owner key by `add_device`.
                match self.add_device(&c.mailbox_id, d.device_key, &d.signature) {
                    Ok(()) => {}
                    Err(e) if !e.is_caller_error() => return Err(e),
                    Err(_) => {
                        self.replica.stats.records_refused =
                            self.replica.stats.records_refused.saturating_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}
