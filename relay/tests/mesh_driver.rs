//! The mesh driver over real sockets: three in-process nodes on 127.0.0.1 (an edge relay, a
//! layer-1 mix and a destination node with a recording [`LocalDestination`]) find each other
//! through the first one, gossip their descriptors, and carry a Sphinx packet end to end,
//! from the HTTP-style `submit_client` and from the libp2p client protocol. Nodes with the
//! mailbox role accept node-to-node messages (`/whispr/node-msg/1`), as mailbox nodes do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use whispr_node_kit::clock::now;
use whispr_protocol::directory::{Directory, Role};
use whispr_protocol::sphinx::{Packet, RouteHop, build_packet};
use whispr_protocol::{DestinationAddress, KeyEpoch, NodeId};
use whispr_relay::config::{MeshConfig, RelayRole};
use whispr_relay::mesh::{
    CLIENT_PROTOCOL, LocalDestination, Mesh, MeshError, MeshHandle, MeshOptions,
    NODE_MESSAGES_PROTOCOL, NodeMessage, client_status_decode,
};
use whispr_relay::router::{Delivery, DropReason, RouterConfig};

/// Longest wait for anything the mesh does on its own time (gossip, delivery, metrics,
/// shutdown). Generous on purpose: on a loaded machine these can take many seconds, and a
/// deadline costs time only when the test fails.
const WAIT: Duration = Duration::from_secs(120);

/// Records what reaches the destination.
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
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), MeshError>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn stop(self) -> MeshHandle {
        self.stop_keeping_data().await.0
    }

    async fn stop_keeping_data(mut self) -> (MeshHandle, tempfile::TempDir) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("mesh stops within 120 s")
            .unwrap()
            .unwrap();
        (self.handle, self._dir)
    }
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
        descriptor_validity_ms: 60_000,
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
    start_in(
        tempfile::tempdir().unwrap(),
        config,
        extra_roles,
        destination,
    )
}

fn start_in(
    dir: tempfile::TempDir,
    config: MeshConfig,
    extra_roles: Vec<Role>,
    destination: Option<Arc<dyn LocalDestination>>,
) -> Node {
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
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

/// Bootstrap address of a node: its first listen address with `/p2p/<peer id>`.
fn bootstrap_addr(handle: &MeshHandle) -> String {
    let addrs = handle.listen_addrs();
    assert!(
        !addrs.is_empty(),
        "a 127.0.0.1 listener is known after new()"
    );
    format!("{}/p2p/{}", addrs[0], handle.peer_id())
}

async fn wait_for_directories(nodes: &[&MeshHandle], size: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if nodes.iter().all(|n| n.directory().len() == size) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let sizes: Vec<usize> = nodes.iter().map(|n| n.directory().len()).collect();
            panic!("directories did not reach {size} nodes in {WAIT:?}: {sizes:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Edge → mix (layer 1) → destination (a mailbox node that records its deliveries), each
/// configured by `config(roles, mix_layer, edge, bootstrap)`, every directory holding all three.
struct Chain {
    edge: Node,
    mix: Node,
    destination: Node,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl Chain {
    async fn start(config: impl Fn(Vec<RelayRole>, u32, bool, &[String]) -> MeshConfig) -> Chain {
        let edge = start(config(vec![RelayRole::Edge], 0, true, &[]), vec![], None);
        let bootstrap = [bootstrap_addr(&edge.handle)];
        let mix = start(
            config(vec![RelayRole::Mix], 1, false, &bootstrap),
            vec![],
            None,
        );
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let destination = start(
            config(vec![], 0, false, &bootstrap),
            vec![Role::Mailbox],
            Some(Arc::new(Recorder(deliveries_tx))),
        );
        wait_for_directories(&[&edge.handle, &mix.handle, &destination.handle], 3).await;
        Chain {
            edge,
            mix,
            destination,
            deliveries,
        }
    }

    /// The route edge → mix → destination in the current key epoch, by the edge's directory.
    fn route(&self) -> [RouteHop; 3] {
        let directory = self.edge.handle.directory();
        let epoch = KeyEpoch::containing(
            now(),
            Duration::from_millis(RouterConfig::default().epoch_len_ms),
        );
        [&self.edge, &self.mix, &self.destination]
            .map(|n| hop(&directory, n.handle.node_id(), epoch))
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

async fn next_delivery(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a delivery within 120 s")
        .expect("recorder alive")
}

/// Waits (up to 120 s) for `line` to appear in the node's metrics.
async fn eventually_contains(handle: &MeshHandle, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = handle.metrics_text();
        if text.contains(line) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("missing {line:?} in:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the metric line starting with `prefix` (name and labels), 0 when absent.
fn metric(handle: &MeshHandle, prefix: &str) -> u64 {
    handle
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 120 s) until the metric line starting with `prefix` reaches `at_least`.
async fn eventually_at_least(handle: &MeshHandle, prefix: &str, at_least: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(handle, prefix) < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefix} stayed below {at_least}:\n{}",
            handle.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Captures this crate's logs (debug and up) so the test can check they carry no
/// identifiers.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("whispr_relay=debug"))
            .with_writer(move || LogWriter(sink.clone()))
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bare libp2p client (random identity, only the stream behaviour) connected to `edge`.
async fn client_control(edge: &MeshHandle) -> (libp2p_stream::Control, JoinHandle<()>) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let control = swarm.behaviour().new_control();
    let addr: libp2p::Multiaddr = bootstrap_addr(edge).parse().unwrap();
    swarm.dial(addr).unwrap();
    let task = tokio::spawn(async move {
        loop {
            let _ = swarm.select_next_some().await;
        }
    });
    (control, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_carry_a_packet_end_to_end() {
    let logs = captured_logs();

    let chain = Chain::start(mesh_config).await;
    let route = chain.route();
    let Chain {
        edge,
        mix,
        destination,
        mut deliveries,
    } = chain;
    let handles = [&edge.handle, &mix.handle, &destination.handle];
    for h in handles {
        assert!(h.is_healthy());
        assert!(
            h.directory().get(&h.node_id()).is_some(),
            "own descriptor held"
        );
        let encoded = h.directory_bytes();
        let (decoded, rejected) = Directory::decode(now(), &encoded).unwrap();
        assert_eq!((decoded.len(), rejected.len()), (3, 0));
    }

    // A packet along edge → mix → destination, submitted as from an HTTP client.
    let address = DestinationAddress([7u8; 32]);
    let plaintext = b"through the mesh".to_vec();
    let bytes = packet(&route, address, &plaintext).into_bytes();
    let client = edge.handle.new_client_id();
    assert_eq!(
        edge.handle.submit_client(client, bytes.clone()).await,
        Ok(())
    );
    match next_delivery(&mut deliveries).await {
        Delivery::Final {
            destination: got,
            plaintext: got_plaintext,
        } => {
            assert_eq!(got, address);
            assert_eq!(got_plaintext, plaintext);
        }
        other => panic!("unexpected delivery {other:?}"),
    }

    // The same bytes again: the edge's replay filter refuses them.
    assert_eq!(
        edge.handle.submit_client(client, bytes).await,
        Err(DropReason::Replay)
    );
    // Not a packet's size.
    assert_eq!(
        edge.handle.submit_client(client, vec![0u8; 100]).await,
        Err(DropReason::WrongSize)
    );
    edge.handle.client_closed(client);
    // A mix relay takes no client packets.
    let other = packet(&route, address, b"x").into_bytes();
    assert_eq!(
        mix.handle
            .submit_client(mix.handle.new_client_id(), other)
            .await,
        Err(DropReason::NotEdge)
    );

    // The libp2p client protocol: one status byte per frame.
    let (mut control, client_swarm) = client_control(&edge.handle).await;
    let mut stream = tokio::time::timeout(
        WAIT,
        control.open_stream(edge.handle.peer_id(), CLIENT_PROTOCOL),
    )
    .await
    .unwrap()
    .unwrap();
    let second = packet(&route, address, b"over the client protocol");
    let mut status = [0u8; 1];
    stream.write_all(second.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream.read_exact(&mut status).await.unwrap();
    assert_eq!(client_status_decode(status[0]), Some(Ok(())));
    match next_delivery(&mut deliveries).await {
        Delivery::Final { plaintext, .. } => assert_eq!(plaintext, b"over the client protocol"),
        other => panic!("unexpected delivery {other:?}"),
    }
    stream.write_all(second.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream.read_exact(&mut status).await.unwrap();
    assert_eq!(
        client_status_decode(status[0]),
        Some(Err(DropReason::Replay))
    );
    drop(stream);
    client_swarm.abort();

    // A packet this node originates, with itself as first hop, goes through its router.
    let local = packet(&route, address, b"sent locally");
    edge.handle.send(edge.handle.node_id(), local).unwrap();
    match next_delivery(&mut deliveries).await {
        Delivery::Final { plaintext, .. } => assert_eq!(plaintext, b"sent locally"),
        other => panic!("unexpected delivery {other:?}"),
    }
    // And one sent straight to a remote first hop (the mix) skips the local router.
    let from_mix = packet(&route[1..], address, b"first hop remote");
    edge.handle.send(mix.handle.node_id(), from_mix).unwrap();
    match next_delivery(&mut deliveries).await {
        Delivery::Final { plaintext, .. } => assert_eq!(plaintext, b"first hop remote"),
        other => panic!("unexpected delivery {other:?}"),
    }
    let stranger = NodeId([9u8; 32]);
    assert!(matches!(
        edge.handle.send(stranger, packet(&route, address, b"?")),
        Err(MeshError::UnknownHop)
    ));

    // Metrics (the counters are published after the step that delivered, so wait a little).
    for line in [
        "whispr_mesh_packets_dropped_total{reason=\"replay\"} 2\n",
        "whispr_mesh_packets_dropped_total{reason=\"wrong_size\"} 1\n",
        "whispr_mesh_packets_dropped_total{reason=\"not_edge\"} 0\n",
        "whispr_mesh_packets_in_total{source=\"client\"} 5\n",
        "whispr_mesh_packets_in_total{source=\"local\"} 1\n",
        "whispr_mesh_directory_nodes 3\n",
        "whispr_mesh_send_failed_total 0\n",
        "whispr_mesh_hold_seconds_count 3\n",
        "whispr_mesh_peers_connected 2\n",
    ] {
        eventually_contains(&edge.handle, line).await;
    }
    eventually_contains(
        &destination.handle,
        "whispr_mesh_packets_delivered_total 4\n",
    )
    .await;
    eventually_contains(
        &mix.handle,
        "whispr_mesh_packets_dropped_total{reason=\"not_edge\"} 1\n",
    )
    .await;

    // Shutdown: the handle reports it.
    let identifiers: Vec<String> = handles
        .iter()
        .flat_map(|h| {
            let node = h.node_id();
            let mut ids = vec![h.peer_id().to_string(), hex::encode(node.0)];
            ids.extend(h.listen_addrs().iter().map(|a| a.to_string()));
            ids
        })
        .collect();
    let edge_handle = edge.stop().await;
    assert!(!edge_handle.is_healthy());
    assert!(matches!(
        edge_handle.send(edge_handle.node_id(), packet(&route, address, b"late")),
        Err(MeshError::Stopped)
    ));
    mix.stop().await;
    destination.stop().await;

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    for id in identifiers {
        assert!(
            !logs.contains(&id),
            "an identifier reached the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let no_role = Mesh::new(MeshOptions {
        config: mesh_config(vec![], 0, false, &[]),
        data_dir: dir.path().to_path_buf(),
        extra_roles: vec![],
    });
    assert!(matches!(no_role, Err(MeshError::Config(_))));
    let mut bad_listen = mesh_config(vec![RelayRole::Edge], 0, true, &[]);
    bad_listen.listen = vec!["/ip4/127.0.0.1/udp/0".into()];
    let refused = Mesh::new(MeshOptions {
        config: bad_listen,
        data_dir: dir.path().to_path_buf(),
        extra_roles: vec![],
    });
    assert!(matches!(refused, Err(MeshError::Listen(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_tags_survive_a_restart() {
    // One node that is both an edge and a destination: a one-hop route delivers locally.
    let config = || mesh_config(vec![RelayRole::Edge], 0, true, &[]);
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let node = start(config(), vec![Role::Mailbox], Some(Arc::new(Recorder(tx))));
    wait_for_directories(&[&node.handle], 1).await;
    let id = node.handle.node_id();
    let epoch = KeyEpoch::containing(
        now(),
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let route = [hop(&node.handle.directory(), id, epoch)];
    let bytes = packet(&route, DestinationAddress([1u8; 32]), b"once").into_bytes();
    let client = node.handle.new_client_id();
    assert_eq!(
        node.handle.submit_client(client, bytes.clone()).await,
        Ok(())
    );
    // Delivered only once its replay tag is durable.
    assert!(matches!(
        next_delivery(&mut deliveries).await,
        Delivery::Final { plaintext, .. } if plaintext == b"once"
    ));
    let (_, dir) = node.stop_keeping_data().await;

    // Same data directory: same keys, and the tag is restored from the replay store.
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let node = start_in(
        dir,
        config(),
        vec![Role::Mailbox],
        Some(Arc::new(Recorder(tx))),
    );
    assert_eq!(node.handle.node_id(), id);
    let client = node.handle.new_client_id();
    assert_eq!(
        node.handle.submit_client(client, bytes).await,
        Err(DropReason::Replay)
    );
    assert!(node.handle.is_healthy());
    node.stop().await;
    assert!(deliveries.try_recv().is_err());
}

/// Two mailbox-role meshes exchange node messages over real sockets, through a relay that
/// does not accept them: order and the authenticated sender are kept; a too-long message is
/// refused to the caller, a too-long frame closes the receiving stream (counted) and the
/// sender reopens; an idle stream is closed by the receiver and reopened by the sender; an
/// unknown destination is a typed error; a peer outside the directory has its stream
/// refused; a destination that does not speak the protocol costs the message (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_messages_between_meshes() {
    const SENT: &str = "whispr_mesh_node_messages_sent_total ";
    const RECEIVED: &str = "whispr_mesh_node_messages_received_total ";
    let dropped =
        |reason: &str| format!("whispr_mesh_node_messages_dropped_total{{reason=\"{reason}\"}} ");
    let closed = |reason: &str| {
        format!("whispr_mesh_node_message_streams_closed_total{{reason=\"{reason}\"}} ")
    };

    let relay = start(
        mesh_config(vec![RelayRole::Edge], 0, true, &[]),
        vec![],
        None,
    );
    let bootstrap = [bootstrap_addr(&relay.handle)];
    let mut a_config = mesh_config(vec![], 0, false, &bootstrap);
    a_config.node_messages.message_max = 4096;
    let mut b_config = mesh_config(vec![], 0, false, &bootstrap);
    // B takes shorter messages than A sends, and closes streams idle for 1 s.
    b_config.node_messages.message_max = 1024;
    b_config.node_messages.idle_ms = 1000;
    let a = start(a_config, vec![Role::Mailbox], None);
    let mut b = start(b_config, vec![Role::Mailbox], None);
    assert!(relay.messages.is_none() && a.messages.is_some());
    wait_for_directories(&[&relay.handle, &a.handle, &b.handle], 3).await;
    let a_id = a.handle.node_id();
    let b_id = b.handle.node_id();
    let mut inbox = b.messages.take().unwrap();

    // 100 messages, in order, from A.
    for i in 0..100u32 {
        let mut bytes = i.to_be_bytes().to_vec();
        bytes.resize(4 + usize::try_from(i).unwrap() * 10, 7);
        a.handle.send_node_message(b_id, bytes).unwrap();
    }
    for i in 0..100u32 {
        let (from, bytes) = tokio::time::timeout(WAIT, inbox.recv())
            .await
            .expect("a node message within 120 s")
            .expect("mesh alive");
        assert_eq!(from, a_id);
        assert_eq!(bytes[..4], i.to_be_bytes(), "message {i} in order");
        assert_eq!(bytes.len(), 4 + usize::try_from(i).unwrap() * 10);
    }
    // The counters move just after the bytes do.
    eventually_at_least(&a.handle, SENT, 100).await;
    eventually_at_least(&b.handle, RECEIVED, 100).await;
    assert_eq!(metric(&a.handle, SENT), 100);
    assert_eq!(metric(&b.handle, RECEIVED), 100);

    // Typed errors, counted, nothing queued.
    let unknown = whispr_protocol::NodeId([9u8; 32]);
    assert!(matches!(
        a.handle.send_node_message(unknown, b"x".to_vec()),
        Err(MeshError::UnknownNode)
    ));
    assert!(matches!(
        a.handle.send_node_message(a_id, b"x".to_vec()),
        Err(MeshError::UnknownNode)
    ));
    assert!(matches!(
        a.handle.send_node_message(b_id, vec![0; 4097]),
        Err(MeshError::TooLarge {
            len: 4097,
            max: 4096
        })
    ));
    assert_eq!(metric(&a.handle, &dropped("unknown_node")), 2);
    assert_eq!(metric(&a.handle, &dropped("too_large")), 1);

    // B closes A's stream once idle for 1 s (A's own idle close comes after 60 s).
    eventually_at_least(&b.handle, &closed("idle"), 1).await;

    // Messages sent after a close reach B on a new stream. A message may be lost if it is
    // written just as the receiver closes (at most once): send until one arrives.
    async fn resend_until_received(
        from: &MeshHandle,
        to: whispr_protocol::NodeId,
        inbox: &mut mpsc::Receiver<NodeMessage>,
        what: &[u8],
    ) -> whispr_protocol::NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what:?} never arrived"
            );
            from.send_node_message(to, what.to_vec()).unwrap();
            if let Ok(Some((sender, bytes))) =
                tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await
            {
                assert_eq!(bytes, what);
                return sender;
            }
        }
    }
    assert_eq!(
        resend_until_received(&a.handle, b_id, &mut inbox, b"after idle").await,
        a_id
    );

    // A frame longer than B's limit closes B's stream (counted); A reopens.
    a.handle.send_node_message(b_id, vec![1; 2000]).unwrap();
    eventually_at_least(&b.handle, &closed("too_large"), 1).await;
    assert_eq!(metric(&b.handle, &dropped("too_large")), 1);
    // Whatever arrived meanwhile was a copy of "after idle"; the long one never does.
    while let Ok((_, bytes)) = inbox.try_recv() {
        assert_eq!(bytes, b"after idle");
    }
    assert_eq!(
        resend_until_received(&a.handle, b_id, &mut inbox, b"after too long").await,
        a_id
    );

    // A peer outside the directory (a bare libp2p identity) has its stream refused.
    let (mut control, client_task) = client_control(&b.handle).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut stream = loop {
        match control
            .open_stream(b.handle.peer_id(), NODE_MESSAGES_PROTOCOL)
            .await
        {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no stream: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let _ = stream.write_all(&3u32.to_be_bytes()).await;
    let _ = stream.write_all(b"sybil").await;
    let _ = stream.flush().await;
    eventually_at_least(&b.handle, &closed("not_member"), 1).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    client_task.abort();

    // The relay does not accept node messages: A's message to it is lost, and counted.
    let io_before = metric(&a.handle, &dropped("io"));
    a.handle
        .send_node_message(relay.handle.node_id(), b"to a relay".to_vec())
        .unwrap();
    eventually_at_least(&a.handle, &dropped("io"), io_before + 1).await;
    assert!(inbox.try_recv().is_err(), "nothing else reached B");

    for node in [a, b, relay] {
        node.stop().await;
    }
}

/// Security review, finding 12: a peer could hold any number of libp2p connections to a
/// node. A bare libp2p identity dials a node with `connections_per_peer_max = 2` five
/// times: two connections stay, three are refused (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_per_peer_limit_are_refused() {
    use libp2p::swarm::SwarmEvent;
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};

    let mut config = mesh_config(vec![RelayRole::Edge], 0, true, &[]);
    config.connections_per_peer_max = 2;
    let node = start(config, vec![], None);
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(WAIT))
        .build();
    let addr: libp2p::Multiaddr = node.handle.listen_addrs()[0].clone();
    for _ in 0..5 {
        swarm
            .dial(
                DialOpts::peer_id(node.handle.peer_id())
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Always)
                    .build(),
            )
            .unwrap();
    }
    // Every dial resolves (established, possibly closed again by the node, or failed), and
    // at most two connections stay open.
    let (mut resolved, mut open) = (0u32, 0i64);
    let deadline = tokio::time::Instant::now() + WAIT;
    while resolved < 5 || open > 2 {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .unwrap_or_else(|_| panic!("{resolved} dials resolved, {open} connections open"));
        match event {
            SwarmEvent::ConnectionEstablished { .. } => {
                resolved += 1;
                open += 1;
            }
            SwarmEvent::OutgoingConnectionError { .. } => resolved += 1,
            SwarmEvent::ConnectionClosed { .. } => open -= 1,
            _ => {}
        }
    }
    assert!(open >= 1, "a connection within the limit stays");
    eventually_at_least(&node.handle, "whispr_mesh_connections_denied_total ", 3).await;
    drop(swarm);
    node.stop().await;
}

/// Security review, finding 12: an inbound packet stream that never carried a packet was
/// held (with its stream slot) forever. It is closed after `peer_stream_idle_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_packet_stream_is_closed() {
    let mut config = mesh_config(vec![RelayRole::Mix], 1, false, &[]);
    config.peer_stream_idle_ms = 500;
    let node = start(config, vec![], None);
    let (mut control, client_task) = client_control(&node.handle).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut stream = loop {
        match control
            .open_stream(node.handle.peer_id(), whispr_relay::mesh::PACKETS_PROTOCOL)
            .await
        {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no stream: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle packet stream is still open");
    eventually_at_least(
        &node.handle,
        "whispr_mesh_peer_streams_idle_closed_total ",
        1,
    )
    .await;
    client_task.abort();
    node.stop().await;
}

/// Packet senders close their stream before the next hop's idle timeout does: a packet
/// sent after the link idled still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_packet_after_an_idle_link_is_delivered() {
    let mut edge_config = mesh_config(vec![RelayRole::Edge], 0, true, &[]);
    edge_config.peer_stream_idle_ms = 400;
    let edge = start(edge_config, vec![], None);
    let bootstrap = [bootstrap_addr(&edge.handle)];
    let mut destination_config = mesh_config(vec![], 0, false, &bootstrap);
    destination_config.peer_stream_idle_ms = 400;
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let destination = start(
        destination_config,
        vec![Role::Mailbox],
        Some(Arc::new(Recorder(deliveries_tx))),
    );
    wait_for_directories(&[&edge.handle, &destination.handle], 2).await;
    let directory = edge.handle.directory();
    let epoch = KeyEpoch::containing(
        now(),
        Duration::from_millis(RouterConfig::default().epoch_len_ms),
    );
    let route = [
        hop(&directory, edge.handle.node_id(), epoch),
        hop(&directory, destination.handle.node_id(), epoch),
    ];
    let client = edge.handle.new_client_id();
    for round in 0..2u8 {
        if round == 1 {
            // Several idle timeouts pass with the link unused (not an assertion: the
            // delivery below is).
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let plaintext = vec![round; 16];
        let bytes = packet(&route, DestinationAddress([7u8; 32]), &plaintext).into_bytes();
        assert_eq!(edge.handle.submit_client(client, bytes).await, Ok(()));
        match next_delivery(&mut deliveries).await {
            Delivery::Final { plaintext: got, .. } => assert_eq!(got, plaintext),
            other => panic!("unexpected delivery {other:?}"),
        }
    }
    edge.stop().await;
    destination.stop().await;
}

/// Issue 16 ("Transport"): libp2p client streams are rate limited per peer, not per stream.
/// Before: every stream had its own client id, so a second stream of the same peer came with
/// a fresh budget (`a new stream brought a fresh budget: Some(Err(UnknownEpoch))`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_of_one_peer_share_one_rate_budget() {
    let mut config = mesh_config(vec![RelayRole::Edge], 0, true, &[]);
    config.router.client_rate = whispr_relay::router::RateLimit {
        per_minute: 1,
        burst: 3,
        penalty_packets: 0,
        delay_max_ms: 0,
    };
    let edge = start(config, vec![], None);
    let (mut control, client_swarm) = client_control(&edge.handle).await;
    let junk = vec![0u8; whispr_protocol::sphinx::PACKET_SIZE];
    async fn verdict(stream: &mut libp2p::Stream, frame: &[u8]) -> Option<Result<(), DropReason>> {
        stream.write_all(frame).await.ok()?;
        stream.flush().await.ok()?;
        let mut status = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut status))
            .await
            .ok()?
            .ok()?;
        client_status_decode(status[0])
    }
    let peer = edge.handle.peer_id();
    let mut first = tokio::time::timeout(WAIT, control.open_stream(peer, CLIENT_PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    let mut limited = false;
    for _ in 0..10 {
        if verdict(&mut first, &junk).await == Some(Err(DropReason::RateLimited)) {
            limited = true;
            break;
        }
    }
    assert!(limited, "the first stream was never rate limited");
    let mut second = tokio::time::timeout(WAIT, control.open_stream(peer, CLIENT_PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    let got = verdict(&mut second, &junk).await;
    assert_eq!(
        got,
        Some(Err(DropReason::RateLimited)),
        "a new stream brought a fresh budget: {got:?}"
    );
    // At most 4 client streams per peer: a fifth is closed at once.
    let mut third = tokio::time::timeout(WAIT, control.open_stream(peer, CLIENT_PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    let mut fourth = tokio::time::timeout(WAIT, control.open_stream(peer, CLIENT_PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    assert!(verdict(&mut third, &junk).await.is_some());
    assert!(verdict(&mut fourth, &junk).await.is_some());
    let fifth = tokio::time::timeout(WAIT, control.open_stream(peer, CLIENT_PROTOCOL))
        .await
        .unwrap();
    if let Ok(mut fifth) = fifth {
        assert_eq!(
            verdict(&mut fifth, &junk).await,
            None,
            "a fifth stream of one peer was served"
        );
    }
    client_swarm.abort();
}

/// A burst through edge → mix → destination with `mesh.peel_inline` on (lone packets peeled in
/// the core task, the others in the pool: the two paths alternate under a burst) and off
/// (every packet through the pool): every packet is delivered exactly once, and a packet sent
/// again is refused as a replay whichever path peeled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_delivered_once_with_and_without_inline_peels() {
    for inline in [true, false] {
        let config =
            |roles: Vec<RelayRole>, layer: u32, edge: bool, bootstrap: &[String]| MeshConfig {
                peel_inline: inline,
                ..mesh_config(roles, layer, edge, bootstrap)
            };
        let chain = Chain::start(config).await;
        let route = chain.route();
        let Chain {
            edge,
            mix,
            destination,
            mut deliveries,
        } = chain;
        let handles = [&edge.handle, &mix.handle, &destination.handle];
        let address = DestinationAddress([3u8; 32]);
        const BURST: u32 = 60;
        let packets: Vec<Vec<u8>> = (0..BURST)
            .map(|i| packet(&route, address, &i.to_le_bytes()).into_bytes())
            .collect();
        // Within the default client rate budget (a burst of 200 per connection).
        let client = edge.handle.new_client_id();
        let submits: Vec<_> = packets
            .iter()
            .map(|bytes| {
                let (handle, bytes) = (edge.handle.clone(), bytes.clone());
                tokio::spawn(async move { handle.submit_client(client, bytes).await })
            })
            .collect();
        for submit in submits {
            assert_eq!(submit.await.unwrap(), Ok(()), "inline {inline}");
        }
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < BURST as usize {
            match next_delivery(&mut deliveries).await {
                Delivery::Final { plaintext, .. } => {
                    let i = u32::from_le_bytes(plaintext[..4].try_into().unwrap());
                    assert!(
                        seen.insert(i),
                        "packet {i} delivered twice (inline {inline})"
                    );
                }
                other => panic!("unexpected delivery {other:?}"),
            }
        }
        assert_eq!(
            edge.handle
                .submit_client(client, packets[BURST as usize / 2].clone())
                .await,
            Err(DropReason::Replay),
            "inline {inline}"
        );
        eventually_contains(
            &destination.handle,
            &format!("whispr_mesh_packets_delivered_total {BURST}\n"),
        )
        .await;
        for h in handles {
            assert_eq!(metric(h, "whispr_mesh_send_failed_total "), 0);
        }
        // Nothing more comes (no copy) once the counters say every packet was delivered.
        assert!(deliveries.try_recv().is_err(), "inline {inline}");
        edge.stop().await;
        mix.stop().await;
        destination.stop().await;
    }
}
