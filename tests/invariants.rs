//! Property test of the whole core against a reference model: random
//! interleavings of accept / step / fail / cancel / time / checkpoint /
//! crash-and-restart (a clean drop, and a power cut that loses every event
//! not yet made durable) across three models and several users. After every
//! operation: FIFO per model, at most one in flight per model, no accepted
//! request lost, replay of the log == live state, checkpoint + tail == live
//! state. Requests may ask for several images (variations, §8): they count
//! that many toward the rate limit, their images are made one per step in
//! order, a failed image does not fail the request unless all did, and no
//! image is made twice (a step's generator calls are counted against the
//! model). `PROPTEST_CASES` raises the case count (default 24).

mod common;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::{RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
use easel::domain::{FailureKind, Limits, RateLimit, RequestId, Stage, UserId};
use easel::engine::{
    AcceptError, Admitted, Clock, Core, ImageStore, ManualClock, Runner, StepOutcome,
};
use easel::store::{EventStore, SledStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

const MODELS: [&str; 3] = ["flux", "sdxl", "kandinsky"];
const LIMITS: Limits = Limits {
    rate: RateLimit {
        count: 4,
        window_secs: 30,
    },
    max_pending: 2,
};

#[derive(Clone, Debug)]
enum Op {
    Accept {
        model: usize,
        user: i64,
        images: u32,
    },
    Step {
        model: usize,
        fail: bool,
    },
    Cancel {
        user: i64,
    },
    Tick {
        secs: i64,
    },
    Checkpoint,
    Crash,
    /// A power cut: everything not yet made durable is lost, then restart.
    PowerCut,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..5i64, prop_oneof![3 => Just(1u32), 1 => 2..=3u32])
            .prop_map(|(model, user, images)| Op::Accept { model, user, images }),
        8 => (0..3usize, proptest::bool::weighted(0.2)).prop_map(|(model, fail)| Op::Step { model, fail }),
        1 => (0..5i64).prop_map(|user| Op::Cancel { user }),
        2 => (1..20i64).prop_map(|secs| Op::Tick { secs }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
        1 => Just(Op::PowerCut),
    ]
}

/// What the system should look like, kept by hand.
#[derive(Default)]
struct Model {
    waiting: [VecDeque<RequestId>; 3],
    in_flight: [Option<(RequestId, Stage)>; 3],
    owner: HashMap<RequestId, i64>,
    pending: HashMap<i64, u32>,
    accepted_at: HashMap<i64, Vec<DateTime<Utc>>>,
    accepted: BTreeSet<RequestId>,
    /// Images asked for, per request (1 for a plain request).
    images: HashMap<RequestId, u32>,
    /// Per variation request: images done so far, and how many were kept.
    done: HashMap<RequestId, (u32, u32)>,
    /// Generator calls expected since the system last started.
    calls: usize,
}

impl Model {
    fn admit(&self, user: i64, now: DateTime<Utc>, images: u32) -> bool {
        let pending = self.pending.get(&user).copied().unwrap_or(0);
        let since = now - Duration::seconds(LIMITS.rate.window_secs as i64);
        let recent = self
            .accepted_at
            .get(&user)
            .map_or(0, |v| v.iter().filter(|t| **t > since).count());
        pending < LIMITS.max_pending && recent + images as usize <= LIMITS.rate.count as usize
    }

    fn finish(&mut self, id: RequestId) {
        if let Some(user) = self.owner.get(&id)
            && let Some(p) = self.pending.get_mut(user)
        {
            *p -= 1;
        }
    }
}

type TestRunner = Runner<SledStore, UpperEnhancer, ScriptedGenerator, RecordingDeliverer>;

struct System {
    core: Arc<Core<SledStore>>,
    runners: Vec<TestRunner>,
    generator: Arc<ScriptedGenerator>,
}

async fn start(dir: &Path, clock: &Arc<ManualClock>) -> System {
    let store = SledStore::open(&dir.join("log")).unwrap();
    // A short checkpoint interval so checkpoints happen inside a case.
    let (core, report) = Core::open_with(store, Arc::clone(clock) as Arc<dyn Clock>, 7).unwrap();
    assert!(
        report.corrupt.is_empty() && report.violations.is_empty(),
        "{report:?}"
    );
    let core = Arc::new(core);
    core.recover().await.unwrap();
    let generator = Arc::new(ScriptedGenerator::default());
    let deliverer = Arc::new(RecordingDeliverer::default());
    let images = Arc::new(ImageStore::open(&dir.join("images")).unwrap());
    let runners = MODELS
        .iter()
        .map(|m| {
            Runner::new(
                Arc::clone(&core),
                common::model(m),
                Arc::new(UpperEnhancer),
                Arc::clone(&generator),
                Arc::clone(&deliverer),
                Arc::clone(&images),
            )
        })
        .collect();
    System {
        core,
        runners,
        generator,
    }
}

fn check(sys: &System, model: &Model) -> Result<(), TestCaseError> {
    let live = sys.core.snapshot();
    for (i, name) in MODELS.iter().enumerate() {
        let m = common::model(name);
        let queue: Vec<RequestId> = live
            .lane(&m)
            .map(|l| l.queue.iter().collect())
            .unwrap_or_default();
        prop_assert_eq!(
            &queue,
            &model.waiting[i].iter().copied().collect::<Vec<_>>(),
            "FIFO order of {}",
            name
        );
        for (pos, id) in queue.iter().enumerate() {
            prop_assert_eq!(live.position(*id), Some(pos + 1));
        }
        prop_assert_eq!(
            live.in_flight(&m),
            model.in_flight[i].map(|(id, _)| id),
            "in flight on {}",
            name
        );
        if let Some((id, stage)) = model.in_flight[i] {
            prop_assert_eq!(live.request(id).map(|r| r.stage), Some(stage));
        }
        let busy = live
            .requests()
            .filter(|r| r.model == m && r.stage.is_in_flight())
            .count();
        prop_assert!(busy <= 1, "{} requests of {} in flight", busy, name);
    }
    // No accepted request lost: live, or finished in the log.
    for id in &model.accepted {
        if live.request(*id).is_none() {
            let events = sys.core.store().events_of(*id).unwrap();
            let last = events
                .last()
                .and_then(|e| e.as_ref().ok())
                .map(|r| r.event.name());
            prop_assert!(
                matches!(last, Some("delivered" | "failed" | "cancelled")),
                "{} lost: {:?}",
                id,
                last
            );
        }
    }
    // A variation request's images done so far are the model's: recorded
    // durably, in order, never lost or repeated.
    for (id, (done, kept)) in &model.done {
        if let Some(r) = live.request(*id) {
            prop_assert_eq!(r.variations.len() as u32, *done, "images done of {}", id);
            let live_kept = r.variations.iter().filter(|v| v.image.is_some()).count() as u32;
            prop_assert_eq!(live_kept, *kept, "images kept of {}", id);
        }
    }
    for (user, pending) in &model.pending {
        prop_assert_eq!(live.user(UserId(*user)).map_or(0, |u| u.pending), *pending);
    }
    let (replayed, report) = sys.core.rebuild_from_log().unwrap();
    prop_assert!(
        report.violations.is_empty() && report.corrupt.is_empty(),
        "{:?}",
        report
    );
    prop_assert_eq!(
        &replayed,
        &live,
        "replay from the log differs from the live state"
    );
    let (restored, _) = sys.core.rebuild_from_checkpoint().unwrap();
    prop_assert_eq!(
        &restored,
        &live,
        "checkpoint + tail differs from the live state"
    );
    Ok(())
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let mut sys = start(dir.path(), &clock).await;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Accept {
                model: i,
                user,
                images,
            } => {
                let now = clock.now();
                let expect_ok = model.admit(user, now, images);
                let mut request = common::request(MODELS[i], user, "a prompt");
                request.images = images;
                match sys.core.accept(request, &LIMITS).await {
                    Ok(Admitted::Queued { id, position, .. }) => {
                        prop_assert!(expect_ok, "accepted past a limit");
                        model.waiting[i].push_back(id);
                        prop_assert_eq!(position, model.waiting[i].len());
                        model.owner.insert(id, user);
                        *model.pending.entry(user).or_default() += 1;
                        for _ in 0..images {
                            model.accepted_at.entry(user).or_default().push(now);
                        }
                        model.accepted.insert(id);
                        model.images.insert(id, images);
                    }
                    Err(AcceptError::Rejected(r)) => {
                        prop_assert!(!expect_ok, "wrongly rejected: {:?}", r);
                    }
                    other => prop_assert!(false, "accept: {:?}", other),
                }
            }
            Op::Step { model: i, fail } => {
                if fail {
                    sys.generator
                        .script
                        .lock()
                        .unwrap()
                        .push_back(Err(FailureKind::Unavailable));
                }
                let outcome = sys.runners[i].try_execute_step().await.unwrap();
                sys.generator.script.lock().unwrap().clear();
                let expected = match model.in_flight[i] {
                    None => model.waiting[i]
                        .pop_front()
                        .map(|id| (id, Stage::Enhancing)),
                    Some((id, Stage::Enhancing)) => Some((id, Stage::Generating)),
                    Some((id, Stage::Generating)) => {
                        let n = model.images.get(&id).copied().unwrap_or(1);
                        let (done, kept) = model.done.get(&id).copied().unwrap_or((0, 0));
                        if n == 1 {
                            model.calls += 1;
                            Some((id, if fail { Stage::Failed } else { Stage::Sending }))
                        } else if done < n {
                            // One image per step, in order; a failed one
                            // is recorded and the next follows.
                            model.calls += 1;
                            model.done.insert(id, (done + 1, kept + u32::from(!fail)));
                            Some((id, Stage::Generating))
                        } else {
                            // All done: no image is made again.
                            Some((
                                id,
                                if kept > 0 {
                                    Stage::Sending
                                } else {
                                    Stage::Failed
                                },
                            ))
                        }
                    }
                    Some((id, Stage::Sending)) => Some((id, Stage::Done)),
                    Some(other) => {
                        prop_assert_fail(format!("model in impossible state {other:?}"))?
                    }
                };
                match (outcome, expected) {
                    (StepOutcome::EmptyQueue, None) => {}
                    (StepOutcome::Progressed { id, stage, .. }, Some((eid, estage))) => {
                        prop_assert_eq!((id, stage), (eid, estage));
                        if stage.is_terminal() {
                            model.in_flight[i] = None;
                            model.finish(id);
                        } else {
                            model.in_flight[i] = Some((id, stage));
                        }
                    }
                    (got, want) => prop_assert!(
                        false,
                        "step on {}: got {:?}, want {:?}",
                        MODELS[i],
                        got,
                        want
                    ),
                }
            }
            Op::Cancel { user } => {
                let mut got = sys
                    .core
                    .cancel_queued(UserId(user), None, None)
                    .await
                    .unwrap()
                    .cancelled()
                    .to_vec();
                let mut want = Vec::new();
                for q in &mut model.waiting {
                    q.retain(|id| {
                        let mine = model.owner.get(id) == Some(&user);
                        if mine {
                            want.push(*id);
                        }
                        !mine
                    });
                }
                for id in &want {
                    model.finish(*id);
                }
                got.sort();
                want.sort();
                prop_assert_eq!(got, want);
            }
            Op::Tick { secs } => clock.advance(Duration::seconds(secs)),
            Op::Checkpoint => sys.core.checkpoint().unwrap(),
            Op::Crash => {
                drop(sys);
                sys = start(dir.path(), &clock).await;
                model.calls = 0;
            }
            Op::PowerCut => {
                sys.core.store().lose_unsynced_for_tests().unwrap();
                drop(sys);
                sys = start(dir.path(), &clock).await;
                model.calls = 0;
                after_power_cut(&sys, &mut model)?;
            }
        }
        check(&sys, &model)?;
        prop_assert_eq!(
            sys.generator.calls.lock().unwrap().len(),
            model.calls,
            "generator calls: an image was made twice, or one was skipped"
        );
    }
    Ok(())
}

/// What a power cut may undo: only steps nobody was told of (`Started`,
/// `Enhanced`, `Resumed` are not waited for). An in-flight request may go
/// back to an earlier stage, or to the head of its queue when its start was
/// lost; one that had its image (`Generated` is durable) stays in Sending.
/// Everything acknowledged or finished stays (checked by `check`).
fn after_power_cut(sys: &System, model: &mut Model) -> Result<(), TestCaseError> {
    for (i, name) in MODELS.iter().enumerate() {
        let Some((id, stage)) = model.in_flight[i] else {
            continue;
        };
        let now = sys.core.read(|s| s.request(id).map(|r| r.stage));
        match now {
            Some(Stage::Queued) => {
                prop_assert_eq!(
                    sys.core.read(|s| s.head(&common::model(name))),
                    Some(id),
                    "a request whose start was lost is not back at the head"
                );
                model.in_flight[i] = None;
                model.waiting[i].push_front(id);
            }
            Some(back) => {
                prop_assert!(
                    back <= stage,
                    "{:?} moved on to {:?} by itself",
                    stage,
                    back
                );
                if stage == Stage::Sending {
                    prop_assert_eq!(back, Stage::Sending, "a durable Generated was lost");
                }
                model.in_flight[i] = Some((id, back));
            }
            None => prop_assert!(false, "in-flight {} vanished in a power cut", id),
        }
    }
    Ok(())
}

fn prop_assert_fail<T>(msg: String) -> Result<T, TestCaseError> {
    Err(TestCaseError::fail(msg))
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/invariants.txt",
        ))),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]
    #[test]
    fn the_core_keeps_every_invariant(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_case(ops))?;
    }
}
