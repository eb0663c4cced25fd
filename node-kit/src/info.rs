//! `<data_dir>/node-info.json`: what a started node tells its operator and scripts (the devnet,
//! the tests): its libp2p peer id, node id, listen addresses and HTTP port. Logs never carry
//! these; this file is the place to look them up.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the node's data directory.
pub const NODE_INFO_FILE: &str = "node-info.json";

/// The content of `node-info.json` (fields in the file's key order, alphabetical).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The port of the node's HTTP listener (`[http]` of a relay, `[api]` of a mailbox node,
    /// `[admin]` of a timer node).
    pub http_port: u16,
    /// The libp2p multiaddresses the node listens on.
    pub listen: Vec<String>,
    /// The node id (hex of the Ed25519 public key).
    pub node_id: String,
    /// The libp2p peer id (base58).
    pub peer_id: String,
}

impl NodeInfo {
    /// `data_dir/node-info.json`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(NODE_INFO_FILE)
    }

    /// Writes the file atomically (a temporary file renamed over it), so that a reader never
    /// sees half of it.
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = NodeInfo::path(data_dir);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }

    /// Reads the file a node wrote.
    pub fn read(data_dir: &Path) -> std::io::Result<NodeInfo> {
        let bytes = std::fs::read(NodeInfo::path(data_dir))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let info = NodeInfo {
            peer_id: "12D3KooW".into(),
            node_id: "ab".repeat(32),
            listen: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            http_port: 7400,
        };
        info.write(dir.path()).unwrap();
        assert_eq!(NodeInfo::read(dir.path()).unwrap(), info);
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(NODE_INFO_FILE)).unwrap())
                .unwrap();
        assert_eq!(value["http_port"], 7400);
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["http_port", "listen", "node_id", "peer_id"]);
        assert!(!dir.path().join("node-info.json.tmp").exists());
    }
}
