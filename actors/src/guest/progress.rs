//! A guest's progress through its inbox, shared by the runners of agents
//! and channels: the next run of messages to handle (waiting at a gap,
//! closing holes), and the mark "handled up to N".

use super::bindings::agent::capstan::agent::types::Message;
use super::keys;
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::journal;
use crate::model;
use crate::records::BodyRec;
use crate::rules::inbox::Step;

/// Messages read from the store per batch.
pub(super) const BATCH: usize = 64;

/// The next messages to handle, in order and without a gap after the last
/// one handled (waiting at a gap, closing it after the grace: see
/// [`crate::rules::inbox`]); `None` when there is nothing new.
///
/// With `within` (the agent in its runner's batch), the listing reads the
/// batch's snapshot, without read conflicts: the handlers then work on the
/// same snapshot, and mail arriving meanwhile does not conflict with them.
pub(super) async fn next_run(
    agent: &AgentHandle,
    within: Option<&AgentHandle>,
    holes: &mut crate::rules::inbox::Holes,
) -> Result<Option<Vec<Listed>>, Error> {
    loop {
        let (next, mut batch, mark) = next_batch(within.unwrap_or(agent)).await?;
        if let Some(mark) = mark {
            holes.settle(mark);
        }
        let listed: Vec<u64> = batch.iter().map(|(n, _, _)| *n).collect();
        match holes.step(next, &listed, tokio::time::Instant::now().into_std()) {
            Step::Idle => return Ok(None),
            Step::Handle(n) => {
                batch.truncate(n);
                return Ok(Some(batch));
            }
            Step::Wait(d) => tokio::time::sleep(d).await,
            Step::Close { from, to } => close_holes(agent, from, to, holes.settled(to)).await?,
        }
        if let Some(open) = within.and_then(|w| w.open.as_ref()) {
            open.reset().await;
        }
    }
}

/// Gives up on inbox numbers `from..to`, handed out but not written for
/// [`crate::rules::inbox::HOLE_GRACE`] (or known never to be written): if
/// their slots are still empty, raises the inbox mark above them (a late
/// writer then takes a fresh number) and marks them handled. If a message
/// landed after all, nothing changes: the runner finds it on its next look.
/// `settled`: the numbers lie below the inbox mark (dismissed, or closed
/// before), which is no news worth a warning.
pub(super) async fn close_holes(
    agent: &AgentHandle,
    from: u64,
    to: u64,
    settled: bool,
) -> Result<(), Error> {
    let id = agent.id();
    let to = to.max(from + 1).min(from + 1024);
    let closed = agent
        .transact(move |tx| {
            Box::pin(async move {
                let slots: Vec<Vec<u8>> =
                    (from..to).map(|n| crate::keys::message(&id, n)).collect();
                tx.prefetch(&slots).await?;
                // Up to the first slot that holds a message after all.
                let mut end = from;
                for k in &slots {
                    if tx.get(k).await?.is_some() {
                        break;
                    }
                    end += 1;
                }
                if end == from {
                    return Ok::<_, Error>(None);
                }
                model::raise_inbox_mark(tx, &id, end - 1).await?;
                tx.set(&keys::next(&id), &end.to_be_bytes())?;
                Ok(Some(end))
            })
        })
        .await?;
    match closed {
        Some(to) if settled => {
            tracing::debug!(guest = %id.short(), from, to, "inbox numbers below the inbox mark (dismissed) passed over")
        }
        Some(to) => {
            tracing::warn!(guest = %id.short(), from, to, "inbox numbers never written; closed the hole (a late writer takes a fresh number)")
        }
        None => {}
    }
    Ok(())
}

/// Records that every message up to `number` was handled (and clears its
/// journal if it has one, in the same transaction).
pub(super) async fn mark_done(
    agent: &AgentHandle,
    number: u64,
    journaled: bool,
) -> Result<(), Error> {
    let id = agent.id();
    agent
        .transact(move |tx| {
            Box::pin(async move {
                tx.set(&keys::next(&id), &(number + 1).to_be_bytes())?;
                if journaled {
                    capstan_cluster::blob::clear_blob(tx, &journal::key(&id, number));
                }
                Ok::<_, Error>(())
            })
        })
        .await
}

/// A listed inbox entry: its number, the message to handle (none for the
/// guest's own copies) and its stored record.
pub(super) type Listed = (u64, Option<Message>, Vec<u8>);

/// The first number not handled yet, and the next messages of the guest's
/// inbox from it (its own are listed without a body: nothing to handle).
/// The listed numbers may have gaps (see [`crate::rules::inbox`]); when
/// the first is one, the inbox mark on the same snapshot comes with them.
pub(super) async fn next_batch(
    agent: &AgentHandle,
) -> Result<(u64, Vec<Listed>, Option<u64>), Error> {
    let ctx = agent.ctx().clone();
    let batch = agent
        .read(move |tx| {
            Box::pin(async move {
                // Snapshot reads: only this runner writes its mark, and
                // messages are written once (a missed one is listed next
                // time); nothing here may make the batch conflict.
                let next = match tx.snapshot_get(&keys::next(&ctx.id)).await? {
                    Some(b) if b.len() == 8 => {
                        u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8]))
                    }
                    _ => 0,
                };
                let rows = tx
                    .snapshot_range(&capstan_cluster::RangeOption {
                        begin: crate::keys::message(&ctx.id, next),
                        end: capstan_cluster::tuple::prefix_end(&crate::keys::inbox(&ctx.id)),
                        limit: BATCH,
                        reverse: false,
                    })
                    .await?;
                let mut out = Vec::new();
                for (_, v) in rows {
                    let m = crate::records::MessageRec::decode(&v)?;
                    if m.from == ctx.id {
                        out.push((m.number, None, Vec::new()));
                        continue;
                    }
                    let encoded = m.encode();
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
                        encoded,
                    ));
                }
                // A gap in front: below the inbox mark it stays a gap.
                let mark = match out.first() {
                    Some((n, _, _)) if *n != next => {
                        Some(model::inbox_mark_snapshot(tx, &ctx.id).await?)
                    }
                    _ => None,
                };
                Ok::<_, Error>((next, out, mark))
            })
        })
        .await?;
    Ok(batch)
}
