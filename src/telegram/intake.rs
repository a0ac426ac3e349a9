//! Intake: one Telegram update in, replies out. Admission runs in the order
//! of the contract: allowlist → validation → limits (from the projections)
//! → durable `Queued` → only then the "Queued for …" reply. Redelivered
//! updates find their request instead of making a second one.

use std::sync::Arc;

use teloxide::types::{CallbackQuery, InputFile, Message, PhotoSize, Update, UpdateKind};

use super::api::{Policy, TelegramApi};
use super::parse::{Button, Input, parse};
use super::replies::{FileKind, Reply, Upload};
use super::status::StatusBoard;
use super::turn::Turn;
use super::words::{self, Lang};
use crate::config::Settings;
use crate::domain::ids::InvalidPrompt;
use crate::domain::{
    ChatId, Event, ModelName, Origin, PresetUse, Prompt, Rejection, RequestId, UserId,
};
use crate::engine::{AcceptError, Admitted, Cancel, Engine, ImageStore, NewRequest};

pub struct Intake<E: Engine> {
    pub core: Arc<E>,
    pub api: Arc<TelegramApi>,
    pub settings: Arc<Settings>,
    pub board: StatusBoard,
    pub images: Arc<ImageStore>,
    /// Our @username, without the `@`.
    pub username: String,
    /// Requests whose user was told "couldn't take that request" although
    /// their `Queued` was written (the disk refused its flush): see
    /// [`Refused`].
    pub refused: Refused,
    /// Rejections counted by reason (`easel_requests_rejected_total`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The largest photo a bot may download from Telegram (20 MB).
const MAX_INPUT_BYTES: u32 = 20_000_000;

/// The input image of an `/image` (image to image, §8).
enum InputImage {
    /// The sizes of a photo the message has or answers, to fetch.
    Photo(Vec<PhotoSize>),
    /// The input of a request drawn again (🔁 Again), already kept.
    Kept(crate::domain::ImageRef),
}

/// What an `/image` asks to draw.
enum Draw<'a> {
    /// The user's text, which may start with a preset's name;
    /// `remembered` when the model is the user's remembered choice;
    /// `images` the variations asked for (`model*N`).
    Text {
        text: &'a str,
        remembered: bool,
        images: Option<u32>,
    },
    /// A request drawn again (🔁 Again) as it was recorded.
    Again {
        prompt: &'a str,
        preset: Option<PresetUse>,
        images: u32,
    },
}

/// Requests appended but refused to their users because the disk refused
/// the flush that would have made them durable. Part of the failed flush
/// may still have reached the disk (a write cut short at a size limit
/// keeps its start), so such a request can reappear when the log is
/// reopened; the next engine of this process cancels it before it runs,
/// so "refused" means "not taken" (`app::run` hands the list over).
#[derive(Clone, Default)]
pub struct Refused(Arc<std::sync::Mutex<Vec<RequestId>>>);

impl Refused {
    fn note(&self, id: RequestId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id);
    }

    /// The noted requests.
    pub fn list(&self) -> Vec<RequestId> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Forgets `id` once it is dealt with (cancelled, or not in the log).
    pub fn done(&self, id: RequestId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|r| *r != id);
    }
}

/// What became of an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Recorded, or answered: Telegram may forget it.
    Done,
    /// Its request could not be committed and nobody was told: Telegram
    /// should deliver it again (the webhook answers `5xx`; only engines
    /// with [`Engine::REDELIVER_UNCOMMITTED`]).
    Redeliver,
}

/// What a message needs, decided before anything is recorded: the one
/// routing of both intake and the stand-in (which answers while the log
/// refuses writes). Order of the contract: not-for-us, then the
/// allowlist, then the commands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Not for us and nothing to say (plain text in a group).
    Ignore,
    /// A fixed answer; nothing is recorded or read.
    Answer(String),
    /// Needs the log: `/image`, `/queue`, `/cancel`.
    UseLog(Input),
}

/// Routes `input` from a user (`allowed` by the allowlist) in a private
/// chat or a group.
pub(crate) fn route(
    input: Input,
    private: bool,
    allowed: bool,
    settings: &Settings,
    lang: Lang,
) -> Route {
    let models = &settings.model_names();
    match input {
        // In a private chat plain text gets a hint; in groups, silence.
        Input::NotForUs if private && allowed => Route::Answer(words::usage(lang, models)),
        Input::NotForUs => Route::Ignore,
        // In a group, a command without our name may be for another bot.
        Input::UnknownCommand {
            addressed: false, ..
        } if !private => Route::Ignore,
        // The allowlist comes before anything is recorded.
        _ if !allowed => Route::Answer(words::not_allowed(lang)),
        Input::Start | Input::Help => Route::Answer(words::help(
            lang,
            models,
            &settings.limits,
            settings.presets.len(),
            settings.variations_allowed(),
        )),
        Input::Presets => Route::Answer(words::presets(lang, &settings.presets, models)),
        Input::ImageUsage => Route::Answer(words::usage(lang, models)),
        Input::UnknownCommand { .. } => Route::Answer(words::unknown_command(lang)),
        input @ (Input::Image { .. } | Input::Queue | Input::Cancel(_) | Input::Model(_)) => {
            Route::UseLog(input)
        }
    }
}

impl<E: Engine> Intake<E> {
    fn model_names(&self) -> Vec<String> {
        self.settings.model_names()
    }

    fn allowed(&self, user: i64) -> bool {
        self.settings.allows(user)
    }

    /// Handles one update. Never fails: problems become replies or logs.
    /// Records nothing before `turn` comes (the earlier updates of its batch
    /// have recorded theirs), and passes the turn on as soon as it has
    /// recorded what it records, before any reply or durability wait.
    pub async fn handle(&self, update: Update, turn: Turn) -> Handled {
        let update_id = update.id.0;
        // Every line about this update carries its id, and the request's
        // once there is one (see `answer_admission`).
        let span = tracing::info_span!(
            "update",
            update_id,
            request_id = tracing::field::Empty,
            model = tracing::field::Empty
        );
        tracing::Instrument::instrument(
            async move {
                turn.wait().await;
                match update.kind {
                    UpdateKind::Message(msg) => self.message(update_id, &msg, turn).await,
                    UpdateKind::CallbackQuery(q) => self.callback(update_id, &q, turn).await,
                    _ => Handled::Done,
                }
            },
            span,
        )
        .await
    }

    async fn send(&self, to: Reply, text: String) -> Option<Message> {
        self.api.reply(to, text).await
    }

    fn rejected(&self, reason: crate::metrics::Rejection) {
        if let Some(m) = &self.metrics {
            m.reject(reason);
        }
    }

    async fn message(&self, update_id: u32, msg: &Message, mut turn: Turn) -> Handled {
        // A photo's caption is its text (image to image, §8).
        let Some(text) = msg.text().or_else(|| msg.caption()) else {
            return Handled::Done;
        };
        let Some(user) = msg.from.as_ref() else {
            return Handled::Done;
        };
        let user_id = i64::try_from(user.id.0).unwrap_or(i64::MAX);
        let language = words::language_code(user.language_code.as_deref());
        let lang = Lang::of(language.as_deref());
        let to = Reply {
            chat: msg.chat.id.0,
            to_message: Some(msg.id.0),
        };
        let input = parse(text, Some(&self.username));
        let routed = route(
            input,
            msg.chat.is_private(),
            self.allowed(user_id),
            &self.settings,
            lang,
        );
        let input = match routed {
            Route::UseLog(input) => input,
            // Nothing to record or read: the next update may go ahead.
            Route::Ignore => return Handled::Done,
            Route::Answer(text) => {
                turn.pass();
                if !self.allowed(user_id) {
                    self.rejected(crate::metrics::Rejection::not_allowed);
                }
                self.send(to, text).await;
                return Handled::Done;
            }
        };
        match input {
            Input::Image {
                model,
                prompt,
                images,
            } => {
                let origin = Origin {
                    user_id: UserId(user_id),
                    chat_id: ChatId(msg.chat.id.0),
                    message_id: Some(msg.id.0),
                    update_id: Some(update_id),
                    language,
                };
                // No model named: the user's remembered one, else the first.
                let (model, remembered) = match model {
                    Some(m) => (m, false),
                    None => match self.default_model(UserId(user_id)) {
                        Some(chosen) => chosen,
                        None => {
                            turn.pass();
                            self.send(to, words::usage(lang, &self.model_names())).await;
                            return Handled::Done;
                        }
                    },
                };
                let draw = Draw::Text {
                    text: &prompt,
                    remembered,
                    images,
                };
                // The photo it was sent with, or the photo it answers.
                let photo = msg
                    .photo()
                    .or_else(|| msg.reply_to_message().and_then(Message::photo))
                    .map(<[PhotoSize]>::to_vec)
                    .map(InputImage::Photo);
                if self
                    .image(to, origin, &model, draw, photo, turn)
                    .await
                    .is_none()
                {
                    return Handled::Redeliver;
                }
            }
            Input::Model(choice) => {
                let text = self.model_choice(UserId(user_id), choice, lang).await;
                turn.pass();
                self.send(to, text).await;
            }
            Input::Queue => {
                let (text, seen) = self.queue_text(UserId(user_id), lang);
                turn.pass();
                // It may list a request whose "queued" still waits for the
                // disk: the list is said only once all it shows is durable
                // (a crash loses nothing a user was told about).
                let text = match self.core.durable(seen).await {
                    Ok(()) => text,
                    Err(e) => {
                        tracing::error!(error = %e, "the log refused a flush for /queue");
                        words::busy(lang)
                    }
                };
                self.send(to, text).await;
            }
            Input::Cancel(prefix) => {
                let text = match self
                    .core
                    .cancel_queued(UserId(user_id), prefix.as_deref(), Some(update_id))
                    .await
                {
                    Ok(Cancel::Ambiguous(candidates)) => {
                        let shown: Vec<(String, String)> = candidates
                            .iter()
                            .map(|(id, prompt)| (id.short(), prompt.clone()))
                            .collect();
                        words::cancel_ambiguous(lang, prefix.as_deref().unwrap_or_default(), &shown)
                    }
                    Ok(Cancel::Done(ids)) if ids.is_empty() && prefix.is_some() => {
                        words::nothing_to_cancel_with(lang, prefix.as_deref().unwrap_or_default())
                    }
                    Ok(Cancel::Done(ids)) => words::cancelled(lang, ids.len()),
                    Err(e) => {
                        tracing::error!(error = %e, "cancel failed");
                        words::busy(lang)
                    }
                };
                turn.pass();
                self.send(to, text).await;
            }
            // `route` hands over only the inputs above.
            other => tracing::error!(?other, "routed to the log by mistake"),
        }
        Handled::Done
    }

    /// Validation, limits, the durable `Queued` event, then the reply;
    /// what the user was told, or None when nobody was (see
    /// [`Handled::Redeliver`]).
    async fn image(
        &self,
        to: Reply,
        origin: Origin,
        model: &str,
        draw: Draw<'_>,
        input: Option<InputImage>,
        mut turn: Turn,
    ) -> Option<String> {
        let lang = Lang::of(origin.language.as_deref());
        // Validation records nothing: the next update may go ahead.
        let remembered = matches!(
            draw,
            Draw::Text {
                remembered: true,
                ..
            }
        );
        let images = match draw {
            Draw::Text { images, .. } => images.unwrap_or(1),
            Draw::Again { images, .. } => images,
        };
        let allowed = self.settings.variations_allowed();
        let wants_more = match draw {
            Draw::Text { images, .. } => images.is_some(),
            Draw::Again { .. } => images > 1,
        };
        if wants_more && !(2..=allowed).contains(&images) {
            let text = words::variations_range(lang, allowed);
            turn.pass();
            self.rejected(crate::metrics::Rejection::invalid);
            self.send(to, text.clone()).await;
            return Some(text);
        }
        let checked = self.check_image(lang, model, draw);
        let checked = match checked {
            Ok((name, prompt, preset)) => match input {
                None => Ok((name, prompt, preset, None)),
                Some(input) => self
                    .input_image(lang, &name, input)
                    .await
                    .map(|kept| (name, prompt, preset, Some(kept))),
            },
            Err(text) => Err(text),
        };
        let (name, prompt, preset, input) = match checked {
            Ok(ok) => ok,
            Err(text) => {
                turn.pass();
                let configured = ModelName::parse(model)
                    .ok()
                    .is_some_and(|m| self.settings.model(&m).is_some());
                self.rejected(if configured {
                    crate::metrics::Rejection::invalid
                } else {
                    crate::metrics::Rejection::unknown_model
                });
                self.send(to, text.clone()).await;
                return Some(text);
            }
        };
        let chat = origin.chat_id.0;
        let admitted = self.core.admit(
            NewRequest {
                model: name.clone(),
                prompt,
                origin,
                preset,
                remembered,
                input,
                images,
            },
            &self.settings.limits,
        );
        turn.pass();
        // Told nobody yet: the reply waits for the disk (shared with the
        // rest of the batch).
        let admitted = match admitted {
            Ok(a) => {
                let written = E::written(&a);
                let confirmed = self.core.confirm(a).await;
                if let (Err(_), Some(id)) = (&confirmed, written) {
                    self.refused.note(id);
                }
                confirmed
            }
            // The append failed part way: the request may still reach the
            // disk, so it is noted like a refused flush (see `Refused`).
            Err(AcceptError::Unwritten { id, error }) => {
                self.refused.note(id);
                Err(AcceptError::Unwritten { id, error })
            }
            Err(e) => Err(e),
        };
        self.answer_admission(to, chat, name, lang, admitted).await
    }

    /// The model, the prompt to draw and the preset it was made with, or
    /// the reply that refuses the `/image`.
    fn check_image(
        &self,
        lang: Lang,
        model: &str,
        draw: Draw<'_>,
    ) -> Result<(ModelName, Prompt, Option<PresetUse>), String> {
        let models = self.model_names();
        let Ok(name) = ModelName::parse(model) else {
            return Err(words::unknown_model(lang, model, &models));
        };
        if self.settings.model(&name).is_none() {
            return Err(if self.settings.disabled_models.contains(&name) {
                words::not_configured(lang, name.as_str())
            } else {
                words::unknown_model(lang, model, &models)
            });
        }
        let too_long =
            |chars| words::prompt_too_long(lang, chars, crate::domain::ids::MAX_PROMPT_CHARS);
        let parse = |text: &str| match Prompt::parse(text) {
            Ok(p) => Ok(p),
            Err(InvalidPrompt::Empty) => Err(words::empty_prompt(lang)),
            Err(InvalidPrompt::TooLong { chars }) => Err(too_long(chars)),
        };
        match draw {
            // Drawn again as recorded: its preset was applied already.
            Draw::Again { prompt, preset, .. } => Ok((name, parse(prompt)?, preset)),
            Draw::Text { text, .. } => match self.settings.preset_in(text) {
                None => Ok((name, parse(text)?, None)),
                Some((preset, rest)) => {
                    if !preset.allows(&name) {
                        let allowed: Vec<String> =
                            preset.models.iter().map(ToString::to_string).collect();
                        return Err(words::preset_not_for_model(lang, &preset.name, &allowed));
                    }
                    let written = parse(rest)?;
                    let drawn = match Prompt::parse(&preset.apply(written.as_str())) {
                        Ok(p) => p,
                        Err(InvalidPrompt::TooLong { chars }) => {
                            return Err(words::prompt_too_long_with_preset(
                                lang,
                                &preset.name,
                                chars,
                                crate::domain::ids::MAX_PROMPT_CHARS,
                            ));
                        }
                        Err(InvalidPrompt::Empty) => return Err(words::empty_prompt(lang)),
                    };
                    let used = PresetUse {
                        name: preset.name.clone(),
                        prompt: written.as_str().to_owned(),
                    };
                    Ok((name, drawn, Some(used)))
                }
            },
        }
    }

    /// The input image of an image-to-image request, on disk (synced)
    /// before the request is recorded; or the reply that refuses it: a
    /// model without img2img, a photo too big to fetch, one that cannot be
    /// fetched or read, or (🔁 Again) one no longer kept.
    async fn input_image(
        &self,
        lang: Lang,
        model: &ModelName,
        input: InputImage,
    ) -> Result<crate::domain::ImageRef, String> {
        if self
            .settings
            .model(model)
            .is_none_or(|m| m.img2img.is_none())
        {
            let able: Vec<String> = self
                .settings
                .models
                .iter()
                .filter(|m| m.img2img.is_some())
                .map(|m| m.name.to_string())
                .collect();
            return Err(words::no_input_image(lang, model.as_str(), &able));
        }
        let sizes = match input {
            InputImage::Kept(kept) => {
                return match self.images.load(&kept) {
                    Ok(Some(_)) => Ok(kept),
                    _ => Err(words::input_expired(lang)),
                };
            }
            InputImage::Photo(sizes) => sizes,
        };
        // The largest size Telegram lets a bot download (20 MB).
        let Some(best) = sizes
            .iter()
            .filter(|p| p.file.size <= MAX_INPUT_BYTES)
            .max_by_key(|p| u64::from(p.width) * u64::from(p.height))
        else {
            return Err(words::input_too_big(lang, MAX_INPUT_BYTES / 1_000_000));
        };
        let bytes = match self.api.download(&best.file.id, MAX_INPUT_BYTES).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch an input photo");
                return Err(words::input_unreadable(lang));
            }
        };
        let Some(format) = crate::services::image_format::ImageFormat::sniff(&bytes) else {
            return Err(words::input_unreadable(lang));
        };
        self.images
            .keep_input(&bytes, format.extension())
            .map_err(|e| {
                tracing::error!(error = %e, "could not keep an input photo");
                words::busy(lang)
            })
    }

    /// The model an `/image` without one draws with: the user's
    /// remembered choice while it is configured (and whether it was that),
    /// else the first configured model; None when there is no model.
    fn default_model(&self, user: UserId) -> Option<(String, bool)> {
        let chosen = self.core.read(|s| s.chosen_model(user).cloned());
        match chosen.filter(|m| self.settings.model(m).is_some()) {
            Some(m) => Some((m.to_string(), true)),
            None => self.model_names().into_iter().next().map(|m| (m, false)),
        }
    }

    /// `/model`: shows the remembered model and the choices; `/model
    /// <name>` remembers a configured model (durably, before saying so).
    async fn model_choice(&self, user: UserId, choice: Option<String>, lang: Lang) -> String {
        let models = self.model_names();
        let Some(choice) = choice else {
            let (chosen, seen) = self
                .core
                .read(|s| (s.chosen_model(user).cloned(), s.last_seq));
            // Says only what is on disk (the choice may be a moment old).
            if let Err(e) = self.core.durable(seen).await {
                tracing::error!(error = %e, "the log refused a flush for /model");
                return words::busy(lang);
            }
            let used = self.default_model(user).map(|(m, _)| m);
            return words::model_shown(
                lang,
                chosen.as_ref().map(ModelName::as_str),
                used.as_deref(),
                &models,
            );
        };
        let name = match ModelName::parse(&choice) {
            Ok(name) if self.settings.model(&name).is_some() => name,
            Ok(name) if self.settings.disabled_models.contains(&name) => {
                return words::not_configured(lang, name.as_str());
            }
            _ => return words::unknown_model(lang, &choice, &models),
        };
        match self.core.choose_model(user, name.clone()).await {
            Ok(_) => words::model_chosen(lang, name.as_str()),
            Err(e) => {
                tracing::error!(error = %e, "could not record a model choice");
                words::busy(lang)
            }
        }
    }

    /// The reply to an admission (queued only once durable); returns what
    /// the user was told.
    async fn answer_admission(
        &self,
        to: Reply,
        chat: i64,
        name: ModelName,
        lang: Lang,
        admitted: Result<Admitted, AcceptError>,
    ) -> Option<String> {
        if let Ok(Admitted::Queued { id, .. } | Admitted::Duplicate { id }) = &admitted {
            let span = tracing::Span::current();
            span.record("request_id", tracing::field::display(id));
            span.record("model", name.as_str());
        }
        match admitted {
            Ok(Admitted::Queued { id, position, .. }) => {
                tracing::info!(position, "queued");
                let wait = self.core.read(|s| s.estimated_wait(&name, position));
                let text = words::queued(lang, name.as_str(), position, wait);
                if let Some(m) = self.send(to, text.clone()).await {
                    self.board
                        .register(id, chat, m.id.0, name, lang, text.clone());
                }
                Some(text)
            }
            Ok(Admitted::Duplicate { id }) => {
                tracing::info!("redelivered update; its request exists");
                // A redelivered update: the request exists. If the crash came
                // before its status reply, send that reply now.
                let text = self.core.read(|s| {
                    s.request(id).map(|r| {
                        let p = s.position(id);
                        words::status(lang, r.model.as_str(), r.stage, p, None)
                    })
                });
                if !self.board.has(id)
                    && let Some(text) = &text
                    && let Some(m) = self.send(to, text.clone()).await
                {
                    self.board
                        .register(id, chat, m.id.0, name, lang, text.clone());
                }
                Some(text.unwrap_or_else(|| words::already_done(lang)))
            }
            Err(AcceptError::Rejected(Rejection::RateLimited { retry_after_secs })) => {
                self.rejected(crate::metrics::Rejection::rate_limited);
                let text = words::rate_limited(lang, retry_after_secs);
                self.send(to, text.clone()).await;
                Some(text)
            }
            Err(AcceptError::Rejected(Rejection::TooManyPending { max, .. })) => {
                self.rejected(crate::metrics::Rejection::too_many_pending);
                let text = words::too_many_pending(lang, max);
                self.send(to, text.clone()).await;
                Some(text)
            }
            Err(AcceptError::Store(e) | AcceptError::Unwritten { error: e, .. })
                if E::REDELIVER_UNCOMMITTED =>
            {
                tracing::warn!(error = %e, "could not commit a request; Telegram will deliver the update again");
                None
            }
            Err(AcceptError::Store(e) | AcceptError::Unwritten { error: e, .. }) => {
                self.rejected(crate::metrics::Rejection::unavailable);
                tracing::error!(error = %e, "could not record a request");
                let text = words::busy(lang);
                self.send(to, text.clone()).await;
                Some(text)
            }
        }
    }

    /// The `/queue` reply, and the sequence number of the log it reflects.
    fn queue_text(&self, user: UserId, lang: Lang) -> (String, u64) {
        let (lines, seen): (Vec<String>, u64) = self.core.read(|s| {
            let mut mine: Vec<_> = s.requests().filter(|r| r.origin.user_id == user).collect();
            mine.sort_by_key(|r| r.queued_at);
            let lines = mine
                .iter()
                .map(|r| {
                    let position = s.position(r.id);
                    let wait = position.and_then(|p| s.estimated_wait(&r.model, p));
                    words::queue_line(
                        lang,
                        &r.id.short(),
                        r.model.as_str(),
                        r.stage,
                        position,
                        wait,
                        r.prompt.as_str(),
                    )
                })
                .collect();
            (lines, s.last_seq)
        });
        let text = if lines.is_empty() {
            words::no_requests(lang)
        } else {
            format!("{}\n{}", words::queue_header(lang), lines.join("\n"))
        };
        (text, seen)
    }

    async fn answer(&self, query: &CallbackQuery, text: String) {
        self.api.answer_query(query, text).await;
    }

    async fn callback(&self, update_id: u32, query: &CallbackQuery, mut turn: Turn) -> Handled {
        let user_id = i64::try_from(query.from.id.0).unwrap_or(i64::MAX);
        let language = words::language_code(query.from.language_code.as_deref());
        let lang = Lang::of(language.as_deref());
        let button = query.data.as_deref().and_then(Button::parse);
        // Only 🔁 Again records (a new request); every other press passes
        // the turn at once. (Dropping the turn on a path below passes it too.)
        if !matches!(button, Some(Button::Again(_))) {
            turn.pass();
        }
        if !self.allowed(user_id) {
            self.answer(query, words::not_allowed(lang)).await;
            return Handled::Done;
        }
        let Some(chat) = query.message.as_ref().map(|m| m.chat().id.0) else {
            self.answer(query, words::unknown_button(lang)).await;
            return Handled::Done;
        };
        let Some(button) = button else {
            self.answer(query, words::unknown_button(lang)).await;
            return Handled::Done;
        };
        let id = button.request();
        let events: Vec<_> = match self.core.request_events(id).await {
            Ok(events) => events.into_iter().filter_map(Result::ok).collect(),
            Err(e) => {
                tracing::error!(error = %e, "could not read a request for a button");
                self.answer(query, words::busy(lang)).await;
                return Handled::Done;
            }
        };
        // A button acts only on a request of the chat it is pressed in
        // (§2): button data comes from the client and can be forged to
        // name any request id, another chat's included.
        let Some(Event::Queued {
            model,
            prompt,
            origin,
            preset,
            input,
            images,
            ..
        }) = events.first().map(|r| &r.event)
        else {
            self.answer(query, words::unknown_button(lang)).await;
            return Handled::Done;
        };
        if origin.chat_id.0 != chat {
            self.answer(query, words::unknown_button(lang)).await;
            return Handled::Done;
        }
        match button {
            Button::Again(_) => {
                let origin = Origin {
                    user_id: UserId(user_id),
                    chat_id: ChatId(chat),
                    message_id: None,
                    update_id: Some(update_id),
                    language,
                };
                let to = Reply {
                    chat,
                    to_message: query.message.as_ref().map(|m| m.id().0),
                };
                // The notice says what happened: queued and where, or why not.
                let told = self
                    .image(
                        to,
                        origin,
                        model.as_str(),
                        Draw::Again {
                            prompt: prompt.as_str(),
                            preset: preset.clone(),
                            images: *images,
                        },
                        input.clone().map(InputImage::Kept),
                        turn,
                    )
                    .await;
                let Some(told) = told else {
                    return Handled::Redeliver;
                };
                self.answer(query, told).await;
            }
            Button::Original(_) => {
                let image = events.iter().rev().find_map(|r| match &r.event {
                    Event::Generated { image, .. } => Some(image.clone()),
                    _ => None,
                });
                let bytes = image
                    .as_ref()
                    .and_then(|i| self.images.load(i).ok().flatten());
                let (Some(image), Some(bytes)) = (image, bytes) else {
                    self.answer(query, words::original_expired(lang)).await;
                    return Handled::Done;
                };
                self.answer(query, words::original_sending(lang)).await;
                let to = Reply {
                    chat,
                    to_message: query.message.as_ref().map(|m| m.id().0),
                };
                let upload = Upload {
                    kind: FileKind::Document,
                    file: InputFile::memory(bytes::Bytes::from(bytes))
                        .file_name(format!("easel-{id}.{}", image.format)),
                    caption: None,
                    buttons: None,
                };
                let sent = self.api.send_file(to, &upload, Policy::Reply).await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "could not send an original");
                }
            }
        }
        Handled::Done
    }
}

#[cfg(test)]
mod tests {
    use super::{Route, route};
    use crate::telegram::parse::{Input, parse};
    use crate::telegram::words::{self, Lang};

    fn settings() -> crate::config::Settings {
        let env = [
            ("FLUX_WORKER_URL", "http://127.0.0.1:9/flux"),
            ("SDXL_WORKER_URL", "http://127.0.0.1:9/sdxl"),
            ("SDXL_API_KEY", "a-real-looking-key"),
            ("EASEL_RATE_LIMIT", "4/300"),
        ];
        crate::config::Settings::from_sources(
            |k| {
                env.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            },
            None,
        )
        .expect("test settings")
    }

    fn routed(text: &str, private: bool, allowed: bool) -> Route {
        route(
            parse(text, Some("easel_bot")),
            private,
            allowed,
            &settings(),
            Lang::En,
        )
    }

    #[test]
    fn one_routing_for_intake_and_the_stand_in() {
        let models = vec!["flux".to_owned(), "sdxl".to_owned()];
        let limits = settings().limits;
        // Plain text: a hint in a private chat, silence in a group and
        // for someone not allowed (nothing to refuse).
        assert_eq!(
            routed("hello", true, true),
            Route::Answer(words::usage(Lang::En, &models))
        );
        assert_eq!(routed("hello", false, true), Route::Ignore);
        assert_eq!(routed("hello", false, false), Route::Ignore);
        // The allowlist before any command, and before anything recorded.
        for text in ["/help", "/image=flux=a fox", "/queue", "/cancel", "/nope"] {
            assert_eq!(
                routed(text, true, false),
                Route::Answer(words::not_allowed(Lang::En)),
                "{text}"
            );
        }
        assert_eq!(
            routed("/help", false, true),
            Route::Answer(words::help(Lang::En, &models, &limits, 0, 4))
        );
        assert_eq!(
            routed("/image", true, true),
            Route::Answer(words::usage(Lang::En, &models))
        );
        assert_eq!(
            routed("/nope", true, true),
            Route::Answer(words::unknown_command(Lang::En))
        );
        // In a group only a command with our name gets that answer: the
        // others may be another bot's.
        assert_eq!(routed("/nope", false, true), Route::Ignore);
        assert_eq!(routed("/nope", false, false), Route::Ignore);
        assert_eq!(
            routed("/nope@easel_bot", false, true),
            Route::Answer(words::unknown_command(Lang::En))
        );
        assert_eq!(
            routed("/image==fox", true, true),
            Route::Answer(words::usage(Lang::En, &models))
        );
        // What needs the log is handed over as parsed.
        assert_eq!(
            routed("/image=flux=a fox", false, true),
            Route::UseLog(Input::Image {
                model: Some("flux".into()),
                prompt: "a fox".into(),
                images: None,
            })
        );
        assert_eq!(routed("/queue", true, true), Route::UseLog(Input::Queue));
        assert_eq!(
            routed("/cancel ab12", true, true),
            Route::UseLog(Input::Cancel(Some("ab12".into())))
        );
    }
}
