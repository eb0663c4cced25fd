//! # whispr-client
//!
//! The Whispr Mesh client library, on which the `whispr` command is built: keys and contacts
//! (one mailbox per contact relationship), end-to-end encryption with Olm (`vodozemac`),
//! invitations, sealed-sender envelopes, fragmentation, route choice and Sphinx packets with
//! per-hop delays, SURB acknowledgements and retransmission on fresh routes, polling and
//! reassembly, delivery and read receipts, scheduled sends through timer nodes, disappearing
//! messages, cover traffic, and a local development network of real node processes
//! ([`devnet`]). The state lives in a home directory, encrypted with a passphrase-derived key
//! ([`vault`]). `docs/clients.md` is the guide; `client/examples/two_users.rs` runs it.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod client;
pub mod core;
pub mod devnet;
mod error;
pub mod invite;
pub mod net;
pub mod state;
pub mod vault;

pub use client::{Client, Erased, now_ms};
pub use core::{
    BlockedInfo, ClientCore, ContactInfo, DeviceInfo, OutgoingInfo, Output, PacketCodec, Received,
    Revoked, SendOptions, StoredMessage,
};
pub use error::{ClientError, Result};
pub use state::{Notice, OutKind, OutState, Receipts, Settings};
pub use vault::KdfParams;
