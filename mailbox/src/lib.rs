//! Mailbox node: durable RocksDB mailboxes keeping sealed envelopes for their owners, with
//! an authenticated poll/stream API (axum over rustls).
//!
//! Filled in by the issue "Mailbox node: durable RocksDB mailboxes with an authenticated
//! poll/stream API". Until then this crate is intentionally empty.
