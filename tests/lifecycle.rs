//! Given/when/then tests of the request lifecycle: every legal transition is
//! taken, every illegal one is a typed refusal and never reaches the log.

mod common;

use easel::domain::{
    Command, Event, FailureKind, ImageRef, Limits, Refusal, SchedulingFacts, Stage, decide,
    next_stage,
};
use easel::engine::{Admitted, CoreError};
use easel::store::EventStore;

fn image() -> ImageRef {
    ImageRef {
        file: "x.png".into(),
        bytes: 3,
        format: "png".into(),
    }
}

/// Every command, with the stage it leads to when legal from each stage.
fn commands() -> Vec<(Command, &'static str)> {
    vec![
        (
            Command::Start(SchedulingFacts {
                at_head: true,
                model_idle: true,
            }),
            "start",
        ),
        (
            Command::FinishEnhancing {
                prompt: "p".into(),
                fallback: None,
            },
            "enhanced",
        ),
        (
            Command::FinishGenerating {
                image: image(),
                attempts: 1,
                statuses: Vec::new(),
            },
            "generated",
        ),
        (
            Command::FinishSending {
                message_id: Some(7),
            },
            "delivered",
        ),
        (
            Command::Fail {
                kind: FailureKind::Unavailable,
                reason: "down".into(),
                attempts: 4,
                statuses: Vec::new(),
            },
            "fail",
        ),
        (Command::Cancel, "cancel"),
        (Command::Resume, "resume"),
        (Command::Regenerate, "regenerate"),
    ]
}

/// The whole transition table of §1 (plus the recovery steps).
fn legal(from: Stage, command: &str) -> Option<Stage> {
    use Stage::*;
    Some(match (from, command) {
        (Queued, "start") => Enhancing,
        (Queued, "cancel") => Cancelled,
        (Enhancing, "enhanced") => Generating,
        (Enhancing, "resume") => Enhancing,
        (Generating, "generated") => Sending,
        (Generating, "resume") => Generating,
        (Sending, "delivered") => Done,
        (Sending, "resume") => Sending,
        (Sending, "regenerate") => Generating,
        (Queued | Enhancing | Generating | Sending, "fail") => Failed,
        _ => return None,
    })
}

#[test]
fn every_legal_transition_is_taken_and_every_illegal_one_refused() {
    let mut legal_count = 0;
    for from in Stage::ALL {
        for (command, name) in commands() {
            let result = decide(from, command);
            match legal(from, name) {
                Some(to) => {
                    let event = result.unwrap_or_else(|r| panic!("{from} + {name} refused: {r}"));
                    let step = event.step().expect("a lifecycle event");
                    assert_eq!(next_stage(from, step), Ok(to), "{from} + {name}");
                    legal_count += 1;
                }
                None => assert!(
                    matches!(result, Err(Refusal::Illegal(e)) if e.from == from),
                    "{from} + {name} should be illegal, got {result:?}"
                ),
            }
        }
    }
    assert_eq!(legal_count, 13);
}

#[test]
fn given_a_busy_model_when_start_then_refused_one_at_a_time() {
    let facts = SchedulingFacts {
        at_head: true,
        model_idle: false,
    };
    assert_eq!(
        decide(Stage::Queued, Command::Start(facts)),
        Err(Refusal::ModelBusy)
    );
}

#[test]
fn given_a_request_behind_another_when_start_then_refused_fifo() {
    let facts = SchedulingFacts {
        at_head: false,
        model_idle: true,
    };
    assert_eq!(
        decide(Stage::Queued, Command::Start(facts)),
        Err(Refusal::NotAtHead)
    );
}

#[test]
fn resume_records_the_stage_it_restarts() {
    assert_eq!(
        decide(Stage::Generating, Command::Resume),
        Ok(Event::Resumed {
            stage: Stage::Generating
        })
    );
}

/// Through the core: a refused command leaves the log exactly as it was.
#[tokio::test]
async fn given_a_log_when_an_illegal_command_then_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let core = common::open_core(dir.path(), common::clock());
    let limits = Limits::default();
    let Admitted::Queued { id: first, .. } = core
        .accept(common::request("flux", 1, "a fox"), &limits)
        .await
        .unwrap()
    else {
        panic!("not queued")
    };
    let Admitted::Queued { id: second, .. } = core
        .accept(common::request("flux", 2, "a cat"), &limits)
        .await
        .unwrap()
    else {
        panic!("not queued")
    };
    let before = core.store().last_seq();

    // Queued cannot finish generating.
    let r = core
        .execute(
            first,
            Command::FinishGenerating {
                image: image(),
                attempts: 1,
                statuses: Vec::new(),
            },
        )
        .await;
    assert!(
        matches!(r, Err(CoreError::Refused(Refusal::Illegal(_)))),
        "{r:?}"
    );
    // The second request cannot overtake the first.
    let r = core.start(second).await;
    assert!(
        matches!(r, Err(CoreError::Refused(Refusal::NotAtHead))),
        "{r:?}"
    );
    assert_eq!(core.store().last_seq(), before);

    // Start the first; then the second still may not start (one at a time).
    core.start_next(&common::model("flux"))
        .await
        .unwrap()
        .expect("started");
    let r = core.start(second).await;
    assert!(
        matches!(r, Err(CoreError::Refused(Refusal::ModelBusy))),
        "{r:?}"
    );
    // A started request cannot be cancelled.
    let r = core.execute(first, Command::Cancel).await;
    assert!(
        matches!(r, Err(CoreError::Refused(Refusal::Illegal(_)))),
        "{r:?}"
    );
    assert_eq!(core.store().last_seq(), before + 1);

    // A finished request is gone from the live state: commands find nothing.
    core.execute(
        first,
        Command::Fail {
            kind: FailureKind::Refused,
            reason: "401".into(),
            attempts: 1,
            statuses: Vec::new(),
        },
    )
    .await
    .unwrap();
    let r = core.execute(first, Command::Resume).await;
    assert!(matches!(r, Err(CoreError::NotFound(_))), "{r:?}");
    assert_eq!(core.store().last_seq(), before + 2);
}
