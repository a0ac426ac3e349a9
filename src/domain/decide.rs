//! The pure decision function: a command against a request's current stage
//! (plus the outside facts that come in with it) gives one event or a typed
//! refusal. Nothing here reads a clock, a disk or a network.

use super::event::{Event, FailureKind, ImageRef};
use super::lifecycle::{IllegalTransition, Stage, next_stage};

/// What the scheduler knows about a model when it asks to start a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulingFacts {
    /// The request is the oldest queued request of its model.
    pub at_head: bool,
    /// No request of that model is in flight.
    pub model_idle: bool,
}

/// A command for an existing request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Start(SchedulingFacts),
    FinishEnhancing {
        prompt: String,
        fallback: Option<String>,
    },
    FinishGenerating {
        image: ImageRef,
        attempts: u32,
        statuses: Vec<String>,
    },
    /// One image of a variation request is done (kept, or failed).
    RecordVariation {
        index: u32,
        image: Option<ImageRef>,
        failure: Option<super::event::VariationFailure>,
        attempts: u32,
        statuses: Vec<String>,
    },
    FinishSending {
        message_id: Option<i32>,
    },
    Fail {
        kind: FailureKind,
        reason: String,
        attempts: u32,
        statuses: Vec<String>,
    },
    Cancel,
    Resume,
    Regenerate,
}

/// Why a command was refused. Refusals are never written to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("only the oldest queued request of a model may start (FIFO)")]
    NotAtHead,
    #[error("another request of this model is in flight (one at a time)")]
    ModelBusy,
}

/// Decides the event for `command` on a request in `stage`.
///
/// # Errors
/// A [`Refusal`] when the lifecycle or the scheduling rules forbid it.
pub fn decide(stage: Stage, command: Command) -> Result<Event, Refusal> {
    let event = match command {
        Command::Start(facts) => {
            // Check the lifecycle first so a started request is refused as
            // illegal, not as "not at head".
            next_stage(stage, super::lifecycle::Step::Start)?;
            if !facts.model_idle {
                return Err(Refusal::ModelBusy);
            }
            if !facts.at_head {
                return Err(Refusal::NotAtHead);
            }
            Event::Started
        }
        Command::FinishEnhancing { prompt, fallback } => Event::Enhanced { prompt, fallback },
        Command::FinishGenerating {
            image,
            attempts,
            statuses,
        } => Event::Generated {
            image,
            attempts,
            statuses,
        },
        Command::RecordVariation {
            index,
            image,
            failure,
            attempts,
            statuses,
        } => Event::Variation {
            index,
            image,
            failure,
            attempts,
            statuses,
        },
        Command::FinishSending { message_id } => Event::Delivered { message_id },
        Command::Fail {
            kind,
            reason,
            attempts,
            statuses,
        } => Event::Failed {
            kind,
            reason,
            attempts,
            statuses,
        },
        Command::Cancel => Event::Cancelled,
        Command::Resume => Event::Resumed { stage },
        Command::Regenerate => Event::Regenerating,
    };
    if let Some(step) = event.step() {
        next_stage(stage, step)?;
    }
    Ok(event)
}
