//! spawn_app(): the real bot on a temporary data dir, wired to fakes.
#![allow(dead_code)]

#[path = "../common/panic_report.rs"]
mod panic_report;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use easel::app;
use easel::config::Settings;
use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::{Call, FakeTelegram};
use easel::engine::Core;
use easel::store::SledStore;

pub const TOKEN: &str = "123456:TEST-secret-token-abcdefghij";
pub const SDXL_KEY: &str = "sk-test-sdxl-key-0000";
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Running {
    pub core: Arc<Core<SledStore>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub struct TestApp {
    pub tg: FakeTelegram,
    pub flux: FakeWorker,
    pub sdxl: FakeWorker,
    pub llm: FakeLlm,
    pub dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
    /// The easel.toml the bot is started with, if any.
    pub toml: Option<String>,
    pub bot: Option<Running>,
}

pub async fn spawn_app(extra: &[(&str, &str)]) -> TestApp {
    spawn_app_with(extra, None).await
}

/// [`spawn_app`] with an easel.toml.
pub async fn spawn_app_with(extra: &[(&str, &str)], toml: Option<&str>) -> TestApp {
    panic_report::install();
    capture_logs();
    let tg = FakeTelegram::start(TOKEN).await.unwrap();
    let flux = FakeWorker::flux(Duration::from_millis(20)).await.unwrap();
    let sdxl = FakeWorker::sdxl(SDXL_KEY, Duration::from_millis(20))
        .await
        .unwrap();
    let llm = FakeLlm::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env: HashMap<String, String> = [
        ("TELEGRAM_BOT_TOKEN", TOKEN.to_owned()),
        ("TELEGRAM_API_URL", tg.url.clone()),
        ("FLUX_WORKER_URL", flux.url.clone()),
        ("SDXL_WORKER_URL", sdxl.url.clone()),
        ("SDXL_API_KEY", SDXL_KEY.to_owned()),
        ("LLM_API_URL", llm.url.clone()),
        ("EASEL_DATA_DIR", dir.path().display().to_string()),
        ("EASEL_RETRY_BASE_MS", "5".to_owned()),
        ("EASEL_WORKER_TIMEOUT_SECS", "5".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut app = TestApp {
        tg,
        flux,
        sdxl,
        llm,
        dir,
        env,
        toml: toml.map(str::to_owned),
        bot: None,
    };
    app.start().await;
    app
}

impl TestApp {
    pub fn core(&self) -> &Arc<Core<SledStore>> {
        &self.bot.as_ref().expect("the bot is running").core
    }

    pub async fn start(&mut self) {
        let env = self.env.clone();
        let settings = Settings::from_sources(|k| env.get(k).cloned(), self.toml.as_deref())
            .expect("test settings");
        let stop = tokio_util::sync::CancellationToken::new();
        let rx = stop.clone();
        let running = app::start(settings, rx).await.expect("the bot starts");
        let core = Arc::clone(&running.core);
        let task = tokio::spawn(async move {
            running.wait().await.expect("clean stop");
        });
        self.bot = Some(Running { core, stop, task });
    }

    /// Stops the bot as SIGTERM would and waits (bounded) for it.
    pub async fn stop(&mut self) {
        let Some(Running { core, stop, task }) = self.bot.take() else {
            return;
        };
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops within 10 s")
            .unwrap();
        drop(core);
        assert_no_secret_logged();
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    pub fn photo_calls(&self, chat: i64) -> Vec<Call> {
        self.tg
            .calls()
            .into_iter()
            .filter(|c| {
                (c.method == "sendPhoto" || c.method == "sendDocument") && c.chat_id == Some(chat)
            })
            .collect()
    }

    /// Waits for `n` images (photo or document) in `chat`.
    pub async fn images_to(&self, chat: i64, n: usize) -> bool {
        self.tg
            .wait_for(WAIT, |calls| {
                calls
                    .iter()
                    .filter(|c| {
                        (c.method == "sendPhoto" || c.method == "sendDocument")
                            && c.chat_id == Some(chat)
                    })
                    .count()
                    >= n
            })
            .await
    }

    /// Waits for a sendMessage to `chat` containing `needle`.
    pub async fn text_to(&self, chat: i64, needle: &str) -> bool {
        self.tg
            .wait_for(WAIT, |calls| {
                calls.iter().any(|c| {
                    c.method == "sendMessage"
                        && c.chat_id == Some(chat)
                        && c.text.as_deref().is_some_and(|t| t.contains(needle))
                })
            })
            .await
    }

    /// Waits (bounded) until `check` holds.
    pub async fn eventually(&self, check: impl Fn(&Self) -> bool) -> bool {
        let until = tokio::time::Instant::now() + WAIT;
        while !check(self) {
            if tokio::time::Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until some message in `chat` (as it reads now) ends with `suffix`.
    pub async fn any_message_ends_with(&self, chat: i64, suffix: &str) -> bool {
        self.eventually(|a| {
            a.tg.calls()
                .iter()
                .filter(|c| c.chat_id == Some(chat))
                .filter_map(|c| c.message_id)
                .any(|id| {
                    a.tg.message_text(chat, id)
                        .is_some_and(|t| t.ends_with(suffix))
                })
        })
        .await
    }

    /// Waits until the `nth` status message (sendMessage starting "Queued")
    /// in `chat` reads something ending with `suffix`.
    pub async fn status_ends_with(&self, chat: i64, nth: usize, suffix: &str) -> bool {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self
                .tg
                .calls()
                .into_iter()
                .filter(|c| c.method == "sendMessage" && c.chat_id == Some(chat))
                .filter(|c| c.text.as_deref().is_some_and(|t| t.contains("Queued for")))
                .nth(nth);
            if let Some(id) = status.and_then(|c| c.message_id)
                && self
                    .tg
                    .message_text(chat, id)
                    .is_some_and(|t| t.ends_with(suffix))
            {
                return true;
            }
            if tokio::time::Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The callback data of button `i` under a photo (0: Again, 1: Original).
/// A loopback URL where nothing listens: a worker that is down.
pub fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/generate")
}

impl TestApp {
    /// Waits (bounded) for a button notice starting with `start`.
    pub async fn notice_starting(&self, start: &str) -> bool {
        self.tg
            .wait_for(WAIT, |calls| {
                calls.iter().any(|c| {
                    c.method == "answerCallbackQuery"
                        && c.text.as_deref().is_some_and(|t| t.starts_with(start))
                })
            })
            .await
    }
}

pub fn button_data(photo: &Call, i: usize) -> String {
    photo
        .reply_markup
        .as_ref()
        .and_then(|m| m["inline_keyboard"][0][i]["callback_data"].as_str())
        .expect("the photo has that button")
        .to_owned()
}

/// Every log line of this test binary (all levels, all crates), so tests
/// can check that no secret is ever logged.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(
        &LOGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned()
}

/// Panics, showing the place, when the token or a worker key is in any
/// captured log line (of this test or any that ran beside or before it).
pub fn assert_no_secret_logged() {
    let logs = captured_logs();
    for secret in [
        TOKEN,
        SDXL_KEY,
        TOKEN.split_once(':').map_or(TOKEN, |(_, s)| s),
    ] {
        if let Some(at) = logs.find(secret) {
            let from = logs.floor_char_boundary(at.saturating_sub(300));
            let to = logs.ceil_char_boundary((at + 100).min(logs.len()));
            panic!("{secret:?} logged: …{}…", &logs[from..to]);
        }
    }
}

static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `spawn_app` installs the log capture (the load campaign turns
/// it off: trace-level logs of every HTTP call would dominate its RSS).
pub static CAPTURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Installs the capturing subscriber once (trace level, every crate).
pub fn capture_logs() {
    if !CAPTURE.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Everything at TRACE, under the same rule as `easel run` (see
        // `easel::telemetry`: without it, sled's deferred TRACE line could
        // abort this whole binary when a thread exits).
        let filter = easel::telemetry::log_filter("trace").expect("a valid filter");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}
