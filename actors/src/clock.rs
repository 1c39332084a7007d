//! The wall clock the runtime reads, injectable for simulations.
//!
//! Lease records, dedup answers and message dates carry wall-clock
//! milliseconds ([`now_ms`]), compared across nodes. A node reads the system
//! clock; a simulation of many nodes in one process under tokio's paused
//! clock installs its own ([`set_wall_clock`]) so that leases lapse in
//! virtual time and a run replays from its seed. Monotonic deadlines in the
//! cluster code use `tokio::time::Instant`, which is the system's monotonic
//! clock except under a paused tokio runtime, where it is virtual.

use std::sync::OnceLock;

static WALL: OnceLock<fn() -> u64> = OnceLock::new();

/// Makes [`now_ms`] answer `f()` for the rest of the process (a simulation
/// harness calls this once, before opening runtimes). `false` if another
/// clock was installed first (the first one stays).
pub fn set_wall_clock(f: fn() -> u64) -> bool {
    WALL.set(f).is_ok() || WALL.get().is_some_and(|g| std::ptr::fn_addr_eq(*g, f))
}

/// Milliseconds since the Unix epoch: the system clock, or the one
/// installed with [`set_wall_clock`].
pub fn now_ms() -> u64 {
    if let Some(f) = WALL.get() {
        return f();
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
