//! The runner of one guest agent: owned by the guest's `AgentActor`, it
//! hands every new inbox message to a fresh instance of the component, in
//! order, and remembers in the store how far it got.

use std::sync::Arc;

use capstan_proto::FormulaId;
use tokio::sync::mpsc;

use super::bindings::agent::capstan::agent::types::Message;
use super::host::{Outcome, call_agent};
use super::{Body, CallLimits, GuestHost, World, compiled, keys};
use crate::api::{AgentHandle, Inner};
use crate::error::Error;
use crate::model;
use crate::records::BodyRec;

/// Messages read from the store per batch.
const BATCH: usize = 64;

/// Wakes the runner task; dropping it ends the task after its current batch.
pub(crate) struct GuestRunner {
    pub(crate) kick: mpsc::Sender<()>,
    /// A channel keeps its incarnation alive (it polls the outside system).
    pub(crate) pinned: bool,
}

impl GuestRunner {
    /// New mail: look at the inbox again.
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Whether the incarnation must not be passivated when idle.
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// The runner of agent `id` if its body is a component and this node runs
/// guests. It looks at the inbox once right away (mail that came while the
/// node was down).
pub(crate) async fn runner_for(
    rt: &Arc<Inner>,
    id: FormulaId,
) -> Result<Option<GuestRunner>, Error> {
    let Some(gh) = rt.guests.get().cloned() else {
        return Ok(None);
    };
    let body = rt
        .db
        .read(move |tx| Box::pin(async move { Ok::<_, Error>(tx.get(&keys::body(&id)).await?) }))
        .await?;
    let Some(body) = body else { return Ok(None) };
    let body: Body =
        serde_json::from_slice(&body).map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
    let hash = super::hash_from_hex(&body.hash)?;
    let limits = CallLimits::of(&gh, &body);
    if body.world == World::Channel {
        return Ok(Some(super::channel::start(gh, rt.clone(), id, hash, limits)));
    }
    let (tx, mut rx) = mpsc::channel(1);
    let rt = rt.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = drain(&gh, &rt, id, hash, limits).await {
                tracing::warn!(guest = %id.short(), "guest runner: {e}");
                gh.stats_update(id, |s| s.last_error = e.to_string());
            }
            if rx.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(Some(GuestRunner {
        kick: tx,
        pinned: false,
    }))
}

/// Handles every message not handled yet.
async fn drain(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    id: FormulaId,
    hash: [u8; 32],
    limits: CallLimits,
) -> Result<(), Error> {
    let lock = gh.lock_for(id);
    let _held = lock.lock().await;
    let mut agent = AgentHandle::load(rt, id).await?;
    // In a cluster, everything the component does is fenced by this node's
    // placement of the guest: once another node owns it, writes are refused.
    agent.fence = rt.cluster.get().map(|c| c.fence(id));
    loop {
        let batch = next_batch(rt, &agent).await?;
        if batch.is_empty() {
            return Ok(());
        }
        for (number, msg) in batch {
            if let Some(msg) = msg {
                handle(gh, rt, &agent, hash, msg, limits).await?;
            }
            mark_done(&agent, number).await?;
        }
    }
}

/// Records that every message up to `number` was handled.
pub(super) async fn mark_done(agent: &AgentHandle, number: u64) -> Result<(), Error> {
    let id = agent.id();
    agent
        .transact(move |tx| {
            Box::pin(async move {
                tx.set(&keys::next(&id), &(number + 1).to_be_bytes())?;
                Ok::<_, Error>(())
            })
        })
        .await
}

/// The next messages of the guest's inbox not handled yet (its own are
/// listed without a body: nothing to handle).
pub(super) async fn next_batch(
    rt: &Arc<Inner>,
    agent: &AgentHandle,
) -> Result<Vec<(u64, Option<Message>)>, Error> {
        let ctx = agent.ctx().clone();
        let batch = rt
            .db
            .read(move |tx| {
                let ctx = ctx.clone();
                Box::pin(async move {
                    let next = match tx.get(&keys::next(&ctx.id)).await? {
                        Some(b) if b.len() == 8 => {
                            u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8]))
                        }
                        _ => 0,
                    };
                    let ms = model::list_messages(tx, &ctx.id, next).await?;
                    let mut out = Vec::new();
                    for m in ms.into_iter().take(BATCH) {
                        if m.from == ctx.id {
                            out.push((m.number, None));
                            continue;
                        }
                        let sender = model::name_for(tx, &ctx, &m.from).await?;
                        let (text, refs) = match m.body {
                            BodyRec::Package { strings, names, .. } => (strings.concat(), names),
                            BodyRec::Request { description, .. } => (description, vec![]),
                        };
                        out.push((
                            m.number,
                            Some(Message {
                                number: m.number,
                                sender,
                                text,
                                refs,
                            }),
                        ));
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await?;
    Ok(batch)
}


async fn handle(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    agent: &AgentHandle,
    hash: [u8; 32],
    msg: Message,
    limits: CallLimits,
) -> Result<(), Error> {
    let id = agent.id();
    let number = msg.number;
    let c = compiled(gh, rt, hash).await?;
    let permit = gh
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Unavailable("the guest host is closed".into()))?;
    gh.stats_update(id, |s| s.state = "running");
    let (gh2, a2) = (gh.clone(), agent.clone());
    let out: Outcome = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        match c.agent.as_ref() {
            Some(pre) => call_agent(&gh2, pre, a2, msg, limits),
            None => Outcome {
                fuel: 0,
                memory: 0,
                instantiate_ns: 0,
                call_ns: 0,
                result: Err("its component is not an agent component".into()),
            },
        }
    })
    .await
    .map_err(|e| Error::Unavailable(format!("guest task failed: {e}")))?;
    let reason = match &out.result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            gh.stats_update(id, |s| {
                s.last_error = format!("message {number}: the handler answered: {e}")
            });
            None
        }
        Err(why) => Some(why.clone()),
    };
    gh.stats_update(id, |s| {
        s.handled += 1;
        s.fuel_last = out.fuel;
        s.memory_peak = s.memory_peak.max(out.memory);
        s.instantiate_ns_last = out.instantiate_ns;
        s.call_ns_last = out.call_ns;
        s.state = if reason.is_some() { "stopped" } else { "idle" };
        if let Some(r) = &reason {
            s.failures += 1;
            s.last_error = format!("message {number}: {r}");
        }
    });
    if let Some(why) = reason {
        tracing::warn!(guest = %id.short(), number, "guest stopped: {why}");
        // Mail the host, as the guest, exactly once per failed message.
        let req = super::derived_request(&id, number, u32::MAX);
        let text = format!(
            "guest stopped while handling message {number}: {why}. It starts afresh on its next message."
        );
        agent.send(req, "HOST", vec![text], vec![], None).await?;
    }
    Ok(())
}
