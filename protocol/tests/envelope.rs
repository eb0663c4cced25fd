//! Sealed-sender envelopes: who can open them, what is in clear, tampering, forgery, sizes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::rng;
use ed25519_dalek::SigningKey;
use hpke::{Deserializable, Serializable};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::envelope::{
    Envelope, EnvelopeContent, MailboxPublicKey, MailboxSecretKey, OuterFields,
};
use whispr_protocol::fragment::{FRAGMENT_COUNT_MAX, FRAGMENT_DATA_LEN, FragmentInfo};
use whispr_protocol::payload::FinalMessage;
use whispr_protocol::sphinx::{PLAINTEXT_LEN_MAX, RouteHop, SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::sphinx::{Surb, create_surb};
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, Error, MailboxId, MessageId, NodeId, SurbId,
    UnixTime, wire,
};

fn outer(rng: &mut ChaCha20Rng, surb: Option<Surb>) -> OuterFields {
    OuterFields {
        mailbox_id: MailboxId::random(rng),
        access_token: AccessToken::random(rng),
        dedup_id: DedupId::random(rng),
        expires_at: Some(UnixTime(1_800_000_000_000)),
        ack_surb: surb,
    }
}

fn content(rng: &mut ChaCha20Rng, data: Vec<u8>) -> EnvelopeContent {
    EnvelopeContent {
        message_id: MessageId::random(rng),
        fragment: FragmentInfo {
            index: 0,
            count: 1,
            total_len: data.len() as u32,
            message_digest: [5; 32],
        },
        content: data,
    }
}

fn surb(rng: &mut ChaCha20Rng) -> Surb {
    let hops: Vec<RouteHop> = (0..5)
        .map(|i| RouteHop {
            node: NodeId([i; 32]),
            sphinx_key: SphinxPublicKey::from(&SphinxSecretKey::random_from_rng(rng)),
        })
        .collect();
    create_surb(
        rng,
        &hops,
        &[std::time::Duration::from_secs(1); 4],
        DestinationAddress([1; 32]),
        SurbId([7; 16]),
    )
    .unwrap()
    .0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// An envelope opens with the recipient's key, after a trip through the wire encoding,
    /// and names its sender; it names the sender only inside.
    #[test]
    fn envelope_opens_only_with_the_right_key_and_names_the_sender_only_inside(
        seed in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..=FRAGMENT_DATA_LEN),
        with_surb in any::<bool>(),
    ) {
        let mut rng = rng(seed);
        let recipient = MailboxSecretKey::generate(&mut rng);
        let stranger = MailboxSecretKey::generate(&mut rng);
        let sender = SigningKey::generate(&mut rng);
        let surb = with_surb.then(|| surb(&mut rng));
        let outer = outer(&mut rng, surb);
        let content = content(&mut rng, data);
        let sealed = Envelope::seal(&mut rng, &recipient.public_key(), &sender, outer.clone(), &content).unwrap();
        let bytes = FinalMessage::Deposit(sealed).encode().unwrap();
        prop_assert!(bytes.len() <= PLAINTEXT_LEN_MAX);
        // The sender's identity key appears nowhere in what travels.
        let identity = sender.verifying_key().to_bytes();
        prop_assert!(!bytes.windows(32).any(|w| w == identity));
        let FinalMessage::Deposit(received) = FinalMessage::decode(&bytes).unwrap() else {
            panic!("not a deposit");
        };
        prop_assert_eq!(&received.outer, &outer);
        let opened = received.open(&recipient).unwrap();
        prop_assert_eq!(opened.sender, sender.verifying_key());
        prop_assert_eq!(opened.content, content);
        prop_assert_eq!(received.open(&stranger).unwrap_err(), Error::Decrypt("envelope"));
    }

    /// Changing any bit of an authenticated field (mailbox id, dedup id, expiry, encapsulated
    /// key, ciphertext) makes the envelope fail to open.
    #[test]
    fn tampered_envelope_does_not_open(seed in any::<u64>(), field in 0usize..5, bit in 0usize..256) {
        let mut rng = rng(seed);
        let recipient = MailboxSecretKey::generate(&mut rng);
        let sender = SigningKey::generate(&mut rng);
        let outer = outer(&mut rng, None);
        let content = content(&mut rng, b"meet at noon".to_vec());
        let sealed = Envelope::seal(&mut rng, &recipient.public_key(), &sender, outer, &content).unwrap();
        let mut w = sealed.to_wire();
        match field {
            0 => w.mailbox_id[bit % 32] ^= 1 << (bit % 8),
            1 => w.dedup_id[bit % 16] ^= 1 << (bit % 8),
            2 => w.expires_at_ms ^= 1 << (bit % 64),
            3 => w.hpke_enc[bit % 32] ^= 1 << (bit % 8),
            _ => { let n = w.ciphertext.len(); w.ciphertext[bit % n] ^= 1 << (bit % 8) }
        }
        match Envelope::from_wire(w) {
            Ok(envelope) => prop_assert!(envelope.open(&recipient).is_err()),
            Err(e) => prop_assert!(e.is_peer_caused()),
        }
    }
}

/// A recipient who re-seals a sender's signed content to another mailbox cannot make it pass
/// as the sender's: the signature covers the mailbox it was sealed to.
#[test]
fn resealed_content_fails_the_sender_signature() {
    let mut rng = rng(7);
    let bob = MailboxSecretKey::generate(&mut rng);
    let carol = MailboxSecretKey::generate(&mut rng);
    let alice = SigningKey::generate(&mut rng);
    let to_bob = outer(&mut rng, None);
    let content = content(&mut rng, b"for bob only".to_vec());
    let sealed = Envelope::seal(&mut rng, &bob.public_key(), &alice, to_bob, &content).unwrap();
    assert!(sealed.open(&bob).is_ok());

    // Bob decrypts the inner bytes by hand (as the spec allows anyone with the key to do) and
    // seals them unchanged to Carol's mailbox.
    let w = sealed.to_wire();
    type Kem = hpke::kem::X25519HkdfSha256;
    type Kdf = hpke::kdf::HkdfSha256;
    type Aead = hpke::aead::ChaCha20Poly1305;
    let aad = |w: &wire::SealedEnvelope| {
        let mut a = b"whispr-envelope-aad-v1".to_vec();
        a.extend_from_slice(&1u32.to_be_bytes());
        a.extend_from_slice(&w.mailbox_id);
        a.extend_from_slice(&w.dedup_id);
        a.extend_from_slice(&w.expires_at_ms.to_be_bytes());
        a
    };
    let bob_sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(bob.to_bytes().as_ref()).unwrap();
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&w.hpke_enc).unwrap();
    let inner = hpke::single_shot_open::<Aead, Kdf, Kem>(
        &hpke::OpModeR::Base,
        &bob_sk,
        &enc,
        b"whispr-envelope-v1",
        &w.ciphertext,
        &aad(&w),
    )
    .unwrap();
    let mut to_carol = w.clone();
    to_carol.mailbox_id = MailboxId::random(&mut rng).as_bytes().to_vec();
    let carol_pk =
        <Kem as hpke::Kem>::PublicKey::from_bytes(&carol.public_key().to_bytes()).unwrap();
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
        &hpke::OpModeS::Base,
        &carol_pk,
        b"whispr-envelope-v1",
        &inner,
        &aad(&to_carol),
        &mut rng,
    )
    .unwrap();
    to_carol.hpke_enc = enc.to_bytes().to_vec();
    to_carol.ciphertext = ciphertext;
    let forged = Envelope::from_wire(to_carol).unwrap();
    assert_eq!(
        forged.open(&carol).unwrap_err(),
        Error::BadSignature("sender certificate")
    );
}

/// The largest envelope the client builds — a full fragment with the largest fragment info,
/// an ack SURB and every field at its widest — fits in one Sphinx payload.
#[test]
fn worst_case_envelope_fits_one_packet() {
    let mut rng = rng(8);
    let recipient = MailboxSecretKey::generate(&mut rng);
    let sender = SigningKey::generate(&mut rng);
    let mut outer = outer_with_surb(&mut rng);
    outer.expires_at = Some(UnixTime(u64::MAX));
    let content = EnvelopeContent {
        message_id: MessageId([0xFF; 16]),
        fragment: FragmentInfo {
            index: FRAGMENT_COUNT_MAX as u32 - 1,
            count: FRAGMENT_COUNT_MAX as u32,
            total_len: whispr_protocol::fragment::MESSAGE_LEN_MAX as u32,
            message_digest: [0xFF; 32],
        },
        content: vec![0xFF; FRAGMENT_DATA_LEN],
    };
    let sealed =
        Envelope::seal(&mut rng, &recipient.public_key(), &sender, outer, &content).unwrap();
    let bytes = FinalMessage::Deposit(sealed).encode().unwrap();
    assert!(
        bytes.len() <= PLAINTEXT_LEN_MAX,
        "{} > {PLAINTEXT_LEN_MAX}",
        bytes.len()
    );
    // Headroom: report it so that a format change that eats it shows up here.
    assert!(
        PLAINTEXT_LEN_MAX - bytes.len() >= 16,
        "headroom {}",
        PLAINTEXT_LEN_MAX - bytes.len()
    );
    // Content one fragment too large is refused at sealing time.
    let mut too_big = content_with_len(&mut rng, PLAINTEXT_LEN_MAX);
    too_big.fragment.total_len = PLAINTEXT_LEN_MAX as u32;
    let surb_outer = outer_with_surb(&mut rng);
    assert!(matches!(
        Envelope::seal(
            &mut rng,
            &recipient.public_key(),
            &sender,
            surb_outer,
            &too_big
        ),
        Err(Error::TooLarge { .. })
    ));
}

fn content_with_len(rng: &mut ChaCha20Rng, len: usize) -> EnvelopeContent {
    content(rng, vec![1; len])
}

fn outer_with_surb(rng: &mut ChaCha20Rng) -> OuterFields {
    let s = surb(rng);
    outer(rng, Some(s))
}

#[test]
fn malformed_envelopes_get_typed_errors() {
    let mut rng = rng(9);
    let recipient = MailboxSecretKey::generate(&mut rng);
    let sender = SigningKey::generate(&mut rng);
    let outer = outer(&mut rng, None);
    let content = content(&mut rng, b"x".to_vec());
    let good = Envelope::seal(&mut rng, &recipient.public_key(), &sender, outer, &content)
        .unwrap()
        .to_wire();

    let mut w = good.clone();
    w.version = 2;
    assert_eq!(
        Envelope::from_wire(w).unwrap_err(),
        Error::UnknownVersion {
            what: "sealed envelope",
            version: 2
        }
    );
    let mut w = good.clone();
    w.mailbox_id.pop();
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::BadLength {
            what: "mailbox id",
            ..
        })
    ));
    let mut w = good.clone();
    w.access_token.push(0);
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::BadLength { .. })
    ));
    let mut w = good.clone();
    w.ack_surb = vec![1, 2, 3];
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::BadLength { what: "surb", .. })
    ));
    let mut w = good.clone();
    w.ciphertext = vec![0; PLAINTEXT_LEN_MAX + 1];
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::TooLarge { .. })
    ));
    let mut w = good.clone();
    w.ciphertext.truncate(3);
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        Envelope::decode(&[0xFF, 0xFF, 0xFF]),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        Envelope::decode(&vec![0u8; PLAINTEXT_LEN_MAX + 1]),
        Err(Error::TooLarge { .. })
    ));
    let mut w = good.clone();
    w.mailbox_id = vec![0; 32];
    assert!(matches!(
        Envelope::from_wire(w),
        Err(Error::Malformed { .. })
    ));
    assert!(MailboxPublicKey::from_bytes(&[1; 31]).is_err());
    assert!(Envelope::decode(&wire::encode(&good)).is_ok());
}

/// Security review finding 7: the length of what a sender sealed must not show. Every
/// fragment-sized content (a 10-byte receipt, a hello, a short text, a full fragment, cover)
/// seals to the same ciphertext length, so that the mailbox node and anyone who sees the
/// sizes of polls cannot tell them apart.
#[test]
fn envelopes_of_every_content_length_up_to_a_fragment_are_the_same_size() {
    let mut rng = rng(9);
    let recipient = MailboxSecretKey::generate(&mut rng);
    let sender = SigningKey::generate(&mut rng);
    let mut lens = Vec::new();
    for len in [
        0,
        1,
        10,
        70,
        126,
        127,
        128,
        129,
        130,
        200,
        1000,
        1199,
        FRAGMENT_DATA_LEN,
    ] {
        let c = content_with_len(&mut rng, len);
        let o = outer(&mut rng, None);
        let sealed = Envelope::seal(&mut rng, &recipient.public_key(), &sender, o, &c).unwrap();
        lens.push((len, sealed.ciphertext_len()));
        // Padding does not change what opens.
        assert_eq!(sealed.open(&recipient).unwrap().content, c);
    }
    let first = lens[0].1;
    assert!(
        lens.iter().all(|(_, l)| *l == first),
        "ciphertext lengths by content length: {lens:?}"
    );
}
