//! The load generator behind `docs/dos-budget.md` (tracker issue 16, "No cheap denial of
//! service"): it starts a devnet of real node processes (the code of `whispr devnet up`:
//! 3 authorities, an edge and one mix, one mailbox node, one timer node), attacks one
//! resource at a time at increasing rates or numbers of source addresses while an honest probe
//! keeps doing the legitimate operation, and prints what it measured (a Markdown table, and
//! JSON lines with `--json FILE`). Run by `scripts/dos-budget.sh` (`make dos-budget`).
//!
//! Source addresses: every address of 127.0.0.0/8 is a loopback address on Linux, so the
//! attacker and the honest probe bind distinct ones (`127.0.0.2` is the honest client,
//! `127.1.x.y` the attacker's). The mailbox node is restarted with `[api]
//! loopback_per_connection = false` so that it limits loopback clients per address as it does
//! public ones. The HTTP connection caps exempt loopback from the per-address cap (a reverse
//! proxy), so only the total cap is measured here.
//!
//! Phases (`--phases connections,challenges,creation,mixqueue,replay`, all by default;
//! `scripts/dos-budget.sh` runs each on a devnet of its own):
//! - `connections`: idle TCP connections to the edge relay's HTTP listener, in steps; after
//!   each step (once the relay's open descriptors stop growing) an honest `GET /healthz` from
//!   another address. Reports the first step at which it got no answer.
//! - `challenges`: `POST /v1/auth/challenge` floods from 1, 64 and 512 attacker addresses
//!   (default config), then from 64 with the per-source bounds off (`challenges_per_source_max`
//!   = `challenges_max`, `ops_per_min_per_connection` raised); an honest owner logs in
//!   (challenge, signed login) every 1.5 s meanwhile.
//! - `creation`: `mailboxes_max` set to 300 (scaled down from 100,000): attacker addresses
//!   each create mailboxes until refused; after each address an honest address creates one.
//!   Then with `mailbox_creations_per_hour_per_ip` raised (the old code had no such limit):
//!   one address alone, and its creation rate.
//! - `mixqueue`: the mix's `queue_max` set to 2,000 (scaled down from 100,000); attacker
//!   packets enter at the edge with the route edge → mix → mix → mix → mix and 5 s per mix
//!   hop (15 s held at the mix, charged to the edge's share there); rates 30, 60, 120, 240, 480
//!   packets/s for 45 s each while alice sends bob a message and waits for its
//!   acknowledgement (10 s) over and over.
//! - `replay`: the mix's `replay_tags_per_epoch_max` set to 2,000 (scaled down from 10 M);
//!   fresh packets edge → mix (the mix records their tag, then drops them: it has no
//!   destination) in steps of 1, 2, 3, 4, 6 and 8 times that; the share of each step's fresh
//!   packets the mix refused as replays (its drop counters), then 6 honest messages.
//!
//! ```sh
//! cargo build --workspace --bins --examples --profile test
//! target/debug/examples/dos_budget --dir /tmp/dos --json /tmp/dos/results.jsonl
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::indexing_slicing,
    clippy::cast_precision_loss,
    missing_docs
)]

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use whispr_client::devnet::{Devnet, DevnetOptions, default_bin_dir};
use whispr_client::net::Net;
use whispr_client::{Client, KdfParams, OutState, Receipts, SendOptions, Settings, now_ms};
use whispr_protocol::consensus::Network;
use whispr_protocol::directory::Role;
use whispr_protocol::mailbox_api::{create_transcript_v2, login_transcript, node_audience};
use whispr_protocol::sphinx::{RouteHop, build_packet};
use whispr_protocol::{DestinationAddress, KEY_EPOCH_LEN, KeyEpoch, MailboxId, NodeId, UnixTime};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Error>;

const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The `i`-th attacker address (127.1.x.y).
fn attacker(i: usize) -> IpAddr {
    let i = u32::try_from(i).unwrap_or(0) + 1;
    IpAddr::V4(Ipv4Addr::from(0x7f01_0000 | (i & 0xffff)))
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    b
}

/// CPU seconds (user + system) of a process, from /proc (clock ticks of 1/100 s).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some(rest) = text.rsplit(") ").next() else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU use of the generator and the target node over a measurement.
struct Cpu {
    start: Instant,
    me: f64,
    node: f64,
    pid: u32,
}

impl Cpu {
    fn start(pid: u32) -> Cpu {
        Cpu {
            start: Instant::now(),
            me: cpu_seconds(None),
            node: cpu_seconds(Some(pid)),
            pid,
        }
    }
    /// (generator %, target node %) of one core.
    fn stop(&self) -> (f64, f64) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-3);
        (
            100.0 * (cpu_seconds(None) - self.me) / wall,
            100.0 * (cpu_seconds(Some(self.pid)) - self.node) / wall,
        )
    }
}

struct Out {
    json: Option<std::fs::File>,
    rows: Vec<String>,
}

impl Out {
    fn record(&mut self, v: Value) {
        eprintln!("dos-budget: {v}");
        if let Some(f) = self.json.as_mut() {
            let _ = writeln!(f, "{v}");
        }
    }
    fn row(&mut self, cells: &[String]) {
        let row = format!("| {} |", cells.join(" | "));
        eprintln!("dos-budget: {row}");
        self.rows.push(row);
    }
}

fn node_pid(devnet: &Devnet, name: &str) -> Res<(u32, u16)> {
    devnet
        .record()
        .nodes
        .iter()
        .find(|n| n.name == name)
        .map(|n| (n.pid, n.http_port))
        .ok_or_else(|| format!("no node {name}").into())
}

/// Restarts `name` with its original configuration plus `api` (keys inserted at the top of
/// its `[api]` section) and `tail` (tables appended), wiping its data if asked.
fn reconfigure(
    devnet: &mut Devnet,
    dir: &Path,
    name: &str,
    api: &str,
    tail: &str,
    wipe: bool,
) -> Res<()> {
    let config = dir.join(format!("{name}.toml"));
    let original = dir.join(format!("{name}.toml.orig"));
    if !original.exists() {
        std::fs::copy(&config, &original)?;
    }
    let text = std::fs::read_to_string(&original)?;
    let text = if api.is_empty() {
        text
    } else {
        text.replacen("[api]\n", &format!("[api]\n{api}"), 1)
    };
    std::fs::write(&config, format!("{text}\n{tail}"))?;
    devnet.kill(name)?;
    devnet.restart(name, wipe)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// connections

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// An honest `GET /healthz` on a new connection: answered 200 within 3 s.
async fn healthz(to: SocketAddr) -> bool {
    let attempt = async {
        let mut s = connect_from(HONEST, to).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(buf.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(true))
    )
}

/// Waits until the node's open descriptors stop growing (it has accepted what was opened).
async fn settle_fds(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = open_fds(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open_fds(pid);
        if now == last {
            return;
        }
        last = now;
    }
}

async fn phase_connections(devnet: &Devnet, out: &mut Out) -> Res<()> {
    let (pid, port) = node_pid(devnet, "edge")?;
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    if !healthz(to).await {
        return Err("the edge does not answer /healthz before the attack".into());
    }
    let cpu = Cpu::start(pid);
    let start = Instant::now();
    let mut held: Vec<TcpStream> = Vec::new();
    let mut refused_at = None;
    let mut open_errors = 0u64;
    for step in [
        1024usize, 2048, 3072, 3584, 4000, 4064, 4096, 4160, 5120, 6144,
    ] {
        while held.len() < step {
            match connect_from(attacker(held.len() % 4), to).await {
                Ok(s) => held.push(s),
                Err(_) => {
                    open_errors += 1;
                    if open_errors > 100 {
                        break;
                    }
                }
            }
        }
        settle_fds(pid).await;
        let ok = healthz(to).await;
        out.record(
            json!({"phase": "connections", "idle_connections": held.len(),
            "edge_open_fds": open_fds(pid), "honest_ok": ok,
            "elapsed_ms": start.elapsed().as_millis() as u64}),
        );
        if !ok {
            refused_at = Some(held.len());
            break;
        }
    }
    let ramp = start.elapsed();
    let (me, node) = cpu.stop();
    drop(held);
    let released = Instant::now();
    let mut recovered = None;
    while released.elapsed() < Duration::from_secs(40) {
        if healthz(to).await {
            recovered = Some(released.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let verdict = match refused_at {
        Some(n) => format!(
            "honest request refused at {n} idle connections (opened in {:.1} s; each is closed after 30 s without a request, so holding them takes {:.0} connections/s)",
            ramp.as_secs_f64(),
            n as f64 / 30.0
        ),
        None => "not reached up to 6,144 idle connections".to_string(),
    };
    out.row(&[
        "connections (edge HTTP, one loopback address)".into(),
        verdict,
        format!(
            "answered again {} after the attacker closed them",
            recovered.map_or("not within 40 s".to_string(), |d| format!(
                "{} ms",
                d.as_millis()
            ))
        ),
        format!("{me:.0} % / {node:.0} %"),
    ]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mailbox API: creation and challenges

struct Owner {
    id: [u8; 32],
    key: SigningKey,
}

fn http_from(addr: IpAddr) -> Res<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(addr)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// `POST /v1/mailboxes` for a fresh mailbox; the HTTP status and the error kind.
async fn create(
    http: &reqwest::Client,
    api: &str,
    node: NodeId,
) -> Res<(u16, String, Option<Owner>)> {
    let id = random32();
    let key = SigningKey::from_bytes(&random32());
    let owner_pub = key.verifying_key().to_bytes();
    let mailbox_key = random32();
    let hash: [u8; 32] = Sha256::digest(random32()).into();
    let reply = random32();
    let retention = 7 * 24 * 3_600_000u64;
    let transcript = create_transcript_v2(
        &MailboxId(id),
        &mailbox_key,
        &owner_pub,
        &hash,
        Some(&reply),
        retention,
        &[node],
    )
    .ok_or("transcript")?;
    let body = json!({
        "mailbox_id": hex::encode(id),
        "mailbox_key": hex::encode(mailbox_key),
        "owner_key": hex::encode(owner_pub),
        "access_key_hash": hex::encode(hash),
        "reply_key": hex::encode(reply),
        "retention_ms": retention,
        "replicas": [hex::encode(node.0)],
        "signature": hex::encode(key.sign(&transcript).to_bytes()),
    });
    let r = http
        .post(format!("{api}/v1/mailboxes"))
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let kind = v
        .get("error")
        .and_then(|e| {
            e.as_str()
                .map(str::to_string)
                .or_else(|| e.get("kind")?.as_str().map(str::to_string))
        })
        .unwrap_or_default();
    Ok((status, kind, (status == 201).then_some(Owner { id, key })))
}

/// A full login (challenge, signed answer): Ok(()) on a token.
async fn login(http: &reqwest::Client, api: &str, node: NodeId, owner: &Owner) -> Res<()> {
    let device = owner.key.verifying_key().to_bytes();
    let r = http
        .post(format!("{api}/v1/auth/challenge"))
        .json(&json!({"mailbox_id": hex::encode(owner.id), "device_key": hex::encode(device)}))
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("challenge: {}", r.status()).into());
    }
    let c: Value = r.json().await?;
    let mut challenge = [0u8; 32];
    hex::decode_to_slice(
        c.get("challenge").and_then(Value::as_str).unwrap_or(""),
        &mut challenge,
    )?;
    let audience = node_audience(&node);
    let sig = owner.key.sign(&login_transcript(
        &audience,
        &MailboxId(owner.id),
        &device,
        &challenge,
    ));
    let r = http
        .post(format!("{api}/v1/auth/login"))
        .json(
            &json!({"mailbox_id": hex::encode(owner.id), "device_key": hex::encode(device),
            "challenge": hex::encode(challenge), "signature": hex::encode(sig.to_bytes())}),
        )
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("login: {}", r.status()).into());
    }
    Ok(())
}

fn mailbox_node_id(dir: &Path) -> Res<NodeId> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("mailbox1/node-info.json"),
    )?)?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(
        v.get("node_id").and_then(Value::as_str).unwrap_or(""),
        &mut id,
    )?;
    Ok(NodeId(id))
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

/// Floods challenges from `addrs` for `secs` while the honest owner logs in every 1.5 s.
async fn challenge_flood(
    api: &str,
    node: NodeId,
    pid: u32,
    addrs: usize,
    secs: u64,
    victim: &Owner,
) -> Res<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    let clients = (0..addrs)
        .map(|i| http_from(attacker(i)))
        .collect::<Res<Vec<_>>>()?;
    let cpu = Cpu::start(pid);
    let start = Instant::now();
    for http in clients {
        let (stop, counts, api) = (stop.clone(), counts.clone(), api.to_string());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"mailbox_id": hex::encode(random32()), "device_key": hex::encode(random32())});
                let r = http.post(format!("{api}/v1/auth/challenge")).json(&body).send().await;
                let c = match r.map(|r| r.status().as_u16()) {
                    Ok(200) => &counts.ok,
                    Ok(429) => &counts.limited,
                    _ => &counts.other,
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let honest = http_from(HONEST)?;
    let (mut logins_ok, mut logins_failed, mut worst) = (0u64, 0u64, Duration::ZERO);
    let mut failures = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        match login(&honest, api, node, victim).await {
            Ok(()) => logins_ok += 1,
            Err(e) => {
                logins_failed += 1;
                failures.push(e.to_string());
            }
        }
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let wall = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let (me, node_cpu) = cpu.stop();
    let sent = counts.ok.load(Ordering::Relaxed)
        + counts.limited.load(Ordering::Relaxed)
        + counts.other.load(Ordering::Relaxed);
    failures.truncate(3);
    Ok(json!({
        "attacker_addresses": addrs,
        "attack_requests_per_s": (sent as f64 / wall).round(),
        "challenges_issued_per_s": (counts.ok.load(Ordering::Relaxed) as f64 / wall).round(),
        "refused_429": counts.limited.load(Ordering::Relaxed),
        "other": counts.other.load(Ordering::Relaxed),
        "honest_logins_ok": logins_ok,
        "honest_logins_failed": logins_failed,
        "honest_failures": failures,
        "honest_worst_ms": worst.as_millis() as u64,
        "generator_cpu_pct": me.round(),
        "node_cpu_pct": node_cpu.round(),
    }))
}

async fn phase_challenges(devnet: &mut Devnet, dir: &Path, out: &mut Out) -> Res<()> {
    let node = mailbox_node_id(dir)?;
    let base = "loopback_per_connection = false\n";
    let variants: [(&str, &str, &str, &[usize]); 2] = [
        ("default bounds", base, "", &[1, 64, 512]),
        (
            "per-source bounds off (challenges_per_source_max = challenges_max, ops limit raised)",
            "loopback_per_connection = false\nops_per_min_per_connection = 6000000\n",
            "[auth]\nchallenges_per_source_max = 10000\n",
            &[64],
        ),
    ];
    for (label, api_keys, tail, levels) in variants {
        reconfigure(devnet, dir, "mailbox1", api_keys, tail, true)?;
        let (pid, port) = node_pid(devnet, "mailbox1")?;
        let api = format!("http://127.0.0.1:{port}");
        let honest = http_from(HONEST)?;
        let (status, kind, owner) = create(&honest, &api, node).await?;
        let owner = owner.ok_or(format!(
            "the honest mailbox was not created: {status} {kind}"
        ))?;
        login(&honest, &api, node, &owner).await?;
        for &addrs in levels {
            let v = challenge_flood(&api, node, pid, addrs, 12, &owner).await?;
            let mut rec = v.clone();
            rec["phase"] = json!("challenges");
            rec["config"] = json!(label);
            out.record(rec);
            out.row(&[
                format!("login challenges ({label})"),
                format!(
                    "{} addresses, {} challenge requests/s ({} issued/s, {} answered 429): honest logins {} ok, {} failed (slowest {} ms)",
                    addrs, v["attack_requests_per_s"], v["challenges_issued_per_s"],
                    v["refused_429"], v["honest_logins_ok"], v["honest_logins_failed"], v["honest_worst_ms"]
                ),
                String::new(),
                format!("{} % / {} %", v["generator_cpu_pct"], v["node_cpu_pct"]),
            ]);
        }
    }
    Ok(())
}

async fn phase_creation(devnet: &mut Devnet, dir: &Path, out: &mut Out) -> Res<()> {
    let node = mailbox_node_id(dir)?;
    let cap = 300usize;
    let tail = format!("[limits]\nmailboxes_max = {cap}\n");
    // After: the default per-address limit (30 per hour).
    reconfigure(
        devnet,
        dir,
        "mailbox1",
        "loopback_per_connection = false\n",
        &tail,
        true,
    )?;
    let (pid, port) = node_pid(devnet, "mailbox1")?;
    let api = format!("http://127.0.0.1:{port}");
    let cpu = Cpu::start(pid);
    let start = Instant::now();
    let mut created = 0usize;
    let mut denied_at = None;
    for a in 0..40usize {
        let http = http_from(attacker(a))?;
        loop {
            let (status, kind, _) = create(&http, &api, node).await?;
            if status == 201 {
                created += 1;
            } else {
                out.record(
                    json!({"phase": "creation", "config": "default", "address": a + 1,
                    "created_total": created, "stopped_by": format!("{status} {kind}")}),
                );
                break;
            }
        }
        let probe = http_from(IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            2,
            u8::try_from(a + 1).unwrap_or(1),
        )))?;
        let (status, kind, _) = create(&probe, &api, node).await?;
        if status != 201 {
            denied_at = Some((a + 1, format!("{status} {kind}")));
            break;
        }
        created += 1;
    }
    let (me, node_cpu) = cpu.stop();
    let secs = start.elapsed().as_secs_f64();
    out.record(json!({"phase": "creation", "config": "default", "mailboxes_max": cap,
        "attacker_addresses": denied_at.as_ref().map(|d| d.0), "created": created, "seconds": secs}));
    out.row(&[
        format!("mailbox creation (mailboxes_max = {cap}, 30 per address per hour)"),
        match &denied_at {
            Some((a, why)) => format!(
                "honest creation refused ({why}) after {a} attacker addresses had each created until refused ({created} mailboxes, {:.1} s)",
                secs
            ),
            None => format!("not reached with 40 addresses ({created} mailboxes)"),
        },
        String::new(),
        format!("{me:.0} % / {node_cpu:.0} %"),
    ]);

    // Before: no per-address limit (the old code had none): one address alone.
    reconfigure(
        devnet,
        dir,
        "mailbox1",
        "loopback_per_connection = false\nops_per_min_per_connection = 6000000\nmailbox_creations_per_hour_per_ip = 6000000\n",
        &tail,
        true,
    )?;
    let (pid, port) = node_pid(devnet, "mailbox1")?;
    let api = format!("http://127.0.0.1:{port}");
    let http = http_from(attacker(0))?;
    let cpu = Cpu::start(pid);
    let start = Instant::now();
    let mut created = 0usize;
    let stopped = loop {
        let (status, kind, _) = create(&http, &api, node).await?;
        if status != 201 {
            break format!("{status} {kind}");
        }
        created += 1;
    };
    let secs = start.elapsed().as_secs_f64();
    let (me, node_cpu) = cpu.stop();
    let (status, kind, _) = create(&http_from(HONEST)?, &api, node).await?;
    let rate = created as f64 / secs.max(1e-3);
    out.record(json!({"phase": "creation", "config": "per-address limit off", "created": created,
        "seconds": secs, "per_s": rate, "stopped_by": stopped, "honest": format!("{status} {kind}")}));
    out.row(&[
        "mailbox creation, per-address limit off (as before the fix)".into(),
        format!(
            "one address, one connection, sequential: {created} mailboxes in {secs:.1} s ({rate:.0}/s) until {stopped}; then an honest creation got {status} {kind}; 100,000 would take {:.0} s at that rate",
            100_000.0 / rate.max(1e-3)
        ),
        String::new(),
        format!("{me:.0} % / {node_cpu:.0} %"),
    ]);
    reconfigure(devnet, dir, "mailbox1", "", "", true)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mix queue

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn mix_metrics(port: u16) -> String {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return String::new();
    };
    r.text().await.unwrap_or_default()
}

/// Attack packets: edge, then four passes through the mix, `hop_ms` at each mix pass but
/// the last; the last pass delivers to the mix itself, which has no destination.
fn attack_packets(edge: &RouteHop, mix: &RouteHop, hop_ms: u64, n: usize) -> Res<Vec<u8>> {
    let route = [
        edge.clone(),
        mix.clone(),
        mix.clone(),
        mix.clone(),
        mix.clone(),
    ];
    let d = Duration::from_millis(hop_ms);
    let delays = [Duration::ZERO, d, d, d];
    let mut body = Vec::new();
    let mut rng = rand::rng();
    for _ in 0..n {
        let p = build_packet(
            &mut rng,
            &route,
            &delays,
            DestinationAddress::NODE_SERVICE,
            b"load",
        )?;
        body.extend_from_slice(p.as_bytes());
    }
    Ok(body)
}

/// Alice and bob, contacts through the devnet (bob's side is only needed to accept).
async fn honest_pair(devnet: &Devnet, home: &Path) -> Res<Client> {
    let url = devnet.directory_url().to_string();
    let network_text = std::fs::read_to_string(devnet.network_file())?;
    let settings = Settings {
        network: Some(network_text),
        ..Settings::default()
    };
    let mut alice = Client::init(
        &home.join("alice"),
        b"a",
        &url,
        settings.clone(),
        KdfParams::default(),
    )?;
    let mut bob = Client::init(
        &home.join("bob"),
        b"b",
        &url,
        Settings {
            receipts: Receipts::None,
            poll_wait_ms: 200,
            ..settings
        },
        KdfParams::default(),
    )?;
    let invitation = alice.invite(Some("bob"), true).await?;
    let hello = bob.accept(&invitation, "alice").await?;
    bob.wait_stored(hello, Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !alice.contacts().iter().any(|c| c.state == "established") {
        alice.sync(Duration::from_millis(500)).await?;
        if Instant::now() > deadline {
            return Err("bob's hello did not reach alice".into());
        }
    }
    Ok(alice)
}

/// Waits until a message from alice to bob is acknowledged (after a node's restart).
async fn warm_up(alice: &mut Client) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let id = alice.send("bob", "warm-up", SendOptions::default()).await?;
        if alice.wait_stored(id, Duration::from_secs(15)).await? == OutState::Stored {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("no message acknowledged within 90 s".into());
        }
    }
}

/// Honest messages: the latencies of those acknowledged within 10 s, and the others.
#[derive(Default)]
struct Probes {
    stored_ms: Vec<u64>,
    failed: u64,
}

impl Probes {
    async fn one(&mut self, alice: &mut Client) -> Res<()> {
        let t = Instant::now();
        let id = alice.send("bob", "probe", SendOptions::default()).await?;
        if alice.wait_stored(id, Duration::from_secs(10)).await? == OutState::Stored {
            self.stored_ms
                .push(u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        } else {
            self.failed += 1;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        self.stored_ms.sort_unstable();
        let n = self.stored_ms.len();
        let p50 = self.stored_ms.get(n / 2).copied().unwrap_or(0);
        let max = self.stored_ms.last().copied().unwrap_or(0);
        format!(
            "honest messages {n} of {} acknowledged within 10 s (median {p50} ms, slowest {max} ms)",
            n as u64 + self.failed
        )
    }
}

/// The route hops of the edge and the mix from the current consensus.
async fn hops(devnet: &Devnet) -> Res<(RouteHop, RouteHop)> {
    let network = Network::parse(&std::fs::read_to_string(devnet.network_file())?)?;
    let dirc = Net::new()?
        .directory(
            &[devnet.directory_url().to_string()],
            &network,
            UnixTime(now_ms()),
            None,
        )
        .await?;
    let epoch = KeyEpoch::containing(UnixTime(now_ms()), KEY_EPOCH_LEN);
    let hop = |role: Role| -> Res<RouteHop> {
        let n = dirc
            .nodes()
            .find(|n| n.has_role(role))
            .ok_or("no such node")?;
        Ok(RouteHop {
            node: n.node_id,
            sphinx_key: *n.sphinx_key(epoch).ok_or("no sphinx key for the epoch")?,
        })
    };
    Ok((hop(Role::Edge)?, hop(Role::Mix)?))
}

type Results = Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>;

/// Submits `body` (packets) to the edge; counts the per-packet results.
async fn submit(http: &reqwest::Client, edge_api: &str, body: Vec<u8>, results: &Results) {
    let r = http
        .post(format!("{edge_api}/v1/packets"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await;
    let v: Value = match r {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
        Ok(r) => json!({"results": [format!("http {}", r.status().as_u16())]}),
        Err(_) => json!({"results": ["no answer"]}),
    };
    if let Ok(mut m) = results.lock() {
        for x in v
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            *m.entry(x.as_str().unwrap_or("?").to_string()).or_insert(0) += 1;
        }
    }
}

const SHARE_DROPS: &str = "whispr_mesh_packets_dropped_total{reason=\"queue_share\"";

async fn phase_mixqueue(
    devnet: &mut Devnet,
    dir: &Path,
    alice: &mut Client,
    out: &mut Out,
) -> Res<()> {
    let queue_max = 2000usize;
    let hop_ms = 5000u64;
    reconfigure(
        devnet,
        dir,
        "mix1",
        "",
        &format!("[mesh.router]\nqueue_max = {queue_max}\n"),
        false,
    )?;
    let (mix_pid, mix_port) = node_pid(devnet, "mix1")?;
    let (_, edge_port) = node_pid(devnet, "edge")?;
    let edge_api = format!("http://127.0.0.1:{edge_port}");
    warm_up(alice).await?;
    let (edge, mix) = hops(devnet).await?;

    for rate in [30u64, 60, 120, 240, 480] {
        // Start from an empty mix queue (an event: the mix's own gauge).
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&mix_metrics(mix_port).await, "whispr_mesh_queue_depth") > 20.0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let drops0 = metric(&mix_metrics(mix_port).await, SHARE_DROPS);
        let stop = Arc::new(AtomicBool::new(false));
        let results: Results = Arc::default();
        let depth_max = Arc::new(AtomicU64::new(0));
        let cpu = Cpu::start(mix_pid);
        let start = Instant::now();
        let attack = {
            let (stop, results, edge, mix, edge_api) = (
                stop.clone(),
                results.clone(),
                edge.clone(),
                mix.clone(),
                edge_api.clone(),
            );
            tokio::spawn(async move {
                // A new connection for every batch (a fresh per-connection budget at the edge).
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()?;
                let batch = usize::try_from(rate / 10).unwrap_or(1).max(1);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut inflight = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let (e, m) = (edge.clone(), mix.clone());
                    let body =
                        tokio::task::spawn_blocking(move || attack_packets(&e, &m, hop_ms, batch))
                            .await??;
                    // Submitted on its own task: the next batch is built meanwhile.
                    let (http, edge_api, results) =
                        (http.clone(), edge_api.clone(), results.clone());
                    inflight.push(tokio::spawn(async move {
                        submit(&http, &edge_api, body, &results).await;
                    }));
                }
                for t in inflight {
                    let _ = t.await;
                }
                Res::Ok(())
            })
        };
        let watch = {
            let (stop, depth_max) = (stop.clone(), depth_max.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let d = metric(&mix_metrics(mix_port).await, "whispr_mesh_queue_depth");
                    depth_max.fetch_max(d as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        // Honest messages during the whole level; the verdict is over those sent once the
        // queue had had the mix hold time to fill (after 3 × hop_ms).
        let fill = Duration::from_millis(3 * hop_ms);
        let mut probes = Probes::default();
        while start.elapsed() < Duration::from_secs(45) {
            if start.elapsed() >= fill {
                probes.one(alice).await?;
            } else {
                Probes::default().one(alice).await?;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let wall = start.elapsed().as_secs_f64();
        let attack_result = attack.await?;
        let _ = watch.await;
        let (me, mix_cpu) = cpu.stop();
        let results = results.lock().map(|m| m.clone()).unwrap_or_default();
        let accepted = results.get("ok").copied().unwrap_or(0);
        let drops = metric(&mix_metrics(mix_port).await, SHARE_DROPS) - drops0;
        let honest = probes.summary();
        let v = json!({"phase": "mixqueue", "queue_max": queue_max, "hold_at_mix_ms": 3 * hop_ms,
            "offered_per_s": rate, "accepted_by_edge_per_s": (accepted as f64 / wall).round(),
            "edge_results": results, "mix_queue_depth_max": depth_max.load(Ordering::Relaxed),
            "mix_queue_share_drops": drops, "honest": honest,
            "honest_stored": probes.stored_ms.len(), "honest_failed": probes.failed,
            "generator_cpu_pct": me.round(), "mix_cpu_pct": mix_cpu.round(),
            "attack_error": attack_result.err().map(|e| e.to_string())});
        out.record(v.clone());
        out.row(&[
            format!("mix queue (queue_max = {queue_max}, 15 s held at the mix)"),
            format!(
                "{rate} packets/s offered ({} accepted by the edge/s; mix queue up to {}, {drops} refused by the mix for the edge's share): {honest}",
                v["accepted_by_edge_per_s"], v["mix_queue_depth_max"]
            ),
            String::new(),
            format!("{me:.0} % / {mix_cpu:.0} % (mix)"),
        ]);
    }
    // The mix keeps this configuration; the next phase that needs another restarts it.
    Ok(())
}

/// Fresh two-hop packets, edge then mix, each leaving a new tag in the mix's replay filter
/// (the mix, which has no destination, drops them once their tag is recorded).
fn tag_packets(edge: &RouteHop, mix: &RouteHop, n: usize) -> Res<Vec<u8>> {
    let route = [edge.clone(), mix.clone()];
    let mut body = Vec::new();
    let mut rng = rand::rng();
    for _ in 0..n {
        let p = build_packet(
            &mut rng,
            &route,
            &[Duration::ZERO],
            DestinationAddress::NODE_SERVICE,
            b"tag",
        )?;
        body.extend_from_slice(p.as_bytes());
    }
    Ok(body)
}

const REPLAY_DROPS: &str = "whispr_mesh_packets_dropped_total{reason=\"replay\"";
const NO_DEST_DROPS: &str = "whispr_mesh_packets_dropped_total{reason=\"no_destination\"";

async fn phase_replay(
    devnet: &mut Devnet,
    dir: &Path,
    alice: &mut Client,
    out: &mut Out,
) -> Res<()> {
    let capacity = 2000usize;
    reconfigure(
        devnet,
        dir,
        "mix1",
        "",
        &format!("[mesh.router]\nreplay_tags_per_epoch_max = {capacity}\n"),
        false,
    )?;
    let (mix_pid, mix_port) = node_pid(devnet, "mix1")?;
    let (_, edge_port) = node_pid(devnet, "edge")?;
    let edge_api = format!("http://127.0.0.1:{edge_port}");
    warm_up(alice).await?;
    let (edge, mix) = hops(devnet).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut sent = 0usize;
    for multiple in [1usize, 2, 3, 4, 6, 8] {
        let target = capacity * multiple;
        let results: Results = Arc::default();
        let m0 = mix_metrics(mix_port).await;
        let (replay0, nodest0) = (metric(&m0, REPLAY_DROPS), metric(&m0, NO_DEST_DROPS));
        let cpu = Cpu::start(mix_pid);
        let start = Instant::now();
        let before = sent;
        while sent < target {
            let n = (target - sent).min(64); // the edge's `http.batch_max`
            let (e, m) = (edge.clone(), mix.clone());
            let body = tokio::task::spawn_blocking(move || tag_packets(&e, &m, n)).await??;
            submit(&http, &edge_api, body, &results).await;
            sent += n;
        }
        let secs = start.elapsed().as_secs_f64();
        let (me, mix_cpu) = cpu.stop();
        // Every attack packet has reached the mix (an event: its drop counters).
        let step = (sent - before) as f64;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut replayed, mut nodest) = (0.0, 0.0);
        while Instant::now() < deadline {
            let m = mix_metrics(mix_port).await;
            replayed = metric(&m, REPLAY_DROPS) - replay0;
            nodest = metric(&m, NO_DEST_DROPS) - nodest0;
            if replayed + nodest >= step {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut probes = Probes::default();
        for _ in 0..6 {
            probes.one(alice).await?;
        }
        let results = results.lock().map(|m| m.clone()).unwrap_or_default();
        let pct = 100.0 * replayed / (replayed + nodest).max(1.0);
        let per_s = (step / secs.max(1e-3)).round();
        let honest = probes.summary();
        let v = json!({"phase": "replay", "capacity": capacity, "tags_sent": sent,
            "edge_results": results, "mix_replay_drops": replayed, "mix_recorded": nodest,
            "fresh_refused_as_replay_pct": pct, "per_s": per_s,
            "honest": honest, "honest_failed": probes.failed,
            "generator_cpu_pct": me.round(), "mix_cpu_pct": mix_cpu.round()});
        out.record(v);
        out.row(&[
            format!("replay filter (mix, capacity {capacity} tags per epoch)"),
            format!(
                "{sent} fresh tags ({multiple}× the capacity; this step at {per_s} packets/s): {pct:.2} % of the step's fresh packets refused by the mix as replays; then {honest}"
            ),
            String::new(),
            format!("{me:.0} % / {mix_cpu:.0} % (mix)"),
        ]);
    }
    reconfigure(devnet, dir, "mix1", "", "", false)?;
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut json_path: Option<PathBuf> = None;
    let mut phases = "connections,challenges,creation,mixqueue,replay".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--json" => json_path = args.next().map(PathBuf::from),
            "--phases" => phases = args.next().unwrap_or_default(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let mut out = Out {
        json: json_path.map(std::fs::File::create).transpose()?,
        rows: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let devnet_dir = dir.join("devnet");
    let mut devnet = rt.block_on(Devnet::up(DevnetOptions {
        dir: devnet_dir.clone(),
        relays: 2,
        mailboxes: 1,
        timers: 1,
        bin_dir: default_bin_dir(),
        relaxed_limits: false,
    }))?;
    eprintln!("dos-budget: devnet up in {}", devnet_dir.display());
    let result = rt.block_on(async {
        let mut alice: Option<Client> = None;
        for phase in phases.split(',') {
            let started = Instant::now();
            match phase {
                "connections" => phase_connections(&devnet, &mut out).await?,
                "challenges" => phase_challenges(&mut devnet, &devnet_dir, &mut out).await?,
                "creation" => phase_creation(&mut devnet, &devnet_dir, &mut out).await?,
                "mixqueue" | "replay" => {
                    if alice.is_none() {
                        alice = Some(honest_pair(&devnet, &dir.join("users")).await?);
                    }
                    let a = alice.as_mut().ok_or("no client")?;
                    if phase == "mixqueue" {
                        phase_mixqueue(&mut devnet, &devnet_dir, a, &mut out).await?;
                    } else {
                        phase_replay(&mut devnet, &devnet_dir, a, &mut out).await?;
                    }
                }
                other => return Err::<(), Error>(format!("unknown phase {other}").into()),
            }
            eprintln!(
                "dos-budget: phase {phase} took {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    });
    devnet.stop();
    println!(
        "| resource | attack and outcome | recovery | generator CPU / target CPU (% of a core) |"
    );
    println!("|---|---|---|---|");
    for r in &out.rows {
        println!("{r}");
    }
    result
}
