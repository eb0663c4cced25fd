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
    /// Removed device keys remembered per mailbox, so that the owner's old registration of a
    /// removed device cannot register it again (replayed by another device's session, or by
    /// a replica that missed the removal). Past it the oldest is forgotten. Default 64.
    pub devices_removed_max: usize,
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
    /// Every expiry time is rounded up to a multiple of this (Unix ms) before it is stored or
    /// acknowledged. Expiry times are in clear on disk (the envelope prefix, dedup and expiry
    /// entries); without a sender's expiry a message expires `retention_ms` after it arrived,
    /// so exact times would give each message's arrival time to the millisecond. Rounded,
    /// they give it only to within this granularity; a message is kept up to this much
    /// longer, never shorter. Default 3,600,000 ms (1 hour); 1 keeps exact times.
    pub expiry_granularity_ms: u64,
    /// A mailbox that nobody has logged in to and that has received no deposit this long after
    /// its creation is erased, so that abandoned (or mass-created) mailboxes do not hold
    /// `mailboxes_max` for ever. Default 24 hours.
    pub unused_mailbox_ttl_ms: u64,
    /// Replication (`docs/replication.md`): a deposit into a replicated mailbox is
    /// acknowledged to its sender once this many replicas (this one included) wrote it
    /// synced. Default 2.
    pub write_quorum: usize,
    /// A held deposit receipt is dropped (no receipt; the sender retransmits) when too few
    /// peers acknowledged the push within this time. Default 10,000 ms.
    pub replica_ack_timeout_ms: u64,
    /// Anti-entropy round interval. Default 30,000 ms.
    pub replica_repair_interval_ms: u64,
    /// Messages pulled or tombstones applied per mailbox per anti-entropy answer. Default 64.
    pub replica_repair_batch: usize,
    /// Most mailbox digests sent to one peer in answer to one anti-entropy summary (the
    /// mailboxes of the differing buckets, from a random bucket on). Default 4,096.
    pub replica_repair_mailboxes: usize,
    /// Most deposit receipts held waiting for peers; beyond it a receipt is dropped
    /// (counted). Default 10,000.
    pub replica_held_max: usize,
    /// Erased replicated mailboxes remembered (so that a peer that missed the erasure does
    /// not repair them back). Default 10,000.
    pub replica_erased_max: usize,
    /// This node's id (its mesh identity): replicated mailboxes must name it. Set by the
    /// driver from the mesh, never from a file. `None`: replicated mailboxes are refused.
    #[serde(skip)]
    pub node_id: Option<[u8; 32]>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            mailboxes_max: 100_000,
            mailbox_messages_max: 10_000,
            mailbox_bytes_max: 64 * 1024 * 1024,
            devices_max: 8,
            devices_removed_max: 64,
            retention_ms_max: 30 * 24 * 3600 * 1000,
            deposits_per_min: 600,
            prekeys_max: 200,
            fetch_limit_max: 100,
            reply_bytes_max: 4096,
            sweep_batch_max: 10_000,
            expiry_bucket_ms: 60_000,
            expiry_granularity_ms: 3_600_000,
            unused_mailbox_ttl_ms: 24 * 3600 * 1000,
            write_quorum: 2,
            replica_ack_timeout_ms: 10_000,
            replica_repair_interval_ms: 30_000,
            replica_repair_batch: 64,
            replica_repair_mailboxes: 4096,
            replica_held_max: 10_000,
            replica_erased_max: 10_000,
            node_id: None,
        }
    }
}
