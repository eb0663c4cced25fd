//! The peel pool: threads that run [`PeelTicket::peel`] (the pure Sphinx crypto) for the core
//! task, which keeps the router (replay filter, queue, ordering, rate limits). The core hands
//! out at most `max_out` packets at a time and takes the results back in the order it admitted
//! the packets, so the router sees the same sequence of inputs as if it had peeled them itself.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::shared::MeshError;
use crate::router::{DropReason, PeelTicket, Peeled};

/// Where the router's verdict goes (a client or an acknowledged sender waiting), if anywhere.
pub(crate) type Reply = Option<oneshot::Sender<Result<(), DropReason>>>;

struct Job {
    seq: u64,
    ticket: PeelTicket,
    bytes: Vec<u8>,
    reply: Reply,
}

/// A packet back from the pool. `peeled` is `None` when peeling panicked (the ticket is then
/// to be abandoned).
pub(crate) struct Done {
    seq: u64,
    pub(crate) ticket: PeelTicket,
    pub(crate) peeled: Option<Peeled>,
    pub(crate) reply: Reply,
}

/// The packets waiting for a peel thread: a queue behind one lock, and a condition variable
/// on which idle workers wait. A job wakes at most one worker, and only if one is idle (a
/// `Mutex<mpsc::Receiver>` shared by the workers woke two threads per job: the one that took
/// it, and the next one in line for the lock, which then went back to sleep in `recv`).
struct Jobs {
    state: Mutex<JobState>,
    ready: Condvar,
    /// At most this many jobs wait (the core never has more out).
    max: usize,
}

struct JobState {
    queue: VecDeque<Job>,
    /// Workers waiting on `ready`.
    idle: usize,
    /// Workers still running.
    workers: usize,
    /// The core is gone: workers exit once the queue is empty.
    closed: bool,
}

impl Jobs {
    /// A poisoned lock only means a worker panicked outside a peel (peels are caught): the
    /// queue is whole, every change to it is one call.
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job; gives it back when the queue is full or no worker is left.
    #[allow(clippy::result_large_err)] // The error is the job given back.
    fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed || state.workers == 0 || state.queue.len() >= self.max {
            return Err(job);
        }
        state.queue.push_back(job);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next job, waiting for one; `None` once the pool is closed and drained.
    fn pop(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state.idle = state.idle.saturating_add(1);
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle = state.idle.saturating_sub(1);
        }
    }

    /// Ends the pool: the jobs still queued are dropped (their senders, if any wait, get no
    /// verdict, as when the core stops), and the workers exit.
    fn close(&self) {
        let queued = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        drop(queued);
        self.ready.notify_all();
    }
}

/// Counts a worker out when its thread ends, however it ends.
struct WorkerAlive(Arc<Jobs>);

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.workers = state.workers.saturating_sub(1);
    }
}

/// The pool, as the core task sees it.
pub(crate) struct PeelPool {
    jobs: Arc<Jobs>,
    results: mpsc::Receiver<Done>,
    /// Packets handed out and not yet taken back by [`PeelPool::next_ready`].
    out: usize,
    max_out: usize,
    next_seq: u64,
    next_done: u64,
    reorder: BTreeMap<u64, Done>,
}

/// The number of peel threads for `configured` (`mesh.peel_workers`; 0: one per core).
pub(crate) fn workers(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl PeelPool {
    /// Starts `workers` threads; at most `max_out` packets are out at a time.
    pub(crate) fn start(
        workers: usize,
        max_out: usize,
    ) -> Result<(PeelPool, Vec<JoinHandle<()>>), MeshError> {
        let max_out = max_out.max(1);
        let workers = workers.max(1);
        let jobs = Arc::new(Jobs {
            state: Mutex::new(JobState {
                queue: VecDeque::with_capacity(max_out),
                idle: 0,
                workers,
                closed: false,
            }),
            ready: Condvar::new(),
            max: max_out,
        });
        // Never more than `max_out` results pending, so a worker's send never waits long.
        let (results_tx, results) = mpsc::channel(max_out);
        let mut threads = Vec::new();
        for i in 0..workers {
            let alive = WorkerAlive(jobs.clone());
            let results_tx = results_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("whispr-peel-{i}"))
                .spawn(move || worker(&alive, &results_tx));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // The workers started so far exit (the queue is empty).
                    jobs.close();
                    return Err(MeshError::Task(format!("peel thread: {e}")));
                }
            }
        }
        Ok((
            PeelPool {
                jobs,
                results,
                out: 0,
                max_out,
                next_seq: 0,
                next_done: 0,
                reorder: BTreeMap::new(),
            },
            threads,
        ))
    }

    /// Whether another packet may be handed out.
    pub(crate) fn has_room(&self) -> bool {
        self.out < self.max_out
    }

    /// Whether packets are out (a result will come).
    pub(crate) fn is_busy(&self) -> bool {
        self.out > 0
    }

    /// Hands a packet to the pool. Gives the ticket back when no worker is left.
    #[allow(clippy::result_large_err)] // The error is the job given back, not a failure type.
    pub(crate) fn submit(
        &mut self,
        ticket: PeelTicket,
        bytes: Vec<u8>,
        reply: Reply,
    ) -> Result<(), (PeelTicket, Reply)> {
        let job = Job {
            seq: self.next_seq,
            ticket,
            bytes,
            reply,
        };
        match self.jobs.push(job) {
            Ok(()) => {
                self.next_seq = self.next_seq.wrapping_add(1);
                self.out = self.out.saturating_add(1);
                Ok(())
            }
            // Full cannot happen (at most `max_out` out, the queue holds that many); either
            // way, or with no worker left, the job comes back to the core.
            Err(job) => Err((job.ticket, job.reply)),
        }
    }

    /// Waits for one result (pending forever when none is out). `false` when every worker
    /// is gone.
    pub(crate) async fn recv(&mut self) -> bool {
        if self.out == 0 {
            return std::future::pending().await;
        }
        match self.results.recv().await {
            Some(done) => {
                self.reorder.insert(done.seq, done);
                true
            }
            None => false,
        }
    }

    /// Takes the results that are already there without waiting.
    pub(crate) fn collect(&mut self) {
        while let Ok(done) = self.results.try_recv() {
            self.reorder.insert(done.seq, done);
        }
    }

    /// The next result in admission order, if it is back.
    pub(crate) fn next_ready(&mut self) -> Option<Done> {
        let done = self.reorder.remove(&self.next_done)?;
        self.next_done = self.next_done.wrapping_add(1);
        self.out = self.out.saturating_sub(1);
        Some(done)
    }
}

impl Drop for PeelPool {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

fn worker(alive: &WorkerAlive, results: &mpsc::Sender<Done>) {
    loop {
        let Some(Job {
            seq,
            ticket,
            bytes,
            reply,
        }) = alive.0.pop()
        else {
            // The core is gone.
            return;
        };
        let peeled = std::panic::catch_unwind(AssertUnwindSafe(|| ticket.peel(&bytes))).ok();
        if results
            .blocking_send(Done {
                seq,
                ticket,
                peeled,
                reply,
            })
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use whispr_protocol::{NodeId, UnixTime};

    use super::*;
    use crate::router::{ClientId, RateLimit, Router, RouterConfig, Source};

    fn edge_router() -> Router {
        Router::new(
            NodeId([7; 32]),
            RouterConfig {
                edge: true,
                client_rate: RateLimit::unlimited(),
                ..RouterConfig::default()
            },
            false,
        )
    }

    /// Takes back every packet out, in admission order, within a deadline.
    async fn take_all(pool: &mut PeelPool) -> Vec<Done> {
        let mut back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.is_busy() {
            assert!(Instant::now() < deadline, "peels did not come back");
            assert!(pool.recv().await, "the workers are gone");
            pool.collect();
            while let Some(done) = pool.next_ready() {
                back.push(done);
            }
        }
        back
    }

    #[tokio::test]
    async fn every_packet_comes_back_once_in_admission_order_and_the_threads_end_with_the_pool() {
        let mut router = edge_router();
        let (mut pool, threads) = PeelPool::start(3, 8).unwrap();
        for round in 0..20u64 {
            let mut replies = Vec::new();
            for i in 0..8u64 {
                assert!(pool.has_room());
                let ticket = router
                    .admit(UnixTime(1), Source::Client(ClientId(i)))
                    .unwrap();
                let (tx, rx) = tokio::sync::oneshot::channel();
                // Not a Sphinx packet: each peel ends in a refusal, which is what goes back.
                let bytes = vec![u8::try_from(round).unwrap(); 10];
                assert!(pool.submit(ticket, bytes, Some(tx)).is_ok());
                replies.push(rx);
            }
            assert!(!pool.has_room(), "at most max_out packets out");
            let back = take_all(&mut pool).await;
            assert_eq!(back.len(), 8);
            for (i, done) in back.into_iter().enumerate() {
                assert_eq!(done.seq, round * 8 + u64::try_from(i).unwrap());
                assert!(done.peeled.is_some(), "no peel panicked");
                router.abandon(done.ticket);
                done.reply.unwrap().send(Ok(())).unwrap();
            }
            for rx in replies {
                assert_eq!(rx.await, Ok(Ok(())), "each reply travelled with its packet");
            }
        }
        assert_eq!(router.peeling(), 0);
        drop(pool);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn a_closed_queue_gives_jobs_back_and_drops_those_it_held() {
        let mut router = edge_router();
        let (pool, threads) = PeelPool::start(1, 4).unwrap();
        let jobs = pool.jobs.clone();
        drop(pool);
        for thread in threads {
            thread.join().unwrap();
        }
        let ticket = router
            .admit(UnixTime(1), Source::Client(ClientId(1)))
            .unwrap();
        let job = Job {
            seq: 0,
            ticket,
            bytes: Vec::new(),
            reply: None,
        };
        let Err(job) = jobs.push(job) else {
            panic!("a closed queue took a job");
        };
        router.abandon(job.ticket);
        assert_eq!(jobs.lock().workers, 0, "every worker counted out");
        assert!(jobs.lock().queue.is_empty());
    }
}
