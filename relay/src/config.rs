//! Configuration: `[mesh]` (shared by every node kind that joins the mesh) and the relay
//! binary's own file. Every section refuses unknown keys; errors name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whispr_protocol::directory::Role;

use crate::router::RouterConfig;

/// Shared by every node kind (`whispr-node-kit`); named here because the sections below use
/// them.
pub use whispr_node_kit::{ConfigError, LogConfig};

/// A relay's role in the mesh (mailbox and timer nodes add theirs when they embed the mesh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayRole {
    /// Takes packets from clients.
    Edge,
    /// Mixes packets in its layer.
    Mix,
}

impl From<RelayRole> for Role {
    fn from(r: RelayRole) -> Role {
        match r {
            RelayRole::Edge => Role::Edge,
            RelayRole::Mix => Role::Mix,
        }
    }
}

/// `[mesh]`: how a node joins the mesh.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// libp2p listen multiaddresses. Default `["/ip4/0.0.0.0/tcp/7410"]`.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Addresses published in the node's descriptor (what others dial). Default: the listen
    /// addresses that are not unspecified (`0.0.0.0`); set it behind NAT or when listening on
    /// `0.0.0.0`.
    #[serde(default)]
    pub external_addresses: Vec<String>,
    /// Peers to join through: multiaddresses ending in `/p2p/<peer id>`.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Whether addresses that peers announce (descriptors, identify) may be loopback, private
    /// (RFC 1918, CGNAT 100.64/10, IPv6 ULA) or link-local. Unset: only when every listen
    /// address of this node is itself one of those (a devnet, or a network on one LAN); a node
    /// listening on a public or unspecified address ignores them, so that a peer cannot make
    /// it dial into its own host or LAN. Bootstrap addresses are always used.
    #[serde(default)]
    pub allow_private_addresses: Option<bool>,
    /// Directory of the identity and Sphinx key files. Default `<data_dir>/keys`.
    #[serde(default)]
    pub key_dir: Option<PathBuf>,
    /// Roles of a relay: `edge` and/or `mix` (mailbox and timer nodes set theirs).
    #[serde(default)]
    pub roles: Vec<RelayRole>,
    /// Mix layer (1–3) of a mix relay.
    #[serde(default)]
    pub mix_layer: u32,
    /// Public base URL of the node's HTTP API, published in its descriptor.
    #[serde(default)]
    pub api_url: Option<String>,
    /// How often the node republishes its descriptor, in milliseconds (default 60 000).
    #[serde(default = "default_publish_ms")]
    pub descriptor_publish_ms: u64,
    /// How long a published descriptor stays valid, in milliseconds (default 3 h).
    #[serde(default = "default_validity_ms")]
    pub descriptor_validity_ms: u64,
    /// Key epochs whose Sphinx keys are published ahead of time (default 12, at most 14: a
    /// descriptor holds 16 keys, the previous and current epochs included). With 1-hour epochs
    /// this is how far ahead a deferred send can be built.
    #[serde(default = "default_keys_ahead")]
    pub sphinx_keys_ahead: u64,
    /// Packets queued per outgoing peer stream before the router's sends back up.
    #[serde(default = "default_peer_queue")]
    pub peer_queue_max: usize,
    /// Threads that peel Sphinx layers for the router (default 0: one per available core).
    /// The router task keeps the replay filter, the queue, the ordering and the rate limits;
    /// only the pure crypto runs on these threads.
    #[serde(default)]
    pub peel_workers: usize,
    /// Packets handed to the peel threads and not yet back, at most (default 1024, > 0); while
    /// that many are out, the router reads no more packets (backpressure on the senders).
    #[serde(default = "default_peel_queue")]
    pub peel_queue_max: usize,
    /// Whether a packet that finds no peel out and no other event waiting is peeled in the
    /// router task itself (default false). At low rates on an idle machine this saves the two
    /// thread hand-offs to and from the peel threads (latency); on a machine shared with
    /// other busy processes it made latency worse (the peels then compete with the Tokio
    /// tasks instead of running on their own threads: `docs/benchmarks.md`, relay round 3).
    #[serde(default)]
    pub peel_inline: bool,
    /// Concurrent client packet streams (libp2p client ingress), at most.
    #[serde(default = "default_client_streams")]
    pub client_streams_max: usize,
    /// Descriptors held, at most (the network's size bound).
    #[serde(default = "default_descriptors_max")]
    pub descriptors_max: usize,
    /// Established libp2p connections in all, at most (default 25 000); more are refused.
    #[serde(default = "default_connections_max")]
    pub connections_max: u32,
    /// Established libp2p connections with one peer, at most (default 4); more are refused.
    #[serde(default = "default_connections_per_peer_max")]
    pub connections_per_peer_max: u32,
    /// Inbound libp2p connections still in their handshake, at most (default 256); more are
    /// refused.
    #[serde(default = "default_connections_pending_max")]
    pub connections_pending_max: u32,
    /// An inbound packet stream (`/whispr/packets/1`) with no packet for this long is closed,
    /// in milliseconds (default 600 000; at least 100). Senders close their own idle stream
    /// after half of it.
    #[serde(default = "default_peer_stream_idle_ms")]
    pub peer_stream_idle_ms: u64,
    /// The network file pinning the directory authorities (keys, URLs, threshold; see
    /// `docs/operators.md`). When set, the node routes only to the members of the latest
    /// consensus it fetched from the authorities (`GET /v1/consensus`) and verified, takes
    /// packet streams only from them (and, for `consensus_grace_ms` after a new consensus,
    /// from the previous one's members), and serves that consensus at `GET /v1/consensus`.
    /// When unset, the directory is every valid self-signed descriptor gossiped: for
    /// development only (anyone can join and attract routes).
    #[serde(default)]
    pub network_file: Option<PathBuf>,
    /// How often the consensus is fetched from the authorities, in milliseconds (default
    /// 60 000; only with `network_file`).
    #[serde(default = "default_consensus_poll_ms")]
    pub consensus_poll_ms: u64,
    /// How long the members of the previous consensus still have their packet streams
    /// accepted after a newer consensus replaced it, in milliseconds (default
    /// [`CONSENSUS_GRACE`], 10 minutes; at most [`CONSENSUS_GRACE_MAX`]; only with
    /// `network_file`). 0 refuses a dropped member at once.
    #[serde(default = "default_consensus_grace_ms")]
    pub consensus_grace_ms: u64,
    /// Node-to-node messages (`/whispr/node-msg/1`), `[mesh.node_messages]`: only used by
    /// nodes that accept them (mailbox nodes, for replication).
    #[serde(default)]
    pub node_messages: NodeMessageConfig,
    /// Router limits.
    #[serde(default)]
    pub router: RouterConfig,
}

/// How long the members of the previous consensus still have their packet streams accepted
/// after a newer consensus replaced it: packets that were built on the old one, or sent by a
/// node that has not fetched the new one yet, still get through the epoch change.
///
/// The default of `mesh.consensus_grace_ms`.
pub const CONSENSUS_GRACE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Largest `mesh.peel_workers`.
pub const PEEL_WORKERS_MAX: usize = 1024;

/// The longest `mesh.consensus_grace_ms`: a member dropped from the consensus (its
/// authorities no longer admit it) keeps sending packets for at most this long.
pub const CONSENSUS_GRACE_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn default_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/7410".into()]
}
fn default_publish_ms() -> u64 {
    60_000
}
fn default_validity_ms() -> u64 {
    3 * 3600 * 1000
}
fn default_keys_ahead() -> u64 {
    12
}
fn default_peer_queue() -> usize {
    4096
}
fn default_peel_queue() -> usize {
    1024
}
fn default_client_streams() -> usize {
    1024
}
fn default_consensus_poll_ms() -> u64 {
    60_000
}
fn default_consensus_grace_ms() -> u64 {
    u64::try_from(CONSENSUS_GRACE.as_millis()).unwrap_or(u64::MAX)
}
fn default_connections_max() -> u32 {
    25_000
}
fn default_connections_per_peer_max() -> u32 {
    4
}
fn default_connections_pending_max() -> u32 {
    256
}
fn default_peer_stream_idle_ms() -> u64 {
    600_000
}
fn default_descriptors_max() -> usize {
    whispr_protocol::directory::DIRECTORY_NODES_MAX
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: default_listen(),
            external_addresses: Vec::new(),
            bootstrap: Vec::new(),
            allow_private_addresses: None,
            key_dir: None,
            roles: Vec::new(),
            mix_layer: 0,
            api_url: None,
            descriptor_publish_ms: default_publish_ms(),
            descriptor_validity_ms: default_validity_ms(),
            sphinx_keys_ahead: default_keys_ahead(),
            peer_queue_max: default_peer_queue(),
            peel_workers: 0,
            peel_queue_max: default_peel_queue(),
            peel_inline: false,
            client_streams_max: default_client_streams(),
            descriptors_max: default_descriptors_max(),
            connections_max: default_connections_max(),
            connections_per_peer_max: default_connections_per_peer_max(),
            connections_pending_max: default_connections_pending_max(),
            peer_stream_idle_ms: default_peer_stream_idle_ms(),
            network_file: None,
            consensus_poll_ms: default_consensus_poll_ms(),
            consensus_grace_ms: default_consensus_grace_ms(),
            node_messages: NodeMessageConfig::default(),
            router: RouterConfig::default(),
        }
    }
}

impl MeshConfig {
    /// Checks values that serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::new("mesh.listen", "at least one address"));
        }
        for (key, list) in [
            ("mesh.listen", &self.listen),
            ("mesh.external_addresses", &self.external_addresses),
            ("mesh.bootstrap", &self.bootstrap),
        ] {
            for a in list {
                a.parse::<libp2p::Multiaddr>()
                    .map_err(|e| ConfigError::new(key, format!("{a:?}: {e}")))?;
            }
        }
        for a in &self.bootstrap {
            let addr: libp2p::Multiaddr = a
                .parse()
                .map_err(|e| ConfigError::new("mesh.bootstrap", format!("{a:?}: {e}")))?;
            if !addr
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(ConfigError::new(
                    "mesh.bootstrap",
                    format!("{a:?} must end in /p2p/<peer id>"),
                ));
            }
        }
        if self.roles.contains(&RelayRole::Mix)
            && !(1..=whispr_protocol::directory::MIX_LAYERS_MAX).contains(&self.mix_layer)
        {
            return Err(ConfigError::new(
                "mesh.mix_layer",
                "a mix needs a layer 1–3",
            ));
        }
        if !self.roles.contains(&RelayRole::Mix) && self.mix_layer != 0 {
            return Err(ConfigError::new(
                "mesh.mix_layer",
                "only mix relays have a layer",
            ));
        }
        if self.descriptor_publish_ms == 0
            || self.descriptor_validity_ms <= self.descriptor_publish_ms
        {
            return Err(ConfigError::new(
                "mesh.descriptor_validity_ms",
                "must be longer than descriptor_publish_ms (> 0)",
            ));
        }
        if self.descriptor_validity_ms
            > u64::try_from(whispr_protocol::directory::VALIDITY_MAX.as_millis()).unwrap_or(0)
        {
            return Err(ConfigError::new(
                "mesh.descriptor_validity_ms",
                "above the protocol's 7 days",
            ));
        }
        if self.router.queue_max == 0 {
            return Err(ConfigError::new("mesh.router.queue_max", "must be > 0"));
        }
        let keys_max = u64::try_from(whispr_protocol::directory::EPOCH_KEYS_MAX)
            .unwrap_or(16)
            .saturating_sub(2);
        if self.sphinx_keys_ahead == 0 || self.sphinx_keys_ahead > keys_max {
            return Err(ConfigError::new(
                "mesh.sphinx_keys_ahead",
                format!("1 to {keys_max}"),
            ));
        }
        if self.peer_queue_max == 0 {
            return Err(ConfigError::new("mesh.peer_queue_max", "must be > 0"));
        }
        if self.peel_queue_max == 0 {
            return Err(ConfigError::new("mesh.peel_queue_max", "must be > 0"));
        }
        if self.peel_workers > PEEL_WORKERS_MAX {
            return Err(ConfigError::new(
                "mesh.peel_workers",
                format!("at most {PEEL_WORKERS_MAX}"),
            ));
        }
        for (key, value) in [
            ("mesh.connections_max", self.connections_max),
            (
                "mesh.connections_per_peer_max",
                self.connections_per_peer_max,
            ),
            ("mesh.connections_pending_max", self.connections_pending_max),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be > 0"));
            }
        }
        if self.peer_stream_idle_ms < 100 {
            return Err(ConfigError::new("mesh.peer_stream_idle_ms", "at least 100"));
        }
        if self.consensus_poll_ms < 100 {
            return Err(ConfigError::new("mesh.consensus_poll_ms", "at least 100"));
        }
        if u128::from(self.consensus_grace_ms) > CONSENSUS_GRACE_MAX.as_millis() {
            return Err(ConfigError::new(
                "mesh.consensus_grace_ms",
                "at most 86400000 (one day)",
            ));
        }
        self.node_messages.check()?;
        if self.router.epoch_len_ms < 1000 {
            return Err(ConfigError::new(
                "mesh.router.epoch_len_ms",
                "at least 1000",
            ));
        }
        Ok(())
    }

    /// Checks the section of a node that is a final destination (mailbox, timer): such a node
    /// has no relay role and takes no client packets.
    pub fn check_destination(&self) -> Result<(), ConfigError> {
        self.check()?;
        if !self.roles.is_empty() || self.mix_layer != 0 {
            return Err(ConfigError::new(
                "mesh.roles",
                "mailbox and timer nodes have their own role only; leave roles and mix_layer unset",
            ));
        }
        if self.router.edge {
            return Err(ConfigError::new(
                "mesh.router.edge",
                "only relays take client packets",
            ));
        }
        Ok(())
    }

    /// The pinned network of `network_file`, if set.
    pub fn network(&self) -> Result<Option<whispr_protocol::consensus::Network>, ConfigError> {
        let Some(path) = &self.network_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("mesh.network_file", format!("{}: {e}", path.display()))
        })?;
        whispr_protocol::consensus::Network::parse(&text)
            .map(Some)
            .map_err(|e| ConfigError::new("mesh.network_file", format!("{}: {e}", path.display())))
    }

    /// `consensus_grace_ms` as a duration.
    pub fn consensus_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.consensus_grace_ms)
    }

    /// The key directory for a node whose data lives in `data_dir`.
    pub fn key_dir(&self, data_dir: &Path) -> PathBuf {
        self.key_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("keys"))
    }
}

/// `[mesh.node_messages]`: the limits of the node-to-node message protocol
/// (`/whispr/node-msg/1`, see `crate::mesh`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMessageConfig {
    /// Longest message, in bytes (default 1 MiB, at most 16 MiB). A longer one is refused by
    /// the sender; a longer frame closes the receiving stream.
    #[serde(default = "default_node_message_max")]
    pub message_max: usize,
    /// Messages queued per destination node before sends are refused (default 256).
    #[serde(default = "default_node_message_queue")]
    pub queue_max: usize,
    /// Received messages waiting for the embedding node (default 64); when full, the
    /// streams are no longer read (backpressure).
    #[serde(default = "default_node_message_inbox")]
    pub inbox_max: usize,
    /// An inbound stream with no frame for this long is closed, in milliseconds (default
    /// 120 000; at least 100). The sender closes its own idle stream after half of it.
    #[serde(default = "default_node_message_idle_ms")]
    pub idle_ms: u64,
    /// Once a frame's length has arrived, its bytes must arrive within this, in milliseconds
    /// (default 30 000; at least 100), or the stream is closed.
    #[serde(default = "default_node_message_frame_ms")]
    pub frame_ms: u64,
    /// Concurrent inbound streams from one peer, 1 or 2 (default 2).
    #[serde(default = "default_node_message_streams_per_peer")]
    pub streams_per_peer: usize,
    /// Concurrent inbound streams in all (default 64).
    #[serde(default = "default_node_message_streams_max")]
    pub streams_max: usize,
}

/// The protocol's bound on [`NodeMessageConfig::message_max`].
pub const NODE_MESSAGE_MAX_LIMIT: usize = 16 << 20;

fn default_node_message_max() -> usize {
    1 << 20
}
fn default_node_message_queue() -> usize {
    256
}
fn default_node_message_inbox() -> usize {
    64
}
fn default_node_message_idle_ms() -> u64 {
    120_000
}
fn default_node_message_frame_ms() -> u64 {
    30_000
}
fn default_node_message_streams_per_peer() -> usize {
    2
}
fn default_node_message_streams_max() -> usize {
    64
}

impl Default for NodeMessageConfig {
    fn default() -> Self {
        NodeMessageConfig {
            message_max: default_node_message_max(),
            queue_max: default_node_message_queue(),
            inbox_max: default_node_message_inbox(),
            idle_ms: default_node_message_idle_ms(),
            frame_ms: default_node_message_frame_ms(),
            streams_per_peer: default_node_message_streams_per_peer(),
            streams_max: default_node_message_streams_max(),
        }
    }
}

impl NodeMessageConfig {
    /// Checks the bounds.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.message_max == 0 || self.message_max > NODE_MESSAGE_MAX_LIMIT {
            return Err(ConfigError::new(
                "mesh.node_messages.message_max",
                format!("1 to {NODE_MESSAGE_MAX_LIMIT}"),
            ));
        }
        for (key, value) in [
            ("mesh.node_messages.queue_max", self.queue_max),
            ("mesh.node_messages.inbox_max", self.inbox_max),
            ("mesh.node_messages.streams_max", self.streams_max),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be > 0"));
            }
        }
        if !(1..=2).contains(&self.streams_per_peer) {
            return Err(ConfigError::new(
                "mesh.node_messages.streams_per_peer",
                "1 or 2",
            ));
        }
        for (key, value) in [
            ("mesh.node_messages.idle_ms", self.idle_ms),
            ("mesh.node_messages.frame_ms", self.frame_ms),
        ] {
            if value < 100 {
                return Err(ConfigError::new(key, "at least 100"));
            }
        }
        Ok(())
    }
}

/// `[http]` of the relay: the client API (`/v1/directory`, `/v1/packets`, `/healthz`) and
/// `/metrics` (on a listener of its own with `metrics_listen`; on the API listener only when
/// that is a loopback address).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:7480`.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM). Without it the API is plain HTTP, allowed only on
    /// loopback.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Packets per `POST /v1/packets` batch, at most.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// A listener of its own for `/metrics` and `/healthz` (plain HTTP). When set, the API
    /// listener does not serve `/metrics`; when not, the API listener serves it only if it is
    /// a loopback address (a public relay answers 404). Default none.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address (plain HTTP: firewall it). Default
    /// false.
    #[serde(default)]
    pub metrics_allow_non_loopback: bool,
    /// `/metrics` shows a snapshot taken at most this often, so that two scrapes never tell
    /// when one packet came or went. 0 publishes live counters (tests, devnets). Default
    /// 60,000 ms.
    #[serde(default = "default_metrics_interval_ms")]
    pub metrics_interval_ms: u64,
    /// `POST /v1/packets` rate budgets are per source address (IPv4 address or IPv6 /64);
    /// loopback clients are counted per connection when true, since a reverse proxy or a
    /// devnet on the host makes every client a loopback client. Default true.
    #[serde(default = "yes")]
    pub loopback_per_connection: bool,
}

fn yes() -> bool {
    true
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7480))
}
fn default_batch_max() -> usize {
    64
}
fn default_metrics_interval_ms() -> u64 {
    60_000
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            tls_cert: None,
            tls_key: None,
            batch_max: default_batch_max(),
            metrics_listen: None,
            metrics_allow_non_loopback: false,
            metrics_interval_ms: default_metrics_interval_ms(),
            loopback_per_connection: true,
        }
    }
}

impl HttpConfig {
    /// True when the API listener serves `/metrics`: no `metrics_listen`, and the API
    /// listener is a loopback address.
    pub fn metrics_on_api(&self) -> bool {
        self.metrics_listen.is_none() && self.listen.ip().is_loopback()
    }

    /// TLS present, or loopback.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(listen) = self.metrics_listen
            && !listen.ip().is_loopback()
            && !self.metrics_allow_non_loopback
        {
            return Err(ConfigError::new(
                "http.metrics_listen",
                "not a loopback address; set http.metrics_allow_non_loopback = true to allow it",
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), Some(_)) => Ok(()),
            (None, None) if self.listen.ip().is_loopback() => Ok(()),
            (None, None) => Err(ConfigError::new(
                "http.tls_cert",
                "plain HTTP is allowed only on a loopback address; set tls_cert and tls_key",
            )),
            _ => Err(ConfigError::new(
                "http.tls_key",
                "tls_cert and tls_key go together",
            )),
        }
        .and_then(|()| {
            if self.batch_max == 0 {
                Err(ConfigError::new("http.batch_max", "must be > 0"))
            } else {
                Ok(())
            }
        })
    }
}

/// The relay binary's configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Keys (`keys/`) and the replay store (`replay/`).
    pub data_dir: PathBuf,
    /// Joining the mesh.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

impl RelayConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let config: RelayConfig = whispr_node_kit::config::load_toml(path)?;
        config.check()?;
        Ok(config)
    }

    /// Checks every section.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.mesh.check()?;
        self.http.check()?;
        if self.mesh.roles.is_empty() {
            return Err(ConfigError::new(
                "mesh.roles",
                "a relay is \"edge\", \"mix\" or both",
            ));
        }
        Ok(())
    }
}
