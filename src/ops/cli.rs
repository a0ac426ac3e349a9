//! `easel audit`, `easel export` and `easel replay`: each writes to `out`
//! and returns its exit code (0 ok, 1 a check failed or nothing matched);
//! errors are one sentence with code 1 or 2 (bad usage).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use super::json::{event_json, parse_event_line};
use super::query::Filter;
use super::source::Source;
use super::{OpsError, elide, table};
use crate::domain::{Event, RequestId, Stage};
use crate::projection::RequestRecord;
use crate::store::Recorded;
use crate::store::{Corrupt, DecodeError, ReadError, ReadItem};

type Out<'a> = &'a mut dyn Write;
type Res = Result<u8, OpsError>;

/// Writes, treating a closed pipe (`| head`) as the reader being done.
fn w(out: Out<'_>, text: &str) -> Result<(), OpsError> {
    match out.write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OpsError::ReaderGone),
        Err(e) => Err(OpsError::Output(e)),
    }
}

/// RFC 3339 (`2026-11-25T10:00:00Z`) or a date (`2026-11-25`, midnight UTC).
///
/// # Errors
/// A sentence naming the accepted forms.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    Err(format!(
        "\"{s}\" is not a time; use RFC 3339 (2026-11-25T10:00:00Z) or a date (2026-11-25)"
    ))
}

/// `2026-11-25 10:00:03 (5 min ago)`.
pub fn when(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ({})", t.format("%Y-%m-%d %H:%M:%S"), ago(now - t))
}

fn ago(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    match s {
        s if s < 0 => "in the future".into(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

fn secs(ms: i64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

/// The §5 request object.
pub fn record_json(r: &RequestRecord) -> serde_json::Value {
    json!({
        "id": r.id.to_string(), "user_id": r.user_id.0, "chat_id": r.chat_id.0, "model": r.model.as_str(),
        "prompt": r.prompt, "enhanced_prompt": r.enhanced_prompt, "status": r.status.as_str(),
        "error": r.error, "attempts": r.attempts,
        "created_at": r.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "updated_at": r.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

fn prompt_width() -> usize {
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(160);
    columns.saturating_sub(120).clamp(20, 200)
}

pub fn audit_list(src: &Source, filter: &Filter, json_out: bool, out: Out<'_>) -> Res {
    let records = src.list(filter)?;
    if json_out {
        for r in &records {
            w(out, &format!("{}\n", record_json(r)))?;
        }
    } else if records.is_empty() {
        w(out, "no requests match\n")?;
    } else {
        w(out, &format!("{}\n", table(&records, prompt_width())))?;
    }
    Ok(0)
}

/// Times the stages of one request from its events, one at a time.
#[derive(Default)]
pub struct StageClock {
    at: HashMap<&'static str, DateTime<Utc>>,
}

impl StageClock {
    /// The stage `e` ends (`queue_wait`, `enhancing`, `generating`,
    /// `sending`) and how long it took in ms, if `e` ends one.
    pub fn observe(&mut self, e: &Recorded) -> Option<(&'static str, i64)> {
        let edge = match &e.event {
            Event::Started => Some(("queued", "queue_wait")),
            Event::Enhanced { .. } => Some(("started", "enhancing")),
            Event::Generated { .. } => Some(("enhanced", "generating")),
            Event::Delivered { .. } => Some(("generated", "sending")),
            _ => None,
        };
        let took = edge.and_then(|(from, label)| {
            self.at
                .get(from)
                .map(|t| (label, (e.at - *t).num_milliseconds()))
        });
        // A regenerated image counts its generating time from the restart.
        let key = if matches!(e.event, Event::Regenerating) {
            "enhanced"
        } else {
            e.event.name()
        };
        self.at.insert(key, e.at);
        took
    }
}

/// The stage durations of a request, from its events.
pub fn stage_times(events: &[Recorded]) -> Vec<(&'static str, i64)> {
    let mut clock = StageClock::default();
    events.iter().filter_map(|e| clock.observe(e)).collect()
}

/// "`prefix` matches N requests" with up to 20 of them.
fn ambiguous(prefix: &str, ids: &[RequestId]) -> OpsError {
    let mut msg = format!(
        "\"{prefix}\" matches {} requests; give more of the id:",
        ids.len().min(20)
    );
    for id in ids.iter().take(20) {
        msg.push_str(&format!("\n  {id}"));
    }
    if ids.len() > 20 {
        msg.push_str("\n  …");
    }
    OpsError::failed(msg)
}

/// `audit show`: the log first, then the retention archive in `archive`.
pub fn audit_show(src: &Source, archive: &Path, prefix: &str, json_out: bool, out: Out<'_>) -> Res {
    let ids = src.find(prefix)?;
    let (id, events, archived_in) = match ids.as_slice() {
        [one] => (*one, src.show(*one)?, None),
        [] => {
            let mut found = super::retention::find_archived(archive, prefix).map_err(|e| {
                OpsError::failed(format!(
                    "the archive in {} could not be read: {e}",
                    archive.display()
                ))
            })?;
            match found.len() {
                0 => {
                    return Err(OpsError::failed(format!(
                        "no request id starts with \"{prefix}\""
                    )));
                }
                1 => {
                    let (file, id, events) = found.remove(0);
                    (id, events, Some(file))
                }
                _ => {
                    let ids: Vec<RequestId> = found.iter().map(|(_, id, _)| *id).collect();
                    return Err(ambiguous(prefix, &ids));
                }
            }
        }
        many => return Err(ambiguous(prefix, many)),
    };
    let record = RequestRecord::from_events(&events)
        .ok_or_else(|| OpsError::failed(format!("request {id} has no readable queued event")))?;
    if json_out {
        let mut obj = record_json(&record);
        obj["events"] = serde_json::Value::Array(events.iter().map(event_json).collect());
        if let Some(file) = &archived_in {
            obj["archived_in"] = serde_json::Value::from(file.display().to_string());
        }
        w(out, &format!("{obj}\n"))?;
        return Ok(0);
    }
    let now = Utc::now();
    let mut text = format!(
        "request   {}\nuser      {} (chat {})\nmodel     {}\nstatus    {}\nattempts  {}\ncreated   {}\nupdated   {}\nprompt    {}\n",
        record.id,
        record.user_id.0,
        record.chat_id.0,
        record.model,
        record.status,
        record.attempts,
        when(record.created_at, now),
        when(record.updated_at, now),
        super::visible(&record.prompt)
    );
    if let Some(e) = &record.enhanced_prompt {
        text.push_str(&format!("enhanced  {}\n", super::visible(e)));
    }
    if let Some(e) = &record.error {
        text.push_str(&format!("error     {}\n", super::visible(e)));
    }
    if let Some(file) = &archived_in {
        text.push_str(&format!("archived  {}\n", file.display()));
    }
    text.push_str("\ntimeline:\n");
    for e in &events {
        let detail = match &e.event {
            Event::Enhanced {
                fallback: Some(f), ..
            } => format!("original prompt used: {f}"),
            Event::Generated {
                attempts,
                statuses,
                image,
            } => {
                format!(
                    "{attempts} attempt(s) [{}], {} bytes {}",
                    statuses.join(", "),
                    image.bytes,
                    image.format
                )
            }
            Event::Failed {
                kind,
                reason,
                statuses,
                ..
            } => format!("{}: {reason} [{}]", kind.as_str(), statuses.join(", ")),
            Event::Resumed { stage } => format!("restart in {stage}"),
            Event::Delivered { message_id } => format!(
                "message {}",
                message_id.map_or("-".into(), |m| m.to_string())
            ),
            _ => String::new(),
        };
        text.push_str(&format!(
            "  #{:<8} {}  +{:<9} {:<12} {}\n",
            e.seq,
            e.at.format("%H:%M:%S%.3f"),
            secs((e.at - record.created_at).num_milliseconds()),
            e.event.name(),
            elide(&detail, 120)
        ));
    }
    let stages = stage_times(&events);
    if !stages.is_empty() {
        text.push_str("\nstages:\n");
        for (label, ms) in stages {
            text.push_str(&format!("  {:<11} {}\n", label.replace('_', " "), secs(ms)));
        }
    }
    w(out, &text)?;
    Ok(0)
}

fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied()
}

pub fn audit_stats(src: &Source, json_out: bool, out: Out<'_>) -> Res {
    // Per unfinished request: model and stage; finished ones only count.
    let mut live: HashMap<RequestId, (String, Stage)> = HashMap::new();
    let mut counts: BTreeMap<String, BTreeMap<Stage, u64>> = BTreeMap::new();
    let mut times: HashMap<RequestId, StageClock> = HashMap::new();
    let mut durations: BTreeMap<&'static str, Vec<i64>> = BTreeMap::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    let mut total = 0u64;
    for item in src.events(1, None) {
        let Ok(e) = item else { continue };
        let id = e.request_id;
        if let Event::Queued { model, .. } = &e.event {
            total += 1;
            live.insert(id, (model.to_string(), Stage::Queued));
            times.entry(id).or_default().observe(&e);
            continue;
        }
        let Some(step) = e.event.step() else { continue };
        let Some(entry) = live.get_mut(&id) else {
            continue;
        };
        let Ok(to) = crate::domain::next_stage(entry.1, step) else {
            continue;
        };
        entry.1 = to;
        if let Some((label, ms)) = times.entry(id).or_default().observe(&e) {
            durations.entry(label).or_default().push(ms);
        }
        if let Event::Failed { kind, reason, .. } = &e.event {
            *failures
                .entry(format!("{}: {}", kind.as_str(), elide(reason, 80)))
                .or_default() += 1;
        }
        if to.is_terminal() {
            if let Some((model, stage)) = live.remove(&id) {
                *counts.entry(model).or_default().entry(stage).or_default() += 1;
            }
            times.remove(&id);
        }
    }
    for (model, stage) in live.into_values() {
        *counts.entry(model).or_default().entry(stage).or_default() += 1;
    }
    for d in durations.values_mut() {
        d.sort_unstable();
    }
    let mut ranked: Vec<(String, u64)> = failures.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let labels = ["queue_wait", "enhancing", "generating", "sending"];
    if json_out {
        let by_model: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(m, c)| {
                (
                    m.clone(),
                    json!(
                        c.iter()
                            .map(|(s, n)| (s.as_str().to_owned(), *n))
                            .collect::<BTreeMap<_, _>>()
                    ),
                )
            })
            .collect();
        let stages: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|l| {
                let d = durations.get(l).map(Vec::as_slice).unwrap_or_default();
                ((*l).to_owned(), json!({ "count": d.len(), "p50_ms": percentile(d, 0.5), "p95_ms": percentile(d, 0.95) }))
            })
            .collect();
        let failures: Vec<_> = ranked
            .iter()
            .map(|(r, n)| json!({ "reason": r, "count": n }))
            .collect();
        w(
            out,
            &format!(
                "{}\n",
                json!({ "requests": total, "by_model": by_model, "stages": stages, "failures": failures })
            ),
        )?;
        return Ok(0);
    }
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    let mut header = vec!["model".to_owned()];
    header.extend(Stage::ALL.iter().map(|s| s.as_str().to_owned()));
    header.push("total".into());
    t.set_header(header);
    for (model, c) in &counts {
        let mut row = vec![model.clone()];
        row.extend(
            Stage::ALL
                .iter()
                .map(|s| c.get(s).copied().unwrap_or(0).to_string()),
        );
        row.push(c.values().sum::<u64>().to_string());
        t.add_row(row);
    }
    let mut text = format!("{total} requests\n{t}\n\n");
    let mut d = comfy_table::Table::new();
    d.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    d.set_header(vec!["stage", "count", "p50", "p95"]);
    for l in labels {
        let v = durations.get(l).map(Vec::as_slice).unwrap_or_default();
        let show = |x: Option<i64>| x.map_or("-".to_owned(), secs);
        d.add_row(vec![
            l.replace('_', " "),
            v.len().to_string(),
            show(percentile(v, 0.5)),
            show(percentile(v, 0.95)),
        ]);
    }
    text.push_str(&format!("{d}\n"));
    if !ranked.is_empty() {
        text.push_str("\nfailure reasons:\n");
        for (r, n) in ranked.iter().take(20) {
            text.push_str(&format!("  {n:>6}  {r}\n"));
        }
    }
    w(out, &text)?;
    Ok(0)
}

/// `easel compact`: the log rewritten into a fresh database.
pub fn compact(log: &Path, out: Out<'_>) -> Res {
    if !crate::store::SledStore::exists(log) {
        return Err(OpsError::usage(format!(
            "there is no easel event log in {}",
            log.display()
        )));
    }
    let started = std::time::Instant::now();
    let report = crate::store::SledStore::compact(log).map_err(|e| match e {
        // Another process has the log: refused, nothing touched.
        crate::store::StoreError::InUse(m) => OpsError::usage(format!("{m}; stop it first")),
        other => OpsError::failed(other.to_string()),
    })?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    w(
        out,
        &format!(
            "compacted the event log: {:.1} MiB → {:.1} MiB ({} keys) in {:.1} s\n",
            mib(report.bytes_before),
            mib(report.bytes_after),
            report.keys,
            started.elapsed().as_secs_f64()
        ),
    )?;
    Ok(0)
}

pub fn export(src: &Source, since: Option<DateTime<Utc>>, out: Out<'_>) -> Res {
    for item in src.events(1, None) {
        match item {
            Ok(e) if since.is_none_or(|t| e.at >= t) => w(out, &format!("{}\n", event_json(&e)))?,
            Ok(_) => {}
            // A damaged record is reported, not exported; the rest goes on.
            Err(e) => eprintln!("easel: skipping: {e}"),
        }
    }
    Ok(0)
}

/// Where replay reads: the data dir, or an exported file.
pub enum ReplayInput<'a> {
    Source(&'a Source),
    File(&'a Path),
}

/// What `easel replay` prints: each model's lane after the replay, and
/// with `--verify` what the one verifier ([`super::verify`]) found. The
/// text form and `--json` are two renderings of this one report.
#[derive(Debug, serde::Serialize)]
pub struct ReplayReport {
    pub last_seq: u64,
    pub events: u64,
    pub models: std::collections::BTreeMap<String, LaneReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySummary>,
}

#[derive(Debug, serde::Serialize)]
pub struct LaneReport {
    pub in_flight: Option<InFlight>,
    pub queue: Vec<RequestId>,
}

#[derive(Debug, serde::Serialize)]
pub struct InFlight {
    pub id: RequestId,
    pub stage: Option<&'static str>,
}

#[derive(Debug, serde::Serialize)]
pub struct VerifySummary {
    pub ok: bool,
    pub problems: usize,
    pub first_violation: Option<super::Problem>,
}

impl ReplayReport {
    fn new(report: &super::VerifyReport, verify: bool) -> Self {
        let state = &report.state;
        let models = state
            .lanes()
            .map(|(m, lane)| {
                let in_flight = lane.in_flight.map(|id| InFlight {
                    id,
                    stage: state.request(id).map(|r| r.stage.as_str()),
                });
                let queue = lane.queue.iter().collect();
                (m.to_string(), LaneReport { in_flight, queue })
            })
            .collect();
        ReplayReport {
            last_seq: state.last_seq,
            events: report.events,
            models,
            verify: verify.then(|| VerifySummary {
                ok: report.ok(),
                problems: report.problems(),
                first_violation: report.first_problem(),
            }),
        }
    }

    fn text(&self) -> String {
        let mut text = format!(
            "{} events replayed, up to seq {}\n",
            self.events, self.last_seq
        );
        if self.models.is_empty() {
            text.push_str("no models in the log\n");
        }
        for (model, lane) in &self.models {
            let flight = lane
                .in_flight
                .as_ref()
                .map_or("nothing in flight".to_owned(), |f| {
                    format!("in flight: {} ({})", f.id, f.stage.unwrap_or("?"))
                });
            text.push_str(&format!("{model}: {flight}; {} queued\n", lane.queue.len()));
            for (i, id) in lane.queue.iter().enumerate().take(10) {
                text.push_str(&format!("  {:>3}. {id}\n", i + 1));
            }
            if lane.queue.len() > 10 {
                text.push_str(&format!("  … {} more\n", lane.queue.len() - 10));
            }
        }
        if let Some(v) = &self.verify {
            match &v.first_violation {
                None => text
                    .push_str("verify: OK — every transition legal, FIFO and one-at-a-time hold\n"),
                Some(p) => text.push_str(&format!(
                    "verify: FAILED ({} problem(s)); first: {}\n",
                    v.problems, p.message
                )),
            }
        }
        text
    }
}

/// `easel replay`: every projection rebuilt by [`super::verify`] (the same
/// replay `easel run` and the demo check with), from the data dir or an
/// exported file, up to `until_seq`.
pub fn replay(
    input: ReplayInput<'_>,
    until_seq: Option<u64>,
    verify: bool,
    json_out: bool,
    out: Out<'_>,
) -> Res {
    let until = until_seq.unwrap_or(u64::MAX);
    // Lines that cannot be read are unreadable records to the verifier,
    // placed after the last event read; the replay goes on past them.
    let last_read = std::cell::Cell::new(0u64);
    let unreadable = |message: String| {
        Err(ReadError::Corrupt(Corrupt {
            seq: last_read.get() + 1,
            reason: DecodeError::Json(message),
        }))
    };
    let (items, total): (Box<dyn Iterator<Item = ReadItem> + '_>, u64) = match input {
        ReplayInput::Source(src) => (
            Box::new(src.events(1, until_seq).map(|item| match item {
                Ok(rec) => Ok(rec),
                Err(OpsError::Store(e)) => Err(ReadError::Store(e)),
                Err(e) => unreadable(e.to_string()),
            })),
            0,
        ),
        ReplayInput::File(path) => {
            let file = std::fs::File::open(path)
                .map_err(|e| OpsError::usage(format!("cannot read {}: {e}", path.display())))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let lines = std::io::BufReader::new(file)
                .lines()
                .enumerate()
                .filter_map(move |(n, l)| match l {
                    Ok(l) if l.trim().is_empty() => None,
                    Ok(l) => Some(parse_event_line(&l).map_err(|e| format!("line {}: {e}", n + 1))),
                    Err(e) => Some(Err(format!("line {}: {e}", n + 1))),
                })
                .map(|item| item.or_else(&unreadable));
            (Box::new(lines), size / 200)
        }
    };
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} replaying {pos} events {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut seen = 0u64;
    let items = items
        .take_while(|item| item.as_ref().map_or(true, |rec| rec.seq <= until))
        .inspect(|item| {
            if let Ok(rec) = item {
                last_read.set(rec.seq);
            }
            seen += 1;
            if seen.is_multiple_of(4096) {
                progress.set_position(seen);
            }
        });
    let report = super::verify(items)?;
    progress.finish_and_clear();
    let shown = ReplayReport::new(&report, verify);
    if json_out {
        let line = serde_json::to_string(&shown)
            .map_err(|e| OpsError::failed(format!("cannot word the report: {e}")))?;
        w(out, &format!("{line}\n"))?;
    } else {
        w(out, &shown.text())?;
    }
    if verify && let Some(p) = report.first_problem() {
        return Err(OpsError::failed(format!(
            "verification failed: {}",
            p.message
        )));
    }
    Ok(0)
}
