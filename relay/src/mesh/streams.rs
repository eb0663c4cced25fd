//! The packet and client stream protocols: per-peer sender tasks, inbound readers with
//! backpressure, and the client ingress of edge relays.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use libp2p_stream::{Control, IncomingStreams};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use whispr_protocol::NodeId;
use whispr_protocol::sphinx::{PACKET_SIZE, Packet};

use super::metrics::Metrics;
use super::probe::{self, Stage};
use super::shared::{RouterEvent, Shared, submit};
use crate::router::{DropReason, Source};

/// The packet protocol between nodes: raw frames of exactly `PACKET_SIZE` bytes.
pub const PACKETS_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispr/packets/1");
/// The client protocol of edge relays: frames of `PACKET_SIZE` bytes, each answered with a
/// status byte ([`client_status_code`]).
pub const CLIENT_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispr/client/1");
/// The acknowledged packet protocol between nodes, served by every node: frames of
/// `PACKET_SIZE` bytes from a peer, each answered with the router's verdict as a status byte
/// ([`client_status_code`]). A node that must know its packet was taken (a timer node
/// releasing a held packet) sends it this way instead of on [`PACKETS_PROTOCOL`].
pub const ACKED_PACKETS_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispr/packets-acked/1");

/// First back-off after a failed stream open or write.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest back-off.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Opening a stream (dial included) gives up after this.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// A frame write that makes no progress for this long breaks the stream.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client stream idle for this long is closed.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Concurrent inbound packet streams from one peer, at most.
const PEER_STREAMS_MAX: usize = 4;
/// Longest wait for the verdict on an acknowledged packet.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The status byte answering a client frame on [`CLIENT_PROTOCOL`]:
///
/// | code | meaning |
/// |---|---|
/// | 0 | accepted |
/// | 1 | `wrong_size` |
/// | 2 | `unknown_epoch` |
/// | 3 | `malformed` |
/// | 4 | `replay` |
/// | 5 | `replay_filter_full` |
/// | 6 | `queue_full` (also: the relay is shutting down) |
/// | 7 | `rate_limited` |
/// | 8 | `not_edge` |
/// | 9 | `unknown_next_hop` |
/// | 10 | `no_destination` |
/// | 11 | `delay_too_long` |
/// | 12 | `queue_share` (this connection holds its share of the mixing queue: slow down) |
///
/// Other values are reserved; a client should treat them as a refusal.
pub fn client_status_code(verdict: Result<(), DropReason>) -> u8 {
    match verdict {
        Ok(()) => 0,
        Err(DropReason::WrongSize) => 1,
        Err(DropReason::UnknownEpoch) => 2,
        Err(DropReason::Malformed) => 3,
        Err(DropReason::Replay) => 4,
        Err(DropReason::ReplayFilterFull) => 5,
        Err(DropReason::QueueFull) => 6,
        Err(DropReason::RateLimited) => 7,
        Err(DropReason::NotEdge) => 8,
        Err(DropReason::UnknownNextHop) => 9,
        Err(DropReason::NoDestination) => 10,
        Err(DropReason::DelayTooLong) => 11,
        Err(DropReason::QueueShare) => 12,
    }
}

/// The verdict a status byte stands for ([`client_status_code`]); `None` for a reserved value.
pub fn client_status_decode(code: u8) -> Option<Result<(), DropReason>> {
    if code == 0 {
        return Some(Ok(()));
    }
    DropReason::ALL
        .into_iter()
        .find(|r| client_status_code(Err(*r)) == code)
        .map(Err)
}

/// The node id of an Ed25519 peer id (the node id is the Ed25519 public key); `None` for
/// other key types.
pub(crate) fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let bytes = peer.to_bytes();
    let key = bytes.strip_prefix(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20][..])?;
    NodeId::from_slice("peer id", key).ok()
}

/// The peer id of a node.
pub(crate) fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    PeerId::from_bytes(&node.libp2p_peer_id_bytes()).ok()
}

/// Sends the packets of one next hop over one long-lived stream, reopening it (and so
/// re-dialling) with back-off after a failure. A packet whose stream could not be opened or
/// whose write failed is counted in `send_failed` and dropped.
pub(crate) async fn peer_sender(
    peer: PeerId,
    mut packets: mpsc::Receiver<Packet>,
    mut control: Control,
    shared: Arc<Shared>,
) {
    let metrics: &Metrics = &shared.metrics;
    // Closed before the next hop's idle timeout would close it under a packet.
    let idle = shared.peer_stream_idle / 2;
    let mut stream: Option<Stream> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    loop {
        let woke = match stream.as_mut() {
            Some(s) => {
                // The protocol is one way: anything read (end of stream included) means the
                // next hop closed or broke the stream; reopen before the next write.
                let mut probe = [0u8; 1];
                tokio::select! {
                    packet = packets.recv() => SenderWoke::Packet(packet),
                    _ = s.read(&mut probe) => SenderWoke::PeerClosed,
                    () = tokio::time::sleep(idle) => SenderWoke::Idle,
                }
            }
            None => SenderWoke::Packet(packets.recv().await),
        };
        let packet = match woke {
            SenderWoke::Packet(Some(packet)) => packet,
            SenderWoke::Packet(None) => break,
            SenderWoke::PeerClosed => {
                stream = None;
                continue;
            }
            SenderWoke::Idle => {
                if let Some(mut s) = stream.take() {
                    let _ = s.close().await;
                }
                continue;
            }
        };
        let mut frames = vec![packet];
        // Write what else is queued before flushing once.
        while frames.len() < 64 {
            match packets.try_recv() {
                Ok(p) => frames.push(p),
                Err(_) => break,
            }
        }
        let count = frames.len();
        // A stream that breaks on write is usually stale (the peer restarted): reopen at once
        // and write the batch again. Frames that did arrive before the break come twice; the
        // next hop's replay filter drops the copies.
        let mut sent = false;
        for attempt in 0..2 {
            if stream.is_none() {
                if attempt == 0 {
                    tokio::time::sleep_until(next_attempt).await;
                }
                match tokio::time::timeout(
                    OPEN_TIMEOUT,
                    control.open_stream(peer, PACKETS_PROTOCOL),
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
            let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                for frame in &frames {
                    s.write_all(frame.as_bytes()).await?;
                }
                s.flush().await
            })
            .await;
            if matches!(written, Ok(Ok(()))) {
                probe::mark(&shared.node_id, Stage::Written, count);
                sent = true;
                break;
            }
            stream = None;
        }
        if sent {
            backoff = BACKOFF_MIN;
        } else {
            metrics
                .send_failed
                .fetch_add(u64::try_from(count).unwrap_or(u64::MAX), Ordering::Relaxed);
            tracing::debug!(count, "packet stream unavailable; backing off");
            stream = None;
            next_attempt = Instant::now() + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    if let Some(mut s) = stream {
        let _ = s.close().await;
    }
}

/// What a packet sender task woke up for.
enum SenderWoke {
    Packet(Option<Packet>),
    PeerClosed,
    Idle,
}

/// Counts inbound streams per peer, at most `max` each; the count goes down when the guard
/// drops.
#[derive(Clone)]
pub(super) struct PerPeer {
    table: Arc<Mutex<HashMap<NodeId, usize>>>,
    max: usize,
}

pub(super) struct PerPeerGuard {
    table: PerPeer,
    node: NodeId,
}

impl PerPeer {
    pub(super) fn new(max: usize) -> PerPeer {
        PerPeer {
            table: Arc::default(),
            max,
        }
    }

    pub(super) fn enter(&self, node: NodeId) -> Option<PerPeerGuard> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let count = table.entry(node).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count = count.saturating_add(1);
        Some(PerPeerGuard {
            table: self.clone(),
            node,
        })
    }
}

impl Drop for PerPeerGuard {
    fn drop(&mut self) {
        let mut table = self.table.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = table.get_mut(&self.node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.remove(&self.node);
            }
        }
    }
}

/// Which peers the router takes packets from now: the peer readers' backpressure. A peer over
/// its share of the mixing queue is no longer read (TCP then slows it down); the others are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Every peer.
    #[default]
    All,
    /// Every peer but these.
    AllBut(Arc<std::collections::BTreeSet<NodeId>>),
    /// No peer: the queue is full.
    Nobody,
}

impl Admission {
    /// The router's current admission.
    pub(crate) fn of(router: &crate::router::Router) -> Admission {
        match router.blocked_peers() {
            None => Admission::Nobody,
            Some(blocked) if blocked.is_empty() => Admission::All,
            Some(blocked) => Admission::AllBut(Arc::new(blocked.into_iter().collect())),
        }
    }

    fn admits(&self, node: &NodeId) -> bool {
        match self {
            Admission::All => true,
            Admission::AllBut(blocked) => !blocked.contains(node),
            Admission::Nobody => false,
        }
    }
}

/// Accepts inbound packet streams: at most `streams_max` in all and [`PEER_STREAMS_MAX`] per
/// peer; a peer whose id is not an Ed25519 key, or (with a pinned network) that is not a
/// consensus member ([`Shared::admits_peer`]), has its stream closed. With `capacity`, the
/// streams are [`PACKETS_PROTOCOL`] ones (read while the router admits the peer); without,
/// [`ACKED_PACKETS_PROTOCOL`] ones (every frame answered with its verdict).
pub(crate) async fn accept_peers(
    mut incoming: IncomingStreams,
    inbox: mpsc::Sender<RouterEvent>,
    capacity: Option<watch::Receiver<Admission>>,
    streams_max: usize,
    shared: Arc<Shared>,
) {
    let limit = Arc::new(Semaphore::new(streams_max.max(1)));
    let per_peer = PerPeer::new(PEER_STREAMS_MAX);
    let mut readers = JoinSet::new();
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(s) => s,
                None => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
        };
        let refuse = || {
            shared
                .metrics
                .peer_streams_refused
                .fetch_add(1, Ordering::Relaxed);
        };
        let Some(node) = node_id_of(&peer) else {
            refuse();
            drop(stream);
            continue;
        };
        // With a pinned network, only consensus members send packets.
        if !shared.admits_peer(&node) {
            refuse();
            drop(stream);
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refuse();
            continue;
        };
        let Some(guard) = per_peer.enter(node) else {
            refuse();
            continue;
        };
        match &capacity {
            Some(capacity) => readers.spawn(read_peer(
                node,
                stream,
                inbox.clone(),
                capacity.clone(),
                shared.clone(),
                (permit, guard),
            )),
            None => readers.spawn(serve_acked_peer(
                node,
                stream,
                inbox.clone(),
                shared.clone(),
                (permit, guard),
            )),
        };
    }
}

async fn read_peer<G: Send>(
    node: NodeId,
    mut stream: Stream,
    inbox: mpsc::Sender<RouterEvent>,
    mut capacity: watch::Receiver<Admission>,
    shared: Arc<Shared>,
    _guards: G,
) {
    loop {
        // Backpressure: read the next frame only when the router takes this peer's packets.
        if capacity.wait_for(|a| a.admits(&node)).await.is_err() {
            break;
        }
        let mut frame = vec![0u8; PACKET_SIZE];
        match tokio::time::timeout(shared.peer_stream_idle, stream.read_exact(&mut frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                shared
                    .metrics
                    .peer_streams_idle
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        probe::mark(&shared.node_id, Stage::Read, 1);
        // A member dropped from the consensus (past the grace window) loses its stream.
        if !shared.admits_peer(&node) {
            break;
        }
        let event = RouterEvent::Packet {
            from: Source::Peer(node),
            bytes: frame,
            reply: None,
        };
        if inbox.send(event).await.is_err() {
            break;
        }
    }
    let _ = stream.close().await;
}

/// Answers the frames of one [`ACKED_PACKETS_PROTOCOL`] stream with their verdicts.
async fn serve_acked_peer<G: Send>(
    node: NodeId,
    mut stream: Stream,
    inbox: mpsc::Sender<RouterEvent>,
    shared: Arc<Shared>,
    _guards: G,
) {
    loop {
        let mut frame = vec![0u8; PACKET_SIZE];
        match tokio::time::timeout(CLIENT_IDLE_TIMEOUT, stream.read_exact(&mut frame)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        if !shared.admits_peer(&node) {
            break;
        }
        let verdict = submit(&inbox, Source::Peer(node), frame).await;
        let answered = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&[client_status_code(verdict)]).await?;
            stream.flush().await
        })
        .await;
        if !matches!(answered, Ok(Ok(()))) {
            break;
        }
    }
    let _ = stream.close().await;
}

/// Sends one packet to `peer` on a fresh [`ACKED_PACKETS_PROTOCOL`] stream and returns the
/// peer's verdict; `Err` (a message without identifiers) when no verdict came: the stream
/// could not be opened (peer down, unreachable, or not speaking the protocol), broke, or the
/// answer did not come in time.
pub(crate) async fn send_acknowledged(
    mut control: Control,
    peer: PeerId,
    packet: &Packet,
) -> Result<Result<(), DropReason>, String> {
    let mut stream = match tokio::time::timeout(
        OPEN_TIMEOUT,
        control.open_stream(peer, ACKED_PACKETS_PROTOCOL),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err("cannot open a stream to the first hop".into()),
        Err(_) => return Err("opening a stream to the first hop timed out".into()),
    };
    let exchanged = tokio::time::timeout(WRITE_TIMEOUT.saturating_add(ANSWER_TIMEOUT), async {
        stream.write_all(packet.as_bytes()).await?;
        stream.flush().await?;
        let mut code = [0u8; 1];
        stream.read_exact(&mut code).await?;
        Ok::<u8, std::io::Error>(code[0])
    })
    .await;
    let _ = stream.close().await;
    match exchanged {
        Ok(Ok(code)) => {
            client_status_decode(code).ok_or_else(|| format!("reserved status byte {code}"))
        }
        Ok(Err(_)) => Err("the stream to the first hop broke".into()),
        Err(_) => Err("no verdict from the first hop in time".into()),
    }
}

/// Client streams one peer may hold open at once (more are closed at once).
pub(crate) const CLIENT_STREAMS_PER_PEER: usize = 4;

/// The rate-limited client each peer is, while it has a stream open: every stream of one peer
/// shares one budget (issue 16: libp2p client streams are rate limited per peer, not per
/// stream; before, every new stream brought a fresh budget). The router forgets the client
/// when its last stream closes.
#[derive(Clone, Default)]
struct ClientPeers {
    table: Arc<Mutex<HashMap<libp2p::PeerId, (crate::router::ClientId, usize)>>>,
}

impl ClientPeers {
    /// The peer's client id and one more stream for it, or `None` past
    /// [`CLIENT_STREAMS_PER_PEER`].
    fn enter(&self, peer: libp2p::PeerId, shared: &Shared) -> Option<crate::router::ClientId> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = table.entry(peer).or_insert_with(|| {
            (
                crate::router::ClientId(shared.next_client.fetch_add(1, Ordering::Relaxed)),
                0,
            )
        });
        if entry.1 >= CLIENT_STREAMS_PER_PEER {
            return None;
        }
        entry.1 += 1;
        Some(entry.0)
    }

    /// One stream of `peer` closed; true when it was its last.
    fn leave(&self, peer: &libp2p::PeerId) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = table.get_mut(peer) else {
            return false;
        };
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            table.remove(peer);
            return true;
        }
        false
    }
}

/// Accepts client streams, at most `streams_max` at once and [`CLIENT_STREAMS_PER_PEER`] per
/// peer (others are closed at once).
pub(crate) async fn accept_clients(
    mut incoming: IncomingStreams,
    shared: Arc<Shared>,
    streams_max: usize,
) {
    let limit = Arc::new(Semaphore::new(streams_max.max(1)));
    let peers = ClientPeers::default();
    let mut clients = JoinSet::new();
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(s) => s,
                None => break,
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared
                .metrics
                .client_streams_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let Some(client) = peers.enter(peer, &shared) else {
            shared
                .metrics
                .client_streams_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let (shared, peers) = (shared.clone(), peers.clone());
        clients.spawn(async move {
            serve_client(stream, &shared, client).await;
            drop(permit);
            if peers.leave(&peer) {
                let _ = shared.inbox.send(RouterEvent::ClientClosed(client)).await;
            }
        });
    }
}

async fn serve_client(mut stream: Stream, shared: &Shared, client: crate::router::ClientId) {
    let metrics = &shared.metrics;
    metrics.client_streams.fetch_add(1, Ordering::Relaxed);
    loop {
        let mut frame = vec![0u8; PACKET_SIZE];
        match tokio::time::timeout(CLIENT_IDLE_TIMEOUT, stream.read_exact(&mut frame)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        let verdict = submit(&shared.inbox, Source::Client(client), frame).await;
        let code = client_status_code(verdict);
        let answered = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&[code]).await?;
            stream.flush().await
        })
        .await;
        if !matches!(answered, Ok(Ok(()))) {
            break;
        }
    }
    let _ = stream.close().await;
    metrics.client_streams.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        assert_eq!(client_status_decode(0), Some(Ok(())));
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            let code = client_status_code(Err(reason));
            assert_eq!(usize::from(code), i + 1);
            assert_eq!(client_status_decode(code), Some(Err(reason)));
        }
        assert_eq!(client_status_decode(200), None);
    }

    #[test]
    fn peer_ids_and_node_ids_convert() {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let node = node_id_of(&peer).unwrap();
        assert_eq!(peer_id_of(&node), Some(peer));
        assert_eq!(node.libp2p_peer_id_bytes(), peer.to_bytes());
    }
}
