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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bot (long polling) until SIGINT/SIGTERM.
    ///
    /// Example: TELEGRAM_BOT_TOKEN=123:abc FLUX_WORKER_URL=http://gpu:8000/generate easel run
    Run,
    /// Run the real bot against in-process fakes (no token, no network) and show what happens.
    ///
    /// Example: easel demo
    Demo,
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("could not start the runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => run(cli.data_dir),
        Command::Demo => demo(cli.data_dir),
    }
}

fn run(data_dir: Option<PathBuf>) -> ExitCode {
    let mut settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            for problem in &e.0 {
                eprintln!("easel: {problem}");
            }
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = data_dir {
        settings.data_dir = dir;
    }
    init_tracing(&settings.log_filter);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("easel: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stop signal received; finishing up");
            let _ = stop.send(true);
        });
        app::run(settings, rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(problem)) => {
            eprintln!("easel: {problem}");
            ExitCode::from(2)
        }
        Err(StartError::Other(e)) => {
            eprintln!("easel: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn demo(data_dir: Option<PathBuf>) -> ExitCode {
    // The demo prints its own story; only errors are logged beside it.
    init_tracing("error");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("easel: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(easel::demo::run(data_dir)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("easel: the demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
