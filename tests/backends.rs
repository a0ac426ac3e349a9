//! One conformance suite for every `EventStore`: the sled log and the
//! in-memory store run the same checks of the trait's promises and the
//! same engine scenario (intake, runner, cancel, retention, verify), so a
//! new backend is held to what the engine relies on. The contract itself
//! (`common/contract.rs`) runs against PostgreSQL in `tests/pg_log.rs`.

mod common;
#[path = "common/contract.rs"]
mod contract;

use std::sync::Arc;

use common::{PNG, RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
use easel::domain::{Limits, RequestId, Stage, UserId};
use easel::engine::{Admitted, Core, ImageStore, Runner, StepOutcome};
use easel::store::{EventStore, MemoryStore, SledStore};

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
    contract::conforms(&contract::Embedded(
        &SledStore::open(&dir.path().join("log")).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn the_memory_store_keeps_every_promise_of_the_trait() {
    contract::conforms(&contract::Embedded(&MemoryStore::new())).await;
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
