//! Criterion benches for the hot paths of `whispr-protocol`, each reported in units of one
//! X25519 scalar multiplication measured in the same process.
//!
//! Machines (CI runners, laptops, shared VMs) are noisy and differ, so absolute times are only
//! indicative; the figure to compare across runs and machines is the ratio
//! `bench time / X25519 time` with both measured in one run. Two ratios are printed:
//!
//! 1. **criterion means**: the X25519 bench runs first; after the criterion run this binary
//!    reads criterion's own estimates (`<criterion dir>/<group>/<bench>/new/estimates.json`)
//!    and divides each bench's `mean` by the X25519 `mean`. The µs columns of the table are
//!    these means with their 95 % confidence intervals. (The `time:` line criterion prints is
//!    its "typical" estimate, the slope of a linear fit when it samples linearly, so it differs
//!    slightly from the mean.) Only estimates written by this process are used (older files are
//!    skipped), so a filtered run never mixes in stale numbers; without the X25519 bench in the
//!    run, this ratio is not printed.
//! 2. **paired** (the more robust one on a noisy machine): for each bench that criterion ran,
//!    [`PAIRED_ROUNDS`] rounds each time a ~1 ms burst of X25519 calls and a ~1 ms burst of
//!    the bench back to back (order alternating) and take their ratio; the table shows the
//!    median and quartiles of the per-round ratios. Background load that comes and goes slows
//!    both halves of a round alike, whereas the criterion-means ratio compares measurements
//!    taken up to a minute apart. `WHISPR_BENCH_PAIRED=0` skips it.
//!
//! Benches (`<group>/<bench>`):
//! * `x25519/diffie_hellman`: `StaticSecret::diffie_hellman` with a fixed public key (the unit);
//! * `sphinx/build_packet_3_hops`: `sphinx::build_packet`, route edge → mix → destination,
//!   1024-byte plaintext (2048-byte payload, 2396-byte packet);
//! * `sphinx/process_packet_first_hop`: `sphinx::process_packet` at the edge (first hop) of such
//!   a packet, on a fresh copy each iteration (`iter_batched`);
//! * `envelope/seal_1200` and `envelope/open_1200`: `Envelope::seal` / `Envelope::open` of a
//!   1200-byte fragment (no ack SURB);
//! * `fragment/fragment_1MiB`: `fragment::fragment_message` on a 1 MiB message (874 fragments);
//! * `fragment/reassemble_1MiB`: feeding those fragments, in order, into a fresh
//!   `fragment::Reassembler` until the message comes out (input cloned outside the timing).
//!
//! Inputs that an operation consumes are made outside the timing; outputs of the 1 MiB benches
//! are dropped, untimed, right after each call.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-bench cargo bench --workspace --bench protocol`.
//!
//! Instruction-count mode (stable on noisy machines, for `valgrind --tool=callgrind`): with
//! `WHISPR_BENCH_COUNT=<bench>` (e.g. `sphinx/process_packet_first_hop`) the binary skips
//! criterion, runs the operation once to warm up, then `WHISPR_BENCH_COUNT_ITERS` times (default
//! 20) inside the never-inlined function `counted_loop`; run it under
//! `valgrind --tool=callgrind --toggle-collect='*counted_loop*'` and divide the `Collected`
//! count by the iterations. `WHISPR_BENCH_COUNT=list` prints the bench names. See
//! `docs/benchmarks.md`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, Criterion};
use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::envelope::{
    Envelope, EnvelopeContent, MailboxPublicKey, MailboxSecretKey, OuterFields,
};
use whispr_protocol::fragment::{
    self, FRAGMENT_DATA_LEN, Fragment, Inserted, Reassembler, ReassemblyLimits,
};
use whispr_protocol::sphinx::{
    self, HopAction, PACKET_SIZE, PAYLOAD_SIZE, Packet, RouteHop, SphinxPublicKey, SphinxSecretKey,
};
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, MailboxId, MessageId, NodeId, UnixTime,
};
use x25519_dalek::{PublicKey, StaticSecret};

/// Plaintext carried by the benched Sphinx packet (~1 KiB).
const SPHINX_PLAINTEXT_LEN: usize = 1024;
/// The benched message for fragmenting and reassembly.
const MESSAGE_LEN: usize = 1024 * 1024;

const X25519: &str = "x25519/diffie_hellman";
const BUILD: &str = "sphinx/build_packet_3_hops";
const PROCESS: &str = "sphinx/process_packet_first_hop";
const SEAL: &str = "envelope/seal_1200";
const OPEN: &str = "envelope/open_1200";
const FRAGMENT: &str = "fragment/fragment_1MiB";
const REASSEMBLE: &str = "fragment/reassemble_1MiB";

/// Every bench, in the order it runs (X25519 first) and is reported.
const BENCHES: [&str; 7] = [X25519, BUILD, PROCESS, SEAL, OPEN, FRAGMENT, REASSEMBLE];

/// Everything the benches work on, built once from a seeded RNG.
struct Fixtures {
    rng: ChaCha20Rng,
    x25519_secret: StaticSecret,
    x25519_public: PublicKey,
    route: Vec<RouteHop>,
    hop_secrets: Vec<SphinxSecretKey>,
    delays: Vec<Duration>,
    destination: DestinationAddress,
    plaintext: Vec<u8>,
    packet: Packet,
    mailbox_secret: MailboxSecretKey,
    mailbox_public: MailboxPublicKey,
    sender: SigningKey,
    outer: OuterFields,
    content: EnvelopeContent,
    envelope: Envelope,
    message_id: MessageId,
    message: Vec<u8>,
    fragments: Vec<Fragment>,
}

fn random_32(rng: &mut ChaCha20Rng) -> [u8; 32] {
    MailboxId::random(rng).0
}

impl Fixtures {
    fn new() -> Fixtures {
        let mut rng = ChaCha20Rng::seed_from_u64(1);

        let x25519_secret = StaticSecret::from(random_32(&mut rng));
        let x25519_public = PublicKey::from(&StaticSecret::from(random_32(&mut rng)));

        // Route: edge, mix, destination (mailbox node).
        let hop_secrets: Vec<SphinxSecretKey> = (0..3)
            .map(|_| SphinxSecretKey::from(random_32(&mut rng)))
            .collect();
        let route: Vec<RouteHop> = hop_secrets
            .iter()
            .map(|secret| RouteHop {
                node: NodeId(random_32(&mut rng)),
                sphinx_key: SphinxPublicKey::from(secret),
            })
            .collect();
        let delays = vec![Duration::from_millis(50), Duration::from_millis(50)];
        let destination = DestinationAddress::mailbox(&MailboxId::random(&mut rng));
        let plaintext: Vec<u8> = (0..SPHINX_PLAINTEXT_LEN).map(|i| (i % 251) as u8).collect();
        let packet =
            sphinx::build_packet(&mut rng, &route, &delays, destination, &plaintext).unwrap();
        assert_eq!(packet.as_bytes().len(), PACKET_SIZE);

        let mailbox_secret = MailboxSecretKey::generate(&mut rng);
        let mailbox_public = mailbox_secret.public_key();
        let sender = SigningKey::from_bytes(&random_32(&mut rng));
        let outer = OuterFields {
            mailbox_id: MailboxId::random(&mut rng),
            access_token: AccessToken::random(&mut rng),
            dedup_id: DedupId::random(&mut rng),
            expires_at: Some(UnixTime(1_800_000_000_000)),
            ack_surb: None,
        };
        // A full-size (1200-byte) first fragment of a 3-fragment message.
        let content_message: Vec<u8> = (0..3 * FRAGMENT_DATA_LEN)
            .map(|i| (i % 253) as u8)
            .collect();
        let content_fragment =
            fragment::fragment_message(MessageId::random(&mut rng), &content_message)
                .unwrap()
                .into_iter()
                .next()
                .unwrap();
        assert_eq!(content_fragment.data.len(), FRAGMENT_DATA_LEN);
        let content = EnvelopeContent {
            message_id: content_fragment.message_id,
            fragment: content_fragment.info,
            content: content_fragment.data,
        };
        let envelope =
            Envelope::seal(&mut rng, &mailbox_public, &sender, outer.clone(), &content).unwrap();

        let message_id = MessageId::random(&mut rng);
        let message: Vec<u8> = (0..MESSAGE_LEN).map(|i| (i % 255) as u8).collect();
        let fragments = fragment::fragment_message(message_id, &message).unwrap();

        let fixtures = Fixtures {
            rng,
            x25519_secret,
            x25519_public,
            route,
            hop_secrets,
            delays,
            destination,
            plaintext,
            packet,
            mailbox_secret,
            mailbox_public,
            sender,
            outer,
            content,
            envelope,
            message_id,
            message,
            fragments,
        };
        fixtures.check();
        fixtures
    }

    /// The benched operations do what they should (so that no bench measures an error path).
    fn check(&self) {
        let next = self.route.get(1).unwrap().node;
        let action = self.process_first_hop(self.packet.as_bytes()).action;
        assert!(
            matches!(action, HopAction::Forward { next_hop, .. } if next_hop == next),
            "the edge should forward to the mix, got {action:?}"
        );
        let opened = self.envelope.open(&self.mailbox_secret).unwrap();
        assert_eq!(opened.content, self.content);
        assert_eq!(
            self.fragments.len(),
            MESSAGE_LEN.div_ceil(FRAGMENT_DATA_LEN)
        );
        assert_eq!(self.reassemble(self.fragments.clone()), self.message);
    }

    fn x25519(&self) -> x25519_dalek::SharedSecret {
        self.x25519_secret
            .diffie_hellman(black_box(&self.x25519_public))
    }

    fn build(&mut self) -> Packet {
        sphinx::build_packet(
            &mut self.rng,
            &self.route,
            &self.delays,
            self.destination,
            black_box(&self.plaintext),
        )
        .unwrap()
    }

    fn process_first_hop(&self, bytes: &[u8]) -> sphinx::Processed {
        let edge = self.hop_secrets.first().unwrap();
        sphinx::process_packet(&[edge], bytes).unwrap()
    }

    fn seal(&mut self, outer: OuterFields) -> Envelope {
        Envelope::seal(
            &mut self.rng,
            &self.mailbox_public,
            &self.sender,
            outer,
            black_box(&self.content),
        )
        .unwrap()
    }

    fn open(&self) -> whispr_protocol::envelope::Opened {
        black_box(&self.envelope)
            .open(&self.mailbox_secret)
            .unwrap()
    }

    fn fragment(&self) -> Vec<Fragment> {
        fragment::fragment_message(self.message_id, black_box(&self.message)).unwrap()
    }

    fn reassemble(&self, fragments: Vec<Fragment>) -> Vec<u8> {
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        let mut complete = None;
        for fragment in fragments {
            if let Inserted::Complete(message) = reassembler
                .insert(UnixTime(0), self.message_id, fragment)
                .unwrap()
            {
                complete = Some(message);
            }
        }
        complete.expect("the last fragment completes the message")
    }
}

fn split(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap()
}

fn run_criterion(c: &mut Criterion, f: &mut Fixtures) {
    // The unit of comparison runs first.
    let (group, name) = split(X25519);
    c.benchmark_group(group)
        .bench_function(name, |b| b.iter(|| f.x25519()));

    let mut g = c.benchmark_group(split(BUILD).0);
    g.bench_function(split(BUILD).1, |b| b.iter(|| f.build()));
    g.bench_function(split(PROCESS).1, |b| {
        b.iter_batched(
            || f.packet.clone(),
            |packet| f.process_first_hop(packet.as_bytes()),
            BatchSize::SmallInput,
        );
    });
    g.finish();

    let mut g = c.benchmark_group(split(SEAL).0);
    let outer = f.outer.clone();
    g.bench_function(split(SEAL).1, |b| {
        b.iter_batched(
            || outer.clone(),
            |outer| f.seal(outer),
            BatchSize::SmallInput,
        );
    });
    g.bench_function(split(OPEN).1, |b| b.iter(|| f.open()));
    g.finish();

    let mut g = c.benchmark_group(split(FRAGMENT).0);
    // ~1 ms per iteration: fewer samples keep the run short (the clones for reassembly are
    // made outside the timing but not outside the wall clock). One call per batch: each output
    // (1 MiB) is dropped, untimed, right after its call, so that the allocator reuses the same
    // memory as it would in a node (holding many outputs made the heap grow and fault pages in,
    // which measured the kernel rather than the code).
    g.sample_size(40);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function(split(FRAGMENT).1, |b| {
        b.iter_batched(|| (), |()| f.fragment(), BatchSize::PerIteration);
    });
    g.bench_function(split(REASSEMBLE).1, |b| {
        b.iter_batched(
            || f.fragments.clone(),
            |fragments| f.reassemble(fragments),
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Reading criterion's estimates back.

/// Where criterion writes its results: the same rule criterion applies (`$CRITERION_HOME`,
/// `$CARGO_TARGET_DIR/criterion`, the cargo target directory, `target/criterion`); the target
/// directory is found from this executable's path (`<target>/release/deps/protocol-…`) instead
/// of asking `cargo metadata`.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe
            .ancestors()
            .skip(1)
            .map(|dir| dir.join("criterion"))
            .find(|dir| dir.join(split(X25519).0).is_dir())
    {
        return dir;
    }
    PathBuf::from("target/criterion")
}

/// The `mean` estimate of one bench, in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Mean {
    point: f64,
    lower: f64,
    upper: f64,
}

/// Reads `"<key>": <number>` from the first occurrence of `key` at or after `from`.
fn json_number(json: &str, from: usize, key: &str) -> Option<f64> {
    let rest = json.get(from..)?;
    let at = rest.find(&format!("\"{key}\""))?;
    let after = rest.get(at + key.len() + 2..)?.trim_start();
    let after = after.strip_prefix(':')?.trim_start();
    let end = after
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(after.len());
    after.get(..end)?.parse().ok()
}

/// Criterion's `estimates.json` is `{"mean":{"confidence_interval":{…,"lower_bound":…,
/// "upper_bound":…},"point_estimate":…,…},"median":…}`: the first `lower_bound`,
/// `upper_bound` and `point_estimate` after `"mean"` belong to the mean.
fn parse_mean(json: &str) -> Option<Mean> {
    let mean = json.find("\"mean\"")?;
    Some(Mean {
        point: json_number(json, mean, "point_estimate")?,
        lower: json_number(json, mean, "lower_bound")?,
        upper: json_number(json, mean, "upper_bound")?,
    })
}

/// The mean of `id` if this process wrote it (modified at or after `started`).
fn read_mean(dir: &Path, id: &str, started: SystemTime) -> Option<Mean> {
    let (group, name) = split(id);
    let path = dir
        .join(group)
        .join(name)
        .join("new")
        .join("estimates.json");
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < started {
        return None;
    }
    parse_mean(&std::fs::read_to_string(&path).ok()?)
}

// ---------------------------------------------------------------------------------------------
// Paired ratio: X25519 and the bench interleaved in short bursts.

/// Rounds of the paired measurement (each: one X25519 burst and one bench burst of ~1–2 ms).
const PAIRED_ROUNDS: usize = 201;
/// Target length of one burst.
const BURST: Duration = Duration::from_millis(1);

/// Runs `op` `n` times and returns nanoseconds per call. Each call is timed on its own, on a
/// fresh input from `setup` made just before it (so a large input is as warm in the cache as
/// in criterion's `iter_batched` with one input per batch), and its output is dropped after the
/// clock stops.
fn burst<I, O>(
    f: &mut Fixtures,
    n: usize,
    setup: &mut impl FnMut(&Fixtures) -> I,
    op: &mut impl FnMut(&mut Fixtures, I) -> O,
) -> f64 {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let input = setup(f);
        let start = Instant::now();
        let output = black_box(op(f, black_box(input)));
        total += start.elapsed();
        drop(output);
    }
    total.as_nanos() as f64 / n as f64
}

/// Calls per burst so that a burst lasts at least [`BURST`].
fn calibrate<I, O>(
    f: &mut Fixtures,
    setup: &mut impl FnMut(&Fixtures) -> I,
    op: &mut impl FnMut(&mut Fixtures, I) -> O,
) -> usize {
    let mut n = 1usize;
    burst(f, n, setup, op); // warm-up
    while n < 1 << 20 && burst(f, n, setup, op) * (n as f64) < BURST.as_nanos() as f64 {
        n = n.saturating_mul(2);
    }
    n
}

/// Median and quartiles of the per-round ratios `bench / X25519`, the two bursts of a round
/// run back to back (order alternating), so that a slow phase of a noisy machine slows both.
#[derive(Clone, Copy, Debug)]
struct Paired {
    median: f64,
    q1: f64,
    q3: f64,
}

fn paired<I, O>(
    f: &mut Fixtures,
    mut setup: impl FnMut(&Fixtures) -> I,
    mut op: impl FnMut(&mut Fixtures, I) -> O,
) -> Paired {
    let mut x_setup = |_: &Fixtures| ();
    let mut x_op = |f: &mut Fixtures, (): ()| f.x25519();
    let n_x = calibrate(f, &mut x_setup, &mut x_op);
    let n_op = calibrate(f, &mut setup, &mut op);
    let mut ratios: Vec<f64> = (0..PAIRED_ROUNDS)
        .map(|round| {
            let (x, t) = if round % 2 == 0 {
                let x = burst(f, n_x, &mut x_setup, &mut x_op);
                (x, burst(f, n_op, &mut setup, &mut op))
            } else {
                let t = burst(f, n_op, &mut setup, &mut op);
                (burst(f, n_x, &mut x_setup, &mut x_op), t)
            };
            t / x
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let index = ((ratios.len() - 1) as f64 * q).round() as usize;
        ratios.get(index).copied().unwrap_or(f64::NAN)
    };
    Paired {
        median: at(0.5),
        q1: at(0.25),
        q3: at(0.75),
    }
}

fn run_paired(f: &mut Fixtures, id: &str) -> Option<Paired> {
    let outer = f.outer.clone();
    Some(match id {
        BUILD => paired(f, |_| (), |f, ()| f.build()),
        PROCESS => paired(
            f,
            |f| f.packet.clone(),
            |f, packet| f.process_first_hop(packet.as_bytes()),
        ),
        SEAL => paired(f, |_| outer.clone(), |f, outer| f.seal(outer)),
        OPEN => paired(f, |_| (), |f, ()| f.open()),
        FRAGMENT => paired(f, |_| (), |f, ()| f.fragment()),
        REASSEMBLE => paired(
            f,
            |f| f.fragments.clone(),
            |f, fragments| f.reassemble(fragments),
        ),
        _ => return None,
    })
}

fn print_table(f: &mut Fixtures, started: SystemTime) {
    let dir = criterion_dir();
    let means: Vec<(&str, Option<Mean>)> = BENCHES
        .iter()
        .map(|id| (*id, read_mean(&dir, id, started)))
        .collect();
    if means.iter().all(|(_, m)| m.is_none()) {
        // `--test`, `--list`, a filter matching nothing, or `--discard-baseline`.
        println!(
            "\nNo estimates written by this run under {}.",
            dir.display()
        );
        return;
    }
    let unit = means
        .first()
        .and_then(|(_, m)| *m)
        .map(|m| m.point)
        .filter(|ns| *ns > 0.0);
    let pair = std::env::var_os("WHISPR_BENCH_PAIRED").is_none_or(|v| v != "0");
    if pair {
        println!(
            "\nPaired measurement: {PAIRED_ROUNDS} rounds of X25519 and bench bursts per bench…"
        );
    }
    println!();
    println!("Results in units of one X25519 scalar multiplication measured in this run");
    println!(
        "(criterion mean estimates from {}; Sphinx payload {PAYLOAD_SIZE} B, packet {PACKET_SIZE} B):",
        dir.display()
    );
    println!();
    println!(
        "| bench | mean (µs) | 95 % CI (µs) | X25519 units (criterion means) | X25519 units (paired: median [q1–q3]) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (id, mean) in &means {
        let Some(m) = mean else {
            println!("| {id} | not run | | | |");
            continue;
        };
        let units = unit.map_or_else(
            || "n/a (X25519 not run)".to_owned(),
            |u| format!("{:.2}", m.point / u),
        );
        let paired_units = if *id == X25519 {
            "1 (unit)".to_owned()
        } else if pair {
            run_paired(f, id).map_or_else(String::new, |p| {
                format!("{:.2} [{:.2}–{:.2}]", p.median, p.q1, p.q3)
            })
        } else {
            "skipped".to_owned()
        };
        println!(
            "| {id} | {:.2} | {:.2} – {:.2} | {units} | {paired_units} |",
            m.point / 1e3,
            m.lower / 1e3,
            m.upper / 1e3
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Instruction-count mode.

/// The loop callgrind collects in (`--toggle-collect='*counted_loop*'`).
#[inline(never)]
fn counted_loop<O>(iters: u64, mut op: impl FnMut() -> O) {
    for _ in 0..iters {
        black_box(op());
    }
}

fn run_counted(f: &mut Fixtures, id: &str, iters: u64) -> Result<(), String> {
    // One untimed call first, so that one-time set-up (CPU feature detection, allocator
    // growth) stays out of the count. Inputs consumed by an operation are prepared outside
    // the collected loop.
    match id {
        X25519 => {
            black_box(f.x25519());
            counted_loop(iters, || f.x25519());
        }
        BUILD => {
            black_box(f.build());
            counted_loop(iters, || f.build());
        }
        PROCESS => {
            black_box(f.process_first_hop(f.packet.as_bytes()));
            let packets: Vec<Packet> = (0..iters).map(|_| f.packet.clone()).collect();
            let mut packets = packets.iter();
            counted_loop(iters, || {
                f.process_first_hop(packets.next().unwrap().as_bytes())
            });
        }
        SEAL => {
            black_box(f.seal(f.outer.clone()));
            let mut outers: Vec<OuterFields> = (0..iters).map(|_| f.outer.clone()).collect();
            counted_loop(iters, || {
                let outer = outers.pop().unwrap();
                f.seal(outer)
            });
        }
        OPEN => {
            black_box(f.open());
            counted_loop(iters, || f.open());
        }
        FRAGMENT => {
            black_box(f.fragment());
            counted_loop(iters, || f.fragment());
        }
        REASSEMBLE => {
            black_box(f.reassemble(f.fragments.clone()));
            let mut inputs: Vec<Vec<Fragment>> = (0..iters).map(|_| f.fragments.clone()).collect();
            counted_loop(iters, || {
                let fragments = inputs.pop().unwrap();
                f.reassemble(fragments)
            });
        }
        other => return Err(format!("unknown bench {other:?}; one of {BENCHES:?}")),
    }
    println!("counted {iters} × {id} in counted_loop");
    Ok(())
}

fn main() -> Result<(), String> {
    let started = SystemTime::now();
    let mut fixtures = Fixtures::new();

    if let Some(id) = std::env::var_os("WHISPR_BENCH_COUNT") {
        let id = id.to_string_lossy().into_owned();
        if id == "list" {
            for bench in BENCHES {
                println!("{bench}");
            }
            return Ok(());
        }
        let iters = std::env::var("WHISPR_BENCH_COUNT_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        return run_counted(&mut fixtures, &id, iters);
    }

    let mut c = Criterion::default().configure_from_args();
    run_criterion(&mut c, &mut fixtures);
    c.final_summary();
    print_table(&mut fixtures, started);
    Ok(())
}
