//! The runner of one guest agent: owned by the guest's `AgentActor`, it
//! hands every new inbox message to a fresh instance of the component, in
//! order, and remembers in the store how far it got.

use std::sync::Arc;

use capstan_proto::FormulaId;
use tokio::sync::mpsc;

use super::bindings::agent::capstan::agent::types::Message;
use super::host::{Outcome, Replay, call_agent};
use super::progress::{Listed, next_run};
use super::{Body, CallLimits, GuestHost, World, compiled, keys};
use crate::agent::AgentHandle;
use crate::cluster::Membership;
use crate::error::Error;
use crate::journal::{self, Journal};
use crate::node::{GuestRunner, Guests, Inner};
use crate::open_tx::OpenTx;

/// The runner of agent `id` if its body is a component and this node runs
/// guests. It looks at the inbox once right away (mail that came while the
/// node was down).
/// A guest taken over from another node (dead, draining, or this node's
/// earlier run) tells its host, once per take-over: its waiting mail and
/// pending decisions (an LLM agent's proposal) go on here.
fn tell_host_resumed(rt: &Arc<Inner>, id: FormulaId, me: &str, epoch: u64, prev: &str) {
    let text = if prev == me {
        format!(
            "resumed on node {me} after it restarted; what I was waiting for, I still wait for here"
        )
    } else {
        format!(
            "resumed on node {me}: node {prev} stopped serving me; what I was waiting for, I still wait for here"
        )
    };
    let mut h = blake3::Hasher::new_derive_key("capstan guest resumed v1");
    h.update(id.as_bytes());
    h.update(me.as_bytes());
    h.update(&epoch.to_be_bytes());
    let mut req = [0u8; 16];
    req.copy_from_slice(&h.finalize().as_bytes()[..16]);
    let rt = rt.clone();
    tokio::spawn(async move {
        let sent = async {
            let agent = AgentHandle::load(&rt, id).await?;
            agent
                .send(
                    capstan_proto::RequestId(req),
                    "HOST",
                    vec![text],
                    vec![],
                    None,
                )
                .await
        };
        if let Err(e) = sent.await {
            tracing::warn!(guest = %id.short(), "could not tell the host it resumed: {e}");
        }
    });
}

impl Guests for GuestHost {
    fn runner_for<'a>(
        self: Arc<Self>,
        rt: &'a Arc<Inner>,
        id: FormulaId,
        took_over: Option<(&'a Arc<Membership>, String)>,
    ) -> crate::node::RunnerFuture<'a> {
        Box::pin(runner_for(self, rt, id, took_over))
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// [`Guests::runner_for`] of host `gh`; `took_over`: the take-over notice
/// of agent `id`, taken by its incarnation whatever the agent is.
async fn runner_for(
    gh: Arc<GuestHost>,
    rt: &Arc<Inner>,
    id: FormulaId,
    took_over: Option<(&Arc<Membership>, String)>,
) -> Result<Option<GuestRunner>, Error> {
    let body = rt
        .db
        .read(move |tx| {
            Box::pin(async move {
                // a cancelled guest never runs again (crate::cancel)
                if crate::model::get_formula(tx, &id)
                    .await?
                    .is_some_and(|f| f.cancelled.is_some())
                {
                    return Ok::<_, Error>(None);
                }
                Ok(tx.get(&keys::body(&id)).await?)
            })
        })
        .await?;
    let Some(body) = body else { return Ok(None) };
    let body: Body =
        serde_json::from_slice(&body).map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
    let hash = super::hash_from_hex(&body.hash)?;
    let limits = CallLimits::of(&gh, &body);
    if body.world == World::Channel {
        return Ok(Some(super::channel::start(
            gh,
            rt.clone(),
            id,
            hash,
            limits,
        )));
    }
    if let Some((c, prev)) = took_over {
        tell_host_resumed(rt, id, &c.cfg.name, c.epoch(), &prev);
    }
    let (tx, mut rx) = mpsc::channel(1);
    let rt = rt.clone();
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let working = busy.clone();
    tokio::spawn(async move {
        loop {
            working.store(true, std::sync::atomic::Ordering::Release);
            if let Err(e) = drain(&gh, &rt, id, hash, limits).await {
                tracing::warn!(guest = %id.short(), "guest runner: {e}");
                gh.stats_update(id, |s| s.last_error = e.to_string());
            }
            working.store(false, std::sync::atomic::Ordering::Release);
            if rx.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(Some(GuestRunner {
        kick: tx,
        pinned: false,
        busy,
    }))
}

/// Batches given up in a row (each a commit that failed) before the runner
/// stops until its next wake-up.
const MAX_DISCARDS: u32 = 16;

/// Handles every message not handled yet.
///
/// Each run of messages is handled in one batch ([`OpenTx`]): the handlers'
/// effects and the marks "handled up to N" commit together, once per run
/// (earlier for a long run or handler, see [`crate::open_tx`]).
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
    // Only the first message a run handles can have been started before
    // (by a run cut short here or on another node, or a batch given up):
    // every later one starts after its predecessor's mark.
    let mut first = true;
    let mut holes = crate::rules::inbox::Holes::default();
    let mut discards = 0;
    loop {
        // One snapshot for the listing and the handling that follows.
        let open =
            Arc::new(OpenTx::new(rt.db.clone(), agent.fence.clone()).remembering(discards == 0));
        let mut within = agent.clone();
        within.open = Some(open.clone());
        let Some(batch) = next_run(&agent, Some(&within), &mut holes).await? else {
            return Ok(());
        };
        let r = run_batch(gh, rt, &within, &open, hash, limits, batch, &mut first).await;
        let committed = open.take_committed();
        if committed > 0 {
            gh.stats_update(id, |s| s.handled += committed);
        }
        let e = match r {
            Ok(pause) => {
                discards = 0;
                // A guest that keeps failing starts its next instance
                // only after a backoff.
                if let Some(d) = pause {
                    tokio::time::sleep(d).await;
                }
                continue;
            }
            Err(e) => e,
        };
        // Nothing after the batch's last commit happened: its messages are
        // handled again, the first of them as a possible replay.
        let lost = open.discard().await;
        holes.lost(lost);
        gh.stats_update(id, |s| s.batches_redone += 1);
        first = true;
        match e {
            Error::Store(se) if se.is_retryable() && discards < MAX_DISCARDS => {
                discards += 1;
                tracing::debug!(guest = %id.short(), discards, "batch not committed ({se}); handling its messages again");
                tokio::time::sleep(std::time::Duration::from_millis(
                    (5u64 << discards.min(6)) + u64::from(id.as_bytes()[0] % 8),
                ))
                .await;
            }
            e => return Err(e),
        }
    }
}

/// Handles one run of messages in the batch `open`, and commits it.
#[allow(clippy::too_many_arguments)]
async fn run_batch(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    agent: &AgentHandle,
    open: &Arc<OpenTx>,
    hash: [u8; 32],
    limits: CallLimits,
    batch: Vec<Listed>,
    first: &mut bool,
) -> Result<Option<std::time::Duration>, Error> {
    let id = agent.id();
    for (number, msg, record) in batch {
        let mut journaled = false;
        let had = msg.is_some();
        let mut pause = None;
        if let Some(msg) = msg {
            // The record just listed (written once): a reply finds it
            // without a read.
            open.prime(crate::keys::message(&id, number), Some(record));
            let (loaded, replay) = if std::mem::take(first) {
                earlier_run(rt, id, number).await?
            } else {
                (vec![], None)
            };
            let j = Arc::new(Journal::new(&id, number, loaded));
            open.set_journal(Some(j.clone()));
            let handled = handle(gh, rt, agent, hash, msg, limits, (j.clone(), replay)).await;
            open.set_journal(None);
            // A commit that failed under the handler is the batch's failure,
            // not the guest's.
            if let Some(e) = open.poisoned() {
                return Err(e);
            }
            pause = handled?;
            journaled = j.stored();
        }
        *first = false;
        // Handled up to `number`, and past the copies of its own mail that
        // follow it (nothing to handle there).
        let mut mark = number + 1;
        while open.is_own_copy(mark) {
            mark += 1;
        }
        agent
            .transact(move |tx| {
                Box::pin(async move {
                    tx.set(&keys::next(&id), &mark.to_be_bytes())?;
                    if journaled {
                        capstan_cluster::blob::clear_blob(tx, &journal::key(&id, number));
                    }
                    Ok::<_, Error>(())
                })
            })
            .await?;
        open.completed(had);
        if pause.is_some() {
            // Commit what was handled, then back off before the next one.
            open.flush().await?;
            return Ok(pause);
        }
        if open.due() {
            open.flush().await?;
        }
    }
    open.flush().await?;
    Ok(None)
}

/// Backoff before the next message of a guest whose last `streak` messages
/// failed in a row: 100 ms doubling, at most [`MAX_BACKOFF`].
pub(crate) fn backoff(streak: u32) -> std::time::Duration {
    let ms = 100u64 << streak.saturating_sub(1).min(16);
    std::time::Duration::from_millis(ms).min(MAX_BACKOFF)
}

/// Longest backoff between messages of a guest that keeps failing.
pub(crate) const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// What an earlier run of message `number` left: its journal, and whether
/// it made its first write (then its writes are looked up on replay).
async fn earlier_run(
    rt: &Arc<Inner>,
    id: FormulaId,
    number: u64,
) -> Result<(Vec<(u32, journal::Entry)>, Option<Replay>), Error> {
    let first_write = super::derived_request(&id, number, 1);
    let (loaded, wrote) = rt
        .db
        .read(move |tx| {
            Box::pin(async move {
                let j = capstan_cluster::blob::get_blob(tx, &journal::key(&id, number)).await?;
                let loaded = match j {
                    Some(b) => journal::decode(&b)?,
                    None => vec![],
                };
                let wrote = crate::model::dedup_get(tx, &id, &first_write)
                    .await?
                    .is_some();
                Ok::<_, Error>((loaded, wrote))
            })
        })
        .await?;
    if wrote || !loaded.is_empty() {
        tracing::info!(
            guest = %id.short(),
            number,
            journaled = loaded.len(),
            "replaying a message whose handler was cut short"
        );
    }
    let replay = Replay::new(&loaded, wrote);
    Ok((loaded, replay))
}

async fn handle(
    gh: &Arc<GuestHost>,
    rt: &Arc<Inner>,
    agent: &AgentHandle,
    hash: [u8; 32],
    msg: Message,
    limits: CallLimits,
    (journal, replay): (Arc<Journal>, Option<Replay>),
) -> Result<Option<std::time::Duration>, Error> {
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
            Some(pre) => call_agent(&gh2, pre, a2, msg, limits, journal, replay),
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
    // `handled` counts when the message's mark commits (see `drain`).
    let mut streak = (0, number);
    gh.stats_update(id, |s| {
        s.fuel_last = out.fuel;
        s.memory_peak = s.memory_peak.max(out.memory);
        s.instantiate_ns_last = out.instantiate_ns;
        s.call_ns_last = out.call_ns;
        s.state = if reason.is_some() { "stopped" } else { "idle" };
        if let Some(r) = &reason {
            s.failures += 1;
            s.last_error = format!("message {number}: {r}");
            if s.streak == 0 {
                s.streak_since = number;
            }
            s.streak = s.streak.saturating_add(1);
        } else {
            s.streak = 0;
        }
        streak = (s.streak, s.streak_since);
    });
    let Some(why) = reason else {
        return Ok(None);
    };
    let (streak, since) = streak;
    tracing::warn!(guest = %id.short(), number, streak, "guest stopped: {why}");
    let pause = backoff(streak);
    // Mail the host, as the guest: for a first failure, about that
    // message; when the next one fails too, once for the whole episode
    // (until a message is handled again). Each mail exactly once.
    if streak == 1 {
        let req = super::derived_request(&id, number, u32::MAX);
        let text = format!(
            "guest stopped while handling message {number}: {why}. It starts afresh on its next message."
        );
        agent.send(req, "HOST", vec![text], vec![], None).await?;
    } else if streak == 2 {
        let req = super::derived_request(&id, since, u32::MAX - 1);
        let text = format!(
            "guest {} keeps failing: message {number}: {why} (2 messages in a row since message {since}); retrying with backoff ({} ms, doubling up to {} s, between messages); you are told again only after it handled a message",
            agent.ctx().rec.label,
            pause.as_millis(),
            MAX_BACKOFF.as_secs()
        );
        agent.send(req, "HOST", vec![text], vec![], None).await?;
    }
    Ok(Some(pause))
}

#[cfg(test)]
mod tests;
