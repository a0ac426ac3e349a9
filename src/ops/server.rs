//! The running bot's read-only query socket: `<data dir>/easel.sock`, mode
//! 0600. One JSON line in (a [`Query`]), JSON lines out (or one `ERR …`
//! line). Reads run on blocking threads against sled, which never makes
//! the bot's appends wait; nothing here writes to the log.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use super::json::event_json;
use super::query::{self, Query};
use crate::engine::Core;
use crate::store::{EventStore, SledStore};

/// Starts serving; the socket file is removed when serving stops.
///
/// # Errors
/// When the socket cannot be bound.
pub fn spawn(
    core: Arc<Core<SledStore>>,
    path: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // A socket left by a killed bot is stale: nobody else can hold this
    // data dir while we hold its lock.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(serve(core, listener, path, shutdown)))
}

async fn serve(
    core: Arc<Core<SledStore>>,
    listener: UnixListener,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(Arc::clone(&core), stream));
                }
                Err(e) => tracing::warn!(error = %e, "query socket accept failed"),
            }
        }
    }
    remove(&path);
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

async fn answer(core: Arc<Core<SledStore>>, stream: tokio::net::UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
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

fn produce(core: &Core<SledStore>, query: &Query, tx: &mpsc::Sender<String>) {
    let store = core.store();
    let send = |s: String| tx.blocking_send(s + "\n").is_ok();
    match query {
        Query::Events {
            since_seq,
            until_seq,
        } => {
            let until = until_seq.unwrap_or(u64::MAX);
            for item in store.read_from(*since_seq) {
                let Ok(rec) = item else { continue };
                if rec.seq > until || !send(event_json(&rec).to_string()) {
                    return;
                }
            }
        }
        Query::List { filter } => {
            for item in query::list(store, filter) {
                let line = match item {
                    Ok(r) => serde_json::to_string(&r).unwrap_or_default(),
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
                    if !send(event_json(&rec).to_string()) {
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
