//! Crash campaign: the built `easel` binary against FAKE Telegram, workers
//! and LLM on loopback, a mixed two-model workload from many users, and
//! `kill -9` at random moments (seeded; the seed is printed). After the
//! last restart: every acknowledged request reached a terminal state,
//! `easel replay --verify` passes over the whole history, no worker ever
//! saw two calls of one model at once, every request ended done (nothing in
//! the workload can fail), no image was generated again after its photo
//! went out (at most one image per generation), and duplicate generations
//! (a kill in Generating) and duplicate photos (a kill in Sending) are
//! counted and bounded.
//!
//! Short by default; the full campaign of docs/reliability.md:
//! `EASEL_CAMPAIGN_KILLS=100 EASEL_CAMPAIGN_USERS=150 cargo test --release --test campaign_crash -- --nocapture`
//! (`EASEL_CAMPAIGN_SEED=<n>` replays a run).

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::FakeTelegram;
use serde_json::Value;

#[path = "common/binary.rs"]
mod binary;
use binary::{KEY, TOKEN, bot_command, cli, env_num, fakes, free_addr, terminate, wait_ready};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn spawn(
    dir: &std::path::Path,
    tg: &FakeTelegram,
    flux: &FakeWorker,
    sdxl: &FakeWorker,
    llm: &FakeLlm,
) -> Child {
    spawn_with(dir, tg, flux, sdxl, llm, &[], Stdio::null())
}

/// [`spawn`] with more variables (which win) and stderr going to `stderr`.
fn spawn_with(
    dir: &std::path::Path,
    tg: &FakeTelegram,
    flux: &FakeWorker,
    sdxl: &FakeWorker,
    llm: &FakeLlm,
    extra: &[(&str, &str)],
    stderr: Stdio,
) -> Child {
    let mut command = bot_command(dir, tg, flux, sdxl, llm, &["run"]);
    command.stderr(stderr);
    for (k, v) in extra {
        command.env(k, v);
    }
    command.spawn().expect("start easel")
}

/// [`spawn`] with `/metrics`, `/healthz` and `/readyz` on a free address;
/// the process and that address.
fn spawn_watched(
    dir: &std::path::Path,
    tg: &FakeTelegram,
    flux: &FakeWorker,
    sdxl: &FakeWorker,
    llm: &FakeLlm,
) -> (Child, String) {
    let addr = free_addr();
    let child = spawn_with(
        dir,
        tg,
        flux,
        sdxl,
        llm,
        &[("EASEL_METRICS_ADDR", &addr)],
        Stdio::null(),
    );
    (child, addr)
}

/// Registers a webhook with the FAKE Telegram, as `easel webhook set` does.
async fn register_webhook(tg: &FakeTelegram, secret: &str) {
    let set = reqwest::Client::new()
        .post(format!("{}/bot{TOKEN}/setWebhook", tg.url))
        .json(
            &serde_json::json!({"url": "https://bot.example.com/telegram", "secret_token": secret}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_request() {
    let kills = env_num("EASEL_CAMPAIGN_KILLS", 4);
    let users = env_num("EASEL_CAMPAIGN_USERS", 24) as i64;
    let seed = env_num(
        "EASEL_CAMPAIGN_SEED",
        u64::from(std::process::id()) * 7919 + 17,
    ) | 1;
    println!("crash campaign: {kills} kills, {users} users, EASEL_CAMPAIGN_SEED={seed}");
    let mut rng = Rng(seed);
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();

    // Users send their two requests (flux, then sdxl) spread over the kills.
    let total_messages = (users * 2) as usize;
    let mut sent = 0usize;
    let mut child = spawn(dir.path(), &tg, &flux, &sdxl, &llm);
    for k in 0..kills {
        let batch = total_messages
            .saturating_sub(sent)
            .min((total_messages / kills.max(1) as usize).max(1) + 1);
        for _ in 0..batch {
            send_message(&tg, sent);
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.next() % 900)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if k % 10 == 9 {
            println!(
                "  {} kills so far, {:.0} s",
                k + 1,
                started.elapsed().as_secs_f64()
            );
        }
        child = spawn(dir.path(), &tg, &flux, &sdxl, &llm);
    }
    while sent < total_messages {
        send_message(&tg, sent);
        sent += 1;
    }

    // Let the last run finish everything, then stop it cleanly.
    let deadline = Instant::now() + Duration::from_secs(60 + 2 * users as u64);
    let mut finished = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = dir.path().to_path_buf();
        let (code, out) = tokio::task::spawn_blocking(move || cli(&d, &["replay", "--json"]))
            .await
            .unwrap();
        if code != 0 {
            continue;
        }
        let state: Value =
            serde_json::from_str(out.lines().next().unwrap_or("{}")).unwrap_or(Value::Null);
        let busy = state["models"].as_object().is_some_and(|m| {
            m.values().any(|l| {
                !l["in_flight"].is_null() || l["queue"].as_array().is_some_and(|q| !q.is_empty())
            })
        });
        // Nothing queued or in flight, and every update handled.
        let some_events = state["events"].as_u64().unwrap_or(0) > 0;
        if !busy && some_events && tg.pending_updates() == 0 {
            finished = true;
            break;
        }
    }
    terminate(&mut child);
    assert!(finished, "the last run did not finish the work in time");

    // 1. The whole history verifies.
    let (code, out) = cli(dir.path(), &["replay", "--verify"]);
    assert_eq!(code, 0, "{out}");
    // 2. Every acknowledged request is in the log and finished.
    let (code, out) = cli(
        dir.path(),
        &["audit", "list", "--json", "--limit", "100000"],
    );
    assert_eq!(code, 0);
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut by_user_model: HashMap<(i64, String), Vec<&Value>> = HashMap::new();
    for r in &records {
        by_user_model
            .entry((
                r["user_id"].as_i64().unwrap(),
                r["model"].as_str().unwrap().to_owned(),
            ))
            .or_default()
            .push(r);
        // Nothing in this workload can fail or be cancelled: a kill must
        // never turn a request into a failure.
        assert_eq!(r["status"], "done", "not done: {r}");
    }
    let acknowledged = queued_replies(&tg);
    for (chat, model) in &acknowledged {
        assert!(
            by_user_model.contains_key(&(*chat, model.clone())),
            "acknowledged {model} request of {chat} is missing"
        );
    }
    // 3. One at a time per model, as the workers saw it.
    assert_eq!(flux.stats.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(sdxl.stats.max_in_flight.load(Ordering::SeqCst), 1);
    // 4. Duplicates only from Sending at a kill: at most one per model per kill.
    let mut photos: HashMap<(i64, String), usize> = HashMap::new();
    for c in tg.calls().iter().filter(|c| c.method == "sendPhoto") {
        *photos
            .entry((c.chat_id.unwrap(), c.caption.clone().unwrap_or_default()))
            .or_default() += 1;
    }
    let duplicates: usize = photos.values().map(|n| n - 1).sum();
    // 5. At most one image per generation: a request regenerated only when
    // a kill fell before its `Generated` was durable, so never after its
    // photo went out (the worker's prompt is the caption's second line:
    // the first names the model).
    let mut first_photo: HashMap<String, tokio::time::Instant> = HashMap::new();
    for c in tg.calls().iter().filter(|c| c.method == "sendPhoto") {
        let caption = c.caption.clone().unwrap_or_default();
        let prompt = caption
            .split_once('\n')
            .map_or(caption.as_str(), |(_, p)| p);
        first_photo.entry(prompt.to_owned()).or_insert(c.at);
    }
    let mut generations: HashMap<String, usize> = HashMap::new();
    let mut after_photo = Vec::new();
    for worker in [&flux, &sdxl] {
        for (prompt, at) in worker.stats.calls_at.lock().unwrap().iter() {
            *generations.entry(prompt.clone()).or_default() += 1;
            if first_photo.get(prompt).is_some_and(|sent| sent < at) {
                after_photo.push(prompt.clone());
            }
        }
    }
    let regenerated: usize = generations.values().map(|n| n - 1).sum();
    let done = records.iter().filter(|r| r["status"] == "done").count();
    println!(
        "crash campaign: {kills} kills in {:.0} s; {} requests ({} acknowledged, {done} done); {regenerated} duplicate generations (kills in Generating), {} after a photo; {duplicates} duplicate photos; verify OK; max 1 worker call per model at once",
        started.elapsed().as_secs_f64(),
        records.len(),
        acknowledged.len(),
        after_photo.len()
    );
    assert!(
        after_photo.is_empty(),
        "generated again after its photo was sent: {after_photo:?}"
    );
    assert!(
        regenerated as u64 <= 2 * kills,
        "{regenerated} duplicate generations for {kills} kills"
    );
    assert!(
        duplicates as u64 <= 2 * kills,
        "{duplicates} duplicates for {kills} kills"
    );
}

/// Message number `n` of the workload: user 1000 + n/2 asks flux for even
/// n and sdxl for odd n.
fn send_message(tg: &FakeTelegram, n: usize) {
    let user = 1000 + (n as i64 / 2);
    let model = if n.is_multiple_of(2) { "flux" } else { "sdxl" };
    tg.user_sends(
        user,
        user,
        &format!("/image={model}=scene {n} for user {user}"),
    );
}

/// (chat, model) of every "Queued for <model>" reply the users saw.
fn queued_replies(tg: &FakeTelegram) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = tg
        .calls()
        .iter()
        .filter(|c| c.method == "sendMessage")
        .filter_map(|c| {
            let text = c.text.as_deref()?;
            let model = text
                .strip_prefix("Queued for ")?
                .split(' ')
                .next()?
                .to_owned();
            Some((c.chat_id?, model))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// §8 Variations under `kill -9`: the built binary is killed while image 2
/// of 3 is being made; after the restart the album is completed from the
/// first missing image (image 1 is not made again), arrives whole, and the
/// history verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_album_resumes_at_the_first_missing_image() {
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    // The worker's second call (image 2) waits: the kill comes then.
    flux.stats.hold_calls.lock().unwrap().push(2);
    let mut child = spawn(dir.path(), &tg, &flux, &sdxl, &llm);
    let user = 7001;
    tg.user_sends(user, user, "/image=flux*3=paper boats on a pond");
    assert!(
        tg.wait_for(Duration::from_secs(20), |_| flux
            .stats
            .calls
            .load(Ordering::SeqCst)
            == 2
            && flux.stats.in_flight.load(Ordering::SeqCst) == 1)
            .await,
        "image 2 never started"
    );
    child.kill().unwrap(); // SIGKILL, image 1 kept and recorded
    child.wait().unwrap();
    let mut child = spawn(dir.path(), &tg, &flux, &sdxl, &llm);
    assert!(
        tg.wait_for(Duration::from_secs(30), |c| c
            .iter()
            .any(|c| c.method == "sendMediaGroup" && c.chat_id == Some(user)))
            .await,
        "no album after the restart"
    );
    terminate(&mut child);
    let album = tg
        .calls()
        .into_iter()
        .find(|c| c.method == "sendMediaGroup")
        .unwrap();
    assert_eq!(album.params["media"].as_array().map(Vec::len), Some(3));
    // Image 1 once, image 2 twice (the kill cut its call), image 3 once.
    assert_eq!(flux.stats.calls.load(Ordering::SeqCst), 4);
    let (code, out) = cli(dir.path(), &["export"]);
    assert_eq!(code, 0, "{out}");
    let indices: Vec<u64> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "variation")
        .filter_map(|e| e["index"].as_u64())
        .collect();
    assert_eq!(indices, [1, 2, 3]);
    let (code, out) = cli(dir.path(), &["replay", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// §7 `EASEL_LOG_FORMAT=json`: the built binary writes one JSON object per
/// line on stderr; the lines about a request carry its `request_id` (and
/// `model`) in their spans; no secret is in any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_and_no_secret() {
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.jsonl");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = spawn_with(
        dir.path(),
        &tg,
        &flux,
        &sdxl,
        &llm,
        &[("EASEL_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
        Stdio::from(file),
    );
    let user = 7101;
    tg.user_sends(user, user, "/image=sdxl=a fox in json");
    assert!(
        tg.wait_for(Duration::from_secs(20), |c| c
            .iter()
            .any(|c| c.method == "sendPhoto" && c.chat_id == Some(user)))
            .await
    );
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [TOKEN, KEY, TOKEN.split_once(':').unwrap().1] {
        assert!(!text.contains(secret), "a secret in the logs");
    }
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{text}");
    let (code, out) = cli(dir.path(), &["export"]);
    assert_eq!(code, 0, "{out}");
    let id = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["type"] == "queued")
        .and_then(|e| e["request_id"].as_str().map(str::to_owned))
        .unwrap();
    // The "queued" line of intake and the lines of the runner's steps.
    let about: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["request_id"] == id.as_str()))
        })
        .collect();
    assert!(
        about.iter().any(|l| l["fields"]["message"] == "queued"),
        "{text}"
    );
    assert!(
        about.iter().any(|l| l["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "step" && s["model"] == "sdxl")),
        "{text}"
    );
}

/// §7 `/healthz` and `/readyz` on `EASEL_METRICS_ADDR`, on the built
/// binary: 200 while it runs, ready once the engine runs and Telegram
/// answered. (How Telegram's reachability moves readiness is tested on
/// the client itself, under paused time: `tests/bot`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_on_the_metrics_address() {
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_watched(dir.path(), &tg, &flux, &sdxl, &llm);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = (None, None);
    while Instant::now() < deadline {
        let get = |path: &str| {
            client
                .get(format!("http://{addr}{path}"))
                .timeout(Duration::from_secs(2))
                .send()
        };
        if let (Ok(h), Ok(r)) = (get("/healthz").await, get("/readyz").await) {
            let h = (h.status().as_u16(), h.text().await.unwrap_or_default());
            let r = (r.status().as_u16(), r.text().await.unwrap_or_default());
            seen = (Some(h.clone()), Some(r.clone()));
            if r.0 == 200 {
                break;
            }
            // Not ready yet: it says why, one line.
            assert_eq!(r.0, 503, "{r:?}");
            assert!(
                r.1.starts_with("not ready: ") && r.1.ends_with('\n'),
                "{r:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.0, Some((200, "ok\n".to_owned())));
    assert_eq!(seen.1, Some((200, "ready\n".to_owned())));
    let (code, _) = {
        let r = client
            .get(format!("http://{addr}/nothing"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(code, 404);
    terminate(&mut child);
}

/// A loopback `host:port` nothing listens on (yet).
/// The value of the sample of `family` whose labels include `labels`: a
/// counter's or gauge's value, a histogram's count; None when absent.
fn sample(
    scraped: &openmetrics_parser::MetricsExposition<
        openmetrics_parser::OpenMetricsType,
        openmetrics_parser::OpenMetricsValue,
    >,
    family: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use openmetrics_parser::OpenMetricsValue as V;
    let family = scraped.families.get(family)?;
    family.iter_samples().find_map(|s| {
        let set = s.get_labelset().ok()?;
        let matches = labels
            .iter()
            .all(|(k, v)| set.iter().any(|(name, value)| name == k && value == v));
        if !matches {
            return None;
        }
        match &s.value {
            V::Counter(c) => Some(c.value.as_f64()),
            V::Gauge(n) | V::Unknown(n) => Some(n.as_f64()),
            #[allow(clippy::cast_precision_loss)]
            V::Histogram(h) => h.count.map(|c| c as f64),
            _ => None,
        }
    })
}

/// §7 `GET /metrics` on the built binary after a few requests, one of
/// them failing (the content filter): the text parses as the OpenMetrics
/// exposition format (a parser crate, not a regex), and the counters and
/// histograms moved as the requests went — accepted and finished by model
/// and outcome, the failure by reason, stage durations, worker attempts by
/// status class, Telegram calls by method, log appends and flushes — with
/// no user id, prompt or secret anywhere in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_requests_and_parse_as_openmetrics() {
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_watched(dir.path(), &tg, &flux, &sdxl, &llm);
    let client = reqwest::Client::new();
    let scrape = || async {
        let r = client
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        r.text().await.ok()
    };
    // Ready: the engine runs and Telegram answered.
    wait_ready(&client, &addr).await;
    tg.user_sends(7301, 7301, "/image=flux=a secret-free cat");
    tg.user_sends(7302, 7302, "/image=sdxl=a quiet harbour");
    tg.user_sends(7303, 7303, "/image=flux=something nsfw");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (text, scraped) = loop {
        if let Some(text) = scrape().await {
            let scraped = openmetrics_parser::openmetrics::parse_openmetrics(&text)
                .unwrap_or_else(|e| panic!("not OpenMetrics ({e:?}):\n{text}"));
            let finished = |model, outcome| {
                sample(
                    &scraped,
                    "easel_requests_finished",
                    &[("model", model), ("outcome", outcome)],
                )
            };
            if finished("flux", "done") == Some(1.0)
                && finished("sdxl", "done") == Some(1.0)
                && finished("flux", "failed") == Some(1.0)
            {
                break (text, scraped);
            }
        }
        assert!(Instant::now() < deadline, "{:?}", scrape().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    terminate(&mut child);
    let get = |family, labels: &[(&str, &str)]| sample(&scraped, family, labels);
    assert_eq!(
        get("easel_requests_accepted", &[("model", "flux")]),
        Some(2.0)
    );
    assert_eq!(
        get("easel_requests_accepted", &[("model", "sdxl")]),
        Some(1.0)
    );
    assert_eq!(
        get(
            "easel_requests_failed",
            &[("model", "flux"), ("reason", "rejected")]
        ),
        Some(1.0)
    );
    for (model, done) in [("flux", 1.0), ("sdxl", 1.0)] {
        for stage in ["queue_wait", "enhancing", "generating", "sending"] {
            let n = get(
                "easel_stage_duration_seconds",
                &[("model", model), ("stage", stage)],
            )
            .unwrap_or(0.0);
            // The failed flux request waited, was enhanced and generated
            // (its failure ends Generating without a duration).
            let want = if model == "flux" && matches!(stage, "queue_wait" | "enhancing") {
                2.0
            } else {
                done
            };
            assert_eq!(n, want, "{model} {stage}\n{text}");
        }
    }
    assert_eq!(
        get(
            "easel_worker_attempts",
            &[("model", "flux"), ("status", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "easel_worker_attempts",
            &[("model", "flux"), ("status", "4xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "easel_worker_attempts",
            &[("model", "sdxl"), ("status", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(get("easel_llm_calls", &[("outcome", "ok")]), Some(3.0));
    assert!(
        get(
            "easel_telegram_calls",
            &[("method", "sendPhoto"), ("result", "ok")]
        ) >= Some(2.0),
        "{text}"
    );
    assert!(
        get(
            "easel_telegram_calls",
            &[("method", "getUpdates"), ("result", "ok")]
        ) >= Some(1.0),
        "{text}"
    );
    // 3 queued, 2 × (started, enhanced, generated, delivered), 1 × (started,
    // enhanced, failed).
    assert_eq!(get("easel_log_events_appended", &[]), Some(14.0), "{text}");
    assert!(get("easel_log_flush_duration_seconds", &[]) >= Some(1.0));
    assert!(get("easel_log_flush_batch_events", &[]) >= Some(1.0));
    for model in ["flux", "sdxl"] {
        assert_eq!(get("easel_queue_depth", &[("model", model)]), Some(0.0));
        assert_eq!(
            get("easel_requests_in_flight", &[("model", model)]),
            Some(0.0)
        );
    }
    assert_eq!(get("easel_engine_starts", &[]), Some(1.0));
    // Bounded labels only: no user id, prompt, token or key.
    for leak in ["7301", "secret-free", "harbour", TOKEN, KEY] {
        assert!(!text.contains(leak), "{leak} in the metrics:\n{text}");
    }
}

/// §9 with a webhook registered Telegram refuses long polling (409): the
/// bot says what to do and `/readyz` is not ready for that reason, rather
/// than looking healthy while no update can come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_while_a_webhook_is_registered_is_not_ready_and_says_why() {
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    register_webhook(&tg, "abc").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_watched(dir.path(), &tg, &flux, &sdxl, &llm);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let said = loop {
        if let Ok(r) = client.get(format!("http://{addr}/readyz")).send().await {
            let (code, body) = (r.status().as_u16(), r.text().await.unwrap_or_default());
            if body.contains("webhook is registered") {
                assert_eq!(code, 503);
                break body;
            }
        }
        assert!(Instant::now() < deadline, "readiness never said why");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(said.contains("easel webhook delete"), "{said}");
    terminate(&mut child);
}

/// §9 `easel run --webhook` on the built binary: updates come as POSTs to
/// `/telegram` on `EASEL_WEBHOOK_LISTEN` (no long polling: the fake, like
/// Telegram, refuses `getUpdates` while a webhook is set); a POST without
/// the secret token or with a wrong one is `401` and records nothing, a
/// body that is not an update `400`; the right one is `200` once handled,
/// and the image comes; the same update delivered again makes no second
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_takes_updates_with_the_right_secret_only_and_once() {
    const SECRET: &str = "hook-secret_42";
    let (tg, flux, sdxl, llm) = fakes(Duration::from_millis(10)).await;
    let client = reqwest::Client::new();
    register_webhook(&tg, SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let (hook, health) = (free_addr(), free_addr());
    let mut command = bot_command(dir.path(), &tg, &flux, &sdxl, &llm, &["run", "--webhook"]);
    command
        .env("EASEL_WEBHOOK_LISTEN", &hook)
        .env("EASEL_WEBHOOK_SECRET", SECRET)
        .env("EASEL_METRICS_ADDR", &health);
    let mut child = command.spawn().unwrap();
    wait_ready(&client, &health).await;
    let user = 7401;
    tg.user_sends(user, user, "/image=flux=a fox by webhook");
    let updates = tg.take_updates();
    assert_eq!(updates.len(), 1);
    let post = |secret: Option<&str>, body: String| {
        let mut r = client
            .post(format!("http://{hook}/telegram"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = secret {
            r = r.header("X-Telegram-Bot-Api-Secret-Token", s);
        }
        r.send()
    };
    let update = updates[0].to_string();
    for wrong in [None, Some("hook-secret_43"), Some("")] {
        let r = post(wrong, update.clone()).await.unwrap();
        assert_eq!(r.status(), 401, "{wrong:?}");
    }
    assert_eq!(
        post(Some(SECRET), "{\"not\": \"an update\"}".into())
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(Some(SECRET), update.clone()).await.unwrap().status(),
        200
    );
    assert!(
        tg.wait_for(Duration::from_secs(20), |c| c
            .iter()
            .any(|c| c.method == "sendPhoto" && c.chat_id == Some(user)))
            .await
    );
    // Telegram redelivers (say our 200 was lost): one request still.
    assert_eq!(post(Some(SECRET), update).await.unwrap().status(), 200);
    terminate(&mut child);
    let (code, out) = cli(dir.path(), &["export"]);
    assert_eq!(code, 0, "{out}");
    let queued = out
        .lines()
        .filter(|l| l.contains("\"type\":\"queued\""))
        .count();
    assert_eq!(queued, 1, "{out}");
    let photos = tg
        .calls()
        .iter()
        .filter(|c| c.method == "sendPhoto" && c.chat_id == Some(user))
        .count();
    assert_eq!(photos, 1);
}
