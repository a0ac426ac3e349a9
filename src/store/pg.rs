//! The event log on PostgreSQL (§9; issue 17): events with contiguous
//! positions in commit order, intake keys unique across replicas,
//! application-level group commit, decisions taken inside the append
//! transaction against state caught up under the head lock, per-model
//! leases with fencing, and a subscription woken by `LISTEN/NOTIFY` that
//! re-reads after every reconnect.
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
//! **Decisions in the transaction.** A log opened with
//! [`PgLog::connect_following`] keeps a state (`F:` [`Follow`]; the
//! engine's live projection) in its committer. Each transaction, after
//! the head lock, first applies whatever other replicas committed since
//! that state's position, then runs each decision of the group against it
//! in order (each seeing the events of the ones before), so a check such
//! as a user's pending cap sees every commit of every replica. A
//! transaction that fails gives the state back as it was before it.
//!
//! The stored record is the codec's JSON (`codec::encode_json`), with its
//! version, so the sled and PostgreSQL logs hold the same text.

use std::collections::HashMap;
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

mod history;
pub use history::Restored;

/// The schema this build writes and reads. A database with a newer one is
/// refused at connect (a newer easel migrated it).
pub const SCHEMA_VERSION: i32 = 3;

/// The migrations, in order; the first is version 1. Applied at connect,
/// each in its own transaction, under a transaction-scoped advisory lock so
/// replicas starting together apply each once.
const MIGRATIONS: [&str; 3] = [
    include_str!("pg/0001_events.sql"),
    include_str!("pg/0002_leases.sql"),
    include_str!("pg/0003_history.sql"),
];

/// Key of the advisory lock taken while migrating ("easel" in ASCII).
const MIGRATION_LOCK: i64 = 0x0065_6173_656c;

/// The channel a commit notifies with its last position.
const CHANNEL: &str = "easel_events";

/// The payload a lease's release notifies with (a commit's is a number).
const RELEASED: &str = "released";

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
    /// The lease presented is no longer the model's (it expired, or
    /// another replica holds it with a later epoch); nothing was written.
    Fenced,
    /// The decision refused (it says why through its own channel);
    /// nothing was written.
    Declined,
}

/// State the committer keeps caught up with the log, for decisions taken
/// under the head lock ([`PgLog::connect_following`]).
pub trait Follow: Clone + Send + 'static {
    /// The last position applied; `u64::MAX` for a state that follows
    /// nothing (then nothing is read for it).
    fn position(&self) -> u64;
    /// Applies the record at the next position.
    fn apply(&mut self, rec: &Recorded);
    /// Moves past an unreadable record (reported, never applied).
    fn skip(&mut self, position: u64);
    /// The state a checkpoint stored at `position` holds, or why it cannot
    /// be used; `None` for a kind of state that keeps no checkpoint.
    fn restore(position: u64, bytes: &[u8]) -> Option<Result<Self, String>>
    where
        Self: Sized,
    {
        let _ = (position, bytes);
        None
    }
    /// The requests this state holds as unfinished (a checkpoint holding
    /// one the log no longer has is not used: `history`).
    fn unfinished(&self) -> Vec<RequestId> {
        Vec::new()
    }
}

/// A log without decisions follows nothing.
impl Follow for () {
    fn position(&self) -> u64 {
        u64::MAX
    }
    fn apply(&mut self, _: &Recorded) {}
    fn skip(&mut self, _: u64) {}
}

/// A decision: the events to write, given the state caught up under the
/// head lock, or `None` to write nothing (the closure tells its caller
/// why through a channel of its own). Runs inside the committer: it must
/// not block.
pub type Decide<F> = Box<dyn FnOnce(&F) -> Option<Vec<NewEvent>> + Send>;

/// Intake keys as stored: an update id, a chat and message id.
type RawKeys = (Option<i64>, Option<(i64, i32)>);

/// The intake keys a decision's `queued` event will claim, checked before
/// it runs: an update seen before is answered [`Appended::Duplicate`]
/// whatever the limits say now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntakeKeys {
    pub update_id: Option<u32>,
    pub message: Option<(ChatId, i32)>,
}

impl IntakeKeys {
    /// The keys of a request made from `origin`.
    pub fn of(origin: &crate::domain::Origin) -> Self {
        IntakeKeys {
            update_id: origin.update_id,
            message: origin.message_id.map(|m| (origin.chat_id, m)),
        }
    }

    fn raw(self) -> RawKeys {
        (
            self.update_id.map(i64::from),
            self.message.map(|(c, m)| (c.0, m)),
        )
    }
}

/// A model's lease (§9): the right to run that model's one generation at
/// a time, across replicas. `epoch` is its fencing number: events of the
/// generation are appended with it ([`PgLog::append_fenced`]) and refused
/// once another replica took the lease over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub model: String,
    pub holder: String,
    pub epoch: i64,
    /// Stop working before this (local clock): taken before the claim (or
    /// renewal) was sent, plus the time to live, so it is never later
    /// than the lease's end on the database's clock.
    pub until: tokio::time::Instant,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The lease is ours, and the events claimed with it are written.
    Won {
        lease: Lease,
        records: Vec<Recorded>,
    },
    /// Another replica holds an unexpired lease; nothing was written.
    Held,
    /// The decision found nothing to run; no lease was taken.
    Idle,
}

/// What an op writes: events given by the caller, or decided in the
/// transaction.
enum Events<F> {
    Given(Vec<NewEvent>),
    Decided { keys: IntakeKeys, decide: Decide<F> },
}

impl<F> Events<F> {
    /// The intake keys to look up before the op runs.
    fn keys(&self) -> Vec<RawKeys> {
        match self {
            Events::Given(events) => events.iter().map(intake_keys).collect(),
            Events::Decided { keys, .. } => vec![keys.raw()],
        }
    }
}

/// One caller's work for the committer.
enum Op<F> {
    Append {
        events: Events<F>,
        fence: Option<Lease>,
    },
    Claim {
        model: String,
        holder: String,
        ttl: Duration,
        events: Events<F>,
    },
}

enum Done {
    Appended(Appended),
    Claimed(Claimed),
}

impl Done {
    /// An append's answer (a claim's answer to an append would be a bug:
    /// reported as a closed log rather than a panic).
    fn appended(self) -> Result<Appended, StoreError> {
        match self {
            Done::Appended(a) => Ok(a),
            Done::Claimed(_) => Err(StoreError::Closed),
        }
    }

    /// A claim's answer (as [`Done::appended`]).
    fn claimed(self) -> Result<Claimed, StoreError> {
        match self {
            Done::Claimed(c) => Ok(c),
            Done::Appended(_) => Err(StoreError::Closed),
        }
    }
}

/// The answer to [`PgLog::decide_now`], once its transaction ended.
pub struct Answer(oneshot::Receiver<Result<Done, StoreError>>);

impl Answer {
    /// What the decision did.
    ///
    /// # Errors
    /// As [`PgLog::append`].
    pub async fn appended(self) -> Result<Appended, StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)??.appended()
    }
}

/// One caller's op, waiting for the committer.
struct Pending<F> {
    op: Op<F>,
    asked_at: tokio::time::Instant,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

impl<F> Pending<F> {
    /// `op`, asked now, and where its answer will come.
    fn new(op: Op<F>) -> (Self, oneshot::Receiver<Result<Done, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            op,
            asked_at: tokio::time::Instant::now(),
            reply,
        };
        (pending, answer)
    }
}

/// The PostgreSQL event log of one process (a replica); `F` is the state
/// its decisions read (none by default).
pub struct PgLog<F: Follow = ()> {
    pool: Pool,
    appends: mpsc::Sender<Pending<F>>,
    /// The highest position known committed (by anyone), from this
    /// process's commits and the notifications of the others.
    committed: watch::Sender<u64>,
    /// Bumped when any replica releases a lease (a notification, so
    /// runners waiting for a model wake at once instead of polling).
    released: watch::Sender<u64>,
    commits: Arc<AtomicU64>,
    stop: CancellationToken,
    /// Where the committer's state started from.
    restored: Restored,
    /// A copy of that state as it stood at connect (caught up to the
    /// head then), for the replica's own view to start from instead of
    /// reading the checkpoint and the log a second time; taken once.
    started: std::sync::Mutex<Option<F>>,
}

impl<F: Follow> Drop for PgLog<F> {
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
        Self::open(url, ()).await
    }
}

impl<F: Follow> PgLog<F> {
    /// As [`PgLog::connect`], with `state` kept caught up in the committer
    /// for [`PgLog::decide`] and [`PgLog::claim_decided`]: first brought up
    /// to the log's head here (outside any lock, a page at a time), then
    /// inside each transaction to whatever other replicas committed since.
    ///
    /// # Errors
    /// As [`PgLog::connect`], or [`StoreError::Read`].
    pub async fn connect_following(url: &SecretString, state: F) -> Result<Self, StoreError> {
        Self::open(url, state).await
    }

    async fn open(url: &SecretString, mut state: F) -> Result<Self, StoreError> {
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
        // A state to be built from the log starts from the checkpoint.
        let mut restored = Restored::default();
        if state.position() == 0 {
            let client = pool
                .get()
                .await
                .map_err(|e| StoreError::Open(pool_err(&e)))?;
            (state, restored) = history::restore(&client, head, state).await?;
        }
        while state.position() < head {
            let client = pool
                .get()
                .await
                .map_err(|e| StoreError::Open(pool_err(&e)))?;
            let rows = client
                .query(CATCH_UP, &[&to_i64(state.position()), &to_i64(head)])
                .await
                .map_err(|e| StoreError::Read(db("catching up", &e)))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                follow(&mut state, decode_row(r.get(0), r.get(1)));
            }
        }
        // Everything up to the head is applied, though retention may
        // have removed the last records: the state covers the head.
        if state.position() < head {
            state.skip(head);
        }
        let (committed, _) = watch::channel(head);
        let (appends, rx) = mpsc::channel(4096);
        let commits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let started = std::sync::Mutex::new(Some(state.clone()));
        tokio::spawn(commit_loop(
            pool.clone(),
            rx,
            committed.clone(),
            Arc::clone(&commits),
            state,
        ));
        let (released, _) = watch::channel(0);
        tokio::spawn(listen(
            config,
            committed.clone(),
            released.clone(),
            pool.clone(),
            stop.clone(),
        ));
        Ok(PgLog {
            pool,
            appends,
            committed,
            released,
            commits,
            stop,
            restored,
            started,
        })
    }

    /// Where the state kept for decisions started from: the checkpoint
    /// used, or why a stored one was not.
    pub fn restored(&self) -> &Restored {
        &self.restored
    }

    /// The state kept for decisions as it stood at connect — built from
    /// the checkpoint and the log up to the head then — the first time
    /// it is asked for; `None` after.
    pub fn take_started(&self) -> Option<F> {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Appends `events` (one request's, or several) in one go: all get
    /// positions and commit together, or none does. Returns once committed.
    ///
    /// # Errors
    /// [`StoreError::Write`] when the database refused; nothing of this
    /// append is written then.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Appended, StoreError> {
        self.submit(Op::Append {
            events: Events::Given(events),
            fence: None,
        })
        .await?
        .appended()
    }

    /// As [`PgLog::append`], only while `lease` is the model's current
    /// lease (checked under the head lock, so no takeover can slip in
    /// between the check and the commit): [`Appended::Fenced`] otherwise.
    ///
    /// # Errors
    /// As [`PgLog::append`].
    pub async fn append_fenced(
        &self,
        lease: &Lease,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let op = Op::Append {
            events: Events::Given(events),
            fence: Some(lease.clone()),
        };
        self.submit(op).await?.appended()
    }

    /// Claims `model`'s lease for `holder` for `ttl` — when it is free or
    /// expired (on the database's clock) — and appends `events` (the
    /// request's `started`) in the same transaction. A takeover raises the
    /// epoch, which fences out the previous holder.
    ///
    /// # Errors
    /// As [`PgLog::append`].
    pub async fn claim(
        &self,
        model: &str,
        holder: &str,
        ttl: Duration,
        events: Vec<NewEvent>,
    ) -> Result<Claimed, StoreError> {
        let op = Op::Claim {
            model: model.to_owned(),
            holder: holder.to_owned(),
            ttl,
            events: Events::Given(events),
        };
        self.submit(op).await?.claimed()
    }

    /// Writes what `decide` decides against the state caught up under the
    /// head lock (every replica's commits applied): unless an event of
    /// `keys` was admitted before ([`Appended::Duplicate`], checked first),
    /// or `fence` is given and no longer current ([`Appended::Fenced`]).
    /// [`Appended::Declined`] when the decision wrote nothing.
    ///
    /// # Errors
    /// As [`PgLog::append`]; the decision then counts for nothing.
    pub async fn decide(
        &self,
        keys: IntakeKeys,
        fence: Option<Lease>,
        decide: Decide<F>,
    ) -> Result<Appended, StoreError> {
        let op = Op::Append {
            events: Events::Decided { keys, decide },
            fence,
        };
        self.submit(op).await?.appended()
    }

    /// Asks `decide` what `model` should run next (against the state
    /// caught up under the head lock); when it names events, claims the
    /// model's lease for `holder` and writes them in the same transaction.
    /// [`Claimed::Idle`] when there is nothing to run (no lease taken),
    /// [`Claimed::Held`] when another replica's lease is unexpired.
    ///
    /// # Errors
    /// As [`PgLog::append`].
    pub async fn claim_decided(
        &self,
        model: &str,
        holder: &str,
        ttl: Duration,
        decide: Decide<F>,
    ) -> Result<Claimed, StoreError> {
        let op = Op::Claim {
            model: model.to_owned(),
            holder: holder.to_owned(),
            ttl,
            events: Events::Decided {
                keys: IntakeKeys::default(),
                decide,
            },
        };
        self.submit(op).await?.claimed()
    }

    /// Whether `model`'s lease is held, unexpired, by another holder than
    /// `holder` — a plain read, without the head lock: a runner that sees
    /// it held skips its claim (which would take the head lock only to be
    /// refused), and a lease freed a moment later is claimed at its next
    /// wake-up.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn held_by_other(&self, model: &str, holder: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM easel_leases WHERE model = $1 AND holder <> $2 \
                 AND lease_until >= clock_timestamp()",
                &[&model, &holder],
            )
            .await
            .map_err(|e| StoreError::Read(db("reading a lease", &e)))?;
        Ok(row.is_some())
    }

    /// Extends `lease` by `ttl` if it is still current; false when it
    /// expired or was taken over (then the generation must stop).
    ///
    /// # Errors
    /// [`StoreError::Write`] when the database cannot be asked; the caller
    /// must then treat the lease as ending at `lease.until`.
    pub async fn renew(&self, lease: &mut Lease, ttl: Duration) -> Result<bool, StoreError> {
        let asked = tokio::time::Instant::now();
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE easel_leases SET lease_until = clock_timestamp() + make_interval(secs => $4) \
                 WHERE model = $1 AND holder = $2 AND epoch = $3 AND lease_until >= clock_timestamp()",
                &[&lease.model, &lease.holder, &lease.epoch, &ttl.as_secs_f64()],
            )
            .await
            .map_err(|e| StoreError::Write(db("renewing a lease", &e)))?;
        if n == 1 {
            lease.until = asked + ttl;
        }
        Ok(n == 1)
    }

    /// Gives `lease` up (the generation ended), so the next claim of the
    /// model needs no wait for it to expire.
    ///
    /// # Errors
    /// [`StoreError::Write`]; the lease then simply expires.
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let client = self.client().await?;
        // One statement (one transaction): the release and the notice
        // that wakes the replicas waiting for this model.
        client
            .query(
                "WITH freed AS (UPDATE easel_leases SET lease_until = '-infinity' \
                 WHERE model = $1 AND holder = $2 AND epoch = $3) SELECT pg_notify($4, $5)",
                &[
                    &lease.model,
                    &lease.holder,
                    &lease.epoch,
                    &CHANNEL,
                    &RELEASED,
                ],
            )
            .await
            .map_err(|e| StoreError::Write(db("releasing a lease", &e)))?;
        Ok(())
    }

    /// Copies `records` in with their own positions (`easel migrate`): one
    /// transaction, under the head lock, only above the head; the head
    /// then stands at `high_water` (at least the last position), so
    /// positions a retention sweep removed from the source are never given
    /// again here either.
    ///
    /// # Errors
    /// [`StoreError::Write`], e.g. a position not above the head; nothing
    /// of this call is written then.
    pub async fn import(&self, records: &[Recorded], high_water: u64) -> Result<(), StoreError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Write(pool_err(&e)))?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| write_err("starting an import", &e))?;
        let mut w = Writer::locked(&tx).await?;
        let head = w.next;
        for rec in records {
            let at = to_i64(rec.seq);
            if at <= w.next {
                return Err(StoreError::Write(Cause::from(format!(
                    "event {} is not above the database's last position {}",
                    rec.seq, w.next
                ))));
            }
            // `write` gives the next position: start just below this one.
            w.next = at - 1;
            w.write(
                &[NewEvent {
                    request_id: rec.request_id,
                    at: rec.at,
                    event: rec.event.clone(),
                }],
                &mut (),
            )?;
        }
        // The head stands at the high-water mark, past the last record.
        w.next = w.next.max(to_i64(high_water));
        w.finish(head).await?;
        let last = w.next;
        drop(w);
        tx.commit()
            .await
            .map_err(|e| write_err("committing an import", &e))?;
        advance(&self.committed, u64::try_from(last).unwrap_or(0));
        Ok(())
    }

    /// As [`PgLog::decide`], in two halves: the decision takes its place
    /// in the committer's line now (so calls keep their order), and the
    /// returned [`Pending`]-answer says what it did once committed.
    ///
    /// # Errors
    /// [`StoreError::Write`] when more appends wait than the line holds,
    /// [`StoreError::Closed`] when the log is closed.
    pub fn decide_now(
        &self,
        keys: IntakeKeys,
        fence: Option<Lease>,
        decide: Decide<F>,
    ) -> Result<Answer, StoreError> {
        let (pending, answer) = Pending::new(Op::Append {
            events: Events::Decided { keys, decide },
            fence,
        });
        self.appends.try_send(pending).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                StoreError::Write(Cause::from("too many appends are waiting for the database"))
            }
            mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
        })?;
        Ok(Answer(answer))
    }

    /// Whether an append that repeated `keys` is in the log — definitively:
    /// it takes the head lock, so an append still committing (say its
    /// connection broke during `COMMIT`, and the server finishes it) is
    /// waited for rather than missed. Writes nothing.
    ///
    /// # Errors
    /// [`StoreError::Read`] when the database cannot be asked.
    pub async fn settle(&self, keys: IntakeKeys) -> Result<Option<RequestId>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::Read(db("settling an append", &e)))?;
        let read = |e: StoreError| match e {
            StoreError::Write(c) => StoreError::Read(c),
            other => other,
        };
        let mut w = Writer::locked(&tx).await.map_err(read)?;
        w.load_keys(vec![keys.raw()]).await.map_err(read)?;
        let (u, m) = keys.raw();
        let found = u
            .and_then(|u| w.updates.get(&u))
            .or_else(|| m.and_then(|m| w.messages.get(&m)))
            .copied();
        drop(w);
        tx.rollback()
            .await
            .map_err(|e| StoreError::Read(db("settling an append", &e)))?;
        Ok(found)
    }

    async fn submit(&self, op: Op<F>) -> Result<Done, StoreError> {
        let (pending, answer) = Pending::new(op);
        self.appends
            .send(pending)
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records from `position` on, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn read_from(&self, position: u64, limit: u32) -> Result<Vec<ReadItem>, StoreError> {
        self.records(
            "SELECT position, record::text FROM easel_events WHERE position >= $1 ORDER BY position LIMIT $2",
            &[&to_i64(position), &i64::from(limit)],
            "reading events",
        )
        .await
    }

    /// Every record, oldest first, read in pages of 5,000.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn read_all(&self) -> Result<Vec<ReadItem>, StoreError> {
        let mut all = Vec::new();
        let mut from = 1;
        loop {
            let page = self.read_from(from, 5_000).await?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            from = match last {
                Ok(r) => r.seq + 1,
                Err(super::ReadError::Corrupt(c)) => c.seq + 1,
                Err(super::ReadError::Store(e)) => return Err(e.clone()),
            };
            all.extend(page);
        }
    }

    /// Every record of one request, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn events_of(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        self.records(
            "SELECT position, record::text FROM easel_events WHERE request_id = $1 ORDER BY position",
            &[&id.0],
            "reading a request",
        )
        .await
    }

    /// The records `sql` selects as (position, record text), decoded.
    async fn records(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<ReadItem>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql, params)
            .await
            .map_err(|e| StoreError::Read(db(what, &e)))?;
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

    /// Changes whenever a replica releases a lease (its generation ended,
    /// or it stopped).
    pub fn subscribe_releases(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
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

    /// Every named value, by name.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    pub async fn all_meta(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT name, value FROM easel_meta ORDER BY name", &[])
            .await
            .map_err(|e| StoreError::Read(db("reading meta", &e)))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Read(pool_err(&e)))
    }
}

/// Moves the known committed position up to `to` (never down); wakes
/// subscribers only when it moved.
fn advance(committed: &watch::Sender<u64>, to: u64) {
    committed.send_if_modified(|c| {
        let moved = to > *c;
        *c = (*c).max(to);
        moved
    });
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

/// Events applied between two base copies of the followed state.
const REBASE_EVERY: usize = 4096;

/// One thing applied to the followed state.
#[derive(Clone)]
enum Applied {
    Record(Box<Recorded>),
    Skipped(u64),
}

/// The followed state, and how to give it back as it was before a failed
/// transaction without copying it for every transaction: a base copy
/// taken every [`REBASE_EVERY`] events, and what was applied since.
#[derive(Clone)]
struct Tracked<F> {
    state: F,
    base: F,
    since: Vec<Applied>,
    /// Where the transaction under way began in `since`.
    mark: usize,
}

impl<F: Follow> Tracked<F> {
    fn new(state: F) -> Self {
        Tracked {
            base: state.clone(),
            state,
            since: Vec::new(),
            mark: 0,
        }
    }

    fn begin(&mut self) {
        self.mark = self.since.len();
    }

    fn committed(&mut self) {
        if self.since.len() >= REBASE_EVERY {
            self.base = self.state.clone();
            self.since.clear();
        }
    }

    /// Back to before the transaction under way.
    fn roll_back(&mut self) {
        self.since.truncate(self.mark);
        self.state = self.base.clone();
        for a in &self.since {
            match a {
                Applied::Record(rec) => self.state.apply(rec),
                Applied::Skipped(p) => self.state.skip(*p),
            }
        }
    }
}

/// Applying through the tracker records what was applied.
impl<F: Follow> Follow for Tracked<F> {
    fn position(&self) -> u64 {
        self.state.position()
    }

    fn apply(&mut self, rec: &Recorded) {
        self.state.apply(rec);
        if self.state.position() != u64::MAX {
            self.since.push(Applied::Record(Box::new(rec.clone())));
        }
    }

    fn skip(&mut self, position: u64) {
        self.state.skip(position);
        self.since.push(Applied::Skipped(position));
    }
}

/// Takes every append waiting (up to [`MAX_GROUP`]) and commits them in
/// one transaction, until every sender is gone. `state` is the followed
/// state: a failed transaction gives it back as it was before.
async fn commit_loop<F: Follow>(
    pool: Pool,
    mut rx: mpsc::Receiver<Pending<F>>,
    committed: watch::Sender<u64>,
    commits: Arc<AtomicU64>,
    state: F,
) {
    let mut state = Tracked::new(state);
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|p| ((p.op, p.asked_at), p.reply))
            .unzip();
        state.begin();
        match commit_group(&pool, &mut state, ops).await {
            Ok((results, last)) => {
                state.committed();
                commits.fetch_add(1, Ordering::Relaxed);
                advance(&committed, last);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                state.roll_back();
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies one record read from the log to a followed state.
fn follow<F: Follow>(state: &mut F, item: ReadItem) {
    match item {
        Ok(rec) => state.apply(&rec),
        Err(super::ReadError::Corrupt(c)) => {
            tracing::error!(position = c.seq, reason = %c.reason, "skipping an unreadable event");
            state.skip(c.seq);
        }
        Err(super::ReadError::Store(_)) => {}
    }
}

/// The intake keys a `queued` event claims.
fn intake_keys(e: &NewEvent) -> RawKeys {
    match &e.event {
        Event::Queued { origin, .. } => (
            origin.update_id.map(i64::from),
            origin.message_id.map(|m| (origin.chat_id.0, m)),
        ),
        _ => (None, None),
    }
}

/// The events of one transaction, decided one op after another after the
/// head lock and written together at the end: a transaction costs a fixed
/// handful of round trips whatever its size (one statement per table, the
/// rows passed as arrays), and each statement is prepared once per
/// connection (`prepare_cached`) rather than parsed on every call.
struct Writer<'t> {
    tx: &'t deadpool_postgres::Transaction<'t>,
    next: i64,
    /// Intake keys held before this transaction, or claimed in it.
    updates: HashMap<i64, RequestId>,
    messages: HashMap<(i64, i32), RequestId>,
    /// What to insert at the end.
    rows: Rows,
}

#[derive(Default)]
struct Rows {
    positions: Vec<i64>,
    requests: Vec<uuid::Uuid>,
    ats: Vec<chrono::DateTime<chrono::Utc>>,
    records: Vec<String>,
    update_ids: Vec<i64>,
    update_requests: Vec<uuid::Uuid>,
    message_chats: Vec<i64>,
    message_ids: Vec<i32>,
    message_requests: Vec<uuid::Uuid>,
}

fn write_err(what: &str, e: &tokio_postgres::Error) -> StoreError {
    StoreError::Write(db(what, e))
}

const LOCK_HEAD: &str = "SELECT position FROM easel_head WHERE id = 1 FOR UPDATE";
const CATCH_UP: &str = "SELECT position, record::text FROM easel_events \
     WHERE position > $1 AND position <= $2 ORDER BY position LIMIT 10000";
const HELD_UPDATES: &str =
    "SELECT update_id, request_id FROM easel_intake_updates WHERE update_id = ANY($1)";
// Both columns by `= ANY`, like the updates: the primary key serves it
// whatever the statistics say. A join with UNNEST got a generic plan —
// cached per connection once the table was small — that scans the whole
// table on every transaction (measured: 508 scans reading 4.3 million
// rows in a 3 s benchmark). It may return pairs not asked for (a chat's
// other message among the ids asked): true keys all the same.
const HELD_MESSAGES: &str = "SELECT chat_id, message_id, request_id FROM easel_intake_messages \
     WHERE chat_id = ANY($1) AND message_id = ANY($2)";
const INSERT_EVENTS: &str = "INSERT INTO easel_events (position, request_id, at, record) \
     SELECT p, r, a, j::json FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], $4::text[]) AS t(p, r, a, j)";
const INSERT_UPDATES: &str = "INSERT INTO easel_intake_updates (update_id, request_id) \
     SELECT * FROM UNNEST($1::bigint[], $2::uuid[])";
const INSERT_MESSAGES: &str = "INSERT INTO easel_intake_messages (chat_id, message_id, request_id) \
     SELECT * FROM UNNEST($1::bigint[], $2::integer[], $3::uuid[])";
const MOVE_HEAD: &str = "WITH moved AS (UPDATE easel_head SET position = $1 WHERE id = 1) \
     SELECT pg_notify($2, $3)";
const LEASE_CURRENT: &str = "SELECT 1 FROM easel_leases WHERE model = $1 AND holder = $2 AND epoch = $3 \
     AND lease_until >= clock_timestamp()";
const TAKE_LEASE: &str = "INSERT INTO easel_leases (model, holder, epoch, lease_until) \
     VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3)) \
     ON CONFLICT (model) DO UPDATE SET holder = EXCLUDED.holder, \
       epoch = easel_leases.epoch + 1, lease_until = EXCLUDED.lease_until \
     WHERE easel_leases.lease_until < clock_timestamp() \
     RETURNING epoch";

impl<'t> Writer<'t> {
    /// Locks the head row for `tx` (every writer of the database waits for
    /// it from here to the commit); positions continue from it.
    async fn locked(tx: &'t deadpool_postgres::Transaction<'t>) -> Result<Self, StoreError> {
        let mut w = Writer {
            tx,
            next: 0,
            updates: HashMap::new(),
            messages: HashMap::new(),
            rows: Rows::default(),
        };
        w.next = w
            .query(LOCK_HEAD, &[], "locking the head")
            .await?
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Write(Cause::from("the head row is missing")))?;
        Ok(w)
    }

    /// `sql` prepared on this connection (once: then from its cache).
    async fn prepare(
        &self,
        sql: &str,
        what: &str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        self.tx
            .prepare_cached(sql)
            .await
            .map_err(|e| write_err(what, &e))
    }

    /// Runs a prepared statement unless `skip`. Several of these polled
    /// together (`tokio::join!`) share one round trip: tokio-postgres sends
    /// each as it is first polled, in that order, without waiting for the
    /// answers, and the server runs them in the order they came.
    async fn run(
        &self,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
        skip: bool,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        if skip {
            return Ok(Vec::new());
        }
        self.tx
            .query(statement, params)
            .await
            .map_err(|e| write_err(what, &e))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let statement = self
            .tx
            .prepare_cached(sql)
            .await
            .map_err(|e| write_err(what, &e))?;
        self.tx
            .query(&statement, params)
            .await
            .map_err(|e| write_err(what, &e))
    }

    /// Reads which of the group's intake keys are held already: two
    /// queries for the whole group.
    async fn load_keys(&mut self, keys: Vec<RawKeys>) -> Result<(), StoreError> {
        let (mut updates, mut chats, mut messages) = (Vec::new(), Vec::new(), Vec::new());
        for (u, m) in keys {
            updates.extend(u);
            if let Some((c, m)) = m {
                chats.push(c);
                messages.push(m);
            }
        }
        let held_updates = self.prepare(HELD_UPDATES, "checking intake keys").await?;
        let held_messages = self.prepare(HELD_MESSAGES, "checking intake keys").await?;
        let by_update: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&updates];
        let by_message: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&chats, &messages];
        let (u, m) = tokio::join!(
            self.run(
                &held_updates,
                &by_update,
                "checking intake keys",
                updates.is_empty()
            ),
            self.run(
                &held_messages,
                &by_message,
                "checking intake keys",
                chats.is_empty()
            ),
        );
        for r in u? {
            self.updates.insert(r.get(0), RequestId(r.get(1)));
        }
        for r in m? {
            self.messages
                .insert((r.get(0), r.get(1)), RequestId(r.get(2)));
        }
        Ok(())
    }

    /// The request already holding one of `events`' intake keys, if any.
    fn duplicate_of<F>(&self, events: &Events<F>) -> Option<RequestId> {
        events.keys().into_iter().find_map(|(u, m)| {
            u.and_then(|u| self.updates.get(&u))
                .or_else(|| m.and_then(|m| self.messages.get(&m)))
                .copied()
        })
    }

    /// Brings `state` up to `head` with what other replicas committed
    /// (the head is locked: nothing more can appear meanwhile).
    async fn catch_up<F: Follow>(&self, state: &mut F, head: i64) -> Result<(), StoreError> {
        while state.position() < u64::try_from(head).unwrap_or(0) {
            let rows = self
                .query(CATCH_UP, &[&to_i64(state.position()), &head], "catching up")
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                follow(state, decode_row(r.get(0), r.get(1)));
            }
        }
        Ok(())
    }

    /// Gives `events` the next positions, queues their rows, and applies
    /// them to `state` (so the group's next decision sees them).
    fn write<F: Follow>(
        &mut self,
        events: &[NewEvent],
        state: &mut F,
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut written = Vec::with_capacity(events.len());
        for e in events {
            self.next += 1;
            let rec = Recorded {
                seq: u64::try_from(self.next).unwrap_or(0),
                request_id: e.request_id,
                at: e.at,
                event: e.event.clone(),
            };
            let json = codec::encode_json(&rec)
                .ok()
                .and_then(|j| String::from_utf8(j).ok())
                .ok_or_else(|| StoreError::Write(Cause::from("an event could not be encoded")))?;
            let rows = &mut self.rows;
            rows.positions.push(self.next);
            rows.requests.push(e.request_id.0);
            rows.ats.push(e.at);
            rows.records.push(json);
            let (update, message) = intake_keys(e);
            if let Some(u) = update {
                rows.update_ids.push(u);
                rows.update_requests.push(e.request_id.0);
                self.updates.insert(u, e.request_id);
            }
            if let Some(m) = message {
                rows.message_chats.push(m.0);
                rows.message_ids.push(m.1);
                rows.message_requests.push(e.request_id.0);
                self.messages.insert(m, e.request_id);
            }
            state.apply(&rec);
            written.push(rec);
        }
        Ok(written)
    }

    /// Inserts every queued row (at most three statements) and moves the
    /// head from `head` to the last position given, notifying: one round
    /// trip.
    async fn finish(&self, head: i64) -> Result<(), StoreError> {
        let r = &self.rows;
        let next = self.next;
        let notice = next.to_string();
        let (events, updates, messages, moved) = (
            self.prepare(INSERT_EVENTS, "writing events").await?,
            self.prepare(INSERT_UPDATES, "writing intake keys").await?,
            self.prepare(INSERT_MESSAGES, "writing intake keys").await?,
            self.prepare(MOVE_HEAD, "moving the head").await?,
        );
        type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
        let event_rows: [Param<'_>; 4] = [&r.positions, &r.requests, &r.ats, &r.records];
        let update_rows: [Param<'_>; 2] = [&r.update_ids, &r.update_requests];
        let message_rows: [Param<'_>; 3] = [&r.message_chats, &r.message_ids, &r.message_requests];
        let head_row: [Param<'_>; 3] = [&next, &CHANNEL, &notice];
        let (a, b, c, d) = tokio::join!(
            self.run(
                &events,
                &event_rows,
                "writing events",
                r.positions.is_empty()
            ),
            self.run(
                &updates,
                &update_rows,
                "writing intake keys",
                r.update_ids.is_empty()
            ),
            self.run(
                &messages,
                &message_rows,
                "writing intake keys",
                r.message_chats.is_empty()
            ),
            self.run(&moved, &head_row, "moving the head", next <= head),
        );
        a.and(b).and(c).and(d).map(drop)
    }

    /// Whether `lease` is its model's current lease now. Under the head
    /// lock, which every claim takes too, so no takeover can come between
    /// this check and the commit.
    async fn current(&self, lease: &Lease) -> Result<bool, StoreError> {
        Ok(!self
            .query(
                LEASE_CURRENT,
                &[&lease.model, &lease.holder, &lease.epoch],
                "checking a lease",
            )
            .await?
            .is_empty())
    }

    /// Takes `model`'s lease if free or expired; its new epoch.
    async fn take(
        &self,
        model: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let rows = self
            .query(
                TAKE_LEASE,
                &[&model, &holder, &ttl.as_secs_f64()],
                "claiming a lease",
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }
}

/// The events an op writes: given, or decided now against `state`
/// (`None`: the decision declined).
fn resolve<F: Follow>(events: Events<F>, state: &F) -> Option<Vec<NewEvent>> {
    match events {
        Events::Given(events) => Some(events),
        Events::Decided { decide, .. } => decide(state),
    }
}

/// One transaction: lock the head, catch `state` up, read the group's held
/// intake keys, do each op in order (write its events — given, or decided
/// against `state`, which then applies them — or find it a duplicate,
/// fenced, declined or its lease held), insert the rows, move the head and
/// notify, commit. On an error `state` may hold uncommitted events: the
/// caller restores it.
async fn commit_group<F: Follow>(
    pool: &Pool,
    state: &mut Tracked<F>,
    ops: Vec<(Op<F>, tokio::time::Instant)>,
) -> Result<(Vec<Done>, u64), StoreError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| StoreError::Write(pool_err(&e)))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| write_err("starting an append", &e))?;
    let mut w = Writer::locked(&tx).await?;
    let head = w.next;
    w.catch_up(state, head).await?;
    // Collected first: the decisions are `Send`, not `Sync`, so no
    // reference to them may be held across an await.
    let keys = ops
        .iter()
        .flat_map(|(op, _)| match op {
            Op::Append { events, .. } | Op::Claim { events, .. } => events.keys(),
        })
        .collect();
    w.load_keys(keys).await?;
    let mut results = Vec::with_capacity(ops.len());
    for (op, asked_at) in ops {
        let done = match op {
            Op::Append { events, fence } => {
                if let Some(lease) = &fence
                    && !w.current(lease).await?
                {
                    Done::Appended(Appended::Fenced)
                } else if let Some(id) = w.duplicate_of(&events) {
                    Done::Appended(Appended::Duplicate(id))
                } else {
                    match resolve(events, &state.state) {
                        None => Done::Appended(Appended::Declined),
                        Some(events) => Done::Appended(Appended::Written(w.write(&events, state)?)),
                    }
                }
            }
            Op::Claim {
                model,
                holder,
                ttl,
                events,
            } => {
                let decided = matches!(events, Events::Decided { .. });
                match resolve(events, &state.state) {
                    Some(events) if !(decided && events.is_empty()) => {
                        match w.take(&model, &holder, ttl).await? {
                            None => Done::Claimed(Claimed::Held),
                            Some(epoch) => Done::Claimed(Claimed::Won {
                                lease: Lease {
                                    model,
                                    holder,
                                    epoch,
                                    until: asked_at + ttl,
                                },
                                records: w.write(&events, state)?,
                            }),
                        }
                    }
                    _ => Done::Claimed(Claimed::Idle),
                }
            }
        };
        results.push(done);
    }
    w.finish(head).await?;
    let next = w.next;
    drop(w);
    tx.commit()
        .await
        .map_err(|e| write_err("committing an append", &e))?;
    Ok((results, u64::try_from(next).unwrap_or(0)))
}

/// Follows other replicas' commits: `LISTEN` on a dedicated connection
/// (never a pooled one: a pooled connection would carry the LISTEN to
/// whoever gets it next), and after every (re)connect a re-read of the
/// head, since notifications sent while disconnected are lost.
async fn listen(
    config: tokio_postgres::Config,
    committed: watch::Sender<u64>,
    released: watch::Sender<u64>,
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
            advance(&committed, u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => { driver.abort(); return; }
                note = notes.recv() => match note {
                    Some(payload) => {
                        if let Ok(p) = payload.parse::<u64>() {
                            advance(&committed, p);
                        } else if payload == RELEASED {
                            released.send_modify(|n| *n += 1);
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

#[cfg(test)]
mod tests {
    use super::{Follow, REBASE_EVERY, Tracked};
    use crate::domain::{Event, RequestId};
    use crate::store::Recorded;

    /// A followed state that remembers every position it saw.
    #[derive(Clone, Default, Debug, PartialEq)]
    struct Seen(Vec<u64>);

    impl Follow for Seen {
        fn position(&self) -> u64 {
            self.0.last().copied().unwrap_or(0)
        }
        fn apply(&mut self, rec: &Recorded) {
            self.0.push(rec.seq);
        }
        fn skip(&mut self, position: u64) {
            self.0.push(position);
        }
    }

    fn rec(seq: u64) -> Recorded {
        Recorded {
            seq,
            request_id: RequestId::random(),
            at: chrono::Utc::now(),
            event: Event::Started,
        }
    }

    /// A failed transaction is undone exactly — before the first base copy,
    /// right after one, and with skipped positions among the applied —
    /// and what committed before it stays.
    #[test]
    fn a_rolled_back_transaction_leaves_the_state_as_it_was_before_it() {
        let mut t = Tracked::new(Seen::default());
        let mut next = 1;
        let mut step = |t: &mut Tracked<Seen>, n: u64, fail: bool| {
            t.begin();
            let before = t.state.clone();
            for _ in 0..n {
                if next % 97 == 0 {
                    t.skip(next);
                } else {
                    t.apply(&rec(next));
                }
                next += 1;
            }
            if fail {
                t.roll_back();
                assert_eq!(t.state, before);
                next -= n;
            } else {
                t.committed();
            }
        };
        step(&mut t, 10, false);
        step(&mut t, 5, true);
        // Across a base copy: the state is rebased after REBASE_EVERY events.
        for _ in 0..(REBASE_EVERY / 100 + 2) {
            step(&mut t, 100, false);
        }
        assert!(t.since.len() < REBASE_EVERY, "never rebased");
        step(&mut t, 7, true);
        step(&mut t, 3, false);
        let expected: Vec<u64> = (1..next).collect();
        assert_eq!(t.state.0, expected);
    }
}
