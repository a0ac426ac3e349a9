//! The stand-in that answers users while the engine is down because the
//! event log cannot be written (disk full): nobody waits in silence. Image,
//! queue, cancel and button requests get "couldn't take that request right
//! now"; help and usage texts, which need no log, are answered as usual.
//! Nothing is recorded, and the engine's own poller takes over after it.

use std::sync::Arc;

use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use teloxide::types::{Update, UpdateKind};

use super::TelegramApi;
use super::intake::{Route, route};
use super::parse::parse;
use super::poll::updates_loop;
use super::replies::Reply;
use super::words::{self, Lang};
use crate::config::Settings;
use tokio_util::sync::CancellationToken;

/// Answers updates from `offset` until `until` fires; returns the offset
/// the engine's poller should continue from.
pub async fn answer_while_down(
    api: Arc<TelegramApi>,
    settings: Arc<Settings>,
    username: String,
    offset: i32,
    until: CancellationToken,
) -> i32 {
    let next = updates_loop(&api, offset, &until, |updates| {
        let answered = answer_batch(
            Arc::clone(&api),
            Arc::clone(&settings),
            username.clone(),
            updates,
        );
        Box::pin(async move {
            answered.await;
            None
        })
    })
    .await;
    if next != offset {
        // getUpdates confirms everything before its offset: without this the
        // engine would see the last answered batch again. A short answer is
        // not lost: what it returns stays unconfirmed.
        let confirm = api
            .bot()
            .get_updates()
            .offset(next)
            .limit(1)
            .timeout(0)
            .into_future();
        // Best effort: the engine must not wait long for it.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), confirm).await;
    }
    next
}

async fn answer_batch(
    api: Arc<TelegramApi>,
    settings: Arc<Settings>,
    username: String,
    updates: Vec<Update>,
) {
    for update in updates {
        match update.kind {
            UpdateKind::Message(msg) => {
                // A photo's caption is its text (image to image).
                let Some(text) = msg.text().or_else(|| msg.caption()) else {
                    continue;
                };
                let user = msg
                    .from
                    .as_ref()
                    .map_or(0, |u| i64::try_from(u.id.0).unwrap_or(i64::MAX));
                let lang = Lang::of(msg.from.as_ref().and_then(|u| u.language_code.as_deref()));
                let to = Reply {
                    chat: msg.chat.id.0,
                    to_message: Some(msg.id.0),
                };
                let input = parse(text, Some(&username));
                // Intake's own routing: only what needs the log differs.
                let reply = match route(
                    input,
                    msg.chat.is_private(),
                    settings.allows(user),
                    &settings,
                    lang,
                ) {
                    Route::Ignore => continue,
                    Route::Answer(text) => text,
                    Route::UseLog(_) => words::busy(lang),
                };
                api.reply(to, reply).await;
            }
            UpdateKind::CallbackQuery(q) => {
                let lang = Lang::of(q.from.language_code.as_deref());
                api.answer_query(&q, words::busy(lang)).await;
            }
            _ => {}
        }
    }
}
