//! Channel guests: bridges between an outside chat system and Capstan mail
//! (`capstan:channel`, IronClaw's channel contract reduced).
//!
//! A guest agent whose component is a channel is run by one task for as
//! long as it is incarnated (a channel is incarnated when it is made and at
//! node start, and is never passivated for idleness). Unlike an agent guest,
//! whose every message gets a fresh instance, a channel keeps one instance
//! between calls (its poll cursor, its session) and is driven by the node:
//!
//! ```text
//! incarnated ──► on-start(config) ──► every poll-interval: on-poll
//!                                  └► mail to the channel: on-respond(recipient, text)
//! incarnation stops ──► on-shutdown
//! ```
//!
//! Every call is bounded like an agent guest's (fuel and a wall-clock
//! deadline per call, memory and tables per instance). A call that breaks a
//! limit, traps or panics stops the channel: its host is mailed why, and it
//! starts afresh (a new instance, `on-start` again) on its next message.

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::{FormulaId, RequestId};
use tokio::sync::mpsc;
use wasmtime::Store;

use super::bindings::channel::SandboxedChannel;
use super::bindings::channel::capstan::channel::host as ch_host;
use super::host::{Deadline, Limiter, arm, guest_log, stop_reason};
use super::progress::{mark_done, next_run};
use super::{CallLimits, GuestHost, compiled};
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::node::{GuestRunner, Inner};

/// Shortest and longest poll interval.
pub const MIN_POLL: Duration = Duration::from_millis(100);
pub const MAX_POLL: Duration = Duration::from_secs(3600);
/// Most messages a channel may emit in one call.
const MAX_EMITS: u32 = 256;
/// Longest outside sender name.
const MAX_SENDER: usize = 256;
/// Largest config value handed to `on-start`.
const MAX_CONFIG: usize = 64 * 1024;
/// Longest `emit` key.
const MAX_EMIT_KEY: usize = 256;
/// Largest durable state value (`state-set`).
pub const MAX_STATE: usize = 64 * 1024;
/// Longest state name (after `state-`).
const MAX_STATE_NAME: usize = 64;

/// The store data of a channel instance: acting as the channel agent.
pub(crate) struct ChannelState {
    agent: AgentHandle,
    http: Option<FormulaId>,
    logs: u32,
    emits: u32,
    max_message: usize,
    pub(crate) limiter: Limiter,
    tokio: tokio::runtime::Handle,
    pub(crate) panic: Option<String>,
    deadline: Arc<Deadline>,
    /// The message `on-respond` is handling.
    context: Option<ch_host::MessageContext>,
}

impl ChannelState {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.tokio.block_on(f)
    }
}

/// The request id of an `emit` with `key`: the same key, the same request,
/// so the store applies it once.
fn emit_request(channel: &FormulaId, key: &str) -> RequestId {
    let mut h = blake3::Hasher::new_derive_key("capstan channel emit v1");
    h.update(channel.as_bytes());
    h.update(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    RequestId(out)
}

/// `state-NAME`, if NAME is 1 to 64 of `a-z0-9-`.
fn state_name(name: &str) -> Result<String, String> {
    if name.is_empty()
        || name.len() > MAX_STATE_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "a state name is 1 to {MAX_STATE_NAME} of a-z, 0-9 and -, not {:?}",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(format!("state-{name}"))
}

impl ChannelState {
    /// The message id of message `number` of the channel's own inbox.
    fn message_id(&self, number: u64) -> Result<String, Error> {
        let id = self.agent.id();
        let inner = self.agent.inner().clone();
        self.block(inner.db.read(move |tx| {
            Box::pin(async move {
                let Some(b) = tx.get(&crate::keys::message(&id, number)).await? else {
                    return Err(Error::Corrupt(format!(
                        "message {number} that the channel sent is missing"
                    )));
                };
                let m = crate::records::MessageRec::decode(&b)?;
                Ok(hex::encode(m.message_id.0))
            })
        }))
    }
}

impl ch_host::Host for ChannelState {
    fn emit(
        &mut self,
        key: String,
        to: String,
        sender: String,
        text: String,
    ) -> wasmtime::Result<Result<String, String>> {
        if key.is_empty() || key.len() > MAX_EMIT_KEY {
            return Ok(Err(format!(
                "an emit key is 1 to {MAX_EMIT_KEY} bytes; got {}",
                key.len()
            )));
        }
        let text = format!(
            "{}: {text}",
            sender.chars().take(MAX_SENDER).collect::<String>()
        );
        if text.len() > self.max_message {
            return Err(crate::guest::host::GuestStop::limit(format!(
                "message size limit: tried to emit a message of {} bytes; the limit is {} bytes",
                text.len(),
                self.max_message
            )));
        }
        self.emits += 1;
        if self.emits > MAX_EMITS {
            return Ok(Err(format!(
                "a channel may emit at most {MAX_EMITS} messages per call"
            )));
        }
        let to = if to.is_empty() {
            "HOST".to_string()
        } else {
            to
        };
        let req = emit_request(&self.agent.id(), &key);
        let sent = self.block(self.agent.send(req, &to, vec![text], vec![], None));
        Ok(match sent {
            Ok(n) => self.message_id(n).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        })
    }

    fn state_get(&mut self, name: String) -> wasmtime::Result<Result<Option<String>, String>> {
        let name = match state_name(&name) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match self.block(self.agent.cat(&name)) {
            Ok((_, b)) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| format!("{name} is not text")),
            Err(Error::UnknownName(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        })
    }

    fn state_set(&mut self, name: String, text: String) -> wasmtime::Result<Result<(), String>> {
        let name = match state_name(&name) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        if text.len() > MAX_STATE {
            return Ok(Err(format!(
                "channel state {name} of {} bytes is over the limit of {MAX_STATE} bytes",
                text.len()
            )));
        }
        Ok(self
            .block(self.agent.store(
                RequestId::random(),
                &name,
                crate::types::ValueKind::Text,
                text.into_bytes(),
            ))
            .map(|_| ())
            .map_err(|e| e.to_string()))
    }

    fn respond_context(&mut self) -> wasmtime::Result<Option<ch_host::MessageContext>> {
        Ok(self.context.clone())
    }

    fn log(&mut self, level: ch_host::LogLevel, message: String) -> wasmtime::Result<()> {
        let who = self.agent.id().short();
        guest_log(&mut self.logs, &mut self.panic, &who, level as u8, &message);
        Ok(())
    }

    fn emit_message(
        &mut self,
        sender: String,
        text: String,
    ) -> wasmtime::Result<Result<(), String>> {
        let text = format!(
            "{}: {text}",
            sender.chars().take(MAX_SENDER).collect::<String>()
        );
        if text.len() > self.max_message {
            return Err(crate::guest::host::GuestStop::limit(format!(
                "message size limit: tried to emit a message of {} bytes; the limit is {} bytes",
                text.len(),
                self.max_message
            )));
        }
        self.emits += 1;
        if self.emits > MAX_EMITS {
            return Ok(Err(format!(
                "a channel may emit at most {MAX_EMITS} messages per call"
            )));
        }
        // Outside messages have no id of ours: each emit is a new message.
        let req = RequestId::random();
        Ok(self
            .block(self.agent.send(req, "HOST", vec![text], vec![], None))
            .map(|_| ())
            .map_err(|e| e.to_string()))
    }

    fn http_request(
        &mut self,
        method: String,
        url: String,
        headers_json: String,
        body: Option<Vec<u8>>,
        timeout_ms: Option<u32>,
    ) -> wasmtime::Result<Result<ch_host::HttpResponse, String>> {
        let deadline = self.deadline.clone();
        let r = deadline.excluding(|| {
            self.block(super::http::guest_request(
                &self.agent,
                self.http,
                method,
                url,
                headers_json,
                body,
                timeout_ms,
            ))
        });
        Ok(r.map(|r| ch_host::HttpResponse {
            status: r.status,
            headers_json: r.headers_json,
            body: r.body,
        }))
    }
}

/// A live channel instance.
struct Live {
    store: Store<ChannelState>,
    inst: SandboxedChannel,
    poll: Option<Duration>,
}

/// One call into the channel.
enum Call {
    Poll,
    Respond(String, String, Option<ch_host::MessageContext>),
    Shutdown,
}

/// Starts the task of channel `id`; dropping the runner ends it (after
/// `on-shutdown`).
pub(super) fn start(
    gh: Arc<GuestHost>,
    rt: Arc<Inner>,
    id: FormulaId,
    hash: [u8; 32],
    limits: CallLimits,
) -> GuestRunner {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        if let Err(e) = run(&gh, &rt, id, hash, limits, rx).await {
            tracing::warn!(guest = %id.short(), "channel runner: {e}");
            gh.stats_update(id, |s| {
                s.state = "stopped";
                s.last_error = e.to_string();
            });
        }
    });
    GuestRunner {
        kick: tx,
        pinned: true,
        // (pinned: never passivated, busy or not)
        busy: Default::default(),
    }
}

async fn run(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    id: FormulaId,
    hash: [u8; 32],
    limits: CallLimits,
    mut rx: mpsc::Receiver<()>,
) -> Result<(), Error> {
    // One task per channel at a time: a new incarnation waits for the old
    // one's on-shutdown.
    let lock = gh.lock_for(id);
    let _held = lock.lock().await;
    let mut agent = AgentHandle::load(rt, id).await?;
    agent.fence = rt.cluster.get().map(|c| c.fence(id));
    let mut live = launch(gh, rt, &agent, hash, limits).await?;
    respond_all(gh, rt, &agent, hash, limits, &mut live).await?;
    let mut next_poll = live
        .as_ref()
        .and_then(|l| l.poll)
        .map(|p| tokio::time::Instant::now() + p);
    loop {
        let at = next_poll;
        let wait = async move {
            match at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            k = rx.recv() => {
                if k.is_none() {
                    break;
                }
                let was_down = live.is_none();
                respond_all(gh, rt, &agent, hash, limits, &mut live).await?;
                if was_down {
                    next_poll = live.as_ref().and_then(|l| l.poll).map(|p| tokio::time::Instant::now() + p);
                }
            }
            _ = wait => {
                if let Some(l) = live.take() {
                    live = call(gh, &agent, l, Call::Poll, limits).await?.0;
                }
                next_poll = live.as_ref().and_then(|l| l.poll).map(|p| tokio::time::Instant::now() + p);
            }
        }
    }
    if let Some(l) = live.take() {
        call(gh, &agent, l, Call::Shutdown, limits).await?;
    }
    gh.stats_update(id, |s| s.state = "passive");
    Ok(())
}

/// Hands every new inbox message to `on-respond` (starting the channel
/// afresh first if it was stopped).
async fn respond_all(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    agent: &AgentHandle,
    hash: [u8; 32],
    limits: CallLimits,
    live: &mut Option<Live>,
) -> Result<(), Error> {
    let mut holes = crate::rules::inbox::Holes::default();
    loop {
        let Some(batch) = next_run(agent, None, &mut holes).await? else {
            return Ok(());
        };
        for (number, msg, encoded) in batch {
            if let Some(msg) = msg {
                let context = crate::records::MessageRec::decode(&encoded).ok().map(|m| {
                    ch_host::MessageContext {
                        message_id: hex::encode(m.message_id.0),
                        reply_to: m.reply_to.map(|r| hex::encode(r.0)),
                    }
                });
                if live.is_none() {
                    *live = launch(gh, rt, agent, hash, limits).await?;
                }
                if let Some(l) = live.take() {
                    let (recipient, text) = split_recipient(&msg.text);
                    let (l, answer) = call(
                        gh,
                        agent,
                        l,
                        Call::Respond(recipient, text, context),
                        limits,
                    )
                    .await?;
                    *live = l;
                    if let Some(e) = answer {
                        let req = super::derived_request(&agent.id(), number, u32::MAX - 1);
                        let text = format!("the channel could not deliver message {number}: {e}");
                        agent.send(req, "HOST", vec![text], vec![], None).await?;
                    }
                }
            }
            mark_done(agent, number, false).await?;
        }
    }
}

/// `@user rest` → ("user", "rest"); anything else → ("", text).
fn split_recipient(text: &str) -> (String, String) {
    if let Some(rest) = text.strip_prefix('@')
        && let Some((who, body)) = rest.split_once(char::is_whitespace)
        && !who.is_empty()
    {
        return (who.to_string(), body.trim_start().to_string());
    }
    (String::new(), text.to_string())
}

/// A new instance, started with `on-start(config)`; None if it failed (its
/// host was told why).
async fn launch(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    agent: &AgentHandle,
    hash: [u8; 32],
    limits: CallLimits,
) -> Result<Option<Live>, Error> {
    let id = agent.id();
    let c = compiled(gh, rt, hash).await?;
    let config = match agent.cat("config").await {
        Ok((_, b)) if b.len() <= MAX_CONFIG => String::from_utf8(b).unwrap_or_default(),
        Ok(_) => String::new(),
        Err(Error::UnknownName(_)) => "{}".to_string(),
        Err(e) => return Err(e),
    };
    let http = match agent.show(super::http::HTTP_SLOT).await {
        Ok(e) => Some(e.id),
        Err(Error::UnknownName(_)) => None,
        Err(e) => return Err(e),
    };
    let permit = gh
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Unavailable("the guest host is closed".into()))?;
    let (gh2, a2) = (gh.clone(), agent.clone());
    let started = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let Some(pre) = c.channel.as_ref() else {
            return Err("its component is not a channel component".to_string());
        };
        let state = ChannelState {
            agent: a2,
            http,
            logs: 0,
            emits: 0,
            max_message: gh2.limits().message,
            limiter: Limiter::new(&gh2),
            tokio: gh2.tokio.clone(),
            panic: None,
            deadline: Deadline::new(),
            context: None,
        };
        let deadline = state.deadline.clone();
        let mut store = Store::new(&gh2.engine, state);
        store.limiter(|s| &mut s.limiter);
        let r = arm(&mut store, limits, &deadline).and_then(|_| {
            let inst = pre.instantiate(&mut store)?;
            let cfg = inst
                .capstan_channel_channel()
                .call_on_start(&mut store, &config)?;
            Ok((inst, cfg))
        });
        match r {
            Ok((inst, Ok(cfg))) => Ok(Live {
                poll: cfg
                    .poll_interval_ms
                    .map(|ms| Duration::from_millis(ms.into()).clamp(MIN_POLL, MAX_POLL)),
                store,
                inst,
            }),
            Ok((_, Err(e))) => Err(format!("its on-start answered: {e}")),
            Err(e) => Err(stop_reason(&e, limits, store.data().panic.as_deref())),
        }
    })
    .await
    .map_err(|e| Error::Unavailable(format!("channel task failed: {e}")))?;
    match started {
        Ok(l) => {
            gh.stats_update(id, |s| s.state = "idle");
            tracing::info!(guest = %id.short(), poll = ?l.poll, "channel started");
            Ok(Some(l))
        }
        Err(why) => {
            stopped(gh, agent, "while starting", &why).await?;
            Ok(None)
        }
    }
}

/// Tells the host that the channel stopped, and why.
async fn stopped(
    gh: &Arc<GuestHost>,
    agent: &AgentHandle,
    during: &str,
    why: &str,
) -> Result<(), Error> {
    let id = agent.id();
    tracing::warn!(guest = %id.short(), "channel stopped {during}: {why}");
    gh.stats_update(id, |s| {
        s.state = "stopped";
        s.failures += 1;
        s.last_error = format!("{during}: {why}");
    });
    let text = format!("channel stopped {during}: {why}. It starts afresh on its next message.");
    agent
        .send(RequestId::random(), "HOST", vec![text], vec![], None)
        .await?;
    Ok(())
}

/// Makes one call on a live channel. Returns the instance if it is still
/// alive, and the error the handler answered, if any.
async fn call(
    gh: &Arc<GuestHost>,
    agent: &AgentHandle,
    mut l: Live,
    what: Call,
    limits: CallLimits,
) -> Result<(Option<Live>, Option<String>), Error> {
    let id = agent.id();
    let permit = gh
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Unavailable("the guest host is closed".into()))?;
    let during = match &what {
        Call::Poll => "while polling",
        Call::Respond(..) => "while handling a message",
        Call::Shutdown => "while shutting down",
    };
    gh.stats_update(id, |s| s.state = "running");
    let (out, l) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let t0 = std::time::Instant::now();
        l.store.data_mut().logs = 0;
        l.store.data_mut().emits = 0;
        l.store.data_mut().context = match &what {
            Call::Respond(_, _, c) => c.clone(),
            _ => None,
        };
        let ch = l.inst.capstan_channel_channel();
        let deadline = l.store.data().deadline.clone();
        let r = arm(&mut l.store, limits, &deadline).and_then(|_| match &what {
            Call::Poll => ch.call_on_poll(&mut l.store).map(|_| Ok(())),
            Call::Respond(to, text, _) => ch.call_on_respond(&mut l.store, to, text),
            Call::Shutdown => ch.call_on_shutdown(&mut l.store).map(|_| Ok(())),
        });
        let used = limits.fuel.saturating_sub(l.store.get_fuel().unwrap_or(0));
        let r = r.map_err(|e| stop_reason(&e, limits, l.store.data().panic.as_deref()));
        ((r, used, t0.elapsed()), l)
    })
    .await
    .map_err(|e| Error::Unavailable(format!("channel task failed: {e}")))?;
    let (r, used, took) = out;
    let peak = l.store.data().limiter.peak as u64;
    let failed = r.is_err();
    gh.stats_update(id, |s| {
        s.handled += 1;
        s.fuel_last = used;
        s.memory_peak = s.memory_peak.max(peak);
        s.call_ns_last = took.as_nanos() as u64;
        s.state = if failed { "stopped" } else { "idle" };
        if let Ok(Err(e)) = &r {
            s.last_error = format!("{during}: the handler answered: {e}");
        }
    });
    match r {
        Ok(Ok(())) => Ok((Some(l), None)),
        Ok(Err(e)) => Ok((Some(l), Some(e))),
        Err(why) => {
            stopped(gh, agent, during, &why).await?;
            Ok((None, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{emit_request, split_recipient, state_name};
    use capstan_proto::FormulaId;

    #[test]
    fn state_names_are_bounded_and_plain() {
        assert_eq!(state_name("sync").unwrap(), "state-sync");
        assert!(state_name("").is_err());
        assert!(state_name("Sync").is_err());
        assert!(state_name("a.b").is_err());
        assert!(state_name(&"a".repeat(65)).is_err());
        assert!(state_name(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn an_emit_key_gives_one_request_per_channel() {
        let (a, b) = (FormulaId::random(), FormulaId::random());
        assert!(emit_request(&a, "$ev1") == emit_request(&a, "$ev1"));
        assert!(emit_request(&a, "$ev1") != emit_request(&a, "$ev2"));
        assert!(emit_request(&a, "$ev1") != emit_request(&b, "$ev1"));
    }

    #[test]
    fn a_leading_at_names_the_recipient() {
        assert_eq!(
            split_recipient("@alice hello there"),
            ("alice".into(), "hello there".into())
        );
        assert_eq!(split_recipient("hello"), ("".into(), "hello".into()));
        assert_eq!(split_recipient("@alice"), ("".into(), "@alice".into()));
    }
}
