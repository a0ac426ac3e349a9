//! The read-only questions operators ask, answered from the store's
//! indexes: a filtered list (newest first, from the request index), lookup
//! by id prefix, one request with its events, and the event stream. The
//! same functions serve the CLI on a stopped data dir and the running bot's
//! socket, so both give the same answers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{RequestId, Stage, UserId};
use crate::projection::RequestRecord;
use crate::store::{EventStore, Recorded, StoreError};

/// `audit list` filters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    pub user: Option<i64>,
    pub model: Option<String>,
    pub status: Option<Stage>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: Option<usize>,
}

/// A question over the socket (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Query {
    /// Events from `since_seq` on (to `until_seq`), oldest first.
    Events {
        since_seq: u64,
        until_seq: Option<u64>,
    },
    /// Requests matching a filter, newest first.
    List { filter: Filter },
    /// Request ids starting with a hex prefix (at most 21).
    Find { prefix: String },
    /// One request's events, oldest first.
    Show { id: RequestId },
}

/// The record of one request, from its indexed events.
///
/// # Errors
/// A store error.
pub fn record_of(
    store: &impl EventStore,
    id: RequestId,
) -> Result<Option<(RequestRecord, Vec<Recorded>)>, StoreError> {
    let events: Vec<Recorded> = store
        .events_of(id)?
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    Ok(RequestRecord::from_events(&events).map(|r| (r, events)))
}

/// `audit list`: walks the request index newest first (bounded by the time
/// range, or by the user's own index), folding only the requests it shows.
pub fn list<'a>(
    store: &'a impl EventStore,
    filter: &'a Filter,
) -> impl Iterator<Item = Result<RequestRecord, StoreError>> + 'a {
    let ids = store.request_ids(filter.user.map(UserId), filter.since, filter.until, true);
    ids.map(move |id| -> Result<Option<RequestRecord>, StoreError> {
        let Some((record, _)) = record_of(store, id?)? else {
            return Ok(None);
        };
        let keep = filter
            .model
            .as_deref()
            .is_none_or(|m| record.model.as_str().eq_ignore_ascii_case(m))
            && filter.status.is_none_or(|s| record.status == s)
            && filter.since.is_none_or(|t| record.created_at >= t)
            && filter.until.is_none_or(|t| record.created_at <= t);
        Ok(keep.then_some(record))
    })
    .filter_map(Result::transpose)
    .take(filter.limit.unwrap_or(usize::MAX))
}

/// Ids starting with `prefix` (hex, dashes ignored), at most 21.
///
/// # Errors
/// A sentence when the prefix is not hexadecimal.
pub fn find(store: &impl EventStore, prefix: &str) -> Result<Vec<RequestId>, super::OpsError> {
    let hex: String = prefix
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(super::OpsError::Usage(format!(
            "\"{prefix}\" is not a request id or id prefix (hexadecimal)"
        )));
    }
    let pad = |fill: char| -> Option<RequestId> {
        let full: String = hex
            .chars()
            .chain(std::iter::repeat(fill))
            .take(32)
            .collect();
        uuid::Uuid::parse_str(&full).ok().map(RequestId)
    };
    let (Some(lo), Some(hi)) = (pad('0'), pad('f')) else {
        return Ok(Vec::new());
    };
    let ids = store.ids_between(lo, hi);
    Ok(ids.take(21).collect::<Result<Vec<_>, _>>()?)
}
