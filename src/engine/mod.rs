//! The core that every adapter drives: decide → append → apply under one
//! lock (so a decision always sees the state it changes), durability waits
//! outside it (so concurrent waits share flushes), start-up from checkpoint
//! plus tail, the recovery rule, and the per-model runners.

pub mod clock;
pub mod images;
pub mod mirror;
pub mod port;
pub mod progress;
pub mod replica;
pub mod runner;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, SystemClock};
pub use images::ImageStore;
pub use port::Engine;
pub use progress::Retries;
pub use runner::{
    Deliverer, Delivery, DeliveryFailure, Enhancement, Enhancer, GeneratedImage, GenerationFailure,
    Generator, KeptImage, Runner, Stages, StepOutcome,
};

use crate::domain::{
    Command, Event, Limits, ModelName, Origin, Prompt, Refusal, Rejection, RequestId,
    SchedulingFacts, Stage, decide,
};
use crate::projection::{LiveState, ReplayReport, Violation, replay_into};
use crate::store::{Corrupt, EventStore, NewEvent, Recorded, StoreError};

/// Events between checkpoints: start-up replays at most this many.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
const CHECKPOINT_VERSION: u16 = 1;

/// Why the core could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("no unfinished request {0}")]
    NotFound(RequestId),
    /// `Start` given to [`Core::execute`]: starts go through [`Core::start`].
    #[error("a start goes through Core::start, which supplies the scheduling facts")]
    StartNeedsFacts,
    /// A decided event did not apply: a bug, never expected.
    #[error("internal invariant broken: {0}")]
    Invariant(Violation),
}

/// What a `/cancel` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// These requests are cancelled (none when nothing matched).
    Done(Vec<RequestId>),
    /// The prefix matched several of the user's queued requests (oldest
    /// first, with their prompts): none was cancelled.
    Ambiguous(Vec<(RequestId, String)>),
}

impl Cancel {
    /// The cancelled ids (none when ambiguous).
    pub fn cancelled(&self) -> &[RequestId] {
        match self {
            Cancel::Done(ids) => ids,
            Cancel::Ambiguous(_) => &[],
        }
    }
}

/// Why a new request was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The append of request `id`'s `Queued` failed part way: part of it
    /// may still reach the disk with a later flush, so the caller must
    /// treat `id` as refused-but-maybe-written (intake's `Refused`).
    #[error("{error}")]
    Unwritten { id: RequestId, error: StoreError },
}

/// A new request as intake hands it over (already parsed and validated).
#[derive(Clone, Debug)]
pub struct NewRequest {
    pub model: ModelName,
    /// The prompt to draw (a preset's template around the user's prompt
    /// when `preset` is set).
    pub prompt: Prompt,
    pub origin: Origin,
    pub preset: Option<crate::domain::PresetUse>,
    /// The user named no model; `model` is the one they chose (§8).
    pub remembered: bool,
    /// The input image, already kept on disk (image to image, §8).
    pub input: Option<crate::domain::ImageRef>,
    /// Images of the prompt (variations, §8); 1 for a plain request.
    pub images: u32,
}

impl NewRequest {
    /// The `Queued` event that records this request.
    pub fn into_queued(self) -> Event {
        Event::Queued {
            model: self.model,
            prompt: self.prompt,
            origin: self.origin,
            preset: self.preset,
            remembered: self.remembered,
            input: self.input,
            images: self.images,
        }
    }
}

/// The answer to an accepted (or already accepted) request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Newly queued and on disk.
    Queued {
        id: RequestId,
        position: usize,
        seq: u64,
    },
    /// The same update or message made this request before.
    Duplicate { id: RequestId },
}

/// What opening found.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// The checkpoint's seq, when one was used.
    pub checkpoint_seq: Option<u64>,
    /// Why a checkpoint was present but not used.
    pub checkpoint_problem: Option<String>,
    /// Events replayed after the checkpoint.
    pub tail_events: u64,
    pub corrupt: Vec<Corrupt>,
    pub violations: Vec<Violation>,
}

#[derive(Serialize)]
struct CheckpointRef<'a> {
    v: u16,
    state: &'a LiveState,
}

#[derive(Deserialize)]
struct CheckpointOwned {
    v: u16,
    state: LiveState,
}

/// A checkpoint's stored form: the live state with its format version
/// (sled's log and the PostgreSQL log keep the same bytes).
///
/// # Errors
/// Only if serde cannot serialize the state, which our types never cause.
pub(crate) fn encode_checkpoint(state: &LiveState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&CheckpointRef {
        v: CHECKPOINT_VERSION,
        state,
    })
    .map_err(|e| StoreError::Write(crate::store::Cause::from(e.to_string())))
}

/// The state a checkpoint stored at `seq` holds, or why it cannot be used
/// (unreadable, another format version, or not the state at `seq`).
pub(crate) fn decode_checkpoint(seq: u64, bytes: &[u8]) -> Result<LiveState, String> {
    match serde_json::from_slice::<CheckpointOwned>(bytes) {
        Ok(cp) if cp.v == CHECKPOINT_VERSION && seq == cp.state.last_seq => Ok(cp.state),
        Ok(cp) => Err(format!(
            "checkpoint v{} at seq {seq} does not fit the log",
            cp.v
        )),
        Err(e) => Err(format!("checkpoint unreadable: {e}")),
    }
}

/// The request core over an [`EventStore`].
pub struct Core<S: EventStore> {
    store: S,
    state: Mutex<LiveState>,
    clock: Arc<dyn Clock>,
    checkpoint_every: u64,
    last_checkpoint: AtomicU64,
}

impl<S: EventStore> Core<S> {
    /// Loads the last checkpoint and replays only the tail after it, so
    /// start-up time follows the checkpoint interval, not the history.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read at all.
    pub fn open(store: S, clock: Arc<dyn Clock>) -> Result<(Self, OpenReport), StoreError> {
        Self::open_with(store, clock, DEFAULT_CHECKPOINT_EVERY)
    }

    /// As [`Core::open`], with a checkpoint every `checkpoint_every` events.
    ///
    /// # Errors
    /// As [`Core::open`].
    pub fn open_with(
        store: S,
        clock: Arc<dyn Clock>,
        checkpoint_every: u64,
    ) -> Result<(Self, OpenReport), StoreError> {
        let (state, report) = load_state(&store)?;
        let last_checkpoint = report.checkpoint_seq.unwrap_or(0);
        let core = Core {
            store,
            state: Mutex::new(state),
            clock,
            checkpoint_every: checkpoint_every.max(1),
            last_checkpoint: AtomicU64::new(last_checkpoint),
        };
        if report.tail_events >= core.checkpoint_every || report.checkpoint_problem.is_some() {
            core.checkpoint()?;
        }
        Ok((core, report))
    }

    fn lock(&self) -> MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Reads the live state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&LiveState) -> R) -> R {
        f(&self.lock())
    }

    /// A copy of the live state (for tests and checks).
    pub fn snapshot(&self) -> LiveState {
        self.lock().clone()
    }

    /// Accepts a new request: intake idempotency, then the limits, then a
    /// `Queued` event that is on disk before this returns.
    ///
    /// # Errors
    /// [`AcceptError::Rejected`] for a limit, [`AcceptError::Store`] when it
    /// could not be made durable (the user must not be told "queued").
    pub async fn accept(&self, req: NewRequest, limits: &Limits) -> Result<Admitted, AcceptError> {
        let admitted = self.admit(req, limits)?;
        self.confirm(admitted).await
    }

    /// The second half of [`Core::accept`]: waits until a new request's
    /// `Queued` is durable (a duplicate already is); only then may the user
    /// be told.
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the disk refused.
    pub async fn confirm(&self, admitted: Admitted) -> Result<Admitted, AcceptError> {
        if let Admitted::Queued { seq, .. } = admitted {
            self.durable(seq).await?;
        }
        Ok(admitted)
    }

    /// The first half of [`Core::accept`]: idempotency, limits and the
    /// `Queued` append, in the order of the calls, without waiting for the
    /// disk. Intake admits a batch of updates one after the other in
    /// `update_id` order this way, and their durability waits then share
    /// one flush. The request is **not yet acknowledged**: nobody may be
    /// told "queued" before [`Core::confirm`] returned.
    ///
    /// # Errors
    /// As [`Core::accept`], without the flush.
    pub fn admit(&self, req: NewRequest, limits: &Limits) -> Result<Admitted, AcceptError> {
        let now = self.clock.now();
        let mut state = self.lock();
        // The duplicate check and the write happen under the same lock,
        // and the append writes the intake keys before it returns.
        if let Some(u) = req.origin.update_id
            && let Some(id) = self.store.find_update(u)?
        {
            return Ok(Admitted::Duplicate { id });
        }
        if let Some(m) = req.origin.message_id
            && let Some(id) = self.store.find_message(req.origin.chat_id, m)?
        {
            return Ok(Admitted::Duplicate { id });
        }
        state.admit(req.origin.user_id, limits, now, req.images)?;
        let id = RequestId::random();
        let event = req.into_queued();
        let rec = self
            .append_locked(&mut state, id, event, now)
            .map_err(|e| AcceptError::Unwritten {
                id,
                error: match e {
                    CoreError::Store(s) => s,
                    other => StoreError::Write(crate::store::Cause::from(other.to_string())),
                },
            })?;
        let position = state.position(id).unwrap_or(0);
        Ok(Admitted::Queued {
            id: rec.request_id,
            position,
            seq: rec.seq,
        })
    }

    /// Waits until every event up to `seq` is on disk (shared with every
    /// concurrent waiter), then checkpoints if one is due.
    ///
    /// # Errors
    /// When the disk refused.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        self.store.wait_durable(seq).await?;
        self.maybe_checkpoint();
        Ok(())
    }

    /// Runs a lifecycle command on an unfinished request. `Start` is not
    /// one of them: a start needs the scheduling facts, which only the core
    /// knows, so it goes through [`Core::start`] (or [`Core::start_next`]).
    ///
    /// # Errors
    /// [`CoreError::NotFound`], [`CoreError::Refused`], a store error, or
    /// [`CoreError::StartNeedsFacts`] for `Start`.
    pub async fn execute(&self, id: RequestId, command: Command) -> Result<Recorded, CoreError> {
        if matches!(command, Command::Start(_)) {
            return Err(CoreError::StartNeedsFacts);
        }
        self.decide_and_record(id, |_, _| command).await
    }

    /// Starts request `id` if it is the head of its model's queue and the
    /// model is idle (the facts are read from the live state, under the
    /// same lock as the append).
    ///
    /// # Errors
    /// [`CoreError::Refused`] (`NotAtHead`, `ModelBusy`, or not queued),
    /// [`CoreError::NotFound`] or a store error.
    pub async fn start(&self, id: RequestId) -> Result<Recorded, CoreError> {
        self.decide_and_record(id, |state, req| {
            Command::Start(SchedulingFacts {
                at_head: state.head(&req.model) == Some(id),
                model_idle: state.in_flight(&req.model).is_none(),
            })
        })
        .await
    }

    /// Under the lock: the command (built from the live state), the
    /// decision, the append; then the durability wait when it matters.
    async fn decide_and_record(
        &self,
        id: RequestId,
        command: impl FnOnce(&LiveState, &crate::projection::ActiveRequest) -> Command,
    ) -> Result<Recorded, CoreError> {
        let now = self.clock.now();
        let rec = {
            let mut state = self.lock();
            let req = state.request(id).ok_or(CoreError::NotFound(id))?;
            let event = decide(req.stage, command(&state, req))?;
            self.append_locked(&mut state, id, event, now)?
        };
        if rec.event.must_be_durable() {
            self.store.wait_durable(rec.seq).await?;
        }
        self.maybe_checkpoint();
        Ok(rec)
    }

    /// The scheduler's core: starts the head of `model`'s queue when nothing
    /// of that model is in flight. None when there is nothing to start.
    ///
    /// # Errors
    /// A store error.
    pub async fn start_next(&self, model: &ModelName) -> Result<Option<Recorded>, CoreError> {
        let (head, seen) = {
            let state = self.lock();
            if state.in_flight(model).is_some() {
                return Ok(None);
            }
            (state.head(model), state.last_seq)
        };
        // The head's `Queued` may still wait for its flush (intake appends,
        // then waits). Starting acts on it, so it must be durable first:
        // otherwise a flush the disk refuses can leave `Queued` and
        // `Started` on disk for a request whose user was told "couldn't
        // take that request", and the next engine, which cancels such
        // requests only while queued, would run it. Free when the flush
        // already happened (the usual case: the group commit shares it).
        if head.is_some() {
            self.durable(seen).await?;
        }
        match head {
            None => Ok(None),
            // A cancel may slip in between; then try again next wake-up.
            Some(id) => match self.start(id).await {
                Ok(rec) => Ok(Some(rec)),
                Err(CoreError::Refused(_) | CoreError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Remembers `model` as the one `user`'s `/image <prompt>` draws with
    /// (§8): a `ModelChosen` under the user's choices id, on disk before
    /// this returns (the user is told right after).
    ///
    /// # Errors
    /// A store error.
    pub async fn choose_model(
        &self,
        user: crate::domain::UserId,
        model: ModelName,
    ) -> Result<Recorded, CoreError> {
        let rec = {
            let mut state = self.lock();
            let now = self.clock.now();
            self.append_locked(
                &mut state,
                RequestId::choices_of(user),
                Event::ModelChosen {
                    user_id: user,
                    model,
                },
                now,
            )?
        };
        self.durable(rec.seq).await?;
        Ok(rec)
    }

    /// Cancels `user`'s queued requests: every one without `prefix`; with
    /// it, exactly the one whose id starts with it (dashes and case
    /// ignored), or none when several do ([`Cancel::Ambiguous`] lists
    /// them). Only `user`'s own requests are ever matched. Returns what
    /// happened.
    ///
    /// `issued_by` is the Telegram update of the cancel: only requests of
    /// earlier updates are cancelled. Update ids rise in the order Telegram
    /// received the messages, so a `/cancel` never reaches a request the
    /// user sent after it, also when the same `/cancel` is delivered again
    /// after a restart (cancelling is idempotent by update id, with no
    /// state of its own).
    ///
    /// # Errors
    /// A store error; requests cancelled before it stay cancelled.
    pub async fn cancel_queued(
        &self,
        user: crate::domain::UserId,
        prefix: Option<&str>,
        issued_by: Option<u32>,
    ) -> Result<Cancel, CoreError> {
        let ids = match self.read(|s| to_cancel(s, user, prefix, issued_by)) {
            Ok(ids) => ids,
            Err(ambiguous) => return Ok(ambiguous),
        };
        let mut done = Vec::new();
        for id in ids {
            match self.execute(id, Command::Cancel).await {
                Ok(_) => done.push(id),
                Err(CoreError::Refused(_) | CoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Cancel::Done(done))
    }

    /// The recovery rule, run once at start: every in-flight request gets a
    /// `Resumed` event and its runner starts its stage over (Sending resends
    /// the kept image, or regenerates when it is gone). Queued requests stay
    /// where they are, so FIFO and one-at-a-time hold across restarts.
    ///
    /// # Errors
    /// A store error.
    pub async fn recover(&self) -> Result<Vec<Recorded>, CoreError> {
        let in_flight: Vec<RequestId> =
            self.read(|s| s.lanes().filter_map(|(_, lane)| lane.in_flight).collect());
        let mut out = Vec::new();
        for id in in_flight {
            out.push(self.execute(id, Command::Resume).await?);
        }
        Ok(out)
    }

    fn append_locked(
        &self,
        state: &mut LiveState,
        id: RequestId,
        event: Event,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Recorded, CoreError> {
        let mut recs = self.store.append(vec![NewEvent {
            request_id: id,
            at,
            event,
        }])?;
        let rec = recs.pop().ok_or_else(|| {
            StoreError::Write(crate::store::Cause::from("append returned nothing"))
        })?;
        if let Err(v) = state.apply(&rec) {
            // decide() allowed it, so this is a bug; the event is in the log
            // and replay will report the same violation.
            tracing::error!(violation = %v, "a decided event did not apply");
            return Err(CoreError::Invariant(v));
        }
        Ok(rec)
    }

    /// Writes a checkpoint of the live state now.
    ///
    /// # Errors
    /// A store error.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let (seq, bytes) = {
            let state = self.lock();
            (state.last_seq, encode_checkpoint(&state)?)
        };
        self.store.save_checkpoint(seq, &bytes)?;
        self.last_checkpoint.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    fn maybe_checkpoint(&self) {
        let last = self.store.last_seq();
        if last.saturating_sub(self.last_checkpoint.load(Ordering::Acquire))
            >= self.checkpoint_every
            && let Err(e) = self.checkpoint()
        {
            // Not fatal: start-up replays a longer tail.
            tracing::warn!(error = %e, "checkpoint failed");
        }
    }

    /// The state a fresh start would have: the last checkpoint plus the tail.
    ///
    /// # Errors
    /// A store error.
    pub fn rebuild_from_checkpoint(&self) -> Result<(LiveState, OpenReport), StoreError> {
        load_state(&self.store)
    }

    /// Rebuilds the live state from the whole log, ignoring checkpoints.
    ///
    /// # Errors
    /// A store error.
    pub fn rebuild_from_log(&self) -> Result<(LiveState, ReplayReport), StoreError> {
        let mut state = LiveState::default();
        let report = replay_into(&mut state, self.store.read_from(1))?;
        Ok((state, report))
    }
}

/// A request the checkpoint holds as unfinished whose events are gone from
/// the log. Only finished requests are ever removed, so such a checkpoint
/// predates the request's end: its tail no longer has that end, and using
/// it would run a finished request again (terminal is forever). Checked
/// per request, not by comparing seqs, so no ordering of checkpoint and
/// removal can slip through; it costs one index lookup per unfinished
/// request.
fn removed_since<S: EventStore>(
    store: &S,
    state: &LiveState,
) -> Result<Option<RequestId>, StoreError> {
    for r in state.requests() {
        if store.events_of(r.id)?.is_empty() {
            return Ok(Some(r.id));
        }
    }
    Ok(None)
}

/// Why a checkpoint holding `id` as unfinished is not used.
pub(crate) fn removed_problem(seq: u64, id: RequestId) -> String {
    format!(
        "checkpoint at seq {seq} holds request {id} as unfinished, but the log no longer has it (removed by retention after the checkpoint)"
    )
}

/// What a `/cancel` matches (see [`Core::cancel_queued`]): `user`'s
/// queued requests of updates before `issued_by`, oldest first — every
/// one without `prefix`; with it, exactly the one whose id starts with it
/// (dashes and case ignored), or [`Cancel::Ambiguous`] when several do.
///
/// # Errors
/// The [`Cancel::Ambiguous`] answer (nothing is to be cancelled).
pub(crate) fn to_cancel(
    s: &LiveState,
    user: crate::domain::UserId,
    prefix: Option<&str>,
    issued_by: Option<u32>,
) -> Result<Vec<RequestId>, Cancel> {
    let earlier = |r: &crate::projection::ActiveRequest| match (r.origin.update_id, issued_by) {
        (Some(made_by), Some(cancel)) => made_by < cancel,
        _ => true,
    };
    let bare = |s: &str| s.replace('-', "").to_ascii_lowercase();
    let wanted = prefix.map(bare);
    // Oldest first: by time, then by place in line (one clock tick can
    // hold several requests).
    type Match = (
        chrono::DateTime<chrono::Utc>,
        Option<usize>,
        RequestId,
        String,
    );
    let mut matches: Vec<Match> = s
        .requests()
        .filter(|r| r.origin.user_id == user && r.stage == Stage::Queued)
        .filter(|r| earlier(r))
        .filter(|r| {
            wanted
                .as_deref()
                .is_none_or(|p| bare(&r.id.to_string()).starts_with(p))
        })
        .map(|r| {
            (
                r.queued_at,
                s.position(r.id),
                r.id,
                r.prompt.as_str().to_owned(),
            )
        })
        .collect();
    matches.sort();
    if prefix.is_some() && matches.len() > 1 {
        return Err(Cancel::Ambiguous(
            matches.into_iter().map(|(_, _, id, p)| (id, p)).collect(),
        ));
    }
    Ok(matches.into_iter().map(|(_, _, id, _)| id).collect())
}

/// Start-up: the last usable checkpoint, then every event after it.
fn load_state<S: EventStore>(store: &S) -> Result<(LiveState, OpenReport), StoreError> {
    let mut report = OpenReport::default();
    let mut state = LiveState::default();
    match store.load_checkpoint() {
        Ok(Some((seq, bytes))) => match decode_checkpoint(seq, &bytes) {
            Ok(_) if seq > store.last_seq() => {
                report.checkpoint_problem =
                    Some(format!("checkpoint at seq {seq} does not fit the log"));
            }
            Ok(cp) => match removed_since(store, &cp)? {
                None => {
                    state = cp;
                    report.checkpoint_seq = Some(seq);
                }
                Some(id) => report.checkpoint_problem = Some(removed_problem(seq, id)),
            },
            Err(problem) => report.checkpoint_problem = Some(problem),
        },
        Ok(None) => {}
        Err(e) => report.checkpoint_problem = Some(e.to_string()),
    }
    if let Some(problem) = &report.checkpoint_problem {
        tracing::warn!(%problem, "replaying the whole log instead");
    }
    let from = state.last_seq + 1;
    let ReplayReport {
        applied,
        corrupt,
        violations,
    } = replay_into(&mut state, store.read_from(from))?;
    for c in &corrupt {
        tracing::error!(seq = c.seq, reason = %c.reason, "skipping an unreadable event");
    }
    for v in &violations {
        tracing::error!(violation = %v, "skipping an event that breaks a rule");
    }
    report.tail_events = applied;
    report.corrupt = corrupt;
    report.violations = violations;
    Ok((state, report))
}
