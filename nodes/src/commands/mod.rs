//! The commands that act as an agent: read arguments, call the node through
//! [`Client`], render the answer. [`run`] sends each to its group:
//!
//! - [`names`]: the name commands (`list`, `store`, `mkdir`, `cancel`, ...);
//! - [`mail`]: the mail commands (`send`, `request`, `inbox`, `quota`, ...);
//! - [`federation`]: `locate`, `adopt-locator`, `invite`, `accept`;
//! - [`cluster`]: `cluster status|members|placement|drain|leave|trace`;
//! - [`trace`]: a traced operation's spans, fetched from the node and shown
//!   (`send --trace`, `cluster trace`);
//! - the others are dispatched to their modules ([`crate::guests`],
//!   [`crate::graph`], [`crate::llm`], [`crate::routines`], [`crate::search`]).

use anyhow::bail;
use serde_json::json;

use crate::cli::Command;
use crate::client::Client;
use crate::output::print_json;

mod cluster;
mod federation;
mod mail;
mod names;
mod trace;

/// Prints what a command made: `WHAT (id HEX)` for people, `{"id":hex}`
/// with `--json`.
fn print_made(json: bool, what: &str, id: &[u8]) {
    if json {
        print_json(&json!({"id": hex::encode(id)}));
    } else {
        println!("{what} (id {})", hex::encode(id));
    }
}

/// Prints what a command did: a line for people, the object with `--json`.
fn print_done(json: bool, line: &str, object: serde_json::Value) {
    if json {
        print_json(&object);
    } else {
        println!("{line}");
    }
}

/// Runs a command that acts as an agent.
pub async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Cluster { command } => cluster::run(client, command, json).await?,
        Command::Graph { path, format, .. } => {
            crate::graph::run(client, path, format, json).await?
        }
        Command::Llm { command } => crate::llm::run(client, command, json).await?,
        Command::Routine { command } => crate::routines::run(client, command, json).await?,
        c @ (Command::Mksearch { .. } | Command::Search { .. }) => {
            crate::search::run(client, c, json).await?
        }
        c @ (Command::Install { .. }
        | Command::Guests { .. }
        | Command::Run { .. }
        | Command::Eval { .. }
        | Command::Endow { .. }
        | Command::Mkhttp { .. }) => crate::guests::run(client, c, json).await?,
        c @ (Command::List { .. }
        | Command::Show { .. }
        | Command::Cat { .. }
        | Command::Store(_)
        | Command::Remove { .. }
        | Command::Move { .. }
        | Command::Copy { .. }
        | Command::Mkdir { .. }
        | Command::Mkhost { .. }
        | Command::Mkguest { .. }
        | Command::Cancel { .. }) => names::run(client, c, json).await?,
        c @ (Command::Send { .. }
        | Command::Reply { .. }
        | Command::Request { .. }
        | Command::Resolve { .. }
        | Command::Reject { .. }
        | Command::Adopt { .. }
        | Command::Dismiss { .. }
        | Command::Quota { .. }
        | Command::Inbox { .. }) => mail::run(client, c, json).await?,
        c @ (Command::Locate { .. }
        | Command::AdoptLocator { .. }
        | Command::Invite { .. }
        | Command::Accept { .. }) => federation::run(client, c, json).await?,
        other => bail!("internal error: {other:?} is not an agent command"),
    }
    Ok(())
}
