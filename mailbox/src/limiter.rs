//! The per-connection request rate limit of the client API: a bounded table of token buckets
//! keyed by remote socket address. Sans-IO: the caller passes the time.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Per-connection request rate limiter (token bucket per remote socket address), bounded.
#[derive(Debug)]
pub struct ConnectionLimiter {
    per_min: u64,
    max: usize,
    buckets: BTreeMap<SocketAddr, (u64, u64)>,
}

impl ConnectionLimiter {
    /// `per_min` requests per minute per connection, tracking at most `max` connections.
    pub fn new(per_min: u64, max: usize) -> ConnectionLimiter {
        ConnectionLimiter {
            per_min,
            max,
            buckets: BTreeMap::new(),
        }
    }

    /// Takes one token for `peer`; `Err(retry_after_ms)` when none is left.
    pub fn check(&mut self, peer: SocketAddr, now_ms: u64) -> Result<(), u64> {
        // Units of 1/60,000 token: `per_min` tokens per minute is `per_min` units per ms.
        const TOKEN: u64 = 60_000;
        let capacity = self.per_min.saturating_mul(TOKEN);
        if !self.buckets.contains_key(&peer) && self.buckets.len() >= self.max {
            // Forget the connection seen longest ago (its bucket has refilled the most).
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&oldest);
            }
        }
        let (units, last) = self.buckets.entry(peer).or_insert((capacity, now_ms));
        let elapsed = now_ms.saturating_sub(*last);
        *units = units
            .saturating_add(elapsed.saturating_mul(self.per_min))
            .min(capacity);
        *last = (*last).max(now_ms);
        if *units >= TOKEN {
            *units -= TOKEN;
            Ok(())
        } else {
            Err((TOKEN - *units).div_ceil(self.per_min.max(1)))
        }
    }
}
