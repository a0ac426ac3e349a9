//! `easel demo` is the README's first command: the built binary must run it
//! with no token and no network, and exit 0 with a verified log.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn easel_demo_runs_and_verifies_its_log() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .arg("demo")
        .env_remove("TELEGRAM_BOT_TOKEN")
        .env_remove("EASEL_DATA_DIR")
        .output()
        .expect("run easel demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    for needle in [
        "every transition legal; FIFO and one-at-a-time hold: OK",
        "Demo finished",
        "Queued for flux — position",
        "content filter rejected",
        "too fast",
        "Cancelled 1 queued request.",
        "max 1 at once",
        "operator dashboard: http://127.0.0.1:",
        "easel demo --hold",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // The fake token never shows.
    assert!(!stdout.contains("DEMO-fake-token"), "{stdout}");
}
