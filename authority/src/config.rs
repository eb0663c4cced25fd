//! The authority's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use whispr_node_kit::config::{ConfigError, load_toml};
use whispr_node_kit::log::LogConfig;

use crate::core::Schedule;

/// `authority.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// Where the key (`authority.key`) and `node-info.json` live.
    pub data_dir: PathBuf,
    /// HTTP listener (default `127.0.0.1:7400`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The network file: every pinned authority (this one included), their URLs, the
    /// threshold. The same file clients and nodes pin.
    pub network_file: PathBuf,
    /// The admission policy: node ids this authority admits, one per line. Re-read before
    /// every vote, so an edit applies from the next epoch.
    pub allow_file: PathBuf,
    /// Mesh nodes' `GET /v1/directory` URLs to read gossiped descriptors from (optional:
    /// nodes with `[mesh] network_file` `POST /v1/descriptors` their own).
    #[serde(default)]
    pub descriptor_sources: Vec<String>,
    /// Length of a consensus epoch, seconds (default 3600).
    #[serde(default = "default_epoch_secs")]
    pub epoch_secs: u64,
    /// How many epochs each consensus stays valid (default 3).
    #[serde(default = "default_lifetime_epochs")]
    pub lifetime_epochs: u32,
    /// `[log]`.
    #[serde(default)]
    pub log: LogConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}

fn default_epoch_secs() -> u64 {
    3600
}

fn default_lifetime_epochs() -> u32 {
    3
}

impl AuthorityConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<AuthorityConfig, ConfigError> {
        let config: AuthorityConfig = load_toml(path)?;
        if config.epoch_secs == 0 || config.epoch_secs > 24 * 3600 {
            return Err(ConfigError::new("epoch_secs", "must be 1 to 86400"));
        }
        if !(1..=24).contains(&config.lifetime_epochs) {
            return Err(ConfigError::new("lifetime_epochs", "must be 1 to 24"));
        }
        let lifetime = config.schedule().lifetime;
        if lifetime > whispr_protocol::consensus::CONSENSUS_VALIDITY_MAX {
            return Err(ConfigError::new(
                "lifetime_epochs",
                "epoch_secs × lifetime_epochs must be at most 3 days",
            ));
        }
        Ok(config)
    }

    /// The consensus schedule.
    pub fn schedule(&self) -> Schedule {
        let period = Duration::from_secs(self.epoch_secs);
        Schedule {
            period,
            lifetime: period.saturating_mul(self.lifetime_epochs),
        }
    }

    /// The key file.
    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("authority.key")
    }
}
