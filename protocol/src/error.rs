//! The crate's one error type.
//!
//! Variants are split by who caused them: [`Error::is_peer_caused`] is true for everything a
//! remote party can trigger with bytes it sends (malformed, oversized, forged, replayed,
//! expired input), and false for mistakes of the local caller (bad arguments, configuration).
//! Nodes count peer-caused errors and drop the input; local errors are bugs to fix.
//!
//! No variant carries secret material, content, keys, mailbox ids or addresses: only the
//! name of what failed and sizes, so that an error can be logged as it is.

/// Everything that can go wrong in `whispr-protocol`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- peer-caused -----------------------------------------------------------------------
    /// Bytes that do not decode as the expected structure.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A field has the wrong length.
    #[error("{what} has length {len}, expected {expected}")]
    BadLength {
        /// The field.
        what: &'static str,
        /// Length received.
        len: usize,
        /// Length required.
        expected: usize,
    },
    /// Input larger than its bound.
    #[error("{what} is {len} bytes or items, above the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Size received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A top-level message with a version this implementation does not know.
    #[error("unknown {what} version {version}")]
    UnknownVersion {
        /// The message type.
        what: &'static str,
        /// The version received.
        version: u32,
    },
    /// A Sphinx header whose integrity MAC does not verify under any of our keys.
    #[error("sphinx header failed its integrity check")]
    HeaderIntegrity,
    /// A Sphinx packet that is not ours to process or is otherwise invalid.
    #[error("invalid sphinx packet: {0}")]
    InvalidPacket(&'static str),
    /// An AEAD (HPKE or SURB reply) that does not open: wrong key or tampered bytes.
    #[error("{0} failed to decrypt (wrong key or tampered)")]
    Decrypt(&'static str),
    /// An Ed25519 signature that does not verify.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// Something valid only until a time that has passed.
    #[error("{what} expired")]
    Expired {
        /// What expired.
        what: &'static str,
    },
    /// Something whose validity has not started yet, or that claims a time too far ahead.
    #[error("{what} is not valid yet")]
    NotYetValid {
        /// What is not valid yet.
        what: &'static str,
    },
    /// A fragment that contradicts others of the same message, or a reassembled message whose
    /// digest does not match.
    #[error("fragment rejected: {0}")]
    FragmentMismatch(&'static str),
    /// A packet whose replay tag was seen before in its key epoch.
    #[error("replayed packet")]
    Replayed,
    /// A bounded buffer (reassembly, replay filter) is full; the input was not stored.
    #[error("{what} full: limit {max} reached")]
    Full {
        /// Which bound was hit.
        what: &'static str,
        /// The bound.
        max: usize,
    },
    /// A signed document (consensus) without enough valid signatures from pinned keys.
    #[error("{what} has {valid} valid authority signatures, {required} required")]
    TooFewSignatures {
        /// The document.
        what: &'static str,
        /// Distinct pinned authorities whose signature verifies.
        valid: usize,
        /// The network's threshold.
        required: usize,
    },
    /// A node descriptor that the directory refuses.
    #[error("descriptor rejected: {0}")]
    DescriptorRejected(&'static str),

    // ---- local -----------------------------------------------------------------------------
    /// The caller passed an argument outside what the protocol allows.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// No route could be built from the directory as it is.
    #[error("no route: {0}")]
    NoRoute(&'static str),
    /// A cryptographic operation failed locally (e.g. key generation).
    #[error("local crypto failure: {0}")]
    Crypto(&'static str),
}

impl Error {
    /// True when a remote party's input caused this error (drop it and count it), false when
    /// the local caller made a mistake.
    pub fn is_peer_caused(&self) -> bool {
        !matches!(
            self,
            Error::InvalidArgument(_) | Error::NoRoute(_) | Error::Crypto(_)
        )
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
