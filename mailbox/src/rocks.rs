//! [`RocksStore`]: the [`MailboxStore`] on RocksDB.
//!
//! One RocksDB column family per [`Cf`], named by [`Cf::name`] (RocksDB also keeps its own
//! `default`, which we leave empty). Keys and values are stored as the core gives them; the
//! key layout is in `docs/mailbox.md`.
//!
//! Every [`MailboxStore::write`] is one `WriteBatch`: atomic, and with `sync` on disk (WAL
//! fsynced) before it returns `Ok`. A failed write poisons the store: RocksDB may itself have
//! stopped accepting writes, and the core's in-memory state would no longer match the disk if
//! it went on, so every later write is refused until the node restarts.
//!
//! RocksDB is built without compression: everything stored is ciphertext or small records.
//!
//! Envelope bodies ([`Cf::Bodies`]) use RocksDB's integrated BlobDB (runtime options only,
//! see [`family_options`]): a flush writes each body once to a blob file and the SST files
//! keep only a small reference, so leveled compactions rewrite keys and references, not
//! bodies. A database written before this family existed opens as is: its inline envelope
//! values stay readable where they are.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rocksdb::statistics::Ticker;
use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily, ColumnFamilyDescriptor,
    CompactOptions, DB, Options, ReadOptions, WriteBatch, WriteOptions,
};

use whispr_relay::storage::SyncLatency;

use crate::store::{Cf, MailboxStore, Op, StoreError, StoreStats};

/// RocksDB tuning: the same options, defaults and bounds as the timer store's.
pub use whispr_timer_service::rocks::RocksOptions;

/// The [`MailboxStore`] on RocksDB. See the module documentation.
pub struct RocksStore {
    db: std::sync::Arc<DB>,
    /// The options the database was opened with; they hold the statistics object.
    options: Options,
    path: PathBuf,
    poisoned: AtomicBool,
    synced_writes: AtomicU64,
    sync_latency: SyncLatency,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("poisoned", &self.poisoned.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// A RocksDB failure as a [`StoreError::Backend`]. RocksDB's status text names the
/// operation, files and the OS error, never keys or values.
fn backend(what: &str, e: &rocksdb::Error) -> StoreError {
    StoreError::Backend(format!("rocksdb {what}: {e}"))
}

impl RocksStore {
    /// Opens (or creates) the store in directory `path`, creating the directory and the
    /// column families if missing.
    pub fn open(path: &Path, options: RocksOptions) -> Result<RocksStore, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", path.display())))?;
        let db_options = options.db_options();
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let families = Cf::ALL.iter().map(|cf| {
            ColumnFamilyDescriptor::new(cf.name(), family_options(*cf, &options, &cache))
        });
        let db = DB::open_cf_descriptors(&db_options, path, families)
            .map_err(|e| backend("open", &e))?;
        Ok(RocksStore {
            db: std::sync::Arc::new(db),
            options: db_options,
            path: path.to_path_buf(),
            poisoned: AtomicBool::new(false),
            synced_writes: AtomicU64::new(0),
            sync_latency: SyncLatency::default(),
        })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open database, shared: online backups ([`whispr_timer_service::backup`]) run on it
    /// from a blocking thread without holding the lock of whatever owns this store.
    pub fn shared_db(&self) -> std::sync::Arc<DB> {
        self.db.clone()
    }

    fn cf(&self, cf: Cf) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError::Backend(format!("column family {} missing", cf.name())))
    }

    /// RocksDB's statistics dump, when [`RocksOptions::statistics`] is on.
    pub fn statistics(&self) -> Option<String> {
        self.options.get_statistics()
    }

    /// Total size of the live SST and blob files of our column families (excludes the WAL
    /// and files that only an open iterator still holds).
    pub fn sst_bytes_live(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for cf in Cf::ALL {
            for property in ["rocksdb.live-sst-files-size", LIVE_BLOB_FILE_SIZE] {
                let size = self
                    .db
                    .property_int_value_cf(self.cf(cf)?, property)
                    .map_err(|e| backend("property", &e))?
                    .unwrap_or(0);
                total = total.saturating_add(size);
            }
        }
        Ok(total)
    }

    /// Flushes every memtable to SST files (the WAL is already durable; this is for
    /// measurements and before backups).
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in Cf::ALL {
            self.db
                .flush_cf(self.cf(cf)?)
                .map_err(|e| backend("flush", &e))?;
        }
        Ok(())
    }

    /// Compacts every column family over its whole key range, bottom level included, so
    /// that deleted entries (erased keys after a crypto-erasure, deleted envelopes) are
    /// dropped from the SST files rather than only shadowed by tombstones. Memtables are
    /// flushed first. Blocks until done; this rewrites the whole database.
    pub fn compact(&self) -> Result<(), StoreError> {
        let mut opts = CompactOptions::default();
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
        for cf in Cf::ALL {
            self.db
                .compact_range_cf_opt(self.cf(cf)?, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    /// Flushes every memtable, then compacts each of `ranges` (bottom level included), so
    /// that what was deleted in them is dropped from the files (see
    /// [`crate::core::MailboxCore::take_compaction`]). Blocks until done.
    pub fn compact_ranges(&self, ranges: &[crate::core::CompactRange]) -> Result<(), StoreError> {
        compact_ranges(&self.db, ranges)
    }

    /// Builds the write batch of `ops`. A `DeleteRange` with `from >= to` is empty and left
    /// out (RocksDB would reject `from > to`).
    fn build_batch(&self, ops: Vec<Op>) -> Result<WriteBatch, StoreError> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                Op::Put { cf, key, value } => batch.put_cf(self.cf(cf)?, key, value),
                Op::Delete { cf, key } => batch.delete_cf(self.cf(cf)?, key),
                Op::DeleteRange { cf, from, to } => {
                    if from < to {
                        batch.delete_range_cf(self.cf(cf)?, from, to);
                    }
                }
            }
        }
        Ok(batch)
    }

    /// [`MailboxStore::write`] without the poisoning.
    fn try_write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let batch = self.build_batch(ops)?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        self.db
            .write_opt(batch, &write_options)
            .map_err(|e| backend("write", &e))
    }
}

impl MailboxStore for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(cf)?, key)
            .map_err(|e| backend("read", &e))
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
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(to);
        // Scans are walks over ranges (start-up, sweeps, erasures), read once: they would
        // only push the point reads' blocks out of the cache.
        read_options.fill_cache(false);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, read_options);
        it.seek(from);
        while let Some((key, value)) = it.item() {
            // The upper bound already ends the iteration at `to`; checked again for clarity.
            if key >= to || f(key, value).is_break() {
                break;
            }
            it.next();
        }
        it.status().map_err(|e| backend("scan", &e))
    }

    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Poisoned);
        }
        if ops.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        if let Err(e) = self.try_write(ops, sync) {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if sync {
            self.synced_writes.fetch_add(1, Ordering::Relaxed);
            self.sync_latency.observe(started.elapsed());
        }
        Ok(())
    }

    fn sync_latency(&self) -> Option<&SyncLatency> {
        Some(&self.sync_latency)
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn stats(&self) -> StoreStats {
        let ticker = |t| self.options.get_ticker_count(t);
        StoreStats {
            wal_bytes_written: ticker(Ticker::WalFileBytes),
            sst_bytes_written: ticker(Ticker::FlushWriteBytes)
                .saturating_add(ticker(Ticker::CompactWriteBytes)),
            synced_writes: self.synced_writes.load(Ordering::Relaxed),
            sst_bytes_live: self.sst_bytes_live().unwrap_or(0),
        }
    }
}

/// RocksDB's property: the size of the blob files that the current version references.
const LIVE_BLOB_FILE_SIZE: &str = "rocksdb.live-blob-file-size";

/// Bloom filter bits per dedup key in SST files (about 1 % false positives).
const DEDUP_BLOOM_BITS_PER_KEY: f64 = 10.0;

/// Share of a dedup memtable's size given to its bloom filter.
const DEDUP_MEMTABLE_BLOOM_RATIO: f64 = 0.05;

/// Blob files are cut at this size (a flush of one 8 MiB memtable writes one of about that
/// size).
const BLOB_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The options of column family `cf`: the shared ones of [`RocksOptions::cf_options`]; for
/// [`Cf::Bodies`], also key-value separation (RocksDB's integrated BlobDB: every value goes
/// to a blob file at flush, `min_blob_size` 0). Runtime options only (no build feature).
///
/// Blob garbage collection is off: it relocates every live body of the oldest blob files
/// whenever a compaction meets their references, whether the files hold garbage or not —
/// during a 1M-message fill with the default age cutoff (0.25) that tripled the bytes
/// written. Without it a body is written once; a blob file is deleted once every body in it
/// was deleted (acknowledged, expired or erased) and compactions dropped the references, so
/// a file can be held for up to the retention (`retention_ms_max`) by one long-kept message:
/// disk held, not bytes written.
///
/// [`Cf::Dedup`] gets bloom filters, in its SST files and its memtables: every deposit
/// looks its dedup id up there first, and a new deposit's id is found nowhere, which the
/// filters answer without a search of each memtable and file.
pub fn family_options(cf: Cf, options: &RocksOptions, cache: &Cache) -> Options {
    let mut opts = options.cf_options(cache);
    if cf == Cf::Dedup {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        table.set_bloom_filter(DEDUP_BLOOM_BITS_PER_KEY, false);
        opts.set_block_based_table_factory(&table);
        opts.set_memtable_prefix_bloom_ratio(DEDUP_MEMTABLE_BLOOM_RATIO);
        opts.set_memtable_whole_key_filtering(true);
    }
    if cf == Cf::Bodies {
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(0);
        opts.set_blob_file_size(BLOB_FILE_BYTES);
        opts.set_enable_blob_gc(false);
    }
    opts
}

/// [`RocksStore::compact_ranges`] on a shared database handle ([`RocksStore::shared_db`]),
/// for a driver that compacts without holding the store's owner. Every memtable is flushed
/// first, so that the write-ahead log files that held the deleted keys become obsolete and
/// are removed.
pub fn compact_ranges(db: &DB, ranges: &[crate::core::CompactRange]) -> Result<(), StoreError> {
    if ranges.is_empty() {
        return Ok(());
    }
    let handle = |cf: Cf| {
        db.cf_handle(cf.name())
            .ok_or_else(|| StoreError::Backend(format!("column family {} missing", cf.name())))
    };
    for cf in Cf::ALL {
        db.flush_cf(handle(cf)?).map_err(|e| backend("flush", &e))?;
    }
    let mut opts = CompactOptions::default();
    opts.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
    for r in ranges {
        db.compact_range_cf_opt(handle(r.cf)?, Some(&r.from), Some(&r.to), &opts);
    }
    Ok(())
}
