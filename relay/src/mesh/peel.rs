//! The peel pool: threads that run [`PeelTicket::peel`] (the pure Sphinx crypto) for the core
//! task, which keeps the router (replay filter, queue, ordering, rate limits). The core hands
//! out at most `max_out` packets at a time and takes the results back in the order it admitted
//! the packets, so the router sees the same sequence of inputs as if it had peeled them itself.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
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

/// The pool, as the core task sees it.
pub(crate) struct PeelPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
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
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(max_out);
        let job_rx = Arc::new(Mutex::new(job_rx));
        // Never more than `max_out` results pending, so a worker's send never waits long.
        let (results_tx, results) = mpsc::channel(max_out);
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let job_rx = job_rx.clone();
            let results_tx = results_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("whispr-peel-{i}"))
                .spawn(move || worker(&job_rx, &results_tx))
                .map_err(|e| MeshError::Task(format!("peel thread: {e}")))?;
            threads.push(thread);
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
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.next_seq = self.next_seq.wrapping_add(1);
                self.out = self.out.saturating_add(1);
                Ok(())
            }
            // Full cannot happen (at most `max_out` out, the channel holds that many); either
            // way the job comes back to the core.
            Err(
                std::sync::mpsc::TrySendError::Full(job)
                | std::sync::mpsc::TrySendError::Disconnected(job),
            ) => Err((job.ticket, job.reply)),
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

fn worker(jobs: &Mutex<std::sync::mpsc::Receiver<Job>>, results: &mpsc::Sender<Done>) {
    loop {
        // One idle worker waits on the channel while holding the lock; the others wait for
        // the lock. A poisoned lock only means another worker panicked while waiting.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(Job {
            seq,
            ticket,
            bytes,
            reply,
        }) = job
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
