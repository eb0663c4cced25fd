#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]
//! "Durable deposits": `MailboxNode::deposit` (group commit, one fsynced RocksDB write per
//! batch of concurrent deposits) against Redis doing the equivalent `LPUSH` with
//! `appendfsync always`, in one run, reported as ratios (ours / Redis).
//!
//! Not a criterion bench: every cell runs once, for a fixed time, against the wall clock. Run
//! it through `mailbox/bench/run.sh`, which starts a throw-away `redis-server` (AOF on,
//! `appendfsync always`, no RDB snapshots, no automatic AOF rewrite) and passes its port:
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target bash mailbox/bench/run.sh [--quick] [...]
//! ```
//!
//! or directly, ours only (no Redis columns):
//! `cargo bench --workspace --bench deposits -- [--quick]`.
//!
//! Options: `--quick` (smoke run: one round of short cells, 5k-message write-amplification
//! runs, 50k messages for the restart), `--rounds R` (default 3), `--secs S` (measured seconds
//! per cell and round, default 5), `--warmup-secs W` (default 1), `--concurrency 1,8,32,64`,
//! `--amp-messages N` (default
//! 100 000 for the small body, 40 % of it for the large one), `--restart-messages N` (default
//! 1 000 000), `--fill-batch B` (default 10 000), `--skip-restart`, `--skip-redis`,
//! `--redis-port P` / `--redis-host H` (or `WHISPR_BENCH_REDIS=host:port`), `--redis-conf F`
//! (or `WHISPR_BENCH_REDIS_CONF`; Redis's config file, needed to restart it),
//! `--redis-server BIN` (or `WHISPR_BENCH_REDIS_SERVER`, default `redis-server`),
//! `--pipeline on|off` (ours: `commit.pipeline`, default on; off prepares a batch only once
//! the previous one is durable).
//! `WHISPR_BENCH_DIR`: where RocksDB goes (default a temporary directory).
//!
//! Phases:
//!
//! 1. **Deposits** (the table's cells): for every envelope size (256-byte body, and the
//!    largest body whose deposit still fits in one Sphinx packet, about 2 KiB of envelope)
//!    and every concurrency N: ours opens a fresh `MailboxNode` (its own data directory,
//!    default group commit), creates N mailboxes and runs N tokio tasks, each depositing into
//!    its own mailbox in a loop through `MailboxNode::deposit` (which returns once the batch
//!    holding the deposit is fsynced). Per-mailbox limits are raised so that quotas and rate
//!    limits never bind. Redis gets N connections (one thread each), each `LPUSH`ing the same
//!    encoded envelope bytes into its own list in a loop, one command per round trip; with
//!    `appendfsync always` Redis writes and fsyncs the AOF once per event-loop iteration
//!    before replying, so it group-commits across connections too. After `--warmup-secs`,
//!    every deposit (or reply) completing in the next `--secs` seconds counts; latency is
//!    from the call to the durable ack. Ours and Redis alternate cell by cell, and the whole
//!    sweep runs `--rounds` times (a fresh node each time), so that both see the same machine
//!    load; the table pools the rounds (rate = acks / measured time, percentiles over all
//!    acks) and shows the per-round rates. Envelopes are sealed once per mailbox (`testkit`) and
//!    re-sent with fresh random dedup ids: the node neither opens nor verifies envelopes
//!    (sealed sender), so it stores exactly what a fresh envelope of that size would cost,
//!    and the senders' sealing CPU stays out of the measurement. No ack SURB.
//! 2. **Bytes written per message**: per envelope size, M deposits through
//!    `MailboxCore::deposit_many` over a `RocksStore` (64 mailboxes, batches of 64, i.e. a
//!    full group commit at concurrency 64), then `RocksStore::flush` and a wait for
//!    compactions to settle; `MailboxStore::stats` deltas: WAL bytes + SST bytes (flush and
//!    compaction) per stored message, against the envelope as received (its encoding) →
//!    write amplification; live SST bytes per message → space. Redis: AOF growth per `LPUSH`
//!    over phase 1's cells of that size.
//! 3. **A message's whole life** (store, serve, delete): the same deposits, then every
//!    message fetched by its owner and acknowledged (deleted), either after a flush (the
//!    recipient was away: the body reached a blob file) or every 1,024 deposits (the recipient
//!    was online: served from the memtable), then flushed, settled and compacted whole; every
//!    WAL, SST and blob byte written over that, per message. No Redis column (its AOF would
//!    also log the deletes).
//! 4. **Restart with 1M messages**: 1 000 000 small (256-byte body) envelopes into 100
//!    mailboxes (10 000 each, the default per-mailbox quota) through `deposit_many` in
//!    batches of 10 000; the store is closed as it stands (no flush: RocksDB replays its WAL,
//!    at most `max_total_wal_bytes` = 64 MiB, on open, as after any restart), then a child
//!    process (this binary, `--restart-child DIR`) times `RocksStore::open` +
//!    `MailboxCore::open` and reports its peak RSS (`VmHWM`); then again (the first open
//!    flushed the replayed WAL). Redis (when its config file is known): `BGREWRITEAOF` to
//!    drop phase 1's history, 1M `LPUSH`es of the same bytes (`MULTI`, 1000 `LPUSH`, `EXEC`
//!    per round trip: one AOF write and fsync each, like one `deposit_many`),
//!    `SHUTDOWN`, then the time from spawning `redis-server <conf>` until `LINDEX` answers
//!    (it answers `-LOADING` while it replays the AOF), and its `VmHWM`; then again after
//!    `BGREWRITEAOF` (RDB preamble). Then the same 1M fill once more into a fresh directory,
//!    flushed and settled, for its bytes written once everything is on disk.
//!    `WHISPR_BENCH_KEEP=1` keeps the restart directory (to profile `--restart-child DIR`).
//!
//! Output: markdown tables on stdout, then one JSON line (`{"bench":"mailbox-deposits",…}`).
//! The Redis client is a small RESP2 client over `std::net::TcpStream` in this file.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use whispr_mailbox::config::CoreConfig;
use whispr_mailbox::core::{Incoming, MailboxCore};
use whispr_mailbox::crypto::MasterKey;
use whispr_mailbox::node::{MailboxNode, NoMesh, NodeConfig};
use whispr_mailbox::rocks::{RocksOptions, RocksStore};
use whispr_mailbox::store::{MailboxStore, StoreStats};
use whispr_mailbox::testkit::Owner;
use whispr_protocol::envelope::Envelope;
use whispr_protocol::payload::FinalMessage;
use whispr_protocol::{DedupId, UnixTime};

const MASTER: [u8; 32] = [0x42; 32];
const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
const SMALL_BODY: usize = 256;
/// The large cell asks for this body and gets the largest that fits in one packet.
const LARGE_BODY: usize = 2048;
/// Mailboxes (and batch size) of the write-amplification runs.
const AMP_MAILBOXES: usize = 64;
/// Messages per mailbox in the restart fill (the default per-mailbox quota).
const FILL_PER_MAILBOX: usize = 10_000;
/// Redis fill: commands per pipelined round trip.
const REDIS_PIPELINE: usize = 1000;

// ---------------------------------------------------------------------------------------------
// Arguments, helpers

struct Args {
    quick: bool,
    warmup: Duration,
    secs: Duration,
    concurrency: Vec<usize>,
    rounds: usize,
    amp_messages: usize,
    restart_messages: usize,
    fill_batch: usize,
    skip_restart: bool,
    redis: Option<String>,
    redis_conf: Option<String>,
    redis_server: String,
    restart_child: Option<PathBuf>,
    /// `commit.pipeline` of ours.
    pipeline: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: deposits [--quick] [--secs S] [--warmup-secs W] [--concurrency 1,8,32,64] \
         [--rounds R] [--amp-messages N] [--restart-messages N] [--fill-batch B] [--skip-restart] \
         [--skip-redis] [--redis-port P] [--redis-host H] [--redis-conf FILE] \
         [--redis-server BIN] [--pipeline on|off]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut quick = false;
    let (mut secs, mut warmup) = (None::<f64>, None::<f64>);
    let mut concurrency = vec![1, 8, 32, 64];
    let mut rounds = None::<usize>;
    let (mut amp, mut restart, mut fill_batch) = (None::<usize>, None::<usize>, 10_000usize);
    let (mut skip_restart, mut skip_redis) = (false, false);
    let (mut host, mut port) = ("127.0.0.1".to_owned(), None::<u16>);
    let mut redis_conf = std::env::var("WHISPR_BENCH_REDIS_CONF").ok();
    let mut redis_server =
        std::env::var("WHISPR_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let mut restart_child = None;
    let mut pipeline = true;
    let mut it = std::env::args().skip(1);
    let count = |s: String| -> usize { s.replace('_', "").parse().unwrap_or_else(|_| usage()) };
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--quick" => quick = true,
            "--secs" => secs = Some(value().parse().unwrap_or_else(|_| usage())),
            "--warmup-secs" => warmup = Some(value().parse().unwrap_or_else(|_| usage())),
            "--concurrency" => {
                concurrency = value()
                    .split(',')
                    .map(|c| c.trim().parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--rounds" => rounds = Some(count(value())),
            "--amp-messages" => amp = Some(count(value())),
            "--restart-messages" => restart = Some(count(value())),
            "--fill-batch" => fill_batch = count(value()),
            "--skip-restart" => skip_restart = true,
            "--skip-redis" => skip_redis = true,
            "--redis-port" => port = Some(value().parse().unwrap_or_else(|_| usage())),
            "--redis-host" => host = value(),
            "--redis-conf" => redis_conf = Some(value()),
            "--redis-server" => redis_server = value(),
            "--restart-child" => restart_child = Some(PathBuf::from(value())),
            "--pipeline" => {
                pipeline = match value().as_str() {
                    "on" => true,
                    "off" => false,
                    _ => usage(),
                }
            }
            _ => {
                eprintln!("deposits bench: unknown argument {arg:?}");
                usage()
            }
        }
    }
    if concurrency.is_empty() || concurrency.contains(&0) || fill_batch == 0 || rounds == Some(0) {
        usage()
    }
    let redis = match port {
        Some(p) => Some(format!("{host}:{p}")),
        None => std::env::var("WHISPR_BENCH_REDIS").ok(),
    }
    .filter(|_| !skip_redis);
    Args {
        quick,
        warmup: Duration::from_secs_f64(warmup.unwrap_or(if quick { 0.3 } else { 1.0 })),
        secs: Duration::from_secs_f64(secs.unwrap_or(if quick { 1.5 } else { 5.0 })),
        concurrency,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        amp_messages: amp
            .unwrap_or(if quick { 5_000 } else { 100_000 })
            .max(AMP_MAILBOXES),
        restart_messages: restart
            .unwrap_or(if quick { 50_000 } else { 1_000_000 })
            .max(1),
        fill_batch,
        skip_restart,
        redis,
        redis_conf: redis_conf.filter(|_| !skip_redis),
        redis_server,
        restart_child,
        pipeline,
    }
}

fn now() -> UnixTime {
    UnixTime(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock before 1970")
            .as_millis() as u64,
    )
}

/// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`).
fn status_kb(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
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

/// Bytes of RocksDB WAL files (`*.log`) in `dir`.
fn wal_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latency percentiles in ms of latencies in µs (sorted in place).
fn percentiles(lat: &mut [u64]) -> (f64, f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0;
    (at(0.50), at(0.99), mean)
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random-looking dedup id, unique per (`stream`, `i`).
fn dedup_id(stream: u64, i: u64) -> DedupId {
    let a = splitmix(stream.rotate_left(40) ^ i);
    let b = splitmix(a ^ stream);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    DedupId(id)
}

/// Node and core limits: the defaults, with per-mailbox quotas and rate limits out of the way.
fn bench_limits() -> CoreConfig {
    CoreConfig {
        deposits_per_min: 1_000_000_000,
        mailbox_messages_max: 1 << 40,
        mailbox_bytes_max: 1 << 50,
        ..CoreConfig::default()
    }
}

/// `body_len` bytes sealed to `owner`, if the deposit fits in one Sphinx packet.
fn seal(owner: &Owner, rng: &mut StdRng, body_len: usize) -> Option<Envelope> {
    let body = vec![0xa7u8; body_len];
    let envelope = owner
        .envelope(rng, DedupId([0; 16]), None, None, &body)
        .ok()?;
    FinalMessage::Deposit(envelope.clone()).encode().ok()?;
    Some(envelope)
}

/// The largest body at most `wanted` bytes whose deposit fits in one packet.
fn largest_body(wanted: usize) -> usize {
    let owner = Owner::from_seed(7);
    let mut rng = StdRng::seed_from_u64(7);
    let (mut lo, mut hi) = (0usize, wanted);
    assert!(
        seal(&owner, &mut rng, lo).is_some(),
        "an empty body must fit"
    );
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if seal(&owner, &mut rng, mid).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// `n` mailbox owners (seeds from `seed`) and one envelope of `body` bytes sealed to each.
fn owners(seed: u64, n: usize, body: usize) -> Vec<(Owner, Envelope)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n as u64)
        .map(|i| {
            let owner = Owner::from_seed(seed + i);
            let envelope = seal(&owner, &mut rng, body).expect("body fits");
            (owner, envelope)
        })
        .collect()
}

/// `len` pseudo-random bytes from `seed`.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| splitmix(seed.rotate_left(24) ^ i).to_le_bytes())
        .take(len)
        .collect()
}

fn with_dedup(template: &Envelope, id: DedupId) -> Incoming {
    let mut e = template.clone();
    e.outer.dedup_id = id;
    Incoming::Deposit(e)
}

/// p50 and p99 of fdatasync after a 4 KiB append in `dir`: the floor of a durable ack.
fn fsync_probe(dir: &Path, n: usize) -> (f64, f64) {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = [0x5au8; 4096];
    let mut lat: Vec<u64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).expect("probe write");
            f.sync_data().expect("probe fdatasync");
            t.elapsed().as_micros() as u64
        })
        .collect();
    drop(f);
    let _ = std::fs::remove_file(&path);
    let (p50, p99, _) = percentiles(&mut lat);
    (p50, p99)
}

// ---------------------------------------------------------------------------------------------
// Phase 1: deposit cells

/// One run of one system in one cell.
#[derive(Default)]
struct Run {
    /// Latencies (µs) of the acks completed in the measured window.
    lat: Vec<u64>,
    /// Ours: group commits and deposits in them, in the window. Redis: AOF bytes and LPUSHes
    /// over the whole run (warm-up included).
    units: u64,
    items: u64,
}

/// One system's result in one cell: the runs of every round pooled.
#[derive(Clone, Default)]
struct Side {
    rate: f64,
    p50: f64,
    p99: f64,
    mean: f64,
    /// Acks completed in the measured windows.
    counted: u64,
    /// Rate of each round.
    round_rates: Vec<f64>,
    /// Ours: deposits per group commit. Redis: AOF bytes per LPUSH.
    per_unit: f64,
    /// Redis: LPUSHes over the whole runs (warm-ups included).
    items: u64,
}

impl Side {
    fn pool(runs: Vec<Run>, secs: Duration, ours: bool) -> Side {
        let round_rates = runs
            .iter()
            .map(|r| r.lat.len() as f64 / secs.as_secs_f64())
            .collect();
        let (units, items) = runs
            .iter()
            .fold((0, 0), |(u, i), r| (u + r.units, i + r.items));
        let mut lat: Vec<u64> = runs.into_iter().flat_map(|r| r.lat).collect();
        let (p50, p99, mean) = percentiles(&mut lat);
        Side {
            rate: 0.0,
            p50,
            p99,
            mean,
            counted: lat.len() as u64,
            round_rates,
            per_unit: if ours {
                items as f64 / units.max(1) as f64
            } else {
                units as f64 / items.max(1) as f64
            },
            items,
        }
        .with_rate(secs)
    }

    fn with_rate(mut self, secs: Duration) -> Side {
        let rounds = self.round_rates.len().max(1) as f64;
        self.rate = self.counted as f64 / (rounds * secs.as_secs_f64());
        self
    }

    fn spread(&self) -> String {
        let min = self
            .round_rates
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = self.round_rates.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}–{max:.0}")
    }
}

struct Cell {
    body: usize,
    envelope: usize,
    concurrency: usize,
    ours: Side,
    redis: Option<Side>,
}

fn ours_cell(
    rt: &tokio::runtime::Runtime,
    dir: PathBuf,
    seed: u64,
    concurrency: usize,
    body: usize,
    args: &Args,
) -> Run {
    let mut config = NodeConfig::with_data_dir(dir);
    config.limits = bench_limits();
    config.rng_seed = Some(seed);
    config.commit.pipeline = args.pipeline;
    let templates = owners(seed * 1000, concurrency, body);
    let (warmup, secs) = (args.warmup, args.secs);
    rt.block_on(async move {
        // The node is never closed: its writer thread holds it until the process exits. Each
        // cell's RocksDB stays open, idle, in its own directory.
        let node = MailboxNode::open(config, Arc::new(NoMesh::default())).expect("open node");
        for (owner, _) in &templates {
            node.create_mailbox(owner.create_request(RETENTION_MS))
                .expect("create mailbox");
        }
        let start = tokio::time::Instant::now();
        let (from, to) = (start + warmup, start + warmup + secs);
        let tasks: Vec<_> = templates
            .into_iter()
            .enumerate()
            .map(|(i, (_, template))| {
                let node = node.clone();
                let stream = (seed << 16) | i as u64;
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    for n in 0.. {
                        let incoming = with_dedup(&template, dedup_id(stream, n));
                        let t0 = tokio::time::Instant::now();
                        if t0 >= to {
                            break;
                        }
                        let receipt = node
                            .deposit(incoming)
                            .await
                            .unwrap_or_else(|e| panic!("deposit refused: {e}"));
                        assert!(!receipt.duplicate, "dedup id reused");
                        let t1 = tokio::time::Instant::now();
                        if t1 >= from && t1 <= to {
                            lat.push((t1 - t0).as_micros() as u64);
                        }
                    }
                    lat
                })
            })
            .collect();
        let m = node.metrics();
        let batches = || {
            (
                m.commit_batches.load(Ordering::Relaxed),
                m.commit_batched.load(Ordering::Relaxed),
            )
        };
        tokio::time::sleep_until(from).await;
        let (b0, d0) = batches();
        tokio::time::sleep_until(to).await;
        let (b1, d1) = batches();
        let mut lat = Vec::new();
        for task in tasks {
            lat.extend(task.await.expect("depositor task"));
        }
        Run {
            lat,
            units: b1 - b0,
            items: d1 - d0,
        }
    })
}

fn redis_cell(addr: &str, cell: usize, concurrency: usize, bytes: &[u8], args: &Args) -> Run {
    let mut admin = Redis::connect(addr, 1 << 16).expect("connect to Redis");
    let aof_dir = aof_dir(&mut admin);
    let keys: Vec<String> = (0..concurrency)
        .map(|i| format!("whispr:bench:{cell}:{i}"))
        .collect();
    let conns: Vec<Redis> = (0..concurrency)
        .map(|_| Redis::connect(addr, 1 << 16).expect("connect to Redis"))
        .collect();
    let aof0 = dir_size(&aof_dir);
    let start = Instant::now();
    let (from, to) = (start + args.warmup, start + args.warmup + args.secs);
    let results: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .zip(&keys)
            .map(|(mut r, key)| {
                s.spawn(move || {
                    let (mut lat, mut total) = (Vec::new(), 0u64);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= to {
                            break;
                        }
                        match r.call(&[b"LPUSH", key.as_bytes(), bytes]).expect("LPUSH") {
                            Reply::Int(len) if len > 0 => {}
                            other => panic!("LPUSH answered {other:?}"),
                        }
                        total += 1;
                        let t1 = Instant::now();
                        if t1 >= from && t1 <= to {
                            lat.push((t1 - t0).as_micros() as u64);
                        }
                    }
                    (lat, total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let aof1 = dir_size(&aof_dir);
    let items: u64 = results.iter().map(|(_, t)| t).sum();
    let lat: Vec<u64> = results.into_iter().flat_map(|(l, _)| l).collect();
    let del: Vec<&[u8]> = std::iter::once(&b"DEL"[..])
        .chain(keys.iter().map(|k| k.as_bytes()))
        .collect();
    admin.call(&del).expect("DEL").ok();
    Run {
        lat,
        units: aof1.saturating_sub(aof0),
        items,
    }
}

// ---------------------------------------------------------------------------------------------
// Phases 2 and 3: the core over RocksStore directly

type Core = MailboxCore<RocksStore, StdRng>;

fn open_core(dir: &Path, seed: u64) -> Core {
    let store = RocksStore::open(dir, RocksOptions::default()).expect("open RocksStore");
    MailboxCore::open(
        bench_limits(),
        store,
        MasterKey::from_bytes(&MASTER),
        StdRng::seed_from_u64(seed),
        now(),
    )
    .expect("open core")
}

/// Deposits `total` messages round-robin over `templates` in batches of `batch`.
fn fill(core: &mut Core, templates: &[(Owner, Envelope)], total: usize, batch: usize, seed: u64) {
    for (owner, _) in templates {
        core.create_mailbox(now(), owner.create_request(RETENTION_MS))
            .expect("create mailbox");
    }
    let mut done = 0usize;
    while done < total {
        let n = batch.min(total - done);
        let incoming: Vec<Incoming> = (done..done + n)
            .map(|j| {
                let (_, template) = &templates[j % templates.len()];
                with_dedup(template, dedup_id(seed, j as u64))
            })
            .collect();
        for result in core.deposit_many(now(), incoming) {
            let receipt = result.unwrap_or_else(|e| panic!("deposit refused: {e}"));
            assert!(!receipt.duplicate, "dedup id reused");
        }
        while core.poll_output().is_some() {}
        done += n;
    }
}

/// Waits until flushes and compactions stop writing (or 30 s).
fn settle(store: &RocksStore) {
    let mut last = store.stats().sst_bytes_written;
    let mut quiet = 0;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(500));
        let written = store.stats().sst_bytes_written;
        if written == last {
            quiet += 1;
            if quiet == 3 {
                return;
            }
        } else {
            (quiet, last) = (0, written);
        }
    }
}

#[derive(Clone)]
struct Amp {
    label: String,
    body: usize,
    envelope: usize,
    messages: usize,
    batch: usize,
    secs: f64,
    stored_value: f64,
    wal: f64,
    sst: f64,
    live_sst: f64,
    /// True when memtables were flushed and compactions settled before reading `sst`.
    flushed: bool,
    redis_aof: Option<f64>,
}

impl Amp {
    fn total(&self) -> f64 {
        self.wal + self.sst
    }

    fn from_stats(s0: StoreStats, s1: StoreStats, core: &Core, messages: usize) -> Amp {
        let stats = core.stats();
        assert_eq!(stats.messages as usize, messages, "messages stored");
        Amp::from_deltas(s0, s1, messages, stats.bytes as f64 / messages as f64)
    }

    fn from_deltas(s0: StoreStats, s1: StoreStats, messages: usize, stored_value: f64) -> Amp {
        let per = |x: u64| x as f64 / messages as f64;
        Amp {
            label: String::new(),
            body: 0,
            envelope: 0,
            messages,
            batch: 0,
            secs: 0.0,
            stored_value,
            wal: per(s1.wal_bytes_written - s0.wal_bytes_written),
            sst: per(s1.sst_bytes_written - s0.sst_bytes_written),
            live_sst: per(s1.sst_bytes_live),
            flushed: false,
            redis_aof: None,
        }
    }
}

/// Serves (fetches) every message of every mailbox in `templates` to its owner device and
/// acknowledges it, so that the node deletes it; returns how many were served.
fn serve_and_delete(core: &mut Core, templates: &[(Owner, Envelope)]) -> usize {
    let mut served = 0;
    for (owner, _) in templates {
        let device = owner.device(0).verifying_key().to_bytes();
        loop {
            let messages = core
                .fetch(now(), &owner.mailbox_id, &device, None, 100)
                .expect("fetch");
            let Some(last) = messages.last().map(|m| m.seq) else {
                break;
            };
            served += messages.len();
            core.ack(&owner.mailbox_id, &device, last).expect("ack");
        }
    }
    while core.poll_output().is_some() {}
    served
}

/// A message's whole life, for `messages` envelopes of `body` bytes over 64 mailboxes in
/// batches of 64: stored; served and deleted (every message fetched and acknowledged by its
/// owner), either after everything was flushed to disk (`late`: the recipient was away) or
/// every 1,024 deposits (16 per mailbox), before a flush (the recipient was online); then
/// flushed, settled and compacted whole (so that deletes reach the files). Every byte written
/// to the WAL, SST and blob files over that, per message.
fn life_run(root: &Path, body: usize, messages: usize, seed: u64, late: bool) -> Amp {
    let dir = root.join(format!("life-{body}-{late}"));
    let templates = owners(seed * 1000, AMP_MAILBOXES, body);
    let envelope = templates[0].1.encode().len();
    let mut core = open_core(&dir, seed);
    let s0 = core.store().stats();
    let t = Instant::now();
    let mut served = 0;
    if late {
        fill(&mut core, &templates, messages, AMP_MAILBOXES, seed);
        core.store().flush().expect("flush");
        settle(core.store());
        served += serve_and_delete(&mut core, &templates);
    } else {
        for (owner, _) in &templates {
            core.create_mailbox(now(), owner.create_request(RETENTION_MS))
                .expect("create mailbox");
        }
        let step = AMP_MAILBOXES * 16;
        let mut done = 0usize;
        while done < messages {
            let n = step.min(messages - done);
            let mut left = n;
            let mut j = done;
            while left > 0 {
                let k = AMP_MAILBOXES.min(left);
                let incoming: Vec<Incoming> = (j..j + k)
                    .map(|i| with_dedup(&templates[i % AMP_MAILBOXES].1, dedup_id(seed, i as u64)))
                    .collect();
                for result in core.deposit_many(now(), incoming) {
                    assert!(!result.expect("deposit").duplicate);
                }
                (j, left) = (j + k, left - k);
            }
            done += n;
            served += serve_and_delete(&mut core, &templates);
        }
    }
    assert_eq!(served, messages, "every message served once");
    assert_eq!(core.stats().messages, 0, "every message deleted");
    core.store().flush().expect("flush");
    settle(core.store());
    core.store().compact().expect("compact");
    settle(core.store());
    let secs = t.elapsed().as_secs_f64();
    let s1 = core.store().stats();
    let stored_value = (8 + 40 + 9 + templates[0].1.encode().len()) as f64;
    let mut amp = Amp::from_deltas(s0, s1, messages, stored_value);
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
    amp.label = format!(
        "{body} B body, life: stored, {} served and deleted, compacted",
        if late {
            "flushed, then"
        } else {
            "within 1,024 deposits (before a flush),"
        }
    );
    amp.body = body;
    amp.envelope = envelope;
    amp.batch = AMP_MAILBOXES;
    amp.secs = secs;
    amp.flushed = true;
    eprintln!(
        "[ours] life ({}), {body} B body: {messages} msgs in {secs:.1} s; WAL {:.0} + SST/blob \
         {:.0} B/msg for a {envelope}-byte envelope ({:.2}x); live after {:.0} B/msg",
        if late {
            "served after a flush"
        } else {
            "served before a flush"
        },
        amp.wal,
        amp.sst,
        amp.total() / envelope as f64,
        amp.live_sst
    );
    amp
}

fn amp_run(root: &Path, label: &str, body: usize, messages: usize, seed: u64) -> Amp {
    let dir = root.join(format!("amp-{body}"));
    let templates = owners(seed * 1000, AMP_MAILBOXES, body);
    let envelope = templates[0].1.encode().len();
    let mut core = open_core(&dir, seed);
    let s0 = core.store().stats();
    let t = Instant::now();
    // Mailbox creation is a handful of small writes: counted, negligible.
    fill(&mut core, &templates, messages, AMP_MAILBOXES, seed);
    let secs = t.elapsed().as_secs_f64();
    core.store().flush().expect("flush");
    settle(core.store());
    let s1 = core.store().stats();
    let mut amp = Amp::from_stats(s0, s1, &core, messages);
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
    amp.label = label.to_owned();
    amp.body = body;
    amp.envelope = envelope;
    amp.batch = AMP_MAILBOXES;
    amp.secs = secs;
    amp.flushed = true;
    eprintln!(
        "[ours] write amplification, {label}: {messages} msgs in {secs:.1} s; WAL {:.0} + SST {:.0} \
         B/msg for a {envelope}-byte envelope",
        amp.wal, amp.sst
    );
    amp
}

/// The child process of the restart measurement: opens the store and the core, prints one
/// JSON line.
fn restart_child(dir: &Path) {
    let t = Instant::now();
    let store = RocksStore::open(dir, RocksOptions::default()).expect("open RocksStore");
    let t_store = t.elapsed();
    let core = MailboxCore::open(
        bench_limits(),
        store,
        MasterKey::from_bytes(&MASTER),
        StdRng::seed_from_u64(99),
        now(),
    )
    .expect("open core");
    let mut core = core;
    let t_core = t.elapsed();
    // The first read: the first filled mailbox (seed 900 000, see `run_ours_restart`),
    // loaded at this access, its oldest message served (body read and decrypted).
    let owner = Owner::from_seed(900_000);
    let device = owner.device(0).verifying_key().to_bytes();
    core.load_mailbox(&owner.mailbox_id).expect("load mailbox");
    let served = core
        .fetch(now(), &owner.mailbox_id, &device, None, 1)
        .expect("first read");
    assert_eq!(served.len(), 1, "first read served nothing");
    let t_read = t.elapsed();
    // Then every other mailbox, as the node's background load does: the work the start-up
    // did before mailboxes were loaded at their first access.
    while core.load_some(64).expect("load mailboxes") > 0 {}
    let t_all = t.elapsed();
    let stats = core.stats();
    println!(
        "{}",
        json!({
            "store_open_ms": ms(t_store),
            "core_open_ms": ms(t_core - t_store),
            "first_read_ms": ms(t_read - t_core),
            "load_all_ms": ms(t_all - t_read),
            "total_ms": ms(t_read),
            "messages": stats.messages,
            "mailboxes": stats.mailboxes,
            "vm_hwm_kb": status_kb("self", "VmHWM:"),
            "vm_rss_kb": status_kb("self", "VmRSS:"),
        })
    );
}

/// One restart of ours, in a child process.
struct Restart {
    /// Until the first read is served: store open + core open + first read.
    ms: f64,
    store_ms: f64,
    core_ms: f64,
    first_read_ms: f64,
    /// Loading every other mailbox afterwards (the node does it in the background).
    load_all_ms: f64,
    process_ms: f64,
    hwm_mb: f64,
    rss_mb: f64,
    disk_mb: f64,
    wal_mb: f64,
}

fn ours_restart(dir: &Path, expect: usize) -> Restart {
    let (disk, wal) = (dir_size(dir), wal_size(dir));
    let exe = std::env::current_exe().expect("current exe");
    let t = Instant::now();
    let out = Command::new(exe)
        .arg("--restart-child")
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("spawn restart child");
    let process_ms = ms(t.elapsed());
    assert!(out.status.success(), "restart child failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let v: Value =
        serde_json::from_str(text.lines().last().expect("child output")).expect("child JSON");
    let f = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("child JSON lacks {k}"))
    };
    assert_eq!(f("messages") as usize, expect, "messages after restart");
    let r = Restart {
        ms: f("total_ms"),
        store_ms: f("store_open_ms"),
        core_ms: f("core_open_ms"),
        first_read_ms: f("first_read_ms"),
        load_all_ms: f("load_all_ms"),
        process_ms,
        hwm_mb: f("vm_hwm_kb") / 1024.0,
        rss_mb: f("vm_rss_kb") / 1024.0,
        disk_mb: disk as f64 / 1e6,
        wal_mb: wal as f64 / 1e6,
    };
    eprintln!(
        "[ours] restart: RocksStore::open {:.0} ms + MailboxCore::open {:.0} ms + first read \
         {:.0} ms = {:.0} ms, then loading every mailbox {:.0} ms (process {:.0} ms); peak RSS \
         {:.0} MiB; {:.0} MB on disk of which WAL {:.1} MB",
        r.store_ms,
        r.core_ms,
        r.first_read_ms,
        r.ms,
        r.load_all_ms,
        r.process_ms,
        r.hwm_mb,
        r.disk_mb,
        r.wal_mb
    );
    r
}

struct OursRestart {
    messages: usize,
    mailboxes: usize,
    fill_secs: f64,
    amp: Amp,
    /// The same fill again in another directory, then flushed and settled.
    amp_flushed: Amp,
    as_left: Restart,
    reopened: Restart,
}

fn run_ours_restart(root: &Path, args: &Args) -> OursRestart {
    let n = args.restart_messages;
    let mailboxes = n.div_ceil(FILL_PER_MAILBOX);
    let dir = root.join("restart");
    let templates = owners(900_000, mailboxes, SMALL_BODY);
    let envelope = templates[0].1.encode().len();
    eprintln!(
        "[ours] restart: filling {n} messages ({SMALL_BODY}-byte bodies, {envelope}-byte \
         envelopes) into {mailboxes} mailboxes, deposit_many batches of {}",
        args.fill_batch
    );
    let mut core = open_core(&dir, 900);
    let s0 = core.store().stats();
    let t = Instant::now();
    fill(&mut core, &templates, n, args.fill_batch, 900);
    let fill_secs = t.elapsed().as_secs_f64();
    let s1 = core.store().stats();
    let mut amp = Amp::from_stats(s0, s1, &core, n);
    amp.label = format!("restart fill, {n} msgs, {SMALL_BODY} B body");
    amp.body = SMALL_BODY;
    amp.envelope = envelope;
    amp.batch = args.fill_batch;
    amp.secs = fill_secs;
    eprintln!(
        "[ours] filled in {fill_secs:.1} s ({:.0} msgs/s); WAL {:.0} B/msg, SST so far {:.0} \
         B/msg",
        n as f64 / fill_secs,
        amp.wal,
        amp.sst
    );
    // Closed as it stands: memtables unflushed, their WAL replayed on open.
    drop(core);
    let as_left = ours_restart(&dir, n);
    let reopened = ours_restart(&dir, n);
    // WHISPR_BENCH_KEEP=1 keeps it, to profile `--restart-child DIR` on it.
    if std::env::var_os("WHISPR_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The fill's bytes once everything is on disk: the same fill again, flushed and settled.
    let dir = root.join("restart-flushed");
    let mut core = open_core(&dir, 900);
    let s0 = core.store().stats();
    let t = Instant::now();
    fill(&mut core, &templates, n, args.fill_batch, 900);
    core.store().flush().expect("flush");
    settle(core.store());
    let secs = t.elapsed().as_secs_f64();
    let s1 = core.store().stats();
    let mut amp_flushed = Amp::from_stats(s0, s1, &core, n);
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
    amp_flushed.label =
        format!("restart fill again, flushed and settled, {n} msgs, {SMALL_BODY} B body");
    amp_flushed.body = SMALL_BODY;
    amp_flushed.envelope = envelope;
    amp_flushed.batch = args.fill_batch;
    amp_flushed.secs = secs;
    amp_flushed.flushed = true;
    eprintln!(
        "[ours] fill again, flushed: WAL {:.0} + SST/blob {:.0} B/msg ({:.2}x)",
        amp_flushed.wal,
        amp_flushed.sst,
        amp_flushed.total() / envelope as f64
    );
    OursRestart {
        messages: n,
        mailboxes,
        fill_secs,
        amp,
        amp_flushed,
        as_left,
        reopened,
    }
}

// ---------------------------------------------------------------------------------------------
// Redis: the shared RESP2 client (bench/resp.rs)

#[path = "../../bench/resp.rs"]
mod resp;
use resp::{Redis, Reply};

fn aof_dir(r: &mut Redis) -> PathBuf {
    PathBuf::from(r.config_get("dir")).join(r.config_get("appenddirname"))
}

/// Checks the server is configured as the comparison needs; returns its version.
fn redis_check(addr: &str) -> String {
    let mut r =
        Redis::connect(addr, 1 << 16).unwrap_or_else(|e| panic!("connect to Redis {addr}: {e}"));
    assert_eq!(r.config_get("appendonly"), "yes", "Redis must run with AOF");
    assert_eq!(
        r.config_get("appendfsync"),
        "always",
        "appendfsync must be always"
    );
    r.info_field("server", "redis_version")
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

fn rewrite_aof(r: &mut Redis) {
    r.call(&[b"BGREWRITEAOF"]).unwrap().ok();
    wait_rewrite_done(r);
}

struct RedisRestart {
    ms: f64,
    hwm_mb: f64,
    aof_mb: f64,
    loading_replies: u32,
}

/// Shuts Redis down (`SHUTDOWN`: AOF fsynced, no RDB), then times spawning `redis-server
/// <conf>` until `LINDEX <probe> 0` returns an element (`-LOADING` while it replays).
fn redis_restart(
    mut r: Redis,
    previous: Option<Child>,
    addr: &str,
    args: &Args,
    conf: &str,
    probe: &[u8],
) -> (Redis, Child, RedisRestart) {
    let aof = dir_size(&aof_dir(&mut r));
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
    let t = Instant::now();
    let child = Command::new(&args.redis_server)
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", args.redis_server));
    let (mut conn, mut loading_replies) = (None::<Redis>, 0u32);
    let elapsed = loop {
        let Some(c) = conn.as_mut() else {
            conn = Redis::connect(addr, 1 << 16).ok();
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        };
        match c.call(&[b"LINDEX", probe, b"0"]).expect("LINDEX") {
            Reply::Error(e) if e.starts_with("LOADING") => {
                loading_replies += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Reply::Bulk(Some(_)) => break t.elapsed(),
            other => panic!("LINDEX after restart: {other:?}"),
        }
    };
    let out = RedisRestart {
        ms: ms(elapsed),
        hwm_mb: status_kb(&child.id().to_string(), "VmHWM:") as f64 / 1024.0,
        aof_mb: aof as f64 / 1e6,
        loading_replies,
    };
    eprintln!(
        "[redis] restart to first LINDEX {:.0} ms ({} -LOADING replies); {:.0} MB of AOF; peak \
         RSS {:.0} MiB",
        out.ms, out.loading_replies, out.aof_mb, out.hwm_mb
    );
    (conn.expect("connected"), child, out)
}

struct RedisRestarts {
    fill_secs: f64,
    used_memory_mb: f64,
    aof_per_msg: f64,
    as_left: RedisRestart,
    rewritten: RedisRestart,
}

fn run_redis_restart(addr: &str, conf: &str, args: &Args) -> RedisRestarts {
    let n = args.restart_messages;
    let mailboxes = n.div_ceil(FILL_PER_MAILBOX);
    let mut r = Redis::connect(addr, 1 << 16).expect("connect to Redis");
    // Drop phase 1's history from the AOF: the restart replays only the fill.
    rewrite_aof(&mut r);
    let dir = aof_dir(&mut r);
    let mem0: u64 = r.info_field("memory", "used_memory").parse().unwrap();
    let aof0 = dir_size(&dir);
    // Each element distinct and random, as ours stores each deposit under a fresh nonce: the
    // RDB preamble of a rewritten AOF compresses repeated strings.
    let len = owners(900_000, 1, SMALL_BODY)[0].1.encode().len();
    let keys: Vec<String> = (0..mailboxes).map(|m| format!("whispr:fill:{m}")).collect();
    eprintln!(
        "[redis] restart: filling {n} LPUSHes into {mailboxes} lists, {REDIS_PIPELINE} per \
         MULTI/EXEC round trip"
    );
    let t = Instant::now();
    let mut done = 0usize;
    while done < n {
        let k = REDIS_PIPELINE.min(n - done);
        r.args(&[b"MULTI"]);
        for j in done..done + k {
            let element = random_bytes(j as u64, len);
            r.args(&[b"LPUSH", keys[j % mailboxes].as_bytes(), &element]);
        }
        r.args(&[b"EXEC"]);
        let mut replies = r.exec().expect("fill round trip");
        for result in replies.pop().expect("EXEC reply").array() {
            result.ok();
        }
        for reply in replies {
            reply.ok();
        }
        done += k;
    }
    let fill_secs = t.elapsed().as_secs_f64();
    let mem1: u64 = r.info_field("memory", "used_memory").parse().unwrap();
    let aof1 = dir_size(&dir);
    eprintln!(
        "[redis] filled in {fill_secs:.1} s; used_memory +{:.0} MB, AOF +{:.0} MB",
        mem1.saturating_sub(mem0) as f64 / 1e6,
        aof1.saturating_sub(aof0) as f64 / 1e6
    );
    let probe = keys[0].as_bytes();
    let (r, child, as_left) = redis_restart(r, None, addr, args, conf, probe);
    let mut r = r;
    rewrite_aof(&mut r);
    let (mut r, child, rewritten) = redis_restart(r, Some(child), addr, args, conf, probe);
    // Stop the server this bench started (the script stops the one it started).
    r.args(&[b"SHUTDOWN", b"NOSAVE"]);
    let _closed = r.exec();
    let mut child = child;
    child.wait().expect("wait for redis-server");
    RedisRestarts {
        fill_secs,
        used_memory_mb: mem1.saturating_sub(mem0) as f64 / 1e6,
        aof_per_msg: aof1.saturating_sub(aof0) as f64 / n as f64,
        as_left,
        rewritten,
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b != 0.0 => format!("{:.2}", a / b),
        _ => "—".to_owned(),
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

struct Report<'a> {
    args: &'a Args,
    version: Option<&'a str>,
    fsync: (f64, f64),
    cells: &'a [Cell],
    amps: &'a [Amp],
    restart: Option<&'a OursRestart>,
    redis_restart: Option<&'a RedisRestarts>,
}

impl Report<'_> {
    fn markdown(&self) {
        let redis = self
            .version
            .map_or_else(|| "Redis (not run)".to_owned(), |v| format!("Redis {v}"));
        println!();
        println!(
            "## Durable deposits: ours (`MailboxNode::deposit`, group commit, RocksDB WAL fsync) \
             vs {redis} (`LPUSH`, `appendfsync always`)"
        );
        println!();
        println!(
            "{} rounds of {:.1} s warm-up + {:.1} s measured per cell, ours and Redis alternating; \
             rates, p50 and p99 over the rounds pooled. Back-to-back 4 KiB append + fdatasync \
             here: p50 {:.2} ms, p99 {:.2} ms. Ratios are ours / Redis.",
            self.args.rounds,
            self.args.warmup.as_secs_f64(),
            self.args.secs.as_secs_f64(),
            self.fsync.0,
            self.fsync.1
        );
        println!();
        println!(
            "| body (B) | envelope (B) | depositors | ours deposits/s | Redis LPUSH/s | ours/Redis \
             | ours p50 (ms) | Redis p50 (ms) | ours/Redis | ours p99 (ms) | Redis p99 (ms) | \
             ours/Redis | deposits per commit | ours per round (/s) | Redis per round (/s) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in self.cells {
            let (o, r) = (&c.ours, c.redis.as_ref());
            println!(
                "| {} | {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {:.2} | {} | {} | {:.1} | {} | \
                 {} |",
                c.body,
                c.envelope,
                c.concurrency,
                o.rate,
                opt(r.map(|r| r.rate), 0),
                ratio(o.rate, r.map(|r| r.rate)),
                o.p50,
                opt(r.map(|r| r.p50), 2),
                ratio(o.p50, r.map(|r| r.p50)),
                o.p99,
                opt(r.map(|r| r.p99), 2),
                ratio(o.p99, r.map(|r| r.p99)),
                o.per_unit,
                o.spread(),
                r.map_or_else(|| "—".to_owned(), Side::spread)
            );
        }
        println!();
        println!("### Bytes written per message");
        println!();
        println!(
            "| run | envelope (B) | messages | batch | stored value (B) | WAL (B/msg) | SST + blob \
             written (B/msg) | total written (B/msg) | write amp. (total / envelope) | live SST + \
             blob (B/msg) | Redis AOF (B/msg) | Redis amp. | ours/Redis |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for a in self.amps {
            let star = if a.flushed { "" } else { " *" };
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0}{star} | {:.0}{star} | {:.2}{star} | \
                 {:.0} | {} | {} | {} |",
                a.label,
                a.envelope,
                a.messages,
                a.batch,
                a.stored_value,
                a.wal,
                a.sst,
                a.total(),
                a.total() / a.envelope as f64,
                a.live_sst,
                opt(a.redis_aof, 0),
                opt(a.redis_aof.map(|x| x / a.envelope as f64), 2),
                ratio(a.total(), a.redis_aof)
            );
        }
        if self.amps.iter().any(|a| !a.flushed) {
            println!();
            println!(
                "\\* not flushed: SST bytes written so far (memtables, at most 3 × 8 MiB, not yet \
                 in SST files); the WAL column is exact."
            );
        }
        if let Some(o) = self.restart {
            let r = self.redis_restart;
            println!();
            println!(
                "### Restart with {} stored messages ({} mailboxes, {SMALL_BODY}-byte bodies)",
                o.messages, o.mailboxes
            );
            println!();
            println!("| metric | ours | Redis | ours/Redis |");
            println!("|---|---:|---:|---:|");
            type Row<'b> = (&'b str, f64, Option<f64>, usize);
            let rows: [Row<'_>; 7] = [
                (
                    "restart as left, until reads are served (ms)",
                    o.as_left.ms,
                    r.map(|r| r.as_left.ms),
                    0,
                ),
                (
                    "restart again, after flush / AOF rewrite (ms)",
                    o.reopened.ms,
                    r.map(|r| r.rewritten.ms),
                    0,
                ),
                (
                    "peak RSS of the restarted process (MiB)",
                    o.as_left.hwm_mb,
                    r.map(|r| r.as_left.hwm_mb),
                    0,
                ),
                (
                    "peak RSS, second restart (MiB)",
                    o.reopened.hwm_mb,
                    r.map(|r| r.rewritten.hwm_mb),
                    0,
                ),
                (
                    "on disk at restart (MB)",
                    o.as_left.disk_mb,
                    r.map(|r| r.as_left.aof_mb),
                    0,
                ),
                (
                    "on disk at second restart (MB)",
                    o.reopened.disk_mb,
                    r.map(|r| r.rewritten.aof_mb),
                    0,
                ),
                (
                    "fill rate (messages/s)",
                    o.messages as f64 / o.fill_secs,
                    r.map(|r| o.messages as f64 / r.fill_secs),
                    0,
                ),
            ];
            for (name, ours, redis, d) in rows {
                println!(
                    "| {name} | {ours:.d$} | {} | {} |",
                    opt(redis, d),
                    ratio(ours, redis)
                );
            }
            println!();
            for (which, x) in [("as left", &o.as_left), ("again", &o.reopened)] {
                println!(
                    "- ours, {which}: `RocksStore::open` {:.0} ms (WAL to replay: {:.1} MB) + \
                     `MailboxCore::open` {:.0} ms + first read (its mailbox loaded, one \
                     message served) {:.0} ms, measured inside a fresh child process; then \
                     loading the other mailboxes (the node does it in the background) {:.0} \
                     ms (whole process, exec to exit: {:.0} ms); RSS at the end {:.0} MiB.",
                    x.store_ms,
                    x.wal_mb,
                    x.core_ms,
                    x.first_read_ms,
                    x.load_all_ms,
                    x.process_ms,
                    x.rss_mb
                );
            }
            println!(
                "- ours fill: `MailboxCore::deposit_many`, batches of {}, one synced write each.",
                self.args.fill_batch
            );
            if let Some(r) = r {
                println!(
                    "- Redis: spawn `redis-server` until the first `LINDEX` returns an element \
                     ({} and {} `-LOADING` replies); fill by `MULTI`, {REDIS_PIPELINE} `LPUSH`, \
                     `EXEC` per round trip (one AOF fsync each); `used_memory` +{:.0} MB after the fill.",
                    r.as_left.loading_replies, r.rewritten.loading_replies, r.used_memory_mb
                );
            }
        }
    }

    fn json(&self) {
        let side = |s: &Side| {
            json!({"rate": s.rate, "p50_ms": s.p50, "p99_ms": s.p99, "mean_ms": s.mean,
                   "counted": s.counted, "round_rates": s.round_rates})
        };
        let cells: Vec<Value> = self
            .cells
            .iter()
            .map(|c| {
                json!({
                    "body": c.body, "envelope": c.envelope, "concurrency": c.concurrency,
                    "ours": side(&c.ours),
                    "ours_deposits_per_commit": c.ours.per_unit,
                    "redis": c.redis.as_ref().map(side),
                    "redis_aof_bytes_per_lpush": c.redis.as_ref().map(|r| r.per_unit),
                    "ratio_rate": c.redis.as_ref().map(|r| c.ours.rate / r.rate),
                    "ratio_p50": c.redis.as_ref().map(|r| c.ours.p50 / r.p50),
                    "ratio_p99": c.redis.as_ref().map(|r| c.ours.p99 / r.p99),
                })
            })
            .collect();
        let amps: Vec<Value> = self
            .amps
            .iter()
            .map(|a| {
                json!({
                    "run": a.label, "body": a.body, "envelope": a.envelope,
                    "messages": a.messages, "batch": a.batch, "secs": a.secs,
                    "stored_value": a.stored_value, "wal_per_msg": a.wal,
                    "sst_written_per_msg": a.sst, "total_per_msg": a.total(),
                    "write_amp": a.total() / a.envelope as f64, "live_sst_per_msg": a.live_sst,
                    "flushed": a.flushed, "redis_aof_per_msg": a.redis_aof,
                })
            })
            .collect();
        let restart = |x: &Restart| {
            json!({"ms": x.ms, "store_open_ms": x.store_ms, "core_open_ms": x.core_ms,
                   "first_read_ms": x.first_read_ms, "load_all_ms": x.load_all_ms,
                   "process_ms": x.process_ms, "peak_rss_mib": x.hwm_mb, "rss_mib": x.rss_mb,
                   "disk_mb": x.disk_mb, "wal_mb": x.wal_mb})
        };
        let redis_restart = |x: &RedisRestart| {
            json!({"ms": x.ms, "peak_rss_mib": x.hwm_mb, "aof_mb": x.aof_mb,
                   "loading_replies": x.loading_replies})
        };
        let out = json!({
            "bench": "mailbox-deposits",
            "redis_version": self.version,
            "quick": self.args.quick,
            "warmup_secs": self.args.warmup.as_secs_f64(),
            "rounds": self.args.rounds,
            "secs": self.args.secs.as_secs_f64(),
            "fsync_p50_ms": self.fsync.0,
            "fsync_p99_ms": self.fsync.1,
            "cells": cells,
            "bytes_written": amps,
            "restart": self.restart.map(|o| json!({
                "messages": o.messages, "mailboxes": o.mailboxes, "fill_secs": o.fill_secs,
                "as_left": restart(&o.as_left), "again": restart(&o.reopened),
            })),
            "redis_restart": self.redis_restart.map(|r| json!({
                "fill_secs": r.fill_secs, "used_memory_mb": r.used_memory_mb,
                "aof_per_msg": r.aof_per_msg,
                "as_left": redis_restart(&r.as_left), "rewritten": redis_restart(&r.rewritten),
            })),
        });
        println!();
        println!("{out}");
    }
}

fn main() {
    let args = parse_args();
    if let Some(dir) = &args.restart_child {
        restart_child(dir);
        return;
    }
    let root_tmp;
    let root = match std::env::var_os("WHISPR_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            root_tmp = tempfile::tempdir().expect("temp dir");
            root_tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).expect("bench dir");
    let version = args.redis.as_deref().map(redis_check);
    if args.redis.is_none() {
        eprintln!(
            "no Redis (--redis-port): ours only; use mailbox/bench/run.sh for the comparison"
        );
    }
    let (fsync_p50, fsync_p99) = fsync_probe(&root, if args.quick { 50 } else { 300 });
    let large = largest_body(LARGE_BODY);
    eprintln!(
        "deposits: concurrency {:?}, bodies {SMALL_BODY} and {large} B (largest that fits in one \
         packet), {:.1} s warm-up + {:.1} s per cell; fdatasync p50 {fsync_p50:.2} ms, p99 \
         {fsync_p99:.2} ms; ours with commit.pipeline {}; RocksDB in {}",
        args.concurrency,
        args.warmup.as_secs_f64(),
        args.secs.as_secs_f64(),
        if args.pipeline { "on" } else { "off" },
        root.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    // Phase 1: rounds of every cell, ours and Redis alternating, each run on a fresh node.
    let sizes = [SMALL_BODY, large];
    let shape: Vec<(usize, usize)> = sizes
        .iter()
        .flat_map(|&body| args.concurrency.iter().map(move |&c| (body, c)))
        .collect();
    let mut runs: Vec<(Vec<Run>, Vec<Run>)> = shape.iter().map(|_| Default::default()).collect();
    for round in 0..args.rounds {
        for (k, &(body, concurrency)) in shape.iter().enumerate() {
            let idx = round * 1000 + k + 1;
            let ours = ours_cell(
                &rt,
                root.join(format!("node-{idx}")),
                idx as u64,
                concurrency,
                body,
                &args,
            );
            let rate = |r: &Run| r.lat.len() as f64 / args.secs.as_secs_f64();
            let redis = args.redis.as_deref().map(|addr| {
                let bytes = owners(1, 1, body)[0].1.encode();
                redis_cell(addr, idx, concurrency, &bytes, &args)
            });
            eprintln!(
                "round {}/{}, body {body:>4} B, {concurrency:>2} depositors: ours {:>6.0}/s ({:.1} \
                 per commit), Redis {}/s",
                round + 1,
                args.rounds,
                rate(&ours),
                ours.items as f64 / ours.units.max(1) as f64,
                opt(redis.as_ref().map(rate), 0)
            );
            runs[k].0.push(ours);
            if let Some(r) = redis {
                runs[k].1.push(r);
            }
        }
    }
    let cells: Vec<Cell> = shape
        .iter()
        .zip(runs)
        .map(|(&(body, concurrency), (ours, redis))| Cell {
            body,
            envelope: owners(1, 1, body)[0].1.encode().len(),
            concurrency,
            ours: Side::pool(ours, args.secs, true),
            redis: (!redis.is_empty()).then(|| Side::pool(redis, args.secs, false)),
        })
        .collect();

    // Phase 2.
    let amp_counts = [
        args.amp_messages,
        (args.amp_messages * 2 / 5).max(AMP_MAILBOXES),
    ];
    let mut amps: Vec<Amp> = [SMALL_BODY, large]
        .into_iter()
        .zip(amp_counts)
        .enumerate()
        .map(|(i, (body, m))| {
            let mut amp = amp_run(&root, &format!("{body} B body"), body, m, 500 + i as u64);
            let redis: Vec<&Side> = cells
                .iter()
                .filter(|c| c.body == body)
                .filter_map(|c| c.redis.as_ref())
                .collect();
            if !redis.is_empty() {
                let total: u64 = redis.iter().map(|s| s.items).sum();
                let bytes: f64 = redis.iter().map(|s| s.per_unit * s.items as f64).sum();
                amp.redis_aof = Some(bytes / total.max(1) as f64);
            }
            amp
        })
        .collect();
    // Phase 2b: a message's whole life (store, serve, delete), served after a flush and
    // before one. Redis's column stays empty: its AOF would also log the deletes.
    for (i, (body, m)) in [SMALL_BODY, large].into_iter().zip(amp_counts).enumerate() {
        for late in [true, false] {
            amps.push(life_run(&root, body, m, 700 + i as u64, late));
        }
    }

    // Phase 3.
    let restart = (!args.skip_restart).then(|| run_ours_restart(&root, &args));
    let redis_restart = match (&args.redis, &args.redis_conf, args.skip_restart) {
        (Some(addr), Some(conf), false) => Some(run_redis_restart(addr, conf, &args)),
        (Some(_), None, false) => {
            eprintln!("[redis] no --redis-conf: Redis restart not measured");
            None
        }
        _ => None,
    };
    if let Some(r) = &restart {
        for a in [&r.amp, &r.amp_flushed] {
            let mut amp = a.clone();
            amp.redis_aof = redis_restart.as_ref().map(|rr| rr.aof_per_msg);
            amps.push(amp);
        }
    }

    let report = Report {
        args: &args,
        version: version.as_deref(),
        fsync: (fsync_p50, fsync_p99),
        cells: &cells,
        amps: &amps,
        restart: restart.as_ref(),
        redis_restart: redis_restart.as_ref(),
    };
    report.markdown();
    report.json();
}
