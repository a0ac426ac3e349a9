//! Telegram's webhook (§9): registering it (`easel webhook
//! set|delete|info`, run once from a deploy step, never by a running
//! replica: teloxide's own webhook helper registers at every start and
//! deletes at every stop, inventing a secret when given none, which breaks
//! as soon as two replicas start and stop independently), and the
//! `/telegram` route `easel run --webhook` serves instead of long polling.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use subtle::ConstantTimeEq;
use teloxide::payloads::{DeleteWebhookSetters as _, SetWebhookSetters as _};
use teloxide::prelude::Requester;
use teloxide::types::{AllowedUpdate, Update};
use tokio_util::sync::CancellationToken;

use super::api::{Policy, TelegramApi, TgError};
use super::intake::Handled;
use super::turn::Turn;
use crate::engine::Engine;

/// The update kinds easel reads (the same as its long polling asks for).
pub const UPDATES: [AllowedUpdate; 2] = [AllowedUpdate::Message, AllowedUpdate::CallbackQuery];

/// What Telegram says of the webhook (`getWebhookInfo`), in easel's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Info {
    /// None: no webhook; updates wait for `getUpdates`.
    pub url: Option<String>,
    pub pending_updates: u32,
    pub max_connections: Option<u32>,
    pub allowed_updates: Vec<String>,
    /// Telegram's last failure to deliver, with its time (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.url {
            Some(url) => writeln!(f, "webhook: {url}")?,
            None => writeln!(f, "webhook: none (updates are fetched by long polling)")?,
        }
        writeln!(f, "pending updates: {}", self.pending_updates)?;
        if let Some(n) = self.max_connections {
            writeln!(f, "max connections: {n}")?;
        }
        if !self.allowed_updates.is_empty() {
            writeln!(f, "updates: {}", self.allowed_updates.join(", "))?;
        }
        match (&self.last_error, &self.last_error_at) {
            (Some(e), Some(at)) => writeln!(f, "last delivery error: {at}: {e}"),
            (Some(e), None) => writeln!(f, "last delivery error: {e}"),
            _ => writeln!(f, "last delivery error: none"),
        }
    }
}

fn kind(u: &AllowedUpdate) -> String {
    serde_json::to_value(u)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{u:?}"))
}

/// Registers `url` with `secret` (sent back in every POST's
/// `X-Telegram-Bot-Api-Secret-Token`), for messages and button presses.
///
/// # Errors
/// What Telegram refused (a non-HTTPS URL, a bad secret), in words
/// without the bot token.
pub async fn set(
    api: &TelegramApi,
    url: &reqwest::Url,
    secret: &str,
    max_connections: u8,
    drop_pending_updates: bool,
) -> Result<(), TgError> {
    let bot = api.bot().clone();
    api.run("setWebhook", Policy::Reply, || {
        bot.set_webhook(url.clone())
            .secret_token(secret.to_owned())
            .max_connections(max_connections)
            .allowed_updates(UPDATES)
            .drop_pending_updates(drop_pending_updates)
            .into_future()
    })
    .await
    .map(|_| ())
}

/// Removes the webhook: updates wait for `getUpdates` again.
///
/// # Errors
/// As [`set`].
pub async fn delete(api: &TelegramApi, drop_pending_updates: bool) -> Result<(), TgError> {
    let bot = api.bot().clone();
    api.run("deleteWebhook", Policy::Reply, || {
        bot.delete_webhook()
            .drop_pending_updates(drop_pending_updates)
            .into_future()
    })
    .await
    .map(|_| ())
}

/// The webhook as Telegram has it.
///
/// # Errors
/// As [`set`].
pub async fn info(api: &TelegramApi) -> Result<Info, TgError> {
    let bot = api.bot().clone();
    let got = api
        .run("getWebhookInfo", Policy::Reply, || {
            bot.get_webhook_info().into_future()
        })
        .await?;
    let Some(w) = got else {
        return Err(TgError {
            kind: super::api::TgErrorKind::Api,
            text: "Telegram returned no webhook information".into(),
        });
    };
    Ok(Info {
        url: w.url.map(|u| u.to_string()),
        pending_updates: w.pending_update_count,
        max_connections: w.max_connections,
        allowed_updates: w
            .allowed_updates
            .unwrap_or_default()
            .iter()
            .map(kind)
            .collect(),
        last_error: w.last_error_message.map(|e| api.scrubbed(&e)),
        last_error_at: w.last_error_date.map(|d| d.to_rfc3339()),
    })
}

/// The intake of the running engine, for the webhook route: None while no
/// engine runs (starting, or restarting after a refused write).
pub type Slot<E> = Arc<Mutex<Option<Arc<super::Intake<E>>>>>;

/// The header Telegram sends the secret token in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

struct Route<E: Engine> {
    slot: Slot<E>,
    secret: SecretString,
}

/// `POST /telegram` (§9): `401` unless the secret token matches (compared
/// in constant time), `400` for a body that is not an update, `503` while
/// no engine runs (Telegram retries later; nothing is lost), else the
/// update is handled as a polled one would be and `200` answers once it
/// is — its request committed, or its reply sent. The handling runs in a
/// task of its own, so a connection Telegram drops does not cut it short
/// (a redelivery is then found by its update id).
pub fn router<E: Engine>(slot: Slot<E>, secret: SecretString) -> Router {
    Router::new()
        .route("/telegram", post(receive::<E>))
        .with_state(Arc::new(Route { slot, secret }))
}

async fn receive<E: Engine>(
    State(route): State<Arc<Route<E>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let given = headers
        .get(SECRET_HEADER)
        .map(axum::http::HeaderValue::as_bytes)
        .unwrap_or_default();
    if !bool::from(given.ct_eq(route.secret.expose_secret().as_bytes())) {
        tracing::warn!("a webhook POST without the right secret token was refused");
        return (StatusCode::UNAUTHORIZED, "wrong secret token\n");
    }
    let update: Update = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "a webhook POST that is not an update was refused");
            return (StatusCode::BAD_REQUEST, "not a Telegram update\n");
        }
    };
    let intake = route
        .slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(intake) = intake else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not taking updates right now\n",
        );
    };
    let handled = tokio::spawn(async move { intake.handle(update, Turn::alone()).await });
    match handled.await {
        Ok(Handled::Done) => (StatusCode::OK, "ok\n"),
        Ok(Handled::Redeliver) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the update could not be committed; deliver it again\n",
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the update could not be handled\n",
        ),
    }
}

/// Binds `addr` (before the first engine, so a bad address stops the start
/// with one sentence) and serves [`router`] until `shutdown`.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn serve<E: Engine>(
    addr: std::net::SocketAddr,
    slot: Slot<E>,
    secret: SecretString,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "webhook listening on /telegram");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router(slot, secret))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the webhook listener stopped");
        }
    }))
}
