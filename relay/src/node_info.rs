//! `<data_dir>/node-info.json`: what a started node tells its operator and scripts (the devnet,
//! the tests): its libp2p peer id, node id, listen addresses and HTTP port. Logs never carry
//! these; this file is the place to look them up.

use std::path::Path;
use std::time::Duration;

use crate::mesh::MeshHandle;

/// Writes the file once the swarm has bound its listen addresses (in a background task; a
/// failure is logged without the path's contents).
pub fn write_node_info(data_dir: &Path, mesh: &MeshHandle, http_port: u16) {
    let path = data_dir.join("node-info.json");
    let mesh = mesh.clone();
    tokio::spawn(async move {
        for _ in 0..200 {
            if !mesh.listen_addrs().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let info = serde_json::json!({
            "peer_id": mesh.peer_id().to_string(),
            "node_id": hex::encode(mesh.node_id().as_bytes()),
            "listen": mesh.listen_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "http_port": http_port,
        });
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&info)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(error = %e.kind(), "cannot write node-info.json");
        }
    });
}
