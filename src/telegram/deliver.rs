//! Delivery of a finished image: `sendPhoto` from memory with the prompt as
//! caption (cut to 1024 UTF-16 units on a character boundary; the full text
//! follows when cut), or `sendDocument` when the image is beyond a photo's
//! limits; 429 waits and resends, never drops. Buttons: 🔁 Again, 📄 Original.

use std::sync::Arc;

use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup, InputFile};

use super::api::{Policy, TelegramApi, TgErrorKind};
use super::parse::Button;
use super::replies::{FileKind, Reply, Upload};
use super::words::{self, Lang};
use crate::engine::{Deliverer, Delivery, DeliveryFailure, KeptImage};
use crate::projection::ActiveRequest;

/// Telegram's caption limit, in UTF-16 code units.
pub const CAPTION_UNITS: usize = 1024;
/// Telegram's message limit, in UTF-16 code units.
pub const MESSAGE_UNITS: usize = 4096;
/// The largest photo (Telegram says 10 MB; counted in bytes to be safe).
pub const MAX_PHOTO_BYTES: usize = 10_000_000;

/// `text` cut to at most `max_units` UTF-16 code units on a character
/// boundary, with "…" when cut; and whether it was cut.
pub fn fit_utf16(text: &str, max_units: usize) -> (String, bool) {
    if text.encode_utf16().count() <= max_units {
        return (text.to_owned(), false);
    }
    let budget = max_units.saturating_sub(1);
    let mut units = 0;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        if units + c.len_utf16() > budget {
            break;
        }
        units += c.len_utf16();
        end = i + c.len_utf8();
    }
    (format!("{}…", &text[..end]), true)
}

/// Whether Telegram takes these bytes as a photo: ≤ 10 MB, width + height
/// ≤ 10000, aspect ratio ≤ 20. Unknown dimensions: try as a photo.
pub fn fits_as_photo(bytes: &[u8]) -> bool {
    if bytes.len() > MAX_PHOTO_BYTES {
        return false;
    }
    match imagesize::blob_size(bytes) {
        Ok(size) => {
            let (w, h) = (size.width, size.height);
            w > 0 && h > 0 && w + h <= 10_000 && w.max(h) <= 20 * w.min(h)
        }
        Err(_) => true,
    }
}

/// The buttons under a delivered image: 🔁 Again, and 📄 Original only
/// under a photo (a document already is the original file).
pub fn keyboard(id: crate::domain::RequestId, kind: FileKind, lang: Lang) -> InlineKeyboardMarkup {
    let mut row = vec![InlineKeyboardButton::callback(
        words::again_button(lang),
        Button::Again(id).data(),
    )];
    if kind == FileKind::Photo {
        row.push(InlineKeyboardButton::callback(
            words::original_button(lang),
            Button::Original(id).data(),
        ));
    }
    InlineKeyboardMarkup::new(vec![row])
}

/// The button under an album's follow-up: 🔁 Again (the same prompt, the
/// same number of images). 📄 Original is not offered: an album's images
/// are already the files the worker made when sent as documents, and one
/// button cannot name one image of several.
pub fn album_keyboard(id: crate::domain::RequestId, lang: Lang) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(vec![vec![InlineKeyboardButton::callback(
        words::again_button(lang),
        Button::Again(id).data(),
    )]])
}

/// What goes with a request's image(s): the user's language (as recorded
/// with the request), the prompt drawn, the caption fitted to Telegram's
/// limit (and whether it was cut), and where it goes (a reply to the
/// user's message).
struct Drawn<'a> {
    lang: Lang,
    prompt: &'a str,
    caption: String,
    cut: bool,
    to: Reply,
}

fn drawn(request: &ActiveRequest) -> Drawn<'_> {
    let lang = Lang::of(request.origin.language.as_deref());
    let prompt = request
        .enhanced_prompt
        .as_deref()
        .unwrap_or(request.prompt.as_str());
    let as_written = request.prompt_as_written || request.enhanced_prompt.is_none();
    let (caption, cut) = fit_utf16(
        &words::caption(lang, request.model.as_str(), prompt, as_written),
        CAPTION_UNITS,
    );
    Drawn {
        lang,
        prompt,
        caption,
        cut,
        to: Reply {
            chat: request.origin.chat_id.0,
            to_message: request.origin.message_id,
        },
    }
}

pub struct TelegramDeliverer {
    api: Arc<TelegramApi>,
}

impl TelegramDeliverer {
    pub fn new(api: Arc<TelegramApi>) -> Self {
        TelegramDeliverer { api }
    }
}

impl Deliverer for TelegramDeliverer {
    async fn deliver(
        &self,
        request: &ActiveRequest,
        image: &[u8],
        format: &str,
    ) -> Result<Delivery, DeliveryFailure> {
        let Drawn {
            lang,
            prompt,
            caption,
            cut,
            to,
        } = drawn(request);
        let bytes = bytes::Bytes::copy_from_slice(image);
        let kind = if fits_as_photo(image) {
            FileKind::Photo
        } else {
            FileKind::Document
        };
        let mut upload = Upload {
            kind,
            file: InputFile::memory(bytes).file_name(format!("easel-{}.{format}", request.id)),
            caption: Some(caption),
            buttons: Some(keyboard(request.id, kind, lang)),
        };
        let mut sent = self.api.send_file(to, &upload, Policy::Deliver).await;
        if upload.kind == FileKind::Photo
            && let Err(e) = &sent
            && e.kind == TgErrorKind::Api
        {
            // Telegram refused it as a photo (dimensions, processing):
            // the original bytes go as a document instead of failing.
            tracing::info!(error = %e, "photo refused; sending as a document");
            upload.kind = FileKind::Document;
            upload.buttons = Some(keyboard(request.id, FileKind::Document, lang));
            sent = self.api.send_file(to, &upload, Policy::Deliver).await;
        }
        let message = match sent {
            Ok(m) => m,
            // Waiting out a 429 or a backoff when the stop came: the
            // request stays in Sending and is sent after the next start.
            Err(e) if e.kind == TgErrorKind::ShuttingDown => {
                return Err(DeliveryFailure::Interrupted);
            }
            Err(e) => return Err(DeliveryFailure::Refused { reason: e.text }),
        };
        if cut {
            let (full, _) = fit_utf16(
                &format!("{}\n{prompt}", words::full_prompt_follows(lang)),
                MESSAGE_UNITS,
            );
            let below = Reply {
                chat: to.chat,
                to_message: message.as_ref().map(|m| m.id.0),
            };
            if let Err(e) = self.api.send_text(below, full).await {
                // The image is delivered; a lost follow-up is only logged.
                tracing::warn!(error = %e, "could not send the full prompt");
            }
        }
        Ok(Delivery {
            message_id: message.map(|m| m.id.0),
        })
    }

    async fn deliver_album(
        &self,
        request: &ActiveRequest,
        images: &[KeptImage],
    ) -> Result<Delivery, DeliveryFailure> {
        let Drawn {
            lang, caption, to, ..
        } = drawn(request);
        // An album is all photos or all documents (Telegram will not mix
        // them): one image beyond a photo's limits makes them documents.
        let kind = if images.iter().all(|i| fits_as_photo(&i.bytes)) {
            FileKind::Photo
        } else {
            FileKind::Document
        };
        let files: Vec<InputFile> = images
            .iter()
            .enumerate()
            .map(|(n, i)| {
                InputFile::memory(bytes::Bytes::copy_from_slice(&i.bytes)).file_name(format!(
                    "easel-{}-{}.{}",
                    request.id,
                    n + 1,
                    i.format
                ))
            })
            .collect();
        let sent = self
            .api
            .send_album(to, kind, &files, caption, Policy::Deliver)
            .await;
        let album = match sent {
            Ok(m) => m.unwrap_or_default(),
            Err(e) if e.kind == TgErrorKind::ShuttingDown => {
                return Err(DeliveryFailure::Interrupted);
            }
            Err(e) => return Err(DeliveryFailure::Refused { reason: e.text }),
        };
        // The buttons and what failed, in a short follow-up (an album
        // carries no buttons). Best effort: the images are delivered.
        let failed: Vec<(u32, crate::domain::FailureKind)> = request
            .variations
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.failure.as_ref().map(|f| (i as u32 + 1, f.kind)))
            .collect();
        let footer = words::album_footer(
            lang,
            request.model.as_str(),
            images.len(),
            request.images,
            &failed,
        );
        let below = Reply {
            chat: to.chat,
            to_message: album.first().map(|m| m.id.0),
        };
        if let Err(e) = self
            .api
            .send_text_with_buttons(
                below,
                footer,
                album_keyboard(request.id, lang),
                Policy::Deliver,
            )
            .await
        {
            tracing::warn!(error = %e, "could not send an album's follow-up");
        }
        Ok(Delivery {
            message_id: album.first().map(|m| m.id.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn captions_are_cut_in_utf16_units() {
        assert_eq!(fit_utf16("short", 1024), ("short".to_owned(), false));
        let (cut, was_cut) = fit_utf16(&"a".repeat(1025), 1024);
        assert!(was_cut);
        assert_eq!(cut.encode_utf16().count(), 1024);
        // An emoji is two units: never split in half.
        let (cut, _) = fit_utf16(&"🦊".repeat(600), 1024);
        assert_eq!(cut, format!("{}…", "🦊".repeat(511)));
    }

    proptest! {
        #[test]
        fn fit_never_exceeds_and_is_a_prefix(s in any::<String>(), max in 1usize..64) {
            let (out, cut) = fit_utf16(&s, max);
            prop_assert!(out.encode_utf16().count() <= max);
            if cut {
                let body = out.strip_suffix('…').unwrap();
                prop_assert!(s.starts_with(body));
            } else {
                prop_assert_eq!(out, s);
            }
        }
    }
}
