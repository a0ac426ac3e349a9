//! The composition root of `easel run` on PostgreSQL (§9): one replica of
//! several sharing the bot through one database. The log and every
//! decision live in the database (`engine::replica`), this replica's
//! copy of the log and its projection follow it (`engine::mirror`), one
//! `ReplicaRunner` per model competes for the model's lease, and updates
//! arrive by Telegram's webhook (any replica may get any update; the
//! database admits each once) or by long polling from the one replica
//! holding the poller's lease. Nothing here is kept on local disk but the
//! images this replica makes.

use std::sync::Arc;

use anyhow::Context as _;
use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    DRAIN, Outside, StartError, Watch, connect_outside, drain, serve_watch, serve_webhook,
    telegram_side, webhook_settings,
};
use crate::config::Settings;
use crate::engine::mirror::ReplicaEngine;
use crate::engine::replica::{LeaseTimes, Replica, ReplicaRunner, keep};
use crate::engine::{Stages, SystemClock};
use crate::store::pg::Claimed;
use crate::telegram::TelegramDeliverer;
use crate::telegram::intake::Refused;
use crate::telegram::poll;

/// This replica's name in the leases it takes: unique per process, and
/// telling an operator which machine and process held a lease.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let tag = crate::domain::RequestId::random().short();
    format!("{host}/{}/{tag}", std::process::id())
}

/// Runs this replica until `shutdown`.
///
/// # Errors
/// [`StartError::Config`] for a missing token, model, webhook listen
/// address or secret, or a refused token; else what failed at start (the
/// database unreachable, say).
pub async fn run(
    settings: Settings,
    url: SecretString,
    webhook: bool,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let token = settings.telegram_token.clone().ok_or_else(|| {
        StartError::Config("TELEGRAM_BOT_TOKEN is not set; `easel run` needs the bot token.".into())
    })?;
    if settings.models.is_empty() {
        return Err(StartError::Config(
            "No image model is configured: set FLUX_WORKER_URL or SDXL_WORKER_URL, or add a [[models]] entry with a url to easel.toml.".into(),
        ));
    }
    if webhook {
        // Said before anything is connected.
        webhook_settings(&settings)?;
    }
    let settings = Arc::new(settings);
    tracing::info!("starting easel as a replica on PostgreSQL\n{settings}");
    let watch = Watch::new(&settings);
    let Watch {
        health,
        metrics,
        alerts,
        ..
    } = watch.clone();
    health.set(
        crate::health::Part::Engine,
        Some("starting: connecting to the database".into()),
    );
    serve_watch(&settings, &watch, &shutdown).await?;

    let holder = holder_name();
    let replica = Arc::new(
        Replica::connect(&url, holder.clone(), Arc::new(SystemClock))
            .await
            .map_err(|e| StartError::Other(anyhow::anyhow!(e)))?,
    );
    let (engine, follower) = ReplicaEngine::start(Arc::clone(&replica), shutdown.clone())
        .await
        .map_err(|e| StartError::Other(anyhow::anyhow!(e)))?;
    tracing::info!(%holder, position = engine.position(), "joined the database's log");
    let mut tasks = JoinSet::new();
    tasks.spawn(follower);

    crate::store::disk::private_umask();
    crate::store::disk::create_data_dir(settings.data_dir.root())
        .with_context(|| format!("could not create the data dir {}", settings.data_dir))?;
    let outside = connect_outside(&settings, token, &watch, settings.replicas, &shutdown).await?;

    let engine = Arc::new(engine);
    metrics.engine_starts.inc();
    // The request series and the queue gauges read this replica's copy of
    // the log, which holds every replica's events: each replica reports
    // the whole bot's requests (aggregate across replicas with max, not
    // sum; docs/scale-out.md). The "failing in a row" count comes from
    // the same log, so it is the whole bot's on every replica; only the
    // replica holding the alerter's lease tells the operator.
    metrics.read_lanes_with(crate::metrics::lanes_of(&engine));
    watch.show(&engine, &settings);
    alerts.speak_for_the_bot(false);
    if settings.metrics_addr.is_some() || settings.operator_chat.is_some() {
        let alerts = Arc::clone(&alerts);
        tasks.spawn(crate::metrics::follow(
            Arc::clone(&engine),
            Arc::clone(&metrics),
            move |model, outcome| alerts.generation(model, outcome),
            shutdown.clone(),
        ));
    }
    let times = LeaseTimes {
        ttl: settings.lease,
        renew_every: settings.lease / 3,
    };
    // The janitor sweeps this replica's kept images, and moves finished
    // requests past the retention window to the database's archive table.
    let intake = telegram_side(
        &engine,
        &outside,
        &settings,
        &watch,
        Refused::default(),
        &shutdown,
        &mut tasks,
    );
    let Outside {
        images,
        generator,
        enhancer,
        api,
        ..
    } = outside;
    let deliverer = Arc::new(TelegramDeliverer::new(Arc::clone(&api)));
    for model in &settings.models {
        let stages = Stages::new(
            model.name.clone(),
            Arc::clone(&enhancer),
            Arc::clone(&generator),
            Arc::clone(&deliverer),
            Arc::clone(&images),
        );
        let runner =
            ReplicaRunner::new(Arc::clone(&replica), stages, times).with_hint(engine.work_hint());
        let stop = shutdown.clone();
        tasks.spawn(async move { runner.run(stop).await });
    }
    let slot = crate::telegram::webhook::Slot::default();
    if webhook {
        serve_webhook(&settings, &slot, &shutdown).await?;
        *slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(intake);
    } else {
        // Long polling from exactly one replica (§9), from the offset
        // kept in the database: updates a dying poller handled after its
        // last saved offset come again to the next one and are found by
        // their update id.
        tasks.spawn(elected(
            Arc::clone(&replica),
            POLLER,
            times,
            shutdown.clone(),
            move |stop| {
                let intake = Arc::clone(&intake);
                async move {
                    poll::poll(intake, stop).await;
                }
            },
        ));
    }
    if settings.operator_chat.is_some() {
        // The operator is told about the whole bot by one replica.
        let alerts = Arc::clone(&alerts);
        tasks.spawn(elected(
            Arc::clone(&replica),
            ALERTER,
            times,
            shutdown.clone(),
            move |stop| {
                let alerts = Arc::clone(&alerts);
                alerts.speak_for_the_bot(true);
                async move {
                    stop.cancelled().await;
                    alerts.speak_for_the_bot(false);
                }
            },
        ));
    }
    health.set(crate::health::Part::Engine, None);
    health.set(crate::health::Part::Log, None);
    tracing::info!("replica running");

    shutdown.cancelled().await;
    // New webhook POSTs get 503 from now on: Telegram retries them, on
    // another replica if one runs.
    *slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    // A generation aborted here keeps its lease until it runs out; the
    // request is then resumed, here at the next start or on another
    // replica.
    drain(&mut tasks, tokio::time::Instant::now() + DRAIN).await;
    tracing::info!("stopped");
    Ok(())
}

/// The poller's lease, among the models' (no model name starts with `@`).
const POLLER: &str = "@telegram-poller";

/// The lease of the replica that tells the operator about the whole bot.
const ALERTER: &str = "@operator-alerts";

/// A role exactly one replica plays at a time (§9): the replica holding
/// lease `name` runs `role` (until the token it is given is cancelled),
/// renewing the lease as a generation does; when it loses the lease (it
/// hung, or lost the database) the role stops, and when it dies the lease
/// runs out and another replica, trying every half lease, takes over.
async fn elected<F, R>(
    replica: Arc<Replica>,
    name: &'static str,
    times: LeaseTimes,
    shutdown: CancellationToken,
    mut role: F,
) where
    F: FnMut(CancellationToken) -> R + Send,
    R: Future<Output = ()> + Send + 'static,
{
    let mut released = replica.log().subscribe_releases();
    loop {
        released.borrow_and_update();
        // Another replica holds it (a plain read: no head lock for a "no").
        let held = matches!(
            replica.log().held_by_other(name, replica.holder()).await,
            Ok(true)
        );
        let claimed = if held {
            Ok(Claimed::Held)
        } else {
            tokio::select! {
                c = replica.log().claim(name, replica.holder(), times.ttl, Vec::new()) => c,
                () = shutdown.cancelled() => return,
            }
        };
        match claimed {
            Ok(Claimed::Won { mut lease, .. }) => {
                tracing::info!(role = name, epoch = lease.epoch, "elected");
                let playing = shutdown.child_token();
                let task = tokio::spawn(role(playing.clone()));
                tokio::select! {
                    () = keep(&replica, &mut lease, times) => {
                        tracing::warn!(role = name, "lost the lease: stopped");
                    }
                    () = shutdown.cancelled() => {}
                }
                playing.cancel();
                let _ = task.await;
                // Free at once for another replica (a stop, or a lease
                // already lost: then this changes nothing).
                if let Err(e) = replica.release(&lease).await {
                    tracing::warn!(role = name, error = %e, "could not release the lease; it runs out");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(role = name, error = %e, "could not ask for the lease"),
        }
        // Until the lease may be free: released (a holder that stopped)
        // or, for one that died, half a lease.
        tokio::select! {
            _ = released.changed() => {}
            () = tokio::time::sleep(times.ttl / 2) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
