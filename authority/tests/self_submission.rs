//! Nodes submit their own signed descriptor to the authorities (issue 14: "operators submit
//! their node's signed descriptor"). Three in-process authorities with no descriptor source
//! at all (they read no node's gossip, no file of descriptors) and two real mesh nodes that
//! pin them: the node on the authorities' allow list is in the next consensus, signed 3/3,
//! from its own `POST /v1/descriptors`; the other, which submits just the same, is not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::TcpListener;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::sync::oneshot;
use whispr_authority::core::Schedule;
use whispr_authority::server::{Options, start};
use whispr_protocol::NodeId;
use whispr_protocol::consensus::{Authority, Consensus, Network, VerifiedConsensus};
use whispr_protocol::directory::Directory;
use whispr_relay::config::{MeshConfig, RelayRole};
use whispr_relay::mesh::{Mesh, MeshHandle, MeshOptions};

const DEADLINE: Duration = Duration::from_secs(90);

fn mesh(
    network_file: &std::path::Path,
    dir: &std::path::Path,
) -> (MeshHandle, whispr_relay::mesh::MeshRunner) {
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        roles: vec![RelayRole::Mix],
        mix_layer: 1,
        descriptor_publish_ms: 500,
        descriptor_validity_ms: 600_000,
        network_file: Some(network_file.to_path_buf()),
        consensus_poll_ms: 200,
        ..MeshConfig::default()
    };
    Mesh::new(MeshOptions {
        config,
        data_dir: dir.to_path_buf(),
        extra_roles: Vec::new(),
    })
    .unwrap()
}

fn members(v: &VerifiedConsensus) -> Vec<NodeId> {
    Directory::from_consensus(whispr_node_kit::clock::now(), v)
        .nodes()
        .map(|n| n.node_id)
        .collect()
}

fn submissions(handle: &MeshHandle, result: &str) -> u64 {
    let text = handle.metrics_text();
    let prefix = format!("whispr_mesh_descriptor_submissions_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in the metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_submits_its_descriptor_and_an_authority_that_allows_it_admits_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut rng = ChaCha20Rng::seed_from_u64(1414);
    let dir = tempfile::tempdir().unwrap();

    // The network file: three authorities on loopback.
    let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let network = Network::new(
        keys.iter()
            .zip(&listeners)
            .map(|(k, l)| Authority {
                key: k.verifying_key().to_bytes(),
                url: format!("http://{}", l.local_addr().unwrap()),
            })
            .collect(),
        None,
    )
    .unwrap();
    let network_file = dir.path().join("network");
    std::fs::write(&network_file, network.to_text()).unwrap();

    // Two nodes pinning it; only the first is on the allow list.
    let (allowed, allowed_runner) = mesh(&network_file, &dir.path().join("allowed-node"));
    let (other, other_runner) = mesh(&network_file, &dir.path().join("other-node"));
    let allow = dir.path().join("allow.txt");
    std::fs::write(
        &allow,
        format!(
            "{} # the operator's node\n",
            hex::encode(allowed.node_id().0)
        ),
    )
    .unwrap();

    // The authorities read no descriptor source: what they hold, nodes posted.
    let schedule = Schedule {
        period: Duration::from_secs(2),
        lifetime: Duration::from_secs(20),
    };
    let mut authorities = Vec::new();
    for (key, listener) in keys.iter().zip(listeners) {
        let options = Options {
            key: key.clone(),
            network: network.clone(),
            schedule,
            allow_file: allow.clone(),
            descriptor_sources: Vec::new(),
        };
        authorities.push(start(options, listener).unwrap());
    }
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for runner in [allowed_runner, other_runner] {
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(runner.run(None, async {
            let _ = stopped.await;
        })));
    }

    // A consensus signed by all three lists the allowed node, from its own submission.
    let started = std::time::Instant::now();
    let consensus = loop {
        if let Some(c) = authorities[0].state.consensus()
            && let Ok(v) = c.verify(whispr_node_kit::clock::now(), &network)
            && v.signers.len() == 3
            && members(&v).contains(&allowed.node_id())
        {
            break v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the allowed node never reached a 3/3 consensus"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(members(&consensus), vec![allowed.node_id()]);
    // The node itself routes by that consensus, which lists it.
    while allowed.directory().get(&allowed.node_id()).is_none() {
        assert!(started.elapsed() < DEADLINE, "the node never saw itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mirrored = Consensus::decode(&allowed.consensus_bytes().unwrap()).unwrap();
    assert!(
        members(
            &mirrored
                .verify(whispr_node_kit::clock::now(), &network)
                .unwrap()
        )
        .contains(&allowed.node_id())
    );
    // Each node told every authority; only the allowed one was admitted.
    assert!(submissions(&allowed, "admitted") >= 3);
    assert_eq!(submissions(&allowed, "not_admitted"), 0);
    while submissions(&other, "not_admitted") < 3 {
        assert!(
            started.elapsed() < DEADLINE,
            "the other node never submitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(submissions(&other, "admitted"), 0);
    for a in &authorities {
        let c = a.state.consensus().unwrap();
        let v = c.verify(whispr_node_kit::clock::now(), &network).unwrap();
        assert!(!members(&v).contains(&other.node_id()));
    }

    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        tokio::time::timeout(DEADLINE, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    for a in authorities {
        a.stop().await;
    }
}
