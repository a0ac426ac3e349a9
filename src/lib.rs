//! easel: a Telegram bot that turns prompts into images, each request an
//! event-sourced state machine.
//!
//! Codemap (data flows top to bottom; see `docs/architecture.md`):
//! - [`domain`]: pure lifecycle (statig), events, decisions, admission rules.
//! - [`store`]: the `EventStore` trait and the sled event log: append,
//!   group-committed durability, index by request, intake keys, subscribe,
//!   checkpoints. Only it knows sled; everything above is generic over the
//!   trait (an in-memory store, `MemoryStore`). Also the event log on
//!   PostgreSQL (`store::pg`, §9): decisions in the append transaction,
//!   leases with fencing, LISTEN/NOTIFY, checkpoints, the request index,
//!   retention into the archive table.
//! - [`projection`]: live state (FIFO queues with O(log n) positions,
//!   in-flight per model, per-user load) and audit records, from events only.
//! - [`engine`]: the core (decide → append → apply under one lock), start-up
//!   from checkpoint + tail, the recovery rule, and the per-model scheduler
//!   with its one-step function and the step traits adapters implement;
//!   for replicas on PostgreSQL the same decisions inside the database's
//!   transaction (`engine::replica`), a replica's view and recent copy of
//!   the log, started from the database's checkpoint (`engine::mirror`),
//!   and `Engine`, what the Telegram side needs of either.
//! - [`config`]: settings from the environment, `.env` and `easel.toml`,
//!   and `DataDir`, the data dir's layout.
//! - [`services`]: the image workers and the LLM over HTTP (reqwest, backon).
//! - [`telegram`]: the bot's side of Telegram (teloxide): polling or the
//!   webhook route (and registering the webhook), one routing for intake
//!   and the stand-in, intake in update order, every message sent
//!   (`replies`), status messages, delivery, every user-facing text.
//! - [`ops`]: the operator commands (typed reports, `OpsError`), the one
//!   verify, retention, the query socket of a running bot, `easel migrate`
//!   between sled and PostgreSQL.
//! - [`maintenance`]: upkeep beside serving: unconfigured models' requests
//!   failed at start, expired images deleted, retention to the archive.
//! - [`app`]: the composition root of `easel run` (the only module that
//!   depends on all the others) and its self-heal after refused writes;
//!   `app::replica`, one replica on PostgreSQL, and the roles one replica
//!   plays at a time (the poller, the alerter).
//! - [`demo`]: the FAKE Telegram, workers and LLM, and `easel demo`.
//! - [`telemetry`]: the tracing filter every subscriber is built with.
//! - [`health`], [`metrics`], [`alerts`], [`dashboard`]: what an operator
//!   watches from outside: `/healthz`, `/readyz`, `/metrics` on
//!   `EASEL_METRICS_ADDR`, alerts in the operator's Telegram chat, and the
//!   read-only dashboard at `/` of the same listener.

pub mod alerts;
pub mod app;
pub mod config;
pub mod dashboard;
#[cfg(feature = "demo")]
pub mod demo;
pub mod domain;
pub mod engine;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod ops;
pub mod projection;
pub mod services;
pub mod store;
pub mod telegram;
pub mod telemetry;
