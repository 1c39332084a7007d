//! The host side of the worlds: store data of an instance, its limits, and
//! the imports a guest calls.
//!
//! - `limits`: what bounds one instance and one call: memory and tables
//!   ([`Limiter`]), fuel and the wall-clock deadline ([`Deadline`], [`arm`]),
//!   log lines, and the reason a guest was stopped.
//! - `agent`: the agent world: [`AgentState`], its imports (names, mail,
//!   model calls, search), journalled so a replay retraces its earlier run.
//! - `tool`: the tool world: [`ToolState`], its imports, and running a tool.

mod agent;
mod limits;
mod tool;

pub use agent::CapabilityRep;
pub(crate) use agent::{AgentState, Outcome, Replay, call_agent};
pub(crate) use limits::{Deadline, GuestStop, Limiter, arm, arm_with, guest_log, stop_reason};
pub(crate) use tool::{ToolState, run_tool};
