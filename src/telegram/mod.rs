//! The only module that knows teloxide: the Bot API client, every message
//! sent (`replies`), parsing, intake and admission replies, status
//! messages, delivery, long polling, and every user-facing text (`words`).

pub mod api;
pub mod deliver;
pub mod intake;
pub mod parse;
pub mod poll;
pub mod replies;
pub mod standin;
pub mod status;
pub mod turn;
pub mod webhook;
pub mod words;

pub use api::TelegramApi;
pub use deliver::TelegramDeliverer;
pub use intake::Intake;
pub use status::StatusBoard;
