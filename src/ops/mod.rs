//! Operator views over the log: audit records, verification of every
//! transition and invariant, and the tables people read.

pub mod cli;
pub mod json;
pub mod migrate;
pub mod query;
pub mod retention;
pub mod server;
pub mod source;

use std::collections::HashMap;

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use crate::domain::RequestId;
use crate::projection::{LiveState, RequestRecord, Violation, replay_into};
use crate::store::{Corrupt, ReadItem, Recorded, StoreError};

/// Why an operator command could not do its job; `main` prints it once
/// and exits with [`OpsError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad usage or input (a bad flag value, no log there, an ambiguous
    /// id): exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The log could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The running bot's query socket failed or answered with an error.
    #[error("{0}")]
    Remote(String),
    /// The command ran and found a problem (verification failed, a
    /// request not found): exit code 1.
    #[error("{0}")]
    Failed(String),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    /// The reader closed our output (`easel export | head`): the command
    /// stops early, and that is success, not an error.
    #[error("the reader closed the output")]
    ReaderGone,
}

impl OpsError {
    pub fn usage(message: impl Into<String>) -> Self {
        OpsError::Usage(message.into())
    }

    pub fn failed(message: impl Into<String>) -> Self {
        OpsError::Failed(message.into())
    }

    /// The documented exit code: 0 for a closed pipe, 2 for bad usage or
    /// configuration (a log in use counts: stop the bot first), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::ReaderGone => 0,
            OpsError::Usage(_) | OpsError::Store(StoreError::InUse(_)) => 2,
            OpsError::Store(_)
            | OpsError::Remote(_)
            | OpsError::Failed(_)
            | OpsError::Output(_) => 1,
        }
    }
}

/// What `--verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub events: u64,
    pub state: LiveState,
    pub violations: Vec<Violation>,
    pub corrupt: Vec<Corrupt>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.corrupt.is_empty()
    }

    /// How many problems were found (broken rules and unreadable records).
    pub fn problems(&self) -> usize {
        self.violations.len() + self.corrupt.len()
    }

    /// The earliest problem in log order, as `replay --verify` names it.
    pub fn first_problem(&self) -> Option<Problem> {
        let broken = self.violations.first().map(|v| Problem {
            seq: v.seq(),
            request_id: v.request_id(),
            rule: v.rule(),
            message: v.to_string(),
        });
        let unreadable = self.corrupt.first().map(|c| Problem {
            seq: c.seq,
            request_id: None,
            rule: "unreadable",
            message: c.to_string(),
        });
        match (broken, unreadable) {
            (Some(b), Some(u)) => Some(if u.seq < b.seq { u } else { b }),
            (b, u) => b.or(u),
        }
    }
}

/// One problem `verify` found, in the form `replay --json` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    pub seq: u64,
    pub request_id: Option<RequestId>,
    pub rule: &'static str,
    pub message: String,
}

/// Replays `items` from scratch, checking every transition against the
/// lifecycle and the §1 invariants (FIFO and one at a time per model).
///
/// # Errors
/// When the store itself cannot be read.
pub fn verify(items: impl Iterator<Item = ReadItem>) -> Result<VerifyReport, StoreError> {
    let mut state = LiveState::default();
    let report = replay_into(&mut state, items)?;
    Ok(VerifyReport {
        events: report.applied + report.violations.len() as u64,
        state,
        violations: report.violations,
        corrupt: report.corrupt,
    })
}

/// Every request's audit record, oldest first, folded from `items`.
///
/// # Errors
/// When the store itself cannot be read.
pub fn records(items: impl Iterator<Item = ReadItem>) -> Result<Vec<RequestRecord>, StoreError> {
    let mut events: HashMap<RequestId, Vec<Recorded>> = HashMap::new();
    let mut order = Vec::new();
    for item in items {
        match item {
            Ok(rec) => {
                let list = events.entry(rec.request_id).or_default();
                if list.is_empty() {
                    order.push(rec.request_id);
                }
                list.push(rec);
            }
            Err(crate::store::ReadError::Corrupt(_)) => {}
            Err(crate::store::ReadError::Store(e)) => return Err(e),
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|id| RequestRecord::from_events(events.get(&id)?))
        .collect())
}

/// `text` cut to `max` characters with "…".
pub fn elide(text: &str, max: usize) -> String {
    let flat: String = visible(&text.replace(|c: char| c.is_control(), " "));
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// Text from outside (prompts, LLM answers, worker errors) made safe for an
/// operator's terminal (§6): control characters (escape sequences, line
/// breaks, C1) and the bidirectional overrides that can make a line read
/// differently from what it holds are shown as `\u{..}`, never passed raw.
pub fn visible(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if hidden(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A table of requests for people.
pub fn table(records: &[RequestRecord], prompt_width: usize) -> String {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(vec![
        "id", "user", "model", "status", "tries", "created", "took", "prompt", "error",
    ]);
    for r in records {
        let took = (r.updated_at - r.created_at).num_milliseconds() as f64 / 1000.0;
        // How it was asked (§8): variations, a preset, an input image.
        let mut model = r.model.to_string();
        if r.images > 1 {
            model.push_str(&format!(" ×{}", r.images));
        }
        if let Some(p) = &r.preset {
            model.push_str(&format!(" [{}]", visible(&p.name)));
        }
        if r.input.is_some() {
            model.push_str(" +photo");
        }
        table.add_row(vec![
            r.id.to_string(),
            r.user_id.0.to_string(),
            model,
            r.status.to_string(),
            r.attempts.to_string(),
            cli::when(r.created_at, chrono::Utc::now()),
            format!("{took:.1}s"),
            elide(&r.prompt, prompt_width),
            elide(r.error.as_deref().unwrap_or(""), 40),
        ]);
    }
    table.to_string()
}
