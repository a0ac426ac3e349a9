//! The tracing filter every subscriber of easel is built with (`easel run`,
//! the demo, the tests' log capture), and the one rule it adds to what the
//! operator asked for.
//!
//! sled 0.34 defers a closure that logs at TRACE (`sled::pagecache::iobuf`,
//! "bumping atomic header lsn") into crossbeam-epoch's garbage. Garbage runs
//! on whichever thread collects next, and that includes a thread's last pin
//! inside crossbeam's thread-local destructor, when the thread exits. By
//! then tracing-subscriber's `fmt` layer may have lost its own thread-local
//! buffer; touching it panics, and a panic in a thread-local destructor
//! aborts the whole process ("fatal runtime error: thread local panicked on
//! drop"). That is what aborted the `bot` test binary (issue 11), whose log
//! capture records everything at TRACE. So sled's page cache is capped at
//! DEBUG in every filter: its TRACE lines are never of use to an operator,
//! and without them nothing sled leaves in the garbage ever logs.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::ParseError;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written (`EASEL_LOG_FORMAT`, §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: the event's fields
    /// under `fields`, and every span it happened in under `spans` (the
    /// innermost under `span`) — so each line about a request carries its
    /// `request_id` and `model`, recorded on the `update` and `step`
    /// spans.
    Json,
}

/// Installs the process's subscriber: `filter` (see [`log_filter`]) in
/// `format`, written to `writer`. False when one was installed already.
pub fn install<W>(filter: EnvFilter, format: LogFormat, writer: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
            .is_ok(),
    }
}

/// The JSON subscriber of [`install`], not installed (for tests that
/// check its lines under `with_default`).
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .finish()
}

/// The cap on sled's page cache (see the module doc). More specific than
/// any plain `sled=…` directive, so it holds whatever the operator wrote.
pub const SLED_CAP: &str = "sled::pagecache=debug";

/// `spec` (a `RUST_LOG` value), with [`SLED_CAP`] added when `spec`
/// would let sled's page cache log at TRACE. Only then: the cap would
/// otherwise *raise* sled to DEBUG under a quieter spec (`info`, `error`)
/// and fill the operator's log with sled's I/O chatter.
///
/// # Errors
/// When `spec` is not a valid filter.
pub fn log_filter(spec: &str) -> Result<EnvFilter, ParseError> {
    let filter = EnvFilter::try_new(spec)?;
    if !sled_trace_enabled(spec)? {
        return Ok(filter);
    }
    Ok(filter.add_directive(SLED_CAP.parse()?))
}

/// Whether `spec` alone enables TRACE for sled's page cache.
fn sled_trace_enabled(spec: &str) -> Result<bool, ParseError> {
    use tracing_subscriber::layer::SubscriberExt;
    let probe = tracing_subscriber::registry().with(EnvFilter::try_new(spec)?);
    Ok(tracing::subscriber::with_default(
        probe,
        || tracing::enabled!(target: "sled::pagecache::iobuf", tracing::Level::TRACE),
    ))
}

#[cfg(test)]
mod tests {
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    use super::log_filter;

    fn enabled(spec: &str, target_is_sled: bool) -> bool {
        let subscriber = tracing_subscriber::registry().with(log_filter(spec).unwrap());
        tracing::subscriber::with_default(subscriber, || {
            if target_is_sled {
                tracing::enabled!(target: "sled::pagecache::iobuf", Level::TRACE)
            } else {
                tracing::enabled!(target: "easel::engine", Level::TRACE)
            }
        })
    }

    #[test]
    fn sleds_trace_lines_are_off_whatever_the_operator_asks() {
        for spec in [
            "trace",
            "sled=trace",
            "info,sled=trace",
            "sled::pagecache=trace",
        ] {
            assert!(!enabled(spec, true), "{spec} lets sled's TRACE through");
        }
        assert!(enabled("trace", false), "the cap took more than sled");
        assert!(log_filter("not a = valid filter [").is_err());
    }

    fn sled_debug(spec: &str) -> bool {
        let subscriber = tracing_subscriber::registry().with(log_filter(spec).unwrap());
        tracing::subscriber::with_default(
            subscriber,
            || tracing::enabled!(target: "sled::pagecache::iobuf", Level::DEBUG),
        )
    }

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `EASEL_LOG_FORMAT=json`: one JSON object per line, and a line
    /// inside a request's span carries its `request_id` and `model` even
    /// when they were recorded on the span after it was opened (as intake
    /// does once it has a request).
    #[test]
    fn json_lines_parse_and_carry_the_request_id() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber =
            super::json_subscriber(log_filter("info").unwrap(), move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "update",
                update_id = 7,
                request_id = tracing::field::Empty,
                model = tracing::field::Empty
            );
            let _in = span.enter();
            tracing::info!("parsed");
            span.record("request_id", "0123abcd-0000-4000-8000-000000000000");
            span.record("model", "flux");
            let step = tracing::info_span!("step", stage = "generating");
            let _step = step.enter();
            tracing::warn!(status = 503, "worker busy; retrying");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["message"], "parsed");
        assert!(lines[0]["spans"][0]["request_id"].is_null(), "{text}");
        let last = &lines[1];
        assert_eq!(last["level"], "WARN");
        assert_eq!(last["fields"]["status"], 503);
        let update = &last["spans"][0];
        assert_eq!(update["name"], "update");
        assert_eq!(update["request_id"], "0123abcd-0000-4000-8000-000000000000");
        assert_eq!(update["model"], "flux");
        assert_eq!(last["span"]["name"], "step");
    }

    #[test]
    fn the_cap_never_raises_sled_above_what_the_operator_asked() {
        for spec in ["error", "info", "warn,easel=trace", "sled=info"] {
            assert!(!sled_debug(spec), "{spec} shows sled's DEBUG lines");
        }
        // Asked for, DEBUG stays.
        assert!(sled_debug("trace"));
        assert!(sled_debug("sled=debug"));
    }
}
