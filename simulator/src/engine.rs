//! The discrete-event engine: one event heap keyed by `(time, seq)` and one seeded RNG tree.
//!
//! Single-threaded by design: events at the same time run in the order they were scheduled
//! (`seq` breaks ties), and every random choice comes from a stream derived from the run's seed
//! and a label, so the same seed and scenario replay the same run, event for event.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use whispr_protocol::UnixTime;

/// An event heap: [`EventQueue::pop`] returns the earliest event, and of events at the same
/// time the one scheduled first.
#[derive(Debug)]
pub struct EventQueue<E> {
    heap: BinaryHeap<Reverse<Entry<E>>>,
    seq: u64,
    now: UnixTime,
    processed: u64,
}

#[derive(Debug)]
struct Entry<E> {
    at: UnixTime,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<E> EventQueue<E> {
    /// An empty queue whose clock starts at `start`.
    pub fn new(start: UnixTime) -> EventQueue<E> {
        EventQueue {
            heap: BinaryHeap::new(),
            seq: 0,
            now: start,
            processed: 0,
        }
    }

    /// The time of the event last popped (the simulated now).
    pub fn now(&self) -> UnixTime {
        self.now
    }

    /// Schedules `event` at `at`; a time in the past is moved to now (time never goes back).
    pub fn schedule(&mut self, at: UnixTime, event: E) {
        let at = UnixTime(at.0.max(self.now.0));
        self.seq = self.seq.wrapping_add(1);
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            event,
        }));
    }

    /// The earliest event; the clock jumps to its time.
    pub fn pop(&mut self) -> Option<(UnixTime, E)> {
        let Reverse(entry) = self.heap.pop()?;
        self.now = entry.at;
        self.processed = self.processed.wrapping_add(1);
        Some((entry.at, entry.event))
    }

    /// Time of the next event.
    pub fn peek_time(&self) -> Option<UnixTime> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when no event waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Events popped so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }
}

/// The run's RNG tree: independent, reproducible streams derived from one seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngTree {
    seed: u64,
}

impl RngTree {
    /// The tree of `seed`.
    pub fn new(seed: u64) -> RngTree {
        RngTree { seed }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The stream `label`/`index` (e.g. `("node", 17)`, `("workload", 0)`): ChaCha20 seeded
    /// with SHA-256(domain ‖ seed ‖ label ‖ index). Adding a node or a stream leaves every
    /// other stream unchanged.
    pub fn stream(&self, label: &str, index: u64) -> ChaCha20Rng {
        let mut h = Sha256::new();
        h.update(b"whispr-sim-rng-v1");
        h.update(self.seed.to_be_bytes());
        h.update(u64::try_from(label.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(label.as_bytes());
        h.update(index.to_be_bytes());
        ChaCha20Rng::from_seed(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn events_pop_in_time_order_and_ties_in_schedule_order() {
        let mut q = EventQueue::new(UnixTime(100));
        q.schedule(UnixTime(300), "c");
        q.schedule(UnixTime(200), "a");
        q.schedule(UnixTime(200), "b");
        q.schedule(UnixTime(50), "past");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (UnixTime(100), "past"),
                (UnixTime(200), "a"),
                (UnixTime(200), "b"),
                (UnixTime(300), "c")
            ]
        );
        assert_eq!(q.now(), UnixTime(300));
        assert_eq!(q.processed(), 4);
        // Scheduling in the past after time moved on lands at now.
        q.schedule(UnixTime(10), "late");
        assert_eq!(q.pop(), Some((UnixTime(300), "late")));
    }

    #[test]
    fn rng_streams_are_reproducible_and_independent() {
        let a = RngTree::new(7);
        let draw = |mut r: ChaCha20Rng| (0..4).map(|_| r.next_u64()).collect::<Vec<_>>();
        assert_eq!(
            draw(a.stream("node", 1)),
            draw(RngTree::new(7).stream("node", 1))
        );
        assert_ne!(draw(a.stream("node", 1)), draw(a.stream("node", 2)));
        assert_ne!(draw(a.stream("node", 1)), draw(a.stream("nodes", 1)));
        assert_ne!(
            draw(a.stream("node", 1)),
            draw(RngTree::new(8).stream("node", 1))
        );
        // Label and index cannot run into each other.
        assert_ne!(draw(a.stream("ab", 0)), draw(a.stream("a", 0x62)));
    }
}
