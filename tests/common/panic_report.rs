//! A panic hook for the test binaries that writes every panic's thread,
//! place and message straight to file descriptor 2 before the usual hook
//! runs. libtest captures a test thread's panic message and prints it only
//! when the test's result is reported; a panic that ends in an abort (one
//! inside a thread-local destructor, one while panicking) never gets there,
//! and the run then shows nothing but "SIGABRT". With this hook the cause
//! is on stderr whatever follows (issue 11).

use std::io::Write as _;
use std::sync::Once;

/// Installs the hook once per process; later calls do nothing.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            let place = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(not a string)".to_owned());
            let line = format!("[panic] thread '{name}' at {place}: {message}\n");
            // fd 2 itself, not `eprintln!`, which libtest redirects.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            previous(info);
        }));
    });
}
