//! The node's counters, shown on `/metrics`: [`Metrics`] (deposits, commits, sweeps, the API)
//! and [`MeshMetrics`] (what arrives and leaves through the mesh). They sit below the node,
//! its HTTP API and its mesh layer, which all count into them.

use std::sync::atomic::AtomicU64;

/// Node counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Deposits stored.
    pub deposits_stored: AtomicU64,
    /// Redelivered deposits acknowledged again.
    pub deposits_duplicate: AtomicU64,
    /// Deposits refused (any reason).
    pub deposits_refused: AtomicU64,
    /// Group-commit writes.
    pub commit_batches: AtomicU64,
    /// Deposits in those writes.
    pub commit_batched: AtomicU64,
    /// SURB replies handed to the mesh.
    pub replies_sent: AtomicU64,
    /// Expired messages deleted by sweeps.
    pub swept: AtomicU64,
    /// Mailboxes erased because nobody used them within their grace period.
    pub unused_erased: AtomicU64,
    /// Requests answered 429.
    pub rate_limited: AtomicU64,
    /// Failed logins.
    pub auth_failures: AtomicU64,
    /// Open streams.
    pub streams_open: AtomicU64,
    /// Open long polls.
    pub polls_waiting: AtomicU64,
}

/// Counters of the mesh side.
#[derive(Debug, Default)]
pub struct MeshMetrics {
    /// Deposits from the mesh stored (or acknowledged again as duplicates).
    pub deposits_accepted: AtomicU64,
    /// Deposits from the mesh refused by the core (bad token, quota, rate, expired …).
    pub deposits_refused: AtomicU64,
    /// SURB replies stored into a mailbox.
    pub surb_replies_accepted: AtomicU64,
    /// SURB replies refused.
    pub surb_replies_refused: AtomicU64,
    /// Prekey requests answered.
    pub prekey_requests: AtomicU64,
    /// Prekey requests refused.
    pub prekey_requests_refused: AtomicU64,
    /// Final payloads that do not decode or are not for a mailbox node.
    pub payloads_refused: AtomicU64,
    /// Replies sent into the mesh.
    pub replies_sent: AtomicU64,
    /// Replies that could not be sent (bad SURB, mesh queue full).
    pub replies_failed: AtomicU64,
}

impl MeshMetrics {
    /// Prometheus text.
    pub fn render(&self) -> String {
        whispr_relay::http::prometheus_counters(
            "whispr_mailbox_mesh",
            &[
                (
                    "deposits_accepted",
                    "Deposits from the mesh stored or re-acknowledged.",
                    &self.deposits_accepted,
                ),
                (
                    "deposits_refused",
                    "Deposits from the mesh refused.",
                    &self.deposits_refused,
                ),
                (
                    "surb_replies_accepted",
                    "SURB replies stored.",
                    &self.surb_replies_accepted,
                ),
                (
                    "surb_replies_refused",
                    "SURB replies refused.",
                    &self.surb_replies_refused,
                ),
                (
                    "prekey_requests",
                    "Prekey requests answered.",
                    &self.prekey_requests,
                ),
                (
                    "prekey_requests_refused",
                    "Prekey requests refused.",
                    &self.prekey_requests_refused,
                ),
                (
                    "payloads_refused",
                    "Final payloads not for a mailbox node or undecodable.",
                    &self.payloads_refused,
                ),
                (
                    "replies_sent",
                    "Replies sent through SURBs.",
                    &self.replies_sent,
                ),
                (
                    "replies_failed",
                    "Replies that could not be sent.",
                    &self.replies_failed,
                ),
            ],
        )
    }
}
