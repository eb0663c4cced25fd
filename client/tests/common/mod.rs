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

    /// Sends `text` to `to`, waiting for the mailbox's acknowledgement.
    pub fn send_stored(&self, to: &str, text: &str) -> u64 {
        let o = self.cmd(&["send", to, text, "--timeout", "120"]);
        let first = lines(&o).into_iter().next().unwrap_or_default();
        let state = first["state"].as_str().unwrap_or_default().to_string();
        assert!(
            o.status.success() && ["stored", "delivered", "read"].contains(&state.as_str()),
            "{text}: {state} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        first["id"].as_u64().unwrap_or_default()
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
