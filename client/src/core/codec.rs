//! The packet codec behind the core: Sphinx for real clients; the simulator plugs in its fast
//! codec (same sizes and routes, no cryptography) the way it does for the router.

use std::time::Duration;

use rand::rngs::StdRng;
use whispr_protocol::sphinx::{self, RouteHop, Surb, SurbRecovery};
use whispr_protocol::{DestinationAddress, Result, SurbId};

/// How the core builds packets and reply blocks and opens replies.
pub trait PacketCodec: Send {
    /// A forward packet along `route` (see [`sphinx::build_packet`]).
    fn build_packet(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        plaintext: &[u8],
    ) -> Result<Vec<u8>>;

    /// A reply block along `route` and what opens its reply (see [`sphinx::create_surb`]).
    fn create_surb(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        surb_id: SurbId,
    ) -> Result<(Surb, Vec<u8>)>;

    /// Opens a reply with what [`Self::create_surb`] returned beside the SURB.
    fn open_reply(&self, recovery: &[u8], sealed: &[u8]) -> Result<Vec<u8>>;
}

/// Sphinx, as every real client runs it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SphinxCodec;

impl PacketCodec for SphinxCodec {
    fn build_packet(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        sphinx::build_packet(rng, route, delays, destination, plaintext).map(|p| p.into_bytes())
    }

    fn create_surb(
        &self,
        rng: &mut StdRng,
        route: &[RouteHop],
        delays: &[Duration],
        destination: DestinationAddress,
        surb_id: SurbId,
    ) -> Result<(Surb, Vec<u8>)> {
        sphinx::create_surb(rng, route, delays, destination, surb_id)
            .map(|(s, r)| (s, r.to_bytes().to_vec()))
    }

    fn open_reply(&self, recovery: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        SurbRecovery::from_bytes(recovery)?.open(sealed)
    }
}
