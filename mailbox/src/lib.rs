//! # whispr-mailbox
//!
//! The mailbox node keeps sealed envelopes for their owners until every registered device
//! has fetched and acknowledged them, or they expire. It learns which mailbox a deposit is
//! for (the access key proves the sender is a contact) but never who sent it.
//!
//! - [`core::MailboxCore`]: the sans-IO core (deposits with group commit, dedup, quotas,
//!   rate limits, expiry, multi-device cursors, prekeys, export, crypto-erasure) over a
//!   [`store::MailboxStore`]: [`rocks::RocksStore`] on disk, [`store::MemoryStore`] for
//!   tests and the simulator.
//! - [`crypto`]: encryption at rest (master key, per-mailbox data keys).
//! - [`auth::Sessions`]: challenge/response login, session tokens and stream tickets.
//! - [`node`]: the `whispr-mailbox` binary's driver: config, group commit, expiry through
//!   the timer queue; [`http`] serves its client API over TLS and [`mesh`] connects it to the
//!   mesh. Both sit above [`node`]; what all three share sits below it ([`metrics`],
//!   [`limiter`]). [`admin`] serves the loopback admin API (online backups of the store).
//!   Plumbing shared with the other node binaries (config files, logging, signals, the
//!   clock) is in `whispr-node-kit`.
//!
//! Operators and client developers: see `docs/mailbox.md`.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod core;
pub mod crypto;
pub mod error;
pub mod http;
pub mod limiter;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod pii;
pub mod rocks;
pub mod store;
#[doc(hidden)]
pub mod testkit;

pub use error::{MailboxError, Result};
