//! Client library: keys, Olm sessions (vodozemac), sealed sender, route choice, Sphinx and
//! SURB construction, fragmentation, acks and retransmission; the `whispr` command is built
//! on it.
//!
//! Filled in by the issue "Client library, the `whispr` command and `make demo`". Until then
//! this crate is intentionally empty.
