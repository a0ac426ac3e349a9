//! The running bot's read-only query socket: `<data dir>/easel.sock`, mode
//! 0600. One JSON line in (a [`Query`]), JSON lines out (or one `ERR …`
//! line). Reads run on blocking threads against sled, which never makes
//! the bot's appends wait; nothing here writes to the log.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::json::event_line;
use super::query::{self, Query};
use crate::engine::Core;
use crate::store::EventStore;
use tokio_util::sync::CancellationToken;

/// Binds the query socket at `path` (owner-only), replacing a stale one.
///
/// # Errors
/// When the socket cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // A socket left by a killed bot is stale: nobody else can hold this
    // data dir while we hold its lock.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The longest query line read; a query is a few hundred bytes.
const MAX_QUERY_BYTES: u64 = 64 * 1024;
/// How long a client may take to send its query line.
const QUERY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers queries on `listener` until `shutdown`; then removes the
/// socket file at `path`.
pub async fn serve<S: EventStore>(
    core: Arc<Core<S>>,
    listener: UnixListener,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    // The clients' tasks end with the engine (dropping the set aborts
    // them): each holds the core, and so the log's lock, which a restart
    // after a refused write must be able to take again.
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    clients.spawn(answer(Arc::clone(&core), stream));
                }
                Err(e) => tracing::warn!(error = %e, "query socket accept failed"),
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
    clients.shutdown().await;
    remove(&path);
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

async fn answer<S: EventStore>(core: Arc<Core<S>>, stream: tokio::net::UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_QUERY_BYTES));
    match tokio::time::timeout(QUERY_WAIT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) if line.ends_with('\n') => {}
        Ok(Ok(_)) if line.len() as u64 >= MAX_QUERY_BYTES => {
            let _ = write.write_all(b"ERR the query is too long\n").await;
            return;
        }
        // Closed early, unreadable or too slow: nothing to answer.
        _ => return,
    }
    let query: Query = match serde_json::from_str(&line) {
        Ok(q) => q,
        Err(e) => {
            let _ = write
                .write_all(format!("ERR not a query: {e}\n").as_bytes())
                .await;
            return;
        }
    };
    // Bounded: a slow reader slows only its own blocking thread.
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    let worker = tokio::task::spawn_blocking(move || produce(&core, &query, &tx));
    while let Some(l) = rx.recv().await {
        if write.write_all(l.as_bytes()).await.is_err() {
            break;
        }
    }
    drop(rx);
    let _ = worker.await;
    let _ = write.shutdown().await;
}

fn produce<S: EventStore>(core: &Core<S>, query: &Query, tx: &mpsc::Sender<String>) {
    let store = core.store();
    let send = |s: String| tx.blocking_send(s + "\n").is_ok();
    // Every answer line is one JSON value, or `ERR <sentence>`.
    let line = |json: Result<String, serde_json::Error>| {
        json.unwrap_or_else(|e| format!("ERR cannot word the answer: {e}"))
    };
    match query {
        Query::Events {
            since_seq,
            until_seq,
        } => {
            let until = until_seq.unwrap_or(u64::MAX);
            for item in store.read_from(*since_seq) {
                let Ok(rec) = item else { continue };
                if rec.seq > until || !send(line(event_line(&rec))) {
                    return;
                }
            }
        }
        Query::List { filter } => {
            for item in query::list(store, filter) {
                let line = match item {
                    Ok(r) => line(serde_json::to_string(&r)),
                    Err(e) => format!("ERR {e}"),
                };
                if !send(line) {
                    return;
                }
            }
        }
        Query::Find { prefix } => match query::find(store, prefix) {
            Ok(ids) => {
                for id in ids {
                    if !send(id.to_string()) {
                        return;
                    }
                }
            }
            Err(e) => {
                send(format!("ERR {e}"));
            }
        },
        Query::Show { id } => match store.events_of(*id) {
            Ok(events) => {
                for rec in events.into_iter().filter_map(Result::ok) {
                    if !send(line(event_line(&rec))) {
                        return;
                    }
                }
            }
            Err(e) => {
                send(format!("ERR {e}"));
            }
        },
    }
}
