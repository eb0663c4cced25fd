//! The API contract fuzzed against a live node: a real `whispr-mailbox` process (loopback, a
//! temporary data directory) and Schemathesis (installed by `make deps` into
//! `~/.cache/whispr-mesh/schemathesis-<version>`), which generates requests from the node's
//! own `GET /v1/openapi.json` and checks every response against it: no server error, no
//! status, content type or body outside the document, every schema-valid request accepted
//! (or refused for its content: 401/403/404/409/422/429, never 400), every schema-invalid one
//! refused.
//!
//! Ignored by `cargo test` (it needs the Python tool); `make api-fuzz` runs it, and `make
//! test` runs `api-fuzz`. `SCHEMATHESIS` names the tool's binary; `API_FUZZ_EXAMPLES`
//! (default 30 per operation and phase) and `API_FUZZ_SEED` (default 1) bound and seed the run.
//!
//! Three passes, so that the fuzzer gets past authentication without ending its own session:
//! 1. anonymous: every operation, random ids, no token (the authenticated ones answer 401/400);
//! 2. owner: a logged-in owner's token and the owner's mailbox id in every `{id}`, every
//!    operation but logout and erase (which end the session);
//! 3. logout with that token, then erase with a new one (each ends its session).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    clippy::print_stdout,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use whispr_mailbox::testkit::{Owner, create_body};

#[path = "support/login.rs"]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_whispr-mailbox");
/// The version `make deps` installs (Makefile `SCHEMATHESIS_VERSION`).
const SCHEMATHESIS_VERSION: &str = "4.32.5";
const START: Duration = Duration::from_secs(120);
const AUDIENCE: &str = "api-fuzz";

/// Checks every pass runs: every check of this version but the three stateful ones
/// (`use_after_free`, `ensure_resource_availability`, `object_level_authorization`), which
/// assume resource semantics (a created resource readable by its creator's token) this API
/// does not have: a mailbox is read with its own owner's session, not the creator's.
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

/// Limits high enough that the fuzzer measures the contract, not the rate limits (429 is in
/// the document and accepted, but a run answered 429 throughout would test nothing); waits
/// short, so that a generated `wait=` does not hold the run.
fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("mailbox.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\naudience = \"{AUDIENCE}\"\n\n[log]\njson = true\n\n\
             [api]\nlisten = \"127.0.0.1:0\"\nops_per_min_per_connection = 100000000\n\
             mailbox_creations_per_hour_per_ip = 100000000\nwait_ms_max = 200\n\
             stream_idle_ms = 1000\nmetrics_interval_ms = 0\n\n\
             [auth]\nchallenges_per_source_max = 100000\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn started_port(log: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "mailbox node started")
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

/// One Schemathesis pass; panics with its output unless it found nothing.
fn run_pass(name: &str, dir: &Path, base: &str, config: &str, extra: &[&str]) {
    let config_path = dir.join(format!("schemathesis-{name}.toml"));
    std::fs::write(&config_path, config).unwrap();
    let examples = std::env::var("API_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into());
    let seed = std::env::var("API_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    let report = dir.join(format!("report-{name}"));
    let started = Instant::now();
    let output = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&config_path)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
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
    // Shown with `--nocapture` (`make api-fuzz`), or on failure.
    println!("{text}");
    println!(
        "api-fuzz pass {name}: {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        summary.join(" | ")
    );
    assert!(
        output.status.success(),
        "Schemathesis pass `{name}` failed ({}):\n{text}",
        output.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Schemathesis (`make deps`); run by `make api-fuzz`"]
async fn the_live_api_matches_its_openapi_document_under_schemathesis() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let log = dir.path().join("node.log");
    // Messages to fetch, export and acknowledge (deposits come through the mesh, not this
    // API): the load tool creates the owner's mailbox and deposits into it, node stopped.
    let owner = Owner::from_seed(1);
    let stress = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args([
            "stress-deposit",
            "--seed",
            "1",
            "--count",
            "20",
            "--concurrency",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        stress.status.success(),
        "stress-deposit: {}",
        String::from_utf8_lossy(&stress.stderr)
    );
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    // The owner the fuzzer acts as: its mailbox (created by the load tool above: a second
    // creation is refused), logged in.
    let r = http
        .post(format!("{base}/v1/mailboxes"))
        .json(&create_body(&owner.create_request(24 * 3600 * 1000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap_or_default());
    let token = support::login(&http, &base, &owner, AUDIENCE).await;
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let auth = format!("Authorization: Bearer {token}");

    // 422 is this API's "well-formed, refused for its content" (docs/mailbox.md): a
    // schema-valid request may get it (a random key is rarely a curve point), never a 400.
    let common = "[checks.positive_data_acceptance]\n\
                  expected-statuses = [\"2xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\"]\n";
    let dir = dir.path();
    run_pass("anonymous", dir, &base, common, &[]);
    let owner_config = format!("{common}\n[parameters]\n\"path.id\" = \"{mailbox}\"\n");
    run_pass(
        "owner",
        dir,
        &base,
        &owner_config,
        &[
            "-H",
            &auth,
            "--exclude-operation-id",
            "logout",
            "--exclude-operation-id",
            "erase",
        ],
    );
    // Each of these ends the session on its first success (401 from then on, as documented):
    // logout first, then erasure with a new session.
    run_pass(
        "logout",
        dir,
        &base,
        &owner_config,
        &["-H", &auth, "--include-operation-id", "logout"],
    );
    let token = support::login(&http, &base, &owner, AUDIENCE).await;
    let auth = format!("Authorization: Bearer {token}");
    run_pass(
        "erase",
        dir,
        &base,
        &owner_config,
        &["-H", &auth, "--include-operation-id", "erase"],
    );

    // Still up and healthy after it all.
    assert!(node.0.try_wait().unwrap().is_none(), "the node died");
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
