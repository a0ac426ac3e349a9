//! FAKE image workers and a FAKE OpenAI-compatible LLM on loopback, speaking
//! the real protocols of §4 over real HTTP (axum). Used by `easel demo` and
//! the tests; never by `easel run`. Their answers depend on the prompt:
//! `nsfw` → the content filter refuses (400 NSFW), `explode` → 500,
//! `slow` → 1.5 s, `held` → until [`FakeWorker::release`] (at most 60 s:
//! a blocker for tests that must not depend on timing), `panorama` → a 12000×200 image (a document), `huge` → an
//! image over 10 MB; anything else → a 64×64 PNG.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;

use super::png::png;

/// An input image a worker call carried, and its strength.
pub type InputSeen = (Vec<u8>, f64);

/// Counters a test can read: calls, and the most calls at once.
pub struct WorkerStats {
    /// Turned true by [`FakeWorker::release`]; `held` prompts wait for it.
    pub released: tokio::sync::watch::Sender<bool>,
    pub calls: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub prompts: std::sync::Mutex<Vec<String>>,
    /// Each call's prompt and when it arrived, for ordering checks against
    /// the fake Telegram's calls (same clock).
    pub calls_at: std::sync::Mutex<Vec<(String, tokio::time::Instant)>>,
    /// Image to image: each call's input image (decoded from the body's
    /// base64 `image`) and `strength`, or None for a text-only call.
    pub inputs: std::sync::Mutex<Vec<Option<InputSeen>>>,
    /// Call numbers (1 = this worker's first call) that wait for
    /// [`FakeWorker::release`], whatever their prompt.
    pub hold_calls: std::sync::Mutex<Vec<usize>>,
    /// Call numbers answered as a content-filter rejection (`400`,
    /// "flagged"), whatever their prompt.
    pub reject_calls: std::sync::Mutex<Vec<usize>>,
    /// While true, an sdxl fake refuses every key (`401`), as a worker
    /// whose key was revoked does.
    pub key_revoked: std::sync::atomic::AtomicBool,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            released: tokio::sync::watch::channel(false).0,
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            prompts: std::sync::Mutex::new(Vec::new()),
            calls_at: std::sync::Mutex::new(Vec::new()),
            inputs: std::sync::Mutex::new(Vec::new()),
            hold_calls: std::sync::Mutex::new(Vec::new()),
            reject_calls: std::sync::Mutex::new(Vec::new()),
            key_revoked: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

struct WorkerState {
    key: Option<String>,
    /// flux answers `{"image": base64}` as Workers AI does; sdxl raw bytes.
    json_answer: bool,
    stats: Arc<WorkerStats>,
    delay: Duration,
}

/// A running fake worker.
pub struct FakeWorker {
    pub url: String,
    pub stats: Arc<WorkerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(router: Router) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((format!("http://{addr}"), task))
}

impl FakeWorker {
    /// Revokes (true) or restores (false) the key an sdxl fake accepts.
    pub fn revoke_key(&self, revoked: bool) {
        self.stats.key_revoked.store(revoked, Ordering::SeqCst);
    }

    /// Lets every `held` prompt, waiting now or later, be answered.
    pub fn release(&self) {
        self.stats.released.send_replace(true);
    }

    /// A flux-style fake (`GET /generate?prompt=`, JSON base64 answer).
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn flux(delay: Duration) -> std::io::Result<Self> {
        Self::start(None, true, delay).await
    }

    /// An sdxl-style fake (`POST /generate` JSON, bearer `key`, raw PNG).
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn sdxl(key: &str, delay: Duration) -> std::io::Result<Self> {
        Self::start(Some(key.to_owned()), false, delay).await
    }

    async fn start(
        key: Option<String>,
        json_answer: bool,
        delay: Duration,
    ) -> std::io::Result<Self> {
        let stats = Arc::new(WorkerStats::default());
        let state = Arc::new(WorkerState {
            key,
            json_answer,
            stats: Arc::clone(&stats),
            delay,
        });
        let router = Router::new()
            .route("/generate", get(flux_get).post(sdxl_post))
            .with_state(state);
        let (url, task) = serve(router).await?;
        Ok(FakeWorker {
            url: format!("{url}/generate"),
            stats,
            task,
        })
    }
}

#[derive(serde::Deserialize)]
struct PromptQuery {
    prompt: Option<String>,
}

async fn flux_get(State(s): State<Arc<WorkerState>>, Query(q): Query<PromptQuery>) -> Response {
    answer(&s, q.prompt.unwrap_or_default()).await
}

async fn sdxl_post(
    State(s): State<Arc<WorkerState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(key) = &s.key {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if auth != format!("Bearer {key}") || s.stats.key_revoked.load(Ordering::SeqCst) {
            return (StatusCode::UNAUTHORIZED, "invalid api key").into_response();
        }
    }
    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let prompt = json
        .as_ref()
        .and_then(|v| v.get("prompt").and_then(|p| p.as_str().map(str::to_owned)));
    // Image to image: `image` (base64) and `strength` travel together.
    let input = match json.as_ref().map(|v| (v.get("image"), v.get("strength"))) {
        Some((Some(image), Some(strength))) => {
            let bytes = image
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            match (bytes, strength.as_f64()) {
                (Some(bytes), Some(s)) if s > 0.0 && s <= 1.0 => Some((bytes, s)),
                _ => {
                    return (StatusCode::BAD_REQUEST, "bad image or strength").into_response();
                }
            }
        }
        Some((None, None)) | None => None,
        Some(_) => {
            return (StatusCode::BAD_REQUEST, "image and strength go together").into_response();
        }
    };
    s.stats
        .inputs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(input);
    match prompt {
        Some(p) => answer(&s, p).await,
        None => (StatusCode::BAD_REQUEST, "expected JSON {\"prompt\": ...}").into_response(),
    }
}

/// Counts a call as in flight until its handler ends or is dropped (the
/// server drops it when the client goes away, as a real worker that stops
/// generating for a vanished client would).
struct InFlight<'a>(&'a WorkerStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(s: &WorkerState, prompt: String) -> Response {
    let stats = &s.stats;
    let call = stats.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let scripted = |list: &std::sync::Mutex<Vec<usize>>| {
        list.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&call)
    };
    let (hold, reject) = (scripted(&stats.hold_calls), scripted(&stats.reject_calls));
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _in_flight = InFlight(stats);
    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
    stats
        .prompts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(prompt.clone());
    stats
        .calls_at
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((prompt.clone(), tokio::time::Instant::now()));
    let lower = prompt.to_lowercase();
    let mut delay = s.delay;
    if lower.contains("slow") {
        delay += Duration::from_millis(1500);
    }
    tokio::time::sleep(delay).await;
    if lower.contains("held") || hold {
        let mut released = stats.released.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(60), released.wait_for(|r| *r)).await;
    }
    if reject {
        (
            StatusCode::BAD_REQUEST,
            "this request was flagged by moderation",
        )
            .into_response()
    } else if lower.contains("nsfw") {
        (
            StatusCode::BAD_REQUEST,
            "{\"errors\":[{\"message\":\"Input prompt contains NSFW content\",\"code\":3030}],\"success\":false}",
        )
            .into_response()
    } else if lower.contains("explode") {
        (StatusCode::INTERNAL_SERVER_ERROR, "worker crashed").into_response()
    } else {
        let seed = lower
            .bytes()
            .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
        let image = if lower.contains("panorama") {
            png(12_000, 200, seed)
        } else if lower.contains("huge") {
            png(2_400, 1_500, seed)
        } else {
            png(64, 64, seed)
        };
        if s.json_answer {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
            axum::Json(serde_json::json!({ "image": b64 })).into_response()
        } else {
            ([("content-type", "image/png")], image).into_response()
        }
    }
}

/// A running fake LLM (`POST /v1/chat/completions`).
pub struct FakeLlm {
    /// The base URL to put in `LLM_API_URL` (ends in `/v1`).
    pub url: String,
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Answers like a chatty model (a label, quotes) so the cleaning shows;
    /// a prompt containing `llm-down` gets a 500.
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        let calls = Arc::new(AtomicUsize::new(0));
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(Arc::clone(&calls));
        let (url, task) = serve(router).await?;
        Ok(FakeLlm {
            url: format!("{url}/v1"),
            calls,
            task,
        })
    }
}

async fn chat(State(calls): State<Arc<AtomicUsize>>, body: axum::body::Bytes) -> Response {
    calls.fetch_add(1, Ordering::SeqCst);
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let user = request["messages"][1]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if user.contains("llm-down") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "model overloaded").into_response();
    }
    let content = format!("Enhanced prompt: \"{user}, highly detailed, soft cinematic light\"");
    axum::Json(serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
    }))
    .into_response()
}
