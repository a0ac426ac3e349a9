//! The engine's decisions on the PostgreSQL log, for several replicas
//! (§9): admission inside the append transaction, a model's next
//! generation started (or an orphaned one resumed) under that model's
//! lease, and every later step of a generation fenced by the lease.
//!
//! `engine::Core` decides against its own in-memory projection under a
//! mutex, which is right for one process on sled and wrong for replicas:
//! two replicas would each see a user with two pending requests and both
//! admit a third. Here every decision is a closure the log's committer
//! runs after the head lock, against the live projection caught up with
//! every replica's commits ([`PgLog::connect_following`]); decisions of
//! one replica still share a transaction (group commit).

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::runner::Stages;
use super::{AcceptError, Admitted, Clock, Deliverer, Enhancer, Generator, NewRequest};
use crate::domain::{
    Command, Limits, ModelName, Refusal, Rejection, RequestId, SchedulingFacts, decide,
};
use crate::projection::LiveState;
use crate::store::pg::{Answer, Appended, Claimed, Decide, Follow, IntakeKeys, Lease, PgLog};
use crate::store::{NewEvent, Recorded, StoreError};

/// The committer's copy of the live projection follows the log.
impl Follow for LiveState {
    fn position(&self) -> u64 {
        self.last_seq
    }

    fn apply(&mut self, rec: &Recorded) {
        if let Err(v) = LiveState::apply(self, rec) {
            // Replay reports the same violation; the state skips the event.
            tracing::error!(violation = %v, "an event from the log did not apply");
            self.last_seq = self.last_seq.max(rec.seq);
        }
    }

    fn skip(&mut self, position: u64) {
        self.last_seq = self.last_seq.max(position);
    }

    /// The checkpoint sled's log keeps too (`engine::encode_checkpoint`).
    fn restore(position: u64, bytes: &[u8]) -> Option<Result<Self, String>> {
        Some(super::decode_checkpoint(position, bytes))
    }

    fn unfinished(&self) -> Vec<RequestId> {
        self.requests().map(|r| r.id).collect()
    }
}

/// Why a replica could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("no unfinished request {0}")]
    NotFound(RequestId),
    /// The lease this step was taken under is no longer the model's: the
    /// generation must stop, and nothing of this step was written.
    #[error("the lease of model {0} was lost; this generation must stop")]
    Fenced(String),
    /// `Start` given to [`Replica::step`]: a start takes the model's lease
    /// ([`Replica::start_next`]).
    #[error("a start goes through Replica::start_next, which takes the model's lease")]
    StartNeedsLease,
}

/// An admission in this replica's line, not yet committed
/// ([`Replica::admit_now`]).
pub struct Admission {
    id: RequestId,
    keys: IntakeKeys,
    answer: Answer,
    verdict: oneshot::Receiver<Result<usize, Rejection>>,
}

impl Admission {
    /// The request it makes, if it is admitted.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The intake keys it claims.
    pub fn keys(&self) -> IntakeKeys {
        self.keys
    }
}

/// What [`Replica::start_next`] began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    /// The model's lease, held until released or lost.
    pub lease: Lease,
    /// The request's `Started` — or `Resumed`, when its previous holder
    /// lost the lease mid-generation (the recovery rule).
    pub record: Recorded,
}

/// The engine's writing half on PostgreSQL, for one replica.
pub struct Replica {
    log: PgLog<LiveState>,
    holder: String,
    clock: Arc<dyn Clock>,
}

impl Replica {
    /// Connects (migrating the schema), builds the live projection from
    /// the checkpoint in the database and the log after it (the whole log
    /// when there is none, or it does not fit), and keeps it caught up in
    /// the committer. `holder`
    /// names this replica in the leases it takes (unique per process).
    ///
    /// # Errors
    /// [`StoreError::Open`] or [`StoreError::Read`].
    pub async fn connect(
        url: &SecretString,
        holder: impl Into<String>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Ok(Replica {
            log: PgLog::connect_following(url, LiveState::default()).await?,
            holder: holder.into(),
            clock,
        })
    }

    /// The log underneath (reads, subscriptions, lease renewal).
    pub fn log(&self) -> &PgLog<LiveState> {
        &self.log
    }

    /// This replica's name in leases.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The replica's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Admits a new request: a duplicate of an update or message admitted
    /// before (by any replica) comes back as such; otherwise the user's
    /// limits are checked against every replica's commits, and the
    /// `Queued` event is written — all in one transaction, committed
    /// (durable under `synchronous_commit=on`) before this returns.
    ///
    /// # Errors
    /// [`AcceptError::Rejected`] for a limit, [`AcceptError::Store`] when
    /// it did not commit (the user must not be told "queued"), as
    /// [`Replica::admitted`] settles it.
    pub async fn admit(&self, req: NewRequest, limits: &Limits) -> Result<Admitted, AcceptError> {
        let pending = self.admit_now(req, limits)?;
        self.admitted(pending).await
    }

    /// The first half of [`Replica::admit`]: the decision takes its place
    /// in this replica's line of appends now, so admissions keep the
    /// order of the calls and still share a transaction.
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the line is full or the log closed.
    pub fn admit_now(&self, req: NewRequest, limits: &Limits) -> Result<Admission, AcceptError> {
        let now = self.clock.now();
        let id = RequestId::random();
        let keys = IntakeKeys::of(&req.origin);
        let limits = *limits;
        let (told, verdict) = oneshot::channel::<Result<usize, Rejection>>();
        let decision = Box::new(move |state: &LiveState| {
            let user = req.origin.user_id;
            let model = req.model.clone();
            match state.admit(user, &limits, now, req.images) {
                Err(r) => {
                    let _ = told.send(Err(r));
                    None
                }
                Ok(()) => {
                    let ahead = state.lane(&model).map_or(0, |l| l.queue.len());
                    let _ = told.send(Ok(ahead + 1));
                    Some(vec![NewEvent {
                        request_id: id,
                        at: now,
                        event: req.into_queued(),
                    }])
                }
            }
        });
        let answer = self.log.decide_now(keys, None, decision)?;
        Ok(Admission {
            id,
            keys,
            answer,
            verdict,
        })
    }

    /// The second half of [`Replica::admit`]. When the commit's outcome is
    /// unknown (the connection broke while it ran), it is settled by
    /// looking the request's update up under the head lock: found, it is
    /// admitted after all.
    ///
    /// # Errors
    /// As [`Replica::admit`].
    pub async fn admitted(&self, a: Admission) -> Result<Admitted, AcceptError> {
        match a.answer.appended().await {
            Ok(Appended::Written(recs)) => {
                let seq = recs.last().map_or(0, |r| r.seq);
                let position = match a.verdict.await {
                    Ok(Ok(p)) => p,
                    _ => 0,
                };
                Ok(Admitted::Queued {
                    id: a.id,
                    position,
                    seq,
                })
            }
            Ok(Appended::Duplicate(id)) => Ok(Admitted::Duplicate { id }),
            Ok(Appended::Declined) => match a.verdict.await {
                Ok(Err(r)) => Err(AcceptError::Rejected(r)),
                _ => Err(AcceptError::Store(StoreError::Closed)),
            },
            Ok(Appended::Fenced) => Err(AcceptError::Store(StoreError::Closed)),
            Err(e) => {
                if a.keys == IntakeKeys::default() {
                    return Err(AcceptError::Store(e));
                }
                match self.log.settle(a.keys).await {
                    Ok(Some(id)) if id == a.id => {
                        tracing::warn!(request_id = %id, error = %e, "a commit reported as failed had committed");
                        Ok(Admitted::Queued {
                            id,
                            position: 0,
                            seq: 0,
                        })
                    }
                    Ok(Some(id)) => Ok(Admitted::Duplicate { id }),
                    Ok(None) => Err(AcceptError::Store(e)),
                    // Not known: refused to the user, and settled later
                    // (see `Admission`'s caller: the request is cancelled
                    // if it turns out written).
                    Err(_) => Err(AcceptError::Unwritten { id: a.id, error: e }),
                }
            }
        }
    }

    /// Remembers `model` as `user`'s (§8): a `ModelChosen` under the
    /// user's choices id, committed before this returns.
    ///
    /// # Errors
    /// A store error.
    pub async fn choose_model(
        &self,
        user: crate::domain::UserId,
        model: ModelName,
    ) -> Result<Recorded, StoreError> {
        let event = NewEvent {
            request_id: RequestId::choices_of(user),
            at: self.clock.now(),
            event: crate::domain::Event::ModelChosen {
                user_id: user,
                model,
            },
        };
        match self.log.append(vec![event]).await? {
            Appended::Written(mut recs) => recs
                .pop()
                .ok_or_else(|| StoreError::Write("the append wrote nothing".into())),
            _ => Err(StoreError::Write("the append wrote nothing".into())),
        }
    }

    /// Begins `model`'s next generation under its lease: when a request
    /// of the model is still in flight (its holder's lease ran out — a
    /// replica died or lost the database mid-generation), it is resumed
    /// (`Resumed`, the recovery rule); otherwise the head of its queue is
    /// started. The decision, the lease and the event are one
    /// transaction. `None` when there is nothing to run or another
    /// replica holds the lease.
    ///
    /// # Errors
    /// A store error.
    pub async fn start_next(
        &self,
        model: &ModelName,
        ttl: Duration,
    ) -> Result<Option<Begun>, ReplicaError> {
        // Held by another replica: no transaction needed to hear "held".
        if self.log.held_by_other(model.as_str(), &self.holder).await? {
            return Ok(None);
        }
        let decision = next_of(model.clone(), self.clock.now());
        match self
            .log
            .claim_decided(model.as_str(), &self.holder, ttl, decision)
            .await?
        {
            Claimed::Won { lease, records } => Ok(records
                .into_iter()
                .next()
                .map(|record| Begun { lease, record })),
            Claimed::Held | Claimed::Idle => Ok(None),
        }
    }

    /// As [`Replica::start_next`], under `lease` (the model's), which this replica still
    /// holds from the generation it just finished: the model's next
    /// generation begins without the lease changing hands — one
    /// transaction, fenced by the lease, and no race with the other
    /// replicas' runners (they see the lease held and ask nothing of the
    /// head lock). `None` when there is nothing to run.
    ///
    /// # Errors
    /// [`ReplicaError::Fenced`] when the lease was lost meanwhile (nothing
    /// written), or a store error.
    pub async fn continue_next(
        &self,
        model: &ModelName,
        lease: &Lease,
    ) -> Result<Option<Recorded>, ReplicaError> {
        let decision = next_of(model.clone(), self.clock.now());
        match self
            .log
            .decide(IntakeKeys::default(), Some(lease.clone()), decision)
            .await?
        {
            Appended::Written(mut recs) => Ok(recs.pop()),
            Appended::Fenced => Err(ReplicaError::Fenced(lease.model.clone())),
            Appended::Declined | Appended::Duplicate(_) => Ok(None),
        }
    }

    /// Records one step of a generation (enhanced, generated, delivered,
    /// failed, …) while `lease` is still the model's: the step is decided
    /// against the caught-up projection and fenced by the lease in the
    /// same transaction.
    ///
    /// # Errors
    /// [`ReplicaError::Fenced`] when the lease was lost (nothing written;
    /// stop), [`ReplicaError::Refused`] or [`ReplicaError::NotFound`] when
    /// the step does not fit the request, or a store error.
    pub async fn step(
        &self,
        lease: &Lease,
        id: RequestId,
        command: Command,
    ) -> Result<Recorded, ReplicaError> {
        if matches!(command, Command::Start(_)) {
            return Err(ReplicaError::StartNeedsLease);
        }
        self.record(Some(lease), id, command).await
    }

    /// Cancels a queued request (no lease: it is not running). Refused
    /// when it has started meanwhile, on any replica.
    ///
    /// # Errors
    /// As [`Replica::step`], without `Fenced`.
    pub async fn cancel(&self, id: RequestId) -> Result<Recorded, ReplicaError> {
        self.record(None, id, Command::Cancel).await
    }

    async fn record(
        &self,
        lease: Option<&Lease>,
        id: RequestId,
        command: Command,
    ) -> Result<Recorded, ReplicaError> {
        let now = self.clock.now();
        let (told, verdict) = oneshot::channel::<ReplicaError>();
        let decision = Box::new(move |state: &LiveState| {
            let Some(req) = state.request(id) else {
                let _ = told.send(ReplicaError::NotFound(id));
                return None;
            };
            match decide(req.stage, command) {
                Ok(event) => Some(vec![NewEvent {
                    request_id: id,
                    at: now,
                    event,
                }]),
                Err(r) => {
                    let _ = told.send(ReplicaError::Refused(r));
                    None
                }
            }
        });
        match self
            .log
            .decide(IntakeKeys::default(), lease.cloned(), decision)
            .await?
        {
            Appended::Written(mut recs) => recs.pop().ok_or(ReplicaError::NotFound(id)),
            Appended::Fenced => Err(ReplicaError::Fenced(
                lease.map(|l| l.model.clone()).unwrap_or_default(),
            )),
            Appended::Declined => Err(verdict.await.unwrap_or(ReplicaError::NotFound(id))),
            Appended::Duplicate(other) => Err(ReplicaError::NotFound(other)),
        }
    }

    /// Extends `lease` by `ttl`: false when it was lost (stop at once).
    ///
    /// # Errors
    /// A store error: then the lease ends at `lease.until` for certain.
    pub async fn renew(&self, lease: &mut Lease, ttl: Duration) -> Result<bool, StoreError> {
        self.log.renew(lease, ttl).await
    }

    /// Gives the lease up after the generation's last event.
    ///
    /// # Errors
    /// A store error; the lease then expires on its own.
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.log.release(lease).await
    }
}

/// How long a model's lease lasts and how often it is renewed while a
/// generation runs. The renewal must come well inside the time to live
/// (a third by default), so one slow round trip does not lose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimes {
    pub ttl: Duration,
    pub renew_every: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        LeaseTimes {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
        }
    }
}

/// The decision that begins `model`'s next generation: its in-flight
/// request resumed (its holder's lease ran out), else its head started.
fn next_of(model: ModelName, now: chrono::DateTime<chrono::Utc>) -> Decide<LiveState> {
    Box::new(move |state: &LiveState| {
        let (id, command) = match (state.in_flight(&model), state.head(&model)) {
            (Some(id), _) => (id, Command::Resume),
            (None, Some(id)) => (
                id,
                Command::Start(SchedulingFacts {
                    at_head: true,
                    model_idle: true,
                }),
            ),
            (None, None) => return None,
        };
        let req = state.request(id)?;
        let event = decide(req.stage, command).ok()?;
        Some(vec![NewEvent {
            request_id: id,
            at: now,
            event,
        }])
    })
}

/// How a generation ended for its runner.
enum Ended {
    /// Its last step recorded; the lease is still held (for the next).
    Finished(Lease),
    /// The lease was lost, or a step's outcome is unknown: the request is
    /// resumed once the lease runs out, here or elsewhere.
    Lost,
    /// Shutdown cut it short (the lease was released).
    Stopped,
}

/// One model's runner on a replica: starts (or resumes) the model's next
/// generation under its lease, does each stage with the shared stage work
/// ([`Stages`]), renews the lease while a stage runs and stops the stage
/// the moment the lease is lost — or before its local deadline when it
/// cannot be renewed — and records each step fenced by the lease.
pub struct ReplicaRunner<E, G, D> {
    replica: Arc<Replica>,
    stages: Stages<E, G, D>,
    times: LeaseTimes,
    lost: std::sync::atomic::AtomicU64,
    /// Where to look before asking the database whether there is work.
    hint: Option<WorkHint>,
}

/// A replica's own view of the log, followed by [`ReplicaRunner::run`]
/// to skip the transaction that would only learn there is nothing to run
/// (with R replicas and M models, R×M of them per commit otherwise).
pub struct WorkHint {
    /// The view's position; changes whenever it shows more of the log.
    pub shown: tokio::sync::watch::Receiver<u64>,
    /// Whether the view has a request of the model queued or in flight.
    pub has_work: Box<dyn Fn(&ModelName) -> bool + Send + Sync>,
}

impl<E: Enhancer, G: Generator, D: Deliverer> ReplicaRunner<E, G, D> {
    pub fn new(replica: Arc<Replica>, stages: Stages<E, G, D>, times: LeaseTimes) -> Self {
        ReplicaRunner {
            replica,
            stages,
            times,
            lost: std::sync::atomic::AtomicU64::new(0),
            hint: None,
        }
    }

    /// Asks `hint` first, and the database only when the view has work
    /// for the model. The view follows every commit, so when work
    /// appears it shows it and wakes the runner; a request orphaned by a
    /// dead holder stays in flight in the view, so it is resumed too.
    #[must_use]
    pub fn with_hint(mut self, hint: WorkHint) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Generations this runner stopped because its lease was lost (the
    /// only way a request is generated twice: another replica resumes it).
    pub fn lost_leases(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs generations until `shutdown`. Idle, it waits for the log to
    /// grow or a lease to be released (both notified by the database) —
    /// or half a time to live, since a dead holder's lease runs out
    /// without anything to wake anyone.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut appended = self.replica.log().subscribe();
        let mut released = self.replica.log().subscribe_releases();
        let model = self.stages.model().clone();
        let mut hint = self.hint.as_ref().map(|h| (h.shown.clone(), &h.has_work));
        loop {
            appended.borrow_and_update();
            released.borrow_and_update();
            if let Some((shown, has_work)) = &mut hint {
                shown.borrow_and_update();
                if !has_work(&model) {
                    tokio::select! {
                        r = shown.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(self.times.ttl / 2) => {}
                        () = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            let next = tokio::select! {
                r = self.replica.start_next(&model, self.times.ttl) => r,
                () = shutdown.cancelled() => return,
            };
            match next {
                Ok(Some(begun)) => {
                    if !self.generations(begun, &shutdown).await {
                        return;
                    }
                }
                Ok(None) => {
                    tokio::select! {
                        r = appended.changed() => if r.is_err() { return },
                        r = released.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(self.times.ttl / 2) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::error!(model = %model, error = %e, "could not start a generation; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Runs `begun` and then, keeping the lease, the model's next requests
    /// while there are any (`Replica::continue_next`); releases the lease
    /// when the queue is empty. False when the shutdown cut it short.
    async fn generations(&self, mut begun: Begun, shutdown: &CancellationToken) -> bool {
        loop {
            let lease = match self.generation(begun, shutdown).await {
                Ended::Finished(lease) => lease,
                Ended::Lost => return true,
                Ended::Stopped => return false,
            };
            let next = tokio::select! {
                r = self.replica.continue_next(self.stages.model(), &lease) => r,
                () = shutdown.cancelled() => Ok(None),
            };
            match next {
                Ok(Some(record)) => begun = Begun { lease, record },
                Ok(None) => {
                    if let Err(e) = self.replica.release(&lease).await {
                        tracing::warn!(error = %e, "could not release a lease; it runs out on its own");
                    }
                    return !shutdown.is_cancelled();
                }
                Err(ReplicaError::Fenced(_)) => return true,
                Err(e) => {
                    // Whether it committed is not known: a `started` that
                    // did is resumed by the recovery rule once the lease
                    // runs out.
                    tracing::error!(error = %e, "could not begin the next generation under the lease; it resumes after the lease runs out");
                    return true;
                }
            }
        }
    }

    /// Carries one request through its stages under `begun.lease`.
    async fn generation(&self, begun: Begun, shutdown: &CancellationToken) -> Ended {
        let id = begun.record.request_id;
        let mut lease = begun.lease;
        // The request as the log has it: its own events, replayed.
        let mut view = LiveState::default();
        match self.replica.log().events_of(id).await {
            Ok(items) => {
                for rec in items.into_iter().flatten() {
                    Follow::apply(&mut view, &rec);
                }
            }
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "could not read the request; its lease will run out and it resumes");
                return Ended::Lost;
            }
        }
        while let Some(req) = view.request(id).cloned() {
            if !req.stage.is_in_flight() {
                break;
            }
            let work = self.stages.work(&req);
            let command = tokio::select! {
                c = work => c,
                () = keep(&self.replica, &mut lease, self.times) => {
                    self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(request_id = %id, model = %lease.model, "the lease was lost mid-stage: stopped; another replica resumes the request");
                    return Ended::Lost;
                }
                () = shutdown.cancelled() => None,
            };
            let Some(command) = command else {
                // Stopped mid-stage (SIGTERM): nothing recorded; the lease
                // is given up so another replica resumes the request now
                // rather than after the lease runs out.
                if let Err(e) = self.replica.release(&lease).await {
                    tracing::warn!(error = %e, "could not release a lease; it runs out on its own");
                }
                return Ended::Stopped;
            };
            match self.replica.step(&lease, id, command).await {
                Ok(rec) => {
                    tracing::info!(request_id = %id, event = rec.event.name(), seq = rec.seq, "step recorded");
                    Follow::apply(&mut view, &rec);
                }
                Err(ReplicaError::Fenced(_)) => {
                    self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(request_id = %id, "the lease was lost: the step was not recorded; another replica resumes the request");
                    return Ended::Lost;
                }
                Err(e) => {
                    // Whether it committed is not known: leave it to the
                    // recovery rule once the lease runs out.
                    tracing::error!(request_id = %id, error = %e, "could not record a step; the request resumes after its lease runs out");
                    return Ended::Lost;
                }
            }
        }
        Ended::Finished(lease)
    }
}

/// Renews `lease` every `renew_every` and returns only once it is lost:
/// refused (expired, or taken over), or not renewable and at most one
/// renewal period from its local deadline — so a replica cut off from
/// the database stops before another can take the lease over.
pub async fn keep(replica: &Replica, lease: &mut Lease, times: LeaseTimes) {
    loop {
        let wake = (tokio::time::Instant::now() + times.renew_every).min(
            lease
                .until
                .checked_sub(times.renew_every)
                .unwrap_or(lease.until),
        );
        tokio::time::sleep_until(wake).await;
        let renewed =
            tokio::time::timeout(times.renew_every, replica.renew(lease, times.ttl)).await;
        match renewed {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return,
            Ok(Err(_)) | Err(_) => {
                if tokio::time::Instant::now() + times.renew_every >= lease.until {
                    return;
                }
            }
        }
    }
}
