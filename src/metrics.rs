//! Prometheus metrics (§7): every series easel exports, how `GET /metrics`
//! renders them, and [`follow`], the projection that turns the event log
//! into the request series (accepted, finished, stage durations, appends).
//!
//! Built on `prometheus-client` (the Prometheus project's own Rust client):
//! metrics live in a [`Registry`] value, not a process-wide recorder, so
//! every bot in a test process (and every engine after a restart) has its
//! own, and label sets are typed structs, so an unbounded label (a user
//! id, a prompt) cannot be written by accident. It renders the OpenMetrics
//! text format, which Prometheus negotiates and reads natively. Units are
//! in the names (`_seconds`), without `# UNIT` lines, which some parsers
//! refuse on histograms. Help texts end without a period: the encoder
//! adds one.
//!
//! What the log already says is counted from the log, once per event,
//! by a task that reads what was appended (like the status board): a
//! request counted "done" is one whose `delivered` is in the log. What the
//! log does not keep — each worker attempt, each LLM and Telegram call,
//! each group-commit flush — is counted where it happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::domain::{Event, FailureKind, ModelName, RequestId};
use crate::store::{EventStore, Recorded};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A configured model's name: the only per-request label (bounded by the
/// configuration).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    done,
    failed,
    cancelled,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub model: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub model: String,
    /// `FailureKind::as_str`: eight values.
    pub reason: String,
}

/// Why intake turned a request away before it was queued.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejection {
    /// `EASEL_ALLOWED_USERS` does not name the user.
    not_allowed,
    /// The per-user rate limit.
    rate_limited,
    /// The per-user cap on unfinished requests.
    too_many_pending,
    /// A model that is not configured (or unknown).
    unknown_model,
    /// A prompt too long, empty, or a bad count of images or preset.
    invalid,
    /// The event log could not take it (disk full, engine restarting).
    unavailable,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub reason: Rejection,
}

/// A stage a request spends time in.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StageLabel {
    /// Queued → Started.
    queue_wait,
    enhancing,
    generating,
    sending,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub model: String,
    pub stage: StageLabel,
}

/// One worker attempt's answer, by class: `2xx`, `4xx`, `5xx`, `timeout`,
/// `connect`, `not_image`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub model: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` (enhanced), `skipped` (no LLM configured), `timeout`,
    /// `unreachable`, `http_error`, `bad_answer`, `shutting_down`; all but
    /// `ok` draw the user's own prompt.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TelegramLabels {
    /// The Bot API method (`sendMessage`, `getUpdates`, …): a fixed set.
    pub method: &'static str,
    /// `ok`, `not_modified`, `rate_limited` (429), `network`, `api_error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// `worker_key`, `model_failing`, `log_refuses`, `telegram_unreachable`.
    pub cause: &'static str,
    /// `alert` or `recovered`.
    pub kind: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// What the lanes look like now, read at each scrape.
pub type LaneReader = Box<dyn Fn() -> Vec<LaneNow> + Send + Sync>;

/// One model's lane at scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneNow {
    pub model: String,
    pub queued: usize,
    pub in_flight: bool,
    /// How long the head of the queue has waited.
    pub oldest_wait: Duration,
}

/// Every series, registered once.
pub struct Metrics {
    registry: Registry,
    pub accepted: Family<ModelLabel, Counter>,
    pub finished: Family<FinishedLabels, Counter>,
    pub failed: Family<FailedLabels, Counter>,
    pub rejected: Family<RejectionLabels, Counter>,
    pub stage_seconds: Histograms<StageLabels>,
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub oldest_wait: Family<ModelLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub worker_attempts: Family<AttemptLabels, Counter>,
    pub llm_calls: Family<OutcomeLabels, Counter>,
    pub telegram_calls: Family<TelegramLabels, Counter>,
    pub log_appends: Counter,
    pub flush_seconds: Histogram,
    pub flush_events: Histogram,
    pub retention_sweeps: Family<SweepLabels, Counter>,
    pub retention_archived: Counter,
    pub alerts: Family<AlertLabels, Counter>,
    pub engine_starts: Counter,
    lanes: Mutex<Option<LaneReader>>,
}

fn stage_histogram() -> Histogram {
    // 5 ms to ~12 min: a send takes milliseconds, a queue wait minutes.
    Histogram::new(exponential_buckets(0.005, 2.5, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("easel");
        let accepted = Family::default();
        r.register(
            "requests_accepted",
            "Requests queued (their Queued is in the log), by model",
            accepted.clone(),
        );
        let finished = Family::default();
        r.register(
            "requests_finished",
            "Requests that reached a terminal stage, by model and outcome (done, failed, cancelled)",
            finished.clone(),
        );
        let failed = Family::default();
        r.register(
            "requests_failed",
            "Failed requests by model and reason (rejected, unavailable, timed_out, bad_answer, refused, not_configured, delivery, internal)",
            failed.clone(),
        );
        let rejected = Family::default();
        r.register(
            "requests_rejected",
            "Requests turned away before they were queued, by reason",
            rejected.clone(),
        );
        let stage_seconds: Histograms<StageLabels> = Family::new_with_constructor(stage_histogram);
        r.register(
            "stage_duration_seconds",
            "Time a request spent in each stage (queue_wait, enhancing, generating, sending), by model",
            stage_seconds.clone(),
        );
        let queue_depth = Family::default();
        r.register(
            "queue_depth",
            "Requests waiting in each model's queue (not counting the one in flight)",
            queue_depth.clone(),
        );
        let in_flight = Family::default();
        r.register(
            "requests_in_flight",
            "Requests being worked on per model (0 or 1: one at a time)",
            in_flight.clone(),
        );
        let oldest_wait = Family::default();
        r.register(
            "queue_oldest_wait_seconds",
            "How long the head of each model's queue has waited",
            oldest_wait.clone(),
        );
        let worker_attempts = Family::default();
        r.register(
            "worker_attempts",
            "Image worker calls by model and answer class (2xx, 4xx, 5xx, timeout, connect, not_image)",
            worker_attempts.clone(),
        );
        let llm_calls = Family::default();
        r.register(
            "llm_calls",
            "Prompt enhancements by outcome (ok, skipped, timeout, unreachable, http_error, bad_answer, shutting_down); all but ok use the user's own prompt",
            llm_calls.clone(),
        );
        let telegram_calls = Family::default();
        r.register(
            "telegram_calls",
            "Telegram Bot API calls by method and result (ok, not_modified, rate_limited, network, api_error); each try counts",
            telegram_calls.clone(),
        );
        let log_appends = Counter::default();
        r.register(
            "log_events_appended",
            "Events appended to the event log",
            log_appends.clone(),
        );
        let flush_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        r.register(
            "log_flush_duration_seconds",
            "Time of each group-commit flush (write and fdatasync)",
            flush_seconds.clone(),
        );
        let flush_events = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        r.register(
            "log_flush_batch_events",
            "Events made durable by each group-commit flush",
            flush_events.clone(),
        );
        let retention_sweeps = Family::default();
        r.register(
            "retention_sweeps",
            "Retention sweeps (finished requests moved to the archive), by result",
            retention_sweeps.clone(),
        );
        let retention_archived = Counter::default();
        r.register(
            "retention_archived_requests",
            "Requests moved from the log to the archive",
            retention_archived.clone(),
        );
        let alerts = Family::default();
        r.register(
            "operator_alerts",
            "Messages sent to the operator chat, by cause and kind (alert, recovered)",
            alerts.clone(),
        );
        let engine_starts = Counter::default();
        r.register(
            "engine_starts",
            "Engine starts in this process (more than one: the log refused writes and the engine restarted)",
            engine_starts.clone(),
        );
        Metrics {
            registry: r,
            accepted,
            finished,
            failed,
            rejected,
            stage_seconds,
            queue_depth,
            in_flight,
            oldest_wait,
            worker_attempts,
            llm_calls,
            telegram_calls,
            log_appends,
            flush_seconds,
            flush_events,
            retention_sweeps,
            retention_archived,
            alerts,
            engine_starts,
            lanes: Mutex::new(None),
        }
    }

    /// Where the queue gauges are read from at each scrape (the running
    /// engine's projection); replaced at every engine start.
    pub fn read_lanes_with(&self, reader: LaneReader) {
        *self.lanes.lock().unwrap_or_else(PoisonError::into_inner) = Some(reader);
    }

    /// The OpenMetrics text of every series, gauges read now.
    pub fn render(&self) -> String {
        if let Some(read) = self
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            for lane in read() {
                let label = ModelLabel { model: lane.model };
                self.queue_depth
                    .get_or_create(&label)
                    .set(i64::try_from(lane.queued).unwrap_or(i64::MAX));
                self.in_flight
                    .get_or_create(&label)
                    .set(i64::from(lane.in_flight));
                self.oldest_wait
                    .get_or_create(&label)
                    .set(lane.oldest_wait.as_secs_f64());
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// One worker attempt's answer.
    pub fn worker_attempt(&self, model: &ModelName, status: &'static str) {
        self.worker_attempts
            .get_or_create(&AttemptLabels {
                model: model.as_str().to_owned(),
                status,
            })
            .inc();
    }

    pub fn telegram_call(&self, method: &'static str, result: &'static str) {
        self.telegram_calls
            .get_or_create(&TelegramLabels { method, result })
            .inc();
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejected
            .get_or_create(&RejectionLabels { reason })
            .inc();
    }

    pub fn enhancement(&self, outcome: &'static str) {
        self.llm_calls
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// One group-commit flush that made `events` durable.
    pub fn flushed(&self, took: Duration, events: u64) {
        self.flush_seconds.observe(took.as_secs_f64());
        // An f64 holds every count a flush can cover exactly enough.
        #[allow(clippy::cast_precision_loss)]
        self.flush_events.observe(events as f64);
    }

    /// The answer class of an HTTP status.
    pub fn status_class(status: u16) -> &'static str {
        match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        }
    }
}

/// The lanes of `core`'s projection, for [`Metrics::read_lanes_with`].
/// Holds the core weakly: the store's flush observer holds the metrics, so
/// a strong handle would keep the log (and its lock) alive for ever.
pub fn lanes_of<E: crate::engine::Engine>(core: &Arc<E>) -> LaneReader {
    let core = Arc::downgrade(core);
    Box::new(move || {
        let Some(core) = core.upgrade() else {
            return Vec::new();
        };
        let now = core.now();
        core.read(|s| {
            s.lanes()
                .map(|(model, lane)| {
                    let oldest_wait = lane
                        .queue
                        .head()
                        .and_then(|id| s.request(id))
                        .and_then(|r| (now - r.queued_at).to_std().ok())
                        .unwrap_or_default();
                    LaneNow {
                        model: model.as_str().to_owned(),
                        queued: lane.queue.len(),
                        in_flight: lane.in_flight.is_some(),
                        oldest_wait,
                    }
                })
                .collect()
        })
    })
}

/// Where a request is, as [`follow`] tracks it.
struct Tracked {
    model: ModelName,
    /// When its current stage began, when known (a request found mid-stage
    /// at start gets no observation for that stage).
    since: Option<DateTime<Utc>>,
}

/// The request series as a projection of the log: reads every event
/// appended after the engine started (woken by the store's subscription,
/// never polling) and counts it. Also tells `on_outcome` whether each
/// generation worked (`generated`: Ok) or its request failed (Err), for
/// the operator alerts ("a model failing N requests in a row").
pub async fn follow<E: crate::engine::Engine>(
    core: Arc<E>,
    metrics: Arc<Metrics>,
    mut on_outcome: impl FnMut(&ModelName, Result<(), FailureKind>) + Send,
    shutdown: CancellationToken,
) {
    let mut appended = core.store().subscribe();
    // Start where the log is now, with what is in flight.
    let (mut last, mut tracked) = core.read(|s| {
        let tracked: HashMap<RequestId, Tracked> = s
            .requests()
            .map(|r| {
                let since = match r.stage {
                    crate::domain::Stage::Queued => Some(r.queued_at),
                    crate::domain::Stage::Enhancing => r.started_at,
                    _ => None,
                };
                (
                    r.id,
                    Tracked {
                        model: r.model.clone(),
                        since,
                    },
                )
            })
            .collect();
        (s.last_seq, tracked)
    });
    loop {
        let target = core.store().last_seq();
        if target > last {
            // Only what is on disk is read: an event whose write the disk
            // refused can leave sled's readers waiting for good (seen in
            // the disk-full campaign as an engine that could not stop).
            // A log that refused a flush is being replaced: stop here.
            if core.durable(target).await.is_err() {
                shutdown.cancelled().await;
                return;
            }
            let records: Vec<Recorded> = core
                .store()
                .read_from(last + 1)
                .take_while(|r| r.as_ref().map_or(true, |r| r.seq <= target))
                .filter_map(Result::ok)
                .collect();
            for rec in &records {
                count(&metrics, &mut tracked, rec, &mut on_outcome);
            }
            last = target;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = appended.changed() => if changed.is_err() { return },
        }
    }
}

fn count(
    metrics: &Metrics,
    tracked: &mut HashMap<RequestId, Tracked>,
    rec: &Recorded,
    on_outcome: &mut impl FnMut(&ModelName, Result<(), FailureKind>),
) {
    metrics.log_appends.inc();
    let id = rec.request_id;
    if let Event::Queued { model, .. } = &rec.event {
        metrics
            .accepted
            .get_or_create(&ModelLabel {
                model: model.as_str().to_owned(),
            })
            .inc();
        tracked.insert(
            id,
            Tracked {
                model: model.clone(),
                since: Some(rec.at),
            },
        );
        return;
    }
    let Some(t) = tracked.get_mut(&id) else {
        return;
    };
    let model = t.model.as_str().to_owned();
    let observe = |stage: StageLabel, since: Option<DateTime<Utc>>| {
        if let Some(took) = since.and_then(|s| (rec.at - s).to_std().ok()) {
            metrics
                .stage_seconds
                .get_or_create(&StageLabels {
                    model: model.clone(),
                    stage,
                })
                .observe(took.as_secs_f64());
        }
    };
    let finished = match &rec.event {
        Event::Started => {
            observe(StageLabel::queue_wait, t.since);
            None
        }
        Event::Enhanced { .. } => {
            observe(StageLabel::enhancing, t.since);
            None
        }
        Event::Generated { .. } => {
            observe(StageLabel::generating, t.since);
            None
        }
        Event::Delivered { .. } => {
            observe(StageLabel::sending, t.since);
            Some((Outcome::done, None))
        }
        Event::Failed { kind, .. } => Some((Outcome::failed, Some(*kind))),
        Event::Cancelled => Some((Outcome::cancelled, None)),
        // A restart's recovery steps: the stage starts over now. An image of
        // a variation request is part of its Generating.
        Event::Resumed { .. } | Event::Regenerating => {
            t.since = Some(rec.at);
            return;
        }
        Event::Variation { .. } | Event::Queued { .. } | Event::ModelChosen { .. } => return,
    };
    t.since = Some(rec.at);
    if let Some((outcome, kind)) = finished {
        metrics
            .finished
            .get_or_create(&FinishedLabels {
                model: model.clone(),
                outcome,
            })
            .inc();
        if let Some(kind) = kind {
            metrics
                .failed
                .get_or_create(&FailedLabels {
                    model,
                    reason: kind.as_str().to_owned(),
                })
                .inc();
        }
        if let (Some(t), Some(kind)) = (tracked.remove(&id), kind) {
            on_outcome(&t.model, Err(kind));
        }
    } else if matches!(rec.event, Event::Generated { .. }) {
        on_outcome(&t.model, Ok(()));
    }
}
