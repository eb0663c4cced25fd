//! Logging: the `[log]` table and the global `tracing` subscriber of a node (`RUST_LOG`
//! through `EnvFilter`, text or JSON lines, to stderr).

use serde::{Deserialize, Serialize};

/// `[log]`: logging (the same table in every node's file).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// JSON lines instead of text.
    #[serde(default)]
    pub json: bool,
    /// Filter directives when `RUST_LOG` is not set (default `info`).
    #[serde(default)]
    pub filter: Option<String>,
}

impl LogConfig {
    /// Installs the global tracing subscriber (to stderr); see [`init_logging`].
    pub fn init(&self) {
        init_logging(self.json, self.filter.as_deref());
    }
}

/// libp2p's own crates log peer ids and addresses (at info and below); they are capped at
/// `warn` unless the filter names them explicitly.
const LIBP2P_TARGETS: [&str; 6] = [
    "libp2p",
    "multistream_select",
    "yamux",
    "snow",
    "netlink",
    "if_watch",
];

/// Installs the global tracing subscriber of a node (to stderr): `RUST_LOG` if set, otherwise
/// `filter` (default `info`); JSON lines when `json`. Every node binary calls this.
pub fn init_logging(json: bool, filter: Option<&str>) {
    let directives = directives(std::env::var("RUST_LOG").ok().as_deref(), filter);
    let env_filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// The filter directives: `rust_log` (the environment's `RUST_LOG`) unless empty, else
/// `filter`, else `info`; with libp2p's crates capped at `warn` unless named.
fn directives(rust_log: Option<&str>, filter: Option<&str>) -> String {
    let mut directives = rust_log
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| filter.unwrap_or("info"))
        .to_string();
    for target in LIBP2P_TARGETS {
        if !directives.contains(target) {
            directives.push_str(&format!(",{target}=warn"));
        }
    }
    directives
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_and_libp2p_is_capped_unless_named() {
        let d = directives(Some("debug"), Some("trace"));
        assert!(d.starts_with("debug,"), "{d}");
        assert!(
            d.contains(",libp2p=warn") && d.contains(",yamux=warn"),
            "{d}"
        );
        let d = directives(Some("  "), Some("whispr=debug"));
        assert!(d.starts_with("whispr=debug,"), "{d}");
        assert!(directives(None, None).starts_with("info,"));
        let d = directives(None, Some("info,libp2p_gossipsub=debug"));
        assert!(!d.contains("libp2p=warn"), "{d}");
    }
}
