//! `easel migrate` (§9): `--to postgres://…` copies a stopped sled data
//! dir into an empty PostgreSQL database, `--to <dir>` copies a database
//! back into a new data dir — every event at its own position, the intake
//! keys, the small named values — then verifies the copy: every record read
//! back identical, and both logs replayed and compared. A source with an
//! unreadable record is refused (the copy would not be exact).

use secrecy::SecretString;

use super::OpsError;
use crate::store::pg::PgLog;
use crate::store::{EventStore, Recorded, SledStore};

/// Events per import transaction.
const CHUNK: usize = 2_000;

/// Meta names that describe sled's own files, not the bot: not copied.
const SLED_ONLY: [&str; 2] = ["index/", "log/"];

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub events: u64,
    pub requests: usize,
    pub meta: usize,
    /// The database's head: the source's high-water mark.
    pub head: u64,
}

/// Copies the log in `dir` (the bot stopped) into the empty database at
/// `url`, and verifies the copy.
///
/// # Errors
/// [`OpsError::Usage`] when the log is in use or the database not empty;
/// [`OpsError::Failed`] when the source has unreadable records or the copy
/// does not verify; [`OpsError::Store`] when either side fails.
pub async fn to_postgres(dir: &std::path::Path, url: &SecretString) -> Result<Migrated, OpsError> {
    let source = SledStore::open_with_wait(dir, std::time::Duration::from_millis(300))
        .map_err(|e| OpsError::usage(format!("stop the bot first: {e}")))?;
    let db = PgLog::connect(url).await?;
    if db.last_position() != 0 {
        return Err(OpsError::usage(
            "the database already holds events: easel migrate copies into an empty database only",
        ));
    }
    let mut events = 0u64;
    let mut requests = std::collections::HashSet::new();
    let mut chunk: Vec<Recorded> = Vec::with_capacity(CHUNK);
    let high_water = source.last_seq();
    let mut items = source.read_from(0);
    loop {
        let next = items.next();
        let done = next.is_none();
        if let Some(item) = next {
            let rec = item.map_err(|e| {
                OpsError::failed(format!(
                    "the source log has an unreadable record ({e}); nothing was committed beyond the chunks before it — migrate needs an exact copy"
                ))
            })?;
            requests.insert(rec.request_id);
            chunk.push(rec);
        }
        if chunk.len() >= CHUNK || (done && !chunk.is_empty()) {
            let last = if done { high_water } else { 0 };
            db.import(&chunk, last).await?;
            events += chunk.len() as u64;
            chunk.clear();
        }
        if done {
            break;
        }
    }
    drop(items);
    if events == 0 && high_water > 0 {
        db.import(&[], high_water).await?;
    }
    let mut meta = 0;
    for (name, value) in source.scan_meta("")? {
        if SLED_ONLY.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        db.put_meta(&name, &value).await?;
        meta += 1;
    }
    verify_copy(&source, &db).await?;
    Ok(Migrated {
        events,
        requests: requests.len(),
        meta,
        head: db.last_position(),
    })
}

/// Copies the database at `url` into a new data dir's log at `dir` (which
/// must hold none), and verifies the copy.
///
/// # Errors
/// [`OpsError::Usage`] when `dir` holds a log already; as
/// [`to_postgres`] otherwise.
pub async fn to_dir(
    url: &SecretString,
    dir: &crate::config::DataDir,
) -> Result<Migrated, OpsError> {
    if SledStore::exists(&dir.log()) {
        return Err(OpsError::usage(format!(
            "{dir} already holds an event log: easel migrate copies into a new data dir only"
        )));
    }
    let db = PgLog::connect(url).await?;
    let items = db.read_all().await?;
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        records.push(item.map_err(|e| {
            OpsError::failed(format!(
                "the database has an unreadable record ({e}): migrate needs an exact copy"
            ))
        })?);
    }
    crate::store::disk::create_data_dir(dir.root())
        .map_err(|e| OpsError::failed(format!("cannot create {dir}: {e}")))?;
    let target = SledStore::open(&dir.log())?;
    target.import(&records, db.last_position())?;
    let mut meta = 0;
    for (name, value) in db.all_meta().await? {
        target.put_meta(&name, &value)?;
        meta += 1;
    }
    verify_copy(&target, &db).await?;
    let requests: std::collections::HashSet<_> = records.iter().map(|r| r.request_id).collect();
    Ok(Migrated {
        events: records.len() as u64,
        requests: requests.len(),
        meta,
        head: target.last_seq(),
    })
}

/// Every record of `db` equal to the source's, and both replays equal and
/// clean (or with the very same problems).
async fn verify_copy(source: &SledStore, db: &PgLog) -> Result<(), OpsError> {
    let copied = db.read_all().await?;
    let mismatch = |what: String| OpsError::failed(format!("the copy does not verify: {what}"));
    let original: Vec<_> = source.read_from(0).collect();
    if original.len() != copied.len() {
        return Err(mismatch(format!(
            "{} events in the source, {} in the database",
            original.len(),
            copied.len()
        )));
    }
    for (a, b) in original.iter().zip(&copied) {
        match (a, b) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), _) => return Err(mismatch(format!("event {} differs", a.seq))),
            (Err(e), _) => return Err(mismatch(format!("the source: {e}"))),
        }
    }
    let there = super::verify(copied.into_iter())?;
    let here = super::verify(original.into_iter())?;
    if there.state != here.state || there.problems() != here.problems() {
        return Err(mismatch(
            "replaying the database does not give the source's projection".into(),
        ));
    }
    if !there.ok() {
        return Err(OpsError::failed(format!(
            "copied, but the history does not verify (as in the source): {}",
            there
                .first_problem()
                .map_or_else(String::new, |p| p.message)
        )));
    }
    Ok(())
}
