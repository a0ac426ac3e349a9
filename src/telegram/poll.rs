//! Long polling with a durable offset. teloxide keeps its offset in memory
//! only; here the last handled `update_id` is saved after each batch, and
//! the first `getUpdates` after a start passes `saved + 1`, which confirms
//! everything before it to Telegram. Updates redelivered after a crash are
//! harmless: intake finds their requests by update id.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use teloxide::types::{AllowedUpdate, Update};

use super::api::{POLL_TIMEOUT_SECS, TelegramApi};
use super::intake::Intake;
use super::turn::Turn;
use crate::engine::Engine;
use crate::store::EventStore;
use tokio_util::sync::CancellationToken;

/// Where the last handled update id is kept (a meta value).
pub(crate) const OFFSET_KEY: &str = "telegram/offset";
/// Updates of one batch handled at once.
const CONCURRENCY: usize = 16;

/// The last handled update id, if any.
pub fn saved_offset(store: &impl EventStore) -> Option<u32> {
    let bytes = store.get_meta(OFFSET_KEY).ok().flatten()?;
    Some(u32::from_be_bytes(bytes.as_slice().try_into().ok()?))
}

/// Polls until `shutdown`; returns after the batch in hand is handled,
/// with the offset the next `getUpdates` would pass.
pub async fn poll<E: Engine>(intake: Arc<Intake<E>>, shutdown: CancellationToken) -> i32 {
    let offset: i32 = intake
        .core
        .saved_offset()
        .await
        .map_or(0, |u| (u as i32).wrapping_add(1));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let api = Arc::clone(&intake.api);
    updates_loop(&api, offset, &shutdown, |updates| {
        let intake = Arc::clone(&intake);
        let semaphore = Arc::clone(&semaphore);
        Box::pin(async move { handle_batch(intake, semaphore, updates).await })
    })
    .await
}

/// A batch handler's work, owned so the loop stays `Send`: the first
/// update of the batch to fetch again (one whose request could not be
/// committed and nobody was told: [`super::intake::Handled::Redeliver`]),
/// or None when the whole batch is done.
pub(crate) type BoxFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<u32>> + Send>>;

/// Handles one batch (at most [`CONCURRENCY`] at once), then saves its
/// offset — only up to before an update to fetch again, which it returns.
/// Updates record in `update_id` order (see [`Turn`]); their replies and
/// durability waits overlap.
async fn handle_batch<E: Engine>(
    intake: Arc<Intake<E>>,
    semaphore: Arc<tokio::sync::Semaphore>,
    mut updates: Vec<Update>,
) -> Option<u32> {
    updates.sort_by_key(|u| u.id.0);
    let last = updates.last().map(|u| u.id.0)?;
    let mut tasks = tokio::task::JoinSet::new();
    let turns = Turn::batch(updates.len());
    for (update, turn) in updates.into_iter().zip(turns) {
        let intake = Arc::clone(&intake);
        // Permits are taken in order, so an update waiting for its turn
        // never holds one an earlier update needs.
        let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else {
            break;
        };
        let id = update.id.0;
        tasks.spawn(async move {
            let handled = intake.handle(update, turn).await;
            drop(permit);
            (id, handled)
        });
    }
    let mut again: Option<u32> = None;
    while let Some(joined) = tasks.join_next().await {
        if let Ok((id, super::intake::Handled::Redeliver)) = joined {
            again = Some(again.map_or(id, |a| a.min(id)));
        }
    }
    // Updates after one to fetch again come again too: their requests are
    // found by update id.
    let done = match again {
        Some(id) => id.checked_sub(1),
        None => Some(last),
    };
    if let Some(done) = done
        && let Err(e) = intake.core.save_offset(done).await
    {
        tracing::warn!(error = %e, "could not save the Telegram offset");
    }
    again
}

/// The `getUpdates` loop shared by the engine's poller and the stand-in
/// that answers while the log is down: each non-empty batch goes to
/// `batch`, then the offset moves past it. Returns the next offset once
/// `shutdown` fires.
pub(crate) async fn updates_loop(
    api: &TelegramApi,
    mut offset: i32,
    shutdown: &CancellationToken,
    mut batch: impl FnMut(Vec<Update>) -> BoxFuture,
) -> i32 {
    let policy = super::api::transient_backoff();
    let mut backoff = policy.build();
    loop {
        if shutdown.is_cancelled() {
            return offset;
        }
        let bot = api.bot().clone();
        tracing::debug!(offset, "polling getUpdates");
        let request = bot
            .get_updates()
            .offset(offset)
            .timeout(POLL_TIMEOUT_SECS)
            .allowed_updates(vec![AllowedUpdate::Message, AllowedUpdate::CallbackQuery]);
        let result = tokio::select! {
            r = request.into_future() => r,
            // Updates of a dropped answer were not confirmed: the next
            // poller gets them again.
            () = shutdown.cancelled() => return offset,
        };
        api.count_call("getUpdates", &result);
        api.note_reachable(!matches!(&result, Err(e) if super::api::transient(e)));
        let updates = match result {
            // The backoff starts over once a batch is done (below), not
            // on every answer: a batch fetched again keeps it growing.
            Ok(updates) => updates,
            Err(teloxide::RequestError::RetryAfter(secs)) => {
                tracing::warn!(retry_after = secs.seconds(), "getUpdates rate limited");
                sleep_or_stop(secs.duration(), shutdown).await;
                continue;
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(32));
                match polling_blocked(&e) {
                    // Telegram answers, but no update will ever come this
                    // way: say what to do, and do not report ready.
                    Some(why) => {
                        tracing::error!(?wait, "{why}");
                        api.note_not_ready(why);
                    }
                    None => {
                        tracing::warn!(error = %api.describe(&e), ?wait, "getUpdates failed");
                    }
                }
                sleep_or_stop(wait, shutdown).await;
                continue;
            }
        };
        let Some(last) = updates.last().map(|u| u.id.0) else {
            backoff = policy.build();
            continue;
        };
        offset = match batch(updates).await {
            // Fetched again after the same backoff as a failed getUpdates
            // (Telegram keeps it: nothing was confirmed past it).
            Some(again) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(32));
                tracing::warn!(
                    update_id = again,
                    ?wait,
                    "an update could not be committed; fetching it again"
                );
                sleep_or_stop(wait, shutdown).await;
                again as i32
            }
            None => {
                backoff = policy.build();
                (last as i32).wrapping_add(1)
            }
        };
    }
}

/// Why long polling cannot get updates at all, when that is the error: a
/// webhook is registered, or another process polls with this token.
fn polling_blocked(e: &teloxide::RequestError) -> Option<&'static str> {
    use teloxide::ApiError;
    let webhook = "a webhook is registered for this bot, so long polling gets no updates: run `easel webhook delete` (or serve the webhook)";
    let other = "another process polls Telegram with this bot's token (409 Conflict): only one may";
    match e {
        teloxide::RequestError::Api(ApiError::CantGetUpdates) => Some(webhook),
        teloxide::RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => Some(other),
        teloxide::RequestError::Api(ApiError::Unknown(text))
            if text.contains("webhook is active") =>
        {
            Some(webhook)
        }
        teloxide::RequestError::Api(ApiError::Unknown(text))
            if text.contains("terminated by other getUpdates") =>
        {
            Some(other)
        }
        _ => None,
    }
}

async fn sleep_or_stop(wait: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shutdown.cancelled() => {}
    }
}
