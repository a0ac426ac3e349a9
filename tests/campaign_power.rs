//! Power-cut durability, shown from outside: the built `easel` binary runs
//! under `strace -f` against the FAKE Telegram, workers and LLM on
//! loopback, and for every "Queued for …" reply the trace must hold an
//! `fdatasync` that began after the user's message reached the bot and
//! returned before the reply left it. sled's own flush ends in
//! `sync_file_range`, which commits neither the file's size and allocation
//! metadata nor the device's cache; only `fdatasync`/`fsync` make an
//! acknowledgment survive a power cut (§1). sled's background `fsync`
//! every 500 ms does not count here: it is not what a waiter waits for.
//!
//! Skipped, saying so, only when `strace` cannot trace on this machine.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::FakeTelegram;

const TOKEN: &str = "515151:POWER-campaign-token-xyz";
const KEY: &str = "power-sdxl-key-123456";

/// One traced system call: when it began and when it returned.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    start: f64,
    end: f64,
    line: String,
}

/// Reads `strace -f -ttt -T` output, joining `<unfinished …>` halves.
fn parse(trace: &str) -> Vec<Call> {
    let mut open: HashMap<String, (String, f64, String)> = HashMap::new();
    let mut calls = Vec::new();
    for line in trace.lines() {
        // `<pid> <seconds> <call>`; strace pads a short pid with spaces.
        let Some((pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let duration = |s: &str| {
            s.rsplit_once('<')
                .and_then(|(_, d)| d.trim_end_matches('>').parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            let name = head.split('(').next().unwrap_or_default().to_owned();
            open.insert(pid.to_owned(), (name, ts, head.to_owned()));
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let name = tail.split(' ').next().unwrap_or_default().to_owned();
            if let Some((n, start, head)) = open.remove(pid) {
                calls.push(Call {
                    name: n,
                    start,
                    end: ts,
                    line: format!("{head}{tail}"),
                });
            } else {
                calls.push(Call {
                    name,
                    start: ts,
                    end: ts,
                    line: rest.to_owned(),
                });
            }
        } else if rest.contains('(') {
            let name = rest.split('(').next().unwrap_or_default().to_owned();
            calls.push(Call {
                name,
                start: ts,
                end: ts + duration(rest),
                line: rest.to_owned(),
            });
        }
    }
    calls
}

/// The number after `"message_id":` in `text`, from `from` on.
fn message_ids(text: &str) -> Vec<i64> {
    text.match_indices("\\\"message_id\\\":")
        .chain(text.match_indices("\"message_id\":"))
        .filter_map(|(i, m)| {
            let digits: String = text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// Waits (30 s at most) until `n` "Queued for …" replies went out.
async fn acknowledged(tg: &FakeTelegram, n: usize) -> bool {
    tg.wait_for(Duration::from_secs(30), |c| {
        c.iter()
            .filter(|c| {
                c.text
                    .as_deref()
                    .is_some_and(|t| t.starts_with("Queued for"))
            })
            .count()
            >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledgment_follows_an_fdatasync_that_covers_it() {
    let probe = Command::new("strace")
        .args(["-f", "-e", "trace=fdatasync", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        println!("SKIPPED: strace is not available or may not trace here");
        return;
    }
    let tg = FakeTelegram::start(TOKEN).await.unwrap();
    let flux = FakeWorker::flux(Duration::from_millis(20)).await.unwrap();
    let sdxl = FakeWorker::sdxl(KEY, Duration::from_millis(20))
        .await
        .unwrap();
    let llm = FakeLlm::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace_file = dir.path().join("trace.txt");
    let data = dir.path().join("data");
    let mut child = Command::new("strace")
        .args(["-f", "-ttt", "-T", "-s", "8192", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=fdatasync,fsync,sync_file_range,write,writev,sendto,sendmsg,read,recvfrom,readv",
        ])
        .arg(env!("CARGO_BIN_EXE_easel"))
        .arg("run")
        .current_dir(dir.path())
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", &tg.url)
        .env("FLUX_WORKER_URL", &flux.url)
        .env("SDXL_WORKER_URL", &sdxl.url)
        .env("SDXL_API_KEY", KEY)
        .env("LLM_API_URL", &llm.url)
        .env("EASEL_DATA_DIR", &data)
        .env("EASEL_RATE_LIMIT", "100/60")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace runs");
    // One at a time, then a burst of several in one batch.
    let mut sent = 0;
    for u in 0..4 {
        tg.user_sends(6000 + u, 6000 + u, &format!("/image=flux=single {u}"));
        sent += 1;
        assert!(acknowledged(&tg, sent).await, "no reply to request {u}");
    }
    for u in 10..18 {
        let model = if u % 2 == 0 { "flux" } else { "sdxl" };
        tg.user_sends(6000 + u, 6000 + u, &format!("/image={model}=burst {u}"));
        sent += 1;
    }
    assert!(
        acknowledged(&tg, sent).await,
        "not every burst request was answered"
    );
    // SIGTERM to easel (strace's child), then strace ends with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let _ = Command::new("pkill")
        .args([
            "-TERM",
            "-f",
            &format!("{} run", env!("CARGO_BIN_EXE_easel")),
        ])
        .status();
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    let trace = std::fs::read_to_string(&trace_file).unwrap();
    let calls = parse(&trace);
    let syncs: Vec<&Call> = calls.iter().filter(|c| c.name == "fdatasync").collect();
    assert!(!syncs.is_empty(), "no fdatasync at all");
    // When each user message first reached the bot (its getUpdates answer).
    let mut received: HashMap<i64, f64> = HashMap::new();
    for c in calls
        .iter()
        .filter(|c| matches!(c.name.as_str(), "read" | "recvfrom" | "readv"))
        .filter(|c| c.line.contains("/image="))
    {
        for id in message_ids(&c.line) {
            received.entry(id).or_insert(c.start);
        }
    }
    let mut checked = 0;
    for ack in calls
        .iter()
        .filter(|c| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg"))
        // The reply itself (a status edit later says "Queued for …" too).
        .filter(|c| c.line.contains("/SendMessage ") && c.line.contains("Queued for"))
    {
        // The reply names the message it answers (reply_parameters).
        let Some(&got) = message_ids(&ack.line)
            .iter()
            .find_map(|id| received.get(id))
        else {
            panic!("an acknowledgment answers no message seen: {}", ack.line);
        };
        let covered = syncs.iter().any(|s| s.start > got && s.end <= ack.start);
        assert!(
            covered,
            "acknowledged with no fdatasync between receiving the message ({got}) and the reply ({}): {}",
            ack.start, ack.line
        );
        checked += 1;
    }
    assert_eq!(
        checked, sent,
        "not every acknowledgment was found in the trace"
    );
    println!(
        "power: {checked} acknowledgments, each after an fdatasync that began after its message arrived; {} fdatasync calls in all",
        syncs.len()
    );
}
