//! The client's one error type.

/// Everything a client operation can fail with. Each variant says what to do about it; none
/// carries a key, token, mailbox id or message content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The home directory has no client yet (run `whispr init`).
    #[error("no client in {0}: run `whispr init` first")]
    NotInitialized(String),
    /// `init` on a home directory that already has a client.
    #[error("a client already exists in {0}")]
    AlreadyInitialized(String),
    /// The passphrase does not open the client's state (or the state file was altered).
    #[error("wrong passphrase, or the state file was altered")]
    WrongPassphrase,
    /// Reading or writing the home directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this version understands.
    #[error("state file: {0}")]
    CorruptState(String),
    /// A node answered with an error.
    #[error("{node} answered {status} {kind}: {message}")]
    Node {
        /// Which kind of node (`mailbox`, `edge relay`, `directory`).
        node: &'static str,
        /// HTTP status.
        status: u16,
        /// The error kind from the JSON body.
        kind: String,
        /// The node's explanation.
        message: String,
    },
    /// A node answered more than the client reads for that call: a hostile or broken node
    /// (the client stops reading at the bound, so the answer cannot exhaust its memory).
    #[error("{node} answered more than {max} bytes")]
    ResponseTooLarge {
        /// Which kind of node.
        node: &'static str,
        /// The bound, in bytes.
        max: usize,
    },
    /// A node could not be reached.
    #[error("{node} unreachable: {reason}")]
    Unreachable {
        /// Which kind of node.
        node: &'static str,
        /// Why (connection refused, timeout, …).
        reason: String,
    },
    /// The directory has no usable route or node for this.
    #[error("no route: {0}")]
    NoRoute(String),
    /// A protocol-level encoding or cryptographic error.
    #[error("protocol: {0}")]
    Protocol(#[from] whispr_protocol::Error),
    /// An Olm session error.
    #[error("end-to-end session: {0}")]
    Olm(String),
    /// No contact of that name.
    #[error("no contact named {0:?}")]
    UnknownContact(String),
    /// A contact of that name exists already.
    #[error("a contact named {0:?} exists already")]
    ContactExists(String),
    /// The contact has not answered the invitation yet, so there is nowhere to send.
    #[error("{0:?} has not answered yet: nothing can be sent before their first message")]
    NotEstablished(String),
    /// The invitation text is not valid.
    #[error("invalid invitation: {0}")]
    InvalidInvitation(&'static str),
    /// A contact's identity key differs from the one verified before; nothing from it is
    /// accepted until the user re-verifies.
    #[error("the identity key of {0:?} changed: verify the safety number before trusting it")]
    IdentityChanged(String),
    /// No scheduled send with that id, or it can no longer be cancelled.
    #[error("no scheduled send {0} can be cancelled")]
    UnknownScheduled(u64),
    /// A bad argument (time in the past, too far ahead, empty name, …).
    #[error("{0}")]
    InvalidArgument(String),
    /// A bounded table of the client is full.
    #[error("{0} is full")]
    Full(&'static str),
    /// Linking a device failed: a bad, expired or used code, codes that differ, or a device
    /// limit.
    #[error("linking: {0}")]
    Link(String),
    /// Only the account's primary device does this (contacts, linking, device removal).
    #[error("{0} is done on the account's primary device")]
    PrimaryOnly(&'static str),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, ClientError>;

impl ClientError {
    /// A failure of this client's own home (its files, its state, its passphrase): retrying
    /// over the network cannot help.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. }
                | ClientError::CorruptState(_)
                | ClientError::WrongPassphrase
                | ClientError::NotInitialized(_)
                | ClientError::AlreadyInitialized(_)
        )
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
        move |source| ClientError::Io { what, source }
    }
}
