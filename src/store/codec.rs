//! The stored form of an event: a CRC-32 of the JSON, then JSON whose first
//! field is the schema version `v`. Every version ever written stays readable:
//! decoding dispatches on `v` and upcasts older shapes to today's [`Recorded`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Recorded;
use crate::domain::{Event, RequestId};

/// The newest version. Bump it (and add a decoder arm, an upcast and a
/// fixture) whenever the stored shape of any event changes.
///
/// Version 2 is version 1 plus the event type `model_chosen` and the
/// `input` image of a `queued` (§8). A
/// record is written at the lowest version whose readers read it whole
/// ([`version_of`]): every other event stays version 1 byte for byte, and
/// a version-1-only reader refuses a `model_chosen` with "unknown schema
/// version 2" instead of a confusing decode error.
pub const CURRENT_VERSION: u16 = 2;

/// The version a record of `event` is written at.
pub fn version_of(event: &Event) -> u16 {
    match event {
        Event::ModelChosen { .. }
        | Event::Variation { .. }
        | Event::Queued { input: Some(_), .. } => 2,
        Event::Queued { images, .. } if *images != 1 => 2,
        _ => 1,
    }
}

/// Why stored bytes could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, too short to hold a checksum")]
    TooShort(usize),
    #[error(
        "checksum mismatch (stored {stored:08x}, computed {computed:08x}): torn or corrupted record"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown schema version {0}")]
    UnknownVersion(u16),
    #[error("undecodable record: {0}")]
    Json(String),
}

#[derive(Serialize)]
struct StoredRef<'a> {
    v: u16,
    seq: u64,
    request_id: RequestId,
    at: DateTime<Utc>,
    event: &'a Event,
}

/// Version 1: `{"v":1,"seq":…,"request_id":…,"at":…,"event":{"type":…,…}}`.
#[derive(Deserialize)]
struct StoredV1 {
    #[allow(dead_code)]
    v: u16,
    seq: u64,
    request_id: RequestId,
    #[serde(deserialize_with = "time")]
    at: DateTime<Utc>,
    event: Event,
}

/// `at` as written by chrono (`2026-11-25T10:00:01.250Z`), read without
/// chrono's general RFC 3339 parser on the common path (replay profile);
/// anything else goes to chrono.
fn time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
    if let Some(t) = fast_utc(text.as_bytes()) {
        return Ok(t);
    }
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(serde::de::Error::custom)
}

fn fast_utc(b: &[u8]) -> Option<DateTime<Utc>> {
    fn num(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (rest, z) = b[19..].split_at(b.len() - 20);
    if z != b"Z" {
        return None;
    }
    let nanos = match rest {
        [] => 0,
        [b'.', digits @ ..] if !digits.is_empty() && digits.len() <= 9 => {
            num(digits)? * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let date =
        chrono::NaiveDate::from_ymd_opt(num(&b[..4])? as i32, num(&b[5..7])?, num(&b[8..10])?)?;
    let time =
        date.and_hms_nano_opt(num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?, nanos)?;
    Some(time.and_utc())
}

/// The JSON form of a record (no checksum), as in the committed fixture.
///
/// # Errors
/// Only if serde cannot serialize the event, which our types never cause.
pub fn encode_json(rec: &Recorded) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&StoredRef {
        v: version_of(&rec.event),
        seq: rec.seq,
        request_id: rec.request_id,
        at: rec.at,
        event: &rec.event,
    })
}

/// Reads the JSON form of any known version.
///
/// # Errors
/// [`DecodeError::UnknownVersion`] or [`DecodeError::Json`].
pub fn decode_json(json: &[u8]) -> Result<Recorded, DecodeError> {
    match peek_version(json)? {
        // Version 2 adds an event type to version 1's shape: one reader.
        1 | 2 => {
            let s: StoredV1 =
                serde_json::from_slice(json).map_err(|e| DecodeError::Json(e.to_string()))?;
            Ok(Recorded {
                seq: s.seq,
                request_id: s.request_id,
                at: s.at,
                event: s.event,
            })
        }
        v => Err(DecodeError::UnknownVersion(v)),
    }
}

/// The encoder always writes `{"v":N,` first, so the version is read without
/// parsing the record twice; anything else falls back to a full parse.
fn peek_version(json: &[u8]) -> Result<u16, DecodeError> {
    if let Some(rest) = json.strip_prefix(b"{\"v\":") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && digits <= 5 && rest.get(digits) == Some(&b',') {
            let text = std::str::from_utf8(&rest[..digits])
                .map_err(|e| DecodeError::Json(e.to_string()))?;
            return text
                .parse()
                .map_err(|_| DecodeError::Json(format!("bad version {text}")));
        }
    }
    #[derive(Deserialize)]
    struct Peek {
        v: u16,
    }
    serde_json::from_slice::<Peek>(json)
        .map(|p| p.v)
        .map_err(|e| DecodeError::Json(e.to_string()))
}

/// Checksum + JSON, the bytes kept in the store.
///
/// # Errors
/// As [`encode_json`].
pub fn encode(rec: &Recorded) -> Result<Vec<u8>, serde_json::Error> {
    seal(&encode_json(rec)?)
}

/// Prefixes `payload` with its CRC-32 (little endian).
#[allow(clippy::unnecessary_wraps)]
pub fn seal(payload: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks the CRC and returns the payload.
///
/// # Errors
/// [`DecodeError::TooShort`] or [`DecodeError::Checksum`].
pub fn unseal(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    let (head, payload) = bytes.split_at(4);
    let stored = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok(payload)
}

/// Decodes stored bytes.
///
/// # Errors
/// Any [`DecodeError`]; never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Recorded, DecodeError> {
    decode_json(unseal(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fast_time_path_agrees_with_chrono() {
        for s in [
            "2026-11-25T10:00:00Z",
            "2026-11-25T10:00:01.250Z",
            "2026-02-28T23:59:59.123456789Z",
            "1999-01-01T00:00:00.1Z",
        ] {
            let chrono_says = DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
            assert_eq!(fast_utc(s.as_bytes()), Some(chrono_says), "{s}");
        }
        for s in [
            "2026-11-25T10:00:00+01:00",
            "2026-13-25T10:00:00Z",
            "2026-11-25 10:00:00Z",
            "2026-11-25T10:00:00.Z",
            "x",
        ] {
            assert_eq!(fast_utc(s.as_bytes()), None, "{s}");
        }
    }

    proptest! {
        #[test]
        fn any_utc_time_round_trips(secs in 0i64..4_102_444_800, nanos in 0u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let text = serde_json::to_string(&t).unwrap();
            prop_assert_eq!(fast_utc(text.trim_matches('"').as_bytes()), Some(t));
        }
    }

    /// `Origin.language` came after version 1 was first written: a
    /// version-1 record without it reads as `None`, one with it keeps it,
    /// and a record without a language is written exactly as before.
    #[test]
    fn the_language_of_a_request_is_an_optional_addition_to_version_1() {
        let old = br#"{"v":1,"seq":7,"request_id":"019abb1c-3a00-7000-8000-000000000001","at":"2026-11-25T10:00:00Z","event":{"type":"queued","model":"flux","prompt":"a fox","origin":{"user_id":42,"chat_id":42,"message_id":1,"update_id":5}}}"#;
        let rec = decode_json(old).unwrap();
        let crate::domain::Event::Queued { origin, .. } = &rec.event else {
            panic!("{rec:?}")
        };
        assert_eq!(origin.language, None);
        assert_eq!(encode_json(&rec).unwrap(), old.to_vec());
        let new = String::from_utf8(old.to_vec())
            .unwrap()
            .replace(r#""update_id":5}"#, r#""update_id":5,"language":"fa-IR"}"#);
        let rec = decode_json(new.as_bytes()).unwrap();
        let crate::domain::Event::Queued { origin, .. } = &rec.event else {
            panic!("{rec:?}")
        };
        assert_eq!(origin.language.as_deref(), Some("fa-IR"));
        assert_eq!(encode_json(&rec).unwrap(), new.into_bytes());
    }

    /// A `queued` with an input image needs a version-2 reader (a
    /// version-1 one would drop the image and draw from the text alone);
    /// without one it stays version 1.
    #[test]
    fn a_queued_with_an_input_image_is_written_as_version_2() {
        let old = br#"{"v":1,"seq":7,"request_id":"019abb1c-3a00-7000-8000-000000000001","at":"2026-11-25T10:00:00Z","event":{"type":"queued","model":"paint","prompt":"in snow","origin":{"user_id":42,"chat_id":42,"message_id":1,"update_id":5}}}"#;
        let mut rec = decode_json(old).unwrap();
        let crate::domain::Event::Queued { input, .. } = &mut rec.event else {
            panic!("{rec:?}")
        };
        *input = Some(crate::domain::ImageRef {
            file: "input-0b7c.png".into(),
            bytes: 12,
            format: "png".into(),
        });
        let json = encode_json(&rec).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.starts_with("{\"v\":2,"), "{text}");
        assert!(
            text.ends_with(r#""input":{"file":"input-0b7c.png","bytes":12,"format":"png"}}}"#),
            "{text}"
        );
        assert_eq!(decode_json(&json).unwrap(), rec);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = decode_json(&bytes);
        }
    }
}
