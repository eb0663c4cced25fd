//! Fragmentation and bounded reassembly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::rng;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use whispr_protocol::fragment::{
    FRAGMENT_COUNT_MAX, FRAGMENT_DATA_LEN, Fragment, Inserted, MESSAGE_LEN_MAX, Reassembler,
    ReassemblyLimits, fragment_message,
};
use whispr_protocol::{Error, MessageId, UnixTime};

const T0: UnixTime = UnixTime(1_000_000);

fn limits() -> ReassemblyLimits {
    ReassemblyLimits {
        messages_max: 4,
        bytes_max: 4 * MESSAGE_LEN_MAX,
        age_max: Duration::from_secs(60),
        completed_max: 16,
    }
}

/// Feeds `fragments` and returns the one completed message; every other insert must be
/// Pending or Duplicate.
fn feed(r: &mut Reassembler<MessageId>, fragments: Vec<Fragment>) -> Vec<u8> {
    let mut done = None;
    for f in fragments {
        match r.insert(T0, f.message_id, f).unwrap() {
            Inserted::Complete(m) => {
                assert!(done.is_none(), "completed twice");
                done = Some(m);
            }
            Inserted::Pending | Inserted::Duplicate => {}
        }
    }
    done.expect("never completed")
}

#[test]
fn one_mib_message_reassembles_from_shuffled_duplicated_fragments() {
    let mut rng = rng(1);
    let mut message = vec![0u8; MESSAGE_LEN_MAX];
    rng.fill_bytes(&mut message);
    let id = MessageId::random(&mut rng);
    let fragments = fragment_message(id, &message).unwrap();
    assert_eq!(fragments.len(), FRAGMENT_COUNT_MAX);
    assert!(
        fragments[..fragments.len() - 1]
            .iter()
            .all(|f| f.data.len() == FRAGMENT_DATA_LEN)
    );
    // Every fragment once, a third of them twice more, all shuffled — but the last copy of
    // each fragment arrives before the last missing one completes the message.
    let mut arrivals = fragments.clone();
    for f in fragments.iter().step_by(3) {
        arrivals.push(f.clone());
        arrivals.push(f.clone());
    }
    arrivals.shuffle(&mut rng);
    let mut r = Reassembler::new(limits());
    let mut done = None;
    let mut duplicates = 0;
    for f in arrivals {
        match r.insert(T0, id, f).unwrap() {
            Inserted::Complete(m) => done = Some(m),
            Inserted::Duplicate => duplicates += 1,
            Inserted::Pending => {}
        }
    }
    assert_eq!(done.unwrap(), message);
    assert!(duplicates > 0);
    assert_eq!(r.messages(), 0);
    assert_eq!(r.bytes(), 0);
}

#[test]
fn late_duplicates_of_a_completed_message_are_recognised_until_it_ages_out() {
    let id = MessageId([3; 16]);
    let message = vec![9u8; 3 * FRAGMENT_DATA_LEN];
    let fragments = fragment_message(id, &message).unwrap();
    let mut r = Reassembler::new(limits());
    assert_eq!(feed(&mut r, fragments.clone()), message);
    // A retransmitted fragment arriving later neither re-delivers nor occupies a slot.
    assert_eq!(
        r.insert(UnixTime(T0.0 + 30_000), id, fragments[1].clone()),
        Ok(Inserted::Duplicate)
    );
    assert_eq!((r.messages(), r.bytes()), (0, 0));
    // Past age_max the key is forgotten: the fragment starts a new partial message.
    assert_eq!(
        r.insert(UnixTime(T0.0 + 61_000), id, fragments[1].clone()),
        Ok(Inserted::Pending)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_message_reassembles_in_any_order(
        len in 0usize..20_000,
        seed in any::<u64>(),
    ) {
        let mut rng = rng(seed);
        let mut message = vec![0u8; len];
        rng.fill_bytes(&mut message);
        let id = MessageId::random(&mut rng);
        let mut fragments = fragment_message(id, &message).unwrap();
        prop_assert_eq!(fragments.len(), len.div_ceil(FRAGMENT_DATA_LEN).max(1));
        fragments.shuffle(&mut rng);
        let mut r = Reassembler::new(limits());
        prop_assert_eq!(feed(&mut r, fragments), message);
    }

    /// A fragment whose data was changed is caught: by its length, or by the digest once
    /// the message is complete; nothing of the message is kept.
    #[test]
    fn tampered_fragment_is_rejected(seed in any::<u64>(), which in any::<prop::sample::Index>(), bit in 0usize..8) {
        let mut rng = rng(seed);
        let mut message = vec![0u8; 5_000];
        rng.fill_bytes(&mut message);
        let id = MessageId::random(&mut rng);
        let mut fragments = fragment_message(id, &message).unwrap();
        let i = which.index(fragments.len());
        let pos = rng.random_range(0..fragments[i].data.len());
        fragments[i].data[pos] ^= 1 << bit;
        let mut r = Reassembler::new(limits());
        let mut result = Ok(Inserted::Pending);
        for f in fragments {
            result = r.insert(T0, id, f);
            if result.is_err() { break; }
        }
        prop_assert_eq!(result, Err(Error::FragmentMismatch("reassembled message fails its digest")));
        prop_assert_eq!(r.messages(), 0);
        prop_assert_eq!(r.bytes(), 0);
    }
}

#[test]
fn contradicting_fragments_are_refused_and_change_nothing() {
    let mut rng = rng(2);
    let mut message = vec![0u8; 3 * FRAGMENT_DATA_LEN];
    rng.fill_bytes(&mut message);
    let id = MessageId::random(&mut rng);
    let fragments = fragment_message(id, &message).unwrap();
    let mut r = Reassembler::new(limits());
    assert_eq!(
        r.insert(T0, id, fragments[0].clone()).unwrap(),
        Inserted::Pending
    );
    let bytes_before = r.bytes();

    // Same index, other data.
    let mut other = fragments[0].clone();
    other.data[0] ^= 0xFF;
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::FragmentMismatch(_))
    ));
    // Another digest for the same message.
    let mut other = fragments[1].clone();
    other.info.message_digest[0] ^= 1;
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::FragmentMismatch(_))
    ));
    // Length and count that disagree with each other.
    let mut other = fragments[1].clone();
    other.info.count = 7;
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::FragmentMismatch(_))
    ));
    // Index beyond the count.
    let mut other = fragments[1].clone();
    other.info.index = 3;
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::FragmentMismatch(_))
    ));
    // Wrong data length for the index.
    let mut other = fragments[1].clone();
    other.data.pop();
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::FragmentMismatch(_))
    ));
    // Over the message size limit.
    let mut other = fragments[1].clone();
    other.info.total_len = MESSAGE_LEN_MAX as u32 + 1;
    assert!(matches!(
        r.insert(T0, id, other),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(r.bytes(), bytes_before);
    assert_eq!(r.messages(), 1);
    // The genuine rest still completes the message.
    assert_eq!(
        r.insert(T0, id, fragments[1].clone()).unwrap(),
        Inserted::Pending
    );
    assert_eq!(
        r.insert(T0, id, fragments[2].clone()).unwrap(),
        Inserted::Complete(message)
    );
}

#[test]
fn reassembly_is_bounded_in_messages_bytes_and_age() {
    let mut rng = rng(3);
    let two_fragment_message = |rng: &mut rand_chacha::ChaCha20Rng| {
        let mut m = vec![0u8; FRAGMENT_DATA_LEN + 1];
        rng.fill_bytes(&mut m);
        fragment_message(MessageId::random(rng), &m).unwrap()
    };
    // Message count.
    let mut r = Reassembler::new(ReassemblyLimits {
        messages_max: 2,
        bytes_max: 1 << 20,
        age_max: Duration::from_secs(60),
        completed_max: 16,
    });
    for _ in 0..2 {
        let f = two_fragment_message(&mut rng);
        r.insert(T0, f[0].message_id, f[0].clone()).unwrap();
    }
    let third = two_fragment_message(&mut rng);
    assert_eq!(
        r.insert(T0, third[0].message_id, third[0].clone()),
        Err(Error::Full {
            what: "reassembly messages",
            max: 2
        })
    );
    assert_eq!(r.messages(), 2);
    // Age: a minute later the old partial messages are dropped and the third fits.
    let later = UnixTime(T0.0 + 61_000);
    assert_eq!(
        r.insert(later, third[0].message_id, third[0].clone())
            .unwrap(),
        Inserted::Pending
    );
    assert_eq!(r.messages(), 1);
    assert_eq!(r.bytes(), FRAGMENT_DATA_LEN);
    assert_eq!(r.expire(UnixTime(later.0 + 61_000)), 1);
    assert_eq!((r.messages(), r.bytes()), (0, 0));

    // Bytes.
    let mut r = Reassembler::new(ReassemblyLimits {
        messages_max: 100,
        bytes_max: 2 * FRAGMENT_DATA_LEN,
        age_max: Duration::from_secs(60),
        completed_max: 16,
    });
    let a = two_fragment_message(&mut rng);
    let b = two_fragment_message(&mut rng);
    r.insert(T0, a[0].message_id, a[0].clone()).unwrap();
    r.insert(T0, b[0].message_id, b[0].clone()).unwrap();
    let c = two_fragment_message(&mut rng);
    assert_eq!(
        r.insert(T0, c[0].message_id, c[0].clone()),
        Err(Error::Full {
            what: "reassembly bytes",
            max: 2 * FRAGMENT_DATA_LEN
        })
    );
    // Finishing a message frees its bytes (its 1-byte last fragment still fits).
    assert!(matches!(
        r.insert(T0, a[1].message_id, a[1].clone()),
        Ok(Inserted::Complete(_))
    ));
    assert_eq!(r.bytes(), FRAGMENT_DATA_LEN);
    assert_eq!(
        r.insert(T0, c[0].message_id, c[0].clone()).unwrap(),
        Inserted::Pending
    );
}

#[test]
fn edge_sizes() {
    let id = MessageId([1; 16]);
    let empty = fragment_message(id, b"").unwrap();
    assert_eq!(empty.len(), 1);
    let mut r = Reassembler::new(limits());
    assert_eq!(feed(&mut r, empty), Vec::<u8>::new());
    let exact = vec![7u8; 2 * FRAGMENT_DATA_LEN];
    let f = fragment_message(MessageId([2; 16]), &exact).unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(feed(&mut r, f), exact);
    assert!(matches!(
        fragment_message(id, &vec![0u8; MESSAGE_LEN_MAX + 1]),
        Err(Error::TooLarge { .. })
    ));
}
