//! `whispr-timer`: the Whispr Mesh timer node.
//!
//! ```text
//! whispr-timer --config timer.toml              # run the node
//! whispr-timer --config timer.toml audit-verify # check the audit log's hash chain
//! whispr-timer stress --data-dir DIR --count N  # schedule N tasks, print each id once on disk
//! whispr-timer --config timer.toml backup --to DIR            # online backup (node running)
//! whispr-timer --config timer.toml restore --from DIR [--force] # node stopped
//! whispr-timer openapi                          # print the admin API's OpenAPI document
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rand::{RngExt, SeedableRng};
use whispr_node_kit::clock::now;
use whispr_protocol::UnixTime;
use whispr_protocol::directory::Role;
use whispr_relay::mesh::{Mesh, MeshOptions};
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::deferred::{NoMesh, PacketInjector};
use whispr_timer_service::mesh::{MeshInjector, MeshMetrics, TimerDestination};
use whispr_timer_service::node::{NodeConfig, TimerNode};
use whispr_timer_service::queue::TimerQueue;
use whispr_timer_service::rocks::{RocksOptions, RocksStore};
use whispr_timer_service::task::{Category, NewTask};

#[derive(Parser)]
#[command(name = "whispr-timer", version, about = "Whispr Mesh timer node")]
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
    /// Verify the audit log's hash chain against the anchor kept in the store.
    AuditVerify,
    /// Online backup of the running node's store (and a copy of its audit log) into DIR
    /// (created if missing; incremental over the backups already there), through the admin
    /// API. Prints the backup's report as JSON.
    Backup {
        /// The backup directory (best on another disk).
        #[arg(long)]
        to: PathBuf,
        /// The admin listener's address, if not `[admin] listen` (e.g. when that is port 0).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Rebuild the stopped node's store and audit log from the latest backup in DIR. Refuses
    /// a data directory that holds them unless `--force`, and a store a running node holds.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        /// Replace the store and audit log in the data directory.
        #[arg(long)]
        force: bool,
    },
    /// Print the HTTP API's OpenAPI document (JSON) and exit.
    Openapi,
    /// Load tool: schedule maintenance "noop" tasks straight into a data directory (the node
    /// must not be running) and print each task id once it is on disk.
    Stress {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// How many tasks.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Tasks per synced write.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Due times spread uniformly over this many milliseconds from now.
        #[arg(long, default_value_t = 0)]
        spread_ms: u64,
        /// Seed for the spread.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<NodeConfig> {
    let path = path.context("--config FILE is required")?;
    NodeConfig::load(path).with_context(|| format!("in config file {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = load_config(cli.config.as_ref())?;
            config.log.init();
            run(config)
        }
        Command::Openapi => {
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&whispr_timer_service::openapi::openapi())?
            )?;
            Ok(())
        }
        Command::AuditVerify => {
            let config = load_config(cli.config.as_ref())?;
            config.log.init();
            let node = TimerNode::open(config, Arc::new(NoMesh))?;
            let report = node.verify_audit()?;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&report)?
            )?;
            if report.ok {
                Ok(())
            } else {
                anyhow::bail!("audit log does not verify")
            }
        }
        Command::Backup { to, admin } => {
            let config = load_config(cli.config.as_ref())?;
            config.log.init();
            let to = std::path::absolute(&to).context("the backup directory")?;
            let report = whispr_timer_service::backup::admin_post(
                admin.unwrap_or(config.admin.listen),
                "/v1/admin/backup",
                &config.admin.token,
                &serde_json::json!({ "to": to }),
                std::time::Duration::from_secs(24 * 3600),
            )?;
            writeln!(std::io::stdout().lock(), "{report}")?;
            Ok(())
        }
        Command::Restore { from, force } => {
            let config = load_config(cli.config.as_ref())?;
            config.log.init();
            let audit = whispr_timer_service::node::AUDIT_FILE;
            let report = whispr_timer_service::backup::restore(
                "timer",
                &from,
                &config.data_dir,
                "db",
                &[audit],
                force,
            )?;
            whispr_timer_service::backup::restore_file(
                &from,
                report.backup_id,
                audit,
                &config.data_dir.join(audit),
            )?;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string(&report)?
            )?;
            Ok(())
        }
        Command::Stress {
            data_dir,
            count,
            batch,
            spread_ms,
            seed,
        } => stress(&data_dir, count, batch.max(1), spread_ms, seed),
    }
}

fn run(config: NodeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listen = config.admin.listen;
        let data_dir = config.data_dir.clone();
        // With a `[mesh]` section the node joins the mesh: held packets arrive through it and
        // are injected into it; without one, deferred sends fail (and end in quarantine).
        let mesh = match config.mesh.clone() {
            Some(mesh_config) => Some(
                Mesh::new(MeshOptions {
                    config: mesh_config,
                    data_dir: data_dir.clone(),
                    extra_roles: vec![Role::Timer],
                })
                .context("joining the mesh")?,
            ),
            None => None,
        };
        let injector: Arc<dyn PacketInjector> = match &mesh {
            Some((handle, _)) => Arc::new(MeshInjector::new(handle.clone())),
            None => Arc::new(NoMesh),
        };
        let node = TimerNode::open(config, injector).context("opening the node")?;
        let _schedule = node.spawn_scheduled_backups();
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("admin.listen: cannot bind {listen}"))?;
        let port = listener.local_addr()?.port();
        // The port only: addresses stay out of logs.
        tracing::info!(port, mesh = mesh.is_some(), "timer node started");
        let mut app = node.router();
        let mut mesh_task = None;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some((handle, runner)) = mesh {
            let metrics = Arc::new(MeshMetrics::default());
            node.attach_mesh(handle.clone(), metrics.clone());
            app = app.merge(whispr_relay::http::mesh_routes(handle.clone(), None));
            whispr_relay::node_info::write_node_info(&data_dir, &handle, port);
            let destination = Arc::new(TimerDestination::new(node.clone(), handle, metrics));
            let mut stop = stop_rx.clone();
            mesh_task = Some(tokio::spawn(runner.run(Some(destination), async move {
                let _ = stop.wait_for(|s| *s).await;
            })));
        }
        let worker = {
            let node = node.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                node.run_worker(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            })
        };
        let server = {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                // Plain HTTP: the admin listener is loopback unless allow_non_loopback.
                whispr_relay::http::serve(app, listener, None, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
            })
        };
        whispr_node_kit::shutdown::shutdown_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        let _ = worker.await;
        server.await.context("admin server task")??;
        if let Some(task) = mesh_task {
            task.await.context("mesh task")?.context("mesh")?;
        }
        Ok(())
    })
}

fn stress(
    data_dir: &std::path::Path,
    count: u64,
    batch: usize,
    spread_ms: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let store = RocksStore::open(&data_dir.join("db"), RocksOptions::default())?;
    let config = QueueConfig {
        queue_tasks_max: usize::MAX,
        ..QueueConfig::default()
    };
    let mut queue = TimerQueue::open(
        config,
        store,
        rand::rngs::StdRng::seed_from_u64(seed ^ now().0),
    )?;
    let mut spread = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = std::io::stdout().lock();
    let mut scheduled = 0u64;
    while scheduled < count {
        let n = (count - scheduled).min(batch as u64);
        let at = now();
        let tasks = (0..n)
            .map(|_| NewTask {
                category: Category::Maintenance,
                priority: 0,
                due_at: UnixTime(
                    at.0 + if spread_ms == 0 {
                        0
                    } else {
                        spread.random_range(0..spread_ms)
                    },
                ),
                payload: b"noop".to_vec(),
                owner: None,
            })
            .collect();
        for result in queue.schedule_many(at, tasks)? {
            let id = result?;
            writeln!(out, "{id}")?;
        }
        out.flush()?;
        scheduled += n;
    }
    Ok(())
}
