//! Queue position in a 100k queue, and advancing its head including the
//! position-update plan (criterion). Also prints the RSS of 100k queued
//! requests in the live projection.
//! `cargo bench --bench queue`

use chrono::{TimeZone, Utc};
use criterion::{BatchSize, Criterion, black_box};
use easel::domain::{ChatId, Event, ModelName, Origin, Prompt, RequestId, UserId};
use easel::projection::{FifoQueue, LiveState};
use easel::store::Recorded;

const N: u128 = 100_000;

fn id(n: u128) -> RequestId {
    RequestId(uuid::Uuid::from_u128(n + 1))
}

fn queued_state() -> (LiveState, u64) {
    let at = Utc
        .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
        .single()
        .expect("time");
    let model = ModelName::parse("flux").expect("model");
    let prompt = Prompt::parse("a red fox in the snow").expect("prompt");
    let mut state = LiveState::default();
    for n in 0..N {
        let rec = Recorded {
            seq: n as u64 + 1,
            request_id: id(n),
            at,
            event: Event::Queued {
                model: model.clone(),
                prompt: prompt.clone(),
                origin: Origin {
                    user_id: UserId(n as i64),
                    chat_id: ChatId(n as i64),
                    message_id: None,
                    update_id: None,
                    language: None,
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            },
        };
        state.apply(&rec).expect("apply");
    }
    (state, N as u64)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let before = rss_mib();
    let (state, last) = queued_state();
    let after = rss_mib();
    println!(
        "RSS: {before:.0} MiB before, {after:.0} MiB with {N} queued requests in the live state (+{:.0} MiB)",
        after - before
    );

    let mut c = Criterion::default().configure_from_args();
    let mut queue = FifoQueue::default();
    for n in 0..N {
        queue.push(id(n));
    }
    let mut probe = 0u128;
    c.bench_function("position in a 100k queue", |b| {
        b.iter(|| {
            probe = (probe + 7919) % N;
            black_box(queue.position(id(probe)))
        })
    });
    let model = ModelName::parse("flux").expect("model");
    let at = Utc
        .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
        .single()
        .expect("time");
    c.bench_function(
        "advance the head of a 100k queue + position-update plan",
        |b| {
            b.iter_batched(
                || state.clone(),
                |mut s| {
                    // The head starts (leaves the queue) …
                    let head = s.head(&model).expect("head");
                    s.apply(&Recorded {
                        seq: last + 1,
                        request_id: head,
                        at,
                        event: Event::Started,
                    })
                    .expect("start");
                    // … and the status board's plan for it: restart the model's
                    // sweep, whose first tick computes the next 64 positions.
                    let batch: Vec<Option<usize>> = s
                        .lane(&model)
                        .map(|l| {
                            l.queue
                                .iter_after(None)
                                .take(64)
                                .map(|(_, id)| s.position(id))
                                .collect()
                        })
                        .unwrap_or_default();
                    // Returned, so dropping the cloned state is not timed.
                    (s, black_box(batch))
                },
                BatchSize::LargeInput,
            )
        },
    );
    c.final_summary();
}
