//! The sans-IO queue over the in-memory store: ordering, priority, fairness, leases, retries,
//! quarantine, pause, limits and bad input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use whispr_protocol::UnixTime;
use whispr_timer_service::TimerError;
use whispr_timer_service::config::QueueConfig;
use whispr_timer_service::queue::{FailOutcome, ScheduleOutcome, TimerQueue};
use whispr_timer_service::store::MemoryStore;
use whispr_timer_service::task::{Category, NewTask, TaskId};

const T0: UnixTime = UnixTime(1_800_000_000_000);

fn config() -> QueueConfig {
    QueueConfig {
        concurrency_max: 1_000_000,
        ..QueueConfig::default()
    }
}

fn queue(config: QueueConfig) -> TimerQueue<MemoryStore, ChaCha20Rng> {
    TimerQueue::open(config, MemoryStore::new(), ChaCha20Rng::seed_from_u64(7)).unwrap()
}

fn task(category: Category, priority: u8, due_ms: u64) -> NewTask {
    NewTask {
        category,
        priority,
        due_at: UnixTime(T0.0 + due_ms),
        payload: due_ms.to_be_bytes().to_vec(),
        owner: None,
    }
}

fn at(ms: u64) -> UnixTime {
    UnixTime(T0.0 + ms)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Tasks fire only once due, each exactly once, and among those due at a poll the higher
    /// priority goes first, then the earlier due time.
    #[test]
    fn fires_due_tasks_by_priority_then_due_time(
        tasks in proptest::collection::vec((0u8..=9, 0u64..10_000), 1..60),
        polls in proptest::collection::vec(0u64..12_000, 1..8),
    ) {
        let mut q = queue(config());
        let mut due_of = BTreeMap::new();
        for (p, due) in &tasks {
            let id = q.schedule(T0, task(Category::Expiry, *p, *due)).unwrap();
            due_of.insert(id, (*p, *due));
        }
        let mut polls = polls;
        polls.sort();
        polls.push(20_000);
        let mut fired = BTreeMap::new();
        for now in polls {
            let batch = q.poll_due(at(now), usize::MAX).unwrap();
            let mut previous: Option<(u8, u64)> = None;
            for f in &batch {
                let (p, due) = due_of[&f.id];
                prop_assert!(due <= now, "fired before due");
                prop_assert_eq!(f.payload.clone(), due.to_be_bytes().to_vec());
                if let Some((pp, pd)) = previous {
                    prop_assert!(pp > p || (pp == p && pd <= due), "order");
                }
                previous = Some((p, due));
                prop_assert!(fired.insert(f.id, now).is_none(), "fired twice");
                q.complete(&f.id).unwrap();
            }
        }
        prop_assert_eq!(fired.len(), tasks.len());
        prop_assert!(q.is_empty());
    }

    /// With one category flooded, every other category with due work still gets a share of
    /// each poll (round-robin), whatever the priorities.
    #[test]
    fn one_category_flood_does_not_starve_another(flood in 50usize..300, others in 1usize..5, slots in 3usize..10) {
        let mut q = queue(QueueConfig { concurrency_max: slots, ..QueueConfig::default() });
        for i in 0..flood {
            q.schedule(T0, task(Category::DeferredSend, 9, i as u64)).unwrap();
        }
        for i in 0..others {
            q.schedule(T0, task(Category::Expiry, 0, 1_000 + i as u64)).unwrap();
            q.schedule(T0, task(Category::Maintenance, 0, 1_000 + i as u64)).unwrap();
        }
        let batch = q.poll_due(at(10_000), usize::MAX).unwrap();
        prop_assert_eq!(batch.len(), slots);
        let expiry = batch.iter().filter(|f| f.category == Category::Expiry).count();
        let maintenance = batch.iter().filter(|f| f.category == Category::Maintenance).count();
        prop_assert!(expiry >= (slots / 3).min(others));
        prop_assert!(maintenance >= (slots / 3).min(others));
    }
}

#[test]
fn expired_lease_makes_the_task_due_again_and_counts_as_an_attempt() {
    let mut q = queue(QueueConfig {
        execution_timeout_secs: 60,
        attempts_max: 3,
        ..QueueConfig::default()
    });
    let id = q.schedule(T0, task(Category::Expiry, 0, 0)).unwrap();
    let first = q.poll_due(at(0), 10).unwrap();
    assert_eq!(first.len(), 1);
    assert!(q.is_running(&id));
    // Within the lease nothing fires again.
    assert!(q.poll_due(at(59_999), 10).unwrap().is_empty());
    assert_eq!(q.poll_timeout(), Some(at(60_000)));
    // Lease expired: due again, with one attempt counted.
    let second = q.poll_due(at(60_000), 10).unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, id);
    assert_eq!(second[0].attempts, 1);
    // Third expiry reaches attempts_max: quarantined, never fires again.
    let third = q.poll_due(at(120_000), 10).unwrap();
    assert_eq!(third[0].attempts, 2);
    assert!(q.poll_due(at(180_000), 10).unwrap().is_empty());
    assert_eq!(q.stats(at(180_000))[&Category::Expiry].quarantined, 1);
    // A late completion of a quarantined task is refused; release puts it back.
    assert_eq!(q.complete(&id), Err(TimerError::WrongState("quarantined")));
    q.release(&id).unwrap();
    let again = q.poll_due(at(180_000), 10).unwrap();
    assert_eq!((again[0].id, again[0].attempts), (id, 0));
    q.complete(&id).unwrap();
    assert!(q.is_empty());
}

#[test]
fn failures_back_off_exponentially_then_quarantine() {
    let mut q = queue(QueueConfig {
        attempts_max: 4,
        backoff_base_ms: 1000,
        backoff_max_ms: 3000,
        ..QueueConfig::default()
    });
    let id = q.schedule(T0, task(Category::DeferredSend, 5, 0)).unwrap();
    let mut now = 0;
    let mut retries = Vec::new();
    loop {
        let fired = q.poll_due(at(now), 10).unwrap();
        assert_eq!(fired.len(), 1, "at {now}");
        match q.fail(at(now), &id).unwrap() {
            FailOutcome::Retry(when) => {
                retries.push(when.0 - at(now).0);
                // Not before the back-off.
                assert!(q.poll_due(UnixTime(when.0 - 1), 10).unwrap().is_empty());
                now = when.0 - T0.0;
            }
            FailOutcome::Quarantined => break,
        }
    }
    assert_eq!(retries, vec![1000, 2000, 3000]);
    assert_eq!(
        q.fail(at(now), &id),
        Err(TimerError::WrongState("not running"))
    );
}

#[test]
fn concurrency_is_bounded() {
    let mut q = queue(QueueConfig::default());
    for i in 0..20 {
        q.schedule(T0, task(Category::Expiry, 0, i)).unwrap();
    }
    let first = q.poll_due(at(100), usize::MAX).unwrap();
    assert_eq!(first.len(), 5, "policy default: 5 concurrent tasks");
    assert!(q.poll_due(at(100), usize::MAX).unwrap().is_empty());
    q.complete(&first[0].id).unwrap();
    assert_eq!(q.poll_due(at(100), usize::MAX).unwrap().len(), 1);
}

#[test]
fn pause_and_resume_per_category_and_all() {
    let mut q = queue(config());
    let e = q.schedule(T0, task(Category::Expiry, 0, 0)).unwrap();
    let d = q.schedule(T0, task(Category::DeferredSend, 0, 0)).unwrap();
    q.pause(Some(Category::Expiry)).unwrap();
    let fired = q.poll_due(at(1), 10).unwrap();
    assert_eq!(fired.iter().map(|f| f.id).collect::<Vec<_>>(), vec![d]);
    assert!(q.stats(at(1))[&Category::Expiry].paused);
    // The paused category's due task does not wake the driver: only the running task's
    // lease expiry does.
    assert_eq!(
        q.poll_timeout(),
        Some(at(1).saturating_add(QueueConfig::default().execution_timeout()))
    );
    q.pause(None).unwrap();
    q.resume(Some(Category::Expiry)).unwrap();
    let fired = q.poll_due(at(2), 10).unwrap();
    assert_eq!(fired.iter().map(|f| f.id).collect::<Vec<_>>(), vec![e]);
    assert!(q.is_paused(Category::Maintenance));
    q.resume(None).unwrap();
    assert!(!q.is_paused(Category::Maintenance));
}

#[test]
fn pause_and_tasks_survive_reopening_the_store() {
    let mut q = queue(config());
    let id = q.schedule(T0, task(Category::Expiry, 3, 500)).unwrap();
    q.pause(Some(Category::Maintenance)).unwrap();
    let running = q.schedule(T0, task(Category::Maintenance, 0, 0)).unwrap();
    q.resume(Some(Category::Maintenance)).unwrap();
    assert_eq!(q.poll_due(at(0), 10).unwrap()[0].id, running);
    q.pause(Some(Category::Maintenance)).unwrap();
    // "Crash": reopen over the same store contents.
    let store = take_store(q);
    let mut q = TimerQueue::open(config(), store, ChaCha20Rng::seed_from_u64(8)).unwrap();
    assert!(q.is_paused(Category::Maintenance));
    assert_eq!(q.task(&id).unwrap().priority, 3);
    // The task that was running is scheduled again (at-least-once), once resumed.
    q.resume(None).unwrap();
    let fired: Vec<TaskId> = q
        .poll_due(at(1000), 10)
        .unwrap()
        .iter()
        .map(|f| f.id)
        .collect();
    assert!(fired.contains(&running) && fired.contains(&id));
}

/// What a restarted node would find: the store's contents, without the queue's memory.
fn take_store(q: TimerQueue<MemoryStore, ChaCha20Rng>) -> MemoryStore {
    q.store().clone()
}

#[test]
fn bad_input_gets_typed_errors_and_changes_nothing() {
    let mut q = queue(QueueConfig {
        queue_tasks_max: 2,
        ..QueueConfig::default()
    });
    let big = NewTask {
        payload: vec![0; 1024 * 1024 + 1],
        ..task(Category::Expiry, 0, 0)
    };
    assert_eq!(
        q.schedule(T0, big),
        Err(TimerError::PayloadTooLarge {
            len: 1024 * 1024 + 1,
            max: 1024 * 1024
        })
    );
    assert_eq!(
        q.schedule(T0, task(Category::Expiry, 10, 0)),
        Err(TimerError::PriorityOutOfRange(10))
    );
    assert_eq!(
        q.schedule(T0, task(Category::Expiry, 0, 366 * 24 * 3600 * 1000)),
        Err(TimerError::BeyondHorizon { horizon_days: 365 })
    );
    let long_owner = NewTask {
        owner: Some("x".repeat(65)),
        ..task(Category::Expiry, 0, 0)
    };
    assert!(matches!(
        q.schedule(T0, long_owner),
        Err(TimerError::OwnerTagTooLong { .. })
    ));
    assert_eq!(Category::parse("cron"), Err(TimerError::UnknownCategory));
    assert_eq!(TaskId::parse("zz"), Err(TimerError::BadTaskId));
    assert!(q.is_empty());
    // A full queue refuses (backpressure) and keeps what it accepted.
    q.schedule(T0, task(Category::Expiry, 0, 0)).unwrap();
    q.schedule(T0, task(Category::Expiry, 0, 1)).unwrap();
    assert_eq!(
        q.schedule(T0, task(Category::Expiry, 0, 2)),
        Err(TimerError::QueueFull {
            category: "expiry",
            max: 2
        })
    );
    // Other categories have their own queue.
    q.schedule(T0, task(Category::Maintenance, 0, 0)).unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q.cancel(&TaskId([9; 16])), Err(TimerError::NotFound));
    assert!(
        TimerError::QueueFull {
            category: "expiry",
            max: 2
        }
        .is_caller_error()
    );
}

#[test]
fn owners_are_limited_per_day_and_system_tasks_are_not() {
    let mut q = queue(QueueConfig {
        owner_tasks_per_day_max: 3,
        ..config()
    });
    let owned = |n: u64| NewTask {
        owner: Some("alice".into()),
        ..task(Category::DeferredSend, 0, n)
    };
    let results = q.schedule_many(T0, (0..5).map(owned).collect()).unwrap();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(results[3], Err(TimerError::OwnerLimit { max: 3 }));
    // Another owner, and the node's own tasks, are not affected.
    let bob = NewTask {
        owner: Some("bob".into()),
        ..task(Category::DeferredSend, 0, 0)
    };
    q.schedule(T0, bob).unwrap();
    for i in 0..10 {
        q.schedule(T0, task(Category::Expiry, 0, i)).unwrap();
    }
    // The next day alice may create again; the counters survive a reopen.
    let store = take_store(q);
    let mut q = TimerQueue::open(
        QueueConfig {
            owner_tasks_per_day_max: 3,
            ..config()
        },
        store,
        ChaCha20Rng::seed_from_u64(9),
    )
    .unwrap();
    assert_eq!(
        q.schedule(T0, owned(9)),
        Err(TimerError::OwnerLimit { max: 3 })
    );
    let tomorrow = UnixTime(T0.0 + 24 * 3600 * 1000);
    let next_day = NewTask {
        due_at: tomorrow,
        ..owned(0)
    };
    q.schedule(tomorrow, next_day).unwrap();
}

#[test]
fn a_failed_write_poisons_the_store_and_changes_nothing() {
    let mut store = MemoryStore::new();
    store.fail_next_write();
    let mut q = TimerQueue::open(config(), store, ChaCha20Rng::seed_from_u64(1)).unwrap();
    assert!(matches!(
        q.schedule(T0, task(Category::Expiry, 0, 0)),
        Err(TimerError::Storage(_))
    ));
    assert!(q.is_empty());
    assert_eq!(
        q.schedule(T0, task(Category::Expiry, 0, 0)),
        Err(TimerError::Poisoned)
    );
    assert!(q.is_empty());
    assert!(!TimerError::Poisoned.is_caller_error());
}

#[test]
fn deferred_completions_leave_the_queue_at_once_and_keep_failures_harmless() {
    let mut q = queue(config());
    let ids: Vec<TaskId> = (0..4)
        .map(|i| q.schedule(T0, task(Category::Expiry, 2, i)).unwrap())
        .collect();
    let quarantined = q.schedule(T0, task(Category::Expiry, 2, 0)).unwrap();
    q.quarantine(&quarantined).unwrap();
    assert_eq!(q.poll_due(at(10), 10).unwrap().len(), 4);
    // Quarantined and unknown ids are skipped, as by complete_many.
    let mut asked = ids[..2].to_vec();
    asked.extend([quarantined, TaskId([0xEE; 16])]);
    assert_eq!(q.complete_many_deferred(&asked).unwrap(), 2);
    assert_eq!(q.len(), 3);
    assert!(!q.is_running(&ids[0]));
    assert!(q.is_running(&ids[2]));
    q.sync_completions().unwrap();
    // A store that fails the write: nothing changes in the queue, and it is poisoned.
    let mut store = take_store(q);
    store.fail_next_write();
    let mut q = TimerQueue::open(config(), store, ChaCha20Rng::seed_from_u64(2)).unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q.poll_due(at(10), 10).unwrap().len(), 2);
    assert!(matches!(
        q.complete_many_deferred(&ids[2..]),
        Err(TimerError::Storage(_))
    ));
    assert_eq!(q.len(), 3);
    assert!(q.is_running(&ids[2]));
    assert_eq!(
        q.complete_many_deferred(&ids[2..]),
        Err(TimerError::Poisoned)
    );
}

#[test]
fn purge_and_quarantine_by_admin() {
    let mut q = queue(config());
    let a = q.schedule(T0, task(Category::Expiry, 0, 0)).unwrap();
    q.schedule(T0, task(Category::Expiry, 0, 10)).unwrap();
    let m = q.schedule(T0, task(Category::Maintenance, 0, 0)).unwrap();
    q.quarantine(&m).unwrap();
    assert_eq!(
        q.quarantine(&m),
        Err(TimerError::WrongState("already quarantined"))
    );
    assert_eq!(
        q.release(&a),
        Err(TimerError::WrongState("not quarantined"))
    );
    let fired = q.poll_due(at(100), 10).unwrap();
    assert_eq!(fired.len(), 2, "the quarantined task does not fire");
    assert_eq!(q.purge(Category::Expiry).unwrap(), 2);
    assert_eq!(q.len(), 1);
    assert_eq!(q.complete(&a), Err(TimerError::NotFound));
    let stats = q.stats(at(100));
    assert_eq!(stats[&Category::Expiry], Default::default());
    assert_eq!(stats[&Category::Maintenance].quarantined, 1);
}

#[test]
fn a_chosen_id_is_stored_once_whatever_the_task_state() {
    let mut q = queue(QueueConfig {
        concurrency_max: 10,
        attempts_max: 1,
        ..QueueConfig::default()
    });
    let id = TaskId([0x42; 16]);
    let first = task(Category::DeferredSend, 5, 100);
    assert_eq!(
        q.schedule_with_id(T0, id, first.clone()),
        Ok(ScheduleOutcome::Scheduled)
    );
    assert_eq!(q.task(&id).unwrap().due_at, at(100));
    assert_eq!(q.payload(&id).unwrap(), first.payload);
    // Again with another due time and payload: nothing changes.
    let other = task(Category::DeferredSend, 1, 50);
    assert_eq!(
        q.schedule_with_id(T0, id, other.clone()),
        Ok(ScheduleOutcome::AlreadyScheduled)
    );
    assert_eq!(q.len(), 1);
    assert_eq!(q.task(&id).unwrap().due_at, at(100));
    assert_eq!(q.task(&id).unwrap().priority, 5);
    assert_eq!(q.store().len(), 1);
    // Running.
    let fired = q.poll_due(at(100), 10).unwrap();
    assert_eq!(fired[0].id, id);
    assert_eq!(fired[0].payload, first.payload);
    assert_eq!(
        q.schedule_with_id(at(100), id, other.clone()),
        Ok(ScheduleOutcome::AlreadyScheduled)
    );
    assert!(q.is_running(&id));
    // Quarantined (attempts_max = 1).
    assert_eq!(q.fail(at(101), &id), Ok(FailOutcome::Quarantined));
    assert_eq!(
        q.schedule_with_id(at(101), id, other.clone()),
        Ok(ScheduleOutcome::AlreadyScheduled)
    );
    // Gone: the id can be used again.
    q.cancel(&id).unwrap();
    assert_eq!(q.payload(&id), Err(TimerError::NotFound));
    assert_eq!(
        q.schedule_with_id(at(102), id, other.clone()),
        Ok(ScheduleOutcome::Scheduled)
    );
    assert_eq!(q.payload(&id).unwrap(), other.payload);
    // The chosen id survives a reopen.
    let store = take_store(q);
    let mut q = TimerQueue::open(config(), store, ChaCha20Rng::seed_from_u64(3)).unwrap();
    assert_eq!(
        q.schedule_with_id(at(103), id, first),
        Ok(ScheduleOutcome::AlreadyScheduled)
    );
    assert_eq!(q.payload(&id).unwrap(), other.payload);
}

#[test]
fn chosen_ids_keep_the_limits_and_group_commit() {
    let mut q = queue(QueueConfig {
        queue_tasks_max: 2,
        ..config()
    });
    let (a, b, c) = (TaskId([1; 16]), TaskId([2; 16]), TaskId([3; 16]));
    let results = q
        .schedule_many_with_ids(
            T0,
            vec![
                (a, task(Category::DeferredSend, 0, 0)),
                (a, task(Category::DeferredSend, 0, 1)),
                (b, task(Category::DeferredSend, 10, 0)),
                (b, task(Category::DeferredSend, 0, 2)),
                (c, task(Category::DeferredSend, 0, 3)),
            ],
        )
        .unwrap();
    assert_eq!(
        results,
        vec![
            Ok(ScheduleOutcome::Scheduled),
            Ok(ScheduleOutcome::AlreadyScheduled),
            Err(TimerError::PriorityOutOfRange(10)),
            Ok(ScheduleOutcome::Scheduled),
            Err(TimerError::QueueFull {
                category: "deferred_send",
                max: 2
            }),
        ]
    );
    assert_eq!(q.len(), 2);
    assert_eq!(q.task(&b).unwrap().due_at, at(2));
    // A full queue still answers for an id it holds.
    assert_eq!(
        q.schedule_with_id(T0, a, task(Category::DeferredSend, 0, 9)),
        Ok(ScheduleOutcome::AlreadyScheduled)
    );
    // A failed write accepts none of the batch.
    let mut store = MemoryStore::new();
    store.fail_next_write();
    let mut q = TimerQueue::open(config(), store, ChaCha20Rng::seed_from_u64(1)).unwrap();
    assert!(matches!(
        q.schedule_many_with_ids(
            T0,
            vec![
                (a, task(Category::DeferredSend, 0, 0)),
                (b, task(Category::DeferredSend, 0, 0))
            ]
        ),
        Err(TimerError::Storage(_))
    ));
    assert!(q.is_empty());
    assert!(q.task(&a).is_none());
}

proptest! {
    /// Stored task records decode or fail with a typed error, never panic; every record the
    /// encoder writes decodes back to itself.
    #[test]
    fn task_records_decode_safely(bytes in proptest::collection::vec(any::<u8>(), 0..100), p in 0u8..=9, due in any::<u64>(), attempts in any::<u32>()) {
        use whispr_timer_service::task::{TaskMeta, TaskState};
        if let Err(e) = TaskMeta::decode(&bytes) {
            prop_assert!(!e.is_caller_error());
        }
        let meta = TaskMeta {
            id: TaskId([3; 16]),
            category: Category::Maintenance,
            priority: p,
            due_at: UnixTime(due),
            created_at: UnixTime(due / 2),
            attempts,
            state: TaskState::Quarantined,
            payload_len: 17,
        };
        prop_assert_eq!(TaskMeta::decode(&meta.encode()).unwrap(), meta);
    }
}
