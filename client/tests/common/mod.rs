//! What the process-level tests of the `whispr` command share: a user's home driven through
//! the binary, its JSON lines, and waits for what comes through the mesh.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WHISPR: &str = env!("CARGO_BIN_EXE_whispr");
/// Longest wait for something to come through the mesh. Generous: a deadline costs time only
/// when the test fails.
pub const WAIT: Duration = Duration::from_secs(120);

/// A home of the `whispr` command.
#[derive(Clone)]
pub struct User {
    pub home: PathBuf,
    pub pass: &'static str,
}

impl User {
    /// The command for `args` (JSON output), not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(WHISPR);
        c.arg("--home")
            .arg(&self.home)
            .arg("--json")
            .args(args)
            .env("WHISPR_PASSPHRASE", self.pass);
        c
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> Vec<Value> {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "whispr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        lines(&o)
    }

    /// One receive (waiting at most a second): its messages and notices.
    pub fn recv(&self) -> (Vec<Value>, Vec<Value>) {
        self.ok(&["recv", "--wait", "1"])
            .into_iter()
            .partition(|v| v["type"] == "message")
    }

    /// Receives until a notice of `kind` comes; the texts received meanwhile.
    pub fn recv_notice(&self, kind: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut texts = Vec::new();
        loop {
            let (m, n) = self.recv();
            texts.extend(m.iter().map(|m| m["text"].as_str().unwrap().to_string()));
            if n.iter().any(|n| n["kind"] == kind) {
                return texts;
            }
            assert!(Instant::now() < deadline, "no {kind} notice");
        }
    }

    /// Receives until every text of `want` arrived; every text received meanwhile.
    pub fn recv_texts(&self, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut texts = Vec::new();
        let mut notices = Vec::new();
        loop {
            let (m, n) = self.recv();
            texts.extend(m.iter().map(|m| m["text"].as_str().unwrap().to_string()));
            notices.extend(n.into_iter().map(|n| n["text"].to_string()));
            if want.iter().all(|w| texts.iter().any(|t| t == w)) {
                return texts;
            }
            assert!(
                Instant::now() < deadline,
                "{want:?} did not all arrive at {}: {texts:?}; notices {notices:?}",
                self.home.display()
            );
        }
    }

    /// One receive (waiting at most a second): the texts of its messages.
    pub fn recv_some(&self) -> Vec<String> {
        let (m, _) = self.recv();
        m.iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect()
    }

    /// Syncs until no text message of ours is still being sent; the state of each, by id.
    pub fn wait_settled(&self) -> std::collections::BTreeMap<u64, String> {
        let deadline = Instant::now() + 2 * WAIT;
        loop {
            let _ = self.cmd(&["recv", "--wait", "1"]);
            let o = self.cmd(&["status"]);
            let states: std::collections::BTreeMap<u64, String> =
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .flat_map(|v| v["outgoing"].as_array().cloned().unwrap_or_default())
                    .filter(|m| {
                        m["kind"]
                            .as_str()
                            .is_some_and(|k| k.eq_ignore_ascii_case("text"))
                    })
                    .filter_map(|m| Some((m["id"].as_u64()?, m["state"].as_str()?.to_string())))
                    .collect();
            if o.status.success() && !states.is_empty() && !states.values().any(|s| s == "sending")
            {
                return states;
            }
            assert!(
                Instant::now() < deadline,
                "messages still being sent: {states:?}"
            );
        }
    }

    /// Receives until every text of `want` arrived; panics if one arrives twice, if anything
    /// else arrives, or after [`WAIT`].
    pub fn recv_exactly(&self, want: &[String]) {
        let deadline = Instant::now() + WAIT;
        let mut got: Vec<String> = Vec::new();
        while got.len() < want.len() {
            for m in self.recv().0 {
                let text = m["text"].as_str().unwrap().to_string();
                assert!(!got.contains(&text), "{text:?} delivered twice");
                assert!(want.contains(&text), "unexpected message {text:?}");
                got.push(text);
            }
            assert!(Instant::now() < deadline, "got {got:?} of {want:?}");
        }
    }

    /// Sends `text` to `to`, waiting at most 120 s for the mailbox's acknowledgement: the
    /// first line of the output (state and id), and whether the command succeeded.
    pub fn send(&self, to: &str, text: &str) -> (Value, bool) {
        let o = self.cmd(&["send", to, text, "--timeout", "120"]);
        let first = lines(&o).into_iter().next().unwrap_or_default();
        (first, o.status.success())
    }

    /// Sends `text` to `to`; it must be acknowledged by the mailbox (stored, or further
    /// already: a reader that is online acknowledges at once). Its id.
    pub fn send_stored(&self, to: &str, text: &str) -> u64 {
        let (first, ok) = self.send(to, text);
        let state = first["state"].as_str().unwrap_or_default();
        assert!(
            ok && ["stored", "delivered", "read"].contains(&state),
            "{text}: {first}"
        );
        first["id"].as_u64().unwrap_or_default()
    }

    /// The `contacts` document.
    pub fn contacts(&self) -> Value {
        self.ok(&["contacts"]).remove(0)
    }

    /// Invites `other` (named `their_name` here, `my_name` there); both established.
    pub fn befriend(&self, my_name: &str, other: &User, their_name: &str) {
        let invitation = self.ok(&["invite", "--name", their_name])[0]["invitation"]
            .as_str()
            .unwrap()
            .to_string();
        other.ok(&["accept", &invitation, "--name", my_name]);
        self.recv_notice("contact_established");
    }
}

/// The JSON lines of a command's output.
pub fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A plain HTTP/1.0 GET on loopback: the body, or `None` when the node does not answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split("\r\n\r\n").nth(1).map(str::to_string)
}
