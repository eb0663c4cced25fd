//! # whispr-relay
//!
//! The relay node, and the mesh layer that mailbox and timer nodes embed:
//!
//! * [`router`]: the sans-IO router core (Sphinx processing, replay cache, mixing delays,
//!   per-peer and per-connection limits). The simulator drives it too.
//! * [`storage`]: RocksDB options shared by every store, and the persisted replay cache.
//! * [`keys`]: identity and per-epoch Sphinx key files.
//! * [`config`]: `[mesh]`, `[http]`, `[log]` and the relay's configuration file.
//! * [`mesh`]: the libp2p + tokio driver ([`mesh::Mesh`], [`mesh::MeshHandle`]).
//! * [`http`]: the client-facing HTTP API of a mesh node.
//! * [`node_info`]: `node-info.json` for a node in the mesh.
//!
//! Plumbing shared with the other node binaries (config files, logging, signals, node info,
//! the wall clock) is in `whispr-node-kit`.
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
pub mod http;
pub mod keys;
pub mod mesh;
pub mod node_info;
pub mod router;
pub mod storage;
