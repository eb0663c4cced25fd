//! The mailbox node as a destination of the mesh.
//!
//! * [`MailboxDestination`] takes the final payloads the embedded mesh driver delivers: a
//!   deposit goes through the group-commit writer ([`MailboxNode::deposit`]), a prekey request
//!   to [`MailboxNode::handle_prekey_request`], a SURB reply into the mailbox of its
//!   destination. Hold and cancel requests are for timer nodes and are refused (counted).
//! * [`MeshReplies`] is the [`ReplySink`] that sends the core's ack and prekey replies back
//!   through their SURBs.
//!
//! Nothing here logs an identifier; outcomes are counted in [`MeshMetrics`] and shown on
//! `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use whispr_protocol::payload::{FinalMessage, Reply};
use whispr_protocol::sphinx::Surb;
use whispr_protocol::{DestinationAddress, MailboxId};
use whispr_relay::mesh::{LocalDestination, MeshHandle};
use whispr_relay::router::Delivery;

use crate::core::Incoming;
use crate::node::{MailboxNode, ReplicaTransport, ReplySink};

/// The mesh side's counters (kept in [`crate::metrics`], below the node, which shows them).
pub use crate::metrics::MeshMetrics;

/// Sends replies through SURBs into the mesh.
pub struct MeshReplies {
    mesh: MeshHandle,
    metrics: Arc<MeshMetrics>,
}

impl MeshReplies {
    /// Replies through `mesh`, counted in `metrics`.
    pub fn new(mesh: MeshHandle, metrics: Arc<MeshMetrics>) -> MeshReplies {
        MeshReplies { mesh, metrics }
    }
}

impl ReplySink for MeshReplies {
    fn send_reply(&self, surb: Surb, reply: Reply) {
        let sent = self.mesh.send_reply(&surb, &reply);
        let counter = if sent.is_ok() {
            &self.metrics.replies_sent
        } else {
            &self.metrics.replies_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends replica messages over the mesh's node-to-node channel
/// ([`MeshHandle::send_node_message`]: Noise-authenticated, at most once; the replication
/// protocol acknowledges and repairs). Failures are counted in
/// [`crate::node::ReplicaMetrics::unsent`] by the node and in the mesh's own metrics.
pub struct MeshReplicaTransport {
    mesh: MeshHandle,
    failed: Arc<std::sync::atomic::AtomicU64>,
}

impl MeshReplicaTransport {
    /// Sends through `mesh`; `failed` counts messages the mesh refused (queue full, unknown
    /// node, too large).
    pub fn new(mesh: MeshHandle, failed: Arc<std::sync::atomic::AtomicU64>) -> Self {
        MeshReplicaTransport { mesh, failed }
    }
}

impl ReplicaTransport for MeshReplicaTransport {
    fn send(&self, to: whispr_protocol::NodeId, bytes: Vec<u8>) {
        if self.mesh.send_node_message(to, bytes).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The mailbox node as the mesh's local destination.
pub struct MailboxDestination {
    node: MailboxNode,
    metrics: Arc<MeshMetrics>,
}

impl MailboxDestination {
    /// Delivers into `node`.
    pub fn new(node: MailboxNode, metrics: Arc<MeshMetrics>) -> MailboxDestination {
        MailboxDestination { node, metrics }
    }

    fn deposit(&self, incoming: Incoming, reply: bool) {
        let node = self.node.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let ok = node.deposit(incoming).await.is_ok();
            let counter = match (reply, ok) {
                (false, true) => &metrics.deposits_accepted,
                (false, false) => &metrics.deposits_refused,
                (true, true) => &metrics.surb_replies_accepted,
                (true, false) => &metrics.surb_replies_refused,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
    }
}

impl LocalDestination for MailboxDestination {
    fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::Final {
                destination,
                plaintext,
            } => match FinalMessage::decode_for(destination, &plaintext) {
                Ok(FinalMessage::Deposit(envelope)) => {
                    self.deposit(Incoming::Deposit(envelope), false);
                }
                Ok(FinalMessage::PrekeyRequest(request)) => {
                    let node = self.node.clone();
                    let metrics = self.metrics.clone();
                    // Consuming a one-time prekey is a synced write.
                    tokio::task::spawn_blocking(move || {
                        let counter = if node.handle_prekey_request(request).is_ok() {
                            &metrics.prekey_requests
                        } else {
                            &metrics.prekey_requests_refused
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    });
                }
                Ok(FinalMessage::Hold(_) | FinalMessage::Cancel(_)) | Err(_) => {
                    self.metrics
                        .payloads_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            Delivery::SurbReply {
                destination,
                surb_id,
                sealed,
            } => {
                if destination == DestinationAddress::NODE_SERVICE {
                    self.metrics
                        .payloads_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.deposit(
                    Incoming::SurbReply {
                        mailbox_id: MailboxId(destination.0),
                        surb_id,
                        payload: sealed,
                    },
                    true,
                );
            }
        }
    }
}
