//! Shared helpers for the integration tests: seeded RNGs and test nodes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::directory::{NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{
    HopAction, Processed, RouteHop, SphinxPublicKey, SphinxSecretKey, process_packet,
};
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};

/// A deterministic RNG.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// A node with an identity key and one Sphinx key.
pub struct TestNode {
    pub identity: SigningKey,
    pub sphinx: SphinxSecretKey,
}

impl TestNode {
    pub fn new(rng: &mut ChaCha20Rng) -> TestNode {
        TestNode {
            identity: SigningKey::generate(rng),
            sphinx: SphinxSecretKey::random_from_rng(rng),
        }
    }

    pub fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    pub fn hop(&self) -> RouteHop {
        RouteHop {
            node: self.id(),
            sphinx_key: SphinxPublicKey::from(&self.sphinx),
        }
    }

    pub fn process(&self, bytes: &[u8]) -> whispr_protocol::Result<Processed> {
        process_packet(&[&self.sphinx], bytes)
    }
}

pub fn nodes(rng: &mut ChaCha20Rng, n: usize) -> Vec<TestNode> {
    (0..n).map(|_| TestNode::new(rng)).collect()
}

/// Sends `bytes` along `nodes` in order, checking that each hop forwards to the next with the
/// expected delay, and returns what the last hop does.
pub fn traverse(
    nodes: &[&TestNode],
    bytes: &[u8],
    delays: &[Duration],
) -> whispr_protocol::Result<HopAction> {
    let mut bytes = bytes.to_vec();
    for (i, node) in nodes.iter().enumerate() {
        let processed = node.process(&bytes)?;
        match processed.action {
            HopAction::Forward {
                next_hop,
                delay,
                packet,
            } => {
                assert!(i + 1 < nodes.len(), "last hop asked to forward");
                assert_eq!(next_hop, nodes[i + 1].id(), "forwarded to the wrong node");
                assert_eq!(delay, delays[i], "wrong delay at hop {i}");
                bytes = packet.into_bytes();
            }
            other => {
                assert_eq!(i + 1, nodes.len(), "delivered before the last hop");
                return Ok(other);
            }
        }
    }
    panic!("route ended without delivery")
}

pub const NOW: UnixTime = UnixTime(1_800_000_000_000);
pub const EPOCH_LEN: Duration = Duration::from_secs(3600);

pub fn epoch() -> KeyEpoch {
    KeyEpoch::containing(NOW, EPOCH_LEN)
}

/// A descriptor for `node` with `roles`, valid for a day around NOW, with keys for the
/// current and next epoch (the current one is the node's `sphinx` key).
pub fn descriptor(
    node: &TestNode,
    roles: &[Role],
    mix_layer: u32,
    rng: &mut ChaCha20Rng,
) -> NodeDescriptor {
    let next = SphinxSecretKey::random_from_rng(rng);
    NodeDescriptor {
        node_id: node.id(),
        peer_id: node.id().libp2p_peer_id_bytes(),
        roles: roles.iter().copied().collect::<BTreeSet<_>>(),
        mix_layer,
        addresses: vec!["/ip4/127.0.0.1/tcp/4001".to_owned()],
        api_url: None,
        sphinx_keys: [
            (epoch(), SphinxPublicKey::from(&node.sphinx)),
            (KeyEpoch(epoch().0 + 1), SphinxPublicKey::from(&next)),
        ]
        .into_iter()
        .collect(),
        published_at: UnixTime(NOW.0 - 60_000),
        expires_at: UnixTime(NOW.0 + 24 * 3600 * 1000),
    }
}

pub fn signed(node: &TestNode, d: &NodeDescriptor) -> SignedDescriptor {
    d.sign(&node.identity).unwrap()
}
