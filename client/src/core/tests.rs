//! Core unit tests: inputs in, outputs checked, no I/O, fixed seeds. A small in-test network
//! (one edge, three mixes, six mailbox nodes, one timer node, real Sphinx keys) peels the
//! core's packets hop by hop and plays the mailbox and timer nodes, acknowledging through the
//! SURBs the packets carry. By default every mailbox is one store (ideal replication); with
//! `replicated` each mailbox node keeps its own copy, numbered by its own sequence, as
//! replicas do (`docs/replication.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use whispr_protocol::directory::{Directory, NodeDescriptor, Role};
use whispr_protocol::envelope::{Envelope, EnvelopeContent, MailboxSecretKey, OuterFields};
use whispr_protocol::fragment::fragment_message;
use whispr_protocol::payload::{FinalMessage, HeldPacketPart, Reply};
use whispr_protocol::sphinx::{
    HopAction, SphinxPublicKey, SphinxSecretKey, Surb, process_packet, use_surb,
};
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, KEY_EPOCH_LEN, KeyEpoch, MailboxId, MessageId,
    NodeId, UnixTime,
};

use super::*;
use crate::state::{OutFragment, Outgoing};

const T0: u64 = 1_800_000_000_000;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What reached a final hop.
#[derive(Debug)]
enum Arrival {
    /// A forward packet's payload at `node`.
    Final {
        node: NodeId,
        message: FinalMessage,
        path: Vec<NodeId>,
    },
    /// A SURB reply for mailbox `mailbox`, at `node`.
    Reply {
        node: NodeId,
        mailbox: [u8; 32],
        surb_id: String,
        sealed: Vec<u8>,
    },
}

struct TestNet {
    directory: Directory,
    descriptors: Vec<whispr_protocol::directory::SignedDescriptor>,
    keys: BTreeMap<NodeId, SphinxSecretKey>,
    edge: NodeId,
    mixes: Vec<NodeId>,
    timer: NodeId,
    /// Stored messages by mailbox id.
    boxes: BTreeMap<[u8; 32], Vec<StoredMessage>>,
    seq: u64,
    /// Whether the mailbox and timer nodes acknowledge through the SURBs they get.
    acks: bool,
    /// A malicious edge: it drops the client packets whose next hop is one of these.
    edge_drops: Vec<NodeId>,
    /// The mailbox nodes.
    mailbox_nodes: Vec<NodeId>,
    /// Mailbox nodes that drop everything they get (down, or broken): no store, no ack.
    dead: Vec<NodeId>,
    /// Each mailbox node keeps its own copy of each mailbox (`replicas`); reads and acks go
    /// to one node.
    replicated: bool,
    /// Per (node, mailbox): what that node stores, numbered by its own sequence. Every live
    /// mailbox node gets a copy of each deposit (the entry replica pushes to its peers).
    replicas: BTreeMap<(NodeId, [u8; 32]), Vec<StoredMessage>>,
    /// Per node: its last sequence number.
    node_seq: BTreeMap<NodeId, u64>,
    /// An ack on one node deletes the acknowledged messages on its peers too.
    propagate_acks: bool,
}

impl TestNet {
    fn new() -> TestNet {
        let epoch = KeyEpoch::containing(UnixTime(T0), KEY_EPOCH_LEN);
        let mut rng = StdRng::seed_from_u64(7);
        let mut keys = BTreeMap::new();
        let mut descriptors = Vec::new();
        let mut ids = Vec::new();
        let kinds = [
            (Role::Edge, 0),
            (Role::Mix, 1),
            (Role::Mix, 1),
            (Role::Mix, 1),
            (Role::Mailbox, 0),
            (Role::Timer, 0),
            (Role::Mailbox, 0),
            (Role::Mailbox, 0),
            (Role::Mailbox, 0),
            (Role::Mailbox, 0),
            (Role::Mailbox, 0),
        ];
        for (role, layer) in kinds {
            let identity = SigningKey::generate(&mut rng);
            let id = NodeId(identity.verifying_key().to_bytes());
            // One key serves every epoch of the test (a few hours at most).
            let secret = SphinxSecretKey::random_from_rng(&mut rng);
            let public = SphinxPublicKey::from(&secret);
            let sphinx_keys = (0..4).map(|i| (KeyEpoch(epoch.0 + i), public)).collect();
            keys.insert(id, secret);
            descriptors.push(
                NodeDescriptor {
                    node_id: id,
                    peer_id: id.libp2p_peer_id_bytes(),
                    roles: BTreeSet::from([role]),
                    mix_layer: layer,
                    addresses: Vec::new(),
                    api_url: Some(format!("http://node-{}", ids.len())),
                    sphinx_keys,
                    published_at: UnixTime(T0 - 1000),
                    expires_at: UnixTime(T0 + 86_400_000),
                }
                .sign(&identity)
                .unwrap(),
            );
            ids.push(id);
        }
        let (directory, rejected) = Directory::build(UnixTime(T0), &descriptors);
        assert!(rejected.is_empty());
        TestNet {
            directory,
            descriptors,
            keys,
            edge: ids[0],
            mixes: ids[1..4].to_vec(),
            timer: ids[5],
            boxes: BTreeMap::new(),
            seq: 0,
            acks: true,
            edge_drops: Vec::new(),
            mailbox_nodes: [&ids[4..5], &ids[6..]].concat(),
            dead: Vec::new(),
            replicated: false,
            replicas: BTreeMap::new(),
            node_seq: BTreeMap::new(),
            propagate_acks: true,
        }
    }

    /// Grinds keys until a new mailbox node wins rendezvous placement for `mailbox`, and
    /// publishes it (finding 3 of the security review); its id.
    fn add_node_winning(&mut self, mailbox: &MailboxId) -> NodeId {
        let epoch = KeyEpoch::containing(UnixTime(T0), KEY_EPOCH_LEN);
        let mut rng = StdRng::seed_from_u64(1234);
        loop {
            let identity = SigningKey::generate(&mut rng);
            let id = NodeId(identity.verifying_key().to_bytes());
            let secret = SphinxSecretKey::random_from_rng(&mut rng);
            let public = SphinxPublicKey::from(&secret);
            let descriptor = NodeDescriptor {
                node_id: id,
                peer_id: id.libp2p_peer_id_bytes(),
                roles: BTreeSet::from([Role::Mailbox]),
                mix_layer: 0,
                addresses: Vec::new(),
                api_url: Some("http://rogue".into()),
                sphinx_keys: (0..4).map(|i| (KeyEpoch(epoch.0 + i), public)).collect(),
                published_at: UnixTime(T0 - 1000),
                expires_at: UnixTime(T0 + 86_400_000),
            }
            .sign(&identity)
            .unwrap();
            let mut all = self.descriptors.clone();
            all.push(descriptor);
            let (directory, _) = Directory::build(UnixTime(T0), &all);
            if directory.mailbox_replicas(mailbox, 1) == [id] {
                self.keys.insert(id, secret);
                self.descriptors = all;
                self.directory = directory;
                return id;
            }
        }
    }

    fn core(&self, seed: u64) -> ClientCore {
        let settings = Settings {
            mix_delay_ms: 0,
            ..Settings::default()
        };
        let mut c = ClientCore::new(
            "http://directory",
            settings,
            StdRng::seed_from_u64(seed),
            StdRng::seed_from_u64(seed + 1000),
        );
        c.set_directory(Arc::new(self.directory.clone()));
        c
    }

    /// Peels `packet` from `first` to its final hop.
    fn carry(&self, first: NodeId, packet: &[u8]) -> Arrival {
        let mut node = first;
        let mut bytes = packet.to_vec();
        let mut path = vec![node];
        loop {
            let key = &self.keys[&node];
            let processed = process_packet(&[key], &bytes).unwrap();
            match processed.action {
                HopAction::Forward {
                    next_hop, packet, ..
                } => {
                    node = next_hop;
                    path.push(node);
                    bytes = packet.into_bytes();
                }
                HopAction::Deliver {
                    destination,
                    plaintext,
                } => {
                    return Arrival::Final {
                        node,
                        message: FinalMessage::decode_for(destination, &plaintext).unwrap(),
                        path,
                    };
                }
                HopAction::DeliverSurbReply {
                    destination,
                    surb_id,
                    sealed,
                } => {
                    return Arrival::Reply {
                        node,
                        mailbox: destination.0,
                        surb_id: hex::encode(surb_id.as_bytes()),
                        sealed,
                    };
                }
            }
        }
    }

    fn store(&mut self, mailbox: [u8; 32], mut msg: StoredMessage) {
        self.seq += 1;
        msg.seq = self.seq;
        self.boxes.entry(mailbox).or_default().push(msg.clone());
        // Each live node numbers its copy with its own sequence (far apart, so that a cursor
        // of one node means nothing on another).
        for (i, n) in self.mailbox_nodes.clone().into_iter().enumerate() {
            if self.dead.contains(&n) {
                continue;
            }
            let seq = self.node_seq.entry(n).or_insert(1_000_000 * i as u64);
            *seq += 1;
            msg.seq = *seq;
            self.replicas
                .entry((n, mailbox))
                .or_default()
                .push(msg.clone());
        }
    }

    /// Sends `reply` through `surb` into its creator's mailbox.
    fn reply(&mut self, surb: &Surb, reply: Reply) -> Arrival {
        let (first, packet) = use_surb(surb, &reply.encode().unwrap()).unwrap();
        self.arrive(first, packet.as_bytes())
    }

    /// A packet reaches `first`: carried to its end and acted on as the nodes would.
    fn arrive(&mut self, first: NodeId, packet: &[u8]) -> Arrival {
        let arrival = self.carry(first, packet);
        let at = match &arrival {
            Arrival::Reply { node, .. } | Arrival::Final { node, .. } => *node,
        };
        if self.dead.contains(&at) {
            return arrival;
        }
        match &arrival {
            Arrival::Reply {
                mailbox,
                surb_id,
                sealed,
                ..
            } => self.store(
                *mailbox,
                StoredMessage {
                    seq: 0,
                    kind: "surb_reply".into(),
                    envelope: None,
                    surb_id: Some(surb_id.clone()),
                    payload: Some(B64.encode(sealed)),
                    expires_at_ms: None,
                },
            ),
            Arrival::Final { message, .. } => match message.clone() {
                FinalMessage::Deposit(mut e) => {
                    let surb = e.outer.ack_surb.take();
                    let (mailbox, dedup_id) = (e.outer.mailbox_id.0, e.outer.dedup_id);
                    self.store(
                        mailbox,
                        StoredMessage {
                            seq: 0,
                            kind: "envelope".into(),
                            envelope: Some(B64.encode(e.encode())),
                            surb_id: None,
                            payload: None,
                            expires_at_ms: None,
                        },
                    );
                    if let (Some(s), true) = (surb, self.acks) {
                        let expires_at = UnixTime(T0 + 86_400_000);
                        self.reply(
                            &s,
                            Reply::DepositAck {
                                dedup_id,
                                expires_at,
                            },
                        );
                    }
                }
                FinalMessage::Hold(part) => {
                    if let (Some(s), true) = (part.ack_surb.clone(), self.acks) {
                        let hold_id = part.hold_id;
                        self.reply(
                            &s,
                            Reply::HoldAck {
                                hold_id,
                                cancelled: false,
                            },
                        );
                    }
                }
                FinalMessage::Cancel(c) => {
                    if let (Some(s), true) = (c.ack_surb.clone(), self.acks) {
                        self.reply(
                            &s,
                            Reply::HoldAck {
                                hold_id: c.hold_id,
                                cancelled: true,
                            },
                        );
                    }
                }
                FinalMessage::PrekeyRequest(_) => {}
            },
        }
        arrival
    }

    /// Takes every output of `core`: packets are carried (and acted on), acks delete.
    fn run(&mut self, core: &mut ClientCore) -> Vec<Arrival> {
        let mut out = Vec::new();
        while let Some(o) = core.poll_output() {
            match o {
                Output::Transmit { edge, packet } => {
                    assert_eq!(edge, self.edge, "clients enter through an edge");
                    if !self.edge_drops.is_empty()
                        && let Arrival::Final { path, .. } = self.carry(edge, &packet)
                        && path.get(1).is_some_and(|n| self.edge_drops.contains(n))
                    {
                        // Dropped by the edge; the client was told "ok".
                        out.push(self.carry(edge, &packet));
                        continue;
                    }
                    out.push(self.arrive(edge, &packet));
                }
                Output::Save => {}
                Output::Ack {
                    mailbox,
                    node,
                    up_to,
                } => {
                    if !self.replicated {
                        if let Some(b) = self.boxes.get_mut(&mailbox) {
                            b.retain(|m| m.seq > up_to);
                        }
                        continue;
                    }
                    assert!(!self.dead.contains(&NodeId(node)), "acked on a dead node");
                    let Some(b) = self.replicas.get_mut(&(NodeId(node), mailbox)) else {
                        continue;
                    };
                    let (gone, kept): (Vec<StoredMessage>, Vec<StoredMessage>) =
                        b.drain(..).partition(|m| m.seq <= up_to);
                    *b = kept;
                    if self.propagate_acks {
                        let same = |a: &StoredMessage, b: &StoredMessage| {
                            (&a.envelope, &a.surb_id) == (&b.envelope, &b.surb_id)
                        };
                        for ((_, m), msgs) in self.replicas.iter_mut() {
                            if *m == mailbox {
                                msgs.retain(|x| !gone.iter().any(|g| same(g, x)));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// `core` fetches every mailbox it owns (from the replica it reads, failing over from a
    /// dead one as the driver does, when `replicated`).
    fn fetch(&mut self, core: &mut ClientCore, now: u64) {
        for m in core.owned_mailboxes() {
            if !self.replicated {
                let messages = self.boxes.get(&m.id).cloned().unwrap_or_default();
                core.handle_fetched(now, &m.id, &messages);
                continue;
            }
            let mut node = m.current().unwrap().node;
            for _ in 0..m.replicas.len() {
                if !self.dead.contains(&NodeId(node)) {
                    break;
                }
                node = core.fail_over(&m.id).unwrap();
            }
            if self.dead.contains(&NodeId(node)) {
                continue;
            }
            let messages = self
                .replicas
                .get(&(NodeId(node), m.id))
                .cloned()
                .unwrap_or_default();
            core.handle_fetched_from(now, &m.id, &node, &messages);
        }
    }

    /// Alice (seed 1) invites, bob (seed 2) accepts; both established.
    fn pair(&mut self) -> (ClientCore, ClientCore) {
        self.pair_seeded(1, 2)
    }

    fn pair_seeded(&mut self, a: u64, b: u64) -> (ClientCore, ClientCore) {
        let mut alice = self.core(a);
        let mut bob = self.core(b);
        let mut plan = alice.prepare_invite(T0, Some("bob"), true).unwrap();
        // What the driver does: the mailbox is created on every replica.
        created(&mut plan.mailbox);
        let text = alice.commit_invite(T0, plan);
        let mut accept = bob.accept_start(T0, &text, "alice").unwrap();
        created(&mut accept.mailbox);
        bob.mailbox_created(&accept.mailbox);
        let otk = accept.invitation.one_time_key.unwrap();
        bob.accept_finish(T0, "alice", &accept.invitation, otk)
            .unwrap();
        self.run(&mut bob);
        self.fetch(&mut alice, T0 + 100);
        self.run(&mut alice);
        self.fetch(&mut bob, T0 + 100);
        self.run(&mut bob);
        let states = |c: &ClientCore| {
            c.contacts()
                .into_iter()
                .map(|i| i.state)
                .collect::<Vec<_>>()
        };
        assert_eq!(states(&alice), ["established"]);
        // Bob hears from alice with her first message.
        assert_eq!(states(&bob), ["waiting"]);
        alice.take_notices();
        bob.take_notices();
        (alice, bob)
    }
}

/// Records `m` as created on each of its replicas, its prekeys uploaded (as the driver does).
fn created(m: &mut OwnedMailbox) {
    for r in &mut m.replicas {
        r.created = true;
        r.prekeys = None;
    }
}

fn deposits(arrivals: &[Arrival]) -> Vec<&Envelope> {
    arrivals
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                message: FinalMessage::Deposit(e),
                ..
            } => Some(e),
            _ => None,
        })
        .collect()
}

fn kinds(notices: &[Notice]) -> Vec<&str> {
    notices.iter().map(|n| n.kind.as_str()).collect()
}

#[test]
fn a_message_to_a_contact_whose_window_is_full_waits_for_an_ack() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    alice.settings_mut().olm_window = 1;
    net.acks = false;
    let first = alice
        .send(T0 + 1000, "bob", "one", SendOptions::default())
        .unwrap();
    let second = alice
        .send(T0 + 1001, "bob", "two", SendOptions::default())
        .unwrap();
    let sent = net.run(&mut alice);
    assert_eq!(deposits(&sent).len(), 1, "only the first message goes out");
    assert_eq!(alice.out_state(second), Some(OutState::Sending));
    assert!(
        alice
            .status()
            .iter()
            .any(|o| o.id == second && o.retransmissions == 0),
        "the second is not sent"
    );
    // Still nothing for the second at a timeout before the first is acknowledged.
    alice.handle_timeout(T0 + 2000).unwrap();
    assert!(deposits(&net.run(&mut alice)).is_empty());
    // From now on the mailbox node acknowledges; the first is retransmitted when due (not
    // the second) and acknowledged, which opens the window.
    net.acks = true;
    alice
        .handle_timeout(T0 + 1000 + alice.settings().retransmit_after_ms)
        .unwrap();
    let resent = net.run(&mut alice);
    assert_eq!(
        deposits(&resent).len(),
        1,
        "the first is retransmitted, not the second"
    );
    net.fetch(&mut alice, T0 + 12_000);
    assert_eq!(alice.out_state(first), Some(OutState::Stored));
    assert!(alice.poll_timeout().is_some_and(|t| t <= T0 + 12_000));
    alice.handle_timeout(T0 + 12_000).unwrap();
    let next = net.run(&mut alice);
    assert_eq!(deposits(&next).len(), 1, "the ack let the second go");
    net.fetch(&mut bob, T0 + 13_000);
    let texts: Vec<String> = bob.take_unread().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["one", "two"]);
}

#[test]
fn an_overdue_fragment_is_resent_on_a_fresh_route_with_the_same_dedup_id() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    net.acks = false;
    let id = alice
        .send(T0 + 1000, "bob", "hello", SendOptions::default())
        .unwrap();
    let first = net.run(&mut alice);
    let Arrival::Final {
        path,
        message: FinalMessage::Deposit(e1),
        ..
    } = &first[0]
    else {
        panic!("a deposit")
    };
    let lost_mix = path[1];
    assert!(net.mixes.contains(&lost_mix));
    let after = alice.settings().retransmit_after_ms;
    // Not before it is due.
    alice.handle_timeout(T0 + 1000 + after - 1).unwrap();
    assert!(net.run(&mut alice).is_empty());
    assert_eq!(alice.poll_timeout(), Some(T0 + 1000 + after));
    alice.handle_timeout(T0 + 1000 + after).unwrap();
    let second = net.run(&mut alice);
    let Arrival::Final {
        path: path2,
        message: FinalMessage::Deposit(e2),
        ..
    } = &second[0]
    else {
        panic!("a deposit")
    };
    // One loss does not exclude a relay (an attacker could aim single drops); two in a row
    // do (`a_dead_mix_is_avoided`).
    let _ = (lost_mix, path2);
    assert_eq!(
        e1.outer.dedup_id, e2.outer.dedup_id,
        "the mailbox drops the copy"
    );
    assert_ne!(e1.outer.ack_surb, e2.outer.ack_surb, "a fresh ack SURB");
    assert_eq!(alice.status()[0].retransmissions, 1);
    // After attempts_max sends, the message fails with a notice.
    let max = u64::from(alice.settings().attempts_max);
    for k in 2..=max {
        alice.handle_timeout(T0 + 1000 + k * after).unwrap();
        net.run(&mut alice);
    }
    assert_eq!(alice.out_state(id), Some(OutState::Failed));
    assert_eq!(kinds(&alice.take_notices()), ["failed"]);
}

#[test]
fn a_reply_opens_only_for_its_own_surb() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    net.acks = false;
    let one = alice
        .send(T0 + 1000, "bob", "one", SendOptions::default())
        .unwrap();
    let two = alice
        .send(T0 + 1000, "bob", "two", SendOptions::default())
        .unwrap();
    let sent = net.run(&mut alice);
    let carried = deposits(&sent);
    assert_eq!(carried.len(), 2);
    let (e1, e2) = (carried[0].clone(), carried[1].clone());
    let ack = |e: &Envelope| Reply::DepositAck {
        dedup_id: e.outer.dedup_id,
        expires_at: UnixTime(T0 + 1),
    };
    let base = net.seq;
    net.seq += 5;
    // The genuine ack of message one, and message two's SURB carrying an ack of message
    // one's dedup id.
    let Arrival::Reply {
        surb_id: id_two, ..
    } = net.reply(e2.outer.ack_surb.as_ref().unwrap(), ack(&e1))
    else {
        panic!("a reply")
    };
    let Arrival::Reply { sealed, .. } = net.reply(e1.outer.ack_surb.as_ref().unwrap(), ack(&e1))
    else {
        panic!("a reply")
    };
    // Message one's reply presented under message two's SURB id does not open, and does not
    // use up message two's SURB.
    let mine = alice.contact_mailbox("bob").unwrap().id;
    let swapped = StoredMessage {
        seq: base + 1,
        kind: "surb_reply".into(),
        envelope: None,
        surb_id: Some(id_two),
        payload: Some(B64.encode(&sealed)),
        expires_at_ms: None,
    };
    alice.handle_fetched(T0 + 2000, &mine, &[swapped]);
    assert_eq!(alice.out_state(one), Some(OutState::Sending));
    assert_eq!(alice.out_state(two), Some(OutState::Sending));
    // The stored replies: one's own ack counts; two's SURB with one's dedup id does not.
    net.fetch(&mut alice, T0 + 2000);
    assert_eq!(alice.out_state(one), Some(OutState::Stored));
    assert_eq!(alice.out_state(two), Some(OutState::Sending));
}

#[test]
fn a_scheduled_send_hands_hold_parts_to_a_timer_and_a_cancel_reaches_it() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    let release = T0 + 60_000;
    let id = alice
        .send(
            T0 + 1000,
            "bob",
            "later",
            SendOptions {
                at_ms: Some(release),
                expire_after: None,
            },
        )
        .unwrap();
    let sent = net.run(&mut alice);
    let parts: Vec<&HeldPacketPart> = sent
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                node,
                message: FinalMessage::Hold(p),
                ..
            } if *node == net.timer => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(parts.len(), 2, "one fragment's packet in two parts");
    assert!(parts.iter().all(|p| p.release_at == UnixTime(release)));
    assert!(parts.iter().all(|p| p.hold_id == parts[0].hold_id));
    assert!(
        parts
            .iter()
            .all(|p| net.mixes.contains(&p.first_hop) || p.first_hop == net.edge)
    );
    let cancel_hash = parts[0].cancel_hash;
    assert!(
        deposits(&sent).is_empty(),
        "nothing is deposited before the release"
    );
    net.fetch(&mut alice, T0 + 2000);
    assert_eq!(alice.out_state(id), Some(OutState::Held));
    assert_eq!(kinds(&alice.take_notices()), ["scheduled"]);
    // Cancel: the capability whose hash the parts carry goes to the same timer.
    alice.cancel(T0 + 3000, id).unwrap();
    let cancels = net.run(&mut alice);
    let caps: Vec<[u8; 32]> = cancels
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                node,
                message: FinalMessage::Cancel(c),
                ..
            } if *node == net.timer => Some(c.capability.0),
            _ => None,
        })
        .collect();
    assert_eq!(caps.len(), 1);
    assert_eq!(<[u8; 32]>::from(Sha256::digest(caps[0])), cancel_hash);
    net.fetch(&mut alice, T0 + 4000);
    assert_eq!(alice.out_state(id), Some(OutState::Cancelled));
    assert_eq!(kinds(&alice.take_notices()), ["cancelled"]);
    // Nothing is retransmitted after the release: the message was cancelled.
    alice.handle_timeout(release + 60_000).unwrap();
    assert!(net.run(&mut alice).is_empty());
    assert_eq!(alice.poll_timeout(), None);
}

#[test]
fn receipts_travel_back_delivered_then_read() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    let id = alice
        .send(T0 + 1000, "bob", "hi", SendOptions::default())
        .unwrap();
    net.run(&mut alice);
    net.fetch(&mut alice, T0 + 1500);
    assert_eq!(alice.out_state(id), Some(OutState::Stored));
    net.fetch(&mut bob, T0 + 2000);
    net.run(&mut bob);
    // A delivery receipt is due after a random delay (at most six mean delays).
    let mean = bob.settings().receipt_delay_ms;
    let due = bob.poll_timeout().unwrap();
    assert!(due > T0 + 2000 && due <= T0 + 2000 + 6 * mean, "{due}");
    bob.handle_timeout(due).unwrap();
    net.run(&mut bob);
    net.fetch(&mut alice, due + 1000);
    assert_eq!(alice.out_state(id), Some(OutState::Delivered));
    // Shown to bob: a read receipt, at its own random time.
    assert_eq!(bob.take_unread().len(), 1);
    let due = bob.poll_timeout().unwrap();
    bob.handle_timeout(due).unwrap();
    net.run(&mut bob);
    net.fetch(&mut alice, due + 1000);
    assert_eq!(alice.out_state(id), Some(OutState::Read));
    let notices = alice.take_notices();
    assert_eq!(kinds(&notices), ["stored", "delivered", "read"]);
}

#[test]
fn a_message_under_another_identity_is_refused() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    let mine = bob.contact_mailbox("alice").unwrap();
    let key = MailboxSecretKey::from_bytes(&mine.secret)
        .unwrap()
        .public_key();
    let mut rng = StdRng::seed_from_u64(99);
    let mallory = SigningKey::generate(&mut rng);
    let message_id = MessageId::random(&mut rng);
    let fragment = fragment_message(message_id, b"it is me, bob")
        .unwrap()
        .remove(0);
    let dedup_id = DedupId::random(&mut rng);
    let forged = Envelope::seal(
        &mut rng,
        &key,
        &mallory,
        OuterFields {
            mailbox_id: MailboxId(mine.id),
            access_token: AccessToken(mine.access),
            dedup_id,
            expires_at: None,
            ack_surb: None,
        },
        &EnvelopeContent {
            message_id,
            fragment: fragment.info,
            content: fragment.data,
        },
    )
    .unwrap();
    let msg = StoredMessage {
        seq: 1_000,
        kind: "envelope".into(),
        envelope: Some(B64.encode(forged.encode())),
        surb_id: None,
        payload: None,
        expires_at_ms: None,
    };
    // On the acceptor's side: another identity than the one it accepted.
    bob.handle_fetched(T0 + 1000, &mine.id, std::slice::from_ref(&msg));
    assert_eq!(kinds(&bob.take_notices()), ["identity_changed"]);
    assert!(bob.take_unread().is_empty());
    // It is acknowledged to the node (so that it is not served again), after a save.
    assert_eq!(bob.poll_output(), Some(Output::Save));
    assert_eq!(
        bob.poll_output(),
        Some(Output::Ack {
            mailbox: mine.id,
            node: mine.replicas[0].node,
            up_to: 1_000
        })
    );
    // On the inviter's side: a second answer to the invitation alice gave bob.
    let theirs = alice.contact_mailbox("bob").unwrap();
    let key = MailboxSecretKey::from_bytes(&theirs.secret)
        .unwrap()
        .public_key();
    let forged = Envelope::seal(
        &mut rng,
        &key,
        &mallory,
        OuterFields {
            mailbox_id: MailboxId(theirs.id),
            access_token: AccessToken(theirs.access),
            dedup_id,
            expires_at: None,
            ack_surb: None,
        },
        &EnvelopeContent {
            message_id,
            fragment: fragment_message(message_id, b"it is me, bob")
                .unwrap()
                .remove(0)
                .info,
            content: b"it is me, bob".to_vec(),
        },
    )
    .unwrap();
    let msg = StoredMessage {
        envelope: Some(B64.encode(forged.encode())),
        ..msg
    };
    alice.handle_fetched(T0 + 1000, &theirs.id, &[msg]);
    assert_eq!(kinds(&alice.take_notices()), ["invitation_reused"]);
    assert!(alice.take_unread().is_empty());
}

#[test]
fn same_seeds_same_decisions() {
    let run = || {
        let mut net = TestNet::new();
        let (mut alice, _bob) = net.pair();
        net.acks = false;
        alice
            .send(T0 + 1000, "bob", "x", SendOptions::default())
            .unwrap();
        let mut paths = Vec::new();
        for k in 0..3 {
            alice
                .handle_timeout(T0 + 1000 + k * alice.settings().retransmit_after_ms)
                .unwrap();
            for a in net.run(&mut alice) {
                if let Arrival::Final { path, .. } = a {
                    paths.push(path);
                }
            }
        }
        paths
    };
    let a = run();
    assert_eq!(a.len(), 3);
    assert_eq!(a, run());
}

fn fragment(acked: bool, attempts: u32, sent_ms: u64) -> OutFragment {
    OutFragment {
        dedup: [1; 16],
        envelope: Vec::new(),
        acked,
        attempts,
        sent_ms,
        route: vec!["ed".into(), "m1".into(), "dest".into()],
        surb_route: vec!["m2".into()],
    }
}

fn outgoing(id: u64, fragments: Vec<OutFragment>) -> Outgoing {
    Outgoing {
        id,
        contact: "bob".into(),
        kind: OutKind::Text,
        message_id: [2; 16],
        state: OutState::Sending,
        created_ms: 0,
        release_ms: None,
        expires_ms: None,
        fragments,
        holds: Vec::new(),
        retransmissions: 0,
        len: 10,
    }
}

#[test]
fn retransmission_plan_resends_what_is_overdue_and_gives_up_at_the_bound() {
    let net = TestNet::new();
    let mut c = net.core(5);
    let now = T0;
    let after = c.state.settings.retransmit_after_ms;
    let max = c.state.settings.attempts_max;
    c.state.outbox.push(outgoing(
        1,
        vec![
            fragment(true, 1, 0),
            fragment(false, 1, now - after),
            fragment(false, 1, now - after + 1),
            // Never sent (waiting for the window): not a retransmission.
            fragment(false, 0, 0),
        ],
    ));
    c.state
        .outbox
        .push(outgoing(2, vec![fragment(false, max, 0)]));
    let plan = c.plan_retransmissions(now);
    // Only the overdue, unacknowledged fragment of message 1; message 2 failed.
    assert_eq!(plan, vec![(1, vec![1], vec![], vec![])]);
    assert_eq!(c.state.outbox[1].state, OutState::Failed);
    let notices = c.take_notices();
    assert_eq!(notices.len(), 1);
    assert_eq!(
        (notices[0].kind.as_str(), notices[0].id),
        ("failed", Some(2))
    );
    // Every relay of the lost routes (forward and ack) is charged, the edge included; the
    // destination is not a relay.
    let charged: Vec<&str> = c
        .state
        .relay_health
        .iter()
        .map(|h| h.node.as_str())
        .collect();
    assert_eq!(charged, ["ed", "m1", "m2"]);
    // Planning again at once plans nothing new for the failed message.
    assert!(c.plan_retransmissions(now).iter().all(|w| w.0 != 2));
}

#[test]
fn state_survives_encoding_and_a_restarted_core_carries_on() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    let bytes = alice.encode_state().unwrap();
    let mut alice = ClientCore::decode_state(
        &bytes,
        T0 + 500,
        StdRng::seed_from_u64(11),
        StdRng::seed_from_u64(12),
    )
    .unwrap();
    alice.set_directory(Arc::new(net.directory.clone()));
    alice
        .send(T0 + 1000, "bob", "after restart", SendOptions::default())
        .unwrap();
    net.run(&mut alice);
    net.fetch(&mut bob, T0 + 2000);
    assert_eq!(bob.take_unread()[0].text, "after restart");
    let _ = DestinationAddress::NODE_SERVICE;
}

#[test]
fn a_node_that_later_wins_placement_gets_no_deposit_for_a_pinned_mailbox() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    // Bob deposits into alice's mailbox for him, created on the node placement chose then.
    let target = alice.contact_mailbox("bob").unwrap();
    let rogue = net.add_node_winning(&MailboxId(target.id));
    assert_ne!(rogue, NodeId(target.node));
    bob.set_directory(Arc::new(net.directory.clone()));
    alice.set_directory(Arc::new(net.directory.clone()));
    bob.send(
        T0 + 1000,
        "alice",
        "where do you go?",
        SendOptions::default(),
    )
    .unwrap();
    let sent = net.run(&mut bob);
    let finals: Vec<NodeId> = sent
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                node,
                message: FinalMessage::Deposit(_),
                ..
            } => Some(*node),
            _ => None,
        })
        .collect();
    assert_eq!(
        finals,
        [NodeId(target.node)],
        "the deposit goes where the mailbox is"
    );
    // The other direction is pinned by bob's hello: a node ground for bob's mailbox gets
    // nothing from alice either.
    let theirs = bob.contact_mailbox("alice").unwrap();
    let rogue2 = net.add_node_winning(&MailboxId(theirs.id));
    alice.set_directory(Arc::new(net.directory.clone()));
    alice
        .send(T0 + 1500, "bob", "and back", SendOptions::default())
        .unwrap();
    let back: Vec<NodeId> = net
        .run(&mut alice)
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                node,
                message: FinalMessage::Deposit(_),
                ..
            } => Some(*node),
            _ => None,
        })
        .collect();
    assert_eq!(back, [NodeId(theirs.node)]);
    assert_ne!(back, [rogue2]);
    // Alice's own cover and SURBs lead to her mailbox's node too, never to the newcomer.
    alice.send_cover(T0 + 2000).unwrap();
    for a in net.run(&mut alice) {
        if let Arrival::Final { node, .. } = a {
            assert_ne!(node, rogue);
        }
    }
}

/// Alice sends one message every `retransmit_after_ms / 5` for `rounds` rounds through an
/// edge that drops every client packet whose next hop is in `drops`, fetching her acks and
/// retransmitting as she goes; the first mix of every deposit route after the first 30
/// rounds (warm-up).
fn first_mixes_under_drops(drops: Vec<NodeId>, rounds: u64) -> Vec<NodeId> {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    alice.settings_mut().olm_window = 10_000;
    net.edge_drops = drops;
    let after = alice.settings().retransmit_after_ms;
    let mut mixes = Vec::new();
    let mut t = T0 + 1000;
    for i in 0..rounds {
        alice.send(t, "bob", "x", SendOptions::default()).unwrap();
        let mut arrivals = net.run(&mut alice);
        net.fetch(&mut alice, t + 200);
        alice.handle_timeout(t + 400).unwrap();
        arrivals.extend(net.run(&mut alice));
        if i >= 30 {
            for a in &arrivals {
                if let Arrival::Final {
                    path,
                    message: FinalMessage::Deposit(_),
                    ..
                } = a
                {
                    mixes.push(path[1]);
                }
            }
        }
        t += after / 5;
    }
    mixes
}

#[test]
fn an_edge_dropping_packets_to_honest_mixes_cannot_steer_routes_to_its_own_mix() {
    let mixes = TestNet::new().mixes;
    let attacker = mixes[2];
    let routes = first_mixes_under_drops(mixes[..2].to_vec(), 300);
    let via_attacker = routes.iter().filter(|m| **m == attacker).count();
    // The rule (docs/clients.md): avoidance excludes at most a third of a layer (at least
    // one mix of a layer of two or more), so one mix of three carries at most half.
    assert!(routes.len() > 200, "{} routes", routes.len());
    assert!(
        (via_attacker as f64) / (routes.len() as f64) < 0.6,
        "the attacker's mix carried {via_attacker} of {} routes",
        routes.len()
    );
}

#[test]
fn a_dead_mix_is_avoided_after_two_losses() {
    let dead = TestNet::new().mixes[0];
    // Everything through it is lost (the edge dropping is the same as the mix dropping).
    let routes = first_mixes_under_drops(vec![dead], 200);
    let via_dead = routes.iter().filter(|m| **m == dead).count();
    // Without avoidance a third of the routes would die there; it is tried again only when
    // its losses leave the window.
    assert!(
        (via_dead as f64) / (routes.len() as f64) < 0.1,
        "the dead mix carried {via_dead} of {} routes",
        routes.len()
    );
}

#[test]
fn cover_looks_like_a_message_to_the_mailbox_node() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    // A second mailbox (a pending invitation), so that cover can be acknowledged elsewhere.
    let plan = alice.prepare_invite(T0, Some("carol"), true).unwrap();
    alice.commit_invite(T0, plan);
    net.acks = false;
    alice
        .send(T0 + 1000, "bob", "short text", SendOptions::default())
        .unwrap();
    let text = net.run(&mut alice);
    let text = deposits(&text)[0].clone();
    for k in 0..8 {
        alice.send_cover(T0 + 2000 + k).unwrap();
        let sent = net.run(&mut alice);
        let cover = deposits(&sent)[0].clone();
        // The same size at the node (security review finding 7)…
        assert_eq!(cover.ciphertext_len(), text.ciphertext_len());
        let mut a = cover.clone();
        let mut b = text.clone();
        a.outer.ack_surb = None;
        b.outer.ack_surb = None;
        assert_eq!(a.encode().len(), b.encode().len());
        // …and its ack goes back into another of our mailboxes, as a message's ack goes into
        // ours while the deposit went into the contact's.
        let Arrival::Reply { mailbox, .. } = net.reply(
            cover.outer.ack_surb.as_ref().unwrap(),
            Reply::DepositAck {
                dedup_id: cover.outer.dedup_id,
                expires_at: UnixTime(T0 + 1),
            },
        ) else {
            panic!("a reply")
        };
        assert_ne!(mailbox, cover.outer.mailbox_id.0);
    }
}

#[test]
fn the_two_mailboxes_of_a_relationship_are_on_different_nodes() {
    // Security review finding 5: a node holding both mailboxes of a pair sees a deposit into
    // one and, a few mix delays later, its ack into the other.
    let mut net = TestNet::new();
    // With replica sets: no node holds a replica of both, when there are enough nodes (six
    // mailbox nodes, R = 3).
    let mut together = 0;
    for k in 0..12 {
        let (alice, bob) = net.pair_seeded(100 + 2 * k, 101 + 2 * k);
        let a = alice.contact_mailbox("bob").unwrap().replica_nodes();
        let b = bob.contact_mailbox("alice").unwrap().replica_nodes();
        assert_eq!((a.len(), b.len()), (3, 3));
        together += usize::from(a.iter().any(|n| b.contains(n)));
    }
    assert_eq!(together, 0, "{together} of 12 relationships share a node");
}

#[test]
fn mailbox_nodes_cannot_link_a_users_invitation_mailboxes_by_their_prekeys() {
    // Security review finding 8: the prekeys uploaded to each new mailbox must not carry a
    // value that is the same for every mailbox of the user.
    let net = TestNet::new();
    let mut alice = net.core(1);
    let (_, curve) = alice.identity_keys();
    let one = alice.prepare_invite(T0, Some("bob"), false).unwrap();
    let two = alice.prepare_invite(T0, Some("carol"), false).unwrap();
    let key = |p: &InvitePlan| {
        p.mailbox.replicas[0].prekeys.as_ref().unwrap()["identity_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(key(&one), key(&two));
    assert_ne!(key(&one), curve);
    assert_ne!(key(&two), curve);
}

#[test]
fn a_receipt_does_not_leave_in_the_round_that_fetched_its_message() {
    // Security review finding 5: a poll answered by a deposit at once links the recipient's
    // mailbox to the sender's at a node (or observer) that sees both.
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    alice
        .send(T0 + 1000, "bob", "hi", SendOptions::default())
        .unwrap();
    net.run(&mut alice);
    net.fetch(&mut bob, T0 + 2000);
    bob.handle_timeout(T0 + 2000).unwrap();
    let same_round: usize = net
        .run(&mut bob)
        .iter()
        .filter(|a| matches!(a, Arrival::Final { .. }))
        .count();
    assert_eq!(same_round, 0, "a receipt left with the fetch");
    // It leaves later, at a random time the core asks to be woken for.
    let due = bob.poll_timeout().unwrap();
    assert!(due > T0 + 2000, "due at once");
    bob.handle_timeout(due).unwrap();
    assert_eq!(deposits(&net.run(&mut bob)).len(), 1);
}

/// The node each deposit among `arrivals` reached.
fn deposit_nodes(arrivals: &[Arrival]) -> Vec<NodeId> {
    arrivals
        .iter()
        .filter_map(|a| match a {
            Arrival::Final {
                node,
                message: FinalMessage::Deposit(_),
                ..
            } => Some(*node),
            _ => None,
        })
        .collect()
}

#[test]
fn invitations_and_hellos_pin_the_whole_replica_set() {
    let mut net = TestNet::new();
    let (alice, bob) = net.pair();
    let alices = alice.contact_mailbox("bob").unwrap();
    let bobs = bob.contact_mailbox("alice").unwrap();
    assert_eq!(alices.replicas.len(), 3);
    assert!(alices.replicas.iter().all(|r| r.created));
    // Distinct nodes, each with its own API address.
    let nodes = alices.replica_nodes();
    assert_eq!(nodes.iter().collect::<BTreeSet<_>>().len(), 3);
    assert!(
        alices
            .replicas
            .iter()
            .all(|r| r.api_url.starts_with("http://node-"))
    );
    // Bob learnt alice's set from the invitation, alice learnt bob's from his hello, in
    // their pinned order.
    let theirs = |c: &ClientCore, name: &str| c.contact(name).unwrap().theirs.clone().unwrap();
    assert_eq!(theirs(&bob, "alice").replicas, nodes);
    assert_eq!(theirs(&alice, "bob").replicas, bobs.replica_nodes());
    // R is capped by the mailbox nodes of the directory.
    let mut carol = net.core(9);
    carol.settings_mut().replicas = 9;
    let plan = carol.prepare_invite(T0, Some("x"), true).unwrap();
    assert_eq!(plan.mailbox.replicas.len(), net.mailbox_nodes.len().min(5));
}

#[test]
fn each_replica_gets_its_own_slice_of_the_one_time_keys() {
    let net = TestNet::new();
    let mut alice = net.core(1);
    let plan = alice.prepare_invite(T0, Some("bob"), false).unwrap();
    let mut seen = BTreeSet::new();
    for r in &plan.mailbox.replicas {
        let body = r.prekeys.as_ref().unwrap();
        let keys = body["prekeys"].as_array().unwrap();
        assert!(!keys.is_empty(), "a replica without a one-time key");
        for k in keys {
            assert!(
                seen.insert(k["key"].as_str().unwrap().to_string()),
                "a key given twice"
            );
        }
    }
}

#[test]
fn attempt_k_goes_to_replica_k_mod_r_and_its_ack_to_the_replica_read() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    let set: Vec<NodeId> = alice
        .contact("bob")
        .unwrap()
        .theirs
        .as_ref()
        .unwrap()
        .replicas
        .iter()
        .map(|n| NodeId(*n))
        .collect();
    let own = alice.contact_mailbox("bob").unwrap().replica_nodes();
    net.acks = false;
    let after = alice.settings().retransmit_after_ms;
    // Three messages: every first attempt goes to the first replica (pinned order, whatever
    // the directory's order), the retransmissions walk the set.
    let mut t = T0 + 1000;
    for i in 0..3 {
        alice
            .send(t + i, "bob", "hello", SendOptions::default())
            .unwrap();
    }
    let mut sent = net.run(&mut alice);
    let mut acks_into = Vec::new();
    for k in 0..4usize {
        assert_eq!(
            deposit_nodes(&sent),
            vec![set[k % 3]; 3],
            "attempt {k} of each message"
        );
        // The ack SURB of attempts 0 and 1 leads into the own replica read from (the
        // first), then attempt k into the (k − 1)-th after it.
        for e in deposits(&sent) {
            let Arrival::Reply { node, .. } = net.reply(
                e.outer.ack_surb.as_ref().unwrap(),
                Reply::DepositAck {
                    dedup_id: e.outer.dedup_id,
                    expires_at: UnixTime(T0 + 1),
                },
            ) else {
                panic!("a reply")
            };
            acks_into.push(node);
        }
        net.boxes.clear();
        t += after + 10;
        alice.handle_timeout(t).unwrap();
        sent = net.run(&mut alice);
    }
    let expected: Vec<NodeId> = (0..4usize)
        .flat_map(|k| vec![NodeId(own[k.saturating_sub(1) % 3]); 3])
        .collect();
    assert_eq!(acks_into, expected);
    // A replica that left the directory is skipped: the others take turns.
    let gone = set[1];
    let kept: Vec<_> = net
        .descriptors
        .iter()
        .filter(|d| d.verify(UnixTime(T0)).unwrap().node_id != gone)
        .cloned()
        .collect();
    let (smaller, _) = Directory::build(UnixTime(T0), &kept);
    alice.set_directory(Arc::new(smaller));
    let again = alice
        .send(t + 1, "bob", "again", SendOptions::default())
        .unwrap();
    let dedup = alice.fragment_dedups(again)[0];
    let mut nodes = Vec::new();
    for _ in 0..4 {
        for a in net.run(&mut alice) {
            if let Arrival::Final {
                node,
                message: FinalMessage::Deposit(e),
                ..
            } = a
                && e.outer.dedup_id.0 == dedup
            {
                nodes.push(node);
            }
        }
        t += after + 10;
        alice.handle_timeout(t).unwrap();
    }
    assert_eq!(nodes, [set[0], set[2], set[0], set[2]]);
}

#[test]
fn with_one_replica_dropping_everything_every_message_gets_its_receipt_via_the_next() {
    let mut net = TestNet::new();
    net.replicated = true;
    let (mut alice, mut bob) = net.pair();
    bob.settings_mut().receipt_delay_ms = 0;
    // The first replica of bob's mailbox (where every first attempt goes) drops everything.
    let bobs = bob.contact_mailbox("alice").unwrap();
    let dead = NodeId(bobs.replicas[0].node);
    net.dead = vec![dead];
    let after = alice.settings().retransmit_after_ms;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        ids.push(
            alice
                .send(
                    T0 + 1000 + i,
                    "bob",
                    &format!("m{i}"),
                    SendOptions::default(),
                )
                .unwrap(),
        );
    }
    assert_eq!(deposit_nodes(&net.run(&mut alice)), vec![dead; 5]);
    let mut shown = Vec::new();
    let mut t = T0 + 1000;
    for _ in 0..6 {
        t += after + 10;
        alice.handle_timeout(t).unwrap();
        net.run(&mut alice);
        net.fetch(&mut bob, t + 100);
        shown.extend(bob.take_unread().into_iter().map(|r| r.text));
        bob.handle_timeout(t + 200).unwrap();
        net.run(&mut bob);
        net.fetch(&mut alice, t + 300);
        net.run(&mut alice);
    }
    for id in &ids {
        assert!(
            matches!(
                alice.out_state(*id),
                Some(OutState::Delivered | OutState::Read)
            ),
            "message {id}: {:?}",
            alice.out_state(*id)
        );
    }
    // One retransmission timeout each, not the message.
    assert!(
        alice
            .status()
            .iter()
            .filter(|o| ids.contains(&o.id))
            .all(|o| o.retransmissions == 1),
        "{:?}",
        alice.status()
    );
    shown.sort();
    assert_eq!(shown, ["m0", "m1", "m2", "m3", "m4"], "each shown once");
    // Bob reads from the next replica now.
    let now_reading = bob.contact_mailbox("alice").unwrap();
    assert_ne!(NodeId(now_reading.current().unwrap().node), dead);
    assert!(!kinds(&alice.take_notices()).contains(&"failed"));
    // The next message starts with the replica that acknowledged the last one: no
    // retransmission (before: every message paid the dead replica's timeout first).
    let next = alice
        .send(t + 1000, "bob", "m5", SendOptions::default())
        .unwrap();
    let first = deposit_nodes(&net.run(&mut alice));
    assert_eq!(first.len(), 1);
    assert_ne!(first[0], dead, "the first attempt went to the dead replica");
    net.fetch(&mut alice, t + 1300);
    net.run(&mut alice);
    assert!(matches!(
        alice.out_state(next),
        Some(OutState::Stored | OutState::Delivered | OutState::Read)
    ));
}

#[test]
fn a_failover_that_serves_old_messages_again_shows_nothing_twice_and_loses_nothing() {
    let mut net = TestNet::new();
    net.replicated = true;
    // Acks have not reached the other replicas yet when the one read from dies.
    net.propagate_acks = false;
    let (mut alice, mut bob) = net.pair();
    let long = "x".repeat(5_000);
    let texts = ["one".to_string(), long.clone(), "three".to_string()];
    for (i, text) in texts.iter().enumerate() {
        alice
            .send(T0 + 1000 + i as u64, "bob", text, SendOptions::default())
            .unwrap();
    }
    net.run(&mut alice);
    net.fetch(&mut bob, T0 + 2000);
    net.run(&mut bob);
    let mut shown: Vec<String> = bob.take_unread().into_iter().map(|r| r.text).collect();
    assert_eq!(shown.len(), 3);
    let first = NodeId(bob.contact_mailbox("alice").unwrap().replicas[0].node);
    // Acknowledged on the first replica only.
    assert!(net.replicas[&(first, bob.contact_mailbox("alice").unwrap().id)].is_empty());
    // Two more, then the replica bob read dies; the next one serves all five again.
    for (i, text) in ["four", "five"].iter().enumerate() {
        alice
            .send(T0 + 3000 + i as u64, "bob", text, SendOptions::default())
            .unwrap();
    }
    net.run(&mut alice);
    net.dead = vec![first];
    net.fetch(&mut bob, T0 + 4000);
    net.run(&mut bob);
    shown.extend(bob.take_unread().into_iter().map(|r| r.text));
    // It comes back, the second one dies: bob reads the first from its own cursor there.
    net.dead = vec![NodeId(
        bob.contact_mailbox("alice").unwrap().replicas[1].node,
    )];
    net.fetch(&mut bob, T0 + 5000);
    net.run(&mut bob);
    shown.extend(bob.take_unread().into_iter().map(|r| r.text));
    let mut expected: Vec<String> = texts.to_vec();
    expected.extend(["four".to_string(), "five".to_string()]);
    shown.sort();
    expected.sort();
    assert_eq!(shown, expected, "every message, each once");
    let notices = kinds(&bob.take_notices())
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        !notices.iter().any(|k| k == "undecryptable"),
        "a copy read again reached Olm: {notices:?}"
    );
    // Each replica's cursor is its own.
    let m = bob.contact_mailbox("alice").unwrap();
    let cursors: Vec<u64> = m.replicas.iter().map(|r| r.cursor).collect();
    assert!(
        cursors[0] > 0 && cursors[1] > 0 && cursors[0] != cursors[1],
        "{cursors:?}"
    );
}

#[test]
fn a_state_from_before_replication_reads_as_a_set_of_one() {
    let mut net = TestNet::new();
    let (mut alice, _bob) = net.pair();
    let bytes = alice.encode_state().unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    // Rewrite the state as the single-node client wrote it.
    let c = &mut v["contacts"][0];
    let node = c["mine"]["replicas"][0]["node"].clone();
    let api = c["mine"]["replicas"][0]["api_url"].clone();
    let mine = c["mine"].as_object_mut().unwrap();
    mine.remove("replicas");
    mine.remove("reading");
    mine.remove("retention_ms");
    mine.insert("api_url".into(), api.clone());
    mine.insert("cursor".into(), 42.into());
    mine.insert("token".into(), "tok".into());
    mine.insert("token_expires_ms".into(), 7.into());
    c["theirs"].as_object_mut().unwrap().remove("replicas");
    v["settings"].as_object_mut().unwrap().remove("replicas");
    let old = serde_json::to_vec(&v).unwrap();
    let mut alice = ClientCore::decode_state(
        &old,
        T0 + 500,
        StdRng::seed_from_u64(11),
        StdRng::seed_from_u64(12),
    )
    .unwrap();
    let m = alice.contact_mailbox("bob").unwrap();
    assert_eq!(m.replicas.len(), 1);
    let r = &m.replicas[0];
    assert_eq!(hex::encode(r.node), node.as_str().unwrap());
    assert_eq!(r.api_url, api.as_str().unwrap());
    assert_eq!(
        (r.cursor, r.token.as_deref(), r.token_expires_ms),
        (42, Some("tok"), 7)
    );
    assert!(r.created);
    assert_eq!(alice.settings().replicas, 3);
    // The peer's single pinned node is its set; sending still goes there.
    let theirs = alice.contact("bob").unwrap().theirs.clone().unwrap();
    assert!(theirs.replicas.is_empty());
    alice.set_directory(Arc::new(net.directory.clone()));
    alice
        .send(T0 + 1000, "bob", "still here", SendOptions::default())
        .unwrap();
    assert_eq!(deposit_nodes(&net.run(&mut alice)), [NodeId(theirs.node)]);
    // Written back, the upgraded form stays.
    let again = alice.encode_state().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&again).unwrap();
    assert_eq!(v["contacts"][0]["mine"]["replicas"][0]["cursor"], 42);
    assert!(v["contacts"][0]["mine"].get("cursor").is_none());
}

#[test]
fn failover_walks_the_set_skipping_replicas_not_created_or_not_in_the_directory() {
    let mut net = TestNet::new();
    let (_alice, mut bob) = net.pair();
    let mut m = bob.contact_mailbox("alice").unwrap();
    let nodes = m.replica_nodes();
    // The second replica was down at creation.
    m.replicas[1].created = false;
    m.reading = 0;
    bob.mailbox_created(&m);
    assert_eq!(bob.fail_over(&m.id), Some(nodes[2]));
    assert_eq!(bob.fail_over(&m.id), Some(nodes[0]));
    // The third leaves the directory: only the first is left to read.
    let kept: Vec<_> = net
        .descriptors
        .iter()
        .filter(|d| d.verify(UnixTime(T0)).unwrap().node_id != NodeId(nodes[2]))
        .cloned()
        .collect();
    bob.set_directory(Arc::new(Directory::build(UnixTime(T0), &kept).0));
    assert_eq!(
        bob.fail_over(&m.id),
        Some(nodes[0]),
        "stays: nowhere else to go"
    );
    // Once created there, the second is next; it is read from the start.
    bob.set_replica_created(&m.id, &nodes[1], true);
    assert_eq!(bob.fail_over(&m.id), Some(nodes[1]));
    let now = bob.contact_mailbox("alice").unwrap();
    assert_eq!(now.current().unwrap().cursor, 0);
    assert_eq!(bob.replicas_to_create().len(), 0);
}

/// `block`: the contact is forgotten (its session, its outgoing messages), its mailbox is left
/// to erase on the replicas that did not confirm, its identity is refused afterwards — as an
/// invitation (refused at `accept`) and as a hello on one of our invitations (refused before
/// any session, the invitation staying open) — and the history it sent stays. The export
/// carries the history and contacts, and no secret.
#[test]
fn a_blocked_contact_is_forgotten_refused_afterwards_and_its_mailbox_left_to_erase() {
    let mut net = TestNet::new();
    let (mut alice, mut bob) = net.pair();
    alice
        .send(T0 + 1000, "bob", "before the block", SendOptions::default())
        .unwrap();
    net.run(&mut alice);
    net.fetch(&mut bob, T0 + 2000);
    assert_eq!(bob.history("alice", T0 + 2000).len(), 1);
    bob.send(
        T0 + 2100,
        "alice",
        "pending at the block",
        SendOptions::default(),
    )
    .unwrap();

    let export = bob.export(T0 + 2500).to_string();
    let mine = bob.contact_mailbox("alice").unwrap();
    assert!(export.contains("before the block"), "{export}");
    assert!(export.contains("\"name\":\"alice\""), "{export}");
    for secret in [
        mine.secret,
        mine.owner_seed,
        mine.access,
        mine.reply_key,
        bob.state.identity_seed,
    ] {
        assert!(
            !export.contains(&hex::encode(secret)),
            "a secret in the export"
        );
    }

    // A pending invitation has no identity to block; an unknown name is refused.
    assert!(bob.revoke_plan("nobody", false).is_err());
    let m = bob.revoke_plan("alice", true).unwrap();
    assert_eq!(m.id, mine.id);
    assert!(m.replicas.len() > 1, "the test net replicates");
    let first = m.replicas.first().unwrap().node;
    let r = bob
        .commit_revoke(T0 + 3000, "alice", true, &[first])
        .unwrap();
    assert_eq!((r.erased, r.replicas), (1, m.replicas.len()));
    assert!(bob.contacts().is_empty());
    assert!(bob.status().is_empty(), "messages to alice are forgotten");
    assert_eq!(bob.blocked().len(), 1);
    assert_eq!(bob.history("alice", T0 + 3000).len(), 1, "history stays");
    assert!(bob.owned_mailboxes().is_empty(), "no longer polled");
    let due = bob.erasures_due();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].replicas.len(), m.replicas.len() - 1);
    for r in &m.replicas {
        bob.erasure_confirmed(&m.id, &r.node);
    }
    assert!(bob.erasures_due().is_empty());

    // A new invitation from alice is refused.
    let mut plan = alice
        .prepare_invite(T0 + 4000, Some("bob-again"), true)
        .unwrap();
    created(&mut plan.mailbox);
    let text = alice.commit_invite(T0 + 4000, plan);
    assert!(matches!(
        bob.accept_start(T0 + 4000, &text, "alice-again"),
        Err(ClientError::InvalidArgument(_))
    ));

    // Alice answering a new invitation of bob's is refused; the invitation stays open.
    let mut plan = bob.prepare_invite(T0 + 5000, Some("friend"), true).unwrap();
    assert!(bob.revoke_plan("friend", true).is_err());
    created(&mut plan.mailbox);
    let text = bob.commit_invite(T0 + 5000, plan);
    let mut accept = alice.accept_start(T0 + 5000, &text, "bob-2").unwrap();
    created(&mut accept.mailbox);
    alice.mailbox_created(&accept.mailbox);
    let otk = accept.invitation.one_time_key.unwrap();
    alice
        .accept_finish(T0 + 5000, "bob-2", &accept.invitation, otk)
        .unwrap();
    net.run(&mut alice);
    net.fetch(&mut bob, T0 + 5100);
    assert_eq!(kinds(&bob.take_notices()), ["blocked"]);
    let states: Vec<String> = bob.contacts().into_iter().map(|c| c.state).collect();
    assert_eq!(states, ["pending"]);

    // `remove` withdraws a pending invitation: nothing is left of it once its replicas
    // confirmed the erasure.
    let m = bob.revoke_plan("friend", false).unwrap();
    let nodes: Vec<[u8; 32]> = m.replicas.iter().map(|r| r.node).collect();
    let r = bob
        .commit_revoke(T0 + 5200, "friend", false, &nodes)
        .unwrap();
    assert_eq!(
        (r.erased, r.replicas, r.blocked),
        (nodes.len(), nodes.len(), false)
    );
    assert!(bob.contacts().is_empty() && bob.owned_mailboxes().is_empty());
    assert!(bob.erasures_due().is_empty());
    assert_eq!(bob.erasures_pending(), 0);

    // Unblocked: alice's invitations are accepted again.
    bob.unblock("alice").unwrap();
    assert!(bob.unblock("alice").is_err());
    assert!(
        bob.accept_start(T0 + 6000, &text_of(&mut alice), "alice-3")
            .is_ok()
    );
}

fn text_of(core: &mut ClientCore) -> String {
    let mut plan = core.prepare_invite(T0 + 6000, None, true).unwrap();
    created(&mut plan.mailbox);
    core.commit_invite(T0 + 6000, plan)
}

/// Finding 8 (synchronized polling), the core's part: each own mailbox's long poll gets its
/// own start delay and wait, drawn from the core's RNG (same seed, same schedule), and the
/// round still ends within the wait.
#[test]
fn each_mailbox_polls_on_its_own_schedule() {
    let net = TestNet::new();
    let schedules = |seed| {
        let mut core = net.core(seed);
        (0..50)
            .map(|_| core.poll_schedule(3, 2_000))
            .collect::<Vec<_>>()
    };
    let rounds = schedules(5);
    assert_eq!(rounds, schedules(5), "deterministic under a seed");
    let mut together = 0;
    for round in &rounds {
        for &(delay, wait) in round {
            assert!(delay <= 1_000, "{round:?}");
            assert!((1_000..=2_000).contains(&wait), "{round:?}");
            assert!(delay + wait <= 2_000, "{round:?}");
        }
        let delays: Vec<u64> = round.iter().map(|(d, _)| *d).collect();
        let spread = delays.iter().max().unwrap() - delays.iter().min().unwrap();
        if spread < 50 {
            together += 1;
        }
    }
    // Three independent uniform delays over 1 s fall within 50 ms of each other with
    // probability about 0.7 %.
    assert!(together <= 3, "{together} of 50 rounds started together");
    // Mailbox 0's delays carry no information on mailbox 1's.
    let same_order = rounds.iter().filter(|r| r[0].0 < r[1].0).count();
    assert!((10..=40).contains(&same_order), "{same_order} of 50");
    // A one-shot fetch (no wait) starts every poll at once.
    assert_eq!(net.core(5).poll_schedule(3, 0), vec![(0, 0); 3]);
}

#[test]
fn an_ack_goes_to_the_own_replica_read_from_not_to_a_dead_one() {
    let mut net = TestNet::new();
    net.replicated = true;
    let (mut alice, mut bob) = net.pair();
    bob.settings_mut().receipt_delay_ms = 0;
    // Bob's first replica is down (every first attempt is lost there) and so is the second
    // replica of alice's own mailbox, which alice does not read from.
    let bobs = NodeId(bob.contact_mailbox("alice").unwrap().replicas[0].node);
    let alices = alice.contact_mailbox("bob").unwrap();
    assert_eq!(alices.reading, 0);
    let alices_second = NodeId(alices.replicas[1].node);
    assert_ne!(bobs, alices_second);
    net.dead = vec![bobs, alices_second];
    let after = alice.settings().retransmit_after_ms;
    let mut ids = Vec::new();
    for i in 0..3u64 {
        ids.push(
            alice
                .send(
                    T0 + 1000 + i,
                    "bob",
                    &format!("m{i}"),
                    SendOptions::default(),
                )
                .unwrap(),
        );
    }
    net.run(&mut alice);
    let mut t = T0 + 1000;
    for _ in 0..5 {
        t += after + 10;
        alice.handle_timeout(t).unwrap();
        net.run(&mut alice);
        net.fetch(&mut alice, t + 300);
        net.run(&mut alice);
    }
    // Attempt 0 is lost at bob's dead replica; attempt 1 is stored at the next one and its
    // ack goes where alice reads. Before: attempt 1's ack went to alice's second replica
    // (attempt mod R), dead, and every message needed a third attempt.
    let retransmissions: Vec<u32> = alice
        .status()
        .iter()
        .filter(|o| ids.contains(&o.id))
        .map(|o| o.retransmissions)
        .collect();
    assert_eq!(retransmissions, vec![1, 1, 1], "{:?}", alice.status());
}

/// Alice with three contacts and room for one ready Olm session: every message in either
/// direction takes a pickled session out and puts another away, and the ratchets carry on
/// (and across a restart, which saves pickled and ready sessions alike).
#[test]
fn olm_sessions_beyond_the_live_bound_are_pickled_and_carry_on() {
    let mut net = TestNet::new();
    let mut alice = net.core(1);
    alice.settings_mut().olm_sessions_live = 1;
    let names = ["bob", "carol", "dave"];
    let mut others = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut other = net.core(2 + i as u64);
        let mut plan = alice.prepare_invite(T0, Some(name), true).unwrap();
        created(&mut plan.mailbox);
        let text = alice.commit_invite(T0, plan);
        let mut accept = other.accept_start(T0, &text, "alice").unwrap();
        created(&mut accept.mailbox);
        other.mailbox_created(&accept.mailbox);
        let otk = accept.invitation.one_time_key.unwrap();
        other
            .accept_finish(T0, "alice", &accept.invitation, otk)
            .unwrap();
        net.run(&mut other);
        net.fetch(&mut alice, T0 + 100);
        net.run(&mut alice);
        net.fetch(&mut other, T0 + 100);
        net.run(&mut other);
        others.push(other);
    }
    assert_eq!(alice.sessions.len(), 3);
    assert_eq!(alice.sessions.live_len(), 1);
    let mut now = T0 + 1_000;
    for round in 0..3 {
        if round == 2 {
            let bytes = alice.encode_state().unwrap();
            alice = ClientCore::decode_state(
                &bytes,
                now,
                StdRng::seed_from_u64(11),
                StdRng::seed_from_u64(12),
            )
            .unwrap();
            alice.set_directory(Arc::new(net.directory.clone()));
            assert_eq!(alice.sessions.live_len(), 1, "the bound is in the state");
        }
        for (name, other) in names.iter().zip(others.iter_mut()) {
            now += 1_000;
            let out = format!("to {name}, round {round}");
            alice.send(now, name, &out, SendOptions::default()).unwrap();
            net.run(&mut alice);
            net.fetch(other, now + 500);
            net.run(other);
            let got: Vec<String> = other.take_unread().into_iter().map(|m| m.text).collect();
            assert!(got.contains(&out), "{name} got {got:?}");
            let back = format!("from {name}, round {round}");
            other
                .send(now + 600, "alice", &back, SendOptions::default())
                .unwrap();
            net.run(other);
            net.fetch(&mut alice, now + 900);
            net.run(&mut alice);
            let got: Vec<String> = alice.take_unread().into_iter().map(|m| m.text).collect();
            assert!(got.contains(&back), "alice got {got:?} from {name}");
            assert!(alice.sessions.live_len() <= 1);
        }
    }
}

/// A contact is kept small in memory: a client with thousands of them (or the simulator with
/// a hundred thousand users) pays this per contact. Before the session pickle was boxed, every
/// contact carried ≈ 3.7 KiB of an always-`None` pickle inline (4,520 bytes in all).
#[test]
fn a_contact_takes_under_a_kibibyte_inline() {
    let size = std::mem::size_of::<crate::state::Contact>();
    assert!(size <= 1024, "Contact is {size} bytes");
}
