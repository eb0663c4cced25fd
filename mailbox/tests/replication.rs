#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]
//! Mailbox replication in the sans-IO core (`docs/replication.md`): three cores over
//! in-memory stores, wired by a tiny message bus that encodes and decodes every replica
//! message. A node that is "down" gets nothing; a "restart with an empty disk" opens a core
//! over a fresh store. Time is passed in.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_mailbox::config::CoreConfig;
use whispr_mailbox::core::{Incoming, MailboxCore, MessageBody, Output};
use whispr_mailbox::crypto::MasterKey;
use whispr_mailbox::store::MemoryStore;
use whispr_mailbox::testkit::Owner;
use whispr_protocol::envelope::Envelope;
use whispr_protocol::payload::Reply;
use whispr_protocol::replica::{MessageKind, PushItem, ReplicaMessage};
use whispr_protocol::sphinx::{RouteHop, SphinxPublicKey, SphinxSecretKey, Surb, create_surb};
use whispr_protocol::{DedupId, DestinationAddress, MailboxId, NodeId, SurbId, UnixTime};

const T0: UnixTime = UnixTime(1_800_000_000_000);
const TIMEOUT: u64 = 5_000;
const REPAIR: u64 = 1_000;

type Core = MailboxCore<MemoryStore, ChaCha20Rng>;

static SEEDS: AtomicU64 = AtomicU64::new(7_000_000);

fn at(ms: u64) -> UnixTime {
    UnixTime(T0.0 + ms)
}

fn node_id(i: usize) -> NodeId {
    NodeId([u8::try_from(i).unwrap() + 1; 32])
}

fn config(i: usize) -> CoreConfig {
    CoreConfig {
        node_id: Some(node_id(i).0),
        replica_ack_timeout_ms: TIMEOUT,
        replica_repair_interval_ms: REPAIR,
        ..CoreConfig::default()
    }
}

fn open(i: usize, store: &MemoryStore, now: UnixTime) -> Core {
    MailboxCore::open(
        config(i),
        store.clone(),
        MasterKey::from_bytes(&[0x40 + u8::try_from(i).unwrap(); 32]),
        ChaCha20Rng::seed_from_u64(SEEDS.fetch_add(1, Ordering::Relaxed)),
        now,
    )
    .unwrap()
}

fn surb(rng: &mut ChaCha20Rng) -> Surb {
    let route: Vec<RouteHop> = (0..2u8)
        .map(|i| RouteHop {
            node: NodeId([0xa0 + i; 32]),
            sphinx_key: SphinxPublicKey::from(&SphinxSecretKey::from([0x30 + i; 32])),
        })
        .collect();
    let delays = [std::time::Duration::from_millis(5)];
    let id = SurbId::random(rng);
    create_surb(
        rng,
        &route,
        &delays,
        DestinationAddress::mailbox(&MailboxId([0xee; 32])),
        id,
    )
    .unwrap()
    .0
}

/// Three replicas and a bus between them.
struct Net {
    stores: Vec<MemoryStore>,
    cores: Vec<Core>,
    up: Vec<bool>,
    /// Deposit receipts sent, by node.
    receipts: Vec<Vec<DedupId>>,
    /// Replica messages delivered.
    delivered: usize,
    owner: Owner,
    rng: ChaCha20Rng,
}

impl Net {
    fn new() -> Net {
        let stores: Vec<MemoryStore> = (0..3).map(|_| MemoryStore::new()).collect();
        let cores = (0..3).map(|i| open(i, &stores[i], T0)).collect();
        let owner = Owner::from_seed(11);
        let mut net = Net {
            stores,
            cores,
            up: vec![true; 3],
            receipts: vec![Vec::new(); 3],
            delivered: 0,
            owner,
            rng: ChaCha20Rng::seed_from_u64(5),
        };
        let replicas: Vec<NodeId> = (0..3).map(node_id).collect();
        for core in &mut net.cores {
            let req = net
                .owner
                .create_request_replicated(24 * 3_600_000, &replicas);
            core.create_replicated(T0, req, replicas.clone()).unwrap();
        }
        net
    }

    fn mailbox(&self) -> MailboxId {
        self.owner.mailbox_id
    }

    fn device(&self) -> [u8; 32] {
        self.owner.owner.verifying_key().to_bytes()
    }

    /// Delivers every output until nothing moves. Messages to a node that is down are lost.
    fn pump(&mut self, now: UnixTime) {
        loop {
            let mut moved = false;
            for i in 0..3 {
                while let Some(output) = self.cores[i].poll_output() {
                    match output {
                        Output::Reply {
                            reply: Reply::DepositAck { dedup_id, .. },
                            ..
                        } => self.receipts[i].push(dedup_id),
                        Output::Replica { peer, message } => {
                            moved = true;
                            let to = (0..3).find(|j| node_id(*j) == peer).unwrap();
                            if !self.up[to] || !self.up[i] {
                                continue;
                            }
                            let bytes = message.encode();
                            let decoded = ReplicaMessage::decode(&bytes).unwrap();
                            self.delivered += 1;
                            self.cores[to]
                                .handle_replica(now, node_id(i), decoded)
                                .unwrap();
                        }
                        _ => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs the round at `now` and checks it was quiet: one summary from each node to each
    /// of its two peers, nothing else.
    fn assert_quiet_round(&mut self, now: u64) {
        let before = self.delivered;
        self.tick(at(now));
        assert_eq!(
            self.delivered - before,
            6,
            "one summary from each node to each of its two peers, nothing else"
        );
    }

    /// Runs `tick` on every live node at `now`, then pumps.
    fn tick(&mut self, now: UnixTime) {
        for i in 0..3 {
            if self.up[i] {
                self.cores[i].tick(now).unwrap();
            }
        }
        self.pump(now);
    }

    fn envelope(&mut self, expires_at: Option<UnixTime>, with_surb: bool) -> Envelope {
        let dedup = DedupId::random(&mut self.rng);
        let s = with_surb.then(|| surb(&mut self.rng));
        self.owner
            .envelope(&mut self.rng, dedup, expires_at, s, b"hello")
            .unwrap()
    }

    /// Deposits `e` at node `i` (with a fresh SURB, as a retransmission would carry).
    fn deposit(&mut self, i: usize, e: &Envelope, now: UnixTime) {
        let mut e = e.clone();
        e.outer.ack_surb = Some(surb(&mut self.rng));
        let r = self.cores[i].deposit_many(now, vec![Incoming::Deposit(e)]);
        r[0].as_ref().unwrap();
    }

    /// The dedup ids node `i` serves the owner at `now`.
    fn served(&self, i: usize, now: UnixTime) -> BTreeSet<[u8; 16]> {
        self.cores[i]
            .fetch(now, &self.mailbox(), &self.device(), None, 100)
            .unwrap()
            .into_iter()
            .map(|m| match m.body {
                MessageBody::Envelope(b) => Envelope::decode(&b).unwrap().outer.dedup_id.0,
                MessageBody::SurbReply { surb_id, .. } => surb_id.0,
            })
            .collect()
    }

    fn stored(&self, i: usize) -> u64 {
        self.cores[i].stats().messages
    }

    /// Node `i` restarts over the same store.
    fn restart(&mut self, i: usize, now: UnixTime) {
        self.cores[i] = open(i, &self.stores[i], now);
    }

    /// Node `i` loses its disk and restarts.
    fn wipe(&mut self, i: usize, now: UnixTime) {
        self.stores[i] = MemoryStore::new();
        self.cores[i] = open(i, &self.stores[i], now);
    }
}

#[test]
fn the_receipt_leaves_only_after_a_peer_stored_the_push() {
    let mut net = Net::new();
    let e = net.envelope(None, true);
    let id = e.outer.dedup_id;
    net.cores[0].deposit_many(at(1), vec![Incoming::Deposit(e)])[0]
        .as_ref()
        .unwrap();
    // Before any peer answered: pushes to both peers, no receipt.
    let mut pushes = Vec::new();
    while let Some(o) = net.cores[0].poll_output() {
        match o {
            Output::Reply { .. } => panic!("receipt released before a peer acked"),
            Output::Replica {
                peer,
                message: message @ ReplicaMessage::Push { .. },
            } => pushes.push((peer, message)),
            _ => {}
        }
    }
    assert_eq!(pushes.len(), 2);
    assert_eq!(net.cores[0].receipts_held(), 1);
    // One peer stores it and acks: the receipt leaves.
    let (peer, push) = pushes.remove(0);
    let to = (0..3).find(|j| node_id(*j) == peer).unwrap();
    net.cores[to]
        .handle_replica(at(2), node_id(0), push)
        .unwrap();
    net.pump(at(2));
    assert_eq!(net.receipts[0], vec![id]);
    assert_eq!(net.cores[0].replica_stats().receipts_released, 1);
    assert_eq!(net.stored(to), 1);
    assert_eq!(net.served(to, at(3)), BTreeSet::from([id.0]));
}

#[test]
fn with_every_peer_down_no_receipt_and_the_timeout_is_counted() {
    let mut net = Net::new();
    net.up[1] = false;
    net.up[2] = false;
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    assert!(net.receipts[0].is_empty());
    net.tick(at(TIMEOUT));
    assert_eq!(net.cores[0].receipts_held(), 1, "not yet past the deadline");
    net.tick(at(TIMEOUT + 2));
    assert!(net.receipts[0].is_empty());
    assert_eq!(net.cores[0].receipts_held(), 0);
    assert_eq!(net.cores[0].replica_stats().receipts_timed_out, 1);
    // A peer is back; the sender retransmits (to the next replica): stored once everywhere,
    // one receipt.
    net.up[1] = true;
    net.deposit(1, &e, at(TIMEOUT + 3));
    net.pump(at(TIMEOUT + 3));
    assert_eq!(net.receipts[1], vec![e.outer.dedup_id]);
    assert_eq!(net.stored(0), 1);
    assert_eq!(net.stored(1), 1);
}

#[test]
fn a_duplicate_deposit_is_stored_once_everywhere_and_acknowledged_again() {
    let mut net = Net::new();
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    // The receipt was lost: the sender retransmits to replica 1, then again to replica 0.
    net.deposit(1, &e, at(2));
    net.pump(at(2));
    net.deposit(0, &e, at(3));
    net.pump(at(3));
    for i in 0..3 {
        assert_eq!(net.stored(i), 1, "node {i}");
        assert_eq!(net.served(i, at(4)), BTreeSet::from([e.outer.dedup_id.0]));
    }
    assert_eq!(net.receipts[0].len(), 2);
    assert_eq!(net.receipts[1].len(), 1);
}

#[test]
fn an_ack_at_one_replica_deletes_at_the_others_and_the_id_is_never_stored_again() {
    let mut net = Net::new();
    let e1 = net.envelope(None, true);
    let e2 = net.envelope(None, true);
    net.deposit(0, &e1, at(1));
    net.deposit(2, &e2, at(1));
    net.pump(at(1));
    for i in 0..3 {
        assert_eq!(net.stored(i), 2);
    }
    // The owner reads at replica 0 and acks the first message only.
    let (mailbox, device) = (net.mailbox(), net.device());
    let page = net.cores[0]
        .fetch(at(2), &mailbox, &device, None, 100)
        .unwrap();
    let first = page
        .iter()
        .find(|m| matches!(&m.body, MessageBody::Envelope(b) if Envelope::decode(b).unwrap().outer.dedup_id == e1.outer.dedup_id))
        .unwrap()
        .seq;
    net.cores[0].ack(&mailbox, &device, first).unwrap();
    net.pump(at(2));
    for i in 0..3 {
        assert_eq!(net.stored(i), 1, "node {i}");
        assert_eq!(net.served(i, at(3)), BTreeSet::from([e2.outer.dedup_id.0]));
    }
    // A late push of the deleted message (a retransmission): acknowledged, not stored.
    net.deposit(1, &e1, at(4));
    net.pump(at(4));
    for i in 0..3 {
        assert_eq!(net.stored(i), 1, "node {i}");
    }
    assert_eq!(net.receipts[1].len(), 1);
}

#[test]
fn a_replica_restarted_with_an_empty_disk_is_repaired() {
    let mut net = Net::new();
    let mut ids = BTreeSet::new();
    for k in 0..5 {
        let e = net.envelope(None, true);
        ids.insert(e.outer.dedup_id.0);
        net.deposit(k % 3, &e, at(1));
    }
    net.pump(at(1));
    // One acked and deleted before the disk loss: it must not come back.
    let (mailbox, device) = (net.mailbox(), net.device());
    let page = net.cores[0]
        .fetch(at(2), &mailbox, &device, None, 1)
        .unwrap();
    net.cores[0].ack(&mailbox, &device, page[0].seq).unwrap();
    net.pump(at(2));
    let MessageBody::Envelope(b) = &page[0].body else {
        panic!()
    };
    ids.remove(&Envelope::decode(b).unwrap().outer.dedup_id.0);
    assert_eq!(net.served(1, at(3)), ids);

    net.wipe(1, at(10));
    assert!(net.cores[1].info(&mailbox).is_err());
    // Anti-entropy rounds: the record first (owner signature checked), then the messages.
    let mut now = 10;
    for _ in 0..5 {
        now += REPAIR;
        net.tick(at(now));
    }
    assert_eq!(net.cores[1].replica_stats().records_repaired, 1);
    assert_eq!(
        net.served(1, at(now)),
        ids,
        "the same messages, the acked one not back"
    );
    assert_eq!(net.stored(1), 4);
    // And it serves them with the same ids as the others.
    assert_eq!(net.served(0, at(now)), net.served(1, at(now)));
    assert_eq!(net.served(2, at(now)), net.served(1, at(now)));
}

#[test]
fn an_acknowledged_message_missed_by_a_down_replica_is_deleted_there_by_repair() {
    let mut net = Net::new();
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    net.up[2] = false;
    let (mailbox, device) = (net.mailbox(), net.device());
    let page = net.cores[0]
        .fetch(at(2), &mailbox, &device, None, 10)
        .unwrap();
    net.cores[0].ack(&mailbox, &device, page[0].seq).unwrap();
    net.pump(at(2));
    assert_eq!(net.stored(2), 1, "replica 2 missed the ack");
    net.up[2] = true;
    let mut now = 2;
    for _ in 0..4 {
        now += REPAIR;
        net.tick(at(now));
    }
    for i in 0..3 {
        assert_eq!(net.stored(i), 0, "node {i}");
        assert!(net.served(i, at(now)).is_empty());
    }
    assert!(net.cores[2].replica_stats().tombstones_applied >= 1);
}

#[test]
fn an_expired_message_is_neither_served_nor_repaired() {
    let mut net = Net::new();
    let e = net.envelope(Some(at(3_000)), true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    net.wipe(2, at(10));
    // The 3 s asked for, rounded up to `expiry_granularity_ms` (1 hour; T0 is on an hour).
    let mut now = CoreConfig::default().expiry_granularity_ms;
    for _ in 0..5 {
        now += REPAIR;
        net.tick(at(now));
    }
    assert_eq!(net.cores[2].replica_stats().records_repaired, 1);
    assert_eq!(net.stored(2), 0);
    for i in 0..3 {
        assert!(net.served(i, at(now)).is_empty());
    }
    // A push of an expired message is refused.
    let MessageBody::Envelope(body) = net.cores[0].export(at(1), &net.mailbox()).unwrap().1[0]
        .body
        .clone()
    else {
        panic!()
    };
    let push = ReplicaMessage::Push {
        mailbox_id: net.mailbox(),
        items: vec![PushItem {
            id: e.outer.dedup_id.0,
            kind: MessageKind::Envelope,
            expires_at: at(3_000),
            body,
        }],
    };
    net.cores[2]
        .handle_replica(at(now), node_id(0), push)
        .unwrap();
    assert_eq!(net.stored(2), 0);
}

#[test]
fn a_push_from_a_node_outside_the_replica_set_is_refused() {
    let mut net = Net::new();
    let e = net.envelope(None, false);
    let mut stored = e.clone();
    stored.outer.access_token = whispr_protocol::AccessToken([0; 32]);
    let push = ReplicaMessage::Push {
        mailbox_id: net.mailbox(),
        items: vec![PushItem {
            id: e.outer.dedup_id.0,
            kind: MessageKind::Envelope,
            expires_at: at(60_000),
            body: stored.encode(),
        }],
    };
    let stranger = NodeId([0x99; 32]);
    net.cores[1]
        .handle_replica(at(1), stranger, push.clone())
        .unwrap();
    assert_eq!(net.stored(1), 0);
    assert_eq!(net.cores[1].replica_stats().refused, 1);
    // No PushAck went back to it.
    assert!(net.cores[1].poll_output().is_none());
    // The same push from a member is stored and acknowledged.
    net.cores[1]
        .handle_replica(at(1), node_id(0), push)
        .unwrap();
    assert_eq!(net.stored(1), 1);
    let outputs: Vec<Output> = std::iter::from_fn(|| net.cores[1].poll_output()).collect();
    assert!(outputs.iter().any(|o| matches!(
        o,
        Output::Replica {
            message: ReplicaMessage::PushAck { .. },
            peer,
        } if *peer == node_id(0)
    )));
}

#[test]
fn a_record_with_a_forged_signature_is_not_recreated() {
    let mut net = Net::new();
    net.wipe(1, at(1));
    // A member hands a record whose replica set was altered: the owner's signature fails.
    let mut copy = None;
    let mailbox = net.mailbox();
    net.cores[0]
        .handle_replica(
            at(2),
            node_id(1),
            ReplicaMessage::RecordRequest {
                mailbox_ids: vec![mailbox],
            },
        )
        .unwrap();
    while let Some(o) = net.cores[0].poll_output() {
        if let Output::Replica {
            message: ReplicaMessage::Records { records },
            ..
        } = o
        {
            copy = records.into_iter().next();
        }
    }
    let mut forged = copy.expect("a record for a replica");
    forged.create.retention_ms += 1;
    net.cores[1]
        .handle_replica(
            at(3),
            node_id(0),
            ReplicaMessage::Records {
                records: vec![forged],
            },
        )
        .unwrap();
    assert!(net.cores[1].info(&net.mailbox()).is_err());
    assert_eq!(net.cores[1].replica_stats().records_refused, 1);
}

#[test]
fn a_second_device_sees_at_a_peer_only_what_it_did_not_acknowledge() {
    let mut net = Net::new();
    let device2 = net.owner.device(1);
    let sig = net.owner.sign_device(&device2);
    let d2 = device2.verifying_key().to_bytes();
    let mailbox = net.mailbox();
    net.cores[0].add_device(&mailbox, d2, &sig).unwrap();
    net.pump(at(1));
    assert!(
        net.cores[2].is_device(&mailbox, &d2),
        "registration replicated"
    );
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(2));
    net.pump(at(2));
    // Device 2 reads and acks at replica 0; the owner device has not.
    let page = net.cores[0].fetch(at(3), &mailbox, &d2, None, 10).unwrap();
    net.cores[0].ack(&mailbox, &d2, page[0].seq).unwrap();
    net.pump(at(3));
    // At replica 1, device 2 (failing over) gets nothing again, the owner still gets it.
    assert!(
        net.cores[1]
            .fetch(at(4), &mailbox, &d2, None, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(net.served(1, at(4)), BTreeSet::from([e.outer.dedup_id.0]));
    // The owner device acks at replica 1: deleted everywhere.
    let page = net.cores[1]
        .fetch(at(5), &mailbox, &net.device(), None, 10)
        .unwrap();
    let device = net.device();
    net.cores[1].ack(&mailbox, &device, page[0].seq).unwrap();
    net.pump(at(5));
    for i in 0..3 {
        assert_eq!(net.stored(i), 0, "node {i}");
    }
}

#[test]
fn erasure_reaches_every_replica_and_is_not_repaired_back() {
    let mut net = Net::new();
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    net.up[2] = false;
    let mailbox = net.mailbox();
    net.cores[0].erase(&mailbox).unwrap();
    net.pump(at(2));
    assert!(net.cores[1].info(&mailbox).is_err());
    assert!(net.cores[2].info(&mailbox).is_ok(), "was down");
    net.up[2] = true;
    let mut now = 2;
    for _ in 0..4 {
        now += REPAIR;
        net.tick(at(now));
    }
    for i in 0..3 {
        assert!(net.cores[i].info(&mailbox).is_err(), "node {i}");
    }
}

#[test]
fn a_replicated_mailbox_must_name_this_node() {
    let mut net = Net::new();
    let other = Owner::from_seed(12);
    let replicas = vec![node_id(1), node_id(2)];
    let req = other.create_request_replicated(60_000, &replicas);
    assert!(net.cores[0].create_replicated(T0, req, replicas).is_err());
    // A v1 request's signature does not pass as v2.
    let req = other.create_request(60_000);
    let replicas = vec![node_id(0)];
    assert!(net.cores[0].create_replicated(T0, req, replicas).is_err());
    let _ = &mut net;
}

#[test]
fn acknowledgements_from_peers_and_tombstones_survive_a_restart() {
    let mut net = Net::new();
    let device2 = net.owner.device(1);
    let sig = net.owner.sign_device(&device2);
    let d2 = device2.verifying_key().to_bytes();
    let mailbox = net.mailbox();
    net.cores[0].add_device(&mailbox, d2, &sig).unwrap();
    net.pump(at(1));
    let e1 = net.envelope(None, true);
    let e2 = net.envelope(None, true);
    net.deposit(0, &e1, at(2));
    net.deposit(0, &e2, at(2));
    net.pump(at(2));
    // Device 2 acks both at replica 0; the owner device acks the first at replica 0 too.
    let page = net.cores[0].fetch(at(3), &mailbox, &d2, None, 10).unwrap();
    net.cores[0].ack(&mailbox, &d2, page[1].seq).unwrap();
    let device = net.device();
    net.cores[0].ack(&mailbox, &device, page[0].seq).unwrap();
    net.pump(at(3));
    net.restart(1, at(4));
    // At replica 1 after its restart: device 2 still sees nothing, the owner only the second,
    // and the first (deleted) is not stored again when pushed.
    assert!(
        net.cores[1]
            .fetch(at(5), &mailbox, &d2, None, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(net.stored(1), 1);
    net.deposit(2, &e1, at(6));
    net.pump(at(6));
    assert_eq!(net.stored(1), 1);
    assert_eq!(
        net.cores[1]
            .fetch(at(7), &mailbox, &device, None, 10)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn the_held_receipt_table_is_bounded() {
    let mut net = Net::new();
    net.up[1] = false;
    net.up[2] = false;
    // Reopen replica 0 with room for one held receipt.
    let store = net.stores[0].clone();
    net.cores[0] = MailboxCore::open(
        CoreConfig {
            replica_held_max: 1,
            ..config(0)
        },
        store,
        MasterKey::from_bytes(&[0x40; 32]),
        ChaCha20Rng::seed_from_u64(SEEDS.fetch_add(1, Ordering::Relaxed)),
        at(1),
    )
    .unwrap();
    let e1 = net.envelope(None, true);
    let e2 = net.envelope(None, true);
    net.deposit(0, &e1, at(2));
    net.deposit(0, &e2, at(2));
    net.pump(at(2));
    assert_eq!(net.cores[0].receipts_held(), 1);
    assert_eq!(net.cores[0].replica_stats().receipts_dropped, 1);
    assert!(net.receipts[0].is_empty());
}

#[test]
fn a_removed_device_is_removed_on_every_replica() {
    let mut net = Net::new();
    let device2 = net.owner.device(1);
    let sig = net.owner.sign_device(&device2);
    let d2 = device2.verifying_key().to_bytes();
    let mailbox = net.mailbox();
    net.cores[0].add_device(&mailbox, d2, &sig).unwrap();
    net.pump(at(1));
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(2));
    net.pump(at(2));
    // The owner device acks at replica 1: device 2 still holds the message everywhere.
    let device = net.device();
    let page = net.cores[1]
        .fetch(at(3), &mailbox, &device, None, 10)
        .unwrap();
    net.cores[1].ack(&mailbox, &device, page[0].seq).unwrap();
    net.pump(at(3));
    for i in 0..3 {
        assert_eq!(net.stored(i), 1, "node {i}");
    }
    // Device 2 is removed at replica 2: it can log in nowhere, and the message only it had
    // not acknowledged goes everywhere.
    net.cores[2].remove_device(&mailbox, &d2).unwrap();
    net.pump(at(4));
    for i in 0..3 {
        assert!(!net.cores[i].is_device(&mailbox, &d2), "node {i}");
        assert_eq!(net.stored(i), 0, "node {i}");
    }
}

/// Issue 16 ("device registrations cannot be replayed"): the owner's signature over a device
/// registration names only the mailbox and the key, so once the device was removed, any device
/// session could register it again with the old signature, and a replica that missed the
/// removal handed the old registration back to its peers, which took it.
#[test]
fn a_removed_device_is_not_registered_again_by_a_replayed_registration() {
    let mut net = Net::new();
    let device2 = net.owner.device(1);
    let sig = net.owner.sign_device(&device2);
    let d2 = device2.verifying_key().to_bytes();
    let mailbox = net.mailbox();
    net.cores[0].add_device(&mailbox, d2, &sig).unwrap();
    net.pump(at(1));
    // What replica 1 hands its peers for this mailbox (device 2's registration included).
    net.cores[1]
        .handle_replica(
            at(1),
            node_id(0),
            ReplicaMessage::RecordRequest {
                mailbox_ids: vec![mailbox],
            },
        )
        .unwrap();
    let mut copy = None;
    while let Some(o) = net.cores[1].poll_output() {
        if let Output::Replica {
            message: ReplicaMessage::Records { records },
            ..
        } = o
        {
            copy = records.into_iter().next();
        }
    }
    let copy = copy.expect("a record copy");
    assert_eq!(copy.devices.len(), 1);
    // Replica 1 is down while device 2 is removed at replica 2.
    net.up[1] = false;
    net.cores[2].remove_device(&mailbox, &d2).unwrap();
    net.pump(at(2));
    assert!(!net.cores[0].is_device(&mailbox, &d2));
    // Replayed through the API (any device's session can post a registration).
    let replayed = net.cores[0].add_device(&mailbox, d2, &sig);
    assert!(
        replayed.is_err() && !net.cores[0].is_device(&mailbox, &d2),
        "the removed device was registered again with its old signature: {replayed:?}"
    );
    // Replayed by the replica that missed the removal.
    net.up[1] = true;
    net.cores[0]
        .handle_replica(
            at(3),
            node_id(1),
            ReplicaMessage::Records {
                records: vec![copy],
            },
        )
        .unwrap();
    assert!(
        !net.cores[0].is_device(&mailbox, &d2),
        "a stale replica's record registered the removed device again"
    );
    // Survives a restart.
    net.restart(2, at(4));
    assert!(net.cores[2].add_device(&mailbox, d2, &sig).is_err());
}

/// `n` more mailboxes on all three replicas, one message each deposited at node 0 (no
/// receipt asked), pushed to the others.
fn many_mailboxes(net: &mut Net, n: u64) -> Vec<MailboxId> {
    let replicas: Vec<NodeId> = (0..3).map(node_id).collect();
    let mut ids = Vec::new();
    for k in 0..n {
        let owner = Owner::from_seed(1_000 + k);
        for core in &mut net.cores {
            let req = owner.create_request_replicated(24 * 3_600_000, &replicas);
            core.create_replicated(T0, req, replicas.clone()).unwrap();
        }
        let dedup = DedupId::random(&mut net.rng);
        let e = owner
            .envelope(&mut net.rng, dedup, None, None, b"hi")
            .unwrap();
        let r = net.cores[0].deposit_many(at(1), vec![Incoming::Deposit(e)]);
        r[0].as_ref().unwrap();
        ids.push(owner.mailbox_id);
    }
    net.pump(at(1));
    ids
}

#[test]
fn a_wiped_replica_of_a_thousand_mailboxes_is_whole_after_three_rounds() {
    let mut net = Net::new();
    many_mailboxes(&mut net, 1_000);
    assert_eq!(net.cores[1].stats().mailboxes, 1_001);
    assert_eq!(net.stored(1), 1_000);
    net.wipe(1, at(10));
    let mut now = 10;
    for _ in 0..3 {
        now += REPAIR;
        net.tick(at(now));
    }
    // Before summaries: 64 mailboxes digested per node per round, so three rounds brought
    // back at most 384 of the 1,001 mailboxes.
    assert_eq!(
        net.cores[1].stats().mailboxes,
        1_001,
        "mailboxes repaired in three rounds"
    );
    assert_eq!(net.stored(1), 1_000, "messages repaired in three rounds");
}

#[test]
fn a_quiet_round_sends_one_summary_per_peer_and_scans_nothing() {
    let mut net = Net::new();
    many_mailboxes(&mut net, 200);
    // Converge, then count one more round.
    let mut now = 10;
    for _ in 0..2 {
        now += REPAIR;
        net.tick(at(now));
    }
    let computed: u64 = (0..3)
        .map(|i| net.cores[i].replica_stats().digests_computed)
        .sum();
    now += REPAIR;
    net.assert_quiet_round(now);
    let after: u64 = (0..3)
        .map(|i| net.cores[i].replica_stats().digests_computed)
        .sum();
    assert_eq!(after, computed, "no mailbox rescanned when nothing changed");
    // A deposit then changes one bucket: only that mailbox is scanned again, and the
    // replicas agree without any pull.
    let e = net.envelope(None, false);
    net.deposit(0, &e, at(now));
    net.pump(at(now));
    let pulled: u64 = (0..3).map(|i| net.cores[i].replica_stats().pulled).sum();
    now += REPAIR;
    net.tick(at(now));
    let rescanned: u64 = (0..3)
        .map(|i| net.cores[i].replica_stats().digests_computed)
        .sum::<u64>()
        - after;
    assert_eq!(rescanned, 3, "the changed mailbox, once per replica");
    assert_eq!(
        (0..3)
            .map(|i| net.cores[i].replica_stats().pulled)
            .sum::<u64>(),
        pulled,
        "the push already made them agree"
    );
}

#[test]
fn an_erasure_survives_restarts_and_reaches_the_replica_that_missed_it() {
    let mut net = Net::new();
    let e = net.envelope(None, true);
    net.deposit(0, &e, at(1));
    net.pump(at(1));
    net.up[2] = false;
    let mailbox = net.mailbox();
    net.cores[0].erase(&mailbox).unwrap();
    net.pump(at(2));
    assert!(net.cores[1].info(&mailbox).is_err());
    // Both nodes that erased it restart before the third comes back.
    net.restart(0, at(3));
    net.restart(1, at(3));
    net.up[2] = true;
    let mut now = 3;
    for _ in 0..4 {
        now += REPAIR;
        net.tick(at(now));
    }
    // Before: the erasures were remembered in memory only, so the restarted nodes asked the
    // third for the mailbox's record and recreated it.
    for i in 0..3 {
        assert!(net.cores[i].info(&mailbox).is_err(), "node {i} holds it");
    }
}

#[test]
fn the_shared_mailbox_index_follows_an_erasure_and_a_creation_between_rounds() {
    let mut net = Net::new();
    let ids = many_mailboxes(&mut net, 50);
    let mut now = 10;
    for _ in 0..2 {
        now += REPAIR;
        net.tick(at(now));
    }
    // One mailbox leaves and another comes between two rounds: every node holds as many
    // mailboxes as before, and the index of what each peer shares must still follow (a
    // stale one makes the summary a node compares differ from the one it sends, and the
    // digests go back and forth every round).
    net.cores[0].erase(&ids[0]).unwrap();
    net.pump(at(now));
    let replicas: Vec<NodeId> = (0..3).map(node_id).collect();
    let owner = Owner::from_seed(9_999);
    for core in &mut net.cores {
        let req = owner.create_request_replicated(24 * 3_600_000, &replicas);
        core.create_replicated(at(now), req, replicas.clone())
            .unwrap();
    }
    for _ in 0..2 {
        now += REPAIR;
        net.tick(at(now));
    }
    now += REPAIR;
    net.assert_quiet_round(now);
}
