//! The sans-IO hold assembler: joining parts in any order, the agreement, range, size and
//! release-time rules, the bounded table and its TTL, and arbitrary part sequences.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::payload::{HOLD_PARTS_MAX, HeldPacketPart};
use whispr_protocol::sphinx::{
    PACKET_SIZE, RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, create_surb,
};
use whispr_protocol::{DestinationAddress, HoldId, NodeId, SurbId, UnixTime};
use whispr_timer_service::holds::{
    CompletedHold, HoldAssembler, HoldConfig, HoldError, PartOutcome,
};

const T0: UnixTime = UnixTime(1_800_000_000_000);
const MIN_MS: u64 = 60 * 1000;

/// A SURB (random: two calls never give the same one).
fn surb(seed: u64) -> Surb {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let hops: Vec<RouteHop> = (0..3)
        .map(|i| RouteHop {
            node: NodeId([i + 1; 32]),
            sphinx_key: SphinxPublicKey::from(&SphinxSecretKey::random_from_rng(&mut rng)),
        })
        .collect();
    create_surb(
        &mut rng,
        &hops,
        &[std::time::Duration::from_secs(1); 2],
        DestinationAddress([1; 32]),
        SurbId([7; 16]),
    )
    .unwrap()
    .0
}

fn packet_bytes(seed: u8) -> Vec<u8> {
    (0..PACKET_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The parts of `bytes` split into `count` nearly equal pieces.
fn split(id: u8, bytes: &[u8], count: u32) -> Vec<HeldPacketPart> {
    let size = bytes.len().div_ceil(count as usize);
    (0..count)
        .map(|i| {
            let start = (i as usize * size).min(bytes.len());
            let end = (start + size).min(bytes.len());
            HeldPacketPart {
                hold_id: HoldId([id; 16]),
                part_index: i,
                part_count: count,
                release_at: UnixTime(T0.0 + 3_600_000),
                cancel_hash: [id; 32],
                first_hop: NodeId([0xA0; 32]),
                data: bytes[start..end].to_vec(),
                ack_surb: None,
            }
        })
        .collect()
}

fn assembler() -> HoldAssembler {
    HoldAssembler::new(HoldConfig::default())
}

fn complete(outcome: PartOutcome) -> CompletedHold {
    match outcome {
        PartOutcome::Complete(hold) => hold,
        PartOutcome::Incomplete => panic!("expected a complete hold"),
    }
}

#[test]
fn one_part_hold_completes_at_once_without_using_the_table() {
    let bytes = packet_bytes(1);
    let mut a = HoldAssembler::new(HoldConfig {
        partial_max: 0,
        ..HoldConfig::default()
    });
    let mut part = split(1, &bytes, 1).remove(0);
    part.ack_surb = Some(surb(1));
    let hold = complete(a.accept(T0, part.clone()).unwrap());
    assert_eq!(hold.hold_id, part.hold_id);
    assert_eq!(hold.release_at, part.release_at);
    assert_eq!(hold.first_hop, part.first_hop);
    assert_eq!(hold.cancel_hash, part.cancel_hash);
    assert_eq!(hold.packet.as_bytes(), bytes.as_slice());
    assert_eq!(hold.ack_surbs, vec![part.ack_surb.unwrap()]);
    assert!(a.is_empty());
}

#[test]
fn parts_in_any_order_join_in_index_order_with_their_surbs() {
    let bytes = packet_bytes(2);
    for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]] {
        let mut a = assembler();
        let mut parts = split(2, &bytes, 3);
        for (i, p) in parts.iter_mut().enumerate() {
            // Part 1 carries no SURB.
            p.ack_surb = (i != 1).then(|| surb(i as u64));
        }
        let mut result = None;
        for (n, &i) in order.iter().enumerate() {
            let outcome = a.accept(T0, parts[i].clone()).unwrap();
            if n < 2 {
                assert_eq!(outcome, PartOutcome::Incomplete);
                assert_eq!(a.len(), 1);
            } else {
                result = Some(complete(outcome));
            }
        }
        let hold = result.unwrap();
        assert_eq!(hold.packet.as_bytes(), bytes.as_slice());
        let expected: Vec<Surb> = [&parts[0], &parts[2]]
            .iter()
            .map(|p| p.ack_surb.clone().unwrap())
            .collect();
        assert_eq!(hold.ack_surbs, expected);
        assert!(a.is_empty(), "a completed hold leaves the table");
    }
}

#[test]
fn disagreeing_duplicate_and_out_of_range_parts_are_refused_and_change_nothing() {
    let bytes = packet_bytes(3);
    let parts = split(3, &bytes, 3);
    let mut a = assembler();
    assert_eq!(
        a.accept(T0, parts[0].clone()).unwrap(),
        PartOutcome::Incomplete
    );

    let mut variants: Vec<(HeldPacketPart, HoldError)> = Vec::new();
    let mut p = parts[1].clone();
    p.part_count = 4;
    variants.push((p, HoldError::Mismatch));
    let mut p = parts[1].clone();
    p.release_at = UnixTime(p.release_at.0 + 1);
    variants.push((p, HoldError::Mismatch));
    let mut p = parts[1].clone();
    p.cancel_hash[0] ^= 1;
    variants.push((p, HoldError::Mismatch));
    let mut p = parts[1].clone();
    p.first_hop = NodeId([0xA1; 32]);
    variants.push((p, HoldError::Mismatch));
    variants.push((parts[0].clone(), HoldError::DuplicatePart { index: 0 }));
    let mut p = parts[1].clone();
    p.part_index = 3;
    variants.push((p, HoldError::PartOutOfRange));
    let mut p = parts[1].clone();
    p.part_count = 0;
    p.part_index = 0;
    variants.push((p, HoldError::PartOutOfRange));
    let mut p = parts[1].clone();
    p.part_count = HOLD_PARTS_MAX + 1;
    variants.push((p, HoldError::PartOutOfRange));
    let mut p = parts[1].clone();
    p.data = vec![0; PACKET_SIZE + 1];
    variants.push((p, HoldError::PartOutOfRange));
    let mut p = parts[1].clone();
    p.data = vec![0; PACKET_SIZE - parts[0].data.len() + 1];
    variants.push((p, HoldError::TooLong { max: PACKET_SIZE }));

    for (part, error) in variants {
        assert_eq!(a.accept(T0, part), Err(error.clone()), "{error}");
        assert_eq!(a.len(), 1);
    }
    // The hold still completes with the right parts, unchanged.
    assert_eq!(
        a.accept(T0, parts[2].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    let hold = complete(a.accept(T0, parts[1].clone()).unwrap());
    assert_eq!(hold.packet.as_bytes(), bytes.as_slice());
}

#[test]
fn parts_that_do_not_make_one_packet_are_refused_and_the_hold_dropped() {
    let mut a = assembler();
    let short = split(4, &packet_bytes(4)[..PACKET_SIZE - 1], 2);
    assert_eq!(
        a.accept(T0, short[0].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    assert_eq!(
        a.accept(T0, short[1].clone()),
        Err(HoldError::BadLength {
            len: PACKET_SIZE - 1,
            expected: PACKET_SIZE
        })
    );
    assert!(a.is_empty());
    let one = split(5, &[1, 2, 3], 1).remove(0);
    assert_eq!(
        a.accept(T0, one),
        Err(HoldError::BadLength {
            len: 3,
            expected: PACKET_SIZE
        })
    );
    assert!(a.is_empty());
}

#[test]
fn release_time_must_be_within_the_configured_window() {
    let config = HoldConfig {
        release_ahead_max_ms: 60 * MIN_MS,
        release_late_max_ms: 5 * MIN_MS,
        ..HoldConfig::default()
    };
    let mut a = HoldAssembler::new(config);
    let bytes = packet_bytes(6);
    let at = |release: u64| {
        let mut p = split(6, &bytes, 1).remove(0);
        p.release_at = UnixTime(release);
        p
    };
    assert!(a.accept(T0, at(T0.0 + 60 * MIN_MS)).is_ok());
    assert_eq!(
        a.accept(T0, at(T0.0 + 60 * MIN_MS + 1)),
        Err(HoldError::ReleaseTooFar {
            max_ms: 60 * MIN_MS
        })
    );
    assert!(a.accept(T0, at(T0.0 - 5 * MIN_MS)).is_ok());
    assert_eq!(
        a.accept(T0, at(T0.0 - 5 * MIN_MS - 1)),
        Err(HoldError::ReleaseTooLate { max_ms: 5 * MIN_MS })
    );
    assert!(a.accept(T0, at(u64::MAX)).is_err());
    assert!(a.accept(T0, at(0)).is_err());
}

#[test]
fn a_full_table_drops_its_oldest_partial_hold_for_a_new_one() {
    let mut a = HoldAssembler::new(HoldConfig {
        partial_max: 2,
        ..HoldConfig::default()
    });
    let held: Vec<Vec<HeldPacketPart>> =
        (10..12).map(|id| split(id, &packet_bytes(id), 2)).collect();
    for parts in &held {
        assert_eq!(
            a.accept(T0, parts[0].clone()).unwrap(),
            PartOutcome::Incomplete
        );
    }
    // A new hold drops the oldest (by its first part's arrival, then id), counted.
    let third = split(12, &packet_bytes(12), 2);
    let later = UnixTime(T0.0 + 1);
    assert_eq!(
        a.accept(later, third[0].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a.evicted_total(), 1);
    assert!(!a.contains(&HoldId([10; 16])));
    assert!(a.contains(&HoldId([11; 16])) && a.contains(&HoldId([12; 16])));
    // One-part holds need no room.
    assert!(matches!(
        a.accept(later, split(13, &packet_bytes(13), 1).remove(0)),
        Ok(PartOutcome::Complete(_))
    ));
    assert_eq!(a.evicted_total(), 1);
    // The others complete.
    let hold = complete(a.accept(later, held[1][1].clone()).unwrap());
    assert_eq!(hold.packet.as_bytes(), packet_bytes(11).as_slice());
    let hold = complete(a.accept(later, third[1].clone()).unwrap());
    assert_eq!(hold.packet.as_bytes(), packet_bytes(12).as_slice());
    assert!(a.is_empty());
    // Without room at all, holds of more than one part are refused.
    let mut none = HoldAssembler::new(HoldConfig {
        partial_max: 0,
        ..HoldConfig::default()
    });
    assert_eq!(
        none.accept(T0, held[0][0].clone()),
        Err(HoldError::TableFull { max: 0 })
    );
}

#[test]
fn partial_holds_expire_after_their_ttl() {
    let mut a = HoldAssembler::new(HoldConfig {
        partial_max: 2,
        partial_ttl_secs: 60,
        ..HoldConfig::default()
    });
    let old = split(20, &packet_bytes(20), 2);
    let new = split(21, &packet_bytes(21), 2);
    assert_eq!(
        a.accept(T0, old[0].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    let just_before = UnixTime(T0.0 + 59_999);
    assert_eq!(
        a.accept(just_before, new[0].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    assert_eq!(a.expire(just_before), 0);
    assert!(a.contains(&old[0].hold_id));
    // At the TTL the old hold is dropped (not evicted: the table had room).
    let at_ttl = UnixTime(T0.0 + 60_000);
    assert_eq!(a.expire(at_ttl), 1);
    assert!(!a.contains(&old[0].hold_id) && a.contains(&new[0].hold_id));
    // The old hold's second part now starts a new partial hold.
    assert_eq!(
        a.accept(at_ttl, old[1].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    assert_eq!(a.evicted_total(), 0);
    assert_eq!(a.expire(UnixTime(T0.0 + 120_000)), 2);
    assert!(a.is_empty());
}

#[test]
fn discard_drops_a_partial_hold() {
    let mut a = assembler();
    let parts = split(30, &packet_bytes(30), 2);
    a.accept(T0, parts[0].clone()).unwrap();
    assert_eq!(a.cancel_hash(&parts[0].hold_id), Some(&[30; 32]));
    assert!(a.discard(&parts[0].hold_id));
    assert!(!a.discard(&parts[0].hold_id));
    assert_eq!(a.cancel_hash(&parts[0].hold_id), None);
    // Its other part alone starts a new, incomplete hold.
    assert_eq!(
        a.accept(T0, parts[1].clone()).unwrap(),
        PartOutcome::Incomplete
    );
    assert_eq!(a.expire(UnixTime(T0.0 + 600_000)), 1);
}

/// The length of piece `index` of a packet split like [`split`] does.
fn piece_len(count: u32, index: u32) -> usize {
    let size = PACKET_SIZE.div_ceil(count.max(1) as usize);
    let start = (index as usize * size).min(PACKET_SIZE);
    (start + size).min(PACKET_SIZE) - start
}

fn arbitrary_part() -> impl Strategy<Value = (u64, HeldPacketPart)> {
    let numbering = prop_oneof![
        4 => (1u32..=HOLD_PARTS_MAX, any::<u32>()).prop_map(|(c, i)| (c, i % c)),
        1 => (0u32..6, 0u32..6),
    ];
    let release_at = prop_oneof![
        4 => Just(T0.0 + 3_600_000),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    let variant = prop_oneof![5 => Just(0u8), 1 => Just(1u8)];
    // Mostly the right size for the part's place in its hold, sometimes anything.
    let len = prop_oneof![4 => Just(None), 1 => (0usize..=PACKET_SIZE + 2).prop_map(Some)];
    (
        prop_oneof![3 => 0u64..1000, 1 => 0u64..200_000],
        0u8..3,
        numbering,
        release_at,
        variant.clone(),
        variant,
        len,
        any::<u8>(),
    )
        .prop_map(
            |(step, id, (count, index), release_at, hash, hop, len, fill)| {
                let len = len.unwrap_or_else(|| piece_len(count, index));
                (
                    step,
                    HeldPacketPart {
                        hold_id: HoldId([id; 16]),
                        part_index: index,
                        part_count: count,
                        release_at: UnixTime(release_at),
                        cancel_hash: [hash; 32],
                        first_hop: NodeId([hop; 32]),
                        data: vec![fill; len],
                        ack_surb: None,
                    },
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary parts (wrong numbering, sizes, disagreeing fields, time jumps) never panic;
    /// the table stays within its bound, and every completed hold is one exact packet.
    #[test]
    fn arbitrary_part_sequences_never_panic(
        parts in proptest::collection::vec(arbitrary_part(), 0..80),
        partial_max in 0usize..4,
    ) {
        let mut a = HoldAssembler::new(HoldConfig {
            partial_max,
            partial_ttl_secs: 60,
            ..HoldConfig::default()
        });
        let mut now = T0;
        for (step, part) in parts {
            now = UnixTime(now.0 + step);
            let expected = part.clone();
            match a.accept(now, part) {
                Ok(PartOutcome::Complete(hold)) => {
                    prop_assert_eq!(hold.packet.as_bytes().len(), PACKET_SIZE);
                    prop_assert_eq!(hold.hold_id, expected.hold_id);
                    prop_assert!(!a.contains(&expected.hold_id));
                }
                Ok(PartOutcome::Incomplete) => {
                    prop_assert!(a.contains(&expected.hold_id));
                }
                Err(_) => {}
            }
            prop_assert!(a.len() <= partial_max);
        }
        a.expire(UnixTime(u64::MAX));
        prop_assert!(a.is_empty());
    }

    /// A packet split into 1..=4 parts, delivered in any order with duplicates and strays of
    /// other holds in between, comes out whole, exactly once.
    #[test]
    fn any_split_in_any_order_reassembles_exactly(
        seed in any::<u8>(),
        count in 1u32..=HOLD_PARTS_MAX,
        order in Just((0..HOLD_PARTS_MAX).collect::<Vec<u32>>()).prop_shuffle(),
        duplicate in any::<bool>(),
    ) {
        let bytes = packet_bytes(seed);
        let parts = split(40, &bytes, count);
        let mut a = assembler();
        let mut completed = Vec::new();
        let order: Vec<u32> = order.into_iter().filter(|i| *i < count).collect();
        for (n, i) in order.iter().enumerate() {
            let stray = split(41, &bytes, 2).remove(0);
            let _ = a.accept(T0, stray);
            match a.accept(T0, parts[*i as usize].clone()).unwrap() {
                PartOutcome::Complete(hold) => completed.push(hold),
                PartOutcome::Incomplete => {
                    if duplicate {
                        prop_assert_eq!(
                            a.accept(T0, parts[*i as usize].clone()),
                            Err(HoldError::DuplicatePart { index: *i })
                        );
                    }
                }
            }
            prop_assert_eq!(completed.len(), usize::from(n + 1 == order.len()));
        }
        prop_assert_eq!(completed[0].packet.as_bytes(), bytes.as_slice());
        prop_assert!(!a.contains(&parts[0].hold_id));
    }
}
