//! The sample configurations in `docs/examples/` load with the real loaders of each node
//! kind, and `docs/operators.md` names every `[mesh]`, `[http]` and `[log]` key and every drop
//! reason label.
//!
//! The examples name TLS files under `/etc/whispr/…` that do not exist here. The loaders
//! (`RelayConfig::load`, the mailbox's and the timer's `NodeConfig::load`) only check that
//! the certificate and key are given together and that plain HTTP is on loopback; the files
//! are read when the node starts serving. So the examples are loaded as they are, unchanged.
//! Should a loader start checking that the files exist, rewrite the paths in the text to
//! files written into a temporary directory before loading.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::path::{Path, PathBuf};

use whispr_relay::config::{HttpConfig, LogConfig, MeshConfig, RelayConfig, RelayRole};
use whispr_relay::router::DropReason;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn example(name: &str) -> PathBuf {
    docs().join("examples").join(name)
}

/// The example's text as a TOML table, asserting that it has a `[mesh]` table.
fn mesh_table(name: &str) -> toml::Table {
    let text = std::fs::read_to_string(example(name)).unwrap();
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
    let mesh = table
        .get("mesh")
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("{name} has no [mesh] section"));
    mesh.clone()
}

/// What every joined node needs to be reachable and to find the network.
fn assert_joins(name: &str, mesh: &MeshConfig) {
    assert!(!mesh.bootstrap.is_empty(), "{name}: no bootstrap peers");
    for address in &mesh.bootstrap {
        let addr: libp2p::Multiaddr = address.parse().unwrap();
        assert!(
            addr.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_))),
            "{name}: {address} has no peer id"
        );
    }
    assert!(
        !mesh.external_addresses.is_empty(),
        "{name}: listens on 0.0.0.0 without external_addresses"
    );
}

fn load_relay(name: &str) -> RelayConfig {
    RelayConfig::load(&example(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn relay_edge_example_loads() {
    let name = "relay-edge.toml";
    let _ = mesh_table(name);
    let config = load_relay(name);
    assert_eq!(config.mesh.roles, vec![RelayRole::Edge]);
    assert!(!config.http.listen.ip().is_loopback());
    assert!(config.http.tls_cert.is_some() && config.http.tls_key.is_some());
    assert!(config.mesh.api_url.is_some());
    assert_joins(name, &config.mesh);
}

#[test]
fn relay_mix_example_loads() {
    let name = "relay-mix.toml";
    let _ = mesh_table(name);
    let config = load_relay(name);
    assert_eq!(config.mesh.roles, vec![RelayRole::Mix]);
    assert!((1..=3).contains(&config.mesh.mix_layer));
    assert!(config.http.listen.ip().is_loopback());
    assert_joins(name, &config.mesh);
}

#[test]
fn mailbox_example_loads() {
    let name = "mailbox.toml";
    let _ = mesh_table(name);
    let config = whispr_mailbox::node::NodeConfig::load(&example(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(config.api.tls_cert_file.is_some() && config.api.tls_key_file.is_some());
    let mesh = config.mesh.expect("[mesh] parsed");
    assert!(mesh.roles.is_empty());
    assert!(mesh.api_url.is_some());
    assert_joins(name, &mesh);
}

#[test]
fn timer_example_loads() {
    let name = "timer.toml";
    let _ = mesh_table(name);
    let config = whispr_timer_service::node::NodeConfig::load(&example(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(config.admin.listen.ip().is_loopback());
    let mesh = config.mesh.expect("[mesh] parsed");
    assert!(mesh.roles.is_empty());
    assert_joins(name, &mesh);
}

#[test]
fn examples_share_one_bootstrap_list() {
    let lists: Vec<toml::Value> = [
        "relay-edge.toml",
        "relay-mix.toml",
        "mailbox.toml",
        "timer.toml",
    ]
    .into_iter()
    .map(|name| mesh_table(name)["bootstrap"].clone())
    .collect();
    assert!(lists.windows(2).all(|w| w[0] == w[1]), "{lists:?}");
}

#[test]
fn consensus_grace_defaults_to_ten_minutes_and_is_bounded() {
    let parse = |text: &str| toml::from_str::<MeshConfig>(text).unwrap();
    let default = parse("");
    assert_eq!(
        default.consensus_grace(),
        whispr_relay::config::CONSENSUS_GRACE
    );
    assert_eq!(default.consensus_grace_ms, 600_000);
    default.check().unwrap();
    let short = parse("consensus_grace_ms = 0");
    short.check().unwrap();
    assert_eq!(short.consensus_grace(), std::time::Duration::ZERO);
    let day = parse("consensus_grace_ms = 86400000");
    day.check().unwrap();
    let err = parse("consensus_grace_ms = 86400001").check().unwrap_err();
    assert!(err.to_string().contains("mesh.consensus_grace_ms"), "{err}");
}

/// The keys of a config section and of its nested tables, from its default serialised as
/// JSON.
fn keys(value: &serde_json::Value, out: &mut Vec<String>) {
    if let serde_json::Value::Object(map) = value {
        for (key, inner) in map {
            out.push(key.clone());
            keys(inner, out);
        }
    }
}

#[test]
fn operators_guide_names_every_key_and_drop_reason() {
    let guide = std::fs::read_to_string(docs().join("operators.md")).unwrap();
    let mut names = Vec::new();
    keys(
        &serde_json::to_value(MeshConfig::default()).unwrap(),
        &mut names,
    );
    keys(
        &serde_json::to_value(HttpConfig::default()).unwrap(),
        &mut names,
    );
    keys(
        &serde_json::to_value(LogConfig::default()).unwrap(),
        &mut names,
    );
    names.push("data_dir".into());
    for name in names {
        // As `key`, or as `[section] key`.
        assert!(
            guide.contains(&format!("`{name}`")) || guide.contains(&format!("] {name}`")),
            "docs/operators.md does not describe `{name}`"
        );
    }
    for reason in DropReason::ALL {
        assert!(
            guide.contains(&format!("`{}`", reason.label())),
            "docs/operators.md does not explain the drop reason `{}`",
            reason.label()
        );
    }
}
