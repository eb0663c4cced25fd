//! `whispr-mailbox`: the Whispr Mesh mailbox node.
//!
//! ```text
//! whispr-mailbox --config mailbox.toml                 # run the node
//! whispr-mailbox --config mailbox.toml stress-deposit  # load tool (node not running)
//! whispr-mailbox openapi                               # print the OpenAPI document
//! whispr-mailbox --config mailbox.toml backup --to DIR # online backup of the running node
//! whispr-mailbox --config mailbox.toml restore --from DIR [--force]  # node stopped
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whispr_mailbox::core::Incoming;
use whispr_mailbox::mesh::{MailboxDestination, MeshMetrics, MeshReplicaTransport, MeshReplies};
use whispr_mailbox::node::{MailboxNode, NoMesh, NodeConfig};
use whispr_mailbox::testkit::Owner;
use whispr_node_kit::clock::now;
use whispr_protocol::directory::Role;
use whispr_protocol::{DedupId, UnixTime};
use whispr_relay::mesh::{Mesh, MeshOptions};

#[derive(Parser)]
#[command(name = "whispr-mailbox", version, about = "Whispr Mesh mailbox node")]
struct Cli {
    /// The node's TOML configuration.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node (the default).
    Run,
    /// Print the OpenAPI document of the client API.
    Openapi,
    /// Online backup of the running node's store into DIR (created if missing; incremental
    /// over the backups already there), through the node's admin API (`[admin]`). Prints the
    /// backup's report as JSON.
    Backup {
        /// The backup directory (best on another disk).
        #[arg(long)]
        to: PathBuf,
        /// The admin listener's address, if not `[admin] listen` (e.g. when that is port 0).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Rebuild the store of the stopped node from the latest backup in DIR. Refuses a data
    /// directory that holds a store unless `--force`, and a store a running node holds. The
    /// master key (`master_key_file`) and mesh keys are not in backups: keep them apart.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        /// Replace the store in the data directory.
        #[arg(long)]
        force: bool,
    },
    /// Load tool for tests and benchmarks: opens the node's store (the node must not be
    /// running), creates the test mailbox of `--seed` if needed, deposits from `--concurrency`
    /// tasks through the group-commit path and prints `acked <dedup id hex> <seq>` for every
    /// deposit once it is durable.
    StressDeposit {
        /// Seed of the test owner (see `testkit::Owner`).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Concurrent depositors.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Deposits in total (0: until killed).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Envelope body bytes.
        #[arg(long, default_value_t = 256)]
        body_bytes: usize,
        /// Requested expiry, in milliseconds from now (default: the mailbox's retention).
        #[arg(long)]
        expire_in_ms: Option<u64>,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<NodeConfig> {
    let path = path.context("--config FILE is required")?;
    NodeConfig::load(path).with_context(|| format!("in config file {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Openapi = command {
        let doc = whispr_mailbox::http::openapi();
        writeln!(std::io::stdout().lock(), "{}", doc.to_pretty_json()?)?;
        return Ok(());
    }
    let config = load_config(cli.config.as_ref())?;
    config.log.init();
    match command {
        Command::Backup { to, admin } => return backup(&config, &to, admin),
        Command::Restore { from, force } => return restore(&config, &from, force),
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match command {
        Command::Run | Command::Openapi | Command::Backup { .. } | Command::Restore { .. } => {
            runtime.block_on(run(config))
        }
        Command::StressDeposit {
            seed,
            concurrency,
            count,
            body_bytes,
            expire_in_ms,
        } => runtime.block_on(stress(
            config,
            seed,
            concurrency.max(1),
            count,
            body_bytes,
            expire_in_ms,
        )),
    }
}

/// `backup --to DIR`: asks the running node for an online backup (it holds the store's lock).
fn backup(
    config: &NodeConfig,
    to: &std::path::Path,
    admin: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let admin_config = config
        .admin
        .as_ref()
        .context("backup needs the node's [admin] section (listen, token)")?;
    let to = std::path::absolute(to).context("the backup directory")?;
    let report = whispr_timer_service::backup::admin_post(
        admin.unwrap_or(admin_config.listen),
        "/v1/admin/backup",
        &admin_config.token,
        &serde_json::json!({ "to": to }),
        std::time::Duration::from_secs(24 * 3600),
    )?;
    writeln!(std::io::stdout().lock(), "{report}")?;
    Ok(())
}

/// `restore --from DIR`: rebuilds the stopped node's store from the latest backup.
fn restore(config: &NodeConfig, from: &std::path::Path, force: bool) -> anyhow::Result<()> {
    let report = whispr_timer_service::backup::restore(
        whispr_mailbox::admin::BACKUP_KIND,
        from,
        &config.data_dir,
        whispr_mailbox::admin::STORE_DIR,
        &whispr_mailbox::admin::RESTORE_REPLACES,
        force,
    )?;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string(&report)?
    )?;
    Ok(())
}

/// Serves the admin API on `[admin] listen`, if set, until the process exits, and starts the
/// `[backup]` schedule, if set.
fn spawn_admin(node: &MailboxNode, listener: Option<std::net::TcpListener>) {
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            // The port only: addresses stay out of logs.
            tracing::info!(port = addr.port(), "admin listener started");
        }
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = node.serve_admin(listener, std::future::pending()).await {
                tracing::error!(error = %e, "the admin listener stopped");
            }
        });
    }
    let _schedule = node.spawn_scheduled_backups();
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let listen = config.api.listen;
    let tls = config.api.tls_cert_file.is_some();
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("api.listen: cannot bind {listen}"))?;
    let port = listener.local_addr()?.port();
    let metrics_listener = match config.api.metrics_listen {
        Some(listen) => Some(
            std::net::TcpListener::bind(listen)
                .with_context(|| format!("api.metrics_listen: cannot bind {listen}"))?,
        ),
        None => None,
    };
    let admin_listener = match &config.admin {
        Some(admin) => Some(
            std::net::TcpListener::bind(admin.listen)
                .with_context(|| format!("admin.listen: cannot bind {}", admin.listen))?,
        ),
        None => None,
    };
    let Some(mesh_config) = config.mesh.clone() else {
        let node =
            MailboxNode::open(config, Arc::new(NoMesh::default())).context("opening the node")?;
        spawn_metrics(&node, metrics_listener);
        spawn_admin(&node, admin_listener);
        // The port only: addresses stay out of logs.
        tracing::info!(port, tls, mesh = false, "mailbox node started");
        node.serve(listener, whispr_node_kit::shutdown::shutdown_signal())
            .await?;
        tracing::info!("stopped");
        return Ok(());
    };
    let data_dir = config.data_dir.clone();
    let (mesh, mut runner) = Mesh::new(MeshOptions {
        config: mesh_config,
        data_dir: data_dir.clone(),
        extra_roles: vec![Role::Mailbox],
    })
    .context("joining the mesh")?;
    let metrics = Arc::new(MeshMetrics::default());
    // Replication (docs/replication.md): this node's mesh identity names it in replica sets,
    // and replica messages travel on the mesh's node-to-node channel.
    let replica_inbox = runner
        .accept_node_messages()
        .context("accepting node messages")?;
    let mut config = config;
    config.limits.node_id = Some(mesh.node_id().0);
    let node = MailboxNode::open(
        config,
        Arc::new(MeshReplies::new(mesh.clone(), metrics.clone())),
    )
    .context("opening the node")?;
    node.attach_mesh(mesh.clone(), metrics.clone());
    node.attach_replica_transport(Arc::new(MeshReplicaTransport::new(
        mesh.clone(),
        node.replica_metrics().send_failed.clone(),
    )));
    let _replica_receiver = node.spawn_replica_receiver(replica_inbox);
    spawn_metrics(&node, metrics_listener);
    spawn_admin(&node, admin_listener);
    whispr_relay::node_info::write_node_info(&data_dir, &mesh, port);
    tracing::info!(port, tls, mesh = true, "mailbox node started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut mesh_stop = stop_rx.clone();
    let destination = Arc::new(MailboxDestination::new(node.clone(), metrics));
    let mesh_task = tokio::spawn(runner.run(Some(destination), async move {
        let _ = mesh_stop.changed().await;
    }));
    let mut http_stop = stop_rx;
    let http = tokio::spawn({
        let node = node.clone();
        async move {
            node.serve(listener, async move {
                let _ = http_stop.changed().await;
            })
            .await
        }
    });
    whispr_node_kit::shutdown::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = http.await;
    mesh_task.await.context("mesh task")?.context("mesh")?;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `/metrics` on `api.metrics_listen`, if set, until the process exits.
fn spawn_metrics(node: &MailboxNode, listener: Option<std::net::TcpListener>) {
    if let Some(listener) = listener {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = node.serve_metrics(listener, std::future::pending()).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
}

async fn stress(
    config: NodeConfig,
    seed: u64,
    concurrency: usize,
    count: u64,
    body_bytes: usize,
    expire_in_ms: Option<u64>,
) -> anyhow::Result<()> {
    let retention_ms = config.limits.retention_ms_max;
    let node =
        MailboxNode::open(config, Arc::new(NoMesh::default())).context("opening the node")?;
    let owner = Arc::new(Owner::from_seed(seed));
    match node.create_mailbox(owner.create_request(retention_ms)) {
        Ok(()) | Err(whispr_mailbox::MailboxError::MailboxExists) => {}
        Err(e) => return Err(e).context("creating the test mailbox"),
    }
    let remaining = Arc::new(std::sync::atomic::AtomicU64::new(if count == 0 {
        u64::MAX
    } else {
        count
    }));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let node = node.clone();
        let owner = owner.clone();
        let remaining = remaining.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            // OS-seeded: dedup ids must not repeat across runs of this tool (a seed made
            // from the clock and pid collided across kill -9 rounds in CI).
            let mut rng: rand::rngs::StdRng = rand::make_rng();
            let body = vec![0x5a; body_bytes];
            loop {
                let ordering = std::sync::atomic::Ordering::SeqCst;
                if remaining
                    .fetch_update(ordering, ordering, |n| n.checked_sub(1))
                    .is_err()
                {
                    return Ok::<(), anyhow::Error>(());
                }
                let dedup = DedupId::random(&mut rng);
                let expires_at = expire_in_ms.map(|ms| UnixTime(now().0 + ms));
                let envelope = owner.envelope(&mut rng, dedup, expires_at, None, &body)?;
                match node.deposit(Incoming::Deposit(envelope)).await {
                    Ok(receipt) => {
                        let mut out = out
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        writeln!(
                            out,
                            "acked {} {}",
                            hex::encode(dedup.as_bytes()),
                            receipt.seq
                        )?;
                        out.flush()?;
                    }
                    Err(whispr_mailbox::MailboxError::RateLimited { retry_after_ms, .. }) => {
                        tokio::time::sleep(std::time::Duration::from_millis(retry_after_ms)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
