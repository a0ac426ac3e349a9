//! Disk-full campaign: the built `easel` binary whose data dir runs out of
//! space while it serves (FAKE Telegram, workers and LLM on loopback). The
//! event log's own appends start failing mid-run. Checked: the bot does not
//! panic or exit, every user gets a clear reply, no acknowledged request is
//! lost, and once space is back the bot serves again by itself and
//! `easel replay --verify` passes over the whole history.
//!
//! In `cargo test` the full disk is a file-size limit (`ulimit -f`, which
//! needs no privileges): writes past it fail with EFBIG, as ENOSPC would.
//! The real thing, on a small tmpfs (needs root for the mount):
//! `mount -t tmpfs -o size=16m tmpfs /tmp/full && EASEL_FULL_DISK_DIR=/tmp/full cargo test --test campaign_disk_full -- --nocapture`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use easel::demo::fake_services::{FakeLlm, FakeWorker};
use easel::demo::fake_telegram::FakeTelegram;
use serde_json::Value;

const TOKEN: &str = "424242:DISK-full-campaign-token";
const KEY: &str = "disk-full-sdxl-key-123456";
const BUSY: &str = "Sorry, I couldn't take that request right now. Please try again in a minute.";

struct Fakes {
    tg: FakeTelegram,
    flux: FakeWorker,
    sdxl: FakeWorker,
    llm: FakeLlm,
    /// Where the bot serves `/readyz` (§7), the same for every start.
    health: String,
}

/// The operator's chat (`EASEL_OPERATOR_CHAT_ID`).
const OPERATOR: i64 = 990_001;

/// `/readyz` as (status, body); None while nothing listens.
async fn readyz(f: &Fakes) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://{}/readyz", f.health))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
}

/// How the disk fills: a real small file system with a ballast file, or a
/// per-file size limit on the bot process.
enum Disk {
    Mounted { ballast: PathBuf },
    SizeLimit,
}

/// The bot process; killed if a failed assertion leaves it running.
struct Bot(Child);

impl Bot {
    fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// SIGTERM, then its exit status within 15 s.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "easel did not stop within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lifts the file-size limit of the running bot (the operator freeing
    /// space): raising a soft limit up to the hard one needs no privileges.
    fn lift_size_limit(&self) {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        let pid = libc::pid_t::try_from(self.0.id()).unwrap();
        // SAFETY: plain syscall on a child we own; both pointers are valid
        // for the call (the old limit is not asked for).
        let rc =
            unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &unlimited, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(dir: &Path, f: &Fakes, limit_kib: Option<u64>) -> Bot {
    let bin = env!("CARGO_BIN_EXE_easel");
    let mut cmd = match limit_kib {
        // SIGXFSZ ignored survives exec, so a write past the limit fails
        // with EFBIG instead of killing the process.
        Some(kib) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("trap '' XFSZ; ulimit -S -f {kib}; exec \"$0\" run"))
                .arg(bin);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.arg("run");
            c
        }
    };
    cmd.current_dir(dir)
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", &f.tg.url)
        .env("FLUX_WORKER_URL", &f.flux.url)
        .env("SDXL_WORKER_URL", &f.sdxl.url)
        .env("SDXL_API_KEY", KEY)
        .env("LLM_API_URL", &f.llm.url)
        .env("EASEL_DATA_DIR", dir)
        .env("EASEL_RETRY_BASE_MS", "10")
        .env("EASEL_METRICS_ADDR", &f.health)
        .env("EASEL_OPERATOR_CHAT_ID", OPERATOR.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Bot)
        .expect("start easel")
}

fn cli(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run easel cli");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fill the file system holding `dir` with a ballast file, leaving about
/// `leave` bytes free.
fn fill(ballast: &Path, leave: usize) {
    let mut file = std::fs::File::create(ballast).expect("create ballast");
    let chunk = vec![0x5a_u8; 64 * 1024];
    loop {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    file.set_len(size.saturating_sub(leave as u64))
        .expect("shrink ballast");
}

/// The last reply the bot sent to `chat`, waiting up to `within`.
async fn reply_to(tg: &FakeTelegram, chat: i64, within: Duration) -> Option<String> {
    let ok = tg
        .wait_for(within, |calls| {
            calls
                .iter()
                .any(|c| c.method == "sendMessage" && c.chat_id == Some(chat))
        })
        .await;
    if !ok {
        return None;
    }
    tg.texts_to(chat).into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_run_loses_nothing_acknowledged_and_heals() {
    let started = Instant::now();
    let f = Fakes {
        tg: FakeTelegram::start(TOKEN).await.unwrap(),
        flux: FakeWorker::flux(Duration::from_millis(5)).await.unwrap(),
        sdxl: FakeWorker::sdxl(KEY, Duration::from_millis(5))
            .await
            .unwrap(),
        llm: FakeLlm::start().await.unwrap(),
        health: format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        ),
    };
    let temp = tempfile::tempdir().unwrap();
    let (dir, disk) = match std::env::var_os("EASEL_FULL_DISK_DIR") {
        Some(mount) => {
            let dir = PathBuf::from(mount).join(format!("easel-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let ballast = dir.with_extension("ballast");
            (dir, Disk::Mounted { ballast })
        }
        None => (temp.path().to_path_buf(), Disk::SizeLimit),
    };

    // A first run serves one request, so the log and folders exist.
    let mut child = spawn(&dir, &f, None);
    f.tg.user_sends(50_000, 50_000, "/image=flux=before the flood");
    assert!(
        f.tg.wait_for(Duration::from_secs(60), |c| c
            .iter()
            .any(|c| c.method == "sendPhoto" && c.chat_id == Some(50_000)))
            .await,
        "the first request was not served"
    );
    let disk = match disk {
        Disk::Mounted { ballast } => {
            fill(
                &ballast,
                env_num("EASEL_FULL_DISK_LEAVE_KIB", 96) as usize * 1024,
            );
            Disk::Mounted { ballast }
        }
        Disk::SizeLimit => {
            // Restart with files limited to two of sled's 512 KiB segments
            // (opening starts the second one) and a little more.
            assert!(child.stop().await.success());
            child = spawn(&dir, &f, Some(1024 + 64));
            Disk::SizeLimit
        }
    };
    println!("disk-full campaign: data dir {}; filling", dir.display());

    // Users keep asking, with long prompts, until the log cannot take more.
    let long = "a flooded archive with drifting paper lanterns, ".repeat(18);
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let mut user = 50_001_i64;
    while refused.is_empty() && user < 52_000 {
        let model = if user % 2 == 0 { "flux" } else { "sdxl" };
        f.tg.user_sends(user, user, &format!("/image={model}={long} {user}"));
        let reply = reply_to(&f.tg, user, Duration::from_secs(30)).await;
        assert!(child.running(), "easel exited when the disk filled up");
        match reply.as_deref() {
            Some(t) if t.starts_with("Queued for ") => acknowledged.push((user, model)),
            Some(BUSY) => refused.push(user),
            other => panic!("user {user} got an unclear reply: {other:?}"),
        }
        user += 1;
    }
    assert!(
        !refused.is_empty(),
        "the disk never filled up after {} requests",
        acknowledged.len()
    );
    println!(
        "disk-full campaign: {} requests acknowledged, then the log refused a write ({:.0} s)",
        acknowledged.len(),
        started.elapsed().as_secs_f64()
    );

    // The disk stays full for a while: users keep writing and each gets a
    // clear answer (help as usual, requests refused), and the bot stays up.
    let full_for = Duration::from_secs(env_num("EASEL_FULL_DISK_SECS", 2));
    let until = Instant::now() + full_for;
    let mut helped = 0;
    while Instant::now() < until {
        let (text, expected) = if user % 5 == 0 {
            ("/help".to_owned(), "I turn a description into an image.")
        } else {
            (format!("/image=flux=a dry room {user}"), BUSY)
        };
        f.tg.user_sends(user, user, &text);
        let reply = reply_to(&f.tg, user, Duration::from_secs(60)).await;
        assert!(child.running(), "easel exited while the disk was full");
        match reply {
            Some(t) if t.starts_with(expected) && expected == BUSY => refused.push(user),
            Some(t) if t.starts_with(expected) => helped += 1,
            other => panic!("user {user} sent {text:?} and got {other:?} while the disk was full"),
        }
        user += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Readiness says so, with the reason: the log, not Telegram (§7).
    let (code, why) = readyz(&f)
        .await
        .expect("the health listener answers while the disk is full");
    assert_eq!(code, 503, "{why}");
    assert!(
        why.starts_with("not ready: the event log") || why == "not ready: restarting the engine\n",
        "{why}"
    );
    // The operator was told, once (§7).
    assert!(
        f.tg.wait_for(Duration::from_secs(30), |c| c.iter().any(|c| c.chat_id
            == Some(OPERATOR)
            && c.text.as_deref().is_some_and(
                |t| t.starts_with("⚠️ easel: the event log refuses writes")
            )))
        .await,
        "{:?}",
        f.tg.texts_to(OPERATOR)
    );
    println!(
        "disk-full campaign: disk full for {} s: {} requests refused with a clear reply, {helped} /help answered, bot up",
        full_for.as_secs(),
        refused.len()
    );

    // Space comes back.
    match &disk {
        Disk::Mounted { ballast } => std::fs::remove_file(ballast).unwrap(),
        Disk::SizeLimit => child.lift_size_limit(),
    }

    // Users who try again are served, without anyone restarting the bot.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after = 53_000;
    let mut retries = 0;
    let served = loop {
        f.tg.user_sends(after, after, "/image=sdxl=after the flood");
        match reply_to(&f.tg, after, Duration::from_secs(30))
            .await
            .as_deref()
        {
            Some(t) if t.starts_with("Queued for ") => {
                break f
                    .tg
                    .wait_for(Duration::from_secs(60), |c| {
                        c.iter()
                            .any(|c| c.method == "sendPhoto" && c.chat_id == Some(after))
                    })
                    .await;
            }
            Some(BUSY) if Instant::now() < deadline => {
                retries += 1;
                after += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => panic!("user {after} got {other:?} after space came back"),
        }
    };
    assert!(served, "no image after space came back");
    // Served again: ready again.
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        match readyz(&f).await {
            Some((200, _)) => break,
            other if Instant::now() > ready_by => {
                panic!("/readyz after the disk healed: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // And told it is over once a write reached the disk: one alert, one
    // recovery, however many requests were refused and engines restarted.
    assert!(
        f.tg.wait_for(Duration::from_secs(30), |c| c.iter().any(|c| c.chat_id
            == Some(OPERATOR)
            && c.text.as_deref().is_some_and(|t| t.starts_with(
                "✅ easel recovered: the event log takes writes again"
            ))))
        .await,
        "{:?}",
        f.tg.texts_to(OPERATOR)
    );
    let status = child.stop().await;
    assert!(status.success(), "easel stopped with {status}");
    assert_eq!(
        f.tg.texts_to(OPERATOR).len(),
        2,
        "{:?}",
        f.tg.texts_to(OPERATOR)
    );
    println!("disk-full campaign: served again after {retries} refused retries");

    // Every acknowledged request finished, and the history verifies.
    let (code, out) = cli(&dir, &["replay", "--verify"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&dir, &["audit", "list", "--json", "--limit", "100000"]);
    assert_eq!(code, 0, "{out}");
    let records: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // Refused means not taken: no request of theirs runs later. (Part of
    // a flush the disk refused can still reach it — a write cut short at
    // the size limit keeps its start — so a refused request may be in the
    // log; the next engine cancels it before it can start, and
    // `cancelled` is reachable only from Queued.)
    let mut kept_but_cancelled = 0;
    for user in &refused {
        for r in records.iter().filter(|r| r["user_id"] == *user) {
            assert_eq!(
                r["status"], "cancelled",
                "user {user} was told no, but a request of theirs was taken: {r}"
            );
            kept_but_cancelled += 1;
        }
    }
    println!(
        "disk-full campaign: {kept_but_cancelled} refused request(s) reached the disk anyway and were cancelled before they could start"
    );
    for (user, model) in &acknowledged {
        let r = records
            .iter()
            .find(|r| r["user_id"] == *user && r["model"] == *model)
            .unwrap_or_else(|| panic!("acknowledged request of {user} is missing"));
        assert!(
            matches!(r["status"].as_str(), Some("done" | "failed" | "cancelled")),
            "unfinished: {r}"
        );
    }
    println!(
        "disk-full campaign: all {} acknowledged requests finished, verify OK, {:.0} s",
        acknowledged.len(),
        started.elapsed().as_secs_f64()
    );
    if let Disk::Mounted { .. } = disk {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
