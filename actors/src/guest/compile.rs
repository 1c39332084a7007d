//! Compiling components: cached in memory and on disk (the one `unsafe`
//! block, see the module doc of `guest`), checked against the worlds and
//! pre-instantiated.

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::component::Component;

use super::config::DEFAULT_COMPILED_CACHE_BYTES;
use super::engine::wasm_error;
use super::store::{Manifest, component_bytes, hash_from_hex};
use super::worlds::{CHANNEL_PACKAGE, EVALUATOR_PACKAGE, TOOL_PACKAGE, World, check_version};
use super::{AgentState, ChannelState, GuestHost, ToolState, bindings, eval, guest_host};
use crate::error::Error;
use crate::node::Inner;

/// Compiled components kept in memory.
const MAX_COMPILED: usize = 256;

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

impl GuestHost {
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
