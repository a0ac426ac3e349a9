//! Parsing a Telegram message into what the user asked for (§2). Pure:
//! no bot, no I/O; anything unexpected is a value, never an error.

/// What a button under a delivered photo asks for. Its callback data is
/// written by [`Button::data`] and read back by [`Button::parse`]; data a
/// client forged parses to `None` or names a request the intake then
/// checks (it must be of the chat the button is pressed in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Button {
    /// 🔁 Again: the same prompt as a new request.
    Again(crate::domain::RequestId),
    /// 📄 Original: the kept image as a document.
    Original(crate::domain::RequestId),
}

impl Button {
    /// The callback data (Telegram allows 64 bytes; this is at most 42).
    pub fn data(&self) -> String {
        match self {
            Button::Again(id) => format!("again:{id}"),
            Button::Original(id) => format!("orig:{id}"),
        }
    }

    pub fn parse(data: &str) -> Option<Button> {
        let (action, id) = data.split_once(':')?;
        let id = crate::domain::RequestId(id.parse().ok()?);
        match action {
            "again" => Some(Button::Again(id)),
            "orig" => Some(Button::Original(id)),
            _ => None,
        }
    }

    pub fn request(&self) -> crate::domain::RequestId {
        match self {
            Button::Again(id) | Button::Original(id) => *id,
        }
    }
}

/// What a message asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// `/image=<model>=<prompt>`: model lowercased, prompt trimmed, control
    /// characters (other than newline and tab) removed. The prompt may be
    /// empty; admission says what is wrong. `model` is None for
    /// `/image <prompt>` and `/image=<prompt>` (no second `=`): the user's
    /// remembered model draws it (§8).
    Image {
        model: Option<String>,
        prompt: String,
        /// `/image=<model>*N=<prompt>`: N images of the prompt (variations,
        /// §8); None for one. Admission checks the range.
        images: Option<u32>,
    },
    /// `/image` alone or malformed.
    ImageUsage,
    /// `/model` (show the remembered model and the choices) or
    /// `/model <name>` (remember it).
    Model(Option<String>),
    /// `/queue` or `/status`.
    Queue,
    /// `/cancel` or `/cancel <id-prefix>`.
    Cancel(Option<String>),
    /// `/presets`.
    Presets,
    /// `/start`.
    Start,
    /// `/help`.
    Help,
    /// Another `/command`; `addressed` when written `/command@ourbot`. In
    /// a group, a command without our name may be another bot's: only an
    /// addressed one gets the "unknown command" reply (§2, Groups).
    UnknownCommand { name: String, addressed: bool },
    /// Plain text, or a command addressed to another bot.
    NotForUs,
}

/// Parses `text`. `bot_username` (without `@`) lets `/image@ourbot=…` through
/// and makes `/image@otherbot=…` someone else's business.
pub fn parse(text: &str, bot_username: Option<&str>) -> Input {
    let text = text.trim_start_matches(blank);
    let Some(rest) = text.strip_prefix('/') else {
        return Input::NotForUs;
    };
    let name_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let (name, mut rest) = rest.split_at(name_len);
    if name.is_empty() {
        return Input::NotForUs;
    }
    let mut addressed = false;
    if let Some(after_at) = rest.strip_prefix('@') {
        let user_len = after_at
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after_at.len());
        let (user, after) = after_at.split_at(user_len);
        match bot_username {
            Some(me) if me.eq_ignore_ascii_case(user) => addressed = true,
            // Addressed to another bot, or we do not know our name yet.
            Some(_) => return Input::NotForUs,
            None => {}
        }
        rest = after;
    }
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        "image" => parse_image(rest),
        "queue" | "status" => Input::Queue,
        "cancel" => {
            let arg = rest
                .split_whitespace()
                .next()
                .map(|s| id_prefix(s.trim_matches(|c: char| c == '<' || c == '>')));
            Input::Cancel(arg.filter(|a| !a.is_empty()))
        }
        "presets" => Input::Presets,
        "model" => Input::Model(
            rest.split_whitespace()
                .next()
                .map(|m| {
                    m.chars()
                        .filter(|c| !is_direction_mark(*c))
                        .collect::<String>()
                })
                .map(|m| m.to_lowercase())
                .filter(|m| !m.is_empty()),
        ),
        "start" => Input::Start,
        "help" => Input::Help,
        _ => Input::UnknownCommand { name, addressed },
    }
}

fn parse_image(rest: &str) -> Input {
    // `/image=model=prompt`; spaces around the `=` signs are forgiven.
    let Some(after) = rest.trim_start_matches(blank).strip_prefix('=') else {
        // `/image <prompt>`: the remembered model; `/image` alone: usage.
        return if rest.starts_with(blank) {
            remembered_model(rest)
        } else {
            Input::ImageUsage
        };
    };
    let Some((model, prompt)) = after.split_once('=') else {
        // `/image=<prompt>`: the remembered model.
        return remembered_model(after);
    };
    let model: String = model.chars().filter(|c| !is_direction_mark(*c)).collect();
    let model = model.trim();
    // `flux*3`: three images (spaces around the `*` forgiven). Only digits
    // after the `*` make a count; any other `*` stays in the name (and
    // admission says there is no such model). A `*` in the prompt is the
    // prompt's.
    let (model, images) = match model.rsplit_once('*') {
        Some((name, n))
            if !name.trim().is_empty()
                && !n.trim().is_empty()
                && n.trim().bytes().all(|b| b.is_ascii_digit()) =>
        {
            (name.trim(), Some(n.trim().parse().unwrap_or(u32::MAX)))
        }
        _ => (model, None),
    };
    // `/image==fox` names no model: the usage message says how.
    if model.is_empty() || model.contains(char::is_whitespace) {
        return Input::ImageUsage;
    }
    Input::Image {
        model: Some(model.to_lowercase()),
        prompt: strip_controls(prompt).trim_matches(blank).to_owned(),
        images,
    }
}

/// An `/image` that names no model: the user's remembered one draws the
/// prompt (§8); an empty prompt gets the usage message.
fn remembered_model(prompt: &str) -> Input {
    let prompt = strip_controls(prompt).trim_matches(blank).to_owned();
    if prompt.is_empty() {
        Input::ImageUsage
    } else {
        Input::Image {
            model: None,
            prompt,
            images: None,
        }
    }
}

/// Whitespace, or a direction mark: a right-to-left keyboard, or a command
/// copied out of a Persian text (whose placeholders are isolated), puts
/// these around what the user meant to write.
fn blank(c: char) -> bool {
    c.is_whitespace() || is_direction_mark(c)
}

/// The invisible Unicode marks that only set text direction (LRM, RLM,
/// ALM, the embeddings and overrides, the isolates).
fn is_direction_mark(c: char) -> bool {
    matches!(
        c,
        '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A `/cancel` argument as ids are written: direction marks dropped,
/// Persian and Arabic-Indic digits (what a Persian keyboard types) read as
/// ASCII digits, letters lowercased.
fn id_prefix(arg: &str) -> String {
    arg.chars()
        .filter(|c| !is_direction_mark(*c))
        .map(|c| match c {
            '\u{06F0}'..='\u{06F9}' => {
                char::from_u32(c as u32 - 0x06F0 + u32::from(b'0')).unwrap_or(c)
            }
            '\u{0660}'..='\u{0669}' => {
                char::from_u32(c as u32 - 0x0660 + u32::from(b'0')).unwrap_or(c)
            }
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Removes control characters except newline and tab.
fn strip_controls(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn button_data_reads_back_and_forged_data_does_not() {
        use super::Button;
        let id = crate::domain::RequestId(uuid::Uuid::from_u128(0x1234));
        for b in [Button::Again(id), Button::Original(id)] {
            assert_eq!(Button::parse(&b.data()), Some(b));
            assert!(b.data().len() <= 64);
        }
        for forged in [
            "again",
            "again:",
            "again:nope",
            "delete:00000000-0000-0000-0000-000000001234",
            "",
        ] {
            assert_eq!(Button::parse(forged), None, "{forged}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn image(model: &str, prompt: &str) -> Input {
        Input::Image {
            model: Some(model.into()),
            prompt: prompt.into(),
            images: None,
        }
    }

    fn images(model: &str, n: u32, prompt: &str) -> Input {
        Input::Image {
            model: Some(model.into()),
            prompt: prompt.into(),
            images: Some(n),
        }
    }

    /// An `/image` with no model named: the remembered one draws it.
    fn remembered(prompt: &str) -> Input {
        Input::Image {
            model: None,
            prompt: prompt.into(),
            images: None,
        }
    }

    #[test]
    fn the_table_of_section_2() {
        let bot = Some("easel_bot");
        let cases: Vec<(&str, Input)> = vec![
            (
                "/image=flux=a red fox in snow",
                image("flux", "a red fox in snow"),
            ),
            ("/image=FLUX=a fox", image("flux", "a fox")),
            ("/image=SdXl=a fox", image("sdxl", "a fox")),
            ("  /image=flux=  a fox  ", image("flux", "a fox")),
            ("/image=flux=a=b=c", image("flux", "a=b=c")),
            (
                "/image=flux=line one\nline two",
                image("flux", "line one\nline two"),
            ),
            (
                "/image=flux=روباه قرمز در برف 🦊",
                image("flux", "روباه قرمز در برف 🦊"),
            ),
            ("/image@easel_bot=flux=a fox", image("flux", "a fox")),
            ("/image@EASEL_BOT=flux=a fox", image("flux", "a fox")),
            ("/image@other_bot=flux=a fox", Input::NotForUs),
            ("/image = flux = a fox", image("flux", "a fox")),
            ("/image=flux=a\u{0}b\u{7}c\td", image("flux", "abc\td")),
            ("/image=flux=", image("flux", "")),
            ("/image=flux=   \n ", image("flux", "")),
            // No model named: the usage message, not "no model called \"\"".
            ("/image==a fox", Input::ImageUsage),
            ("/image=unknown=a fox", image("unknown", "a fox")),
            ("/image", Input::ImageUsage),
            ("/image@easel_bot", Input::ImageUsage),
            ("/image flux a fox", remembered("flux a fox")),
            (
                "/image a red fox = winter",
                remembered("a red fox = winter"),
            ),
            ("/image=flux", remembered("flux")),
            ("/image= a fox in snow ", remembered("a fox in snow")),
            ("/image@easel_bot a fox", remembered("a fox")),
            ("/image   ", Input::ImageUsage),
            ("/image=", Input::ImageUsage),
            ("/image,fox", Input::ImageUsage),
            ("/image=flux*3=a cat", images("flux", 3, "a cat")),
            ("/image=FLUX * 4 = a cat", images("flux", 4, "a cat")),
            ("/image=flux*1=a cat", images("flux", 1, "a cat")),
            (
                "/image=flux*99999999999=a cat",
                images("flux", u32::MAX, "a cat"),
            ),
            ("/image=flux=a cat*3=x", image("flux", "a cat*3=x")),
            ("/image=flux=2*3=6", image("flux", "2*3=6")),
            ("/image=flux*x=a cat", image("flux*x", "a cat")),
            ("/image=*3=a cat", image("*3", "a cat")),
            ("/model", Input::Model(None)),
            ("/model SDXL", Input::Model(Some("sdxl".into()))),
            (
                "/model@easel_bot  flux  ",
                Input::Model(Some("flux".into())),
            ),
            ("/image=fl ux=a fox", Input::ImageUsage),
            ("/queue", Input::Queue),
            ("/status", Input::Queue),
            ("/cancel", Input::Cancel(None)),
            ("/cancel 019abc", Input::Cancel(Some("019abc".into()))),
            // Typed on a Persian keyboard, or copied out of a Persian reply.
            ("/cancel ۰۱۹ABC", Input::Cancel(Some("019abc".into()))),
            (
                "/cancel \u{2068}019abc\u{2069}",
                Input::Cancel(Some("019abc".into())),
            ),
            ("\u{200F}/image=flux=گربه", image("flux", "گربه")),
            (
                "\u{2068}/image=\u{2068}flux\u{2069}=گربه\u{2069}",
                image("flux", "گربه"),
            ),
            ("/image\u{200E}=flux=a fox", image("flux", "a fox")),
            (
                "/cancel@easel_bot  019abc  ",
                Input::Cancel(Some("019abc".into())),
            ),
            ("/start", Input::Start),
            ("/help", Input::Help),
            ("/presets", Input::Presets),
            ("/presets@easel_bot", Input::Presets),
            ("/HELP", Input::Help),
            (
                "/frobnicate",
                Input::UnknownCommand {
                    name: "frobnicate".into(),
                    addressed: false,
                },
            ),
            (
                "/frobnicate@easel_bot",
                Input::UnknownCommand {
                    name: "frobnicate".into(),
                    addressed: true,
                },
            ),
            ("/frobnicate@other_bot", Input::NotForUs),
            ("/image==fox", Input::ImageUsage),
            ("/image= =fox", Input::ImageUsage),
            ("hello", Input::NotForUs),
            ("", Input::NotForUs),
            ("/", Input::NotForUs),
            ("/ image=flux=x", Input::NotForUs),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text, bot), want, "{text:?}");
        }
    }

    #[test]
    fn a_50000_character_message() {
        let text = format!("/image=flux={}", "ا".repeat(50_000));
        match parse(&text, None) {
            Input::Image { prompt, .. } => assert_eq!(prompt.chars().count(), 50_000),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = parse(&s, Some("easel_bot"));
        }

        #[test]
        fn any_prompt_survives(model in "[a-zA-Z0-9_-]{1,12}", prompt in "\\PC{0,300}") {
            match parse(&format!("/image={model}={prompt}"), None) {
                Input::Image { model: m, prompt: p, images: None } => {
                    prop_assert_eq!(m, Some(model.to_lowercase()));
                    prop_assert_eq!(p, prompt.trim());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// `/image=<model>*N=<prompt>` asks for N images; a `*` or an `=`
        /// in the prompt never makes a count or a model.
        #[test]
        fn a_count_is_read_only_after_the_model(model in "[a-z][a-z0-9_-]{0,11}", n in 0u32..100, prompt in "[^\\s\\p{C}]\\PC{0,100}") {
            let text = format!("/image={model}*{n}={prompt}");
            let want = Input::Image { model: Some(model.clone()), prompt: prompt.trim().to_owned(), images: Some(n) };
            prop_assert_eq!(parse(&text, None), want);
            let text = format!("/image={model}={prompt}");
            let parsed = parse(&text, None);
            let is_plain = matches!(parsed, Input::Image { images: None, .. });
            prop_assert!(is_plain, "{:?}", parsed);
        }

        /// `/image <prompt>` and `/image=<prompt>` (no second `=`) leave the
        /// model to the user's remembered one, the prompt as written.
        #[test]
        fn a_prompt_without_a_model_round_trips(prompt in "[^=\\s\\p{C}][^=\\p{C}]{0,200}") {
            let want = Input::Image { model: None, prompt: prompt.trim().to_owned(), images: None };
            prop_assert_eq!(parse(&format!("/image {prompt}"), None), want.clone());
            prop_assert_eq!(parse(&format!("/image={prompt}"), None), want);
        }
    }
}
