//! Directory authorities: a consensus signed by a majority of pinned authorities is the only
//! source of a routing directory (security review finding 1, issue 14).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use common::{NOW, TestNode, descriptor, epoch, nodes, rng, signed};
use ed25519_dalek::SigningKey;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::consensus::{
    Authority, Consensus, ConsensusBody, Mixing, Network, VoteContent, compute_consensus,
};
use whispr_protocol::directory::{Directory, Role, SignedDescriptor};
use whispr_protocol::{Error, UnixTime};

const HOUR: u64 = 3600 * 1000;
const EPOCH: u64 = 500_000;

fn window() -> (UnixTime, UnixTime) {
    (UnixTime(NOW.0 - 30_000), UnixTime(NOW.0 + 2 * HOUR))
}

/// An edge, three layer-1 mixes and a mailbox node (honest, admitted), and 30 self-signed
/// layer-1 Sybil mixes that no honest authority admits.
struct World {
    honest: Vec<TestNode>,
    honest_desc: Vec<SignedDescriptor>,
    sybils: Vec<TestNode>,
    sybil_desc: Vec<SignedDescriptor>,
    authorities: Vec<SigningKey>,
    network: Network,
    rng: ChaCha20Rng,
}

fn world(seed: u64) -> World {
    let mut r = rng(seed);
    let honest = nodes(&mut r, 5);
    let roles = [
        (Role::Edge, 0),
        (Role::Mix, 1),
        (Role::Mix, 1),
        (Role::Mix, 1),
        (Role::Mailbox, 0),
    ];
    let honest_desc = honest
        .iter()
        .zip(roles)
        .map(|(n, (role, layer))| signed(n, &descriptor(n, &[role], layer, &mut r)))
        .collect();
    let sybils = nodes(&mut r, 30);
    let sybil_desc = sybils
        .iter()
        .map(|s| signed(s, &descriptor(s, &[Role::Mix], 1, &mut r)))
        .collect();
    let authorities: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut r)).collect();
    let network = Network::new(
        authorities
            .iter()
            .enumerate()
            .map(|(i, k)| Authority {
                key: k.verifying_key().to_bytes(),
                url: format!("http://127.0.0.1:{}", 7400 + i),
            })
            .collect(),
        None,
    )
    .unwrap();
    World {
        honest,
        honest_desc,
        sybils,
        sybil_desc,
        authorities,
        network,
        rng: r,
    }
}

impl World {
    fn vote(&self, authority: usize, descriptors: Vec<SignedDescriptor>) -> VoteContent {
        let (valid_after, valid_until) = window();
        let key = &self.authorities[authority];
        // Signed and verified, as authorities exchange them.
        VoteContent {
            authority: key.verifying_key().to_bytes(),
            epoch: EPOCH,
            valid_after,
            valid_until,
            descriptors,
        }
        .sign(key)
        .unwrap()
        .verify(&self.network)
        .unwrap()
    }

    /// The honest consensus: every authority admits the honest nodes only.
    fn body(&self) -> ConsensusBody {
        let votes: Vec<VoteContent> = (0..3)
            .map(|a| self.vote(a, self.honest_desc.clone()))
            .collect();
        let (valid_after, valid_until) = window();
        compute_consensus(&self.network, EPOCH, valid_after, valid_until, &votes).unwrap()
    }

    fn signed_by(&self, body: &ConsensusBody, who: &[usize]) -> Consensus {
        let mut c = Consensus::new(body);
        for a in who {
            c.sign(&self.authorities[*a]);
        }
        Consensus::decode(&c.encode()).unwrap()
    }
}

fn too_few(valid: usize) -> Error {
    Error::TooFewSignatures {
        what: "consensus",
        valid,
        required: 2,
    }
}

#[test]
fn sybil_mixes_outside_the_consensus_carry_no_route() {
    let mut w = world(14);
    // Every authority hears every descriptor; one (the third) is malicious and admits the
    // Sybils too. The two honest ones admit the honest nodes only.
    let mut everything = w.honest_desc.clone();
    everything.extend(w.sybil_desc.clone());
    let votes = vec![
        w.vote(0, w.honest_desc.clone()),
        w.vote(1, w.honest_desc.clone()),
        w.vote(2, everything),
    ];
    let (valid_after, valid_until) = window();
    let body = compute_consensus(&w.network, EPOCH, valid_after, valid_until, &votes).unwrap();
    assert_eq!(
        body.descriptors.len(),
        5,
        "only the honest nodes are admitted"
    );
    let consensus = w.signed_by(&body, &[0, 1, 2]);
    let verified = consensus.verify(NOW, &w.network).unwrap();
    assert_eq!(verified.signers.len(), 3);
    let dir = Directory::from_consensus(NOW, &verified);
    assert_eq!(dir.consensus().unwrap().signers, 3);
    assert_eq!(dir.consensus().unwrap().epoch, EPOCH);
    let sybil_ids: Vec<_> = w.sybils.iter().map(|s| s.id()).collect();
    let mailbox = w.honest[4].id();
    let mut through_sybil = 0;
    for _ in 0..1000 {
        let route = dir.select_route(&mut w.rng, epoch(), &mailbox, 1).unwrap();
        if route.iter().any(|h| sybil_ids.contains(&h.node)) {
            through_sybil += 1;
        }
    }
    assert_eq!(through_sybil, 0, "routes through a Sybil mix out of 1000");
}

#[test]
fn a_plain_directory_from_a_mirror_is_not_a_consensus() {
    let w = world(1);
    let mut all = w.honest_desc.clone();
    all.extend(w.sybil_desc.clone());
    // What any node served before authorities: a list of self-signed descriptors.
    let bytes = Directory::encode(&all);
    let refused = Consensus::decode(&bytes).and_then(|c| c.verify(NOW, &w.network));
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn forged_or_tampered_consensus_is_refused() {
    let w = world(2);
    let mut c = w.signed_by(&w.body(), &[0, 1, 2]);
    assert!(c.verify(NOW, &w.network).is_ok());
    // Add a Sybil to the signed body: no signature verifies any more.
    let mut body = w.body();
    body.descriptors.push(w.sybil_desc[0].clone());
    c.0.body = body.encode();
    assert_eq!(c.verify(NOW, &w.network).unwrap_err(), too_few(0));
    // Flip one byte of one signature: that one no longer counts.
    let mut c = w.signed_by(&w.body(), &[0, 1]);
    c.0.signatures[1].signature[5] ^= 1;
    assert_eq!(c.verify(NOW, &w.network).unwrap_err(), too_few(1));
}

#[test]
fn unknown_keys_count_for_nothing_and_a_fourth_authority_changes_nothing() {
    let mut w = world(3);
    let body = w.body();
    let strangers: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut w.rng)).collect();
    let mut c = Consensus::new(&body);
    for s in &strangers {
        c.sign(s);
    }
    assert_eq!(c.verify(NOW, &w.network).unwrap_err(), too_few(0));
    // One pinned signature plus an unpinned "authority": still too few.
    c.sign(&w.authorities[0]);
    assert_eq!(c.verify(NOW, &w.network).unwrap_err(), too_few(1));
    // The majority plus the unpinned one: accepted, and the stranger is not a signer.
    c.sign(&w.authorities[1]);
    let v = c.verify(NOW, &w.network).unwrap();
    assert_eq!(v.signers.len(), 2);
    assert!(v.signers.iter().all(|k| w.network.is_pinned(k)));
    // An unpinned authority cannot add its signature through the authority API either.
    let sig = c.signature_by(&strangers[0]);
    assert!(c.add_signature(&w.network, sig).is_err());
}

#[test]
fn too_few_signatures_are_refused() {
    let w = world(4);
    let body = w.body();
    assert_eq!(
        w.signed_by(&body, &[]).verify(NOW, &w.network).unwrap_err(),
        too_few(0)
    );
    assert_eq!(
        w.signed_by(&body, &[2])
            .verify(NOW, &w.network)
            .unwrap_err(),
        too_few(1)
    );
    assert_eq!(
        w.signed_by(&body, &[0, 2])
            .verify(NOW, &w.network)
            .unwrap()
            .signers
            .len(),
        2
    );
}

#[test]
fn duplicate_signers_are_refused() {
    let w = world(5);
    let mut c = w.signed_by(&w.body(), &[0]);
    let again = c.0.signatures[0].clone();
    c.0.signatures.push(again);
    assert!(matches!(
        c.verify(NOW, &w.network),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn expired_not_yet_valid_and_replayed_old_consensus_are_refused() {
    let w = world(6);
    let c = w.signed_by(&w.body(), &[0, 1, 2]);
    let (valid_after, valid_until) = window();
    assert!(c.verify(valid_after, &w.network).is_ok());
    assert_eq!(
        c.verify(valid_until, &w.network).unwrap_err(),
        Error::Expired { what: "consensus" }
    );
    // An old consensus replayed a day later.
    assert_eq!(
        c.verify(UnixTime(NOW.0 + 24 * HOUR), &w.network)
            .unwrap_err(),
        Error::Expired { what: "consensus" }
    );
    assert_eq!(
        c.verify(UnixTime(valid_after.0 - 3_600_000), &w.network)
            .unwrap_err(),
        Error::NotYetValid { what: "consensus" }
    );
}

#[test]
fn a_malicious_authority_cannot_make_clients_accept_its_document() {
    let w = world(7);
    let honest = w.body();
    let mut evil_body = honest.clone();
    evil_body.descriptors = w.sybil_desc.clone();
    evil_body
        .descriptors
        .sort_by_key(|d| d.verify(NOW).unwrap().node_id);
    // Signed by the malicious authority alone.
    let mut evil = w.signed_by(&evil_body, &[2]);
    assert_eq!(evil.verify(NOW, &w.network).unwrap_err(), too_few(1));
    // With the honest authorities' signatures (over the honest body) copied onto it.
    let honest_signed = w.signed_by(&honest, &[0, 1]);
    evil.0.signatures.extend(honest_signed.0.signatures.clone());
    assert_eq!(evil.verify(NOW, &w.network).unwrap_err(), too_few(1));
    // Its signature cannot be added to the honest document either.
    let mut honest_doc = w.signed_by(&honest, &[0]);
    let evil_sig = w.signed_by(&evil_body, &[2]).0.signatures[0].clone();
    assert!(honest_doc.add_signature(&w.network, evil_sig).is_err());
}

#[test]
fn the_consensus_is_the_majority_of_votes_and_does_not_depend_on_their_order() {
    let w = world(8);
    let (valid_after, valid_until) = window();
    let d = &w.honest_desc;
    // Node 0 and 1 admitted by all, node 2 by two, node 3 by one, node 4 by none.
    let votes = vec![
        w.vote(
            0,
            vec![d[0].clone(), d[1].clone(), d[2].clone(), d[3].clone()],
        ),
        w.vote(1, vec![d[1].clone(), d[0].clone(), d[2].clone()]),
        w.vote(2, vec![d[0].clone(), d[1].clone()]),
    ];
    let body = compute_consensus(&w.network, EPOCH, valid_after, valid_until, &votes).unwrap();
    let ids: Vec<_> = body
        .descriptors
        .iter()
        .map(|s| s.verify(NOW).unwrap().node_id)
        .collect();
    let mut expected = vec![w.honest[0].id(), w.honest[1].id(), w.honest[2].id()];
    expected.sort();
    assert_eq!(ids, expected);
    let mut reversed = votes.clone();
    reversed.reverse();
    let again = compute_consensus(&w.network, EPOCH, valid_after, valid_until, &reversed).unwrap();
    assert_eq!(
        again.encode(),
        body.encode(),
        "byte-identical whatever the order"
    );
    // One authority down: the two others still make a consensus (the same one here).
    let two = compute_consensus(&w.network, EPOCH, valid_after, valid_until, &votes[..2]).unwrap();
    assert_eq!(two.encode(), body.encode());
    // One vote alone is not enough.
    assert!(compute_consensus(&w.network, EPOCH, valid_after, valid_until, &votes[..1]).is_err());
    // Votes for another epoch do not count.
    assert!(compute_consensus(&w.network, EPOCH + 1, valid_after, valid_until, &votes).is_err());
    // An authority that votes twice differently is refused.
    let mut equivocating = votes.clone();
    equivocating.push(w.vote(2, vec![d[4].clone()]));
    assert!(compute_consensus(&w.network, EPOCH, valid_after, valid_until, &equivocating).is_err());
}

#[test]
fn votes_verify_only_from_pinned_authorities() {
    let mut w = world(9);
    let (valid_after, valid_until) = window();
    let stranger = SigningKey::generate(&mut w.rng);
    let vote = VoteContent {
        authority: stranger.verifying_key().to_bytes(),
        epoch: EPOCH,
        valid_after,
        valid_until,
        descriptors: w.sybil_desc.clone(),
    }
    .sign(&stranger)
    .unwrap();
    assert!(vote.verify(&w.network).is_err());
    let mut good = VoteContent {
        authority: w.authorities[0].verifying_key().to_bytes(),
        epoch: EPOCH,
        valid_after,
        valid_until,
        descriptors: w.honest_desc.clone(),
    }
    .sign(&w.authorities[0])
    .unwrap();
    assert!(good.verify(&w.network).is_ok());
    let last = good.0.body.len() - 1;
    good.0.body[last] ^= 1;
    assert!(good.verify(&w.network).is_err());
}

#[test]
fn network_files_round_trip_and_need_a_majority_threshold() {
    let w = world(10);
    let text = w.network.to_text();
    assert!(text.starts_with("whispr-network 1\nthreshold 2\nauthority "));
    assert_eq!(Network::parse(&text).unwrap(), w.network);
    let with_comments = format!("# pinned on 2026-05-01\n\n{text}");
    assert_eq!(Network::parse(&with_comments).unwrap(), w.network);
    let low = text.replace("threshold 2", "threshold 1");
    assert!(Network::parse(&low).is_err(), "a minority threshold");
    let dup_line = text.lines().nth(2).unwrap().to_owned();
    assert!(
        Network::parse(&format!("{text}{dup_line}\n")).is_err(),
        "a duplicate key"
    );
    assert!(Network::parse("threshold 2\n").is_err());
    assert!(Network::parse(&text.replace("authority ", "authority zz")).is_err());
}

#[test]
fn a_network_file_may_state_its_clients_mixing_delay_and_cover_rate() {
    let w = world(10);
    assert_eq!(w.network.mixing(), None);
    let mixing = Mixing::new(200, 2.5).unwrap();
    let net = w.network.clone().with_mixing(mixing);
    let text = net.to_text();
    assert!(text.contains("\nmixing 200 2.5\n"), "{text}");
    let parsed = Network::parse(&text).unwrap();
    assert_eq!(parsed, net);
    let m = parsed.mixing().unwrap();
    assert_eq!((m.delay_ms, m.cover_per_min()), (200, 2.5));
    for bad in [
        "mixing 200",
        "mixing -1 2",
        "mixing 10001 2",
        "mixing 200 -1",
        "mixing 200 601",
        "mixing 200 NaN",
        "mixing 200 inf",
        "mixing x 2",
    ] {
        assert!(
            Network::parse(&text.replace("mixing 200 2.5", bad)).is_err(),
            "{bad}"
        );
    }
    assert!(
        Network::parse(&text.replace("mixing 200 2.5", "mixing 200 2.5\nmixing 50 0")).is_err(),
        "two mixing lines"
    );
    assert!(
        Mixing::new(0, 0.0).is_ok(),
        "a test network may turn both off"
    );
}

#[test]
fn a_network_file_may_state_the_mailbox_replica_count() {
    let w = world(10);
    assert_eq!(w.network.replicas(), None);
    let three = w.network.clone().with_replicas(3).unwrap();
    let text = three.to_text();
    assert!(text.contains("\nreplicas 3\n"), "{text}");
    assert_eq!(Network::parse(&text).unwrap(), three);
    assert_eq!(Network::parse(&text).unwrap().replicas(), Some(3));
    for bad in ["replicas 0", "replicas 6", "replicas x"] {
        assert!(
            Network::parse(&text.replace("replicas 3", bad)).is_err(),
            "{bad}"
        );
    }
    assert!(
        Network::parse(&text.replace("replicas 3", "replicas 3\nreplicas 2")).is_err(),
        "two replica lines"
    );
}
