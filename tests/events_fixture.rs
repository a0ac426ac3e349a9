//! Old logs must stay readable: this fixture is today's (v1) encoding,
//! committed once. Every future version must keep decoding it (upcasting)
//! to the same domain values; never edit the fixture to make a test pass.

use chrono::{DateTime, Utc};
use easel::domain::{
    ChatId, Event, FailureKind, ImageRef, ModelName, Origin, Prompt, RequestId, Stage, UserId,
};
use easel::projection::{LiveState, RequestRecord};
use easel::store::{Recorded, codec};

const FIXTURE: &str = include_str!("fixtures/events-v1.jsonl");

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn id(n: u8) -> RequestId {
    RequestId(
        format!("019abb1c-3a00-7000-8000-00000000000{n}")
            .parse()
            .unwrap(),
    )
}

fn expected() -> Vec<Recorded> {
    let r = |seq, n, t: &str, event| Recorded {
        seq,
        request_id: id(n),
        at: at(t),
        event,
    };
    vec![
        r(
            1,
            1,
            "2026-11-25T10:00:00Z",
            Event::Queued {
                model: ModelName::parse("flux").unwrap(),
                prompt: Prompt::parse("a red fox in snow = winter").unwrap(),
                origin: Origin {
                    user_id: UserId(42),
                    chat_id: ChatId(-1001234),
                    message_id: Some(77),
                    update_id: Some(900001),
                    language: None,
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            },
        ),
        r(2, 1, "2026-11-25T10:00:01.250Z", Event::Started),
        r(
            3,
            1,
            "2026-11-25T10:00:02Z",
            Event::Enhanced {
                prompt: "A red fox, snowy forest, golden hour".into(),
                fallback: None,
            },
        ),
        r(
            4,
            1,
            "2026-11-25T10:00:09Z",
            Event::Generated {
                image: ImageRef {
                    file: "019abb1c-3a00-7000-8000-000000000001.png".into(),
                    bytes: 123456,
                    format: "png".into(),
                },
                attempts: 2,
                statuses: Vec::new(),
            },
        ),
        r(
            5,
            1,
            "2026-11-25T10:00:10Z",
            Event::Delivered {
                message_id: Some(78),
            },
        ),
        r(
            6,
            2,
            "2026-11-25T10:01:00Z",
            Event::Queued {
                model: ModelName::parse("sdxl").unwrap(),
                prompt: Prompt::parse("گربه‌ای روی ماه 🐱🌙").unwrap(),
                origin: Origin {
                    user_id: UserId(43),
                    chat_id: ChatId(43),
                    message_id: None,
                    update_id: None,
                    language: None,
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            },
        ),
        r(7, 2, "2026-11-25T10:01:01Z", Event::Started),
        r(
            8,
            2,
            "2026-11-25T10:01:31Z",
            Event::Enhanced {
                prompt: "گربه‌ای روی ماه 🐱🌙".into(),
                fallback: Some("the enhancer timed out".into()),
            },
        ),
        r(
            9,
            2,
            "2026-11-25T10:01:40Z",
            Event::Resumed {
                stage: Stage::Generating,
            },
        ),
        r(
            10,
            2,
            "2026-11-25T10:01:45Z",
            Event::Generated {
                image: ImageRef {
                    file: "019abb1c-3a00-7000-8000-000000000002.jpeg".into(),
                    bytes: 9,
                    format: "jpeg".into(),
                },
                attempts: 1,
                statuses: Vec::new(),
            },
        ),
        r(11, 2, "2026-11-25T10:01:50Z", Event::Regenerating),
        r(
            12,
            2,
            "2026-11-25T10:02:10Z",
            Event::Failed {
                kind: FailureKind::Rejected,
                reason: "451 from the worker".into(),
                attempts: 1,
                statuses: Vec::new(),
            },
        ),
        r(
            13,
            3,
            "2026-11-25T10:03:00Z",
            Event::Queued {
                model: ModelName::parse("flux").unwrap(),
                prompt: Prompt::parse("x").unwrap(),
                origin: Origin {
                    user_id: UserId(44),
                    chat_id: ChatId(44),
                    message_id: Some(5),
                    update_id: Some(900002),
                    language: None,
                },
                preset: None,
                remembered: false,
                input: None,
                images: 1,
            },
        ),
        r(14, 3, "2026-11-25T10:03:05Z", Event::Cancelled),
    ]
}

#[test]
fn the_v1_fixture_decodes_to_todays_domain_values() {
    let decoded: Vec<Recorded> = FIXTURE
        .lines()
        .map(|l| codec::decode_json(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(decoded, expected());
    // Every event type is covered by the fixture.
    let mut names: Vec<&str> = decoded.iter().map(|r| r.event.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 9, "{names:?}");
}

#[test]
fn today_still_writes_the_v1_encoding_byte_for_byte() {
    // When this fails on purpose (a new version), keep the fixture, add a
    // v2 fixture, and keep the decode test above passing.
    for (line, rec) in FIXTURE.lines().zip(expected()) {
        assert_eq!(
            String::from_utf8(codec::encode_json(&rec).unwrap()).unwrap(),
            line
        );
    }
}

#[test]
fn the_fixture_replays_into_the_expected_projections() {
    let mut state = LiveState::default();
    for rec in expected() {
        state.apply(&rec).unwrap();
    }
    // Everything in the fixture is finished: nothing live remains.
    assert_eq!(state.requests().count(), 0);
    assert_eq!(state.last_seq, 14);
    let first: Vec<Recorded> = expected()
        .into_iter()
        .filter(|r| r.request_id == id(1))
        .collect();
    let record = RequestRecord::from_events(&first).unwrap();
    assert_eq!(record.status, Stage::Done);
    assert_eq!(record.attempts, 2);
    assert_eq!(
        record.enhanced_prompt.as_deref(),
        Some("A red fox, snowy forest, golden hour")
    );
}

#[test]
fn unknown_versions_and_garbage_are_errors_not_panics() {
    let v9 = FIXTURE
        .lines()
        .next()
        .unwrap()
        .replacen("{\"v\":1,", "{\"v\":9,", 1);
    assert_eq!(
        codec::decode_json(v9.as_bytes()),
        Err(codec::DecodeError::UnknownVersion(9))
    );
    assert!(matches!(
        codec::decode_json(b"{\"seq\":1}"),
        Err(codec::DecodeError::Json(_))
    ));
    assert!(matches!(
        codec::decode(b"\x00\x01"),
        Err(codec::DecodeError::TooShort(2))
    ));
    let mut sealed = codec::seal(FIXTURE.lines().next().unwrap().as_bytes()).unwrap();
    sealed[10] ^= 0x20;
    assert!(matches!(
        codec::decode(&sealed),
        Err(codec::DecodeError::Checksum { .. })
    ));
}

#[test]
fn an_event_object_whose_type_is_not_first_still_decodes() {
    // Our encoder writes "type" first (the fast path); a hand-edited or
    // foreign file may not, and must read the same.
    for (line, want) in FIXTURE.lines().zip(expected()) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let event = v["event"].as_object().unwrap().clone();
        let mut reordered = serde_json::Map::new();
        for (k, val) in event.iter().filter(|(k, _)| *k != "type") {
            reordered.insert(k.clone(), val.clone());
        }
        reordered.insert("type".into(), event["type"].clone());
        v["event"] = serde_json::Value::Object(reordered);
        assert_eq!(codec::decode_json(v.to_string().as_bytes()).unwrap(), want);
    }
    let unknown = FIXTURE
        .lines()
        .next()
        .unwrap()
        .replace("\"type\":\"queued\"", "\"type\":\"teleported\"");
    assert!(matches!(
        codec::decode_json(unknown.as_bytes()),
        Err(codec::DecodeError::Json(_))
    ));
}

/// Version 2 (§8): `model_chosen` (written as v2), and a `queued` with the
/// optional additions to v1 (`language`, `preset`, `remembered`), written
/// as v1. Committed once, like the v1 fixture.
const FIXTURE_V2: &str = include_str!("fixtures/events-v2.jsonl");

fn expected_v2() -> Vec<Recorded> {
    let user = UserId(43);
    vec![
        Recorded {
            seq: 15,
            request_id: RequestId::choices_of(user),
            at: at("2026-11-25T10:05:00Z"),
            event: Event::ModelChosen {
                user_id: user,
                model: ModelName::parse("sdxl").unwrap(),
            },
        },
        Recorded {
            seq: 16,
            request_id: id(4),
            at: at("2026-11-25T10:06:00.500Z"),
            event: Event::Queued {
                model: ModelName::parse("sdxl").unwrap(),
                prompt: Prompt::parse("گربه‌ای روی ماه, anime style").unwrap(),
                origin: Origin {
                    user_id: user,
                    chat_id: ChatId(43),
                    message_id: Some(79),
                    update_id: Some(900003),
                    language: Some("fa".into()),
                },
                preset: Some(easel::domain::PresetUse {
                    name: "anime".into(),
                    prompt: "گربه‌ای روی ماه".into(),
                }),
                remembered: true,
                input: None,
                images: 1,
            },
        },
    ]
}

#[test]
fn the_v2_fixture_decodes_and_is_still_written_so() {
    let decoded: Vec<Recorded> = FIXTURE_V2
        .lines()
        .map(|l| codec::decode_json(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(decoded, expected_v2());
    for (line, rec) in FIXTURE_V2.lines().zip(expected_v2()) {
        assert_eq!(
            String::from_utf8(codec::encode_json(&rec).unwrap()).unwrap(),
            line
        );
    }
    // Only the new event type needs the new version.
    let versions: Vec<&str> = FIXTURE_V2.lines().map(|l| &l[..6]).collect();
    assert_eq!(versions, ["{\"v\":2", "{\"v\":1"]);
    // After the v1 history, the choice applies to the request after it.
    let mut state = LiveState::default();
    for rec in expected().into_iter().chain(expected_v2()) {
        state.apply(&rec).unwrap();
    }
    assert_eq!(
        state.chosen_model(UserId(43)).map(ModelName::as_str),
        Some("sdxl")
    );
    // An export line of each reads back the same.
    for rec in expected_v2() {
        let line = easel::ops::json::event_line(&rec).unwrap();
        assert_eq!(easel::ops::json::parse_event_line(&line).unwrap(), rec);
    }
}
