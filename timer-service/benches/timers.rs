//! "Schedule and fire 1M timers": `TimerQueue` over `RocksStore` against Redis doing the same
//! work, in one run, reported as ratios (ours / Redis).
//!
//! Not a criterion bench: every phase runs once, over `N` timers (default 1 000 000) in batches
//! of `B` (default 1000), against the wall clock. Run it through `timer-service/bench/run.sh`,
//! which starts a throw-away `redis-server` (AOF on, `appendfsync always`, no RDB snapshots,
//! no automatic AOF rewrite) and passes it in the environment:
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target bash timer-service/bench/run.sh [--timers N] [--batch B]
//! ```
//!
//! or directly, ours only (no Redis columns):
//! `cargo bench --workspace --bench timers -- [--timers N] [--batch B]`.
//!
//! Options: `--timers N`, `--batch B`, `--window-secs W` (due times spread over W seconds;
//! default 25 s × N / 1M, at least 5 s), `--lead-secs L` (the due window starts L seconds
//! after the schedule phase starts; default: 2 × the schedule time estimated from a
//! calibration, plus 5 s (the calibration schedules max(20 batches, 50 000 timers) on a
//! scratch store or scratch keys), so that firing is real-time; the report says how many
//! timers were already overdue when firing began), `--skip-ours`,
//! `--skip-redis`. Environment: `WHISPR_BENCH_REDIS` (`host:port` of the Redis to use),
//! `WHISPR_BENCH_REDIS_CONF` (its config file, to restart it), `WHISPR_BENCH_REDIS_SERVER`
//! (the binary, default `redis-server`), `WHISPR_BENCH_DIR` (where RocksDB goes; default a
//! temporary directory).
//!
//! Phases, the same for both systems (ours first, then Redis):
//!
//! 1. **Schedule** N timers in batches of B, each batch one synced write: ours
//!    `TimerQueue::schedule_many` (one RocksDB `WriteBatch`, WAL fsynced); Redis one pipelined
//!    round trip `MULTI; ZADD timers <due> <id> ×B; HSET payloads <id> <payload> ×B; EXEC`
//!    (with `appendfsync always` Redis fsyncs the AOF once per event-loop write, here once per
//!    `EXEC`). Timers alternate between categories `expiry` and `maintenance`, priority 3,
//!    64-byte random payload, due uniformly at random in `[T0, T0 + W)`; Redis members are the
//!    32-hex-digit id, scores the due time in ms. The workload (offsets, payloads, Redis ids)
//!    is generated once and is the same for both.
//! 2. **Footprint** after scheduling, before firing: ours `RocksStore::flush` then
//!    `disk_usage_bytes` and `sst_files_bytes`; RocksDB bytes written (logical, WAL, flush,
//!    compaction); Redis the AOF directory's growth, then `BGREWRITEAOF` and its size again
//!    (the compacted form, RDB preamble). Memory: our process RSS growth, Redis `used_memory`
//!    growth.
//! 3. **Fire** in real time: ours loops `poll_due(now, B)` + `complete_many_deferred` (the
//!    removals go to the store's writer thread, which merges what is queued into one synced
//!    write, so the loop never waits for an fsync; `sync_completions` waits for the last ones
//!    before the clock stops), sleeping until `poll_timeout` when nothing is due; Redis loops
//!    `ZRANGEBYSCORE timers -inf <now> WITHSCORES LIMIT 0 B`, `HMGET payloads <ids>` (the
//!    handler needs the payload, as `poll_due` returns it), then
//!    `MULTI; ZREM; HDEL; EXEC` (one fsync), sleeping until the first score
//!    (`ZRANGE timers 0 0 WITHSCORES`) when nothing is due. Lateness is the time when the poll
//!    returned the timer (with its payload) minus its due time; it is also reported split in
//!    two: the lateness when the poll began (what the loop's wake-up from its sleep and the
//!    machine's scheduling add) and the time inside the poll call, with the completion call's
//!    time (which delays the next poll).
//! 4. **Restart to first fire**: N more timers, all overdue, are scheduled; then ours drops the
//!    queue and times `RocksStore::open` + `TimerQueue::open` + the first `poll_due` returning a
//!    timer; Redis gets `SHUTDOWN` (AOF fsynced; no RDB) and the bench times spawning
//!    `redis-server <conf>` until the first `ZRANGEBYSCORE` + `HMGET` returns a timer (it
//!    answers `-LOADING` while it loads the AOF). Twice: first with the files as they stand
//!    (ours: WAL to replay, SSTs with the tombstones of the fired timers; Redis: the rewritten
//!    AOF of phase 2 plus every command since), then after compacting what can be compacted
//!    (ours `RocksStore::flush`, no WAL left to replay; Redis `BGREWRITEAOF`, one RDB-preamble
//!    file). Each restart fires (and completes) one timer.
//! 5. **Catch-up**: the N overdue timers are then fired as fast as possible: the maximum
//!    sustained fire rate (ours: `poll_due` + `complete_many_deferred`, then
//!    `sync_completions` inside the timed span; Redis: its synced `MULTI; ZREM; HDEL; EXEC`
//!    per batch, as in phase 3).
//!
//! Schedule and catch-up also report CPU time per timer: ours the bench process (the queue,
//! RocksDB and its threads), Redis its server's `INFO cpu` (user + sys) plus the bench process
//! (the client); on a shared machine it moves less with the load than the wall-clock rates.
//!
//! The Redis client is the small pipelined RESP2 client over `std::net::TcpStream` in `bench/resp.rs`
//! (no extra dependency).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::indexing_slicing,
    missing_docs
)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use whispr_protocol::UnixTime;
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::queue::TimerQueue;
use whispr_timer_service::rocks::{RocksOptions, RocksStore};
use whispr_timer_service::task::{Category, NewTask, TaskId};

/// Prints the message and exits (the workspace denies `panic!`).
macro_rules! die {
    ($($arg:tt)*) => {{
        eprintln!("timers bench: {}", format_args!($($arg)*));
        std::process::exit(2)
    }};
}

const PAYLOAD_LEN: usize = 64;
const PRIORITY: u8 = 3;
/// Calibration schedules at least this many batches and this many timers on scratch keys.
const CALIBRATION_BATCHES: usize = 20;
const CALIBRATION_TIMERS: usize = 50_000;
const ZKEY: &[u8] = b"whispr:timers";
const HKEY: &[u8] = b"whispr:payloads";
const CALIB_ZKEY: &[u8] = b"whispr:calib:timers";
const CALIB_HKEY: &[u8] = b"whispr:calib:payloads";

// ---------------------------------------------------------------------------------------------
// Arguments, clock, workload

struct Args {
    timers: usize,
    batch: usize,
    window_ms: u64,
    lead_ms: Option<u64>,
    skip_ours: bool,
    skip_redis: bool,
}

fn parse_args() -> Args {
    let mut timers = 1_000_000usize;
    let mut batch = 1000usize;
    let mut window_secs: Option<f64> = None;
    let mut lead_secs: Option<f64> = None;
    let mut skip_ours = false;
    let mut skip_redis = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value =
            |name: &str| -> String { it.next().unwrap_or_else(|| die!("{name} needs a value")) };
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--timers" => {
                timers = value("--timers")
                    .replace('_', "")
                    .parse()
                    .expect("--timers N")
            }
            "--batch" => batch = value("--batch").parse().expect("--batch B"),
            "--window-secs" => {
                window_secs = Some(value("--window-secs").parse().expect("--window-secs W"));
            }
            "--lead-secs" => lead_secs = Some(value("--lead-secs").parse().expect("--lead-secs L")),
            "--skip-ours" => skip_ours = true,
            "--skip-redis" => skip_redis = true,
            other => die!(
                "unknown argument {other:?}; usage: timers [--timers N] [--batch B] \
                 [--window-secs W] [--lead-secs L] [--skip-ours] [--skip-redis]"
            ),
        }
    }
    assert!(timers > 0 && batch > 0, "--timers and --batch must be > 0");
    let window_ms = window_secs.map_or_else(
        || (25_000 * timers as u64 / 1_000_000).max(5_000),
        |w| (w * 1000.0) as u64,
    );
    Args {
        timers,
        batch,
        window_ms: window_ms.max(1),
        lead_ms: lead_secs.map(|l| (l * 1000.0) as u64),
        skip_ours,
        skip_redis,
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_micros() as u64
}

fn now_ms() -> u64 {
    now_us() / 1000
}

fn sleep_until_ms(t_ms: u64) {
    let target = t_ms * 1000;
    let now = now_us();
    if target > now {
        std::thread::sleep(Duration::from_micros(target - now));
    }
}

/// One timer of the workload, shared by both systems.
struct Job {
    /// Redis member: 16 random bytes as hex (ours draws its own ids).
    hex: [u8; 32],
    /// Due time offset within the window (ms).
    offset_ms: u64,
    payload: [u8; PAYLOAD_LEN],
}

fn workload(n: usize, window_ms: u64) -> Vec<Job> {
    let mut rng = ChaCha20Rng::seed_from_u64(0x0071_31e5);
    (0..n)
        .map(|_| {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let mut hex = [0u8; 32];
            hex::encode_to_slice(id, &mut hex).expect("hex length");
            let mut payload = [0u8; PAYLOAD_LEN];
            rng.fill_bytes(&mut payload);
            Job {
                hex,
                offset_ms: rng.random_range(0..window_ms),
                payload,
            }
        })
        .collect()
}

fn category(i: usize) -> Category {
    if i.is_multiple_of(2) {
        Category::Expiry
    } else {
        Category::Maintenance
    }
}

/// How many timers the calibration schedules.
fn calibration_len(n: usize, batch: usize) -> usize {
    (CALIBRATION_BATCHES * batch).max(CALIBRATION_TIMERS).min(n)
}

/// The due window's start: `lead` after now, `lead` from the option or from calibration.
fn window_start(args: &Args, calibrated_batch: Duration) -> (u64, u64) {
    let batches = args.timers.div_ceil(args.batch) as f64;
    let estimate_ms = (calibrated_batch.as_secs_f64() * batches * 1000.0) as u64;
    let lead = args.lead_ms.unwrap_or(2 * estimate_ms + 5_000);
    (now_ms() + lead, estimate_ms)
}

/// Lateness summary: p50, p99, max in ms.
#[derive(Clone, Copy, Default)]
struct Lateness {
    p50: f64,
    p99: f64,
    max: f64,
}

fn lateness(mut us: Vec<u64>) -> Lateness {
    if us.is_empty() {
        return Lateness::default();
    }
    us.sort_unstable();
    let at = |q: usize| us[(us.len() - 1) * q / 100] as f64 / 1000.0;
    Lateness {
        p50: at(50),
        p99: at(99),
        max: at(100),
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// p50 and p99 (ms) of `fdatasync` after a 4 KiB append in `dir`, 200 times: the floor of a
/// synced write on this disk now (its fsync has a fast and a slow mode).
fn fsync_probe(dir: &Path) -> (f64, f64) {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = [0x5au8; 4096];
    let us: Vec<u64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).expect("probe write");
            f.sync_data().expect("probe fdatasync");
            t.elapsed().as_micros() as u64
        })
        .collect();
    drop(f);
    let _removed = std::fs::remove_file(&path);
    let l = lateness(us);
    (l.p50, l.p99)
}

/// CPU time of this process so far (every thread: ours, RocksDB's flushes and compactions,
/// the store's writer), in seconds, from `/proc/self/stat` (clock ticks of 10 ms).
fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Redis's CPU time so far (main and background threads), in seconds.
fn redis_cpu_secs(r: &mut Redis) -> f64 {
    let get = |r: &mut Redis, field: &str| -> f64 { r.info_field("cpu", field).parse().unwrap() };
    get(r, "used_cpu_user") + get(r, "used_cpu_sys")
}

/// The 1-minute load average, for the machine note.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| match e.metadata() {
                Ok(m) if m.is_file() => m.len(),
                Ok(m) if m.is_dir() => dir_size(&e.path()),
                _ => 0,
            })
            .sum()
    })
}

/// Results of one system.
#[derive(Default)]
struct Outcome {
    schedule_rate: f64,
    schedule_secs: f64,
    schedule_batch_ms: f64,
    /// CPU time per timer scheduled (µs, every thread of the system), what the load of
    /// other processes changes least.
    schedule_cpu_us: f64,
    overdue_at_fire_start: usize,
    fire_rate: f64,
    fire_busy: f64,
    full_polls: usize,
    per_poll: f64,
    polls: usize,
    late: Lateness,
    /// Lateness when the poll began (the part the loop's wake-up and the machine add).
    late_at_poll: Lateness,
    /// Time in the poll call, per poll that returned timers.
    poll_time: Lateness,
    /// Time in the completion call, per poll that returned timers.
    complete_time: Lateness,
    restart_ms: f64,
    restart_detail: String,
    restart_compact_ms: f64,
    restart_compact_detail: String,
    drain_rate: f64,
    drain_poll_us: f64,
    drain_complete_us: f64,
    /// CPU time per timer in the catch-up (µs, every thread of the system, until the last
    /// removal is on disk).
    drain_cpu_us: f64,
    disk_per_timer: f64,
    compact_per_timer: f64,
    log_sched_per_timer: f64,
    log_fire_per_timer: f64,
    device_writes_per_timer: f64,
    logical_per_timer: f64,
    memory_per_timer: f64,
}

// ---------------------------------------------------------------------------------------------
// Ours

fn queue_config() -> QueueConfig {
    QueueConfig {
        queue_tasks_max: usize::MAX,
        concurrency_max: usize::MAX,
        ..QueueConfig::default()
    }
}

type Queue = TimerQueue<RocksStore, ChaCha20Rng>;

fn open_queue(path: &Path, seed: u64) -> Queue {
    let store = RocksStore::open(path, RocksOptions::default()).expect("open RocksStore");
    TimerQueue::open(queue_config(), store, ChaCha20Rng::seed_from_u64(seed)).expect("open queue")
}

fn ours_schedule(q: &mut Queue, jobs: &[Job], batch: usize, due: impl Fn(&Job) -> u64) {
    for (c, chunk) in jobs.chunks(batch).enumerate() {
        let tasks = chunk
            .iter()
            .enumerate()
            .map(|(i, j)| NewTask {
                category: category(c * batch + i),
                priority: PRIORITY,
                due_at: UnixTime(due(j)),
                payload: j.payload.to_vec(),
                owner: None,
            })
            .collect();
        let results = q
            .schedule_many(UnixTime(now_ms()), tasks)
            .expect("schedule_many");
        assert!(results.iter().all(Result::is_ok), "a task was refused");
    }
}

/// A ticker of RocksDB's statistics dump (`<name> COUNT : <n>`).
fn ticker(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().strip_prefix("COUNT :"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn device_writes(store: &RocksStore) -> u64 {
    let stats = store.statistics().unwrap_or_default();
    store.wal_bytes_written()
        + ticker(&stats, "rocksdb.flush.write.bytes")
        + ticker(&stats, "rocksdb.compact.write.bytes")
}

fn run_ours(args: &Args, jobs: &[Job], root: &Path) -> Outcome {
    let n = args.timers;
    let b = args.batch;
    let mut out = Outcome::default();

    // Calibration on a scratch store, to place the due window just after scheduling.
    let calib_dir = root.join("ours-calibration");
    let calib_jobs = &jobs[..calibration_len(n, b)];
    let mut calib = open_queue(&calib_dir, 1);
    let t = Instant::now();
    ours_schedule(&mut calib, calib_jobs, b, |_| now_ms() + 86_400_000);
    let per_batch = t.elapsed() / calib_jobs.len().div_ceil(b) as u32;
    drop(calib);
    std::fs::remove_dir_all(&calib_dir).expect("remove calibration store");

    let path = root.join("ours");
    let mut q = open_queue(&path, 2);
    let rss0 = rss_bytes();
    let (t0, estimate_ms) = window_start(args, per_batch);
    eprintln!(
        "[ours] scheduling {n} timers in batches of {b} (calibrated {:.2} ms/batch, estimate {:.1} s); \
         due window starts in {:.1} s, lasts {:.1} s",
        per_batch.as_secs_f64() * 1000.0,
        estimate_ms as f64 / 1000.0,
        (t0 - now_ms()) as f64 / 1000.0,
        args.window_ms as f64 / 1000.0
    );
    let t = Instant::now();
    let cpu = process_cpu_secs();
    ours_schedule(&mut q, jobs, b, |j| t0 + j.offset_ms);
    out.schedule_secs = t.elapsed().as_secs_f64();
    out.schedule_cpu_us = (process_cpu_secs() - cpu) * 1e6 / n as f64;
    out.schedule_rate = n as f64 / out.schedule_secs;
    out.schedule_batch_ms = out.schedule_secs * 1000.0 / n.div_ceil(b) as f64;
    let rss1 = rss_bytes();
    let store = q.store();
    out.logical_per_timer = store.bytes_written() as f64 / n as f64;
    out.log_sched_per_timer = store.wal_bytes_written() as f64 / n as f64;
    store.flush().expect("flush");
    let disk = store.disk_usage_bytes();
    let sst = store.sst_files_bytes().expect("sst size");
    out.disk_per_timer = disk as f64 / n as f64;
    out.compact_per_timer = sst as f64 / n as f64;
    out.memory_per_timer = rss1.saturating_sub(rss0) as f64 / n as f64;
    let wal_before_fire = store.wal_bytes_written();
    eprintln!(
        "[ours] scheduled in {:.2} s ({:.0}/s); disk after flush {:.1} MB (SST {:.1} MB), \
         WAL written {:.1} MB, RSS +{:.1} MB",
        out.schedule_secs,
        n as f64 / out.schedule_secs,
        disk as f64 / 1e6,
        sst as f64 / 1e6,
        wal_before_fire as f64 / 1e6,
        rss1.saturating_sub(rss0) as f64 / 1e6
    );

    // Fire in real time.
    let start = now_ms();
    out.overdue_at_fire_start = q
        .stats(UnixTime(start))
        .values()
        .map(|s| s.due)
        .sum::<usize>();
    eprintln!(
        "[ours] firing; {} timers overdue at start, waiting {:.1} s for the window",
        out.overdue_at_fire_start,
        t0.saturating_sub(start) as f64 / 1000.0
    );
    let mut late = Vec::with_capacity(n);
    let mut late_at_poll = Vec::with_capacity(n);
    let (mut poll_us, mut complete_us) = (Vec::new(), Vec::new());
    let mut busy = Duration::ZERO;
    let mut fired = 0usize;
    loop {
        let t = Instant::now();
        let began = now_us();
        let batch = q.poll_due(UnixTime(began / 1000), b).expect("poll_due");
        let returned = now_us();
        if batch.is_empty() {
            busy += t.elapsed();
            if fired >= n {
                break;
            }
            match q.poll_timeout() {
                Some(next) => sleep_until_ms(next.0),
                None => break,
            }
            continue;
        }
        late.extend(
            batch
                .iter()
                .map(|task| returned.saturating_sub(task.due_at.0 * 1000)),
        );
        late_at_poll.extend(
            batch
                .iter()
                .map(|task| began.saturating_sub(task.due_at.0 * 1000)),
        );
        poll_us.push(returned.saturating_sub(began));
        out.polls += 1;
        out.full_polls += usize::from(batch.len() == b);
        let ids: Vec<TaskId> = batch.iter().map(|task| task.id).collect();
        let tc = Instant::now();
        fired += q
            .complete_many_deferred(&ids)
            .expect("complete_many_deferred");
        complete_us.push(tc.elapsed().as_micros() as u64);
        busy += t.elapsed();
    }
    // The last removals on disk before the clock stops.
    let t = Instant::now();
    q.sync_completions().expect("sync_completions");
    busy += t.elapsed();
    let end = now_us();
    let span_secs = end.saturating_sub(t0 * 1000) as f64 / 1e6;
    out.fire_rate = fired as f64 / span_secs;
    out.fire_busy = busy.as_secs_f64() / span_secs;
    out.per_poll = fired as f64 / out.polls.max(1) as f64;
    out.late = lateness(late);
    out.late_at_poll = lateness(late_at_poll);
    out.poll_time = lateness(poll_us);
    out.complete_time = lateness(complete_us);
    let store = q.store();
    out.log_fire_per_timer = (store.wal_bytes_written() - wal_before_fire) as f64 / n as f64;
    out.device_writes_per_timer = device_writes(store) as f64 / n as f64;
    eprintln!(
        "[ours] fired {fired} in {span_secs:.2} s from the window start ({:.0}/s, busy {:.0} %), \
         {} polls ({} full)",
        out.fire_rate,
        out.fire_busy * 100.0,
        out.polls,
        out.full_polls
    );

    // Restart to first fire, with N overdue timers: as the files stand, then after a flush.
    let now = now_ms();
    ours_schedule(&mut q, jobs, b, |j| now - 1 - j.offset_ms);
    drop(q);
    let (q, ms, detail) = ours_restart(&path);
    out.restart_ms = ms;
    out.restart_detail = detail;
    q.store().flush().expect("flush");
    drop(q);
    let (mut q, ms, detail) = ours_restart(&path);
    out.restart_compact_ms = ms;
    out.restart_compact_detail = detail;

    // Catch-up: drain the overdue timers as fast as possible.
    let t = Instant::now();
    let cpu = process_cpu_secs();
    let mut fired = 2; // one by each restart
    let (mut poll, mut complete) = (Duration::ZERO, Duration::ZERO);
    while fired < n {
        let tp = Instant::now();
        let batch = q.poll_due(UnixTime(now_ms()), b).expect("poll_due");
        assert!(!batch.is_empty(), "overdue timers missing after restart");
        let tc = Instant::now();
        poll += tc - tp;
        let ids: Vec<TaskId> = batch.iter().map(|task| task.id).collect();
        fired += q
            .complete_many_deferred(&ids)
            .expect("complete_many_deferred");
        complete += tc.elapsed();
    }
    // Every removal on disk before the clock stops.
    let tc = Instant::now();
    q.sync_completions().expect("sync_completions");
    complete += tc.elapsed();
    out.drain_rate = fired as f64 / t.elapsed().as_secs_f64();
    out.drain_cpu_us = (process_cpu_secs() - cpu) * 1e6 / fired as f64;
    out.drain_poll_us = poll.as_secs_f64() * 1e6 / fired as f64;
    out.drain_complete_us = complete.as_secs_f64() * 1e6 / fired as f64;
    eprintln!(
        "[ours] catch-up: {fired} overdue fired at {:.0}/s (per timer: poll {:.1} µs, complete {:.1} µs)",
        out.drain_rate, out.drain_poll_us, out.drain_complete_us
    );
    out
}

/// Reopens the store and the queue, times them and the first `poll_due` returning a timer,
/// and completes that timer.
fn ours_restart(path: &Path) -> (Queue, f64, String) {
    let disk = dir_size(path);
    let t = Instant::now();
    let store = RocksStore::open(path, RocksOptions::default()).expect("reopen");
    let t_store = t.elapsed();
    let mut q = TimerQueue::open(queue_config(), store, ChaCha20Rng::seed_from_u64(3))
        .expect("reopen queue");
    let t_queue = t.elapsed();
    let first = loop {
        let got = q.poll_due(UnixTime(now_ms()), 1).expect("poll_due");
        if !got.is_empty() {
            break got;
        }
    };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let detail = format!(
        "RocksStore::open {:.0} ms, TimerQueue::open {:.0} ms, first poll_due {:.1} ms; {:.1} MB on disk",
        t_store.as_secs_f64() * 1000.0,
        (t_queue - t_store).as_secs_f64() * 1000.0,
        (t.elapsed() - t_queue).as_secs_f64() * 1000.0,
        disk as f64 / 1e6
    );
    eprintln!("[ours] restart to first fire {ms:.0} ms ({detail})");
    let ids: Vec<TaskId> = first.iter().map(|task| task.id).collect();
    assert_eq!(q.complete_many(&ids).expect("complete_many"), 1);
    (q, ms, detail)
}

// ---------------------------------------------------------------------------------------------
// Redis: the shared RESP2 client (bench/resp.rs)

#[path = "../../bench/resp.rs"]
mod resp;
use resp::{Redis, Reply};

/// Schedules `jobs` on Redis: per batch one round trip `MULTI; ZADD; HSET; EXEC`.
fn redis_schedule(
    r: &mut Redis,
    jobs: &[Job],
    batch: usize,
    keys: (&[u8], &[u8]),
    due: impl Fn(&Job) -> u64,
) {
    for chunk in jobs.chunks(batch) {
        r.args(&[b"MULTI"]);
        r.cmd(2 + 2 * chunk.len()).arg(b"ZADD").arg(keys.0);
        for j in chunk {
            r.arg(due(j).to_string().as_bytes()).arg(&j.hex);
        }
        r.cmd(2 + 2 * chunk.len()).arg(b"HSET").arg(keys.1);
        for j in chunk {
            r.arg(&j.hex).arg(&j.payload);
        }
        r.args(&[b"EXEC"]);
        let replies = r.exec().expect("schedule round trip");
        for reply in replies {
            if let Reply::Array(Some(results)) = reply {
                results.into_iter().for_each(Reply::ok);
            } else {
                reply.ok();
            }
        }
    }
}

/// One poll: due members (with their scores), then their payloads.
fn redis_poll(r: &mut Redis, now: u64, max: usize) -> Vec<(Vec<u8>, u64)> {
    let now = now.to_string();
    let max = max.to_string();
    let items = r
        .call(&[
            b"ZRANGEBYSCORE",
            ZKEY,
            b"-inf",
            now.as_bytes(),
            b"WITHSCORES",
            b"LIMIT",
            b"0",
            max.as_bytes(),
        ])
        .expect("ZRANGEBYSCORE")
        .array();
    let mut due = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(member), Some(score)) = (it.next(), it.next()) {
        let score: f64 = String::from_utf8(score.bulk())
            .unwrap()
            .parse()
            .expect("score");
        due.push((member.bulk(), score as u64));
    }
    if !due.is_empty() {
        r.cmd(2 + due.len()).arg(b"HMGET").arg(HKEY);
        for (member, _) in &due {
            r.arg(member);
        }
        let payloads = r.exec().expect("HMGET").pop().expect("reply").array();
        assert!(
            payloads.into_iter().all(|p| p.bulk().len() == PAYLOAD_LEN),
            "payload missing"
        );
    }
    due
}

/// Completes fired members: one round trip `MULTI; ZREM; HDEL; EXEC`.
fn redis_complete(r: &mut Redis, fired: &[(Vec<u8>, u64)]) -> usize {
    r.args(&[b"MULTI"]);
    r.cmd(2 + fired.len()).arg(b"ZREM").arg(ZKEY);
    for (m, _) in fired {
        r.arg(m);
    }
    r.cmd(2 + fired.len()).arg(b"HDEL").arg(HKEY);
    for (m, _) in fired {
        r.arg(m);
    }
    r.args(&[b"EXEC"]);
    let mut replies = r.exec().expect("complete round trip");
    let results = replies.pop().expect("EXEC reply").array();
    match results.first() {
        Some(Reply::Int(removed)) => *removed as usize,
        other => die!("unexpected ZREM result {other:?}"),
    }
}

/// Shuts Redis down (`SHUTDOWN`: AOF fsynced, no RDB), then times spawning `redis-server
/// <conf>` until `ZRANGEBYSCORE` + `HMGET` return a due timer (`-LOADING` while it replays).
/// `previous` is the server this bench spawned before, if any (waited for).
fn redis_restart(
    mut r: Redis,
    previous: Option<std::process::Child>,
    addr: &str,
    conf: &str,
    aof_dir: &Path,
) -> (Redis, std::process::Child, f64, String) {
    let aof = dir_size(aof_dir);
    r.args(&[b"SHUTDOWN"]);
    // Success closes the connection without a reply.
    assert!(r.exec().is_err(), "SHUTDOWN answered");
    drop(r);
    if let Some(mut child) = previous {
        child.wait().expect("wait for redis-server");
    }
    while TcpStream::connect(addr).is_ok() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let server =
        std::env::var("WHISPR_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let t = Instant::now();
    let child = Command::new(&server)
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die!("spawning {server}: {e}"));
    let (mut conn, mut loading_replies) = (None, 0u32);
    let first = loop {
        let Some(c) = conn.as_mut() else {
            conn = Redis::connect(addr, 1 << 20).ok();
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        };
        let now = now_ms().to_string();
        let reply = c
            .call(&[
                b"ZRANGEBYSCORE",
                ZKEY,
                b"-inf",
                now.as_bytes(),
                b"LIMIT",
                b"0",
                b"1",
            ])
            .expect("ZRANGEBYSCORE");
        match reply {
            Reply::Error(e) if e.starts_with("LOADING") => {
                loading_replies += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            reply => {
                if let Some(m) = reply.array().pop() {
                    let p = c.call(&[b"HMGET", HKEY, &m.bulk()]).unwrap().array();
                    assert!(!p.is_empty(), "payload missing");
                    break t.elapsed();
                }
            }
        }
    };
    let ms = first.as_secs_f64() * 1000.0;
    let detail = format!(
        "spawn redis-server, AOF load ({loading_replies} -LOADING replies), first ZRANGEBYSCORE + \
         HMGET; {:.1} MB of AOF",
        aof as f64 / 1e6
    );
    eprintln!("[redis] restart to first fire {ms:.0} ms ({detail})");
    (conn.expect("connected"), child, ms, detail)
}

fn wait_rewrite_done(r: &mut Redis) {
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let running = r.info_field("persistence", "aof_rewrite_in_progress");
        let scheduled = r.info_field("persistence", "aof_rewrite_scheduled");
        if running == "0" && scheduled == "0" {
            // Old AOF files are unlinked in the background.
            std::thread::sleep(Duration::from_millis(300));
            return;
        }
    }
}

fn run_redis(args: &Args, jobs: &[Job], addr: &str) -> (Outcome, String) {
    let n = args.timers;
    let b = args.batch;
    let mut out = Outcome::default();
    let mut spawned = None;
    let mut r = Redis::connect(addr, 1 << 20).expect("connect to Redis");
    let version = r.info_field("server", "redis_version");
    let dir = PathBuf::from(r.config_get("dir")).join(r.config_get("appenddirname"));
    assert_eq!(r.config_get("appendonly"), "yes", "Redis must run with AOF");
    assert_eq!(
        r.config_get("appendfsync"),
        "always",
        "appendfsync must be always"
    );
    r.call(&[b"DEL", ZKEY, HKEY, CALIB_ZKEY, CALIB_HKEY])
        .unwrap()
        .ok();

    // Calibration on scratch keys.
    let calib_jobs = &jobs[..calibration_len(n, b)];
    let t = Instant::now();
    redis_schedule(&mut r, calib_jobs, b, (CALIB_ZKEY, CALIB_HKEY), |_| {
        now_ms() + 86_400_000
    });
    let per_batch = t.elapsed() / calib_jobs.len().div_ceil(b) as u32;
    r.call(&[b"DEL", CALIB_ZKEY, CALIB_HKEY]).unwrap().ok();

    let mem0: u64 = r.info_field("memory", "used_memory").parse().unwrap();
    let aof0 = dir_size(&dir);
    let (t0, estimate_ms) = window_start(args, per_batch);
    eprintln!(
        "[redis] scheduling {n} timers in batches of {b} (calibrated {:.2} ms/batch, estimate {:.1} s); \
         due window starts in {:.1} s",
        per_batch.as_secs_f64() * 1000.0,
        estimate_ms as f64 / 1000.0,
        (t0 - now_ms()) as f64 / 1000.0
    );
    let t = Instant::now();
    let cpu = redis_cpu_secs(&mut r) + process_cpu_secs();
    redis_schedule(&mut r, jobs, b, (ZKEY, HKEY), |j| t0 + j.offset_ms);
    out.schedule_secs = t.elapsed().as_secs_f64();
    out.schedule_cpu_us = (redis_cpu_secs(&mut r) + process_cpu_secs() - cpu) * 1e6 / n as f64;
    out.schedule_rate = n as f64 / out.schedule_secs;
    out.schedule_batch_ms = out.schedule_secs * 1000.0 / n.div_ceil(b) as f64;
    let mem1: u64 = r.info_field("memory", "used_memory").parse().unwrap();
    let aof1 = dir_size(&dir);
    out.memory_per_timer = mem1.saturating_sub(mem0) as f64 / n as f64;
    out.log_sched_per_timer = aof1.saturating_sub(aof0) as f64 / n as f64;
    out.disk_per_timer = out.log_sched_per_timer;
    r.call(&[b"BGREWRITEAOF"]).unwrap().ok();
    wait_rewrite_done(&mut r);
    let aof2 = dir_size(&dir);
    out.compact_per_timer = aof2 as f64 / n as f64;
    eprintln!(
        "[redis] scheduled in {:.2} s ({:.0}/s); AOF {:.1} MB (+{:.1} MB), after BGREWRITEAOF {:.1} MB; \
         used_memory +{:.1} MB",
        out.schedule_secs,
        n as f64 / out.schedule_secs,
        aof1 as f64 / 1e6,
        aof1.saturating_sub(aof0) as f64 / 1e6,
        aof2 as f64 / 1e6,
        mem1.saturating_sub(mem0) as f64 / 1e6
    );

    // Fire in real time.
    let start = now_ms();
    out.overdue_at_fire_start = match r
        .call(&[b"ZCOUNT", ZKEY, b"-inf", start.to_string().as_bytes()])
        .unwrap()
    {
        Reply::Int(c) => c as usize,
        other => die!("ZCOUNT: {other:?}"),
    };
    eprintln!(
        "[redis] firing; {} timers overdue at start, waiting {:.1} s for the window",
        out.overdue_at_fire_start,
        t0.saturating_sub(start) as f64 / 1000.0
    );
    let mut late = Vec::with_capacity(n);
    let mut late_at_poll = Vec::with_capacity(n);
    let (mut poll_us, mut complete_us) = (Vec::new(), Vec::new());
    let mut busy = Duration::ZERO;
    let mut fired = 0usize;
    loop {
        let t = Instant::now();
        let began = now_us();
        let batch = redis_poll(&mut r, began / 1000, b);
        let returned = now_us();
        if batch.is_empty() {
            let first = r
                .call(&[b"ZRANGE", ZKEY, b"0", b"0", b"WITHSCORES"])
                .unwrap()
                .array();
            busy += t.elapsed();
            if fired >= n {
                break;
            }
            match first.into_iter().nth(1) {
                Some(score) => {
                    let score: f64 = String::from_utf8(score.bulk()).unwrap().parse().unwrap();
                    sleep_until_ms(score as u64);
                }
                None => break,
            }
            continue;
        }
        late.extend(
            batch
                .iter()
                .map(|(_, due)| returned.saturating_sub(due * 1000)),
        );
        late_at_poll.extend(
            batch
                .iter()
                .map(|(_, due)| began.saturating_sub(due * 1000)),
        );
        poll_us.push(returned.saturating_sub(began));
        out.polls += 1;
        out.full_polls += usize::from(batch.len() == b);
        let tc = Instant::now();
        fired += redis_complete(&mut r, &batch);
        complete_us.push(tc.elapsed().as_micros() as u64);
        busy += t.elapsed();
    }
    let end = now_us();
    let span_secs = end.saturating_sub(t0 * 1000) as f64 / 1e6;
    out.fire_rate = fired as f64 / span_secs;
    out.fire_busy = busy.as_secs_f64() / span_secs;
    out.per_poll = fired as f64 / out.polls.max(1) as f64;
    out.late = lateness(late);
    out.late_at_poll = lateness(late_at_poll);
    out.poll_time = lateness(poll_us);
    out.complete_time = lateness(complete_us);
    let aof3 = dir_size(&dir);
    out.log_fire_per_timer = aof3.saturating_sub(aof2) as f64 / n as f64;
    out.device_writes_per_timer = out.log_sched_per_timer + out.log_fire_per_timer;
    eprintln!(
        "[redis] fired {fired} in {span_secs:.2} s from the window start ({:.0}/s, busy {:.0} %), \
         {} polls ({} full)",
        out.fire_rate,
        out.fire_busy * 100.0,
        out.polls,
        out.full_polls
    );

    // Restart to first fire, with N overdue timers: as the AOF stands, then after a rewrite.
    let now = now_ms();
    redis_schedule(&mut r, jobs, b, (ZKEY, HKEY), |j| now - 1 - j.offset_ms);
    match std::env::var("WHISPR_BENCH_REDIS_CONF") {
        Ok(conf) => {
            let (conn, child, ms, detail) = redis_restart(r, None, addr, &conf, &dir);
            out.restart_ms = ms;
            out.restart_detail = detail;
            r = conn;
            r.call(&[b"BGREWRITEAOF"]).unwrap().ok();
            wait_rewrite_done(&mut r);
            let (conn, child, ms, detail) = redis_restart(r, Some(child), addr, &conf, &dir);
            out.restart_compact_ms = ms;
            out.restart_compact_detail = detail;
            r = conn;
            spawned = Some(child);
        }
        Err(_) => eprintln!("[redis] WHISPR_BENCH_REDIS_CONF not set: restart not measured"),
    }

    // Catch-up.
    let t = Instant::now();
    let cpu = redis_cpu_secs(&mut r) + process_cpu_secs();
    let mut fired = 0usize;
    let (mut poll, mut complete) = (Duration::ZERO, Duration::ZERO);
    while fired < n {
        let tp = Instant::now();
        let batch = redis_poll(&mut r, now_ms(), b);
        assert!(!batch.is_empty(), "overdue timers missing after restart");
        let tc = Instant::now();
        poll += tc - tp;
        fired += redis_complete(&mut r, &batch);
        complete += tc.elapsed();
    }
    out.drain_rate = fired as f64 / t.elapsed().as_secs_f64();
    out.drain_cpu_us = (redis_cpu_secs(&mut r) + process_cpu_secs() - cpu) * 1e6 / fired as f64;
    out.drain_poll_us = poll.as_secs_f64() * 1e6 / fired as f64;
    out.drain_complete_us = complete.as_secs_f64() * 1e6 / fired as f64;
    eprintln!(
        "[redis] catch-up: {fired} overdue fired at {:.0}/s (per timer: poll {:.1} µs, complete {:.1} µs)",
        out.drain_rate, out.drain_poll_us, out.drain_complete_us
    );
    // Stop the server this bench started (the script stops the one it started).
    if let Some(mut child) = spawned {
        r.args(&[b"SHUTDOWN", b"NOSAVE"]);
        let _closed = r.exec();
        child.wait().expect("wait for redis-server");
    }
    (out, version)
}

// ---------------------------------------------------------------------------------------------
// Report

fn main() {
    let args = parse_args();
    let n = args.timers;
    let redis_addr = std::env::var("WHISPR_BENCH_REDIS")
        .ok()
        .filter(|_| !args.skip_redis);
    let root_tmp;
    let root = match std::env::var_os("WHISPR_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            root_tmp = tempfile::tempdir().expect("temp dir");
            root_tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).expect("bench dir");
    eprintln!(
        "timers: N = {n}, batch B = {}, due window W = {:.1} s, payload {PAYLOAD_LEN} B, RocksDB in {}",
        args.batch,
        args.window_ms as f64 / 1000.0,
        root.display()
    );
    let probe_start = fsync_probe(&root);
    let load_start = load_average();
    let t = Instant::now();
    let jobs = workload(n, args.window_ms);
    eprintln!("workload generated in {:.1} s", t.elapsed().as_secs_f64());

    let ours = (!args.skip_ours).then(|| run_ours(&args, &jobs, &root));
    let (redis, version) = match redis_addr.as_deref() {
        Some(addr) => {
            let (outcome, version) = run_redis(&args, &jobs, addr);
            (Some(outcome), Some(version))
        }
        None => (None, None),
    };
    if redis.is_none() && !args.skip_redis {
        eprintln!(
            "WHISPR_BENCH_REDIS not set: Redis not measured (use timer-service/bench/run.sh)"
        );
    }

    let probe_end = fsync_probe(&root);
    let load_end = load_average();
    println!();
    println!(
        "## {n} timers, batches of {}, due over {:.0} s; ours = TimerQueue + RocksStore, Redis {}",
        args.batch,
        args.window_ms as f64 / 1000.0,
        version.as_deref().unwrap_or("(not run)")
    );
    println!();
    println!(
        "Back-to-back 4 KiB append + fdatasync here: p50 {:.2} ms, p99 {:.2} ms before the run, \
         p50 {:.2} ms, p99 {:.2} ms after; load average (1 min) {load_start} before, {load_end} after.",
        probe_start.0, probe_start.1, probe_end.0, probe_end.1
    );
    println!();
    println!("| metric | ours | Redis | ours/Redis | better |");
    println!("|---|---:|---:|---:|---|");
    type Get = fn(&Outcome) -> f64;
    // (metric, value, which is better, decimals, measured for Redis too)
    let rows: [(&str, Get, &str, usize, bool); 26] = [
        (
            "schedule throughput (timers/s)",
            |o| o.schedule_rate,
            "higher",
            0,
            true,
        ),
        (
            "schedule: time per synced batch (ms)",
            |o| o.schedule_batch_ms,
            "lower",
            2,
            true,
        ),
        (
            "schedule: CPU time per timer (µs, server + client)",
            |o| o.schedule_cpu_us,
            "lower",
            2,
            true,
        ),
        (
            "fire rate over the window (fires/s)",
            |o| o.fire_rate,
            "higher",
            0,
            true,
        ),
        (
            "fire: timers per poll (mean; B = full)",
            |o| o.per_poll,
            "(context)",
            0,
            true,
        ),
        ("fire lateness p50 (ms)", |o| o.late.p50, "lower", 2, true),
        ("fire lateness p99 (ms)", |o| o.late.p99, "lower", 2, true),
        ("fire lateness max (ms)", |o| o.late.max, "lower", 2, true),
        (
            "fire: lateness when the poll began, p50 (ms)",
            |o| o.late_at_poll.p50,
            "lower",
            2,
            true,
        ),
        (
            "fire: lateness when the poll began, p99 (ms)",
            |o| o.late_at_poll.p99,
            "lower",
            2,
            true,
        ),
        (
            "fire: poll time per poll, p99 (ms)",
            |o| o.poll_time.p99,
            "lower",
            3,
            true,
        ),
        (
            "fire: poll time per poll, max (ms)",
            |o| o.poll_time.max,
            "lower",
            3,
            true,
        ),
        (
            "fire: completion call per poll, p99 (ms)",
            |o| o.complete_time.p99,
            "lower",
            3,
            true,
        ),
        (
            "catch-up fire rate, all overdue (fires/s)",
            |o| o.drain_rate,
            "higher",
            0,
            true,
        ),
        (
            "catch-up: poll time per timer (µs)",
            |o| o.drain_poll_us,
            "lower",
            2,
            true,
        ),
        (
            "catch-up: complete time per timer (µs)",
            |o| o.drain_complete_us,
            "lower",
            2,
            true,
        ),
        (
            "catch-up: CPU time per timer (µs, server + client)",
            |o| o.drain_cpu_us,
            "lower",
            2,
            true,
        ),
        (
            "restart to first fire, N overdue (ms)",
            |o| o.restart_ms,
            "lower",
            0,
            true,
        ),
        (
            "restart to first fire after flush / AOF rewrite (ms)",
            |o| o.restart_compact_ms,
            "lower",
            0,
            true,
        ),
        (
            "disk per timer after scheduling (B)",
            |o| o.disk_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "compacted disk per timer (B)",
            |o| o.compact_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "log written per timer, schedule (B)",
            |o| o.log_sched_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "log written per timer, fire (B)",
            |o| o.log_fire_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "all disk writes per timer, schedule + fire (B)",
            |o| o.device_writes_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "memory growth per timer (B)",
            |o| o.memory_per_timer,
            "lower",
            1,
            true,
        ),
        (
            "RocksDB logical bytes written per timer (B)",
            |o| o.logical_per_timer,
            "lower",
            1,
            false,
        ),
    ];
    for (name, get, better, decimals, both) in rows {
        let fmt = |o: Option<&Outcome>| {
            o.map_or_else(|| "—".to_owned(), |o| format!("{:.*}", decimals, get(o)))
        };
        let redis_cell = if both {
            fmt(redis.as_ref())
        } else {
            "—".to_owned()
        };
        let ratio = match (&ours, &redis) {
            (Some(a), Some(b)) if both && get(b) != 0.0 => format!("{:.2}", get(a) / get(b)),
            _ => "—".to_owned(),
        };
        println!(
            "| {name} | {} | {redis_cell} | {ratio} | {better} |",
            fmt(ours.as_ref())
        );
    }
    println!();
    for (who, o) in [("ours", &ours), ("Redis", &redis)] {
        if let Some(o) = o {
            println!(
                "- {who}: {} timers overdue when firing began; {} of {} fire polls returned a full \
                 batch; fire loop busy {:.0} % of the window; restart as it stands: {}; restart \
                 after flush / rewrite: {}",
                o.overdue_at_fire_start,
                o.full_polls,
                o.polls,
                o.fire_busy * 100.0,
                o.restart_detail,
                o.restart_compact_detail
            );
        }
    }
    println!(
        "- disk after scheduling: ours RocksStore::disk_usage_bytes after flush, Redis the AOF directory; \
         compacted: ours SST files, Redis the AOF after BGREWRITEAOF (RDB preamble); \
         log: ours RocksDB WAL bytes, Redis AOF growth; all disk writes: ours WAL + flush + compaction, \
         Redis AOF appends; memory: ours process RSS growth while scheduling, Redis used_memory growth."
    );
}
