//! The sans-IO router core: routing through three routers, mixing delays, replay protection
//! across a restart, durable-tag ordering, backpressure and rate limits, and bad input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::directory::{Directory, NodeDescriptor, Role};
use whispr_protocol::sphinx::{
    PACKET_SIZE, Packet, RouteHop, SphinxPublicKey, SphinxSecretKey, build_packet,
};
use whispr_protocol::{DestinationAddress, KeyEpoch, NodeId, UnixTime};
use whispr_relay::router::{
    ClientId, Delivery, DropReason, Input, Output, RateLimit, Router, RouterConfig, Source,
};
use whispr_relay::storage::{MemoryReplayStore, ReplayStore};

const EPOCH_MS: u64 = 60_000;
const T0: UnixTime = UnixTime(1_000 * EPOCH_MS + 5_000);

struct Node {
    identity: SigningKey,
    sphinx: BTreeMap<KeyEpoch, SphinxSecretKey>,
    roles: BTreeSet<Role>,
    layer: u32,
}

impl Node {
    fn new(seed: u8, roles: &[Role], layer: u32) -> Node {
        let mut sphinx = BTreeMap::new();
        for e in 998..=1001u64 {
            let mut k = [seed; 32];
            k[1] = e as u8; // not k[0]: X25519 clamps its low bits
            sphinx.insert(KeyEpoch(e), SphinxSecretKey::from(k));
        }
        Node {
            identity: SigningKey::from_bytes(&[seed; 32]),
            sphinx,
            roles: roles.iter().copied().collect(),
            layer,
        }
    }

    fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    fn hop(&self, epoch: KeyEpoch) -> RouteHop {
        RouteHop {
            node: self.id(),
            sphinx_key: SphinxPublicKey::from(&self.sphinx[&epoch]),
        }
    }

    fn router(&self, config: RouterConfig, destination: bool) -> Router {
        let mut r = Router::new(self.id(), config, destination);
        r.set_keys(self.sphinx.iter().map(|(e, k)| (*e, k.clone())).collect());
        r
    }

    fn descriptor(&self) -> whispr_protocol::directory::SignedDescriptor {
        NodeDescriptor {
            node_id: self.id(),
            peer_id: self.id().libp2p_peer_id_bytes(),
            roles: self.roles.clone(),
            mix_layer: self.layer,
            addresses: vec![],
            api_url: None,
            sphinx_keys: self
                .sphinx
                .iter()
                .map(|(e, k)| (*e, SphinxPublicKey::from(k)))
                .collect(),
            published_at: UnixTime(T0.0 - 1000),
            expires_at: UnixTime(T0.0 + 3_600_000),
        }
        .sign(&self.identity)
        .unwrap()
    }
}

fn config(edge: bool) -> RouterConfig {
    RouterConfig {
        epoch_len_ms: EPOCH_MS,
        edge,
        ..RouterConfig::default()
    }
}

struct Net {
    edge: Node,
    mix: Node,
    dest: Node,
    directory: Arc<Directory>,
}

fn net() -> Net {
    let edge = Node::new(1, &[Role::Edge], 0);
    let mix = Node::new(2, &[Role::Mix], 1);
    let dest = Node::new(3, &[Role::Mailbox], 0);
    let (directory, rejected) = Directory::build(
        T0,
        &[edge.descriptor(), mix.descriptor(), dest.descriptor()],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    Net {
        edge,
        mix,
        dest,
        directory: Arc::new(directory),
    }
}

fn epoch_of(t: UnixTime) -> KeyEpoch {
    KeyEpoch::containing(t, Duration::from_millis(EPOCH_MS))
}

fn packet(
    net: &Net,
    rng: &mut ChaCha20Rng,
    epoch: KeyEpoch,
    delays: [u64; 2],
    body: &[u8],
) -> Packet {
    let route = [net.edge.hop(epoch), net.mix.hop(epoch), net.dest.hop(epoch)];
    build_packet(
        rng,
        &route,
        &delays.map(Duration::from_millis),
        DestinationAddress([7; 32]),
        body,
    )
    .unwrap()
}

/// Drains a router; acknowledges tag batches at once (a store that never fails); returns the
/// other outputs.
fn drain(router: &mut Router, now: UnixTime, store: &mut MemoryReplayStore) -> Vec<Output> {
    let mut out = Vec::new();
    loop {
        let mut progressed = false;
        while let Some(o) = router.poll_output() {
            progressed = true;
            match o {
                Output::PersistTags { batch, tags } => {
                    store.persist(&tags).unwrap();
                    router
                        .handle_input(now, Input::TagsDurable { batch })
                        .unwrap();
                }
                other => out.push(other),
            }
        }
        if !progressed {
            return out;
        }
    }
}

fn with_directory(mut r: Router, net: &Net) -> Router {
    r.handle_input(T0, Input::Directory(net.directory.clone()))
        .unwrap();
    r
}

#[test]
fn a_packet_crosses_three_routers_with_its_delays_and_is_delivered_intact() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(net.edge.router(config(true), false), &net);
    let mut mix = with_directory(net.mix.router(config(false), false), &net);
    let mut dest = with_directory(net.dest.router(config(false), true), &net);
    let p = packet(&net, &mut rng, epoch_of(T0), [300, 700], b"hello mesh");

    edge.handle_input(
        T0,
        Input::Packet {
            from: Source::Client(ClientId(1)),
            bytes: p.as_bytes().to_vec(),
        },
    )
    .unwrap();
    // Held for the edge hop's 300 ms.
    assert!(
        drain(&mut edge, T0, &mut store)
            .iter()
            .all(|o| matches!(o, Output::Drop { .. }))
    );
    assert_eq!(edge.poll_timeout(), Some(UnixTime(T0.0 + 300)));
    let t1 = UnixTime(T0.0 + 299);
    edge.handle_input(t1, Input::Timeout).unwrap();
    assert!(
        drain(&mut edge, t1, &mut store).is_empty(),
        "released early"
    );
    let t1 = UnixTime(T0.0 + 300);
    edge.handle_input(t1, Input::Timeout).unwrap();
    let out = drain(&mut edge, t1, &mut store);
    let [Output::Send { to, packet, held }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*to, net.mix.id());
    assert_eq!(*held, Duration::from_millis(300));
    assert_eq!(packet.as_bytes().len(), PACKET_SIZE);

    mix.handle_input(
        t1,
        Input::Packet {
            from: Source::Peer(net.edge.id()),
            bytes: packet.as_bytes().to_vec(),
        },
    )
    .unwrap();
    drain(&mut mix, t1, &mut store);
    assert_eq!(mix.poll_timeout(), Some(UnixTime(t1.0 + 700)));
    let t2 = UnixTime(t1.0 + 700);
    mix.handle_input(t2, Input::Timeout).unwrap();
    let out = drain(&mut mix, t2, &mut store);
    let [Output::Send { to, packet, .. }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*to, net.dest.id());

    dest.handle_input(
        t2,
        Input::Packet {
            from: Source::Peer(net.mix.id()),
            bytes: packet.as_bytes().to_vec(),
        },
    )
    .unwrap();
    let out = drain(&mut dest, t2, &mut store);
    let [
        Output::Deliver(Delivery::Final {
            destination,
            plaintext,
        }),
    ] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*destination, DestinationAddress([7; 32]));
    assert_eq!(plaintext, b"hello mesh");
    assert_eq!(dest.stats().delivered, 1);
    assert_eq!(edge.stats().out, 1);
    assert_eq!(edge.stats().in_client, 1);
}

#[test]
fn nothing_leaves_before_its_replay_tag_is_durable() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut edge = with_directory(net.edge.router(config(true), false), &net);
    let p = packet(&net, &mut rng, epoch_of(T0), [0, 0], b"x");
    edge.handle_input(
        T0,
        Input::Packet {
            from: Source::Client(ClientId(1)),
            bytes: p.as_bytes().to_vec(),
        },
    )
    .unwrap();
    let mut batch = None;
    while let Some(o) = edge.poll_output() {
        match o {
            Output::PersistTags { batch: b, tags } => {
                assert_eq!(tags.len(), 1);
                batch = Some(b);
            }
            Output::Send { .. } => panic!("sent before its tag was durable"),
            _ => {}
        }
    }
    edge.handle_input(UnixTime(T0.0 + 50), Input::Timeout)
        .unwrap();
    assert!(
        std::iter::from_fn(|| edge.poll_output()).all(|o| !matches!(o, Output::Send { .. })),
        "sent before its tag was durable"
    );
    edge.handle_input(
        UnixTime(T0.0 + 60),
        Input::TagsDurable {
            batch: batch.unwrap(),
        },
    )
    .unwrap();
    assert!(matches!(edge.poll_output(), Some(Output::Send { .. })));
}

#[test]
fn a_replay_is_refused_in_the_same_run_and_after_a_restart() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut store = MemoryReplayStore::default();
    let mut mix = with_directory(net.mix.router(config(false), false), &net);
    let epoch = epoch_of(T0);
    // A packet as the mix receives it: built for the route mix → dest.
    let route = [net.mix.hop(epoch), net.dest.hop(epoch)];
    let p = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([1; 32]),
        b"once",
    )
    .unwrap();
    let input = || Input::Packet {
        from: Source::Peer(net.edge.id()),
        bytes: p.as_bytes().to_vec(),
    };
    mix.handle_input(T0, input()).unwrap();
    drain(&mut mix, T0, &mut store);
    assert_eq!(mix.handle_input(T0, input()), Err(DropReason::Replay));
    assert_eq!(mix.stats().dropped[&DropReason::Replay], 1);

    // Restart: a new router restored from the store refuses it too.
    let mut restarted = with_directory(net.mix.router(config(false), false), &net);
    restarted.restore_replay_tags(store.load().unwrap());
    assert_eq!(
        restarted.handle_input(UnixTime(T0.0 + 10), input()),
        Err(DropReason::Replay)
    );
    // A fresh router without the store would have taken it: the store is what protects.
    let mut amnesiac = with_directory(net.mix.router(config(false), false), &net);
    assert_eq!(amnesiac.handle_input(T0, input()), Ok(()));
}

#[test]
fn previous_epoch_packets_pass_older_and_foreign_ones_are_refused() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(net.edge.router(config(true), false), &net);
    let current = epoch_of(T0);
    let previous = current.previous().unwrap();
    let older = previous.previous().unwrap();
    let mut n = 0;
    let mut offer = |edge: &mut Router, p: &Packet| {
        n += 1;
        edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(n)),
                bytes: p.as_bytes().to_vec(),
            },
        )
    };
    assert_eq!(
        offer(&mut edge, &packet(&net, &mut rng, current, [0, 0], b"a")),
        Ok(())
    );
    assert_eq!(
        offer(&mut edge, &packet(&net, &mut rng, previous, [0, 0], b"b")),
        Ok(())
    );
    assert_eq!(
        offer(&mut edge, &packet(&net, &mut rng, older, [0, 0], b"c")),
        Err(DropReason::UnknownEpoch)
    );
    // The next epoch's key is published ahead but not used before its time.
    assert_eq!(
        offer(
            &mut edge,
            &packet(&net, &mut rng, KeyEpoch(current.0 + 1), [0, 0], b"d")
        ),
        Err(DropReason::UnknownEpoch)
    );
    // A packet for another node's key.
    let route = [net.mix.hop(current), net.dest.hop(current)];
    let foreign = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO],
        DestinationAddress([0; 32]),
        b"e",
    )
    .unwrap();
    assert_eq!(offer(&mut edge, &foreign), Err(DropReason::UnknownEpoch));
    assert_eq!(
        edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(99)),
                bytes: vec![0; PACKET_SIZE - 1],
            }
        ),
        Err(DropReason::WrongSize)
    );
    drain(&mut edge, T0, &mut store);
    assert_eq!(edge.stats().out, 2);
    assert_eq!(edge.stats().dropped[&DropReason::UnknownEpoch], 3);
    assert_eq!(edge.stats().dropped[&DropReason::WrongSize], 1);
}

#[test]
fn role_and_directory_checks() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let epoch = epoch_of(T0);
    // A mix takes no client packets.
    let mut mix = with_directory(net.mix.router(config(false), false), &net);
    let p = packet(&net, &mut rng, epoch, [0, 0], b"x");
    assert_eq!(
        mix.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(1)),
                bytes: p.as_bytes().to_vec()
            }
        ),
        Err(DropReason::NotEdge)
    );
    // An edge with an empty directory does not know the next hop.
    let mut lonely = net.edge.router(config(true), false);
    assert_eq!(
        lonely.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(1)),
                bytes: p.as_bytes().to_vec()
            }
        ),
        Err(DropReason::UnknownNextHop)
    );
    // A relay is no final destination.
    let route = [net.mix.hop(epoch)];
    let last = build_packet(&mut rng, &route, &[], DestinationAddress([2; 32]), b"y").unwrap();
    assert_eq!(
        mix.handle_input(
            T0,
            Input::Packet {
                from: Source::Peer(net.edge.id()),
                bytes: last.as_bytes().to_vec()
            }
        ),
        Err(DropReason::NoDestination)
    );
}

#[test]
fn a_full_queue_refuses_new_packets_and_keeps_the_accepted_ones() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                queue_max: 3,
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    for i in 0..5u64 {
        let p = packet(&net, &mut rng, epoch, [1000, 0], b"q");
        let r = edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(i)),
                bytes: p.as_bytes().to_vec(),
            },
        );
        assert_eq!(r.is_ok(), i < 3, "packet {i}: {r:?}");
        assert!(edge.has_capacity() == (i < 2));
    }
    drain(&mut edge, T0, &mut store);
    let later = UnixTime(T0.0 + 1000);
    edge.handle_input(later, Input::Timeout).unwrap();
    let sent = drain(&mut edge, later, &mut store)
        .into_iter()
        .filter(|o| matches!(o, Output::Send { .. }))
        .count();
    assert_eq!(sent, 3, "every accepted packet leaves");
    assert_eq!(edge.stats().dropped[&DropReason::QueueFull], 2);
    assert!(edge.has_capacity());
}

#[test]
fn a_client_past_its_rate_is_delayed_progressively_then_refused() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut store = MemoryReplayStore::default();
    let limit = RateLimit {
        per_minute: 60,
        burst: 5,
        penalty_packets: 4,
        delay_max_ms: 800,
    };
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                client_rate: limit,
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    let client = Source::Client(ClientId(42));
    let mut results = Vec::new();
    for _ in 0..11 {
        let p = packet(&net, &mut rng, epoch, [0, 0], b"r");
        results.push(edge.handle_input(
            T0,
            Input::Packet {
                from: client,
                bytes: p.as_bytes().to_vec(),
            },
        ));
    }
    // 5 in the burst + 4 delayed accepted, 2 refused.
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 9);
    assert_eq!(&results[9..], &[Err(DropReason::RateLimited); 2]);
    assert_eq!(edge.stats().rate_delayed, 4);
    // The delayed ones leave at +200, +400, +600, +800 ms.
    let mut released = Vec::new();
    for ms in [0u64, 199, 200, 400, 600, 799, 800] {
        let t = UnixTime(T0.0 + ms);
        edge.handle_input(t, Input::Timeout).unwrap();
        let n = drain(&mut edge, t, &mut store)
            .into_iter()
            .filter(|o| matches!(o, Output::Send { .. }))
            .count();
        released.push((ms, n));
    }
    assert_eq!(
        released,
        vec![
            (0, 5),
            (199, 0),
            (200, 1),
            (400, 1),
            (600, 1),
            (799, 0),
            (800, 1)
        ]
    );
    // Another client is not affected; the first one recovers with time.
    let p = packet(&net, &mut rng, epoch, [0, 0], b"s");
    assert!(
        edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(43)),
                bytes: p.as_bytes().to_vec()
            }
        )
        .is_ok()
    );
    let p = packet(&net, &mut rng, epoch, [0, 0], b"t");
    assert!(
        edge.handle_input(
            UnixTime(T0.0 + 10_000),
            Input::Packet {
                from: client,
                bytes: p.as_bytes().to_vec()
            }
        )
        .is_ok()
    );
}

#[test]
fn a_packet_of_another_sphinx_version_is_refused_as_malformed() {
    use sphinx_packet::route::{
        Destination, DestinationAddressBytes, Node as SNode, NodeAddressBytes,
    };
    let net = net();
    let epoch = epoch_of(T0);
    let mut mix = with_directory(net.mix.router(config(false), true), &net);
    let hops = [net.mix.hop(epoch), net.dest.hop(epoch)];
    let nodes: Vec<SNode> = hops
        .iter()
        .map(|h| SNode::new(NodeAddressBytes::from_bytes(h.node.0), h.sphinx_key))
        .collect();
    let delays = vec![sphinx_packet::header::delays::Delay::new_from_nanos(0); 2];
    let secret = SphinxSecretKey::from([9u8; 32]);
    let old = sphinx_packet::SphinxPacketBuilder::new()
        .with_version(sphinx_packet::version::PAYLOAD_KEYS_SEEDS_VERSION)
        .with_payload_size(whispr_protocol::sphinx::PAYLOAD_SIZE)
        .with_initial_secret(&secret)
        .build_packet(
            b"old",
            &nodes,
            &Destination::new(DestinationAddressBytes::from_bytes([3; 32]), [0; 16]),
            &delays,
        )
        .unwrap()
        .to_bytes();
    assert_eq!(old.len(), PACKET_SIZE);
    assert_eq!(
        mix.handle_input(
            T0,
            Input::Packet {
                from: Source::Peer(net.edge.id()),
                bytes: old
            }
        ),
        Err(DropReason::Malformed)
    );
    assert_eq!(mix.stats().dropped[&DropReason::Malformed], 1);
    assert_eq!(mix.queue_len(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Arbitrary bytes from a peer never panic, never produce a send or a delivery.
    #[test]
    fn arbitrary_bytes_are_refused_without_effect(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..3000),
            proptest::collection::vec(any::<u8>(), PACKET_SIZE..=PACKET_SIZE),
        ]
    ) {
        let net = net();
        let mut mix = with_directory(net.mix.router(config(false), true), &net);
        let r = mix.handle_input(T0, Input::Packet { from: Source::Peer(net.edge.id()), bytes });
        prop_assert!(r.is_err());
        mix.handle_input(UnixTime(T0.0 + 700_000), Input::Timeout).unwrap();
        while let Some(o) = mix.poll_output() {
            prop_assert!(matches!(o, Output::Drop { .. }), "{:?}", o);
        }
        prop_assert_eq!(mix.queue_len(), 0);
    }
}

#[test]
fn a_partial_rate_table_keeps_that_limits_own_defaults() {
    let config: RouterConfig =
        toml::from_str("[peer_rate]\nburst = 7\n[client_rate]\nper_minute = 50\n").unwrap();
    assert_eq!(
        config.peer_rate,
        RateLimit {
            burst: 7,
            ..RateLimit::per_peer()
        }
    );
    assert_eq!(
        config.client_rate,
        RateLimit {
            per_minute: 50,
            ..RateLimit::per_connection()
        }
    );
    assert_eq!(
        toml::from_str::<RouterConfig>("").unwrap(),
        RouterConfig::default()
    );
    let unknown = toml::from_str::<RouterConfig>("[peer_rate]\nbrust = 7\n").unwrap_err();
    assert!(unknown.to_string().contains("brust"), "{unknown}");
}

/// A packet whose route passes through `node` `loops` times in a row before `dest`, with
/// `delay_ms` at each of those hops (security review, finding 4: self-loops).
fn looping_packet(
    node: &Node,
    dest: &Node,
    rng: &mut ChaCha20Rng,
    epoch: KeyEpoch,
    loops: usize,
    delay_ms: u64,
) -> Packet {
    let mut route: Vec<RouteHop> = (0..loops).map(|_| node.hop(epoch)).collect();
    route.push(dest.hop(epoch));
    build_packet(
        rng,
        &route,
        &vec![Duration::from_millis(delay_ms); loops],
        DestinationAddress([7; 32]),
        b"loop",
    )
    .unwrap()
}

/// Finding 4: a few sources holding long-delayed, self-looping packets must not deny the
/// queue to everyone else. Five clients each fill what they can; a sixth still gets in.
#[test]
fn a_few_sources_cannot_take_the_whole_queue() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                queue_max: 1_000,
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    let mut accepted = 0;
    for client in 0..5u64 {
        for _ in 0..200 {
            let p = looping_packet(&net.edge, &net.dest, &mut rng, epoch, 4, 10_000);
            if edge
                .handle_input(
                    T0,
                    Input::Packet {
                        from: Source::Client(ClientId(client)),
                        bytes: p.as_bytes().to_vec(),
                    },
                )
                .is_ok()
            {
                accepted += 1;
            }
        }
    }
    drain(&mut edge, T0, &mut store);
    assert!(accepted > 0);
    let p = packet(&net, &mut rng, epoch, [0, 0], b"legit");
    let r = edge.handle_input(
        T0,
        Input::Packet {
            from: Source::Client(ClientId(99)),
            bytes: p.as_bytes().to_vec(),
        },
    );
    assert_eq!(r, Ok(()), "a new source found the queue taken");
}

/// Finding 4: a route through the same relay several times in a row is charged to the
/// source that sent it at every pass, so looping buys no queue time the source's rate does
/// not pay for.
#[test]
fn a_self_loop_is_charged_to_its_source_at_every_pass() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                client_rate: RateLimit {
                    per_minute: 1,
                    burst: 5,
                    penalty_packets: 0,
                    delay_max_ms: 0,
                },
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    let client = Source::Client(ClientId(7));
    for _ in 0..5 {
        let p = looping_packet(&net.edge, &net.dest, &mut rng, epoch, 4, 1_000);
        edge.handle_input(
            T0,
            Input::Packet {
                from: client,
                bytes: p.as_bytes().to_vec(),
            },
        )
        .unwrap();
    }
    drain(&mut edge, T0, &mut store);
    assert_eq!(edge.queue_len(), 5);
    // After one delay, each packet comes round for its second pass: the source's budget is
    // spent, so the loops are refused, not held again.
    let t = UnixTime(T0.0 + 1_000);
    edge.handle_input(t, Input::Timeout).unwrap();
    drain(&mut edge, t, &mut store);
    assert_eq!(edge.queue_len(), 0, "self-loops were held again for free");
    assert_eq!(edge.stats().dropped[&DropReason::RateLimited], 5);
}

/// Finding 4, the driver's side: a peer over its share is the only one the router asks the
/// driver to stop reading; the others keep flowing.
#[test]
fn only_the_peer_over_its_share_is_held_back() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let mut store = MemoryReplayStore::default();
    let mut mix = with_directory(
        net.mix.router(
            RouterConfig {
                queue_max: 90,
                ..config(false)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    // Packets as the edge forwards them: peeled once, so the mix holds them for its delay.
    let mut edge = with_directory(net.edge.router(config(true), false), &net);
    let mut forwarded = |rng: &mut ChaCha20Rng| {
        let p = packet(&net, rng, epoch, [0, 30_000], b"f");
        edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(1)),
                bytes: p.as_bytes().to_vec(),
            },
        )
        .unwrap();
        drain(&mut edge, T0, &mut MemoryReplayStore::default())
            .into_iter()
            .find_map(|o| match o {
                Output::Send { packet, .. } => Some(packet.into_bytes()),
                _ => None,
            })
            .unwrap()
    };
    let flooder = Source::Peer(net.edge.id());
    let honest = Source::Peer(NodeId([9; 32]));
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..90 {
        let bytes = forwarded(&mut rng);
        match mix.handle_input(
            T0,
            Input::Packet {
                from: flooder,
                bytes,
            },
        ) {
            Ok(()) => accepted += 1,
            Err(reason) => {
                refused = Some(reason);
                break;
            }
        }
    }
    drain(&mut mix, T0, &mut store);
    // Alone, a source may hold half the queue (a share stays free for a newcomer).
    assert_eq!(accepted, 45);
    assert_eq!(refused, Some(DropReason::QueueShare));
    assert!(!mix.has_capacity_for(flooder));
    assert!(mix.has_capacity_for(honest));
    assert_eq!(mix.blocked_peers(), Some(vec![net.edge.id()]));
    let bytes = forwarded(&mut rng);
    assert_eq!(
        mix.handle_input(
            T0,
            Input::Packet {
                from: honest,
                bytes
            }
        ),
        Ok(())
    );
    // Once the held packets leave, the flooder is read again.
    let later = UnixTime(T0.0 + 30_000);
    mix.handle_input(later, Input::Timeout).unwrap();
    drain(&mut mix, later, &mut store);
    assert_eq!(mix.queue_len(), 0);
    assert!(mix.has_capacity_for(flooder));
    assert_eq!(mix.blocked_peers(), Some(vec![]));
}

/// Security review, finding 15: buckets of sources that went away are evicted oldest first,
/// in O(log n) (the router thread scanned every bucket for each new connection). A client
/// whose packets are still held keeps its budget after it closes: a loop coming round must
/// not find a fresh one.
#[test]
fn rate_buckets_are_evicted_least_recent_first_and_kept_while_packets_are_held() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                rate_sources_max: 3,
                client_rate: RateLimit {
                    per_minute: 1,
                    burst: 1,
                    penalty_packets: 0,
                    delay_max_ms: 0,
                },
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    let mut send = |edge: &mut Router, client: u64, delay: u64| {
        let p = packet(&net, &mut rng, epoch, [delay, 0], b"b");
        edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(client)),
                bytes: p.as_bytes().to_vec(),
            },
        )
    };
    // Clients 1, 2, 3 spend their one-packet budget; 4 arrives: 1, the oldest, is forgotten
    // (and so gets a new budget), 2 and 3 are still limited.
    for c in 1..=4 {
        assert_eq!(send(&mut edge, c, 0), Ok(()), "client {c}");
    }
    assert_eq!(send(&mut edge, 3, 0), Err(DropReason::RateLimited));
    assert_eq!(send(&mut edge, 1, 0), Ok(()));
    drain(&mut edge, T0, &mut store);
    // Client 5 sends a packet held 10 s, then closes: its spent budget stays with the packet.
    assert_eq!(send(&mut edge, 5, 10_000), Ok(()));
    drain(&mut edge, T0, &mut store);
    edge.handle_input(T0, Input::ClientClosed(ClientId(5)))
        .unwrap();
    assert_eq!(send(&mut edge, 5, 0), Err(DropReason::RateLimited));
    // Client 1's packets are gone: closing forgets its bucket.
    edge.handle_input(T0, Input::ClientClosed(ClientId(1)))
        .unwrap();
    assert_eq!(send(&mut edge, 1, 0), Ok(()));
}

/// Finding 4: the relay's own cap on a hop's delay.
#[test]
fn a_hop_delay_above_the_relays_cap_is_refused() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                hop_delay_max_ms: 5_000,
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let epoch = epoch_of(T0);
    for (delay, verdict) in [(5_000, Ok(())), (5_001, Err(DropReason::DelayTooLong))] {
        let p = packet(&net, &mut rng, epoch, [delay, 0], b"d");
        let r = edge.handle_input(
            T0,
            Input::Packet {
                from: Source::Client(ClientId(1)),
                bytes: p.as_bytes().to_vec(),
            },
        );
        assert_eq!(r, verdict, "delay {delay} ms");
    }
}

/// A comparable summary of an output.
fn summary(output: &Output) -> String {
    match output {
        Output::Send { to, packet, held } => {
            format!("send {:?} {} {held:?}", to, hex(packet.as_bytes()))
        }
        Output::Deliver(d) => format!("deliver {d:?}"),
        Output::PersistTags { batch, tags } => format!("persist {batch} {tags:?}"),
        Output::Drop { reason } => format!("drop {}", reason.label()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn peeling_on_other_threads_then_finishing_in_order_gives_the_outputs_of_a_packet_input() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let epoch = epoch_of(T0);
    // Good packets, a replay, one of another node's, garbage and a short one, from two
    // clients.
    let good: Vec<Vec<u8>> = (0..6u8)
        .map(|i| packet(&net, &mut rng, epoch, [0, 0], &[i]).into_bytes())
        .collect();
    let mut foreign = packet(&net, &mut rng, epoch, [0, 0], b"f").into_bytes();
    foreign[40] ^= 1;
    let mut inputs: Vec<(Source, Vec<u8>)> = good
        .iter()
        .enumerate()
        .map(|(i, b)| (Source::Client(ClientId(i as u64 % 2)), b.clone()))
        .collect();
    inputs.insert(3, (Source::Client(ClientId(0)), good[1].clone()));
    inputs.insert(5, (Source::Client(ClientId(1)), foreign));
    inputs.push((Source::Client(ClientId(0)), vec![0u8; PACKET_SIZE]));
    inputs.push((Source::Client(ClientId(1)), vec![1u8; 10]));

    let mut inline = with_directory(net.edge.router(config(true), false), &net);
    let mut inline_verdicts = Vec::new();
    let mut inline_out = Vec::new();
    for (from, bytes) in &inputs {
        inline_verdicts.push(inline.handle_input(
            T0,
            Input::Packet {
                from: *from,
                bytes: bytes.clone(),
            },
        ));
        while let Some(o) = inline.poll_output() {
            inline_out.push(summary(&o));
        }
    }

    let mut split = with_directory(net.edge.router(config(true), false), &net);
    let mut split_out = Vec::new();
    let mut tickets = Vec::new();
    let mut verdicts: Vec<Option<Result<(), DropReason>>> = Vec::new();
    for (from, _) in &inputs {
        match split.admit(T0, *from) {
            Ok(ticket) => {
                tickets.push(Some(ticket));
                verdicts.push(None);
            }
            Err(reason) => {
                tickets.push(None);
                verdicts.push(Some(Err(reason)));
            }
        }
    }
    assert_eq!(split.peeling(), inputs.len(), "every packet was admitted");
    assert_eq!(
        split.queue_len(),
        inputs.len(),
        "peeling packets hold their place"
    );
    // Peel on four threads at once, out of order.
    let peeled: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = tickets
            .iter()
            .zip(&inputs)
            .rev()
            .map(|(t, (_, bytes))| s.spawn(move || t.as_ref().map(|t| t.peel(bytes))))
            .collect();
        let mut all: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        all.reverse();
        all
    });
    for ((ticket, peeled), verdict) in tickets.into_iter().zip(peeled).zip(&mut verdicts) {
        if let (Some(ticket), Some(peeled)) = (ticket, peeled) {
            *verdict = Some(split.finish(T0, ticket, peeled));
        }
        while let Some(o) = split.poll_output() {
            split_out.push(summary(&o));
        }
    }
    let split_verdicts: Vec<_> = verdicts.into_iter().map(Option::unwrap).collect();
    assert_eq!(split_verdicts, inline_verdicts);
    assert_eq!(split_out, inline_out);
    assert_eq!(split.stats(), inline.stats());
    assert_eq!(split.peeling(), 0);
    assert_eq!(split.queue_len(), inline.queue_len());
    assert!(
        inline_verdicts.iter().filter(|v| v.is_ok()).count() == 6
            && inline.stats().dropped.values().sum::<u64>() == 4,
        "{inline_verdicts:?}"
    );
}

#[test]
fn a_packet_being_peeled_holds_its_place_until_finished_or_abandoned() {
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(22);
    let mut edge = with_directory(
        net.edge.router(
            RouterConfig {
                queue_max: 2,
                ..config(true)
            },
            false,
        ),
        &net,
    );
    let a = edge.admit(T0, Source::Client(ClientId(1))).unwrap();
    let b = edge.admit(T0, Source::Client(ClientId(2))).unwrap();
    assert!(!edge.has_capacity());
    assert_eq!(
        edge.admit(T0, Source::Client(ClientId(3))).unwrap_err(),
        DropReason::QueueFull
    );
    edge.abandon(a);
    assert_eq!(edge.peeling(), 1);
    let c = edge.admit(T0, Source::Client(ClientId(3))).unwrap();
    let bytes = packet(&net, &mut rng, epoch_of(T0), [0, 0], b"x").into_bytes();
    let peeled = b.peel(&bytes);
    edge.finish(T0, b, peeled).unwrap();
    edge.abandon(c);
    assert_eq!(edge.peeling(), 0);
    assert_eq!(
        edge.queue_len(),
        1,
        "the finished packet is held, the others gone"
    );
    assert_eq!(edge.stats().dropped[&DropReason::QueueFull], 1);
}

#[test]
fn a_ticket_whose_epoch_ended_while_it_was_peeled_cannot_reopen_a_replay() {
    // Epoch 1000: the keys of 1000 and 999 are live. A packet of epoch 999 passes once; its
    // replay is admitted just before the boundary and finishes after it, when 999's tags are
    // forgotten: it must be refused as from an ended epoch, not checked against an empty filter.
    let net = net();
    let mut rng = ChaCha20Rng::seed_from_u64(23);
    let mut store = MemoryReplayStore::default();
    let mut edge = with_directory(net.edge.router(config(true), false), &net);
    let client = Source::Client(ClientId(1));
    let old = packet(&net, &mut rng, KeyEpoch(999), [0, 0], b"old").into_bytes();
    assert_eq!(
        edge.handle_input(
            T0,
            Input::Packet {
                from: client,
                bytes: old.clone(),
            },
        ),
        Ok(())
    );
    drain(&mut edge, T0, &mut store);
    let replay = edge.admit(T0, client).unwrap();
    let peeled = replay.peel(&old);
    // Epoch 1001 begins; a fresh packet of it makes the filter forget epoch 999.
    let t1 = UnixTime(1_001 * EPOCH_MS + 1_000);
    let fresh = packet(&net, &mut rng, KeyEpoch(1001), [0, 0], b"new").into_bytes();
    assert_eq!(
        edge.handle_input(
            t1,
            Input::Packet {
                from: client,
                bytes: fresh,
            },
        ),
        Ok(())
    );
    assert_eq!(
        edge.finish(t1, replay, peeled),
        Err(DropReason::UnknownEpoch)
    );
}
