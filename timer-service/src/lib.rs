//! Timer service: a durable RocksDB timer queue (deferred sends, expiries, maintenance),
//! and the timer node's admin side.
//!
//! Filled in by the issue "Timer service: a durable RocksDB timer queue, and the timer
//! node's admin side". Until then this crate is intentionally empty.
