//! Durable acceptance: `Queued` events accepted and on disk per second with
//! 1, 8 and 64 concurrent acceptances, through `Core::accept` (intake
//! lookups, limits, append, group-committed fsync) — against SQLite (WAL,
//! synchronous=FULL, one transaction per acceptance) in the same run — and
//! PostgreSQL through `engine::replica::Replica::admit`, the admission
//! replicas run (intake keys, the limits and the `Queued` event decided
//! in the append transaction after the head lock, group commit;
//! `fsync=on`, `synchronous_commit=on`) with one replica, and three
//! replicas together (each with that many concurrent acceptances), on a
//! throwaway cluster started from the system's binaries (issue 17;
//! skipped, saying so, where there are none).
//! `cargo bench --bench acceptance [-- SECONDS]`; `EASEL_BENCH_ONLY=easel`
//! (or `sqlite`, `postgres`) and `EASEL_BENCH_CONCURRENCY=1,64` narrow a
//! run, e.g. to count its system calls under `strace -f -c`.

#[path = "../tests/common/pg.rs"]
mod pg;

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

/// Acceptances per second and p99 ms through `replicas` PostgreSQL logs
/// (each its own pool, committer and listener, as a replica process has),
/// each with `concurrency` acceptances at once; and events per commit.
fn postgres_run(
    cluster: &pg::Cluster,
    replicas: u64,
    concurrency: u64,
    secs: u64,
) -> (f64, f64, f64) {
    use easel::engine::replica::Replica;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let url = secrecy::SecretString::from(cluster.fresh_database().await);
        let mut logs = Vec::new();
        for r in 0..replicas {
            let replica = Replica::connect(&url, format!("bench-{r}"), Arc::new(SystemClock))
                .await
                .expect("connect");
            logs.push(Arc::new(replica));
        }
        let limits = Limits {
            rate: RateLimit {
                count: u32::MAX,
                window_secs: 60,
            },
            max_pending: u32::MAX,
        };
        let until = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for (r, log) in logs.iter().enumerate() {
            for t in 0..concurrency {
                let log = Arc::clone(log);
                let mut n = (r as u64 * 1000 + t) * 1_000_000;
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < until {
                        let start = Instant::now();
                        let done = log.admit(request(n), &limits).await.expect("admit");
                        assert!(
                            matches!(done, easel::engine::Admitted::Queued { .. }),
                            "{done:?}"
                        );
                        lat.push(start.elapsed());
                        n += 1;
                    }
                    lat
                }));
            }
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let commits: u64 = logs.iter().map(|l| l.log().commit_count()).sum();
        let per_commit = all.len() as f64 / commits.max(1) as f64;
        (all.len() as f64 / secs as f64, p99(all), per_commit)
    })
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
    let postgres = if only.is_empty() || only == "postgres" {
        match pg::start_durable() {
            Ok(c) => Some(c),
            Err(why) => {
                println!("PostgreSQL: skipped ({why})");
                None
            }
        }
    } else {
        None
    };
    println!(
        "durable acceptances per second, {secs} s per run (easel: Core::accept on sled, flush + fdatasync per group commit; PostgreSQL: Replica::admit, fsync=on, synchronous_commit=on, one replica and three together, each with that many concurrent; SQLite: WAL + synchronous=FULL, one transaction each)"
    );
    println!(
        "| concurrent | easel (sled) /s | PostgreSQL 1 replica /s | PostgreSQL 3 replicas /s | SQLite /s | sled ÷ SQLite | PostgreSQL ÷ SQLite | 3 replicas ÷ 1 | p99 ms sled / PG 1 / PG 3 / SQLite | sled flushes per acceptance | PG events per commit (1 / 3) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for c in levels {
        let (e, ep99, per) = if only.is_empty() || only == "easel" {
            easel_run(c, secs)
        } else {
            (0.0, 0.0, 0.0)
        };
        let ((p1, p1p99, p1c), (p3, p3p99, p3c)) = match &postgres {
            Some(cluster) => (
                postgres_run(cluster, 1, c, secs),
                postgres_run(cluster, 3, c, secs),
            ),
            None => ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        };
        let (s, sp99) = if only.is_empty() || only == "sqlite" {
            sqlite_run(c, secs)
        } else {
            (0.0, 0.0)
        };
        let ratio = |a: f64, b: f64| a / b.max(1e-9);
        println!(
            "| {c} | {e:.0} | {p1:.0} | {p3:.0} | {s:.0} | {:.2}× | {:.2}× | {:.2}× | {ep99:.1} / {p1p99:.1} / {p3p99:.1} / {sp99:.1} | {per:.3} | {p1c:.1} / {p3c:.1} |",
            ratio(e, s),
            ratio(p1, s),
            ratio(p3, p1),
        );
    }
    if let Some(c) = postgres {
        c.stop();
    }
}
