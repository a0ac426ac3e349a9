//! End to end: the real bot (app::start) against a FAKE Telegram Bot API
//! server, FAKE flux and sdxl workers and a FAKE LLM, all on loopback.

mod dashboard;
mod helpers;

use helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_models_end_to_end() {
    let mut app = spawn_app(&[]).await;
    let (alice, bob) = (1001, 1002);
    app.tg
        .user_sends(alice, alice, "/image=flux=a red fox in the snow");
    app.tg
        .user_sends(bob, bob, "/image=SDXL=a lighthouse at dawn");
    assert!(
        app.images_to(alice, 1).await,
        "alice got no photo: {:#?}",
        app.tg.calls()
    );
    assert!(app.images_to(bob, 1).await, "bob got no photo");
    let texts = app.tg.texts_to(alice);
    assert_eq!(texts[0], "Queued for flux — position 1");
    let photo = app.photo_calls(alice).remove(0);
    assert_eq!(photo.method, "sendPhoto");
    // The caption names the model, then the enhanced prompt.
    assert_eq!(
        photo.caption.as_deref(),
        Some("🎨 flux\na red fox in the snow, highly detailed, soft cinematic light")
    );
    let bobs = app.photo_calls(bob).remove(0);
    assert!(
        bobs.caption
            .as_deref()
            .unwrap_or_default()
            .starts_with("🎨 sdxl\n"),
        "{:?}",
        bobs.caption
    );
    let markup = photo.reply_markup.unwrap().to_string();
    assert!(
        markup.contains("again:") && markup.contains("orig:"),
        "{markup}"
    );
    assert!(
        app.status_ends_with(alice, 0, "Done ✅").await,
        "{:#?}",
        app.tg.calls()
    );
    assert!(app.status_ends_with(bob, 0, "Done ✅").await);
    app.stop().await;
}

use std::sync::atomic::Ordering;
use std::time::Duration;

use easel::demo::fake_telegram::Failure;
use easel::store::EventStore;
use helpers::{SDXL_KEY, TOKEN, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_across_users_and_one_at_a_time() {
    let mut app = spawn_app(&[]).await;
    let users = [2001, 2002, 2003, 2004];
    for (i, u) in users.iter().enumerate() {
        app.tg
            .user_sends(*u, *u, &format!("/image=flux=picture number {i}"));
        // Acceptance order is the order the bot handled them; spacing the
        // messages makes that the order they were sent.
        assert!(app.text_to(*u, "Queued for flux").await);
    }
    for u in users {
        assert!(app.images_to(u, 1).await);
    }
    let prompts = app.flux.stats.prompts.lock().unwrap().clone();
    let order: Vec<usize> = prompts
        .iter()
        .map(|p| {
            users
                .iter()
                .position(|u| p.contains(&format!("number {}", u - 2001)))
                .unwrap()
        })
        .collect();
    assert_eq!(order, vec![0, 1, 2, 3], "{prompts:?}");
    assert_eq!(app.flux.stats.max_in_flight.load(Ordering::SeqCst), 1);
    // Positions were told as numbers.
    assert!(app.tg.texts_to(2004)[0].starts_with("Queued for flux — position "));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_and_sdxl_run_at_the_same_time() {
    let mut app = spawn_app(&[]).await;
    // Both held by their workers until seen overlapping: no timing involved.
    app.tg.user_sends(3001, 3001, "/image=flux=a held river");
    app.tg.user_sends(3002, 3002, "/image=sdxl=a held mountain");
    let until = tokio::time::Instant::now() + WAIT;
    let mut overlapped = false;
    while tokio::time::Instant::now() < until && !overlapped {
        overlapped = app.flux.stats.in_flight.load(Ordering::SeqCst) == 1
            && app.sdxl.stats.in_flight.load(Ordering::SeqCst) == 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        overlapped,
        "the two models never generated at the same time"
    );
    app.flux.release();
    app.sdxl.release();
    assert!(app.images_to(3001, 1).await && app.images_to(3002, 1).await);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_a_reply() {
    let mut app = spawn_app(&[("EASEL_RATE_LIMIT", "3/60"), ("SDXL_WORKER_URL", "")]).await;
    let u = 4001;
    let cases = [
        (
            "/image=dalle=a fox",
            "There is no model called \"dalle\". Available: flux.",
        ),
        ("/image=flux=   ", "The prompt is empty."),
        ("/image", "Write /image=<model>=<prompt>"),
        // (`/image <prompt>` draws with the remembered model: §8.)
        ("/image   ", "Write /image=<model>=<prompt>"),
        ("/image==a fox", "Write /image=<model>=<prompt>"),
        (
            "/image=sdxl=a fox",
            "Image generation is not configured for sdxl",
        ),
        ("/frobnicate", "I don't know that command."),
        ("/help", "Models: flux"),
    ];
    for (text, reply) in cases {
        app.tg.user_sends(u, u, text);
        assert!(
            app.text_to(u, reply).await,
            "{text:?} did not get {reply:?}: {:?}",
            app.tg.texts_to(u)
        );
    }
    let long = "ب".repeat(1001);
    app.tg.user_sends(u, u, &format!("/image=flux={long}"));
    assert!(
        app.text_to(u, "The prompt has 1001 characters; the limit is 1000.")
            .await
    );
    // Pending cap (3), then the rate limit (3 per 60 s).
    for i in 0..4 {
        app.tg
            .user_sends(u, u, &format!("/image=flux=a held thing {i}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        app.text_to(u, "You already have 3 requests waiting").await,
        "{:?}",
        app.tg.texts_to(u)
    );
    app.tg.user_sends(u, u, "/cancel");
    assert!(app.text_to(u, "Cancelled").await);
    app.tg.user_sends(u, u, "/image=flux=one more");
    assert!(
        app.text_to(u, "You're sending requests too fast. Please try again in")
            .await,
        "{:?}",
        app.tg.texts_to(u)
    );
    // No rejection reached the log: only the three accepted requests did.
    let queued = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter(|r| r.event.name() == "queued")
        .count();
    assert_eq!(queued, 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_comes_before_anything_is_recorded() {
    let mut app = spawn_app(&[("EASEL_ALLOWED_USERS", "7001")]).await;
    app.tg.user_sends(7002, 7002, "/image=flux=a fox");
    assert!(app.text_to(7002, "Sorry, this bot is private.").await);
    app.tg.user_sends(7001, 7001, "/image=flux=a fox");
    assert!(app.images_to(7001, 1).await);
    let users: Vec<i64> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { origin, .. } => Some(origin.user_id.0),
            _ => None,
        })
        .collect();
    assert_eq!(users, vec![7001]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_all_and_cancel_by_id_prefix() {
    let mut app = spawn_app(&[("EASEL_MAX_PENDING_PER_USER", "5")]).await;
    // A held request keeps flux busy so the next ones stay queued.
    app.tg.user_sends(5000, 5000, "/image=flux=a held blocker");
    assert!(app.text_to(5000, "Queued").await);
    let u = 5001;
    for i in 0..3 {
        app.tg.user_sends(u, u, &format!("/image=flux=queued {i}"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        app.tg
            .wait_for(WAIT, |c| c
                .iter()
                .filter(|c| c.chat_id == Some(u)
                    && c.text.as_deref().is_some_and(|t| t.starts_with("Queued")))
                .count()
                == 3)
            .await
    );
    // In the order they were queued (not the ids' order).
    let ids: Vec<String> = app.core().read(|s| {
        let mut mine: Vec<_> = s
            .requests()
            .filter(|r| r.origin.user_id.0 == u)
            .map(|r| (r.queued_at, r.id.to_string()))
            .collect();
        mine.sort();
        mine.into_iter().map(|(_, id)| id).collect()
    });
    assert_eq!(ids.len(), 3);
    // /queue: a line per request — short id, model, place in line, the
    // start of the prompt — so requests to one model can be told apart.
    app.tg.user_sends(u, u, "/queue");
    assert!(app.text_to(u, "Your requests:").await);
    let listing = app
        .tg
        .texts_to(u)
        .into_iter()
        .find(|t| t.starts_with("Your requests:"))
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        let line = format!("• {} · flux · position {}", &id[..8], i + 1);
        assert!(listing.contains(&line), "{line:?} not in {listing}");
        assert!(listing.contains(&format!("“queued {i}”")), "{listing}");
    }
    app.tg
        .user_sends(u, u, &format!("/cancel {}", &ids[1][..8]));
    assert!(app.text_to(u, "Cancelled 1 queued request.").await);
    app.tg.user_sends(u, u, "/cancel ffffffff");
    assert!(
        app.text_to(
            u,
            "None of your queued requests has an id starting with \"ffffffff\""
        )
        .await
    );
    app.tg.user_sends(u, u, "/cancel");
    assert!(app.text_to(u, "Cancelled 2 queued requests.").await);
    app.tg.user_sends(u, u, "/queue");
    assert!(app.text_to(u, "You have no requests in progress.").await);
    // The blocker was never cancelled and arrives.
    app.flux.release();
    assert!(app.images_to(5000, 1).await);
    assert_eq!(app.flux.stats.calls.load(Ordering::SeqCst), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn again_and_original_buttons() {
    let mut app = spawn_app(&[]).await;
    let u = 6001;
    app.tg.user_sends(u, u, "/image=flux=a green owl");
    assert!(app.images_to(u, 1).await);
    let photo = app.photo_calls(u).remove(0);
    let data = |i: usize| helpers::button_data(&photo, i);
    let photo_id = photo.message_id.unwrap();

    app.tg.user_presses(u, u, photo_id, &data(1));
    assert!(
        app.tg
            .wait_for(WAIT, |c| c
                .iter()
                .any(|c| c.method == "sendDocument" && c.chat_id == Some(u)))
            .await
    );
    let original = app
        .tg
        .calls()
        .into_iter()
        .find(|c| c.method == "sendDocument")
        .unwrap();
    assert_eq!(
        original.file_len, photo.file_len,
        "the original is the same bytes"
    );

    app.tg.user_presses(u, u, photo_id, &data(0));
    assert!(app.images_to(u, 3).await, "Again made no second image");
    let prompts = app.flux.stats.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 2);
    assert_eq!(prompts[0], prompts[1], "Again reuses the prompt");
    // The 🔁 Again notice says what happened to the new request (it
    // follows the "Queued" reply, so the photo may come first).
    assert!(
        app.notice_starting("Queued for flux — position").await,
        "{:#?}",
        app.tg.calls()
    );

    // An expired original says so.
    for f in std::fs::read_dir(app.dir.path().join("images")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let before = app
        .tg
        .calls()
        .iter()
        .filter(|c| c.method == "sendDocument")
        .count();
    app.tg.user_presses(u, u, photo_id, &data(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.tg
            .calls()
            .iter()
            .filter(|c| c.method == "sendDocument")
            .count(),
        before
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_update_never_makes_a_second_request() {
    let mut app = spawn_app(&[]).await;
    let u = 8001;
    let (update, _) = app.tg.user_sends(u, u, "/image=flux=a single fox");
    assert!(app.images_to(u, 1).await);
    // The same message under a new update id: found by chat + message id.
    let again = app.tg.redeliver_as_new_update(update).unwrap();
    assert!(app.eventually(|a| a.tg.confirmed(again)).await);
    // After a restart that lost the saved offset, Telegram resends the
    // very same update: found by update id.
    app.stop().await;
    {
        let store = easel::store::SledStore::open(&app.dir.path().join("log")).unwrap();
        store.delete_meta("telegram/offset").unwrap();
    }
    app.tg.redeliver(update);
    app.start().await;
    assert!(app.eventually(|a| a.tg.confirmed(update)).await);
    let queued = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter(|r| r.event.name() == "queued")
        .count();
    assert_eq!(queued, 1);
    assert_eq!(app.flux.stats.calls.load(Ordering::SeqCst), 1);
    assert_eq!(app.photo_calls(u).len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_queue_loses_nothing() {
    let mut app = spawn_app(&[]).await;
    let users = [9001, 9002, 9003];
    for u in users {
        app.tg
            .user_sends(u, u, &format!("/image=flux=a held scene for {u}"));
        assert!(app.text_to(u, "Queued for flux").await);
    }
    // Stop while the first is generating and the others wait.
    assert!(
        app.tg
            .wait_for(WAIT, |_| app.flux.stats.in_flight.load(Ordering::SeqCst)
                == 1)
            .await
    );
    app.restart().await;
    app.flux.release();
    for u in users {
        assert!(app.images_to(u, 1).await, "{u} lost its image");
    }
    assert!(
        app.eventually(|a| a.core().read(|s| s.requests().count()) == 0)
            .await,
        "requests left unfinished"
    );
    let prompts = app.flux.stats.prompts.lock().unwrap().clone();
    let firsts: Vec<&String> = prompts.iter().fold(Vec::new(), |mut v, p| {
        if !v.contains(&p) {
            v.push(p);
        }
        v
    });
    assert_eq!(firsts.len(), 3);
    for (p, u) in firsts.iter().zip(users) {
        assert!(
            p.contains(&u.to_string()),
            "FIFO broken across the restart: {prompts:?}"
        );
    }
    let resumed = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .any(|r| r.event.name() == "resumed");
    assert!(resumed, "the in-flight request was resumed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_caption_is_cut_and_the_full_prompt_follows() {
    let mut app = spawn_app(&[]).await;
    let u = 10_001;
    let prompt = "🦊".repeat(600);
    app.tg.user_sends(u, u, &format!("/image=flux={prompt}"));
    assert!(app.images_to(u, 1).await);
    let caption = app.photo_calls(u).remove(0).caption.unwrap();
    assert!(caption.encode_utf16().count() <= 1024);
    assert!(caption.ends_with('…'));
    assert!(app.text_to(u, "Full prompt:").await);
    let full = app
        .tg
        .texts_to(u)
        .into_iter()
        .find(|t| t.starts_with("Full prompt:"))
        .unwrap();
    assert!(full.contains(&prompt));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_or_oddly_shaped_images_go_as_documents() {
    let mut app = spawn_app(&[]).await;
    app.tg
        .user_sends(11_001, 11_001, "/image=sdxl=a huge mural");
    app.tg
        .user_sends(11_002, 11_002, "/image=flux=a panorama of the alps");
    assert!(app.images_to(11_001, 1).await && app.images_to(11_002, 1).await);
    for u in [11_001, 11_002] {
        let call = app.photo_calls(u).remove(0);
        assert_eq!(call.method, "sendDocument", "{u}");
        // A document is the original already: only 🔁 Again is offered.
        let markup = call.reply_markup.unwrap().to_string();
        assert!(
            markup.contains("again:") && !markup.contains("orig:"),
            "{markup}"
        );
    }
    assert!(app.photo_calls(11_001)[0].file_len.unwrap() > 10_000_000);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_429_on_send_photo_waits_and_resends() {
    let mut app = spawn_app(&[]).await;
    app.tg.fail_next("sendPhoto", 1, Failure::RetryAfter(1));
    let u = 12_001;
    app.tg.user_sends(u, u, "/image=flux=a patient heron");
    assert!(app.images_to(u, 1).await);
    let calls = app.tg.calls();
    let failed = calls
        .iter()
        .find(|c| c.method == "sendPhoto (failed)")
        .expect("the 429 happened");
    let sent = calls.iter().find(|c| c.method == "sendPhoto").unwrap();
    assert!(
        sent.at.duration_since(failed.at) >= Duration::from_millis(950),
        "did not wait retry_after"
    );
    assert!(
        app.eventually(|a| a
            .core()
            .store()
            .read_from(1)
            .filter_map(Result::ok)
            .filter(|r| r.event.name() == "delivered")
            .count()
            == 1)
            .await
    );
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_a_photo_waits_out_a_429_leaves_it_to_the_next_start() {
    let mut app = spawn_app(&[]).await;
    // Telegram asks for a long pause on the photo; the bot is stopped
    // (SIGTERM) while it waits.
    app.tg.fail_next("sendPhoto", 1, Failure::RetryAfter(600));
    let u = 12_101;
    app.tg.user_sends(u, u, "/image=flux=a heron that waits");
    assert!(
        app.tg
            .wait_for(Duration::from_secs(60), |calls| calls
                .iter()
                .any(|c| c.method == "sendPhoto (failed)"))
            .await,
        "the 429 happened"
    );
    app.stop().await;
    // Not failed: nothing was recorded for the cut-short delivery.
    let names = |app: &helpers::TestApp| -> Vec<&'static str> {
        app.core()
            .store()
            .read_from(1)
            .filter_map(Result::ok)
            .map(|r| r.event.name())
            .collect()
    };
    app.start().await;
    let before_resume = names(&app);
    assert!(!before_resume.contains(&"failed"), "{before_resume:?}");
    // The next start sends the kept image, as a photo, and it is done.
    assert!(app.images_to(u, 1).await, "{:#?}", app.tg.calls());
    assert!(
        app.eventually(|a| names(a).contains(&"delivered")).await,
        "{:?}",
        names(&app)
    );
    assert!(!names(&app).contains(&"failed"));
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_200_long_queue_stays_inside_the_edit_limits() {
    let mut app = spawn_app(&[]).await;
    let users: Vec<i64> = (0..200).map(|i| 20_000 + i).collect();
    for u in &users {
        app.tg.user_sends(*u, *u, "/image=flux=a quick sketch");
    }
    let n = users.len();
    assert!(
        app.tg
            .wait_for(Duration::from_secs(120), |calls| calls
                .iter()
                .filter(|c| c.method == "sendPhoto")
                .count()
                >= n)
            .await,
        "not all 200 delivered"
    );
    let calls = app.tg.calls();
    // At most one edit per chat per second.
    let mut last_edit: std::collections::HashMap<i64, tokio::time::Instant> = Default::default();
    for c in calls.iter().filter(|c| c.method == "editMessageText") {
        let chat = c.chat_id.unwrap();
        if let Some(prev) = last_edit.insert(chat, c.at) {
            assert!(
                c.at.duration_since(prev) >= Duration::from_secs(1),
                "two edits within a second in chat {chat}"
            );
        }
    }
    // Far fewer than 30 calls in any second, everything included.
    let worst = app.tg.max_calls_in_one_second();
    assert!(worst < 30, "{worst} calls in one second");
    // Not one edit per waiting request per completion (that would be ~20,000).
    let edits = calls
        .iter()
        .filter(|c| c.method == "editMessageText")
        .count();
    assert!(edits < 2_000, "{edits} edits");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_internal_url_in_any_message() {
    let mut app = spawn_app(&[]).await;
    let u = 13_001;
    app.tg.user_sends(u, u, "/image=flux=something nsfw");
    app.tg
        .user_sends(u, u, "/image=sdxl=a storm that will explode");
    app.tg.user_sends(u, u, "/image=flux=a calm lake");
    assert!(app.images_to(u, 1).await);
    // The two failures are told in plain words in their status messages.
    assert!(
        app.any_message_ends_with(u, "Please try again later.")
            .await
    );
    assert!(app.any_message_ends_with(u, "Try rephrasing it.").await);
    for c in app.tg.calls() {
        for text in [c.text.as_deref(), c.caption.as_deref()]
            .into_iter()
            .flatten()
        {
            for secret in [TOKEN, SDXL_KEY, "127.0.0.1", "http://", "sk-"] {
                assert!(!text.contains(secret), "{secret:?} in a message: {text}");
            }
        }
    }
    // Nor in any log line (trace level, every crate). Every test checks
    // this when it stops its bot (`TestApp::stop`), whatever the order the
    // tests run in; here, the capture is shown to hold this test's lines.
    let logs = helpers::captured_logs();
    let ids: Vec<String> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .map(|r| r.request_id.to_string())
        .collect();
    assert!(
        ids.iter().any(|id| logs.contains(id.as_str())),
        "the capture holds this test's lines"
    );
    helpers::assert_no_secret_logged();
    // Nor in the event log.
    for rec in app.core().store().read_from(1).filter_map(Result::ok) {
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains(SDXL_KEY) && !json.contains(TOKEN), "{json}");
    }
    app.stop().await;
}

/// The data dir is the bot's alone (§6): after a request went through,
/// every folder in it is 0700 and every file (log, lock, kept image, query
/// socket) 0600, as created, whatever the umask the process started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_readable_by_its_owner_only() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut app = spawn_app(&[]).await;
    app.tg.user_sends(9101, 9101, "/image=flux=a private fox");
    assert!(app.images_to(9101, 1).await);
    fn walk(dir: &std::path::Path, seen: &mut Vec<(String, u32, bool)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            let name = e.path().display().to_string();
            if meta.is_dir() {
                seen.push((name, mode, true));
                walk(&e.path(), seen);
            } else {
                seen.push((name, mode, meta.file_type().is_socket()));
            }
        }
    }
    let mut seen = Vec::new();
    let root = std::fs::metadata(app.dir.path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    walk(app.dir.path(), &mut seen);
    assert_eq!(root, 0o700);
    assert!(seen.iter().any(|(n, _, _)| n.ends_with("easel.sock")));
    assert!(
        seen.iter()
            .any(|(n, _, _)| n.ends_with(".png") || n.ends_with(".jpg"))
    );
    for (name, mode, _) in &seen {
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}");
    }
    app.stop().await;
}

/// A Telegram 5xx at `getMe` (start-up, or a restart after the disk
/// filled) is an outage, retried with backoff; it is not a refused token.
#[tokio::test(start_paused = true)]
async fn a_telegram_5xx_at_get_me_is_waited_out_not_a_bad_token() {
    let mut app = spawn_app(&[]).await;
    app.stop().await;
    // One is enough: teloxide itself waits 10 s after any 5xx.
    app.tg
        .fail_next("getMe", 1, Failure::Status(502, "Bad Gateway".into()));
    app.start().await;
    let count = |m: &str| app.tg.calls().iter().filter(|c| c.method == m).count();
    assert_eq!(count("getMe (failed)"), 1, "the 502 was answered");
    assert_eq!(count("getMe"), 2, "one getMe answered per start");
    app.tg
        .user_sends(9201, 9201, "/image=flux=after the outage");
    assert!(app.images_to(9201, 1).await);
    app.stop().await;
}

/// Buttons act only on a request of the chat they are pressed in: data
/// forged by a modified client to name another chat's request gets "no
/// longer works", creates nothing and sends nothing (§2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_button_for_another_chats_request_does_nothing() {
    let mut app = spawn_app(&[]).await;
    let (owner, intruder) = (9301, 9302);
    app.tg
        .user_sends(owner, owner, "/image=flux=a private garden");
    assert!(app.images_to(owner, 1).await);
    let photo = app.photo_calls(owner).remove(0);
    let data = |i: usize| helpers::button_data(&photo, i);
    app.tg.user_sends(intruder, intruder, "/help");
    assert!(app.text_to(intruder, "Models:").await);
    for i in [0, 1] {
        app.tg.user_presses(intruder, intruder, 1, &data(i));
    }
    let answered = |a: &helpers::TestApp| {
        a.tg.calls()
            .iter()
            .filter(|c| {
                c.method == "answerCallbackQuery"
                    && c.text.as_deref() == Some("This button no longer works.")
            })
            .count()
            == 2
    };
    assert!(app.eventually(answered).await, "{:#?}", app.tg.calls());
    assert!(
        app.photo_calls(intruder).is_empty(),
        "an image went to the intruder"
    );
    assert_eq!(
        app.flux.stats.calls.load(Ordering::SeqCst),
        1,
        "Again ran for a forged button"
    );
    assert!(
        app.eventually(|a| a.core().read(|s| s.requests().count()) == 0)
            .await,
        "a forged button left a request behind"
    );
    app.stop().await;
}

/// Arrival order (§1): updates that arrive in one `getUpdates` batch are
/// admitted in `update_id` order, so one user's messages are queued in the
/// order they were sent (they used to race, 16 at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_is_admitted_in_update_order() {
    let mut app = spawn_app(&[
        ("EASEL_MAX_PENDING_PER_USER", "20"),
        ("EASEL_RATE_LIMIT", "50/60"),
    ])
    .await;
    // A held request keeps flux busy, so every other one waits in line.
    app.tg.user_sends(9400, 9400, "/image=flux=a held blocker");
    assert!(app.text_to(9400, "Queued").await);
    app.stop().await;
    let u = 9401;
    for i in 0..12 {
        app.tg
            .user_sends(u, u, &format!("/image=flux=picture {i:02}"));
    }
    // All twelve wait for the next poll, which takes them as one batch.
    app.start().await;
    assert!(
        app.tg
            .wait_for(helpers::WAIT, |c| c
                .iter()
                .filter(|c| c.chat_id == Some(u)
                    && c.text.as_deref().is_some_and(|t| t.starts_with("Queued")))
                .count()
                == 12)
            .await
    );
    let queued: Vec<String> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { prompt, origin, .. } if origin.user_id.0 == u => {
                Some(prompt.as_str().to_owned())
            }
            _ => None,
        })
        .collect();
    let sent: Vec<String> = (0..12).map(|i| format!("picture {i:02}")).collect();
    assert_eq!(queued, sent, "queued out of the order sent");
    // And each reply names the place its message got.
    let mut positions: Vec<String> = app
        .tg
        .texts_to(u)
        .into_iter()
        .filter(|t| t.starts_with("Queued"))
        .collect();
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), 12, "{positions:?}");
    app.flux.release();
    app.stop().await;
}

/// A query client that connects and never sends (or sends a line with no
/// end) must not outlive the engine: its task holds the core and with it
/// the log's lock, which a restart must take again (the disk-full
/// self-heal reopened "in use" forever). An endless line is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_query_client_does_not_keep_the_log_after_a_stop() {
    use std::io::{Read, Write};
    let mut app = spawn_app(&[]).await;
    let socket = app.dir.path().join("easel.sock");
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut endless = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    endless.write_all(&vec![b'x'; 70 * 1024]).unwrap();
    let mut answer = String::new();
    endless
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = endless.read_to_string(&mut answer);
    assert_eq!(answer, "ERR the query is too long\n");
    app.stop().await;
    let log = easel::config::DataDir::new(app.dir.path()).log();
    let reopened = easel::store::SledStore::open_with_wait(&log, std::time::Duration::from_secs(5));
    assert!(
        reopened.is_ok(),
        "the log is still held: {:?}",
        reopened.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_only_commands_with_our_name_get_an_unknown_command_reply() {
    let mut app = spawn_app(&[]).await;
    let (u, group) = (4101, -100_4101);
    // Another bot's command, our unknown one addressed to us, and a
    // request (which answers): replies come in update order per chat.
    app.tg.user_sends(u, group, "/frobnicate");
    app.tg.user_sends(u, group, "/frobnicate@easel_demo_bot");
    app.tg
        .user_sends(u, group, "/image@easel_demo_bot=flux=a group fox");
    assert!(app.images_to(group, 1).await);
    let texts = app.tg.texts_to(group);
    let unknown = texts
        .iter()
        .filter(|t| t.starts_with("I don't know that command."))
        .count();
    assert_eq!(unknown, 1, "{texts:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enhancement_the_caption_says_the_prompt_is_the_users_own() {
    // No LLM configured: the original prompt is drawn.
    let mut app = spawn_app(&[("LLM_API_URL", "")]).await;
    let u = 10_101;
    app.tg.user_sends(u, u, "/image=sdxl=یک برکه آرام");
    assert!(app.images_to(u, 1).await);
    let photo = app.photo_calls(u).remove(0);
    assert_eq!(
        photo.caption.as_deref(),
        Some("🎨 sdxl · your prompt, as written\nیک برکه آرام")
    );
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_group_gets_at_most_20_edits_a_minute() {
    let mut app = spawn_app(&[]).await;
    let group = -100_7777;
    let users: Vec<i64> = (0..30).map(|i| 77_000 + i).collect();
    for u in &users {
        app.tg
            .user_sends(*u, group, "/image@easel_demo_bot=flux=a group sketch");
    }
    assert!(
        app.tg
            .wait_for(Duration::from_secs(600), |calls| calls
                .iter()
                .filter(|c| c.method == "sendPhoto" && c.chat_id == Some(group))
                .count()
                >= users.len())
            .await,
        "not all delivered"
    );
    // Every status ends as "Done ✅", within the group's budget: 30
    // edits at 20 a minute take a minute and a half.
    assert!(
        app.tg
            .wait_for(Duration::from_secs(600), |calls| calls
                .iter()
                .filter(|c| c.method == "editMessageText"
                    && c.chat_id == Some(group)
                    && c.text.as_deref().is_some_and(|t| t.ends_with("Done ✅")))
                .count()
                >= users.len())
            .await,
        "not every status reached Done"
    );
    let edits: Vec<tokio::time::Instant> = app
        .tg
        .calls()
        .iter()
        .filter(|c| c.method == "editMessageText" && c.chat_id == Some(group))
        .map(|c| c.at)
        .collect();
    assert!(
        edits.len() > 5,
        "the group's statuses were edited: {}",
        edits.len()
    );
    for (i, at) in edits.iter().enumerate() {
        let in_a_minute = edits[i..]
            .iter()
            .take_while(|t| t.duration_since(*at) < Duration::from_secs(60))
            .count();
        assert!(
            in_a_minute <= 20,
            "{in_a_minute} edits of the group within a minute"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_may_pass_on_a_retry_carries_the_again_button() {
    // sdxl's worker is down (nothing listens); flux refuses one prompt.
    let url = helpers::dead_url();
    let mut app = spawn_app(&[("SDXL_WORKER_URL", url.as_str())]).await;
    let u = 14_001;
    app.tg.user_sends(u, u, "/image=sdxl=a castle in fog");
    app.tg.user_sends(u, u, "/image=flux=something nsfw");
    let final_edit = |ending: &'static str| {
        move |calls: &[easel::demo::fake_telegram::Call]| {
            calls.iter().any(|c| {
                c.method == "editMessageText"
                    && c.chat_id == Some(u)
                    && c.text.as_deref().is_some_and(|t| t.ends_with(ending))
            })
        }
    };
    assert!(
        app.tg
            .wait_for(WAIT, final_edit("Please try again later."))
            .await
    );
    assert!(
        app.tg
            .wait_for(WAIT, final_edit("Try rephrasing it."))
            .await
    );
    let calls = app.tg.calls();
    let edit_of = |ending: &str| {
        calls
            .iter()
            .find(|c| {
                c.method == "editMessageText"
                    && c.text.as_deref().is_some_and(|t| t.ends_with(ending))
            })
            .unwrap()
            .clone()
    };
    // Unavailable may pass: 🔁 Again is offered, and only that.
    let down = edit_of("Please try again later.");
    let markup = down
        .reply_markup
        .clone()
        .expect("buttons on the failure")
        .to_string();
    assert!(
        markup.contains("again:") && !markup.contains("orig:"),
        "{markup}"
    );
    // The content filter will refuse the same prompt again: no button.
    assert!(edit_of("Try rephrasing it.").reply_markup.is_none());
    // Pressing it queues the same prompt again.
    let data = helpers::button_data(&down, 0);
    app.tg.user_presses(u, u, down.message_id.unwrap(), &data);
    assert!(
        app.notice_starting("Queued for sdxl").await,
        "{:#?}",
        app.tg.calls()
    );
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_generation_says_so_on_its_status() {
    // Backoff from 2 s (virtual time), so each retry shows long enough.
    let mut app = spawn_app(&[("EASEL_RETRY_BASE_MS", "2000")]).await;
    let u = 14_101;
    app.tg
        .user_sends(u, u, "/image=sdxl=a storm that will explode");
    // 2 + 4 + 8 s of backoff (with jitter), then the failure.
    let failed = app
        .tg
        .wait_for(Duration::from_secs(120), |calls| {
            calls.iter().any(|c| {
                c.method == "editMessageText"
                    && c.text
                        .as_deref()
                        .is_some_and(|t| t.ends_with("Please try again later."))
            })
        })
        .await;
    assert!(failed, "{:#?}", app.tg.calls());
    let edits: Vec<String> = app
        .tg
        .calls()
        .iter()
        .filter(|c| c.method == "editMessageText" && c.chat_id == Some(u))
        .filter_map(|c| c.text.clone())
        .collect();
    assert!(
        edits
            .iter()
            .any(|t| t.starts_with("sdxl: Generating… retry ") && t.ends_with(" of 3")),
        "{edits:?}"
    );
    app.stop().await;
}

/// §2 Language: a user whose Telegram is set to Persian is answered in
/// Persian (Persian digits, Latin names isolated), from the first reply to
/// the caption and the buttons, across a restart (the language is
/// recorded with the request); a user without a language code beside them
/// is answered in English; the command menu exists in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persian_speaking_user_is_answered_in_persian() {
    let mut app = spawn_app(&[]).await;
    let (sara, tom) = (14_001, 14_002);
    app.tg.set_language(sara, "fa");
    // The menu: English for everyone, Persian for Persian-speaking users.
    assert!(
        app.tg
            .wait_for(WAIT, |c| c
                .iter()
                .filter(|c| c.method == "setMyCommands")
                .count()
                == 2)
            .await
    );
    let menus: Vec<_> = app
        .tg
        .calls()
        .into_iter()
        .filter(|c| c.method == "setMyCommands")
        .collect();
    let menu = |code: Option<&str>| {
        menus
            .iter()
            .find(|c| c.params.get("language_code").and_then(|v| v.as_str()) == code)
            .map(|c| c.params["commands"].to_string())
            .unwrap_or_else(|| panic!("no menu for {code:?}: {menus:#?}"))
    };
    assert!(menu(None).contains("how to use this bot"), "{}", menu(None));
    assert!(
        menu(Some("fa")).contains("راهنمای این ربات"),
        "{}",
        menu(Some("fa"))
    );

    app.tg.user_sends(sara, sara, "/help");
    assert!(
        app.text_to(sara, "من توضیح شما را به تصویر تبدیل می‌کنم")
            .await
    );
    assert!(app.text_to(sara, "۱۰۰۰ نویسه").await);
    app.tg.user_sends(sara, sara, "/image=dalle=گربه");
    assert!(
        app.text_to(sara, "مدلی به نام «\u{2068}dalle\u{2069}» وجود ندارد")
            .await
    );

    // A request held at the worker, then one queued behind it; a restart.
    app.tg
        .user_sends(sara, sara, "/image=flux=held روباه قرمز در برف");
    assert!(
        app.text_to(sara, "در صف \u{2068}flux\u{2069} — نوبت ۱")
            .await
    );
    app.tg.user_sends(tom, tom, "/image=flux=a red fox");
    assert!(app.text_to(tom, "Queued for flux — position ").await);
    app.tg.user_sends(sara, sara, "/image=flux=گربه‌ای روی ماه");
    // Behind Tom: position 2 or 3 (the first may have left the queue).
    assert!(
        app.tg
            .wait_for(WAIT, |c| c.iter().any(|c| c.chat_id == Some(sara)
                && c.text.as_deref().is_some_and(
                    |t| t.ends_with("نوبت ۲") || t.ends_with("نوبت ۳")
                )))
            .await,
        "{:#?}",
        app.tg.texts_to(sara)
    );
    app.tg.user_sends(sara, sara, "/queue");
    assert!(app.text_to(sara, "درخواست‌های شما:").await);
    assert!(
        app.tg
            .wait_for(WAIT, |_| app.flux.stats.in_flight.load(Ordering::SeqCst)
                == 1)
            .await
    );
    app.restart().await;
    app.flux.release();
    assert!(app.images_to(sara, 2).await, "{:#?}", app.tg.calls());
    assert!(app.images_to(tom, 1).await);
    for photo in app.photo_calls(sara) {
        let caption = photo.caption.unwrap_or_default();
        assert!(
            caption.starts_with("🎨 \u{2068}flux\u{2069}\n"),
            "{caption}"
        );
        let markup = photo.reply_markup.unwrap().to_string();
        assert!(
            markup.contains("🔁 دوباره") && markup.contains("📄 فایل اصلی"),
            "{markup}"
        );
    }
    assert!(app.any_message_ends_with(sara, "انجام شد ✅").await);
    // Tom, beside her, without a language code: English throughout.
    assert!(app.status_ends_with(tom, 0, "Done ✅").await);
    let toms = app.photo_calls(tom).remove(0);
    assert!(toms.caption.unwrap_or_default().starts_with("🎨 flux\n"));
    assert!(toms.reply_markup.unwrap().to_string().contains("🔁 Again"));
    // The language is in the record, for the audit and the export.
    let languages: Vec<Option<String>> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { origin, .. } => Some(origin.language),
            _ => None,
        })
        .collect();
    assert_eq!(
        languages,
        [Some("fa".to_owned()), None, Some("fa".to_owned())],
        "{languages:?}"
    );
    // 🔁 Again, pressed by her: the notice is Persian too.
    let photo = app.photo_calls(sara).remove(0);
    app.tg.user_presses(
        sara,
        sara,
        photo.message_id.unwrap(),
        &helpers::button_data(&photo, 0),
    );
    assert!(
        app.notice_starting("در صف \u{2068}flux\u{2069} — نوبت ")
            .await,
        "{:#?}",
        app.tg.calls()
    );
    assert!(app.images_to(sara, 3).await);
    // An id copied out of a Persian reply, typed with Persian digits:
    // /cancel still reads it (nothing is queued now, so it says so).
    app.tg.user_sends(sara, sara, "/cancel ۰۱۲\u{2069}");
    assert!(
        app.text_to(sara, "«\u{2068}012\u{2069}»").await,
        "{:#?}",
        app.tg.texts_to(sara)
    );
    app.stop().await;
}

/// §8 Presets: applied before enhancement when the name is configured
/// (any case), refused on a model it is not for, listed by /presets,
/// recorded with the request (name and the user's own words), kept by 🔁
/// Again; text that merely has an `=` stays the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_is_applied_recorded_and_kept_by_again() {
    let toml = r#"
[presets.anime]
template = "{prompt}, anime style, cel shading"
[presets.photo]
template = "a photograph of {prompt}"
models = ["sdxl"]
"#;
    let mut app = helpers::spawn_app_with(&[], Some(toml)).await;
    let u = 15_001;
    app.tg.user_sends(u, u, "/presets");
    assert!(app.text_to(u, "• anime: /image=flux=anime=a red fox").await);
    assert!(
        app.text_to(u, "• photo (only sdxl): /image=sdxl=photo=")
            .await
    );
    app.tg.user_sends(u, u, "/image=flux=photo=a dog");
    assert!(app.text_to(u, "Preset photo is only for sdxl.").await);

    app.tg.user_sends(u, u, "/image=flux=Anime=a cat on a roof");
    assert!(app.images_to(u, 1).await, "{:#?}", app.tg.calls());
    let drawn = app.flux.stats.prompts.lock().unwrap().clone();
    assert!(
        drawn[0].starts_with("a cat on a roof, anime style, cel shading"),
        "{drawn:?}"
    );
    app.tg.user_sends(u, u, "/image=flux=e=mc2, a chalkboard");
    assert!(app.images_to(u, 2).await);
    let drawn = app.flux.stats.prompts.lock().unwrap().clone();
    assert!(drawn[1].starts_with("e=mc2, a chalkboard"), "{drawn:?}");

    // 🔁 Again under the preset's image draws the same, preset recorded.
    let photo = app.photo_calls(u).remove(0);
    app.tg.user_presses(
        u,
        u,
        photo.message_id.unwrap(),
        &helpers::button_data(&photo, 0),
    );
    assert!(app.images_to(u, 3).await);
    let drawn = app.flux.stats.prompts.lock().unwrap().clone();
    assert_eq!(drawn[2], drawn[0]);
    let queued: Vec<(String, Option<easel::domain::PresetUse>)> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { prompt, preset, .. } => {
                Some((prompt.as_str().to_owned(), preset))
            }
            _ => None,
        })
        .collect();
    let anime = Some(easel::domain::PresetUse {
        name: "anime".into(),
        prompt: "a cat on a roof".into(),
    });
    assert_eq!(
        queued,
        [
            (
                "a cat on a roof, anime style, cel shading".to_owned(),
                anime.clone()
            ),
            ("e=mc2, a chalkboard".to_owned(), None),
            (
                "a cat on a roof, anime style, cel shading".to_owned(),
                anime
            ),
        ]
    );
    app.stop().await;
}

/// §8 Remembered model: `/model <name>` is an event in the log; `/image
/// <prompt>` and `/image=<prompt>` use it, across a restart; before any
/// choice the first configured model draws; `/model` says which is used;
/// replay verifies every request's remembered model was the choice in
/// force when it was queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_model_survives_a_restart_and_applies_to_later_requests() {
    let mut app = spawn_app(&[("EASEL_RATE_LIMIT", "20/60")]).await;
    let u = 15_101;
    app.tg.user_sends(u, u, "/model");
    assert!(
        app.text_to(
            u,
            "You have not chosen a model; /image <prompt> draws with flux."
        )
        .await
    );
    app.tg.user_sends(u, u, "/image a fox before any choice");
    assert!(app.images_to(u, 1).await);
    app.tg.user_sends(u, u, "/model dalle");
    assert!(app.text_to(u, "There is no model called \"dalle\"").await);
    app.tg.user_sends(u, u, "/model SDXL");
    assert!(
        app.text_to(u, "From now on /image <prompt> draws with sdxl.")
            .await
    );
    app.restart().await;
    app.tg.user_sends(u, u, "/image=an owl after the restart");
    assert!(app.images_to(u, 2).await, "{:#?}", app.tg.calls());
    app.tg.user_sends(u, u, "/model");
    assert!(app.text_to(u, "Your model: sdxl.").await);
    // Naming a model still wins.
    app.tg.user_sends(u, u, "/image=flux=a named flux");
    assert!(app.images_to(u, 3).await);
    let captions: Vec<String> = app
        .photo_calls(u)
        .into_iter()
        .filter_map(|c| c.caption)
        .collect();
    assert!(
        captions[0].starts_with("🎨 flux\na fox before any choice"),
        "{captions:?}"
    );
    assert!(
        captions[1].starts_with("🎨 sdxl\nan owl after the restart"),
        "{captions:?}"
    );
    assert!(captions[2].starts_with("🎨 flux\n"), "{captions:?}");
    // In the log: the choice, and which request used it.
    let log: Vec<(String, bool)> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued {
                model, remembered, ..
            } => Some((model.to_string(), remembered)),
            easel::domain::Event::ModelChosen { model, .. } => {
                Some((format!("chose {model}"), false))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        log,
        [
            ("flux".to_owned(), false),
            ("chose sdxl".to_owned(), false),
            ("sdxl".to_owned(), true),
            ("flux".to_owned(), false),
        ]
    );
    let report = easel::ops::verify(app.core().store().read_from(1)).unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    app.stop().await;
}

/// §8 Image to image: `/image=…` as a photo's caption, or as a reply to a
/// photo, draws from that photo on a model with `img2img = true` (its POST
/// body gets the image and the configured strength); the input is kept on
/// disk before "queued" and recorded; 🔁 Again reuses it; a model without
/// img2img and a photo over 20 MB are refused with a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_to_image_from_a_caption_and_from_a_reply() {
    let probe = easel::demo::fake_services::FakeWorker::sdxl(helpers::SDXL_KEY, Duration::ZERO)
        .await
        .unwrap();
    let toml = format!(
        "[[models]]\nname = \"paint\"\nurl = \"{}\"\nprotocol = \"sdxl-post\"\nkey_env = \"SDXL_API_KEY\"\nimg2img = true\nstrength = 0.45\n",
        probe.url
    );
    let mut app = helpers::spawn_app_with(&[], Some(&toml)).await;
    let u = 15_201;
    let photo = easel::demo::png::png(64, 48, 7);
    let (_, photo_msg) = app.tg.user_sends_photo(
        u,
        u,
        Some("/image=paint=the same, in snow"),
        &photo,
        photo.len(),
    );
    assert!(app.images_to(u, 1).await, "{:#?}", app.tg.calls());
    app.tg
        .user_replies(u, u, photo_msg, "/image=paint=the same, at night");
    assert!(app.images_to(u, 2).await, "{:#?}", app.tg.calls());
    let inputs = probe.stats.inputs.lock().unwrap().clone();
    assert_eq!(
        inputs,
        [Some((photo.clone(), 0.45)), Some((photo.clone(), 0.45))]
    );

    // The input is in the record and on disk; 🔁 Again draws from it again.
    let queued: Vec<easel::domain::ImageRef> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Queued { input, .. } => input,
            _ => None,
        })
        .collect();
    assert_eq!(queued.len(), 2);
    for input in &queued {
        assert!(input.file.starts_with("input-"), "{input:?}");
        let on_disk = std::fs::read(app.dir.path().join("images").join(&input.file)).unwrap();
        assert_eq!(on_disk, photo);
    }
    let first = app.photo_calls(u).remove(0);
    app.tg.user_presses(
        u,
        u,
        first.message_id.unwrap(),
        &helpers::button_data(&first, 0),
    );
    assert!(app.images_to(u, 3).await);
    assert_eq!(
        probe.stats.inputs.lock().unwrap()[2],
        Some((photo.clone(), 0.45))
    );

    // Refusals, each a reply; nothing reaches a worker.
    let calls = probe.stats.calls.load(Ordering::SeqCst);
    app.tg
        .user_sends_photo(u, u, Some("/image=flux=a fox"), &photo, photo.len());
    assert!(
        app.text_to(u, "flux cannot start from a photo. Models that can: paint.")
            .await
    );
    assert_eq!(probe.stats.calls.load(Ordering::SeqCst), calls);
    // A photo whose largest size is over the 20 MB a bot may fetch: the
    // largest size within it is used.
    app.tg
        .user_sends_photo(u, u, Some("/image=paint=huge"), &photo, 25_000_000);
    assert!(app.images_to(u, 4).await, "{:?}", app.tg.texts_to(u));
    let gets: Vec<String> = app
        .tg
        .calls()
        .iter()
        .filter(|c| c.method == "getFile")
        .filter_map(|c| {
            c.params
                .get("file_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    assert!(gets.last().is_some_and(|id| id.ends_with('s')), "{gets:?}");
    assert!(gets[..2].iter().all(|id| id.ends_with('l')), "{gets:?}");
    assert_eq!(app.flux.stats.calls.load(Ordering::SeqCst), 0);
    app.stop().await;
}

fn album_calls(app: &helpers::TestApp, chat: i64) -> Vec<easel::demo::fake_telegram::Call> {
    app.tg
        .calls()
        .into_iter()
        .filter(|c| c.method == "sendMediaGroup" && c.chat_id == Some(chat))
        .collect()
}

/// §8 Variations: `/image=flux*3=…` is one request, three generations one
/// after the other in flux's lane; one fails and the others still arrive
/// as one album (caption on the first) with a follow-up that says what
/// failed and carries 🔁 Again; the request counts 3 toward the rate
/// limit; a count out of range is a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_variations_arrive_as_one_album_even_when_one_fails() {
    let mut app = spawn_app(&[]).await;
    let u = 15_301;
    app.tg.user_sends(u, u, "/image=flux*9=too many");
    assert!(
        app.text_to(u, "Ask for 2 to 4 images, e.g. /image=flux*3=a cat.")
            .await
    );
    app.flux.stats.reject_calls.lock().unwrap().push(2);
    app.tg.user_sends(u, u, "/image=flux*3=a lighthouse in fog");
    assert!(
        app.tg
            .wait_for(WAIT, |c| c.iter().any(|c| c.method == "sendMediaGroup"))
            .await,
        "{:#?}",
        app.tg.calls()
    );
    let album = album_calls(&app, u).remove(0);
    let media = album.params["media"].as_array().unwrap().clone();
    assert_eq!(media.len(), 2, "{media:?}");
    assert!(media.iter().all(|m| m["type"] == "photo"));
    assert!(
        media[0]["caption"]
            .as_str()
            .unwrap()
            .starts_with("🎨 flux\na lighthouse in fog"),
        "{media:?}"
    );
    assert!(
        media[1]
            .get("caption")
            .is_none_or(serde_json::Value::is_null)
    );
    assert!(
        app.text_to(
            u,
            "🎨 flux · 2 of 3 images\nImage 2 failed: the model's content filter rejected this prompt."
        )
        .await,
        "{:?}",
        app.tg.texts_to(u)
    );
    assert!(app.status_ends_with(u, 0, "Done ✅").await);
    assert_eq!(app.flux.stats.calls.load(Ordering::SeqCst), 3);
    assert_eq!(app.flux.stats.max_in_flight.load(Ordering::SeqCst), 1);
    // The log: three variation events in order, then generated, delivered.
    let names: Vec<String> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .map(|r| match r.event {
            easel::domain::Event::Variation { index, image, .. } => {
                format!(
                    "variation {index} {}",
                    if image.is_some() { "kept" } else { "failed" }
                )
            }
            e => e.name().to_owned(),
        })
        .collect();
    assert_eq!(
        names,
        [
            "queued",
            "started",
            "enhanced",
            "variation 1 kept",
            "variation 2 failed",
            "variation 3 kept",
            "generated",
            "delivered"
        ]
    );
    // 3 of the 5 per minute are used: another 3 is too many, 2 fit.
    app.tg.user_sends(u, u, "/image=flux*3=three more");
    assert!(app.text_to(u, "You're sending requests too fast.").await);
    // 🔁 Again under the album asks for 3 again: refused by the same rule.
    let footer = app
        .tg
        .calls()
        .into_iter()
        .find(|c| {
            c.method == "sendMessage"
                && c.text.as_deref().is_some_and(|t| t.contains("of 3 images"))
        })
        .unwrap();
    let again = footer.reply_markup.as_ref().unwrap()["inline_keyboard"][0][0]["callback_data"]
        .as_str()
        .unwrap()
        .to_owned();
    app.tg
        .user_presses(u, u, footer.message_id.unwrap(), &again);
    assert!(
        app.notice_starting("You're sending requests too fast.")
            .await
    );
    let report = easel::ops::verify(app.core().store().read_from(1)).unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    app.stop().await;
}

/// §8 Variations across a restart: images already made are kept, not made
/// again — the generation resumes at the first missing image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_album_resumes_at_the_first_missing_image() {
    let mut app = spawn_app(&[]).await;
    let u = 15_401;
    // The worker's second call (image 2) waits; the restart comes then.
    app.flux.stats.hold_calls.lock().unwrap().push(2);
    app.tg.user_sends(u, u, "/image=flux*3=paper boats");
    assert!(
        app.tg
            .wait_for(WAIT, |_| app.flux.stats.calls.load(Ordering::SeqCst) == 2
                && app.flux.stats.in_flight.load(Ordering::SeqCst) == 1)
            .await
    );
    assert!(
        app.eventually(|a| a
            .core()
            .read(|s| s.requests().any(|r| r.variations.len() == 1)))
            .await
    );
    app.restart().await;
    app.flux.release();
    assert!(
        app.tg
            .wait_for(WAIT, |c| c.iter().any(|c| c.method == "sendMediaGroup"))
            .await
    );
    let media = album_calls(&app, u).remove(0).params["media"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(media, 3);
    // Image 1 once; image 2 twice (the restart cut its call); image 3 once.
    assert_eq!(app.flux.stats.calls.load(Ordering::SeqCst), 4);
    let indices: Vec<u32> = app
        .core()
        .store()
        .read_from(1)
        .filter_map(Result::ok)
        .filter_map(|r| match r.event {
            easel::domain::Event::Variation { index, .. } => Some(index),
            _ => None,
        })
        .collect();
    assert_eq!(indices, [1, 2, 3]);
    app.stop().await;
}

/// §7 readiness follows Telegram: a call that cannot get an answer (502s
/// until the reply policy gives up) makes `/readyz` say Telegram cannot be
/// reached; the next answered call makes it ready again. Paused time: the
/// client's backoff between the 502s takes no real time.
#[tokio::test(start_paused = true)]
async fn readiness_follows_whether_telegram_answers() {
    use easel::demo::fake_telegram::{Failure, FakeTelegram};
    use easel::health::{Health, Part};
    use easel::telegram::replies::Reply;
    let tg = FakeTelegram::start(TOKEN).await.unwrap();
    let health = std::sync::Arc::new(Health::default());
    health.set(Part::Engine, None);
    let api = easel::telegram::api::TelegramApi::new(
        secrecy::SecretString::from(TOKEN.to_owned()),
        tg.url.parse().unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .unwrap()
    .with_health(std::sync::Arc::clone(&health));
    let to = Reply {
        chat: 42,
        to_message: None,
    };
    api.send_text(to, "hello".into()).await.unwrap();
    assert_eq!(health.ready(), Ok(()));
    tg.fail_next("sendMessage", 3, Failure::Status(502, "Bad Gateway".into()));
    assert!(api.send_text(to, "lost".into()).await.is_err());
    assert_eq!(health.ready(), Err("Telegram cannot be reached".into()));
    // An answer, even a refusal, means Telegram is there.
    tg.fail_next(
        "sendMessage",
        1,
        Failure::Status(400, "Bad Request: chat not found".into()),
    );
    assert!(api.send_text(to, "refused".into()).await.is_err());
    assert_eq!(health.ready(), Ok(()));
}

/// §7 `/readyz` says why it is not ready, one line, with `503`; `/healthz`
/// stays `200`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_why_it_is_not_ready() {
    use easel::health::{Health, Part};
    let health = std::sync::Arc::new(Health::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics = std::sync::Arc::new(easel::metrics::Metrics::new());
    let served = easel::health::serve(
        addr,
        std::sync::Arc::clone(&health),
        metrics,
        None,
        stop.clone(),
    )
    .await
    .unwrap();
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "not ready: starting\n");
    health.set(Part::Engine, None);
    health.set(Part::Telegram, None);
    health.set(
        Part::Log,
        Some("the event log refuses writes (disk full)".into()),
    );
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.text().await.unwrap(),
        "not ready: the event log refuses writes (disk full)\n"
    );
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let m = get("/metrics").await.unwrap();
    assert_eq!(m.status(), 200);
    assert_eq!(
        m.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = m.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    health.set(Part::Log, None);
    let r = get("/readyz").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "ready\n".to_owned())
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the listener stops")
        .unwrap();
}

/// §7 operator alerts, end to end: with the sdxl worker's key revoked,
/// four requests fail and the operator's chat gets one alert (not one per
/// request, and no second "failing in a row" alert for the same trouble);
/// each user's failure says the operator has been told; once the key works
/// again, the next image brings one recovery message. Nothing in either
/// message is a secret or a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_alerts_the_operator_once_and_its_recovery_once() {
    const OPERATOR: i64 = 777_000;
    let app = spawn_app(&[("EASEL_OPERATOR_CHAT_ID", "777000")]).await;
    app.sdxl.revoke_key(true);
    let users = [5101, 5102, 5103, 5104];
    for (i, user) in users.iter().enumerate() {
        app.tg
            .user_sends(*user, *user, &format!("/image=sdxl=a revoked fox {i}"));
        assert!(
            app.status_ends_with(*user, 0, "The bot's operator has been told.")
                .await,
            "{:?}",
            app.tg.texts_to(*user)
        );
    }
    assert!(app.text_to(OPERATOR, "refuses our key").await);
    app.sdxl.revoke_key(false);
    app.tg.user_sends(5105, 5105, "/image=sdxl=a forgiven fox");
    assert!(app.images_to(5105, 1).await);
    assert!(app.text_to(OPERATOR, "recovered").await);
    // Three more requests of another model change nothing for sdxl.
    app.tg.user_sends(5106, 5106, "/image=flux=a calm fox");
    assert!(app.images_to(5106, 1).await);
    let told = app.tg.texts_to(OPERATOR);
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(
        told[0].starts_with("⚠️ easel: the sdxl worker refuses our key (HTTP 401)."),
        "{told:?}"
    );
    assert!(
        told[1].starts_with("✅ easel recovered: the sdxl worker accepts our key again"),
        "{told:?}"
    );
    for text in &told {
        for leak in [SDXL_KEY, TOKEN, "http://", "127.0.0.1"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
    }
    // A failure while no alert is on asks the user to tell the operator.
    app.tg.user_sends(5107, 5107, "/image=sdxl=something nsfw");
    assert!(app.status_ends_with(5107, 0, "Try rephrasing it.").await);
}

/// §7 alerts are rate limited per cause: an episode is told once; a cause
/// raised again within ten minutes of its last alert is told when the ten
/// minutes end (if it is still on), another cause at once; a recovery only
/// follows an alert that went out; a short Telegram outage says nothing, a
/// long one is told once Telegram answers. Paused time over the FAKE
/// Telegram.
#[tokio::test(start_paused = true)]
async fn alerts_are_told_once_per_cause_and_ten_minutes() {
    use easel::alerts::{Alerts, Cause, WINDOW};
    use easel::demo::fake_telegram::FakeTelegram;
    use easel::domain::ModelName;
    use std::sync::Arc;
    const OPERATOR: i64 = 4242;
    let tg = FakeTelegram::start(TOKEN).await.unwrap();
    let api = Arc::new(
        easel::telegram::api::TelegramApi::new(
            secrecy::SecretString::from(TOKEN.to_owned()),
            tg.url.parse().unwrap(),
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap(),
    );
    let metrics = Arc::new(easel::metrics::Metrics::new());
    let alerts = Arc::new(Alerts::new(Some(OPERATOR), Arc::clone(&metrics)));
    alerts.send_with(&api);
    let sdxl = ModelName::parse("sdxl").unwrap();
    let key = || Cause::WorkerKey(sdxl.clone());
    let sent = || tg.texts_to(OPERATOR);

    alerts.raise(key(), "key 1".into()).await;
    alerts.raise(key(), "key 2".into()).await;
    assert_eq!(sent(), ["key 1"]);
    assert!(alerts.told(&sdxl));
    alerts.clear(key()).await;
    assert!(!alerts.told(&sdxl));
    assert_eq!(sent().len(), 2);
    assert!(sent()[1].starts_with("✅ easel recovered: the sdxl worker accepts our key again"));
    // On again within the window: told at its end, once.
    alerts.raise(key(), "key 3".into()).await;
    alerts.raise(key(), "key 4".into()).await;
    assert_eq!(sent().len(), 2);
    assert!(!alerts.told(&sdxl));
    // Another cause is not held back by this one's window.
    alerts.raise(Cause::LogRefuses, "disk".into()).await;
    assert_eq!(sent().len(), 3);
    tokio::time::sleep(WINDOW).await;
    assert!(
        tg.wait_for(Duration::from_secs(5), |calls| told_to(calls, OPERATOR)
            == 4)
            .await
    );
    assert_eq!(sent()[3], "key 4");
    assert!(alerts.told(&sdxl));
    // Raised and cleared within the window: nothing at its end, no recovery.
    alerts.clear(key()).await;
    assert_eq!(sent().len(), 5);
    alerts.raise(key(), "key 5".into()).await;
    alerts.clear(key()).await;
    tokio::time::sleep(WINDOW * 2).await;
    assert_eq!(sent().len(), 5, "{:?}", sent());
    // A cleared cause whose alert never went out tells no recovery.
    alerts.clear(Cause::ModelFailing(sdxl.clone())).await;
    assert_eq!(sent().len(), 5);

    // Telegram: a one-minute outage is not worth a message, a long one is
    // told once it answers again.
    alerts.telegram_reachable(false);
    tokio::time::sleep(Duration::from_secs(60)).await;
    alerts.telegram_reachable(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sent().len(), 5);
    alerts.telegram_reachable(false);
    tokio::time::sleep(Duration::from_secs(7 * 60)).await;
    alerts.telegram_reachable(true);
    assert!(
        tg.wait_for(Duration::from_secs(5), |calls| told_to(calls, OPERATOR)
            == 6)
            .await
    );
    assert!(
        sent()[5].starts_with("⚠️ easel: Telegram could not be reached for 7 minutes"),
        "{:?}",
        sent()
    );
    let text = metrics.render();
    assert!(
        text.contains("easel_operator_alerts_total{cause=\"worker_key\",kind=\"alert\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("easel_operator_alerts_total{cause=\"worker_key\",kind=\"recovered\"} 2"),
        "{text}"
    );
}

/// Messages sent to `chat` among `calls`.
fn told_to(calls: &[easel::demo::fake_telegram::Call], chat: i64) -> usize {
    calls
        .iter()
        .filter(|c| c.method == "sendMessage" && c.chat_id == Some(chat))
        .count()
}

/// Without `EASEL_OPERATOR_CHAT_ID` nothing is sent and nothing is said
/// to be told.
#[tokio::test]
async fn without_an_operator_chat_no_alert_is_sent_or_claimed() {
    use easel::alerts::{Alerts, Cause};
    let alerts = std::sync::Arc::new(Alerts::new(
        None,
        std::sync::Arc::new(easel::metrics::Metrics::new()),
    ));
    let sdxl = easel::domain::ModelName::parse("sdxl").unwrap();
    alerts
        .raise(Cause::WorkerKey(sdxl.clone()), "key".into())
        .await;
    assert!(!alerts.told(&sdxl));
}
