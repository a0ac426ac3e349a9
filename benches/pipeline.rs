//! easel's own pipeline overhead: requests carried from `Queued` to `Done`
//! per second through the core, the store (durable where the user is told)
//! and the runner, with instant in-process steps (no HTTP, no Telegram
//! pace): one model, then two models at once. Then the CPU used while
//! 1,000 requests wait behind a worker that never answers.
//! `cargo bench --bench pipeline [-- REQUESTS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use easel::domain::{ChatId, Limits, ModelName, Origin, Prompt, RateLimit, UserId};
use easel::engine::{
    Core, Deliverer, Delivery, DeliveryFailure, Enhancement, Enhancer, GeneratedImage,
    GenerationFailure, Generator, ImageStore, NewRequest, Runner, SystemClock,
};
use easel::projection::ActiveRequest;
use easel::store::SledStore;

struct Instant_;
impl Enhancer for Instant_ {
    async fn enhance(&self, prompt: &str) -> Enhancement {
        Enhancement {
            prompt: prompt.to_owned(),
            fallback: None,
        }
    }
}

/// Answers at once, or never (`stuck`).
struct Worker {
    stuck: bool,
}
impl Generator for Worker {
    async fn generate(
        &self,
        _model: &ModelName,
        _prompt: &str,
        _input: Option<&[u8]>,
    ) -> Result<GeneratedImage, GenerationFailure> {
        if self.stuck {
            std::future::pending::<()>().await;
        }
        Ok(GeneratedImage {
            bytes: easel::demo::png::png(64, 64, 1),
            format: "png".into(),
            attempts: 1,
            statuses: vec!["200".into()],
        })
    }
}

struct Sink;
impl Deliverer for Sink {
    async fn deliver(
        &self,
        _r: &ActiveRequest,
        _i: &[u8],
        _f: &str,
    ) -> Result<Delivery, DeliveryFailure> {
        Ok(Delivery {
            message_id: Some(1),
        })
    }

    async fn deliver_album(
        &self,
        _r: &ActiveRequest,
        _i: &[easel::engine::KeptImage],
    ) -> Result<Delivery, DeliveryFailure> {
        Ok(Delivery {
            message_id: Some(1),
        })
    }
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    (f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0))
        / 100.0
}

async fn run(
    models: &[&str],
    requests: u64,
    stuck: bool,
) -> (
    f64,
    Arc<Core<SledStore>>,
    tokio_util::sync::CancellationToken,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = Arc::new(
        Core::open(
            SledStore::open(&dir.path().join("log")).expect("open"),
            Arc::new(SystemClock),
        )
        .expect("core")
        .0,
    );
    let images = Arc::new(ImageStore::open(&dir.path().join("images")).expect("images"));
    let limits = Limits {
        max_pending: u32::MAX,
        rate: RateLimit {
            count: 256,
            window_secs: 1,
        },
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let rx = stop.clone();
    for n in 0..requests {
        let model = ModelName::parse(models[(n % models.len() as u64) as usize]).expect("model");
        let req = NewRequest {
            model,
            prompt: Prompt::parse("a red fox").expect("prompt"),
            origin: Origin {
                user_id: UserId(n as i64),
                chat_id: ChatId(n as i64),
                message_id: None,
                update_id: None,
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        };
        core.accept(req, &limits).await.expect("accept");
    }
    let started = Instant::now();
    for m in models {
        let runner = Runner::new(
            Arc::clone(&core),
            ModelName::parse(m).expect("model"),
            Arc::new(Instant_),
            Arc::new(Worker { stuck }),
            Arc::new(Sink),
            Arc::clone(&images),
        );
        let rx = rx.clone();
        tokio::spawn(async move { runner.run(rx).await });
    }
    if stuck {
        return (0.0, core, stop, dir);
    }
    while core.read(|s| s.requests().count()) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = requests as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    (rate, core, stop, dir)
}

fn main() {
    let requests: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (one, ..) = run(&["flux"], requests, false).await;
        let (two, ..) = run(&["flux", "sdxl"], requests, false).await;
        println!("pipeline, instant steps, {requests} requests: one model {one:.0} requests/s ({:.2} ms each); two models {two:.0} requests/s = {:.2}× one", 1000.0 / one, two / one);
        let (_, core, stop, _dir) = run(&["flux"], 1000, true).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = cpu_secs();
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let used = cpu_secs() - before;
        println!(
            "idle: {} requests waiting behind a stuck worker: {:.2}% of a core over {:.0} s",
            core.read(|s| s.requests().count()),
            100.0 * used / t.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        stop.cancel();
    });
}
