//! Profile target for replay: `build DIR N` writes N finished requests
//! (5 events each); `replay DIR` rebuilds every projection from it.
//! `cargo run --release --example replay_profile -- build /tmp/plog 20000`
//! `valgrind --tool=callgrind target/release/examples/replay_profile replay /tmp/plog`

use easel::domain::{ChatId, Event, ImageRef, ModelName, Origin, Prompt, RequestId, UserId};
use easel::projection::{LiveState, replay_into};
use easel::store::{EventStore, NewEvent, SledStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(args.get(2).ok_or("usage: build DIR N | replay DIR")?);
    let store = SledStore::open(dir)?;
    match args.get(1).map(String::as_str) {
        Some("build") => {
            let n: u64 = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(20_000);
            let model = ModelName::parse("flux")?;
            let prompt = Prompt::parse("a red fox in the snow, golden hour")?;
            for i in 0..n {
                let at = chrono::Utc::now();
                let id = RequestId::random();
                let e = |event| NewEvent {
                    request_id: id,
                    at,
                    event,
                };
                store.append(vec![
                    e(Event::Queued {
                        model: model.clone(),
                        prompt: prompt.clone(),
                        origin: Origin {
                            user_id: UserId(i as i64 % 500),
                            chat_id: ChatId(1),
                            message_id: Some(i as i32),
                            update_id: Some(i as u32),
                            language: None,
                        },
                        preset: None,
                        remembered: false,
                        input: None,
                        images: 1,
                    }),
                    e(Event::Started),
                    e(Event::Enhanced {
                        prompt: "A red fox in the snow, golden hour".into(),
                        fallback: None,
                    }),
                    e(Event::Generated {
                        image: ImageRef {
                            file: format!("{id}.png"),
                            bytes: 1,
                            format: "png".into(),
                        },
                        attempts: 1,
                        statuses: vec!["200".into()],
                    }),
                    e(Event::Delivered {
                        message_id: Some(1),
                    }),
                ])?;
            }
        }
        Some("replay") => {
            let mut state = LiveState::default();
            let report = replay_into(&mut state, store.read_from(1))?;
            println!("{} events replayed", report.applied);
        }
        _ => return Err("usage: build DIR N | replay DIR".into()),
    }
    Ok(())
}
