//! Operator alerts (§7): with `EASEL_OPERATOR_CHAT_ID` set, a short message
//! in the operator's Telegram chat when something needs them — a worker
//! refusing its key, a model failing request after request, the event log
//! refusing writes, Telegram unreachable for long — and one when it clears.
//!
//! Each cause (per model where it has one) is an episode: raised, then
//! cleared. An episode is told at most once, and a cause at most once per
//! [`WINDOW`]: a cause raised again inside the window is told when the
//! window ends, if it is still on. A recovery is told only for an episode
//! whose alert went out. Messages go through the same [`TelegramApi`] (its
//! pace, its retries) as everything else, name no URL and no secret, and
//! are counted in `easel_operator_alerts_total`.
//!
//! [`Alerts::told`] says whether the operator was told of a model's
//! trouble, so a user's failure text may say so exactly when it is true.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::{FailureKind, ModelName};
use crate::metrics::{AlertLabels, Metrics};
use crate::telegram::TelegramApi;
use crate::telegram::replies::Reply;

/// At most one alert per cause in this long.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Failed requests of one model in a row that make an alert.
pub const FAILING_IN_A_ROW: u32 = 3;
/// Telegram unreachable for this long is worth telling (once it answers).
pub const TELEGRAM_DOWN_FOR: Duration = Duration::from_secs(5 * 60);

/// What an alert is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Cause {
    /// The model's worker answered 401 or 403.
    WorkerKey(ModelName),
    /// The model failed [`FAILING_IN_A_ROW`] requests in a row.
    ModelFailing(ModelName),
    /// The event log refused a write.
    LogRefuses,
    /// Telegram could not be reached for [`TELEGRAM_DOWN_FOR`] or more.
    TelegramUnreachable,
}

impl Cause {
    /// The metric label: a fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            Cause::WorkerKey(_) => "worker_key",
            Cause::ModelFailing(_) => "model_failing",
            Cause::LogRefuses => "log_refuses",
            Cause::TelegramUnreachable => "telegram_unreachable",
        }
    }

    fn recovered_text(&self, lasted: Duration) -> String {
        let what = match self {
            Cause::WorkerKey(m) => format!("the {m} worker accepts our key again"),
            Cause::ModelFailing(m) => format!("{m} generates images again"),
            Cause::LogRefuses => "the event log takes writes again".to_owned(),
            Cause::TelegramUnreachable => "Telegram answers again".to_owned(),
        };
        format!("✅ easel recovered: {what} (after {}).", minutes(lasted))
    }
}

fn minutes(d: Duration) -> String {
    let m = d.as_secs().div_ceil(60).max(1);
    if m == 1 {
        "1 minute".to_owned()
    } else {
        format!("{m} minutes")
    }
}

/// One cause's episode.
#[derive(Debug)]
struct Episode {
    on: bool,
    since: Instant,
    /// The alert's text (kept for a send deferred to the window's end).
    text: String,
    /// This episode's alert went out.
    told: bool,
    /// A send is running or waits for the window's end.
    pending: bool,
    /// When this cause's last alert went out (for the window).
    last_sent: Option<Instant>,
}

#[derive(Default)]
struct State {
    episodes: HashMap<Cause, Episode>,
    /// Failed requests in a row, per model.
    streaks: HashMap<ModelName, u32>,
    /// Since when Telegram has not answered.
    telegram_down: Option<(Instant, chrono::DateTime<chrono::Utc>)>,
}

/// The operator alerts of one process (they outlive engine restarts).
pub struct Alerts {
    chat: Option<i64>,
    /// The Telegram client of the running engine (weak: the client itself
    /// reports to these alerts).
    api: Mutex<Weak<TelegramApi>>,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    /// Whether this process tells the alerts that are about the whole bot
    /// (a model failing in a row, counted from the log every replica
    /// follows): always for one process; on replicas, only the one
    /// holding the alerter's lease, so the operator is told once.
    for_the_bot: std::sync::atomic::AtomicBool,
}

impl Alerts {
    /// Alerts to `chat`; with None, nothing is ever sent (and
    /// [`Alerts::told`] is always false).
    pub fn new(chat: Option<i64>, metrics: Arc<Metrics>) -> Self {
        Alerts {
            chat,
            api: Mutex::new(Weak::new()),
            state: Mutex::default(),
            metrics,
            for_the_bot: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Whether this process tells the alerts about the whole bot (see
    /// the field); replicas turn it on while elected. The count goes on
    /// either way, so the replica elected next knows the streak.
    pub fn speak_for_the_bot(&self, on: bool) {
        self.for_the_bot
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// The client alerts go through; set at every engine start.
    pub fn send_with(&self, api: &Arc<TelegramApi>) {
        *self.api.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(api);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the operator was told of trouble with `model` that is still
    /// on (its key refused, or failing request after request).
    pub fn told(&self, model: &ModelName) -> bool {
        let s = self.lock();
        [
            Cause::WorkerKey(model.clone()),
            Cause::ModelFailing(model.clone()),
        ]
        .iter()
        .any(|c| s.episodes.get(c).is_some_and(|e| e.on && e.told))
    }

    /// `cause` is on; tells the operator unless this episode was told, or
    /// the cause was told less than [`WINDOW`] ago (then at the window's
    /// end, if still on). Returns once a due alert was sent (or failed).
    pub async fn raise(self: &Arc<Self>, cause: Cause, text: String) {
        if self.chat.is_none() {
            return;
        }
        let now = Instant::now();
        let due = {
            let mut s = self.lock();
            let e = s.episodes.entry(cause.clone()).or_insert(Episode {
                on: false,
                since: now,
                text: String::new(),
                told: false,
                pending: false,
                last_sent: None,
            });
            if !e.on {
                e.on = true;
                e.since = now;
                e.told = false;
            }
            e.text = text;
            if e.told || e.pending {
                return;
            }
            e.pending = true;
            e.last_sent.map(|at| at + WINDOW).filter(|&at| at > now)
        };
        match due {
            None => self.send_alert(&cause).await,
            Some(at) => {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    me.send_alert(&cause).await;
                });
            }
        }
    }

    /// Sends `cause`'s alert if its episode is still on and untold.
    async fn send_alert(&self, cause: &Cause) {
        let text = {
            let mut s = self.lock();
            let Some(e) = s.episodes.get_mut(cause) else {
                return;
            };
            if !e.on || e.told {
                e.pending = false;
                return;
            }
            e.text.clone()
        };
        let sent = self.send(cause, "alert", text).await;
        let mut s = self.lock();
        if let Some(e) = s.episodes.get_mut(cause) {
            e.pending = false;
            if sent {
                e.told = true;
                e.last_sent = Some(Instant::now());
            }
        }
    }

    /// `cause` is off; tells the operator when its alert went out.
    pub async fn clear(&self, cause: Cause) {
        let lasted = {
            let mut s = self.lock();
            let Some(e) = s.episodes.get_mut(&cause) else {
                return;
            };
            if !e.on {
                return;
            }
            e.on = false;
            if !std::mem::take(&mut e.told) {
                return;
            }
            e.since.elapsed()
        };
        self.send(&cause, "recovered", cause.recovered_text(lasted))
            .await;
    }

    /// A worker answered `status`: 401/403 raises [`Cause::WorkerKey`],
    /// an answer with an image clears it.
    pub async fn worker_answered(self: &Arc<Self>, model: &ModelName, status: Option<u16>) {
        match status {
            Some(status @ (401 | 403)) => {
                let text = format!(
                    "⚠️ easel: the {model} worker refuses our key (HTTP {status}). Every {model} request fails until its key is fixed; the other models are not affected."
                );
                self.raise(Cause::WorkerKey(model.clone()), text).await;
            }
            Some(200) => self.clear(Cause::WorkerKey(model.clone())).await,
            _ => {}
        }
    }

    /// A generation of `model` worked (Ok) or its request failed (Err):
    /// [`FAILING_IN_A_ROW`] failures that say something about the model
    /// (not the content filter, not Telegram) raise
    /// [`Cause::ModelFailing`] — unless its worker refusing our key is
    /// already on, which says why (one alert for one trouble); a generated
    /// image clears it.
    pub fn generation(self: &Arc<Self>, model: &ModelName, outcome: Result<(), FailureKind>) {
        if self.chat.is_none() {
            return;
        }
        let raise = {
            let mut s = self.lock();
            let streak = s.streaks.entry(model.clone()).or_insert(0);
            match outcome {
                Ok(()) => {
                    *streak = 0;
                    None
                }
                Err(
                    kind @ (FailureKind::Unavailable
                    | FailureKind::TimedOut
                    | FailureKind::BadAnswer
                    | FailureKind::Refused),
                ) => {
                    *streak += 1;
                    let n = *streak;
                    let key_refused = s
                        .episodes
                        .get(&Cause::WorkerKey(model.clone()))
                        .is_some_and(|e| e.on);
                    let speaks = self.for_the_bot.load(std::sync::atomic::Ordering::Acquire);
                    (n >= FAILING_IN_A_ROW && !key_refused && speaks).then_some((n, kind))
                }
                Err(_) => None,
            }
        };
        let me = Arc::clone(self);
        let model = model.clone();
        match (outcome, raise) {
            (Ok(()), _) => {
                tokio::spawn(async move { me.clear(Cause::ModelFailing(model)).await });
            }
            (Err(_), Some((n, kind))) => {
                let text = format!(
                    "⚠️ easel: {model} failed {n} requests in a row (the last: {}). Its users are told it failed; see `easel audit list --model {model} --state failed`.",
                    kind.as_str()
                );
                tokio::spawn(async move { me.raise(Cause::ModelFailing(model), text).await });
            }
            (Err(_), None) => {}
        }
    }

    /// The event log refused a write (`reason`, one line).
    pub async fn log_refuses(self: &Arc<Self>, reason: &str) {
        let text = format!(
            "⚠️ easel: the event log refuses writes ({reason}). New requests are turned away with \"try again in a minute\"; the bot restarts its engine and serves again by itself once the disk takes writes. Nothing acknowledged is lost."
        );
        self.raise(Cause::LogRefuses, text).await;
    }

    /// Whether Telegram answered the last call. An outage of
    /// [`TELEGRAM_DOWN_FOR`] or more is told once Telegram answers again
    /// (nothing can reach the operator's chat before): one message that
    /// says for how long.
    pub fn telegram_reachable(self: &Arc<Self>, answered: bool) {
        if self.chat.is_none() {
            return;
        }
        let lasted = {
            let mut s = self.lock();
            match (answered, s.telegram_down) {
                (false, None) => {
                    s.telegram_down = Some((Instant::now(), chrono::Utc::now()));
                    return;
                }
                (true, Some(down)) => {
                    s.telegram_down = None;
                    down
                }
                _ => return,
            }
        };
        let (since, since_utc) = lasted;
        let lasted = since.elapsed();
        if lasted < TELEGRAM_DOWN_FOR {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let text = format!(
                "⚠️ easel: Telegram could not be reached for {} (from {} UTC); it answers again now. Requests that came meanwhile are being taken in order.",
                minutes(lasted),
                since_utc.format("%Y-%m-%d %H:%M")
            );
            me.send(&Cause::TelegramUnreachable, "alert", text).await;
        });
    }

    /// Sends `text` to the operator's chat; true when Telegram took it.
    async fn send(&self, cause: &Cause, kind: &'static str, text: String) -> bool {
        let Some(chat) = self.chat else {
            return false;
        };
        let api = self
            .api
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        let Some(api) = api else {
            tracing::warn!(
                cause = cause.label(),
                "no Telegram client to send an operator alert with"
            );
            return false;
        };
        let to = Reply {
            chat,
            to_message: None,
        };
        match api.send_text(to, text).await {
            Ok(_) => {
                self.metrics
                    .alerts
                    .get_or_create(&AlertLabels {
                        cause: cause.label(),
                        kind,
                    })
                    .inc();
                tracing::info!(cause = cause.label(), kind, "operator alert sent");
                true
            }
            Err(e) => {
                tracing::warn!(cause = cause.label(), kind, error = %e.text, "could not send an operator alert");
                false
            }
        }
    }
}
