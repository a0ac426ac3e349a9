//! The image workers: flux-get (`GET ?prompt=`) and sdxl-post (`POST` JSON
//! with a bearer key), for the built-in models and any configured one. Every
//! answer row of §4: raw image bytes or `{"image": base64}` checked by magic
//! number; retries with exponential backoff and jitter (backon), at most 3,
//! honouring `Retry-After`; the content filter and other 4xx not retried.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use base64::Engine as _;
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;

use super::{ImageFormat, MAX_CONNECTIONS, excerpt};
use crate::config::{ModelSettings, Protocol, Settings};
use crate::domain::{FailureKind, ModelName};
use crate::engine::{GeneratedImage, GenerationFailure, Generator};

/// Retries after the first attempt (4 attempts in all).
pub const MAX_RETRIES: usize = 3;
/// The longest `Retry-After` easel waits for; longer asks are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// The largest answer read from a worker (Telegram takes documents ≤ 50 MB).
pub const MAX_ANSWER_BYTES: usize = 50 * 1024 * 1024;

/// Words in a 4xx body that mean the model's content filter refused.
const MODERATION_WORDS: [&str; 4] = ["nsfw", "moderation", "flagged", "safety"];

/// What one attempt ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Timeout,
    Connect(String),
    /// 5xx or 429: retried.
    Busy {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 200 (or another 2xx/3xx) that is not an image: retried.
    NotImage(String),
    /// 451, or a 4xx naming the content filter: not retried.
    Rejected {
        status: u16,
        excerpt: String,
    },
    /// Any other 4xx: not retried.
    Refused {
        status: u16,
        excerpt: String,
    },
}

impl Attempt {
    fn retryable(&self) -> bool {
        matches!(
            self,
            Attempt::Timeout | Attempt::Connect(_) | Attempt::Busy { .. } | Attempt::NotImage(_)
        )
    }

    /// The status recorded for the audit.
    fn label(&self) -> String {
        match self {
            Attempt::Timeout => "timeout".into(),
            Attempt::Connect(_) => "connection error".into(),
            Attempt::Busy { status, .. }
            | Attempt::Rejected { status, .. }
            | Attempt::Refused { status, .. } => status.to_string(),
            Attempt::NotImage(_) => "200 not an image".into(),
        }
    }

    fn failure(&self, attempts: u32, statuses: Vec<String>) -> GenerationFailure {
        let (kind, reason) = match self {
            Attempt::Timeout => (
                FailureKind::TimedOut,
                "the worker did not answer in time".to_owned(),
            ),
            Attempt::Connect(e) => (
                FailureKind::Unavailable,
                format!("could not reach the worker: {e}"),
            ),
            Attempt::Busy { status, .. } => (
                FailureKind::Unavailable,
                format!("the worker answered HTTP {status}"),
            ),
            Attempt::NotImage(what) => (FailureKind::BadAnswer, what.clone()),
            Attempt::Rejected { status, excerpt } => (
                FailureKind::Rejected,
                format!("the content filter refused (HTTP {status}): {excerpt}"),
            ),
            Attempt::Refused { status: 408, .. } => (
                FailureKind::TimedOut,
                "the worker timed out (HTTP 408)".into(),
            ),
            Attempt::Refused { status, excerpt } => (
                FailureKind::Refused,
                format!("the worker refused the request (HTTP {status}): {excerpt}"),
            ),
        };
        GenerationFailure {
            kind,
            reason,
            attempts,
            statuses,
        }
    }
}

/// The image workers of every configured model, on one shared client.
pub struct ImageWorkers {
    client: reqwest::Client,
    models: Vec<ModelSettings>,
    retry_base: Duration,
    /// The whole of one attempt, answer body included (§4): the client's
    /// read timeout restarts at every byte, so a worker that trickles its
    /// answer would hold the model's lane forever without it.
    attempt_deadline: Duration,
    permits: Arc<Semaphore>,
    /// Which retry each model's call is on, for the status messages.
    retries: crate::engine::Retries,
    /// Each attempt counted (`easel_worker_attempts_total`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// A refused key (401/403) alerts the operator; an image clears it.
    alerts: Option<Arc<crate::alerts::Alerts>>,
}

impl ImageWorkers {
    /// `permits` bounds connections in use across the process.
    pub fn new(client: reqwest::Client, settings: &Settings, permits: Arc<Semaphore>) -> Self {
        ImageWorkers {
            client,
            models: settings.models.clone(),
            retry_base: settings.retry_base,
            attempt_deadline: settings.worker_timeout,
            permits,
            retries: crate::engine::Retries::default(),
            metrics: None,
            alerts: None,
        }
    }

    /// Counts each attempt in `metrics` and tells `alerts` of refused keys.
    #[must_use]
    pub fn with_watchers(
        mut self,
        metrics: Arc<crate::metrics::Metrics>,
        alerts: Arc<crate::alerts::Alerts>,
    ) -> Self {
        self.metrics = Some(metrics);
        self.alerts = Some(alerts);
        self
    }

    /// Reports each retry to `retries` (the status board shows them).
    #[must_use]
    pub fn with_retries(mut self, retries: crate::engine::Retries) -> Self {
        self.retries = retries;
        self
    }

    /// For tests and tools: explicit models, backoff base and deadline of
    /// one attempt.
    pub fn from_parts(
        client: reqwest::Client,
        models: Vec<ModelSettings>,
        retry_base: Duration,
        attempt_deadline: Duration,
    ) -> Self {
        ImageWorkers {
            client,
            models,
            retry_base,
            attempt_deadline,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            retries: crate::engine::Retries::default(),
            metrics: None,
            alerts: None,
        }
    }

    /// One call; `body` is the sdxl-post JSON (`prompt`, and for image to
    /// image `image` and `strength`).
    async fn attempt(
        &self,
        model: &ModelSettings,
        prompt: &str,
        body: &serde_json::Value,
    ) -> Result<(Vec<u8>, ImageFormat), Attempt> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Attempt::Connect("shutting down".into()))?;
        let request = match model.protocol {
            Protocol::FluxGet => self
                .client
                .get(model.url.expose().clone())
                .query(&[("prompt", prompt)]),
            Protocol::SdxlPost => {
                let r = self.client.post(model.url.expose().clone()).json(body);
                match &model.key {
                    Some(key) => r.bearer_auth(key.expose_secret()),
                    None => r,
                }
            }
        };
        let answer = async {
            let response = request.send().await.map_err(transport)?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(parse_retry_after);
            let body = read_limited(response).await?;
            Ok::<_, Attempt>((status, retry_after, body))
        };
        let (status, retry_after, body) = tokio::time::timeout(self.attempt_deadline, answer)
            .await
            .map_err(|_| Attempt::Timeout)??;
        let secrets: Vec<&str> = model.key.iter().map(|k| k.expose_secret()).collect();
        match status {
            200 => decode_image(&body, &secrets),
            429 | 500..=599 => Err(Attempt::Busy {
                status,
                retry_after,
            }),
            451 => Err(Attempt::Rejected {
                status,
                excerpt: excerpt(&body, &secrets),
            }),
            400..=499 => {
                let text = String::from_utf8_lossy(&body[..body.len().min(8192)]).to_lowercase();
                if MODERATION_WORDS.iter().any(|w| text.contains(w)) {
                    Err(Attempt::Rejected {
                        status,
                        excerpt: excerpt(&body, &secrets),
                    })
                } else {
                    Err(Attempt::Refused {
                        status,
                        excerpt: excerpt(&body, &secrets),
                    })
                }
            }
            other => Err(Attempt::NotImage(format!(
                "the worker answered HTTP {other} instead of an image"
            ))),
        }
    }
}

impl ImageWorkers {
    /// Counts one attempt and tells the alerts what the worker answered.
    async fn watch(&self, model: &ModelName, r: &Result<(Vec<u8>, ImageFormat), Attempt>) {
        let (class, status) = match r {
            Ok(_) => ("2xx", Some(200)),
            Err(Attempt::Timeout) => ("timeout", None),
            Err(Attempt::Connect(_)) => ("connect", None),
            Err(Attempt::NotImage(_)) => ("not_image", None),
            Err(
                Attempt::Busy { status, .. }
                | Attempt::Rejected { status, .. }
                | Attempt::Refused { status, .. },
            ) => (
                crate::metrics::Metrics::status_class(*status),
                Some(*status),
            ),
        };
        if let Some(m) = &self.metrics {
            m.worker_attempt(model, class);
        }
        if let Some(a) = &self.alerts {
            a.worker_answered(model, status).await;
        }
    }
}

/// A transport error in words, without the URL (it may carry a key).
fn transport(e: reqwest::Error) -> Attempt {
    if e.is_timeout() {
        Attempt::Timeout
    } else {
        let e = e.without_url();
        // The innermost cause says what happened ("connection refused").
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        Attempt::Connect(cause.to_string())
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, Attempt> {
    // One copy of the bytes: sized once from Content-Length when it is
    // given (and sane), instead of growing by doubling.
    let announced = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= MAX_ANSWER_BYTES)
        .unwrap_or(0);
    let mut body = Vec::with_capacity(announced);
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Attempt::NotImage(format!(
                "the answer is larger than {} MB",
                MAX_ANSWER_BYTES >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &reqwest::header::HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let wait = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Raw image bytes, or JSON `{"image": base64}` (also `{"result": {"image": …}}`
/// as Workers AI wraps it), checked by magic number.
fn decode_image(body: &[u8], secrets: &[&str]) -> Result<(Vec<u8>, ImageFormat), Attempt> {
    if let Some(format) = ImageFormat::sniff(body) {
        return Ok((body.to_vec(), format));
    }
    let trimmed = body.trim_ascii_start();
    if trimmed.starts_with(b"{") {
        let json: serde_json::Value = serde_json::from_slice(trimmed)
            .map_err(|_| Attempt::NotImage("the worker answered 200 with broken JSON".into()))?;
        let b64 = json
            .get("image")
            .or_else(|| json.get("result").and_then(|r| r.get("image")))
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                Attempt::NotImage(format!(
                    "the worker answered 200 with JSON and no image: {}",
                    excerpt(body, secrets)
                ))
            })?;
        // Accept a data URL too: data:image/png;base64,....
        let b64 = b64
            .split_once(";base64,")
            .map_or(b64, |(_, data)| data)
            .trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| Attempt::NotImage("the worker's base64 image does not decode".into()))?;
        return match ImageFormat::sniff(&bytes) {
            Some(format) => Ok((bytes, format)),
            None => Err(Attempt::NotImage(
                "the worker's base64 data is not a PNG, JPEG or WebP image".into(),
            )),
        };
    }
    Err(Attempt::NotImage(format!(
        "the worker answered 200 with something that is not an image: {}",
        excerpt(body, secrets)
    )))
}

impl Generator for ImageWorkers {
    async fn generate(
        &self,
        model: &ModelName,
        prompt: &str,
        input: Option<&[u8]>,
    ) -> Result<GeneratedImage, GenerationFailure> {
        let Some(settings) = self.models.iter().find(|m| &m.name == model) else {
            return Err(GenerationFailure {
                kind: FailureKind::NotConfigured,
                reason: format!("model {model} is not configured"),
                attempts: 0,
                statuses: Vec::new(),
            });
        };
        let statuses: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry_base)
            .with_factor(2.0)
            .with_max_times(MAX_RETRIES)
            .with_max_delay(
                self.retry_base
                    .saturating_mul(16)
                    .max(Duration::from_secs(1)),
            )
            .with_jitter();
        // Image to image (§8): encoded once, sent with every attempt; only
        // a model configured with img2img gets it (intake refuses an
        // input for the others, so this is a second line of defence).
        let body = match (input, settings.img2img) {
            (Some(bytes), Some(strength)) => serde_json::json!({
                "prompt": prompt,
                "image": base64::engine::general_purpose::STANDARD.encode(bytes),
                "strength": strength,
            }),
            _ => serde_json::json!({ "prompt": prompt }),
        };
        let result = (|| async {
            let r = self.attempt(settings, prompt, &body).await;
            let label = match &r {
                Ok(_) => "200".to_owned(),
                Err(a) => a.label(),
            };
            statuses.lock().unwrap_or_else(PoisonError::into_inner).push(label);
            self.watch(&settings.name, &r).await;
            r
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(Attempt::retryable)
        // Retry-After wins over our own delay; when backon has no delay
        // left (retries used up) there is no retry to delay.
        .adjust(|e, delay| match e {
            Attempt::Busy { retry_after: Some(ra), .. } => delay.map(|_| *ra),
            _ => delay,
        })
        .notify(|e, delay| {
            tracing::warn!(model = %settings.name, attempt = %e.label(), ?delay, "worker attempt failed; retrying");
            // The attempts made so far: the next one is retry number that.
            let made = statuses.lock().unwrap_or_else(PoisonError::into_inner).len();
            self.retries
                .set(&settings.name, u32::try_from(made).unwrap_or(u32::MAX));
        })
        .await;
        self.retries.clear(&settings.name);
        let statuses = statuses
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let attempts = statuses.len() as u32;
        match result {
            Ok((bytes, format)) => Ok(GeneratedImage {
                bytes,
                format: format.extension().to_owned(),
                attempts,
                statuses,
            }),
            Err(last) => {
                let failure = last.failure(attempts, statuses);
                tracing::warn!(model = %settings.name, kind = failure.kind.as_str(), attempts, "generation failed");
                Err(failure)
            }
        }
    }
}

/// Decodes a worker's `200` body as §4 says (raw image or JSON base64).
/// Public for the fuzz campaign.
///
/// # Errors
/// When the body is not an image: the failure as the audit records it.
pub fn decode_answer(body: &[u8]) -> Result<(Vec<u8>, ImageFormat), GenerationFailure> {
    decode_image(body, &[]).map_err(|a| a.failure(1, Vec::new()))
}
