//! The two crypto modes.
//!
//! * `real`: Sphinx ([`whispr_protocol::sphinx`]) and HPKE sealed-sender envelopes, exactly as
//!   clients and nodes run them.
//! * `fast`: the same routers, mailbox and timer cores, with a cheap packet codec plugged in
//!   behind [`PacketProcessor`] (the router's only cryptographic call). A fast packet is the
//!   same size as a Sphinx packet ([`PACKET_SIZE`]) but carries its route in clear: a header
//!   with the hop index, the route's node ids and per-hop delays, the destination and SURB id,
//!   then the plaintext. Processing a hop reads the entry at the hop index and bumps it. The
//!   replay tag is the packet's random nonce with the hop index (so replays are still caught),
//!   and keys are not checked (every packet opens with the first key given). SURBs are the
//!   same header without the plaintext. Envelopes carry zero filler of the exact length the
//!   HPKE ciphertext would have instead of a ciphertext, and the recipient identifies a
//!   message by its dedup id instead of opening it.
//!
//!   What `fast` therefore does not model: the cost of the cryptography (which is what it
//!   removes), and failures of it (a wrong key or a tampered header is never refused).
//!   Routing, delays, replay filtering, rate limits, queue bounds, mailbox and timer logic,
//!   sizes on the wire and storage are the real code and the real sizes.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use whispr_protocol::sphinx::{
    self, HopAction, PACKET_SIZE, PAYLOAD_SIZE, PLAINTEXT_LEN_MAX, Packet, PacketProcessor,
    Processed, REPLAY_TAG_SIZE, ReplayTag, RouteHop, SURB_SIZE, SphinxProcessor, SphinxSecretKey,
    Surb, SurbRecovery,
};
use whispr_protocol::{DestinationAddress, Error, NodeId, Result, SurbId};

/// Crypto mode of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Sphinx and HPKE as in production.
    Real,
    /// The cheap codec (see the module documentation).
    Fast,
}

const MAGIC: u8 = 0xF5;
const KIND_FORWARD: u8 = 0;
const KIND_REPLY: u8 = 1;
const HOP_ENTRY: usize = 32 + 4;
const HOPS: usize = sphinx::HOPS_MAX;
/// magic, kind, hop index, hop count, nonce.
const PREFIX: usize = 4 + 16;
const ROUTE_END: usize = PREFIX + HOPS * HOP_ENTRY;
/// Route, destination, SURB id.
const HEADER: usize = ROUTE_END + 32 + 16;
const LEN_AT: usize = HEADER;
const BODY_AT: usize = HEADER + 2;

// Both layouts must fit the fixed sizes they stand in for.
const _: () = assert!(HEADER <= SURB_SIZE);
const _: () = assert!(BODY_AT + PLAINTEXT_LEN_MAX <= PACKET_SIZE);
const _: () = assert!(2 + PLAINTEXT_LEN_MAX <= PAYLOAD_SIZE);

/// The fast [`PacketProcessor`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FastProcessor;

fn invalid(what: &'static str) -> Error {
    Error::InvalidPacket(what)
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let b = bytes
        .get(at..at + 4)
        .ok_or(invalid("fast packet too short"))?;
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    Ok(u32::from_be_bytes(a))
}

fn read_32(bytes: &[u8], at: usize) -> Result<[u8; 32]> {
    let b = bytes
        .get(at..at + 32)
        .ok_or(invalid("fast packet too short"))?;
    let mut a = [0u8; 32];
    a.copy_from_slice(b);
    Ok(a)
}

impl PacketProcessor for FastProcessor {
    fn process(&self, keys: &[&SphinxSecretKey], bytes: &[u8]) -> Result<Processed> {
        if bytes.len() != PACKET_SIZE {
            return Err(Error::BadLength {
                what: "sphinx packet",
                len: bytes.len(),
                expected: PACKET_SIZE,
            });
        }
        if keys.is_empty() {
            return Err(Error::HeaderIntegrity);
        }
        let (&magic, rest) = bytes.split_first().ok_or(invalid("empty"))?;
        if magic != MAGIC {
            return Err(invalid("not a fast packet"));
        }
        let kind = *rest.first().ok_or(invalid("short"))?;
        let hop = usize::from(*rest.get(1).ok_or(invalid("short"))?);
        let count = usize::from(*rest.get(2).ok_or(invalid("short"))?);
        if count == 0 || count > HOPS || hop >= count {
            return Err(invalid("fast packet hop out of range"));
        }
        let mut tag = [0u8; REPLAY_TAG_SIZE];
        tag.get_mut(..16)
            .ok_or(invalid("tag"))?
            .copy_from_slice(bytes.get(4..PREFIX).ok_or(invalid("short"))?);
        // The hop index keeps tags distinct along one route (a node may appear twice).
        if let Some(t) = tag.get_mut(16) {
            *t = u8::try_from(hop).unwrap_or(u8::MAX);
        }
        let replay_tag = ReplayTag(tag);
        let action = if hop + 1 < count {
            let entry = PREFIX + (hop + 1) * HOP_ENTRY;
            let next_hop = NodeId(read_32(bytes, entry)?);
            let delay_ms = read_u32(bytes, PREFIX + hop * HOP_ENTRY + 32)?;
            let delay = Duration::from_millis(u64::from(delay_ms));
            if delay > sphinx::HOP_DELAY_MAX {
                return Err(invalid("hop delay above HOP_DELAY_MAX"));
            }
            let mut next = bytes.to_vec();
            if let Some(h) = next.get_mut(2) {
                *h = u8::try_from(hop + 1).unwrap_or(u8::MAX);
            }
            HopAction::Forward {
                next_hop,
                delay,
                packet: Packet::from_bytes(&next)?,
            }
        } else {
            let destination = DestinationAddress(read_32(bytes, ROUTE_END)?);
            let mut id = [0u8; 16];
            id.copy_from_slice(bytes.get(ROUTE_END + 32..HEADER).ok_or(invalid("short"))?);
            let len = usize::from(u16::from_be_bytes([
                *bytes.get(LEN_AT).ok_or(invalid("short"))?,
                *bytes.get(LEN_AT + 1).ok_or(invalid("short"))?,
            ]));
            let body = bytes
                .get(BODY_AT..BODY_AT + len)
                .ok_or(invalid("fast packet body length"))?
                .to_vec();
            match kind {
                KIND_FORWARD => HopAction::Deliver {
                    destination,
                    plaintext: body,
                },
                KIND_REPLY => {
                    // A real sealed reply is a whole Sphinx payload; store as many bytes.
                    let mut sealed = vec![0u8; PAYLOAD_SIZE];
                    if let Some(prefix) = sealed.get_mut(..2) {
                        prefix.copy_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
                    }
                    sealed
                        .get_mut(2..2 + body.len())
                        .ok_or(invalid("reply too long"))?
                        .copy_from_slice(&body);
                    HopAction::DeliverSurbReply {
                        destination,
                        surb_id: SurbId(id),
                        sealed,
                    }
                }
                _ => return Err(invalid("unknown fast packet kind")),
            }
        };
        Ok(Processed {
            replay_tag,
            key_index: 0,
            action,
        })
    }
}

/// The header of a fast packet or SURB: route, delays, destination, SURB id.
fn fast_header<R: Rng + ?Sized>(
    rng: &mut R,
    kind: u8,
    route: &[RouteHop],
    delays: &[Duration],
    destination: DestinationAddress,
    surb_id: [u8; 16],
    len: usize,
) -> Result<Vec<u8>> {
    if route.is_empty() || route.len() > HOPS || delays.len() + 1 != route.len() {
        return Err(Error::InvalidArgument(
            "route of 1 to 5 hops with one delay less",
        ));
    }
    let mut out = vec![0u8; len];
    let count = u8::try_from(route.len()).map_err(|_| invalid("route"))?;
    out.get_mut(..4)
        .ok_or(invalid("len"))?
        .copy_from_slice(&[MAGIC, kind, 0, count]);
    rng.fill_bytes(out.get_mut(4..PREFIX).ok_or(invalid("len"))?);
    for (i, hop) in route.iter().enumerate() {
        let at = PREFIX + i * HOP_ENTRY;
        out.get_mut(at..at + 32)
            .ok_or(invalid("len"))?
            .copy_from_slice(hop.node.as_bytes());
        let delay = delays.get(i).copied().unwrap_or_default();
        if delay > sphinx::HOP_DELAY_MAX {
            return Err(Error::InvalidArgument("hop delay above HOP_DELAY_MAX"));
        }
        let ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        out.get_mut(at + 32..at + 36)
            .ok_or(invalid("len"))?
            .copy_from_slice(&ms.to_be_bytes());
    }
    out.get_mut(ROUTE_END..ROUTE_END + 32)
        .ok_or(invalid("len"))?
        .copy_from_slice(&destination.0);
    out.get_mut(ROUTE_END + 32..HEADER)
        .ok_or(invalid("len"))?
        .copy_from_slice(&surb_id);
    Ok(out)
}

fn put_body(packet: &mut [u8], body: &[u8]) -> Result<()> {
    if body.len() > PLAINTEXT_LEN_MAX {
        return Err(Error::TooLarge {
            what: "packet plaintext",
            len: body.len(),
            max: PLAINTEXT_LEN_MAX,
        });
    }
    let len = u16::try_from(body.len()).map_err(|_| invalid("len"))?;
    packet
        .get_mut(LEN_AT..BODY_AT)
        .ok_or(invalid("len"))?
        .copy_from_slice(&len.to_be_bytes());
    packet
        .get_mut(BODY_AT..BODY_AT + body.len())
        .ok_or(invalid("len"))?
        .copy_from_slice(body);
    Ok(())
}

/// What the sender keeps to read a SURB reply: Sphinx recovery material in `real` mode,
/// nothing in `fast` mode (the reply travels in clear).
#[derive(Debug)]
pub enum Recovery {
    /// Sphinx.
    Real(SurbRecovery),
    /// Fast.
    Fast,
}

impl Recovery {
    /// Opens a SURB reply.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>> {
        match self {
            Recovery::Real(r) => r.open(sealed),
            Recovery::Fast => {
                let len = sealed
                    .get(..2)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map(|b| usize::from(u16::from_be_bytes(b)))
                    .ok_or(invalid("short fast reply"))?;
                Ok(sealed
                    .get(2..2 + len)
                    .ok_or(invalid("fast reply length"))?
                    .to_vec())
            }
        }
    }
}

impl Mode {
    /// The processor routers use in this mode.
    pub fn processor(self) -> std::sync::Arc<dyn PacketProcessor> {
        match self {
            Mode::Real => std::sync::Arc::new(SphinxProcessor),
            Mode::Fast => std::sync::Arc::new(FastProcessor),
        }
    }

    /// [`sphinx::build_packet`] in this mode.
    pub fn build_packet<R: rand::CryptoRng + ?Sized>(
        self,
        rng: &mut R,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        plaintext: &[u8],
    ) -> Result<Packet> {
        match self {
            Mode::Real => sphinx::build_packet(rng, route, delays, destination, plaintext),
            Mode::Fast => {
                let mut p = fast_header(
                    rng,
                    KIND_FORWARD,
                    route,
                    delays,
                    destination,
                    [0u8; 16],
                    PACKET_SIZE,
                )?;
                put_body(&mut p, plaintext)?;
                Packet::from_bytes(&p)
            }
        }
    }

    /// [`sphinx::create_surb`] in this mode.
    pub fn create_surb<R: rand::CryptoRng + ?Sized>(
        self,
        rng: &mut R,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        surb_id: SurbId,
    ) -> Result<(Surb, Recovery)> {
        match self {
            Mode::Real => sphinx::create_surb(rng, route, delays, destination, surb_id)
                .map(|(s, r)| (s, Recovery::Real(r))),
            Mode::Fast => {
                if surb_id.0 == [0u8; 16] {
                    return Err(Error::InvalidArgument("a SURB id must not be zero"));
                }
                let h = fast_header(
                    rng,
                    KIND_REPLY,
                    route,
                    delays,
                    destination,
                    surb_id.0,
                    SURB_SIZE,
                )?;
                Ok((Surb::from_bytes(&h)?, Recovery::Fast))
            }
        }
    }

    /// [`sphinx::use_surb`] in this mode.
    pub fn use_surb(self, surb: &Surb, reply: &[u8]) -> Result<(NodeId, Packet)> {
        match self {
            Mode::Real => sphinx::use_surb(surb, reply),
            Mode::Fast => {
                let header = surb.as_bytes();
                if header.first() != Some(&MAGIC) || header.get(1) != Some(&KIND_REPLY) {
                    return Err(invalid("not a fast SURB"));
                }
                let first = NodeId(read_32(header, PREFIX)?);
                let mut p = vec![0u8; PACKET_SIZE];
                p.get_mut(..HEADER)
                    .ok_or(invalid("len"))?
                    .copy_from_slice(header.get(..HEADER).ok_or(invalid("short SURB"))?);
                put_body(&mut p, reply)?;
                Ok((first, Packet::from_bytes(&p)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use whispr_protocol::sphinx::SphinxPublicKey;

    fn route(n: usize) -> Vec<RouteHop> {
        (0..n)
            .map(|i| RouteHop {
                node: NodeId([u8::try_from(i).unwrap() + 1; 32]),
                sphinx_key: SphinxPublicKey::from([9u8; 32]),
            })
            .collect()
    }

    #[test]
    fn fast_packets_walk_their_route_and_deliver() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let key = SphinxSecretKey::from([7u8; 32]);
        let r = route(4);
        let delays = [5, 6, 7].map(Duration::from_millis);
        let dest = DestinationAddress([3u8; 32]);
        let p = Mode::Fast
            .build_packet(&mut rng, &r, &delays, dest, b"hello")
            .unwrap();
        assert_eq!(p.as_bytes().len(), PACKET_SIZE);
        let mut bytes = p.into_bytes();
        let mut tags = Vec::new();
        for hop in 0..3 {
            let out = FastProcessor.process(&[&key], &bytes).unwrap();
            tags.push(out.replay_tag.0);
            match out.action {
                HopAction::Forward {
                    next_hop,
                    delay,
                    packet,
                } => {
                    assert_eq!(next_hop, r[hop + 1].node);
                    assert_eq!(delay, delays[hop]);
                    bytes = packet.into_bytes();
                }
                other => panic!("{other:?}"),
            }
        }
        let out = FastProcessor.process(&[&key], &bytes).unwrap();
        tags.push(out.replay_tag.0);
        match out.action {
            HopAction::Deliver {
                destination,
                plaintext,
            } => {
                assert_eq!(destination, dest);
                assert_eq!(plaintext, b"hello");
            }
            other => panic!("{other:?}"),
        }
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), 4, "one distinct replay tag per hop");
        assert!(
            FastProcessor.process(&[], &bytes).is_err(),
            "no key, no entry"
        );
    }

    #[test]
    fn fast_surbs_carry_replies_back() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let key = SphinxSecretKey::from([7u8; 32]);
        let r = route(2);
        let id = SurbId([4u8; 16]);
        let dest = DestinationAddress([8u8; 32]);
        let (surb, recovery) = Mode::Fast
            .create_surb(&mut rng, &r, &[Duration::ZERO], dest, id)
            .unwrap();
        let (first, packet) = Mode::Fast.use_surb(&surb, b"ack").unwrap();
        assert_eq!(first, r[0].node);
        let out = FastProcessor.process(&[&key], packet.as_bytes()).unwrap();
        let HopAction::Forward { packet, .. } = out.action else {
            panic!("forward expected")
        };
        let out = FastProcessor.process(&[&key], packet.as_bytes()).unwrap();
        match out.action {
            HopAction::DeliverSurbReply {
                destination,
                surb_id,
                sealed,
            } => {
                assert_eq!((destination, surb_id), (dest, id));
                assert_eq!(recovery.open(&sealed).unwrap(), b"ack");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fast_decoder_refuses_garbage_without_panicking() {
        let key = SphinxSecretKey::from([7u8; 32]);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for len in [0, 1, 100, PACKET_SIZE - 1, PACKET_SIZE, PACKET_SIZE + 1] {
            for _ in 0..50 {
                let mut b = vec![0u8; len];
                rng.fill_bytes(&mut b);
                if let Some(m) = b.first_mut() {
                    *m = MAGIC;
                }
                let _ = FastProcessor.process(&[&key], &b);
            }
        }
    }
}
