//! Where tasks live: the [`TaskStore`] trait, and [`MemoryStore`] for unit tests and the
//! simulator. The RocksDB implementation is in [`crate::rocks`].

use std::collections::BTreeMap;

use crate::error::{Result, TimerError};
use crate::task::{TaskId, TaskMeta};

/// One change to the store; a batch of them is applied atomically.
#[derive(Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Insert a task, or replace its record. `payload` is written when given (new tasks) and
    /// left as it is when `None`. `previous_due` names the record's old key when the due time
    /// changed (the RocksDB store keys records by due time).
    PutTask {
        /// The record.
        meta: TaskMeta,
        /// The payload, for new tasks.
        payload: Option<Vec<u8>>,
        /// The due time the record was stored under before, if it was stored.
        previous_due: Option<whispr_protocol::UnixTime>,
    },
    /// Remove a task and its payload.
    DeleteTask {
        /// The record to remove.
        meta: TaskMeta,
    },
    /// Set a key of node metadata (paused categories, owner counters).
    PutMeta {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove a key of node metadata.
    DeleteMeta {
        /// The key.
        key: String,
    },
}

impl std::fmt::Debug for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mutation::PutTask { meta, .. } => write!(f, "PutTask({:?})", meta.id),
            Mutation::DeleteTask { meta } => write!(f, "DeleteTask({:?})", meta.id),
            Mutation::PutMeta { .. } => f.write_str("PutMeta(..)"),
            Mutation::DeleteMeta { .. } => f.write_str("DeleteMeta(..)"),
        }
    }
}

/// What a store holds, as read at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every task record, in due order.
    pub tasks: Vec<TaskMeta>,
    /// Node metadata.
    pub meta: BTreeMap<String, Vec<u8>>,
}

/// Durable storage of tasks.
///
/// Contract: [`TaskStore::apply`] is atomic and durable — when it returns `Ok`, the whole
/// batch survives a crash (`kill -9`, power loss with a synced WAL); when it returns `Err`,
/// none of it was applied, and the store then refuses every further write with
/// [`TimerError::Poisoned`] rather than guess what is on disk.
pub trait TaskStore {
    /// Reads everything back (at start-up).
    fn load(&mut self) -> Result<Loaded>;
    /// A task's payload.
    fn payload(&self, id: &TaskId) -> Result<Vec<u8>>;
    /// Applies a batch atomically and durably.
    fn apply(&mut self, batch: Vec<Mutation>) -> Result<()>;

    /// Payloads of stored tasks, one result per record, in order. The default reads them one
    /// by one by id; a store may read them as one batch, by the records' keys.
    fn payloads(&self, tasks: &[TaskMeta]) -> Vec<Result<Vec<u8>>> {
        tasks.iter().map(|meta| self.payload(&meta.id)).collect()
    }

    /// Applies a batch atomically, durably *later*: it may return before the batch is on
    /// disk, but every batch (deferred or not) reaches the disk in the order it was given,
    /// and [`TaskStore::apply`] returns only once every earlier deferred batch is on disk
    /// too. A deferred batch that fails poisons the store as a failed [`TaskStore::apply`]
    /// does; the failure is reported by the next call. For writes whose loss in a crash is
    /// harmless (a completed task's removal: the task fires again). The default applies at
    /// once.
    fn apply_deferred(&mut self, batch: Vec<Mutation>) -> Result<()> {
        self.apply(batch)
    }

    /// Waits until every deferred batch is on disk; the error if one failed.
    fn sync_deferred(&mut self) -> Result<()> {
        Ok(())
    }
}

/// An in-memory store, for unit tests and the simulator. It can be told to fail its next
/// write, to test the poisoning contract.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    tasks: BTreeMap<TaskId, (TaskMeta, Vec<u8>)>,
    meta: BTreeMap<String, Vec<u8>>,
    poisoned: bool,
    fail_next_write: bool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes the next [`TaskStore::apply`] fail (and poison the store).
    pub fn fail_next_write(&mut self) {
        self.fail_next_write = true;
    }

    /// Number of stored tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is stored.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl TaskStore for MemoryStore {
    fn load(&mut self) -> Result<Loaded> {
        let mut tasks: Vec<TaskMeta> = self.tasks.values().map(|(m, _)| m.clone()).collect();
        tasks.sort_by_key(|m| (m.due_at, m.id));
        Ok(Loaded {
            tasks,
            meta: self.meta.clone(),
        })
    }

    fn payload(&self, id: &TaskId) -> Result<Vec<u8>> {
        self.tasks
            .get(id)
            .map(|(_, p)| p.clone())
            .ok_or(TimerError::NotFound)
    }

    fn apply(&mut self, batch: Vec<Mutation>) -> Result<()> {
        if self.poisoned {
            return Err(TimerError::Poisoned);
        }
        if self.fail_next_write {
            self.fail_next_write = false;
            self.poisoned = true;
            return Err(TimerError::Storage("injected write failure".into()));
        }
        for m in batch {
            match m {
                Mutation::PutTask { meta, payload, .. } => {
                    let payload = match payload {
                        Some(p) => p,
                        None => self
                            .tasks
                            .get(&meta.id)
                            .map(|(_, p)| p.clone())
                            .unwrap_or_default(),
                    };
                    self.tasks.insert(meta.id, (meta, payload));
                }
                Mutation::DeleteTask { meta } => {
                    self.tasks.remove(&meta.id);
                }
                Mutation::PutMeta { key, value } => {
                    self.meta.insert(key, value);
                }
                Mutation::DeleteMeta { key } => {
                    self.meta.remove(&key);
                }
            }
        }
        Ok(())
    }
}
