//! The audit record of one request, folded from its events alone.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{ChatId, Event, ModelName, RequestId, Stage, UserId, next_stage};
use crate::store::Recorded;

/// One request as the audit shows it (§5's `audit list --json` fields).
/// It is the one fold of a request's events for every audit view: `audit
/// list` and `show`, `audit stats`, the demo's summary, and retention's
/// "is it finished" all build it with [`RequestRecord::start`] and
/// [`RequestRecord::apply`]. (The live state, `LiveState`, is the other
/// projection; both take each step through `domain::next_stage`.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: RequestId,
    pub user_id: UserId,
    pub chat_id: ChatId,
    pub model: ModelName,
    pub prompt: String,
    /// The preset the prompt was made with (`prompt` is its template
    /// around what the user wrote, `preset.prompt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<crate::domain::PresetUse>,
    /// The kept input image of an image-to-image request (§8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<crate::domain::ImageRef>,
    /// Images asked for (variations, §8); absent from the JSON when 1.
    #[serde(skip_serializing_if = "is_one", default = "one")]
    pub images: u32,
    /// Each image of a variation request, in order: kept, or why not.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub variations: Vec<ImageOutcome>,
    pub enhanced_prompt: Option<String>,
    pub status: Stage,
    pub error: Option<String>,
    pub attempts: u32,
    #[serde(serialize_with = "millis")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "millis")]
    pub updated_at: DateTime<Utc>,
    /// Seqs of the request's events, oldest first (not part of the JSON form).
    #[serde(skip, default)]
    pub seqs: Vec<u64>,
    /// How long each stage took, in the order they ended: `queue_wait`,
    /// `enhancing`, `generating` (again after a regeneration), `sending`
    /// (not part of the JSON form).
    #[serde(skip, default)]
    pub stage_ms: Vec<(&'static str, i64)>,
    /// When the stage now under way began, per the event that began it.
    #[serde(skip, default)]
    began: Vec<(&'static str, DateTime<Utc>)>,
}

/// One image of a variation request as the audit shows it: kept when
/// `error` is None.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOutcome {
    pub index: u32,
    pub error: Option<String>,
}

fn one() -> u32 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Times as §5 shows them: RFC 3339 in UTC with milliseconds
/// (`2026-11-25T10:00:01.250Z`), the same as `at` of an exported event.
pub fn millis<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

impl RequestRecord {
    /// Folds a request's events (oldest first). None when the first event is
    /// not its `Queued`. Events the lifecycle refuses are left out, so the
    /// record shows what the live process saw.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Recorded>) -> Option<Self> {
        let mut iter = events.into_iter();
        let mut rec = Self::start(iter.next()?)?;
        for e in iter {
            rec.apply(e);
        }
        Some(rec)
    }

    /// A new record from its request's `Queued`; None for any other event.
    pub fn start(first: &Recorded) -> Option<Self> {
        let Event::Queued {
            model,
            prompt,
            origin,
            preset,
            input,
            images,
            ..
        } = &first.event
        else {
            return None;
        };
        Some(RequestRecord {
            id: first.request_id,
            user_id: origin.user_id,
            chat_id: origin.chat_id,
            model: model.clone(),
            prompt: prompt.as_str().to_owned(),
            preset: preset.clone(),
            input: input.clone(),
            images: *images,
            variations: Vec::new(),
            enhanced_prompt: None,
            status: Stage::Queued,
            error: None,
            attempts: 0,
            created_at: first.at,
            updated_at: first.at,
            seqs: vec![first.seq],
            stage_ms: Vec::new(),
            began: vec![("queued", first.at)],
        })
    }

    /// Applies one later event of the request; false (and no change) when
    /// the lifecycle refuses it.
    pub fn apply(&mut self, e: &Recorded) -> bool {
        let Some(step) = e.event.step() else {
            return false;
        };
        let Ok(to) = next_stage(self.status, step) else {
            return false;
        };
        self.status = to;
        self.updated_at = e.at;
        self.seqs.push(e.seq);
        self.time(e);
        match &e.event {
            Event::Enhanced { prompt, .. } => self.enhanced_prompt = Some(prompt.clone()),
            // A variation request counts every image's attempts instead.
            Event::Generated { attempts, .. } if self.variations.is_empty() => {
                self.attempts = *attempts;
            }
            Event::Variation {
                index,
                failure,
                attempts,
                ..
            } => {
                self.attempts += attempts;
                self.variations.push(ImageOutcome {
                    index: *index,
                    error: failure
                        .as_ref()
                        .map(|f| format!("{}: {}", f.kind.as_str(), f.reason)),
                });
            }
            Event::Regenerating => self.variations.clear(),
            Event::Failed {
                kind,
                reason,
                attempts,
                ..
            } => {
                self.attempts = self.attempts.max(*attempts);
                self.error = Some(format!("{}: {reason}", kind.as_str()));
            }
            _ => {}
        }
        true
    }

    /// Ends the stage `e` ends (if any) and notes when the next began.
    fn time(&mut self, e: &Recorded) {
        let edge = match &e.event {
            Event::Started => Some(("queued", "queue_wait")),
            Event::Enhanced { .. } => Some(("started", "enhancing")),
            Event::Generated { .. } => Some(("enhanced", "generating")),
            Event::Delivered { .. } => Some(("generated", "sending")),
            _ => None,
        };
        if let Some((from, label)) = edge
            && let Some((_, t)) = self.began.iter().find(|(k, _)| *k == from)
        {
            self.stage_ms.push((label, (e.at - *t).num_milliseconds()));
        }
        // A regenerated image counts its generating time from the restart.
        let key = if matches!(e.event, Event::Regenerating) {
            "enhanced"
        } else {
            e.event.name()
        };
        match self.began.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = e.at,
            None => self.began.push((key, e.at)),
        }
    }
}
