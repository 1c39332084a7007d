//! Guests as WebAssembly components: the wasmtime host.
//!
//! ```text
//! GuestHost (one per node: one Engine, pooling allocator)
//! ├── compiled components, by blake3 of their bytes (memory + disk cache)
//! ├── per component: InstancePre for its world (agent or tool)
//! └── per guest agent: a runner task, owned by the guest's AgentActor,
//!     that hands each new inbox message to a fresh instance (fresh Store)
//! ```
//!
//! - A component is stored once, content-addressed: `("gc", blake3)` holds
//!   its bytes (a chunked blob); installing it under a pet name makes a
//!   text value describing it and a manifest `("gm", value id)` recording
//!   its world and the capabilities granted at install time.
//! - A guest agent whose body is a component has `("gb", guest id)`; the
//!   grants become names in the guest's own directory: its only powers.
//!   `("gk", guest id)` is the next inbox number it has to handle, so after
//!   a restart it resumes where it stopped, and exactly once: its calls
//!   carry request ids derived from (guest, message number, call index).
//! - Capabilities are WIT resources in the instance's `ResourceTable`: a
//!   guest holds handles it cannot forge. No WASI is linked at all.
//! - Limits per call: fuel, a wall-clock deadline (epoch interruption),
//!   memory, table elements, capabilities held, message size. Breaking one
//!   stops that guest only; its host is mailed why, and the next message
//!   gets a fresh instance (a fresh `Store`).
//!
//! # The one `unsafe` block
//!
//! The workspace denies `unsafe_code`. [`GuestHost::load_cached`] allows it
//! for exactly one call, `Component::deserialize`, which is unsafe because
//! wasmtime runs the machine code it is given without verifying it: bytes
//! from anywhere else would be arbitrary code. We only ever deserialize
//! files this node wrote itself ([`GuestHost::save_cached`]) into its own
//! private home (`<home>/compiled`, mode 0700), named by the blake3 of the
//! component's bytes and the engine's compatibility hash (wasmtime version
//! and every code-generation setting), written to a temporary file and
//! renamed into place (a reader never sees a half-written file), and framed
//! with the blake3 of the compiled bytes, checked before deserializing (a
//! damaged file is a cache miss and is compiled again). wasmtime also checks
//! the version and configuration recorded in the file and refuses a
//! mismatch.
//!
//! # Modules
//!
//! - `worlds`: the WIT packages and versions this node runs, and [`World`].
//! - `config`: [`GuestConfig`] and [`GuestLimits`] of the node, and the
//!   limits of one guest's calls.
//! - `engine`: making the wasmtime engine and linkers of a [`GuestHost`].
//! - `compile`: compiling components, cached in memory and on disk.
//! - `store`: what the store holds of components and guests: bytes,
//!   manifests, bodies, and their keys.
//! - `install`: installing components, making guest agents of them,
//!   running tools, listing guests, starting channels.
//! - `host`: the host side of the worlds (store data, limits, imports);
//!   `bindings`: the code generated from `wit/`.
//! - `runner`, `progress`, `journal`, `resume`: running a guest agent
//!   through its inbox, exactly once, and resuming it.
//! - `channel`, `eval`, `http`: channel guests, evaluation, the `http`
//!   capability.

mod bindings;
mod channel;
mod compile;
mod config;
mod engine;
pub mod eval;
mod host;
pub mod http;
mod install;
mod progress;
mod resume;
mod runner;
mod store;
mod worlds;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capstan_proto::{FormulaId, RequestId};
use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::error::Error;
use crate::node::{Inner, Runtime};

pub(crate) use channel::ChannelState;
pub(crate) use compile::{Compiled, compiled, compiled_of};
pub(crate) use config::CallLimits;
pub use config::{
    DEFAULT_COMPILED_CACHE_BYTES, GuestConfig, GuestLimits, MAX_DEADLINE_MS, MAX_FUEL,
    MIN_DEADLINE_MS, MIN_FUEL,
};
pub use host::CapabilityRep;
pub(crate) use host::{AgentState, ToolState};
pub use install::{ComponentInfo, GuestInfo, MAX_COMPONENT_BYTES, MAX_GRANTS};
use store::manifest_of;
pub(crate) use store::{Body, Manifest, hash_from_hex, keys};
pub use worlds::{
    AGENT_PACKAGE, CHANNEL_PACKAGE, CHANNEL_VERSION, EVALUATOR_PACKAGE, TOOL_PACKAGE,
    WORLD_VERSION, World,
};

#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    pub state: &'static str,
    pub handled: u64,
    pub failures: u64,
    pub fuel_last: u64,
    pub memory_peak: u64,
    /// Nanoseconds to make the instance for the last message (fresh store,
    /// pre-instantiated component, pooling allocator).
    pub instantiate_ns_last: u64,
    /// Nanoseconds the handler of the last message ran (host calls included).
    pub call_ns_last: u64,
    pub last_error: String,
    /// Batches whose commit failed, their messages handled again.
    pub batches_redone: u64,
    /// Messages whose handler failed in a row (0: the last one did not);
    /// from two on, a failure episode: the host was told once, and the
    /// runner backs off between messages.
    pub streak: u32,
    /// The first message of the current run of failures.
    pub streak_since: u64,
}

/// The wasmtime host of one node.
pub struct GuestHost {
    pub(crate) engine: Engine,
    agent_linker: Linker<AgentState>,
    tool_linker: Linker<ToolState>,
    channel_linker: Linker<ChannelState>,
    evaluator_linker: Linker<eval::EvalState>,
    cfg: GuestConfig,
    compiled: Mutex<HashMap<[u8; 32], Arc<Compiled>>>,
    pub(crate) stats: Mutex<HashMap<FormulaId, Stats>>,
    pub(crate) locks: Mutex<HashMap<FormulaId, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    pub(crate) tokio: tokio::runtime::Handle,
    /// Hex of the engine's compatibility hash: part of every cache file name.
    compat: String,
    /// Set on drop: stops the epoch ticker thread.
    stop_ticker: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for GuestHost {
    fn drop(&mut self) {
        self.stop_ticker
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
impl std::fmt::Debug for GuestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHost").finish_non_exhaustive()
    }
}
impl GuestHost {
    pub fn limits(&self) -> &GuestLimits {
        &self.cfg.limits
    }
    pub(crate) fn stats_update(&self, id: FormulaId, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut m) = self.stats.lock() {
            let s = m.entry(id).or_insert_with(|| Stats {
                state: "idle",
                ..Stats::default()
            });
            f(s);
        }
    }

    pub(crate) fn lock_for(&self, id: FormulaId) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(id).or_default().clone()
    }
}

/// A request id derived from a guest's message and call index: the same
/// call made again after a crash applies once.
pub(crate) fn derived_request(guest: &FormulaId, number: u64, call: u32) -> RequestId {
    let mut h = blake3::Hasher::new_derive_key("capstan guest call v1");
    h.update(guest.as_bytes());
    h.update(&number.to_be_bytes());
    h.update(&call.to_be_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    RequestId(out)
}
fn guest_host(rt: &Inner) -> Result<Arc<GuestHost>, Error> {
    rt.guests
        .get()
        .cloned()
        .and_then(|g| g.as_any().downcast::<GuestHost>().ok())
        .ok_or_else(|| Error::Unavailable("this node runs no guest components".into()))
}

impl Runtime {
    /// Starts the wasmtime host: guest agents whose body is a component
    /// then run their handler on every message. Call once, inside tokio.
    pub fn enable_guests(&self, cfg: GuestConfig) -> Result<(), Error> {
        let gh = GuestHost::new(cfg)?;
        self.inner()
            .guests
            .set(Arc::new(gh))
            .map_err(|_| Error::Invalid("guests are already enabled".into()))
    }
}
