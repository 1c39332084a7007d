//! Evaluation: JavaScript run by the installed evaluator component (a guest
//! of the `capstan:evaluator` world embedding Boa) with only the
//! capabilities a host binds to the code's slots — Endo's `eval`, and the
//! way a host answers an LLM agent's code proposal (`endow`).
//!
//! ```text
//!  capstan eval SRC reader=inbox-reader     capstan endow 7 --bind reader=x
//!        │                                       │ reads message 7: "definition: …\n{json}"
//!        └──────────────┬────────────────────────┘
//!                       ▼
//!   evaluate(host, evaluator, source, bindings, constants)
//!     evaluator.eval(source, [slot{name, kind, methods}], constants)
//!        └─ slot method call ─► host.invoke(slot, method, args) ─► only
//!           the bound capability, as the host, bounded per run
//!                       │
//!   endow: the result (or the error) is mailed back as a reply to message 7
//! ```
//!
//! A slot's methods depend on what it designates: a value has `text()`,
//! `json()`, `size()`; an http capability `fetch(url, {method, body,
//! headers})`; a directory `list()`, `read(name)`; an agent (host or
//! guest) `list()`, `read(name)`, `inbox()`, `send(text)`.

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::{FormulaId, RequestId};
use serde::Deserialize;
use serde_json::{Value, json};
use wasmtime::Store;

use super::bindings::evaluator::capstan::evaluator::host as eval_host;
use super::bindings::evaluator::exports::capstan::evaluator::evaluator::Slot;
use super::host::{Deadline, Limiter, arm_with, guest_log, stop_reason};
use super::{CallLimits, GuestHost, World, manifest_of};
use crate::ValueKind;
use crate::agent::AgentHandle;
use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::model;
use crate::names::Path;
use crate::records::BodyRec;
use crate::records::DedupAnswer;
use crate::types::MessageBodyView;

/// Largest source accepted.
pub const MAX_SOURCE: usize = 256 * 1024;
/// Most slots an evaluation binds.
pub const MAX_SLOTS: usize = 32;
/// Most capability calls one evaluation makes.
pub const MAX_INVOKES: u32 = 1000;
/// Largest answer of one capability call, and largest result.
pub const MAX_ANSWER: usize = 1 << 20;
/// Largest constants object (JSON).
pub const MAX_CONSTANTS: usize = 1 << 20;
/// The first line of a code proposal (what the LLM agent mails its host).
pub const PROPOSAL_PREFIX: &str = "definition:";

/// What an evaluation answers.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOutcome {
    /// Ok: the JSON of the completion value; Err: what the code threw.
    pub result: Result<String, String>,
    pub fuel: u64,
    pub invokes: u32,
    /// Nanoseconds to make the instance (store, pre-instantiated component).
    pub instantiate_ns: u64,
    /// Nanoseconds the evaluation ran (capability calls included).
    pub run_ns: u64,
    /// For `endow`: the number of the reply mailed to the proposer.
    pub reply: Option<u64>,
    /// For [`AgentHandle::evaluate_as`]: the eval result stored.
    pub stored: Option<capstan_proto::FormulaId>,
}

/// A capability bound to a slot: a path in the host's names.
#[derive(Debug, Clone)]
struct Bound {
    path: String,
    /// What `path` named when it was bound (the http capability's id).
    id: capstan_proto::FormulaId,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    Http,
    Directory,
    Agent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Value => "value",
            Kind::Http => "http",
            Kind::Directory => "directory",
            Kind::Agent => "agent",
        }
    }

    fn methods(self) -> &'static [&'static str] {
        match self {
            Kind::Value => &["text", "json", "size"],
            Kind::Http => &["fetch"],
            Kind::Directory => &["list", "read"],
            Kind::Agent => &["list", "read", "inbox", "send"],
        }
    }
}

/// The store data of an evaluator instance.
pub(crate) struct EvalState {
    host: AgentHandle,
    slots: BTreeMap<String, Bound>,
    req: RequestId,
    invokes: u32,
    logs: u32,
    pub(crate) limiter: Limiter,
    gh: Arc<GuestHost>,
    panic: Option<String>,
    deadline: Arc<Deadline>,
    /// Set when a dependency of the run is cancelled: the run stops.
    stop: Arc<StopFlag>,
}

impl EvalState {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.gh.tokio.block_on(f)
    }

    /// A request id per capability call, derived from the evaluation's: a
    /// retried evaluation (same request id) sends its mail once.
    fn call_req(&self) -> RequestId {
        let mut h = blake3::Hasher::new_derive_key("capstan evaluation call v1");
        h.update(&self.req.0);
        h.update(&self.invokes.to_be_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        RequestId(out)
    }

    fn dispatch(&mut self, slot: &str, method: &str, args: &[Value]) -> Result<Value, String> {
        let Some(b) = self.slots.get(slot).cloned() else {
            return Err(format!("no capability is bound to the slot {slot:?}"));
        };
        if !b.kind.methods().contains(&method) {
            return Err(format!(
                "{slot} ({}) has no method {method:?}; it has {}",
                b.kind.name(),
                b.kind.methods().join(", ")
            ));
        }
        let str_arg = |i: usize, what: &str| -> Result<String, String> {
            args.get(i)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    format!(
                        "{slot}.{method}: argument {} ({what}) must be a string",
                        i + 1
                    )
                })
        };
        let host = self.host.clone();
        let e = |e: Error| e.to_string();
        match (b.kind, method) {
            (Kind::Value, "text") => {
                let (_, bytes) = self.block(host.cat(&b.path)).map_err(e)?;
                Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            }
            (Kind::Value, "json") => {
                let (_, bytes) = self.block(host.cat(&b.path)).map_err(e)?;
                serde_json::from_slice(&bytes)
                    .map_err(|err| format!("{slot}.json(): the value is not JSON: {err}"))
            }
            (Kind::Value, "size") => {
                let (_, bytes) = self.block(host.cat(&b.path)).map_err(e)?;
                Ok(json!(bytes.len()))
            }
            (Kind::Http, "fetch") => {
                let url = str_arg(0, "a URL")?;
                let opts = args.get(1).cloned().unwrap_or(Value::Null);
                let method = opts
                    .get("method")
                    .and_then(Value::as_str)
                    .unwrap_or("GET")
                    .to_string();
                let body = opts
                    .get("body")
                    .and_then(Value::as_str)
                    .map(|s| s.as_bytes().to_vec());
                let headers = opts
                    .get("headers")
                    .cloned()
                    .unwrap_or_else(|| json!({}))
                    .to_string();
                let deadline = self.deadline.clone();
                // A request waits for the outside: a cancel stops the wait.
                let r = deadline.excluding(|| {
                    self.block_stoppable(super::http::guest_request(
                        &host,
                        Some(b.id),
                        method,
                        url,
                        headers,
                        body,
                        None,
                    ))
                })?;
                Ok(json!({
                    "status": r.status,
                    "headers": serde_json::from_str::<Value>(&r.headers_json).unwrap_or(Value::Null),
                    "body": String::from_utf8_lossy(&r.body),
                }))
            }
            (Kind::Directory, "list") => {
                let entries = self.block(host.list(&b.path)).map_err(e)?;
                Ok(json!(
                    entries.iter().map(|x| x.name.clone()).collect::<Vec<_>>()
                ))
            }
            (Kind::Directory, "read") => {
                let name = str_arg(0, "a name")?;
                if !crate::names::is_pet_name(&name) {
                    return Err(format!("{slot}.read: {name:?} is not a name"));
                }
                let (_, bytes) = self
                    .block(host.cat(&format!("{}.{name}", b.path)))
                    .map_err(e)?;
                Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            }
            (Kind::Agent, "list") => {
                let a = self.block(host.agent(&b.path)).map_err(e)?;
                let entries = self.block(a.list("")).map_err(e)?;
                Ok(json!(
                    entries.iter().map(|x| x.name.clone()).collect::<Vec<_>>()
                ))
            }
            (Kind::Agent, "read") => {
                let name = str_arg(0, "a name")?;
                if !crate::names::is_pet_name(&name) {
                    return Err(format!("{slot}.read: {name:?} is not a name"));
                }
                let a = self.block(host.agent(&b.path)).map_err(e)?;
                let (_, bytes) = self.block(a.cat(&name)).map_err(e)?;
                Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            }
            (Kind::Agent, "inbox") => {
                let a = self.block(host.agent(&b.path)).map_err(e)?;
                let msgs = self.block(a.inbox(None)).map_err(e)?;
                Ok(Value::Array(
                    msgs.iter()
                        .map(|m| {
                            let (kind, text) = match &m.body {
                                MessageBodyView::Package { strings, names } => {
                                    ("package", package_text(strings, names))
                                }
                                MessageBodyView::Request { description, .. } => {
                                    ("request", description.clone())
                                }
                            };
                            json!({"number": m.number, "from": m.from, "to": m.to,
                                   "kind": kind, "text": text})
                        })
                        .collect(),
                ))
            }
            (Kind::Agent, "send") => {
                let text = str_arg(0, "the text")?;
                if text.len() > crate::types::MAX_MESSAGE_TEXT {
                    return Err(format!(
                        "{slot}.send: the text has {} bytes; at most {} fit a message",
                        text.len(),
                        crate::types::MAX_MESSAGE_TEXT
                    ));
                }
                let req = self.call_req();
                let n = self
                    .block(host.send(req, &b.path, vec![text], vec![], None))
                    .map_err(e)?;
                Ok(json!(n))
            }
            _ => Err(format!(
                "{slot}.{method}: not a method of {}",
                b.kind.name()
            )),
        }
    }
}

/// The text of a package: its chunks with `@name` where references were.
pub(crate) fn package_text(strings: &[String], names: &[String]) -> String {
    let mut out = String::new();
    for (i, s) in strings.iter().enumerate() {
        out.push_str(s);
        if let Some(n) = names.get(i) {
            out.push('@');
            out.push_str(n);
        }
    }
    out
}

impl eval_host::Host for EvalState {
    fn log(&mut self, level: eval_host::LogLevel, message: String) -> wasmtime::Result<()> {
        guest_log(
            &mut self.logs,
            &mut self.panic,
            "evaluator",
            level as u8,
            &message,
        );
        Ok(())
    }

    fn invoke(
        &mut self,
        slot: String,
        method: String,
        args_json: String,
    ) -> wasmtime::Result<Result<String, String>> {
        if self.invokes >= MAX_INVOKES {
            return Err(crate::guest::host::GuestStop::limit(format!(
                "capability call limit: the code made more than {MAX_INVOKES} capability calls"
            )));
        }
        self.invokes += 1;
        if args_json.len() > MAX_ANSWER {
            return Ok(Err(format!(
                "{slot}.{method}: the arguments have {} bytes; at most {MAX_ANSWER}",
                args_json.len()
            )));
        }
        let args: Vec<Value> = match serde_json::from_str(&args_json) {
            Ok(Value::Array(a)) => a,
            _ => {
                return Ok(Err(format!(
                    "{slot}.{method}: arguments must be a JSON array"
                )));
            }
        };
        let r = self.dispatch(&slot, &method, &args).and_then(|v| {
            let s = v.to_string();
            if s.len() > MAX_ANSWER {
                Err(format!(
                    "{slot}.{method}: the answer has {} bytes; at most {MAX_ANSWER} reach the code",
                    s.len()
                ))
            } else {
                Ok(s)
            }
        });
        Ok(r)
    }
}

impl AgentHandle {
    /// Runs `source` in the installed evaluator component `evaluator` (a
    /// path in this host's names) with `bindings` (slot → path in this
    /// host's names) and `constants` (global values).
    pub async fn evaluate(
        &self,
        req: RequestId,
        evaluator: &str,
        source: &str,
        bindings: &[(String, String)],
        constants: BTreeMap<String, Value>,
    ) -> Result<EvalOutcome, Error> {
        self.evaluate_with_deps(req, evaluator, source, bindings, constants)
            .await
            .map(|(o, _)| o)
    }

    /// [`evaluate`](Self::evaluate), also answering what the evaluation
    /// depended on: each slot's formula (with its path) and the evaluator.
    async fn evaluate_with_deps(
        &self,
        req: RequestId,
        evaluator: &str,
        source: &str,
        bindings: &[(String, String)],
        constants: BTreeMap<String, Value>,
    ) -> Result<(EvalOutcome, Vec<(FormulaId, String)>), Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can evaluate code".into()));
        }
        if source.len() > MAX_SOURCE {
            return Err(Error::TooLarge {
                what: "source".into(),
                len: source.len(),
                max: MAX_SOURCE,
            });
        }
        if bindings.len() > MAX_SLOTS {
            return Err(Error::TooLarge {
                what: "slots".into(),
                len: bindings.len(),
                max: MAX_SLOTS,
            });
        }
        let constants_json = serde_json::to_string(&constants)
            .map_err(|e| Error::Invalid(format!("constants: {e}")))?;
        if constants_json.len() > MAX_CONSTANTS {
            return Err(Error::TooLarge {
                what: "constants".into(),
                len: constants_json.len(),
                max: MAX_CONSTANTS,
            });
        }
        let mut slots = BTreeMap::new();
        for (slot, path) in bindings {
            if !crate::names::is_pet_name(slot) || constants.contains_key(slot) {
                return Err(Error::Invalid(format!(
                    "{slot:?} cannot be a slot: slots are names (lower case, digits, -) used once"
                )));
            }
            let info = self.show(path).await?;
            let kind = match info.kind.as_str() {
                "value" => {
                    if super::http::spec_of(self, info.id).await?.is_some() {
                        Kind::Http
                    } else {
                        Kind::Value
                    }
                }
                "directory" => Kind::Directory,
                "host" | "guest" => Kind::Agent,
                other => {
                    return Err(Error::Invalid(format!(
                        "{path:?} is a {other}; a slot can hold a value, an http capability, a directory or an agent"
                    )));
                }
            };
            if slots
                .insert(
                    slot.clone(),
                    Bound {
                        path: path.clone(),
                        id: info.id,
                        kind,
                    },
                )
                .is_some()
            {
                return Err(Error::Invalid(format!("slot {slot:?} is bound twice")));
            }
        }
        let (component, m) = manifest_of(self, evaluator).await.map_err(|e| match e {
            Error::UnknownName(_) => Error::Invalid(format!(
                "no evaluator is installed as {evaluator:?}: install one with `capstan install guests/out/evaluator.wasm --name {evaluator}`"
            )),
            e => e,
        })?;
        let (gh, c) = super::compiled_of(
            self.inner(),
            &m,
            World::Evaluator,
            &format!("{evaluator:?}"),
        )
        .await?;
        let state = EvalState {
            host: self.clone(),
            slots,
            req,
            invokes: 0,
            logs: 0,
            limiter: Limiter::new(&gh),
            gh: gh.clone(),
            panic: None,
            deadline: Deadline::new(),
            stop: Arc::new(StopFlag::default()),
        };
        let mut deps: Vec<(FormulaId, String)> = state
            .slots
            .values()
            .map(|b| (b.id, b.path.clone()))
            .collect();
        deps.push((component, evaluator.to_string()));
        let source = source.to_string();
        // A run stops when one of its dependencies is cancelled (`stop`).
        let stop = state.stop.clone();
        let watcher = tokio::spawn(watch_deps(self.clone(), deps.clone(), stop.clone()));
        let outcome =
            tokio::task::spawn_blocking(move || run(&gh, &c, state, source, constants_json)).await;
        watcher.abort();
        if let Some(why) = stop.why() {
            return Err(Error::Cancelled(why));
        }
        let outcome =
            outcome.map_err(|e| Error::Unavailable(format!("evaluator task failed: {e}")))??;
        Ok((outcome, deps))
    }

    /// [`evaluate`](Self::evaluate), then the result stored as a value at
    /// `result` (a path in this host's names; JSON, or text if the
    /// completion value is not JSON) with what it depends on: an **eval
    /// result**. Cancelling any formula a slot held, or the evaluator,
    /// cancels it (`crate::cancel`). Code that throws stores nothing.
    ///
    /// The store refuses the result if one of its dependencies was
    /// cancelled (or collected) since the evaluation started: it reads
    /// each dependency's formula in the transaction that stores the
    /// result, so a cancel that marks one conflicts with it. With the
    /// cancel's final re-scan, a result made while a cancel runs is
    /// either cancelled by it or refused.
    pub async fn evaluate_as(
        &self,
        req: RequestId,
        evaluator: &str,
        source: &str,
        bindings: &[(String, String)],
        result: &str,
    ) -> Result<EvalOutcome, Error> {
        let p = Path::parse_writable(result)?;
        // A retry of a request already answered: the result stored then.
        let me = self.id();
        let earlier = self
            .inner()
            .db
            .read(move |tx| Box::pin(async move { model::dedup_get(tx, &me, &req).await }))
            .await?;
        if let Some(DedupAnswer::Id(id)) = earlier {
            let (_, data) = self.value_by_id(id).await?;
            return Ok(EvalOutcome {
                result: Ok(String::from_utf8_lossy(&data).into_owned()),
                fuel: 0,
                invokes: 0,
                instantiate_ns: 0,
                run_ns: 0,
                reply: None,
                stored: Some(id),
            });
        }
        let (mut outcome, deps) = self
            .evaluate_with_deps(req, evaluator, source, bindings, BTreeMap::new())
            .await?;
        let Ok(json) = &outcome.result else {
            return Ok(outcome);
        };
        let kind = if serde_json::from_str::<Value>(json).is_ok() {
            ValueKind::Json
        } else {
            ValueKind::Text
        };
        let data = Arc::new(json.clone().into_bytes());
        let hash = *blake3::hash(&data).as_bytes();
        let id = FormulaId::random();
        let ctx = self.ctx().clone();
        let deps = Arc::new(deps);
        let inline = self.inner().inline_values();
        let stored = self
            .transact(move |tx| {
                let (ctx, p, data, deps) = (ctx.clone(), p.clone(), data.clone(), deps.clone());
                Box::pin(async move {
                    if let Some(DedupAnswer::Id(prev)) = model::dedup_get(tx, &ctx.id, &req).await? {
                        return Ok(prev);
                    }
                    let ids: Vec<FormulaId> = deps.iter().map(|(d, _)| *d).collect();
                    let ahead: Vec<Vec<u8>> = ids.iter().map(keys::formula).collect();
                    tx.prefetch(&ahead).await?;
                    for (d, path) in deps.iter() {
                        match model::get_formula(tx, d).await? {
                            None => {
                                return Err(Error::Invalid(format!(
                                    "{path} no longer exists (collected as garbage); the result was not stored"
                                )));
                            }
                            Some(f) => {
                                if let Some(c) = &f.cancelled {
                                    return Err(crate::records::cancelled_error(
                                        path,
                                        c,
                                        ": the result depends on it and was not stored",
                                    ));
                                }
                            }
                        }
                    }
                    let dir = model::parent_dir(tx, &ctx, &p).await?;
                    model::put_value(tx, &id, kind, (&data, hash), now_ms(), inline).await?;
                    model::set_name_new(tx, &dir, p.last(), &id).await?;
                    // The record references its dependencies (the write
                    // barrier of garbage collection).
                    model::note_refs(tx, &ids).await?;
                    let mut rec = Vec::with_capacity(ids.len() * 32);
                    for d in &ids {
                        rec.extend_from_slice(d.as_bytes());
                    }
                    tx.set(&keys::eval_deps(&id), &rec)?;
                    model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now_ms())?;
                    Ok(id)
                })
            })
            .await?;
        outcome.stored = Some(stored);
        Ok(outcome)
    }

    /// Answers the code proposal in message `number` of this host's inbox:
    /// runs its source with `bindings` filling its slots (each slot bound,
    /// none extra) and mails the result — or the error — back to the
    /// proposer as a reply. A proposal is answered once.
    pub async fn endow(
        &self,
        req: RequestId,
        evaluator: &str,
        number: u64,
        bindings: &[(String, String)],
    ) -> Result<EvalOutcome, Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can endow code".into()));
        }
        // Message `number` and what came after it (a reply comes later),
        // as records: no names are looked up but the proposer's.
        let ctx = self.ctx().clone();
        let found = self
            .inner()
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let msgs = model::list_messages(tx, &ctx.id, number).await?;
                    let Some(msg) = msgs.first().filter(|m| m.number == number).cloned() else {
                        return Ok(None);
                    };
                    let answered = msgs
                        .iter()
                        .find(|m| m.reply_to == Some(msg.message_id) && m.from == ctx.id)
                        .map(|m| m.number);
                    // A proposer waits for one decision at a time: a newer
                    // proposal of its own means it no longer waits for this one.
                    let superseded = msgs
                        .iter()
                        .find(|m| m.number > number && m.from == msg.from && is_proposal(m))
                        .map(|m| m.number);
                    let sender = model::name_for(tx, &ctx, &msg.from).await?;
                    Ok::<_, Error>(Some((msg, answered, superseded, sender)))
                })
            })
            .await?;
        let Some((msg, answered, superseded, sender)) = found else {
            return Err(Error::Invalid(format!(
                "there is no message {number} in the inbox; see `capstan inbox`"
            )));
        };
        let BodyRec::Package { strings, names, .. } = &msg.body else {
            return Err(Error::Invalid(format!(
                "message {number} is a request, not a code proposal; answer it with resolve or reject"
            )));
        };
        if msg.from == self.id() {
            return Err(Error::Invalid(format!(
                "message {number} is one you sent; endow a proposal you received"
            )));
        }
        if let Some(r) = answered {
            return Err(Error::Invalid(format!(
                "message {number} was already answered (message {r}); {sender} has your decision"
            )));
        }
        if let Some(r) = superseded {
            return Err(Error::Invalid(format!(
                "the proposal in message {number} is no longer pending: {sender} proposed again since (message {r}) and waits for a decision on that one"
            )));
        }
        let p = parse_proposal(&package_text(strings, names))?;
        let wanted: Vec<&String> = p.slots.keys().collect();
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|s| !bindings.iter().any(|(b, _)| b == **s))
            .map(|s| s.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "the proposal needs the slots {}; bind each with --bind SLOT=NAME (missing: {})",
                wanted
                    .iter()
                    .map(|s| format!("{s} ({:?})", p.slots[*s]))
                    .collect::<Vec<_>>()
                    .join(", "),
                missing.join(", ")
            )));
        }
        if let Some((extra, _)) = bindings.iter().find(|(b, _)| !p.slots.contains_key(b)) {
            return Err(Error::Invalid(format!(
                "the proposal has no slot {extra:?}; its slots are {}",
                if wanted.is_empty() {
                    "none".to_string()
                } else {
                    wanted
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        let mut outcome = self
            .evaluate(req, evaluator, &p.source, bindings, p.values)
            .await?;
        let text = match &outcome.result {
            Ok(json) => format!("result: {json}"),
            Err(e) => format!("error: {e}"),
        };
        let text: String = if text.len() > crate::types::MAX_MESSAGE_TEXT {
            let mut t = text;
            let mut cut = crate::types::MAX_MESSAGE_TEXT - 64;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push_str(" … (cut: the result is too long for a message)");
            t
        } else {
            text
        };
        let n = self.send(req, "", vec![text], vec![], Some(number)).await?;
        outcome.reply = Some(n);
        Ok(outcome)
    }
}

/// Runs one evaluation (blocking).
fn run(
    gh: &Arc<GuestHost>,
    c: &super::Compiled,
    state: EvalState,
    source: String,
    constants_json: String,
) -> Result<EvalOutcome, Error> {
    let Some(pre) = c.evaluator.as_ref() else {
        return Err(Error::Invalid("not an evaluator component".into()));
    };
    let limits = CallLimits::node(gh);
    let slots: Vec<Slot> = state
        .slots
        .iter()
        .map(|(name, b)| Slot {
            name: name.clone(),
            kind: b.kind.name().to_string(),
            methods: b.kind.methods().iter().map(|m| m.to_string()).collect(),
        })
        .collect();
    let t0 = std::time::Instant::now();
    let deadline = state.deadline.clone();
    let mut store = Store::new(&gh.engine, state);
    store.limiter(|s| &mut s.limiter);
    let mut t1 = t0;
    let stop = store.data().stop.clone();
    let r = arm_with(&mut store, limits, &deadline, move || stop.tick()).and_then(|_| {
        let inst = pre.instantiate(&mut store)?;
        t1 = std::time::Instant::now();
        inst.capstan_evaluator_evaluator()
            .call_eval(&mut store, &source, &slots, &constants_json)
    });
    let t2 = std::time::Instant::now();
    let fuel = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
    let result = match r {
        Err(e) => {
            return Err(Error::Invalid(format!(
                "the evaluator was stopped: {}",
                stop_reason(&e, limits, store.data().panic.as_deref())
            )));
        }
        Ok(Ok(json)) if json.len() > MAX_ANSWER => Err(format!(
            "the result has {} bytes; at most {MAX_ANSWER}",
            json.len()
        )),
        Ok(r) => r,
    };
    Ok(EvalOutcome {
        result,
        fuel,
        invokes: store.data().invokes,
        instantiate_ns: (t1 - t0).as_nanos() as u64,
        run_ns: (t2 - t1).as_nanos() as u64,
        reply: None,
        stored: None,
    })
}

mod proposal;
mod stop;
use proposal::*;
use stop::{StopFlag, watch_deps};

#[cfg(test)]
mod tests;
