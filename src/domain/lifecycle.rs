//! The lifecycle of one request as a statig state machine, used as a pure
//! transition function: given a stage and a step, the next stage or a refusal.

use serde::{Deserialize, Serialize};
use statig::prelude::*;

/// Where a request is in its life. This is the stored, stable form of the
/// statig state (statig's own `State` enum is generated and not stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Queued,
    Enhancing,
    Generating,
    Sending,
    Done,
    Failed,
    Cancelled,
}

impl Stage {
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Done | Stage::Failed | Stage::Cancelled)
    }

    /// Started and not yet terminal: the one request a model may have at a time.
    pub fn is_in_flight(self) -> bool {
        matches!(self, Stage::Enhancing | Stage::Generating | Stage::Sending)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Enhancing => "enhancing",
            Stage::Generating => "generating",
            Stage::Sending => "sending",
            Stage::Done => "done",
            Stage::Failed => "failed",
            Stage::Cancelled => "cancelled",
        }
    }

    pub const ALL: [Stage; 7] = [
        Stage::Queued,
        Stage::Enhancing,
        Stage::Generating,
        Stage::Sending,
        Stage::Done,
        Stage::Failed,
        Stage::Cancelled,
    ];
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can happen to a request: the inputs of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The scheduler hands the request to its model: Queued → Enhancing.
    Start,
    /// The prompt is ready (enhanced or the original): Enhancing → Generating.
    Enhanced,
    /// The worker gave an image, kept on disk: Generating → Sending.
    Generated,
    /// One image of a variation request is done (kept, or failed), and
    /// the next may follow: Generating → Generating.
    Variation,
    /// Telegram accepted the image: Sending → Done.
    Delivered,
    /// Any non-terminal → Failed.
    Fail,
    /// Queued → Cancelled (only a request that has not started).
    Cancel,
    /// After a restart, an in-flight stage starts over (no change of stage).
    Resume,
    /// After a restart in Sending with no kept image: Sending → Generating.
    Regenerate,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Start,
        Step::Enhanced,
        Step::Generated,
        Step::Variation,
        Step::Delivered,
        Step::Fail,
        Step::Cancel,
        Step::Resume,
        Step::Regenerate,
    ];
}

/// The statig machine. Its only shared storage counts transitions so that a
/// step the machine ignored (fell through to the top state) can be told
/// apart from one it took, including a self-transition (`Resume`).
#[derive(Default)]
struct Lifecycle {
    transitions: u32,
}

#[state_machine(
    initial = "State::queued()",
    state(derive(Debug, Clone, Copy, PartialEq, Eq)),
    after_transition = "Self::after_transition"
)]
impl Lifecycle {
    #[state(superstate = "pending")]
    fn queued(event: &Step) -> Outcome<State> {
        match event {
            Step::Start => Transition(State::enhancing()),
            Step::Cancel => Transition(State::cancelled()),
            _ => Super,
        }
    }

    #[state(superstate = "pending")]
    fn enhancing(event: &Step) -> Outcome<State> {
        match event {
            Step::Enhanced => Transition(State::generating()),
            Step::Resume => Transition(State::enhancing()),
            _ => Super,
        }
    }

    #[state(superstate = "pending")]
    fn generating(event: &Step) -> Outcome<State> {
        match event {
            Step::Generated => Transition(State::sending()),
            Step::Variation | Step::Resume => Transition(State::generating()),
            _ => Super,
        }
    }

    #[state(superstate = "pending")]
    fn sending(event: &Step) -> Outcome<State> {
        match event {
            Step::Delivered => Transition(State::done()),
            Step::Resume => Transition(State::sending()),
            Step::Regenerate => Transition(State::generating()),
            _ => Super,
        }
    }

    /// Every non-terminal stage may fail; anything else falls to the top
    /// state, which statig treats as handled without a transition: a refusal.
    #[superstate]
    fn pending(event: &Step) -> Outcome<State> {
        match event {
            Step::Fail => Transition(State::failed()),
            _ => Super,
        }
    }

    #[state]
    fn done(event: &Step) -> Outcome<State> {
        let _ = event;
        Super
    }

    #[state]
    fn failed(event: &Step) -> Outcome<State> {
        let _ = event;
        Super
    }

    #[state]
    fn cancelled(event: &Step) -> Outcome<State> {
        let _ = event;
        Super
    }
}

impl Lifecycle {
    fn after_transition(&mut self, _source: &State, _target: &State, _context: &mut ()) {
        self.transitions += 1;
    }
}

fn to_state(stage: Stage) -> State {
    match stage {
        Stage::Queued => State::Queued {},
        Stage::Enhancing => State::Enhancing {},
        Stage::Generating => State::Generating {},
        Stage::Sending => State::Sending {},
        Stage::Done => State::Done {},
        Stage::Failed => State::Failed {},
        Stage::Cancelled => State::Cancelled {},
    }
}

fn to_stage(state: &State) -> Stage {
    match state {
        State::Queued {} => Stage::Queued,
        State::Enhancing {} => Stage::Enhancing,
        State::Generating {} => Stage::Generating,
        State::Sending {} => Stage::Sending,
        State::Done {} => Stage::Done,
        State::Failed {} => Stage::Failed,
        State::Cancelled {} => Stage::Cancelled,
    }
}

/// A step the lifecycle does not allow from the current stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} request cannot take the step {step:?}")]
pub struct IllegalTransition {
    pub from: Stage,
    pub step: Step,
}

/// The pure transition function: where `step` takes a request in `from`.
///
/// # Errors
/// [`IllegalTransition`] when the lifecycle does not allow it; nothing panics.
pub fn next_stage(from: Stage, step: Step) -> Result<Stage, IllegalTransition> {
    let mut machine = Lifecycle::default().uninitialized_state_machine();
    *machine.state_mut() = to_state(from);
    // No entry actions are defined, so init has no effect beyond marking the
    // machine ready; the transition counter is read before and after.
    let mut machine = machine.init();
    let before = machine.inner().transitions;
    machine.handle(&step);
    if machine.inner().transitions == before {
        Err(IllegalTransition { from, step })
    } else {
        Ok(to_stage(machine.state()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_stages_take_no_step() {
        for stage in [Stage::Done, Stage::Failed, Stage::Cancelled] {
            for step in Step::ALL {
                assert_eq!(
                    next_stage(stage, step),
                    Err(IllegalTransition { from: stage, step })
                );
            }
        }
    }
}
