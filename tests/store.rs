//! The sled event log: order, index, intake keys, subscriptions, durability
//! with group commit, checkpoints, and damaged records.

mod common;

use std::sync::Arc;

use chrono::Utc;
use easel::domain::{ChatId, Event, Limits, RequestId};
use easel::engine::{Admitted, Core};
use easel::store::{EventStore, NewEvent, ReadError, SledStore, StoreError};

fn queued(update: u32) -> NewEvent {
    let r = common::request("flux", i64::from(update), "a fox");
    let mut r = r;
    r.origin.update_id = Some(update);
    r.origin.message_id = Some(update as i32);
    NewEvent {
        request_id: RequestId::random(),
        at: Utc::now(),
        event: r.into_queued(),
    }
}

#[tokio::test]
async fn appends_get_strictly_increasing_seqs_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    assert_eq!(store.last_seq(), 0);
    let mut rx = store.subscribe();
    let a = store.append(vec![queued(1), queued(2)]).unwrap();
    let b = store.append(vec![queued(3)]).unwrap();
    assert_eq!(
        a.iter().chain(&b).map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Subscribers see the new last seq without polling.
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 3);

    let from2: Vec<u64> = store.read_from(2).map(|r| r.unwrap().seq).collect();
    assert_eq!(from2, vec![2, 3]);
    // Index by request and the intake keys.
    let of_first = store.events_of(a[0].request_id).unwrap();
    assert_eq!(of_first.len(), 1);
    assert_eq!(of_first[0].as_ref().unwrap(), &a[0]);
    assert_eq!(store.find_update(2).unwrap(), Some(a[1].request_id));
    assert_eq!(
        store.find_message(ChatId(3), 3).unwrap(),
        Some(b[0].request_id)
    );
    assert_eq!(store.find_update(99).unwrap(), None);

    store.wait_durable(3).await.unwrap();
    drop(store);
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    assert_eq!(store.last_seq(), 3);
    assert_eq!(store.append(vec![queued(4)]).unwrap()[0].seq, 4);
}

#[tokio::test]
async fn durability_waits_share_one_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("log")).unwrap());
    // 64 acceptances written, then 64 concurrent waits: the flusher reads the
    // highest written seq before its fsync, so one flush serves them all
    // (a second may start if a waiter arrives mid-flush).
    let recs: Vec<u64> = (0..64)
        .map(|i| store.append(vec![queued(i)]).unwrap()[0].seq)
        .collect();
    let before = store.flush_count();
    let waits = recs.into_iter().map(|seq| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.wait_durable(seq).await })
    });
    for w in waits {
        w.await.unwrap().unwrap();
    }
    let flushes = store.flush_count() - before;
    assert!(
        (1..=2).contains(&flushes),
        "64 waits took {flushes} flushes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_acceptances_all_land_with_fewer_flushes_than_appends() {
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(
        Core::open(
            SledStore::open(&dir.path().join("log")).unwrap(),
            common::clock(),
        )
        .unwrap()
        .0,
    );
    let limits = Limits {
        max_pending: 1000,
        rate: easel::domain::RateLimit {
            count: 1000,
            window_secs: 60,
        },
    };
    let before = core.store().flush_count();
    let tasks: Vec<_> = (0..64)
        .map(|u| {
            let core = Arc::clone(&core);
            tokio::spawn(async move {
                core.accept(common::request("flux", u, "a fox"), &limits)
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Admitted::Queued { id, .. } => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    let flushes = core.store().flush_count() - before;
    assert!(flushes < 64, "64 acceptances cost {flushes} flushes");
    // FIFO positions are a permutation 1..=64.
    let mut positions: Vec<usize> = ids
        .iter()
        .map(|id| core.read(|s| s.position(*id).unwrap()))
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, (1..=64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_damaged_record_is_reported_with_its_seq_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let limits = Limits {
        max_pending: 10,
        ..Limits::default()
    };
    let mut ids = Vec::new();
    {
        let core = common::open_core(dir.path(), Arc::clone(&clock));
        for u in 1..=4 {
            let Admitted::Queued { id, .. } = core
                .accept(common::request("flux", u, "p"), &limits)
                .await
                .unwrap()
            else {
                panic!()
            };
            ids.push(id);
        }
        // A torn record (cut short) and an undecodable one.
        let good = easel::store::codec::encode(&core.store().read_from(2).next().unwrap().unwrap())
            .unwrap();
        core.store()
            .raw_insert_for_tests(2, &good[..good.len() / 2])
            .unwrap();
        core.store()
            .raw_insert_for_tests(
                3,
                &easel::store::codec::seal(b"{\"v\":1,\"nonsense\":true}").unwrap(),
            )
            .unwrap();
    }
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    let items: Vec<_> = store.read_from(1).collect();
    assert_eq!(items.len(), 4);
    assert!(items[0].is_ok() && items[3].is_ok());
    match (&items[1], &items[2]) {
        (Err(ReadError::Corrupt(a)), Err(ReadError::Corrupt(b))) => {
            assert_eq!((a.seq, b.seq), (2, 3));
            assert!(a.reason.to_string().contains("checksum"), "{}", a.reason);
        }
        other => panic!("{other:?}"),
    }
    // The core opens, reports both, and keeps everything else.
    let (core, report) = Core::open(store, clock).unwrap();
    assert_eq!(
        report.corrupt.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(core.read(|s| s.request(ids[0]).is_some() && s.request(ids[3]).is_some()));
    assert!(core.read(|s| s.request(ids[1]).is_none()));
    // New appends continue after the damaged ones.
    let Admitted::Queued { seq, .. } = core
        .accept(common::request("flux", 9, "p"), &limits)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(seq, 5);
}

#[tokio::test]
async fn start_up_uses_the_checkpoint_and_replays_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let limits = Limits {
        max_pending: 1000,
        rate: easel::domain::RateLimit {
            count: 1000,
            window_secs: 60,
        },
    };
    let live = {
        let store = SledStore::open(&dir.path().join("log")).unwrap();
        let (core, _) = Core::open_with(store, Arc::clone(&clock) as _, 10).unwrap();
        for u in 0..25 {
            core.accept(common::request("sdxl", u, "p"), &limits)
                .await
                .unwrap();
        }
        core.snapshot()
    };
    let (core, report) = Core::open_with(
        SledStore::open(&dir.path().join("log")).unwrap(),
        Arc::clone(&clock) as _,
        10,
    )
    .unwrap();
    let cp = report.checkpoint_seq.expect("a checkpoint was used");
    assert!(cp >= 20, "checkpoint at {cp}");
    assert_eq!(report.tail_events, 25 - cp);
    assert_eq!(core.snapshot(), live);

    // A damaged checkpoint falls back to a full replay with the same result.
    core.store().save_checkpoint(25, b"not json").unwrap();
    let (state, report) = core.rebuild_from_checkpoint().unwrap();
    assert!(report.checkpoint_problem.is_some());
    assert_eq!(report.tail_events, 25);
    assert_eq!(state, live);
}

#[tokio::test]
async fn a_redelivered_update_never_makes_a_second_request() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let limits = Limits::default();
    let req = common::request("flux", 5, "a fox");
    let first = {
        let core = common::open_core(dir.path(), Arc::clone(&clock));
        let Admitted::Queued { id, .. } = core.accept(req.clone(), &limits).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            core.accept(req.clone(), &limits).await.unwrap(),
            Admitted::Duplicate { id }
        );
        id
    };
    // After a restart too, by update id and by chat + message id.
    let core = common::open_core(dir.path(), clock);
    assert_eq!(
        core.accept(req.clone(), &limits).await.unwrap(),
        Admitted::Duplicate { id: first }
    );
    let mut same_message = req;
    same_message.origin.update_id = Some(4_000_000);
    assert_eq!(
        core.accept(same_message, &limits).await.unwrap(),
        Admitted::Duplicate { id: first }
    );
    assert_eq!(core.store().last_seq(), 1);
}

/// Start-up reads the checkpoint and a tail bounded by the checkpoint
/// interval, whatever the history: finished requests leave no live state.
#[tokio::test]
async fn start_up_work_does_not_grow_with_finished_history() {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let limits = Limits {
        max_pending: 10,
        rate: easel::domain::RateLimit {
            count: 100_000,
            window_secs: 60,
        },
    };
    {
        let (core, _) = Core::open_with(
            SledStore::open(&dir.path().join("log")).unwrap(),
            Arc::clone(&clock) as _,
            100,
        )
        .unwrap();
        for u in 0..1500 {
            let Admitted::Queued { id, .. } = core
                .accept(common::request("flux", u % 7, "p"), &limits)
                .await
                .unwrap()
            else {
                panic!()
            };
            core.execute(id, easel::domain::Command::Cancel)
                .await
                .unwrap();
        }
        assert_eq!(core.store().last_seq(), 3000);
    }
    let (core, report) = Core::open_with(
        SledStore::open(&dir.path().join("log")).unwrap(),
        clock,
        100,
    )
    .unwrap();
    assert!(report.checkpoint_seq.is_some());
    assert!(
        report.tail_events < 100,
        "replayed {} events at start",
        report.tail_events
    );
    assert_eq!(core.read(|s| s.requests().count()), 0);
    // What is left is bounded by users, not by history: at most 256 recent
    // acceptance times per user (the rate-limit memory), empty queues.
    for u in 0..7 {
        let load = core
            .read(|s| s.user(easel::domain::UserId(u)).cloned())
            .unwrap();
        assert_eq!(load.pending, 0);
        assert!(load.recent.len() <= easel::domain::admission::MAX_RECENT_PER_USER);
    }
    assert!(core.read(|s| {
        s.lanes()
            .all(|(_, l)| l.queue.is_empty() && l.in_flight.is_none())
    }));
}

/// Forgetting requests removes their events and every key naming them
/// (intake keys only while they still name that request), atomically with
/// a meta value; the rest of the log is untouched.
#[tokio::test]
async fn forgetting_requests_removes_them_and_their_keys_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    let a = store.append(vec![queued(1)]).unwrap()[0].clone();
    let b = store.append(vec![queued(2)]).unwrap()[0].clone();
    store
        .append(vec![NewEvent {
            request_id: a.request_id,
            at: Utc::now(),
            event: Event::Cancelled,
        }])
        .unwrap();
    let gone = store
        .forget_requests(&[a.request_id], "retention/files", &[7])
        .unwrap();
    assert_eq!(gone, 2);
    assert!(store.events_of(a.request_id).unwrap().is_empty());
    assert_eq!(store.find_update(1).unwrap(), None);
    assert_eq!(store.find_message(ChatId(1), 1).unwrap(), None);
    assert_eq!(store.find_update(2).unwrap(), Some(b.request_id));
    let left: Vec<u64> = store.read_from(1).map(|r| r.unwrap().seq).collect();
    assert_eq!(left, vec![b.seq]);
    assert_eq!(store.get_meta("retention/files").unwrap(), Some(vec![7]));
    // New appends continue the sequence.
    assert_eq!(store.append(vec![queued(3)]).unwrap()[0].seq, 4);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `compact` rewrites the log into a fresh database with the same keys;
/// a compaction a crash interrupted is finished at the next open.
#[tokio::test]
async fn compaction_keeps_every_key_and_survives_an_interruption() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("log");
    let store = SledStore::open(&log).unwrap();
    let recs: Vec<_> = (1..=200)
        .map(|u| store.append(vec![queued(u)]).unwrap()[0].clone())
        .collect();
    let ids: Vec<RequestId> = recs[..150].iter().map(|r| r.request_id).collect();
    store
        .forget_requests(&ids, "retention/files", &[1])
        .unwrap();
    drop(store);
    let report = SledStore::compact(&log).unwrap();
    assert!(report.keys > 0);
    assert!(!root.path().join("log.compact").exists());
    assert!(!root.path().join("log.old").exists());
    let store = SledStore::open(&log).unwrap();
    let left: Vec<_> = store.read_from(1).map(|r| r.unwrap()).collect();
    assert_eq!(left, recs[150..].to_vec());
    assert_eq!(store.find_update(199).unwrap(), Some(recs[198].request_id));
    assert_eq!(store.last_seq(), 200);
    drop(store);

    // A crash after the old log stepped aside: the finished copy wins.
    let copy = root.path().join("log.compact");
    copy_dir(&log, &copy);
    std::fs::rename(&log, root.path().join("log.old")).unwrap();
    let store = SledStore::open(&log).unwrap();
    assert_eq!(store.read_from(1).count(), 50);
    assert!(!copy.exists() && !root.path().join("log.old").exists());
    drop(store);
    // A crash while copying: the log is in place, the copy is dropped.
    copy_dir(&log, &copy);
    let store = SledStore::open(&log).unwrap();
    assert_eq!(store.read_from(1).count(), 50);
    assert!(!copy.exists());
}

/// Each key of an append is its own sled insert, the event first: a crash
/// that keeps an event but not its index and intake keys is repaired when
/// the log opens, so a redelivered update still finds its request.
#[tokio::test]
async fn keys_a_crash_left_out_are_re_derived_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    store.append(vec![queued(1)]).unwrap();
    let mut orphan = queued(2);
    orphan.at = Utc::now();
    let rec = easel::store::Recorded {
        seq: 2,
        request_id: orphan.request_id,
        at: orphan.at,
        event: orphan.event,
    };
    // The event as a crash right after its insert leaves it: no other key.
    store
        .raw_insert_for_tests(2, &easel::store::codec::encode(&rec).unwrap())
        .unwrap();
    assert_eq!(store.find_update(2).unwrap(), None);
    drop(store);
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    assert_eq!(store.find_update(2).unwrap(), Some(rec.request_id));
    assert_eq!(
        store.find_message(ChatId(2), 2).unwrap(),
        Some(rec.request_id)
    );
    assert_eq!(store.events_of(rec.request_id).unwrap().len(), 1);
    assert!(
        store
            .request_ids(Some(easel::domain::UserId(2)), None, None, false)
            .any(|id| id.unwrap() == rec.request_id)
    );
    assert_eq!(store.last_seq(), 2);
    assert_eq!(store.append(vec![queued(3)]).unwrap()[0].seq, 3);
}

/// The log's lock is taken before anything in or beside the log folder is
/// touched: while a compaction holds it (here: its lock and a half-written
/// copy), an open neither tidies the copy away nor opens the log, and a
/// second compaction is refused; nothing is lost.
#[tokio::test]
async fn nothing_tidies_or_compacts_while_another_process_owns_the_log() {
    use easel::store::StoreError;
    use easel::store::disk::DirLock;
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("log");
    let store = SledStore::open(&log).unwrap();
    for u in 1..=20 {
        store.append(vec![queued(u)]).unwrap();
    }
    drop(store);
    let held = DirLock::acquire(&log, std::time::Duration::ZERO).unwrap();
    let copy = root.path().join("log.compact");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::write(copy.join("db"), b"a compaction is writing this").unwrap();
    let opened = SledStore::open_with_wait(&log, std::time::Duration::from_millis(50));
    assert!(
        matches!(opened, Err(StoreError::InUse(_))),
        "opened beside a compaction: {:?}",
        opened.err()
    );
    assert!(
        copy.join("db").exists(),
        "the running compaction's copy was deleted"
    );
    assert!(matches!(
        SledStore::compact(&log),
        Err(StoreError::InUse(_))
    ));
    drop(held);
    // Its owner gone (as after a crash), the next open tidies up.
    let store = SledStore::open(&log).unwrap();
    assert!(!copy.exists());
    assert_eq!(store.read_from(1).count(), 20);
    // A compaction beside an open log is refused at once and touches nothing.
    assert!(matches!(
        SledStore::compact(&log),
        Err(StoreError::InUse(_))
    ));
    assert_eq!(store.read_from(1).count(), 20);
}

/// `easel compact` raced by opens (a supervisor starting `easel run`, an
/// `easel audit` on the stopped dir), for real: whichever wins, every event
/// is there afterwards, and nothing else is left beside the log.
#[test]
fn a_compaction_raced_by_opens_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("log");
    let store = SledStore::open(&log).unwrap();
    let n = 3000;
    for u in 1..=n {
        store.append(vec![queued(u)]).unwrap();
    }
    drop(store);
    for _ in 0..3 {
        let compactor = {
            let log = log.clone();
            std::thread::spawn(move || SledStore::compact(&log).map(|_| ()))
        };
        let mut opened = 0;
        while !compactor.is_finished() {
            if let Ok(s) = SledStore::open_with_wait(&log, std::time::Duration::ZERO) {
                assert_eq!(s.read_from(1).count(), n as usize);
                opened += 1;
            }
        }
        // Refused (an open held the log) or done: either way, all is there.
        let _ = compactor.join().unwrap();
        let _ = opened;
        let store = SledStore::open(&log).unwrap();
        assert_eq!(store.read_from(1).count(), n as usize);
        assert_eq!(store.last_seq(), u64::from(n));
        drop(store);
    }
    let mut left: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["log", "log.lock"]);
}

/// Sequence numbers never repeat: after retention removed every event and
/// the log was reopened, the next event continues above the highest seq
/// the log ever held (the archive has those).
#[tokio::test]
async fn seqs_continue_after_retention_emptied_the_log_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    let recs: Vec<_> = (1..=5)
        .map(|u| store.append(vec![queued(u)]).unwrap()[0].clone())
        .collect();
    let ids: Vec<RequestId> = recs.iter().map(|r| r.request_id).collect();
    store
        .forget_requests(&ids, "retention/files", &[1])
        .unwrap();
    assert_eq!(store.read_from(1).count(), 0);
    drop(store);
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    assert_eq!(store.last_seq(), 5);
    assert_eq!(store.append(vec![queued(6)]).unwrap()[0].seq, 6);
}

/// Terminal is forever: a checkpoint written while a request was queued,
/// then the request finished, then retention archived it, then the bot
/// stopped without a newer checkpoint (a kill): the next start must not
/// take that checkpoint, or the archived request would run again.
#[tokio::test]
async fn an_old_checkpoint_never_resurrects_an_archived_request() {
    use common::{RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
    use easel::engine::{ImageStore, Runner, StepOutcome};
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let core = Arc::new(common::open_core(dir.path(), clock.clone()));
    let Admitted::Queued { id, .. } = core
        .accept(common::request("flux", 7, "a fox"), &Limits::default())
        .await
        .unwrap()
    else {
        panic!("not queued")
    };
    core.checkpoint().unwrap();
    let images = tempfile::tempdir().unwrap();
    let runner = Runner::new(
        Arc::clone(&core),
        common::model("flux"),
        Arc::new(UpperEnhancer),
        Arc::new(ScriptedGenerator::default()),
        Arc::new(RecordingDeliverer::default()),
        Arc::new(ImageStore::open(images.path()).unwrap()),
    );
    while let StepOutcome::Progressed { .. } = runner.try_execute_step().await.unwrap() {}
    assert!(core.read(|s| s.request(id).is_none()), "not finished");
    core.store()
        .forget_requests(&[id], "retention/files", &[1])
        .unwrap();
    drop(runner);
    // No final checkpoint: the one from before the sweep is the latest.
    let core = Arc::into_inner(core).expect("one owner");
    drop(core);
    let (core, report) =
        Core::open(SledStore::open(&dir.path().join("log")).unwrap(), clock).unwrap();
    assert!(
        report.checkpoint_problem.is_some(),
        "the checkpoint from before the removal was used: {report:?}"
    );
    assert!(
        core.read(|s| s.request(id).is_none() && s.head(&common::model("flux")).is_none()),
        "an archived request is live again"
    );
    // A fresh checkpoint was written, and it is usable.
    let (_, report) = core.rebuild_from_checkpoint().unwrap();
    assert!(report.checkpoint_problem.is_none(), "{report:?}");
}

/// Opening a log never changes the folder it sits in (it may be shared,
/// like /tmp): only the log's own folder and files are made owner-only.
#[tokio::test]
async fn opening_a_log_leaves_the_folder_around_it_alone() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = SledStore::open(&root.path().join("log")).unwrap();
    store.append(vec![queued(1)]).unwrap();
    drop(store);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(root.path()), 0o755);
    assert_eq!(mode(&root.path().join("log")), 0o700);
    assert_eq!(mode(&root.path().join("log").join("db")), 0o600);
    assert_eq!(mode(&root.path().join("log.lock")), 0o600);
}

#[test]
fn a_refused_open_keeps_the_operating_systems_error_kind() {
    let dir = tempfile::tempdir().unwrap();
    // The data dir is a regular file: nothing below it can be created.
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a folder").unwrap();
    let err = match SledStore::open(&file.join("log")) {
        Ok(_) => panic!("opened a log below a regular file"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    // What creating the folder there reports on Linux (EEXIST).
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert!(err.to_string().contains("data"), "{err}");
}

#[tokio::test]
async fn a_log_from_before_random_ids_gets_its_request_index_rebuilt_in_creation_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let start = Utc::now() - chrono::Duration::hours(1);
    let mut made = Vec::new();
    {
        let store = SledStore::open(&log).unwrap();
        for i in 0..6i64 {
            let id = RequestId::random();
            let mut req = common::request("flux", 1 + i % 2, "a fox");
            req.origin.update_id = Some(100 + i as u32);
            store
                .append(vec![NewEvent {
                    request_id: id,
                    at: start + chrono::Duration::minutes(i),
                    event: req.into_queued(),
                }])
                .unwrap();
            made.push(id);
        }
        assert_eq!(store.downgrade_index_for_tests().unwrap(), 6);
        assert_eq!(store.count_prefix_for_tests(b'o'), 0);
    }
    // Opened twice: the rebuild is done once and repeating it changes nothing.
    for _ in 0..2 {
        let store = SledStore::open(&log).unwrap();
        assert_eq!(store.count_prefix_for_tests(b'x'), 0, "old keys removed");
        let all: Vec<RequestId> = store
            .request_ids(None, None, None, false)
            .map(Result::unwrap)
            .collect();
        assert_eq!(all, made, "creation order, whatever the ids");
        let user1: Vec<RequestId> = store
            .request_ids(Some(easel::domain::UserId(1)), None, None, true)
            .map(Result::unwrap)
            .collect();
        assert_eq!(user1, [made[4], made[2], made[0]]);
        let since: Vec<RequestId> = store
            .request_ids(
                None,
                Some(start + chrono::Duration::minutes(4)),
                None,
                false,
            )
            .map(Result::unwrap)
            .collect();
        assert_eq!(since, made[4..]);
    }
}
