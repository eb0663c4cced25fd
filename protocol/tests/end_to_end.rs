//! The whole protocol path with no network: a client fragments and seals a message, routes it
//! through edge → mix → mailbox node; the mailbox node decodes the deposit and answers through
//! the ack SURB; the recipient reassembles and opens, the sender reads the ack.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{NOW, TestNode, descriptor, epoch, nodes, rng, signed};
use ed25519_dalek::SigningKey;
use rand::Rng;
use whispr_protocol::directory::{Directory, Role, sample_delays};
use whispr_protocol::envelope::{Envelope, EnvelopeContent, MailboxSecretKey, OuterFields};
use whispr_protocol::fragment::{
    Fragment, Inserted, Reassembler, ReassemblyLimits, fragment_message,
};
use whispr_protocol::payload::{FinalMessage, Reply};
use whispr_protocol::sphinx::{HopAction, build_packet, create_surb, use_surb};
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, MailboxId, MessageId, NodeId, ReplyKey, SurbId,
    UnixTime,
};

fn deliver(all: &[TestNode], first: NodeId, bytes: Vec<u8>) -> HopAction {
    let mut at = first;
    let mut bytes = bytes;
    for _ in 0..6 {
        let node = all.iter().find(|n| n.id() == at).expect("unknown hop");
        match node.process(&bytes).unwrap().action {
            HopAction::Forward {
                next_hop, packet, ..
            } => {
                at = next_hop;
                bytes = packet.into_bytes();
            }
            done => return done,
        }
    }
    panic!("too many hops")
}

#[test]
fn message_travels_mesh_and_ack_comes_back_through_surb() {
    let mut rng = rng(42);
    let all = nodes(&mut rng, 4); // edge, mix, bob's mailbox node, alice's mailbox node
    let roles = [
        (vec![Role::Edge], 0),
        (vec![Role::Mix], 1),
        (vec![Role::Mailbox], 0),
        (vec![Role::Mailbox], 0),
    ];
    let signed_all: Vec<_> = all
        .iter()
        .zip(&roles)
        .map(|(n, (r, l))| signed(n, &descriptor(n, r, *l, &mut rng)))
        .collect();
    let (dir, rejected) = Directory::build(NOW, &signed_all);
    assert!(rejected.is_empty());

    let alice = SigningKey::generate(&mut rng);
    let bob_mailbox_key = MailboxSecretKey::generate(&mut rng);
    let bob_mailbox = MailboxId::random(&mut rng);
    let bob_token = AccessToken::random(&mut rng);
    let alice_mailbox = MailboxId::random(&mut rng);
    // Alice registered this key with her mailbox node; it accepts only replies she minted.
    let alice_reply_key = ReplyKey::random(&mut rng);
    let bob_node = all[2].id();
    let alice_node = all[3].id();

    let mut message = vec![0u8; 5000];
    rng.fill_bytes(&mut message);
    let message_id = MessageId::random(&mut rng);
    let fragments = fragment_message(message_id, &message).unwrap();
    let mut pending_acks = std::collections::BTreeMap::new();
    let mut bob_inbox = Vec::new();

    for fragment in &fragments {
        // Alice: an ack SURB back to her own mailbox, then the sealed fragment.
        let back = dir.select_route(&mut rng, epoch(), &alice_node, 1).unwrap();
        let back_delays = sample_delays(&mut rng, back.len() - 1, Duration::from_millis(20));
        let surb_id = alice_reply_key.mint_surb_id(&mut rng, &alice_mailbox);
        let (surb, recovery) = create_surb(
            &mut rng,
            &back,
            &back_delays,
            DestinationAddress::mailbox(&alice_mailbox),
            surb_id,
        )
        .unwrap();
        let dedup_id = DedupId::random(&mut rng);
        pending_acks.insert(surb_id, (recovery, dedup_id));
        let envelope = Envelope::seal(
            &mut rng,
            &bob_mailbox_key.public_key(),
            &alice,
            OuterFields {
                mailbox_id: bob_mailbox,
                access_token: bob_token,
                dedup_id,
                expires_at: Some(UnixTime(NOW.0 + 3_600_000)),
                ack_surb: Some(surb),
            },
            &EnvelopeContent {
                message_id,
                fragment: fragment.info,
                content: fragment.data.clone(),
            },
        )
        .unwrap();
        let plaintext = FinalMessage::Deposit(envelope).encode().unwrap();
        let route = dir.select_route(&mut rng, epoch(), &bob_node, 1).unwrap();
        let delays = sample_delays(&mut rng, route.len() - 1, Duration::from_millis(20));
        let packet = build_packet(
            &mut rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&bob_mailbox),
            &plaintext,
        )
        .unwrap();

        // The mesh: edge, mix, then Bob's mailbox node.
        let HopAction::Deliver {
            destination,
            plaintext,
        } = deliver(&all, route[0].node, packet.into_bytes())
        else {
            panic!("not delivered");
        };
        assert_eq!(destination, DestinationAddress::mailbox(&bob_mailbox));
        let FinalMessage::Deposit(deposit) =
            FinalMessage::decode_for(destination, &plaintext).unwrap()
        else {
            panic!("not a deposit");
        };
        // The mailbox node checks what it can read in clear, stores, and acks via the SURB.
        assert_eq!(deposit.outer.mailbox_id, bob_mailbox);
        assert_eq!(deposit.outer.access_token, bob_token);
        let ack = Reply::DepositAck {
            dedup_id: deposit.outer.dedup_id,
            expires_at: deposit.outer.expires_at.unwrap(),
        }
        .encode()
        .unwrap();
        let (first, ack_packet) = use_surb(deposit.outer.ack_surb.as_ref().unwrap(), &ack).unwrap();
        bob_inbox.push(deposit);

        // The ack reaches Alice's mailbox node, sealed; Alice opens it.
        let HopAction::DeliverSurbReply {
            destination,
            surb_id,
            sealed,
        } = deliver(&all, first, ack_packet.into_bytes())
        else {
            panic!("ack not delivered");
        };
        assert_eq!(destination, DestinationAddress::mailbox(&alice_mailbox));
        assert!(alice_reply_key.verify_surb_id(&alice_mailbox, &surb_id));
        let (recovery, dedup_id) = pending_acks.remove(&surb_id).expect("unknown ack");
        assert_eq!(
            Reply::decode(&recovery.open(&sealed).unwrap()).unwrap(),
            Reply::DepositAck {
                dedup_id,
                expires_at: UnixTime(NOW.0 + 3_600_000)
            }
        );
    }
    assert!(pending_acks.is_empty(), "every fragment acknowledged");

    // Bob fetches in another order, opens and reassembles.
    bob_inbox.reverse();
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let mut done = None;
    for deposit in bob_inbox {
        let opened = deposit.open(&bob_mailbox_key).unwrap();
        assert_eq!(opened.sender, alice.verifying_key());
        let fragment = Fragment {
            message_id: opened.content.message_id,
            info: opened.content.fragment,
            data: opened.content.content,
        };
        if let Inserted::Complete(m) = reassembler
            .insert(
                NOW,
                (opened.sender.to_bytes(), fragment.message_id),
                fragment,
            )
            .unwrap()
        {
            done = Some(m);
        }
    }
    assert_eq!(done.unwrap(), message);
}

/// Debug output (what would reach a log) of every secret-bearing value is redacted.
#[test]
fn debug_output_never_shows_identifiers_keys_or_content() {
    let mut rng = rng(1);
    let mailbox = MailboxId([0xAA; 32]);
    let token = AccessToken([0xBB; 32]);
    let key = MailboxSecretKey::generate(&mut rng);
    let alice = SigningKey::generate(&mut rng);
    let hops = nodes(&mut rng, 2);
    let route: Vec<_> = hops.iter().map(TestNode::hop).collect();
    let (surb, recovery) = create_surb(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress::mailbox(&mailbox),
        SurbId([0xCC; 16]),
    )
    .unwrap();
    let envelope = Envelope::seal(
        &mut rng,
        &key.public_key(),
        &alice,
        OuterFields {
            mailbox_id: mailbox,
            access_token: token,
            dedup_id: DedupId([0xDD; 16]),
            expires_at: None,
            ack_surb: Some(surb),
        },
        &EnvelopeContent {
            message_id: MessageId([0xEE; 16]),
            fragment: fragment_message(MessageId([0xEE; 16]), b"secret")
                .unwrap()
                .remove(0)
                .info,
            content: b"secret".to_vec(),
        },
    )
    .unwrap();
    let printed = format!(
        "{envelope:?} {key:?} {:?} {recovery:?} {mailbox:?} {token:?} {:?}",
        key.public_key(),
        DestinationAddress::mailbox(&mailbox)
    );
    for needle in [
        "aaaa", "AAAA", "170, 170", "bbbb", "187, 187", "cccc", "204, 204", "dddd", "221, 221",
        "eeee", "238, 238", "secret",
    ] {
        assert!(!printed.contains(needle), "{needle} leaked in {printed}");
    }
    // No raw byte arrays at all (ciphertexts, keys).
    assert!(
        !printed.contains("[1") && !printed.contains("[2"),
        "{printed}"
    );
}
