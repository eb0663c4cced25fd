//! [`RocksStore`]: the [`TaskStore`] on RocksDB.
//!
//! Three column families:
//!
//! * `tasks`: `due_at` (u64 big-endian) ‖ task id (16 bytes) → [`TaskMeta::encode`]. Keys sort
//!   by due time, so reading the family in key order yields the tasks in due order.
//! * `payloads`: task id → payload bytes (written once, when the task is created).
//! * `meta`: key string bytes → value (paused categories, owner counters).
//!
//! Every [`TaskStore::apply`] is one `WriteBatch` written with `sync = true`: atomic, and on
//! disk (WAL fsynced) before it returns `Ok`. A failed write poisons the store: RocksDB may
//! itself have stopped accepting writes, and the queue's in-memory state would no longer match
//! the disk if it went on, so every later write is refused until the node restarts.
//!
//! RocksDB is built without compression: everything stored is ciphertext or small records.

use std::path::{Path, PathBuf};

use rocksdb::statistics::Ticker;
use rocksdb::{
    Cache, ColumnFamily, ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch,
    WriteOptions,
};
use whispr_protocol::UnixTime;
use whispr_relay::storage::SyncLatency;

use crate::error::{Result, TimerError};
use crate::store::{Loaded, Mutation, TaskStore};
use crate::task::{TaskId, TaskMeta};

/// Column family of task records, keyed by due time then id.
const CF_TASKS: &str = "tasks";
/// Column family of payloads, keyed by id.
const CF_PAYLOADS: &str = "payloads";
/// Column family of node metadata.
const CF_META: &str = "meta";
/// Our column families (RocksDB also keeps its own `default`, which we leave empty).
const FAMILIES: [&str; 3] = [CF_TASKS, CF_PAYLOADS, CF_META];

/// Length of a key in `tasks`.
const TASK_KEY_LEN: usize = 8 + 16;

/// RocksDB tuning, shared by every store of the project (defined with the mesh's replay
/// store, the lowest crate that opens RocksDB).
pub use whispr_relay::storage::RocksOptions;

/// The [`TaskStore`] on RocksDB. See the module documentation for the layout.
pub struct RocksStore {
    db: std::sync::Arc<DB>,
    /// The options the database was opened with; they hold the statistics object.
    options: Options,
    path: PathBuf,
    poisoned: bool,
    sync_latency: SyncLatency,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// A RocksDB failure as a [`TimerError::Storage`]. RocksDB's status text names the operation,
/// files and the OS error, never keys or values.
fn storage(what: &str, e: &rocksdb::Error) -> TimerError {
    TimerError::Storage(format!("rocksdb {what}: {e}"))
}

/// The `tasks` key of a record.
fn task_key(due_at: UnixTime, id: &TaskId) -> [u8; TASK_KEY_LEN] {
    let mut key = [0u8; TASK_KEY_LEN];
    let (due, rest) = key.split_at_mut(8);
    due.copy_from_slice(&due_at.0.to_be_bytes());
    rest.copy_from_slice(&id.0);
    key
}

/// Decodes one `tasks` entry, checking that the key agrees with the record.
fn decode_task(key: &[u8], value: &[u8]) -> Result<TaskMeta> {
    let key: &[u8; TASK_KEY_LEN] = key
        .try_into()
        .map_err(|_| TimerError::Corrupt("task key length"))?;
    let meta = TaskMeta::decode(value)?;
    if *key != task_key(meta.due_at, &meta.id) {
        return Err(TimerError::Corrupt("task key does not match its record"));
    }
    Ok(meta)
}

impl RocksStore {
    /// Opens (or creates) the store in directory `path`, creating the directory and the
    /// column families if missing.
    pub fn open(path: &Path, options: RocksOptions) -> Result<RocksStore> {
        std::fs::create_dir_all(path)
            .map_err(|e| TimerError::Storage(format!("creating {}: {e}", path.display())))?;
        let db_options = options.db_options();
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let families = FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, options.cf_options(&cache)));
        let db = DB::open_cf_descriptors(&db_options, path, families)
            .map_err(|e| storage("open", &e))?;
        Ok(RocksStore {
            db: std::sync::Arc::new(db),
            options: db_options,
            path: path.to_path_buf(),
            poisoned: false,
            sync_latency: SyncLatency::default(),
        })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open database, shared: online backups ([`crate::backup`]) run on it
    /// from a blocking thread without holding the lock of whatever owns this store.
    pub fn shared_db(&self) -> std::sync::Arc<DB> {
        self.db.clone()
    }

    /// Whether a failed write poisoned the store (every write is then refused).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// How long the store's synced writes took.
    pub fn sync_latency(&self) -> &SyncLatency {
        &self.sync_latency
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| TimerError::Storage(format!("column family {name} missing")))
    }

    /// RocksDB's statistics dump, when [`RocksOptions::statistics`] is on.
    pub fn statistics(&self) -> Option<String> {
        self.options.get_statistics()
    }

    /// Bytes of keys and values written through the store since it was opened (RocksDB's
    /// `rocksdb.bytes.written`); 0 when statistics are off.
    pub fn bytes_written(&self) -> u64 {
        self.options.get_ticker_count(Ticker::BytesWritten)
    }

    /// Bytes appended to the write-ahead log since the store was opened (RocksDB's
    /// `rocksdb.wal.bytes`); 0 when statistics are off.
    pub fn wal_bytes_written(&self) -> u64 {
        self.options.get_ticker_count(Ticker::WalFileBytes)
    }

    /// Total size of the SST files of our column families (what the memtables have been
    /// flushed to; excludes the WAL).
    pub fn sst_files_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for name in FAMILIES {
            let size = self
                .db
                .property_int_value_cf(self.cf(name)?, rocksdb::properties::TOTAL_SST_FILES_SIZE)
                .map_err(|e| storage("property", &e))?
                .unwrap_or(0);
            total = total.saturating_add(size);
        }
        Ok(total)
    }

    /// Sum of the sizes of the files in the database directory (SST files, WAL, manifest,
    /// RocksDB's own logs): the store's footprint on disk.
    pub fn disk_usage_bytes(&self) -> u64 {
        dir_size(&self.path, 4)
    }

    /// Flushes every memtable to SST files (the WAL is already durable; this is for
    /// measurements and before backups).
    pub fn flush(&self) -> Result<()> {
        for name in FAMILIES {
            self.db
                .flush_cf(self.cf(name)?)
                .map_err(|e| storage("flush", &e))?;
        }
        Ok(())
    }

    /// Builds the write batch of `mutations`.
    fn build_batch(&self, mutations: Vec<Mutation>) -> Result<WriteBatch> {
        let tasks = self.cf(CF_TASKS)?;
        let payloads = self.cf(CF_PAYLOADS)?;
        let meta_cf = self.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        for m in mutations {
            match m {
                Mutation::PutTask {
                    meta,
                    payload,
                    previous_due,
                } => {
                    if let Some(previous) = previous_due
                        && previous != meta.due_at
                    {
                        batch.delete_cf(tasks, task_key(previous, &meta.id));
                    }
                    batch.put_cf(tasks, task_key(meta.due_at, &meta.id), meta.encode());
                    if let Some(payload) = payload {
                        batch.put_cf(payloads, meta.id.0, payload);
                    }
                }
                Mutation::DeleteTask { meta } => {
                    batch.delete_cf(tasks, task_key(meta.due_at, &meta.id));
                    batch.delete_cf(payloads, meta.id.0);
                }
                Mutation::PutMeta { key, value } => batch.put_cf(meta_cf, key.as_bytes(), value),
                Mutation::DeleteMeta { key } => batch.delete_cf(meta_cf, key.as_bytes()),
            }
        }
        Ok(batch)
    }
}

/// Sum of file sizes under `dir`, descending at most `depth` levels; unreadable entries
/// count as 0.
fn dir_size(dir: &Path, depth: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(std::result::Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(md) if md.is_file() => md.len(),
            Ok(md) if md.is_dir() && depth > 0 => dir_size(&entry.path(), depth - 1),
            _ => 0,
        })
        .fold(0u64, u64::saturating_add)
}

impl TaskStore for RocksStore {
    fn load(&mut self) -> Result<Loaded> {
        let mut loaded = Loaded::default();
        for item in self.db.iterator_cf(self.cf(CF_TASKS)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| storage("read", &e))?;
            loaded.tasks.push(decode_task(&key, &value)?);
        }
        for item in self.db.iterator_cf(self.cf(CF_META)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| storage("read", &e))?;
            let key = String::from_utf8(key.into_vec())
                .map_err(|_| TimerError::Corrupt("meta key is not UTF-8"))?;
            loaded.meta.insert(key, value.into_vec());
        }
        Ok(loaded)
    }

    fn payload(&self, id: &TaskId) -> Result<Vec<u8>> {
        self.db
            .get_cf(self.cf(CF_PAYLOADS)?, id.0)
            .map_err(|e| storage("read", &e))?
            .ok_or(TimerError::NotFound)
    }

    fn apply(&mut self, batch: Vec<Mutation>) -> Result<()> {
        if self.poisoned {
            return Err(TimerError::Poisoned);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let batch = self.build_batch(batch)?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(true);
        let started = std::time::Instant::now();
        if let Err(e) = self.db.write_opt(batch, &write_options) {
            self.poisoned = true;
            return Err(storage("write", &e));
        }
        self.sync_latency.observe(started.elapsed());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Category, TaskState};

    fn meta(due: u64, id: u8) -> TaskMeta {
        TaskMeta {
            id: TaskId([id; 16]),
            category: Category::Expiry,
            priority: 3,
            due_at: UnixTime(due),
            created_at: UnixTime(1),
            attempts: 0,
            state: TaskState::Scheduled,
            payload_len: 0,
        }
    }

    #[test]
    fn task_keys_sort_by_due_then_id() {
        let a = task_key(UnixTime(1), &TaskId([0xFF; 16]));
        let b = task_key(UnixTime(2), &TaskId([0; 16]));
        let c = task_key(UnixTime(2), &TaskId([1; 16]));
        let d = task_key(UnixTime(256), &TaskId([0; 16]));
        assert!(a < b && b < c && c < d);
    }

    #[test]
    fn decode_checks_key_against_record() {
        let m = meta(5, 7);
        let key = task_key(m.due_at, &m.id);
        assert_eq!(decode_task(&key, &m.encode()).unwrap(), m);
        let other = task_key(UnixTime(6), &m.id);
        assert!(matches!(
            decode_task(&other, &m.encode()),
            Err(TimerError::Corrupt(_))
        ));
        assert!(matches!(
            decode_task(&key[..10], &m.encode()),
            Err(TimerError::Corrupt(_))
        ));
        assert!(matches!(
            decode_task(&key, b"garbage"),
            Err(TimerError::Corrupt(_))
        ));
    }
}
