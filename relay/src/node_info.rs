//! `<data_dir>/node-info.json` for a node in the mesh (the file and its format are
//! [`whispr_node_kit::info::NodeInfo`]): its libp2p peer id, node id, listen addresses and
//! HTTP port, for operators and scripts. Logs never carry these.

use std::path::Path;
use std::time::Duration;

use whispr_node_kit::info::NodeInfo;

use crate::mesh::MeshHandle;

/// How long to wait for the swarm to bind its listen addresses before writing anyway.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// This node's info, with the addresses it listens on now.
pub fn node_info(mesh: &MeshHandle, http_port: u16) -> NodeInfo {
    NodeInfo {
        http_port,
        listen: mesh
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect(),
        node_id: hex::encode(mesh.node_id().as_bytes()),
        peer_id: mesh.peer_id().to_string(),
    }
}

/// Writes the file once the swarm has bound its listen addresses (in a background task; a
/// failure is logged without the path's contents).
pub fn write_node_info(data_dir: &Path, mesh: &MeshHandle, http_port: u16) {
    let data_dir = data_dir.to_path_buf();
    let mesh = mesh.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LISTEN_WAIT, mesh.listening()).await;
        if let Err(e) = node_info(&mesh, http_port).write(&data_dir) {
            tracing::error!(error = %e.kind(), "cannot write node-info.json");
        }
    });
}
