//! The mailbox node: configuration and the tokio driver around [`MailboxCore`] (group
//! commit, expiry sweeps through the timer queue, wake-ups for long polls and streams). The
//! HTTP API ([`crate::http`], which also holds [`MailboxNode::serve`]) and the mesh layer
//! ([`crate::mesh`]) are built on top of this module; it imports neither.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use whispr_node_kit::clock::now;
use whispr_protocol::payload::Reply;
use whispr_protocol::sphinx::Surb;
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::queue::TimerQueue;
use whispr_timer_service::rocks::{RocksOptions as TimerRocksOptions, RocksStore as TimerStore};
use whispr_timer_service::task::{Category, NewTask};

use crate::auth::{AuthConfig, Sessions};
use crate::config::CoreConfig;
use crate::core::{DepositBatch, DepositReceipt, Incoming, MailboxCore, Output};
use crate::crypto::MasterKey;
use crate::error::{MailboxError, Result};
use crate::limiter::{ConnectionLimiter, RateLimiter};
use crate::metrics::MeshMetrics;
use crate::rocks::{RocksOptions, RocksStore};
use crate::store::MailboxStore;

/// Shared by every node kind (`whispr-node-kit`): the `[log]` table and config errors naming
/// the key to fix.
pub use whispr_node_kit::{ConfigError, LogConfig};

/// The node's counters (kept in [`crate::metrics`], below the node and its API).
pub use crate::metrics::Metrics;

/// The mailbox node's TOML configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory of the stores (`db/`, `timers/`) and, by default, the master key.
    pub data_dir: PathBuf,
    /// The master key file (created with mode 0600 on first start). Default
    /// `data_dir/master.key`.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// This node's name in login signatures. Default: `whispr-mailbox/` followed by the hex
    /// of the node's mesh identity key ([`whispr_protocol::mailbox_api::node_audience`]), the
    /// only audience clients sign for; `whispr-mailbox` for a node without a mesh identity.
    /// Set it only for a node clients do not find through the directory (tests).
    #[serde(default)]
    pub audience: Option<String>,
    /// The client API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Mailbox limits.
    #[serde(default)]
    pub limits: CoreConfig,
    /// Login, sessions and tickets.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Group commit of deposits.
    #[serde(default)]
    pub commit: CommitConfig,
    /// RocksDB tuning of the mailbox store.
    #[serde(default)]
    pub rocksdb: RocksOptions,
    /// Seed for every random choice (tests, benchmarks and the simulator only); `None` draws
    /// from the OS. Not readable from a config file: a seeded node repeats its master key,
    /// session tokens and AEAD nonces at every start.
    #[serde(skip)]
    pub rng_seed: Option<u64>,
    /// Joining the mesh (deposits, prekey requests and SURB replies arrive through it). Without
    /// this section the node serves its owners only.
    #[serde(default)]
    pub mesh: Option<whispr_relay::config::MeshConfig>,
    /// The admin API (online backups) on a loopback listener of its own ([`crate::admin`]).
    /// Default none.
    #[serde(default)]
    pub admin: Option<crate::admin::AdminConfig>,
    /// Scheduled backups (off by default; `docs/operators.md`, "Backups and restore").
    #[serde(default)]
    pub backup: whispr_timer_service::backup::BackupConfig,
}

/// The audience of a node with no mesh identity (it serves no client of the directory).
const STANDALONE_AUDIENCE: &str = "whispr-mailbox";

/// `[api]`: the client HTTP API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address. Default `127.0.0.1:7400`.
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM). Required unless `listen` is a loopback address.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Largest request body. Default 64 KiB.
    pub body_bytes_max: usize,
    /// Requests per minute per client (policy: 200 operations/min), counted per source
    /// address (IPv4 address or IPv6 /64, so that new connections buy no new budget), and per
    /// connection for loopback clients unless `loopback_per_connection` is false. Default 200.
    pub ops_per_min_per_connection: u64,
    /// Limit loopback clients per connection rather than as one address: a reverse proxy or
    /// a devnet on this host makes every client a loopback client. Default true.
    pub loopback_per_connection: bool,
    /// Source addresses (and loopback connections) whose request rate is tracked; the one
    /// seen longest ago is forgotten first. Default 10,000.
    pub connections_tracked_max: usize,
    /// Open long polls and streams per mailbox. Default 8.
    pub connections_per_mailbox_max: usize,
    /// Longest long-poll wait. Default 30,000 ms.
    pub wait_ms_max: u64,
    /// A stream with no traffic either way for this long is closed. Default 120,000 ms.
    pub stream_idle_ms: u64,
    /// Most messages per poll. Default 100.
    pub poll_limit_max: usize,
    /// Mailboxes created per hour per source address (IPv4 address or IPv6 /64), in a burst
    /// of at most this many. Default 30.
    pub mailbox_creations_per_hour_per_ip: u64,
    /// A listener of its own for `/metrics` and `/healthz` (plain HTTP). When set, the API
    /// listener does not serve `/metrics`; when not, the API listener serves it only if it is
    /// a loopback address (a public node answers 404). Default none.
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address (plain HTTP: firewall it). Default
    /// false.
    pub metrics_allow_non_loopback: bool,
    /// `/metrics` shows a snapshot taken at most this often, so that two scrapes never time a
    /// deposit, an acknowledgement or a poll. 0 publishes live counters (tests, devnets).
    /// Default 60,000 ms.
    pub metrics_interval_ms: u64,
}

impl ApiConfig {
    /// True when the API listener serves `/metrics`: no `metrics_listen`, and the API
    /// listener is a loopback address.
    pub fn metrics_on_api(&self) -> bool {
        self.metrics_listen.is_none() && self.listen.ip().is_loopback()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            tls_cert_file: None,
            tls_key_file: None,
            body_bytes_max: 64 * 1024,
            ops_per_min_per_connection: 200,
            loopback_per_connection: true,
            connections_tracked_max: 10_000,
            connections_per_mailbox_max: 8,
            wait_ms_max: 30_000,
            stream_idle_ms: 120_000,
            poll_limit_max: 100,
            mailbox_creations_per_hour_per_ip: 30,
            metrics_listen: None,
            metrics_allow_non_loopback: false,
            metrics_interval_ms: 60_000,
        }
    }
}

/// `[commit]`: group commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommitConfig {
    /// Most deposits in one synced write. Default 512.
    pub batch_max: usize,
    /// Deposits waiting for the writer; beyond it deposits are refused (backpressure).
    /// Default 8192.
    pub queue_max: usize,
    /// Prepare the next batch while the previous one's synced write is in flight: deposits
    /// arriving meanwhile are checked, numbered and sealed into it, and it is written as soon
    /// as the writer is free. False prepares a batch only once the previous one is durable.
    /// Either way at most two batches of `batch_max` deposits are open. Default true.
    pub pipeline: bool,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            batch_max: 512,
            queue_max: 8192,
            pipeline: true,
        }
    }
}

impl NodeConfig {
    /// The audience devices sign at login: `audience` if set, else the node's own
    /// ([`whispr_protocol::mailbox_api::node_audience`] of `limits.node_id`).
    pub fn login_audience(&self) -> String {
        match (&self.audience, self.limits.node_id) {
            (Some(audience), _) => audience.clone(),
            (None, Some(id)) => {
                whispr_protocol::mailbox_api::node_audience(&whispr_protocol::NodeId(id))
            }
            (None, None) => STANDALONE_AUDIENCE.to_string(),
        }
    }

    /// A configuration with defaults for everything but the data directory.
    pub fn with_data_dir(data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            data_dir,
            master_key_file: None,
            audience: None,
            api: ApiConfig::default(),
            log: LogConfig::default(),
            limits: CoreConfig::default(),
            auth: AuthConfig::default(),
            commit: CommitConfig::default(),
            rocksdb: RocksOptions::default(),
            rng_seed: None,
            mesh: None,
            admin: None,
            backup: whispr_timer_service::backup::BackupConfig::default(),
        }
    }

    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = whispr_node_kit::config::load_toml(path)?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that TOML types cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(mesh) = &self.mesh {
            mesh.check_destination()?;
        }
        if let Some(admin) = &self.admin {
            admin.check()?;
        }
        self.backup.check()?;
        let fail = |key: &str, problem: &str| {
            Err(ConfigError {
                key: key.into(),
                problem: problem.into(),
            })
        };
        match (&self.api.tls_cert_file, &self.api.tls_key_file) {
            (None, None) if !self.api.listen.ip().is_loopback() => {
                return fail(
                    "api.tls_cert_file",
                    "plain HTTP is only allowed on a loopback address; set api.tls_cert_file \
                     and api.tls_key_file",
                );
            }
            (Some(_), None) => return fail("api.tls_key_file", "missing (tls_cert_file is set)"),
            (None, Some(_)) => return fail("api.tls_cert_file", "missing (tls_key_file is set)"),
            _ => {}
        }
        if let Some(listen) = self.api.metrics_listen
            && !listen.ip().is_loopback()
            && !self.api.metrics_allow_non_loopback
        {
            return fail(
                "api.metrics_listen",
                "not a loopback address; set api.metrics_allow_non_loopback = true to allow it",
            );
        }
        if let Some(audience) = &self.audience
            && (audience.is_empty() || audience.len() > 255)
        {
            return fail("audience", "must be 1 to 255 bytes");
        }
        let nonzero = [
            ("api.body_bytes_max", self.api.body_bytes_max as u64),
            (
                "api.ops_per_min_per_connection",
                self.api.ops_per_min_per_connection,
            ),
            (
                "api.connections_tracked_max",
                self.api.connections_tracked_max as u64,
            ),
            (
                "api.connections_per_mailbox_max",
                self.api.connections_per_mailbox_max as u64,
            ),
            ("api.poll_limit_max", self.api.poll_limit_max as u64),
            (
                "api.mailbox_creations_per_hour_per_ip",
                self.api.mailbox_creations_per_hour_per_ip,
            ),
            (
                "auth.challenges_per_source_max",
                self.auth.challenges_per_source_max as u64,
            ),
            (
                "limits.unused_mailbox_ttl_ms",
                self.limits.unused_mailbox_ttl_ms,
            ),
            ("limits.mailboxes_max", self.limits.mailboxes_max as u64),
            ("limits.devices_max", self.limits.devices_max as u64),
            ("limits.retention_ms_max", self.limits.retention_ms_max),
            ("limits.fetch_limit_max", self.limits.fetch_limit_max as u64),
            ("limits.sweep_batch_max", self.limits.sweep_batch_max as u64),
            ("limits.expiry_bucket_ms", self.limits.expiry_bucket_ms),
            ("commit.batch_max", self.commit.batch_max as u64),
            ("commit.queue_max", self.commit.queue_max as u64),
            ("auth.session_ttl_ms", self.auth.session_ttl_ms),
        ];
        for (key, value) in nonzero {
            if value == 0 {
                return fail(key, "must be at least 1");
            }
        }
        Ok(())
    }

    /// The master key file.
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

/// Where SURB replies (deposit acks, prekey bundles) go: the mesh layer.
pub trait ReplySink: Send + Sync + 'static {
    /// Sends `reply` through `surb`. Must not block.
    fn send_reply(&self, surb: Surb, reply: Reply);
}

/// Where the core's messages to peer replicas go (the mesh's node-to-node channel,
/// [`crate::mesh::MeshReplicaTransport`]; a test bus in tests).
pub trait ReplicaTransport: Send + Sync + 'static {
    /// Sends the encoded replica message `bytes` to the node `to`. Must not block; delivery
    /// is at most once (the replication protocol acknowledges and repairs).
    fn send(&self, to: whispr_protocol::NodeId, bytes: Vec<u8>);
}

/// Replication counters of the driver (the core's are in [`crate::core::ReplicaStats`]).
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    /// Replica messages handed to the transport.
    pub sent: AtomicU64,
    /// Replica messages dropped because no transport is attached.
    pub unsent: AtomicU64,
    /// Replica messages the transport could not queue (the mesh's queue full, peer not in
    /// the directory).
    pub send_failed: Arc<AtomicU64>,
    /// Replica messages received.
    pub received: AtomicU64,
    /// Received replica messages that did not decode.
    pub malformed: AtomicU64,
}

/// A reply sink for a node not yet joined to a mesh: replies are counted and dropped.
#[derive(Debug, Default)]
pub struct NoMesh {
    /// Replies dropped.
    pub dropped: AtomicU64,
}

impl ReplySink for NoMesh {
    fn send_reply(&self, _surb: Surb, _reply: Reply) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

type Core = MailboxCore<Arc<RocksStore>, StdRng>;

struct DepositJob {
    incoming: Incoming,
    done: oneshot::Sender<Result<DepositReceipt>>,
}

/// A group commit being prepared, then written.
struct Committing {
    batch: DepositBatch,
    waiters: Vec<oneshot::Sender<Result<DepositReceipt>>>,
    /// The mailbox of each deposit, for the log line of a refusal (as a [`crate::pii::Tag`]).
    mailboxes: Vec<whispr_protocol::MailboxId>,
}

/// The core and the group-commit pipeline's state, under one lock.
///
/// The pipeline: the preparer thread (`mailbox-commit`) takes queued deposits and prepares
/// them under the lock into the open batch ([`MailboxCore::extend_deposits`]: checks,
/// sequence numbers, sealing); the writer thread (`mailbox-write`) takes the open batch as
/// soon as it is free, makes it durable without the lock, then finishes it under the lock
/// ([`MailboxCore::finish_deposits`]) and answers the depositors. So while one batch is being
/// written (fsync), the next one fills with whatever arrives, already prepared, and it holds
/// everything that arrived by the time the writer is free (`commit.pipeline`; without it
/// a batch is opened only once the previous one is finished). Every other use of the core
/// ([`MailboxNode::core`]) waits until no batch is open; the preparer opens none and adds
/// nothing while such a caller waits.
struct CoreState {
    core: Core,
    /// The batch being filled, not yet taken by the writer.
    open: Option<Committing>,
    /// Deposit batches opened and not finished (the open one and the one being written).
    in_flight: usize,
    /// Callers of [`MailboxNode::core`] waiting for `in_flight` to reach 0.
    waiting: usize,
    /// The preparer waits for room or for those callers to be done.
    preparer_waiting: bool,
    /// The writer waits for a batch.
    writer_waiting: bool,
}

/// The core, held by a caller of [`MailboxNode::core`]: no deposit batch is open meanwhile.
pub(crate) struct CoreGuard<'a> {
    state: MutexGuard<'a, CoreState>,
    changed: &'a Condvar,
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.state.core
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.state.core
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        // The preparer may be waiting for this caller to be done.
        if self.state.preparer_waiting {
            self.changed.notify_all();
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: NodeConfig,
    core: Mutex<CoreState>,
    /// Signalled when a batch is finished or a waiting caller is done with the core.
    core_changed: Condvar,
    /// The store the core owns, shared: the writer thread writes batches through it without
    /// the core's lock.
    store: Arc<RocksStore>,
    sessions: Mutex<Sessions<StdRng>>,
    timers: Mutex<TimerQueue<TimerStore, StdRng>>,
    deposits: mpsc::Sender<DepositJob>,
    /// Woken after every write that adds messages.
    pub(crate) new_messages: Notify,
    /// Woken when a sweep is scheduled.
    sweeper_wake: Notify,
    replies: Arc<dyn ReplySink>,
    /// The embedded mesh, once joined.
    mesh: std::sync::OnceLock<(whispr_relay::mesh::MeshHandle, Arc<MeshMetrics>)>,
    /// Where replica messages go, once attached.
    replica_transport: std::sync::OnceLock<Arc<dyn ReplicaTransport>>,
    pub(crate) replica_metrics: ReplicaMetrics,
    pub(crate) metrics: Metrics,
    /// Open long polls and streams per mailbox.
    pub(crate) mailbox_connections: Mutex<BTreeMap<[u8; 32], usize>>,
    pub(crate) limiter: Mutex<ConnectionLimiter>,
    /// Mailbox creations per source address.
    pub(crate) creations: Mutex<RateLimiter<std::net::IpAddr>>,
    /// What `/metrics` publishes (refreshed at most every `api.metrics_interval_ms`).
    pub(crate) metrics_snapshot: whispr_relay::http::MetricsSnapshot,
    /// Online backups of the mailbox store ([`crate::admin`]).
    pub(crate) backup: whispr_timer_service::backup::BackupSource,
    /// The store's database, for compactions run without the core lock.
    db: Arc<rocksdb::DB>,
}

/// A running mailbox node (cheap to clone).
#[derive(Clone)]
pub struct MailboxNode {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for MailboxNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxNode").finish_non_exhaustive()
    }
}

/// Mailboxes loaded per step of the start-up's background load.
const LOAD_STEP: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Core operations are all-or-nothing, so the state behind a lock stays consistent even if
    // a holder panicked (which would be a bug).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait<'a, T>(changed: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    changed
        .wait(guard)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MailboxNode {
    /// Opens the stores under `config.data_dir` (creating them and the master key on first
    /// start), purges what expired while the node was down, and starts the group-commit
    /// writer and the expiry sweeper. Must be called inside a tokio runtime.
    pub fn open(config: NodeConfig, replies: Arc<dyn ReplySink>) -> Result<MailboxNode> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| MailboxError::Startup(format!("cannot create data_dir: {e}")))?;
        let mut seed_rng = match config.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let master = MasterKey::load_or_create(&config.master_key_path(), &mut seed_rng)?;
        let store = Arc::new(RocksStore::open(
            &config.data_dir.join(crate::admin::STORE_DIR),
            config.rocksdb.clone(),
        )?);
        let backup = whispr_timer_service::backup::BackupSource::new(
            store.shared_db(),
            crate::admin::BACKUP_KIND,
        );
        let db = store.shared_db();
        let core_rng = StdRng::from_rng(&mut seed_rng);
        let core = MailboxCore::open(
            config.limits.clone(),
            store.clone(),
            master,
            core_rng,
            now(),
        )?;
        let timer_store = TimerStore::open(
            &config.data_dir.join("timers"),
            TimerRocksOptions::default(),
        )
        .map_err(|e| MailboxError::Store(crate::store::StoreError::Backend(e.to_string())))?;
        let timers = TimerQueue::open(
            QueueConfig {
                rng_seed: config.rng_seed,
                ..QueueConfig::default()
            },
            timer_store,
            StdRng::from_rng(&mut seed_rng),
        )
        .map_err(|e| MailboxError::Store(crate::store::StoreError::Backend(e.to_string())))?;
        let sessions = Sessions::new(
            config.auth.clone(),
            config.login_audience(),
            StdRng::from_rng(&mut seed_rng),
        );
        let (tx, rx) = mpsc::channel(config.commit.queue_max);
        let limiter = ConnectionLimiter::new(
            config.api.ops_per_min_per_connection,
            config.api.connections_tracked_max,
        );
        let creations = RateLimiter::per_period(
            config.api.mailbox_creations_per_hour_per_ip,
            3_600_000,
            config.api.connections_tracked_max,
        );
        let metrics_snapshot = whispr_relay::http::MetricsSnapshot::new(Duration::from_millis(
            config.api.metrics_interval_ms,
        ));
        let node = MailboxNode {
            shared: Arc::new(Shared {
                config,
                core: Mutex::new(CoreState {
                    core,
                    open: None,
                    in_flight: 0,
                    waiting: 0,
                    preparer_waiting: false,
                    writer_waiting: false,
                }),
                core_changed: Condvar::new(),
                store,
                sessions: Mutex::new(sessions),
                timers: Mutex::new(timers),
                deposits: tx,
                new_messages: Notify::new(),
                sweeper_wake: Notify::new(),
                replies,
                mesh: std::sync::OnceLock::new(),
                replica_transport: std::sync::OnceLock::new(),
                replica_metrics: ReplicaMetrics::default(),
                metrics: Metrics::default(),
                mailbox_connections: Mutex::new(BTreeMap::new()),
                limiter: Mutex::new(limiter),
                creations: Mutex::new(creations),
                metrics_snapshot,
                backup,
                db,
            }),
        };
        // Sweeps asked for while loading.
        node.drain_outputs(&mut node.core());
        let writer = node.clone();
        std::thread::Builder::new()
            .name("mailbox-write".into())
            .spawn(move || writer.write_loop())
            .map_err(|e| MailboxError::Startup(format!("cannot start the writer: {e}")))?;
        let preparer = node.clone();
        std::thread::Builder::new()
            .name("mailbox-commit".into())
            .spawn(move || preparer.commit_loop(rx))
            .map_err(|e| MailboxError::Startup(format!("cannot start the preparer: {e}")))?;
        let sweeper = node.clone();
        tokio::spawn(async move { sweeper.sweep_loop().await });
        let loader = node.clone();
        tokio::spawn(async move { loader.load_loop().await });
        Ok(node)
    }

    /// After a start, loads the mailboxes not accessed yet a few at a time (the core reads
    /// only their records at open, so reads are served at once), so that `/metrics` counts
    /// every message. Each step holds the core lock for at most [`LOAD_STEP`] mailboxes.
    async fn load_loop(&self) {
        loop {
            let node = self.clone();
            let loaded = tokio::task::spawn_blocking(move || node.core().load_some(LOAD_STEP))
                .await
                .unwrap_or(Ok(0));
            match loaded {
                Ok(0) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => {
                    tracing::error!(error = %e, "loading mailboxes failed");
                    return;
                }
            }
        }
    }

    /// The core, once no deposit batch is open (the one being written waits for its synced
    /// write, the one being filled is written next). Every use of the core but the
    /// group-commit pipeline's goes through this, so none sees or writes around a batch in
    /// flight.
    pub(crate) fn core(&self) -> CoreGuard<'_> {
        let mut state = lock(&self.shared.core);
        if state.in_flight > 0 {
            state.waiting += 1;
            while state.in_flight > 0 {
                state = wait(&self.shared.core_changed, state);
            }
            state.waiting -= 1;
        }
        CoreGuard {
            state,
            changed: &self.shared.core_changed,
        }
    }

    /// Runs `f` with the core on a blocking thread, then hands its outputs on. Core calls
    /// wait for the core lock and may fsync: async handlers call the core through this, so
    /// they never block a runtime worker (which also runs the embedded mesh).
    pub(crate) async fn with_core<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> T + Send + 'static,
    ) -> Result<T> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut core = node.core();
            let result = f(&mut core);
            node.drain_outputs(&mut core);
            result
        })
        .await
        .map_err(|_| {
            MailboxError::Store(crate::store::StoreError::Backend(
                "a core task failed".into(),
            ))
        })
    }

    pub(crate) fn sessions(&self) -> MutexGuard<'_, Sessions<StdRng>> {
        lock(&self.shared.sessions)
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// False once the store is poisoned.
    pub fn is_healthy(&self) -> bool {
        !self.shared.store.is_poisoned() && self.mesh().is_none_or(|(mesh, _)| mesh.is_healthy())
    }

    /// Records the mesh this node joined: its routes (`GET /v1/directory`), metrics and
    /// health join the node's API. Only the first call counts.
    pub fn attach_mesh(&self, mesh: whispr_relay::mesh::MeshHandle, metrics: Arc<MeshMetrics>) {
        let _ = self.shared.mesh.set((mesh, metrics));
    }

    /// Sends the core's replica messages through `transport` (only the first call counts).
    /// Set `limits.node_id` in the config before [`Self::open`]: replicated mailboxes need it.
    pub fn attach_replica_transport(&self, transport: Arc<dyn ReplicaTransport>) {
        let _ = self.shared.replica_transport.set(transport);
    }

    /// Replication counters of the driver.
    pub fn replica_metrics(&self) -> &ReplicaMetrics {
        &self.shared.replica_metrics
    }

    /// Replication counters of the core.
    pub fn replica_stats(&self) -> crate::core::ReplicaStats {
        self.core().replica_stats()
    }

    /// Handles a message from the peer replica `from` (authenticated by the transport). The
    /// core may write (synced): call it from a blocking thread, as
    /// [`Self::handle_replica_message`] does.
    pub fn handle_replica_bytes(&self, from: whispr_protocol::NodeId, bytes: &[u8]) {
        let metrics = &self.shared.replica_metrics;
        metrics.received.fetch_add(1, Ordering::Relaxed);
        let message = match whispr_protocol::replica::ReplicaMessage::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let stored = matches!(
            message,
            whispr_protocol::replica::ReplicaMessage::Push { .. }
        );
        let result = {
            let mut core = self.core();
            let result = core.handle_replica(now(), from, message);
            self.drain_outputs(&mut core);
            result
        };
        match result {
            Ok(()) => {
                if stored {
                    self.shared.new_messages.notify_waiters();
                }
            }
            Err(e) => tracing::error!(error = %e, "replica message failed"),
        }
        // Creations (record repair) and new messages may move the sweeper's next wake-up.
        self.wake_sweeper();
    }

    /// [`Self::handle_replica_bytes`] on a blocking thread.
    pub async fn handle_replica_message(&self, from: whispr_protocol::NodeId, bytes: Vec<u8>) {
        let node = self.clone();
        let _ = tokio::task::spawn_blocking(move || node.handle_replica_bytes(from, &bytes)).await;
    }

    /// Receives replica messages from `rx` until it closes, one at a time (the channel's
    /// bound is the backpressure).
    pub fn spawn_replica_receiver(
        &self,
        mut rx: mpsc::Receiver<(whispr_protocol::NodeId, Vec<u8>)>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            while let Some((from, bytes)) = rx.recv().await {
                node.handle_replica_message(from, bytes).await;
            }
        })
    }

    /// The mesh, if joined.
    pub fn mesh(&self) -> Option<&(whispr_relay::mesh::MeshHandle, Arc<MeshMetrics>)> {
        self.shared.mesh.get()
    }

    /// Hands core outputs to the mesh (replies) and the timer queue (sweeps).
    fn drain_outputs(&self, core: &mut Core) {
        while let Some(output) = core.poll_output() {
            match output {
                Output::Reply { surb, reply } => {
                    self.shared
                        .metrics
                        .replies_sent
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.replies.send_reply(surb, reply);
                }
                Output::ScheduleSweep { at } => {
                    let result = lock(&self.shared.timers).schedule(
                        now(),
                        NewTask {
                            category: Category::Expiry,
                            priority: 5,
                            due_at: at,
                            payload: at.0.to_be_bytes().to_vec(),
                            owner: None,
                        },
                    );
                    if let Err(e) = result {
                        // Reads still filter by expiry and the next start purges, so a lost
                        // sweep delays deletion but never serves expired data.
                        tracing::warn!(error = %e, "cannot schedule an expiry sweep");
                    }
                    self.shared.sweeper_wake.notify_one();
                }
                Output::Replica { peer, message } => {
                    let metrics = &self.shared.replica_metrics;
                    match self.shared.replica_transport.get() {
                        Some(t) => {
                            metrics.sent.fetch_add(1, Ordering::Relaxed);
                            t.send(peer, message.encode());
                        }
                        None => {
                            metrics.unsent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Creates a mailbox (see [`MailboxCore::create_mailbox`]).
    pub fn create_mailbox(&self, request: crate::core::CreateMailbox) -> Result<()> {
        let mut core = self.core();
        let result = core.create_mailbox(now(), request);
        self.drain_outputs(&mut core);
        drop(core);
        self.wake_sweeper();
        result
    }

    /// Deposits one message through the group-commit writer; returns once it is durable.
    pub async fn deposit(&self, incoming: Incoming) -> Result<DepositReceipt> {
        let (done, wait) = oneshot::channel();
        self.shared
            .deposits
            .try_send(DepositJob { incoming, done })
            .map_err(|_| MailboxError::RateLimited {
                what: "deposit queue full",
                retry_after_ms: 100,
            })?;
        wait.await
            .unwrap_or(Err(MailboxError::Store(crate::store::StoreError::Backend(
                "writer stopped".into(),
            ))))
    }

    /// Handles a final-hop payload for this node (prekey requests; deposits should use
    /// [`Self::deposit`] to be group-committed).
    pub fn handle_prekey_request(
        &self,
        request: whispr_protocol::payload::PrekeyRequest,
    ) -> Result<()> {
        let mut core = self.core();
        let result = core.handle_prekey_request(now(), request);
        self.drain_outputs(&mut core);
        result
    }

    /// The group commit's first stage (thread `mailbox-commit`): prepares the deposits
    /// queued into the open batch (at most `commit.batch_max` in it), under the core's lock,
    /// for [`Self::write_loop`]. See [`CoreState`].
    fn commit_loop(&self, mut rx: mpsc::Receiver<DepositJob>) {
        let batch_max = self.shared.config.commit.batch_max.max(1);
        let pipeline = self.shared.config.commit.pipeline;
        while let Some(first) = rx.blocking_recv() {
            let mut state = lock(&self.shared.core);
            // Other callers of the core first; room in the open batch, or for a new one (with
            // the pipeline: none open; without: nothing in flight).
            let writing_max = usize::from(pipeline);
            loop {
                let room = match &state.open {
                    Some(open) => open.batch.len() < batch_max,
                    None => state.in_flight <= writing_max,
                };
                if room && state.waiting == 0 {
                    break;
                }
                state.preparer_waiting = true;
                state = wait(&self.shared.core_changed, state);
            }
            state.preparer_waiting = false;
            let state = &mut *state;
            let open = match &mut state.open {
                Some(open) => open,
                None => {
                    state.in_flight += 1;
                    state.open.insert(Committing {
                        batch: state.core.new_deposit_batch(),
                        waiters: Vec::new(),
                        mailboxes: Vec::new(),
                    })
                }
            };
            // Everything queued meanwhile joins, up to the batch's room.
            let room = batch_max.saturating_sub(open.batch.len());
            let mut jobs = vec![first];
            while jobs.len() < room {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let mut incoming = Vec::with_capacity(jobs.len());
            for job in jobs {
                open.mailboxes.push(match &job.incoming {
                    Incoming::Deposit(e) => e.outer.mailbox_id,
                    Incoming::SurbReply { mailbox_id, .. } => *mailbox_id,
                });
                incoming.push(job.incoming);
                open.waiters.push(job.done);
            }
            state.core.extend_deposits(now(), &mut open.batch, incoming);
            // The writer may be waiting for a batch.
            if state.writer_waiting {
                self.shared.core_changed.notify_all();
            }
        }
    }

    /// The group commit's second stage (thread `mailbox-write`): takes the open batch as soon
    /// as there is one, writes it (one synced write, without the core's lock), finishes it
    /// under the lock, and answers its depositors: a deposit is acknowledged only after the
    /// synced write that holds it.
    fn write_loop(&self) {
        loop {
            let Committing {
                mut batch,
                waiters,
                mailboxes,
            } = {
                let mut state = lock(&self.shared.core);
                let taken = loop {
                    if let Some(open) = state.open.take() {
                        break open;
                    }
                    state.writer_waiting = true;
                    state = wait(&self.shared.core_changed, state);
                };
                state.writer_waiting = false;
                // The preparer may be waiting for room.
                if state.preparer_waiting {
                    self.shared.core_changed.notify_all();
                }
                taken
            };
            let metrics = &self.shared.metrics;
            metrics.commit_batches.fetch_add(1, Ordering::Relaxed);
            metrics
                .commit_batched
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let ops = batch.take_ops();
            let written = if ops.is_empty() {
                Ok(())
            } else {
                self.shared.store.write(ops, true)
            };
            let results = {
                let mut state = lock(&self.shared.core);
                let results = state.core.finish_deposits(now(), batch, written);
                self.drain_outputs(&mut state.core);
                state.in_flight = state.in_flight.saturating_sub(1);
                if state.waiting > 0 || state.preparer_waiting {
                    self.shared.core_changed.notify_all();
                }
                results
            };
            let mut stored = false;
            tracing::debug!(batch = waiters.len(), "group commit");
            for ((result, waiter), mailbox) in results.into_iter().zip(waiters).zip(mailboxes) {
                match &result {
                    Ok(r) if r.duplicate => {
                        metrics.deposits_duplicate.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        stored = true;
                        metrics.deposits_stored.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        metrics.deposits_refused.fetch_add(1, Ordering::Relaxed);
                        let tag = crate::pii::Tag::of(mailbox.as_bytes());
                        tracing::debug!(mailbox = %tag, reason = e.kind(), "deposit refused");
                        if !e.is_caller_error() {
                            tracing::error!(error = %e, "deposit write failed");
                        }
                    }
                }
                let _ = waiter.send(result);
            }
            if stored {
                self.shared.new_messages.notify_waiters();
            }
        }
    }

    async fn sweep_loop(&self) {
        loop {
            let wait = {
                let due = lock(&self.shared.timers).poll_timeout();
                let (unused, replica) = {
                    let core = self.core();
                    (core.next_unused_deadline(), core.replica_timeout())
                };
                let next = [due, unused, replica].into_iter().flatten().min();
                match next {
                    Some(at) => Duration::from_millis(at.0.saturating_sub(now().0).min(60_000)),
                    None => Duration::from_secs(60),
                }
            };
            tokio::select! {
                biased;
                () = self.shared.sweeper_wake.notified() => continue,
                () = tokio::time::sleep(wait) => {}
            }
            // Sweeps write (synced) under the core lock: off the runtime's workers.
            let node = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                node.run_due_sweeps();
                node.erase_unused();
                node.replica_tick();
                node.compact_erased();
            })
            .await;
        }
    }

    /// Replication timers: held receipts that timed out, anti-entropy rounds.
    fn replica_tick(&self) {
        let mut core = self.core();
        if let Err(e) = core.tick(now()) {
            tracing::error!(error = %e, "replica tick failed");
        }
        self.drain_outputs(&mut core);
    }

    /// Erases the mailboxes left unused past their grace period.
    fn erase_unused(&self) {
        let result = self.core().erase_unused(now());
        match result {
            Ok(0) => {}
            Ok(n) => {
                self.shared
                    .metrics
                    .unused_erased
                    .fetch_add(n as u64, Ordering::Relaxed);
                tracing::info!(erased = n, "unused mailboxes erased");
            }
            Err(e) => tracing::error!(error = %e, "erasing unused mailboxes failed"),
        }
    }

    /// Compacts the key ranges of the mailboxes erased since the last pass (at most one pass
    /// per sweeper wake-up, so at most one a minute on a busy node; the core lock is not held
    /// while RocksDB compacts), so that their keys and clear expiry times leave the files.
    fn compact_erased(&self) {
        let ranges = self.core().take_compaction();
        if ranges.is_empty() {
            return;
        }
        match crate::rocks::compact_ranges(&self.shared.db, &ranges) {
            Ok(()) => tracing::debug!(ranges = ranges.len(), "erased mailboxes compacted"),
            Err(e) => tracing::warn!(error = %e, "compacting erased mailboxes failed"),
        }
    }

    /// Wakes the sweeper so that it recomputes its next wake-up (after a creation).
    pub(crate) fn wake_sweeper(&self) {
        self.shared.sweeper_wake.notify_one();
    }

    /// Runs every expiry sweep that is due.
    fn run_due_sweeps(&self) {
        let fired = match lock(&self.shared.timers).poll_due(now(), 64) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "timer queue poll failed");
                return;
            }
        };
        for task in fired {
            let result = {
                let mut core = self.core();
                let mut total = 0usize;
                let result = loop {
                    match core.sweep_expired(now()) {
                        Ok(n) => {
                            total += n;
                            if n < core.config().sweep_batch_max {
                                break Ok(total);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                self.drain_outputs(&mut core);
                result
            };
            let mut timers = lock(&self.shared.timers);
            match result {
                Ok(n) => {
                    self.shared
                        .metrics
                        .swept
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!(deleted = n, "expiry sweep");
                    }
                    if let Err(e) = timers.complete(&task.id) {
                        tracing::warn!(error = %e, "cannot complete a sweep task");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiry sweep failed");
                    let _ = timers.fail(now(), &task.id);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The group-commit pipeline on a real store: every deposit is sent by three tasks at
    /// once (a sender's retransmissions racing each other across batches, some prepared while
    /// the previous batch's write is in flight), while the owner's calls (here an erasure of
    /// one mailbox, and reads) go through the core meanwhile. Each deposit is stored once
    /// and every copy gets the same answer; each mailbox's numbers run 1..n with no gap or
    /// reuse; the erased mailbox leaves no entry behind (no batch wrote around the erasure).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_deposits_racing_their_redeliveries_are_stored_once_and_numbered_in_order() {
        use crate::store::{Cf, MailboxStore};
        use std::collections::BTreeMap;
        use std::ops::ControlFlow;
        use whispr_protocol::DedupId;

        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::with_data_dir(dir.path().join("data"));
        config.rng_seed = Some(5);
        config.limits.deposits_per_min = 1_000_000;
        config.commit.batch_max = 16;
        let node = MailboxNode::open(config, Arc::new(NoMesh::default())).unwrap();
        let owners: Vec<crate::testkit::Owner> = (0..4)
            .map(|i| crate::testkit::Owner::from_seed(100 + i))
            .collect();
        for owner in &owners {
            node.create_mailbox(owner.create_request(3_600_000))
                .unwrap();
        }
        let mut rng = StdRng::seed_from_u64(9);
        let per_mailbox = 60u8;
        let mut tasks = Vec::new();
        for n in 0..per_mailbox {
            for (m, owner) in owners.iter().enumerate() {
                let dedup = DedupId([n, m as u8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
                let envelope = owner.envelope(&mut rng, dedup, None, None, b"hi").unwrap();
                for _ in 0..3 {
                    let node = node.clone();
                    let envelope = envelope.clone();
                    tasks.push(tokio::spawn(async move {
                        (m, dedup, node.deposit(Incoming::Deposit(envelope)).await)
                    }));
                }
            }
            if n == per_mailbox / 2 {
                // The last mailbox is erased while deposits flow.
                let id = owners[3].mailbox_id;
                node.with_core(move |core| core.erase(&id))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        let mut answers: BTreeMap<(usize, DedupId), Vec<DepositReceipt>> = BTreeMap::new();
        for task in tasks {
            let (m, dedup, result) = task.await.unwrap();
            match result {
                Ok(receipt) => answers.entry((m, dedup)).or_default().push(receipt),
                Err(MailboxError::UnknownMailbox) if m == 3 => {}
                Err(e) => panic!("deposit refused: {e}"),
            }
        }
        let mut numbers: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for ((m, _), receipts) in &answers {
            let first: Vec<&DepositReceipt> = receipts.iter().filter(|r| !r.duplicate).collect();
            assert_eq!(first.len(), 1, "stored {} times", first.len());
            for r in receipts {
                assert_eq!((r.seq, r.expires_at), (first[0].seq, first[0].expires_at));
            }
            numbers.entry(*m).or_default().push(first[0].seq);
        }
        for m in 0..3 {
            let mut seqs = numbers.remove(&m).unwrap();
            seqs.sort_unstable();
            let expected: Vec<u64> = (1..=u64::from(per_mailbox)).collect();
            assert_eq!(seqs, expected, "mailbox {m}");
            let last = node
                .with_core(move |core| {
                    core.info(&crate::testkit::Owner::from_seed(100 + m as u64).mailbox_id)
                })
                .await
                .unwrap()
                .unwrap()
                .last_seq;
            assert_eq!(last, u64::from(per_mailbox));
        }
        // Only the three live mailboxes' entries are stored.
        let store = node.shared.store.clone();
        let count = |cf: Cf| {
            let mut n = 0usize;
            store
                .scan(cf, &[0u8], &[0xffu8; 40], &mut |_, _| {
                    n += 1;
                    ControlFlow::Continue(())
                })
                .unwrap();
            n
        };
        let live = 3 * usize::from(per_mailbox);
        assert_eq!(count(Cf::Envelopes), live);
        assert_eq!(count(Cf::Dedup), live);
        assert_eq!(count(Cf::Expiry), live);
        assert_eq!(count(Cf::Bodies), live);
        let metrics = node.metrics();
        assert_eq!(
            metrics.deposits_stored.load(Ordering::Relaxed) as usize,
            live + numbers.get(&3).map_or(0, Vec::len)
        );
    }

    /// Security review, finding 13: with `rng_seed` set, the master key, session tokens and
    /// AEAD nonces replay the same stream at every start (nonce reuse under the same data
    /// keys, predictable tokens). A config file cannot set it; only tests and the simulator,
    /// in code, can.
    #[test]
    fn a_config_file_cannot_make_the_node_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailbox.toml");
        let data = dir.path().join("data");
        std::fs::write(
            &path,
            format!("data_dir = \"{}\"\nrng_seed = 7\n", data.display()),
        )
        .unwrap();
        let err = match NodeConfig::load(&path) {
            Ok(_) => panic!("a config file set rng_seed"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("rng_seed"), "{err}");
        std::fs::write(&path, format!("data_dir = \"{}\"\n", data.display())).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().rng_seed, None);
    }
}
