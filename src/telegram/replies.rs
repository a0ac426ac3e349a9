//! Every message easel sends, in one place: text replies, photos and
//! documents (with caption, buttons and the message they answer), status
//! edits and button notices. Each goes through [`TelegramApi::run`] (the
//! pace, 429s, retries by policy); callers say *what* to send, not how a
//! teloxide request is built.

use teloxide::payloads::{
    AnswerCallbackQuerySetters, EditMessageTextSetters, SendDocumentSetters, SendMediaGroupSetters,
    SendMessageSetters, SendPhotoSetters,
};
use teloxide::prelude::Requester;
use teloxide::types::{
    CallbackQuery, ChatId, InlineKeyboardMarkup, InputFile, Message, MessageId, ReplyParameters,
};

use super::api::{Policy, TelegramApi, TgError, TgErrorKind};
use super::words;

/// Where a reply goes: a chat, and the message it answers (if any; sent
/// anyway when that message is gone).
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub chat: i64,
    pub to_message: Option<i32>,
}

impl Reply {
    fn parameters(self) -> Option<ReplyParameters> {
        self.to_message
            .map(|m| ReplyParameters::new(MessageId(m)).allow_sending_without_reply())
    }
}

/// How an image goes: compressed as a photo, or its bytes as a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Photo,
    Document,
}

impl FileKind {
    fn method(self) -> &'static str {
        match self {
            FileKind::Photo => "sendPhoto",
            FileKind::Document => "sendDocument",
        }
    }
}

/// An image to send, with what goes along with it.
#[derive(Clone, Debug)]
pub struct Upload {
    pub kind: FileKind,
    pub file: InputFile,
    pub caption: Option<String>,
    pub buttons: Option<InlineKeyboardMarkup>,
}

/// A photo's or a document's call: two request types, one answer.
type SendFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Message, teloxide::RequestError>> + Send>,
>;

impl TelegramApi {
    /// Sends `text` as a reply. `Ok(None)` only when Telegram had nothing
    /// to return.
    ///
    /// # Errors
    /// When the call cannot succeed under [`Policy::Reply`].
    pub async fn send_text(&self, to: Reply, text: String) -> Result<Option<Message>, TgError> {
        let bot = self.bot().clone();
        self.run("sendMessage", Policy::Reply, || {
            let mut r = bot.send_message(ChatId(to.chat), text.clone());
            if let Some(p) = to.parameters() {
                r = r.reply_parameters(p);
            }
            r.into_future()
        })
        .await
    }

    /// Sends `text` with `buttons` under it (the follow-up of an album,
    /// which cannot carry buttons itself), under `policy`.
    ///
    /// # Errors
    /// When the call cannot succeed under `policy`.
    pub async fn send_text_with_buttons(
        &self,
        to: Reply,
        text: String,
        buttons: InlineKeyboardMarkup,
        policy: Policy,
    ) -> Result<Option<Message>, TgError> {
        let bot = self.bot().clone();
        self.run("sendMessage", policy, || {
            let mut r = bot
                .send_message(ChatId(to.chat), text.clone())
                .reply_markup(buttons.clone());
            if let Some(p) = to.parameters() {
                r = r.reply_parameters(p);
            }
            r.into_future()
        })
        .await
    }

    /// Sends images as one album (`sendMediaGroup`, 2 to 10 items, all
    /// photos or all documents; the caption on the first). Returns the
    /// album's messages.
    ///
    /// # Errors
    /// When the call cannot succeed under `policy`.
    pub async fn send_album(
        &self,
        to: Reply,
        kind: FileKind,
        files: &[InputFile],
        caption: String,
        policy: Policy,
    ) -> Result<Option<Vec<Message>>, TgError> {
        use teloxide::types::{InputMedia, InputMediaDocument, InputMediaPhoto};
        let bot = self.bot().clone();
        self.run("sendMediaGroup", policy, || {
            let media: Vec<InputMedia> = files
                .iter()
                .enumerate()
                .map(|(i, file)| {
                    let caption = (i == 0).then(|| caption.clone());
                    match kind {
                        FileKind::Photo => {
                            let mut m = InputMediaPhoto::new(file.clone());
                            if let Some(c) = caption {
                                m = m.caption(c);
                            }
                            InputMedia::Photo(m)
                        }
                        FileKind::Document => {
                            let mut m = InputMediaDocument::new(file.clone());
                            if let Some(c) = caption {
                                m = m.caption(c);
                            }
                            InputMedia::Document(m)
                        }
                    }
                })
                .collect();
            let mut r = bot.send_media_group(ChatId(to.chat), media);
            if let Some(p) = to.parameters() {
                r = r.reply_parameters(p);
            }
            r.into_future()
        })
        .await
    }

    /// As [`TelegramApi::send_text`], a failure logged: for replies the
    /// caller has nothing better to do with.
    pub async fn reply(&self, to: Reply, text: String) -> Option<Message> {
        match self.send_text(to, text).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "could not reply");
                None
            }
        }
    }

    /// Sends an image as a photo or a document.
    ///
    /// # Errors
    /// When the call cannot succeed under `policy`.
    pub async fn send_file(
        &self,
        to: Reply,
        upload: &Upload,
        policy: Policy,
    ) -> Result<Option<Message>, TgError> {
        let bot = self.bot().clone();
        let chat = ChatId(to.chat);
        self.run(upload.kind.method(), policy, || -> SendFuture {
            // `sendPhoto` and `sendDocument` are different request types
            // with the same setters: one filling for both.
            macro_rules! filled {
                ($request:expr) => {{
                    let mut r = $request;
                    if let Some(c) = upload.caption.clone() {
                        r = r.caption(c);
                    }
                    if let Some(b) = upload.buttons.clone() {
                        r = r.reply_markup(b);
                    }
                    if let Some(p) = to.parameters() {
                        r = r.reply_parameters(p);
                    }
                    Box::pin(r.into_future())
                }};
            }
            match upload.kind {
                FileKind::Photo => filled!(bot.send_photo(chat, upload.file.clone())),
                FileKind::Document => filled!(bot.send_document(chat, upload.file.clone())),
            }
        })
        .await
    }

    /// Replaces the text of one of our messages (and its buttons, when
    /// given). "Not modified" is `Ok(None)`.
    ///
    /// # Errors
    /// When the call cannot succeed under [`Policy::Reply`].
    pub async fn edit_text(
        &self,
        chat: i64,
        message_id: i32,
        text: String,
        buttons: Option<InlineKeyboardMarkup>,
    ) -> Result<Option<Message>, TgError> {
        let bot = self.bot().clone();
        self.run("editMessageText", Policy::Reply, || {
            let mut r = bot.edit_message_text(ChatId(chat), MessageId(message_id), text.clone());
            if let Some(b) = buttons.clone() {
                r = r.reply_markup(b);
            }
            r.into_future()
        })
        .await
    }

    /// Fetches a file a user sent: `getFile`, then the download, at most
    /// `max` bytes (Telegram lets bots download 20 MB). Errors carry
    /// neither the token nor the file URL (which holds the token).
    ///
    /// # Errors
    /// A [`TgError`]: `Api` for a refusal or a file over `max`, `Network`
    /// for a download that broke off.
    pub async fn download(
        &self,
        file: &teloxide::types::FileId,
        max: u32,
    ) -> Result<Vec<u8>, TgError> {
        use futures_util::StreamExt as _;
        use teloxide::net::Download as _;
        let too_big = || TgError {
            kind: TgErrorKind::Api,
            text: format!("the file is larger than {max} bytes"),
        };
        let bot = self.bot().clone();
        let meta = self
            .run("getFile", Policy::Reply, || {
                bot.get_file(file.clone()).into_future()
            })
            .await?
            .ok_or_else(|| TgError {
                kind: TgErrorKind::Api,
                text: "getFile gave no file".into(),
            })?;
        if meta.meta.size > max {
            return Err(too_big());
        }
        let mut stream = bot.download_file_stream(&meta.path);
        let mut out = Vec::with_capacity(meta.meta.size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| TgError {
                kind: TgErrorKind::Network,
                text: self.scrubbed(&e.without_url().to_string()),
            })?;
            if out.len() + chunk.len() > max as usize {
                return Err(too_big());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Answers a button press with a short notice (best effort).
    pub async fn answer_query(&self, query: &CallbackQuery, text: String) {
        let bot = self.bot().clone();
        let id = query.id.clone();
        let text = words::short(&text);
        if let Err(e) = self
            .run("answerCallbackQuery", Policy::Reply, || {
                bot.answer_callback_query(id.clone())
                    .text(text.clone())
                    .into_future()
            })
            .await
        {
            tracing::debug!(error = %e, "could not answer a button press");
        }
    }
}
