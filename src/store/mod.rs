//! The event log: the only module that knows sled. Append-only records with a
//! global strictly increasing sequence number, an index by request, intake
//! (idempotency) keys written with the `Queued` event before its append returns,
//! subscriptions, group-committed durability, checkpoints and small metadata.

pub mod codec;
pub mod disk;
mod memory;
pub mod pg;
mod sled_store;

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::domain::{ChatId, Event, RequestId};
pub use codec::DecodeError;
pub use memory::MemoryStore;
pub use sled_store::{CompactReport, SledStore};

/// An event about to be appended; the store gives it its sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub request_id: RequestId,
    pub at: DateTime<Utc>,
    pub event: Event,
}

/// An event as it stands in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub seq: u64,
    pub request_id: RequestId,
    pub at: DateTime<Utc>,
    pub event: Event,
}

/// A failure of the storage itself (as opposed to a domain refusal).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the event log could not be opened: {0}")]
    Open(Cause),
    #[error("the event log could not be written: {0}")]
    Write(Cause),
    #[error("the event log could not be flushed to disk: {0}")]
    Flush(Cause),
    #[error("the event log could not be read: {0}")]
    Read(Cause),
    #[error("the event log is closed")]
    Closed,
    /// Another process owns the log (its lock is held): bad usage, exit 2.
    #[error("{0}")]
    InUse(String),
}

impl StoreError {
    /// The operating system's error kind behind it, when the disk refused
    /// (`StorageFull`, `FileTooLarge`, `PermissionDenied`, …).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            StoreError::Open(c)
            | StoreError::Write(c)
            | StoreError::Flush(c)
            | StoreError::Read(c) => c.kind,
            StoreError::Closed | StoreError::InUse(_) => None,
        }
    }
}

/// Why a storage operation failed: a sentence for people, and the I/O
/// error kind for code (cloneable, unlike `io::Error`, because one refused
/// write is reported to every waiter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub kind: Option<std::io::ErrorKind>,
    pub message: String,
}

impl Cause {
    /// From an I/O error, keeping its kind.
    pub fn io(e: &std::io::Error) -> Self {
        Cause {
            kind: Some(e.kind()),
            message: e.to_string(),
        }
    }
}

impl Cause {
    /// From an I/O error on `path`, keeping its kind.
    pub fn io_at(path: &std::path::Path, e: &std::io::Error) -> Self {
        Cause {
            kind: Some(e.kind()),
            message: format!("{}: {e}", path.display()),
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause {
            kind: None,
            message,
        }
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Cause::from(message.to_owned())
    }
}

/// A record that exists but cannot be read: reported with its seq, skipped
/// by readers, and nothing before or after it is lost.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event {seq} is unreadable: {reason}")]
pub struct Corrupt {
    pub seq: u64,
    pub reason: DecodeError,
}

/// One item of a log scan.
pub type ReadItem = Result<Recorded, ReadError>;

/// Why a log scan could not yield a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Corrupt(#[from] Corrupt),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The storage behind the core. Small on purpose: a PostgreSQL backend (for
/// several replicas) implements the same methods without the domain changing.
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` in order, giving each the next sequence number, and
    /// writes the keys derived from each (request index and, for `Queued`,
    /// the per-user index and intake keys) before it returns. Not one
    /// atomic write: each key is its own insert, the event first, and a
    /// crash between them leaves the event without some keys, which the
    /// store re-derives from the log's tail at open. Returns once written
    /// (not yet durable: see [`EventStore::wait_durable`]).
    ///
    /// # Errors
    /// [`StoreError::Write`] when a write was refused; events before it in
    /// the call may be written (their seqs stay taken).
    fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Recorded>, StoreError>;

    /// Resolves once every event up to `seq` is on disk. Concurrent waiters
    /// share flushes (group commit).
    ///
    /// # Errors
    /// [`StoreError::Flush`] when the disk refused.
    fn wait_durable(&self, seq: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every record from `seq` on, oldest first.
    fn read_from(&self, seq: u64) -> Box<dyn Iterator<Item = ReadItem> + Send + '_>;

    /// Every record of one request, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    fn events_of(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError>;

    /// The request already created by Telegram update `update_id`, if any.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    fn find_update(&self, update_id: u32) -> Result<Option<RequestId>, StoreError>;

    /// The request already created by that chat's message, if any.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    fn find_message(&self, chat: ChatId, message_id: i32) -> Result<Option<RequestId>, StoreError>;

    /// The highest sequence number written (0 for an empty log).
    fn last_seq(&self) -> u64;

    /// Changes to [`EventStore::last_seq`]; never blocks writers.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Stores a checkpoint of the projections covering events up to `seq`.
    ///
    /// # Errors
    /// [`StoreError::Write`].
    fn save_checkpoint(&self, seq: u64, state: &[u8]) -> Result<(), StoreError>;

    /// The last checkpoint and the seq it covers. A damaged checkpoint is
    /// reported as an error so the caller can fall back to a full replay.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    fn load_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// Small named values outside the event log (e.g. the Telegram offset).
    ///
    /// # Errors
    /// [`StoreError::Write`].
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;

    /// # Errors
    /// [`StoreError::Read`].
    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Request ids in creation order (the time of their `Queued`, to the
    /// millisecond; ids themselves are random), newest first when
    /// `newest_first`, created within `[since, until]` when given, only
    /// `user`'s when given. Served from an index, not by reading events.
    fn request_ids(
        &self,
        user: Option<crate::domain::UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_>;

    /// Request ids from `lo` to `hi` in id order: finding a request by the
    /// start of its id (`/cancel <prefix>`, `easel audit show <prefix>`).
    fn ids_between(
        &self,
        lo: RequestId,
        hi: RequestId,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_>;

    /// Every meta value whose name starts with `prefix`.
    ///
    /// # Errors
    /// [`StoreError::Read`].
    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Removes a meta value (absent is fine).
    ///
    /// # Errors
    /// [`StoreError::Write`].
    fn delete_meta(&self, name: &str) -> Result<(), StoreError>;

    /// How many flushes have reached the disk (to observe group commit).
    fn flush_count(&self) -> u64;

    /// Removes whole requests from the log — every event, index, user and
    /// intake key of each — together with setting meta `name` to `value`,
    /// in one atomic batch, then flushes. Returns how many events went.
    /// Only for finished requests (retention): nothing live refers to them,
    /// and what remains still replays and verifies.
    ///
    /// # Errors
    /// [`StoreError::Read`] or [`StoreError::Write`]; then nothing is removed.
    fn forget_requests(
        &self,
        ids: &[RequestId],
        name: &str,
        value: &[u8],
    ) -> Result<usize, StoreError>;
}
