//! The wasmtime engine of a node (fuel, epoch interruption, the pooling
//! allocator sized by the limits), the linkers of the worlds, and the
//! epoch ticker: making a [`GuestHost`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::config::{EPOCH_TICK, GuestConfig, GuestLimits};
use super::{AgentState, ChannelState, GuestHost, ToolState, bindings, eval};
use crate::error::Error;

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
pub(super) fn wasm_error(what: &str, e: wasmtime::Error) -> Error {
    Error::Invalid(format!("{what}: {e:#}"))
}

/// How a freed instance's linear memory is reset for the next (one per
/// message: a fresh instance).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reset {
    /// Linux's `PAGEMAP_SCAN` (6.7+) finds the pages the guest dirtied,
    /// and up to [`SCANNED_KEEP_RESIDENT`] of them are written back over
    /// with `memset`: no `madvise`, no page faults on the next instance.
    Scanned,
    /// The first 64 KiB with `memset`, the rest with `madvise` (each a
    /// page-table walk, a TLB shootdown across the node's threads and page
    /// faults on the next instance).
    Plain,
}

/// Dirty linear memory an instance may leave that is reset with `memset`
/// when `PAGEMAP_SCAN` finds it ([`Reset::Scanned`]).
const SCANNED_KEEP_RESIDENT: usize = 4 << 20;

fn pooling(limits: &GuestLimits, reset: Reset) -> PoolingAllocationConfig {
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
    if reset == Reset::Scanned {
        // Profiled under the cluster bench's guests row (a counter guest,
        // a fresh instance per message): wasmtime's handling of memory
        // slots was 8.2 % of the nodes' CPU without the scan (freeing 3.3 %:
        // `madvise`, TLB shootdowns, the image mapped again; allocating
        // 4.8 %: page faults, `mprotect`), 5.3 % with it.
        p.pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(SCANNED_KEEP_RESIDENT)
            .table_keep_resident(SCANNED_KEEP_RESIDENT / 16);
    }
    p
}

fn engine(limits: &GuestLimits, pooled: Option<Reset>) -> wasmtime::Result<Engine> {
    let mut c = Config::new();
    c.consume_fuel(true);
    c.epoch_interruption(true);
    c.wasm_component_model(true);
    c.parallel_compilation(true);
    if let Some(reset) = pooled {
        c.memory_reservation((limits.memory as u64 * 4).max(64 << 20));
        c.memory_guard_size(2 << 20);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(limits, reset)));
    }
    Engine::new(&c)
}
impl GuestHost {
    /// Must be called inside a tokio runtime (host calls block on it).
    pub fn new(cfg: GuestConfig) -> Result<GuestHost, Error> {
        let engine = match engine(&cfg.limits, Some(Reset::Scanned)) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!("no PAGEMAP_SCAN ({e:#}); guest memory reset with madvise");
                match engine(&cfg.limits, Some(Reset::Plain)) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(
                            "pooling allocator unavailable ({e:#}); allocating on demand"
                        );
                        engine(&cfg.limits, None).map_err(|e| wasm_error("wasmtime engine", e))?
                    }
                }
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
}
