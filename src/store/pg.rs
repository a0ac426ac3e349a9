//! The event log on PostgreSQL (§9; issue 17, first part): events with
//! contiguous positions in commit order, intake keys unique across
//! replicas, application-level group commit, and a subscription woken by
//! `LISTEN/NOTIFY` that re-reads after every reconnect. Not yet behind
//! the engine: the engine's admission still runs in one process
//! (`engine::Core`); moving it into this log's transaction is the next
//! step (see docs/scale-out.md).
//!
//! **Gap-free order.** Every append transaction first locks the one row
//! of `easel_head` (`SELECT … FOR UPDATE`), takes the next positions from
//! it, and writes it back before `COMMIT`. Positions are therefore given
//! in commit order and a rolled-back transaction gives none back — so a
//! reader that has seen position N never later finds a smaller one
//! appearing (what a sequence cannot promise: `scale-out-notes.md`).
//!
//! **Group commit.** The head lock serialises commits, so one commit per
//! append would cost a WAL flush each. Appends go to one committer task
//! per process, which takes every append waiting and writes them in one
//! transaction; each caller hears back once that transaction committed
//! (durable, with `synchronous_commit=on`).
//!
//! **Intake keys.** A `queued` event's update id and chat + message id are
//! unique keys (never "greater than the last seen": Telegram may restart
//! update ids). Checked under the head lock, so every replica's commit is
//! seen; an append that repeats one is answered with the request that
//! holds it and writes nothing.
//!
//! The stored record is the codec's JSON (`codec::encode_json`), with its
//! version, so the sled and PostgreSQL logs hold the same text.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{Cause, NewEvent, ReadItem, Recorded, StoreError, codec};
use crate::domain::{ChatId, Event, RequestId};

/// The schema this build writes and reads. A database with a newer one is
/// refused at connect (a newer easel migrated it).
pub const SCHEMA_VERSION: i32 = 1;

/// The migrations, in order; the first is version 1. Applied at connect,
/// each in its own transaction, under a transaction-scoped advisory lock so
/// replicas starting together apply each once.
const MIGRATIONS: [&str; 1] = [include_str!("pg/0001_events.sql")];

/// Key of the advisory lock taken while migrating ("easel" in ASCII).
const MIGRATION_LOCK: i64 = 0x0065_6173_656c;

/// The channel a commit notifies with its last position.
const CHANNEL: &str = "easel_events";

/// Appends one commit takes at most (more wait for the next).
const MAX_GROUP: usize = 256;

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Written and committed, with their positions.
    Written(Vec<Recorded>),
    /// A `queued` event repeated an update or message that `RequestId`
    /// was made from; nothing was written.
    Duplicate(RequestId),
}

/// One caller's append, waiting for the committer.
struct Pending {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The PostgreSQL event log of one process (a replica).
pub struct PgLog {
    pool: Pool,
    appends: mpsc::Sender<Pending>,
    /// The highest position known committed (by anyone), from this
    /// process's commits and the notifications of the others.
    committed: watch::Sender<u64>,
    commits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for PgLog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn db(what: &str, e: &tokio_postgres::Error) -> Cause {
    // tokio-postgres' messages name neither the URL nor the password.
    let detail = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned());
    Cause::from(format!("{what}: {detail}"))
}

fn pool_err(e: &deadpool_postgres::PoolError) -> Cause {
    Cause::from(format!("no database connection: {e}"))
}

impl PgLog {
    /// Connects, applies the migrations this build knows, and starts the
    /// committer and the listener.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the database cannot be reached, the URL is
    /// not one, or its schema is newer than this build's.
    pub async fn connect(url: &SecretString) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.expose_secret().parse().map_err(|_| {
            StoreError::Open(Cause::from(
                "EASEL_DATABASE_URL is not a PostgreSQL URL (postgres://user@host/db)",
            ))
        })?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .build()
            .map_err(|e| StoreError::Open(Cause::from(e.to_string())))?;
        migrate(&pool).await?;
        let head = {
            let client = pool
                .get()
                .await
                .map_err(|e| StoreError::Open(pool_err(&e)))?;
            let row = client
                .query_one("SELECT position FROM easel_head WHERE id = 1", &[])
                .await
                .map_err(|e| StoreError::Open(db("reading the head", &e)))?;
            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
        };
        let (committed, _) = watch::channel(head);
        let (appends, rx) = mpsc::channel(4096);
        let commits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(commit_loop(
            pool.clone(),
            rx,
            committed.clone(),
            Arc::clone(&commits),
        ));
        tokio::spawn(listen(
            config,
            committed.clone(),
            pool.clone(),
            stop.clone(),
        ));
        Ok(PgLog {
            pool,
            appends,
            committed,
            commits,
            stop,
        })
    }

    /// Appends `events` (one request's, or several) in one go: all get
    /// positions and commit together, or none does. Returns once committed.
    ///
    /// # Errors
    /// [`StoreError::Write`] when the database refused; nothing of this
    /// append is written then.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.appends
            .send(Pending { events, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records from `position` on, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn read_from(&self, position: u64, limit: u32) -> Result<Vec<ReadItem>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT position, record::text FROM easel_events WHERE position >= $1 ORDER BY position LIMIT $2",
                &[&to_i64(position), &i64::from(limit)],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading events", &e)))?;
        Ok(rows
            .iter()
            .map(|r| decode_row(r.get(0), r.get(1)))
            .collect())
    }

    /// Every record of one request, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn events_of(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT position, record::text FROM easel_events WHERE request_id = $1 ORDER BY position",
                &[&id.0],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading a request", &e)))?;
        Ok(rows
            .iter()
            .map(|r| decode_row(r.get(0), r.get(1)))
            .collect())
    }

    /// The request made from Telegram update `update_id`, if any.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn find_update(&self, update_id: u32) -> Result<Option<RequestId>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT request_id FROM easel_intake_updates WHERE update_id = $1",
                &[&i64::from(update_id)],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading intake keys", &e)))?;
        Ok(row.map(|r| RequestId(r.get(0))))
    }

    /// The request made from that chat's message, if any.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn find_message(
        &self,
        chat: ChatId,
        message_id: i32,
    ) -> Result<Option<RequestId>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT request_id FROM easel_intake_messages WHERE chat_id = $1 AND message_id = $2",
                &[&chat.0, &message_id],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading intake keys", &e)))?;
        Ok(row.map(|r| RequestId(r.get(0))))
    }

    /// The highest position known committed, and its changes: this
    /// process's commits at once, other replicas' by their notifications
    /// (and by a re-read after the listener reconnects, since
    /// notifications sent meanwhile are lost).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// The highest position known committed.
    pub fn last_position(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Transactions this process committed (to observe group commit).
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// A small named value outside the log.
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub async fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO easel_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await
            .map_err(|e| StoreError::Write(db("writing meta", &e)))?;
        Ok(())
    }

    /// # Errors
    /// [`StoreError::Read`].
    pub async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT value FROM easel_meta WHERE name = $1", &[&name])
            .await
            .map_err(|e| StoreError::Read(db("reading meta", &e)))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Read(pool_err(&e)))
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn decode_row(position: i64, record: String) -> ReadItem {
    let seq = u64::try_from(position).unwrap_or(0);
    codec::decode_json(record.as_bytes())
        .map_err(|reason| super::ReadError::Corrupt(super::Corrupt { seq, reason }))
        .map(|mut r| {
            r.seq = seq;
            r
        })
}

/// Applies the migrations the database lacks; refuses a newer schema.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let open = |what: &str, e: &tokio_postgres::Error| StoreError::Open(db(what, e));
    let mut client = pool
        .get()
        .await
        .map_err(|e| StoreError::Open(pool_err(&e)))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| open("starting the migration", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| open("waiting for another replica's migration", &e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS easel_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| open("creating the schema table", &e))?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM easel_schema", &[])
        .await
        .map_err(|e| open("reading the schema version", &e))?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Open(Cause::from(format!(
            "the database's schema is version {current}, newer than this easel's {SCHEMA_VERSION}: upgrade easel"
        ))));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        if version <= current {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| open(&format!("migration {version}"), &e))?;
        tx.execute(
            "INSERT INTO easel_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(|e| open("recording the schema version", &e))?;
    }
    tx.commit()
        .await
        .map_err(|e| open("committing the migration", &e))
}

/// Takes every append waiting (up to [`MAX_GROUP`]) and commits them in
/// one transaction, until every sender is gone.
async fn commit_loop(
    pool: Pool,
    mut rx: mpsc::Receiver<Pending>,
    committed: watch::Sender<u64>,
    commits: Arc<AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let batches: Vec<Vec<NewEvent>> = group.iter().map(|p| p.events.clone()).collect();
        match commit_group(&pool, &batches).await {
            Ok((results, last)) => {
                commits.fetch_add(1, Ordering::Relaxed);
                committed.send_if_modified(|c| {
                    let moved = last > *c;
                    *c = (*c).max(last);
                    moved
                });
                for (p, r) in group.into_iter().zip(results) {
                    let _ = p.reply.send(Ok(r));
                }
            }
            Err(e) => {
                for p in group {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The intake keys a `queued` event claims.
fn intake_keys(e: &NewEvent) -> (Option<i64>, Option<(i64, i32)>) {
    match &e.event {
        Event::Queued { origin, .. } => (
            origin.update_id.map(i64::from),
            origin.message_id.map(|m| (origin.chat_id.0, m)),
        ),
        _ => (None, None),
    }
}

/// One transaction: lock the head, write each batch (or find it a
/// duplicate), move the head, notify, commit.
async fn commit_group(
    pool: &Pool,
    batches: &[Vec<NewEvent>],
) -> Result<(Vec<Appended>, u64), StoreError> {
    let write = |what: &str, e: &tokio_postgres::Error| StoreError::Write(db(what, e));
    let mut client = pool
        .get()
        .await
        .map_err(|e| StoreError::Write(pool_err(&e)))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| write("starting an append", &e))?;
    let head: i64 = tx
        .query_one(
            "SELECT position FROM easel_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| write("locking the head", &e))?
        .get(0);
    let mut next = head;
    let mut results = Vec::with_capacity(batches.len());
    // Keys claimed earlier in this same group (not yet visible as rows).
    let mut claimed_updates: std::collections::HashMap<i64, RequestId> = Default::default();
    let mut claimed_messages: std::collections::HashMap<(i64, i32), RequestId> = Default::default();
    'batch: for events in batches {
        for e in events {
            let (update, message) = intake_keys(e);
            if let Some(u) = update {
                let held = match claimed_updates.get(&u) {
                    Some(id) => Some(*id),
                    None => tx
                        .query_opt(
                            "SELECT request_id FROM easel_intake_updates WHERE update_id = $1",
                            &[&u],
                        )
                        .await
                        .map_err(|e| write("checking intake keys", &e))?
                        .map(|r| RequestId(r.get(0))),
                };
                if let Some(id) = held {
                    results.push(Appended::Duplicate(id));
                    continue 'batch;
                }
            }
            if let Some(m) = message {
                let held = match claimed_messages.get(&m) {
                    Some(id) => Some(*id),
                    None => tx
                        .query_opt(
                            "SELECT request_id FROM easel_intake_messages WHERE chat_id = $1 AND message_id = $2",
                            &[&m.0, &m.1],
                        )
                        .await
                        .map_err(|e| write("checking intake keys", &e))?
                        .map(|r| RequestId(r.get(0))),
                };
                if let Some(id) = held {
                    results.push(Appended::Duplicate(id));
                    continue 'batch;
                }
            }
        }
        let mut written = Vec::with_capacity(events.len());
        for e in events {
            next += 1;
            let rec = Recorded {
                seq: u64::try_from(next).unwrap_or(0),
                request_id: e.request_id,
                at: e.at,
                event: e.event.clone(),
            };
            let json = codec::encode_json(&rec)
                .map_err(|err| StoreError::Write(Cause::from(err.to_string())))?;
            let json = String::from_utf8(json)
                .map_err(|err| StoreError::Write(Cause::from(err.to_string())))?;
            tx.execute(
                "INSERT INTO easel_events (position, request_id, at, record) VALUES ($1, $2, $3, $4::text::json)",
                &[&next, &e.request_id.0, &e.at, &json],
            )
            .await
            .map_err(|err| write("writing an event", &err))?;
            let (update, message) = intake_keys(e);
            if let Some(u) = update {
                tx.execute(
                    "INSERT INTO easel_intake_updates (update_id, request_id) VALUES ($1, $2)",
                    &[&u, &e.request_id.0],
                )
                .await
                .map_err(|err| write("writing an intake key", &err))?;
                claimed_updates.insert(u, e.request_id);
            }
            if let Some(m) = message {
                tx.execute(
                    "INSERT INTO easel_intake_messages (chat_id, message_id, request_id) VALUES ($1, $2, $3)",
                    &[&m.0, &m.1, &e.request_id.0],
                )
                .await
                .map_err(|err| write("writing an intake key", &err))?;
                claimed_messages.insert(m, e.request_id);
            }
            written.push(rec);
        }
        results.push(Appended::Written(written));
    }
    if next > head {
        tx.execute("UPDATE easel_head SET position = $1 WHERE id = 1", &[&next])
            .await
            .map_err(|e| write("moving the head", &e))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &next.to_string()])
            .await
            .map_err(|e| write("notifying", &e))?;
    }
    tx.commit()
        .await
        .map_err(|e| write("committing an append", &e))?;
    Ok((results, u64::try_from(next).unwrap_or(0)))
}

/// Follows other replicas' commits: `LISTEN` on a dedicated connection
/// (never a pooled one: a pooled connection would carry the LISTEN to
/// whoever gets it next), and after every (re)connect a re-read of the
/// head, since notifications sent while disconnected are lost.
async fn listen(
    config: tokio_postgres::Config,
    committed: watch::Sender<u64>,
    pool: Pool,
    stop: CancellationToken,
) {
    use futures_util::StreamExt as _;
    let mut pause = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            c = config.connect(NoTls) => c,
        };
        let (client, mut connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %db("listening for commits", &e), retry_in = ?pause, "the database cannot be reached");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let (tx, mut notes) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        if client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .is_err()
        {
            driver.abort();
            continue;
        }
        pause = Duration::from_millis(100);
        // Caught up with whatever was committed while not listening.
        if let Ok(c) = pool.get().await
            && let Ok(row) = c
                .query_one("SELECT position FROM easel_head WHERE id = 1", &[])
                .await
        {
            let head = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            committed.send_if_modified(|c| {
                let moved = head > *c;
                *c = (*c).max(head);
                moved
            });
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => { driver.abort(); return; }
                note = notes.recv() => match note {
                    Some(payload) => {
                        if let Ok(p) = payload.parse::<u64>() {
                            committed.send_if_modified(|c| {
                                let moved = p > *c;
                                *c = (*c).max(p);
                                moved
                            });
                        }
                    }
                    // The connection ended: connect again and re-read.
                    None => break,
                },
            }
        }
        drop(client);
    }
}
