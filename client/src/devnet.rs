//! A local Whispr network of real node processes on loopback (`whispr devnet up`): three
//! directory authorities (`whispr-authority`), relays (the first is the edge, the others
//! layer-1 mixes), mailbox nodes and timer nodes, each with its own data directory, config and
//! log under the devnet directory, joined over libp2p. The nodes pin the authorities (the
//! network file, `[mesh] network_file`) and route by their consensus only; every node is on
//! the authorities' allow list.
//!
//! Files in the devnet directory: `devnet.json` (the supervisor's pid and every node's name,
//! kind, pid, HTTP port and log), `network` (the network file clients pin with
//! `whispr init --network`), `allowed` (the authorities' allow list), `directory-url` (the
//! edge's consensus mirror, written once the consensus lists every node), `NAME.toml`, `NAME/`
//! (data) and `logs/NAME.log`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use whispr_protocol::UnixTime;
use whispr_protocol::consensus::{Authority, Mixing, Network};

use crate::client::now_ms;
use crate::error::{ClientError, Result};
use crate::net::Net;

/// What to start.
#[derive(Clone, Debug)]
pub struct DevnetOptions {
    /// The devnet directory.
    pub dir: PathBuf,
    /// Relays (at least 2: one edge, then mixes).
    pub relays: usize,
    /// Mailbox nodes.
    pub mailboxes: usize,
    /// Timer nodes.
    pub timers: usize,
    /// Where the node binaries are.
    pub bin_dir: PathBuf,
    /// Raise the per-connection and per-mailbox rate limits far above the policy's (for load
    /// benchmarks only; the default keeps the production limits).
    pub relaxed_limits: bool,
}

/// One node of a devnet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    /// `edge`, `mix1`, …, `mailbox1`, …, `timer1`, …
    pub name: String,
    /// `relay`, `mailbox` or `timer`.
    pub kind: String,
    /// Its process id.
    pub pid: u32,
    /// HTTP port (API, or admin API for timers).
    pub http_port: u16,
    /// Its log file.
    pub log: PathBuf,
}

/// `devnet.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevnetRecord {
    /// The `whispr devnet up` process.
    pub supervisor_pid: u32,
    /// The directory URL clients use.
    pub directory_url: String,
    /// The nodes.
    pub nodes: Vec<NodeRecord>,
}

/// A running devnet; its nodes are stopped (SIGTERM, then SIGKILL after 10 s) on drop.
#[derive(Debug)]
pub struct Devnet {
    dir: PathBuf,
    bin_dir: PathBuf,
    children: Vec<(String, Child)>,
    record: DevnetRecord,
}

/// The directory holding the node binaries: `WHISPR_BIN_DIR`, else the directory of the
/// running executable (cargo puts `whispr`, `whispr-relay`, `whispr-mailbox` and
/// `whispr-timer` side by side), else its parent (for test and example binaries in `deps/`
/// or `examples/`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WHISPR_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for _ in 0..2 {
        if dir.join("whispr-relay").exists() {
            return dir;
        }
        if let Some(p) = dir.parent() {
            dir = p.to_path_buf();
        }
    }
    dir
}

/// Directory authorities a devnet runs.
pub const AUTHORITIES: usize = 3;
/// The devnet's consensus period, seconds: short, so that a node is in the consensus a few
/// seconds after it starts, and a new consensus follows an authority's loss quickly.
pub const EPOCH_SECS: u64 = 5;
/// Each consensus stays valid this many periods (one minute).
const LIFETIME_EPOCHS: u32 = 12;

/// Times a node that exits at start (a port taken between picking and binding it) is started.
const START_ATTEMPTS: u32 = 3;

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(ClientError::io("finding a free port"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(ClientError::io("writing a devnet file"))
}

struct Plan {
    name: String,
    kind: &'static str,
    binary: PathBuf,
    config: PathBuf,
    data: PathBuf,
    http_port: u16,
}

fn mesh_section(port: u16, bootstrap: Option<&str>, network: &Path, extra: &str) -> String {
    let bootstrap = bootstrap
        .map(|b| format!("bootstrap = [\"{b}\"]\n"))
        .unwrap_or_default();
    format!(
        "[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\n{bootstrap}descriptor_publish_ms = 1000\nnetwork_file = \"{}\"\nconsensus_poll_ms = 1000\n{extra}",
        network.display()
    )
}

fn plan_node(
    opts: &DevnetOptions,
    name: &str,
    kind: &'static str,
    bootstrap: Option<&str>,
) -> Result<Plan> {
    let dir = &opts.dir;
    let data = dir.join(name);
    let http_port = free_port()?;
    let mesh_port = free_port()?;
    let config = dir.join(format!("{name}.toml"));
    let network = dir.join("network");
    let network = network.as_path();
    let api = format!("http://127.0.0.1:{http_port}");
    let relaxed = opts.relaxed_limits;
    let (binary, text) = match kind {
        "relay" => {
            let roles = if name == "edge" {
                "roles = [\"edge\"]\n".to_string()
            } else {
                "roles = [\"mix\"]\nmix_layer = 1\n".to_string()
            };
            let limits = if relaxed {
                "\n[mesh.router.client_rate]\nper_minute = 6000000\nburst = 100000\n"
            } else {
                ""
            };
            (
                "whispr-relay",
                format!(
                    "data_dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\nmetrics_interval_ms = 0\n\n{}{limits}",
                    data.display(),
                    mesh_section(
                        mesh_port,
                        bootstrap,
                        network,
                        &format!("{roles}api_url = \"{api}\"\n")
                    )
                ),
            )
        }
        "mailbox" => {
            let (ops, deposits) = if relaxed {
                (
                    "ops_per_min_per_connection = 6000000\nmailbox_creations_per_hour_per_ip = 6000000\n",
                    "\n[limits]\ndeposits_per_min = 6000000\n",
                )
            } else {
                ("", "")
            };
            (
                "whispr-mailbox",
                format!(
                    "data_dir = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{http_port}\"\nmetrics_interval_ms = 0\n{ops}{deposits}\n{}",
                    data.display(),
                    mesh_section(
                        mesh_port,
                        bootstrap,
                        network,
                        &format!("api_url = \"{api}\"\n")
                    )
                ),
            )
        }
        _ => {
            let mut token = [0u8; 24];
            rand::Rng::fill_bytes(&mut rand::rng(), &mut token);
            (
                "whispr-timer",
                format!(
                    "data_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{http_port}\"\ntoken = \"{}\"\n\n[worker]\nidle_poll_ms = 100\n\n{}",
                    data.display(),
                    hex::encode(token),
                    mesh_section(mesh_port, bootstrap, network, "")
                ),
            )
        }
    };
    write(&config, &text)?;
    Ok(Plan {
        name: name.to_string(),
        kind,
        binary: opts.bin_dir.join(binary),
        config,
        data,
        http_port,
    })
}

/// An authority's configuration (`descriptor_sources` empty until the edge is up).
fn authority_plan(
    opts: &DevnetOptions,
    i: usize,
    http_port: u16,
    sources: &[String],
) -> Result<Plan> {
    let dir = &opts.dir;
    let name = format!("authority{i}");
    let data = dir.join(&name);
    let config = dir.join(format!("{name}.toml"));
    let sources: Vec<String> = sources.iter().map(|s| format!("\"{s}\"")).collect();
    write(
        &config,
        &format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:{http_port}\"\nnetwork_file = \"{}\"\nallow_file = \"{}\"\ndescriptor_sources = [{}]\nepoch_secs = {EPOCH_SECS}\nlifetime_epochs = {LIFETIME_EPOCHS}\n",
            data.display(),
            dir.join("network").display(),
            dir.join("allowed").display(),
            sources.join(", ")
        ),
    )?;
    Ok(Plan {
        name,
        kind: "authority",
        binary: opts.bin_dir.join("whispr-authority"),
        config,
        data,
        http_port,
    })
}

/// The authority's public key (hex), created on first use (`whispr-authority … key`).
fn authority_key(plan: &Plan) -> Result<[u8; 32]> {
    if !plan.binary.exists() {
        return Err(ClientError::InvalidArgument(format!(
            "{} not found: build the workspace binaries (cargo build --workspace --bins) or set WHISPR_BIN_DIR",
            plan.binary.display()
        )));
    }
    let output = Command::new(&plan.binary)
        .arg("--config")
        .arg(&plan.config)
        .arg("key")
        .stdin(Stdio::null())
        .output()
        .map_err(ClientError::io("creating an authority key"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    hex::decode(text.trim())
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "{} printed no key ({})",
                plan.name, output.status
            ))
        })
}

/// A node's id from its `node-info.json`, once written.
fn node_id(plan: &Plan) -> Option<String> {
    let text = std::fs::read_to_string(plan.data.join("node-info.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("node_id")?.as_str().map(str::to_string)
}

/// Waits for an authority's `node-info.json` (written once it listens).
fn wait_authority(plan: &Plan, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ClientError::InvalidArgument(format!(
                "{} exited at start ({status}); see its log",
                plan.name
            )));
        }
        if node_id(plan).is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(ClientError::Unreachable {
        node: "devnet authority",
        reason: format!("{} wrote no node-info.json within 60 s", plan.name),
    })
}

fn spawn(dir: &Path, plan: &Plan) -> Result<Child> {
    if !plan.binary.exists() {
        return Err(ClientError::InvalidArgument(format!(
            "{} not found: build the workspace binaries (cargo build --workspace --bins) or set WHISPR_BIN_DIR",
            plan.binary.display()
        )));
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(ClientError::io("creating the log directory"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{}.log", plan.name)))
        .map_err(ClientError::io("opening a node log"))?;
    let _ = std::fs::remove_file(plan.data.join("node-info.json"));
    Command::new(&plan.binary)
        .arg("--config")
        .arg(&plan.config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(ClientError::io("starting a node"))
}

/// Waits for `node-info.json` and returns the node's `/ip4/…/tcp/…/p2p/…` address.
fn wait_multiaddr(plan: &Plan, child: &mut Child) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = plan.data.join("node-info.json");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ClientError::InvalidArgument(format!(
                "{} exited at start ({status}); see its log",
                plan.name
            )));
        }
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
            && let (Some(addr), Some(peer)) = (
                v.get("listen")
                    .unwrap_or(&Value::Null)
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|a| a.as_str()),
                v.get("peer_id").unwrap_or(&Value::Null).as_str(),
            )
        {
            return Ok(if addr.contains("/p2p/") {
                addr.to_string()
            } else {
                format!("{addr}/p2p/{peer}")
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(ClientError::Unreachable {
        node: "devnet node",
        reason: format!("{} wrote no node-info.json within 60 s", plan.name),
    })
}

impl Devnet {
    /// Starts the nodes and waits until every relay and mailbox node sees all of them.
    pub async fn up(opts: DevnetOptions) -> Result<Devnet> {
        if opts.relays < 2 || opts.mailboxes < 1 || opts.timers < 1 {
            return Err(ClientError::InvalidArgument(
                "a devnet needs at least 2 relays (an edge and a mix), 1 mailbox node and 1 timer"
                    .to_string(),
            ));
        }
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(ClientError::io("creating the devnet directory"))?;
        if let Ok(text) = std::fs::read_to_string(dir.join("devnet.json"))
            && let Ok(r) = serde_json::from_str::<DevnetRecord>(&text)
            && alive(r.supervisor_pid)
        {
            return Err(ClientError::InvalidArgument(format!(
                "a devnet is already running in {} (pid {})",
                dir.display(),
                r.supervisor_pid
            )));
        }
        let _ = std::fs::remove_file(dir.join("directory-url"));
        // The authorities' keys and ports make the network file every node and client pins;
        // they start once the edge is up (their descriptor source).
        let mut authorities = Vec::new();
        let mut pinned = Vec::new();
        for i in 1..=AUTHORITIES {
            let plan = authority_plan(&opts, i, free_port()?, &[])?;
            pinned.push(Authority {
                key: authority_key(&plan)?,
                url: format!("http://127.0.0.1:{}", plan.http_port),
            });
            authorities.push(plan);
        }
        // Every mailbox on as many mailbox nodes as the devnet has, up to 3.
        // A devnet is for trying things out and for tests: fast mixing (50 ms per hop) and no
        // cover, stated in its network file for the clients that pin it (a real network's
        // clients default to 200 ms and 2 cover packets per minute).
        let network = Network::new(pinned, None)?
            .with_replicas(opts.mailboxes.min(3))?
            .with_mixing(Mixing::new(50, 0.0)?);
        write(&dir.join("network"), &network.to_text())?;
        let mut allowed: Vec<String> = Vec::new();
        write(&dir.join("allowed"), "")?;
        let mut devnet = Devnet {
            dir: dir.clone(),
            bin_dir: opts.bin_dir.clone(),
            children: Vec::new(),
            record: DevnetRecord {
                supervisor_pid: std::process::id(),
                directory_url: String::new(),
                nodes: Vec::new(),
            },
        };
        // Ports are picked free and handed to the node, which binds them a moment later: on a
        // busy machine another socket can take one in between, and the node exits at start.
        // Such a node is started again on other ports, a few times.
        let mut attempt = 1;
        let (edge, boot) = loop {
            let edge = plan_node(&opts, "edge", "relay", None)?;
            let mut child = spawn(&dir, &edge)?;
            match wait_multiaddr(&edge, &mut child) {
                Ok(boot) => {
                    devnet.add(&edge, child);
                    break (edge, boot);
                }
                Err(ClientError::InvalidArgument(_)) if attempt < START_ATTEMPTS => {
                    let _ = child.wait();
                    attempt += 1;
                }
                Err(e) => {
                    devnet.add(&edge, child);
                    return Err(e);
                }
            }
        };
        if let Some(id) = node_id(&edge) {
            allowed.push(id);
            write(&dir.join("allowed"), &format!("{}\n", allowed.join("\n")))?;
        }
        let sources = [format!("http://127.0.0.1:{}/v1/directory", edge.http_port)];
        for (i, planned) in authorities.iter().enumerate() {
            // Same port (it is pinned in the network file), now with the edge as source.
            let plan = authority_plan(&opts, i + 1, planned.http_port, &sources)?;
            let mut child = spawn(&dir, &plan)?;
            let started = wait_authority(&plan, &mut child);
            devnet.add(&plan, child);
            started?;
        }
        let mut plans = Vec::new();
        for i in 1..opts.relays {
            plans.push(plan_node(&opts, &format!("mix{i}"), "relay", Some(&boot))?);
        }
        for i in 1..=opts.mailboxes {
            plans.push(plan_node(
                &opts,
                &format!("mailbox{i}"),
                "mailbox",
                Some(&boot),
            )?);
        }
        for i in 1..=opts.timers {
            plans.push(plan_node(
                &opts,
                &format!("timer{i}"),
                "timer",
                Some(&boot),
            )?);
        }
        for plan in &plans {
            let child = spawn(&dir, plan)?;
            devnet.add(plan, child);
        }
        let total = 1 + plans.len();
        devnet.record.directory_url = format!("http://127.0.0.1:{}/v1/consensus", edge.http_port);
        devnet.write_record()?;
        let net = Net::new()?;
        let mut attempts = vec![1u32; plans.len()];
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // Every node on the allow list once it has an id.
            let before = allowed.len();
            for p in &plans {
                if let Some(id) = node_id(p)
                    && !allowed.contains(&id)
                {
                    allowed.push(id);
                }
            }
            if allowed.len() != before {
                write(&dir.join("allowed"), &format!("{}\n", allowed.join("\n")))?;
            }
            // Every node hears all the others, and serves a consensus that lists them all.
            let watch: Vec<u16> = std::iter::once(&edge)
                .chain(plans.iter().filter(|p| p.kind != "timer"))
                .map(|p| p.http_port)
                .collect();
            let mut all = true;
            for port in &watch {
                let heard = net
                    .unpinned_directory(
                        &format!("http://127.0.0.1:{port}/v1/directory"),
                        UnixTime(now_ms()),
                    )
                    .await;
                let consensus = net
                    .directory(
                        &[format!("http://127.0.0.1:{port}/v1/consensus")],
                        &network,
                        UnixTime(now_ms()),
                        None,
                    )
                    .await;
                match (heard, consensus) {
                    (Ok(d), Ok(c)) if d.len() == total && c.len() == total => {}
                    _ => all = false,
                }
            }
            if all {
                break;
            }
            if Instant::now() > deadline {
                return Err(ClientError::Unreachable {
                    node: "devnet",
                    reason: "the nodes did not see each other, or the consensus did not list them all, within 120 s; see logs/".to_string(),
                });
            }
            let mut restart = Vec::new();
            for (i, (name, c)) in devnet.children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    // The edge and the authorities are not restarted; the others follow `plans`.
                    match plans.iter().position(|p| p.name == *name) {
                        Some(j) if attempts.get(j).is_some_and(|a| *a < START_ATTEMPTS) => {
                            restart.push((i, j));
                        }
                        _ => {
                            return Err(ClientError::InvalidArgument(format!(
                                "{name} exited ({status}); see its log"
                            )));
                        }
                    }
                }
            }
            for (i, j) in restart {
                let (Some(old), Some(n)) = (plans.get(j), attempts.get_mut(j)) else {
                    continue;
                };
                *n += 1;
                let plan = plan_node(&opts, &old.name, old.kind, Some(&boot))?;
                let child = spawn(&dir, &plan)?;
                if let (Some(slot), Some(record)) =
                    (devnet.children.get_mut(i), devnet.record.nodes.get_mut(i))
                {
                    record.pid = child.id();
                    record.http_port = plan.http_port;
                    slot.1 = child;
                }
                if let Some(p) = plans.get_mut(j) {
                    *p = plan;
                }
                devnet.write_record()?;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        write(
            &dir.join("directory-url"),
            &format!("{}\n", devnet.record.directory_url),
        )?;
        Ok(devnet)
    }

    /// Kills node `name` with SIGKILL (a crash: nothing flushed, nothing closed) and reaps it.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ClientError::InvalidArgument(format!("no node named {name}")))?;
        let _ = child.kill();
        child
            .wait()
            .map_err(ClientError::io("reaping a killed node"))?;
        Ok(())
    }

    /// Starts node `name` again (after [`Devnet::kill`]) with its configuration and ports.
    /// With `wipe`, its stored data is deleted first, as on a lost disk: everything in its
    /// data directory but its keys (`keys/`, `master.key`), which an operator restores from
    /// where it keeps secrets, not from the data disk (a node with new keys is a new node).
    /// Returns once the node has written its `node-info.json` (it listens).
    pub fn restart(&mut self, name: &str, wipe: bool) -> Result<()> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| ClientError::InvalidArgument(format!("no node named {name}")))?;
        let (kind, http_port) = self
            .record
            .nodes
            .get(i)
            .map(|n| (n.kind.clone(), n.http_port))
            .ok_or_else(|| ClientError::CorruptState("devnet record".to_string()))?;
        let (kind, binary): (&'static str, &str) = match kind.as_str() {
            "relay" => ("relay", "whispr-relay"),
            "mailbox" => ("mailbox", "whispr-mailbox"),
            "timer" => ("timer", "whispr-timer"),
            other => {
                return Err(ClientError::InvalidArgument(format!(
                    "cannot restart a {other} node"
                )));
            }
        };
        let plan = Plan {
            name: name.to_string(),
            kind,
            binary: self.bin_dir.join(binary),
            config: self.dir.join(format!("{name}.toml")),
            data: self.dir.join(name),
            http_port,
        };
        if let Some((_, old)) = self.children.get_mut(i)
            && old.try_wait().ok().flatten().is_none()
        {
            return Err(ClientError::InvalidArgument(format!(
                "{name} is still running"
            )));
        }
        if wipe {
            let entries = std::fs::read_dir(&plan.data)
                .map_err(ClientError::io("reading a node's data directory"))?;
            for entry in entries.flatten() {
                let file = entry.file_name();
                if file == "keys" || file == "master.key" {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(ClientError::io("wiping a node's data"))?;
            }
        }
        let mut child = spawn(&self.dir, &plan)?;
        let started = wait_multiaddr(&plan, &mut child).map(|_| ());
        if let (Some(slot), Some(record)) = (self.children.get_mut(i), self.record.nodes.get_mut(i))
        {
            record.pid = child.id();
            slot.1 = child;
        }
        self.write_record()?;
        started
    }

    fn add(&mut self, plan: &Plan, child: Child) {
        self.record.nodes.push(NodeRecord {
            name: plan.name.clone(),
            kind: plan.kind.to_string(),
            pid: child.id(),
            http_port: plan.http_port,
            log: self.dir.join("logs").join(format!("{}.log", plan.name)),
        });
        self.children.push((plan.name.clone(), child));
    }

    fn write_record(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.record)
            .map_err(|e| ClientError::CorruptState(e.to_string()))?;
        write(&self.dir.join("devnet.json"), &text)
    }

    /// The network file clients pin (`whispr init --network`).
    pub fn network_file(&self) -> PathBuf {
        self.dir.join("network")
    }

    /// The directory URL (the edge's mirror of the consensus).
    pub fn directory_url(&self) -> &str {
        &self.record.directory_url
    }

    /// The record (nodes, pids, ports).
    pub fn record(&self) -> &DevnetRecord {
        &self.record
    }

    /// Nodes that exited on their own (name and status).
    pub fn exited(&mut self) -> Vec<String> {
        self.children
            .iter_mut()
            .filter_map(|(n, c)| match c.try_wait() {
                Ok(Some(s)) => Some(format!("{n} ({s})")),
                _ => None,
            })
            .collect()
    }

    /// Stops every node: SIGTERM, then SIGKILL after 10 s; removes `devnet.json` and
    /// `directory-url`.
    pub fn stop(&mut self) {
        for (_, c) in &self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, c) in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
        let _ = std::fs::remove_file(self.dir.join("devnet.json"));
        let _ = std::fs::remove_file(self.dir.join("directory-url"));
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok())
}

/// Reads `devnet.json` in `dir`.
pub fn record(dir: &Path) -> Result<DevnetRecord> {
    let text = std::fs::read_to_string(dir.join("devnet.json")).map_err(|_| {
        ClientError::InvalidArgument(format!("no running devnet in {}", dir.display()))
    })?;
    serde_json::from_str(&text).map_err(|e| ClientError::CorruptState(e.to_string()))
}

/// Asks the devnet supervisor in `dir` to stop its nodes, and waits until it has.
pub fn down(dir: &Path) -> Result<()> {
    let r = record(dir)?;
    let pid = i32::try_from(r.supervisor_pid)
        .map_err(|_| ClientError::CorruptState("supervisor pid".to_string()))?;
    if kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
        // The supervisor is gone (killed?): stop its nodes directly.
        for n in &r.nodes {
            if let Ok(p) = i32::try_from(n.pid) {
                let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
            }
        }
        let _ = std::fs::remove_file(dir.join("devnet.json"));
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(r.supervisor_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Kills node `name` of the devnet in `dir` with SIGKILL (a crash, for demos and tests).
pub fn kill_node(dir: &Path, name: &str) -> Result<()> {
    let r = record(dir)?;
    let node = r
        .nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| ClientError::InvalidArgument(format!("no node named {name}")))?;
    let pid =
        i32::try_from(node.pid).map_err(|_| ClientError::CorruptState("node pid".to_string()))?;
    kill(Pid::from_raw(pid), Signal::SIGKILL)
        .map_err(|e| ClientError::InvalidArgument(format!("cannot kill {name}: {e}")))
}
