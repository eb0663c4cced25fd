//! Held packets through a real timer node (RocksDB store, worker loop, wall clock): parts
//! joined and scheduled once under the hold id, retransmissions acknowledged again, cancels
//! checked against the cancel hash, and the packet injected byte for byte at its release time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use whispr_node_kit::clock::now;
use whispr_protocol::payload::HeldPacketPart;
use whispr_protocol::sphinx::{
    PACKET_SIZE, RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, create_surb,
};
use whispr_protocol::{CancelCapability, DestinationAddress, HoldId, NodeId, SurbId, UnixTime};
use whispr_timer_service::TimerError;
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::deferred::{DeferredSend, PacketInjector};
use whispr_timer_service::holds::{HoldConfig, HoldError};
use whispr_timer_service::node::{
    AdminConfig, CancelOutcome, HoldOutcome, LogConfig, NodeConfig, TimerNode, WorkerConfig,
};
use whispr_timer_service::queue::TimerQueue;
use whispr_timer_service::rocks::{RocksOptions, RocksStore};
use whispr_timer_service::task::{Category, TaskId};

/// Longest wait for the worker to fire or finish something. Generous: on a loaded machine the
/// worker's threads can wait long for a CPU, and a deadline costs time only when the test
/// fails.
const WAIT: Duration = Duration::from_secs(120);

/// The network, as a test double: records what the node injects, and when.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(UnixTime, DeferredSend)>>,
}

impl PacketInjector for Recorder {
    fn inject(&self, send: DeferredSend) -> Result<(), String> {
        self.sent.lock().unwrap().push((now(), send));
        Ok(())
    }
}

impl Recorder {
    fn sent(&self) -> Vec<DeferredSend> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// When each packet was injected (by the node's clock).
    fn injected_at(&self) -> Vec<UnixTime> {
        self.sent.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }
}

fn config(dir: &Path) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        admin: AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: "test-admin-token-0123456789abcdefghijklmnop".into(),
            allow_non_loopback: false,
        },
        log: LogConfig::default(),
        queue: QueueConfig {
            rng_seed: Some(1),
            ..QueueConfig::default()
        },
        worker: WorkerConfig {
            idle_poll_ms: 20,
            ..WorkerConfig::default()
        },
        holds: HoldConfig {
            release_ahead_max_ms: 24 * 3600 * 1000,
            ..HoldConfig::default()
        },
        mesh: None,
        backup: Default::default(),
    }
}

/// A node with a recording injector and its worker loop running on its own runtime.
struct Running {
    node: TimerNode,
    recorder: Arc<Recorder>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: tokio::runtime::Runtime,
}

/// Runs `node`'s worker loop on a runtime of its own, until the sender is used or dropped.
fn spawn_worker(node: &TimerNode) -> (tokio::sync::oneshot::Sender<()>, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = node.clone();
    runtime.spawn(async move {
        worker
            .run_worker(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, runtime)
}

/// A node with a recording injector, its worker loop not running yet: nothing fires until
/// [`Running::with_worker`], however long the steps before take.
fn open_recording(dir: &Path) -> (TimerNode, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let node = TimerNode::open(config(dir), recorder.clone()).unwrap();
    (node, recorder)
}

/// Cancels hold `id` once it is not being injected (a fired hold is removed when its
/// injection ends); the outcome.
fn cancel_when_not_injected(
    node: &TimerNode,
    id: HoldId,
    capability: &CancelCapability,
) -> Result<CancelOutcome, TimerError> {
    let until = Instant::now() + WAIT;
    loop {
        match node.cancel_hold(id, capability) {
            Err(TimerError::WrongState(_)) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

impl Running {
    fn start(dir: &Path) -> Running {
        let (node, recorder) = open_recording(dir);
        Running::with_worker(node, recorder)
    }

    /// Starts the worker loop of `node` (opened by [`open_recording`]).
    fn with_worker(node: TimerNode, recorder: Arc<Recorder>) -> Running {
        let (stop, runtime) = spawn_worker(&node);
        Running {
            node,
            recorder,
            stop: Some(stop),
            runtime,
        }
    }

    /// Waits until `count` packets were injected (or the deadline passes); returns them.
    fn wait_for_sent(&self, count: usize, deadline: Duration) -> Vec<DeferredSend> {
        let until = Instant::now() + deadline;
        while self.recorder.sent().len() < count && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.recorder.sent()
    }

    /// Stops the worker and closes the node (and so its RocksDB).
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.runtime.shutdown_timeout(Duration::from_secs(5));
        drop(self.node);
    }
}

/// A SURB (random: two calls never give the same one).
fn surb(seed: u64) -> Surb {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let hops: Vec<RouteHop> = (0..3)
        .map(|i| RouteHop {
            node: NodeId([i + 1; 32]),
            sphinx_key: SphinxPublicKey::from(&SphinxSecretKey::random_from_rng(&mut rng)),
        })
        .collect();
    create_surb(
        &mut rng,
        &hops,
        &[Duration::from_secs(1); 2],
        DestinationAddress([1; 32]),
        SurbId([7; 16]),
    )
    .unwrap()
    .0
}

/// A held packet of `count` parts, each with its own ack SURB, and its capability.
struct Hold {
    id: HoldId,
    capability: CancelCapability,
    packet: Vec<u8>,
    first_hop: NodeId,
    parts: Vec<HeldPacketPart>,
}

fn hold(seed: u8, release_at: UnixTime, count: u32) -> Hold {
    let id = HoldId([seed; 16]);
    let capability = CancelCapability([seed ^ 0x5A; 32]);
    let cancel_hash: [u8; 32] = Sha256::digest(capability.as_bytes()).into();
    let packet: Vec<u8> = (0..PACKET_SIZE)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    let first_hop = NodeId([0xE0 ^ seed; 32]);
    let size = PACKET_SIZE.div_ceil(count as usize);
    let parts = (0..count)
        .map(|i| HeldPacketPart {
            hold_id: id,
            part_index: i,
            part_count: count,
            release_at,
            cancel_hash,
            first_hop,
            data: packet[i as usize * size..((i as usize + 1) * size).min(PACKET_SIZE)].to_vec(),
            ack_surb: Some(surb(u64::from(seed) * 10 + u64::from(i))),
        })
        .collect();
    Hold {
        id,
        capability,
        packet,
        first_hop,
        parts,
    }
}

fn in_ms(ms: u64) -> UnixTime {
    UnixTime(now().0 + ms)
}

#[test]
fn three_parts_in_shuffled_order_are_stored_once_and_retransmissions_acked_again() {
    let dir = TempDir::new().unwrap();
    let h = hold(1, in_ms(3_600_000), 3);
    {
        let node = TimerNode::open(config(dir.path()), Arc::new(Recorder::default())).unwrap();
        assert_eq!(
            node.accept_hold_part(h.parts[2].clone()).unwrap(),
            HoldOutcome::Incomplete
        );
        assert_eq!(
            node.accept_hold_part(h.parts[0].clone()).unwrap(),
            HoldOutcome::Incomplete
        );
        assert_eq!(
            node.accept_hold_part(h.parts[1].clone()).unwrap(),
            HoldOutcome::Scheduled {
                hold_id: h.id,
                ack_surbs: h
                    .parts
                    .iter()
                    .map(|p| p.ack_surb.clone().unwrap())
                    .collect(),
            }
        );
        // The client got no ack and sends every part again, in another order.
        for i in [1, 2, 0] {
            assert_eq!(
                node.accept_hold_part(h.parts[i].clone()).unwrap(),
                HoldOutcome::AlreadyScheduled {
                    hold_id: h.id,
                    ack_surbs: vec![h.parts[i].ack_surb.clone().unwrap()],
                }
            );
        }
        // A part that disagrees with the stored hold is refused.
        let mut other = h.parts[0].clone();
        other.cancel_hash = [0; 32];
        assert_eq!(
            node.accept_hold_part(other),
            Err(TimerError::Hold(HoldError::Mismatch))
        );
    }
    // On disk: one deferred send, under the hold id, due at the release time.
    let store = RocksStore::open(&dir.path().join("db"), RocksOptions::default()).unwrap();
    let queue =
        TimerQueue::open(QueueConfig::default(), store, ChaCha20Rng::seed_from_u64(1)).unwrap();
    assert_eq!(queue.len(), 1);
    let id = TaskId(h.id.0);
    let meta = queue.task(&id).unwrap();
    assert_eq!(meta.category, Category::DeferredSend);
    assert_eq!(meta.due_at, h.parts[0].release_at);
    let stored = DeferredSend::decode(&queue.payload(&id).unwrap()).unwrap();
    assert_eq!(stored.first_hop, h.first_hop);
    assert_eq!(stored.cancel_hash, h.parts[0].cancel_hash);
    assert_eq!(stored.packet.as_bytes(), h.packet.as_slice());
}

#[test]
fn the_fired_deferred_send_carries_the_reassembled_packet_exactly() {
    let dir = TempDir::new().unwrap();
    let node = Running::start(dir.path());
    let h = hold(2, in_ms(1500), 4);
    for i in [3, 1, 0] {
        assert_eq!(
            node.node.accept_hold_part(h.parts[i].clone()).unwrap(),
            HoldOutcome::Incomplete
        );
    }
    assert!(matches!(
        node.node.accept_hold_part(h.parts[2].clone()).unwrap(),
        HoldOutcome::Scheduled { .. }
    ));
    // Not before its release time: nothing was injected by a moment before it (on a machine so
    // slow that this runs after it, the injection time below still tells).
    let early = node.recorder.sent();
    if now() < h.parts[0].release_at {
        assert!(early.is_empty(), "not before its release time");
    }
    let sent = node.wait_for_sent(1, WAIT);
    assert!(now() >= h.parts[0].release_at);
    assert_eq!(sent.len(), 1);
    assert!(
        node.recorder.injected_at()[0] >= h.parts[0].release_at,
        "injected before its release time"
    );
    assert_eq!(sent[0].first_hop, h.first_hop);
    assert_eq!(sent[0].cancel_hash, h.parts[0].cancel_hash);
    assert_eq!(sent[0].packet.as_bytes(), h.packet.as_slice());
    // Fired once, then gone: once its injection is over, a cancel finds nothing; and after the
    // worker stopped, it was injected once.
    assert_eq!(
        cancel_when_not_injected(&node.node, h.id, &h.capability),
        Err(TimerError::NotFound)
    );
    let recorder = node.recorder.clone();
    node.stop();
    assert_eq!(recorder.sent().len(), 1);
}

#[test]
fn a_wrong_capability_is_refused_and_the_hold_still_fires() {
    let dir = TempDir::new().unwrap();
    // The worker starts after the checks below: until then the hold cannot fire, however
    // long they take.
    let (node, recorder) = open_recording(dir.path());
    let h = hold(3, in_ms(800), 3);
    for part in &h.parts {
        node.accept_hold_part(part.clone()).unwrap();
    }
    let mut wrong = h.capability;
    wrong.0[31] ^= 1;
    assert_eq!(
        node.cancel_hold(h.id, &wrong),
        Err(TimerError::BadCapability)
    );
    assert_eq!(
        node.cancel_hold(h.id, &CancelCapability([0; 32])),
        Err(TimerError::BadCapability)
    );
    // Still stored: a retransmitted part is acknowledged.
    assert!(matches!(
        node.accept_hold_part(h.parts[0].clone()).unwrap(),
        HoldOutcome::AlreadyScheduled { .. }
    ));
    let node = Running::with_worker(node, recorder);
    let sent = node.wait_for_sent(1, WAIT);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].packet.as_bytes(), h.packet.as_slice());
    node.stop();
}

#[test]
fn the_right_capability_cancels_and_the_hold_never_fires() {
    let dir = TempDir::new().unwrap();
    // The worker starts once the hold is cancelled: until then nothing can fire, however long
    // the steps below take (the cancelled hold is due in 600 ms).
    let (node, recorder) = open_recording(dir.path());
    let cancelled = hold(4, in_ms(600), 3);
    let kept = hold(5, in_ms(900), 2);
    for part in cancelled.parts.iter().chain(&kept.parts) {
        node.accept_hold_part(part.clone()).unwrap();
    }
    // Unknown hold.
    assert_eq!(
        node.cancel_hold(HoldId([0xFF; 16]), &cancelled.capability),
        Err(TimerError::NotFound)
    );
    // Another hold's capability does not cancel this one.
    assert_eq!(
        node.cancel_hold(cancelled.id, &kept.capability),
        Err(TimerError::BadCapability)
    );
    assert_eq!(
        node.cancel_hold(cancelled.id, &cancelled.capability),
        Ok(CancelOutcome::Cancelled {
            hold_id: cancelled.id
        })
    );
    // A cancel sent again is acknowledged again; a wrong capability still is not.
    assert_eq!(
        node.cancel_hold(cancelled.id, &cancelled.capability),
        Ok(CancelOutcome::Cancelled {
            hold_id: cancelled.id
        })
    );
    assert_eq!(
        node.cancel_hold(cancelled.id, &kept.capability),
        Err(TimerError::BadCapability)
    );
    // A late retransmission of a part does not bring the hold back.
    for part in &cancelled.parts {
        assert!(matches!(
            node.accept_hold_part(part.clone()),
            Ok(HoldOutcome::Cancelled { hold_id, .. }) if hold_id == cancelled.id
        ));
    }
    // The other hold fires; by then the cancelled one was due too (the worker fires in due
    // order), and never fired.
    let node = Running::with_worker(node, recorder);
    let sent = node.wait_for_sent(1, WAIT);
    assert_eq!(sent.len(), 1);
    assert!(now() > cancelled.parts[0].release_at);
    assert_eq!(sent[0].packet.as_bytes(), kept.packet.as_slice());
    // Once the kept hold's injection is over (it is then gone), the worker is stopped: nothing
    // else was injected while it ran.
    assert_eq!(
        cancel_when_not_injected(&node.node, kept.id, &kept.capability),
        Err(TimerError::NotFound)
    );
    let recorder = node.recorder.clone();
    node.stop();
    assert_eq!(recorder.sent(), sent);
    // Not on disk either.
    let store = RocksStore::open(&dir.path().join("db"), RocksOptions::default()).unwrap();
    let queue =
        TimerQueue::open(QueueConfig::default(), store, ChaCha20Rng::seed_from_u64(1)).unwrap();
    // Only the cancelled hold's tombstone is left, in the hold's own place (until its release
    // time plus the late window); no packet.
    let left: Vec<Category> = [TaskId(cancelled.id.0), TaskId(kept.id.0)]
        .iter()
        .filter_map(|id| queue.task(id).map(|t| t.category))
        .collect();
    assert_eq!(left, vec![Category::DeferredSend]);
    assert_eq!(queue.len(), 1);
    let tombstone = queue.payload(&TaskId(cancelled.id.0)).unwrap();
    assert!(DeferredSend::decode(&tombstone).is_err(), "no packet left");
}

/// An injector that records the first hop of what it is given, signals when it is called,
/// waits to be released, then fails (the first hop is unreachable).
struct Gate {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
    calls: AtomicUsize,
    first_hops: Mutex<Vec<NodeId>>,
}

impl PacketInjector for Gate {
    fn inject(&self, send: DeferredSend) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.first_hops.lock().unwrap().push(send.first_hop);
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv_timeout(WAIT);
        Err("first hop unreachable".into())
    }
}

#[test]
fn a_hold_being_injected_cannot_be_cancelled_but_one_waiting_to_retry_can() {
    let dir = TempDir::new().unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
        calls: AtomicUsize::new(0),
        first_hops: Mutex::new(Vec::new()),
    });
    let mut config = config(dir.path());
    // The retry after a failed injection comes 3 s later: ample time for the cancel below,
    // however slow the machine.
    config.queue.backoff_base_ms = 3_000;
    let node = TimerNode::open(config, gate.clone()).unwrap();
    let (stop, runtime) = spawn_worker(&node);
    let h = hold(11, in_ms(300), 1);
    node.accept_hold_part(h.parts[0].clone()).unwrap();
    entered.recv_timeout(WAIT).unwrap();
    // Being injected: it may be on its way, so the cancel is refused (and checked first).
    assert_eq!(
        node.cancel_hold(h.id, &CancelCapability([0; 32])),
        Err(TimerError::BadCapability)
    );
    assert_eq!(
        node.cancel_hold(h.id, &h.capability),
        Err(TimerError::WrongState("being injected"))
    );
    // The injection fails; the hold waits for its retry (3 s back-off) and can be cancelled.
    release.send(()).unwrap();
    assert_eq!(
        cancel_when_not_injected(&node, h.id, &h.capability),
        Ok(CancelOutcome::Cancelled { hold_id: h.id })
    );
    // No retry after the cancel: another hold, due 1 s after the retry would have been, is
    // the next (and only other) packet the worker injects.
    let witness = hold(12, in_ms(4_000), 1);
    node.accept_hold_part(witness.parts[0].clone()).unwrap();
    entered.recv_timeout(WAIT).unwrap();
    assert_eq!(
        *gate.first_hops.lock().unwrap(),
        vec![h.first_hop, witness.first_hop],
        "no retry after the cancel"
    );
    assert_eq!(gate.calls.load(Ordering::SeqCst), 2);
    release.send(()).unwrap();
    let _ = stop.send(());
    runtime.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn a_hold_still_being_assembled_can_be_cancelled() {
    let dir = TempDir::new().unwrap();
    let node = TimerNode::open(config(dir.path()), Arc::new(Recorder::default())).unwrap();
    let h = hold(6, in_ms(3_600_000), 3);
    node.accept_hold_part(h.parts[0].clone()).unwrap();
    node.accept_hold_part(h.parts[1].clone()).unwrap();
    assert_eq!(
        node.cancel_hold(h.id, &CancelCapability([1; 32])),
        Err(TimerError::BadCapability)
    );
    assert_eq!(
        node.cancel_hold(h.id, &h.capability),
        Ok(CancelOutcome::PartialDiscarded { hold_id: h.id })
    );
    // Its parts no longer complete it: its tombstone answers them "cancelled".
    for part in &h.parts {
        assert!(matches!(
            node.accept_hold_part(part.clone()),
            Ok(HoldOutcome::Cancelled { hold_id, .. }) if hold_id == h.id
        ));
    }
    // A cancel sent again is acknowledged again; a wrong capability still is not.
    assert_eq!(
        node.cancel_hold(h.id, &h.capability),
        Ok(CancelOutcome::Cancelled { hold_id: h.id })
    );
    assert_eq!(
        node.cancel_hold(h.id, &CancelCapability([1; 32])),
        Err(TimerError::BadCapability)
    );
}

#[test]
fn release_times_outside_the_window_and_bad_parts_are_refused() {
    let dir = TempDir::new().unwrap();
    let node = TimerNode::open(config(dir.path()), Arc::new(Recorder::default())).unwrap();
    let far = hold(7, in_ms(24 * 3600 * 1000 + 60_000), 1);
    assert_eq!(
        node.accept_hold_part(far.parts[0].clone()),
        Err(TimerError::Hold(HoldError::ReleaseTooFar {
            max_ms: 24 * 3600 * 1000
        }))
    );
    let late = hold(8, UnixTime(now().0 - 2 * 3600 * 1000), 1);
    assert_eq!(
        node.accept_hold_part(late.parts[0].clone()),
        Err(TimerError::Hold(HoldError::ReleaseTooLate {
            max_ms: 3600 * 1000
        }))
    );
    // Slightly late is fine: it fires at once.
    let slightly = hold(9, UnixTime(now().0 - 60_000), 1);
    assert!(matches!(
        node.accept_hold_part(slightly.parts[0].clone()).unwrap(),
        HoldOutcome::Scheduled { .. }
    ));
    let mut bad = hold(10, in_ms(60_000), 2).parts.remove(0);
    bad.part_index = 2;
    assert_eq!(
        node.accept_hold_part(bad),
        Err(TimerError::Hold(HoldError::PartOutOfRange))
    );
    assert!(TimerError::Hold(HoldError::Mismatch).is_caller_error());
    assert!(TimerError::BadCapability.is_caller_error());
}

#[test]
fn holds_config_is_a_table_with_unknown_keys_refused() {
    let dir = TempDir::new().unwrap();
    let base = format!(
        "data_dir = \"{}\"\n[admin]\ntoken = \"test-admin-token-0123456789abcdefghijklmnop\"\n",
        dir.path().display()
    );
    let path = dir.path().join("timer.toml");
    std::fs::write(
        &path,
        format!("{base}[holds]\npartial_max = 5\nrelease_ahead_max_ms = 1000\n"),
    )
    .unwrap();
    let config = NodeConfig::load(&path).unwrap();
    assert_eq!(config.holds.partial_max, 5);
    assert_eq!(config.holds.release_ahead_max_ms, 1000);
    assert_eq!(config.holds.partial_ttl_secs, 600);
    std::fs::write(&path, format!("{base}[holds]\npartial_maxx = 5\n")).unwrap();
    assert!(NodeConfig::load(&path).is_err());
    std::fs::write(&path, format!("{base}[holds]\npartial_ttl_secs = 0\n")).unwrap();
    assert_eq!(
        NodeConfig::load(&path).unwrap_err().key,
        "holds.partial_ttl_secs"
    );
}

/// Security review, finding 14: anyone could fill the table of partial holds with first parts
/// (10,000 at 600 s each, about 17 parts/s), after which every new hold of two parts or more
/// was refused. A full table now makes room by dropping its oldest partial hold (counted), so
/// a flood has to outpace the few seconds between the parts of a real hold.
#[test]
fn a_flood_of_first_parts_does_not_lock_out_a_fresh_hold() {
    let dir = TempDir::new().unwrap();
    let node = TimerNode::open(config(dir.path()), Arc::new(Recorder::default())).unwrap();
    let partial_max = HoldConfig::default().partial_max;
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let release_at = in_ms(3_600_000);
    for _ in 0..partial_max {
        let id: [u8; 16] = rand::RngExt::random(&mut rng);
        let part = HeldPacketPart {
            hold_id: HoldId(id),
            part_index: 0,
            part_count: 2,
            release_at,
            cancel_hash: [0; 32],
            first_hop: NodeId([1; 32]),
            data: vec![0; PACKET_SIZE / 2],
            ack_surb: None,
        };
        assert_eq!(
            node.accept_hold_part(part).unwrap(),
            HoldOutcome::Incomplete
        );
    }
    let fresh = hold(30, release_at, 2);
    assert_eq!(
        node.accept_hold_part(fresh.parts[0].clone()),
        Ok(HoldOutcome::Incomplete),
        "a fresh hold's first part is refused once attackers filled the partial table"
    );
    assert!(matches!(
        node.accept_hold_part(fresh.parts[1].clone()),
        Ok(HoldOutcome::Scheduled { hold_id, .. }) if hold_id == fresh.id
    ));
}

/// Security review, finding 14: the tombstone of a cancelled hold was a task of the shared
/// maintenance queue, written after the cancel and skipped when that queue was full. The
/// cancel was acknowledged anyway, and the hold's parts sent again rebuilt it: the "cancelled"
/// message was delivered. The tombstone now takes the hold's own place, in the same write.
#[test]
fn a_cancelled_hold_stays_cancelled_when_the_maintenance_queue_is_full() {
    let dir = TempDir::new().unwrap();
    // The maintenance queue (one task at most here) is full.
    {
        let store = RocksStore::open(&dir.path().join("db"), RocksOptions::default()).unwrap();
        let mut queue =
            TimerQueue::open(QueueConfig::default(), store, ChaCha20Rng::seed_from_u64(2)).unwrap();
        queue
            .schedule(
                now(),
                whispr_timer_service::task::NewTask {
                    category: Category::Maintenance,
                    priority: 0,
                    due_at: in_ms(24 * 3600 * 1000),
                    payload: b"noop".to_vec(),
                    owner: None,
                },
            )
            .unwrap();
    }
    let mut config = config(dir.path());
    config.queue.queue_tasks_max = 1;
    let node = TimerNode::open(config, Arc::new(Recorder::default())).unwrap();
    let victim = hold(32, in_ms(3_600_000), 2);
    for part in &victim.parts {
        node.accept_hold_part(part.clone()).unwrap();
    }
    assert_eq!(
        node.cancel_hold(victim.id, &victim.capability),
        Ok(CancelOutcome::Cancelled { hold_id: victim.id })
    );
    // Both parts sent again (late retransmissions still in the mixes, or an attacker who
    // recorded them) must not bring the cancelled hold back.
    for part in &victim.parts {
        let outcome = node.accept_hold_part(part.clone());
        assert!(
            matches!(outcome, Ok(HoldOutcome::Cancelled { .. })),
            "a part of a cancelled hold gave {outcome:?}"
        );
    }
}

/// Security review, finding 14: a hold cancelled while its parts were still arriving left no
/// trace, so its parts arriving (again) after the cancel rebuilt it and it was delivered.
#[test]
fn a_hold_cancelled_while_being_assembled_cannot_be_rebuilt_by_late_parts() {
    let dir = TempDir::new().unwrap();
    let node = TimerNode::open(config(dir.path()), Arc::new(Recorder::default())).unwrap();
    let h = hold(33, in_ms(3_600_000), 2);
    assert_eq!(
        node.accept_hold_part(h.parts[0].clone()),
        Ok(HoldOutcome::Incomplete)
    );
    assert_eq!(
        node.cancel_hold(h.id, &h.capability),
        Ok(CancelOutcome::PartialDiscarded { hold_id: h.id })
    );
    for part in &h.parts {
        let outcome = node.accept_hold_part(part.clone());
        assert!(
            matches!(outcome, Ok(HoldOutcome::Cancelled { hold_id, .. }) if hold_id == h.id),
            "a late part of a hold cancelled while being assembled gave {outcome:?}"
        );
    }
}

/// Security review, finding 14: held sends and tombstones are bounded by `holds.held_max`
/// (the deferred-send queue held up to `queue.queue_tasks_max`, a million, before). The
/// cancel of a stored hold needs no room (its tombstone takes its place); the cancel of a
/// hold being assembled does, and is refused (unacknowledged: the sender retries) without it.
#[test]
fn held_sends_and_tombstones_are_bounded_by_holds_held_max() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.holds.held_max = 2;
    let node = TimerNode::open(config, Arc::new(Recorder::default())).unwrap();
    let release_at = in_ms(3_600_000);
    let (a, b, c) = (
        hold(40, release_at, 1),
        hold(41, release_at, 1),
        hold(42, release_at, 2),
    );
    for h in [&a, &b] {
        assert!(matches!(
            node.accept_hold_part(h.parts[0].clone()),
            Ok(HoldOutcome::Scheduled { .. })
        ));
    }
    // A hold being assembled takes no place yet, but cannot be stored once complete.
    assert_eq!(
        node.accept_hold_part(c.parts[0].clone()),
        Ok(HoldOutcome::Incomplete)
    );
    assert_eq!(
        node.cancel_hold(c.id, &c.capability),
        Err(TimerError::HoldsFull { max: 2 })
    );
    assert_eq!(
        node.accept_hold_part(c.parts[1].clone()),
        Err(TimerError::HoldsFull { max: 2 })
    );
    // A stored hold is cancelled in place, full or not.
    assert_eq!(
        node.cancel_hold(a.id, &a.capability),
        Ok(CancelOutcome::Cancelled { hold_id: a.id })
    );
    assert!(matches!(
        node.accept_hold_part(a.parts[0].clone()),
        Ok(HoldOutcome::Cancelled { .. })
    ));
    assert!(TimerError::HoldsFull { max: 2 }.is_caller_error());
}
