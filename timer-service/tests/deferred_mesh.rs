//! Deferred sends through a real mesh (in-process nodes on 127.0.0.1): a timer node completes
//! a released hold only once its first hop has accepted the packet; while the first hop is
//! unreachable the hold is kept and retried (security review, finding 9).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use whispr_node_kit::clock::now;
use whispr_protocol::directory::{Directory, Role};
use whispr_protocol::payload::HeldPacketPart;
use whispr_protocol::sphinx::{Packet, RouteHop, build_packet};
use whispr_protocol::{CancelCapability, DestinationAddress, HoldId, KeyEpoch, NodeId, UnixTime};
use whispr_relay::config::{MeshConfig, RelayRole};
use whispr_relay::mesh::{LocalDestination, Mesh, MeshError, MeshHandle, MeshOptions};
use whispr_relay::router::{Delivery, RouterConfig};
use whispr_timer_service::TimerError;
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::deferred::{DeferredSend, PacketInjector};
use whispr_timer_service::holds::HoldConfig;
use whispr_timer_service::mesh::MeshInjector;
use whispr_timer_service::node::{
    AdminConfig, CancelOutcome, HoldOutcome, LogConfig, NodeConfig, TimerNode, WorkerConfig,
};

/// Longest wait for anything the mesh or the worker does on its own time. Generous: on a
/// loaded machine these can take many seconds, and a deadline costs time only when the test
/// fails.
const WAIT: Duration = Duration::from_secs(120);

/// Records what reaches the timer's mesh as a final payload.
struct Recorder(mpsc::UnboundedSender<Delivery>);

impl LocalDestination for Recorder {
    fn deliver(&self, delivery: Delivery) {
        let _ = self.0.send(delivery);
    }
}

/// The real injector, reporting each attempt's result to the test.
struct Observed {
    inner: MeshInjector,
    results: Mutex<std::sync::mpsc::Sender<Result<(), String>>>,
}

impl PacketInjector for Observed {
    fn inject(&self, send: DeferredSend) -> Result<(), String> {
        let result = self.inner.inject(send);
        let _ = self.results.lock().unwrap().send(result.clone());
        result
    }
}

struct Node {
    handle: MeshHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), MeshError>>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(
        config: MeshConfig,
        extra_roles: Vec<Role>,
        destination: Option<Arc<dyn LocalDestination>>,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
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
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("mesh stops within 120 s")
            .unwrap()
            .unwrap();
    }
}

fn mesh_config(roles: Vec<RelayRole>, mix_layer: u32, bootstrap: &[String]) -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        bootstrap: bootstrap.to_vec(),
        roles,
        mix_layer,
        descriptor_publish_ms: 300,
        descriptor_validity_ms: 600_000,
        router: RouterConfig::default(),
        ..MeshConfig::default()
    }
}

fn timer_config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        admin: AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: "test-admin-token-0123456789abcdefghijklmnop".into(),
            allow_non_loopback: false,
        },
        log: LogConfig::default(),
        queue: QueueConfig {
            rng_seed: Some(9),
            // The retry after a failed injection comes 5 s later: ample time to look at the
            // hold in between, however slow the machine.
            backoff_base_ms: 5_000,
            ..QueueConfig::default()
        },
        worker: WorkerConfig {
            idle_poll_ms: 20,
            ..WorkerConfig::default()
        },
        holds: HoldConfig::default(),
        mesh: None,
        backup: Default::default(),
    }
}

async fn wait_for_directories(nodes: &[&MeshHandle], size: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !nodes.iter().all(|n| n.directory().len() == size) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "directories did not reach {size} nodes in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hop(directory: &Directory, node: NodeId, epoch: KeyEpoch) -> RouteHop {
    RouteHop {
        node,
        sphinx_key: *directory
            .get(&node)
            .expect("node in the directory")
            .sphinx_key(epoch)
            .expect("key for the epoch"),
    }
}

/// A one-part hold of `packet` for `first_hop`, due now.
fn hold(
    seed: u8,
    first_hop: NodeId,
    packet: &Packet,
) -> (HoldId, CancelCapability, HeldPacketPart) {
    let id = HoldId([seed; 16]);
    let capability = CancelCapability([seed; 32]);
    let part = HeldPacketPart {
        hold_id: id,
        part_index: 0,
        part_count: 1,
        release_at: UnixTime(now().0),
        cancel_hash: Sha256::digest(capability.as_bytes()).into(),
        first_hop,
        data: packet.as_bytes().to_vec(),
        ack_surb: None,
    };
    (id, capability, part)
}

/// The next injection attempt's result, waited for on a blocking thread.
async fn next_attempt(
    results: &Arc<Mutex<std::sync::mpsc::Receiver<Result<(), String>>>>,
) -> Result<(), String> {
    let results = results.clone();
    tokio::task::spawn_blocking(move || results.lock().unwrap().recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("an injection attempt within 120 s")
}

/// Cancels hold `id` once it is not being injected; the outcome.
async fn cancel_when_not_injected(
    node: &TimerNode,
    id: HoldId,
    capability: &CancelCapability,
) -> Result<CancelOutcome, TimerError> {
    let until = Instant::now() + WAIT;
    loop {
        match node.cancel_hold(id, capability) {
            Err(TimerError::WrongState(_)) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_hold_is_completed_only_once_its_first_hop_accepted_it() {
    // A mix (the held packets' first hop) and the timer node's mesh, which records the final
    // payloads it receives: a held packet goes timer → mix → timer.
    let mix = Node::start(mesh_config(vec![RelayRole::Mix], 1, &[]), vec![], None);
    let addrs = mix.handle.listen_addrs();
    let bootstrap = [format!("{}/p2p/{}", addrs[0], mix.handle.peer_id())];
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let timer_mesh = Node::start(
        mesh_config(vec![], 0, &bootstrap),
        vec![Role::Timer],
        Some(Arc::new(Recorder(deliveries_tx))),
    );
    wait_for_directories(&[&mix.handle, &timer_mesh.handle], 2).await;
    let directory = timer_mesh.handle.directory();
    let epoch = KeyEpoch::containing(
        now(),
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let route = [
        hop(&directory, mix.handle.node_id(), epoch),
        hop(&directory, timer_mesh.handle.node_id(), epoch),
    ];
    let packet = |text: &[u8]| {
        build_packet(
            &mut rand::rng(),
            &route,
            &[Duration::ZERO],
            DestinationAddress([7; 32]),
            text,
        )
        .unwrap()
    };

    let dir = tempfile::tempdir().unwrap();
    let (results_tx, results) = std::sync::mpsc::channel();
    let results = Arc::new(Mutex::new(results));
    let injector = Arc::new(Observed {
        inner: MeshInjector::new(timer_mesh.handle.clone()),
        results: Mutex::new(results_tx),
    });
    let node = TimerNode::open(timer_config(dir.path()), injector).unwrap();
    let (stop_worker, worker_stopped) = oneshot::channel::<()>();
    let worker = {
        let node = node.clone();
        tokio::spawn(async move {
            node.run_worker(async move {
                let _ = worker_stopped.await;
            })
            .await;
        })
    };

    // First hop up: the hold is injected, accepted, completed, and the packet goes through.
    let (id, capability, part) = hold(1, mix.handle.node_id(), &packet(b"first hop up"));
    assert!(matches!(
        node.accept_hold_part(part),
        Ok(HoldOutcome::Scheduled { .. })
    ));
    assert_eq!(next_attempt(&results).await, Ok(()));
    match tokio::time::timeout(WAIT, deliveries.recv()).await {
        Ok(Some(Delivery::Final { plaintext, .. })) => assert_eq!(plaintext, b"first hop up"),
        other => panic!("no delivery through the first hop: {other:?}"),
    }
    assert_eq!(
        cancel_when_not_injected(&node, id, &capability).await,
        Err(TimerError::NotFound),
        "an accepted hold is completed"
    );

    // First hop down (still in the directory): the attempt fails and the hold is kept for
    // its retry, instead of being completed on the local enqueue and lost.
    let mix_id = mix.handle.node_id();
    mix.stop().await;
    assert!(timer_mesh.handle.directory().get(&mix_id).is_some());
    let (id, capability, part) = hold(2, mix_id, &packet(b"first hop down"));
    assert!(matches!(
        node.accept_hold_part(part),
        Ok(HoldOutcome::Scheduled { .. })
    ));
    let attempt = next_attempt(&results).await;
    assert!(
        attempt.is_err(),
        "the injection of a hold whose first hop is down reported success: {attempt:?}"
    );
    assert_eq!(
        cancel_when_not_injected(&node, id, &capability).await,
        Ok(CancelOutcome::Cancelled { hold_id: id }),
        "the hold waits for its retry"
    );

    let _ = stop_worker.send(());
    worker.await.unwrap();
    timer_mesh.stop().await;
}
