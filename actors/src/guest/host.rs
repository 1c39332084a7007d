//! The host side of the worlds: store data of an instance, its limits, and
//! the imports a guest calls.

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::FormulaId;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};

use super::bindings::agent::capstan::agent as agent_wit;
use super::bindings::tool::capstan::tool::host as tool_host;
use super::bindings::tool::exports::capstan::tool::tool as tool_exports;
use super::journal::{self, Entry, Journal};
use super::{CallLimits, GuestHost, Manifest, World, derived_request};
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::model;
use crate::records::DedupAnswer;
use crate::records::FormulaKind;
use crate::types::ValueKind;

/// Most log lines a guest may write per call.
const MAX_LOGS: u32 = 1000;
/// Longest log line kept.
const MAX_LOG_LINE: usize = 1000;
/// Largest value a guest may store.
const MAX_GUEST_VALUE: usize = 1 << 20;
/// Most names `list` answers.
const MAX_LIST: usize = 1000;
/// Deepest chain of tool-invoke.
const MAX_TOOL_DEPTH: u32 = 4;
/// Longest panic message kept for the stop reason.
const MAX_PANIC_TEXT: usize = 500;

/// Remembers a guest's panic message: its panic hook logs it at error level
/// as `panicked: …` just before the `unreachable` trap (wasm32-unknown-unknown
/// has no unwinding), so the stop reason can say what happened.
pub(crate) fn note_panic(slot: &mut Option<String>, level: u8, message: &str) {
    if level >= 4
        && slot.is_none()
        && let Some(m) = message.strip_prefix("panicked")
    {
        let m = m.trim_start_matches([':', ' ']);
        *slot = Some(m.chars().take(MAX_PANIC_TEXT).collect());
    }
}

/// A capability in an instance's resource table: what one of the guest's
/// names designated when the guest looked it up.
#[derive(Debug)]
pub struct CapabilityRep {
    path: String,
    id: FormulaId,
    kind: String,
}

/// Memory and table limits of one instance; remembers the peak.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory: usize,
    table: usize,
    pub peak: usize,
}

impl Limiter {
    pub(crate) fn new(gh: &GuestHost) -> Limiter {
        Limiter {
            memory: gh.limits().memory,
            table: gh.limits().table_elements,
            peak: 0,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            return Err(wasmtime::format_err!(
                "memory limit: tried to grow its memory to {} bytes; the limit is {} bytes",
                desired,
                self.memory
            ));
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table {
            return Err(wasmtime::format_err!(
                "table limit: tried to grow a table to {desired} elements; the limit is {}",
                self.table
            ));
        }
        Ok(true)
    }
}

/// What an earlier, cut-short run of the same message left: the answers to
/// give back instead of calling again.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    entries: BTreeMap<u32, Entry>,
    /// Writes may still have been made by the earlier run: look up their
    /// exactly-once records before writing.
    writes: bool,
}

impl Replay {
    /// A replay of `loaded`; `wrote` if the earlier run's first write is
    /// recorded.
    pub(crate) fn new(loaded: &[(u32, Entry)], wrote: bool) -> Option<Replay> {
        (!loaded.is_empty() || wrote).then(|| Replay {
            entries: loaded.iter().cloned().collect(),
            writes: wrote,
        })
    }
}

/// The store data of an agent-world instance: acting as the guest.
pub(crate) struct AgentState {
    agent: AgentHandle,
    number: u64,
    /// Writes made (the index in their derived request ids).
    calls: u32,
    /// Host calls made (the index in the journal).
    index: u32,
    journal: Arc<Journal>,
    replay: Option<Replay>,
    logs: u32,
    table: ResourceTable,
    held: usize,
    max_held: usize,
    max_message: usize,
    pub(crate) limiter: Limiter,
    tokio: tokio::runtime::Handle,
    pub(crate) panic: Option<String>,
    pub(crate) deadline: Arc<Deadline>,
}

impl AgentState {
    pub(crate) fn new(
        gh: &GuestHost,
        mut agent: AgentHandle,
        number: u64,
        journal: Arc<Journal>,
        replay: Option<Replay>,
    ) -> AgentState {
        agent.journal = Some(journal.clone());
        AgentState {
            agent,
            number,
            calls: 0,
            index: 0,
            journal,
            replay,
            logs: 0,
            table: ResourceTable::new(),
            held: 0,
            max_held: gh.limits().capabilities,
            max_message: gh.limits().message,
            limiter: Limiter::new(gh),
            tokio: gh.tokio.clone(),
            panic: None,
            deadline: Deadline::new(),
        }
    }

    fn req(&mut self) -> capstan_proto::RequestId {
        self.calls += 1;
        derived_request(&self.agent.id(), self.number, self.calls)
    }

    /// The index of the host call being made, and its answer from an
    /// earlier run if there is one.
    fn call(&mut self) -> (u32, Option<Entry>) {
        self.index += 1;
        let i = self.index;
        (
            i,
            self.replay
                .as_ref()
                .and_then(|r| r.entries.get(&i).cloned()),
        )
    }

    /// Journals the answer of call `i`.
    fn record(&mut self, i: u32, entry: Entry) -> wasmtime::Result<()> {
        self.journal
            .record(i, entry)
            .map_err(|m| wasmtime::format_err!(m))
    }

    /// A write: answered from its exactly-once record if an earlier run
    /// made it, else made now. Failures are journaled.
    fn write(
        &mut self,
        what: impl FnOnce(&Self, capstan_proto::RequestId) -> Result<u64, Error>,
    ) -> wasmtime::Result<Result<u64, String>> {
        let (i, earlier) = self.call();
        let req = self.req();
        match earlier {
            Some(Entry::Failed(e)) => return Ok(Err(e)),
            Some(other) => return Err(diverged(i, &other)),
            None => {}
        }
        if self.replay.as_ref().is_some_and(|r| r.writes) {
            let id = self.agent.id();
            let inner = self.agent.inner().clone();
            let recorded = self.block(inner.db.read(move |tx| {
                Box::pin(async move { crate::model::dedup_get(tx, &id, &req).await })
            }));
            match recorded {
                Ok(Some(DedupAnswer::Number(n))) => return Ok(Ok(n)),
                Ok(Some(_)) => return Ok(Ok(0)),
                Ok(None) => {
                    // past the earlier run's last write: live from here
                    if let Some(r) = self.replay.as_mut() {
                        r.writes = false;
                    }
                }
                Err(e) => return Ok(Err(e.to_string())),
            }
        }
        if let Some(open) = &self.agent.open
            && !self.replay.as_ref().is_some_and(|r| r.writes)
        {
            // No earlier run of this message wrote anything from here on
            // (a run's writes commit in order, and this one is past them):
            // its exactly-once record cannot exist yet.
            open.prime(crate::keys::dedup(&self.agent.id(), &req), None);
        }
        match what(self, req) {
            Ok(n) => Ok(Ok(n)),
            Err(e) => {
                let e = e.to_string();
                self.record(i, Entry::Failed(e.clone()))?;
                Ok(Err(e))
            }
        }
    }

    /// A read of a value by name: its answer journaled as the value's id.
    fn read_value(
        &mut self,
        path: &str,
        check: Option<&CapabilityRep>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, String>> {
        let (i, earlier) = self.call();
        match earlier {
            Some(Entry::Value(Ok(Some(id)))) => {
                let id = journal::id_parse(&id).map_err(|e| wasmtime::format_err!("{e}"))?;
                return Ok(self
                    .block(self.agent.value_by_id(id))
                    .map(|(_, d)| Some(d))
                    .map_err(|e| e.to_string()));
            }
            Some(Entry::Value(Ok(None))) => return Ok(Ok(None)),
            Some(Entry::Value(Err(e))) => return Ok(Err(e)),
            Some(other) => return Err(diverged(i, &other)),
            None => {}
        }
        let r = match check.map(|rep| self.still(rep)) {
            Some(Err(e)) => Err(e),
            _ => match self.block(self.agent.cat_value(path)) {
                Ok(v) => Ok(Some(v)),
                Err(Error::UnknownName(_)) if check.is_none() => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        };
        let entry = Entry::Value(match &r {
            Ok(Some((id, _, _))) => Ok(Some(journal::id_text(id))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.clone()),
        });
        self.record(i, entry)?;
        Ok(r.map(|v| v.map(|(_, _, d)| d)))
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.tokio.block_on(f)
    }

    fn check_message(&self, text: &str) -> wasmtime::Result<()> {
        if text.len() > self.max_message {
            return Err(wasmtime::format_err!(
                "message size limit: tried to send a message of {} bytes; the limit is {} bytes",
                text.len(),
                self.max_message
            ));
        }
        Ok(())
    }

    /// The capability's name, if it still designates the same thing.
    fn still(&self, rep: &CapabilityRep) -> Result<(), String> {
        match self.block(self.agent.show(&rep.path)) {
            Ok(e) if e.id == rep.id => Ok(()),
            Ok(_) => Err(format!(
                "{:?} no longer names the capability you hold",
                rep.path
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A guest's `log` import, in every world: counts the line, remembers a
/// panic message, and writes at most [`MAX_LOGS`] lines per call.
pub(crate) fn guest_log(
    logs: &mut u32,
    panic: &mut Option<String>,
    who: &str,
    level: u8,
    message: &str,
) {
    *logs += 1;
    note_panic(panic, level, message);
    if *logs <= MAX_LOGS {
        log_line(who, level, message);
    }
}

pub(crate) fn log_line(who: &str, level: u8, msg: &str) {
    let msg: String = msg.chars().take(MAX_LOG_LINE).collect();
    match level {
        0 => tracing::trace!(guest = who, "{msg}"),
        1 => tracing::debug!(guest = who, "{msg}"),
        2 => tracing::info!(guest = who, "{msg}"),
        3 => tracing::warn!(guest = who, "{msg}"),
        _ => tracing::error!(guest = who, "{msg}"),
    }
}

impl agent_wit::types::Host for AgentState {}

impl agent_wit::host::HostCapability for AgentState {
    fn kind(&mut self, me: Resource<CapabilityRep>) -> wasmtime::Result<String> {
        Ok(self.table.get(&me)?.kind.clone())
    }

    fn read(&mut self, me: Resource<CapabilityRep>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let rep = self.table.get(&me)?;
        let rep = CapabilityRep {
            path: rep.path.clone(),
            id: rep.id,
            kind: rep.kind.clone(),
        };
        Ok(self
            .read_value(&rep.path, Some(&rep))?
            .map(Option::unwrap_or_default))
    }

    fn send(
        &mut self,
        me: Resource<CapabilityRep>,
        text: String,
    ) -> wasmtime::Result<Result<u64, String>> {
        self.check_message(&text)?;
        let rep = self.table.get(&me)?;
        let rep = CapabilityRep {
            path: rep.path.clone(),
            id: rep.id,
            kind: rep.kind.clone(),
        };
        self.write(move |me, req| {
            me.still(&rep).map_err(Error::Invalid)?;
            me.block(me.agent.send(req, &rep.path, vec![text], vec![], None))
        })
    }

    fn drop(&mut self, me: Resource<CapabilityRep>) -> wasmtime::Result<()> {
        self.table.delete(me)?;
        self.held = self.held.saturating_sub(1);
        Ok(())
    }
}

impl agent_wit::host::Host for AgentState {
    fn log(&mut self, level: agent_wit::types::LogLevel, message: String) -> wasmtime::Result<()> {
        let who = self.agent.id().short();
        guest_log(&mut self.logs, &mut self.panic, &who, level as u8, &message);
        Ok(())
    }

    fn list(&mut self) -> wasmtime::Result<Vec<String>> {
        let (i, earlier) = self.call();
        if let Some(e) = earlier {
            return match e {
                Entry::List(names) => Ok(names),
                other => Err(diverged(i, &other)),
            };
        }
        let names: Vec<String> = self
            .block(self.agent.list(""))
            .map(|v| v.into_iter().map(|e| e.name).take(MAX_LIST).collect())
            .unwrap_or_default();
        self.record(i, Entry::List(names.clone()))?;
        Ok(names)
    }

    fn lookup(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<CapabilityRep>, String>> {
        if self.held >= self.max_held {
            return Ok(Err(format!(
                "you already hold {} capabilities; drop some first",
                self.max_held
            )));
        }
        let (i, earlier) = self.call();
        let found = match earlier {
            Some(Entry::Lookup(Ok((id, kind)))) => Ok((
                journal::id_parse(&id).map_err(|e| wasmtime::format_err!("{e}"))?,
                kind,
            )),
            Some(Entry::Lookup(Err(e))) => Err(e),
            Some(other) => return Err(diverged(i, &other)),
            None => {
                let r = self
                    .block(self.agent.show(&name))
                    .map(|e| (e.id, e.kind))
                    .map_err(|e| e.to_string());
                let entry = Entry::Lookup(match &r {
                    Ok((id, kind)) => Ok((journal::id_text(id), kind.clone())),
                    Err(e) => Err(e.clone()),
                });
                self.record(i, entry)?;
                r
            }
        };
        let (id, kind) = match found {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let r = self.table.push(CapabilityRep {
            path: name,
            id,
            kind,
        })?;
        self.held += 1;
        Ok(Ok(r))
    }

    fn send(&mut self, to: String, text: String) -> wasmtime::Result<Result<u64, String>> {
        self.check_message(&text)?;
        self.write(move |me, req| me.block(me.agent.send(req, &to, vec![text], vec![], None)))
    }

    fn reply(&mut self, number: u64, text: String) -> wasmtime::Result<Result<u64, String>> {
        self.check_message(&text)?;
        self.write(move |me, req| {
            me.block(me.agent.send(req, "", vec![text], vec![], Some(number)))
        })
    }

    fn store_text(&mut self, name: String, text: String) -> wasmtime::Result<Result<(), String>> {
        if text.len() > MAX_GUEST_VALUE {
            return Err(wasmtime::format_err!(
                "value size limit: tried to store {} bytes; the limit is {MAX_GUEST_VALUE} bytes",
                text.len()
            ));
        }
        Ok(self
            .write(move |me, req| {
                me.block(
                    me.agent
                        .store(req, &name, ValueKind::Text, text.into_bytes()),
                )
                .map(|_| 0)
            })?
            .map(|_| ()))
    }

    fn replies_to(&mut self, number: u64, to: u64) -> wasmtime::Result<bool> {
        // Message records never change: the answer is the same on a replay,
        // so it needs no journal entry.
        let id = self.agent.id();
        let inner = self.agent.inner().clone();
        let r = self.block(inner.db.read(move |tx| {
            Box::pin(async move {
                let (Some(a), Some(b)) = (
                    tx.get(&crate::keys::message(&id, number)).await?,
                    tx.get(&crate::keys::message(&id, to)).await?,
                ) else {
                    return Ok::<_, Error>(false);
                };
                let a = crate::records::MessageRec::decode(&a)?;
                let b = crate::records::MessageRec::decode(&b)?;
                Ok(a.reply_to == Some(b.message_id))
            })
        }));
        r.map_err(|e| wasmtime::format_err!("cannot read the guest's inbox ({e})"))
    }

    fn read_text(&mut self, name: String) -> wasmtime::Result<Result<Option<String>, String>> {
        Ok(match self.read_value(&name, None)? {
            Ok(Some(b)) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| format!("{name:?} is not text")),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        })
    }
}

/// Largest model request a guest may make (JSON bytes).
const MAX_LLM_REQUEST: usize = 1 << 20;

impl agent_wit::llm::Host for AgentState {
    fn chat(
        &mut self,
        provider: String,
        request: String,
    ) -> wasmtime::Result<Result<String, String>> {
        if request.len() > MAX_LLM_REQUEST {
            return Err(wasmtime::format_err!(
                "model request size limit: tried to send {} bytes; the limit is {MAX_LLM_REQUEST} bytes",
                request.len()
            ));
        }
        let (i, earlier) = self.call();
        match earlier {
            Some(Entry::Llm(r)) => return Ok(r),
            Some(other) => return Err(diverged(i, &other)),
            None => {}
        }
        // What the handler did before the call commits first: the call may
        // take long, and the inbox numbers its messages took must not stay
        // unwritten meanwhile.
        // The wait for the model does not count against the guest's
        // deadline: the call is bounded by the provider's own timeout.
        let deadline = self.deadline.clone();
        deadline.excluding(|| {
            let agent = self.agent.clone();
            if agent.open.is_some()
                && let Err(e) = self.block(agent.make_durable())
            {
                return Err(wasmtime::format_err!(
                    "cannot commit the handler's effects before the model call ({e}); the message is handled again later"
                ));
            }
            let r = match serde_json::from_str::<crate::llm::ChatRequest>(&request) {
                Err(e) => Err(format!(
                    "llm.chat: the request is not valid JSON for a chat: {e}"
                )),
                Ok(req) => self
                    .block(self.agent.llm_chat(&provider, req))
                    .map_err(|e| e.to_string())
                    .and_then(|reply| {
                        serde_json::to_string(&reply.response)
                            .map_err(|e| format!("llm.chat: cannot encode the answer: {e}"))
                    }),
            };
            self.record(i, Entry::Llm(r.clone()))?;
            // A model call costs and does not answer the same twice: its
            // answer is made durable now, not with the next write, so a
            // handler cut short after it replays the answer instead of
            // asking again.
            let agent = self.agent.clone();
            if let Err(e) = self.block(agent.make_durable()) {
                return Err(wasmtime::format_err!(
                    "cannot record the model's answer ({e}); the message is handled again later"
                ));
            }
            Ok(r)
        })
    }
}

impl agent_wit::search::Host for AgentState {
    fn search(
        &mut self,
        capability: String,
        query: String,
        k: u32,
    ) -> wasmtime::Result<Result<String, String>> {
        if query.len() > crate::search::MAX_QUERY_BYTES * 4 {
            return Err(wasmtime::format_err!(
                "search query size limit: tried to send {} bytes; the limit is {} bytes",
                query.len(),
                crate::search::MAX_QUERY_BYTES
            ));
        }
        let (i, earlier) = self.call();
        match earlier {
            Some(Entry::Search(r)) => return Ok(r),
            Some(other) => return Err(diverged(i, &other)),
            None => {}
        }
        // A search builds its index on first use: its time does not count
        // against the guest's deadline (it is bounded by the index's caps).
        let deadline = self.deadline.clone();
        deadline.excluding(|| {
            let r = self
                .block(self.agent.search(&capability, &query, k))
                .map_err(|e| e.to_string())
                .and_then(|a| {
                    serde_json::to_string(&a.to_json())
                        .map_err(|e| format!("search: cannot encode the answer: {e}"))
                });
            self.record(i, Entry::Search(r.clone()))?;
            Ok(r)
        })
    }
}

/// The error of a guest whose replay does not retrace its earlier run.
fn diverged(i: u32, earlier: &Entry) -> wasmtime::Error {
    wasmtime::format_err!(
        "the guest took another path than its earlier run of this message (call {i} was {earlier:?}); guests must be deterministic"
    )
}

/// What one guest call came to.
pub(crate) struct Outcome {
    pub fuel: u64,
    pub memory: u64,
    pub instantiate_ns: u64,
    pub call_ns: u64,
    /// Ok: the handler's own answer; Err: why the guest was stopped.
    pub result: Result<Result<(), String>, String>,
}

pub(crate) fn stop_reason(e: &wasmtime::Error, limits: CallLimits, panic: Option<&str>) -> String {
    if let (Some(p), Some(Trap::UnreachableCodeReached)) = (panic, e.downcast_ref::<Trap>()) {
        return format!("it panicked: {p}");
    }
    if let Some(t) = e.downcast_ref::<Trap>() {
        return match t {
            Trap::OutOfFuel => format!(
                "fuel limit: it used all of its {} units of fuel for one call (an endless loop?)",
                limits.fuel
            ),
            Trap::Interrupt => format!(
                "deadline: it ran past its deadline of {} ms of wall-clock time for one call",
                limits.wall.as_millis()
            ),
            other => format!("it trapped: {other}"),
        };
    }
    // the root cause first: limit errors raised by the host
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    if let Some(c) = chain.iter().find(|c| c.contains("limit:")) {
        return c.clone();
    }
    if let Some(c) = chain.iter().find(|c| c.contains("handle")) {
        return format!("capability handle: it used a handle it does not hold ({c})");
    }
    format!("{e:#}")
}

/// The wall-clock deadline of one guest call. It bounds the guest's own
/// running time: time spent in a host call that waits for the outside (a
/// model call, an HTTP request; each bounded by its own timeout) pushes it
/// back by as long.
#[derive(Debug)]
pub(crate) struct Deadline(std::sync::Mutex<std::time::Instant>);

impl Deadline {
    pub(crate) fn new() -> Arc<Deadline> {
        Arc::new(Deadline(std::sync::Mutex::new(std::time::Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::time::Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call starts: the deadline is `wall` from now.
    fn start(&self, wall: std::time::Duration) {
        *self.lock() = std::time::Instant::now() + wall;
    }

    fn passed(&self) -> bool {
        std::time::Instant::now() >= *self.lock()
    }

    /// Runs `f` (a host call waiting for the outside) without counting its
    /// time against the deadline.
    pub(crate) fn excluding<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = std::time::Instant::now();
        let r = f();
        *self.lock() += t.elapsed();
        r
    }
}

/// Sets the fuel and the wall-clock deadline of a store for one call.
pub(crate) fn arm<T>(
    store: &mut Store<T>,
    limits: CallLimits,
    deadline: &Arc<Deadline>,
) -> wasmtime::Result<()> {
    arm_with(store, limits, deadline, || Ok(()))
}

/// [`arm`], with `tick` run at every epoch tick the guest runs through.
pub(crate) fn arm_with<T>(
    store: &mut Store<T>,
    limits: CallLimits,
    deadline: &Arc<Deadline>,
    mut tick: impl FnMut() -> wasmtime::Result<()> + Send + Sync + 'static,
) -> wasmtime::Result<()> {
    store.set_fuel(limits.fuel)?;
    deadline.start(limits.wall);
    let d = deadline.clone();
    store.epoch_deadline_callback(move |_| {
        if d.passed() {
            return Err(Trap::Interrupt.into());
        }
        tick()?;
        Ok(wasmtime::UpdateDeadline::Continue(1))
    });
    store.set_epoch_deadline(1);
    Ok(())
}

/// Runs the agent component on one message (blocking).
pub(crate) fn call_agent(
    gh: &GuestHost,
    pre: &super::bindings::agent::LlmAgentPre<AgentState>,
    agent: AgentHandle,
    msg: agent_wit::types::Message,
    limits: CallLimits,
    journal: Arc<Journal>,
    replay: Option<Replay>,
) -> Outcome {
    let fuel = limits.fuel;
    let t0 = std::time::Instant::now();
    let state = AgentState::new(gh, agent, msg.number, journal, replay);
    let mut store = Store::new(&gh.engine, state);
    store.limiter(|s| &mut s.limiter);
    let mut t1 = t0;
    let open = store.data().agent.open.clone();
    let tokio = store.data().tokio.clone();
    let deadline = store.data().deadline.clone();
    // In a runner's batch, each tick also commits the batch when its oldest
    // write has waited long enough (a long handler's effects become durable
    // while it runs).
    let r = arm_with(&mut store, limits, &deadline, move || {
        if let Some(open) = &open
            && open.due()
            && let Err(e) = tokio.block_on(open.flush())
        {
            return Err(wasmtime::format_err!(
                "cannot commit the handler's effects ({e}); the message is handled again"
            ));
        }
        Ok(())
    })
    .and_then(|_| {
        let inst = pre.instantiate(&mut store)?;
        t1 = std::time::Instant::now();
        inst.call_on_message(&mut store, &msg)
    });
    let t2 = std::time::Instant::now();
    let left = store.get_fuel().unwrap_or(0);
    Outcome {
        fuel: fuel.saturating_sub(left),
        memory: store.data().limiter.peak as u64,
        instantiate_ns: (t1 - t0).as_nanos() as u64,
        call_ns: (t2 - t1).as_nanos() as u64,
        result: r.map_err(|e| stop_reason(&e, limits, store.data().panic.as_deref())),
    }
}

/// The store data of a tool-world instance: the tool runs for a host, with
/// only the capabilities granted at install time.
pub(crate) struct ToolState {
    host: AgentHandle,
    grants: BTreeMap<String, FormulaId>,
    depth: u32,
    logs: u32,
    limiter: Limiter,
    gh: Arc<GuestHost>,
    panic: Option<String>,
    deadline: Arc<Deadline>,
}

impl ToolState {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.gh.tokio.block_on(f)
    }
}

impl tool_host::Host for ToolState {
    fn log(&mut self, level: tool_host::LogLevel, message: String) -> wasmtime::Result<()> {
        guest_log(
            &mut self.logs,
            &mut self.panic,
            "tool",
            level as u8,
            &message,
        );
        Ok(())
    }

    fn now_millis(&mut self) -> wasmtime::Result<u64> {
        if !self.grants.contains_key("clock") {
            return Ok(0);
        }
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0))
    }

    fn workspace_read(&mut self, path: String) -> wasmtime::Result<Option<String>> {
        let Some(dir) = self.grants.get("workspace").copied() else {
            return Ok(None);
        };
        if !crate::names::is_pet_name(&path) {
            return Ok(None);
        }
        let r = self.block(self.host.inner().db.read(move |tx| {
            let path = path.clone();
            Box::pin(async move {
                let Some(id) = model::lookup(tx, &dir, &path).await? else {
                    return Ok(None);
                };
                match model::must_formula(tx, &id).await?.kind {
                    FormulaKind::Value(_) => {}
                    _ => return Ok(None),
                }
                let b = capstan_cluster::blob::get_blob(tx, &crate::keys::value(&id)).await?;
                Ok::<_, Error>(b.and_then(|b| String::from_utf8(b).ok()))
            })
        }));
        Ok(r.unwrap_or(None))
    }

    fn http_request(
        &mut self,
        method: String,
        url: String,
        headers_json: String,
        body: Option<Vec<u8>>,
        timeout_ms: Option<u32>,
    ) -> wasmtime::Result<Result<tool_host::HttpResponse, String>> {
        let grant = self.grants.get(super::http::HTTP_SLOT).copied();
        let deadline = self.deadline.clone();
        let r = deadline.excluding(|| {
            self.block(super::http::guest_request(
                &self.host,
                grant,
                method,
                url,
                headers_json,
                body,
                timeout_ms,
            ))
        });
        Ok(r.map(|r| tool_host::HttpResponse {
            status: r.status,
            headers_json: r.headers_json,
            body: r.body,
        }))
    }

    fn tool_invoke(
        &mut self,
        alias: String,
        params_json: String,
    ) -> wasmtime::Result<Result<String, String>> {
        let Some(id) = self.grants.get(&alias).copied() else {
            return Ok(Err(format!(
                "tool-invoke: no tool was granted to this tool under the alias {alias:?}"
            )));
        };
        if self.depth >= MAX_TOOL_DEPTH {
            return Ok(Err(format!(
                "tool-invoke: tools may call each other at most {MAX_TOOL_DEPTH} deep"
            )));
        }
        let host = self.host.clone();
        let depth = self.depth + 1;
        let prepared = self.block(async move {
            let m = host
                .inner()
                .db
                .read(move |tx| {
                    Box::pin(
                        async move { Ok::<_, Error>(tx.get(&super::keys::manifest(&id)).await?) },
                    )
                })
                .await?
                .ok_or_else(|| Error::Invalid(format!("{alias:?} is not an installed tool")))?;
            let m: Manifest =
                serde_json::from_slice(&m).map_err(|e| Error::Corrupt(format!("manifest: {e}")))?;
            prepare_tool(host, m).await
        });
        // already on a blocking thread: run the nested tool right here
        Ok(prepared
            .and_then(|p| execute_tool(p, params_json, depth))
            .map_err(|e| e.to_string()))
    }

    fn secret_exists(&mut self, name: String) -> wasmtime::Result<bool> {
        Ok(self.grants.contains_key(&format!("secret-{name}")))
    }
}

/// A tool ready to run: compiled, with its grants resolved.
pub(crate) struct PreparedTool {
    host: AgentHandle,
    c: Arc<super::Compiled>,
    grants: BTreeMap<String, FormulaId>,
    gh: Arc<GuestHost>,
}

pub(crate) async fn prepare_tool(host: AgentHandle, m: Manifest) -> Result<PreparedTool, Error> {
    let (gh, c) = super::compiled_of(host.inner(), &m, World::Tool, "that").await?;
    let grants = m
        .grants
        .iter()
        .map(|(s, h)| {
            h.parse::<FormulaId>()
                .map(|id| (s.clone(), id))
                .map_err(|e| Error::Corrupt(format!("grant {s}: {e}")))
        })
        .collect::<Result<BTreeMap<_, _>, Error>>()?;
    Ok(PreparedTool {
        host,
        c,
        grants,
        gh,
    })
}

/// Runs a prepared tool's `execute` (blocking).
pub(crate) fn execute_tool(p: PreparedTool, input: String, depth: u32) -> Result<String, Error> {
    let PreparedTool {
        host,
        c,
        grants,
        gh,
    } = p;
    let Some(pre) = c.tool.as_ref() else {
        return Err(Error::Invalid("not a tool component".into()));
    };
    let limits = CallLimits::node(&gh);
    let state = ToolState {
        host,
        grants,
        depth,
        logs: 0,
        limiter: Limiter::new(&gh),
        gh: gh.clone(),
        panic: None,
        deadline: Deadline::new(),
    };
    let deadline = state.deadline.clone();
    let mut store = Store::new(&gh.engine, state);
    store.limiter(|s| &mut s.limiter);
    let req = tool_exports::Request {
        params: input,
        context: None,
    };
    let r = arm(&mut store, limits, &deadline).and_then(|_| {
        let inst = pre.instantiate(&mut store)?;
        inst.capstan_tool_tool().call_execute(&mut store, &req)
    });
    match r {
        Err(e) => Err(Error::Invalid(format!(
            "the tool was stopped: {}",
            stop_reason(&e, limits, store.data().panic.as_deref())
        ))),
        Ok(resp) => match (resp.output, resp.error) {
            (_, Some(err)) => Err(Error::Invalid(format!("the tool failed: {err}"))),
            (Some(out), None) => Ok(out),
            (None, None) => Ok(String::new()),
        },
    }
}

/// Runs an installed tool's `execute` once, for `host`.
pub(crate) async fn run_tool(
    host: AgentHandle,
    m: Manifest,
    input: String,
) -> Result<String, Error> {
    let p = prepare_tool(host, m).await?;
    tokio::task::spawn_blocking(move || execute_tool(p, input, 0))
        .await
        .map_err(|e| Error::Unavailable(format!("tool task failed: {e}")))?
}
