//! The limits of one instance and one call: memory and table growth, fuel,
//! the wall-clock deadline (epoch interruption), log lines, and why a guest
//! was stopped.

use std::sync::Arc;

use wasmtime::{ResourceLimiter, Store, Trap};

use crate::guest::{CallLimits, GuestHost};

/// Most log lines a guest may write per call.
const MAX_LOGS: u32 = 1000;
/// Longest log line kept.
const MAX_LOG_LINE: usize = 1000;
/// Longest panic message kept for the stop reason.
const MAX_PANIC_TEXT: usize = 500;

/// Remembers a guest's panic message: its panic hook logs it at error level
/// as `panicked: …` just before the `unreachable` trap (wasm32-unknown-unknown
/// has no unwinding), so the stop reason can say what happened.
pub(crate) fn note_panic(slot: &mut Option<String>, level: u8, message: &str) {
    if level >= 4
        && slot.is_none()
        && let Some(m) = message.strip_prefix("panicked")
    {
        let m = m.trim_start_matches([':', ' ']);
        *slot = Some(m.chars().take(MAX_PANIC_TEXT).collect());
    }
}

/// Why the host stopped a guest, as a type: a host function or the limiter
/// returns it inside the `wasmtime::Error` it fails with, and
/// [`stop_reason`] finds it by type in the error's chain (not by matching
/// the text of the message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum GuestStop {
    /// A bound the guest ran into (memory, table, a message, value,
    /// request or query size, the journal, capability calls): the text
    /// says which and what to do.
    #[error("{0}")]
    Limit(String),
}

impl GuestStop {
    /// `GuestStop::Limit(text)` as the error a host function returns.
    pub(crate) fn limit(text: String) -> wasmtime::Error {
        wasmtime::Error::new(GuestStop::Limit(text))
    }
}

/// Memory and table limits of one instance; remembers the peak.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory: usize,
    table: usize,
    pub peak: usize,
}

impl Limiter {
    pub(crate) fn new(gh: &GuestHost) -> Limiter {
        Limiter {
            memory: gh.limits().memory,
            table: gh.limits().table_elements,
            peak: 0,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            return Err(GuestStop::limit(format!(
                "memory limit: tried to grow its memory to {} bytes; the limit is {} bytes",
                desired, self.memory
            )));
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table {
            return Err(GuestStop::limit(format!(
                "table limit: tried to grow a table to {desired} elements; the limit is {}",
                self.table
            )));
        }
        Ok(true)
    }
}

/// A guest's `log` import, in every world: counts the line, remembers a
/// panic message, and writes at most [`MAX_LOGS`] lines per call.
pub(crate) fn guest_log(
    logs: &mut u32,
    panic: &mut Option<String>,
    who: &str,
    level: u8,
    message: &str,
) {
    *logs += 1;
    note_panic(panic, level, message);
    if *logs <= MAX_LOGS {
        log_line(who, level, message);
    }
}

pub(crate) fn log_line(who: &str, level: u8, msg: &str) {
    let msg: String = msg.chars().take(MAX_LOG_LINE).collect();
    match level {
        0 => tracing::trace!(guest = who, "{msg}"),
        1 => tracing::debug!(guest = who, "{msg}"),
        2 => tracing::info!(guest = who, "{msg}"),
        3 => tracing::warn!(guest = who, "{msg}"),
        _ => tracing::error!(guest = who, "{msg}"),
    }
}

pub(crate) fn stop_reason(e: &wasmtime::Error, limits: CallLimits, panic: Option<&str>) -> String {
    if let (Some(p), Some(Trap::UnreachableCodeReached)) = (panic, e.downcast_ref::<Trap>()) {
        return format!("it panicked: {p}");
    }
    if let Some(t) = e.downcast_ref::<Trap>() {
        return match t {
            Trap::OutOfFuel => format!(
                "fuel limit: it used all of its {} units of fuel for one call (an endless loop?)",
                limits.fuel
            ),
            Trap::Interrupt => format!(
                "deadline: it ran past its deadline of {} ms of wall-clock time for one call",
                limits.wall.as_millis()
            ),
            other => format!("it trapped: {other}"),
        };
    }
    // the root cause first: a stop the host raised, found by its type
    if let Some(GuestStop::Limit(text)) = e.chain().find_map(|c| c.downcast_ref::<GuestStop>()) {
        return text.clone();
    }
    if let Some(t) = e
        .chain()
        .find_map(|c| c.downcast_ref::<wasmtime::component::ResourceTableError>())
    {
        return format!("capability handle: it used a handle it does not hold ({t})");
    }
    // A handle the guest forged is refused inside wasmtime's lifting of the
    // call's arguments, with an error of no public type ("unknown handle
    // index N"): the one stop still told apart by its text.
    if let Some(c) = e
        .chain()
        .map(|c| c.to_string())
        .find(|c| c.contains("handle index"))
    {
        return format!("capability handle: it used a handle it does not hold ({c})");
    }
    format!("{e:#}")
}

/// The wall-clock deadline of one guest call. It bounds the guest's own
/// running time: time spent in a host call that waits for the outside (a
/// model call, an HTTP request; each bounded by its own timeout) pushes it
/// back by as long.
#[derive(Debug)]
pub(crate) struct Deadline(std::sync::Mutex<std::time::Instant>);

impl Deadline {
    pub(crate) fn new() -> Arc<Deadline> {
        Arc::new(Deadline(std::sync::Mutex::new(std::time::Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::time::Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call starts: the deadline is `wall` from now.
    fn start(&self, wall: std::time::Duration) {
        *self.lock() = std::time::Instant::now() + wall;
    }

    fn passed(&self) -> bool {
        std::time::Instant::now() >= *self.lock()
    }

    /// Runs `f` (a host call waiting for the outside) without counting its
    /// time against the deadline.
    pub(crate) fn excluding<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = std::time::Instant::now();
        let r = f();
        *self.lock() += t.elapsed();
        r
    }
}

/// Sets the fuel and the wall-clock deadline of a store for one call.
pub(crate) fn arm<T>(
    store: &mut Store<T>,
    limits: CallLimits,
    deadline: &Arc<Deadline>,
) -> wasmtime::Result<()> {
    arm_with(store, limits, deadline, || Ok(()))
}

/// [`arm`], with `tick` run at every epoch tick the guest runs through.
pub(crate) fn arm_with<T>(
    store: &mut Store<T>,
    limits: CallLimits,
    deadline: &Arc<Deadline>,
    mut tick: impl FnMut() -> wasmtime::Result<()> + Send + Sync + 'static,
) -> wasmtime::Result<()> {
    store.set_fuel(limits.fuel)?;
    deadline.start(limits.wall);
    let d = deadline.clone();
    store.epoch_deadline_callback(move |_| {
        if d.passed() {
            return Err(Trap::Interrupt.into());
        }
        tick()?;
        Ok(wasmtime::UpdateDeadline::Continue(1))
    });
    store.set_epoch_deadline(1);
    Ok(())
}
