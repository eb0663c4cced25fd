//! Deferred sends: the interface between the timer queue and the mesh.
//!
//! A deferred send is a Sphinx packet that a timer node injects into the mesh at a given
//! time. The mesh layer (relay driver embedded in the timer node) reassembles a held packet
//! from its `HeldPacketPart`s and calls [`DeferredSend::encode`] to make the task payload; when
//! the task fires, the node hands the decoded value to a [`PacketInjector`].

use whispr_protocol::NodeId;
use whispr_protocol::sphinx::{PACKET_SIZE, Packet};

use crate::error::{Result, TimerError};

/// A packet to inject and the node to send it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeferredSend {
    /// The first hop of the held packet's route.
    pub first_hop: NodeId,
    /// The held packet.
    pub packet: Packet,
}

impl DeferredSend {
    /// Task payload: first hop (32 bytes) ‖ packet ([`PACKET_SIZE`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + PACKET_SIZE);
        out.extend_from_slice(self.first_hop.as_bytes());
        out.extend_from_slice(self.packet.as_bytes());
        out
    }

    /// Reads [`DeferredSend::encode`] back.
    pub fn decode(bytes: &[u8]) -> Result<DeferredSend> {
        let (hop, packet) = bytes
            .split_first_chunk::<32>()
            .ok_or(TimerError::Corrupt("deferred send shorter than a node id"))?;
        Ok(DeferredSend {
            first_hop: NodeId(*hop),
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
