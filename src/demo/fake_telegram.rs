//! A FAKE Telegram Bot API server on loopback, speaking the real JSON shapes
//! (`{"ok": true, "result": …}`, errors with `error_code`, `description` and
//! `parameters.retry_after`): getMe, getUpdates long polling with offsets,
//! sendMessage, editMessageText ("message is not modified" included),
//! sendPhoto and sendDocument (multipart), answerCallbackQuery,
//! setMyCommands. It records every call so tests and the demo can check
//! what users saw and how fast the bot called.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// The bot's identity in the fake.
pub const BOT_ID: u64 = 4242;
pub const BOT_USERNAME: &str = "easel_demo_bot";

/// One Bot API call the bot made.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub chat_id: Option<i64>,
    /// The message created or edited.
    pub message_id: Option<i32>,
    pub text: Option<String>,
    pub caption: Option<String>,
    /// Size of an uploaded photo or document.
    pub file_len: Option<usize>,
    pub reply_markup: Option<Value>,
    /// Every parameter of the call as received (e.g. `commands` and
    /// `language_code` of setMyCommands); empty for a failed call.
    pub params: HashMap<String, Value>,
    pub at: Instant,
}

/// A failure to answer the next call(s) of a method with.
#[derive(Clone, Debug)]
pub enum Failure {
    /// 429 with `parameters.retry_after`.
    RetryAfter(u32),
    /// Any other error status and description.
    Status(u16, String),
    /// The connection is cut while the request body is still arriving
    /// (after at most 64 KiB of it): the client sees a reset, not an answer.
    Reset,
}

#[derive(Default)]
struct Inner {
    pending: Vec<Value>,
    next_update_id: u32,
    next_message_id: i32,
    calls: Vec<Call>,
    /// Current text (or caption) of each message, for "not modified".
    messages: HashMap<(i64, i32), String>,
    failures: HashMap<String, VecDeque<Failure>>,
    token: String,
    history: HashMap<u32, Value>,
    /// Added to every answer except getUpdates.
    delay: Duration,
    /// The Telegram `language_code` of users who have one.
    languages: HashMap<i64, String>,
    /// Files users sent, by `file_id` (getFile and the file download).
    files: HashMap<String, Vec<u8>>,
    /// The photo of each message that has one, for replies to it.
    photos: HashMap<(i64, i32), Value>,
    /// The registered webhook, as Telegram keeps it (setWebhook).
    webhook: Option<Webhook>,
}

/// A webhook registered with the fake: what `setWebhook` was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub secret_token: Option<String>,
    pub max_connections: u32,
    pub allowed_updates: Vec<String>,
}

struct Shared {
    /// Calls being answered now (getUpdates excluded), and the most at once.
    concurrent: std::sync::atomic::AtomicUsize,
    max_concurrent: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
    /// Bumped whenever an update is queued, to wake long polls.
    updates: watch::Sender<u64>,
}

/// A running fake Bot API server.
pub struct FakeTelegram {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ok(result: Value) -> Response {
    axum::Json(json!({ "ok": true, "result": result })).into_response()
}

fn error(status: u16, description: &str, retry_after: Option<u32>) -> Response {
    let mut body = json!({ "ok": false, "error_code": status, "description": description });
    if let Some(secs) = retry_after {
        body["parameters"] = json!({ "retry_after": secs });
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        axum::Json(body),
    )
        .into_response()
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn chat_json(chat: i64) -> Value {
    if chat < 0 {
        json!({ "id": chat, "type": "supergroup", "title": "easel group" })
    } else {
        json!({ "id": chat, "type": "private", "first_name": format!("user{chat}") })
    }
}

fn user_json(inner: &Inner, user: i64) -> Value {
    let mut from = json!({ "id": user, "is_bot": false, "first_name": format!("user{user}") });
    if let Some(code) = inner.languages.get(&user) {
        from["language_code"] = json!(code);
    }
    from
}

fn bot_user() -> Value {
    json!({ "id": BOT_ID, "is_bot": true, "first_name": "easel", "username": BOT_USERNAME })
}

impl FakeTelegram {
    /// Starts the fake; `token` is the only one it accepts.
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start(token: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            concurrent: std::sync::atomic::AtomicUsize::new(0),
            max_concurrent: std::sync::atomic::AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                next_update_id: 100_000,
                next_message_id: 1,
                token: token.to_owned(),
                ..Inner::default()
            }),
            updates: watch::channel(0).0,
        });
        let router = Router::new()
            .fallback(handle)
            // Uploads up to Telegram's own limit for bots (50 MB), not
            // axum's 2 MB default.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeTelegram {
            url: format!("http://{addr}"),
            shared,
            task,
        })
    }

    /// Takes the updates waiting (as Telegram hands them to a webhook),
    /// for a test to POST to the bot's webhook route itself.
    pub fn take_updates(&self) -> Vec<Value> {
        std::mem::take(&mut self.lock().pending)
    }

    /// The webhook registered now, if any.
    pub fn webhook(&self) -> Option<Webhook> {
        self.lock().webhook.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn push_update(&self, make: impl FnOnce(u32, &mut Inner) -> Value) -> u32 {
        let id = {
            let mut inner = self.lock();
            inner.next_update_id += 1;
            let id = inner.next_update_id;
            let update = make(id, &mut inner);
            inner.history.insert(id, update.clone());
            inner.pending.push(update);
            id
        };
        self.shared.updates.send_modify(|v| *v += 1);
        id
    }

    /// User `user` writes `text` in `chat` (a private chat when equal).
    /// Returns (update id, message id).
    pub fn user_sends(&self, user: i64, chat: i64, text: &str) -> (u32, i32) {
        self.user_message(user, chat, |_, _, message| message["text"] = json!(text))
    }

    /// User `user` sends a photo (`bytes`) with `caption` in `chat`, as
    /// Telegram does: the sizes it made, smallest first, each with its own
    /// `file_id` (here all the same bytes, the largest declared as
    /// `declared_size` bytes). Returns (update id, message id).
    pub fn user_sends_photo(
        &self,
        user: i64,
        chat: i64,
        caption: Option<&str>,
        bytes: &[u8],
        declared_size: usize,
    ) -> (u32, i32) {
        self.user_message(user, chat, |inner, message_id, message| {
            let small = format!("photo{message_id}s");
            let large = format!("photo{message_id}l");
            inner.files.insert(small.clone(), bytes.to_vec());
            inner.files.insert(large.clone(), bytes.to_vec());
            let photo = json!([
                { "file_id": small, "file_unique_id": format!("u{small}"), "width": 90, "height": 90, "file_size": bytes.len() },
                { "file_id": large, "file_unique_id": format!("u{large}"), "width": 1024, "height": 1024, "file_size": declared_size },
            ]);
            inner.photos.insert((chat, message_id), photo.clone());
            message["photo"] = photo;
            if let Some(c) = caption {
                message["caption"] = json!(c);
            }
        })
    }

    /// User `user` answers message `to` (a photo of theirs, say) with `text`.
    pub fn user_replies(&self, user: i64, chat: i64, to: i32, text: &str) -> (u32, i32) {
        self.user_message(user, chat, |inner, _, message| {
            let mut replied = json!({
                "message_id": to,
                "date": now_unix(),
                "chat": chat_json(chat),
                "from": user_json(inner, user),
            });
            if let Some(photo) = inner.photos.get(&(chat, to)) {
                replied["photo"] = photo.clone();
            }
            message["text"] = json!(text);
            message["reply_to_message"] = replied;
        })
    }

    /// A new message of user `user` in `chat` as an update: its id, date,
    /// chat and sender, then what `fill` adds (text, photo, caption, …).
    /// Returns (update id, message id).
    fn user_message(
        &self,
        user: i64,
        chat: i64,
        fill: impl FnOnce(&mut Inner, i32, &mut Value),
    ) -> (u32, i32) {
        let mut message_id = 0;
        let update_id = self.push_update(|id, inner| {
            inner.next_message_id += 1;
            message_id = inner.next_message_id;
            let mut message = json!({
                "message_id": message_id,
                "date": now_unix(),
                "chat": chat_json(chat),
                "from": user_json(inner, user),
            });
            fill(inner, message_id, &mut message);
            json!({ "update_id": id, "message": message })
        });
        (update_id, message_id)
    }

    /// Sends the exact same update again (Telegram's at-least-once
    /// delivery). It is only seen by a poll whose offset does not yet
    /// confirm it, as with the real server.
    pub fn redeliver(&self, update_id: u32) -> bool {
        let update = self.lock().history.get(&update_id).cloned();
        let Some(update) = update else { return false };
        self.lock().pending.push(update);
        self.shared.updates.send_modify(|v| *v += 1);
        true
    }

    /// The same message (same chat and message id) under a new update id.
    pub fn redeliver_as_new_update(&self, update_id: u32) -> Option<u32> {
        let update = self.lock().history.get(&update_id).cloned()?;
        Some(self.push_update(|id, _| {
            let mut u = update;
            u["update_id"] = json!(id);
            u
        }))
    }

    /// User `user` presses a button with `data` under message `message_id`.
    pub fn user_presses(&self, user: i64, chat: i64, message_id: i32, data: &str) -> u32 {
        self.push_update(|id, inner| {
            json!({
                "update_id": id,
                "callback_query": {
                    "id": format!("cb{id}"),
                    "from": user_json(inner, user),
                    "message": {
                        "message_id": message_id,
                        "date": now_unix(),
                        "chat": chat_json(chat),
                        "from": bot_user(),
                        "text": "image",
                    },
                    "chat_instance": "fake",
                    "data": data,
                }
            })
        })
    }

    /// From now on user `user`'s Telegram app is set to `code` (sent as
    /// `language_code` with everything the user does, as Telegram does).
    pub fn set_language(&self, user: i64, code: &str) {
        self.lock().languages.insert(user, code.to_owned());
    }

    /// Every answer (except getUpdates) waits this long, like a slow link.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The next `times` calls of `method` fail with `failure`.
    pub fn fail_next(&self, method: &str, times: usize, failure: Failure) {
        let mut inner = self.lock();
        let queue = inner.failures.entry(method.to_owned()).or_default();
        for _ in 0..times {
            queue.push_back(failure.clone());
        }
    }

    /// Whether the bot has confirmed `update_id` (polled past it), i.e.
    /// handled it: the bot moves its offset only after handling a batch.
    pub fn confirmed(&self, update_id: u32) -> bool {
        !self
            .lock()
            .pending
            .iter()
            .any(|u| u["update_id"].as_u64() == Some(u64::from(update_id)))
    }

    /// Updates not yet confirmed by the bot's polling.
    pub fn pending_updates(&self) -> usize {
        self.lock().pending.len()
    }

    /// The most calls the bot made within any one second (failed ones too).
    pub fn max_calls_in_one_second(&self) -> usize {
        let calls = self.calls();
        (0..calls.len())
            .map(|i| {
                calls[i..]
                    .iter()
                    .take_while(|d| d.at.duration_since(calls[i].at) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// The most calls (other than getUpdates) the bot had open at once.
    pub fn max_concurrent_calls(&self) -> usize {
        self.shared
            .max_concurrent
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Texts sent to `chat` with sendMessage, in order.
    pub fn texts_to(&self, chat: i64) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "sendMessage" && c.chat_id == Some(chat))
            .filter_map(|c| c.text)
            .collect()
    }

    /// The current text of a message (after edits).
    pub fn message_text(&self, chat: i64, message_id: i32) -> Option<String> {
        self.lock().messages.get(&(chat, message_id)).cloned()
    }

    /// Waits until `check` holds for the calls, up to `deadline`.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        mut check: impl FnMut(&[Call]) -> bool,
    ) -> bool {
        let until = Instant::now() + deadline;
        loop {
            if check(&self.lock().calls) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads the call's parameters (query string, then a JSON or multipart
/// body) with axum's extractors; a file part counts only by its length.
async fn params(req: Request) -> (HashMap<String, Value>, Option<usize>) {
    use axum::extract::{FromRequest, Multipart, Query};
    let mut out: HashMap<String, Value> = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|Query(pairs)| {
            pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect()
        })
        .unwrap_or_default();
    let mut file_len = None;
    let multipart = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("multipart/form-data"));
    if multipart {
        let Ok(mut form) = Multipart::from_request(req, &()).await else {
            return (out, file_len);
        };
        while let Ok(Some(field)) = form.next_field().await {
            let name = field.name().unwrap_or_default().to_owned();
            let is_file = field.file_name().is_some();
            let Ok(bytes) = field.bytes().await else {
                break;
            };
            if is_file {
                file_len = Some(bytes.len());
            } else {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                out.insert(
                    name,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                );
            }
        }
    } else if let Ok(bytes) = axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024).await
        && let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes)
    {
        out.extend(map);
    }
    (out, file_len)
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn as_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Counts a call as open until its answer is built (or the handler is dropped).
struct Open<'a>(&'a Shared);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0
            .concurrent
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let counted = !req.uri().path().ends_with("etUpdates");
    let _open = counted.then(|| {
        let now = shared
            .concurrent
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        shared
            .max_concurrent
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        Open(&shared)
    });
    // A slow server makes the bot's concurrency visible.
    let delay = shared
        .inner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .delay;
    if counted && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = percent_decode(req.uri().path());
    // A file download: `/file/bot<token>/<file_path>`.
    if let Some(rest) = path.strip_prefix("/file/bot") {
        let inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(file_path) = rest
            .strip_prefix(inner.token.as_str())
            .and_then(|p| p.strip_prefix('/'))
        else {
            return error(401, "Unauthorized", None);
        };
        let id = file_path.strip_prefix("photos/").unwrap_or(file_path);
        return match inner.files.get(id) {
            Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
            None => error(404, "Not Found", None),
        };
    }
    let mut parts = path.rsplit('/');
    // teloxide writes method names in PascalCase (`SendMessage`); the Bot
    // API is case-insensitive about them.
    let method = lower_first(parts.next().unwrap_or_default());
    let token = parts
        .next()
        .and_then(|p| p.strip_prefix("bot"))
        .unwrap_or_default()
        .to_owned();
    {
        let inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if token != inner.token {
            return error(401, "Unauthorized", None);
        }
    }
    // A cut connection happens mid-upload, before the body is read.
    let reset = {
        let mut inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let next_is_reset = inner
            .failures
            .get(&method)
            .and_then(VecDeque::front)
            .is_some_and(|f| matches!(f, Failure::Reset));
        if next_is_reset {
            inner
                .failures
                .get_mut(&method)
                .and_then(VecDeque::pop_front);
            inner.calls.push(Call {
                method: format!("{method} (reset)"),
                chat_id: None,
                message_id: None,
                text: None,
                caption: None,
                file_len: None,
                reply_markup: None,
                params: HashMap::new(),
                at: Instant::now(),
            });
        }
        next_is_reset
    };
    if reset {
        use http_body_util::BodyExt as _;
        let mut body = req.into_body();
        let mut read = 0usize;
        while read < 64 * 1024 {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        // Aborting the handler makes the server drop the connection with the
        // request half read: what a reset looks like to the client.
        std::panic::resume_unwind(Box::new("fake Telegram: connection reset on purpose"));
    }
    let (p, file_len) = params(req).await;
    // A scripted failure answers first, for every method.
    let failed = {
        let mut inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let failure = inner
            .failures
            .get_mut(&method)
            .and_then(VecDeque::pop_front);
        if failure.is_some() {
            inner.calls.push(Call {
                method: format!("{method} (failed)"),
                chat_id: as_i64(p.get("chat_id")),
                message_id: None,
                text: None,
                caption: None,
                file_len,
                reply_markup: None,
                params: HashMap::new(),
                at: Instant::now(),
            });
        }
        failure
    };
    match failed {
        Some(Failure::RetryAfter(secs)) => {
            return error(
                429,
                &format!("Too Many Requests: retry after {secs}"),
                Some(secs),
            );
        }
        Some(Failure::Status(code, description)) => return error(code, &description, None),
        Some(Failure::Reset) | None => {}
    }
    if method == "getUpdates" {
        // As Telegram: one way of getting updates at a time.
        let hooked = shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .webhook
            .is_some();
        if hooked {
            return error(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
                None,
            );
        }
        return get_updates(&shared, &p).await;
    }
    let mut inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
    let chat_id = as_i64(p.get("chat_id"));
    let text = p.get("text").and_then(Value::as_str).map(str::to_owned);
    let caption = p.get("caption").and_then(Value::as_str).map(str::to_owned);
    let reply_markup = p.get("reply_markup").cloned();
    let mut call = Call {
        method: method.clone(),
        chat_id,
        message_id: None,
        text: text.clone(),
        caption: caption.clone(),
        file_len,
        reply_markup: reply_markup.clone(),
        params: p.clone(),
        at: Instant::now(),
    };
    let response = match method.as_str() {
        "getMe" => ok(json!({
            "id": BOT_ID, "is_bot": true, "first_name": "easel", "username": BOT_USERNAME,
            "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false,
            "can_connect_to_business": false, "has_main_web_app": false,
        })),
        "setMyCommands" | "answerCallbackQuery" => ok(json!(true)),
        "deleteWebhook" => {
            inner.webhook = None;
            if p.get("drop_pending_updates").and_then(Value::as_bool) == Some(true) {
                inner.pending.clear();
            }
            ok(json!(true))
        }
        "setWebhook" => set_webhook(&mut inner, &p),
        "getWebhookInfo" => {
            let pending = inner.pending.len();
            ok(match &inner.webhook {
                Some(w) => json!({
                    "url": w.url, "has_custom_certificate": false,
                    "pending_update_count": pending, "max_connections": w.max_connections,
                    "allowed_updates": w.allowed_updates,
                }),
                None => json!({
                    "url": "", "has_custom_certificate": false, "pending_update_count": pending,
                }),
            })
        }
        "getFile" => {
            let id = p.get("file_id").and_then(Value::as_str).unwrap_or_default();
            match inner.files.get(id) {
                Some(bytes) => ok(json!({
                    "file_id": id, "file_unique_id": format!("u{id}"),
                    "file_size": bytes.len(), "file_path": format!("photos/{id}"),
                })),
                None => error(400, "Bad Request: invalid file_id", None),
            }
        }
        "sendMessage" | "sendPhoto" | "sendDocument" => {
            let Some(chat) = chat_id else {
                return error(400, "Bad Request: chat_id is empty", None);
            };
            inner.next_message_id += 1;
            let id = inner.next_message_id;
            call.message_id = Some(id);
            let shown = text.clone().or(caption.clone()).unwrap_or_default();
            inner.messages.insert((chat, id), shown);
            let mut message = json!({ "message_id": id, "date": now_unix(), "chat": chat_json(chat), "from": bot_user() });
            match method.as_str() {
                "sendMessage" => message["text"] = json!(text),
                "sendPhoto" => {
                    message["photo"] = json!([{ "file_id": format!("photo{id}"), "file_unique_id": format!("up{id}"), "width": 64, "height": 64, "file_size": file_len }]);
                }
                _ => {
                    message["document"] = json!({ "file_id": format!("doc{id}"), "file_unique_id": format!("ud{id}"), "file_name": "image.png", "file_size": file_len });
                }
            }
            if let Some(c) = &caption {
                message["caption"] = json!(c);
            }
            if let Some(m) = &reply_markup {
                message["reply_markup"] = m.clone();
            }
            ok(message)
        }
        "sendMediaGroup" => {
            let Some(chat) = chat_id else {
                return error(400, "Bad Request: chat_id is empty", None);
            };
            let media = p
                .get("media")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !(2..=10).contains(&media.len()) {
                return error(400, "Bad Request: wrong number of media in the group", None);
            }
            let kinds: Vec<&str> = media.iter().filter_map(|m| m["type"].as_str()).collect();
            if kinds.iter().any(|k| *k != kinds[0]) {
                return error(
                    400,
                    "Bad Request: documents can't be mixed with other media types",
                    None,
                );
            }
            let mut messages = Vec::new();
            for item in &media {
                inner.next_message_id += 1;
                let id = inner.next_message_id;
                call.message_id.get_or_insert(id);
                let caption = item["caption"].as_str();
                if caption.is_some() {
                    call.caption = caption.map(str::to_owned);
                }
                inner
                    .messages
                    .insert((chat, id), caption.unwrap_or_default().to_owned());
                let mut message = json!({ "message_id": id, "date": now_unix(), "chat": chat_json(chat), "from": bot_user(), "media_group_id": "album" });
                if item["type"] == "photo" {
                    message["photo"] = json!([{ "file_id": format!("photo{id}"), "file_unique_id": format!("up{id}"), "width": 64, "height": 64 }]);
                } else {
                    message["document"] = json!({ "file_id": format!("doc{id}"), "file_unique_id": format!("ud{id}"), "file_name": "image.png" });
                }
                if let Some(c) = caption {
                    message["caption"] = json!(c);
                }
                messages.push(message);
            }
            ok(Value::Array(messages))
        }
        "editMessageText" => {
            let (Some(chat), Some(id)) = (chat_id, as_i64(p.get("message_id"))) else {
                return error(
                    400,
                    "Bad Request: message identifier is not specified",
                    None,
                );
            };
            let id = id as i32;
            call.message_id = Some(id);
            let new_text = text.clone().unwrap_or_default();
            match inner.messages.get(&(chat, id)) {
                None => error(400, "Bad Request: message to edit not found", None),
                Some(current) if *current == new_text => error(
                    400,
                    "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
                    None,
                ),
                Some(_) => {
                    inner.messages.insert((chat, id), new_text.clone());
                    ok(
                        json!({ "message_id": id, "date": now_unix(), "edit_date": now_unix(), "chat": chat_json(chat), "from": bot_user(), "text": new_text }),
                    )
                }
            }
        }
        _ => error(404, "Not Found", None),
    };
    inner.calls.push(call);
    response
}

/// `setWebhook` as Telegram checks it: an HTTPS URL, a secret of 1–256
/// of `A-Z a-z 0-9 _ -`, 1–100 connections.
fn set_webhook(inner: &mut Inner, p: &HashMap<String, Value>) -> Response {
    let url = p.get("url").and_then(Value::as_str).unwrap_or_default();
    if url.is_empty() {
        inner.webhook = None;
        return ok(json!(true));
    }
    if !url.starts_with("https://") {
        return error(
            400,
            "Bad Request: bad webhook: An HTTPS URL must be provided for webhook",
            None,
        );
    }
    let secret = p
        .get("secret_token")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if secret.as_ref().is_some_and(|s| {
        s.is_empty()
            || s.len() > 256
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }) {
        return error(
            400,
            "Bad Request: secret token contains unallowed characters",
            None,
        );
    }
    let max_connections = as_i64(p.get("max_connections")).unwrap_or(40);
    if !(1..=100).contains(&max_connections) {
        return error(400, "Bad Request: bad max_connections", None);
    }
    let allowed_updates = match p.get("allowed_updates") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        // teloxide may send the list as a JSON string in a form.
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_default(),
        _ => Vec::new(),
    };
    inner.webhook = Some(Webhook {
        url: url.to_owned(),
        secret_token: secret,
        max_connections: u32::try_from(max_connections).unwrap_or(40),
        allowed_updates,
    });
    ok(json!(true))
}

async fn get_updates(shared: &Shared, p: &HashMap<String, Value>) -> Response {
    let offset = as_i64(p.get("offset")).unwrap_or(0);
    let timeout = as_i64(p.get("timeout")).unwrap_or(0).clamp(0, 50) as u64;
    let mut rx = shared.updates.subscribe();
    let until = Instant::now() + Duration::from_secs(timeout);
    loop {
        {
            let mut inner = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
            // An offset confirms every update before it: Telegram forgets them.
            inner
                .pending
                .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
            if !inner.pending.is_empty() || Instant::now() >= until {
                let mut batch = inner.pending.clone();
                batch.sort_by_key(|u| u["update_id"].as_i64().unwrap_or(0));
                return ok(Value::Array(batch));
            }
        }
        if tokio::time::timeout_at(until, rx.changed()).await.is_err() {
            continue;
        }
    }
}
