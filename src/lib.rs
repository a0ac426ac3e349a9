//! easel: a Telegram bot that turns prompts into images, each request an
//! event-sourced state machine.
//!
//! Codemap (data flows top to bottom; see `docs/architecture.md`):
//! - [`domain`]: pure lifecycle (statig), events, decisions, admission rules.
//! - [`store`]: the sled event log: append, group-committed durability,
//!   index by request, intake keys, subscribe, checkpoints. Only it knows sled.
//! - [`projection`]: live state (FIFO queues with O(log n) positions,
//!   in-flight per model, per-user load) and audit records, from events only.
//! - [`engine`]: the core (decide → append → apply under one lock), start-up
//!   from checkpoint + tail, the recovery rule, and the per-model scheduler
//!   with its one-step function and the step traits adapters implement.
//! - [`telemetry`]: the tracing filter every subscriber is built with.

pub mod app;
pub mod config;
pub mod demo;
pub mod domain;
pub mod engine;
pub mod ops;
pub mod projection;
pub mod services;
pub mod store;
pub mod telegram;
pub mod telemetry;
