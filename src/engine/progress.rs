//! What a step is doing between its events, for people only: the retry a
//! model's worker call is on. Never recorded (the log keeps the outcome and
//! the per-attempt statuses); one generation at a time per model, so the
//! model names the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::domain::ModelName;

/// Shared between the workers (who set it) and the status board (which
/// shows it); cheap to clone.
#[derive(Clone)]
pub struct Retries {
    now: Arc<Mutex<HashMap<ModelName, u32>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            now: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl Retries {
    /// `model`'s worker call is on retry `n` (1 for the first retry).
    pub fn set(&self, model: &ModelName, n: u32) {
        self.lock().insert(model.clone(), n);
        self.changed.send_modify(|v| *v += 1);
    }

    /// `model`'s call is over (success or not).
    pub fn clear(&self, model: &ModelName) {
        if self.lock().remove(model).is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The retry `model`'s call is on, if it is retrying.
    pub fn of(&self, model: &ModelName) -> Option<u32> {
        self.lock().get(model).copied()
    }

    /// Woken at every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ModelName, u32>> {
        self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
