//! Small value types shared by every module: time, epochs and fixed-size identifiers.
//!
//! Identifiers that could link a user (mailbox ids, dedup ids, message ids, access tokens)
//! print as `MailboxId(..)` in `Debug` output, so that they never reach a log in clear.
//! Node ids are public (they are in the directory) and print a short hex prefix.

use std::fmt;
use std::time::Duration;

/// Wall-clock time as milliseconds since the Unix epoch. Cores take it as an argument; only
/// drivers read the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixTime(pub u64);

impl UnixTime {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> UnixTime {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixTime(self.0.saturating_add(ms))
    }

    /// `self - earlier`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: UnixTime) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// A Sphinx key epoch: node keys rotate every `epoch_len` ([`KEY_EPOCH_LEN`] on the
/// network), and descriptors publish the keys of coming epochs ahead of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyEpoch(pub u64);

impl KeyEpoch {
    /// The epoch that contains `now`, for epochs of `epoch_len` (a zero length is treated as
    /// one millisecond).
    pub fn containing(now: UnixTime, epoch_len: Duration) -> KeyEpoch {
        let len_ms = u64::try_from(epoch_len.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        KeyEpoch(now.0 / len_ms)
    }

    /// The epoch before this one (epoch 0 has none).
    pub fn previous(self) -> Option<KeyEpoch> {
        self.0.checked_sub(1).map(KeyEpoch)
    }
}

/// Length of a Sphinx key epoch on the network. A hop accepts the current and the previous
/// epoch's key, so a packet stays processable for at least one epoch after it was built: one
/// hour covers the longest route (4 forwarding hops × the 10-minute per-hop delay cap, plus
/// clock skew), and is how long an unused SURB stays valid at least.
pub const KEY_EPOCH_LEN: Duration = Duration::from_secs(3600);

macro_rules! secret_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Builds it from a slice of exactly [`Self::LEN`] bytes.
            pub fn from_slice(what: &'static str, bytes: &[u8]) -> crate::Result<Self> {
                <[u8; $len]>::try_from(bytes)
                    .map($name)
                    .map_err(|_| crate::Error::BadLength {
                        what,
                        len: bytes.len(),
                        expected: $len,
                    })
            }

            /// A fresh random value.
            pub fn random<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
                let mut bytes = [0u8; $len];
                rng.fill_bytes(&mut bytes);
                $name(bytes)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

secret_id!(
    /// A mailbox: 32 bytes chosen by its owner. Never logged in clear.
    MailboxId,
    32
);
secret_id!(
    /// The secret that authorises deposits into a mailbox; the node keeps only its hash.
    AccessToken,
    32
);
secret_id!(
    /// Per-deposit id by which a mailbox deduplicates redelivered packets.
    DedupId,
    16
);
secret_id!(
    /// End-to-end message id, shared by all fragments of one message.
    MessageId,
    16
);
secret_id!(
    /// Identifier of a SURB; delivered in clear to the SURB's final hop only. Never zero.
    SurbId,
    16
);
secret_id!(
    /// Identifier of a packet held by a timer node.
    HoldId,
    16
);
secret_id!(
    /// The capability that cancels a held packet; the timer node keeps only its hash.
    CancelCapability,
    32
);

/// The secret with which a mailbox owner mints the ids of the SURBs that lead back to its
/// mailbox, registered with the mailbox node so that it accepts SURB replies only for ids the
/// owner minted (a forward packet with a made-up non-zero id would otherwise pass as a reply
/// and skip the access-token check).
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct ReplyKey(pub [u8; 32]);

impl fmt::Debug for ReplyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyKey(..)")
    }
}

const SURB_ID_PREFIX: &[u8] = b"whispr-surb-id-v1";

impl ReplyKey {
    /// A fresh random key.
    pub fn random<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        ReplyKey(bytes)
    }

    fn tag(&self, mailbox: &MailboxId, nonce: &[u8]) -> [u8; 8] {
        use hmac::{KeyInit, Mac};
        let mut out = [0u8; 8];
        // HMAC accepts keys of any length, so this cannot fail.
        if let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0) {
            mac.update(SURB_ID_PREFIX);
            mac.update(mailbox.as_bytes());
            mac.update(nonce);
            let full = mac.finalize().into_bytes();
            for (o, b) in out.iter_mut().zip(full.iter()) {
                *o = *b;
            }
        }
        out
    }

    /// Mints a SURB id for a reply into `mailbox`: an 8-byte random nonce followed by the
    /// first 8 bytes of HMAC-SHA256(key, "whispr-surb-id-v1" ‖ mailbox ‖ nonce). Never zero.
    pub fn mint_surb_id<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        mailbox: &MailboxId,
    ) -> SurbId {
        loop {
            let mut id = [0u8; 16];
            let (nonce, tag) = id.split_at_mut(8);
            rng.fill_bytes(nonce);
            tag.copy_from_slice(&self.tag(mailbox, nonce));
            if id != [0u8; 16] {
                return SurbId(id);
            }
        }
    }

    /// True when `id` was minted with this key for `mailbox` (constant-time comparison).
    pub fn verify_surb_id(&self, mailbox: &MailboxId, id: &SurbId) -> bool {
        use subtle::ConstantTimeEq;
        let (nonce, tag) = id.0.split_at(8);
        bool::from(self.tag(mailbox, nonce).ct_eq(tag))
    }
}

/// A node: its 32-byte Ed25519 identity key, which is also its Sphinx routing address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// Builds it from a slice of exactly 32 bytes.
    pub fn from_slice(what: &'static str, bytes: &[u8]) -> crate::Result<Self> {
        <[u8; 32]>::try_from(bytes)
            .map(NodeId)
            .map_err(|_| crate::Error::BadLength {
                what,
                len: bytes.len(),
                expected: 32,
            })
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The libp2p peer id (as bytes) of this Ed25519 identity key: an identity multihash of
    /// the protobuf-encoded public key (`0x00 0x24 | 0x08 0x01 0x12 0x20 | key`).
    pub fn libp2p_peer_id_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(38);
        out.extend_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
        out.extend_from_slice(&self.0);
        out
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId(")?;
        for b in self.0.iter().take(4) {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The 32-byte address a Sphinx packet's final hop learns: the mailbox id for deposits and
/// SURB replies, [`DestinationAddress::NODE_SERVICE`] for requests to the node itself (timer).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationAddress(pub [u8; 32]);

impl DestinationAddress {
    /// The all-zero address: the final node's own service (e.g. a timer node's hold queue).
    pub const NODE_SERVICE: DestinationAddress = DestinationAddress([0u8; 32]);

    /// The destination of deposits into `mailbox`.
    pub fn mailbox(mailbox: &MailboxId) -> Self {
        DestinationAddress(mailbox.0)
    }
}

impl fmt::Debug for DestinationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DestinationAddress(..)")
    }
}
