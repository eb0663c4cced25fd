//! Directory authorities: the pinned network file, votes, the consensus and its signatures.
//!
//! A small set of **directory authorities** (Tor and Katzenpost model), each with its own
//! Ed25519 key, decides who is in the network. Per epoch each authority signs a [`SignedVote`]:
//! the node descriptors it admits by its operator's policy. The **consensus** for the epoch is
//! computed from the votes by [`compute_consensus`], deterministically: a node is in it iff
//! at least [`Network::threshold`] (more than half) of the pinned authorities admit it. Each
//! authority signs the encoded [`ConsensusBody`]; a [`Consensus`] is accepted by
//! [`Consensus::verify`] only with valid signatures from at least the threshold of distinct
//! pinned authorities, inside its validity window. A [`Directory`] for routing is then built
//! from the verified consensus only ([`Directory::from_consensus`]).
//!
//! Clients and nodes pin the authorities in a [`Network`] file (keys, URLs, threshold), so a
//! directory from any source (a mirror, a node, a man in the middle) is checked the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::directory::{
    ADDRESS_LEN_MAX, DIRECTORY_LEN_MAX, DIRECTORY_NODES_MAX, Directory, NodeDescriptor,
    SignedDescriptor,
};
use crate::wire;
use crate::{Error, NodeId, Result, UnixTime};

/// Domain separation of an authority's signature on a consensus body.
pub const CONSENSUS_SIGNATURE_PREFIX: &[u8] = b"whispr-consensus-v1";
/// Domain separation of an authority's signature on its vote.
pub const VOTE_SIGNATURE_PREFIX: &[u8] = b"whispr-vote-v1";
/// Most authorities a network file may pin.
pub const AUTHORITIES_MAX: usize = 9;
/// Longest validity window a consensus may claim.
pub const CONSENSUS_VALIDITY_MAX: Duration = Duration::from_secs(3 * 24 * 3600);
/// How early before its `valid_after` a consensus is accepted (clock skew).
pub const CONSENSUS_CLOCK_SKEW_MAX: Duration = Duration::from_secs(60);
/// Largest encoded consensus or vote (a full directory plus signatures).
pub const CONSENSUS_LEN_MAX: usize = DIRECTORY_LEN_MAX + 64 * 1024;
/// Most signature entries in a consensus (pinned or not).
pub const SIGNATURES_MAX: usize = 2 * AUTHORITIES_MAX;
/// Longest network file, in bytes.
pub const NETWORK_FILE_LEN_MAX: usize = 16 * 1024;
/// The first line of a network file.
pub const NETWORK_FILE_MAGIC: &str = "whispr-network 1";

/// A pinned directory authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// Its Ed25519 public key.
    pub key: [u8; 32],
    /// Base URL of its HTTP API (it serves `GET /v1/consensus`).
    pub url: String,
}

/// Longest mean mixing delay per hop a network may ask for, in ms: relays hold a packet at
/// most `hop_delay_max_ms` (60 s by default), and the delay of one hop is drawn from an
/// exponential with this mean.
pub const MIX_DELAY_MEAN_MAX_MS: u64 = 10_000;
/// Most cover packets per minute a network may ask each client to send.
pub const COVER_PER_MIN_MAX: f64 = 600.0;

/// The traffic parameters every client of a network uses (Loopix's per-hop delay mean and
/// cover rate): a client whose parameters differ from the others' stands out, so they are the
/// network's, stated in its network file (`mixing DELAY_MS COVER_PER_MIN`), not each user's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mixing {
    /// Mean mixing delay per hop, in ms (0 turns mixing off: test networks only).
    pub delay_ms: u64,
    /// Cover packets per minute while a client follows its mailboxes, in thousandths.
    cover_per_min_milli: u32,
}

impl Mixing {
    /// Parameters with `delay_ms` per hop (at most [`MIX_DELAY_MEAN_MAX_MS`]) and
    /// `cover_per_min` (0 to [`COVER_PER_MIN_MAX`], kept to a thousandth).
    pub fn new(delay_ms: u64, cover_per_min: f64) -> Result<Mixing> {
        if delay_ms > MIX_DELAY_MEAN_MAX_MS {
            return Err(Error::InvalidArgument(
                "a network's mean mixing delay is at most 10 s per hop",
            ));
        }
        if !(0.0..=COVER_PER_MIN_MAX).contains(&cover_per_min) {
            return Err(Error::InvalidArgument(
                "a network's cover rate is 0 to 600 packets per minute",
            ));
        }
        // In range and finite (NaN fails `contains`), so the cast cannot saturate.
        let cover_per_min_milli = (cover_per_min * 1000.0).round() as u32;
        Ok(Mixing {
            delay_ms,
            cover_per_min_milli,
        })
    }

    /// Cover packets per minute.
    pub fn cover_per_min(&self) -> f64 {
        f64::from(self.cover_per_min_milli) / 1000.0
    }
}

/// The pinned authorities of a network and the number of signatures a consensus needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    authorities: Vec<Authority>,
    threshold: usize,
    replicas: Option<usize>,
    mixing: Option<Mixing>,
}

impl Network {
    /// A network of 1 to [`AUTHORITIES_MAX`] authorities with distinct keys that are Ed25519
    /// points. `threshold` defaults to the majority (`n / 2 + 1`) and may not be lower.
    pub fn new(authorities: Vec<Authority>, threshold: Option<usize>) -> Result<Network> {
        let n = authorities.len();
        if n == 0 || n > AUTHORITIES_MAX {
            return Err(Error::InvalidArgument("a network has 1 to 9 authorities"));
        }
        let keys: BTreeSet<[u8; 32]> = authorities.iter().map(|a| a.key).collect();
        if keys.len() != n {
            return Err(Error::InvalidArgument("two authorities share a key"));
        }
        if authorities
            .iter()
            .any(|a| VerifyingKey::from_bytes(&a.key).is_err())
        {
            return Err(Error::InvalidArgument(
                "an authority key is not an Ed25519 point",
            ));
        }
        if authorities
            .iter()
            .any(|a| a.url.len() > ADDRESS_LEN_MAX || a.url.chars().any(char::is_whitespace))
        {
            return Err(Error::InvalidArgument("an authority URL is invalid"));
        }
        let majority = n / 2 + 1;
        let threshold = threshold.unwrap_or(majority);
        if threshold < majority || threshold > n {
            return Err(Error::InvalidArgument(
                "the threshold must be more than half of the authorities, at most all",
            ));
        }
        Ok(Network {
            authorities,
            threshold,
            replicas: None,
            mixing: None,
        })
    }

    /// The same network, stating that every mailbox lives on `replicas` mailbox nodes (1 to
    /// [`crate::mailbox_api::REPLICAS_MAX`]; `docs/replication.md`). Clients that pin the
    /// network create their mailboxes with that many replicas.
    pub fn with_replicas(mut self, replicas: usize) -> Result<Network> {
        if replicas == 0 || replicas > crate::mailbox_api::REPLICAS_MAX {
            return Err(Error::InvalidArgument(
                "a network's replica count is 1 to 5",
            ));
        }
        self.replicas = Some(replicas);
        Ok(self)
    }

    /// Mailbox replicas the network asks for (`replicas` line), if it says.
    pub fn replicas(&self) -> Option<usize> {
        self.replicas
    }

    /// The same network, stating the mixing delay and cover rate of its clients (`mixing`
    /// line). Clients that pin the network use them (`whispr init`).
    pub fn with_mixing(mut self, mixing: Mixing) -> Network {
        self.mixing = Some(mixing);
        self
    }

    /// The mixing parameters the network states (`mixing` line), if it does.
    pub fn mixing(&self) -> Option<Mixing> {
        self.mixing
    }

    /// Parses a network file (see [`Network::to_text`] and `docs/protocol.md`).
    pub fn parse(text: &str) -> Result<Network> {
        const WHAT: &str = "network file";
        if text.len() > NETWORK_FILE_LEN_MAX {
            return Err(Error::TooLarge {
                what: WHAT,
                len: text.len(),
                max: NETWORK_FILE_LEN_MAX,
            });
        }
        let bad = |reason| Error::Malformed { what: WHAT, reason };
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        if lines.next() != Some(NETWORK_FILE_MAGIC) {
            return Err(bad("the first line must be `whispr-network 1`"));
        }
        let mut threshold = None;
        let mut replicas = None;
        let mut mixing = None;
        let mut authorities = Vec::new();
        for line in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["threshold", t] if threshold.is_none() => {
                    threshold = Some(t.parse::<usize>().map_err(|_| bad("bad threshold"))?);
                }
                ["replicas", r] if replicas.is_none() => {
                    replicas = Some(r.parse::<usize>().map_err(|_| bad("bad replica count"))?);
                }
                ["mixing", delay, cover] if mixing.is_none() => {
                    let delay = delay.parse::<u64>().map_err(|_| bad("bad mixing delay"))?;
                    let cover = cover.parse::<f64>().map_err(|_| bad("bad cover rate"))?;
                    mixing = Some(
                        Mixing::new(delay, cover)
                            .map_err(|_| bad("mixing delay or cover rate out of range"))?,
                    );
                }
                ["authority", key, url] => {
                    if authorities.len() >= AUTHORITIES_MAX {
                        return Err(bad("more than 9 authorities"));
                    }
                    let key = hex32(key).ok_or(bad("an authority key is not 64 hex digits"))?;
                    authorities.push(Authority {
                        key,
                        url: (*url).to_owned(),
                    });
                }
                _ => return Err(bad("unknown line")),
            }
        }
        let mut network = Network::new(authorities, threshold)?;
        if let Some(r) = replicas {
            network = network.with_replicas(r)?;
        }
        network.mixing = mixing;
        Ok(network)
    }

    /// The network file: a magic line, the threshold, then one line per authority (key in
    /// lowercase hex, URL).
    pub fn to_text(&self) -> String {
        let mut out = format!("{NETWORK_FILE_MAGIC}\nthreshold {}\n", self.threshold);
        if let Some(r) = self.replicas {
            let _ = writeln!(out, "replicas {r}");
        }
        if let Some(m) = self.mixing {
            let _ = writeln!(out, "mixing {} {}", m.delay_ms, m.cover_per_min());
        }
        for a in &self.authorities {
            let _ = writeln!(out, "authority {} {}", hex(&a.key), a.url);
        }
        out
    }

    /// The pinned authorities, in file order.
    pub fn authorities(&self) -> &[Authority] {
        &self.authorities
    }

    /// Signatures a consensus needs.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether `key` is a pinned authority.
    pub fn is_pinned(&self, key: &[u8; 32]) -> bool {
        self.authorities.iter().any(|a| &a.key == key)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = text.get(2 * i..2 * i + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn prefixed(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len().saturating_add(body.len()));
    out.extend_from_slice(prefix);
    out.extend_from_slice(body);
    out
}

fn key32(what: &'static str, bytes: &[u8]) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).map_err(|_| Error::BadLength {
        what,
        len: bytes.len(),
        expected: 32,
    })
}

fn check_window(valid_after: UnixTime, valid_until: UnixTime) -> Result<()> {
    if valid_until <= valid_after {
        return Err(Error::Malformed {
            what: "consensus",
            reason: "valid until before valid after",
        });
    }
    if valid_until.saturating_since(valid_after) > CONSENSUS_VALIDITY_MAX {
        return Err(Error::Malformed {
            what: "consensus",
            reason: "validity longer than 3 days",
        });
    }
    Ok(())
}

/// Verifies descriptors listed in a vote or consensus body at `at`: every one valid, one per
/// node, in strictly increasing node-id order.
fn check_descriptors(
    what: &'static str,
    at: UnixTime,
    descriptors: &[wire::SignedDescriptor],
) -> Result<Vec<NodeDescriptor>> {
    if descriptors.len() > DIRECTORY_NODES_MAX {
        return Err(Error::TooLarge {
            what,
            len: descriptors.len(),
            max: DIRECTORY_NODES_MAX,
        });
    }
    let mut out: Vec<NodeDescriptor> = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        let verified = SignedDescriptor(d.clone()).verify(at)?;
        if out
            .last()
            .is_some_and(|last| last.node_id >= verified.node_id)
        {
            return Err(Error::Malformed {
                what,
                reason: "descriptors not in strictly increasing node-id order",
            });
        }
        out.push(verified);
    }
    Ok(out)
}

/// What an authority admits for an epoch (the body of a vote).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteContent {
    /// The voting authority's key.
    pub authority: [u8; 32],
    /// The consensus epoch voted on.
    pub epoch: u64,
    /// Start of the consensus's validity.
    pub valid_after: UnixTime,
    /// End of the consensus's validity.
    pub valid_until: UnixTime,
    /// The admitted descriptors (any order; [`VoteContent::sign`] sorts them by node id).
    pub descriptors: Vec<SignedDescriptor>,
}

/// A vote as published: [`VoteContent`] signed by its authority.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedVote(pub wire::Vote);

impl VoteContent {
    /// Signs the vote with the authority's key (which must be `authority`). Descriptors that
    /// are not valid at `valid_after` are left out, as is all but the newest one of a node.
    pub fn sign(&self, key: &SigningKey) -> Result<SignedVote> {
        if key.verifying_key().to_bytes() != self.authority {
            return Err(Error::InvalidArgument("vote signed with another key"));
        }
        check_window(self.valid_after, self.valid_until)?;
        let mut by_node: BTreeMap<NodeId, (NodeDescriptor, &SignedDescriptor)> = BTreeMap::new();
        for signed in &self.descriptors {
            let Ok(d) = signed.verify(self.valid_after) else {
                continue;
            };
            let newer = by_node
                .get(&d.node_id)
                .is_none_or(|(held, _)| d.published_at > held.published_at);
            if newer {
                by_node.insert(d.node_id, (d, signed));
            }
        }
        let body = wire::encode(&wire::VoteBody {
            version: wire::VERSION,
            authority_key: self.authority.to_vec(),
            epoch: self.epoch,
            valid_after_ms: self.valid_after.0,
            valid_until_ms: self.valid_until.0,
            descriptors: by_node.values().map(|(_, s)| s.0.clone()).collect(),
        });
        let signature = key.sign(&prefixed(VOTE_SIGNATURE_PREFIX, &body));
        Ok(SignedVote(wire::Vote {
            version: wire::VERSION,
            body,
            signature: signature.to_bytes().to_vec(),
        }))
    }
}

impl SignedVote {
    /// Encodes it as a `Vote` protobuf.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.0)
    }

    /// Decodes a `Vote` protobuf (not yet verified).
    pub fn decode(bytes: &[u8]) -> Result<SignedVote> {
        wire::decode(bytes, CONSENSUS_LEN_MAX).map(SignedVote)
    }

    /// Checks that a pinned authority of `network` signed it, and that its window and
    /// descriptors are well formed (each valid at `valid_after`, sorted, one per node).
    pub fn verify(&self, network: &Network) -> Result<VoteContent> {
        let body: wire::VoteBody = wire::decode(&self.0.body, CONSENSUS_LEN_MAX)?;
        let authority = key32("vote authority key", &body.authority_key)?;
        if !network.is_pinned(&authority) {
            return Err(Error::BadSignature("vote from an unpinned authority"));
        }
        let verifying =
            VerifyingKey::from_bytes(&authority).map_err(|_| Error::BadSignature("vote"))?;
        let signature = ed25519_dalek::Signature::from_slice(&self.0.signature)
            .map_err(|_| Error::BadSignature("vote"))?;
        verifying
            .verify_strict(&prefixed(VOTE_SIGNATURE_PREFIX, &self.0.body), &signature)
            .map_err(|_| Error::BadSignature("vote"))?;
        let valid_after = UnixTime(body.valid_after_ms);
        let valid_until = UnixTime(body.valid_until_ms);
        check_window(valid_after, valid_until)?;
        check_descriptors("vote", valid_after, &body.descriptors)?;
        Ok(VoteContent {
            authority,
            epoch: body.epoch,
            valid_after,
            valid_until,
            descriptors: body.descriptors.into_iter().map(SignedDescriptor).collect(),
        })
    }
}

/// The signed part of a consensus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsensusBody {
    /// The consensus epoch.
    pub epoch: u64,
    /// Not valid before this time (less [`CONSENSUS_CLOCK_SKEW_MAX`]).
    pub valid_after: UnixTime,
    /// Not valid from this time on.
    pub valid_until: UnixTime,
    /// The admitted descriptors, in strictly increasing node-id order.
    pub descriptors: Vec<SignedDescriptor>,
}

impl ConsensusBody {
    /// The canonical encoding that authorities sign.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&wire::ConsensusBody {
            version: wire::VERSION,
            epoch: self.epoch,
            valid_after_ms: self.valid_after.0,
            valid_until_ms: self.valid_until.0,
            descriptors: self.descriptors.iter().map(|d| d.0.clone()).collect(),
        })
    }
}

/// The consensus of `votes` for `epoch` and its window: the nodes that at least the network's
/// threshold of pinned authorities admit. Of a node's descriptors in those votes, the one
/// published last is taken (on a tie, the smallest encoding). Votes for another epoch or
/// window, or from unpinned authorities, are ignored; two different votes from one authority
/// are an error (it equivocates), as are fewer usable votes than the threshold.
pub fn compute_consensus(
    network: &Network,
    epoch: u64,
    valid_after: UnixTime,
    valid_until: UnixTime,
    votes: &[VoteContent],
) -> Result<ConsensusBody> {
    check_window(valid_after, valid_until)?;
    let mut used: BTreeMap<[u8; 32], &VoteContent> = BTreeMap::new();
    for vote in votes {
        if vote.epoch != epoch
            || vote.valid_after != valid_after
            || vote.valid_until != valid_until
            || !network.is_pinned(&vote.authority)
        {
            continue;
        }
        match used.get(&vote.authority) {
            Some(held) if *held != vote => {
                return Err(Error::InvalidArgument(
                    "two different votes from one authority",
                ));
            }
            _ => {
                used.insert(vote.authority, vote);
            }
        }
    }
    if used.len() < network.threshold() {
        return Err(Error::InvalidArgument("fewer votes than the threshold"));
    }
    // node → (authorities admitting it, best descriptor so far)
    let mut tally: BTreeMap<NodeId, (usize, NodeDescriptor, SignedDescriptor, Vec<u8>)> =
        BTreeMap::new();
    for vote in used.values() {
        let mut seen: BTreeSet<NodeId> = BTreeSet::new();
        for signed in &vote.descriptors {
            let Ok(d) = signed.verify(valid_after) else {
                continue;
            };
            if !seen.insert(d.node_id) {
                continue;
            }
            let encoded = signed.encode();
            match tally.get_mut(&d.node_id) {
                Some((count, held, held_signed, held_encoded)) => {
                    *count += 1;
                    let better = (d.published_at, std::cmp::Reverse(&encoded))
                        > (held.published_at, std::cmp::Reverse(&*held_encoded));
                    if better {
                        *held = d;
                        *held_signed = signed.clone();
                        *held_encoded = encoded;
                    }
                }
                None => {
                    tally.insert(d.node_id, (1, d, signed.clone(), encoded));
                }
            }
        }
    }
    let descriptors = tally
        .into_values()
        .filter(|(count, ..)| *count >= network.threshold())
        .map(|(_, _, signed, _)| signed)
        .collect();
    Ok(ConsensusBody {
        epoch,
        valid_after,
        valid_until,
        descriptors,
    })
}

/// A consensus as served: the body bytes and the authorities' signatures over them.
#[derive(Clone, Debug, PartialEq)]
pub struct Consensus(pub wire::Consensus);

/// A consensus that [`Consensus::verify`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedConsensus {
    /// The consensus epoch.
    pub epoch: u64,
    /// Start of validity.
    pub valid_after: UnixTime,
    /// End of validity.
    pub valid_until: UnixTime,
    /// The admitted descriptors, in node-id order.
    pub descriptors: Vec<SignedDescriptor>,
    /// The pinned authorities whose signature verified, in key order.
    pub signers: Vec<[u8; 32]>,
    /// How many authorities the network pins.
    pub authorities: usize,
}

impl Consensus {
    /// An unsigned consensus of `body`.
    pub fn new(body: &ConsensusBody) -> Consensus {
        Consensus(wire::Consensus {
            version: wire::VERSION,
            body: body.encode(),
            signatures: Vec::new(),
        })
    }

    /// The exact body bytes that are signed.
    pub fn body_bytes(&self) -> &[u8] {
        &self.0.body
    }

    /// SHA-256 of the body bytes (identifies the document across authorities).
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(&self.0.body).into()
    }

    /// `key`'s signature over the body, as another authority would add it.
    pub fn signature_by(&self, key: &SigningKey) -> wire::AuthoritySignature {
        let signature = key.sign(&prefixed(CONSENSUS_SIGNATURE_PREFIX, &self.0.body));
        wire::AuthoritySignature {
            authority_key: key.verifying_key().to_bytes().to_vec(),
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Signs the body with `key` (replacing an earlier signature by the same key).
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = self.signature_by(key);
        self.0
            .signatures
            .retain(|s| s.authority_key != sig.authority_key);
        self.0.signatures.push(sig);
    }

    /// Adds another authority's signature if it is pinned in `network`, verifies over this
    /// body, and is not there yet. Returns whether it was added.
    pub fn add_signature(
        &mut self,
        network: &Network,
        signature: wire::AuthoritySignature,
    ) -> Result<bool> {
        let key = key32("authority key", &signature.authority_key)?;
        if !network.is_pinned(&key) {
            return Err(Error::BadSignature("consensus: unpinned authority"));
        }
        if !verify_one(&self.0.body, &key, &signature.signature) {
            return Err(Error::BadSignature("consensus"));
        }
        if self
            .0
            .signatures
            .iter()
            .any(|s| s.authority_key == signature.authority_key)
        {
            return Ok(false);
        }
        self.0.signatures.push(signature);
        Ok(true)
    }

    /// Encodes it as a `Consensus` protobuf.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.0)
    }

    /// Decodes a `Consensus` protobuf (not yet verified: see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Consensus> {
        wire::decode(bytes, CONSENSUS_LEN_MAX).map(Consensus)
    }

    /// Accepts the consensus at `now` only if valid signatures over its body from at least
    /// `network.threshold()` distinct pinned authorities are attached, and `now` is inside
    /// its window. Signatures by unpinned keys, or that do not verify, do not count; two
    /// entries for the same key make the document malformed. The descriptors must be valid
    /// at `valid_after`, one per node, sorted by node id.
    pub fn verify(&self, now: UnixTime, network: &Network) -> Result<VerifiedConsensus> {
        if self.0.signatures.len() > SIGNATURES_MAX {
            return Err(Error::TooLarge {
                what: "consensus signatures",
                len: self.0.signatures.len(),
                max: SIGNATURES_MAX,
            });
        }
        let mut listed: BTreeSet<&[u8]> = BTreeSet::new();
        let mut signers: BTreeSet<[u8; 32]> = BTreeSet::new();
        for s in &self.0.signatures {
            if !listed.insert(&s.authority_key) {
                return Err(Error::Malformed {
                    what: "consensus",
                    reason: "two signatures by one key",
                });
            }
            let Ok(key) = <[u8; 32]>::try_from(s.authority_key.as_slice()) else {
                continue;
            };
            if network.is_pinned(&key) && verify_one(&self.0.body, &key, &s.signature) {
                signers.insert(key);
            }
        }
        if signers.len() < network.threshold() {
            return Err(Error::TooFewSignatures {
                what: "consensus",
                valid: signers.len(),
                required: network.threshold(),
            });
        }
        let body: wire::ConsensusBody = wire::decode(&self.0.body, CONSENSUS_LEN_MAX)?;
        let valid_after = UnixTime(body.valid_after_ms);
        let valid_until = UnixTime(body.valid_until_ms);
        check_window(valid_after, valid_until)?;
        if now.saturating_add(CONSENSUS_CLOCK_SKEW_MAX) < valid_after {
            return Err(Error::NotYetValid { what: "consensus" });
        }
        if now >= valid_until {
            return Err(Error::Expired { what: "consensus" });
        }
        check_descriptors("consensus", valid_after, &body.descriptors)?;
        Ok(VerifiedConsensus {
            epoch: body.epoch,
            valid_after,
            valid_until,
            descriptors: body.descriptors.into_iter().map(SignedDescriptor).collect(),
            signers: signers.into_iter().collect(),
            authorities: network.authorities().len(),
        })
    }
}

fn verify_one(body: &[u8], key: &[u8; 32], signature: &[u8]) -> bool {
    let Ok(verifying) = VerifyingKey::from_bytes(key) else {
        return false;
    };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    verifying
        .verify_strict(&prefixed(CONSENSUS_SIGNATURE_PREFIX, body), &signature)
        .is_ok()
}

/// What a directory built from a consensus remembers of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsensusInfo {
    /// The consensus epoch.
    pub epoch: u64,
    /// Start of validity.
    pub valid_after: UnixTime,
    /// End of validity.
    pub valid_until: UnixTime,
    /// How many pinned authorities signed it.
    pub signers: usize,
    /// How many authorities the network pins.
    pub authorities: usize,
}

impl VerifiedConsensus {
    /// What a directory keeps of it.
    pub fn info(&self) -> ConsensusInfo {
        ConsensusInfo {
            epoch: self.epoch,
            valid_after: self.valid_after,
            valid_until: self.valid_until,
            signers: self.signers.len(),
            authorities: self.authorities,
        }
    }
}

impl Directory {
    /// The directory of a verified consensus at `now`: its descriptors that are still valid
    /// (a descriptor may expire inside the consensus's window).
    pub fn from_consensus(now: UnixTime, consensus: &VerifiedConsensus) -> Directory {
        let (mut directory, _) = Directory::build(now, &consensus.descriptors);
        directory.set_consensus_info(consensus.info());
        directory
    }
}
