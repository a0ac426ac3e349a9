//! The PostgreSQL event log (`store::pg`, §9) against a real PostgreSQL
//! (a throwaway cluster from the system's binaries: `tests/common/pg.rs`):
//! contiguous positions in commit order under concurrent appends from two
//! "replicas" while a follower reads, group commit, intake keys unique
//! across replicas, notifications across replicas and after the listener's
//! connection is killed, migrations applied once by replicas starting
//! together, and a newer schema refused.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/contract.rs"]
mod contract;
#[path = "common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::FakeTelegram;
use easel::domain::{
    ChatId, Command, Event, FailureKind, Limits, ModelName, Origin, Prompt, RateLimit, Rejection,
    RequestId, UserId,
};
use easel::engine::mirror::ReplicaEngine;
use easel::engine::replica::{LeaseTimes, Replica, ReplicaError, ReplicaRunner};
use easel::engine::{
    AcceptError, Admitted, Deliverer, Delivery, DeliveryFailure, Enhancement, Enhancer,
    GeneratedImage, GenerationFailure, Generator, ImageStore, KeptImage, NewRequest, Stages,
    SystemClock,
};
use easel::engine::{Engine, ManualClock};
use easel::projection::{ActiveRequest, LiveState};
use easel::store::pg::{Appended, Follow, PgLog, Restored};
use easel::store::{EventStore, NewEvent, StoreError};
use secrecy::SecretString;
use std::path::Path;

fn queued(id: RequestId, update: Option<u32>, message: Option<i32>) -> NewEvent {
    NewEvent {
        request_id: id,
        at: Utc::now(),
        event: Event::Queued {
            model: ModelName::parse("flux").unwrap(),
            prompt: Prompt::parse("a red fox").unwrap(),
            origin: Origin {
                user_id: UserId(7),
                chat_id: ChatId(7),
                message_id: message,
                update_id: update,
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        },
    }
}

fn started(id: RequestId) -> NewEvent {
    NewEvent {
        request_id: id,
        at: Utc::now(),
        event: Event::Started,
    }
}

async fn connect(url: &str) -> PgLog {
    PgLog::connect(&SecretString::from(url.to_owned()))
        .await
        .expect("connect")
}

fn written(a: Appended) -> Vec<easel::store::Recorded> {
    match a {
        Appended::Written(r) => r,
        other => panic!("not written: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_get_contiguous_positions_and_read_back_as_written() {
    let Some(url) = pg::database().await else {
        return;
    };
    let log = connect(&url).await;
    assert_eq!(log.last_position(), 0);
    let id = RequestId::random();
    let recs = written(
        log.append(vec![queued(id, Some(1), Some(10)), started(id)])
            .await
            .unwrap(),
    );
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(log.last_position(), 2);
    let back: Vec<_> = log
        .read_from(1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Timestamps go through PostgreSQL at microsecond precision.
    assert_eq!(back.len(), 2);
    for (b, r) in back.iter().zip(&recs) {
        assert_eq!(
            (b.seq, b.request_id, &b.event),
            (r.seq, r.request_id, &r.event)
        );
        assert!((b.at - r.at).num_microseconds().unwrap().abs() <= 1);
    }
    assert_eq!(log.events_of(id).await.unwrap().len(), 2);
    assert_eq!(log.find_update(1).await.unwrap(), Some(id));
    assert_eq!(log.find_message(ChatId(7), 10).await.unwrap(), Some(id));
    assert_eq!(log.find_update(2).await.unwrap(), None);
    // Another process (a restart) continues from the head.
    drop(log);
    let log = connect(&url).await;
    assert_eq!(log.last_position(), 2);
    let more = written(
        log.append(vec![started(RequestId::random())])
            .await
            .unwrap(),
    );
    assert_eq!(more[0].seq, 3);
    log.put_meta("telegram/offset", b"42").await.unwrap();
    log.put_meta("telegram/offset", b"43").await.unwrap();
    assert_eq!(
        log.get_meta("telegram/offset").await.unwrap(),
        Some(b"43".to_vec())
    );
    assert_eq!(log.get_meta("nothing").await.unwrap(), None);
}

/// Two replicas append at once, 8 appenders each, while a follower reads
/// by the subscription: every read continues exactly where the last one
/// ended (a position never appears below one already seen), the positions
/// end up 1..=N without a hole, each request's events in its order, and
/// the appends shared transactions (group commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_appending_at_once_leave_no_gap_a_reader_could_miss() {
    let Some(url) = pg::database().await else {
        return;
    };
    let a = Arc::new(connect(&url).await);
    let b = Arc::new(connect(&url).await);
    let follower = connect(&url).await;
    const APPENDERS: usize = 8;
    const EACH: usize = 40;
    let total = (2 * APPENDERS * EACH * 2) as u64;
    let mut tasks = Vec::new();
    // All appenders start together, so appends are waiting at once from
    // the first commit on (without it, a loaded machine can schedule them
    // one at a time: seen once in a full `cargo test`).
    let start = Arc::new(tokio::sync::Barrier::new(2 * APPENDERS));
    for log in [&a, &b] {
        for _ in 0..APPENDERS {
            let (log, start) = (Arc::clone(log), Arc::clone(&start));
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                for _ in 0..EACH {
                    let id = RequestId::random();
                    written(log.append(vec![queued(id, None, None)]).await.unwrap());
                    written(log.append(vec![started(id)]).await.unwrap());
                }
            }));
        }
    }
    let mut seen = 0u64;
    let mut rx = follower.subscribe();
    let mut order = std::collections::HashMap::<RequestId, Vec<u64>>::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen < total {
        let batch = follower.read_from(seen + 1, 500).await.unwrap();
        for rec in batch {
            let rec = rec.unwrap();
            assert_eq!(rec.seq, seen + 1, "a gap or a position out of order");
            seen = rec.seq;
            order.entry(rec.request_id).or_default().push(rec.seq);
            let first = order[&rec.request_id].len() == 1;
            assert_eq!(first, matches!(rec.event, Event::Queued { .. }));
        }
        if seen < total {
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "follower stuck at {seen}"
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(order.len(), 2 * APPENDERS * EACH);
    assert!(order.values().all(|p| p.len() == 2 && p[0] < p[1]));
    let commits = a.commit_count() + b.commit_count();
    println!("{total} events in {commits} transactions");
    assert!(commits < total, "no append shared a transaction");
    // The follower heard of the other replicas' commits.
    assert_eq!(follower.last_position(), total);
}

/// The same Telegram update reaching two replicas makes one request: the
/// second append is told which request holds the update, and writes
/// nothing (no position taken). The same for a chat message redelivered
/// under a new update id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_admitted_by_two_replicas_makes_one_request() {
    let Some(url) = pg::database().await else {
        return;
    };
    let a = connect(&url).await;
    let b = connect(&url).await;
    let (x, y) = (RequestId::random(), RequestId::random());
    let (ra, rb) = tokio::join!(
        a.append(vec![queued(x, Some(500), Some(1))]),
        b.append(vec![queued(y, Some(500), Some(1))])
    );
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let winner = outcomes
        .iter()
        .find_map(|o| match o {
            Appended::Written(r) => Some(r[0].request_id),
            _ => None,
        })
        .expect("one was written");
    assert!(
        outcomes.contains(&Appended::Duplicate(winner)),
        "{outcomes:?}"
    );
    // In one group too: two appends of one update waiting together.
    let (z, w) = (RequestId::random(), RequestId::random());
    let (r1, r2) = tokio::join!(
        a.append(vec![queued(z, Some(501), None)]),
        a.append(vec![queued(w, Some(501), None)])
    );
    let both = [r1.unwrap(), r2.unwrap()];
    assert_eq!(
        both.iter()
            .filter(|o| matches!(o, Appended::Duplicate(_)))
            .count(),
        1,
        "{both:?}"
    );
    // A message redelivered as a new update: the chat + message key.
    let again = a
        .append(vec![queued(RequestId::random(), Some(502), Some(1))])
        .await
        .unwrap();
    assert_eq!(again, Appended::Duplicate(winner));
    assert_eq!(a.last_position(), 2, "a duplicate took no position");
    let next = written(a.append(vec![started(winner)]).await.unwrap());
    assert_eq!(next[0].seq, 3);
}

/// Notifications lost while the listener was disconnected: after its
/// connection is killed, the replica reconnects, re-reads the head and
/// learns of the commits made meanwhile by another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_reconnects_and_catches_up() {
    let Some(url) = pg::database().await else {
        return;
    };
    let a = connect(&url).await;
    let b = connect(&url).await;
    written(b.append(vec![started(RequestId::random())]).await.unwrap());
    let mut rx = a.subscribe();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| *p >= 1))
        .await
        .expect("notified")
        .unwrap();
    // Kill every listening backend (ours and b's), then commit meanwhile.
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    written(b.append(vec![started(RequestId::random())]).await.unwrap());
    written(b.append(vec![started(RequestId::random())]).await.unwrap());
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| *p >= 3))
        .await
        .expect("caught up after reconnecting")
        .unwrap();
    assert_eq!(a.read_from(1, 10).await.unwrap().len(), 3);
}

/// Replicas starting together apply the migrations once; a database whose
/// schema is newer than this build is refused with a sentence; a URL that
/// is not one is refused without echoing it (it may hold a password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(url) = pg::database().await else {
        return;
    };
    let (a, b, c) = tokio::join!(connect(&url), connect(&url), connect(&url));
    drop((a, b, c));
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = admin
        .query("SELECT version FROM easel_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=easel::store::pg::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    admin
        .execute("INSERT INTO easel_schema (version) VALUES (99)", &[])
        .await
        .unwrap();
    let refused = PgLog::connect(&SecretString::from(url.clone())).await;
    match refused {
        Err(StoreError::Open(why)) => {
            assert!(why.to_string().contains("newer than this easel's"), "{why}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let secret = "postgres://easel:hunter2-secret@[::1:bad";
    match PgLog::connect(&SecretString::from(secret.to_owned())).await {
        Err(e) => assert!(!e.to_string().contains("hunter2"), "{e}"),
        Ok(_) => panic!("a bad URL was taken"),
    }
}

/// Moves `model`'s lease end into the past on the database's clock: its
/// time to live ran out (without a real wait).
async fn expire(url: &str, model: &str) {
    let (admin, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .execute(
            "UPDATE easel_leases SET lease_until = clock_timestamp() - interval '1 second' WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap();
}

/// §9 one at a time per model across replicas: of two replicas claiming
/// a model's lease at once exactly one wins (its `started` written in the
/// same transaction, the other's not); the holder's events go in under
/// its epoch; once its lease ran out another replica takes it over with a
/// higher epoch, and from then on the old holder's events are refused
/// (fenced) and it cannot renew; a released lease is free at once; other
/// models are independent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_lease_has_one_holder_and_fences_out_the_previous_one() {
    use easel::store::pg::Claimed;
    let Some(url) = pg::database().await else {
        return;
    };
    let a = connect(&url).await;
    let b = connect(&url).await;
    let ttl = Duration::from_secs(30);
    let (x, y) = (RequestId::random(), RequestId::random());
    let (ca, cb) = tokio::join!(
        a.claim("flux", "replica-a", ttl, vec![started(x)]),
        b.claim("flux", "replica-b", ttl, vec![started(y)])
    );
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    let (mut lease, loser, loser_id) = match (ca, cb) {
        (Claimed::Won { lease, records }, Claimed::Held) => {
            assert_eq!(records[0].request_id, x);
            (lease, &b, y)
        }
        (Claimed::Held, Claimed::Won { lease, records }) => {
            assert_eq!(records[0].request_id, y);
            (lease, &a, x)
        }
        other => panic!("not exactly one winner: {other:?}"),
    };
    let holder = if lease.holder == "replica-a" { &a } else { &b };
    assert_eq!(lease.epoch, 1);
    assert!(
        a.events_of(loser_id).await.unwrap().is_empty(),
        "the loser's start was written"
    );
    // Another model is free.
    assert!(matches!(
        loser.claim("sdxl", "other", ttl, vec![]).await.unwrap(),
        Claimed::Won { .. }
    ));
    // The holder goes on under its epoch, and renews.
    let id = if lease.holder == "replica-a" { x } else { y };
    let r = holder
        .append_fenced(
            &lease,
            vec![NewEvent {
                request_id: id,
                at: Utc::now(),
                event: Event::Enhanced {
                    prompt: "a red fox, detailed".into(),
                    fallback: None,
                },
            }],
        )
        .await
        .unwrap();
    assert!(matches!(r, Appended::Written(_)), "{r:?}");
    assert!(holder.renew(&mut lease, ttl).await.unwrap());
    // While it holds the lease nobody else gets it.
    assert_eq!(
        loser.claim("flux", "replica-c", ttl, vec![]).await.unwrap(),
        Claimed::Held
    );
    // Its lease runs out (say the holder hung): taken over, epoch 2.
    expire(&url, "flux").await;
    let z = RequestId::random();
    let taken = match loser
        .claim("flux", "replica-c", ttl, vec![started(z)])
        .await
        .unwrap()
    {
        Claimed::Won { lease, .. } => lease,
        other => panic!("an expired lease was not taken over: {other:?}"),
    };
    assert_eq!(taken.epoch, 2);
    // The old holder wakes up: fenced, nothing written, cannot renew.
    let before = a.read_from(1, 1000).await.unwrap().len();
    let stale = holder
        .append_fenced(
            &lease,
            vec![NewEvent {
                request_id: id,
                at: Utc::now(),
                event: Event::Delivered {
                    message_id: Some(1),
                },
            }],
        )
        .await
        .unwrap();
    assert_eq!(stale, Appended::Fenced);
    assert_eq!(a.read_from(1, 1000).await.unwrap().len(), before);
    assert!(!holder.renew(&mut lease, ttl).await.unwrap());
    // The new holder's events go in; released, the lease is free at once.
    let ok = loser
        .append_fenced(&taken, vec![started(RequestId::random())])
        .await
        .unwrap();
    assert!(matches!(ok, Appended::Written(_)));
    loser.release(&taken).await.unwrap();
    match holder
        .claim("flux", "replica-a2", ttl, vec![])
        .await
        .unwrap()
    {
        Claimed::Won { lease, .. } => assert_eq!(lease.epoch, 3),
        other => panic!("a released lease was still held: {other:?}"),
    }
    // The local deadline is never later than the lease's end.
    assert!(lease.until <= tokio::time::Instant::now() + ttl);
}

async fn replica(url: &str, holder: &str) -> Replica {
    Replica::connect(
        &SecretString::from(url.to_owned()),
        holder,
        Arc::new(SystemClock),
    )
    .await
    .expect("connect a replica")
}

fn request(user: i64, update: u32, prompt: &str) -> NewRequest {
    NewRequest {
        model: ModelName::parse("flux").unwrap(),
        prompt: Prompt::parse(prompt).unwrap(),
        origin: Origin {
            user_id: UserId(user),
            chat_id: ChatId(user),
            message_id: Some(i32::try_from(update).unwrap()),
            update_id: Some(update),
            language: None,
        },
        preset: None,
        remembered: false,
        input: None,
        images: 1,
    }
}

fn limits(count: u32, max_pending: u32) -> Limits {
    Limits {
        rate: RateLimit {
            count,
            window_secs: 60,
        },
        max_pending,
    }
}

/// How many `queued` events the database holds.
async fn queued_in_log(log: &Replica) -> usize {
    log.log()
        .read_all()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r, Ok(r) if matches!(r.event, Event::Queued { .. })))
        .count()
}

/// §9 admission inside the append transaction: one user's ten requests
/// sent at once, alternately to two replicas, against a pending cap of 3
/// — exactly 3 admitted, whichever replica got them, because each
/// decision sees every replica's commits (the head lock orders them).
/// The same for a rate limit of 2 a minute. An update admitted before
/// comes back as a duplicate of its request from either replica, even
/// with the user at the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_replicas_because_admission_runs_in_the_transaction() {
    let Some(url) = pg::database().await else {
        return;
    };
    let (a, b) = (replica(&url, "a").await, replica(&url, "b").await);
    let cap = limits(100, 3);
    let asks = (0..10u32).map(|i| {
        let (a, b, cap) = (&a, &b, &cap);
        async move {
            let on = if i % 2 == 0 { a } else { b };
            on.admit(request(7, 100 + i, "a red fox"), cap).await
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let admitted: Vec<RequestId> = answers
        .iter()
        .filter_map(|r| match r {
            Ok(Admitted::Queued { id, .. }) => Some(*id),
            _ => None,
        })
        .collect();
    let capped = answers
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(AcceptError::Rejected(Rejection::TooManyPending {
                    max: 3,
                    ..
                }))
            )
        })
        .count();
    assert_eq!(admitted.len(), 3, "{answers:?}");
    assert_eq!(capped, 7, "{answers:?}");
    assert_eq!(queued_in_log(&a).await, 3);
    // Telegram redelivers an admitted update to the other replica.
    let (first_update, first_id) = answers
        .iter()
        .enumerate()
        .find_map(|(i, r)| match r {
            Ok(Admitted::Queued { id, .. }) => Some((100 + u32::try_from(i).unwrap(), *id)),
            _ => None,
        })
        .unwrap();
    for on in [&a, &b] {
        assert_eq!(
            on.admit(request(7, first_update, "a red fox"), &cap)
                .await
                .unwrap(),
            Admitted::Duplicate { id: first_id }
        );
    }
    // A rate limit of 2 a minute, five at once across the replicas.
    let rate = limits(2, 100);
    let asks = (0..5u32).map(|i| {
        let (a, b, rate) = (&a, &b, &rate);
        async move {
            let on = if i % 2 == 0 { a } else { b };
            on.admit(request(8, 200 + i, "a blue owl"), rate).await
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let ok = answers.iter().filter(|r| r.is_ok()).count();
    let limited = answers
        .iter()
        .filter(|r| matches!(r, Err(AcceptError::Rejected(Rejection::RateLimited { .. }))))
        .count();
    assert_eq!((ok, limited), (2, 3), "{answers:?}");
    assert_eq!(queued_in_log(&b).await, 5);
}

fn fail() -> Command {
    Command::Fail {
        kind: FailureKind::Unavailable,
        reason: "the worker is down".into(),
        attempts: 1,
        statuses: vec![],
    }
}

/// §9 one at a time per model and FIFO across replicas: with four
/// requests queued, two replicas asking at once start exactly one — the
/// head — under the model's lease; nobody starts another while it runs;
/// after it ends and the lease is released, the next start (from the
/// other replica) takes the next in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_start_one_generation_per_model_in_queue_order() {
    let Some(url) = pg::database().await else {
        return;
    };
    let (a, b) = (replica(&url, "a").await, replica(&url, "b").await);
    let flux = ModelName::parse("flux").unwrap();
    let ttl = Duration::from_secs(30);
    let mut line = Vec::new();
    for i in 0..4u32 {
        let on = if i % 2 == 0 { &a } else { &b };
        match on
            .admit(
                request(i64::from(i) + 1, 300 + i, "a red fox"),
                &limits(10, 10),
            )
            .await
            .unwrap()
        {
            Admitted::Queued { id, .. } => line.push(id),
            other => panic!("{other:?}"),
        }
    }
    for expected in &line {
        let (x, y) = tokio::join!(a.start_next(&flux, ttl), b.start_next(&flux, ttl));
        let (x, y) = (x.unwrap(), y.unwrap());
        let (begun, on) = match (x, y) {
            (Some(g), None) => (g, &a),
            (None, Some(g)) => (g, &b),
            other => panic!("not exactly one start: {other:?}"),
        };
        assert_eq!(
            begun.record.request_id, *expected,
            "not the head of the line"
        );
        assert_eq!(begun.record.event, Event::Started);
        // While it runs, nobody starts another.
        assert!(a.start_next(&flux, ttl).await.unwrap().is_none());
        assert!(b.start_next(&flux, ttl).await.unwrap().is_none());
        on.step(&begun.lease, *expected, fail()).await.unwrap();
        on.release(&begun.lease).await.unwrap();
    }
    assert!(
        a.start_next(&flux, ttl).await.unwrap().is_none(),
        "the line is empty"
    );
}

/// §9 recovery across replicas: a replica starts a generation and goes
/// silent (its lease runs out); another replica's next start resumes that
/// very request (`Resumed`, the recovery rule) under a new epoch instead
/// of starting the next one, and the silent replica's late step is
/// refused (fenced) with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holders_generation_is_resumed_by_another_replica_and_its_late_step_fenced() {
    let Some(url) = pg::database().await else {
        return;
    };
    let (a, b) = (replica(&url, "a").await, replica(&url, "b").await);
    let flux = ModelName::parse("flux").unwrap();
    let ttl = Duration::from_secs(30);
    let mut line = Vec::new();
    for i in 0..2u32 {
        if let Admitted::Queued { id, .. } = a
            .admit(request(1, 400 + i, "a red fox"), &limits(10, 10))
            .await
            .unwrap()
        {
            line.push(id);
        }
    }
    let begun = a.start_next(&flux, ttl).await.unwrap().expect("a start");
    assert_eq!(begun.record.request_id, line[0]);
    // Still held: b waits.
    assert!(b.start_next(&flux, ttl).await.unwrap().is_none());
    expire(&url, "flux").await;
    let resumed = b.start_next(&flux, ttl).await.unwrap().expect("a takeover");
    assert_eq!(
        resumed.record.request_id, line[0],
        "not the orphaned request"
    );
    assert!(
        matches!(resumed.record.event, Event::Resumed { .. }),
        "{:?}",
        resumed.record.event
    );
    assert_eq!(resumed.lease.epoch, begun.lease.epoch + 1);
    let before = a.log().read_all().await.unwrap().len();
    match a.step(&begun.lease, line[0], fail()).await {
        Err(ReplicaError::Fenced(model)) => assert_eq!(model, "flux"),
        other => panic!("a late step was not fenced: {other:?}"),
    }
    assert_eq!(a.log().read_all().await.unwrap().len(), before);
    b.step(&resumed.lease, line[0], fail()).await.unwrap();
    b.release(&resumed.lease).await.unwrap();
    let next = a.start_next(&flux, ttl).await.unwrap().expect("the next");
    assert_eq!(next.record.request_id, line[1]);
}

/// A transaction that fails after its decisions ran leaves the decisions'
/// state as it was: here the database refuses one request's row (a test
/// trigger), so its commit fails; the user then has no pending request
/// in the state the next decision sees (with a cap of 1, the next request
/// is admitted), and positions go on without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_leaves_no_trace_in_the_state_decisions_read() {
    let Some(url) = pg::database().await else {
        return;
    };
    let a = replica(&url, "a").await;
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON easel_events FOR EACH ROW \
             WHEN (NEW.record::text LIKE '%refuse me%') EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    let one = limits(10, 1);
    match a.admit(request(5, 500, "refuse me"), &one).await {
        Err(AcceptError::Store(_)) => {}
        other => panic!("the refused commit was not an error: {other:?}"),
    }
    assert_eq!(queued_in_log(&a).await, 0);
    let Admitted::Queued { seq, .. } = a
        .admit(request(5, 501, "a red fox"), &one)
        .await
        .expect("the user has nothing pending")
    else {
        panic!("not queued");
    };
    assert_eq!(seq, 1, "a position was lost or given twice");
    // And the cap still counts the one that went in.
    assert!(matches!(
        a.admit(request(5, 502, "a blue owl"), &one).await,
        Err(AcceptError::Rejected(Rejection::TooManyPending { .. }))
    ));
}

/// Enhancer double: keeps the prompt.
struct SamePrompt;

impl Enhancer for SamePrompt {
    async fn enhance(&self, prompt: &str) -> Enhancement {
        Enhancement {
            prompt: prompt.to_owned(),
            fallback: None,
        }
    }
}

/// Generator double shared by every replica's runners (as one worker
/// behind them would be): records the prompts it was called with per
/// model and the most calls of one model it ever had at once. A prompt
/// with "hang" never finishes the first time (a replica stuck
/// mid-generation); `dropped` counts calls given up.
#[derive(Default)]
struct Worker {
    calls: std::sync::Mutex<Vec<(String, String)>>,
    running: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    most_at_once: std::sync::Mutex<u32>,
    hung: std::sync::atomic::AtomicBool,
    dropped: Arc<std::sync::atomic::AtomicU32>,
}

/// Counts a call given up (its future dropped before it ended).
struct GivenUp(Option<Arc<std::sync::atomic::AtomicU32>>);

impl Drop for GivenUp {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Generator for Worker {
    async fn generate(
        &self,
        model: &ModelName,
        prompt: &str,
        _input: Option<&[u8]>,
    ) -> Result<GeneratedImage, GenerationFailure> {
        let m = model.as_str().to_owned();
        self.calls
            .lock()
            .unwrap()
            .push((m.clone(), prompt.to_owned()));
        {
            let mut running = self.running.lock().unwrap();
            let n = running.entry(m.clone()).or_default();
            *n += 1;
            let mut most = self.most_at_once.lock().unwrap();
            *most = (*most).max(*n);
        }
        if prompt.contains("forbidden") {
            *self.running.lock().unwrap().entry(m).or_default() -= 1;
            return Err(GenerationFailure {
                kind: FailureKind::Rejected,
                reason: "the content filter refused it".into(),
                attempts: 1,
                statuses: vec!["400".into()],
            });
        }
        let mut guard = GivenUp(Some(Arc::clone(&self.dropped)));
        if prompt.contains("hang") && !self.hung.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        guard.0 = None;
        *self.running.lock().unwrap().entry(m).or_default() -= 1;
        Ok(GeneratedImage {
            bytes: b"\x89PNG\r\n\x1a\n-test-image-".to_vec(),
            format: "png".into(),
            attempts: 1,
            statuses: Vec::new(),
        })
    }
}

/// Deliverer double: records which requests were sent, by whom.
#[derive(Default)]
struct Sent(std::sync::Mutex<Vec<RequestId>>);

impl Deliverer for Sent {
    async fn deliver(
        &self,
        request: &ActiveRequest,
        _image: &[u8],
        _format: &str,
    ) -> Result<Delivery, DeliveryFailure> {
        self.0.lock().unwrap().push(request.id);
        Ok(Delivery {
            message_id: Some(1),
        })
    }

    async fn deliver_album(
        &self,
        request: &ActiveRequest,
        _images: &[KeptImage],
    ) -> Result<Delivery, DeliveryFailure> {
        self.0.lock().unwrap().push(request.id);
        Ok(Delivery {
            message_id: Some(1),
        })
    }
}

type TestReplicaRunner = ReplicaRunner<SamePrompt, Worker, Sent>;

fn replica_runner(
    replica: &Arc<Replica>,
    model: &str,
    worker: &Arc<Worker>,
    sent: &Arc<Sent>,
    images: &Path,
    times: LeaseTimes,
) -> Arc<TestReplicaRunner> {
    let stages = Stages::new(
        ModelName::parse(model).unwrap(),
        Arc::new(SamePrompt),
        Arc::clone(worker),
        Arc::clone(sent),
        Arc::new(ImageStore::open(images).unwrap()),
    );
    Arc::new(ReplicaRunner::new(Arc::clone(replica), stages, times))
}

/// The requests whose last event is `delivered`, and whether replaying
/// the whole database log breaks no rule.
async fn finished(log: &Replica) -> (Vec<RequestId>, bool) {
    let items = log.log().read_all().await.unwrap();
    let mut state = easel::projection::LiveState::default();
    let report = easel::projection::replay_into(&mut state, items.clone().into_iter()).unwrap();
    let done = items
        .into_iter()
        .flatten()
        .filter(|r| matches!(r.event, Event::Delivered { .. }))
        .map(|r| r.request_id)
        .collect();
    (
        done,
        report.violations.is_empty() && report.corrupt.is_empty(),
    )
}

async fn until_delivered(log: &Replica, n: usize) -> Vec<RequestId> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (done, clean) = finished(log).await;
        assert!(clean, "the log does not replay cleanly");
        if done.len() >= n {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} delivered in 20 s",
            done.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// §9 end to end on two replicas: each runs a runner per model against
/// one database and one worker; twelve flux and six sdxl requests, sent
/// through both replicas, are each generated and delivered exactly once,
/// each model's in the order they were queued, never two of one model at
/// once (as the worker sees it), and the two models side by side; the
/// log replays without a broken rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_each_model_one_at_a_time_in_queue_order() {
    let Some(url) = pg::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replicas = [
        Arc::new(replica(&url, "a").await),
        Arc::new(replica(&url, "b").await),
    ];
    let (worker, sent) = (Arc::new(Worker::default()), Arc::new(Sent::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        for model in ["flux", "sdxl"] {
            let runner = replica_runner(
                r,
                model,
                &worker,
                &sent,
                &dir.path().join(format!("images-{i}")),
                LeaseTimes::default(),
            );
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move { runner.run(stop).await }));
        }
    }
    let mut order: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for i in 0..18u32 {
        let model = if i % 3 == 2 { "sdxl" } else { "flux" };
        let prompt = format!("picture {i}");
        let mut req = request(i64::from(i) + 1, 600 + i, &prompt);
        req.model = ModelName::parse(model).unwrap();
        let on = &replicas[usize::try_from(i % 2).unwrap()];
        assert!(matches!(
            on.admit(req, &limits(10, 10)).await.unwrap(),
            Admitted::Queued { .. }
        ));
        order.entry(model).or_default().push(prompt);
    }
    let done = until_delivered(&replicas[0], 18).await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let unique: std::collections::HashSet<_> = done.iter().collect();
    assert_eq!(unique.len(), 18, "a request was delivered twice");
    assert_eq!(sent.0.lock().unwrap().len(), 18, "a request was sent twice");
    assert_eq!(
        *worker.most_at_once.lock().unwrap(),
        1,
        "two generations of one model at once"
    );
    let calls = worker.calls.lock().unwrap().clone();
    for model in ["flux", "sdxl"] {
        let seen: Vec<String> = calls
            .iter()
            .filter(|(m, _)| m == model)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(seen, order[model], "{model} not generated in queue order");
    }
}

/// §9 a replica stuck mid-generation (its worker call never ends) whose
/// lease is then lost stops that call, records nothing more, and counts
/// the lost lease; the other replica resumes the request (a second
/// generation — the only kind of duplicate, and counted) and delivers it
/// once, then goes on with the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_stops_the_stuck_generation_and_another_replica_finishes_it() {
    let Some(url) = pg::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Arc::new(replica(&url, "a").await),
        Arc::new(replica(&url, "b").await),
    );
    let (worker, sent) = (Arc::new(Worker::default()), Arc::new(Sent::default()));
    // Renewed often, so a lost lease is noticed at once.
    let times = LeaseTimes {
        ttl: Duration::from_secs(30),
        renew_every: Duration::from_millis(50),
    };
    let stuck = replica_runner(&a, "flux", &worker, &sent, &dir.path().join("a"), times);
    let stop = tokio_util::sync::CancellationToken::new();
    let task_a = {
        let (stuck, stop) = (Arc::clone(&stuck), stop.clone());
        tokio::spawn(async move { stuck.run(stop).await })
    };
    let mut line = Vec::new();
    for (i, prompt) in ["hang here", "a red fox"].iter().enumerate() {
        if let Admitted::Queued { id, .. } = a
            .admit(
                request(1, 700 + u32::try_from(i).unwrap(), prompt),
                &limits(10, 10),
            )
            .await
            .unwrap()
        {
            line.push(id);
        }
    }
    // Wait until a's worker call hangs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !worker.hung.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the generation never began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its lease runs out (as if a's renewals had stopped reaching the
    // database); b's runner takes over.
    expire(&url, "flux").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stuck.lost_leases() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck replica never noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        worker.dropped.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the stuck call was not stopped"
    );
    let rescuer = replica_runner(&b, "flux", &worker, &sent, &dir.path().join("b"), times);
    let task_b = {
        let (rescuer, stop) = (Arc::clone(&rescuer), stop.clone());
        tokio::spawn(async move { rescuer.run(stop).await })
    };
    let done = until_delivered(&b, 2).await;
    stop.cancel();
    task_a.await.unwrap();
    task_b.await.unwrap();
    assert_eq!(done, line, "not delivered once each, in order");
    let prompts: Vec<String> = worker
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(
        prompts,
        ["hang here", "hang here", "a red fox"],
        "one duplicate generation, of the orphaned request"
    );
    let resumed = b
        .log()
        .events_of(line[0])
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .filter(|r| matches!(r.event, Event::Resumed { .. }))
        .count();
    assert_eq!(resumed, 1);
    assert_eq!(rescuer.lost_leases(), 0);
}

/// A sled data dir with some history: six requests on two models (intake
/// keys), one started, one cancelled, and the Telegram offset in meta.
async fn sled_history(dir: &std::path::Path) {
    use easel::domain::{Limits, RateLimit};
    use easel::engine::{Core, NewRequest, SystemClock};
    use easel::store::{EventStore, SledStore};
    let store = SledStore::open(&dir.join("log")).unwrap();
    let core = Core::open(store, Arc::new(SystemClock)).unwrap().0;
    let limits = Limits {
        max_pending: 100,
        rate: RateLimit {
            count: 100,
            window_secs: 60,
        },
    };
    for n in 0..6u32 {
        let model = if n % 2 == 0 { "flux" } else { "sdxl" };
        core.accept(
            NewRequest {
                model: ModelName::parse(model).unwrap(),
                prompt: Prompt::parse(&format!("a fox number {n}")).unwrap(),
                origin: Origin {
                    user_id: UserId(i64::from(n)),
                    chat_id: ChatId(i64::from(n)),
                    message_id: Some(100 + n as i32),
                    update_id: Some(9_000 + n),
                    language: Some("fa".into()),
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            },
            &limits,
        )
        .await
        .unwrap();
    }
    core.start_next(&ModelName::parse("flux").unwrap())
        .await
        .unwrap();
    core.cancel_queued(UserId(3), None, None).await.unwrap();
    core.store().put_meta("telegram/offset", b"9006").unwrap();
    core.checkpoint().unwrap();
}

/// `text` with every "(5 s ago)" of the audit's times left out.
fn without_ages(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(end) = rest.find(" ago)") {
        let start = rest[..end].rfind('(').unwrap_or(end);
        out.push_str(&rest[..start]);
        rest = &rest[end + " ago)".len()..];
    }
    out.push_str(rest);
    out
}

/// `easel <args>` on `dir`, with `EASEL_DATABASE_URL` when given (off the
/// runtime's threads); (exit code, stdout + stderr).
async fn easel_cli(dir: &std::path::Path, db: Option<&str>, args: &[&str]) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_easel"));
    command
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("EASEL_DATABASE_URL")
        .env("TELEGRAM_BOT_TOKEN", "1:abc")
        .env("FLUX_WORKER_URL", "http://127.0.0.1:9/generate");
    if let Some(url) = db {
        command.env("EASEL_DATABASE_URL", url);
    }
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `easel migrate --to <to>` of `dir` (off the runtime's threads: the
/// test's cluster connections live on them); (exit code, output).
async fn migrate_cli(dir: &std::path::Path, to: &str) -> (i32, String) {
    easel_cli(dir, None, &["migrate", "--to", to]).await
}

/// §9 `easel migrate --to postgres://…` on the built binary: a stopped
/// data dir's log copied into an empty database — every event at its own
/// position, the intake keys, the offset — and verified; the database then
/// continues above the copy. Refused, with exit 2 and the URL never
/// printed: into a database that holds events, from a log in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_sled_log_into_an_empty_database_exactly() {
    let Some(url) = pg::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    sled_history(dir.path()).await;
    let source: Vec<_> = {
        use easel::store::EventStore;
        let s = easel::store::SledStore::open(&dir.path().join("log")).unwrap();
        s.read_from(0).map(Result::unwrap).collect()
    };
    assert_eq!(source.len(), 8);
    let (code, out) = migrate_cli(dir.path(), &url).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("copied 8 events of 6 requests and 1 named values"),
        "{out}"
    );
    let db = connect(&url).await;
    let copied: Vec<_> = db
        .read_from(1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(copied, source, "not an exact copy");
    let first = source[0].request_id;
    assert_eq!(db.find_update(9_000).await.unwrap(), Some(first));
    assert_eq!(db.find_message(ChatId(0), 100).await.unwrap(), Some(first));
    assert_eq!(
        db.get_meta("telegram/offset").await.unwrap(),
        Some(b"9006".to_vec())
    );
    // The operator commands read the database as they read the dir.
    let short = &first.to_string()[..8];
    for args in [
        &["export"][..],
        &["replay", "--verify", "--json"][..],
        &["audit", "list", "--json"][..],
        &["audit", "list", "--model", "sdxl"][..],
        &["audit", "show", short, "--json"][..],
        &["audit", "stats", "--json"][..],
    ] {
        let from_dir = easel_cli(dir.path(), None, args).await;
        let from_db = easel_cli(dir.path(), Some(&url), args).await;
        assert_eq!(from_dir.0, 0, "{}", from_dir.1);
        // The two ran a moment apart: "(3 s ago)" may have become "(4 s ago)".
        assert_eq!(
            (from_db.0, without_ages(&from_db.1)),
            (from_dir.0, without_ages(&from_dir.1)),
            "{args:?}"
        );
    }
    // What does not read the database says so.
    for args in [&["compact"][..]] {
        let (code, out) = easel_cli(dir.path(), Some(&url), args).await;
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains("EASEL_DATABASE_URL"), "{out}");
        assert!(!out.contains(&url), "{out}");
    }
    // The database goes on above the copy, and keeps its intake keys.
    let dup = db
        .append(vec![queued(RequestId::random(), Some(9_000), None)])
        .await
        .unwrap();
    assert_eq!(dup, Appended::Duplicate(first));
    let next = written(
        db.append(vec![queued(RequestId::random(), Some(9_100), Some(1))])
            .await
            .unwrap(),
    );
    assert_eq!(next[0].seq, 9);
    // And back into a new data dir (`--to <dir>`, from EASEL_DATABASE_URL):
    // the same records, verified; the new dir's own commands agree.
    let back = tempfile::tempdir().unwrap();
    let target = back.path().join("data");
    let (code, out) = easel_cli(
        dir.path(),
        Some(&url),
        &["migrate", "--to", target.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("copied 9 events of 7 requests and 1 named values"),
        "{out}"
    );
    let from_db = easel_cli(dir.path(), Some(&url), &["export"]).await;
    let from_copy = easel_cli(&target, None, &["export"]).await;
    assert_eq!(from_copy, from_db);
    assert_eq!(easel_cli(&target, None, &["replay", "--verify"]).await.0, 0);
    // Not over a data dir that holds a log.
    let (code, out) = easel_cli(
        dir.path(),
        Some(&url),
        &["migrate", "--to", target.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("new data dir only"), "{out}");
    // Not into a database that holds events; the URL is never printed.
    let (code, out) = migrate_cli(dir.path(), &url).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("empty database only"), "{out}");
    assert!(!out.contains(&url), "{out}");
    // Not from a log in use.
    let fresh = pg::database().await.unwrap();
    let held = easel::store::SledStore::open(&dir.path().join("log")).unwrap();
    let (code, out) = migrate_cli(dir.path(), &fresh).await;
    drop(held);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("stop the bot first"), "{out}");
}

const HOOK_SECRET: &str = "replica-hook_secret";

/// One `easel run --webhook` replica on `url`: its data dir (images
/// only), webhook and health addresses, and the process.
struct Replicant {
    _dir: tempfile::TempDir,
    hook: String,
    health: String,
    child: std::process::Child,
}

fn start_replica(
    url: &str,
    fakes: &(FakeTelegram, FakeWorker, FakeWorker, FakeLlm),
    extra: &[(&str, &str)],
) -> Replicant {
    start_replica_with(url, fakes, extra, &["run", "--webhook"])
}

/// [`start_replica`] with the command's arguments (`run` alone: polling).
fn start_replica_with(
    url: &str,
    fakes: &(FakeTelegram, FakeWorker, FakeWorker, FakeLlm),
    extra: &[(&str, &str)],
    args: &[&str],
) -> Replicant {
    let dir = tempfile::tempdir().unwrap();
    let (hook, health) = (binary::free_addr(), binary::free_addr());
    let (tg, flux, sdxl, llm) = fakes;
    let mut command = binary::bot_command(dir.path(), tg, flux, sdxl, llm, args);
    command
        .env("EASEL_DATABASE_URL", url)
        .env("EASEL_WEBHOOK_LISTEN", &hook)
        .env("EASEL_WEBHOOK_SECRET", HOOK_SECRET)
        .env("EASEL_METRICS_ADDR", &health)
        .env("EASEL_REPLICAS", "2");
    for (k, v) in extra {
        command.env(k, v);
    }
    let child = command.spawn().expect("start a replica");
    Replicant {
        _dir: dir,
        hook,
        health,
        child,
    }
}

/// POSTs `update` to a replica's webhook route; its status.
async fn deliver(client: &reqwest::Client, hook: &str, update: &serde_json::Value) -> u16 {
    client
        .post(format!("http://{hook}/telegram"))
        .header("X-Telegram-Bot-Api-Secret-Token", HOOK_SECRET)
        .json(update)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// The prompts of `model`'s `queued` events in log order, from `easel
/// export` against the database.
async fn queued_prompts(url: &str, model: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = easel_cli(dir.path(), Some(url), &["export"]).await;
    assert_eq!(code, 0, "{out}");
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "queued" && v["model"] == model)
        .map(|v| v["prompt"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// §9 on the built binary: two `easel run --webhook` replicas on one
/// database, the FAKE Telegram and workers. Sixteen updates (eight users,
/// a flux and an sdxl request each) are POSTed alternately to the two
/// replicas' webhooks — every fourth to both, as a retried delivery may
/// reach another replica — all at once: every POST is answered 200, each
/// update makes one request, each photo goes out once, the workers never
/// see two calls of one model at once and get each model's prompts in
/// queue order, and `easel replay --verify` against the database passes.
/// An update whose commit the database refuses is answered `503` with
/// nobody told anything, and goes in once when Telegram delivers it again.
/// Either replica's `/metrics` counts every request of the bot, and its
/// dashboard lists them. One alert for a model failing in a row
/// ([`replicas_alert_the_operator_once`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replica_processes_share_one_database_by_webhook() {
    let Some(url) = pg::database().await else {
        return;
    };
    let fakes = binary::fakes(Duration::from_millis(20)).await;
    let client = reqwest::Client::new();
    let extra = [
        ("EASEL_OPERATOR_CHAT_ID", "777000"),
        ("EASEL_DASHBOARD_TOKEN", "replica-dashboard-token-0123"),
    ];
    let mut replicas = [
        start_replica(&url, &fakes, &extra),
        start_replica(&url, &fakes, &extra),
    ];
    for r in &replicas {
        binary::wait_ready(&client, &r.health).await;
    }
    let (tg, flux, sdxl, _) = &fakes;
    for user in 1..=8i64 {
        for model in ["flux", "sdxl"] {
            tg.user_sends(
                user,
                user,
                &format!("/image={model}=picture {model} {user}"),
            );
        }
    }
    let updates = tg.take_updates();
    assert_eq!(updates.len(), 16);
    let mut posts = Vec::new();
    for (i, update) in updates.iter().enumerate() {
        let to = &replicas[i % 2].hook;
        posts.push(deliver(&client, to, update));
        if i % 4 == 0 {
            posts.push(deliver(&client, &replicas[(i + 1) % 2].hook, update));
        }
    }
    let statuses = futures_util::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let photos = || {
        tg.calls()
            .iter()
            .filter(|c| c.method == "sendPhoto")
            .count()
    };
    assert!(
        tg.wait_for(Duration::from_secs(30), |c| c
            .iter()
            .filter(|c| c.method == "sendPhoto")
            .count()
            >= 16)
            .await,
        "only {} of 16 photos",
        photos()
    );
    // A commit the database refuses (a test trigger): 503, nobody told,
    // and the update delivered again (to the other replica) goes in once.
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON easel_events FOR EACH ROW \
             WHEN (NEW.record::text LIKE '%refuse me%') EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    tg.user_sends(20, 20, "/image=flux=refuse me please");
    let refused = tg.take_updates();
    assert_eq!(deliver(&client, &replicas[0].hook, &refused[0]).await, 503);
    assert!(tg.texts_to(20).is_empty(), "{:?}", tg.texts_to(20));
    admin
        .batch_execute("DROP TRIGGER refuse ON easel_events")
        .await
        .unwrap();
    assert_eq!(deliver(&client, &replicas[1].hook, &refused[0]).await, 200);
    assert!(
        tg.wait_for(Duration::from_secs(30), |c| c
            .iter()
            .any(|c| c.method == "sendPhoto" && c.chat_id == Some(20)))
            .await
    );
    // Each replica's request series count the whole bot's requests (every
    // replica follows the same log): 17 done, on either.
    until_finished(&client, &replicas, "done", |n| n == 17.0).await;
    // Either replica's dashboard shows the whole bot's requests.
    for r in &replicas {
        let page = client
            .get(format!("http://{}/", r.health))
            .bearer_auth("replica-dashboard-token-0123")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page.matches(r#"data-state="done""#).count(), 17, "{page}");
    }
    replicas_alert_the_operator_once(&client, &replicas, tg).await;
    for r in &mut replicas {
        binary::terminate(&mut r.child);
    }
    assert_eq!(photos(), 17, "a photo went out twice");
    for (model, worker) in [("flux", flux), ("sdxl", sdxl)] {
        let stats = &worker.stats;
        assert_eq!(
            stats
                .max_in_flight
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "two {model} generations at once"
        );
        // The failing requests of the alert check aside (retried).
        let ours = |p: &String| !p.contains("explode");
        let seen: Vec<String> = stats
            .prompts
            .lock()
            .unwrap()
            .iter()
            .filter(|p| ours(p))
            .cloned()
            .collect();
        let queued: Vec<String> = queued_prompts(&url, model)
            .await
            .into_iter()
            .filter(ours)
            .collect();
        let n = if model == "flux" { 9 } else { 8 };
        assert_eq!(queued.len(), n, "{queued:?}");
        assert_eq!(seen.len(), n, "{model} generated {} times", seen.len());
        for (prompt, line) in seen.iter().zip(&queued) {
            assert!(
                prompt.contains(line.as_str()),
                "{model} out of queue order: {seen:?} vs {queued:?}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = easel_cli(dir.path(), Some(&url), &["replay", "--verify"]).await;
    assert_eq!(code, 0, "{out}");
}

/// Waits (10 s at most) until every replica's `/metrics` counts requests
/// finished with `outcome` as `wanted` says.
async fn until_finished(
    client: &reqwest::Client,
    replicas: &[Replicant],
    outcome: &str,
    wanted: impl Fn(f64) -> bool,
) {
    for r in replicas {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = client
                .get(format!("http://{}/metrics", r.health))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let n: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("easel_requests_finished_total{")
                        && l.contains(&format!("outcome=\"{outcome}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if wanted(n) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} requests {outcome} on /metrics of {}",
                r.health
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The pid in a lease holder's name (`host/pid/tag`).
fn holder_pid(holder: &str) -> Option<u32> {
    holder.split('/').nth(1)?.parse().ok()
}

/// `kill -9`s the replica holding an unexpired lease of a model `LIKE`
/// `model` (found by the pid in the holder's name; waited for, 30 s at
/// most) and reaps it; its place in `replicas`.
async fn kill_holder(url: &str, replicas: &mut [Replicant], model: &str) -> usize {
    // Connected anew each time: the server may have restarted meanwhile.
    let (admin, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let at = loop {
        let rows = admin
            .query(
                "SELECT holder FROM easel_leases WHERE model LIKE $1 \
                 AND lease_until > clock_timestamp()",
                &[&model],
            )
            .await
            .unwrap();
        let at = rows
            .iter()
            .filter_map(|r| holder_pid(r.get(0)))
            .find_map(|pid| replicas.iter().position(|r| r.child.id() == pid));
        if let Some(at) = at {
            break at;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lease of {model} was ever held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    replicas[at].child.kill().unwrap();
    replicas[at].child.wait().unwrap();
    at
}

/// Posts `update` as Telegram does: to some replica, and again (to the
/// next one) after anything but `200`, until one takes it (60 s at most).
async fn deliver_until_taken(
    client: &reqwest::Client,
    hooks: &std::sync::Mutex<Vec<String>>,
    update: &serde_json::Value,
    first: usize,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for attempt in first.. {
        let hook = {
            let hooks = hooks.lock().unwrap();
            hooks[attempt % hooks.len()].clone()
        };
        if deliver(client, &hook, update).await == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica took an update in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// §9 under failure, on the built binary: three replicas by webhook, a
/// stream of requests (each update redelivered to another replica until
/// one answers 200, as Telegram does), and meanwhile: `kill -9` of the
/// replica holding a model's lease mid-generation (by the pid in its
/// lease), at once the database server restarted (a cluster of the
/// test's own), then the killed replica started again. Afterwards: every
/// request the webhook acknowledged was delivered, the workers never ran
/// two generations of one model at once, duplicate generations and
/// photos are at most one per disruption, and `easel replay --verify`
/// passes. `EASEL_CAMPAIGN_KILLS=<n>` (default 1) kills more holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replicas_and_a_database_restart_lose_nothing_acknowledged() {
    // A server of its own: it is restarted below.
    let Some(cluster) = pg::private() else {
        return;
    };
    let url = cluster.0.fresh_database().await;
    let kills = binary::env_num("EASEL_CAMPAIGN_KILLS", 1);
    let users = 8i64;
    let fakes = binary::fakes(Duration::from_millis(60)).await;
    let client = reqwest::Client::new();
    let lease = [("EASEL_LEASE_SECS", "2")];
    let mut replicas: Vec<Replicant> = (0..3)
        .map(|_| start_replica(&url, &fakes, &lease))
        .collect();
    for r in &replicas {
        binary::wait_ready(&client, &r.health).await;
    }
    let hooks = Arc::new(std::sync::Mutex::new(
        replicas.iter().map(|r| r.hook.clone()).collect::<Vec<_>>(),
    ));
    let (tg, flux, sdxl, _) = &fakes;
    for user in 1..=users {
        let model = if user % 2 == 0 { "flux" } else { "sdxl" };
        tg.user_sends(user, user, &format!("/image={model}=picture {user}"));
    }
    let updates = tg.take_updates();
    let posting = {
        let (client, hooks) = (client.clone(), Arc::clone(&hooks));
        tokio::spawn(async move {
            for (i, update) in updates.iter().enumerate() {
                deliver_until_taken(&client, &hooks, update, i).await;
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        })
    };
    let mut killed = 0;
    for _ in 0..kills {
        // The holder of a model's lease, mid-generation.
        let at = kill_holder(&url, &mut replicas, "%").await;
        killed += 1;
        if killed == 1 {
            // The database server restarts (`pg_ctl restart -m fast`)
            // while updates still arrive and the holder's lease has not
            // run out: every connection of the replicas ends, and new
            // ones fail until it is back.
            tokio::task::block_in_place(|| cluster.0.restart());
        }
        // Telegram has only the live replicas' address (a load balancer
        // stops sending to a dead one).
        let dead = replicas[at].hook.clone();
        hooks.lock().unwrap().retain(|h| *h != dead);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fresh = start_replica(&url, &fakes, &lease);
        binary::wait_ready(&client, &fresh.health).await;
        hooks.lock().unwrap().push(fresh.hook.clone());
        replicas[at] = fresh;
    }
    let disruptions = killed + 1;
    tokio::time::timeout(Duration::from_secs(90), posting)
        .await
        .expect("the updates were not all taken in 90 s")
        .unwrap();
    // Every acknowledged request delivered.
    until_photos(tg, 1..=users, 60).await;
    for r in &mut replicas {
        binary::terminate(&mut r.child);
    }
    let photos: usize = (1..=users).map(|u| photos_to(tg, u)).sum();
    let generations = flux.stats.calls.load(std::sync::atomic::Ordering::SeqCst)
        + sdxl.stats.calls.load(std::sync::atomic::Ordering::SeqCst);
    let users = usize::try_from(users).unwrap();
    eprintln!(
        "replica campaign: {killed} holder(s) killed, 1 database restart; {photos} photos and {generations} generations for {users} requests"
    );
    assert!(
        photos <= users + disruptions,
        "{photos} photos for {users} requests"
    );
    assert!(
        generations <= users + disruptions,
        "{generations} generations for {users} requests"
    );
    for worker in [flux, sdxl] {
        assert_eq!(
            worker
                .stats
                .max_in_flight
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "two generations of one model at once"
        );
    }
    let (queued, delivered) = verified_counts(&url).await;
    assert_eq!(queued, users, "an update made two requests, or none");
    assert_eq!(delivered, users);
}

/// `easel replay --verify` against the database passes; then how many
/// `queued` and `delivered` events `easel export` shows.
async fn verified_counts(url: &str) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = easel_cli(dir.path(), Some(url), &["replay", "--verify"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = easel_cli(dir.path(), Some(url), &["export"]).await;
    assert_eq!(code, 0, "{out}");
    let count = |kind: &str| {
        out.lines()
            .filter(|l| l.contains(&format!("\"type\":\"{kind}\"")))
            .count()
    };
    (count("queued"), count("delivered"))
}

/// Photos sent to `chat` so far.
fn photos_to(tg: &FakeTelegram, chat: i64) -> usize {
    tg.calls()
        .iter()
        .filter(|c| c.method == "sendPhoto" && c.chat_id == Some(chat))
        .count()
}

/// Waits (`secs` at most) until every chat in `chats` got a photo.
async fn until_photos(tg: &FakeTelegram, chats: std::ops::RangeInclusive<i64>, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let missing: Vec<i64> = chats.clone().filter(|c| photos_to(tg, *c) == 0).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no photo in {secs} s for users {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// §9 long polling with replicas, on the built binary: two `easel run`
/// replicas on one database without a webhook elect one poller (the
/// holder of the poller's lease); requests sent meanwhile are each
/// admitted once and delivered; the poller is `kill -9`ed, and the other
/// replica takes over polling from the offset saved in the database once
/// the lease runs out — every later request is delivered too, no update
/// makes two requests, and `replay --verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_poller_and_another_takes_over_when_it_dies() {
    let Some(url) = pg::database().await else {
        return;
    };
    let fakes = binary::fakes(Duration::from_millis(10)).await;
    let client = reqwest::Client::new();
    let lease = [("EASEL_LEASE_SECS", "2")];
    let mut replicas: Vec<Replicant> = (0..2)
        .map(|_| start_replica_with(&url, &fakes, &lease, &["run"]))
        .collect();
    for r in &replicas {
        binary::wait_ready(&client, &r.health).await;
    }
    let tg = &fakes.0;
    for user in 1..=4i64 {
        tg.user_sends(user, user, &format!("/image=flux=picture {user}"));
    }
    until_photos(tg, 1..=4, 30).await;
    let at = kill_holder(&url, &mut replicas, "@telegram-poller").await;
    for user in 5..=8i64 {
        tg.user_sends(user, user, &format!("/image=flux=picture {user}"));
    }
    until_photos(tg, 5..=8, 30).await;
    let survivor = 1 - at;
    binary::terminate(&mut replicas[survivor].child);
    let photos: usize = (1..=8).map(|c| photos_to(tg, c)).sum();
    assert!(photos <= 9, "{photos} photos for 8 requests");
    let (queued, delivered) = verified_counts(&url).await;
    assert_eq!(queued, 8, "an update made two requests, or none");
    assert_eq!(delivered, 8);
}

/// A replica stopped mid-generation (SIGTERM: its runner's token
/// cancelled) records nothing for the cut stage and gives the model's
/// lease up, which wakes the other replica's idle runner at once (a
/// notification, not its half-lease timer of 15 s here): the request is
/// resumed there and delivered, well before the lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_gives_its_lease_up_and_another_resumes_at_once() {
    let Some(url) = pg::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Arc::new(replica(&url, "a").await),
        Arc::new(replica(&url, "b").await),
    );
    let (worker, sent) = (Arc::new(Worker::default()), Arc::new(Sent::default()));
    let times = LeaseTimes::default();
    let stopping = replica_runner(&a, "flux", &worker, &sent, &dir.path().join("a"), times);
    let stop_a = tokio_util::sync::CancellationToken::new();
    let task_a = {
        let (runner, stop) = (Arc::clone(&stopping), stop_a.clone());
        tokio::spawn(async move { runner.run(stop).await })
    };
    let Admitted::Queued { id, .. } = a
        .admit(request(1, 800, "hang on"), &limits(10, 10))
        .await
        .unwrap()
    else {
        panic!("not queued");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !worker.hung.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the generation never began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b idles: nothing it can start while a holds the lease.
    let waiting = replica_runner(&b, "flux", &worker, &sent, &dir.path().join("b"), times);
    let stop_b = tokio_util::sync::CancellationToken::new();
    let task_b = {
        let (runner, stop) = (Arc::clone(&waiting), stop_b.clone());
        tokio::spawn(async move { runner.run(stop).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sent.0.lock().unwrap().is_empty());
    stop_a.cancel();
    task_a.await.unwrap();
    // Resumed and delivered by b long before a's 30 s lease or b's 15 s
    // idle timer (5 s at most: only the release's notice wakes it so soon).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sent.0.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other replica did not resume the request within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = until_delivered(&b, 1).await;
    assert_eq!(done, vec![id]);
    stop_b.cancel();
    task_b.await.unwrap();
    assert_eq!(stopping.lost_leases(), 0);
    let resumed = b
        .log()
        .events_of(id)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .filter(|r| matches!(r.event, Event::Resumed { .. }))
        .count();
    assert_eq!(resumed, 1);
}

/// One operation of the replicas' property test.
#[derive(Clone, Debug)]
enum ROp {
    Admit { on: usize, user: i64, model: usize },
    Start { on: usize, model: usize },
    Fail { model: usize },
    Cancel { on: usize, user: i64 },
    Expire { model: usize },
}

fn rop() -> impl proptest::strategy::Strategy<Value = ROp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..2usize, 0..3i64, 0..2usize).prop_map(|(on, user, model)| ROp::Admit { on, user, model }),
        3 => (0..2usize, 0..2usize).prop_map(|(on, model)| ROp::Start { on, model }),
        2 => (0..2usize).prop_map(|model| ROp::Fail { model }),
        1 => (0..2usize, 0..3i64).prop_map(|(on, user)| ROp::Cancel { on, user }),
        1 => (0..2usize).prop_map(|model| ROp::Expire { model }),
    ]
}

/// A model's generation in the reference: the request, its user, the
/// lease, the replica holding it, and whether the lease was made to run
/// out.
type Flying = (RequestId, i64, easel::store::pg::Lease, usize, bool);

/// Two replicas on one database, shared by every case (each case uses
/// models and users of its own), and the runtime they live on.
struct Shared {
    rt: tokio::runtime::Runtime,
    url: String,
    replicas: [Replica; 2],
    cases: std::sync::atomic::AtomicU64,
    updates: std::sync::atomic::AtomicU32,
}

fn shared() -> Option<&'static Shared> {
    static SHARED: std::sync::OnceLock<Option<Shared>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let url = rt.block_on(pg::database())?;
            let replicas =
                rt.block_on(async { [replica(&url, "p").await, replica(&url, "q").await] });
            Some(Shared {
                rt,
                url,
                replicas,
                cases: std::sync::atomic::AtomicU64::new(0),
                updates: std::sync::atomic::AtomicU32::new(1),
            })
        })
        .as_ref()
}

/// A case against the reference: per model the queue and the one in
/// flight (with its lease, the replica holding it, and whether the lease
/// was made to run out), per user the pending count. Then the database's
/// log replays without a broken rule, each model's starts follow its
/// queue, and no model ever had two generations at once.
async fn replicas_case(
    s: &Shared,
    ops: Vec<ROp>,
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    use std::collections::{HashMap, VecDeque};
    let case = s.cases.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let models: Vec<ModelName> = (0..2)
        .map(|m| ModelName::parse(&format!("c{case}m{m}")).unwrap())
        .collect();
    let user_of = |u: i64| i64::try_from(case).unwrap() * 10 + u + 1;
    let ttl = Duration::from_secs(30);
    let cap = limits(1000, 2);
    let mut waiting: Vec<VecDeque<(RequestId, i64)>> = vec![VecDeque::new(), VecDeque::new()];
    let mut flying: Vec<Option<Flying>> = vec![None, None];
    let mut pending: HashMap<i64, u32> = HashMap::new();
    for op in ops {
        match op {
            ROp::Admit { on, user, model } => {
                let user = user_of(user);
                let update = s.updates.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut req = request(user, update, "a red fox");
                req.model = models[model].clone();
                let room = pending.get(&user).copied().unwrap_or(0) < 2;
                match s.replicas[on].admit(req, &cap).await {
                    Ok(Admitted::Queued { id, position, .. }) => {
                        prop_assert!(room, "admitted past the cap");
                        waiting[model].push_back((id, user));
                        prop_assert_eq!(position, waiting[model].len());
                        *pending.entry(user).or_default() += 1;
                    }
                    Err(AcceptError::Rejected(Rejection::TooManyPending { .. })) => {
                        prop_assert!(!room, "refused under the cap");
                    }
                    other => prop_assert!(false, "admit: {:?}", other),
                }
            }
            ROp::Start { on, model } => {
                let begun = s.replicas[on]
                    .start_next(&models[model], ttl)
                    .await
                    .unwrap();
                match (&flying[model], begun) {
                    (Some((_, _, _, _, false)), None) => {}
                    (Some((id, user, _, _, true)), Some(b)) => {
                        prop_assert_eq!(b.record.request_id, *id);
                        let resumed = matches!(b.record.event, Event::Resumed { .. });
                        prop_assert!(resumed, "not resumed: {:?}", b.record.event);
                        let (id, user) = (*id, *user);
                        flying[model] = Some((id, user, b.lease, on, false));
                    }
                    (None, Some(b)) => {
                        let head = waiting[model].pop_front();
                        prop_assert_eq!(
                            Some(b.record.request_id),
                            head.map(|h| h.0),
                            "not the head"
                        );
                        prop_assert_eq!(&b.record.event, &Event::Started);
                        let user = head.map_or(0, |h| h.1);
                        flying[model] = Some((b.record.request_id, user, b.lease, on, false));
                    }
                    (None, None) => {
                        prop_assert!(waiting[model].is_empty(), "the head was not started")
                    }
                    (f, b) => prop_assert!(false, "start: in flight {:?}, began {:?}", f, b),
                }
            }
            ROp::Fail { model } => {
                let Some((id, user, lease, on, expired)) = flying[model].clone() else {
                    continue;
                };
                let done = s.replicas[on].step(&lease, id, fail()).await;
                if expired {
                    prop_assert!(matches!(done, Err(ReplicaError::Fenced(_))), "{:?}", done);
                } else {
                    prop_assert!(done.is_ok(), "{:?}", done);
                    s.replicas[on].release(&lease).await.unwrap();
                    flying[model] = None;
                    *pending.entry(user).or_default() -= 1;
                }
            }
            ROp::Cancel { on, user } => {
                let user = user_of(user);
                let Some((m, at)) = (0..2).find_map(|m| {
                    waiting[m]
                        .iter()
                        .position(|w| w.1 == user)
                        .map(|at| (m, at))
                }) else {
                    continue;
                };
                let (id, _) = waiting[m][at];
                prop_assert!(s.replicas[on].cancel(id).await.is_ok());
                waiting[m].remove(at);
                *pending.entry(user).or_default() -= 1;
            }
            ROp::Expire { model } => {
                expire(&s.url, models[model].as_str()).await;
                if let Some(f) = flying[model].as_mut() {
                    f.4 = true;
                }
            }
        }
    }
    // The whole log: no broken rule, and per model of this case the starts
    // in queue order with never two at once.
    let items = s.replicas[0].log().read_all().await.unwrap();
    let mut state = easel::projection::LiveState::default();
    let report = easel::projection::replay_into(&mut state, items.clone().into_iter()).unwrap();
    prop_assert!(
        report.violations.is_empty() && report.corrupt.is_empty(),
        "{:?}",
        report
    );
    for model in &models {
        let mut queued = VecDeque::new();
        let mut model_of = HashMap::new();
        let mut running: Option<RequestId> = None;
        for r in items.iter().flatten() {
            match &r.event {
                Event::Queued { model: m, .. } if m == model => {
                    queued.push_back(r.request_id);
                    model_of.insert(r.request_id, ());
                }
                Event::Cancelled if model_of.contains_key(&r.request_id) => {
                    queued.retain(|q| *q != r.request_id);
                }
                Event::Started if model_of.contains_key(&r.request_id) => {
                    prop_assert!(running.is_none(), "two generations of {} at once", model);
                    prop_assert_eq!(
                        queued.pop_front(),
                        Some(r.request_id),
                        "{} out of order",
                        model
                    );
                    running = Some(r.request_id);
                }
                Event::Failed { .. } | Event::Delivered { .. } if running == Some(r.request_id) => {
                    running = None;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The engine's invariants on PostgreSQL under random interleavings across
/// two replicas (admissions against a pending cap, starts, failures,
/// cancels, leases run out and taken over): see [`replicas_case`].
/// `PROPTEST_CASES` raises the case count (default 8).
#[test]
fn replicas_keep_every_invariant_under_random_interleavings() {
    let Some(s) = shared() else {
        return;
    };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(8);
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "proptest-regressions/pg_replicas.txt",
            ),
        )),
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(rop(), 1..40), |ops| {
        s.rt.block_on(replicas_case(s, ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The event log's contract (`common/contract.rs`, which sled and the
/// in-memory store pass in `tests/backends.rs`) against the database:
/// positions, reads, intake keys, the request index, checkpoints, named
/// values, and retention's removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_log_keeps_every_promise_of_the_contract() {
    let Some(url) = pg::database().await else {
        return;
    };
    contract::conforms(&connect(&url).await).await;
}

/// The live projection as a full replay of the database log builds it.
async fn replayed(log: &Replica) -> LiveState {
    let mut state = LiveState::default();
    for rec in log.log().read_all().await.unwrap() {
        Follow::apply(&mut state, &rec.unwrap());
    }
    // Up to the head, whose last records retention may have removed.
    Follow::skip(&mut state, log.log().last_position());
    state
}

/// A replica's engine started and stopped (its follower writes a
/// checkpoint as it stops).
async fn start_and_stop(replica: &Arc<Replica>) -> Arc<ReplicaEngine> {
    let stop = tokio_util::sync::CancellationToken::new();
    let (engine, follower) = ReplicaEngine::start(Arc::clone(replica), stop.clone())
        .await
        .unwrap();
    let follower = tokio::spawn(follower);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("the follower stops")
        .unwrap();
    engine
}

/// §9 projections checkpointed: a replica that stops leaves a checkpoint
/// in the database, and the next one starts its committer's state and its
/// view from it — equal to a full replay. From an old checkpoint after a
/// retention sweep: a request the checkpoint holds as unfinished finished
/// and was removed since; the next replica must not take that checkpoint
/// (the request would run again) and reads the whole log instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_start_from_the_checkpoint_and_an_old_one_never_resurrects_a_removed_request() {
    let Some(url) = pg::database().await else {
        return;
    };
    let flux = ModelName::parse("flux").unwrap();
    let a = Arc::new(replica(&url, "a").await);
    assert_eq!(a.log().restored(), &Restored::default(), "an empty log");
    let line = admit_n(&a, 3, 700).await;
    let first = start_and_stop(&a).await;
    assert_eq!(first.restored().checkpoint, None);
    let stored = a.log().load_checkpoint().await.unwrap().map(|(p, _)| p);
    assert_eq!(stored, Some(3), "a stopping replica checkpoints");

    let b = Arc::new(replica(&url, "b").await);
    assert_eq!(b.log().restored().checkpoint, Some(3));
    let engine = start_and_stop(&b).await;
    assert_eq!(engine.restored().checkpoint, Some(3));
    let full = replayed(&b).await;
    assert_eq!(engine.read(Clone::clone), full, "view from the checkpoint");
    // The committer's state too: the head of the line starts.
    assert_eq!(fail_the_head(&b).await, line[0]);
    assert!(
        b.log()
            .save_checkpoint(2, b"older")
            .await
            .is_ok_and(|saved| !saved),
        "an older checkpoint never replaces a newer one"
    );

    // Retention removes the finished request; the checkpoint at 3 still
    // holds it as queued (the replicas were not stopped since).
    assert_eq!(
        b.log()
            .forget_requests(&line[..1], "retention/files", &[1])
            .await
            .unwrap(),
        3
    );
    let c = Arc::new(replica(&url, "c").await);
    let restored = c.log().restored();
    assert_eq!(restored.checkpoint, None, "{restored:?}");
    assert!(
        restored
            .problem
            .as_deref()
            .is_some_and(|p| p.contains(&line[0].to_string())),
        "{restored:?}"
    );
    let engine = start_and_stop(&c).await;
    assert_eq!(engine.restored().checkpoint, None);
    assert!(
        engine.read(|s| s.request(line[0]).is_none()),
        "a removed request is live again"
    );
    assert_eq!(engine.read(Clone::clone), replayed(&c).await);
    // It checkpointed as it stopped: the next start uses that one.
    let d = replica(&url, "d").await;
    assert_eq!(d.log().restored().checkpoint, Some(c.log().last_position()));
    let next = d.start_next(&flux, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.expect("the next starts").record.request_id, line[1]);
}

/// `n` requests of user 1 for flux admitted through `log`, updates from
/// `first_update` on; their ids in queue order.
async fn admit_n(log: &Replica, n: u32, first_update: u32) -> Vec<RequestId> {
    let mut ids = Vec::new();
    for i in 0..n {
        match log
            .admit(request(1, first_update + i, "a fox"), &limits(10, 10))
            .await
            .unwrap()
        {
            Admitted::Queued { id, .. } => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    ids
}

/// Starts flux's head on `log`, fails it and releases the lease; its id.
async fn fail_the_head(log: &Replica) -> RequestId {
    let flux = ModelName::parse("flux").unwrap();
    let begun = log
        .start_next(&flux, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the head starts");
    let id = begun.record.request_id;
    log.step(&begun.lease, id, fail()).await.unwrap();
    log.release(&begun.lease).await.unwrap();
    id
}

/// A replica's copy keeps the unfinished requests and the recently
/// finished ones: a finished request older than the window is forgotten
/// from memory, and a button naming it is still answered (from the
/// database); an old request still waiting is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_copy_forgets_old_finished_requests_but_can_still_read_them() {
    let Some(url) = pg::database().await else {
        return;
    };
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let log = Replica::connect(&SecretString::from(url.clone()), "a", clock.clone())
        .await
        .unwrap();
    let log = Arc::new(log);
    let ids = admit_n(&log, 2, 800).await;
    assert_eq!(fail_the_head(&log).await, ids[0]);
    let engine = start_and_stop(&log).await;
    assert_eq!(engine.store().events_of(ids[0]).unwrap().len(), 3);
    assert_eq!(engine.prune(), 0, "recent: kept");
    clock.advance(chrono::Duration::hours(2));
    assert_eq!(engine.prune(), 1, "the finished one goes");
    assert!(engine.store().events_of(ids[0]).unwrap().is_empty());
    assert_eq!(
        engine.store().events_of(ids[1]).unwrap().len(),
        1,
        "a waiting request stays"
    );
    let read = engine.request_events(ids[0]).await.unwrap();
    let names: Vec<&str> = read
        .iter()
        .map(|r| r.as_ref().unwrap().event.name())
        .collect();
    assert_eq!(
        names,
        ["queued", "started", "failed"],
        "read from the database"
    );
}

/// Retention on the database: two replicas sweeping at once move each
/// finished request past the cutoff — every event, its intake keys gone —
/// to the archive table once; an unfinished one stays however old; a
/// second sweep moves nothing. The operator's tools read the archive as
/// they read a data dir's (`replay --verify --with-archive`, `audit show`
/// of an archived request), and the log alone still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_moves_finished_requests_to_the_archive_table_once() {
    use easel::ops::retention::sweep_database;
    let Some(url) = pg::database().await else {
        return;
    };
    let (a, b) = (replica(&url, "a").await, replica(&url, "b").await);
    let ids = admit_n(&a, 3, 900).await;
    assert_eq!(fail_the_head(&a).await, ids[0]);
    b.cancel(ids[1]).await.unwrap();
    let cutoff = Utc::now() + chrono::Duration::seconds(1);
    let never = || false;
    let (x, y) = tokio::join!(
        sweep_database(a.log(), cutoff, &never),
        sweep_database(b.log(), cutoff, &never)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.events + y.events, 5, "{x:?} {y:?}: each event moved once");
    assert_eq!(x.requests + y.requests, 2, "{x:?} {y:?}");
    let archived: Vec<u64> = a
        .log()
        .read_archive()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(archived.len(), 5);
    for id in &ids[..2] {
        assert!(a.log().events_of(*id).await.unwrap().is_empty());
    }
    assert_eq!(
        a.log().find_update(900).await.unwrap(),
        None,
        "its intake key went"
    );
    assert_eq!(
        a.log().events_of(ids[2]).await.unwrap().len(),
        1,
        "a waiting request stays"
    );
    let again = sweep_database(a.log(), cutoff, &never).await.unwrap();
    assert_eq!((again.requests, again.events), (0, 0), "run twice");

    let dir = tempfile::tempdir().unwrap();
    let (code, out) = easel_cli(
        dir.path(),
        Some(&url),
        &["replay", "--verify", "--with-archive"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = easel_cli(dir.path(), Some(&url), &["replay", "--verify"]).await;
    assert_eq!(code, 0, "the log alone verifies: {out}");
    let (code, out) = easel_cli(
        dir.path(),
        Some(&url),
        &["audit", "show", &ids[0].to_string()],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("failed"), "{out}");
    let (code, out) = easel_cli(dir.path(), Some(&url), &["export", "--with-archive"]).await;
    assert_eq!((code, out.lines().count()), (0, 6), "{out}");
}

/// Idle runners ask their replica's view, not the database: a replica
/// with an sdxl runner takes no transaction for it while ten flux
/// requests are admitted (its commits are exactly the ten admissions),
/// and when sdxl requests come the view wakes the runners. With two
/// replicas, the one that won the model's lease keeps it while the queue
/// has work, so nobody takes a transaction racing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runner_takes_no_transaction_while_other_models_work() {
    let Some(url) = pg::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(replica(&url, "a").await);
    let stop = tokio_util::sync::CancellationToken::new();
    let (view, follower) = ReplicaEngine::start(Arc::clone(&a), stop.clone())
        .await
        .unwrap();
    let follower = tokio::spawn(follower);
    let (worker, sent) = (Arc::new(Worker::default()), Arc::new(Sent::default()));
    let stages = Stages::new(
        ModelName::parse("sdxl").unwrap(),
        Arc::new(SamePrompt),
        Arc::clone(&worker),
        Arc::clone(&sent),
        Arc::new(ImageStore::open(dir.path()).unwrap()),
    );
    let runner = ReplicaRunner::new(Arc::clone(&a), stages, LeaseTimes::default())
        .with_hint(view.work_hint());
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { runner.run(stop).await }
    });
    let before = a.log().commit_count();
    for i in 0..10u32 {
        let admitted = a
            .admit(request(1, 1000 + i, "a fox"), &limits(20, 20))
            .await;
        let Ok(Admitted::Queued { seq, .. }) = admitted else {
            panic!("{admitted:?}")
        };
        // The view shows it (and the runner had its chance to look).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while view.position() < seq {
            assert!(tokio::time::Instant::now() < deadline, "not shown in 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(
        a.log().commit_count() - before,
        10,
        "the idle sdxl runner took transactions"
    );
    // A second replica with its own sdxl runner: four sdxl requests are
    // run one after the other by whichever replica won the lease first,
    // which keeps it from one to the next (`continue_next`), so the other
    // replica's runner sees it held and races for nothing. (A gap
    // between two admissions may empty the queue for a moment: then the
    // lease is released and claimed again, so the four are admitted at
    // once.)
    let b = Arc::new(replica(&url, "b").await);
    let (view_b, follower_b) = ReplicaEngine::start(Arc::clone(&b), stop.clone())
        .await
        .unwrap();
    let follower_b = tokio::spawn(follower_b);
    let stages = Stages::new(
        ModelName::parse("sdxl").unwrap(),
        Arc::new(SamePrompt),
        Arc::clone(&worker),
        Arc::clone(&sent),
        Arc::new(ImageStore::open(&dir.path().join("b")).unwrap()),
    );
    let runner_b = ReplicaRunner::new(Arc::clone(&b), stages, LeaseTimes::default())
        .with_hint(view_b.work_hint());
    let run_b = tokio::spawn({
        let stop = stop.clone();
        async move { runner_b.run(stop).await }
    });
    let admissions = (0..4u32).map(|i| {
        let mut req = request(2, 1100 + i, "a hen");
        req.model = ModelName::parse("sdxl").unwrap();
        a.admit_now(req, &limits(20, 20)).unwrap()
    });
    let admissions: Vec<_> = admissions.collect();
    let mut line = Vec::new();
    for admission in admissions {
        let Admitted::Queued { id, .. } = a.admitted(admission).await.unwrap() else {
            panic!("not queued")
        };
        line.push(id);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sent.0.lock().unwrap().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*sent.0.lock().unwrap(), line, "in queue order, once each");
    // One claim for the four: the lease never changed hands.
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let epoch: i64 = admin
        .query_one("SELECT epoch FROM easel_leases WHERE model = 'sdxl'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, 1, "the lease was claimed again between requests");
    stop.cancel();
    run.await.unwrap();
    run_b.await.unwrap();
    follower.await.unwrap();
    follower_b.await.unwrap();
}

/// §7 on replicas (part of the two-process test, on its replicas): the
/// "failing in a row" count is the whole bot's (each replica counts it
/// from the log they all follow), and one replica — the holder of the
/// alerter's lease — tells the operator: three failing requests sent
/// alternately to the two replica processes bring exactly one alert,
/// whichever replicas ran them (two without the election).
async fn replicas_alert_the_operator_once(
    client: &reqwest::Client,
    replicas: &[Replicant],
    tg: &FakeTelegram,
) {
    const OPERATOR: i64 = 777_000;
    for user in 31..=33i64 {
        tg.user_sends(
            user,
            user,
            &format!("/image=flux=a storm that will explode {user}"),
        );
    }
    for (i, update) in tg.take_updates().iter().enumerate() {
        assert_eq!(deliver(client, &replicas[i % 2].hook, update).await, 200);
    }
    let alerted = |c: &[easel::demo::fake_telegram::Call]| {
        c.iter()
            .filter(|c| c.chat_id == Some(OPERATOR))
            .filter(|c| {
                c.text
                    .as_deref()
                    .is_some_and(|t| t.contains("requests in a row"))
            })
            .count()
    };
    assert!(
        tg.wait_for(Duration::from_secs(30), |c| alerted(c) >= 1)
            .await,
        "no alert: {:?}",
        tg.texts_to(OPERATOR)
    );
    // Both replicas have seen the third failure (their /metrics count
    // three failed), and still one alert.
    until_finished(client, replicas, "failed", |n| n >= 3.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alerted(&tg.calls()), 1, "{:?}", tg.texts_to(OPERATOR));
}
