//! Routes, per-hop delays and reply blocks, and the health of relays judged from this
//! client's own acknowledgements.

use std::collections::{BTreeMap, BTreeSet};
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
    ///
    /// Only relays with a health record are scored (O(records) per route, not O(directory):
    /// a relay without one scores nothing and is never suspect). The size of a group, which
    /// sets its cap, is counted in the directory only when the group has a suspect, and only
    /// as far as needed to know that the cap takes every suspect of it.
    pub(super) fn suspects(&self, dir: &Directory) -> Vec<NodeId> {
        let now = self.now;
        let window =
            RELAY_HEALTH_WINDOW_MS.max(self.state.settings.retransmit_after_ms.saturating_mul(3));
        // Group 0: the edges; group k: mix layer k. Suspects only, with their scores.
        let mut groups: BTreeMap<u32, Vec<(NodeId, Score)>> = BTreeMap::new();
        let mut seen: BTreeSet<NodeId> = BTreeSet::new();
        for h in &self.state.relay_health {
            // A record names its relay in lower-case hex, as `record_health` writes it.
            let Some(node) = parse_node_hex(&h.node) else {
                continue;
            };
            // The first record of a relay is its score.
            if !seen.insert(node) {
                continue;
            }
            let Some(d) = dir.get(&node) else {
                continue;
            };
            let score @ (ok, lost, run) = h
                .outcomes
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) < window)
                .fold((0, 0, 0), |(ok, lost, run), (_, good)| {
                    if *good {
                        (ok + 1, lost, 0)
                    } else {
                        (ok, lost + 1, run + 1)
                    }
                });
            if !(run >= 2 || (lost >= 2 && lost > ok)) {
                continue;
            }
            if d.has_role(Role::Edge) {
                groups.entry(0).or_default().push((node, score));
            }
            if d.has_role(Role::Mix) && d.mix_layer > 0 {
                groups.entry(d.mix_layer).or_default().push((node, score));
            }
        }
        if groups.is_empty() {
            return Vec::new();
        }
        let sizes = group_sizes(dir, &groups);
        let mut out = Vec::new();
        for (g, bad) in &mut groups {
            let n = sizes.get(g).copied().unwrap_or(0);
            // Worst first: the longest run of losses, then the most net losses.
            bad.sort_by_key(|(node, (ok, lost, run))| {
                (
                    std::cmp::Reverse(*run),
                    std::cmp::Reverse(i64::from(*lost) - i64::from(*ok)),
                    *node,
                )
            });
            out.extend(bad.iter().take(group_cap(n)).map(|(node, _)| *node));
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

/// (acked routes, lost routes, losses since the last ack) of one relay.
type Score = (u32, u32, u32);

/// How many relays of a group of `n` may be avoided: `max(1, ⌊n/3⌋)`, never all of them.
fn group_cap(n: usize) -> usize {
    if n < 2 { 0 } else { (n / 3).max(1).min(n - 1) }
}

/// The smallest group size whose cap takes `k` suspects (the cap grows with the size).
fn size_for(k: usize) -> usize {
    if k <= 1 { 2 } else { k.saturating_mul(3) }
}

/// The size of each group of `groups` in `dir` (edges: group 0; mix layer k: group k),
/// counted until every group is known to be at least large enough for its cap to take all of
/// its suspects: then the exact size no longer matters. Otherwise the exact size.
fn group_sizes(
    dir: &Directory,
    groups: &BTreeMap<u32, Vec<(NodeId, Score)>>,
) -> BTreeMap<u32, usize> {
    let mut sizes: BTreeMap<u32, usize> = groups.keys().map(|g| (*g, 0)).collect();
    let enough = |sizes: &BTreeMap<u32, usize>| {
        groups
            .iter()
            .all(|(g, bad)| sizes.get(g).copied().unwrap_or(0) >= size_for(bad.len()))
    };
    for n in dir.nodes() {
        let mut counted = false;
        if n.has_role(Role::Edge)
            && let Some(s) = sizes.get_mut(&0)
        {
            *s += 1;
            counted = true;
        }
        if n.has_role(Role::Mix)
            && n.mix_layer > 0
            && let Some(s) = sizes.get_mut(&n.mix_layer)
        {
            *s += 1;
            counted = true;
        }
        if counted && enough(&sizes) {
            break;
        }
    }
    sizes
}

/// A relay id as `record_health` writes it (64 lower-case hex digits); anything else names
/// no relay of the directory.
fn parse_node_hex(s: &str) -> Option<NodeId> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut id = [0u8; 32];
    hex::decode_to_slice(s, &mut id).ok()?;
    Some(NodeId(id))
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use ed25519_dalek::SigningKey;
    use rand::rngs::StdRng;
    use rand::{Rng, RngExt, SeedableRng};
    use whispr_protocol::directory::{Directory, NodeDescriptor, Role};
    use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
    use whispr_protocol::{KEY_EPOCH_LEN, KeyEpoch, NodeId, UnixTime};

    use super::super::{ClientCore, RELAY_HEALTH_WINDOW_MS};
    use crate::state::{RelayHealth, Settings};

    const T0: u64 = 1_800_000_000_000;

    /// `suspects` as it was before it scored only the relays with a record: every relay of
    /// the directory scored by its hex id, searched for in the records. The reference the
    /// new one must agree with.
    fn suspects_before(c: &ClientCore, dir: &Directory) -> Vec<NodeId> {
        let now = c.now;
        let window =
            RELAY_HEALTH_WINDOW_MS.max(c.state.settings.retransmit_after_ms.saturating_mul(3));
        type Score = (u32, u32, u32);
        let score = |node: &NodeId| -> Score {
            let hex_id = hex::encode(node.0);
            let Some(h) = c.state.relay_health.iter().find(|h| h.node == hex_id) else {
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

    /// A directory of `edges` edges, `per_layer[k]` mixes in layer k + 1, a mailbox node and
    /// `both` nodes that are an edge and a layer-1 mix at once.
    fn directory(rng: &mut StdRng, edges: usize, per_layer: &[usize], both: usize) -> Directory {
        let epoch = KeyEpoch::containing(UnixTime(T0), KEY_EPOCH_LEN);
        let mut kinds: Vec<(BTreeSet<Role>, u32)> = Vec::new();
        kinds.extend((0..edges).map(|_| (BTreeSet::from([Role::Edge]), 0)));
        for (k, n) in per_layer.iter().enumerate() {
            let layer = u32::try_from(k).unwrap() + 1;
            kinds.extend((0..*n).map(|_| (BTreeSet::from([Role::Mix]), layer)));
        }
        kinds.extend((0..both).map(|_| (BTreeSet::from([Role::Edge, Role::Mix]), 1)));
        kinds.push((BTreeSet::from([Role::Mailbox]), 0));
        let descriptors: Vec<_> = kinds
            .into_iter()
            .map(|(roles, mix_layer)| {
                let identity = SigningKey::generate(rng);
                let id = NodeId(identity.verifying_key().to_bytes());
                let public = SphinxPublicKey::from(&SphinxSecretKey::random_from_rng(rng));
                NodeDescriptor {
                    node_id: id,
                    peer_id: id.libp2p_peer_id_bytes(),
                    roles,
                    mix_layer,
                    addresses: Vec::new(),
                    api_url: None,
                    sphinx_keys: [(epoch, public)].into_iter().collect(),
                    published_at: UnixTime(T0 - 1000),
                    expires_at: UnixTime(T0 + 86_400_000),
                }
                .sign(&identity)
                .unwrap()
            })
            .collect();
        let (dir, rejected) = Directory::build(UnixTime(T0), &descriptors);
        assert!(rejected.is_empty());
        dir
    }

    /// Random health records over `dir`'s relays: some relays without a record, outcomes
    /// inside and outside the window, runs of losses, a few records of relays not in the
    /// directory, upper-case ids and duplicates (the first record of a relay counts).
    fn records(rng: &mut StdRng, dir: &Directory, now: u64, bad_bias: f64) -> Vec<RelayHealth> {
        let mut out = Vec::new();
        for n in dir.nodes() {
            if rng.random_range(0.0..1.0) < 0.3 {
                continue;
            }
            let len = rng.random_range(0..8usize);
            let outcomes: VecDeque<(u64, bool)> = (0..len)
                .map(|_| {
                    let age = rng.random_range(0..2 * RELAY_HEALTH_WINDOW_MS);
                    (now - age, rng.random_range(0.0..1.0) > bad_bias)
                })
                .collect();
            let mut node = hex::encode(n.node_id.0);
            match rng.random_range(0..40u32) {
                0 => node = node.to_uppercase(),
                1 => out.push(RelayHealth {
                    node: node.clone(),
                    outcomes: VecDeque::from([(now, false), (now, false), (now, false)]),
                }),
                _ => {}
            }
            out.push(RelayHealth { node, outcomes });
        }
        for _ in 0..3 {
            let mut id = [0u8; 32];
            rng.fill_bytes(&mut id);
            out.push(RelayHealth {
                node: hex::encode(id),
                outcomes: VecDeque::from([(now, false), (now, false)]),
            });
        }
        out.push(RelayHealth {
            node: "not hex".into(),
            outcomes: VecDeque::from([(now, false), (now, false)]),
        });
        // Record order is the order relays were first charged.
        for i in (1..out.len()).rev() {
            let j = rng.random_range(0..=i);
            out.swap(i, j);
        }
        out
    }

    #[test]
    fn suspects_are_the_same_as_when_every_relay_of_the_directory_was_scored() {
        let mut rng = StdRng::seed_from_u64(19);
        let shapes: [(usize, &[usize], usize); 6] = [
            (1, &[1], 0),
            (2, &[2, 2], 0),
            (3, &[3, 3, 3], 1),
            (8, &[9, 10, 11], 2),
            (30, &[25, 25, 25], 0),
            (0, &[4, 0, 7], 3),
        ];
        let mut compared = 0;
        let mut nonempty = 0;
        for (edges, layers, both) in shapes {
            let dir = directory(&mut rng, edges, layers, both);
            for round in 0..40 {
                let now = T0 + 3_600_000;
                let mut c = ClientCore::new(
                    "sim://directory",
                    Settings::default(),
                    StdRng::seed_from_u64(1),
                    StdRng::seed_from_u64(2),
                );
                c.now = now;
                let bias = [0.1, 0.5, 0.9][round % 3];
                c.state.relay_health = records(&mut rng, &dir, now, bias);
                let expected = suspects_before(&c, &dir);
                assert_eq!(
                    c.suspects(&dir),
                    expected,
                    "shape {edges}/{layers:?}/{both}"
                );
                compared += 1;
                nonempty += usize::from(!expected.is_empty());
            }
        }
        // The comparison covered clients with suspects, and clients without any.
        assert_eq!(compared, 240);
        assert!(nonempty > 100 && nonempty < compared, "{nonempty}");
        // No record at all: nothing to avoid, and no directory scan needed to say so.
        let dir = directory(&mut rng, 4, &[4], 0);
        let c = ClientCore::new(
            "sim://directory",
            Settings::default(),
            StdRng::seed_from_u64(1),
            StdRng::seed_from_u64(2),
        );
        assert!(c.suspects(&dir).is_empty());
    }
}
