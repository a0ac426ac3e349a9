//! Bad-input campaign: every parser of outside input fed generated hostile
//! input — the command parser, the stored-event decoder, the LLM-answer
//! cleaner and the worker-answer decoder. No panic; outputs stay bounded.
//! `EASEL_FUZZ_CASES` (default 1000 per target) sizes it; the full run of
//! docs/reliability.md: `EASEL_FUZZ_CASES=200000 cargo test --release --test campaign_fuzz -- --nocapture`.

use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

fn cases() -> u32 {
    std::env::var("EASEL_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

fn runner(name: &str) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(Box::leak(
            format!("proptest-regressions/campaign_fuzz_{name}.txt").into_boxed_str(),
        )))),
        ..Config::default()
    })
}

/// Pieces that break naive code: RTL marks and Persian, zero-width
/// joiners, combining marks, controls, emoji, `=`, `@`, newlines.
const PIECES: [&str; 14] = [
    "/image",
    "=",
    "@",
    "\u{200F}",
    "\u{202E}",
    "\u{200D}",
    "\u{0301}\u{0301}\u{0301}",
    "\u{0000}\u{0007}\u{001B}",
    "\n",
    "گربه",
    "👨‍👩‍👧",
    "flux",
    "\"",
    "```",
];

/// Cheap to generate (so the figures measure the code, not the generator):
/// pieces from the table above mixed with arbitrary scalar values.
fn hostile_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec((0..PIECES.len() + 4, any::<u32>()), 0..max).prop_map(|v| {
        let mut s = String::new();
        for (i, c) in v {
            match PIECES.get(i) {
                Some(p) => s.push_str(p),
                None => s.push(char::from_u32(c % 0x11_0000).unwrap_or('\u{FFFD}')),
            }
        }
        s
    })
}

fn report(name: &str, started: Instant, n: u32, in_target: std::time::Duration) {
    let secs = started.elapsed().as_secs_f64();
    let target = in_target.as_secs_f64();
    println!(
        "fuzz {name}: {n} inputs in {secs:.2} s, of which {target:.3} s in the code under test ({:.0} inputs/s there); no panic",
        f64::from(n) / target.max(1e-9)
    );
}

/// Time spent inside the code under test.
struct Clock(std::cell::Cell<std::time::Duration>);

impl Clock {
    fn new() -> Self {
        Clock(std::cell::Cell::new(std::time::Duration::ZERO))
    }
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0.set(self.0.get() + t.elapsed());
        out
    }
}

#[test]
fn the_command_parser() {
    let started = Instant::now();
    let clock = Clock::new();
    runner("parser")
        .run(&hostile_text(600), |text| {
            let input = clock.time(|| easel::telegram::parse::parse(&text, Some("easel_bot")));
            if let easel::telegram::parse::Input::Image { prompt, .. } = input {
                prop_assert!(prompt.len() <= text.len());
                prop_assert!(
                    !prompt
                        .chars()
                        .any(|c| c.is_control() && c != '\n' && c != '\t')
                );
            }
            Ok(())
        })
        .unwrap();
    report("parser", started, cases(), clock.0.get());
}

#[test]
fn the_event_decoder() {
    let started = Instant::now();
    let fixture: Vec<&str> = include_str!("fixtures/events-v1.jsonl").lines().collect();
    // Mutations of real records find more than random bytes do.
    let strategy = (
        0..fixture.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        0usize..400,
    )
        .prop_map(move |(i, flips, cut)| {
            let mut bytes = fixture[i].as_bytes().to_vec();
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let n = bytes.len();
                    bytes[at % n] = b;
                }
            }
            bytes.truncate(cut.max(1));
            bytes
        });
    let clock = Clock::new();
    runner("decoder")
        .run(&strategy, |bytes| {
            let sealed = easel::store::codec::seal(&bytes).unwrap();
            let line = String::from_utf8_lossy(&bytes).into_owned();
            clock.time(|| {
                let _ = easel::store::codec::decode_json(&bytes);
                let _ = easel::store::codec::decode(&bytes);
                let _ = easel::store::codec::decode(&sealed);
                let _ = easel::ops::json::parse_event_line(&line);
            });
            Ok(())
        })
        .unwrap();
    report("event decoder", started, cases(), clock.0.get());
}

#[test]
fn the_llm_answer_cleaner() {
    let started = Instant::now();
    let clock = Clock::new();
    runner("cleaner")
        .run(&hostile_text(3000), |text| {
            let out = clock.time(|| easel::services::clean::clean_llm_answer(&text));
            prop_assert!(out.chars().count() <= 1000);
            Ok(())
        })
        .unwrap();
    report("LLM-answer cleaner", started, cases(), clock.0.get());
}

#[test]
fn the_worker_answer_decoder() {
    let started = Instant::now();
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2000),
        "\\PC{0,200}".prop_map(|s| format!("{{\"image\": \"{s}\"}}").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|mut v| {
            let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
            out.append(&mut v);
            out
        }),
        "[A-Za-z0-9+/=]{0,400}".prop_map(|s| format!(
            "{{\"result\":{{\"image\":\"data:image/png;base64,{s}\"}}}}"
        )
        .into_bytes()),
    ];
    let clock = Clock::new();
    runner("worker")
        .run(&strategy, |body| {
            if let Ok((bytes, _)) = clock.time(|| easel::services::worker::decode_answer(&body)) {
                prop_assert!(easel::services::ImageFormat::sniff(&bytes).is_some());
            }
            Ok(())
        })
        .unwrap();
    report("worker-answer decoder", started, cases(), clock.0.get());
}
