//! The timer node in the mesh.
//!
//! * [`MeshInjector`] is the [`PacketInjector`] that sends a due held packet to its first hop.
//! * [`TimerDestination`] takes the final payloads for this node: hold parts
//!   ([`TimerNode::accept_hold_part`]) and cancel requests ([`TimerNode::cancel_hold`]), and
//!   answers each through its ack SURB with `Reply::HoldAck`.
//!
//! Outcomes are counted ([`MeshMetrics`]); nothing here logs an identifier.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use whispr_protocol::DestinationAddress;
use whispr_protocol::HoldId;
use whispr_protocol::payload::{FinalMessage, Reply};
use whispr_protocol::sphinx::Surb;
use whispr_relay::mesh::{LocalDestination, MeshHandle};
use whispr_relay::router::Delivery;

use crate::deferred::{DeferredSend, PacketInjector};
use crate::node::{CancelOutcome, HoldOutcome, TimerNode};

/// The mesh side's counters (kept in [`crate::metrics`], below the node, which shows them).
pub use crate::metrics::MeshMetrics;

/// Sends due held packets into the mesh, each with
/// [`MeshHandle::send_acknowledged`]: an injection succeeds only once the packet's first hop
/// has taken it (security review, finding 9). Otherwise the task fails, is retried with
/// back-off and ends in quarantine after `queue.attempts_max` attempts; it is never completed
/// on a local enqueue.
pub struct MeshInjector {
    mesh: MeshHandle,
    runtime: Option<tokio::runtime::Handle>,
}

impl MeshInjector {
    /// Injects through `mesh`. Call it within the Tokio runtime the mesh runs on: injections
    /// (on the worker's blocking threads) wait for the first hop's verdict on it.
    pub fn new(mesh: MeshHandle) -> MeshInjector {
        MeshInjector {
            mesh,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl PacketInjector for MeshInjector {
    /// Blocks until the first hop's verdict (about 80 s at most); must not run on an async
    /// worker thread (the timer node calls it on a blocking thread).
    fn inject(&self, send: DeferredSend) -> Result<(), String> {
        let runtime = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
            .ok_or_else(|| "no Tokio runtime to reach the mesh".to_string())?;
        runtime
            .block_on(self.mesh.send_acknowledged(send.first_hop, send.packet))
            .map_err(|e| e.to_string())
    }
}

/// The timer node as the mesh's local destination.
#[derive(Clone)]
pub struct TimerDestination {
    node: TimerNode,
    mesh: MeshHandle,
    metrics: Arc<MeshMetrics>,
    /// Deliveries being handled (`holds.deliveries_in_flight_max`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl TimerDestination {
    /// Delivers into `node`, answering through `mesh`.
    pub fn new(node: TimerNode, mesh: MeshHandle, metrics: Arc<MeshMetrics>) -> TimerDestination {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(
            node.hold_config().deliveries_in_flight_max.max(1),
        ));
        TimerDestination {
            node,
            mesh,
            metrics,
            in_flight,
        }
    }

    fn ack(&self, surbs: Vec<Surb>, hold_id: HoldId, cancelled: bool) {
        let reply = Reply::HoldAck { hold_id, cancelled };
        for surb in surbs {
            let counter = if self.mesh.send_reply(&surb, &reply).is_ok() {
                &self.metrics.acks_sent
            } else {
                &self.metrics.acks_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles one final payload (blocking: it writes to the store).
    fn handle(&self, delivery: Delivery) {
        let m = &self.metrics;
        let Delivery::Final {
            destination,
            plaintext,
        } = delivery
        else {
            m.payloads_refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if destination != DestinationAddress::NODE_SERVICE {
            m.payloads_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match FinalMessage::decode_for(destination, &plaintext) {
            Ok(FinalMessage::Hold(part)) => match self.node.accept_hold_part(part) {
                Ok(HoldOutcome::Incomplete) => {
                    m.parts_accepted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(HoldOutcome::Scheduled { hold_id, ack_surbs }) => {
                    m.parts_accepted.fetch_add(1, Ordering::Relaxed);
                    m.holds_scheduled.fetch_add(1, Ordering::Relaxed);
                    self.ack(ack_surbs, hold_id, false);
                }
                Ok(HoldOutcome::AlreadyScheduled { hold_id, ack_surbs }) => {
                    m.holds_duplicate.fetch_add(1, Ordering::Relaxed);
                    self.ack(ack_surbs, hold_id, false);
                }
                Ok(HoldOutcome::Cancelled { hold_id, ack_surbs }) => {
                    m.parts_of_cancelled.fetch_add(1, Ordering::Relaxed);
                    self.ack(ack_surbs, hold_id, true);
                }
                Err(_) => {
                    m.parts_refused.fetch_add(1, Ordering::Relaxed);
                }
            },
            Ok(FinalMessage::Cancel(cancel)) => {
                match self.node.cancel_hold(cancel.hold_id, &cancel.capability) {
                    Ok(CancelOutcome::Cancelled { hold_id })
                    | Ok(CancelOutcome::PartialDiscarded { hold_id }) => {
                        m.cancels.fetch_add(1, Ordering::Relaxed);
                        self.ack(cancel.ack_surb.into_iter().collect(), hold_id, true);
                    }
                    Err(_) => {
                        m.cancels_refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(FinalMessage::Deposit(_) | FinalMessage::PrekeyRequest(_)) | Err(_) => {
                m.payloads_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl LocalDestination for TimerDestination {
    fn deliver(&self, delivery: Delivery) {
        // At most `holds.deliveries_in_flight_max` at once (security review, finding 14: the
        // blocking pool's queue is unbounded); the rest are dropped and counted, and their
        // senders retransmit what is not acknowledged.
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.metrics.deliveries_shed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let this = self.clone();
        // Accepting a hold is a synced RocksDB write.
        tokio::task::spawn_blocking(move || {
            this.handle(delivery);
            drop(permit);
        });
    }
}
