//! The status board: one status message per request, edited as it moves.
//! Own-stage changes go first; position changes of everyone behind a request
//! that left a queue are coalesced into one sweep per model, walked from the
//! front and restarted by the next change, so a completion costs O(1) here
//! and edits stay within budget however long the queue is: one edit per
//! chat per 1.3 s (a margin over Telegram's second), 20 a minute in a
//! group, and `EDITS_PER_SECOND` overall. An identical text is
//! never sent; no edit failure ever changes a request's state.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::api::{TelegramApi, TgErrorKind};
use super::words::{self, Lang};
use crate::domain::{Event, ModelName, RequestId, Stage};
use crate::engine::{Engine, Retries};
use crate::store::{EventStore, Recorded};
use tokio_util::sync::CancellationToken;

/// Overall edit budget (the pace of all calls is 20/s; edits get 10 of it).
pub const EDITS_PER_SECOND: u32 = 10;
/// Per chat: at most one edit per second *as Telegram receives them*.
/// Spaced sends can arrive closer (the network bunches them: 0.85 s apart
/// was seen under load), so the spacing has a margin.
const PER_CHAT: Duration = Duration::from_millis(1300);
/// Per group: Telegram allows 20 messages a minute, so a group's edits
/// are 3 s apart plus the same margin (every status of every member
/// shares the budget).
const PER_GROUP: Duration = Duration::from_millis(3300);

/// How long after an edit the same chat may be edited again.
fn spacing(chat: i64) -> Duration {
    // Telegram's group and channel ids are negative.
    if chat < 0 { PER_GROUP } else { PER_CHAT }
}
/// Candidates a sweep looks at per tick.
const SWEEP_BATCH: usize = 64;
const META_PREFIX: &str = "status/";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    chat: i64,
    message_id: i32,
    model: ModelName,
    /// The language of the user who asked (saved entries from before
    /// languages read as English).
    #[serde(default)]
    lang: Lang,
    #[serde(skip)]
    last_text: String,
}

/// Registers status messages with the board task.
#[derive(Clone)]
pub struct StatusBoard {
    tx: mpsc::UnboundedSender<(RequestId, Entry)>,
    registered: Arc<std::sync::Mutex<HashSet<RequestId>>>,
}

impl StatusBoard {
    /// The board and its task, for the caller to spawn; the task stops
    /// when `shutdown` is cancelled.
    pub fn new<E: Engine>(
        core: Arc<E>,
        api: Arc<TelegramApi>,
        retries: Retries,
        alerts: Option<Arc<crate::alerts::Alerts>>,
        shutdown: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let registered = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let mut task = Board::new(core, api, retries, Arc::clone(&registered));
        task.alerts = alerts;
        let run = async move { task.run(rx, shutdown).await };
        (StatusBoard { tx, registered }, run)
    }

    /// The status message of `id` is `message_id` in `chat`, showing `text`.
    pub fn register(
        &self,
        id: RequestId,
        chat: i64,
        message_id: i32,
        model: ModelName,
        lang: Lang,
        text: String,
    ) {
        self.lock().insert(id);
        let _ = self.tx.send((
            id,
            Entry {
                chat,
                message_id,
                model,
                lang,
                last_text: text,
            },
        ));
    }

    /// Whether `id` has a status message (so a redelivered update need not send one).
    pub fn has(&self, id: RequestId) -> bool {
        self.lock().contains(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Board<E: Engine> {
    core: Arc<E>,
    api: Arc<TelegramApi>,
    /// The retry each model's worker call is on ("Generating… retry 2 of 3").
    retries: Retries,
    /// Whether the operator was told of a model's trouble (failure texts).
    alerts: Option<Arc<crate::alerts::Alerts>>,
    registered: Arc<std::sync::Mutex<HashSet<RequestId>>>,
    entries: HashMap<RequestId, Entry>,
    /// Final texts of finished requests (they have left the projection).
    finals: HashMap<RequestId, Final>,
    urgent: VecDeque<RequestId>,
    deferred: HashSet<RequestId>,
    /// Per model, the arrival number the position sweep has reached.
    sweeps: BTreeMap<ModelName, Option<u64>>,
    chat_next: HashMap<i64, Instant>,
    last_seq: u64,
    budget: u32,
}

impl<E: Engine> Board<E> {
    fn new(
        core: Arc<E>,
        api: Arc<TelegramApi>,
        retries: Retries,
        registered: Arc<std::sync::Mutex<HashSet<RequestId>>>,
    ) -> Self {
        let last_seq = core.store().last_seq();
        let mut board = Board {
            core,
            api,
            retries,
            alerts: None,
            registered,
            entries: HashMap::new(),
            finals: HashMap::new(),
            urgent: VecDeque::new(),
            deferred: HashSet::new(),
            sweeps: BTreeMap::new(),
            chat_next: HashMap::new(),
            last_seq,
            budget: 0,
        };
        board.load();
        board
    }

    /// After a restart: every saved status message is brought up to date.
    fn load(&mut self) {
        let saved = match self.core.store().scan_meta(META_PREFIX) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(error = %e, "could not load status messages");
                return;
            }
        };
        for (name, bytes) in saved {
            let Some(id) = name
                .strip_prefix(META_PREFIX)
                .and_then(|s| s.parse().ok())
                .map(RequestId)
            else {
                continue;
            };
            let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
                continue;
            };
            if self.core.read(|s| s.request(id).is_none()) {
                match self.final_from_log(id, &entry.model, entry.lang) {
                    Some(last) => {
                        self.finals.insert(id, last);
                    }
                    None => {
                        self.forget(id);
                        continue;
                    }
                }
            }
            self.registered_set().insert(id);
            self.entries.insert(id, entry);
            self.urgent.push_back(id);
        }
    }

    fn registered_set(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A retry started or ended: the requests generating now get their
    /// status edited (one per model, the one in flight).
    fn retry_changed(&mut self) {
        let generating: Vec<RequestId> = self.core.read(|s| {
            s.requests()
                .filter(|r| r.stage == Stage::Generating)
                .map(|r| r.id)
                .collect()
        });
        for id in generating {
            if self.entries.contains_key(&id) && !self.urgent.contains(&id) {
                self.urgent.push_back(id);
            }
        }
    }

    fn final_from_log(&self, id: RequestId, model: &ModelName, lang: Lang) -> Option<Final> {
        let events = self.core.store().events_of(id).ok()?;
        let last = events.into_iter().rev().find_map(Result::ok)?;
        final_text(&last.event, model.as_str(), lang, self.told(model))
    }

    /// Whether an operator alert about `model` went out (and is still on).
    fn told(&self, model: &ModelName) -> bool {
        self.alerts.as_ref().is_some_and(|a| a.told(model))
    }

    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<(RequestId, Entry)>,
        shutdown: CancellationToken,
    ) {
        let mut appended = self.core.store().subscribe();
        let mut retried = self.retries.subscribe();
        let mut next_tick = Instant::now();
        loop {
            let has_work =
                !self.urgent.is_empty() || !self.deferred.is_empty() || !self.sweeps.is_empty();
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = appended.changed() => {
                    if r.is_err() { return; }
                    appended.borrow_and_update();
                    self.take_new_events();
                }
                r = retried.changed() => {
                    if r.is_ok() {
                        retried.borrow_and_update();
                        self.retry_changed();
                    }
                }
                reg = rx.recv() => match reg {
                    Some((id, entry)) => self.register(id, entry),
                    None => return,
                },
                () = tokio::time::sleep_until(next_tick), if has_work => {
                    self.budget = (self.budget + 1).min(2);
                    self.tick().await;
                    next_tick = Instant::now() + Duration::from_millis(1000 / u64::from(EDITS_PER_SECOND));
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    fn register(&mut self, id: RequestId, entry: Entry) {
        let saved = serde_json::to_vec(&entry).unwrap_or_default();
        if let Err(e) = self
            .core
            .store()
            .put_meta(&format!("{META_PREFIX}{id}"), &saved)
        {
            tracing::warn!(error = %e, "could not save a status message id");
        }
        // Already finished (a very fast request): show the final text.
        if self.core.read(|s| s.request(id).is_none())
            && let Some(last) = self.final_from_log(id, &entry.model, entry.lang)
        {
            self.finals.insert(id, last);
        }
        self.entries.insert(id, entry);
        self.urgent.push_back(id);
    }

    fn take_new_events(&mut self) {
        let from = self.last_seq + 1;
        let records: Vec<Recorded> = self
            .core
            .store()
            .read_from(from)
            .filter_map(Result::ok)
            .collect();
        for rec in records {
            self.last_seq = self.last_seq.max(rec.seq);
            self.on_event(&rec);
        }
    }

    fn on_event(&mut self, rec: &Recorded) {
        let id = rec.request_id;
        let model = match &rec.event {
            Event::Queued { model, .. } => Some(model.clone()),
            _ => self.entries.get(&id).map(|e| e.model.clone()),
        };
        if let Some(entry) = self.entries.get(&id) {
            let told = self.told(&entry.model);
            if let Some(last) = final_text(&rec.event, entry.model.as_str(), entry.lang, told) {
                self.finals.insert(id, last);
            }
            if !self.urgent.contains(&id) {
                self.urgent.push_back(id);
            }
        }
        // Leaving a queue moves everyone behind: restart that model's sweep.
        if matches!(
            rec.event,
            Event::Started | Event::Cancelled | Event::Failed { .. } | Event::Delivered { .. }
        ) {
            let model =
                model.or_else(|| self.core.read(|s| s.request(id).map(|r| r.model.clone())));
            if let Some(model) = model {
                self.sweeps.insert(model, None);
            } else {
                // Unknown model (not registered here): sweep every lane.
                let models: Vec<ModelName> = self
                    .core
                    .read(|s| s.lanes().map(|(m, _)| m.clone()).collect());
                for m in models {
                    self.sweeps.insert(m, None);
                }
            }
        }
    }

    /// What the status message of `id` should show now: a live stage,
    /// or its final text.
    fn text_for(&self, id: RequestId) -> Option<Final> {
        if let Some(last) = self.finals.get(&id) {
            return Some(last.clone());
        }
        let lang = self.entries.get(&id).map(|e| e.lang).unwrap_or_default();
        let live = self.core.read(|s| {
            let req = s.request(id)?;
            if req.stage == Stage::Generating
                && let Some(n) = self.retries.of(&req.model)
            {
                return Some(words::generating_retry(
                    lang,
                    req.model.as_str(),
                    n,
                    crate::services::worker::MAX_RETRIES,
                ));
            }
            // A variation request says which image it is making.
            if req.stage == Stage::Generating && req.images > 1 {
                let index = (req.variations.len() as u32 + 1).min(req.images);
                return Some(words::generating_image(
                    lang,
                    req.model.as_str(),
                    index,
                    req.images,
                ));
            }
            let position = s.position(id);
            let wait = position.and_then(|p| s.estimated_wait(&req.model, p));
            Some(words::status(
                lang,
                req.model.as_str(),
                req.stage,
                position,
                wait,
            ))
        });
        let live = live.map(|text| Final { text, again: false });
        // The projection can be ahead of the events this board has read:
        // a request that just finished is read from the log.
        live.or_else(|| {
            let entry = self.entries.get(&id)?;
            self.final_from_log(id, &entry.model, entry.lang)
        })
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        // Deferred ones whose chat is free again come back first.
        let ready: Vec<RequestId> = self
            .deferred
            .iter()
            .copied()
            .filter(|id| self.chat_free(*id, now))
            .collect();
        for id in ready {
            self.deferred.remove(&id);
            self.urgent.push_front(id);
        }
        let mut rounds = self.urgent.len();
        while self.budget > 0 && rounds > 0 {
            rounds -= 1;
            let Some(id) = self.urgent.pop_front() else {
                break;
            };
            self.try_edit(id).await;
        }
        self.sweep().await;
    }

    async fn sweep(&mut self) {
        let models: Vec<ModelName> = self.sweeps.keys().cloned().collect();
        for model in models {
            if self.budget == 0 {
                return;
            }
            let cursor = self.sweeps.get(&model).copied().flatten();
            let batch: Vec<(u64, RequestId)> = self.core.read(|s| {
                s.lane(&model)
                    .map(|l| l.queue.iter_after(cursor).take(SWEEP_BATCH).collect())
                    .unwrap_or_default()
            });
            if batch.is_empty() {
                self.sweeps.remove(&model);
                continue;
            }
            let mut reached = cursor;
            for (arrival, id) in batch {
                if self.budget == 0 {
                    break;
                }
                reached = Some(arrival);
                if self.entries.contains_key(&id) {
                    self.try_edit(id).await;
                }
            }
            self.sweeps.insert(model, reached);
        }
    }

    fn chat_free(&self, id: RequestId, now: Instant) -> bool {
        self.entries
            .get(&id)
            .is_none_or(|e| self.chat_next.get(&e.chat).is_none_or(|t| *t <= now))
    }

    async fn try_edit(&mut self, id: RequestId) {
        let Some(entry) = self.entries.get(&id) else {
            return;
        };
        let Some(Final { text, again }) = self.text_for(id) else {
            // Gone without a final text (not in the log): stop tracking.
            self.forget(id);
            return;
        };
        let finished = self.finals.contains_key(&id) || self.core.read(|s| s.request(id).is_none());
        if text == entry.last_text {
            if finished {
                self.forget(id);
            }
            return;
        }
        let now = Instant::now();
        if !self.chat_free(id, now) {
            self.deferred.insert(id);
            return;
        }
        let (chat, message_id) = (entry.chat, entry.message_id);
        self.budget = self.budget.saturating_sub(1);
        self.chat_next.insert(chat, now + spacing(chat));
        // A failure that may pass on a retry gets the 🔁 Again button.
        let lang = entry.lang;
        let buttons =
            again.then(|| super::deliver::keyboard(id, super::replies::FileKind::Document, lang));
        let result = self
            .api
            .edit_text(chat, message_id, text.clone(), buttons)
            .await;
        match result {
            Ok(_) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.last_text = text;
                }
                if finished {
                    self.forget(id);
                }
            }
            Err(e) if e.kind == TgErrorKind::Api => {
                tracing::info!(request_id = %id, error = %e, "status message can no longer be edited");
                self.forget(id);
            }
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "status edit failed; will try again");
                self.deferred.insert(id);
            }
        }
    }

    fn forget(&mut self, id: RequestId) {
        self.entries.remove(&id);
        self.finals.remove(&id);
        self.deferred.remove(&id);
        self.registered_set().remove(&id);
        if let Err(e) = self.core.store().delete_meta(&format!("{META_PREFIX}{id}")) {
            tracing::warn!(error = %e, "could not forget a status message");
        }
    }
}

/// A status message's text, and whether it carries 🔁 Again (only the
/// final text of a failure that may pass on a retry does).
#[derive(Clone, Debug)]
struct Final {
    text: String,
    again: bool,
}

/// The last text of a finished request's status message.
fn final_text(event: &Event, model: &str, lang: Lang, told: bool) -> Option<Final> {
    let (text, again) = match event {
        Event::Delivered { .. } => (words::status(lang, model, Stage::Done, None, None), false),
        Event::Failed { kind, .. } => (
            words::failed(lang, model, *kind, told),
            kind.may_pass_on_retry(),
        ),
        Event::Cancelled => (words::cancelled_one(lang, model), false),
        _ => return None,
    };
    Some(Final { text, again })
}
