//! The command groups with subcommands of their own: `cluster …`, `llm …`,
//! `routine …`.

use super::*;

/// `capstan cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a new cluster in a replicated store (once): its key lives there.
    Init {
        /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX]
        #[arg(long, value_name = "SPEC")]
        store: String,
        /// Where the cluster's secrets key is written (or read, if the file
        /// exists); default <home>/identity/secrets.key. Give it to every
        /// node: `capstan start --store SPEC --secrets-key FILE`.
        #[arg(long, value_name = "FILE")]
        secrets_key: Option<std::path::PathBuf>,
        #[command(flatten)]
        out: Out,
    },
    /// This node's lease and epoch, every member, placements, store health.
    Status {
        #[command(flatten)]
        out: Out,
    },
    /// The nodes of the cluster: address, state, lease age, placements.
    Members {
        #[command(flatten)]
        out: Out,
    },
    /// Which node owns (runs) the agent NAME now.
    Placement {
        /// A pet-name path.
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// The cluster's settings: how formulas nobody holds are placed.
    ///
    /// `local` (the default): on the node that first needs one. `spread`:
    /// on the live node that rendezvous hashing picks for it, and moved
    /// there, a few at a time, when nodes join. Every node follows a
    /// change within about a second.
    Policy {
        /// Set the placement policy: local | spread (without it: show it).
        #[arg(long, value_name = "POLICY", value_parser = ["local", "spread"])]
        placement: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Move the incarnations of node NODE to other nodes; then it can stop.
    Drain {
        /// A node name (see `capstan cluster members`).
        node: String,
        #[command(flatten)]
        out: Out,
    },
    /// This node leaves the cluster: gives its work away, then stops.
    Leave {
        #[command(flatten)]
        out: Out,
    },
    /// The spans every node recorded of the traced operation ID (what
    /// `capstan send --trace` printed as its trace id), by start.
    Trace {
        /// A trace id: up to 16 hex digits.
        id: String,
        /// Also write them as a Chrome trace (open it in Perfetto, or in
        /// chrome://tracing): one row per node.
        #[arg(long, value_name = "FILE")]
        chrome: Option<std::path::PathBuf>,
        #[command(flatten)]
        out: Out,
    },
}

/// `capstan llm …`.
#[derive(Debug, Subcommand)]
pub enum LlmCommand {
    /// Configure a provider under NAME in your names; the key is read once
    /// from --key-file and kept by the node, never shown again.
    Add {
        /// The pet name for the provider (what guests are granted).
        name: String,
        /// anthropic | ollama | openai
        #[arg(long, value_name = "KIND")]
        provider: String,
        /// A file holding the API key (required for anthropic and openai).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// The server's base URL (default: the provider's public API; ollama: http://127.0.0.1:11434).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// The model (default: a current model of the provider).
        #[arg(long, value_name = "M")]
        model: Option<String>,
        /// Most output tokens per call (default 4096).
        #[arg(long, value_name = "N")]
        max_tokens: Option<u32>,
        /// Time limit of one HTTP request, seconds (default 120, at most 600).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Price of a million input tokens in USD (for cost budgets; default 0).
        #[arg(long, value_name = "USD")]
        price_input: Option<String>,
        /// Price of a million output tokens in USD (default 0).
        #[arg(long, value_name = "USD")]
        price_output: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// The providers in your names: provider, URL, model, whether a key is set.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        out: Out,
    },
    /// Remove a provider; by the host that added it this also erases its
    /// key, so every other name for it (copies, grants) stops working.
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// One model call through provider NAME: prints the reply. Charged to
    /// the acting agent's budget and written to its audit log.
    Ask {
        name: String,
        /// The prompt; words are joined with spaces.
        #[arg(required = true, num_args = 1.., value_name = "PROMPT")]
        prompt: Vec<String>,
        /// A system prompt.
        #[arg(long, value_name = "TEXT")]
        system: Option<String>,
        /// Most output tokens (at most the provider's --max-tokens).
        #[arg(long, value_name = "N")]
        max_tokens: Option<u32>,
        #[command(flatten)]
        out: Out,
    },
    /// The acting agent's model calls (use --as AGENT for another agent).
    Audit {
        /// How many of the newest entries (default 100, at most 10000).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        out: Out,
    },
    /// Show or set the LLM budget of AGENT (default: SELF; or an agent you made).
    Budget {
        /// SELF or the name of an agent you made.
        #[arg(default_value = "SELF")]
        agent: String,
        /// Token limit (0: none).
        #[arg(long, value_name = "N")]
        tokens: Option<u64>,
        /// Cost limit in USD (0: none).
        #[arg(long, value_name = "USD")]
        cost: Option<String>,
        /// Forget what was used so far.
        #[arg(long)]
        reset: bool,
        /// What incoming text that looks like a prompt injection gets:
        /// warn (passed on, flagged to the model; the default), block (the
        /// model call is refused) or ask (refused, and you are mailed the
        /// text to decide).
        #[arg(long, value_name = "POLICY", value_parser = ["warn", "block", "ask"])]
        injection: Option<String>,
        #[command(flatten)]
        out: Out,
    },
}

/// `capstan routine …`.
#[derive(Debug, Subcommand)]
pub enum RoutineCommand {
    /// Mail AGENT (a path in your names) TEXT on a schedule: --every
    /// DURATION (30s, 5m, 1h; at least 1s) or --cron EXPR (5 fields, UTC).
    Add {
        /// The routine's name (a pet name, unique among your routines).
        name: String,
        /// The agent mailed: a path in your names.
        #[arg(long, value_name = "AGENT")]
        to: String,
        /// Fire every DURATION (e.g. 30s, 5m, 1h, 1d; at least 1s).
        #[arg(
            long,
            value_name = "DURATION",
            conflicts_with = "cron",
            required_unless_present = "cron"
        )]
        every: Option<String>,
        /// Fire when the 5-field cron expression matches (UTC), e.g. "*/5 * * * *".
        #[arg(long, value_name = "EXPR")]
        cron: Option<String>,
        /// What each tick mails.
        #[arg(long, value_name = "TEXT")]
        text: String,
        #[command(flatten)]
        out: Out,
    },
    /// Your routines: schedule, recipient, last and next tick.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        out: Out,
    },
    /// Remove a routine: no tick fires after this returns.
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        #[command(flatten)]
        out: Out,
    },
}

impl RoutineCommand {
    pub fn json(&self) -> bool {
        match self {
            RoutineCommand::Add { out, .. }
            | RoutineCommand::List { out }
            | RoutineCommand::Remove { out, .. } => out.json,
        }
    }
}

impl LlmCommand {
    pub fn json(&self) -> bool {
        match self {
            LlmCommand::Add { out, .. }
            | LlmCommand::List { out }
            | LlmCommand::Remove { out, .. }
            | LlmCommand::Ask { out, .. }
            | LlmCommand::Audit { out, .. }
            | LlmCommand::Budget { out, .. } => out.json,
        }
    }
}

impl ClusterCommand {
    pub fn json(&self) -> bool {
        match self {
            ClusterCommand::Init { out, .. }
            | ClusterCommand::Status { out }
            | ClusterCommand::Members { out }
            | ClusterCommand::Placement { out, .. }
            | ClusterCommand::Policy { out, .. }
            | ClusterCommand::Drain { out, .. }
            | ClusterCommand::Leave { out }
            | ClusterCommand::Trace { out, .. } => out.json,
        }
    }
}
