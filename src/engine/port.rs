//! What the Telegram side (intake, the status board, polling, the webhook
//! route) needs from an engine, so the same code serves one process on
//! sled (`Core` over an `EventStore`) and a replica on PostgreSQL
//! (`replica::ReplicaEngine`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{AcceptError, Admitted, Cancel, Core, CoreError, NewRequest};
use crate::domain::{Limits, ModelName, RequestId, UserId};
use crate::ops::retention::{RetentionError, SweepReport};
use crate::projection::LiveState;
use crate::store::{EventStore, ReadItem, StoreError};

/// See the module doc.
pub trait Engine: Send + Sync + 'static {
    /// Where reads go: the log itself, or a replica's copy of it.
    type Store: EventStore;
    /// An admission made (its place in line taken, in the order of the
    /// calls) but not yet acknowledged: [`Engine::confirm`] answers it.
    type Admission: Send;

    /// An update whose request could not be committed is handed back to
    /// Telegram — the webhook answers `5xx` and Telegram delivers it again,
    /// to any replica (§9) — instead of being answered "couldn't take that
    /// request". Only where another try can succeed elsewhere: replicas.
    const REDELIVER_UNCOMMITTED: bool = false;

    fn store(&self) -> &Self::Store;

    /// The engine's clock (waits are measured against it).
    fn now(&self) -> chrono::DateTime<chrono::Utc>;

    /// Reads the live projection.
    fn read<R>(&self, f: impl FnOnce(&LiveState) -> R) -> R;

    /// Every record of one request, oldest first, finished long ago or not
    /// (a button under an old image names it).
    fn request_events(
        &self,
        id: RequestId,
    ) -> impl Future<Output = Result<Vec<ReadItem>, StoreError>> + Send;

    /// Admits a new request in the order of the calls (intake admits a
    /// batch one update after the other), without waiting for the commit.
    ///
    /// # Errors
    /// A limit, or a store that refused at once.
    fn admit(&self, req: NewRequest, limits: &Limits) -> Result<Self::Admission, AcceptError>;

    /// The request an admission wrote (or may have written), if any: one
    /// its user must not be told "queued" about when the confirmation
    /// fails, and that must be dealt with then.
    fn written(admission: &Self::Admission) -> Option<RequestId>;

    /// Waits until the admission is durable (committed); only then may the
    /// user be told.
    fn confirm(
        &self,
        admission: Self::Admission,
    ) -> impl Future<Output = Result<Admitted, AcceptError>> + Send;

    /// Waits until everything up to `seq` is durable.
    fn durable(&self, seq: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Retention: moves the finished requests whose last event is before
    /// `cutoff` out of the log into its archive — files in `archive_dir`
    /// beside sled's log, the database's archive table for a replica —
    /// until done or `stop`.
    fn sweep_log(
        this: &Arc<Self>,
        cutoff: DateTime<Utc>,
        archive_dir: PathBuf,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<SweepReport, RetentionError>> + Send;

    /// Remembers `model` as `user`'s (durably before it returns).
    fn choose_model(
        &self,
        user: UserId,
        model: ModelName,
    ) -> impl Future<Output = Result<(), CoreError>> + Send;

    /// The last Telegram update long polling handled, if any.
    fn saved_offset(&self) -> impl Future<Output = Option<u32>> + Send;

    /// Saves the last Telegram update long polling handled.
    fn save_offset(&self, update_id: u32) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Cancels `user`'s queued requests of updates before `issued_by`:
    /// all, or the one whose id starts with `prefix`.
    fn cancel_queued(
        &self,
        user: UserId,
        prefix: Option<&str>,
        issued_by: Option<u32>,
    ) -> impl Future<Output = Result<Cancel, CoreError>> + Send;
}

impl<S: EventStore> Engine for Core<S> {
    type Store = S;
    type Admission = Admitted;

    fn store(&self) -> &S {
        Core::store(self)
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        Core::now(self)
    }

    fn read<R>(&self, f: impl FnOnce(&LiveState) -> R) -> R {
        Core::read(self, f)
    }

    async fn request_events(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        self.store().events_of(id)
    }

    fn admit(&self, req: NewRequest, limits: &Limits) -> Result<Admitted, AcceptError> {
        Core::admit(self, req, limits)
    }

    fn written(admission: &Admitted) -> Option<RequestId> {
        match admission {
            Admitted::Queued { id, .. } => Some(*id),
            Admitted::Duplicate { .. } => None,
        }
    }

    async fn confirm(&self, admission: Admitted) -> Result<Admitted, AcceptError> {
        Core::confirm(self, admission).await
    }

    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        Core::durable(self, seq).await
    }

    async fn sweep_log(
        this: &Arc<Self>,
        cutoff: DateTime<Utc>,
        archive_dir: PathBuf,
        stop: CancellationToken,
    ) -> Result<SweepReport, RetentionError> {
        let core = Arc::clone(this);
        // Reads and rewrites many keys: off the async workers.
        tokio::task::spawn_blocking(move || {
            crate::ops::retention::sweep(core.store(), &archive_dir, cutoff, &|| {
                stop.is_cancelled()
            })
        })
        .await
        .unwrap_or_else(|e| Err(RetentionError::Stopped(e.to_string())))
    }

    async fn choose_model(&self, user: UserId, model: ModelName) -> Result<(), CoreError> {
        Core::choose_model(self, user, model).await.map(drop)
    }

    async fn saved_offset(&self) -> Option<u32> {
        crate::telegram::poll::saved_offset(self.store())
    }

    async fn save_offset(&self, update_id: u32) -> Result<(), StoreError> {
        self.store()
            .put_meta(crate::telegram::poll::OFFSET_KEY, &update_id.to_be_bytes())
    }

    async fn cancel_queued(
        &self,
        user: UserId,
        prefix: Option<&str>,
        issued_by: Option<u32>,
    ) -> Result<Cancel, CoreError> {
        Core::cancel_queued(self, user, prefix, issued_by).await
    }
}
