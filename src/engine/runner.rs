//! One runner per model: takes the head of its queue when the model is idle
//! and carries the request through enhance → generate → deliver, appending
//! each transition before acting on it. The outside steps are traits that
//! the services and the bot implement; `try_execute_step` is the one-step
//! function tests drive deterministically; `run` loops it, woken by events.

use std::future::Future;
use std::sync::Arc;

use super::{Core, CoreError, ImageStore};
use crate::domain::{Command, FailureKind, ModelName, RequestId, Stage};
use crate::projection::ActiveRequest;
use crate::store::EventStore;
use tokio_util::sync::CancellationToken;

/// The prompt to generate from. `fallback` is why the original is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enhancement {
    pub prompt: String,
    pub fallback: Option<String>,
}

/// Improves a prompt. Never fails: a failure gives back the original prompt.
pub trait Enhancer: Send + Sync + 'static {
    fn enhance(&self, prompt: &str) -> impl Future<Output = Enhancement> + Send;
}

/// An image from a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedImage {
    pub bytes: Vec<u8>,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
    pub attempts: u32,
    /// What each attempt got, for the audit (e.g. `503`, `timeout`, `200`).
    pub statuses: Vec<String>,
}

/// A worker failure after its retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationFailure {
    pub kind: FailureKind,
    pub reason: String,
    pub attempts: u32,
    /// What each attempt got, for the audit.
    pub statuses: Vec<String>,
}

/// Asks a model's worker for an image.
pub trait Generator: Send + Sync + 'static {
    /// `input`: the input image of an image-to-image request (§8).
    fn generate(
        &self,
        model: &ModelName,
        prompt: &str,
        input: Option<&[u8]>,
    ) -> impl Future<Output = Result<GeneratedImage, GenerationFailure>> + Send;
}

/// The command a delivery's result makes: done, failed, or nothing to
/// record (cut short by the shutdown: resumed after the next start).
fn delivered(result: Result<Delivery, DeliveryFailure>) -> Option<Command> {
    match result {
        Ok(d) => Some(Command::FinishSending {
            message_id: d.message_id,
        }),
        Err(DeliveryFailure::Refused { reason }) => Some(Command::Fail {
            kind: FailureKind::Delivery,
            reason,
            attempts: 0,
            statuses: Vec::new(),
        }),
        Err(DeliveryFailure::Interrupted) => None,
    }
}

/// Telegram took the image.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Delivery {
    pub message_id: Option<i32>,
}

/// Why the image was not delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryFailure {
    /// Telegram will not take it (after its own retries): the request fails.
    Refused { reason: String },
    /// Cut short by the shutdown while it waited (a 429, a network
    /// backoff): nothing is recorded, and the request stays in Sending to
    /// be resumed — its kept image sent again — after the next start.
    Interrupted,
}

/// One kept image to send: its bytes and format (`png`, `jpeg`, `webp`).
#[derive(Clone, Debug)]
pub struct KeptImage {
    pub bytes: Vec<u8>,
    pub format: String,
}

/// Sends the image to the user.
pub trait Deliverer: Send + Sync + 'static {
    fn deliver(
        &self,
        request: &ActiveRequest,
        image: &[u8],
        format: &str,
    ) -> impl Future<Output = Result<Delivery, DeliveryFailure>> + Send;

    /// The kept images of a variation request (§8), as one album; the
    /// request's `variations` say which images failed.
    fn deliver_album(
        &self,
        request: &ActiveRequest,
        images: &[KeptImage],
    ) -> impl Future<Output = Result<Delivery, DeliveryFailure>> + Send;
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Nothing to do for this model.
    EmptyQueue,
    /// The request moved on; `event` is the event appended.
    Progressed {
        id: RequestId,
        event: &'static str,
        stage: Stage,
    },
    /// The step was cut short by the shutdown; nothing was recorded and
    /// the request resumes where it is after the next start.
    Interrupted { id: RequestId },
}

/// The runner of one model.
pub struct Runner<S: EventStore, E, G, D> {
    core: Arc<Core<S>>,
    stages: Stages<E, G, D>,
}

/// The work of one model's in-flight stages, whoever records the result:
/// the single-process [`Runner`] through `Core`, or a replica's runner
/// under the model's lease (`engine::replica`).
pub struct Stages<E, G, D> {
    model: ModelName,
    enhancer: Arc<E>,
    generator: Arc<G>,
    deliverer: Arc<D>,
    images: Arc<ImageStore>,
}

impl<S: EventStore, E: Enhancer, G: Generator, D: Deliverer> Runner<S, E, G, D> {
    pub fn new(
        core: Arc<Core<S>>,
        model: ModelName,
        enhancer: Arc<E>,
        generator: Arc<G>,
        deliverer: Arc<D>,
        images: Arc<ImageStore>,
    ) -> Self {
        Runner {
            core,
            stages: Stages::new(model, enhancer, generator, deliverer, images),
        }
    }

    pub fn model(&self) -> &ModelName {
        &self.stages.model
    }

    /// Does the next thing for this model: start the head of the queue if
    /// idle, else run the in-flight request's current stage once.
    ///
    /// # Errors
    /// A store error (the request stays where it was and can be retried).
    pub async fn try_execute_step(&self) -> Result<StepOutcome, CoreError> {
        let model = &self.stages.model;
        let current = self
            .core
            .read(|s| s.in_flight(model).and_then(|id| s.request(id).cloned()));
        let Some(req) = current else {
            return Ok(match self.core.start_next(model).await? {
                Some(rec) => {
                    tracing::info!(request_id = %rec.request_id, model = %model, "started");
                    StepOutcome::Progressed {
                        id: rec.request_id,
                        event: rec.event.name(),
                        stage: Stage::Enhancing,
                    }
                }
                None => StepOutcome::EmptyQueue,
            });
        };
        // Every line logged during the step (worker retries, the LLM,
        // Telegram calls, the core) carries the request id and model.
        let span = tracing::info_span!("step", request_id = %req.id, model = %model, stage = req.stage.as_str());
        let step = async {
            // The projection only names Enhancing/Generating/Sending as in flight.
            if !req.stage.is_in_flight() {
                return Err(CoreError::NotFound(req.id));
            }
            let Some(command) = self.stages.work(&req).await else {
                tracing::info!("cut short by the shutdown; resumes after the next start");
                return Ok(None);
            };
            let rec = self.core.execute(req.id, command).await?;
            // One line per transition at info: with JSON logs, what an
            // operator follows a request by (its span names it).
            tracing::info!(event = rec.event.name(), seq = rec.seq, "step recorded");
            Ok(Some(rec))
        };
        let Some(rec) = tracing::Instrument::instrument(step, span).await? else {
            return Ok(StepOutcome::Interrupted { id: req.id });
        };
        let stage = self.core.read(|s| s.request(req.id).map(|r| r.stage));
        Ok(StepOutcome::Progressed {
            id: req.id,
            event: rec.event.name(),
            stage: stage.unwrap_or(match rec.event {
                crate::domain::Event::Delivered { .. } => Stage::Done,
                crate::domain::Event::Cancelled => Stage::Cancelled,
                _ => Stage::Failed,
            }),
        })
    }

    /// Steps until there is nothing to do, then sleeps until the log grows;
    /// returns when `shutdown` is cancelled. A step cut short by shutdown
    /// leaves its request in its stage, to be resumed after restart.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut appended = self.core.store().subscribe();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            appended.borrow_and_update();
            let step = tokio::select! {
                r = self.try_execute_step() => r,
                () = shutdown.cancelled() => return,
            };
            match step {
                Ok(StepOutcome::Progressed { .. }) => {}
                Ok(StepOutcome::Interrupted { .. }) => return,
                Ok(StepOutcome::EmptyQueue) => {
                    tokio::select! {
                        r = appended.changed() => if r.is_err() { return },
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::error!(model = %self.stages.model, error = %e, "runner step failed; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {},
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

impl<E: Enhancer, G: Generator, D: Deliverer> Stages<E, G, D> {
    pub fn new(
        model: ModelName,
        enhancer: Arc<E>,
        generator: Arc<G>,
        deliverer: Arc<D>,
        images: Arc<ImageStore>,
    ) -> Self {
        Stages {
            model,
            enhancer,
            generator,
            deliverer,
            images,
        }
    }

    pub fn model(&self) -> &ModelName {
        &self.model
    }

    /// Does `req`'s current stage once and says what to record; None when
    /// the shutdown cut it short (or it is not in flight): nothing to
    /// record, the request resumes where it is.
    pub async fn work(&self, req: &ActiveRequest) -> Option<Command> {
        match req.stage {
            Stage::Enhancing => self.enhance(req).await,
            Stage::Generating => self.generate(req).await,
            Stage::Sending => self.send(req).await,
            // The projection only names Enhancing/Generating/Sending as in flight.
            Stage::Queued | Stage::Done | Stage::Failed | Stage::Cancelled => None,
        }
    }

    /// Enhancing: the LLM's prompt, or the original with the reason why.
    async fn enhance(&self, req: &ActiveRequest) -> Option<Command> {
        let e = self.enhancer.enhance(req.prompt.as_str()).await;
        Some(Command::FinishEnhancing {
            prompt: e.prompt,
            fallback: e.fallback,
        })
    }

    /// Generating: the worker's image, kept on disk (and synced) before
    /// `Generated` is recorded; or the failure.
    async fn generate(&self, req: &ActiveRequest) -> Option<Command> {
        if req.images > 1 {
            return self.generate_variation(req).await;
        }
        let generated = match self.draw(req).await {
            Ok(generated) => generated,
            Err(fail) => return Some(fail),
        };
        Some(match generated {
            Ok(img) => match self.images.keep(req.id, &img.bytes, &img.format) {
                Ok(image) => Command::FinishGenerating {
                    image,
                    attempts: img.attempts,
                    statuses: img.statuses,
                },
                Err(e) => {
                    tracing::error!(error = %e, "could not keep the image");
                    Command::Fail {
                        kind: FailureKind::Internal,
                        reason: format!("could not keep the image: {}", e.kind()),
                        attempts: img.attempts,
                        statuses: img.statuses,
                    }
                }
            },
            Err(f) => Command::Fail {
                kind: f.kind,
                reason: f.reason,
                attempts: f.attempts,
                statuses: f.statuses,
            },
        })
    }

    /// One call of the generator for `req`: the enhanced prompt (or the
    /// user's), and for image to image the kept input, read once for all of
    /// the call's attempts. Err: the request fails (its input is gone).
    async fn draw(
        &self,
        req: &ActiveRequest,
    ) -> Result<Result<GeneratedImage, GenerationFailure>, Command> {
        let prompt = req
            .enhanced_prompt
            .as_deref()
            .unwrap_or(req.prompt.as_str());
        let input = match &req.input {
            None => None,
            Some(kept) => match self.images.load(kept) {
                Ok(Some(bytes)) => Some(bytes),
                Ok(None) | Err(_) => {
                    return Err(Command::Fail {
                        kind: FailureKind::Internal,
                        reason: "the input image is no longer on disk".into(),
                        attempts: 0,
                        statuses: Vec::new(),
                    });
                }
            },
        };
        Ok(self
            .generator
            .generate(&self.model, prompt, input.as_deref())
            .await)
    }

    /// Generating a variation request (§8): the next image not yet done
    /// — kept on disk before its `variation` is recorded, or its failure —
    /// so a restart resumes at the first missing image and never makes a
    /// kept one again. After the last: `generated` naming the first kept
    /// image, or `failed` when none was.
    async fn generate_variation(&self, req: &ActiveRequest) -> Option<Command> {
        let index = req.variations.len() as u32 + 1;
        if index > req.images {
            let kept = req.variations.iter().find_map(|v| v.image.clone());
            return Some(match kept {
                Some(image) => Command::FinishGenerating {
                    image,
                    attempts: 0,
                    statuses: Vec::new(),
                },
                None => {
                    let last = req.variations.iter().rev().find_map(|v| v.failure.clone());
                    Command::Fail {
                        kind: last.as_ref().map_or(FailureKind::Internal, |f| f.kind),
                        reason: format!(
                            "none of the {} images was made{}",
                            req.images,
                            last.map(|f| format!(" (last: {})", f.reason))
                                .unwrap_or_default()
                        ),
                        attempts: 0,
                        statuses: Vec::new(),
                    }
                }
            });
        }
        let generated = match self.draw(req).await {
            Ok(generated) => generated,
            Err(fail) => return Some(fail),
        };
        let failed = |kind, reason, attempts, statuses| Command::RecordVariation {
            index,
            image: None,
            failure: Some(crate::domain::VariationFailure { kind, reason }),
            attempts,
            statuses,
        };
        Some(match generated {
            Ok(img) => match self
                .images
                .keep_variation(req.id, index, &img.bytes, &img.format)
            {
                Ok(image) => Command::RecordVariation {
                    index,
                    image: Some(image),
                    failure: None,
                    attempts: img.attempts,
                    statuses: img.statuses,
                },
                Err(e) => {
                    tracing::error!(error = %e, "could not keep an image");
                    failed(
                        FailureKind::Internal,
                        format!("could not keep the image: {}", e.kind()),
                        img.attempts,
                        img.statuses,
                    )
                }
            },
            Err(f) => failed(f.kind, f.reason, f.attempts, f.statuses),
        })
    }

    /// Sending: the kept image to the user; without it (gone or
    /// unreadable), back to Generating. None when the shutdown cut the
    /// delivery short: nothing to record.
    async fn send(&self, req: &ActiveRequest) -> Option<Command> {
        if req.images > 1 {
            // The album: every kept image still on disk; none → made again.
            let kept: Vec<KeptImage> = req
                .variations
                .iter()
                .filter_map(|v| v.image.as_ref())
                .filter_map(|i| {
                    self.images.load(i).ok().flatten().map(|bytes| KeptImage {
                        bytes,
                        format: i.format.clone(),
                    })
                })
                .collect();
            if kept.is_empty() {
                return Some(Command::Regenerate);
            }
            return delivered(self.deliverer.deliver_album(req, &kept).await);
        }
        let kept = match &req.image {
            Some(image) => self
                .images
                .load(image)
                .map(|b| b.map(|b| (b, image.format.clone()))),
            None => Ok(None),
        };
        match kept {
            Ok(Some((bytes, format))) => {
                delivered(self.deliverer.deliver(req, &bytes, &format).await)
            }
            Ok(None) | Err(_) => Some(Command::Regenerate),
        }
    }
}
