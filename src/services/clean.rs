//! Cleaning an LLM's answer into a prompt: code fences, a leading label,
//! surrounding quotes and outer whitespace go; then a cut at 1000 Unicode
//! scalar values, which always lands on a character boundary.

use crate::domain::ids::MAX_PROMPT_CHARS;

/// Quote pairs an LLM wraps answers in (straight, curly, guillemets, CJK).
const QUOTES: [(char, char); 8] = [
    ('"', '"'),
    ('\'', '\''),
    ('`', '`'),
    ('\u{201C}', '\u{201D}'),
    ('\u{2018}', '\u{2019}'),
    ('\u{00AB}', '\u{00BB}'),
    ('\u{201E}', '\u{201C}'),
    ('\u{300C}', '\u{300D}'),
];

/// Labels models put before the answer (matched case-insensitively,
/// optionally in `**bold**`, followed by a colon).
const LABELS: [&str; 8] = [
    "prompt",
    "enhanced prompt",
    "improved prompt",
    "refined prompt",
    "rewritten prompt",
    "image prompt",
    "final prompt",
    "here is the enhanced prompt",
];

/// Cleans an LLM answer. May return an empty string (the caller then uses
/// the original prompt).
pub fn clean_llm_answer(raw: &str) -> String {
    let mut text = raw.trim();
    // Each rule can expose another (a label inside a fence inside quotes);
    // a few rounds reach a fixed point for any real answer.
    for _ in 0..4 {
        let before = text;
        text = strip_fences(text).trim();
        text = strip_label(text).trim();
        text = strip_quotes(text).trim();
        if text == before {
            break;
        }
    }
    let text = without_controls(text);
    truncate_chars(text.trim(), MAX_PROMPT_CHARS)
        .trim_end()
        .to_owned()
}

/// Control characters removed (§4): line breaks and tabs become a space
/// (an image prompt is one line of description), every other control (C0,
/// DEL, C1: terminal escapes among them) goes. The prompt is stored in the
/// log, sent to the worker and shown in captions and by `easel audit`.
fn without_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\n' | '\r' | '\t') {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// The first `max` Unicode scalar values of `s` (a prefix, so always on a
/// character boundary; never panics).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

fn strip_fences(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    // Drop the opening fence line (```` ``` ```` or ```` ```lang ````).
    let body = match rest.find('\n') {
        Some(nl) => &rest[nl + 1..],
        // A one-line fence: ```text```
        None => rest,
    };
    let body = body.trim_end();
    body.strip_suffix("```").unwrap_or(body)
}

fn strip_label(text: &str) -> &str {
    // Look at the text before the first colon on the first line.
    let first_line_end = text.find('\n').unwrap_or(text.len());
    let Some(colon) = text[..first_line_end].find(':') else {
        return text;
    };
    let label = text[..colon]
        .trim()
        .trim_matches('*')
        .trim()
        .trim_matches('#')
        .trim();
    let label_lc = label.to_lowercase();
    if LABELS.contains(&label_lc.as_str()) {
        text[colon + 1..].trim_start_matches('*')
    } else {
        text
    }
}

fn strip_quotes(text: &str) -> &str {
    for (open, close) in QUOTES {
        if let Some(inner) = text.strip_prefix(open).and_then(|t| t.strip_suffix(close))
            && !inner.is_empty()
        {
            return inner;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_rule() {
        assert_eq!(clean_llm_answer("  a fox  \n"), "a fox");
        assert_eq!(clean_llm_answer("```\na fox\n```"), "a fox");
        assert_eq!(clean_llm_answer("```text\na fox\n```"), "a fox");
        assert_eq!(clean_llm_answer("```a fox```"), "a fox");
        assert_eq!(clean_llm_answer("\"a fox\""), "a fox");
        assert_eq!(clean_llm_answer("'a fox'"), "a fox");
        assert_eq!(clean_llm_answer("\u{201C}a fox\u{201D}"), "a fox");
        assert_eq!(clean_llm_answer("\u{2018}a fox\u{2019}"), "a fox");
        assert_eq!(clean_llm_answer("«روباه قرمز»"), "روباه قرمز");
        assert_eq!(clean_llm_answer("Prompt: a fox"), "a fox");
        assert_eq!(clean_llm_answer("Enhanced prompt:\n\"a fox\""), "a fox");
        assert_eq!(clean_llm_answer("**Enhanced Prompt:** a fox"), "a fox");
        assert_eq!(
            clean_llm_answer("```\nPrompt: \u{201C}a fox\u{201D}\n```"),
            "a fox"
        );
        // Colons that are not labels stay.
        assert_eq!(
            clean_llm_answer("Style: watercolor, a fox"),
            "Style: watercolor, a fox"
        );
        assert_eq!(clean_llm_answer("ratio 16:9 fox"), "ratio 16:9 fox");
        // Quotes inside the text stay.
        assert_eq!(clean_llm_answer("a \"red\" fox"), "a \"red\" fox");
        assert_eq!(clean_llm_answer("\"\""), "\"\"");
        assert_eq!(clean_llm_answer("   "), "");
        assert_eq!(clean_llm_answer("```\n```"), "");
    }

    #[test]
    fn control_characters_are_removed() {
        assert_eq!(
            clean_llm_answer("a fox\u{1b}[2J\u{1b}]0;owned\u{7}\nin snow\tat dawn\u{9b}\u{7f}"),
            "a fox[2J]0;owned in snow at dawn"
        );
        assert_eq!(clean_llm_answer("\u{0}\u{1}\u{2}"), "");
        assert_eq!(clean_llm_answer("دو گربه\r\nروی برف"), "دو گربه روی برف");
    }

    #[test]
    fn cuts_at_1000_scalar_values_on_a_boundary() {
        let persian = "گ".repeat(1500);
        assert_eq!(clean_llm_answer(&persian).chars().count(), 1000);
        let emoji = "🦊".repeat(1001);
        assert_eq!(clean_llm_answer(&emoji), "🦊".repeat(1000));
        let mixed = format!("{}🦊", "a".repeat(999));
        assert_eq!(clean_llm_answer(&mixed), mixed);
    }

    proptest! {
        #[test]
        fn never_panics_and_keeps_the_bounds(s in "\\PC{0,1500}") {
            let out = clean_llm_answer(&s);
            prop_assert!(out.chars().count() <= MAX_PROMPT_CHARS);
            prop_assert_eq!(out.trim(), out.as_str());
        }

        #[test]
        fn arbitrary_unicode_including_controls(s in any::<String>()) {
            let out = clean_llm_answer(&s);
            prop_assert!(out.chars().count() <= MAX_PROMPT_CHARS);
            prop_assert!(!out.chars().any(char::is_control), "{:?}", out);
        }

        #[test]
        fn truncation_is_a_prefix_on_a_boundary(s in any::<String>(), n in 0usize..50) {
            let t = truncate_chars(&s, n);
            prop_assert!(s.starts_with(t));
            prop_assert_eq!(t.chars().count(), s.chars().count().min(n));
        }

        #[test]
        fn plain_text_passes_through(s in "[a-zA-Z0-9 ,.]{1,200}") {
            prop_assert_eq!(clean_llm_answer(&s), s.trim());
        }
    }
}
