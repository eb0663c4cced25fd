//! Routes, per-hop delays and reply blocks, and the health of relays judged from this
//! client's own acknowledgements.

use std::collections::BTreeMap;
use std::time::Duration;

use whispr_protocol::directory::{Directory, Role, sample_delays};
use whispr_protocol::sphinx::{RouteHop, Surb};
use whispr_protocol::{DestinationAddress, KeyEpoch, MailboxId, NodeId, ReplyKey};

use super::{ClientCore, RELAY_HEALTH_MAX, RELAY_HEALTH_WINDOW_MS};
use crate::error::{ClientError, Result};
use crate::state::{OwnedMailbox, PendingSurb, RelayHealth, SurbPurpose};

impl ClientCore {
    fn mix_layers(&self, dir: &Directory) -> u32 {
        if let Some(l) = self.state.settings.mix_layers {
            return l.clamp(1, 3);
        }
        let deepest = dir
            .nodes()
            .filter(|n| n.has_role(Role::Mix))
            .map(|n| n.mix_layer)
            .max()
            .unwrap_or(1);
        deepest.clamp(1, 3)
    }

    /// A route for `epoch` to `destination` that avoids suspect mixes when the directory
    /// allows it (see [`Self::suspects`]), else any route.
    pub(super) fn route(
        &mut self,
        dir: &Directory,
        epoch: KeyEpoch,
        destination: &NodeId,
    ) -> Result<Vec<RouteHop>> {
        let layers = self.mix_layers(dir);
        let suspects = self.suspects(dir);
        dir.select_route_avoiding(&mut self.rng, epoch, destination, layers, &suspects)
            .or_else(|_| dir.select_route(&mut self.rng, epoch, destination, layers))
            .map_err(|e| ClientError::NoRoute(e.to_string()))
    }

    /// Relays (edges and mixes) this client avoids, judged from its own routes within the
    /// window (the last minute, at least three `retransmit_after_ms`). Every lost route blames
    /// all its relays, the edge included, and every acknowledged one credits them: an edge
    /// that drops packets is charged like the mixes it drops them for. A relay is suspect
    /// after two losses in a row since its last ack, or at least two losses and more losses
    /// than acks. Of each group of n relays (the edges; each mix layer) at most
    /// `max(1, ⌊n/3⌋)` are avoided, the worst first, and never all of them: an adversary that
    /// makes honest relays lose packets pushes routes onto its own relays only that far. With
    /// a of a layer's n mixes it carries at most a / (n − max(1, ⌊n/3⌋)) of the routes (one
    /// mix of three: half), where the old rule (any loss run longer than another mix's) gave
    /// it all of them.
    pub(super) fn suspects(&self, dir: &Directory) -> Vec<NodeId> {
        let now = self.now;
        let window =
            RELAY_HEALTH_WINDOW_MS.max(self.state.settings.retransmit_after_ms.saturating_mul(3));
        /// (acked routes, lost routes, losses since the last ack) of one relay.
        type Score = (u32, u32, u32);
        let score = |node: &NodeId| -> Score {
            let hex_id = hex::encode(node.0);
            let Some(h) = self.state.relay_health.iter().find(|h| h.node == hex_id) else {
                return (0, 0, 0);
            };
            h.outcomes
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) < window)
                .fold((0, 0, 0), |(ok, lost, run), (_, good)| {
                    if *good {
                        (ok + 1, lost, 0)
                    } else {
                        (ok, lost + 1, run + 1)
                    }
                })
        };
        // Group 0: the edges; group k: mix layer k.
        let mut groups: BTreeMap<u32, Vec<(NodeId, Score)>> = BTreeMap::new();
        for n in dir.nodes() {
            if n.has_role(Role::Edge) {
                groups
                    .entry(0)
                    .or_default()
                    .push((n.node_id, score(&n.node_id)));
            }
            if n.has_role(Role::Mix) && n.mix_layer > 0 {
                groups
                    .entry(n.mix_layer)
                    .or_default()
                    .push((n.node_id, score(&n.node_id)));
            }
        }
        let mut out = Vec::new();
        for relays in groups.values() {
            let n = relays.len();
            let cap = if n < 2 { 0 } else { (n / 3).max(1).min(n - 1) };
            let mut bad: Vec<&(NodeId, Score)> = relays
                .iter()
                .filter(|(_, (ok, lost, run))| *run >= 2 || (*lost >= 2 && lost > ok))
                .collect();
            // Worst first: the longest run of losses, then the most net losses.
            bad.sort_by_key(|(node, (ok, lost, run))| {
                (
                    std::cmp::Reverse(*run),
                    std::cmp::Reverse(i64::from(*lost) - i64::from(*ok)),
                    *node,
                )
            });
            out.extend(bad.into_iter().take(cap).map(|(node, _)| *node));
        }
        out
    }

    pub(super) fn record_health(&mut self, mixes: &[String], ok: bool) {
        let now = self.now;
        for n in mixes {
            let pos = match self.state.relay_health.iter().position(|h| h.node == *n) {
                Some(p) => p,
                None => {
                    if self.state.relay_health.len() >= RELAY_HEALTH_MAX {
                        self.state.relay_health.remove(0);
                    }
                    self.state.relay_health.push(RelayHealth {
                        node: n.clone(),
                        outcomes: Default::default(),
                    });
                    self.state.relay_health.len() - 1
                }
            };
            if let Some(h) = self.state.relay_health.get_mut(pos) {
                h.outcomes.push_back((now, ok));
                while h.outcomes.len() > 64 {
                    h.outcomes.pop_front();
                }
            }
        }
    }

    pub(super) fn delays(&mut self, n: usize) -> Vec<Duration> {
        let mean = Duration::from_millis(self.state.settings.mix_delay_ms);
        if mean.is_zero() {
            vec![Duration::ZERO; n]
        } else {
            sample_delays(&mut self.rng, n, mean)
        }
    }

    /// A SURB leading back into `mailbox`, remembered under `purpose`, for attempt `attempt`
    /// of what it answers: into the replica this client reads from (the last one known to
    /// answer) for the first two attempts, then into the next ones in turn (see
    /// [`own_replica`]; the reply is replicated to the others).
    pub(super) fn new_surb(
        &mut self,
        dir: &Directory,
        mailbox: &OwnedMailbox,
        attempt: u32,
        purpose: SurbPurpose,
        epoch: KeyEpoch,
        expires_ms: u64,
    ) -> Result<Surb> {
        let node = own_replica(dir, mailbox, attempt);
        let route = self.route(dir, epoch, &node)?;
        // The replier (a mailbox or timer node) sends straight into the first mix layer.
        let hops: Vec<RouteHop> = route.into_iter().skip(1).collect();
        self.last_surb_route = hops
            .iter()
            .take(hops.len().saturating_sub(1))
            .map(|h| hex::encode(h.node.0))
            .collect();
        let delays = self.delays(hops.len().saturating_sub(1));
        let id = MailboxId(mailbox.id);
        let surb_id = ReplyKey(mailbox.reply_key).mint_surb_id(&mut self.rng, &id);
        let (surb, recovery) = self.codec.create_surb(
            &mut self.crypto_rng,
            &hops,
            &delays,
            DestinationAddress::mailbox(&id),
            surb_id,
        )?;
        let max = self.state.settings.surbs_max.max(1);
        if self.state.surbs.len() >= max {
            // The oldest outstanding ack is forgotten: at worst its fragment is retransmitted.
            let excess = self.state.surbs.len() + 1 - max;
            self.state.surbs.drain(..excess);
        }
        self.state.surbs.push(PendingSurb {
            id: hex::encode(surb_id.as_bytes()),
            recovery,
            purpose,
            expires_ms,
        });
        Ok(surb)
    }
}

/// Where the ack of attempt `attempt` goes among the replicas of own mailbox `m` that exist
/// and are in `dir`, in pinned order starting from the one read from: that one for attempts 0
/// and 1, then the next ones in turn (attempt k ≥ 1 → the (k − 1)-th after it).
///
/// The replica read from is the one last known to answer; a dead one is passed over by the
/// next read. Before, attempt k went to replica k mod R whatever was read, so with one
/// replica down one attempt in three lost its ack there even when its deposit was stored —
/// on top of the deposits sent to a dead replica of the contact's mailbox (k mod R too), up
/// to two attempts in three were lost, and a message could fail after every attempt while
/// one node was down (seen in `make demo`, one run in four, with a mix down as well).
pub(super) fn own_replica(dir: &Directory, m: &OwnedMailbox, attempt: u32) -> NodeId {
    let mut created: Vec<[u8; 32]> = m
        .replicas
        .iter()
        .filter(|r| r.created)
        .map(|r| r.node)
        .collect();
    if created.is_empty() {
        return NodeId(m.node);
    }
    if let Some(at) = m
        .current()
        .and_then(|r| created.iter().position(|n| *n == r.node))
    {
        created.rotate_left(at);
    }
    NodeId(super::contacts::pick_replica(
        dir,
        &created,
        attempt.saturating_sub(1),
    ))
}
