//! Every text a Telegram user sees, in one place: plain English, never an
//! internal URL, a key or a stack trace.

use std::time::Duration;

use crate::domain::{FailureKind, Stage};

/// The command menu Telegram shows (`setMyCommands`): name, description.
pub const COMMANDS: [(&str, &str); 4] = [
    ("image", "/image=<model>=<prompt> — make an image"),
    ("queue", "your requests and their place in line"),
    ("cancel", "cancel your queued requests"),
    ("help", "how to use this bot"),
];

pub fn help(models: &[String], limits: &crate::domain::Limits) -> String {
    format!(
        "I turn a description into an image.\n\n\
         Write /image=<model>=<what you want to see>{}\n\n\
         Models: {}\n\n\
         /queue shows your requests and their place in line.\n\
         /cancel cancels your requests that have not started; /cancel <id> cancels one.\n\n\
         Under each image, 🔁 Again draws the same prompt once more and 📄 Original sends the image file uncompressed.\n\n\
         A prompt may have up to {} characters. You can ask {} times in {}, with up to {} requests waiting at once.\n\n\
         I improve your prompt before drawing; the image comes with the prompt I used.",
        example(models, "a red fox in the snow, golden hour"),
        list(models),
        crate::domain::ids::MAX_PROMPT_CHARS,
        limits.rate.count,
        span(limits.rate.window_secs),
        limits.max_pending,
    )
}

pub fn usage(models: &[String]) -> String {
    format!(
        "Write /image=<model>=<prompt>{}\n\nModels: {}",
        example(models, "a red fox in the snow"),
        list(models)
    )
}

/// ", for example: /image=<first model>=<prompt>", only for a model that
/// exists.
fn example(models: &[String], prompt: &str) -> String {
    models.first().map_or_else(String::new, |m| {
        format!(", for example:\n/image={m}={prompt}")
    })
}

/// A rate-limit window in words: "60 s", "5 min", "1 h".
fn span(secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn list(models: &[String]) -> String {
    if models.is_empty() {
        "none is configured right now".into()
    } else {
        models.join(", ")
    }
}

pub fn unknown_command() -> String {
    "I don't know that command. /help shows what I can do.".into()
}

pub fn not_allowed() -> String {
    "Sorry, this bot is private.".into()
}

pub fn unknown_model(asked: &str, models: &[String]) -> String {
    let asked: String = asked.chars().take(32).collect();
    format!(
        "There is no model called \"{asked}\". Available: {}.",
        list(models)
    )
}

pub fn not_configured(model: &str) -> String {
    format!("Image generation is not configured for {model} right now.")
}

pub fn empty_prompt() -> String {
    "The prompt is empty. Write what you want to see after the second =.".into()
}

pub fn prompt_too_long(chars: usize, max: usize) -> String {
    format!("The prompt has {chars} characters; the limit is {max}. Please shorten it.")
}

pub fn rate_limited(retry_after_secs: u64) -> String {
    format!("You're sending requests too fast. Please try again in {retry_after_secs} s.")
}

pub fn too_many_pending(max: u32) -> String {
    format!("You already have {max} requests waiting. Please wait for one to finish, or /cancel.")
}

pub fn busy() -> String {
    "Sorry, I couldn't take that request right now. Please try again in a minute.".into()
}

fn eta(wait: Option<Duration>) -> String {
    match wait {
        None => String::new(),
        Some(d) if d.as_secs() < 60 => format!(" (about {} s)", d.as_secs().max(1)),
        Some(d) => format!(" (about {} min)", d.as_secs().div_ceil(60)),
    }
}

pub fn queued(model: &str, position: usize, wait: Option<Duration>) -> String {
    format!("Queued for {model} — position {position}{}", eta(wait))
}

/// The status message of an unfinished request.
pub fn status(
    model: &str,
    stage: Stage,
    position: Option<usize>,
    wait: Option<Duration>,
) -> String {
    match stage {
        Stage::Queued => queued(model, position.unwrap_or(1), wait),
        stage => format!("{model}: {}", stage_words(stage)),
    }
}

pub fn failed(model: &str, kind: FailureKind) -> String {
    let why = match kind {
        FailureKind::Rejected => {
            "the model's content filter rejected this prompt. Try rephrasing it."
        }
        FailureKind::Unavailable => {
            "the image service is unavailable right now. Please try again later."
        }
        FailureKind::TimedOut => {
            "the image service took too long to answer. Please try again later."
        }
        FailureKind::BadAnswer => {
            "the image service answered with something that is not an image. Please try again."
        }
        FailureKind::Refused => {
            // No operator alert exists yet (issue 16): say nothing that did not happen.
            "the image service refused the request. If it keeps happening, please tell the bot's operator."
        }
        FailureKind::NotConfigured => {
            "image generation is not configured for this model right now."
        }
        FailureKind::Delivery => "Telegram would not take the image.",
        FailureKind::Internal => "something went wrong on our side. Please try again.",
    };
    format!("{model}: Failed — {why}")
}

pub fn cancelled_one(model: &str) -> String {
    format!("{model}: Cancelled.")
}

pub fn cancelled(n: usize) -> String {
    match n {
        0 => {
            "You have no queued requests to cancel (requests that have started can't be cancelled)."
                .into()
        }
        1 => "Cancelled 1 queued request.".into(),
        n => format!("Cancelled {n} queued requests."),
    }
}

/// `/cancel <prefix>` matched several requests: none was cancelled; each
/// is listed by its short id and the start of its prompt.
pub fn cancel_ambiguous(prefix: &str, candidates: &[(String, String)]) -> String {
    let prefix: String = prefix.chars().take(40).collect();
    let mut text = format!(
        "\"{prefix}\" matches {} of your queued requests, so I cancelled none. Send /cancel with one of these ids:",
        candidates.len()
    );
    for (short, prompt) in candidates.iter().take(10) {
        let start: String = prompt.chars().take(QUEUE_PROMPT_CHARS).collect();
        text.push_str(&format!("\n• {short} “{start}”"));
    }
    text
}

pub fn nothing_to_cancel_with(prefix: &str) -> String {
    let prefix: String = prefix.chars().take(40).collect();
    format!("None of your queued requests has an id starting with \"{prefix}\".")
}

pub fn no_requests() -> String {
    "You have no requests in progress. /help shows how to make one.".into()
}

/// One line of `/queue`.
/// How many characters of a prompt `/queue` shows.
pub const QUEUE_PROMPT_CHARS: usize = 40;

/// One `/queue` line: the short id (what `/cancel` takes), the model, the
/// state in the status message's own words, and the start of the prompt,
/// so two requests to one model can be told apart.
pub fn queue_line(
    short_id: &str,
    model: &str,
    stage: Stage,
    position: Option<usize>,
    wait: Option<Duration>,
    prompt: &str,
) -> String {
    let state = match (stage, position) {
        (Stage::Queued, Some(p)) => format!("position {p}{}", eta(wait)),
        (Stage::Queued, None) => "queued".to_owned(),
        (stage, _) => stage_words(stage).to_owned(),
    };
    let flat: String = prompt
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect();
    let start: String = flat.chars().take(QUEUE_PROMPT_CHARS).collect();
    let more = if flat.chars().count() > QUEUE_PROMPT_CHARS {
        "…"
    } else {
        ""
    };
    format!("• {short_id} · {model} · {state}\n   “{start}{more}”")
}

/// The status of a generation whose worker call is being retried.
pub fn generating_retry(model: &str, retry: u32, of: usize) -> String {
    format!("{model}: Generating… retry {retry} of {of}")
}

/// A stage as the status message says it.
fn stage_words(stage: Stage) -> &'static str {
    match stage {
        Stage::Queued => "queued",
        Stage::Enhancing => "Enhancing prompt…",
        Stage::Generating => "Generating…",
        Stage::Sending => "Sending…",
        Stage::Done => "Done ✅",
        Stage::Failed => "Failed.",
        Stage::Cancelled => "Cancelled.",
    }
}

pub fn queue_header() -> String {
    "Your requests:".into()
}

/// The photo's caption: the model, then the prompt it drew — the enhanced
/// one, or the user's own, said so, when there was no enhancement.
pub fn caption(model: &str, prompt: &str, as_written: bool) -> String {
    if as_written {
        format!("🎨 {model} · your prompt, as written\n{prompt}")
    } else {
        format!("🎨 {model}\n{prompt}")
    }
}

/// A redelivered request that has finished meanwhile.
pub fn already_done() -> String {
    "That request is already finished.".into()
}

pub fn full_prompt_follows() -> String {
    "Full prompt:".into()
}

pub fn again_button() -> String {
    "🔁 Again".into()
}

pub fn original_button() -> String {
    "📄 Original".into()
}

pub fn original_expired() -> String {
    "The original file has expired; use 🔁 Again to make a new image.".into()
}

pub fn original_sending() -> String {
    "Sending the original file…".into()
}

pub fn unknown_button() -> String {
    "This button no longer works.".into()
}

/// Callback answers are at most 200 characters.
pub fn short(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Limits, RateLimit};

    #[test]
    fn help_names_the_buttons_and_the_limits_as_configured() {
        let limits = Limits {
            rate: RateLimit {
                count: 4,
                window_secs: 300,
            },
            max_pending: 2,
        };
        let text = help(&["flux".into()], &limits);
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
    }

    #[test]
    fn no_failure_text_claims_an_alert_that_was_not_sent() {
        use crate::domain::FailureKind;
        for kind in [
            FailureKind::Rejected,
            FailureKind::Unavailable,
            FailureKind::TimedOut,
            FailureKind::BadAnswer,
            FailureKind::Refused,
            FailureKind::NotConfigured,
            FailureKind::Delivery,
            FailureKind::Internal,
        ] {
            let text = failed("flux", kind);
            assert!(!text.contains("has been told"), "{text}");
            assert!(text.starts_with("flux: Failed — "), "{text}");
        }
    }

    #[test]
    fn without_a_model_no_example_names_one() {
        for text in [usage(&[]), help(&[], &Limits::default())] {
            assert!(!text.contains("/image=flux"), "{text}");
            assert!(text.contains("none is configured"), "{text}");
        }
        assert!(usage(&["sdxl".into()]).contains("/image=sdxl=a red fox"));
    }
}
