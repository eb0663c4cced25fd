//! Relay / mesh benchmark: what one relay hop costs and what a 3-hop chain carries, measured in
//! one run on one machine so that the ratios between the parts mean something.
//!
//! Not a criterion bench (`harness = false`): it prints markdown tables.
//!
//! ```sh
//! /work/c.sh bench -p whispr-relay --bench mesh
//! # one part only, or other sizes:
//! /work/c.sh bench -p whispr-relay --bench mesh -- --only hop,noise
//! /work/c.sh bench -p whispr-relay --bench mesh -- --windows 1:500,256:20000
//! ```
//!
//! Parts, in the order they run:
//!
//! 1. **Per-hop CPU at a mix hop** (`hop`), single thread, no I/O: `R` rounds of `P` packets.
//!    The packets are built beforehand for edge → mix → destination (zero delays) and their
//!    edge layer is peeled beforehand too, so each one is what the mix receives. In every
//!    round, in rotating order, the same `P` packets go through
//!    * `Router::handle_input` of a mix router (source a peer, rate limits unlimited), its
//!      outputs drained, each `Output::PersistTags` answered at once with
//!      `Input::TagsDurable` (so no durability wait and no I/O is in the figure);
//!    * the same with one `TagsDurable` per round (the `P` tags acknowledged together, as a
//!      group commit does when the fsync takes a while): the packets wait in the router until
//!      then;
//!    * `whispr_protocol::sphinx::process_packet` alone;
//!    * raw `sphinx_packet::SphinxPacket::from_bytes(..).process(&key)`;
//!    * `P` X25519 scalar multiplications (`StaticSecret::diffie_hellman`), the unit of
//!      `docs/benchmarks.md`.
//!
//!    Each router variant is its own `Router` (so replay filters never refuse). The table
//!    gives medians over rounds of µs per packet, and medians of the per-round ratios.
//! 2. **Noise XX handshakes** (`noise`): `Noise_XX_25519_ChaChaPoly_SHA256` with `snow`, the
//!    way libp2p-noise sets it up (ring for SHA-256 and ChaCha20-Poly1305, x25519-dalek's
//!    `x25519` for every Curve25519 operation, static keys given to the builder on each
//!    handshake, a 104-byte payload in messages 2 and 3 like libp2p's identity payload, but
//!    no signature check), both sides in memory on one thread, against bursts of X25519 DH in
//!    the same rounds. The Curve25519 operations per handshake are counted, not assumed.
//! 3. **libp2p connection establishment** (`conns`) over loopback TCP, both ends in this
//!    process (the 2-worker runtime): TCP + multistream-select + Noise XX (with the identity
//!    signature checks) + Yamux, `dummy` behaviour, `K` dials in flight.
//! 4. **Replay-store durability floor** (`fsync`): synced `RocksReplayStore::persist` of 8
//!    tags, back to back, and the writing thread's CPU per write; alternately, the same
//!    writes into a plain RocksDB with the store's options whose log is not reused (each
//!    write grows the file, as the store's did before it recycled its logs).
//! 5. **3-hop loopback chain** (`mesh`): three in-process meshes (edge, mix layer 1,
//!    destination with a recording `LocalDestination`) on 127.0.0.1 (TCP + Noise + Yamux),
//!    `RateLimit::unlimited()` for peers and clients, RocksDB replay stores in a temporary
//!    directory (`WHISPR_BENCH_DIR` to choose where). Packets (zero delays, the sequence
//!    number in the plaintext) are built before the clock starts. For each window `W`, `N`
//!    packets are submitted through `MeshHandle::submit_client` on the edge, at most `W`
//!    submitted and not yet delivered at any time; latency is submit → `deliver` at the
//!    destination. Delivered must equal sent (zero drop); the nodes' drop and send-failure
//!    counters are checked too. CPU time per delivered packet comes from
//!    `/proc/self/task/*/schedstat`, grouped by thread name (the bench's own submitting tasks
//!    run on the same Tokio workers and are included), and the machine's busy time from
//!    `/proc/stat` (other processes compete for the same cores: compare "cores busy" of this
//!    process and of the machine). The replay stores' synced writes and the tags they carried
//!    are counted in the nodes' RocksDB write-ahead logs (one WAL record per write batch).
//!
//! 6. **One relay alone** (`relay`): a relay `Mesh` in this process (mix, pinned to a
//!    stand-in authority served here, whose consensus lists the relay and a sink node `G`,
//!    peer rate unlimited, replay store in `WHISPR_BENCH_DIR`), once per `--relay-workers`
//!    value (`mesh.peel_workers`; 0 = one per core). This binary re-executes itself as the
//!    load generator (environment `WHISPR_RELAY_BENCH_GENERATOR`): one Tokio thread, a bare
//!    libp2p swarm with `G`'s identity that writes `N` packets built beforehand (relay → G,
//!    zero delay) flat out on one `/whispr/packets/1` stream and counts the frames the relay
//!    forwards back to G, without peeling them. The forwarded rate (middle 80 % of arrivals)
//!    is compared to 0.75 × cores ÷ the raw `sphinx-packet` peel time measured in the same
//!    run (one thread, before and after the load); the relay's CPU (this process), its peel
//!    threads', the generator's and the machine's are reported; zero drop is checked against
//!    the relay's drop and send-failure counters and the frames received.
//!
//! Options: `--only hop,noise,conns,fsync,mesh,relay`, `--windows W:N,...` (default
//! `1:1000,16:5000,128:20000,1024:40000`), `--paced R:N,...` (default `1000:5000`: after the
//! windows, `N` packets submitted at `R` per second, whatever is in flight), `--warmup N` (default 1000), `--hop-rounds R`
//! (default 20), `--hop-packets P` (default 256), `--noise-rounds R` (default 30), `--conns M`
//! (default 2000), `--conns-parallel K` (default 16), `--relay-packets N` (default 60000),
//! `--relay-workers W,...` (default `1,0`), `--peel-inline on|off` (the chain's
//! `mesh.peel_inline`, default off), `--chain-peel-workers N` (the chain's
//! `mesh.peel_workers`, default 0: one per core).
//!
//! The chain part also prints, per window, where a packet's time goes: the nodes report when
//! packets pass each stage of their path (`whispr_relay::mesh::StageProbe`, installed by this
//! bench only: read from a peer, taken by the core, back from the peel, released after the
//! synced tag write, written to the next hop's stream); each stage's marks are sorted and
//! paired by rank with the next stage's (every stage is first in, first out on its node).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures::StreamExt as _;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{SwarmEvent, dummy};
use rand::RngExt as _;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{
    HopAction, REPLAY_TAG_SIZE, ReplayTag, RouteHop, SphinxPublicKey, SphinxSecretKey,
    build_packet, process_packet,
};
use whispr_protocol::{DestinationAddress, KeyEpoch, NodeId, UnixTime};
use whispr_relay::config::{MeshConfig, RelayRole};
use whispr_relay::mesh::{
    LocalDestination, Mesh, MeshError, MeshHandle, MeshOptions, Stage, StageProbe,
    install_stage_probe,
};
use whispr_relay::router::{Delivery, Input, Output, RateLimit, Router, RouterConfig, Source};
use whispr_relay::storage::{ReplayStore, RocksOptions, RocksReplayStore};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};

// ---------------------------------------------------------------------------------------------
// Arguments and small helpers

/// `mesh.peel_inline` of the chain's nodes (`--peel-inline on|off`, default off as in the
/// relay's configuration).
static PEEL_INLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `mesh.peel_workers` of the chain's nodes (`--chain-peel-workers N`, default 0: one per
/// core, as in the relay's configuration).
static CHAIN_PEEL_WORKERS: AtomicUsize = AtomicUsize::new(0);

struct Args {
    parts: Vec<String>,
    windows: Vec<(usize, usize)>,
    paced: Vec<(usize, usize)>,
    warmup: usize,
    hop_rounds: usize,
    hop_packets: usize,
    noise_rounds: usize,
    conns: usize,
    conns_parallel: usize,
    relay_packets: usize,
    relay_workers: Vec<usize>,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        parts: ["hop", "noise", "conns", "fsync", "mesh", "relay"]
            .map(String::from)
            .to_vec(),
        windows: vec![(1, 1000), (16, 5000), (128, 20_000), (1024, 40_000)],
        paced: vec![(1000, 5000)],
        warmup: 1000,
        hop_rounds: 20,
        hop_packets: 256,
        noise_rounds: 30,
        conns: 2000,
        conns_parallel: 16,
        relay_packets: 60_000,
        relay_workers: vec![1, 0],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> String {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
                .replace('_', "")
        };
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--only" => {
                args.parts = value("--only").split(',').map(String::from).collect();
            }
            "--windows" => {
                args.windows = value("--windows")
                    .split(',')
                    .map(|wn| {
                        let (w, n) = wn.split_once(':').expect("--windows W:N,...");
                        (w.parse().expect("W"), n.parse().expect("N"))
                    })
                    .collect();
            }
            "--paced" => {
                args.paced = value("--paced")
                    .split(',')
                    .filter(|rn| !rn.is_empty())
                    .map(|rn| {
                        let (r, n) = rn.split_once(':').expect("--paced R:N,...");
                        (r.parse().expect("R"), n.parse().expect("N"))
                    })
                    .collect();
            }
            "--warmup" => args.warmup = value("--warmup").parse().expect("--warmup N"),
            "--hop-rounds" => args.hop_rounds = value("--hop-rounds").parse().expect("R"),
            "--hop-packets" => args.hop_packets = value("--hop-packets").parse().expect("P"),
            "--noise-rounds" => args.noise_rounds = value("--noise-rounds").parse().expect("R"),
            "--conns" => args.conns = value("--conns").parse().expect("M"),
            "--conns-parallel" => {
                args.conns_parallel = value("--conns-parallel").parse().expect("K")
            }
            "--peel-inline" => {
                let on = match value("--peel-inline").as_str() {
                    "on" => true,
                    "off" => false,
                    other => panic!("--peel-inline on|off, not {other:?}"),
                };
                PEEL_INLINE.store(on, Ordering::Relaxed);
            }
            "--chain-peel-workers" => CHAIN_PEEL_WORKERS.store(
                value("--chain-peel-workers").parse().expect("N"),
                Ordering::Relaxed,
            ),
            "--relay-packets" => args.relay_packets = value("--relay-packets").parse().expect("N"),
            "--relay-workers" => {
                args.relay_workers = value("--relay-workers")
                    .split(',')
                    .map(|w| w.parse().expect("--relay-workers W,..."))
                    .collect();
            }
            other => {
                panic!("unknown argument {other:?} (see the doc comment of relay/benches/mesh.rs)")
            }
        }
    }
    assert!(args.windows.iter().all(|(w, n)| *w > 0 && *n > 0));
    assert!(args.hop_rounds > 0 && args.hop_packets > 0 && args.noise_rounds > 0);
    args
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Nearest-rank percentile of unsorted values.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn quartiles(values: &[f64]) -> String {
    format!(
        "{:.2} [{:.2}–{:.2}]",
        median(values),
        percentile(values, 25.0),
        percentile(values, 75.0)
    )
}

/// CPU time (ns) per thread group, from `/proc/self/task/*/schedstat` (threads alive now).
fn thread_cpu() -> BTreeMap<&'static str, u64> {
    let mut groups = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return groups;
    };
    for task in tasks.filter_map(Result::ok) {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        let group = match comm.trim() {
            // Workers and the blocking pool share the name.
            c if c.starts_with("tokio") => "tokio threads",
            c if c.starts_with("whispr-replay") => "replay-store threads",
            c if c.starts_with("whispr-peel") => "peel threads",
            c if c.starts_with("rocksdb") => "rocksdb background",
            _ => "other threads",
        };
        *groups.entry(group).or_insert(0) += ns;
    }
    groups
}

/// CPU time (ns) of the whole process, dead threads included (`/proc/self/stat`, ticks).
fn process_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 10_000_000 // USER_HZ = 100 on Linux
}

/// Busy time (ns) of the whole machine, all processes (`/proc/stat`, ticks).
fn machine_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    busy * 10_000_000
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct CpuSnapshot {
    threads: BTreeMap<&'static str, u64>,
    process: u64,
    machine: u64,
    at: Instant,
}

impl CpuSnapshot {
    fn now() -> CpuSnapshot {
        CpuSnapshot {
            threads: thread_cpu(),
            process: process_cpu_ns(),
            machine: machine_busy_ns(),
            at: Instant::now(),
        }
    }

    /// Per group, µs of CPU per `units` since `self`.
    fn per_unit_since(&self, units: usize) -> (f64, BTreeMap<&'static str, f64>) {
        self.since(units).0
    }

    /// [`Self::per_unit_since`], and the cores kept busy by this process and by the whole
    /// machine (CPU time / wall time).
    #[allow(clippy::type_complexity)]
    fn since(&self, units: usize) -> ((f64, BTreeMap<&'static str, f64>), (f64, f64)) {
        let now = CpuSnapshot::now();
        let wall = now.at.duration_since(self.at).as_nanos().max(1) as f64;
        let busy = (
            now.process.saturating_sub(self.process) as f64 / wall,
            now.machine.saturating_sub(self.machine) as f64 / wall,
        );
        let per = |ns: u64| ns as f64 / 1000.0 / units.max(1) as f64;
        let groups = now
            .threads
            .iter()
            .map(|(g, ns)| {
                let before = self.threads.get(g).copied().unwrap_or(0);
                (*g, per(ns.saturating_sub(before)))
            })
            .collect();
        (
            (per(now.process.saturating_sub(self.process)), groups),
            busy,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// In-memory nodes (as in relay/tests/router.rs)

const EPOCH_MS: u64 = 3_600_000;
const T0: UnixTime = UnixTime(1_000 * EPOCH_MS + 5_000);

struct MemNode {
    identity: SigningKey,
    sphinx: Vec<(KeyEpoch, SphinxSecretKey)>,
    role: Role,
    layer: u32,
}

impl MemNode {
    fn new(seed: u8, role: Role, layer: u32) -> MemNode {
        let sphinx = (999..=1000u64)
            .map(|e| {
                let mut k = [seed; 32];
                k[1] = e as u8;
                (KeyEpoch(e), SphinxSecretKey::from(k))
            })
            .collect();
        MemNode {
            identity: SigningKey::from_bytes(&[seed; 32]),
            sphinx,
            role,
            layer,
        }
    }

    fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    fn key(&self, epoch: KeyEpoch) -> &SphinxSecretKey {
        &self.sphinx.iter().find(|(e, _)| *e == epoch).unwrap().1
    }

    fn hop(&self, epoch: KeyEpoch) -> RouteHop {
        RouteHop {
            node: self.id(),
            sphinx_key: SphinxPublicKey::from(self.key(epoch)),
        }
    }

    fn descriptor(&self) -> SignedDescriptor {
        NodeDescriptor {
            node_id: self.id(),
            peer_id: self.id().libp2p_peer_id_bytes(),
            roles: [self.role].into_iter().collect(),
            mix_layer: self.layer,
            addresses: vec![],
            api_url: None,
            sphinx_keys: self
                .sphinx
                .iter()
                .map(|(e, k)| (*e, SphinxPublicKey::from(k)))
                .collect(),
            published_at: UnixTime(T0.0 - 1000),
            expires_at: UnixTime(T0.0 + 3_600_000),
        }
        .sign(&self.identity)
        .unwrap()
    }
}

/// Builds `count` packets for `route` with zero delays, on all cores; packet `i` carries the
/// sequence number `first + i` in its first 8 plaintext bytes.
fn build_packets(route: &[RouteHop], first: u64, count: usize) -> Vec<Vec<u8>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = count.div_ceil(threads).max(1);
    let delays = vec![Duration::ZERO; route.len() - 1];
    let destination = DestinationAddress([7u8; 32]);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let delays = &delays;
                s.spawn(move || {
                    let mut rng = rand::rng();
                    (start..(start + chunk).min(count))
                        .map(|i| {
                            let mut plaintext = [0u8; 64];
                            plaintext[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
                            build_packet(&mut rng, route, delays, destination, &plaintext)
                                .unwrap()
                                .into_bytes()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Part 1: per-hop CPU

struct HopResult {
    /// µs per packet, per round, by variant.
    us: BTreeMap<&'static str, Vec<f64>>,
    /// Per-round ratios.
    ratios: BTreeMap<&'static str, Vec<f64>>,
    packets: usize,
}

const V_ROUTER: &str = "Router::handle_input, tags durable at once";
const V_ROUTER_GROUP: &str = "Router::handle_input, one TagsDurable per round";
const V_PROCESS: &str = "whispr_protocol::sphinx::process_packet";
const V_RAW: &str = "sphinx_packet SphinxPacket::from_bytes + process";
const V_DH: &str = "X25519 StaticSecret::diffie_hellman";

/// Feeds one input and drains the outputs; `ack` answers `PersistTags` at once.
fn drive(router: &mut Router, input: Input, ack: bool, last_batch: &mut u64, sent: &mut usize) {
    let mut input = Some(input);
    while let Some(next) = input.take() {
        router.handle_input(T0, next).unwrap();
        while let Some(output) = router.poll_output() {
            match output {
                Output::PersistTags { batch, tags } => {
                    black_box(tags);
                    *last_batch = batch;
                    if ack {
                        input = Some(Input::TagsDurable { batch });
                    }
                }
                Output::Send { packet, .. } => {
                    black_box(packet);
                    *sent += 1;
                }
                Output::Deliver(d) => panic!("a mix hop delivered {d:?}"),
                Output::Drop { reason } => panic!("dropped: {reason}"),
            }
        }
    }
}

fn bench_hop(args: &Args) -> HopResult {
    let edge = MemNode::new(1, Role::Edge, 0);
    let mix = MemNode::new(2, Role::Mix, 1);
    let dest = MemNode::new(3, Role::Mailbox, 0);
    let epoch = KeyEpoch::containing(T0, Duration::from_millis(EPOCH_MS));
    let (directory, rejected) = Directory::build(
        T0,
        &[edge.descriptor(), mix.descriptor(), dest.descriptor()],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    let directory = Arc::new(directory);
    let route = [edge.hop(epoch), mix.hop(epoch), dest.hop(epoch)];
    let total = args.hop_rounds * args.hop_packets;
    eprintln!("hop: building {total} packets and peeling their edge layer…");
    let at_mix: Vec<Vec<u8>> = build_packets(&route, 0, total)
        .into_iter()
        .map(
            |p| match process_packet(&[edge.key(epoch)], &p).unwrap().action {
                HopAction::Forward { packet, .. } => packet.into_bytes(),
                other => panic!("edge did not forward: {other:?}"),
            },
        )
        .collect();

    let config = RouterConfig {
        peer_rate: RateLimit::unlimited(),
        epoch_len_ms: EPOCH_MS,
        ..RouterConfig::default()
    };
    let new_router = || {
        let mut r = Router::new(mix.id(), config.clone(), false);
        r.set_keys(mix.sphinx.clone());
        r.handle_input(T0, Input::Directory(directory.clone()))
            .unwrap();
        r
    };
    let mut router = new_router();
    let mut router_group = new_router();
    let from = Source::Peer(edge.id());
    let mix_key = mix.key(epoch).clone();
    let dh_secret = StaticSecret::from([9u8; 32]);
    let dh_public = XPublicKey::from(&StaticSecret::from([11u8; 32]));

    // Warm-up: a few packets through every path (not timed; fresh routers afterwards).
    {
        let mut warm = new_router();
        let (mut b, mut s) = (0, 0);
        for p in at_mix.iter().take(16) {
            drive(
                &mut warm,
                Input::Packet {
                    from,
                    bytes: p.clone(),
                },
                true,
                &mut b,
                &mut s,
            );
            black_box(process_packet(&[&mix_key], p).unwrap());
            black_box(
                sphinx_packet::SphinxPacket::from_bytes(p)
                    .unwrap()
                    .process(&mix_key)
                    .unwrap(),
            );
        }
    }

    let variants = [V_ROUTER, V_ROUTER_GROUP, V_PROCESS, V_RAW, V_DH];
    let mut us: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let n = args.hop_packets;
    for round in 0..args.hop_rounds {
        let chunk = &at_mix[round * n..(round + 1) * n];
        let mut this: BTreeMap<&'static str, f64> = BTreeMap::new();
        for k in 0..variants.len() {
            let variant = variants[(round + k) % variants.len()];
            let elapsed = match variant {
                V_ROUTER | V_ROUTER_GROUP => {
                    let group = variant == V_ROUTER_GROUP;
                    let r = if group {
                        &mut router_group
                    } else {
                        &mut router
                    };
                    let owned: Vec<Vec<u8>> = chunk.to_vec();
                    let (mut last, mut sent) = (0u64, 0usize);
                    let t = Instant::now();
                    for bytes in owned {
                        drive(
                            r,
                            Input::Packet { from, bytes },
                            !group,
                            &mut last,
                            &mut sent,
                        );
                    }
                    if group {
                        drive(
                            r,
                            Input::TagsDurable { batch: last },
                            false,
                            &mut last,
                            &mut sent,
                        );
                    }
                    let e = t.elapsed();
                    assert_eq!(sent, n, "{variant}: every packet sent on");
                    e
                }
                V_PROCESS => {
                    let t = Instant::now();
                    for p in chunk {
                        black_box(process_packet(&[&mix_key], black_box(p)).unwrap());
                    }
                    t.elapsed()
                }
                V_RAW => {
                    let t = Instant::now();
                    for p in chunk {
                        let packet = sphinx_packet::SphinxPacket::from_bytes(black_box(p)).unwrap();
                        black_box(packet.process(&mix_key).unwrap());
                    }
                    t.elapsed()
                }
                _ => {
                    let t = Instant::now();
                    for _ in 0..n {
                        black_box(black_box(&dh_secret).diffie_hellman(black_box(&dh_public)));
                    }
                    t.elapsed()
                }
            };
            this.insert(variant, elapsed.as_secs_f64() * 1e6 / n as f64);
        }
        for (v, x) in this {
            us.entry(v).or_default().push(x);
        }
    }
    let ratio =
        |a: &str, b: &str| -> Vec<f64> { us[a].iter().zip(&us[b]).map(|(x, y)| x / y).collect() };
    let mut ratios = BTreeMap::new();
    for v in [V_ROUTER, V_ROUTER_GROUP, V_PROCESS, V_RAW] {
        ratios.insert(v, ratio(v, V_RAW));
    }
    for v in variants {
        let key: &'static str = match v {
            V_ROUTER => "router/x25519",
            V_ROUTER_GROUP => "router group/x25519",
            V_PROCESS => "process/x25519",
            V_RAW => "raw/x25519",
            _ => "x25519/x25519",
        };
        ratios.insert(key, ratio(v, V_DH));
    }
    HopResult {
        us,
        ratios,
        packets: total,
    }
}

fn print_hop(args: &Args, r: &HopResult) {
    println!("\n## Per-hop CPU at a mix hop (one thread, no I/O)\n");
    println!(
        "{} rounds × {} packets ({} packets, each through every variant); medians of the per-round \
         µs/packet [first–third quartile], and medians of the per-round ratios.\n",
        args.hop_rounds, args.hop_packets, r.packets
    );
    println!("| what one packet costs | µs/packet | ratio to raw sphinx-packet | X25519 units |");
    println!("|---|---:|---:|---:|");
    let units = |v: &str| match v {
        V_ROUTER => "router/x25519",
        V_ROUTER_GROUP => "router group/x25519",
        V_PROCESS => "process/x25519",
        V_RAW => "raw/x25519",
        _ => "x25519/x25519",
    };
    for v in [V_ROUTER, V_ROUTER_GROUP, V_PROCESS, V_RAW, V_DH] {
        let to_raw = r
            .ratios
            .get(v)
            .map_or_else(|| "—".to_string(), |x| quartiles(x));
        println!(
            "| {v} | {} | {to_raw} | {:.2} |",
            quartiles(&r.us[v]),
            median(&r.ratios[units(v)])
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: Noise XX handshakes in memory

static SET_STATIC: AtomicU64 = AtomicU64::new(0);
static GENERATE: AtomicU64 = AtomicU64::new(0);
static DH: AtomicU64 = AtomicU64::new(0);

/// libp2p-noise's Curve25519 for snow: x25519-dalek's `x25519` for the public key of a set or
/// generated secret and for each DH (a Montgomery ladder every time).
#[derive(Default)]
struct NoiseKeypair {
    secret: [u8; 32],
    public: [u8; 32],
}

impl snow::types::Dh for NoiseKeypair {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        SET_STATIC.fetch_add(1, Ordering::Relaxed);
        self.secret.copy_from_slice(&privkey[..32]);
        self.public = x25519_dalek::x25519(self.secret, x25519_dalek::X25519_BASEPOINT_BYTES);
    }
    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        GENERATE.fetch_add(1, Ordering::Relaxed);
        rng.try_fill_bytes(&mut self.secret)?;
        self.public = x25519_dalek::x25519(self.secret, x25519_dalek::X25519_BASEPOINT_BYTES);
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.public
    }
    fn privkey(&self) -> &[u8] {
        &self.secret
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        DH.fetch_add(1, Ordering::Relaxed);
        let mut p = [0u8; 32];
        p.copy_from_slice(&pubkey[..32]);
        out[..32].copy_from_slice(&x25519_dalek::x25519(self.secret, p));
        Ok(())
    }
}

/// libp2p-noise's resolver on native targets: ring for hashes and ciphers.
struct NoiseResolver;

impl snow::resolvers::CryptoResolver for NoiseResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        snow::resolvers::RingResolver.resolve_rng()
    }
    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        matches!(choice, snow::params::DHChoice::Curve25519)
            .then(|| Box::new(NoiseKeypair::default()) as Box<dyn snow::types::Dh>)
    }
    fn resolve_hash(
        &self,
        choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::RingResolver.resolve_hash(choice)
    }
    fn resolve_cipher(
        &self,
        choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::RingResolver.resolve_cipher(choice)
    }
}

/// libp2p's handshake payload: protobuf identity key (36 bytes) and signature (64), framed.
const NOISE_PAYLOAD_LEN: usize = 104;

fn noise_handshake(params: &snow::params::NoiseParams, i_static: &[u8], r_static: &[u8]) {
    let payload = [0x5au8; NOISE_PAYLOAD_LEN];
    fn build<'a>(params: &snow::params::NoiseParams, key: &'a [u8]) -> snow::Builder<'a> {
        snow::Builder::with_resolver(params.clone(), Box::new(NoiseResolver))
            .local_private_key(key)
            .unwrap()
    }
    let mut initiator = build(params, i_static).build_initiator().unwrap();
    let mut responder = build(params, r_static).build_responder().unwrap();
    let mut msg = [0u8; 512];
    let mut out = [0u8; 512];
    let n = initiator.write_message(&[], &mut msg).unwrap();
    responder.read_message(&msg[..n], &mut out).unwrap();
    let n = responder.write_message(&payload, &mut msg).unwrap();
    initiator.read_message(&msg[..n], &mut out).unwrap();
    let n = initiator.write_message(&payload, &mut msg).unwrap();
    let got = responder.read_message(&msg[..n], &mut out).unwrap();
    assert_eq!(got, NOISE_PAYLOAD_LEN);
    let i = initiator.into_transport_mode().unwrap();
    let r = responder.into_transport_mode().unwrap();
    black_box((i, r));
}

struct NoiseResult {
    handshakes_per_s: Vec<f64>,
    dh_per_s: Vec<f64>,
    /// Per round: handshakes/s ÷ (DH/s ÷ 6).
    ratio_dh6: Vec<f64>,
    set_per_hs: f64,
    generate_per_hs: f64,
    dh_per_hs: f64,
}

fn bench_noise(args: &Args) -> NoiseResult {
    let params: snow::params::NoiseParams = "Noise_XX_25519_ChaChaPoly_SHA256".parse().unwrap();
    let mut rng = rand::rng();
    let i_static: [u8; 32] = rng.random();
    let r_static: [u8; 32] = rng.random();
    let dh_secret = StaticSecret::from([9u8; 32]);
    let dh_public = XPublicKey::from(&StaticSecret::from([11u8; 32]));
    for _ in 0..20 {
        noise_handshake(&params, &i_static, &r_static);
    }
    const HS: usize = 60;
    const DHS: usize = 600;
    let mut result = NoiseResult {
        handshakes_per_s: vec![],
        dh_per_s: vec![],
        ratio_dh6: vec![],
        set_per_hs: 0.0,
        generate_per_hs: 0.0,
        dh_per_hs: 0.0,
    };
    for c in [&SET_STATIC, &GENERATE, &DH] {
        c.store(0, Ordering::Relaxed);
    }
    for round in 0..args.noise_rounds {
        let mut hs = 0.0;
        let mut dh = 0.0;
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                let t = Instant::now();
                for _ in 0..HS {
                    noise_handshake(&params, &i_static, &r_static);
                }
                hs = HS as f64 / t.elapsed().as_secs_f64();
            } else {
                let t = Instant::now();
                for _ in 0..DHS {
                    black_box(black_box(&dh_secret).diffie_hellman(black_box(&dh_public)));
                }
                dh = DHS as f64 / t.elapsed().as_secs_f64();
            }
        }
        result.handshakes_per_s.push(hs);
        result.dh_per_s.push(dh);
        result.ratio_dh6.push(hs / (dh / 6.0));
    }
    let count = (args.noise_rounds * HS) as f64;
    result.set_per_hs = SET_STATIC.load(Ordering::Relaxed) as f64 / count;
    result.generate_per_hs = GENERATE.load(Ordering::Relaxed) as f64 / count;
    result.dh_per_hs = DH.load(Ordering::Relaxed) as f64 / count;
    result
}

fn print_noise(args: &Args, r: &NoiseResult) {
    let ladders = r.set_per_hs + r.generate_per_hs + r.dh_per_hs;
    let per_ladder: Vec<f64> = r
        .handshakes_per_s
        .iter()
        .zip(&r.dh_per_s)
        .map(|(h, d)| h / (d / ladders))
        .collect();
    println!("\n## Noise XX handshakes in memory (snow, one thread, both sides)\n");
    println!(
        "`Noise_XX_25519_ChaChaPoly_SHA256` set up as libp2p-noise does; {} rounds of 60 handshakes \
         alternating with 600 X25519 DH; medians [quartiles] over rounds.\n",
        args.noise_rounds
    );
    println!("| metric | value |");
    println!("|---|---:|");
    println!(
        "| handshakes/s (both sides on one core) | {} |",
        quartiles(&r.handshakes_per_s)
    );
    println!(
        "| µs per handshake | {:.1} |",
        1e6 / median(&r.handshakes_per_s)
    );
    println!("| X25519 DH/s | {} |", quartiles(&r.dh_per_s));
    println!(
        "| handshakes/s ÷ (DH/s ÷ 6) | {} |",
        quartiles(&r.ratio_dh6)
    );
    println!(
        "| Curve25519 ladders per handshake, counted | {ladders:.0} ({:.0} DH + {:.0} ephemeral keygen + {:.0} static public key) |",
        r.dh_per_hs, r.generate_per_hs, r.set_per_hs
    );
    println!(
        "| handshakes/s ÷ (DH/s ÷ {ladders:.0}) | {} |",
        quartiles(&per_ladder)
    );
}

// ---------------------------------------------------------------------------------------------
// Part 3: libp2p connection establishment over loopback TCP

fn conn_swarm() -> libp2p::Swarm<dummy::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| dummy::Behaviour)
        .unwrap()
        .build()
}

struct ConnResult {
    established: usize,
    errors: usize,
    per_s: f64,
    cpu_us: f64,
}

async fn bench_conns(total: usize, parallel: usize) -> ConnResult {
    let mut listener = conn_swarm();
    listener
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = listener.select_next_some().await {
            break address;
        }
    };
    let peer = *listener.local_peer_id();
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepted_in = accepted.clone();
    let listening = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = listener.select_next_some().await {
                accepted_in.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut dialer = conn_swarm();
    let mut run = async |count: usize| -> (usize, usize, Duration) {
        let dial = |d: &mut libp2p::Swarm<dummy::Behaviour>| {
            d.dial(
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Always)
                    .build(),
            )
            .unwrap();
        };
        let t = Instant::now();
        let mut dialed = 0;
        while dialed < parallel.min(count) {
            dial(&mut dialer);
            dialed += 1;
        }
        let (mut ok, mut errors) = (0, 0);
        while ok + errors < count {
            match dialer.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => ok += 1,
                SwarmEvent::OutgoingConnectionError { .. } => errors += 1,
                _ => continue,
            }
            if dialed < count {
                dial(&mut dialer);
                dialed += 1;
            }
        }
        let elapsed = t.elapsed();
        (ok, errors, elapsed)
    };
    run(50.min(total)).await;
    let cpu = CpuSnapshot::now();
    let (ok, errors, elapsed) = run(total).await;
    let (cpu_us, _) = cpu.per_unit_since(ok);
    listening.abort();
    ConnResult {
        established: ok,
        errors,
        per_s: ok as f64 / elapsed.as_secs_f64(),
        cpu_us,
    }
}

fn print_conns(parallel: usize, r: &ConnResult) {
    println!(
        "\n## libp2p connection establishment over loopback TCP (both ends in this process)\n"
    );
    println!("| metric | value |");
    println!("|---|---:|");
    println!(
        "| connections established (errors) | {} ({}) |",
        r.established, r.errors
    );
    println!("| dials in flight | {parallel} |");
    println!("| connections/s | {:.0} |", r.per_s);
    println!(
        "| process CPU per connection, both ends (µs) | {:.0} |",
        r.cpu_us
    );
}

// ---------------------------------------------------------------------------------------------
// Part 4: the replay store's synced write

struct FsyncResult {
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    /// On-CPU time of the writing thread per synced write (µs), kernel time included.
    cpu_us: f64,
    /// The same writes into a log that grows with each write, as the store wrote before it
    /// reused its logs (RocksDB opened here with the store's options and family, no log
    /// recycling): p50 (ms) and CPU per write (µs), measured alternately with the store's.
    appending: (f64, f64),
}

/// Synced writes of 8 random tags each: `rounds` × 20 into the replay store and as many into
/// a plain RocksDB (the store's options and family, logs not reused), alternately.
fn bench_fsync(root: &std::path::Path) -> FsyncResult {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 20;
    let dir = tempfile::tempdir_in(root).unwrap();
    let options = RocksOptions::default();
    let mut store = RocksReplayStore::open(dir.path(), &options).unwrap();
    let plain_dir = tempfile::tempdir_in(root).unwrap();
    let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
    let plain = rocksdb::DB::open_cf_descriptors(
        &options.db_options(),
        plain_dir.path(),
        [rocksdb::ColumnFamilyDescriptor::new(
            "replay",
            options.cf_options(&cache),
        )],
    )
    .unwrap();
    let plain_cf = plain.cf_handle("replay").unwrap();
    let mut synced = rocksdb::WriteOptions::default();
    synced.set_sync(true);
    let mut rng = rand::rng();
    let mut tags = || -> Vec<(KeyEpoch, ReplayTag)> {
        (0..8)
            .map(|_| {
                (
                    KeyEpoch(1),
                    ReplayTag(rng.random::<[u8; REPLAY_TAG_SIZE]>()),
                )
            })
            .collect()
    };
    // Warm-up: both files opened and written once.
    for _ in 0..PER_ROUND {
        store.persist(&tags()).unwrap();
    }
    let (mut ms, mut cpu_ns) = (Vec::new(), 0);
    let (mut plain_ms, mut plain_cpu_ns) = (Vec::new(), 0);
    for _ in 0..ROUNDS {
        let from = thread_cpu_ns();
        for _ in 0..PER_ROUND {
            let tags = tags();
            let t = Instant::now();
            store.persist(&tags).unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        cpu_ns += thread_cpu_ns().saturating_sub(from);
        let from = thread_cpu_ns();
        for _ in 0..PER_ROUND {
            let mut batch = rocksdb::WriteBatch::default();
            for (epoch, tag) in tags() {
                let mut key = epoch.0.to_be_bytes().to_vec();
                key.extend_from_slice(&tag.0);
                batch.put_cf(plain_cf, key, []);
            }
            let t = Instant::now();
            plain.write_opt(batch, &synced).unwrap();
            plain_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        plain_cpu_ns += thread_cpu_ns().saturating_sub(from);
    }
    FsyncResult {
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        cpu_us: cpu_ns as f64 / 1e3 / ms.len() as f64,
        appending: (
            percentile(&plain_ms, 50.0),
            plain_cpu_ns as f64 / 1e3 / plain_ms.len() as f64,
        ),
    }
}

/// Synced writes and replay tags in the RocksDB write-ahead logs (`*.log`) of `dir`: one
/// logical WAL record per `WriteBatch` (its header: sequence number, u64, then entry count,
/// u32). Physical records, in 32 KiB blocks: CRC (4), length (2), type (1; 1 full, 2 first,
/// 3 middle, 4 last), and in a reused log file (the replay store recycles its logs) the
/// log's number (4, its low 32 bits) after types 5–8 (the same four, recyclable). A header of
/// zeros is the unwritten end (or a block's padding); a recyclable record of another log
/// number is left from the file's earlier use, so the log ends there.
fn wal_batches(dir: &std::path::Path) -> (u64, u64) {
    const BLOCK: usize = 32 * 1024;
    const RECYCLABLE_HEADER: usize = 11;
    let (mut batches, mut entries) = (0u64, 0u64);
    let mut count = |record: &[u8]| {
        if let Some(n) = record.get(8..12) {
            batches += 1;
            entries += u64::from(u32::from_le_bytes(n.try_into().unwrap()));
        }
    };
    let Ok(files) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    for file in files.filter_map(Result::ok) {
        let path = file.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Some(number) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        let mut pos = 0;
        let mut record = Vec::new();
        while pos + 7 <= data.len() {
            let block_end = (pos / BLOCK + 1) * BLOCK;
            let left = block_end.min(data.len()) - pos;
            if left < 7
                || (left < RECYCLABLE_HEADER && data[pos..pos + left].iter().all(|b| *b == 0))
            {
                pos = block_end;
                continue;
            }
            let len = usize::from(u16::from_le_bytes([data[pos + 4], data[pos + 5]]));
            let kind = data[pos + 6];
            let (kind, header) = match kind {
                5..=8 => {
                    let Some(log) = data.get(pos + 7..pos + 11) else {
                        break;
                    };
                    if u64::from(u32::from_le_bytes(log.try_into().unwrap()))
                        != number & u64::from(u32::MAX)
                    {
                        break;
                    }
                    (kind - 4, RECYCLABLE_HEADER)
                }
                _ => (kind, 7),
            };
            let end = pos + header + len;
            if (kind == 0 && len == 0) || end > data.len() {
                break;
            }
            let fragment = &data[pos + header..end];
            match kind {
                1 => count(fragment),
                2 => record = fragment.to_vec(),
                3 => record.extend_from_slice(fragment),
                4 => {
                    record.extend_from_slice(fragment);
                    count(&record);
                }
                _ => {}
            }
            pos = end;
        }
    }
    (batches, entries)
}

// ---------------------------------------------------------------------------------------------
// Part 5: the 3-hop chain over loopback

/// Submit and arrival times (ns since `base`, +1 so that 0 means "not yet") by sequence
/// number.
struct Arrivals {
    base: Instant,
    submitted: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    delivered: AtomicUsize,
    duplicates: AtomicUsize,
    strangers: AtomicUsize,
    window: Mutex<Arc<Semaphore>>,
}

impl Arrivals {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }
}

struct Recorder(Arc<Arrivals>);

impl LocalDestination for Recorder {
    fn deliver(&self, delivery: Delivery) {
        let a = &self.0;
        let now = a.now();
        let seq = match &delivery {
            Delivery::Final { plaintext, .. } if plaintext.len() >= 8 => {
                u64::from_le_bytes(plaintext[..8].try_into().unwrap()) as usize
            }
            _ => usize::MAX,
        };
        match a.arrived.get(seq) {
            Some(slot) => {
                if slot.swap(now, Ordering::Relaxed) == 0 {
                    a.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    a.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                a.strangers.fetch_add(1, Ordering::Relaxed);
            }
        }
        a.window.lock().unwrap().add_permits(1);
    }
}

/// The stage marks of the nodes' packet paths (`whispr_relay::mesh::StageProbe`), in ns since
/// `base` (the clock of [`Arrivals`]), per node and stage; recorded while `on`.
struct StageLog {
    base: Instant,
    on: std::sync::atomic::AtomicBool,
    marks: Mutex<std::collections::HashMap<(NodeId, Stage), Vec<u64>>>,
}

impl StageProbe for StageLog {
    fn mark(&self, node: &NodeId, stage: Stage, count: usize, at: Instant) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let ns = u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(0) + 1;
        let mut marks = self.marks.lock().unwrap();
        let v = marks.entry((*node, stage)).or_default();
        v.extend(std::iter::repeat_n(ns, count));
    }
}

/// One segment of the chain's per-packet breakdown: its name and per-packet durations (µs).
struct Segment {
    name: &'static str,
    us: Vec<f64>,
}

/// Where a packet's time goes, segment by segment: the marks of each stage sorted and paired
/// by rank with the next stage's (every stage is first in, first out on its node, so the
/// i-th packet to pass a stage is the i-th to pass the next). `None` when a stage did not see
/// every packet.
fn stage_breakdown(
    log: &StageLog,
    nodes: &[NodeId; 3],
    mut submits: Vec<u64>,
    mut arrivals: Vec<u64>,
) -> Option<Vec<Segment>> {
    let marks = log.marks.lock().unwrap();
    let n = arrivals.len();
    if submits.len() != n {
        return None;
    }
    submits.sort_unstable();
    arrivals.sort_unstable();
    let get = |node: &NodeId, stage: Stage| -> Option<Vec<u64>> {
        let mut v = marks.get(&(*node, stage))?.clone();
        (v.len() == n).then(|| {
            v.sort_unstable();
            v
        })
    };
    let [edge, mix, dest] = nodes;
    let points: Vec<(&'static str, Vec<u64>)> = vec![
        ("submitted", submits),
        (
            "edge: submit → core (client path, inbox)",
            get(edge, Stage::CoreIn)?,
        ),
        ("edge: peel pool round trip", get(edge, Stage::Peeled)?),
        (
            "edge: wait for the synced tag write",
            get(edge, Stage::Released)?,
        ),
        (
            "edge: sender task, Noise/Yamux write + flush",
            get(edge, Stage::Written)?,
        ),
        (
            "link edge → mix (connection tasks, TCP, reader task)",
            get(mix, Stage::Read)?,
        ),
        ("mix: reader → core (inbox)", get(mix, Stage::CoreIn)?),
        ("mix: peel pool round trip", get(mix, Stage::Peeled)?),
        (
            "mix: wait for the synced tag write",
            get(mix, Stage::Released)?,
        ),
        (
            "mix: sender task, Noise/Yamux write + flush",
            get(mix, Stage::Written)?,
        ),
        ("link mix → destination", get(dest, Stage::Read)?),
        (
            "destination: reader → core (inbox)",
            get(dest, Stage::CoreIn)?,
        ),
        (
            "destination: peel pool round trip",
            get(dest, Stage::Peeled)?,
        ),
        (
            "destination: wait for the synced tag write",
            get(dest, Stage::Released)?,
        ),
        ("destination: deliver", arrivals),
    ];
    Some(
        points
            .windows(2)
            .map(|pair| Segment {
                name: pair[1].0,
                us: pair[0]
                    .1
                    .iter()
                    .zip(&pair[1].1)
                    .map(|(a, b)| b.saturating_sub(*a) as f64 / 1e3)
                    .collect(),
            })
            .collect(),
    )
}

struct Node {
    handle: MeshHandle,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), MeshError>>,
    dir: tempfile::TempDir,
}

fn mesh_config(
    roles: Vec<RelayRole>,
    mix_layer: u32,
    edge: bool,
    bootstrap: &[String],
) -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        bootstrap: bootstrap.to_vec(),
        roles,
        mix_layer,
        descriptor_publish_ms: 300,
        peel_inline: PEEL_INLINE.load(Ordering::Relaxed),
        router: RouterConfig {
            edge,
            peer_rate: RateLimit::unlimited(),
            client_rate: RateLimit::unlimited(),
            ..RouterConfig::default()
        },
        ..MeshConfig::default()
    }
}

fn start_node(
    root: &std::path::Path,
    config: MeshConfig,
    extra_roles: Vec<Role>,
    destination: Option<Arc<dyn LocalDestination>>,
) -> Node {
    let dir = tempfile::tempdir_in(root).unwrap();
    let (handle, runner) = Mesh::new(MeshOptions {
        config,
        data_dir: dir.path().to_path_buf(),
        extra_roles,
    })
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(destination, async {
        let _ = stopped.await;
    }));
    Node {
        handle,
        stop,
        task,
        dir,
    }
}

fn bootstrap_addr(handle: &MeshHandle) -> String {
    let addrs = handle.listen_addrs();
    format!("{}/p2p/{}", addrs[0], handle.peer_id())
}

/// Sum of the `whispr_mesh_packets_dropped_total` lines and the send failures of a node.
fn drop_counters(handle: &MeshHandle) -> (u64, u64) {
    let text = handle.metrics_text();
    let value = |l: &str| -> u64 {
        l.rsplit_once(' ')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let dropped = text
        .lines()
        .filter(|l| l.starts_with("whispr_mesh_packets_dropped_total{"))
        .map(value)
        .sum();
    let failed = text
        .lines()
        .filter(|l| l.starts_with("whispr_mesh_send_failed_total "))
        .map(value)
        .sum();
    (dropped, failed)
}

struct WindowResult {
    window: String,
    sent: usize,
    delivered: usize,
    refused: usize,
    per_s: f64,
    per_s_mid: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us: f64,
    cpu_groups: BTreeMap<&'static str, f64>,
    /// Synced replay-store writes of the three nodes, and the tags they carried.
    replay_writes: u64,
    replay_tags: u64,
    cores_busy: f64,
    machine_busy: f64,
    loadavg: String,
    /// Where a packet's time went ([`stage_breakdown`]).
    stages: Option<Vec<Segment>>,
    /// The synced replay writes of the three nodes in this window, by duration: (upper
    /// bound in s, cumulative count), from their `whispr_mesh_replay_sync_seconds`.
    replay_sync: Vec<(String, u64)>,
}

fn wal_total(dirs: &[PathBuf]) -> (u64, u64) {
    dirs.iter()
        .map(|d| wal_batches(d))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[allow(clippy::too_many_arguments)]
async fn run_window(
    edge: &MeshHandle,
    stages: (&StageLog, &[NodeId; 3], &[MeshHandle; 3]),
    wal_dirs: &[PathBuf],
    arrivals: &Arc<Arrivals>,
    packets: Vec<Vec<u8>>,
    first: usize,
    window: usize,
    rate: Option<usize>,
) -> WindowResult {
    let n = packets.len();
    let semaphore = Arc::new(Semaphore::new(window));
    *arrivals.window.lock().unwrap() = semaphore.clone();
    let refused = Arc::new(AtomicUsize::new(0));
    let client = edge.new_client_id();
    let before = arrivals.delivered.load(Ordering::Relaxed);
    let wal_before = wal_total(wal_dirs);
    stages.0.marks.lock().unwrap().clear();
    let sync_before = replay_sync_buckets(stages.2);
    let cpu = CpuSnapshot::now();
    let paced_from = tokio::time::Instant::now();
    for (i, bytes) in packets.into_iter().enumerate() {
        if let Some(rate) = rate {
            tokio::time::sleep_until(
                paced_from + Duration::from_secs_f64(i as f64 / rate.max(1) as f64),
            )
            .await;
        }
        semaphore.acquire().await.unwrap().forget();
        let (edge, arrivals, refused, semaphore) = (
            edge.clone(),
            arrivals.clone(),
            refused.clone(),
            semaphore.clone(),
        );
        tokio::spawn(async move {
            arrivals.submitted[first + i].store(arrivals.now(), Ordering::Relaxed);
            if let Err(reason) = edge.submit_client(client, bytes).await {
                eprintln!("mesh: packet {} refused by the edge: {reason}", first + i);
                refused.fetch_add(1, Ordering::Relaxed);
                semaphore.add_permits(1);
            }
        });
    }
    // Wait for every packet (or 30 s without progress).
    let mut last_progress = Instant::now();
    let mut last_count = 0;
    loop {
        let done =
            arrivals.delivered.load(Ordering::Relaxed) - before + refused.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        if done != last_count {
            last_count = done;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(30) {
            eprintln!("mesh: W = {window}: no progress for 30 s, {done}/{n} accounted for");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered_count = arrivals.delivered.load(Ordering::Relaxed) - before;
    let ((cpu_us, cpu_groups), (cores_busy, machine_busy)) = cpu.since(delivered_count);
    let (replay_writes, replay_tags) = wal_total(wal_dirs);
    let (replay_writes, replay_tags) = (replay_writes - wal_before.0, replay_tags - wal_before.1);
    let mut latencies = Vec::with_capacity(n);
    let mut submits = Vec::with_capacity(n);
    let mut arrivals_ns = Vec::with_capacity(n);
    for seq in first..first + n {
        let s = arrivals.submitted[seq].load(Ordering::Relaxed);
        let a = arrivals.arrived[seq].load(Ordering::Relaxed);
        if s > 0 {
            submits.push(s);
        }
        if a > 0 && s > 0 {
            latencies.push((a.saturating_sub(s)) as f64 / 1e6);
            arrivals_ns.push(a);
        }
    }
    let breakdown = stage_breakdown(stages.0, stages.1, submits.clone(), arrivals_ns.clone());
    let sync_after = replay_sync_buckets(stages.2);
    let replay_sync: Vec<(String, u64)> = sync_after
        .iter()
        .zip(&sync_before)
        .map(|((le, a), (_, b))| (le.clone(), a - b))
        .collect();
    arrivals_ns.sort_unstable();
    let start = submits.iter().copied().min().unwrap_or(0);
    let end = arrivals_ns.last().copied().unwrap_or(start);
    let per_s = arrivals_ns.len() as f64 / ((end - start) as f64 / 1e9);
    // The middle 80 % of arrivals (ramp-up and tail left out).
    let (lo, hi) = (arrivals_ns.len() / 10, arrivals_ns.len() * 9 / 10);
    let per_s_mid = if hi > lo + 1 {
        (hi - lo) as f64 / ((arrivals_ns[hi - 1] - arrivals_ns[lo]) as f64 / 1e9)
    } else {
        per_s
    };
    WindowResult {
        window: match rate {
            Some(r) => format!("paced {r}/s"),
            None => window.to_string(),
        },
        sent: n,
        delivered: delivered_count,
        refused: refused.load(Ordering::Relaxed),
        per_s,
        per_s_mid,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: percentile(&latencies, 100.0),
        cpu_us,
        cpu_groups,
        replay_writes,
        replay_tags,
        cores_busy,
        machine_busy,
        loadavg: loadavg(),
        stages: breakdown,
        replay_sync,
    }
}

/// The three nodes' `whispr_mesh_replay_sync_seconds` histogram summed: (bound, cumulative
/// count) per bucket, `+Inf` last.
fn replay_sync_buckets(handles: &[MeshHandle; 3]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for handle in handles {
        let text = handle.metrics_text();
        let mut i = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("whispr_mesh_replay_sync_seconds_bucket{le=\"")
            else {
                continue;
            };
            let Some((le, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let count: u64 = count.trim().parse().unwrap_or(0);
            match out.get_mut(i) {
                Some(slot) => slot.1 += count,
                None => out.push((le.to_string(), count)),
            }
            i += 1;
        }
    }
    out
}

struct MeshResult {
    windows: Vec<WindowResult>,
    duplicates: usize,
    strangers: usize,
    /// (node, dropped, send failures)
    counters: Vec<(&'static str, u64, u64)>,
    build_s: f64,
    built: usize,
}

async fn bench_mesh(
    windows_n: Vec<(usize, usize)>,
    paced: Vec<(usize, usize)>,
    warmup: usize,
    root: PathBuf,
) -> MeshResult {
    // Paced runs: a window far above what the rate keeps in flight.
    let runs: Vec<(usize, usize, Option<usize>)> = windows_n
        .iter()
        .map(|&(w, n)| (w, n, None))
        .chain(paced.iter().map(|&(r, n)| (100_000, n, Some(r))))
        .collect();
    let total = warmup + runs.iter().map(|(_, n, _)| n).sum::<usize>();
    let arrivals = Arc::new(Arrivals {
        base: Instant::now(),
        submitted: (0..total).map(|_| AtomicU64::new(0)).collect(),
        arrived: (0..total).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicUsize::new(0),
        duplicates: AtomicUsize::new(0),
        strangers: AtomicUsize::new(0),
        window: Mutex::new(Arc::new(Semaphore::new(0))),
    });

    // The chain's nodes publish their descriptors at the relay's default interval (60 s; a
    // peer subscribing to the topic brings a publication forward, so the directories still
    // fill in a second or two). At the 300 ms of `mesh_config`, every node verified each
    // gossiped descriptor and rebuilt its directory (every signature verified again) a few
    // times a second: 7–9 % of this process's CPU during the paced window (perf, 2026-12-06),
    // counted in "tokio threads", which a relay at the default interval does not spend.
    let chain_config = |roles, layer, edge, bootstrap: &[String]| MeshConfig {
        descriptor_publish_ms: MeshConfig::default().descriptor_publish_ms,
        peel_workers: CHAIN_PEEL_WORKERS.load(Ordering::Relaxed),
        ..mesh_config(roles, layer, edge, bootstrap)
    };
    let edge = start_node(
        &root,
        chain_config(vec![RelayRole::Edge], 0, true, &[]),
        vec![],
        None,
    );
    let bootstrap = [bootstrap_addr(&edge.handle)];
    let mix = start_node(
        &root,
        chain_config(vec![RelayRole::Mix], 1, false, &bootstrap),
        vec![],
        None,
    );
    let destination = start_node(
        &root,
        chain_config(vec![], 0, false, &bootstrap),
        vec![Role::Mailbox],
        Some(Arc::new(Recorder(arrivals.clone()))),
    );
    let nodes = [&edge, &mix, &destination];
    let stage_log = Arc::new(StageLog {
        base: arrivals.base,
        on: std::sync::atomic::AtomicBool::new(true),
        marks: Mutex::default(),
    });
    // Once per process; the relay part runs later without it (`on` false).
    let installed = install_stage_probe(stage_log.clone());
    assert!(installed, "stage probe installed twice");
    let node_ids = nodes.map(|n| n.handle.node_id());
    let handles = nodes.map(|n| n.handle.clone());
    let wal_dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir.path().join("replay")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nodes.iter().all(|n| n.handle.directory().len() == 3) {
        assert!(
            Instant::now() < deadline,
            "directories incomplete after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let directory = edge.handle.directory();
    let epoch = KeyEpoch::containing(
        whispr_node_kit::clock::now(),
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let hop = |node: NodeId| RouteHop {
        node,
        sphinx_key: *directory.get(&node).unwrap().sphinx_key(epoch).unwrap(),
    };
    let route = [
        hop(edge.handle.node_id()),
        hop(mix.handle.node_id()),
        hop(destination.handle.node_id()),
    ];
    eprintln!("mesh: directories complete; building {total} packets…");
    let t = Instant::now();
    let route_for_build = route.clone();
    let mut packets =
        tokio::task::spawn_blocking(move || build_packets(&route_for_build, 0, total))
            .await
            .unwrap();
    let build_s = t.elapsed().as_secs_f64();
    eprintln!("mesh: built in {build_s:.1} s");

    let mut rest = packets.split_off(warmup);
    let warm = run_window(
        &edge.handle,
        (&stage_log, &node_ids, &handles),
        &wal_dirs,
        &arrivals,
        packets,
        0,
        64,
        None,
    )
    .await;
    eprintln!(
        "mesh: warm-up {} packets, W = 64: {}/{} delivered, {:.0} packets/s",
        warm.sent, warm.delivered, warm.sent, warm.per_s
    );
    let mut first = warmup;
    let mut windows = Vec::new();
    for &(w, n, rate) in &runs {
        let tail = rest.split_off(n);
        let chunk = std::mem::replace(&mut rest, tail);
        let r = run_window(
            &edge.handle,
            (&stage_log, &node_ids, &handles),
            &wal_dirs,
            &arrivals,
            chunk,
            first,
            w,
            rate,
        )
        .await;
        eprintln!(
            "mesh: W = {}: {}/{} delivered ({} refused), {:.0} packets/s, p50 {:.2} ms, p99 {:.2} ms",
            r.window, r.delivered, r.sent, r.refused, r.per_s, r.p50_ms, r.p99_ms
        );
        first += n;
        windows.push(r);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stage_log.on.store(false, Ordering::Relaxed);
    // Counters are published after each core step; let them settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counters = vec![
        ("edge", drop_counters(&edge.handle)),
        ("mix", drop_counters(&mix.handle)),
        ("destination", drop_counters(&destination.handle)),
    ]
    .into_iter()
    .map(|(n, (d, f))| (n, d, f))
    .collect();
    for node in [edge, mix, destination] {
        let _ = node.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
    }
    MeshResult {
        windows,
        duplicates: arrivals.duplicates.load(Ordering::Relaxed),
        strangers: arrivals.strangers.load(Ordering::Relaxed),
        counters,
        build_s,
        built: total,
    }
}

/// The per-packet breakdown of each window: mean, p50 and p99 of each segment, and its mean
/// over the slowest 1 % of packets (end to end), which shows where the tail goes.
fn print_stages(r: &MeshResult) {
    for w in &r.windows {
        let Some(segments) = &w.stages else {
            println!(
                "\nW = {}: no stage breakdown (a stage did not see every packet).",
                w.window
            );
            continue;
        };
        let n = segments.first().map_or(0, |s| s.us.len());
        let total: Vec<f64> = (0..n)
            .map(|i| segments.iter().map(|s| s.us[i]).sum())
            .collect();
        let cut = percentile(&total, 99.0);
        let slow: Vec<usize> = (0..n).filter(|&i| total[i] >= cut).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let slow_mean =
            |v: &[f64]| slow.iter().map(|&i| v[i]).sum::<f64>() / slow.len().max(1) as f64;
        println!(
            "\n#### W = {}: where a packet's time goes (stage marks paired by rank, µs)\n",
            w.window
        );
        println!("| segment | mean | p50 | p99 | mean over the slowest 1 % |");
        println!("|---|---:|---:|---:|---:|");
        for s in segments {
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                s.name,
                mean(&s.us),
                percentile(&s.us, 50.0),
                percentile(&s.us, 99.0),
                slow_mean(&s.us)
            );
        }
        println!(
            "| **end to end** | {:.0} | {:.0} | {:.0} | {:.0} |",
            mean(&total),
            percentile(&total, 50.0),
            cut,
            slow_mean(&total)
        );
        let all = w.replay_sync.last().map_or(0, |(_, c)| *c);
        println!(
            "\nThe nodes' synced replay writes in this window (the store thread's own timing, \
             `whispr_mesh_replay_sync_seconds`), cumulative: {}.",
            w.replay_sync
                .iter()
                .map(|(le, c)| format!("≤ {le} s: {c}/{all}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn print_mesh(r: &MeshResult, fsync: Option<&FsyncResult>, hop: Option<&HopResult>) {
    println!("\n## 3-hop loopback chain (edge → mix → destination), mixing off\n");
    println!(
        "Three in-process meshes on 127.0.0.1 (TCP + Noise + Yamux), one 2-worker Tokio runtime; \
         {} packets built beforehand in {:.1} s (not timed). Latency: `submit_client` → `deliver`. \
         `mesh.peel_inline` {}, `mesh.peel_workers` {}.\n",
        r.built,
        r.build_s,
        if PEEL_INLINE.load(Ordering::Relaxed) {
            "on"
        } else {
            "off"
        },
        match CHAIN_PEEL_WORKERS.load(Ordering::Relaxed) {
            0 => "0 (one per core)".to_string(),
            n => n.to_string(),
        }
    );
    let groups: Vec<&'static str> = {
        let mut g: Vec<&'static str> = r
            .windows
            .iter()
            .flat_map(|w| w.cpu_groups.keys().copied())
            .collect();
        g.sort_unstable();
        g.dedup();
        g
    };
    print!(
        "| window W | sent | delivered | refused | packets/s | packets/s (middle 80 %) | p50 (ms) | p99 (ms) | max (ms) | cores busy (this process) | cores busy (machine) | load average after | synced replay writes (3 nodes) | tags per write | CPU µs/packet (process)"
    );
    for g in &groups {
        print!(" | {g} (µs/packet)");
    }
    println!(" |");
    print!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:");
    for _ in &groups {
        print!("|---:");
    }
    println!("|");
    for w in &r.windows {
        print!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {:.0}",
            w.window,
            w.sent,
            w.delivered,
            w.refused,
            w.per_s,
            w.per_s_mid,
            w.p50_ms,
            w.p99_ms,
            w.max_ms,
            w.cores_busy,
            w.machine_busy,
            w.loadavg,
            w.replay_writes,
            w.replay_tags as f64 / w.replay_writes.max(1) as f64,
            w.cpu_us
        );
        for g in &groups {
            print!(" | {:.0}", w.cpu_groups.get(g).copied().unwrap_or(0.0));
        }
        println!(" |");
    }
    let zero_drop = r
        .windows
        .iter()
        .all(|w| w.delivered == w.sent && w.refused == 0)
        && r.duplicates == 0
        && r.strangers == 0
        && r.counters.iter().all(|(_, d, f)| *d == 0 && *f == 0);
    println!();
    println!(
        "Zero drop: **{}** (duplicates {}, unknown deliveries {}; router drops / send failures: {}).",
        if zero_drop { "yes" } else { "NO" },
        r.duplicates,
        r.strangers,
        r.counters
            .iter()
            .map(|(n, d, f)| format!("{n} {d}/{f}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    print_stages(r);
    if let Some(f) = fsync {
        println!(
            "Replay store synced write of 8 tags, back to back (200 writes): p50 {:.2} ms, p99 {:.2} ms, \
             mean {:.2} ms; the writing thread's CPU {:.0} µs per write (into a log that grows with each write, alternately: p50 {:.2} ms, {:.0} µs). Synced writes and tags per write are counted in the nodes' RocksDB WALs.",
            f.p50_ms, f.p99_ms, f.mean_ms, f.cpu_us, f.appending.0, f.appending.1
        );
    }
    if let Some(h) = hop {
        let router = median(&h.us[V_ROUTER]);
        println!(
            "Sphinx + router CPU of the three hops, from the per-hop part of this run: 3 × {router:.1} = {:.0} µs per packet.",
            3.0 * router
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if let Ok(spec) = std::env::var(GEN_ENV) {
        generator_main(&spec);
        return;
    }
    let args = parse_args();
    let root = match std::env::var_os("WHISPR_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&root).unwrap();
    let started = Instant::now();
    let load_start = loadavg();
    eprintln!(
        "mesh bench: parts {:?}, {} cores",
        args.parts,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let hop = args.runs("hop").then(|| bench_hop(&args));
    eprintln!("[{:.0} s] hop done", started.elapsed().as_secs_f64());
    let noise = args.runs("noise").then(|| bench_noise(&args));
    eprintln!("[{:.0} s] noise done", started.elapsed().as_secs_f64());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let conns = args.runs("conns").then(|| {
        let (m, k) = (args.conns, args.conns_parallel);
        runtime.block_on(async move { tokio::spawn(bench_conns(m, k)).await.unwrap() })
    });
    eprintln!("[{:.0} s] conns done", started.elapsed().as_secs_f64());
    let fsync = args.runs("fsync").then(|| bench_fsync(&root));
    eprintln!("[{:.0} s] fsync done", started.elapsed().as_secs_f64());
    let mesh = args.runs("mesh").then(|| {
        let (windows, paced, warmup, root) = (
            args.windows.clone(),
            args.paced.clone(),
            args.warmup,
            root.clone(),
        );
        runtime.block_on(async move {
            tokio::spawn(bench_mesh(windows, paced, warmup, root))
                .await
                .unwrap()
        })
    });
    eprintln!("[{:.0} s] mesh done", started.elapsed().as_secs_f64());
    let relay = args.runs("relay").then(|| {
        let (count, root) = (args.relay_packets, root.clone());
        let mut results = Vec::new();
        for &workers in &args.relay_workers {
            let root = root.clone();
            results.push(runtime.block_on(async move {
                tokio::spawn(bench_relay(count, workers, root))
                    .await
                    .unwrap()
            }));
            eprintln!(
                "[{:.0} s] relay ({workers} peel workers) done",
                started.elapsed().as_secs_f64()
            );
        }
        results
    });

    println!("# whispr-relay mesh bench");
    println!(
        "\n{} cores; load average at the start {load_start}, at the end {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    if let Some(r) = &hop {
        print_hop(&args, r);
    }
    if let Some(r) = &noise {
        print_noise(&args, r);
    }
    if let Some(r) = &conns {
        print_conns(args.conns_parallel, r);
    }
    if let Some(r) = &mesh {
        print_mesh(r, fsync.as_ref(), hop.as_ref());
    } else if let Some(f) = &fsync {
        println!(
            "\nReplay store synced write of 8 tags (200 writes): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms; the writing thread's CPU {:.0} µs per write (into a log that grows with each write, alternately: p50 {:.2} ms, {:.0} µs).",
            f.p50_ms, f.p99_ms, f.mean_ms, f.cpu_us, f.appending.0, f.appending.1
        );
    }
    if let Some(r) = &relay {
        print_relay(r, fsync.as_ref());
    }
    println!("\nWhole run: {:.0} s.", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Part 6: one relay alone, fed by a load generator in another process (`relay`)

/// Set in the generator's environment: "<relay multiaddr with /p2p/> <hex Ed25519 secret>
/// <packet file>". The bench re-executes itself with it.
const GEN_ENV: &str = "WHISPR_RELAY_BENCH_GENERATOR";

/// The load generator and sink (another process, one thread): a bare libp2p swarm (TCP + Noise +
/// Yamux, `libp2p-stream` only) with the identity of the sink node `G` of the consensus. It
/// writes the pre-built packets (route relay → G) flat out on one `/whispr/packets/1` stream to
/// the relay (the relay's backpressure paces it), and counts the frames the relay forwards back
/// to G on the stream it opens, without peeling them. Prints one line of results.
fn generator_main(spec: &str) {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut parts = spec.split_whitespace();
    let addr: libp2p::Multiaddr = parts.next().unwrap().parse().unwrap();
    let key: [u8; 32] = hex::decode(parts.next().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let bytes = std::fs::read(parts.next().unwrap()).unwrap();
    let size = whispr_protocol::sphinx::PACKET_SIZE;
    let total = bytes.len() / size;
    let relay_peer = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key).unwrap();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let mut control = swarm.behaviour().new_control();
        let mut incoming = control
            .accept(whispr_relay::mesh::PACKETS_PROTOCOL)
            .unwrap();
        swarm.dial(addr).unwrap();
        tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        let arrivals = Arc::new(Mutex::new(Vec::<Instant>::with_capacity(total)));
        let sink = arrivals.clone();
        tokio::spawn(async move {
            while let Some((_, mut stream)) = incoming.next().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut frame = vec![0u8; size];
                    while stream.read_exact(&mut frame).await.is_ok() {
                        sink.lock().unwrap().push(Instant::now());
                    }
                });
            }
        });
        let mut stream = loop {
            match control
                .open_stream(relay_peer, whispr_relay::mesh::PACKETS_PROTOCOL)
                .await
            {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let started = Instant::now();
        for frame in bytes.chunks_exact(size) {
            stream.write_all(frame).await.unwrap();
        }
        stream.flush().await.unwrap();
        let written = started.elapsed();
        // Wait for the last frames (or 20 s without progress).
        let mut last = (0, Instant::now());
        loop {
            let n = arrivals.lock().unwrap().len();
            if n >= total {
                break;
            }
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let times = arrivals.lock().unwrap().clone();
        let n = times.len();
        let (lo, hi) = (n / 10, (n * 9 / 10).max(1) - 1);
        let mid_rate = if hi > lo {
            (hi - lo) as f64 / times[hi].duration_since(times[lo]).as_secs_f64()
        } else {
            0.0
        };
        let all_s = times
            .last()
            .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
        println!(
            "GEN sent={total} received={n} written_s={:.3} all_s={all_s:.3} mid_rate={mid_rate:.1} cpu_ns={}",
            written.as_secs_f64(),
            process_cpu_ns()
        );
    });
}

struct RelayResult {
    workers: usize,
    sent: usize,
    received: usize,
    all_rate: f64,
    mid_rate: f64,
    raw_peel_us: f64,
    raw_peel_wall_us: f64,
    relay_cores: f64,
    peel_cores: f64,
    generator_cores: f64,
    machine_cores: f64,
    relay_us_per_packet: f64,
    /// CPU µs per forwarded packet by thread group (`thread_cpu`).
    groups: BTreeMap<&'static str, f64>,
    dropped: u64,
    send_failed: u64,
    load_after: String,
}

/// On-CPU time of the calling thread (ns, `/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Raw `sphinx-packet` peel time on one thread (µs): (on-CPU, wall), medians of 5 rounds of
/// 400 packets. On a shared machine the wall time includes waits for a core; the CPU time is
/// what a peel costs a core.
fn raw_peel_us() -> (f64, f64) {
    let a = MemNode::new(11, Role::Mix, 1);
    let b = MemNode::new(12, Role::Mailbox, 0);
    let epoch = KeyEpoch(1000);
    let packets = build_packets(&[a.hop(epoch), b.hop(epoch)], 0, 400);
    let key = a.key(epoch);
    let (cpu, wall): (Vec<f64>, Vec<f64>) = (0..5)
        .map(|_| {
            let c = thread_cpu_ns();
            let t = Instant::now();
            for p in &packets {
                let packet = sphinx_packet::SphinxPacket::from_bytes(black_box(p)).unwrap();
                black_box(packet.process(key).unwrap());
            }
            let n = packets.len() as f64;
            (
                (thread_cpu_ns() - c) as f64 / 1e3 / n,
                t.elapsed().as_secs_f64() * 1e6 / n,
            )
        })
        .unzip();
    (median(&cpu), median(&wall))
}

type Served = Arc<Mutex<Option<Vec<u8>>>>;

async fn bench_relay(count: usize, workers: usize, root: PathBuf) -> RelayResult {
    use whispr_protocol::consensus::{Authority, Consensus, ConsensusBody, Network};
    // The stand-in authority: serves the consensus this function signs, takes descriptors.
    let served: Served = Arc::new(Mutex::new(None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route(
            "/v1/consensus",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<Served>| async move {
                    use axum::response::IntoResponse as _;
                    match s.lock().unwrap().clone() {
                        Some(b) => b.into_response(),
                        None => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/descriptors",
            axum::routing::post(|| async { axum::http::StatusCode::OK }),
        )
        .with_state(served.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let authority = SigningKey::from_bytes(&[9u8; 32]);
    let network = Network::new(
        vec![Authority {
            key: authority.verifying_key().to_bytes(),
            url,
        }],
        None,
    )
    .unwrap();
    let files = tempfile::tempdir_in(&root).unwrap();
    let network_file = files.path().join("network");
    std::fs::write(&network_file, network.to_text()).unwrap();

    let mut config = mesh_config(vec![RelayRole::Mix], 1, false, &[]);
    config.network_file = Some(network_file);
    config.consensus_poll_ms = 200;
    config.peel_workers = workers;
    let relay = start_node(&root, config, vec![], None);

    // The relay's own signed descriptor, as it serves it.
    let relay_descriptor = loop {
        let wire: Result<whispr_protocol::wire::Directory, _> = whispr_protocol::wire::decode(
            &relay.handle.directory_bytes(),
            whispr_protocol::directory::DIRECTORY_LEN_MAX,
        );
        if let Some(d) = wire.ok().and_then(|w| w.descriptors.into_iter().next()) {
            break SignedDescriptor(d);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The sink node G (the generator's identity).
    let now = whispr_node_kit::clock::now();
    let epoch = KeyEpoch::containing(
        now,
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let g_secret: [u8; 32] = rand::random();
    let g_identity = SigningKey::from_bytes(&g_secret);
    let g_id = NodeId(g_identity.verifying_key().to_bytes());
    let g_sphinx: Vec<(KeyEpoch, SphinxSecretKey)> = (epoch.0.saturating_sub(1)..=epoch.0 + 1)
        .map(|e| {
            (
                KeyEpoch(e),
                SphinxSecretKey::from(rand::random::<[u8; 32]>()),
            )
        })
        .collect();
    let g_descriptor = NodeDescriptor {
        node_id: g_id,
        peer_id: g_id.libp2p_peer_id_bytes(),
        roles: [Role::Mailbox].into_iter().collect(),
        mix_layer: 0,
        addresses: vec![],
        api_url: None,
        sphinx_keys: g_sphinx
            .iter()
            .map(|(e, k)| (*e, SphinxPublicKey::from(k)))
            .collect(),
        published_at: UnixTime(now.0 - 1000),
        expires_at: UnixTime(now.0 + 3_600_000),
    }
    .sign(&g_identity)
    .unwrap();
    let mut descriptors = vec![relay_descriptor, g_descriptor];
    descriptors.sort_by_key(|d| d.verify(now).unwrap().node_id);
    let mut consensus = Consensus::new(&ConsensusBody {
        epoch: 1,
        valid_after: now,
        valid_until: UnixTime(now.0 + 3_600_000),
        descriptors,
    });
    consensus.sign(&authority);
    *served.lock().unwrap() = Some(consensus.encode());
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.handle.directory().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the relay never took the consensus"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let directory = relay.handle.directory();
    let relay_hop = RouteHop {
        node: relay.handle.node_id(),
        sphinx_key: *directory
            .get(&relay.handle.node_id())
            .unwrap()
            .sphinx_key(epoch)
            .unwrap(),
    };
    let g_hop = RouteHop {
        node: g_id,
        sphinx_key: SphinxPublicKey::from(&g_sphinx.iter().find(|(e, _)| *e == epoch).unwrap().1),
    };
    eprintln!("relay: building {count} packets (relay → sink)…");
    let packets = build_packets(&[relay_hop, g_hop], 0, count);
    let packet_file = files.path().join("packets");
    std::fs::write(&packet_file, packets.concat()).unwrap();
    drop(packets);
    let raw_before = tokio::task::spawn_blocking(raw_peel_us).await.unwrap();

    let spec = format!(
        "{}/p2p/{} {} {}",
        relay.handle.listen_addrs()[0],
        relay.handle.peer_id(),
        hex::encode(g_secret),
        packet_file.display()
    );
    let cpu0 = process_cpu_ns();
    let threads0 = thread_cpu();
    let machine0 = machine_busy_ns();
    let t0 = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .env(GEN_ENV, spec)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (process_cpu_ns() - cpu0) as f64;
    let threads1 = thread_cpu();
    let peel_ns = threads1.get("peel threads").copied().unwrap_or(0) as f64
        - threads0.get("peel threads").copied().unwrap_or(0) as f64;
    let machine = (machine_busy_ns() - machine0) as f64;
    let raw_after = tokio::task::spawn_blocking(raw_peel_us).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("GEN "))
        .unwrap_or_else(|| panic!("generator output: {stdout:?}"));
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (dropped, send_failed) = drop_counters(&relay.handle);
    let received = field("received") as usize;
    let result = RelayResult {
        workers: if workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        },
        sent: field("sent") as usize,
        received,
        all_rate: received as f64 / field("all_s"),
        mid_rate: field("mid_rate"),
        raw_peel_us: median(&[raw_before.0, raw_after.0]),
        raw_peel_wall_us: median(&[raw_before.1, raw_after.1]),
        relay_cores: cpu / 1e9 / wall,
        peel_cores: peel_ns / 1e9 / wall,
        generator_cores: field("cpu_ns") / 1e9 / wall,
        machine_cores: machine / 1e9 / wall,
        relay_us_per_packet: cpu / 1e3 / received.max(1) as f64,
        groups: threads1
            .iter()
            .map(|(g, ns)| {
                let before = threads0.get(g).copied().unwrap_or(0);
                (
                    *g,
                    ns.saturating_sub(before) as f64 / 1e3 / received.max(1) as f64,
                )
            })
            .collect(),
        dropped,
        send_failed,
        load_after: loadavg(),
    };
    let _ = relay.stop.send(());
    let _ = relay.task.await;
    result
}

fn print_relay(results: &[RelayResult], fsync: Option<&FsyncResult>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\n#### One relay alone, fed by a load generator in another process\n");
    println!(
        "The relay (a `Mesh` in this process: its core task, `mesh.peel_workers` peel threads, replay store in `WHISPR_BENCH_DIR`) forwards packets built beforehand (relay → sink, zero delay) that a one-thread generator process writes flat out on one libp2p stream and counts as they come back, unpeeled. Rate over the middle 80 % of arrivals; target = 0.75 × {cores} cores ÷ raw sphinx-packet peel time (its on-CPU time, measured in this run on one thread before and after each load; its wall time beside it shows the contention). \"useful share\": forwarded packets/s × peel time ÷ relay cores busy, the part of the relay's CPU that went into peels."
    );
    println!(
        "\n| peel workers | sent | forwarded | dropped / send failures | packets/s (middle 80 %) | packets/s (all) | raw peel CPU (wall) µs | target 0.75 × cores ÷ peel | ratio to target | relay cores busy | useful share | of it peel threads | relay CPU µs/packet | generator cores busy | machine cores busy | load average after |"
    );
    println!("|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in results {
        let target = 0.75 * cores as f64 / (r.raw_peel_us / 1e6);
        println!(
            "| {} | {} | {} | {} / {} | {:.0} | {:.0} | {:.1} ({:.1}) | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {} |",
            r.workers,
            r.sent,
            r.received,
            r.dropped,
            r.send_failed,
            r.mid_rate,
            r.all_rate,
            r.raw_peel_us,
            r.raw_peel_wall_us,
            target,
            r.mid_rate / target,
            r.relay_cores,
            r.mid_rate * r.raw_peel_us / 1e6 / r.relay_cores,
            r.peel_cores,
            r.relay_us_per_packet,
            r.generator_cores,
            r.machine_cores,
            r.load_after
        );
    }
    println!("\nThe relay's CPU µs per forwarded packet, by thread:\n");
    let groups: Vec<&str> = results
        .iter()
        .flat_map(|r| r.groups.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!("| peel workers | {} |", groups.join(" | "));
    println!("|---:|{}", "---:|".repeat(groups.len()));
    for r in results {
        let cells: Vec<String> = groups
            .iter()
            .map(|g| format!("{:.1}", r.groups.get(g).copied().unwrap_or(0.0)))
            .collect();
        println!("| {} | {} |", r.workers, cells.join(" | "));
    }
    let zero = results
        .iter()
        .all(|r| r.received == r.sent && r.dropped == 0 && r.send_failed == 0);
    println!("\nZero drop: **{}**.", if zero { "yes" } else { "NO" });
    if let Some(f) = fsync {
        println!(
            "fsync probe (replay store synced write of 8 tags, 200 writes): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms; the writing thread's CPU {:.0} µs per write (into a log that grows with each write, alternately: p50 {:.2} ms, {:.0} µs).",
            f.p50_ms, f.p99_ms, f.mean_ms, f.cpu_us, f.appending.0, f.appending.1
        );
    }
}
