//! Helpers shared by the integration tests: a core on a temporary data dir,
//! and in-process test doubles of the step traits (the core's own boundary;
//! the HTTP fakes of outside services belong to the services and bot tests).
#![allow(dead_code)]

pub mod panic_report;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use easel::domain::{ChatId, FailureKind, ModelName, Origin, Prompt, UserId};
use easel::engine::{
    Core, Deliverer, Delivery, DeliveryFailure, Enhancement, Enhancer, GeneratedImage,
    GenerationFailure, Generator, ManualClock, NewRequest,
};
use easel::projection::ActiveRequest;
use easel::store::SledStore;

pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
            .single()
            .unwrap(),
    ))
}

pub fn open_core(dir: &Path, clock: Arc<ManualClock>) -> Core<SledStore> {
    // The log in a folder of its own: its lock file goes beside it.
    let store = SledStore::open(&dir.join("log")).expect("open store");
    Core::open(store, clock).expect("open core").0
}

pub fn model(name: &str) -> ModelName {
    ModelName::parse(name).unwrap()
}

static NEXT_UPDATE: AtomicU32 = AtomicU32::new(1);

pub fn request(model_name: &str, user: i64, prompt: &str) -> NewRequest {
    let update = NEXT_UPDATE.fetch_add(1, Ordering::Relaxed);
    NewRequest {
        model: model(model_name),
        prompt: Prompt::parse(prompt).unwrap(),
        origin: Origin {
            user_id: UserId(user),
            chat_id: ChatId(user),
            message_id: Some(update as i32),
            update_id: Some(update),
            language: None,
        },
        preset: None,
        remembered: false,
        input: None,
        images: 1,
    }
}

/// A tiny valid PNG header, enough for the magic-number checks.
pub const PNG: &[u8] = b"\x89PNG\r\n\x1a\n-test-image-";

/// Enhancer double: upper-cases the prompt.
pub struct UpperEnhancer;

impl Enhancer for UpperEnhancer {
    async fn enhance(&self, prompt: &str) -> Enhancement {
        Enhancement {
            prompt: prompt.to_uppercase(),
            fallback: None,
        }
    }
}

/// Generator double: answers from a script (default: a PNG), and records
/// how many calls of each model overlap.
#[derive(Default)]
pub struct ScriptedGenerator {
    pub script: Mutex<VecDeque<Result<(), FailureKind>>>,
    pub calls: Mutex<Vec<(ModelName, String)>>,
}

impl Generator for ScriptedGenerator {
    async fn generate(
        &self,
        model: &ModelName,
        prompt: &str,
        _input: Option<&[u8]>,
    ) -> Result<GeneratedImage, GenerationFailure> {
        self.calls
            .lock()
            .unwrap()
            .push((model.clone(), prompt.to_owned()));
        match self.script.lock().unwrap().pop_front() {
            Some(Err(kind)) => Err(GenerationFailure {
                kind,
                reason: "scripted failure".into(),
                attempts: 1,
                statuses: Vec::new(),
            }),
            _ => Ok(GeneratedImage {
                bytes: PNG.to_vec(),
                format: "png".into(),
                attempts: 1,
                statuses: Vec::new(),
            }),
        }
    }
}

/// Deliverer double: records what was delivered.
#[derive(Default)]
pub struct RecordingDeliverer {
    pub delivered: Mutex<Vec<(easel::domain::RequestId, Vec<u8>)>>,
    pub fail_next: Mutex<bool>,
}

impl Deliverer for RecordingDeliverer {
    async fn deliver(
        &self,
        request: &ActiveRequest,
        image: &[u8],
        _format: &str,
    ) -> Result<Delivery, DeliveryFailure> {
        if std::mem::take(&mut *self.fail_next.lock().unwrap()) {
            return Err(DeliveryFailure::Refused {
                reason: "scripted delivery failure".into(),
            });
        }
        self.delivered
            .lock()
            .unwrap()
            .push((request.id, image.to_vec()));
        Ok(Delivery {
            message_id: Some(1),
        })
    }

    async fn deliver_album(
        &self,
        request: &ActiveRequest,
        images: &[easel::engine::KeptImage],
    ) -> Result<Delivery, DeliveryFailure> {
        if std::mem::take(&mut *self.fail_next.lock().unwrap()) {
            return Err(DeliveryFailure::Refused {
                reason: "scripted delivery failure".into(),
            });
        }
        let mut delivered = self.delivered.lock().unwrap();
        for image in images {
            delivered.push((request.id, image.bytes.clone()));
        }
        Ok(Delivery {
            message_id: Some(1),
        })
    }
}
