//! Counters the mesh layer ([`crate::mesh`]) fills and the node's admin API shows on
//! `/metrics`: they sit below both, so that the node never imports the mesh layer.

use std::sync::atomic::AtomicU64;

/// Counters of the mesh side of a timer node.
#[derive(Debug, Default)]
pub struct MeshMetrics {
    /// Hold parts accepted (held, or completing a hold).
    pub parts_accepted: AtomicU64,
    /// Holds completed and stored.
    pub holds_scheduled: AtomicU64,
    /// Retransmitted holds acknowledged again.
    pub holds_duplicate: AtomicU64,
    /// Parts refused (mismatch, table full, release time out of range, storage).
    pub parts_refused: AtomicU64,
    /// Late parts of a cancelled hold (answered "cancelled", not scheduled).
    pub parts_of_cancelled: AtomicU64,
    /// Holds cancelled.
    pub cancels: AtomicU64,
    /// Cancel requests refused (wrong capability, unknown hold).
    pub cancels_refused: AtomicU64,
    /// Final payloads that are not for a timer node or do not decode.
    pub payloads_refused: AtomicU64,
    /// Acknowledgements sent.
    pub acks_sent: AtomicU64,
    /// Acknowledgements that could not be sent.
    pub acks_failed: AtomicU64,
    /// Final payloads dropped because `holds.deliveries_in_flight_max` were being handled.
    pub deliveries_shed: AtomicU64,
}

impl MeshMetrics {
    /// Prometheus text.
    pub fn render(&self) -> String {
        whispr_relay::http::prometheus_counters(
            "whispr_timer_mesh",
            &[
                (
                    "parts_accepted",
                    "Hold parts accepted.",
                    &self.parts_accepted,
                ),
                ("holds_scheduled", "Holds stored.", &self.holds_scheduled),
                (
                    "holds_duplicate",
                    "Retransmitted holds acknowledged again.",
                    &self.holds_duplicate,
                ),
                ("parts_refused", "Hold parts refused.", &self.parts_refused),
                (
                    "parts_of_cancelled",
                    "Late parts of cancelled holds.",
                    &self.parts_of_cancelled,
                ),
                ("cancels", "Holds cancelled.", &self.cancels),
                (
                    "cancels_refused",
                    "Cancel requests refused.",
                    &self.cancels_refused,
                ),
                (
                    "payloads_refused",
                    "Final payloads not for a timer node.",
                    &self.payloads_refused,
                ),
                (
                    "acks_sent",
                    "Acknowledgements sent through SURBs.",
                    &self.acks_sent,
                ),
                (
                    "acks_failed",
                    "Acknowledgements that could not be sent.",
                    &self.acks_failed,
                ),
                (
                    "deliveries_shed",
                    "Final payloads dropped while holds.deliveries_in_flight_max were handled.",
                    &self.deliveries_shed,
                ),
            ],
        )
    }
}
