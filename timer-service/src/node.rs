//! The timer node: configuration, the worker loop that fires tasks, and the admin HTTP API.
//!
//! This is the tokio/axum driver around [`TimerQueue`]: it reads the clock, runs handlers
//! with the execution timeout, and translates HTTP calls into queue operations, auditing
//! every administrative call.
//!
//! The mesh layer hands it what clients send to the timer service through the mesh:
//! [`TimerNode::accept_hold_part`] for the parts of a held packet (joined by a
//! [`HoldAssembler`], then stored as a deferred send whose task id is the hold id) and
//! [`TimerNode::cancel_hold`] for cancel requests. These come from anonymous clients, not
//! from an operator, so they are not written to the audit log (which records administrative
//! actions only, and must not become a record of which hold arrived or was cancelled when);
//! no hold id, capability or packet byte is logged either.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use whispr_node_kit::clock::now;
use whispr_protocol::payload::HeldPacketPart;
use whispr_protocol::sphinx::Surb;
use whispr_protocol::timer_api::{self, BackupBody, CategoryBody, FiredQuery, TaskBody};
use whispr_protocol::{CancelCapability, HoldId, UnixTime};

use crate::audit::{AuditAction, AuditLog};
use crate::backup::{BackupConfig, BackupError, BackupReport, BackupSource};
use crate::config::QueueConfig;
use crate::deferred::{DeferredSend, PacketInjector, release_task};
use crate::error::TimerError;
use crate::holds::{HoldAssembler, HoldConfig, HoldError, PartOutcome, check_part};
use crate::metrics::MeshMetrics;
use crate::queue::{CategoryStats, FailOutcome, ScheduleOutcome, TimerQueue};
use crate::rocks::{RocksOptions, RocksStore};
use crate::task::{Category, FiredTask, NewTask, TaskId};

const AUDIT_ANCHOR_KEY: &str = "audit_anchor";
const ACTOR: &str = "admin-api";
/// Payload prefix of the task that stands for a cancelled hold until its release time has
/// passed (plus the late window), so that a retransmitted part cannot bring it back: a
/// deferred-send task under the hold's id (a maintenance task in stores written before
/// security review finding 14 was fixed; those are still honoured).
const HOLD_TOMBSTONE: &[u8] = b"hold-tombstone:";

fn tombstone_hash(payload: &[u8]) -> Option<[u8; 32]> {
    payload
        .strip_prefix(HOLD_TOMBSTONE)
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
}
/// Fire-lag histogram bucket bounds, in milliseconds.
const LAG_BUCKETS_MS: [u64; 10] = [10, 50, 100, 250, 500, 1000, 5000, 30_000, 60_000, 300_000];

/// The timer node's TOML configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory of the RocksDB store (`db/`) and the audit log (`audit.jsonl`).
    pub data_dir: PathBuf,
    /// The admin API.
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Queue limits.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Worker loop.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Held packets received through the mesh.
    #[serde(default)]
    pub holds: HoldConfig,
    /// Joining the mesh (held packets arrive through it and are injected into it). Without
    /// this section deferred sends fail and end in quarantine.
    #[serde(default)]
    pub mesh: Option<whispr_relay::config::MeshConfig>,
    /// Scheduled backups (off by default; `docs/operators.md`, "Backups and restore").
    #[serde(default)]
    pub backup: BackupConfig,
}

/// `[admin]`: the admin HTTP API.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address. Default `127.0.0.1:7300`.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token for `/v1/admin/*` (at least 32 characters). Keep the file 0600.
    pub token: String,
    /// Allow a non-loopback listen address (the API has no TLS: put it behind one).
    #[serde(default)]
    pub allow_non_loopback: bool,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("allow_non_loopback", &self.allow_non_loopback)
            .finish_non_exhaustive()
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7300))
}

/// Shared by every node kind (`whispr-node-kit`): the `[log]` table and config errors naming
/// the key to fix.
pub use whispr_node_kit::{ConfigError, LogConfig};

/// `[worker]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Longest sleep of the worker loop between polls (it also wakes on every change).
    pub idle_poll_ms: u64,
    /// Recently fired tasks kept for `GET /v1/admin/fired`.
    pub fired_log_max: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            idle_poll_ms: 1000,
            fired_log_max: 1000,
        }
    }
}

impl NodeConfig {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = whispr_node_kit::config::load_toml(path)?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that TOML types cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, problem: &str| {
            Err(ConfigError {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if self.admin.token.len() < 32 {
            return fail("admin.token", "must be at least 32 characters");
        }
        if !self.admin.listen.ip().is_loopback() && !self.admin.allow_non_loopback {
            return fail(
                "admin.listen",
                "not a loopback address; set admin.allow_non_loopback = true to allow it",
            );
        }
        if self.queue.concurrency_max == 0 {
            return fail("queue.concurrency_max", "must be at least 1");
        }
        if self.queue.attempts_max == 0 {
            return fail("queue.attempts_max", "must be at least 1");
        }
        if self.worker.idle_poll_ms == 0 {
            return fail("worker.idle_poll_ms", "must be at least 1");
        }
        if self.holds.partial_ttl_secs == 0 {
            return fail("holds.partial_ttl_secs", "must be at least 1");
        }
        if self.holds.deliveries_in_flight_max == 0 {
            return fail("holds.deliveries_in_flight_max", "must be at least 1");
        }
        if let Some(mesh) = &self.mesh {
            mesh.check_destination()?;
        }
        self.backup.check()
    }
}

/// The audit log's file name in the data directory (and next to each backup).
pub const AUDIT_FILE: &str = "audit.jsonl";

/// A fired task's outcome, kept for `GET /v1/admin/fired`.
#[derive(Clone, Debug, Serialize)]
pub struct FiredRecord {
    /// Task id (hex).
    pub task: String,
    /// Category name.
    pub category: &'static str,
    /// When it was due (Unix ms).
    pub due_at_ms: u64,
    /// When it fired (Unix ms).
    pub fired_at_ms: u64,
    /// "completed", "retry" or "quarantined".
    pub outcome: &'static str,
}

#[derive(Default)]
struct CategoryMetrics {
    fired: AtomicU64,
    failed: AtomicU64,
    quarantined: AtomicU64,
    lag_buckets: [AtomicU64; LAG_BUCKETS_MS.len()],
    lag_count: AtomicU64,
    lag_sum_ms: AtomicU64,
}

#[derive(Default)]
struct Metrics {
    per_category: [CategoryMetrics; 3],
    auth_failures: AtomicU64,
}

fn category_index(c: Category) -> usize {
    Category::ALL.iter().position(|x| *x == c).unwrap_or(0)
}

impl Metrics {
    fn category(&self, c: Category) -> &CategoryMetrics {
        let i = category_index(c);
        self.per_category.get(i).unwrap_or(&self.per_category[0])
    }
}

struct NodeState {
    queue: TimerQueue<RocksStore, StdRng>,
    holds: HoldAssembler,
    audit: AuditLog,
    audit_path: PathBuf,
    fired: VecDeque<FiredRecord>,
}

struct Shared {
    config: NodeConfig,
    state: Mutex<NodeState>,
    wake: Notify,
    injector: Arc<dyn PacketInjector>,
    metrics: Metrics,
    healthy: AtomicBool,
    /// The embedded mesh, once joined.
    mesh: std::sync::OnceLock<(whispr_relay::mesh::MeshHandle, Arc<MeshMetrics>)>,
    /// Online backups of the store.
    backup: BackupSource,
}

/// A running timer node.
#[derive(Clone)]
pub struct TimerNode {
    shared: Arc<Shared>,
}

/// What [`TimerNode::accept_hold_part`] did with a part. For `Scheduled` and
/// `AlreadyScheduled` the mesh layer answers `Reply::HoldAck { hold_id, cancelled: false }`
/// through each of `ack_surbs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The part is held; other parts of its hold are still missing (no acknowledgement yet).
    Incomplete,
    /// It completed its hold, which is now on disk, to be injected at its release time.
    Scheduled {
        /// The hold.
        hold_id: HoldId,
        /// The ack SURBs of all its parts.
        ack_surbs: Vec<Surb>,
    },
    /// The hold was cancelled: a late retransmission of one of its parts, refused (the mesh
    /// layer answers `Reply::HoldAck { cancelled: true }`).
    Cancelled {
        /// The hold.
        hold_id: HoldId,
        /// The ack SURB of this part, if it had one.
        ack_surbs: Vec<Surb>,
    },
    /// The hold is stored already (a retransmission): nothing changed.
    AlreadyScheduled {
        /// The hold.
        hold_id: HoldId,
        /// The ack SURB of this part, if it had one.
        ack_surbs: Vec<Surb>,
    },
}

/// What [`TimerNode::cancel_hold`] did. In both cases the mesh layer answers
/// `Reply::HoldAck { hold_id, cancelled: true }` through the request's ack SURB.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The scheduled hold was removed from the store; it will not be injected.
    Cancelled {
        /// The hold.
        hold_id: HoldId,
    },
    /// The hold was still being assembled: its parts were dropped.
    PartialDiscarded {
        /// The hold.
        hold_id: HoldId,
    },
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage or audit log failure.
    #[error(transparent)]
    Timer(#[from] TimerError),
    /// The audit log on disk is behind its anchor or does not verify.
    #[error("audit log does not verify against its anchor: {0}")]
    AuditTampered(String),
}

fn encode_anchor(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(hash);
    v
}

fn decode_anchor(bytes: &[u8]) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*seq), <[u8; 32]>::try_from(hash).ok()?))
}

impl TimerNode {
    /// Opens the store and the audit log under `config.data_dir` (creating them on first
    /// start) and checks the audit log against the anchor kept in the store.
    pub fn open(
        config: NodeConfig,
        injector: Arc<dyn PacketInjector>,
    ) -> Result<TimerNode, StartError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| TimerError::Storage(format!("cannot create data_dir: {e}")))?;
        let store = RocksStore::open(&config.data_dir.join("db"), RocksOptions::default())?;
        let backup = BackupSource::new(store.shared_db(), "timer");
        let rng = match config.queue.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let mut queue = TimerQueue::open(config.queue.clone(), store, rng)?;
        let audit_path = config.data_dir.join(AUDIT_FILE);
        let anchor = queue.node_meta(AUDIT_ANCHOR_KEY).and_then(decode_anchor);
        // Refuses a log that does not verify, or that stops short of the anchor (lines removed
        // at the end): the node must not extend a tampered chain.
        let audit = AuditLog::open_anchored(&audit_path, anchor)
            .map_err(|e| StartError::AuditTampered(e.to_string()))?;
        let (seq, hash) = audit.tip();
        if seq > 0 {
            queue.set_node_meta(AUDIT_ANCHOR_KEY, encode_anchor(seq, &hash))?;
        }
        let holds = HoldAssembler::new(config.holds.clone());
        Ok(TimerNode {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(NodeState {
                    queue,
                    holds,
                    audit,
                    audit_path,
                    fired: VecDeque::new(),
                }),
                wake: Notify::new(),
                injector,
                metrics: Metrics::default(),
                healthy: AtomicBool::new(true),
                mesh: std::sync::OnceLock::new(),
                backup,
            }),
        })
    }

    /// Takes an online backup of the store into `dir` (keeping `[backup] keep` backups there)
    /// with a copy of the audit log next to it, taken after the store's (so that it reaches
    /// at least the anchor the backed-up store holds) under the lock that appends to it.
    /// Blocks while RocksDB copies: call it from a blocking thread. The audit log is not
    /// written here: [`Self::backup_audited`] records an admin's backup.
    pub fn backup_to(&self, dir: &Path) -> Result<BackupReport, BackupError> {
        let keep = self.shared.config.backup.keep;
        let audit_path = self.shared.config.data_dir.join(AUDIT_FILE);
        self.shared.backup.backup(dir, keep, |report| {
            let _appends = self.lock();
            crate::backup::save_file(dir, report, AUDIT_FILE, &audit_path)
        })
    }

    /// [`Self::backup_to`] for an admin: the call is written to the audit log first.
    pub fn backup_audited(&self, dir: &Path) -> Result<BackupReport, ApiError> {
        {
            let mut state = self.lock();
            self.audit(&mut state, AuditAction::Backup, None, None, None)?;
        }
        self.backup_to(dir).map_err(ApiError::from)
    }

    /// Starts the `[backup]` schedule, if `backup.dir` is set (call inside a tokio runtime).
    pub fn spawn_scheduled_backups(&self) -> Option<tokio::task::JoinHandle<()>> {
        let dir = self.shared.config.backup.dir.clone()?;
        let node = self.clone();
        Some(crate::backup::spawn_scheduled(
            self.shared.config.backup.interval(),
            move || node.backup_to(&dir),
        ))
    }

    /// Backup counters, for `/metrics`.
    pub fn backup_metrics(&self) -> &crate::backup::BackupMetrics {
        self.shared.backup.metrics()
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding the lock would be a bug; the state itself stays consistent
        // because every queue operation is all-or-nothing.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts a deferred send (called by the mesh layer): the packet is injected at
    /// `release_at`. Returns once the task is on disk.
    pub fn accept_deferred_send(
        &self,
        release_at: UnixTime,
        send: &DeferredSend,
        owner: Option<String>,
    ) -> Result<TaskId, TimerError> {
        let id = self.lock().queue.schedule(
            now(),
            crate::task::NewTask {
                category: Category::DeferredSend,
                priority: 5,
                due_at: release_at,
                payload: send.encode(),
                owner,
            },
        )?;
        self.shared.wake.notify_one();
        Ok(id)
    }

    /// Verifies the audit log against the anchor kept in the store.
    pub fn verify_audit(&self) -> Result<crate::audit::VerifyReport, TimerError> {
        let state = self.lock();
        let anchor = state
            .queue
            .node_meta(AUDIT_ANCHOR_KEY)
            .and_then(decode_anchor);
        crate::audit::verify(&state.audit_path, anchor)
    }

    /// Cancels a task, whatever its category, without any capability check: for the node's
    /// own use. Cancel requests from the mesh go through [`Self::cancel_hold`].
    pub fn cancel(&self, id: &TaskId) -> Result<(), TimerError> {
        self.lock().queue.cancel(id)
    }

    /// Takes one part of a held packet (called by the mesh layer for
    /// `FinalMessage::Hold`). When the part completes its hold (see [`crate::holds`] for the
    /// rules), the packet is stored as a deferred send with the hold id as task id, due at the
    /// hold's release time, before this returns. A part of a hold that is stored already (a
    /// retransmission) gives [`HoldOutcome::AlreadyScheduled`] and changes nothing, provided it
    /// agrees with the stored hold (first hop and cancel hash); otherwise
    /// [`HoldError::Mismatch`].
    ///
    /// Errors: [`TimerError::Hold`] for a refused part (out of range, disagreeing, duplicate,
    /// wrong total length, release time beyond `holds.release_ahead_max_ms` or more than
    /// `holds.release_late_max_ms` past, too many partial holds), the queue's own refusals
    /// (e.g. [`TimerError::QueueFull`]) and storage failures. A hold whose scheduling fails is
    /// dropped (the client retransmits it, having had no acknowledgement).
    pub fn accept_hold_part(&self, part: HeldPacketPart) -> Result<HoldOutcome, TimerError> {
        check_part(&part)?;
        let at = now();
        let hold_id = part.hold_id;
        let id = TaskId(hold_id.0);
        let mut state = self.lock();
        if let Some(meta) = state.queue.task(&id) {
            let category = meta.category;
            let payload = state.queue.payload(&id)?;
            // A cancelled hold's tombstone (in its own place since finding 14 of the security
            // review; in the maintenance queue before).
            if let Some(hash) = tombstone_hash(&payload) {
                if hash != part.cancel_hash {
                    return Err(HoldError::Mismatch.into());
                }
                return Ok(HoldOutcome::Cancelled {
                    hold_id,
                    ack_surbs: part.ack_surb.into_iter().collect(),
                });
            }
            if category != Category::DeferredSend {
                return Err(HoldError::Mismatch.into());
            }
            let stored = DeferredSend::decode(&payload)?;
            if stored.first_hop != part.first_hop || stored.cancel_hash != part.cancel_hash {
                return Err(HoldError::Mismatch.into());
            }
            return Ok(HoldOutcome::AlreadyScheduled {
                hold_id,
                ack_surbs: part.ack_surb.into_iter().collect(),
            });
        }
        let mut hold = match state.holds.accept(at, part)? {
            PartOutcome::Incomplete => return Ok(HoldOutcome::Incomplete),
            PartOutcome::Complete(hold) => hold,
        };
        let held_max = self.shared.config.holds.held_max;
        if state.queue.count(Category::DeferredSend) >= held_max {
            return Err(TimerError::HoldsFull { max: held_max });
        }
        let ack_surbs = std::mem::take(&mut hold.ack_surbs);
        let (task_id, task) = release_task(hold);
        let outcome = state.queue.schedule_with_id(at, task_id, task)?;
        drop(state);
        Ok(match outcome {
            ScheduleOutcome::Scheduled => {
                self.shared.wake.notify_one();
                HoldOutcome::Scheduled { hold_id, ack_surbs }
            }
            ScheduleOutcome::AlreadyScheduled => {
                HoldOutcome::AlreadyScheduled { hold_id, ack_surbs }
            }
        })
    }

    /// The `[holds]` limits in force.
    pub fn hold_config(&self) -> &HoldConfig {
        &self.shared.config.holds
    }

    /// Records the mesh this node joined: its metrics and health join the admin API's.
    /// Only the first call counts.
    pub fn attach_mesh(&self, mesh: whispr_relay::mesh::MeshHandle, metrics: Arc<MeshMetrics>) {
        let _ = self.shared.mesh.set((mesh, metrics));
    }

    /// Cancels a held packet (called by the mesh layer for `FinalMessage::Cancel`) if
    /// SHA-256(`capability`) equals its cancel hash (compared in constant time). Before this
    /// returns, the hold's tombstone is on disk, due at its release time plus
    /// `holds.release_late_max_ms`: until then a part of the hold (a late retransmission, or a
    /// replay) is answered "cancelled" and cannot rebuild it. A stored hold is replaced by its
    /// tombstone in one write (which needs no room of its own); a hold still being assembled
    /// loses its parts once its tombstone is stored. A cancel sent again is acknowledged again.
    ///
    /// Errors, all changing nothing: [`TimerError::NotFound`] when no hold `hold_id` is
    /// stored or being assembled (never received, or fired already);
    /// [`TimerError::BadCapability`] when the capability does not match;
    /// [`TimerError::WrongState`] when the hold is being injected at this moment (it may have
    /// left already; if injecting it fails, it can be cancelled again before its retry);
    /// [`TimerError::HoldsFull`] (or the queue's [`TimerError::QueueFull`]) when a hold being
    /// assembled has no room for its tombstone (the sender retries the cancel).
    pub fn cancel_hold(
        &self,
        hold_id: HoldId,
        capability: &CancelCapability,
    ) -> Result<CancelOutcome, TimerError> {
        let presented = Sha256::digest(capability.as_bytes());
        let matches =
            |cancel_hash: &[u8; 32]| bool::from(cancel_hash.as_slice().ct_eq(presented.as_slice()));
        let id = TaskId(hold_id.0);
        let late = Duration::from_millis(self.shared.config.holds.release_late_max_ms);
        let at = now();
        let mut state = self.lock();
        let tombstone = |cancel_hash: &[u8; 32], release_at: UnixTime| {
            let mut payload = HOLD_TOMBSTONE.to_vec();
            payload.extend_from_slice(cancel_hash);
            NewTask {
                category: Category::DeferredSend,
                priority: 0,
                due_at: UnixTime(release_at.saturating_add(late).0.max(at.0)),
                payload,
                owner: None,
            }
        };
        match state.queue.task(&id) {
            Some(meta) => {
                let (category, due_at) = (meta.category, meta.due_at);
                let payload = state.queue.payload(&id)?;
                if let Some(hash) = tombstone_hash(&payload) {
                    // A cancel sent again: acknowledged again if it holds the capability.
                    return if matches(&hash) {
                        Ok(CancelOutcome::Cancelled { hold_id })
                    } else {
                        Err(TimerError::BadCapability)
                    };
                }
                if category != Category::DeferredSend {
                    return Err(TimerError::NotFound);
                }
                let stored = DeferredSend::decode(&payload)?;
                if !matches(&stored.cancel_hash) {
                    return Err(TimerError::BadCapability);
                }
                if state.queue.is_running(&id) {
                    return Err(TimerError::WrongState("being injected"));
                }
                // `due_at` is the release time, or a later retry: either way no part of the
                // hold is accepted after it plus the late window.
                state
                    .queue
                    .replace(at, &id, tombstone(&stored.cancel_hash, due_at))?;
                drop(state);
                self.shared.wake.notify_one();
                Ok(CancelOutcome::Cancelled { hold_id })
            }
            None => {
                let (Some(cancel_hash), Some(release_at)) = (
                    state.holds.cancel_hash(&hold_id).copied(),
                    state.holds.release_at(&hold_id),
                ) else {
                    return Err(TimerError::NotFound);
                };
                if !matches(&cancel_hash) {
                    return Err(TimerError::BadCapability);
                }
                let held_max = self.shared.config.holds.held_max;
                if state.queue.count(Category::DeferredSend) >= held_max {
                    return Err(TimerError::HoldsFull { max: held_max });
                }
                state
                    .queue
                    .schedule_with_id(at, id, tombstone(&cancel_hash, release_at))?;
                state.holds.discard(&hold_id);
                drop(state);
                self.shared.wake.notify_one();
                Ok(CancelOutcome::PartialDiscarded { hold_id })
            }
        }
    }

    /// Runs the worker loop until `shutdown` resolves.
    pub async fn run_worker(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let at = now();
            let polled = {
                let mut state = self.lock();
                state
                    .queue
                    .poll_due(at, usize::MAX)
                    .map(|fired| (fired, state.queue.poll_timeout()))
            };
            let wait = match polled {
                Ok((fired, timeout)) => {
                    self.shared.healthy.store(true, Ordering::Relaxed);
                    for task in fired {
                        let node = self.clone();
                        tokio::spawn(async move { node.execute(task).await });
                    }
                    timeout.map_or(Duration::MAX, |t| t.saturating_since(at))
                }
                Err(e) => {
                    self.shared.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(error = %e, "polling the queue failed");
                    Duration::from_secs(1)
                }
            };
            let wait = wait.min(Duration::from_millis(
                self.shared.config.worker.idle_poll_ms,
            ));
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn execute(&self, task: FiredTask) {
        let started = now();
        let lag_ms = started.0.saturating_sub(task.due_at.0);
        let metrics = self.shared.metrics.category(task.category);
        metrics.fired.fetch_add(1, Ordering::Relaxed);
        metrics.lag_count.fetch_add(1, Ordering::Relaxed);
        metrics.lag_sum_ms.fetch_add(lag_ms, Ordering::Relaxed);
        for (bound, bucket) in LAG_BUCKETS_MS.iter().zip(metrics.lag_buckets.iter()) {
            if lag_ms <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (id, category, due_at) = (task.id, task.category, task.due_at);
        let injector = Arc::clone(&self.shared.injector);
        let handler = tokio::task::spawn_blocking(move || handle(injector.as_ref(), task));
        let timeout = self.shared.config.queue.execution_timeout();
        let ok = matches!(tokio::time::timeout(timeout, handler).await, Ok(Ok(Ok(()))));
        let finished = now();
        let outcome = {
            let mut state = self.lock();
            let result = if ok {
                // The removal reaches the disk on the store's writer thread: no fsync
                // under the lock the worker loop polls with (a crash before it lands fires
                // the task again, which handlers allow).
                state.queue.complete_deferred(&id).map(|()| "completed")
            } else {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                state.queue.fail(finished, &id).map(|o| match o {
                    FailOutcome::Retry(_) => "retry",
                    FailOutcome::Quarantined => {
                        metrics.quarantined.fetch_add(1, Ordering::Relaxed);
                        "quarantined"
                    }
                })
            };
            match result {
                Ok(outcome) => {
                    if state.fired.len() >= self.shared.config.worker.fired_log_max {
                        state.fired.pop_front();
                    }
                    if self.shared.config.worker.fired_log_max > 0 {
                        state.fired.push_back(FiredRecord {
                            task: id.to_string(),
                            category: category.name(),
                            due_at_ms: due_at.0,
                            fired_at_ms: started.0,
                            outcome,
                        });
                    }
                    outcome
                }
                Err(e) => {
                    tracing::warn!(error = %e, category = category.name(), "could not record a task outcome");
                    "unrecorded"
                }
            }
        };
        tracing::debug!(category = category.name(), lag_ms, outcome, "task fired");
        self.shared.wake.notify_one();
    }

    /// The admin and metrics HTTP router.
    pub fn router(&self) -> Router {
        let admin = Router::new()
            .route("/queues", get(admin_queues))
            .route("/pause", post(admin_pause))
            .route("/resume", post(admin_resume))
            .route("/purge", post(admin_purge))
            .route("/quarantine", post(admin_quarantine))
            .route("/release", post(admin_release))
            .route("/audit/verify", get(admin_verify))
            .route("/backup", post(admin_backup))
            .route("/fired", get(admin_fired))
            .route("/openapi.json", get(admin_openapi));
        Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .nest("/v1/admin", admin)
            .with_state(self.clone())
    }

    fn audit(
        &self,
        state: &mut NodeState,
        action: AuditAction,
        category: Option<Category>,
        task: Option<TaskId>,
        count: Option<u64>,
    ) -> Result<(), TimerError> {
        state
            .audit
            .append(now(), ACTOR, action, category, task, count)?;
        let (seq, hash) = state.audit.tip();
        state
            .queue
            .set_node_meta(AUDIT_ANCHOR_KEY, encode_anchor(seq, &hash))
    }
}

/// Runs one fired task's handler (on a blocking thread).
fn handle(injector: &dyn PacketInjector, task: FiredTask) -> Result<(), String> {
    match task.category {
        // A cancelled hold's tombstone has served its time: nothing is sent.
        Category::DeferredSend if tombstone_hash(&task.payload).is_some() => Ok(()),
        Category::DeferredSend => {
            let send = DeferredSend::decode(&task.payload).map_err(|e| e.to_string())?;
            injector.inject(send)
        }
        // Maintenance tasks the timer node knows; anything else is refused (and ends in
        // quarantine after retries, where an admin can look at it).
        Category::Maintenance => match task.payload.as_slice() {
            b"noop" => Ok(()),
            // A cancelled hold's tombstone has served its time.
            p if tombstone_hash(p).is_some() => Ok(()),
            _ => Err("unknown maintenance action".into()),
        },
        Category::Expiry => Err("expiries are handled by mailbox nodes".into()),
    }
}

// ---- HTTP ------------------------------------------------------------------------------------

/// An API error: a status, a stable code and a message without user data.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<TimerError> for ApiError {
    fn from(e: TimerError) -> Self {
        let (status, code) = match &e {
            TimerError::UnknownCategory => (StatusCode::BAD_REQUEST, "unknown_category"),
            TimerError::BadTaskId => (StatusCode::BAD_REQUEST, "bad_task_id"),
            TimerError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            TimerError::WrongState(_) => (StatusCode::CONFLICT, "wrong_state"),
            TimerError::Poisoned => (StatusCode::SERVICE_UNAVAILABLE, "store_poisoned"),
            e if e.is_caller_error() => (StatusCode::BAD_REQUEST, "bad_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        let (status, code) = e.http_status();
        ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            e.to_string(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

/// A JSON body that must be an object (`whispr_protocol::timer_api::object_body`, which the
/// `timer_http` fuzz target runs): serde's derived structs also accept an array of their
/// fields in order (`[]` for a struct whose fields all have defaults: `POST pause` with `[]`
/// paused every category), which the API does not offer: 400 `malformed_json`.
fn json_object<T: serde::de::DeserializeOwned>(
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> Result<T, ApiError> {
    let axum::Json(value) = body?;
    timer_api::object_body(value)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

fn authorize(node: &TimerNode, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests so that the comparison is constant-time whatever the lengths.
    let expected = Sha256::digest(node.shared.config.admin.token.as_bytes());
    let got = Sha256::digest(presented.as_bytes());
    if bool::from(expected.ct_eq(&got)) {
        Ok(())
    } else {
        node.shared
            .metrics
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        ))
    }
}

async fn healthz(State(node): State<TimerNode>) -> impl IntoResponse {
    let mesh_ok = node
        .shared
        .mesh
        .get()
        .is_none_or(|(mesh, _)| mesh.is_healthy());
    if node.shared.healthy.load(Ordering::Relaxed) && mesh_ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store failing\n")
    }
}

#[derive(Serialize)]
struct Done {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
}

async fn admin_queues(
    State(node): State<TimerNode>,
    headers: HeaderMap,
) -> ApiResult<BTreeMap<&'static str, CategoryStats>> {
    authorize(&node, &headers)?;
    let mut state = node.lock();
    node.audit(&mut state, AuditAction::Stats, None, None, None)?;
    let stats = state.queue.stats(now());
    Ok(axum::Json(
        stats.into_iter().map(|(c, s)| (c.name(), s)).collect(),
    ))
}

fn pause_or_resume(
    node: &TimerNode,
    headers: &HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
    pause: bool,
) -> ApiResult<Done> {
    authorize(node, headers)?;
    let body: CategoryBody = json_object(body)?;
    let category = body.category.as_deref().map(Category::parse).transpose()?;
    let mut state = node.lock();
    if pause {
        state.queue.pause(category)?;
    } else {
        state.queue.resume(category)?;
    }
    let action = if pause {
        AuditAction::Pause
    } else {
        AuditAction::Resume
    };
    node.audit(&mut state, action, category, None, None)?;
    drop(state);
    node.shared.wake.notify_one();
    Ok(axum::Json(Done {
        ok: true,
        count: None,
    }))
}

async fn admin_pause(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Done> {
    pause_or_resume(&node, &headers, body, true)
}

async fn admin_resume(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Done> {
    pause_or_resume(&node, &headers, body, false)
}

async fn admin_purge(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Done> {
    authorize(&node, &headers)?;
    let body: CategoryBody = json_object(body)?;
    let name = body.category.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_category",
            "purge needs a category",
        )
    })?;
    let category = Category::parse(&name)?;
    let mut state = node.lock();
    let count = u64::try_from(state.queue.purge(category)?).unwrap_or(u64::MAX);
    node.audit(
        &mut state,
        AuditAction::Purge,
        Some(category),
        None,
        Some(count),
    )?;
    Ok(axum::Json(Done {
        ok: true,
        count: Some(count),
    }))
}

fn task_action(
    node: &TimerNode,
    headers: &HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
    quarantine: bool,
) -> ApiResult<Done> {
    authorize(node, headers)?;
    let body: TaskBody = json_object(body)?;
    let id = TaskId::parse(&body.task)?;
    let mut state = node.lock();
    let category = state.queue.task(&id).map(|m| m.category);
    if quarantine {
        state.queue.quarantine(&id)?;
    } else {
        state.queue.release(&id)?;
    }
    let action = if quarantine {
        AuditAction::Quarantine
    } else {
        AuditAction::Release
    };
    node.audit(&mut state, action, category, Some(id), None)?;
    drop(state);
    node.shared.wake.notify_one();
    Ok(axum::Json(Done {
        ok: true,
        count: None,
    }))
}

async fn admin_quarantine(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Done> {
    task_action(&node, &headers, body, true)
}

async fn admin_release(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Done> {
    task_action(&node, &headers, body, false)
}

/// `POST /v1/admin/backup`: an online backup into `to` (audited), on a blocking thread.
async fn admin_backup(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<BackupReport> {
    authorize(&node, &headers)?;
    let body: BackupBody = json_object(body)?;
    let report = tokio::task::spawn_blocking(move || node.backup_audited(&body.to))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backup_failed",
                "the backup task failed",
            )
        })??;
    Ok(axum::Json(report))
}

async fn admin_verify(
    State(node): State<TimerNode>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    let mut state = node.lock();
    node.audit(&mut state, AuditAction::Verify, None, None, None)?;
    let anchor = state
        .queue
        .node_meta(AUDIT_ANCHOR_KEY)
        .and_then(decode_anchor);
    let report = crate::audit::verify(&state.audit_path, anchor)?;
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    Ok((status, axum::Json(report)).into_response())
}

async fn admin_fired(
    State(node): State<TimerNode>,
    headers: HeaderMap,
    query: Result<Query<FiredQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<FiredRecord>> {
    authorize(&node, &headers)?;
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let mut state = node.lock();
    node.audit(&mut state, AuditAction::Fired, None, None, None)?;
    let limit = query.limit.unwrap_or(usize::MAX);
    let skip = state.fired.len().saturating_sub(limit);
    Ok(axum::Json(state.fired.iter().skip(skip).cloned().collect()))
}

/// `GET /v1/admin/openapi.json`: the API's OpenAPI document (no token: nothing secret in it).
async fn admin_openapi() -> axum::Json<serde_json::Value> {
    axum::Json(crate::openapi::openapi())
}

async fn metrics(State(node): State<TimerNode>) -> impl IntoResponse {
    use std::fmt::Write;
    let (stats, evicted, poisoned, sync_latency) = {
        let state = node.lock();
        let store = state.queue.store();
        (
            state.queue.stats(now()),
            state.holds.evicted_total(),
            store.is_poisoned(),
            store.sync_latency().render(
                "whispr_timer_sync_seconds",
                "Duration of the store's synced RocksDB writes (coarse buckets, no sum).",
            ),
        )
    };
    let m = &node.shared.metrics;
    let mut out = node.backup_metrics().render("whispr_timer");
    let _ = writeln!(
        out,
        "# HELP whispr_timer_tasks Tasks held, by category and state."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_tasks gauge");
    for (c, s) in &stats {
        for (state, n) in [
            ("scheduled", s.scheduled),
            ("due", s.due),
            ("running", s.running),
            ("quarantined", s.quarantined),
        ] {
            let _ = writeln!(
                out,
                "whispr_timer_tasks{{category=\"{}\",state=\"{state}\"}} {n}",
                c.name()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP whispr_timer_paused 1 when the category is paused."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_paused gauge");
    for (c, s) in &stats {
        let _ = writeln!(
            out,
            "whispr_timer_paused{{category=\"{}\"}} {}",
            c.name(),
            u8::from(s.paused)
        );
    }
    let _ = writeln!(out, "# HELP whispr_timer_fired_total Tasks fired.");
    let _ = writeln!(out, "# TYPE whispr_timer_fired_total counter");
    for c in Category::ALL {
        let _ = writeln!(
            out,
            "whispr_timer_fired_total{{category=\"{}\"}} {}",
            c.name(),
            m.category(c).fired.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP whispr_timer_failures_total Task executions that failed or timed out."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_failures_total counter");
    for c in Category::ALL {
        let _ = writeln!(
            out,
            "whispr_timer_failures_total{{category=\"{}\"}} {}",
            c.name(),
            m.category(c).failed.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP whispr_timer_fire_lag_ms Time from due to firing."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_fire_lag_ms histogram");
    for c in Category::ALL {
        let cm = m.category(c);
        for (bound, bucket) in LAG_BUCKETS_MS.iter().zip(cm.lag_buckets.iter()) {
            let _ = writeln!(
                out,
                "whispr_timer_fire_lag_ms_bucket{{category=\"{}\",le=\"{bound}\"}} {}",
                c.name(),
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = cm.lag_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "whispr_timer_fire_lag_ms_bucket{{category=\"{}\",le=\"+Inf\"}} {count}",
            c.name()
        );
        let _ = writeln!(
            out,
            "whispr_timer_fire_lag_ms_sum{{category=\"{}\"}} {}",
            c.name(),
            cm.lag_sum_ms.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "whispr_timer_fire_lag_ms_count{{category=\"{}\"}} {count}",
            c.name()
        );
    }
    let _ = writeln!(
        out,
        "# HELP whispr_timer_admin_auth_failures_total Admin calls refused for a missing or wrong token."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_admin_auth_failures_total counter");
    let _ = writeln!(
        out,
        "whispr_timer_admin_auth_failures_total {}",
        m.auth_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP whispr_timer_quarantined_total Tasks quarantined after failing queue.attempts_max times."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_quarantined_total counter");
    for c in Category::ALL {
        let _ = writeln!(
            out,
            "whispr_timer_quarantined_total{{category=\"{}\"}} {}",
            c.name(),
            m.category(c).quarantined.load(Ordering::Relaxed)
        );
    }
    let evicted = AtomicU64::new(evicted);
    out.push_str(&whispr_relay::http::prometheus_counters(
        "whispr_timer",
        &[(
            "partial_holds_evicted",
            "Partial holds dropped to make room for new ones (holds.partial_max).",
            &evicted,
        )],
    ));
    let _ = writeln!(
        out,
        "# HELP whispr_timer_store_poisoned 1 once a store write failed: every later write is refused until a restart."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_store_poisoned gauge");
    let _ = writeln!(out, "whispr_timer_store_poisoned {}", u8::from(poisoned));
    let _ = writeln!(
        out,
        "# HELP whispr_timer_queue_tasks_max Tasks one category may hold (queue.queue_tasks_max); more are refused."
    );
    let _ = writeln!(out, "# TYPE whispr_timer_queue_tasks_max gauge");
    let _ = writeln!(
        out,
        "whispr_timer_queue_tasks_max {}",
        node.shared.config.queue.queue_tasks_max
    );
    out.push_str(&sync_latency);
    if let Some((mesh, mesh_metrics)) = node.shared.mesh.get() {
        out.push_str(&mesh_metrics.render());
        out.push_str(&mesh.metrics_text());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    /// Security review, finding 13: `[queue] rng_seed` in a config file made task ids (and
    /// with them cancel handles) the same at every start. Only code (tests, the simulator)
    /// can set it.
    #[test]
    fn a_config_file_cannot_seed_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timer.toml");
        let base = format!(
            "data_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{}\"\n",
            dir.path().join("data").display(),
            "t".repeat(40)
        );
        std::fs::write(&path, format!("{base}\n[queue]\nrng_seed = 7\n")).unwrap();
        let err = match NodeConfig::load(&path) {
            Ok(_) => panic!("a config file set queue.rng_seed"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("rng_seed"), "{err}");
        std::fs::write(&path, &base).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().queue.rng_seed, None);
    }
}
