//! [`RocksStore`]: the [`TaskStore`] on RocksDB.
//!
//! Three column families:
//!
//! * `tasks`: `due_at` (u64 big-endian) ‖ task id (16 bytes) → [`TaskMeta::encode`]. Keys sort
//!   by due time, so reading the family in key order yields the tasks in due order.
//! * `payloads`: `due_at` ‖ task id (the task's key in `tasks`) → payload bytes, written when
//!   the task is created and moved with it when its due time changes. Tasks fire in due order,
//!   so the payloads of a poll sit side by side in a few blocks: one batched `MultiGet` reads
//!   them, where keys by id alone cost a random block read per fire. Stores written before
//!   this layout keep some payloads under the task id alone (16-byte keys); they are read
//!   there when the due-time key is missing, and deleted with their task. A store created
//!   with this layout says so in RocksDB's `default` family (key `payload-layout`), and then
//!   skips those lookups and deletes.
//! * `meta`: key string bytes → value (paused categories, owner counters).
//!
//! Every [`TaskStore::apply`] is one `WriteBatch` written with `sync = true`: atomic, and on
//! disk (WAL fsynced) before it returns `Ok`. A failed write poisons the store: RocksDB may
//! itself have stopped accepting writes, and the queue's in-memory state would no longer match
//! the disk if it went on, so every later write is refused until the node restarts.
//!
//! [`TaskStore::apply_deferred`] (completed tasks' removals) hands its batch to a writer
//! thread, started at the first such call, through a queue of at most
//! [`DEFERRED_BATCHES_MAX`] batches (a full queue makes the caller wait). The thread merges
//! whatever is queued into one synced `WriteBatch` (group commit), in order; a synced
//! [`TaskStore::apply`] first waits for every deferred batch before it, so writes reach the
//! disk in the order they were made. A failed deferred write poisons the store as a failed
//! synced one does. Dropping the store writes what is still queued before it closes.
//!
//! RocksDB is built without compression: everything stored is ciphertext or small records.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use rocksdb::statistics::Ticker;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, IteratorMode, Options,
    WriteBatch, WriteOptions,
};
use whispr_protocol::UnixTime;
use whispr_relay::storage::SyncLatency;

use crate::error::{Result, TimerError};
use crate::store::{Loaded, Mutation, TaskStore};
use crate::task::{META_LEN, TaskId, TaskMeta};

/// Column family of task records, keyed by due time then id.
const CF_TASKS: &str = "tasks";
/// Column family of payloads, keyed by due time then id (older stores: by id).
const CF_PAYLOADS: &str = "payloads";
/// Column family of node metadata.
const CF_META: &str = "meta";
/// Our column families (RocksDB also keeps its own `default`, which we leave empty).
const FAMILIES: [&str; 3] = [CF_TASKS, CF_PAYLOADS, CF_META];

/// Key, in RocksDB's `default` family, of the marker of a store whose every payload is keyed
/// by due time then id.
const LAYOUT_KEY: &[u8] = b"payload-layout";
/// Its value.
const LAYOUT_DUE_ID: &[u8] = b"due-id";

/// Length of a key in `tasks`.
const TASK_KEY_LEN: usize = 8 + 16;

/// Deferred batches queued for the writer thread at most; [`TaskStore::apply_deferred`]
/// waits while the queue is full (backpressure, never loss).
pub const DEFERRED_BATCHES_MAX: usize = 1024;

/// RocksDB tuning, shared by every store of the project (defined with the mesh's replay
/// store, the lowest crate that opens RocksDB).
pub use whispr_relay::storage::RocksOptions;

/// The [`TaskStore`] on RocksDB. See the module documentation for the layout.
pub struct RocksStore {
    db: Arc<DB>,
    /// The options the database was opened with; they hold the statistics object.
    options: Options,
    path: PathBuf,
    /// What the store and its writer thread share.
    shared: Arc<WriterShared>,
    /// The writer thread of deferred batches, once started.
    writer: Option<Writer>,
    /// Whether payloads may sit under the older layout's keys (task id alone).
    legacy: bool,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

/// State shared by a [`RocksStore`] and its writer thread.
#[derive(Default)]
struct WriterShared {
    /// Set by the first failed write, synced or deferred; never cleared.
    poisoned: AtomicBool,
    /// Deferred batches queued and not yet written (or dropped after a failure).
    pending: AtomicUsize,
    /// What made a deferred write fail (RocksDB's status text: no keys or values).
    failure: Mutex<Option<String>>,
    sync_latency: SyncLatency,
}

/// One job of the writer thread.
enum Job {
    /// A deferred batch to write.
    Write(Vec<Mutation>),
    /// Answered once every job queued before it is done.
    Barrier(SyncSender<()>),
}

/// The writer thread of deferred batches and the queue to it.
struct Writer {
    jobs: Option<SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RocksStore {
    /// Writes what is still queued, then lets the database close.
    fn drop(&mut self) {
        if let Some(mut writer) = self.writer.take() {
            drop(writer.jobs.take());
            if let Some(thread) = writer.thread.take()
                && thread.join().is_err()
            {
                tracing::error!("the timer store's writer thread panicked");
            }
        }
    }
}

/// The writer thread: merges whatever is queued into one synced write, in order.
fn writer_loop(db: &DB, jobs: &Receiver<Job>, shared: &WriterShared, legacy: bool) {
    while let Ok(first) = jobs.recv() {
        let mut mutations = Vec::new();
        let mut writes = 0usize;
        let mut barriers = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(batch) => {
                    writes += 1;
                    mutations.extend(batch);
                }
                Job::Barrier(reply) => barriers.push(reply),
            }
            if writes < DEFERRED_BATCHES_MAX {
                // Empty or disconnected: write what was gathered.
                next = jobs.try_recv().ok();
            }
        }
        if writes > 0 {
            if !shared.poisoned.load(Ordering::Acquire) {
                let started = std::time::Instant::now();
                match build_batch(db, mutations, legacy).and_then(|batch| write_synced(db, batch)) {
                    Ok(()) => shared.sync_latency.observe(started.elapsed()),
                    Err(e) => {
                        tracing::error!(error = %e, "a deferred timer store write failed; the store refuses every further write");
                        if let Ok(mut failure) = shared.failure.lock() {
                            failure.get_or_insert_with(|| e.to_string());
                        }
                        shared.poisoned.store(true, Ordering::Release);
                    }
                }
            }
            shared.pending.fetch_sub(writes, Ordering::AcqRel);
        }
        for reply in barriers {
            // The waiter may be gone; nothing to tell it then.
            let _sent = reply.send(());
        }
    }
}

/// Tunes the `payloads` family for point lookups (every fire reads one payload): bloom
/// filters in its SST files (10 bits a key) and in its memtable, so that a lookup skips the
/// files and the memtable (full of fired tasks' tombstones) that cannot hold its key. The
/// `tasks` family is only ever read in order and keeps the shared options.
fn payload_lookups(cf_options: &mut Options, cache: &Cache) {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    cf_options.set_block_based_table_factory(&table);
    cf_options.set_memtable_whole_key_filtering(true);
    cf_options.set_memtable_prefix_bloom_ratio(0.02);
}

/// Writes `batch` with a synced WAL.
fn write_synced(db: &DB, batch: WriteBatch) -> Result<()> {
    let mut write_options = WriteOptions::default();
    write_options.set_sync(true);
    db.write_opt(batch, &write_options)
        .map_err(|e| storage("write", &e))
}

/// A column family of `db`.
fn column_family<'a>(db: &'a DB, name: &'static str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| TimerError::Storage(format!("column family {name} missing")))
}

/// A stored payload: under the task's key, or (older stores) under its id alone.
fn read_payload(db: &DB, due_at: UnixTime, id: &TaskId, legacy: bool) -> Result<Option<Vec<u8>>> {
    let payloads = column_family(db, CF_PAYLOADS)?;
    let payload = db
        .get_cf(payloads, task_key(due_at, id))
        .map_err(|e| storage("read", &e))?;
    if payload.is_some() || !legacy {
        return Ok(payload);
    }
    db.get_cf(payloads, id.0).map_err(|e| storage("read", &e))
}

/// One write of a batch to the `tasks` or `payloads` family, before sorting.
struct KeyedOp {
    /// 0: `tasks`, 1: `payloads`.
    family: u8,
    /// The key: a task key (24 bytes), or the older layout's payload key (16 bytes).
    key: [u8; TASK_KEY_LEN],
    len: u8,
    /// `None`: a deletion.
    value: Option<OpValue>,
}

/// The value of a put: a task record or a payload.
enum OpValue {
    Record([u8; META_LEN]),
    Payload(Vec<u8>),
}

impl OpValue {
    fn bytes(&self) -> &[u8] {
        match self {
            OpValue::Record(record) => record,
            OpValue::Payload(payload) => payload,
        }
    }
}

impl KeyedOp {
    fn task_key(family: u8, key: [u8; TASK_KEY_LEN], value: Option<OpValue>) -> KeyedOp {
        KeyedOp {
            family,
            key,
            len: TASK_KEY_LEN as u8,
            value,
        }
    }

    /// A deletion of the older layout's payload key (the task id alone).
    fn legacy_payload(id: &TaskId) -> KeyedOp {
        let mut key = [0u8; TASK_KEY_LEN];
        let (head, _) = key.split_at_mut(16);
        head.copy_from_slice(&id.0);
        KeyedOp {
            family: 1,
            key,
            len: 16,
            value: None,
        }
    }

    fn key(&self) -> &[u8] {
        self.key.get(..usize::from(self.len)).unwrap_or(&self.key)
    }
}

/// Builds the write batch of `mutations`. A record rewritten under a new due time without a
/// payload has its payload moved to the new key: read from the database as it stands (every
/// earlier write is on it), or from an earlier mutation of the same batch.
///
/// The writes of each family go into the batch in key order (a stable sort, so that two
/// writes of one key keep their order; writes to different keys of one atomic batch commute).
/// RocksDB inserts a batch into its memtable skip list one write after the other, starting
/// each search from where the previous one ended: in key order, each insert is a short walk;
/// in the order tasks were scheduled (due times at random) each is a search from the top,
/// which was most of the schedule path's CPU (profiled: 40 % in `FindSpliceForLevel`).
fn build_batch(db: &DB, mutations: Vec<Mutation>, legacy: bool) -> Result<WriteBatch> {
    let tasks = column_family(db, CF_TASKS)?;
    let payloads = column_family(db, CF_PAYLOADS)?;
    let meta_cf = column_family(db, CF_META)?;
    // Tasks whose payload moves without being given (rare: retries, lease expiries).
    let moving: std::collections::BTreeSet<TaskId> = mutations
        .iter()
        .filter_map(|m| match m {
            Mutation::PutTask {
                meta,
                payload: None,
                previous_due: Some(previous),
            } if *previous != meta.due_at => Some(meta.id),
            _ => None,
        })
        .collect();
    let mut in_batch: std::collections::BTreeMap<TaskId, Vec<u8>> = Default::default();
    let mut ops: Vec<KeyedOp> = Vec::with_capacity(mutations.len() * 2);
    let mut batch = WriteBatch::default();
    for m in mutations {
        match m {
            Mutation::PutTask {
                meta,
                payload,
                previous_due,
            } => {
                let moved = previous_due.filter(|previous| *previous != meta.due_at);
                if let Some(previous) = moved {
                    ops.push(KeyedOp::task_key(0, task_key(previous, &meta.id), None));
                }
                let key = task_key(meta.due_at, &meta.id);
                ops.push(KeyedOp::task_key(
                    0,
                    key,
                    Some(OpValue::Record(meta.encode())),
                ));
                let payload = match (payload, moved) {
                    (Some(payload), _) => Some(payload),
                    (None, Some(previous)) => Some(match in_batch.get(&meta.id) {
                        Some(payload) => payload.clone(),
                        None => read_payload(db, previous, &meta.id, legacy)?
                            .ok_or(TimerError::Corrupt("a stored task has no payload"))?,
                    }),
                    (None, None) => None,
                };
                if let Some(payload) = payload {
                    if let Some(previous) = previous_due {
                        // The replaced payload, under its old key and the older layout's.
                        if previous != meta.due_at {
                            ops.push(KeyedOp::task_key(1, task_key(previous, &meta.id), None));
                        }
                        if legacy {
                            ops.push(KeyedOp::legacy_payload(&meta.id));
                        }
                    }
                    if moving.contains(&meta.id) {
                        in_batch.insert(meta.id, payload.clone());
                    }
                    ops.push(KeyedOp::task_key(1, key, Some(OpValue::Payload(payload))));
                }
            }
            Mutation::DeleteTask { meta } => {
                let key = task_key(meta.due_at, &meta.id);
                ops.push(KeyedOp::task_key(0, key, None));
                ops.push(KeyedOp::task_key(1, key, None));
                if legacy {
                    // The older layout's key (nothing there for tasks stored since).
                    ops.push(KeyedOp::legacy_payload(&meta.id));
                }
                in_batch.remove(&meta.id);
            }
            Mutation::PutMeta { key, value } => batch.put_cf(meta_cf, key.as_bytes(), value),
            Mutation::DeleteMeta { key } => batch.delete_cf(meta_cf, key.as_bytes()),
        }
    }
    // One run per family: a batch of tasks fired in due order is sorted already, which the
    // stable sort finds in one pass.
    let (mut task_ops, mut payload_ops): (Vec<KeyedOp>, Vec<KeyedOp>) =
        ops.into_iter().partition(|op| op.family == 0);
    task_ops.sort_by(|a, b| a.key().cmp(b.key()));
    payload_ops.sort_by(|a, b| a.key().cmp(b.key()));
    for (family, ops) in [(tasks, task_ops), (payloads, payload_ops)] {
        for op in ops {
            match &op.value {
                Some(value) => batch.put_cf(family, op.key(), value.bytes()),
                None => batch.delete_cf(family, op.key()),
            }
        }
    }
    Ok(batch)
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
        let families = FAMILIES.iter().map(|name| {
            let mut cf_options = options.cf_options(&cache);
            if *name == CF_PAYLOADS {
                payload_lookups(&mut cf_options, &cache);
            }
            ColumnFamilyDescriptor::new(*name, cf_options)
        });
        let db = DB::open_cf_descriptors(&db_options, path, families)
            .map_err(|e| storage("open", &e))?;
        let legacy = match db.get(LAYOUT_KEY).map_err(|e| storage("read", &e))? {
            Some(layout) if layout == LAYOUT_DUE_ID => false,
            Some(_) => return Err(TimerError::Corrupt("unknown payload layout")),
            None => {
                let payloads = column_family(&db, CF_PAYLOADS)?;
                let empty = db
                    .iterator_cf(payloads, IteratorMode::Start)
                    .next()
                    .is_none();
                if empty {
                    let mut sync = WriteOptions::default();
                    sync.set_sync(true);
                    db.put_opt(LAYOUT_KEY, LAYOUT_DUE_ID, &sync)
                        .map_err(|e| storage("write", &e))?;
                }
                !empty
            }
        };
        Ok(RocksStore {
            db: Arc::new(db),
            options: db_options,
            path: path.to_path_buf(),
            shared: Arc::new(WriterShared::default()),
            writer: None,
            legacy,
        })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open database, shared: online backups ([`crate::backup`]) run on it
    /// from a blocking thread without holding the lock of whatever owns this store.
    pub fn shared_db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Whether a failed write poisoned the store (every write is then refused).
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// How long the store's synced writes took (deferred ones included).
    pub fn sync_latency(&self) -> &SyncLatency {
        &self.shared.sync_latency
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        column_family(&self.db, name)
    }

    /// The queue to the writer thread, starting the thread at the first call.
    fn writer(&mut self) -> Result<&SyncSender<Job>> {
        if self.writer.is_none() {
            let (jobs, queue) = std::sync::mpsc::sync_channel(DEFERRED_BATCHES_MAX);
            let (db, shared, legacy) =
                (Arc::clone(&self.db), Arc::clone(&self.shared), self.legacy);
            let thread = std::thread::Builder::new()
                .name("timer-store-writer".into())
                .spawn(move || writer_loop(&db, &queue, &shared, legacy))
                .map_err(|e| TimerError::Storage(format!("starting the writer thread: {e}")))?;
            self.writer = Some(Writer {
                jobs: Some(jobs),
                thread: Some(thread),
            });
        }
        self.writer
            .as_ref()
            .and_then(|w| w.jobs.as_ref())
            .ok_or_else(|| TimerError::Storage("the writer thread is stopped".into()))
    }

    /// The error that poisoned the store, if any.
    fn poisoned_error(&self) -> Option<TimerError> {
        if !self.is_poisoned() {
            return None;
        }
        let failure = self
            .shared
            .failure
            .lock()
            .ok()
            .and_then(|mut failure| failure.take());
        Some(failure.map_or(TimerError::Poisoned, TimerError::Storage))
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

    /// By id alone: the older layout's key, else a scan of `tasks` for the task's due time
    /// (linear in the tasks stored: for tests and tools; the queue reads through
    /// [`TaskStore::payloads`] with the record).
    fn payload(&self, id: &TaskId) -> Result<Vec<u8>> {
        if self.legacy
            && let Some(payload) = self
                .db
                .get_cf(self.cf(CF_PAYLOADS)?, id.0)
                .map_err(|e| storage("read", &e))?
        {
            return Ok(payload);
        }
        for item in self.db.iterator_cf(self.cf(CF_TASKS)?, IteratorMode::Start) {
            let (key, _) = item.map_err(|e| storage("read", &e))?;
            if let Some((due, task_id)) = key.split_first_chunk::<8>()
                && task_id == id.0
            {
                return read_payload(
                    &self.db,
                    UnixTime(u64::from_be_bytes(*due)),
                    id,
                    self.legacy,
                )?
                .ok_or(TimerError::NotFound);
            }
        }
        Err(TimerError::NotFound)
    }

    /// One batched RocksDB `MultiGet` of the records' keys, which tasks due together share
    /// blocks of; the older layout's key for those not found.
    fn payloads(&self, tasks: &[TaskMeta]) -> Vec<Result<Vec<u8>>> {
        let cf = match self.cf(CF_PAYLOADS) {
            Ok(cf) => cf,
            Err(e) => return tasks.iter().map(|_| Err(e.clone())).collect(),
        };
        let keys: Vec<[u8; TASK_KEY_LEN]> = tasks
            .iter()
            .map(|meta| task_key(meta.due_at, &meta.id))
            .collect();
        self.db
            .batched_multi_get_cf(cf, &keys, false)
            .into_iter()
            .zip(tasks)
            .map(|(read, meta)| match read {
                Ok(Some(value)) => Ok(value.to_vec()),
                Ok(None) if self.legacy => self
                    .db
                    .get_cf(cf, meta.id.0)
                    .map_err(|e| storage("read", &e))?
                    .ok_or(TimerError::NotFound),
                Ok(None) => Err(TimerError::NotFound),
                Err(e) => Err(storage("read", &e)),
            })
            .collect()
    }

    fn apply(&mut self, batch: Vec<Mutation>) -> Result<()> {
        if self.is_poisoned() {
            return Err(TimerError::Poisoned);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // Deferred batches first: writes reach the disk in the order they were made.
        self.sync_deferred()?;
        let started = std::time::Instant::now();
        if let Err(e) =
            build_batch(&self.db, batch, self.legacy).and_then(|b| write_synced(&self.db, b))
        {
            self.shared.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        self.shared.sync_latency.observe(started.elapsed());
        Ok(())
    }

    fn apply_deferred(&mut self, batch: Vec<Mutation>) -> Result<()> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let jobs = self.writer()?;
        shared.pending.fetch_add(1, Ordering::AcqRel);
        if jobs.send(Job::Write(batch)).is_err() {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            shared.poisoned.store(true, Ordering::Release);
            return Err(TimerError::Storage("the writer thread is stopped".into()));
        }
        Ok(())
    }

    fn sync_deferred(&mut self) -> Result<()> {
        if self.shared.pending.load(Ordering::Acquire) > 0 {
            let (reply, done) = std::sync::mpsc::sync_channel(1);
            let sent = self
                .writer()
                .map(|jobs| jobs.send(Job::Barrier(reply)).is_ok());
            if !matches!(sent, Ok(true)) || done.recv().is_err() {
                self.shared.poisoned.store(true, Ordering::Release);
                return Err(TimerError::Storage("the writer thread is stopped".into()));
            }
        }
        self.poisoned_error().map_or(Ok(()), Err)
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
