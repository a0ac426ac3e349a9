//! The operator commands against a log made here (done, failed and
//! cancelled requests): tables and --json (parsed back), every filter, id
//! prefixes, stats, export → replay --from equal to replay of the data dir,
//! hand-made logs that break FIFO or one-at-a-time, and every command while
//! a running bot holds the data dir (answered over its socket).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as Span;
use common::{RecordingDeliverer, ScriptedGenerator, UpperEnhancer};
use easel::domain::{Command as Cmd, FailureKind, Limits, RateLimit, RequestId};
use easel::engine::{Admitted, Clock, Core, ImageStore, Runner, StepOutcome};
use easel::store::{EventStore, SledStore};
use serde_json::Value;

fn easel(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("COLUMNS", "200")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

struct Made {
    dir: tempfile::TempDir,
    done: Vec<RequestId>,
    failed: RequestId,
    cancelled: RequestId,
    queued: RequestId,
}

/// Users 1–3, flux and sdxl, a day apart: 3 done, 1 failed, 1 cancelled, 1 queued.
async fn make_log() -> Made {
    let dir = tempfile::tempdir().unwrap();
    let clock = common::clock();
    let core = Arc::new(
        Core::open(
            SledStore::open(&easel::config::DataDir::new(dir.path()).log()).unwrap(),
            Arc::clone(&clock) as Arc<dyn Clock>,
        )
        .unwrap()
        .0,
    );
    let generator = Arc::new(ScriptedGenerator::default());
    let images = Arc::new(ImageStore::open(&dir.path().join("images")).unwrap());
    let runner = |m: &str| {
        Runner::new(
            Arc::clone(&core),
            common::model(m),
            Arc::new(UpperEnhancer),
            Arc::clone(&generator),
            Arc::new(RecordingDeliverer::default()),
            Arc::clone(&images),
        )
    };
    let limits = Limits {
        max_pending: 10,
        rate: RateLimit {
            count: 100,
            window_secs: 60,
        },
    };
    let accept = |m: &'static str, u: i64, p: &'static str| {
        let core = Arc::clone(&core);
        async move {
            match core
                .accept(common::request(m, u, p), &limits)
                .await
                .unwrap()
            {
                Admitted::Queued { id, .. } => id,
                other => panic!("{other:?}"),
            }
        }
    };
    let drain = |r: Runner<SledStore, UpperEnhancer, ScriptedGenerator, RecordingDeliverer>| async move {
        while r.try_execute_step().await.unwrap() != StepOutcome::EmptyQueue {}
    };
    let a = accept("flux", 1, "a red fox").await;
    clock.advance(Span::seconds(2));
    let b = accept("sdxl", 2, "a lighthouse").await;
    drain(runner("flux")).await;
    drain(runner("sdxl")).await;
    clock.advance(Span::days(1));
    generator
        .script
        .lock()
        .unwrap()
        .push_back(Err(FailureKind::Rejected));
    let failed = accept("flux", 3, "something forbidden").await;
    drain(runner("flux")).await;
    clock.advance(Span::seconds(5));
    let c = accept("sdxl", 1, "a quiet harbour").await;
    drain(runner("sdxl")).await;
    clock.advance(Span::seconds(1));
    let cancelled = accept("flux", 2, "never mind").await;
    core.execute(cancelled, Cmd::Cancel).await.unwrap();
    // One left waiting behind a started one.
    clock.advance(Span::seconds(1));
    let _started = accept("sdxl", 3, "a long one").await;
    core.start_next(&common::model("sdxl")).await.unwrap();
    clock.advance(Span::seconds(1));
    let queued = accept("sdxl", 2, "still waiting").await;
    drop(core);
    Made {
        dir,
        done: vec![a, b, c],
        failed,
        cancelled,
        queued,
    }
}

#[tokio::test]
async fn audit_list_table_json_and_every_filter() {
    let m = make_log().await;
    let d = m.dir.path();
    let (code, out, err) = easel(d, &["audit", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 7);
    assert!(err.is_empty(), "nothing cut, nothing said: {err}");
    // A cut list says so on stderr; --limit 0 lists all.
    let (code, out, err) = easel(d, &["audit", "list", "--json", "--limit", "3"]);
    assert_eq!(code, 0);
    assert_eq!(json_lines(&out).len(), 3);
    assert!(
        err.contains("showing the newest 3; more requests match (--limit 0 lists all)"),
        "{err}"
    );
    let (_, out, err) = easel(d, &["audit", "list", "--json", "--limit", "0"]);
    assert_eq!(json_lines(&out).len(), 7);
    assert!(err.is_empty(), "{err}");
    let (_, _, err) = easel(d, &["audit", "list", "--limit", "7"]);
    assert!(
        err.is_empty(),
        "exactly as many as asked for is not cut: {err}"
    );
    // Newest first, with the documented fields.
    assert_eq!(rows[0]["id"], m.queued.to_string());
    for key in [
        "id",
        "user_id",
        "chat_id",
        "model",
        "prompt",
        "enhanced_prompt",
        "status",
        "error",
        "attempts",
        "created_at",
        "updated_at",
    ] {
        assert!(rows[0].get(key).is_some(), "missing {key}");
    }
    let failed = rows
        .iter()
        .find(|r| r["id"] == m.failed.to_string())
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().starts_with("rejected"));
    let done = rows
        .iter()
        .find(|r| r["id"] == m.done[0].to_string())
        .unwrap();
    assert_eq!(
        (
            done["status"].as_str(),
            done["enhanced_prompt"].as_str(),
            done["attempts"].as_u64()
        ),
        (Some("done"), Some("A RED FOX"), Some(1))
    );

    let count = |args: &[&str]| {
        let mut all = vec!["audit", "list", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = easel(d, &all);
        assert_eq!(code, 0, "{args:?}: {err}");
        json_lines(&out)
    };
    assert!(count(&["--user", "2"]).iter().all(|r| r["user_id"] == 2));
    assert_eq!(count(&["--user", "2"]).len(), 3);
    assert_eq!(count(&["--model", "FLUX"]).len(), 3);
    assert_eq!(count(&["--status", "done"]).len(), 3);
    assert_eq!(
        count(&["--status", "cancelled"])[0]["id"],
        m.cancelled.to_string()
    );
    assert_eq!(count(&["--limit", "2"]).len(), 2);
    assert_eq!(count(&["--until", "2026-11-25T23:59:59Z"]).len(), 2);
    assert_eq!(count(&["--since", "2026-11-26"]).len(), 5);
    assert_eq!(
        count(&[
            "--since",
            "2026-11-26",
            "--model",
            "sdxl",
            "--status",
            "done"
        ])
        .len(),
        1
    );
    assert!(count(&["--user", "99"]).is_empty());

    let (code, table, _) = easel(d, &["audit", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&m.failed.to_string()) && table.contains("rejected"),
        "{table}"
    );
    let (code, _, err) = easel(d, &["audit", "list", "--status", "sleeping"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a status"), "{err}");
    let (code, _, err) = easel(d, &["audit", "list", "--since", "yesterday"]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
}

#[tokio::test]
async fn audit_show_by_prefix_and_ambiguity() {
    let m = make_log().await;
    let d = m.dir.path();
    let id = m.failed.to_string();
    let (code, out, err) = easel(d, &["audit", "show", &id[..20], "--json"]);
    assert_eq!(code, 0, "{err}");
    let obj: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(obj["id"], id);
    let events: Vec<&str> = obj["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(events, vec!["queued", "started", "enhanced", "failed"]);
    assert!(obj["events"][0]["seq"].as_u64().is_some());
    let (code, human, _) = easel(d, &["audit", "show", &id]);
    assert_eq!(code, 0);
    for needle in [
        "timeline:",
        "stages:",
        "queue wait",
        "rejected",
        "something forbidden",
    ] {
        assert!(human.contains(needle), "{needle} missing:\n{human}");
    }
    // Two requests whose ids share their first 8 characters (random ids
    // rarely do; these are made so): the short id is ambiguous, and the
    // candidates are listed.
    let twins = [
        "abcdef12-0000-4000-8000-000000000001",
        "abcdef12-0000-4000-8000-000000000002",
    ];
    {
        let store = SledStore::open(&easel::config::DataDir::new(d).log()).unwrap();
        for (i, twin) in twins.iter().enumerate() {
            let mut req = common::request("flux", 40 + i as i64, "a twin");
            req.origin.update_id = Some(9000 + i as u32);
            store
                .append(vec![easel::store::NewEvent {
                    request_id: RequestId(twin.parse().unwrap()),
                    at: chrono::Utc::now(),
                    event: req.into_queued(),
                }])
                .unwrap();
        }
    }
    let (code, _, err) = easel(d, &["audit", "show", "abcdef12"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("matches 2 requests") && twins.iter().all(|t| err.contains(t)),
        "{err}"
    );
    let (code, out, _) = easel(d, &["audit", "show", twins[1], "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains(twins[1]), "{out}");
    let (code, _, err) = easel(d, &["audit", "show", "ffffffff"]);
    assert_eq!(code, 1);
    assert!(err.contains("no request id starts with"), "{err}");
    let (code, _, _) = easel(d, &["audit", "show", "not-hex!"]);
    assert_eq!(code, 2);
}

#[tokio::test]
async fn audit_stats_counts_and_percentiles() {
    let m = make_log().await;
    let (code, out, err) = easel(m.dir.path(), &["audit", "stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(s["requests"], 7);
    assert_eq!(s["by_model"]["flux"]["done"], 1);
    assert_eq!(s["by_model"]["flux"]["failed"], 1);
    assert_eq!(s["by_model"]["flux"]["cancelled"], 1);
    assert_eq!(s["by_model"]["sdxl"]["done"], 2);
    assert_eq!(s["by_model"]["sdxl"]["enhancing"], 1);
    assert_eq!(s["by_model"]["sdxl"]["queued"], 1);
    assert_eq!(s["stages"]["queue_wait"]["count"], 5);
    assert!(s["stages"]["generating"]["p95_ms"].as_i64().is_some());
    assert_eq!(s["failures"][0]["count"], 1);
    assert!(
        s["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rejected")
    );
    let (code, human, _) = easel(m.dir.path(), &["audit", "stats"]);
    assert_eq!(code, 0);
    assert!(
        human.contains("p95") && human.contains("failure reasons"),
        "{human}"
    );
}

#[tokio::test]
async fn export_then_replay_from_the_file_equals_replay_of_the_data_dir() {
    let m = make_log().await;
    let d = m.dir.path();
    let (code, exported, _) = easel(d, &["export"]);
    assert_eq!(code, 0);
    let events = json_lines(&exported);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    for e in &events {
        for key in ["seq", "request_id", "at", "type"] {
            assert!(e.get(key).is_some());
        }
    }
    let file = d.join("export.jsonl");
    std::fs::write(&file, &exported).unwrap();
    let (c1, from_dir, _) = easel(d, &["replay", "--verify", "--json"]);
    let (c2, from_file, e2) = easel(
        d,
        &[
            "replay",
            "--verify",
            "--json",
            "--from",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!((c1, c2), (0, 0), "{e2}");
    assert_eq!(from_dir, from_file);
    let state: Value = serde_json::from_str(from_dir.trim()).unwrap();
    assert_eq!(state["models"]["sdxl"]["queue"][0], m.queued.to_string());
    assert!(state["models"]["sdxl"]["in_flight"]["id"].is_string());
    // --until-seq: the state as of an earlier event.
    let (_, early, _) = easel(d, &["replay", "--json", "--until-seq", "1"]);
    let early: Value = serde_json::from_str(early.trim()).unwrap();
    assert_eq!(early["last_seq"], 1);
    assert_eq!(early["models"]["flux"]["queue"][0], m.done[0].to_string());
    // --since keeps only later events.
    let (_, later, _) = easel(d, &["export", "--since", "2026-11-26"]);
    assert!(json_lines(&later).len() < events.len());
}

/// Retention: finished requests older than the cutoff leave the log for
/// numbered archive files; nothing is lost (archives + log = the export
/// before), both the log and each archive verify, unfinished requests stay
/// however old, the audit still shows archived requests, and a file a
/// crash left uncommitted is redone.
#[tokio::test]
async fn retention_moves_old_finished_requests_to_the_archive_losing_nothing() {
    use easel::ops::retention::sweep;
    use easel::store::EventStore;
    let m = make_log().await;
    let d = m.dir.path();
    let (_, before, _) = easel(d, &["export"]);
    let (_, state_before, _) = easel(d, &["replay", "--json"]);
    let start = common::clock().now();
    let archive = easel::config::DataDir::new(d).archive();
    let store = SledStore::open(&easel::config::DataDir::new(d).log()).unwrap();

    // A bot that is stopping does not start a file.
    let stopped = sweep(&store, &archive, start + Span::days(2), &|| true).unwrap();
    assert_eq!(stopped.requests, 0);
    // Day 0's two done requests are past a cutoff half a day in.
    let first = sweep(&store, &archive, start + Span::hours(12), &|| false).unwrap();
    assert_eq!((first.requests, first.events), (2, 10), "{first:?}");
    assert_eq!(first.files, vec![archive.join("000001.jsonl")]);
    assert!(store.events_of(m.done[0]).unwrap().is_empty());
    assert!(
        !store
            .request_ids(Some(easel::domain::UserId(1)), None, None, false)
            .any(|id| id.unwrap() == m.done[0]),
        "the user index still names an archived request"
    );
    // Nothing more is due at the same cutoff.
    assert_eq!(
        sweep(&store, &archive, start + Span::hours(12), &|| false)
            .unwrap()
            .requests,
        0
    );

    // A crash between writing file 2 and removing its requests leaves a
    // file numbered past the committed one: the next sweep redoes it.
    std::fs::write(archive.join("000002.jsonl"), "half a file\n").unwrap();
    std::fs::write(archive.join("000003.jsonl.tmp"), "x").unwrap();
    let second = sweep(&store, &archive, start + Span::days(2), &|| false).unwrap();
    // failed, c and cancelled; the started and the queued one stay.
    assert_eq!(second.requests, 3, "{second:?}");
    assert_eq!(second.files, vec![archive.join("000002.jsonl")]);
    assert!(!archive.join("000003.jsonl.tmp").exists());
    assert!(!store.events_of(m.queued).unwrap().is_empty());
    drop(store);

    // Nothing lost: the archives and the log hold exactly the old export.
    let mut after: Vec<String> = Vec::new();
    for n in 1..=2 {
        let file = archive.join(format!("00000{n}.jsonl"));
        after.extend(
            std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
        let (code, _, err) = easel(d, &["replay", "--verify", "--from", file.to_str().unwrap()]);
        assert_eq!(code, 0, "archive {n} does not verify: {err}");
    }
    let (code, log_now, _) = easel(d, &["export"]);
    assert_eq!(code, 0);
    after.extend(log_now.lines().map(str::to_owned));
    let seq = |l: &String| {
        serde_json::from_str::<Value>(l).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    after.sort_by_key(seq);
    let before: Vec<String> = before.lines().map(str::to_owned).collect();
    assert_eq!(after, before);

    // The log still verifies, with the same queues and in-flight request.
    let (code, state_after, err) = easel(d, &["replay", "--verify", "--json"]);
    assert_eq!(code, 0, "{err}");
    // (A model whose requests all left the log has no lane to print: an
    // empty lane carries nothing.)
    let models = |s: &str| {
        let mut models = serde_json::from_str::<Value>(s.trim()).unwrap()["models"].clone();
        models.as_object_mut().unwrap().retain(|_, lane| {
            !lane["in_flight"].is_null() || lane["queue"].as_array().is_some_and(|q| !q.is_empty())
        });
        models
    };
    assert_eq!(models(&state_after), models(&state_before));
    let (_, listed, _) = easel(d, &["audit", "list", "--json"]);
    assert_eq!(json_lines(&listed).len(), 2);

    // The audit still shows an archived request, saying where it lives.
    let id = m.failed.to_string();
    let (code, shown, err) = easel(d, &["audit", "show", &id[..13]]);
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains("failed") && shown.contains("000002.jsonl"),
        "{shown}"
    );
    let (code, shown, _) = easel(d, &["audit", "show", &id, "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(shown["status"], "failed");
    assert!(
        shown["archived_in"]
            .as_str()
            .unwrap()
            .ends_with("000002.jsonl")
    );
    // queued, started, enhanced, failed
    assert_eq!(shown["events"].as_array().unwrap().len(), 4);

    // One command for the whole life of the data dir: the archive first,
    // merged in seq order, gives back the export of before, and verifies.
    let (code, whole, err) = easel(d, &["export", "--with-archive"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(whole.lines().map(str::to_owned).collect::<Vec<_>>(), before);
    let (code, out, err) = easel(d, &["replay", "--verify", "--with-archive", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["events"].as_u64(), Some(before.len() as u64));
    assert_eq!(report["verify"]["ok"], true);
    assert_eq!(models(&out), models(&state_before));
    // Without it, only what the log still holds.
    let (_, out, _) = easel(d, &["replay", "--json"]);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(report["events"].as_u64().unwrap() < before.len() as u64);
}

/// `easel compact` on a stopped data dir: one sentence with the sizes, and
/// the log reads, lists and verifies the same afterwards.
#[tokio::test]
async fn compact_rewrites_the_log_and_changes_nothing_it_holds() {
    let m = make_log().await;
    let d = m.dir.path();
    let (_, before, _) = easel(d, &["export"]);
    let (code, out, err) = easel(d, &["compact"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("compacted the event log: "), "{out}");
    assert!(out.contains(" keys) in "), "{out}");
    let (_, after, _) = easel(d, &["export"]);
    assert_eq!(after, before);
    let (code, _, err) = easel(d, &["replay", "--verify"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = easel(&d.join("nothing-here"), &["compact"]);
    assert_eq!(code, 2);
    assert!(err.contains("there is no easel event log"), "{err}");
    // Beside another process that has the log open (here this test, as a
    // running bot would): refused at once, exit 2, one sentence, and the
    // log untouched.
    let held = SledStore::open(&easel::config::DataDir::new(d).log()).unwrap();
    let (code, _, err) = easel(d, &["compact"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use by another easel process"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    drop(held);
    let (_, after, _) = easel(d, &["export"]);
    assert_eq!(after, before);
}

fn line(seq: u64, id: &str, t: &str, event: &str) -> String {
    format!("{{\"seq\":{seq},\"request_id\":\"{id}\",\"at\":\"2026-11-25T10:00:{t}Z\",{event}}}")
}

fn queued(model: &str, user: i64) -> String {
    format!(
        "\"type\":\"queued\",\"model\":\"{model}\",\"prompt\":\"p\",\"origin\":{{\"user_id\":{user},\"chat_id\":{user},\"message_id\":null,\"update_id\":null}}"
    )
}

#[test]
fn verify_names_the_first_fifo_and_one_at_a_time_violations() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        "019abb1c-3a00-7000-8000-00000000000a",
        "019abb1c-3a00-7000-8000-00000000000b",
    );
    let fifo = [
        line(1, a, "01", &queued("flux", 1)),
        line(2, b, "02", &queued("flux", 2)),
        line(3, b, "03", "\"type\":\"started\""),
    ];
    let two = [
        line(1, a, "01", &queued("flux", 1)),
        line(2, b, "02", &queued("flux", 2)),
        line(3, a, "03", "\"type\":\"started\""),
        line(
            4,
            a,
            "04",
            "\"type\":\"enhanced\",\"prompt\":\"p\",\"fallback\":null",
        ),
        line(5, b, "05", "\"type\":\"started\""),
    ];
    for (lines, seq, id, rule, needle) in [
        (&fifo[..], 3, b, "fifo", "FIFO violated"),
        (&two[..], 5, b, "one_at_a_time", "one-at-a-time violated"),
    ] {
        let file = dir.path().join(format!("{rule}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (code, _, err) = easel(
            dir.path(),
            &["replay", "--verify", "--from", file.to_str().unwrap()],
        );
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!("seq {seq}")) && err.contains(id) && err.contains(needle),
            "{err}"
        );
        let (code, out, _) = easel(
            dir.path(),
            &[
                "replay",
                "--verify",
                "--json",
                "--from",
                file.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 1);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["verify"]["ok"], false);
        assert_eq!(v["verify"]["first_violation"]["seq"], seq);
        assert_eq!(v["verify"]["first_violation"]["rule"], rule);
        assert_eq!(v["verify"]["first_violation"]["request_id"], id);
    }
    // An unreadable line is a failed check too, named by its line.
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, format!("{}\nnot json\n", fifo[0])).unwrap();
    let (code, _, err) = easel(
        dir.path(),
        &["replay", "--verify", "--from", file.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn a_missing_data_dir_is_bad_usage_and_an_empty_list_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = easel(&dir.path().join("nothing"), &["audit", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("there is no easel event log"), "{err}");
    std::fs::create_dir_all(easel::config::DataDir::new(dir.path()).log()).unwrap();
    drop(SledStore::open(&easel::config::DataDir::new(dir.path()).log()).unwrap());
    let (code, out, _) = easel(dir.path(), &["audit", "list", "--json"]);
    assert_eq!((code, out.as_str()), (0, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_while_the_bot_holds_the_data_dir() {
    use easel::demo::fake_services::FakeWorker;
    use easel::demo::fake_telegram::FakeTelegram;
    let token = "777:OPS-test-token-abcdefgh";
    let tg = FakeTelegram::start(token).await.unwrap();
    let flux = FakeWorker::flux(Duration::from_millis(10)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env: std::collections::HashMap<&str, String> = [
        ("TELEGRAM_BOT_TOKEN", token.to_owned()),
        ("TELEGRAM_API_URL", tg.url.clone()),
        ("FLUX_WORKER_URL", flux.url.clone()),
        ("EASEL_DATA_DIR", dir.path().display().to_string()),
    ]
    .into_iter()
    .collect();
    let settings = easel::config::Settings::from_sources(|k| env.get(k).cloned(), None).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let rx = stop.clone();
    let running = easel::app::start(settings, rx).await.unwrap();
    let task = tokio::spawn(running.wait());
    tg.user_sends(1, 1, "/image=flux=a red kite");
    tg.user_sends(2, 2, "/image=flux=a blue kite");
    assert!(
        tg.wait_for(Duration::from_secs(20), |c| c
            .iter()
            .filter(|c| c.method == "sendPhoto")
            .count()
            == 2)
            .await
    );
    // The socket is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("easel.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let d = dir.path().to_path_buf();
    let results = tokio::task::spawn_blocking(move || {
        let list = easel(&d, &["audit", "list", "--json"]);
        let id = json_lines(&list.1)
            .first()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .unwrap_or_default();
        let show = easel(&d, &["audit", "show", &id[..24], "--json"]);
        let stats = easel(&d, &["audit", "stats", "--json"]);
        let export = easel(&d, &["export"]);
        let replay = easel(&d, &["replay", "--verify", "--json"]);
        (list, show, stats, export, replay)
    })
    .await
    .unwrap();
    let (list, show, stats, export, replay) = results;
    assert_eq!(list.0, 0, "{}", list.2);
    assert_eq!(json_lines(&list.1).len(), 2);
    assert_eq!(show.0, 0, "{}", show.2);
    assert!(show.1.contains("\"delivered\""));
    assert_eq!(stats.0, 0);
    assert!(stats.1.contains("\"done\":2"), "{}", stats.1);
    assert_eq!(export.0, 0);
    assert!(json_lines(&export.1).len() >= 10);
    assert_eq!(replay.0, 0, "{}", replay.2);
    // The bot kept serving.
    tg.user_sends(3, 3, "/image=flux=a green kite");
    assert!(
        tg.wait_for(Duration::from_secs(20), |c| c
            .iter()
            .filter(|c| c.method == "sendPhoto")
            .count()
            == 3)
            .await
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    // Stopped: the socket is gone and the same commands read the log directly.
    assert!(!dir.path().join("easel.sock").exists());
    let (code, out, _) = easel(dir.path(), &["audit", "list", "--json"]);
    assert_eq!((code, json_lines(&out).len()), (0, 3));
}

/// Text from outside reaches the operator's terminal with its control and
/// bidi characters made visible (§6): a prompt, an LLM answer recorded
/// before cleaning removed controls, and a worker error, each carrying an
/// escape sequence, print as `\u{1b}`, never raw.
#[test]
fn audit_prints_outside_text_with_escapes_made_visible() {
    use easel::domain::{Event, FailureKind};
    use easel::store::{EventStore, NewEvent};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&easel::config::DataDir::new(dir.path()).log()).unwrap();
    let r = common::request("flux", 1, "red fox \u{1b}[2J\u{202e}gnp.exe");
    let id = RequestId::random();
    let at = chrono::Utc::now();
    let ev = |event| NewEvent {
        request_id: id,
        at,
        event,
    };
    store
        .append(vec![
            ev(r.into_queued()),
            ev(Event::Started),
            ev(Event::Enhanced {
                prompt: "a fox\u{1b}]0;pwned\u{7}".into(),
                fallback: None,
            }),
            ev(Event::Failed {
                kind: FailureKind::Unavailable,
                reason: "worker said \u{1b}[31mNO\u{9b}".into(),
                attempts: 1,
                statuses: vec!["503".into()],
            }),
        ])
        .unwrap();
    drop(store);
    let short = &id.to_string()[..13];
    for args in [
        vec!["audit", "show", short],
        vec!["audit", "list"],
        vec!["audit", "stats"],
    ] {
        let (code, out, err) = easel(dir.path(), &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            !out.contains(['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}']),
            "{args:?} printed a raw control: {out:?}"
        );
    }
    let (_, out, _) = easel(dir.path(), &["audit", "show", short]);
    assert!(out.contains("red fox \\u{1b}[2J\\u{202e}gnp.exe"), "{out}");
    assert!(out.contains("a fox\\u{1b}]0;pwned\\u{7}"), "{out}");
    assert!(out.contains("worker said \\u{1b}[31mNO\\u{9b}"), "{out}");
}

/// §8: the preset of a request — its name and what the user wrote — is
/// shown by `audit show` (text and JSON) and travels in `export`.
#[test]
fn audit_show_and_export_carry_the_preset() {
    use easel::domain::PresetUse;
    use easel::store::{EventStore, NewEvent};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&easel::config::DataDir::new(dir.path()).log()).unwrap();
    let mut r = common::request("flux", 1, "a cat, anime style");
    r.preset = Some(PresetUse {
        name: "anime".into(),
        prompt: "a cat".into(),
    });
    let id = RequestId::random();
    store
        .append(vec![NewEvent {
            request_id: id,
            at: chrono::Utc::now(),
            event: r.into_queued(),
        }])
        .unwrap();
    drop(store);
    let short = id.short();
    let (code, out, err) = easel(dir.path(), &["audit", "show", &short]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("prompt    a cat, anime style\n"), "{out}");
    assert!(
        out.contains("preset    anime (the user wrote: a cat)\n"),
        "{out}"
    );
    let (_, out, _) = easel(dir.path(), &["audit", "show", &short, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["preset"]["name"], "anime");
    assert_eq!(shown["preset"]["prompt"], "a cat");
    assert_eq!(shown["events"][0]["preset"]["name"], "anime");
    let (_, out, _) = easel(dir.path(), &["export"]);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["preset"]["prompt"], "a cat", "{first}");
    let (code, out, err) = easel(dir.path(), &["audit", "stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("presets: anime 1\n"), "{out}");
    let (_, out, _) = easel(dir.path(), &["audit", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["asked"]["presets"]["anime"], 1, "{stats}");
    assert_eq!(stats["asked"]["variation_requests"], 0, "{stats}");
    let (_, out, _) = easel(dir.path(), &["audit", "list"]);
    assert!(out.contains("flux [anime]"), "{out}");
}

/// §8: `replay --verify` checks that a request drawn with the remembered
/// model names the choice in force when it was queued (a later `/model`
/// never applies to it), and that a choice is kept under its user's id.
#[test]
fn verify_checks_the_remembered_model() {
    let dir = tempfile::tempdir().unwrap();
    let choices = easel::domain::RequestId::choices_of(easel::domain::UserId(7)).to_string();
    assert_eq!(choices, "6561736c-6d00-8000-8000-000000000007");
    let (a, b) = (
        "019abb1c-3a00-7000-8000-00000000000a",
        "019abb1c-3a00-7000-8000-00000000000b",
    );
    let remembered = |model: &str| {
        format!(
            "\"type\":\"queued\",\"model\":\"{model}\",\"prompt\":\"p\",\"origin\":{{\"user_id\":7,\"chat_id\":7,\"message_id\":null,\"update_id\":null}},\"remembered\":true"
        )
    };
    let chose = "\"type\":\"model_chosen\",\"user_id\":7,\"model\":\"sdxl\"";
    let good = [
        line(1, &choices, "01", chose),
        line(2, a, "02", &remembered("sdxl")),
    ];
    let early = [
        line(1, a, "01", &remembered("sdxl")),
        line(2, &choices, "02", chose),
    ];
    let misfiled = [line(1, b, "01", chose)];
    for (name, lines, verdict) in [
        ("good", &good[..], None),
        ("early", &early[..], Some(("seq 1", "remembered model"))),
        (
            "misfiled",
            &misfiled[..],
            Some(("seq 1", "not its user's id")),
        ),
    ] {
        let file = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (code, _, err) = easel(
            dir.path(),
            &["replay", "--verify", "--from", file.to_str().unwrap()],
        );
        match verdict {
            None => assert_eq!(code, 0, "{name}: {err}"),
            Some((seq, needle)) => {
                assert_eq!(code, 1, "{name}");
                assert!(err.contains(seq) && err.contains(needle), "{name}: {err}");
            }
        }
    }
}

/// §8: `replay --verify` checks a variation request's images are recorded
/// in order, never beyond the count it asked for.
#[test]
fn verify_checks_variations_are_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = "019abb1c-3a00-7000-8000-00000000000a";
    let queued3 = "\"type\":\"queued\",\"model\":\"flux\",\"prompt\":\"p\",\"origin\":{\"user_id\":1,\"chat_id\":1,\"message_id\":null,\"update_id\":null},\"images\":2";
    let variation = |i: u32| {
        format!(
            "\"type\":\"variation\",\"index\":{i},\"image\":null,\"failure\":{{\"kind\":\"rejected\",\"reason\":\"r\"}},\"attempts\":1"
        )
    };
    let head = [
        line(1, a, "01", queued3),
        line(2, a, "02", "\"type\":\"started\""),
        line(
            3,
            a,
            "03",
            "\"type\":\"enhanced\",\"prompt\":\"p\",\"fallback\":null",
        ),
    ];
    let mut good = head.to_vec();
    good.push(line(4, a, "04", &variation(1)));
    good.push(line(5, a, "05", &variation(2)));
    let mut skipped = head.to_vec();
    skipped.push(line(4, a, "04", &variation(2)));
    let mut beyond = good.clone();
    beyond.push(line(6, a, "06", &variation(3)));
    for (name, lines, verdict) in [
        ("good", good, None),
        ("skipped", skipped, Some("seq 4")),
        ("beyond", beyond, Some("seq 6")),
    ] {
        let file = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (code, _, err) = easel(
            dir.path(),
            &["replay", "--verify", "--from", file.to_str().unwrap()],
        );
        match verdict {
            None => assert_eq!(code, 0, "{name}: {err}"),
            Some(seq) => {
                assert_eq!(code, 1, "{name}");
                assert!(
                    err.contains(seq) && err.contains("recorded where image"),
                    "{name}: {err}"
                );
            }
        }
    }
}
