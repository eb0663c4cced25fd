//! The timer service's one error type.

/// Everything that can go wrong in the timer service.
///
/// [`TimerError::is_caller_error`] separates bad requests (the caller's fault: refuse, change
/// nothing) from failures of the node itself (storage, corruption). No variant carries a
/// payload, an owner tag, a token, a hold id or a cancel capability.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimerError {
    // ---- caller errors ---------------------------------------------------------------------
    /// The payload is larger than `payload_bytes_max`.
    #[error("payload of {len} bytes is above the limit of {max}")]
    PayloadTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A category name that does not exist.
    #[error("unknown category")]
    UnknownCategory,
    /// Priority above the maximum.
    #[error("priority {0} is above the maximum of 9")]
    PriorityOutOfRange(u8),
    /// Due time further ahead than `horizon_days_max`.
    #[error("due time is beyond the scheduling horizon of {horizon_days} days")]
    BeyondHorizon {
        /// The horizon.
        horizon_days: u32,
    },
    /// The category's queue holds `queue_tasks_max` tasks: the task was not accepted.
    #[error("queue {category} is full ({max} tasks)")]
    QueueFull {
        /// The category's name.
        category: &'static str,
        /// The bound.
        max: usize,
    },
    /// The owner created `owner_tasks_per_day_max` tasks today already.
    #[error("owner reached the daily creation limit of {max} tasks")]
    OwnerLimit {
        /// The limit.
        max: u32,
    },
    /// The owner tag is longer than allowed.
    #[error("owner tag longer than {max} bytes")]
    OwnerTagTooLong {
        /// The limit.
        max: usize,
    },
    /// The table of per-owner counters is full of owners active today.
    #[error("too many distinct owners today ({max})")]
    OwnersTableFull {
        /// The bound.
        max: usize,
    },
    /// The timer node stores `holds.held_max` holds and tombstones: no new one is accepted.
    #[error("too many holds stored ({max})")]
    HoldsFull {
        /// The bound.
        max: usize,
    },
    /// No task with this id.
    #[error("no such task")]
    NotFound,
    /// The operation needs a task in another state (e.g. releasing a task not quarantined).
    #[error("task is {0}")]
    WrongState(&'static str),
    /// A task id that is not 32 hex digits.
    #[error("task id must be 32 hex digits")]
    BadTaskId,
    /// A part of a held packet was refused (see [`crate::holds`]).
    #[error("held packet: {0}")]
    Hold(#[from] crate::holds::HoldError),
    /// The cancel capability does not match the held packet's cancel hash: nothing changed.
    #[error("wrong cancel capability")]
    BadCapability,

    // ---- node errors -----------------------------------------------------------------------
    /// A write failed earlier; the store refuses further writes until restarted.
    #[error("store is poisoned by an earlier failed write; restart the node")]
    Poisoned,
    /// The storage engine failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// Stored data that does not decode.
    #[error("corrupt stored data: {0}")]
    Corrupt(&'static str),
    /// The audit log failed or does not verify.
    #[error("audit log: {0}")]
    Audit(String),
}

impl TimerError {
    /// True when the request was at fault (refused, nothing changed); false for a failure of
    /// the node itself.
    pub fn is_caller_error(&self) -> bool {
        !matches!(
            self,
            TimerError::Poisoned
                | TimerError::Storage(_)
                | TimerError::Corrupt(_)
                | TimerError::Audit(_)
        )
    }
}

/// `Result` with [`TimerError`].
pub type Result<T> = std::result::Result<T, TimerError>;
