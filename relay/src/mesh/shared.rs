//! What the mesh's handle and tasks share, below all of them: the state behind
//! [`super::MeshHandle`], the core's event channel ([`RouterEvent`]), the error type and the
//! [`LocalDestination`] trait. The tasks' modules (`engine`, `streams`, `swarm`) import from
//! here, never from `mesh` itself, so that the imports go one way: `mesh` → `engine` →
//! `swarm` → `streams` → `shared`, `metrics`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, RwLock};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use whispr_protocol::directory::Directory;
use whispr_protocol::sphinx::{Packet, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, NodeId};

use super::metrics::Metrics;
use crate::config::ConfigError;
use crate::keys::KeyFileError;
use crate::router::{ClientId, Delivery, DropReason, Source};
use crate::storage::StoreError;

/// Where final payloads for this node go (the mailbox or timer core of an embedding node).
pub trait LocalDestination: Send + Sync + 'static {
    /// A final payload for this node (mailbox deposit, timer hold…). Must not block: spawn if
    /// it must wait.
    fn deliver(&self, delivery: Delivery);
}

/// A mesh failure.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// A key file could not be read or created.
    #[error("keys: {0}")]
    Keys(#[from] KeyFileError),
    /// The replay store failed.
    #[error("replay store: {0}")]
    Storage(#[from] StoreError),
    /// The transport could not be built.
    #[error("transport: {0}")]
    Transport(String),
    /// A listen address could not be bound (the message names the `mesh.listen` index).
    #[error("listen: {0}")]
    Listen(String),
    /// The mesh has stopped.
    #[error("the mesh has stopped")]
    Stopped,
    /// A bounded queue is full; try again later.
    #[error("queue full")]
    QueueFull,
    /// The first hop of a locally sent packet is not in the directory.
    #[error("first hop not in the directory")]
    UnknownHop,
    /// The first hop answered a packet sent with [`super::MeshHandle::send_acknowledged`]
    /// with a refusal.
    #[error("first hop refused the packet: {}", .0.label())]
    Refused(DropReason),
    /// No verdict came for a packet sent with [`super::MeshHandle::send_acknowledged`]: the
    /// first hop is down, unreachable or too slow, or the link broke.
    #[error("first hop unreachable: {0}")]
    Unreachable(String),
    /// A task of the mesh failed.
    #[error("mesh task failed: {0}")]
    Task(String),
    /// A reply could not be put into its SURB (too long, or a malformed SURB).
    #[error("reply: {0}")]
    Reply(whispr_protocol::Error),
    /// The destination of a node message is not in the directory (or is this node).
    #[error("destination node not in the directory")]
    UnknownNode,
    /// A node message is longer than `mesh.node_messages.message_max`.
    #[error("node message of {len} bytes, above the {max}-byte limit")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// [`super::MeshRunner::accept_node_messages`] was called twice.
    #[error("node messages are already accepted")]
    AlreadyAccepted,
}

/// Events handled by the core, in one bounded channel.
pub(crate) enum RouterEvent {
    /// A packet to process.
    Packet {
        from: Source,
        bytes: Vec<u8>,
        /// Where to answer with the verdict (clients).
        reply: Option<oneshot::Sender<Result<(), DropReason>>>,
    },
    /// A packet this node originates, for a remote first hop (not processed here).
    Forward { to: NodeId, packet: Packet },
    /// A new directory.
    Directory(Arc<Directory>),
    /// Rotated keys; tags of epochs before `prune_before` can go from the store.
    Keys {
        keys: Vec<(KeyEpoch, SphinxSecretKey)>,
        prune_before: KeyEpoch,
    },
    /// A client connection closed.
    ClientClosed(ClientId),
}

/// Submits a packet and waits for the router's verdict.
pub(crate) async fn submit(
    inbox: &mpsc::Sender<RouterEvent>,
    from: Source,
    bytes: Vec<u8>,
) -> Result<(), DropReason> {
    let (tx, rx) = oneshot::channel();
    let event = RouterEvent::Packet {
        from,
        bytes,
        reply: Some(tx),
    };
    if inbox.send(event).await.is_err() {
        return Err(DropReason::QueueFull);
    }
    rx.await.unwrap_or(Err(DropReason::QueueFull))
}

/// State shared by the handle and the tasks.
pub(super) struct Shared {
    pub(super) node_id: NodeId,
    pub(super) peer_id: PeerId,
    pub(super) inbox: mpsc::Sender<RouterEvent>,
    /// Opens streams for [`super::MeshHandle::send_acknowledged`].
    pub(super) control: libp2p_stream::Control,
    pub(super) next_client: AtomicU64,
    pub(super) directory: RwLock<Arc<Directory>>,
    pub(super) directory_bytes: RwLock<Arc<Vec<u8>>>,
    /// Whether the node pins directory authorities (`mesh.network_file`): then the routing
    /// directory comes from the consensus only, and peers must be its members.
    pub(super) pinned: bool,
    /// The verified consensus, as fetched (served at `GET /v1/consensus`).
    pub(super) consensus_bytes: RwLock<Option<Arc<Vec<u8>>>>,
    /// Who may open packet streams to this node (with a pinned network).
    pub(super) members: RwLock<Arc<Members>>,
    pub(super) listen_addrs: watch::Sender<Vec<Multiaddr>>,
    pub(super) metrics: Metrics,
    pub(super) store_ok: AtomicBool,
    pub(super) keys_ok: AtomicBool,
    pub(super) stopped: AtomicBool,
    /// Node messages: the queues of the per-destination sender tasks, their limits, and the
    /// runtime the sender tasks are spawned on.
    pub(super) node_out: super::node_messages::Outbox,
    /// `mesh.peer_stream_idle_ms`: inbound packet streams idle this long are closed; packet
    /// senders close theirs after half of it.
    pub(super) peer_stream_idle: std::time::Duration,
}

/// The nodes whose packet streams a node with a pinned network accepts: the members of its
/// consensus, and those of the previous one until `previous_until`.
#[derive(Debug, Default)]
pub(crate) struct Members {
    pub(crate) current: HashSet<NodeId>,
    pub(crate) previous: HashSet<NodeId>,
    pub(crate) previous_until: Option<std::time::Instant>,
}

impl Members {
    fn admits(&self, node: &NodeId, now: std::time::Instant) -> bool {
        self.current.contains(node)
            || (self.previous_until.is_some_and(|until| now < until)
                && self.previous.contains(node))
    }
}

impl Shared {
    /// Whether `node` may open a node-message stream to this node: a member of the
    /// directory; with a pinned network, of the consensus (or of the previous one, within the
    /// grace window), as for packet streams.
    pub(super) fn admits_member(&self, node: &NodeId) -> bool {
        if self.pinned {
            read(&self.members).admits(node, std::time::Instant::now())
        } else {
            read(&self.directory).get(node).is_some()
        }
    }

    /// Whether `node` may send packets to this node over a packet stream: always without a
    /// pinned network; with one, only a member of the consensus (or of the previous one,
    /// within the grace window).
    pub(super) fn admits_peer(&self, node: &NodeId) -> bool {
        !self.pinned || read(&self.members).admits(node, std::time::Instant::now())
    }
}

/// Reads a value behind a lock (a panicked writer left it whole: every write is one store).
pub(super) fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Replaces a value behind a lock.
pub(super) fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}
