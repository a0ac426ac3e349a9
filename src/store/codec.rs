//! The stored form of an event: a CRC-32 of the JSON, then JSON whose first
//! field is the schema version `v`. Every version ever written stays readable:
//! decoding dispatches on `v` and upcasts older shapes to today's [`Recorded`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Recorded;
use crate::domain::{Event, RequestId};

/// The version written today. Bump it (and add a decoder arm, an upcast and
/// a fixture) whenever the stored shape of any event changes.
pub const CURRENT_VERSION: u16 = 1;

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
    at: DateTime<Utc>,
    event: Event,
}

/// The JSON form of a record (no checksum), as in the committed fixture.
///
/// # Errors
/// Only if serde cannot serialize the event, which our types never cause.
pub fn encode_json(rec: &Recorded) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&StoredRef {
        v: CURRENT_VERSION,
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
        1 => {
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

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = decode_json(&bytes);
        }
    }
}
