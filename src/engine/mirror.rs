//! A replica's read side and the engine its Telegram side uses (§9): a
//! copy of the recent PostgreSQL log in memory (a `MemoryStore`, which the
//! status board and the metrics read as they read sled) and the live
//! projection, both following the database — woken by the log's `LISTEN`
//! subscription, and re-reading every few seconds besides, since a
//! notification sent while the listener reconnects is lost — and the
//! [`Engine`] over [`Replica`] that admits, remembers models and cancels
//! through the database's transaction.
//!
//! **Bounded by time, not by history.** The projection starts from the
//! database's checkpoint and reads only the log after it; the copy holds
//! the unfinished requests and those with an event in the last
//! [`KEEP_FINISHED`], and forgets older finished ones as it runs. What it
//! no longer holds (a button under an old image) is read from the
//! database. The follower writes a checkpoint every
//! [`DEFAULT_CHECKPOINT_EVERY`] events and when it stops.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::replica::{Admission, Replica, ReplicaError};
use super::{
    AcceptError, Admitted, Cancel, CoreError, DEFAULT_CHECKPOINT_EVERY, Engine, NewRequest,
    encode_checkpoint, to_cancel,
};
use crate::domain::{Limits, ModelName, RequestId, UserId};
use crate::projection::LiveState;
use crate::store::pg::{Follow, Restored};
use crate::store::{EventStore, MemoryStore, ReadError, ReadItem, StoreError};

/// Records read from the database at a time.
const PAGE: u32 = 5_000;

/// How often the copy re-reads without a notification.
const REPOLL: Duration = Duration::from_secs(5);

/// How long an answer waits for the copy to show what it just committed.
const SHOW_WITHIN: Duration = Duration::from_secs(10);

/// How long the copy keeps a finished request after its last event.
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// How often the copy forgets what it no longer keeps.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// See the module doc.
pub struct ReplicaEngine {
    replica: Arc<Replica>,
    mirror: MemoryStore,
    view: Mutex<LiveState>,
    /// The last position the view and the copy hold.
    shown: watch::Sender<u64>,
    /// Where the view started from.
    restored: Restored,
}

impl ReplicaEngine {
    /// Builds the view from the database's checkpoint (as the replica's
    /// committer did at connect, whose state it takes when it can) and the
    /// copy from the requests it keeps (module doc), reads the log after
    /// the view's position, then follows the database until `shutdown`
    /// (the returned future: spawn it).
    ///
    /// # Errors
    /// [`StoreError::Read`] when the log cannot be read at start.
    pub async fn start(
        replica: Arc<Replica>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Self>, impl Future<Output = ()> + Send), StoreError> {
        // The committer's start, when this is the replica's first view:
        // the checkpoint and the log are then read once, not twice.
        let (view, restored) = match replica.log().take_started() {
            Some(view) => (view, replica.log().restored().clone()),
            None => replica.log().restore::<LiveState>().await?,
        };
        let mirror = MemoryStore::new();
        let position = view.last_seq;
        if position > 0 {
            let since =
                replica.now() - chrono::Duration::from_std(KEEP_FINISHED).unwrap_or_default();
            let held = view.unfinished();
            for item in replica
                .log()
                .records_of_recent(position, &held, since)
                .await?
            {
                match item {
                    Ok(rec) => {
                        mirror.insert(rec);
                    }
                    Err(ReadError::Corrupt(c)) => {
                        tracing::error!(position = c.seq, reason = %c.reason, "skipping an unreadable event");
                    }
                    Err(ReadError::Store(e)) => return Err(e),
                }
            }
        }
        let engine = Arc::new(ReplicaEngine {
            replica,
            mirror,
            view: Mutex::new(view),
            shown: watch::channel(position).0,
            restored,
        });
        engine.catch_up().await?;
        let follower = Arc::clone(&engine).follow(shutdown);
        Ok((engine, follower))
    }

    /// What a runner looks at before asking the database for work
    /// ([`super::replica::ReplicaRunner::with_hint`]).
    pub fn work_hint(self: &Arc<Self>) -> super::replica::WorkHint {
        let engine = Arc::clone(self);
        super::replica::WorkHint {
            shown: self.shown.subscribe(),
            has_work: Box::new(move |model| {
                let view = engine.view();
                view.in_flight(model).is_some() || view.head(model).is_some()
            }),
        }
    }

    /// Where the view started from: the checkpoint used, or why a stored
    /// one was not.
    pub fn restored(&self) -> &Restored {
        &self.restored
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    fn view(&self) -> MutexGuard<'_, LiveState> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads everything after the copy's last position, a page at a time,
    /// up to at least the position known committed when it began.
    async fn catch_up(&self) -> Result<(), StoreError> {
        let head = self.replica.log().last_position();
        loop {
            let from = self.shown.borrow().saturating_add(1);
            let page = self.replica.log().read_from(from, PAGE).await?;
            let full = page.len() >= PAGE as usize;
            let mut last = None;
            for item in page {
                match item {
                    Ok(rec) => {
                        last = Some(rec.seq);
                        // The view first: whoever the copy wakes reads it.
                        Follow::apply(&mut *self.view(), &rec);
                        self.mirror.insert(rec);
                    }
                    Err(ReadError::Corrupt(c)) => {
                        tracing::error!(position = c.seq, reason = %c.reason, "skipping an unreadable event");
                        last = Some(c.seq);
                        self.view().skip(c.seq);
                    }
                    Err(ReadError::Store(e)) => return Err(e),
                }
            }
            if let Some(last) = last {
                self.shown.send_replace(last);
            }
            if !full {
                // Everything committed up to `head` is read, though
                // retention may have removed the last records.
                if *self.shown.borrow() < head {
                    self.view().skip(head);
                    self.shown.send_replace(head);
                }
                return Ok(());
            }
        }
    }

    /// Follows the database until `shutdown`, checkpointing and forgetting
    /// as it goes (module doc), and checkpointing once more at the end.
    async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut committed = self.replica.log().subscribe();
        let mut saved = self.restored.checkpoint.unwrap_or(0);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            committed.borrow_and_update();
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "could not read the log; trying again");
            }
            if *self.shown.borrow() >= saved.saturating_add(DEFAULT_CHECKPOINT_EVERY) {
                saved = self.checkpoint(saved).await;
            }
            tokio::select! {
                r = committed.changed() => if r.is_err() { break },
                () = tokio::time::sleep(REPOLL) => {}
                _ = prune.tick() => { self.prune(); }
                () = shutdown.cancelled() => break,
            }
        }
        if *self.shown.borrow() > saved {
            self.checkpoint(saved).await;
        }
    }

    /// Writes a checkpoint of the view to the database; returns the
    /// position the last one written covers (`saved` when this one failed).
    async fn checkpoint(&self, saved: u64) -> u64 {
        let (position, bytes) = {
            let view = self.view();
            (view.last_seq, encode_checkpoint(&view))
        };
        let written = match bytes {
            Ok(bytes) => self.replica.log().save_checkpoint(position, &bytes).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(_) => position,
            Err(e) => {
                tracing::warn!(error = %e, "could not write a checkpoint");
                saved
            }
        }
    }

    /// Forgets from the copy the finished requests whose last event is
    /// older than [`KEEP_FINISHED`]. Returns how many.
    pub fn prune(&self) -> usize {
        let Ok(keep) = chrono::Duration::from_std(KEEP_FINISHED) else {
            return 0;
        };
        let cutoff = self.replica.now() - keep;
        let old: Vec<RequestId> = self
            .mirror
            .request_ids(None, None, Some(cutoff), false)
            .filter_map(Result::ok)
            .filter(|&id| self.view().request(id).is_none())
            .filter(|&id| {
                self.mirror.events_of(id).is_ok_and(|events| {
                    events
                        .last()
                        .and_then(|e| e.as_ref().ok())
                        .is_some_and(|last| last.at < cutoff)
                })
            })
            .collect();
        if old.is_empty() {
            return 0;
        }
        match self.mirror.forget_requests(&old, "mirror/pruned", &[]) {
            Ok(_) => old.len(),
            Err(e) => {
                tracing::warn!(error = %e, "could not forget old requests from the copy");
                0
            }
        }
    }

    /// Waits until the copy holds position `seq` (what this replica just
    /// committed), so what is said next reads it.
    async fn shown(&self, seq: u64) -> Result<(), StoreError> {
        let mut shown = self.shown.subscribe();
        let reached = tokio::time::timeout(SHOW_WITHIN, shown.wait_for(|s| *s >= seq)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Read(
                "the log could not be read back in time".into(),
            )),
        }
    }

    /// An admission whose outcome could not be learnt: asked again until
    /// the database answers, and cancelled if it was written after all —
    /// its user was told it could not be taken.
    fn settle_later(self: &Arc<Self>, keys: crate::store::pg::IntakeKeys, id: RequestId) {
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            use backon::Retryable as _;
            // The database just failed: ask again in a second, then back
            // off to 30 s between tries, 40 tries in all.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let backoff = backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(2))
                .with_max_delay(Duration::from_secs(30))
                .with_max_times(39);
            let settled = (|| engine.replica.log().settle(keys))
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .await;
            match settled {
                Ok(Some(found)) if found == id => match engine.replica.cancel(id).await {
                    Ok(_) => {
                        tracing::warn!(request_id = %id, "cancelled a request its user was told could not be taken (it had committed after all)")
                    }
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "a request its user was told could not be taken had committed, and could not be cancelled")
                    }
                },
                Ok(_) => {}
                Err(_) => {
                    tracing::error!(request_id = %id, "could not learn whether a refused request committed");
                }
            }
        });
    }
}

impl Engine for Arc<ReplicaEngine> {
    type Store = MemoryStore;
    type Admission = Admission;
    const REDELIVER_UNCOMMITTED: bool = true;

    fn store(&self) -> &MemoryStore {
        &self.mirror
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.replica.now()
    }

    fn read<R>(&self, f: impl FnOnce(&LiveState) -> R) -> R {
        f(&self.view())
    }

    /// From the copy, or the database for a request it no longer keeps.
    async fn request_events(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        let kept = self.mirror.events_of(id)?;
        if kept.is_empty() {
            self.replica.log().events_of(id).await
        } else {
            Ok(kept)
        }
    }

    fn admit(&self, req: NewRequest, limits: &Limits) -> Result<Admission, AcceptError> {
        self.replica.admit_now(req, limits)
    }

    /// Nothing to note: a commit that failed wrote nothing, and one whose
    /// outcome is unknown is settled by [`Engine::confirm`] itself.
    fn written(_: &Admission) -> Option<RequestId> {
        None
    }

    async fn confirm(&self, admission: Admission) -> Result<Admitted, AcceptError> {
        let keys = admission.keys();
        match self.replica.admitted(admission).await {
            Ok(Admitted::Queued { id, position, seq }) => {
                let seq = if seq == 0 {
                    self.replica.log().last_position()
                } else {
                    seq
                };
                self.shown(seq).await?;
                let position = if position == 0 {
                    self.read(|s| s.position(id)).unwrap_or(1)
                } else {
                    position
                };
                Ok(Admitted::Queued { id, position, seq })
            }
            Ok(Admitted::Duplicate { id }) => {
                // Made by another replica a moment ago, perhaps: shown
                // before its status is read.
                let _ = self.shown(self.replica.log().last_position()).await;
                Ok(Admitted::Duplicate { id })
            }
            Err(AcceptError::Unwritten { id, error }) => {
                self.settle_later(keys, id);
                Err(AcceptError::Store(error))
            }
            Err(e) => Err(e),
        }
    }

    /// The copy holds only what committed: durable already.
    async fn durable(&self, _seq: u64) -> Result<(), StoreError> {
        Ok(())
    }

    /// Into the database's archive table (`easel_archive`); `archive_dir`
    /// is not used: the archive is shared by every replica.
    async fn sweep_log(
        this: &Arc<Self>,
        cutoff: chrono::DateTime<chrono::Utc>,
        _archive_dir: std::path::PathBuf,
        stop: CancellationToken,
    ) -> Result<crate::ops::retention::SweepReport, crate::ops::retention::RetentionError> {
        let log = this.replica.log();
        crate::ops::retention::sweep_database(log, cutoff, &|| stop.is_cancelled()).await
    }

    async fn choose_model(&self, user: UserId, model: ModelName) -> Result<(), CoreError> {
        let rec = self.replica.choose_model(user, model).await?;
        self.shown(rec.seq).await?;
        Ok(())
    }

    /// In the database: the poller elected next goes on from it.
    async fn saved_offset(&self) -> Option<u32> {
        let bytes = self
            .replica
            .log()
            .get_meta(crate::telegram::poll::OFFSET_KEY)
            .await
            .ok()
            .flatten()?;
        Some(u32::from_be_bytes(bytes.as_slice().try_into().ok()?))
    }

    async fn save_offset(&self, update_id: u32) -> Result<(), StoreError> {
        self.replica
            .log()
            .put_meta(crate::telegram::poll::OFFSET_KEY, &update_id.to_be_bytes())
            .await
    }

    async fn cancel_queued(
        &self,
        user: UserId,
        prefix: Option<&str>,
        issued_by: Option<u32>,
    ) -> Result<Cancel, CoreError> {
        let ids = match self.read(|s| to_cancel(s, user, prefix, issued_by)) {
            Ok(ids) => ids,
            Err(ambiguous) => return Ok(ambiguous),
        };
        let mut done = Vec::new();
        let mut last = 0;
        for id in ids {
            // Refused when it started meanwhile, on any replica.
            match self.replica.cancel(id).await {
                Ok(rec) => {
                    last = rec.seq;
                    done.push(id);
                }
                Err(ReplicaError::Refused(_) | ReplicaError::NotFound(_)) => {}
                Err(ReplicaError::Store(e)) => return Err(CoreError::Store(e)),
                Err(e) => return Err(CoreError::Store(StoreError::Write(e.to_string().into()))),
            }
        }
        if last > 0 {
            self.shown(last).await?;
        }
        Ok(Cancel::Done(done))
    }
}

impl ReplicaEngine {
    /// The highest position the copy holds.
    pub fn position(&self) -> u64 {
        self.mirror.last_seq()
    }
}
