//! Mailbox replication with real processes (`docs/replication.md`): an edge relay, a mix and
//! three `whispr-mailbox` nodes on loopback, each with its own RocksDB, joined over libp2p.
//! A mailbox is created on all three with its replica set; a deposit routed through the mesh
//! to one replica appears on the other two (pushed over the node-to-node channel). One replica
//! is killed with `kill -9`, its data directory deleted (its mesh keys, kept in a directory of
//! their own, survive: it is the same node), and restarted: anti-entropy repairs its mailbox
//! record (owner signature checked) and messages, and it serves the same message ids. Then
//! deletion and expiry across replicas: messages acknowledged on one replica while another
//! is down are not served by it once back; an expired message is served by none. Also an
//! online backup of a mailbox node, `kill -9`, a lost data directory and a restore; and a
//! replica restored from a backup that gets what it lacks back from its peers by repair.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::Value;
use whispr_mailbox::testkit::{Owner, create_body, create_body_replicated};
use whispr_protocol::directory::Directory;
use whispr_protocol::payload::FinalMessage;
use whispr_protocol::sphinx::{RouteHop, build_packet, create_surb};
use whispr_protocol::{DedupId, DestinationAddress, KeyEpoch, NodeId, UnixTime};

/// Logs the owner's first device in at `base`; `None` when the node refuses (no such
/// mailbox yet, or down).
async fn try_login(http: &reqwest::Client, base: &str, owner: &Owner) -> Option<String> {
    let device = owner.device(0);
    let device_hex = hex::encode(device.verifying_key().to_bytes());
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let r = http
        .post(format!("{base}/v1/auth/challenge"))
        .json(&serde_json::json!({"mailbox_id": mailbox, "device_key": device_hex}))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let c: Value = r.json().await.ok()?;
    let mut challenge = [0u8; 32];
    hex::decode_to_slice(c["challenge"].as_str()?, &mut challenge).ok()?;
    let signature = owner.sign_login(&device, AUDIENCE, &challenge);
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .json(&serde_json::json!({
            "mailbox_id": mailbox, "device_key": device_hex,
            "challenge": hex::encode(challenge), "signature": hex::encode(signature),
        }))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    Some(v["token"].as_str()?.to_string())
}

const MAILBOX: &str = env!("CARGO_BIN_EXE_whispr-mailbox");
const AUDIENCE: &str = "replication-test";
const RETENTION_MS: u64 = 24 * 3600 * 1000;

fn relay_binary() -> PathBuf {
    let path = Path::new(MAILBOX).with_file_name("whispr-relay");
    assert!(
        path.exists(),
        "{} is missing: run the workspace tests (`cargo test --workspace`)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Proc {
    name: String,
    binary: PathBuf,
    config: PathBuf,
    data: PathBuf,
    keys: PathBuf,
    log: PathBuf,
    http_port: u16,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = std::fs::remove_file(self.data.join("node-info.json"));
        self.child = Some(
            Command::new(&self.binary)
                .arg("--config")
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn node_info(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let path = self.data.join("node-info.json");
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["listen"].as_array().is_some_and(|a| !a.is_empty())
            {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} wrote no node-info.json; log:\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn multiaddr(&self) -> String {
        let v = self.node_info();
        let addr = v["listen"][0].as_str().unwrap().to_string();
        let peer = v["peer_id"].as_str().unwrap();
        if addr.contains("/p2p/") {
            addr
        } else {
            format!("{addr}/p2p/{peer}")
        }
    }

    fn node_id(&self) -> NodeId {
        let v = self.node_info();
        let mut id = [0u8; 32];
        hex::decode_to_slice(v["node_id"].as_str().unwrap(), &mut id).unwrap();
        NodeId(id)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn mesh_section(keys: &Path, bootstrap: Option<&str>, extra: &str) -> String {
    let bootstrap = bootstrap
        .map(|b| format!("bootstrap = [\"{b}\"]\n"))
        .unwrap_or_default();
    format!(
        "[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/{}\"]\n{bootstrap}key_dir = \"{}\"\n\
         descriptor_publish_ms = 500\n{extra}",
        free_port(),
        keys.display()
    )
}

fn relay(dir: &Path, name: &str, roles: &str, layer: u32, bootstrap: Option<&str>) -> Proc {
    let data = dir.join(name);
    let keys = dir.join(format!("{name}-keys"));
    let http_port = free_port();
    let config = dir.join(format!("{name}.toml"));
    let layer = if layer > 0 {
        format!("mix_layer = {layer}\n")
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\nmetrics_interval_ms = 0\n\n{}",
            data.display(),
            mesh_section(
                &keys,
                bootstrap,
                &format!("roles = {roles}\n{layer}api_url = \"http://127.0.0.1:{http_port}\"\n")
            )
        ),
    )
    .unwrap();
    Proc {
        name: name.into(),
        binary: relay_binary(),
        config,
        data,
        keys,
        log: dir.join(format!("{name}.log")),
        http_port,
        child: None,
    }
}

fn mailbox(dir: &Path, name: &str, bootstrap: &str) -> Proc {
    mailbox_with(dir, name, bootstrap, "", "")
}

/// [`mailbox`] with `top` among the config's top-level keys and `sections` at its end.
fn mailbox_with(dir: &Path, name: &str, bootstrap: &str, top: &str, sections: &str) -> Proc {
    let data = dir.join(name);
    let keys = dir.join(format!("{name}-keys"));
    let http_port = free_port();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\naudience = \"{AUDIENCE}\"\n{top}\n[api]\nlisten = \"127.0.0.1:{http_port}\"\n\
             ops_per_min_per_connection = 1000000\nmetrics_interval_ms = 0\n\n\
             [limits]\nreplica_repair_interval_ms = 500\nreplica_ack_timeout_ms = 5000\n\n{}{sections}",
            data.display(),
            mesh_section(
                &keys,
                Some(bootstrap),
                &format!("api_url = \"http://127.0.0.1:{http_port}\"\n")
            )
        ),
    )
    .unwrap();
    Proc {
        name: name.into(),
        binary: MAILBOX.into(),
        config,
        data,
        keys,
        log: dir.join(format!("{name}.log")),
        http_port,
        child: None,
    }
}

async fn directory(http: &reqwest::Client, node: &Proc) -> Option<Directory> {
    let r = http
        .get(format!("{}/v1/directory", node.base()))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let bytes = r.bytes().await.ok()?;
    Directory::decode(UnixTime(now_ms()), &bytes)
        .ok()
        .map(|(d, _)| d)
}

async fn wait_directories(http: &reqwest::Client, nodes: &[&Proc], n: usize) -> Directory {
    let deadline = Instant::now() + Duration::from_secs(90);
    'outer: while Instant::now() < deadline {
        let mut last = None;
        for node in nodes {
            match directory(http, node).await {
                Some(d) if d.len() == n => last = Some(d),
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'outer;
                }
            }
        }
        return last.unwrap();
    }
    panic!("the directories did not converge to {n} nodes");
}

/// The message ids `node` serves `owner`, or `None` when it cannot (down, no mailbox).
async fn served(http: &reqwest::Client, node: &Proc, owner: &Owner) -> Option<BTreeSet<String>> {
    let token = try_login(http, &node.base(), owner).await?;
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let r = http
        .get(format!(
            "{}/v1/mailboxes/{mailbox}/messages?limit=100",
            node.base()
        ))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    Some(
        v["messages"]
            .as_array()?
            .iter()
            .map(|m| m["id"].as_str().unwrap_or_default().to_string())
            .collect(),
    )
}

async fn wait_served(
    http: &reqwest::Client,
    node: &Proc,
    owner: &Owner,
    want: &BTreeSet<String>,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = served(http, node, owner).await;
        if got.as_ref() == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: {} serves {got:?}, want {want:?}; log:\n{}",
                node.name,
                std::fs::read_to_string(&node.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_reaches_every_replica_and_a_replica_that_lost_its_disk_is_repaired() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut edge = relay(d, "edge", "[\"edge\"]", 0, None);
    edge.start();
    let boot = edge.multiaddr();
    let mut mix = relay(d, "mix", "[\"mix\", \"edge\"]", 1, Some(&boot));
    mix.start();
    let mut boxes: Vec<Proc> = (1..=3)
        .map(|i| mailbox(d, &format!("mailbox{i}"), &boot))
        .collect();
    for b in &mut boxes {
        b.start();
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let all: Vec<&Proc> = [&edge, &mix].into_iter().chain(boxes.iter()).collect();
    let directory = wait_directories(&http, &all, 5).await;
    drop(all);
    let replicas: Vec<NodeId> = boxes.iter().map(Proc::node_id).collect();
    let (edge_id, mix_id) = (edge.node_id(), mix.node_id());

    // The owner creates its mailbox on the three replicas.
    let owner = Owner::from_seed(303);
    let body = create_body_replicated(
        &owner.create_request_replicated(RETENTION_MS, &replicas),
        &replicas,
    );
    for b in &boxes {
        let r = http
            .post(format!("{}/v1/mailboxes", b.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    // A deposit through the mesh to replica 1 (index 0).
    let mut rng = ChaCha20Rng::seed_from_u64(0x7e9);
    let epoch = KeyEpoch::containing(UnixTime(now_ms()), whispr_protocol::KEY_EPOCH_LEN);
    let hop = |node: NodeId| RouteHop {
        node,
        sphinx_key: *directory.get(&node).unwrap().sphinx_key(epoch).unwrap(),
    };
    let mut want = BTreeSet::new();
    for (k, text) in [b"first".as_slice(), b"second".as_slice()]
        .iter()
        .enumerate()
    {
        let dedup = DedupId::random(&mut rng);
        want.insert(hex::encode(dedup.0));
        let envelope = owner.envelope(&mut rng, dedup, None, None, text).unwrap();
        let plaintext = FinalMessage::Deposit(envelope).encode().unwrap();
        let packet = build_packet(
            &mut rng,
            &[hop(edge_id), hop(mix_id), hop(replicas[k % 3])],
            &[Duration::ZERO; 2],
            DestinationAddress::mailbox(&owner.mailbox_id),
            &plaintext,
        )
        .unwrap();
        let r = http
            .post(format!("{}/v1/packets", edge.base()))
            .header("content-type", "application/octet-stream")
            .body(packet.as_bytes().to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for b in &boxes {
        wait_served(&http, b, &owner, &want, "every replica has both deposits").await;
    }

    // Replica 2 is killed; a deposit to replica 1 with an ack SURB still gets its receipt
    // (written on replicas 1 and 3: the write quorum of 2), into a sender's mailbox on
    // replica 1.
    boxes[1].kill9();
    let sender = Owner::from_seed(404);
    let r = http
        .post(format!("{}/v1/mailboxes", boxes[0].base()))
        .json(&create_body(&sender.create_request(RETENTION_MS)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let surb_id = sender.reply_key.mint_surb_id(&mut rng, &sender.mailbox_id);
    let (surb, recovery) = create_surb(
        &mut rng,
        &[hop(mix_id), hop(replicas[0])],
        &[Duration::ZERO],
        DestinationAddress::mailbox(&sender.mailbox_id),
        surb_id,
    )
    .unwrap();
    let dedup = DedupId::random(&mut rng);
    want.insert(hex::encode(dedup.0));
    let envelope = owner
        .envelope(&mut rng, dedup, None, Some(surb), b"third")
        .unwrap();
    let plaintext = FinalMessage::Deposit(envelope).encode().unwrap();
    let packet = build_packet(
        &mut rng,
        &[hop(edge_id), hop(mix_id), hop(replicas[0])],
        &[Duration::ZERO; 2],
        DestinationAddress::mailbox(&owner.mailbox_id),
        &plaintext,
    )
    .unwrap();
    let r = http
        .post(format!("{}/v1/packets", edge.base()))
        .header("content-type", "application/octet-stream")
        .body(packet.as_bytes().to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let receipt = hex::encode(recovery.surb_id().as_bytes());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = served(&http, &boxes[0], &sender).await.unwrap_or_default();
        if got.contains(&receipt) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no deposit receipt with one replica down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_served(&http, &boxes[2], &owner, &want, "replica 3 has the third").await;

    // Replica 3 loses its disk: kill -9, data directory deleted, restarted (same mesh keys).
    let lost = &mut boxes[2];
    lost.kill9();
    std::fs::remove_dir_all(&lost.data).unwrap();
    assert!(lost.keys.exists());
    lost.start();
    assert_eq!(lost.node_id(), replicas[2]);
    let lost = &boxes[2];
    wait_served(&http, lost, &owner, &want, "the lost replica is repaired").await;
    // Replica 2 comes back (its disk intact) and catches up on what it missed.
    boxes[1].start();
    wait_served(
        &http,
        &boxes[1],
        &owner,
        &want,
        "the restarted replica caught up",
    )
    .await;
    let lost = &boxes[2];
    let metrics = http
        .get(format!("{}/metrics", lost.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("whispr_mailbox_replica_records_repaired_total 1\n"),
        "{metrics}"
    );

    // Deletion across replicas: replica 2 is down while the owner (its only device) reads and
    // acknowledges everything on replica 1; back with its disk and its stale copies, it is
    // told by anti-entropy and serves none of them again (nor does replica 3).
    boxes[1].kill9();
    let token = try_login(&http, &boxes[0].base(), &owner).await.unwrap();
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let page: Value = http
        .get(format!(
            "{}/v1/mailboxes/{mailbox}/messages?limit=100",
            boxes[0].base()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let r = http
        .post(format!("{}/v1/mailboxes/{mailbox}/ack", boxes[0].base()))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "up_to": last }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let none = BTreeSet::new();
    wait_served(&http, &boxes[0], &owner, &none, "acknowledged, deleted").await;
    wait_served(&http, &boxes[2], &owner, &none, "the ack reached replica 3").await;
    boxes[1].start();
    wait_served(
        &http,
        &boxes[1],
        &owner,
        &none,
        "an acknowledged message is not served after repair",
    )
    .await;

    // Expiry across replicas: a deposit that expires in a few seconds reaches every replica,
    // then none serves it, not even one that was down at its expiry and came back.
    let expires = now_ms() + 10_000;
    let dedup = DedupId::random(&mut rng);
    let short: BTreeSet<String> = [hex::encode(dedup.0)].into();
    let envelope = owner
        .envelope(
            &mut rng,
            dedup,
            Some(UnixTime(expires)),
            None,
            b"short-lived",
        )
        .unwrap();
    let plaintext = FinalMessage::Deposit(envelope).encode().unwrap();
    let packet = build_packet(
        &mut rng,
        &[hop(edge_id), hop(mix_id), hop(replicas[0])],
        &[Duration::ZERO; 2],
        DestinationAddress::mailbox(&owner.mailbox_id),
        &plaintext,
    )
    .unwrap();
    let r = http
        .post(format!("{}/v1/packets", edge.base()))
        .header("content-type", "application/octet-stream")
        .body(packet.as_bytes().to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for b in &boxes {
        wait_served(
            &http,
            b,
            &owner,
            &short,
            "the short-lived deposit everywhere",
        )
        .await;
    }
    boxes[1].kill9();
    while now_ms() < expires + 500 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    boxes[1].start();
    for b in &boxes {
        wait_served(
            &http,
            b,
            &owner,
            &none,
            "an expired message is never served",
        )
        .await;
    }
}

const ADMIN_TOKEN: &str = "backup-test-admin-token-0123456789abcdef";

/// Sends one deposit for `owner` with body `text` through the mesh (`route`: edge, mix,
/// mailbox); its dedup id (hex), which is the message id the mailbox serves.
async fn deposit(
    http: &reqwest::Client,
    edge: &Proc,
    route: &[RouteHop],
    owner: &Owner,
    rng: &mut ChaCha20Rng,
    text: &[u8],
) -> String {
    let dedup = DedupId::random(rng);
    let envelope = owner.envelope(rng, dedup, None, None, text).unwrap();
    let plaintext = FinalMessage::Deposit(envelope).encode().unwrap();
    let packet = build_packet(
        rng,
        route,
        &[Duration::ZERO; 2],
        DestinationAddress::mailbox(&owner.mailbox_id),
        &plaintext,
    )
    .unwrap();
    let r = http
        .post(format!("{}/v1/packets", edge.base()))
        .header("content-type", "application/octet-stream")
        .body(packet.as_bytes().to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    hex::encode(dedup.0)
}

/// Runs `whispr-mailbox --config CONFIG ARGS…` on a blocking thread; (success, stdout,
/// stderr).
async fn mailbox_cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(MAILBOX);
    command.arg("--config").arg(config).args(args);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `docs/operators.md`, "Backups and restore": deposits flow through the mesh into a running
/// mailbox node; an online backup is taken through its admin API (`whispr-mailbox backup`)
/// while more deposits arrive; more after it; the node is killed with `kill -9` and its data
/// directory deleted (the master key and mesh keys are kept apart, as operators must);
/// `whispr-mailbox restore` rebuilds it, and the restarted node serves every message it had
/// acknowledged (stored and served) before the backup began, and nothing deposited after the
/// backup ended. The backup holds neither the master key, nor the mesh keys, nor any message
/// body in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_acknowledged_before_an_online_backup_are_served_after_kill_9_wipe_and_restore() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut edge = relay(d, "edge", "[\"edge\"]", 0, None);
    edge.start();
    let boot = edge.multiaddr();
    let mut mix = relay(d, "mix", "[\"mix\", \"edge\"]", 1, Some(&boot));
    mix.start();
    let master = d.join("mailbox-master.key");
    let admin_port = free_port();
    let mut node = mailbox_with(
        d,
        "mailbox",
        &boot,
        &format!("master_key_file = \"{}\"\n", master.display()),
        &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n"),
    );
    node.start();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let directory = wait_directories(&http, &[&edge, &mix, &node], 3).await;
    let epoch = KeyEpoch::containing(UnixTime(now_ms()), whispr_protocol::KEY_EPOCH_LEN);
    let hop = |id: NodeId| RouteHop {
        node: id,
        sphinx_key: *directory.get(&id).unwrap().sphinx_key(epoch).unwrap(),
    };
    let route = [hop(edge.node_id()), hop(mix.node_id()), hop(node.node_id())];
    let owner = Owner::from_seed(505);
    let r = http
        .post(format!("{}/v1/mailboxes", node.base()))
        .json(&create_body(&owner.create_request(RETENTION_MS)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let mut rng = ChaCha20Rng::seed_from_u64(0xbac);
    let body = |phase: &str, i: usize| format!("backup-test-body-{phase}-{i}").into_bytes();

    // Before the backup: every deposit acknowledged (stored, served).
    let mut before = BTreeSet::new();
    for i in 0..30 {
        before.insert(deposit(&http, &edge, &route, &owner, &mut rng, &body("a", i)).await);
    }
    wait_served(&http, &node, &owner, &before, "deposits before the backup").await;

    // The backup, while deposits go on arriving.
    let backups = d.join("backups");
    let config = node.config.clone();
    let backup = {
        let config = config.clone();
        let (to, admin) = (
            backups.to_str().unwrap().to_owned(),
            format!("127.0.0.1:{admin_port}"),
        );
        tokio::spawn(async move {
            mailbox_cli(&config, &["backup", "--to", &to, "--admin", &admin]).await
        })
    };
    let mut during = BTreeSet::new();
    let mut i = 0;
    while !backup.is_finished() || i < 5 {
        during.insert(deposit(&http, &edge, &route, &owner, &mut rng, &body("b", i)).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = backup.await.unwrap();
    assert!(ok, "backup failed: {err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["backup_id"], 1, "{report}");
    let mut after = BTreeSet::new();
    for i in 0..20 {
        after.insert(deposit(&http, &edge, &route, &owner, &mut rng, &body("c", i)).await);
    }
    let all: BTreeSet<String> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .cloned()
        .collect();
    wait_served(&http, &node, &owner, &all, "every deposit").await;
    let metrics = http
        .get(format!("{}/metrics", node.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("whispr_mailbox_backups_total 1\n"),
        "{metrics}"
    );

    // The backup holds no key and no message body in clear.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for key_file in std::iter::once(master.clone()).chain(walk(&node.keys)) {
        let text = std::fs::read(&key_file).unwrap();
        let trimmed = String::from_utf8_lossy(&text).trim().to_owned();
        if let Ok(raw) = hex::decode(&trimmed) {
            secrets.push(raw);
        }
        secrets.push(trimmed.into_bytes());
        secrets.push(text);
    }
    let files = walk(&backups);
    assert!(files.len() > 3, "{files:?}");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        assert!(
            !secrets.iter().any(|s| s.len() >= 16 && holds(&bytes, s)),
            "{} holds a key",
            file.display()
        );
        assert!(
            !holds(&bytes, b"backup-test-body-"),
            "{} holds a message body in clear",
            file.display()
        );
    }

    // kill -9; a restore over the store is refused without --force; the data directory is
    // lost (the master key and mesh keys survive, kept apart); restored.
    node.kill9();
    let from = backups.to_str().unwrap();
    let (ok, _, err) = mailbox_cli(&config, &["restore", "--from", from]).await;
    assert!(!ok && err.contains("--force"), "{err}");
    std::fs::remove_dir_all(&node.data).unwrap();
    let started = Instant::now();
    let (ok, out, err) = mailbox_cli(&config, &["restore", "--from", from]).await;
    assert!(ok, "restore failed: {err}");
    assert!(out.contains("\"backup_id\":1"), "{out}");
    let restore_ms = started.elapsed().as_millis();
    node.start();

    // Every deposit acknowledged before the backup began is served; nothing deposited after
    // it ended is.
    let deadline = Instant::now() + Duration::from_secs(90);
    let served_now = loop {
        if let Some(got) = served(&http, &node, &owner).await
            && got.is_superset(&before)
        {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the restored node does not serve every message acknowledged before the backup; log:\n{}",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "restore {restore_ms} ms, restore + start until served {} ms; {} before, {} of {} during, \
         0 of {} after the backup served",
        started.elapsed().as_millis(),
        before.len(),
        served_now.intersection(&during).count(),
        during.len(),
        after.len()
    );
    assert!(
        served_now.is_disjoint(&after),
        "a deposit made after the backup is served"
    );
    assert!(
        served_now.is_subset(&all),
        "the restored node serves a message never deposited"
    );
}

/// The message ids `node` serves `owner`, in the order served and with any repeat kept
/// (unlike [`served`]), or `None` when it cannot (down, no mailbox).
async fn served_list(http: &reqwest::Client, node: &Proc, owner: &Owner) -> Option<Vec<String>> {
    let token = try_login(http, &node.base(), owner).await?;
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let r = http
        .get(format!(
            "{}/v1/mailboxes/{mailbox}/messages?limit=100",
            node.base()
        ))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v["messages"]
        .as_array()?
        .iter()
        .map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

/// `docs/operators.md`, "Backups and restore", *with replication*: three replicas of one
/// mailbox; deposits A reach all three; an online backup of replica 1; deposits B reach all
/// three; replica 1 is killed with `kill -9`, its data directory deleted (master key and mesh
/// keys kept apart) and restored from the backup. Restarted, it serves A at once (from the
/// backup), then B too, repaired from its peers by anti-entropy, with the same message ids as
/// the other replicas and no message served twice. Prints the time from the restart until B
/// is whole (the RTO of a restored replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_replica_serves_its_backup_at_once_and_gets_the_rest_back_by_repair() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut edge = relay(d, "edge", "[\"edge\"]", 0, None);
    edge.start();
    let boot = edge.multiaddr();
    let mut mix = relay(d, "mix", "[\"mix\", \"edge\"]", 1, Some(&boot));
    mix.start();
    let master = d.join("mailbox1-master.key");
    let admin_port = free_port();
    let mut boxes = vec![mailbox_with(
        d,
        "mailbox1",
        &boot,
        &format!("master_key_file = \"{}\"\n", master.display()),
        &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n"),
    )];
    boxes.extend((2..=3).map(|i| mailbox(d, &format!("mailbox{i}"), &boot)));
    for b in &mut boxes {
        b.start();
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let all: Vec<&Proc> = [&edge, &mix].into_iter().chain(boxes.iter()).collect();
    let directory = wait_directories(&http, &all, 5).await;
    drop(all);
    let replicas: Vec<NodeId> = boxes.iter().map(Proc::node_id).collect();
    let epoch = KeyEpoch::containing(UnixTime(now_ms()), whispr_protocol::KEY_EPOCH_LEN);
    let hop = |id: NodeId| RouteHop {
        node: id,
        sphinx_key: *directory.get(&id).unwrap().sphinx_key(epoch).unwrap(),
    };
    let routes: Vec<[RouteHop; 3]> = replicas
        .iter()
        .map(|r| [hop(edge.node_id()), hop(mix.node_id()), hop(*r)])
        .collect();

    let owner = Owner::from_seed(606);
    let body = create_body_replicated(
        &owner.create_request_replicated(RETENTION_MS, &replicas),
        &replicas,
    );
    for b in &boxes {
        let r = http
            .post(format!("{}/v1/mailboxes", b.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let mut rng = ChaCha20Rng::seed_from_u64(0x5e57);
    let text = |phase: &str, i: usize| format!("restore-repair-{phase}-{i}").into_bytes();

    // Deposits A, spread over the three replicas, acknowledged on all of them.
    let mut a = BTreeSet::new();
    for i in 0..9 {
        let route = &routes[i % 3];
        a.insert(deposit(&http, &edge, route, &owner, &mut rng, &text("a", i)).await);
    }
    for b in &boxes {
        wait_served(&http, b, &owner, &a, "deposits A on every replica").await;
    }

    // An online backup of replica 1.
    let config = boxes[0].config.clone();
    let backups = d.join("backups");
    let to = backups.to_str().unwrap().to_owned();
    let admin = format!("127.0.0.1:{admin_port}");
    let (ok, out, err) = mailbox_cli(&config, &["backup", "--to", &to, "--admin", &admin]).await;
    assert!(ok, "backup failed: {err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["backup_id"], 1, "{report}");

    // Deposits B, again over the three replicas, acknowledged on all of them.
    let mut b_ids = BTreeSet::new();
    for i in 0..9 {
        let route = &routes[i % 3];
        b_ids.insert(deposit(&http, &edge, route, &owner, &mut rng, &text("b", i)).await);
    }
    let every: BTreeSet<String> = a.union(&b_ids).cloned().collect();
    for b in &boxes {
        wait_served(
            &http,
            b,
            &owner,
            &every,
            "deposits A and B on every replica",
        )
        .await;
    }

    // Replica 1: kill -9, its data directory lost (master key and mesh keys kept apart),
    // restored from the backup, restarted.
    boxes[0].kill9();
    std::fs::remove_dir_all(&boxes[0].data).unwrap();
    assert!(boxes[0].keys.exists() && master.exists());
    let restoring = Instant::now();
    let (ok, out, err) = mailbox_cli(&config, &["restore", "--from", &to]).await;
    assert!(ok, "restore failed: {err}");
    let restore_ms = restoring.elapsed().as_millis();
    assert!(out.contains("\"backup_id\":1"), "{out}");
    let restarted = Instant::now();
    boxes[0].start();
    assert_eq!(boxes[0].node_id(), replicas[0]);

    // Its first answer holds every deposit of A (from the backup); it then gets B back by
    // repair. Never a message twice, never one that was not deposited.
    let restored = &boxes[0];
    let deadline = restarted + Duration::from_secs(60);
    let mut first: Option<(u128, Vec<String>)> = None;
    let whole_ms = loop {
        if let Some(list) = served_list(&http, restored, &owner).await {
            let set: BTreeSet<String> = list.iter().cloned().collect();
            assert_eq!(set.len(), list.len(), "a message served twice: {list:?}");
            assert!(set.is_subset(&every), "a message never deposited: {list:?}");
            if first.is_none() {
                assert!(
                    set.is_superset(&a),
                    "the restored replica's first answer lacks deposits of A: {list:?}"
                );
                first = Some((restarted.elapsed().as_millis(), list));
            }
            if set == every {
                break restarted.elapsed().as_millis();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restored replica did not get B back by repair; first answer {first:?}; log:\n{}",
            std::fs::read_to_string(&restored.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (first_ms, first_list) = first.unwrap();
    // The same message ids as the other replicas, each once.
    for b in &boxes {
        let list = served_list(&http, b, &owner).await.unwrap();
        let set: BTreeSet<String> = list.iter().cloned().collect();
        assert_eq!(set.len(), list.len(), "{} serves a message twice", b.name);
        assert_eq!(set, every, "{} serves other ids", b.name);
    }
    eprintln!(
        "restored replica: restore {restore_ms} ms; first answer {first_ms} ms after the restart ({} of {} A, {} of {} B); \
         B whole by repair {whole_ms} ms after the restart",
        first_list.iter().filter(|id| a.contains(*id)).count(),
        a.len(),
        first_list.iter().filter(|id| b_ids.contains(*id)).count(),
        b_ids.len(),
    );
}
