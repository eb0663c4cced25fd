//! Relay node: the sans-IO router core (Sphinx processing, replay cache, mixing delays,
//! per-peer and per-connection limits) and its libp2p + tokio driver.
//!
//! Filled in by the issue "The mesh: relay nodes on libp2p, with mailbox and timer nodes as
//! destinations". Until then this crate is intentionally empty.

pub mod mesh;
