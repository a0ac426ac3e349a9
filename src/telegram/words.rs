//! Every text a Telegram user sees, in the user's language: the texts live
//! in `locales/<lang>.ftl` (Fluent), one file per language; this module
//! picks the language and fills the placeholders. Plain words, never an
//! internal URL, a key or a stack trace.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::Duration;

use fluent_bundle::concurrent::FluentBundle;
use fluent_bundle::{FluentArgs, FluentResource, FluentValue};
use serde::{Deserialize, Serialize};

use crate::domain::{FailureKind, Stage};

/// A language easel speaks. English is the fallback for every user whose
/// Telegram language is not one of these (§2, Language).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    #[default]
    En,
    Fa,
}

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::Fa];

    /// The language for a Telegram `language_code` (an IETF tag such as
    /// `fa`, `fa-IR`, `en-US`), English when there is none or easel does
    /// not speak it.
    pub fn of(code: Option<&str>) -> Lang {
        let primary = code
            .and_then(|c| c.split(['-', '_']).next())
            .unwrap_or_default();
        if primary.eq_ignore_ascii_case("fa") {
            Lang::Fa
        } else {
            Lang::En
        }
    }

    /// The code `setMyCommands` takes (`None`: the default, for everyone
    /// whose language has no menu of its own).
    pub fn menu_code(self) -> Option<&'static str> {
        match self {
            Lang::En => None,
            Lang::Fa => Some("fa"),
        }
    }

    fn source(self) -> (&'static str, unic_langid::LanguageIdentifier) {
        match self {
            Lang::En => (
                include_str!("../../locales/en.ftl"),
                unic_langid::langid!("en"),
            ),
            Lang::Fa => (
                include_str!("../../locales/fa.ftl"),
                unic_langid::langid!("fa"),
            ),
        }
    }
}

/// A Telegram `language_code` as it is kept with a request (`Origin`):
/// only the characters of a language tag, at most 35 of them (the longest
/// tag in practical use), so nothing else can ride in it.
pub fn language_code(code: Option<&str>) -> Option<String> {
    let code = code?;
    let ok = !code.is_empty()
        && code.len() <= 35
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then(|| code.to_owned())
}

type Bundle = FluentBundle<FluentResource>;

static BUNDLES: LazyLock<Vec<(Lang, Bundle)>> =
    LazyLock::new(|| Lang::ALL.iter().map(|l| (*l, bundle(*l))).collect());

fn bundle(lang: Lang) -> Bundle {
    let (source, id) = lang.source();
    // The files are compiled in and checked by the tests below; should one
    // still not parse, what did parse is used and the rest falls back to
    // English, message by message.
    let resource =
        FluentResource::try_new(source.to_owned()).unwrap_or_else(|(partial, errors)| {
            tracing::error!(?lang, ?errors, "a locale file does not parse");
            partial
        });
    let mut bundle = Bundle::new_concurrent(vec![id]);
    match lang {
        // Plain text: no direction marks needed.
        Lang::En => bundle.set_use_isolating(false),
        // Right-to-left text: Persian digits; Latin placeholders are
        // isolated by `t` (see `isolated`).
        Lang::Fa => {
            bundle.set_use_isolating(false);
            bundle.set_formatter(Some(persian_numbers));
        }
    }
    if let Err(errors) = bundle.add_resource(resource) {
        tracing::error!(?lang, ?errors, "a locale file has duplicate messages");
    }
    bundle
}

/// Numbers in a Persian text are written with Persian digits (Fluent
/// calls this for every number it places).
fn persian_numbers<M>(value: &FluentValue, _: &M) -> Option<String> {
    match value {
        FluentValue::Number(n) => Some(persian_digits(&n.as_string())),
        _ => None,
    }
}

/// A text placed in a Persian sentence: when it holds Latin letters or
/// digits (a model name, an id, an English prompt, a command) it goes
/// between the Unicode isolates FSI…PDI, so it keeps its own
/// left-to-right order inside the right-to-left sentence. (Fluent's own
/// isolation would wrap every placeholder, Persian words and numbers too,
/// and its formatter hook also sees the finished message: neither fits.)
fn isolated(text: Cow<'_, str>) -> Cow<'_, str> {
    if text.chars().any(|c| c.is_ascii_alphanumeric()) {
        Cow::Owned(format!("\u{2068}{text}\u{2069}"))
    } else {
        text
    }
}

/// `text` with its ASCII digits written as Persian digits (۰–۹).
pub fn persian_digits(text: &str) -> String {
    text.chars()
        .map(|c| match c.to_digit(10) {
            // '۰' is U+06F0; the nine after it follow in order.
            Some(d) if c.is_ascii_digit() => char::from_u32(0x06F0 + d).unwrap_or(c),
            _ => c,
        })
        .collect()
}

fn find(lang: Lang) -> Option<&'static Bundle> {
    BUNDLES.iter().find(|(l, _)| *l == lang).map(|(_, b)| b)
}

/// The text of message `id` in `lang` with `args`; a message missing from
/// `lang` comes in English, and one missing everywhere is logged and
/// shows its id (the tests make sure neither happens).
fn t(lang: Lang, id: &str, args: &[(&str, FluentValue<'_>)]) -> String {
    let args: FluentArgs = args
        .iter()
        .map(|(k, v)| match (lang, v) {
            (Lang::Fa, FluentValue::String(text)) => {
                (*k, FluentValue::String(isolated(text.clone())))
            }
            _ => (*k, v.clone()),
        })
        .collect();
    for lang in [lang, Lang::En] {
        let Some(bundle) = find(lang) else { continue };
        let Some(pattern) = bundle.get_message(id).and_then(|m| m.value()) else {
            continue;
        };
        let mut errors = Vec::new();
        let text = bundle.format_pattern(pattern, Some(&args), &mut errors);
        if !errors.is_empty() {
            tracing::error!(?lang, id, ?errors, "a text did not format cleanly");
        }
        return text.into_owned();
    }
    tracing::error!(?lang, id, "a text is missing");
    id.to_owned()
}

fn s<'a>(text: impl Into<Cow<'a, str>>) -> FluentValue<'a> {
    FluentValue::String(text.into())
}

fn n(number: impl Into<FluentValue<'static>>) -> FluentValue<'static> {
    number.into()
}

/// The command menu Telegram shows (`setMyCommands`) in `lang`: name,
/// description. The names are the same in every language.
/// `/presets` is in the menu only when presets are configured.
pub fn commands(lang: Lang, with_presets: bool) -> Vec<(&'static str, String)> {
    ["image", "model", "queue", "cancel", "presets", "help"]
        .into_iter()
        .filter(|name| with_presets || *name != "presets")
        .map(|name| (name, t(lang, &format!("command-{name}"), &[])))
        .collect()
}

pub fn help(
    lang: Lang,
    models: &[String],
    limits: &crate::domain::Limits,
    presets: usize,
    max_images: u32,
) -> String {
    t(
        lang,
        "help",
        &[
            ("preset-count", n(presets)),
            ("max-images", n(max_images)),
            ("model-count", n(models.len())),
            ("example", s(example(lang, models, "example-prompt-help"))),
            ("models", s(list(lang, models))),
            ("again", s(again_button(lang))),
            ("original", s(original_button(lang))),
            ("max-chars", n(crate::domain::ids::MAX_PROMPT_CHARS)),
            ("count", n(limits.rate.count)),
            ("window", s(span(lang, limits.rate.window_secs))),
            ("pending", n(limits.max_pending)),
        ],
    )
}

pub fn usage(lang: Lang, models: &[String]) -> String {
    t(
        lang,
        "usage",
        &[
            ("model-count", n(models.len())),
            ("example", s(example(lang, models, "example-prompt-usage"))),
            ("models", s(list(lang, models))),
        ],
    )
}

/// `/image=<first model>=<an example prompt>`, only for a model that
/// exists (empty when there is none: the texts then show no example).
fn example(lang: Lang, models: &[String], prompt: &str) -> String {
    models.first().map_or_else(String::new, |m| {
        format!("/image={m}={}", t(lang, prompt, &[]))
    })
}

/// A duration in words: "60 s", "5 min", "1 h".
fn span(lang: Lang, secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => t(lang, "span-hours", &[("n", n(s / 3600))]),
        s if s >= 60 && s % 60 == 0 => t(lang, "span-minutes", &[("n", n(s / 60))]),
        s => t(lang, "span-seconds", &[("n", n(s))]),
    }
}

/// An estimated wait in words, rounded to what a person needs: seconds
/// under a minute, else whole minutes (rounded up).
fn wait_words(lang: Lang, wait: Duration) -> String {
    let secs = wait.as_secs();
    if secs < 60 {
        t(lang, "span-seconds", &[("n", n(secs.max(1)))])
    } else {
        t(lang, "span-minutes", &[("n", n(secs.div_ceil(60)))])
    }
}

fn list(lang: Lang, models: &[String]) -> String {
    if models.is_empty() {
        t(lang, "models-none", &[])
    } else {
        models.join(&t(lang, "list-separator", &[]))
    }
}

pub fn unknown_command(lang: Lang) -> String {
    t(lang, "unknown-command", &[])
}

pub fn not_allowed(lang: Lang) -> String {
    t(lang, "not-allowed", &[])
}

pub fn unknown_model(lang: Lang, asked: &str, models: &[String]) -> String {
    let asked: String = asked.chars().take(32).collect();
    t(
        lang,
        "unknown-model",
        &[("asked", s(asked)), ("models", s(list(lang, models)))],
    )
}

/// `/presets`: each preset with a one-line example, on a model it is for.
pub fn presets(lang: Lang, presets: &[crate::config::Preset], models: &[String]) -> String {
    if presets.is_empty() {
        return t(lang, "presets-none", &[]);
    }
    let mut text = t(lang, "presets-header", &[]);
    for p in presets {
        let model = p
            .models
            .iter()
            .map(ToString::to_string)
            .find(|m| models.contains(m))
            .or_else(|| {
                p.models
                    .is_empty()
                    .then(|| models.first().cloned())
                    .flatten()
            });
        let example = model.map_or_else(String::new, |m| {
            format!(
                "/image={m}={}={}",
                p.name,
                t(lang, "example-prompt-usage", &[])
            )
        });
        let only: Vec<String> = p.models.iter().map(ToString::to_string).collect();
        text.push('\n');
        text.push_str(&t(
            lang,
            "preset-line",
            &[
                ("name", s(p.name.as_str())),
                ("only", n(only.len())),
                ("models", s(list(lang, &only))),
                ("example", s(example)),
            ],
        ));
    }
    text
}

/// A preset named for a model it is not for.
pub fn preset_not_for_model(lang: Lang, preset: &str, models: &[String]) -> String {
    t(
        lang,
        "preset-not-for-model",
        &[("preset", s(preset)), ("models", s(list(lang, models)))],
    )
}

/// The prompt fits, but not inside the preset's template.
pub fn prompt_too_long_with_preset(lang: Lang, preset: &str, chars: usize, max: usize) -> String {
    t(
        lang,
        "prompt-too-long-preset",
        &[("preset", s(preset)), ("chars", n(chars)), ("max", n(max))],
    )
}

/// `/model`: the remembered model (or none), the one `/image <prompt>`
/// uses now, and the choices.
pub fn model_shown(
    lang: Lang,
    chosen: Option<&str>,
    used: Option<&str>,
    models: &[String],
) -> String {
    let head = match (chosen, used) {
        (Some(c), Some(u)) if c == u => t(lang, "model-chosen-is", &[("model", s(c))]),
        (_, Some(u)) => t(lang, "model-default-is", &[("model", s(u))]),
        (_, None) => t(lang, "model-none", &[]),
    };
    format!(
        "{head}\n{}",
        t(lang, "model-choices", &[("models", s(list(lang, models)))])
    )
}

/// `/model <name>` was remembered.
pub fn model_chosen(lang: Lang, model: &str) -> String {
    t(lang, "model-set", &[("model", s(model))])
}

/// An input image (a photo's caption, or a reply to a photo) for a model
/// that cannot use one; `able` are the models that can.
pub fn no_input_image(lang: Lang, model: &str, able: &[String]) -> String {
    t(
        lang,
        "no-input-image",
        &[
            ("model", s(model)),
            ("able", n(able.len())),
            ("models", s(list(lang, able))),
        ],
    )
}

/// The photo is larger than a bot may fetch.
pub fn input_too_big(lang: Lang, max_mb: u32) -> String {
    t(lang, "input-too-big", &[("max", n(max_mb))])
}

/// The photo could not be fetched, or is not an image.
pub fn input_unreadable(lang: Lang) -> String {
    t(lang, "input-unreadable", &[])
}

/// 🔁 Again on an image-to-image request whose input is no longer kept.
pub fn input_expired(lang: Lang) -> String {
    t(lang, "input-expired", &[])
}

pub fn not_configured(lang: Lang, model: &str) -> String {
    t(lang, "not-configured", &[("model", s(model))])
}

pub fn empty_prompt(lang: Lang) -> String {
    t(lang, "empty-prompt", &[])
}

pub fn prompt_too_long(lang: Lang, chars: usize, max: usize) -> String {
    t(
        lang,
        "prompt-too-long",
        &[("chars", n(chars)), ("max", n(max))],
    )
}

pub fn rate_limited(lang: Lang, retry_after_secs: u64) -> String {
    t(lang, "rate-limited", &[("secs", n(retry_after_secs))])
}

pub fn too_many_pending(lang: Lang, max: u32) -> String {
    t(lang, "too-many-pending", &[("max", n(max))])
}

pub fn busy(lang: Lang) -> String {
    t(lang, "busy", &[])
}

pub fn queued(lang: Lang, model: &str, position: usize, wait: Option<Duration>) -> String {
    match wait {
        None => t(
            lang,
            "queued",
            &[("model", s(model)), ("position", n(position))],
        ),
        Some(wait) => t(
            lang,
            "queued-wait",
            &[
                ("model", s(model)),
                ("position", n(position)),
                ("wait", s(wait_words(lang, wait))),
            ],
        ),
    }
}

/// The status message of an unfinished request.
pub fn status(
    lang: Lang,
    model: &str,
    stage: Stage,
    position: Option<usize>,
    wait: Option<Duration>,
) -> String {
    match stage {
        Stage::Queued => queued(lang, model, position.unwrap_or(1), wait),
        stage => t(
            lang,
            "status",
            &[("model", s(model)), ("stage", s(stage_words(lang, stage)))],
        ),
    }
}

/// A failed request's status. `told`: an operator alert about this
/// model's trouble went out (`Alerts::told`); only then does the text say
/// the operator knows.
pub fn failed(lang: Lang, model: &str, kind: FailureKind, told: bool) -> String {
    let mut why = failure_words(lang, kind);
    match kind {
        FailureKind::Refused if told => why = t(lang, "why-refused-told", &[]),
        FailureKind::Unavailable | FailureKind::TimedOut | FailureKind::BadAnswer if told => {
            why = format!("{why} {}", t(lang, "operator-told", &[]));
        }
        _ => {}
    }
    t(lang, "failed", &[("model", s(model)), ("why", s(why))])
}

/// Why a generation failed, in plain words.
fn failure_words(lang: Lang, kind: FailureKind) -> String {
    let why = match kind {
        FailureKind::Rejected => "why-rejected",
        FailureKind::Unavailable => "why-unavailable",
        FailureKind::TimedOut => "why-timed-out",
        FailureKind::BadAnswer => "why-bad-answer",
        // Asks the user to tell the operator: used when no alert went out.
        FailureKind::Refused => "why-refused",
        FailureKind::NotConfigured => "why-not-configured",
        FailureKind::Delivery => "why-delivery",
        FailureKind::Internal => "why-internal",
    };
    t(lang, why, &[])
}

pub fn cancelled_one(lang: Lang, model: &str) -> String {
    t(lang, "cancelled-one", &[("model", s(model))])
}

pub fn cancelled(lang: Lang, count: usize) -> String {
    t(lang, "cancelled", &[("n", n(count))])
}

/// `/cancel <prefix>` matched several requests: none was cancelled; each
/// is listed by its short id and the start of its prompt.
pub fn cancel_ambiguous(lang: Lang, prefix: &str, candidates: &[(String, String)]) -> String {
    let prefix: String = prefix.chars().take(40).collect();
    let mut text = t(
        lang,
        "cancel-ambiguous",
        &[("prefix", s(prefix)), ("n", n(candidates.len()))],
    );
    for (short, prompt) in candidates.iter().take(10) {
        let start: String = prompt.chars().take(QUEUE_PROMPT_CHARS).collect();
        text.push('\n');
        text.push_str(&t(
            lang,
            "cancel-candidate",
            &[("id", s(short.as_str())), ("prompt", s(start))],
        ));
    }
    text
}

pub fn nothing_to_cancel_with(lang: Lang, prefix: &str) -> String {
    let prefix: String = prefix.chars().take(40).collect();
    t(lang, "nothing-to-cancel-with", &[("prefix", s(prefix))])
}

pub fn no_requests(lang: Lang) -> String {
    t(lang, "no-requests", &[])
}

/// How many characters of a prompt `/queue` shows.
pub const QUEUE_PROMPT_CHARS: usize = 40;

/// One `/queue` line: the short id (what `/cancel` takes), the model, the
/// state in the status message's own words, and the start of the prompt,
/// so two requests to one model can be told apart.
pub fn queue_line(
    lang: Lang,
    short_id: &str,
    model: &str,
    stage: Stage,
    position: Option<usize>,
    wait: Option<Duration>,
    prompt: &str,
) -> String {
    let state = match (stage, position, wait) {
        (Stage::Queued, Some(p), None) => t(lang, "queue-position", &[("position", n(p))]),
        (Stage::Queued, Some(p), Some(w)) => t(
            lang,
            "queue-position-wait",
            &[("position", n(p)), ("wait", s(wait_words(lang, w)))],
        ),
        (stage, _, _) => stage_words(lang, stage),
    };
    let flat: String = prompt
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect();
    let mut start: String = flat.chars().take(QUEUE_PROMPT_CHARS).collect();
    if flat.chars().count() > QUEUE_PROMPT_CHARS {
        start.push('…');
    }
    t(
        lang,
        "queue-line",
        &[
            ("id", s(short_id)),
            ("model", s(model)),
            ("state", s(state)),
            ("prompt", s(start)),
        ],
    )
}

/// The status of a generation whose worker call is being retried.
pub fn generating_retry(lang: Lang, model: &str, retry: u32, of: usize) -> String {
    t(
        lang,
        "generating-retry",
        &[("model", s(model)), ("retry", n(retry)), ("of", n(of))],
    )
}

/// A stage as the status message says it.
fn stage_words(lang: Lang, stage: Stage) -> String {
    let id = match stage {
        Stage::Queued => "stage-queued",
        Stage::Enhancing => "stage-enhancing",
        Stage::Generating => "stage-generating",
        Stage::Sending => "stage-sending",
        Stage::Done => "stage-done",
        Stage::Failed => "stage-failed",
        Stage::Cancelled => "stage-cancelled",
    };
    t(lang, id, &[])
}

pub fn queue_header(lang: Lang) -> String {
    t(lang, "queue-header", &[])
}

/// The photo's caption: the model, then the prompt it drew — the enhanced
/// one, or the user's own, said so, when there was no enhancement.
pub fn caption(lang: Lang, model: &str, prompt: &str, as_written: bool) -> String {
    let id = if as_written {
        "caption-as-written"
    } else {
        "caption"
    };
    t(lang, id, &[("model", s(model)), ("prompt", s(prompt))])
}

/// The follow-up under an album: how many images came, and which failed
/// and why.
pub fn album_footer(
    lang: Lang,
    model: &str,
    kept: usize,
    of: u32,
    failed: &[(u32, FailureKind)],
) -> String {
    let mut text = t(
        lang,
        "album-footer",
        &[("model", s(model)), ("kept", n(kept)), ("of", n(of))],
    );
    for (index, kind) in failed {
        text.push('\n');
        text.push_str(&t(
            lang,
            "album-image-failed",
            &[("index", n(*index)), ("why", s(failure_words(lang, *kind)))],
        ));
    }
    text
}

/// The status of a variation request while image `index` of `of` is made.
pub fn generating_image(lang: Lang, model: &str, index: u32, of: u32) -> String {
    t(
        lang,
        "generating-image",
        &[("model", s(model)), ("index", n(index)), ("of", n(of))],
    )
}

/// A count of variations outside what is allowed (or variations off).
pub fn variations_range(lang: Lang, max: u32) -> String {
    if max < 2 {
        return t(lang, "variations-off", &[]);
    }
    t(lang, "variations-range", &[("max", n(max))])
}

/// A redelivered request that has finished meanwhile.
pub fn already_done(lang: Lang) -> String {
    t(lang, "already-done", &[])
}

pub fn full_prompt_follows(lang: Lang) -> String {
    t(lang, "full-prompt-follows", &[])
}

pub fn again_button(lang: Lang) -> String {
    t(lang, "again-button", &[])
}

pub fn original_button(lang: Lang) -> String {
    t(lang, "original-button", &[])
}

pub fn original_expired(lang: Lang) -> String {
    t(
        lang,
        "original-expired",
        &[("again", s(again_button(lang)))],
    )
}

pub fn original_sending(lang: Lang) -> String {
    t(lang, "original-sending", &[])
}

pub fn unknown_button(lang: Lang) -> String {
    t(lang, "unknown-button", &[])
}

/// Callback answers are at most 200 characters.
pub fn short(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use fluent_bundle::FluentError;
    use fluent_bundle::resolver::ResolverError;
    use fluent_bundle::resolver::errors::ReferenceKind;
    use fluent_syntax::ast;

    use super::*;
    use crate::domain::{Limits, RateLimit};

    const ALL_FAILURES: [FailureKind; 8] = [
        FailureKind::Rejected,
        FailureKind::Unavailable,
        FailureKind::TimedOut,
        FailureKind::BadAnswer,
        FailureKind::Refused,
        FailureKind::NotConfigured,
        FailureKind::Delivery,
        FailureKind::Internal,
    ];

    /// The ids of the messages of `lang`'s file, read with Fluent's own
    /// parser.
    fn message_ids(lang: Lang) -> BTreeSet<String> {
        let (source, _) = lang.source();
        let resource = match fluent_syntax::parser::parse(source) {
            Ok(r) => r,
            Err((_, errors)) => panic!("{lang:?} does not parse: {errors:?}"),
        };
        resource
            .body
            .iter()
            .filter_map(|e| match e {
                ast::Entry::Message(m) => Some(m.id.name.to_owned()),
                _ => None,
            })
            .collect()
    }

    /// The variables message `id` of `lang` uses: formatting it with no
    /// arguments names each one it misses.
    fn variables(lang: Lang, id: &str) -> BTreeSet<String> {
        let bundle = find(lang).expect("every language has a bundle");
        let pattern = bundle
            .get_message(id)
            .and_then(|m| m.value())
            .unwrap_or_else(|| panic!("{lang:?} has no value for {id}"));
        let mut errors = Vec::new();
        bundle.format_pattern(pattern, None, &mut errors);
        errors
            .into_iter()
            .map(|e| match e {
                FluentError::ResolverError(ResolverError::Reference(ReferenceKind::Variable {
                    id,
                })) => id,
                other => panic!("{lang:?} {id}: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn every_text_exists_in_every_language_with_the_same_placeholders() {
        let english = message_ids(Lang::En);
        assert!(english.len() > 50, "{english:?}");
        for lang in Lang::ALL {
            assert_eq!(message_ids(lang), english, "{lang:?} differs from English");
            for id in &english {
                assert_eq!(
                    variables(lang, id),
                    variables(Lang::En, id),
                    "{lang:?} {id} has other placeholders than English"
                );
            }
        }
    }

    /// Every text the bot can send, in `lang`, with inputs at their
    /// largest.
    fn every_text(lang: Lang) -> Vec<String> {
        let models: Vec<String> = (0..32)
            .map(|i| format!("model{i:02}-{}", "x".repeat(20)))
            .collect();
        let model = models[0].as_str();
        let limits = Limits {
            rate: RateLimit {
                count: u32::MAX,
                window_secs: 86_400,
            },
            max_pending: u32::MAX,
        };
        let long = "ع".repeat(crate::domain::ids::MAX_PROMPT_CHARS);
        let wait = Some(Duration::from_secs(86_400));
        let many_presets: Vec<crate::config::Preset> = (0..20)
            .map(|i| crate::config::Preset {
                name: format!("preset{i:02}-{}", "p".repeat(24)),
                template: format!("{{prompt}}, {}", "t".repeat(400)),
                models: if i % 2 == 0 {
                    Vec::new()
                } else {
                    vec![crate::domain::ModelName::parse(&models[1]).unwrap()]
                },
            })
            .collect();
        let mut all = vec![
            help(lang, &models, &limits, 1000, 10),
            help(lang, &[], &limits, 0, 1),
            presets(lang, &many_presets, &models),
            presets(lang, &[], &models),
            preset_not_for_model(lang, &"p".repeat(32), &models),
            prompt_too_long_with_preset(lang, &"p".repeat(32), usize::MAX, 1000),
            usage(lang, &models),
            usage(lang, &[]),
            unknown_command(lang),
            not_allowed(lang),
            unknown_model(lang, &long, &models),
            not_configured(lang, model),
            empty_prompt(lang),
            prompt_too_long(lang, usize::MAX, 1000),
            rate_limited(lang, u64::MAX),
            too_many_pending(lang, u32::MAX),
            busy(lang),
            generating_retry(lang, model, u32::MAX, 3),
            cancelled(lang, 0),
            cancelled(lang, 1),
            cancelled(lang, 10_000),
            cancel_ambiguous(lang, &long, &vec![("0123abcd".into(), long.clone()); 50]),
            nothing_to_cancel_with(lang, &long),
            no_requests(lang),
            queue_header(lang),
            already_done(lang),
            full_prompt_follows(lang),
            again_button(lang),
            original_button(lang),
            original_expired(lang),
            original_sending(lang),
            unknown_button(lang),
            cancelled_one(lang, model),
        ];
        for stage in Stage::ALL {
            all.push(status(lang, model, stage, Some(usize::MAX), wait));
            all.push(queue_line(
                lang,
                "0123abcd",
                model,
                stage,
                Some(9),
                wait,
                &long,
            ));
        }
        for kind in ALL_FAILURES {
            all.push(failed(lang, model, kind, false));
            all.push(failed(lang, model, kind, true));
        }
        all
    }

    #[test]
    fn no_text_is_empty_missing_or_longer_than_telegram_takes() {
        for lang in Lang::ALL {
            for text in every_text(lang) {
                assert!(!text.trim().is_empty(), "{lang:?}: an empty text");
                // A missing message would show its id, e.g. "stage-done".
                assert!(
                    !message_ids(Lang::En).contains(text.trim()),
                    "{lang:?}: missing {text}"
                );
                assert!(
                    text.encode_utf16().count() <= crate::telegram::deliver::MESSAGE_UNITS,
                    "{lang:?}: {} units: {text}",
                    text.encode_utf16().count()
                );
            }
            // Captions are cut to 1024 units at delivery; the part before
            // the prompt must leave most of that room to the prompt.
            let head = caption(lang, "flux", "", true);
            assert!(head.encode_utf16().count() < 100, "{head}");
            // Buttons and the command menu: Telegram takes 1–256
            // characters per description, names of 1–32 lowercase letters.
            for (name, about) in commands(lang, true) {
                assert!(
                    (1..=32).contains(&name.len()) && name.chars().all(|c| c.is_ascii_lowercase())
                );
                assert!((1..=256).contains(&about.chars().count()), "{about}");
            }
            assert_eq!(
                commands(lang, true).iter().map(|c| c.0).collect::<Vec<_>>(),
                commands(Lang::En, true)
                    .iter()
                    .map(|c| c.0)
                    .collect::<Vec<_>>(),
                "commands are the same in every language"
            );
        }
    }

    #[test]
    fn the_language_is_the_users_when_easel_speaks_it_else_english() {
        for (code, lang) in [
            (Some("fa"), Lang::Fa),
            (Some("fa-IR"), Lang::Fa),
            (Some("FA_ir"), Lang::Fa),
            (Some("en"), Lang::En),
            (Some("en-GB"), Lang::En),
            (Some("de"), Lang::En),
            (Some("far"), Lang::En),
            (Some(""), Lang::En),
            (None, Lang::En),
        ] {
            assert_eq!(Lang::of(code), lang, "{code:?}");
        }
        assert_eq!(language_code(Some("fa-IR")).as_deref(), Some("fa-IR"));
        assert_eq!(language_code(Some("fa\u{202e}")), None);
        assert_eq!(language_code(Some(&"a".repeat(36))), None);
        assert_eq!(language_code(Some("")), None);
    }

    #[test]
    fn persian_texts_use_persian_digits_and_keep_latin_words_isolated() {
        let text = queued(Lang::Fa, "flux", 12, Some(Duration::from_secs(150)));
        assert!(text.contains("۱۲"), "{text}");
        assert!(text.contains("۳ دقیقه"), "{text}");
        assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
        // The model name keeps its left-to-right direction inside the
        // right-to-left sentence.
        assert!(text.contains("\u{2068}flux\u{2069}"), "{text}");
        assert_eq!(persian_digits("position 1024"), "position ۱۰۲۴");
        // A short id is text, not a number: its digits stay as typed, so
        // it can be sent back with /cancel.
        let line = queue_line(
            Lang::Fa,
            "0123abcd",
            "flux",
            Stage::Queued,
            Some(2),
            None,
            "گربه",
        );
        assert!(line.contains("0123abcd") && line.contains("۲"), "{line}");
        // English needs no direction marks at all.
        for text in every_text(Lang::En) {
            assert!(!text.contains(['\u{2068}', '\u{2069}']), "{text}");
        }
    }

    #[test]
    fn help_names_the_buttons_and_the_limits_as_configured() {
        let limits = Limits {
            rate: RateLimit {
                count: 4,
                window_secs: 300,
            },
            max_pending: 2,
        };
        let text = help(Lang::En, &["flux".into()], &limits, 0, 1);
        assert!(!text.contains("*3"), "{text}");
        assert!(
            help(Lang::En, &["flux".into()], &limits, 0, 4)
                .contains("/image=<model>*3=<prompt> makes 3 images at once (up to 4)")
        );
        assert!(
            help(Lang::Fa, &["flux".into()], &limits, 0, 4).contains("/image=<model>*3=<prompt>")
        );
        assert!(!text.contains("/presets"), "{text}");
        assert!(help(Lang::En, &["flux".into()], &limits, 2, 1).contains("/presets"));
        assert!(help(Lang::Fa, &["flux".into()], &limits, 2, 1).contains("/presets"));
        for part in [
            "🔁 Again",
            "📄 Original",
            "up to 1000 characters",
            "4 times in 5 min",
            "up to 2 requests waiting",
            "/image=flux=",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        let text = help(Lang::Fa, &["flux".into()], &limits, 0, 1);
        for part in [
            again_button(Lang::Fa),
            original_button(Lang::Fa),
            "۱۰۰۰ نویسه".into(),
            "۴ بار".into(),
            "۵ دقیقه".into(),
            "۲ درخواست".into(),
            "/image=flux=روباهی".into(),
        ] {
            assert!(text.contains(&part), "{part:?} not in {text}");
        }
    }

    #[test]
    fn no_failure_text_claims_an_alert_that_was_not_sent() {
        for kind in ALL_FAILURES {
            let text = failed(Lang::En, "flux", kind, false);
            assert!(!text.contains("has been told"), "{text}");
            assert!(text.starts_with("flux: Failed — "), "{text}");
            let text = failed(Lang::Fa, "flux", kind, false);
            assert!(!text.contains("خبر داده شد"), "{text}");
        }
    }

    #[test]
    fn a_told_operator_is_said_for_the_models_own_trouble_only() {
        for kind in ALL_FAILURES {
            let about_the_model = matches!(
                kind,
                FailureKind::Refused
                    | FailureKind::Unavailable
                    | FailureKind::TimedOut
                    | FailureKind::BadAnswer
            );
            let en = failed(Lang::En, "sdxl", kind, true);
            assert_eq!(
                en.contains("operator has been told"),
                about_the_model,
                "{en}"
            );
            assert!(!en.contains("please tell"), "{en}");
            let fa = failed(Lang::Fa, "sdxl", kind, true);
            assert_eq!(fa.contains("خبر داده شد"), about_the_model, "{fa}");
        }
    }

    #[test]
    fn without_a_model_no_example_names_one() {
        for lang in Lang::ALL {
            for text in [usage(lang, &[]), help(lang, &[], &Limits::default(), 0, 1)] {
                assert!(!text.contains("/image=flux"), "{text}");
                assert!(text.contains(&t(lang, "models-none", &[])), "{text}");
            }
        }
        assert!(usage(Lang::En, &["sdxl".into()]).contains("/image=sdxl=a red fox"));
        assert!(usage(Lang::Fa, &["sdxl".into()]).contains("/image=sdxl=روباهی سرخ"));
    }

    #[test]
    fn presets_are_listed_with_an_example_on_a_model_they_are_for() {
        let presets = [
            crate::config::Preset {
                name: "anime".into(),
                template: "{prompt}, anime style".into(),
                models: Vec::new(),
            },
            crate::config::Preset {
                name: "photo".into(),
                template: "a photo of {prompt}".into(),
                models: vec![crate::domain::ModelName::parse("sdxl").unwrap()],
            },
        ];
        let models = ["flux".to_owned(), "sdxl".to_owned()];
        assert_eq!(
            presets_text(Lang::En, &presets, &models),
            "Presets: write one between the model and your prompt.\n\
             • anime: /image=flux=anime=a red fox in the snow\n\
             • photo (only sdxl): /image=sdxl=photo=a red fox in the snow"
        );
        let fa = presets_text(Lang::Fa, &presets, &models);
        assert!(fa.contains("(فقط \u{2068}sdxl\u{2069})"), "{fa}");
        assert_eq!(
            presets_text(Lang::En, &[], &models),
            "No presets are configured."
        );
    }

    fn presets_text(lang: Lang, p: &[crate::config::Preset], models: &[String]) -> String {
        presets(lang, p, models)
    }

    #[test]
    fn english_texts_read_as_before() {
        assert_eq!(
            queued(Lang::En, "flux", 3, Some(Duration::from_secs(5))),
            "Queued for flux — position 3 (about 5 s)"
        );
        assert_eq!(cancelled(Lang::En, 1), "Cancelled 1 queued request.");
        assert_eq!(cancelled(Lang::En, 2), "Cancelled 2 queued requests.");
        assert_eq!(
            queue_line(
                Lang::En,
                "0123abcd",
                "flux",
                Stage::Generating,
                None,
                None,
                "a fox"
            ),
            "• 0123abcd · flux · Generating…\n   “a fox”"
        );
        assert_eq!(caption(Lang::En, "flux", "a fox", false), "🎨 flux\na fox");
        assert_eq!(
            help(Lang::En, &["flux".into()], &Limits::default(), 0, 1)
                .lines()
                .nth(2),
            Some("Write /image=<model>=<what you want to see>, for example:")
        );
    }
}
