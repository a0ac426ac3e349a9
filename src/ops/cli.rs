//! `easel audit`, `easel export` and `easel replay`: each writes to `out`
//! and returns its exit code (0 ok, 1 a check failed or nothing matched);
//! errors are one sentence with code 1 or 2 (bad usage).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};

use super::json::{ExportedEvent, parse_event_line};
use super::query::Filter;
use super::source::Source;
use super::{OpsError, elide, table};
use crate::domain::{Event, RequestId, Stage};
use crate::projection::RequestRecord;
use crate::store::{Corrupt, DecodeError, ReadError, ReadItem, Recorded};

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

fn prompt_width() -> usize {
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(160);
    columns.saturating_sub(120).clamp(20, 200)
}

pub fn audit_list(src: &Source, filter: &Filter, json_out: bool, out: Out<'_>) -> Res {
    // One more than asked for tells whether the list was cut.
    let mut wider = filter.clone();
    wider.limit = filter.limit.map(|n| n.saturating_add(1));
    let mut records = src.list(&wider)?;
    let cut = filter.limit.is_some_and(|n| records.len() > n);
    if let Some(n) = filter.limit {
        records.truncate(n);
    }
    if cut {
        // A notice beside the output, not an error: the list is what was asked.
        eprintln!(
            "easel: showing the newest {}; more requests match (--limit 0 lists all)",
            records.len()
        );
    }
    if json_out {
        for r in &records {
            w(out, &format!("{}\n", to_json(r)?))?;
        }
    } else if records.is_empty() {
        w(out, "no requests match\n")?;
    } else {
        w(out, &format!("{}\n", table(&records, prompt_width())))?;
    }
    Ok(0)
}

/// What `easel audit show --json` prints: §5's request object plus its
/// events in the export form.
#[derive(serde::Serialize)]
struct ShowReport<'a> {
    #[serde(flatten)]
    record: &'a RequestRecord,
    events: Vec<ExportedEvent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    archived_in: Option<String>,
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
        let shown = ShowReport {
            record: &record,
            events: events.iter().map(ExportedEvent::from).collect(),
            archived_in: archived_in.as_ref().map(|f| f.display().to_string()),
        };
        w(out, &format!("{}\n", to_json(&shown)?))?;
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
    if let Some(p) = &record.preset {
        text.push_str(&format!(
            "preset    {} (the user wrote: {})\n",
            super::visible(&p.name),
            super::visible(&p.prompt)
        ));
    }
    if record.images > 1 {
        let kept = record
            .variations
            .iter()
            .filter(|v| v.error.is_none())
            .count();
        text.push_str(&format!(
            "images    {} asked, {kept} of {} made so far\n",
            record.images,
            record.variations.len()
        ));
        for v in record.variations.iter().filter(|v| v.error.is_some()) {
            text.push_str(&format!(
                "          image {} failed: {}\n",
                v.index,
                super::visible(v.error.as_deref().unwrap_or_default())
            ));
        }
    }
    if let Some(input) = &record.input {
        text.push_str(&format!(
            "input     {} ({} bytes {}; image to image)\n",
            super::visible(&input.file),
            input.bytes,
            input.format
        ));
    }
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
    if !record.stage_ms.is_empty() {
        text.push_str("\nstages:\n");
        for (label, ms) in &record.stage_ms {
            text.push_str(&format!(
                "  {:<11} {}\n",
                label.replace('_', " "),
                secs(*ms)
            ));
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

/// What `easel audit stats` prints; the table and `--json` are two
/// renderings of it.
#[derive(Debug, Default, serde::Serialize)]
pub struct StatsReport {
    pub requests: u64,
    /// Per model, how many requests are in each state.
    pub by_model: BTreeMap<String, BTreeMap<Stage, u64>>,
    pub stages: StageStats,
    /// Failure reasons, most frequent first.
    pub failures: Vec<FailureCount>,
    /// How requests were asked for (§8).
    pub asked: AskedStats,
}

/// Presets used (by name), variation requests and their images, and
/// image-to-image requests.
#[derive(Debug, Default, serde::Serialize)]
pub struct AskedStats {
    pub presets: BTreeMap<String, u64>,
    pub variation_requests: u64,
    pub images_asked: u64,
    pub images_made: u64,
    pub images_failed: u64,
    pub with_input_image: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct StageStats {
    pub queue_wait: StageStat,
    pub enhancing: StageStat,
    pub generating: StageStat,
    pub sending: StageStat,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct StageStat {
    pub count: usize,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
pub struct FailureCount {
    pub reason: String,
    pub count: u64,
}

impl StageStats {
    fn each(&self) -> [(&'static str, &StageStat); 4] {
        [
            ("queue wait", &self.queue_wait),
            ("enhancing", &self.enhancing),
            ("generating", &self.generating),
            ("sending", &self.sending),
        ]
    }
}

impl StatsReport {
    /// Folds the whole log, each request through [`RequestRecord`] (the
    /// one audit fold), keeping only finished requests' counts once they
    /// finish.
    fn gather(src: &Source) -> Self {
        let mut open: HashMap<RequestId, RequestRecord> = HashMap::new();
        let mut requests = 0;
        let mut by_model: BTreeMap<String, BTreeMap<Stage, u64>> = BTreeMap::new();
        let mut durations: HashMap<&'static str, Vec<i64>> = HashMap::new();
        let mut failures: HashMap<String, u64> = HashMap::new();
        let mut asked = AskedStats::default();
        let mut count = |r: &RequestRecord| {
            if let Some(p) = &r.preset {
                *asked.presets.entry(p.name.clone()).or_default() += 1;
            }
            if r.images > 1 {
                asked.variation_requests += 1;
                asked.images_asked += u64::from(r.images);
                let failed = r.variations.iter().filter(|v| v.error.is_some()).count() as u64;
                asked.images_failed += failed;
                asked.images_made += r.variations.len() as u64 - failed;
            }
            if r.input.is_some() {
                asked.with_input_image += 1;
            }
            *by_model
                .entry(r.model.to_string())
                .or_default()
                .entry(r.status)
                .or_default() += 1;
            for (label, ms) in &r.stage_ms {
                durations.entry(label).or_default().push(*ms);
            }
            if let Some(error) = &r.error {
                let reason = match error.split_once(": ") {
                    Some((kind, reason)) => format!("{kind}: {}", elide(reason, 80)),
                    None => elide(error, 80),
                };
                *failures.entry(reason).or_default() += 1;
            }
        };
        for item in src.events(1, None) {
            let Ok(e) = item else { continue };
            if let Some(r) = RequestRecord::start(&e) {
                requests += 1;
                open.insert(e.request_id, r);
                continue;
            }
            if let Some(r) = open.get_mut(&e.request_id)
                && r.apply(&e)
                && r.status.is_terminal()
                && let Some(r) = open.remove(&e.request_id)
            {
                count(&r);
            }
        }
        for r in open.values() {
            count(r);
        }
        let mut stat = |label: &str| {
            let mut d = durations.remove(label).unwrap_or_default();
            d.sort_unstable();
            StageStat {
                count: d.len(),
                p50_ms: percentile(&d, 0.5),
                p95_ms: percentile(&d, 0.95),
            }
        };
        let stages = StageStats {
            queue_wait: stat("queue_wait"),
            enhancing: stat("enhancing"),
            generating: stat("generating"),
            sending: stat("sending"),
        };
        let mut ranked: Vec<FailureCount> = failures
            .into_iter()
            .map(|(reason, count)| FailureCount { reason, count })
            .collect();
        ranked.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
        StatsReport {
            requests,
            by_model,
            stages,
            failures: ranked,
            asked,
        }
    }

    fn text(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
        let mut header = vec!["model".to_owned()];
        header.extend(Stage::ALL.iter().map(|s| s.as_str().to_owned()));
        header.push("total".into());
        t.set_header(header);
        for (model, c) in &self.by_model {
            let mut row = vec![model.clone()];
            row.extend(
                Stage::ALL
                    .iter()
                    .map(|s| c.get(s).copied().unwrap_or(0).to_string()),
            );
            row.push(c.values().sum::<u64>().to_string());
            t.add_row(row);
        }
        let mut text = format!("{} requests\n{t}\n\n", self.requests);
        let mut d = comfy_table::Table::new();
        d.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
        d.set_header(vec!["stage", "count", "p50", "p95"]);
        for (label, stat) in self.stages.each() {
            let show = |x: Option<i64>| x.map_or("-".to_owned(), secs);
            d.add_row(vec![
                label.to_owned(),
                stat.count.to_string(),
                show(stat.p50_ms),
                show(stat.p95_ms),
            ]);
        }
        text.push_str(&format!("{d}\n"));
        let a = &self.asked;
        if !a.presets.is_empty() || a.variation_requests > 0 || a.with_input_image > 0 {
            text.push('\n');
            if !a.presets.is_empty() {
                let used: Vec<String> = a
                    .presets
                    .iter()
                    .map(|(name, n)| format!("{} {n}", super::visible(name)))
                    .collect();
                text.push_str(&format!("presets: {}\n", used.join(", ")));
            }
            if a.variation_requests > 0 {
                text.push_str(&format!(
                    "variations: {} requests, {} images asked, {} made, {} failed\n",
                    a.variation_requests, a.images_asked, a.images_made, a.images_failed
                ));
            }
            if a.with_input_image > 0 {
                text.push_str(&format!(
                    "image to image: {} requests\n",
                    a.with_input_image
                ));
            }
        }
        if !self.failures.is_empty() {
            text.push_str("\nfailure reasons:\n");
            for f in self.failures.iter().take(20) {
                text.push_str(&format!("  {:>6}  {}\n", f.count, f.reason));
            }
        }
        text
    }
}

pub fn audit_stats(src: &Source, json_out: bool, out: Out<'_>) -> Res {
    let report = StatsReport::gather(src);
    if json_out {
        w(out, &format!("{}\n", to_json(&report)?))?;
    } else {
        w(out, &report.text())?;
    }
    Ok(0)
}

/// One report as a JSON line.
fn to_json(report: &impl serde::Serialize) -> Result<String, OpsError> {
    serde_json::to_string(report)
        .map_err(|e| OpsError::failed(format!("cannot word the report as JSON: {e}")))
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

/// The log's events, after the archived ones when `archive` is given
/// (`--with-archive`), merged in seq order: the whole life of the data
/// dir in one stream.
fn history<'a>(
    src: &'a Source,
    archive: Option<&Path>,
    until_seq: Option<u64>,
) -> Result<Box<dyn Iterator<Item = Result<Recorded, OpsError>> + 'a>, OpsError> {
    let log = src.events(1, until_seq);
    let Some(dir) = archive else {
        return Ok(log);
    };
    let until = until_seq.unwrap_or(u64::MAX);
    let mut archived = super::retention::archived_events(dir)?
        .into_iter()
        .filter(move |r| r.seq <= until)
        .peekable();
    let mut log = log.peekable();
    Ok(Box::new(std::iter::from_fn(move || {
        let take_archived = match (archived.peek(), log.peek()) {
            (Some(a), Some(Ok(l))) => a.seq < l.seq,
            (Some(_), None) => true,
            _ => false,
        };
        if take_archived {
            archived.next().map(Ok)
        } else {
            log.next()
        }
    })))
}

pub fn export(
    src: &Source,
    since: Option<DateTime<Utc>>,
    archive: Option<&Path>,
    out: Out<'_>,
) -> Res {
    export_items(history(src, archive, None)?, since, out)
}

/// The export lines of `items`, a damaged record reported on stderr and
/// skipped.
fn export_items(
    items: impl Iterator<Item = Result<Recorded, OpsError>>,
    since: Option<DateTime<Utc>>,
    out: Out<'_>,
) -> Res {
    for item in items {
        match item {
            Ok(e) if since.is_none_or(|t| e.at >= t) => {
                w(out, &format!("{}\n", to_json(&ExportedEvent::from(&e))?))?;
            }
            Ok(_) => {}
            // A damaged record is reported, not exported; the rest goes on.
            Err(e) => eprintln!("easel: skipping: {e}"),
        }
    }
    Ok(0)
}

/// Where replay reads: the data dir (after its archive with
/// `--with-archive`), or an exported file.
pub enum ReplayInput<'a> {
    Source {
        src: &'a Source,
        archive: Option<&'a Path>,
    },
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
        ReplayInput::Source { src, archive } => (
            Box::new(history(src, archive, until_seq)?.map(|item| match item {
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
