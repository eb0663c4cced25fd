//! Network simulator: a deterministic discrete-event driver over the same relay, mailbox
//! and timer cores as the real nodes.
//!
//! Filled in by the issue "Network simulator: deterministic, at scale, over the real
//! protocol cores". Until then this crate is intentionally empty.
