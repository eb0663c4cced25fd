//! The core task that owns the [`Router`], the replay-store thread, and the directory and
//! key-epoch tasks.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p_stream::Control;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use whispr_protocol::consensus::{CONSENSUS_LEN_MAX, Consensus, Network, VerifiedConsensus};
use whispr_protocol::directory::{Directory, SignedDescriptor};
use whispr_protocol::sphinx::{Packet, ReplayTag};
use whispr_protocol::{KeyEpoch, NodeId};

use super::peel::{PeelPool, Reply};
use super::probe::{self, Stage};
use super::shared::{LocalDestination, Members, MeshError, RouterEvent, Shared, write};
use super::streams;
use super::swarm::SwarmCommand;
use crate::keys::EpochKeys;
use crate::router::{DropReason, Input, Output, PeelTicket, Peeled, Router};
use crate::storage::ReplayStore;

enum PersistCmd {
    Write {
        batch: u64,
        tags: Vec<(KeyEpoch, ReplayTag)>,
    },
    Prune(KeyEpoch),
}

enum PersistDone {
    Written(u64),
    Pruned,
    Failed,
}

/// The replay store's thread and the group commit in front of it: one write in flight;
/// tags that arrive meanwhile go into the next write.
pub(crate) struct Persist {
    commands: mpsc::Sender<PersistCmd>,
    done: mpsc::Receiver<PersistDone>,
    in_flight: bool,
    pending: Vec<(KeyEpoch, ReplayTag)>,
    pending_batch: Option<u64>,
    pending_prune: Option<KeyEpoch>,
    failed: bool,
}

impl Persist {
    /// Starts the thread owning `store`.
    pub(crate) fn start(
        mut store: Box<dyn ReplayStore>,
        shared: Arc<Shared>,
    ) -> Result<(Persist, std::thread::JoinHandle<()>), MeshError> {
        let (commands, mut command_rx) = mpsc::channel::<PersistCmd>(2);
        let (done_tx, done) = mpsc::channel(2);
        let thread = std::thread::Builder::new()
            .name("whispr-replay-store".into())
            .spawn(move || {
                while let Some(command) = command_rx.blocking_recv() {
                    let started = std::time::Instant::now();
                    let result = match command {
                        PersistCmd::Write { batch, tags } => {
                            store.persist(&tags).map(|()| PersistDone::Written(batch))
                        }
                        PersistCmd::Prune(epoch) => {
                            store.prune_before(epoch).map(|()| PersistDone::Pruned)
                        }
                    };
                    if result.is_ok() {
                        shared.metrics.replay_sync.observe(started.elapsed());
                    }
                    let done = result.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "replay store write failed; node unhealthy");
                        PersistDone::Failed
                    });
                    if done_tx.blocking_send(done).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| MeshError::Task(format!("replay store thread: {e}")))?;
        Ok((
            Persist {
                commands,
                done,
                in_flight: false,
                pending: Vec::new(),
                pending_batch: None,
                pending_prune: None,
                failed: false,
            },
            thread,
        ))
    }

    fn add(&mut self, batch: u64, tags: Vec<(KeyEpoch, ReplayTag)>) {
        if self.failed {
            // Nothing becomes durable any more; the packets waiting stay held (and the
            // queue fills up, so the node stops taking packets) until a restart.
            return;
        }
        self.pending.extend(tags);
        self.pending_batch = Some(batch);
        self.kick();
    }

    fn prune(&mut self, epoch: KeyEpoch) {
        self.pending_prune = Some(epoch);
        self.kick();
    }

    fn kick(&mut self) {
        if self.in_flight || self.failed {
            return;
        }
        let command = if let Some(batch) = self.pending_batch.take() {
            PersistCmd::Write {
                batch,
                tags: std::mem::take(&mut self.pending),
            }
        } else if let Some(epoch) = self.pending_prune.take() {
            PersistCmd::Prune(epoch)
        } else {
            return;
        };
        // One command in flight at a time, so the channel always has room.
        if self.commands.try_send(command).is_err() {
            self.failed = true;
        } else {
            self.in_flight = true;
        }
    }
}

/// The core: owns the router; the Sphinx peels run in the [`PeelPool`].
pub(crate) struct Core {
    router: Router,
    pool: PeelPool,
    inbox: mpsc::Receiver<RouterEvent>,
    persist: Persist,
    control: Control,
    destination: Option<Arc<dyn LocalDestination>>,
    capacity: watch::Sender<streams::Admission>,
    shared: Arc<Shared>,
    peer_queue_max: usize,
    /// `mesh.peel_inline`: peel a lone packet in this task rather than in the pool.
    peel_inline: bool,
    peers: HashMap<NodeId, mpsc::Sender<Packet>>,
    senders: JoinSet<()>,
    directory: Arc<Directory>,
}

/// Events handled per wake-up before outputs are drained.
const EVENTS_PER_STEP: usize = 256;

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        router: Router,
        pool: PeelPool,
        inbox: mpsc::Receiver<RouterEvent>,
        persist: Persist,
        control: Control,
        destination: Option<Arc<dyn LocalDestination>>,
        capacity: watch::Sender<streams::Admission>,
        shared: Arc<Shared>,
        peer_queue_max: usize,
        peel_inline: bool,
    ) -> Core {
        Core {
            router,
            pool,
            inbox,
            persist,
            control,
            destination,
            capacity,
            shared,
            peer_queue_max: peer_queue_max.max(1),
            peel_inline,
            peers: HashMap::new(),
            senders: JoinSet::new(),
            directory: Arc::new(Directory::default()),
        }
    }

    /// Runs until `shutdown` resolves.
    pub(crate) async fn run(mut self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut persist_alive = true;
        // Start-up: release anything due (nothing is held yet) and publish the gauges.
        let _ = self.input(Input::Timeout);
        self.after_step();
        loop {
            let wake = self.router.poll_timeout().map(|at| {
                Duration::from_millis(at.0.saturating_sub(whispr_node_kit::clock::now().0))
            });
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                done = self.persist.done.recv(), if persist_alive => match done {
                    Some(done) => self.persisted(done),
                    None => {
                        persist_alive = false;
                        self.persist.failed = true;
                        self.shared.store_ok.store(false, Ordering::Relaxed);
                    }
                },
                alive = self.pool.recv(), if self.pool.is_busy() => {
                    if !alive {
                        tracing::error!("every peel thread is gone; the core stops");
                        break;
                    }
                    self.pool.collect();
                    self.finish_peeled();
                }
                // While `peel_queue_max` packets are out, no event is read (backpressure).
                event = self.inbox.recv(), if self.pool.has_room() => {
                    let Some(event) = event else { break };
                    self.event(event);
                    for _ in 1..EVENTS_PER_STEP {
                        if !self.pool.has_room() {
                            break;
                        }
                        match self.inbox.try_recv() {
                            Ok(event) => self.event(event),
                            Err(_) => break,
                        }
                    }
                }
                () = sleep_opt(wake) => {
                    let _ = self.input(Input::Timeout);
                }
                Some(_) = self.senders.join_next(), if !self.senders.is_empty() => {}
            }
            self.after_step();
        }
    }

    fn input(&mut self, input: Input) -> Result<(), DropReason> {
        let result = self
            .router
            .handle_input(whispr_node_kit::clock::now(), input);
        self.drain();
        result
    }

    fn event(&mut self, event: RouterEvent) {
        match event {
            RouterEvent::Packet { from, bytes, reply } => {
                probe::mark(&self.shared.node_id, Stage::CoreIn, 1);
                // Admission (role, queue share, rate limit) here; the peel in the pool; the
                // rest (replay filter, queue) in `finish_peeled`, in admission order.
                let admitted = self.router.admit(whispr_node_kit::clock::now(), from);
                self.drain();
                let refused = match admitted {
                    // With `mesh.peel_inline`, a lone packet (no peel out, so none to keep the
                    // order with, and no other event waiting) is peeled here: two thread
                    // hand-offs less.
                    Ok(ticket)
                        if self.peel_inline && !self.pool.is_busy() && self.inbox.is_empty() =>
                    {
                        let peeled =
                            std::panic::catch_unwind(AssertUnwindSafe(|| ticket.peel(&bytes))).ok();
                        self.finish_one(ticket, peeled, reply);
                        return;
                    }
                    Ok(ticket) => match self.pool.submit(ticket, bytes, reply) {
                        Ok(()) => return,
                        Err((ticket, reply)) => {
                            self.router.abandon(ticket);
                            (DropReason::QueueFull, reply)
                        }
                    },
                    Err(reason) => (reason, reply),
                };
                if let (reason, Some(reply)) = refused {
                    let _ = reply.send(Err(reason));
                }
            }
            RouterEvent::Forward { to, packet } => {
                if self.directory.get(&to).is_some() {
                    self.send(to, packet);
                } else {
                    self.shared
                        .metrics
                        .send_failed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            RouterEvent::Directory(directory) => {
                // Senders of nodes that left the directory end once their queue is drained.
                self.peers.retain(|node, _| directory.get(node).is_some());
                self.directory = directory.clone();
                let _ = self.input(Input::Directory(directory));
            }
            RouterEvent::Keys { keys, prune_before } => {
                self.router.set_keys(keys);
                self.persist.prune(prune_before);
                let _ = self.input(Input::Timeout);
            }
            RouterEvent::ClientClosed(client) => {
                let _ = self.input(Input::ClientClosed(client));
            }
        }
    }

    /// Hands the peeled packets back to the router, in the order they were admitted.
    fn finish_peeled(&mut self) {
        while let Some(done) = self.pool.next_ready() {
            self.finish_one(done.ticket, done.peeled, done.reply);
        }
    }

    /// Hands one peeled packet back to the router (`peeled` is `None` when peeling panicked)
    /// and answers its sender if one waits.
    fn finish_one(&mut self, ticket: PeelTicket, peeled: Option<Peeled>, reply: Reply) {
        let verdict = match peeled {
            Some(peeled) => self
                .router
                .finish(whispr_node_kit::clock::now(), ticket, peeled),
            None => {
                // Peeling panicked (a bug, not an input the protocol allows).
                self.router.abandon(ticket);
                Err(DropReason::Malformed)
            }
        };
        probe::mark(&self.shared.node_id, Stage::Peeled, 1);
        self.drain();
        if let Some(reply) = reply {
            let _ = reply.send(verdict);
        }
    }

    fn persisted(&mut self, done: PersistDone) {
        self.persist.in_flight = false;
        match done {
            PersistDone::Written(batch) => {
                let _ = self.input(Input::TagsDurable { batch });
            }
            PersistDone::Pruned => {}
            PersistDone::Failed => {
                self.persist.failed = true;
                self.persist.pending.clear();
                self.persist.pending_batch = None;
                self.shared.store_ok.store(false, Ordering::Relaxed);
            }
        }
        self.persist.kick();
    }

    fn drain(&mut self) {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Send { to, packet, held } => {
                    self.shared.metrics.observe_hold(held);
                    probe::mark(&self.shared.node_id, Stage::Released, 1);
                    self.send(to, packet);
                }
                Output::Deliver(delivery) => {
                    probe::mark(&self.shared.node_id, Stage::Released, 1);
                    if let Some(destination) = &self.destination {
                        destination.deliver(delivery);
                    }
                }
                Output::PersistTags { batch, tags } => self.persist.add(batch, tags),
                Output::Drop { reason } => {
                    tracing::debug!(reason = reason.label(), "packet dropped");
                }
            }
        }
    }

    fn send(&mut self, to: NodeId, packet: Packet) {
        let sender = match self.peers.get(&to) {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let Some(peer) = streams::peer_id_of(&to) else {
                    self.shared
                        .metrics
                        .send_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let (tx, rx) = mpsc::channel(self.peer_queue_max);
                self.senders.spawn(streams::peer_sender(
                    peer,
                    rx,
                    self.control.clone(),
                    self.shared.clone(),
                ));
                self.peers.entry(to).insert_entry(tx).into_mut()
            }
        };
        if sender.try_send(packet).is_err() {
            self.shared
                .metrics
                .send_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn after_step(&mut self) {
        let admission = streams::Admission::of(&self.router);
        self.capacity.send_if_modified(|held| {
            let changed = *held != admission;
            *held = admission;
            changed
        });
        let metrics = &self.shared.metrics;
        metrics.set_stats(self.router.stats());
        metrics.queue_depth.store(
            u64::try_from(self.router.queue_len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        metrics.replay_tags.store(
            u64::try_from(self.router.replay_tags()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Rebuilds the directory from the latest snapshot of descriptors, then hands it to the core
/// and the handle. Snapshots sent while a build runs are coalesced (a watch channel).
pub(crate) async fn directory_task(
    mut snapshots: watch::Receiver<Arc<Vec<SignedDescriptor>>>,
    shared: Arc<Shared>,
) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let now = whispr_node_kit::clock::now();
        let built = tokio::task::spawn_blocking(move || {
            let (directory, rejections) = Directory::build(now, &snapshot);
            let rejected: HashSet<usize> = rejections.iter().map(|r| r.index).collect();
            let valid: Vec<SignedDescriptor> = snapshot
                .iter()
                .enumerate()
                .filter(|(i, _)| !rejected.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            (Arc::new(directory), Directory::encode(&valid))
        })
        .await;
        let Ok((directory, bytes)) = built else {
            break;
        };
        if shared.pinned {
            // The routing directory comes from the consensus ([`consensus_task`]); the
            // gossiped descriptors are only served at `GET /v1/directory`, for the
            // authorities to read.
            write(&shared.directory_bytes, Arc::new(bytes));
            continue;
        }
        shared.metrics.directory_nodes.store(
            u64::try_from(directory.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // The router first, then what the node serves and checks against: the inbox is
        // processed in order, so a packet sent by someone who has seen the new directory
        // (`GET /v1/directory`) reaches the router after it, not before (it was refused as
        // `unknown_next_hop` in that window).
        if shared
            .inbox
            .send(RouterEvent::Directory(directory.clone()))
            .await
            .is_err()
        {
            break;
        }
        write(&shared.directory, directory);
        write(&shared.directory_bytes, Arc::new(bytes));
    }
}

/// With a pinned network: fetches the consensus from the authorities every `poll`, verifies
/// it, and hands the router the directory of the newest one (never an older epoch than the
/// one held); updates the members whose packet streams are accepted and the bytes served at
/// `GET /v1/consensus`. The directory is rebuilt at each poll too, as descriptors expire
/// inside a consensus's window.
pub(crate) async fn consensus_task(
    network: Network,
    poll: Duration,
    grace: Duration,
    epochs: watch::Sender<Option<u64>>,
    shared: Arc<Shared>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(http) = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
    else {
        tracing::error!("cannot build the HTTP client for the consensus");
        return;
    };
    let mut held: Option<VerifiedConsensus> = None;
    let mut start = 0usize;
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = whispr_node_kit::clock::now();
        let authorities = network.authorities();
        let count = authorities.len().max(1);
        let mut fresh = None;
        for i in 0..count {
            let Some(authority) = authorities.get((start + i) % count) else {
                continue;
            };
            let url = format!("{}/v1/consensus", authority.url.trim_end_matches('/'));
            let Some(bytes) = fetch_consensus(&http, &url).await else {
                continue;
            };
            let Ok(verified) = Consensus::decode(&bytes).and_then(|c| c.verify(now, &network))
            else {
                tracing::warn!("an authority served a consensus that does not verify");
                continue;
            };
            let newer = match &held {
                None => true,
                Some(h) => {
                    verified.epoch > h.epoch
                        || (verified.epoch == h.epoch && verified.signers.len() > h.signers.len())
                }
            };
            if newer {
                fresh = Some((verified, bytes));
            }
            break;
        }
        start = start.wrapping_add(1);
        let changed_members = match fresh {
            Some((verified, bytes)) => {
                let epoch_changed = held.as_ref().is_none_or(|h| h.epoch != verified.epoch);
                write(&shared.consensus_bytes, Some(Arc::new(bytes)));
                if epoch_changed {
                    epochs.send_replace(Some(verified.epoch));
                    tracing::info!(
                        epoch = verified.epoch,
                        signers = verified.signers.len(),
                        authorities = verified.authorities,
                        nodes = verified.descriptors.len(),
                        "new consensus"
                    );
                }
                shared
                    .metrics
                    .consensus_valid_until_ms
                    .store(verified.valid_until.0, Ordering::Relaxed);
                shared
                    .metrics
                    .consensus_valid_after_ms
                    .store(verified.valid_after.0, Ordering::Relaxed);
                held = Some(verified);
                epoch_changed
            }
            None => false,
        };
        let Some(consensus) = &held else {
            continue;
        };
        if now >= consensus.valid_until {
            tracing::warn!("the consensus held has expired and no newer one could be fetched");
        }
        let directory = Arc::new(Directory::from_consensus(now, consensus));
        let current = super::shared::read(&shared.directory);
        if !changed_members && directory.len() == current.len() {
            continue;
        }
        if changed_members {
            let ids: HashSet<NodeId> = directory.nodes().map(|n| n.node_id).collect();
            let previous = super::shared::read(&shared.members);
            write(
                &shared.members,
                Arc::new(Members {
                    current: ids,
                    previous: previous.current.clone(),
                    previous_until: Some(std::time::Instant::now() + grace),
                }),
            );
        }
        shared.metrics.directory_nodes.store(
            u64::try_from(directory.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if shared
            .inbox
            .send(RouterEvent::Directory(directory.clone()))
            .await
            .is_err()
        {
            break;
        }
        write(&shared.directory, directory);
    }
}

/// `GET url`, at most [`CONSENSUS_LEN_MAX`] bytes; `None` on any failure.
async fn fetch_consensus(http: &reqwest::Client, url: &str) -> Option<Vec<u8>> {
    let mut response = http.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if body.len().saturating_add(chunk.len()) > CONSENSUS_LEN_MAX {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// Rotates the Sphinx keys at each key epoch boundary: the router gets the new secret keys,
/// the swarm task the public ones (and republishes the descriptor), and the replay store
/// forgets the tags of epochs before the previous one.
pub(crate) async fn epoch_task(
    keys: EpochKeys,
    epoch_len_ms: u64,
    mut held_epoch: KeyEpoch,
    swarm: mpsc::Sender<SwarmCommand>,
    shared: Arc<Shared>,
) {
    let epoch_len = Duration::from_millis(epoch_len_ms.max(1));
    loop {
        let now = whispr_node_kit::clock::now();
        let current = KeyEpoch::containing(now, epoch_len);
        if current == held_epoch {
            // Sleep until just past the next boundary.
            let next = current.0.saturating_add(1).saturating_mul(epoch_len_ms);
            let wait = next.saturating_sub(now.0).saturating_add(50);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            continue;
        }
        let rotating = keys.clone();
        let rotated = tokio::task::spawn_blocking(move || rotating.rotate(now)).await;
        match rotated {
            Ok(Ok(secret)) => {
                shared.keys_ok.store(true, Ordering::Relaxed);
                held_epoch = current;
                let public = crate::keys::public_keys(&secret);
                let event = RouterEvent::Keys {
                    keys: secret,
                    prune_before: current.previous().unwrap_or(current),
                };
                if shared.inbox.send(event).await.is_err() {
                    return;
                }
                if swarm.send(SwarmCommand::PublicKeys(public)).await.is_err() {
                    return;
                }
                tracing::info!(epoch = current.0, "sphinx keys rotated");
            }
            Ok(Err(e)) => {
                shared.keys_ok.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "sphinx key rotation failed; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Err(_) => return,
        }
    }
}
