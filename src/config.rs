//! Typed settings from the environment, a `.env` file and an optional
//! `easel.toml` (path in `EASEL_CONFIG`; the environment wins), validated
//! once at start. Secrets are `SecretString`s and URLs print without their
//! query or credentials, so formatting the settings never shows a secret.

mod data_dir;
mod sections;
pub use data_dir::DataDir;
use sections::{
    CONNECT_TIMEOUT_SECS, LEASE_SECS, LLM_TIMEOUT_SECS, MAX_VARIATIONS, REPLICAS, RETRY_BASE_MS,
    Vars, WORKER_TIMEOUT_SECS, limits_section, llm_section, log_section, models_section,
    presets_section, storage_section, telegram_section,
};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::{Limits, ModelName};

/// The default system message for the prompt enhancer. The improved
/// prompt is English whatever the user wrote in (§4): image models follow
/// English best, and many users write Persian.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You improve prompts for text-to-image models. Rewrite the user's prompt \
into one vivid, concrete image description: subject, setting, style, lighting, composition. Keep the user's \
intent. Always write the description in English, whatever language the user wrote in; keep names and any text \
that should appear in the image as the user wrote them. Answer with the improved prompt only, no preamble, \
no quotes, at most 900 characters.";
/// The default user message; `{prompt}` is replaced by the user's prompt.
pub const DEFAULT_USER_TEMPLATE: &str = "{prompt}";

/// How a worker is called (§4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `GET {url}?prompt=…`, no authentication (flux).
    FluxGet,
    /// `POST {url}` with JSON `{"prompt": …}` and a bearer key (sdxl).
    SdxlPost,
}

impl Protocol {
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "flux-get" => Some(Protocol::FluxGet),
            "sdxl-post" => Some(Protocol::SdxlPost),
            _ => None,
        }
    }
}

/// A URL that prints as `scheme://host[:port]/path` only: a key in the
/// query string or in user info never reaches a log line or a message.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(reqwest::Url);

impl ServiceUrl {
    /// # Errors
    /// A sentence naming `var` when the URL does not parse or is not http(s).
    fn parse(var: &str, raw: &str) -> Result<Self, String> {
        let url =
            reqwest::Url::parse(raw.trim()).map_err(|_| format!("{var} is not a valid URL."))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "{var} must start with http:// or https:// and name a host."
            ));
        }
        Ok(ServiceUrl(url))
    }

    /// The full URL, for making requests only.
    pub fn expose(&self) -> &reqwest::Url {
        &self.0
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.0;
        write!(f, "{}://{}", u.scheme(), u.host_str().unwrap_or("?"))?;
        if let Some(port) = u.port() {
            write!(f, ":{port}")?;
        }
        f.write_str(u.path())?;
        if u.query().is_some() {
            f.write_str("?…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({self})")
    }
}

/// One image model and how to reach its worker.
#[derive(Clone, Debug)]
pub struct ModelSettings {
    pub name: ModelName,
    pub url: ServiceUrl,
    pub protocol: Protocol,
    /// Bearer key (sdxl-post models), from the variable named `key_var`.
    pub key: Option<SecretString>,
    pub key_var: Option<String>,
    /// Image to image (§8): the strength sent with an input image, when
    /// the model takes one (`img2img = true` in easel.toml).
    pub img2img: Option<f64>,
}

/// A named prompt template from easel.toml (`[presets.<name>]`, §8):
/// `/image=<model>=<name>=<prompt>` draws `template` with `{prompt}`
/// replaced by the user's prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preset {
    /// Lowercase; matched case-insensitively.
    pub name: String,
    /// Holds `{prompt}` exactly once.
    pub template: String,
    /// The models it may be used with; empty means every model.
    pub models: Vec<ModelName>,
}

impl Preset {
    /// The prompt to draw: the template around the user's prompt.
    pub fn apply(&self, prompt: &str) -> String {
        self.template.replacen("{prompt}", prompt, 1)
    }

    /// Whether it may be used with `model`.
    pub fn allows(&self, model: &ModelName) -> bool {
        self.models.is_empty() || self.models.contains(model)
    }
}

/// The OpenAI-compatible prompt enhancer.
#[derive(Clone, Debug)]
pub struct LlmSettings {
    pub url: ServiceUrl,
    pub key: Option<SecretString>,
    pub model: String,
    pub system_prompt: String,
    /// The user message; `{prompt}` is replaced by the user's prompt.
    pub user_template: String,
}

/// Everything easel is configured with (§3).
#[derive(Clone, Debug)]
pub struct Settings {
    pub telegram_token: Option<SecretString>,
    pub telegram_api_url: ServiceUrl,
    /// Configured models, in the order they were declared (flux, sdxl, extras).
    pub models: Vec<ModelSettings>,
    /// Models named by the file but without a URL: "not configured" to users.
    pub disabled_models: Vec<ModelName>,
    pub llm: Option<LlmSettings>,
    pub data_dir: DataDir,
    pub limits: Limits,
    /// Empty means everyone may use the bot.
    pub allowed_users: BTreeSet<i64>,
    pub worker_timeout: Duration,
    pub connect_timeout: Duration,
    pub llm_timeout: Duration,
    pub retry_base: Duration,
    /// How long delivered originals are kept for the 📄 Original button.
    pub originals_ttl: Duration,
    /// Finished requests older than this leave the log for the archive
    /// (`EASEL_RETENTION_DAYS`); `None` keeps everything in the log.
    pub retention: Option<Duration>,
    pub log_filter: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`EASEL_METRICS_ADDR`);
    /// None: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The operator dashboard's token (`EASEL_DASHBOARD_TOKEN`): the
    /// dashboard is served at `/` of `metrics_addr` when set.
    pub dashboard_token: Option<SecretString>,
    /// The Telegram chat that gets operator alerts
    /// (`EASEL_OPERATOR_CHAT_ID`); None: no alerts.
    pub operator_chat: Option<i64>,
    /// Telegram's webhook (§9): where `easel run --webhook` listens, the
    /// public URL `easel webhook set` registers, and the secret token.
    pub webhook: WebhookSettings,
    /// How log lines are written (`EASEL_LOG_FORMAT`).
    pub log_format: crate::telemetry::LogFormat,
    /// Prompt presets, by name.
    pub presets: Vec<Preset>,
    /// The most images one request may ask for (`EASEL_MAX_VARIATIONS`).
    pub max_variations: u32,
    /// How many replicas share the bot (`EASEL_REPLICAS`, §9): each paces
    /// its Telegram calls at 1/N of the overall budget.
    pub replicas: u32,
    /// A model's lease on PostgreSQL (`EASEL_LEASE_SECS`, §9).
    pub lease: Duration,
}

/// `EASEL_WEBHOOK_*` (§9). The secret is never printed, and never named
/// in a problem (only the variable is).
#[derive(Clone, Debug, Default)]
pub struct WebhookSettings {
    pub listen: Option<std::net::SocketAddr>,
    pub url: Option<reqwest::Url>,
    pub secret: Option<SecretString>,
}

/// Whether `secret` is a token Telegram takes: 1–256 of `A-Z a-z 0-9 _ -`.
pub fn valid_webhook_secret(secret: &str) -> bool {
    (1..=256).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Every problem found in the configuration, one sentence each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join(" "))]
pub struct ConfigError(pub Vec<String>);

#[derive(Deserialize, Default)]
struct FileModel {
    name: String,
    url: Option<String>,
    protocol: String,
    key_env: Option<String>,
    #[serde(default)]
    img2img: bool,
    strength: Option<f64>,
}

#[derive(Deserialize, Default)]
struct FilePreset {
    template: String,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    models: Vec<FileModel>,
    #[serde(default)]
    presets: BTreeMap<String, FilePreset>,
    #[serde(flatten)]
    values: BTreeMap<String, toml::Value>,
}

/// Whether a secret is an obvious placeholder copied from an example file.
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    v.is_empty()
        || v.starts_with("xxx")
        || (v.starts_with('<') && v.ends_with('>'))
        || [
            "changeme",
            "change-me",
            "change_me",
            "your-key-here",
            "your_key_here",
            "your-api-key",
            "your_api_key",
            "placeholder",
            "todo",
            "secret",
        ]
        .contains(&v.as_str())
}

impl Settings {
    /// Reads `.env` (if present), `EASEL_CONFIG` (if set) and the process
    /// environment.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem.
    pub fn load() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is reported.
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => {
                return Err(ConfigError(vec![format!(
                    "The .env file could not be read: {e}."
                )]));
            }
        }
        let file = match std::env::var("EASEL_CONFIG") {
            Ok(path) if !path.trim().is_empty() => {
                Some(std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError(vec![format!(
                        "EASEL_CONFIG names {path}, which cannot be read: {e}."
                    )])
                })?)
            }
            _ => None,
        };
        Self::from_sources(|k| std::env::var(k).ok(), file.as_deref())
    }

    /// Builds settings from a variable lookup and an optional TOML text.
    /// Each section (Telegram, models, enhancer, limits, timeouts, storage)
    /// is read and checked on its own; every problem is one sentence and
    /// all of them are reported together.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem.
    pub fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        toml_text: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let file: FileConfig = match toml_text {
            None => FileConfig::default(),
            Some(text) => toml::from_str(text).unwrap_or_else(|e| {
                problems.push(format!("easel.toml is not valid TOML: {}.", e.message()));
                FileConfig::default()
            }),
        };
        let vars = Vars {
            env: &env,
            file: &file.values,
            problems: std::cell::RefCell::new(problems),
        };
        let (telegram_token, telegram_api_url) = telegram_section(&vars);
        let (models, disabled_models) = models_section(&vars, &file.models);
        let presets = presets_section(&vars, &file.presets, &models, &disabled_models);
        let llm = llm_section(&vars);
        let (limits, allowed_users) = limits_section(&vars);
        let worker_timeout = Duration::from_secs(vars.number(&WORKER_TIMEOUT_SECS));
        let connect_timeout = Duration::from_secs(vars.number(&CONNECT_TIMEOUT_SECS));
        let llm_timeout = Duration::from_secs(vars.number(&LLM_TIMEOUT_SECS));
        let retry_base = Duration::from_millis(vars.number(&RETRY_BASE_MS));
        let max_variations = u32::try_from(vars.number(&MAX_VARIATIONS)).unwrap_or(1);
        let replicas = u32::try_from(vars.number(&REPLICAS)).unwrap_or(1);
        let lease = Duration::from_secs(vars.number(&LEASE_SECS));
        let (data_dir, originals_ttl, retention) = storage_section(&vars);
        let (log_filter, log_format) = log_section(&vars);
        let metrics_addr = vars.non_empty("EASEL_METRICS_ADDR").and_then(|raw| {
            raw.trim().parse().map_err(|_| {
                vars.problem(format!(
                    "EASEL_METRICS_ADDR must be an address and port such as 127.0.0.1:9090 (got \"{}\").",
                    raw.trim()
                ));
            }).ok()
        });
        let dashboard_token = vars.non_empty("EASEL_DASHBOARD_TOKEN").and_then(|raw| {
            let token = raw.trim();
            if metrics_addr.is_none() && vars.non_empty("EASEL_METRICS_ADDR").is_none() {
                vars.problem(
                    "EASEL_DASHBOARD_TOKEN needs EASEL_METRICS_ADDR: the dashboard is served there (e.g. 127.0.0.1:9090).".into(),
                );
                None
            } else if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
                vars.problem(
                    "EASEL_DASHBOARD_TOKEN must be at least 16 characters, printable and without spaces (e.g. the output of `openssl rand -hex 16`).".into(),
                );
                None
            } else {
                Some(SecretString::from(token.to_owned()))
            }
        });
        let operator_chat = vars.non_empty("EASEL_OPERATOR_CHAT_ID").and_then(|raw| {
            raw.trim().parse::<i64>().ok().filter(|&id| id != 0).or_else(|| {
                vars.problem(format!(
                    "EASEL_OPERATOR_CHAT_ID must be a Telegram chat id such as 123456789 or -1001234567890 (got \"{}\").",
                    raw.trim()
                ));
                None
            })
        });
        let webhook = WebhookSettings {
            listen: vars.non_empty("EASEL_WEBHOOK_LISTEN").and_then(|raw| {
                raw.trim().parse().map_err(|_| {
                    vars.problem(format!(
                        "EASEL_WEBHOOK_LISTEN must be an address and port such as 127.0.0.1:8443 (got \"{}\").",
                        raw.trim()
                    ));
                }).ok()
            }),
            url: vars.non_empty("EASEL_WEBHOOK_URL").and_then(|raw| {
                match reqwest::Url::parse(raw.trim()) {
                    Ok(u) if u.scheme() == "https" && u.host().is_some() => Some(u),
                    _ => {
                        vars.problem(
                            "EASEL_WEBHOOK_URL must be the public https:// URL Telegram posts to, e.g. https://bot.example.com/telegram (Telegram only posts to HTTPS).".into(),
                        );
                        None
                    }
                }
            }),
            secret: vars.non_empty("EASEL_WEBHOOK_SECRET").and_then(|raw| {
                if valid_webhook_secret(raw.trim()) {
                    Some(SecretString::from(raw.trim().to_owned()))
                } else {
                    vars.problem(
                        "EASEL_WEBHOOK_SECRET must be 1 to 256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule for the secret token).".into(),
                    );
                    None
                }
            }),
        };

        let problems = vars.problems.into_inner();
        match (problems.is_empty(), telegram_api_url) {
            (true, Some(telegram_api_url)) => Ok(Settings {
                telegram_token,
                telegram_api_url,
                models,
                disabled_models,
                llm,
                data_dir,
                limits,
                allowed_users,
                worker_timeout,
                connect_timeout,
                llm_timeout,
                retry_base,
                originals_ttl,
                retention,
                log_filter,
                log_format,
                metrics_addr,
                dashboard_token,
                operator_chat,
                webhook,
                presets,
                max_variations,
                replicas,
                lease,
            }),
            _ => Err(ConfigError(problems)),
        }
    }

    /// The most images a request may ask for now: `EASEL_MAX_VARIATIONS`,
    /// and never more than the rate limit lets one request count.
    pub fn variations_allowed(&self) -> u32 {
        self.max_variations.min(self.limits.rate.count)
    }

    /// The configured models' names, in order (for help and usage texts).
    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.to_string()).collect()
    }

    /// Whether `user` may use the bot (an empty allowlist allows everyone).
    pub fn allows(&self, user: i64) -> bool {
        self.allowed_users.is_empty() || self.allowed_users.contains(&user)
    }

    /// The preset a prompt starts with, and the prompt after it:
    /// `anime=a cat` names preset `anime` when one is configured under
    /// that name (any case); anything else is no preset, and the whole
    /// text is the prompt (§8).
    pub fn preset_in<'p>(&self, prompt: &'p str) -> Option<(&Preset, &'p str)> {
        let (name, rest) = prompt.split_once('=')?;
        let name = name.trim();
        let preset = self
            .presets
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))?;
        Some((preset, rest.trim()))
    }

    pub fn model(&self, name: &ModelName) -> Option<&ModelSettings> {
        self.models.iter().find(|m| &m.name == name)
    }

    /// Every secret value, for tests and log scrubbing.
    pub fn secrets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Some(t) = &self.telegram_token {
            out.push(t.expose_secret());
        }
        for m in &self.models {
            if let Some(k) = &m.key {
                out.push(k.expose_secret());
            }
        }
        if let Some(k) = self.llm.as_ref().and_then(|l| l.key.as_ref()) {
            out.push(k.expose_secret());
        }
        out
    }
}

/// A summary for the start-up log: what is configured, never a secret.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: bool| if s { "set" } else { "not set" };
        writeln!(
            f,
            "telegram: {} (token {})",
            self.telegram_api_url,
            set(self.telegram_token.is_some())
        )?;
        for m in &self.models {
            writeln!(
                f,
                "model {}: {:?} at {} (key {})",
                m.name,
                m.protocol,
                m.url,
                set(m.key.is_some())
            )?;
        }
        for m in &self.disabled_models {
            writeln!(f, "model {m}: not configured")?;
        }
        match &self.llm {
            Some(l) => writeln!(
                f,
                "enhancer: {} model {} (key {})",
                l.url,
                l.model,
                set(l.key.is_some())
            )?,
            None => writeln!(f, "enhancer: off (original prompts are used)")?,
        }
        writeln!(f, "data dir: {}", self.data_dir)?;
        match self.retention {
            Some(r) => writeln!(
                f,
                "retention: finished requests older than {} days go to the archive",
                r.as_secs() / 86_400
            )?,
            None => writeln!(f, "retention: off (the log keeps every request)")?,
        }
        writeln!(
            f,
            "limits: {}/{} s per user, {} pending; allowed users: {}",
            self.limits.rate.count,
            self.limits.rate.window_secs,
            self.limits.max_pending,
            if self.allowed_users.is_empty() {
                "everyone".to_owned()
            } else {
                self.allowed_users.len().to_string()
            }
        )?;
        match self.metrics_addr {
            Some(a) => writeln!(
                f,
                "metrics and health: http://{a}/metrics, /healthz, /readyz"
            )?,
            None => writeln!(f, "metrics and health: off")?,
        }
        match (self.metrics_addr, &self.dashboard_token) {
            (Some(a), Some(_)) => writeln!(f, "operator dashboard: http://{a}/")?,
            _ => writeln!(f, "operator dashboard: off")?,
        }
        writeln!(
            f,
            "operator alerts: {}",
            if self.operator_chat.is_some() {
                "on"
            } else {
                "off"
            }
        )?;
        write!(
            f,
            "timeouts: worker {:?}, connect {:?}, enhancer {:?}; retry base {:?}",
            self.worker_timeout, self.connect_timeout, self.llm_timeout, self.retry_base
        )
    }
}
