//! Node descriptors, directory validation, route selection and mailbox placement.
//!
//! A node publishes a [`NodeDescriptor`] signed with its Ed25519 identity key: its libp2p peer
//! id, roles, addresses and a schedule of Sphinx public keys, one per key epoch, published
//! ahead of time. [`Directory::build`] validates a set of signed descriptors and reports every
//! rejected one with its reason (bad signature, expired, duplicate, …). Route selection and
//! rendezvous placement are pure functions of the directory and an injected RNG.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::sphinx::{HOP_DELAY_MAX, HOPS_MAX, RouteHop, SphinxPublicKey};
use crate::wire;
use crate::{Error, KeyEpoch, MailboxId, NodeId, Result, UnixTime};

const SIGNATURE_PREFIX: &[u8] = b"whispr-descriptor-v1";
const RENDEZVOUS_PREFIX: &[u8] = b"whispr-rendezvous-v1";

/// Most addresses in a descriptor.
pub const ADDRESSES_MAX: usize = 8;
/// Longest address or API URL, in bytes.
pub const ADDRESS_LEN_MAX: usize = 256;
/// Most Sphinx keys a descriptor publishes.
pub const EPOCH_KEYS_MAX: usize = 16;
/// Longest validity a descriptor may claim.
pub const VALIDITY_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far in the future a descriptor's publication time may be (clock skew).
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(300);
/// Most mix layers.
pub const MIX_LAYERS_MAX: u32 = 3;
/// Largest encoded signed descriptor.
pub const DESCRIPTOR_LEN_MAX: usize = 8 * 1024;
/// Largest encoded directory (room for [`DIRECTORY_NODES_MAX`] descriptors of ~800 bytes; a
/// typical one is ~400).
pub const DIRECTORY_LEN_MAX: usize = 16 * 1024 * 1024;
/// Most descriptors in a directory.
pub const DIRECTORY_NODES_MAX: usize = 20_000;
/// Draws from a role's nodes before route selection falls back to scanning the directory.
const PICK_TRIES: u32 = 32;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Takes packets from clients.
    Edge,
    /// Mixes packets in its layer.
    Mix,
    /// Stores envelopes for mailboxes.
    Mailbox,
    /// Holds deferred sends.
    Timer,
}

impl Role {
    fn to_wire(self) -> wire::Role {
        match self {
            Role::Edge => wire::Role::Edge,
            Role::Mix => wire::Role::Mix,
            Role::Mailbox => wire::Role::Mailbox,
            Role::Timer => wire::Role::Timer,
        }
    }

    fn from_wire(raw: i32) -> Result<Role> {
        match wire::Role::try_from(raw) {
            Ok(wire::Role::Edge) => Ok(Role::Edge),
            Ok(wire::Role::Mix) => Ok(Role::Mix),
            Ok(wire::Role::Mailbox) => Ok(Role::Mailbox),
            Ok(wire::Role::Timer) => Ok(Role::Timer),
            Ok(wire::Role::Unspecified) | Err(_) => Err(Error::DescriptorRejected("unknown role")),
        }
    }
}

/// A node's self-description (the signed body of a descriptor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDescriptor {
    /// Identity key, also the Sphinx address.
    pub node_id: NodeId,
    /// libp2p peer id bytes; must be [`NodeId::libp2p_peer_id_bytes`] of `node_id`.
    pub peer_id: Vec<u8>,
    /// Roles, at least one.
    pub roles: BTreeSet<Role>,
    /// Mix layer (1..=[`MIX_LAYERS_MAX`]) for mixes, 0 otherwise.
    pub mix_layer: u32,
    /// libp2p multiaddresses.
    pub addresses: Vec<String>,
    /// Client API base URL, if any.
    pub api_url: Option<String>,
    /// Sphinx public keys by epoch.
    pub sphinx_keys: BTreeMap<KeyEpoch, SphinxPublicKey>,
    /// When it was published.
    pub published_at: UnixTime,
    /// When it stops being valid.
    pub expires_at: UnixTime,
}

/// A descriptor with its signature, as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDescriptor(pub wire::SignedDescriptor);

impl NodeDescriptor {
    fn to_wire(&self) -> wire::DescriptorBody {
        wire::DescriptorBody {
            version: wire::VERSION,
            identity_key: self.node_id.0.to_vec(),
            peer_id: self.peer_id.clone(),
            roles: self.roles.iter().map(|r| r.to_wire() as i32).collect(),
            mix_layer: self.mix_layer,
            addresses: self.addresses.clone(),
            api_url: self.api_url.clone().unwrap_or_default(),
            sphinx_keys: self
                .sphinx_keys
                .iter()
                .map(|(epoch, key)| wire::EpochKey {
                    epoch: epoch.0,
                    public_key: key.as_bytes().to_vec(),
                })
                .collect(),
            published_at_ms: self.published_at.0,
            expires_at_ms: self.expires_at.0,
        }
    }

    /// Signs the descriptor with the node's identity key (which must match `node_id`).
    pub fn sign(&self, identity: &SigningKey) -> Result<SignedDescriptor> {
        if identity.verifying_key().to_bytes() != self.node_id.0 {
            return Err(Error::InvalidArgument(
                "descriptor signed with another node's key",
            ));
        }
        let body = wire::encode(&self.to_wire());
        let signature = identity.sign(&signed_bytes(&body));
        Ok(SignedDescriptor(wire::SignedDescriptor {
            version: wire::VERSION,
            body,
            signature: signature.to_bytes().to_vec(),
        }))
    }

    /// This node's Sphinx key for `epoch`, if published.
    pub fn sphinx_key(&self, epoch: KeyEpoch) -> Option<&SphinxPublicKey> {
        self.sphinx_keys.get(&epoch)
    }

    /// Whether the node has `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_PREFIX.len().saturating_add(body.len()));
    out.extend_from_slice(SIGNATURE_PREFIX);
    out.extend_from_slice(body);
    out
}

impl SignedDescriptor {
    /// Encodes it as a `SignedDescriptor` protobuf.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.0)
    }

    /// Decodes a `SignedDescriptor` protobuf (not yet verified: see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<SignedDescriptor> {
        wire::decode(bytes, DESCRIPTOR_LEN_MAX).map(SignedDescriptor)
    }

    /// Checks the signature, the body's consistency and its validity at `now`.
    pub fn verify(&self, now: UnixTime) -> Result<NodeDescriptor> {
        if self.0.version != wire::VERSION {
            return Err(Error::UnknownVersion {
                what: "signed descriptor",
                version: self.0.version,
            });
        }
        let body: wire::DescriptorBody = wire::decode(&self.0.body, DESCRIPTOR_LEN_MAX)?;
        let identity =
            <[u8; 32]>::try_from(body.identity_key.as_slice()).map_err(|_| Error::BadLength {
                what: "descriptor identity key",
                len: body.identity_key.len(),
                expected: 32,
            })?;
        let verifying = VerifyingKey::from_bytes(&identity)
            .map_err(|_| Error::DescriptorRejected("identity key is not an Ed25519 point"))?;
        let signature = ed25519_dalek::Signature::from_slice(&self.0.signature)
            .map_err(|_| Error::BadSignature("descriptor"))?;
        verifying
            .verify_strict(&signed_bytes(&self.0.body), &signature)
            .map_err(|_| Error::BadSignature("descriptor"))?;
        let descriptor = descriptor_from_body(body, NodeId(identity))?;
        if descriptor.published_at > now.saturating_add(CLOCK_SKEW_MAX) {
            return Err(Error::NotYetValid { what: "descriptor" });
        }
        if descriptor.expires_at <= now {
            return Err(Error::Expired { what: "descriptor" });
        }
        Ok(descriptor)
    }
}

fn descriptor_from_body(body: wire::DescriptorBody, node_id: NodeId) -> Result<NodeDescriptor> {
    if body.peer_id != node_id.libp2p_peer_id_bytes() {
        return Err(Error::DescriptorRejected(
            "peer id does not match the identity key",
        ));
    }
    let roles = body
        .roles
        .iter()
        .map(|r| Role::from_wire(*r))
        .collect::<Result<BTreeSet<_>>>()?;
    if roles.is_empty() {
        return Err(Error::DescriptorRejected("no role"));
    }
    let is_mix = roles.contains(&Role::Mix);
    if is_mix != (1..=MIX_LAYERS_MAX).contains(&body.mix_layer) {
        return Err(Error::DescriptorRejected(
            "mix layer must be 1..=3 for mixes and 0 otherwise",
        ));
    }
    if body.addresses.len() > ADDRESSES_MAX {
        return Err(Error::DescriptorRejected("too many addresses"));
    }
    if body
        .addresses
        .iter()
        .chain(std::iter::once(&body.api_url))
        .any(|a| a.len() > ADDRESS_LEN_MAX)
    {
        return Err(Error::DescriptorRejected("address too long"));
    }
    if body.sphinx_keys.is_empty() || body.sphinx_keys.len() > EPOCH_KEYS_MAX {
        return Err(Error::DescriptorRejected(
            "sphinx key schedule must have 1 to 16 keys",
        ));
    }
    let mut sphinx_keys = BTreeMap::new();
    let mut last_epoch: Option<u64> = None;
    for key in &body.sphinx_keys {
        if last_epoch.is_some_and(|last| key.epoch <= last) {
            return Err(Error::DescriptorRejected(
                "sphinx key epochs must strictly increase",
            ));
        }
        last_epoch = Some(key.epoch);
        let bytes =
            <[u8; 32]>::try_from(key.public_key.as_slice()).map_err(|_| Error::BadLength {
                what: "sphinx public key",
                len: key.public_key.len(),
                expected: 32,
            })?;
        let public = SphinxPublicKey::from(bytes);
        // A low-order point would make every shared secret with this hop predictable, so
        // that hop's layer would be readable by anyone.
        let probe = x25519_dalek::StaticSecret::from([0x5A; 32]);
        if !probe.diffie_hellman(&public).was_contributory() {
            return Err(Error::DescriptorRejected("sphinx public key of low order"));
        }
        sphinx_keys.insert(KeyEpoch(key.epoch), public);
    }
    if body.expires_at_ms <= body.published_at_ms {
        return Err(Error::DescriptorRejected("expires before it is published"));
    }
    let validity = Duration::from_millis(body.expires_at_ms.saturating_sub(body.published_at_ms));
    if validity > VALIDITY_MAX {
        return Err(Error::DescriptorRejected("validity longer than 7 days"));
    }
    Ok(NodeDescriptor {
        node_id,
        peer_id: body.peer_id,
        roles,
        mix_layer: body.mix_layer,
        addresses: body.addresses,
        api_url: (!body.api_url.is_empty()).then_some(body.api_url),
        sphinx_keys,
        published_at: UnixTime(body.published_at_ms),
        expires_at: UnixTime(body.expires_at_ms),
    })
}

/// A descriptor the directory refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Its position in the input.
    pub index: usize,
    /// The reason.
    pub reason: Error,
}

/// A validated set of node descriptors.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    nodes: BTreeMap<NodeId, NodeDescriptor>,
    /// Edge relays, in node-id order (so that route selection need not scan every node).
    edges: Vec<NodeId>,
    /// Mixes of layer `i + 1`, in node-id order.
    mix_layers: Vec<Vec<NodeId>>,
    /// Mailbox nodes, in node-id order.
    mailboxes: Vec<NodeId>,
    /// The consensus it was built from, if any ([`Directory::from_consensus`]).
    consensus: Option<crate::consensus::ConsensusInfo>,
}

impl Directory {
    /// Validates `descriptors` at `now`. Each invalid one is reported in the rejections with
    /// its reason; of two descriptors for the same node, the one published later is kept and
    /// the other rejected as a duplicate (the later one in input order on a tie).
    pub fn build(now: UnixTime, descriptors: &[SignedDescriptor]) -> (Directory, Vec<Rejection>) {
        let mut nodes: BTreeMap<NodeId, (usize, NodeDescriptor)> = BTreeMap::new();
        let mut rejections = Vec::new();
        for (index, signed) in descriptors.iter().enumerate() {
            if index >= DIRECTORY_NODES_MAX {
                rejections.push(Rejection {
                    index,
                    reason: Error::TooLarge {
                        what: "directory",
                        len: descriptors.len(),
                        max: DIRECTORY_NODES_MAX,
                    },
                });
                continue;
            }
            let descriptor = match signed.verify(now) {
                Ok(d) => d,
                Err(reason) => {
                    rejections.push(Rejection { index, reason });
                    continue;
                }
            };
            let duplicate = Error::DescriptorRejected("duplicate descriptor for a node");
            match nodes.get(&descriptor.node_id) {
                Some((_, held)) if held.published_at > descriptor.published_at => {
                    rejections.push(Rejection {
                        index,
                        reason: duplicate,
                    });
                }
                Some((held_index, _)) => {
                    rejections.push(Rejection {
                        index: *held_index,
                        reason: duplicate,
                    });
                    nodes.insert(descriptor.node_id, (index, descriptor));
                }
                None => {
                    nodes.insert(descriptor.node_id, (index, descriptor));
                }
            }
        }
        rejections.sort_by_key(|r| r.index);
        let nodes = nodes.into_iter().map(|(id, (_, d))| (id, d)).collect();
        (Directory::index(nodes), rejections)
    }

    fn index(nodes: BTreeMap<NodeId, NodeDescriptor>) -> Directory {
        let edges = nodes
            .values()
            .filter(|n| n.has_role(Role::Edge))
            .map(|n| n.node_id)
            .collect();
        let mix_layers = (1..=MIX_LAYERS_MAX)
            .map(|layer| {
                nodes
                    .values()
                    .filter(|n| n.has_role(Role::Mix) && n.mix_layer == layer)
                    .map(|n| n.node_id)
                    .collect()
            })
            .collect();
        let mailboxes = nodes
            .values()
            .filter(|n| n.has_role(Role::Mailbox))
            .map(|n| n.node_id)
            .collect();
        Directory {
            nodes,
            edges,
            mix_layers,
            mailboxes,
            consensus: None,
        }
    }

    pub(crate) fn set_consensus_info(&mut self, info: crate::consensus::ConsensusInfo) {
        self.consensus = Some(info);
    }

    /// The consensus this directory was built from: `None` for a directory of descriptors
    /// that no authority vouched for ([`Directory::build`], [`Directory::decode`]), which
    /// clients and nodes must not route over (tests and the simulator only).
    pub fn consensus(&self) -> Option<&crate::consensus::ConsensusInfo> {
        self.consensus.as_ref()
    }

    /// Decodes a `Directory` protobuf and validates it as [`Directory::build`] does.
    pub fn decode(now: UnixTime, bytes: &[u8]) -> Result<(Directory, Vec<Rejection>)> {
        let wire: wire::Directory = wire::decode(bytes, DIRECTORY_LEN_MAX)?;
        if wire.descriptors.len() > DIRECTORY_NODES_MAX {
            return Err(Error::TooLarge {
                what: "directory",
                len: wire.descriptors.len(),
                max: DIRECTORY_NODES_MAX,
            });
        }
        let signed: Vec<SignedDescriptor> =
            wire.descriptors.into_iter().map(SignedDescriptor).collect();
        Ok(Directory::build(now, &signed))
    }

    /// Encodes signed descriptors as a `Directory` protobuf.
    pub fn encode(descriptors: &[SignedDescriptor]) -> Vec<u8> {
        wire::encode(&wire::Directory {
            version: wire::VERSION,
            descriptors: descriptors.iter().map(|d| d.0.clone()).collect(),
        })
    }

    /// A node's descriptor.
    pub fn get(&self, node: &NodeId) -> Option<&NodeDescriptor> {
        self.nodes.get(node)
    }

    /// All valid descriptors, ordered by node id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeDescriptor> {
        self.nodes.values()
    }

    /// Number of valid descriptors.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when no descriptor is valid.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn hop(&self, node: &NodeDescriptor, epoch: KeyEpoch) -> Option<RouteHop> {
        node.sphinx_key(epoch).map(|key| RouteHop {
            node: node.node_id,
            sphinx_key: *key,
        })
    }

    /// A uniform choice among `pool`'s nodes that pass `wanted`, are not in `exclude` and have
    /// a key for `epoch`. Draws from the pool and rejects misses (uniform over the accepted
    /// subset); after [`PICK_TRIES`] misses (most of the pool excluded) it falls back to the
    /// full scan, which has the same distribution.
    fn pick_from<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        epoch: KeyEpoch,
        exclude: &[RouteHop],
        pool: &[NodeId],
        wanted: impl Fn(&NodeDescriptor) -> bool,
    ) -> Option<RouteHop> {
        let len = u64::try_from(pool.len()).ok()?;
        if len == 0 {
            return None;
        }
        let zone = u64::MAX - (u64::MAX % len);
        let mut tries = 0;
        while tries < PICK_TRIES {
            let x = rng.next_u64();
            if x >= zone {
                continue;
            }
            tries += 1;
            let candidate = pool
                .get(usize::try_from(x % len).ok()?)
                .and_then(|id| self.nodes.get(id));
            if let Some(n) = candidate
                && !exclude.iter().any(|hop| hop.node == n.node_id)
                && wanted(n)
                && let Some(hop) = self.hop(n, epoch)
            {
                return Some(hop);
            }
        }
        self.pick(rng, epoch, exclude, wanted)
    }

    fn pick<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        epoch: KeyEpoch,
        exclude: &[RouteHop],
        wanted: impl Fn(&NodeDescriptor) -> bool,
    ) -> Option<RouteHop> {
        let candidates: Vec<RouteHop> = self
            .nodes
            .values()
            .filter(|n| !exclude.iter().any(|hop| hop.node == n.node_id) && wanted(n))
            .filter_map(|n| self.hop(n, epoch))
            .collect();
        let len = u64::try_from(candidates.len()).ok()?;
        if len == 0 {
            return None;
        }
        // Rejection sampling keeps the choice uniform.
        let zone = u64::MAX - (u64::MAX % len);
        loop {
            let x = rng.next_u64();
            if x < zone {
                let index = usize::try_from(x % len).ok()?;
                return candidates.get(index).cloned();
            }
        }
    }

    /// A stratified route for `epoch`: a random edge relay, one random mix from each of the
    /// layers `1..=mix_layers`, then `destination`. Every hop must have a key for `epoch`, and
    /// no node appears twice. At least one mix layer is required, so that the edge relay,
    /// which knows the sender's address, never learns the destination node.
    pub fn select_route<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        epoch: KeyEpoch,
        destination: &NodeId,
        mix_layers: u32,
    ) -> Result<Vec<RouteHop>> {
        self.select_route_avoiding(rng, epoch, destination, mix_layers, &[])
    }

    /// [`Self::select_route`] without the relays in `avoid` (for example relays on the route
    /// of a packet that was never acknowledged). Fails with [`Error::NoRoute`] when a layer
    /// has no other relay; the destination itself is never avoided.
    pub fn select_route_avoiding<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        epoch: KeyEpoch,
        destination: &NodeId,
        mix_layers: u32,
        avoid: &[NodeId],
    ) -> Result<Vec<RouteHop>> {
        if mix_layers == 0 || mix_layers > MIX_LAYERS_MAX {
            return Err(Error::InvalidArgument("a route has 1 to 3 mix layers"));
        }
        let destination = self
            .nodes
            .get(destination)
            .ok_or(Error::NoRoute("destination is not in the directory"))?;
        let last = self
            .hop(destination, epoch)
            .ok_or(Error::NoRoute("destination has no key for the epoch"))?;
        let mut route = Vec::with_capacity(HOPS_MAX);
        route.push(last.clone());
        let edge = self
            .pick_from(rng, epoch, &route, &self.edges, |n| {
                n.has_role(Role::Edge) && !avoid.contains(&n.node_id)
            })
            .ok_or(Error::NoRoute("no edge relay with a key for the epoch"))?;
        route.push(edge);
        for layer in 1..=mix_layers {
            let pool = self
                .mix_layers
                .get(usize::try_from(layer).unwrap_or(usize::MAX).wrapping_sub(1))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mix = self
                .pick_from(rng, epoch, &route, pool, |n| {
                    n.has_role(Role::Mix) && n.mix_layer == layer && !avoid.contains(&n.node_id)
                })
                .ok_or(Error::NoRoute("a mix layer has no other node with a key"))?;
            route.push(mix);
        }
        // Built as [destination, edge, mixes…]; the route runs edge, mixes…, destination.
        route.rotate_left(1);
        Ok(route)
    }

    /// The `replicas` mailbox nodes that hold `mailbox`, by rendezvous (highest random weight)
    /// hashing: each mailbox node scores SHA-256(domain ‖ mailbox ‖ node), highest first.
    /// Adding or removing a node moves only the mailboxes that scored it among their top R.
    pub fn mailbox_replicas(&self, mailbox: &MailboxId, replicas: usize) -> Vec<NodeId> {
        let mut prefix = Sha256::new();
        prefix.update(RENDEZVOUS_PREFIX);
        prefix.update(mailbox.as_bytes());
        // Keep the best `replicas` scores only (highest first): O(nodes × replicas).
        let mut best: Vec<([u8; 32], NodeId)> = Vec::with_capacity(replicas.saturating_add(1));
        for node in &self.mailboxes {
            let mut h = prefix.clone();
            h.update(node.as_bytes());
            let score: [u8; 32] = h.finalize().into();
            let at = best.partition_point(|(s, id)| (*s, *id) > (score, *node));
            if at < replicas {
                best.insert(at, (score, *node));
                best.truncate(replicas);
            }
        }
        best.into_iter().map(|(_, id)| id).collect()
    }
}

/// Draws `count` per-hop delays, exponentially distributed with mean `mean` (Loopix), each
/// capped at [`HOP_DELAY_MAX`].
pub fn sample_delays<R: rand::CryptoRng + ?Sized>(
    rng: &mut R,
    count: usize,
    mean: Duration,
) -> Vec<Duration> {
    (0..count)
        .map(|_| {
            // 53 random bits → u in (0, 1]; -ln(u) is Exp(1).
            let bits = rng.next_u64() >> 11;
            let u = (bits as f64 + 1.0) / (1u64 << 53) as f64;
            let secs = -u.ln() * mean.as_secs_f64();
            Duration::try_from_secs_f64(secs)
                .unwrap_or(HOP_DELAY_MAX)
                .min(HOP_DELAY_MAX)
        })
        .collect()
}
