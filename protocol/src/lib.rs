//! # whispr-protocol
//!
//! The Whispr Mesh wire protocol, with no I/O: Sphinx packets ([`sphinx`]), sealed-sender
//! envelopes ([`envelope`]), fragmentation and reassembly ([`fragment`]), node descriptors,
//! directory validation, route selection and mailbox placement ([`directory`]), the
//! protobuf wire messages they travel in ([`wire`]), and the JSON request bodies and query
//! strings of the mailbox and timer nodes' HTTP APIs ([`mailbox_api`], [`timer_api`]).
//!
//! **This crate depends on no runtime, network or storage crate** (no tokio, libp2p, rocksdb,
//! axum); `make check-deps` fails the build if `cargo tree` shows one. Randomness comes in as
//! an `R: CryptoRng`, time as a [`UnixTime`] argument; nothing here reads a clock, a global
//! RNG, a file or a socket, so the relay, mailbox and timer nodes and the simulator all run
//! exactly this code.
//!
//! Every decoder takes untrusted bytes and returns a typed [`Error`]; no input panics (each
//! decoder has a fuzz target in `fuzz/`). The byte-level specification is `docs/protocol.md`.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod consensus;
pub mod directory;
pub mod envelope;
mod error;
pub mod fragment;
#[doc(hidden)]
pub mod fuzzing;
pub mod mailbox_api;
pub mod payload;
pub mod prekeys;
pub mod replica;
pub mod sphinx;
pub mod timer_api;
mod types;
pub mod wire;

pub use error::{Error, Result};
pub use types::{
    AccessToken, CancelCapability, DedupId, DestinationAddress, HoldId, KEY_EPOCH_LEN, KeyEpoch,
    MailboxId, MessageId, NodeId, ReplyKey, SurbId, UnixTime,
};
