//! llm-agent: a confined LLM agent (Endo's Llamadrome, as a guest).
//!
//! It follows its inbox. A message from anyone starts a turn: the agent asks
//! the model it was given (the capability named `llm` in its names; the
//! host holds the key) with tools, runs the tools the model calls, and
//! replies with the model's final answer. Tools:
//!
//! - `list_names`: the agent's own names;
//! - `lookup_value {name}`: the text of one of them;
//! - `store_result {name, value}`: stores a text value under a name;
//! - `define_code {source, slots}` and `request_evaluation {source, slots}`:
//!   propose code whose named slots the *host* fills with capabilities
//!   (`capstan endow N --bind SLOT=NAME`); `chain_eval {source, results}`
//!   proposes code that composes earlier stored results (each becomes a
//!   global constant, JSON when it parses as JSON). The
//!   agent mails its host the proposal and stops: the conversation and the
//!   pending call are checkpointed in its names (`conversation`) first, so
//!   the wait survives `kill -9` and failover. The host's *reply to the
//!   proposal* is its decision (`capstan endow`'s result, or any other
//!   reply: a refusal); it becomes the tool's result and the conversation
//!   goes on. Other mail that comes meanwhile waits (in the checkpoint, at
//!   most `MAX_WAITING` messages) and is handled after the decision.
//!
//! - `search {query, k?}`: only when the agent holds a search capability
//!   named `search` (its host made it with `capstan mksearch` and granted
//!   it: `mkguest … --with search=NAME`): full text and vector hits over
//!   the values of a directory, each a name with a score and a snippet.
//!
//! Any other tool the model calls is answered an error: the agent has no
//! other powers. At most `MAX_MODEL_CALLS` model calls per turn.
wit_bindgen::generate!({ path: "../../wit/agent", world: "llm-agent" });

use std::collections::BTreeMap;

use capstan::agent::host;
use capstan::agent::llm;
use capstan::agent::search;
use capstan::agent::types::LogLevel;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The name of the model capability and of the checkpoint.
const LLM: &str = "llm";
/// The name of the search capability, when the agent was given one.
const SEARCH: &str = "search";
/// Hits a `search` call returns when the model does not say.
const SEARCH_K: u32 = 5;
const CONVERSATION: &str = "conversation";
/// Model calls per turn before the agent gives up.
const MAX_MODEL_CALLS: usize = 8;
/// Largest checkpoint kept by default; older exchanges are compacted past
/// it. The host can set another size (bytes, 16 KiB to 1 MiB) as the text
/// value `conversation-limit` in the agent's names (`mkguest … --with
/// conversation-limit=NAME`).
const MAX_CHECKPOINT: usize = 256 * 1024;
const LIMIT_NAME: &str = "conversation-limit";
const MIN_CHECKPOINT: usize = 16 * 1024;
const MAX_MAX_CHECKPOINT: usize = 1024 * 1024;
/// Longest summary of compacted exchanges kept (oldest lines go first).
const MAX_SUMMARY: usize = 8 * 1024;
/// How much of each compacted question the summary keeps.
const SUMMARY_LINE: usize = 160;
/// Most messages (and bytes of their text) kept waiting for a pending
/// proposal's decision.
const MAX_WAITING: usize = 16;
const MAX_WAITING_BYTES: usize = 256 * 1024;

const SYSTEM: &str = "You are a Capstan agent. You hold no authority but the tools given. \
To compute with your host's capabilities, propose code with define_code: name each \
capability the code needs as a slot with a description; your host decides what fills them.";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
enum Msg {
    User {
        text: String,
        /// Mail from anyone but the host: the node gives it to the model
        /// as data (spotlighted).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        untrusted: bool,
    },
    Assistant {
        #[serde(default)]
        text: String,
        #[serde(default)]
        tool_calls: Vec<Call>,
    },
    ToolResult {
        call_id: String,
        name: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Call {
    id: String,
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// A tool call waiting for the host's decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    call_id: String,
    name: String,
    /// The calls of the same model answer still to run after it.
    #[serde(default)]
    rest: Vec<Call>,
    /// The proposal's number in the agent's inbox (none in checkpoints
    /// written before it was kept: then any mail from the host decides).
    #[serde(default)]
    proposal: Option<u64>,
}

/// A message that came while a proposal was pending.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Waiting {
    number: u64,
    sender: String,
    text: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    messages: Vec<Msg>,
    /// The message (number in the agent's inbox) the turn answers.
    #[serde(default)]
    asker: Option<u64>,
    /// Whether the asker is the host: then proposals reply to its message,
    /// so the whole exchange is one thread (`capstan inbox --thread`).
    #[serde(default)]
    asker_is_host: bool,
    #[serde(default)]
    pending: Option<Pending>,
    /// Mail that came while the proposal was pending, oldest first.
    #[serde(default)]
    waiting: Vec<Waiting>,
    /// Exchanges dropped to keep the checkpoint bounded.
    #[serde(default)]
    dropped: u64,
    /// What the compacted exchanges were about: one line per exchange (its
    /// question, cut short), given to the model with the system prompt.
    #[serde(default)]
    summary: String,
}

#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    text: String,
    #[serde(default)]
    tool_calls: Vec<Call>,
}

fn load() -> Result<State, String> {
    match host::read_text(CONVERSATION)? {
        None => Ok(State::default()),
        Some(t) => serde_json::from_str(&t).map_err(|e| format!("my conversation is damaged: {e}")),
    }
}

/// The checkpoint size the host chose, or the default.
fn checkpoint_limit() -> usize {
    match host::read_text(LIMIT_NAME) {
        Ok(Some(t)) => t
            .trim()
            .parse::<usize>()
            .map(|n| n.clamp(MIN_CHECKPOINT, MAX_MAX_CHECKPOINT))
            .unwrap_or(MAX_CHECKPOINT),
        _ => MAX_CHECKPOINT,
    }
}

fn save(s: &mut State) -> Result<(), String> {
    let limit = checkpoint_limit();
    let mut text = serde_json::to_string(s).map_err(|e| e.to_string())?;
    // Compaction: drop the oldest whole exchanges (a user message and what
    // followed it) until the checkpoint fits, keeping the current one; each
    // leaves a line in the summary the model is given.
    while text.len() > limit {
        let next_user = s
            .messages
            .iter()
            .skip(1)
            .position(|m| matches!(m, Msg::User { .. }))
            .map(|p| p + 1);
        match next_user {
            Some(p) => {
                if let Some(Msg::User { text, .. }) = s.messages.first() {
                    let line: String = text.chars().take(SUMMARY_LINE).collect();
                    s.summary
                        .push_str(&format!("- asked: {}\n", line.replace('\n', " ")));
                }
                while s.summary.len() > MAX_SUMMARY {
                    match s.summary.find('\n') {
                        Some(i) => {
                            s.summary.drain(..=i);
                        }
                        None => s.summary.clear(),
                    }
                }
                s.messages.drain(..p);
                s.dropped += 1;
            }
            None => break,
        }
        text = serde_json::to_string(s).map_err(|e| e.to_string())?;
    }
    host::store_text(CONVERSATION, &text)
}

/// Whether the agent holds a search capability.
fn has_search() -> bool {
    host::list().iter().any(|n| n == SEARCH)
}

fn tools() -> Value {
    let mut t = base_tools();
    if has_search()
        && let Some(a) = t.as_array_mut()
    {
        a.push(json!({"name": "search",
            "description": "Search the stored values you were given search over (full text and meaning): the best matches, each a name with a snippet; read one with lookup_value.",
            "schema": {"type": "object", "properties": {"query": {"type": "string"},
                "k": {"type": "integer", "minimum": 1, "maximum": 100}}, "required": ["query"]}}));
    }
    t
}

fn base_tools() -> Value {
    let slots = json!({"type": "object", "additionalProperties": {"type": "string"},
        "description": "slot name -> what capability it needs"});
    json!([
        {"name": "list_names", "description": "The names you hold.",
         "schema": {"type": "object", "properties": {}}},
        {"name": "lookup_value", "description": "The text stored under one of your names.",
         "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        {"name": "store_result", "description": "Store a text value under a name of yours.",
         "schema": {"type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                    "required": ["name", "value"]}},
        {"name": "define_code", "description": "Propose JavaScript whose named slots your host fills with capabilities; you get its result.",
         "schema": {"type": "object", "properties": {"source": {"type": "string"}, "slots": slots},
                    "required": ["source"]}},
        {"name": "request_evaluation", "description": "Ask your host to evaluate JavaScript with the named values.",
         "schema": {"type": "object", "properties": {"source": {"type": "string"}, "slots": slots},
                    "required": ["source"]}},
        {"name": "chain_eval", "description": "Propose JavaScript that composes results you stored earlier (store_result): each named result is a global constant.",
         "schema": {"type": "object", "properties": {"source": {"type": "string"}, "slots": slots,
                    "results": {"type": "array", "items": {"type": "string"}}},
                    "required": ["source", "results"]}}
    ])
}

fn arg<'a>(c: &'a Call, name: &str) -> Result<&'a str, String> {
    c.arguments
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: argument {name:?} (a string) is missing", c.name))
}

/// Runs a tool that answers at once; `None` for one that waits for the host.
fn run_tool(c: &Call) -> Option<Result<String, String>> {
    Some(match c.name.as_str() {
        "list_names" => Ok(serde_json::to_string(&host::list()).unwrap_or_default()),
        "lookup_value" => arg(c, "name").and_then(|n| match host::read_text(n)? {
            Some(t) => Ok(t),
            None => Err(format!("you hold no name {n:?}")),
        }),
        "store_result" => arg(c, "name").and_then(|n| {
            let v = arg(c, "value")?;
            host::store_text(n, v).map(|_| format!("stored {n}"))
        }),
        "search" => arg(c, "query").and_then(|q| {
            let k = c
                .arguments
                .get("k")
                .and_then(Value::as_u64)
                .map_or(SEARCH_K, |k| k.clamp(1, 100) as u32);
            search::search(SEARCH, q, k)
        }),
        "define_code" | "request_evaluation" | "chain_eval" => return None,
        other => Err(format!(
            "there is no tool {other:?}: you have list_names, lookup_value, store_result, define_code, request_evaluation and chain_eval{}",
            if has_search() { ", and search" } else { "" }
        )),
    })
}

/// Mails the host a proposal: the text says what it is, the JSON after the
/// first line is what `capstan endow` reads.
fn propose(s: &State, c: &Call) -> Result<u64, String> {
    let source = arg(c, "source")?;
    let slots: BTreeMap<String, String> = match c.arguments.get("slots") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| format!("{}: slots must map names to descriptions", c.name))?,
    };
    let mut values = serde_json::Map::new();
    if c.name == "chain_eval" {
        let names: Vec<String> = match c.arguments.get("results") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| "chain_eval: results must be a list of names".to_string())?,
            None => {
                return Err("chain_eval: argument \"results\" (a list of names) is missing".into());
            }
        };
        for n in names {
            let Some(text) = host::read_text(&n)? else {
                return Err(format!("chain_eval: you stored no result {n:?}"));
            };
            let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
            values.insert(n, v);
        }
    }
    let list: Vec<String> = slots.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
    let body =
        json!({"kind": c.name, "call": c.id, "source": source, "slots": slots, "values": values});
    let text = format!("definition: slots {{{}}}\n{body}", list.join(", "));
    match s.asker {
        Some(n) if s.asker_is_host => host::reply(n, &text),
        _ => host::send("HOST", &text),
    }
}

/// Runs the model loop from the current state until it answers, waits for
/// the host, or gives up.
fn converse(s: &mut State) -> Result<(), String> {
    for _ in 0..MAX_MODEL_CALLS {
        let system = if s.summary.is_empty() {
            SYSTEM.to_string()
        } else {
            format!(
                "{SYSTEM}\n\nEarlier in this conversation ({} exchanges compacted):\n{}",
                s.dropped, s.summary
            )
        };
        let req = json!({"system": system, "messages": s.messages, "tools": tools()});
        let answer = match llm::chat(LLM, &req.to_string()) {
            Ok(a) => a,
            Err(e) => {
                // The turn is not kept: text the node refused (a credential,
                // a prompt injection) must not poison the next turns.
                if let Some(i) = s
                    .messages
                    .iter()
                    .rposition(|m| matches!(m, Msg::User { .. }))
                {
                    s.messages.truncate(i);
                }
                finish(s, &format!("I could not ask my model: {e}"))?;
                return Ok(());
            }
        };
        let a: Answer = match serde_json::from_str(&answer) {
            Ok(a) => a,
            Err(e) => {
                finish(s, &format!("my model's answer was malformed: {e}"))?;
                return Ok(());
            }
        };
        s.messages.push(Msg::Assistant {
            text: a.text.clone(),
            tool_calls: a.tool_calls.clone(),
        });
        if a.tool_calls.is_empty() {
            return finish(s, &a.text);
        }
        if run_calls(s, a.tool_calls)? {
            return Ok(()); // waiting for the host
        }
    }
    finish(
        s,
        &format!("I gave up after {MAX_MODEL_CALLS} model calls without a final answer."),
    )
}

/// Runs tool calls in order; true if one now waits for the host (the
/// state is saved with it pending).
fn run_calls(s: &mut State, calls: Vec<Call>) -> Result<bool, String> {
    let mut calls = calls.into_iter();
    while let Some(c) = calls.next() {
        match run_tool(&c) {
            Some(r) => {
                let (content, is_error) = match r {
                    Ok(t) => (t, false),
                    Err(e) => (e, true),
                };
                s.messages.push(Msg::ToolResult {
                    call_id: c.id.clone(),
                    name: c.name.clone(),
                    content,
                    is_error,
                });
            }
            None => {
                let proposal = match propose(s, &c) {
                    Ok(n) => n,
                    Err(e) => {
                        s.messages.push(Msg::ToolResult {
                            call_id: c.id.clone(),
                            name: c.name.clone(),
                            content: e,
                            is_error: true,
                        });
                        continue;
                    }
                };
                s.pending = Some(Pending {
                    call_id: c.id.clone(),
                    name: c.name.clone(),
                    rest: calls.collect(),
                    proposal: Some(proposal),
                });
                // checkpoint before the durable wait
                save(s)?;
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Replies to the asker and checkpoints.
fn finish(s: &mut State, text: &str) -> Result<(), String> {
    if let Some(n) = s.asker.take() {
        host::reply(n, text)?;
    }
    save(s)
}

struct Agent;

/// Starts a turn on a message.
fn ask(s: &mut State, number: u64, sender: &str, text: &str) -> Result<(), String> {
    s.asker = Some(number);
    s.asker_is_host = sender == "HOST";
    s.messages.push(Msg::User {
        text: format!("{sender}: {text}"),
        untrusted: sender != "HOST",
    });
    converse(s)
}

/// After a decision: the mail that waited for it, in order, until one
/// turn waits for the host again.
fn drain_waiting(s: &mut State) -> Result<(), String> {
    while s.pending.is_none() && !s.waiting.is_empty() {
        let w = s.waiting.remove(0);
        ask(s, w.number, &w.sender, &w.text)?;
    }
    Ok(())
}

impl Guest for Agent {
    fn on_message(msg: Message) -> Result<(), String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let mut s = load()?;
        if let Some(p) = s.pending.take() {
            // Only the host's reply to the proposal decides it: `result: …`
            // from `capstan endow`, anything else a refusal.
            let decides = msg.sender == "HOST"
                && match p.proposal {
                    Some(n) => host::replies_to(msg.number, n),
                    None => true,
                };
            if decides {
                let is_error = !msg.text.starts_with("result:");
                s.messages.push(Msg::ToolResult {
                    call_id: p.call_id,
                    name: p.name,
                    content: msg.text,
                    is_error,
                });
                if !run_calls(&mut s, p.rest)? {
                    converse(&mut s)?;
                }
                return drain_waiting(&mut s);
            }
            s.pending = Some(p);
            let held: usize = s.waiting.iter().map(|w| w.text.len()).sum();
            if s.waiting.len() >= MAX_WAITING || held + msg.text.len() > MAX_WAITING_BYTES {
                host::reply(
                    msg.number,
                    "I am waiting for my host's decision on a proposal and hold too many messages already; ask me again after it.",
                )?;
                return Ok(());
            }
            s.waiting.push(Waiting {
                number: msg.number,
                sender: msg.sender,
                text: msg.text,
            });
            return save(&mut s);
        }
        if s.waiting.is_empty() {
            return ask(&mut s, msg.number, &msg.sender, &msg.text);
        }
        // Mail left waiting (a turn after a decision was cut short) goes
        // first, in order.
        s.waiting.push(Waiting {
            number: msg.number,
            sender: msg.sender,
            text: msg.text,
        });
        drain_waiting(&mut s)
    }
}

export!(Agent);
