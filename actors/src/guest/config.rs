//! The configuration of a node's guest host ([`GuestConfig`],
//! [`GuestLimits`]), the bounds of per-guest limits, and the limits of one
//! guest's calls ([`CallLimits`]).

use std::path::PathBuf;

use super::GuestHost;
use super::store::Body;

/// Bounds of the per-guest limits `mkguest --fuel N --deadline-ms N`.
pub const MIN_FUEL: u64 = 1_000_000;
pub const MAX_FUEL: u64 = 100_000_000_000;
pub const MIN_DEADLINE_MS: u32 = 10;
pub const MAX_DEADLINE_MS: u32 = 60_000;
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
