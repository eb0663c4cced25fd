//! The authority's admission table: descriptors of nodes its allow list does not name are
//! answered (not admitted) and never held, so a flood of self-signed descriptors cannot fill
//! the table and crowd out an allow-listed node.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use ed25519_dalek::SigningKey;
use whispr_authority::core::{AllowList, AuthorityCore, Schedule};
use whispr_protocol::consensus::{Authority, Network};
use whispr_protocol::directory::{DIRECTORY_NODES_MAX, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};

const NOW: UnixTime = UnixTime(1_000_000_000);

fn descriptor(seed: u64) -> (NodeId, SignedDescriptor) {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    secret[31] = 1;
    let identity = SigningKey::from_bytes(&secret);
    let id = NodeId(identity.verifying_key().to_bytes());
    let d = NodeDescriptor {
        node_id: id,
        peer_id: id.libp2p_peer_id_bytes(),
        roles: [Role::Mix].into_iter().collect(),
        mix_layer: 1,
        addresses: Vec::new(),
        api_url: None,
        sphinx_keys: [(
            KeyEpoch(0),
            SphinxPublicKey::from(&SphinxSecretKey::from([9; 32])),
        )]
        .into_iter()
        .collect(),
        published_at: NOW,
        expires_at: NOW.saturating_add(Duration::from_secs(3600)),
    };
    (id, d.sign(&identity).unwrap())
}

fn authority(allow: AllowList) -> AuthorityCore {
    let key = SigningKey::from_bytes(&[7; 32]);
    let network = Network::new(
        vec![Authority {
            key: key.verifying_key().to_bytes(),
            url: "http://127.0.0.1:1".to_owned(),
        }],
        None,
    )
    .unwrap();
    let schedule = Schedule {
        period: Duration::from_secs(60),
        lifetime: Duration::from_secs(180),
    };
    AuthorityCore::new(key, network, schedule, allow).unwrap()
}

/// Anyone can make self-signed descriptors: a flood of them filled the table (it held
/// every valid one, admitted or not, up to `DIRECTORY_NODES_MAX`) and the authority then
/// refused an allow-listed node's descriptor as `Full`: that node could not join.
#[test]
fn self_signed_descriptors_of_unlisted_nodes_cannot_crowd_out_an_allowed_node() {
    let (allowed, allowed_descriptor) = descriptor(0);
    let mut core = authority(AllowList([allowed].into_iter().collect()));
    for seed in 1..=u64::try_from(DIRECTORY_NODES_MAX).unwrap() {
        let (_, flood) = descriptor(seed);
        assert_eq!(core.submit_descriptor(NOW, flood), Ok(false));
    }
    assert_eq!(core.submit_descriptor(NOW, allowed_descriptor), Ok(true));
    let status = core.status(NOW);
    assert_eq!((status.descriptors, status.admitted), (1, 1));
    // Dropped from the allow list: forgotten.
    core.set_allow_list(AllowList::default());
    assert_eq!(core.status(NOW).descriptors, 0);
}
