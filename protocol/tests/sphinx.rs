//! Sphinx packets: routes, delays, destinations, replay tags, tampering and SURBs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{TestNode, nodes, rng, traverse};
use proptest::prelude::*;
use whispr_protocol::sphinx::{
    HOP_DELAY_MAX, HOPS_MAX, HopAction, PACKET_SIZE, PAYLOAD_SIZE, PLAINTEXT_LEN_MAX, ReplayFilter,
    SURB_SIZE, Surb, SurbRecovery, build_packet, create_surb, process_packet, use_surb,
};
use whispr_protocol::{DestinationAddress, Error, KeyEpoch, SurbId};

fn delays_ms(ms: &[u64]) -> Vec<Duration> {
    ms.iter().map(|m| Duration::from_millis(*m)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// A 3-hop route delivers the right payload to the right destination, each hop forwarding
    /// to the right next hop after the delay the sender chose.
    #[test]
    fn three_hop_route_delivers_payload_destination_and_delays(
        seed in any::<u64>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_LEN_MAX),
        destination in any::<[u8; 32]>(),
        d0 in 0u64..=60_000,
        d1 in 0u64..=60_000,
    ) {
        let mut rng = rng(seed);
        let hops = nodes(&mut rng, 3);
        let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
        let delays = delays_ms(&[d0, d1]);
        let packet = build_packet(&mut rng, &route, &delays, DestinationAddress(destination), &plaintext).unwrap();
        prop_assert_eq!(packet.as_bytes().len(), PACKET_SIZE);
        let refs: Vec<&TestNode> = hops.iter().collect();
        match traverse(&refs, packet.as_bytes(), &delays).unwrap() {
            HopAction::Deliver { destination: got, plaintext: got_plaintext } => {
                prop_assert_eq!(got, DestinationAddress(destination));
                prop_assert_eq!(got_plaintext, plaintext);
            }
            other => prop_assert!(false, "expected delivery, got {other:?}"),
        }
    }

    /// Any single flipped bit, in the header or the payload, makes the packet fail at some hop
    /// (header bits at the first hop's MAC, payload bits at the last hop's padding check).
    #[test]
    fn a_flipped_bit_anywhere_is_rejected(bit in 0usize..PACKET_SIZE * 8, seed in any::<u64>()) {
        let mut rng = rng(seed);
        let hops = nodes(&mut rng, 3);
        let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
        let delays = delays_ms(&[5, 7]);
        let packet = build_packet(&mut rng, &route, &delays, DestinationAddress([3; 32]), b"attack at dawn").unwrap();
        let mut bytes = packet.into_bytes();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let refs: Vec<&TestNode> = hops.iter().collect();
        prop_assert!(traverse(&refs, &bytes, &delays).is_err());
    }
}

#[test]
fn flipped_bits_across_the_whole_packet_are_all_rejected() {
    let mut rng = rng(11);
    let hops = nodes(&mut rng, 3);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    let delays = delays_ms(&[1, 2]);
    let packet = build_packet(
        &mut rng,
        &route,
        &delays,
        DestinationAddress([4; 32]),
        b"hello",
    )
    .unwrap();
    let refs: Vec<&TestNode> = hops.iter().collect();
    // Every 13th bit: covers every field of the header and spans the payload.
    for bit in (0..PACKET_SIZE * 8).step_by(13) {
        let mut bytes = packet.as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert!(
            traverse(&refs, &bytes, &delays).is_err(),
            "bit {bit} flipped went through"
        );
    }
}

#[test]
fn routes_of_one_to_five_hops_deliver_and_others_are_refused() {
    let mut rng = rng(1);
    let all = nodes(&mut rng, HOPS_MAX + 1);
    for len in 1..=HOPS_MAX {
        let route: Vec<_> = all[..len].iter().map(TestNode::hop).collect();
        let delays: Vec<Duration> = (0..len - 1)
            .map(|i| Duration::from_millis(10 * i as u64 + 1))
            .collect();
        let packet = build_packet(
            &mut rng,
            &route,
            &delays,
            DestinationAddress([len as u8; 32]),
            b"m",
        )
        .unwrap();
        let refs: Vec<&TestNode> = all[..len].iter().collect();
        match traverse(&refs, packet.as_bytes(), &delays).unwrap() {
            HopAction::Deliver {
                destination,
                plaintext,
            } => {
                assert_eq!(destination, DestinationAddress([len as u8; 32]));
                assert_eq!(plaintext, b"m");
            }
            other => panic!("{other:?}"),
        }
    }
    let six: Vec<_> = all.iter().map(TestNode::hop).collect();
    let err = build_packet(
        &mut rng,
        &six,
        &[Duration::ZERO; 5],
        DestinationAddress::NODE_SERVICE,
        b"",
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)) && !err.is_peer_caused());
    assert!(matches!(
        build_packet(&mut rng, &[], &[], DestinationAddress::NODE_SERVICE, b""),
        Err(Error::InvalidArgument(_))
    ));
    // Wrong number of delays, delay above the cap, plaintext too long.
    let three: Vec<_> = all[..3].iter().map(TestNode::hop).collect();
    assert!(
        build_packet(
            &mut rng,
            &three,
            &[Duration::ZERO],
            DestinationAddress::NODE_SERVICE,
            b""
        )
        .is_err()
    );
    assert!(
        build_packet(
            &mut rng,
            &three,
            &[HOP_DELAY_MAX + Duration::from_millis(1), Duration::ZERO],
            DestinationAddress::NODE_SERVICE,
            b""
        )
        .is_err()
    );
    assert!(matches!(
        build_packet(
            &mut rng,
            &three,
            &[Duration::ZERO; 2],
            DestinationAddress::NODE_SERVICE,
            &vec![0u8; PLAINTEXT_LEN_MAX + 1]
        ),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn a_node_off_the_route_cannot_process_and_wrong_sizes_are_refused() {
    let mut rng = rng(2);
    let hops = nodes(&mut rng, 3);
    let stranger = TestNode::new(&mut rng);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    let packet = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO; 2],
        DestinationAddress([1; 32]),
        b"x",
    )
    .unwrap();
    assert_eq!(
        stranger.process(packet.as_bytes()).unwrap_err(),
        Error::HeaderIntegrity
    );
    // The second hop cannot skip the first.
    assert_eq!(
        hops[1].process(packet.as_bytes()).unwrap_err(),
        Error::HeaderIntegrity
    );
    for len in [0, 1, PACKET_SIZE - 1, PACKET_SIZE + 1, 10 * PACKET_SIZE] {
        let err = hops[0].process(&vec![0u8; len]).unwrap_err();
        assert!(matches!(err, Error::BadLength { .. }) && err.is_peer_caused());
    }
    assert_eq!(
        hops[0].process(&vec![0u8; PACKET_SIZE]).unwrap_err(),
        Error::HeaderIntegrity
    );
}

#[test]
fn previous_epoch_key_still_processes_and_reports_its_index() {
    let mut rng = rng(3);
    let old = TestNode::new(&mut rng);
    let current = whispr_protocol::sphinx::SphinxSecretKey::random_from_rng(&mut rng);
    let packet = build_packet(
        &mut rng,
        &[old.hop()],
        &[],
        DestinationAddress([2; 32]),
        b"late",
    )
    .unwrap();
    let processed = process_packet(&[&current, &old.sphinx], packet.as_bytes()).unwrap();
    assert_eq!(processed.key_index, 1);
    assert!(matches!(processed.action, HopAction::Deliver { .. }));
    assert_eq!(
        process_packet(&[&current], packet.as_bytes()).unwrap_err(),
        Error::HeaderIntegrity
    );
}

#[test]
fn replayed_packet_is_detected_by_its_tag() {
    let mut rng = rng(4);
    let hops = nodes(&mut rng, 2);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    let a = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([1; 32]),
        b"a",
    )
    .unwrap();
    let b = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([1; 32]),
        b"a",
    )
    .unwrap();
    let epoch = KeyEpoch(10);
    let mut filter = ReplayFilter::new(100);
    let first = hops[0].process(a.as_bytes()).unwrap();
    filter.check_and_insert(epoch, first.replay_tag).unwrap();
    // The same packet again has the same tag and is refused.
    let again = hops[0].process(a.as_bytes()).unwrap();
    assert_eq!(again.replay_tag, first.replay_tag);
    assert_eq!(
        filter.check_and_insert(epoch, again.replay_tag),
        Err(Error::Replayed)
    );
    // Another packet with the same content has another tag.
    let other = hops[0].process(b.as_bytes()).unwrap();
    assert_ne!(other.replay_tag, first.replay_tag);
    filter.check_and_insert(epoch, other.replay_tag).unwrap();
    assert_eq!(filter.len(), 2);
    // Tags of the previous epoch are kept, older ones are forgotten.
    filter
        .check_and_insert(KeyEpoch(11), other.replay_tag)
        .unwrap();
    assert_eq!(
        filter.check_and_insert(KeyEpoch(11), first.replay_tag),
        Ok(())
    );
    assert_eq!(filter.len(), 4);
    filter
        .check_and_insert(KeyEpoch(12), first.replay_tag)
        .unwrap();
    assert_eq!(filter.len(), 3, "epoch 10 forgotten once epoch 12 arrives");
}

/// Security review, finding 10: a flood of distinct packets used to fill an epoch's set, after
/// which every packet of the epoch was refused (`Full`), also after a restart. Past its
/// capacity the filter now degrades gradually, and it never lets a replay through.
#[test]
fn replay_filter_past_its_capacity_still_admits_fresh_tags_and_refuses_replays() {
    use rand::RngExt;
    let mut rng = rng(9);
    let mut filter = ReplayFilter::new(1_000);
    let e = KeyEpoch(1);
    let tags: Vec<whispr_protocol::sphinx::ReplayTag> = (0..2_000)
        .map(|_| whispr_protocol::sphinx::ReplayTag(rng.random()))
        .collect();
    let refused = tags
        .iter()
        .filter(|t| filter.check_and_insert(e, **t).is_err())
        .count();
    // At twice the capacity the false-positive rate is about 0.3 %: a handful of the 1 000
    // tags past the capacity, not all of them.
    assert!(refused <= 20, "{refused} fresh tags refused");
    for t in &tags {
        assert_eq!(filter.check_and_insert(e, *t), Err(Error::Replayed));
    }
    // Another epoch starts empty and exact.
    let fresh = whispr_protocol::sphinx::ReplayTag([7; 32]);
    filter.check_and_insert(KeyEpoch(2), fresh).unwrap();
    assert_eq!(
        filter.check_and_insert(KeyEpoch(2), fresh),
        Err(Error::Replayed)
    );
}

/// A SURB through three hops back to its creator's mailbox: the node that uses it (a mailbox
/// node acknowledging a deposit) and every hop on the way see only sealed bytes, and only the
/// recovery material of that very SURB opens the reply.
#[test]
fn surb_reply_reaches_and_opens_only_for_its_creator() {
    let mut rng = rng(5);
    let hops = nodes(&mut rng, 3);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    let delays = delays_ms(&[3, 4]);
    let creator_mailbox = DestinationAddress([0xAB; 32]);
    let (surb, recovery) =
        create_surb(&mut rng, &route, &delays, creator_mailbox, SurbId([1; 16])).unwrap();
    let (_, other_recovery) =
        create_surb(&mut rng, &route, &delays, creator_mailbox, SurbId([2; 16])).unwrap();
    assert_eq!(surb.as_bytes().len(), SURB_SIZE);
    // The SURB travels inside an envelope as bytes and is parsed back.
    let surb = Surb::from_bytes(surb.as_bytes()).unwrap();

    let reply = b"deposit 42 stored until tomorrow".to_vec();
    let (first_hop, packet) = use_surb(&surb, &reply).unwrap();
    assert_eq!(first_hop, hops[0].id());
    assert_eq!(packet.as_bytes().len(), PACKET_SIZE);

    let refs: Vec<&TestNode> = hops.iter().collect();
    let mut bytes = packet.into_bytes();
    for (i, node) in hops.iter().enumerate() {
        assert!(!contains(&bytes, &reply), "hop {i} sees the reply in clear");
        match node.process(&bytes).unwrap().action {
            HopAction::Forward { packet, delay, .. } => {
                assert_eq!(delay, delays[i]);
                bytes = packet.into_bytes();
            }
            HopAction::DeliverSurbReply {
                destination,
                surb_id,
                sealed,
            } => {
                assert_eq!(i, refs.len() - 1);
                assert_eq!(destination, creator_mailbox);
                assert_eq!(surb_id, SurbId([1; 16]));
                assert_eq!(sealed.len(), PAYLOAD_SIZE);
                assert!(!contains(&sealed, &reply), "final hop sees the reply");
                assert_eq!(
                    other_recovery.open(&sealed).unwrap_err(),
                    Error::Decrypt("surb reply")
                );
                // The creator stores its recovery material and reads it back later.
                let stored = SurbRecovery::from_bytes(&recovery.to_bytes()).unwrap();
                assert_eq!(stored.surb_id(), SurbId([1; 16]));
                assert_eq!(stored.open(&sealed).unwrap(), reply);
                // Tampering with the sealed reply is detected.
                let mut tampered = sealed.clone();
                tampered[100] ^= 1;
                assert!(recovery.open(&tampered).is_err());
                return;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("reply never delivered");
}

#[test]
fn surb_misuse_is_refused() {
    let mut rng = rng(6);
    let hops = nodes(&mut rng, 2);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    assert!(matches!(
        create_surb(
            &mut rng,
            &route,
            &[Duration::ZERO],
            DestinationAddress([1; 32]),
            SurbId([0; 16])
        ),
        Err(Error::InvalidArgument(_))
    ));
    let (surb, _) = create_surb(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([1; 32]),
        SurbId([9; 16]),
    )
    .unwrap();
    assert!(matches!(
        use_surb(&surb, &vec![0u8; PLAINTEXT_LEN_MAX + 1]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Surb::from_bytes(&surb.as_bytes()[1..]),
        Err(Error::BadLength { .. })
    ));
    assert!(SurbRecovery::from_bytes(&[1u8; 10]).is_err());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
