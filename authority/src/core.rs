//! The authority's decisions, with no I/O (sans-IO like the node cores): which descriptors it
//! holds and admits, its vote per epoch, the consensus it computes from the votes it has, and
//! the signatures it has collected on it. The driver ([`crate::server`]) feeds it descriptors,
//! peers' votes and peers' documents, calls [`AuthorityCore::tick`] with the time, and serves
//! what it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use whispr_protocol::consensus::{Consensus, Network, SignedVote, VoteContent, compute_consensus};
use whispr_protocol::directory::{DIRECTORY_NODES_MAX, SignedDescriptor};
use whispr_protocol::{NodeId, UnixTime};

/// Rounds (epochs) kept, the current one included.
const ROUNDS_KEPT: usize = 4;

/// The consensus schedule: epoch `e` is valid from `e × period` for `lifetime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Length of a consensus epoch.
    pub period: Duration,
    /// How long each consensus stays valid (at least one period; several, so that a missed
    /// epoch does not leave the network without a valid consensus).
    pub lifetime: Duration,
}

impl Schedule {
    fn period_ms(&self) -> u64 {
        u64::try_from(self.period.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The epoch that contains `now`.
    pub fn epoch(&self, now: UnixTime) -> u64 {
        now.0 / self.period_ms()
    }

    /// `epoch`'s validity window.
    pub fn window(&self, epoch: u64) -> (UnixTime, UnixTime) {
        let after = UnixTime(epoch.saturating_mul(self.period_ms()));
        (after, after.saturating_add(self.lifetime))
    }

    /// When a round stops waiting for missing votes and computes the consensus from those it
    /// has (if they reach the threshold): a third of the period after the epoch starts.
    fn vote_deadline(&self, epoch: u64) -> UnixTime {
        self.window(epoch).0.saturating_add(self.period / 3)
    }
}

/// Which nodes this authority admits: its operator's allow list of node ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(pub BTreeSet<NodeId>);

impl AllowList {
    /// Parses an allow-list file: one node id (64 hex digits, as in `node-info.json`) per line;
    /// blank lines and `#` comments are ignored; anything after the id on a line is a comment.
    pub fn parse(text: &str) -> Result<AllowList, String> {
        let mut out = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let word = line.split_whitespace().next().unwrap_or_default();
            let mut id = [0u8; 32];
            hex::decode_to_slice(word, &mut id)
                .map_err(|_| format!("line {}: not a 64-hex-digit node id", n + 1))?;
            out.insert(NodeId(id));
        }
        Ok(AllowList(out))
    }

    /// Whether the policy admits `node`.
    pub fn admits(&self, node: &NodeId) -> bool {
        self.0.contains(node)
    }
}

/// One epoch's work.
#[derive(Clone, Debug)]
struct Round {
    vote: SignedVote,
    votes: BTreeMap<[u8; 32], VoteContent>,
    /// Once computed: this authority's document, with the signatures collected so far.
    consensus: Option<Consensus>,
}

/// Why a submitted descriptor was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// It does not verify (signature, validity, format).
    #[error("invalid descriptor: {0}")]
    Invalid(whispr_protocol::Error),
    /// The authority already holds a newer one for the node.
    #[error("a newer descriptor is held")]
    Stale,
    /// The authority holds as many nodes as a directory may have.
    #[error("descriptor table full")]
    Full,
}

/// Counts for the status endpoint and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The current epoch.
    pub epoch: u64,
    /// Descriptors held (of admitted nodes only).
    pub descriptors: usize,
    /// Of them, admitted by the allow list.
    pub admitted: usize,
    /// Votes held for the current epoch (this authority's included).
    pub votes: usize,
    /// Signatures on this authority's current-epoch document.
    pub signatures: usize,
    /// Epoch of the newest consensus with the threshold of signatures.
    pub consensus_epoch: Option<u64>,
}

/// A directory authority's state.
pub struct AuthorityCore {
    key: SigningKey,
    network: Network,
    schedule: Schedule,
    allow: AllowList,
    descriptors: BTreeMap<NodeId, (UnixTime, SignedDescriptor)>,
    rounds: BTreeMap<u64, Round>,
    /// The newest consensus carrying at least the threshold of signatures.
    latest: Option<(u64, Consensus)>,
}

impl AuthorityCore {
    /// An authority with `key`, one of `network`'s pinned authorities.
    pub fn new(
        key: SigningKey,
        network: Network,
        schedule: Schedule,
        allow: AllowList,
    ) -> Result<AuthorityCore, &'static str> {
        if !network.is_pinned(&key.verifying_key().to_bytes()) {
            return Err("this authority's key is not in the network file");
        }
        if schedule.lifetime < schedule.period {
            return Err("a consensus must live at least one period");
        }
        Ok(AuthorityCore {
            key,
            network,
            schedule,
            allow,
            descriptors: BTreeMap::new(),
            rounds: BTreeMap::new(),
            latest: None,
        })
    }

    /// This authority's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The consensus schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// The pinned network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Replaces the admission policy (the operator edited the allow list); it applies from
    /// the next vote. Descriptors of nodes it no longer admits are forgotten; a node it now
    /// admits is voted for once its descriptor comes again (nodes submit theirs at least once
    /// per epoch).
    pub fn set_allow_list(&mut self, allow: AllowList) {
        self.descriptors.retain(|id, _| allow.admits(id));
        self.allow = allow;
    }

    /// Takes a node's signed descriptor (submitted, or heard from the mesh) if it verifies at
    /// `now`, the policy admits the node and it is newer than the one held. Returns whether
    /// the policy admits the node: a descriptor it does not admit is checked and answered,
    /// never held, so that the table (at most the allow list's size, and
    /// [`DIRECTORY_NODES_MAX`]) cannot be filled by self-signed descriptors anyone can make.
    pub fn submit_descriptor(
        &mut self,
        now: UnixTime,
        signed: SignedDescriptor,
    ) -> Result<bool, SubmitError> {
        let d = signed.verify(now).map_err(SubmitError::Invalid)?;
        if !self.allow.admits(&d.node_id) {
            return Ok(false);
        }
        match self.descriptors.get(&d.node_id) {
            Some((held, _)) if *held > d.published_at => {
                return Err(SubmitError::Stale);
            }
            None if self.descriptors.len() >= DIRECTORY_NODES_MAX => {
                return Err(SubmitError::Full);
            }
            _ => {}
        }
        self.descriptors.insert(d.node_id, (d.published_at, signed));
        Ok(true)
    }

    /// Advances to `now`: votes for the current epoch if not done yet, computes and signs the
    /// consensus once all pinned authorities voted or the vote deadline passed with the
    /// threshold of votes, and forgets old rounds and expired descriptors.
    pub fn tick(&mut self, now: UnixTime) {
        self.descriptors.retain(|_, (_, d)| d.verify(now).is_ok());
        let epoch = self.schedule.epoch(now);
        if !self.rounds.contains_key(&epoch) {
            let (valid_after, valid_until) = self.schedule.window(epoch);
            let content = VoteContent {
                authority: self.public_key(),
                epoch,
                valid_after,
                valid_until,
                descriptors: self
                    .descriptors
                    .iter()
                    .filter(|(id, _)| self.allow.admits(id))
                    .map(|(_, (_, d))| d.clone())
                    .collect(),
            };
            if let Ok(vote) = content.sign(&self.key)
                && let Ok(mine) = vote.verify(&self.network)
            {
                let mut votes = BTreeMap::new();
                votes.insert(mine.authority, mine);
                self.rounds.insert(
                    epoch,
                    Round {
                        vote,
                        votes,
                        consensus: None,
                    },
                );
            }
        }
        while self.rounds.len() > ROUNDS_KEPT {
            self.rounds.pop_first();
        }
        let all = self.network.authorities().len();
        let threshold = self.network.threshold();
        let deadline = self.schedule.vote_deadline(epoch);
        let (valid_after, valid_until) = self.schedule.window(epoch);
        if let Some(round) = self.rounds.get_mut(&epoch)
            && round.consensus.is_none()
            && (round.votes.len() >= all || (now >= deadline && round.votes.len() >= threshold))
        {
            let votes: Vec<VoteContent> = round.votes.values().cloned().collect();
            if let Ok(body) =
                compute_consensus(&self.network, epoch, valid_after, valid_until, &votes)
            {
                let mut doc = Consensus::new(&body);
                doc.sign(&self.key);
                round.consensus = Some(doc);
            }
        }
        self.refresh_latest(now);
    }

    fn refresh_latest(&mut self, now: UnixTime) {
        for (epoch, round) in self.rounds.iter().rev() {
            if let Some(doc) = &round.consensus
                && doc.verify(now, &self.network).is_ok()
            {
                if self.latest.as_ref().is_none_or(|(e, _)| e <= epoch) {
                    self.latest = Some((*epoch, doc.clone()));
                }
                return;
            }
        }
        if self
            .latest
            .as_ref()
            .is_some_and(|(_, doc)| doc.verify(now, &self.network).is_err())
        {
            self.latest = None;
        }
    }

    /// A peer's vote: kept if a pinned authority signed it for a round this authority has
    /// open and has not computed yet. Returns whether it was new.
    pub fn add_vote(&mut self, vote: &SignedVote) -> Result<bool, whispr_protocol::Error> {
        let content = vote.verify(&self.network)?;
        let me = self.public_key();
        let Some(round) = self.rounds.get_mut(&content.epoch) else {
            return Ok(false);
        };
        if round.consensus.is_some() || round.votes.contains_key(&content.authority) {
            return Ok(false);
        }
        let mine = round.votes.get(&me);
        if mine.is_some_and(|m| {
            m.valid_after != content.valid_after || m.valid_until != content.valid_until
        }) {
            return Err(whispr_protocol::Error::Malformed {
                what: "vote",
                reason: "another schedule than this authority's",
            });
        }
        round.votes.insert(content.authority, content);
        Ok(true)
    }

    /// Takes every signature of a peer's document for `epoch` that is by a pinned authority
    /// and verifies over this authority's own document (a peer that computed a different
    /// document contributes nothing). Returns how many were new.
    pub fn add_signatures(&mut self, now: UnixTime, epoch: u64, peer: &Consensus) -> usize {
        let Some(doc) = self
            .rounds
            .get_mut(&epoch)
            .and_then(|r| r.consensus.as_mut())
        else {
            return 0;
        };
        let mut added = 0;
        for sig in &peer.0.signatures {
            if doc.add_signature(&self.network, sig.clone()) == Ok(true) {
                added += 1;
            }
        }
        if added > 0 {
            self.refresh_latest(now);
        }
        added
    }

    /// This authority's vote for `epoch`.
    pub fn vote(&self, epoch: u64) -> Option<&SignedVote> {
        self.rounds.get(&epoch).map(|r| &r.vote)
    }

    /// This authority's document for `epoch` with the signatures it has (maybe fewer than
    /// the threshold).
    pub fn document(&self, epoch: u64) -> Option<&Consensus> {
        self.rounds.get(&epoch).and_then(|r| r.consensus.as_ref())
    }

    /// The newest consensus with the threshold of signatures, valid at the last tick.
    pub fn consensus(&self) -> Option<&Consensus> {
        self.latest.as_ref().map(|(_, c)| c)
    }

    /// When the newest consensus with the threshold of signatures stops being valid.
    pub fn consensus_valid_until(&self) -> Option<UnixTime> {
        self.latest
            .as_ref()
            .map(|(epoch, _)| self.schedule.window(*epoch).1)
    }

    /// What to fetch from the peer `key` for the current epoch: its vote (if still needed),
    /// and its document (if this authority has computed its own and lacks the peer's
    /// signature).
    pub fn wants_from(&self, now: UnixTime, key: &[u8; 32]) -> (bool, bool) {
        let epoch = self.schedule.epoch(now);
        let Some(round) = self.rounds.get(&epoch) else {
            return (false, false);
        };
        let vote = round.consensus.is_none() && !round.votes.contains_key(key);
        let signature = round.consensus.as_ref().is_some_and(|doc| {
            !doc.0
                .signatures
                .iter()
                .any(|s| s.authority_key.as_slice() == key.as_slice())
        });
        (vote, signature)
    }

    /// The current epoch at `now`.
    pub fn epoch(&self, now: UnixTime) -> u64 {
        self.schedule.epoch(now)
    }

    /// Counts for `GET /v1/status`.
    pub fn status(&self, now: UnixTime) -> Status {
        let epoch = self.schedule.epoch(now);
        let round = self.rounds.get(&epoch);
        Status {
            epoch,
            descriptors: self.descriptors.len(),
            admitted: self
                .descriptors
                .keys()
                .filter(|id| self.allow.admits(id))
                .count(),
            votes: round.map_or(0, |r| r.votes.len()),
            signatures: round
                .and_then(|r| r.consensus.as_ref())
                .map_or(0, |c| c.0.signatures.len()),
            consensus_epoch: self.latest.as_ref().map(|(e, _)| *e),
        }
    }
}
