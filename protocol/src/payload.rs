//! What travels inside a Sphinx payload: [`FinalMessage`] for a final hop (a deposit for a
//! mailbox, or a hold or cancel request for a timer node), and [`Reply`] inside a SURB reply.

use crate::envelope::Envelope;
use crate::prekeys::PrekeyBundle;
use crate::sphinx::{PACKET_SIZE, PLAINTEXT_LEN_MAX, Surb};
use crate::wire;
use crate::{
    AccessToken, CancelCapability, DedupId, DestinationAddress, Error, HoldId, MailboxId, NodeId,
    Result, UnixTime,
};

/// Most parts a held packet is split into.
pub const HOLD_PARTS_MAX: u32 = 4;

/// One part of a packet a timer node holds until `release_at`, then sends to `first_hop`.
#[derive(Clone, PartialEq, Eq)]
pub struct HeldPacketPart {
    /// Groups the parts of one held packet.
    pub hold_id: HoldId,
    /// Index of this part.
    pub part_index: u32,
    /// Number of parts.
    pub part_count: u32,
    /// When to inject the packet.
    pub release_at: UnixTime,
    /// SHA-256 of the cancel capability.
    pub cancel_hash: [u8; 32],
    /// Where to send the packet.
    pub first_hop: NodeId,
    /// This part's bytes of the held packet.
    pub data: Vec<u8>,
    /// Reply block for the acknowledgement.
    pub ack_surb: Option<Surb>,
}

impl std::fmt::Debug for HeldPacketPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldPacketPart")
            .field("hold_id", &self.hold_id)
            .field("part", &(self.part_index, self.part_count))
            .field("release_at", &self.release_at)
            .field("first_hop", &self.first_hop)
            .field("data_len", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// A request to drop a held packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelHold {
    /// The held packet.
    pub hold_id: HoldId,
    /// Its cancel capability.
    pub capability: CancelCapability,
    /// Reply block for the acknowledgement.
    pub ack_surb: Option<Surb>,
}

/// An anonymous request for one of a mailbox owner's prekeys, answered through a SURB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyRequest {
    /// The mailbox whose owner's prekey is wanted.
    pub mailbox_id: MailboxId,
    /// The mailbox's access key (only contacts may consume one-time prekeys).
    pub access_token: AccessToken,
    /// Where the bundle goes.
    pub reply_surb: Surb,
}

/// The plaintext of a forward packet at its final hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinalMessage {
    /// A sealed envelope for a mailbox.
    Deposit(Envelope),
    /// Part of a packet for a timer node to hold.
    Hold(HeldPacketPart),
    /// Cancel a held packet.
    Cancel(CancelHold),
    /// Ask a mailbox node for a prekey bundle.
    PrekeyRequest(PrekeyRequest),
}

fn optional_surb(bytes: &[u8]) -> Result<Option<Surb>> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        Surb::from_bytes(bytes).map(Some)
    }
}

fn surb_bytes(surb: Option<&Surb>) -> Vec<u8> {
    surb.map(|s| s.as_bytes().to_vec()).unwrap_or_default()
}

impl FinalMessage {
    /// Encodes it; fails if it would not fit in one Sphinx payload.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = match self {
            FinalMessage::Deposit(envelope) => {
                wire::final_payload::Body::Deposit(envelope.to_wire())
            }
            FinalMessage::Hold(h) => wire::final_payload::Body::Hold(wire::HeldPacketPart {
                hold_id: h.hold_id.as_bytes().to_vec(),
                part_index: h.part_index,
                part_count: h.part_count,
                release_at_ms: h.release_at.0,
                cancel_hash: h.cancel_hash.to_vec(),
                first_hop: h.first_hop.as_bytes().to_vec(),
                data: h.data.clone(),
                ack_surb: surb_bytes(h.ack_surb.as_ref()),
            }),
            FinalMessage::Cancel(c) => wire::final_payload::Body::Cancel(wire::CancelHold {
                hold_id: c.hold_id.as_bytes().to_vec(),
                capability: c.capability.as_bytes().to_vec(),
                ack_surb: surb_bytes(c.ack_surb.as_ref()),
            }),
            FinalMessage::PrekeyRequest(r) => {
                wire::final_payload::Body::PrekeyRequest(wire::PrekeyRequest {
                    mailbox_id: r.mailbox_id.as_bytes().to_vec(),
                    access_token: r.access_token.as_bytes().to_vec(),
                    reply_surb: r.reply_surb.as_bytes().to_vec(),
                })
            }
        };
        let bytes = wire::encode(&wire::FinalPayload {
            version: wire::VERSION,
            body: Some(body),
        });
        if bytes.len() > PLAINTEXT_LEN_MAX {
            return Err(Error::TooLarge {
                what: "final payload",
                len: bytes.len(),
                max: PLAINTEXT_LEN_MAX,
            });
        }
        Ok(bytes)
    }

    /// Decodes the plaintext a final hop received for `destination` and checks that the two
    /// agree: a deposit must be addressed to its envelope's mailbox, hold and cancel requests
    /// to [`DestinationAddress::NODE_SERVICE`], a prekey request to its mailbox. Final hops
    /// use this, not [`Self::decode`].
    pub fn decode_for(destination: DestinationAddress, bytes: &[u8]) -> Result<FinalMessage> {
        let message = FinalMessage::decode(bytes)?;
        let matches = match &message {
            FinalMessage::Deposit(envelope) => {
                destination == DestinationAddress::mailbox(&envelope.outer.mailbox_id)
            }
            FinalMessage::PrekeyRequest(r) => {
                destination == DestinationAddress::mailbox(&r.mailbox_id)
            }
            FinalMessage::Hold(_) | FinalMessage::Cancel(_) => {
                destination == DestinationAddress::NODE_SERVICE
            }
        };
        if !matches {
            return Err(Error::Malformed {
                what: "final payload",
                reason: "does not match the packet's destination",
            });
        }
        Ok(message)
    }

    /// Decodes and validates a final payload (without checking it against a destination).
    pub fn decode(bytes: &[u8]) -> Result<FinalMessage> {
        let payload: wire::FinalPayload = wire::decode(bytes, PLAINTEXT_LEN_MAX)?;
        match payload.body {
            None => Err(Error::Malformed {
                what: "final payload",
                reason: "no body",
            }),
            Some(wire::final_payload::Body::Deposit(e)) => {
                Envelope::from_wire(e).map(FinalMessage::Deposit)
            }
            Some(wire::final_payload::Body::Hold(h)) => {
                if h.part_count == 0
                    || h.part_count > HOLD_PARTS_MAX
                    || h.part_index >= h.part_count
                {
                    return Err(Error::Malformed {
                        what: "held packet part",
                        reason: "part index/count out of range",
                    });
                }
                if h.data.len() > PACKET_SIZE {
                    return Err(Error::TooLarge {
                        what: "held packet part",
                        len: h.data.len(),
                        max: PACKET_SIZE,
                    });
                }
                let cancel_hash = <[u8; 32]>::try_from(h.cancel_hash.as_slice()).map_err(|_| {
                    Error::BadLength {
                        what: "cancel hash",
                        len: h.cancel_hash.len(),
                        expected: 32,
                    }
                })?;
                Ok(FinalMessage::Hold(HeldPacketPart {
                    hold_id: HoldId::from_slice("hold id", &h.hold_id)?,
                    part_index: h.part_index,
                    part_count: h.part_count,
                    release_at: UnixTime(h.release_at_ms),
                    cancel_hash,
                    first_hop: NodeId::from_slice("first hop", &h.first_hop)?,
                    data: h.data,
                    ack_surb: optional_surb(&h.ack_surb)?,
                }))
            }
            Some(wire::final_payload::Body::Cancel(c)) => Ok(FinalMessage::Cancel(CancelHold {
                hold_id: HoldId::from_slice("hold id", &c.hold_id)?,
                capability: CancelCapability::from_slice("cancel capability", &c.capability)?,
                ack_surb: optional_surb(&c.ack_surb)?,
            })),
            Some(wire::final_payload::Body::PrekeyRequest(r)) => {
                let mailbox_id = MailboxId::from_slice("mailbox id", &r.mailbox_id)?;
                if mailbox_id.0 == [0u8; 32] {
                    return Err(Error::Malformed {
                        what: "prekey request",
                        reason: "reserved all-zero mailbox id",
                    });
                }
                Ok(FinalMessage::PrekeyRequest(PrekeyRequest {
                    mailbox_id,
                    access_token: AccessToken::from_slice("access token", &r.access_token)?,
                    reply_surb: Surb::from_bytes(&r.reply_surb)?,
                }))
            }
        }
    }
}

/// What the creator of a SURB reads in the reply.
// A prekey bundle is ~200 bytes; replies are short-lived values, not stored in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A mailbox stored the deposit `dedup_id` until `expires_at`.
    DepositAck {
        /// The deposit's dedup id.
        dedup_id: DedupId,
        /// When the mailbox drops it.
        expires_at: UnixTime,
    },
    /// A timer node holds (or cancelled) `hold_id`.
    HoldAck {
        /// The held packet.
        hold_id: HoldId,
        /// True when it was cancelled.
        cancelled: bool,
    },
    /// Application data.
    Data(Vec<u8>),
    /// A mailbox node's answer to a prekey request.
    Prekeys(PrekeyBundle),
}

impl Reply {
    /// Encodes it; fails if it would not fit in a SURB reply.
    pub fn encode(&self) -> Result<Vec<u8>> {
        use wire::reply_body::Body;
        let body = match self {
            Reply::DepositAck {
                dedup_id,
                expires_at,
            } => Body::DepositAck(wire::DepositAck {
                dedup_id: dedup_id.as_bytes().to_vec(),
                expires_at_ms: expires_at.0,
            }),
            Reply::HoldAck { hold_id, cancelled } => Body::HoldAck(wire::HoldAck {
                hold_id: hold_id.as_bytes().to_vec(),
                cancelled: *cancelled,
            }),
            Reply::Data(data) => Body::Data(data.clone()),
            Reply::Prekeys(bundle) => Body::PrekeyBundle(bundle.to_wire()),
        };
        let bytes = wire::encode(&wire::ReplyBody {
            version: wire::VERSION,
            body: Some(body),
        });
        if bytes.len() > PLAINTEXT_LEN_MAX {
            return Err(Error::TooLarge {
                what: "reply",
                len: bytes.len(),
                max: PLAINTEXT_LEN_MAX,
            });
        }
        Ok(bytes)
    }

    /// Decodes an opened SURB reply.
    pub fn decode(bytes: &[u8]) -> Result<Reply> {
        use wire::reply_body::Body;
        let reply: wire::ReplyBody = wire::decode(bytes, PLAINTEXT_LEN_MAX)?;
        match reply.body {
            None => Err(Error::Malformed {
                what: "reply",
                reason: "no body",
            }),
            Some(Body::DepositAck(a)) => Ok(Reply::DepositAck {
                dedup_id: DedupId::from_slice("dedup id", &a.dedup_id)?,
                expires_at: UnixTime(a.expires_at_ms),
            }),
            Some(Body::HoldAck(a)) => Ok(Reply::HoldAck {
                hold_id: HoldId::from_slice("hold id", &a.hold_id)?,
                cancelled: a.cancelled,
            }),
            Some(Body::Data(d)) => Ok(Reply::Data(d)),
            Some(Body::PrekeyBundle(b)) => PrekeyBundle::from_wire(b).map(Reply::Prekeys),
        }
    }
}
