//! [`MailboxCore`]: every mailbox decision, with no I/O of its own besides the store trait.
//!
//! Call order for a driver:
//! 1. [`MailboxCore::open`] loads mailbox records (each mailbox's messages are read from the
//!    store at its first access, or by [`MailboxCore::load_some`] when the driver is idle),
//!    and purges what expired while the node was down.
//! 2. Feed inputs: [`MailboxCore::deposit_many`] (group commit: one synced write for a batch
//!    of concurrent deposits and SURB replies), [`MailboxCore::handle_prekey_request`], and
//!    the owner's calls (create, fetch, ack, prekeys, export, erase). Every input carries
//!    `now`; the core never reads a clock.
//! 3. After each input, drain [`MailboxCore::poll_output`] until `None`: SURB replies for the
//!    mesh layer, and expiry sweeps to schedule on the timer queue.
//! 4. When a scheduled sweep fires, call [`MailboxCore::sweep_expired`].
//!
//! Reads filter by expiry time, so nothing expired is served even when a sweep is late.
//! In-memory state changes only after the store write that backs it succeeded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::ControlFlow;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use whispr_protocol::envelope::Envelope;
use whispr_protocol::payload::{PrekeyRequest, Reply};
use whispr_protocol::prekeys::{PrekeyBundle, SignedPrekey, verify_identity};
use whispr_protocol::sphinx::Surb;
use whispr_protocol::{AccessToken, DedupId, MailboxId, ReplyKey, SurbId, UnixTime};

pub use whispr_protocol::mailbox_api::{
    CREATE_PREFIX, DEVICE_PREFIX, create_transcript, device_transcript,
};

use crate::config::CoreConfig;
use crate::crypto::{DataKey, MasterKey, SID_LEN, StorageId};
use crate::error::{MailboxError, Result};
use crate::store::{Cf, MailboxStore, Op};

mod replica;
pub use replica::ReplicaStats;
use whispr_protocol::NodeId;
use whispr_protocol::replica::ReplicaMessage;

const TAG_RECORD: u8 = 0;
const TAG_CURSOR: u8 = 1;
const TAG_SEQ_FLOOR: u8 = 2;
/// Per-message acknowledgements received from peers: `sid ‖ 3 ‖ seq` → sealed device keys.
const TAG_ACKS: u8 = 3;
/// `sid ‖ 4` → erasure number (u64 BE): a replicated mailbox erased here, remembered (up to
/// `replica_erased_max`, oldest forgotten first) so that a peer that missed the erasure is
/// told, and never repairs it back, across restarts.
const TAG_ERASED: u8 = 4;
/// `sid ‖ 5` (empty value): written with the deletion of a mailbox's record, deleted with the
/// rest of its entries. Start-up reads only this family: a crash between the two writes of
/// an erasure leaves this marker, so the erasure is finished at the next start.
const TAG_ERASING: u8 = 5;
const TAG_PREKEY_IDENTITY: u8 = 0;
const TAG_PREKEY_ONE_TIME: u8 = 1;
const KIND_ENVELOPE: u8 = 0;
const KIND_SURB_REPLY: u8 = 1;
/// Length of a wrapped data key: nonce, key, tag.
const WRAPPED_LEN: usize = 24 + 32 + 16;

/// What the core asks its driver to do.
// Outputs are drained right away; boxing the reply would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Output {
    /// Send `reply` back through `surb` (the mesh layer builds the packet).
    Reply {
        /// The single-use reply block.
        surb: Surb,
        /// What to send.
        reply: Reply,
    },
    /// Call [`MailboxCore::sweep_expired`] at (or soon after) `at`.
    ScheduleSweep {
        /// When messages start expiring.
        at: UnixTime,
    },
    /// Send `message` to the replica `peer` (over the mesh's node-to-node channel).
    Replica {
        /// The peer replica.
        peer: NodeId,
        /// What to send.
        message: ReplicaMessage,
    },
}

/// A request to create a mailbox. Its `Debug` leaves out the reply key and the access key
/// hash.
#[derive(Clone)]
pub struct CreateMailbox {
    /// The mailbox id (chosen by the owner, random).
    pub mailbox_id: MailboxId,
    /// The HPKE public key senders seal to (published by the owner; stored for export).
    pub mailbox_key: [u8; 32],
    /// The owner's Ed25519 key: signs this request, prekeys and device registrations, and is
    /// the first device.
    pub owner_key: [u8; 32],
    /// SHA-256 of the access key the owner gives its contacts.
    pub access_key_hash: [u8; 32],
    /// Key that mints the SURB ids of replies into this mailbox (secret).
    pub reply_key: Option<[u8; 32]>,
    /// How long a deposit is kept at most, in milliseconds.
    pub retention_ms: u64,
    /// Owner signature over [`create_transcript`].
    pub signature: [u8; 64],
}

impl std::fmt::Debug for CreateMailbox {
    // The reply key is secret; the access key hash would let anyone who reads it test
    // guesses of the access key offline.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateMailbox")
            .field("mailbox_id", &self.mailbox_id)
            .field("mailbox_key", &hex::encode(self.mailbox_key))
            .field("owner_key", &hex::encode(self.owner_key))
            .field("access_key_hash", &crate::pii::Pii(()))
            .field("reply_key", &self.reply_key.map(|_| crate::pii::Pii(())))
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

/// The result of one deposit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositReceipt {
    /// The mailbox it went to.
    pub mailbox_id: MailboxId,
    /// Its sequence number in the mailbox.
    pub seq: u64,
    /// When the mailbox drops it.
    pub expires_at: UnixTime,
    /// True when this was a redelivery of a deposit already stored (acknowledged again,
    /// stored once).
    pub duplicate: bool,
}

/// Something that arrived from the mesh for a mailbox on this node.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// A sealed-sender envelope (a forward packet's final payload).
    Deposit(Envelope),
    /// A SURB reply into a mailbox (still sealed for its owner).
    SurbReply {
        /// The destination mailbox.
        mailbox_id: MailboxId,
        /// The SURB id, minted with the mailbox's reply key.
        surb_id: SurbId,
        /// The sealed reply bytes.
        payload: Vec<u8>,
    },
}

/// What a stored message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// A sealed envelope as the sender sealed it, minus the access token and ack SURB (the
    /// encoded `SealedEnvelope`; its owner opens it).
    Envelope(Vec<u8>),
    /// A SURB reply.
    SurbReply {
        /// Which SURB it answers.
        surb_id: SurbId,
        /// The sealed reply (opened with the SURB's recovery material).
        payload: Vec<u8>,
    },
}

/// A message as served to its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Sequence number (cursor value).
    pub seq: u64,
    /// The message id, the same on every replica: the envelope's dedup id, or the SURB id
    /// of a SURB reply.
    pub id: [u8; 16],
    /// When the node stored it.
    pub received_at: UnixTime,
    /// When the node drops it.
    pub expires_at: UnixTime,
    /// The message.
    pub body: MessageBody,
}

/// Public information about a mailbox (for its owner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MailboxInfo {
    /// Mailbox id, hex.
    pub mailbox_id: String,
    /// HPKE public key, hex.
    pub mailbox_key: String,
    /// Owner key, hex.
    pub owner_key: String,
    /// Retention in milliseconds.
    pub retention_ms: u64,
    /// Creation time (Unix ms).
    pub created_at_ms: u64,
    /// Registered device keys (hex) and their acknowledged cursor.
    pub devices: Vec<(String, u64)>,
    /// Messages stored (including expired ones not yet swept).
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Last assigned sequence number.
    pub last_seq: u64,
}

/// Prekeys uploaded by the owner.
#[derive(Clone, Debug)]
pub struct PrekeyUpload {
    /// The owner's Olm identity key (Curve25519).
    pub identity_key: [u8; 32],
    /// Owner signature over it.
    pub identity_signature: [u8; 64],
    /// One-time keys and at most one fallback key; replaces what was stored.
    pub prekeys: Vec<SignedPrekey>,
}

/// Node-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Mailboxes held.
    pub mailboxes: u64,
    /// Messages stored.
    pub messages: u64,
    /// Bytes of stored message values.
    pub bytes: u64,
    /// Mailboxes erased unused since the core was opened.
    pub unused_erased: u64,
    /// Mailboxes whose messages are not loaded yet (not counted in `messages`, `bytes`).
    pub mailboxes_unloaded: u64,
}

/// A mailbox's sealed record. Its `Debug` prints no key, id or signature.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    mailbox_id: [u8; 32],
    mailbox_key: [u8; 32],
    owner_key: [u8; 32],
    access_key_hash: [u8; 32],
    reply_key: Option<[u8; 32]>,
    retention_ms: u64,
    created_at_ms: u64,
    devices: Vec<[u8; 32]>,
    /// Set at the first login. A mailbox never logged in to and without a deposit is erased
    /// `unused_mailbox_ttl_ms` after its creation. Records written before this field existed
    /// count as used.
    #[serde(default = "used_by_default")]
    used: bool,
    /// The replica set of a replicated mailbox (v2 create transcript); empty: this node only.
    #[serde(default)]
    replicas: Vec<[u8; 32]>,
    /// The owner's signature over the v2 create transcript (handed to repairing peers).
    #[serde(default)]
    create_signature: Vec<u8>,
    /// The owner's signatures of the device registrations (device key, signature).
    #[serde(default)]
    device_signatures: Vec<([u8; 32], Vec<u8>)>,
    /// Device keys removed from the mailbox, oldest first (at most `devices_removed_max`):
    /// their old registrations are refused.
    #[serde(default)]
    removed_devices: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("reply_key", &self.reply_key.map(|_| crate::pii::Pii(())))
            .field("retention_ms", &self.retention_ms)
            .field("created_at_ms", &self.created_at_ms)
            .field("devices", &self.devices.len())
            .field("used", &self.used)
            .field("replicas", &self.replicas.len())
            .field("removed_devices", &self.removed_devices.len())
            .finish_non_exhaustive()
    }
}

fn used_by_default() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PrekeyIdentity {
    identity_key: [u8; 32],
    identity_signature: Vec<u8>,
    fallback: Option<(u32, [u8; 32], Vec<u8>)>,
}

#[derive(Clone, Debug)]
struct MessageInfo {
    value_len: u64,
    expires_at: u64,
    /// The message id (dedup id), shared by every replica.
    id: [u8; 16],
    /// Devices that acknowledged it at a peer replica (or out of cursor order).
    acked: Vec<[u8; 32]>,
}

/// Token bucket, in units of 1/60,000 token (so `per_min` tokens per minute refill exactly
/// `per_min` units per millisecond).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    units: u64,
    last_ms: u64,
}

const TOKEN_UNITS: u64 = 60_000;

impl Bucket {
    fn full(capacity: u64, now: UnixTime) -> Bucket {
        Bucket {
            units: capacity.saturating_mul(TOKEN_UNITS),
            last_ms: now.0,
        }
    }

    /// Takes one token if there is one; otherwise returns how long until there is.
    fn take(&mut self, now: UnixTime, per_min: u64) -> std::result::Result<(), u64> {
        let capacity = per_min.saturating_mul(TOKEN_UNITS);
        let elapsed = now.0.saturating_sub(self.last_ms);
        self.units = self
            .units
            .saturating_add(elapsed.saturating_mul(per_min))
            .min(capacity);
        self.last_ms = self.last_ms.max(now.0);
        if self.units >= TOKEN_UNITS {
            self.units -= TOKEN_UNITS;
            Ok(())
        } else if per_min == 0 {
            Err(60_000)
        } else {
            Err((TOKEN_UNITS - self.units).div_ceil(per_min))
        }
    }
}

#[derive(Clone)]
struct Mailbox {
    sid: StorageId,
    key: DataKey,
    /// [`body_prefix`] of `key`.
    body_prefix: [u8; BODY_PREFIX_LEN],
    record: Record,
    cursors: BTreeMap<[u8; 32], u64>,
    /// The next sequence number. Until the mailbox is [`Self::loaded`], only a lower bound
    /// (from its cursors, its sequence floor and what sweeps deleted since the start).
    next_seq: u64,
    /// Its messages; empty until [`Self::loaded`].
    messages: BTreeMap<u64, MessageInfo>,
    /// Bytes of its messages; 0 until [`Self::loaded`].
    bytes: u64,
    deposits: Bucket,
    /// True once `messages`, `bytes` and `next_seq` reflect the store: at creation, or at
    /// the first access after a start ([`MailboxCore::open`] reads only mailbox records).
    loaded: bool,
    /// Peer acknowledgements read at start-up (seq, devices), applied when it is loaded.
    pending_acks: Vec<(u64, Vec<[u8; 32]>)>,
}

impl Mailbox {
    fn min_cursor(&self) -> u64 {
        self.cursors.values().copied().min().unwrap_or(0)
    }

    fn has_device(&self, device: &[u8; 32]) -> bool {
        self.record.devices.iter().any(|d| d == device)
    }

    /// Never logged in to, and never received a deposit (sequence numbers start at 1 and
    /// never go back).
    fn is_unused(&self) -> bool {
        !self.record.used && self.next_seq <= 1
    }
}

fn key2(sid: &StorageId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(SID_LEN + 1);
    k.extend_from_slice(sid);
    k.push(tag);
    k
}

fn key_tag_bytes(sid: &StorageId, tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = key2(sid, tag);
    k.extend_from_slice(rest);
    k
}

fn envelope_key(sid: &StorageId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(SID_LEN + 8);
    k.extend_from_slice(sid);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Length of an envelope entry that points to a body in [`Cf::Bodies`]: `expires_at ‖
/// value length ‖ message id`. An entry written before bodies had their own family holds
/// the whole value (`expires_at ‖ sealed body`, at least 8 + 40 + 9 bytes), so the length
/// tells them apart.
const ENVELOPE_META_LEN: usize = 32;

/// Length of the entry as first written by commit f54be39 (`expires_at ‖ value length`,
/// no id; body in [`Cf::Bodies`]), still read.
const ENVELOPE_META_V1_LEN: usize = 16;

/// True when an envelope entry points to a body in [`Cf::Bodies`].
fn has_separate_body(v: &[u8]) -> bool {
    v.len() == ENVELOPE_META_LEN || v.len() == ENVELOPE_META_V1_LEN
}

/// The value length and message id (if stored) of an envelope entry with a separate body;
/// `None` for an entry of the old layout (the whole value).
fn envelope_meta(v: &[u8]) -> Option<(u64, Option<[u8; 16]>)> {
    if !has_separate_body(v) {
        return None;
    }
    let value_len = u64_at(v, 8)?;
    let id = v.get(16..32).and_then(|b| <[u8; 16]>::try_from(b).ok());
    Some((value_len, id))
}

/// Length of a body key prefix.
const BODY_PREFIX_LEN: usize = 16;

/// A mailbox's body key prefix: a keyed hash under its data key, so that the keys of its
/// bodies — which RocksDB also writes into blob files, where an erasure's compaction does
/// not reach — do not carry the storage id, and mean nothing once the data key is erased.
fn body_prefix(key: &DataKey) -> [u8; BODY_PREFIX_LEN] {
    let tag = key.tag(&[b"body"]);
    let mut prefix = [0u8; BODY_PREFIX_LEN];
    prefix.copy_from_slice(&tag[..BODY_PREFIX_LEN]);
    prefix
}

fn body_key(prefix: &[u8; BODY_PREFIX_LEN], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(BODY_PREFIX_LEN + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The puts that store one sealed envelope: its entry at `ekey` in [`Cf::Envelopes`]
/// (expiry time, value length and message id, 32 bytes) and its body at `bkey` in
/// [`Cf::Bodies`]; with `inline`, the layout of before (the whole value in
/// [`Cf::Envelopes`]), kept for tests of old data. Returns the value length (`8 + sealed`,
/// the same as the old layout's value) for quotas.
fn envelope_puts(
    ops: &mut Vec<Op>,
    ekey: Vec<u8>,
    bkey: Vec<u8>,
    expires_at: u64,
    id: &[u8; 16],
    sealed: Vec<u8>,
    inline: bool,
) -> u64 {
    let value_len = (8 + sealed.len()) as u64;
    let mut value = Vec::with_capacity(if inline {
        8 + sealed.len()
    } else {
        ENVELOPE_META_LEN
    });
    value.extend_from_slice(&expires_at.to_be_bytes());
    if inline {
        value.extend_from_slice(&sealed);
    } else {
        value.extend_from_slice(&value_len.to_be_bytes());
        value.extend_from_slice(id);
        ops.push(Op::Put {
            cf: Cf::Bodies,
            key: bkey,
            value: sealed,
        });
    }
    ops.push(Op::Put {
        cf: Cf::Envelopes,
        key: ekey,
        value,
    });
    value_len
}

/// A device's cursor key: a keyed hash of the device key (the key itself is only in the
/// sealed value), so no device or owner key is stored in clear.
fn cursor_key(sid: &StorageId, key: &DataKey, device: &[u8; 32]) -> Vec<u8> {
    key_tag_bytes(sid, TAG_CURSOR, &key.tag(&[b"cursor", device]))
}

fn dedup_key(sid: &StorageId, dedup: &DedupId) -> Vec<u8> {
    let mut k = Vec::with_capacity(SID_LEN + 16);
    k.extend_from_slice(sid);
    k.extend_from_slice(dedup.as_bytes());
    k
}

fn expiry_key(expires_at: u64, sid: &StorageId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + SID_LEN + 8);
    k.extend_from_slice(&expires_at.to_be_bytes());
    k.extend_from_slice(sid);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The first key after every key starting with `sid` (`sid + 1` as a big-endian number).
fn sid_end(sid: &StorageId) -> Vec<u8> {
    let mut end = sid.to_vec();
    for b in end.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return end;
        }
    }
    // All 0xff: no key of 16 bytes is larger, but longer ones are; 17 bytes of 0xff bound
    // every key that starts with this sid.
    vec![0xff; SID_LEN + 9]
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

fn sid_of(bytes: &[u8]) -> Option<StorageId> {
    bytes
        .get(..SID_LEN)
        .and_then(|b| <[u8; SID_LEN]>::try_from(b).ok())
}

fn verify(key: &[u8; 32], message: &[u8], signature: &[u8; 64], what: &'static str) -> Result<()> {
    let key = VerifyingKey::from_bytes(key).map_err(|_| MailboxError::BadSignature(what))?;
    key.verify_strict(message, &Signature::from_bytes(signature))
        .map_err(|_| MailboxError::BadSignature(what))
}

/// `expires_at` rounded up to a multiple of `bucket_ms` (0 counts as 1).
fn bucket_of(expires_at: u64, bucket_ms: u64) -> u64 {
    let b = bucket_ms.max(1);
    expires_at.div_ceil(b).saturating_mul(b)
}

/// Per-mailbox changes prepared for a batch, applied only after the write succeeded.
#[derive(Default)]
struct Pending {
    next_seq: Option<u64>,
    added: Vec<(u64, MessageInfo)>,
    bytes: u64,
}

/// What the deposit batches prepared and not finished yet ([`MailboxCore::prepare_deposits`])
/// add to one mailbox: its next free sequence number (numbers are reserved at preparation,
/// so a batch prepared while an earlier one is being written never reuses them), and the
/// messages and bytes that count against its quotas.
struct Inflight {
    next_seq: u64,
    count: u64,
    bytes: u64,
}

/// A group commit prepared by [`MailboxCore::prepare_deposits`]: its writes, which the driver
/// makes durable in one synced write ([`DepositBatch::take_ops`], then
/// [`crate::store::MailboxStore::write`] with `sync`), and the results that
/// [`MailboxCore::finish_deposits`] gives once that write is done. Nothing of it is in the
/// core's state (messages, counters, acks) before then.
pub struct DepositBatch {
    /// Batch number (the order of preparation; batches finish in this order).
    number: u64,
    ops: Vec<Op>,
    pending: BTreeMap<StorageId, Pending>,
    /// (sid, dedup id) of the deposits new in this batch.
    new_ids: Vec<(StorageId, [u8; 16])>,
    items: Vec<Prepared>,
}

impl std::fmt::Debug for DepositBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepositBatch")
            .field("number", &self.number)
            .field("items", &self.items.len())
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl DepositBatch {
    /// The writes of the batch (empty when it only holds refusals and redeliveries), taken
    /// out for the driver to write, synced, before [`MailboxCore::finish_deposits`]. They
    /// come in key order per column family: every key of a batch is new and written once
    /// (the batch only puts), so the order changes nothing stored, and RocksDB inserts keys
    /// that follow each other into its memtables faster than scattered ones.
    pub fn take_ops(&mut self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut self.ops);
        fn put_key(op: &Op) -> Option<(Cf, &[u8])> {
            match op {
                Op::Put { cf, key, .. } => Some((*cf, key.as_slice())),
                _ => None,
            }
        }
        if ops.iter().all(|op| put_key(op).is_some()) {
            ops.sort_unstable_by(|a, b| put_key(a).cmp(&put_key(b)));
        }
        ops
    }

    /// Deposits in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True for a batch of no deposit.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

struct Prepared {
    result: Result<DepositReceipt>,
    surb: Option<Surb>,
    dedup: DedupId,
    needs_write: bool,
    /// A redelivery of a deposit of an earlier batch not finished when this one was
    /// prepared: it stands or falls with that batch's write too.
    after_earlier: bool,
    /// For a replicated mailbox: the mailbox, and the message to push to its peers (`None`
    /// for a redelivery: read back from the store).
    replicate: Option<(StorageId, Option<whispr_protocol::replica::PushItem>)>,
}

fn access_ok(hash: &[u8; 32], token: &AccessToken) -> bool {
    bool::from(Sha256::digest(token.as_bytes()).as_slice().ct_eq(hash))
}

/// The mailbox core. See the module documentation for the call order.
pub struct MailboxCore<S: MailboxStore, R: rand::CryptoRng> {
    config: CoreConfig,
    store: S,
    master: MasterKey,
    rng: R,
    mailboxes: BTreeMap<StorageId, Mailbox>,
    /// Expiry sweeps already asked for (bucket end times).
    sweeps: BTreeSet<u64>,
    /// Mailboxes not used yet, by the time they are erased if they stay unused (entries of
    /// mailboxes used or erased since are skipped when due).
    unused: BTreeSet<(u64, StorageId)>,
    unused_erased: u64,
    outputs: VecDeque<Output>,
    replica: replica::ReplicaState,
    /// Mailboxes erased since the last [`MailboxCore::take_compaction`] (at most
    /// [`COMPACT_PENDING_MAX`]; past it, everything is compacted).
    compact_pending: BTreeSet<StorageId>,
    compact_all: bool,
    /// Write envelopes in the layout of before [`Cf::Bodies`] (tests of old data only).
    inline_bodies: bool,
    /// Per mailbox, what the deposit batches prepared and not finished yet add.
    inflight: BTreeMap<StorageId, Inflight>,
    /// (sid, dedup id) → (seq, expires_at, batch number) of the deposits new in those
    /// batches: a redelivery gets the first copy's answer, whichever batch holds it.
    inflight_ids: BTreeMap<(StorageId, [u8; 16]), (u64, u64, u64)>,
    /// Deposit batches prepared and not finished.
    open_batches: usize,
    /// Number of the next deposit batch.
    next_batch: u64,
    /// A deposit batch's write failed (the store is poisoned from then on too).
    batch_failed: bool,
}

/// Erased mailboxes whose key ranges are remembered for compaction; past it the next
/// compaction covers every column family whole.
pub const COMPACT_PENDING_MAX: usize = 1024;

/// A key range of one column family to compact ([`MailboxCore::take_compaction`]).
#[derive(Clone, PartialEq, Eq)]
pub struct CompactRange {
    /// The column family.
    pub cf: Cf,
    /// First key (inclusive).
    pub from: Vec<u8>,
    /// End (exclusive).
    pub to: Vec<u8>,
}

impl std::fmt::Debug for CompactRange {
    // The bounds are storage ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactRange")
            .field("cf", &self.cf)
            .finish_non_exhaustive()
    }
}

impl<S: MailboxStore, R: rand::CryptoRng> std::fmt::Debug for MailboxCore<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxCore")
            .field("mailboxes", &self.mailboxes.len())
            .finish_non_exhaustive()
    }
}

impl<S: MailboxStore, R: rand::CryptoRng> MailboxCore<S, R> {
    /// Loads the core from `store`, purging what expired by `now`. Outputs a sweep for every
    /// future expiry bucket.
    pub fn open(
        config: CoreConfig,
        store: S,
        master: MasterKey,
        rng: R,
        now: UnixTime,
    ) -> Result<Self> {
        let mut core = MailboxCore {
            config,
            store,
            master,
            rng,
            mailboxes: BTreeMap::new(),
            sweeps: BTreeSet::new(),
            unused: BTreeSet::new(),
            unused_erased: 0,
            outputs: VecDeque::new(),
            replica: replica::ReplicaState::new(now),
            compact_pending: BTreeSet::new(),
            compact_all: false,
            inline_bodies: false,
            inflight: BTreeMap::new(),
            inflight_ids: BTreeMap::new(),
            open_batches: 0,
            next_batch: 0,
            batch_failed: false,
        };
        core.load(now)?;
        Ok(core)
    }

    /// Writes new envelopes in the layout of before bodies had their own column family
    /// (the whole sealed value in [`Cf::Envelopes`]), to test that a node still reads and
    /// deletes what an older version stored. Not for production use.
    #[doc(hidden)]
    pub fn write_inline_bodies(&mut self, inline: bool) {
        self.inline_bodies = inline;
    }

    fn load(&mut self, now: UnixTime) -> Result<()> {
        // Mailbox records, cursors and sequence floors.
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.store
            .scan(Cf::Mailboxes, &[], &[0xff; SID_LEN + 9], &mut |k, v| {
                records.push((k.to_vec(), v.to_vec()));
                ControlFlow::Continue(())
            })?;
        let mut orphans: BTreeSet<StorageId> = BTreeSet::new();
        let mut acks: Vec<(StorageId, u64, Vec<[u8; 32]>)> = Vec::new();
        let mut erased: Vec<(u64, StorageId)> = Vec::new();
        for (k, v) in records {
            let sid = sid_of(&k).ok_or(MailboxError::Corrupt("mailbox key"))?;
            match k.get(SID_LEN).copied() {
                Some(TAG_ERASED) if k.len() == SID_LEN + 1 => {
                    let n = u64_at(&v, 0).ok_or(MailboxError::Corrupt("erasure marker"))?;
                    erased.push((n, sid));
                }
                Some(TAG_RECORD) if k.len() == SID_LEN + 1 => {
                    let (wrapped, sealed) = v
                        .split_at_checked(WRAPPED_LEN)
                        .ok_or(MailboxError::Corrupt("mailbox record"))?;
                    let key = self.master.unwrap_key(&sid, wrapped)?;
                    let plain = key.open(&[b"rec", &sid], sealed)?;
                    let record: Record = serde_json::from_slice(&plain)
                        .map_err(|_| MailboxError::Corrupt("mailbox record"))?;
                    let cursors = record.devices.iter().map(|d| (*d, 0)).collect();
                    self.mailboxes.insert(
                        sid,
                        Mailbox {
                            sid,
                            body_prefix: body_prefix(&key),
                            key,
                            record,
                            cursors,
                            next_seq: 1,
                            messages: BTreeMap::new(),
                            bytes: 0,
                            deposits: Bucket::full(self.config.deposits_per_min, now),
                            loaded: false,
                            pending_acks: Vec::new(),
                        },
                    );
                }
                Some(TAG_CURSOR) => {
                    let Some(m) = self.mailboxes.get_mut(&sid) else {
                        orphans.insert(sid);
                        continue;
                    };
                    let plain = m.key.open(&[b"cur", &k], &v)?;
                    let seq = u64_at(&plain, 0).ok_or(MailboxError::Corrupt("cursor"))?;
                    let device = plain
                        .get(8..40)
                        .and_then(|d| <[u8; 32]>::try_from(d).ok())
                        .ok_or(MailboxError::Corrupt("cursor"))?;
                    if m.has_device(&device) {
                        m.cursors.insert(device, seq);
                    }
                    m.next_seq = m.next_seq.max(seq.saturating_add(1));
                }
                Some(TAG_ACKS) => {
                    let (Some(m), Some(seq)) = (self.mailboxes.get(&sid), u64_at(&k, SID_LEN + 1))
                    else {
                        orphans.insert(sid);
                        continue;
                    };
                    let plain = m.key.open(&[b"ack", &k], &v)?;
                    let devices = plain
                        .chunks_exact(32)
                        .filter_map(|d| <[u8; 32]>::try_from(d).ok())
                        .collect();
                    acks.push((sid, seq, devices));
                }
                Some(TAG_SEQ_FLOOR) => {
                    let Some(m) = self.mailboxes.get_mut(&sid) else {
                        orphans.insert(sid);
                        continue;
                    };
                    let floor = u64_at(&v, 0).ok_or(MailboxError::Corrupt("sequence floor"))?;
                    m.next_seq = m.next_seq.max(floor);
                }
                _ => {
                    // A record missing its mailbox (erasure interrupted after the data key
                    // was deleted): finish the erasure below.
                    if !self.mailboxes.contains_key(&sid) {
                        orphans.insert(sid);
                    }
                }
            }
        }
        erased.sort_unstable();
        self.load_erased(erased)?;
        for (sid, seq, devices) in acks {
            if let Some(m) = self.mailboxes.get_mut(&sid) {
                m.pending_acks.push((seq, devices));
            }
        }
        // Messages are not read here: each mailbox reads its own (two prefix scans, no body)
        // at its first access ([`Self::ensure_loaded`]). Replicated mailboxes are loaded now:
        // the anti-entropy round digests every one of them (message count, next sequence
        // number) from its first tick.
        let replicated: Vec<StorageId> = self
            .mailboxes
            .values()
            .filter(|m| !m.record.replicas.is_empty())
            .map(|m| m.sid)
            .collect();
        for sid in replicated {
            self.ensure_loaded(&sid)?;
        }
        for sid in orphans {
            let mut ops = Self::erase_ops(&sid);
            ops.extend(self.expiry_ops(&sid)?);
            self.store.write(ops, true)?;
            self.want_compaction(sid);
        }
        let unused: Vec<(StorageId, u64)> = self
            .mailboxes
            .values()
            .filter(|m| m.is_unused())
            .map(|m| (m.sid, m.record.created_at_ms))
            .collect();
        for (sid, created_at) in unused {
            self.track_unused(sid, created_at);
        }
        // Purge what expired while we were down, then ask for sweeps of the rest: of every
        // expiry entry, also those of acknowledged messages (their dedup ids must go on time).
        while self.sweep_expired(now)? > 0 {}
        // The index is keyed by time first: one seek per bucket that has an entry, not a
        // walk over every message.
        let bucket_ms = self.config.expiry_bucket_ms;
        let mut buckets = BTreeSet::new();
        let mut from = 0u64;
        loop {
            let mut found = None;
            self.store.scan(
                Cf::Expiry,
                &from.to_be_bytes(),
                &[0xff; 8 + SID_LEN + 9],
                &mut |k, _| match u64_at(k, 0) {
                    Some(expires_at) => {
                        found = Some(expires_at);
                        ControlFlow::Break(())
                    }
                    None => ControlFlow::Continue(()),
                },
            )?;
            let Some(expires_at) = found else {
                break;
            };
            // At or after `expires_at` (rounded up), so the next seek is past it.
            let bucket = bucket_of(expires_at, bucket_ms);
            buckets.insert(bucket);
            match bucket.checked_add(1) {
                Some(next) if next > expires_at => from = next,
                _ => break,
            }
        }
        for at in buckets {
            self.want_sweep(at);
        }
        Ok(())
    }

    /// Reads mailbox `m`'s messages from the store: its envelope entries (sizes, expiry
    /// times and ids, in clear; no body is read, nothing is decrypted) and its dedup entries
    /// (sequence numbers of messages gone but not expired, which must not be reused; the
    /// ids of messages stored in the old layout). Two prefix scans over `m`'s own keys.
    /// Returns its messages, their bytes and the next sequence number they imply.
    fn read_messages(&self, m: &Mailbox) -> Result<(BTreeMap<u64, MessageInfo>, u64, u64)> {
        let sid = m.sid;
        let end = sid_end(&sid);
        let mut list: Vec<(u64, MessageInfo)> = Vec::new();
        let mut bytes = 0u64;
        let mut next = 1u64;
        let mut legacy = false;
        self.store.scan(Cf::Envelopes, &sid, &end, &mut |k, v| {
            if let (Some(s), Some(seq), Some(expires_at)) =
                (sid_of(k), u64_at(k, SID_LEN), u64_at(v, 0))
                && s == sid
            {
                // New layout: length and id stored; old: the value is the whole envelope,
                // the id comes from the dedup entry below.
                let (value_len, id) = match envelope_meta(v) {
                    Some((value_len, Some(id))) => (value_len, id),
                    Some((value_len, None)) => {
                        legacy = true;
                        (value_len, [0; 16])
                    }
                    None => {
                        legacy = true;
                        (v.len() as u64, [0; 16])
                    }
                };
                bytes = bytes.saturating_add(value_len);
                next = next.max(seq.saturating_add(1));
                list.push((
                    seq,
                    MessageInfo {
                        value_len,
                        expires_at,
                        id,
                        acked: Vec::new(),
                    },
                ));
            }
            ControlFlow::Continue(())
        })?;
        // Keys come in `sid ‖ seq` order: the map is built in one pass.
        let mut messages: BTreeMap<u64, MessageInfo> = list.into_iter().collect();
        self.store.scan(Cf::Dedup, &sid, &end, &mut |k, v| {
            if let (Some(s), Some(id), Some(seq), Some(expires_at)) = (
                sid_of(k),
                k.get(SID_LEN..).and_then(|b| <[u8; 16]>::try_from(b).ok()),
                u64_at(v, 0),
                u64_at(v, 8),
            ) && s == sid
            {
                next = next.max(seq.saturating_add(1));
                if legacy
                    && let Some(info) = messages.get_mut(&seq)
                    && info.expires_at == expires_at
                    && info.id == [0; 16]
                {
                    info.id = id;
                }
            }
            ControlFlow::Continue(())
        })?;
        for (seq, devices) in &m.pending_acks {
            if let Some(info) = messages.get_mut(seq) {
                info.acked.clone_from(devices);
            }
        }
        Ok((messages, bytes, next))
    }

    /// Loads mailbox `sid`'s messages if not done yet (see [`Mailbox::loaded`]). A no-op
    /// for an unknown mailbox.
    fn ensure_loaded(&mut self, sid: &StorageId) -> Result<()> {
        let Some(m) = self.mailboxes.get(sid) else {
            return Ok(());
        };
        if m.loaded {
            return Ok(());
        }
        let (messages, bytes, next) = self.read_messages(m)?;
        if let Some(m) = self.mailboxes.get_mut(sid) {
            m.messages = messages;
            m.bytes = bytes;
            m.next_seq = m.next_seq.max(next);
            m.loaded = true;
            m.pending_acks = Vec::new();
        }
        Ok(())
    }

    /// Loads `mailbox`'s messages into memory if they are not yet (after a start, each
    /// mailbox reads its own at its first access). The read-only calls ([`Self::fetch`],
    /// [`Self::last_seq`], [`Self::info`], [`Self::export`]) work without it, but read the
    /// mailbox's entries from the store at every call until it is loaded: a driver holding
    /// the core mutably calls this first.
    pub fn load_mailbox(&mut self, mailbox: &MailboxId) -> Result<()> {
        let sid = self.master.storage_id(mailbox);
        self.ensure_loaded(&sid)
    }

    /// Mailboxes whose messages are not loaded yet (see [`Self::load_mailbox`]).
    pub fn mailboxes_unloaded(&self) -> usize {
        self.mailboxes.values().filter(|m| !m.loaded).count()
    }

    /// `mailbox` with its messages: borrowed when loaded, else a copy filled from the store.
    fn view(&self, mailbox: &MailboxId) -> Result<std::borrow::Cow<'_, Mailbox>> {
        let m = self.mailbox(mailbox)?;
        if m.loaded {
            return Ok(std::borrow::Cow::Borrowed(m));
        }
        let (messages, bytes, next) = self.read_messages(m)?;
        let mut copy = m.clone();
        copy.messages = messages;
        copy.bytes = bytes;
        copy.next_seq = copy.next_seq.max(next);
        copy.loaded = true;
        copy.pending_acks = Vec::new();
        Ok(std::borrow::Cow::Owned(copy))
    }

    fn erase_ops(sid: &StorageId) -> Vec<Op> {
        let end = sid_end(sid);
        [Cf::Mailboxes, Cf::Envelopes, Cf::Dedup, Cf::Prekeys]
            .into_iter()
            .map(|cf| Op::DeleteRange {
                cf,
                from: sid.to_vec(),
                to: end.clone(),
            })
            .collect()
    }

    /// Deletes of a mailbox's expiry index entries. The index is keyed by time first, so
    /// they are not found by scanning it (that would walk every message of the node): every
    /// deposit wrote its expiry entry together with its dedup entry (`sid ‖ dedup id` →
    /// `seq ‖ expires_at`), so the mailbox's own dedup range (a bounded prefix scan) names
    /// each of its expiry keys. A sweep deletes both together.
    fn expiry_ops(&self, sid: &StorageId) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        self.store
            .scan(Cf::Dedup, sid, &sid_end(sid), &mut |k, v| {
                if let (Some(seq), Some(expires_at)) = (u64_at(v, 0), u64_at(v, 8))
                    && k.get(..SID_LEN) == Some(sid.as_slice())
                {
                    ops.push(Op::Delete {
                        cf: Cf::Expiry,
                        key: expiry_key(expires_at, sid, seq),
                    });
                }
                ControlFlow::Continue(())
            })?;
        Ok(ops)
    }

    /// Remembers when an unused mailbox created at `created_at` is to be erased.
    fn track_unused(&mut self, sid: StorageId, created_at: u64) {
        let deadline = created_at.saturating_add(self.config.unused_mailbox_ttl_ms);
        self.unused.insert((deadline, sid));
    }

    /// When [`Self::erase_unused`] may next have something to do: the end of the earliest
    /// grace period of a mailbox that was unused when created (or loaded).
    pub fn next_unused_deadline(&self) -> Option<UnixTime> {
        self.unused.first().map(|(at, _)| UnixTime(*at))
    }

    /// Erases every mailbox still unused (never logged in to, no deposit) at the end of its
    /// grace period, `unused_mailbox_ttl_ms` after its creation; returns how many. The
    /// driver calls it at [`Self::next_unused_deadline`].
    pub fn erase_unused(&mut self, now: UnixTime) -> Result<usize> {
        let mut erased = 0;
        while let Some((deadline, sid)) = self.unused.first().copied() {
            if deadline > now.0 {
                break;
            }
            self.ensure_loaded(&sid)?;
            if self.mailboxes.get(&sid).is_some_and(Mailbox::is_unused) {
                self.erase_sid(&sid)?;
                erased += 1;
                self.unused_erased = self.unused_erased.saturating_add(1);
            }
            self.unused.remove(&(deadline, sid));
        }
        Ok(erased)
    }

    fn want_sweep(&mut self, at: u64) {
        if self.sweeps.insert(at) {
            self.outputs
                .push_back(Output::ScheduleSweep { at: UnixTime(at) });
        }
    }

    /// The next thing to do, if any. Drain until `None` after every input.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest sweep asked for and not yet done.
    pub fn poll_timeout(&self) -> Option<UnixTime> {
        self.sweeps.first().map(|at| UnixTime(*at))
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Node-wide counters. `messages` and `bytes` count the loaded mailboxes only (after a
    /// start, each mailbox loads at its first access, or from [`Self::load_some`]);
    /// `mailboxes_unloaded` says how many are not yet.
    pub fn stats(&self) -> CoreStats {
        CoreStats {
            mailboxes: self.mailboxes.len() as u64,
            messages: self
                .mailboxes
                .values()
                .map(|m| m.messages.len() as u64)
                .sum(),
            bytes: self.mailboxes.values().map(|m| m.bytes).sum(),
            unused_erased: self.unused_erased,
            mailboxes_unloaded: self.mailboxes_unloaded() as u64,
        }
    }

    /// Loads up to `max` mailboxes not loaded yet (see [`Self::load_mailbox`]); returns how
    /// many. A driver calls it when idle, so that [`Self::stats`] becomes exact and first
    /// accesses cost nothing, without making the start wait for every mailbox.
    pub fn load_some(&mut self, max: usize) -> Result<usize> {
        let todo: Vec<StorageId> = self
            .mailboxes
            .values()
            .filter(|m| !m.loaded)
            .take(max)
            .map(|m| m.sid)
            .collect();
        for sid in &todo {
            self.ensure_loaded(sid)?;
        }
        Ok(todo.len())
    }

    fn mailbox(&self, id: &MailboxId) -> Result<&Mailbox> {
        self.mailboxes
            .get(&self.master.storage_id(id))
            .ok_or(MailboxError::UnknownMailbox)
    }

    fn mailbox_mut(&mut self, id: &MailboxId) -> Result<&mut Mailbox> {
        let sid = self.master.storage_id(id);
        self.mailboxes
            .get_mut(&sid)
            .ok_or(MailboxError::UnknownMailbox)
    }

    fn check_writable(&self) -> Result<()> {
        if self.store.is_poisoned() {
            return Err(crate::store::StoreError::Poisoned.into());
        }
        Ok(())
    }

    fn record_ops(&mut self, sid: &StorageId, key: &DataKey, record: &Record) -> Result<Op> {
        let plain = serde_json::to_vec(record)
            .map_err(|_| MailboxError::Corrupt("mailbox record encoding"))?;
        let mut value = self.master.wrap(&mut self.rng, sid, key);
        value.extend_from_slice(&key.seal(&mut self.rng, &[b"rec", sid], &plain));
        Ok(Op::Put {
            cf: Cf::Mailboxes,
            key: key2(sid, TAG_RECORD),
            value,
        })
    }

    /// Creates a mailbox after checking the owner's proof of possession (v1 transcript: a
    /// mailbox on this node only, never replicated).
    pub fn create_mailbox(&mut self, now: UnixTime, request: CreateMailbox) -> Result<()> {
        self.create_inner(now, request, Vec::new(), false)
    }

    fn create_inner(
        &mut self,
        now: UnixTime,
        request: CreateMailbox,
        replicas: Vec<NodeId>,
        used: bool,
    ) -> Result<()> {
        self.check_writable()?;
        if request.mailbox_id.0 == [0u8; 32] {
            return Err(MailboxError::InvalidArgument(
                "the all-zero mailbox id is reserved",
            ));
        }
        if request.retention_ms == 0 || request.retention_ms > self.config.retention_ms_max {
            return Err(MailboxError::InvalidArgument(
                "retention_ms must be between 1 and the node's retention_ms_max",
            ));
        }
        whispr_protocol::envelope::MailboxPublicKey::from_bytes(&request.mailbox_key)?;
        let transcript = if replicas.is_empty() {
            create_transcript(
                &request.mailbox_id,
                &request.mailbox_key,
                &request.owner_key,
                &request.access_key_hash,
                request.reply_key.as_ref(),
                request.retention_ms,
            )
        } else {
            whispr_protocol::mailbox_api::create_transcript_v2(
                &request.mailbox_id,
                &request.mailbox_key,
                &request.owner_key,
                &request.access_key_hash,
                request.reply_key.as_ref(),
                request.retention_ms,
                &replicas,
            )
            .ok_or(MailboxError::InvalidArgument("1 to 5 replicas"))?
        };
        verify(
            &request.owner_key,
            &transcript,
            &request.signature,
            "proof of possession",
        )?;
        let sid = self.master.storage_id(&request.mailbox_id);
        if self.mailboxes.contains_key(&sid) {
            return Err(MailboxError::MailboxExists);
        }
        if self.mailboxes.len() >= self.config.mailboxes_max {
            return Err(MailboxError::QuotaExceeded {
                what: "mailboxes on this node",
            });
        }
        let key = DataKey::generate(&mut self.rng);
        let record = Record {
            mailbox_id: request.mailbox_id.0,
            mailbox_key: request.mailbox_key,
            owner_key: request.owner_key,
            access_key_hash: request.access_key_hash,
            reply_key: request.reply_key,
            retention_ms: request.retention_ms,
            created_at_ms: now.0,
            devices: vec![request.owner_key],
            used,
            create_signature: if replicas.is_empty() {
                Vec::new()
            } else {
                request.signature.to_vec()
            },
            replicas: replicas.iter().map(|r| r.0).collect(),
            device_signatures: Vec::new(),
            removed_devices: Vec::new(),
        };
        let op = self.record_ops(&sid, &key, &record)?;
        self.store.write(vec![op], true)?;
        let cursors = record.devices.iter().map(|d| (*d, 0)).collect();
        self.mailboxes.insert(
            sid,
            Mailbox {
                sid,
                body_prefix: body_prefix(&key),
                key,
                record,
                cursors,
                next_seq: 1,
                messages: BTreeMap::new(),
                bytes: 0,
                deposits: Bucket::full(self.config.deposits_per_min, now),
                loaded: true,
                pending_acks: Vec::new(),
            },
        );
        if !used {
            self.track_unused(sid, now.0);
        }
        Ok(())
    }

    /// Records that an owner device logged in to `mailbox` (one synced write, the first
    /// time only): from then on it is never erased as unused.
    pub fn mark_used(&mut self, mailbox: &MailboxId) -> Result<()> {
        let m = self.mailbox(mailbox)?;
        if m.record.used {
            return Ok(());
        }
        self.check_writable()?;
        let (sid, key) = (m.sid, m.key.clone());
        let mut record = m.record.clone();
        record.used = true;
        let op = self.record_ops(&sid, &key, &record)?;
        self.store.write(vec![op], true)?;
        if let Some(m) = self.mailboxes.get_mut(&sid) {
            m.record.used = true;
        }
        Ok(())
    }

    /// True when `device` may log in to `mailbox`.
    pub fn is_device(&self, mailbox: &MailboxId, device: &[u8; 32]) -> bool {
        self.mailbox(mailbox).is_ok_and(|m| m.has_device(device))
    }

    /// True when `device` is the mailbox owner's key.
    pub fn is_owner(&self, mailbox: &MailboxId, device: &[u8; 32]) -> bool {
        self.owner_check(mailbox, device).unwrap_or(false)
    }

    /// Whether `device` is the mailbox owner's key; [`MailboxError::UnknownMailbox`] when the
    /// mailbox is not here (erased since the session began, say), so that an API answers
    /// "not found" rather than "forbidden" for it.
    pub fn owner_check(&self, mailbox: &MailboxId, device: &[u8; 32]) -> Result<bool> {
        self.mailbox(mailbox).map(|m| &m.record.owner_key == device)
    }

    /// Registers another device, signed by the owner. The new device starts at the oldest
    /// cursor, so it sees every message still stored. A device key removed from the mailbox
    /// is refused (its registration could be a replay): a device joins again with a new key.
    pub fn add_device(
        &mut self,
        mailbox: &MailboxId,
        device_key: [u8; 32],
        owner_signature: &[u8; 64],
    ) -> Result<()> {
        self.check_writable()?;
        let devices_max = self.config.devices_max;
        let m = self.mailbox(mailbox)?;
        verify(
            &m.record.owner_key,
            &device_transcript(mailbox, &device_key),
            owner_signature,
            "device registration",
        )?;
        VerifyingKey::from_bytes(&device_key)
            .map_err(|_| MailboxError::InvalidArgument("device key is not an Ed25519 key"))?;
        if m.record.removed_devices.contains(&device_key) {
            return Err(MailboxError::Unauthorized(
                "this device key was removed from the mailbox; register a new key",
            ));
        }
        if m.has_device(&device_key) {
            return Ok(());
        }
        if m.record.devices.len() >= devices_max {
            return Err(MailboxError::QuotaExceeded {
                what: "devices per mailbox",
            });
        }
        let sid = m.sid;
        let start = m.min_cursor();
        let mut record = m.record.clone();
        record.devices.push(device_key);
        let replicated = !record.replicas.is_empty();
        if replicated {
            record
                .device_signatures
                .push((device_key, owner_signature.to_vec()));
        }
        let key = m.key.clone();
        let mut ops = vec![self.record_ops(&sid, &key, &record)?];
        ops.push(self.cursor_op(&sid, &key, &device_key, start));
        self.store.write(ops, true)?;
        let m = self.mailbox_mut(mailbox)?;
        m.record = record;
        m.cursors.insert(device_key, start);
        if replicated {
            self.announce_record(&sid);
        }
        Ok(())
    }

    /// Removes a device (not the owner's). Messages only it had not acknowledged are
    /// deleted if every remaining device has.
    /// In a replicated mailbox the removal reaches the other replicas.
    pub fn remove_device(&mut self, mailbox: &MailboxId, device_key: &[u8; 32]) -> Result<()> {
        self.remove_device_here(mailbox, device_key)?;
        let sid = self.master.storage_id(mailbox);
        if let Some(m) = self.mailboxes.get(&sid) {
            for peer in self.peers_of(m) {
                self.outputs.push_back(Output::Replica {
                    peer,
                    message: ReplicaMessage::RemoveDevice {
                        mailbox_id: *mailbox,
                        device: *device_key,
                    },
                });
            }
        }
        Ok(())
    }

    fn remove_device_here(&mut self, mailbox: &MailboxId, device_key: &[u8; 32]) -> Result<()> {
        self.check_writable()?;
        self.load_mailbox(mailbox)?;
        let m = self.mailbox(mailbox)?;
        if &m.record.owner_key == device_key {
            return Err(MailboxError::InvalidArgument(
                "the owner key cannot be removed",
            ));
        }
        if !m.has_device(device_key) {
            return Err(MailboxError::UnknownDevice);
        }
        let sid = m.sid;
        let mut record = m.record.clone();
        record.devices.retain(|d| d != device_key);
        record.device_signatures.retain(|(d, _)| d != device_key);
        Self::remember_removed(&mut record, device_key, self.config.devices_removed_max);
        let mut cursors = m.cursors.clone();
        cursors.remove(device_key);
        let old_min = m.min_cursor();
        let new_min = cursors.values().copied().min().unwrap_or(0);
        // Messages the remaining devices all acknowledged (some at peer replicas).
        let done: Vec<u64> = m
            .messages
            .range(new_min.saturating_add(1)..)
            .filter(|(seq, i)| Self::fully_acked(&record.devices, &cursors, **seq, i))
            .map(|(seq, _)| *seq)
            .collect();
        let key = m.key.clone();
        let prefix = m.body_prefix;
        let mut ops = vec![self.record_ops(&sid, &key, &record)?];
        ops.push(Op::Delete {
            cf: Cf::Mailboxes,
            key: cursor_key(&sid, &key, device_key),
        });
        if new_min > old_min {
            ops.extend(Self::delete_through_ops(&sid, &prefix, new_min));
        }
        for seq in &done {
            ops.extend(Self::delete_message_ops(&sid, &prefix, *seq));
        }
        self.store.write(ops, true)?;
        let m = self.mailbox_mut(mailbox)?;
        m.record = record;
        m.cursors = cursors;
        Self::forget_through(m, new_min);
        for seq in done {
            if let Some(info) = m.messages.remove(&seq) {
                m.bytes = m.bytes.saturating_sub(info.value_len);
            }
        }
        Ok(())
    }

    /// Adds `device_key` to the record's removed devices, forgetting the oldest past `max`.
    fn remember_removed(record: &mut Record, device_key: &[u8; 32], max: usize) {
        record.removed_devices.retain(|d| d != device_key);
        record.removed_devices.push(*device_key);
        let excess = record.removed_devices.len().saturating_sub(max.max(1));
        record.removed_devices.drain(..excess);
    }

    /// A peer replica removed `device_key`, which is not registered here (yet): remembers the
    /// removal, so that a late copy of its registration is refused.
    fn remember_removed_here(&mut self, mailbox: &MailboxId, device_key: &[u8; 32]) -> Result<()> {
        self.check_writable()?;
        let m = self.mailbox(mailbox)?;
        if m.record.removed_devices.contains(device_key) || &m.record.owner_key == device_key {
            return Ok(());
        }
        let (sid, key) = (m.sid, m.key.clone());
        let mut record = m.record.clone();
        Self::remember_removed(&mut record, device_key, self.config.devices_removed_max);
        let op = self.record_ops(&sid, &key, &record)?;
        self.store.write(vec![op], true)?;
        self.mailbox_mut(mailbox)?.record = record;
        Ok(())
    }

    fn forget_through(m: &mut Mailbox, seq: u64) {
        let keep = m.messages.split_off(&seq.saturating_add(1));
        let gone = std::mem::replace(&mut m.messages, keep);
        for info in gone.values() {
            m.bytes = m.bytes.saturating_sub(info.value_len);
        }
    }

    fn cursor_op(&mut self, sid: &StorageId, key: &DataKey, device: &[u8; 32], seq: u64) -> Op {
        let k = cursor_key(sid, key, device);
        let mut plain = seq.to_be_bytes().to_vec();
        plain.extend_from_slice(device);
        let value = key.seal(&mut self.rng, &[b"cur", &k], &plain);
        Op::Put {
            cf: Cf::Mailboxes,
            key: k,
            value,
        }
    }

    /// Stores a batch of incoming messages with one synced write (group commit) and returns
    /// one result per input, in order. Redeliveries of a stored deposit are acknowledged
    /// again and not stored twice. Acks (for deposits that carry a SURB) are output only
    /// after the write is durable; nothing changes in memory if the write fails.
    ///
    /// The same as [`Self::prepare_deposits`], the synced write of its ops, then
    /// [`Self::finish_deposits`]; a driver that splits the three can prepare the next batch
    /// while this one's write is in flight.
    pub fn deposit_many(
        &mut self,
        now: UnixTime,
        incoming: Vec<Incoming>,
    ) -> Vec<Result<DepositReceipt>> {
        let mut batch = self.prepare_deposits(now, incoming);
        let ops = batch.take_ops();
        let written = if ops.is_empty() {
            Ok(())
        } else {
            self.store.write(ops, true)
        };
        self.finish_deposits(now, batch, written)
    }

    /// First half of [`Self::deposit_many`]: checks every incoming message (access, dedup,
    /// quotas, rate limits, expiry), reserves sequence numbers and seals what is stored, and
    /// returns the batch of writes. Reads the store (dedup lookups, a mailbox's first load)
    /// but writes nothing, and changes no state a caller sees: the messages, counters and
    /// acks come with [`Self::finish_deposits`], once the driver has written
    /// [`DepositBatch::take_ops`] with `sync`.
    ///
    /// Several batches may be prepared before the first is finished (a driver pipelining
    /// its group commits): each sees the sequence numbers, quota use and dedup ids of the
    /// earlier ones, and a redelivery of a deposit still in an earlier batch gets that
    /// deposit's answer, which stands only if that batch's write succeeds too. They must be
    /// finished in the order they were prepared, and between the preparation of a batch and
    /// its finish the driver must call nothing else that writes (the node's driver holds
    /// every other call of the core until no batch is open).
    pub fn prepare_deposits(&mut self, now: UnixTime, incoming: Vec<Incoming>) -> DepositBatch {
        let mut batch = self.new_deposit_batch();
        self.extend_deposits(now, &mut batch, incoming);
        batch
    }

    /// An empty deposit batch, open from now until [`Self::finish_deposits`]; fill it with
    /// [`Self::extend_deposits`] (a driver can add deposits as they arrive while the previous
    /// batch is being written, and write this one when the writer is free).
    pub fn new_deposit_batch(&mut self) -> DepositBatch {
        let number = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        self.open_batches += 1;
        DepositBatch {
            number,
            ops: Vec::new(),
            pending: BTreeMap::new(),
            new_ids: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Prepares `incoming` into `batch` (see [`Self::prepare_deposits`]): its results come
    /// after those already in the batch.
    pub fn extend_deposits(
        &mut self,
        now: UnixTime,
        batch: &mut DepositBatch,
        incoming: Vec<Incoming>,
    ) {
        batch.items.reserve(incoming.len());
        if self.store.is_poisoned() || self.batch_failed {
            for _ in &incoming {
                batch
                    .items
                    .push(Self::refuse(crate::store::StoreError::Poisoned.into()));
            }
            return;
        }
        for item in incoming {
            let prepared = self.prepare(now, item, batch);
            batch.items.push(prepared);
        }
    }

    /// Second half of [`Self::deposit_many`]: `written` is the outcome of the synced write
    /// of `batch`'s ops (`Ok` when it had none). On success the batch's messages join
    /// their mailboxes and acks and pushes to peer replicas are output; on failure every
    /// result that needed the write becomes the error, and nothing changes in memory.
    /// Returns one result per input of [`Self::prepare_deposits`], in order.
    pub fn finish_deposits(
        &mut self,
        now: UnixTime,
        batch: DepositBatch,
        written: std::result::Result<(), crate::store::StoreError>,
    ) -> Vec<Result<DepositReceipt>> {
        self.open_batches = self.open_batches.saturating_sub(1);
        // The batch's reservations end here, whether its write succeeded or not.
        for (sid, p) in &batch.pending {
            if let Some(f) = self.inflight.get_mut(sid) {
                f.count = f.count.saturating_sub(p.added.len() as u64);
                f.bytes = f.bytes.saturating_sub(p.bytes);
                if f.count == 0 {
                    self.inflight.remove(sid);
                }
            }
        }
        for key in &batch.new_ids {
            self.inflight_ids.remove(key);
        }
        let mut results: Vec<Result<DepositReceipt>> = Vec::with_capacity(batch.items.len());
        let mut acks: Vec<(usize, Surb, DedupId)> = Vec::new();
        let mut replicate = Vec::with_capacity(batch.items.len());
        let failure = match written {
            Err(e) => {
                self.batch_failed = true;
                Some(e.to_string())
            }
            Ok(()) => None,
        };
        let earlier_failed = self.batch_failed;
        for prepared in batch.items {
            let mut result = prepared.result;
            if result.is_ok() {
                if let (Some(message), true) = (&failure, prepared.needs_write) {
                    result = Err(crate::store::StoreError::Backend(message.clone()).into());
                } else if prepared.after_earlier && earlier_failed {
                    result = Err(crate::store::StoreError::Poisoned.into());
                }
            }
            if let (Ok(_), Some(surb)) = (&result, prepared.surb) {
                acks.push((results.len(), surb, prepared.dedup));
            }
            replicate.push(prepared.replicate);
            results.push(result);
        }
        if failure.is_some() {
            return results;
        }
        // Durable: apply in memory, then output sweeps and acks.
        let bucket_ms = self.config.expiry_bucket_ms;
        let mut buckets = BTreeSet::new();
        for (sid, p) in batch.pending {
            if let Some(m) = self.mailboxes.get_mut(&sid) {
                if let Some(next) = p.next_seq {
                    m.next_seq = m.next_seq.max(next);
                }
                for (seq, info) in p.added {
                    buckets.insert(bucket_of(info.expires_at, bucket_ms));
                    m.messages.insert(seq, info);
                }
                m.bytes = m.bytes.saturating_add(p.bytes);
            }
        }
        for at in buckets {
            self.want_sweep(at);
        }
        // Replicated mailboxes: push to the peers; receipts wait for the write quorum.
        let mut held_ids: BTreeSet<usize> = BTreeSet::new();
        let mut pushes: BTreeMap<StorageId, Vec<whispr_protocol::replica::PushItem>> =
            BTreeMap::new();
        for (index, r) in replicate.into_iter().enumerate() {
            let (Some((sid, item)), Some(Ok(receipt))) = (r, results.get(index)) else {
                continue;
            };
            let item = match item {
                Some(item) => Some(item),
                None => self.push_item_of(&sid, receipt.seq).unwrap_or(None),
            };
            // A redelivery of a message already delivered and deleted: receipt now.
            let Some(item) = item else { continue };
            held_ids.insert(index);
            let list = pushes.entry(sid).or_default();
            if !list.iter().any(|i| i.id == item.id) {
                list.push(item);
            }
        }
        for (index, surb, dedup_id) in acks {
            if let Some(Ok(receipt)) = results.get(index) {
                let reply = Reply::DepositAck {
                    dedup_id,
                    expires_at: receipt.expires_at,
                };
                if held_ids.contains(&index) {
                    let sid = self.master.storage_id(&receipt.mailbox_id);
                    self.hold_receipt(now, sid, dedup_id.0, surb, reply);
                } else {
                    self.outputs.push_back(Output::Reply { surb, reply });
                }
            }
        }
        for (sid, items) in pushes {
            self.push_to_peers(&sid, items);
        }
        results
    }

    fn refuse(error: MailboxError) -> Prepared {
        Prepared {
            result: Err(error),
            surb: None,
            dedup: DedupId([0u8; 16]),
            needs_write: false,
            after_earlier: false,
            replicate: None,
        }
    }

    /// Checks one incoming message and appends its writes to `batch`.
    fn prepare(&mut self, now: UnixTime, item: Incoming, batch: &mut DepositBatch) -> Prepared {
        let (mailbox_id, dedup, requested, surb, kind, body) = match item {
            Incoming::Deposit(envelope) => {
                let sid = self.master.storage_id(&envelope.outer.mailbox_id);
                let Some(m) = self.mailboxes.get(&sid) else {
                    return Self::refuse(MailboxError::UnknownMailbox);
                };
                if !access_ok(&m.record.access_key_hash, &envelope.outer.access_token) {
                    return Self::refuse(MailboxError::Unauthorized("access token"));
                }
                let mut stored = envelope.clone();
                stored.outer.access_token = AccessToken([0u8; 32]);
                stored.outer.ack_surb = None;
                (
                    envelope.outer.mailbox_id,
                    envelope.outer.dedup_id,
                    envelope.outer.expires_at,
                    envelope.outer.ack_surb,
                    KIND_ENVELOPE,
                    stored.encode(),
                )
            }
            Incoming::SurbReply {
                mailbox_id,
                surb_id,
                payload,
            } => {
                let sid = self.master.storage_id(&mailbox_id);
                let Some(m) = self.mailboxes.get(&sid) else {
                    return Self::refuse(MailboxError::UnknownMailbox);
                };
                let authorised = m
                    .record
                    .reply_key
                    .is_some_and(|k| ReplyKey(k).verify_surb_id(&mailbox_id, &surb_id));
                if !authorised {
                    return Self::refuse(MailboxError::Unauthorized(
                        "surb id not minted for this mailbox",
                    ));
                }
                if payload.len() > self.config.reply_bytes_max {
                    return Self::refuse(MailboxError::InvalidArgument("surb reply too large"));
                }
                let mut body = surb_id.as_bytes().to_vec();
                body.extend_from_slice(&payload);
                (
                    mailbox_id,
                    DedupId(surb_id.0),
                    None,
                    None,
                    KIND_SURB_REPLY,
                    body,
                )
            }
        };
        let sid = self.master.storage_id(&mailbox_id);
        if let Err(e) = self.ensure_loaded(&sid) {
            return Self::refuse(e);
        }
        let replicated = self
            .mailboxes
            .get(&sid)
            .is_some_and(|m| !m.record.replicas.is_empty());
        let duplicate =
            |seq: u64, expires_at: u64, needs_write: bool, after_earlier: bool| Prepared {
                result: Ok(DepositReceipt {
                    mailbox_id,
                    seq,
                    expires_at: UnixTime(expires_at),
                    duplicate: true,
                }),
                surb: surb.clone(),
                dedup,
                needs_write,
                after_earlier,
                replicate: replicated.then_some((sid, None)),
            };
        // Redelivery of a deposit in this batch or an earlier one not finished yet: stands or
        // falls with the first copy.
        if let Some((seq, expires_at, number)) = self.inflight_ids.get(&(sid, dedup.0)) {
            return duplicate(*seq, *expires_at, true, *number != batch.number);
        }
        // Redelivery of a stored deposit.
        match self.store.get(Cf::Dedup, &dedup_key(&sid, &dedup)) {
            Err(e) => return Self::refuse(e.into()),
            Ok(Some(v)) => {
                let (Some(seq), Some(expires_at)) = (u64_at(&v, 0), u64_at(&v, 8)) else {
                    return Self::refuse(MailboxError::Corrupt("dedup entry"));
                };
                return duplicate(seq, expires_at, false, false);
            }
            Ok(None) => {}
        }
        let config = &self.config;
        let Some(m) = self.mailboxes.get_mut(&sid) else {
            return Self::refuse(MailboxError::UnknownMailbox);
        };
        // Expiry: the requested one, capped by the mailbox's retention and the node maximum.
        let cap = now
            .0
            .saturating_add(m.record.retention_ms.min(config.retention_ms_max));
        let expires_at = match requested {
            Some(t) if t.0 <= now.0 => return Self::refuse(MailboxError::AlreadyExpired),
            // A sender's own expiry (a disappearing message) is kept as asked: rounded up, the
            // message would outlive the time its sender chose. It gives the node that choice,
            // not the arrival time.
            Some(t) if t.0 < cap => t.0,
            // The node's retention, stored in clear: rounded up so that it does not give the
            // arrival time.
            _ => bucket_of(cap, config.expiry_granularity_ms),
        };
        // What the open batches (this one included) already add to the mailbox.
        let (open_count, open_bytes, open_next) = self
            .inflight
            .get(&sid)
            .map_or((0, 0, 0), |f| (f.count, f.bytes, f.next_seq));
        let count = (m.messages.len() as u64).saturating_add(open_count);
        if count >= config.mailbox_messages_max {
            return Self::refuse(MailboxError::QuotaExceeded {
                what: "messages per mailbox",
            });
        }
        let value_len = (8 + crate::crypto::SEAL_OVERHEAD + 9 + body.len()) as u64;
        if m.bytes.saturating_add(open_bytes).saturating_add(value_len) > config.mailbox_bytes_max {
            return Self::refuse(MailboxError::QuotaExceeded {
                what: "bytes per mailbox",
            });
        }
        if let Err(retry_after_ms) = m.deposits.take(now, config.deposits_per_min) {
            return Self::refuse(MailboxError::RateLimited {
                what: "deposits per mailbox",
                retry_after_ms,
            });
        }
        let seq = m.next_seq.max(open_next);
        let p = batch.pending.entry(sid).or_default();
        p.next_seq = Some(seq.saturating_add(1));
        let ekey = envelope_key(&sid, seq);
        let mut plain = Vec::with_capacity(9 + body.len());
        plain.extend_from_slice(&now.0.to_be_bytes());
        plain.push(kind);
        plain.extend_from_slice(&body);
        let sealed = m.key.seal(&mut self.rng, &[b"env", &ekey], &plain);
        let value_len = envelope_puts(
            &mut batch.ops,
            ekey,
            body_key(&m.body_prefix, seq),
            expires_at,
            &dedup.0,
            sealed,
            self.inline_bodies,
        );
        let info = MessageInfo {
            value_len,
            expires_at,
            id: dedup.0,
            acked: Vec::new(),
        };
        p.bytes = p.bytes.saturating_add(info.value_len);
        let reserved = self.inflight.entry(sid).or_insert(Inflight {
            next_seq: 0,
            count: 0,
            bytes: 0,
        });
        reserved.next_seq = seq.saturating_add(1);
        reserved.count = reserved.count.saturating_add(1);
        reserved.bytes = reserved.bytes.saturating_add(info.value_len);
        p.added.push((seq, info));
        let mut dedup_value = Vec::with_capacity(16);
        dedup_value.extend_from_slice(&seq.to_be_bytes());
        dedup_value.extend_from_slice(&expires_at.to_be_bytes());
        batch.ops.push(Op::Put {
            cf: Cf::Dedup,
            key: dedup_key(&sid, &dedup),
            value: dedup_value,
        });
        batch.ops.push(Op::Put {
            cf: Cf::Expiry,
            key: expiry_key(expires_at, &sid, seq),
            value: dedup.as_bytes().to_vec(),
        });
        self.inflight_ids
            .insert((sid, dedup.0), (seq, expires_at, batch.number));
        batch.new_ids.push((sid, dedup.0));
        Prepared {
            result: Ok(DepositReceipt {
                mailbox_id,
                seq,
                expires_at: UnixTime(expires_at),
                duplicate: false,
            }),
            surb,
            dedup,
            needs_write: true,
            after_earlier: false,
            replicate: replicated.then_some((
                sid,
                Some(whispr_protocol::replica::PushItem {
                    id: dedup.0,
                    kind: if kind == KIND_ENVELOPE {
                        whispr_protocol::replica::MessageKind::Envelope
                    } else {
                        whispr_protocol::replica::MessageKind::SurbReply
                    },
                    expires_at: UnixTime(expires_at),
                    body,
                }),
            )),
        }
    }

    /// Messages for `device` after `after` (and after the device's acknowledged cursor), at
    /// most `limit`, skipping anything expired at `now`.
    pub fn fetch(
        &self,
        now: UnixTime,
        mailbox: &MailboxId,
        device: &[u8; 32],
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let m = self.view(mailbox)?;
        let m = &*m;
        let cursor = *m.cursors.get(device).ok_or(MailboxError::UnknownDevice)?;
        let last = m.next_seq.saturating_sub(1);
        let after = after.unwrap_or(0);
        if after > last {
            return Err(MailboxError::BadCursor("after is beyond the last message"));
        }
        let start = after.max(cursor).saturating_add(1);
        let limit = limit.clamp(1, self.config.fetch_limit_max);
        let mut out = Vec::new();
        for (seq, info) in m.messages.range(start..) {
            if out.len() >= limit {
                break;
            }
            if info.expires_at <= now.0 || info.acked.contains(device) {
                continue;
            }
            if let Some(message) = self.read_message(m, *seq)? {
                out.push(message);
            }
        }
        Ok(out)
    }

    /// The last sequence number assigned in `mailbox`.
    pub fn last_seq(&self, mailbox: &MailboxId) -> Result<u64> {
        Ok(self.view(mailbox)?.next_seq.saturating_sub(1))
    }

    fn read_message(&self, m: &Mailbox, seq: u64) -> Result<Option<StoredMessage>> {
        let ekey = envelope_key(&m.sid, seq);
        let Some(value) = self.store.get(Cf::Envelopes, &ekey)? else {
            return Ok(None);
        };
        let expires_at = u64_at(&value, 0).ok_or(MailboxError::Corrupt("envelope value"))?;
        let plain = if has_separate_body(&value) {
            let sealed = self
                .store
                .get(Cf::Bodies, &body_key(&m.body_prefix, seq))?
                .ok_or(MailboxError::Corrupt("envelope body missing"))?;
            m.key.open(&[b"env", &ekey], &sealed)?
        } else {
            m.key
                .open(&[b"env", &ekey], value.get(8..).unwrap_or_default())?
        };
        let received_at = u64_at(&plain, 0).ok_or(MailboxError::Corrupt("envelope value"))?;
        let body = plain.get(9..).unwrap_or_default();
        let body = match plain.get(8).copied() {
            Some(KIND_ENVELOPE) => MessageBody::Envelope(body.to_vec()),
            Some(KIND_SURB_REPLY) => {
                let (id, payload) = body
                    .split_at_checked(16)
                    .ok_or(MailboxError::Corrupt("surb reply"))?;
                MessageBody::SurbReply {
                    surb_id: SurbId::from_slice("surb id", id)
                        .map_err(|_| MailboxError::Corrupt("surb reply"))?,
                    payload: payload.to_vec(),
                }
            }
            _ => return Err(MailboxError::Corrupt("message kind")),
        };
        let id = m.messages.get(&seq).map_or([0; 16], |i| i.id);
        Ok(Some(StoredMessage {
            seq,
            id,
            received_at: UnixTime(received_at),
            expires_at: UnixTime(expires_at),
            body,
        }))
    }

    /// Acknowledges every message up to `up_to` for `device` (cumulative). Messages every
    /// device has acknowledged are deleted with one range delete, in the same synced write
    /// as the cursor. Acknowledging an older cursor again is a no-op.
    pub fn ack(&mut self, mailbox: &MailboxId, device: &[u8; 32], up_to: u64) -> Result<u64> {
        self.check_writable()?;
        self.load_mailbox(mailbox)?;
        let m = self.mailbox(mailbox)?;
        let cursor = *m.cursors.get(device).ok_or(MailboxError::UnknownDevice)?;
        if up_to >= m.next_seq {
            return Err(MailboxError::BadCursor("ack beyond the last message"));
        }
        if up_to <= cursor {
            return Ok(cursor);
        }
        let sid = m.sid;
        let key = m.key.clone();
        let old_min = m.min_cursor();
        let mut cursors = m.cursors.clone();
        cursors.insert(*device, up_to);
        let new_min = cursors.values().copied().min().unwrap_or(0);
        // What the device acknowledged now (told to the peer replicas), and the messages
        // above the new minimum cursor that every device has acknowledged by now (some
        // through peers).
        let newly: Vec<[u8; 16]> = m
            .messages
            .range(cursor.saturating_add(1)..up_to.saturating_add(1))
            .map(|(_, i)| i.id)
            .collect();
        let done: Vec<u64> = m
            .messages
            .range(new_min.saturating_add(1)..up_to.saturating_add(1))
            .filter(|(seq, i)| Self::fully_acked(&m.record.devices, &cursors, **seq, i))
            .map(|(seq, _)| *seq)
            .collect();
        let replicated = !m.record.replicas.is_empty();
        let prefix = m.body_prefix;
        let mut ops = vec![self.cursor_op(&sid, &key, device, up_to)];
        if new_min > old_min {
            ops.extend(Self::delete_through_ops(&sid, &prefix, new_min));
        }
        for seq in &done {
            ops.extend(Self::delete_message_ops(&sid, &prefix, *seq));
        }
        self.store.write(ops, true)?;
        let m = self.mailbox_mut(mailbox)?;
        m.cursors = cursors;
        Self::forget_through(m, new_min);
        for seq in done {
            if let Some(info) = m.messages.remove(&seq) {
                m.bytes = m.bytes.saturating_sub(info.value_len);
            }
        }
        if replicated {
            self.announce_acked(&sid, *device, newly);
        }
        Ok(up_to)
    }

    /// True when every registered device acknowledged message `seq` (by its cursor, or at
    /// a peer replica).
    fn fully_acked(
        devices: &[[u8; 32]],
        cursors: &BTreeMap<[u8; 32], u64>,
        seq: u64,
        info: &MessageInfo,
    ) -> bool {
        devices
            .iter()
            .all(|d| cursors.get(d).is_some_and(|c| *c >= seq) || info.acked.contains(d))
    }

    /// Deletes every message (and its peer acknowledgements) up to `seq`; dedup entries
    /// stay until expiry (tombstones).
    fn delete_through_ops(sid: &StorageId, prefix: &[u8; BODY_PREFIX_LEN], seq: u64) -> [Op; 3] {
        [
            Op::DeleteRange {
                cf: Cf::Envelopes,
                from: envelope_key(sid, 0),
                to: envelope_key(sid, seq.saturating_add(1)),
            },
            Op::DeleteRange {
                cf: Cf::Bodies,
                from: body_key(prefix, 0),
                to: body_key(prefix, seq.saturating_add(1)),
            },
            Op::DeleteRange {
                cf: Cf::Mailboxes,
                from: key_tag_bytes(sid, TAG_ACKS, &0u64.to_be_bytes()),
                to: key_tag_bytes(sid, TAG_ACKS, &seq.saturating_add(1).to_be_bytes()),
            },
        ]
    }

    /// Deletes one message and its peer acknowledgements; its dedup entry stays until
    /// expiry (a tombstone).
    fn delete_message_ops(sid: &StorageId, prefix: &[u8; BODY_PREFIX_LEN], seq: u64) -> [Op; 3] {
        [
            Op::Delete {
                cf: Cf::Envelopes,
                key: envelope_key(sid, seq),
            },
            Op::Delete {
                cf: Cf::Bodies,
                key: body_key(prefix, seq),
            },
            Op::Delete {
                cf: Cf::Mailboxes,
                key: key_tag_bytes(sid, TAG_ACKS, &seq.to_be_bytes()),
            },
        ]
    }

    /// Deletes what expired by `now` (at most `sweep_batch_max` messages per call, one
    /// write); returns how many. Call again while it returns a full batch.
    pub fn sweep_expired(&mut self, now: UnixTime) -> Result<usize> {
        self.check_writable()?;
        let mut doomed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let max = self.config.sweep_batch_max.max(1);
        let end = now.0.saturating_add(1).to_be_bytes();
        self.store.scan(Cf::Expiry, &[], &end, &mut |k, v| {
            doomed.push((k.to_vec(), v.to_vec()));
            if doomed.len() >= max {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        let mut ops = Vec::with_capacity(doomed.len() * 3 + 4);
        let mut gone: BTreeMap<StorageId, Vec<u64>> = BTreeMap::new();
        for (k, v) in &doomed {
            ops.push(Op::Delete {
                cf: Cf::Expiry,
                key: k.clone(),
            });
            let (Some(sid), Some(seq)) = (
                k.get(8..8 + SID_LEN)
                    .and_then(|b| <[u8; SID_LEN]>::try_from(b).ok()),
                u64_at(k, 8 + SID_LEN),
            ) else {
                continue;
            };
            let expires_at = u64_at(k, 0);
            // Delete only the records this entry was written for: a mailbox erased and
            // created again under the same id reuses its storage id and sequence numbers, and
            // the old mailbox's expiry entries must not delete the new one's messages.
            let ekey = envelope_key(&sid, seq);
            if self
                .store
                .get(Cf::Envelopes, &ekey)?
                .is_some_and(|v| u64_at(&v, 0) == expires_at)
            {
                ops.push(Op::Delete {
                    cf: Cf::Envelopes,
                    key: ekey,
                });
                // A body (if any) can only be named through the mailbox's data key; the
                // bodies of an erased mailbox went with its record.
                if let Some(m) = self.mailboxes.get(&sid) {
                    ops.push(Op::Delete {
                        cf: Cf::Bodies,
                        key: body_key(&m.body_prefix, seq),
                    });
                }
                ops.push(Op::Delete {
                    cf: Cf::Mailboxes,
                    key: key_tag_bytes(&sid, TAG_ACKS, &seq.to_be_bytes()),
                });
                gone.entry(sid).or_default().push(seq);
            }
            if let Ok(dedup) = DedupId::from_slice("dedup id", v) {
                let dkey = dedup_key(&sid, &dedup);
                if self
                    .store
                    .get(Cf::Dedup, &dkey)?
                    .is_some_and(|d| u64_at(&d, 0) == Some(seq))
                {
                    ops.push(Op::Delete {
                        cf: Cf::Dedup,
                        key: dkey,
                    });
                }
            }
        }
        // Sequence numbers never go back, even when every message of a mailbox is gone. A
        // mailbox not loaded yet knows only a lower bound of its next sequence number, which
        // the messages deleted here raise (what stays in the store is found at its load).
        for (sid, seqs) in &gone {
            if let Some(m) = self.mailboxes.get_mut(sid) {
                let deleted = seqs.iter().max().map_or(0, |s| s.saturating_add(1));
                m.next_seq = m.next_seq.max(deleted);
                ops.push(Op::Put {
                    cf: Cf::Mailboxes,
                    key: key2(sid, TAG_SEQ_FLOOR),
                    value: m.next_seq.to_be_bytes().to_vec(),
                });
            }
        }
        if !ops.is_empty() {
            self.store.write(ops, true)?;
        }
        for (sid, seqs) in gone {
            if let Some(m) = self.mailboxes.get_mut(&sid) {
                for seq in seqs {
                    if let Some(info) = m.messages.remove(&seq) {
                        m.bytes = m.bytes.saturating_sub(info.value_len);
                    }
                }
            }
        }
        let done = bucket_of(now.0.saturating_add(1), self.config.expiry_bucket_ms);
        if doomed.len() < max {
            // Everything due is gone: sweeps up to now are done.
            self.sweeps = self.sweeps.split_off(&done);
            while let Some(first) = self.sweeps.first().copied() {
                if first <= now.0 {
                    self.sweeps.remove(&first);
                } else {
                    break;
                }
            }
        }
        Ok(doomed.len())
    }

    /// Erases a mailbox: first its wrapped data key (one synced write: from then on its
    /// records cannot be decrypted), then every record. A crash between the two is finished
    /// at the next start.
    pub fn erase(&mut self, mailbox: &MailboxId) -> Result<()> {
        self.check_writable()?;
        let m = self.mailbox(mailbox)?;
        let sid = m.sid;
        let peers = self.peers_of(m);
        self.erase_sid(&sid)?;
        if !peers.is_empty() {
            self.remember_erased(sid)?;
        }
        for peer in peers {
            self.outputs.push_back(Output::Replica {
                peer,
                message: ReplicaMessage::Erase {
                    mailbox_id: *mailbox,
                },
            });
        }
        Ok(())
    }

    fn erase_sid(&mut self, sid: &StorageId) -> Result<()> {
        let sid = *sid;
        let mut first = vec![
            Op::Delete {
                cf: Cf::Mailboxes,
                key: key2(&sid, TAG_RECORD),
            },
            Op::Put {
                cf: Cf::Mailboxes,
                key: key2(&sid, TAG_ERASING),
                value: Vec::new(),
            },
        ];
        // The bodies go with the record (their keys derive from the data key it holds).
        if let Some(m) = self.mailboxes.get(&sid) {
            first.push(Op::DeleteRange {
                cf: Cf::Bodies,
                from: m.body_prefix.to_vec(),
                to: sid_end(&m.body_prefix),
            });
        }
        self.store.write(first, true)?;
        self.mailboxes.remove(&sid);
        self.forget_digest(&sid);
        let mut ops = Self::erase_ops(&sid);
        ops.extend(self.expiry_ops(&sid)?);
        self.store.write(ops, true)?;
        self.want_compaction(sid);
        Ok(())
    }

    fn want_compaction(&mut self, sid: StorageId) {
        if self.compact_all {
            return;
        }
        if self.compact_pending.len() >= COMPACT_PENDING_MAX {
            self.compact_pending.clear();
            self.compact_all = true;
        } else {
            self.compact_pending.insert(sid);
        }
    }

    /// The key ranges the driver should compact, bottom level included, so that erased
    /// mailboxes leave nothing on disk (a delete only shadows a value until a compaction
    /// drops both; RocksDB compacts on its own only as writes go on, so on a quiet node
    /// erased keys, expiry times included, would stay readable in the files indefinitely).
    /// Every erased mailbox's ranges in the families keyed by storage id, and the expiry
    /// family whole (its keys start with the time, not the storage id; it holds 40 bytes
    /// per message). Empty when nothing was erased since the last call.
    pub fn take_compaction(&mut self) -> Vec<CompactRange> {
        let mut out = Vec::new();
        if self.compact_all {
            for cf in Cf::ALL {
                out.push(CompactRange {
                    cf,
                    from: Vec::new(),
                    to: vec![0xff; 8 + SID_LEN + 9],
                });
            }
        } else {
            for sid in &self.compact_pending {
                for cf in [Cf::Mailboxes, Cf::Envelopes, Cf::Dedup, Cf::Prekeys] {
                    out.push(CompactRange {
                        cf,
                        from: sid.to_vec(),
                        to: sid_end(sid),
                    });
                }
            }
            if !self.compact_pending.is_empty() {
                out.push(CompactRange {
                    cf: Cf::Expiry,
                    from: Vec::new(),
                    to: vec![0xff; 8 + SID_LEN + 9],
                });
            }
        }
        self.compact_pending.clear();
        self.compact_all = false;
        out
    }

    /// Public facts about a mailbox for its owner.
    pub fn info(&self, mailbox: &MailboxId) -> Result<MailboxInfo> {
        Ok(Self::info_of(&*self.view(mailbox)?))
    }

    fn info_of(m: &Mailbox) -> MailboxInfo {
        MailboxInfo {
            mailbox_id: hex::encode(m.record.mailbox_id),
            mailbox_key: hex::encode(m.record.mailbox_key),
            owner_key: hex::encode(m.record.owner_key),
            retention_ms: m.record.retention_ms,
            created_at_ms: m.record.created_at_ms,
            devices: m
                .record
                .devices
                .iter()
                .map(|d| (hex::encode(d), m.cursors.get(d).copied().unwrap_or(0)))
                .collect(),
            messages: m.messages.len() as u64,
            bytes: m.bytes,
            last_seq: m.next_seq.saturating_sub(1),
        }
    }

    /// Everything stored for a mailbox, still sealed: its info and every message not
    /// expired at `now` (whatever the devices acknowledged but not yet deleted included).
    pub fn export(
        &self,
        now: UnixTime,
        mailbox: &MailboxId,
    ) -> Result<(MailboxInfo, Vec<StoredMessage>)> {
        let m = self.view(mailbox)?;
        let m = &*m;
        let info = Self::info_of(m);
        let mut messages = Vec::with_capacity(m.messages.len());
        for (seq, i) in &m.messages {
            if i.expires_at > now.0
                && let Some(message) = self.read_message(m, *seq)?
            {
                messages.push(message);
            }
        }
        Ok((info, messages))
    }

    /// Replaces the mailbox's prekeys with `upload`, after checking every owner signature.
    pub fn put_prekeys(&mut self, mailbox: &MailboxId, upload: PrekeyUpload) -> Result<usize> {
        self.check_writable()?;
        if upload.prekeys.len() > self.config.prekeys_max {
            return Err(MailboxError::QuotaExceeded {
                what: "prekeys per mailbox",
            });
        }
        let m = self.mailbox(mailbox)?;
        let owner = VerifyingKey::from_bytes(&m.record.owner_key)
            .map_err(|_| MailboxError::Corrupt("owner key"))?;
        verify_identity(
            &owner,
            mailbox,
            &upload.identity_key,
            &upload.identity_signature,
        )
        .map_err(|_| MailboxError::BadSignature("identity key"))?;
        let mut fallback = None;
        let mut ids = BTreeSet::new();
        for p in &upload.prekeys {
            p.verify(&owner, mailbox)
                .map_err(|_| MailboxError::BadSignature("prekey"))?;
            if p.fallback {
                if fallback.is_some() {
                    return Err(MailboxError::InvalidArgument("more than one fallback key"));
                }
                fallback = Some((p.key_id, p.key, p.signature.to_vec()));
            } else if !ids.insert(p.key_id) {
                return Err(MailboxError::InvalidArgument("duplicate prekey id"));
            }
        }
        let sid = m.sid;
        let key = m.key.clone();
        let end = sid_end(&sid);
        let identity = PrekeyIdentity {
            identity_key: upload.identity_key,
            identity_signature: upload.identity_signature.to_vec(),
            fallback,
        };
        let plain =
            serde_json::to_vec(&identity).map_err(|_| MailboxError::Corrupt("prekey encoding"))?;
        let ikey = key2(&sid, TAG_PREKEY_IDENTITY);
        let mut ops = vec![
            Op::DeleteRange {
                cf: Cf::Prekeys,
                from: sid.to_vec(),
                to: end,
            },
            Op::Put {
                cf: Cf::Prekeys,
                value: key.seal(&mut self.rng, &[b"pki", &ikey], &plain),
                key: ikey,
            },
        ];
        let mut count = 0;
        for p in upload.prekeys.iter().filter(|p| !p.fallback) {
            let k = key_tag_bytes(&sid, TAG_PREKEY_ONE_TIME, &p.key_id.to_be_bytes());
            let mut plain = p.key.to_vec();
            plain.extend_from_slice(&p.signature);
            ops.push(Op::Put {
                cf: Cf::Prekeys,
                value: key.seal(&mut self.rng, &[b"pk1", &k], &plain),
                key: k,
            });
            count += 1;
        }
        self.store.write(ops, true)?;
        Ok(count)
    }

    /// Number of one-time prekeys left.
    pub fn prekeys_left(&self, mailbox: &MailboxId) -> Result<usize> {
        let m = self.mailbox(mailbox)?;
        let from = key2(&m.sid, TAG_PREKEY_ONE_TIME);
        let to = key2(&m.sid, TAG_PREKEY_ONE_TIME + 1);
        let mut n = 0;
        self.store.scan(Cf::Prekeys, &from, &to, &mut |_, _| {
            n += 1;
            ControlFlow::Continue(())
        })?;
        Ok(n)
    }

    /// Answers an anonymous prekey request (from the mesh): checks the access token and the
    /// deposit rate limit, consumes the lowest-numbered one-time prekey (or serves the
    /// fallback key when none is left) and outputs the bundle as a SURB reply.
    pub fn handle_prekey_request(&mut self, now: UnixTime, request: PrekeyRequest) -> Result<()> {
        self.check_writable()?;
        let per_min = self.config.deposits_per_min;
        let m = self.mailbox_mut(&request.mailbox_id)?;
        if !access_ok(&m.record.access_key_hash, &request.access_token) {
            return Err(MailboxError::Unauthorized("access token"));
        }
        if let Err(retry_after_ms) = m.deposits.take(now, per_min) {
            return Err(MailboxError::RateLimited {
                what: "deposits per mailbox",
                retry_after_ms,
            });
        }
        let m = self.mailbox(&request.mailbox_id)?;
        let ikey = key2(&m.sid, TAG_PREKEY_IDENTITY);
        let Some(sealed) = self.store.get(Cf::Prekeys, &ikey)? else {
            return Err(MailboxError::InvalidArgument(
                "the owner has uploaded no prekeys",
            ));
        };
        let identity: PrekeyIdentity =
            serde_json::from_slice(&m.key.open(&[b"pki", &ikey], &sealed)?)
                .map_err(|_| MailboxError::Corrupt("prekey identity"))?;
        let from = key2(&m.sid, TAG_PREKEY_ONE_TIME);
        let to = key2(&m.sid, TAG_PREKEY_ONE_TIME + 1);
        let mut first: Option<(Vec<u8>, Vec<u8>)> = None;
        self.store.scan(Cf::Prekeys, &from, &to, &mut |k, v| {
            first = Some((k.to_vec(), v.to_vec()));
            ControlFlow::Break(())
        })?;
        let sig64 = |v: &[u8]| <[u8; 64]>::try_from(v).map_err(|_| MailboxError::Corrupt("sig"));
        let prekey = match first {
            Some((k, v)) => {
                let plain = m.key.open(&[b"pk1", &k], &v)?;
                let (key, sig) = plain
                    .split_at_checked(32)
                    .ok_or(MailboxError::Corrupt("prekey"))?;
                let key_id = k
                    .get(SID_LEN + 1..)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .ok_or(MailboxError::Corrupt("prekey key"))?;
                let prekey = SignedPrekey {
                    key_id,
                    key: <[u8; 32]>::try_from(key).map_err(|_| MailboxError::Corrupt("prekey"))?,
                    fallback: false,
                    signature: sig64(sig)?,
                };
                // Consumed before it is sent: a one-time key is never served twice.
                self.store.write(
                    vec![Op::Delete {
                        cf: Cf::Prekeys,
                        key: k,
                    }],
                    true,
                )?;
                Some(prekey)
            }
            None => match &identity.fallback {
                Some((key_id, key, sig)) => Some(SignedPrekey {
                    key_id: *key_id,
                    key: *key,
                    fallback: true,
                    signature: sig64(sig)?,
                }),
                None => None,
            },
        };
        let m = self.mailbox(&request.mailbox_id)?;
        let bundle = PrekeyBundle {
            owner_key: m.record.owner_key,
            identity_key: identity.identity_key,
            identity_signature: sig64(&identity.identity_signature)?,
            prekey,
        };
        self.outputs.push_back(Output::Reply {
            surb: request.reply_surb,
            reply: Reply::Prekeys(bundle),
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const REPLY_KEY: [u8; 32] = [0xa7; 32];
    const ACCESS_KEY_HASH: [u8; 32] = [0x5c; 32];

    /// Asserts that `printed` carries no form of the secrets (hex, or the byte list `Debug`
    /// prints for an array).
    fn assert_redacted(printed: &str) {
        for secret in [REPLY_KEY, ACCESS_KEY_HASH] {
            assert!(!printed.contains(&hex::encode(secret)), "{printed}");
            let bytes = format!("{:?}", secret);
            assert!(!printed.contains(&bytes[1..bytes.len() - 1]), "{printed}");
            assert!(
                !printed.contains(&format!("{}, {}", secret[0], secret[1])),
                "{printed}"
            );
        }
    }

    /// Security review 6756e3f, finding 15: no secret in any `Debug`.
    #[test]
    fn a_create_request_and_a_record_print_no_reply_key_or_access_key_hash() {
        let request = CreateMailbox {
            mailbox_id: MailboxId([1; 32]),
            mailbox_key: [2; 32],
            owner_key: [3; 32],
            access_key_hash: ACCESS_KEY_HASH,
            reply_key: Some(REPLY_KEY),
            retention_ms: 1,
            signature: [4; 64],
        };
        assert_redacted(&format!("{request:?}"));
        assert_redacted(&format!("{request:#?}"));
        let record = Record {
            mailbox_id: [1; 32],
            mailbox_key: [2; 32],
            owner_key: [3; 32],
            access_key_hash: ACCESS_KEY_HASH,
            reply_key: Some(REPLY_KEY),
            retention_ms: 1,
            created_at_ms: 2,
            devices: vec![[3; 32]],
            used: true,
            replicas: Vec::new(),
            create_signature: Vec::new(),
            device_signatures: Vec::new(),
            removed_devices: Vec::new(),
        };
        assert_redacted(&format!("{record:?}"));
        assert_redacted(&format!("{record:#?}"));
        // A session's token hash (sessions are looked up by it).
        let session = crate::auth::Session {
            mailbox: MailboxId([1; 32]),
            device: [3; 32],
            expires_at: UnixTime(5),
            token_hash: ACCESS_KEY_HASH,
        };
        assert_redacted(&format!("{session:?}"));
        // The HTTP bodies that carry them.
        let body = whispr_protocol::mailbox_api::CreateMailboxRequest {
            mailbox_id: hex::encode([1; 32]),
            mailbox_key: hex::encode([2; 32]),
            owner_key: hex::encode([3; 32]),
            access_key_hash: hex::encode(ACCESS_KEY_HASH),
            reply_key: Some(hex::encode(REPLY_KEY)),
            retention_ms: 1,
            signature: hex::encode([4; 64]),
            replicas: None,
        };
        assert_redacted(&format!("{body:?}"));
        let token = crate::http::TokenResponse {
            token: hex::encode(ACCESS_KEY_HASH),
            expires_at_ms: 1,
        };
        assert_redacted(&format!("{token:?}"));
    }
}
