//! Prekey requests and bundles: round trips, destination checks, signatures, malformed input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{nodes, rng};
use ed25519_dalek::SigningKey;
use whispr_protocol::payload::{FinalMessage, PrekeyRequest, Reply};
use whispr_protocol::prekeys::{PrekeyBundle, SignedPrekey, sign_identity};
use whispr_protocol::sphinx::{PLAINTEXT_LEN_MAX, create_surb};
use whispr_protocol::{AccessToken, DestinationAddress, Error, MailboxId, SurbId, wire};

fn request(seed: u64) -> PrekeyRequest {
    let mut rng = rng(seed);
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
    PrekeyRequest {
        mailbox_id: MailboxId([7; 32]),
        access_token: AccessToken([8; 32]),
        reply_surb: surb,
    }
}

fn bundle(owner: &SigningKey, mailbox: &MailboxId, prekey: Option<SignedPrekey>) -> PrekeyBundle {
    PrekeyBundle {
        owner_key: owner.verifying_key().to_bytes(),
        identity_key: [3; 32],
        identity_signature: sign_identity(owner, mailbox, &[3; 32]),
        prekey,
    }
}

#[test]
fn prekey_request_round_trips_and_must_go_to_its_mailbox() {
    let r = request(1);
    let bytes = FinalMessage::PrekeyRequest(r.clone()).encode().unwrap();
    assert!(bytes.len() <= PLAINTEXT_LEN_MAX);
    let decoded =
        FinalMessage::decode_for(DestinationAddress::mailbox(&r.mailbox_id), &bytes).unwrap();
    assert_eq!(decoded, FinalMessage::PrekeyRequest(r.clone()));
    // Addressed elsewhere: refused.
    for other in [
        DestinationAddress::NODE_SERVICE,
        DestinationAddress::mailbox(&MailboxId([9; 32])),
    ] {
        assert!(matches!(
            FinalMessage::decode_for(other, &bytes),
            Err(Error::Malformed { .. })
        ));
    }
}

#[test]
fn malformed_prekey_requests_are_refused() {
    let r = request(2);
    let good = wire::PrekeyRequest {
        mailbox_id: r.mailbox_id.as_bytes().to_vec(),
        access_token: r.access_token.as_bytes().to_vec(),
        reply_surb: r.reply_surb.as_bytes().to_vec(),
    };
    let cases = [
        wire::PrekeyRequest {
            reply_surb: Vec::new(),
            ..good.clone()
        },
        wire::PrekeyRequest {
            mailbox_id: vec![0; 32],
            ..good.clone()
        },
        wire::PrekeyRequest {
            mailbox_id: vec![1; 31],
            ..good.clone()
        },
        wire::PrekeyRequest {
            access_token: vec![1; 33],
            ..good.clone()
        },
    ];
    for case in cases {
        let bytes = wire::encode(&wire::FinalPayload {
            version: wire::VERSION,
            body: Some(wire::final_payload::Body::PrekeyRequest(case)),
        });
        assert!(FinalMessage::decode(&bytes).is_err());
    }
}

#[test]
fn bundles_verify_only_for_their_owner_and_mailbox() {
    let mut rng = rng(3);
    let owner = SigningKey::generate(&mut rng);
    let stranger = SigningKey::generate(&mut rng);
    let mailbox = MailboxId([4; 32]);
    let one_time = SignedPrekey::sign(&owner, &mailbox, 17, false, [5; 32]);
    let b = bundle(&owner, &mailbox, Some(one_time.clone()));
    b.verify(&owner.verifying_key(), &mailbox).unwrap();
    // Round trip through a SURB reply body.
    let bytes = Reply::Prekeys(b.clone()).encode().unwrap();
    assert_eq!(Reply::decode(&bytes).unwrap(), Reply::Prekeys(b.clone()));
    // Another owner, another mailbox, a swapped key, a fallback flag flipped: refused.
    assert!(b.verify(&stranger.verifying_key(), &mailbox).is_err());
    assert!(
        b.verify(&owner.verifying_key(), &MailboxId([5; 32]))
            .is_err()
    );
    let mut swapped = b.clone();
    swapped.prekey = Some(SignedPrekey {
        key: [6; 32],
        ..one_time.clone()
    });
    assert!(swapped.verify(&owner.verifying_key(), &mailbox).is_err());
    let mut flipped = b.clone();
    flipped.prekey = Some(SignedPrekey {
        fallback: true,
        ..one_time
    });
    assert!(flipped.verify(&owner.verifying_key(), &mailbox).is_err());
    let mut forged = b;
    forged.identity_key = [9; 32];
    assert!(forged.verify(&owner.verifying_key(), &mailbox).is_err());
    // A bundle with no key left still verifies (the requester then uses an invitation's key
    // or gives up cleanly).
    let empty = bundle(&owner, &mailbox, None);
    empty.verify(&owner.verifying_key(), &mailbox).unwrap();
    let bytes = Reply::Prekeys(empty.clone()).encode().unwrap();
    assert_eq!(Reply::decode(&bytes).unwrap(), Reply::Prekeys(empty));
}

#[test]
fn malformed_bundles_are_refused() {
    let mut rng = rng(4);
    let owner = SigningKey::generate(&mut rng);
    let mailbox = MailboxId([4; 32]);
    let good = wire::PrekeyBundle {
        owner_key: owner.verifying_key().to_bytes().to_vec(),
        identity_key: vec![3; 32],
        identity_signature: sign_identity(&owner, &mailbox, &[3; 32]).to_vec(),
        key_id: 1,
        key: vec![5; 32],
        key_signature: vec![0; 64],
        fallback: false,
    };
    let cases = [
        wire::PrekeyBundle {
            key: vec![5; 31],
            ..good.clone()
        },
        wire::PrekeyBundle {
            key_signature: vec![0; 63],
            ..good.clone()
        },
        wire::PrekeyBundle {
            owner_key: vec![1; 3],
            ..good.clone()
        },
        // Fields set without a key.
        wire::PrekeyBundle {
            key: Vec::new(),
            ..good.clone()
        },
    ];
    for case in cases {
        let bytes = wire::encode(&wire::ReplyBody {
            version: wire::VERSION,
            body: Some(wire::reply_body::Body::PrekeyBundle(case)),
        });
        assert!(Reply::decode(&bytes).is_err());
    }
}
