//! Wire messages: versions, round trips and malformed input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{nodes, rng};
use proptest::prelude::*;
use whispr_protocol::payload::{CancelHold, FinalMessage, HeldPacketPart, Reply};
use whispr_protocol::sphinx::{PACKET_SIZE, PLAINTEXT_LEN_MAX, create_surb};
use whispr_protocol::{
    CancelCapability, DedupId, DestinationAddress, Error, HoldId, KeyEpoch, MailboxId, NodeId,
    ReplyKey, SurbId, UnixTime, wire,
};

#[test]
fn hold_cancel_and_replies_round_trip() {
    let mut rng = rng(1);
    let hops = nodes(&mut rng, 2);
    let route: Vec<_> = hops.iter().map(common::TestNode::hop).collect();
    let (surb, _) = create_surb(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([1; 32]),
        SurbId([1; 16]),
    )
    .unwrap();
    let messages = [
        FinalMessage::Hold(HeldPacketPart {
            hold_id: HoldId([1; 16]),
            part_index: 1,
            part_count: 2,
            release_at: UnixTime(1_800_000_000_000),
            cancel_hash: [2; 32],
            first_hop: NodeId([3; 32]),
            data: vec![4; PACKET_SIZE / 2],
            ack_surb: Some(surb.clone()),
        }),
        FinalMessage::Cancel(CancelHold {
            hold_id: HoldId([5; 16]),
            capability: CancelCapability([6; 32]),
            ack_surb: None,
        }),
    ];
    for m in messages {
        let bytes = m.encode().unwrap();
        assert!(bytes.len() <= PLAINTEXT_LEN_MAX);
        assert_eq!(FinalMessage::decode(&bytes).unwrap(), m);
    }
    let replies = [
        Reply::DepositAck {
            dedup_id: DedupId([7; 16]),
            expires_at: UnixTime(9),
        },
        Reply::HoldAck {
            hold_id: HoldId([8; 16]),
            cancelled: true,
        },
        Reply::Data(vec![1, 2, 3]),
    ];
    for r in replies {
        assert_eq!(Reply::decode(&r.encode().unwrap()).unwrap(), r);
    }
    assert!(matches!(
        Reply::Data(vec![0; PLAINTEXT_LEN_MAX]).encode(),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn every_top_level_message_rejects_unknown_versions() {
    let v2 = |body: Option<wire::final_payload::Body>| {
        wire::encode(&wire::FinalPayload { version: 2, body })
    };
    assert_eq!(
        FinalMessage::decode(&v2(None)).unwrap_err(),
        Error::UnknownVersion {
            what: "final payload",
            version: 2
        }
    );
    // A missing version field decodes as 0, which is unknown too.
    assert!(matches!(
        FinalMessage::decode(&[]),
        Err(Error::UnknownVersion { version: 0, .. })
    ));
    assert!(matches!(
        Reply::decode(&wire::encode(&wire::ReplyBody {
            version: 3,
            body: None
        })),
        Err(Error::UnknownVersion { version: 3, .. })
    ));
    assert!(matches!(
        wire::decode::<wire::Directory>(
            &wire::encode(&wire::Directory {
                version: 9,
                descriptors: vec![]
            }),
            1024
        ),
        Err(Error::UnknownVersion { version: 9, .. })
    ));
    assert!(matches!(
        wire::decode::<wire::EnvelopeContent>(
            &wire::encode(&wire::EnvelopeContent {
                version: 4,
                ..Default::default()
            }),
            1024
        ),
        Err(Error::UnknownVersion { version: 4, .. })
    ));
    assert!(matches!(
        wire::decode::<wire::DescriptorBody>(
            &wire::encode(&wire::DescriptorBody {
                version: 5,
                ..Default::default()
            }),
            1024
        ),
        Err(Error::UnknownVersion { version: 5, .. })
    ));
    assert!(matches!(
        wire::decode::<wire::Directory>(&[0u8; 2000], 1000),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn malformed_final_payloads_get_typed_errors() {
    let hold = |f: &dyn Fn(&mut wire::HeldPacketPart)| {
        let mut h = wire::HeldPacketPart {
            hold_id: vec![1; 16],
            part_index: 0,
            part_count: 2,
            release_at_ms: 5,
            cancel_hash: vec![0; 32],
            first_hop: vec![0; 32],
            data: vec![1; 10],
            ack_surb: vec![],
        };
        f(&mut h);
        FinalMessage::decode(&wire::encode(&wire::FinalPayload {
            version: 1,
            body: Some(wire::final_payload::Body::Hold(h)),
        }))
    };
    assert!(hold(&|_| {}).is_ok());
    assert!(matches!(
        hold(&|h| h.part_index = 2),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        hold(&|h| h.part_count = 0),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        hold(&|h| h.part_count = 99),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        hold(&|h| h.hold_id.pop().map(|_| ()).unwrap_or(())),
        Err(Error::BadLength { .. })
    ));
    assert!(matches!(
        hold(&|h| h.cancel_hash = vec![]),
        Err(Error::BadLength { .. })
    ));
    assert!(matches!(
        hold(&|h| h.first_hop = vec![1; 33]),
        Err(Error::BadLength { .. })
    ));
    assert!(matches!(
        hold(&|h| h.data = vec![0; PACKET_SIZE + 1]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        hold(&|h| h.ack_surb = vec![0; 10]),
        Err(Error::BadLength { .. })
    ));
    assert!(matches!(
        FinalMessage::decode(&wire::encode(&wire::FinalPayload {
            version: 1,
            body: None
        })),
        Err(Error::Malformed { .. })
    ));
}

proptest! {
    /// Arbitrary bytes never panic any decoder and only produce peer-caused errors.
    #[test]
    fn arbitrary_bytes_only_produce_peer_caused_errors(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        for result in [
            FinalMessage::decode(&bytes).map(|_| ()),
            Reply::decode(&bytes).map(|_| ()),
            whispr_protocol::envelope::Envelope::decode(&bytes).map(|_| ()),
            whispr_protocol::directory::SignedDescriptor::decode(&bytes).map(|_| ()),
            whispr_protocol::sphinx::Surb::from_bytes(&bytes).map(|_| ()),
        ] {
            if let Err(e) = result {
                prop_assert!(e.is_peer_caused(), "{e}");
            }
        }
    }
}

#[test]
fn final_payload_must_match_its_destination() {
    let hold = FinalMessage::Cancel(CancelHold {
        hold_id: HoldId([5; 16]),
        capability: CancelCapability([6; 32]),
        ack_surb: None,
    })
    .encode()
    .unwrap();
    assert!(FinalMessage::decode_for(DestinationAddress::NODE_SERVICE, &hold).is_ok());
    assert!(matches!(
        FinalMessage::decode_for(DestinationAddress([1; 32]), &hold),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn surb_ids_are_minted_per_mailbox_and_unforgeable() {
    let mut rng = rng(3);
    let key = ReplyKey::random(&mut rng);
    let other_key = ReplyKey::random(&mut rng);
    let mailbox = MailboxId([1; 32]);
    let other_mailbox = MailboxId([2; 32]);
    for _ in 0..100 {
        let id = key.mint_surb_id(&mut rng, &mailbox);
        assert_ne!(id, SurbId([0; 16]));
        assert!(key.verify_surb_id(&mailbox, &id));
        assert!(!key.verify_surb_id(&other_mailbox, &id));
        assert!(!other_key.verify_surb_id(&mailbox, &id));
        let mut forged = id;
        forged.0[15] ^= 1;
        assert!(!key.verify_surb_id(&mailbox, &forged));
    }
    assert!(!key.verify_surb_id(&mailbox, &SurbId::random(&mut rng)));
    assert_eq!(format!("{key:?}"), "ReplyKey(..)");
}

#[test]
fn epochs_and_peer_ids() {
    let hour = Duration::from_secs(3600);
    assert_eq!(KeyEpoch::containing(UnixTime(0), hour), KeyEpoch(0));
    assert_eq!(
        KeyEpoch::containing(UnixTime(3_600_000 * 5 + 1), hour),
        KeyEpoch(5)
    );
    assert_eq!(KeyEpoch(5).previous(), Some(KeyEpoch(4)));
    assert_eq!(KeyEpoch(0).previous(), None);
    assert_eq!(
        KeyEpoch::containing(UnixTime(7), Duration::ZERO),
        KeyEpoch(7)
    );
    let id = NodeId([9; 32]);
    let peer = id.libp2p_peer_id_bytes();
    assert_eq!(peer.len(), 38);
    assert_eq!(&peer[..6], &[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
    assert_eq!(&peer[6..], &[9; 32]);
}
