//! Where the operator commands read from: the data dir's log directly when
//! no bot holds it, or else the running bot's read-only Unix socket
//! (`<data dir>/easel.sock`, owner-only). sled allows one process per
//! database, so a CLI beside a running bot asks the bot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::OpsError;
use super::json::parse_event_line;
use super::query::{self, Filter, Query};
use crate::config::DataDir;
use crate::domain::RequestId;
use crate::projection::RequestRecord;
use crate::store::{EventStore, MemoryStore, Recorded, SledStore};

pub enum Source {
    Local(SledStore),
    Remote(PathBuf),
    /// A PostgreSQL log's records, read once (`EASEL_DATABASE_URL`).
    Loaded(Box<MemoryStore>),
}

type Lines = Box<dyn Iterator<Item = Result<String, OpsError>>>;

impl Source {
    /// Opens the data dir's log, or the bot's socket when the log is busy.
    ///
    /// # Errors
    /// [`OpsError::Usage`] when there is no log there.
    pub fn open(data_dir: &DataDir) -> Result<Self, OpsError> {
        let log = data_dir.log();
        if !SledStore::exists(&log) {
            return Err(OpsError::Usage(format!(
                "there is no easel event log in {data_dir}"
            )));
        }
        let socket = data_dir.socket();
        // A bot that is running answers on its socket; then the database is
        // locked, and opening it would only wait.
        if UnixStream::connect(&socket).is_ok() {
            return Ok(Source::Remote(socket));
        }
        match SledStore::open_with_wait(&log, std::time::Duration::from_millis(300)) {
            Ok(store) => Ok(Source::Local(store)),
            Err(e) => Err(OpsError::Remote(format!(
                "the event log in {data_dir} is in use and no running bot answers on {} ({e})",
                socket.display()
            ))),
        }
    }

    fn remote(path: &Path, q: &Query) -> Result<Lines, OpsError> {
        let remote =
            |what: &str, e: &dyn std::fmt::Display| OpsError::Remote(format!("{what}: {e}"));
        let mut stream =
            UnixStream::connect(path).map_err(|e| remote("cannot reach the running bot", &e))?;
        let mut line = serde_json::to_string(q).map_err(|e| remote("cannot word the query", &e))?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| remote("cannot ask the running bot", &e))?;
        let reader = BufReader::new(stream);
        Ok(Box::new(reader.lines().map(move |l| {
            let l = l.map_err(|e| remote("the running bot's answer broke off", &e))?;
            match l.strip_prefix("ERR ") {
                Some(err) => Err(OpsError::Remote(format!("the running bot: {err}"))),
                None => Ok(l),
            }
        })))
    }

    /// Every line of the running bot's answer to `q`, each read by `parse`.
    fn remote_all<T>(
        path: &Path,
        q: &Query,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, OpsError> {
        Self::remote(path, q)?
            .map(|line| line.and_then(|l| parse(&l).map_err(remote_answer)))
            .collect()
    }

    /// Events from `since_seq` on (to `until_seq`), oldest first, streamed.
    pub fn events(
        &self,
        since_seq: u64,
        until_seq: Option<u64>,
    ) -> Box<dyn Iterator<Item = Result<Recorded, OpsError>> + '_> {
        let until = until_seq.unwrap_or(u64::MAX);
        match self {
            Source::Local(store) => events_in(store, since_seq, until),
            Source::Loaded(store) => events_in(store.as_ref(), since_seq, until),
            Source::Remote(path) => match Self::remote(
                path,
                &Query::Events {
                    since_seq,
                    until_seq,
                },
            ) {
                Ok(lines) => Box::new(
                    lines.map(|l| l.and_then(|l| parse_event_line(&l).map_err(remote_answer))),
                ),
                Err(e) => Box::new(std::iter::once(Err(e))),
            },
        }
    }

    /// `audit list`.
    ///
    /// # Errors
    /// A read error.
    pub fn list(&self, filter: &Filter) -> Result<Vec<RequestRecord>, OpsError> {
        match self {
            Source::Local(store) => list_in(store, filter),
            Source::Loaded(store) => list_in(store.as_ref(), filter),
            Source::Remote(path) => {
                let query = Query::List {
                    filter: filter.clone(),
                };
                Self::remote_all(path, &query, |l| {
                    serde_json::from_str(l).map_err(|e| e.to_string())
                })
            }
        }
    }

    /// Ids starting with `prefix`.
    ///
    /// # Errors
    /// A bad prefix or a read error.
    pub fn find(&self, prefix: &str) -> Result<Vec<RequestId>, OpsError> {
        match self {
            Source::Local(store) => query::find(store, prefix),
            Source::Loaded(store) => query::find(store.as_ref(), prefix),
            Source::Remote(path) => {
                let query = Query::Find {
                    prefix: prefix.to_owned(),
                };
                Self::remote_all(path, &query, |l| {
                    l.parse()
                        .map(RequestId)
                        .map_err(|_| format!("a bad id {l}"))
                })
            }
        }
    }

    /// One request's events.
    ///
    /// # Errors
    /// A read error.
    pub fn show(&self, id: RequestId) -> Result<Vec<Recorded>, OpsError> {
        match self {
            Source::Local(store) => show_in(store, id),
            Source::Loaded(store) => show_in(store.as_ref(), id),
            Source::Remote(path) => Self::remote_all(path, &Query::Show { id }, parse_event_line),
        }
    }
}

/// The events of a store read here, `since_seq` to `until` (the local
/// sled log, or a PostgreSQL log's records loaded into memory).
fn events_in<S: EventStore>(
    store: &S,
    since_seq: u64,
    until: u64,
) -> Box<dyn Iterator<Item = Result<Recorded, OpsError>> + '_> {
    Box::new(
        store
            .read_from(since_seq)
            .take_while(move |r| r.as_ref().map_or(true, |r| r.seq <= until))
            .map(|r| r.map_err(|e| OpsError::Failed(e.to_string()))),
    )
}

fn list_in<S: EventStore>(store: &S, filter: &Filter) -> Result<Vec<RequestRecord>, OpsError> {
    query::list(store, filter)
        .map(|r| r.map_err(OpsError::Store))
        .collect()
}

fn show_in<S: EventStore>(store: &S, id: RequestId) -> Result<Vec<Recorded>, OpsError> {
    Ok(store
        .events_of(id)?
        .into_iter()
        .filter_map(Result::ok)
        .collect())
}

/// A line of the running bot's answer that could not be read.
fn remote_answer(problem: String) -> OpsError {
    OpsError::Remote(format!("the running bot's answer: {problem}"))
}
