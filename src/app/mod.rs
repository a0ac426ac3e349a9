//! The composition root of `easel run`, the only module that depends on
//! every other: settings → open the log → recover → one runner per model →
//! status board → janitor → query socket → long polling, all under one
//! cancellation token, and an orderly stop (in-flight steps are cut at a
//! step boundary and resumed after the next start; every task gets one
//! shared drain deadline; the log is checkpointed and flushed). Also the
//! self-heal after the log refused a write ([`run`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use teloxide::prelude::Requester;
use teloxide::types::BotCommand;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::domain::{Command, Stage};
use crate::engine::{Core, ImageStore, Retries, Runner, SystemClock};
use crate::services::{ImageWorkers, LlmEnhancer, MAX_CONNECTIONS, http_client};
use crate::store::SledStore;
use crate::telegram::intake::Refused;
use crate::telegram::{Intake, StatusBoard, TelegramApi, TelegramDeliverer, poll};

pub mod replica;

/// Why `easel run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration: exit code 2.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A running bot.
pub struct App {
    pub core: Arc<Core<SledStore>>,
    /// The bot's @username, as Telegram told us.
    pub username: String,
    api: Arc<TelegramApi>,
    settings: Arc<Settings>,
    /// Long polling; None when updates come by webhook.
    poller: Option<JoinHandle<i32>>,
    /// The webhook route's intake, emptied first when the engine stops.
    webhook: Option<crate::telegram::webhook::Slot<Core<SledStore>>>,
    /// The engine's stop signal; the drain deadline starts when it fires.
    stop: CancellationToken,
    /// Every other task of this engine: runners, status board, janitor,
    /// query socket. They stop on the engine's token.
    tasks: JoinSet<()>,
}

/// What the stand-in needs to answer users while the engine is down.
struct Handover {
    api: Arc<TelegramApi>,
    settings: Arc<Settings>,
    username: String,
    offset: i32,
    /// Updates come by webhook: no stand-in polls.
    webhook: bool,
}

/// How long the engine's tasks together may take to stop once told: a
/// step in flight is cut at its next boundary well within it; what is
/// still running then is aborted (its request resumes at the next start).
pub const DRAIN: Duration = Duration::from_secs(5);

/// How long aborted tasks get to end after [`DRAIN`].
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// Starts everything — with the health, metrics and dashboard listener
/// on `EASEL_METRICS_ADDR` — and the bot then runs until `shutdown` is
/// cancelled (one engine: no restart after refused writes; that is
/// [`run`]).
///
/// # Errors
/// [`StartError::Config`] for a missing or refused token, else what failed.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<App, StartError> {
    let watch = Watch::new(&settings);
    serve_watch(&settings, &watch, &shutdown).await?;
    start_with(settings, shutdown, Refused::default(), &watch, None).await
}

/// What the operator watches, for the whole process (they outlive engine
/// restarts): readiness, the metrics, the alerts.
#[derive(Clone)]
struct Watch {
    health: Arc<crate::health::Health>,
    metrics: Arc<crate::metrics::Metrics>,
    alerts: Arc<crate::alerts::Alerts>,
    /// The running engine's projections, for the dashboard.
    board: crate::dashboard::BoardSlot,
}

impl Watch {
    fn new(settings: &Settings) -> Self {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Watch {
            health: Arc::default(),
            alerts: Arc::new(crate::alerts::Alerts::new(
                settings.operator_chat,
                Arc::clone(&metrics),
            )),
            metrics,
            board: Arc::default(),
        }
    }

    /// Shows `engine` on the dashboard (at every engine start).
    fn show<E: crate::engine::Engine>(&self, engine: &Arc<E>, settings: &Settings) {
        let models = settings.models.iter().map(|m| m.name.clone()).collect();
        let board = crate::dashboard::EngineBoard::new(engine, models);
        *self
            .board
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(board));
    }
}

/// As [`start`], first cancelling the requests an earlier engine of this
/// process refused to their users (see [`Refused`]) if the log kept them.
async fn start_with(
    settings: Settings,
    shutdown: CancellationToken,
    refused: Refused,
    watch: &Watch,
    webhook: Option<crate::telegram::webhook::Slot<Core<SledStore>>>,
) -> Result<App, StartError> {
    let Watch {
        metrics, alerts, ..
    } = watch.clone();
    let token = settings.telegram_token.clone().ok_or_else(|| {
        StartError::Config("TELEGRAM_BOT_TOKEN is not set; `easel run` needs the bot token.".into())
    })?;
    if settings.models.is_empty() {
        return Err(StartError::Config(
            "No image model is configured: set FLUX_WORKER_URL or SDXL_WORKER_URL, or add a [[models]] entry with a url to easel.toml.".into(),
        ));
    }
    let settings = Arc::new(settings);
    tracing::info!("starting easel\n{settings}");
    crate::store::disk::private_umask();
    crate::store::disk::create_data_dir(settings.data_dir.root())
        .with_context(|| format!("could not create the data dir {}", settings.data_dir))?;
    let store = SledStore::open(&settings.data_dir.log()).map_err(anyhow::Error::from)?;
    let observed = Arc::clone(&metrics);
    store.observe_flushes(Box::new(move |took, events| observed.flushed(took, events)));
    let (core, report) = Core::open(store, Arc::new(SystemClock)).map_err(anyhow::Error::from)?;
    tracing::info!(
        checkpoint = ?report.checkpoint_seq,
        tail = report.tail_events,
        corrupt = report.corrupt.len(),
        "event log opened"
    );
    let core = Arc::new(core);
    metrics.engine_starts.inc();
    metrics.read_lanes_with(crate::metrics::lanes_of(&core));
    watch.show(&core, &settings);
    crate::maintenance::fail_unconfigured(&core, &settings)
        .await
        .context("failing the requests of unconfigured models")?;
    // Kept on the list until done: a start that fails here is retried.
    for id in refused.list() {
        if core.read(|s| s.request(id).is_some_and(|r| r.stage == Stage::Queued)) {
            tracing::warn!(request_id = %id, "cancelling a request its user was told could not be taken (its write reached the disk after all)");
            core.execute(id, Command::Cancel)
                .await
                .context("cancelling a refused request")?;
        }
        refused.done(id);
    }
    let resumed = core
        .recover()
        .await
        .context("recovering unfinished requests")?;
    for r in &resumed {
        tracing::info!(request_id = %r.request_id, event = ?r.event, "resuming");
    }

    let outside = connect_outside(&settings, token, watch, 1, &shutdown).await?;
    let mut tasks = JoinSet::new();
    let intake = telegram_side(
        &core,
        &outside,
        &settings,
        watch,
        refused.clone(),
        &shutdown,
        &mut tasks,
    );
    let Outside {
        images,
        generator,
        enhancer,
        api,
        username,
        ..
    } = outside;
    let deliverer = Arc::new(TelegramDeliverer::new(Arc::clone(&api)));
    // The request series and the "failing in a row" alert read the log;
    // nobody needs them when neither is asked for.
    if settings.metrics_addr.is_some() || settings.operator_chat.is_some() {
        let alerts = Arc::clone(&alerts);
        tasks.spawn(crate::metrics::follow(
            Arc::clone(&core),
            Arc::clone(&metrics),
            move |model, outcome| alerts.generation(model, outcome),
            shutdown.clone(),
        ));
    }
    for model in &settings.models {
        let runner = Runner::new(
            Arc::clone(&core),
            model.name.clone(),
            Arc::clone(&enhancer),
            Arc::clone(&generator),
            Arc::clone(&deliverer),
            Arc::clone(&images),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move { runner.run(stop).await });
    }
    // Operators' read-only queries, while this process holds the log.
    match crate::ops::server::bind(&intake.settings.data_dir.socket()) {
        Ok(listener) => {
            tasks.spawn(crate::ops::server::serve(
                Arc::clone(&core),
                listener,
                intake.settings.data_dir.socket(),
                shutdown.clone(),
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "the audit socket is not available; `easel audit` works only when the bot is stopped")
        }
    }
    let poller = match &webhook {
        // Updates arrive on the webhook route from now on.
        Some(slot) => {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(intake);
            None
        }
        None => Some(tokio::spawn(poll::poll(intake, shutdown.clone()))),
    };
    Ok(App {
        core,
        username,
        api,
        settings,
        poller,
        webhook,
        stop: shutdown,
        tasks,
    })
}

impl App {
    /// Waits for the shutdown signal's effect: polling stops, runners stop
    /// at a step boundary (bounded wait), then a checkpoint is written and
    /// the log flushed when the core is dropped.
    ///
    /// # Errors
    /// When the final checkpoint cannot be written.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.wait_for_handover().await.1
    }

    /// As [`App::wait`], handing back where polling stopped.
    async fn wait_for_handover(mut self) -> (Handover, anyhow::Result<()>) {
        self.stop.cancelled().await;
        // New webhook POSTs get 503 (Telegram retries them) from now on.
        if let Some(slot) = &self.webhook {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        let deadline = tokio::time::Instant::now() + DRAIN;
        let offset = match self.poller.as_mut() {
            None => 0,
            Some(poller) => match tokio::time::timeout_at(deadline, &mut *poller).await {
                Ok(joined) => joined.unwrap_or(0),
                Err(_) => {
                    poller.abort();
                    0
                }
            },
        };
        let handover = Handover {
            api: self.api,
            settings: self.settings,
            username: self.username,
            offset,
            webhook: self.webhook.is_some(),
        };
        // Aborted tasks' handles on the log are gone too, so the log can
        // be reopened (see `run`).
        drain(&mut self.tasks, deadline).await;
        // A log that refused a write takes no checkpoint (sled refuses every
        // later write of the handle, and may not answer at all).
        let broken = self.core.store().write_failure().borrow().clone();
        let result = match broken {
            Some(reason) => Err(anyhow::anyhow!(
                "no final checkpoint: the event log refused a write ({reason})"
            )),
            None => self
                .core
                .checkpoint()
                .context("writing the final checkpoint"),
        };
        if result.is_ok() {
            tracing::info!("stopped");
        }
        (handover, result)
    }
}

/// Waits until `deadline` for `tasks` to end; then aborts what is left
/// (its requests resume at the next start), and goes on without a task
/// still stuck after [`ABORT_WAIT`]: one inside blocking code (a flush of
/// a log whose disk just filled may never return) cannot be aborted, and
/// users must be answered meanwhile.
async fn drain(tasks: &mut JoinSet<()>, deadline: tokio::time::Instant) {
    let drained = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_ok() {
        return;
    }
    tracing::warn!(
        left = tasks.len(),
        "tasks did not stop within {} s; their requests resume at the next start",
        DRAIN.as_secs()
    );
    tasks.abort_all();
    let gone = tokio::time::timeout(ABORT_WAIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if gone.is_err() {
        tracing::error!(
            left = tasks.len(),
            "tasks are stuck in blocking code; going on without them"
        );
        tasks.detach_all();
    }
}

/// The first pause before reopening a log that refused writes; it doubles
/// up to [`RESTART_MAX`] while the disk keeps refusing.
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// An engine that ran this long before its log broke starts the pauses over.
const RESTART_HEALTHY: Duration = Duration::from_secs(60);

/// Runs the bot until `shutdown`.
///
/// When the event log refuses a write (disk full, size limit, I/O error),
/// sled refuses every later write of that handle too. So the engine is
/// stopped as on SIGTERM and started again from the log after a pause,
/// until the disk takes writes again: the bot heals by itself once space is
/// freed. Meanwhile nothing acknowledged is lost (a request is acknowledged
/// only once its `Queued` is durable), and requests that arrive get
/// "couldn't take that request right now" — from the stand-in
/// (`telegram::standin`) while no engine runs.
///
/// # Errors
/// As [`start`] (at the first start; later starts are retried) and
/// [`App::wait`]; stopping while the log cannot be written is an error too.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), StartError> {
    run_with(settings, shutdown, false).await
}

/// As [`run`]; with `webhook`, updates come by Telegram's webhook on
/// `EASEL_WEBHOOK_LISTEN` (`POST /telegram`, §9) instead of long polling,
/// and while no engine runs the route answers `503` (Telegram retries)
/// instead of the stand-in answering.
///
/// # Errors
/// As [`run`]; a missing `EASEL_WEBHOOK_LISTEN` or `EASEL_WEBHOOK_SECRET`
/// with `webhook` is a configuration error.
pub async fn run_with(
    settings: Settings,
    shutdown: CancellationToken,
    webhook: bool,
) -> Result<(), StartError> {
    // 1 s doubling to 30 s while the disk keeps refusing (backon), from the
    // start again after an engine that ran long enough.
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(RESTART_FIRST)
        .with_max_delay(RESTART_MAX)
        .without_max_times();
    let mut pauses = backon::BackoffBuilder::build(policy);
    let mut pause = pauses.next().unwrap_or(RESTART_FIRST);
    // Set once an engine ran; lets the stand-in answer during the pauses.
    let mut handover: Option<Handover> = None;
    // What one engine refused and the next must not run.
    let refused = Refused::default();
    // Readiness, metrics and alerts (§7), for the whole process.
    let watch = Watch::new(&settings);
    let health = Arc::clone(&watch.health);
    serve_watch(&settings, &watch, &shutdown).await?;
    let slot = if webhook {
        let slot = crate::telegram::webhook::Slot::<Core<SledStore>>::default();
        serve_webhook(&settings, &slot, &shutdown).await?;
        Some(slot)
    } else {
        None
    };
    loop {
        // Each engine has its own token, a child of the process's: a
        // broken log can stop the engine without stopping the process,
        // and the process's signal stops the engine too.
        let engine = shutdown.child_token();
        let started = tokio::time::Instant::now();
        let app = match start_with(
            settings.clone(),
            engine.clone(),
            refused.clone(),
            &watch,
            slot.clone(),
        )
        .await
        {
            Ok(app) => {
                health.set(crate::health::Part::Log, None);
                health.set(crate::health::Part::Engine, None);
                if handover.is_some() {
                    // Recovered only once a write reached the disk: an
                    // engine can open a log on a disk that is still full.
                    let alerts = Arc::clone(&watch.alerts);
                    let core = Arc::clone(&app.core);
                    let stop = engine.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            works = core.store().next_flush_works() => if works {
                                alerts.clear(crate::alerts::Cause::LogRefuses).await;
                            },
                            () = stop.cancelled() => {}
                        }
                    });
                }
                app
            }
            Err(e) => {
                health.set(
                    crate::health::Part::Engine,
                    Some("the event log cannot be reopened yet".into()),
                );
                // The first start reports every problem; later ones retry
                // all but a configuration error.
                let Some(h) = handover.as_mut() else {
                    return Err(e);
                };
                let e = match e {
                    StartError::Config(problem) => return Err(StartError::Config(problem)),
                    StartError::Other(e) => e,
                };
                tracing::warn!(error = %format!("{e:#}"), retry_in_secs = pause.as_secs(), "the event log cannot be reopened yet");
                if shutdown.is_cancelled() || pause_answering(pause, h, &shutdown).await {
                    return Err(StartError::Other(
                        e.context("stopped while the event log could not be reopened"),
                    ));
                }
                pause = pauses.next().unwrap_or(RESTART_MAX);
                continue;
            }
        };
        let mut broken = app.core.store().write_failure();
        let reason = tokio::select! {
            r = broken.wait_for(Option::is_some) => r.ok().and_then(|r| r.clone()),
            () = engine.cancelled() => None,
        };
        let Some(reason) = reason else {
            // Stopped by the process's signal.
            app.wait().await?;
            return Ok(());
        };
        tracing::error!(
            %reason,
            retry_in_secs = pause.as_secs(),
            "the event log can no longer be written; stopping the engine and starting it again from the log once the disk takes writes"
        );
        health.set(
            crate::health::Part::Log,
            Some(format!("the event log refuses writes ({reason})")),
        );
        let alerts = Arc::clone(&watch.alerts);
        let why = reason.to_string();
        tokio::spawn(async move { alerts.log_refuses(&why).await });
        health.set(
            crate::health::Part::Engine,
            Some("restarting the engine".into()),
        );
        engine.cancel();
        let (mut h, result) = app.wait_for_handover().await;
        if let Err(e) = result {
            tracing::debug!(error = %format!("{e:#}"), "stopping with a broken log");
        }
        if started.elapsed() >= RESTART_HEALTHY {
            pauses = backon::BackoffBuilder::build(policy);
            pause = pauses.next().unwrap_or(RESTART_FIRST);
        }
        let told = shutdown.is_cancelled() || pause_answering(pause, &mut h, &shutdown).await;
        handover = Some(h);
        if told {
            return Err(StartError::Other(anyhow::anyhow!(
                "stopped while the event log could not be written ({reason}); every acknowledged request is in the log and resumes at the next start"
            )));
        }
        pause = pauses.next().unwrap_or(RESTART_MAX);
    }
}

/// Waits `pause` while the stand-in answers users (by long polling; with a
/// webhook the route answers `503` instead and Telegram retries); true
/// when the process is told to stop meanwhile.
async fn pause_answering(pause: Duration, h: &mut Handover, shutdown: &CancellationToken) -> bool {
    if h.webhook {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => {}
        }
        return shutdown.is_cancelled();
    }
    let until = shutdown.child_token();
    let standin = tokio::spawn(crate::telegram::standin::answer_while_down(
        Arc::clone(&h.api),
        Arc::clone(&h.settings),
        h.username.clone(),
        h.offset,
        until.clone(),
    ));
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        () = shutdown.cancelled() => {}
    }
    until.cancel();
    if let Ok(offset) = standin.await {
        h.offset = offset;
    }
    shutdown.is_cancelled()
}

/// Serves `/metrics`, `/healthz` and `/readyz` where `EASEL_METRICS_ADDR`
/// says, if it says.
///
/// # Errors
/// When the address cannot be bound.
async fn serve_watch(
    settings: &Settings,
    watch: &Watch,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    if let Some(addr) = settings.metrics_addr {
        let dashboard = settings
            .dashboard_token
            .clone()
            .map(|token| crate::dashboard::router(token, Arc::clone(&watch.board)));
        crate::health::serve(
            addr,
            Arc::clone(&watch.health),
            Arc::clone(&watch.metrics),
            dashboard,
            shutdown.clone(),
        )
        .await
        .map_err(|e| {
            StartError::Other(anyhow::anyhow!(
                "cannot listen on {addr} (EASEL_METRICS_ADDR): {e}"
            ))
        })?;
    }
    Ok(())
}

/// Where `--webhook` listens and the secret it checks.
///
/// # Errors
/// A configuration error when either is missing.
fn webhook_settings(
    settings: &Settings,
) -> Result<(std::net::SocketAddr, secrecy::SecretString), StartError> {
    match (settings.webhook.listen, settings.webhook.secret.clone()) {
        (Some(addr), Some(secret)) => Ok((addr, secret)),
        _ => Err(StartError::Config(
            "`easel run --webhook` needs EASEL_WEBHOOK_LISTEN (where to listen) and EASEL_WEBHOOK_SECRET (the secret token `easel webhook set` registered).".into(),
        )),
    }
}

/// Serves the webhook route (`--webhook`) on `EASEL_WEBHOOK_LISTEN`,
/// handing updates to whatever intake `slot` holds.
///
/// # Errors
/// A configuration error without the listen address or the secret; the
/// address cannot be bound.
async fn serve_webhook<E: crate::engine::Engine>(
    settings: &Settings,
    slot: &crate::telegram::webhook::Slot<E>,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    let (addr, secret) = webhook_settings(settings)?;
    crate::telegram::webhook::serve(addr, Arc::clone(slot), secret, shutdown.clone())
        .await
        .map_err(|e| {
            StartError::Other(anyhow::anyhow!(
                "cannot listen on {addr} (EASEL_WEBHOOK_LISTEN): {e}"
            ))
        })?;
    Ok(())
}

/// What an engine talks to outside the log: the image folder, the
/// workers, the LLM, and Telegram — answered (`getMe`) and the command
/// menu set.
struct Outside {
    images: Arc<ImageStore>,
    generator: Arc<ImageWorkers>,
    enhancer: Arc<LlmEnhancer>,
    api: Arc<TelegramApi>,
    retries: Retries,
    /// The bot's @username, as Telegram told us.
    username: String,
}

/// Builds [`Outside`], watched by `watch`, with Telegram calls paced at
/// `1/share` of the overall budget (replicas, §9).
async fn connect_outside(
    settings: &Settings,
    token: secrecy::SecretString,
    watch: &Watch,
    share: u32,
    shutdown: &CancellationToken,
) -> Result<Outside, StartError> {
    let Watch {
        health,
        metrics,
        alerts,
        ..
    } = watch;
    let images = Arc::new(
        ImageStore::open(&settings.data_dir.images()).context("opening the image folder")?,
    );
    let client = http_client(settings).context("building the HTTP client")?;
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let retries = Retries::default();
    let generator = Arc::new(
        ImageWorkers::new(client.clone(), settings, Arc::clone(&permits))
            .with_retries(retries.clone())
            .with_watchers(Arc::clone(metrics), Arc::clone(alerts)),
    );
    let enhancer =
        Arc::new(LlmEnhancer::new(client, settings, permits).with_metrics(Arc::clone(metrics)));
    let api = Arc::new(
        TelegramApi::new(
            token,
            settings.telegram_api_url.expose().clone(),
            shutdown.clone(),
        )
        .context("building the Telegram client")?
        .with_share(share)
        .with_health(Arc::clone(health))
        .with_watchers(Arc::clone(metrics), Arc::clone(alerts)),
    );
    alerts.send_with(&api);
    let username = who_am_i(&api, shutdown.clone()).await?;
    health.set(crate::health::Part::Telegram, None);
    tracing::info!(%username, "connected to Telegram");
    set_commands(&api, settings).await;
    Ok(Outside {
        images,
        generator,
        enhancer,
        api,
        retries,
        username,
    })
}

/// The Telegram side of an engine: its status board and its janitor
/// spawned into `tasks`, and the intake updates go to.
#[allow(clippy::too_many_arguments)]
fn telegram_side<E: crate::engine::Engine>(
    core: &Arc<E>,
    outside: &Outside,
    settings: &Arc<Settings>,
    watch: &Watch,
    refused: Refused,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Arc<Intake<E>> {
    let (board, board_task) = StatusBoard::new(
        Arc::clone(core),
        Arc::clone(&outside.api),
        outside.retries.clone(),
        Some(Arc::clone(&watch.alerts)),
        shutdown.clone(),
    );
    tasks.spawn(board_task);
    tasks.spawn(crate::maintenance::janitor(
        Arc::clone(core),
        Arc::clone(&outside.images),
        Arc::clone(settings),
        Some(Arc::clone(&watch.metrics)),
        shutdown.clone(),
    ));
    Arc::new(Intake {
        core: Arc::clone(core),
        api: Arc::clone(&outside.api),
        settings: Arc::clone(settings),
        board,
        images: Arc::clone(&outside.images),
        username: outside.username.clone(),
        refused,
        metrics: Some(Arc::clone(&watch.metrics)),
    })
}

/// The command menu in every language easel speaks: English as the
/// default, and one menu per other language for users whose Telegram is
/// set to it. Best effort: the bot works without a menu.
async fn set_commands(api: &TelegramApi, settings: &Settings) {
    use teloxide::payloads::SetMyCommandsSetters;
    for lang in crate::telegram::words::Lang::ALL {
        let commands = crate::telegram::words::commands(lang, !settings.presets.is_empty())
            .into_iter()
            .map(|(name, about)| BotCommand::new(name, about))
            .collect::<Vec<_>>();
        let mut call = api.bot().set_my_commands(commands);
        if let Some(code) = lang.menu_code() {
            call = call.language_code(code);
        }
        let r = call.await;
        api.count_call("setMyCommands", &r);
        if let Err(e) = r {
            tracing::warn!(error = %api.describe(&e), ?lang, "setMyCommands failed");
        }
    }
}

/// getMe, retried with backoff (500 ms doubling to 30 s, with jitter) while
/// Telegram cannot be reached or answers with a server error; only a
/// refused token (`401 Unauthorized`, `404 Not Found`) is a configuration
/// error. A Telegram outage at start, or during a restart after the disk
/// filled, must not stop the bot.
async fn who_am_i(api: &TelegramApi, shutdown: CancellationToken) -> Result<String, StartError> {
    use backon::{ExponentialBuilder, Retryable};
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .with_jitter();
    let bad_token = |e: &teloxide::RequestError| {
        matches!(
            e,
            teloxide::RequestError::Api(teloxide::ApiError::InvalidToken)
        )
    };
    let get_me = (|| async {
        let r = api.bot().get_me().await;
        api.count_call("getMe", &r);
        r
    })
    .retry(backoff)
    .sleep(tokio::time::sleep)
    .when(|e| !bad_token(e))
    .notify(|e, wait| {
        tracing::warn!(error = %api.describe(e), ?wait, "Telegram is not reachable yet (getMe)");
    });
    tokio::select! {
        r = get_me => match r {
            Ok(me) => Ok(me.user.username.clone().unwrap_or_default()),
            Err(e) => Err(StartError::Config(format!(
                "Telegram refused TELEGRAM_BOT_TOKEN ({}); check the token from @BotFather.",
                api.describe(&e)
            ))),
        },
        () = shutdown.cancelled() => Err(StartError::Other(anyhow::anyhow!("stopped before Telegram answered"))),
    }
}
