//! The outside services over real HTTP on loopback: wiremock servers act as
//! FAKE flux and sdxl workers and a FAKE OpenAI-compatible LLM. Every answer
//! row of §4 for both protocols, retries and Retry-After, timeouts, refused
//! connections, the bearer key, and every enhancer failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use easel::config::Settings;
use easel::domain::{FailureKind, ModelName};
use easel::engine::{Enhancer, GeneratedImage, GenerationFailure, Generator};
use easel::services::{ImageWorkers, LlmEnhancer, build_client};
use wiremock::matchers::{any, bearer_token, body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR-fake-png";
const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F'];
const WEBP: &[u8] = b"RIFF\x24\x00\x00\x00WEBPVP8 fake";
const SDXL_KEY: &str = "sk-test-sdxl-key-42";
const LLM_KEY: &str = "llm-test-key-77";

fn settings(vars: &[(&str, String)]) -> Settings {
    let mut env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    env.entry("EASEL_RETRY_BASE_MS".into())
        .or_insert_with(|| "1".into());
    Settings::from_sources(|k| env.get(k).cloned(), None).expect("valid test settings")
}

/// Workers for a fake flux at `flux` and a fake sdxl at `sdxl`.
fn workers(flux: &str, sdxl: &str, key: &str, read_timeout: Duration) -> ImageWorkers {
    let s = settings(&[
        ("FLUX_WORKER_URL", format!("{flux}/flux")),
        ("SDXL_WORKER_URL", format!("{sdxl}/sdxl")),
        ("SDXL_API_KEY", key.to_owned()),
    ]);
    let client = build_client(Duration::from_secs(2), read_timeout).unwrap();
    ImageWorkers::from_parts(client, s.models.clone(), s.retry_base, read_timeout)
}

fn model(name: &str) -> ModelName {
    ModelName::parse(name).unwrap()
}

/// Mounts `answer` on both fake workers' routes.
async fn fake_worker(answer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/flux"))
        .respond_with(answer.clone())
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/sdxl"))
        .and(bearer_token(SDXL_KEY))
        .respond_with(answer)
        .mount(&server)
        .await;
    server
}

async fn both(answer: ResponseTemplate) -> Vec<(Result<GeneratedImage, GenerationFailure>, usize)> {
    let server = fake_worker(answer).await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_secs(5),
    );
    let mut out = Vec::new();
    for name in ["flux", "sdxl"] {
        let before = server.received_requests().await.unwrap().len();
        let r = w.generate(&model(name), "a red fox", None).await;
        let calls = server.received_requests().await.unwrap().len() - before;
        out.push((r, calls));
    }
    out
}

fn failure(r: &Result<GeneratedImage, GenerationFailure>) -> &GenerationFailure {
    r.as_ref().expect_err("expected a failure")
}

#[tokio::test]
async fn raw_png_jpeg_and_webp_are_images() {
    for (bytes, format) in [(PNG, "png"), (JPEG, "jpeg"), (WEBP, "webp")] {
        for (r, calls) in both(ResponseTemplate::new(200).set_body_bytes(bytes)).await {
            let img = r.unwrap();
            assert_eq!(
                (
                    img.bytes.as_slice(),
                    img.format.as_str(),
                    img.attempts,
                    calls
                ),
                (bytes, format, 1, 1)
            );
            assert_eq!(img.statuses, vec!["200"]);
        }
    }
}

#[tokio::test]
async fn json_base64_is_an_image_too() {
    let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
    for (r, _) in
        both(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "image": b64 }))).await
    {
        assert_eq!(r.unwrap().bytes, PNG);
    }
    // Workers AI wraps it in "result".
    let wrapped = serde_json::json!({ "result": { "image": b64 }, "success": true });
    for (r, _) in both(ResponseTemplate::new(200).set_body_json(wrapped)).await {
        assert_eq!(r.unwrap().format, "png");
    }
}

#[tokio::test]
async fn a_200_that_is_not_an_image_is_a_worker_error_retried_then_bad_answer() {
    let html = ResponseTemplate::new(200)
        .insert_header("content-type", "image/png")
        .set_body_string("<html>oops</html>");
    for (r, calls) in both(html).await {
        let f = failure(&r);
        assert_eq!((f.kind, f.attempts, calls), (FailureKind::BadAnswer, 4, 4));
        assert!(f.reason.contains("not an image"), "{}", f.reason);
    }
    let not_image_b64 =
        serde_json::json!({ "image": base64::engine::general_purpose::STANDARD.encode("hello") });
    for (r, _) in both(ResponseTemplate::new(200).set_body_json(not_image_b64)).await {
        assert_eq!(failure(&r).kind, FailureKind::BadAnswer);
    }
    for (r, _) in
        both(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "error": "busy" }))).await
    {
        assert_eq!(failure(&r).kind, FailureKind::BadAnswer);
    }
}

#[tokio::test]
async fn server_errors_are_retried_three_times_then_unavailable() {
    for status in [500, 502, 503] {
        for (r, calls) in both(ResponseTemplate::new(status)).await {
            let f = failure(&r);
            assert_eq!(
                (f.kind, f.attempts, calls),
                (FailureKind::Unavailable, 4, 4)
            );
            assert_eq!(f.statuses, vec![status.to_string(); 4]);
        }
    }
}

#[tokio::test]
async fn a_retry_that_succeeds_records_every_attempt() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_bytes(PNG))
        .with_priority(2)
        .mount(&server)
        .await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_secs(5),
    );
    let img = w.generate(&model("flux"), "fox", None).await.unwrap();
    assert_eq!(
        (img.attempts, img.statuses),
        (3, vec!["503".to_owned(), "503".into(), "200".into()])
    );
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_bytes(PNG))
        .with_priority(2)
        .mount(&server)
        .await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_secs(5),
    );
    let started = Instant::now();
    let img = w.generate(&model("sdxl"), "fox", None).await.unwrap();
    // The backoff base is 1 ms: only Retry-After explains a wait of ~1 s.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(img.statuses, vec!["429", "200"]);
    // A 429 that never ends is "unavailable" after 4 attempts.
    for (r, calls) in both(ResponseTemplate::new(429)).await {
        assert_eq!((failure(&r).kind, calls), (FailureKind::Unavailable, 4));
    }
}

#[tokio::test]
async fn the_content_filter_is_not_retried() {
    for (status, body) in [
        (451, "unavailable for legal reasons"),
        (
            400,
            "{\"errors\":[{\"code\":3030,\"message\":\"Input prompt contains NSFW content\"}]}",
        ),
        (422, "Prompt FLAGGED by moderation"),
        (403, "blocked by Safety checker"),
    ] {
        for (r, calls) in both(ResponseTemplate::new(status).set_body_string(body)).await {
            let f = failure(&r);
            assert_eq!(
                (f.kind, f.attempts, calls),
                (FailureKind::Rejected, 1, 1),
                "{status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn other_client_errors_are_not_retried() {
    for status in [400, 401, 403, 404] {
        for (r, calls) in both(ResponseTemplate::new(status).set_body_string("bad request")).await {
            let f = failure(&r);
            assert_eq!(
                (f.kind, f.attempts, calls),
                (FailureKind::Refused, 1, 1),
                "{status}"
            );
        }
    }
    for (r, calls) in both(ResponseTemplate::new(408)).await {
        assert_eq!((failure(&r).kind, calls), (FailureKind::TimedOut, 1));
    }
}

#[tokio::test]
async fn a_read_timeout_is_retried_then_timed_out() {
    let server = fake_worker(
        ResponseTemplate::new(200)
            .set_body_bytes(PNG)
            .set_delay(Duration::from_secs(3)),
    )
    .await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_millis(200),
    );
    for name in ["flux", "sdxl"] {
        let f = w.generate(&model(name), "fox", None).await.unwrap_err();
        assert_eq!((f.kind, f.attempts), (FailureKind::TimedOut, 4));
        assert_eq!(f.statuses, vec!["timeout"; 4]);
    }
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_unavailable() {
    // A port that was just free: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let w = workers(&url, &url, SDXL_KEY, Duration::from_secs(1));
    for name in ["flux", "sdxl"] {
        let f = w.generate(&model(name), "fox", None).await.unwrap_err();
        assert_eq!((f.kind, f.attempts), (FailureKind::Unavailable, 4));
        assert!(
            !f.reason.contains(&port.to_string()),
            "the reason names the URL: {}",
            f.reason
        );
    }
}

#[tokio::test]
async fn each_protocol_speaks_its_own_shape() {
    let server = MockServer::start().await;
    let prompt = "a=b & c? روباه 🦊";
    Mock::given(method("GET"))
        .and(path("/flux"))
        .and(query_param("prompt", prompt))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(PNG))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/sdxl"))
        .and(header(
            "authorization",
            format!("Bearer {SDXL_KEY}").as_str(),
        ))
        .and(body_json(serde_json::json!({ "prompt": prompt })))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(JPEG))
        .mount(&server)
        .await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_secs(5),
    );
    assert_eq!(
        w.generate(&model("flux"), prompt, None)
            .await
            .unwrap()
            .format,
        "png"
    );
    assert_eq!(
        w.generate(&model("sdxl"), prompt, None)
            .await
            .unwrap()
            .format,
        "jpeg"
    );
    // flux sends no credentials at all.
    let requests = server.received_requests().await.unwrap();
    assert!(requests[0].headers.get("authorization").is_none());
    // A model that is not configured fails without a call.
    let f = w
        .generate(&model("kandinsky"), prompt, None)
        .await
        .unwrap_err();
    assert_eq!((f.kind, f.attempts), (FailureKind::NotConfigured, 0));
}

#[tokio::test]
async fn a_wrong_key_is_refused_by_the_fake_and_never_echoed() {
    let server = MockServer::start().await;
    Mock::given(bearer_token(SDXL_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(PNG))
        .mount(&server)
        .await;
    // The fake echoes the header back, as careless servers do.
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(401).set_body_string("invalid token: Bearer wrong-key-9999"),
        )
        .mount(&server)
        .await;
    let w = workers(
        &server.uri(),
        &server.uri(),
        "wrong-key-9999",
        Duration::from_secs(5),
    );
    let f = w.generate(&model("sdxl"), "fox", None).await.unwrap_err();
    assert_eq!((f.kind, f.attempts), (FailureKind::Refused, 1));
    assert!(!f.reason.contains("wrong-key-9999"), "{}", f.reason);
    assert!(f.reason.contains("[redacted]"), "{}", f.reason);
    let right = workers(
        &server.uri(),
        &server.uri(),
        SDXL_KEY,
        Duration::from_secs(5),
    );
    assert!(right.generate(&model("sdxl"), "fox", None).await.is_ok());
}

// ---- the prompt enhancer ------------------------------------------------

fn enhancer(
    url: &str,
    key: Option<&str>,
    template: Option<&str>,
    timeout: Duration,
) -> LlmEnhancer {
    let mut vars = vec![
        ("LLM_API_URL", format!("{url}/v1")),
        ("LLM_MODEL", "fake-llm".to_owned()),
    ];
    if let Some(k) = key {
        vars.push(("LLM_API_KEY", k.to_owned()));
    }
    if let Some(t) = template {
        vars.push(("EASEL_LLM_USER_TEMPLATE", t.to_owned()));
        vars.push(("EASEL_LLM_SYSTEM_PROMPT", "تو یک دستیار هستی".to_owned()));
    }
    let s = settings(&vars);
    LlmEnhancer::from_parts(
        build_client(Duration::from_secs(2), Duration::from_secs(5)).unwrap(),
        s.llm,
        timeout,
    )
}

fn chat(content: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "id": "chatcmpl-fake", "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }]
    }))
}

#[tokio::test]
async fn the_enhancer_sends_the_openai_shape_and_cleans_the_answer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(bearer_token(LLM_KEY))
        .respond_with(chat(
            "```text\nEnhanced prompt: \u{201C}A red fox, snowy forest\u{201D}\n```",
        ))
        .mount(&server)
        .await;
    let e = enhancer(
        &server.uri(),
        Some(LLM_KEY),
        Some("بهترش کن: {prompt}"),
        Duration::from_secs(5),
    );
    let out = e.enhance("روباه").await;
    assert_eq!(out.prompt, "A red fox, snowy forest");
    assert_eq!(out.fallback, None);
    let request = &server.received_requests().await.unwrap()[0];
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["model"], "fake-llm");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][0]["content"], "تو یک دستیار هستی");
    assert_eq!(body["messages"][1]["content"], "بهترش کن: روباه");
}

#[tokio::test]
async fn by_default_the_enhancer_asks_for_an_english_prompt_whatever_the_users_language() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(chat("a red fox in the snow"))
        .mount(&server)
        .await;
    let e = enhancer(&server.uri(), None, None, Duration::from_secs(5));
    assert_eq!(
        e.enhance("روباه قرمز در برف").await.prompt,
        "a red fox in the snow"
    );
    let request = &server.received_requests().await.unwrap()[0];
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    let system = body["messages"][0]["content"].as_str().unwrap();
    assert_eq!(system, easel::config::DEFAULT_SYSTEM_PROMPT);
    assert!(
        system.contains("Always write the description in English"),
        "{system}"
    );
    // The user's words go as they are; the template's default is the prompt.
    assert_eq!(body["messages"][1]["content"], "روباه قرمز در برف");
}

#[tokio::test]
async fn without_a_key_no_authorization_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(chat("a fox"))
        .mount(&server)
        .await;
    let e = enhancer(&server.uri(), None, None, Duration::from_secs(5));
    assert_eq!(e.enhance("fox").await.prompt, "a fox");
    assert!(
        server.received_requests().await.unwrap()[0]
            .headers
            .get("authorization")
            .is_none()
    );
}

#[tokio::test]
async fn every_enhancer_failure_gives_back_the_original_prompt() {
    let cases: Vec<(ResponseTemplate, &str)> = vec![
        (
            ResponseTemplate::new(500).set_body_string("boom"),
            "HTTP 500",
        ),
        (
            ResponseTemplate::new(401).set_body_string(format!("bad key {LLM_KEY}")),
            "HTTP 401",
        ),
        (
            ResponseTemplate::new(200).set_body_string("<html>not json</html>"),
            "not the expected JSON",
        ),
        (
            ResponseTemplate::new(200).set_body_json(serde_json::json!({ "choices": [] })),
            "no choices",
        ),
        (
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "choices": [{ "message": {} }] })),
            "no message content",
        ),
        (chat("```\n```"), "empty after cleaning"),
        (chat("   \"  \"  "), "empty after cleaning"),
        (
            chat("a fox").set_delay(Duration::from_secs(3)),
            "did not answer within 1 s",
        ),
    ];
    for (answer, reason) in cases {
        let server = MockServer::start().await;
        Mock::given(any()).respond_with(answer).mount(&server).await;
        let e = enhancer(&server.uri(), Some(LLM_KEY), None, Duration::from_secs(1));
        let out = e.enhance("the original 🦊").await;
        assert_eq!(out.prompt, "the original 🦊");
        let fallback = out.fallback.expect("a reason");
        assert!(
            fallback.contains(reason),
            "{fallback:?} should say {reason:?}"
        );
        assert!(!fallback.contains(LLM_KEY), "{fallback}");
    }
    // Down, and off.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = enhancer(
        &format!("http://127.0.0.1:{port}"),
        None,
        None,
        Duration::from_secs(2),
    )
    .enhance("p")
    .await;
    assert_eq!(out.prompt, "p");
    assert!(out.fallback.unwrap().contains("could not be reached"));
    let off = LlmEnhancer::from_parts(
        build_client(Duration::from_secs(1), Duration::from_secs(1)).unwrap(),
        None,
        Duration::from_secs(1),
    );
    let out = off.enhance("p").await;
    assert_eq!(
        (out.prompt.as_str(), out.fallback.unwrap().contains("off")),
        ("p", true)
    );
}

#[tokio::test]
async fn a_long_persian_answer_is_cut_at_1000_characters() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(chat(&"گربه ".repeat(400)))
        .mount(&server)
        .await;
    let out = enhancer(&server.uri(), None, None, Duration::from_secs(5))
        .enhance("p")
        .await;
    assert!(out.prompt.chars().count() <= 1000);
    assert!(out.prompt.chars().count() >= 995);
    assert!(out.prompt.starts_with("گربه"));
}

/// A FAKE worker that answers `200` at once and then trickles its body one
/// byte every 100 ms (for a minute): every single read is quick, so only an
/// overall deadline per attempt ends it (§4). Counts the connections.
async fn trickling_worker() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head =
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 600\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..600 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if sock.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, calls)
}

#[tokio::test]
async fn a_trickling_worker_cannot_hold_the_lane_past_the_deadline() {
    let (url, calls) = trickling_worker().await;
    let s = settings(&[("FLUX_WORKER_URL", format!("{url}/flux"))]);
    // Reads never wait 2 s; each attempt may last 300 ms in all.
    let client = build_client(Duration::from_secs(2), Duration::from_secs(2)).unwrap();
    let workers = ImageWorkers::from_parts(
        client,
        s.models.clone(),
        Duration::from_millis(1),
        Duration::from_millis(300),
    );
    let failure = workers
        .generate(&model("flux"), "a fox", None)
        .await
        .expect_err("a trickle is no image");
    assert_eq!(failure.kind, FailureKind::TimedOut, "{failure:?}");
    assert_eq!(failure.attempts, 4, "{failure:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
}
