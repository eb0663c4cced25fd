//! End to end over a devnet of real processes (`whispr devnet up`: 3 relays, 3 mailbox nodes,
//! 1 timer), driven through the `whispr` command as a user would: every line of `make demo`
//! (invitation, message and reply, 100 KiB in fragments, a scheduled send arriving at its
//! time, a cancelled one never arriving, a disappearing message gone from the mailbox node and
//! from the recipient's history, a mix killed mid-conversation), plus: retransmission after
//! lost fragments, duplicate deliveries suppressed, a wrong access key refused, an invitation
//! answered twice, a prekey fetched anonymously through the mesh, a wrong passphrase, and the
//! unlinkability check on the edge relay's and the mailbox node's logs and stored data.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use whispr_client::invite::Invitation;
use whispr_client::{Client, now_ms};

const WHISPR: &str = env!("CARGO_BIN_EXE_whispr");

/// Longest wait for something to come through the mesh (or for a node to count it). Generous:
/// on a loaded machine a round trip through the mixes can take many seconds, and a deadline
/// costs time only when the test fails.
const DELIVERY: Duration = Duration::from_secs(120);

/// Polls `probe` every 200 ms until it gives `Some`; panics after `within`.
fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sleeps until the wall clock (the one the nodes and clients use) reaches `at_ms`.
fn sleep_until_ms(at_ms: u64) {
    loop {
        let now = now_ms();
        if now >= at_ms {
            return;
        }
        std::thread::sleep(Duration::from_millis((at_ms - now).min(500)));
    }
}

/// A child process that is killed if still running when this is dropped (by a failed
/// assertion, say), so that it does not outlive the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct User {
    home: PathBuf,
    pass: &'static str,
}

impl User {
    fn cmd(&self, args: &[&str]) -> Output {
        self.cmd_stdin(args, None)
    }

    fn cmd_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(WHISPR)
            .arg("--home")
            .arg(&self.home)
            .arg("--json")
            .args(args)
            .env("WHISPR_PASSPHRASE", self.pass)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(input).unwrap();
        }
        c.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; its JSON lines.
    fn ok(&self, args: &[&str]) -> Vec<Value> {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "whispr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        lines(&o)
    }

    fn recv(&self) -> (Vec<Value>, Vec<Value>) {
        let all = self.ok(&["recv", "--wait", "1"]);
        let (m, n): (Vec<Value>, Vec<Value>) =
            all.into_iter().partition(|v| v["type"] == "message");
        (m, n)
    }

    /// Receives until `found` holds on the messages seen so far (or 120 s).
    fn recv_until(&self, what: &str, found: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        self.recv_until_from(Vec::new(), what, DELIVERY, found)
    }

    /// Receives, adding to `seen`, until `found` holds on the messages seen so far; panics
    /// after `within`.
    fn recv_until_from(
        &self,
        mut seen: Vec<Value>,
        what: &str,
        within: Duration,
        found: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            if found(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; received meanwhile: {seen:?}"
            );
            seen.extend(self.recv().0);
        }
    }

    /// Receives until a notice of `kind` comes (or 120 s); the messages received meanwhile.
    fn recv_notice(&self, kind: &str) -> Vec<Value> {
        let deadline = Instant::now() + DELIVERY;
        let (mut messages, mut notices) = (Vec::new(), Vec::new());
        loop {
            let (m, n) = self.recv();
            messages.extend(m);
            notices.extend(n);
            if notices.iter().any(|n| n["kind"] == kind) {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a {kind} notice; got {notices:?}"
            );
        }
    }

    fn client(&self) -> Client {
        Client::open(&self.home, self.pass.as_bytes()).unwrap()
    }
}

fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

struct Net {
    dir: PathBuf,
    child: Child,
}

impl Net {
    fn up(dir: &Path) -> Net {
        let child = Command::new(WHISPR)
            .args(["devnet", "up", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Built first, so that a panic below still stops the devnet.
        let mut net = Net {
            dir: dir.to_path_buf(),
            child,
        };
        // `devnet up` writes `directory-url` once every node sees all the others; it gives up
        // by itself after 60 s for the edge relay plus 120 s for the rest, so wait longer
        // than that, and stop early if it gave up.
        let deadline = Instant::now() + Duration::from_secs(300);
        while !dir.join("directory-url").exists() {
            if let Some(status) = net.child.try_wait().unwrap() {
                panic!(
                    "`whispr devnet up` exited ({status}) before the devnet came up; logs in {}",
                    dir.join("logs").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the devnet did not come up within 300 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        net
    }

    fn url(&self) -> String {
        std::fs::read_to_string(self.dir.join("directory-url"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn record(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join("devnet.json")).unwrap())
            .unwrap()
    }

    fn port(&self, name: &str) -> u16 {
        self.record()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["http_port"]
            .as_u64()
            .unwrap() as u16
    }

    fn metric(&self, node: &str, name: &str) -> u64 {
        let text = http_get(self.port(node), "/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A metric summed over `nodes`.
    fn metric_sum(&self, nodes: &[&str], name: &str) -> u64 {
        nodes.iter().map(|n| self.metric(n, name)).sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(WHISPR)
            .args(["devnet", "down", "--dir"])
            .arg(&self.dir)
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET on loopback (the test needs nothing more).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// Every file under `dir` (logs and RocksDB files), searched for each needle.
fn files_containing(dir: &Path, needles: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                for (what, needle) in needles {
                    if !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle) {
                        hits.push(format!("{what} in {}", p.display()));
                    }
                }
            }
        }
    }
    hits
}

#[test]
fn private_messages_end_to_end_over_a_devnet_of_real_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::up(&tmp.path().join("devnet"));
    let url = net.url();
    // The devnet's network file: the clients pin its three directory authorities.
    let network = net.dir.join("network").display().to_string();
    let user = |name: &str, pass: &'static str| User {
        home: tmp.path().join(name),
        pass,
    };
    let (alice, bob) = (user("alice", "pass-a"), user("bob", "pass-b"));
    alice.ok(&["init", "--directory", &url, "--network", &network]);
    bob.ok(&["init", "--directory", &url, "--network", &network]);

    // A wrong passphrase is refused with a clear error and changes nothing.
    let wrong = User {
        home: alice.home.clone(),
        pass: "not-alice",
    };
    let o = wrong.cmd(&["contacts"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("wrong passphrase"));

    // Invitation and acceptance; the contact is established on both sides.
    let invitation = alice.ok(&["invite", "--name", "bob"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(invitation.starts_with("WHISPR1:"));
    let accepted = bob.ok(&["accept", &invitation, "--name", "alice"]);
    assert_eq!(accepted[0]["hello"], "stored");
    alice.recv_notice("contact_established");
    let contacts = alice.ok(&["contacts"]);
    assert_eq!(contacts[0]["contacts"][0]["state"], "established");
    let sa = alice.ok(&["safety", "bob"])[0]["safety_number"].clone();
    let sb = bob.ok(&["safety", "alice"])[0]["safety_number"].clone();
    assert_eq!(sa, sb);
    assert_eq!(sa.as_str().unwrap().split(' ').count(), 12);

    // A message and a reply.
    let sent = bob.ok(&["send", "alice", "hi alice"]);
    assert_eq!(sent[0]["state"], "stored");
    let got = alice.recv_until("bob's message", |m| !m.is_empty());
    assert_eq!(texts(&got), ["hi alice"]);
    assert_eq!(got[0]["from"], "bob");
    alice.ok(&["send", "bob", "hello bob"]);
    let got = bob.recv_until("the reply", |m| !m.is_empty());
    assert_eq!(texts(&got), ["hello bob"]);

    // 100 KiB in many fragments.
    let big: String = (0..102_400)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let o = alice.cmd_stdin(
        &["send", "bob", "-", "--timeout", "600"],
        Some(big.as_bytes()),
    );
    let sent = lines(&o);
    assert_eq!(sent[0]["state"], "stored", "{sent:?}");
    assert_eq!(sent[0]["fragments"], 86);
    let got = bob.recv_until("the 100 KiB message", |m| !m.is_empty());
    assert_eq!(texts(&got), [big]);

    // A cancelled scheduled send never arrives; a scheduled send arrives at its time. The
    // cancelled one is due first (20 s is ample time to cancel it, even on a loaded machine):
    // the other one's arrival shows that the timer went past the cancelled one's release time
    // (a timer fires in due order, and both take the same way from there).
    let gone = alice.ok(&["send", "bob", "cancelled", "--in", "20s"]);
    assert_eq!(gone[0]["state"], "held", "held by the timer: {gone:?}");
    let gone_release = gone[0]["release_ms"].as_u64().unwrap();
    let gone_id = gone[0]["id"].as_u64().unwrap().to_string();
    let cancelled = alice.ok(&["cancel", &gone_id]);
    assert_eq!(cancelled[0]["state"], "cancelled");
    let before = now_ms();
    let held = alice.ok(&["send", "bob", "scheduled", "--in", "22s"]);
    assert_eq!(held[0]["state"], "held", "held by the timer: {held:?}");
    let release = held[0]["release_ms"].as_u64().unwrap();
    assert!(release >= before + 22_000);
    assert!(
        release >= gone_release + 2_000,
        "the scheduled message is due after the cancelled one"
    );
    // Nothing arrives before the release: what a receive that ended before it got must be
    // empty (on a machine so slow that it ended later, anything got is checked below).
    let early = bob.recv().0;
    if now_ms() < release {
        assert!(
            early.is_empty(),
            "nothing may arrive before the release: {early:?}"
        );
    }
    let got = bob.recv_until_from(
        early,
        "the scheduled message",
        Duration::from_millis(release.saturating_sub(now_ms())) + DELIVERY,
        |m| texts(m).iter().any(|t| t == "scheduled"),
    );
    assert_eq!(
        texts(&got),
        ["scheduled"],
        "the cancelled message must never arrive"
    );
    assert_eq!(got[0]["sent_ms"].as_u64().unwrap(), release);
    let received = got[0]["received_ms"].as_u64().unwrap();
    assert!(received >= release, "delivered before its release time");
    // Very generous: this catches a release missed by far, not a slow machine.
    assert!(
        received < release + 60_000,
        "delivered long after its time: {} ms late",
        received - release
    );
    assert!(
        bob.recv().0.is_empty(),
        "the cancelled message must never arrive"
    );

    // Disappearing messages: bob sends one that alice reads in time, then alice sends one
    // that bob leaves unread; both expire 20 s after they were sent, so both expiries are
    // waited for at once. (In this order: a `send` syncs its sender's mailboxes, and bob's
    // must not fetch alice's message.)
    let vanishing = bob.ok(&["send", "alice", "vanishing", "--expire-after", "20s"]);
    assert_eq!(vanishing[0]["state"], "stored", "{vanishing:?}");
    let short_from = now_ms();
    let short = alice.ok(&["send", "bob", "short-lived", "--expire-after", "20s"]);
    assert_eq!(short[0]["state"], "stored", "{short:?}");
    // Its expiry is 20 s after the send began, so between these two times.
    let (short_earliest, short_latest) = (short_from + 20_000, now_ms() + 20_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored_on_node = || {
        rt.block_on(async {
            let mut c = bob.client();
            c.stored_on_node("alice").await.unwrap()
        })
    };
    // The mailbox node stores it, unread, until its expiry (checked when this ran before).
    let stored_now = stored_on_node();
    if now_ms() < short_earliest {
        assert!(
            stored_now
                .iter()
                .any(|e| (short_earliest..=short_latest).contains(e)),
            "the disappearing message is stored until its expiry: {stored_now:?}"
        );
    } else {
        eprintln!("the disappearing message expired before it could be looked for");
    }
    // Read in time: in the recipient's history until its expiry.
    let got = alice.recv_until("the vanishing message", |m| {
        texts(m).iter().any(|t| t == "vanishing")
    });
    assert_eq!(texts(&got), ["vanishing"]);
    let vanishes_at = got[0]["expires_ms"].as_u64().unwrap();
    let history = alice.ok(&["history", "bob"]);
    if now_ms() < vanishes_at {
        assert!(texts(history[0]["messages"].as_array().unwrap()).contains(&"vanishing".into()));
    }
    // Both expired: gone from the mailbox node, never served, gone from alice's history.
    sleep_until_ms(short_latest.max(vanishes_at) + 100);
    let stored_later = stored_on_node();
    let now = now_ms();
    assert!(
        stored_later.iter().all(|e| *e > now),
        "the node still holds an expired message: {stored_later:?} at {now}"
    );
    assert!(bob.recv().0.is_empty(), "an expired message was served");
    let history = alice.ok(&["history", "bob"]);
    assert!(!texts(history[0]["messages"].as_array().unwrap()).contains(&"vanishing".into()));

    // A second acceptor of the same invitation is refused; the inviter is told.
    let carol = user("carol", "pass-c");
    carol.ok(&["init", "--directory", &url, "--network", &network]);
    carol.ok(&["accept", &invitation, "--name", "alice"]);
    let m = alice.recv_notice("invitation_reused");
    assert!(m.is_empty(), "{m:?}");
    assert_eq!(
        alice.ok(&["contacts"])[0]["contacts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A wrong access key: the mailbox node refuses the deposit; nothing is acknowledged.
    let for_eve = alice.ok(&["invite", "--name", "eve"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    let mut forged = Invitation::decode(&for_eve).unwrap();
    forged.access = [7u8; 32];
    let mailbox_nodes = ["mailbox1", "mailbox2", "mailbox3"];
    let refused_before =
        net.metric_sum(&mailbox_nodes, "whispr_mailbox_mesh_deposits_refused_total");
    let eve = user("eve", "pass-e");
    eve.ok(&["init", "--directory", &url, "--network", &network]);
    let o = eve.cmd(&[
        "accept",
        &forged.encode(),
        "--name",
        "alice",
        "--timeout",
        "5",
    ]);
    assert!(
        !o.status.success(),
        "a wrong access key must not get through"
    );
    // The refused deposit may still be on its way through the mesh when `accept` gives up.
    wait_for("the node to count the refusal", DELIVERY, || {
        (net.metric_sum(&mailbox_nodes, "whispr_mailbox_mesh_deposits_refused_total")
            > refused_before)
            .then_some(())
    });

    let short = alice.ok(&["invite", "--name", "dave", "--short"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(short.len() < for_eve.len());

    // The short invitation: dave fetches a one-time key anonymously through the mesh. Dave
    // retransmits far sooner than acks can come back, so the mailbox sees duplicates; alice
    // gets each message once.
    let dave = user("dave", "pass-d");
    dave.ok(&[
        "init",
        "--directory",
        &url,
        "--network",
        &network,
        "--retransmit-after-ms",
        "300",
        "--mix-delay-ms",
        "300",
    ]);
    dave.ok(&["accept", &short, "--name", "alice"]);
    let duplicates_before =
        net.metric_sum(&mailbox_nodes, "whispr_mailbox_deposits_duplicate_total");
    let text: String = "d".repeat(6_000);
    let sent = dave.ok(&["send", "alice", &text, "--timeout", "300"]);
    assert_eq!(sent[0]["state"], "stored");
    assert!(sent[0]["retransmissions"].as_u64().unwrap() > 0, "{sent:?}");
    let got = alice.recv_until("dave's message", |m| m.iter().any(|x| x["from"] == "dave"));
    wait_for(
        "the mailbox to see the retransmitted copies",
        DELIVERY,
        || {
            (net.metric_sum(&mailbox_nodes, "whispr_mailbox_deposits_duplicate_total")
                > duplicates_before)
                .then_some(())
        },
    );
    // A later message, sent once every copy of the first one was: when it is in, copies still
    // under way when alice first received have had their chance to show up twice.
    let later = dave.ok(&["send", "alice", "after the copies", "--timeout", "300"]);
    assert_eq!(later[0]["state"], "stored", "{later:?}");
    let all = alice.recv_until_from(got, "dave's later message", DELIVERY, |m| {
        texts(m).iter().any(|t| t == "after the copies")
    });
    assert_eq!(
        all.iter().filter(|m| m["text"] == text.as_str()).count(),
        1,
        "delivered exactly once: {:?}",
        texts(&all)
            .iter()
            .map(|t| t.chars().take(20).collect::<String>())
            .collect::<Vec<_>>()
    );

    // Streaming: `recv --follow --stream` gets messages pushed over WebSocket, and sends cover
    // traffic (Poisson) that never shows up as a message.
    {
        let mut c = bob.client();
        c.settings_mut().cover_per_min = 600.0;
        c.save().unwrap();
    }
    let (cover_before, bob_mailboxes) = {
        let c = bob.client();
        (c.cover_sent(), c.mailbox_ids().len() as u64)
    };
    let streams_before = net.metric_sum(&mailbox_nodes, "whispr_mailbox_streams_open");
    let mut follower = KillOnDrop(
        Command::new(WHISPR)
            .arg("--home")
            .arg(&bob.home)
            .args(["--json", "recv", "--follow", "--stream"])
            .env("WHISPR_PASSPHRASE", bob.pass)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = follower.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // The follower polls once, then opens a stream per mailbox: once they are all open, a new
    // message can only come to it over a stream.
    wait_for("bob's mailbox streams to open", DELIVERY, || {
        if let Some(status) = follower.0.try_wait().unwrap() {
            panic!("recv --follow --stream exited early ({status})");
        }
        (net.metric_sum(&mailbox_nodes, "whispr_mailbox_streams_open")
            >= streams_before + bob_mailboxes)
            .then_some(())
    });
    let streamed_in = |text: &str, streamed: &mut Vec<Value>| {
        let deadline = Instant::now() + DELIVERY;
        while !texts(streamed).iter().any(|t| t == text) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{text:?} was not pushed over the stream; got {streamed:?}"
            );
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(v) if v["type"] == "message" => streamed.push(v),
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("recv --follow --stream ended; got {streamed:?}")
                }
            }
        }
    };
    let mut streamed = Vec::new();
    alice.ok(&["send", "bob", "streamed"]);
    streamed_in("streamed", &mut streamed);
    assert_eq!(texts(&streamed), ["streamed"], "pushed over the stream");
    // Cover traffic: wait until the follower has sent some, then for a later message sent
    // after it; cover packets (deposits into bob's own mailboxes) must not show meanwhile.
    wait_for("recv --follow to send cover traffic", DELIVERY, || {
        (bob.client().cover_sent() > cover_before).then_some(())
    });
    alice.ok(&["send", "bob", "streamed again"]);
    streamed_in("streamed again", &mut streamed);
    assert_eq!(
        texts(&streamed),
        ["streamed", "streamed again"],
        "cover traffic must not show"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(
        follower.0.wait().unwrap().success(),
        "Ctrl-C ends recv --follow cleanly"
    );
    reader.join().unwrap();
    let extra: Vec<Value> = rx.try_iter().filter(|v| v["type"] == "message").collect();
    assert!(extra.is_empty(), "cover traffic must not show: {extra:?}");
    let mut c = bob.client();
    assert!(c.cover_sent() > cover_before, "cover packets were sent");
    c.settings_mut().cover_per_min = 0.0;
    c.save().unwrap();
    drop(c);

    // A mix killed mid-conversation: lost fragments are retransmitted through the other mix.
    // Neither client knows the mix is dead; each learns it from its own losses, and on a
    // loaded machine an ack later than `retransmit_after_ms` also counts as a loss. Five
    // attempts then ran out once in ten loaded runs (flaky hunt, bob's "still here"): the
    // test is about failing over, not about the attempt budget, so it gives both ten.
    for user in [&alice, &bob] {
        let mut c = user.client();
        c.settings_mut().attempts_max = 10;
        c.save().unwrap();
    }
    let killed = Command::new(WHISPR)
        .args(["devnet", "kill", "--dir"])
        .arg(&net.dir)
        .arg("mix1")
        .output()
        .unwrap();
    assert!(killed.status.success());
    let text: String = "k".repeat(24_000);
    // Lost fragments are sent again after 10 s, up to 10 times: allow for all of that.
    let sent = alice.ok(&["send", "bob", &text, "--timeout", "600"]);
    assert_eq!(sent[0]["state"], "stored", "{sent:?}");
    assert_eq!(sent[0]["fragments"], 21);
    // Usually some of the 21 fragments went through the dead mix and were retransmitted
    // through the other. Not always: a client that lost two routes through mix1 in the last
    // minute (refused or late acks earlier in this test) already avoids it, and then nothing
    // is lost (seen once in a CI check: 0 retransmissions, the message stored). Either way
    // the message must be stored and delivered; retransmission after a mix death is pinned
    // by the client core's tests and `make demo`'s mix step.
    eprintln!(
        "with one mix of two dead: {} retransmission(s) for 21 fragments",
        sent[0]["retransmissions"]
    );
    let got = bob.recv_until("the message sent after the kill", |m| !m.is_empty());
    assert_eq!(texts(&got), [text]);
    bob.ok(&["send", "alice", "still here", "--timeout", "600"]);
    let got = alice.recv_until("bob's answer", |m| !m.is_empty());
    assert_eq!(texts(&got), ["still here"]);
    let status = alice.ok(&["status"]);
    assert!(
        status[0]["outgoing"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["state"] != "failed"),
        "{status:?}"
    );

    // Unlinkability: the edge relay knows the sender's address but nothing of the recipient;
    // the recipient's mailbox node knows the mailbox but nothing of the sender.
    let (alice_ed, alice_curve) = alice.client().identity_keys();
    let (bob_ed, bob_curve) = bob.client().identity_keys();
    let alice_boxes = alice.client().mailbox_ids();
    let bob_boxes = bob.client().mailbox_ids();
    let needle = |what: &str, hex_text: &str| {
        vec![
            (format!("{what} (hex)"), hex_text.as_bytes().to_vec()),
            (format!("{what} (raw)"), hex::decode(hex_text).unwrap()),
        ]
    };
    let mut recipient_side = Vec::new();
    recipient_side.extend(needle("bob's identity key", &bob_ed));
    recipient_side.extend(needle("bob's Olm key", &bob_curve));
    for b in &bob_boxes {
        recipient_side.extend(needle("bob's mailbox id", b));
    }
    let edge_hits = files_containing(&net.dir.join("edge"), &recipient_side);
    let edge_log = files_containing(&net.dir.join("logs/edge.log"), &recipient_side);
    assert!(
        edge_hits.is_empty() && edge_log.is_empty(),
        "{edge_hits:?} {edge_log:?}"
    );
    // Alice's messages to bob land in bob's mailbox for alice; that node must not know alice.
    let mut sender_side = Vec::new();
    sender_side.extend(needle("alice's identity key", &alice_ed));
    sender_side.extend(needle("alice's Olm key", &alice_curve));
    for b in &alice_boxes {
        sender_side.extend(needle("alice's mailbox id", b));
    }
    sender_side.push(("an address".into(), b"127.0.0.1".to_vec()));
    for node in mailbox_nodes {
        let log = net.dir.join(format!("logs/{node}.log"));
        let hits = files_containing(&log, &sender_side);
        assert!(hits.is_empty(), "{hits:?}");
        // Stored data: no identity key or Olm key of the sender, anywhere.
        let data_hits = files_containing(&net.dir.join(node), &sender_side[..4]);
        assert!(data_hits.is_empty(), "{data_hits:?}");
    }
    for node in ["edge", "mix2", "mailbox1", "mailbox2", "mailbox3", "timer1"] {
        let log = std::fs::read_to_string(net.dir.join(format!("logs/{node}.log"))).unwrap();
        for b in alice_boxes.iter().chain(&bob_boxes) {
            assert!(!log.contains(b.as_str()), "{node} logged a mailbox id");
        }
        assert!(!log.contains("127.0.0.1"), "{node} logged an address");
    }

    // `devnet down` stops every node.
    let pids: Vec<u64> = net.record()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect();
    let mut down = KillOnDrop(
        Command::new(WHISPR)
            .args(["devnet", "down", "--dir"])
            .arg(&net.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // `down` signals the supervisor (the `devnet up` process, our child), which stops every
    // node and exits; `down` waits until it is gone, which a child not yet reaped never is.
    wait_for("the devnet supervisor to stop", DELIVERY, || {
        net.child.try_wait().unwrap().map(|_| ())
    });
    assert!(down.0.wait().unwrap().success());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "node {pid} still running"
        );
    }
}
