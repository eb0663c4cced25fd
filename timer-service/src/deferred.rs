//! Deferred sends: the interface between the timer queue and the mesh.
//!
//! A deferred send is a Sphinx packet that a timer node injects into the mesh at a given
//! time. The timer node reassembles a held packet from its `HeldPacketPart`s
//! ([`crate::holds::HoldAssembler`]) and stores [`DeferredSend::encode`] as the task payload;
//! when the task fires, the node hands the decoded value to a [`PacketInjector`].

use whispr_protocol::NodeId;
use whispr_protocol::sphinx::{PACKET_SIZE, Packet};

use crate::error::{Result, TimerError};

/// Length of an encoded [`DeferredSend`].
pub const ENCODED_LEN: usize = 32 + 32 + PACKET_SIZE;

/// Priority of deferred sends (held packets) in the timer queue.
pub const DEFERRED_SEND_PRIORITY: u8 = 5;

/// The timer-queue task that releases a completed hold: its id (the hold id, so that a
/// retransmitted part finds it) and the task. The timer node and the simulator schedule
/// holds through this one function.
pub fn release_task(
    hold: crate::holds::CompletedHold,
) -> (crate::task::TaskId, crate::task::NewTask) {
    let send = DeferredSend {
        first_hop: hold.first_hop,
        cancel_hash: hold.cancel_hash,
        packet: hold.packet,
    };
    (
        crate::task::TaskId(hold.hold_id.0),
        crate::task::NewTask {
            category: crate::task::Category::DeferredSend,
            priority: DEFERRED_SEND_PRIORITY,
            due_at: hold.release_at,
            payload: send.encode(),
            owner: None,
        },
    )
}

/// A packet to inject and the node to send it to.
#[derive(Clone, PartialEq, Eq)]
pub struct DeferredSend {
    /// The first hop of the held packet's route.
    pub first_hop: NodeId,
    /// SHA-256 of the capability that cancels it (all zeros when nothing may cancel it).
    pub cancel_hash: [u8; 32],
    /// The held packet.
    pub packet: Packet,
}

impl std::fmt::Debug for DeferredSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredSend")
            .field("first_hop", &self.first_hop)
            .field("packet", &self.packet)
            .finish_non_exhaustive()
    }
}

impl DeferredSend {
    /// Task payload: first hop (32 bytes) ‖ cancel hash (32 bytes) ‖ packet ([`PACKET_SIZE`]
    /// bytes), [`ENCODED_LEN`] bytes in all.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.extend_from_slice(self.first_hop.as_bytes());
        out.extend_from_slice(&self.cancel_hash);
        out.extend_from_slice(self.packet.as_bytes());
        out
    }

    /// Reads [`DeferredSend::encode`] back; [`TimerError::Corrupt`] unless `bytes` is exactly
    /// [`ENCODED_LEN`] bytes long.
    pub fn decode(bytes: &[u8]) -> Result<DeferredSend> {
        if bytes.len() != ENCODED_LEN {
            return Err(TimerError::Corrupt("deferred send length"));
        }
        let (hop, rest) = bytes
            .split_first_chunk::<32>()
            .ok_or(TimerError::Corrupt("deferred send length"))?;
        let (cancel_hash, packet) = rest
            .split_first_chunk::<32>()
            .ok_or(TimerError::Corrupt("deferred send length"))?;
        Ok(DeferredSend {
            first_hop: NodeId(*hop),
            cancel_hash: *cancel_hash,
            packet: Packet::from_bytes(packet)
                .map_err(|_| TimerError::Corrupt("deferred send packet size"))?,
        })
    }
}

/// What the mesh gives the timer node to send held packets with.
pub trait PacketInjector: Send + Sync + 'static {
    /// Sends `send.packet` to `send.first_hop`. An error makes the task retry later.
    fn inject(&self, send: DeferredSend) -> std::result::Result<(), String>;
}

/// The injector of a timer node not joined to a mesh: every deferred send fails (and is
/// retried with back-off, then quarantined), so nothing is silently dropped.
#[derive(Debug, Default)]
pub struct NoMesh;

impl PacketInjector for NoMesh {
    fn inject(&self, _send: DeferredSend) -> std::result::Result<(), String> {
        Err("not connected to a mesh".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send() -> DeferredSend {
        let packet: Vec<u8> = (0..PACKET_SIZE).map(|i| (i % 251) as u8).collect();
        DeferredSend {
            first_hop: NodeId([7; 32]),
            cancel_hash: [9; 32],
            packet: Packet::from_bytes(&packet).unwrap(),
        }
    }

    #[test]
    fn encoding_round_trips_and_has_the_documented_layout() {
        let s = send();
        let bytes = s.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(&bytes[..32], &[7; 32]);
        assert_eq!(&bytes[32..64], &[9; 32]);
        assert_eq!(&bytes[64..], s.packet.as_bytes());
        assert_eq!(DeferredSend::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn decode_refuses_every_other_length() {
        let bytes = send().encode();
        for len in [0, 31, 32, 63, 64, 32 + PACKET_SIZE, ENCODED_LEN - 1] {
            assert!(matches!(
                DeferredSend::decode(&bytes[..len]),
                Err(TimerError::Corrupt(_))
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            DeferredSend::decode(&longer),
            Err(TimerError::Corrupt(_))
        ));
    }
}
