//! Newtypes for the identifiers and values every request carries, each with a
//! parsing constructor that refuses bad input ("parse, don't validate").

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one image request: a random UUID (v4), so its first 8
/// characters — the *short id* users see and `/cancel` takes — are 32
/// random bits, distinct among a data dir's requests as reliably as that
/// allows (§2). Time order comes from the log (`seq`, `created_at`), not
/// from ids. Ids made before this rule (UUIDv7, time first) stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub Uuid);

/// Characters of an id shown to users as its short id.
pub const SHORT_ID_CHARS: usize = 8;

impl RequestId {
    /// A fresh, random id.
    pub fn random() -> Self {
        RequestId(Uuid::new_v4())
    }

    /// The id a user's model choices (`ModelChosen`, §8) are kept under:
    /// one per user, derived from the user id, a version-8 UUID (so never
    /// equal to a request's random version-4 id) reading
    /// `6561736c-6d00-8000-8xxx-xxxxxxxxxxxx` ("easlm", then the user id).
    pub fn choices_of(user: UserId) -> RequestId {
        let high: u128 = 0x6561_736c_6d00_8000 << 64;
        let variant: u128 = 0x8000_0000_0000_0000;
        let low = u128::from(user.0.cast_unsigned() & 0x3fff_ffff_ffff_ffff);
        RequestId(uuid::Uuid::from_u128(high | variant | low))
    }

    /// The first [`SHORT_ID_CHARS`] characters of the id.
    pub fn short(&self) -> String {
        let mut text = self.0.to_string();
        text.truncate(SHORT_ID_CHARS);
        text
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A Telegram user id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub i64);

/// A Telegram chat id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChatId(pub i64);

/// The name of an image model (`flux`, `sdxl`, or a configured one):
/// lowercase ASCII letters, digits, `-` and `_`, 1 to 32 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

/// Why a model name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a model name is 1 to 32 letters, digits, '-' or '_'")]
pub struct InvalidModelName;

impl ModelName {
    /// Parses a model name case-insensitively (`FLUX` is `flux`).
    ///
    /// # Errors
    /// [`InvalidModelName`] when empty, longer than 32, or with other characters.
    pub fn parse(raw: &str) -> Result<Self, InvalidModelName> {
        let name = raw.trim().to_ascii_lowercase();
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(ModelName(name))
        } else {
            Err(InvalidModelName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelName {
    type Error = InvalidModelName;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        ModelName::parse(&value)
    }
}

impl From<ModelName> for String {
    fn from(value: ModelName) -> Self {
        value.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most Unicode scalar values a prompt may have (§2).
pub const MAX_PROMPT_CHARS: usize = 1000;

/// A user's prompt: trimmed, not empty, at most [`MAX_PROMPT_CHARS`] Unicode
/// scalar values (not bytes, so Persian and emoji count fairly).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prompt(String);

/// Why a prompt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPrompt {
    #[error("the prompt is empty")]
    Empty,
    #[error("the prompt has {chars} characters; the limit is {MAX_PROMPT_CHARS}")]
    TooLong { chars: usize },
}

impl Prompt {
    /// # Errors
    /// [`InvalidPrompt::Empty`] after trimming, [`InvalidPrompt::TooLong`] over the limit.
    pub fn parse(raw: &str) -> Result<Self, InvalidPrompt> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(InvalidPrompt::Empty);
        }
        // Count lazily up to one past the limit so a 50,000-character
        // message costs no more than a 1001-character one.
        let chars = trimmed.chars().take(MAX_PROMPT_CHARS + 1).count();
        if chars > MAX_PROMPT_CHARS {
            return Err(InvalidPrompt::TooLong {
                chars: trimmed.chars().count(),
            });
        }
        Ok(Prompt(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn model_names_are_case_insensitive() {
        assert_eq!(ModelName::parse(" FLUX ").unwrap().as_str(), "flux");
        assert!(ModelName::parse("").is_err());
        assert!(ModelName::parse("fl ux").is_err());
        assert!(ModelName::parse(&"a".repeat(33)).is_err());
    }

    #[test]
    fn prompt_limits_count_scalar_values() {
        assert_eq!(Prompt::parse("  \n "), Err(InvalidPrompt::Empty));
        assert!(Prompt::parse(&"ب".repeat(1000)).is_ok());
        assert_eq!(
            Prompt::parse(&"🦊".repeat(1001)),
            Err(InvalidPrompt::TooLong { chars: 1001 })
        );
        assert_eq!(Prompt::parse(" a=b ").unwrap().as_str(), "a=b");
    }

    proptest! {
        #[test]
        fn prompt_parse_never_panics_and_keeps_the_limit(s in "\\PC{0,1200}") {
            if let Ok(p) = Prompt::parse(&s) {
                prop_assert!(p.as_str().chars().count() <= MAX_PROMPT_CHARS);
                prop_assert_eq!(p.as_str(), s.trim());
            }
        }
    }
}
