//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/seed-*`): valid inputs
//! built with the public API, so that every fuzzer starts past the parsers, MACs and
//! signatures instead of having to discover them.
//!
//! Run it from anywhere with `cargo run -p whispr-protocol --example fuzz_seeds`. Every key,
//! id and message comes from a fixed-seed RNG, but `sphinx-packet` pads headers with its own
//! randomness, so packets, SURBs and what embeds them differ from run to run (all valid). It
//! overwrites only its own `seed-*` files and leaves inputs found by fuzzing alone. The
//! corpus is replayed by `tests/fuzz_corpus.rs`.
//!
//! The fixed keys match `whispr_protocol::fuzzing`: the first hop of every packet is the
//! Sphinx key `[7; 32]`, envelopes are sealed to the mailbox key `[9; 32]`, and descriptors
//! are valid at `UnixTime(1_800_000_000_000)`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use whispr_protocol::directory::{Directory, NodeDescriptor, Role, SignedDescriptor};
use whispr_protocol::envelope::{
    Envelope, EnvelopeContent, MailboxPublicKey, MailboxSecretKey, OuterFields,
};
use whispr_protocol::fragment::{FragmentInfo, fragment_message};
use whispr_protocol::payload::{CancelHold, FinalMessage, HeldPacketPart, Reply};
use whispr_protocol::sphinx::{
    HopAction, RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, SurbRecovery, build_packet,
    create_surb, process_packet, use_surb,
};
use whispr_protocol::{
    AccessToken, CancelCapability, DedupId, DestinationAddress, HoldId, KeyEpoch, MailboxId,
    MessageId, NodeId, ReplyKey, UnixTime, fuzzing, wire,
};

/// The Sphinx key of the first hop, as in `fuzzing::packet`.
const FIRST_HOP_KEY: [u8; 32] = [7; 32];
/// The mailbox key envelopes are sealed to, as in `fuzzing::envelope`.
const MAILBOX_KEY: [u8; 32] = [9; 32];
/// The time at which `fuzzing::descriptor` validates descriptors.
const NOW: UnixTime = UnixTime(1_800_000_000_000);

/// Collects the corpus files of one target.
struct Seeds {
    target: &'static str,
    files: Vec<(String, Vec<u8>)>,
}

impl Seeds {
    fn new(target: &'static str) -> Seeds {
        assert!(
            fuzzing::TARGETS.contains(&target),
            "unknown target {target}"
        );
        Seeds {
            target,
            files: Vec::new(),
        }
    }

    fn add(&mut self, name: &str, bytes: Vec<u8>) {
        assert!(
            fuzzing::run(self.target, &bytes),
            "{}: {name} failed",
            self.target
        );
        self.files.push((format!("seed-{name}"), bytes));
    }

    fn write(&self, corpus: &Path) -> usize {
        let dir = corpus.join(self.target);
        std::fs::create_dir_all(&dir).expect("create corpus directory");
        let mut total = 0;
        for (name, bytes) in &self.files {
            std::fs::write(dir.join(name), bytes).expect("write corpus file");
            total += bytes.len();
        }
        println!(
            "{}: {} files, {total} bytes in {}",
            self.target,
            self.files.len(),
            dir.display()
        );
        total
    }
}

fn signing_key(rng: &mut ChaCha20Rng) -> SigningKey {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

fn mailbox_key() -> MailboxPublicKey {
    MailboxSecretKey::from_bytes(&MAILBOX_KEY)
        .expect("mailbox key")
        .public_key()
}

/// A route whose first hop has the key `[7; 32]`, then hops with other fixed keys.
fn route(hops: usize) -> Vec<RouteHop> {
    (0..hops)
        .map(|i| RouteHop {
            node: NodeId([u8::try_from(i).expect("few hops").wrapping_add(0xa0); 32]),
            sphinx_key: SphinxPublicKey::from(&hop_secret(i)),
        })
        .collect()
}

/// The Sphinx secret key of hop `i` of [`route`].
fn hop_secret(i: usize) -> SphinxSecretKey {
    if i == 0 {
        SphinxSecretKey::from(FIRST_HOP_KEY)
    } else {
        let index = u8::try_from(i).expect("few hops");
        SphinxSecretKey::from([index.wrapping_mul(16).wrapping_add(1); 32])
    }
}

fn first_hop_node() -> NodeId {
    route(1).first().expect("one hop").node
}

fn delays(hops: usize) -> Vec<Duration> {
    (1..hops)
        .map(|i| Duration::from_millis(250 * u64::try_from(i).expect("few hops")))
        .collect()
}

fn envelope(
    rng: &mut ChaCha20Rng,
    message: &[u8],
    fragment_index: usize,
    expires_at: Option<UnixTime>,
    ack_surb: Option<Surb>,
) -> Envelope {
    let message_id = MessageId::random(rng);
    let fragment = fragment_message(message_id, message)
        .expect("fragment")
        .swap_remove(fragment_index);
    let sender = signing_key(rng);
    let outer = OuterFields {
        mailbox_id: MailboxId::random(rng),
        access_token: AccessToken::random(rng),
        dedup_id: DedupId::random(rng),
        expires_at,
        ack_surb,
    };
    let content = EnvelopeContent {
        message_id,
        fragment: fragment.info,
        content: fragment.data,
    };
    Envelope::seal(rng, &mailbox_key(), &sender, outer, &content).expect("seal")
}

fn ack_surb(rng: &mut ChaCha20Rng, hops: usize) -> (Surb, SurbRecovery) {
    let mailbox = MailboxId::random(rng);
    let surb_id = ReplyKey([11; 32]).mint_surb_id(rng, &mailbox);
    let destination = DestinationAddress::mailbox(&mailbox);
    create_surb(rng, &route(hops), &delays(hops), destination, surb_id).expect("create surb")
}

fn final_messages(rng: &mut ChaCha20Rng) -> Vec<(&'static str, FinalMessage)> {
    let (surb, _) = ack_surb(rng, 3);
    let deposit = envelope(rng, b"hello, mailbox", 0, None, None);
    let held = build_packet(
        rng,
        &route(3),
        &delays(3),
        DestinationAddress::NODE_SERVICE,
        b"held",
    )
    .expect("held packet")
    .into_bytes();
    let half = held.len() / 2;
    let hold_id = HoldId::random(rng);
    let capability = CancelCapability::random(rng);
    let cancel_hash: [u8; 32] = Sha256::digest(capability.as_bytes()).into();
    vec![
        ("deposit", FinalMessage::Deposit(deposit)),
        (
            "hold",
            FinalMessage::Hold(HeldPacketPart {
                hold_id,
                part_index: 1,
                part_count: 2,
                release_at: NOW.saturating_add(Duration::from_secs(3600)),
                cancel_hash,
                first_hop: first_hop_node(),
                data: held.get(half..).expect("second half").to_vec(),
                ack_surb: Some(surb.clone()),
            }),
        ),
        (
            "cancel",
            FinalMessage::Cancel(CancelHold {
                hold_id,
                capability,
                ack_surb: Some(surb),
            }),
        ),
    ]
}

fn wire_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    let mut seeds = Seeds::new("wire");
    for (name, message) in final_messages(rng) {
        seeds.add(
            &format!("final-{name}"),
            message.encode().expect("encode final"),
        );
    }
    let replies = [
        (
            "deposit-ack",
            Reply::DepositAck {
                dedup_id: DedupId::random(rng),
                expires_at: NOW,
            },
        ),
        (
            "hold-ack",
            Reply::HoldAck {
                hold_id: HoldId::random(rng),
                cancelled: true,
            },
        ),
        ("data", Reply::Data(b"prekey bundle".to_vec())),
    ];
    for (name, reply) in replies {
        seeds.add(
            &format!("reply-{name}"),
            reply.encode().expect("encode reply"),
        );
    }
    let info = fragment_message(MessageId([3; 16]), b"content")
        .expect("fragment")
        .swap_remove(0)
        .info;
    seeds.add(
        "envelope-content",
        wire::encode(&wire::EnvelopeContent {
            version: wire::VERSION,
            sender: Some(wire::SenderCertificate {
                identity_key: signing_key(rng).verifying_key().to_bytes().to_vec(),
                signature: vec![5; 64],
            }),
            message_id: vec![3; 16],
            fragment: Some(info.to_wire()),
            content: b"content".to_vec(),
            padding: Vec::new(),
        }),
    );
    let body = descriptors(rng).swap_remove(0).0.body;
    seeds.add("descriptor-body", body);
    seeds
}

fn packet_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    let mut seeds = Seeds::new("packet");
    let key = SphinxSecretKey::from(FIRST_HOP_KEY);
    let deposit = final_messages(rng)
        .swap_remove(0)
        .1
        .encode()
        .expect("encode");
    for hops in [1, 3, 5] {
        let destination = DestinationAddress(MailboxId::random(rng).0);
        let packet = build_packet(rng, &route(hops), &delays(hops), destination, &deposit)
            .expect("packet")
            .into_bytes();
        let processed = process_packet(&[&key], &packet).expect("first hop opens it");
        assert!(
            matches!(
                (hops, &processed.action),
                (1, HopAction::Deliver { .. }) | (3 | 5, HopAction::Forward { .. })
            ),
            "unexpected action {:?}",
            processed.action
        );
        seeds.add(&format!("forward-{hops}-hops"), packet);
    }
    for hops in [1, 2] {
        let (surb, recovery) = ack_surb(rng, hops);
        let reply = Reply::DepositAck {
            dedup_id: DedupId::random(rng),
            expires_at: NOW,
        }
        .encode()
        .expect("reply");
        let (_, packet) = use_surb(&surb, &reply).expect("use surb");
        let packet = packet.into_bytes();
        // Carry the reply to its last hop (only the first one has the fuzzing key).
        let mut at_hop = packet.clone();
        let mut sealed = None;
        for hop in 0..hops {
            let secret = hop_secret(hop);
            match process_packet(&[&secret], &at_hop)
                .expect("hop opens it")
                .action
            {
                HopAction::Forward { packet, .. } => at_hop = packet.into_bytes(),
                HopAction::DeliverSurbReply { sealed: s, .. } => sealed = Some(s),
                HopAction::Deliver { .. } => {}
            }
        }
        let sealed = sealed.expect("the last hop delivers the reply");
        assert_eq!(recovery.open(&sealed).expect("open reply"), reply);
        if hops == 2 {
            // `fuzzing::packet` reads recovery material from the first 48 bytes (a 2-hop
            // recovery) and opens the rest as a sealed reply.
            let mut mixed = recovery.to_bytes().to_vec();
            mixed.extend_from_slice(&sealed);
            seeds.add("recovery-and-reply", mixed);
        }
        seeds.add(&format!("surb-reply-{hops}-hops"), packet);
        seeds.add(&format!("surb-{hops}-hops"), surb.as_bytes().to_vec());
        seeds.add(
            &format!("recovery-{hops}-hops"),
            recovery.to_bytes().to_vec(),
        );
    }
    seeds
}

fn envelope_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    let mut seeds = Seeds::new("envelope");
    let key = MailboxSecretKey::from_bytes(&MAILBOX_KEY).expect("key");
    let message: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (surb, _) = ack_surb(rng, 3);
    let envelopes = [
        ("short", envelope(rng, b"hi", 0, None, None)),
        ("empty", envelope(rng, b"", 0, None, None)),
        (
            "expiring-with-surb",
            envelope(
                rng,
                b"see you",
                0,
                Some(NOW.saturating_add(Duration::from_secs(86_400))),
                Some(surb.clone()),
            ),
        ),
        (
            "full-fragment-with-surb",
            envelope(rng, &message, 1, Some(NOW), Some(surb)),
        ),
        ("last-fragment", envelope(rng, &message, 2, None, None)),
    ];
    for (name, envelope) in envelopes {
        envelope.open(&key).expect("opens with the fuzzing key");
        seeds.add(name, envelope.encode());
    }
    seeds
}

/// One `fuzzing::fragment` record: info length (u8), data length (u16 BE), info, data.
/// Index 0 is encoded explicitly (`08 00`) so that every fragment of a message has the same
/// info length, which is what `fuzzing::fragment` keys its messages by.
fn record(info: &FragmentInfo, data: &[u8]) -> Vec<u8> {
    let mut info_bytes = Vec::new();
    if info.index == 0 {
        info_bytes.extend_from_slice(&[0x08, 0x00]);
    }
    info_bytes.extend_from_slice(&wire::encode(&info.to_wire()));
    let mut out = vec![u8::try_from(info_bytes.len()).expect("short info")];
    out.extend_from_slice(&u16::try_from(data.len()).expect("short data").to_be_bytes());
    out.extend_from_slice(&info_bytes);
    out.extend_from_slice(data);
    out
}

fn fragment_seeds() -> Seeds {
    let mut seeds = Seeds::new("fragment");
    let message: Vec<u8> = (0..2500u32).map(|i| (i % 241) as u8).collect();
    let other: Vec<u8> = (0..1300u32).map(|i| (i % 239) as u8).collect();
    let frags = fragment_message(MessageId([1; 16]), &message).expect("fragment");
    let other_frags = fragment_message(MessageId([2; 16]), &other).expect("fragment");
    let single = fragment_message(MessageId([3; 16]), b"one fragment").expect("fragment");
    let empty = fragment_message(MessageId([4; 16]), b"").expect("fragment");
    let stream = |order: &[(&[whispr_protocol::fragment::Fragment], usize)]| {
        order
            .iter()
            .flat_map(|(frags, i)| {
                let fragment = frags.get(*i).expect("fragment index");
                record(&fragment.info, &fragment.data)
            })
            .collect::<Vec<u8>>()
    };
    seeds.add("single", stream(&[(&single, 0)]));
    seeds.add("empty-message", stream(&[(&empty, 0)]));
    seeds.add("in-order", stream(&[(&frags, 0), (&frags, 1), (&frags, 2)]));
    seeds.add(
        "reordered-duplicate",
        stream(&[(&frags, 2), (&frags, 0), (&frags, 2), (&frags, 1)]),
    );
    // The reassembler remembers completed messages: a late copy is a duplicate.
    seeds.add(
        "late-copy",
        stream(&[(&frags, 0), (&frags, 1), (&frags, 2), (&frags, 1)]),
    );
    seeds.add(
        "interleaved",
        stream(&[
            (&frags, 1),
            (&single, 0),
            (&other_frags, 1),
            (&frags, 0),
            (&other_frags, 0),
            (&frags, 2),
        ]),
    );
    // A fragment whose data is one byte short, then a good one.
    let second = frags.get(1).expect("three fragments");
    let mut bad = record(&second.info, second.data.get(1..).expect("data"));
    bad.extend(stream(&[(&single, 0)]));
    seeds.add("wrong-length", bad);
    seeds
}

fn descriptors(rng: &mut ChaCha20Rng) -> Vec<SignedDescriptor> {
    let roles: [(&[Role], u32); 6] = [
        (&[Role::Edge], 0),
        (&[Role::Mix], 1),
        (&[Role::Mix], 2),
        (&[Role::Mix], 3),
        (&[Role::Mailbox, Role::Timer], 0),
        (&[Role::Edge, Role::Mailbox], 0),
    ];
    let epoch_len = 3_600_000;
    let epoch = NOW.0 / epoch_len;
    roles
        .iter()
        .enumerate()
        .map(|(i, (roles, mix_layer))| {
            let identity = signing_key(rng);
            let node_id = NodeId(identity.verifying_key().to_bytes());
            let sphinx_keys: BTreeMap<KeyEpoch, SphinxPublicKey> = (0..=(i as u64 % 3))
                .map(|e| {
                    let mut secret = [0u8; 32];
                    rng.fill_bytes(&mut secret);
                    (
                        KeyEpoch(epoch + e),
                        SphinxPublicKey::from(&SphinxSecretKey::from(secret)),
                    )
                })
                .collect();
            NodeDescriptor {
                node_id,
                peer_id: node_id.libp2p_peer_id_bytes(),
                roles: roles.iter().copied().collect::<BTreeSet<_>>(),
                mix_layer: *mix_layer,
                addresses: vec![format!("/ip4/10.0.0.{i}/udp/4001/quic-v1")],
                api_url: (i % 2 == 0).then(|| format!("https://node{i}.example")),
                sphinx_keys,
                published_at: UnixTime(NOW.0 - 3_600_000),
                expires_at: UnixTime(NOW.0 + 86_400_000),
            }
            .sign(&identity)
            .expect("sign")
        })
        .collect()
}

fn descriptor_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    let mut seeds = Seeds::new("descriptor");
    let signed = descriptors(rng);
    let pick = |i: usize| signed.get(i).expect("six descriptors").clone();
    for (name, index) in [("edge", 0), ("mix-1", 1), ("mailbox-timer", 4)] {
        let descriptor = pick(index);
        descriptor.verify(NOW).expect("valid descriptor");
        seeds.add(&format!("signed-{name}"), descriptor.encode());
    }
    let encoded = Directory::encode(&signed);
    let (directory, rejections) = Directory::decode(NOW, &encoded).expect("directory");
    assert_eq!((directory.len(), rejections.len()), (signed.len(), 0));
    seeds.add("directory", encoded);
    // A directory with a duplicate and a tampered descriptor: both are reported as rejections.
    let mut tampered = pick(2);
    if let Some(b) = tampered.0.signature.first_mut() {
        *b ^= 1;
    }
    let with_rejections = Directory::encode(&[pick(0), pick(0), tampered]);
    let (_, rejections) = Directory::decode(NOW, &with_rejections).expect("directory");
    assert_eq!(rejections.len(), 2);
    seeds.add("directory-with-rejections", with_rejections);
    seeds
}

fn consensus_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    use whispr_protocol::consensus::{Consensus, VoteContent, compute_consensus};
    let mut seeds = Seeds::new("consensus");
    let network = fuzzing::fuzz_network().expect("network");
    seeds.add("network", network.to_text().into_bytes());
    let keys: Vec<SigningKey> = (1u8..=3)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect();
    let descriptors = descriptors(rng);
    let (valid_after, valid_until) = (UnixTime(NOW.0 - 60_000), UnixTime(NOW.0 + 3_600_000));
    let votes: Vec<VoteContent> = keys
        .iter()
        .map(|k| VoteContent {
            authority: k.verifying_key().to_bytes(),
            epoch: 7,
            valid_after,
            valid_until,
            descriptors: descriptors.clone(),
        })
        .collect();
    let signed = votes
        .first()
        .expect("a vote")
        .sign(keys.first().expect("a key"))
        .expect("sign vote");
    signed.verify(&network).expect("valid vote");
    seeds.add("vote", signed.encode());
    let body = compute_consensus(&network, 7, valid_after, valid_until, &votes).expect("body");
    let mut consensus = Consensus::new(&body);
    for k in &keys {
        consensus.sign(k);
    }
    consensus.verify(NOW, &network).expect("valid consensus");
    seeds.add("consensus-3-of-3", consensus.encode());
    let mut one = Consensus::new(&body);
    one.sign(keys.first().expect("a key"));
    seeds.add("consensus-1-of-3", one.encode());
    seeds
}

fn replica_seeds() -> Seeds {
    use whispr_protocol::replica::{
        DeviceRegistration, IdEntry, MessageKind, PushItem, RecordCopy, ReplicaMessage,
        SignedCreate,
    };
    let mut seeds = Seeds::new("replica");
    let mailbox_id = whispr_protocol::MailboxId([3; 32]);
    seeds.add(
        "push",
        ReplicaMessage::Push {
            mailbox_id,
            items: vec![PushItem {
                id: [1; 16],
                kind: MessageKind::Envelope,
                expires_at: NOW,
                body: vec![0xab; 40],
            }],
        }
        .encode(),
    );
    seeds.add(
        "acked",
        ReplicaMessage::Acked {
            mailbox_id,
            device: [4; 32],
            ids: vec![[1; 16], [2; 16]],
        }
        .encode(),
    );
    seeds.add(
        "ids",
        ReplicaMessage::Ids {
            mailbox_id,
            answer: true,
            live: vec![IdEntry {
                id: [1; 16],
                expires_at: NOW,
            }],
            gone: vec![IdEntry {
                id: [2; 16],
                expires_at: NOW,
            }],
        }
        .encode(),
    );
    seeds.add(
        "records",
        ReplicaMessage::Records {
            records: vec![RecordCopy {
                create: SignedCreate {
                    mailbox_id,
                    mailbox_key: [5; 32],
                    owner_key: [6; 32],
                    access_key_hash: [7; 32],
                    reply_key: Some([8; 32]),
                    retention_ms: 86_400_000,
                    replicas: vec![NodeId([9; 32]), NodeId([10; 32]), NodeId([11; 32])],
                    signature: [12; 64],
                },
                devices: vec![DeviceRegistration {
                    device_key: [13; 32],
                    signature: [14; 64],
                }],
            }],
        }
        .encode(),
    );
    seeds
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A `mailbox_http` input: the parser's selector byte, then its input.
fn selected(selector: u8, input: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(input);
    out
}

/// Real request bodies and query strings of the mailbox API, each behind the selector byte of
/// its parser in `fuzzing::mailbox_http`; signatures verify, so that the bodies are exactly
/// what a client sends.
fn mailbox_http_seeds(rng: &mut ChaCha20Rng) -> Seeds {
    use ed25519_dalek::Signer;
    use whispr_protocol::mailbox_api::{
        self as api, AckRequest, ChallengeRequest, CreateMailboxRequest, DeviceRequest,
        LoginRequest, PollQuery, PrekeysRequest, StreamCommand, StreamQuery,
    };
    use whispr_protocol::prekeys::{SignedPrekey, sign_identity};

    let mut seeds = Seeds::new("mailbox_http");
    let owner = signing_key(rng);
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    let mailbox = MailboxId(id);
    let mailbox_key = mailbox_key().to_bytes();
    let owner_key = owner.verifying_key().to_bytes();
    let access_key_hash: [u8; 32] = Sha256::digest(b"fuzz access key").into();
    let reply_key = [0x5a; 32];
    let node = NodeId([0xa0; 32]);

    // 0: POST /v1/mailboxes, v1 (one node) and v2 (replicated, with a reply key).
    let t = api::create_transcript(
        &mailbox,
        &mailbox_key,
        &owner_key,
        &access_key_hash,
        None,
        86_400_000,
    );
    let body = serde_json::json!({
        "mailbox_id": hex(&id),
        "mailbox_key": hex(&mailbox_key),
        "owner_key": hex(&owner_key),
        "access_key_hash": hex(&access_key_hash),
        "retention_ms": 86_400_000u64,
        "signature": hex(&owner.sign(&t).to_bytes()),
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    let fields = serde_json::from_slice::<CreateMailboxRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(fields.replicas, None);
    seeds.add("create-v1", selected(0, &bytes));
    let replicas = [node, NodeId([0xb1; 32])];
    let t = api::create_transcript_v2(
        &mailbox,
        &mailbox_key,
        &owner_key,
        &access_key_hash,
        Some(&reply_key),
        604_800_000,
        &replicas,
    )
    .unwrap();
    let body = serde_json::json!({
        "mailbox_id": hex(&id).to_uppercase(),
        "mailbox_key": hex(&mailbox_key),
        "owner_key": hex(&owner_key),
        "access_key_hash": hex(&access_key_hash),
        "reply_key": hex(&reply_key),
        "retention_ms": 604_800_000.0,
        "signature": hex(&owner.sign(&t).to_bytes()),
        "replicas": replicas.iter().map(|r| hex(&r.0)).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    let fields = serde_json::from_slice::<CreateMailboxRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(fields.replicas.as_deref(), Some(&replicas[..]));
    seeds.add("create-v2-replicated", selected(0, &bytes));

    // 1: POST /v1/auth/challenge; 2: POST /v1/auth/login.
    let device = signing_key(rng);
    let device_key = device.verifying_key().to_bytes();
    let body = serde_json::json!({"mailbox_id": hex(&id), "device_key": hex(&device_key)});
    let bytes = serde_json::to_vec(&body).unwrap();
    serde_json::from_slice::<ChallengeRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    seeds.add("challenge", selected(1, &bytes));
    let mut challenge = [0u8; 32];
    rng.fill_bytes(&mut challenge);
    let t = api::login_transcript(
        &api::node_audience(&node),
        &mailbox,
        &device_key,
        &challenge,
    );
    let body = serde_json::json!({
        "mailbox_id": hex(&id),
        "device_key": hex(&device_key),
        "challenge": hex(&challenge),
        "signature": hex(&device.sign(&t).to_bytes()),
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    serde_json::from_slice::<LoginRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    seeds.add("login", selected(2, &bytes));

    // 3: POST /v1/mailboxes/{id}/ack (an integer, and an integral float).
    for (name, body) in [
        ("ack", &b"{\"up_to\":42}"[..]),
        ("ack-float", b"{\"up_to\":7.0}"),
    ] {
        serde_json::from_slice::<AckRequest>(body).unwrap();
        seeds.add(name, selected(3, body));
    }

    // 4: POST /v1/mailboxes/{id}/devices.
    let t = api::device_transcript(&mailbox, &device_key);
    let body = serde_json::json!({
        "device_key": hex(&device_key),
        "signature": hex(&owner.sign(&t).to_bytes()),
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    serde_json::from_slice::<DeviceRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    seeds.add("device", selected(4, &bytes));

    // 5: PUT /v1/mailboxes/{id}/prekeys: two one-time keys and a fallback key.
    let mut identity_key = [0u8; 32];
    rng.fill_bytes(&mut identity_key);
    let prekeys: Vec<serde_json::Value> = (0u32..3)
        .map(|key_id| {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            let p = SignedPrekey::sign(&owner, &mailbox, key_id, key_id == 2, key);
            serde_json::json!({
                "key_id": p.key_id,
                "key": hex(&p.key),
                "fallback": p.fallback,
                "signature": hex(&p.signature),
            })
        })
        .collect();
    let body = serde_json::json!({
        "identity_key": hex(&identity_key),
        "identity_signature": hex(&sign_identity(&owner, &mailbox, &identity_key)),
        "prekeys": prekeys,
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    let fields = serde_json::from_slice::<PrekeysRequest>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(fields.prekeys.len(), 3);
    seeds.add("prekeys", selected(5, &bytes));

    // 6: a stream command (WebSocket text frame).
    let frame = serde_json::to_vec(&StreamCommand::Ack { up_to: 9 }).unwrap();
    seeds.add("stream-ack", selected(6, &frame));

    // 7: the poll query; 8: the stream query.
    let poll = b"after=3&limit=50&wait=25000";
    serde_urlencoded_check::<PollQuery>(poll);
    seeds.add("poll-query", selected(7, poll));
    let mut ticket = [0u8; 32];
    rng.fill_bytes(&mut ticket);
    let stream = format!("ticket={}&after=12", hex(&ticket));
    let q = serde_urlencoded_check::<StreamQuery>(stream.as_bytes());
    assert_eq!(q.ticket().unwrap(), ticket);
    seeds.add("stream-query", selected(8, stream.as_bytes()));

    // 9: a path id or bearer token.
    seeds.add("path-id", selected(9, hex(&id).as_bytes()));
    seeds
}

/// Parses a query string the way the node does (axum's `Query`: `serde_urlencoded`).
fn serde_urlencoded_check<T: serde::de::DeserializeOwned>(query: &[u8]) -> T {
    let text = std::str::from_utf8(query).unwrap();
    serde_urlencoded::from_str(text).unwrap()
}

/// Real admin bodies of the timer API, behind the selector byte of `fuzzing::timer_http`
/// (0 pause/resume/purge, 1 quarantine/release, 2 backup, 3 the `fired` query).
fn timer_http_seeds() -> Seeds {
    use whispr_protocol::timer_api::{self as api, BackupBody, CategoryBody, TaskBody};
    let mut seeds = Seeds::new("timer_http");
    let value = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap();
    for (name, body) in [
        ("category", &b"{\"category\":\"expiry\"}"[..]),
        ("category-all", b"{}"),
        ("category-null", b"{\"category\":null}"),
    ] {
        api::object_body::<CategoryBody>(value(body)).unwrap();
        seeds.add(name, selected(0, body));
    }
    // Refused: an admin body must be an object (`[]` once paused every category).
    assert_eq!(
        api::object_body::<CategoryBody>(value(b"[]")).unwrap_err(),
        api::ObjectBodyError::NotObject
    );
    seeds.add("category-array", selected(0, b"[]"));
    let body = format!("{{\"task\":\"{}\"}}", hex(&[0x3c; 16]));
    let task = api::object_body::<TaskBody>(value(body.as_bytes())).unwrap();
    assert_eq!(api::parse_task_id(&task.task), Some([0x3c; 16]));
    seeds.add("task", selected(1, body.as_bytes()));
    let body = b"{\"to\":\"/var/backups/whispr-timer/2026-12-06\"}";
    api::object_body::<BackupBody>(value(body)).unwrap();
    seeds.add("backup", selected(2, body));
    serde_urlencoded_check::<api::FiredQuery>(b"limit=20");
    seeds.add("fired-query", selected(3, b"limit=20"));
    seeds
}

/// `fuzz_seeds [TARGET…]`: writes the seeds of the named targets only (all without one), so
/// that adding a target does not rewrite the others' (randomly padded) packet seeds.
fn main() {
    let corpus: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let only: Vec<String> = std::env::args().skip(1).collect();
    for name in &only {
        assert!(
            fuzzing::TARGETS.contains(&name.as_str()),
            "unknown target {name}"
        );
    }
    let mut rng = ChaCha20Rng::seed_from_u64(0x5eed_f022);
    let all = [
        wire_seeds(&mut rng),
        packet_seeds(&mut rng),
        envelope_seeds(&mut rng),
        fragment_seeds(),
        descriptor_seeds(&mut rng),
        consensus_seeds(&mut rng),
        replica_seeds(),
        mailbox_http_seeds(&mut rng),
        timer_http_seeds(),
    ];
    let names: Vec<&str> = all.iter().map(|s| s.target).collect();
    assert_eq!(names, fuzzing::TARGETS, "one seed set per fuzz target");
    let total: usize = all
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|n| n == s.target))
        .map(|s| s.write(&corpus))
        .sum();
    println!("{total} bytes in all");
}
