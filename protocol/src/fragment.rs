//! Fragmentation of messages up to [`MESSAGE_LEN_MAX`] into fixed-size fragments, and a
//! bounded [`Reassembler`].
//!
//! Every fragment but the last carries exactly [`FRAGMENT_DATA_LEN`] bytes; the last carries
//! the rest. Each carries the whole message's length, fragment count and SHA-256 digest, so
//! the reassembler rejects fragments that contradict each other and a reassembled message that
//! does not match its digest. Fragments travel inside sealed envelopes (one per packet), which
//! authenticate them; the digest catches what a buggy or malicious sender mixes up.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::wire;
use crate::{Error, MessageId, Result, UnixTime};

/// Bytes of message data in every fragment but the last. Chosen so that a fragment in a
/// sealed envelope with an ack SURB fits one Sphinx payload (a test checks the worst case).
pub const FRAGMENT_DATA_LEN: usize = 1200;
/// Largest message: 1 MiB.
pub const MESSAGE_LEN_MAX: usize = 1024 * 1024;
/// Most fragments a message can have.
pub const FRAGMENT_COUNT_MAX: usize = MESSAGE_LEN_MAX.div_ceil(FRAGMENT_DATA_LEN);

/// Where a fragment sits in its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    /// 0-based index.
    pub index: u32,
    /// Number of fragments in the message.
    pub count: u32,
    /// Length of the whole message.
    pub total_len: u32,
    /// SHA-256 of the whole message.
    pub message_digest: [u8; 32],
}

impl FragmentInfo {
    /// The wire form.
    pub fn to_wire(&self) -> wire::FragmentInfo {
        wire::FragmentInfo {
            index: self.index,
            count: self.count,
            total_len: self.total_len,
            message_digest: self.message_digest.to_vec(),
        }
    }

    /// Validates the wire form: a consistent count for the length, an index below it.
    pub fn from_wire(w: Option<&wire::FragmentInfo>) -> Result<FragmentInfo> {
        let w = w.ok_or(Error::Malformed {
            what: "fragment info",
            reason: "missing",
        })?;
        let message_digest =
            <[u8; 32]>::try_from(w.message_digest.as_slice()).map_err(|_| Error::BadLength {
                what: "message digest",
                len: w.message_digest.len(),
                expected: 32,
            })?;
        let info = FragmentInfo {
            index: w.index,
            count: w.count,
            total_len: w.total_len,
            message_digest,
        };
        info.check()?;
        Ok(info)
    }

    fn check(&self) -> Result<()> {
        let total_len = self.total_len as usize;
        if total_len > MESSAGE_LEN_MAX {
            return Err(Error::TooLarge {
                what: "message",
                len: total_len,
                max: MESSAGE_LEN_MAX,
            });
        }
        if self.count as usize != expected_count(total_len) {
            return Err(Error::FragmentMismatch("count does not match the length"));
        }
        if self.index >= self.count {
            return Err(Error::FragmentMismatch("index beyond count"));
        }
        Ok(())
    }

    /// How many data bytes the fragment at this index must carry.
    pub fn expected_data_len(&self) -> usize {
        let start = (self.index as usize).saturating_mul(FRAGMENT_DATA_LEN);
        (self.total_len as usize)
            .saturating_sub(start)
            .min(FRAGMENT_DATA_LEN)
    }
}

fn expected_count(total_len: usize) -> usize {
    total_len.div_ceil(FRAGMENT_DATA_LEN).max(1)
}

/// One fragment of a message.
#[derive(Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The message it belongs to.
    pub message_id: MessageId,
    /// Its place in the message.
    pub info: FragmentInfo,
    /// Its data.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Fragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fragment")
            .field("message_id", &self.message_id)
            .field("index", &self.info.index)
            .field("count", &self.info.count)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Splits `message` (at most [`MESSAGE_LEN_MAX`] bytes) into fragments. An empty message is
/// one empty fragment.
pub fn fragment_message(message_id: MessageId, message: &[u8]) -> Result<Vec<Fragment>> {
    if message.len() > MESSAGE_LEN_MAX {
        return Err(Error::TooLarge {
            what: "message",
            len: message.len(),
            max: MESSAGE_LEN_MAX,
        });
    }
    let digest: [u8; 32] = Sha256::digest(message).into();
    let count = expected_count(message.len());
    let total_len = u32::try_from(message.len()).map_err(|_| Error::InvalidArgument("length"))?;
    let count_u32 = u32::try_from(count).map_err(|_| Error::InvalidArgument("count"))?;
    let mut chunks: Vec<&[u8]> = message.chunks(FRAGMENT_DATA_LEN).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, data)| {
            Ok(Fragment {
                message_id,
                info: FragmentInfo {
                    index: u32::try_from(index).map_err(|_| Error::InvalidArgument("index"))?,
                    count: count_u32,
                    total_len,
                    message_digest: digest,
                },
                data: data.to_vec(),
            })
        })
        .collect()
}

/// Bounds of a [`Reassembler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Most messages being reassembled at once.
    pub messages_max: usize,
    /// Most fragment bytes buffered over all messages.
    pub bytes_max: usize,
    /// A message not complete this long after its first fragment is dropped; a completed
    /// message's key is remembered this long, so that late duplicates are recognised.
    pub age_max: Duration,
    /// Most completed message keys remembered (oldest forgotten first).
    pub completed_max: usize,
}

impl Default for ReassemblyLimits {
    /// 64 messages, 16 MiB, 24 hours, 4096 completed keys.
    fn default() -> Self {
        ReassemblyLimits {
            messages_max: 64,
            bytes_max: 16 * 1024 * 1024,
            age_max: Duration::from_secs(24 * 3600),
            completed_max: 4096,
        }
    }
}

#[derive(Debug)]
struct Partial {
    first_seen: UnixTime,
    info: FragmentInfo,
    fragments: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
}

/// Reassembles messages from fragments arriving in any order, with duplicates, within
/// [`ReassemblyLimits`]. `K` keys a message (e.g. sender identity and message id).
#[derive(Debug)]
pub struct Reassembler<K: Ord + Clone> {
    limits: ReassemblyLimits,
    partial: BTreeMap<K, Partial>,
    bytes: usize,
    /// Recently completed messages and when they completed.
    completed: BTreeMap<K, UnixTime>,
}

/// What [`Reassembler::insert`] did with a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Stored; the message is not complete yet.
    Pending,
    /// A copy of a fragment already held; nothing changed.
    Duplicate,
    /// The last missing fragment: here is the whole message, checked against its digest.
    Complete(Vec<u8>),
}

impl<K: Ord + Clone> Reassembler<K> {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            partial: BTreeMap::new(),
            bytes: 0,
            completed: BTreeMap::new(),
        }
    }

    /// Messages being reassembled.
    pub fn messages(&self) -> usize {
        self.partial.len()
    }

    /// Fragment bytes buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops messages older than the age bound; returns how many.
    pub fn expire(&mut self, now: UnixTime) -> usize {
        let age_max = self.limits.age_max;
        let before = self.partial.len();
        let mut freed = 0usize;
        self.partial.retain(|_, p| {
            let keep = now.saturating_since(p.first_seen) <= age_max;
            if !keep {
                freed = freed.saturating_add(p.bytes);
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
        self.completed
            .retain(|_, done_at| now.saturating_since(*done_at) <= age_max);
        before.saturating_sub(self.partial.len())
    }

    /// Adds a fragment of message `key`. A fragment that contradicts the message's other
    /// fragments, or whose length is wrong for its index, is refused and changes nothing; a
    /// complete message whose digest does not match is refused and dropped. A fragment of a
    /// message completed within `age_max` is reported as a [`Inserted::Duplicate`].
    ///
    /// The byte bound is not applied to the fragment that completes a message, since
    /// completing it frees the message's bytes.
    pub fn insert(&mut self, now: UnixTime, key: K, fragment: Fragment) -> Result<Inserted> {
        self.expire(now);
        let info = fragment.info;
        info.check()?;
        if fragment.data.len() != info.expected_data_len() {
            return Err(Error::FragmentMismatch("data length wrong for its index"));
        }
        if self.completed.contains_key(&key) {
            return Ok(Inserted::Duplicate);
        }
        let completes = match self.partial.get(&key) {
            Some(p) => {
                if p.info.count != info.count
                    || p.info.total_len != info.total_len
                    || p.info.message_digest != info.message_digest
                {
                    return Err(Error::FragmentMismatch(
                        "contradicts earlier fragments of the message",
                    ));
                }
                if let Some(held) = p.fragments.get(&info.index) {
                    return if *held == fragment.data {
                        Ok(Inserted::Duplicate)
                    } else {
                        Err(Error::FragmentMismatch("differs from a copy already held"))
                    };
                }
                p.fragments.len().saturating_add(1) == info.count as usize
            }
            None => {
                if info.count == 1 {
                    let message = finish(info, std::iter::once(fragment.data))?;
                    self.remember_completed(now, key);
                    return Ok(Inserted::Complete(message));
                }
                if self.partial.len() >= self.limits.messages_max {
                    return Err(Error::Full {
                        what: "reassembly messages",
                        max: self.limits.messages_max,
                    });
                }
                false
            }
        };
        if !completes && self.bytes.saturating_add(fragment.data.len()) > self.limits.bytes_max {
            return Err(Error::Full {
                what: "reassembly bytes",
                max: self.limits.bytes_max,
            });
        }
        let len = fragment.data.len();
        let p = self.partial.entry(key.clone()).or_insert_with(|| Partial {
            first_seen: now,
            info,
            fragments: BTreeMap::new(),
            bytes: 0,
        });
        p.fragments.insert(info.index, fragment.data);
        p.bytes = p.bytes.saturating_add(len);
        self.bytes = self.bytes.saturating_add(len);
        if p.fragments.len() < info.count as usize {
            return Ok(Inserted::Pending);
        }
        let Some(done) = self.partial.remove(&key) else {
            return Err(Error::FragmentMismatch("message vanished"));
        };
        self.bytes = self.bytes.saturating_sub(done.bytes);
        let message = finish(done.info, done.fragments.into_values())?;
        self.remember_completed(now, key);
        Ok(Inserted::Complete(message))
    }

    fn remember_completed(&mut self, now: UnixTime, key: K) {
        if self.limits.completed_max == 0 {
            return;
        }
        while self.completed.len() >= self.limits.completed_max {
            let oldest = self
                .completed
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.completed.remove(&k),
                None => break,
            };
        }
        self.completed.insert(key, now);
    }
}

fn finish(info: FragmentInfo, parts: impl Iterator<Item = Vec<u8>>) -> Result<Vec<u8>> {
    let mut message = Vec::with_capacity(info.total_len as usize);
    for part in parts {
        message.extend_from_slice(&part);
    }
    let digest: [u8; 32] = Sha256::digest(&message).into();
    if message.len() != info.total_len as usize || digest != info.message_digest {
        return Err(Error::FragmentMismatch(
            "reassembled message fails its digest",
        ));
    }
    Ok(message)
}
