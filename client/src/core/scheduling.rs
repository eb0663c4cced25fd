//! Scheduled sends: each fragment's deposit packet, built for the release time, is handed in
//! parts to a timer node with a cancel capability; a cancel asks every holding timer to drop
//! its part.

use rand::RngExt;
use sha2::{Digest, Sha256};
use whispr_protocol::directory::{Directory, Role};
use whispr_protocol::payload::{CancelHold, FinalMessage, HeldPacketPart};
use whispr_protocol::sphinx::PACKET_SIZE;
use whispr_protocol::{CancelCapability, DestinationAddress, HoldId, NodeId, UnixTime};

use super::{ClientCore, Output, SURB_TTL_MS, epoch_at};
use crate::error::{ClientError, Result};
use crate::state::{Hold, OutState, SurbPurpose};

impl ClientCore {
    /// Hands each fragment of outgoing `id`, as a packet built for `release_ms`, to a timer
    /// node (in parts), keeping the cancel capabilities.
    pub(super) fn schedule(&mut self, id: u64, release_ms: u64) -> Result<()> {
        let dir = self.dir()?;
        let timers: Vec<NodeId> = dir
            .nodes()
            .filter(|n| n.has_role(Role::Timer))
            .map(|n| n.node_id)
            .collect();
        if timers.is_empty() {
            return Err(ClientError::NoRoute(
                "no timer node in the directory".to_string(),
            ));
        }
        let count = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map_or(0, |o| o.fragments.len());
        let mut holds = Vec::new();
        for f in 0..count {
            let (_, packet, route) = self.deposit_packet(&dir, id, f, release_ms)?;
            let Some(&timer) = timers.get(self.rng.random_range(0..timers.len())) else {
                continue;
            };
            holds.push(Hold {
                hold_id: HoldId::random(&mut self.rng).0,
                capability: CancelCapability::random(&mut self.rng).0,
                timer: timer.0,
                first_hop: route.first().map(|n| n.0).unwrap_or_default(),
                parts_acked: vec![false; packet.len().div_ceil(PACKET_SIZE / 2 + 1)],
                packet,
                cancel_acked: false,
                attempts: 0,
                sent_ms: 0,
            });
        }
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            for fr in &mut o.fragments {
                fr.attempts = 1;
                fr.sent_ms = release_ms;
            }
            o.holds = holds;
        }
        let all: Vec<usize> = (0..count).collect();
        self.send_holds(&dir, id, &all)
    }

    /// Records a send (parts or cancel) of the holds `which` of outgoing `id`.
    fn holds_sent(&mut self, id: u64, which: &[usize]) {
        let now = self.now;
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            for &h in which {
                if let Some(hold) = o.holds.get_mut(h) {
                    hold.attempts = hold.attempts.saturating_add(1);
                    hold.sent_ms = now;
                }
            }
        }
    }

    /// Sends the unacknowledged parts of the holds `which` of outgoing `id`.
    pub(super) fn send_holds(&mut self, dir: &Directory, id: u64, which: &[usize]) -> Result<()> {
        let now = self.now;
        let epoch = epoch_at(now);
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Ok(());
        };
        let contact = o.contact.clone();
        let release = o.release_ms.unwrap_or(now);
        let holds = o.holds.clone();
        let mine = self.contact(&contact)?.mine.clone();
        for &h in which {
            let Some(hold) = holds.get(h) else { continue };
            let chunks: Vec<&[u8]> = hold.packet.chunks(PACKET_SIZE / 2 + 1).collect();
            let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            for (p, data) in chunks.iter().enumerate() {
                if hold.parts_acked.get(p).copied().unwrap_or(false) {
                    continue;
                }
                let surb = self.new_surb(
                    dir,
                    &mine,
                    hold.attempts,
                    SurbPurpose::HoldAck {
                        out: id,
                        hold: h,
                        part: p,
                    },
                    epoch,
                    now + SURB_TTL_MS,
                )?;
                let part = HeldPacketPart {
                    hold_id: HoldId(hold.hold_id),
                    part_index: u32::try_from(p).unwrap_or(u32::MAX),
                    part_count: count,
                    release_at: UnixTime(release),
                    cancel_hash: Sha256::digest(hold.capability).into(),
                    first_hop: NodeId(hold.first_hop),
                    data: data.to_vec(),
                    ack_surb: Some(surb),
                };
                self.service_packet(dir, &NodeId(hold.timer), FinalMessage::Hold(part))?;
            }
        }
        self.holds_sent(id, which);
        Ok(())
    }

    /// Queues a packet for a node's service address (timer holds and cancels).
    fn service_packet(
        &mut self,
        dir: &Directory,
        node: &NodeId,
        message: FinalMessage,
    ) -> Result<()> {
        let epoch = epoch_at(self.now);
        let route = self.route(dir, epoch, node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let packet = self.codec.build_packet(
            &mut self.crypto_rng,
            &route,
            &delays,
            DestinationAddress::NODE_SERVICE,
            &message.encode()?,
        )?;
        let edge = route.first().map_or(*node, |h| h.node);
        self.push(Output::Transmit { edge, packet });
        Ok(())
    }

    /// Cancels scheduled send `id` before its release: each timer node holding a part of it
    /// is sent the cancel capability.
    pub fn cancel(&mut self, now: u64, id: u64) -> Result<()> {
        self.at(now);
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Err(ClientError::UnknownScheduled(id));
        };
        if !matches!(
            o.state,
            OutState::Scheduled | OutState::Held | OutState::Cancelling
        ) || o.release_ms.is_none_or(|r| r <= now)
        {
            return Err(ClientError::UnknownScheduled(id));
        }
        let dir = self.dir()?;
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            o.state = OutState::Cancelling;
            for h in &mut o.holds {
                h.attempts = 0;
            }
        }
        let all: Vec<usize> = (0..self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map_or(0, |o| o.holds.len()))
            .collect();
        let result = self.send_cancels(&dir, id, &all);
        self.save();
        result
    }

    /// Sends the cancels of the holds `which` of outgoing `id` not acknowledged yet.
    pub(super) fn send_cancels(&mut self, dir: &Directory, id: u64, which: &[usize]) -> Result<()> {
        let now = self.now;
        let epoch = epoch_at(now);
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Ok(());
        };
        let holds = o.holds.clone();
        let mine = self.contact(&o.contact.clone())?.mine.clone();
        for &h in which {
            let Some(hold) = holds.get(h) else { continue };
            if hold.cancel_acked {
                continue;
            }
            let surb = self.new_surb(
                dir,
                &mine,
                hold.attempts,
                SurbPurpose::HoldAck {
                    out: id,
                    hold: h,
                    part: usize::MAX,
                },
                epoch,
                now + SURB_TTL_MS,
            )?;
            self.service_packet(
                dir,
                &NodeId(hold.timer),
                FinalMessage::Cancel(CancelHold {
                    hold_id: HoldId(hold.hold_id),
                    capability: CancelCapability(hold.capability),
                    ack_surb: Some(surb),
                }),
            )?;
        }
        self.holds_sent(id, which);
        Ok(())
    }
}
