//! The sections of the settings, each read and checked on its own from
//! one source of values ([`Vars`]: the environment, then easel.toml's
//! top-level keys), every default and bound written once ([`Knob`]),
//! every problem one sentence naming its variable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use secrecy::SecretString;

use super::{
    DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_TEMPLATE, DataDir, FileModel, FilePreset, LlmSettings,
    ModelSettings, Preset, Protocol, ServiceUrl, is_placeholder,
};
use crate::domain::admission::{MAX_RATE_WINDOW_SECS, MAX_RECENT_PER_USER};
use crate::domain::{Limits, ModelName, RateLimit};

/// A whole-number setting: its variable, default and bounds, written once.
pub(super) struct Knob {
    var: &'static str,
    default: u64,
    min: u64,
    max: u64,
}

pub(super) const WORKER_TIMEOUT_SECS: Knob = Knob {
    var: "EASEL_WORKER_TIMEOUT_SECS",
    default: 120,
    min: 1,
    max: 3600,
};
pub(super) const CONNECT_TIMEOUT_SECS: Knob = Knob {
    var: "EASEL_CONNECT_TIMEOUT_SECS",
    default: 30,
    min: 1,
    max: 600,
};
pub(super) const LLM_TIMEOUT_SECS: Knob = Knob {
    var: "EASEL_LLM_TIMEOUT_SECS",
    default: 30,
    min: 1,
    max: 600,
};
pub(super) const RETRY_BASE_MS: Knob = Knob {
    var: "EASEL_RETRY_BASE_MS",
    default: 1000,
    min: 1,
    max: 600_000,
};
const ORIGINALS_TTL_HOURS: Knob = Knob {
    var: "EASEL_ORIGINALS_TTL_HOURS",
    default: 24,
    min: 1,
    max: 720,
};
const MAX_PENDING_PER_USER: Knob = Knob {
    var: "EASEL_MAX_PENDING_PER_USER",
    default: 3,
    min: 1,
    max: 1000,
};
/// Images one `/image=<model>*N=…` may ask for (§8): 1 turns variations
/// off; at most 10, the most one Telegram album holds.
pub(super) const MAX_VARIATIONS: Knob = Knob {
    var: "EASEL_MAX_VARIATIONS",
    default: 4,
    min: 1,
    max: 10,
};
/// How many `easel run` replicas share the bot (§9): each paces its
/// Telegram calls at this share of the overall budget.
pub(super) const REPLICAS: Knob = Knob {
    var: "EASEL_REPLICAS",
    default: 1,
    min: 1,
    max: 20,
};
/// A model's lease on PostgreSQL (§9), in seconds: how long a replica
/// that stopped answering holds up its model before another takes over
/// (renewed every third of it while a generation runs).
pub(super) const LEASE_SECS: Knob = Knob {
    var: "EASEL_LEASE_SECS",
    default: 30,
    min: 2,
    max: 600,
};
const DEFAULT_RATE: RateLimit = RateLimit {
    count: 5,
    window_secs: 60,
};
const DEFAULT_RETENTION_DAYS: u64 = 30;
const DEFAULT_LLM_MODEL: &str = "gpt-4o-mini";
/// How far an img2img model may move from the input image (§8).
const DEFAULT_STRENGTH: f64 = 0.6;
const DEFAULT_TELEGRAM_API_URL: &str = "https://api.telegram.org";

/// Where values come from: the environment, then easel.toml's top-level
/// keys (the environment wins); and the problems found so far.
pub(super) struct Vars<'a> {
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) file: &'a BTreeMap<String, toml::Value>,
    pub(super) problems: std::cell::RefCell<Vec<String>>,
}

impl Vars<'_> {
    pub(super) fn problem(&self, sentence: String) {
        self.problems.borrow_mut().push(sentence);
    }

    fn get(&self, k: &str) -> Option<String> {
        (self.env)(k).or_else(|| match self.file.get(k) {
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(toml::Value::Integer(i)) => Some(i.to_string()),
            Some(toml::Value::Float(f)) => Some(f.to_string()),
            Some(toml::Value::Boolean(b)) => Some(b.to_string()),
            _ => None,
        })
    }

    pub(super) fn non_empty(&self, k: &str) -> Option<String> {
        self.get(k).filter(|v| !v.trim().is_empty())
    }

    /// A [`Knob`]'s value; its default (and a problem) when out of bounds.
    pub(super) fn number(&self, knob: &Knob) -> u64 {
        let Some(raw) = self.non_empty(knob.var) else {
            return knob.default;
        };
        match raw.trim().parse::<u64>() {
            Ok(n) if (knob.min..=knob.max).contains(&n) => n,
            _ => {
                self.problem(format!(
                    "{} must be a whole number from {} to {} (got \"{}\").",
                    knob.var,
                    knob.min,
                    knob.max,
                    raw.trim()
                ));
                knob.default
            }
        }
    }

    /// A key: set, not a placeholder; unset is a problem when `required`.
    fn secret(&self, var: &str, required: bool) -> Option<SecretString> {
        match self.get(var) {
            Some(v) if !is_placeholder(&v) => Some(SecretString::from(v.trim().to_owned())),
            Some(_) => {
                self.problem(format!(
                    "{var} is empty or a placeholder; set the real key."
                ));
                None
            }
            None if required => {
                self.problem(format!("{var} is not set."));
                None
            }
            None => None,
        }
    }

    fn url(&self, label: &str, raw: &str) -> Option<ServiceUrl> {
        ServiceUrl::parse(label, raw)
            .map_err(|p| self.problem(p))
            .ok()
    }
}

/// The bot token (optional here: only `easel run` needs it) and the Bot
/// API's address.
pub(super) fn telegram_section(vars: &Vars<'_>) -> (Option<SecretString>, Option<ServiceUrl>) {
    let token = match vars.get("TELEGRAM_BOT_TOKEN") {
        Some(t) if is_placeholder(&t) => {
            vars.problem(
                "TELEGRAM_BOT_TOKEN is empty or a placeholder; use the token from @BotFather."
                    .into(),
            );
            None
        }
        Some(t) if !t.trim().contains(':') => {
            vars.problem("TELEGRAM_BOT_TOKEN does not look like a bot token (digits, a colon, then letters).".into());
            None
        }
        Some(t) => Some(SecretString::from(t.trim().to_owned())),
        None => None,
    };
    let api = vars.non_empty("TELEGRAM_API_URL");
    let api_url = vars.url(
        "TELEGRAM_API_URL",
        api.as_deref().unwrap_or(DEFAULT_TELEGRAM_API_URL),
    );
    (token, api_url)
}

/// flux and sdxl from their variables, then easel.toml's `[[models]]`
/// (a model's URL may also come from `<NAME>_WORKER_URL`). A model named
/// without a URL is "not configured" to users.
pub(super) fn models_section(
    vars: &Vars<'_>,
    declared: &[FileModel],
) -> (Vec<ModelSettings>, Vec<ModelName>) {
    let mut models: Vec<ModelSettings> = Vec::new();
    let mut disabled = Vec::new();
    let mut declare = |name: &str,
                       url_var: Option<&str>,
                       url: Option<String>,
                       protocol: Protocol,
                       key_var: Option<String>,
                       img2img: Option<f64>| {
        let Ok(model) = ModelName::parse(name) else {
            vars.problem(format!(
                "Model name \"{name}\" in easel.toml must be 1 to 32 letters, digits, '-' or '_'."
            ));
            return;
        };
        if models.iter().any(|m| m.name == model) {
            vars.problem(format!("Model {model} is declared twice."));
            return;
        }
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            disabled.push(model);
            return;
        };
        let label = url_var.map_or_else(|| format!("The URL of model {model}"), str::to_owned);
        let Some(url) = vars.url(&label, &url) else {
            return;
        };
        let key = key_var
            .as_deref()
            .and_then(|var| vars.secret(var, protocol == Protocol::SdxlPost));
        models.push(ModelSettings {
            name: model,
            url,
            protocol,
            key,
            key_var,
            img2img,
        });
    };
    declare(
        "flux",
        Some("FLUX_WORKER_URL"),
        vars.get("FLUX_WORKER_URL"),
        Protocol::FluxGet,
        None,
        None,
    );
    declare(
        "sdxl",
        Some("SDXL_WORKER_URL"),
        vars.get("SDXL_WORKER_URL"),
        Protocol::SdxlPost,
        Some("SDXL_API_KEY".into()),
        None,
    );
    for m in declared {
        let Some(protocol) = Protocol::parse(&m.protocol) else {
            vars.problem(format!(
                "Model {} in easel.toml has protocol \"{}\"; use flux-get or sdxl-post.",
                m.name, m.protocol
            ));
            continue;
        };
        if protocol == Protocol::SdxlPost && m.key_env.is_none() {
            vars.problem(format!("Model {} in easel.toml speaks sdxl-post and needs key_env, the variable holding its key.", m.name));
            continue;
        }
        let env_var = format!(
            "{}_WORKER_URL",
            m.name.to_ascii_uppercase().replace('-', "_")
        );
        let url = (vars.env)(&env_var).or_else(|| m.url.clone());
        // Image to image sends the input in the JSON body: sdxl-post only.
        let img2img = match (m.img2img, protocol, m.strength) {
            (false, _, None) => None,
            (false, _, Some(_)) => {
                vars.problem(format!(
                    "Model {} in easel.toml sets strength without img2img = true.",
                    m.name
                ));
                continue;
            }
            (true, Protocol::FluxGet, _) => {
                vars.problem(format!(
                    "Model {} in easel.toml speaks flux-get, which cannot carry an input image; img2img needs sdxl-post.",
                    m.name
                ));
                continue;
            }
            (true, Protocol::SdxlPost, s) => match s.unwrap_or(DEFAULT_STRENGTH) {
                s if s > 0.0 && s <= 1.0 => Some(s),
                s => {
                    vars.problem(format!(
                        "Model {} in easel.toml has strength {s}; use a number above 0 and at most 1.",
                        m.name
                    ));
                    continue;
                }
            },
        };
        declare(&m.name, None, url, protocol, m.key_env.clone(), img2img);
    }
    (models, disabled)
}

/// easel.toml's `[presets.<name>]`: a name a prompt can start with, a
/// template holding `{prompt}` once, and optionally the models it is for
/// (each one declared).
pub(super) fn presets_section(
    vars: &Vars<'_>,
    declared: &BTreeMap<String, FilePreset>,
    models: &[ModelSettings],
    disabled: &[ModelName],
) -> Vec<Preset> {
    let mut presets: Vec<Preset> = Vec::new();
    for (name, p) in declared {
        let lower = name.to_ascii_lowercase();
        if ModelName::parse(&lower).is_err() {
            vars.problem(format!(
                "Preset name \"{name}\" in easel.toml must be 1 to 32 letters, digits, '-' or '_'."
            ));
            continue;
        }
        if presets.iter().any(|q| q.name == lower) {
            vars.problem(format!(
                "Preset {lower} is declared twice (names ignore case)."
            ));
            continue;
        }
        if p.template.matches("{prompt}").count() != 1 {
            vars.problem(format!(
                "Preset {lower} in easel.toml needs a template with {{prompt}} exactly once."
            ));
            continue;
        }
        let limit = crate::domain::ids::MAX_PROMPT_CHARS;
        if p.template.chars().count() > limit / 2 {
            vars.problem(format!(
                "The template of preset {lower} is longer than {} characters, which leaves too little room for a prompt.",
                limit / 2
            ));
            continue;
        }
        let mut for_models = Vec::new();
        for m in &p.models {
            match ModelName::parse(m) {
                Ok(m) if models.iter().any(|x| x.name == m) || disabled.contains(&m) => {
                    for_models.push(m);
                }
                _ => vars.problem(format!(
                    "Preset {lower} in easel.toml names model \"{m}\", which is not declared."
                )),
            }
        }
        presets.push(Preset {
            name: lower,
            template: p.template.clone(),
            models: for_models,
        });
    }
    // Listed (and matched) by their lowercase names.
    presets.sort_by(|a, b| a.name.cmp(&b.name));
    presets
}

/// The prompt enhancer: on when `LLM_API_URL` is set.
pub(super) fn llm_section(vars: &Vars<'_>) -> Option<LlmSettings> {
    let url = vars.url("LLM_API_URL", &vars.non_empty("LLM_API_URL")?)?;
    let key = match vars.get("LLM_API_KEY") {
        Some(k) if k.trim().is_empty() => None,
        Some(k) if is_placeholder(&k) => {
            vars.problem(
                "LLM_API_KEY is a placeholder; set the real key or leave it unset.".into(),
            );
            None
        }
        Some(k) => Some(SecretString::from(k.trim().to_owned())),
        None => None,
    };
    let user_template = vars
        .non_empty("EASEL_LLM_USER_TEMPLATE")
        .unwrap_or_else(|| DEFAULT_USER_TEMPLATE.into());
    if !user_template.contains("{prompt}") {
        vars.problem(
            "EASEL_LLM_USER_TEMPLATE must contain {prompt}, where the user's prompt goes.".into(),
        );
    }
    Some(LlmSettings {
        url,
        key,
        model: vars
            .non_empty("LLM_MODEL")
            .map_or_else(|| DEFAULT_LLM_MODEL.to_owned(), |m| m.trim().to_owned()),
        system_prompt: vars
            .non_empty("EASEL_LLM_SYSTEM_PROMPT")
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into()),
        user_template,
    })
}

/// Per-user limits and the allowlist.
pub(super) fn limits_section(vars: &Vars<'_>) -> (Limits, BTreeSet<i64>) {
    let max_pending = u32::try_from(vars.number(&MAX_PENDING_PER_USER)).unwrap_or(u32::MAX);
    let rate = match vars.non_empty("EASEL_RATE_LIMIT") {
        None => DEFAULT_RATE,
        Some(raw) => parse_rate(&raw).unwrap_or_else(|| {
            vars.problem(format!(
                "EASEL_RATE_LIMIT must be N/SECONDS with N from 1 to {MAX_RECENT_PER_USER} and SECONDS from 1 to {MAX_RATE_WINDOW_SECS} (got \"{}\").",
                raw.trim()
            ));
            DEFAULT_RATE
        }),
    };
    let mut allowed = BTreeSet::new();
    if let Some(raw) = vars.non_empty("EASEL_ALLOWED_USERS") {
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<i64>() {
                Ok(id) => {
                    allowed.insert(id);
                }
                Err(_) => vars.problem(format!(
                    "EASEL_ALLOWED_USERS must be comma-separated Telegram user ids; \"{part}\" is not one."
                )),
            }
        }
    }
    (Limits { rate, max_pending }, allowed)
}

/// The data dir, how long originals are kept, and the retention window.
pub(super) fn storage_section(vars: &Vars<'_>) -> (DataDir, Duration, Option<Duration>) {
    let data_dir = DataDir::new(
        vars.non_empty("EASEL_DATA_DIR")
            .unwrap_or_else(|| "./data".into())
            .trim(),
    );
    let originals_ttl = Duration::from_secs(3600 * vars.number(&ORIGINALS_TTL_HOURS));
    // At least 2 days: Telegram redelivers updates for 24 h, and the
    // longest rate-limit window is a day, so nothing archived can still
    // matter to intake.
    let days = |d: u64| Duration::from_secs(86_400 * d);
    let retention = match vars
        .non_empty("EASEL_RETENTION_DAYS")
        .map(|v| v.trim().to_owned())
    {
        None => Some(days(DEFAULT_RETENTION_DAYS)),
        Some(v) if v.eq_ignore_ascii_case("off") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(d) if (2..=36_500).contains(&d) => Some(days(d)),
            _ => {
                vars.problem(format!(
                    "EASEL_RETENTION_DAYS must be a whole number of days from 2 to 36500, or off (got \"{v}\")."
                ));
                None
            }
        },
    };
    (data_dir, originals_ttl, retention)
}

/// `RUST_LOG`, checked the way `easel run` will build its filter.
pub(super) fn log_section(vars: &Vars<'_>) -> (String, crate::telemetry::LogFormat) {
    use crate::telemetry::LogFormat;
    let spec = vars.non_empty("RUST_LOG").unwrap_or_else(|| "info".into());
    if let Err(e) = crate::telemetry::log_filter(&spec) {
        vars.problem(format!(
            "RUST_LOG is not a valid log filter ({e}); try info or easel=debug."
        ));
    }
    let format = match vars.non_empty("EASEL_LOG_FORMAT") {
        None => LogFormat::Text,
        Some(f) => match f.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                vars.problem(format!(
                    "EASEL_LOG_FORMAT must be text or json (got \"{other}\")."
                ));
                LogFormat::Text
            }
        },
    };
    (spec, format)
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
