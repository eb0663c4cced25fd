//! Placement pinned at creation, over a devnet of real processes (issue 14, "Placement"): a
//! mailbox node whose identity key was ground to win rendezvous placement for bob's mailbox
//! joins the consensus (its operator is admitted like any other); senders keep depositing on
//! the mailbox's pinned node(s), written into the invitation and the hello, and the ground
//! node receives nothing: 0 deposits, 0 final payloads. Driven through `whispr` as a user
//! would; the ground node is a real `whispr-mailbox` process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use whispr_client::devnet::{self, Devnet, DevnetOptions};
use whispr_client::net::Net;
use whispr_protocol::consensus::{Consensus, Network};
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, MailboxId, NodeId, UnixTime};

mod common;
use common::{User, WAIT, http_get};

fn now() -> UnixTime {
    UnixTime(whispr_client::now_ms())
}

/// Every sample of `/metrics` on `port` whose name contains `part`, with its value.
fn samples(port: u16, part: &str) -> Vec<(String, u64)> {
    let text = http_get(port, "/metrics").expect("metrics served");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(part))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(port: u16, name: &str) -> u64 {
    samples(port, name)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The consensus the edge mirrors, verified.
async fn consensus(devnet: &Devnet, network: &Network) -> Option<Vec<SignedDescriptor>> {
    let body = reqwest::get(devnet.directory_url())
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    let v = Consensus::decode(&body).ok()?.verify(now(), network).ok()?;
    Some(v.descriptors)
}

/// A key whose node, as a mailbox node, ranks first for `mailbox` among the consensus's
/// mailbox nodes: rendezvous placement would put the mailbox on it.
fn grind(members: &[SignedDescriptor], mailbox: &MailboxId) -> SigningKey {
    let mut tries = 0u32;
    loop {
        tries += 1;
        let key = SigningKey::generate(&mut rand::rng());
        let id = NodeId(key.verifying_key().to_bytes());
        let candidate = NodeDescriptor {
            node_id: id,
            peer_id: id.libp2p_peer_id_bytes(),
            roles: [Role::Mailbox].into_iter().collect(),
            mix_layer: 0,
            addresses: Vec::new(),
            api_url: Some("http://127.0.0.1:1".to_owned()),
            sphinx_keys: [(
                KeyEpoch(0),
                SphinxPublicKey::from(&SphinxSecretKey::from([5; 32])),
            )]
            .into_iter()
            .collect(),
            published_at: now(),
            expires_at: now().saturating_add(Duration::from_secs(3600)),
        }
        .sign(&key)
        .unwrap();
        let mut all = members.to_vec();
        all.push(candidate);
        let (directory, _) = Directory::build(now(), &all);
        if directory.mailbox_replicas(mailbox, 1) == vec![id] {
            return key;
        }
        assert!(tries < 10_000, "no winning key");
    }
}

/// The extra node's process, killed on drop.
struct Ground(Child);

impl Drop for Ground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a mailbox node with `key` as its identity, configured like `mailbox1` of the devnet
/// in `dir` but on its own ports and data directory; returns it and its HTTP port.
fn start_ground(dir: &Path, devnet: &Devnet, key: &SigningKey) -> (Ground, u16) {
    let template = std::fs::read_to_string(dir.join("mailbox1.toml")).unwrap();
    let old_http = devnet
        .record()
        .nodes
        .iter()
        .find(|n| n.name == "mailbox1")
        .unwrap()
        .http_port;
    let old_mesh = template
        .lines()
        .find(|l| l.starts_with("listen = [\"/ip4/"))
        .and_then(|l| l.split("/tcp/").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let (http, mesh) = (free_port(), free_port());
    let data = dir.join("ground");
    let config = template
        .replace(
            &dir.join("mailbox1").display().to_string(),
            &data.display().to_string(),
        )
        .replace("devnet-mailbox1", "devnet-ground")
        .replace(
            &format!("127.0.0.1:{old_http}"),
            &format!("127.0.0.1:{http}"),
        )
        .replace(&format!("/tcp/{old_mesh}\""), &format!("/tcp/{mesh}\""));
    assert!(!config.contains("mailbox1"), "{config}");
    let path = dir.join("ground.toml");
    std::fs::write(&path, config).unwrap();
    // The ground identity, where the node loads (or would create) it.
    let keys = data.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(keys.join("identity.key"))
            .unwrap();
        std::io::Write::write_all(&mut f, hex::encode(key.to_bytes()).as_bytes()).unwrap();
    }
    let log = std::fs::File::create(dir.join("logs").join("ground.log")).unwrap();
    let child = Command::new(devnet::default_bin_dir().join("whispr-mailbox"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (Ground(child), http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ground_to_win_placement_gets_no_deposit_for_a_pinned_mailbox() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("devnet");
    let devnet = Devnet::up(DevnetOptions {
        dir: dir.clone(),
        relays: 2,
        mailboxes: 3,
        timers: 1,
        bin_dir: devnet::default_bin_dir(),
        relaxed_limits: false,
    })
    .await
    .unwrap();
    let url = devnet.directory_url().to_string();
    let network_file = devnet.network_file().display().to_string();
    let network = Network::parse(&std::fs::read_to_string(devnet.network_file()).unwrap()).unwrap();
    let user = |name: &str, pass: &'static str| User {
        home: tmp.path().join(name),
        pass,
    };
    let (alice, bob) = (user("alice", "pass-a"), user("bob", "pass-b"));
    alice.ok(&["init", "--directory", &url, "--network", &network_file]);
    bob.ok(&["init", "--directory", &url, "--network", &network_file]);
    let invitation = alice.ok(&["invite", "--name", "bob"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    bob.ok(&["accept", &invitation, "--name", "alice"]);
    alice.recv_notice("contact_established");
    alice.send_stored("bob", "before");
    bob.recv_exactly(&["before".to_string()]);

    // Bob's mailbox for alice, and the node(s) it is pinned on.
    let (mailbox, pinned) = {
        let client = whispr_client::Client::open(&bob.home, bob.pass.as_bytes()).unwrap();
        let owned = client.core().owned_mailboxes();
        assert_eq!(owned.len(), 1);
        let m = &owned[0];
        let mut nodes: Vec<NodeId> = m.replicas.iter().map(|r| NodeId(r.node)).collect();
        if nodes.is_empty() {
            nodes.push(NodeId(m.node));
        }
        (MailboxId(m.id), nodes)
    };
    assert!(!pinned.is_empty());

    // An attacker grinds a key that wins placement for that mailbox id, and runs a mailbox
    // node with it; its operator is admitted like any other.
    let members = consensus(&devnet, &network).await.unwrap();
    let key = grind(&members, &mailbox);
    let ground_id = NodeId(key.verifying_key().to_bytes());
    assert!(!pinned.contains(&ground_id));
    let (_ground, ground_port) = start_ground(&dir, &devnet, &key);
    let allowed = std::fs::read_to_string(dir.join("allowed")).unwrap();
    std::fs::write(
        dir.join("allowed"),
        format!("{allowed}{} # ground\n", hex::encode(ground_id.0)),
    )
    .unwrap();

    // It joins the consensus, and there it ranks first for bob's mailbox.
    let net = Net::new().unwrap();
    let deadline = Instant::now() + WAIT;
    let directory = loop {
        if let Ok(d) = net
            .directory(std::slice::from_ref(&url), &network, now(), None)
            .await
            && d.get(&ground_id).is_some()
        {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the ground node never joined the consensus"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(directory.mailbox_replicas(&mailbox, 1), vec![ground_id]);
    // The node posted its descriptor to the authorities itself, and they admitted it.
    let admitted = "whispr_mesh_descriptor_submissions_total{result=\"admitted\"}";
    while sample(ground_port, admitted) == 0 {
        assert!(
            Instant::now() < deadline,
            "no authority admitted the ground node's submission"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Alice's client routes by a consensus that lists it.
    let shown = alice.ok(&["directory"]);
    assert_eq!(shown[0]["nodes"], members.len() + 1, "{shown:?}");

    // More messages both ways: all delivered, through the pinned node(s) only.
    let texts: Vec<String> = (0..4).map(|i| format!("after {i}")).collect();
    for text in &texts {
        alice.send_stored("bob", text);
    }
    bob.recv_exactly(&texts);
    bob.send_stored("alice", "reply");
    alice.recv_exactly(&["reply".to_string()]);

    // The ground node got nothing: no deposit, no final payload at all.
    let deposits = samples(ground_port, "deposit");
    assert!(deposits.len() >= 2, "{deposits:?}");
    assert!(deposits.iter().all(|(_, v)| *v == 0), "{deposits:?}");
    assert_eq!(
        sample(ground_port, "whispr_mesh_packets_delivered_total"),
        0
    );
    drop(devnet);
}
