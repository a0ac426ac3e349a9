//! The domain events: one fact each, named for what happened. Stored forms and
//! their versions live in `store::codec`; these are what the domain reasons about.

use serde::{Deserialize, Serialize};

use super::ids::{ChatId, ModelName, Prompt, UserId};
use super::lifecycle::{Stage, Step};

/// Where an accepted request came from in Telegram. Travels with `Queued` so
/// intake can refuse a redelivered update, restarts included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub user_id: UserId,
    pub chat_id: ChatId,
    /// The user's message that asked for the image (None for a button press).
    pub message_id: Option<i32>,
    /// The Telegram update that carried it.
    pub update_id: Option<u32>,
}

/// Why a request failed, in classes the bot can put into plain words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The model's content filter refused the prompt.
    Rejected,
    /// The worker could not be reached or kept answering 5xx/429.
    Unavailable,
    /// The worker did not answer in time.
    TimedOut,
    /// The worker answered, but not with an image.
    BadAnswer,
    /// The worker refused us (auth or configuration, other 4xx).
    Refused,
    /// The model is not configured in this process.
    NotConfigured,
    /// Telegram would not take the image.
    Delivery,
    /// Something failed on our side (e.g. the disk refused the image).
    Internal,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Rejected => "rejected",
            FailureKind::Unavailable => "unavailable",
            FailureKind::TimedOut => "timed_out",
            FailureKind::BadAnswer => "bad_answer",
            FailureKind::Refused => "refused",
            FailureKind::NotConfigured => "not_configured",
            FailureKind::Delivery => "delivery",
            FailureKind::Internal => "internal",
        }
    }
}

/// An image kept on disk between `Generated` and `Delivered`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// File name inside the data dir's image folder.
    pub file: String,
    pub bytes: u64,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
}

/// One fact about one request. Field names are stored: never rename one;
/// add a new version in `store::codec` instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Accepted into `model`'s queue. Always durable before the user is told.
    Queued {
        model: ModelName,
        prompt: Prompt,
        origin: Origin,
    },
    /// Handed to its model by the scheduler (Queued → Enhancing).
    Started,
    /// The prompt to generate from (Enhancing → Generating). `fallback` says
    /// why the original prompt is used when enhancement did not work.
    Enhanced {
        prompt: String,
        fallback: Option<String>,
    },
    /// The worker answered with an image, kept on disk (Generating → Sending).
    /// `statuses` is what each attempt got (e.g. `503`, `timeout`, `200`).
    Generated {
        image: ImageRef,
        attempts: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        statuses: Vec<String>,
    },
    /// Telegram has the image (Sending → Done).
    Delivered { message_id: Option<i32> },
    /// Failed for good.
    Failed {
        kind: FailureKind,
        reason: String,
        attempts: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        statuses: Vec<String>,
    },
    /// Cancelled by its user while still queued.
    Cancelled,
    /// After a restart, `stage` starts over.
    Resumed { stage: Stage },
    /// After a restart in Sending whose kept image is gone: generate again.
    Regenerating,
}

impl Event {
    /// The lifecycle step this event is, except `Queued`, which creates a request.
    pub fn step(&self) -> Option<Step> {
        Some(match self {
            Event::Queued { .. } => return None,
            Event::Started => Step::Start,
            Event::Enhanced { .. } => Step::Enhanced,
            Event::Generated { .. } => Step::Generated,
            Event::Delivered { .. } => Step::Delivered,
            Event::Failed { .. } => Step::Fail,
            Event::Cancelled => Step::Cancel,
            Event::Resumed { .. } => Step::Resume,
            Event::Regenerating => Step::Regenerate,
        })
    }

    /// The stored name, as in `type` of the JSON form and of `easel export`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued { .. } => "queued",
            Event::Started => "started",
            Event::Enhanced { .. } => "enhanced",
            Event::Generated { .. } => "generated",
            Event::Delivered { .. } => "delivered",
            Event::Failed { .. } => "failed",
            Event::Cancelled => "cancelled",
            Event::Resumed { .. } => "resumed",
            Event::Regenerating => "regenerating",
        }
    }

    /// Whether the user is told about this fact, so it must be on disk
    /// before anyone acts on it (group commit keeps that cheap).
    pub fn must_be_durable(&self) -> bool {
        matches!(
            self,
            Event::Queued { .. }
                | Event::Delivered { .. }
                | Event::Failed { .. }
                | Event::Cancelled
        )
    }
}
