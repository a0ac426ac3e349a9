//! The sled 0.34 backend: one tree with prefixed keys (an event, then the
//! index and intake keys derived from it, re-derived at open for the tail
//! if a crash fell between), and leader-based group commit: the first waiter that finds no flush running flushes for
//! everyone written so far; waiters arriving meanwhile share the next one.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::disk::{self, DirLock, LockError, sibling};
use super::{
    Cause, Corrupt, EventStore, NewEvent, ReadError, ReadItem, Recorded, StoreError, codec,
};
use crate::domain::{ChatId, Event, RequestId};

const EVENT: u8 = b'e';
const INDEX: u8 = b'i';
const UPDATE: u8 = b'u';
const MESSAGE: u8 = b'm';
const CHECKPOINT: &[u8] = b"c/checkpoint";
const META: u8 = b'k';
/// Per-user request index before issue 14 (`x<user><id>`, id order);
/// replaced at open by [`BY_USER`].
const OLD_USER: u8 = b'x';
/// Requests in creation order: `o<created ms><id>`.
const ORDER: u8 = b'o';
/// A user's requests in creation order: `y<user><created ms><id>`.
const BY_USER: u8 = b'y';
/// Meta: which request-index layout the log has ("2": creation order).
const INDEX_LAYOUT: &str = "index/layout";
/// Meta: the highest seq the log had written when events were last removed
/// (retention). Seqs continue above it after a restart, so a seq the
/// archive holds is never given again.
const HIGH_WATER: &str = "log/high_water";

/// A user id as 8 bytes that sort as the numbers do (sign flipped, so
/// negative ids sort first).
fn user_bytes(user: crate::domain::UserId) -> [u8; 8] {
    ((user.0 as u64) ^ (1 << 63)).to_be_bytes()
}

/// Milliseconds since 1970 (0 before), the order of the request indexes.
fn millis(at: chrono::DateTime<chrono::Utc>) -> [u8; 8] {
    u64::try_from(at.timestamp_millis())
        .unwrap_or(0)
        .to_be_bytes()
}

fn order_key(at: chrono::DateTime<chrono::Utc>, id: RequestId) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = ORDER;
    k[1..9].copy_from_slice(&millis(at));
    k[9..].copy_from_slice(id.as_bytes());
    k
}

fn user_key(
    user: crate::domain::UserId,
    at: chrono::DateTime<chrono::Utc>,
    id: RequestId,
) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = BY_USER;
    k[1..9].copy_from_slice(&user_bytes(user));
    k[9..17].copy_from_slice(&millis(at));
    k[17..].copy_from_slice(id.as_bytes());
    k
}

fn event_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(id: RequestId, seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = INDEX;
    k[1..17].copy_from_slice(id.as_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn update_key(update_id: u32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = UPDATE;
    k[1..].copy_from_slice(&update_id.to_be_bytes());
    k
}

fn message_key(chat: ChatId, message_id: i32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = MESSAGE;
    k[1..9].copy_from_slice(&chat.0.to_be_bytes());
    k[9..].copy_from_slice(&message_id.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the log down with it: the guarded
    // values stay consistent because every update is a single assignment.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What flushing has achieved so far, broadcast to durability waiters.
#[derive(Clone, Debug, Default)]
struct Durable {
    /// Every event up to here is on disk.
    flushed: u64,
    /// The latest failed flush covered events up to here, with `error`.
    failed_through: u64,
    /// How many flushes have failed, so a waiter only hears of failures of
    /// flushes that started after it asked.
    failures: u64,
    error: Option<Cause>,
}

struct Inner {
    db: sled::Db,
    /// Held while a batch is given seqs and written, so seq order is log order.
    append: Mutex<u64>,
    /// The highest seq fully written (read by the leader before each fsync).
    written: AtomicU64,
    /// Whether a leader is flushing now.
    flushing: Mutex<bool>,
    durable: watch::Sender<Durable>,
    appended: watch::Sender<u64>,
    flushes: AtomicU64,
    /// Set at the first refused write or flush, and never cleared: sled
    /// refuses every later write of this handle too (its error is sticky),
    /// so only reopening the log can heal it.
    broken: watch::Sender<Option<Arc<str>>>,
    /// sled's log file, for the `fdatasync` that sled itself skips: its
    /// `flush` ends in `sync_file_range`, which writes the pages but not the
    /// file's size and allocation metadata nor the device's cache, so
    /// without this an acknowledged event may not survive a power cut.
    db_file: std::fs::File,
    /// Told of each flush that reached the disk: how long it took and how
    /// many events it made durable (the metrics, when asked for).
    on_flush: std::sync::OnceLock<FlushObserver>,
    /// The data dir's lock; declared last so it is released after sled.
    _lock: DirLock,
}

/// See [`SledStore::observe_flushes`].
pub type FlushObserver = Box<dyn Fn(std::time::Duration, u64) + Send + Sync>;

/// The sled event store. Opening takes sled's process lock on the directory.
pub struct SledStore {
    inner: Arc<Inner>,
}

impl SledStore {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Open`], e.g. when another process holds the directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_wait(dir, LOCK_WAIT)
    }

    /// As [`SledStore::open`], waiting at most `wait` for sled's lock.
    ///
    /// # Errors
    /// [`StoreError::Open`].
    pub fn open_with_wait(dir: &Path, wait: std::time::Duration) -> Result<Self, StoreError> {
        // The lock comes first: tidying up after an interrupted compaction
        // is safe only when no compaction can be running.
        let lock = take_lock(dir, wait)?;
        let open_err = |e: &dyn std::fmt::Display| {
            StoreError::Open(Cause::from(format!("{}: {e}", dir.display())))
        };
        finish_interrupted_compaction(dir).map_err(|e| open_err(&e))?;
        let db = open_db(dir, wait)?;
        // sled made its files with the process umask; narrow what others
        // could read, and make the folder's entries (a new log's `db` and
        // `conf`, the log folder itself) survive a power cut.
        disk::narrow_tree(dir).map_err(|e| open_err(&e))?;
        disk::sync_dir(dir)
            .and_then(|()| disk::sync_parent(dir))
            .map_err(|e| open_err(&e))?;
        let db_file = std::fs::File::open(dir.join("db")).map_err(|e| open_err(&e))?;
        reindex_tail(&db, &db_file)?;
        let high_water = read_high_water(&db)?;
        let last = match db.scan_prefix([EVENT]).keys().next_back() {
            None => 0,
            Some(Ok(key)) => seq_of(&key).unwrap_or(0),
            Some(Err(e)) => return Err(StoreError::Open(Cause::from(e.to_string()))),
        }
        .max(high_water);
        let inner = Arc::new(Inner {
            db,
            append: Mutex::new(last),
            written: AtomicU64::new(last),
            flushing: Mutex::new(false),
            durable: watch::channel(Durable {
                flushed: last,
                ..Durable::default()
            })
            .0,
            appended: watch::channel(last).0,
            flushes: AtomicU64::new(0),
            broken: watch::channel(None).0,
            db_file,
            on_flush: std::sync::OnceLock::new(),
            _lock: lock,
        });
        Ok(SledStore { inner })
    }

    /// Copies `records` in at their own seqs (`easel migrate --to <dir>`),
    /// each with the keys an append derives, only above the last seq; the
    /// high-water mark then stands at `high_water` (at least the last
    /// seq), so seqs removed from the source are never given again here.
    /// Flushed (and `fdatasync`ed) before it returns.
    ///
    /// # Errors
    /// [`StoreError::Write`], e.g. a seq not above the last one.
    pub fn import(&self, records: &[Recorded], high_water: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut last = lock(&inner.append);
        let insert = |k: Vec<u8>, v: Vec<u8>| {
            inner
                .db
                .insert(k, v)
                .map(|_| ())
                .map_err(|e| StoreError::Write(inner.refused(&e)))
        };
        for rec in records {
            if rec.seq <= *last {
                return Err(StoreError::Write(Cause::from(format!(
                    "event {} is not above the log's last seq {}",
                    rec.seq, *last
                ))));
            }
            let bytes =
                codec::encode(rec).map_err(|e| StoreError::Write(Cause::from(e.to_string())))?;
            insert(event_key(rec.seq).to_vec(), bytes)?;
            *last = rec.seq;
            for (k, v) in derived_keys(rec) {
                insert(k, v)?;
            }
        }
        if high_water > *last {
            insert(meta_key(HIGH_WATER), high_water.to_be_bytes().to_vec())?;
            *last = high_water;
        }
        inner.written.store(*last, Ordering::Release);
        inner.appended.send_replace(*last);
        drop(last);
        inner
            .sync()
            .map(|_| ())
            .map_err(|e| StoreError::Flush(inner.refused(&e)))
    }

    /// Resolves with true at the next flush that makes events durable, or
    /// false at the next refused flush: whether the disk takes writes,
    /// proven by a write rather than assumed from a successful open.
    pub async fn next_flush_works(&self) -> bool {
        let mut rx = self.inner.durable.subscribe();
        let (flushed, failures) = {
            let d = rx.borrow_and_update();
            (d.flushed, d.failures)
        };
        match rx
            .wait_for(|d| d.flushed > flushed || d.failures > failures)
            .await
        {
            Ok(d) => d.failures == failures,
            Err(_) => false,
        }
    }

    /// Calls `observer` after each flush that reached the disk with its
    /// duration and the events it made durable. Set once per store; a
    /// second observer is ignored.
    pub fn observe_flushes(&self, observer: FlushObserver) {
        let _ = self.inner.on_flush.set(observer);
    }

    /// The raw sled handle, for tests that damage records on purpose.
    #[cfg(feature = "test-support")]
    pub fn raw_insert_for_tests(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner
            .db
            .insert(event_key(seq), bytes)
            .map(|_| ())
            .map_err(|e| StoreError::Write(self.inner.refused(&e)))
    }

    /// Turns this log's request indexes back into the layout of before
    /// issue 14 (per-user keys in id order, no creation-order keys, no
    /// layout mark), to test the rebuild at the next open. Returns how
    /// many old keys there are now; [`SledStore::count_prefix_for_tests`]
    /// counts them again after.
    ///
    /// # Errors
    /// A read or write error.
    #[cfg(feature = "test-support")]
    pub fn downgrade_index_for_tests(&self) -> Result<usize, StoreError> {
        let db = &self.inner.db;
        let write = |e: sled::Error| StoreError::Write(describe(&e));
        for prefix in [ORDER, BY_USER] {
            for key in db.scan_prefix([prefix]).keys() {
                db.remove(key.map_err(read_err)?).map_err(write)?;
            }
        }
        db.remove(meta_key(INDEX_LAYOUT)).map_err(write)?;
        let mut old = 0;
        for kv in db.scan_prefix([EVENT]) {
            let (k, v) = kv.map_err(read_err)?;
            if let Ok(rec) = decode_at(&k, &v)
                && let Event::Queued { origin, .. } = &rec.event
            {
                let key = [
                    &[OLD_USER][..],
                    &user_bytes(origin.user_id),
                    rec.request_id.as_bytes(),
                ]
                .concat();
                db.insert(key, Vec::<u8>::new()).map_err(write)?;
                old += 1;
            }
        }
        db.flush().map_err(write)?;
        Ok(old)
    }

    /// How many keys start with `prefix` (`b'x'` old per-user keys, `b'o'`
    /// creation order, `b'y'` per user).
    #[cfg(feature = "test-support")]
    pub fn count_prefix_for_tests(&self, prefix: u8) -> usize {
        self.inner.db.scan_prefix([prefix]).count()
    }

    /// The highest seq this handle has made durable itself (flushed and
    /// `fdatasync`ed); what a power cut right now is sure to leave.
    #[cfg(feature = "test-support")]
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable.borrow().flushed
    }

    /// A power cut, for tests: every event this handle has not made
    /// durable is removed with the keys derived from it, as is a checkpoint
    /// past them, as if sled had recovered only the synced prefix of its
    /// log. (A real cut may keep more: sled also writes in the background;
    /// this is the worst case the invariants must survive.) Returns how
    /// many events went. Use the handle only to drop it afterwards.
    ///
    /// # Errors
    /// A store error.
    #[cfg(feature = "test-support")]
    pub fn lose_unsynced_for_tests(&self) -> Result<u64, StoreError> {
        let db = &self.inner.db;
        let kept = self.durable_seq();
        let mut lost = 0;
        let tail: Vec<_> = db
            .range(event_key(kept + 1)..=event_key(u64::MAX))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        for (k, v) in tail.iter().rev() {
            if let Ok(rec) = decode_at(k, v) {
                for (dk, dv) in derived_keys(&rec) {
                    let ours = dv.is_empty()
                        || id_at(db.get(&dk).map_err(read_err)?) == Some(rec.request_id);
                    if ours {
                        db.remove(dk).map_err(read_err)?;
                    }
                }
            }
            db.remove(k).map_err(read_err)?;
            lost += 1;
        }
        if read_checkpoint(db)?.is_some_and(|(seq, _)| seq > kept) {
            db.remove(CHECKPOINT).map_err(read_err)?;
        }
        self.inner.sync().map_err(read_err)?;
        Ok(lost)
    }

    /// Turns `Some(reason)` at the first write or flush the disk refuses
    /// (full, size limit, I/O error). This handle stays unwritable after
    /// that; the bot restarts its engine on a fresh handle (`app::run`).
    pub fn write_failure(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.inner.broken.subscribe()
    }
}

/// One sentence for a sled error, in words an operator acts on (sled's own
/// text for I/O errors is a debug dump).
fn describe(e: &sled::Error) -> Cause {
    match e {
        sled::Error::Io(io) => {
            let message = match io.kind() {
                std::io::ErrorKind::StorageFull => {
                    "the disk is full (no space left on device)".into()
                }
                std::io::ErrorKind::FileTooLarge => {
                    "a file reached its size limit (file too large)".into()
                }
                std::io::ErrorKind::PermissionDenied => "permission denied".into(),
                std::io::ErrorKind::ReadOnlyFilesystem => "the file system is read-only".into(),
                _ => io.to_string(),
            };
            Cause {
                kind: Some(io.kind()),
                message,
            }
        }
        other => Cause::from(other.to_string()),
    }
}

/// What `easel compact` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactReport {
    pub keys: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Ends a compaction a crash interrupted (see [`SledStore::compact`]);
/// only ever called with the log's lock held, so no compaction is running.
/// The log folder is the truth while it exists; without it, the finished
/// copy becomes the log, or else the old log steps back. A leftover is
/// removed only while a complete log is in place.
fn finish_interrupted_compaction(dir: &Path) -> std::io::Result<()> {
    let copy = sibling(dir, ".compact");
    let old = sibling(dir, ".old");
    if !dir.exists() {
        // The copy is renamed into place only after it was written, synced
        // and checked; the old log is renamed away only after that too.
        if has_db(&copy) {
            std::fs::rename(&copy, dir)?;
            disk::sync_parent(dir)?;
        } else if has_db(&old) {
            std::fs::rename(&old, dir)?;
            disk::sync_parent(dir)?;
        }
    }
    if has_db(dir) {
        for leftover in [copy, old] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover)?;
            }
        }
    }
    Ok(())
}

fn has_db(d: &Path) -> bool {
    d.join("conf").exists() || d.join("db").exists()
}

/// The data dir's lock, words for when another process has it.
fn take_lock(dir: &Path, wait: std::time::Duration) -> Result<DirLock, StoreError> {
    DirLock::acquire(dir, wait).map_err(|e| match e {
        LockError::Busy(_) => StoreError::InUse(format!(
            "{} is in use by another easel process (is `easel run` or `easel compact` running?)",
            dir.display()
        )),
        LockError::Io(path, e) => StoreError::Open(Cause::io_at(&path, &e)),
    })
}

/// The high-water mark left by the last removal from the log, 0 if none.
fn read_high_water(db: &sled::Db) -> Result<u64, StoreError> {
    Ok(db
        .get(meta_key(HIGH_WATER))
        .map_err(read_err)?
        .and_then(|v| seq_of(&v))
        .unwrap_or(0))
}

impl SledStore {
    /// Whether `dir` holds a log, or the finished copy of one that an
    /// interrupted compaction left (opening completes it).
    pub fn exists(dir: &Path) -> bool {
        has_db(dir) || has_db(&sibling(dir, ".compact")) || has_db(&sibling(dir, ".old"))
    }
}

impl SledStore {
    /// Rewrites the log in `dir` into a fresh database, which drops the
    /// space sled keeps after removals (retention): a copy is written and
    /// flushed beside it, checked key for key against the original by
    /// checksum, then swapped in by two renames. A crash at any point
    /// leaves either the old or the new log, finished at the next open.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the log is in use (the bot runs) or cannot
    /// be opened; [`StoreError::Write`] when the copy fails (the original
    /// is untouched).
    pub fn compact(dir: &Path) -> Result<CompactReport, StoreError> {
        // Held to the end: nothing else opens, tidies or compacts this log
        // meanwhile. Not waited for: a compaction beside a running bot (or
        // any other easel process on this log) is refused at once.
        let _lock = take_lock(dir, std::time::Duration::ZERO)?;
        finish_interrupted_compaction(dir).map_err(|e| StoreError::Open(Cause::io_at(dir, &e)))?;
        let bytes_before = dir_bytes(dir);
        let copy_dir = sibling(dir, ".compact");
        let old_dir = sibling(dir, ".old");
        let old = open_db(dir, LOCK_WAIT)?;
        let write =
            |e: &dyn std::fmt::Display| StoreError::Write(Cause::from(format!("compacting: {e}")));
        let copy = sled::Config::new()
            .path(&copy_dir)
            .open()
            .map_err(|e| write(&describe(&e)))?;
        let mut keys = 0;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for kv in old.iter() {
            let (k, v) = kv.map_err(read_err)?;
            batch.insert(k, v);
            keys += 1;
            in_batch += 1;
            if in_batch == 10_000 {
                copy.apply_batch(std::mem::take(&mut batch))
                    .map_err(|e| write(&describe(&e)))?;
                in_batch = 0;
            }
        }
        copy.apply_batch(batch).map_err(|e| write(&describe(&e)))?;
        // The copy's file and its folder's entries survive a power cut
        // before it replaces the log.
        let copy_file = std::fs::File::open(copy_dir.join("db")).map_err(|e| write(&e))?;
        sync_db(&copy, &copy_file).map_err(|e| write(&describe(&e)))?;
        disk::sync_dir(&copy_dir).map_err(|e| write(&e))?;
        let same = old.checksum().map_err(read_err)? == copy.checksum().map_err(read_err)?;
        drop(copy);
        drop(old);
        if !same {
            let _ = std::fs::remove_dir_all(&copy_dir);
            return Err(write(
                &"the copy differs from the original; the log is unchanged",
            ));
        }
        // Crash-safe order: the old log steps aside, the copy takes its
        // place; `finish_interrupted_compaction` completes either step.
        let swap = || -> std::io::Result<()> {
            std::fs::rename(dir, &old_dir)?;
            std::fs::rename(&copy_dir, dir)?;
            // Both renames on disk before the old log may go.
            disk::sync_parent(dir)?;
            std::fs::remove_dir_all(&old_dir)?;
            disk::sync_parent(dir)
        };
        swap().map_err(|e| write(&e))?;
        Ok(CompactReport {
            keys,
            bytes_before,
            bytes_after: dir_bytes(dir),
        })
    }
}

/// How long to wait for sled's file lock. After the last handle in this
/// process is dropped, sled's own I/O threads can hold the database for a
/// few milliseconds more; another process holding it is reported at once
/// the wait is over.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_db(dir: &Path, wait: std::time::Duration) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let result = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .open();
        match result {
            Ok(db) => return Ok(db),
            // sled reports the lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Open(Cause::from(format!(
                    "{} is in use by another process (is `easel run` running?)",
                    dir.display()
                ))));
            }
            Err(e) => {
                let cause = describe(&e);
                return Err(StoreError::Open(Cause {
                    message: format!("{}: {}", dir.display(), cause.message),
                    ..cause
                }));
            }
        }
    }
}

/// sled's flush, then the `fdatasync` of its log file (`db_file`) that
/// makes it survive a power cut: sled's flush ends in `sync_file_range`.
fn sync_db(db: &sled::Db, db_file: &std::fs::File) -> Result<(), sled::Error> {
    db.flush()?;
    db_file.sync_data()?;
    Ok(())
}

impl Inner {
    fn sync(&self) -> Result<(), sled::Error> {
        sync_db(&self.db, &self.db_file)
    }

    /// Records a refused write (once; sled's error is sticky) and words it.
    fn refused(&self, e: &sled::Error) -> Cause {
        let reason = describe(e);
        self.broken.send_if_modified(|b| {
            if b.is_some() {
                return false;
            }
            tracing::error!(%reason, "the event log refused a write");
            *b = Some(Arc::from(reason.message.as_str()));
            true
        });
        reason
    }

    /// One flush as leader: covers every append written before it started.
    fn flush_as_leader(&self) {
        let target = self.written.load(Ordering::Acquire);
        // Once the disk refused, sled's error is sticky and a new flush can
        // only fail again — or wait on an I/O buffer that will never be
        // written (seen in the disk-full campaign as a reply that never
        // came). Every waiter gets the failure at once instead.
        let reported = self.broken.borrow().clone();
        if let Some(reason) = reported {
            self.durable.send_modify(|d| {
                d.failed_through = d.failed_through.max(target);
                d.failures += 1;
                d.error = Some(Cause::from(reason.to_string()));
            });
            *lock(&self.flushing) = false;
            self.durable.send_modify(|_| {});
            return;
        }
        // The fsync blocks: on a multi-threaded runtime tokio moves other
        // tasks off this worker meanwhile.
        let began = std::time::Instant::now();
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.sync())
            }
            _ => self.sync(),
        };
        match result {
            Ok(_) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                let mut events = 0;
                self.durable.send_modify(|d| {
                    events = target.saturating_sub(d.flushed);
                    d.flushed = d.flushed.max(target);
                });
                if let Some(observe) = self.on_flush.get() {
                    observe(began.elapsed(), events);
                }
            }
            Err(e) => {
                let msg = self.refused(&e);
                self.durable.send_modify(|d| {
                    d.failed_through = target;
                    d.failures += 1;
                    d.error = Some(msg);
                });
            }
        }
        *lock(&self.flushing) = false;
        // Wake waiters that queued behind this flush so one of them leads next.
        self.durable.send_modify(|_| {});
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Once broken, the failure was already reported; don't repeat it.
        if self.inner.broken.borrow().is_none()
            && let Err(e) = self.inner.sync()
        {
            tracing::error!(error = %describe(&e), "final flush of the event log failed");
        }
    }
}

fn decode_at(key: &[u8], value: &[u8]) -> ReadItem {
    let seq = seq_of(key).unwrap_or(0);
    codec::decode(value).map_err(|reason| ReadError::Corrupt(Corrupt { seq, reason }))
}

fn read_err(e: sled::Error) -> StoreError {
    StoreError::Read(describe(&e))
}

/// The 16 id bytes of an index key at offset `at`.
fn id_in_key(key: &[u8], at: usize) -> Result<RequestId, StoreError> {
    let bytes: [u8; 16] = key
        .get(at..at + 16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Read("malformed index key".into()))?;
    Ok(RequestId(uuid::Uuid::from_bytes(bytes)))
}

fn id_at(value: Option<sled::IVec>) -> Option<RequestId> {
    let bytes: [u8; 16] = value?.as_ref().try_into().ok()?;
    Some(RequestId(uuid::Uuid::from_bytes(bytes)))
}

/// The keys an event adds besides itself: its request index entry and, for
/// `Queued`, the per-user index and the intake keys.
fn derived_keys(rec: &Recorded) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut keys = vec![(index_key(rec.request_id, rec.seq).to_vec(), Vec::new())];
    if let Event::Queued { origin, .. } = &rec.event {
        keys.push((order_key(rec.at, rec.request_id).to_vec(), Vec::new()));
        keys.push((
            user_key(origin.user_id, rec.at, rec.request_id).to_vec(),
            Vec::new(),
        ));
        let id = rec.request_id.as_bytes().to_vec();
        if let Some(u) = origin.update_id {
            keys.push((update_key(u).to_vec(), id.clone()));
        }
        if let Some(m) = origin.message_id {
            keys.push((message_key(origin.chat_id, m).to_vec(), id));
        }
    }
    keys
}

/// The checkpoint's seq and state, if one was written.
fn read_checkpoint(db: &sled::Db) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let Some(bytes) = db.get(CHECKPOINT).map_err(read_err)? else {
        return Ok(None);
    };
    let payload = codec::unseal(&bytes)
        .map_err(|e| StoreError::Read(Cause::from(format!("checkpoint: {e}"))))?;
    let seq = seq_of(payload.get(..8).unwrap_or_default())
        .ok_or_else(|| StoreError::Read("checkpoint: too short".into()))?;
    Ok(Some((seq, payload[8..].to_vec())))
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = vec![META, b'/'];
    key.extend_from_slice(name.as_bytes());
    key
}

/// Puts back the derived keys of the log's tail that a crash between an
/// event's insert and its keys' left out. Returns how many were missing.
///
/// The tail after the checkpoint is enough: a checkpoint covers only events
/// whose appends returned (their keys written), and it is inserted after
/// them, so sled, which recovers a prefix of its log, has their keys
/// whenever it has the checkpoint. (After a refused write sled refuses all
/// later ones, so no checkpoint can cover an append that failed midway.)
/// Without a readable checkpoint the whole log is checked.
///
/// A log from before the creation-order indexes (issue 14: request ids no
/// longer sort by time) is re-derived whole once, its old per-user keys
/// removed, and the layout recorded; every step can be repeated, so a
/// crash midway is finished at the next open.
fn reindex_tail(db: &sled::Db, db_file: &std::fs::File) -> Result<u64, StoreError> {
    let open_err = |e: sled::Error| StoreError::Open(describe(&e));
    let layout_ok = db.get(meta_key(INDEX_LAYOUT)).map_err(open_err)?.as_deref() == Some(b"2");
    let from = if layout_ok {
        read_checkpoint(db)
            .ok()
            .flatten()
            .map_or(0, |(seq, _)| seq + 1)
    } else {
        0
    };
    let mut repaired = 0;
    for kv in db.range(event_key(from)..=event_key(u64::MAX)) {
        let (k, v) = kv.map_err(|e| StoreError::Open(Cause::from(e.to_string())))?;
        // Unreadable records are reported by the readers; nothing to derive.
        let Ok(rec) = decode_at(&k, &v) else { continue };
        for (key, value) in derived_keys(&rec) {
            let present = db
                .get(&key)
                .map_err(|e| StoreError::Open(Cause::from(e.to_string())))?;
            // Absent is the crash's mark; a key naming another request is
            // that request's, and stays.
            if present.is_none() {
                db.insert(key, value)
                    .map_err(|e| StoreError::Open(describe(&e)))?;
                repaired += 1;
            }
        }
    }
    if !layout_ok {
        for key in db.scan_prefix([OLD_USER]).keys() {
            db.remove(key.map_err(open_err)?).map_err(open_err)?;
        }
        db.insert(meta_key(INDEX_LAYOUT), b"2".to_vec())
            .map_err(open_err)?;
        sync_db(db, db_file).map_err(|e| StoreError::Open(describe(&e)))?;
        if repaired > 0 {
            tracing::info!(keys = repaired, "request index rebuilt in creation order");
        }
        return Ok(repaired);
    }
    if repaired > 0 {
        sync_db(db, db_file).map_err(|e| StoreError::Open(describe(&e)))?;
        tracing::warn!(
            repaired,
            "index and intake keys re-derived from the log's tail after a crash"
        );
    }
    Ok(repaired)
}

impl EventStore for SledStore {
    fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Recorded>, StoreError> {
        let inner = &self.inner;
        let mut last = lock(&inner.append);
        let mut out = Vec::with_capacity(events.len());
        let mut encoded = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            let rec = Recorded {
                seq: *last + 1 + i as u64,
                request_id: e.request_id,
                at: e.at,
                event: e.event,
            };
            encoded.push(
                codec::encode(&rec).map_err(|e| StoreError::Write(Cause::from(e.to_string())))?,
            );
            out.push(rec);
        }
        // One insert per key, the event first. sled's `apply_batch` writes
        // and syncs its I/O buffer twice per call (to pin the batch), which
        // made every append cost two device syncs besides the group-commit
        // flush. The keys derived from an event (index, user, intake) are
        // re-derived from the log's tail at open if a crash falls between.
        let insert = |k: Vec<u8>, v: Vec<u8>| {
            inner
                .db
                .insert(k, v)
                .map(|_| ())
                .map_err(|e| StoreError::Write(inner.refused(&e)))
        };
        let write = || -> Result<(), StoreError> {
            for (rec, bytes) in out.iter().zip(encoded) {
                insert(event_key(rec.seq).to_vec(), bytes)?;
                // From here the seq is taken, whatever follows.
                *last = rec.seq;
                for (k, v) in derived_keys(rec) {
                    insert(k, v)?;
                }
            }
            Ok(())
        };
        let result = write();
        inner.written.store(*last, Ordering::Release);
        inner.appended.send_replace(*last);
        result.map(|()| out)
    }

    async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut rx = inner.durable.subscribe();
        let failures_before = rx.borrow().failures;
        loop {
            {
                let d = rx.borrow_and_update();
                if d.flushed >= seq {
                    return Ok(());
                }
                if d.failures > failures_before && d.failed_through >= seq {
                    return Err(StoreError::Flush(
                        d.error.clone().unwrap_or_else(|| Cause::from("unknown")),
                    ));
                }
            }
            let lead = {
                let mut flushing = lock(&inner.flushing);
                !std::mem::replace(&mut *flushing, true)
            };
            if lead {
                inner.flush_as_leader();
                continue;
            }
            // Someone is flushing: its result (or its end) wakes us.
            rx.changed().await.map_err(|_| StoreError::Closed)?;
        }
    }

    fn read_from(&self, seq: u64) -> Box<dyn Iterator<Item = ReadItem> + Send + '_> {
        let iter = self.inner.db.range(event_key(seq)..=event_key(u64::MAX));
        Box::new(iter.map(|kv| match kv {
            Ok((k, v)) => decode_at(&k, &v),
            Err(e) => Err(ReadError::Store(read_err(e))),
        }))
    }

    fn events_of(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        let mut prefix = [0u8; 17];
        prefix[0] = INDEX;
        prefix[1..].copy_from_slice(id.as_bytes());
        let mut out = Vec::new();
        for key in self.inner.db.scan_prefix(prefix).keys() {
            let key = key.map_err(read_err)?;
            let Some(seq) = seq_of(&key) else { continue };
            let ek = event_key(seq);
            match self.inner.db.get(ek).map_err(read_err)? {
                Some(v) => out.push(decode_at(&ek, &v)),
                None => out.push(Err(ReadError::Store(StoreError::Read(Cause::from(
                    format!("index names event {seq}, which is missing"),
                ))))),
            }
        }
        Ok(out)
    }

    fn find_update(&self, update_id: u32) -> Result<Option<RequestId>, StoreError> {
        Ok(id_at(
            self.inner.db.get(update_key(update_id)).map_err(read_err)?,
        ))
    }

    fn find_message(&self, chat: ChatId, message_id: i32) -> Result<Option<RequestId>, StoreError> {
        Ok(id_at(
            self.inner
                .db
                .get(message_key(chat, message_id))
                .map_err(read_err)?,
        ))
    }

    fn last_seq(&self) -> u64 {
        self.inner.written.load(Ordering::Acquire)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }

    fn save_checkpoint(&self, seq: u64, state: &[u8]) -> Result<(), StoreError> {
        let mut payload = Vec::with_capacity(state.len() + 8);
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend_from_slice(state);
        let sealed =
            codec::seal(&payload).map_err(|e| StoreError::Write(Cause::from(e.to_string())))?;
        self.inner
            .db
            .insert(CHECKPOINT, sealed)
            .map_err(|e| StoreError::Write(self.inner.refused(&e)))?;
        Ok(())
    }

    fn load_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        read_checkpoint(&self.inner.db)
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = meta_key(name);
        self.inner
            .db
            .insert(key, value)
            .map(|_| ())
            .map_err(|e| StoreError::Write(self.inner.refused(&e)))
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .inner
            .db
            .get(meta_key(name))
            .map_err(read_err)?
            .map(|v| v.to_vec()))
    }

    fn request_ids(
        &self,
        user: Option<crate::domain::UserId>,
        since: Option<chrono::DateTime<chrono::Utc>>,
        until: Option<chrono::DateTime<chrono::Utc>>,
        newest_first: bool,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_> {
        let lo = since.map_or([0u8; 8], millis);
        let hi = until.map_or([0xFFu8; 8], millis);
        // `o<ms><id>`, or `y<user><ms><id>`: the id is the last 16 bytes.
        let mut start = match user {
            Some(u) => [&[BY_USER][..], &user_bytes(u)].concat(),
            None => vec![ORDER],
        };
        let mut end = start.clone();
        start.extend_from_slice(&lo);
        end.extend_from_slice(&hi);
        end.extend_from_slice(&[0xFF; 16]);
        let range = self.inner.db.range(start..=end);
        let ids = |kv: sled::Result<(sled::IVec, sled::IVec)>| -> Result<RequestId, StoreError> {
            let (k, _) = kv.map_err(read_err)?;
            id_in_key(&k, k.len().saturating_sub(16))
        };
        if newest_first {
            Box::new(range.rev().map(ids))
        } else {
            Box::new(range.map(ids))
        }
    }

    fn ids_between(
        &self,
        lo: RequestId,
        hi: RequestId,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_> {
        // The event index `i<id><seq>`: ids repeat, one key per event.
        let start = index_key(lo, 0);
        let end = index_key(hi, u64::MAX);
        let mut last: Option<RequestId> = None;
        Box::new(
            self.inner
                .db
                .range(start..=end)
                .map(|kv| id_in_key(&kv.map_err(read_err)?.0, 1))
                .filter(move |r| match r {
                    Ok(id) if last == Some(*id) => false,
                    Ok(id) => {
                        last = Some(*id);
                        true
                    }
                    Err(_) => true,
                }),
        )
    }

    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.db.scan_prefix(meta_key(prefix)) {
            let (k, v) = kv.map_err(read_err)?;
            let name = String::from_utf8_lossy(&k[2..]).into_owned();
            out.push((name, v.to_vec()));
        }
        Ok(out)
    }

    fn delete_meta(&self, name: &str) -> Result<(), StoreError> {
        let key = meta_key(name);
        self.inner
            .db
            .remove(key)
            .map(|_| ())
            .map_err(|e| StoreError::Write(self.inner.refused(&e)))
    }

    fn forget_requests(
        &self,
        ids: &[RequestId],
        name: &str,
        value: &[u8],
    ) -> Result<usize, StoreError> {
        let db = &self.inner.db;
        let mut batch = sled::Batch::default();
        let mut events = 0;
        for &id in ids {
            let mut prefix = [0u8; 17];
            prefix[0] = INDEX;
            prefix[1..].copy_from_slice(id.as_bytes());
            for key in db.scan_prefix(prefix).keys() {
                let key = key.map_err(read_err)?;
                let Some(seq) = seq_of(&key) else { continue };
                let ek = event_key(seq);
                // Every key the event derived goes with it; intake keys only
                // while they still name this request.
                if let Some(bytes) = db.get(ek).map_err(read_err)?
                    && let Ok(rec) = codec::decode(&bytes)
                {
                    for (k, v) in derived_keys(&rec) {
                        let ours = v.is_empty() || id_at(db.get(&k).map_err(read_err)?) == Some(id);
                        if ours {
                            batch.remove(k);
                        }
                    }
                }
                batch.remove(&ek);
                batch.remove(key);
                events += 1;
            }
        }
        batch.insert(meta_key(name), value);
        // Every seq written so far stays taken: the archive holds some.
        let high_water = self
            .inner
            .written
            .load(Ordering::Acquire)
            .max(read_high_water(db)?);
        batch.insert(meta_key(HIGH_WATER), high_water.to_be_bytes().to_vec());
        db.apply_batch(batch)
            .map_err(|e| StoreError::Write(self.inner.refused(&e)))?;
        self.inner
            .sync()
            .map_err(|e| StoreError::Flush(self.inner.refused(&e)))?;
        Ok(events)
    }

    fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }
}
