//! Load campaign: many users on two models with fast FAKE workers, the real
//! bot in-process against FAKE Telegram. Every request delivered exactly
//! once, FIFO per model as the workers saw it, Telegram's call rate inside
//! its limits; peak RSS and CPU of the process are printed.
//! Short by default; the full run of docs/reliability.md:
//! `EASEL_LOAD_REQUESTS=10000 EASEL_LOAD_USERS=1000 cargo test --release --test campaign_load -- --nocapture`

#[path = "bot/helpers.rs"]
mod helpers;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use easel::store::EventStore;
use helpers::spawn_app;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (peak RSS in MiB, CPU seconds) of this process.
fn usage() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_two_models_each_request_exactly_once_in_fifo() {
    let requests = env_num("EASEL_LOAD_REQUESTS", 60) as usize;
    let users = env_num("EASEL_LOAD_USERS", 20).max(1) as i64;
    let per_user = requests.div_ceil(users as usize) as u64;
    // No trace-level log capture here: it would be most of the RSS measured.
    helpers::CAPTURE.store(false, std::sync::atomic::Ordering::SeqCst);
    let pending = per_user.to_string();
    let rate = format!("{}/60", per_user.clamp(1, 256));
    let mut app = spawn_app(&[
        ("EASEL_MAX_PENDING_PER_USER", pending.as_str()),
        ("EASEL_RATE_LIMIT", rate.as_str()),
    ])
    .await;
    let started = Instant::now();
    let (_, cpu_before) = usage();
    for i in 0..requests {
        let user = 50_000 + (i as i64 % users);
        let model = if i % 2 == 0 { "flux" } else { "sdxl" };
        app.tg
            .user_sends(user, user, &format!("/image={model}=load test picture {i}"));
    }
    let deadline = Duration::from_secs(120 + requests as u64 / 5);
    let all = app
        .tg
        .wait_for(deadline, |calls| {
            calls.iter().filter(|c| c.method == "sendPhoto").count() >= requests
        })
        .await;
    let elapsed = started.elapsed();
    assert!(
        all,
        "only {} of {requests} delivered",
        app.tg
            .calls()
            .iter()
            .filter(|c| c.method == "sendPhoto")
            .count()
    );
    let (rss, cpu_after) = usage();

    let calls = app.tg.calls();
    // Exactly once: one photo per prompt.
    let mut photos: HashMap<String, usize> = HashMap::new();
    for c in calls.iter().filter(|c| c.method == "sendPhoto") {
        let n: String = c
            .caption
            .clone()
            .unwrap_or_default()
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        *photos.entry(n).or_default() += 1;
    }
    assert_eq!(photos.len(), requests);
    assert!(
        photos.values().all(|n| *n == 1),
        "a request was delivered twice"
    );
    // FIFO per model: the workers saw prompts in acceptance order.
    let accepted: Vec<(String, String)> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { model, prompt, .. } => {
                Some((model.to_string(), prompt.as_str().to_owned()))
            }
            _ => None,
        })
        .collect();
    for (model, worker) in [("flux", &app.flux), ("sdxl", &app.sdxl)] {
        let want: Vec<&String> = accepted
            .iter()
            .filter(|(m, _)| m == model)
            .map(|(_, p)| p)
            .collect();
        let seen = worker.stats.prompts.lock().unwrap().clone();
        let seen: Vec<String> = seen
            .iter()
            .map(|p| p.split(',').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(seen.len(), want.len());
        assert!(
            seen.iter().zip(&want).all(|(s, w)| s == *w),
            "{model} out of FIFO order"
        );
        assert_eq!(
            worker
                .stats
                .max_in_flight
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }
    // Telegram's limits: < 30 calls in any second, ≤ 1 edit per chat per second.
    let worst = app.tg.max_calls_in_one_second();
    assert!(worst < 30, "{worst} calls in one second");
    let mut last: HashMap<i64, tokio::time::Instant> = HashMap::new();
    for c in calls.iter().filter(|c| c.method == "editMessageText") {
        if let Some(prev) = last.insert(c.chat_id.unwrap(), c.at) {
            assert!(c.at.duration_since(prev) >= Duration::from_secs(1));
        }
    }
    let edits = calls
        .iter()
        .filter(|c| c.method == "editMessageText")
        .count();
    println!(
        "load: {requests} requests from {users} users on 2 models delivered exactly once in {:.1} s ({:.1}/s); \
         {} Telegram calls ({edits} edits), at most {worst} in any second; peak RSS {rss:.0} MiB; CPU {:.1} s",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        calls.len(),
        cpu_after - cpu_before
    );
    app.stop().await;
}
