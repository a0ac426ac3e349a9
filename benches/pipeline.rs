//! easel's own pipeline overhead: requests carried from `Queued` to `Done`
//! per second through the core, the store (durable where the user is told)
//! and the runner, with instant in-process steps (no HTTP, no Telegram
//! pace): one model, then two models at once. Then the CPU used while
//! 1,000 requests wait behind a worker that never answers.
//! `cargo bench --bench pipeline [-- REQUESTS]`
//!
//! `cargo bench --bench pipeline -- metrics [REQUESTS]`: the cost of the
//! metrics (§7) instead — the same pipeline with metrics off and on, runs
//! alternating (off, on, off, on, …) in one process so both sides see the
//! same disk and the same durability; "on" is what `easel run` does with
//! `EASEL_METRICS_ADDR` set: the log-following projection, the flush
//! observer, the lane gauges, and a scrape (render) every second.
//!
//! `cargo bench --bench pipeline -- replicas [REQUESTS]`: the same
//! pipeline (two models) on PostgreSQL (§9, issue 17) with one replica and
//! with three (separate `Replica`s, each with its own committer, pool and
//! a `ReplicaRunner` per model, competing for the models' leases), beside
//! sled in the same run; the database on a throwaway cluster with
//! `fsync=on` and `synchronous_commit=on` (skipped, saying so, where no
//! PostgreSQL binaries exist).

#[path = "../tests/common/pg.rs"]
mod pg;

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

/// Request `n` of the run: its own user, no intake keys.
fn request(n: u64, model: &str) -> NewRequest {
    NewRequest {
        model: ModelName::parse(model).expect("model"),
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
    metrics: bool,
) -> (
    f64,
    Arc<Core<SledStore>>,
    tokio_util::sync::CancellationToken,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&dir.path().join("log")).expect("open");
    let watched = metrics.then(|| Arc::new(easel::metrics::Metrics::new()));
    if let Some(m) = &watched {
        let m = Arc::clone(m);
        store.observe_flushes(Box::new(move |took, events| m.flushed(took, events)));
    }
    let core = Arc::new(Core::open(store, Arc::new(SystemClock)).expect("core").0);
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(m) = &watched {
        m.read_lanes_with(easel::metrics::lanes_of(&core));
        tokio::spawn(easel::metrics::follow(
            Arc::clone(&core),
            Arc::clone(m),
            |_, _| {},
            stop.clone(),
        ));
        let (m, stop) = (Arc::clone(m), stop.clone());
        tokio::spawn(async move {
            let mut bytes = 0;
            while !stop.is_cancelled() {
                bytes += m.render().len();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            std::hint::black_box(bytes);
        });
    }
    let images = Arc::new(ImageStore::open(&dir.path().join("images")).expect("images"));
    let limits = Limits {
        max_pending: u32::MAX,
        rate: RateLimit {
            count: 256,
            window_secs: 1,
        },
    };
    let rx = stop.clone();
    for n in 0..requests {
        let model = models[(n % models.len() as u64) as usize];
        core.accept(request(n, model), &limits)
            .await
            .expect("accept");
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
    if std::env::args().any(|a| a == "metrics") {
        rt.block_on(metrics_overhead(requests));
        return;
    }
    if std::env::args().any(|a| a == "replicas") {
        rt.block_on(replicas(requests));
        return;
    }
    rt.block_on(async {
        let (one, ..) = run(&["flux"], requests, false, false).await;
        let (two, ..) = run(&["flux", "sdxl"], requests, false, false).await;
        println!("pipeline, instant steps, {requests} requests: one model {one:.0} requests/s ({:.2} ms each); two models {two:.0} requests/s = {:.2}× one", 1000.0 / one, two / one);
        let (_, core, stop, _dir) = run(&["flux"], 1000, true, false).await;
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

/// Metrics off against on, alternating, 7 pairs: requests/s (bound by the
/// disk's fsyncs, so noisy on a shared disk) and CPU seconds per 1,000
/// requests (the metrics' own cost, steadier); medians and each run.
async fn metrics_overhead(requests: u64) {
    const PAIRS: usize = 7;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let measured = |metrics: bool| async move {
        let before = cpu_secs();
        let (rate, ..) = run(&["flux"], requests, false, metrics).await;
        (rate, 1000.0 * (cpu_secs() - before) / requests as f64)
    };
    for _ in 0..PAIRS {
        off.push(measured(false).await);
        on.push(measured(true).await);
    }
    let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = v.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let runs = |v: &[(f64, f64)]| {
        v.iter()
            .map(|(r, c)| format!("{r:.0}/s {c:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("metrics off (requests/s, CPU s per 1,000): {}", runs(&off));
    println!("metrics on  (requests/s, CPU s per 1,000): {}", runs(&on));
    let (a, b) = (median(&off, |x| x.0), median(&on, |x| x.0));
    let (ca, cb) = (median(&off, |x| x.1), median(&on, |x| x.1));
    println!(
        "pipeline, one model, {requests} requests, median of {PAIRS}: metrics off {a:.0}/s, on {b:.0}/s ({:+.1}%); CPU per 1,000 requests off {ca:.3} s, on {cb:.3} s ({:+.1}%)",
        100.0 * (b - a) / a,
        100.0 * (cb - ca) / ca
    );
}

/// Sled, one replica and three replicas on PostgreSQL, the same requests
/// and instant steps, in one run.
async fn replicas(requests: u64) {
    let (sled, ..) = run(&["flux", "sdxl"], requests, false, false).await;
    println!("sled, two models, {requests} requests: {sled:.0} requests/s");
    let cluster = match pg::start_durable() {
        Ok(c) => c,
        Err(why) => {
            println!("*** PostgreSQL SKIPPED: {why}");
            return;
        }
    };
    for n in [1usize, 3] {
        let url = cluster.fresh_database().await;
        let rate = on_replicas(&url, n, requests).await;
        println!(
            "PostgreSQL, {n} replica(s), two models, {requests} requests: {rate:.0} requests/s ({:.2}x sled)",
            rate / sled
        );
    }
    cluster.stop();
}

/// Requests carried from `Queued` to `Done` per second by `replicas`
/// replicas of one database: queued first (through the replicas in
/// turn), then timed from the runners' start until every request's
/// `delivered` is committed.
async fn on_replicas(url: &str, replicas: usize, requests: u64) -> f64 {
    use easel::engine::Stages;
    use easel::engine::mirror::ReplicaEngine;
    use easel::engine::replica::{LeaseTimes, Replica, ReplicaRunner};
    let mut all = Vec::new();
    for i in 0..replicas {
        let r = Replica::connect(
            &secrecy::SecretString::from(url.to_owned()),
            format!("bench-{i}"),
            Arc::new(SystemClock),
        )
        .await
        .expect("replica");
        all.push(Arc::new(r));
    }
    let limits = Limits {
        max_pending: u32::MAX,
        rate: RateLimit {
            count: u32::MAX,
            window_secs: 1,
        },
    };
    let models = ["flux", "sdxl"];
    for n in 0..requests {
        all[(n as usize) % replicas]
            .admit(request(n, models[(n % 2) as usize]), &limits)
            .await
            .expect("admit");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    // Each replica's view of the log, as `easel run` has: its runners
    // look there before asking the database for work.
    let mut views = Vec::new();
    for r in &all {
        let (view, follower) = ReplicaEngine::start(Arc::clone(r), stop.clone())
            .await
            .expect("view");
        tokio::spawn(follower);
        views.push(view);
    }
    let mut committed = all[0].log().subscribe();
    let started = Instant::now();
    for (i, r) in all.iter().enumerate() {
        let images =
            Arc::new(ImageStore::open(&dir.path().join(format!("images-{i}"))).expect("images"));
        for m in models {
            let stages = Stages::new(
                ModelName::parse(m).expect("model"),
                Arc::new(Instant_),
                Arc::new(Worker { stuck: false }),
                Arc::new(Sink),
                Arc::clone(&images),
            );
            let runner = ReplicaRunner::new(Arc::clone(r), stages, LeaseTimes::default())
                .with_hint(views[i].work_hint());
            let rx = stop.clone();
            tokio::spawn(async move { runner.run(rx).await });
        }
    }
    // Queued, started, enhanced, generated, delivered: five per request.
    let _ = committed.wait_for(|p| *p >= 5 * requests).await;
    let rate = requests as f64 / started.elapsed().as_secs_f64();
    let commits: u64 = all.iter().map(|r| r.log().commit_count()).sum();
    println!(
        "  {replicas} replica(s): {commits} transactions committed through the committers ({:.1} per request)",
        commits as f64 / requests as f64
    );
    stop.cancel();
    rate
}
