//! The node-to-node message protocol ([`NODE_MESSAGES_PROTOCOL`]): bounded messages between
//! the nodes of the directory over their Noise-authenticated links (mailbox replication).
//!
//! Frames are a u32 big-endian length and that many bytes, at most
//! `mesh.node_messages.message_max`. The sender keeps one long-lived stream per destination,
//! opened on demand by a sender task with a bounded queue; the task closes its stream and
//! ends after `idle_ms / 2` without a message (before the receiver's idle timeout), or when
//! the peer closes the stream, and a new one is started by the next send. The receiver
//! accepts streams only from members of the directory (of the consensus, with a pinned
//! network), at most `streams_per_peer` per peer and `streams_max` in all, and hands the
//! messages with the authenticated sender's node id to the embedding node through a bounded
//! channel, reading no further while that channel is full.
//!
//! Delivery is at most once and in order per (sender, destination) pair as long as the
//! stream holds; a message in a batch whose stream broke is dropped (counted `io`), never
//! sent twice. The embedding node's protocol acknowledges what it needs to.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use libp2p_stream::{Control, IncomingStreams};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use whispr_protocol::NodeId;

use super::metrics::{NodeMessageDrop, StreamClose};
use super::shared::{MeshError, Shared, read};
use super::streams::{
    BACKOFF_MAX, BACKOFF_MIN, OPEN_TIMEOUT, PerPeer, WRITE_TIMEOUT, node_id_of, peer_id_of,
};
use crate::config::NodeMessageConfig;

/// The node-to-node message protocol: frames of a u32 big-endian length and that many bytes
/// (at most `mesh.node_messages.message_max`), one way, on one long-lived stream per ordered
/// pair of nodes. Accepted only by nodes that asked for it
/// ([`super::MeshRunner::accept_node_messages`]), from directory (consensus) members only.
pub const NODE_MESSAGES_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispr/node-msg/1");

/// A received node message: the Noise-authenticated sender's node id (a member of the
/// directory, or of the consensus with a pinned network) and the message's bytes.
pub type NodeMessage = (NodeId, Vec<u8>);

/// Frames written per flush, at most.
const BATCH_MAX: usize = 64;

/// The outbound side: one bounded queue per destination, each drained by a sender task.
pub(crate) struct Outbox {
    queues: Mutex<HashMap<NodeId, mpsc::Sender<Vec<u8>>>>,
    pub(crate) config: NodeMessageConfig,
    runtime: tokio::runtime::Handle,
}

impl Outbox {
    pub(crate) fn new(config: NodeMessageConfig, runtime: tokio::runtime::Handle) -> Outbox {
        Outbox {
            queues: Mutex::new(HashMap::new()),
            config,
            runtime,
        }
    }

    /// Drops every queue: each sender task ends once it has written what its queue holds.
    pub(crate) fn close(&self) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Queues `bytes` for `to` (see [`super::MeshHandle::send_node_message`]).
pub(crate) fn send(shared: &Arc<Shared>, to: NodeId, bytes: Vec<u8>) -> Result<(), MeshError> {
    let metrics = &shared.metrics;
    let out = &shared.node_out;
    let max = out.config.message_max;
    if bytes.len() > max {
        metrics.node_message_dropped(NodeMessageDrop::TooLarge, 1);
        return Err(MeshError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    if shared.stopped.load(Ordering::Relaxed) {
        return Err(MeshError::Stopped);
    }
    let directory = read(&shared.directory);
    let peer = if to == shared.node_id || directory.get(&to).is_none() {
        None
    } else {
        peer_id_of(&to)
    };
    let Some(peer) = peer else {
        metrics.node_message_dropped(NodeMessageDrop::UnknownNode, 1);
        return Err(MeshError::UnknownNode);
    };
    let mut queues = out.queues.lock().unwrap_or_else(|e| e.into_inner());
    let mut bytes = bytes;
    // Twice at most: a sender task that just ended on idle has closed its queue.
    for _ in 0..2 {
        let queue = match queues.get(&to) {
            Some(queue) if !queue.is_closed() => queue,
            _ => {
                // Forget the queues of ended tasks and of nodes that left the directory (their
                // tasks end once they have drained them).
                queues.retain(|node, queue| !queue.is_closed() && directory.get(node).is_some());
                let (tx, rx) = mpsc::channel(out.config.queue_max);
                out.runtime
                    .spawn(sender(peer, rx, shared.control.clone(), shared.clone()));
                queues.entry(to).insert_entry(tx).into_mut()
            }
        };
        match queue.try_send(bytes) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.node_message_dropped(NodeMessageDrop::QueueFull, 1);
                return Err(MeshError::QueueFull);
            }
            Err(mpsc::error::TrySendError::Closed(back)) => {
                queues.remove(&to);
                bytes = back;
            }
        }
    }
    metrics.node_message_dropped(NodeMessageDrop::Io, 1);
    Err(MeshError::Stopped)
}

/// What the sender task woke up for.
enum Woke {
    Message(Option<Vec<u8>>),
    PeerClosed,
    Idle,
}

/// Writes the messages of one destination on one long-lived stream, opening it on demand
/// and again (with back-off) after a failure. Ends when its queue is dropped (shutdown, or
/// the node left the directory) or after `idle_ms / 2` without a message.
async fn sender(
    peer: PeerId,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut control: Control,
    shared: Arc<Shared>,
) {
    let metrics = &shared.metrics;
    let idle = Duration::from_millis(shared.node_out.config.idle_ms) / 2;
    let mut stream: Option<Stream> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    loop {
        let woke = match stream.as_mut() {
            Some(s) => {
                // The protocol is one way: anything read (end of stream included) means the
                // peer closed or broke the stream.
                let mut probe = [0u8; 1];
                tokio::select! {
                    message = queue.recv() => Woke::Message(message),
                    _ = s.read(&mut probe) => Woke::PeerClosed,
                    () = tokio::time::sleep(idle) => Woke::Idle,
                }
            }
            None => tokio::select! {
                message = queue.recv() => Woke::Message(message),
                () = tokio::time::sleep(idle) => Woke::Idle,
            },
        };
        let first = match woke {
            Woke::Message(Some(message)) => message,
            Woke::Message(None) => break,
            Woke::PeerClosed => {
                stream = None;
                continue;
            }
            Woke::Idle => {
                // Refuse new messages (the next send starts a new task); write those queued.
                queue.close();
                continue;
            }
        };
        if shared.stopped.load(Ordering::Relaxed) {
            break;
        }
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match queue.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let mut written = 0usize;
        for attempt in 0..2 {
            if stream.is_none() {
                if attempt == 0 {
                    tokio::time::sleep_until(next_attempt).await;
                }
                match tokio::time::timeout(
                    OPEN_TIMEOUT,
                    control.open_stream(peer, NODE_MESSAGES_PROTOCOL),
                )
                .await
                {
                    Ok(Ok(s)) => stream = Some(s),
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            let Some(s) = stream.as_mut() else {
                break;
            };
            let result = tokio::time::timeout(WRITE_TIMEOUT, async {
                for message in &batch {
                    // `message_max` is at most 16 MiB: the length fits.
                    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
                    s.write_all(&len.to_be_bytes()).await?;
                    s.write_all(message).await?;
                    written = written.saturating_add(1);
                }
                s.flush().await
            })
            .await;
            if matches!(result, Ok(Ok(()))) {
                break;
            }
            stream = None;
            if written > 0 {
                // Some frames may have arrived: never send one twice.
                break;
            }
        }
        let count = batch.len();
        let sent = if stream.is_some() { count } else { written };
        metrics
            .node_messages_sent
            .fetch_add(u64::try_from(sent).unwrap_or(u64::MAX), Ordering::Relaxed);
        if sent < count {
            metrics.node_message_dropped(
                NodeMessageDrop::Io,
                u64::try_from(count - sent).unwrap_or(u64::MAX),
            );
            tracing::debug!(count = count - sent, "node message stream unavailable");
            next_attempt = Instant::now() + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            backoff = BACKOFF_MIN;
        }
    }
    if let Some(mut s) = stream {
        let _ = s.close().await;
    }
}

/// Accepts inbound [`NODE_MESSAGES_PROTOCOL`] streams: from members only
/// ([`Shared::admits_member`]), at most `streams_per_peer` per peer and `streams_max` in all;
/// others are closed at once (counted).
pub(crate) async fn accept(
    mut incoming: IncomingStreams,
    inbox: mpsc::Sender<NodeMessage>,
    shared: Arc<Shared>,
) {
    let config = shared.node_out.config.clone();
    let limit = Arc::new(Semaphore::new(config.streams_max.max(1)));
    let per_peer = PerPeer::new(config.streams_per_peer.max(1));
    let mut readers = JoinSet::new();
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(s) => s,
                None => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
        };
        let metrics = &shared.metrics;
        let Some(node) = node_id_of(&peer).filter(|n| shared.admits_member(n)) else {
            metrics.node_stream_closed(StreamClose::NotMember);
            drop(stream);
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.node_stream_closed(StreamClose::Limit);
            drop(stream);
            continue;
        };
        let Some(guard) = per_peer.enter(node) else {
            metrics.node_stream_closed(StreamClose::Limit);
            drop(stream);
            continue;
        };
        readers.spawn(read_messages(
            node,
            stream,
            inbox.clone(),
            shared.clone(),
            (permit, guard),
        ));
    }
}

/// Reads the frames of one inbound stream and hands them on.
async fn read_messages<G: Send>(
    node: NodeId,
    mut stream: Stream,
    inbox: mpsc::Sender<NodeMessage>,
    shared: Arc<Shared>,
    _guards: G,
) {
    let metrics = &shared.metrics;
    let config = &shared.node_out.config;
    let idle = Duration::from_millis(config.idle_ms);
    let frame = Duration::from_millis(config.frame_ms);
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(())) => {}
            // Closed by the peer, or broken.
            Ok(Err(_)) => break,
            Err(_) => {
                metrics.node_stream_closed(StreamClose::Idle);
                break;
            }
        }
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > config.message_max {
            metrics.node_message_dropped(NodeMessageDrop::TooLarge, 1);
            metrics.node_stream_closed(StreamClose::TooLarge);
            break;
        }
        // The buffer grows with the bytes that come, not with the length announced.
        let mut bytes = Vec::new();
        let limit = u64::try_from(len).unwrap_or(u64::MAX);
        match tokio::time::timeout(frame, (&mut stream).take(limit).read_to_end(&mut bytes)).await {
            Ok(Ok(n)) if n == len => {}
            Ok(_) => {
                metrics.node_message_dropped(NodeMessageDrop::Io, 1);
                break;
            }
            Err(_) => {
                metrics.node_message_dropped(NodeMessageDrop::Io, 1);
                metrics.node_stream_closed(StreamClose::FrameTimeout);
                break;
            }
        }
        // A member dropped from the consensus (past the grace window) loses its stream.
        if !shared.admits_member(&node) {
            metrics.node_message_dropped(NodeMessageDrop::NotMember, 1);
            metrics.node_stream_closed(StreamClose::NotMember);
            break;
        }
        // Backpressure: while the embedding node's channel is full, this stream is not read.
        if inbox.send((node, bytes)).await.is_err() {
            break;
        }
        metrics
            .node_messages_received
            .fetch_add(1, Ordering::Relaxed);
    }
    let _ = stream.close().await;
}
