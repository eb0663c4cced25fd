//! What a run writes: `summary.json` (metrics only: deterministic for a seed and scenario),
//! `run.json` (wall time, events per second, peak memory), CSV time series, and plots
//! (latency CDF, entropy distribution, delivery over time) as SVG and PNG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::plots::{Chart, Series, Style, draw};
use crate::scenario::Scenario;
use crate::world::Results;

/// Percentiles of a sample (nearest rank), ms or bits.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Distribution {
    /// Sample size.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
}

/// Rounds to 6 significant decimals so that summaries print the same everywhere.
fn round(x: f64) -> f64 {
    if !x.is_finite() {
        return 0.0;
    }
    (x * 1e6).round() / 1e6
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

impl Distribution {
    /// Of `values`.
    pub fn of(values: &[f64]) -> Distribution {
        let v = sorted(values);
        if v.is_empty() {
            return Distribution::default();
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Distribution {
            count: v.len(),
            mean: round(mean),
            p50: round(nearest_rank(&v, 0.50)),
            p95: round(nearest_rank(&v, 0.95)),
            p99: round(nearest_rank(&v, 0.99)),
            max: round(v.last().copied().unwrap_or(0.0)),
            min: round(v.first().copied().unwrap_or(0.0)),
        }
    }
}

/// Message outcomes.
#[derive(Clone, Debug, Serialize)]
pub struct Messages {
    /// Created by the workload.
    pub sent: u64,
    /// Of which scheduled sends.
    pub scheduled: u64,
    /// Every fragment fetched by the recipient.
    pub delivered: u64,
    /// Every fragment's deposit acknowledged to the sender.
    pub acknowledged: u64,
    /// Given up by the sender (no route, or retransmissions exhausted).
    pub failed: u64,
    /// Expired before the recipient fetched them.
    pub expired_undelivered: u64,
    /// Acknowledged to the sender, but neither delivered nor expired by the end: lost after
    /// an acknowledgement (each is also an invariant violation).
    pub acknowledged_lost: u64,
    /// Of those, messages still stored on a replica of the recipient's mailbox at the end:
    /// not destroyed, but not served to its owner (the replica it read was not repaired in
    /// time, or a stale cursor there skipped them).
    pub acknowledged_lost_still_stored: u64,
    /// delivered / sent.
    pub delivery_ratio: f64,
}

/// Deliveries to linked devices (`workload.devices_per_user` > 1; absent otherwise).
#[derive(Clone, Debug, Serialize)]
pub struct DevicesReport {
    /// Linked devices, besides the users' primaries (whose deliveries are `messages`).
    pub linked: usize,
    /// Messages received by a linked device of their recipient (each device counts; a
    /// second copy to the same device is an invariant violation).
    pub deliveries: u64,
    /// (message delivered to its recipient's primary, linked device of the recipient) pairs
    /// where the device did not get it.
    pub missing: u64,
    /// Setup: acknowledgements of link requests the link mailbox's node refused (the new
    /// device's SURB ids are not minted with the link mailbox's reply key).
    pub link_acks_refused: u64,
}

/// Sender anonymity against the adversary.
#[derive(Clone, Debug, Serialize)]
pub struct AnonymityReport {
    /// Clients (N).
    pub population: usize,
    /// log2 N: the entropy of a uniform guess.
    pub max_entropy_bits: f64,
    /// Messages measured.
    pub sampled: usize,
    /// Shannon entropy of the observer's distribution over senders, bits.
    pub entropy_bits: Distribution,
    /// Mean anonymity set 2^H.
    pub anonymity_set_mean: f64,
    /// Mean normalised degree H / log2 N.
    pub normalised_degree_mean: f64,
    /// Fraction of sampled messages whose most likely sender was the true one.
    pub timing_attack_success: f64,
    /// Sampled messages whose every delaying hop was compromised (sender known).
    pub fully_traced: u64,
    /// Messages whose recipient's mailbox node is compromised (it sees the mailbox, never
    /// the sender).
    pub recipient_node_compromised: u64,
}

/// Bandwidth and retransmission overhead.
#[derive(Clone, Debug, Serialize)]
pub struct Overhead {
    /// Packets put on links (client→edge, node→node).
    pub link_packets: u64,
    /// Bytes put on links.
    pub wire_bytes: u64,
    /// wire bytes / delivered message.
    pub wire_bytes_per_delivered: f64,
    /// delivered message bytes / wire bytes.
    pub payload_efficiency: f64,
    /// Cover packets per delivered message.
    pub cover_per_delivered: f64,
    /// Retransmitted packets per delivered message.
    pub retransmissions_per_delivered: f64,
    /// Deposit acks received per delivered message.
    pub acks_per_delivered: f64,
    /// Cover packets sent.
    pub cover_sent: u64,
    /// Retransmissions.
    pub retransmissions: u64,
}

/// Mailbox node storage.
#[derive(Clone, Debug, Serialize)]
pub struct Storage {
    /// Mailbox nodes.
    pub mailbox_nodes: usize,
    /// Largest peak stored bytes of one node.
    pub peak_bytes_max: u64,
    /// Mean over nodes of their peak stored bytes.
    pub peak_bytes_mean: f64,
    /// Largest peak number of stored messages of one node.
    pub peak_messages_max: u64,
}

/// What the nodes did.
#[derive(Clone, Debug, Serialize)]
pub struct NodesReport {
    /// Packets offered to routers.
    pub packet_hops: u64,
    /// Router drops by reason.
    pub router_drops: BTreeMap<String, u64>,
    /// Deposits refused by mailbox cores, by reason.
    pub deposit_refusals: BTreeMap<String, u64>,
    /// Packets lost on links.
    pub lost_link: u64,
    /// Packets lost to partitions.
    pub lost_partition: u64,
    /// Packets sent to a node that was down.
    pub lost_down: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Crashes that lost the node's disk (`churn.disk_loss_fraction`, `lose_disk` events).
    pub disks_lost: u64,
    /// Fraction of the time an owned mailbox could be read (one of its replicas up and
    /// holding it: a node that lost its disk counts again once repaired), averaged over
    /// every owned mailbox at every sample; 1 when nothing was sampled.
    pub mailbox_availability: f64,
    /// Replicas per mailbox (`topology.replicas`, at most the mailbox nodes).
    pub replicas: usize,
    /// Replica messages mailbox nodes sent each other (pushes, their acks, device acks,
    /// anti-entropy, record repair).
    pub replica_messages: u64,
    /// Their bytes (not in `overhead.wire_bytes`, which counts packets).
    pub replica_bytes: u64,
    /// Replica messages lost (destination down or restarted, or a partition).
    pub replica_lost: u64,
    /// Reads that failed over to the next replica of the mailbox's set.
    pub failovers: u64,
    /// Holds scheduled by timer nodes.
    pub holds_scheduled: u64,
    /// Holds released.
    pub holds_released: u64,
    /// Releases whose first hop was down: the timer retries them (finding 9).
    pub hold_release_retries: u64,
    /// Packets clients built on a route through a Sybil node (not in a consensus).
    pub sybil_routes: u64,
    /// Packets sent to a Sybil node.
    pub lost_sybil: u64,
    /// Final payloads refused.
    pub payloads_refused: u64,
    /// SURB replies that could not be sent.
    pub replies_failed: u64,
    /// Transport duplicates recipients fetched and dropped.
    pub duplicate_fragments_fetched: u64,
}

/// Invariant checks.
#[derive(Clone, Debug, Serialize)]
pub struct Invariants {
    /// True when nothing was violated.
    pub ok: bool,
    /// Number of violations.
    pub violations: usize,
    /// The first 20.
    pub first: Vec<String>,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Crypto mode.
    pub mode: crate::codec::Mode,
    /// Seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Clients.
    pub clients: usize,
    /// Messages.
    pub messages: Messages,
    /// Linked devices' deliveries (only with `workload.devices_per_user` > 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<DevicesReport>,
    /// Send (or release) → recipient has the message, ms.
    pub latency_ms: Distribution,
    /// Send (or release) → last fragment stored at the mailbox node, ms.
    pub network_latency_ms: Distribution,
    /// Sender anonymity.
    pub anonymity: AnonymityReport,
    /// Overhead.
    pub overhead: Overhead,
    /// Storage.
    pub storage: Storage,
    /// Nodes.
    pub nodes_report: NodesReport,
    /// Events processed, total and by kind.
    pub events: u64,
    /// By kind.
    pub events_by_kind: BTreeMap<String, u64>,
    /// Invariants.
    pub invariants: Invariants,
}

fn per(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        round(a as f64 / b as f64)
    }
}

/// Builds the summary of a run.
pub fn summarise(sc: &Scenario, seed: u64, r: &Results) -> Summary {
    let c = &r.counters;
    let entropy: Vec<f64> = r.anonymity.iter().map(|a| a.0).collect();
    let n = r.anonymity.len();
    let mean = |f: &dyn Fn(&crate::world::MessageAnonymity) -> f64| {
        if n == 0 {
            0.0
        } else {
            round(r.anonymity.iter().map(f).sum::<f64>() / n as f64)
        }
    };
    let peaks = &r.mailbox_peaks;
    Summary {
        scenario: sc.name.clone(),
        mode: sc.mode,
        seed,
        nodes: r.nodes,
        clients: r.clients,
        messages: Messages {
            sent: r.sent,
            scheduled: c.scheduled_sent,
            delivered: r.delivered,
            acknowledged: r.acked,
            failed: r.failed,
            expired_undelivered: r.expired_undelivered,
            acknowledged_lost: r.acked_lost,
            acknowledged_lost_still_stored: r.acked_lost_still_stored,
            delivery_ratio: per(r.delivered, r.sent),
        },
        devices: (r.linked_devices > 0).then_some(DevicesReport {
            linked: r.linked_devices,
            deliveries: r.device_deliveries,
            missing: r.device_missing,
            link_acks_refused: r.link_acks_refused,
        }),
        latency_ms: Distribution::of(&r.latency_ms),
        network_latency_ms: Distribution::of(&r.network_latency_ms),
        anonymity: AnonymityReport {
            population: r.clients,
            max_entropy_bits: round((r.clients.max(1) as f64).log2()),
            sampled: n,
            entropy_bits: Distribution::of(&entropy),
            anonymity_set_mean: mean(&|a| a.1),
            normalised_degree_mean: mean(&|a| a.2),
            timing_attack_success: mean(&|a| if a.3 { 1.0 } else { 0.0 }),
            fully_traced: r.fully_traced,
            recipient_node_compromised: r.recipient_node_compromised,
        },
        overhead: Overhead {
            link_packets: c.link_packets,
            wire_bytes: c.wire_bytes,
            wire_bytes_per_delivered: per(c.wire_bytes, r.delivered),
            payload_efficiency: per(r.delivered_bytes, c.wire_bytes),
            cover_per_delivered: per(c.cover_sent, r.delivered),
            retransmissions_per_delivered: per(c.retransmissions, r.delivered),
            acks_per_delivered: per(c.acks_received, r.delivered),
            cover_sent: c.cover_sent,
            retransmissions: c.retransmissions,
        },
        storage: Storage {
            mailbox_nodes: peaks.len(),
            peak_bytes_max: peaks.iter().map(|p| p.0).max().unwrap_or(0),
            peak_bytes_mean: if peaks.is_empty() {
                0.0
            } else {
                round(peaks.iter().map(|p| p.0 as f64).sum::<f64>() / peaks.len() as f64)
            },
            peak_messages_max: peaks.iter().map(|p| p.1).max().unwrap_or(0),
        },
        nodes_report: NodesReport {
            packet_hops: c.packet_hops,
            router_drops: c.router_drops.clone(),
            deposit_refusals: c.deposit_refusals.clone(),
            lost_link: c.lost_link,
            lost_partition: c.lost_partition,
            lost_down: c.lost_down,
            crashes: c.crashes,
            disks_lost: c.disks_lost,
            mailbox_availability: if c.mailbox_samples == 0 {
                1.0
            } else {
                round(c.mailbox_samples_readable as f64 / c.mailbox_samples as f64)
            },
            replicas: sc.topology.replicas.clamp(1, sc.topology.mailboxes.max(1)),
            replica_messages: c.replica_messages,
            replica_bytes: c.replica_bytes,
            replica_lost: c.replica_lost,
            failovers: c.failovers,
            holds_scheduled: c.holds_scheduled,
            holds_released: c.holds_released,
            hold_release_retries: c.hold_release_retries,
            sybil_routes: c.sybil_routes,
            lost_sybil: c.lost_sybil,
            payloads_refused: c.payloads_refused,
            replies_failed: c.replies_failed,
            duplicate_fragments_fetched: c.duplicate_fragments_fetched,
        },
        events: r.events,
        events_by_kind: c
            .events
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        invariants: Invariants {
            ok: r.violations.is_empty(),
            violations: r.violations.len(),
            first: r.violations.iter().take(20).cloned().collect(),
        },
    }
}

/// `run.json`: what varies between machines and runs.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    /// Seed.
    pub seed: u64,
    /// Wall time of the whole run (setup included), s.
    pub wall_s: f64,
    /// Wall time of building the network (keys, directory, mailboxes), s.
    pub setup_s: f64,
    /// Events processed per wall second (of the event loop).
    pub events_per_s: f64,
    /// Packet hops (packets offered to a router) per wall second (of the event loop).
    pub packet_hops_per_s: f64,
    /// Peak resident memory of the process, MiB (Linux `VmHWM`).
    pub peak_rss_mib: f64,
    /// Simulator version.
    pub version: String,
}

/// Peak resident set size of this process in MiB (0 where unknown).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| round(kb / 1024.0))
}

fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let v = sorted(values);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, x)| (*x, (i + 1) as f64 / n))
        .collect()
}

/// Thins a CDF to at most `max` points (keeping the last), for plots.
fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let step = points.len().div_ceil(max);
    let last = points.last().copied();
    let mut out: Vec<(f64, f64)> = points.into_iter().step_by(step).collect();
    if let Some(l) = last
        && out.last() != Some(&l)
    {
        out.push(l);
    }
    out
}

/// Writes summary.json, the CSV files and the plots into `dir`.
pub fn write_outputs(dir: &Path, summary: &Summary, r: &Results) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    let mut ts = String::from(
        "t_s,sent,delivered,acked,failed,pending_events,wire_bytes,stored_bytes,nodes_up\n",
    );
    for s in &r.samples {
        let _ = writeln!(
            ts,
            "{},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.sent,
            s.delivered,
            s.acked,
            s.failed,
            s.pending_events,
            s.wire_bytes,
            s.stored_bytes,
            s.nodes_up
        );
    }
    std::fs::write(dir.join("timeseries.csv"), ts)?;
    let latency = cdf(&r.latency_ms);
    let mut csv = String::from("latency_ms,fraction\n");
    for (x, y) in &latency {
        let _ = writeln!(csv, "{x},{y}");
    }
    std::fs::write(dir.join("latency_cdf.csv"), csv)?;
    let entropy: Vec<f64> = r.anonymity.iter().map(|a| a.0).collect();
    let mut csv = String::from("entropy_bits,anonymity_set,normalised_degree,attack_right\n");
    for a in &r.anonymity {
        let _ = writeln!(csv, "{},{},{},{}", a.0, a.1, a.2, u8::from(a.3));
    }
    std::fs::write(dir.join("anonymity.csv"), csv)?;
    let plot = |name: &str, chart: Chart| -> std::io::Result<()> {
        match draw(&chart, &dir.join(name)) {
            Ok(()) | Err(crate::plots::PlotError::NothingToPlot) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    };
    plot(
        "latency_cdf",
        Chart {
            title: format!("{}: delivery latency CDF", summary.scenario),
            x_label: "latency (ms)".into(),
            y_label: "fraction of delivered messages".into(),
            style: Style::Lines,
            log_x: false,
            series: vec![Series {
                name: "latency".into(),
                points: thin(latency, 2000),
            }],
        },
    )?;
    plot(
        "entropy",
        Chart {
            title: format!(
                "{}: sender entropy CDF (max {:.2} bits)",
                summary.scenario, summary.anonymity.max_entropy_bits
            ),
            x_label: "entropy H (bits)".into(),
            y_label: "fraction of sampled messages".into(),
            style: Style::Lines,
            log_x: false,
            series: vec![Series {
                name: "entropy".into(),
                points: thin(cdf(&entropy), 2000),
            }],
        },
    )?;
    plot(
        "delivery",
        Chart {
            title: format!("{}: messages over time", summary.scenario),
            x_label: "simulated time (s)".into(),
            y_label: "messages (cumulative)".into(),
            style: Style::Lines,
            log_x: false,
            series: vec![
                Series {
                    name: "sent".into(),
                    points: r.samples.iter().map(|s| (s.t_s, s.sent as f64)).collect(),
                },
                Series {
                    name: "delivered".into(),
                    points: r
                        .samples
                        .iter()
                        .map(|s| (s.t_s, s.delivered as f64))
                        .collect(),
                },
            ],
        },
    )?;
    Ok(())
}

/// One row of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// The parameter's value.
    pub value: String,
    /// Its summary.
    pub summary: Summary,
}

/// Writes `sweep.csv` and the trade-off plots for a sweep of `param`.
pub fn write_sweep(dir: &Path, param: &str, rows: &[SweepRow]) -> std::io::Result<()> {
    let mut csv = String::from(
        "value,latency_p50_ms,latency_p95_ms,latency_p99_ms,delivery_ratio,entropy_mean_bits,normalised_degree_mean,timing_attack_success,wire_bytes_per_delivered,cover_per_delivered,retransmissions_per_delivered\n",
    );
    for row in rows {
        let s = &row.summary;
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{}",
            row.value,
            s.latency_ms.p50,
            s.latency_ms.p95,
            s.latency_ms.p99,
            s.messages.delivery_ratio,
            s.anonymity.entropy_bits.mean,
            s.anonymity.normalised_degree_mean,
            s.anonymity.timing_attack_success,
            s.overhead.wire_bytes_per_delivered,
            s.overhead.cover_per_delivered,
            s.overhead.retransmissions_per_delivered
        );
    }
    std::fs::write(dir.join("sweep.csv"), csv)?;
    let numeric: Vec<(f64, &Summary)> = rows
        .iter()
        .filter_map(|r| r.value.parse::<f64>().ok().map(|v| (v, &r.summary)))
        .collect();
    let plot = |name: &str, chart: Chart| -> std::io::Result<()> {
        match draw(&chart, &dir.join(name)) {
            Ok(()) | Err(crate::plots::PlotError::NothingToPlot) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    };
    plot(
        "tradeoff_latency_anonymity",
        Chart {
            title: format!("latency vs anonymity ({param})"),
            x_label: "median delivery latency (ms)".into(),
            y_label: "mean sender entropy (bits)".into(),
            style: Style::LinesAndPoints,
            log_x: false,
            series: vec![Series {
                name: param.to_string(),
                points: rows
                    .iter()
                    .map(|r| {
                        (
                            r.summary.latency_ms.p50,
                            r.summary.anonymity.entropy_bits.mean,
                        )
                    })
                    .collect(),
            }],
        },
    )?;
    plot(
        "sweep_latency",
        Chart {
            title: format!("delivery latency by {param}"),
            x_label: param.to_string(),
            y_label: "latency (ms)".into(),
            style: Style::LinesAndPoints,
            log_x: false,
            series: vec![
                Series {
                    name: "p50".into(),
                    points: numeric
                        .iter()
                        .map(|(v, s)| (*v, s.latency_ms.p50))
                        .collect(),
                },
                Series {
                    name: "p95".into(),
                    points: numeric
                        .iter()
                        .map(|(v, s)| (*v, s.latency_ms.p95))
                        .collect(),
                },
            ],
        },
    )?;
    plot(
        "sweep_anonymity",
        Chart {
            title: format!("sender anonymity by {param}"),
            x_label: param.to_string(),
            y_label: "fraction".into(),
            style: Style::LinesAndPoints,
            log_x: false,
            series: vec![
                Series {
                    name: "normalised degree H/log2 N".into(),
                    points: numeric
                        .iter()
                        .map(|(v, s)| (*v, s.anonymity.normalised_degree_mean))
                        .collect(),
                },
                Series {
                    name: "timing attack success".into(),
                    points: numeric
                        .iter()
                        .map(|(v, s)| (*v, s.anonymity.timing_attack_success))
                        .collect(),
                },
            ],
        },
    )?;
    plot(
        "sweep_overhead",
        Chart {
            title: format!("bytes on the wire per delivered message by {param}"),
            x_label: param.to_string(),
            y_label: "bytes".into(),
            style: Style::LinesAndPoints,
            log_x: false,
            series: vec![Series {
                name: "wire bytes / delivered".into(),
                points: numeric
                    .iter()
                    .map(|(v, s)| (*v, s.overhead.wire_bytes_per_delivered))
                    .collect(),
            }],
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Distribution::of(&v);
        assert_eq!(
            (d.p50, d.p95, d.p99, d.max, d.min),
            (50.0, 95.0, 99.0, 100.0, 1.0)
        );
        assert_eq!(d.mean, 50.5);
        assert_eq!(Distribution::of(&[]), Distribution::default());
    }
}
