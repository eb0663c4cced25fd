//! A stage probe for benchmarks: when one is installed ([`install_stage_probe`]), the mesh
//! tasks report when a packet passes each stage of a node, so that a benchmark can tell where
//! a packet's latency goes (`relay/benches/mesh.rs`). The relay binary never installs one;
//! without it each stage costs one atomic load. The marks carry no packet identity and go
//! neither into metrics nor into logs: a packet's timings through a node are what mixing hides.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use whispr_protocol::NodeId;

/// A stage of a node's packet path, in the order a packet passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// A frame was read from a peer's packet stream (before the core's inbox).
    Read,
    /// The core task took the packet from its inbox (and admitted it or not).
    CoreIn,
    /// The core took the packet back from the peel pool and finished it in the router.
    Peeled,
    /// The router released the packet (its tag durable): handed to the next hop's sender, or
    /// delivered locally.
    Released,
    /// The next hop's sender task wrote and flushed the frame to its stream.
    Written,
}

/// Receives the marks; called on the mesh's tasks and threads, so it must be quick.
pub trait StageProbe: Send + Sync + 'static {
    /// `count` packets of `node` passed `stage` at `at`.
    fn mark(&self, node: &NodeId, stage: Stage, count: usize, at: Instant);
}

static PROBE: OnceLock<Arc<dyn StageProbe>> = OnceLock::new();

/// Installs the process's stage probe (once; `false` if one was installed before). For
/// benchmarks only.
pub fn install_stage_probe(probe: Arc<dyn StageProbe>) -> bool {
    PROBE.set(probe).is_ok()
}

/// Reports `count` packets of `node` passing `stage` now, if a probe is installed.
pub(crate) fn mark(node: &NodeId, stage: Stage, count: usize) {
    if let Some(probe) = PROBE.get() {
        probe.mark(node, stage, count, Instant::now());
    }
}
