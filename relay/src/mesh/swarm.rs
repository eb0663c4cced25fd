//! The libp2p swarm: transport, behaviours, the descriptor gossip and its validation, and
//! the address book the dialer uses.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{
    PeerId, StreamProtocol, Swarm, connection_limits, identify, kad, noise, ping, tcp, yamux,
};
use libp2p_stream::{Control, IncomingStreams};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use whispr_protocol::directory::{
    ADDRESS_LEN_MAX, ADDRESSES_MAX, DESCRIPTOR_LEN_MAX, NodeDescriptor, Role, SignedDescriptor,
};
use whispr_protocol::sphinx::SphinxPublicKey;
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};

use super::shared::{MeshError, Shared};
use super::streams::{ACKED_PACKETS_PROTOCOL, CLIENT_PROTOCOL, PACKETS_PROTOCOL};
use crate::config::MeshConfig;
use crate::keys::Identity;

/// The gossipsub topic descriptors are published on.
pub const DESCRIPTOR_TOPIC: &str = "whispr/descriptors/1";

/// How often the directory is rebuilt at most: a quarter of the publication interval,
/// between 100 ms and 5 s. Each rebuild verifies every descriptor's signature again
/// ([`Directory::build`]), so this bounds that work for large networks.
pub fn directory_rebuild_interval(publish_every: Duration) -> Duration {
    let publish_ms = u64::try_from(publish_every.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis((publish_ms / 4).clamp(100, 5_000))
}
/// Kademlia protocol name (a DHT of Whispr nodes only, apart from the public IPFS one).
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispr/kad/1.0.0");
/// Identify's protocol version.
const IDENTIFY_VERSION: &str = "/whispr/1.0.0";
/// Connections with no stream open close after this (packet streams stay open).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often Kademlia walks the network to find peers.
const KAD_WALK_INTERVAL: Duration = Duration::from_secs(300);
/// Shortest spacing of two publications of our descriptor (the periodic one aside).
const PUBLISH_SPACING_MAX: Duration = Duration::from_secs(1);
/// Delay of the publication triggered by a peer subscribing (lets a few arrive together).
const PUBLISH_SOON: Duration = Duration::from_millis(200);

/// Hands the dialer the addresses of the nodes in the descriptors held.
#[derive(Default)]
pub(crate) struct AddressBook {
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
}

impl NetworkBehaviour for AddressBook {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer
            .and_then(|p| self.addresses.get(&p))
            .cloned()
            .unwrap_or_default())
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// The behaviours of a mesh node.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// First, so that a connection over the limits is refused before the others see it.
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    stream: libp2p_stream::Behaviour,
    addresses: AddressBook,
}

/// A swarm built by [`build`], with its stream handles.
pub(crate) struct Built {
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) control: Control,
    pub(crate) packets_in: IncomingStreams,
    pub(crate) acked_in: IncomingStreams,
    pub(crate) clients_in: Option<IncomingStreams>,
}

fn transport_error(e: impl std::fmt::Display) -> MeshError {
    MeshError::Transport(e.to_string())
}

/// Builds the swarm (TCP + Noise + Yamux and the behaviours) and registers the stream
/// protocols.
pub(crate) fn build(config: &MeshConfig, keypair: &Keypair) -> Result<Built, MeshError> {
    let local = keypair.public().to_peer_id();
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_VERSION.into(), keypair.public())
            .with_cache_size(config.descriptors_max.clamp(16, 1024)),
    );
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_periodic_bootstrap_interval(Some(KAD_WALK_INTERVAL));
    // Kademlia is for peer discovery only: records other peers PUT are not stored.
    kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
    let mut kad =
        kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
    kad.set_mode(Some(kad::Mode::Server));
    let gossipsub_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(DESCRIPTOR_LEN_MAX.saturating_add(1024))
        .build()
        .map_err(transport_error)?;
    let mut gossipsub = gossipsub::Behaviour::new(
        MessageAuthenticity::Signed(keypair.clone()),
        gossipsub_config,
    )
    .map_err(transport_error)?;
    gossipsub
        .subscribe(&IdentTopic::new(DESCRIPTOR_TOPIC))
        .map_err(transport_error)?;
    let stream = libp2p_stream::Behaviour::new();
    let mut control = stream.new_control();
    let packets_in = control.accept(PACKETS_PROTOCOL).map_err(transport_error)?;
    let acked_in = control
        .accept(ACKED_PACKETS_PROTOCOL)
        .map_err(transport_error)?;
    let clients_in = if config.router.edge {
        Some(control.accept(CLIENT_PROTOCOL).map_err(transport_error)?)
    } else {
        None
    };
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.connections_max))
            .with_max_established_per_peer(Some(config.connections_per_peer_max))
            .with_max_pending_incoming(Some(config.connections_pending_max)),
    );
    let behaviour = Behaviour {
        limits,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        kad,
        gossipsub,
        stream,
        addresses: AddressBook::default(),
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(transport_error)?
        .with_behaviour(|_| behaviour)
        .unwrap_or_else(|e: Infallible| match e {})
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(Built {
        swarm,
        control,
        packets_in,
        acked_in,
        clients_in,
    })
}

/// Starts the listeners and returns the addresses already known (those of listeners on a
/// specific IP address; unspecified ones are reported once the swarm runs).
pub(crate) fn start_listening(
    swarm: &mut Swarm<Behaviour>,
    config: &MeshConfig,
) -> Result<Vec<Multiaddr>, MeshError> {
    for (index, address) in config.listen.iter().enumerate() {
        let addr: Multiaddr = address
            .parse()
            .map_err(|e| MeshError::Listen(format!("mesh.listen[{index}]: {e}")))?;
        swarm
            .listen_on(addr)
            .map_err(|e| MeshError::Listen(format!("mesh.listen[{index}]: {e}")))?;
    }
    // A listener on a specific address reports it at its first poll, with no I/O: collect
    // those now so that the handle knows them before the swarm runs.
    let mut addresses = Vec::new();
    for _ in 0..config.listen.len().saturating_mul(2).saturating_add(2) {
        match swarm.select_next_some().now_or_never() {
            Some(SwarmEvent::NewListenAddr { address, .. }) => addresses.push(address),
            Some(_) => {}
            None => break,
        }
    }
    Ok(addresses)
}

/// Commands to the swarm task.
#[derive(Debug)]
pub(crate) enum SwarmCommand {
    /// The Sphinx public keys after a rotation.
    PublicKeys(Vec<(KeyEpoch, SphinxPublicKey)>),
}

/// A descriptor held, with what the task needs of it.
struct HeldDescriptor {
    signed: SignedDescriptor,
    published_at: UnixTime,
    expires_at: UnixTime,
    peer: Option<PeerId>,
}

/// The swarm task.
pub(crate) struct SwarmTask {
    /// Peers' announced addresses may be loopback/private/link-local
    /// (`mesh.allow_private_addresses`).
    allow_private: bool,
    swarm: Swarm<Behaviour>,
    identity: Identity,
    roles: Vec<Role>,
    mix_layer: u32,
    api_url: Option<String>,
    external: Vec<String>,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    publish_every: Duration,
    validity: Duration,
    descriptors_max: usize,
    public_keys: Vec<(KeyEpoch, SphinxPublicKey)>,
    topic: IdentTopic,
    held: HashMap<NodeId, HeldDescriptor>,
    dirty: bool,
    snapshots: watch::Sender<Arc<Vec<SignedDescriptor>>>,
    commands: mpsc::Receiver<SwarmCommand>,
    shared: Arc<Shared>,
    next_publish: Instant,
    last_publish: Option<Instant>,
    /// This node's descriptor as last published (submitted to the authorities).
    own: watch::Sender<Option<Arc<super::submit::OwnDescriptor>>>,
}

impl SwarmTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        config: &MeshConfig,
        identity: &Identity,
        roles: Vec<Role>,
        public_keys: Vec<(KeyEpoch, SphinxPublicKey)>,
        snapshots: watch::Sender<Arc<Vec<SignedDescriptor>>>,
        commands: mpsc::Receiver<SwarmCommand>,
        shared: Arc<Shared>,
    ) -> SwarmTask {
        let bootstrap = config
            .bootstrap
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter_map(|addr| {
                let peer = addr.iter().find_map(|p| match p {
                    Protocol::P2p(peer) => Some(peer),
                    _ => None,
                })?;
                Some((peer, addr))
            })
            .filter(|(peer, _)| *peer != shared.peer_id)
            .collect();
        let allow_private = config.allow_private_addresses.unwrap_or_else(|| {
            let listen: Vec<Multiaddr> = config
                .listen
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .collect();
            !listen.is_empty() && listen.iter().all(is_private)
        });
        SwarmTask {
            allow_private,
            swarm,
            identity: identity.clone(),
            roles,
            mix_layer: config.mix_layer,
            api_url: config.api_url.clone(),
            external: config.external_addresses.clone(),
            bootstrap,
            publish_every: Duration::from_millis(config.descriptor_publish_ms.max(1)),
            validity: Duration::from_millis(config.descriptor_validity_ms),
            descriptors_max: config.descriptors_max.max(1),
            public_keys,
            topic: IdentTopic::new(DESCRIPTOR_TOPIC),
            held: HashMap::new(),
            dirty: false,
            snapshots,
            commands,
            shared,
            next_publish: Instant::now(),
            last_publish: None,
            own: watch::Sender::new(None),
        }
    }

    /// Follows this node's descriptor as the task publishes it.
    pub(crate) fn own_descriptor(
        &self,
    ) -> watch::Receiver<Option<Arc<super::submit::OwnDescriptor>>> {
        self.own.subscribe()
    }

    /// Runs until aborted.
    pub(crate) async fn run(mut self) {
        self.join_bootstrap();
        let mut maintenance = tokio::time::interval(self.publish_every);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick of an interval is immediate; the bootstrap peers were just dialled.
        maintenance.tick().await;
        let rebuild_every = directory_rebuild_interval(self.publish_every);
        let mut rebuild = tokio::time::interval(rebuild_every);
        rebuild.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = self.commands.recv(), if commands_open => match command {
                    Some(SwarmCommand::PublicKeys(keys)) => {
                        self.public_keys = keys;
                        self.publish_soon(Duration::ZERO);
                    }
                    // The epoch task is gone: run on with the keys held.
                    None => commands_open = false,
                },
                () = tokio::time::sleep_until(self.next_publish) => self.publish(),
                _ = maintenance.tick() => self.maintain(),
                _ = rebuild.tick() => self.push_snapshot(),
            }
        }
    }

    fn join_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.clone() {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(error = %DialErrorKind(&e), "bootstrap dial failed");
            }
        }
        if !self.bootstrap.is_empty() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.shared.listen_addrs.send_modify(|a| {
                    if !a.contains(&address) {
                        a.push(address);
                    }
                });
                if self.external.is_empty() {
                    self.publish_soon(Duration::ZERO);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.shared
                    .listen_addrs
                    .send_modify(|a| a.retain(|x| *x != address));
                if self.external.is_empty() {
                    self.publish_soon(Duration::ZERO);
                }
            }
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                let peers = self.swarm.connected_peers().count();
                self.shared
                    .metrics
                    .peers_connected
                    .store(u64::try_from(peers).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { .. },
                ..
            } => {
                self.shared
                    .metrics
                    .connections_denied
                    .fetch_add(1, Ordering::Relaxed);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            // Discovery: a Whispr peer's listen addresses go to Kademlia.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                let allow_private = self.allow_private;
                for addr in info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| announced_dialable(a, &peer_id, allow_private))
                    .take(ADDRESSES_MAX)
                {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = self.validate(message.source, &message.data);
                if acceptance == MessageAcceptance::Reject {
                    self.shared
                        .metrics
                        .descriptors_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("gossiped descriptor rejected");
                }
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { topic, .. } if topic == self.topic.hash() => {
                // A new peer on the topic: let it learn this node soon.
                self.publish_soon(PUBLISH_SOON);
            }
            _ => {}
        }
    }

    /// Checks a gossiped descriptor: it decodes, verifies now, was published by the node it
    /// describes, and is newer than the one held.
    fn validate(&mut self, source: Option<PeerId>, data: &[u8]) -> MessageAcceptance {
        let now = whispr_node_kit::clock::now();
        let Ok(signed) = SignedDescriptor::decode(data) else {
            return MessageAcceptance::Reject;
        };
        let Ok(descriptor) = signed.verify(now) else {
            return MessageAcceptance::Reject;
        };
        let Some(author) = source else {
            return MessageAcceptance::Reject;
        };
        if author.to_bytes() != descriptor.peer_id {
            return MessageAcceptance::Reject;
        }
        if descriptor.node_id == self.shared.node_id {
            return MessageAcceptance::Ignore;
        }
        match self.held.get(&descriptor.node_id) {
            Some(held) if held.published_at >= descriptor.published_at => {
                return MessageAcceptance::Ignore;
            }
            Some(_) => {}
            None => {
                if self.held.len() >= self.descriptors_max {
                    self.expire(now);
                }
                if self.held.len() >= self.descriptors_max {
                    return MessageAcceptance::Ignore;
                }
            }
        }
        self.hold(signed, &descriptor, Some(author));
        MessageAcceptance::Accept
    }

    fn hold(
        &mut self,
        signed: SignedDescriptor,
        descriptor: &NodeDescriptor,
        peer: Option<PeerId>,
    ) {
        if let Some(peer) = peer {
            let addresses: Vec<Multiaddr> = descriptor
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .filter(|a| announced_dialable(a, &peer, self.allow_private))
                .take(ADDRESSES_MAX)
                .collect();
            let behaviour = self.swarm.behaviour_mut();
            for addr in &addresses {
                behaviour.kad.add_address(&peer, addr.clone());
            }
            behaviour.addresses.addresses.insert(peer, addresses);
        }
        self.held.insert(
            descriptor.node_id,
            HeldDescriptor {
                signed,
                published_at: descriptor.published_at,
                expires_at: descriptor.expires_at,
                peer,
            },
        );
        self.dirty = true;
    }

    fn expire(&mut self, now: UnixTime) {
        let expired: Vec<NodeId> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires_at <= now)
            .map(|(node, _)| *node)
            .collect();
        for node in expired {
            if let Some(held) = self.held.remove(&node) {
                if let Some(peer) = held.peer {
                    self.swarm.behaviour_mut().addresses.addresses.remove(&peer);
                }
                self.dirty = true;
            }
        }
    }

    fn maintain(&mut self) {
        self.expire(whispr_node_kit::clock::now());
        if self.swarm.connected_peers().next().is_none() {
            // Alone: try the bootstrap peers again.
            self.join_bootstrap();
        }
    }

    fn push_snapshot(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        self.shared.metrics.descriptors_held.store(
            u64::try_from(self.held.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let snapshot: Vec<SignedDescriptor> =
            self.held.values().map(|h| h.signed.clone()).collect();
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    /// Brings the next publication forward to `delay` from now, keeping publications at
    /// least [`PUBLISH_SPACING_MAX`] (or the publication interval, if shorter) apart.
    fn publish_soon(&mut self, delay: Duration) {
        let now = Instant::now();
        let mut at = now + delay;
        if let Some(last) = self.last_publish {
            at = at.max(last + self.publish_every.min(PUBLISH_SPACING_MAX));
        }
        self.next_publish = self.next_publish.min(at);
    }

    fn descriptor_addresses(&self) -> Vec<String> {
        let addresses: Vec<String> = if self.external.is_empty() {
            self.shared
                .listen_addrs
                .borrow()
                .iter()
                .filter(|a| !is_unspecified(a))
                .map(|a| a.to_string())
                .collect()
        } else {
            self.external.clone()
        };
        addresses
            .into_iter()
            .filter(|a| a.len() <= ADDRESS_LEN_MAX)
            .take(ADDRESSES_MAX)
            .collect()
    }

    fn publish(&mut self) {
        let now = whispr_node_kit::clock::now();
        self.last_publish = Some(Instant::now());
        self.next_publish = Instant::now() + self.publish_every;
        let descriptor = NodeDescriptor {
            node_id: self.shared.node_id,
            peer_id: self.shared.node_id.libp2p_peer_id_bytes(),
            roles: self.roles.iter().copied().collect(),
            mix_layer: self.mix_layer,
            addresses: self.descriptor_addresses(),
            api_url: self.api_url.clone(),
            sphinx_keys: self.public_keys.iter().copied().collect::<BTreeMap<_, _>>(),
            published_at: now,
            expires_at: now.saturating_add(self.validity),
        };
        let signed = match descriptor.sign(self.identity.signing_key()) {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign this node's descriptor");
                return;
            }
        };
        let bytes = signed.encode();
        self.own
            .send_replace(Some(Arc::new(super::submit::OwnDescriptor {
                descriptor: descriptor.clone(),
                signed: signed.clone(),
            })));
        self.hold(signed, &descriptor, None);
        // The node's own descriptor reaches the directory without waiting for the tick.
        self.push_snapshot();
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            Ok(_) => {}
            // Normal while no peer has subscribed yet; the next tick retries.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(error = %e, "descriptor publication failed"),
        }
    }
}

/// True for an address on `0.0.0.0` or `::`.
fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// An address from `peer`'s descriptor that may be dialled for it: specified, and with no
/// `/p2p/` component naming another peer.
fn dialable_for(addr: &Multiaddr, peer: &PeerId) -> bool {
    !is_unspecified(addr)
        && addr.iter().all(|p| match p {
            Protocol::P2p(other) => other == *peer,
            _ => true,
        })
}

/// Whether `addr` is loopback, private (RFC 1918, CGNAT 100.64/10, IPv6 ULA fc00::/7) or
/// link-local: an address of one host or one LAN, not of the internet. (An unspecified
/// address is not private: a node listening on `0.0.0.0` is a public node.)
fn is_private(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        Protocol::Ip6(ip) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_private() || v4.is_link_local())
        }
        Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost")
        }
        _ => false,
    })
}

/// An address a peer announced (descriptor or identify) that this node will dial for it:
/// [`dialable_for`], and not private unless `allow_private` (issue 16: gossiped private and
/// loopback addresses are ignored unless a devnet allows them).
fn announced_dialable(addr: &Multiaddr, peer: &PeerId, allow_private: bool) -> bool {
    dialable_for(addr, peer) && (allow_private || !is_private(addr))
}

/// Shows the kind of a dial error without the addresses or peer ids some variants carry.
struct DialErrorKind<'a>(&'a libp2p::swarm::DialError);

impl std::fmt::Display for DialErrorKind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use libp2p::swarm::DialError;
        f.write_str(match self.0 {
            DialError::LocalPeerId { .. } => "local peer id",
            DialError::NoAddresses => "no addresses",
            DialError::DialPeerConditionFalse(_) => "already dialling or connected",
            DialError::Aborted => "aborted",
            DialError::WrongPeerId { .. } => "wrong peer id",
            DialError::Denied { .. } => "denied",
            DialError::Transport(_) => "transport",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_node_ignores_announced_private_and_loopback_addresses() {
        // Issue 16 ("Transport"): before, a descriptor's or identify's addresses were dialled
        // whatever they were (only unspecified ones were skipped), so any peer could make a
        // public node dial into its own host or LAN.
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let private = [
            "/ip4/127.0.0.1/tcp/7410",
            "/ip4/10.1.2.3/tcp/7410",
            "/ip4/172.16.0.9/tcp/7410",
            "/ip4/192.168.1.1/tcp/7410",
            "/ip4/169.254.3.4/tcp/7410",
            "/ip4/100.64.0.1/tcp/7410",
            "/ip6/::1/tcp/7410",
            "/ip6/fd00::1/tcp/7410",
            "/ip6/fe80::1/tcp/7410",
            "/ip6/::ffff:192.168.0.1/tcp/7410",
            "/dns4/localhost/tcp/7410",
        ];
        for a in private {
            let addr: Multiaddr = a.parse().unwrap();
            assert!(!announced_dialable(&addr, &peer, false), "{a} admitted");
            assert!(
                announced_dialable(&addr, &peer, true),
                "{a} refused on a devnet"
            );
        }
        for a in [
            "/ip4/203.0.113.5/tcp/7410",
            "/ip6/2001:db8::5/tcp/7410",
            "/dns4/relay.example.org/tcp/7410",
            "/ip4/100.128.0.1/tcp/7410",
        ] {
            let addr: Multiaddr = a.parse().unwrap();
            assert!(announced_dialable(&addr, &peer, false), "{a} refused");
        }
        assert!(!announced_dialable(
            &"/ip4/0.0.0.0/tcp/1".parse().unwrap(),
            &peer,
            true
        ));
        // A node listening on 0.0.0.0 is public: it must not count as a devnet.
        assert!(!is_private(&"/ip4/0.0.0.0/tcp/7410".parse().unwrap()));
        assert!(is_private(&"/ip4/127.0.0.1/tcp/0".parse().unwrap()));
    }

    #[test]
    fn addresses_naming_another_peer_are_not_dialled() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let plain: Multiaddr = "/ip4/10.0.0.1/tcp/7400".parse().unwrap();
        assert!(dialable_for(&plain, &peer));
        assert!(dialable_for(
            &plain.clone().with(Protocol::P2p(peer)),
            &peer
        ));
        assert!(!dialable_for(&plain.with(Protocol::P2p(other)), &peer));
        let any: Multiaddr = "/ip4/0.0.0.0/tcp/7400".parse().unwrap();
        assert!(!dialable_for(&any, &peer));
    }
}
