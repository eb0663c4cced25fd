//! The messages mailbox replicas exchange over the mesh's node-to-node channel
//! (`docs/replication.md`): deposits pushed by the entry replica, their acknowledgements, the
//! owner's acknowledgements, anti-entropy (digests, id lists, pulls), record repair (the
//! owner-signed create request and device registrations), device removal and erasure.
//!
//! Byte format (all integers big-endian): `version (u8) = 1 ‖ tag (u8) ‖ fields`. Lists are a
//! `u16` count then the items; byte strings a `u32` length then the bytes. Every count and
//! length has an explicit bound below, and the whole message [`REPLICA_MESSAGE_MAX`].
//! [`ReplicaMessage::decode`] takes untrusted bytes and returns a typed [`ReplicaError`],
//! never panics (fuzz target `replica`).

use crate::mailbox_api::REPLICAS_MAX;
use crate::{MailboxId, NodeId, UnixTime};

/// Format version.
pub const REPLICA_VERSION: u8 = 1;
/// Largest encoded message. Senders split their pushes and lists to stay below it.
pub const REPLICA_MESSAGE_MAX: usize = 1024 * 1024;
/// Most items in one push.
pub const PUSH_ITEMS_MAX: usize = 256;
/// Largest message body carried (a sealed envelope or SURB reply is a few KiB).
pub const BODY_MAX: usize = 64 * 1024;
/// Most ids in one list (acks, pulls, anti-entropy lists).
pub const IDS_MAX: usize = 8192;
/// Most mailboxes in one digest or record request.
pub const MAILBOXES_MAX: usize = 1024;
/// Buckets of a [`ReplicaMessage::Summary`]: a mailbox falls in the bucket of its id's first
/// byte.
pub const SUMMARY_BUCKETS: usize = 256;
/// Most records in one record response.
pub const RECORDS_MAX: usize = 64;
/// Most device registrations carried per record.
pub const DEVICES_MAX: usize = 32;

/// A message id: the envelope's dedup id, or the first 16 bytes of a SURB reply's SURB id.
pub type ItemId = [u8; 16];

/// What a replicated message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A sealed envelope (as stored: the encoded envelope without access token and ack SURB).
    Envelope,
    /// A SURB reply (`surb id ‖ sealed reply`).
    SurbReply,
}

/// One message copied to a replica.
#[derive(Clone, PartialEq, Eq)]
pub struct PushItem {
    /// Message id.
    pub id: ItemId,
    /// What it is.
    pub kind: MessageKind,
    /// Absolute expiry, set by the entry replica.
    pub expires_at: UnixTime,
    /// The stored body (sealed to the owner).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for PushItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushItem")
            .field("kind", &self.kind)
            .field("len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl PushItem {
    /// Bytes this item takes in an encoded push.
    pub fn encoded_len(&self) -> usize {
        16 + 1 + 8 + 4 + self.body.len()
    }
}

/// A mailbox's anti-entropy digest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DigestEntry {
    /// The mailbox.
    pub mailbox_id: MailboxId,
    /// SHA-256 over its sorted (id, live or gone) entries not expired.
    pub digest: [u8; 32],
}

impl std::fmt::Debug for DigestEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestEntry(..)")
    }
}

/// An id with its absolute expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdEntry {
    /// Message id.
    pub id: ItemId,
    /// When it expires.
    pub expires_at: UnixTime,
}

/// The owner-signed create request of a replicated mailbox (the fields of the v2 transcript,
/// [`crate::mailbox_api::create_transcript_v2`], and the owner's signature over it).
#[derive(Clone, PartialEq, Eq)]
pub struct SignedCreate {
    /// Mailbox id.
    pub mailbox_id: MailboxId,
    /// HPKE public key.
    pub mailbox_key: [u8; 32],
    /// Owner Ed25519 key.
    pub owner_key: [u8; 32],
    /// SHA-256 of the access key.
    pub access_key_hash: [u8; 32],
    /// Reply key (secret; replicas already hold it).
    pub reply_key: Option<[u8; 32]>,
    /// Retention.
    pub retention_ms: u64,
    /// The replica set (1..=[`REPLICAS_MAX`]).
    pub replicas: Vec<NodeId>,
    /// Owner signature over the v2 transcript.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedCreate")
            .field("replicas", &self.replicas.len())
            .finish_non_exhaustive()
    }
}

/// A device registration signed by the owner
/// ([`crate::mailbox_api::device_transcript`]).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceRegistration {
    /// The device key.
    pub device_key: [u8; 32],
    /// The owner's signature.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for DeviceRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceRegistration(..)")
    }
}

/// What a replica hands a peer repairing a mailbox record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordCopy {
    /// The signed create request.
    pub create: SignedCreate,
    /// The owner-signed registrations of the devices other than the owner key.
    pub devices: Vec<DeviceRegistration>,
}

/// A message between the replicas of a mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaMessage {
    /// Messages to store (from the entry replica, or answering a [`ReplicaMessage::Pull`]).
    Push {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// The messages.
        items: Vec<PushItem>,
    },
    /// The ids of a push now durably stored (or already stored, or already delivered).
    PushAck {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// Ids stored.
        ids: Vec<ItemId>,
    },
    /// The owner's device acknowledged these messages at the sending replica.
    Acked {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// The device.
        device: [u8; 32],
        /// The messages it acknowledged.
        ids: Vec<ItemId>,
    },
    /// Anti-entropy: the sender's digests of mailboxes both hold.
    Digest {
        /// One per mailbox.
        entries: Vec<DigestEntry>,
    },
    /// Anti-entropy, first step: for each of the [`SUMMARY_BUCKETS`] buckets, the XOR of
    /// SHA-256(mailbox id ‖ digest) over the sender's mailboxes in that bucket whose replica
    /// set names the receiver (all zeros for an empty bucket). On the wire only the non-zero
    /// buckets, each with its number, when that is shorter (almost always: a node shares a
    /// few mailboxes with most peers); nodes before commit 7a95ee8 (2026-12-06) read only
    /// the dense form.
    Summary {
        /// Exactly [`SUMMARY_BUCKETS`] values, by bucket.
        buckets: Vec<[u8; 32]>,
    },
    /// Anti-entropy: send me your digests (as a [`ReplicaMessage::DigestReply`]) of the
    /// mailboxes we share in these buckets.
    DigestRequest {
        /// Bucket numbers, at most [`SUMMARY_BUCKETS`].
        buckets: Vec<u8>,
    },
    /// Anti-entropy: the digests a [`ReplicaMessage::DigestRequest`] asked for. The receiver
    /// only looks for mailboxes it does not know (a differing digest is handled through the
    /// [`ReplicaMessage::Digest`] sent the other way).
    DigestReply {
        /// One per mailbox.
        entries: Vec<DigestEntry>,
    },
    /// Anti-entropy: the sender's live and gone ids of a mailbox (not expired).
    Ids {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// True when the receiver should answer with its own lists.
        answer: bool,
        /// Messages stored.
        live: Vec<IdEntry>,
        /// Messages deleted (acknowledged by every device) whose id is kept until expiry.
        gone: Vec<IdEntry>,
    },
    /// Anti-entropy: send me these messages.
    Pull {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// The ids wanted.
        ids: Vec<ItemId>,
    },
    /// Record repair: send me the records of these mailboxes.
    RecordRequest {
        /// The mailboxes.
        mailbox_ids: Vec<MailboxId>,
    },
    /// Record repair: signed records (also sent unasked when a device is registered).
    Records {
        /// The records.
        records: Vec<RecordCopy>,
    },
    /// The owner erased the mailbox.
    Erase {
        /// The mailbox.
        mailbox_id: MailboxId,
    },
    /// The owner removed a device (it may no longer log in; what only it had not
    /// acknowledged may go).
    RemoveDevice {
        /// The mailbox.
        mailbox_id: MailboxId,
        /// The device key removed.
        device: [u8; 32],
    },
}

/// Why bytes are not a replica message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The input ended inside a field.
    #[error("replica message truncated in {0}")]
    Truncated(&'static str),
    /// A count, length or the whole message is above its bound.
    #[error("replica message: {what} is {len}, above the limit of {max}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Size received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An unknown format version.
    #[error("unknown replica message version {0}")]
    UnknownVersion(u8),
    /// An unknown message tag.
    #[error("unknown replica message tag {0}")]
    UnknownTag(u8),
    /// A field with a value out of its range.
    #[error("invalid replica message field: {0}")]
    Invalid(&'static str),
    /// Bytes after the end of the message.
    #[error("trailing bytes after a replica message")]
    TrailingBytes,
}

const TAG_PUSH: u8 = 1;
const TAG_PUSH_ACK: u8 = 2;
const TAG_ACKED: u8 = 3;
const TAG_DIGEST: u8 = 4;
const TAG_IDS: u8 = 5;
const TAG_PULL: u8 = 6;
const TAG_RECORD_REQUEST: u8 = 7;
const TAG_RECORDS: u8 = 8;
const TAG_ERASE: u8 = 9;
const TAG_REMOVE_DEVICE: u8 = 10;
const TAG_SUMMARY: u8 = 11;
const TAG_DIGEST_REQUEST: u8 = 12;
const TAG_DIGEST_REPLY: u8 = 13;
/// A [`ReplicaMessage::Summary`] as its non-zero buckets only (since commit 7a95ee8,
/// 2026-12-06; see [`ReplicaMessage::encode`]).
const TAG_SUMMARY_SPARSE: u8 = 14;

/// Bytes of one bucket in a sparse summary: its number, then its value.
const SPARSE_BUCKET_LEN: usize = 1 + 32;

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
    /// A count (callers keep lists within their bounds; saturates otherwise, which the
    /// decoder then refuses).
    fn count(&mut self, n: usize) {
        self.bytes(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
    }
    fn blob(&mut self, b: &[u8]) {
        self.bytes(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.bytes(b);
    }
    fn ids(&mut self, ids: &[ItemId]) {
        self.count(ids.len());
        for id in ids {
            self.bytes(id);
        }
    }
    fn digest_entries(&mut self, entries: &[DigestEntry]) {
        self.count(entries.len());
        for e in entries {
            self.bytes(e.mailbox_id.as_bytes());
            self.bytes(&e.digest);
        }
    }
    fn id_entries(&mut self, ids: &[IdEntry]) {
        self.count(ids.len());
        for e in ids {
            self.bytes(&e.id);
            self.u64(e.expires_at.0);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ReplicaError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(ReplicaError::Truncated(what))?;
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ReplicaError> {
        <[u8; N]>::try_from(self.take(N, what)?).map_err(|_| ReplicaError::Truncated(what))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ReplicaError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ReplicaError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, ReplicaError> {
        let n = usize::from(u16::from_be_bytes(self.array(what)?));
        if n > max {
            return Err(ReplicaError::TooLarge { what, len: n, max });
        }
        Ok(n)
    }
    fn blob(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, ReplicaError> {
        let n = usize::try_from(u32::from_be_bytes(self.array(what)?)).unwrap_or(usize::MAX);
        if n > max {
            return Err(ReplicaError::TooLarge { what, len: n, max });
        }
        Ok(self.take(n, what)?.to_vec())
    }
    fn mailbox(&mut self) -> Result<MailboxId, ReplicaError> {
        Ok(MailboxId(self.array("mailbox id")?))
    }
    fn ids(&mut self, what: &'static str) -> Result<Vec<ItemId>, ReplicaError> {
        let n = self.count(what, IDS_MAX)?;
        (0..n).map(|_| self.array(what)).collect()
    }
    fn digest_entries(&mut self) -> Result<Vec<DigestEntry>, ReplicaError> {
        let n = self.count("digest entries", MAILBOXES_MAX)?;
        (0..n)
            .map(|_| {
                Ok(DigestEntry {
                    mailbox_id: self.mailbox()?,
                    digest: self.array("digest")?,
                })
            })
            .collect()
    }
    fn id_entries(&mut self, what: &'static str) -> Result<Vec<IdEntry>, ReplicaError> {
        let n = self.count(what, IDS_MAX)?;
        (0..n)
            .map(|_| {
                Ok(IdEntry {
                    id: self.array(what)?,
                    expires_at: UnixTime(self.u64(what)?),
                })
            })
            .collect()
    }
}

fn encode_create(w: &mut Writer, c: &SignedCreate) {
    w.bytes(c.mailbox_id.as_bytes());
    w.bytes(&c.mailbox_key);
    w.bytes(&c.owner_key);
    w.bytes(&c.access_key_hash);
    match &c.reply_key {
        Some(k) => {
            w.u8(1);
            w.bytes(k);
        }
        None => w.u8(0),
    }
    w.u64(c.retention_ms);
    w.u8(u8::try_from(c.replicas.len()).unwrap_or(u8::MAX));
    for r in &c.replicas {
        w.bytes(&r.0);
    }
    w.bytes(&c.signature);
}

fn decode_create(r: &mut Reader<'_>) -> Result<SignedCreate, ReplicaError> {
    let mailbox_id = r.mailbox()?;
    let mailbox_key = r.array("mailbox key")?;
    let owner_key = r.array("owner key")?;
    let access_key_hash = r.array("access key hash")?;
    let reply_key = match r.u8("reply key flag")? {
        0 => None,
        1 => Some(r.array("reply key")?),
        _ => return Err(ReplicaError::Invalid("reply key flag")),
    };
    let retention_ms = r.u64("retention")?;
    let n = usize::from(r.u8("replica count")?);
    if n == 0 {
        return Err(ReplicaError::Invalid("empty replica set"));
    }
    if n > REPLICAS_MAX {
        return Err(ReplicaError::TooLarge {
            what: "replica set",
            len: n,
            max: REPLICAS_MAX,
        });
    }
    let replicas = (0..n)
        .map(|_| r.array("replica").map(NodeId))
        .collect::<Result<_, _>>()?;
    let signature = r.array("signature")?;
    Ok(SignedCreate {
        mailbox_id,
        mailbox_key,
        owner_key,
        access_key_hash,
        reply_key,
        retention_ms,
        replicas,
        signature,
    })
}

impl ReplicaMessage {
    /// The encoded message. Lists longer than their bounds encode as something
    /// [`Self::decode`] refuses: senders keep within the bounds.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.u8(REPLICA_VERSION);
        match self {
            ReplicaMessage::Push { mailbox_id, items } => {
                w.u8(TAG_PUSH);
                w.bytes(mailbox_id.as_bytes());
                w.count(items.len());
                for item in items {
                    w.bytes(&item.id);
                    w.u8(match item.kind {
                        MessageKind::Envelope => 0,
                        MessageKind::SurbReply => 1,
                    });
                    w.u64(item.expires_at.0);
                    w.blob(&item.body);
                }
            }
            ReplicaMessage::PushAck { mailbox_id, ids } => {
                w.u8(TAG_PUSH_ACK);
                w.bytes(mailbox_id.as_bytes());
                w.ids(ids);
            }
            ReplicaMessage::Acked {
                mailbox_id,
                device,
                ids,
            } => {
                w.u8(TAG_ACKED);
                w.bytes(mailbox_id.as_bytes());
                w.bytes(device);
                w.ids(ids);
            }
            ReplicaMessage::Digest { entries } => {
                w.u8(TAG_DIGEST);
                w.digest_entries(entries);
            }
            ReplicaMessage::Summary { buckets } => {
                // A node shares a handful of mailboxes with most of its peers, so most of a
                // summary's buckets are zero: the sparse form (the non-zero buckets, each
                // with its number) is then a few hundred bytes instead of 8 KiB. The dense
                // form is kept for a summary where it is shorter, and for lists that are not
                // exactly SUMMARY_BUCKETS long (which the decoder refuses either way).
                let non_zero = buckets.iter().filter(|b| **b != [0; 32]).count();
                if buckets.len() == SUMMARY_BUCKETS
                    && 2 + non_zero * SPARSE_BUCKET_LEN < 2 + SUMMARY_BUCKETS * 32
                {
                    w.u8(TAG_SUMMARY_SPARSE);
                    w.count(non_zero);
                    for (i, b) in buckets.iter().enumerate() {
                        if *b != [0; 32] {
                            w.u8(u8::try_from(i).unwrap_or(u8::MAX));
                            w.bytes(b);
                        }
                    }
                } else {
                    w.u8(TAG_SUMMARY);
                    w.count(buckets.len());
                    for b in buckets {
                        w.bytes(b);
                    }
                }
            }
            ReplicaMessage::DigestRequest { buckets } => {
                w.u8(TAG_DIGEST_REQUEST);
                w.count(buckets.len());
                w.bytes(buckets);
            }
            ReplicaMessage::DigestReply { entries } => {
                w.u8(TAG_DIGEST_REPLY);
                w.digest_entries(entries);
            }
            ReplicaMessage::Ids {
                mailbox_id,
                answer,
                live,
                gone,
            } => {
                w.u8(TAG_IDS);
                w.bytes(mailbox_id.as_bytes());
                w.u8(u8::from(*answer));
                w.id_entries(live);
                w.id_entries(gone);
            }
            ReplicaMessage::Pull { mailbox_id, ids } => {
                w.u8(TAG_PULL);
                w.bytes(mailbox_id.as_bytes());
                w.ids(ids);
            }
            ReplicaMessage::RecordRequest { mailbox_ids } => {
                w.u8(TAG_RECORD_REQUEST);
                w.count(mailbox_ids.len());
                for m in mailbox_ids {
                    w.bytes(m.as_bytes());
                }
            }
            ReplicaMessage::Records { records } => {
                w.u8(TAG_RECORDS);
                w.count(records.len());
                for rec in records {
                    encode_create(&mut w, &rec.create);
                    w.count(rec.devices.len());
                    for d in &rec.devices {
                        w.bytes(&d.device_key);
                        w.bytes(&d.signature);
                    }
                }
            }
            ReplicaMessage::Erase { mailbox_id } => {
                w.u8(TAG_ERASE);
                w.bytes(mailbox_id.as_bytes());
            }
            ReplicaMessage::RemoveDevice { mailbox_id, device } => {
                w.u8(TAG_REMOVE_DEVICE);
                w.bytes(mailbox_id.as_bytes());
                w.bytes(device);
            }
        }
        w.0
    }

    /// Decodes untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<ReplicaMessage, ReplicaError> {
        if bytes.len() > REPLICA_MESSAGE_MAX {
            return Err(ReplicaError::TooLarge {
                what: "replica message",
                len: bytes.len(),
                max: REPLICA_MESSAGE_MAX,
            });
        }
        let mut r = Reader(bytes);
        let version = r.u8("version")?;
        if version != REPLICA_VERSION {
            return Err(ReplicaError::UnknownVersion(version));
        }
        let message = match r.u8("tag")? {
            TAG_PUSH => {
                let mailbox_id = r.mailbox()?;
                let n = r.count("push items", PUSH_ITEMS_MAX)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.array("item id")?;
                    let kind = match r.u8("item kind")? {
                        0 => MessageKind::Envelope,
                        1 => MessageKind::SurbReply,
                        _ => return Err(ReplicaError::Invalid("item kind")),
                    };
                    let expires_at = UnixTime(r.u64("item expiry")?);
                    let body = r.blob("item body", BODY_MAX)?;
                    items.push(PushItem {
                        id,
                        kind,
                        expires_at,
                        body,
                    });
                }
                ReplicaMessage::Push { mailbox_id, items }
            }
            TAG_PUSH_ACK => ReplicaMessage::PushAck {
                mailbox_id: r.mailbox()?,
                ids: r.ids("push ack ids")?,
            },
            TAG_ACKED => ReplicaMessage::Acked {
                mailbox_id: r.mailbox()?,
                device: r.array("device")?,
                ids: r.ids("acked ids")?,
            },
            TAG_DIGEST => ReplicaMessage::Digest {
                entries: r.digest_entries()?,
            },
            TAG_SUMMARY => {
                let n = r.count("summary buckets", SUMMARY_BUCKETS)?;
                if n != SUMMARY_BUCKETS {
                    return Err(ReplicaError::Invalid("summary bucket count"));
                }
                let buckets = (0..n)
                    .map(|_| r.array("summary bucket"))
                    .collect::<Result<_, _>>()?;
                ReplicaMessage::Summary { buckets }
            }
            TAG_SUMMARY_SPARSE => {
                // One canonical form: bucket numbers strictly increasing, values non-zero.
                let n = r.count("summary buckets", SUMMARY_BUCKETS)?;
                let mut buckets = vec![[0u8; 32]; SUMMARY_BUCKETS];
                let mut next = 0usize;
                for _ in 0..n {
                    let i = usize::from(r.u8("summary bucket number")?);
                    let value: [u8; 32] = r.array("summary bucket")?;
                    if i < next {
                        return Err(ReplicaError::Invalid("summary bucket order"));
                    }
                    if value == [0; 32] {
                        return Err(ReplicaError::Invalid("summary bucket zero"));
                    }
                    if let Some(b) = buckets.get_mut(i) {
                        *b = value;
                    }
                    next = i + 1;
                }
                ReplicaMessage::Summary { buckets }
            }
            TAG_DIGEST_REQUEST => {
                let n = r.count("requested buckets", SUMMARY_BUCKETS)?;
                ReplicaMessage::DigestRequest {
                    buckets: r.take(n, "requested buckets")?.to_vec(),
                }
            }
            TAG_DIGEST_REPLY => ReplicaMessage::DigestReply {
                entries: r.digest_entries()?,
            },
            TAG_IDS => {
                let mailbox_id = r.mailbox()?;
                let answer = match r.u8("answer flag")? {
                    0 => false,
                    1 => true,
                    _ => return Err(ReplicaError::Invalid("answer flag")),
                };
                ReplicaMessage::Ids {
                    mailbox_id,
                    answer,
                    live: r.id_entries("live ids")?,
                    gone: r.id_entries("gone ids")?,
                }
            }
            TAG_PULL => ReplicaMessage::Pull {
                mailbox_id: r.mailbox()?,
                ids: r.ids("pulled ids")?,
            },
            TAG_RECORD_REQUEST => {
                let n = r.count("record request", MAILBOXES_MAX)?;
                let mailbox_ids = (0..n).map(|_| r.mailbox()).collect::<Result<_, _>>()?;
                ReplicaMessage::RecordRequest { mailbox_ids }
            }
            TAG_RECORDS => {
                let n = r.count("records", RECORDS_MAX)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let create = decode_create(&mut r)?;
                    let d = r.count("device registrations", DEVICES_MAX)?;
                    let devices = (0..d)
                        .map(|_| {
                            Ok(DeviceRegistration {
                                device_key: r.array("device key")?,
                                signature: r.array("device signature")?,
                            })
                        })
                        .collect::<Result<_, ReplicaError>>()?;
                    records.push(RecordCopy { create, devices });
                }
                ReplicaMessage::Records { records }
            }
            TAG_ERASE => ReplicaMessage::Erase {
                mailbox_id: r.mailbox()?,
            },
            TAG_REMOVE_DEVICE => ReplicaMessage::RemoveDevice {
                mailbox_id: r.mailbox()?,
                device: r.array("device")?,
            },
            tag => return Err(ReplicaError::UnknownTag(tag)),
        };
        if !r.0.is_empty() {
            return Err(ReplicaError::TrailingBytes);
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<ReplicaMessage> {
        let m = MailboxId([3; 32]);
        let create = SignedCreate {
            mailbox_id: m,
            mailbox_key: [4; 32],
            owner_key: [5; 32],
            access_key_hash: [6; 32],
            reply_key: Some([7; 32]),
            retention_ms: 60_000,
            replicas: vec![NodeId([8; 32]), NodeId([9; 32]), NodeId([10; 32])],
            signature: [11; 64],
        };
        vec![
            ReplicaMessage::Push {
                mailbox_id: m,
                items: vec![
                    PushItem {
                        id: [1; 16],
                        kind: MessageKind::Envelope,
                        expires_at: UnixTime(99),
                        body: vec![1, 2, 3],
                    },
                    PushItem {
                        id: [2; 16],
                        kind: MessageKind::SurbReply,
                        expires_at: UnixTime(u64::MAX),
                        body: Vec::new(),
                    },
                ],
            },
            ReplicaMessage::PushAck {
                mailbox_id: m,
                ids: vec![[1; 16], [2; 16]],
            },
            ReplicaMessage::Acked {
                mailbox_id: m,
                device: [12; 32],
                ids: vec![[1; 16]],
            },
            ReplicaMessage::Digest {
                entries: vec![DigestEntry {
                    mailbox_id: m,
                    digest: [13; 32],
                }],
            },
            // Dense on the wire (255 non-zero buckets), sparse (3), sparse and empty.
            ReplicaMessage::Summary {
                buckets: (0..SUMMARY_BUCKETS).map(|i| [i as u8; 32]).collect(),
            },
            ReplicaMessage::Summary {
                buckets: (0..SUMMARY_BUCKETS)
                    .map(|i| if i % 100 == 7 { [i as u8; 32] } else { [0; 32] })
                    .collect(),
            },
            ReplicaMessage::Summary {
                buckets: vec![[0; 32]; SUMMARY_BUCKETS],
            },
            ReplicaMessage::DigestRequest {
                buckets: vec![0, 7, 255],
            },
            ReplicaMessage::DigestReply {
                entries: vec![DigestEntry {
                    mailbox_id: m,
                    digest: [18; 32],
                }],
            },
            ReplicaMessage::Ids {
                mailbox_id: m,
                answer: true,
                live: vec![IdEntry {
                    id: [1; 16],
                    expires_at: UnixTime(5),
                }],
                gone: vec![IdEntry {
                    id: [2; 16],
                    expires_at: UnixTime(6),
                }],
            },
            ReplicaMessage::Pull {
                mailbox_id: m,
                ids: vec![],
            },
            ReplicaMessage::RecordRequest {
                mailbox_ids: vec![m, MailboxId([14; 32])],
            },
            ReplicaMessage::Records {
                records: vec![
                    RecordCopy {
                        create: create.clone(),
                        devices: vec![DeviceRegistration {
                            device_key: [15; 32],
                            signature: [16; 64],
                        }],
                    },
                    RecordCopy {
                        create: SignedCreate {
                            reply_key: None,
                            replicas: vec![NodeId([1; 32])],
                            ..create
                        },
                        devices: vec![],
                    },
                ],
            },
            ReplicaMessage::Erase { mailbox_id: m },
            ReplicaMessage::RemoveDevice {
                mailbox_id: m,
                device: [17; 32],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(ReplicaMessage::decode(&bytes), Ok(m));
        }
    }

    #[test]
    fn a_summary_travels_as_its_non_zero_buckets() {
        let mut buckets = vec![[0u8; 32]; SUMMARY_BUCKETS];
        buckets[3] = [9; 32];
        buckets[255] = [1; 32];
        let bytes = ReplicaMessage::Summary { buckets }.encode();
        // version, tag, count, then (number, value) twice: 72 bytes instead of 8,196.
        assert_eq!(bytes.len(), 2 + 2 + 2 * 33);
        assert_eq!(bytes[1], TAG_SUMMARY_SPARSE);
        assert_eq!((bytes[4], bytes[4 + 33]), (3, 255));
        // More non-zero buckets than the sparse form can carry shorter: dense.
        let full = ReplicaMessage::Summary {
            buckets: vec![[5; 32]; SUMMARY_BUCKETS],
        }
        .encode();
        assert_eq!((full[1], full.len()), (TAG_SUMMARY, 2 + 2 + 256 * 32));
    }

    #[test]
    fn a_sparse_summary_has_one_form() {
        let sparse = |entries: &[(u8, u8)]| {
            let mut b = vec![REPLICA_VERSION, TAG_SUMMARY_SPARSE, 0, entries.len() as u8];
            for &(i, v) in entries {
                b.push(i);
                b.extend_from_slice(&[v; 32]);
            }
            b
        };
        assert!(ReplicaMessage::decode(&sparse(&[(1, 1), (2, 2)])).is_ok());
        for (bad, why) in [
            (sparse(&[(2, 1), (1, 2)]), "summary bucket order"),
            (sparse(&[(2, 1), (2, 2)]), "summary bucket order"),
            (sparse(&[(1, 0)]), "summary bucket zero"),
        ] {
            assert_eq!(
                ReplicaMessage::decode(&bad),
                Err(ReplicaError::Invalid(why))
            );
        }
        let mut too_many = vec![REPLICA_VERSION, TAG_SUMMARY_SPARSE, 1, 1];
        too_many.extend_from_slice(&[1; 257 * 33]);
        assert!(matches!(
            ReplicaMessage::decode(&too_many),
            Err(ReplicaError::TooLarge { .. })
        ));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        for m in samples() {
            let bytes = m.encode();
            for len in 0..bytes.len() {
                assert!(
                    ReplicaMessage::decode(&bytes[..len]).is_err(),
                    "{m:?} truncated to {len} decoded"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                ReplicaMessage::decode(&longer),
                Err(ReplicaError::TrailingBytes)
            );
        }
    }

    #[test]
    fn oversized_inputs_are_refused_before_reading() {
        let huge = vec![REPLICA_VERSION; REPLICA_MESSAGE_MAX + 1];
        assert!(matches!(
            ReplicaMessage::decode(&huge),
            Err(ReplicaError::TooLarge {
                what: "replica message",
                ..
            })
        ));
        // A list count above its bound.
        let too_many = ReplicaMessage::PushAck {
            mailbox_id: MailboxId([1; 32]),
            ids: vec![[0; 16]; IDS_MAX + 1],
        };
        assert!(matches!(
            ReplicaMessage::decode(&too_many.encode()),
            Err(ReplicaError::TooLarge { max: IDS_MAX, .. })
        ));
        // A body above its bound.
        let big_body = ReplicaMessage::Push {
            mailbox_id: MailboxId([1; 32]),
            items: vec![PushItem {
                id: [0; 16],
                kind: MessageKind::Envelope,
                expires_at: UnixTime(1),
                body: vec![0; BODY_MAX + 1],
            }],
        };
        assert!(matches!(
            ReplicaMessage::decode(&big_body.encode()),
            Err(ReplicaError::TooLarge { max: BODY_MAX, .. })
        ));
        // A claimed length far beyond the input.
        let mut lying = vec![REPLICA_VERSION, TAG_PUSH];
        lying.extend_from_slice(&[0; 32]);
        lying.extend_from_slice(&1u16.to_be_bytes());
        lying.extend_from_slice(&[0; 16 + 1 + 8]);
        lying.extend_from_slice(&(BODY_MAX as u32).to_be_bytes());
        assert_eq!(
            ReplicaMessage::decode(&lying),
            Err(ReplicaError::Truncated("item body"))
        );
    }

    #[test]
    fn bad_tags_versions_and_flags_are_refused() {
        assert_eq!(
            ReplicaMessage::decode(&[2, TAG_ERASE]),
            Err(ReplicaError::UnknownVersion(2))
        );
        assert_eq!(
            ReplicaMessage::decode(&[REPLICA_VERSION, 0]),
            Err(ReplicaError::UnknownTag(0))
        );
        let mut ids = ReplicaMessage::Ids {
            mailbox_id: MailboxId([1; 32]),
            answer: false,
            live: vec![],
            gone: vec![],
        }
        .encode();
        ids[2 + 32] = 2;
        assert_eq!(
            ReplicaMessage::decode(&ids),
            Err(ReplicaError::Invalid("answer flag"))
        );
        let short_summary = ReplicaMessage::Summary {
            buckets: vec![[0; 32]; SUMMARY_BUCKETS - 1],
        };
        assert_eq!(
            ReplicaMessage::decode(&short_summary.encode()),
            Err(ReplicaError::Invalid("summary bucket count"))
        );
        let mut no_replicas = ReplicaMessage::Records {
            records: vec![RecordCopy {
                create: SignedCreate {
                    mailbox_id: MailboxId([1; 32]),
                    mailbox_key: [0; 32],
                    owner_key: [0; 32],
                    access_key_hash: [0; 32],
                    reply_key: None,
                    retention_ms: 1,
                    replicas: vec![NodeId([1; 32])],
                    signature: [0; 64],
                },
                devices: vec![],
            }],
        }
        .encode();
        // The replica count sits after version, tag, count, 4 keys, flag and retention.
        let at = 2 + 2 + 32 * 4 + 1 + 8;
        no_replicas[at] = 0;
        assert_eq!(
            ReplicaMessage::decode(&no_replicas),
            Err(ReplicaError::Invalid("empty replica set"))
        );
        no_replicas[at] = (REPLICAS_MAX + 1) as u8;
        assert!(matches!(
            ReplicaMessage::decode(&no_replicas),
            Err(ReplicaError::TooLarge { .. })
        ));
    }
}
