//! `whispr-authority`: a directory authority of the Whispr Mesh.
//!
//! ```text
//! whispr-authority --config authority.toml        # run (same as `run`)
//! whispr-authority --config authority.toml key    # print the public key (creates the key)
//! ```
//!
//! On start it writes `<data_dir>/node-info.json` (`node_id` is its public key in hex,
//! `http_port` its API port).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whispr_authority::config::AuthorityConfig;
use whispr_authority::server::{Options, start};

#[derive(Parser)]
#[command(
    name = "whispr-authority",
    version,
    about = "Whispr Mesh directory authority"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the authority (the default).
    Run,
    /// Print the authority's public key in hex (creating the key on first use), for the
    /// network file.
    Key,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = AuthorityConfig::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Key => {
            let secret =
                whispr_relay::keys::load_or_create_secret(&config.key_path(), &mut rand::rng())?;
            let key = ed25519_dalek::SigningKey::from_bytes(&secret);
            #[allow(clippy::print_stdout)]
            {
                println!("{}", hex::encode(key.verifying_key().to_bytes()));
            }
            Ok(())
        }
        Command::Run => {
            config.log.init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(run(config))
        }
    }
}

async fn run(config: AuthorityConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).context("creating data_dir")?;
    let options = Options::from_config(&config)?;
    let key = hex::encode(options.key.verifying_key().to_bytes());
    let listener =
        std::net::TcpListener::bind(config.listen).context("binding the HTTP listener")?;
    let running = start(options, listener)?;
    whispr_node_kit::info::NodeInfo {
        http_port: running.addr.port(),
        listen: Vec::new(),
        node_id: key,
        peer_id: String::new(),
    }
    .write(&config.data_dir)
    .context("writing node-info.json")?;
    tracing::info!(port = running.addr.port(), "authority started");
    whispr_node_kit::shutdown::shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}
