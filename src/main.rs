//! The `easel` binary: clap subcommands; `main` prints errors once, as one
//! sentence, and maps them to the documented exit codes (0 ok, 1 a check
//! failed, 2 bad usage or configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use easel::app::{self, StartError};
use easel::config::Settings;

#[derive(Parser)]
#[command(
    name = "easel",
    version,
    about = "A Telegram bot that turns prompts into images; every request an event-sourced state machine."
)]
struct Cli {
    /// Data directory (event log, kept images). Default: EASEL_DATA_DIR, then ./data.
    #[arg(long, global = true, env = "EASEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The log in PostgreSQL (postgres://…): `run` serves as one replica on it; `audit`, `export` and `replay` read it instead of the data dir; `migrate --to <dir>` copies it.
    #[arg(
        long,
        global = true,
        env = "EASEL_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bot (long polling, or Telegram's webhook with --webhook) until SIGINT/SIGTERM.
    ///
    /// Example: TELEGRAM_BOT_TOKEN=123:abc FLUX_WORKER_URL=http://gpu:8000/generate easel run
    Run {
        /// Take updates on EASEL_WEBHOOK_LISTEN (POST /telegram, checked against
        /// EASEL_WEBHOOK_SECRET) instead of long polling; register it first with `easel webhook set`.
        #[arg(long)]
        webhook: bool,
    },
    /// Run the real bot against in-process fakes (no token, no network) and show what happens.
    ///
    /// Example: easel demo
    #[cfg(feature = "demo")]
    Demo {
        /// Keep the bot and its dashboard running after the script, until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
    /// Request history: list, show one request, statistics.
    #[command(subcommand)]
    Audit(Audit),
    /// The event log as JSON Lines on stdout, oldest first.
    ///
    /// Example: easel export --since 2026-11-25 > events.jsonl
    Export {
        /// Only events at or after this time (RFC 3339 or a date).
        #[arg(long)]
        since: Option<String>,
        /// The archived history first (requests retention moved out of the log).
        #[arg(long)]
        with_archive: bool,
    },
    /// Rebuild every projection from the log (or an exported file) and print each model's queue.
    ///
    /// Example: easel replay --from events.jsonl --verify
    Replay {
        /// An exported JSON Lines file instead of the data dir's log.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Stop after this event.
        #[arg(long)]
        until_seq: Option<u64>,
        /// Check every transition and invariant; exit 1 naming the first violation.
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
        /// The archived history first, so the whole life of the data dir replays and verifies.
        #[arg(long, conflicts_with = "from")]
        with_archive: bool,
    },
    /// Copy a stopped data dir's log into an empty PostgreSQL database (or a database back into a new data dir), and verify the copy.
    ///
    /// Example: easel migrate --data-dir /var/lib/easel --to "postgres://easel@db.internal/easel"
    Migrate {
        /// An empty database (postgres://…) to copy the data dir into, or a new data dir to copy EASEL_DATABASE_URL into.
        #[arg(long)]
        to: String,
    },
    /// Register, remove or show Telegram's webhook (once, from a deploy step; replicas never do).
    ///
    /// Example: EASEL_WEBHOOK_URL=https://bot.example.com/telegram EASEL_WEBHOOK_SECRET=… easel webhook set
    #[command(subcommand)]
    Webhook(Webhook),
    /// Rewrite the event log without the space sled keeps after retention removed requests (stop the bot first).
    ///
    /// Example: easel compact --data-dir /var/lib/easel
    Compact,
}

#[derive(Subcommand)]
enum Audit {
    /// Requests, newest first.
    ///
    /// Example: easel audit list --model flux --status failed --since 2026-11-25 --limit 20
    List {
        #[arg(long)]
        user: Option<i64>,
        #[arg(long)]
        model: Option<String>,
        /// queued, enhancing, generating, sending, done, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// RFC 3339 or a date.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// How many, newest first; 0 lists all. Stderr says when more matched.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One request and its full event timeline, by id or unique id prefix.
    ///
    /// Example: easel audit show 019abb1c-3a00
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Counts per model and status; p50/p95 of queue wait and each stage; failure reasons.
    ///
    /// Example: easel audit stats --json
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Webhook {
    /// Register EASEL_WEBHOOK_URL with EASEL_WEBHOOK_SECRET for messages and button presses.
    Set {
        /// Simultaneous connections Telegram may open (1-100).
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u8).range(1..=100))]
        max_connections: u8,
        /// Forget the updates waiting now.
        #[arg(long)]
        drop_pending_updates: bool,
    },
    /// Remove the webhook (updates wait for long polling again).
    Delete {
        /// Forget the updates waiting now.
        #[arg(long)]
        drop_pending_updates: bool,
    },
    /// Show the webhook as Telegram has it: URL, pending updates, the last delivery error.
    Info {
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(filter: &str, format: easel::telemetry::LogFormat) {
    // `easel run` has checked RUST_LOG with its settings; the demo's own
    // filter is fixed. "info" is the fallback of neither, only of a bug.
    let filter = easel::telemetry::log_filter(filter)
        .or_else(|_| easel::telemetry::log_filter("info"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    easel::telemetry::install(filter, format, std::io::stderr);
}

/// Everything that can stop the binary, printed once by [`main`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Configuration problems, one sentence each (exit 2).
    #[error("{}", .0.0.join("\n"))]
    Config(easel::config::ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Ops(#[from] easel::ops::OpsError),
    /// Telegram refused or could not be reached (exit 1).
    #[error("Telegram: {0}")]
    Telegram(String),
    #[error("could not start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[cfg(feature = "demo")]
    #[error("the demo failed: {0:#}")]
    Demo(anyhow::Error),
    /// The demo ran and something did not go as it should; it printed
    /// its own story.
    #[cfg(feature = "demo")]
    #[error("")]
    CheckFailed,
}

impl Failure {
    /// The documented exit codes: 2 bad usage or configuration, 1 a check
    /// failed or the work could not be done, 0 a closed output pipe.
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) | Failure::Start(StartError::Config(_)) => 2,
            Failure::Ops(e) => e.exit_code(),
            Failure::Start(StartError::Other(_)) | Failure::Runtime(_) | Failure::Telegram(_) => 1,
            #[cfg(feature = "demo")]
            Failure::Demo(_) | Failure::CheckFailed => 1,
        }
    }

    /// Whether there is nothing to say (the reader closed the pipe, or the
    /// check printed its own verdict).
    fn quiet(&self) -> bool {
        match self {
            Failure::Ops(easel::ops::OpsError::ReaderGone) => true,
            #[cfg(feature = "demo")]
            Failure::CheckFailed => true,
            _ => false,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)
}

fn main() -> ExitCode {
    // The data dir is the bot's alone (§6): before anything is created.
    easel::store::disk::private_umask();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { webhook } => run(cli.data_dir, webhook, cli.database_url),
        Command::Webhook(w) => webhook(w),
        Command::Migrate { to } => migrate(cli.data_dir, cli.database_url, &to),
        #[cfg(feature = "demo")]
        Command::Demo { hold } => demo(cli.data_dir, hold),
        command @ (Command::Export { .. }
        | Command::Replay { from: None, .. }
        | Command::Audit(_))
            if cli.database_url.is_some() =>
        {
            let url = cli.database_url.clone().unwrap_or_default();
            from_database(cli.data_dir, &url, command)
        }
        Command::Compact if cli.database_url.is_some() => Err(easel::ops::OpsError::usage(
            "`easel compact` rewrites a data dir's sled log; with EASEL_DATABASE_URL set there is none to compact (unset it)",
        )
        .into()),
        command => operate(cli.data_dir, command, None),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The one place the binary prints an error.
            if !e.quiet() {
                for line in format!("{e:#}").lines() {
                    eprintln!("easel: {line}");
                }
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// The operator commands; on `loaded` (a PostgreSQL log's records) when
/// given, else on the data dir's log (or the running bot's socket).
fn operate(
    flag: Option<PathBuf>,
    command: Command,
    loaded: Option<easel::ops::source::Source>,
) -> Result<u8, Failure> {
    use easel::ops::OpsError;
    use easel::ops::cli::{self, ReplayInput};
    use easel::ops::source::Source;

    let dir = easel::config::DataDir::resolve(flag);
    // Every command reads its source once.
    let loaded = std::cell::Cell::new(loaded);
    let open = || match loaded.take() {
        Some(src) => Ok(src),
        None => Source::open(&dir),
    };
    let time = |t: Option<String>| {
        t.map(|t| cli::parse_time(&t))
            .transpose()
            .map_err(OpsError::Usage)
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let code = (|| match command {
        Command::Audit(Audit::List {
            user,
            model,
            status,
            since,
            until,
            limit,
            json,
        }) => {
            let status = status
                .map(|s| {
                    easel::domain::Stage::ALL
                        .into_iter()
                        .find(|st| st.as_str() == s.to_ascii_lowercase())
                        .ok_or_else(|| OpsError::usage(format!("\"{s}\" is not a status; use queued, enhancing, generating, sending, done, failed or cancelled")))
                })
                .transpose()?;
            let filter = easel::ops::query::Filter {
                user,
                model,
                status,
                since: time(since)?,
                until: time(until)?,
                limit: (limit > 0).then_some(limit),
            };
            cli::audit_list(&open()?, &filter, json, &mut out)
        }
        Command::Audit(Audit::Show { id, json }) => {
            cli::audit_show(&open()?, &dir.archive(), &id, json, &mut out)
        }
        Command::Audit(Audit::Stats { json }) => cli::audit_stats(&open()?, json, &mut out),
        Command::Export {
            since,
            with_archive,
        } => {
            let since = time(since)?;
            let archive = dir.archive();
            cli::export(
                &open()?,
                since,
                with_archive.then_some(archive.as_path()),
                &mut out,
            )
        }
        Command::Replay {
            from: Some(file),
            until_seq,
            verify,
            json,
            ..
        } => cli::replay(ReplayInput::File(&file), until_seq, verify, json, &mut out),
        Command::Replay {
            from: None,
            until_seq,
            verify,
            json,
            with_archive,
        } => {
            let archive = dir.archive();
            let input = ReplayInput::Source {
                src: &open()?,
                archive: with_archive.then_some(archive.as_path()),
            };
            cli::replay(input, until_seq, verify, json, &mut out)
        }
        Command::Compact => cli::compact(&dir.log(), &mut out),
        Command::Run { .. } | Command::Webhook(_) | Command::Migrate { .. } => Ok(0),
        #[cfg(feature = "demo")]
        Command::Demo { .. } => Ok(0),
    })()?;
    match std::io::Write::flush(&mut out) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OpsError::ReaderGone.into()),
        Err(e) => Err(OpsError::Output(e).into()),
        Ok(()) => Ok(code),
    }
}

fn run(data_dir: Option<PathBuf>, webhook: bool, database: Option<String>) -> Result<u8, Failure> {
    let mut settings = Settings::load().map_err(Failure::Config)?;
    if let Some(dir) = data_dir {
        settings.data_dir = easel::config::DataDir::new(dir);
    }
    init_tracing(&settings.log_filter, settings.log_format);
    runtime()?.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let signal = stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stop signal received; finishing up");
            signal.cancel();
        });
        match database {
            Some(url) => {
                app::replica::run(settings, secrecy::SecretString::from(url), webhook, stop).await
            }
            None => app::run_with(settings, stop, webhook).await,
        }
    })?;
    Ok(0)
}

/// `easel webhook set|delete|info`: one call to Telegram each, and what
/// Telegram then has, on stdout.
fn webhook(command: Webhook) -> Result<u8, Failure> {
    use easel::telegram::webhook;
    use secrecy::ExposeSecret;
    let settings = Settings::load().map_err(Failure::Config)?;
    let missing = |what: &str| {
        Failure::Config(easel::config::ConfigError(vec![format!(
            "{what} is not set; `easel webhook` needs it."
        )]))
    };
    let token = settings
        .telegram_token
        .clone()
        .ok_or_else(|| missing("TELEGRAM_BOT_TOKEN"))?;
    init_tracing("error", easel::telemetry::LogFormat::Text);
    runtime()?.block_on(async move {
        let api = easel::telegram::api::TelegramApi::new(
            token,
            settings.telegram_api_url.expose().clone(),
            tokio_util::sync::CancellationToken::new(),
        )
        .map_err(|e| Failure::Telegram(format!("could not build the client: {e}")))?;
        let tg = |e: easel::telegram::api::TgError| Failure::Telegram(e.text);
        let json = match command {
            Webhook::Set {
                max_connections,
                drop_pending_updates,
            } => {
                let url = settings
                    .webhook
                    .url
                    .as_ref()
                    .ok_or_else(|| missing("EASEL_WEBHOOK_URL"))?;
                let secret = settings
                    .webhook
                    .secret
                    .as_ref()
                    .ok_or_else(|| missing("EASEL_WEBHOOK_SECRET"))?;
                webhook::set(
                    &api,
                    url,
                    secret.expose_secret(),
                    max_connections,
                    drop_pending_updates,
                )
                .await
                .map_err(tg)?;
                false
            }
            Webhook::Delete {
                drop_pending_updates,
            } => {
                webhook::delete(&api, drop_pending_updates)
                    .await
                    .map_err(tg)?;
                false
            }
            Webhook::Info { json } => json,
        };
        let info = webhook::info(&api).await.map_err(tg)?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&info).unwrap_or_else(|_| "{}".into())
            );
        } else {
            print!("{info}");
        }
        Ok(0)
    })
}

/// The operator commands on the PostgreSQL log at `url`: its records are
/// read once into memory and queried as the data dir's log is. The
/// archive table (retention's) is read with them where a data dir's
/// archive files would be: `--with-archive`, and `audit show`.
fn from_database(flag: Option<PathBuf>, url: &str, command: Command) -> Result<u8, Failure> {
    use easel::ops::OpsError;
    let with_archive = matches!(
        command,
        Command::Export {
            with_archive: true,
            ..
        } | Command::Replay {
            with_archive: true,
            ..
        } | Command::Audit(Audit::Show { .. })
    );
    init_tracing("error", easel::telemetry::LogFormat::Text);
    let url = secrecy::SecretString::from(url.to_owned());
    let items = runtime()?
        .block_on(async move {
            let db = easel::store::pg::PgLog::connect(&url).await?;
            let mut items = if with_archive {
                db.read_archive().await?
            } else {
                Vec::new()
            };
            items.extend(db.read_all().await?);
            Ok::<_, easel::store::StoreError>(items)
        })
        .map_err(OpsError::from)?;
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(r) => records.push(r),
            // As from a data dir: a damaged record is reported and skipped.
            Err(e) => eprintln!("easel: skipping: {e}"),
        }
    }
    // Archived and live requests interleave in position order.
    records.sort_by_key(|r| r.seq);
    let loaded =
        easel::ops::source::Source::Loaded(Box::new(easel::store::MemoryStore::load(records)));
    // The archive is in the records: none from a data dir besides.
    let command = match command {
        Command::Export { since, .. } => Command::Export {
            since,
            with_archive: false,
        },
        Command::Replay {
            from,
            until_seq,
            verify,
            json,
            ..
        } => Command::Replay {
            from,
            until_seq,
            verify,
            json,
            with_archive: false,
        },
        other => other,
    };
    operate(flag, command, Some(loaded))
}

/// `easel migrate --to postgres://…` (from the data dir) or `--to <dir>`
/// (from `EASEL_DATABASE_URL`): the copy, verified, and one line saying
/// what it holds. A URL (it may hold a password) is never printed.
fn migrate(data_dir: Option<PathBuf>, database: Option<String>, to: &str) -> Result<u8, Failure> {
    use easel::ops::OpsError;
    init_tracing("error", easel::telemetry::LogFormat::Text);
    let done = if to.starts_with("postgres://") || to.starts_with("postgresql://") {
        let dir = easel::config::DataDir::resolve(data_dir);
        if !easel::store::SledStore::exists(&dir.log()) {
            return Err(OpsError::usage(format!("there is no easel event log in {dir}")).into());
        }
        let url = secrecy::SecretString::from(to.to_owned());
        runtime()?.block_on(easel::ops::migrate::to_postgres(&dir.log(), &url))?
    } else {
        let Some(from) = database else {
            return Err(OpsError::usage(
                "--to <dir> copies the database named by EASEL_DATABASE_URL (or --database-url) into a new data dir; neither is set",
            )
            .into());
        };
        let dir = easel::config::DataDir::new(PathBuf::from(to));
        let url = secrecy::SecretString::from(from);
        runtime()?.block_on(easel::ops::migrate::to_dir(&url, &dir))?
    };
    println!(
        "copied {} events of {} requests and {} named values; the last position is {}; every record reads back identical and both logs replay to the same state",
        done.events, done.requests, done.meta, done.head
    );
    Ok(0)
}

/// SIGINT or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(feature = "demo")]
fn demo(data_dir: Option<PathBuf>, hold: bool) -> Result<u8, Failure> {
    // The demo prints its own story; only errors are logged beside it.
    init_tracing("error", easel::telemetry::LogFormat::Text);
    let hold = hold.then(|| Box::pin(wait_for_signal()) as easel::demo::Hold);
    match runtime()?.block_on(easel::demo::run(data_dir, hold)) {
        Ok(true) => Ok(0),
        Ok(false) => Err(Failure::CheckFailed),
        Err(e) => Err(Failure::Demo(e)),
    }
}
