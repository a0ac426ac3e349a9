//! Registering Telegram's webhook (§9): `easel webhook set|delete|info`.
//! Run once from a deploy step, never by a running replica: teloxide's own
//! webhook helper registers at every start and deletes at every stop
//! (inventing a secret when given none), which breaks as soon as two
//! replicas start and stop independently.

use serde::Serialize;
use teloxide::payloads::{DeleteWebhookSetters as _, SetWebhookSetters as _};
use teloxide::prelude::Requester;
use teloxide::types::AllowedUpdate;

use super::api::{Policy, TelegramApi, TgError};

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
