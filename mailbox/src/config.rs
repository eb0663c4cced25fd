//! Limits of the mailbox core. Every table is bounded here; defaults follow the messaging
//! policy (`shared/seeds/000_…`).

use serde::{Deserialize, Serialize};

/// Limits of a [`crate::core::MailboxCore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoreConfig {
    /// Most mailboxes on this node. Default 100,000.
    pub mailboxes_max: usize,
    /// Most messages stored per mailbox. Default 10,000.
    pub mailbox_messages_max: u64,
    /// Most bytes stored per mailbox. Default 64 MiB.
    pub mailbox_bytes_max: u64,
    /// Most devices per mailbox (the owner's key included). Default 8.
    pub devices_max: usize,
    /// Longest retention a mailbox may ask for, and the cap on every expiry. Default 30 days.
    pub retention_ms_max: u64,
    /// Deposits (and prekey requests) per mailbox per minute. Default 600.
    pub deposits_per_min: u64,
    /// Most prekeys per upload. Default 200.
    pub prekeys_max: usize,
    /// Most messages per fetch. Default 100.
    pub fetch_limit_max: usize,
    /// Largest SURB reply stored. Default 4096 bytes.
    pub reply_bytes_max: usize,
    /// Most expired messages deleted per sweep write. Default 10,000.
    pub sweep_batch_max: usize,
    /// Expiry sweeps are scheduled per bucket of this length. Default 60,000 ms.
    pub expiry_bucket_ms: u64,
    /// A mailbox that nobody has logged in to and that has received no deposit this long after
    /// its creation is erased, so that abandoned (or mass-created) mailboxes do not hold
    /// `mailboxes_max` for ever. Default 24 hours.
    pub unused_mailbox_ttl_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            mailboxes_max: 100_000,
            mailbox_messages_max: 10_000,
            mailbox_bytes_max: 64 * 1024 * 1024,
            devices_max: 8,
            retention_ms_max: 30 * 24 * 3600 * 1000,
            deposits_per_min: 600,
            prekeys_max: 200,
            fetch_limit_max: 100,
            reply_bytes_max: 4096,
            sweep_batch_max: 10_000,
            expiry_bucket_ms: 60_000,
            unused_mailbox_ttl_ms: 24 * 3600 * 1000,
        }
    }
}
