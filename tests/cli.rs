//! The built `easel` binary: exit codes for bad configuration, and a clean
//! stop on SIGTERM while serving FAKE Telegram and workers on loopback.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use easel::demo::fake_services::FakeWorker;
use easel::demo::fake_telegram::FakeTelegram;

fn easel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_easel"));
    for var in [
        "TELEGRAM_BOT_TOKEN",
        "FLUX_WORKER_URL",
        "SDXL_WORKER_URL",
        "SDXL_API_KEY",
        "LLM_API_URL",
        "EASEL_CONFIG",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn run_without_a_token_exits_2_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel()
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TELEGRAM_BOT_TOKEN is not set"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_configuration_exits_2_naming_the_variable_not_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel()
        .arg("run")
        .current_dir(dir.path())
        .env("TELEGRAM_BOT_TOKEN", "123:supersecret-token-value")
        .env("FLUX_WORKER_URL", "ftp://example/flux")
        .env("SDXL_WORKER_URL", "http://127.0.0.1:9/x")
        .env("SDXL_API_KEY", "changeme")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FLUX_WORKER_URL must start with http:// or https://"),
        "{err}"
    );
    assert!(
        err.contains("SDXL_API_KEY is empty or a placeholder"),
        "{err}"
    );
    assert!(!err.contains("supersecret"), "{err}");
}

#[test]
fn a_bad_log_filter_or_no_model_stops_run_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel()
        .arg("run")
        .current_dir(dir.path())
        .env("TELEGRAM_BOT_TOKEN", "123:abcdefghij")
        .env("FLUX_WORKER_URL", "http://127.0.0.1:9/flux")
        .env("RUST_LOG", "easel=loud[")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RUST_LOG is not a valid log filter"), "{err}");

    let out = easel()
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .env("TELEGRAM_BOT_TOKEN", "123:abcdefghij")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No image model is configured"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn help_shows_an_example_for_each_command() {
    for sub in ["run", "demo", "webhook"] {
        let out = easel().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Example:"),
            "{sub}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_bot_cleanly_and_the_next_start_resumes() {
    let token = "555:SIGTERM-test-token-abcdef";
    let tg = FakeTelegram::start(token).await.unwrap();
    let flux = FakeWorker::flux(Duration::from_millis(10)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = || {
        easel()
            .arg("run")
            .current_dir(dir.path())
            .env("TELEGRAM_BOT_TOKEN", token)
            .env("TELEGRAM_API_URL", &tg.url)
            .env("FLUX_WORKER_URL", &flux.url)
            .env("EASEL_DATA_DIR", dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    tg.user_sends(1, 1, "/image=flux=a quiet harbour");
    assert!(
        tg.wait_for(Duration::from_secs(30), |c| c
            .iter()
            .any(|c| c.method == "sendPhoto"))
            .await
    );
    // A request that waits behind a slow one when the signal comes.
    tg.user_sends(2, 2, "/image=flux=a slow parade");
    tg.user_sends(3, 3, "/image=flux=a last lantern");
    assert!(
        tg.wait_for(Duration::from_secs(30), |_| flux
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
            .await
    );
    let started = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // The next start finishes what was left.
    let mut child = spawn();
    let all = tg
        .wait_for(Duration::from_secs(30), |c| {
            c.iter().filter(|c| c.method == "sendPhoto").count() >= 3
        })
        .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    assert!(
        all,
        "the requests waiting at the stop were not finished after the restart"
    );
}

/// A data dir whose log holds `n` queued flux requests (one user each) and
/// the start of the first; returns the folder.
async fn log_with(n: i64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // `open_core` puts the log in `log/` below the folder, as the data dir does.
    assert_eq!(
        easel::config::DataDir::new(dir.path()).log(),
        dir.path().join("log")
    );
    let core = common::open_core(dir.path(), common::clock());
    for user in 1..=n {
        core.accept(
            common::request("flux", user, &format!("a lantern {user}")),
            &easel::domain::Limits::default(),
        )
        .await
        .unwrap();
    }
    core.start_next(&common::model("flux")).await.unwrap();
    core.checkpoint().unwrap();
    drop(core);
    dir
}

#[tokio::test]
async fn replay_verify_of_a_tampered_export_names_the_first_problem_in_text_and_json() {
    let dir = log_with(2).await;
    let out = easel()
        .args(["export", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines.len(), 3, "{export}");
    // Untouched, it verifies.
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, &export).unwrap();
    let ok = easel()
        .args(["replay", "--verify", "--json", "--from"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["verify"]["ok"], true, "{report}");
    assert_eq!(report["events"], 3);
    assert_eq!(
        report["models"]["flux"]["queue"].as_array().unwrap().len(),
        1
    );
    assert_eq!(report["models"]["flux"]["in_flight"]["stage"], "enhancing");

    // Without the first Queued, its Started breaks a rule (seq 3); a line
    // that is not JSON is unreadable. Both count; the earlier is named.
    let tampered = format!("{}\n{}\nnot json at all\n", lines[1], lines[2]);
    std::fs::write(&file, tampered).unwrap();
    let bad = easel()
        .args(["replay", "--verify", "--json", "--from"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(report["verify"]["ok"], false, "{report}");
    assert_eq!(report["verify"]["problems"], 2, "{report}");
    assert_eq!(report["verify"]["first_violation"]["seq"], 3, "{report}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.starts_with("easel: verification failed: "), "{err}");
    assert_eq!(err.lines().count(), 1, "printed once: {err}");

    let text = easel()
        .args(["replay", "--verify", "--from"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(text.status.code(), Some(1));
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(shown.contains("verify: FAILED (2 problem(s))"), "{shown}");
}

#[tokio::test]
async fn a_reader_that_closes_the_pipe_early_is_not_an_error() {
    // More than a pipe's buffer (64 KiB) of export lines.
    let dir = log_with(400).await;
    let mut child = easel()
        .args(["export", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"queued\""), "{first}");
    // The reader is gone now (`easel export | head -1`).
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::io::stdout().flush();
}

/// Runs `easel <args>` against the FAKE Telegram (off the runtime's
/// threads: the fake answers on them); (exit code, stdout, stderr).
async fn webhook_cli(
    tg: &FakeTelegram,
    env: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let mut c = easel();
    c.args(args)
        .env("TELEGRAM_BOT_TOKEN", WEBHOOK_TOKEN)
        .env("TELEGRAM_API_URL", &tg.url)
        .env_remove("EASEL_WEBHOOK_URL")
        .env_remove("EASEL_WEBHOOK_SECRET")
        .current_dir(std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WEBHOOK_TOKEN: &str = "777:WEBHOOK-cli-token-abcdef";

/// §9 `easel webhook set|info|delete`: registers the URL with the secret
/// token for messages and button presses (Telegram then refuses long
/// polling), shows it (text and JSON), removes it; bad settings stop it
/// with a sentence naming the variable, never the secret; nothing prints
/// the token or the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_set_info_delete_register_once_and_print_no_secret() {
    let tg = FakeTelegram::start(WEBHOOK_TOKEN).await.unwrap();
    let secret = "s3cret_Token-for-the-hook";
    let env = [
        ("EASEL_WEBHOOK_URL", "https://bot.example.com/telegram"),
        ("EASEL_WEBHOOK_SECRET", secret),
    ];
    let (code, out, err) = webhook_cli(&tg, &env, &["webhook", "info"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("webhook: none"), "{out}");
    let (code, out, err) =
        webhook_cli(&tg, &env, &["webhook", "set", "--max-connections", "8"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("webhook: https://bot.example.com/telegram"),
        "{out}"
    );
    assert!(out.contains("max connections: 8"), "{out}");
    assert!(out.contains("updates: message, callback_query"), "{out}");
    let hook = tg.webhook().expect("registered");
    assert_eq!(hook.secret_token.as_deref(), Some(secret));
    assert_eq!(hook.max_connections, 8);
    assert_eq!(hook.allowed_updates, ["message", "callback_query"]);
    let (code, out, _) = webhook_cli(&tg, &env, &["webhook", "info", "--json"]).await;
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(info["url"], "https://bot.example.com/telegram");
    assert_eq!(info["pending_updates"], 0);
    let (code, out, err) =
        webhook_cli(&tg, &env, &["webhook", "delete", "--drop-pending-updates"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("webhook: none"), "{out}");
    assert_eq!(tg.webhook(), None);
    // Bad settings: exit 2, the variable named, the secret not echoed.
    for (env, names) in [
        (
            vec![("EASEL_WEBHOOK_SECRET", "no spaces allowed here")],
            "EASEL_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("EASEL_WEBHOOK_URL", "http://bot.example.com/telegram"),
                ("EASEL_WEBHOOK_SECRET", secret),
            ],
            "EASEL_WEBHOOK_URL must be the public https://",
        ),
        (
            vec![("EASEL_WEBHOOK_SECRET", secret)],
            "EASEL_WEBHOOK_URL is not set",
        ),
    ] {
        let (code, out, err) = webhook_cli(&tg, &env, &["webhook", "set"]).await;
        assert_eq!(code, 2, "{env:?}: {out}{err}");
        assert!(err.contains(names), "{err}");
        assert!(
            !err.contains("no spaces allowed") && !err.contains(secret),
            "{err}"
        );
        assert_eq!(tg.webhook(), None);
    }
    for call in tg.calls() {
        for text in [call.text.unwrap_or_default(), format!("{:?}", call.params)] {
            assert!(!text.contains(WEBHOOK_TOKEN), "{text}");
        }
    }
}

/// `easel run --webhook` without where to listen or the secret stops with
/// one sentence and exit 2, before anything starts.
#[test]
fn run_webhook_without_its_settings_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel()
        .args(["run", "--webhook"])
        .current_dir(dir.path())
        .env("TELEGRAM_BOT_TOKEN", "1:abc")
        .env("FLUX_WORKER_URL", "http://127.0.0.1:9/generate")
        .env("EASEL_DATA_DIR", dir.path())
        .env_remove("EASEL_WEBHOOK_LISTEN")
        .env_remove("EASEL_WEBHOOK_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`easel run --webhook` needs EASEL_WEBHOOK_LISTEN"),
        "{err}"
    );
}
