//! Queue limits. Defaults follow the scheduling policy (`shared/seeds/002_…`): payloads of at
//! most 1 MiB, a 30-minute execution timeout, 5 concurrent tasks per worker and 100 task
//! creations per owner per day.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits of a [`crate::queue::TimerQueue`]; every queue and table is bounded here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Largest payload accepted (bytes). Default 1 MiB.
    pub payload_bytes_max: usize,
    /// Most tasks held per category (scheduled, running and quarantined). Default 1,000,000.
    pub queue_tasks_max: usize,
    /// A fired task not completed or failed within this time is due again. Default 1800 s.
    pub execution_timeout_secs: u64,
    /// Most tasks running at once. Default 5.
    pub concurrency_max: usize,
    /// Tasks an owner may create per UTC day. Default 100.
    pub owner_tasks_per_day_max: u32,
    /// Most owners whose daily count is tracked. Default 100,000.
    pub owners_tracked_max: usize,
    /// Longest owner tag (bytes). Default 64.
    pub owner_tag_bytes_max: usize,
    /// Failed executions after which a task is quarantined. Default 5.
    pub attempts_max: u32,
    /// First retry delay; doubled after every failure. Default 1000 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 1 hour.
    pub backoff_max_ms: u64,
    /// Furthest due time accepted, in days from now. Default 365.
    pub horizon_days_max: u32,
    /// Seed for task ids in tests and the simulator; `None` draws from the OS. Not readable
    /// from a config file (task ids would repeat at every start).
    #[serde(skip)]
    pub rng_seed: Option<u64>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            payload_bytes_max: 1024 * 1024,
            queue_tasks_max: 1_000_000,
            execution_timeout_secs: 30 * 60,
            concurrency_max: 5,
            owner_tasks_per_day_max: 100,
            owners_tracked_max: 100_000,
            owner_tag_bytes_max: 64,
            attempts_max: 5,
            backoff_base_ms: 1000,
            backoff_max_ms: 3600 * 1000,
            horizon_days_max: 365,
            rng_seed: None,
        }
    }
}

impl QueueConfig {
    /// The execution timeout.
    pub fn execution_timeout(&self) -> Duration {
        Duration::from_secs(self.execution_timeout_secs)
    }

    /// The delay before retry number `attempts` (1-based): base × 2^(attempts−1), capped.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u64
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u64::MAX);
        Duration::from_millis(
            self.backoff_base_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}
