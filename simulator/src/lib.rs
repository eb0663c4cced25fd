//! Network simulator: a deterministic discrete-event driver over the same relay, mailbox
//! and timer cores as the real nodes.
//!
//! Being built for the issue "Network simulator: deterministic, at scale, over the real
//! protocol cores". What exists so far: [`engine`], the event heap and the seeded RNG tree;
//! [`anonymity`], the observer's sender entropy and the timing-correlation attack; [`links`],
//! latency distributions, bandwidth, loss and partitions.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod anonymity;
pub mod codec;
pub mod engine;
pub mod links;
pub mod plots;
pub mod report;
pub mod scenario;
pub mod world;

use std::path::Path;

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// Writing outputs.
    #[error("writing outputs: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs `sc` with `seed`; writes the outputs into `out` when given. `base` is the scenario
/// file's directory. `progress` gets (fraction of simulated time done, events so far).
pub fn run(
    sc: &scenario::Scenario,
    seed: u64,
    base: &Path,
    out: Option<&Path>,
    progress: impl FnMut(f64, u64),
) -> Result<(report::Summary, report::RunInfo, world::Results), SimError> {
    let started = std::time::Instant::now();
    let log: Option<Box<dyn std::io::Write>> = match out {
        Some(dir) if sc.output.event_log => {
            std::fs::create_dir_all(dir)?;
            Some(Box::new(std::io::BufWriter::new(std::fs::File::create(
                dir.join("events.log"),
            )?)))
        }
        _ => None,
    };
    let world = world::World::new(sc.clone(), seed, base, log)?;
    let setup = started.elapsed().as_secs_f64();
    let loop_started = std::time::Instant::now();
    let results = world.run(progress);
    let loop_s = loop_started.elapsed().as_secs_f64().max(1e-9);
    let summary = report::summarise(sc, seed, &results);
    let info = report::RunInfo {
        seed,
        wall_s: started.elapsed().as_secs_f64(),
        setup_s: setup,
        events_per_s: results.events as f64 / loop_s,
        packet_hops_per_s: results.counters.packet_hops as f64 / loop_s,
        peak_rss_mib: report::peak_rss_mib(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    if let Some(dir) = out {
        report::write_outputs(dir, &summary, &results)?;
        let json = serde_json::to_string_pretty(&info).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("run.json"), json + "\n")?;
    }
    Ok((summary, info, results))
}
