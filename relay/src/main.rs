//! `whispr-relay`: an edge and/or mix relay of the Whispr Mesh.
//!
//! ```text
//! whispr-relay --config relay.toml            # run (same as `run`)
//! whispr-relay --config relay.toml peer-id    # print the node's libp2p peer id (creates keys)
//! ```
//!
//! On start the node writes `<data_dir>/node-info.json` (its peer id, the libp2p addresses it
//! listens on and its HTTP address) for operators and scripts; logs never carry them.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whispr_relay::config::{RelayConfig, RelayRole};
use whispr_relay::http::{TlsFiles, metrics_routes, relay_routes, serve};
use whispr_relay::keys::Identity;
use whispr_relay::mesh::{Mesh, MeshOptions};
use whispr_relay::node_info::write_node_info;

#[derive(Parser)]
#[command(name = "whispr-relay", version, about = "Whispr Mesh relay node")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run,
    /// Print the libp2p peer id (creating the identity key on first use).
    PeerId,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = RelayConfig::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::PeerId => {
            let identity = Identity::load_or_create(&config.mesh.key_dir(&config.data_dir))?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", identity.libp2p_keypair().public().to_peer_id());
            }
            Ok(())
        }
        Command::Run => {
            config.log.init();
            config.mesh.router.edge = config.mesh.roles.contains(&RelayRole::Edge);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(run(config))
        }
    }
}

async fn run(config: RelayConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).context("creating data_dir")?;
    let edge = config.mesh.roles.contains(&RelayRole::Edge);
    let (mesh, runner) = Mesh::new(MeshOptions {
        config: config.mesh.clone(),
        data_dir: config.data_dir.clone(),
        extra_roles: Vec::new(),
    })
    .context("starting the mesh")?;
    let listener =
        std::net::TcpListener::bind(config.http.listen).context("binding the HTTP listener")?;
    let http_addr = listener.local_addr()?;
    write_node_info(&config.data_dir, &mesh, http_addr.port());
    let tls = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = relay_routes(
        mesh.clone(),
        edge.then_some(config.http.batch_max),
        &config.http,
    );
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(serve(app, listener, tls, async move {
        let _ = http_stop.changed().await;
    }));
    // `/metrics` on a listener of its own (plain HTTP, loopback unless allowed otherwise).
    let metrics_http = match config.http.metrics_listen {
        Some(listen) => {
            let listener =
                std::net::TcpListener::bind(listen).context("binding the metrics listener")?;
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(serve(
                metrics_routes(mesh.clone(), &config.http),
                listener,
                None,
                async move {
                    let _ = stop.changed().await;
                },
            )))
        }
        None => None,
    };
    tracing::info!(
        edge,
        mix = config.mesh.roles.contains(&RelayRole::Mix),
        "relay started"
    );
    let mut mesh_stop = stop_rx;
    let mesh_task = tokio::spawn(runner.run(None, async move {
        let _ = mesh_stop.changed().await;
    }));
    whispr_node_kit::shutdown::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let mesh_result = mesh_task.await.context("mesh task")?;
    let _ = http.await;
    if let Some(metrics_http) = metrics_http {
        let _ = metrics_http.await;
    }
    mesh_result.context("mesh")?;
    Ok(())
}
