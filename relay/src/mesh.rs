//! The libp2p + tokio driver of the [`Router`]: the mesh a relay runs and a mailbox or timer
//! node embeds.
//!
//! # Tasks
//!
//! [`Mesh::new`] loads the keys, opens the replay store and builds the swarm; nothing runs
//! until [`MeshRunner::run`], which starts:
//!
//! * **the core** (one task, owning the [`Router`]): it takes packets and other events from one
//!   bounded channel; a packet is admitted with [`Router::admit`] (role, queue share, rate
//!   limit), peeled by the **peel threads** (`mesh.peel_workers`, one per core by default; at
//!   most `mesh.peel_queue_max` packets out, after which the core reads no more events) and
//!   handed back in admission order with [`Router::finish`] (replay filter, queue), so the
//!   router sees what [`Router::handle_input`] would; other events go to
//!   [`Router::handle_input`]; each with the wall-clock time (read by
//!   `whispr_node_kit::clock::now`, the only clock of the driver), sleeps until [`Router::poll_timeout`], and
//!   hands the outputs on: sends to the per-peer sender tasks, final payloads to the
//!   [`LocalDestination`], replay tags to the persistence thread (one synced write at a time;
//!   tags arriving meanwhile are grouped into the next write), drops to the metrics only;
//! * **the persistence thread**, owning the [`ReplayStore`];
//! * **the swarm task**: TCP + Noise + Yamux, identify, ping, Kademlia (discovery), gossipsub
//!   (descriptors on [`DESCRIPTOR_TOPIC`]) and `libp2p-stream` (packets); it validates and
//!   keeps descriptors, publishes this node's own one, and feeds the descriptor addresses to
//!   the dialer;
//! * **the directory task**, which rebuilds the [`Directory`] from the descriptors held (at
//!   most once per [`directory_rebuild_interval`]) and gives it to the core and the handle
//!   (without a pinned network: for development only, as anyone can join), or, with
//!   `mesh.network_file`, only keeps the gossiped descriptors for `GET /v1/directory`;
//! * **the submission tasks** (with `mesh.network_file` only), one per pinned authority, which
//!   `POST` this node's signed descriptor to the authority's `/v1/descriptors` at start, when
//!   its content changes, once per consensus epoch and before the authority's copy expires,
//!   with bounded retries (`whispr_mesh_descriptor_submissions_total{result}`); an authority
//!   admits it by its own policy (its allow list);
//! * **the consensus task** (with `mesh.network_file` only), which fetches the consensus from
//!   the pinned authorities every `mesh.consensus_poll_ms`, verifies it, and gives the core and
//!   the handle the directory of its members ([`Directory::from_consensus`]); packet streams
//!   are then accepted only from those members (and the previous consensus's, for
//!   `mesh.consensus_grace_ms`);
//! * **the epoch task**, which rotates the Sphinx keys at each key epoch boundary;
//! * the acceptors of the packet and client stream protocols, and one sender task per next
//!   hop;
//! * with [`MeshRunner::accept_node_messages`], the acceptor of [`NODE_MESSAGES_PROTOCOL`]
//!   and its readers; and one node-message sender task per destination of
//!   [`MeshHandle::send_node_message`] (spawned on demand, ending when idle).
//!
//! # Wire protocols
//!
//! * [`PACKETS_PROTOCOL`] (`/whispr/packets/1`), between nodes: one long-lived stream per
//!   ordered pair of nodes, carrying raw frames of exactly [`PACKET_SIZE`] bytes, no header.
//!   The reader stops reading while the router is full (backpressure through Yamux's flow
//!   control) instead of reading and dropping. The reader closes a stream with no packet for
//!   `mesh.peer_stream_idle_ms`; the sender closes its own after half of that, and reopens
//!   when the peer closed it, so that no packet is written into a stream about to close.
//!
//! The swarm refuses connections beyond `mesh.connections_max` in all,
//! `mesh.connections_per_peer_max` per peer and `mesh.connections_pending_max` inbound
//! handshakes (libp2p's `connection_limits`).
//! * [`CLIENT_PROTOCOL`] (`/whispr/client/1`), from clients to edge relays (registered only
//!   when `router.edge` is set): the client writes frames of [`PACKET_SIZE`] bytes; after each
//!   one the relay writes one status byte ([`client_status_code`]). Each stream is one
//!   [`ClientId`] for the rate limits.
//! * [`ACKED_PACKETS_PROTOCOL`] (`/whispr/packets-acked/1`), between nodes, served by every
//!   node: frames of [`PACKET_SIZE`] bytes, each answered with the router's verdict as one
//!   status byte (the same codes). [`MeshHandle::send_acknowledged`] sends one packet per
//!   stream this way (timer nodes releasing held packets: a release counts only once its first
//!   hop has taken it). Same stream limits as [`PACKETS_PROTOCOL`], counted apart.
//! * [`NODE_MESSAGES_PROTOCOL`] (`/whispr/node-msg/1`), between nodes, served only by nodes
//!   that call [`MeshRunner::accept_node_messages`] (mailbox nodes, for replication): frames
//!   of a u32 big-endian length and that many bytes, at most
//!   `mesh.node_messages.message_max` (1 MiB); one way; one long-lived stream per ordered
//!   pair of nodes, opened on demand by [`MeshHandle::send_node_message`]'s sender task (a
//!   queue of `queue_max` messages per destination; full: the send fails), reopened with
//!   back-off after a failure, closed by the sender after `idle_ms / 2` without a message.
//!   The receiver takes streams only from members of the directory (of the consensus and,
//!   within the grace window, the previous one, with a pinned network), at most
//!   `streams_per_peer` per peer and `streams_max` in all; it closes a stream with no frame
//!   for `idle_ms`, one whose frame's bytes take longer than `frame_ms` after its length,
//!   and one announcing a frame longer than `message_max` (each counted in
//!   `whispr_mesh_node_message_streams_closed_total{reason}`). Each message is handed on
//!   with the node id of the Noise-authenticated peer that sent it; delivery is at most
//!   once, in order per stream.
//!
//! # Descriptors
//!
//! This node's descriptor lists `mesh.external_addresses`, or else the addresses it actually
//! listens on that are not unspecified, **without** a `/p2p/<peer id>` suffix (the peer id is
//! a field of the descriptor; leaving it out keeps each address well under the protocol's
//! 256-byte limit). At most [`ADDRESSES_MAX`] are published.
//!
//! # Logs
//!
//! Nothing here logs a node id, peer id, address, mailbox id or key: only counts and
//! [`DropReason::label`]s, at `debug` level for per-packet events.

mod engine;
mod metrics;
mod node_messages;
mod peel;
mod probe;
mod shared;
mod streams;
mod submit;
mod swarm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};
use whispr_protocol::directory::{ADDRESS_LEN_MAX, ADDRESSES_MAX, Directory, Role};
use whispr_protocol::sphinx::Packet;
use whispr_protocol::{KeyEpoch, NodeId};

use crate::config::{ConfigError, MeshConfig};
use crate::keys::{EpochKeys, Identity};
use crate::router::{ClientId, DropReason, Router, Source};
use crate::storage::{ReplayStore, RocksOptions, RocksReplayStore};

pub use node_messages::{NODE_MESSAGES_PROTOCOL, NodeMessage};
#[doc(hidden)]
pub use probe::{Stage, StageProbe, install_stage_probe};
pub use shared::{LocalDestination, MeshError};
pub use streams::{
    ACKED_PACKETS_PROTOCOL, CLIENT_PROTOCOL, PACKETS_PROTOCOL, client_status_code,
    client_status_decode,
};
pub use swarm::{DESCRIPTOR_TOPIC, directory_rebuild_interval};

use self::metrics::Metrics;
use self::shared::{RouterEvent, Shared, read};

/// What [`Mesh::new`] needs.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// The `[mesh]` section.
    pub config: MeshConfig,
    /// The node's data directory: keys in `config.key_dir(data_dir)`, the replay store in
    /// `data_dir/replay`.
    pub data_dir: PathBuf,
    /// Roles added to `config.roles` in the descriptor ([`Role::Mailbox`] or [`Role::Timer`]
    /// for embedding nodes).
    pub extra_roles: Vec<Role>,
}

/// Builds a mesh.
#[derive(Debug)]
pub struct Mesh;

impl Mesh {
    /// Loads/creates keys, opens the replay store (restoring tags into the router), builds the
    /// swarm and starts listening. Nothing is processed until [`MeshRunner::run`].
    ///
    /// Must be called within a Tokio runtime (the TCP listeners register with its reactor).
    #[allow(clippy::new_ret_no_self)] // `Mesh` is only the constructor's namespace.
    pub fn new(options: MeshOptions) -> Result<(MeshHandle, MeshRunner), MeshError> {
        let MeshOptions {
            config,
            data_dir,
            extra_roles,
        } = options;
        config.check()?;
        check_descriptor_fields(&config, &extra_roles)?;
        let network = config.network()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(MeshError::Listen(
                "Mesh::new must be called within a Tokio runtime".into(),
            ));
        }
        let key_dir = config.key_dir(&data_dir);
        let identity = Identity::load_or_create(&key_dir)?;
        let epoch_len = Duration::from_millis(config.router.epoch_len_ms);
        let epoch_keys = EpochKeys::new(&key_dir, epoch_len, config.sphinx_keys_ahead);
        let now = whispr_node_kit::clock::now();
        let keys = epoch_keys.rotate(now)?;
        let current = KeyEpoch::containing(now, epoch_len);

        let mut store = RocksReplayStore::open(&data_dir.join("replay"), &RocksOptions::default())?;
        store.prune_before(current.previous().unwrap_or(current))?;
        let tags = store.load()?;

        let node_id = identity.node_id();
        let keypair = identity.libp2p_keypair();
        let peer_id = keypair.public().to_peer_id();
        let mut built = swarm::build(&config, &keypair)?;
        let listen_addrs = swarm::start_listening(&mut built.swarm, &config)?;

        let inbox_len = config.peer_queue_max.max(64);
        let (inbox_tx, inbox_rx) = mpsc::channel(inbox_len);
        let (listen_tx, _) = watch::channel(listen_addrs);
        let mut roles: Vec<Role> = config.roles.iter().map(|r| Role::from(*r)).collect();
        roles.extend(extra_roles);

        let shared = Arc::new(Shared {
            node_id,
            peer_id,
            inbox: inbox_tx,
            control: built.control.clone(),
            next_client: AtomicU64::new(1),
            directory: RwLock::new(Arc::new(Directory::default())),
            directory_bytes: RwLock::new(Arc::new(Directory::encode(&[]))),
            pinned: network.is_some(),
            consensus_bytes: RwLock::new(None),
            members: RwLock::new(Arc::new(shared::Members::default())),
            listen_addrs: listen_tx,
            metrics: Metrics::default(),
            store_ok: AtomicBool::new(true),
            keys_ok: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            node_out: node_messages::Outbox::new(
                config.node_messages.clone(),
                tokio::runtime::Handle::current(),
            ),
            peer_stream_idle: Duration::from_millis(config.peer_stream_idle_ms),
        });
        shared.metrics.queue_max.store(
            u64::try_from(config.router.queue_max).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let handle = MeshHandle {
            shared: shared.clone(),
        };
        let runner = MeshRunner {
            shared,
            config,
            network,
            identity,
            roles,
            epoch_keys,
            keys,
            keys_epoch: current,
            tags,
            store: Box::new(store),
            built,
            inbox: inbox_rx,
            node_messages: None,
        };
        Ok((handle, runner))
    }
}

fn check_descriptor_fields(config: &MeshConfig, extra_roles: &[Role]) -> Result<(), MeshError> {
    if config.roles.is_empty() && extra_roles.is_empty() {
        return Err(ConfigError::new(
            "mesh.roles",
            "a node needs at least one role (edge, mix, or the embedding node's)",
        )
        .into());
    }
    if extra_roles.contains(&Role::Mix) {
        return Err(ConfigError::new("mesh.roles", "mix is a relay role set in mesh.roles").into());
    }
    if config.external_addresses.len() > ADDRESSES_MAX {
        return Err(ConfigError::new(
            "mesh.external_addresses",
            format!("at most {ADDRESSES_MAX} addresses"),
        )
        .into());
    }
    if config
        .external_addresses
        .iter()
        .chain(config.api_url.iter())
        .any(|a| a.len() > ADDRESS_LEN_MAX)
    {
        return Err(ConfigError::new(
            "mesh.external_addresses",
            format!("addresses and api_url are at most {ADDRESS_LEN_MAX} bytes"),
        )
        .into());
    }
    Ok(())
}

/// A cheap, cloneable handle on a mesh: send packets, read the directory and the metrics.
/// Usable before [`MeshRunner::run`] starts (packets queue in bounded channels).
#[derive(Clone)]
pub struct MeshHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle").finish_non_exhaustive()
    }
}

impl MeshHandle {
    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Sends a packet this node originates (SURB reply, deferred send) to `first_hop`; if
    /// `first_hop` is this node, it goes through the local router as [`Source::Local`].
    /// [`MeshError::QueueFull`] when the bounded queue is full, [`MeshError::Stopped`] after
    /// shutdown, [`MeshError::UnknownHop`] when `first_hop` is not in the directory. Never
    /// blocks.
    pub fn send(&self, first_hop: NodeId, packet: Packet) -> Result<(), MeshError> {
        let event = if first_hop == self.shared.node_id {
            RouterEvent::Packet {
                from: Source::Local,
                bytes: packet.into_bytes(),
                reply: None,
            }
        } else {
            if read(&self.shared.directory).get(&first_hop).is_none() {
                return Err(MeshError::UnknownHop);
            }
            RouterEvent::Forward {
                to: first_hop,
                packet,
            }
        };
        self.shared.inbox.try_send(event).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MeshError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => MeshError::Stopped,
        })
    }

    /// Sends a packet this node originates to `first_hop` and waits for the first hop's
    /// verdict: `Ok` only once the first hop's router has taken the packet (for a remote first
    /// hop, over [`ACKED_PACKETS_PROTOCOL`], one stream per packet; for this node, from the
    /// local router as [`Source::Local`]). [`MeshError::Refused`] with the first hop's reason,
    /// [`MeshError::Unreachable`] when no verdict came (within about 80 s at most),
    /// [`MeshError::UnknownHop`] when `first_hop` is not in the directory,
    /// [`MeshError::Stopped`] after shutdown. For a node that must not lose the packet (a
    /// timer node releasing a held packet); [`MeshHandle::send`] is fire-and-forget.
    pub async fn send_acknowledged(
        &self,
        first_hop: NodeId,
        packet: Packet,
    ) -> Result<(), MeshError> {
        if self.shared.stopped.load(Ordering::Relaxed) || self.shared.inbox.is_closed() {
            return Err(MeshError::Stopped);
        }
        if first_hop == self.shared.node_id {
            return shared::submit(&self.shared.inbox, Source::Local, packet.into_bytes())
                .await
                .map_err(MeshError::Refused);
        }
        if read(&self.shared.directory).get(&first_hop).is_none() {
            return Err(MeshError::UnknownHop);
        }
        let Some(peer) = streams::peer_id_of(&first_hop) else {
            return Err(MeshError::UnknownHop);
        };
        match streams::send_acknowledged(self.shared.control.clone(), peer, &packet).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(MeshError::Refused(reason)),
            Err(why) => Err(MeshError::Unreachable(why)),
        }
    }

    /// Sends `bytes` to the node `to` over [`NODE_MESSAGES_PROTOCOL`] (node-to-node
    /// messages, for mailbox replication). Never blocks: the message is queued for `to`'s
    /// sender task, which writes it on its long-lived stream to `to` (opened on demand).
    /// Errors: [`MeshError::TooLarge`] above `mesh.node_messages.message_max`,
    /// [`MeshError::UnknownNode`] when `to` is not in the directory (the consensus, with a
    /// pinned network) or is this node, [`MeshError::QueueFull`] when `to`'s queue holds
    /// `mesh.node_messages.queue_max` messages, [`MeshError::Stopped`] after shutdown.
    ///
    /// `Ok` means queued, not delivered: delivery is at most once, in order per destination,
    /// and a message is lost (counted) when its stream cannot be opened or breaks, or when
    /// `to` does not accept node messages or does not count this node as a member. The
    /// embedding node's own protocol acknowledges what must be.
    pub fn send_node_message(&self, to: NodeId, bytes: Vec<u8>) -> Result<(), MeshError> {
        node_messages::send(&self.shared, to, bytes)
    }

    /// Sends `reply` through `surb` (acks, prekey bundles): the reply is encoded, sealed into
    /// the SURB's packet and sent to the SURB's first hop as [`MeshHandle::send`] does.
    pub fn send_reply(
        &self,
        surb: &whispr_protocol::sphinx::Surb,
        reply: &whispr_protocol::payload::Reply,
    ) -> Result<(), MeshError> {
        let bytes = reply.encode().map_err(MeshError::Reply)?;
        let (first_hop, packet) =
            whispr_protocol::sphinx::use_surb(surb, &bytes).map_err(MeshError::Reply)?;
        self.send(first_hop, packet)
    }

    /// A packet from a client connection (HTTP `POST /v1/packets`, or the libp2p client
    /// protocol), answered with the router's verdict. Waits while the core's queue is full;
    /// answers `Err(DropReason::QueueFull)` once the mesh has stopped.
    pub async fn submit_client(&self, client: ClientId, bytes: Vec<u8>) -> Result<(), DropReason> {
        shared::submit(&self.shared.inbox, Source::Client(client), bytes).await
    }

    /// A client connection closed: its rate-limit state can go.
    pub fn client_closed(&self, client: ClientId) {
        // Best effort: a full queue only delays forgetting (the table is bounded anyway).
        let _ = self
            .shared
            .inbox
            .try_send(RouterEvent::ClientClosed(client));
    }

    /// A fresh [`ClientId`] (unique per process).
    pub fn new_client_id(&self) -> ClientId {
        ClientId(self.shared.next_client.fetch_add(1, Ordering::Relaxed))
    }

    /// The validated directory (this node's own descriptor included).
    pub fn directory(&self) -> Arc<Directory> {
        read(&self.shared.directory)
    }

    /// The valid signed descriptors, encoded with [`Directory::encode`] (for
    /// `GET /v1/directory`).
    pub fn directory_bytes(&self) -> Vec<u8> {
        read(&self.shared.directory_bytes).as_ref().clone()
    }

    /// The verified consensus this node routes by, as the authorities served it (for
    /// `GET /v1/consensus`); `None` without a pinned network (`mesh.network_file`) or before
    /// the first one was fetched.
    pub fn consensus_bytes(&self) -> Option<Vec<u8>> {
        read(&self.shared.consensus_bytes).map(|b| b.as_ref().clone())
    }

    /// Whether this node pins directory authorities (`mesh.network_file` set).
    pub fn is_pinned(&self) -> bool {
        self.shared.pinned
    }

    /// Addresses actually listened on (after binding port 0 etc.). Listeners on specific IP
    /// addresses are known as soon as [`Mesh::new`] returns; those on an unspecified address
    /// (`0.0.0.0`) once [`MeshRunner::run`] has enumerated the interfaces (see
    /// [`MeshHandle::listening`]).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared.listen_addrs.borrow().clone()
    }

    /// Waits until at least one listen address is known, and returns them.
    pub async fn listening(&self) -> Vec<Multiaddr> {
        let mut rx = self.shared.listen_addrs.subscribe();
        match rx.wait_for(|a| !a.is_empty()).await {
            Ok(addrs) => addrs.clone(),
            Err(_) => Vec::new(),
        }
    }

    /// Prometheus text lines for the mesh (no identifiers in labels).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render(metrics::Health {
            pinned: self.shared.pinned,
            store_poisoned: !self.shared.store_ok.load(Ordering::Relaxed),
            keys_failing: !self.shared.keys_ok.load(Ordering::Relaxed),
            stopped: self.shared.stopped.load(Ordering::Relaxed),
        })
    }

    /// False when the replay store is poisoned, the key rotation failed, or the core stopped.
    pub fn is_healthy(&self) -> bool {
        self.shared.store_ok.load(Ordering::Relaxed)
            && self.shared.keys_ok.load(Ordering::Relaxed)
            && !self.shared.stopped.load(Ordering::Relaxed)
    }
}

/// Runs a mesh built by [`Mesh::new`].
pub struct MeshRunner {
    shared: Arc<Shared>,
    config: MeshConfig,
    network: Option<whispr_protocol::consensus::Network>,
    identity: Identity,
    roles: Vec<Role>,
    epoch_keys: EpochKeys,
    keys: Vec<(KeyEpoch, whispr_protocol::sphinx::SphinxSecretKey)>,
    keys_epoch: KeyEpoch,
    tags: Vec<(KeyEpoch, whispr_protocol::sphinx::ReplayTag)>,
    store: Box<dyn ReplayStore>,
    built: swarm::Built,
    inbox: mpsc::Receiver<RouterEvent>,
    node_messages: Option<(libp2p_stream::IncomingStreams, mpsc::Sender<NodeMessage>)>,
}

impl std::fmt::Debug for MeshRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshRunner").finish_non_exhaustive()
    }
}

impl MeshRunner {
    /// Makes this node accept [`NODE_MESSAGES_PROTOCOL`] streams (mailbox nodes do, for
    /// replication; relays and timer nodes do not) and returns the messages received, once
    /// the mesh runs: each with the node id of its Noise-authenticated sender, a member of
    /// the directory (of the consensus, or the previous one within the grace window, with a
    /// pinned network). The channel holds `mesh.node_messages.inbox_max` messages; while it
    /// is full, no node-message stream is read (the senders' writes then time out and their
    /// messages are dropped). Call it before [`MeshRunner::run`];
    /// [`MeshError::AlreadyAccepted`] the second time.
    pub fn accept_node_messages(&mut self) -> Result<mpsc::Receiver<NodeMessage>, MeshError> {
        if self.node_messages.is_some() {
            return Err(MeshError::AlreadyAccepted);
        }
        let incoming = self
            .built
            .control
            .accept(NODE_MESSAGES_PROTOCOL)
            .map_err(|_| MeshError::AlreadyAccepted)?;
        let (tx, rx) = mpsc::channel(self.config.node_messages.inbox_max.max(1));
        self.node_messages = Some((incoming, tx));
        Ok(rx)
    }

    /// Runs until `shutdown` resolves. `destination` is `None` for a pure relay (final
    /// payloads are then dropped with [`DropReason::NoDestination`] by the router).
    ///
    /// Returns an error when one of the mesh's tasks fails; the handle's
    /// [`MeshHandle::is_healthy`] is false from then on.
    pub async fn run(
        self,
        destination: Option<Arc<dyn LocalDestination>>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), MeshError> {
        let MeshRunner {
            shared,
            config,
            network,
            identity,
            roles,
            epoch_keys,
            keys,
            keys_epoch,
            tags,
            store,
            built,
            inbox,
            node_messages,
        } = self;
        let mut router = Router::new(shared.node_id, config.router.clone(), destination.is_some());
        let public = crate::keys::public_keys(&keys);
        router.set_keys(keys);
        router.restore_replay_tags(tags);

        let (capacity_tx, capacity_rx) = watch::channel(streams::Admission::of(&router));
        let (persist, persist_thread) = engine::Persist::start(store, shared.clone())?;
        let (pool, peel_threads) =
            peel::PeelPool::start(peel::workers(config.peel_workers), config.peel_queue_max)?;
        let swarm::Built {
            swarm,
            control,
            packets_in,
            acked_in,
            clients_in,
        } = built;

        let mut tasks = tokio::task::JoinSet::new();
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Vec::new()));
        let (command_tx, command_rx) = mpsc::channel(8);
        let swarm_task = swarm::SwarmTask::new(
            swarm,
            &config,
            &identity,
            roles,
            public,
            snapshot_tx,
            command_rx,
            shared.clone(),
        );
        let own_descriptor = swarm_task.own_descriptor();
        tasks.spawn(swarm_task.run());
        tasks.spawn(engine::directory_task(snapshot_rx, shared.clone()));
        if let Some(network) = network {
            let (epochs_tx, epochs_rx) = watch::channel(None);
            submit::spawn(
                &mut tasks,
                &network,
                own_descriptor,
                epochs_rx,
                shared.clone(),
            );
            tasks.spawn(engine::consensus_task(
                network,
                Duration::from_millis(config.consensus_poll_ms),
                config.consensus_grace(),
                epochs_tx,
                shared.clone(),
            ));
        }
        tasks.spawn(engine::epoch_task(
            epoch_keys,
            config.router.epoch_len_ms,
            keys_epoch,
            command_tx,
            shared.clone(),
        ));
        tasks.spawn(streams::accept_peers(
            packets_in,
            shared.inbox.clone(),
            Some(capacity_rx),
            config.descriptors_max,
            shared.clone(),
        ));
        tasks.spawn(streams::accept_peers(
            acked_in,
            shared.inbox.clone(),
            None,
            config.descriptors_max,
            shared.clone(),
        ));
        if let Some((incoming, node_inbox)) = node_messages {
            tasks.spawn(node_messages::accept(incoming, node_inbox, shared.clone()));
        }
        if let Some(clients_in) = clients_in {
            tasks.spawn(streams::accept_clients(
                clients_in,
                shared.clone(),
                config.client_streams_max,
            ));
        }

        let core = engine::Core::new(
            router,
            pool,
            inbox,
            persist,
            control,
            destination,
            capacity_tx,
            shared.clone(),
            config.peer_queue_max,
            config.peel_inline,
        );
        let result = tokio::select! {
            () = core.run(shutdown) => Ok(()),
            Some(ended) = tasks.join_next() => Err(MeshError::Task(match ended {
                Ok(()) => "a mesh task ended".into(),
                Err(e) if e.is_panic() => "a mesh task panicked".into(),
                Err(_) => "a mesh task was cancelled".into(),
            })),
        };
        shared.stopped.store(true, Ordering::Relaxed);
        shared.node_out.close();
        tasks.shutdown().await;
        // The core (and with it the persistence thread's queue) is gone: wait for the last
        // write to finish and the store to close.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = persist_thread.join();
            // The core's end closed the pool's queue: each thread ends after its packet.
            for thread in peel_threads {
                let _ = thread.join();
            }
        })
        .await;
        result
    }
}
