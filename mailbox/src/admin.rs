//! The mailbox node's admin API and its backups (`docs/operators.md`, "Backups and restore").
//!
//! The admin API has a listener of its own, `[admin] listen`, which must be a loopback
//! address, and one bearer token (`[admin] token`, compared in constant time). It has one
//! route: `POST /v1/admin/backup` with `{"to": "/absolute/dir"}` takes an online backup of
//! the mailbox store with RocksDB's `BackupEngine` inside the node (which holds the store's
//! lock, so no other process can open it), on a blocking thread, and answers with a
//! [`BackupReport`]. `whispr-mailbox backup --to DIR` calls it.
//!
//! What is backed up is the store `data_dir/db` only. Its values are sealed under per-mailbox
//! data keys wrapped under the master key, which is never written to the backup (nor are the
//! mesh keys). The expiry timers in `data_dir/timers` are not backed up: the core schedules
//! a sweep for every stored expiry when it loads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use whispr_timer_service::backup::{BackupError, BackupMetrics, BackupReport};

use crate::node::MailboxNode;

/// The backup kind named in a mailbox backup's manifest.
pub const BACKUP_KIND: &str = "mailbox";
/// The store's directory name in the data directory.
pub const STORE_DIR: &str = "db";
/// Entries of the data directory a restore replaces along with the store (rebuilt at start).
pub const RESTORE_REPLACES: [&str; 1] = ["timers"];

/// `[admin]`: the admin API (backups).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; must be a loopback address (plain HTTP).
    pub listen: SocketAddr,
    /// Bearer token for `/v1/admin/*` (at least 32 characters). Keep the config file 0600.
    pub token: String,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl AdminConfig {
    /// Checks the listen address and the token's length.
    pub fn check(&self) -> Result<(), whispr_node_kit::ConfigError> {
        let fail = |key: &str, problem: &str| {
            Err(whispr_node_kit::ConfigError {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if !self.listen.ip().is_loopback() {
            return fail("admin.listen", "must be a loopback address");
        }
        if self.token.len() < 32 {
            return fail("admin.token", "must be at least 32 characters");
        }
        Ok(())
    }
}

impl MailboxNode {
    /// Takes an online backup of the mailbox store into `dir` (an absolute path, created if
    /// missing), keeping `[backup] keep` backups there. Blocks while RocksDB copies: call it
    /// from a blocking thread. [`BackupError::Busy`] while another backup runs.
    pub fn backup_to(&self, dir: &Path) -> Result<BackupReport, BackupError> {
        self.shared
            .backup
            .backup(dir, self.shared.config.backup.keep, |_| Ok(()))
    }

    /// Starts the `[backup]` schedule, if `backup.dir` is set (call inside a tokio runtime).
    pub fn spawn_scheduled_backups(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.spawn_backups_every(self.shared.config.backup.interval())
    }

    /// [`Self::spawn_scheduled_backups`] every `interval` (tests: minutes are long).
    fn spawn_backups_every(
        &self,
        interval: std::time::Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let dir = self.shared.config.backup.dir.clone()?;
        let node = self.clone();
        Some(whispr_timer_service::backup::spawn_scheduled(
            interval,
            move || node.backup_to(&dir),
        ))
    }

    /// Backup counters, for `/metrics`.
    pub fn backup_metrics(&self) -> &BackupMetrics {
        self.shared.backup.metrics()
    }
}

/// An admin API error: a status, a stable code and a message without user data.
struct AdminError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

impl From<BackupError> for AdminError {
    fn from(e: BackupError) -> Self {
        let (status, code) = e.http_status();
        AdminError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: e.to_string(),
        }
    }
}

fn authorize(node: &MailboxNode, headers: &HeaderMap) -> Result<(), AdminError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = node
        .config()
        .admin
        .as_ref()
        .map(|a| Sha256::digest(a.token.as_bytes()));
    // Digests, so that the comparison is constant-time whatever the lengths.
    let got = Sha256::digest(presented.as_bytes());
    match expected {
        Some(expected) if bool::from(expected.ct_eq(&got)) => Ok(()),
        _ => Err(AdminError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token".into(),
        }),
    }
}

/// Body of `POST /v1/admin/backup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    to: PathBuf,
}

async fn backup(
    State(node): State<MailboxNode>,
    headers: HeaderMap,
    body: Result<axum::Json<BackupBody>, JsonRejection>,
) -> Result<axum::Json<BackupReport>, AdminError> {
    authorize(&node, &headers)?;
    let axum::Json(body) = body.map_err(|e| AdminError {
        status: StatusCode::BAD_REQUEST,
        code: "malformed_json",
        message: e.body_text(),
    })?;
    let report = tokio::task::spawn_blocking(move || node.backup_to(&body.to))
        .await
        .map_err(|_| AdminError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "backup_failed",
            message: "the backup task failed".into(),
        })??;
    Ok(axum::Json(report))
}

async fn not_found() -> AdminError {
    AdminError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such route".into(),
    }
}

/// The admin listener's routes.
pub fn admin_router(node: MailboxNode) -> axum::Router {
    axum::Router::new()
        .route("/v1/admin/backup", axum::routing::post(backup))
        .fallback(not_found)
        .with_state(node)
}

impl MailboxNode {
    /// Serves the admin API on `listener` (`[admin] listen`; plain HTTP) until `shutdown`
    /// resolves.
    pub async fn serve_admin(
        &self,
        listener: std::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        whispr_relay::http::serve(admin_router(self.clone()), listener, None, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, token: &str) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().unwrap(),
            token: token.into(),
        }
    }

    /// `[backup]` with a real node and store: backups follow one another (every 50 ms here,
    /// instead of the config's minutes), at most `keep` kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_backups_follow_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::node::NodeConfig::with_data_dir(dir.path().join("data"));
        config.rng_seed = Some(3);
        let backups = dir.path().join("backups");
        config.backup = whispr_timer_service::backup::BackupConfig {
            dir: Some(backups.clone()),
            interval_minutes: 1,
            keep: 2,
        };
        let node =
            MailboxNode::open(config, std::sync::Arc::new(crate::node::NoMesh::default())).unwrap();
        let owner = crate::testkit::Owner::from_seed(1);
        node.create_mailbox(owner.create_request(3_600_000))
            .unwrap();
        assert_eq!(
            node.config().backup.interval(),
            std::time::Duration::from_secs(60)
        );
        let started = std::time::Instant::now();
        let every = std::time::Duration::from_millis(50);
        let schedule = node.spawn_backups_every(every).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while node.backup_metrics().backups_total() < 3 {
            assert!(std::time::Instant::now() < deadline, "no scheduled backups");
            tokio::time::sleep(every).await;
        }
        schedule.abort();
        // Not before three intervals.
        assert!(started.elapsed() >= every * 3);
        let kept = std::fs::read_dir(backups.join("db/meta"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .parse::<u32>()
                    .is_ok()
            })
            .count();
        assert_eq!(kept, 2);
        // Without [backup] dir, no schedule.
        let plain = MailboxNode::open(
            crate::node::NodeConfig::with_data_dir(dir.path().join("other")),
            std::sync::Arc::new(crate::node::NoMesh::default()),
        )
        .unwrap();
        assert!(plain.spawn_scheduled_backups().is_none());
    }

    /// The admin API over a real socket, called with the CLI's client: the token is checked,
    /// bad directories get typed errors, a good call returns the report.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admin_api_authenticates_and_refuses_bad_directories() {
        use whispr_timer_service::backup::admin_post;
        let dir = tempfile::tempdir().unwrap();
        let token = "admin-api-test-token-0123456789abcdef".to_string();
        let mut config = crate::node::NodeConfig::with_data_dir(dir.path().join("data"));
        config.rng_seed = Some(4);
        config.admin = Some(admin("127.0.0.1:0", &token));
        let node =
            MailboxNode::open(config, std::sync::Arc::new(crate::node::NoMesh::default())).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn({
            let node = node.clone();
            async move { node.serve_admin(listener, std::future::pending()).await }
        });
        let backups = dir.path().join("backups");
        let call = move |path: &'static str, token: String, to: serde_json::Value| {
            tokio::task::spawn_blocking(move || {
                admin_post(
                    addr,
                    path,
                    &token,
                    &serde_json::json!({ "to": to }),
                    std::time::Duration::from_secs(60),
                )
            })
        };
        let good = serde_json::json!(backups);
        let e = call("/v1/admin/backup", "wrong".into(), good.clone())
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("HTTP 401"), "{e}");
        let e = call("/v1/admin/backup", token.clone(), "relative/dir".into())
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("bad_backup_dir"), "{e}");
        let e = call("/v1/admin/nothing", token.clone(), good.clone())
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("HTTP 404"), "{e}");
        let report = call("/v1/admin/backup", token.clone(), good.clone())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report["backup_id"], 1, "{report}");
        // The master key (in the data directory here) stays out of the backup.
        let key = std::fs::read_to_string(dir.path().join("data/master.key")).unwrap();
        let raw = hex::decode(key.trim()).unwrap();
        let mut todo = vec![backups];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                for needle in [key.trim().as_bytes(), raw.as_slice()] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "{} holds the master key",
                        path.display()
                    );
                }
            }
        }
        // Another node kind's backups are refused.
        let e = whispr_timer_service::backup::restore(
            "timer",
            &dir.path().join("backups"),
            &dir.path().join("elsewhere"),
            STORE_DIR,
            &RESTORE_REPLACES,
            false,
        )
        .unwrap_err();
        assert!(matches!(e, BackupError::WrongKind { .. }), "{e}");
        server.abort();
    }

    #[test]
    fn the_admin_listener_is_loopback_only_and_the_token_long() {
        let long = "x".repeat(32);
        assert!(admin("127.0.0.1:7401", &long).check().is_ok());
        assert!(admin("[::1]:7401", &long).check().is_ok());
        let e = admin("0.0.0.0:7401", &long).check().unwrap_err();
        assert_eq!(e.key, "admin.listen");
        let e = admin("127.0.0.1:7401", "short").check().unwrap_err();
        assert_eq!(e.key, "admin.token");
        assert!(!format!("{:?}", admin("127.0.0.1:1", &long)).contains(&long));
    }
}
