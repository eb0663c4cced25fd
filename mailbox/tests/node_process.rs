//! The mailbox node as real processes: acknowledged deposits survive `kill -9` and are
//! served exactly once, in order; nothing expired is served, before or after a restart
//! that missed the expiry; logs carry no ids, tokens or keys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::Value;
use whispr_mailbox::testkit::Owner;
use whispr_protocol::envelope::Envelope;

#[path = "support/login.rs"]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_whispr-mailbox");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("mailbox.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\naudience = \"test-node\"\n\n[api]\nlisten = \"127.0.0.1:{port}\"\n\
             ops_per_min_per_connection = 1000000\n\n\
             [limits]\nmailbox_messages_max = 1000000\nmailbox_bytes_max = 4000000000\n\
             deposits_per_min = 100000000\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

struct Node {
    child: Child,
    base: String,
    http: reqwest::Client,
    log: PathBuf,
}

impl Node {
    async fn start(config: &Path, port: u16, log: PathBuf) -> Node {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let node = Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = node.http.get(format!("{}/healthz", node.base)).send().await
                && r.status() == 200
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node did not become healthy");
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn login(&self, owner: &Owner) -> String {
        support::login(&self.http, &self.base, owner, "test-node").await
    }

    /// Every message served to the owner device, paging with the cursor.
    async fn fetch_all(&self, owner: &Owner, token: &str) -> Vec<Value> {
        let mailbox = hex::encode(owner.mailbox_id.as_bytes());
        let mut after = 0u64;
        let mut all = Vec::new();
        loop {
            let r = self
                .http
                .get(format!(
                    "{}/v1/mailboxes/{mailbox}/messages?after={after}&limit=100",
                    self.base
                ))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let page = v["messages"].as_array().unwrap().clone();
            if page.is_empty() {
                return all;
            }
            after = page.last().unwrap()["seq"].as_u64().unwrap();
            all.extend(page);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dedup_of(message: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(message["envelope"].as_str().unwrap())
        .unwrap();
    let envelope = Envelope::decode(&bytes).unwrap();
    hex::encode(envelope.outer.dedup_id.as_bytes())
}

/// Runs the deposit load tool; returns the (dedup id, seq) lines it printed.
fn stress(
    config: &Path,
    seed: u64,
    args: &[&str],
    kill_after: Option<Duration>,
) -> Vec<(String, u64)> {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("stress-deposit")
        .arg("--seed")
        .arg(seed.to_string())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push(line);
        }
        lines
    });
    if let Some(d) = kill_after {
        std::thread::sleep(d);
        // SIGKILL: no chance to flush or clean up.
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    if kill_after.is_none() {
        assert!(status.success(), "stress-deposit failed");
    }
    reader
        .join()
        .unwrap()
        .into_iter()
        // A line cut by the kill has no seq or a short id; the deposit may or may not be
        // stored, and it was not reported as acknowledged.
        .filter_map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("acked"), Some(id), Some(seq)) if id.len() == 32 => {
                    seq.parse().ok().map(|s| (id.to_string(), s))
                }
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_deposits_survive_kill_9_and_are_served_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let seed = 7;
    let mut rng = ChaCha20Rng::seed_from_u64(0x6b11);
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let rounds = 50;
    for round in 0..rounds {
        // Random moments: sometimes while the store is still opening, mostly mid-write.
        let kill_after = Duration::from_millis(rng.random_range(20..400));
        let lines = stress(&config, seed, &["--concurrency", "8"], Some(kill_after));
        for (id, seq) in lines {
            assert!(
                acked.insert(id, seq).is_none(),
                "dedup id acknowledged twice"
            );
        }
        if round == rounds / 2 {
            assert!(
                !acked.is_empty(),
                "no deposit acknowledged in {round} rounds"
            );
        }
    }
    assert!(
        acked.len() > 100,
        "only {} deposits acknowledged",
        acked.len()
    );

    let node = Node::start(&config, port, dir.path().join("node.log")).await;
    let owner = Owner::from_seed(seed);
    let token = node.login(&owner).await;
    let served = node.fetch_all(&owner, &token).await;
    let mut seen = BTreeSet::new();
    let mut last_seq = 0;
    let mut served_seq = BTreeMap::new();
    for m in &served {
        let seq = m["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "served out of order");
        last_seq = seq;
        let id = dedup_of(m);
        assert!(seen.insert(id.clone()), "a deposit was served twice");
        served_seq.insert(id, seq);
    }
    for (id, seq) in &acked {
        assert_eq!(
            served_seq.get(id),
            Some(seq),
            "an acknowledged deposit is missing or moved after kill -9"
        );
    }
    eprintln!(
        "{rounds} kill -9 rounds: {} acknowledged, {} served",
        acked.len(),
        served.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_expired_is_served_before_or_after_a_restart_past_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "expiry_bucket_ms = 500\n");
    let seed = 11;
    let owner = Owner::from_seed(seed);
    let short = stress(
        &config,
        seed,
        &[
            "--count",
            "20",
            "--concurrency",
            "4",
            "--expire-in-ms",
            "3000",
        ],
        None,
    );
    let long = stress(&config, seed, &["--count", "5", "--concurrency", "1"], None);
    assert_eq!(short.len(), 20);
    assert_eq!(long.len(), 5);
    let long_ids: BTreeSet<String> = long.iter().map(|(id, _)| id.clone()).collect();
    let written_at = Instant::now();

    // Running node: everything is served before the expiry, only the long-lived ones after.
    let mut node = Node::start(&config, port, dir.path().join("node.log")).await;
    let token = node.login(&owner).await;
    let before = node.fetch_all(&owner, &token).await;
    if written_at.elapsed() < Duration::from_millis(2500) {
        assert_eq!(before.len(), 25);
    }
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(written_at.elapsed())).await;
    let after: BTreeSet<String> = node
        .fetch_all(&owner, &token)
        .await
        .iter()
        .map(dedup_of)
        .collect();
    assert_eq!(after, long_ids, "an expired message was served");
    // The sweep (through the timer queue) deletes them soon after.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = node
            .http
            .get(format!("{}/metrics", node.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("whispr_mailbox_expired_deleted_total 20") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired messages were not swept:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill();

    // Second batch, then the node is down past their expiry: purged at start, never served.
    let short2 = stress(
        &config,
        seed,
        &[
            "--count",
            "10",
            "--concurrency",
            "2",
            "--expire-in-ms",
            "1000",
        ],
        None,
    );
    assert_eq!(short2.len(), 10);
    std::thread::sleep(Duration::from_millis(1500));
    let node = Node::start(&config, port, dir.path().join("node.log")).await;
    let token = node.login(&owner).await;
    let served: BTreeSet<String> = node
        .fetch_all(&owner, &token)
        .await
        .iter()
        .map(dedup_of)
        .collect();
    assert_eq!(
        served, long_ids,
        "an expired message was served after restart"
    );
    let info: Value = node
        .http
        .get(format!(
            "{}/v1/mailboxes/{}",
            node.base,
            hex::encode(owner.mailbox_id.as_bytes())
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info["messages"], 5,
        "expired messages were not purged at start-up"
    );

    // The node's logs carry no mailbox id, key, token or address.
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("mailbox node started"), "log is empty?\n{log}");
    let secrets = [
        hex::encode(owner.mailbox_id.as_bytes()),
        hex::encode(owner.owner.verifying_key().to_bytes()),
        hex::encode(owner.access_token.as_bytes()),
        token.clone(),
        "127.0.0.1".to_string(),
    ];
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "log leaks a secret or address");
    }
    for id in long_ids.iter().chain(short.iter().map(|(id, _)| id)) {
        assert!(!log.contains(id.as_str()), "log leaks a dedup id");
    }
}
