//! The scheduler core and the recovery rule, driven step by step through
//! `try_execute_step`, and the event-woken `run` loop with models in parallel.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{PNG, RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
use easel::domain::{Event, FailureKind, Limits, ModelName, Stage};
use easel::engine::{
    Admitted, Core, GeneratedImage, GenerationFailure, Generator, ImageStore, Runner, StepOutcome,
};
use easel::store::{EventStore, SledStore};

type TestRunner<G> = Runner<SledStore, UpperEnhancer, G, RecordingDeliverer>;

struct Rig<G: Generator> {
    core: Arc<Core<SledStore>>,
    generator: Arc<G>,
    deliverer: Arc<RecordingDeliverer>,
    images: Arc<ImageStore>,
}

impl<G: Generator> Rig<G> {
    fn runner(&self, model: &str) -> TestRunner<G> {
        Runner::new(
            Arc::clone(&self.core),
            common::model(model),
            Arc::new(UpperEnhancer),
            Arc::clone(&self.generator),
            Arc::clone(&self.deliverer),
            Arc::clone(&self.images),
        )
    }
}

fn rig<G: Generator>(dir: &std::path::Path, generator: Arc<G>) -> Rig<G> {
    let core = Arc::new(common::open_core(&dir.join("log"), common::clock()));
    let images = Arc::new(ImageStore::open(&dir.join("images")).unwrap());
    Rig {
        core,
        generator,
        deliverer: Arc::new(RecordingDeliverer::default()),
        images,
    }
}

async fn accept(
    core: &Core<SledStore>,
    model: &str,
    user: i64,
    prompt: &str,
) -> easel::domain::RequestId {
    let limits = Limits {
        max_pending: 50,
        ..Limits::default()
    };
    match core
        .accept(common::request(model, user, prompt), &limits)
        .await
        .unwrap()
    {
        Admitted::Queued { id, .. } => id,
        other => panic!("{other:?}"),
    }
}

fn events(outcome: StepOutcome) -> (&'static str, Stage) {
    match outcome {
        StepOutcome::Progressed { event, stage, .. } => (event, stage),
        StepOutcome::EmptyQueue => ("-", Stage::Queued),
        StepOutcome::Interrupted { .. } => ("interrupted", Stage::Sending),
    }
}

#[tokio::test]
async fn one_step_at_a_time_through_the_whole_pipeline_in_fifo_order() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    let a = accept(&rig.core, "flux", 1, "a fox").await;
    let b = accept(&rig.core, "flux", 2, "a cat").await;
    let flux = rig.runner("flux");

    let mut seen = Vec::new();
    loop {
        match flux.try_execute_step().await.unwrap() {
            StepOutcome::EmptyQueue => break,
            StepOutcome::Progressed { id, event, .. } => seen.push((id, event)),
            StepOutcome::Interrupted { id } => panic!("{id} interrupted without a shutdown"),
        }
        // One at a time: never more than one flux request out of the queue.
        let busy = rig
            .core
            .read(|s| s.requests().filter(|r| r.stage.is_in_flight()).count());
        assert!(busy <= 1);
    }
    let steps = ["started", "enhanced", "generated", "delivered"];
    let expected: Vec<_> = [a, b]
        .iter()
        .flat_map(|id| steps.iter().map(move |e| (*id, *e)))
        .collect();
    assert_eq!(seen, expected);
    // The worker got the enhanced prompt; the user got the kept bytes.
    let calls = rig.generator.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        vec!["A FOX", "A CAT"]
    );
    let delivered = rig.deliverer.delivered.lock().unwrap().clone();
    assert_eq!(delivered, vec![(a, PNG.to_vec()), (b, PNG.to_vec())]);
    // A model with no requests has nothing to do.
    assert_eq!(
        rig.runner("sdxl").try_execute_step().await.unwrap(),
        StepOutcome::EmptyQueue
    );
}

#[tokio::test]
async fn a_failed_generation_frees_the_model_for_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let generator = Arc::new(ScriptedGenerator::default());
    generator
        .script
        .lock()
        .unwrap()
        .push_back(Err(FailureKind::Rejected));
    let rig = rig(dir.path(), generator);
    let a = accept(&rig.core, "sdxl", 1, "bad").await;
    let b = accept(&rig.core, "sdxl", 2, "good").await;
    let sdxl = rig.runner("sdxl");
    assert_eq!(
        events(sdxl.try_execute_step().await.unwrap()),
        ("started", Stage::Enhancing)
    );
    assert_eq!(
        events(sdxl.try_execute_step().await.unwrap()),
        ("enhanced", Stage::Generating)
    );
    assert_eq!(
        events(sdxl.try_execute_step().await.unwrap()),
        ("failed", Stage::Failed)
    );
    assert!(rig.core.read(|s| s.request(a).is_none()));
    let log: Vec<_> = rig
        .core
        .store()
        .events_of(a)
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().event)
        .collect();
    assert!(
        matches!(
            log.last(),
            Some(Event::Failed {
                kind: FailureKind::Rejected,
                ..
            })
        ),
        "{log:?}"
    );
    assert_eq!(
        events(sdxl.try_execute_step().await.unwrap()),
        ("started", Stage::Enhancing)
    );
    assert_eq!(
        rig.core.read(|s| s.in_flight(&common::model("sdxl"))),
        Some(b)
    );
}

/// Drives `model` until its in-flight request reaches `stage`.
async fn step_until<G: Generator>(
    runner: &TestRunner<G>,
    core: &Core<SledStore>,
    id: easel::domain::RequestId,
    stage: Stage,
) {
    for _ in 0..10 {
        if core.read(|s| s.request(id).map(|r| r.stage)) == Some(stage) {
            return;
        }
        runner.try_execute_step().await.unwrap();
    }
    panic!("never reached {stage}");
}

#[tokio::test]
async fn recovery_restarts_enhancing_and_keeps_the_queue_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
        let a = accept(&rig.core, "flux", 1, "first").await;
        let b = accept(&rig.core, "flux", 2, "second").await;
        rig.runner("flux").try_execute_step().await.unwrap();
        (a, b)
    }; // "crash" with a in Enhancing, b queued
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    let resumed = rig.core.recover().await.unwrap();
    assert_eq!(resumed.len(), 1);
    assert_eq!(
        (resumed[0].request_id, &resumed[0].event),
        (
            a,
            &Event::Resumed {
                stage: Stage::Enhancing
            }
        )
    );
    assert_eq!(rig.core.read(|s| s.position(b)), Some(1));
    let flux = rig.runner("flux");
    assert_eq!(
        events(flux.try_execute_step().await.unwrap()),
        ("enhanced", Stage::Generating)
    );
    step_until(&flux, &rig.core, b, Stage::Enhancing).await;
    assert_eq!(rig.deliverer.delivered.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn recovery_in_sending_resends_the_kept_image_without_regenerating() {
    let dir = tempfile::tempdir().unwrap();
    let a = {
        let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
        let a = accept(&rig.core, "flux", 1, "fox").await;
        step_until(&rig.runner("flux"), &rig.core, a, Stage::Sending).await;
        assert_eq!(rig.generator.calls.lock().unwrap().len(), 1);
        a
    };
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    rig.core.recover().await.unwrap();
    let flux = rig.runner("flux");
    assert_eq!(
        events(flux.try_execute_step().await.unwrap()),
        ("delivered", Stage::Done)
    );
    assert!(
        rig.generator.calls.lock().unwrap().is_empty(),
        "regenerated although the image was kept"
    );
    assert_eq!(
        rig.deliverer.delivered.lock().unwrap().clone(),
        vec![(a, PNG.to_vec())]
    );
}

#[tokio::test]
async fn recovery_in_sending_without_the_image_regenerates() {
    let dir = tempfile::tempdir().unwrap();
    let a = {
        let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
        let a = accept(&rig.core, "flux", 1, "fox").await;
        step_until(&rig.runner("flux"), &rig.core, a, Stage::Sending).await;
        a
    };
    for f in std::fs::read_dir(dir.path().join("images")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    rig.core.recover().await.unwrap();
    let flux = rig.runner("flux");
    assert_eq!(
        events(flux.try_execute_step().await.unwrap()),
        ("regenerating", Stage::Generating)
    );
    assert_eq!(
        events(flux.try_execute_step().await.unwrap()),
        ("generated", Stage::Sending)
    );
    assert_eq!(
        events(flux.try_execute_step().await.unwrap()),
        ("delivered", Stage::Done)
    );
    assert_eq!(rig.generator.calls.lock().unwrap().len(), 1);
    assert_eq!(rig.deliverer.delivered.lock().unwrap()[0].0, a);
}

/// flux's worker hangs until released; sdxl's answers at once.
struct GatedGenerator {
    flux_gate: tokio::sync::Semaphore,
}

impl Default for GatedGenerator {
    fn default() -> Self {
        GatedGenerator {
            flux_gate: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Generator for GatedGenerator {
    async fn generate(
        &self,
        model: &ModelName,
        _prompt: &str,
        _input: Option<&[u8]>,
    ) -> Result<GeneratedImage, GenerationFailure> {
        if model.as_str() == "flux" {
            let _permit = self
                .flux_gate
                .acquire()
                .await
                .map_err(|_| GenerationFailure {
                    kind: FailureKind::Unavailable,
                    reason: "gate closed".into(),
                    attempts: 1,
                    statuses: Vec::new(),
                })?;
        }
        Ok(GeneratedImage {
            bytes: PNG.to_vec(),
            format: "png".into(),
            attempts: 1,
            statuses: Vec::new(),
        })
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_wake_on_events_and_a_stuck_model_never_delays_another() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Arc::new(GatedGenerator::default()));
    let stop_tx = tokio_util::sync::CancellationToken::new();
    let stop_rx = stop_tx.clone();
    let flux = Arc::new(rig.runner("flux"));
    let sdxl = Arc::new(rig.runner("sdxl"));
    let tasks = [Arc::clone(&flux), Arc::clone(&sdxl)].map(|r| {
        let rx = stop_rx.clone();
        tokio::spawn(async move { r.run(rx).await })
    });

    let f = accept(&rig.core, "flux", 1, "slow").await;
    let s1 = accept(&rig.core, "sdxl", 2, "fast one").await;
    let s2 = accept(&rig.core, "sdxl", 3, "fast two").await;
    let delivered = |id| {
        let d = Arc::clone(&rig.deliverer);
        move || d.delivered.lock().unwrap().iter().any(|(x, _)| *x == id)
    };
    eventually("both sdxl requests", delivered(s2)).await;
    assert!(delivered(s1)());
    assert_eq!(
        rig.core.read(|s| s.request(f).map(|r| r.stage)),
        Some(Stage::Generating)
    );

    rig.generator.flux_gate.add_permits(1);
    eventually("the flux request", delivered(f)).await;

    stop_tx.cancel();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("runner stops on shutdown")
            .unwrap();
    }
}

/// `/cancel` is idempotent by update id: it cancels only requests of
/// earlier updates, so the same `/cancel` delivered again after a restart
/// never reaches a request the user sent after it.
#[tokio::test]
async fn a_redelivered_cancel_never_reaches_a_later_request() {
    use easel::domain::{Limits, UserId};
    use easel::engine::Admitted;
    let dir = tempfile::tempdir().unwrap();
    let core = common::open_core(dir.path(), common::clock());
    let req = |update: u32| {
        let mut r = common::request("flux", 7, &format!("made by update {update}"));
        r.origin.update_id = Some(update);
        r.origin.message_id = Some(update as i32);
        r
    };
    let limits = Limits::default();
    let Admitted::Queued { id: before, .. } = core.accept(req(100), &limits).await.unwrap() else {
        panic!()
    };
    // The /cancel was update 101; the user then sent update 102.
    let Admitted::Queued { id: after, .. } = core.accept(req(102), &limits).await.unwrap() else {
        panic!()
    };
    let cancelled = core
        .cancel_queued(UserId(7), None, Some(101))
        .await
        .unwrap();
    assert_eq!(cancelled.cancelled(), [before]);
    // Update 101 again (a crash before its offset was saved).
    let again = core
        .cancel_queued(UserId(7), None, Some(101))
        .await
        .unwrap();
    assert!(
        again.cancelled().is_empty(),
        "the redelivered /cancel cancelled {again:?}"
    );
    assert!(core.read(|s| s.request(after).is_some()));
}

#[tokio::test]
async fn cancel_with_a_prefix_cancels_exactly_one_of_the_users_requests_or_none() {
    use easel::domain::UserId;
    use easel::engine::Cancel;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    let limits = Limits {
        rate: easel::domain::RateLimit {
            count: 100,
            window_secs: 60,
        },
        max_pending: 50,
    };
    let queue = |user: i64, prompt: String| {
        let core = Arc::clone(&rig.core);
        async move {
            match core
                .accept(common::request("flux", user, &prompt), &limits)
                .await
                .unwrap()
            {
                Admitted::Queued { id, .. } => id,
                other => panic!("{other:?}"),
            }
        }
    };
    // 17 queued requests: two of them must share their first character.
    let mut mine = Vec::new();
    for i in 0..17 {
        mine.push(queue(7, format!("prompt {i}")).await);
    }
    let other = queue(8, "someone else's".into()).await;
    let first = |id: &easel::domain::RequestId| id.to_string()[..1].to_owned();
    let shared = mine
        .iter()
        .map(first)
        .find(|c| mine.iter().filter(|id| first(id) == *c).count() > 1)
        .unwrap();
    // Ambiguous: nothing cancelled, the candidates listed (oldest first).
    match rig
        .core
        .cancel_queued(UserId(7), Some(&shared), None)
        .await
        .unwrap()
    {
        Cancel::Ambiguous(candidates) => {
            let want: Vec<_> = mine
                .iter()
                .filter(|id| first(id) == shared)
                .copied()
                .collect();
            let got: Vec<_> = candidates.iter().map(|(id, _)| *id).collect();
            assert_eq!(got, want);
            assert!(candidates.iter().all(|(_, p)| p.starts_with("prompt ")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.core.read(|s| s.requests().count()), 18);
    // The short id (any case, dashes ignored) cancels exactly that one.
    let target = mine[5];
    let short = target.short().to_ascii_uppercase();
    let done = rig
        .core
        .cancel_queued(UserId(7), Some(&short), None)
        .await
        .unwrap();
    assert_eq!(done, Cancel::Done(vec![target]));
    // Another user's id matches nothing of this user's, and is not cancelled.
    let theirs = rig
        .core
        .cancel_queued(UserId(7), Some(&other.short()), None)
        .await
        .unwrap();
    assert!(
        theirs.cancelled().is_empty() || mine.iter().any(|m| m.short() == other.short()),
        "{theirs:?}"
    );
    assert!(rig.core.read(|s| s.request(other).is_some()));
}

#[tokio::test]
async fn the_janitor_removes_expired_images_but_never_those_of_an_unfinished_request() {
    use easel::maintenance::sweep_images;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    let waiting = accept(&rig.core, "flux", 1, "a fox").await;
    // An image of the unfinished request, one of a request that left the
    // projection (finished or archived), and a stray file.
    let kept = rig.images.keep(waiting, PNG, "png").unwrap();
    let gone = easel::domain::RequestId(uuid::Uuid::now_v7());
    rig.images.keep(gone, PNG, "png").unwrap();
    std::fs::write(rig.images.dir().join("notes.txt"), b"x").unwrap();
    // Image to image: the input of an unfinished request, and one no
    // unfinished request names any more.
    let input = rig.images.keep_input(PNG, "png").unwrap();
    let mut with_input = common::request("sdxl", 2, "the same, in snow");
    with_input.input = Some(input.clone());
    let limits = Limits {
        max_pending: 50,
        ..Limits::default()
    };
    rig.core.accept(with_input, &limits).await.unwrap();
    rig.images.keep_input(PNG, "png").unwrap();

    // Younger than the lifetime: nothing goes.
    assert_eq!(
        sweep_images(&*rig.core, &rig.images, Duration::from_secs(3600)).unwrap(),
        0
    );
    // Past it: all but the unfinished requests' image and input.
    assert_eq!(
        sweep_images(&*rig.core, &rig.images, Duration::ZERO).unwrap(),
        3
    );
    assert!(rig.images.load(&kept).unwrap().is_some());
    assert!(rig.images.load(&input).unwrap().is_some());
    let left: Vec<_> = std::fs::read_dir(rig.images.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[tokio::test]
async fn requests_of_a_model_no_longer_configured_fail_at_start_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Arc::new(ScriptedGenerator::default()));
    let orphan = accept(&rig.core, "dalle", 1, "a fox").await;
    let kept = accept(&rig.core, "flux", 1, "a hen").await;
    let env = [
        ("TELEGRAM_BOT_TOKEN", "1:x"),
        ("FLUX_WORKER_URL", "http://127.0.0.1:9/generate"),
        ("EASEL_DATA_DIR", dir.path().to_str().unwrap()),
    ];
    let settings = easel::config::Settings::from_sources(
        |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        },
        None,
    )
    .unwrap();
    let failed = easel::maintenance::fail_unconfigured(&rig.core, &settings)
        .await
        .unwrap();
    assert_eq!(failed, 1);
    let last = rig
        .core
        .store()
        .events_of(orphan)
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    match last.event {
        Event::Failed { kind, reason, .. } => {
            assert_eq!(kind, FailureKind::NotConfigured);
            assert!(reason.contains("dalle"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(rig.core.read(|s| s.request(kept).is_some()));
    // Run twice: nothing more to fail.
    assert_eq!(
        easel::maintenance::fail_unconfigured(&rig.core, &settings)
            .await
            .unwrap(),
        0
    );
}
