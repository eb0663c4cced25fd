//! Mailbox replication over a devnet of real processes (issue 15, `docs/replication.md`):
//! three mailbox nodes, so every mailbox has all three as its replica set (R = 3, W = 2).
//! Driven through the `whispr` command as a user would.
//!
//! * A replica of both users' mailboxes is killed with SIGKILL mid-conversation: every message
//!   sent is acknowledged ("stored"), and delivered exactly once; replies keep flowing.
//! * A kill -9 loop across the replicas, one down at a time, while alice sends (without
//!   waiting for each acknowledgement) and bob reads: every acknowledged message reaches bob
//!   exactly once (a message may fail after all its attempts under such churn: it is
//!   reported, and reaches bob at most once).
//! * It is restarted with its data deleted (keys kept: a lost disk): it is repaired from its
//!   peers — same mailboxes, same messages — and, with the two other replicas killed, it
//!   alone serves bob every message he had not read.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use whispr_client::devnet::{self, Devnet, DevnetOptions};

mod common;
use common::{User, WAIT, http_get};

/// Rounds of the kill -9 loop (each kills one replica and restarts it); more with
/// `WHISPR_KILL_LOOP_ROUNDS` (the longer run of `docs/benchmarks.md`).
const ROUNDS: usize = 100;

fn metric(devnet: &Devnet, node: &str, name: &str) -> Option<u64> {
    let port = devnet
        .record()
        .nodes
        .iter()
        .find(|n| n.name == node)?
        .http_port;
    let text = http_get(port, "/metrics")?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_outlives_a_killed_replica_and_a_lost_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut devnet = Devnet::up(DevnetOptions {
        dir: tmp.path().join("devnet"),
        relays: 3,
        mailboxes: 3,
        timers: 1,
        bin_dir: devnet::default_bin_dir(),
        relaxed_limits: false,
    })
    .await
    .unwrap();
    let url = devnet.directory_url().to_string();
    let network = devnet.network_file().display().to_string();
    let user = |name: &str, pass: &'static str| User {
        home: tmp.path().join(name),
        pass,
    };
    let (alice, bob) = (user("alice", "pass-a"), user("bob", "pass-b"));
    alice.ok(&["init", "--directory", &url, "--network", &network]);
    bob.ok(&["init", "--directory", &url, "--network", &network]);
    let invitation = alice.ok(&["invite", "--name", "bob"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    bob.ok(&["accept", &invitation, "--name", "alice"]);
    alice.recv_notice("contact_established");

    // A replica of every mailbox is killed mid-conversation: nothing acknowledged is lost,
    // nothing arrives twice, and new messages keep flowing both ways.
    let texts: Vec<String> = (0..6)
        .map(|i| format!("before and after a crash {i}"))
        .collect();
    for (i, text) in texts.iter().enumerate() {
        if i == 3 {
            devnet.kill("mailbox1").unwrap();
        }
        alice.send_stored("bob", text);
    }
    bob.recv_exactly(&texts);
    bob.send_stored("alice", "reply with a replica down");
    alice.recv_exactly(&["reply with a replica down".to_string()]);
    devnet.restart("mailbox1", false).unwrap();

    // A kill -9 loop across the replicas (one down at a time: R − W = 1) while alice sends
    // and bob reads: every acknowledged message reaches bob exactly once.
    let stop = Arc::new(AtomicBool::new(false));
    // Alice sends without waiting for each acknowledgement (so that the loop sees many
    // messages in flight), taking acks in and retransmitting every few sends; all must end
    // acknowledged.
    let sender = {
        let (alice, stop) = (alice.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("during the kill loop {i}");
                let out = alice.ok(&["send", "bob", &text, "--no-wait"]);
                let id = out.first().and_then(|v| v["id"].as_u64()).unwrap();
                sent.push((id, text));
                i += 1;
                if i % 4 == 0 {
                    let _ = alice.cmd(&["recv", "--wait", "0"]);
                }
            }
            sent
        })
    };
    let reader = {
        let (bob, stop) = (bob.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                got.extend(bob.recv_some());
            }
            got
        })
    };
    let rounds = std::env::var("WHISPR_KILL_LOOP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
        .max(ROUNDS);
    let started = Instant::now();
    for round in 0..rounds {
        let name = format!("mailbox{}", round % 3 + 1);
        devnet.kill(&name).unwrap();
        devnet.restart(&name, false).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let mut got = reader.join().unwrap();
    assert!(
        sent.len() >= 20,
        "only {} messages sent during the kill loop",
        sent.len()
    );
    // Every message ends acknowledged, or failed after `attempts_max` sends (reported to the
    // user, never silent: with a replica killed every fraction of a second, each attempt's
    // entry replica or its peer can die before the receipt leaves).
    let states = alice.wait_settled();
    let state_of = |id: &u64| states.get(id).cloned().unwrap_or_default();
    let acked: Vec<String> = sent
        .iter()
        .filter(|(id, _)| ["stored", "delivered", "read"].contains(&state_of(id).as_str()))
        .map(|(_, t)| t.clone())
        .collect();
    let failed: Vec<String> = sent
        .iter()
        .filter(|(id, _)| state_of(id) == "failed")
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(acked.len() + failed.len(), sent.len(), "{states:?}");
    // Every acknowledged message reaches bob, each exactly once; a failed one at most once.
    let rest: Vec<String> = acked.iter().filter(|t| !got.contains(t)).cloned().collect();
    bob.recv_exactly(&rest);
    got.extend(rest);
    got.extend(bob.recv_some());
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "a message arrived twice: {got:?}");
    assert!(acked.iter().all(|t| got.contains(t)));
    assert!(
        got.iter().all(|t| acked.contains(t) || failed.contains(t)),
        "{got:?}"
    );
    eprintln!(
        "kill loop: {rounds} rounds in {:?}, {} messages sent: {} acknowledged, each delivered once; {} failed after every attempt",
        started.elapsed(),
        sent.len(),
        acked.len(),
        failed.len()
    );

    // Unread messages, then a replica is killed and comes back with an empty disk: its peers
    // repair it (the mailbox records, then the messages).
    let unread: Vec<String> = (0..5).map(|i| format!("unread {i}")).collect();
    for text in &unread {
        alice.send_stored("bob", text);
    }
    devnet.kill("mailbox1").unwrap();
    devnet.restart("mailbox1", true).unwrap();
    let gauges = ["whispr_mailbox_mailboxes", "whispr_mailbox_messages"];
    let deadline = Instant::now() + WAIT;
    loop {
        let repaired = gauges.iter().all(|g| {
            let of = |n: &str| metric(&devnet, n, g);
            of("mailbox1").is_some_and(|v| v > 0)
                && of("mailbox1") == of("mailbox2")
                && of("mailbox1") == of("mailbox3")
        });
        if repaired {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mailbox1 was not repaired: {:?}",
            ["mailbox1", "mailbox2", "mailbox3"].map(|n| gauges.map(|g| metric(&devnet, n, g)))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The repaired replica alone serves bob everything he had not read.
    devnet.kill("mailbox2").unwrap();
    devnet.kill("mailbox3").unwrap();
    bob.recv_exactly(&unread);

    // All back: the conversation goes on.
    devnet.restart("mailbox2", false).unwrap();
    devnet.restart("mailbox3", false).unwrap();
    alice.send_stored("bob", "all replicas back");
    bob.recv_exactly(&["all replicas back".to_string()]);
    assert!(
        devnet.exited().is_empty(),
        "a node died: {:?}",
        devnet.exited()
    );
}
