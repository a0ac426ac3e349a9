//! The built `easel` binary against the FAKE Telegram, workers and LLM on
//! loopback: the command wired to the fakes, and waiting for it, stopping
//! it, and running one-off commands (shared by the campaigns and the
//! PostgreSQL replica tests).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::FakeTelegram;

pub const TOKEN: &str = "424242:CRASH-campaign-token-xyz";
pub const KEY: &str = "crash-sdxl-key-123456";

/// `easel <args>` wired to the fakes, in `dir`, stdout and stderr nowhere.
pub fn bot_command(
    dir: &std::path::Path,
    tg: &FakeTelegram,
    flux: &FakeWorker,
    sdxl: &FakeWorker,
    llm: &FakeLlm,
    args: &[&str],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_easel"));
    command
        .args(args)
        .current_dir(dir)
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", &tg.url)
        .env("FLUX_WORKER_URL", &flux.url)
        .env("SDXL_WORKER_URL", &sdxl.url)
        .env("SDXL_API_KEY", KEY)
        .env("LLM_API_URL", &llm.url)
        .env("EASEL_DATA_DIR", dir)
        .env("EASEL_RATE_LIMIT", "100/60")
        .env("EASEL_RETRY_BASE_MS", "10")
        .env("EASEL_WORKER_TIMEOUT_SECS", "10")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Waits (20 s at most) until `/readyz` on `addr` answers 200.
pub async fn wait_ready(client: &reqwest::Client, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The FAKE Telegram, flux and sdxl workers (each answering after
/// `delay`) and LLM a campaign runs the binary against.
pub async fn fakes(delay: Duration) -> (FakeTelegram, FakeWorker, FakeWorker, FakeLlm) {
    (
        FakeTelegram::start(TOKEN).await.unwrap(),
        FakeWorker::flux(delay).await.unwrap(),
        FakeWorker::sdxl(KEY, delay).await.unwrap(),
        FakeLlm::start().await.unwrap(),
    )
}

/// Stops the binary as SIGTERM does and waits for it.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
}

/// `easel <args>` on `dir` (`--data-dir`), and what it printed.
pub fn cli(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A free loopback address (port 0 asked of the kernel, then let go).
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// A campaign's size from the environment (`EASEL_CAMPAIGN_*`), else `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
