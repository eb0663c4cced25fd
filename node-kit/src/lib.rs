//! # whispr-node-kit
//!
//! The plumbing every node binary (`whispr-relay`, `whispr-mailbox`, `whispr-timer`) shares,
//! in one place so that no node crate borrows it from a sibling:
//!
//! * [`config`]: reading a TOML file into a node's configuration, and [`ConfigError`], which
//!   names the key to fix.
//! * [`log`]: the `[log]` table ([`LogConfig`]) and the global `tracing` subscriber.
//! * [`shutdown`]: the future that resolves on SIGINT or SIGTERM.
//! * [`info`]: `<data_dir>/node-info.json`, what a started node tells its operator and scripts.
//! * [`clock`]: the wall clock, the only place where node drivers read `SystemTime`; cores
//!   take the time as an argument.
//!
//! Nothing here knows about the mesh, a store or HTTP.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod clock;
pub mod config;
pub mod info;
pub mod log;
pub mod shutdown;

pub use config::ConfigError;
pub use log::LogConfig;
