//! The client accepts a directory only as a consensus signed by the threshold of its pinned
//! authorities, whatever serves it (security review finding 1 a, issue 14).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use whispr_client::net::Net;
use whispr_protocol::consensus::{Authority, Consensus, ConsensusBody, Network};
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};

fn now() -> UnixTime {
    UnixTime(whispr_client::now_ms())
}

fn descriptor(seed: u8, role: Role, layer: u32) -> SignedDescriptor {
    let identity = SigningKey::from_bytes(&[seed; 32]);
    let id = NodeId(identity.verifying_key().to_bytes());
    let sphinx = SphinxSecretKey::from([seed.wrapping_add(100); 32]);
    NodeDescriptor {
        node_id: id,
        peer_id: id.libp2p_peer_id_bytes(),
        roles: [role].into_iter().collect(),
        mix_layer: layer,
        addresses: vec![],
        api_url: Some("http://127.0.0.1:1".to_owned()),
        sphinx_keys: [(KeyEpoch(0), SphinxPublicKey::from(&sphinx))]
            .into_iter()
            .collect(),
        published_at: UnixTime(now().0 - 60_000),
        expires_at: UnixTime(now().0 + 3_600_000),
    }
    .sign(&identity)
    .unwrap()
}

/// A tiny HTTP server answering each path with the bytes it is given (404 otherwise).
async fn stub(pages: Arc<Mutex<BTreeMap<String, Vec<u8>>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = pages.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"{\"error\":\"none\"}".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    base
}

struct Fixture {
    base: String,
    pages: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    keys: Vec<SigningKey>,
    network: Network,
    honest: Vec<SignedDescriptor>,
    attacker: Vec<SignedDescriptor>,
}

async fn fixture() -> Fixture {
    let pages = Arc::new(Mutex::new(BTreeMap::new()));
    let base = stub(pages.clone()).await;
    let keys: Vec<SigningKey> = (0..3u8)
        .map(|i| SigningKey::from_bytes(&[200 + i; 32]))
        .collect();
    let network = Network::new(
        keys.iter()
            .enumerate()
            .map(|(i, k)| Authority {
                key: k.verifying_key().to_bytes(),
                url: format!("{base}/a{i}"),
            })
            .collect(),
        None,
    )
    .unwrap();
    let mut honest = vec![
        descriptor(10, Role::Edge, 0),
        descriptor(11, Role::Mix, 1),
        descriptor(12, Role::Mailbox, 0),
    ];
    honest.sort_by_key(|d| d.verify(now()).unwrap().node_id);
    // An attacker's edge and mix plus a mailbox node, self-signed, no authority.
    let attacker = vec![
        descriptor(1, Role::Edge, 0),
        descriptor(2, Role::Mix, 1),
        descriptor(3, Role::Mailbox, 0),
    ];
    Fixture {
        base,
        pages,
        keys,
        network,
        honest,
        attacker,
    }
}

impl Fixture {
    fn consensus(&self, epoch: u64, offset_ms: i64, signers: &[&SigningKey]) -> Vec<u8> {
        let after = now().0.saturating_add_signed(offset_ms - 60_000);
        let mut c = Consensus::new(&ConsensusBody {
            epoch,
            valid_after: UnixTime(after),
            valid_until: UnixTime(after + 600_000),
            descriptors: self.honest.clone(),
        });
        for k in signers {
            c.sign(k);
        }
        c.encode()
    }

    fn serve(&self, path: &str, bytes: Vec<u8>) {
        self.pages.lock().unwrap().insert(path.to_owned(), bytes);
    }

    fn mirror(&self) -> Vec<String> {
        let mut urls = vec![format!("{}/mirror", self.base)];
        urls.extend(
            self.network
                .authorities()
                .iter()
                .map(|a| format!("{}/v1/consensus", a.url)),
        );
        urls
    }

    async fn fetch(&self, min_epoch: Option<u64>) -> whispr_client::Result<Directory> {
        Net::new()
            .unwrap()
            .directory(&self.mirror(), &self.network, now(), min_epoch)
            .await
    }
}

#[tokio::test]
async fn a_plain_directory_from_a_mirror_is_refused() {
    let f = fixture().await;
    f.serve("/mirror", Directory::encode(&f.attacker));
    let got = f.fetch(None).await;
    assert!(got.is_err(), "accepted a directory no authority signed");
    // Only the devnet supervisor's gossip check reads it as it is (no client routes by it).
    let legacy = Net::new()
        .unwrap()
        .unpinned_directory(&format!("{}/mirror", f.base), now())
        .await
        .unwrap();
    assert!(legacy.consensus().is_none());
}

/// A client created without a network file used to trust whatever its directory URL served
/// (a plain directory of self-signed descriptors, over plain HTTP): it now refuses every
/// directory, the attacker's plain one and even a valid consensus, as it pins no authority.
#[tokio::test]
async fn a_client_that_pins_no_authority_accepts_no_directory() {
    let f = fixture().await;
    f.serve("/mirror", Directory::encode(&f.attacker));
    let home = tempfile::tempdir().unwrap();
    let kdf = whispr_client::KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    let mut client = whispr_client::Client::init(
        home.path(),
        b"pw",
        &format!("{}/mirror", f.base),
        whispr_client::Settings::default(),
        kdf,
    )
    .unwrap();
    assert!(!client.is_pinned());
    let got = client.directory_summary().await;
    assert!(
        matches!(&got, Err(whispr_client::ClientError::InvalidArgument(m)) if m.contains("--network")),
        "an unpinned client took a directory: {got:?}"
    );
    f.serve(
        "/mirror",
        f.consensus(1, 0, &[&f.keys[0], &f.keys[1], &f.keys[2]]),
    );
    assert!(client.directory_summary().await.is_err());
}

/// `whispr init` creates no client without a network file.
#[test]
fn whispr_init_requires_a_network_file() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whispr"))
        .arg("--home")
        .arg(home.path().join("c"))
        .args(["init", "--directory", "http://127.0.0.1:9/v1/directory"])
        .env("WHISPR_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--network"), "{stderr}");
    assert!(!home.path().join("c").exists(), "a home was created");
}

#[tokio::test]
async fn too_few_unknown_or_expired_signatures_are_refused_from_every_source() {
    let f = fixture().await;
    let strangers: Vec<SigningKey> = (0..3u8)
        .map(|i| SigningKey::from_bytes(&[50 + i; 32]))
        .collect();
    let k = &f.keys;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one signature of three", f.consensus(7, 0, &[&k[0]])),
        (
            "unknown keys",
            f.consensus(7, 0, &[&strangers[0], &strangers[1], &strangers[2]]),
        ),
        (
            "expired",
            f.consensus(7, -3_600_000, &[&k[0], &k[1], &k[2]]),
        ),
        (
            "not valid yet",
            f.consensus(7, 3_600_000, &[&k[0], &k[1], &k[2]]),
        ),
    ];
    for (what, bytes) in cases {
        f.serve("/mirror", bytes.clone());
        for i in 0..3 {
            f.serve(&format!("/a{i}/v1/consensus"), bytes.clone());
        }
        assert!(f.fetch(None).await.is_err(), "accepted: {what}");
    }
}

/// The same refusals by the `whispr` command, end to end: a client pinning the three
/// authorities, whose mirror and authorities all serve one bad document, has no directory
/// (`whispr directory` fails, naming no node); a consensus signed by two of the three is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispr_refuses_a_directory_without_the_threshold_of_pinned_signatures() {
    let f = fixture().await;
    let home = tempfile::tempdir().unwrap();
    let network_file = home.path().join("network");
    std::fs::write(&network_file, f.network.to_text()).unwrap();
    let whispr = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_whispr"))
            .arg("--home")
            .arg(home.path().join("c"))
            .arg("--json")
            .args(args)
            .env("WHISPR_PASSPHRASE", "pw")
            .output()
            .unwrap()
    };
    let init = whispr(&[
        "init",
        "--directory",
        &format!("{}/mirror", f.base),
        "--network",
        &network_file.display().to_string(),
    ]);
    assert!(init.status.success(), "{init:?}");
    let strangers: Vec<SigningKey> = (0..3u8)
        .map(|i| SigningKey::from_bytes(&[60 + i; 32]))
        .collect();
    let k = &f.keys;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a plain directory", Directory::encode(&f.attacker)),
        ("one signature of three", f.consensus(7, 0, &[&k[0]])),
        (
            "unknown keys",
            f.consensus(7, 0, &[&strangers[0], &strangers[1], &strangers[2]]),
        ),
        (
            "expired",
            f.consensus(7, -3_600_000, &[&k[0], &k[1], &k[2]]),
        ),
    ];
    for (what, bytes) in cases {
        f.serve("/mirror", bytes.clone());
        for i in 0..3 {
            f.serve(&format!("/a{i}/v1/consensus"), bytes.clone());
        }
        let out = whispr(&["directory"]);
        assert!(
            !out.status.success(),
            "whispr took {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    f.serve("/mirror", f.consensus(8, 0, &[&k[0], &k[2]]));
    let out = whispr(&["directory"]);
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&shown["signers"], &shown["authorities"], &shown["nodes"]),
        (&2.into(), &3.into(), &3.into()),
        "{shown}"
    );
}

#[tokio::test]
async fn a_majority_consensus_is_accepted_from_the_mirror_or_an_authority_and_never_rolls_back() {
    let f = fixture().await;
    let k = &f.keys;
    // The mirror serves an attacker's directory; the second authority the real consensus.
    f.serve("/mirror", Directory::encode(&f.attacker));
    f.serve("/a1/v1/consensus", f.consensus(8, 0, &[&k[0], &k[2]]));
    let d = f.fetch(None).await.unwrap();
    let info = d.consensus().unwrap();
    assert_eq!((info.epoch, info.signers, info.authorities), (8, 2, 3));
    let ids: Vec<NodeId> = d.nodes().map(|n| n.node_id).collect();
    let expected: Vec<NodeId> = f
        .honest
        .iter()
        .map(|s| s.verify(now()).unwrap().node_id)
        .collect();
    assert_eq!(ids, expected, "the honest nodes only");
    // An older, still valid consensus replayed by every source is refused once 8 is held.
    let old = f.consensus(6, 0, &[&k[0], &k[1], &k[2]]);
    f.serve("/mirror", old.clone());
    f.serve("/a1/v1/consensus", old);
    assert!(f.fetch(Some(8)).await.is_err());
}
