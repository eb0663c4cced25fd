//! Nodes that pin directory authorities (`mesh.network_file`): three honest in-process nodes
//! (edge, layer-1 mix, destination) and a self-signed "Sybil" mix that gossips its descriptor
//! like any node. A stand-in authority serves a consensus signed by the three pinned keys
//! that lists the honest nodes only. The honest nodes route by the consensus alone (the
//! Sybil is heard over gossip but never routed to), mirror it at `consensus_bytes`, and
//! refuse the Sybil's packet streams. The destination (a mailbox-role node) accepts
//! node-to-node messages from the members only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use whispr_node_kit::clock::now;
use whispr_protocol::consensus::{Authority, Consensus, ConsensusBody, Network};
use whispr_protocol::directory::{DIRECTORY_LEN_MAX, Directory, Role, SignedDescriptor};
use whispr_protocol::sphinx::{Packet, RouteHop, build_packet};
use whispr_protocol::{DestinationAddress, KeyEpoch, NodeId, UnixTime};
use whispr_relay::config::{MeshConfig, RelayRole};
use whispr_relay::mesh::{LocalDestination, Mesh, MeshError, MeshHandle, MeshOptions, NodeMessage};
use whispr_relay::router::{Delivery, DropReason, RouterConfig};

/// Longest wait for anything the mesh does on its own time (generous: a deadline costs time
/// only when the test fails).
const WAIT: Duration = Duration::from_secs(120);

struct Recorder(mpsc::UnboundedSender<Delivery>);

impl LocalDestination for Recorder {
    fn deliver(&self, delivery: Delivery) {
        let _ = self.0.send(delivery);
    }
}

struct Node {
    handle: MeshHandle,
    /// The node messages received (nodes with the mailbox role only).
    messages: Option<mpsc::Receiver<NodeMessage>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), MeshError>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("mesh stops")
            .unwrap()
            .unwrap();
    }
}

fn config(
    roles: Vec<RelayRole>,
    mix_layer: u32,
    edge: bool,
    bootstrap: &[String],
    network_file: Option<&std::path::Path>,
) -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        bootstrap: bootstrap.to_vec(),
        roles,
        mix_layer,
        descriptor_publish_ms: 300,
        descriptor_validity_ms: 600_000,
        network_file: network_file.map(|p| p.to_path_buf()),
        consensus_poll_ms: 200,
        router: RouterConfig {
            edge,
            ..RouterConfig::default()
        },
        ..MeshConfig::default()
    }
}

fn start(
    config: MeshConfig,
    extra_roles: Vec<Role>,
    destination: Option<Arc<dyn LocalDestination>>,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let accepts_messages = extra_roles.contains(&Role::Mailbox);
    let (handle, mut runner) = Mesh::new(MeshOptions {
        config,
        data_dir: dir.path().to_path_buf(),
        extra_roles,
    })
    .unwrap();
    let messages = accepts_messages.then(|| runner.accept_node_messages().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(destination, async {
        let _ = stopped.await;
    }));
    Node {
        handle,
        messages,
        stop,
        task,
        _dir: dir,
    }
}

fn bootstrap_addr(handle: &MeshHandle) -> String {
    format!("{}/p2p/{}", handle.listen_addrs()[0], handle.peer_id())
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hop(directory: &Directory, node: NodeId, epoch: KeyEpoch) -> RouteHop {
    let descriptor = directory.get(&node).expect("node in the directory");
    RouteHop {
        node,
        sphinx_key: *descriptor.sphinx_key(epoch).expect("key for the epoch"),
    }
}

fn packet(route: &[RouteHop], destination: DestinationAddress, plaintext: &[u8]) -> Packet {
    let delays = vec![Duration::ZERO; route.len() - 1];
    build_packet(&mut rand::rng(), route, &delays, destination, plaintext).unwrap()
}

/// The signed descriptors a node gossips (its `GET /v1/directory`).
fn gossiped(handle: &MeshHandle) -> Vec<SignedDescriptor> {
    let wire: whispr_protocol::wire::Directory =
        whispr_protocol::wire::decode(&handle.directory_bytes(), DIRECTORY_LEN_MAX).unwrap();
    wire.descriptors.into_iter().map(SignedDescriptor).collect()
}

type Served = Arc<Mutex<Option<Vec<u8>>>>;

async fn serve_consensus(State(served): State<Served>) -> Response {
    match served.lock().unwrap().clone() {
        Some(bytes) => bytes.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sybil_outside_the_consensus_is_not_routed_to_and_its_streams_are_refused() {
    // The stand-in authority (all three pinned URLs point at it; it serves the document
    // the three of them signed).
    let served: Served = Arc::new(Mutex::new(None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/v1/consensus", axum::routing::get(serve_consensus))
        .with_state(served.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let keys: Vec<SigningKey> = (1..=3u8)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect();
    let network = Network::new(
        keys.iter()
            .map(|k| Authority {
                key: k.verifying_key().to_bytes(),
                url: url.clone(),
            })
            .collect(),
        None,
    )
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let network_file = files.path().join("network");
    std::fs::write(&network_file, network.to_text()).unwrap();
    let pinned = Some(network_file.as_path());

    let edge = start(
        config(vec![RelayRole::Edge], 0, true, &[], pinned),
        vec![],
        None,
    );
    let bootstrap = [bootstrap_addr(&edge.handle)];
    let mix = start(
        config(vec![RelayRole::Mix], 1, false, &bootstrap, pinned),
        vec![],
        None,
    );
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let mut destination = start(
        config(vec![], 0, false, &bootstrap, pinned),
        vec![Role::Mailbox],
        Some(Arc::new(Recorder(deliveries_tx))),
    );
    // The Sybil: a well-formed, self-signed mix of layer 1 that pins nothing.
    let sybil = start(
        config(vec![RelayRole::Mix], 1, false, &bootstrap, None),
        vec![],
        None,
    );
    let honest = [&edge.handle, &mix.handle, &destination.handle];
    assert!(honest.iter().all(|h| h.is_pinned()) && !sybil.handle.is_pinned());

    // Gossip reaches everyone, the Sybil's descriptor included; a pinned node routes by
    // nothing until it holds a consensus.
    eventually("the four descriptors gossiped", || {
        gossiped(&edge.handle).len() == 4 && sybil.handle.directory().len() == 4
    })
    .await;
    assert!(honest.iter().all(|h| h.directory().is_empty()));
    assert!(edge.handle.consensus_bytes().is_none());

    // The authorities admit the honest nodes only.
    let honest_ids: Vec<NodeId> = honest.iter().map(|h| h.node_id()).collect();
    let at = now();
    let mut admitted: Vec<SignedDescriptor> = gossiped(&edge.handle)
        .into_iter()
        .filter(|d| honest_ids.contains(&d.verify(at).unwrap().node_id))
        .collect();
    admitted.sort_by_key(|d| d.verify(at).unwrap().node_id);
    assert_eq!(admitted.len(), 3);
    let body = ConsensusBody {
        epoch: 1,
        valid_after: at,
        valid_until: UnixTime(at.0 + 600_000),
        descriptors: admitted,
    };
    let mut consensus = Consensus::new(&body);
    for key in &keys {
        consensus.sign(key);
    }
    let bytes = consensus.encode();
    *served.lock().unwrap() = Some(bytes.clone());

    eventually("the consensus fetched by the honest nodes", || {
        honest.iter().all(|h| h.directory().len() == 3)
    })
    .await;
    let sybil_id = sybil.handle.node_id();
    for h in honest {
        let directory = h.directory();
        assert!(
            directory.get(&sybil_id).is_none(),
            "the Sybil is not routable"
        );
        let info = directory
            .consensus()
            .expect("a directory from the consensus");
        assert_eq!((info.epoch, info.signers, info.authorities), (1, 3, 3));
        assert_eq!(h.consensus_bytes().as_deref(), Some(bytes.as_slice()));
        // The gossiped descriptors are still kept (for the authorities to read).
        assert_eq!(gossiped(h).len(), 4);
    }

    // An honest route is carried.
    let epoch = KeyEpoch::containing(
        now(),
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let directory = edge.handle.directory();
    let address = DestinationAddress([7u8; 32]);
    let honest_route = [
        hop(&directory, edge.handle.node_id(), epoch),
        hop(&directory, mix.handle.node_id(), epoch),
        hop(&directory, destination.handle.node_id(), epoch),
    ];
    let client = edge.handle.new_client_id();
    assert_eq!(
        edge.handle
            .submit_client(
                client,
                packet(&honest_route, address, b"honest").into_bytes()
            )
            .await,
        Ok(())
    );
    match tokio::time::timeout(WAIT, deliveries.recv()).await.unwrap() {
        Some(Delivery::Final { plaintext, .. }) => assert_eq!(plaintext, b"honest"),
        other => panic!("unexpected delivery {other:?}"),
    }

    // A route through the Sybil (as a client holding a gossip directory would build it) is
    // refused by the edge: the Sybil is no next hop.
    let gossip = sybil.handle.directory();
    let sybil_route = [
        hop(&directory, edge.handle.node_id(), epoch),
        hop(&gossip, sybil_id, epoch),
        hop(&directory, destination.handle.node_id(), epoch),
    ];
    assert_eq!(
        edge.handle
            .submit_client(client, packet(&sybil_route, address, b"sybil").into_bytes())
            .await,
        Err(DropReason::UnknownNextHop)
    );
    // Nor can a local send pick it as first hop.
    assert!(matches!(
        edge.handle
            .send(sybil_id, packet(&sybil_route[1..], address, b"sybil")),
        Err(MeshError::UnknownHop)
    ));

    // The Sybil's own packet streams are refused; a member's are taken.
    let to_destination = [hop(&directory, destination.handle.node_id(), epoch)];
    let from_sybil = sybil
        .handle
        .send_acknowledged(
            destination.handle.node_id(),
            packet(&to_destination, address, b"from the sybil"),
        )
        .await;
    assert!(
        matches!(from_sybil, Err(MeshError::Unreachable(_))),
        "the Sybil's stream must be refused: {from_sybil:?}"
    );
    assert!(
        !destination
            .handle
            .metrics_text()
            .contains("whispr_mesh_peer_streams_refused_total 0\n"),
        "the refusal is counted"
    );
    mix.handle
        .send_acknowledged(
            destination.handle.node_id(),
            packet(&to_destination, address, b"from a member"),
        )
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, deliveries.recv()).await.unwrap() {
        Some(Delivery::Final { plaintext, .. }) => assert_eq!(plaintext, b"from a member"),
        other => panic!("unexpected delivery {other:?}"),
    }

    // Node messages: a member's reach the destination with the member's node id; the
    // Sybil (which has the destination in its gossip directory) has its stream refused.
    let mut inbox = destination.messages.take().unwrap();
    mix.handle
        .send_node_message(destination.handle.node_id(), b"replica".to_vec())
        .unwrap();
    let (from, bytes) = tokio::time::timeout(WAIT, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (from, bytes.as_slice()),
        (mix.handle.node_id(), &b"replica"[..])
    );
    sybil
        .handle
        .send_node_message(destination.handle.node_id(), b"forged replica".to_vec())
        .unwrap();
    let refused = "whispr_mesh_node_message_streams_closed_total{reason=\"not_member\"} ";
    eventually("the Sybil's node-message stream refused", || {
        let text = destination.handle.metrics_text();
        text.contains(refused) && !text.contains(&format!("{refused}0\n"))
    })
    .await;
    assert!(inbox.try_recv().is_err(), "nothing from the Sybil");

    sybil.stop().await;
    for node in [edge, mix, destination] {
        node.stop().await;
    }
    server.abort();
}
