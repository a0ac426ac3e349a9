//! History at scale: a log of EVENTS events (default 1,000,000: 200k
//! finished requests of 5 events) built once, then in the same run:
//! replay of every projection (events/s) against reading and decoding the
//! same records; start-up (checkpoint + tail) with that history against a log
//! of 1k events; `audit list --limit 20` and `audit show` on it; disk bytes
//! per finished request; then the effect of retention: a sweep with a
//! 7-day window over that history (spread over 60 days), and the log's
//! disk size, start-up and replay after it, after `easel compact`, and
//! after as many new requests as the sweep archived.
//! `cargo bench --bench history [-- EVENTS]`

use std::sync::Arc;
use std::time::Instant;

use easel::domain::{ChatId, Event, ImageRef, ModelName, Origin, Prompt, RequestId, UserId};
use easel::engine::{Core, SystemClock};
use easel::ops::query::{self, Filter};
use easel::projection::{LiveState, replay_into};
use easel::store::{EventStore, NewEvent, SledStore};

fn build(dir: &std::path::Path, events: u64) -> RequestId {
    let at0 = chrono::Utc::now() - chrono::Duration::days(60);
    append_history(dir, events, at0, chrono::Duration::days(60), 0)
}

/// Appends `events / 5` finished requests spread evenly over `span` from
/// `at0` (update and message ids from `first`), then checkpoints.
fn append_history(
    dir: &std::path::Path,
    events: u64,
    at0: chrono::DateTime<chrono::Utc>,
    span: chrono::Duration,
    first: u64,
) -> RequestId {
    let store = SledStore::open(dir).expect("open");
    let model = ModelName::parse("flux").expect("model");
    let prompt = Prompt::parse("a red fox in the snow, golden hour").expect("prompt");
    let requests = events / 5;
    let mut last = None;
    // Spread evenly, as a steady bot's history is.
    let step_ms = span.num_milliseconds() / requests.max(1) as i64;
    for n in first..first + requests {
        let at = at0 + chrono::Duration::milliseconds((n - first) as i64 * step_ms);
        let id = RequestId::random();
        last = Some(id);
        let e = |event| NewEvent {
            request_id: id,
            at,
            event,
        };
        let batch = vec![
            e(Event::Queued {
                model: model.clone(),
                prompt: prompt.clone(),
                origin: Origin {
                    user_id: UserId((n % 5000) as i64),
                    chat_id: ChatId((n % 5000) as i64),
                    message_id: Some(n as i32),
                    update_id: Some(n as u32),
                    language: None,
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            }),
            e(Event::Started),
            e(Event::Enhanced {
                prompt: "A red fox in the snow, golden hour, detailed".into(),
                fallback: None,
            }),
            e(Event::Generated {
                image: ImageRef {
                    file: format!("{id}.png"),
                    bytes: 123_456,
                    format: "png".into(),
                },
                attempts: 1,
                statuses: vec!["200".into()],
            }),
            e(Event::Delivered {
                message_id: Some(n as i32),
            }),
        ];
        store.append(batch).expect("append");
    }
    // Leave a checkpoint as the running bot would.
    let (core, _) = Core::open(store, Arc::new(SystemClock)).expect("core");
    core.checkpoint().expect("checkpoint");
    last.expect("at least one request")
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_bytes(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (best, out.expect("ran"))
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let big = tempfile::tempdir().expect("tempdir");
    // EASEL_HISTORY_DIR keeps the big log (swept by the retention step) for
    // profiling afterwards.
    // Each log in a folder of its own, so its lock file (`log.lock`,
    // beside it) stays inside the temporary dir.
    let big_path = std::env::var_os("EASEL_HISTORY_DIR")
        .map_or_else(|| big.path().to_path_buf(), std::path::PathBuf::from)
        .join("log");
    let small_dir = tempfile::tempdir().expect("tempdir");
    let small = small_dir.path().join("log");
    let t = Instant::now();
    let last = build(&big_path, events);
    build(&small, 1_000);
    println!(
        "built {events} events in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bytes = dir_bytes(&big_path);
    println!(
        "disk: {bytes} bytes for {} finished requests = {} bytes per request",
        events / 5,
        bytes / (events / 5)
    );

    let store = SledStore::open(&big_path).expect("open");
    let (scan_s, n) = best_of(3, || store.read_from(1).count());
    let (replay_s, applied) = best_of(3, || {
        let mut state = LiveState::default();
        replay_into(&mut state, store.read_from(1))
            .expect("replay")
            .applied
    });
    println!(
        "read+decode {n} events: {:.0}/s; replay into every projection: {applied} events at {:.0}/s ({:.0}% of read+decode)",
        n as f64 / scan_s,
        applied as f64 / replay_s,
        100.0 * scan_s / replay_s
    );
    drop(store);

    let (open_big, _) = best_of(3, || {
        let s = SledStore::open(&big_path).expect("open");
        let (core, report) = Core::open(s, Arc::new(SystemClock)).expect("core");
        std::hint::black_box((core.read(|s| s.last_seq), report.tail_events))
    });
    let (open_small, _) = best_of(3, || {
        let s = SledStore::open(&small).expect("open");
        let (core, report) = Core::open(s, Arc::new(SystemClock)).expect("core");
        std::hint::black_box((core.read(|s| s.last_seq), report.tail_events))
    });
    println!(
        "start-up (open log, checkpoint + tail): {:.1} ms with {events} events, {:.1} ms with 1000 ({:.2}×)",
        open_big * 1000.0,
        open_small * 1000.0,
        open_big / open_small
    );

    let store = SledStore::open(&big_path).expect("open");
    let filter = Filter {
        limit: Some(20),
        ..Filter::default()
    };
    let (list_s, rows) = best_of(5, || {
        query::list(&store, &filter).filter_map(Result::ok).count()
    });
    let (show_s, _) = best_of(5, || query::record_of(&store, last).expect("show"));
    let prefix = last.to_string()[..23].to_owned();
    let (find_s, found) = best_of(5, || query::find(&store, &prefix).expect("find"));
    println!(
        "audit list --limit 20: {:.2} ms ({rows} rows); audit show: {:.3} ms; id prefix lookup: {:.3} ms ({} match)",
        list_s * 1000.0,
        show_s * 1000.0,
        find_s * 1000.0,
        found.len()
    );
    drop(store);
    retention(&big_path, events);
}

/// A retention sweep with a 7-day window over the 60 days of history, and
/// what it changes: disk, start-up, replay.
fn retention(dir: &std::path::Path, events: u64) {
    let open_time = |dir: &std::path::Path| {
        best_of(3, || {
            let s = SledStore::open(dir).expect("open");
            let (core, report) = Core::open(s, Arc::new(SystemClock)).expect("core");
            std::hint::black_box((core.read(|s| s.last_seq), report.tail_events))
        })
        .0
    };
    let before_bytes = dir_bytes(dir);
    let before_open = open_time(dir);
    let archive = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir).expect("open");
    let cutoff = chrono::Utc::now() - chrono::Duration::days(7);
    let t = Instant::now();
    let report =
        easel::ops::retention::sweep(&store, archive.path(), cutoff, &|| false).expect("sweep");
    let sweep_s = t.elapsed().as_secs_f64();
    drop(store);
    println!(
        "retention sweep (7 of 60 days kept): {} requests, {} events archived in {:.1} s ({:.0} requests/s) to {} files, {} bytes ({} per request)",
        report.requests,
        report.events,
        sweep_s,
        report.requests as f64 / sweep_s,
        report.files.len(),
        report.archive_bytes,
        report.archive_bytes / report.requests.max(1) as u64
    );
    let after_bytes = dir_bytes(dir);
    let after_open = open_time(dir);
    let store = SledStore::open(dir).expect("open");
    let (replay_s, applied) = best_of(3, || {
        let mut state = LiveState::default();
        replay_into(&mut state, store.read_from(1))
            .expect("replay")
            .applied
    });
    drop(store);
    println!(
        "after retention: log {after_bytes} bytes on disk (was {before_bytes}); start-up {:.1} ms (was {:.1} ms with {events} events); full replay {applied} events in {:.1} ms",
        after_open * 1000.0,
        before_open * 1000.0,
        replay_s * 1000.0
    );
    // `easel compact` right after the sweep (on a copy): a fresh database
    // of the window alone.
    let copy_root = tempfile::tempdir().expect("tempdir");
    let copy = copy_root.path().join("log");
    copy_dir(dir, &copy);
    let t = Instant::now();
    let compacted = SledStore::compact(&copy).expect("compact");
    let compact_s = t.elapsed().as_secs_f64();
    let compact_open = open_time(&copy);
    println!(
        "easel compact after the sweep: {} keys in {:.1} s, {} → {} bytes on disk; start-up {:.1} ms",
        compacted.keys,
        compact_s,
        compacted.bytes_before,
        compacted.bytes_after,
        compact_open * 1000.0
    );
    drop(copy_root);
    // Time goes on (no compaction): as many new requests as left, within
    // the window; sled reuses the space the sweep freed.
    let t = Instant::now();
    append_history(
        dir,
        report.requests as u64 * 5,
        chrono::Utc::now() - chrono::Duration::days(1),
        chrono::Duration::days(1),
        events,
    );
    let appended_s = t.elapsed().as_secs_f64();
    let steady_bytes = dir_bytes(dir);
    let steady_open = open_time(dir);
    println!(
        "then {} new requests appended in {:.1} s: log {steady_bytes} bytes on disk ({:+} since the sweep; without retention it would have grown by about {}); start-up {:.1} ms",
        report.requests,
        appended_s,
        steady_bytes as i64 - after_bytes as i64,
        before_bytes / (events / 5) * report.requests as u64,
        steady_open * 1000.0
    );
}
