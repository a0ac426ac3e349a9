//! The JSON forms of `easel export` and `--json`: one flat object per event
//! (`seq`, `request_id`, `at`, `type`, then the event's fields) and its
//! inverse, so an exported file can be replayed and verified elsewhere.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::domain::{Event, RequestId};
use crate::store::Recorded;
use crate::store::codec::{CURRENT_VERSION, version_of};

/// The export form of one event (`easel export`, the query socket, `audit
/// show --json`): `seq`, `request_id`, `at` (RFC 3339, milliseconds), the
/// event's own fields with its `type`, and the schema version `v`.
/// [`parse_event_line`] is its inverse.
#[derive(Serialize)]
pub struct ExportedEvent<'a> {
    pub seq: u64,
    pub request_id: RequestId,
    #[serde(serialize_with = "crate::projection::record::millis")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub event: &'a Event,
    pub v: u16,
}

impl<'a> From<&'a Recorded> for ExportedEvent<'a> {
    fn from(rec: &'a Recorded) -> Self {
        ExportedEvent {
            seq: rec.seq,
            request_id: rec.request_id,
            at: rec.at,
            event: &rec.event,
            v: version_of(&rec.event),
        }
    }
}

/// The export line of one event, without its newline.
///
/// # Errors
/// Only if serde cannot word the event (not expected for plain data).
pub fn event_line(rec: &Recorded) -> Result<String, serde_json::Error> {
    serde_json::to_string(&ExportedEvent::from(rec))
}

/// Reads one export line back.
///
/// # Errors
/// A sentence saying what is wrong with the line.
pub fn parse_event_line(line: &str) -> Result<Recorded, String> {
    let Value::Object(mut obj) =
        serde_json::from_str::<Value>(line).map_err(|e| format!("not JSON ({e})"))?
    else {
        return Err("not a JSON object".into());
    };
    let seq = obj.remove("seq").and_then(|v| v.as_u64()).ok_or("no seq")?;
    let request_id = obj
        .remove("request_id")
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()))
        .map(crate::domain::RequestId)
        .ok_or_else(|| format!("event {seq} has no valid request_id"))?;
    let at = obj
        .remove("at")
        .and_then(|v| {
            v.as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        })
        .map(|t| t.with_timezone(&chrono::Utc))
        .ok_or_else(|| format!("event {seq} has no valid time"))?;
    match obj.remove("v").and_then(|v| v.as_u64()) {
        None => {}
        Some(v) if v >= 1 && v <= u64::from(CURRENT_VERSION) => {}
        Some(v) => return Err(format!("event {seq} has unknown version {v}")),
    }
    let event: Event =
        serde_json::from_value(Value::Object(obj)).map_err(|e| format!("event {seq}: {e}"))?;
    Ok(Recorded {
        seq,
        request_id,
        at,
        event,
    })
}
