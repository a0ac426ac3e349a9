//! The audit record of one request, folded from its events alone.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{ChatId, Event, ModelName, RequestId, Stage, UserId, next_stage};
use crate::store::Recorded;

/// One request as the audit shows it (§5's `audit list --json` fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: RequestId,
    pub user_id: UserId,
    pub chat_id: ChatId,
    pub model: ModelName,
    pub prompt: String,
    pub enhanced_prompt: Option<String>,
    pub status: Stage,
    pub error: Option<String>,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Seqs of the request's events, oldest first (not part of the JSON form).
    #[serde(skip, default)]
    pub seqs: Vec<u64>,
}

impl RequestRecord {
    /// Folds a request's events (oldest first). None when the first event is
    /// not its `Queued`. Events the lifecycle refuses are left out, so the
    /// record shows what the live process saw.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Recorded>) -> Option<Self> {
        let mut iter = events.into_iter();
        let first = iter.next()?;
        let Event::Queued {
            model,
            prompt,
            origin,
        } = &first.event
        else {
            return None;
        };
        let mut rec = RequestRecord {
            id: first.request_id,
            user_id: origin.user_id,
            chat_id: origin.chat_id,
            model: model.clone(),
            prompt: prompt.as_str().to_owned(),
            enhanced_prompt: None,
            status: Stage::Queued,
            error: None,
            attempts: 0,
            created_at: first.at,
            updated_at: first.at,
            seqs: vec![first.seq],
        };
        for e in iter {
            rec.apply(e);
        }
        Some(rec)
    }

    fn apply(&mut self, e: &Recorded) {
        let Some(step) = e.event.step() else { return };
        let Ok(to) = next_stage(self.status, step) else {
            return;
        };
        self.status = to;
        self.updated_at = e.at;
        self.seqs.push(e.seq);
        match &e.event {
            Event::Enhanced { prompt, .. } => self.enhanced_prompt = Some(prompt.clone()),
            Event::Generated { attempts, .. } => self.attempts = *attempts,
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
    }
}
