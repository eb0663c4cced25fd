//! Measures what a user sees when mailbox replicas fail (issue 15; the RPO/RTO table of
//! `docs/replication.md`): a devnet of real processes with three mailbox nodes (every mailbox
//! on all three, R = 3, W = 2), alice sending to bob through the `whispr` command, and one,
//! two, then three mailbox nodes killed with SIGKILL, then one restarted with its data deleted.
//!
//! ```sh
//! cargo build --workspace --bins --examples --profile test
//! target/debug/examples/replica_failover
//! ```
//!
//! Prints one line per step: what was measured, in milliseconds. One run on a loaded machine
//! is noisy; the figures are for orders of magnitude (a round trip, a retransmission timeout,
//! a repair interval), which is what RPO and RTO are stated in.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use whispr_client::devnet::{Devnet, DevnetOptions, default_bin_dir};

/// Longest wait for one step.
const STEP: Duration = Duration::from_secs(180);

struct User {
    bin: PathBuf,
    home: PathBuf,
}

impl User {
    fn run(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let o = Command::new(&self.bin)
            .arg("--home")
            .arg(&self.home)
            .arg("--json")
            .args(args)
            .env("WHISPR_PASSPHRASE", "passphrase")
            .stdin(Stdio::null())
            .output()
            .context("running whispr")?;
        if !o.status.success() {
            bail!(
                "whispr {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Sends `text`; the time until the mailbox acknowledged it (`None`: not within `wait`).
    fn send(&self, text: &str, wait: Duration) -> anyhow::Result<Option<u64>> {
        let t = Instant::now();
        let secs = wait.as_secs().to_string();
        let out = self.run(&["send", "bob", text, "--timeout", &secs])?;
        let state = out
            .first()
            .and_then(|v| v["state"].as_str())
            .unwrap_or_default()
            .to_string();
        Ok(["stored", "delivered", "read"]
            .contains(&state.as_str())
            .then(|| ms(t.elapsed())))
    }

    /// Receives until `want` texts arrived, `sender` running meanwhile (a client retransmits
    /// only while it runs); the time it took.
    fn recv(&self, want: usize, sender: &User) -> anyhow::Result<u64> {
        let t = Instant::now();
        let mut got = Vec::new();
        while got.len() < want {
            if t.elapsed() > STEP {
                bail!("received {got:?}, not {want}, within {STEP:?}");
            }
            // A round where no replica answers is an error: keep trying (that is the outage).
            let _ = sender.run(&["recv", "--wait", "0"]);
            if let Ok(out) = self.run(&["recv", "--wait", "1"]) {
                got.extend(
                    out.iter()
                        .filter(|v| v["type"] == "message")
                        .map(|v| v["text"].as_str().unwrap_or_default().to_string()),
                );
            }
        }
        Ok(ms(t.elapsed()))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn metric(devnet: &Devnet, node: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let port = devnet
        .record()
        .nodes
        .iter()
        .find(|n| n.name == node)?
        .http_port;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn line(what: &str, value: impl std::fmt::Display) {
    println!("{what:<72} {value}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bin_dir = default_bin_dir();
    let mut devnet = Devnet::up(DevnetOptions {
        dir: tmp.path().join("devnet"),
        relays: 3,
        mailboxes: 3,
        timers: 1,
        bin_dir: bin_dir.clone(),
        relaxed_limits: false,
    })
    .await?;
    let url = devnet.directory_url().to_string();
    let network = devnet.network_file().display().to_string();
    let user = |name: &str| User {
        bin: bin_dir.join("whispr"),
        home: tmp.path().join(name),
    };
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        u.run(&["init", "--directory", &url, "--network", &network])?;
    }
    let invitation = alice
        .run(&["invite", "--name", "bob"])?
        .first()
        .and_then(|v| v["invitation"].as_str())
        .context("invitation")?
        .to_string();
    bob.run(&["accept", &invitation, "--name", "alice"])?;
    alice.run(&["recv", "--wait", "2"])?;
    let wait = Duration::from_secs(60);
    let send3 = |what: &str| -> anyhow::Result<()> {
        let mut acked = Vec::new();
        for i in 0..3 {
            acked.push(alice.send(&format!("{what} {i}"), wait)?);
        }
        let shown: Vec<String> = acked
            .iter()
            .map(|a| a.map_or("not acknowledged".to_string(), |v| format!("{v}")))
            .collect();
        line(
            &format!("{what}: send → acknowledged, ms (3 sends)"),
            shown.join(", "),
        );
        Ok(())
    };

    send3("all up")?;
    line("all up: bob reads the 3, ms", bob.recv(3, &alice)?);

    devnet.kill("mailbox1")?;
    send3("one replica down")?;
    line(
        "one replica down: bob reads the 3, ms",
        bob.recv(3, &alice)?,
    );

    devnet.kill("mailbox2")?;
    let mut acked = Vec::new();
    for i in 0..2 {
        acked.push(alice.send(&format!("two down {i}"), Duration::from_secs(15))?);
    }
    line(
        "two replicas down: acknowledged within 15 s (W = 2 cannot be met)",
        format!("{:?}", acked),
    );
    line(
        "two replicas down: bob reads the 2 unacknowledged ones anyway, ms",
        bob.recv(2, &alice)?,
    );

    devnet.kill("mailbox3")?;
    let t = Instant::now();
    for n in ["mailbox1", "mailbox2", "mailbox3"] {
        devnet.restart(n, false)?;
    }
    line(
        "three down, then restarted (disks kept): restart of the three, ms",
        ms(t.elapsed()),
    );
    send3("after a full outage")?;
    line(
        "after a full outage: bob reads the 3, ms",
        bob.recv(3, &alice)?,
    );

    // Unread messages, then a disk lost: time until the wiped replica holds what its peers do.
    for i in 0..3 {
        if alice.send(&format!("unread {i}"), wait)?.is_none() {
            bail!("unread {i} was not acknowledged");
        }
    }
    devnet.kill("mailbox3")?;
    let t = Instant::now();
    devnet.restart("mailbox3", true)?;
    let restarted = ms(t.elapsed());
    let gauges = ["whispr_mailbox_mailboxes", "whispr_mailbox_messages"];
    loop {
        let same = gauges.iter().all(|g| {
            let of = |n: &str| metric(&devnet, n, g);
            of("mailbox3").is_some_and(|v| v > 0) && of("mailbox3") == of("mailbox1")
        });
        if same {
            break;
        }
        if t.elapsed() > STEP {
            bail!("mailbox3 not repaired within {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    line(
        "disk lost: restart (keys kept, data deleted), ms",
        restarted,
    );
    line(
        "disk lost: restart → same mailboxes and messages as a peer, ms",
        ms(t.elapsed()),
    );
    devnet.kill("mailbox1")?;
    devnet.kill("mailbox2")?;
    line(
        "disk lost: the repaired replica alone serves bob's 3 unread, ms",
        bob.recv(3, &alice)?,
    );
    Ok(())
}
