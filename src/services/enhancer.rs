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
}

impl LlmEnhancer {
    pub fn new(client: reqwest::Client, settings: &Settings, permits: Arc<Semaphore>) -> Self {
        LlmEnhancer {
            client,
            settings: settings.llm.clone(),
            timeout: settings.llm_timeout,
            permits,
        }
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
        }
    }

    /// The cleaned, enhanced prompt.
    ///
    /// # Errors
    /// Why the original prompt must be used instead, in words for the audit.
    pub async fn try_enhance(&self, prompt: &str) -> Result<String, String> {
        let Some(llm) = &self.settings else {
            return Err("enhancement is off (LLM_API_URL is not set)".into());
        };
        match tokio::time::timeout(self.timeout, self.call(llm, prompt)).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the enhancer did not answer within {} s",
                self.timeout.as_secs()
            )),
        }
    }

    async fn call(&self, llm: &LlmSettings, prompt: &str) -> Result<String, String> {
        let mut url = llm.url.expose().clone();
        url.path_segments_mut()
            .map_err(|()| "LLM_API_URL cannot take a path".to_owned())?
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
            .map_err(|_| "shutting down".to_owned())?;
        let mut request = self.client.post(url).json(&body);
        if let Some(key) = &llm.key {
            request = request.bearer_auth(key.expose_secret());
        }
        let mut response = request.send().await.map_err(|e| {
            let e = e.without_url();
            if e.is_timeout() {
                "the enhancer timed out".to_owned()
            } else {
                format!("the enhancer could not be reached: {e}")
            }
        })?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("the enhancer's answer broke off: {}", e.without_url()))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err("the enhancer's answer is too large".into());
            }
            bytes.extend_from_slice(&chunk);
        }
        let secrets: Vec<&str> = llm.key.iter().map(|k| k.expose_secret()).collect();
        if !status.is_success() {
            return Err(format!(
                "the enhancer answered HTTP {}: {}",
                status.as_u16(),
                excerpt(&bytes, &secrets)
            ));
        }
        let parsed: ChatResponse = serde_json::from_slice(&bytes).map_err(|_| {
            format!(
                "the enhancer's answer is not the expected JSON: {}",
                excerpt(&bytes, &secrets)
            )
        })?;
        let content = parsed
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| "the enhancer's answer has no choices".to_owned())?
            .message
            .and_then(|m| m.content)
            .ok_or_else(|| "the enhancer's answer has no message content".to_owned())?;
        let cleaned = clean_llm_answer(&content);
        if cleaned.is_empty() {
            return Err("the enhancer's answer was empty after cleaning".into());
        }
        Ok(cleaned)
    }
}

impl Enhancer for LlmEnhancer {
    async fn enhance(&self, prompt: &str) -> Enhancement {
        match self.try_enhance(prompt).await {
            Ok(enhanced) => Enhancement {
                prompt: enhanced,
                fallback: None,
            },
            Err(reason) => {
                tracing::info!(%reason, "using the original prompt");
                Enhancement {
                    prompt: prompt.to_owned(),
                    fallback: Some(reason),
                }
            }
        }
    }
}
