//! # whispr-timer-service
//!
//! The timer service holds what must happen later: deferred sends (a packet to inject into
//! the mesh at a given time), expiries (a stored message to delete) and maintenance.
//!
//! * [`queue::TimerQueue`] is the sans-IO core: it takes `now` as an argument, draws ids from
//!   an injected RNG and keeps tasks in a [`store::TaskStore`]. Categories have separate,
//!   bounded queues; higher priority fires first among due tasks, categories are served
//!   round-robin so that one category's flood cannot starve another; firing is
//!   at-least-once with leases, retries with exponential back-off and quarantine.
//! * [`rocks::RocksStore`] keeps tasks in RocksDB, keyed by due time, every write synced.
//! * [`holds::HoldAssembler`] joins the parts of held packets (sent by clients through the
//!   mesh) into the Sphinx packet that a deferred send injects at its release time.
//! * [`audit::AuditLog`] is the hash-chained JSON-lines log of administrative actions.
//! * [`node::TimerNode`] is the `whispr-timer` binary's driver: admin HTTP API, metrics,
//!   workers. [`mesh`] connects it to the mesh and sits above it; [`metrics`] holds the mesh
//!   counters both use, below both. Plumbing shared with the other node binaries (config
//!   files, logging, signals, the clock) is in `whispr-node-kit`.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod audit;
pub mod backup;
pub mod config;
pub mod deferred;
mod error;
pub mod holds;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod queue;
pub mod rocks;
pub mod store;
pub mod task;

pub use error::{Result, TimerError};
