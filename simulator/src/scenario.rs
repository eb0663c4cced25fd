//! Scenario files (TOML): topology, links, mixing, workload, retransmission, churn and the
//! adversary. Every field has a default, so a scenario names only what it changes; unknown
//! fields are refused. `--param a.b=v` overrides any field before the scenario is checked.
//!
//! See `docs/simulator.md` for every field with its meaning.

use serde::{Deserialize, Serialize};

use crate::codec::Mode;
use crate::links::{Latency, Link, LinkError};

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped field.
    #[error("scenario: {0}")]
    Parse(String),
    /// A `--param` that does not name a field or has no `=`.
    #[error("parameter {0:?}: {1}")]
    Param(String, &'static str),
    /// A value out of range.
    #[error("scenario: {0}")]
    Invalid(String),
    /// A link description out of range.
    #[error("scenario links: {0}")]
    Link(#[from] LinkError),
}

/// A whole scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Name (shown in reports).
    pub name: String,
    /// `real` or `fast` crypto.
    pub mode: Mode,
    /// Seconds during which the workload sends.
    pub duration_s: f64,
    /// Seconds after that with no new messages, for what is in flight to arrive.
    pub drain_s: f64,
    /// Nodes and clients.
    pub topology: Topology,
    /// Links.
    pub links: Links,
    /// Per-hop mixing delays.
    pub mixing: Mixing,
    /// What clients do.
    pub workload: Workload,
    /// Client retransmission of unacknowledged fragments.
    pub retransmit: Retransmit,
    /// Node crashes, restarts, joins and leaves.
    pub churn: Churn,
    /// Who watches.
    pub adversary: Adversary,
    /// Node limits (bounded queues and tables).
    pub limits: Limits,
    /// Output options.
    pub output: Output,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "unnamed".into(),
            mode: Mode::Fast,
            duration_s: 60.0,
            drain_s: 30.0,
            topology: Topology::default(),
            links: Links::default(),
            mixing: Mixing::default(),
            workload: Workload::default(),
            retransmit: Retransmit::default(),
            churn: Churn::default(),
            adversary: Adversary::default(),
            limits: Limits::default(),
            output: Output::default(),
        }
    }
}

/// Stratified layers: edges, mix layers, mailbox and timer nodes; and the clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// Edge relays (clients' entry).
    pub edges: usize,
    /// Mix layers (1 to 3).
    pub mix_layers: u32,
    /// Mixes in each layer.
    pub mixes_per_layer: usize,
    /// Mailbox nodes.
    pub mailboxes: usize,
    /// Timer nodes.
    pub timers: usize,
    /// Clients (users); one mailbox per contact relationship and side.
    pub clients: usize,
    /// Directory authorities (simulated: they vote and sign once per directory change). The
    /// directory is their consensus: a node is in it only if a majority admits it. 0: no
    /// authorities, every self-signed descriptor offered is in the directory (the attack of
    /// security review finding 1).
    pub authorities: usize,
    /// Replicas of each mailbox (R, `docs/replication.md`): clients create every mailbox on
    /// this many mailbox nodes (at most the mailbox nodes there are), deposits are pushed
    /// between them and the owner reads any live one. 1: a single node per mailbox, no
    /// replication.
    pub replicas: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            edges: 2,
            mix_layers: 2,
            mixes_per_layer: 3,
            mailboxes: 3,
            timers: 1,
            clients: 20,
            authorities: 3,
            replicas: 3,
        }
    }
}

/// A latency distribution as written in a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LatencySpec {
    /// Always `ms`.
    Constant {
        /// ms.
        ms: f64,
    },
    /// Uniform in `[min_ms, max_ms]`.
    Uniform {
        /// ms.
        min_ms: f64,
        /// ms.
        max_ms: f64,
    },
    /// Log-normal with median `median_ms` and log-std `sigma`.
    LogNormal {
        /// ms.
        median_ms: f64,
        /// Standard deviation of ln(latency).
        sigma: f64,
    },
    /// A square CSV matrix of ms (path relative to the scenario file), by node index.
    Matrix {
        /// CSV path.
        path: String,
    },
}

impl LatencySpec {
    /// The distribution; `base` is the scenario file's directory, for matrices.
    pub fn to_latency(&self, base: &std::path::Path) -> Result<Latency, ScenarioError> {
        let l = match self {
            LatencySpec::Constant { ms } => Latency::Constant(*ms),
            LatencySpec::Uniform { min_ms, max_ms } => Latency::Uniform {
                min: *min_ms,
                max: *max_ms,
            },
            LatencySpec::LogNormal { median_ms, sigma } => Latency::LogNormal {
                median: *median_ms,
                sigma: *sigma,
            },
            LatencySpec::Matrix { path } => {
                let full = base.join(path);
                let text =
                    std::fs::read_to_string(&full).map_err(|source| ScenarioError::Read {
                        path: full.display().to_string(),
                        source,
                    })?;
                crate::links::parse_matrix(&text)?
            }
        };
        l.validate()?;
        Ok(l)
    }

    /// The mean one-way latency in ms (what the observer assumes; the matrix's mean entry).
    pub fn mean_ms(&self, latency: &Latency) -> f64 {
        match latency {
            Latency::Constant(ms) => *ms,
            Latency::Uniform { min, max } => (min + max) / 2.0,
            Latency::LogNormal { median, sigma } => median * (sigma * sigma / 2.0).exp(),
            Latency::Matrix(m) => {
                let n: usize = m.iter().map(Vec::len).sum();
                let s: f64 = m.iter().flatten().sum();
                if n == 0 { 0.0 } else { s / n as f64 }
            }
        }
    }
}

/// Links between nodes and between clients and nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Links {
    /// One-way latency between two nodes.
    pub latency: LatencySpec,
    /// One-way latency between a client and a node (edge, or its mailbox node over HTTP).
    pub client_latency: LatencySpec,
    /// Bytes per second of every link (0: unlimited; serialisation delay only).
    pub bandwidth_bps: u64,
    /// Probability that a node-to-node packet is lost.
    pub loss: f64,
    /// Probability that a client-to-edge packet is lost.
    pub client_loss: f64,
    /// Partitions over time windows.
    pub partitions: Vec<PartitionSpec>,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            latency: LatencySpec::Constant { ms: 10.0 },
            client_latency: LatencySpec::Constant { ms: 20.0 },
            bandwidth_bps: 0,
            loss: 0.0,
            client_loss: 0.0,
            partitions: Vec::new(),
        }
    }
}

/// Nodes in different groups cannot reach each other during `[start_s, end_s)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// Start, s.
    pub start_s: f64,
    /// End, s.
    pub end_s: f64,
    /// Groups of node names; a name ending in `*` is a prefix (`"mix-1-*"`).
    pub groups: Vec<Vec<String>>,
}

/// Mixing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mixing {
    /// Mean of the exponential delay each hop holds a packet (ms; 0 = no mixing).
    pub delay_ms_mean: f64,
}

impl Default for Mixing {
    fn default() -> Self {
        Mixing {
            delay_ms_mean: 50.0,
        }
    }
}

/// A size distribution, bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SizeSpec {
    /// Always `bytes`.
    Constant {
        /// Bytes.
        bytes: u64,
    },
    /// Uniform in `[min, max]`.
    Uniform {
        /// Bytes.
        min: u64,
        /// Bytes.
        max: u64,
    },
    /// Log-normal (median, log-std), capped at `max`.
    LogNormal {
        /// Bytes.
        median: f64,
        /// Log std. dev.
        sigma: f64,
        /// Cap, bytes.
        max: u64,
    },
}

/// Who talks to whom.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GraphSpec {
    /// Each client has `contacts` contacts drawn uniformly.
    Uniform {
        /// Contacts per client.
        contacts: usize,
    },
    /// Power-law: a client's contact count is drawn from P(k) ∝ k^-exponent on
    /// `[1, max_contacts]`, and contacts are chosen with weights ∝ rank^-popularity over a
    /// random ranking of clients (a few are popular).
    PowerLaw {
        /// Degree exponent (> 1).
        exponent: f64,
        /// Largest contact count.
        max_contacts: usize,
        /// Popularity (Zipf) exponent, ≥ 0.
        popularity: f64,
    },
}

/// When recipients are online.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineSpec {
    /// Mean online period, s (exponential). 0 = always online.
    pub on_mean_s: f64,
    /// Mean offline period, s (exponential).
    pub off_mean_s: f64,
}

impl Default for OnlineSpec {
    fn default() -> Self {
        OnlineSpec {
            on_mean_s: 0.0,
            off_mean_s: 0.0,
        }
    }
}

/// The workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Messages per client per minute (Poisson).
    pub rate_per_client_per_min: f64,
    /// Fraction of clients that send (the others only receive and send cover).
    pub senders_fraction: f64,
    /// The social graph.
    pub graph: GraphSpec,
    /// Message sizes.
    pub message_size: SizeSpec,
    /// Fraction of messages sent as scheduled sends through a timer node.
    pub scheduled_fraction: f64,
    /// How far ahead scheduled sends are released, s.
    pub schedule_ahead_s: f64,
    /// Messages expire this long after they were sent (s, 0 = mailbox retention only).
    pub expire_after_s: f64,
    /// Cover packets per client per minute (Poisson, loops into the client's own mailbox).
    pub cover_per_min: f64,
    /// Online/offline schedule of recipients.
    pub online: OnlineSpec,
    /// How long a recipient that is online takes to fetch after a message is stored (ms;
    /// the stream push or the poll).
    pub fetch_delay_ms: f64,
    /// Receipts the clients send (`none`, `delivery`, `read`): each is a message of its own
    /// back to the sender. `none` by default, so that a scenario's load is its workload.
    pub receipts: whispr_client::Receipts,
    /// Devices per user (1 to 6, `whispr_client::state::DEVICES_MAX`): after the contacts
    /// are set up, each user links this many minus one devices with the real core's linking
    /// (`docs/clients.md`, *Several devices*); every device reads the account's mailboxes
    /// with its own login and cursor. Only users' primaries send, toggle and send cover.
    pub devices_per_user: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            rate_per_client_per_min: 2.0,
            senders_fraction: 1.0,
            graph: GraphSpec::Uniform { contacts: 3 },
            message_size: SizeSpec::Constant { bytes: 500 },
            scheduled_fraction: 0.0,
            schedule_ahead_s: 30.0,
            expire_after_s: 0.0,
            cover_per_min: 0.0,
            online: OnlineSpec::default(),
            fetch_delay_ms: 0.0,
            receipts: whispr_client::Receipts::None,
            devices_per_user: 1,
        }
    }
}

/// Client retransmission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retransmit {
    /// Retransmit fragments with no ack (on a fresh route and SURB, same dedup id).
    pub enabled: bool,
    /// After this long without an ack, ms.
    pub after_ms: u64,
    /// Attempts in all before the message is failed.
    pub attempts_max: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Retransmit {
            enabled: true,
            after_ms: 10_000,
            attempts_max: 5,
        }
    }
}

/// What happens to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChurnAction {
    /// Stops at once, losing what it held in memory (queued packets, partial holds).
    Crash,
    /// Comes back (mailbox and timer stores survive, as RocksDB would).
    Restart,
    /// Stops at once and loses its disk: when it restarts, its mailbox or timer store is
    /// empty (its keys survive: it is the same node, repaired by its peers).
    LoseDisk,
    /// Leaves the directory (clients stop choosing it) and stops.
    Leave,
    /// Joins the directory (a node listed with `start_down = true` in `churn.late_nodes`).
    Join,
}

/// One churn event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnEvent {
    /// When, s.
    pub at_s: f64,
    /// Node name (`edge-0`, `mix-2-5`, `mailbox-3`, `timer-0`).
    pub node: String,
    /// What.
    pub action: ChurnAction,
}

/// Churn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Churn {
    /// Scripted events.
    pub events: Vec<ChurnEvent>,
    /// Random crashes of relays (edges and mixes): per node per hour (Poisson).
    pub relay_crashes_per_hour: f64,
    /// Mean downtime after a random crash, s (exponential); then it restarts.
    pub down_mean_s: f64,
    /// Random crashes of mailbox nodes: per node per hour (Poisson); down for `down_mean_s`
    /// on average, like relays.
    pub mailbox_crashes_per_hour: f64,
    /// Fraction of the random mailbox crashes that also lose the node's disk
    /// ([`ChurnAction::LoseDisk`]).
    pub disk_loss_fraction: f64,
    /// Mixes per layer that are not in the directory at the start (named after the others)
    /// and join at `join_at_s`.
    pub late_mixes_per_layer: usize,
    /// When the late mixes join, s.
    pub join_at_s: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            events: Vec::new(),
            relay_crashes_per_hour: 0.0,
            down_mean_s: 30.0,
            mailbox_crashes_per_hour: 0.0,
            disk_loss_fraction: 0.0,
            late_mixes_per_layer: 0,
            join_at_s: 0.0,
        }
    }
}

/// The adversary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adversary {
    /// Fraction of relays (edges and mixes) that are compromised and share what they see.
    pub compromised_relays: f64,
    /// Fraction of mailbox nodes compromised.
    pub compromised_mailboxes: f64,
    /// Fraction of timer nodes compromised.
    pub compromised_timers: f64,
    /// Messages whose sender anonymity is computed (evenly spread over the run; the cost is
    /// proportional to this times the packets in the observer's window).
    pub anonymity_sample: usize,
    /// Sybil mix descriptors offered, as a fraction of all mix descriptors offered: validly
    /// self-signed, of nodes the attacker runs (not simulated: a packet sent to one is lost
    /// to the network, and every route through one is counted in `nodes_report.sybil_routes`).
    /// A minority of the authorities (⌊(n − 1) / 2⌋) admits them; the consensus must leave them
    /// out.
    pub sybil_fraction: f64,
}

impl Default for Adversary {
    fn default() -> Self {
        Adversary {
            compromised_relays: 0.0,
            compromised_mailboxes: 0.0,
            compromised_timers: 0.0,
            anonymity_sample: 2000,
            sybil_fraction: 0.0,
        }
    }
}

/// Node limits (the same settings as the real nodes' configs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Router queue bound per node.
    pub router_queue_max: usize,
    /// Replay tags per key epoch per node.
    pub replay_tags_per_epoch_max: usize,
    /// Packets per minute per client connection at an edge (0: unlimited).
    pub client_packets_per_min: u32,
    /// Deposits per mailbox per minute at a mailbox node.
    pub deposits_per_mailbox_per_min: u64,
    /// Messages a client fetches per request.
    pub fetch_batch: usize,
    /// How long an entry replica holds a deposit's receipt waiting for its peers' acks.
    pub replica_ack_timeout_ms: u64,
    /// Anti-entropy interval of the mailbox replicas.
    pub replica_repair_interval_ms: u64,
    /// Mailboxes a replica compares with its peers per anti-entropy round (and messages
    /// pulled per mailbox per round).
    pub replica_repair_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            router_queue_max: 100_000,
            replay_tags_per_epoch_max: 2_000_000,
            client_packets_per_min: 0,
            deposits_per_mailbox_per_min: 600,
            fetch_batch: 100,
            replica_ack_timeout_ms: 10_000,
            replica_repair_interval_ms: 30_000,
            replica_repair_batch: 64,
        }
    }
}

/// Output options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Output {
    /// Write `events.log` (one line per event; large).
    pub event_log: bool,
    /// Time-series sampling interval, s.
    pub sample_every_s: f64,
}

impl Default for Output {
    fn default() -> Self {
        Output {
            event_log: false,
            sample_every_s: 1.0,
        }
    }
}

/// Applies `key=value` overrides (dotted paths, TOML values; a bare word is a string).
pub fn apply_params(doc: &mut toml::Table, params: &[String]) -> Result<(), ScenarioError> {
    for p in params {
        let (key, value) = p
            .split_once('=')
            .ok_or_else(|| ScenarioError::Param(p.clone(), "expected key=value"))?;
        let value = parse_value(value.trim());
        let mut table = &mut *doc;
        let parts: Vec<&str> = key.trim().split('.').collect();
        let (last, path) = parts
            .split_last()
            .ok_or_else(|| ScenarioError::Param(p.clone(), "empty key"))?;
        for part in path {
            let entry = table
                .entry((*part).to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| ScenarioError::Param(p.clone(), "not a table"))?;
        }
        table.insert((*last).to_string(), value);
    }
    Ok(())
}

/// A `--param` value: a TOML value (`10`, `0.5`, `true`, `"x"`, `[1, 2]`), else a string.
pub fn parse_value(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    toml::from_str::<toml::Table>(&wrapped)
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl Scenario {
    /// Parses a scenario from TOML text with `params` applied, and checks it.
    pub fn from_toml(text: &str, params: &[String]) -> Result<Scenario, ScenarioError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        apply_params(&mut doc, params)?;
        let s: Scenario = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ScenarioError::Parse(e.to_string()))?;
        s.check()?;
        Ok(s)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &std::path::Path, params: &[String]) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::from_toml(&text, params)
    }

    /// Range checks.
    pub fn check(&self) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(ScenarioError::Invalid(m.to_string()));
        let t = &self.topology;
        if t.edges == 0 || t.mixes_per_layer == 0 || t.mailboxes == 0 || t.clients < 2 {
            return bad("topology needs edges, mixes, mailbox nodes and at least 2 clients");
        }
        if !(1..=whispr_protocol::mailbox_api::REPLICAS_MAX).contains(&t.replicas) {
            return bad("topology.replicas must be 1 to 5");
        }
        if self.limits.replica_repair_interval_ms == 0 {
            return bad("limits.replica_repair_interval_ms must be > 0");
        }
        if !(1..=3).contains(&t.mix_layers) {
            return bad("topology.mix_layers must be 1 to 3");
        }
        let nodes = t.edges + t.mixes_per_layer * t.mix_layers as usize + t.mailboxes + t.timers;
        if nodes > whispr_protocol::directory::DIRECTORY_NODES_MAX {
            return bad("more nodes than a directory holds (20,000)");
        }
        let pos = |x: f64| x.is_finite() && x >= 0.0;
        if !pos(self.duration_s) || !pos(self.drain_s) {
            return bad("duration_s and drain_s must be ≥ 0");
        }
        // Descriptors carry 16 epochs of keys: the run, the furthest release and an hour of
        // margin must fit in them.
        if self.duration_s + self.drain_s + self.workload.schedule_ahead_s > 14.0 * 3600.0 {
            return bad("duration_s + drain_s + workload.schedule_ahead_s must be at most 14 h");
        }
        if !pos(self.mixing.delay_ms_mean) || self.mixing.delay_ms_mean > 60_000.0 {
            return bad("mixing.delay_ms_mean must be within [0, 60000]");
        }
        let w = &self.workload;
        for (x, name) in [
            (
                w.rate_per_client_per_min,
                "workload.rate_per_client_per_min",
            ),
            (w.cover_per_min, "workload.cover_per_min"),
            (w.schedule_ahead_s, "workload.schedule_ahead_s"),
            (w.expire_after_s, "workload.expire_after_s"),
            (w.online.on_mean_s, "workload.online.on_mean_s"),
            (w.online.off_mean_s, "workload.online.off_mean_s"),
            (w.fetch_delay_ms, "workload.fetch_delay_ms"),
        ] {
            if !pos(x) {
                return Err(ScenarioError::Invalid(format!("{name} must be ≥ 0")));
            }
        }
        for (x, name) in [
            (w.senders_fraction, "workload.senders_fraction"),
            (w.scheduled_fraction, "workload.scheduled_fraction"),
            (
                self.adversary.compromised_relays,
                "adversary.compromised_relays",
            ),
            (
                self.adversary.compromised_mailboxes,
                "adversary.compromised_mailboxes",
            ),
            (
                self.adversary.compromised_timers,
                "adversary.compromised_timers",
            ),
        ] {
            if !(0.0..=1.0).contains(&x) {
                return Err(ScenarioError::Invalid(format!(
                    "{name} must be within [0, 1]"
                )));
            }
        }
        if !(1..=whispr_client::state::DEVICES_MAX).contains(&w.devices_per_user) {
            return bad("workload.devices_per_user must be 1 to 6");
        }
        if w.scheduled_fraction > 0.0 && t.timers == 0 {
            return bad("scheduled sends need timer nodes");
        }
        if !(0.0..0.99).contains(&self.adversary.sybil_fraction) {
            return bad("adversary.sybil_fraction must be within [0, 0.99)");
        }
        if t.authorities > whispr_protocol::consensus::AUTHORITIES_MAX {
            return bad("topology.authorities: at most 9");
        }
        match &w.graph {
            GraphSpec::Uniform { contacts } if *contacts == 0 || *contacts >= t.clients => {
                return bad("graph.contacts must be within [1, clients)");
            }
            GraphSpec::PowerLaw {
                exponent,
                max_contacts,
                popularity,
            } if exponent.is_nan()
                || *exponent <= 1.0
                || *max_contacts == 0
                || !pos(*popularity) =>
            {
                return bad("power law: exponent > 1, max_contacts ≥ 1, popularity ≥ 0");
            }
            _ => {}
        }
        match &w.message_size {
            SizeSpec::Uniform { min, max } if min > max => return bad("message_size: min > max"),
            SizeSpec::LogNormal { median, sigma, .. }
                if median.is_nan() || *median <= 0.0 || !pos(*sigma) =>
            {
                return bad("message_size: median > 0, sigma ≥ 0");
            }
            _ => {}
        }
        let max_size = match &w.message_size {
            SizeSpec::Constant { bytes } => *bytes,
            SizeSpec::Uniform { max, .. } | SizeSpec::LogNormal { max, .. } => *max,
        };
        if max_size > whispr_protocol::fragment::MESSAGE_LEN_MAX as u64 {
            return bad("message sizes are at most 1 MiB");
        }
        if self.retransmit.enabled
            && (self.retransmit.attempts_max == 0 || self.retransmit.after_ms == 0)
        {
            return bad("retransmit: attempts_max and after_ms must be ≥ 1");
        }
        for l in [&self.links.loss, &self.links.client_loss] {
            if !(0.0..=1.0).contains(l) {
                return bad("links: loss within [0, 1]");
            }
        }
        if self.limits.fetch_batch == 0 || self.limits.router_queue_max == 0 {
            return bad("limits must be ≥ 1");
        }
        if self.output.sample_every_s.is_nan() || self.output.sample_every_s <= 0.0 {
            return bad("output.sample_every_s must be > 0");
        }
        if self.churn.late_mixes_per_layer > 0 && !pos(self.churn.join_at_s) {
            return bad("churn.join_at_s must be ≥ 0");
        }
        if !pos(self.churn.relay_crashes_per_hour)
            || !pos(self.churn.down_mean_s)
            || !pos(self.churn.mailbox_crashes_per_hour)
        {
            return bad("churn rates must be ≥ 0");
        }
        if !(0.0..=1.0).contains(&self.churn.disk_loss_fraction) {
            return bad("churn.disk_loss_fraction within [0, 1]");
        }
        Ok(())
    }

    /// The link between nodes.
    pub fn node_link(&self, base: &std::path::Path) -> Result<Link, ScenarioError> {
        let link = Link {
            latency: self.links.latency.to_latency(base)?,
            bandwidth_bps: self.links.bandwidth_bps,
            loss: self.links.loss,
        };
        link.validate()?;
        Ok(link)
    }

    /// The link between a client and a node.
    pub fn client_link(&self, base: &std::path::Path) -> Result<Link, ScenarioError> {
        let link = Link {
            latency: self.links.client_latency.to_latency(base)?,
            bandwidth_bps: self.links.bandwidth_bps,
            loss: self.links.client_loss,
        };
        link.validate()?;
        Ok(link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_params_override() {
        let s = Scenario::from_toml(
            "name = \"t\"\n[mixing]\ndelay_ms_mean = 20\n",
            &["mixing.delay_ms_mean=100".into(), "mode=real".into()],
        )
        .unwrap();
        assert_eq!(s.mixing.delay_ms_mean, 100.0);
        assert_eq!(s.mode, Mode::Real);
        assert_eq!(s.topology, Topology::default());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(matches!(
            Scenario::from_toml("nmae = 1", &[]),
            Err(ScenarioError::Parse(_))
        ));
        assert!(matches!(
            Scenario::from_toml("", &["topology.mix_layers=4".into()]),
            Err(ScenarioError::Invalid(_))
        ));
        assert!(matches!(
            Scenario::from_toml("", &["links.loss=1.5".into()]),
            Err(ScenarioError::Invalid(_))
        ));
        assert!(matches!(
            Scenario::from_toml("", &["nokey".into()]),
            Err(ScenarioError::Param(..))
        ));
        for bad in ["workload.devices_per_user=0", "workload.devices_per_user=7"] {
            assert!(matches!(
                Scenario::from_toml("", &[bad.into()]),
                Err(ScenarioError::Invalid(_))
            ));
        }
        assert_eq!(Scenario::default().workload.devices_per_user, 1);
    }
}
