//! The virtual wall clock: Unix milliseconds that follow tokio's paused
//! clock, installed in `capstan_actors::clock` so that leases lapse in
//! virtual time and a run does not depend on when it ran.
//!
//! Each run sets its origin on its own thread ([`start_run`]); the runtime
//! of a run is a current-thread runtime, so every task of the run reads the
//! origin of its run (runs on other threads, as `cargo test` makes them,
//! have their own).

use std::cell::Cell;

/// The virtual date a run starts at (2023-11-14), whatever the real date.
pub const ORIGIN_MS: u64 = 1_700_000_000_000;

thread_local! {
    static ORIGIN: Cell<Option<tokio::time::Instant>> = const { Cell::new(None) };
}

fn virtual_ms() -> u64 {
    match ORIGIN.with(Cell::get) {
        Some(o) => ORIGIN_MS + o.elapsed().as_millis() as u64,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// Installs the virtual clock (once per process) and starts it for the
/// run on this thread, at [`ORIGIN_MS`]. Call inside the run's runtime.
pub fn start_run() {
    capstan_actors::clock::set_wall_clock(virtual_ms);
    ORIGIN.with(|c| c.set(Some(tokio::time::Instant::now())));
}

/// Stops the run's clock on this thread (back to the system clock).
pub fn end_run() {
    ORIGIN.with(|c| c.set(None));
}
