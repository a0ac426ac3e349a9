//! Retention: finished requests older than the window leave the event log
//! for archive files in the export format (`<data dir>/archive/NNNNNN.jsonl`),
//! so the log — and start-up, replay and disk use with it — stays bounded
//! while old history stays readable (`easel audit show` looks there too,
//! and each file replays and verifies by itself with `easel replay --from`).
//!
//! Crash safety: a file is written to `.tmp`, fsynced and renamed before
//! its requests are removed, and the removal batch also records the file's
//! number in meta. A file numbered above that record is what a crash left
//! between the rename and the removal (its requests are still in the log),
//! so the next sweep deletes it and archives them again.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::domain::RequestId;
use crate::projection::RequestRecord;
use crate::store::{EventStore, Recorded, StoreError};

/// Meta name of the number of the last archive file whose requests left the log.
pub const FILES_META: &str = "retention/files";
/// Requests per archive file, and per atomic removal batch.
pub const CHUNK: usize = 10_000;

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub requests: usize,
    pub events: usize,
    pub files: Vec<PathBuf>,
    pub archive_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the archive {} could not be written: {source}", path.display())]
    Archive {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The sweep's task ended without an answer (it panicked or was
    /// cancelled); what it did before stays done.
    #[error("the retention sweep stopped: {0}")]
    Stopped(String),
}

/// Archives, then removes from the log, every finished request whose last
/// event is older than `cutoff`, [`CHUNK`] requests per file. Unfinished
/// requests stay, however old. `stop` is asked before each file, so a
/// shutting-down bot is not held by a long first sweep.
///
/// # Errors
/// When the log cannot be read or written, or the archive not written;
/// what was done before stays done and consistent.
pub fn sweep(
    store: &impl EventStore,
    dir: &Path,
    cutoff: DateTime<Utc>,
    stop: &dyn Fn() -> bool,
) -> Result<SweepReport, RetentionError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RetentionError::Archive { path, source }
    };
    let mut committed = store
        .get_meta(FILES_META)?
        .and_then(|b| Some(u64::from_be_bytes(b.as_slice().try_into().ok()?)))
        .unwrap_or(0);
    if dir.exists() {
        remove_leftovers(dir, committed).map_err(io(dir))?;
    }
    let mut report = SweepReport::default();
    while !stop() {
        let chunk = due(store, cutoff, CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        // Owner-only, and its entry in the data dir on disk before a file
        // in it is relied on.
        crate::store::disk::create_private_dir(dir)
            .and_then(|()| crate::store::disk::sync_parent(dir))
            .map_err(io(dir))?;
        let number = committed + 1;
        let path = dir.join(format!("{number:06}.jsonl"));
        let mut events: Vec<&Recorded> = chunk.iter().flat_map(|(_, e)| e).collect();
        events.sort_by_key(|r| r.seq);
        report.archive_bytes += write_archive(&path, &events).map_err(io(&path))?;
        let ids: Vec<RequestId> = chunk.iter().map(|(id, _)| *id).collect();
        report.events += store.forget_requests(&ids, FILES_META, &number.to_be_bytes())?;
        committed = number;
        report.requests += ids.len();
        report.files.push(path);
        if chunk.len() < CHUNK {
            break;
        }
    }
    Ok(report)
}

/// Meta name of the cutoff of the last retention sweep on the database.
pub const DATABASE_META: &str = "retention/swept_until";

/// Requests whose events one query of the database sweep reads.
const BATCH: usize = 500;

/// Retention on the PostgreSQL log (§9): as [`sweep`], but the archive is
/// the database's own `easel_archive` table — each [`CHUNK`] of requests
/// moves there whole, with its intake keys gone, in one transaction
/// (`PgLog::forget_requests`), so there is no file to write first and no
/// crash window between the archive and the removal. Any replica may run
/// it; two at once move each request once (the second finds its rows
/// gone). `stop` is asked before each chunk.
///
/// # Errors
/// When the database cannot be read or written; what was done before
/// stays done.
pub async fn sweep_database<F: crate::store::pg::Follow>(
    log: &crate::store::pg::PgLog<F>,
    cutoff: DateTime<Utc>,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<SweepReport, RetentionError> {
    let mut report = SweepReport::default();
    // Only requests created before the cutoff can have finished before it.
    let created = log.request_ids(None, None, Some(cutoff), false).await?;
    let mut chunk: Vec<RequestId> = Vec::new();
    for batch in created.chunks(BATCH) {
        if stop() {
            break;
        }
        let mut of: std::collections::HashMap<RequestId, (Vec<Recorded>, bool)> =
            std::collections::HashMap::new();
        for item in log.events_of_each(batch).await? {
            match item {
                Ok(rec) => of.entry(rec.request_id).or_default().0.push(rec),
                // Unreadable: it stays in the log, where the tools report it.
                Err(crate::store::ReadError::Corrupt(c)) => {
                    tracing::warn!(
                        position = c.seq,
                        "an unreadable event keeps its request in the log"
                    );
                    if let Some(id) = log.request_at(c.seq).await? {
                        of.entry(id).or_default().1 = true;
                    }
                }
                Err(crate::store::ReadError::Store(e)) => return Err(e.into()),
            }
        }
        for &id in batch {
            let Some((events, damaged)) = of.get(&id) else {
                continue;
            };
            if !damaged && finished_before(events, cutoff) {
                chunk.push(id);
            }
            if chunk.len() == CHUNK {
                move_chunk(log, &mut chunk, cutoff, &mut report).await?;
                if stop() {
                    return Ok(report);
                }
            }
        }
    }
    if !chunk.is_empty() && !stop() {
        move_chunk(log, &mut chunk, cutoff, &mut report).await?;
    }
    Ok(report)
}

/// Moves `chunk`'s requests to the archive table and empties it.
async fn move_chunk<F: crate::store::pg::Follow>(
    log: &crate::store::pg::PgLog<F>,
    chunk: &mut Vec<RequestId>,
    cutoff: DateTime<Utc>,
    report: &mut SweepReport,
) -> Result<(), RetentionError> {
    let moved = log
        .forget_requests(chunk, DATABASE_META, cutoff.to_rfc3339().as_bytes())
        .await?;
    report.events += moved;
    // Another replica's sweep may have moved some first.
    if moved > 0 {
        report.requests += chunk.len();
    }
    chunk.clear();
    Ok(())
}

/// Up to `max` finished requests whose last event is before `cutoff`, with
/// their events, oldest request first. A request with an unreadable event
/// stays in the log, where the operator's tools report it.
fn due(
    store: &impl EventStore,
    cutoff: DateTime<Utc>,
    max: usize,
) -> Result<Vec<(RequestId, Vec<Recorded>)>, StoreError> {
    let mut out = Vec::new();
    // Only requests created before the cutoff (the creation-order index):
    // a request created after it cannot have finished before it.
    for id in store.request_ids(None, None, Some(cutoff), false) {
        let id = id?;
        let mut events = Vec::new();
        let mut readable = true;
        for item in store.events_of(id)? {
            match item {
                Ok(rec) => events.push(rec),
                Err(_) => readable = false,
            }
        }
        if readable && finished_before(&events, cutoff) {
            out.push((id, events));
            if out.len() == max {
                break;
            }
        }
    }
    Ok(out)
}

/// Whether a request with these events (all of them) is finished and its
/// last event is before `cutoff`: what retention moves, on sled and on
/// PostgreSQL alike.
fn finished_before(events: &[Recorded], cutoff: DateTime<Utc>) -> bool {
    let finished = RequestRecord::from_events(events).is_some_and(|r| r.status.is_terminal());
    let last = events.iter().map(|e| e.at).max();
    finished && last.is_some_and(|t| t < cutoff)
}

/// Writes `events` as export lines to `path` durably; returns its size.
fn write_archive(path: &Path, events: &[&Recorded]) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("jsonl.tmp");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::store::disk::FILE_MODE)
        .open(&tmp)?;
    let mut out = BufWriter::new(file);
    for rec in events {
        serde_json::to_writer(&mut out, &super::json::ExportedEvent::from(*rec))?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    std::fs::rename(&tmp, path)?;
    // The rename must be on disk before the requests leave the log.
    crate::store::disk::sync_parent(path)?;
    Ok(bytes)
}

/// Every archived event, in seq order (the files hold whole requests, so
/// their events interleave with each other's and with the log's). Held in
/// memory: an archive of millions of events wants a streaming merge.
///
/// # Errors
/// A file that cannot be read, or a line that is not an exported event.
pub fn archived_events(dir: &Path) -> Result<Vec<Recorded>, super::OpsError> {
    use std::io::BufRead as _;
    let unreadable =
        |what: String| super::OpsError::Failed(format!("cannot read the archive: {what}"));
    let mut events = Vec::new();
    for path in archive_files(dir).map_err(|e| unreadable(format!("{}: {e}", dir.display())))? {
        let file = std::fs::File::open(&path)
            .map_err(|e| unreadable(format!("{}: {e}", path.display())))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| unreadable(format!("{}: {e}", path.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            events.push(
                super::json::parse_event_line(&line)
                    .map_err(|e| unreadable(format!("{} line {}: {e}", path.display(), n + 1)))?,
            );
        }
    }
    events.sort_by_key(|r| r.seq);
    Ok(events)
}

/// The archive files, oldest first.
///
/// # Errors
/// When the folder exists but cannot be read.
pub fn archive_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if let Some(n) = file_number(&path) {
            files.push((n, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

fn file_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".jsonl")?.parse().ok()
}

/// Deletes temporary files and files above `committed` (see the module doc).
fn remove_leftovers(dir: &Path, committed: u64) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let temporary = path.extension().is_some_and(|e| e == "tmp");
        let uncommitted = file_number(&path).is_some_and(|n| n > committed);
        if temporary || uncommitted {
            tracing::warn!(file = %path.display(), "removing an archive file a crash left unfinished; its requests are still in the log");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The events of archived requests whose id starts with `prefix`, grouped
/// per request (oldest first), and the files they were found in.
///
/// # Errors
/// When a file cannot be read; unreadable lines are skipped.
pub fn find_archived(
    dir: &Path,
    prefix: &str,
) -> std::io::Result<Vec<(PathBuf, RequestId, Vec<Recorded>)>> {
    let needle = format!("\"request_id\":\"{}", prefix.to_ascii_lowercase());
    let mut found: Vec<(PathBuf, RequestId, Vec<Recorded>)> = Vec::new();
    for path in archive_files(dir)? {
        let file = std::io::BufReader::new(std::fs::File::open(&path)?);
        for line in file.lines() {
            let line = line?;
            // Cheap test before parsing (export lines are compact JSON).
            if !line.contains(&needle) {
                continue;
            }
            let Ok(rec) = super::json::parse_event_line(&line) else {
                continue;
            };
            match found.iter_mut().find(|(_, id, _)| *id == rec.request_id) {
                Some((_, _, events)) => events.push(rec),
                None => found.push((path.clone(), rec.request_id, vec![rec])),
            }
        }
    }
    Ok(found)
}
