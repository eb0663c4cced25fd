//! Tasks, their categories and their on-disk encoding.

use std::fmt;

use whispr_protocol::UnixTime;

use crate::error::{Result, TimerError};

/// A task's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub [u8; 16]);

impl TaskId {
    /// Parses 32 hex digits.
    pub fn parse(text: &str) -> Result<TaskId> {
        whispr_protocol::timer_api::parse_task_id(text)
            .map(TaskId)
            .ok_or(TimerError::BadTaskId)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({self})")
    }
}

/// What a task is for. Each category has its own bounded queue and can be paused alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// A packet to inject into the mesh at the due time.
    DeferredSend,
    /// A stored message to delete at the due time.
    Expiry,
    /// Housekeeping (compaction, key rotation, purges).
    Maintenance,
}

impl Category {
    /// Every category, in the order the scheduler serves them round-robin.
    pub const ALL: [Category; 3] = [
        Category::DeferredSend,
        Category::Expiry,
        Category::Maintenance,
    ];

    /// The name used in config, the admin API, metrics and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Category::DeferredSend => "deferred_send",
            Category::Expiry => "expiry",
            Category::Maintenance => "maintenance",
        }
    }

    /// Parses a name; [`TimerError::UnknownCategory`] otherwise.
    pub fn parse(name: &str) -> Result<Category> {
        Category::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or(TimerError::UnknownCategory)
    }

    fn code(self) -> u8 {
        match self {
            Category::DeferredSend => 1,
            Category::Expiry => 2,
            Category::Maintenance => 3,
        }
    }

    fn from_code(code: u8) -> Result<Category> {
        match code {
            1 => Ok(Category::DeferredSend),
            2 => Ok(Category::Expiry),
            3 => Ok(Category::Maintenance),
            _ => Err(TimerError::Corrupt("unknown category code")),
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Highest priority; priorities run from 0 (lowest) to this, and higher fires first.
pub const PRIORITY_MAX: u8 = 9;

/// A task to schedule.
#[derive(Clone, PartialEq, Eq)]
pub struct NewTask {
    /// Its queue.
    pub category: Category,
    /// 0..=[`PRIORITY_MAX`].
    pub priority: u8,
    /// When it should fire.
    pub due_at: UnixTime,
    /// Opaque bytes handed to the handler (never logged).
    pub payload: Vec<u8>,
    /// Who created it, for the per-owner creation limit; `None` for the node's own tasks,
    /// which the limit does not apply to. Never logged.
    pub owner: Option<String>,
}

impl fmt::Debug for NewTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewTask")
            .field("category", &self.category)
            .field("priority", &self.priority)
            .field("due_at", &self.due_at)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Where a stored task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting for its due time (or due and waiting for a worker).
    Scheduled,
    /// Taken out of circulation by an admin or after too many failures.
    Quarantined,
}

/// A stored task without its payload (kept in memory; the payload stays on disk).
#[derive(Clone, PartialEq, Eq)]
pub struct TaskMeta {
    /// Its id.
    pub id: TaskId,
    /// Its queue.
    pub category: Category,
    /// Its priority.
    pub priority: u8,
    /// When it (next) fires.
    pub due_at: UnixTime,
    /// When it was accepted.
    pub created_at: UnixTime,
    /// Failed or timed-out executions so far.
    pub attempts: u32,
    /// Scheduled or quarantined.
    pub state: TaskState,
    /// Payload length in bytes.
    pub payload_len: u32,
}

impl fmt::Debug for TaskMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskMeta")
            .field("id", &self.id)
            .field("category", &self.category)
            .field("priority", &self.priority)
            .field("due_at", &self.due_at)
            .field("attempts", &self.attempts)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Size of an encoded [`TaskMeta`].
pub const META_LEN: usize = 1 + 16 + 1 + 1 + 8 + 8 + 4 + 1 + 4;
const META_VERSION: u8 = 1;

impl TaskMeta {
    /// Fixed 44-byte encoding: version, id, category, priority, due, created, attempts,
    /// state, payload length (integers big-endian).
    pub fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        let mut w = Writer(&mut out, 0);
        w.put(&[META_VERSION]);
        w.put(&self.id.0);
        w.put(&[self.category.code(), self.priority]);
        w.put(&self.due_at.0.to_be_bytes());
        w.put(&self.created_at.0.to_be_bytes());
        w.put(&self.attempts.to_be_bytes());
        w.put(&[match self.state {
            TaskState::Scheduled => 0,
            TaskState::Quarantined => 1,
        }]);
        w.put(&self.payload_len.to_be_bytes());
        out
    }

    /// Decodes [`TaskMeta::encode`]; a typed error for anything else.
    pub fn decode(bytes: &[u8]) -> Result<TaskMeta> {
        let bytes: &[u8; META_LEN] = bytes
            .try_into()
            .map_err(|_| TimerError::Corrupt("task record length"))?;
        let mut r = Reader(bytes.as_slice());
        if r.u8()? != META_VERSION {
            return Err(TimerError::Corrupt("task record version"));
        }
        let id = TaskId(r.array()?);
        let category = Category::from_code(r.u8()?)?;
        let priority = r.u8()?;
        if priority > PRIORITY_MAX {
            return Err(TimerError::Corrupt("task priority"));
        }
        let due_at = UnixTime(u64::from_be_bytes(r.array()?));
        let created_at = UnixTime(u64::from_be_bytes(r.array()?));
        let attempts = u32::from_be_bytes(r.array()?);
        let state = match r.u8()? {
            0 => TaskState::Scheduled,
            1 => TaskState::Quarantined,
            _ => return Err(TimerError::Corrupt("task state")),
        };
        let payload_len = u32::from_be_bytes(r.array()?);
        Ok(TaskMeta {
            id,
            category,
            priority,
            due_at,
            created_at,
            attempts,
            state,
            payload_len,
        })
    }
}

struct Writer<'a>(&'a mut [u8], usize);

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.1.saturating_add(bytes.len());
        if let Some(dst) = self.0.get_mut(self.1..end) {
            dst.copy_from_slice(bytes);
        }
        self.1 = end;
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(TimerError::Corrupt("task record truncated"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8> {
        self.array::<1>().map(|[b]| b)
    }
}

/// A task handed to a handler.
#[derive(Clone, PartialEq, Eq)]
pub struct FiredTask {
    /// Its id: handlers are idempotent by it (a task may fire more than once).
    pub id: TaskId,
    /// Its category.
    pub category: Category,
    /// When it was due.
    pub due_at: UnixTime,
    /// Earlier failed attempts.
    pub attempts: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl fmt::Debug for FiredTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FiredTask")
            .field("id", &self.id)
            .field("category", &self.category)
            .field("due_at", &self.due_at)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}
