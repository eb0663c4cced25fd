//! RocksDB: the options every store of the project shares ([`RocksOptions`]), and the
//! relay's [`ReplayStore`], which keeps Sphinx replay tags across restarts.
//!
//! Replay store layout: one column family `replay`, key = key epoch (u64 big-endian) ‖ tag
//! (32 bytes), empty value. Each [`ReplayStore::persist`] is one synced `WriteBatch`; old
//! epochs go with one range delete ([`ReplayStore::prune_before`]). A failed write poisons
//! the store (every later write is refused until restart), as in the timer and mailbox
//! stores.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use whispr_protocol::KeyEpoch;
use whispr_protocol::sphinx::{REPLAY_TAG_SIZE, ReplayTag};

const MIB: usize = 1024 * 1024;

/// RocksDB tuning for every store of the project (timer, mailbox, replay tags). Every cache
/// and buffer is bounded here.
///
/// Memory use is roughly `block_cache_bytes` + `db_write_buffer_bytes` (the memtables of all
/// column families together; each one is flushed at `write_buffer_bytes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RocksOptions {
    /// Size of one column family's memtable before it is flushed to an SST file. Default
    /// 8 MiB.
    pub write_buffer_bytes: usize,
    /// Memtables of one column family held at once (the active one and those being flushed).
    /// Default 2.
    pub max_write_buffers: u32,
    /// Total memtable size over all column families; reaching it forces a flush. Default
    /// 32 MiB.
    pub db_write_buffer_bytes: usize,
    /// Shared LRU cache of SST blocks. Default 32 MiB.
    pub block_cache_bytes: usize,
    /// Most files RocksDB keeps open. Default 256.
    pub max_open_files: u32,
    /// WAL size over all column families after which memtables are flushed so that old WAL
    /// files can be deleted. Default 64 MiB.
    pub max_total_wal_bytes: u64,
    /// RocksDB's informational `LOG` files kept (rotated at 8 MiB). Default 4.
    pub info_log_files_kept: u32,
    /// Record RocksDB statistics (read by the timer store's `statistics`, `bytes_written`
    /// and `wal_bytes_written`, and the mailbox store's counters). Default true.
    pub statistics: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            write_buffer_bytes: 8 * MIB,
            max_write_buffers: 2,
            db_write_buffer_bytes: 32 * MIB,
            block_cache_bytes: 32 * MIB,
            max_open_files: 256,
            max_total_wal_bytes: 64 * 1024 * 1024,
            info_log_files_kept: 4,
            statistics: true,
        }
    }
}

impl RocksOptions {
    /// The database-wide options (also used by the mailbox store).
    pub fn db_options(&self) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_max_open_files(i32::try_from(self.max_open_files).unwrap_or(i32::MAX));
        opts.set_db_write_buffer_size(self.db_write_buffer_bytes);
        opts.set_max_total_wal_size(self.max_total_wal_bytes);
        opts.set_keep_log_file_num(usize::try_from(self.info_log_files_kept).unwrap_or(1));
        opts.set_max_log_file_size(8 * MIB);
        opts.set_compression_type(DBCompressionType::None);
        if self.statistics {
            opts.enable_statistics();
        }
        opts
    }

    /// The options of one of our column families (also used by the mailbox store).
    pub fn cf_options(&self, cache: &Cache) -> Options {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        let mut opts = Options::default();
        opts.set_compression_type(DBCompressionType::None);
        opts.set_write_buffer_size(self.write_buffer_bytes);
        opts.set_max_write_buffer_number(i32::try_from(self.max_write_buffers).unwrap_or(2));
        opts.set_block_based_table_factory(&table);
        // RocksDB's default since 8.4, stated here: level sizes follow the data, so deleted
        // ranges (range tombstones, old key prefixes) reach the bottom level and are dropped
        // without a large space amplification.
        opts.set_level_compaction_dynamic_level_bytes(true);
        opts
    }
}

const CF_REPLAY: &str = "replay";
const KEY_LEN: usize = 8 + REPLAY_TAG_SIZE;

/// Obsolete write-ahead log files RocksDB keeps to write the next logs into
/// (`recycle_log_file_num`). A synced write into a reused file overwrites blocks that are
/// already allocated and written, so its `fdatasync` does not write the inode as well (the
/// file's size does not change): on this project's ext4 disk that is one I/O wait less per
/// synced write, about 40 % less CPU and latency per sync (2026-12-06: 75–83 µs of CPU and
/// p50 0.16 ms against 132–155 µs and 0.24–0.29 ms when appending, `docs/benchmarks.md`).
const WAL_RECYCLED: usize = 2;
/// A column family that exists only while [`prime_wal`] runs.
const CF_PRIMER: &str = "wal-primer";
/// Bytes [`prime_wal`] writes into each of the two logs it retires.
const WAL_PRIMER_BYTES: usize = MIB;

/// Makes the write-ahead log the store writes next a reused one, written through
/// [`WAL_PRIMER_BYTES`] already: a log is only reused once a memtable flush has retired it,
/// which at a relay's rate of tags takes hours after each start. Twice: an unsynced
/// [`WAL_PRIMER_BYTES`] value into the primer family, and a flush of that family (the
/// replay family's memtable is empty after the open, whose recovery flushes it, so the log
/// holds nothing else and is retired). The first flush retires the log of the open, the
/// second moves the store to it. Tags are never written unsynced: only the filler is.
fn prime_wal(db: &DB) -> Result<(), StoreError> {
    let cf = db.cf_handle(CF_PRIMER).ok_or(StoreError::Rocks {
        what: "column family",
        detail: "primer family missing".into(),
    })?;
    let filler = vec![0u8; WAL_PRIMER_BYTES];
    for _ in 0..2 {
        db.put_cf(cf, b"filler", &filler)
            .map_err(rocks("prime the log"))?;
        db.flush_cf(cf).map_err(rocks("prime the log"))?;
    }
    Ok(())
}

/// A replay store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused (status text names the operation and the OS error, never keys).
    #[error("rocksdb {what}: {detail}")]
    Rocks {
        /// The operation.
        what: &'static str,
        /// RocksDB's status.
        detail: String,
    },
    /// An earlier write failed; writes are refused until restart.
    #[error("replay store poisoned by an earlier failed write; restart the node")]
    Poisoned,
}

fn rocks(what: &'static str) -> impl Fn(rocksdb::Error) -> StoreError {
    move |e| StoreError::Rocks {
        what,
        detail: e.to_string(),
    }
}

/// Where replay tags survive restarts. The simulator and unit tests use [`MemoryReplayStore`].
pub trait ReplayStore: Send + 'static {
    /// Every tag held.
    fn load(&self) -> Result<Vec<(KeyEpoch, ReplayTag)>, StoreError>;
    /// Makes `tags` durable (one synced write).
    fn persist(&mut self, tags: &[(KeyEpoch, ReplayTag)]) -> Result<(), StoreError>;
    /// Forgets the tags of epochs before `epoch`.
    fn prune_before(&mut self, epoch: KeyEpoch) -> Result<(), StoreError>;
}

/// In-memory replay store (tests, simulator).
#[derive(Debug, Default, Clone)]
pub struct MemoryReplayStore {
    tags: std::collections::BTreeSet<(KeyEpoch, ReplayTag)>,
}

impl ReplayStore for MemoryReplayStore {
    fn load(&self) -> Result<Vec<(KeyEpoch, ReplayTag)>, StoreError> {
        Ok(self.tags.iter().copied().collect())
    }
    fn persist(&mut self, tags: &[(KeyEpoch, ReplayTag)]) -> Result<(), StoreError> {
        self.tags.extend(tags.iter().copied());
        Ok(())
    }
    fn prune_before(&mut self, epoch: KeyEpoch) -> Result<(), StoreError> {
        self.tags.retain(|(e, _)| *e >= epoch);
        Ok(())
    }
}

/// The replay store on RocksDB.
pub struct RocksReplayStore {
    db: DB,
    poisoned: bool,
}

impl std::fmt::Debug for RocksReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksReplayStore")
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn key(epoch: KeyEpoch, tag: &ReplayTag) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    let (e, t) = k.split_at_mut(8);
    e.copy_from_slice(&epoch.0.to_be_bytes());
    t.copy_from_slice(&tag.0);
    k
}

impl RocksReplayStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, options: &RocksOptions) -> Result<RocksReplayStore, StoreError> {
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut db_options = options.db_options();
        db_options.set_recycle_log_file_num(WAL_RECYCLED);
        let mut db = DB::open_cf_descriptors(
            &db_options,
            path,
            [
                ColumnFamilyDescriptor::new(CF_REPLAY, options.cf_options(&cache)),
                // Only while `prime_wal` runs; there after a crash during it.
                ColumnFamilyDescriptor::new(CF_PRIMER, options.cf_options(&cache)),
            ],
        )
        .map_err(rocks("open"))?;
        prime_wal(&db)?;
        db.drop_cf(CF_PRIMER)
            .map_err(rocks("drop the primer family"))?;
        Ok(RocksReplayStore {
            db,
            poisoned: false,
        })
    }

    fn write(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| {
            self.poisoned = true;
            rocks("write")(e)
        })
    }
}

impl ReplayStore for RocksReplayStore {
    fn load(&self) -> Result<Vec<(KeyEpoch, ReplayTag)>, StoreError> {
        let cf = self.db.cf_handle(CF_REPLAY).ok_or(StoreError::Rocks {
            what: "column family",
            detail: "replay family missing".into(),
        })?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(rocks("read"))?;
            // A key of another length cannot come from us; skip rather than fail start-up.
            let Some((e, t)) = k.split_first_chunk::<8>() else {
                continue;
            };
            let Ok(tag) = <[u8; REPLAY_TAG_SIZE]>::try_from(t) else {
                continue;
            };
            out.push((KeyEpoch(u64::from_be_bytes(*e)), ReplayTag(tag)));
        }
        Ok(out)
    }

    fn persist(&mut self, tags: &[(KeyEpoch, ReplayTag)]) -> Result<(), StoreError> {
        let cf = self.db.cf_handle(CF_REPLAY).ok_or(StoreError::Rocks {
            what: "column family",
            detail: "replay family missing".into(),
        })?;
        let mut batch = WriteBatch::default();
        for (epoch, tag) in tags {
            batch.put_cf(cf, key(*epoch, tag), []);
        }
        self.write(batch)
    }

    fn prune_before(&mut self, epoch: KeyEpoch) -> Result<(), StoreError> {
        let cf = self.db.cf_handle(CF_REPLAY).ok_or(StoreError::Rocks {
            what: "column family",
            detail: "replay family missing".into(),
        })?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, [0u8; 8], epoch.0.to_be_bytes());
        self.write(batch)
    }
}

/// Upper bounds, in seconds, of [`SyncLatency`]'s buckets.
pub const SYNC_BUCKETS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

/// How long synced (fsynced) RocksDB writes took: a Prometheus histogram with fixed buckets
/// ([`SYNC_BUCKETS`]), `_bucket` and `_count` only (no `_sum`, as the mesh's hold-time
/// histogram). Every store of the project fills one; alerts watch its upper quantiles.
#[derive(Debug, Default)]
pub struct SyncLatency {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; SYNC_BUCKETS.len() + 1],
    count: AtomicU64,
}

impl SyncLatency {
    /// Counts one synced write that took `took`.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let index = SYNC_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(SYNC_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The histogram as Prometheus text, named `name` (cumulative buckets, `+Inf`, `_count`).
    pub fn render(&self, name: &str, help: &str) -> String {
        let mut out = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0u64;
        for (bound, bucket) in SYNC_BUCKETS.iter().zip(self.buckets.iter()) {
            cumulative = cumulative.saturating_add(bucket.load(Ordering::Relaxed));
            out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {cumulative}\n"));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_count {count}\n"
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_survive_reopen_and_prune_drops_old_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions::default();
        let tags = [
            (KeyEpoch(4), ReplayTag([1; REPLAY_TAG_SIZE])),
            (KeyEpoch(5), ReplayTag([2; REPLAY_TAG_SIZE])),
            (KeyEpoch(6), ReplayTag([3; REPLAY_TAG_SIZE])),
        ];
        {
            let mut store = RocksReplayStore::open(dir.path(), &opts).unwrap();
            store.persist(&tags).unwrap();
        }
        let mut store = RocksReplayStore::open(dir.path(), &opts).unwrap();
        assert_eq!(store.load().unwrap(), tags.to_vec());
        store.prune_before(KeyEpoch(5)).unwrap();
        assert_eq!(store.load().unwrap(), tags[1..].to_vec());
    }

    /// The write-ahead log files of a store, by number: (number, size).
    fn logs(dir: &Path) -> Vec<(u64, u64)> {
        let mut logs: Vec<(u64, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|f| {
                let path = f.path();
                (path.extension()? == "log").then_some(())?;
                let number = path.file_stem()?.to_str()?.parse().ok()?;
                Some((number, f.metadata().ok()?.len()))
            })
            .collect();
        logs.sort_unstable();
        logs
    }

    #[test]
    fn tags_are_written_into_a_reused_log_that_is_already_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions::default();
        let tag = |i: u8| (KeyEpoch(7), ReplayTag([i; REPLAY_TAG_SIZE]));
        for round in 0..3u8 {
            let mut store = RocksReplayStore::open(dir.path(), &opts).unwrap();
            // The log written next is the newest one, and it was primed: its size is already
            // past what the tags below take, so no synced write below grows the file.
            let (current, size) = *logs(dir.path()).last().unwrap();
            assert!(
                size >= u64::try_from(WAL_PRIMER_BYTES).unwrap(),
                "round {round}: log {current} of {size} bytes"
            );
            for i in 0..50 {
                store.persist(&[tag(round * 50 + i)]).unwrap();
            }
            assert_eq!(
                *logs(dir.path()).last().unwrap(),
                (current, size),
                "round {round}: the tags went into the primed log, in place"
            );
            // Every tag of the earlier rounds is back after each reopen, and no filler.
            let loaded = store.load().unwrap();
            let expected: Vec<_> = (0..(round + 1) * 50).map(tag).collect();
            assert_eq!(loaded, expected, "round {round}");
            assert!(
                DB::list_cf(&Options::default(), dir.path())
                    .unwrap()
                    .iter()
                    .all(|cf| cf != CF_PRIMER),
                "the primer family is gone after the open"
            );
        }
    }

    #[test]
    fn a_store_left_with_its_primer_family_opens_and_keeps_its_tags() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions::default();
        let tags = [(KeyEpoch(3), ReplayTag([9; REPLAY_TAG_SIZE]))];
        {
            let mut store = RocksReplayStore::open(dir.path(), &opts).unwrap();
            store.persist(&tags).unwrap();
        }
        {
            // As if the node had died while priming: the primer family is there, with data.
            let cache = Cache::new_lru_cache(opts.block_cache_bytes);
            let db = DB::open_cf_descriptors(
                &opts.db_options(),
                dir.path(),
                [
                    ColumnFamilyDescriptor::new(CF_REPLAY, opts.cf_options(&cache)),
                    ColumnFamilyDescriptor::new(CF_PRIMER, opts.cf_options(&cache)),
                ],
            )
            .unwrap();
            let cf = db.cf_handle(CF_PRIMER).unwrap();
            db.put_cf(cf, b"filler", [0u8; 100]).unwrap();
        }
        let store = RocksReplayStore::open(dir.path(), &opts).unwrap();
        assert_eq!(store.load().unwrap(), tags.to_vec());
        assert!(
            DB::list_cf(&Options::default(), dir.path())
                .unwrap()
                .iter()
                .all(|cf| cf != CF_PRIMER)
        );
    }

    #[test]
    fn sync_latency_renders_cumulative_buckets_without_a_sum() {
        let h = SyncLatency::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(3));
        let text = h.render("x_sync_seconds", "help");
        assert!(text.contains("# TYPE x_sync_seconds histogram\n"), "{text}");
        assert!(
            text.contains("x_sync_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_sync_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_sync_seconds_bucket{le=\"0.025\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_sync_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_sync_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("x_sync_seconds_count 3\n"), "{text}");
        assert!(!text.contains("_sum"), "{text}");
    }
}
