//! The agent world's host side: the store data of an instance acting as
//! the guest agent, the imports it calls (journalled, so that a run cut
//! short replays its answers), and running the component on one message.

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::FormulaId;
use wasmtime::Store;
use wasmtime::component::{Resource, ResourceTable};

use super::limits::{Deadline, Limiter, arm_with, guest_log, stop_reason};
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::guest::bindings::agent::capstan::agent as agent_wit;
use crate::guest::{CallLimits, GuestHost, derived_request};
use crate::journal::{self, Entry, Journal};
use crate::records::DedupAnswer;
use crate::types::ValueKind;

/// Largest value a guest may store.
const MAX_GUEST_VALUE: usize = 1 << 20;
/// Most names `list` answers.
const MAX_LIST: usize = 1000;

/// A capability in an instance's resource table: what one of the guest's
/// names designated when the guest looked it up.
#[derive(Debug)]
pub struct CapabilityRep {
    path: String,
    id: FormulaId,
    kind: String,
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
        // the journal refuses only past its size bound
        self.journal
            .record(i, entry)
            .map_err(crate::guest::host::GuestStop::limit)
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
            Ok(n) => {
                if let Some(open) = &self.agent.open {
                    // committed only if the batch commits before the
                    // message completes (crate::open_tx)
                    open.exactly_once(crate::keys::dedup(&self.agent.id(), &req));
                }
                Ok(Ok(n))
            }
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
            return Err(crate::guest::host::GuestStop::limit(format!(
                "message size limit: tried to send a message of {} bytes; the limit is {} bytes",
                text.len(),
                self.max_message
            )));
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
            return Err(crate::guest::host::GuestStop::limit(format!(
                "value size limit: tried to store {} bytes; the limit is {MAX_GUEST_VALUE} bytes",
                text.len()
            )));
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
            return Err(crate::guest::host::GuestStop::limit(format!(
                "model request size limit: tried to send {} bytes; the limit is {MAX_LLM_REQUEST} bytes",
                request.len()
            )));
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
            return Err(crate::guest::host::GuestStop::limit(format!(
                "search query size limit: tried to send {} bytes; the limit is {} bytes",
                query.len(),
                crate::search::MAX_QUERY_BYTES
            )));
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

/// Runs the agent component on one message (blocking).
pub(crate) fn call_agent(
    gh: &GuestHost,
    pre: &crate::guest::bindings::agent::LlmAgentPre<AgentState>,
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
