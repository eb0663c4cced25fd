//! Three authorities in one process (real HTTP between them, real clock, 3 s epochs): they
//! admit only the allow-listed nodes of a mesh that also gossips 30 Sybils, sign one
//! consensus 3/3; with one stopped, the next epoch's consensus is still made (2/3) and
//! accepted; a fourth, unpinned "authority" changes nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_authority::core::Schedule;
use whispr_authority::server::{Options, Running, start};
use whispr_protocol::consensus::{Authority, Consensus, Network, VerifiedConsensus};
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};

const DEADLINE: Duration = Duration::from_secs(90);

fn now() -> UnixTime {
    whispr_node_kit::clock::now()
}

fn node(rng: &mut ChaCha20Rng, role: Role, layer: u32) -> (NodeId, SignedDescriptor) {
    let identity = SigningKey::generate(rng);
    let id = NodeId(identity.verifying_key().to_bytes());
    let sphinx = SphinxSecretKey::random_from_rng(&mut *rng);
    let d = NodeDescriptor {
        node_id: id,
        peer_id: id.libp2p_peer_id_bytes(),
        roles: [role].into_iter().collect(),
        mix_layer: layer,
        addresses: vec!["/ip4/127.0.0.1/tcp/4001".to_owned()],
        api_url: None,
        sphinx_keys: [(KeyEpoch(0), SphinxPublicKey::from(&sphinx))]
            .into_iter()
            .collect(),
        published_at: UnixTime(now().0 - 60_000),
        expires_at: UnixTime(now().0 + 24 * 3600 * 1000),
    };
    (id, d.sign(&identity).unwrap())
}

async fn get(url: &str) -> Option<Vec<u8>> {
    let r = reqwest::get(url).await.ok()?;
    r.status().is_success().then_some(())?;
    Some(r.bytes().await.ok()?.to_vec())
}

/// Waits until `url` serves a consensus that verifies against `network` and `accept` likes.
async fn wait_consensus(
    url: &str,
    network: &Network,
    accept: impl Fn(&VerifiedConsensus) -> bool,
) -> VerifiedConsensus {
    let start = std::time::Instant::now();
    loop {
        if let Some(bytes) = get(&format!("{url}/v1/consensus")).await
            && let Ok(v) = Consensus::decode(&bytes).and_then(|c| c.verify(now(), network))
            && accept(&v)
        {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no acceptable consensus at {url}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_authorities_survive_one_down_and_ignore_an_unpinned_fourth() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let dir = tempfile::tempdir().unwrap();

    // The mesh: an edge, three mixes, a mailbox node (allow-listed) and 30 Sybil mixes,
    // all gossiped, served by a stub `/v1/directory`.
    let mut honest = vec![node(&mut rng, Role::Edge, 0)];
    for _ in 0..3 {
        honest.push(node(&mut rng, Role::Mix, 1));
    }
    honest.push(node(&mut rng, Role::Mailbox, 0));
    let sybils: Vec<_> = (0..30).map(|_| node(&mut rng, Role::Mix, 1)).collect();
    let all: Vec<SignedDescriptor> = honest
        .iter()
        .chain(&sybils)
        .map(|(_, d)| d.clone())
        .collect();
    let gossip = Directory::encode(&all);
    let mesh = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh_url = format!("http://{}/v1/directory", mesh.local_addr().unwrap());
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/v1/directory",
            axum::routing::get(move || {
                let g = gossip.clone();
                async move { g }
            }),
        );
        axum::serve(mesh, app).await.unwrap();
    });
    let allow = dir.path().join("allow.txt");
    let honest_ids: BTreeSet<NodeId> = honest.iter().map(|(id, _)| *id).collect();
    std::fs::write(
        &allow,
        honest_ids
            .iter()
            .map(|id| format!("{} # a node\n", hex::encode(id.0)))
            .collect::<String>(),
    )
    .unwrap();

    // Three pinned authorities, and the network file everyone pins.
    let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let network = Network::new(
        keys.iter()
            .zip(&urls)
            .map(|(k, url)| Authority {
                key: k.verifying_key().to_bytes(),
                url: url.clone(),
            })
            .collect(),
        None,
    )
    .unwrap();
    let schedule = Schedule {
        period: Duration::from_secs(3),
        lifetime: Duration::from_secs(9),
    };
    let options = |key: &SigningKey, network: &Network, allow: &std::path::Path| Options {
        key: key.clone(),
        network: network.clone(),
        schedule,
        allow_file: allow.to_path_buf(),
        descriptor_sources: vec![mesh_url.clone()],
    };
    let mut running: Vec<Option<Running>> = keys
        .iter()
        .zip(listeners)
        .map(|(k, l)| Some(start(options(k, &network, &allow), l).unwrap()))
        .collect();

    // A fourth "authority" that no one pins: it lists itself beside the three and admits the
    // Sybils.
    let rogue = SigningKey::generate(&mut rng);
    let rogue_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rogue_url = format!("http://{}", rogue_listener.local_addr().unwrap());
    let mut rogue_auths = network.authorities().to_vec();
    rogue_auths.push(Authority {
        key: rogue.verifying_key().to_bytes(),
        url: rogue_url.clone(),
    });
    let rogue_network = Network::new(rogue_auths, Some(3)).unwrap();
    let rogue_allow = dir.path().join("rogue-allow.txt");
    std::fs::write(
        &rogue_allow,
        sybils
            .iter()
            .map(|(id, _)| format!("{}\n", hex::encode(id.0)))
            .collect::<String>(),
    )
    .unwrap();
    let rogue_running = start(
        options(&rogue, &rogue_network, &rogue_allow),
        rogue_listener,
    )
    .unwrap();

    // A node submits its descriptor directly: a Sybil is taken but not admitted.
    let client = reqwest::Client::new();
    let answer: serde_json::Value = client
        .post(format!("{}/v1/descriptors", urls[0]))
        .body(sybils[0].1.encode())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["admitted"], false);

    // All three sign the same consensus, of the honest nodes only, from every authority.
    let full = |v: &VerifiedConsensus| v.signers.len() == 3;
    let first = wait_consensus(&urls[0], &network, full).await;
    for url in &urls[1..] {
        let v = wait_consensus(url, &network, |v| v.epoch >= first.epoch && full(v)).await;
        assert_eq!(v.signers.len(), 3);
    }
    let members = |v: &VerifiedConsensus| -> BTreeSet<NodeId> {
        Directory::from_consensus(now(), v)
            .nodes()
            .map(|n| n.node_id)
            .collect()
    };
    assert_eq!(members(&first), honest_ids, "only allow-listed nodes");

    // `/metrics` shows the consensus held (the alerts' `consensus missing` reads it).
    let text = String::from_utf8(get(&format!("{}/metrics", urls[0])).await.unwrap()).unwrap();
    let gauge = |name: &str| -> u64 {
        let prefix = format!("whispr_authority_{name} ");
        let line = text.lines().find(|l| l.starts_with(&prefix));
        line.and_then(|l| l[prefix.len()..].parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
    };
    assert!(gauge("consensus_epoch") >= first.epoch, "{text}");
    assert!(gauge("epoch") >= gauge("consensus_epoch"), "{text}");
    assert!(
        gauge("consensus_valid_until_seconds") >= now().0 / 1000,
        "{text}"
    );
    assert_eq!(gauge("authorities"), 3, "{text}");
    assert_eq!(gauge("epoch_seconds"), 3, "{text}");
    assert_eq!(
        gauge("threshold"),
        u64::try_from(network.threshold()).unwrap()
    );
    assert_eq!(gauge("descriptors_admitted"), 5, "{text}");

    // Whatever the rogue serves is refused by anyone who pins the three.
    if let Some(bytes) = get(&format!("{rogue_url}/v1/consensus")).await {
        let c = Consensus::decode(&bytes).unwrap();
        match c.verify(now(), &network) {
            Err(_) => {}
            Ok(v) => assert_eq!(members(&v), honest_ids, "the rogue added nobody"),
        }
    }

    // One authority down: the next epoch's consensus is still made by the two others.
    running[2].take().unwrap().stop().await;
    let later = wait_consensus(&urls[0], &network, |v| {
        v.epoch > first.epoch + 1 && v.signers.len() == 2
    })
    .await;
    assert_eq!(members(&later), honest_ids);
    let at_1 = wait_consensus(&urls[1], &network, |v| v.epoch >= later.epoch).await;
    assert_eq!(at_1.signers.len(), 2);

    rogue_running.stop().await;
    for r in running.into_iter().flatten() {
        r.stop().await;
    }
}
