//! Quick figure for durable acceptance: `Queued` events appended and made
//! durable per second with 1, 8 and 64 concurrent appenders (group commit).
//! `cargo run --release --example durable_append [seconds-per-run]`.
//! The criterion benchmarks of the performance issue measure this properly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use easel::domain::{ChatId, Event, ModelName, Origin, Prompt, RequestId, UserId};
use easel::store::{EventStore, NewEvent, SledStore};

fn queued(n: u32) -> Result<NewEvent, Box<dyn std::error::Error>> {
    Ok(NewEvent {
        request_id: RequestId::random(),
        at: Utc::now(),
        event: Event::Queued {
            model: ModelName::parse("flux")?,
            prompt: Prompt::parse("a red fox in the snow, golden hour")?,
            origin: Origin {
                user_id: UserId(i64::from(n % 1000)),
                chat_id: ChatId(1),
                message_id: None,
                update_id: Some(n),
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        },
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("appenders  events/s  flushes  p50_ms  p99_ms");
    for appenders in [1u32, 8, 64] {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let flushes_before = store.flush_count();
        let until = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..appenders)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = t * 10_000_000;
                    while Instant::now() < until {
                        let start = Instant::now();
                        let event = queued(n).map_err(|e| e.to_string())?;
                        let rec = store
                            .append(vec![event])
                            .map_err(|e| e.to_string())?
                            .remove(0);
                        store
                            .wait_durable(rec.seq)
                            .await
                            .map_err(|e| e.to_string())?;
                        latencies.push(start.elapsed());
                        n += 1;
                    }
                    Ok::<_, String>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "{appenders:>9}  {:>8.0}  {:>7}  {:>6.2}  {:>6.2}",
            all.len() as f64 / secs as f64,
            store.flush_count() - flushes_before,
            pct(0.50),
            pct(0.99)
        );
    }
    Ok(())
}
