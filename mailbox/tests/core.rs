#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]
//! The sans-IO mailbox core over the in-memory store: creation, deposits (auth, dedup,
//! expiry, quotas, rate limits, acks, failed writes), fetch/ack with several devices,
//! expiry sweeps and restarts, SURB replies, prekeys, export and erasure, encryption at
//! rest, owner authentication, and a property test of exactly-once delivery.
//!
//! A "restart" is `MailboxCore::open` again over a clone of the same `MemoryStore` (clones
//! share their data) with the same master key bytes. Time is always passed in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use whispr_mailbox::MailboxError;
use whispr_mailbox::auth::{AuthConfig, Session, Sessions, login_transcript};
use whispr_mailbox::config::CoreConfig;
use whispr_mailbox::core::{
    CreateMailbox, DepositReceipt, Incoming, MailboxCore, MessageBody, Output, PrekeyUpload,
    StoredMessage, create_transcript, device_transcript,
};
use whispr_mailbox::crypto::MasterKey;
use whispr_mailbox::store::{Cf, MailboxStore, MemoryStore, Op};
use whispr_protocol::envelope::{Envelope, EnvelopeContent, MailboxSecretKey, OuterFields};
use whispr_protocol::fragment::FragmentInfo;
use whispr_protocol::payload::{PrekeyRequest, Reply};
use whispr_protocol::prekeys::{SignedPrekey, sign_identity};
use whispr_protocol::sphinx::{
    HopAction, RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, SurbRecovery, create_surb,
    process_packet, use_surb,
};
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, MailboxId, MessageId, NodeId, ReplyKey, SurbId,
    UnixTime,
};

const T0: UnixTime = UnixTime(1_800_000_000_000);
const MINUTE: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const MASTER: [u8; 32] = [0x5a; 32];

type Core = MailboxCore<MemoryStore, ChaCha20Rng>;

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Every core gets its own seed, so that a restarted core does not replay the nonces of
/// the previous one.
static SEEDS: AtomicU64 = AtomicU64::new(1_000_000);

fn core_rng() -> ChaCha20Rng {
    rng(SEEDS.fetch_add(1, Ordering::Relaxed))
}

/// The default limits with exact expiry times (`expiry_granularity_ms` 1): these tests
/// check retention, expiry and sweep semantics to the millisecond. The rounding of the
/// default (1 hour) is checked in `rocks_store.rs`
/// (`expiry_times_on_disk_do_not_give_arrival_times_and_an_erased_mailbox_leaves_no_key`)
/// and below (`expiry_times_are_rounded_up_to_the_granularity_and_never_earlier`).
fn exact() -> CoreConfig {
    CoreConfig {
        expiry_granularity_ms: 1,
        ..CoreConfig::default()
    }
}

fn at(ms: u64) -> UnixTime {
    UnixTime(T0.0 + ms)
}

fn open(store: &MemoryStore, config: &CoreConfig, now: UnixTime) -> Core {
    MailboxCore::open(
        config.clone(),
        store.clone(),
        MasterKey::from_bytes(&MASTER),
        core_rng(),
        now,
    )
    .expect("core opens")
}

/// The (fixed) sender of every envelope.
fn sender() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

/// A mailbox owner with everything its client keeps.
struct Owner {
    signing: SigningKey,
    id: MailboxId,
    secret: MailboxSecretKey,
    token: AccessToken,
    reply_key: ReplyKey,
}

impl Owner {
    fn new(rng: &mut ChaCha20Rng) -> Owner {
        Owner {
            signing: SigningKey::generate(rng),
            id: MailboxId::random(rng),
            secret: MailboxSecretKey::generate(rng),
            token: AccessToken::random(rng),
            reply_key: ReplyKey::random(rng),
        }
    }

    fn key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    fn access_key_hash(&self) -> [u8; 32] {
        Sha256::digest(self.token.as_bytes()).into()
    }

    fn request(&self, retention_ms: u64) -> CreateMailbox {
        self.request_with(retention_ms, Some(self.reply_key.0))
    }

    fn request_with(&self, retention_ms: u64, reply_key: Option<[u8; 32]>) -> CreateMailbox {
        let mailbox_key = self.secret.public_key().to_bytes();
        let access_key_hash = self.access_key_hash();
        let transcript = create_transcript(
            &self.id,
            &mailbox_key,
            &self.key(),
            &access_key_hash,
            reply_key.as_ref(),
            retention_ms,
        );
        CreateMailbox {
            mailbox_id: self.id,
            mailbox_key,
            owner_key: self.key(),
            access_key_hash,
            reply_key,
            retention_ms,
            signature: self.signing.sign(&transcript).to_bytes(),
        }
    }

    /// An envelope for this mailbox from [`sender`], with the right access token.
    fn envelope(
        &self,
        rng: &mut ChaCha20Rng,
        dedup_id: DedupId,
        expires_at: Option<UnixTime>,
        ack_surb: Option<Surb>,
        content: &[u8],
    ) -> Envelope {
        self.envelope_with_token(rng, self.token, dedup_id, expires_at, ack_surb, content)
    }

    fn envelope_with_token(
        &self,
        rng: &mut ChaCha20Rng,
        access_token: AccessToken,
        dedup_id: DedupId,
        expires_at: Option<UnixTime>,
        ack_surb: Option<Surb>,
        content: &[u8],
    ) -> Envelope {
        let message_id = MessageId::random(rng);
        Envelope::seal(
            rng,
            &self.secret.public_key(),
            &sender(),
            OuterFields {
                mailbox_id: self.id,
                access_token,
                dedup_id,
                expires_at,
                ack_surb,
            },
            &EnvelopeContent {
                message_id,
                fragment: FragmentInfo {
                    index: 0,
                    count: 1,
                    total_len: u32::try_from(content.len()).unwrap(),
                    message_digest: Sha256::digest(content).into(),
                },
                content: content.to_vec(),
            },
        )
        .unwrap()
    }

    /// An envelope with a fresh dedup id.
    fn fresh(
        &self,
        rng: &mut ChaCha20Rng,
        expires_at: Option<UnixTime>,
        ack_surb: Option<Surb>,
        content: &[u8],
    ) -> Envelope {
        let dedup = DedupId::random(rng);
        self.envelope(rng, dedup, expires_at, ack_surb, content)
    }

    /// An envelope with a fresh dedup id and a wrong access token.
    fn forged(&self, rng: &mut ChaCha20Rng, ack_surb: Option<Surb>) -> Envelope {
        let token = AccessToken::random(rng);
        let dedup = DedupId::random(rng);
        self.envelope_with_token(rng, token, dedup, None, ack_surb, b"forged")
    }

    /// A quick envelope with a fresh dedup id, the mailbox's retention and no SURB.
    fn note(&self, rng: &mut ChaCha20Rng, content: &[u8]) -> Envelope {
        let dedup = DedupId::random(rng);
        self.envelope(rng, dedup, None, None, content)
    }

    /// The owner's signature registering `device`.
    fn sign_device(&self, device: &[u8; 32]) -> [u8; 64] {
        self.signing
            .sign(&device_transcript(&self.id, device))
            .to_bytes()
    }
}

/// A small mesh for SURBs: an edge relay, then the creator's mailbox node (two hops; with
/// one hop, the final hop could read the reply).
struct Hop {
    nodes: [(NodeId, SphinxSecretKey); 2],
}

impl Hop {
    fn new(rng: &mut ChaCha20Rng) -> Hop {
        let mut node = || {
            (
                NodeId(SigningKey::generate(rng).verifying_key().to_bytes()),
                SphinxSecretKey::random_from_rng(rng),
            )
        };
        Hop {
            nodes: [node(), node()],
        }
    }

    fn surb(&self, rng: &mut ChaCha20Rng, to: &MailboxId, id: SurbId) -> (Surb, SurbRecovery) {
        let route: Vec<RouteHop> = self
            .nodes
            .iter()
            .map(|(node, secret)| RouteHop {
                node: *node,
                sphinx_key: SphinxPublicKey::from(secret),
            })
            .collect();
        let delays = [std::time::Duration::from_millis(5)];
        create_surb(rng, &route, &delays, DestinationAddress::mailbox(to), id).unwrap()
    }

    /// A SURB back to `owner`'s mailbox, its id minted with the owner's reply key.
    fn surb_to(&self, rng: &mut ChaCha20Rng, owner: &Owner) -> (Surb, SurbRecovery) {
        let id = owner.reply_key.mint_surb_id(rng, &owner.id);
        self.surb(rng, &owner.id, id)
    }

    /// Sends `reply` through `surb` and returns what the final hop delivers.
    fn carry(&self, surb: &Surb, reply: &Reply) -> (DestinationAddress, SurbId, Vec<u8>) {
        let plaintext = reply.encode().unwrap();
        let (first_hop, packet) = use_surb(surb, &plaintext).unwrap();
        let [(edge, edge_key), (home, home_key)] = &self.nodes;
        assert_eq!(&first_hop, edge);
        let HopAction::Forward {
            next_hop, packet, ..
        } = process_packet(&[edge_key], packet.as_bytes())
            .unwrap()
            .action
        else {
            panic!("the edge did not forward the reply");
        };
        assert_eq!(&next_hop, home);
        match process_packet(&[home_key], packet.as_bytes())
            .unwrap()
            .action
        {
            HopAction::DeliverSurbReply {
                destination,
                surb_id,
                sealed,
            } => {
                assert!(
                    !contains(&sealed, &plaintext),
                    "the final hop reads the reply"
                );
                (destination, surb_id, sealed)
            }
            other => panic!("not a SURB reply: {other:?}"),
        }
    }
}

fn deposit(
    core: &mut Core,
    now: UnixTime,
    envelope: &Envelope,
) -> Result<DepositReceipt, MailboxError> {
    let mut results = core.deposit_many(now, vec![Incoming::Deposit(envelope.clone())]);
    assert_eq!(results.len(), 1);
    results.pop().unwrap()
}

fn deposit_all(
    core: &mut Core,
    now: UnixTime,
    envelopes: &[&Envelope],
) -> Vec<Result<DepositReceipt, MailboxError>> {
    let results = core.deposit_many(
        now,
        envelopes
            .iter()
            .map(|e| Incoming::Deposit((*e).clone()))
            .collect(),
    );
    assert_eq!(results.len(), envelopes.len());
    results
}

fn drain(core: &mut Core) -> Vec<Output> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

fn replies(outputs: &[Output]) -> Vec<(&Surb, &Reply)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Reply { surb, reply } => Some((surb, reply)),
            Output::ScheduleSweep { .. } | Output::Replica { .. } => None,
        })
        .collect()
}

fn sweeps(outputs: &[Output]) -> Vec<UnixTime> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::ScheduleSweep { at } => Some(*at),
            Output::Reply { .. } | Output::Replica { .. } => None,
        })
        .collect()
}

fn fetch(core: &Core, now: UnixTime, owner: &Owner, device: &[u8; 32]) -> Vec<StoredMessage> {
    core.fetch(now, &owner.id, device, None, 100).unwrap()
}

fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// The envelope as served: decodes, has neither access token nor SURB, keeps every
/// authenticated field and the ciphertext, and opens for the owner.
fn open_served(owner: &Owner, message: &StoredMessage) -> (Envelope, Vec<u8>) {
    let MessageBody::Envelope(bytes) = &message.body else {
        panic!("not an envelope: {:?}", message.body);
    };
    let stored = Envelope::decode(bytes).unwrap();
    assert_eq!(
        stored.outer.access_token,
        AccessToken([0; 32]),
        "access token kept"
    );
    assert!(stored.outer.ack_surb.is_none(), "ack SURB kept");
    assert_eq!(stored.outer.mailbox_id, owner.id);
    let opened = stored.open(&owner.secret).unwrap();
    assert_eq!(opened.sender, sender().verifying_key());
    (stored, opened.content.content)
}

fn count(store: &MemoryStore) -> [usize; 3] {
    [
        store.len(Cf::Envelopes),
        store.len(Cf::Dedup),
        store.len(Cf::Expiry),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() <= haystack.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn bucket_of(t: u64, bucket_ms: u64) -> u64 {
    t.div_ceil(bucket_ms) * bucket_ms
}

// ---------------------------------------------------------------------------------------
// 1. Creation
// ---------------------------------------------------------------------------------------

#[test]
fn create_mailbox_checks_proof_of_possession_retention_duplicates_and_quota() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        mailboxes_max: 2,
        retention_ms_max: 10 * HOUR,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(1);
    let a = Owner::new(&mut r);
    let b = Owner::new(&mut r);
    let c = Owner::new(&mut r);

    // Signed by someone else; a field changed after signing; someone else's owner key.
    let mut forged = a.request(HOUR);
    forged.signature = b.request(HOUR).signature;
    let mut tampered = a.request(HOUR);
    tampered.access_key_hash = [1; 32];
    let mut stolen = a.request(HOUR);
    stolen.owner_key = b.key();
    let mut reply_swapped = a.request(HOUR);
    reply_swapped.reply_key = Some([2; 32]);
    for bad in [forged, tampered, stolen, reply_swapped] {
        let err = core.create_mailbox(T0, bad).unwrap_err();
        assert!(matches!(err, MailboxError::BadSignature(_)), "{err:?}");
        assert!(err.is_caller_error());
    }
    assert_eq!(
        store.len(Cf::Mailboxes),
        0,
        "a refused creation stored something"
    );
    assert!(matches!(
        core.info(&a.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert_eq!(core.stats().mailboxes, 0);

    for retention in [0, 10 * HOUR + 1, u64::MAX] {
        assert!(matches!(
            core.create_mailbox(T0, a.request(retention)),
            Err(MailboxError::InvalidArgument(_))
        ));
    }
    let mut zero = Owner::new(&mut r);
    zero.id = MailboxId([0; 32]);
    assert!(matches!(
        core.create_mailbox(T0, zero.request(HOUR)),
        Err(MailboxError::InvalidArgument(_))
    ));
    assert_eq!(store.len(Cf::Mailboxes), 0);

    // The node maximum itself is allowed.
    core.create_mailbox(T0, a.request(10 * HOUR)).unwrap();
    let info = core.info(&a.id).unwrap();
    assert_eq!(info.mailbox_id, hex::encode(a.id.0));
    assert_eq!(info.owner_key, hex::encode(a.key()));
    assert_eq!(
        info.mailbox_key,
        hex::encode(a.secret.public_key().to_bytes())
    );
    assert_eq!(info.retention_ms, 10 * HOUR);
    assert_eq!(info.created_at_ms, T0.0);
    assert_eq!(info.devices, vec![(hex::encode(a.key()), 0)]);
    assert_eq!((info.messages, info.bytes, info.last_seq), (0, 0, 0));
    assert!(core.is_owner(&a.id, &a.key()));
    assert!(core.is_device(&a.id, &a.key()));
    assert!(!core.is_device(&a.id, &b.key()));
    assert!(!core.is_owner(&b.id, &b.key()));
    assert!(!core.owner_check(&a.id, &b.key()).unwrap());
    let err = core.owner_check(&b.id, &b.key()).unwrap_err();
    assert!(matches!(err, MailboxError::UnknownMailbox), "{err:?}");

    // The same id again, even with a valid proof and other settings: refused.
    let err = core.create_mailbox(at(1), a.request(HOUR)).unwrap_err();
    assert!(matches!(err, MailboxError::MailboxExists), "{err:?}");
    assert_eq!(err.kind(), "mailbox_exists");
    assert_eq!(core.info(&a.id).unwrap(), info);

    core.create_mailbox(T0, b.request(HOUR)).unwrap();
    let err = core.create_mailbox(T0, c.request(HOUR)).unwrap_err();
    assert!(matches!(err, MailboxError::QuotaExceeded { .. }), "{err:?}");
    assert!(matches!(
        core.info(&c.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert_eq!(core.stats().mailboxes, 2);
    assert_eq!(store.len(Cf::Mailboxes), 2);

    // Everything survives a restart, and the limits still hold.
    drop(core);
    let mut core = open(&store, &config, at(MINUTE));
    assert_eq!(core.info(&a.id).unwrap(), info);
    assert_eq!(core.info(&b.id).unwrap().retention_ms, HOUR);
    assert!(matches!(
        core.create_mailbox(at(MINUTE), c.request(HOUR)),
        Err(MailboxError::QuotaExceeded { .. })
    ));
    assert!(matches!(
        core.create_mailbox(at(MINUTE), a.request(HOUR)),
        Err(MailboxError::MailboxExists)
    ));
}

// ---------------------------------------------------------------------------------------
// 2. Deposits
// ---------------------------------------------------------------------------------------

#[test]
fn deposit_needs_the_access_token_and_is_served_without_token_or_surb() {
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(2);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    assert!(drain(&mut core).is_empty());
    let surb_id = alice.reply_key.mint_surb_id(&mut r, &alice.id);
    let (surb, _) = hop.surb(&mut r, &alice.id, surb_id);
    let dedup = DedupId::random(&mut r);

    // A wrong token: refused, nothing stored, no ack, no sweep.
    let wrong_token = AccessToken::random(&mut r);
    let wrong = bob.envelope_with_token(
        &mut r,
        wrong_token,
        dedup,
        Some(at(30 * MINUTE)),
        Some(surb.clone()),
        b"hello bob",
    );
    let err = deposit(&mut core, T0, &wrong).unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    assert_eq!(err.kind(), "unauthorized");
    assert_eq!(count(&store), [0, 0, 0]);
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 0);

    // A mailbox this node does not hold.
    let stranger = Owner::new(&mut r);
    let err = deposit(&mut core, T0, &stranger.note(&mut r, b"?")).unwrap_err();
    assert!(matches!(err, MailboxError::UnknownMailbox), "{err:?}");

    // The right token, with the same dedup id as the refused one: a new deposit.
    let envelope = bob.envelope(
        &mut r,
        dedup,
        Some(at(30 * MINUTE)),
        Some(surb),
        b"hello bob",
    );
    let receipt = deposit(&mut core, T0, &envelope).unwrap();
    assert_eq!(
        receipt,
        DepositReceipt {
            mailbox_id: bob.id,
            seq: 1,
            expires_at: at(30 * MINUTE),
            duplicate: false,
        }
    );
    assert_eq!(count(&store), [1, 1, 1]);

    let served = fetch(&core, at(1), &bob, &bob.key());
    assert_eq!(seqs(&served), vec![1]);
    assert_eq!(served[0].received_at, T0);
    assert_eq!(served[0].expires_at, at(30 * MINUTE));
    let (stored, content) = open_served(&bob, &served[0]);
    assert_eq!(content, b"hello bob");
    assert_eq!(stored.outer.dedup_id, dedup);
    assert_eq!(stored.outer.expires_at, Some(at(30 * MINUTE)));
    assert_eq!(stored.to_wire().ciphertext, envelope.to_wire().ciphertext);
    assert_eq!(stored.to_wire().hpke_enc, envelope.to_wire().hpke_enc);

    // The same after a restart.
    drop(core);
    let core = open(&store, &config, at(2));
    assert_eq!(fetch(&core, at(2), &bob, &bob.key()), served);
}

#[test]
fn redelivered_deposit_is_stored_once_and_acknowledged_again() {
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(3);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let e1 = bob.fresh(&mut r, Some(at(20 * MINUTE)), None, b"one");
    let e2 = bob.note(&mut r, b"two");

    // Within one batch.
    let results = deposit_all(&mut core, T0, &[&e1, &e1, &e2, &e1, &e2]);
    let first = *results[0].as_ref().unwrap();
    let second = *results[2].as_ref().unwrap();
    assert_eq!(
        (first.seq, first.duplicate, first.expires_at),
        (1, false, at(20 * MINUTE))
    );
    assert_eq!(
        (second.seq, second.duplicate, second.expires_at),
        (2, false, at(HOUR))
    );
    let dup1 = DepositReceipt {
        duplicate: true,
        ..first
    };
    let dup2 = DepositReceipt {
        duplicate: true,
        ..second
    };
    assert_eq!(*results[1].as_ref().unwrap(), dup1);
    assert_eq!(*results[3].as_ref().unwrap(), dup1);
    assert_eq!(*results[4].as_ref().unwrap(), dup2);
    assert_eq!(count(&store), [2, 2, 2]);
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 2);

    // In a later batch, even asking for another expiry: the stored deposit stands.
    let mut e1_later = e1.clone();
    e1_later.outer.expires_at = Some(at(50 * MINUTE));
    assert_eq!(deposit(&mut core, at(MINUTE), &e1_later).unwrap(), dup1);
    assert_eq!(deposit(&mut core, at(MINUTE), &e2).unwrap(), dup2);
    assert_eq!(count(&store), [2, 2, 2]);

    // After a restart.
    drop(core);
    let mut core = open(&store, &config, at(2 * MINUTE));
    assert_eq!(deposit(&mut core, at(2 * MINUTE), &e1).unwrap(), dup1);
    assert_eq!(
        deposit_all(&mut core, at(2 * MINUTE), &[&e2, &e1])[0]
            .as_ref()
            .unwrap(),
        &dup2
    );
    assert_eq!(count(&store), [2, 2, 2]);

    // After the owner fetched and acknowledged both: still duplicates, never served again.
    let served = fetch(&core, at(3 * MINUTE), &bob, &bob.key());
    assert_eq!(seqs(&served), vec![1, 2]);
    assert_eq!(open_served(&bob, &served[0]).1, b"one");
    assert_eq!(open_served(&bob, &served[1]).1, b"two");
    core.ack(&bob.id, &bob.key(), 2).unwrap();
    assert_eq!(count(&store), [0, 2, 2]);
    assert_eq!(deposit(&mut core, at(4 * MINUTE), &e1).unwrap(), dup1);
    assert_eq!(deposit(&mut core, at(4 * MINUTE), &e2).unwrap(), dup2);
    assert!(fetch(&core, at(4 * MINUTE), &bob, &bob.key()).is_empty());
    assert_eq!(count(&store), [0, 2, 2]);

    // A new deposit continues the sequence.
    let e3 = bob.note(&mut r, b"three");
    assert_eq!(deposit(&mut core, at(4 * MINUTE), &e3).unwrap().seq, 3);
}

/// Security review 6756e3f, finding 15: expiry times are in clear on disk, so they are
/// rounded up to `expiry_granularity_ms` (default 1 hour) when it is the node's retention: a
/// message is kept up to that much longer, never shorter, and the receipt says so. A sender's
/// own earlier expiry is kept exactly.
#[test]
fn expiry_times_are_rounded_up_to_the_granularity_and_never_earlier() {
    let store = MemoryStore::new();
    let config = CoreConfig::default();
    assert_eq!(config.expiry_granularity_ms, HOUR);
    assert_eq!(T0.0 % HOUR, 0);
    let mut core = open(&store, &config, T0);
    let mut r = rng(41);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(2 * HOUR)).unwrap();
    let mut expect = |now: UnixTime, requested: Option<UnixTime>, expires: UnixTime| {
        let e = bob.fresh(&mut r, requested, None, b"x");
        let receipt = deposit(&mut core, now, &e).unwrap();
        assert_eq!(
            receipt.expires_at, expires,
            "at {now:?}, requested {requested:?}"
        );
    };
    expect(at(1), None, at(3 * HOUR));
    expect(at(HOUR), None, at(3 * HOUR));
    // A sender's own expiry (a disappearing message) is kept exactly: rounded up, the
    // message would outlive the time its sender chose (client/tests/e2e.rs checks it).
    expect(at(1), Some(at(30 * MINUTE)), at(30 * MINUTE));
    expect(at(1), Some(at(HOUR)), at(HOUR));
    expect(at(1), Some(at(HOUR + 1)), at(HOUR + 1));
    // One past the retention is capped by it, and the cap is rounded.
    expect(at(1), Some(at(2 * HOUR + 5)), at(3 * HOUR));
    // Served until its time, gone from then on.
    let live = |now| fetch(&core, now, &bob, &bob.key()).len();
    assert_eq!(live(at(30 * MINUTE - 1)), 6);
    assert_eq!(live(at(30 * MINUTE)), 5);
    assert_eq!(live(at(HOUR)), 4);
    assert_eq!(live(at(HOUR + 1)), 3);
    assert_eq!(live(at(3 * HOUR - 1)), 3);
    assert_eq!(live(at(3 * HOUR)), 0);
}

#[test]
fn expiry_is_capped_by_retention_and_node_maximum_and_past_expiry_is_refused() {
    fn expect(
        core: &mut Core,
        r: &mut ChaCha20Rng,
        bob: &Owner,
        now: UnixTime,
        requested: Option<UnixTime>,
        expires: UnixTime,
    ) -> u64 {
        let dedup = DedupId::random(r);
        let e = bob.envelope(r, dedup, requested, None, b"x");
        let receipt = deposit(core, now, &e).unwrap();
        assert_eq!(receipt.expires_at, expires, "requested {requested:?}");
        receipt.seq
    }
    let store = MemoryStore::new();
    let config = CoreConfig {
        retention_ms_max: 4 * HOUR,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(4);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(2 * HOUR)).unwrap();

    let s1 = expect(&mut core, &mut r, &bob, T0, None, at(2 * HOUR));
    let s2 = expect(
        &mut core,
        &mut r,
        &bob,
        T0,
        Some(at(3 * HOUR)),
        at(2 * HOUR),
    );
    let s3 = expect(&mut core, &mut r, &bob, T0, Some(at(HOUR)), at(HOUR));
    let s4 = expect(&mut core, &mut r, &bob, T0, Some(at(1)), at(1));

    for requested in [T0, UnixTime(T0.0 - 1), UnixTime(1)] {
        let e = bob.fresh(&mut r, Some(requested), None, b"late");
        let err = deposit(&mut core, T0, &e).unwrap_err();
        assert!(matches!(err, MailboxError::AlreadyExpired), "{err:?}");
        assert_eq!(err.kind(), "already_expired");
    }
    assert_eq!(count(&store), [4, 4, 4]);

    // Stored expiries are what the receipts said.
    let served = fetch(&core, T0, &bob, &bob.key());
    let expiries: Vec<(u64, UnixTime)> = served.iter().map(|m| (m.seq, m.expires_at)).collect();
    assert_eq!(
        expiries,
        vec![
            (s1, at(2 * HOUR)),
            (s2, at(2 * HOUR)),
            (s3, at(HOUR)),
            (s4, at(1))
        ]
    );

    // The node lowers its maximum below the mailbox's retention: the node maximum caps.
    drop(core);
    let lowered = CoreConfig {
        retention_ms_max: 30 * MINUTE,
        ..exact()
    };
    let mut core = open(&store, &lowered, at(10));
    let now = at(10);
    expect(
        &mut core,
        &mut r,
        &bob,
        now,
        None,
        UnixTime(now.0 + 30 * MINUTE),
    );
    expect(
        &mut core,
        &mut r,
        &bob,
        now,
        Some(at(HOUR)),
        UnixTime(now.0 + 30 * MINUTE),
    );
    expect(
        &mut core,
        &mut r,
        &bob,
        now,
        Some(at(20 * MINUTE)),
        at(20 * MINUTE),
    );
}

#[test]
fn message_quota_is_enforced_per_batch_and_across_batches() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        mailbox_messages_max: 2,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(5);
    let bob = Owner::new(&mut r);
    let carol = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    core.create_mailbox(T0, carol.request(HOUR)).unwrap();
    let m: Vec<Envelope> = (0..4).map(|i| bob.note(&mut r, &[i; 10])).collect();

    let results = deposit_all(&mut core, T0, &[&m[0], &m[1], &m[2]]);
    assert_eq!(results[0].as_ref().unwrap().seq, 1);
    assert_eq!(results[1].as_ref().unwrap().seq, 2);
    let err = results[2].as_ref().unwrap_err();
    assert!(matches!(err, MailboxError::QuotaExceeded { .. }), "{err:?}");
    assert_eq!(err.kind(), "quota_exceeded");
    let err = deposit(&mut core, at(1), &m[3]).unwrap_err();
    assert!(matches!(err, MailboxError::QuotaExceeded { .. }), "{err:?}");
    assert_eq!(count(&store), [2, 2, 2]);
    // A redelivery of a stored deposit is still acknowledged when the mailbox is full.
    assert!(deposit(&mut core, at(1), &m[0]).unwrap().duplicate);
    // The quota is per mailbox.
    assert!(deposit(&mut core, at(1), &carol.note(&mut r, b"c")).is_ok());

    // Acknowledging frees room; the refused deposits were not stored, so they are new.
    assert_eq!(seqs(&fetch(&core, at(2), &bob, &bob.key())), vec![1, 2]);
    core.ack(&bob.id, &bob.key(), 1).unwrap();
    let receipt = deposit(&mut core, at(3), &m[2]).unwrap();
    assert_eq!((receipt.seq, receipt.duplicate), (3, false));
    assert!(matches!(
        deposit(&mut core, at(3), &m[3]),
        Err(MailboxError::QuotaExceeded { .. })
    ));
    assert_eq!(seqs(&fetch(&core, at(4), &bob, &bob.key())), vec![2, 3]);
}

#[test]
fn byte_quota_is_enforced_and_recomputed_after_restart() {
    let store = MemoryStore::new();
    let mut core = open(&store, &exact(), T0);
    let mut r = rng(6);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let m: Vec<Envelope> = (0..5).map(|i| bob.note(&mut r, &[i; 500])).collect();
    deposit(&mut core, T0, &m[0]).unwrap();
    let one = core.info(&bob.id).unwrap().bytes;
    assert!(one > 500, "stored size {one} is smaller than the content");

    drop(core);
    let tight = CoreConfig {
        mailbox_bytes_max: 3 * one - 1,
        ..exact()
    };
    let mut core = open(&store, &tight, at(1));
    assert_eq!(
        core.info(&bob.id).unwrap().bytes,
        one,
        "bytes recomputed at open"
    );
    let results = deposit_all(&mut core, at(1), &[&m[1], &m[2]]);
    assert_eq!(results[0].as_ref().unwrap().seq, 2);
    assert!(
        matches!(&results[1], Err(MailboxError::QuotaExceeded { what }) if what.contains("bytes")),
        "{:?}",
        results[1]
    );
    assert!(matches!(
        deposit(&mut core, at(2), &m[3]),
        Err(MailboxError::QuotaExceeded { .. })
    ));
    assert_eq!(count(&store), [2, 2, 2]);
    assert_eq!(core.info(&bob.id).unwrap().bytes, 2 * one);

    fetch(&core, at(3), &bob, &bob.key());
    core.ack(&bob.id, &bob.key(), 2).unwrap();
    assert_eq!(core.info(&bob.id).unwrap().bytes, 0);
    let results = deposit_all(&mut core, at(4), &[&m[2], &m[3], &m[4]]);
    assert!(results[0].is_ok() && results[1].is_ok());
    assert!(matches!(
        &results[2],
        Err(MailboxError::QuotaExceeded { .. })
    ));
}

#[test]
fn deposits_are_rate_limited_per_mailbox_and_retry_after_is_exact() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        deposits_per_min: 3,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(7);
    let bob = Owner::new(&mut r);
    let carol = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    core.create_mailbox(T0, carol.request(HOUR)).unwrap();

    // Refused deposits (wrong token) take no tokens.
    for _ in 0..10 {
        let e = bob.forged(&mut r, None);
        assert!(matches!(
            deposit(&mut core, T0, &e),
            Err(MailboxError::Unauthorized(_))
        ));
    }
    let m: Vec<Envelope> = (0..6).map(|i| bob.note(&mut r, &[i])).collect();
    let results = deposit_all(&mut core, T0, &[&m[0], &m[1], &m[2], &m[3]]);
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    let Err(MailboxError::RateLimited { retry_after_ms, .. }) = results[3] else {
        panic!("not rate limited: {:?}", results[3]);
    };
    assert!(
        retry_after_ms > 0 && retry_after_ms <= MINUTE,
        "{retry_after_ms}"
    );
    assert_eq!(results[3].as_ref().unwrap_err().kind(), "rate_limited");
    assert_eq!(count(&store), [3, 3, 3]);

    // Redeliveries are acknowledged even while limited; another mailbox is not limited.
    assert!(deposit(&mut core, T0, &m[0]).unwrap().duplicate);
    assert!(deposit(&mut core, T0, &carol.note(&mut r, b"c")).is_ok());

    // Just before the promised time: still limited; at it: accepted.
    let err = deposit(&mut core, at(retry_after_ms - 1), &m[3]).unwrap_err();
    assert!(
        matches!(err, MailboxError::RateLimited { retry_after_ms: later, .. } if later > 0),
        "{err:?}"
    );
    let receipt = deposit(&mut core, at(retry_after_ms), &m[3]).unwrap();
    assert_eq!((receipt.seq, receipt.duplicate), (4, false));
    assert!(matches!(
        deposit(&mut core, at(retry_after_ms), &m[4]),
        Err(MailboxError::RateLimited { .. })
    ));
    // A full minute refills the bucket.
    let later = at(retry_after_ms + MINUTE);
    let results = deposit_all(&mut core, later, &[&m[4], &m[5]]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(store.len(Cf::Envelopes), 3 + 1 + 1 + 2);
}

#[test]
fn deposit_ack_goes_out_once_through_the_surb_and_opens_for_its_creator() {
    let store = MemoryStore::new();
    let mut core = open(&store, &exact(), T0);
    let mut r = rng(8);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let surb_id = alice.reply_key.mint_surb_id(&mut r, &alice.id);
    let (surb, recovery) = hop.surb(&mut r, &alice.id, surb_id);
    let dedup = DedupId::random(&mut r);
    let envelope = bob.envelope(
        &mut r,
        dedup,
        Some(at(2 * HOUR)),
        Some(surb.clone()),
        b"ack me",
    );

    let receipt = deposit(&mut core, T0, &envelope).unwrap();
    assert_eq!(receipt.expires_at, at(HOUR), "capped by retention");
    let outputs = drain(&mut core);
    let acks = replies(&outputs);
    assert_eq!(acks.len(), 1, "{outputs:?}");
    let (out_surb, reply) = acks[0];
    assert_eq!(out_surb, &surb);
    let expected = Reply::DepositAck {
        dedup_id: dedup,
        expires_at: at(HOUR),
    };
    assert_eq!(reply, &expected);
    assert_eq!(sweeps(&outputs), vec![at(HOUR)]);

    // Through the mesh back to Alice's mailbox; only her recovery material opens it.
    let (destination, id, sealed) = hop.carry(out_surb, reply);
    assert_eq!(destination, DestinationAddress::mailbox(&alice.id));
    assert_eq!(id, surb_id);
    assert_eq!(
        Reply::decode(&recovery.open(&sealed).unwrap()).unwrap(),
        expected
    );
    let (_, other) = hop.surb_to(&mut r, &alice);
    assert!(other.open(&sealed).is_err());

    // No SURB, no reply; a refused deposit with a SURB, no reply either.
    deposit(&mut core, T0, &bob.note(&mut r, b"quiet")).unwrap();
    assert!(replies(&drain(&mut core)).is_empty());
    let (surb2, _) = hop.surb_to(&mut r, &alice);
    let refused = bob.forged(&mut r, Some(surb2.clone()));
    assert!(deposit(&mut core, T0, &refused).is_err());
    let expired = bob.fresh(&mut r, Some(T0), Some(surb2), b"no");
    assert!(deposit(&mut core, T0, &expired).is_err());
    assert!(drain(&mut core).is_empty());

    // A redelivery is acknowledged again, with the stored expiry.
    assert!(deposit(&mut core, at(1), &envelope).unwrap().duplicate);
    let outputs = drain(&mut core);
    let acks = replies(&outputs);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].1, &expected);
    assert!(sweeps(&outputs).is_empty(), "no new bucket");
}

#[test]
fn failed_write_sends_no_ack_poisons_the_store_and_changes_nothing_in_memory() {
    let store = MemoryStore::new();
    let mut core = open(&store, &exact(), T0);
    let mut r = rng(9);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let carol = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    deposit(&mut core, T0, &bob.note(&mut r, b"first")).unwrap();
    drain(&mut core);
    let before = core.info(&bob.id).unwrap();
    let stats = core.stats();
    let stored = count(&store);

    let (surb, _) = hop.surb_to(&mut r, &alice);
    let envelope = bob.fresh(&mut r, Some(at(10 * MINUTE)), Some(surb), b"lost");
    store.fail_next_write();
    let results = deposit_all(&mut core, at(1), &[&envelope, &envelope]);
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert!(matches!(err, MailboxError::Store(_)), "{err:?}");
        assert_eq!(err.kind(), "store");
        assert!(!err.is_caller_error());
    }
    assert!(
        drain(&mut core).is_empty(),
        "ack or sweep output after a failed write"
    );
    assert!(store.is_poisoned());
    assert_eq!(core.info(&bob.id).unwrap(), before);
    assert_eq!(core.stats(), stats);
    assert_eq!(count(&store), stored);
    assert_eq!(seqs(&fetch(&core, at(2), &bob, &bob.key())), vec![1]);
    assert!(!has_messages(&core, at(2), &bob.id, &bob.key(), Some(1)));
    assert_eq!(core.poll_timeout(), Some(at(HOUR)));

    // Every write is refused from now on; reads still work.
    let poisoned = |r: Result<(), MailboxError>| {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), "store_poisoned", "{err:?}");
        assert!(!err.is_caller_error());
    };
    poisoned(deposit(&mut core, at(3), &envelope).map(drop));
    poisoned(deposit(&mut core, at(3), &bob.note(&mut r, b"next")).map(drop));
    poisoned(core.ack(&bob.id, &bob.key(), 1).map(drop));
    poisoned(core.sweep_expired(at(2 * HOUR)).map(drop));
    poisoned(core.create_mailbox(at(3), carol.request(HOUR)));
    poisoned(core.add_device(&bob.id, carol.key(), &bob.sign_device(&carol.key())));
    poisoned(core.erase(&bob.id));
    let identity = [4; 32];
    poisoned(
        core.put_prekeys(
            &bob.id,
            PrekeyUpload {
                identity_key: identity,
                identity_signature: sign_identity(&bob.signing, &bob.id, &identity),
                prekeys: vec![],
            },
        )
        .map(drop),
    );
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.info(&bob.id).unwrap(), before);
    assert_eq!(count(&store), stored);
    assert_eq!(seqs(&fetch(&core, at(3), &bob, &bob.key())), vec![1]);
}

/// A driver pipelining its group commits prepares a batch while the previous one's write is
/// in flight: the later batch continues the sequence numbers, counts the earlier one against
/// the quotas, and a redelivery of a deposit still in the earlier batch gets that deposit's
/// answer (same number, same expiry, a duplicate), never a second copy. Nothing shows
/// before a batch is finished.
#[test]
fn pipelined_batches_continue_the_numbers_and_a_redelivery_racing_its_first_copy_is_a_duplicate() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        mailbox_messages_max: 4,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(31);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    deposit(&mut core, T0, &bob.note(&mut r, b"zero")).unwrap();
    drain(&mut core);
    let dedup = DedupId::random(&mut r);
    let e1 = bob.envelope(&mut r, dedup, Some(at(20 * MINUTE)), None, b"one");
    let e2 = bob.note(&mut r, b"two");
    let mut first = core.prepare_deposits(
        at(1),
        vec![Incoming::Deposit(e1.clone()), Incoming::Deposit(e2.clone())],
    );
    // The same deposit again (retransmitted with an ack SURB and another expiry), a new one,
    // and one past the quota (4 messages: one stored, two in the first batch, one here).
    let (surb, _) = hop.surb_to(&mut r, &alice);
    let e1_again = bob.envelope(&mut r, dedup, Some(at(50 * MINUTE)), Some(surb), b"one");
    let e3 = bob.note(&mut r, b"three");
    let e4 = bob.note(&mut r, b"four");
    let mut second = core.prepare_deposits(
        at(2),
        vec![
            Incoming::Deposit(e1_again.clone()),
            Incoming::Deposit(e3.clone()),
            Incoming::Deposit(e4.clone()),
        ],
    );
    assert_eq!(second.len(), 3);
    // Nothing of either batch is visible yet.
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 1);
    assert_eq!(seqs(&fetch(&core, at(2), &bob, &bob.key())), vec![1]);
    assert!(drain(&mut core).is_empty());

    let written = store.write(first.take_ops(), true);
    let results = core.finish_deposits(at(3), first, written);
    let one = *results[0].as_ref().unwrap();
    assert_eq!(
        (one.seq, one.duplicate, one.expires_at),
        (2, false, at(20 * MINUTE))
    );
    assert_eq!(results[1].as_ref().unwrap().seq, 3);
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 3);

    let written = store.write(second.take_ops(), true);
    let results = core.finish_deposits(at(4), second, written);
    assert_eq!(
        *results[0].as_ref().unwrap(),
        DepositReceipt {
            duplicate: true,
            ..one
        }
    );
    assert_eq!(results[1].as_ref().unwrap().seq, 4);
    assert!(
        matches!(results[2], Err(MailboxError::QuotaExceeded { .. })),
        "{:?}",
        results[2]
    );
    // The redelivery's ack goes out, for the first copy's expiry.
    let outputs = drain(&mut core);
    let acks = replies(&outputs);
    assert_eq!(acks.len(), 1);
    assert!(matches!(
        acks[0].1,
        Reply::DepositAck { dedup_id, expires_at } if *dedup_id == dedup && *expires_at == at(20 * MINUTE)
    ));
    // Stored once each, served in order.
    assert_eq!(count(&store), [4, 4, 4]);
    let served = fetch(&core, at(5), &bob, &bob.key());
    assert_eq!(seqs(&served), vec![1, 2, 3, 4]);
    assert_eq!(open_served(&bob, &served[1]).1, b"one");
    assert_eq!(open_served(&bob, &served[3]).1, b"three");
    // A restart agrees.
    drop(core);
    let mut core = open(&store, &config, at(6));
    assert_eq!(
        deposit(&mut core, at(6), &e1).unwrap(),
        DepositReceipt {
            duplicate: true,
            ..one
        }
    );
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 4);
}

/// A redelivery that joined a later batch while its first copy's batch was being written
/// stands or falls with that write: when it fails, the redelivery is refused too (no ack),
/// even though its own batch wrote nothing, and nothing changes in memory.
#[test]
fn a_redelivery_racing_a_batch_whose_write_fails_is_refused_and_not_acknowledged() {
    let store = MemoryStore::new();
    let mut core = open(&store, &exact(), T0);
    let mut r = rng(32);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let dedup = DedupId::random(&mut r);
    let e1 = bob.envelope(&mut r, dedup, None, None, b"one");
    let (surb, _) = hop.surb_to(&mut r, &alice);
    let e1_again = bob.envelope(&mut r, dedup, None, Some(surb), b"one");
    let mut first = core.prepare_deposits(T0, vec![Incoming::Deposit(e1)]);
    let mut second = core.prepare_deposits(at(1), vec![Incoming::Deposit(e1_again)]);
    assert!(second.take_ops().is_empty(), "a redelivery writes nothing");

    store.fail_next_write();
    let written = store.write(first.take_ops(), true);
    assert!(written.is_err());
    let results = core.finish_deposits(at(2), first, written);
    assert!(matches!(results[0], Err(MailboxError::Store(_))));
    let results = core.finish_deposits(at(3), second, Ok(()));
    let err = results[0].as_ref().unwrap_err();
    assert!(!err.is_caller_error(), "{err:?}");
    assert!(drain(&mut core).is_empty(), "an ack went out");
    assert_eq!(core.info(&bob.id).unwrap().last_seq, 0);
    assert_eq!(count(&store), [0, 0, 0]);
    assert!(fetch(&core, at(4), &bob, &bob.key()).is_empty());
}

// ---------------------------------------------------------------------------------------
// 3. Fetch, ack, devices
// ---------------------------------------------------------------------------------------

#[test]
fn fetch_pages_by_cursor_and_limit_and_ack_is_cumulative() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        fetch_limit_max: 3,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(10);
    let bob = Owner::new(&mut r);
    let me = bob.key();
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    assert!(core.fetch(T0, &bob.id, &me, None, 10).unwrap().is_empty());
    assert!(matches!(
        core.fetch(T0, &bob.id, &me, Some(1), 10),
        Err(MailboxError::BadCursor(_))
    ));
    assert!(matches!(
        core.ack(&bob.id, &me, 1),
        Err(MailboxError::BadCursor(_))
    ));
    assert_eq!(core.ack(&bob.id, &me, 0).unwrap(), 0);

    let envelopes: Vec<Envelope> = (1..=5u8).map(|i| bob.note(&mut r, &[i; 3])).collect();
    for (i, e) in envelopes.iter().enumerate() {
        let receipt = deposit(&mut core, at(i as u64), e).unwrap();
        assert_eq!(receipt.seq, i as u64 + 1);
    }
    assert_eq!(core.last_seq(&bob.id).unwrap(), 5);
    let page = |core: &Core, after: Option<u64>, limit: usize| {
        seqs(&core.fetch(at(10), &bob.id, &me, after, limit).unwrap())
    };
    assert_eq!(
        page(&core, None, 100),
        vec![1, 2, 3],
        "capped by fetch_limit_max"
    );
    assert_eq!(page(&core, None, 2), vec![1, 2]);
    assert_eq!(page(&core, Some(2), 100), vec![3, 4, 5]);
    assert_eq!(page(&core, Some(4), 1), vec![5]);
    assert_eq!(page(&core, Some(5), 10), Vec::<u64>::new());
    let err = core.fetch(at(10), &bob.id, &me, Some(6), 10).unwrap_err();
    assert!(matches!(err, MailboxError::BadCursor(_)), "{err:?}");
    assert_eq!(err.kind(), "bad_cursor");
    // Contents in order.
    let all = core.fetch(at(10), &bob.id, &me, Some(0), 3).unwrap();
    for (m, i) in all.iter().zip(1u8..) {
        assert_eq!(open_served(&bob, m).1, vec![i; 3]);
        assert_eq!(m.received_at, at(u64::from(i) - 1));
    }
    assert!(has_messages(&core, at(10), &bob.id, &me, Some(4)));
    assert!(!has_messages(&core, at(10), &bob.id, &me, Some(5)));

    // Cumulative acks; older acks are no-ops; beyond the last is refused.
    assert_eq!(core.ack(&bob.id, &me, 3).unwrap(), 3);
    assert_eq!(store.len(Cf::Envelopes), 2);
    assert_eq!(page(&core, None, 10), vec![4, 5]);
    assert_eq!(
        page(&core, Some(1), 10),
        vec![4, 5],
        "the acked cursor wins over an older after"
    );
    assert_eq!(core.ack(&bob.id, &me, 2).unwrap(), 3);
    assert_eq!(core.ack(&bob.id, &me, 3).unwrap(), 3);
    assert!(matches!(
        core.ack(&bob.id, &me, 6),
        Err(MailboxError::BadCursor(_))
    ));
    assert_eq!(store.len(Cf::Envelopes), 2);
    assert_eq!(
        core.info(&bob.id).unwrap().devices,
        vec![(hex::encode(me), 3)]
    );
    assert_eq!(core.ack(&bob.id, &me, 5).unwrap(), 5);
    assert_eq!(store.len(Cf::Envelopes), 0);
    assert!(page(&core, None, 10).is_empty());
    assert!(page(&core, Some(3), 10).is_empty());
    let info = core.info(&bob.id).unwrap();
    assert_eq!((info.messages, info.bytes, info.last_seq), (0, 0, 5));

    // Unknown devices and mailboxes.
    let stranger = SigningKey::generate(&mut r).verifying_key().to_bytes();
    assert!(matches!(
        core.fetch(at(10), &bob.id, &stranger, None, 1),
        Err(MailboxError::UnknownDevice)
    ));
    assert!(matches!(
        core.ack(&bob.id, &stranger, 1),
        Err(MailboxError::UnknownDevice)
    ));
    assert!(matches!(
        core.fetch(at(10), &MailboxId([7; 32]), &me, None, 1),
        Err(MailboxError::UnknownMailbox)
    ));

    // The cursor survives a restart.
    drop(core);
    let mut core = open(&store, &config, at(20));
    assert!(page(&core, None, 10).is_empty());
    assert_eq!(
        deposit(&mut core, at(20), &bob.note(&mut r, b"6"))
            .unwrap()
            .seq,
        6
    );
    assert_eq!(page(&core, None, 10), vec![6]);
}

#[test]
fn every_device_has_its_own_cursor_and_a_message_goes_when_all_have_acked() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        devices_max: 3,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(11);
    let bob = Owner::new(&mut r);
    let owner = bob.key();
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    for i in 1..=3u8 {
        deposit(&mut core, T0, &bob.note(&mut r, &[i])).unwrap();
    }
    let phone_key = SigningKey::generate(&mut r);
    let phone = phone_key.verifying_key().to_bytes();

    // Registrations not signed by the owner for this mailbox and key are refused.
    let self_signed = phone_key
        .sign(&device_transcript(&bob.id, &phone))
        .to_bytes();
    let other_mailbox = bob
        .signing
        .sign(&device_transcript(&MailboxId([3; 32]), &phone))
        .to_bytes();
    let other_device = bob.sign_device(&[8; 32]);
    for bad in [self_signed, other_mailbox, other_device, [0; 64]] {
        let err = core.add_device(&bob.id, phone, &bad).unwrap_err();
        assert!(matches!(err, MailboxError::BadSignature(_)), "{err:?}");
    }
    assert!(!core.is_device(&bob.id, &phone));
    assert!(matches!(
        core.fetch(T0, &bob.id, &phone, None, 10),
        Err(MailboxError::UnknownDevice)
    ));
    assert_eq!(core.info(&bob.id).unwrap().devices.len(), 1);

    core.add_device(&bob.id, phone, &bob.sign_device(&phone))
        .unwrap();
    core.add_device(&bob.id, phone, &bob.sign_device(&phone))
        .unwrap(); // idempotent
    assert!(core.is_device(&bob.id, &phone));
    assert!(!core.is_owner(&bob.id, &phone));
    assert_eq!(core.info(&bob.id).unwrap().devices.len(), 2);

    assert_eq!(seqs(&fetch(&core, T0, &bob, &owner)), vec![1, 2, 3]);
    assert_eq!(seqs(&fetch(&core, T0, &bob, &phone)), vec![1, 2, 3]);
    core.ack(&bob.id, &owner, 2).unwrap();
    assert_eq!(seqs(&fetch(&core, T0, &bob, &owner)), vec![3]);
    assert_eq!(seqs(&fetch(&core, T0, &bob, &phone)), vec![1, 2, 3]);
    assert_eq!(
        store.len(Cf::Envelopes),
        3,
        "deleted before every device acked"
    );
    core.ack(&bob.id, &phone, 1).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 2);
    core.ack(&bob.id, &phone, 3).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 1, "seq 3 is still the owner's");
    assert!(fetch(&core, T0, &bob, &phone).is_empty());
    assert_eq!(seqs(&fetch(&core, T0, &bob, &owner)), vec![3]);
    assert_eq!(
        core.info(&bob.id).unwrap().devices,
        vec![(hex::encode(owner), 2), (hex::encode(phone), 3)]
    );

    // Cursors and devices survive a restart.
    drop(core);
    let mut core = open(&store, &config, at(1));
    assert!(core.is_device(&bob.id, &phone));
    assert!(fetch(&core, at(1), &bob, &phone).is_empty());
    assert_eq!(seqs(&fetch(&core, at(1), &bob, &owner)), vec![3]);
    core.ack(&bob.id, &owner, 3).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 0);

    // A device added later starts at the oldest cursor: it sees what is still stored.
    for i in 4..=5u8 {
        deposit(&mut core, at(2), &bob.note(&mut r, &[i])).unwrap();
    }
    let tablet = SigningKey::generate(&mut r).verifying_key().to_bytes();
    core.add_device(&bob.id, tablet, &bob.sign_device(&tablet))
        .unwrap();
    assert_eq!(seqs(&fetch(&core, at(2), &bob, &tablet)), vec![4, 5]);
    let fourth = SigningKey::generate(&mut r).verifying_key().to_bytes();
    assert!(matches!(
        core.add_device(&bob.id, fourth, &bob.sign_device(&fourth)),
        Err(MailboxError::QuotaExceeded { .. })
    ));
    core.ack(&bob.id, &owner, 5).unwrap();
    core.ack(&bob.id, &phone, 5).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 2, "the tablet has not acked");

    // Removing the tablet deletes what only it was waiting for.
    assert!(matches!(
        core.remove_device(&bob.id, &owner),
        Err(MailboxError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.remove_device(&bob.id, &fourth),
        Err(MailboxError::UnknownDevice)
    ));
    core.remove_device(&bob.id, &tablet).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 0);
    assert!(!core.is_device(&bob.id, &tablet));
    assert!(matches!(
        core.fetch(at(3), &bob.id, &tablet, None, 1),
        Err(MailboxError::UnknownDevice)
    ));
    assert!(matches!(
        core.remove_device(&bob.id, &tablet),
        Err(MailboxError::UnknownDevice)
    ));
    core.add_device(&bob.id, fourth, &bob.sign_device(&fourth))
        .unwrap();

    drop(core);
    let mut core = open(&store, &config, at(4));
    assert!(!core.is_device(&bob.id, &tablet));
    assert!(core.is_device(&bob.id, &fourth));
    assert_eq!(core.info(&bob.id).unwrap().devices.len(), 3);
    assert_eq!(
        deposit(&mut core, at(4), &bob.note(&mut r, b"6"))
            .unwrap()
            .seq,
        6
    );
    assert_eq!(seqs(&fetch(&core, at(4), &bob, &fourth)), vec![6]);
    assert_eq!(seqs(&fetch(&core, at(4), &bob, &phone)), vec![6]);
}

#[test]
fn sequence_numbers_never_go_back_after_acks_expiry_and_restarts() {
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(12);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();

    // Everything acknowledged and deleted.
    for seq in 1..=3 {
        assert_eq!(
            deposit(&mut core, T0, &bob.note(&mut r, b"a")).unwrap().seq,
            seq
        );
    }
    core.ack(&bob.id, &bob.key(), 3).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 0);
    drop(core);
    let mut core = open(&store, &config, at(1));
    assert_eq!(core.last_seq(&bob.id).unwrap(), 3);
    assert_eq!(
        deposit(&mut core, at(1), &bob.note(&mut r, b"b"))
            .unwrap()
            .seq,
        4
    );
    core.ack(&bob.id, &bob.key(), 4).unwrap();

    // Everything expired and swept, never acknowledged.
    for seq in 5..=6 {
        let e = bob.fresh(&mut r, Some(at(MINUTE)), None, b"c");
        assert_eq!(deposit(&mut core, at(2), &e).unwrap().seq, seq);
    }
    assert_eq!(core.sweep_expired(at(MINUTE)).unwrap(), 2);
    assert_eq!(store.len(Cf::Envelopes), 0);
    drop(core);
    let mut core = open(&store, &config, at(MINUTE + 1));
    assert_eq!(core.last_seq(&bob.id).unwrap(), 6);
    let e = bob.fresh(&mut r, Some(at(2 * MINUTE)), None, b"d");
    assert_eq!(deposit(&mut core, at(MINUTE + 1), &e).unwrap().seq, 7);

    // Expired while the node was down: purged at open, the number still taken.
    drop(core);
    let mut core = open(&store, &config, at(3 * MINUTE));
    assert_eq!(store.len(Cf::Envelopes), 0);
    assert_eq!(core.last_seq(&bob.id).unwrap(), 7);
    assert_eq!(
        deposit(&mut core, at(3 * MINUTE), &bob.note(&mut r, b"e"))
            .unwrap()
            .seq,
        8
    );
    drop(core);
    let core = open(&store, &config, at(4 * MINUTE));
    assert_eq!(core.last_seq(&bob.id).unwrap(), 8);
    // The owner's old cursor (4) is below the stored message; the message is served.
    assert_eq!(
        seqs(&fetch(&core, at(4 * MINUTE), &bob, &bob.key())),
        vec![8]
    );
}

// ---------------------------------------------------------------------------------------
// 4. Expiry
// ---------------------------------------------------------------------------------------

#[test]
fn nothing_expired_is_served_and_sweeps_delete_every_trace() {
    let store = MemoryStore::new();
    let config = exact(); // buckets of one minute
    assert_eq!(T0.0 % MINUTE, 0);
    let mut core = open(&store, &config, T0);
    let mut r = rng(13);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), None);

    let mut put = |core: &mut Core, expires: Option<UnixTime>| {
        let e = bob.fresh(&mut r, expires, None, b"e");
        let receipt = deposit(core, T0, &e).unwrap();
        (e, sweeps(&drain(core)), receipt.seq)
    };
    let (e1, s, _) = put(&mut core, Some(at(MINUTE)));
    assert_eq!(s, vec![at(MINUTE)]);
    let (_, s, _) = put(&mut core, Some(at(MINUTE + 1)));
    assert_eq!(s, vec![at(2 * MINUTE)]);
    let (_, s, _) = put(&mut core, Some(at(90_000)));
    assert!(s.is_empty(), "same bucket asked twice");
    let (_, s, _) = put(&mut core, None);
    assert_eq!(s, vec![at(HOUR)]);
    assert_eq!(core.poll_timeout(), Some(at(MINUTE)));

    let served = |core: &Core, now: UnixTime| seqs(&fetch(core, now, &bob, &bob.key()));
    let exported = |core: &Core, now: UnixTime| seqs(&core.export(now, &bob.id).unwrap().1);
    assert_eq!(served(&core, at(MINUTE - 1)), vec![1, 2, 3, 4]);
    assert_eq!(exported(&core, at(MINUTE - 1)), vec![1, 2, 3, 4]);
    // Expiring exactly now counts as expired, even before any sweep.
    assert_eq!(served(&core, at(MINUTE)), vec![2, 3, 4]);
    assert_eq!(exported(&core, at(MINUTE)), vec![2, 3, 4]);
    assert_eq!(served(&core, at(90_000)), vec![4]);
    assert_eq!(exported(&core, at(90_000)), vec![4]);
    assert_eq!(
        seqs(
            &core
                .fetch(at(90_000), &bob.id, &bob.key(), Some(1), 1)
                .unwrap()
        ),
        vec![4],
        "the limit counts served messages, not skipped ones"
    );
    assert!(!has_messages(&core, at(HOUR), &bob.id, &bob.key(), None));
    assert!(served(&core, at(HOUR)).is_empty());
    assert_eq!(count(&store), [4, 4, 4]);

    // The sweep at the first bucket deletes the envelope, its dedup id and its index entry.
    assert_eq!(core.sweep_expired(at(MINUTE)).unwrap(), 1);
    assert_eq!(count(&store), [3, 3, 3]);
    assert_eq!(core.poll_timeout(), Some(at(2 * MINUTE)));
    assert_eq!(core.info(&bob.id).unwrap().messages, 3);
    // Its dedup id is forgotten: a redelivery is now judged on its own (and is too late).
    assert!(matches!(
        deposit(&mut core, at(MINUTE), &e1),
        Err(MailboxError::AlreadyExpired)
    ));
    assert_eq!(core.sweep_expired(at(2 * MINUTE)).unwrap(), 2);
    assert_eq!(count(&store), [1, 1, 1]);
    assert_eq!(core.poll_timeout(), Some(at(HOUR)));
    assert_eq!(core.sweep_expired(at(2 * MINUTE)).unwrap(), 0);

    // One more that outlives the next restart.
    let e5 = bob.fresh(&mut r, Some(at(HOUR + MINUTE)), None, b"5");
    deposit(&mut core, at(2 * MINUTE), &e5).unwrap();
    assert_eq!(sweeps(&drain(&mut core)), vec![at(HOUR + MINUTE)]);

    // Restart after seq 4 expired: purged at open; a sweep is asked for what is left.
    drop(core);
    let mut core = open(&store, &config, at(HOUR));
    assert_eq!(count(&store), [1, 1, 1]);
    assert_eq!(sweeps(&drain(&mut core)), vec![at(HOUR + MINUTE)]);
    assert_eq!(core.poll_timeout(), Some(at(HOUR + MINUTE)));
    assert_eq!(served(&core, at(HOUR)), vec![5]);

    // Restart long after everything expired: nothing left, nothing to schedule.
    drop(core);
    let mut core = open(&store, &config, at(3 * HOUR));
    assert_eq!(count(&store), [0, 0, 0]);
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), None);
    assert!(served(&core, at(3 * HOUR)).is_empty());
    assert_eq!(core.info(&bob.id).unwrap().messages, 0);
    assert_eq!(core.stats().messages, 0);
}

#[test]
fn sweeps_are_batched_and_poll_timeout_stays_until_the_backlog_is_gone() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        sweep_batch_max: 2,
        expiry_bucket_ms: 1000,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(14);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    for i in 0..5 {
        let e = bob.fresh(&mut r, Some(at(500 + i)), None, b"s");
        deposit(&mut core, T0, &e).unwrap();
    }
    assert_eq!(sweeps(&drain(&mut core)), vec![at(1000)]);
    assert_eq!(core.poll_timeout(), Some(at(1000)));
    assert_eq!(core.sweep_expired(at(1000)).unwrap(), 2);
    assert_eq!(
        core.poll_timeout(),
        Some(at(1000)),
        "backlog left: call again"
    );
    assert_eq!(core.sweep_expired(at(1000)).unwrap(), 2);
    assert_eq!(core.sweep_expired(at(1000)).unwrap(), 1);
    assert_eq!(core.poll_timeout(), None);
    assert_eq!(count(&store), [0, 0, 0]);
}

#[test]
fn a_restart_asks_for_one_sweep_per_expiry_bucket() {
    // Start-up finds the buckets with one seek per bucket in the time-ordered index, not by
    // walking every entry: several entries per bucket, one on a bucket's edge, one far out.
    let store = MemoryStore::new();
    let config = CoreConfig {
        expiry_bucket_ms: 1000,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(16);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let offsets = [500, 1000, 1001, 2500, 2999, 3000, 7000];
    for x in offsets {
        let e = bob.fresh(&mut r, Some(at(x)), None, b"b");
        deposit(&mut core, T0, &e).unwrap();
    }
    drain(&mut core);
    let bucket = |t: UnixTime| UnixTime(t.0.div_ceil(1000) * 1000);
    let mut expected: Vec<UnixTime> = offsets.iter().map(|x| bucket(at(*x))).collect();
    expected.dedup();
    assert!(expected.len() >= 4, "{expected:?}");

    drop(core);
    let mut core = open(&store, &config, T0);
    assert_eq!(sweeps(&drain(&mut core)), expected);
    // Each bucket's sweep removes what is due by then, and the last one the rest.
    for at in &expected {
        core.sweep_expired(*at).unwrap();
    }
    assert_eq!(count(&store), [0, 0, 0]);
}

#[test]
fn acknowledged_messages_keep_their_sweep_after_a_restart() {
    // Dedup ids and expiry entries of acknowledged messages live until their expiry; a
    // restart must still ask for the sweep that removes them.
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(15);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let e = bob.fresh(&mut r, Some(at(10 * MINUTE)), None, b"x");
    deposit(&mut core, T0, &e).unwrap();
    fetch(&core, T0, &bob, &bob.key());
    core.ack(&bob.id, &bob.key(), 1).unwrap();
    assert_eq!(count(&store), [0, 1, 1]);

    drop(core);
    let mut core = open(&store, &config, at(MINUTE));
    assert_eq!(sweeps(&drain(&mut core)), vec![at(10 * MINUTE)]);
    assert_eq!(core.poll_timeout(), Some(at(10 * MINUTE)));
    assert!(deposit(&mut core, at(MINUTE), &e).unwrap().duplicate);
    assert_eq!(core.sweep_expired(at(10 * MINUTE)).unwrap(), 1);
    assert_eq!(count(&store), [0, 0, 0]);
    assert_eq!(core.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------
// 5. SURB replies
// ---------------------------------------------------------------------------------------

#[test]
fn surb_replies_need_an_id_minted_with_the_mailbox_reply_key() {
    let store = MemoryStore::new();
    let mut core = open(&store, &exact(), T0);
    let mut r = rng(16);
    let alice = Owner::new(&mut r);
    let bob = Owner::new(&mut r);
    let carol = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, alice.request(HOUR)).unwrap();
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    core.create_mailbox(T0, carol.request_with(HOUR, None))
        .unwrap();

    // Alice deposits into Bob's mailbox with an ack SURB to her own; Bob's mailbox acks; the
    // ack arrives at Alice's mailbox on the same node.
    let surb_id = alice.reply_key.mint_surb_id(&mut r, &alice.id);
    let (surb, recovery) = hop.surb(&mut r, &alice.id, surb_id);
    let dedup = DedupId::random(&mut r);
    let envelope = bob.envelope(&mut r, dedup, None, Some(surb), b"hi bob");
    let receipt = deposit(&mut core, T0, &envelope).unwrap();
    let outputs = drain(&mut core);
    let acks = replies(&outputs);
    assert_eq!(acks.len(), 1);
    let (destination, id, sealed) = hop.carry(acks[0].0, acks[0].1);
    assert_eq!(destination, DestinationAddress::mailbox(&alice.id));
    assert_eq!(id, surb_id);
    let incoming = Incoming::SurbReply {
        mailbox_id: alice.id,
        surb_id: id,
        payload: sealed.clone(),
    };
    let results = core.deposit_many(at(1), vec![incoming.clone()]);
    let stored = *results[0].as_ref().unwrap();
    assert_eq!(
        stored,
        DepositReceipt {
            mailbox_id: alice.id,
            seq: 1,
            expires_at: at(1 + HOUR),
            duplicate: false
        }
    );
    assert!(
        replies(&drain(&mut core)).is_empty(),
        "a SURB reply is not acknowledged"
    );
    // A redelivery is stored once.
    let again = core.deposit_many(at(2), vec![incoming.clone(), incoming]);
    for result in again {
        assert_eq!(
            result.unwrap(),
            DepositReceipt {
                duplicate: true,
                ..stored
            }
        );
    }

    let messages = fetch(&core, at(3), &alice, &alice.key());
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].body,
        MessageBody::SurbReply {
            surb_id,
            payload: sealed.clone()
        }
    );
    let MessageBody::SurbReply { payload, .. } = &messages[0].body else {
        unreachable!()
    };
    assert_eq!(
        Reply::decode(&recovery.open(payload).unwrap()).unwrap(),
        Reply::DepositAck {
            dedup_id: dedup,
            expires_at: receipt.expires_at
        }
    );

    // Refused: another key's id, an id minted for another mailbox, a made-up id, a mailbox
    // without a reply key, an unknown mailbox, an oversized reply.
    let reply_into = |core: &mut Core, mailbox_id: MailboxId, surb_id: SurbId, payload: Vec<u8>| {
        core.deposit_many(
            at(4),
            vec![Incoming::SurbReply {
                mailbox_id,
                surb_id,
                payload,
            }],
        )
        .pop()
        .unwrap()
    };
    let stored_before = count(&store);
    let bad_ids = [
        ReplyKey::random(&mut r).mint_surb_id(&mut r, &alice.id),
        alice.reply_key.mint_surb_id(&mut r, &bob.id),
        bob.reply_key.mint_surb_id(&mut r, &bob.id),
        SurbId::random(&mut r),
    ];
    for bad in bad_ids {
        let err = reply_into(&mut core, alice.id, bad, sealed.clone()).unwrap_err();
        assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    }
    let carol_id = carol.reply_key.mint_surb_id(&mut r, &carol.id);
    assert!(matches!(
        reply_into(&mut core, carol.id, carol_id, sealed.clone()),
        Err(MailboxError::Unauthorized(_))
    ));
    let stranger = Owner::new(&mut r);
    let stranger_id = stranger.reply_key.mint_surb_id(&mut r, &stranger.id);
    assert!(matches!(
        reply_into(&mut core, stranger.id, stranger_id, sealed.clone()),
        Err(MailboxError::UnknownMailbox)
    ));
    let good = alice.reply_key.mint_surb_id(&mut r, &alice.id);
    assert!(matches!(
        reply_into(&mut core, alice.id, good, vec![0; 4097]),
        Err(MailboxError::InvalidArgument(_))
    ));
    assert_eq!(count(&store), stored_before);
    assert!(drain(&mut core).is_empty());
    assert_eq!(seqs(&fetch(&core, at(5), &alice, &alice.key())), vec![1]);
    // The good id with a reply of the allowed size is accepted.
    assert_eq!(
        reply_into(&mut core, alice.id, good, vec![1; 4096])
            .unwrap()
            .seq,
        2
    );
}

// ---------------------------------------------------------------------------------------
// 6. Prekeys
// ---------------------------------------------------------------------------------------

#[test]
fn prekeys_are_served_once_each_in_id_order_then_the_fallback() {
    let store = MemoryStore::new();
    let config = CoreConfig {
        prekeys_max: 5,
        ..exact()
    };
    let mut core = open(&store, &config, T0);
    let mut r = rng(17);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let mallory = SigningKey::generate(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let owner_vk = bob.signing.verifying_key();
    let identity_key = [0x11; 32];
    let identity_signature = sign_identity(&bob.signing, &bob.id, &identity_key);
    let one_time = |id: u32| SignedPrekey::sign(&bob.signing, &bob.id, id, false, [id as u8; 32]);
    let fallback = SignedPrekey::sign(&bob.signing, &bob.id, 100, true, [100; 32]);
    let upload = |prekeys: Vec<SignedPrekey>| PrekeyUpload {
        identity_key,
        identity_signature,
        prekeys,
    };
    let good = vec![one_time(3), one_time(1), fallback.clone(), one_time(2)];

    let (surb, recovery) = hop.surb_to(&mut r, &alice);
    let request = |token: AccessToken| PrekeyRequest {
        mailbox_id: bob.id,
        access_token: token,
        reply_surb: surb.clone(),
    };
    // Nothing uploaded yet.
    assert!(matches!(
        core.handle_prekey_request(T0, request(bob.token)),
        Err(MailboxError::InvalidArgument(_))
    ));
    assert!(drain(&mut core).is_empty());

    // Bad uploads store nothing.
    let mut wrong_identity = upload(good.clone());
    wrong_identity.identity_signature = sign_identity(&mallory, &bob.id, &identity_key);
    let mut other_identity = upload(good.clone());
    other_identity.identity_key = [0x22; 32];
    let mut tampered = one_time(4);
    tampered.key = [44; 32];
    let bad_uploads = [
        (wrong_identity, "bad_signature"),
        (other_identity, "bad_signature"),
        (
            upload(vec![
                one_time(1),
                SignedPrekey::sign(&mallory, &bob.id, 2, false, [2; 32]),
            ]),
            "bad_signature",
        ),
        (
            upload(vec![SignedPrekey::sign(
                &bob.signing,
                &alice.id,
                2,
                false,
                [2; 32],
            )]),
            "bad_signature",
        ),
        (upload(vec![tampered]), "bad_signature"),
        (
            upload(vec![
                one_time(1),
                SignedPrekey {
                    fallback: true,
                    ..one_time(2)
                },
            ]),
            "bad_signature",
        ),
        (
            upload(vec![
                fallback.clone(),
                SignedPrekey::sign(&bob.signing, &bob.id, 101, true, [1; 32]),
            ]),
            "invalid_argument",
        ),
        (upload(vec![one_time(1), one_time(1)]), "invalid_argument"),
        (upload((1..=6).map(one_time).collect()), "quota_exceeded"),
    ];
    for (bad, kind) in bad_uploads {
        assert_eq!(core.put_prekeys(&bob.id, bad).unwrap_err().kind(), kind);
    }
    assert_eq!(store.len(Cf::Prekeys), 0);
    assert_eq!(core.prekeys_left(&bob.id).unwrap(), 0);

    assert_eq!(core.put_prekeys(&bob.id, upload(good)).unwrap(), 3);
    assert_eq!(core.prekeys_left(&bob.id).unwrap(), 3);

    // A wrong access token: refused, nothing consumed, no output.
    for token in [AccessToken::random(&mut r), alice.token] {
        let err = core.handle_prekey_request(T0, request(token)).unwrap_err();
        assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    }
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.prekeys_left(&bob.id).unwrap(), 3);

    let serve = |core: &mut Core| {
        core.handle_prekey_request(T0, request(bob.token)).unwrap();
        let outputs = drain(core);
        assert_eq!(outputs.len(), 1, "{outputs:?}");
        let Output::Reply {
            surb: out,
            reply: Reply::Prekeys(bundle),
        } = &outputs[0]
        else {
            panic!("not a prekey reply: {outputs:?}");
        };
        assert_eq!(out, &surb);
        bundle.verify(&owner_vk, &bob.id).unwrap();
        assert_eq!(bundle.owner_key, bob.key());
        assert_eq!(bundle.identity_key, identity_key);
        bundle.clone()
    };
    for (expected, left) in [(1u32, 2usize), (2, 1), (3, 0)] {
        let bundle = serve(&mut core);
        let prekey = bundle.prekey.unwrap();
        assert_eq!(
            (prekey.key_id, prekey.key, prekey.fallback),
            (expected, [expected as u8; 32], false)
        );
        assert_eq!(core.prekeys_left(&bob.id).unwrap(), left);
    }
    // None left: the fallback, as often as asked, also after a restart.
    for _ in 0..2 {
        assert_eq!(serve(&mut core).prekey, Some(fallback.clone()));
    }
    drop(core);
    let mut core = open(&store, &config, at(1));
    assert_eq!(core.prekeys_left(&bob.id).unwrap(), 0);
    let bundle = serve(&mut core);
    assert_eq!(bundle.prekey, Some(fallback));
    // The bundle travels through the SURB and opens for the requester.
    let (_, _, sealed) = hop.carry(&surb, &Reply::Prekeys(bundle.clone()));
    assert_eq!(
        Reply::decode(&recovery.open(&sealed).unwrap()).unwrap(),
        Reply::Prekeys(bundle)
    );

    // A new upload replaces everything, fallback included.
    assert_eq!(
        core.put_prekeys(&bob.id, upload(vec![one_time(7)]))
            .unwrap(),
        1
    );
    assert_eq!(serve(&mut core).prekey.unwrap().key_id, 7);
    assert_eq!(serve(&mut core).prekey, None);
    assert_eq!(core.prekeys_left(&bob.id).unwrap(), 0);
}

// ---------------------------------------------------------------------------------------
// 7. Export and erasure
// ---------------------------------------------------------------------------------------

#[test]
fn export_returns_every_live_message_and_erase_leaves_nothing() {
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(18);
    let bob = Owner::new(&mut r);
    let carol = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    core.create_mailbox(T0, carol.request(HOUR)).unwrap();
    let phone = SigningKey::generate(&mut r).verifying_key().to_bytes();
    core.add_device(&bob.id, phone, &bob.sign_device(&phone))
        .unwrap();

    let short = bob.fresh(&mut r, Some(at(MINUTE)), None, b"short");
    let (surb, _) = hop.surb_to(&mut r, &carol);
    let long = bob.fresh(&mut r, None, Some(surb), b"long");
    let third = bob.note(&mut r, b"third");
    deposit_all(&mut core, T0, &[&short, &long, &third]);
    let reply_id = bob.reply_key.mint_surb_id(&mut r, &bob.id);
    core.deposit_many(
        T0,
        vec![Incoming::SurbReply {
            mailbox_id: bob.id,
            surb_id: reply_id,
            payload: vec![5; 100],
        }],
    )[0]
    .as_ref()
    .unwrap();
    let identity = [3; 32];
    core.put_prekeys(
        &bob.id,
        PrekeyUpload {
            identity_key: identity,
            identity_signature: sign_identity(&bob.signing, &bob.id, &identity),
            prekeys: vec![SignedPrekey::sign(&bob.signing, &bob.id, 1, false, [1; 32])],
        },
    )
    .unwrap();
    deposit(&mut core, T0, &carol.note(&mut r, b"for carol")).unwrap();
    // The owner acked seq 2 (deleted only once the phone acks too).
    core.ack(&bob.id, &bob.key(), 2).unwrap();

    let (info, messages) = core.export(at(MINUTE), &bob.id).unwrap();
    assert_eq!(info, core.info(&bob.id).unwrap());
    assert_eq!(info.devices.len(), 2);
    assert_eq!(seqs(&messages), vec![2, 3, 4], "expired seq 1 exported");
    assert_eq!(messages, fetch(&core, at(MINUTE), &bob, &phone));
    assert_eq!(open_served(&bob, &messages[0]).1, b"long");
    assert_eq!(open_served(&bob, &messages[1]).1, b"third");
    assert_eq!(
        messages[2].body,
        MessageBody::SurbReply {
            surb_id: reply_id,
            payload: vec![5; 100]
        }
    );

    let sid = MasterKey::from_bytes(&MASTER).storage_id(&bob.id);
    let carol_sid = MasterKey::from_bytes(&MASTER).storage_id(&carol.id);
    let mentions = |store: &MemoryStore, sid: &[u8]| -> usize {
        Cf::ALL
            .iter()
            .flat_map(|cf| store.entries(*cf))
            .filter(|(k, v)| contains(k, sid) || contains(v, sid))
            .count()
    };
    assert!(mentions(&store, &sid) > 0);
    let carol_before = mentions(&store, &carol_sid);

    core.erase(&bob.id).unwrap();
    for cf in Cf::ALL {
        for (k, v) in store.entries(cf) {
            assert!(
                !contains(&k, &sid) && !contains(&v, &sid),
                "{cf:?} still holds bob's records"
            );
        }
    }
    assert_eq!(mentions(&store, &carol_sid), carol_before);
    assert!(matches!(
        core.info(&bob.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert!(matches!(
        core.export(at(MINUTE), &bob.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert!(matches!(
        core.fetch(at(MINUTE), &bob.id, &bob.key(), None, 10),
        Err(MailboxError::UnknownMailbox)
    ));
    assert!(!core.is_device(&bob.id, &phone));
    let err = deposit(&mut core, at(MINUTE), &bob.note(&mut r, b"after")).unwrap_err();
    assert!(matches!(err, MailboxError::UnknownMailbox), "{err:?}");
    assert!(matches!(
        deposit(&mut core, at(MINUTE), &third),
        Err(MailboxError::UnknownMailbox)
    ));
    let reply_id = bob.reply_key.mint_surb_id(&mut r, &bob.id);
    assert!(matches!(
        core.deposit_many(
            at(MINUTE),
            vec![Incoming::SurbReply {
                mailbox_id: bob.id,
                surb_id: reply_id,
                payload: vec![1]
            }]
        )
        .pop()
        .unwrap(),
        Err(MailboxError::UnknownMailbox)
    ));
    assert!(matches!(
        core.handle_prekey_request(
            at(MINUTE),
            PrekeyRequest {
                mailbox_id: bob.id,
                access_token: bob.token,
                reply_surb: hop.surb_to(&mut r, &carol).0,
            }
        ),
        Err(MailboxError::UnknownMailbox)
    ));
    assert!(matches!(
        core.erase(&bob.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert_eq!(core.stats().mailboxes, 1);
    assert_eq!(
        seqs(&fetch(&core, at(MINUTE), &carol, &carol.key())),
        vec![1]
    );

    // Still gone after a restart; sweeps of the old entries do not trip over it; the id can
    // be used again for a brand-new mailbox.
    drop(core);
    let mut core = open(&store, &config, at(2 * HOUR));
    assert!(matches!(
        core.info(&bob.id),
        Err(MailboxError::UnknownMailbox)
    ));
    assert_eq!(core.stats().mailboxes, 1);
    core.create_mailbox(at(2 * HOUR), bob.request(HOUR))
        .unwrap();
    assert!(fetch(&core, at(2 * HOUR), &bob, &bob.key()).is_empty());
    assert_eq!(
        deposit(&mut core, at(2 * HOUR), &bob.note(&mut r, b"new"))
            .unwrap()
            .seq,
        1
    );
}

// ---------------------------------------------------------------------------------------
// 8. Encryption at rest
// ---------------------------------------------------------------------------------------

#[test]
fn stored_bytes_reveal_no_ids_tokens_keys_or_content_and_need_the_master_key() {
    let store = MemoryStore::new();
    let config = exact();
    let mut core = open(&store, &config, T0);
    let mut r = rng(19);
    let bob = Owner::new(&mut r);
    let alice = Owner::new(&mut r);
    let hop = Hop::new(&mut r);
    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    let phone = SigningKey::generate(&mut r).verifying_key().to_bytes();
    core.add_device(&bob.id, phone, &bob.sign_device(&phone))
        .unwrap();

    let (surb, _) = hop.surb_to(&mut r, &alice);
    let content = b"the plaintext nobody may read on the disk".to_vec();
    let envelopes: Vec<Envelope> = (0..3)
        .map(|_| bob.fresh(&mut r, None, Some(surb.clone()), &content))
        .collect();
    let results = deposit_all(&mut core, T0, &envelopes.iter().collect::<Vec<_>>());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let reply_payload: Vec<u8> = (0..=255u8).collect();
    core.deposit_many(
        T0,
        vec![Incoming::SurbReply {
            mailbox_id: bob.id,
            surb_id: bob.reply_key.mint_surb_id(&mut r, &bob.id),
            payload: reply_payload.clone(),
        }],
    )[0]
    .as_ref()
    .unwrap();
    let identity = [0xd1; 32];
    let prekey = [0xe2; 32];
    core.put_prekeys(
        &bob.id,
        PrekeyUpload {
            identity_key: identity,
            identity_signature: sign_identity(&bob.signing, &bob.id, &identity),
            prekeys: vec![
                SignedPrekey::sign(&bob.signing, &bob.id, 1, false, prekey),
                SignedPrekey::sign(&bob.signing, &bob.id, 2, true, [0xf3; 32]),
            ],
        },
    )
    .unwrap();
    // Cursors of both devices are stored (seq 1 deleted, the rest kept for the owner).
    core.ack(&bob.id, &bob.key(), 1).unwrap();
    core.ack(&bob.id, &phone, 2).unwrap();
    assert_eq!(store.len(Cf::Envelopes), 3);

    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("mailbox id", bob.id.0.to_vec()),
        ("access token", bob.token.0.to_vec()),
        ("access key hash", bob.access_key_hash().to_vec()),
        ("owner key", bob.key().to_vec()),
        ("device key", phone.to_vec()),
        (
            "mailbox public key",
            bob.secret.public_key().to_bytes().to_vec(),
        ),
        ("reply key", bob.reply_key.0.to_vec()),
        ("identity key", identity.to_vec()),
        ("prekey", prekey.to_vec()),
        ("fallback key", vec![0xf3; 32]),
        ("content", content[..16].to_vec()),
        ("surb reply", reply_payload[100..132].to_vec()),
        ("ack surb", surb.as_bytes()[..32].to_vec()),
    ];
    for e in &envelopes {
        let wire = e.to_wire();
        needles.push(("hpke enc", wire.hpke_enc.clone()));
        for offset in [0, wire.ciphertext.len() / 2, wire.ciphertext.len() - 24] {
            needles.push((
                "envelope ciphertext",
                wire.ciphertext[offset..offset + 24].to_vec(),
            ));
        }
    }
    for cf in Cf::ALL {
        for (k, v) in store.entries(cf) {
            for (what, needle) in &needles {
                assert!(!contains(&k, needle), "{what} in clear in a {cf:?} key");
                assert!(!contains(&v, needle), "{what} in clear in a {cf:?} value");
            }
        }
    }

    // Another master key cannot read the store.
    drop(core);
    let err = MailboxCore::open(
        config.clone(),
        store.clone(),
        MasterKey::from_bytes(&[0xa5; 32]),
        core_rng(),
        at(1),
    )
    .unwrap_err();
    assert!(matches!(err, MailboxError::Corrupt(_)), "{err:?}");
    assert_eq!(err.kind(), "corrupt");
    assert!(!err.is_caller_error());

    // The right one can; a value moved to another key or tampered with is refused.
    let core = open(&store, &config, at(1));
    assert_eq!(seqs(&fetch(&core, at(1), &bob, &bob.key())), vec![2, 3, 4]);
    // (The sealed bodies, in their own column family, keyed by mailbox prefix and seq.)
    let entries = store.entries(Cf::Bodies);
    let (k2, v2) = entries[0].clone();
    let (k3, _) = entries[1].clone();
    let mut tampered = v2.clone();
    *tampered.last_mut().unwrap() ^= 1;
    store
        .write(
            vec![
                Op::Put {
                    cf: Cf::Bodies,
                    key: k3,
                    value: v2,
                },
                Op::Put {
                    cf: Cf::Bodies,
                    key: k2,
                    value: tampered,
                },
            ],
            true,
        )
        .unwrap();
    let err = core.fetch(at(1), &bob.id, &bob.key(), None, 1).unwrap_err();
    assert!(matches!(err, MailboxError::Corrupt(_)), "{err:?}");
    let err = core
        .fetch(at(1), &bob.id, &bob.key(), Some(2), 1)
        .unwrap_err();
    assert!(matches!(err, MailboxError::Corrupt(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// 9. Owner authentication
// ---------------------------------------------------------------------------------------

fn auth_config() -> AuthConfig {
    AuthConfig {
        challenge_ttl_ms: 1_000,
        session_ttl_ms: 10_000,
        ticket_ttl_ms: 500,
        challenges_max: 3,
        challenges_per_source_max: 2,
        sessions_max: 3,
        tickets_max: 2,
    }
}

#[test]
fn login_needs_a_fresh_challenge_signed_by_the_device_for_this_node() {
    let mut r = rng(20);
    let mut sessions = Sessions::new(auth_config(), "mailbox-1.example".into(), rng(21));
    assert_eq!(sessions.audience(), "mailbox-1.example");
    let mailbox = MailboxId::random(&mut r);
    let device = SigningKey::generate(&mut r);
    let dk = device.verifying_key().to_bytes();
    let sign = |key: &SigningKey, audience: &str, mailbox: &MailboxId, challenge: &[u8; 32]| {
        key.sign(&login_transcript(
            audience,
            mailbox,
            &key.verifying_key().to_bytes(),
            challenge,
        ))
        .to_bytes()
    };

    let (challenge, expires) = sessions.challenge(T0, mailbox, dk).unwrap();
    assert_eq!(expires, at(1_000));
    let signature = sign(&device, "mailbox-1.example", &mailbox, &challenge);
    let (token, until) = sessions
        .login(at(999), mailbox, dk, challenge, signature, true)
        .unwrap();
    assert_eq!(until, at(999 + 10_000));
    assert_eq!(
        sessions.authenticate(at(999), &token).unwrap(),
        Session {
            mailbox,
            device: dk,
            expires_at: until,
            token_hash: Sha256::digest(token).into(),
        }
    );
    assert_eq!(sessions.session_count(), 1);
    // Single use: the same answer again is refused.
    let err = sessions
        .login(at(999), mailbox, dk, challenge, signature, true)
        .unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    // The token works until its expiry, not at it.
    assert!(sessions.authenticate(at(999 + 9_999), &token).is_ok());
    assert!(matches!(
        sessions.authenticate(at(999 + 10_000), &token),
        Err(MailboxError::Unauthorized(_))
    ));
    assert!(matches!(
        sessions.authenticate(T0, &[0; 32]),
        Err(MailboxError::Unauthorized(_))
    ));

    // A signature for another node, over another challenge, or by another key: refused, and
    // the challenge is consumed anyway.
    let other = SigningKey::generate(&mut r);
    let bad_signatures = [
        sign(&device, "mailbox-2.example", &mailbox, &challenge),
        sign(&device, "mailbox-1.example", &mailbox, &[0; 32]),
        sign(&other, "mailbox-1.example", &mailbox, &challenge),
        [0; 64],
    ];
    for bad in bad_signatures {
        let (c, _) = sessions.challenge(T0, mailbox, dk).unwrap();
        let err = sessions.login(T0, mailbox, dk, c, bad, true).unwrap_err();
        assert!(matches!(err, MailboxError::BadSignature(_)), "{err:?}");
        let good = sign(&device, "mailbox-1.example", &mailbox, &c);
        assert!(matches!(
            sessions.login(T0, mailbox, dk, c, good, true),
            Err(MailboxError::Unauthorized(_))
        ));
    }

    // A challenge issued for another device or mailbox.
    let (c, _) = sessions.challenge(T0, mailbox, dk).unwrap();
    let other_key = other.verifying_key().to_bytes();
    let err = sessions
        .login(
            T0,
            mailbox,
            other_key,
            c,
            sign(&other, "mailbox-1.example", &mailbox, &c),
            true,
        )
        .unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    let other_mailbox = MailboxId::random(&mut r);
    let (c, _) = sessions.challenge(T0, mailbox, dk).unwrap();
    let err = sessions
        .login(
            T0,
            other_mailbox,
            dk,
            c,
            sign(&device, "mailbox-1.example", &other_mailbox, &c),
            true,
        )
        .unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");

    // Expired challenge.
    let (c, expires) = sessions.challenge(T0, mailbox, dk).unwrap();
    let err = sessions
        .login(
            expires,
            mailbox,
            dk,
            c,
            sign(&device, "mailbox-1.example", &mailbox, &c),
            true,
        )
        .unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");

    // A valid signature by a key the core does not know as a device.
    let (c, _) = sessions.challenge(T0, mailbox, dk).unwrap();
    let err = sessions
        .login(
            T0,
            mailbox,
            dk,
            c,
            sign(&device, "mailbox-1.example", &mailbox, &c),
            false,
        )
        .unwrap_err();
    assert!(matches!(err, MailboxError::Unauthorized(_)), "{err:?}");
    assert_eq!(
        sessions.session_count(),
        1,
        "only one session was ever issued"
    );
}

#[test]
fn tickets_are_single_use_and_mailbox_bound_and_tables_are_bounded() {
    let mut r = rng(22);
    let mut sessions = Sessions::new(auth_config(), "node".into(), rng(23));
    let mailbox = MailboxId::random(&mut r);
    let other_mailbox = MailboxId::random(&mut r);
    let login = |sessions: &mut Sessions<ChaCha20Rng>,
                 now: UnixTime,
                 mailbox: MailboxId,
                 key: &SigningKey| {
        let dk = key.verifying_key().to_bytes();
        let (c, _) = sessions.challenge(now, mailbox, dk).unwrap();
        let sig = key
            .sign(&login_transcript("node", &mailbox, &dk, &c))
            .to_bytes();
        sessions.login(now, mailbox, dk, c, sig, true)
    };
    let owner = SigningKey::generate(&mut r);
    let phone = SigningKey::generate(&mut r);
    let owner_token = login(&mut sessions, T0, mailbox, &owner).unwrap().0;
    let phone_token = login(&mut sessions, T0, mailbox, &phone).unwrap().0;
    let session = sessions.authenticate(T0, &owner_token).unwrap();
    assert_eq!(session.expires_at, at(10_000));

    // A ticket is redeemed once, only for its mailbox, before it expires.
    let (ticket, expires) = sessions.ticket(T0, session).unwrap();
    assert_eq!(expires, at(500));
    assert_eq!(sessions.redeem(at(1), &mailbox, &ticket).unwrap(), session);
    assert!(matches!(
        sessions.redeem(at(1), &mailbox, &ticket),
        Err(MailboxError::Unauthorized(_))
    ));
    let (ticket, _) = sessions.ticket(at(1), session).unwrap();
    assert!(matches!(
        sessions.redeem(at(2), &other_mailbox, &ticket),
        Err(MailboxError::Unauthorized(_))
    ));
    assert!(
        matches!(
            sessions.redeem(at(2), &mailbox, &ticket),
            Err(MailboxError::Unauthorized(_))
        ),
        "a ticket tried for another mailbox is consumed"
    );
    let (ticket, expires) = sessions.ticket(at(3), session).unwrap();
    assert!(matches!(
        sessions.redeem(expires, &mailbox, &ticket),
        Err(MailboxError::Unauthorized(_))
    ));
    assert!(matches!(
        sessions.redeem(at(4), &mailbox, &[0; 32]),
        Err(MailboxError::Unauthorized(_))
    ));

    // Challenges: full of live entries → rate limited until the first one expires.
    for device in 1..=3u8 {
        sessions.challenge(at(600), mailbox, [device; 32]).unwrap();
    }
    let err = sessions.challenge(at(610), mailbox, [4; 32]).unwrap_err();
    assert!(
        matches!(
            err,
            MailboxError::RateLimited {
                retry_after_ms: 990,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), "rate_limited");
    assert!(
        sessions.challenge(at(1_600), mailbox, [4; 32]).is_ok(),
        "expired challenges make room"
    );

    // Sessions: at most three live ones.
    let third = SigningKey::generate(&mut r);
    let third_token = login(&mut sessions, at(1_600), other_mailbox, &third)
        .unwrap()
        .0;
    assert_eq!(sessions.session_count(), 3);
    let fourth = SigningKey::generate(&mut r);
    assert!(matches!(
        login(&mut sessions, at(1_600), mailbox, &fourth),
        Err(MailboxError::RateLimited { .. })
    ));

    // Tickets: at most two outstanding.
    let (t1, _) = sessions.ticket(at(1_700), session).unwrap();
    let (_t2, _) = sessions.ticket(at(1_700), session).unwrap();
    let err = sessions.ticket(at(1_800), session).unwrap_err();
    assert!(
        matches!(
            err,
            MailboxError::RateLimited {
                retry_after_ms: 400,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(sessions.redeem(at(1_800), &mailbox, &t1).unwrap(), session);
    assert!(
        sessions.ticket(at(1_800), session).is_ok(),
        "room again after a redemption"
    );

    // Revoking one device, then the whole mailbox; logout.
    let phone_session = sessions.authenticate(at(2_500), &phone_token).unwrap();
    let (phone_ticket, _) = sessions.ticket(at(2_500), phone_session).unwrap();
    sessions.revoke(&mailbox, Some(&phone.verifying_key().to_bytes()));
    assert!(sessions.authenticate(at(2_500), &phone_token).is_err());
    assert!(sessions.redeem(at(2_500), &mailbox, &phone_ticket).is_err());
    assert!(sessions.authenticate(at(2_500), &owner_token).is_ok());
    assert_eq!(sessions.session_count(), 2);
    sessions.revoke(&mailbox, None);
    assert!(sessions.authenticate(at(2_500), &owner_token).is_err());
    assert_eq!(
        sessions.session_count(),
        1,
        "the other mailbox's session stays"
    );
    assert!(sessions.authenticate(at(2_500), &third_token).is_ok());
    sessions.logout(at(2_500), &third_token);
    assert!(sessions.authenticate(at(2_500), &third_token).is_err());
    assert_eq!(sessions.session_count(), 0);

    // A ticket never outlives the session it was issued for.
    let (_, expires) = sessions.ticket(at(9_800), session).unwrap();
    assert_eq!(expires, session.expires_at);
}

// ---------------------------------------------------------------------------------------
// Property: exactly-once delivery, nothing expired served.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// A batch of deposits: (dedup slot, requested expiry offset in ticks; None = retention).
    Deposit(Vec<(u8, Option<u8>)>),
    /// Device 0 (owner) or 1 (phone) fetches up to `limit` and acks what it got.
    FetchAck {
        phone: bool,
        limit: u8,
    },
    Sweep,
    Restart,
    /// Time passes, in ticks.
    Advance(u8),
}

/// Time in the property test moves in ticks, so that fetches and sweeps often fall exactly
/// on expiry times and bucket edges.
const TICK: u64 = 250;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::collection::vec((0u8..6, prop::option::of(0u8..60)), 1..4).prop_map(Step::Deposit),
        3 => (any::<bool>(), 1u8..5).prop_map(|(phone, limit)| Step::FetchAck { phone, limit }),
        1 => Just(Step::Sweep),
        1 => Just(Step::Restart),
        2 => (0u8..24).prop_map(Step::Advance),
    ]
}

const PROP_RETENTION: u64 = 10_000;

struct Accepted {
    attempt: u32,
    expires_at: u64,
}

struct Model {
    now: UnixTime,
    /// Every deposit stored, by seq.
    accepted: BTreeMap<u64, Accepted>,
    /// Dedup slot → (seq, expiry) of the entry the store still holds.
    dedup: BTreeMap<u8, (u64, u64)>,
    cursors: [u64; 2],
    served: BTreeMap<(usize, u64), u32>,
    last_seq: u64,
    /// Latest time at which every expired entry was purged (sweep or open).
    purged_at: u64,
}

impl Model {
    fn purge(&mut self) {
        let now = self.now.0;
        self.dedup.retain(|_, (_, exp)| *exp > now);
        self.purged_at = now;
    }

    /// Fetches for a device like its client would, checks against the model, acks.
    fn fetch_ack(
        &mut self,
        core: &mut Core,
        owner: &Owner,
        devices: &[[u8; 32]; 2],
        d: usize,
        limit: usize,
    ) -> Result<usize, TestCaseError> {
        let got = core
            .fetch(self.now, &owner.id, &devices[d], None, limit)
            .unwrap();
        let expected: Vec<u64> = self
            .accepted
            .range(self.cursors[d] + 1..)
            .filter(|(_, a)| a.expires_at > self.now.0)
            .map(|(seq, _)| *seq)
            .take(limit)
            .collect();
        prop_assert_eq!(seqs(&got), expected);
        for m in &got {
            let a = &self.accepted[&m.seq];
            prop_assert!(m.expires_at.0 > self.now.0, "expired message served");
            prop_assert_eq!(m.expires_at.0, a.expires_at);
            let (_, content) = open_served(owner, m);
            prop_assert_eq!(content, a.attempt.to_be_bytes().to_vec());
            let n = self.served.entry((d, m.seq)).or_insert(0);
            *n += 1;
            prop_assert_eq!(*n, 1, "seq {} served twice to device {}", m.seq, d);
        }
        if let Some(last) = got.last() {
            prop_assert_eq!(
                core.ack(&owner.id, &devices[d], last.seq).unwrap(),
                last.seq
            );
            self.cursors[d] = last.seq;
        }
        Ok(got.len())
    }

    fn check_store(
        &self,
        core: &Core,
        store: &MemoryStore,
        bucket_ms: u64,
    ) -> Result<(), TestCaseError> {
        let min_cursor = self.cursors[0].min(self.cursors[1]);
        let live = |a: &Accepted| a.expires_at > self.purged_at;
        let envelopes = self
            .accepted
            .iter()
            .filter(|(seq, a)| **seq > min_cursor && live(a))
            .count();
        let indexed: Vec<u64> = self
            .accepted
            .values()
            .filter(|a| live(a))
            .map(|a| a.expires_at)
            .collect();
        prop_assert_eq!(store.len(Cf::Envelopes), envelopes);
        prop_assert_eq!(store.len(Cf::Dedup), self.dedup.len());
        prop_assert_eq!(store.len(Cf::Expiry), indexed.len());
        prop_assert_eq!(self.dedup.len(), indexed.len());
        if let Some(first) = indexed.iter().min() {
            let due = core.poll_timeout();
            prop_assert!(
                due.is_some_and(|t| t.0 <= bucket_of(*first, bucket_ms)),
                "expiry at {} but next sweep {:?}",
                first,
                due
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_accepted_deposit_is_served_once_per_device_unless_it_expires(
        seed in any::<u64>(),
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let mut r = rng(seed);
        let store = MemoryStore::new();
        let config = CoreConfig {
            sweep_batch_max: 2,
            expiry_bucket_ms: 1_000,
            deposits_per_min: 1_000_000,
            ..exact()
        };
        let mut core = open(&store, &config, T0);
        let bob = Owner::new(&mut r);
        core.create_mailbox(T0, bob.request(PROP_RETENTION)).unwrap();
        let phone = SigningKey::generate(&mut r).verifying_key().to_bytes();
        core.add_device(&bob.id, phone, &bob.sign_device(&phone)).unwrap();
        let devices = [bob.key(), phone];
        let slots: Vec<DedupId> = (0..6u8).map(|i| DedupId([i + 1; 16])).collect();
        let mut model = Model {
            now: T0,
            accepted: BTreeMap::new(),
            dedup: BTreeMap::new(),
            cursors: [0; 2],
            served: BTreeMap::new(),
            last_seq: 0,
            purged_at: T0.0,
        };
        let mut attempt = 0u32;

        for step in steps {
            match step {
                Step::Deposit(items) => {
                    let now = model.now;
                    let mut incoming = Vec::new();
                    let mut expected = Vec::new();
                    let mut in_batch: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
                    for (slot, offset) in items {
                        attempt += 1;
                        let requested = offset.map(|o| UnixTime(now.0 + u64::from(o) * TICK));
                        let e = bob.envelope(&mut r, slots[usize::from(slot)], requested, None, &attempt.to_be_bytes());
                        incoming.push(Incoming::Deposit(e));
                        if let Some((seq, exp)) = model.dedup.get(&slot).or(in_batch.get(&slot)).copied() {
                            expected.push(Ok((seq, exp, true)));
                        } else if requested.is_some_and(|t| t.0 <= now.0) {
                            expected.push(Err("already_expired"));
                        } else {
                            let exp = requested.map_or(u64::MAX, |t| t.0).min(now.0 + PROP_RETENTION);
                            model.last_seq += 1;
                            let seq = model.last_seq;
                            in_batch.insert(slot, (seq, exp));
                            model.accepted.insert(seq, Accepted { attempt, expires_at: exp });
                            expected.push(Ok((seq, exp, false)));
                        }
                    }
                    let results = core.deposit_many(now, incoming);
                    prop_assert_eq!(results.len(), expected.len());
                    for (result, expected) in results.iter().zip(&expected) {
                        match (result, expected) {
                            (Ok(receipt), Ok((seq, exp, duplicate))) => {
                                prop_assert_eq!(
                                    (receipt.seq, receipt.expires_at.0, receipt.duplicate),
                                    (*seq, *exp, *duplicate)
                                );
                            }
                            (Err(e), Err(kind)) => prop_assert_eq!(e.kind(), *kind),
                            (got, want) => {
                                return Err(TestCaseError::fail(format!("got {got:?}, want {want:?}")));
                            }
                        }
                    }
                    model.dedup.extend(in_batch);
                }
                Step::FetchAck { phone, limit } => {
                    model.fetch_ack(&mut core, &bob, &devices, usize::from(phone), usize::from(limit))?;
                }
                Step::Sweep => {
                    while core.sweep_expired(model.now).unwrap() >= config.sweep_batch_max {}
                    model.purge();
                }
                Step::Restart => {
                    drop(core);
                    core = open(&store, &config, model.now);
                    model.purge();
                    prop_assert_eq!(core.last_seq(&bob.id).unwrap(), model.last_seq);
                }
                Step::Advance(ticks) => model.now = UnixTime(model.now.0 + u64::from(ticks) * TICK),
            }
            drain(&mut core);
            model.check_store(&core, &store, config.expiry_bucket_ms)?;
        }

        // Both devices drain what is left; then every accepted deposit was served exactly
        // once to each device, or expired before that device got to it.
        for d in 0..2 {
            while model.fetch_ack(&mut core, &bob, &devices, d, 100)? > 0 {}
        }
        for (seq, a) in &model.accepted {
            for d in 0..2 {
                let n = model.served.get(&(d, *seq)).copied().unwrap_or(0);
                prop_assert!(n == 1 || (n == 0 && a.expires_at <= model.now.0),
                    "seq {} served {} times to device {} (expires {}, now {})", seq, n, d, a.expires_at, model.now.0);
            }
        }
    }
}

/// True when a fetch for `device` after `after` would return a message now.
fn has_messages<S: MailboxStore, R: rand::CryptoRng>(
    core: &MailboxCore<S, R>,
    now: UnixTime,
    mailbox: &MailboxId,
    device: &[u8; 32],
    after: Option<u64>,
) -> bool {
    !core
        .fetch(now, mailbox, device, after, 1)
        .unwrap()
        .is_empty()
}

/// A store that counts the expiry-index keys its scans visit.
#[derive(Clone)]
struct CountingStore {
    inner: MemoryStore,
    expiry_visited: std::sync::Arc<AtomicU64>,
}

impl MailboxStore for CountingStore {
    fn get(
        &self,
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, whispr_mailbox::store::StoreError> {
        self.inner.get(cf, key)
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<(), whispr_mailbox::store::StoreError> {
        let visited = &self.expiry_visited;
        self.inner.scan(cf, from, to, &mut |k, v| {
            if cf == Cf::Expiry {
                visited.fetch_add(1, Ordering::Relaxed);
            }
            f(k, v)
        })
    }

    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), whispr_mailbox::store::StoreError> {
        self.inner.write(ops, sync)
    }

    fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }
}

/// Security review, finding 11 (a): erasing a mailbox scanned the whole expiry index (one
/// entry per message deposited on the node within the retention period, acknowledged ones
/// included) under the core lock, so create–erase in a loop stalled the node. Erasing an empty
/// mailbox must visit (almost) none of the other mailboxes' expiry entries.
#[test]
fn erasing_an_empty_mailbox_does_not_walk_other_mailboxes_expiry_entries() {
    let store = CountingStore {
        inner: MemoryStore::new(),
        expiry_visited: std::sync::Arc::new(AtomicU64::new(0)),
    };
    let config = CoreConfig {
        deposits_per_min: 1_000_000,
        ..exact()
    };
    let mut core = MailboxCore::open(
        config,
        store.clone(),
        MasterKey::from_bytes(&MASTER),
        core_rng(),
        T0,
    )
    .unwrap();
    let mut r = rng(31);
    let alice = Owner::new(&mut r);
    let bob = Owner::new(&mut r);
    core.create_mailbox(T0, alice.request(HOUR)).unwrap();
    let envelopes: Vec<Envelope> = (0..10_000u32)
        .map(|i| alice.note(&mut r, &i.to_be_bytes()))
        .collect();
    for chunk in envelopes.chunks(500) {
        let results = core.deposit_many(T0, chunk.iter().cloned().map(Incoming::Deposit).collect());
        assert!(results.iter().all(Result::is_ok));
    }
    assert_eq!(store.inner.len(Cf::Expiry), 10_000);

    core.create_mailbox(T0, bob.request(HOUR)).unwrap();
    store.expiry_visited.store(0, Ordering::Relaxed);
    core.erase(&bob.id).unwrap();
    let visited = store.expiry_visited.load(Ordering::Relaxed);
    assert!(
        visited < 100,
        "erasing an empty mailbox visited {visited} expiry keys"
    );
    // Erasing Alice still removes every trace of hers, the expiry entries included.
    core.erase(&alice.id).unwrap();
    assert_eq!(store.inner.len(Cf::Expiry), 0);
    assert_eq!(store.inner.len(Cf::Dedup), 0);
    assert_eq!(store.inner.len(Cf::Envelopes), 0);
}

/// Security review, finding 11 (b), in the sans-IO tables: a source holds at most
/// `challenges_per_source_max` outstanding challenges (IPv6 counted per /64), and a full table
/// drops its oldest challenge for a new one instead of refusing everybody.
#[test]
fn challenges_are_shared_fairly_between_sources() {
    let mut sessions = Sessions::new(auth_config(), "node".into(), rng(61));
    let mailbox = MailboxId([7; 32]);
    let flood: std::net::IpAddr = "2001:db8::1".parse().unwrap();
    let same_64: std::net::IpAddr = "2001:db8::ffff:2".parse().unwrap();
    let (first, _) = sessions
        .challenge_from(T0, flood, mailbox, [1; 32])
        .unwrap();
    sessions
        .challenge_from(at(1), same_64, mailbox, [2; 32])
        .unwrap();
    let err = sessions
        .challenge_from(at(2), flood, mailbox, [3; 32])
        .unwrap_err();
    assert!(
        matches!(
            err,
            MailboxError::RateLimited {
                retry_after_ms: 998,
                ..
            }
        ),
        "{err:?}"
    );
    // Other sources fill the table (3), then push out the oldest challenge.
    let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
    sessions.challenge_from(at(3), a, mailbox, [4; 32]).unwrap();
    let owner = SigningKey::generate(&mut rng(62));
    let dk = owner.verifying_key().to_bytes();
    let (c, _) = sessions.challenge_from(at(4), b, mailbox, dk).unwrap();
    let sig = owner
        .sign(&login_transcript("node", &mailbox, &dk, &c))
        .to_bytes();
    sessions.login(at(5), mailbox, dk, c, sig, true).unwrap();
    // The flood's first challenge was dropped for room; its quota came back with it.
    let sig = owner
        .sign(&login_transcript("node", &mailbox, &[1; 32], &first))
        .to_bytes();
    assert!(
        sessions
            .login(at(6), mailbox, [1; 32], first, sig, true)
            .is_err()
    );
    sessions
        .challenge_from(at(7), flood, mailbox, [5; 32])
        .unwrap();
}
