//! End to end: the real bot (app::start) against a FAKE Telegram Bot API
//! server, FAKE flux and sdxl workers and a FAKE LLM, all on loopback.

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
    assert_eq!(
        photo.caption.as_deref(),
        Some("a red fox in the snow, highly detailed, soft cinematic light")
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
