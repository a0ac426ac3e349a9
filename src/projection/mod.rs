//! Projections: the live state (per-model FIFO queues with O(log n)
//! positions, the in-flight request per model, per-user load) and audit
//! records, each built only by applying logged events in seq order.

mod fifo;
pub mod record;

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use fifo::FifoQueue;
pub use record::RequestRecord;

use crate::domain::admission::{self, MAX_RATE_WINDOW_SECS, MAX_RECENT_PER_USER};
use crate::domain::{
    Event, ImageRef, Limits, ModelName, Origin, Prompt, RequestId, Stage, UserId, next_stage,
};
use crate::store::Recorded;

/// How many recent run times per model feed the wait estimate.
const RECENT_RUNS: usize = 20;
/// Every this many events, users with nothing pending and no acceptance
/// inside the longest rate window are forgotten. Tied to seq (not to a
/// clock) so a replay forgets exactly what the live process forgot.
const USER_SWEEP_EVERY: u64 = 4096;

/// One model's lane: who waits, who runs, how long runs took lately.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    pub queue: FifoQueue,
    pub in_flight: Option<RequestId>,
    /// Started → terminal durations in ms, newest last.
    pub recent_runs_ms: VecDeque<u64>,
}

/// A request that has not reached a terminal stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRequest {
    pub id: RequestId,
    pub model: ModelName,
    pub origin: Origin,
    pub prompt: Prompt,
    pub enhanced_prompt: Option<String>,
    /// The prompt to draw is the user's own (enhancement off or failed):
    /// the caption says so. (Default for checkpoints written before it.)
    #[serde(default)]
    pub prompt_as_written: bool,
    pub stage: Stage,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub image: Option<ImageRef>,
    /// The input image of an image-to-image request (§8). (Default for
    /// checkpoints written before it.)
    #[serde(default)]
    pub input: Option<ImageRef>,
    /// Images asked for (variations, §8); 1 for a plain request.
    #[serde(default = "one")]
    pub images: u32,
    /// The images of a variation request done so far, in order: each kept
    /// (`Some`) or failed (`None`, with why).
    #[serde(default)]
    pub variations: Vec<VariationDone>,
}

/// One finished image of a variation request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariationDone {
    pub image: Option<ImageRef>,
    pub failure: Option<crate::domain::VariationFailure>,
}

fn one() -> u32 {
    1
}

/// A user's load: unfinished requests and recent acceptance times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLoad {
    pub pending: u32,
    pub recent: VecDeque<DateTime<Utc>>,
}

/// An event that breaks a rule of §1 or of the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("seq {seq}: sequence numbers must increase (previous {previous})")]
    SeqNotIncreasing { seq: u64, previous: u64 },
    #[error("seq {seq}, request {id}: queued twice")]
    DuplicateRequest { seq: u64, id: RequestId },
    #[error(
        "seq {seq}, request {id}: event '{event}' for a request that is unknown or already finished"
    )]
    UnknownRequest {
        seq: u64,
        id: RequestId,
        event: &'static str,
    },
    #[error("seq {seq}, request {id}: illegal transition: '{event}' from {from}")]
    Illegal {
        seq: u64,
        id: RequestId,
        from: Stage,
        event: &'static str,
    },
    #[error(
        "seq {seq}, request {id}: FIFO violated on {model}: started while {head} was ahead of it"
    )]
    NotFifo {
        seq: u64,
        id: RequestId,
        model: ModelName,
        head: RequestId,
    },
    #[error(
        "seq {seq}, request {id}: one-at-a-time violated on {model}: {other} was still in flight"
    )]
    TwoInFlight {
        seq: u64,
        id: RequestId,
        model: ModelName,
        other: RequestId,
    },
    #[error(
        "seq {seq}, request {id}: queued on {model} as the user's remembered model, but their choice at that point was {chosen}"
    )]
    NotRemembered {
        seq: u64,
        id: RequestId,
        model: ModelName,
        chosen: String,
    },
    #[error("seq {seq}: a model choice recorded under {id}, which is not its user's id")]
    ChoiceMisfiled { seq: u64, id: RequestId },
    #[error(
        "seq {seq}, request {id}: image {index} of {of} recorded where image {expected} was next"
    )]
    VariationOrder {
        seq: u64,
        id: RequestId,
        index: u32,
        expected: u32,
        of: u32,
    },
}

impl Violation {
    /// The rule broken, as a stable name for `--json`.
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::SeqNotIncreasing { .. } => "seq_order",
            Violation::DuplicateRequest { .. } => "duplicate_request",
            Violation::UnknownRequest { .. } => "unknown_request",
            Violation::Illegal { .. } => "illegal_transition",
            Violation::NotFifo { .. } => "fifo",
            Violation::TwoInFlight { .. } => "one_at_a_time",
            Violation::NotRemembered { .. } => "remembered_model",
            Violation::ChoiceMisfiled { .. } => "model_choice",
            Violation::VariationOrder { .. } => "variation_order",
        }
    }

    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Violation::SeqNotIncreasing { .. } => None,
            Violation::DuplicateRequest { id, .. }
            | Violation::UnknownRequest { id, .. }
            | Violation::Illegal { id, .. }
            | Violation::NotFifo { id, .. }
            | Violation::TwoInFlight { id, .. }
            | Violation::NotRemembered { id, .. }
            | Violation::ChoiceMisfiled { id, .. }
            | Violation::VariationOrder { id, .. } => Some(*id),
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Violation::SeqNotIncreasing { seq, .. }
            | Violation::DuplicateRequest { seq, .. }
            | Violation::UnknownRequest { seq, .. }
            | Violation::Illegal { seq, .. }
            | Violation::NotFifo { seq, .. }
            | Violation::TwoInFlight { seq, .. }
            | Violation::NotRemembered { seq, .. }
            | Violation::ChoiceMisfiled { seq, .. }
            | Violation::VariationOrder { seq, .. } => *seq,
        }
    }
}

/// Everything the scheduler, admission and status messages need, for the
/// requests that are not finished. Finished requests leave it, so its size
/// follows the queues, not the history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveState {
    pub last_seq: u64,
    lanes: BTreeMap<ModelName, Lane>,
    requests: BTreeMap<RequestId, ActiveRequest>,
    users: BTreeMap<UserId, UserLoad>,
    /// Each user's remembered model (`/model`, §8). (Default for
    /// checkpoints written before it.)
    #[serde(default)]
    chosen: BTreeMap<UserId, ModelName>,
}

impl LiveState {
    /// The model `user` chose with `/model`, if any.
    pub fn chosen_model(&self, user: UserId) -> Option<&ModelName> {
        self.chosen.get(&user)
    }

    /// Applies one event. An event that breaks a rule changes nothing and
    /// is returned as a [`Violation`]; the live process never appends one.
    ///
    /// # Errors
    /// The [`Violation`], naming seq, request and rule.
    pub fn apply(&mut self, rec: &Recorded) -> Result<(), Violation> {
        if rec.seq <= self.last_seq {
            return Err(Violation::SeqNotIncreasing {
                seq: rec.seq,
                previous: self.last_seq,
            });
        }
        let result = self.apply_event(rec);
        self.last_seq = rec.seq;
        if rec.seq.is_multiple_of(USER_SWEEP_EVERY) {
            self.sweep_users(rec.at);
        }
        result
    }

    fn apply_event(&mut self, rec: &Recorded) -> Result<(), Violation> {
        let id = rec.request_id;
        let seq = rec.seq;
        if let Event::ModelChosen { user_id, model } = &rec.event {
            if id != RequestId::choices_of(*user_id) {
                return Err(Violation::ChoiceMisfiled { seq, id });
            }
            self.chosen.insert(*user_id, model.clone());
            return Ok(());
        }
        if let Event::Queued {
            model,
            prompt,
            origin,
            remembered,
            input,
            images,
            ..
        } = &rec.event
        {
            if self.requests.contains_key(&id) {
                return Err(Violation::DuplicateRequest { seq, id });
            }
            // A request drawn with the remembered model names the choice in
            // force when it was queued: a later /model never applies to it.
            if *remembered && self.chosen.get(&origin.user_id) != Some(model) {
                return Err(Violation::NotRemembered {
                    seq,
                    id,
                    model: model.clone(),
                    chosen: self
                        .chosen
                        .get(&origin.user_id)
                        .map_or_else(|| "none".to_owned(), ToString::to_string),
                });
            }
            self.lanes.entry(model.clone()).or_default().queue.push(id);
            self.requests.insert(
                id,
                ActiveRequest {
                    id,
                    model: model.clone(),
                    origin: origin.clone(),
                    prompt: prompt.clone(),
                    enhanced_prompt: None,
                    prompt_as_written: false,
                    stage: Stage::Queued,
                    queued_at: rec.at,
                    started_at: None,
                    image: None,
                    input: input.clone(),
                    images: (*images).max(1),
                    variations: Vec::new(),
                },
            );
            let user = self.users.entry(origin.user_id).or_default();
            user.pending += 1;
            let horizon = rec.at - chrono::Duration::seconds(MAX_RATE_WINDOW_SECS as i64);
            while user.recent.front().is_some_and(|t| *t <= horizon) {
                user.recent.pop_front();
            }
            // A request for N variations counts N toward the rate limit.
            for _ in 0..(*images).max(1) {
                user.recent.push_back(rec.at);
            }
            while user.recent.len() > MAX_RECENT_PER_USER {
                user.recent.pop_front();
            }
            return Ok(());
        }

        let name = rec.event.name();
        let Some(req) = self.requests.get(&id) else {
            return Err(Violation::UnknownRequest {
                seq,
                id,
                event: name,
            });
        };
        let Some(step) = rec.event.step() else {
            return Err(Violation::Illegal {
                seq,
                id,
                from: req.stage,
                event: name,
            });
        };
        let from = req.stage;
        let to = next_stage(from, step).map_err(|_| Violation::Illegal {
            seq,
            id,
            from,
            event: name,
        })?;
        // A variation request's images are done in order, one at a time,
        // never more than it asked for.
        if let Event::Variation { index, .. } = &rec.event {
            let want = req.variations.len() as u32 + 1;
            if *index != want || *index > req.images {
                return Err(Violation::VariationOrder {
                    seq,
                    id,
                    index: *index,
                    expected: want,
                    of: req.images,
                });
            }
        }
        let model = req.model.clone();
        let lane = self.lanes.entry(model.clone()).or_default();
        if matches!(rec.event, Event::Started) {
            if let Some(other) = lane.in_flight {
                return Err(Violation::TwoInFlight {
                    seq,
                    id,
                    model,
                    other,
                });
            }
            if let Some(head) = lane.queue.head().filter(|h| *h != id) {
                return Err(Violation::NotFifo {
                    seq,
                    id,
                    model,
                    head,
                });
            }
        }

        // Checks passed: change the state.
        let Some(req) = self.requests.get_mut(&id) else {
            return Err(Violation::UnknownRequest {
                seq,
                id,
                event: name,
            });
        };
        req.stage = to;
        match &rec.event {
            Event::Started => {
                lane.queue.remove(id);
                lane.in_flight = Some(id);
                req.started_at = Some(rec.at);
            }
            Event::Enhanced { prompt, fallback } => {
                req.enhanced_prompt = Some(prompt.clone());
                req.prompt_as_written = fallback.is_some();
            }
            Event::Generated { image, .. } => req.image = Some(image.clone()),
            Event::Variation { image, failure, .. } => req.variations.push(VariationDone {
                image: image.clone(),
                failure: failure.clone(),
            }),
            // The kept images are gone: every image is made again.
            Event::Regenerating => {
                req.image = None;
                req.variations.clear();
            }
            _ => {}
        }
        if to.is_terminal() {
            lane.queue.remove(id);
            if lane.in_flight == Some(id) {
                lane.in_flight = None;
                if let Some(started) = req.started_at {
                    let ms = (rec.at - started).num_milliseconds().max(0) as u64;
                    lane.recent_runs_ms.push_back(ms);
                    if lane.recent_runs_ms.len() > RECENT_RUNS {
                        lane.recent_runs_ms.pop_front();
                    }
                }
            }
            let user_id = req.origin.user_id;
            self.requests.remove(&id);
            if let Some(user) = self.users.get_mut(&user_id) {
                user.pending = user.pending.saturating_sub(1);
            }
        }
        Ok(())
    }

    fn sweep_users(&mut self, at: DateTime<Utc>) {
        let horizon = at - chrono::Duration::seconds(MAX_RATE_WINDOW_SECS as i64);
        self.users
            .retain(|_, u| u.pending > 0 || u.recent.back().is_some_and(|t| *t > horizon));
    }

    // ---- queries -------------------------------------------------------

    pub fn request(&self, id: RequestId) -> Option<&ActiveRequest> {
        self.requests.get(&id)
    }

    /// Unfinished requests, oldest id first.
    pub fn requests(&self) -> impl Iterator<Item = &ActiveRequest> {
        self.requests.values()
    }

    pub fn lane(&self, model: &ModelName) -> Option<&Lane> {
        self.lanes.get(model)
    }

    pub fn lanes(&self) -> impl Iterator<Item = (&ModelName, &Lane)> {
        self.lanes.iter()
    }

    pub fn in_flight(&self, model: &ModelName) -> Option<RequestId> {
        self.lanes.get(model).and_then(|l| l.in_flight)
    }

    pub fn head(&self, model: &ModelName) -> Option<RequestId> {
        self.lanes.get(model).and_then(|l| l.queue.head())
    }

    /// 1-based queue position of a waiting request, in O(log n).
    pub fn position(&self, id: RequestId) -> Option<usize> {
        let req = self.requests.get(&id)?;
        self.lanes.get(&req.model)?.queue.position(id)
    }

    pub fn user(&self, user: UserId) -> Option<&UserLoad> {
        self.users.get(&user)
    }

    /// Admission against this state's view of the user (§2 limits).
    ///
    /// # Errors
    /// The [`admission::Rejection`].
    pub fn admit(
        &self,
        user: UserId,
        limits: &Limits,
        now: DateTime<Utc>,
        weight: u32,
    ) -> Result<(), admission::Rejection> {
        let (pending, recent) = match self.users.get(&user) {
            Some(u) => (u.pending, u.recent.iter().copied().collect::<Vec<_>>()),
            None => (0, Vec::new()),
        };
        admission::admit_weighted(pending, &recent, limits, now, weight)
    }

    /// Estimated wait before a request at `position` finishes, from recent
    /// run times of that model; None until a run has finished.
    pub fn estimated_wait(
        &self,
        model: &ModelName,
        position: usize,
    ) -> Option<std::time::Duration> {
        let lane = self.lanes.get(model)?;
        if lane.recent_runs_ms.is_empty() {
            return None;
        }
        let avg = lane.recent_runs_ms.iter().sum::<u64>() / lane.recent_runs_ms.len() as u64;
        let ahead = position as u64 + u64::from(lane.in_flight.is_some());
        Some(std::time::Duration::from_millis(avg.saturating_mul(ahead)))
    }
}

/// What rebuilding from a log found besides the state.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub applied: u64,
    pub corrupt: Vec<crate::store::Corrupt>,
    pub violations: Vec<Violation>,
}

/// Rebuilds the live state from `start`, applying every readable record.
/// Unreadable records and rule violations are reported, never fatal.
pub fn replay_into(
    state: &mut LiveState,
    records: impl Iterator<Item = crate::store::ReadItem>,
) -> Result<ReplayReport, crate::store::StoreError> {
    let mut report = ReplayReport::default();
    for item in records {
        match item {
            Ok(rec) => match state.apply(&rec) {
                Ok(()) => report.applied += 1,
                Err(v) => report.violations.push(v),
            },
            Err(crate::store::ReadError::Corrupt(c)) => report.corrupt.push(c),
            Err(crate::store::ReadError::Store(e)) => return Err(e),
        }
    }
    Ok(report)
}
