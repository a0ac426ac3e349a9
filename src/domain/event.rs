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
    /// The user's Telegram `language_code` when Telegram sent one (the
    /// status message and the caption speak it). Added after version 1
    /// records were first written: absent in those, read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// A prompt preset applied to a request (§8): its name and the prompt as
/// the user wrote it, before the template was put around it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetUse {
    pub name: String,
    pub prompt: String,
}

/// Why one image of a variation request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariationFailure {
    pub kind: FailureKind,
    pub reason: String,
}

fn one() -> u32 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_one(n: &u32) -> bool {
    *n == 1
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

    /// Whether the same request may succeed if tried again: the worker was
    /// down, slow or answered nonsense, Telegram or our disk failed — as
    /// opposed to a refusal (content filter, key, configuration).
    pub fn may_pass_on_retry(self) -> bool {
        matches!(
            self,
            FailureKind::Unavailable
                | FailureKind::TimedOut
                | FailureKind::BadAnswer
                | FailureKind::Delivery
                | FailureKind::Internal
        )
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
/// add a new version in `store::codec` instead. Deserialization is written
/// by hand (below) only for speed; it reads exactly what the derived
/// internally-tagged form writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Accepted into `model`'s queue. Always durable before the user is told.
    Queued {
        model: ModelName,
        prompt: Prompt,
        origin: Origin,
        /// The preset the prompt was made with (`prompt` is then its
        /// template around what the user wrote). An optional addition to
        /// version 1: absent when none was used.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preset: Option<PresetUse>,
        /// The user named no model and `model` is the one they chose with
        /// `/model` (§8); replay checks it was their choice at that point.
        /// An optional addition to version 1: absent means false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        remembered: bool,
        /// The input image of an image-to-image request (§8), kept on disk
        /// (synced) before this event was written. A record with one is
        /// written as version 2: a version-1 reader would drop it and draw
        /// from the text alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<ImageRef>,
        /// How many images of the prompt (variations, §8): 1 for a plain
        /// request (absent), 2 up to `EASEL_MAX_VARIATIONS`. A record with
        /// more than one is written as version 2.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        images: u32,
    },
    /// One image of a variation request is done (Generating → Generating):
    /// image `index` (from 1, in order) kept on disk before this is
    /// written, or its failure. After the last, `generated` (at least one
    /// image) or `failed` (none) ends the stage. Version 2.
    Variation {
        index: u32,
        image: Option<ImageRef>,
        failure: Option<VariationFailure>,
        attempts: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        statuses: Vec<String>,
    },
    /// A user chose the model `/image <prompt>` draws with (§8). Not an
    /// event of a request: it is kept under the user's own id,
    /// [`RequestId::choices_of`](crate::domain::RequestId::choices_of).
    ModelChosen { user_id: UserId, model: ModelName },
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
            Event::Queued { .. } | Event::ModelChosen { .. } => return None,
            Event::Started => Step::Start,
            Event::Enhanced { .. } => Step::Enhanced,
            Event::Generated { .. } => Step::Generated,
            Event::Variation { .. } => Step::Variation,
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
            Event::ModelChosen { .. } => "model_chosen",
            Event::Started => "started",
            Event::Enhanced { .. } => "enhanced",
            Event::Generated { .. } => "generated",
            Event::Variation { .. } => "variation",
            Event::Delivered { .. } => "delivered",
            Event::Failed { .. } => "failed",
            Event::Cancelled => "cancelled",
            Event::Resumed { .. } => "resumed",
            Event::Regenerating => "regenerating",
        }
    }

    /// Whether the user is told about this fact, or it is acted on outside
    /// the process, so it must be on disk before anyone acts on it (group
    /// commit keeps that cheap). `Generated` is one: the photo goes out
    /// after it, and if a crash lost it the image would be generated again
    /// and a second, different one sent (at most one image per generation).
    pub fn must_be_durable(&self) -> bool {
        matches!(
            self,
            Event::Queued { .. }
                | Event::ModelChosen { .. }
                | Event::Generated { .. }
                | Event::Variation { .. }
                | Event::Delivered { .. }
                | Event::Failed { .. }
                | Event::Cancelled
        )
    }
}

/// Reading `{"type": …, fields…}` without serde's buffering of internally
/// tagged enums (the replay profile's largest easel-side cost): when `type`
/// comes first, as our encoder always writes it, the remaining fields are
/// read straight into the variant; otherwise the object is buffered once
/// and reordered. The committed v1 fixture checks both paths.
mod de {
    use serde::Deserialize;
    use serde::de::value::MapAccessDeserializer;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

    use super::{Event, FailureKind, ImageRef, Origin, PresetUse};
    use crate::domain::ids::{ModelName, Prompt, UserId};
    use crate::domain::lifecycle::Stage;

    #[derive(Deserialize)]
    struct Queued {
        model: ModelName,
        prompt: Prompt,
        origin: Origin,
        #[serde(default)]
        preset: Option<PresetUse>,
        #[serde(default)]
        remembered: bool,
        #[serde(default)]
        input: Option<ImageRef>,
        #[serde(default = "super::one")]
        images: u32,
    }
    #[derive(Deserialize)]
    struct Variation {
        index: u32,
        image: Option<ImageRef>,
        failure: Option<super::VariationFailure>,
        attempts: u32,
        #[serde(default)]
        statuses: Vec<String>,
    }
    #[derive(Deserialize)]
    struct ModelChosen {
        user_id: UserId,
        model: ModelName,
    }
    #[derive(Deserialize)]
    struct Enhanced {
        prompt: String,
        fallback: Option<String>,
    }
    #[derive(Deserialize)]
    struct Generated {
        image: ImageRef,
        attempts: u32,
        #[serde(default)]
        statuses: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Delivered {
        message_id: Option<i32>,
    }
    #[derive(Deserialize)]
    struct Failed {
        kind: FailureKind,
        reason: String,
        attempts: u32,
        #[serde(default)]
        statuses: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Resumed {
        stage: Stage,
    }

    struct EventVisitor;

    fn rest<'de, A: MapAccess<'de>, T: Deserialize<'de>>(map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }

    fn unit<'de, A: MapAccess<'de>>(mut map: A, event: Event) -> Result<Event, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(event)
    }

    impl<'de> Visitor<'de> for EventVisitor {
        type Value = Event;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an event object with a \"type\"")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
            let Some(first) = map.next_key::<std::borrow::Cow<'de, str>>()? else {
                return Err(de::Error::missing_field("type"));
            };
            if first != "type" {
                // Slow path: buffer the object, put `type` first, and read
                // that with this same visitor.
                let mut fields = serde_json::Map::new();
                fields.insert(first.into_owned(), map.next_value()?);
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    fields.insert(k, v);
                }
                let tag = fields
                    .remove("type")
                    .ok_or_else(|| de::Error::missing_field("type"))?;
                let mut ordered = serde_json::Map::new();
                ordered.insert("type".into(), tag);
                ordered.extend(fields);
                return Event::deserialize(serde_json::Value::Object(ordered))
                    .map_err(de::Error::custom);
            }
            let tag: std::borrow::Cow<'de, str> = map.next_value()?;
            Ok(match tag.as_ref() {
                "queued" => {
                    let q: Queued = rest(map)?;
                    Event::Queued {
                        model: q.model,
                        prompt: q.prompt,
                        origin: q.origin,
                        preset: q.preset,
                        remembered: q.remembered,
                        input: q.input,
                        images: q.images,
                    }
                }
                "variation" => {
                    let v: Variation = rest(map)?;
                    Event::Variation {
                        index: v.index,
                        image: v.image,
                        failure: v.failure,
                        attempts: v.attempts,
                        statuses: v.statuses,
                    }
                }
                "model_chosen" => {
                    let c: ModelChosen = rest(map)?;
                    Event::ModelChosen {
                        user_id: c.user_id,
                        model: c.model,
                    }
                }
                "started" => unit(map, Event::Started)?,
                "enhanced" => {
                    let e: Enhanced = rest(map)?;
                    Event::Enhanced {
                        prompt: e.prompt,
                        fallback: e.fallback,
                    }
                }
                "generated" => {
                    let g: Generated = rest(map)?;
                    Event::Generated {
                        image: g.image,
                        attempts: g.attempts,
                        statuses: g.statuses,
                    }
                }
                "delivered" => Event::Delivered {
                    message_id: rest::<_, Delivered>(map)?.message_id,
                },
                "failed" => {
                    let f: Failed = rest(map)?;
                    Event::Failed {
                        kind: f.kind,
                        reason: f.reason,
                        attempts: f.attempts,
                        statuses: f.statuses,
                    }
                }
                "cancelled" => unit(map, Event::Cancelled)?,
                "resumed" => Event::Resumed {
                    stage: rest::<_, Resumed>(map)?.stage,
                },
                "regenerating" => unit(map, Event::Regenerating)?,
                other => {
                    return Err(de::Error::unknown_variant(
                        other,
                        &[
                            "queued",
                            "started",
                            "enhanced",
                            "generated",
                            "delivered",
                            "failed",
                            "cancelled",
                            "resumed",
                            "regenerating",
                        ],
                    ));
                }
            })
        }
    }

    impl<'de> Deserialize<'de> for Event {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EventVisitor)
        }
    }
}
