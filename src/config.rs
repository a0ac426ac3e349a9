//! Typed settings from the environment, a `.env` file and an optional
//! `easel.toml` (path in `EASEL_CONFIG`; the environment wins), validated
//! once at start. Secrets are `SecretString`s and URLs print without their
//! query or credentials, so formatting the settings never shows a secret.

mod data_dir;
pub use data_dir::DataDir;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::admission::{MAX_RATE_WINDOW_SECS, MAX_RECENT_PER_USER};
use crate::domain::{Limits, ModelName, RateLimit};

/// The default system message for the prompt enhancer.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You improve prompts for text-to-image models. Rewrite the user's prompt \
into one vivid, concrete image description: subject, setting, style, lighting, composition. Keep the user's \
intent and language. Answer with the improved prompt only, no preamble, no quotes, at most 900 characters.";
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
}

#[derive(Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    models: Vec<FileModel>,
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
        // The environment wins over the file.
        let get = |k: &str| -> Option<String> {
            env(k).or_else(|| match file.values.get(k) {
                Some(toml::Value::String(s)) => Some(s.clone()),
                Some(toml::Value::Integer(i)) => Some(i.to_string()),
                Some(toml::Value::Float(f)) => Some(f.to_string()),
                Some(toml::Value::Boolean(b)) => Some(b.to_string()),
                _ => None,
            })
        };
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());

        let secret =
            |var: &str, required: bool, problems: &mut Vec<String>| -> Option<SecretString> {
                match get(var) {
                    Some(v) if !is_placeholder(&v) => Some(SecretString::from(v.trim().to_owned())),
                    Some(_) => {
                        problems.push(format!(
                            "{var} is empty or a placeholder; set the real key."
                        ));
                        None
                    }
                    None if required => {
                        problems.push(format!("{var} is not set."));
                        None
                    }
                    None => None,
                }
            };

        let telegram_token = match get("TELEGRAM_BOT_TOKEN") {
            Some(t) if is_placeholder(&t) => {
                problems.push(
                    "TELEGRAM_BOT_TOKEN is empty or a placeholder; use the token from @BotFather."
                        .into(),
                );
                None
            }
            Some(t) if !t.trim().contains(':') => {
                problems.push("TELEGRAM_BOT_TOKEN does not look like a bot token (digits, a colon, then letters).".into());
                None
            }
            Some(t) => Some(SecretString::from(t.trim().to_owned())),
            None => None,
        };
        let telegram_api_url = match ServiceUrl::parse(
            "TELEGRAM_API_URL",
            &non_empty("TELEGRAM_API_URL").unwrap_or_else(|| "https://api.telegram.org".into()),
        ) {
            Ok(u) => Some(u),
            Err(p) => {
                problems.push(p);
                None
            }
        };

        let mut models = Vec::new();
        let mut disabled_models = Vec::new();
        let mut declare = |name: &str,
                           url_var: Option<&str>,
                           url: Option<String>,
                           protocol: Protocol,
                           key_var: Option<String>,
                           problems: &mut Vec<String>| {
            let Ok(model) = ModelName::parse(name) else {
                problems.push(format!("Model name \"{name}\" in easel.toml must be 1 to 32 letters, digits, '-' or '_'."));
                return;
            };
            if models.iter().any(|m: &ModelSettings| m.name == model) {
                problems.push(format!("Model {model} is declared twice."));
                return;
            }
            let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
                disabled_models.push(model);
                return;
            };
            let label = url_var.map_or_else(|| format!("The URL of model {model}"), str::to_owned);
            let url = match ServiceUrl::parse(&label, &url) {
                Ok(u) => u,
                Err(p) => {
                    problems.push(p);
                    return;
                }
            };
            let key = key_var
                .as_deref()
                .and_then(|var| secret(var, protocol == Protocol::SdxlPost, problems));
            models.push(ModelSettings {
                name: model,
                url,
                protocol,
                key,
                key_var,
            });
        };
        declare(
            "flux",
            Some("FLUX_WORKER_URL"),
            get("FLUX_WORKER_URL"),
            Protocol::FluxGet,
            None,
            &mut problems,
        );
        declare(
            "sdxl",
            Some("SDXL_WORKER_URL"),
            get("SDXL_WORKER_URL"),
            Protocol::SdxlPost,
            Some("SDXL_API_KEY".into()),
            &mut problems,
        );
        for m in &file.models {
            let Some(protocol) = Protocol::parse(&m.protocol) else {
                problems.push(format!(
                    "Model {} in easel.toml has protocol \"{}\"; use flux-get or sdxl-post.",
                    m.name, m.protocol
                ));
                continue;
            };
            if protocol == Protocol::SdxlPost && m.key_env.is_none() {
                problems.push(format!("Model {} in easel.toml speaks sdxl-post and needs key_env, the variable holding its key.", m.name));
                continue;
            }
            // A model's URL may also come from the environment: <NAME>_WORKER_URL.
            let env_var = format!(
                "{}_WORKER_URL",
                m.name.to_ascii_uppercase().replace('-', "_")
            );
            let url = env(&env_var).or_else(|| m.url.clone());
            declare(
                &m.name,
                None,
                url,
                protocol,
                m.key_env.clone(),
                &mut problems,
            );
        }

        let llm = match non_empty("LLM_API_URL") {
            None => None,
            Some(raw) => {
                match ServiceUrl::parse("LLM_API_URL", &raw) {
                    Err(p) => {
                        problems.push(p);
                        None
                    }
                    Ok(url) => {
                        let key = match get("LLM_API_KEY") {
                            None => None,
                            Some(k) if k.trim().is_empty() => None,
                            Some(k) if is_placeholder(&k) => {
                                problems.push("LLM_API_KEY is a placeholder; set the real key or leave it unset.".into());
                                None
                            }
                            Some(k) => Some(SecretString::from(k.trim().to_owned())),
                        };
                        let user_template = non_empty("EASEL_LLM_USER_TEMPLATE")
                            .unwrap_or_else(|| DEFAULT_USER_TEMPLATE.into());
                        if !user_template.contains("{prompt}") {
                            problems.push("EASEL_LLM_USER_TEMPLATE must contain {prompt}, where the user's prompt goes.".into());
                        }
                        Some(LlmSettings {
                            url,
                            key,
                            model: non_empty("LLM_MODEL")
                                .unwrap_or_else(|| "gpt-4o-mini".into())
                                .trim()
                                .to_owned(),
                            system_prompt: non_empty("EASEL_LLM_SYSTEM_PROMPT")
                                .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into()),
                            user_template,
                        })
                    }
                }
            }
        };

        let number =
            |var: &str, default: u64, min: u64, max: u64, problems: &mut Vec<String>| -> u64 {
                match non_empty(var) {
                    None => default,
                    Some(raw) => match raw.trim().parse::<u64>() {
                        Ok(n) if (min..=max).contains(&n) => n,
                        _ => {
                            problems.push(format!(
                                "{var} must be a whole number from {min} to {max} (got \"{}\").",
                                raw.trim()
                            ));
                            default
                        }
                    },
                }
            };
        let worker_timeout = Duration::from_secs(number(
            "EASEL_WORKER_TIMEOUT_SECS",
            120,
            1,
            3600,
            &mut problems,
        ));
        let connect_timeout = Duration::from_secs(number(
            "EASEL_CONNECT_TIMEOUT_SECS",
            30,
            1,
            600,
            &mut problems,
        ));
        let llm_timeout =
            Duration::from_secs(number("EASEL_LLM_TIMEOUT_SECS", 30, 1, 600, &mut problems));
        let retry_base = Duration::from_millis(number(
            "EASEL_RETRY_BASE_MS",
            1000,
            1,
            600_000,
            &mut problems,
        ));
        let originals_ttl = Duration::from_secs(
            3600 * number("EASEL_ORIGINALS_TTL_HOURS", 24, 1, 720, &mut problems),
        );
        // At least 2 days: Telegram redelivers updates for 24 h, and the
        // longest rate-limit window is a day, so nothing archived can still
        // matter to intake.
        let retention = match non_empty("EASEL_RETENTION_DAYS").map(|v| v.trim().to_owned()) {
            None => Some(Duration::from_secs(86_400 * 30)),
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) => match v.parse::<u64>() {
                Ok(days) if (2..=36_500).contains(&days) => {
                    Some(Duration::from_secs(86_400 * days))
                }
                _ => {
                    problems.push(format!(
                        "EASEL_RETENTION_DAYS must be a whole number of days from 2 to 36500, or off (got \"{v}\")."
                    ));
                    None
                }
            },
        };
        let max_pending = number("EASEL_MAX_PENDING_PER_USER", 3, 1, 1000, &mut problems) as u32;

        let rate = match non_empty("EASEL_RATE_LIMIT") {
            None => RateLimit {
                count: 5,
                window_secs: 60,
            },
            Some(raw) => match parse_rate(&raw) {
                Some(r) => r,
                None => {
                    problems.push(format!(
                        "EASEL_RATE_LIMIT must be N/SECONDS with N from 1 to {MAX_RECENT_PER_USER} and SECONDS from 1 to {MAX_RATE_WINDOW_SECS} (got \"{}\").",
                        raw.trim()
                    ));
                    RateLimit {
                        count: 5,
                        window_secs: 60,
                    }
                }
            },
        };

        let mut allowed_users = BTreeSet::new();
        if let Some(raw) = non_empty("EASEL_ALLOWED_USERS") {
            for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match part.parse::<i64>() {
                    Ok(id) => {
                        allowed_users.insert(id);
                    }
                    Err(_) => problems.push(format!(
                        "EASEL_ALLOWED_USERS must be comma-separated Telegram user ids; \"{part}\" is not one."
                    )),
                }
            }
        }

        let data_dir = DataDir::new(
            non_empty("EASEL_DATA_DIR")
                .unwrap_or_else(|| "./data".into())
                .trim(),
        );
        let log_filter = non_empty("RUST_LOG").unwrap_or_else(|| "info".into());

        match (problems.is_empty(), telegram_api_url) {
            (true, Some(telegram_api_url)) => Ok(Settings {
                telegram_token,
                telegram_api_url,
                models,
                disabled_models,
                llm,
                data_dir,
                limits: Limits { rate, max_pending },
                allowed_users,
                worker_timeout,
                connect_timeout,
                llm_timeout,
                retry_base,
                originals_ttl,
                retention,
                log_filter,
            }),
            _ => Err(ConfigError(problems)),
        }
    }

    /// The configured models' names, in order (for help and usage texts).
    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.to_string()).collect()
    }

    /// Whether `user` may use the bot (an empty allowlist allows everyone).
    pub fn allows(&self, user: i64) -> bool {
        self.allowed_users.is_empty() || self.allowed_users.contains(&user)
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

/// `N/SECONDS` within the bounds the projections can answer for.
fn parse_rate(raw: &str) -> Option<RateLimit> {
    let (n, secs) = raw.trim().split_once('/')?;
    let count: u32 = n.trim().parse().ok()?;
    let window_secs: u64 = secs.trim().parse().ok()?;
    ((1..=MAX_RECENT_PER_USER as u32).contains(&count)
        && (1..=MAX_RATE_WINDOW_SECS).contains(&window_secs))
    .then_some(RateLimit { count, window_secs })
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
        write!(
            f,
            "timeouts: worker {:?}, connect {:?}, enhancer {:?}; retry base {:?}",
            self.worker_timeout, self.connect_timeout, self.llm_timeout, self.retry_base
        )
    }
}
