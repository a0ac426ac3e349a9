//! The JSON forms of `easel export` and `--json`: one flat object per event
//! (`seq`, `request_id`, `at`, `type`, then the event's fields) and its
//! inverse, so an exported file can be replayed and verified elsewhere.

use serde_json::{Map, Value};

use crate::domain::Event;
use crate::store::Recorded;
use crate::store::codec::CURRENT_VERSION;

/// The export object of one event.
pub fn event_json(rec: &Recorded) -> Value {
    let mut obj = Map::new();
    obj.insert("seq".into(), Value::from(rec.seq));
    obj.insert("request_id".into(), Value::from(rec.request_id.to_string()));
    obj.insert(
        "at".into(),
        Value::from(rec.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    if let Ok(Value::Object(fields)) = serde_json::to_value(&rec.event) {
        obj.extend(fields);
    }
    obj.insert("v".into(), Value::from(CURRENT_VERSION));
    Value::Object(obj)
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
        None | Some(1) => {}
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
