//! Where the operator commands read from: the data dir's log directly when
//! no bot holds it, or else the running bot's read-only Unix socket
//! (`<data dir>/easel.sock`, owner-only). sled allows one process per
//! database, so a CLI beside a running bot asks the bot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::json::parse_event_line;
use super::query::{self, Filter, Query};
use crate::config::DataDir;
use crate::domain::RequestId;
use crate::projection::RequestRecord;
use crate::store::{EventStore, Recorded, SledStore};

/// Why a source could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Bad usage or a missing data dir: exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

pub enum Source {
    Local(SledStore),
    Remote(PathBuf),
}

type Lines = Box<dyn Iterator<Item = Result<String, String>>>;

impl Source {
    /// Opens the data dir's log, or the bot's socket when the log is busy.
    ///
    /// # Errors
    /// [`SourceError::Usage`] when there is no log there.
    pub fn open(data_dir: &DataDir) -> Result<Self, SourceError> {
        let log = data_dir.log();
        if !SledStore::exists(&log) {
            return Err(SourceError::Usage(format!(
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
            Err(e) => Err(SourceError::Failed(format!(
                "the event log in {data_dir} is in use and no running bot answers on {} ({e})",
                socket.display()
            ))),
        }
    }

    fn remote(path: &Path, q: &Query) -> Result<Lines, String> {
        let mut stream =
            UnixStream::connect(path).map_err(|e| format!("cannot reach the running bot: {e}"))?;
        let mut line = serde_json::to_string(q).map_err(|e| e.to_string())?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot ask the running bot: {e}"))?;
        let reader = BufReader::new(stream);
        Ok(Box::new(reader.lines().map(|l| {
            let l = l.map_err(|e| format!("the running bot's answer broke off: {e}"))?;
            match l.strip_prefix("ERR ") {
                Some(err) => Err(err.to_owned()),
                None => Ok(l),
            }
        })))
    }

    /// Events from `since_seq` on (to `until_seq`), oldest first, streamed.
    pub fn events(
        &self,
        since_seq: u64,
        until_seq: Option<u64>,
    ) -> Box<dyn Iterator<Item = Result<Recorded, String>> + '_> {
        let until = until_seq.unwrap_or(u64::MAX);
        match self {
            Source::Local(store) => Box::new(
                store
                    .read_from(since_seq)
                    .take_while(move |r| r.as_ref().map_or(true, |r| r.seq <= until))
                    .map(|r| r.map_err(|e| e.to_string())),
            ),
            Source::Remote(path) => match Self::remote(
                path,
                &Query::Events {
                    since_seq,
                    until_seq,
                },
            ) {
                Ok(lines) => Box::new(lines.map(|l| l.and_then(|l| parse_event_line(&l)))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            },
        }
    }

    /// `audit list`.
    ///
    /// # Errors
    /// A read error.
    pub fn list(&self, filter: &Filter) -> Result<Vec<RequestRecord>, String> {
        match self {
            Source::Local(store) => query::list(store, filter)
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            Source::Remote(path) => Self::remote(
                path,
                &Query::List {
                    filter: filter.clone(),
                },
            )?
            .map(|l| l.and_then(|l| serde_json::from_str(&l).map_err(|e| e.to_string())))
            .collect(),
        }
    }

    /// Ids starting with `prefix`.
    ///
    /// # Errors
    /// A bad prefix or a read error.
    pub fn find(&self, prefix: &str) -> Result<Vec<RequestId>, String> {
        match self {
            Source::Local(store) => query::find(store, prefix),
            Source::Remote(path) => Self::remote(
                path,
                &Query::Find {
                    prefix: prefix.to_owned(),
                },
            )?
            .map(|l| l.and_then(|l| l.parse().map(RequestId).map_err(|_| format!("bad id {l}"))))
            .collect(),
        }
    }

    /// One request's events.
    ///
    /// # Errors
    /// A read error.
    pub fn show(&self, id: RequestId) -> Result<Vec<Recorded>, String> {
        match self {
            Source::Local(store) => Ok(store
                .events_of(id)
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter_map(Result::ok)
                .collect()),
            Source::Remote(path) => Self::remote(path, &Query::Show { id })?
                .map(|l| l.and_then(|l| parse_event_line(&l)))
                .collect(),
        }
    }
}
