//! Command-line definitions (clap). The contract is `nodes/CLI.md`.
//!
//! `--home` and `--as` are global (accepted before or after the subcommand).
//! `--json` is declared on the top level and on every subcommand instead of
//! globally, because `store --json J` uses the same flag for the JSON value to
//! store: there `--json` takes an optional value (see [`StoreArgs`]).
//!
//! - this module: [`Cli`] and [`Command`], every command and its flags;
//! - `groups`: the command groups with subcommands of their own (`cluster`,
//!   `llm`, `routine`);
//! - `helpers`: [`StoreArgs`] and what a parsed command says about itself.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

mod groups;
mod helpers;

pub use groups::*;
pub use helpers::*;

/// Capstan: a distributed object-capability runtime.
///
/// A node daemon keeps agents, directories and mail durable in a store;
/// these commands drive it through its local control socket.
#[derive(Debug, Parser)]
#[command(name = "capstan", version, propagate_version = true)]
pub struct Cli {
    /// The node's home directory (store, socket, pid and log files). In a
    /// cluster the last component of the home is the node's name, so
    /// `--node n1` reads well too.
    #[arg(
        long,
        visible_alias = "node",
        global = true,
        env = "CAPSTAN_HOME",
        value_name = "DIR"
    )]
    pub home: Option<PathBuf>,
    /// Act as the agent held under PATH in the root host's names (default: the root host).
    #[arg(long = "as", global = true, value_name = "PATH")]
    pub as_agent: Option<String>,
    /// Machine-readable output: one JSON value on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `--json` on a subcommand.
#[derive(Debug, Args, Default)]
pub struct Out {
    /// Machine-readable output: one JSON value on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    // Lifecycle --------------------------------------------------------
    /// Start the daemon in the background; returns once it answers.
    Start {
        /// Run in the foreground (logs to stderr) until stopped.
        #[arg(long)]
        foreground: bool,
        /// Listen for other nodes (QUIC) on HOST:PORT; remembered in the home for later starts.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<std::net::SocketAddr>,
        /// What other nodes dial to reach this one, put in its locators,
        /// invitations and cluster record (default the --listen address,
        /// which must then not be 0.0.0.0 or [::]): HOST[:PORT], several
        /// comma-separated; a HOST without :PORT means the port it listens
        /// on; IPv6 as [ADDR]:PORT. Remembered for later starts.
        #[arg(long, value_name = "HOST[:PORT],…")]
        advertise: Option<String>,
        /// The store: etcd://HOST:PORT[,HOST:PORT…][/PREFIX] joins the
        /// cluster kept there (see `capstan cluster init`; needs --listen);
        /// default the embedded store in the home. Remembered for later starts.
        #[arg(long, value_name = "SPEC")]
        store: Option<String>,
        /// The secrets key that seals the store's secrets (LLM API keys, a
        /// cluster's CA key): for a node of a cluster, the file `capstan
        /// cluster init` wrote. Copied to <home>/identity/secrets.key and
        /// used from there on (a lone node makes its own at first start).
        #[arg(long, value_name = "FILE")]
        secrets_key: Option<std::path::PathBuf>,
        /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on
        /// HOST:PORT (port 0: any free port); a loopback address unless
        /// --metrics-public. Remembered in the home for later starts.
        #[arg(long, value_name = "HOST:PORT")]
        metrics: Option<std::net::SocketAddr>,
        /// Allow --metrics on an address other than loopback (anyone who can
        /// reach it reads the node's counters and guest names).
        #[arg(long)]
        metrics_public: bool,
        /// Serve the web console on HOST:PORT (port 0: any free port); a
        /// loopback address unless --console-public. Remembered in the home
        /// for later starts; `capstan console` prints a URL to open it.
        #[arg(long, value_name = "HOST:PORT")]
        console: Option<std::net::SocketAddr>,
        /// Allow --console on an address other than loopback (anyone who can
        /// reach it may try tokens; use TLS in front of it).
        #[arg(long)]
        console_public: bool,
        /// Collect garbage in the background every SECS seconds (a pass as
        /// `capstan gc` runs, keeping a day of exactly-once answers). Off by
        /// default; not remembered.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
        gc_interval: Option<u64>,
        /// Memory budget of the store's page cache, in bytes (redb stores;
        /// default 32 MiB, at least 1 MiB): bounds how much of the store
        /// the daemon keeps in memory. `capstan status` shows it and the
        /// daemon's resident memory. Not remembered.
        #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1_048_576..))]
        store_cache_bytes: Option<u64>,
        /// Most bytes of compiled guest components kept in
        /// `$CAPSTAN_HOME/compiled` (default 1 GiB); past it the least
        /// recently used are deleted (compiled again when next needed).
        /// Not remembered.
        #[arg(long, value_name = "BYTES")]
        compiled_cache_bytes: Option<u64>,
        /// Local embedding model for searches made without `--embed`: a
        /// Model2Vec folder or a package folder holding one in model/, e.g.
        /// static_model of `pip install tokenlearn-static-model`. Not remembered.
        #[arg(long, value_name = "DIR")]
        embed_model: Option<std::path::PathBuf>,
        #[command(flatten)]
        out: Out,
    },
    /// Print a URL (with a one-time token) that opens the web console.
    ///
    /// The daemon serves the console when started with `--console
    /// HOST:PORT`. Nothing is opened: paste the URL in a browser.
    Console {
        #[command(flatten)]
        out: Out,
    },
    /// The capability graph: holders, what they hold, grants, locators out.
    Graph {
        /// Start at this agent (one you made) or directory; default your own names.
        path: Option<String>,
        /// Output: dot (Graphviz text, the default), svg (drawn by capstan), json.
        #[arg(long, value_enum)]
        format: Option<crate::graph::Format>,
        #[command(flatten)]
        out: Out,
    },
    /// Cluster operations: init, status, members, placement, drain, leave.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// LLM providers held by this host: add, list, remove, ask, audit, budget.
    Llm {
        #[command(subcommand)]
        command: LlmCommand,
    },
    /// Routines: mail an agent on a schedule (add, list, remove).
    Routine {
        #[command(subcommand)]
        command: RoutineCommand,
    },
    /// Run the installed tool component TOOL once: its `execute` with --input.
    ///
    /// Prints the tool's output (JSON). The daemon runs in the foreground
    /// with `capstan start --foreground`.
    Run {
        /// An installed tool (see `capstan install`).
        tool: String,
        /// The tool's parameters: one JSON value.
        #[arg(long, value_name = "JSON")]
        input: String,
        #[command(flatten)]
        out: Out,
    },
    /// Stop the daemon and wait until it has exited.
    Stop {
        #[command(flatten)]
        out: Out,
    },
    /// Check that the daemon answers.
    Ping {
        #[command(flatten)]
        out: Out,
    },
    /// Print the paths of the home, socket, store, log and pid files.
    Where {
        #[command(flatten)]
        out: Out,
    },
    /// Show the daemon's pid, uptime, store, live incarnations and root host.
    Status {
        #[command(flatten)]
        out: Out,
    },
    /// Show what the store holds: keys and bytes per kind of key.
    ///
    /// Scans the node's whole store a page at a time (bounded memory); a scan
    /// that takes more than a second shows its progress on stderr.
    Du {
        #[command(flatten)]
        out: Out,
    },
    /// Collect garbage: delete the formulas nothing refers to any more.
    ///
    /// One pass: marks what the roots (the root host, every agent's names
    /// and inbox, pending promises, locators, placements) reach on one
    /// snapshot, then deletes the unreachable values, directories, promises
    /// and remote references (cycles too) with their value chunks, names
    /// and keys, in small transactions; anything referenced again during the
    /// pass is kept. Also drops exactly-once answers older than
    /// --keep-answers. Prints what it freed; shows progress on stderr when
    /// it takes over a second. Safe to interrupt and to run again.
    Gc {
        /// Keep exactly-once answers of requests this recent (seconds); a
        /// retry of a request older than this would apply again.
        #[arg(long, value_name = "SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(0..=10 * 365 * 86_400))]
        keep_answers: u64,
        #[command(flatten)]
        out: Out,
    },
    /// Write a backup of the whole store to FILE: one consistent snapshot.
    ///
    /// With a daemon running, the node writes it while it serves; without
    /// one, the store is opened here (the home's, or --store's). The file
    /// (mode 0600: it holds everything the store does) replaces FILE only
    /// once it is whole and checked.
    Backup {
        /// Where to write the backup.
        file: std::path::PathBuf,
        /// The store to back up when no daemon runs (default: the home's).
        #[arg(long, value_name = "SPEC")]
        store: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Restore a backup into an empty store (the node must be stopped).
    ///
    /// The file is checked whole first; nothing is written unless it is an
    /// undamaged Capstan backup, and only into a store holding no key: move
    /// a damaged store.redb away first, or name a fresh etcd prefix with
    /// --store.
    Restore {
        /// The backup to restore.
        file: std::path::PathBuf,
        /// The store to restore into (default: the home's).
        #[arg(long, value_name = "SPEC")]
        store: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// A guided tour on a temporary home: start, names, mail, crash, restart.
    Demo {
        #[command(flatten)]
        out: Out,
    },
    /// Measure the node end to end on temporary homes and print a table
    /// (runs `capstan-bench`, built beside this binary: `cargo build
    /// --release -p capstan-bench`; `capstan bench --help` lists its flags).
    ///
    /// Spawns daemons of this binary, drives them over the control socket
    /// and prints cold start, durable send latency and throughput, request
    /// round trips, listing, restart after kill -9 and memory per guest.
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark's own arguments (see `capstan bench --help`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },

    // Names ------------------------------------------------------------
    /// List the names in a directory (default: your own names).
    #[command(visible_alias = "ls")]
    List {
        /// A directory path (default: your own names).
        path: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Show what a name refers to.
    Show {
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Write a stored value's bytes to stdout, exactly.
    Cat {
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Store a value under a name (at most 8 MiB).
    ///
    /// One value holds at most 8 MiB (8388608 bytes); a larger one is refused
    /// before anything is sent: split it into several values.
    Store(StoreArgs),
    /// Remove a name.
    #[command(visible_alias = "rm")]
    Remove {
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Rename: move a name to another path.
    #[command(visible_alias = "mv")]
    Move {
        from: String,
        to: String,
        #[command(flatten)]
        out: Out,
    },
    /// Copy a name: the new name refers to the same thing.
    #[command(visible_alias = "cp")]
    Copy {
        from: String,
        to: String,
        #[command(flatten)]
        out: Out,
    },
    /// Make a directory.
    Mkdir {
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Make a host (an agent with full authority over its own names).
    Mkhost {
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Make a guest (a confined agent: only what it is given).
    Mkguest {
        path: String,
        /// Its body: an installed agent component (messages to the guest
        /// then run its handler) or channel component (run by the node).
        /// `--agent` says the same (`mkguest helper --agent llm-agent
        /// --with llm=claude`).
        #[arg(long, visible_alias = "agent", value_name = "NAME")]
        component: Option<String>,
        /// Fuel for one call of its component, instead of the node's
        /// (1000000 to 100000000000; needs --component).
        #[arg(long, value_name = "N", requires = "component")]
        fuel: Option<u64>,
        /// Wall-clock deadline of one call of its component, in ms, instead
        /// of the node's (10 to 60000; needs --component).
        #[arg(long, value_name = "MS", requires = "component")]
        deadline_ms: Option<u32>,
        /// Give this guest alone a capability: SLOT=PATH (PATH in your
        /// names; the guest holds it as SLOT), beside the component's
        /// install-time grants, e.g. --with llm=claude. Repeatable.
        #[arg(long = "with", value_name = "SLOT=PATH", requires = "component")]
        with: Vec<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Evaluate JavaScript with the capabilities you bind to its slots.
    ///
    /// Runs SOURCE in the installed evaluator component (a JavaScript
    /// engine as a confined guest; install guests/out/evaluator.wasm as
    /// `evaluator`). Each SLOT=PATH makes the global SLOT an object whose
    /// methods use what PATH names in your names, and nothing else: a value
    /// has text(), json(), size(); an http capability fetch(url, {method,
    /// body, headers}); a directory list(), read(name); an agent list(),
    /// read(name), inbox(), send(text). Prints the JSON of the result.
    Eval {
        /// The script; its last expression is the result (a promise is awaited).
        source: String,
        /// SLOT=PATH: binds SLOT to PATH in your names. Repeatable.
        #[arg(value_name = "SLOT=PATH")]
        bindings: Vec<String>,
        /// The installed evaluator component to run.
        #[arg(long, default_value = "evaluator", value_name = "NAME")]
        evaluator: String,
        /// Also store the result (JSON) under this name: an eval result,
        /// which depends on what its slots held and on the evaluator, and
        /// is cancelled with any of them (`capstan cancel`).
        #[arg(long = "name", value_name = "PATH")]
        result_name: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Answer a code proposal (a `definition` message) by filling its slots.
    ///
    /// An LLM agent's define_code / request_evaluation mails you its code
    /// and the slots it needs; you decide what fills each slot. The code
    /// runs in the evaluator with only what you bound, and its result (or
    /// its error) is mailed back to the agent as a reply to NUMBER. To
    /// refuse, reply instead: `capstan reply NUMBER "no: …"`.
    Endow {
        /// The number of the proposal in your inbox.
        number: u64,
        /// SLOT=PATH: fills the proposal's SLOT with PATH in your names.
        /// Every slot of the proposal must be bound. Repeatable.
        #[arg(long = "bind", value_name = "SLOT=PATH")]
        bindings: Vec<String>,
        /// The installed evaluator component to run.
        #[arg(long, default_value = "evaluator", value_name = "NAME")]
        evaluator: String,
        #[command(flatten)]
        out: Out,
    },
    /// Install a WebAssembly component (agent or tool world) under NAME.
    Install {
        /// The component file (.wasm).
        file: PathBuf,
        /// The pet name to install it under.
        #[arg(long)]
        name: String,
        /// Give it a capability: SLOT=PATH (PATH in your names). Repeatable.
        #[arg(long = "grant", value_name = "SLOT=PATH")]
        grants: Vec<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Make an HTTP capability NAME for components (grant it: install … --grant http=NAME).
    ///
    /// The node makes the requests: only to URLs under an --allow prefix
    /// (scheme, host and port exactly; the path by prefix), with the allowed
    /// methods, adding the credential headers it reads from key files (the
    /// guest never sees them; an echo in a response is redacted).
    Mkhttp {
        /// The pet name of the capability.
        name: String,
        /// An allowed URL prefix, e.g. https://api.example.com/v1/. Repeatable.
        #[arg(long = "allow", value_name = "URL", required = true)]
        allow: Vec<String>,
        /// Allowed methods, comma-separated (default GET).
        #[arg(long = "method", value_name = "M,…", value_delimiter = ',')]
        methods: Vec<String>,
        /// A credential header the node adds: NAME=KEYFILE (the file holds
        /// the value, e.g. `Bearer sk-…`). Repeatable.
        #[arg(long = "header-file", value_name = "NAME=FILE")]
        headers: Vec<String>,
        /// Longest request, ms (default 10000, at most 60000).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u32>,
        /// Largest response body, bytes (default 1 MiB, at most 16 MiB).
        #[arg(long, value_name = "N")]
        max_bytes: Option<u64>,
        /// Let the credential headers go to `http://` prefixes, in clear
        /// (a server on loopback); without it they go over https only.
        #[arg(long)]
        insecure_http: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Make a search capability NAME over the directory PATH (grant it to
    /// an llm-agent as `search`; search with `capstan search NAME QUERY`).
    ///
    /// It answers full-text (BM25) and, with --embed, vector results fused
    /// by Reciprocal Rank Fusion (k = 60). The index is derived data: each
    /// node builds it in memory on first use and keeps it up to date with
    /// the directory before each search.
    Mksearch {
        /// The pet name of the capability.
        name: String,
        /// The directory whose values it searches (subdirectories included).
        #[arg(long, value_name = "PATH")]
        over: String,
        /// Search this host's mail texts too (hits named `mail:N`).
        #[arg(long)]
        mail: bool,
        /// An llm provider (openai or ollama; see `capstan llm add`) whose
        /// embeddings API gives the vectors. Without it: full text only.
        #[arg(long, value_name = "LLM")]
        embed: Option<String>,
        /// The embedding model (default text-embedding-3-small for openai,
        /// nomic-embed-text for ollama).
        #[arg(long, value_name = "MODEL")]
        embed_model: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Search with the search capability NAME: the best -k hits for QUERY,
    /// each a name under its directory with a score and a snippet.
    Search {
        /// A search capability (see `capstan mksearch`).
        name: String,
        /// What to look for: words, an identifier, a paraphrase.
        query: String,
        /// How many hits (1 to 100).
        #[arg(short = 'k', long = "k", value_name = "N", default_value_t = 10)]
        k: u32,
        #[command(flatten)]
        out: Out,
    },
    /// The guest agents with a component body: state, fuel and memory use, last error.
    Guests {
        #[command(flatten)]
        out: Out,
    },

    // Mail -------------------------------------------------------------
    /// Send a package: TEXT with `@name` references to values.
    #[command(after_help = TEXT_HELP)]
    Send {
        /// The recipient (an agent's name, or HOST).
        to: String,
        /// The text; words are joined with spaces.
        #[arg(required = true, num_args = 1.., value_name = "TEXT")]
        text: Vec<String>,
        /// Trace the send's hops (on every node of a cluster: numbers
        /// reserved at inboxes' owners, the commit, the relay, wake-ups)
        /// and print them after its number; `capstan cluster trace ID`
        /// shows them again.
        #[arg(long)]
        trace: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Ask an agent for something; the answer lands under --name.
    ///
    /// The description is at most 64 KiB (65536 bytes).
    Request {
        /// Whom to ask (an agent's name, or HOST).
        to: String,
        /// What you ask for; words are joined with spaces.
        #[arg(required = true, num_args = 1.., value_name = "DESCRIPTION")]
        description: Vec<String>,
        /// The name under which the answer is kept.
        #[arg(long, value_name = "PATH")]
        name: Option<String>,
        /// Wait until the request is resolved or rejected.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Resolve request N in your inbox with the value named PATH.
    Resolve {
        number: u64,
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Reject request N in your inbox (the reason: at most 64 KiB).
    Reject {
        number: u64,
        /// Why (words are joined with spaces).
        reason: Vec<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Adopt the reference EDGE of message N under a name of yours.
    Adopt {
        number: u64,
        edge: String,
        /// Your name for it (default: EDGE).
        #[arg(long, value_name = "PATH")]
        name: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Print a new locator for NAME: a durable reference other nodes can adopt.
    ///
    /// capstan://<cluster-id>/<swiss>?at=<host:port>. The swiss number is a
    /// secret: whoever holds the locator can use what it designates, until
    /// `capstan cancel NAME`. Needs a node started with --listen.
    Locate {
        #[arg(value_name = "NAME")]
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Adopt a locator of another node under a pet name.
    #[command(name = "adopt-locator")]
    AdoptLocator {
        locator: String,
        /// The pet name to give it.
        #[arg(long = "name", value_name = "NAME")]
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Invite another node's agent: prints an invitation for it to accept.
    ///
    /// NAME is reserved for the invited agent (`capstan list` shows a pending
    /// invitation). The invitation is a one-use locator: whoever accepts it
    /// first becomes NAME; `capstan cancel NAME` withdraws it. Needs a node
    /// started with --listen.
    Invite {
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Accept another node's invitation: NAME becomes the inviting agent here,
    /// and the inviter gets a name for you. Needs a node started with --listen.
    Accept {
        invitation: String,
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Revoke every locator of NAME: other nodes' references to it fail from now on.
    Cancel {
        #[arg(value_name = "NAME")]
        path: String,
        #[command(flatten)]
        out: Out,
    },
    /// Show or set the inbox quota of AGENT (yourself, or an agent you made).
    ///
    /// An inbox holds at most 100,000 messages and 256 MiB unless its host
    /// sets otherwise; a send to a full inbox is refused (nothing is
    /// written) and federated mail to it bounces. `--default` goes back to
    /// the defaults. Dismissing messages gives room back.
    Quota {
        #[arg(value_name = "AGENT")]
        agent: String,
        /// Most messages the inbox holds (0: the default).
        #[arg(long, value_name = "N")]
        messages: Option<u64>,
        /// Most bytes of stored messages the inbox holds (0: the default).
        #[arg(long, value_name = "B")]
        bytes: Option<u64>,
        /// Go back to the default limits.
        #[arg(long, conflicts_with_all = ["messages", "bytes"])]
        default: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Dismiss message N from your inbox.
    Dismiss {
        number: u64,
        #[command(flatten)]
        out: Out,
    },
    /// Reply to the sender of message N.
    #[command(after_help = TEXT_HELP)]
    Reply {
        number: u64,
        #[arg(required = true, num_args = 1.., value_name = "TEXT")]
        text: Vec<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Show your inbox, a page at a time (at most 1000 messages unless --limit says).
    Inbox {
        /// Only the thread of this message id (32 hex digits).
        #[arg(long, value_name = "MESSAGE-ID")]
        thread: Option<String>,
        /// Keep following: print new messages as they arrive, until interrupted.
        #[arg(long, short = 'f', conflicts_with = "limit")]
        follow: bool,
        /// Show at most N messages (1 to 10000; default 1000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
        /// Only messages numbered above M (the next page: the last number shown).
        #[arg(long, value_name = "M")]
        after: Option<u64>,
        #[command(flatten)]
        out: Out,
    },
}

const TEXT_HELP: &str = "TEXT syntax: `@path` embeds a reference to the value named `path` \
(a pet name, or a path such as `docs.a` or `HOST.x`: names joined with '.'); \
`@path:edge` suggests the name `edge` to the receiver (default: the last segment of `path`). \
`@` starts a reference only at the start of TEXT or after a character that is not a letter, \
digit, '.', '_' or '-' (so `a@b.c` is literal); `@@` is a literal `@`. \
An `@word` that is not one of your names is an error (`@Report`: write `@@Report` for a literal `@`).

Limits: the text (without its references) is at most 64 KiB (65536 bytes), with at most 64 \
references; send a longer text as a value: `capstan store --file FILE --name NAME`, then `@NAME`.";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// The limits written in the help texts are the node's.
    #[test]
    fn help_states_the_real_limits() {
        use capstan_actors::api::{MAX_MESSAGE_REFS, MAX_MESSAGE_TEXT, MAX_VALUE_BYTES};
        assert_eq!(MAX_MESSAGE_TEXT, 64 * 1024);
        assert!(TEXT_HELP.contains(&format!("64 KiB ({MAX_MESSAGE_TEXT} bytes)")));
        assert!(TEXT_HELP.contains(&format!("at most {MAX_MESSAGE_REFS} references")));
        assert_eq!(MAX_VALUE_BYTES, 8 * 1024 * 1024);
        let store = Cli::command()
            .find_subcommand_mut("store")
            .expect("store")
            .render_long_help()
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            store.contains(&format!("8 MiB ({MAX_VALUE_BYTES} bytes)")),
            "{store}"
        );
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("capstan").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn store_json_flag_is_value_or_output() {
        let c = parse(&["store", "--json", "[1,2]", "--name", "x"]);
        let Command::Store(s) = &c.command else {
            panic!()
        };
        assert_eq!(s.json_value().unwrap(), Some("[1,2]"));
        assert!(!c.command.json());
        let c = parse(&["store", "--text", "hi", "--name", "x", "--json"]);
        let Command::Store(s) = &c.command else {
            panic!()
        };
        assert_eq!(s.json_value().unwrap(), None);
        assert!(c.command.json());
        let c = parse(&["--json", "store", "--json", "-1", "--name", "x"]);
        let Command::Store(s) = &c.command else {
            panic!()
        };
        assert_eq!(s.json_value().unwrap(), Some("-1"));
        assert!(c.json);
    }

    #[test]
    fn global_options_after_subcommand_and_words() {
        let c = parse(&[
            "request",
            "HOST",
            "need a doc",
            "--name",
            "doc",
            "--as",
            "alice",
            "--json",
        ]);
        assert_eq!(c.as_agent.as_deref(), Some("alice"));
        assert!(c.command.json());
        let Command::Request {
            description, name, ..
        } = c.command
        else {
            panic!()
        };
        assert_eq!(description, vec!["need a doc"]);
        assert_eq!(name.as_deref(), Some("doc"));
        let c = parse(&["send", "alice", "hello", "@greeting", "--as", "bob"]);
        let Command::Send { text, .. } = c.command else {
            panic!()
        };
        assert_eq!(text, vec!["hello", "@greeting"]);
        assert!(
            Cli::try_parse_from(["capstan", "store", "--text", "a", "--stdin", "--name", "x"])
                .is_ok()
        );
        let c = parse(&["store", "--name", "x", "--json"]);
        let Command::Store(s) = &c.command else {
            panic!()
        };
        assert_eq!(s.source_count(), 0);
    }
}
