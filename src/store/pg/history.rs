//! What the PostgreSQL log keeps beside the events themselves: the
//! checkpoint a replica starts from (so start-up reads the log after it,
//! not the whole history), the request index the operator tools and the
//! contract read, named values by prefix, and retention's removal of
//! finished requests into the archive table.
//!
//! **Checkpoints.** One row, the newest wins: every replica writes one
//! now and then from its view of the log, and a write older than the
//! stored one changes nothing. A checkpoint is used only when it fits —
//! its format, its position not past the head, and every request it holds
//! as unfinished still in the log: retention removes only finished
//! requests, so one that is gone finished after the checkpoint, and
//! starting from it would run that request again (§1: terminal is
//! forever). Such a checkpoint is ignored and the whole log read instead.

use chrono::{DateTime, Utc};

use super::{Follow, PgLog, db, pool_err, to_i64};
use crate::domain::{RequestId, UserId};
use crate::store::{ReadItem, StoreError};

/// Where a followed state started from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Restored {
    /// The checkpoint's position, when one was used.
    pub checkpoint: Option<u64>,
    /// Why a stored checkpoint was not used.
    pub problem: Option<String>,
}

/// The stored checkpoint, if any.
pub(super) async fn stored(
    client: &deadpool_postgres::Object,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let row = client
        .query_opt(
            "SELECT position, state FROM easel_checkpoint WHERE id = 1",
            &[],
        )
        .await
        .map_err(|e| StoreError::Read(db("reading the checkpoint", &e)))?;
    Ok(row.map(|r| (u64::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1))))
}

/// `state` from the stored checkpoint when one fits the log whose head is
/// `head` (see the module doc), else `state` as given.
pub(super) async fn restore<F: Follow>(
    client: &deadpool_postgres::Object,
    head: u64,
    state: F,
) -> Result<(F, Restored), StoreError> {
    let mut report = Restored::default();
    let Some((position, bytes)) = stored(client).await? else {
        return Ok((state, report));
    };
    let Some(found) = F::restore(position, &bytes) else {
        return Ok((state, report));
    };
    let restored = match found {
        Ok(_) if position > head => Err(format!(
            "checkpoint at position {position} does not fit the log"
        )),
        Ok(restored) => {
            let held = restored.unfinished();
            let ids: Vec<uuid::Uuid> = held.iter().map(|id| id.0).collect();
            let present = client
                .query(
                    "SELECT DISTINCT request_id FROM easel_events WHERE request_id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(|e| StoreError::Read(db("checking the checkpoint", &e)))?;
            let present: std::collections::HashSet<uuid::Uuid> =
                present.iter().map(|r| r.get(0)).collect();
            match held.iter().find(|id| !present.contains(&id.0)) {
                None => Ok(restored),
                Some(&gone) => Err(crate::engine::removed_problem(position, gone)),
            }
        }
        Err(problem) => Err(problem),
    };
    match restored {
        Ok(restored) => {
            report.checkpoint = Some(position);
            Ok((restored, report))
        }
        Err(problem) => {
            tracing::warn!(%problem, "reading the whole log instead");
            report.problem = Some(problem);
            Ok((state, report))
        }
    }
}

impl<F: Follow> PgLog<F> {
    /// Stores `state`, a checkpoint of the log up to `position`, unless
    /// the stored one is newer (several replicas write them; one at the
    /// same position is replaced, since a stored one may be unusable).
    /// Returns whether it was stored.
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub async fn save_checkpoint(&self, position: u64, state: &[u8]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO easel_checkpoint (id, position, state) VALUES (1, $1, $2) \
                 ON CONFLICT (id) DO UPDATE SET position = EXCLUDED.position, state = EXCLUDED.state \
                 WHERE easel_checkpoint.position <= EXCLUDED.position",
                &[&to_i64(position), &state],
            )
            .await
            .map_err(|e| StoreError::Write(db("writing the checkpoint", &e)))?;
        Ok(n == 1)
    }

    /// The stored checkpoint and the position it covers, if any.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn load_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        stored(&self.client().await?).await
    }

    /// A state of kind `S` as the start-up of a replica builds it: from the
    /// stored checkpoint when one fits the log (module doc), else empty;
    /// then the caller reads the log after its position.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn restore<S: Follow + Default>(&self) -> Result<(S, Restored), StoreError> {
        let client = self.client().await?;
        restore(&client, self.last_position(), S::default()).await
    }

    /// The records up to `position` of the requests in `ids` and of every
    /// request with an event at or after `since`, oldest first: what a
    /// replica's copy holds from before its checkpoint.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn records_of_recent(
        &self,
        position: u64,
        ids: &[RequestId],
        since: DateTime<Utc>,
    ) -> Result<Vec<ReadItem>, StoreError> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        self.records(
            "SELECT position, record::text FROM easel_events WHERE position <= $1 AND request_id IN \
             (SELECT request_id FROM easel_events WHERE request_id = ANY($2) \
              UNION SELECT request_id FROM easel_events WHERE at >= $3) \
             ORDER BY position",
            &[&to_i64(position), &ids, &since],
            "reading recent requests",
        )
        .await
    }

    /// Every record of the requests in `ids`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn events_of_each(&self, ids: &[RequestId]) -> Result<Vec<ReadItem>, StoreError> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        self.records(
            "SELECT position, record::text FROM easel_events WHERE request_id = ANY($1) ORDER BY position",
            &[&ids],
            "reading requests",
        )
        .await
    }

    /// The request the record at `position` belongs to (readable or not).
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn request_at(&self, position: u64) -> Result<Option<RequestId>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT request_id FROM easel_events WHERE position = $1",
                &[&to_i64(position)],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading an event", &e)))?;
        Ok(row.map(|r| RequestId(r.get(0))))
    }

    /// Request ids in creation order (the time of their `queued`, then
    /// position), newest first when `newest_first`, created within
    /// `[since, until]` when given, only `user`'s when given.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn request_ids(
        &self,
        user: Option<UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Result<Vec<RequestId>, StoreError> {
        // The partial index `easel_events_queued` serves this scan.
        let order = if newest_first {
            "ORDER BY at DESC, position DESC"
        } else {
            "ORDER BY at, position"
        };
        let sql = format!(
            "SELECT request_id FROM easel_events WHERE {QUEUED} \
             AND ($1::bigint IS NULL OR (record->'event'->'origin'->>'user_id')::bigint = $1) \
             AND ($2::timestamptz IS NULL OR at >= $2) AND ($3::timestamptz IS NULL OR at <= $3) {order}"
        );
        let client = self.client().await?;
        let rows = client
            .query(&sql, &[&user.map(|u| u.0), &since, &until])
            .await
            .map_err(|e| StoreError::Read(db("reading the request index", &e)))?;
        Ok(rows.iter().map(|r| RequestId(r.get(0))).collect())
    }

    /// Request ids from `lo` to `hi` in id order (finding a request by the
    /// start of its id).
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn ids_between(
        &self,
        lo: RequestId,
        hi: RequestId,
    ) -> Result<Vec<RequestId>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT DISTINCT request_id FROM easel_events WHERE request_id BETWEEN $1 AND $2 ORDER BY request_id",
                &[&lo.0, &hi.0],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading the request index", &e)))?;
        Ok(rows.iter().map(|r| RequestId(r.get(0))).collect())
    }

    /// Every named value whose name starts with `prefix`, by name (byte
    /// order, as sled's).
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, value FROM easel_meta WHERE starts_with(name, $1) ORDER BY name COLLATE \"C\"",
                &[&prefix],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading meta", &e)))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Removes a named value (absent is fine).
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub async fn delete_meta(&self, name: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM easel_meta WHERE name = $1", &[&name])
            .await
            .map_err(|e| StoreError::Write(db("removing meta", &e)))?;
        Ok(())
    }

    /// Moves whole requests from the log to the archive table — every
    /// event, and the intake keys that name them — together with setting
    /// meta `name` to `value`, in one transaction. Returns how many events
    /// moved. Positions stay taken (the head does not move back). Only
    /// for finished requests (retention).
    ///
    /// # Errors
    /// [`StoreError::Write`]; then nothing moved.
    pub async fn forget_requests(
        &self,
        ids: &[RequestId],
        name: &str,
        value: &[u8],
    ) -> Result<usize, StoreError> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        let write = |e: tokio_postgres::Error| StoreError::Write(db("removing requests", &e));
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Write(pool_err(&e)))?;
        let tx = client.transaction().await.map_err(write)?;
        let moved = tx
            .execute(
                "WITH gone AS (DELETE FROM easel_events WHERE request_id = ANY($1) RETURNING *) \
                 INSERT INTO easel_archive SELECT * FROM gone",
                &[&ids],
            )
            .await
            .map_err(write)?;
        for sql in [
            "DELETE FROM easel_intake_updates WHERE request_id = ANY($1)",
            "DELETE FROM easel_intake_messages WHERE request_id = ANY($1)",
        ] {
            tx.execute(sql, &[&ids]).await.map_err(write)?;
        }
        tx.execute(
            "INSERT INTO easel_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )
        .await
        .map_err(write)?;
        tx.commit().await.map_err(write)?;
        Ok(usize::try_from(moved).unwrap_or(usize::MAX))
    }

    /// Every archived record, oldest first (what retention moved out of
    /// the log).
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn read_archive(&self) -> Result<Vec<ReadItem>, StoreError> {
        self.records(
            "SELECT position, record::text FROM easel_archive ORDER BY position",
            &[],
            "reading the archive",
        )
        .await
    }
}

/// The condition the partial index `easel_events_queued` is built on.
const QUEUED: &str = "(record->'event'->>'type') = 'queued'";
