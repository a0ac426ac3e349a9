//! The Bot API client: teloxide's `Bot` pointed at `TELEGRAM_API_URL`, one
//! overall pace for every call (well under Telegram's 30/s), 429 handling
//! (wait `retry_after`, then resend), "message is not modified" as success,
//! and errors described without the token (it is part of every URL).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use backon::BackoffBuilder as _;
use secrecy::{ExposeSecret, SecretString};
use teloxide::ApiError;
use teloxide::RequestError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Overall pace of paced Bot API calls: 20/s, well under Telegram's 30/s
/// (the long poll is not paced).
pub const CALL_INTERVAL: Duration = Duration::from_millis(50);
/// Paced calls in flight at once (see `TelegramApi::in_flight`).
pub const MAX_IN_FLIGHT: usize = 3;
/// Long-poll timeout; the client timeout below is larger.
pub const POLL_TIMEOUT_SECS: u32 = 25;

/// How hard to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Replies and edits: a few tries, then give up (nothing is lost).
    Reply,
    /// Images: 429 and network errors are retried until shutdown.
    Deliver,
}

/// Why a call did not succeed, already scrubbed of the token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct TgError {
    pub kind: TgErrorKind,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TgErrorKind {
    /// Telegram refused the call (400, 403, …): retrying will not help.
    Api,
    /// Could not reach Telegram (after the retries of the policy).
    Network,
    /// 429 more often than the policy allows.
    RateLimited,
    ShuttingDown,
}

/// A minimal pacing gate: each call takes the next free slot.
struct Pace {
    next: Mutex<Instant>,
    /// [`CALL_INTERVAL`], times the replicas sharing the budget.
    interval: Duration,
}

impl Pace {
    async fn wait(&self) {
        let slot = {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

pub struct TelegramApi {
    bot: teloxide::Bot,
    token: SecretString,
    pace: Pace,
    /// Calls in flight at once. The pace spaces *sends*; under load the
    /// network can bunch their *arrivals* (the 10k load campaign saw 34 in
    /// one second at a 20/s pace). With few in flight, arrivals in any
    /// second stay within the pace plus this many.
    in_flight: tokio::sync::Semaphore,
    shutdown: CancellationToken,
    /// Told whether Telegram answers (readiness, §7).
    health: Option<std::sync::Arc<crate::health::Health>>,
    /// Each call counted by method and result.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Told whether Telegram answers (a long outage is reported).
    alerts: Option<std::sync::Arc<crate::alerts::Alerts>>,
}

impl TelegramApi {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        token: SecretString,
        api_url: reqwest::Url,
        shutdown: CancellationToken,
    ) -> Result<Self, reqwest::Error> {
        // teloxide's default client times out after 17 s; uploads and the
        // long poll need more.
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(u64::from(POLL_TIMEOUT_SECS) + 35))
            .pool_max_idle_per_host(5)
            .tcp_nodelay(true)
            .build()?;
        let bot = teloxide::Bot::with_client(token.expose_secret(), client).set_api_url(api_url);
        Ok(TelegramApi {
            bot,
            token,
            pace: Pace {
                next: Mutex::new(Instant::now()),
                interval: CALL_INTERVAL,
            },
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            shutdown,
            health: None,
            metrics: None,
            alerts: None,
        })
    }

    /// Paces at `1/replicas` of the overall budget: the replicas sharing
    /// one bot (§9) stay within Telegram's limits together, with no
    /// coordination between them (a fixed share rather than a shared
    /// budget in the database: no round trip per call, and a replica cut
    /// off from the database still paces right).
    #[must_use]
    pub fn with_share(mut self, replicas: u32) -> Self {
        self.pace.interval = CALL_INTERVAL * replicas.max(1);
        self
    }

    /// Reports to `health` whether Telegram answers.
    #[must_use]
    pub fn with_health(mut self, health: std::sync::Arc<crate::health::Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Counts every call in `metrics` and tells `alerts` whether Telegram
    /// answers.
    #[must_use]
    pub fn with_watchers(
        mut self,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        alerts: std::sync::Arc<crate::alerts::Alerts>,
    ) -> Self {
        self.metrics = Some(metrics);
        self.alerts = Some(alerts);
        self
    }

    /// Telegram answered (`true`), or could not be reached (`false`).
    pub(crate) fn note_reachable(&self, answered: bool) {
        if let Some(h) = &self.health {
            h.set(
                crate::health::Part::Telegram,
                (!answered).then(|| "Telegram cannot be reached".to_owned()),
            );
        }
        if let Some(a) = &self.alerts {
            a.telegram_reachable(answered);
        }
    }

    /// Telegram answers but the bot cannot work this way (`why`, one line):
    /// not ready until a call succeeds again.
    pub(crate) fn note_not_ready(&self, why: &str) {
        if let Some(h) = &self.health {
            h.set(crate::health::Part::Telegram, Some(why.to_owned()));
        }
    }

    /// Counts one try of `method` (`easel_telegram_calls_total`).
    pub(crate) fn count_call<T>(&self, method: &'static str, outcome: &Result<T, RequestError>) {
        if let Some(m) = &self.metrics {
            let result = match outcome {
                Ok(_) => "ok",
                Err(RequestError::Api(ApiError::MessageNotModified)) => "not_modified",
                Err(RequestError::RetryAfter(_)) => "rate_limited",
                Err(e) if transient(e) => "network",
                Err(_) => "api_error",
            };
            m.telegram_call(method, result);
        }
    }

    pub fn bot(&self) -> &teloxide::Bot {
        &self.bot
    }

    /// `text` without the token.
    pub fn scrubbed(&self, text: &str) -> String {
        scrub(text, self.token.expose_secret())
    }

    /// Formats an error without the token or any URL.
    pub fn describe(&self, e: &RequestError) -> String {
        let text = match e {
            RequestError::Network(inner) => {
                let mut cause: &dyn std::error::Error = inner.as_ref();
                let mut text = if inner.is_timeout() {
                    "timed out".to_owned()
                } else {
                    "network error".to_owned()
                };
                while let Some(next) = cause.source() {
                    cause = next;
                    text = format!("network error: {cause}");
                }
                text
            }
            RequestError::InvalidJson { .. } => {
                "Telegram's answer was not the expected JSON".to_owned()
            }
            other => other.to_string(),
        };
        scrub(&text, self.token.expose_secret())
    }

    /// Runs `call` (built anew for each try) at the overall pace, following
    /// `policy` on 429 and network errors. "message is not modified" is Ok(None).
    ///
    /// # Errors
    /// A [`TgError`] when the call cannot succeed under the policy.
    pub async fn run<T, F, Fut>(
        &self,
        what: &'static str,
        policy: Policy,
        mut call: F,
    ) -> Result<Option<T>, TgError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RequestError>>,
    {
        let mut network_failures = 0u32;
        let mut rate_limits = 0u32;
        let mut backoff = transient_backoff().build();
        loop {
            if self.shutdown.is_cancelled() && policy == Policy::Deliver {
                return Err(TgError {
                    kind: TgErrorKind::ShuttingDown,
                    text: "shutting down".into(),
                });
            }
            let permit = self.in_flight.acquire().await;
            self.pace.wait().await;
            let outcome = call().await;
            drop(permit);
            self.count_call(what, &outcome);
            // Any answer at all (an API error included) means Telegram is
            // reachable; a transient failure means it is not, for now.
            self.note_reachable(!matches!(&outcome, Err(e) if transient(e)));
            let wait = match outcome {
                Ok(v) => return Ok(Some(v)),
                Err(RequestError::Api(ApiError::MessageNotModified)) => return Ok(None),
                Err(RequestError::RetryAfter(secs)) => {
                    rate_limits += 1;
                    tracing::warn!(
                        call = what,
                        retry_after = secs.seconds(),
                        "Telegram asked us to slow down"
                    );
                    if policy == Policy::Reply && rate_limits > 5 {
                        return Err(TgError {
                            kind: TgErrorKind::RateLimited,
                            text: "rate limited by Telegram".into(),
                        });
                    }
                    secs.duration().max(Duration::from_millis(100))
                }
                Err(e) if transient(&e) => {
                    network_failures += 1;
                    let text = self.describe(&e);
                    tracing::warn!(call = what, error = %text, attempt = network_failures, "Telegram call failed");
                    if policy == Policy::Reply && network_failures >= 3 {
                        return Err(TgError {
                            kind: TgErrorKind::Network,
                            text,
                        });
                    }
                    backoff.next().unwrap_or(Duration::from_secs(32))
                }
                Err(e) => {
                    return Err(TgError {
                        kind: TgErrorKind::Api,
                        text: self.describe(&e),
                    });
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled(), if policy == Policy::Deliver => {}
            }
        }
    }
}

/// The waits after a transient failure of a Telegram call (network, 5xx),
/// `getUpdates` included: 2 s doubling to 32 s, with jitter, for as long as
/// it lasts. The callers start it over after a success.
pub(crate) fn transient_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(2))
        .with_max_delay(Duration::from_secs(32))
        .without_max_times()
        .with_jitter()
}

/// Errors worth retrying: the network, unparsable answers (a proxy's HTML
/// page), and Telegram's own 5xx ("Internal Server Error", "Bad Gateway"…),
/// which teloxide reports as an unknown API error.
pub(crate) fn transient(e: &RequestError) -> bool {
    match e {
        RequestError::Network(_) | RequestError::Io(_) | RequestError::InvalidJson { .. } => true,
        RequestError::Api(ApiError::Unknown(text)) => {
            let t = text.to_ascii_lowercase();
            [
                "internal server error",
                "bad gateway",
                "gateway timeout",
                "service unavailable",
                "timed out",
            ]
            .iter()
            .any(|w| t.contains(w))
        }
        _ => false,
    }
}

/// Removes `token` (and its bot-id-free half) from `text`.
pub fn scrub(text: &str, token: &str) -> String {
    if token.is_empty() {
        return text.to_owned();
    }
    let mut out = text.replace(token, "[token]");
    if let Some((_, secret_half)) = token.split_once(':')
        && secret_half.len() >= 8
    {
        out = out.replace(secret_half, "[token]");
    }
    out
}
