//! Durable acceptance: `Queued` events accepted and on disk per second with
//! 1, 8 and 64 concurrent acceptances, through `Core::accept` (intake
//! lookups, limits, append, group-committed fsync) — against SQLite (WAL,
//! synchronous=FULL, one transaction per acceptance) in the same run.
//! `cargo bench --bench acceptance [-- SECONDS]`; `EASEL_BENCH_ONLY=easel`
//! (or `sqlite`) and `EASEL_BENCH_CONCURRENCY=1,64` narrow a run, e.g. to
//! count its system calls under `strace -f -c`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use easel::domain::{ChatId, Limits, ModelName, Origin, Prompt, RateLimit, UserId};
use easel::engine::{Core, NewRequest, SystemClock};
use easel::store::{EventStore, SledStore};

fn request(n: u64) -> NewRequest {
    NewRequest {
        model: ModelName::parse(if n.is_multiple_of(2) { "flux" } else { "sdxl" }).expect("model"),
        prompt: Prompt::parse("a red fox in the snow, golden hour, highly detailed")
            .expect("prompt"),
        origin: Origin {
            user_id: UserId(n as i64),
            chat_id: ChatId(n as i64),
            message_id: Some(n as i32),
            update_id: Some(n as u32),
            language: None,
        },
        preset: None,
        remembered: false,
        input: None,
        images: 1,
    }
}

fn p99(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() * 99 / 100)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Acceptances per second, p99 ms, and easel's group-commit flushes (each
/// one sled flush + one `fdatasync`) per acceptance.
fn easel_run(concurrency: u64, secs: u64) -> (f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("log")).expect("open");
        let core = Arc::new(Core::open(store, Arc::new(SystemClock)).expect("core").0);
        let limits = Limits {
            max_pending: u32::MAX,
            rate: RateLimit {
                count: 256,
                window_secs: 1,
            },
        };
        let until = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..concurrency)
            .map(|t| {
                let core = Arc::clone(&core);
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut n = t * 100_000_000;
                    while Instant::now() < until {
                        let start = Instant::now();
                        core.accept(request(n), &limits).await.expect("accept");
                        lat.push(start.elapsed());
                        n += 1;
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let flushes = core.store().flush_count() as f64 / all.len().max(1) as f64;
        (all.len() as f64 / secs as f64, p99(all), flushes)
    })
}

fn sqlite_run(concurrency: u64, secs: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.db");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id BLOB, at TEXT, body TEXT);
             CREATE INDEX by_request ON events(request_id);
             CREATE TABLE intake (update_id INTEGER PRIMARY KEY, request_id BLOB);",
        )
        .expect("schema");
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..concurrency)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = rusqlite::Connection::open(&path).expect("open");
                c.execute_batch("PRAGMA synchronous=FULL;").expect("pragma");
                c.busy_timeout(Duration::from_secs(30)).expect("busy");
                let body = serde_json::to_string(&serde_json::json!({"type":"queued","model":"flux","prompt":"a red fox in the snow, golden hour, highly detailed"})).expect("json");
                let mut lat = Vec::new();
                let mut n = t * 100_000_000;
                while Instant::now() < until {
                    let start = Instant::now();
                    let id = uuid::Uuid::new_v4();
                    // IMMEDIATE: take the write lock up front, as a writer must
                    // (a deferred read-then-write deadlocks under concurrency).
                    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("tx");
                    // The same work as easel: an intake check, then the event
                    // and its intake key in one transaction.
                    let dup: Option<Vec<u8>> = tx
                        .query_row("SELECT request_id FROM intake WHERE update_id = ?1", [n as i64], |r| r.get(0))
                        .ok();
                    assert!(dup.is_none());
                    tx.execute("INSERT INTO events (request_id, at, body) VALUES (?1, datetime('now'), ?2)", rusqlite::params![id.as_bytes().to_vec(), body])
                        .expect("insert");
                    tx.execute("INSERT INTO intake (update_id, request_id) VALUES (?1, ?2)", rusqlite::params![n as i64, id.as_bytes().to_vec()])
                        .expect("intake");
                    tx.commit().expect("commit");
                    lat.push(start.elapsed());
                    n += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().expect("thread"));
    }
    (all.len() as f64 / secs as f64, p99(all))
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("EASEL_BENCH_ONLY").unwrap_or_default();
    let levels: Vec<u64> = std::env::var("EASEL_BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 64]);
    println!(
        "durable acceptances per second, {secs} s per run (easel: Core::accept, flush + fdatasync per group commit; SQLite: WAL + synchronous=FULL, one transaction each)"
    );
    println!(
        "| concurrent | easel /s | SQLite /s | easel ÷ SQLite | easel p99 ms | SQLite p99 ms | easel flushes per acceptance |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for c in levels {
        let (e, ep99, per) = if only == "sqlite" {
            (0.0, 0.0, 0.0)
        } else {
            easel_run(c, secs)
        };
        let (s, sp99) = if only == "easel" {
            (0.0, 0.0)
        } else {
            sqlite_run(c, secs)
        };
        println!(
            "| {c} | {e:.0} | {s:.0} | {:.2}× | {ep99:.2} | {sp99:.2} | {per:.3} |",
            e / s.max(1e-9)
        );
    }
}
