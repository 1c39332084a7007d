//! What the commands' arguments share: the sources of a stored value
//! ([`StoreArgs`]) and what a parsed command says about itself
//! (`--json`, whether it needs a running daemon, …).

use super::*;

/// `capstan store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Store this text.
    #[arg(long, value_name = "T")]
    pub text: Option<String>,
    /// `--json J`: store the JSON value J (validated). A bare `--json` (no value) asks for JSON output.
    #[arg(
        long = "json",
        value_name = "J",
        num_args = 0..=1,
        default_missing_value = "",
        action = ArgAction::Append,
        allow_negative_numbers = true
    )]
    pub json: Vec<String>,
    /// Store the bytes of this file.
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,
    /// Store the bytes read from stdin.
    #[arg(long)]
    pub stdin: bool,
    /// The name to store it under.
    #[arg(long, value_name = "PATH")]
    pub name: String,
}

impl StoreArgs {
    /// The JSON value to store, if `--json J` was given (errors on several).
    pub fn json_value(&self) -> Result<Option<&str>, String> {
        let values: Vec<&str> = self
            .json
            .iter()
            .filter(|v| !v.is_empty())
            .map(String::as_str)
            .collect();
        match values.as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(v)),
            _ => Err("give one JSON value with --json J".to_string()),
        }
    }
    /// A bare `--json` asks for JSON output.
    pub fn json_output(&self) -> bool {
        self.json.iter().any(String::is_empty)
    }
    /// How many sources were given (exactly one is needed; checked by the
    /// command, since a bare `--json` is not a source).
    pub fn source_count(&self) -> usize {
        usize::from(self.text.is_some())
            + usize::from(self.json.iter().any(|v| !v.is_empty()))
            + usize::from(self.file.is_some())
            + usize::from(self.stdin)
    }
}

impl Command {
    /// Whether this subcommand asked for JSON output.
    pub fn json(&self) -> bool {
        match self {
            Command::Store(s) => s.json_output(),
            Command::Cluster { command } => command.json(),
            Command::Llm { command } => command.json(),
            Command::Routine { command } => command.json(),
            Command::Bench { args } => args.iter().any(|a| a == "--json"),
            Command::Start { out, .. }
            | Command::Console { out }
            | Command::Graph { out, .. }
            | Command::Run { out, .. }
            | Command::Install { out, .. }
            | Command::Eval { out, .. }
            | Command::Endow { out, .. }
            | Command::Mkhttp { out, .. }
            | Command::Mksearch { out, .. }
            | Command::Search { out, .. }
            | Command::Guests { out }
            | Command::Stop { out }
            | Command::Ping { out }
            | Command::Where { out }
            | Command::Status { out }
            | Command::Du { out }
            | Command::Gc { out, .. }
            | Command::Backup { out, .. }
            | Command::Restore { out, .. }
            | Command::Demo { out }
            | Command::List { out, .. }
            | Command::Show { out, .. }
            | Command::Cat { out, .. }
            | Command::Remove { out, .. }
            | Command::Move { out, .. }
            | Command::Copy { out, .. }
            | Command::Mkdir { out, .. }
            | Command::Mkhost { out, .. }
            | Command::Mkguest { out, .. }
            | Command::Send { out, .. }
            | Command::Request { out, .. }
            | Command::Resolve { out, .. }
            | Command::Reject { out, .. }
            | Command::Adopt { out, .. }
            | Command::Dismiss { out, .. }
            | Command::Quota { out, .. }
            | Command::Locate { out, .. }
            | Command::AdoptLocator { out, .. }
            | Command::Cancel { out, .. }
            | Command::Invite { out, .. }
            | Command::Accept { out, .. }
            | Command::Reply { out, .. }
            | Command::Inbox { out, .. } => out.json,
        }
    }
}
