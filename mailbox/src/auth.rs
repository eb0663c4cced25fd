//! Owner authentication, sans-IO: challenge/response login with a registered device key,
//! short-lived session tokens, and one-time tickets for WebSocket streams.
//!
//! - A **challenge** (32 random bytes) is bound to a mailbox and a device key, lives
//!   `challenge_ttl_ms`, and is consumed by the first login attempt, successful or not.
//! - **Login** verifies the device's Ed25519 signature over [`login_transcript`] (which
//!   names this node's `audience`, so a signature for one node cannot be replayed to
//!   another) and returns a bearer token valid `session_ttl_ms`. Only the token's SHA-256
//!   is kept.
//! - A **stream ticket** is a one-time token valid `ticket_ttl_ms`, for the WebSocket
//!   upgrade (browsers cannot set headers on it); redeeming it consumes it.
//!
//! Every table is bounded. When the session or ticket table is full of live entries, new
//! ones are refused with [`MailboxError::RateLimited`] rather than evicting live ones. The
//! challenge table is shared fairly between sources: each source (an IPv4 address or IPv6 /64,
//! see [`crate::limiter::source_key`]) holds at most `challenges_per_source_max` outstanding
//! challenges, and a full table drops its oldest challenge for a new one (a real login answers
//! its challenge within a round trip, so a flood has to refill the whole table faster than
//! that, from `challenges_max / challenges_per_source_max` sources at least).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use whispr_protocol::{MailboxId, UnixTime};

use crate::error::{MailboxError, Result};

pub use whispr_protocol::mailbox_api::{LOGIN_PREFIX, login_transcript};

/// Limits and lifetimes of [`Sessions`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a challenge can be answered. Default 60 s.
    pub challenge_ttl_ms: u64,
    /// How long a session token is valid. Default 15 minutes.
    pub session_ttl_ms: u64,
    /// How long a stream ticket can be redeemed. Default 30 s.
    pub ticket_ttl_ms: u64,
    /// Most outstanding challenges. Default 10,000. When full, the oldest is dropped.
    pub challenges_max: usize,
    /// Most outstanding challenges per source (IPv4 address or IPv6 /64); past it the source
    /// is answered 429. Default 16.
    pub challenges_per_source_max: usize,
    /// Most live sessions. Default 100,000.
    pub sessions_max: usize,
    /// Most outstanding tickets. Default 10,000.
    pub tickets_max: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            challenge_ttl_ms: 60_000,
            session_ttl_ms: 15 * 60_000,
            ticket_ttl_ms: 30_000,
            challenges_max: 10_000,
            challenges_per_source_max: 16,
            sessions_max: 100_000,
            tickets_max: 10_000,
        }
    }
}

/// An authenticated owner device. Its `Debug` leaves out the token hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The mailbox it may read.
    pub mailbox: MailboxId,
    /// The device key it logged in with.
    pub device: [u8; 32],
    /// When the token stops working.
    pub expires_at: UnixTime,
    /// SHA-256 of the session token (streams opened with a ticket stay tied to it).
    pub token_hash: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("mailbox", &self.mailbox)
            .field("device", &hex::encode(self.device))
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A bounded table of entries that expire.
struct Table<V> {
    entries: BTreeMap<[u8; 32], (V, u64, Option<IpAddr>)>,
    by_expiry: BTreeSet<(u64, [u8; 32])>,
    /// Entries per source, for those inserted with one.
    per_source: BTreeMap<IpAddr, usize>,
    max: usize,
}

impl<V> Table<V> {
    fn new(max: usize) -> Self {
        Table {
            entries: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            per_source: BTreeMap::new(),
            max,
        }
    }

    /// Removes `key`; its value and expiry time.
    fn remove(&mut self, key: &[u8; 32]) -> Option<(V, u64)> {
        let (value, exp, source) = self.entries.remove(key)?;
        self.by_expiry.remove(&(exp, *key));
        if let Some(source) = source
            && let Some(n) = self.per_source.get_mut(&source)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some((value, exp))
    }

    fn prune(&mut self, now: UnixTime) {
        while let Some((exp, key)) = self.by_expiry.first().copied() {
            if exp > now.0 {
                break;
            }
            let _ = self.remove(&key);
        }
    }

    /// Inserts an entry. When the table is full of live entries: refused, or with
    /// `evict_oldest`, the entry closest to expiry is dropped. With a `source`, at most
    /// `per_source_max` live entries per source.
    fn insert(
        &mut self,
        now: UnixTime,
        key: [u8; 32],
        value: V,
        expires: u64,
        source: Option<(IpAddr, usize, bool)>,
    ) -> Result<()> {
        self.prune(now);
        let evict_oldest = source.is_some_and(|(_, _, evict)| evict);
        if let Some((source, per_source_max, _)) = source
            && self.per_source.get(&source).copied().unwrap_or(0) >= per_source_max
        {
            let retry_after_ms = self
                .entries
                .values()
                .filter(|(_, _, s)| *s == Some(source))
                .map(|(_, exp, _)| exp.saturating_sub(now.0).max(1))
                .min()
                .unwrap_or(1000);
            return Err(MailboxError::RateLimited {
                what: "outstanding challenges from this address",
                retry_after_ms,
            });
        }
        if self.entries.len() >= self.max {
            if evict_oldest && let Some((_, oldest)) = self.by_expiry.first().copied() {
                let _ = self.remove(&oldest);
            } else {
                let retry_after_ms = self
                    .by_expiry
                    .first()
                    .map_or(1000, |(exp, _)| exp.saturating_sub(now.0).max(1));
                return Err(MailboxError::RateLimited {
                    what: "authentication table full",
                    retry_after_ms,
                });
            }
        }
        let source = source.map(|(s, _, _)| s);
        if let Some(source) = source {
            *self.per_source.entry(source).or_insert(0) += 1;
        }
        self.entries.insert(key, (value, expires, source));
        self.by_expiry.insert((expires, key));
        Ok(())
    }

    fn take(&mut self, now: UnixTime, key: &[u8; 32]) -> Option<V> {
        let (value, exp) = self.remove(key)?;
        (exp > now.0).then_some(value)
    }

    fn get(&self, now: UnixTime, key: &[u8; 32]) -> Option<&V> {
        self.entries
            .get(key)
            .and_then(|(v, exp, _)| (*exp > now.0).then_some(v))
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let doomed: Vec<[u8; 32]> = self
            .entries
            .iter()
            .filter(|(_, (v, _, _))| !keep(v))
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            let _ = self.remove(&k);
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Outstanding challenges, sessions and tickets.
pub struct Sessions<R: rand::CryptoRng> {
    config: AuthConfig,
    audience: String,
    rng: R,
    challenges: Table<(MailboxId, [u8; 32])>,
    sessions: Table<Session>,
    tickets: Table<Session>,
}

impl<R: rand::CryptoRng> std::fmt::Debug for Sessions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn hash(token: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl<R: rand::CryptoRng> Sessions<R> {
    /// Empty tables. `audience` names this node in login signatures.
    pub fn new(config: AuthConfig, audience: String, rng: R) -> Self {
        Sessions {
            challenges: Table::new(config.challenges_max),
            sessions: Table::new(config.sessions_max),
            tickets: Table::new(config.tickets_max),
            config,
            audience,
            rng,
        }
    }

    /// The audience string devices sign.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Issues a challenge for `device` on `mailbox`, counted against no source (tests and
    /// in-process callers). Does not reveal whether either exists.
    pub fn challenge(
        &mut self,
        now: UnixTime,
        mailbox: MailboxId,
        device: [u8; 32],
    ) -> Result<([u8; 32], UnixTime)> {
        self.issue(now, None, mailbox, device)
    }

    /// Issues a challenge asked for from `source` (the client's address): at most
    /// `challenges_per_source_max` outstanding per IPv4 address or IPv6 /64; a full table drops
    /// its oldest challenge. Does not reveal whether the mailbox or device exists.
    pub fn challenge_from(
        &mut self,
        now: UnixTime,
        source: IpAddr,
        mailbox: MailboxId,
        device: [u8; 32],
    ) -> Result<([u8; 32], UnixTime)> {
        let source = crate::limiter::source_key(source);
        self.issue(now, Some(source), mailbox, device)
    }

    fn issue(
        &mut self,
        now: UnixTime,
        source: Option<IpAddr>,
        mailbox: MailboxId,
        device: [u8; 32],
    ) -> Result<([u8; 32], UnixTime)> {
        let mut challenge = [0u8; 32];
        self.rng.fill_bytes(&mut challenge);
        let expires = now.0.saturating_add(self.config.challenge_ttl_ms);
        let source = source.map(|s| (s, self.config.challenges_per_source_max.max(1), true));
        self.challenges
            .insert(now, challenge, (mailbox, device), expires, source)?;
        Ok((challenge, UnixTime(expires)))
    }

    /// Answers a challenge. The challenge is consumed whatever the outcome. `is_device`
    /// says whether the core has `device` registered on `mailbox`.
    pub fn login(
        &mut self,
        now: UnixTime,
        mailbox: MailboxId,
        device: [u8; 32],
        challenge: [u8; 32],
        signature: [u8; 64],
        is_device: bool,
    ) -> Result<([u8; 32], UnixTime)> {
        let Some((c_mailbox, c_device)) = self.challenges.take(now, &challenge) else {
            return Err(MailboxError::Unauthorized(
                "unknown, expired or used challenge",
            ));
        };
        if c_mailbox != mailbox || c_device != device {
            return Err(MailboxError::Unauthorized(
                "challenge issued for another mailbox or device",
            ));
        }
        let key =
            VerifyingKey::from_bytes(&device).map_err(|_| MailboxError::BadSignature("login"))?;
        key.verify_strict(
            &login_transcript(&self.audience, &mailbox, &device, &challenge),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| MailboxError::BadSignature("login"))?;
        if !is_device {
            return Err(MailboxError::Unauthorized("not a device of this mailbox"));
        }
        let mut token = [0u8; 32];
        self.rng.fill_bytes(&mut token);
        let expires = now.0.saturating_add(self.config.session_ttl_ms);
        let session = Session {
            mailbox,
            device,
            expires_at: UnixTime(expires),
            token_hash: hash(&token),
        };
        self.sessions
            .insert(now, hash(&token), session, expires, None)?;
        Ok((token, UnixTime(expires)))
    }

    /// The session a bearer token stands for.
    pub fn authenticate(&self, now: UnixTime, token: &[u8; 32]) -> Result<Session> {
        self.sessions
            .get(now, &hash(token))
            .copied()
            .ok_or(MailboxError::Unauthorized(
                "unknown or expired session token",
            ))
    }

    /// True while the session with this token hash exists and has not expired (a stream
    /// checks it, so logout, device removal and erasure end open streams).
    pub fn is_live(&self, now: UnixTime, token_hash: &[u8; 32]) -> bool {
        self.sessions.get(now, token_hash).is_some()
    }

    /// Ends a session.
    pub fn logout(&mut self, now: UnixTime, token: &[u8; 32]) {
        self.end(now, &hash(token));
    }

    /// Ends the session with this token hash ([`Session::token_hash`]).
    pub fn end(&mut self, now: UnixTime, token_hash: &[u8; 32]) {
        let _ = self.sessions.take(now, token_hash);
    }

    /// Issues a one-time stream ticket for an authenticated session.
    pub fn ticket(&mut self, now: UnixTime, session: Session) -> Result<([u8; 32], UnixTime)> {
        let mut ticket = [0u8; 32];
        self.rng.fill_bytes(&mut ticket);
        let expires = now
            .0
            .saturating_add(self.config.ticket_ttl_ms)
            .min(session.expires_at.0);
        self.tickets
            .insert(now, hash(&ticket), session, expires, None)?;
        Ok((ticket, UnixTime(expires)))
    }

    /// Redeems a ticket for `mailbox` (consumed whatever the outcome).
    pub fn redeem(
        &mut self,
        now: UnixTime,
        mailbox: &MailboxId,
        ticket: &[u8; 32],
    ) -> Result<Session> {
        let session = self
            .tickets
            .take(now, &hash(ticket))
            .ok_or(MailboxError::Unauthorized(
                "unknown, expired or used ticket",
            ))?;
        if &session.mailbox != mailbox {
            return Err(MailboxError::Unauthorized(
                "ticket issued for another mailbox",
            ));
        }
        Ok(session)
    }

    /// Drops every session and ticket of a mailbox (after erasure), or of one device.
    pub fn revoke(&mut self, mailbox: &MailboxId, device: Option<&[u8; 32]>) {
        let keep = |s: &Session| !(&s.mailbox == mailbox && device.is_none_or(|d| &s.device == d));
        self.sessions.retain(keep);
        self.tickets.retain(keep);
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
