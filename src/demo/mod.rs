//! `easel demo`: the real bot against FAKE Telegram, workers and LLM started
//! in-process on loopback, with a handful of simulated users.

pub mod fake_services;
pub mod fake_telegram;
pub mod png;
