//! Issue 11's abort, reproduced and shown fixed. sled 0.34 defers a
//! closure that logs at TRACE (target `sled::pagecache::iobuf`) into
//! crossbeam-epoch's garbage; a thread that exits runs such garbage from
//! crossbeam's thread-local destructor, after tracing-subscriber's `fmt`
//! layer lost its thread-local buffer, and the panic that follows aborts
//! the process. Each case runs in a child process (this binary again),
//! since the unfixed one ends in SIGABRT:
//! - with a plain `trace` filter the child aborts (the cause, as seen in
//!   the core dump of the `bot` binary: `__call_tls_dtors` →
//!   `crossbeam_epoch::collector::LocalHandle` → abort);
//! - with `easel::telemetry::log_filter("trace")` it exits cleanly.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "EASEL_TLS_TEARDOWN_CHILD";

/// The child's work: a thread that pins crossbeam first (its destructor is
/// registered first, so it runs last), logs once through `fmt` (registers
/// the buffer's destructor second, so it runs first), leaves a deferred
/// TRACE line in the garbage as sled does, and pins until the pin inside
/// crossbeam's destructor is the one that collects that garbage. (The
/// stack of the plain case's panic: `fmt_layer.rs` `BUF.with` ← the
/// deferred closure ← `crossbeam_epoch::internal::Local::finalize` ←
/// `LocalHandle::drop` ← `__call_tls_dtors`.)
fn child(spec: &str) {
    let filter = if spec == "easel" {
        easel::telemetry::log_filter("trace").unwrap()
    } else {
        tracing_subscriber::EnvFilter::new("trace")
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::sink)
        .init();
    std::thread::spawn(|| {
        drop(crossbeam_epoch::pin()); // pin #0 (collects nothing)
        tracing::info!("the fmt layer's buffer is now in use on this thread");
        let guard = crossbeam_epoch::pin(); // pin #1
        guard.defer(|| {
            tracing::trace!(target: "sled::pagecache::iobuf", "bumping atomic header lsn");
        });
        guard.flush();
        drop(guard);
        // Pins #2..=#127 collect nothing (crossbeam collects every 128th
        // pin); the pin inside crossbeam's destructor is #128: it moves the
        // epoch on, which expires the bag, and runs the deferred line.
        for _ in 2..128 {
            drop(crossbeam_epoch::pin());
        }
    })
    .join()
    .unwrap();
}

fn run_child(spec: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_child", "--nocapture", "--test-threads=1"])
        .env(CHILD, spec)
        .output()
        .unwrap()
        .status
}

#[test]
fn the_child() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
    }
}

#[test]
fn sleds_deferred_trace_line_aborts_a_plain_trace_filter_but_not_easels() {
    let plain = run_child("plain");
    assert_eq!(
        plain.signal(),
        Some(libc::SIGABRT),
        "the cause did not reproduce: {plain:?}"
    );
    let fixed = run_child("easel");
    assert!(fixed.success(), "easel's filter still aborts: {fixed:?}");
}
