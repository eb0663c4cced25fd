//! # whispr-authority
//!
//! A directory authority of the Whispr Mesh (Tor and Katzenpost model): it holds nodes'
//! signed descriptors (submitted with `POST /v1/descriptors`, or read from mesh nodes'
//! `GET /v1/directory`), admits them by its operator's allow list, votes once per consensus
//! epoch, fetches the other pinned authorities' votes, computes the consensus (the nodes a
//! majority admits, [`whispr_protocol::consensus::compute_consensus`]), signs it, collects
//! the others' signatures and serves the result at `GET /v1/consensus`.
//!
//! [`core`] holds every decision and does no I/O; [`server`] is the tokio/axum driver;
//! `whispr-authority` (src/main.rs) is the binary. See `docs/operators.md`, "Directory
//! authorities".
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod core;
pub mod server;
