//! `whispr-sim`: run a scenario, or sweep one parameter of it.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use whispr_simulator::report::{SweepRow, write_sweep};
use whispr_simulator::scenario::Scenario;

#[derive(Parser)]
#[command(name = "whispr-sim", version, about = "Whispr Mesh network simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario once.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Seed (the SIM_SEED environment variable overrides it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Overrides a scenario field: `--param mixing.delay_ms_mean=20` (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Runs a scenario once per value of one parameter and plots the trade-offs.
    Sweep {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// The swept parameter with its values: `mixing.delay_ms_mean=10,20,50,100`.
        #[arg(long = "param")]
        param: String,
        /// Other overrides, as for `run` (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Seed (the SIM_SEED environment variable overrides it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (one subdirectory per value).
        #[arg(long)]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn seed_from_env(seed: u64) -> Result<u64, String> {
    match std::env::var("SIM_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("SIM_SEED={s:?} is not an unsigned integer")),
        Err(_) => Ok(seed),
    }
}

/// A one-line progress bar on a terminal (nothing otherwise).
fn progress_bar(label: String, quiet: bool) -> impl FnMut(f64, u64) {
    let show = !quiet && std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    move |fraction: f64, events: u64| {
        if !show {
            return;
        }
        let width = 30;
        let done = ((fraction.clamp(0.0, 1.0)) * width as f64) as usize;
        eprint!(
            "\r{label} [{}{}] {:>3.0}%  {events} events  {:.0} s",
            "#".repeat(done),
            " ".repeat(width - done),
            fraction * 100.0,
            started.elapsed().as_secs_f64()
        );
        if fraction >= 1.0 {
            eprintln!();
        }
    }
}

fn base_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn run_one(
    path: &Path,
    params: &[String],
    seed: u64,
    out: &Path,
    quiet: bool,
) -> Result<whispr_simulator::report::Summary, String> {
    let sc = Scenario::load(path, params).map_err(|e| e.to_string())?;
    let (summary, info, _) = whispr_simulator::run(
        &sc,
        seed,
        &base_of(path),
        Some(out),
        progress_bar(format!("{} seed {seed}", sc.name), quiet),
    )
    .map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {} of {} messages delivered, latency p50 {} ms p99 {} ms, entropy {:.2} of {:.2} bits, {} events in {:.1} s ({:.0}/s), peak {:.0} MiB → {}",
        sc.name,
        summary.messages.delivered,
        summary.messages.sent,
        summary.latency_ms.p50,
        summary.latency_ms.p99,
        summary.anonymity.entropy_bits.mean,
        summary.anonymity.max_entropy_bits,
        summary.events,
        info.wall_s,
        info.events_per_s,
        info.peak_rss_mib,
        out.display()
    );
    if !summary.invariants.ok {
        for v in &summary.invariants.first {
            eprintln!("invariant violated: {v}");
        }
        let extra: String = params.iter().map(|p| format!(" --param {p}")).collect();
        return Err(format!(
            "{} invariant violation(s); replay with: SIM_SEED={seed} whispr-sim run {}{extra} --out {}",
            summary.invariants.violations,
            path.display(),
            out.display()
        ));
    }
    Ok(summary)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            scenario,
            seed,
            out,
            params,
            quiet,
        } => seed_from_env(seed)
            .and_then(|seed| run_one(&scenario, &params, seed, &out, quiet).map(|_| ())),
        Command::Sweep {
            scenario,
            param,
            sets,
            seed,
            out,
            quiet,
        } => seed_from_env(seed).and_then(|seed| {
            let (key, values) = param
                .split_once('=')
                .ok_or_else(|| "--param must be key=v1,v2,…".to_string())?;
            let mut rows = Vec::new();
            for value in values.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                let mut params = sets.clone();
                params.push(format!("{key}={value}"));
                let dir = out.join(format!("{key}={value}"));
                let summary = run_one(&scenario, &params, seed, &dir, quiet)?;
                rows.push(SweepRow {
                    value: value.to_string(),
                    summary,
                });
            }
            std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
            write_sweep(&out, key, &rows).map_err(|e| e.to_string())?;
            eprintln!("sweep of {key}: {} runs → {}", rows.len(), out.display());
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whispr-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
