//! The pure domain: request lifecycle, events, decisions and admission rules.
//! No tokio, sled, reqwest or teloxide here, and no clock: time comes in.

pub mod admission;
pub mod decide;
pub mod event;
pub mod ids;
pub mod lifecycle;

pub use admission::{Limits, RateLimit, Rejection};
pub use decide::{Command, Refusal, SchedulingFacts, decide};
pub use event::{Event, FailureKind, ImageRef, Origin, PresetUse, VariationFailure};
pub use ids::{ChatId, ModelName, Prompt, RequestId, UserId};
pub use lifecycle::{IllegalTransition, Stage, Step, next_stage};
