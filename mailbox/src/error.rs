//! The mailbox crate's error type.

use crate::store::StoreError;

/// Everything a mailbox operation can fail with. Caller-caused errors
/// ([`MailboxError::is_caller_error`]) change no state; local errors (storage, corrupt data)
/// are the node's problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// No mailbox with that id on this node.
    #[error("unknown mailbox")]
    UnknownMailbox,
    /// A mailbox with that id already exists.
    #[error("mailbox already exists")]
    MailboxExists,
    /// The access token, session token or ticket is wrong, expired or already used.
    #[error("not authorised: {0}")]
    Unauthorized(&'static str),
    /// A signature did not verify.
    #[error("bad signature: {0}")]
    BadSignature(&'static str),
    /// The key is not registered as a device of the mailbox.
    #[error("unknown device")]
    UnknownDevice,
    /// A per-mailbox or per-node limit is reached; retry later or free space.
    #[error("quota exceeded: {what}")]
    QuotaExceeded {
        /// Which quota.
        what: &'static str,
    },
    /// Too many requests; retry after the given delay.
    #[error("rate limited: {what}, retry after {retry_after_ms} ms")]
    RateLimited {
        /// Which limit.
        what: &'static str,
        /// When a retry can succeed.
        retry_after_ms: u64,
    },
    /// The deposit's requested expiry is already past.
    #[error("already expired")]
    AlreadyExpired,
    /// A cursor names a message that was never assigned.
    #[error("bad cursor: {0}")]
    BadCursor(&'static str),
    /// A request field is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Wire input failed to decode or validate.
    #[error("malformed input: {0}")]
    Malformed(#[from] whispr_protocol::Error),
    /// Storage failed; after a failed write the store is poisoned.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored data failed to decrypt or decode (wrong master key, or corruption).
    #[error("corrupt stored data: {0}")]
    Corrupt(&'static str),
    /// The master key file could not be read or created.
    #[error("master key file: {0}")]
    KeyFile(String),
    /// The node could not set up its directories or threads.
    #[error("node start-up: {0}")]
    Startup(String),
}

impl MailboxError {
    /// True when the caller (client, peer) caused the error and can fix it; false for the
    /// node's own failures.
    pub fn is_caller_error(&self) -> bool {
        !matches!(
            self,
            MailboxError::Store(_)
                | MailboxError::Corrupt(_)
                | MailboxError::KeyFile(_)
                | MailboxError::Startup(_)
        )
    }

    /// A short stable name for metrics labels and JSON error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            MailboxError::UnknownMailbox => "unknown_mailbox",
            MailboxError::MailboxExists => "mailbox_exists",
            MailboxError::Unauthorized(_) => "unauthorized",
            MailboxError::BadSignature(_) => "bad_signature",
            MailboxError::UnknownDevice => "unknown_device",
            MailboxError::QuotaExceeded { .. } => "quota_exceeded",
            MailboxError::RateLimited { .. } => "rate_limited",
            MailboxError::AlreadyExpired => "already_expired",
            MailboxError::BadCursor(_) => "bad_cursor",
            MailboxError::InvalidArgument(_) => "invalid_argument",
            MailboxError::Malformed(_) => "malformed",
            MailboxError::Store(StoreError::Poisoned) => "store_poisoned",
            MailboxError::Store(_) => "store",
            MailboxError::Corrupt(_) => "corrupt",
            MailboxError::KeyFile(_) => "key_file",
            MailboxError::Startup(_) => "startup",
        }
    }
}

/// Result with [`MailboxError`].
pub type Result<T, E = MailboxError> = std::result::Result<T, E>;
