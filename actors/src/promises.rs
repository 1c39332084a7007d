//! Requests and their promises: making, waiting on, settling, adopting
//! and dismissing them.

use crate::error::Error;
use crate::incarnation;
use crate::keys;
use crate::model::{self};
use crate::names::Path;
use crate::records::{BodyRec, DedupAnswer, Formula, FormulaKind, PromiseRec};
use crate::registry::{AgentMsg, PromiseMsg};
use capstan_proto::{FormulaId, RequestId};
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

use crate::agent::{AgentHandle, checked_dedup};
use crate::clock::now_ms;
use crate::node::notify_settled;
use crate::types::PromiseState;

impl AgentHandle {
    /// Sends a request; returns its number in the sender's own inbox and the promise id.
    pub async fn request(
        &self,
        req: RequestId,
        to: &str,
        description: &str,
        result_name: Option<&str>,
    ) -> Result<(u64, FormulaId), Error> {
        crate::rules::mail::check_text("description", description)?;
        let result_path = result_name
            .filter(|s| !s.is_empty())
            .map(Path::parse_writable)
            .transpose()?;
        let size = crate::quota::message_size(description.len(), 0, 1);
        let to_name = to;
        let to = self.recipient(to, None, &[]).await?;
        let description = description.to_string();
        let promise = FormulaId::random();
        let (n, created) = self
            .post(req, to, size, move |tx, ctx| {
                let (ctx, description, result_path) =
                    (ctx.clone(), description.clone(), result_path.clone());
                Box::pin(async move {
                    let f = Formula {
                        created_ms: now_ms(),
                        cancelled: None,
                        kind: FormulaKind::Promise(PromiseRec {
                            description: description.clone(),
                            requester: ctx.id,
                            state: PromiseState::Pending,
                            resolver: None,
                        }),
                    };
                    model::put_formula(tx, &promise, &f)?;
                    if let Some(p) = &result_path {
                        let dir = model::parent_dir(tx, &ctx, p).await?;
                        model::set_name(tx, &dir, p.last(), &promise).await?;
                    }
                    Ok((
                        BodyRec::Request {
                            description,
                            promise,
                        },
                        Some(promise),
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        match created {
            Some(p) => Ok((n, p)),
            // a retry of a request that was already applied: find its promise
            None => {
                let me = self.ctx.id;
                let m = self
                    .rt
                    .db
                    .read(move |tx| Box::pin(async move { model::get_message(tx, &me, n).await }))
                    .await?;
                match m.body {
                    BodyRec::Request { promise, .. } => Ok((n, promise)),
                    _ => Err(Error::Invalid(
                        "request id reused for another operation".into(),
                    )),
                }
            }
        }
    }

    /// Waits until the promise of request `number` (in this inbox) settles.
    pub async fn wait_request(&self, number: u64) -> Result<PromiseState, Error> {
        // First on a recent snapshot (no round trip for etcd's latest
        // revision): the request's record may come from the cache (records
        // never change) and its promise is read at the snapshot's revision.
        // A settled promise stays settled, so "settled" there is the answer;
        // the node that settled it told this one its commit's revision with
        // the wake-up, so the snapshot usually includes it. Anything else
        // is read again on the latest version.
        let me = self.ctx.id;
        let recent = self
            .rt
            .db
            .read_for_commit(move |tx| {
                Box::pin(async move {
                    let m = model::get_message(tx, &me, number).await?;
                    let promise = model::promise_of_request(&m)?;
                    let state = match tx.snapshot_get(&keys::formula(&promise)).await? {
                        Some(b) => match crate::records::Formula::decode(&b)?.kind {
                            FormulaKind::Promise(p) => Some(p.state),
                            _ => None,
                        },
                        None => None,
                    };
                    Ok::<_, Error>(state)
                })
            })
            .await;
        if let Ok((Some(state), _)) = recent
            && state != PromiseState::Pending
        {
            return Ok(state);
        }
        // One read for the request and its promise: a settled one answers
        // at once, without incarnating anything.
        let (promise, state) = self
            .rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let m = model::get_message(tx, &me, number).await?;
                    let promise = model::promise_of_request(&m)?;
                    Ok::<_, Error>((promise, model::promise_state(tx, &promise).await?))
                })
            })
            .await?;
        if state != PromiseState::Pending {
            return Ok(state);
        }
        for _ in 0..3 {
            let a = incarnation::promise_actor(&self.rt, promise).await?;
            let (tx, rx) = oneshot::channel();
            if a.cast(PromiseMsg::Wait(tx)).is_err() {
                tokio::task::yield_now().await;
                continue;
            }
            match rx.await {
                Ok(r) => return r,
                Err(_) => {
                    if self.rt.closed.load(Ordering::Acquire) {
                        return Err(Error::Unavailable("the node is shutting down".into()));
                    }
                }
            }
        }
        Err(Error::Unavailable(
            "the request's incarnation keeps stopping; try again".into(),
        ))
    }

    async fn settle(
        &self,
        req: RequestId,
        number: u64,
        outcome: Result<Path, String>,
    ) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let settled = self
            .transact(move |tx| {
                let (ctx, outcome) = (ctx.clone(), outcome.clone());
                Box::pin(async move {
                    // The request read in the settling transaction itself, not
                    // on a snapshot of its own first: on its first attempt the
                    // transaction may read a recent snapshot with cached
                    // records (no round trip for the latest revision), and an
                    // error read there (no such message yet) is worked out
                    // again on the latest version before it is returned.
                    // A fresh request id's exactly-once record is absent: on
                    // such a snapshot the commit checks it instead of a read.
                    tx.expect_absent(&keys::dedup(&ctx.id, &req));
                    tx.prefetch(&[keys::dedup(&ctx.id, &req), keys::message(&ctx.id, number)])
                        .await?;
                    if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                        return Ok(None);
                    }
                    let m = model::get_message(tx, &ctx.id, number).await?;
                    let promise = model::promise_of_request(&m)?;
                    if m.from == ctx.id {
                        return Err(Error::Invalid(format!(
                            "message {number} is your own request; only its recipient can answer it"
                        )));
                    }
                    let mut f = model::must_formula(tx, &promise).await?;
                    let FormulaKind::Promise(p) = &mut f.kind else {
                        return Err(Error::Corrupt("request without a promise".into()));
                    };
                    let settled = |_| Error::AlreadySettled(number);
                    crate::rules::mail::pending(&p.state).map_err(settled)?;
                    let outcome = match outcome {
                        Ok(path) => Ok(model::resolve(tx, &ctx, &path).await?),
                        Err(reason) => Err(reason),
                    };
                    p.state = crate::rules::mail::settle(&p.state, outcome).map_err(settled)?;
                    let state = p.state.clone();
                    if let PromiseState::Resolved(t) = &state {
                        model::note_ref(tx, t).await?;
                    }
                    let answer = match (&p.resolver, &state) {
                        (Some(to), PromiseState::Resolved(id)) => Some((
                            to.clone(),
                            p.requester,
                            crate::federation::Settlement::Resolved(
                                crate::federation::wire_ref(tx, id).await?,
                            ),
                        )),
                        (Some(to), PromiseState::Rejected(why)) => Some((
                            to.clone(),
                            p.requester,
                            crate::federation::Settlement::Rejected(why.clone()),
                        )),
                        _ => None,
                    };
                    model::put_formula(tx, &promise, &f)?;
                    let remote = answer.is_some();
                    if let Some((to, peer, s)) = answer {
                        crate::federation::enqueue(
                            tx,
                            &crate::federation::OutboxItem {
                                id: RequestId::random(),
                                sender: ctx.id,
                                peer,
                                to,
                                created_us: crate::federation::now_us(),
                                op: crate::federation::OutOp::Settle(s),
                            },
                        )?;
                    }
                    model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                    Ok(Some((promise, state, remote)))
                })
            })
            .await?;
        if let Some((promise, state, remote)) = settled {
            // the outbox carries an answer to another cluster's requester
            if remote {
                self.rt.outbox.notify_one();
            }
            notify_settled(&self.rt, promise, state);
        }
        Ok(())
    }

    pub async fn resolve(&self, req: RequestId, number: u64, path: &str) -> Result<(), Error> {
        let p = Path::parse(path)?;
        self.settle(req, number, Ok(p)).await
    }

    pub async fn reject(&self, req: RequestId, number: u64, reason: &str) -> Result<(), Error> {
        let reason = crate::rules::mail::reason(reason)?;
        self.settle(req, number, Err(reason)).await
    }

    pub async fn adopt(
        &self,
        req: RequestId,
        number: u64,
        edge_name: &str,
        path: &str,
    ) -> Result<FormulaId, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(if path.is_empty() { edge_name } else { path })?;
        let edge = edge_name.to_string();
        self.transact(move |tx| {
            let (ctx, p, edge) = (ctx.clone(), p.clone(), edge.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let m = model::get_message(tx, &ctx.id, number).await?;
                let BodyRec::Package { names, ids, .. } = &m.body else {
                    return Err(Error::WrongMessage {
                        number,
                        expected: "package".into(),
                        actual: m.body.type_name().into(),
                    });
                };
                let i = names.iter().position(|n| *n == edge).ok_or_else(|| {
                    Error::Invalid(format!(
                        "message {number} has no reference named {edge:?}; it has: {}",
                        names.join(", ")
                    ))
                })?;
                let id = ids[i];
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                model::set_name(tx, &dir, p.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now_ms())?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn dismiss(&self, req: RequestId, number: u64) -> Result<(), Error> {
        let me = self.ctx.id;
        self.transact(move |tx| {
            Box::pin(async move {
                if checked_dedup(tx, &me, &req).await?.is_some() {
                    return Ok(());
                }
                model::get_message(tx, &me, number).await?;
                model::raise_inbox_mark(tx, &me, number).await?;
                tx.clear(&keys::message(&me, number));
                model::dedup_put(tx, &me, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await?;
        // room given back: the owner, if here, recounts at its next refusal
        if let Some(a) = self.rt.registry.agent(&me) {
            let _ = a.cast(AgentMsg::Freed);
        }
        Ok(())
    }
}
