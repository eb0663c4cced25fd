//! Node descriptors, directory validation, route selection, delays and rendezvous placement.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{NOW, TestNode, descriptor, epoch, nodes, rng, signed};
use whispr_protocol::directory::{
    Directory, NodeDescriptor, Role, SignedDescriptor, sample_delays,
};
use whispr_protocol::sphinx::{HOP_DELAY_MAX, SphinxPublicKey};
use whispr_protocol::{Error, KeyEpoch, MailboxId, UnixTime, wire};

/// A small network: 2 edges, 2 mixes in each of 2 layers, 4 mailboxes, 1 timer.
struct Net {
    nodes: Vec<TestNode>,
    descriptors: Vec<NodeDescriptor>,
}

fn net(seed: u64) -> Net {
    let mut rng = rng(seed);
    let nodes = nodes(&mut rng, 11);
    let roles: Vec<(Vec<Role>, u32)> = [
        (vec![Role::Edge], 0),
        (vec![Role::Edge], 0),
        (vec![Role::Mix], 1),
        (vec![Role::Mix], 1),
        (vec![Role::Mix], 2),
        (vec![Role::Mix], 2),
        (vec![Role::Mailbox], 0),
        (vec![Role::Mailbox], 0),
        (vec![Role::Mailbox], 0),
        (vec![Role::Mailbox], 0),
        (vec![Role::Timer], 0),
    ]
    .into_iter()
    .collect();
    let descriptors = nodes
        .iter()
        .zip(&roles)
        .map(|(n, (r, layer))| descriptor(n, r, *layer, &mut rng))
        .collect();
    Net { nodes, descriptors }
}

impl Net {
    fn signed(&self) -> Vec<SignedDescriptor> {
        self.nodes
            .iter()
            .zip(&self.descriptors)
            .map(|(n, d)| signed(n, d))
            .collect()
    }
}

#[test]
fn valid_descriptors_make_a_directory_that_survives_the_wire() {
    let net = net(1);
    let bytes = Directory::encode(&net.signed());
    let (dir, rejected) = Directory::decode(NOW, &bytes).unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(dir.len(), 11);
    for d in &net.descriptors {
        assert_eq!(dir.get(&d.node_id), Some(d));
    }
    // A single signed descriptor survives its own encoding too.
    let one = &net.signed()[0];
    assert_eq!(
        SignedDescriptor::decode(&one.encode())
            .unwrap()
            .verify(NOW)
            .unwrap(),
        net.descriptors[0]
    );
}

#[test]
fn invalid_descriptors_are_rejected_with_reasons() {
    let net = net(2);
    let mut signed = net.signed();
    let mut rng = rng(99);

    // 0: bad signature (body changed after signing).
    let mut body: wire::DescriptorBody = wire::decode(&signed[0].0.body, usize::MAX).unwrap();
    body.addresses.push("/ip4/10.0.0.1/tcp/1".into());
    signed[0].0.body = wire::encode(&body);
    // 1: expired.
    let mut d = net.descriptors[1].clone();
    d.published_at = UnixTime(NOW.0 - 3 * 3600 * 1000);
    d.expires_at = UnixTime(NOW.0 - 1);
    signed[1] = d.sign(&net.nodes[1].identity).unwrap();
    // 2: published in the future.
    let mut d = net.descriptors[2].clone();
    d.published_at = UnixTime(NOW.0 + 3600 * 1000);
    d.expires_at = UnixTime(NOW.0 + 2 * 3600 * 1000);
    signed[2] = d.sign(&net.nodes[2].identity).unwrap();
    // 3: peer id of another key.
    let mut d = net.descriptors[3].clone();
    d.peer_id = net.nodes[4].id().libp2p_peer_id_bytes();
    signed[3] = d.sign(&net.nodes[3].identity).unwrap();
    // 4: a mix without a layer.
    let mut d = net.descriptors[4].clone();
    d.mix_layer = 0;
    signed[4] = d.sign(&net.nodes[4].identity).unwrap();
    // 5: no roles.
    let mut d = net.descriptors[5].clone();
    d.roles.clear();
    signed[5] = d.sign(&net.nodes[5].identity).unwrap();
    // 6: too many keys.
    let mut d = net.descriptors[6].clone();
    for e in 0..20 {
        d.sphinx_keys.insert(
            KeyEpoch(epoch().0 + 2 + e),
            SphinxPublicKey::from([e as u8; 32]),
        );
    }
    signed[6] = d.sign(&net.nodes[6].identity).unwrap();
    // 7: valid for more than 7 days.
    let mut d = net.descriptors[7].clone();
    d.expires_at = UnixTime(NOW.0 + 8 * 24 * 3600 * 1000);
    signed[7] = d.sign(&net.nodes[7].identity).unwrap();
    // 8: signature of another node.
    signed[8].0.signature = signed[9].0.signature.clone();
    // 9: unknown version.
    signed[9].0.version = 7;
    // 10 and 11: the same node twice; the later publication wins.
    let mut newer = net.descriptors[10].clone();
    newer.published_at = UnixTime(NOW.0 - 1000);
    newer.addresses = vec!["/ip4/127.0.0.1/tcp/9999".into()];
    signed.push(newer.sign(&net.nodes[10].identity).unwrap());
    // 13 (pushed below): a low-order Sphinx key.
    // 12: garbage body.
    signed.push(SignedDescriptor(wire::SignedDescriptor {
        version: 1,
        body: vec![0xFF; 40],
        signature: vec![0; 64],
    }));
    let _ = &mut rng;
    let mut low = net.descriptors[9].clone();
    low.sphinx_keys
        .insert(KeyEpoch(epoch().0 + 3), SphinxPublicKey::from([0u8; 32]));
    signed.push(low.sign(&net.nodes[9].identity).unwrap());

    let (dir, rejected) = Directory::build(NOW, &signed);
    let reasons: BTreeMap<usize, Error> =
        rejected.into_iter().map(|r| (r.index, r.reason)).collect();
    assert_eq!(reasons[&0], Error::BadSignature("descriptor"));
    assert_eq!(reasons[&1], Error::Expired { what: "descriptor" });
    assert_eq!(reasons[&2], Error::NotYetValid { what: "descriptor" });
    assert!(matches!(reasons[&3], Error::DescriptorRejected(r) if r.contains("peer id")));
    assert!(matches!(reasons[&4], Error::DescriptorRejected(r) if r.contains("mix layer")));
    assert!(matches!(reasons[&5], Error::DescriptorRejected(r) if r.contains("no role")));
    assert!(matches!(reasons[&6], Error::DescriptorRejected(r) if r.contains("key schedule")));
    assert!(matches!(reasons[&7], Error::DescriptorRejected(r) if r.contains("7 days")));
    assert_eq!(reasons[&8], Error::BadSignature("descriptor"));
    assert_eq!(
        reasons[&9],
        Error::UnknownVersion {
            what: "signed descriptor",
            version: 7
        }
    );
    assert!(matches!(reasons[&10], Error::DescriptorRejected(r) if r.contains("duplicate")));
    assert!(matches!(reasons[&12], Error::Malformed { .. }));
    assert!(matches!(reasons[&13], Error::DescriptorRejected(r) if r.contains("low order")));
    assert_eq!(reasons.len(), 13, "{reasons:?}");
    assert_eq!(dir.len(), 1);
    assert_eq!(dir.get(&net.nodes[10].id()), Some(&newer));
    assert!(reasons.values().all(Error::is_peer_caused));
}

#[test]
fn routes_are_stratified_use_epoch_keys_and_are_reproducible() {
    let net = net(3);
    let (dir, _) = Directory::build(NOW, &net.signed());
    let destination = net.descriptors[7].node_id;
    let route = dir
        .select_route(&mut rng(5), epoch(), &destination, 2)
        .unwrap();
    assert_eq!(route.len(), 4);
    let role = |i: usize| dir.get(&route[i].node).unwrap();
    assert!(role(0).has_role(Role::Edge));
    assert!(role(1).has_role(Role::Mix) && role(1).mix_layer == 1);
    assert!(role(2).has_role(Role::Mix) && role(2).mix_layer == 2);
    assert_eq!(route[3].node, destination);
    for hop in &route {
        assert_eq!(
            Some(&hop.sphinx_key),
            dir.get(&hop.node).unwrap().sphinx_key(epoch())
        );
    }
    // Same seed, same route; over many seeds every edge and mix gets used.
    let again = dir
        .select_route(&mut rng(5), epoch(), &destination, 2)
        .unwrap();
    assert_eq!(
        route.iter().map(|h| h.node).collect::<Vec<_>>(),
        again.iter().map(|h| h.node).collect::<Vec<_>>()
    );
    let mut used = std::collections::BTreeSet::new();
    let mut r = rng(6);
    for _ in 0..200 {
        for hop in dir.select_route(&mut r, epoch(), &destination, 2).unwrap() {
            used.insert(hop.node);
        }
    }
    assert_eq!(used.len(), 2 + 2 + 2 + 1);

    // A node with several roles never appears twice in one route.
    let mut r = rng(12);
    let multi = nodes(&mut r, 3);
    let signed_multi: Vec<_> = multi
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (roles, layer): (&[Role], u32) = if i == 2 {
                (&[Role::Mailbox], 0)
            } else {
                (&[Role::Edge, Role::Mix], 1)
            };
            signed(n, &descriptor(n, roles, layer, &mut r))
        })
        .collect();
    let (small, rejected) = Directory::build(NOW, &signed_multi);
    assert!(rejected.is_empty(), "{rejected:?}");
    for _ in 0..50 {
        let route = small
            .select_route(&mut r, epoch(), &multi[2].id(), 1)
            .unwrap();
        assert_eq!(route.len(), 3);
        assert_ne!(route[0].node, route[1].node);
    }
    // The next epoch's keys are published ahead: routes for it work and use those keys.
    let next = KeyEpoch(epoch().0 + 1);
    let ahead = dir
        .select_route(&mut rng(7), next, &destination, 1)
        .unwrap();
    assert_eq!(
        Some(&ahead[0].sphinx_key),
        dir.get(&ahead[0].node).unwrap().sphinx_key(next)
    );
}

#[test]
fn impossible_routes_are_typed_errors() {
    let net = net(4);
    let (dir, _) = Directory::build(NOW, &net.signed());
    let destination = net.descriptors[6].node_id;
    assert!(matches!(
        dir.select_route(&mut rng(1), epoch(), &destination, 3),
        Err(Error::NoRoute(_))
    ));
    assert!(matches!(
        dir.select_route(&mut rng(1), epoch(), &destination, 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        dir.select_route(&mut rng(1), KeyEpoch(epoch().0 + 5), &destination, 1),
        Err(Error::NoRoute(_))
    ));
    let stranger = TestNode::new(&mut rng(8)).id();
    assert!(matches!(
        dir.select_route(&mut rng(1), epoch(), &stranger, 1),
        Err(Error::NoRoute(_))
    ));
    // A route without a mix would let the edge relay see the destination node.
    assert!(matches!(
        dir.select_route(&mut rng(1), epoch(), &destination, 0),
        Err(Error::InvalidArgument(_))
    ));
    let empty = Directory::default();
    assert!(
        empty
            .select_route(&mut rng(1), epoch(), &destination, 0)
            .is_err()
    );
}

#[test]
fn rendezvous_placement_is_stable_and_moves_little() {
    let net = net(5);
    let (dir, _) = Directory::build(NOW, &net.signed());
    let mut r = rng(9);
    let mailboxes: Vec<MailboxId> = (0..400).map(|_| MailboxId::random(&mut r)).collect();
    let mut load: BTreeMap<_, usize> = BTreeMap::new();
    for m in &mailboxes {
        let replicas = dir.mailbox_replicas(m, 2);
        assert_eq!(replicas.len(), 2);
        assert_ne!(replicas[0], replicas[1]);
        for id in &replicas {
            assert!(dir.get(id).unwrap().has_role(Role::Mailbox));
            *load.entry(*id).or_default() += 1;
        }
        assert_eq!(dir.mailbox_replicas(m, 2), replicas, "deterministic");
    }
    // 800 placements over 4 nodes: each gets a fair share.
    assert_eq!(load.len(), 4);
    assert!(load.values().all(|n| (140..=260).contains(n)), "{load:?}");
    // More replicas than nodes: every mailbox node.
    assert_eq!(dir.mailbox_replicas(&mailboxes[0], 10).len(), 4);

    // Removing one mailbox node moves only the mailboxes it held.
    let gone = net.descriptors[6].node_id;
    let kept: Vec<SignedDescriptor> = net
        .signed()
        .into_iter()
        .zip(&net.descriptors)
        .filter(|(_, d)| d.node_id != gone)
        .map(|(s, _)| s)
        .collect();
    let (smaller, _) = Directory::build(NOW, &kept);
    for m in &mailboxes {
        let before = dir.mailbox_replicas(m, 2);
        let after = smaller.mailbox_replicas(m, 2);
        if !before.contains(&gone) {
            assert_eq!(before, after);
        } else {
            let survivor: Vec<_> = before.iter().filter(|id| **id != gone).collect();
            assert!(after.contains(survivor[0]));
        }
    }
}

#[test]
fn delays_are_exponential_with_the_requested_mean_and_capped() {
    let mut r = rng(10);
    let mean = Duration::from_millis(50);
    let samples = sample_delays(&mut r, 20_000, mean);
    let avg_ms = samples
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .sum::<f64>()
        / samples.len() as f64;
    assert!((47.5..=52.5).contains(&avg_ms), "mean {avg_ms} ms");
    // Exponential: about e^-1 of the samples exceed the mean.
    let above = samples.iter().filter(|d| **d > mean).count() as f64 / samples.len() as f64;
    assert!((0.35..=0.39).contains(&above), "{above}");
    let capped = sample_delays(&mut r, 100, Duration::from_secs(3600));
    assert!(capped.iter().all(|d| *d <= HOP_DELAY_MAX));
    assert!(capped.contains(&HOP_DELAY_MAX));
}
