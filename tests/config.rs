//! Typed settings: defaults, every validation sentence, easel.toml with an
//! extra model, the environment winning, and no secret in any printout.

use std::collections::HashMap;
use std::time::Duration;

use easel::config::{Protocol, Settings};

fn settings(vars: &[(&str, &str)], toml: Option<&str>) -> Result<Settings, String> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::from_sources(|k| env.get(k).cloned(), toml).map_err(|e| e.to_string())
}

#[test]
fn defaults_need_nothing() {
    let s = settings(&[], None).unwrap();
    assert!(s.models.is_empty());
    assert!(s.llm.is_none());
    assert!(s.telegram_token.is_none());
    assert_eq!(s.telegram_api_url.to_string(), "https://api.telegram.org/");
    assert_eq!(s.data_dir, easel::config::DataDir::new("./data"));
    assert_eq!(
        (
            s.limits.rate.count,
            s.limits.rate.window_secs,
            s.limits.max_pending
        ),
        (5, 60, 3)
    );
    assert_eq!(s.worker_timeout, Duration::from_secs(120));
    assert_eq!(s.connect_timeout, Duration::from_secs(30));
    assert_eq!(s.llm_timeout, Duration::from_secs(30));
    assert_eq!(s.retry_base, Duration::from_millis(1000));
    assert!(s.allowed_users.is_empty());
    assert_eq!(s.log_filter, "info");
    assert_eq!(s.retention, Some(Duration::from_secs(30 * 86_400)));
}

#[test]
fn retention_is_days_from_2_or_off() {
    let days = |v: &str| settings(&[("EASEL_RETENTION_DAYS", v)], None).map(|s| s.retention);
    assert_eq!(days(" 7 "), Ok(Some(Duration::from_secs(7 * 86_400))));
    assert_eq!(days("OFF"), Ok(None));
    for bad in ["1", "0", "-3", "a week", "36501"] {
        let err = days(bad).unwrap_err();
        assert!(
            err.contains(
                "EASEL_RETENTION_DAYS must be a whole number of days from 2 to 36500, or off"
            ),
            "{bad}: {err}"
        );
    }
}

#[test]
fn both_built_in_models_and_the_llm() {
    let s = settings(
        &[
            ("FLUX_WORKER_URL", "http://127.0.0.1:9001/flux"),
            ("SDXL_WORKER_URL", "https://sdxl.example/generate"),
            ("SDXL_API_KEY", "sk-real-key-123"),
            ("LLM_API_URL", "http://127.0.0.1:9003/v1"),
            ("LLM_MODEL", "llama3"),
            ("EASEL_RATE_LIMIT", " 10/30 "),
            ("EASEL_ALLOWED_USERS", "1, 22 ,333"),
            ("EASEL_RETRY_BASE_MS", "5"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.models.len(), 2);
    assert_eq!(s.models[0].protocol, Protocol::FluxGet);
    assert!(s.models[0].key.is_none());
    assert_eq!(s.models[1].protocol, Protocol::SdxlPost);
    assert!(s.models[1].key.is_some());
    assert_eq!(s.llm.as_ref().unwrap().model, "llama3");
    assert_eq!((s.limits.rate.count, s.limits.rate.window_secs), (10, 30));
    assert_eq!(
        s.allowed_users.into_iter().collect::<Vec<_>>(),
        vec![1, 22, 333]
    );
    assert_eq!(s.retry_base, Duration::from_millis(5));
}

#[test]
fn each_problem_is_one_sentence_naming_the_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("FLUX_WORKER_URL", "ftp://host/x")],
            "FLUX_WORKER_URL must start with http:// or https://",
        ),
        (
            &[("FLUX_WORKER_URL", "not a url")],
            "FLUX_WORKER_URL is not a valid URL.",
        ),
        (
            &[("SDXL_WORKER_URL", "http://h/x")],
            "SDXL_API_KEY is not set.",
        ),
        (
            &[
                ("SDXL_WORKER_URL", "http://h/x"),
                ("SDXL_API_KEY", "changeme"),
            ],
            "SDXL_API_KEY is empty or a placeholder",
        ),
        (
            &[
                ("SDXL_WORKER_URL", "http://h/x"),
                ("SDXL_API_KEY", "your-key-here"),
            ],
            "SDXL_API_KEY is empty or a placeholder",
        ),
        (
            &[
                ("SDXL_WORKER_URL", "http://h/x"),
                ("SDXL_API_KEY", "xxxxxxxx"),
            ],
            "SDXL_API_KEY is empty or a placeholder",
        ),
        (
            &[("SDXL_WORKER_URL", "http://h/x"), ("SDXL_API_KEY", "  ")],
            "SDXL_API_KEY is empty or a placeholder",
        ),
        (
            &[("EASEL_RATE_LIMIT", "5/abc")],
            "EASEL_RATE_LIMIT must be N/SECONDS",
        ),
        (
            &[("EASEL_RATE_LIMIT", "5")],
            "EASEL_RATE_LIMIT must be N/SECONDS",
        ),
        (
            &[("EASEL_RATE_LIMIT", "0/60")],
            "EASEL_RATE_LIMIT must be N/SECONDS",
        ),
        (
            &[("EASEL_WORKER_TIMEOUT_SECS", "abc")],
            "EASEL_WORKER_TIMEOUT_SECS must be a whole number",
        ),
        (
            &[("EASEL_MAX_PENDING_PER_USER", "-1")],
            "EASEL_MAX_PENDING_PER_USER must be a whole number",
        ),
        (
            &[("EASEL_ALLOWED_USERS", "1,bob")],
            "EASEL_ALLOWED_USERS must be comma-separated Telegram user ids; \"bob\"",
        ),
        (
            &[("TELEGRAM_API_URL", "telegram")],
            "TELEGRAM_API_URL is not a valid URL.",
        ),
        (
            &[("TELEGRAM_BOT_TOKEN", "changeme")],
            "TELEGRAM_BOT_TOKEN is empty or a placeholder",
        ),
        (
            &[("LLM_API_URL", "http://h/v1"), ("LLM_API_KEY", "xxx")],
            "LLM_API_KEY is a placeholder",
        ),
        (
            &[
                ("LLM_API_URL", "http://h/v1"),
                ("EASEL_LLM_USER_TEMPLATE", "improve this"),
            ],
            "must contain {prompt}",
        ),
    ];
    for (vars, expected) in cases {
        let err = settings(vars, None).expect_err(expected);
        assert!(
            err.contains(expected),
            "{vars:?}: got {err:?}, want {expected:?}"
        );
    }
    // Several problems are all reported.
    let err = settings(
        &[("FLUX_WORKER_URL", "ftp://x"), ("EASEL_RATE_LIMIT", "x")],
        None,
    )
    .unwrap_err();
    assert!(
        err.contains("FLUX_WORKER_URL") && err.contains("EASEL_RATE_LIMIT"),
        "{err}"
    );
}

#[test]
fn a_bad_token_is_refused_without_printing_it() {
    let err = settings(&[("TELEGRAM_BOT_TOKEN", "supersecretvalue")], None).unwrap_err();
    assert!(err.contains("TELEGRAM_BOT_TOKEN"));
    assert!(!err.contains("supersecretvalue"), "{err}");
}

const TOML: &str = r#"
EASEL_RATE_LIMIT = "2/10"
EASEL_MAX_PENDING_PER_USER = 7
FLUX_WORKER_URL = "http://127.0.0.1:1/from-file"

[[models]]
name = "Kandinsky"
url = "http://127.0.0.1:9005/k"
protocol = "sdxl-post"
key_env = "KANDINSKY_KEY"

[[models]]
name = "tiny"
url = "http://127.0.0.1:9006/t"
protocol = "flux-get"

[[models]]
name = "later"
protocol = "flux-get"
"#;

#[test]
fn easel_toml_adds_models_and_the_environment_wins() {
    let s = settings(
        &[
            ("KANDINSKY_KEY", "k-123456"),
            ("FLUX_WORKER_URL", "http://127.0.0.1:2/from-env"),
            ("EASEL_RATE_LIMIT", "3/30"),
        ],
        Some(TOML),
    )
    .unwrap();
    let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["flux", "kandinsky", "tiny"]);
    assert_eq!(
        s.models[0].url.expose().as_str(),
        "http://127.0.0.1:2/from-env"
    );
    assert_eq!(s.models[1].protocol, Protocol::SdxlPost);
    assert!(s.models[1].key.is_some());
    assert_eq!(s.models[2].protocol, Protocol::FluxGet);
    assert_eq!(
        s.disabled_models
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
        vec!["sdxl", "later"]
    );
    assert_eq!((s.limits.rate.count, s.limits.rate.window_secs), (3, 30));
    assert_eq!(s.limits.max_pending, 7);
}

#[test]
fn easel_toml_problems_are_named() {
    let err = settings(&[], Some(TOML)).unwrap_err();
    assert!(err.contains("KANDINSKY_KEY is not set."), "{err}");
    let err = settings(
        &[],
        Some("[[models]]\nname = \"m\"\nurl = \"http://h\"\nprotocol = \"carrier-pigeon\""),
    )
    .unwrap_err();
    assert!(err.contains("use flux-get or sdxl-post"), "{err}");
    let err = settings(
        &[],
        Some("[[models]]\nname = \"m\"\nurl = \"http://h\"\nprotocol = \"sdxl-post\""),
    )
    .unwrap_err();
    assert!(err.contains("needs key_env"), "{err}");
    let err = settings(&[], Some("this is = = not toml")).unwrap_err();
    assert!(err.contains("easel.toml is not valid TOML"), "{err}");
}

#[test]
fn no_secret_in_debug_or_display() {
    let secrets = [
        "123456:AAHsecretTelegramToken",
        "sk-sdxl-secret-key",
        "llm-secret-key",
        "k-kandinsky-secret",
        "querysecret",
    ];
    let s = settings(
        &[
            ("TELEGRAM_BOT_TOKEN", secrets[0]),
            ("SDXL_WORKER_URL", "https://user:pw@sdxl.example/gen"),
            ("SDXL_API_KEY", secrets[1]),
            ("LLM_API_URL", "http://127.0.0.1:9/v1"),
            ("LLM_API_KEY", secrets[2]),
            ("KANDINSKY_KEY", secrets[3]),
            ("FLUX_WORKER_URL", "http://127.0.0.1:1/flux?key=querysecret"),
        ],
        Some(TOML),
    )
    .unwrap();
    let printed = format!("{s:?}\n{s}\n{s:#?}");
    for secret in secrets.iter().chain(&["user:pw", "pw@"]) {
        assert!(!printed.contains(secret), "{secret} printed in:\n{printed}");
    }
    // The values are there for the code that needs them.
    assert_eq!(s.secrets().len(), 4);
    assert!(printed.contains("http://127.0.0.1:1/flux?…"));
}

const PRESETS: &str = r#"
[presets.anime]
template = "{prompt}, anime style, cel shading"

[presets.Photo]
template = "a photograph of {prompt}, 35 mm"
models = ["sdxl"]
"#;

#[test]
fn presets_from_easel_toml() {
    let s = settings(
        &[
            ("FLUX_WORKER_URL", "http://127.0.0.1:1/flux"),
            ("SDXL_WORKER_URL", "http://127.0.0.1:1/sdxl"),
            ("SDXL_API_KEY", "a-real-looking-key"),
        ],
        Some(PRESETS),
    )
    .unwrap();
    let names: Vec<&str> = s.presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["anime", "photo"], "names are lowercase");
    let (anime, rest) = s.preset_in("ANIME = a cat").unwrap();
    assert_eq!((anime.name.as_str(), rest), ("anime", "a cat"));
    assert_eq!(anime.apply(rest), "a cat, anime style, cel shading");
    let (photo, _) = s.preset_in("photo=a dog").unwrap();
    let flux = easel::domain::ModelName::parse("flux").unwrap();
    let sdxl = easel::domain::ModelName::parse("sdxl").unwrap();
    assert!(!photo.allows(&flux) && photo.allows(&sdxl));
    assert!(anime.allows(&flux) && anime.allows(&sdxl));
    // Not a preset: the text is the prompt, `=` and all.
    for prompt in [
        "a cat",
        "anim=a cat",
        "anime",
        "x=anime=a cat",
        "an ime=a cat",
        "e=mc²",
        "=anime=a cat",
    ] {
        assert!(s.preset_in(prompt).is_none(), "{prompt}");
    }
    // A template's `{prompt}` is replaced once; braces in the user's
    // prompt are the user's.
    assert_eq!(
        anime.apply("{prompt}"),
        "{prompt}, anime style, cel shading"
    );
}

#[test]
fn preset_problems_are_named() {
    let cases = [
        (
            "[presets.bad]\ntemplate = \"no placeholder\"",
            "Preset bad in easel.toml needs a template with {prompt} exactly once.",
        ),
        (
            "[presets.twice]\ntemplate = \"{prompt} {prompt}\"",
            "Preset twice in easel.toml needs a template with {prompt} exactly once.",
        ),
        (
            "[presets.x]\ntemplate = \"{prompt}\"\nmodels = [\"dalle\"]",
            "Preset x in easel.toml names model \"dalle\", which is not declared.",
        ),
        (
            "[presets.\"a b\"]\ntemplate = \"{prompt}\"",
            "Preset name \"a b\" in easel.toml must be 1 to 32 letters, digits, '-' or '_'.",
        ),
        (
            "[presets.Anime]\ntemplate = \"{prompt}\"\n[presets.anime]\ntemplate = \"{prompt}\"",
            "is declared twice (names ignore case).",
        ),
        (
            "[presets.long]\ntemplate = \"{prompt}LONG\"",
            "The template of preset long is longer than 500 characters",
        ),
    ];
    for (toml, sentence) in cases {
        let toml = toml.replace("LONG", &"x".repeat(500));
        let err = settings(&[], Some(&toml)).unwrap_err();
        assert!(err.contains(sentence), "{toml}: {err}");
    }
}

proptest::proptest! {
    /// A prompt is read as preset + prompt only when the text before its
    /// first `=` is a configured preset's name (any case, spaces around
    /// forgiven); any other prompt, `=` or not, is left whole.
    #[test]
    fn only_a_configured_name_before_the_first_equals_is_a_preset(
        prompt in "\\PC{0,80}",
        upper in proptest::bool::ANY,
    ) {
        let s = settings(&[("SDXL_WORKER_URL", "http://127.0.0.1:1/sdxl"), ("SDXL_API_KEY", "a-real-looking-key")], Some(PRESETS)).unwrap();
        let head = prompt.split_once('=').map(|(h, _)| h.trim().to_ascii_lowercase());
        let names_one = matches!(head.as_deref(), Some("anime" | "photo"));
        proptest::prop_assert_eq!(s.preset_in(&prompt).is_some(), names_one);
        let name = if upper { "ANIME" } else { "anime" };
        let text = format!("{name}={prompt}");
        let (p, rest) = s.preset_in(&text).unwrap();
        proptest::prop_assert_eq!(p.name.as_str(), "anime");
        proptest::prop_assert_eq!(rest, prompt.trim());
    }
}

#[test]
fn img2img_models_from_easel_toml() {
    let model = |extra: &str| {
        format!(
            "[[models]]\nname = \"paint\"\nurl = \"http://127.0.0.1:1/p\"\nprotocol = \"sdxl-post\"\nkey_env = \"PAINT_KEY\"\n{extra}"
        )
    };
    let vars = [("PAINT_KEY", "a-real-looking-key")];
    let s = settings(&vars, Some(&model("img2img = true"))).unwrap();
    assert_eq!(s.models[0].img2img, Some(0.6), "the default strength");
    let s = settings(&vars, Some(&model("img2img = true\nstrength = 0.45"))).unwrap();
    assert_eq!(s.models[0].img2img, Some(0.45));
    let s = settings(&vars, Some(&model(""))).unwrap();
    assert_eq!(s.models[0].img2img, None);
    for (toml, sentence) in [
        (
            model("strength = 0.5"),
            "Model paint in easel.toml sets strength without img2img = true.",
        ),
        (
            model("img2img = true\nstrength = 1.5"),
            "Model paint in easel.toml has strength 1.5; use a number above 0 and at most 1.",
        ),
        (
            "[[models]]\nname = \"f2\"\nurl = \"http://127.0.0.1:1/f\"\nprotocol = \"flux-get\"\nimg2img = true\n".to_owned(),
            "Model f2 in easel.toml speaks flux-get, which cannot carry an input image; img2img needs sdxl-post.",
        ),
    ] {
        let err = settings(&vars, Some(&toml)).unwrap_err();
        assert!(err.contains(sentence), "{toml}: {err}");
    }
}

#[test]
fn the_log_format_is_text_or_json() {
    use easel::telemetry::LogFormat;
    assert_eq!(settings(&[], None).unwrap().log_format, LogFormat::Text);
    assert_eq!(
        settings(&[("EASEL_LOG_FORMAT", "JSON")], None)
            .unwrap()
            .log_format,
        LogFormat::Json
    );
    let err = settings(&[("EASEL_LOG_FORMAT", "xml")], None).unwrap_err();
    assert!(
        err.contains("EASEL_LOG_FORMAT must be text or json (got \"xml\")."),
        "{err}"
    );
}

#[test]
fn the_metrics_address_is_an_address_and_port() {
    assert_eq!(settings(&[], None).unwrap().metrics_addr, None);
    let s = settings(&[("EASEL_METRICS_ADDR", "127.0.0.1:9090")], None).unwrap();
    assert_eq!(s.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
    let err = settings(&[("EASEL_METRICS_ADDR", "localhost")], None).unwrap_err();
    assert!(
        err.contains("EASEL_METRICS_ADDR must be an address and port such as 127.0.0.1:9090 (got \"localhost\")."),
        "{err}"
    );
}

/// §3 `EASEL_DASHBOARD_TOKEN`: needs the listener it is served on, and a
/// token worth the name; never printed.
#[test]
fn the_dashboard_token_needs_the_metrics_address_and_sixteen_characters() {
    let token = "a-dashboard-token-0123";
    let err = settings(&[("EASEL_DASHBOARD_TOKEN", token)], None).unwrap_err();
    assert!(
        err.contains("EASEL_DASHBOARD_TOKEN needs EASEL_METRICS_ADDR"),
        "{err}"
    );
    let short = settings(
        &[
            ("EASEL_METRICS_ADDR", "127.0.0.1:9090"),
            ("EASEL_DASHBOARD_TOKEN", "short"),
        ],
        None,
    )
    .unwrap_err();
    assert!(short.contains("at least 16 characters"), "{short}");
    assert!(
        !short.contains("short\""),
        "the refused token echoed: {short}"
    );
    let s = settings(
        &[
            ("EASEL_METRICS_ADDR", "127.0.0.1:9090"),
            ("EASEL_DASHBOARD_TOKEN", token),
        ],
        None,
    )
    .unwrap();
    assert!(s.dashboard_token.is_some());
    let shown = s.to_string();
    assert!(
        shown.contains("operator dashboard: http://127.0.0.1:9090/"),
        "{shown}"
    );
    assert!(!shown.contains(token), "the token printed: {shown}");
}
