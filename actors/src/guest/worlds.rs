//! The worlds this node runs: their WIT packages and versions, [`World`],
//! and the check that a component was built against them.

use serde::{Deserialize, Serialize};

use crate::error::Error;

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
/// Refuses an interface name of our packages at another version, e.g.
/// `capstan:agent/host@0.2.0`.
pub(super) fn check_version(name: &str) -> Result<(), Error> {
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
