//! The outside services the core drives: the image workers (flux, sdxl and
//! any configured model) and the OpenAI-compatible prompt enhancer. The only
//! users of reqwest besides Telegram; one HTTP client for the process.

pub mod clean;
pub mod enhancer;
pub mod image_format;
pub mod worker;

use std::time::Duration;

pub use enhancer::LlmEnhancer;
pub use image_format::ImageFormat;
pub use worker::ImageWorkers;

use crate::config::Settings;

/// Connections the process keeps idle per host (the original design: ≤ 5).
pub const MAX_IDLE_PER_HOST: usize = 5;
/// Connections in use at once across all workers and the enhancer (≤ 10).
pub const MAX_CONNECTIONS: usize = 10;

/// The one HTTP client: rustls, separate connect and read timeouts, a
/// bounded idle pool. (In-use connections are bounded by the callers'
/// semaphore, as reqwest has no such limit.)
///
/// # Errors
/// When TLS cannot be initialised.
pub fn http_client(settings: &Settings) -> Result<reqwest::Client, reqwest::Error> {
    build_client(settings.connect_timeout, settings.worker_timeout)
}

/// As [`http_client`], from the two timeouts.
///
/// # Errors
/// When TLS cannot be initialised.
pub fn build_client(connect: Duration, read: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(connect)
        .read_timeout(read)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A short, printable excerpt of an answer body for the audit: at most
/// 160 characters, control characters removed, and `secrets` blanked.
pub(crate) fn excerpt(body: &[u8], secrets: &[&str]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "[redacted]");
    }
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    clean::truncate_chars(&out, 160).to_owned()
}
