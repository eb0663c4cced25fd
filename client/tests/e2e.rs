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

    /// Receives until `found` holds on the messages seen so far (or 30 s).
    fn recv_until(&self, what: &str, found: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            seen.extend(self.recv().0);
            if found(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
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
        let deadline = Instant::now() + Duration::from_secs(120);
        while !dir.join("directory-url").exists() {
            assert!(Instant::now() < deadline, "the devnet did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        Net {
            dir: dir.to_path_buf(),
            child,
        }
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
    let net = Net::up(&tmp.path().join("devnet"));
    let url = net.url();
    let user = |name: &str, pass: &'static str| User {
        home: tmp.path().join(name),
        pass,
    };
    let (alice, bob) = (user("alice", "pass-a"), user("bob", "pass-b"));
    alice.ok(&["init", "--directory", &url]);
    bob.ok(&["init", "--directory", &url]);

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
    let (_, notices) = alice.recv();
    assert!(notices.iter().any(|n| n["kind"] == "contact_established"));
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
    let o = alice.cmd_stdin(&["send", "bob", "-"], Some(big.as_bytes()));
    let sent = lines(&o);
    assert_eq!(sent[0]["state"], "stored", "{sent:?}");
    assert_eq!(sent[0]["fragments"], 86);
    let got = bob.recv_until("the 100 KiB message", |m| !m.is_empty());
    assert_eq!(texts(&got), [big]);

    // A scheduled send arrives at its time; a cancelled one never does.
    let before = now_ms();
    let held = alice.ok(&["send", "bob", "scheduled", "--in", "6s"]);
    assert_eq!(held[0]["state"], "held", "held by the timer: {held:?}");
    let release = held[0]["release_ms"].as_u64().unwrap();
    assert!(release >= before + 6_000);
    let gone = alice.ok(&["send", "bob", "cancelled", "--in", "8s"]);
    let gone_id = gone[0]["id"].as_u64().unwrap().to_string();
    let cancelled = alice.ok(&["cancel", &gone_id]);
    assert_eq!(cancelled[0]["state"], "cancelled");
    assert!(
        bob.recv().0.is_empty(),
        "nothing may arrive before the release"
    );
    let got = bob.recv_until("the scheduled message", |m| !m.is_empty());
    assert_eq!(texts(&got), ["scheduled"]);
    assert_eq!(got[0]["sent_ms"].as_u64().unwrap(), release);
    let received = got[0]["received_ms"].as_u64().unwrap();
    assert!(received >= release, "delivered before its release time");
    assert!(received < release + 15_000, "delivered long after its time");
    while now_ms() < release + 4_000 {
        assert!(bob.recv().0.is_empty());
    }
    assert!(
        bob.recv().0.is_empty(),
        "the cancelled message must never arrive"
    );

    // A disappearing message: the mailbox node stops storing it at its expiry, unread.
    alice.ok(&["send", "bob", "short-lived", "--expire-after", "3s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored_now = rt.block_on(async {
        let mut c = bob.client();
        c.stored_on_node("alice").await.unwrap()
    });
    assert!(
        stored_now.iter().any(|e| *e <= now_ms() + 3_500),
        "the disappearing message is stored until its expiry: {stored_now:?}"
    );
    std::thread::sleep(Duration::from_millis(3_600));
    let stored_later = rt.block_on(async {
        let mut c = bob.client();
        c.stored_on_node("alice").await.unwrap()
    });
    let now = now_ms();
    assert!(
        stored_later.iter().all(|e| *e > now),
        "the node still holds an expired message: {stored_later:?} at {now}"
    );
    assert!(bob.recv().0.is_empty(), "an expired message was served");
    // Read in time, then deleted from the recipient's history at its expiry.
    alice.ok(&["send", "bob", "vanishing", "--expire-after", "4s"]);
    let got = bob.recv_until("the vanishing message", |m| !m.is_empty());
    assert_eq!(texts(&got), ["vanishing"]);
    let history = bob.ok(&["history", "alice"]);
    assert!(texts(history[0]["messages"].as_array().unwrap()).contains(&"vanishing".into()));
    std::thread::sleep(Duration::from_millis(4_200));
    let history = bob.ok(&["history", "alice"]);
    assert!(!texts(history[0]["messages"].as_array().unwrap()).contains(&"vanishing".into()));

    // A second acceptor of the same invitation is refused; the inviter is told.
    let carol = user("carol", "pass-c");
    carol.ok(&["init", "--directory", &url]);
    carol.ok(&["accept", &invitation, "--name", "alice"]);
    let (m, notices) = alice.recv();
    assert!(m.is_empty());
    assert!(
        notices.iter().any(|n| n["kind"] == "invitation_reused"),
        "{notices:?}"
    );
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
    let refused_before: u64 = mailbox_nodes
        .iter()
        .map(|n| net.metric(n, "whispr_mailbox_mesh_deposits_refused_total"))
        .sum();
    let eve = user("eve", "pass-e");
    eve.ok(&["init", "--directory", &url]);
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
    let refused_after: u64 = mailbox_nodes
        .iter()
        .map(|n| net.metric(n, "whispr_mailbox_mesh_deposits_refused_total"))
        .sum();
    assert!(
        refused_after > refused_before,
        "the node counts the refusal"
    );

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
        "--retransmit-after-ms",
        "300",
        "--mix-delay-ms",
        "300",
    ]);
    dave.ok(&["accept", &short, "--name", "alice"]);
    let duplicates_before: u64 = mailbox_nodes
        .iter()
        .map(|n| net.metric(n, "whispr_mailbox_deposits_duplicate_total"))
        .sum();
    let text: String = "d".repeat(6_000);
    let sent = dave.ok(&["send", "alice", &text]);
    assert_eq!(sent[0]["state"], "stored");
    assert!(sent[0]["retransmissions"].as_u64().unwrap() > 0, "{sent:?}");
    let got = alice.recv_until("dave's message", |m| m.iter().any(|x| x["from"] == "dave"));
    std::thread::sleep(Duration::from_secs(2));
    let mut all = got;
    all.extend(alice.recv().0);
    assert_eq!(
        all.iter().filter(|m| m["from"] == "dave").count(),
        1,
        "delivered exactly once"
    );
    let duplicates_after: u64 = mailbox_nodes
        .iter()
        .map(|n| net.metric(n, "whispr_mailbox_deposits_duplicate_total"))
        .sum();
    assert!(
        duplicates_after > duplicates_before,
        "the mailbox saw the retransmitted copies"
    );

    // Streaming: `recv --follow --stream` gets messages pushed over WebSocket, and sends cover
    // traffic (Poisson) that never shows up as a message.
    {
        let mut c = bob.client();
        c.settings_mut().cover_per_min = 600.0;
        c.save().unwrap();
    }
    let cover_before = bob.client().cover_sent();
    let mut follower = Command::new(WHISPR)
        .arg("--home")
        .arg(&bob.home)
        .args(["--json", "recv", "--follow", "--stream"])
        .env("WHISPR_PASSPHRASE", bob.pass)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    alice.ok(&["send", "bob", "streamed"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streamed = Vec::new();
    while Instant::now() < deadline && !texts(&streamed).contains(&"streamed".to_string()) {
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(200))
            && v["type"] == "message"
        {
            streamed.push(v);
        }
    }
    assert_eq!(texts(&streamed), ["streamed"], "pushed over the stream");
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(
        follower.wait().unwrap().success(),
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
    let killed = Command::new(WHISPR)
        .args(["devnet", "kill", "--dir"])
        .arg(&net.dir)
        .arg("mix1")
        .output()
        .unwrap();
    assert!(killed.status.success());
    let text: String = "k".repeat(24_000);
    let sent = alice.ok(&["send", "bob", &text]);
    assert_eq!(sent[0]["state"], "stored", "{sent:?}");
    assert_eq!(sent[0]["fragments"], 21);
    assert!(
        sent[0]["retransmissions"].as_u64().unwrap() > 0,
        "with one mix of two dead, some of 21 fragments were lost: {sent:?}"
    );
    let got = bob.recv_until("the message sent after the kill", |m| !m.is_empty());
    assert_eq!(texts(&got), [text]);
    bob.ok(&["send", "alice", "still here"]);
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
    let down = Command::new(WHISPR)
        .args(["devnet", "down", "--dir"])
        .arg(&net.dir)
        .output()
        .unwrap();
    assert!(down.status.success());
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
