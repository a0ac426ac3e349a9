//! The operator's HTTP listener on `EASEL_METRICS_ADDR` (§7): health and
//! readiness (what `GET /healthz` and `GET /readyz` answer) and the route
//! to `GET /metrics` ([`crate::metrics`]). `Health` is fed by the parts that know — the
//! run loop (the event log takes writes, an engine is up) and the Telegram
//! client (its last call got an answer) — and read by the listener.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// One thing readiness depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The event log takes writes.
    Log,
    /// An engine runs (not starting, not restarting after a broken log).
    Engine,
    /// The last Telegram call got an answer.
    Telegram,
}

/// What is wrong now, per part; ready when nothing is.
#[derive(Debug)]
pub struct Health {
    problems: Mutex<[Option<String>; 3]>,
}

impl Default for Health {
    /// Not ready until an engine started and Telegram answered.
    fn default() -> Self {
        Health {
            problems: Mutex::new([
                None,
                Some("starting".into()),
                Some("Telegram has not answered yet".into()),
            ]),
        }
    }
}

impl Health {
    /// Sets (or clears, with None) what is wrong with `part`.
    pub fn set(&self, part: Part, problem: Option<String>) {
        self.lock()[part as usize] = problem;
    }

    /// Ok when ready; else the first problem, in the order log, engine,
    /// Telegram (one line for `/readyz`).
    ///
    /// # Errors
    /// The reason it is not ready.
    pub fn ready(&self) -> Result<(), String> {
        match self.lock().iter().flatten().next() {
            None => Ok(()),
            Some(problem) => Err(problem.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<String>; 3]> {
        self.problems.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The routes: `/healthz` (200 while the process runs), `/readyz` (200,
/// or 503 with the reason) and `/metrics` (Prometheus). No
/// authentication: bind it to a private address (docs/operations.md).
pub fn router(health: Arc<Health>, metrics: Arc<crate::metrics::Metrics>) -> Router {
    let scrape = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<crate::metrics::Metrics>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        crate::metrics::CONTENT_TYPE,
                    )],
                    m.render(),
                )
            }),
        )
        .with_state(metrics);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                match h.ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .with_state(health)
        .merge(scrape)
}

/// Binds `addr` (before the bot starts, so a bad address stops the start
/// with one sentence) and serves [`router`] — and the operator dashboard
/// when given — until `shutdown`.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<crate::metrics::Metrics>,
    dashboard: Option<Router>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "health and metrics endpoints listening");
    let routes = match dashboard {
        Some(d) => router(health, metrics).merge(d),
        None => router(health, metrics),
    };
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, routes)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the health listener stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::{Health, Part};

    #[test]
    fn ready_only_when_nothing_is_wrong_and_the_log_comes_first() {
        let h = Health::default();
        assert_eq!(h.ready(), Err("starting".into()));
        h.set(Part::Engine, None);
        assert_eq!(h.ready(), Err("Telegram has not answered yet".into()));
        h.set(Part::Telegram, None);
        assert_eq!(h.ready(), Ok(()));
        h.set(Part::Telegram, Some("Telegram unreachable".into()));
        h.set(
            Part::Log,
            Some("the event log refuses writes: disk full".into()),
        );
        assert_eq!(
            h.ready(),
            Err("the event log refuses writes: disk full".into())
        );
        h.set(Part::Log, None);
        assert_eq!(h.ready(), Err("Telegram unreachable".into()));
    }
}
