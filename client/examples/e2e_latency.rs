//! End-to-end latency benchmark (a bench binary, not a test): 1 KiB messages from alice to
//! bob, spread over 20 contact relationships (`E2E_CONTACTS`), through a devnet of real processes (3 relays, 3 mailbox nodes, 1 timer, rate limits
//! relaxed), with mixing off and with the default mixing delays, at 10 and 1,000 messages/s.
//! Latency is from the send (sender's clock) to the moment bob's client has the message
//! decrypted (same machine, same clock). Prints a Markdown table for `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --workspace --bins --examples --profile test
//! target/debug/examples/e2e_latency            # E2E_SECONDS_FAST=3 E2E_SECONDS_SLOW=10
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use whispr_client::devnet::{Devnet, DevnetOptions, default_bin_dir};
use whispr_client::{Client, KdfParams, Receipts, SendOptions, Settings, now_ms};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).or(sorted.last()).copied().unwrap_or(0)
}

struct Scenario {
    label: &'static str,
    mix_delay_ms: u64,
    rate: u64,
    seconds: u64,
}

fn main() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;
    let devnet = rt.block_on(Devnet::up(DevnetOptions {
        dir: tmp.path().join("devnet"),
        relays: 3,
        mailboxes: 3,
        timers: 1,
        bin_dir: default_bin_dir(),
        relaxed_limits: true,
    }))?;
    let url = devnet.directory_url().to_string();
    let big = Settings {
        outbox_max: 1_000_000,
        surbs_max: 1_000_000,
        history_max: 1_000_000,
        // Pinning the devnet's directory authorities (its network file).
        network: Some(std::fs::read_to_string(devnet.network_file())?),
        ..Settings::default()
    };
    let mut alice = Client::init(
        &tmp.path().join("alice"),
        b"a",
        &url,
        big.clone(),
        KdfParams::default(),
    )?;
    let mut bob = Client::init(
        &tmp.path().join("bob"),
        b"b",
        &url,
        Settings {
            receipts: Receipts::None,
            poll_wait_ms: 200,
            ..big
        },
        KdfParams::default(),
    )?;
    // CONTACTS relationships between the two clients (alice's bob1.. are bob's alice1..),
    // each with its own mailboxes and Olm session: the load of many conversations.
    let contacts = env_u64("E2E_CONTACTS", 20);
    rt.block_on(async {
        for i in 1..=contacts {
            let invitation = alice.invite(Some(&format!("bob{i}")), true).await?;
            let hello = bob.accept(&invitation, &format!("alice{i}")).await?;
            bob.wait_stored(hello, Duration::from_secs(30)).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while alice
            .contacts()
            .iter()
            .filter(|c| c.state == "established")
            .count()
            < contacts as usize
        {
            alice.sync(Duration::from_millis(500)).await?;
            if Instant::now() > deadline {
                return Err::<(), Error>("bob's hellos did not arrive".into());
            }
        }
        let id = alice
            .send("bob1", "warm-up", SendOptions::default())
            .await?;
        alice.wait_stored(id, Duration::from_secs(30)).await?;
        Ok(())
    })?;

    let fast = env_u64("E2E_SECONDS_FAST", 3);
    let slow = env_u64("E2E_SECONDS_SLOW", 10);
    let scenarios = [
        Scenario {
            label: "off",
            mix_delay_ms: 0,
            rate: 10,
            seconds: slow,
        },
        Scenario {
            label: "default (50 ms/hop)",
            mix_delay_ms: 50,
            rate: 10,
            seconds: slow,
        },
        Scenario {
            label: "off",
            mix_delay_ms: 0,
            rate: 1000,
            seconds: fast,
        },
        Scenario {
            label: "default (50 ms/hop)",
            mix_delay_ms: 50,
            rate: 1000,
            seconds: fast,
        },
    ];
    let alice_vault = alice.vault().clone();
    let bob_vault = bob.vault().clone();
    drop(alice);
    drop(bob);

    println!(
        "| mixing | offered msg/s | sent msg/s | delivered | p50 ms | p95 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, s) in scenarios.iter().enumerate() {
        let total = s.rate * s.seconds;
        let (tx, rx) = mpsc::channel::<(String, u64)>();
        // The receiver: bob's client in its own thread and runtime.
        let bv = bob_vault.clone();
        let prefix = format!("s{n}-");
        let expected = total;
        let receiver = std::thread::spawn(move || -> Result<(), Error> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut bob = Client::reopen(&bv)?;
                let mut got = 0u64;
                // Until everything arrived, or nothing new for 20 s.
                let mut last_new = Instant::now();
                while got < expected && last_new.elapsed() < Duration::from_secs(20) {
                    bob.sync(Duration::from_millis(200)).await?;
                    for m in bob.take_unread() {
                        last_new = Instant::now();
                        if m.text.starts_with(&prefix) {
                            got += 1;
                            let _ = tx.send((
                                m.text[..m.text.find(':').unwrap_or(0)].to_string(),
                                m.received_ms.saturating_sub(m.sent_ms),
                            ));
                        }
                    }
                }
                Ok(())
            })
        });
        // The sender: batches every 100 ms.
        let mut alice = Client::reopen(&alice_vault)?;
        alice.settings_mut().mix_delay_ms = s.mix_delay_ms;
        let per_tick = (s.rate / 10).max(1);
        let ticks = total / per_tick;
        let filler: String = "x".repeat(1024);
        let start = Instant::now();
        let mut sent = 0u64;
        rt.block_on(async {
            for t in 0..ticks {
                let due = start + Duration::from_millis(100 * t);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                let batch: Vec<(String, String)> = (0..per_tick)
                    .map(|i| {
                        let k = t * per_tick + i;
                        let id = format!("s{n}-{k}");
                        (
                            format!("bob{}", k % contacts + 1),
                            format!("{id}:{}", &filler[..1024 - id.len() - 1]),
                        )
                    })
                    .collect();
                alice.send_batch(&batch).await?;
                sent += per_tick;
                // Take in acks (no waiting), which opens each contact's window.
                alice.sync(Duration::ZERO).await?;
            }
            Ok::<(), Error>(())
        })?;
        let send_secs = start.elapsed().as_secs_f64();
        // Keep taking acks until every message went out (the windows drain).
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            while alice.status().iter().any(|o| {
                o.state == whispr_client::OutState::Sending && o.fragments_acked < o.fragments
            }) && Instant::now() < deadline
            {
                alice.sync(Duration::from_millis(100)).await?;
            }
            Ok::<(), Error>(())
        })?;
        let refused = alice.refused_packets().clone();
        drop(alice);
        receiver.join().map_err(|_| "receiver panicked")??;
        let mut latencies: HashMap<String, u64> = HashMap::new();
        for (id, l) in rx.try_iter() {
            latencies.insert(id, l);
        }
        let mut v: Vec<u64> = latencies.values().copied().collect();
        v.sort_unstable();
        println!(
            "| {} | {} | {:.0} | {}/{} | {} | {} | {} | {} |",
            s.label,
            s.rate,
            sent as f64 / send_secs,
            v.len(),
            total,
            percentile(&v, 0.50),
            percentile(&v, 0.95),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(0)
        );
        if !refused.is_empty() {
            eprintln!("  packets the edge did not take: {refused:?}");
        }
        // Let the acks drain before the next scenario.
        std::thread::sleep(Duration::from_secs(2));
        let _ = now_ms();
    }
    // Where packets were dropped, by node and reason (Prometheus counters).
    for node in &devnet.record().nodes {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", node.http_port)) {
            use std::io::{Read, Write};
            let _ = write!(c, "GET /metrics HTTP/1.0\r\n\r\n");
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            for line in text.lines() {
                let l = line.trim();
                if (l.contains("drop") || l.contains("refused") || l.contains("failed"))
                    && !l.starts_with('#')
                    && !l.ends_with(" 0")
                {
                    eprintln!("  {}: {l}", node.name);
                }
            }
        }
    }
    drop(devnet);
    Ok(())
}
