//! The wall clock of the node drivers. Cores never read a clock: drivers call [`now`] and pass
//! the time in (`handle_input(now, …)`).

use std::time::{SystemTime, UNIX_EPOCH};

use whispr_protocol::UnixTime;

/// Milliseconds since the Unix epoch, from the system clock (0 before the epoch, saturating
/// far in the future).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The wall-clock time, as the cores take it.
pub fn now() -> UnixTime {
    UnixTime(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_does_not_go_back() {
        let first = now();
        assert!(first.0 > 1_577_836_800_000, "{first:?}");
        assert!(now().0 >= first.0);
    }
}
