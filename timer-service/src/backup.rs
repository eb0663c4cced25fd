//! Online backups and restores of a node's RocksDB store, shared by `whispr-timer` and
//! `whispr-mailbox` (`docs/operators.md`, "Backups and restore").
//!
//! A backup is taken by RocksDB's own [`BackupEngine`] on the node's open database, inside the
//! node process (an admin API call or the `[backup]` schedule), on a blocking thread: it
//! flushes the memtables, then copies the live SST files (each only once: later backups share
//! the files they have in common, so every backup after the first is incremental), the
//! manifest and the WAL tail into the backup directory. RocksDB keeps the files it copies from
//! being deleted meanwhile, so the backup is a consistent point-in-time image while the node
//! goes on writing.
//!
//! A backup directory holds:
//! - `whispr-backup.json`: which node kind the backups are of, and the layout's version (a
//!   restore refuses another kind's backups);
//! - `db/`: the [`BackupEngine`]'s directory (`meta/`, `private/`, `shared_checksum/`);
//! - `files/<backup id>/`: files kept next to a backup (the timer's audit log).
//!
//! No key is ever written there: what the store holds is what the backup holds (the mailbox
//! seals every value under keys derived from its master key, which lives outside the store).
//!
//! A restore ([`restore`]) rebuilds the store of a stopped node from the latest backup; it
//! refuses a data directory that still holds a store unless forced, and a store that a
//! running node has locked.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};
use rocksdb::{DB, Env, Options};
use serde::{Deserialize, Serialize};
use whispr_node_kit::ConfigError;

/// Name of the manifest file in a backup directory.
pub const MANIFEST: &str = "whispr-backup.json";
/// Layout version written in the manifest.
const FORMAT: u32 = 1;
/// Largest `[backup] keep`.
pub const KEEP_MAX: usize = 1000;
/// Longest `[backup] interval_minutes` (a week).
pub const INTERVAL_MINUTES_MAX: u64 = 7 * 24 * 60;

/// `[backup]`: scheduled backups. Off unless `dir` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where scheduled backups go (an absolute path, best on another disk than `data_dir`).
    /// Default none: no scheduled backups.
    pub dir: Option<PathBuf>,
    /// A backup every this many minutes, the first one this long after the start (a node in
    /// a crash loop does not push good backups out of `keep`). 1 to 10,080. Default 4: the
    /// RPO is this plus one backup's duration, and the policy asks for 5 minutes.
    pub interval_minutes: u64,
    /// Backups kept in `dir` (older ones are deleted after each backup; files shared with a
    /// kept backup stay). 1 to 1000. Default 24.
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: None,
            interval_minutes: 4,
            keep: 24,
        }
    }
}

impl BackupConfig {
    /// Checks the bounds.
    pub fn check(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, problem: &str| {
            Err(ConfigError {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if !(1..=INTERVAL_MINUTES_MAX).contains(&self.interval_minutes) {
            return fail("backup.interval_minutes", "must be 1 to 10080");
        }
        if !(1..=KEEP_MAX).contains(&self.keep) {
            return fail("backup.keep", "must be 1 to 1000");
        }
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            return fail("backup.dir", "must be an absolute path");
        }
        Ok(())
    }

    /// The interval between scheduled backups.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_minutes.saturating_mul(60))
    }
}

/// Why a backup or a restore failed. Messages name paths and RocksDB's status text (which
/// names files), never keys or stored values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The backup directory given is relative (the node and the CLI may not share a working
    /// directory).
    #[error("the backup directory {0} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// A file-system operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, on which path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB's backup engine failed.
    #[error("rocksdb backup engine: {0}")]
    Engine(String),
    /// The directory holds no backup.
    #[error("{0} holds no backup")]
    NoBackup(PathBuf),
    /// The directory holds another node kind's backups.
    #[error("{dir} holds backups of a {found} node, not of a {expected} node")]
    WrongKind {
        /// The backup directory.
        dir: PathBuf,
        /// The kind named in its manifest.
        found: String,
        /// The kind asked for.
        expected: &'static str,
    },
    /// The manifest does not parse, or names a layout this version does not know.
    #[error("{0} is not a backup manifest this version can read")]
    BadManifest(PathBuf),
    /// The data directory still holds a store: restoring over it needs `--force`.
    #[error("{0} holds a store already; pass --force to replace it")]
    NotEmpty(PathBuf),
    /// A running node holds the store's lock.
    #[error("the store in {0} is locked by a running node: stop the node first")]
    NodeRunning(PathBuf),
    /// Another backup of this node is running.
    #[error("a backup of this node is running already")]
    Busy,
    /// The admin API call failed (CLI side).
    #[error("admin API: {0}")]
    Admin(String),
}

impl BackupError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Io { what, source }
    }

    fn engine(e: &rocksdb::Error) -> BackupError {
        BackupError::Engine(e.to_string())
    }

    /// The HTTP status and stable error code an admin API answers with.
    pub fn http_status(&self) -> (u16, &'static str) {
        match self {
            BackupError::NotAbsolute(_)
            | BackupError::WrongKind { .. }
            | BackupError::BadManifest(_) => (400, "bad_backup_dir"),
            BackupError::Busy => (409, "backup_running"),
            _ => (500, "backup_failed"),
        }
    }
}

/// What a backup did (the admin API's answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The new backup's id (ids only increase).
    pub backup_id: u32,
    /// Bytes of the files the backup consists of (shared files included).
    pub size_bytes: u64,
    /// Files it consists of.
    pub files: u32,
    /// Ids of the backups in the directory after old ones were deleted.
    pub kept: Vec<u32>,
    /// How long the backup took, in milliseconds.
    pub duration_ms: u64,
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The backup restored (the latest in the directory).
    pub backup_id: u32,
    /// When that backup was taken (Unix seconds).
    pub taken_at_unix: i64,
    /// How long the restore took, in milliseconds.
    pub duration_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    kind: String,
    format: u32,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Writes `bytes` to `path` through a temporary file and a rename, both synced.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)
        .map_err(BackupError::io(format!("creating {}", tmp.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(BackupError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(BackupError::io(format!("renaming to {}", path.display())))
}

/// Checks the manifest of `dir` names `kind`. `Ok(false)` when there is none.
fn check_manifest(dir: &Path, kind: &'static str) -> Result<bool, BackupError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(BackupError::io(format!("reading {}", path.display()))(e)),
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|_| BackupError::BadManifest(path.clone()))?;
    if manifest.format != FORMAT {
        return Err(BackupError::BadManifest(path));
    }
    if manifest.kind != kind {
        return Err(BackupError::WrongKind {
            dir: dir.to_path_buf(),
            found: manifest.kind,
            expected: kind,
        });
    }
    Ok(true)
}

fn open_engine(dir: &Path) -> Result<BackupEngine, BackupError> {
    let engine_dir = dir.join("db");
    let options = BackupEngineOptions::new(&engine_dir).map_err(|e| BackupError::engine(&e))?;
    let env = Env::new().map_err(|e| BackupError::engine(&e))?;
    BackupEngine::open(&options, &env).map_err(|e| BackupError::engine(&e))
}

fn files_dir(dir: &Path, backup_id: u32) -> PathBuf {
    dir.join("files").join(backup_id.to_string())
}

/// Takes a backup of the open database `db` into `dir` (created if missing), labelled
/// `kind`, then deletes all but the `keep` latest backups and verifies the new one (every
/// file present with its size). Blocks for as long as it copies: call it from a blocking
/// thread.
pub fn backup_db(
    db: &DB,
    kind: &'static str,
    dir: &Path,
    keep: usize,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if !dir.is_absolute() {
        return Err(BackupError::NotAbsolute(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(BackupError::io(format!("creating {}", dir.display())))?;
    if !check_manifest(dir, kind)? {
        let manifest = serde_json::to_vec_pretty(&Manifest {
            kind: kind.into(),
            format: FORMAT,
        })
        .map_err(|e| BackupError::Engine(format!("manifest: {e}")))?;
        write_atomic(&dir.join(MANIFEST), &manifest)?;
    }
    let mut engine = open_engine(dir)?;
    // Flushed first: the backup then holds SST files (shared with later backups) and an
    // almost empty WAL, rather than a WAL copied anew every time.
    engine
        .create_new_backup_flush(db, true)
        .map_err(|e| BackupError::engine(&e))?;
    engine
        .purge_old_backups(keep.clamp(1, KEEP_MAX))
        .map_err(|e| BackupError::engine(&e))?;
    let infos = engine.get_backup_info();
    let latest = infos
        .iter()
        .max_by_key(|i| i.backup_id)
        .ok_or_else(|| BackupError::NoBackup(dir.to_path_buf()))?;
    engine
        .verify_backup(latest.backup_id)
        .map_err(|e| BackupError::engine(&e))?;
    let mut kept: Vec<u32> = infos.iter().map(|i| i.backup_id).collect();
    kept.sort_unstable();
    Ok(BackupReport {
        backup_id: latest.backup_id,
        size_bytes: latest.size,
        files: latest.num_files,
        kept,
        duration_ms: millis(started.elapsed()),
    })
}

/// Keeps a copy of the file `src` as `name` next to backup `report.backup_id` in `dir`, and
/// deletes the copies kept for backups that are gone.
pub fn save_file(
    dir: &Path,
    report: &BackupReport,
    name: &str,
    src: &Path,
) -> Result<(), BackupError> {
    let target_dir = files_dir(dir, report.backup_id);
    std::fs::create_dir_all(&target_dir).map_err(BackupError::io(format!(
        "creating {}",
        target_dir.display()
    )))?;
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(BackupError::io(format!("reading {}", src.display()))(e)),
    };
    write_atomic(&target_dir.join(name), &bytes)?;
    let all = dir.join("files");
    let entries =
        std::fs::read_dir(&all).map_err(BackupError::io(format!("listing {}", all.display())))?;
    for entry in entries.flatten() {
        let stale = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none_or(|id| !report.kept.contains(&id));
        if stale {
            let path = entry.path();
            std::fs::remove_dir_all(&path)
                .map_err(BackupError::io(format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

/// True when `path` is a directory with at least one entry, or a non-empty file.
fn occupied(path: &Path) -> Result<bool, BackupError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(std::fs::read_dir(path)
            .map_err(BackupError::io(format!("listing {}", path.display())))?
            .next()
            .is_some()),
        Ok(m) => Ok(m.len() > 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BackupError::io(format!("reading {}", path.display()))(e)),
    }
}

/// Fails with [`BackupError::NodeRunning`] if a process holds the lock of the database in
/// `db_dir` (RocksDB's lock is a POSIX record lock, taken here by opening the database; a
/// database that does not open for another reason is not in use).
fn check_not_running(db_dir: &Path) -> Result<(), BackupError> {
    if !db_dir.join("LOCK").exists() {
        return Ok(());
    }
    let options = Options::default();
    let families = DB::list_cf(&options, db_dir).unwrap_or_default();
    match DB::open_cf(&options, db_dir, families) {
        Ok(db) => {
            drop(db);
            Ok(())
        }
        Err(e) if is_lock_error(&e) => Err(BackupError::NodeRunning(db_dir.to_path_buf())),
        Err(_) => Ok(()),
    }
}

/// RocksDB's status when another process holds the lock ("While lock file: …/LOCK: …"), or
/// this process does ("lock hold by current process …").
fn is_lock_error(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("While lock file") || text.contains("lock hold by current process")
}

fn remove_path(path: &Path) -> Result<(), BackupError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(BackupError::io(format!("removing {}", path.display())))
}

/// Restores the latest backup of kind `kind` in `from` as the store `data_dir/db_name` of a
/// stopped node. `replaced` names the other entries of `data_dir` that belong with the store
/// and are deleted with it (rebuilt or restored by the caller). Without `force`, refuses
/// ([`BackupError::NotEmpty`]) when the store or one of `replaced` holds anything; with it,
/// still refuses a store a running node has locked. The store is rebuilt in
/// `data_dir/<db_name>.restoring` first and renamed into place, so a failed restore leaves the
/// old store as it was. Other entries of `data_dir` (key files, the mesh identity) are left
/// alone.
pub fn restore(
    kind: &'static str,
    from: &Path,
    data_dir: &Path,
    db_name: &str,
    replaced: &[&str],
    force: bool,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    if !check_manifest(from, kind)? {
        return Err(BackupError::NoBackup(from.to_path_buf()));
    }
    let mut engine = open_engine(from)?;
    let latest = engine
        .get_backup_info()
        .into_iter()
        .max_by_key(|i| i.backup_id)
        .ok_or_else(|| BackupError::NoBackup(from.to_path_buf()))?;
    let db_dir = data_dir.join(db_name);
    let mut in_use = occupied(&db_dir)?;
    for name in replaced {
        in_use |= occupied(&data_dir.join(name))?;
    }
    if in_use && !force {
        return Err(BackupError::NotEmpty(data_dir.to_path_buf()));
    }
    check_not_running(&db_dir)?;
    std::fs::create_dir_all(data_dir)
        .map_err(BackupError::io(format!("creating {}", data_dir.display())))?;
    let staging = data_dir.join(format!("{db_name}.restoring"));
    remove_path(&staging)?;
    engine
        .restore_from_backup(
            &staging,
            &staging,
            &RestoreOptions::default(),
            latest.backup_id,
        )
        .map_err(|e| BackupError::engine(&e))?;
    remove_path(&db_dir)?;
    for name in replaced {
        remove_path(&data_dir.join(name))?;
    }
    std::fs::rename(&staging, &db_dir)
        .map_err(BackupError::io(format!("renaming to {}", db_dir.display())))?;
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(RestoreReport {
        backup_id: latest.backup_id,
        taken_at_unix: latest.timestamp,
        duration_ms: millis(started.elapsed()),
    })
}

/// Copies the file `name` kept next to backup `backup_id` in `from` to `dest` (synced). A
/// backup without it gives `Ok(false)`.
pub fn restore_file(
    from: &Path,
    backup_id: u32,
    name: &str,
    dest: &Path,
) -> Result<bool, BackupError> {
    let src = files_dir(from, backup_id).join(name);
    let bytes = match std::fs::read(&src) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(BackupError::io(format!("reading {}", src.display()))(e)),
    };
    write_atomic(dest, &bytes)?;
    Ok(true)
}

/// Backup counters of a node, for `/metrics`.
#[derive(Debug, Default)]
pub struct BackupMetrics {
    ok: AtomicU64,
    failed: AtomicU64,
    last_ok_unix_ms: AtomicU64,
    last_duration_ms: AtomicU64,
    last_size_bytes: AtomicU64,
}

impl BackupMetrics {
    /// Successful backups since the start.
    pub fn backups_total(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Prometheus text of the counters, names prefixed with `prefix` (e.g. `whispr_timer`).
    pub fn render(&self, prefix: &str) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, value) in [
            (
                "backups_total",
                "counter",
                "Backups taken (admin API and schedule).",
                get(&self.ok).to_string(),
            ),
            (
                "backup_failures_total",
                "counter",
                "Backups that failed.",
                get(&self.failed).to_string(),
            ),
            (
                "backup_last_success_timestamp_seconds",
                "gauge",
                "When the last successful backup ended (0: none since the start).",
                format!("{:.3}", get(&self.last_ok_unix_ms) as f64 / 1000.0),
            ),
            (
                "backup_last_duration_seconds",
                "gauge",
                "How long the last successful backup took.",
                format!("{:.3}", get(&self.last_duration_ms) as f64 / 1000.0),
            ),
            (
                "backup_last_size_bytes",
                "gauge",
                "Bytes of the last successful backup (shared files included).",
                get(&self.last_size_bytes).to_string(),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}\n{prefix}_{name} {value}\n"
            ));
        }
        out
    }
}

/// A node's handle for backups of its open database: cheap to clone; one backup at a time.
#[derive(Clone)]
pub struct BackupSource {
    db: Arc<DB>,
    kind: &'static str,
    busy: Arc<Mutex<()>>,
    metrics: Arc<BackupMetrics>,
}

impl std::fmt::Debug for BackupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSource")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl BackupSource {
    /// Backups of `db`, labelled `kind` (`"timer"`, `"mailbox"`).
    pub fn new(db: Arc<DB>, kind: &'static str) -> BackupSource {
        BackupSource {
            db,
            kind,
            busy: Arc::new(Mutex::new(())),
            metrics: Arc::new(BackupMetrics::default()),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &BackupMetrics {
        &self.metrics
    }

    /// [`backup_db`] into `dir`, keeping `keep` backups, then `after` with the report (still
    /// as one backup: another waits). [`BackupError::Busy`] if a backup is running. Blocks:
    /// call it from a blocking thread.
    pub fn backup(
        &self,
        dir: &Path,
        keep: usize,
        after: impl FnOnce(&BackupReport) -> Result<(), BackupError>,
    ) -> Result<BackupReport, BackupError> {
        let Ok(_guard) = self.busy.try_lock() else {
            return Err(BackupError::Busy);
        };
        let result = backup_db(&self.db, self.kind, dir, keep)
            .and_then(|report| after(&report).map(|()| report));
        match &result {
            Ok(report) => {
                self.metrics.ok.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .last_ok_unix_ms
                    .store(whispr_node_kit::clock::now().0, Ordering::Relaxed);
                self.metrics
                    .last_duration_ms
                    .store(report.duration_ms, Ordering::Relaxed);
                self.metrics
                    .last_size_bytes
                    .store(report.size_bytes, Ordering::Relaxed);
            }
            Err(_) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

/// Runs `job` (a backup) on a blocking thread every `interval`, the first time `interval`
/// after the call, until the task is dropped or aborted. Outcomes are logged without paths.
pub fn spawn_scheduled<F>(interval: Duration, job: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Result<BackupReport, BackupError> + Send + Sync + 'static,
{
    let job = Arc::new(job);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let job = job.clone();
            match tokio::task::spawn_blocking(move || job()).await {
                Ok(Ok(report)) => tracing::info!(
                    backup_id = report.backup_id,
                    size_bytes = report.size_bytes,
                    duration_ms = report.duration_ms,
                    "scheduled backup done"
                ),
                Ok(Err(BackupError::Busy)) => {
                    tracing::warn!("scheduled backup skipped: another backup is running");
                }
                Ok(Err(e)) => tracing::error!(error = %e, "scheduled backup failed"),
                Err(_) => tracing::error!("scheduled backup task failed"),
            }
        }
    })
}

/// CLI side: `POST http://addr{path}` with a bearer token and a JSON body, over a plain
/// HTTP/1.1 connection (admin listeners are loopback-only), waiting at most `timeout` for the
/// answer. The JSON answer of a 2xx status, else [`BackupError::Admin`] with the status and
/// the error body.
pub fn admin_post(
    addr: SocketAddr,
    path: &str,
    token: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, BackupError> {
    let admin = |e: std::io::Error| BackupError::Admin(format!("connection: {e}"));
    let body = body.to_string();
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(admin)?;
    stream.set_read_timeout(Some(timeout)).map_err(admin)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(admin)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(admin)?;
    let mut response = Vec::new();
    // Bounded: an admin answer is small.
    stream
        .take(1 << 20)
        .read_to_end(&mut response)
        .map_err(admin)?;
    let text = String::from_utf8_lossy(&response);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| BackupError::Admin("malformed HTTP answer".into()))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BackupError::Admin("malformed HTTP status line".into()))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest).ok_or_else(|| BackupError::Admin("malformed chunked answer".into()))?
    } else {
        rest.to_string()
    };
    if !(200..300).contains(&status) {
        return Err(BackupError::Admin(format!(
            "HTTP {status}: {}",
            body.trim()
        )));
    }
    serde_json::from_str(&body).map_err(|e| BackupError::Admin(format!("answer: {e}")))
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::WriteOptions;

    fn open(path: &Path) -> DB {
        let mut options = Options::default();
        options.create_if_missing(true);
        DB::open(&options, path).unwrap()
    }

    fn put(db: &DB, key: &[u8], value: &[u8]) {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        db.put_opt(key, value, &w).unwrap();
    }

    #[test]
    fn backups_are_incremental_pruned_and_restore_the_state_at_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let backups = dir.path().join("backups");
        let db = Arc::new(open(&data.join("db")));
        let source = BackupSource::new(db.clone(), "timer");
        for i in 0..3u32 {
            for k in 0..100u32 {
                put(&db, format!("k{i}-{k}").as_bytes(), &[7u8; 100]);
            }
            let r = source
                .backup(&backups, 2, |r| {
                    save_file(&backups, r, "audit.jsonl", &dir.path().join("nothing"))
                })
                .unwrap();
            assert_eq!(r.backup_id, i + 1);
            assert!(r.kept.len() <= 2);
        }
        // Only the two latest backups and their files are kept.
        let files: Vec<_> = std::fs::read_dir(backups.join("files"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        put(&db, b"after", b"the backup");
        // The node is running: refused, even with force.
        let e = restore("timer", &backups, &data, "db", &[], true).unwrap_err();
        assert!(matches!(e, BackupError::NodeRunning(_)), "{e}");
        drop(source);
        drop(db);
        // Stopped, but the store is there: refused without force.
        let e = restore("timer", &backups, &data, "db", &[], false).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
        // Another kind's backups: refused.
        let e = restore("mailbox", &backups, &data, "db", &[], true).unwrap_err();
        assert!(matches!(e, BackupError::WrongKind { .. }), "{e}");
        let e = restore("timer", &dir.path().join("none"), &data, "db", &[], true).unwrap_err();
        assert!(matches!(e, BackupError::NoBackup(_)), "{e}");
        let r = restore("timer", &backups, &data, "db", &[], true).unwrap();
        assert_eq!(r.backup_id, 3);
        let db = open(&data.join("db"));
        assert!(db.get(b"k2-99").unwrap().is_some());
        assert!(db.get(b"k0-0").unwrap().is_some());
        assert!(db.get(b"after").unwrap().is_none());
    }

    #[test]
    fn a_relative_directory_and_a_concurrent_backup_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(open(&dir.path().join("db")));
        let source = BackupSource::new(db, "mailbox");
        let e = source
            .backup(Path::new("relative/dir"), 1, |_| Ok(()))
            .unwrap_err();
        assert!(matches!(e, BackupError::NotAbsolute(_)));
        let abs = dir.path().join("b");
        let inner = source.clone();
        let e = source
            .backup(&abs, 1, |_| inner.backup(&abs, 1, |_| Ok(())).map(|_| ()))
            .unwrap_err();
        assert!(matches!(e, BackupError::Busy), "{e}");
        // Both failed calls counted (the refused inner one is not a backup).
        let metrics = source.metrics().render("x");
        assert!(metrics.contains("x_backup_failures_total 2\n"), "{metrics}");
        assert!(metrics.contains("x_backups_total 0\n"), "{metrics}");
    }

    /// The schedule runs its job again and again, on a blocking thread: on a runtime with a
    /// single async worker, a ticker task keeps running while the job blocks.
    #[tokio::test(flavor = "current_thread")]
    async fn scheduled_backups_repeat_on_a_blocking_thread() {
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let progress = Arc::new(Mutex::new(Vec::new()));
        let schedule = {
            let (ticks, progress) = (ticks.clone(), progress.clone());
            spawn_scheduled(Duration::from_millis(20), move || {
                let before = ticks.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(150));
                let after = ticks.load(Ordering::Relaxed);
                progress.lock().unwrap().push(after - before);
                Err(BackupError::Busy)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.lock().unwrap().len() < 3 {
            assert!(Instant::now() < deadline, "the schedule did not repeat");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        schedule.abort();
        ticker.abort();
        let progress = progress.lock().unwrap().clone();
        // The async worker went on ticking while each job slept 150 ms.
        assert!(progress.iter().all(|t| *t >= 3), "{progress:?}");
    }

    #[test]
    fn config_bounds() {
        assert!(BackupConfig::default().check().is_ok());
        for bad in [
            BackupConfig {
                keep: 0,
                ..BackupConfig::default()
            },
            BackupConfig {
                keep: KEEP_MAX + 1,
                ..BackupConfig::default()
            },
            BackupConfig {
                interval_minutes: 0,
                ..BackupConfig::default()
            },
            BackupConfig {
                dir: Some("rel".into()),
                ..BackupConfig::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_answers_decode() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(dechunk("zz\r\n"), None);
    }
}
