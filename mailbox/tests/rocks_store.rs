#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]
//! The [`MailboxStore`] contract, run against both [`MemoryStore`] and [`RocksStore`], and
//! the RocksDB-specific behaviour: durability across reopen, poisoning, statistics,
//! compaction after erasure, configuration.

use std::ops::ControlFlow;
use std::path::Path;

use whispr_mailbox::rocks::{RocksOptions, RocksStore};
use whispr_mailbox::store::{Cf, MailboxStore, MemoryStore, Op, StoreError};

fn put(cf: Cf, key: &[u8], value: &[u8]) -> Op {
    Op::Put {
        cf,
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn del(cf: Cf, key: &[u8]) -> Op {
    Op::Delete {
        cf,
        key: key.to_vec(),
    }
}

fn del_range(cf: Cf, from: &[u8], to: &[u8]) -> Op {
    Op::DeleteRange {
        cf,
        from: from.to_vec(),
        to: to.to_vec(),
    }
}

/// Every entry of `cf` in `from..to`, in the order `scan` gives them.
fn scan_all<S: MailboxStore>(s: &S, cf: Cf, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    s.scan(cf, from, to, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

fn keys<S: MailboxStore>(s: &S, cf: Cf, from: &[u8], to: &[u8]) -> Vec<Vec<u8>> {
    scan_all(s, cf, from, to)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn v(keys: &[&[u8]]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k.to_vec()).collect()
}

/// Everything the core relies on. `s` must be empty.
fn contract<S: MailboxStore>(s: &S) {
    assert!(!s.is_poisoned());
    for cf in Cf::ALL {
        assert_eq!(
            scan_all(s, cf, &[], &[0xFF; 8]),
            vec![],
            "{cf:?} starts empty"
        );
    }

    // --- put / get / overwrite / delete -------------------------------------------------
    assert_eq!(s.get(Cf::Mailboxes, b"a").unwrap(), None);
    s.write(vec![put(Cf::Mailboxes, b"a", b"1")], true).unwrap();
    assert_eq!(s.get(Cf::Mailboxes, b"a").unwrap(), Some(b"1".to_vec()));
    s.write(vec![put(Cf::Mailboxes, b"a", b"2")], false)
        .unwrap();
    assert_eq!(s.get(Cf::Mailboxes, b"a").unwrap(), Some(b"2".to_vec()));
    s.write(vec![del(Cf::Mailboxes, b"a")], true).unwrap();
    assert_eq!(s.get(Cf::Mailboxes, b"a").unwrap(), None);
    // Deleting a missing key is fine; an empty batch is fine.
    s.write(vec![del(Cf::Mailboxes, b"missing")], true).unwrap();
    s.write(vec![], true).unwrap();
    // Empty values and binary keys (0x00, 0xFF) are kept exactly.
    s.write(
        vec![
            put(Cf::Prekeys, &[0x00], b""),
            put(Cf::Prekeys, &[0xFF, 0x00, 0xFF], &[0u8; 300]),
        ],
        true,
    )
    .unwrap();
    assert_eq!(s.get(Cf::Prekeys, &[0x00]).unwrap(), Some(vec![]));
    assert_eq!(
        s.get(Cf::Prekeys, &[0xFF, 0x00, 0xFF]).unwrap(),
        Some(vec![0u8; 300])
    );
    s.write(
        vec![
            del(Cf::Prekeys, &[0x00]),
            del(Cf::Prekeys, &[0xFF, 0x00, 0xFF]),
        ],
        true,
    )
    .unwrap();

    // --- scan: order, bounds, Break ---------------------------------------------------------
    // Written out of order; big-endian timestamps as in the expiry index.
    let stamps: [u64; 6] = [300, 1, 256, 65_536, 2, 255];
    s.write(
        stamps
            .iter()
            .map(|t| put(Cf::Expiry, &t.to_be_bytes(), &t.to_le_bytes()))
            .collect(),
        true,
    )
    .unwrap();
    let all = scan_all(s, Cf::Expiry, &[], &[0xFF; 9]);
    let mut sorted = stamps.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        all,
        sorted
            .iter()
            .map(|t| (t.to_be_bytes().to_vec(), t.to_le_bytes().to_vec()))
            .collect::<Vec<_>>(),
        "scan yields every entry in key order with its value"
    );
    // `from` inclusive, `to` exclusive.
    let in_range: Vec<u64> = scan_all(s, Cf::Expiry, &2u64.to_be_bytes(), &300u64.to_be_bytes())
        .iter()
        .map(|(k, _)| u64::from_be_bytes(k.as_slice().try_into().unwrap()))
        .collect();
    assert_eq!(in_range, vec![2, 255, 256]);
    // Bounds that are not keys, shorter and longer than the keys.
    assert_eq!(
        keys(
            s,
            Cf::Expiry,
            &[0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 0, 1, 0, 0, 1]
        ),
        v(&[
            &256u64.to_be_bytes(),
            &300u64.to_be_bytes(),
            &65_536u64.to_be_bytes()
        ]),
        "keys sort bytewise: 255 is below the 7-byte bound, 65536 below the 9-byte one"
    );
    // Empty and inverted ranges call nothing.
    let mut calls = 0;
    for (from, to) in [
        (1u64.to_be_bytes(), 1u64.to_be_bytes()),
        (300u64.to_be_bytes(), 2u64.to_be_bytes()),
    ] {
        s.scan(Cf::Expiry, &from, &to, &mut |_, _| {
            calls += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    }
    assert_eq!(calls, 0);
    // Break stops the scan right away.
    let mut seen = Vec::new();
    s.scan(Cf::Expiry, &[], &[0xFF; 9], &mut |k, _| {
        seen.push(k.to_vec());
        if seen.len() == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(seen, v(&[&1u64.to_be_bytes(), &2u64.to_be_bytes()]));
    // A range past the last key is empty.
    assert!(keys(s, Cf::Expiry, &[0xFF], &[0xFF, 0xFF]).is_empty());
    s.write(vec![del_range(Cf::Expiry, &[], &[0xFF; 9])], true)
        .unwrap();
    assert!(keys(s, Cf::Expiry, &[], &[0xFF; 9]).is_empty());

    // --- DeleteRange: from inclusive, to exclusive -------------------------------------
    let sid = [7u8; 4];
    let env_key = |seq: u64| [sid.as_slice(), &seq.to_be_bytes()].concat();
    s.write(
        (0..10u64)
            .map(|seq| put(Cf::Envelopes, &env_key(seq), b"sealed"))
            .chain([
                put(Cf::Envelopes, &[6u8; 4], b"other mailbox before"),
                put(Cf::Envelopes, &[8u8; 4], b"other mailbox after"),
            ])
            .collect(),
        true,
    )
    .unwrap();
    s.write(
        vec![del_range(Cf::Envelopes, &env_key(2), &env_key(5))],
        true,
    )
    .unwrap();
    let left: Vec<Vec<u8>> = keys(s, Cf::Envelopes, &sid, &[8u8; 4]);
    assert_eq!(
        left,
        [0u64, 1, 5, 6, 7, 8, 9]
            .iter()
            .map(|seq| env_key(*seq))
            .collect::<Vec<_>>()
    );
    assert_eq!(s.get(Cf::Envelopes, &env_key(2)).unwrap(), None);
    assert_eq!(s.get(Cf::Envelopes, &env_key(4)).unwrap(), None);
    assert!(s.get(Cf::Envelopes, &env_key(5)).unwrap().is_some());
    // Empty and inverted ranges remove nothing (and are not errors).
    s.write(
        vec![
            del_range(Cf::Envelopes, &env_key(6), &env_key(6)),
            del_range(Cf::Envelopes, &env_key(9), &env_key(0)),
        ],
        true,
    )
    .unwrap();
    assert!(!s.is_poisoned());
    assert_eq!(keys(s, Cf::Envelopes, &sid, &[8u8; 4]).len(), 7);
    // A whole mailbox: `sid ‖ 00…` up to the next sid; neighbours are untouched.
    s.write(vec![del_range(Cf::Envelopes, &sid, &[7, 7, 7, 8])], true)
        .unwrap();
    assert!(keys(s, Cf::Envelopes, &sid, &[7, 7, 7, 8]).is_empty());
    assert_eq!(
        keys(s, Cf::Envelopes, &[], &[0xFF]),
        v(&[&[6u8; 4], &[8u8; 4]])
    );
    // A key written after a range delete is visible again.
    s.write(vec![put(Cf::Envelopes, &env_key(3), b"again")], true)
        .unwrap();
    assert_eq!(
        s.get(Cf::Envelopes, &env_key(3)).unwrap(),
        Some(b"again".to_vec())
    );

    // --- column families are separate ----------------------------------------------------
    s.write(
        Cf::ALL
            .iter()
            .map(|cf| put(*cf, b"shared", cf.name().as_bytes()))
            .collect(),
        true,
    )
    .unwrap();
    for cf in Cf::ALL {
        assert_eq!(
            s.get(cf, b"shared").unwrap(),
            Some(cf.name().as_bytes().to_vec())
        );
    }
    s.write(
        vec![
            del(Cf::Dedup, b"shared"),
            del_range(Cf::Prekeys, b"s", b"t"),
        ],
        true,
    )
    .unwrap();
    assert_eq!(s.get(Cf::Dedup, b"shared").unwrap(), None);
    assert_eq!(s.get(Cf::Prekeys, b"shared").unwrap(), None);
    for cf in [Cf::Mailboxes, Cf::Envelopes, Cf::Expiry] {
        assert_eq!(
            scan_all(s, cf, b"s", b"t"),
            vec![(b"shared".to_vec(), cf.name().as_bytes().to_vec())],
            "{cf:?} sees only its own entry"
        );
    }

    // --- a batch applies in order, as one ------------------------------------------------
    s.write(
        vec![
            put(Cf::Dedup, b"x1", b"first"),
            put(Cf::Dedup, b"x1", b"second"),
            put(Cf::Dedup, b"x2", b"gone"),
            del(Cf::Dedup, b"x2"),
            put(Cf::Dedup, b"x3", b"gone"),
            del_range(Cf::Dedup, b"x3", b"x4"),
            del_range(Cf::Dedup, b"y0", b"y9"),
            put(Cf::Dedup, b"y5", b"after the range delete"),
        ],
        true,
    )
    .unwrap();
    assert_eq!(
        scan_all(s, Cf::Dedup, b"x", b"z"),
        vec![
            (b"x1".to_vec(), b"second".to_vec()),
            (b"y5".to_vec(), b"after the range delete".to_vec()),
        ]
    );
    batches_are_atomic_to_readers(s);
    assert!(!s.is_poisoned());
}

/// A writer moves a balance between two keys in one batch per step (one key also moves in
/// and out of a range delete); concurrent scans and gets never see a half-applied batch.
fn batches_are_atomic_to_readers<S: MailboxStore>(s: &S) {
    const STEPS: u64 = 300;
    const TOTAL: u64 = 1_000;
    let value = |n: u64| n.to_be_bytes().to_vec();
    s.write(
        vec![
            put(Cf::Mailboxes, b"atomic/a", &value(TOTAL)),
            put(Cf::Mailboxes, b"atomic/b", &value(0)),
            put(Cf::Mailboxes, b"atomic/step", &value(0)),
        ],
        true,
    )
    .unwrap();
    let read = |k: &[u8], v: &[u8]| -> (Vec<u8>, u64) {
        (k.to_vec(), u64::from_be_bytes(v.try_into().unwrap()))
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for step in 1..=STEPS {
                let moved = step % TOTAL;
                let mut ops = vec![
                    put(Cf::Mailboxes, b"atomic/a", &value(TOTAL - moved)),
                    put(Cf::Mailboxes, b"atomic/b", &value(moved)),
                ];
                // Odd steps: the step key is removed by a range delete and then put back.
                if step % 2 == 1 {
                    ops.push(del_range(Cf::Mailboxes, b"atomic/s", b"atomic/t"));
                }
                ops.push(put(Cf::Mailboxes, b"atomic/step", &value(step)));
                s.write(ops, step % 3 == 0).unwrap();
            }
        });
        for _ in 0..2 {
            scope.spawn(|| {
                let mut last_step = 0;
                while last_step < STEPS {
                    let mut seen = Vec::new();
                    s.scan(Cf::Mailboxes, b"atomic/", b"atomic0", &mut |k, v| {
                        seen.push(read(k, v));
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                    assert_eq!(seen.len(), 3, "all three keys, never a half batch");
                    let [(_, a), (_, b), (_, step)] =
                        [&seen[0], &seen[1], &seen[2]].map(Clone::clone);
                    assert_eq!(a + b, TOTAL, "a scan sees whole batches");
                    assert_eq!(b, step % TOTAL, "a scan sees whole batches");
                    assert!(step >= last_step, "later scans never go back");
                    last_step = step;
                    std::thread::yield_now();
                }
            });
        }
    });
    s.write(vec![del_range(Cf::Mailboxes, b"atomic/", b"atomic0")], true)
        .unwrap();
}

/// A write that fails poisons the store: the failed batch left nothing behind, later writes
/// are refused with [`StoreError::Poisoned`], reads still work. `break_store` makes the next
/// write fail.
fn poisoning<S: MailboxStore>(s: &S, break_store: impl FnOnce(&S)) {
    s.write(vec![put(Cf::Mailboxes, b"kept", b"value")], true)
        .unwrap();
    break_store(s);
    let secret_key = b"SECRET-KEY-BYTES";
    let err = s
        .write(
            vec![
                put(Cf::Mailboxes, secret_key, b"SECRET-VALUE"),
                del(Cf::Mailboxes, b"kept"),
            ],
            true,
        )
        .unwrap_err();
    let StoreError::Backend(message) = &err else {
        panic!("expected a backend error, got {err:?}");
    };
    assert!(
        !message.contains("SECRET"),
        "no key or value in the message: {message}"
    );
    assert!(s.is_poisoned());
    // Nothing of the failed batch is visible.
    assert_eq!(s.get(Cf::Mailboxes, secret_key).unwrap(), None);
    assert_eq!(
        s.get(Cf::Mailboxes, b"kept").unwrap(),
        Some(b"value".to_vec())
    );
    // Every later write is refused, even an empty or unsynced one.
    for (ops, sync) in [
        (vec![put(Cf::Dedup, b"k", b"v")], true),
        (vec![del(Cf::Mailboxes, b"kept")], false),
        (vec![], true),
    ] {
        assert!(matches!(s.write(ops, sync), Err(StoreError::Poisoned)));
    }
    assert!(s.is_poisoned());
    assert_eq!(
        s.get(Cf::Mailboxes, b"kept").unwrap(),
        Some(b"value".to_vec())
    );
}

fn open(path: &Path) -> RocksStore {
    RocksStore::open(path, small_options()).unwrap()
}

/// Small buffers so that tests stay light.
fn small_options() -> RocksOptions {
    RocksOptions {
        write_buffer_bytes: 1 << 20,
        db_write_buffer_bytes: 4 << 20,
        block_cache_bytes: 1 << 20,
        ..RocksOptions::default()
    }
}

#[test]
fn memory_store_meets_the_contract() {
    contract(&MemoryStore::new());
}

#[test]
fn rocks_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    contract(&store);
    // Again once everything is in SST files rather than memtables.
    store.flush().unwrap();
    store.compact().unwrap();
    assert!(!store.is_poisoned());
}

#[test]
fn rocks_store_meets_the_contract_from_sst_files() {
    // The same checks with every write flushed right away: reads then merge SST files and
    // range tombstones from several levels instead of one memtable.
    struct Flushing(RocksStore);
    impl MailboxStore for Flushing {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(cf, key)
        }
        fn scan(
            &self,
            cf: Cf,
            from: &[u8],
            to: &[u8],
            f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
        ) -> Result<(), StoreError> {
            self.0.scan(cf, from, to, f)
        }
        fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
            self.0.write(ops, sync)?;
            self.0.flush()
        }
        fn is_poisoned(&self) -> bool {
            self.0.is_poisoned()
        }
    }
    let dir = tempfile::tempdir().unwrap();
    contract(&Flushing(open(dir.path())));
}

#[test]
fn memory_store_poisons_on_failed_write() {
    poisoning(&MemoryStore::new(), MemoryStore::fail_next_write);
}

#[test]
fn rocks_store_poisons_on_failed_write() {
    // A real RocksDB failure: the database directory disappears, so the next flush cannot
    // create its SST file; RocksDB records a background error and refuses every write from
    // then on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    poisoning(&store, |s| {
        std::fs::remove_dir_all(s.path()).unwrap();
        assert!(s.flush().is_err(), "flush into a deleted directory fails");
        assert!(!s.is_poisoned(), "only a failed write poisons");
    });
}

#[test]
fn rocks_store_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = open(&path);
        store
            .write(
                (0..100u32)
                    .map(|i| put(Cf::Envelopes, &i.to_be_bytes(), &[i as u8; 64]))
                    .chain([put(Cf::Mailboxes, b"m", b"record")])
                    .collect(),
                true,
            )
            .unwrap();
        // Half on disk in SST files, half only in the WAL.
        store.flush().unwrap();
        store
            .write(
                vec![
                    del_range(Cf::Envelopes, &10u32.to_be_bytes(), &90u32.to_be_bytes()),
                    del(Cf::Envelopes, &95u32.to_be_bytes()),
                    put(Cf::Expiry, &5u64.to_be_bytes(), b"x"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(store.path(), path);
    }
    let store = open(&path);
    assert!(!store.is_poisoned());
    let left: Vec<u32> = keys(&store, Cf::Envelopes, &[], &[0xFF; 5])
        .iter()
        .map(|k| u32::from_be_bytes(k.as_slice().try_into().unwrap()))
        .collect();
    let expected: Vec<u32> = (0..10).chain(90..95).chain(96..100).collect();
    assert_eq!(left, expected);
    assert_eq!(
        store.get(Cf::Envelopes, &3u32.to_be_bytes()).unwrap(),
        Some(vec![3u8; 64])
    );
    assert_eq!(
        store.get(Cf::Mailboxes, b"m").unwrap(),
        Some(b"record".to_vec())
    );
    assert_eq!(
        store.get(Cf::Expiry, &5u64.to_be_bytes()).unwrap(),
        Some(b"x".to_vec())
    );
    // Counters start again at the reopen.
    assert_eq!(store.stats().synced_writes, 0);
}

#[test]
fn rocks_store_stats_count_wal_and_sst_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let before = store.stats();
    assert_eq!(before.synced_writes, 0);
    assert_eq!(before.sst_bytes_live, 0);

    let value = vec![0xABu8; 4096];
    store
        .write(vec![put(Cf::Envelopes, b"k1", &value)], true)
        .unwrap();
    let after_sync = store.stats();
    assert_eq!(after_sync.synced_writes, 1);
    assert!(
        after_sync.wal_bytes_written >= before.wal_bytes_written + 4096,
        "{before:?} -> {after_sync:?}"
    );

    store
        .write(vec![put(Cf::Envelopes, b"k2", &value)], false)
        .unwrap();
    let after_unsynced = store.stats();
    assert_eq!(
        after_unsynced.synced_writes, 1,
        "unsynced writes are not counted"
    );
    assert!(after_unsynced.wal_bytes_written >= after_sync.wal_bytes_written + 4096);
    assert_eq!(after_unsynced.sst_bytes_written, 0, "nothing flushed yet");
    // Only the synced write is timed (whispr_mailbox_sync_seconds).
    let sync = store.sync_latency().unwrap().render("s", "h");
    assert!(sync.contains("s_count 1\n"), "{sync}");
    assert!(sync.contains("s_bucket{le=\"+Inf\"} 1\n"), "{sync}");

    store.flush().unwrap();
    let flushed = store.stats();
    assert!(flushed.sst_bytes_written >= 2 * 4096, "{flushed:?}");
    assert!(flushed.sst_bytes_live >= 2 * 4096, "{flushed:?}");
    assert_eq!(store.sst_bytes_live().unwrap(), flushed.sst_bytes_live);
    assert!(store.statistics().is_some());

    // Statistics off: the tickers read zero, the rest still works.
    let dir = tempfile::tempdir().unwrap();
    let quiet = RocksStore::open(
        dir.path(),
        RocksOptions {
            statistics: false,
            ..small_options()
        },
    )
    .unwrap();
    quiet.write(vec![put(Cf::Dedup, b"k", b"v")], true).unwrap();
    quiet.flush().unwrap();
    let stats = quiet.stats();
    assert_eq!(stats.wal_bytes_written, 0);
    assert_eq!(stats.sst_bytes_written, 0);
    assert_eq!(stats.synced_writes, 1);
    assert!(stats.sst_bytes_live > 0);
    assert!(quiet.statistics().is_none());
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            hits.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    hits
}

#[test]
fn rocks_store_compaction_drops_erased_data_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let secret = b"erase-me:0123456789abcdef0123456789abcdef";
    // The erased key record, and envelopes around others' data, spread over several SST
    // files and the memtable.
    store
        .write(
            vec![
                put(Cf::Mailboxes, b"sid-1/key", secret),
                put(Cf::Mailboxes, b"sid-2/key", b"someone else's key"),
            ],
            true,
        )
        .unwrap();
    store.flush().unwrap();
    for i in 0..50u32 {
        store
            .write(
                vec![
                    put(
                        Cf::Envelopes,
                        &[b"sid-1/".as_slice(), &i.to_be_bytes()].concat(),
                        secret,
                    ),
                    put(
                        Cf::Envelopes,
                        &[b"sid-2/".as_slice(), &i.to_be_bytes()].concat(),
                        b"kept",
                    ),
                ],
                true,
            )
            .unwrap();
        if i % 10 == 0 {
            store.flush().unwrap();
        }
    }
    assert!(!files_containing(dir.path(), secret).is_empty());
    let live_before = store.stats().sst_bytes_live;

    store
        .write(
            vec![
                del(Cf::Mailboxes, b"sid-1/key"),
                del_range(Cf::Envelopes, b"sid-1/", b"sid-10"),
            ],
            true,
        )
        .unwrap();
    store.compact().unwrap();

    assert_eq!(
        files_containing(dir.path(), secret),
        Vec::<String>::new(),
        "no SST or WAL file holds the erased bytes any more"
    );
    let stats = store.stats();
    assert!(
        stats.sst_bytes_live < live_before,
        "{live_before} -> {stats:?}"
    );
    assert!(stats.sst_bytes_written > 0);
    assert_eq!(
        keys(&store, Cf::Envelopes, b"sid-1/", b"sid-10"),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(keys(&store, Cf::Envelopes, b"sid-2/", b"sid-20").len(), 50);
    assert_eq!(
        store.get(Cf::Mailboxes, b"sid-2/key").unwrap(),
        Some(b"someone else's key".to_vec())
    );
}

#[test]
fn rocks_store_open_failure_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let err = RocksStore::open(&file, small_options()).unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    // The same directory cannot be opened twice (RocksDB's lock file).
    let db = dir.path().join("db");
    let _first = open(&db);
    assert!(matches!(
        RocksStore::open(&db, small_options()),
        Err(StoreError::Backend(_))
    ));
}

#[test]
fn rocks_options_from_toml() {
    let defaults: RocksOptions = toml::from_str("").unwrap();
    assert_eq!(defaults, RocksOptions::default());
    assert!(defaults.statistics);
    let tuned: RocksOptions =
        toml::from_str("block_cache_bytes = 1048576\nstatistics = false").unwrap();
    assert_eq!(
        tuned,
        RocksOptions {
            block_cache_bytes: 1 << 20,
            statistics: false,
            ..RocksOptions::default()
        }
    );
    assert!(toml::from_str::<RocksOptions>("block_cache = 1").is_err());
}

/// Security review 6756e3f, finding 15: expiry times are in clear on disk (the envelope
/// prefix, the dedup value, the expiry key), and without a sender's expiry they were
/// `arrival + retention` to the millisecond; an erased mailbox's keys stayed in the files
/// until a compaction, which the node never ran. Now expiry times are rounded up to
/// `expiry_granularity_ms`, and the node compacts the ranges of every erased mailbox.
#[test]
fn expiry_times_on_disk_do_not_give_arrival_times_and_an_erased_mailbox_leaves_no_key() {
    use rand::SeedableRng;
    use whispr_mailbox::config::CoreConfig;
    use whispr_mailbox::core::{Incoming, MailboxCore};
    use whispr_mailbox::crypto::MasterKey;
    use whispr_mailbox::testkit::Owner;
    use whispr_protocol::{DedupId, UnixTime};

    const RETENTION_MS: u64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let config = CoreConfig::default();
    let granularity = config.expiry_granularity_ms;
    let t0 = UnixTime(1_800_000_123_456);
    let mut core = MailboxCore::open(
        config,
        open(dir.path()),
        MasterKey::from_bytes(&[0x5a; 32]),
        rand_chacha::ChaCha20Rng::seed_from_u64(1),
        t0,
    )
    .unwrap();
    let owner = Owner::from_seed(1);
    core.create_mailbox(t0, owner.create_request(RETENTION_MS))
        .unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let dedup_ids = [DedupId([0xd1; 16]), DedupId([0xd2; 16])];
    let mut receipts = Vec::new();
    for (dedup, now) in dedup_ids.iter().zip([t0, UnixTime(t0.0 + 7)]) {
        let envelope = owner
            .envelope(&mut rng, *dedup, None, None, b"hello")
            .unwrap();
        let mut results = core.deposit_many(now, vec![Incoming::Deposit(envelope)]);
        receipts.push(results.remove(0).unwrap());
    }
    // Two deposits 7 ms apart: the same expiry time everywhere it is in clear.
    type Entry = (Vec<u8>, Vec<u8>);
    let times = |cf: Cf, at: fn(&Entry) -> &[u8]| -> Vec<u64> {
        scan_all(core.store(), cf, &[], &[0xff; 48])
            .iter()
            .map(|e| u64::from_be_bytes(at(e)[..8].try_into().unwrap()))
            .collect()
    };
    let expiry_keys = times(Cf::Expiry, |(k, _)| k);
    let envelope_prefixes = times(Cf::Envelopes, |(_, v)| v);
    let dedup_values = times(Cf::Dedup, |(_, v)| &v[8..]);
    for (what, t) in [
        ("expiry keys", &expiry_keys),
        ("envelope prefixes", &envelope_prefixes),
        ("dedup values", &dedup_values),
    ] {
        assert_eq!(t.len(), 2, "{what}");
        assert_eq!(t[0], t[1], "{what}: deposits 7 ms apart stored {t:?}");
    }
    // Later than the retention by less than the granularity, never earlier; acknowledged so.
    let expires_at = expiry_keys[0];
    assert_eq!(expires_at % granularity, 0);
    assert!(expires_at >= t0.0 + 7 + RETENTION_MS);
    assert!(expires_at < t0.0 + RETENTION_MS + granularity);
    assert!(receipts.iter().all(|r| r.expires_at.0 == expires_at));

    // Erased: only a compaction drops the keys from the files.
    let sid = scan_all(core.store(), Cf::Envelopes, &[], &[0xff; 48])[0].0[..16].to_vec();
    core.store().flush().unwrap();
    assert!(!files_containing(dir.path(), &sid).is_empty());
    core.erase(&owner.mailbox_id).unwrap();
    assert!(
        !files_containing(dir.path(), &sid).is_empty(),
        "the erased keys are still in the files before a compaction"
    );
    let ranges = core.take_compaction();
    assert!(!ranges.is_empty());
    core.store().compact_ranges(&ranges).unwrap();
    assert!(core.take_compaction().is_empty());
    // No SST or WAL file holds them; the MANIFEST still names the old files' first and last
    // keys in its version history until RocksDB rewrites it (at the next open).
    let needles = [sid.as_slice(), &[0xd1; 16], &[0xd2; 16]];
    for needle in needles {
        let left: Vec<String> = files_containing(dir.path(), needle)
            .into_iter()
            .filter(|f| !f.starts_with("MANIFEST-"))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "a file still holds a key");
    }
    drop(core);
    drop(open(dir.path()));
    for needle in needles {
        assert_eq!(
            files_containing(dir.path(), needle),
            Vec::<String>::new(),
            "after a reopen, a file still holds a key of the erased mailbox"
        );
    }
}

/// Issue 19 ("Mailbox: writes near the floor"): envelope bodies moved to their own column
/// family (blob files), the envelope entry keeps `expires_at ‖ length`. A node restarted on
/// a database written in the layout of before (the whole value in `envelopes`) serves those
/// messages, stores new ones in the new layout, deletes both kinds on acknowledgement and
/// expiry, and opens without reading a single body.
#[test]
fn old_layout_envelopes_stay_readable_and_open_reads_no_body() {
    use rand::SeedableRng;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use whispr_mailbox::config::CoreConfig;
    use whispr_mailbox::core::{Incoming, MailboxCore, StoredMessage};
    use whispr_mailbox::crypto::MasterKey;
    use whispr_mailbox::testkit::Owner;
    use whispr_protocol::{DedupId, UnixTime};

    let dir = tempfile::tempdir().unwrap();
    let master = || MasterKey::from_bytes(&[0x33; 32]);
    let t0 = UnixTime(1_800_000_000_000);
    let owner = Owner::from_seed(7);
    let device = owner.device(0).verifying_key().to_bytes();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
    let mut deposit = |core: &mut MailboxCore<_, _>, id: u8, expires: Option<UnixTime>| {
        let envelope = owner
            .envelope(&mut rng, DedupId([id; 16]), expires, None, &[id; 300])
            .unwrap();
        core.deposit_many(t0, vec![Incoming::Deposit(envelope)])
            .remove(0)
            .unwrap()
    };
    let open_core = |reads: &Arc<AtomicU64>| {
        MailboxCore::open(
            CoreConfig::default(),
            CountingStore::new(open(dir.path()), reads.clone()),
            master(),
            rand_chacha::ChaCha20Rng::seed_from_u64(1),
            t0,
        )
        .unwrap()
    };
    let fetch_all = |core: &MailboxCore<CountingStore, _>| -> Vec<StoredMessage> {
        core.fetch(t0, &owner.mailbox_id, &device, None, 100)
            .unwrap()
    };

    // An "old" node: three messages (one expiring early) in the layout of before.
    let reads = Arc::new(AtomicU64::new(0));
    let mut core = open_core(&reads);
    core.write_inline_bodies(true);
    core.create_mailbox(t0, owner.create_request(86_400_000))
        .unwrap();
    for id in 1..=2 {
        deposit(&mut core, id, None);
    }
    deposit(&mut core, 3, Some(UnixTime(t0.0 + 60_000)));
    let old_messages = fetch_all(&core);
    assert_eq!(old_messages.len(), 3);
    let envelopes = scan_all(core.store(), Cf::Envelopes, &[], &[0xff; 48]);
    assert!(envelopes.iter().all(|(_, v)| v.len() > 300), "old layout");
    assert!(scan_all(core.store(), Cf::Bodies, &[], &[0xff; 48]).is_empty());
    drop(core);

    // The new node on the same files: the old messages are served; new ones are stored
    // as a 32-byte entry (expiry, length, id) plus a body.
    let reads = Arc::new(AtomicU64::new(0));
    let mut core = open_core(&reads);
    assert_eq!(reads.load(Ordering::SeqCst), 0);
    assert_eq!(fetch_all(&core), old_messages);
    for id in 4..=5 {
        deposit(&mut core, id, None);
    }
    let messages = fetch_all(&core);
    assert_eq!(messages.len(), 5);
    assert_eq!(messages[..3], old_messages[..]);
    assert_eq!(
        messages.iter().map(|m| m.id[0]).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let envelopes = scan_all(core.store(), Cf::Envelopes, &[], &[0xff; 48]);
    assert_eq!(envelopes.iter().filter(|(_, v)| v.len() == 32).count(), 2);
    let bodies = scan_all(core.store(), Cf::Bodies, &[], &[0xff; 48]);
    assert_eq!(bodies.len(), 2);
    // Body keys do not carry the storage id (the envelope key's first 16 bytes).
    let sid = &envelopes[0].0[..16];
    assert!(bodies.iter().all(|(k, _)| !k.starts_with(sid)));
    let bytes_before = core.info(&owner.mailbox_id).unwrap();
    drop(core);

    // Reopened (WAL replayed, then from SST and blob files): no body is read to open, and
    // the same messages are served.
    for flush in [false, true] {
        let reads = Arc::new(AtomicU64::new(0));
        let core = open_core(&reads);
        assert_eq!(reads.load(Ordering::SeqCst), 0, "open read a body");
        assert_eq!(fetch_all(&core), messages);
        assert_eq!(reads.load(Ordering::SeqCst), 2, "served the two new bodies");
        assert_eq!(
            format!("{:?}", core.info(&owner.mailbox_id).unwrap()),
            format!("{bytes_before:?}")
        );
        if flush {
            core.store().inner.flush().unwrap();
        }
    }

    // Expiry of an old-layout message, then acknowledgement of both kinds: nothing left.
    let reads = Arc::new(AtomicU64::new(0));
    let mut core = open_core(&reads);
    assert_eq!(core.sweep_expired(UnixTime(t0.0 + 60_000)).unwrap(), 1);
    let ids: Vec<u8> = fetch_all(&core).iter().map(|m| m.id[0]).collect();
    assert_eq!(ids, [1, 2, 4, 5]);
    core.ack(&owner.mailbox_id, &device, 4).unwrap();
    assert_eq!(fetch_all(&core).len(), 1);
    assert_eq!(
        scan_all(core.store(), Cf::Envelopes, &[], &[0xff; 48]).len(),
        1
    );
    assert_eq!(
        scan_all(core.store(), Cf::Bodies, &[], &[0xff; 48]).len(),
        1
    );
    core.ack(&owner.mailbox_id, &device, 5).unwrap();
    assert!(scan_all(core.store(), Cf::Envelopes, &[], &[0xff; 48]).is_empty());
    assert!(scan_all(core.store(), Cf::Bodies, &[], &[0xff; 48]).is_empty());
}

/// A [`RocksStore`] that counts the envelope bodies read ([`Cf::Bodies`], by `get` or in a
/// scan) and the entries scanned per column family, and can refuse writes after a given
/// number (to stop an erasure between its two writes, as a crash would).
struct CountingStore {
    inner: RocksStore,
    body_reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    scanned: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<Cf, u64>>>,
    writes_left: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingStore {
    /// Counts into `body_reads`; never refuses a write.
    fn new(inner: RocksStore, body_reads: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        CountingStore {
            inner,
            body_reads,
            scanned: std::sync::Arc::default(),
            writes_left: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
        }
    }

    fn scanned(&self, cf: Cf) -> u64 {
        self.scanned.lock().unwrap().get(&cf).copied().unwrap_or(0)
    }
}

impl MailboxStore for CountingStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if cf == Cf::Bodies {
            self.body_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.get(cf, key)
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut n = 0u64;
        let result = self.inner.scan(cf, from, to, &mut |k, v| {
            n += 1;
            f(k, v)
        });
        *self.scanned.lock().unwrap().entry(cf).or_default() += n;
        if cf == Cf::Bodies {
            self.body_reads
                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }

    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(StoreError::Backend("simulated crash".into()));
        }
        self.inner.write(ops, sync)
    }

    fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }
}

/// Issue 19 ("restart with 1M stored messages serving reads in < 1 s"): start-up reads only
/// the mailbox records (no envelope or dedup entry); each mailbox reads its own entries at
/// its first access. A mailbox not touched since the start is served as before, dedup holds
/// across the restart for it (a redelivery of a stored or of an acknowledged and deleted
/// message is not stored again, sequence numbers are not reused), and its messages expire
/// on time.
#[test]
fn restart_loads_each_mailbox_at_first_access() {
    use rand::SeedableRng;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use whispr_mailbox::config::CoreConfig;
    use whispr_mailbox::core::{Incoming, MailboxCore, StoredMessage};
    use whispr_mailbox::crypto::MasterKey;
    use whispr_mailbox::testkit::Owner;
    use whispr_protocol::{DedupId, UnixTime};

    let dir = tempfile::tempdir().unwrap();
    let t0 = UnixTime(1_800_000_000_000);
    let owners: Vec<Owner> = (20..23).map(Owner::from_seed).collect();
    let device = |o: &Owner| o.device(0).verifying_key().to_bytes();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let mut deposit =
        |core: &mut MailboxCore<_, _>, o: &Owner, now: UnixTime, id: u8, exp: Option<UnixTime>| {
            let envelope = o
                .envelope(&mut rng, DedupId([id; 16]), exp, None, &[id; 200])
                .unwrap();
            core.deposit_many(now, vec![Incoming::Deposit(envelope)])
                .remove(0)
                .unwrap()
        };
    let open_core = |now: UnixTime, writes: u64| {
        let store = CountingStore {
            writes_left: Arc::new(AtomicU64::new(writes)),
            ..CountingStore::new(open(dir.path()), Arc::default())
        };
        MailboxCore::open(
            CoreConfig::default(),
            store,
            MasterKey::from_bytes(&[0x44; 32]),
            rand_chacha::ChaCha20Rng::seed_from_u64(2),
            now,
        )
        .unwrap()
    };
    let fetch_all = |core: &MailboxCore<CountingStore, _>, o: &Owner, now: UnixTime| {
        core.fetch(now, &o.mailbox_id, &device(o), None, 100)
            .unwrap()
    };

    // Mailbox 0: 5 messages, the first 2 acknowledged (deleted; their dedup entries stay).
    // Mailbox 1: 3 messages. Mailbox 2: 2 messages expiring at t0 + 60 s, 1 kept.
    let mut core = open_core(t0, u64::MAX);
    for o in &owners {
        core.create_mailbox(t0, o.create_request(86_400_000))
            .unwrap();
    }
    for id in 1..=5 {
        deposit(&mut core, &owners[0], t0, id, None);
    }
    core.ack(&owners[0].mailbox_id, &device(&owners[0]), 2)
        .unwrap();
    for id in 1..=3 {
        deposit(&mut core, &owners[1], t0, id, None);
    }
    let soon = Some(UnixTime(t0.0 + 60_000));
    deposit(&mut core, &owners[2], t0, 1, soon);
    deposit(&mut core, &owners[2], t0, 2, soon);
    deposit(&mut core, &owners[2], t0, 3, None);
    let before: Vec<Vec<StoredMessage>> = owners.iter().map(|o| fetch_all(&core, o, t0)).collect();
    assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3]);
    let infos: Vec<String> = owners
        .iter()
        .map(|o| format!("{:?}", core.info(&o.mailbox_id).unwrap()))
        .collect();
    let stats = core.stats();
    assert_eq!((stats.messages, stats.mailboxes_unloaded), (9, 0));
    drop(core);

    // Restart: nothing but the records is read; no mailbox is loaded.
    let mut core = open_core(t0, u64::MAX);
    assert_eq!(
        core.store().scanned(Cf::Envelopes),
        0,
        "open walked envelopes"
    );
    assert_eq!(
        core.store().scanned(Cf::Dedup),
        0,
        "open walked dedup entries"
    );
    assert_eq!(core.stats().mailboxes_unloaded, 3);
    assert_eq!(
        core.stats().messages,
        0,
        "unloaded mailboxes are not counted"
    );
    // Read-only calls serve an unloaded mailbox as before (from the store) without
    // loading it.
    for (o, (msgs, info)) in owners.iter().zip(before.iter().zip(&infos)) {
        assert_eq!(&fetch_all(&core, o, t0), msgs);
        assert_eq!(&format!("{:?}", core.info(&o.mailbox_id).unwrap()), info);
    }
    assert_eq!(core.last_seq(&owners[0].mailbox_id).unwrap(), 5);
    assert_eq!(core.stats().mailboxes_unloaded, 3);
    let dedup_scanned = core.store().scanned(Cf::Dedup);
    // Dedup across the restart, mailbox 0 loaded by the deposit itself: a redelivery of a
    // stored message and of an acknowledged (deleted) one are receipts of the old sequence
    // numbers, stored once; a new message takes the next number.
    let again = deposit(&mut core, &owners[0], t0, 4, None);
    assert!(again.duplicate);
    assert_eq!(again.seq, 4);
    let acked = deposit(&mut core, &owners[0], t0, 1, None);
    assert!(acked.duplicate);
    assert_eq!(acked.seq, 1);
    assert_eq!(core.stats().mailboxes_unloaded, 2);
    let new = deposit(&mut core, &owners[0], t0, 6, None);
    assert!(!new.duplicate);
    assert_eq!(new.seq, 6);
    let ids: Vec<u8> = fetch_all(&core, &owners[0], t0)
        .iter()
        .map(|m| m.id[0])
        .collect();
    assert_eq!(ids, [3, 4, 5, 6]);
    // Loading mailbox 0 read only its own 5 dedup entries, once.
    assert_eq!(core.store().scanned(Cf::Dedup) - dedup_scanned, 5);
    // Mailbox 2, never touched: its two messages expire on time, unloaded.
    assert_eq!(core.sweep_expired(UnixTime(t0.0 + 60_000)).unwrap(), 2);
    assert_eq!(core.stats().mailboxes_unloaded, 2);
    drop(core);

    // Another restart, after the expiry: mailbox 2's sequence numbers are not reused (its
    // floor was written by the sweep), the kept message is served, the expired are gone.
    let later = UnixTime(t0.0 + 61_000);
    let mut core = open_core(later, u64::MAX);
    assert_eq!(core.last_seq(&owners[2].mailbox_id).unwrap(), 3);
    let kept: Vec<u8> = fetch_all(&core, &owners[2], later)
        .iter()
        .map(|m| m.id[0])
        .collect();
    assert_eq!(kept, [3]);
    let redelivered = deposit(&mut core, &owners[2], later, 1, None);
    assert!(!redelivered.duplicate, "its dedup entry expired with it");
    assert_eq!(redelivered.seq, 4);
    // Mailbox 1 is still served as before; the background load (`load_some`) loads the
    // rest, after which the counters are exact again.
    assert_eq!(fetch_all(&core, &owners[1], later), before[1]);
    while core.load_some(1).unwrap() > 0 {}
    let stats = core.stats();
    assert_eq!((stats.messages, stats.mailboxes_unloaded), (9, 0));
    drop(core);

    // An erasure stopped between its two writes (the record gone, the rest not yet): the
    // next start finishes it, although it reads no envelope entry.
    let mut core = open_core(later, 1);
    assert!(core.erase(&owners[1].mailbox_id).is_err());
    drop(core);
    let core = open_core(later, u64::MAX);
    assert!(core.info(&owners[1].mailbox_id).is_err());
    let sid_prefix = |cf: Cf| {
        let envelopes = scan_all(core.store(), cf, &[], &[0xff; 48]);
        envelopes.len()
    };
    // Mailboxes 0 (4 messages) and 2 (2) remain; mailbox 1's 3 envelopes are gone.
    assert_eq!(sid_prefix(Cf::Envelopes), 6);
    assert_eq!(sid_prefix(Cf::Dedup), 6 + 2);
}
