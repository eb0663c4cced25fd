//! Request rate limits of the client API: bounded tables of token buckets, keyed by source
//! address ([`source_key`]: per IPv4 address or IPv6 /64, so that opening new connections or
//! walking a /64 does not buy a new budget; loopback clients per connection, [`limit_key`]).
//! Sans-IO: the caller passes the time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The unit a per-address limit counts: the IPv4 address, or the /64 of an IPv6 address (one
/// subscriber usually holds a whole /64). IPv4-mapped IPv6 addresses count as IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Token buckets per key: `count` operations per `period_ms`, in a burst of at most `count`;
/// at most `max` keys tracked (the one seen longest ago is forgotten first, in O(log n)).
#[derive(Debug)]
pub struct RateLimiter<K> {
    count: u64,
    period_ms: u64,
    max: usize,
    /// key → (units, last seen); a token is `period_ms` units, refilled `count` per ms.
    buckets: BTreeMap<K, (u64, u64)>,
    by_last: BTreeSet<(u64, K)>,
}

impl<K: Ord + Copy> RateLimiter<K> {
    /// `count` operations per `period_ms` per key, tracking at most `max` keys.
    pub fn per_period(count: u64, period_ms: u64, max: usize) -> RateLimiter<K> {
        RateLimiter {
            count,
            period_ms: period_ms.max(1),
            max,
            buckets: BTreeMap::new(),
            by_last: BTreeSet::new(),
        }
    }

    /// Takes one token for `key`; `Err(retry_after_ms)` when none is left.
    pub fn check(&mut self, key: K, now_ms: u64) -> Result<(), u64> {
        let token = self.period_ms;
        let capacity = self.count.saturating_mul(token);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max.max(1) {
            // Forget the key seen longest ago (its bucket has refilled the most).
            if let Some((_, oldest)) = self.by_last.pop_first() {
                self.buckets.remove(&oldest);
            }
        }
        let (units, last) = self.buckets.entry(key).or_insert((capacity, now_ms));
        self.by_last.remove(&(*last, key));
        let elapsed = now_ms.saturating_sub(*last);
        *units = units
            .saturating_add(elapsed.saturating_mul(self.count))
            .min(capacity);
        *last = (*last).max(now_ms);
        self.by_last.insert((*last, key));
        if *units >= token {
            *units -= token;
            Ok(())
        } else if self.count == 0 {
            Err(self.period_ms)
        } else {
            Err((token - *units).div_ceil(self.count))
        }
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What the API's operation limit counts a request against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LimitKey {
    /// A source address ([`source_key`]): every connection from it shares one budget.
    Source(IpAddr),
    /// One connection (a loopback client, see [`limit_key`]).
    Connection(SocketAddr),
}

/// The key a request from `peer` is limited under: its source address ([`source_key`]: the
/// IPv4 address or IPv6 /64), so that opening new connections buys no new budget. With
/// `loopback_per_connection`, a loopback peer is limited per connection instead: clients on
/// this host (a reverse proxy, a devnet, tests) all share one address, and a reverse proxy
/// would otherwise make every client share one budget.
pub fn limit_key(peer: SocketAddr, loopback_per_connection: bool) -> LimitKey {
    let source = source_key(peer.ip());
    if loopback_per_connection && (peer.ip().is_loopback() || source.is_loopback()) {
        LimitKey::Connection(peer)
    } else {
        LimitKey::Source(source)
    }
}

/// The API's request rate limiter: a token bucket per [`LimitKey`] (source address, or
/// connection on loopback), bounded.
pub type ConnectionLimiter = RateLimiter<LimitKey>;

impl RateLimiter<LimitKey> {
    /// `per_min` requests per minute per key, tracking at most `max` keys.
    pub fn new(per_min: u64, max: usize) -> ConnectionLimiter {
        RateLimiter::per_period(per_min, 60_000, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_key_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    /// Finding 11(d)/15: the budget was per socket address, so a client opening a new
    /// connection for each request was never limited.
    #[test]
    fn new_connections_from_one_address_share_one_budget() {
        let mut limiter = ConnectionLimiter::new(5, 16);
        let mut refused = 0;
        for port in 4000..4010u16 {
            let peer = SocketAddr::from(([192, 0, 2, 7], port));
            if limiter.check(limit_key(peer, true), 1_000).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 5, "10 connections from one address, 5 ops/min");
        // An IPv6 /64 is one source; another /64 and another IPv4 address have their own.
        let v6 = |s: &str, port| SocketAddr::new(s.parse().unwrap(), port);
        assert_eq!(
            limit_key(v6("2001:db8:1:2::1", 1), true),
            limit_key(v6("2001:db8:1:2:ffff::9", 2), true)
        );
        limiter
            .check(limit_key(v6("2001:db8:1:3::1", 1), true), 1_000)
            .unwrap();
        limiter
            .check(limit_key("192.0.2.8:4000".parse().unwrap(), true), 1_000)
            .unwrap();
        // Loopback is per connection unless asked otherwise (IPv4-mapped included).
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:4001".parse().unwrap();
        assert_ne!(limit_key(a, true), limit_key(b, true));
        assert_eq!(limit_key(a, false), limit_key(b, false));
        assert_ne!(
            limit_key("[::1]:1".parse().unwrap(), true),
            limit_key("[::1]:2".parse().unwrap(), true)
        );
    }

    #[test]
    fn a_full_table_forgets_the_key_seen_longest_ago() {
        let mut limiter: RateLimiter<u32> = RateLimiter::per_period(1, 60_000, 2);
        limiter.check(1, 0).unwrap();
        limiter.check(2, 10).unwrap();
        assert!(limiter.check(1, 20).is_err());
        limiter.check(3, 30).unwrap(); // forgets 2 (seen at 10; 1 was seen at 20)
        assert_eq!(limiter.len(), 2);
        assert!(limiter.check(1, 40).is_err(), "1 was kept");
        limiter.check(2, 50).unwrap();
    }
}
