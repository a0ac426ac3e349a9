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
