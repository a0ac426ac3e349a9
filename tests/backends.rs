//! One conformance suite for every `EventStore`: the sled log and the
//! in-memory store run the same checks of the trait's promises and the
//! same engine scenario (intake, runner, cancel, retention, verify), so a
//! new backend (PostgreSQL, issue 17) is held to what the engine relies on.

mod common;

use std::sync::Arc;

use chrono::{Duration as Span, TimeZone, Utc};
use common::{PNG, RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
use easel::domain::{ChatId, Event, Limits, Origin, Prompt, RequestId, Stage, UserId};
use easel::engine::{Admitted, Core, ImageStore, Runner, StepOutcome};
use easel::store::{EventStore, MemoryStore, NewEvent, SledStore};

fn queued(user: i64, update: u32, message: i32, at_min: i64) -> NewEvent {
    let at = Utc
        .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
        .single()
        .unwrap()
        + Span::minutes(at_min);
    NewEvent {
        request_id: RequestId::random(),
        at,
        event: Event::Queued {
            model: common::model("flux"),
            prompt: Prompt::parse("a fox").unwrap(),
            origin: Origin {
                user_id: UserId(user),
                chat_id: ChatId(user),
                message_id: Some(message),
                update_id: Some(update),
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        },
    }
}

fn started(id: RequestId, at: chrono::DateTime<Utc>) -> NewEvent {
    NewEvent {
        request_id: id,
        at,
        event: Event::Started,
    }
}

/// The trait's promises, method by method.
async fn conforms(store: &impl EventStore) {
    assert_eq!(store.last_seq(), 0);
    let mut woken = store.subscribe();
    // Seqs are contiguous from 1, in call order.
    let a = store.append(vec![queued(1, 10, 100, 0)]).unwrap();
    let b = store
        .append(vec![queued(2, 11, 200, 1), queued(1, 12, 101, 2)])
        .unwrap();
    assert_eq!(
        [a[0].seq, b[0].seq, b[1].seq],
        [1, 2, 3],
        "contiguous seqs in call order"
    );
    assert!(woken.has_changed().unwrap(), "subscribers are woken");
    assert_eq!(*woken.borrow_and_update(), 3);
    let (ra, rb, rc) = (a[0].request_id, b[0].request_id, b[1].request_id);
    let more = store.append(vec![started(ra, a[0].at)]).unwrap();
    assert_eq!(more[0].seq, 4);
    store.wait_durable(4).await.unwrap();

    // Reads.
    let all: Vec<u64> = store.read_from(1).map(|r| r.unwrap().seq).collect();
    assert_eq!(all, [1, 2, 3, 4]);
    let tail: Vec<u64> = store.read_from(3).map(|r| r.unwrap().seq).collect();
    assert_eq!(tail, [3, 4]);
    let of_a: Vec<&str> = store
        .events_of(ra)
        .unwrap()
        .iter()
        .map(|r| r.as_ref().unwrap().event.name())
        .collect();
    assert_eq!(of_a, ["queued", "started"]);
    assert!(
        store
            .events_of(RequestId(uuid::Uuid::nil()))
            .unwrap()
            .is_empty()
    );

    // Intake keys.
    assert_eq!(store.find_update(11).unwrap(), Some(rb));
    assert_eq!(store.find_update(99).unwrap(), None);
    assert_eq!(store.find_message(ChatId(1), 101).unwrap(), Some(rc));
    assert_eq!(store.find_message(ChatId(2), 101).unwrap(), None);

    // The request index: creation order, per user, bounded.
    let ids = |user, from, to, newest| -> Vec<RequestId> {
        store
            .request_ids(user, from, to, newest)
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(ids(None, None, None, false), [ra, rb, rc]);
    assert_eq!(ids(None, None, None, true), [rc, rb, ra]);
    assert_eq!(ids(Some(UserId(1)), None, None, false), [ra, rc]);
    // Bounded by creation time (ids are random: their order is not time).
    let tb = b[0].at;
    assert_eq!(ids(None, Some(tb), None, false), [rb, rc]);
    assert_eq!(ids(None, None, Some(tb), false), [ra, rb]);
    // By id, for prefix lookups: every id between the bounds, in id order.
    let mut sorted = vec![ra, rb, rc];
    sorted.sort();
    let between: Vec<RequestId> = store
        .ids_between(RequestId(uuid::Uuid::nil()), RequestId(uuid::Uuid::max()))
        .map(Result::unwrap)
        .collect();
    assert_eq!(between, sorted);
    let only: Vec<RequestId> = store.ids_between(rb, rb).map(Result::unwrap).collect();
    assert_eq!(only, [rb]);

    // Checkpoints and small values.
    assert_eq!(store.load_checkpoint().unwrap(), None);
    store.save_checkpoint(4, b"state").unwrap();
    assert_eq!(
        store.load_checkpoint().unwrap(),
        Some((4, b"state".to_vec()))
    );
    store.put_meta("status/1", b"a").unwrap();
    store.put_meta("status/2", b"b").unwrap();
    store.put_meta("offset", b"7").unwrap();
    assert_eq!(store.get_meta("offset").unwrap(), Some(b"7".to_vec()));
    let scanned: Vec<String> = store
        .scan_meta("status/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(scanned, ["status/1", "status/2"]);
    store.delete_meta("status/1").unwrap();
    store.delete_meta("absent").unwrap();
    assert_eq!(store.get_meta("status/1").unwrap(), None);

    // Retention: whole requests go with every key; seqs stay taken.
    assert_eq!(
        store.forget_requests(&[ra], "archive/next", b"1").unwrap(),
        2
    );
    assert!(store.events_of(ra).unwrap().is_empty());
    assert_eq!(store.find_update(10).unwrap(), None);
    assert_eq!(store.find_message(ChatId(1), 100).unwrap(), None);
    assert_eq!(ids(Some(UserId(1)), None, None, false), [rc]);
    assert_eq!(store.get_meta("archive/next").unwrap(), Some(b"1".to_vec()));
    let next = store.append(vec![queued(3, 13, 300, 3)]).unwrap();
    assert_eq!(
        next[0].seq, 5,
        "a removed request's seqs are never given again"
    );
    assert_eq!(store.last_seq(), 5);
}

/// The engine on `store`: intake with a redelivered update, FIFO through
/// the runner, a cancel, then the log verifies.
async fn runs_the_engine<S: EventStore>(store: S, images: &std::path::Path) {
    let (core, _) = Core::open(store, common::clock()).unwrap();
    let core = Arc::new(core);
    let limits = Limits {
        max_pending: 10,
        ..Limits::default()
    };
    let mut made = Vec::new();
    for (user, prompt) in [(1, "a fox"), (2, "a cat"), (1, "a hen")] {
        match core
            .accept(common::request("flux", user, prompt), &limits)
            .await
            .unwrap()
        {
            Admitted::Queued { id, .. } => made.push(id),
            other => panic!("{other:?}"),
        }
    }
    // The same update again finds its request.
    let mut again = common::request("flux", 9, "twice");
    again.origin.update_id = Some(4242);
    let first = core.accept(again.clone(), &limits).await.unwrap();
    let Admitted::Queued { id: twice, .. } = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        core.accept(again, &limits).await.unwrap(),
        Admitted::Duplicate { id: twice }
    );
    // The last one is cancelled while it waits.
    let cancelled = core
        .cancel_queued(UserId(9), None, Some(5000))
        .await
        .unwrap();
    assert_eq!(cancelled.cancelled(), [twice]);

    let deliverer = Arc::new(RecordingDeliverer::default());
    let runner = Runner::new(
        Arc::clone(&core),
        common::model("flux"),
        Arc::new(UpperEnhancer),
        Arc::new(ScriptedGenerator::default()),
        Arc::clone(&deliverer),
        Arc::new(ImageStore::open(images).unwrap()),
    );
    while runner.try_execute_step().await.unwrap() != StepOutcome::EmptyQueue {}
    let delivered: Vec<RequestId> = deliverer
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|(id, bytes)| {
            assert_eq!(bytes, PNG);
            *id
        })
        .collect();
    assert_eq!(delivered, made, "FIFO, each once");
    let report = easel::ops::verify(core.store().read_from(1)).unwrap();
    assert!(report.ok(), "{:?}", report.first_problem());
    let finished = easel::ops::records(core.store().read_from(1)).unwrap();
    assert_eq!(finished.len(), 4);
    assert!(
        finished
            .iter()
            .all(|r| matches!(r.status, Stage::Done | Stage::Cancelled))
    );
}

#[tokio::test]
async fn the_sled_log_keeps_every_promise_of_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    conforms(&SledStore::open(&dir.path().join("log")).unwrap()).await;
}

#[tokio::test]
async fn the_memory_store_keeps_every_promise_of_the_trait() {
    conforms(&MemoryStore::new()).await;
}

#[tokio::test]
async fn the_engine_runs_the_same_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("log")).unwrap();
    runs_the_engine(store, &dir.path().join("images")).await;
}

#[tokio::test]
async fn the_engine_runs_the_same_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    runs_the_engine(MemoryStore::new(), &dir.path().join("images")).await;
}
