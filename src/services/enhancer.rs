//! The prompt enhancer: an OpenAI-compatible `POST {LLM_API_URL}/chat/completions`.
//! It never fails the request: any problem gives back the original prompt
//! with the reason, which goes to the audit and never to the user.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::clean::clean_llm_answer;
use super::{MAX_CONNECTIONS, excerpt};
use crate::config::{LlmSettings, Settings};
use crate::engine::{Enhancement, Enhancer};

/// The largest LLM answer read (a prompt is ≤ 1000 characters).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

/// The enhancer over the shared client; `None` settings means "off".
pub struct LlmEnhancer {
    client: reqwest::Client,
    settings: Option<LlmSettings>,
    timeout: Duration,
    permits: Arc<Semaphore>,
    /// Each enhancement counted by outcome (`easel_llm_calls_total`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Why the original prompt is used instead of an enhanced one; its text
/// is what the audit records (`Enhanced.fallback`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnhanceError {
    #[error("enhancement is off (LLM_API_URL is not set)")]
    Off,
    #[error("the enhancer did not answer within {0} s")]
    TooSlow(u64),
    #[error("LLM_API_URL cannot take a path")]
    BadUrl,
    #[error("shutting down")]
    ShuttingDown,
    #[error("the enhancer timed out")]
    TimedOut,
    #[error("the enhancer could not be reached: {0}")]
    Unreachable(String),
    #[error("the enhancer's answer broke off: {0}")]
    BrokeOff(String),
    #[error("the enhancer's answer is too large")]
    TooLarge,
    #[error("the enhancer answered HTTP {status}: {excerpt}")]
    Status { status: u16, excerpt: String },
    #[error("the enhancer's answer is not the expected JSON: {0}")]
    NotJson(String),
    #[error("the enhancer's answer has no choices")]
    NoChoices,
    #[error("the enhancer's answer has no message content")]
    NoContent,
    #[error("the enhancer's answer was empty after cleaning")]
    Empty,
}

impl LlmEnhancer {
    pub fn new(client: reqwest::Client, settings: &Settings, permits: Arc<Semaphore>) -> Self {
        LlmEnhancer {
            client,
            settings: settings.llm.clone(),
            timeout: settings.llm_timeout,
            permits,
            metrics: None,
        }
    }

    /// Counts each enhancement in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// For tests and tools.
    pub fn from_parts(
        client: reqwest::Client,
        settings: Option<LlmSettings>,
        timeout: Duration,
    ) -> Self {
        LlmEnhancer {
            client,
            settings,
            timeout,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            metrics: None,
        }
    }

    /// The cleaned, enhanced prompt.
    ///
    /// # Errors
    /// Why the original prompt must be used instead, in words for the audit.
    pub async fn try_enhance(&self, prompt: &str) -> Result<String, EnhanceError> {
        let Some(llm) = &self.settings else {
            return Err(EnhanceError::Off);
        };
        match tokio::time::timeout(self.timeout, self.call(llm, prompt)).await {
            Ok(result) => result,
            Err(_) => Err(EnhanceError::TooSlow(self.timeout.as_secs())),
        }
    }

    async fn call(&self, llm: &LlmSettings, prompt: &str) -> Result<String, EnhanceError> {
        let mut url = llm.url.expose().clone();
        url.path_segments_mut()
            .map_err(|()| EnhanceError::BadUrl)?
            .pop_if_empty()
            .push("chat")
            .push("completions");
        let body = serde_json::json!({
            "model": llm.model,
            "messages": [
                {"role": "system", "content": llm.system_prompt},
                {"role": "user", "content": llm.user_template.replace("{prompt}", prompt)},
            ],
        });
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| EnhanceError::ShuttingDown)?;
        let mut request = self.client.post(url).json(&body);
        if let Some(key) = &llm.key {
            request = request.bearer_auth(key.expose_secret());
        }
        let mut response = request.send().await.map_err(|e| {
            let e = e.without_url();
            if e.is_timeout() {
                EnhanceError::TimedOut
            } else {
                EnhanceError::Unreachable(e.to_string())
            }
        })?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| EnhanceError::BrokeOff(e.without_url().to_string()))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(EnhanceError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        let secrets: Vec<&str> = llm.key.iter().map(|k| k.expose_secret()).collect();
        if !status.is_success() {
            return Err(EnhanceError::Status {
                status: status.as_u16(),
                excerpt: excerpt(&bytes, &secrets),
            });
        }
        let parsed: ChatResponse = serde_json::from_slice(&bytes)
            .map_err(|_| EnhanceError::NotJson(excerpt(&bytes, &secrets)))?;
        let content = parsed
            .choices
            .into_iter()
            .next()
            .ok_or(EnhanceError::NoChoices)?
            .message
            .and_then(|m| m.content)
            .ok_or(EnhanceError::NoContent)?;
        let cleaned = clean_llm_answer(&content);
        if cleaned.is_empty() {
            return Err(EnhanceError::Empty);
        }
        Ok(cleaned)
    }
}

impl Enhancer for LlmEnhancer {
    async fn enhance(&self, prompt: &str) -> Enhancement {
        let result = self.try_enhance(prompt).await;
        if let Some(m) = &self.metrics {
            m.enhancement(match &result {
                Ok(_) => "ok",
                Err(EnhanceError::Off) => "skipped",
                Err(EnhanceError::ShuttingDown) => "shutting_down",
                Err(EnhanceError::TooSlow(_) | EnhanceError::TimedOut) => "timeout",
                Err(EnhanceError::Unreachable(_) | EnhanceError::BadUrl) => "unreachable",
                Err(EnhanceError::Status { .. }) => "http_error",
                Err(_) => "bad_answer",
            });
        }
        match result {
            Ok(enhanced) => Enhancement {
                prompt: enhanced,
                fallback: None,
            },
            Err(reason) => {
                tracing::info!(%reason, "using the original prompt");
                Enhancement {
                    prompt: prompt.to_owned(),
                    fallback: Some(reason.to_string()),
                }
            }
        }
    }
}
