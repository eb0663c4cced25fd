//! Network simulator: a deterministic discrete-event driver over the same relay, mailbox
//! and timer cores as the real nodes.
//!
//! Being built for the issue "Network simulator: deterministic, at scale, over the real
//! protocol cores". What exists so far: [`engine`], the event heap and the seeded RNG tree;
//! [`anonymity`], the observer's sender entropy and the timing-correlation attack; [`links`],
//! latency distributions, bandwidth, loss and partitions.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod anonymity;
pub mod engine;
pub mod links;
