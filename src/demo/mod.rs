//! `easel demo`: the real bot against FAKE Telegram, workers and LLM started
//! in-process on loopback, with a handful of simulated users on both models
//! (one request fails at the content filter, one user hits the rate limit,
//! one cancels, one writes in Persian from a Telegram set to Persian and is
//! answered in Persian, one uses a prompt preset, one remembers a model with
//! `/model` and then names none, one asks for two variations and gets an
//! album). It prints each transition as it happens, what each user
//! saw, the audit table and the verification of the log.

pub mod fake_services;
pub mod fake_telegram;
pub mod png;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::app;
use crate::config::Settings;
use crate::domain::Event;
use crate::store::{EventStore, SledStore};
use fake_services::{FakeLlm, FakeWorker};
use fake_telegram::FakeTelegram;

const TOKEN: &str = "100200300:DEMO-fake-token-not-a-secret";
const SDXL_KEY: &str = "demo-sdxl-key-1234";

struct User {
    id: i64,
    name: &'static str,
}

const USERS: [User; 7] = [
    User {
        id: 501,
        name: "alice",
    },
    User {
        id: 502,
        name: "bob",
    },
    User {
        id: 503,
        name: "carol",
    },
    User {
        id: 504,
        name: "dave",
    },
    User {
        id: 505,
        name: "erin",
    },
    User {
        id: 506,
        name: "sara",
    },
    User {
        id: 507,
        name: "frank",
    },
];

fn name_of(id: i64) -> &'static str {
    USERS.iter().find(|u| u.id == id).map_or("?", |u| u.name)
}

/// What `easel demo --hold` waits for before stopping the bot (Ctrl-C).
pub type Hold = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the demo; true when everything happened as scripted and the log
/// verifies. The operator dashboard is served on a loopback port while it
/// runs (its address and token printed); with `hold`, the bot and the
/// dashboard keep running after the script until `hold` resolves.
///
/// # Errors
/// When a fake cannot start or the bot does not start.
pub async fn run(data_dir: Option<PathBuf>, hold: Option<Hold>) -> anyhow::Result<bool> {
    let started = tokio::time::Instant::now();
    let tg = FakeTelegram::start(TOKEN).await?;
    let flux = FakeWorker::flux(Duration::from_millis(400)).await?;
    let sdxl = FakeWorker::sdxl(SDXL_KEY, Duration::from_millis(400)).await?;
    let llm = FakeLlm::start().await?;
    let temp = tempfile::tempdir().context("creating a temporary data dir")?;
    let data_dir = data_dir.unwrap_or_else(|| temp.path().to_path_buf());
    println!(
        "easel demo: FAKE Telegram at {}, FAKE flux at {}, FAKE sdxl at {}, FAKE LLM at {}",
        tg.url, flux.url, sdxl.url, llm.url
    );
    println!("data dir: {}", data_dir.display());
    // The dashboard on a free loopback port, with a token of this run's.
    let dashboard_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port for the dashboard")?;
    let dashboard_token = uuid::Uuid::new_v4().simple().to_string();
    println!(
        "operator dashboard: http://{dashboard_addr}/  (token {dashboard_token}){}\n",
        if hold.is_some() {
            ""
        } else {
            " — open while the demo runs; `easel demo --hold` keeps it up"
        }
    );

    let env: HashMap<&str, String> = HashMap::from([
        ("TELEGRAM_BOT_TOKEN", TOKEN.to_owned()),
        ("TELEGRAM_API_URL", tg.url.clone()),
        ("FLUX_WORKER_URL", flux.url.clone()),
        ("SDXL_WORKER_URL", sdxl.url.clone()),
        ("SDXL_API_KEY", SDXL_KEY.to_owned()),
        ("LLM_API_URL", llm.url.clone()),
        ("EASEL_DATA_DIR", data_dir.display().to_string()),
        ("EASEL_RATE_LIMIT", "2/60".to_owned()),
        ("EASEL_MAX_PENDING_PER_USER", "3".to_owned()),
        ("EASEL_RETRY_BASE_MS", "20".to_owned()),
        ("EASEL_WORKER_TIMEOUT_SECS", "10".to_owned()),
        ("EASEL_METRICS_ADDR", dashboard_addr.to_string()),
        ("EASEL_DASHBOARD_TOKEN", dashboard_token.clone()),
    ]);
    // A prompt preset, as an operator would put it in easel.toml.
    let toml = "[presets.oil]\ntemplate = \"{prompt}, oil painting, thick brush strokes\"\n";
    let settings = Settings::from_sources(|k| env.get(k).cloned(), Some(toml))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let running = app::start(settings, stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let core = Arc::clone(&running.core);
    let app_task = tokio::spawn(running.wait());

    // Print every transition as it is appended.
    let printer = {
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            let mut rx = core.store().subscribe();
            let mut next = 1;
            let mut models = HashMap::new();
            loop {
                for rec in core.store().read_from(next).filter_map(Result::ok) {
                    next = rec.seq + 1;
                    match &rec.event {
                        Event::Queued { model, origin, .. } => {
                            models.insert(
                                rec.request_id,
                                (model.to_string(), name_of(origin.user_id.0)),
                            );
                        }
                        Event::ModelChosen { user_id, model } => {
                            models.insert(rec.request_id, (model.to_string(), name_of(user_id.0)));
                        }
                        _ => {}
                    }
                    let (model, user) = models.get(&rec.request_id).cloned().unwrap_or_default();
                    let detail = match &rec.event {
                        Event::Failed { kind, .. } => format!(" ({})", kind.as_str()),
                        Event::Generated { attempts, .. } => format!(" (attempts: {attempts})"),
                        _ => String::new(),
                    };
                    println!(
                        "[{:>5.2}s] #{:<3} {} {:<5} {:<5} {}{}",
                        started.elapsed().as_secs_f64(),
                        rec.seq,
                        // The short id users see in /queue and give /cancel.
                        rec.request_id.short(),
                        user,
                        model,
                        rec.event.name(),
                        detail
                    );
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    // The simulated users.
    let [alice, bob, carol, dave, erin, sara, frank] = [501, 502, 503, 504, 505, 506, 507];
    // Sara's Telegram is set to Persian: she is answered in Persian.
    tg.set_language(sara, "fa");
    tg.user_sends(alice, alice, "/image=flux=a red fox in the snow");
    // Bob uses the `oil` preset.
    tg.user_sends(bob, bob, "/image=sdxl=oil=a lighthouse at dawn");
    tg.user_sends(carol, carol, "/image=flux=something nsfw");
    tokio::time::sleep(Duration::from_millis(100)).await;
    tg.user_sends(erin, erin, "/image=flux=a slow sunset over the sea");
    for prompt in ["a cat astronaut", "a dog astronaut", "a fish astronaut"] {
        tg.user_sends(dave, dave, &format!("/image=sdxl={prompt}"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tg.wait_for(Duration::from_secs(10), |calls| {
        calls.iter().any(|c| {
            c.chat_id == Some(erin) && c.text.as_deref().is_some_and(|t| t.starts_with("Queued"))
        })
    })
    .await;
    tg.user_sends(erin, erin, "/cancel");
    tg.user_sends(alice, alice, "/queue");
    // Alice remembers sdxl, then names no model.
    tg.user_sends(alice, alice, "/model sdxl");
    tg.user_sends(alice, alice, "/image a paper boat on a puddle");
    tg.user_sends(
        sara,
        sara,
        "/image=sdxl=یک گربه‌ی نارنجی روی پشت‌بام، شب مهتابی",
    );
    tg.user_sends(sara, sara, "/queue");
    // Frank asks for two variations of one prompt: one album.
    tg.user_sends(frank, frank, "/image=flux*2=a paper lantern festival");

    // Wait until every accepted request is finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let (accepted, unfinished) = core.read(|s| (s.last_seq, s.requests().count()));
        if accepted > 0
            && unfinished == 0
            && tg
                .calls()
                .iter()
                .filter(|c| c.text.as_deref() == Some("Cancelled 1 queued request."))
                .count()
                == 1
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            println!("\nthe demo did not finish in time");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the status board show the final texts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if let Some(hold) = hold {
        println!(
            "\nThe demo's script is done; the bot and its dashboard (http://{dashboard_addr}/) keep running. Ctrl-C stops them."
        );
        hold.await;
    }
    stop.cancel();
    app_task.await.context("the bot task")??;
    printer.abort();
    drop(core);

    println!("\nWhat each user saw:");
    for user in &USERS {
        println!("  {}:", user.name);
        for call in tg.calls().iter().filter(|c| c.chat_id == Some(user.id)) {
            let shown = match call.method.as_str() {
                "sendMessage" => format!(
                    "message: {}",
                    call.text
                        .as_deref()
                        .unwrap_or_default()
                        .replace('\n', " / ")
                ),
                "editMessageText" => {
                    format!("  edited: {}", call.text.as_deref().unwrap_or_default())
                }
                "sendMediaGroup" => format!(
                    "album: {} images, caption: {}",
                    call.params
                        .get("media")
                        .and_then(serde_json::Value::as_array)
                        .map_or(0, Vec::len),
                    call.caption.as_deref().unwrap_or_default()
                ),
                "sendPhoto" | "sendDocument" => format!(
                    "{}: {} bytes, caption: {}",
                    if call.method == "sendPhoto" {
                        "photo"
                    } else {
                        "document"
                    },
                    call.file_len.unwrap_or(0),
                    call.caption.as_deref().unwrap_or_default()
                ),
                other => other.to_owned(),
            };
            // As the user sees it: the invisible direction isolates around
            // Latin words in Persian texts are left out (elide would show
            // them as escapes, as it does every format character).
            let shown = shown.replace(['\u{2068}', '\u{2069}'], "");
            println!("    {}", crate::ops::elide(&shown, 110));
        }
    }

    // The audit table and the verification, from the log on disk.
    let store = SledStore::open(&crate::config::DataDir::new(&data_dir).log())?;
    let records = crate::ops::records(store.read_from(1))?;
    println!(
        "\nAudit ({} requests):\n{}",
        records.len(),
        crate::ops::table(&records, 40)
    );
    let report = crate::ops::verify(store.read_from(1))?;
    if report.ok() {
        println!(
            "verify: {} events replayed; every transition legal; FIFO and one-at-a-time hold: OK",
            report.events
        );
    } else {
        for v in &report.violations {
            println!("verify: VIOLATION {v}");
        }
        for c in &report.corrupt {
            println!("verify: CORRUPT {c}");
        }
    }
    let status = |s: crate::domain::Stage| records.iter().filter(|r| r.status == s).count();
    let calls = tg.calls();
    let per_second = tg.max_calls_in_one_second();
    println!(
        "Telegram calls: {} (at most {per_second} in any second); worker calls: flux {} (max {} at once), sdxl {} (max {} at once)",
        calls.len(),
        flux.stats.calls.load(std::sync::atomic::Ordering::SeqCst),
        flux.stats
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        sdxl.stats.calls.load(std::sync::atomic::Ordering::SeqCst),
        sdxl.stats
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
    );
    let rate_limited = tg.texts_to(dave).iter().any(|t| t.contains("too fast"));
    // Sara's photo came with a Persian caption.
    let persian = tg.calls().iter().any(|c| {
        c.chat_id == Some(sara)
            && c.caption
                .as_deref()
                .is_some_and(|t| t.starts_with("🎨 \u{2068}sdxl\u{2069}\n"))
    }) && tg.texts_to(sara).iter().any(|t| t.starts_with("در صف"));
    // Bob's preset was applied before enhancement; Alice's second image
    // was drawn by her remembered model.
    let preset = records
        .iter()
        .any(|r| r.preset.as_ref().is_some_and(|p| p.name == "oil"));
    let remembered = records
        .iter()
        .any(|r| r.user_id.0 == alice && r.model.as_str() == "sdxl");
    let album = tg
        .calls()
        .iter()
        .any(|c| c.method == "sendMediaGroup" && c.chat_id == Some(frank));
    let expected = status(crate::domain::Stage::Done) == 7
        && album
        && preset
        && remembered
        && persian
        && status(crate::domain::Stage::Failed) == 1
        && status(crate::domain::Stage::Cancelled) == 1
        && rate_limited
        && report.ok();
    println!(
        "\n{} in {:.1} s: 7 done (one in Persian, one with a preset, one by a remembered model, one album of 2), 1 failed (content filter), 1 cancelled, 1 rate-limited.",
        if expected {
            "Demo finished"
        } else {
            "Demo did NOT go as scripted"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(expected)
}
