//! Storage crash test: a child process appends durably from several tasks
//! and prints each append once `wait_durable` returned; the parent kills it
//! with SIGKILL at random moments, reopens the log, and checks that every
//! acknowledged append is there, in order, and that the log reads cleanly.
//!
//! A second test kills a child that runs whole requests through the core
//! while it checkpoints and removes finished requests as retention does:
//! after every kill no finished (or removed) request is live again, and no
//! seq is ever given twice, across the log and what was removed.
//!
//! `EASEL_CRASH_ROUNDS` (default 8) and `EASEL_CRASH_SEED` (default: time)
//! size and reproduce a run; the seed is printed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use easel::domain::{ChatId, Event, ModelName, Origin, Prompt, RequestId, UserId};
use easel::store::{EventStore, NewEvent, SledStore};

const CHILD_DIR: &str = "EASEL_CRASH_CHILD_DIR";
const CHILD_BASE: &str = "EASEL_CRASH_CHILD_BASE";

const CHILD_MODE: &str = "EASEL_CRASH_CHILD_MODE";

type Test = (&'static str, fn() -> Result<String, String>);

fn main() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let base: u32 = std::env::var(CHILD_BASE)
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        match std::env::var(CHILD_MODE).as_deref() {
            Ok("lifecycle") => lifecycle_child(&dir, base),
            _ => child(&dir, base),
        }
        return;
    }
    let tests: [Test; 2] = [
        ("kill_9_never_loses_an_acknowledged_append", parent),
        (
            "kill_9_never_revives_a_finished_or_removed_request_nor_repeats_a_seq",
            lifecycle_parent,
        ),
    ];
    // libtest-style filters: run only what is named, or everything.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in tests {
        if !args.is_empty() && !args.iter().any(|a| name.contains(a.as_str())) {
            continue;
        }
        match run() {
            Ok(summary) => {
                println!("test {name} ... ok ({summary})");
                passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn queued(update: u32) -> NewEvent {
    NewEvent {
        request_id: RequestId::random(),
        at: Utc::now(),
        event: Event::Queued {
            model: ModelName::parse("flux").expect("valid"),
            prompt: Prompt::parse("a fox in the snow").expect("valid"),
            origin: Origin {
                user_id: UserId(i64::from(update % 97)),
                chat_id: ChatId(7),
                message_id: None,
                update_id: Some(update),
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        },
    }
}

/// Appends forever from 8 tasks; prints `seq update` after each durable ack.
fn child(dir: &str, base: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = Arc::new(SledStore::open(std::path::Path::new(dir)).expect("open"));
        println!("ready");
        let tasks: Vec<_> = (0..8u32)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0u32.. {
                        let update = base + i * 8 + t;
                        let rec = store
                            .append(vec![queued(update)])
                            .expect("append")
                            .remove(0);
                        store.wait_durable(rec.seq).await.expect("durable");
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{} {update}", rec.seq).expect("stdout");
                        out.flush().expect("flush");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Rounds and seed of a run: `EASEL_CRASH_ROUNDS`, `EASEL_CRASH_SEED`.
fn rounds_and_seed(what: &str) -> (u32, Rng) {
    let rounds: u32 = std::env::var("EASEL_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("EASEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1);
    println!("{what}: {rounds} rounds, EASEL_CRASH_SEED={seed}");
    (rounds, Rng(seed))
}

/// Runs this binary as the `mode` child on `dir`, waits for its "ready",
/// lets it work for `work`, kills it with SIGKILL and returns every line
/// it printed after "ready".
fn run_and_kill(
    dir: &std::path::Path,
    mode: &str,
    base: u32,
    work: Duration,
) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(&exe)
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .env(CHILD_BASE, base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "ready" {
                    let _ = ready_tx.send(());
                    continue;
                }
                lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        })
    };
    let ready = ready_rx.recv_timeout(Duration::from_secs(30));
    if ready.is_ok() {
        std::thread::sleep(work);
    }
    child.kill().map_err(|e| e.to_string())?; // SIGKILL
    child.wait().map_err(|e| e.to_string())?;
    reader.join().map_err(|_| "reader panicked")?;
    ready.map_err(|_| "the child never got ready".to_owned())?;
    Ok(std::mem::take(
        &mut *lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    ))
}

fn parent() -> Result<String, String> {
    let (rounds, mut rng) = rounds_and_seed("crash test");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut acked_total = 0usize;
    let mut total_in_log = 0usize;
    for round in 0..rounds {
        let work = Duration::from_millis(5 + rng.next() % 150);
        let lines = run_and_kill(&dir.path().join("log"), "appends", round * 10_000_000, work)
            .map_err(|e| format!("round {round}: {e}"))?;
        let acks: Vec<(u64, u32)> = lines
            .iter()
            .filter_map(|line| {
                let mut parts = line.split(' ');
                match (parts.next().map(str::parse), parts.next().map(str::parse)) {
                    (Some(Ok(seq)), Some(Ok(update))) => Some((seq, update)),
                    _ => None,
                }
            })
            .collect();

        let store = SledStore::open(&dir.path().join("log"))
            .map_err(|e| format!("round {round}: reopen failed: {e}"))?;
        let mut previous = 0u64;
        let mut by_seq = std::collections::HashMap::new();
        for item in store.read_from(1) {
            let rec = item.map_err(|e| format!("round {round}: {e}"))?;
            if rec.seq <= previous {
                return Err(format!("round {round}: seq {} after {previous}", rec.seq));
            }
            previous = rec.seq;
            if let Event::Queued { origin, .. } = &rec.event {
                by_seq.insert(rec.seq, origin.update_id);
                // Every event in the log has its intake and index keys,
                // even if the kill fell between the event and its keys.
                if let Some(u) = origin.update_id {
                    let found = store.find_update(u).map_err(|e| e.to_string())?;
                    if found != Some(rec.request_id) {
                        return Err(format!(
                            "round {round}: update {u} of seq {} finds {found:?}",
                            rec.seq
                        ));
                    }
                }
                let indexed = store
                    .events_of(rec.request_id)
                    .map_err(|e| e.to_string())?
                    .len();
                if indexed == 0 {
                    return Err(format!("round {round}: seq {} is not indexed", rec.seq));
                }
            }
        }
        for (seq, update) in &acks {
            match by_seq.get(seq) {
                Some(Some(u)) if u == update => {}
                other => {
                    return Err(format!(
                        "round {round}: acknowledged seq {seq} (update {update}) is {other:?}"
                    ));
                }
            }
        }
        acked_total += acks.len();
        total_in_log = by_seq.len();
        drop(store);
    }
    // Appends that reached the disk before their ack was printed are
    // allowed (the user was simply never told); losing an ack is not.
    Ok(format!(
        "{rounds} kills, {acked_total} acknowledged appends all present, {total_in_log} in the log"
    ))
}

/// Runs requests end to end through the core, forever: accept, checkpoint
/// (so the latest checkpoint often holds a request as unfinished), start,
/// enhance, generate, deliver, then remove it from the log as retention
/// does. Prints `queued <seq> <id>`, `done <id>` and `removed <id>` once
/// each is durable, and `seq <n>` for every durable event's seq.
fn lifecycle_child(dir: &str, base: u32) {
    use easel::domain::{Command, ImageRef, Limits, RateLimit};
    use easel::engine::{Admitted, Core, NewRequest, SystemClock};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = SledStore::open(std::path::Path::new(dir)).expect("open");
        let (core, _) = Core::open_with(store, Arc::new(SystemClock), 1_000).expect("core");
        core.recover().await.expect("recover");
        println!("ready");
        let limits = Limits {
            rate: RateLimit {
                count: u32::MAX,
                window_secs: 1,
            },
            max_pending: u32::MAX,
        };
        let say = |line: String| {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").expect("stdout");
            out.flush().expect("flush");
        };
        // A request the last kill left in flight would hold the model: end
        // it (a failure is a finished request too; it must stay finished).
        let leftovers: Vec<RequestId> = core.read(|s| s.requests().map(|r| r.id).collect());
        for id in leftovers {
            core.execute(
                id,
                Command::Fail {
                    kind: easel::domain::FailureKind::Internal,
                    reason: "left by the previous kill".into(),
                    attempts: 0,
                    statuses: Vec::new(),
                },
            )
            .await
            .expect("fail a leftover");
            say(format!("done {id}"));
        }
        for i in 0u32.. {
            let update = base + i;
            let NewEvent {
                event:
                    Event::Queued {
                        model,
                        prompt,
                        origin,
                        preset,
                        remembered,
                        input,
                        images,
                    },
                ..
            } = queued(update)
            else {
                unreachable!("queued() makes a Queued event")
            };
            let Admitted::Queued { id, seq, .. } = core
                .accept(
                    NewRequest {
                        model,
                        prompt,
                        origin,
                        preset,
                        remembered,
                        input,
                        images,
                    },
                    &limits,
                )
                .await
                .expect("accept")
            else {
                continue;
            };
            say(format!("queued {seq} {id}"));
            core.checkpoint().expect("checkpoint");
            // `Started` and `Enhanced` are not waited for: a kill may lose
            // them (sled still had them in memory), and their seqs are then
            // given again — to events nobody was told of. So only seqs of
            // durable events are reported and must never come back.
            core.start(id).await.expect("start");
            let steps = [
                Command::FinishEnhancing {
                    prompt: "A FOX IN THE SNOW".into(),
                    fallback: None,
                },
                Command::FinishGenerating {
                    image: ImageRef {
                        file: format!("{id}.png"),
                        bytes: 1,
                        format: "png".into(),
                    },
                    attempts: 1,
                    statuses: vec!["200".into()],
                },
                Command::FinishSending {
                    message_id: Some(1),
                },
            ];
            for step in steps {
                let rec = core.execute(id, step).await.expect("step");
                if rec.event.must_be_durable() {
                    say(format!("seq {}", rec.seq));
                }
            }
            say(format!("done {id}"));
            core.store()
                .forget_requests(&[id], "retention/files", &update.to_be_bytes())
                .expect("forget");
            say(format!("removed {id}"));
        }
    });
}

/// Kills [`lifecycle_child`] at random moments; after each kill the core
/// opens from its checkpoint and log, and no request that finished (or was
/// removed) is live, every acknowledged request is either live or
/// finished, and every seq handed out is new.
fn lifecycle_parent() -> Result<String, String> {
    use easel::engine::{Core, SystemClock};
    let (rounds, mut rng) = rounds_and_seed("lifecycle crash test");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut seqs_seen = std::collections::BTreeSet::new();
    let mut finished: std::collections::HashSet<String> = Default::default();
    let (mut removed_total, mut live_seen) = (0usize, 0usize);
    for round in 0..rounds {
        let work = Duration::from_millis(20 + rng.next() % 200);
        let lines = run_and_kill(
            &dir.path().join("log"),
            "lifecycle",
            round * 10_000_000,
            work,
        )
        .map_err(|e| format!("round {round}: {e}"))?;
        let mut queued = Vec::new();
        for line in &lines {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("queued"), Some(seq), Some(id)) => {
                    queued.push(id.to_owned());
                    let seq: u64 = seq.parse().map_err(|e| format!("{e}: {line}"))?;
                    if !seqs_seen.insert(seq) {
                        return Err(format!("round {round}: seq {seq} was given twice"));
                    }
                }
                (Some("seq"), Some(seq), None) => {
                    let seq: u64 = seq.parse().map_err(|e| format!("{e}: {line}"))?;
                    if !seqs_seen.insert(seq) {
                        return Err(format!("round {round}: seq {seq} was given twice"));
                    }
                }
                (Some("done"), Some(id), None) => {
                    finished.insert(id.to_owned());
                }
                (Some("removed"), Some(id), None) => {
                    finished.insert(id.to_owned());
                    removed_total += 1;
                }
                _ => return Err(format!("round {round}: unexpected line {line:?}")),
            }
        }
        let store = SledStore::open(&dir.path().join("log"))
            .map_err(|e| format!("round {round}: reopen failed: {e}"))?;
        let (core, _) = Core::open_with(store, Arc::new(SystemClock), 1_000)
            .map_err(|e| format!("round {round}: the core did not open: {e}"))?;
        let live: Vec<String> = core.read(|s| s.requests().map(|r| r.id.to_string()).collect());
        live_seen += live.len();
        for id in &live {
            if finished.contains(id) {
                return Err(format!(
                    "round {round}: request {id} finished (and maybe left the log) but is live again"
                ));
            }
        }
        for id in &queued {
            let in_log = core
                .store()
                .events_of(id.parse().map(RequestId).map_err(|e| format!("{e}"))?)
                .map_err(|e| e.to_string())?;
            if !live.contains(id) && !finished.contains(id) && in_log.is_empty() {
                return Err(format!("round {round}: acknowledged request {id} is lost"));
            }
        }
        // Every seq still in the log was handed out once, and new ones
        // continue above all of them (and above those removed).
        let top = seqs_seen.last().copied().unwrap_or(0);
        if core.store().last_seq() < top {
            return Err(format!(
                "round {round}: the log restarts at seq {} though {top} was given",
                core.store().last_seq()
            ));
        }
        drop(core);
    }
    Ok(format!(
        "{rounds} kills, {} seqs all distinct, {removed_total} requests removed, none revived ({live_seen} live across restarts)",
        seqs_seen.len()
    ))
}
