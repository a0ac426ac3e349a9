//! History at scale: a log of EVENTS events (default 1,000,000: 200k
//! finished requests of 5 events) built once, then in the same run:
//! replay of every projection (events/s) against reading and decoding the
//! same records; start-up (checkpoint + tail) with that history against a log
//! of 1k events; `audit list --limit 20` and `audit show` on it; disk bytes
//! per finished request. `cargo bench --bench history [-- EVENTS]`

use std::sync::Arc;
use std::time::Instant;

use easel::domain::{ChatId, Event, ImageRef, ModelName, Origin, Prompt, RequestId, UserId};
use easel::engine::{Core, SystemClock};
use easel::ops::query::{self, Filter};
use easel::projection::{LiveState, replay_into};
use easel::store::{EventStore, NewEvent, SledStore};

fn build(dir: &std::path::Path, events: u64) -> RequestId {
    let store = SledStore::open(dir).expect("open");
    let model = ModelName::parse("flux").expect("model");
    let prompt = Prompt::parse("a red fox in the snow, golden hour").expect("prompt");
    let requests = events / 5;
    let mut last = None;
    let at0 = chrono::Utc::now() - chrono::Duration::days(30);
    for n in 0..requests {
        let at = at0 + chrono::Duration::milliseconds(n as i64 * 10);
        let id = RequestId::new_at(at);
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
                },
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
    let small = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let last = build(big.path(), events);
    build(small.path(), 1_000);
    println!(
        "built {events} events in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bytes = dir_bytes(big.path());
    println!(
        "disk: {bytes} bytes for {} finished requests = {} bytes per request",
        events / 5,
        bytes / (events / 5)
    );

    let store = SledStore::open(big.path()).expect("open");
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
        let s = SledStore::open(big.path()).expect("open");
        let (core, report) = Core::open(s, Arc::new(SystemClock)).expect("core");
        std::hint::black_box((core.read(|s| s.last_seq), report.tail_events))
    });
    let (open_small, _) = best_of(3, || {
        let s = SledStore::open(small.path()).expect("open");
        let (core, report) = Core::open(s, Arc::new(SystemClock)).expect("core");
        std::hint::black_box((core.read(|s| s.last_seq), report.tail_events))
    });
    println!(
        "start-up (open log, checkpoint + tail): {:.1} ms with {events} events, {:.1} ms with 1000 ({:.2}×)",
        open_big * 1000.0,
        open_small * 1000.0,
        open_big / open_small
    );

    let store = SledStore::open(big.path()).expect("open");
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
}
