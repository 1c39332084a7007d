//! A panic hook for guests on wasm32-unknown-unknown, where a panic is a
//! bare `unreachable` trap and `println!` prints nothing: it forwards the
//! panic message to the host's `log` import at error level, as
//! `panicked: MESSAGE (at FILE:LINE:COL)`, which the host records and puts
//! in the stop reason it mails to the guest's host.
//!
//! Call `panic_log::install(|m| host::log(LogLevel::Error, m))` at the top
//! of every export (it installs the hook once per instance).

use std::sync::Once;

/// Installs the hook (once); `log` is the world's log import at error level.
pub fn install(log: fn(&str)) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload_as_str().unwrap_or("(a panic without a message)");
            let line = match info.location() {
                Some(l) => format!("panicked: {msg} (at {}:{}:{})", l.file(), l.line(), l.column()),
                None => format!("panicked: {msg}"),
            };
            log(&line);
        }));
    });
}
