//! The timer's admin API contract fuzzed against a live node: a real `whispr-timer` process
//! (loopback, a temporary data directory, an admin token) and Schemathesis (installed by `make
//! deps` into `~/.cache/whispr-mesh/schemathesis-<version>`), which generates requests from
//! the node's own `GET /v1/admin/openapi.json` and checks every response against it: no server
//! error, no status, content type or body outside the document, every schema-valid request
//! accepted (or refused for its content: 401/404/409, never 400), every schema-invalid one
//! refused.
//!
//! Ignored by `cargo test` (it needs the Python tool); `make api-fuzz` runs it (with the
//! mailbox's), and `make test` runs `api-fuzz`. `SCHEMATHESIS` names the tool's binary;
//! `API_FUZZ_EXAMPLES` (default 30 per operation and phase) and `API_FUZZ_SEED` (default 1)
//! bound and seed the run.
//!
//! Two passes: anonymous (every operation, no token: the admin ones answer 401), then admin
//! (the token on every request) over every operation but `backup`, whose body names a
//! directory the node writes into: generated paths would have it write wherever this user
//! can. The backup call is checked once here, into the temporary directory, instead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    clippy::print_stdout,
    missing_docs
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_whispr-timer");
const TOKEN: &str = "api-fuzz-admin-token-0123456789abcdefghijkl";
/// The version `make deps` installs (Makefile `SCHEMATHESIS_VERSION`).
const SCHEMATHESIS_VERSION: &str = "4.32.5";
const START: Duration = Duration::from_secs(120);

/// The mailbox's checks (mailbox/tests/api_fuzz.rs): every check of this version but the three
/// stateful ones, which assume resources created through the API (this one creates none).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_headers_conformance,response_schema_conformance,negative_data_rejection,\
positive_data_acceptance,missing_required_header,unsupported_method,ignored_auth";

fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").expect("HOME");
    Path::new(&home).join(format!(
        ".cache/whispr-mesh/schemathesis-{SCHEMATHESIS_VERSION}/bin/schemathesis"
    ))
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("timer.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n\n[log]\njson = true\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
             [worker]\nidle_poll_ms = 50\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn started_port(log: &Path) -> Option<u16> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "timer node started")
        .and_then(|v| v["fields"]["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal HTTP/1.1 request: (status, body).
fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(START)).unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One Schemathesis pass; panics with its output unless it found nothing.
fn run_pass(name: &str, dir: &Path, base: &str, extra: &[&str]) {
    let config_path = dir.join(format!("schemathesis-{name}.toml"));
    // 404 (no such task) and 409 (not in a state for it) are refusals for the content of a
    // well-formed request; 401 is the anonymous pass's answer.
    std::fs::write(
        &config_path,
        "[checks.positive_data_acceptance]\n\
         expected-statuses = [\"2xx\", \"401\", \"404\", \"409\"]\n",
    )
    .unwrap();
    let examples = std::env::var("API_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into());
    let seed = std::env::var("API_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    let report = dir.join(format!("report-{name}"));
    let started = Instant::now();
    let output = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&config_path)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{base}/v1/admin/openapi.json"))
        .args(["--checks", CHECKS])
        .args(["--max-examples", &examples, "--seed", &seed])
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--suppress-health-check", "all"])
        .arg("--report-dir")
        .arg(&report)
        .args(extra)
        // Its cache (`.schemathesis/`) goes to the temporary directory, not the source tree.
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): `make deps` installs Schemathesis {SCHEMATHESIS_VERSION}",
                schemathesis().display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("Seed:"))
        .collect();
    println!("{text}");
    println!(
        "api-fuzz (timer) pass {name}: {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        summary.join(" | ")
    );
    assert!(
        output.status.success(),
        "Schemathesis pass `{name}` failed ({}):\n{text}",
        output.status
    );
}

#[test]
#[ignore = "needs Schemathesis (`make deps`); run by `make api-fuzz`"]
fn the_live_admin_api_matches_its_openapi_document_under_schemathesis() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let log = dir.path().join("node.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut node = Node(child);
    let deadline = Instant::now() + START;
    let port = loop {
        if let Some(port) = started_port(&log) {
            break port;
        }
        if let Some(status) = node.0.try_wait().unwrap() {
            panic!(
                "the node exited at start ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the node did not start in time");
        std::thread::sleep(Duration::from_millis(50));
    };
    let base = format!("http://127.0.0.1:{port}");

    // The document the node serves is the one `whispr-timer openapi` prints.
    let (status, served) = request(port, "GET", "/v1/admin/openapi.json", None);
    assert_eq!(status, 200);
    let printed = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(printed.status.success());
    assert_eq!(
        serde_json::from_str::<Value>(&served).unwrap(),
        serde_json::from_slice::<Value>(&printed.stdout).unwrap()
    );

    let auth = format!("Authorization: Bearer {TOKEN}");
    let dir = dir.path();
    run_pass("anonymous", dir, &base, &[]);
    run_pass(
        "admin",
        dir,
        &base,
        &["-H", &auth, "--exclude-operation-id", "backup"],
    );

    // The backup call, once, into the temporary directory.
    let to = dir.join("backup");
    let (status, body) = request(
        port,
        "POST",
        "/v1/admin/backup",
        Some(&serde_json::json!({ "to": to }).to_string()),
    );
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["backup_id"], 1, "{body}");

    // Still up and healthy after it all.
    assert!(node.0.try_wait().unwrap().is_none(), "the node died");
    let (status, _) = request(port, "GET", "/healthz", None);
    assert_eq!(status, 200);
}
