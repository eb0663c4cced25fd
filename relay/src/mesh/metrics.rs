//! The mesh's metrics, rendered as Prometheus text. No label carries an identifier.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::submit::Outcome;
use crate::router::{DropReason, RouterStats};
use crate::storage::SyncLatency;

/// Upper bounds of the hold-time histogram, in seconds. Coarse on purpose: the histogram is
/// public to whoever can scrape it, and a fine one (or a sum) would tell, from two scrapes
/// around one packet's release, how long the relay held it: its mixing delay.
const HOLD_BUCKETS: [f64; 6] = [0.1, 1.0, 10.0, 60.0, 300.0, 600.0];

/// A histogram without `_sum`: the sum of hold times is what gives one packet's delay away.
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; HOLD_BUCKETS.len() + 1],
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let index = HOLD_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(HOLD_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters and gauges of one mesh.
#[derive(Default)]
pub(crate) struct Metrics {
    /// The router's counters, copied by the core after each step.
    stats: Mutex<RouterStats>,
    pub(crate) queue_depth: AtomicU64,
    /// `router.queue_max`, set once at start.
    pub(crate) queue_max: AtomicU64,
    pub(crate) replay_tags: AtomicU64,
    pub(crate) peers_connected: AtomicU64,
    pub(crate) directory_nodes: AtomicU64,
    pub(crate) descriptors_held: AtomicU64,
    pub(crate) descriptors_rejected: AtomicU64,
    pub(crate) send_failed: AtomicU64,
    pub(crate) client_streams: AtomicU64,
    pub(crate) client_streams_refused: AtomicU64,
    pub(crate) peer_streams_refused: AtomicU64,
    pub(crate) connections_denied: AtomicU64,
    pub(crate) peer_streams_idle: AtomicU64,
    /// Descriptor submissions to the authorities, by [`Outcome`].
    descriptor_submissions: [AtomicU64; Outcome::ALL.len()],
    pub(crate) node_messages_sent: AtomicU64,
    pub(crate) node_messages_received: AtomicU64,
    /// Node messages dropped, by [`NodeMessageDrop`].
    node_messages_dropped: [AtomicU64; NodeMessageDrop::ALL.len()],
    /// Inbound node-message streams refused or closed, by [`StreamClose`].
    node_streams_closed: [AtomicU64; StreamClose::ALL.len()],
    hold: Histogram,
    /// Synced writes of the replay store (tags made durable, old epochs pruned).
    pub(crate) replay_sync: SyncLatency,
    /// With `network_file`: when the consensus held stops being valid (Unix ms; 0 before the
    /// first one).
    pub(crate) consensus_valid_until_ms: AtomicU64,
    /// With `network_file`: when the consensus held became valid (Unix ms; 0 before the
    /// first one).
    pub(crate) consensus_valid_after_ms: AtomicU64,
}

/// The node's health, as `/healthz` sees it, for [`Metrics::render`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Health {
    /// The node routes by a consensus of pinned authorities (`mesh.network_file`).
    pub(crate) pinned: bool,
    /// A replay-store write failed (the store refuses every later write).
    pub(crate) store_poisoned: bool,
    /// The last Sphinx key rotation failed (retried every 10 s).
    pub(crate) keys_failing: bool,
    /// One of the mesh's tasks failed.
    pub(crate) stopped: bool,
}

/// Why a node message was dropped (`whispr_mesh_node_messages_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeMessageDrop {
    /// The destination's outbound queue was full.
    QueueFull,
    /// Longer than `message_max` (refused to the caller, or a frame that closed its stream).
    TooLarge,
    /// Received from a peer that has left the directory or consensus.
    NotMember,
    /// The destination is not in the directory.
    UnknownNode,
    /// The stream could not be opened, or broke, or timed out.
    Io,
}

impl NodeMessageDrop {
    pub(crate) const ALL: [NodeMessageDrop; 5] = [
        NodeMessageDrop::QueueFull,
        NodeMessageDrop::TooLarge,
        NodeMessageDrop::NotMember,
        NodeMessageDrop::UnknownNode,
        NodeMessageDrop::Io,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            NodeMessageDrop::QueueFull => "queue_full",
            NodeMessageDrop::TooLarge => "too_large",
            NodeMessageDrop::NotMember => "not_member",
            NodeMessageDrop::UnknownNode => "unknown_node",
            NodeMessageDrop::Io => "io",
        }
    }
}

/// Why an inbound node-message stream was refused or closed by this node
/// (`whispr_mesh_node_message_streams_closed_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamClose {
    /// The peer is not a member of the directory or consensus (or its key is no Ed25519 one).
    NotMember,
    /// The per-peer or total stream limit was reached.
    Limit,
    /// A frame announced more than `message_max` bytes.
    TooLarge,
    /// No frame came within `idle_ms`.
    Idle,
    /// A frame's bytes did not all come within `frame_ms`.
    FrameTimeout,
}

impl StreamClose {
    pub(crate) const ALL: [StreamClose; 5] = [
        StreamClose::NotMember,
        StreamClose::Limit,
        StreamClose::TooLarge,
        StreamClose::Idle,
        StreamClose::FrameTimeout,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            StreamClose::NotMember => "not_member",
            StreamClose::Limit => "limit",
            StreamClose::TooLarge => "too_large",
            StreamClose::Idle => "idle",
            StreamClose::FrameTimeout => "frame_timeout",
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    pub(crate) fn set_stats(&self, stats: &RouterStats) {
        let mut held = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if *held != *stats {
            held.clone_from(stats);
        }
    }

    /// Counts `n` node messages dropped for `reason`.
    pub(crate) fn node_message_dropped(&self, reason: NodeMessageDrop, n: u64) {
        let index = NodeMessageDrop::ALL.iter().position(|r| *r == reason);
        if let Some(counter) = index.and_then(|i| self.node_messages_dropped.get(i)) {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts an inbound node-message stream refused or closed for `reason`.
    pub(crate) fn node_stream_closed(&self, reason: StreamClose) {
        let index = StreamClose::ALL.iter().position(|r| *r == reason);
        if let Some(counter) = index.and_then(|i| self.node_streams_closed.get(i)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a descriptor submission to an authority, by its outcome.
    pub(crate) fn descriptor_submitted(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome);
        if let Some(counter) = index.and_then(|i| self.descriptor_submissions.get(i)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn observe_hold(&self, held: Duration) {
        self.hold.observe(held);
    }

    pub(crate) fn render(&self, health: Health) -> String {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::with_capacity(4096);
        let mut line = |s: std::fmt::Arguments<'_>| {
            let _ = out.write_fmt(s);
            out.push('\n');
        };
        line(format_args!(
            "# HELP whispr_mesh_packets_in_total Packets offered to the router, by source."
        ));
        line(format_args!("# TYPE whispr_mesh_packets_in_total counter"));
        for (source, n) in [
            ("peer", stats.in_peer),
            ("client", stats.in_client),
            ("local", stats.in_local),
        ] {
            line(format_args!(
                "whispr_mesh_packets_in_total{{source=\"{source}\"}} {n}"
            ));
        }
        for (name, help, value) in [
            (
                "whispr_mesh_packets_out_total",
                "Packets sent on to the next hop.",
                stats.out,
            ),
            (
                "whispr_mesh_packets_delivered_total",
                "Final payloads delivered to the local destination.",
                stats.delivered,
            ),
            (
                "whispr_mesh_rate_delayed_total",
                "Packets accepted past a rate budget with an extra delay.",
                stats.rate_delayed,
            ),
            (
                "whispr_mesh_send_failed_total",
                "Packets the router released that could not be written to the next hop.",
                load(&self.send_failed),
            ),
            (
                "whispr_mesh_descriptors_rejected_total",
                "Gossiped descriptors refused (bad signature, expired, wrong author).",
                load(&self.descriptors_rejected),
            ),
            (
                "whispr_mesh_client_streams_refused_total",
                "Client streams refused at the concurrency limit.",
                load(&self.client_streams_refused),
            ),
            (
                "whispr_mesh_peer_streams_refused_total",
                "Inbound packet streams refused (unknown key type or stream limits).",
                load(&self.peer_streams_refused),
            ),
            (
                "whispr_mesh_connections_denied_total",
                "Inbound connections refused at the connection limits.",
                load(&self.connections_denied),
            ),
            (
                "whispr_mesh_peer_streams_idle_closed_total",
                "Inbound packet streams closed after peer_stream_idle_ms without a packet.",
                load(&self.peer_streams_idle),
            ),
            (
                "whispr_mesh_node_messages_sent_total",
                "Node messages written to their destination's stream.",
                load(&self.node_messages_sent),
            ),
            (
                "whispr_mesh_node_messages_received_total",
                "Node messages received and handed to this node.",
                load(&self.node_messages_received),
            ),
        ] {
            line(format_args!("# HELP {name} {help}"));
            line(format_args!("# TYPE {name} counter"));
            line(format_args!("{name} {value}"));
        }
        line(format_args!(
            "# HELP whispr_mesh_descriptor_submissions_total This node's descriptor submitted to the pinned authorities, by result."
        ));
        line(format_args!(
            "# TYPE whispr_mesh_descriptor_submissions_total counter"
        ));
        for (outcome, counter) in Outcome::ALL.iter().zip(self.descriptor_submissions.iter()) {
            line(format_args!(
                "whispr_mesh_descriptor_submissions_total{{result=\"{}\"}} {}",
                outcome.label(),
                load(counter)
            ));
        }
        line(format_args!(
            "# HELP whispr_mesh_packets_dropped_total Packets refused or dropped by the router, by reason."
        ));
        line(format_args!(
            "# TYPE whispr_mesh_packets_dropped_total counter"
        ));
        for reason in DropReason::ALL {
            let n = stats.dropped.get(&reason).copied().unwrap_or(0);
            line(format_args!(
                "whispr_mesh_packets_dropped_total{{reason=\"{}\"}} {n}",
                reason.label()
            ));
        }
        line(format_args!(
            "# HELP whispr_mesh_node_messages_dropped_total Node messages dropped, by reason."
        ));
        line(format_args!(
            "# TYPE whispr_mesh_node_messages_dropped_total counter"
        ));
        for (reason, counter) in NodeMessageDrop::ALL
            .iter()
            .zip(self.node_messages_dropped.iter())
        {
            line(format_args!(
                "whispr_mesh_node_messages_dropped_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(counter)
            ));
        }
        line(format_args!(
            "# HELP whispr_mesh_node_message_streams_closed_total Inbound node-message streams refused or closed by this node, by reason."
        ));
        line(format_args!(
            "# TYPE whispr_mesh_node_message_streams_closed_total counter"
        ));
        for (reason, counter) in StreamClose::ALL.iter().zip(self.node_streams_closed.iter()) {
            line(format_args!(
                "whispr_mesh_node_message_streams_closed_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(counter)
            ));
        }
        for (name, help, value) in [
            (
                "whispr_mesh_queue_depth",
                "Packets held by the router (mixing delay or awaiting a durable replay tag).",
                load(&self.queue_depth),
            ),
            (
                "whispr_mesh_queue_max",
                "Packets the router may hold (router.queue_max); past it, packets are refused as queue_full.",
                load(&self.queue_max),
            ),
            (
                "whispr_mesh_peers_connected",
                "Peers with an open connection.",
                load(&self.peers_connected),
            ),
            (
                "whispr_mesh_directory_nodes",
                "Valid descriptors in the directory.",
                load(&self.directory_nodes),
            ),
            (
                "whispr_mesh_descriptors_held",
                "Descriptors held before validation into the directory.",
                load(&self.descriptors_held),
            ),
            (
                "whispr_mesh_replay_tags",
                "Replay tags held in memory (current and previous key epoch).",
                load(&self.replay_tags),
            ),
            (
                "whispr_mesh_client_streams",
                "Open client packet streams.",
                load(&self.client_streams),
            ),
            (
                "whispr_mesh_consensus_pinned",
                "1 when the node routes by a consensus of pinned authorities (network_file).",
                u64::from(health.pinned),
            ),
            (
                "whispr_mesh_consensus_valid_until_seconds",
                "With network_file: Unix time at which the consensus held expires (0: none yet).",
                load(&self.consensus_valid_until_ms) / 1000,
            ),
            (
                "whispr_mesh_consensus_valid_after_seconds",
                "With network_file: Unix time from which the consensus held is valid (0: none yet).",
                load(&self.consensus_valid_after_ms) / 1000,
            ),
            (
                "whispr_mesh_replay_store_poisoned",
                "1 once a replay-store write failed (no packet is released until a restart).",
                u64::from(health.store_poisoned),
            ),
            (
                "whispr_mesh_key_rotation_failing",
                "1 while the last Sphinx key rotation failed (retried every 10 s).",
                u64::from(health.keys_failing),
            ),
            (
                "whispr_mesh_stopped",
                "1 once one of the mesh's tasks failed (restart the node).",
                u64::from(health.stopped),
            ),
        ] {
            line(format_args!("# HELP {name} {help}"));
            line(format_args!("# TYPE {name} gauge"));
            line(format_args!("{name} {value}"));
        }
        line(format_args!(
            "# HELP whispr_mesh_hold_seconds How long packets were held before being sent on (coarse buckets, no sum)."
        ));
        line(format_args!("# TYPE whispr_mesh_hold_seconds histogram"));
        let mut cumulative = 0u64;
        for (bound, bucket) in HOLD_BUCKETS.iter().zip(self.hold.buckets.iter()) {
            cumulative = cumulative.saturating_add(load(bucket));
            line(format_args!(
                "whispr_mesh_hold_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            ));
        }
        let count = load(&self.hold.count);
        line(format_args!(
            "whispr_mesh_hold_seconds_bucket{{le=\"+Inf\"}} {count}"
        ));
        line(format_args!("whispr_mesh_hold_seconds_count {count}"));
        out.push_str(&self.replay_sync.render(
            "whispr_mesh_replay_sync_seconds",
            "Duration of the replay store's synced writes (coarse buckets, no sum).",
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: Health = Health {
        pinned: false,
        store_poisoned: false,
        keys_failing: false,
        stopped: false,
    };

    #[test]
    fn renders_the_health_gauges_and_the_replay_sync_histogram() {
        let m = Metrics::default();
        let text = m.render(HEALTHY);
        for gauge in [
            "whispr_mesh_consensus_pinned 0\n",
            "whispr_mesh_consensus_valid_until_seconds 0\n",
            "whispr_mesh_consensus_valid_after_seconds 0\n",
            "whispr_mesh_replay_store_poisoned 0\n",
            "whispr_mesh_key_rotation_failing 0\n",
            "whispr_mesh_stopped 0\n",
            "whispr_mesh_queue_max 0\n",
            "whispr_mesh_replay_sync_seconds_count 0\n",
        ] {
            assert!(text.contains(gauge), "{gauge} missing from {text}");
        }
        m.consensus_valid_until_ms
            .store(1_800_000_123_456, Ordering::Relaxed);
        m.consensus_valid_after_ms
            .store(1_799_989_323_456, Ordering::Relaxed);
        m.replay_sync.observe(Duration::from_millis(3));
        let text = m.render(Health {
            pinned: true,
            store_poisoned: true,
            keys_failing: true,
            stopped: true,
        });
        for gauge in [
            "whispr_mesh_consensus_pinned 1\n",
            "whispr_mesh_consensus_valid_until_seconds 1800000123\n",
            "whispr_mesh_consensus_valid_after_seconds 1799989323\n",
            "whispr_mesh_replay_store_poisoned 1\n",
            "whispr_mesh_key_rotation_failing 1\n",
            "whispr_mesh_stopped 1\n",
            "whispr_mesh_replay_sync_seconds_bucket{le=\"0.005\"} 1\n",
            "whispr_mesh_replay_sync_seconds_count 1\n",
        ] {
            assert!(text.contains(gauge), "{gauge} missing from {text}");
        }
    }

    #[test]
    fn renders_every_drop_reason_and_a_cumulative_histogram() {
        let m = Metrics::default();
        let mut stats = RouterStats::default();
        stats.dropped.insert(DropReason::Replay, 3);
        m.set_stats(&stats);
        m.observe_hold(Duration::from_millis(7));
        m.observe_hold(Duration::from_secs(2));
        m.observe_hold(Duration::from_secs(4000));
        assert!(!m.render(HEALTHY).contains("_sum"));
        let text = m.render(HEALTHY);
        for reason in DropReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", reason.label())));
        }
        assert!(text.contains("whispr_mesh_packets_dropped_total{reason=\"replay\"} 3\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_bucket{le=\"600\"} 2\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("whispr_mesh_hold_seconds_count 3\n"));
    }

    /// Security review, finding 6: `whispr_mesh_hold_seconds_sum` was printed with µs
    /// precision, so scraping before and after one packet left gave its exact hold time (the
    /// edge's mixing delay). No hold time is published finer than a bucket.
    #[test]
    fn a_scrape_does_not_give_a_packets_hold_time() {
        let m = Metrics::default();
        m.observe_hold(Duration::from_micros(123_457));
        let text = m.render(HEALTHY);
        assert!(!text.contains("0.123457"), "{text}");
        assert!(!text.contains("0.123"), "{text}");
    }
}
