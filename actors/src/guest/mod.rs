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

mod bindings;
mod channel;
pub mod eval;
mod host;
pub mod http;
pub(crate) mod journal;
mod progress;
mod resume;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use capstan_cluster::tuple::TupleKey;
use capstan_proto::{FormulaId, RequestId};
use serde::{Deserialize, Serialize};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::model;
use crate::node::Inner;
use crate::records::FormulaKind;
use crate::types::ValueKind;

pub(crate) use channel::ChannelState;
pub use host::CapabilityRep;
pub(crate) use host::{AgentState, ToolState};
pub(crate) use progress::GuestRunner;
pub(crate) use resume::resume_loop;
pub(crate) use runner::runner_for;

/// The agent world this node runs.
pub const AGENT_PACKAGE: &str = "capstan:agent";
/// The tool world this node runs.
pub const TOOL_PACKAGE: &str = "capstan:tool";
/// The channel world this node runs.
pub const CHANNEL_PACKAGE: &str = "capstan:channel";
/// The evaluator world this node runs (a JavaScript engine as a guest).
pub const EVALUATOR_PACKAGE: &str = "capstan:evaluator";
/// The version of the agent and tool packages.
pub const WORLD_VERSION: &str = "0.1.0";
/// The version of the channel package (0.2.0 added `http-request`).
pub const CHANNEL_VERSION: &str = "0.2.0";
/// Bounds of the per-guest limits `mkguest --fuel N --deadline-ms N`.
pub const MIN_FUEL: u64 = 1_000_000;
pub const MAX_FUEL: u64 = 100_000_000_000;
pub const MIN_DEADLINE_MS: u32 = 10;
pub const MAX_DEADLINE_MS: u32 = 60_000;
/// Largest component accepted.
pub const MAX_COMPONENT_BYTES: usize = capstan_cluster::blob::MAX_BLOB_SIZE;
/// Most capabilities granted at install time.
pub const MAX_GRANTS: usize = 64;
/// Compiled components kept in memory.
const MAX_COMPILED: usize = 256;
/// How often the engine's epoch advances (the granularity of [`GuestLimits::wall`]).
pub(crate) const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Limits applied to every guest call.
#[derive(Debug, Clone)]
pub struct GuestLimits {
    /// Fuel for one message (roughly: wasm instructions).
    pub fuel: u64,
    /// Largest linear memory, bytes.
    pub memory: usize,
    /// Most table elements.
    pub table_elements: usize,
    /// Most capability handles held at once.
    pub capabilities: usize,
    /// Largest message text a guest may send, bytes.
    pub message: usize,
    /// Most guest calls running at once on this node.
    pub concurrent: usize,
    /// Wall-clock time one message may take (epoch interruption). Time
    /// spent waiting in a host call for the outside (a model call, an HTTP
    /// request; each bounded by its own timeout) does not count.
    pub wall: std::time::Duration,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            fuel: 200_000_000,
            memory: 16 << 20,
            table_elements: 10_000,
            capabilities: 256,
            message: crate::types::MAX_MESSAGE_TEXT,
            concurrent: 16,
            wall: std::time::Duration::from_secs(10),
        }
    }
}

/// Where compiled components are cached, and the limits.
#[derive(Debug, Clone, Default)]
pub struct GuestConfig {
    /// Directory for compiled components (`BLAKE3.cwasm`); none: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of compiled components kept in `cache_dir` (none:
    /// [`DEFAULT_COMPILED_CACHE_BYTES`]); past it the least recently used
    /// are deleted (compiled again when next needed).
    pub cache_bytes: Option<u64>,
    pub limits: GuestLimits,
}

/// Bytes of compiled components a node keeps on disk unless told otherwise
/// (`capstan start --compiled-cache-bytes`): 1 GiB.
pub const DEFAULT_COMPILED_CACHE_BYTES: u64 = 1 << 30;

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    Agent,
    Tool,
    Channel,
    Evaluator,
}

impl World {
    /// "a tool", "an evaluator", … (for messages).
    pub fn noun(self) -> &'static str {
        match self {
            World::Agent => "an agent",
            World::Tool => "a tool",
            World::Channel => "a channel",
            World::Evaluator => "an evaluator",
        }
    }

    pub fn describe(self) -> String {
        match self {
            World::Agent => format!("{AGENT_PACKAGE}/agent@{WORLD_VERSION}"),
            World::Tool => format!("{TOOL_PACKAGE}/sandboxed-tool@{WORLD_VERSION}"),
            World::Channel => format!("{CHANNEL_PACKAGE}/sandboxed-channel@{CHANNEL_VERSION}"),
            World::Evaluator => {
                format!("{EVALUATOR_PACKAGE}/sandboxed-evaluator@{WORLD_VERSION}")
            }
        }
    }
}

/// What `install` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentInfo {
    /// The value naming the installed component.
    pub id: FormulaId,
    /// blake3 of its bytes, hex.
    pub hash: String,
    pub world: String,
    pub size: u64,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Granted capabilities: slot names.
    pub grants: Vec<String>,
}

/// One guest agent whose body is a component, as `capstan guests` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub name: String,
    pub id: FormulaId,
    /// blake3 of the component, hex.
    pub component: String,
    /// idle, running, stopped (its last message broke a limit), passive
    pub state: String,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub hash: String,
    pub world: World,
    pub size: u64,
    /// slot → formula id (hex)
    pub grants: BTreeMap<String, String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Body {
    /// The guest's id, hex.
    pub id: String,
    pub hash: String,
    /// Its world (agent or channel); older records: agent.
    #[serde(default = "agent_world")]
    pub world: World,
    /// Fuel per call, if not the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Wall-clock deadline per call, ms, if not the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u32>,
    /// The ids (hex) of the capabilities it was granted when made: it is
    /// cancelled with any of them (see `crate::cancel`). Older records:
    /// none (then the component's install grants count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted: Vec<String>,
}

fn agent_world() -> World {
    World::Agent
}

/// The limits of one guest's calls: the node's, or its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    pub fuel: u64,
    pub wall: std::time::Duration,
}

impl CallLimits {
    pub fn of(gh: &GuestHost, body: &Body) -> CallLimits {
        CallLimits {
            fuel: body.fuel.unwrap_or(gh.limits().fuel),
            wall: body
                .deadline_ms
                .map(|ms| std::time::Duration::from_millis(ms.into()))
                .unwrap_or(gh.limits().wall),
        }
    }
    pub fn node(gh: &GuestHost) -> CallLimits {
        CallLimits {
            fuel: gh.limits().fuel,
            wall: gh.limits().wall,
        }
    }
}

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

pub(crate) mod keys {
    use super::*;
    pub fn component(hash: &[u8; 32]) -> Vec<u8> {
        TupleKey::new().str("gc").bytes(hash).into_vec()
    }
    pub fn manifest(value: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gm").bytes(value.as_bytes()).into_vec()
    }
    pub fn body(guest: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gb").bytes(guest.as_bytes()).into_vec()
    }
    pub fn manifest_all() -> Vec<u8> {
        TupleKey::new().str("gm").into_vec()
    }
    pub fn bodies() -> Vec<u8> {
        TupleKey::new().str("gb").into_vec()
    }
    pub fn next(guest: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gk").bytes(guest.as_bytes()).into_vec()
    }
}

/// A compiled component with its pre-instantiated world.
pub(crate) struct Compiled {
    pub world: World,
    pub agent: Option<bindings::agent::LlmAgentPre<AgentState>>,
    pub tool: Option<bindings::tool::SandboxedToolPre<ToolState>>,
    pub channel: Option<bindings::channel::SandboxedChannelPre<ChannelState>>,
    pub evaluator: Option<bindings::evaluator::SandboxedEvaluatorPre<eval::EvalState>>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
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

/// A [`std::hash::Hasher`] over blake3, to turn wasmtime's
/// `precompile_compatibility_hash` into a stable file-name component.
struct Blake3Hasher(blake3::Hasher);

impl std::hash::Hasher for Blake3Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        let h = self.0.finalize();
        u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
    }
}

fn compat_hash(engine: &Engine) -> String {
    use std::hash::Hash;
    let mut h = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize().as_bytes()[..16])
}

impl std::fmt::Debug for GuestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHost").finish_non_exhaustive()
    }
}

fn wasm_error(what: &str, e: wasmtime::Error) -> Error {
    Error::Invalid(format!("{what}: {e:#}"))
}

fn pooling(limits: &GuestLimits) -> PoolingAllocationConfig {
    let n = (limits.concurrent as u32).max(1) * 2 + 8;
    let mut p = PoolingAllocationConfig::default();
    p.total_component_instances(n)
        .total_core_instances(n * 4)
        .total_memories(n)
        .total_tables(n * 4)
        .max_memories_per_component(2)
        .max_tables_per_component(8)
        .max_core_instances_per_component(8)
        .table_elements(limits.table_elements)
        .max_memory_size(limits.memory * 2)
        // A slot's first pages are reset with memset rather than madvise
        // when it is reused: one syscall less per instance for the small
        // memories and tables guests touch (per message, a fresh instance).
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10);
    p
}

fn engine(limits: &GuestLimits, pooled: bool) -> wasmtime::Result<Engine> {
    let mut c = Config::new();
    c.consume_fuel(true);
    c.epoch_interruption(true);
    c.wasm_component_model(true);
    c.parallel_compilation(true);
    if pooled {
        c.memory_reservation((limits.memory as u64 * 4).max(64 << 20));
        c.memory_guard_size(2 << 20);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(limits)));
    }
    Engine::new(&c)
}

impl GuestHost {
    /// Must be called inside a tokio runtime (host calls block on it).
    pub fn new(cfg: GuestConfig) -> Result<GuestHost, Error> {
        let engine = match engine(&cfg.limits, true) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("pooling allocator unavailable ({e:#}); allocating on demand");
                engine(&cfg.limits, false).map_err(|e| wasm_error("wasmtime engine", e))?
            }
        };
        let mut agent_linker = Linker::new(&engine);
        bindings::agent::LlmAgent::add_to_linker::<
            AgentState,
            wasmtime::component::HasSelf<AgentState>,
        >(&mut agent_linker, |s| s)
        .map_err(|e| wasm_error("agent world", e))?;
        let mut tool_linker = Linker::new(&engine);
        bindings::tool::SandboxedTool::add_to_linker::<
            ToolState,
            wasmtime::component::HasSelf<ToolState>,
        >(&mut tool_linker, |s| s)
        .map_err(|e| wasm_error("tool world", e))?;
        let mut channel_linker = Linker::new(&engine);
        bindings::channel::SandboxedChannel::add_to_linker::<
            ChannelState,
            wasmtime::component::HasSelf<ChannelState>,
        >(&mut channel_linker, |s| s)
        .map_err(|e| wasm_error("channel world", e))?;
        let mut evaluator_linker = Linker::new(&engine);
        bindings::evaluator::SandboxedEvaluator::add_to_linker::<
            eval::EvalState,
            wasmtime::component::HasSelf<eval::EvalState>,
        >(&mut evaluator_linker, |s| s)
        .map_err(|e| wasm_error("evaluator world", e))?;
        if let Some(d) = &cfg.cache_dir {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", d.display())))?;
        }
        let compat = compat_hash(&engine);
        let stop_ticker = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (engine, stop) = (engine.clone(), stop_ticker.clone());
            std::thread::Builder::new()
                .name("capstan-epoch".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error::Unavailable(format!("cannot start the epoch ticker: {e}")))?;
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.limits.concurrent.max(1)));
        let tokio = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Unavailable("the guest host needs a tokio runtime".into()))?;
        Ok(GuestHost {
            engine,
            agent_linker,
            tool_linker,
            channel_linker,
            evaluator_linker,
            cfg,
            compiled: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            slots,
            tokio,
            compat,
            stop_ticker,
        })
    }

    pub fn limits(&self) -> &GuestLimits {
        &self.cfg.limits
    }

    /// Compiles (or loads from the caches) the component of `bytes`.
    /// Blocking: call from a blocking thread.
    pub(crate) fn compile(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<Arc<Compiled>, Error> {
        if let Some(c) = self.compiled.lock().ok().and_then(|m| m.get(hash).cloned()) {
            return Ok(c);
        }
        let component = match self.load_cached(hash) {
            Some(c) => {
                // used now: the last to be evicted
                if let Some(p) = self.cache_path(hash)
                    && let Ok(f) = std::fs::File::options().append(true).open(&p)
                {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                c
            }
            None => {
                let c = Component::new(&self.engine, bytes).map_err(|e| {
                    Error::Invalid(format!("not a valid WebAssembly component: {e:#}"))
                })?;
                self.save_cached(hash, &c);
                self.evict_cached(hash);
                c
            }
        };
        let compiled = Arc::new(self.prepare(&component)?);
        if let Ok(mut m) = self.compiled.lock() {
            if m.len() >= MAX_COMPILED {
                m.clear();
            }
            m.insert(*hash, compiled.clone());
        }
        Ok(compiled)
    }

    fn cache_path(&self, hash: &[u8; 32]) -> Option<PathBuf> {
        self.cfg
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{}.cwasm", hex::encode(hash), self.compat)))
    }

    /// A compiled component from the disk cache. The file holds the blake3
    /// of the serialized bytes followed by them; a mismatch is a cache miss.
    fn load_cached(&self, hash: &[u8; 32]) -> Option<Component> {
        let path = self.cache_path(hash)?;
        let data = std::fs::read(&path).ok()?;
        if data.len() < 32 || blake3::hash(&data[32..]).as_bytes()[..] != data[..32] {
            tracing::warn!(path = %path.display(), "ignoring a damaged compile cache entry");
            return None;
        }
        // SAFETY: `deserialize` runs the machine code in its input unverified,
        // so the input must be a compile made by a compatible wasmtime engine.
        // This file is one this node wrote itself (`save_cached`, temp file +
        // rename) into its private home cache (mode 0700), named by the blake3
        // of the component's bytes and this engine's compatibility hash, and
        // the blake3 framing of its content matched just above. wasmtime also
        // checks the version and configuration recorded in the file.
        #[allow(unsafe_code)]
        let c = unsafe { Component::deserialize(&self.engine, &data[32..]) };
        match c {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "compile cache entry refused: {e:#}");
                None
            }
        }
    }

    /// Deletes the least recently used compiled components (by file time,
    /// refreshed on each use) until the cache holds at most its budget;
    /// never the one of `keep`, just written.
    fn evict_cached(&self, keep: &[u8; 32]) {
        let (Some(dir), Some(keep)) = (self.cfg.cache_dir.as_ref(), self.cache_path(keep)) else {
            return;
        };
        let budget = self.cfg.cache_bytes.unwrap_or(DEFAULT_COMPILED_CACHE_BYTES);
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
            .filter_map(|e| {
                let e = e.ok()?;
                let p = e.path();
                if p.extension().is_none_or(|x| x != "cwasm") {
                    return None;
                }
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), p))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, p) in files {
            if total <= budget {
                break;
            }
            if p == keep {
                continue;
            }
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    total = total.saturating_sub(len);
                    tracing::info!(path = %p.display(), bytes = len, "evicted a compiled component (least recently used)");
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), "cannot evict a compiled component: {e}")
                }
            }
        }
    }

    fn save_cached(&self, hash: &[u8; 32], c: &Component) {
        let Some(path) = self.cache_path(hash) else {
            return;
        };
        let Ok(bytes) = c.serialize() else { return };
        let mut data = Vec::with_capacity(bytes.len() + 32);
        data.extend_from_slice(blake3::hash(&bytes).as_bytes());
        data.extend_from_slice(&bytes);
        // A temporary name of our own, then an atomic rename: a reader (this
        // node after a crash, or a concurrent compile) never sees half a file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}.{seq}.tmp", std::process::id()));
        let written = (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), "could not write the compile cache: {e}");
        }
    }

    /// Checks the component's world and pre-instantiates it.
    fn prepare(&self, c: &Component) -> Result<Compiled, Error> {
        let ty = c.component_type();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        for name in imports.iter().chain(exports.iter()) {
            check_version(name)?;
        }
        let is_tool = exports
            .iter()
            .any(|e| e.starts_with(&format!("{TOOL_PACKAGE}/tool@")));
        let is_agent = exports.iter().any(|e| e == "on-message");
        let is_channel = exports
            .iter()
            .any(|e| e.starts_with(&format!("{CHANNEL_PACKAGE}/channel@")));
        let is_evaluator = exports
            .iter()
            .any(|e| e.starts_with(&format!("{EVALUATOR_PACKAGE}/evaluator@")));
        if is_evaluator {
            let pre = self
                .evaluator_linker
                .instantiate_pre(c)
                .map_err(|e| wasm_error("the component does not fit the evaluator world", e))?;
            let pre = bindings::evaluator::SandboxedEvaluatorPre::new(pre)
                .map_err(|e| wasm_error("the component does not fit the evaluator world", e))?;
            Ok(Compiled {
                world: World::Evaluator,
                agent: None,
                tool: None,
                channel: None,
                evaluator: Some(pre),
                imports,
                exports,
            })
        } else if is_channel {
            let pre = self
                .channel_linker
                .instantiate_pre(c)
                .map_err(|e| wasm_error("the component does not fit the channel world", e))?;
            let pre = bindings::channel::SandboxedChannelPre::new(pre)
                .map_err(|e| wasm_error("the component does not fit the channel world", e))?;
            Ok(Compiled {
                world: World::Channel,
                agent: None,
                tool: None,
                channel: Some(pre),
                evaluator: None,
                imports,
                exports,
            })
        } else if is_tool {
            let pre = self
                .tool_linker
                .instantiate_pre(c)
                .map_err(|e| wasm_error("the component does not fit the tool world", e))?;
            let pre = bindings::tool::SandboxedToolPre::new(pre)
                .map_err(|e| wasm_error("the component does not fit the tool world", e))?;
            Ok(Compiled {
                world: World::Tool,
                agent: None,
                tool: Some(pre),
                channel: None,
                evaluator: None,
                imports,
                exports,
            })
        } else if is_agent {
            let pre = self
                .agent_linker
                .instantiate_pre(c)
                .map_err(|e| wasm_error("the component does not fit the agent world", e))?;
            let pre = bindings::agent::LlmAgentPre::new(pre)
                .map_err(|e| wasm_error("the component does not fit the agent world", e))?;
            Ok(Compiled {
                world: World::Agent,
                agent: Some(pre),
                tool: None,
                channel: None,
                evaluator: None,
                imports,
                exports,
            })
        } else {
            Err(Error::Invalid(format!(
                "the component implements none of {}, {}, {} and {}: it exports {}",
                World::Agent.describe(),
                World::Tool.describe(),
                World::Channel.describe(),
                World::Evaluator.describe(),
                if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports.join(", ")
                }
            )))
        }
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

/// Refuses an interface name of our packages at another version, e.g.
/// `capstan:agent/host@0.2.0`.
fn check_version(name: &str) -> Result<(), Error> {
    for (pkg, want) in [
        (AGENT_PACKAGE, WORLD_VERSION),
        (TOOL_PACKAGE, WORLD_VERSION),
        (CHANNEL_PACKAGE, CHANNEL_VERSION),
        (EVALUATOR_PACKAGE, WORLD_VERSION),
    ] {
        if let Some(rest) = name.strip_prefix(pkg).and_then(|r| r.strip_prefix('/'))
            && let Some((_, version)) = rest.split_once('@')
            && version != want
        {
            return Err(Error::Invalid(format!(
                "the component was built against {pkg}@{version}, but this node runs {pkg}@{want}; rebuild it against wit/ of this release"
            )));
        }
    }
    Ok(())
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

pub(crate) fn parse_hash(s: &str) -> Result<[u8; 32], Error> {
    let v = hex::decode(s).map_err(|e| Error::Corrupt(format!("component hash: {e}")))?;
    v.try_into()
        .map_err(|_| Error::Corrupt("component hash is not 32 bytes".into()))
}

pub(crate) async fn component_bytes(rt: &Inner, hash: [u8; 32]) -> Result<Vec<u8>, Error> {
    rt.db
        .read(move |tx| {
            Box::pin(async move {
                capstan_cluster::blob::get_blob(tx, &keys::component(&hash))
                    .await?
                    .ok_or_else(|| Error::Corrupt("an installed component has no bytes".into()))
            })
        })
        .await
}

/// Compiles the component `hash` (from the store if needed) on a blocking thread.
pub(crate) async fn compiled(
    gh: &Arc<GuestHost>,
    rt: &Inner,
    hash: [u8; 32],
) -> Result<Arc<Compiled>, Error> {
    if let Some(c) = gh.compiled.lock().ok().and_then(|m| m.get(&hash).cloned()) {
        return Ok(c);
    }
    let bytes = component_bytes(rt, hash).await?;
    let gh2 = gh.clone();
    tokio::task::spawn_blocking(move || gh2.compile(&hash, &bytes))
        .await
        .map_err(|e| Error::Unavailable(format!("compiler task failed: {e}")))?
}

/// The compiled component of manifest `m`, which must be of `world`
/// (`name` says what was named, for the error).
pub(crate) async fn compiled_of(
    rt: &Inner,
    m: &Manifest,
    world: World,
    name: &str,
) -> Result<(Arc<GuestHost>, Arc<Compiled>), Error> {
    if m.world != world {
        return Err(Error::Invalid(format!(
            "{name} is a {} component, not {} ({})",
            m.world.describe(),
            world.noun(),
            world.describe()
        )));
    }
    let gh = guest_host(rt)?;
    let c = compiled(&gh, rt, hash_from_hex(&m.hash)?).await?;
    Ok((gh, c))
}

fn guest_host(rt: &Inner) -> Result<Arc<GuestHost>, Error> {
    rt.guests
        .get()
        .cloned()
        .ok_or_else(|| Error::Unavailable("this node runs no guest components".into()))
}

/// The manifest of the installed component named `path` in `agent`'s names.
async fn manifest_of(agent: &AgentHandle, path: &str) -> Result<(FormulaId, Manifest), Error> {
    let e = agent.show(path).await?;
    let id = e.id;
    let m = agent
        .inner()
        .db
        .read(move |tx| {
            Box::pin(async move {
                match tx.get(&keys::manifest(&id)).await? {
                    Some(b) => Ok(Some(b)),
                    None => Ok::<_, Error>(None),
                }
            })
        })
        .await?;
    let m = m.ok_or_else(|| {
        Error::Invalid(format!(
            "{path:?} is not an installed component; see `capstan install`"
        ))
    })?;
    let m: Manifest =
        serde_json::from_slice(&m).map_err(|e| Error::Corrupt(format!("manifest: {e}")))?;
    Ok((id, m))
}

impl AgentHandle {
    /// Installs a component under `name`: validates it (a component of the
    /// agent or tool world at this node's version), stores its bytes
    /// content-addressed, and records the capabilities granted to it
    /// (`slot` → a path in this host's names). Bad input changes nothing.
    pub async fn install(
        &self,
        req: RequestId,
        name: &str,
        bytes: Vec<u8>,
        grants: Vec<(String, String)>,
    ) -> Result<ComponentInfo, Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can install components".into()));
        }
        crate::names::Path::parse_writable(name)?;
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(Error::TooLarge {
                what: "component".into(),
                len: bytes.len(),
                max: MAX_COMPONENT_BYTES,
            });
        }
        if grants.len() > MAX_GRANTS {
            return Err(Error::TooLarge {
                what: "grants".into(),
                len: grants.len(),
                max: MAX_GRANTS,
            });
        }
        let gh = guest_host(self.inner())?;
        let mut granted = BTreeMap::new();
        for (slot, path) in &grants {
            if !crate::names::is_pet_name(slot) {
                return Err(Error::InvalidName(slot.clone()));
            }
            let e = self.show(path).await?;
            if granted.insert(slot.clone(), e.id.to_hex()).is_some() {
                return Err(Error::Invalid(format!("slot {slot:?} is granted twice")));
            }
        }
        let hash = *blake3::hash(&bytes).as_bytes();
        let bytes = Arc::new(bytes);
        let c = {
            let (gh, bytes) = (gh.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || gh.compile(&hash, &bytes))
                .await
                .map_err(|e| Error::Unavailable(format!("compiler task failed: {e}")))??
        };
        let manifest = Manifest {
            hash: hex::encode(hash),
            world: c.world,
            size: bytes.len() as u64,
            grants: granted,
            imports: c.imports.clone(),
            exports: c.exports.clone(),
        };
        // The bytes, content-addressed (idempotent; shared by every install),
        // in steps: a component can be larger than one transaction of the
        // store (etcd's 1.5 MiB).
        capstan_cluster::blob::set_content_blob(&self.inner().db, &keys::component(&hash), &bytes)
            .await?;
        let text = format!(
            "component {} ({} bytes), world {}",
            manifest.hash,
            manifest.size,
            c.world.describe()
        );
        let id = self
            .store(req, name, ValueKind::Text, text.into_bytes())
            .await?;
        let m = serde_json::to_vec(&manifest).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.inner()
            .db
            .transact(move |tx| {
                let m = m.clone();
                Box::pin(async move {
                    tx.set(&keys::manifest(&id), &m)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        tracing::info!(name, hash = %manifest.hash, world = ?c.world, "installed a component");
        Ok(ComponentInfo {
            id,
            hash: manifest.hash,
            world: c.world.describe(),
            size: manifest.size,
            imports: manifest.imports,
            exports: manifest.exports,
            grants: manifest.grants.into_keys().collect(),
        })
    }

    /// Makes a guest agent under `path` whose body is the installed agent
    /// component `component`; the component's grants become its names.
    pub async fn mkguest_component(
        &self,
        req: RequestId,
        path: &str,
        component: &str,
        fuel: Option<u64>,
        deadline_ms: Option<u32>,
        with: &[(String, String)],
    ) -> Result<FormulaId, Error> {
        if let Some(f) = fuel
            && !(MIN_FUEL..=MAX_FUEL).contains(&f)
        {
            return Err(Error::Invalid(format!(
                "--fuel {f} is out of bounds: between {MIN_FUEL} and {MAX_FUEL}"
            )));
        }
        if let Some(d) = deadline_ms
            && !(MIN_DEADLINE_MS..=MAX_DEADLINE_MS).contains(&d)
        {
            return Err(Error::Invalid(format!(
                "--deadline-ms {d} is out of bounds: between {MIN_DEADLINE_MS} and {MAX_DEADLINE_MS}"
            )));
        }
        let (_, m) = manifest_of(self, component).await?;
        if matches!(m.world, World::Tool | World::Evaluator) {
            return Err(Error::Invalid(format!(
                "{component:?} is a {} component; a guest agent needs {} (or {})",
                m.world.describe(),
                World::Agent.describe(),
                World::Channel.describe()
            )));
        }
        if with.len() > MAX_GRANTS {
            return Err(Error::TooLarge {
                what: "--with capabilities".into(),
                len: with.len(),
                max: MAX_GRANTS,
            });
        }
        // Checked before anything is made: bad input changes nothing.
        let mut extra: Vec<(String, FormulaId)> = Vec::new();
        for (slot, target) in with {
            if !crate::names::is_pet_name(slot) {
                return Err(Error::InvalidName(slot.clone()));
            }
            if m.grants.contains_key(slot) || extra.iter().any(|(s, _)| s == slot) {
                return Err(Error::Invalid(format!(
                    "slot {slot:?} is given twice (the component's grants are {})",
                    if m.grants.is_empty() {
                        "none".to_string()
                    } else {
                        m.grants.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                )));
            }
            extra.push((slot.clone(), self.show(target).await?.id));
        }
        let id = self.mkguest(req, path).await?;
        let grants: Vec<(String, FormulaId)> = m
            .grants
            .iter()
            .map(|(s, h)| {
                Ok((
                    s.clone(),
                    h.parse::<FormulaId>()
                        .map_err(|e| Error::Corrupt(format!("grant {s}: {e}")))?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        let grants: Vec<(String, FormulaId)> = grants.into_iter().chain(extra).collect();
        let body = serde_json::to_vec(&Body {
            id: id.to_hex(),
            hash: m.hash.clone(),
            world: m.world,
            fuel,
            deadline_ms,
            granted: grants.iter().map(|(_, g)| g.to_hex()).collect(),
        })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        self.inner()
            .db
            .transact(move |tx| {
                let (body, grants) = (body.clone(), grants.clone());
                Box::pin(async move {
                    let f = model::must_formula(tx, &id).await?;
                    let FormulaKind::Guest(rec) = f.kind else {
                        return Err(Error::Corrupt("mkguest made no guest".into()));
                    };
                    for (slot, target) in &grants {
                        model::set_name(tx, &rec.pet_store, slot, target).await?;
                    }
                    tx.set(&keys::body(&id), &body)?;
                    Ok(())
                })
            })
            .await?;
        if m.world == World::Channel && self.inner().cluster.get().is_none() {
            // A channel runs as long as it exists: incarnate it now.
            crate::incarnation::agent_actor(self.inner(), id).await?;
        }
        Ok(id)
    }

    /// Runs the installed tool `name` once: `execute` with `input` (JSON).
    pub async fn run_tool(&self, name: &str, input: &str) -> Result<String, Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can run tools".into()));
        }
        serde_json::from_str::<serde_json::Value>(input)
            .map_err(|e| Error::Invalid(format!("--input is not valid JSON: {e}")))?;
        if input.len() > crate::types::MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "tool input".into(),
                len: input.len(),
                max: crate::types::MAX_MESSAGE_TEXT,
            });
        }
        let (_, m) = manifest_of(self, name).await?;
        host::run_tool(self.clone(), m, input.to_string()).await
    }

    /// Every guest agent with a component body, with what the node knows of it.
    pub async fn guests(&self) -> Result<Vec<GuestInfo>, Error> {
        let gh = guest_host(self.inner())?;
        let ctx = self.ctx().clone();
        let rows = self
            .inner()
            .db
            .read(move |tx| {
                let ctx = ctx.clone();
                Box::pin(async move {
                    let begin = keys::bodies();
                    let end = capstan_cluster::tuple::prefix_end(&begin);
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin,
                            end,
                            limit: 10_000,
                            reverse: false,
                        })
                        .await?;
                    let mut found = Vec::new();
                    for (_, v) in rows {
                        let body: Body = serde_json::from_slice(&v)
                            .map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
                        let id: FormulaId = body
                            .id
                            .parse()
                            .map_err(|e| Error::Corrupt(format!("guest id: {e}")))?;
                        found.push((id, body.hash));
                    }
                    let ids: Vec<FormulaId> = found.iter().map(|(id, _)| *id).collect();
                    let names = model::names_for(tx, &ctx, &ids).await?;
                    Ok::<_, Error>(
                        found
                            .into_iter()
                            .zip(names)
                            .map(|((id, hash), name)| (id, name, hash))
                            .collect::<Vec<_>>(),
                    )
                })
            })
            .await?;
        let stats = gh.stats.lock().map(|m| m.clone()).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(id, name, component)| {
                let s = stats.get(&id).cloned().unwrap_or(Stats {
                    state: "passive",
                    ..Stats::default()
                });
                GuestInfo {
                    name,
                    id,
                    component,
                    state: s.state.to_string(),
                    handled: s.handled,
                    failures: s.failures,
                    fuel_last: s.fuel_last,
                    memory_peak: s.memory_peak,
                    instantiate_ns_last: s.instantiate_ns_last,
                    call_ns_last: s.call_ns_last,
                    last_error: s.last_error,
                }
            })
            .collect())
    }
}

pub(crate) use parse_hash as hash_from_hex;

impl crate::node::Runtime {
    /// Incarnates every channel guest (they poll the outside system as long
    /// as they exist). Call once at node start, after `enable_guests`.
    /// Outside a cluster only: in a cluster a channel runs where it is placed.
    pub async fn start_channels(&self) -> Result<usize, Error> {
        let inner = self.inner().clone();
        if inner.guests.get().is_none() || inner.cluster.get().is_some() {
            return Ok(0);
        }
        let ids = inner
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let begin = keys::bodies();
                    let end = capstan_cluster::tuple::prefix_end(&begin);
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin,
                            end,
                            limit: 10_000,
                            reverse: false,
                        })
                        .await?;
                    let mut out = Vec::new();
                    for (_, v) in rows {
                        let body: Body = serde_json::from_slice(&v)
                            .map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
                        if body.world == World::Channel {
                            out.push(
                                body.id
                                    .parse::<FormulaId>()
                                    .map_err(|e| Error::Corrupt(format!("guest id: {e}")))?,
                            );
                        }
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await?;
        for id in &ids {
            crate::incarnation::agent_actor(&inner, *id).await?;
        }
        Ok(ids.len())
    }
}
