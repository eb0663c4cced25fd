//! The storage trait under [`crate::core::MailboxCore`]: ordered key-value column families
//! with atomic batches. [`crate::rocks::RocksStore`] keeps them in RocksDB (one synced write
//! per batch); [`MemoryStore`] keeps them in memory for unit tests and the simulator.
//!
//! The store knows nothing of mailboxes: the core chooses keys and encrypts values (see the
//! key layout in `docs/mailbox.md`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The column families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Mailbox records and per-device cursors: `sid ‖ tag ‖ …`.
    Mailboxes,
    /// Envelopes: `sid ‖ seq` → `expires_at ‖ value length` (16 bytes; the body is in
    /// [`Cf::Bodies`]), or, as written before bodies had their own family, the whole
    /// value `expires_at ‖ sealed body` (still read).
    Envelopes,
    /// Dedup ids: `sid ‖ dedup_id`.
    Dedup,
    /// Expiry index: `expires_at ‖ sid ‖ seq`.
    Expiry,
    /// Prekeys: `sid ‖ tag ‖ key_id`.
    Prekeys,
    /// Sealed envelope bodies: `body prefix ‖ seq`, the prefix a keyed hash under the
    /// mailbox's data key (not the storage id). RocksDB keeps these values in blob files
    /// (key-value separation), so that compactions do not rewrite them.
    Bodies,
}

impl Cf {
    /// Every column family.
    pub const ALL: [Cf; 6] = [
        Cf::Mailboxes,
        Cf::Envelopes,
        Cf::Dedup,
        Cf::Expiry,
        Cf::Prekeys,
        Cf::Bodies,
    ];

    /// The column family's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Mailboxes => "mailboxes",
            Cf::Envelopes => "envelopes",
            Cf::Dedup => "dedup",
            Cf::Expiry => "expiry",
            Cf::Prekeys => "prekeys",
            Cf::Bodies => "bodies",
        }
    }
}

/// One change in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets `key` to `value`.
    Put {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
    },
    /// Removes every key in `from..to`.
    DeleteRange {
        /// Column family.
        cf: Cf,
        /// First key removed.
        from: Vec<u8>,
        /// First key kept.
        to: Vec<u8>,
    },
}

/// A storage failure. After a failed write the store is poisoned and refuses further writes
/// with [`StoreError::Poisoned`]; restart the node to recover from the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An earlier write failed; the store refuses writes until it is reopened.
    #[error("store is poisoned by an earlier failed write; restart the node")]
    Poisoned,
    /// The backend failed.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// Storage counters for benchmarks and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes written to the write-ahead log.
    pub wal_bytes_written: u64,
    /// Bytes written to SST files by flushes and compactions.
    pub sst_bytes_written: u64,
    /// Synced batch writes.
    pub synced_writes: u64,
    /// Live SST bytes on disk.
    pub sst_bytes_live: u64,
}

/// Ordered key-value storage with column families and atomic batches.
pub trait MailboxStore: Send + Sync + 'static {
    /// Reads one value.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `f` with every entry whose key is in `from..to`, in key order, until it returns
    /// `Break`.
    #[allow(clippy::type_complexity)]
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError>;

    /// Applies `ops` atomically. With `sync`, returns only once the batch is durable (WAL
    /// fsynced). A failure poisons the store.
    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError>;

    /// True after a failed write.
    fn is_poisoned(&self) -> bool;

    /// Counters; zero where the backend has none.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// How long synced writes took; `None` where the backend does not measure it.
    fn sync_latency(&self) -> Option<&whispr_relay::storage::SyncLatency> {
        None
    }
}

/// A shared store: the core owns one handle and a driver writes through another (the node
/// writes a group commit's batch without holding the core, see [`crate::node`]).
impl<S: MailboxStore> MailboxStore for Arc<S> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(cf, key)
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        (**self).scan(cf, from, to, f)
    }

    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        (**self).write(ops, sync)
    }

    fn is_poisoned(&self) -> bool {
        (**self).is_poisoned()
    }

    fn stats(&self) -> StoreStats {
        (**self).stats()
    }

    fn sync_latency(&self) -> Option<&whispr_relay::storage::SyncLatency> {
        (**self).sync_latency()
    }
}

type Tables = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// In-memory store for unit tests and the simulator. Clones share the same data, so a test
/// can "restart" a core over the same contents.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    poisoned: Arc<AtomicBool>,
    fail_next: Arc<AtomicBool>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes the next write fail (and poison the store), to test failure handling.
    pub fn fail_next_write(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }

    /// Number of entries in `cf`.
    pub fn len(&self, cf: Cf) -> usize {
        self.tables
            .lock()
            .map(|t| t.get(&cf).map_or(0, BTreeMap::len))
            .unwrap_or(0)
    }

    /// A copy of every entry in `cf`, for tests that inspect what is stored.
    pub fn entries(&self, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.tables
            .lock()
            .map(|t| {
                t.get(&cf)
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tables>, StoreError> {
        self.tables
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }
}

impl MailboxStore for MemoryStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.get(&cf).and_then(|m| m.get(key)).cloned())
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        let tables = self.lock()?;
        if let Some(m) = tables.get(&cf) {
            for (k, v) in m.range(from.to_vec()..to.to_vec()) {
                if f(k, v).is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn write(&self, ops: Vec<Op>, _sync: bool) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Poisoned);
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let mut tables = self.lock()?;
        for op in ops {
            match op {
                Op::Put { cf, key, value } => {
                    tables.entry(cf).or_default().insert(key, value);
                }
                Op::Delete { cf, key } => {
                    if let Some(m) = tables.get_mut(&cf) {
                        m.remove(&key);
                    }
                }
                Op::DeleteRange { cf, from, to } => {
                    if from < to
                        && let Some(m) = tables.get_mut(&cf)
                    {
                        let doomed: Vec<Vec<u8>> =
                            m.range(from..to).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            m.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }
}
