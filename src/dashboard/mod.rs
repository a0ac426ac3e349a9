//! The operator dashboard (§7, `EASEL_DASHBOARD_TOKEN`): a read-only web
//! page at `/` of `EASEL_METRICS_ADDR` — each model's in-flight request
//! and queue, pushed live by server-sent events from the log's
//! subscription; recent requests with a link to each one's timeline; and
//! charts of queue depth and stage latency, rendered here as SVG. It reads
//! projections only and never writes; with nobody looking it does no work
//! (a client's event stream is its own subscription, and every page is
//! computed when asked for).
//!
//! Access: the token is asked for once (a form) and kept in an
//! `HttpOnly`, `SameSite=Strict` cookie, or sent by a script as
//! `Authorization: Bearer <token>`; compared in constant time; `401`
//! otherwise. Every page carries a `Content-Security-Policy` that allows
//! the page's own script and style only.

mod page;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::domain::{ModelName, Stage};
use crate::engine::Engine;
use crate::projection::RequestRecord;
use crate::store::{EventStore, Recorded};

/// The cookie that keeps the token.
const COOKIE: &str = "easel_dashboard";

/// How far back the charts and the recent list look.
pub const WINDOW_HOURS: i64 = 6;

/// Requests the recent list shows.
const RECENT: usize = 50;

/// The least time between two pushes of the queue panel to one client.
const PUSH_EVERY: Duration = Duration::from_millis(200);

/// One model's lane as the page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneView {
    pub model: String,
    /// The in-flight request: short id, stage, since when.
    pub in_flight: Option<(String, Stage, DateTime<Utc>)>,
    pub queued: usize,
    /// When the oldest waiting request was queued.
    pub oldest: Option<DateTime<Utc>>,
}

/// What the dashboard reads: an engine's projections (the single
/// process's core, or a replica's view of the database's log).
pub trait Board: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Every configured model's lane, and any other model with requests.
    fn lanes(&self) -> Vec<LaneView>;
    /// Requests created since `since`, newest first, at most `limit`.
    fn recent(&self, since: DateTime<Utc>, limit: usize) -> Vec<RequestRecord>;
    /// The request whose id starts with `prefix` (exactly one), with its
    /// events.
    fn request(&self, prefix: &str) -> Option<(RequestRecord, Vec<Recorded>)>;
    /// Changes whenever the log grows.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// A [`Board`] over an engine, held weakly: an engine that stopped (the
/// self-heal after refused writes drops it to reopen the log, whose lock
/// it holds) is not kept alive by the dashboard; its board then shows
/// nothing until the next engine's is set.
pub struct EngineBoard<E> {
    engine: std::sync::Weak<E>,
    models: Vec<ModelName>,
}

impl<E: Engine> EngineBoard<E> {
    pub fn new(engine: &Arc<E>, models: Vec<ModelName>) -> Self {
        EngineBoard {
            engine: Arc::downgrade(engine),
            models,
        }
    }
}

impl<E: Engine> Board for EngineBoard<E> {
    fn now(&self) -> DateTime<Utc> {
        self.engine.upgrade().map_or_else(Utc::now, |e| e.now())
    }

    fn lanes(&self) -> Vec<LaneView> {
        let Some(engine) = self.engine.upgrade() else {
            return Vec::new();
        };
        engine.read(|s| {
            let mut names: Vec<ModelName> = self.models.clone();
            for (m, _) in s.lanes() {
                if !names.contains(m) {
                    names.push(m.clone());
                }
            }
            names
                .into_iter()
                .map(|m| {
                    let lane = s.lane(&m);
                    let in_flight = lane.and_then(|l| l.in_flight).and_then(|id| {
                        let r = s.request(id)?;
                        Some((id.short(), r.stage, r.started_at.unwrap_or(r.queued_at)))
                    });
                    let queued = lane.map_or(0, |l| l.queue.len());
                    let oldest = lane
                        .and_then(|l| l.queue.head())
                        .and_then(|id| s.request(id))
                        .map(|r| r.queued_at);
                    LaneView {
                        model: m.to_string(),
                        in_flight,
                        queued,
                        oldest,
                    }
                })
                .collect()
        })
    }

    fn recent(&self, since: DateTime<Utc>, limit: usize) -> Vec<RequestRecord> {
        let Some(engine) = self.engine.upgrade() else {
            return Vec::new();
        };
        let store = engine.store();
        store
            .request_ids(None, Some(since), None, true)
            .filter_map(Result::ok)
            .filter_map(|id| crate::ops::query::record_of(store, id).ok().flatten())
            .map(|(r, _)| r)
            .take(limit)
            .collect()
    }

    fn request(&self, prefix: &str) -> Option<(RequestRecord, Vec<Recorded>)> {
        let engine = self.engine.upgrade()?;
        let store = engine.store();
        match crate::ops::query::find(store, prefix).ok()?.as_slice() {
            [id] => crate::ops::query::record_of(store, *id).ok().flatten(),
            _ => None,
        }
    }

    /// Ends (its sender gone) when the engine has stopped.
    fn changes(&self) -> watch::Receiver<u64> {
        match self.engine.upgrade() {
            Some(engine) => engine.store().subscribe(),
            None => watch::channel(0).1,
        }
    }
}

/// Where the running engine's board is: set at every engine start (the
/// listener outlives engine restarts); empty while none runs.
pub type BoardSlot = Arc<RwLock<Option<Arc<dyn Board>>>>;

#[derive(Clone)]
struct Shared {
    token: SecretString,
    slot: BoardSlot,
}

impl Shared {
    fn board(&self) -> Option<Arc<dyn Board>> {
        self.slot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the request carries the token, in the cookie or as a
    /// bearer token; compared in constant time.
    fn allowed(&self, headers: &HeaderMap) -> bool {
        let given = bearer(headers).or_else(|| cookie(headers));
        given.is_some_and(|g| self.matches(g))
    }

    fn matches(&self, given: &str) -> bool {
        bool::from(
            given
                .as_bytes()
                .ct_eq(self.token.expose_secret().as_bytes()),
        )
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The dashboard's routes (merged into the metrics listener's).
pub fn router(token: SecretString, slot: BoardSlot) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/requests/{prefix}", get(request))
        .route("/live", get(live))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
        .with_state(Shared { token, slot })
}

/// The headers every dashboard answer carries.
fn guarded(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const HTML: &str = "text/html; charset=utf-8";

fn unauthorized(wrong: bool) -> Response {
    guarded(StatusCode::UNAUTHORIZED, HTML, page::login(wrong))
}

async fn index(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !s.allowed(&headers) {
        return unauthorized(false);
    }
    let Some(board) = s.board() else {
        return guarded(StatusCode::SERVICE_UNAVAILABLE, HTML, page::starting());
    };
    let now = board.now();
    let since = now - chrono::Duration::hours(WINDOW_HOURS);
    let lanes = board.lanes();
    let window = board.recent(since, usize::MAX);
    guarded(
        StatusCode::OK,
        HTML,
        page::index(now, &lanes, &window, RECENT),
    )
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

async fn login(State(s): State<Shared>, Form(form): Form<Login>) -> Response {
    if !s.matches(form.token.trim()) {
        return unauthorized(true);
    }
    let mut r = Redirect::to("/").into_response();
    // The token itself: the cookie is the credential, kept from scripts
    // (HttpOnly) and from other sites' requests (SameSite=Strict).
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        form.token.trim()
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn request(
    State(s): State<Shared>,
    Path(prefix): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !s.allowed(&headers) {
        return unauthorized(false);
    }
    let Some(board) = s.board() else {
        return guarded(StatusCode::SERVICE_UNAVAILABLE, HTML, page::starting());
    };
    match board.request(&prefix) {
        Some((record, events)) => guarded(StatusCode::OK, HTML, page::timeline(&record, &events)),
        None => guarded(StatusCode::NOT_FOUND, HTML, page::not_found(&prefix)),
    }
}

/// The queue panel, pushed as an HTML fragment (`event: lanes`) at once
/// and whenever the log grows (at most every [`PUSH_EVERY`]).
async fn live(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !s.allowed(&headers) {
        return unauthorized(false);
    }
    let Some(board) = s.board() else {
        return guarded(StatusCode::SERVICE_UNAVAILABLE, HTML, page::starting());
    };
    let changes = board.changes();
    let stream = futures_util::stream::unfold(
        (board, changes, true),
        |(board, mut changes, first)| async move {
            if !first {
                changes.changed().await.ok()?;
                tokio::time::sleep(PUSH_EVERY).await;
            }
            changes.borrow_and_update();
            let panel = page::lanes_panel(board.now(), &board.lanes());
            let event = SseEvent::default().event("lanes").data(panel);
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (board, changes, false),
            ))
        },
    );
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn script() -> Response {
    guarded(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        page::SCRIPT.to_owned(),
    )
}

async fn style() -> Response {
    guarded(
        StatusCode::OK,
        "text/css; charset=utf-8",
        page::STYLE.to_owned(),
    )
}

/// When `r` waited in its queue: from its creation to its start (or its
/// end, if it ended waiting), or until `now` while it still waits.
fn waited(r: &RequestRecord, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let end = match r.stage_ms.iter().find(|(k, _)| *k == "queue_wait") {
        Some((_, ms)) => r.created_at + chrono::Duration::milliseconds(*ms),
        None if r.status.is_terminal() => r.updated_at,
        None if r.status == Stage::Queued => now,
        // Started, but the wait was not timed (an old record): none.
        None => r.created_at,
    };
    (r.created_at, end)
}
