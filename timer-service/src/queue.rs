//! The sans-IO timer queue.
//!
//! # Call order
//!
//! A driver owns one [`TimerQueue`] and loops:
//!
//! 1. [`TimerQueue::schedule`] / [`TimerQueue::schedule_many`] (or, with ids chosen by the
//!    caller, [`TimerQueue::schedule_with_id`] / [`TimerQueue::schedule_many_with_ids`]) /
//!    [`TimerQueue::cancel`] as requests arrive (each returns only after the store has the
//!    change on disk);
//! 2. [`TimerQueue::poll_due`] to lease the tasks due now (at most `concurrency_max` running
//!    at once), hand each to its handler, and call [`TimerQueue::complete`] or
//!    [`TimerQueue::fail`] with the outcome (or [`TimerQueue::complete_many_deferred`], which
//!    returns before the removal is on disk, so that a fire loop never waits for an fsync);
//! 3. sleep until [`TimerQueue::poll_timeout`] (or until a request or a completion arrives).
//!
//! Leases live in memory only: after a restart every task that had not completed is
//! scheduled again, so firing is at-least-once, and handlers must be idempotent by task id.
//! The queue never reads a clock (every call takes `now`) and draws task ids from its RNG.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::CryptoRng;
use sha2::{Digest, Sha256};
use whispr_protocol::UnixTime;

use crate::config::QueueConfig;
use crate::error::{Result, TimerError};
use crate::store::{Mutation, TaskStore};
use crate::task::{Category, FiredTask, NewTask, PRIORITY_MAX, TaskId, TaskMeta, TaskState};

const DAY_MS: u64 = 24 * 3600 * 1000;
const PAUSED_PREFIX: &str = "paused:";
const OWNER_PREFIX: &str = "owner:";
const NODE_PREFIX: &str = "node:";

/// What [`TimerQueue::fail`] did with a failed task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// It will fire again at this time (exponential back-off).
    Retry(UnixTime),
    /// It failed `attempts_max` times and was quarantined.
    Quarantined,
}

/// What [`TimerQueue::schedule_with_id`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleOutcome {
    /// The task is new, and on disk.
    Scheduled,
    /// A task with this id is held already (scheduled, running or quarantined); nothing
    /// changed.
    AlreadyScheduled,
}

/// Counts for one category, for the admin API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CategoryStats {
    /// Tasks waiting (due or not), not running.
    pub scheduled: usize,
    /// Of those, how many are due now.
    pub due: usize,
    /// Tasks running (leased).
    pub running: usize,
    /// Tasks in quarantine.
    pub quarantined: usize,
    /// Whether the category is paused.
    pub paused: bool,
}

/// The timer queue core. See the module documentation for the call order.
pub struct TimerQueue<S: TaskStore, R: CryptoRng> {
    config: QueueConfig,
    store: S,
    rng: R,
    /// Every task held, by id. A hash map: the fire path looks each task up by id (poll,
    /// complete), and a lookup in a B-tree of a million random ids costs a cache miss per
    /// level. Its iteration order (random keys, std's `RandomState`) never reaches an output:
    /// the few walks over it count, or sort what they collect.
    tasks: HashMap<TaskId, TaskMeta>,
    /// Scheduled tasks not running, by category, ordered by (priority desc, due, id).
    ready: BTreeMap<Category, BTreeSet<(Reverse<u8>, UnixTime, TaskId)>>,
    /// The same tasks ordered by due time.
    by_due: BTreeMap<Category, BTreeSet<(UnixTime, TaskId)>>,
    /// Running tasks and when their lease expires (a hash map, as `tasks`).
    leased: HashMap<TaskId, UnixTime>,
    lease_expiry: BTreeSet<(UnixTime, TaskId)>,
    counts: BTreeMap<Category, usize>,
    paused: BTreeSet<Category>,
    /// Per owner (by SHA-256 of the tag, never the tag itself): (day, tasks created that day).
    owners: BTreeMap<[u8; 16], (u64, u32)>,
    /// The embedding node's own small records (e.g. the audit-log anchor).
    node_meta: BTreeMap<String, Vec<u8>>,
    round_robin_next: usize,
}

fn owner_key(tag: &str) -> [u8; 16] {
    let digest = Sha256::digest(tag.as_bytes());
    let mut key = [0u8; 16];
    key.iter_mut().zip(digest.iter()).for_each(|(k, d)| *k = *d);
    key
}

fn owner_meta_key(key: &[u8; 16]) -> String {
    format!("{OWNER_PREFIX}{}", hex::encode(key))
}

fn owner_meta_value(day: u64, count: u32) -> Vec<u8> {
    let mut v = day.to_be_bytes().to_vec();
    v.extend_from_slice(&count.to_be_bytes());
    v
}

impl<S: TaskStore, R: CryptoRng> TimerQueue<S, R> {
    /// Opens the queue over `store`, reading back every task. Tasks that were running when
    /// the node stopped are scheduled again (at-least-once); overdue tasks fire at the next
    /// [`Self::poll_due`], in due order within each priority.
    pub fn open(config: QueueConfig, mut store: S, rng: R) -> Result<Self> {
        let loaded = store.load()?;
        let mut queue = TimerQueue {
            config,
            store,
            rng,
            tasks: HashMap::with_capacity(loaded.tasks.len()),
            ready: BTreeMap::new(),
            by_due: BTreeMap::new(),
            leased: HashMap::new(),
            lease_expiry: BTreeSet::new(),
            counts: BTreeMap::new(),
            paused: BTreeSet::new(),
            owners: BTreeMap::new(),
            node_meta: BTreeMap::new(),
            round_robin_next: 0,
        };
        for meta in loaded.tasks {
            *queue.counts.entry(meta.category).or_default() += 1;
            if meta.state == TaskState::Scheduled {
                queue.index(&meta);
            }
            queue.tasks.insert(meta.id, meta);
        }
        for (key, value) in loaded.meta {
            if let Some(name) = key.strip_prefix(PAUSED_PREFIX) {
                queue.paused.insert(
                    Category::parse(name)
                        .map_err(|_| TimerError::Corrupt("unknown category in paused flag"))?,
                );
            } else if let Some(name) = key.strip_prefix(NODE_PREFIX) {
                queue.node_meta.insert(name.to_owned(), value);
            } else if let Some(hex_key) = key.strip_prefix(OWNER_PREFIX) {
                let mut owner = [0u8; 16];
                hex::decode_to_slice(hex_key, &mut owner)
                    .map_err(|_| TimerError::Corrupt("owner counter key"))?;
                let value: [u8; 12] = value
                    .as_slice()
                    .try_into()
                    .map_err(|_| TimerError::Corrupt("owner counter value"))?;
                let (day, count) = value.split_at(8);
                let day = u64::from_be_bytes(day.try_into().unwrap_or([0; 8]));
                let count = u32::from_be_bytes(count.try_into().unwrap_or([0; 4]));
                queue.owners.insert(owner, (day, count));
            }
        }
        Ok(queue)
    }

    /// Stores a small record of the embedding node durably (e.g. the audit-log anchor).
    pub fn set_node_meta(&mut self, key: &str, value: Vec<u8>) -> Result<()> {
        self.store.apply(vec![Mutation::PutMeta {
            key: format!("{NODE_PREFIX}{key}"),
            value: value.clone(),
        }])?;
        self.node_meta.insert(key.to_owned(), value);
        Ok(())
    }

    /// A record stored with [`Self::set_node_meta`].
    pub fn node_meta(&self, key: &str) -> Option<&[u8]> {
        self.node_meta.get(key).map(Vec::as_slice)
    }

    /// The limits in force.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The store (e.g. for its statistics).
    pub fn store(&self) -> &S {
        &self.store
    }

    fn index(&mut self, meta: &TaskMeta) {
        self.ready.entry(meta.category).or_default().insert((
            Reverse(meta.priority),
            meta.due_at,
            meta.id,
        ));
        self.by_due
            .entry(meta.category)
            .or_default()
            .insert((meta.due_at, meta.id));
    }

    fn unindex(&mut self, meta: &TaskMeta) {
        if let Some(set) = self.ready.get_mut(&meta.category) {
            set.remove(&(Reverse(meta.priority), meta.due_at, meta.id));
        }
        if let Some(set) = self.by_due.get_mut(&meta.category) {
            set.remove(&(meta.due_at, meta.id));
        }
    }

    fn end_lease(&mut self, id: &TaskId) {
        if let Some(until) = self.leased.remove(id) {
            self.lease_expiry.remove(&(until, *id));
        }
    }

    fn validate(&self, now: UnixTime, task: &NewTask) -> Result<()> {
        if task.payload.len() > self.config.payload_bytes_max {
            return Err(TimerError::PayloadTooLarge {
                len: task.payload.len(),
                max: self.config.payload_bytes_max,
            });
        }
        if task.priority > PRIORITY_MAX {
            return Err(TimerError::PriorityOutOfRange(task.priority));
        }
        let horizon = now
            .0
            .saturating_add(u64::from(self.config.horizon_days_max).saturating_mul(DAY_MS));
        if task.due_at.0 > horizon {
            return Err(TimerError::BeyondHorizon {
                horizon_days: self.config.horizon_days_max,
            });
        }
        if let Some(owner) = &task.owner
            && owner.len() > self.config.owner_tag_bytes_max
        {
            return Err(TimerError::OwnerTagTooLong {
                max: self.config.owner_tag_bytes_max,
            });
        }
        Ok(())
    }

    /// Schedules one task; see [`Self::schedule_many`].
    pub fn schedule(&mut self, now: UnixTime, task: NewTask) -> Result<TaskId> {
        self.schedule_many(now, vec![task])?
            .pop()
            .unwrap_or(Err(TimerError::Storage("empty batch result".into())))
    }

    /// Schedules tasks with one synced write (group commit). Each task is checked on its own
    /// (payload size, priority, horizon, owner limit, queue capacity): the result has one
    /// entry per task, in order, and refused tasks change nothing. The outer error means the
    /// store failed and no task was accepted.
    pub fn schedule_many(
        &mut self,
        now: UnixTime,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Result<TaskId>>> {
        let results = self.schedule_batch(now, tasks.into_iter().map(|t| (None, t)).collect())?;
        Ok(results.into_iter().map(|r| r.map(|(id, _)| id)).collect())
    }

    /// Schedules one task under an id chosen by the caller (e.g. a held packet's hold id, so
    /// that a retransmitted request is stored once); see [`Self::schedule_many_with_ids`].
    pub fn schedule_with_id(
        &mut self,
        now: UnixTime,
        id: TaskId,
        task: NewTask,
    ) -> Result<ScheduleOutcome> {
        self.schedule_many_with_ids(now, vec![(id, task)])?
            .pop()
            .unwrap_or(Err(TimerError::Storage("empty batch result".into())))
    }

    /// [`Self::schedule_many`] with ids chosen by the caller. A task whose id is held already
    /// (scheduled, running or quarantined), or that an earlier entry of the same batch uses,
    /// gives [`ScheduleOutcome::AlreadyScheduled`] before any other check and changes nothing;
    /// the others are checked and written (one synced write) as in [`Self::schedule_many`].
    pub fn schedule_many_with_ids(
        &mut self,
        now: UnixTime,
        tasks: Vec<(TaskId, NewTask)>,
    ) -> Result<Vec<Result<ScheduleOutcome>>> {
        let results = self.schedule_batch(
            now,
            tasks
                .into_iter()
                .map(|(id, task)| (Some(id), task))
                .collect(),
        )?;
        Ok(results
            .into_iter()
            .map(|r| r.map(|(_, outcome)| outcome))
            .collect())
    }

    /// The body of the scheduling calls: tasks without an id get a random one.
    fn schedule_batch(
        &mut self,
        now: UnixTime,
        tasks: Vec<(Option<TaskId>, NewTask)>,
    ) -> Result<Vec<Result<(TaskId, ScheduleOutcome)>>> {
        let today = now.0 / DAY_MS;
        let mut results = Vec::with_capacity(tasks.len());
        let mut batch = Vec::new();
        let mut accepted: Vec<TaskMeta> = Vec::new();
        let mut batch_ids: BTreeSet<TaskId> = BTreeSet::new();
        let mut added: BTreeMap<Category, usize> = BTreeMap::new();
        let mut owners: BTreeMap<[u8; 16], (u64, u32)> = BTreeMap::new();
        let mut owners_new = 0usize;
        for (chosen_id, task) in tasks {
            if let Some(id) = chosen_id
                && (self.tasks.contains_key(&id) || batch_ids.contains(&id))
            {
                results.push(Ok((id, ScheduleOutcome::AlreadyScheduled)));
                continue;
            }
            if let Err(e) = self.validate(now, &task) {
                results.push(Err(e));
                continue;
            }
            let held = self.counts.get(&task.category).copied().unwrap_or(0)
                + added.get(&task.category).copied().unwrap_or(0);
            if held >= self.config.queue_tasks_max {
                results.push(Err(TimerError::QueueFull {
                    category: task.category.name(),
                    max: self.config.queue_tasks_max,
                }));
                continue;
            }
            if let Some(owner) = &task.owner {
                let key = owner_key(owner);
                let current = owners
                    .get(&key)
                    .or_else(|| self.owners.get(&key))
                    .copied()
                    .filter(|(day, _)| *day == today);
                let count = current.map_or(0, |(_, c)| c);
                if count >= self.config.owner_tasks_per_day_max {
                    results.push(Err(TimerError::OwnerLimit {
                        max: self.config.owner_tasks_per_day_max,
                    }));
                    continue;
                }
                let known = self.owners.contains_key(&key) || owners.contains_key(&key);
                if !known {
                    let stale = self
                        .owners
                        .values()
                        .filter(|(day, _)| *day != today)
                        .count();
                    if self.owners.len() + owners_new >= self.config.owners_tracked_max
                        && stale == 0
                    {
                        results.push(Err(TimerError::OwnersTableFull {
                            max: self.config.owners_tracked_max,
                        }));
                        continue;
                    }
                    owners_new += 1;
                }
                owners.insert(key, (today, count.saturating_add(1)));
            }
            let id = chosen_id.unwrap_or_else(|| {
                let mut id = [0u8; 16];
                self.rng.fill_bytes(&mut id);
                TaskId(id)
            });
            batch_ids.insert(id);
            let meta = TaskMeta {
                id,
                category: task.category,
                priority: task.priority,
                due_at: task.due_at,
                created_at: now,
                attempts: 0,
                state: TaskState::Scheduled,
                payload_len: u32::try_from(task.payload.len()).unwrap_or(u32::MAX),
            };
            *added.entry(task.category).or_default() += 1;
            batch.push(Mutation::PutTask {
                meta: meta.clone(),
                payload: Some(task.payload),
                previous_due: None,
            });
            results.push(Ok((meta.id, ScheduleOutcome::Scheduled)));
            accepted.push(meta);
        }
        // Owner counters of past days are dropped when the table needs room.
        let mut evict = Vec::new();
        if self.owners.len() + owners_new > self.config.owners_tracked_max {
            let excess = self.owners.len() + owners_new - self.config.owners_tracked_max;
            evict = self
                .owners
                .iter()
                .filter(|(_, (day, _))| *day != today)
                .map(|(k, _)| *k)
                .take(excess)
                .collect();
        }
        for key in &evict {
            batch.push(Mutation::DeleteMeta {
                key: owner_meta_key(key),
            });
        }
        for (key, (day, count)) in &owners {
            batch.push(Mutation::PutMeta {
                key: owner_meta_key(key),
                value: owner_meta_value(*day, *count),
            });
        }
        if batch.is_empty() {
            return Ok(results);
        }
        self.store.apply(batch)?;
        for key in evict {
            self.owners.remove(&key);
        }
        self.owners.extend(owners);
        // Into the due-ordered indexes in due order: neighbouring inserts share B-tree nodes
        // (the batch's due times are in any order).
        accepted.sort_unstable_by_key(|meta| (meta.due_at, meta.id));
        for meta in accepted {
            *self.counts.entry(meta.category).or_default() += 1;
            self.index(&meta);
            self.tasks.insert(meta.id, meta);
        }
        Ok(results)
    }

    fn get(&self, id: &TaskId) -> Result<&TaskMeta> {
        self.tasks.get(id).ok_or(TimerError::NotFound)
    }

    /// Removes tasks (only those not quarantined when `completing`); returns how many. On
    /// disk before it returns, or, when `deferred`, queued for the store's next write
    /// ([`TaskStore::apply_deferred`]).
    fn delete(&mut self, ids: &[TaskId], deferred: bool, completing: bool) -> Result<usize> {
        // Taken out of the table first (one lookup each), put back if the store refuses.
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(meta) = self.tasks.remove(id) {
                if completing && meta.state == TaskState::Quarantined {
                    self.tasks.insert(*id, meta);
                } else {
                    removed.push(meta);
                }
            }
        }
        let batch = removed
            .iter()
            .map(|meta| Mutation::DeleteTask { meta: meta.clone() })
            .collect();
        let stored = if deferred {
            self.store.apply_deferred(batch)
        } else {
            self.store.apply(batch)
        };
        if let Err(e) = stored {
            for meta in removed {
                self.tasks.insert(meta.id, meta);
            }
            return Err(e);
        }
        for meta in &removed {
            // A running task is leased and not indexed; any other is indexed.
            match self.leased.remove(&meta.id) {
                Some(until) => {
                    self.lease_expiry.remove(&(until, meta.id));
                }
                None => self.unindex(meta),
            }
            if let Some(c) = self.counts.get_mut(&meta.category) {
                *c = c.saturating_sub(1);
            }
        }
        Ok(removed.len())
    }

    /// Removes a task whatever its state; [`TimerError::NotFound`] if there is none.
    pub fn cancel(&mut self, id: &TaskId) -> Result<()> {
        self.get(id)?;
        self.delete(&[*id], false, false).map(|_removed| ())
    }

    /// Replaces a stored task's record, keeping the indexes in step.
    fn rewrite(&mut self, updated: TaskMeta) -> Result<()> {
        let old = self.get(&updated.id)?.clone();
        self.store.apply(vec![Mutation::PutTask {
            meta: updated.clone(),
            payload: None,
            previous_due: Some(old.due_at),
        }])?;
        self.unindex(&old);
        self.end_lease(&updated.id);
        if updated.state == TaskState::Scheduled {
            self.index(&updated);
        }
        self.tasks.insert(updated.id, updated);
        Ok(())
    }

    /// Handles expired leases: each counts as a failed attempt and makes the task due again
    /// at once, or quarantines it after `attempts_max` attempts.
    fn expire_leases(&mut self, now: UnixTime) -> Result<()> {
        let expired: Vec<TaskId> = self
            .lease_expiry
            .iter()
            .take_while(|(until, _)| *until <= now)
            .map(|(_, id)| *id)
            .collect();
        for id in expired {
            let mut meta = self.get(&id)?.clone();
            meta.attempts = meta.attempts.saturating_add(1);
            if meta.attempts >= self.config.attempts_max {
                meta.state = TaskState::Quarantined;
            } else {
                meta.due_at = now;
            }
            self.rewrite(meta)?;
        }
        Ok(())
    }

    /// The best due task of `category`: highest priority first, then earliest due time.
    fn best_due(
        &self,
        category: Category,
        now: UnixTime,
    ) -> Option<(Reverse<u8>, UnixTime, TaskId)> {
        let set = self.ready.get(&category)?;
        // The first entry of each priority present is its earliest; one lookup per priority
        // present, not per possible priority.
        let mut next = set.first().copied();
        while let Some(entry @ (priority, due, _)) = next {
            if due <= now {
                return Some(entry);
            }
            let lower = priority.0.checked_sub(1)?;
            next = set
                .range((Reverse(lower), UnixTime(0), TaskId([0; 16]))..)
                .next()
                .copied();
        }
        None
    }

    /// Leases and returns up to `max` due tasks (fewer if `concurrency_max` tasks are
    /// running). Categories that are not paused are served round-robin, one task each per
    /// round, so a flood in one cannot starve another; within a category the highest
    /// priority goes first, then the earliest due time.
    pub fn poll_due(&mut self, now: UnixTime, max: usize) -> Result<Vec<FiredTask>> {
        self.expire_leases(now)?;
        let free = self
            .config
            .concurrency_max
            .saturating_sub(self.leased.len());
        let want = max.min(free);
        let mut picked: Vec<TaskMeta> = Vec::new();
        let start = self.round_robin_next;
        self.round_robin_next = (self.round_robin_next + 1) % Category::ALL.len();
        'rounds: loop {
            let mut progress = false;
            for i in 0..Category::ALL.len() {
                if picked.len() >= want {
                    break 'rounds;
                }
                let Some(category) = Category::ALL
                    .get((start + i) % Category::ALL.len())
                    .copied()
                else {
                    continue;
                };
                if self.paused.contains(&category) {
                    continue;
                }
                if let Some((_, _, id)) = self.best_due(category, now) {
                    let meta = self.get(&id)?.clone();
                    self.unindex(&meta);
                    let until = now.saturating_add(self.config.execution_timeout());
                    self.leased.insert(id, until);
                    self.lease_expiry.insert((until, id));
                    picked.push(meta);
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        let mut payloads = self.store.payloads(&picked).into_iter();
        let mut fired = Vec::with_capacity(picked.len());
        for (i, meta) in picked.iter().enumerate() {
            let payload = payloads
                .next()
                .unwrap_or_else(|| Err(TimerError::Storage("payload read missing".into())));
            match payload {
                Ok(payload) => fired.push(FiredTask {
                    id: meta.id,
                    category: meta.category,
                    due_at: meta.due_at,
                    attempts: meta.attempts,
                    payload,
                }),
                Err(e) => {
                    // Put back everything not handed out, so nothing is lost.
                    for meta in picked.iter().skip(i) {
                        self.end_lease(&meta.id);
                        self.index(meta);
                    }
                    if fired.is_empty() {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Ok(fired)
    }

    /// A handler finished the task: it is removed. Also accepted after the lease expired
    /// (the work was done); [`TimerError::NotFound`] if the task is gone.
    pub fn complete(&mut self, id: &TaskId) -> Result<()> {
        let meta = self.get(id)?;
        if meta.state == TaskState::Quarantined {
            return Err(TimerError::WrongState("quarantined"));
        }
        self.delete(&[*id], false, true).map(|_removed| ())
    }

    /// [`Self::complete`] without waiting for the disk; see [`Self::complete_many_deferred`].
    pub fn complete_deferred(&mut self, id: &TaskId) -> Result<()> {
        let meta = self.get(id)?;
        if meta.state == TaskState::Quarantined {
            return Err(TimerError::WrongState("quarantined"));
        }
        self.delete(&[*id], true, true).map(|_removed| ())
    }

    /// Completes many tasks with one synced write (group commit); ids that are gone or
    /// quarantined are skipped. Returns how many were removed.
    pub fn complete_many(&mut self, ids: &[TaskId]) -> Result<usize> {
        self.complete_ids(ids, false)
    }

    /// [`Self::complete_many`] without waiting for the disk: the tasks leave the queue at
    /// once, and their removal is handed to the store's next write
    /// ([`TaskStore::apply_deferred`]; the RocksDB store merges such removals into one synced
    /// write on its own thread), so a fire loop never waits for an fsync. At-least-once is
    /// kept: a crash before the removal reaches the disk makes these tasks fire again, as a
    /// crash before [`Self::complete`] would; every later write of the queue reaches the disk
    /// after it. [`Self::sync_completions`] waits for the disk.
    pub fn complete_many_deferred(&mut self, ids: &[TaskId]) -> Result<usize> {
        self.complete_ids(ids, true)
    }

    /// Waits until every removal of [`Self::complete_many_deferred`] is on disk; the store's
    /// error if one failed (the store is then poisoned).
    pub fn sync_completions(&mut self) -> Result<()> {
        self.store.sync_deferred()
    }

    fn complete_ids(&mut self, ids: &[TaskId], deferred: bool) -> Result<usize> {
        self.delete(ids, deferred, true)
    }

    /// A handler failed the task: it fires again after an exponential back-off, or goes to
    /// quarantine after `attempts_max` failures. The task must be running.
    pub fn fail(&mut self, now: UnixTime, id: &TaskId) -> Result<FailOutcome> {
        if !self.leased.contains_key(id) {
            return Err(TimerError::WrongState("not running"));
        }
        let mut meta = self.get(id)?.clone();
        meta.attempts = meta.attempts.saturating_add(1);
        let outcome = if meta.attempts >= self.config.attempts_max {
            meta.state = TaskState::Quarantined;
            FailOutcome::Quarantined
        } else {
            meta.due_at = now.saturating_add(self.config.backoff(meta.attempts));
            FailOutcome::Retry(meta.due_at)
        };
        self.rewrite(meta)?;
        Ok(outcome)
    }

    /// When the queue next needs [`Self::poll_due`]: the earliest lease expiry, and, while a
    /// worker slot is free, the earliest due time in a category that is not paused. `None`
    /// when nothing is pending.
    pub fn poll_timeout(&self) -> Option<UnixTime> {
        let lease = self.lease_expiry.first().map(|(until, _)| *until);
        let due = if self.leased.len() < self.config.concurrency_max {
            self.by_due
                .iter()
                .filter(|(c, _)| !self.paused.contains(c))
                .filter_map(|(_, set)| set.first().map(|(due, _)| *due))
                .min()
        } else {
            None
        };
        match (lease, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn categories(which: Option<Category>) -> Vec<Category> {
        which.map_or_else(|| Category::ALL.to_vec(), |c| vec![c])
    }

    /// Emergency stop: no task of `which` (all categories when `None`) fires until resumed.
    /// Paused tasks stay stored; the pause itself is stored too and survives a restart.
    pub fn pause(&mut self, which: Option<Category>) -> Result<()> {
        let categories = Self::categories(which);
        self.store.apply(
            categories
                .iter()
                .map(|c| Mutation::PutMeta {
                    key: format!("{PAUSED_PREFIX}{}", c.name()),
                    value: vec![1],
                })
                .collect(),
        )?;
        self.paused.extend(categories);
        Ok(())
    }

    /// Lifts [`Self::pause`].
    pub fn resume(&mut self, which: Option<Category>) -> Result<()> {
        let categories = Self::categories(which);
        self.store.apply(
            categories
                .iter()
                .map(|c| Mutation::DeleteMeta {
                    key: format!("{PAUSED_PREFIX}{}", c.name()),
                })
                .collect(),
        )?;
        for c in categories {
            self.paused.remove(&c);
        }
        Ok(())
    }

    /// Whether `category` is paused.
    pub fn is_paused(&self, category: Category) -> bool {
        self.paused.contains(&category)
    }

    /// Takes a task out of circulation (scheduled or running) until [`Self::release`].
    pub fn quarantine(&mut self, id: &TaskId) -> Result<()> {
        let mut meta = self.get(id)?.clone();
        if meta.state == TaskState::Quarantined {
            return Err(TimerError::WrongState("already quarantined"));
        }
        meta.state = TaskState::Quarantined;
        self.rewrite(meta)
    }

    /// Returns a quarantined task to its queue with its attempts reset; it keeps its due
    /// time, so an overdue task fires at once.
    pub fn release(&mut self, id: &TaskId) -> Result<()> {
        let mut meta = self.get(id)?.clone();
        if meta.state != TaskState::Quarantined {
            return Err(TimerError::WrongState("not quarantined"));
        }
        meta.state = TaskState::Scheduled;
        meta.attempts = 0;
        self.rewrite(meta)
    }

    /// Deletes every task of `category` (scheduled, running or quarantined) in one write;
    /// returns how many.
    pub fn purge(&mut self, category: Category) -> Result<usize> {
        let mut ids: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|m| m.category == category)
            .map(|m| m.id)
            .collect();
        // In id order, whatever the hash map's order: the store gets the same batch each run.
        ids.sort_unstable();
        self.delete(&ids, false, false)?;
        Ok(ids.len())
    }

    /// Replaces a task that is not running, in one synced write, by another under the same id
    /// and in the same category: new priority, due time and payload, attempts reset, scheduled
    /// (e.g. a cancelled held send by its tombstone, which then needs no room of its own).
    /// [`TimerError::NotFound`] without such a task, [`TimerError::WrongState`] while it runs;
    /// the new task is checked as [`Self::schedule`] checks one (except the queue's capacity
    /// and the owner's daily count, which the replaced task held already).
    pub fn replace(&mut self, now: UnixTime, id: &TaskId, task: NewTask) -> Result<()> {
        let old = self.get(id)?.clone();
        if self.leased.contains_key(id) {
            return Err(TimerError::WrongState("running"));
        }
        if task.category != old.category {
            return Err(TimerError::WrongState("in another category"));
        }
        self.validate(now, &task)?;
        let meta = TaskMeta {
            id: *id,
            category: old.category,
            priority: task.priority,
            due_at: task.due_at,
            created_at: now,
            attempts: 0,
            state: TaskState::Scheduled,
            payload_len: u32::try_from(task.payload.len()).unwrap_or(u32::MAX),
        };
        self.store.apply(vec![Mutation::PutTask {
            meta: meta.clone(),
            payload: Some(task.payload),
            previous_due: Some(old.due_at),
        }])?;
        self.unindex(&old);
        self.index(&meta);
        self.tasks.insert(*id, meta);
        Ok(())
    }

    /// Tasks held in `category` (scheduled, running and quarantined).
    pub fn count(&self, category: Category) -> usize {
        self.counts.get(&category).copied().unwrap_or(0)
    }

    /// A stored task's record.
    pub fn task(&self, id: &TaskId) -> Option<&TaskMeta> {
        self.tasks.get(id)
    }

    /// A stored task's payload (read from the store); [`TimerError::NotFound`] if there is no
    /// such task.
    pub fn payload(&self, id: &TaskId) -> Result<Vec<u8>> {
        let meta = self.get(id)?;
        self.store
            .payloads(std::slice::from_ref(meta))
            .pop()
            .unwrap_or(Err(TimerError::NotFound))
    }

    /// Whether a task is running.
    pub fn is_running(&self, id: &TaskId) -> bool {
        self.leased.contains_key(id)
    }

    /// Tasks held, over all categories.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is held.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Counts per category at `now`.
    pub fn stats(&self, now: UnixTime) -> BTreeMap<Category, CategoryStats> {
        let mut out: BTreeMap<Category, CategoryStats> = Category::ALL
            .iter()
            .map(|c| {
                (
                    *c,
                    CategoryStats {
                        paused: self.paused.contains(c),
                        ..CategoryStats::default()
                    },
                )
            })
            .collect();
        for (c, set) in &self.by_due {
            let s = out.entry(*c).or_default();
            s.scheduled = set.len();
            s.due = set.range(..=(now, TaskId([0xFF; 16]))).count();
        }
        for id in self.leased.keys() {
            if let Some(meta) = self.tasks.get(id) {
                out.entry(meta.category).or_default().running += 1;
            }
        }
        for meta in self.tasks.values() {
            if meta.state == TaskState::Quarantined {
                out.entry(meta.category).or_default().quarantined += 1;
            }
        }
        out
    }
}
