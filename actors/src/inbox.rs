//! Reading an inbox: pages, threads, and following new messages.

use crate::error::Error;
use crate::incarnation;
use crate::model::{self, Ctx};
use crate::records::{BodyRec, Formula, FormulaKind, MessageRec};
use crate::registry::AgentMsg;
use capstan_proto::{FormulaId, RequestId};
use tokio::sync::mpsc;

use crate::agent::AgentHandle;
use crate::types::{
    DEFAULT_INBOX_PAGE, FIRST_FOLLOW_RECHECK, FOLLOW_RECHECK, INBOX_SCAN_PAGE, MAX_INBOX_PAGE,
    MessageBodyView, MessageView, PromiseState,
};

impl AgentHandle {
    /// The first [`DEFAULT_INBOX_PAGE`] messages (of the thread, if one is
    /// named); see [`inbox_page`](Self::inbox_page) for the rest.
    pub async fn inbox(&self, thread: Option<RequestId>) -> Result<Vec<MessageView>, Error> {
        Ok(self.inbox_page(thread, 0, DEFAULT_INBOX_PAGE).await?.0)
    }

    /// At most `limit` (1 to [`MAX_INBOX_PAGE`]) messages numbered `from` or
    /// above, in number order, and whether more follow. Without a thread it
    /// is one bounded range read; with one, the inbox is scanned a page at a
    /// time (a thread's members are found by following replies).
    pub async fn inbox_page(
        &self,
        thread: Option<RequestId>,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<MessageView>, bool), Error> {
        if limit == 0 || limit > MAX_INBOX_PAGE {
            return Err(Error::Invalid(format!(
                "the inbox page size must be from 1 to {MAX_INBOX_PAGE} messages; got {limit}"
            )));
        }
        let ctx = self.ctx.clone();
        self.rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let mut page = match thread {
                        None => model::list_messages_page(tx, &ctx.id, from, limit + 1).await?,
                        Some(t) => thread_page(tx, &ctx.id, t, from, limit + 1).await?,
                    };
                    let more = page.len() > limit;
                    page.truncate(limit);
                    let mut out = Vec::with_capacity(page.len());
                    let mut names = std::collections::HashMap::new();
                    for m in page {
                        out.push(view(tx, &ctx, m, &mut names).await?);
                    }
                    Ok((out, more))
                })
            })
            .await
    }

    /// Every message numbered >= `after`: existing ones first, then new ones as they
    /// commit. The channel is bounded; a follower too slow to keep up is dropped.
    pub async fn follow(&self, after: u64) -> Result<mpsc::Receiver<MessageView>, Error> {
        let (live_tx, mut live_rx) = mpsc::channel(incarnation::FOLLOWER_BUFFER);
        let a = incarnation::agent_actor(&self.rt, self.ctx.id).await?;
        match a.call(|port| AgentMsg::Follow(live_tx, port), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => {
                return Err(Error::Unavailable(
                    "the inbox actor stopped; try again".into(),
                ));
            }
        }
        let (out_tx, out_rx) = mpsc::channel(256);
        let ctx = self.ctx.clone();
        let db = self.rt.db.clone();
        let actor = a.clone();
        tokio::spawn(async move {
            // The history a page at a time (bounded memory); the numbers
            // seen are kept to skip their live copies.
            let mut seen = std::collections::HashSet::new();
            let mut from = Some(after);
            while let Some(f) = from {
                let page = with_retries("read the inbox's history", || {
                    let c = ctx.clone();
                    db.read(move |tx| {
                        Box::pin(async move {
                            let ms =
                                model::list_messages_page(tx, &c.id, f, INBOX_SCAN_PAGE).await?;
                            let mut names = std::collections::HashMap::new();
                            let mut out = Vec::with_capacity(ms.len());
                            for m in ms {
                                out.push(view(tx, &c, m, &mut names).await?);
                            }
                            Ok::<_, Error>(out)
                        })
                    })
                })
                .await;
                let Ok(page) = page else { return };
                from = if page.len() == INBOX_SCAN_PAGE {
                    page.last().and_then(|m| m.number.checked_add(1))
                } else {
                    None
                };
                for m in page {
                    seen.insert(m.number);
                    if out_tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
            // Live messages as they are pushed, and now and then a look in
            // the store for what a push missed (a wake-up dropped, or sent
            // before the inbox's owner knew of this follower: wake-ups go
            // only to the members following an inbox). See rules::follow.
            let mut cursor = crate::rules::follow::FollowCursor::new(after);
            for n in seen {
                cursor.accept(n);
            }
            // The first looks come soon and then less often: a message
            // committed by a sender that had not yet heard of this follower
            // (it learns the followers when it reserves a number) is pushed
            // elsewhere, and right after a follow starts that is the likely
            // miss; later misses (a dropped wake-up) are rare.
            let mut last_look = tokio::time::Instant::now();
            let mut every = FIRST_FOLLOW_RECHECK;
            loop {
                let next_look = last_look + every;
                let batch = match tokio::time::timeout_at(next_look, live_rx.recv()).await {
                    Ok(Some(m)) => vec![m],
                    Ok(None) => return,
                    Err(_) => Vec::new(),
                };
                let look = tokio::time::Instant::now() >= next_look;
                // Only a look that read the store counts towards giving a
                // missing number up as a hole (rules::follow): while the
                // store cannot be read, nothing is known missing.
                let mut read = false;
                // Skipped numbers read again, and the inbox mark, at this
                // look (rules::follow: a commit that landed after its
                // number was skipped, its push lost).
                let mut reread: Option<(Vec<u64>, u64)> = None;
                let batch = if look {
                    last_look = tokio::time::Instant::now();
                    every = (every * 2).min(FOLLOW_RECHECK);
                    let again = cursor.rechecks(last_look.into_std());
                    let (c, from) = (ctx.clone(), cursor.look_from());
                    let page = db
                        .read(move |tx| {
                            let again = again.clone();
                            Box::pin(async move {
                                let mut ms =
                                    model::list_messages_page(tx, &c.id, from, INBOX_SCAN_PAGE)
                                        .await?;
                                if again.is_empty() {
                                    return Ok((ms, None));
                                }
                                let mark = model::inbox_mark_snapshot(tx, &c.id).await?;
                                let slots: Vec<Vec<u8>> = again
                                    .iter()
                                    .map(|n| crate::keys::message(&c.id, *n))
                                    .collect();
                                tx.prefetch(&slots).await?;
                                for k in &slots {
                                    if let Some(b) = tx.get(k).await? {
                                        ms.push(MessageRec::decode(&b)?);
                                    }
                                }
                                Ok::<_, Error>((ms, Some((again, mark))))
                            })
                        })
                        .await;
                    match page {
                        Ok((mut ms, again)) => {
                            read = true;
                            reread = again;
                            ms.extend(batch);
                            ms
                        }
                        Err(e) => {
                            tracing::debug!("follower's look at the store failed: {e}");
                            batch
                        }
                    }
                } else {
                    batch
                };
                let mut missed = false;
                for m in batch {
                    if !cursor.accept(m.number) {
                        continue;
                    }
                    missed |= read;
                    let v = with_retries("render a message", || view_recent(&db, &ctx, m.clone()))
                        .await;
                    match v {
                        Ok(v) => {
                            if out_tx.send(v).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("follower stopped: {e}");
                            return;
                        }
                    }
                }
                if let Some((again, mark)) = &reread {
                    cursor.fenced(again, *mark);
                }
                if read {
                    cursor.looked(tokio::time::Instant::now().into_std());
                }
                if missed {
                    // a look found what no push brought: the inbox's owner
                    // may not know this node follows it (told again), and
                    // until it does, looks come soon again
                    let _ = actor.cast(AgentMsg::MissedPush);
                    every = FIRST_FOLLOW_RECHECK;
                }
            }
        });
        Ok(out_rx)
    }
}

/// Tries a follower's read of the store that failed for a passing reason
/// (the store unreachable, a leader election) again, [`FOLLOW_READ_TRIES`]
/// times in all with growing pauses (7 s of them): the follower rides out
/// what a client would otherwise see as its stream ending. Other errors
/// (a damaged record) and the last failure end the follower, as before.
async fn with_retries<T, F, Fut>(what: &str, mut read: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut pause = std::time::Duration::from_millis(100);
    let mut tries = 1;
    loop {
        match read().await {
            Err(e) if e.is_transient() && tries < FOLLOW_READ_TRIES => {
                tracing::debug!("follower could not {what} ({e}); trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Reads a follower tries before it ends (see [`with_retries`]).
const FOLLOW_READ_TRIES: u32 = 8;

/// Renders a message the follower was just told of. It is read on a recent
/// snapshot (no round trip for the latest revision: that is one of the few
/// store round trips between a send on one node and a follower on another
/// seeing it); a snapshot that turns out older than the message (its
/// promise, or a name, not found) is read again on the latest version.
async fn view_recent(
    db: &capstan_cluster::Db,
    ctx: &std::sync::Arc<Ctx>,
    m: MessageRec,
) -> Result<MessageView, Error> {
    let (c, m2) = (ctx.clone(), m.clone());
    let (v, fresh) = db
        .read_for_commit(move |tx| {
            Box::pin(async move {
                let mut names = std::collections::HashMap::new();
                let v = view(tx, &c, m2, &mut names).await?;
                let sure = !names.values().any(|n| n.starts_with("id:"))
                    && !matches!(&v.body, MessageBodyView::Request { state: PromiseState::Rejected(r), .. } if r == PROMISE_GONE);
                Ok::<_, Error>((v, sure))
            })
        })
        .await?;
    match v {
        (v, true) => Ok(v),
        (v, false) if fresh => Ok(v),
        _ => {
            let c = ctx.clone();
            db.read(move |tx| {
                Box::pin(async move {
                    let mut names = std::collections::HashMap::new();
                    view(tx, &c, m, &mut names).await
                })
            })
            .await
        }
    }
}

/// How a request whose promise is missing shows.
const PROMISE_GONE: &str = "the request's promise is gone";

/// Renders a message for the acting agent.
async fn view(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    m: MessageRec,
    names: &mut std::collections::HashMap<FormulaId, String>,
) -> Result<MessageView, Error> {
    for id in [m.from, m.to] {
        if let std::collections::hash_map::Entry::Vacant(e) = names.entry(id) {
            e.insert(model::name_for(tx, ctx, &id).await?);
        }
    }
    let body = match m.body {
        BodyRec::Package { strings, names, .. } => MessageBodyView::Package { strings, names },
        BodyRec::Request {
            description,
            promise,
        } => {
            let state = match model::get_formula(tx, &promise).await? {
                Some(Formula {
                    kind: FormulaKind::Promise(p),
                    ..
                }) => p.state,
                _ => PromiseState::Rejected(PROMISE_GONE.into()),
            };
            MessageBodyView::Request { description, state }
        }
    };
    Ok(MessageView {
        number: m.number,
        message_id: m.message_id,
        reply_to: m.reply_to,
        from: names[&m.from].clone(),
        to: names[&m.to].clone(),
        date_ms: m.date_ms,
        body,
    })
}

/// At most `limit` messages numbered `from` or above of the thread of `root`
/// (the message `root` and, transitively, the replies to its members).
/// Passes over the inbox a page at a time until a pass adds no member: the
/// messages kept in that pass are the answer.
async fn thread_page(
    tx: &mut capstan_cluster::Transaction,
    agent: &FormulaId,
    root: RequestId,
    from: u64,
    limit: usize,
) -> Result<Vec<crate::records::MessageRec>, Error> {
    let mut members: std::collections::HashSet<RequestId> = [root].into();
    loop {
        let before = members.len();
        let mut out = Vec::new();
        let mut next = Some(0u64);
        while let Some(n) = next {
            let ms = model::list_messages_page(tx, agent, n, INBOX_SCAN_PAGE).await?;
            next = if ms.len() == INBOX_SCAN_PAGE {
                ms.last().and_then(|m| m.number.checked_add(1))
            } else {
                None
            };
            for m in ms {
                if m.reply_to.is_some_and(|r| members.contains(&r)) {
                    members.insert(m.message_id);
                }
                if m.number >= from && out.len() < limit && members.contains(&m.message_id) {
                    out.push(m);
                }
            }
        }
        if members.len() == before {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use capstan_cluster::Db;
    use capstan_cluster::mem_store::MemStore;

    use super::*;
    use crate::{Runtime, RuntimeOptions};

    /// A message written after the follower skipped its number as a hole
    /// (missing for the grace), with no push (its writer told no one), is
    /// shown at the next look: looks read skipped numbers again until the
    /// inbox mark fences them (`rules::follow`). Before, looks started
    /// above the skipped number and it was never shown (the simulation
    /// found it, seed 62429).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_written_after_its_number_was_skipped_is_shown_without_a_push() {
        let store = Arc::new(MemStore::new());
        let rt = Runtime::open(Db::new(store), RuntimeOptions::default())
            .await
            .expect("runtime");
        let root = rt.root_host();
        root.mkguest(RequestId::random(), "g")
            .await
            .expect("mkguest");
        let me = root.id();
        let mut follower = root.follow(0).await.expect("follow");
        // A number of the host's own inbox reserved and left empty, and a
        // message after it (the host's copy of a send).
        let hole = root
            .reserve_admitting(me, 1, 0, None)
            .await
            .expect("reserve");
        let after = root
            .send(RequestId::random(), "g", vec!["after".into()], vec![], None)
            .await
            .expect("send");
        assert!(after > hole);
        let shown = |m: &MessageView| match &m.body {
            MessageBodyView::Package { strings, .. } => strings.first().cloned(),
            _ => None,
        };
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), follower.recv())
                .await
                .expect("the later message shown")
                .expect("the follower runs");
            if m.number == after {
                break;
            }
        }
        // the follower gives the empty number up as a hole after the grace
        tokio::time::sleep(crate::rules::follow::SKIP_AFTER + FOLLOW_RECHECK * 2).await;
        // now it lands, and nobody pushes it
        let late = MessageRec {
            number: hole,
            message_id: RequestId::random(),
            reply_to: None,
            from: me,
            to: me,
            date_ms: crate::clock::now_ms(),
            body: BodyRec::Package {
                strings: vec!["late".into()],
                names: vec![],
                ids: vec![],
            },
        };
        rt.inner()
            .db
            .transact(move |tx| {
                let m = late.clone();
                Box::pin(async move { model::put_message(tx, &me, &m).await })
            })
            .await
            .expect("the late write");
        let m = tokio::time::timeout(FOLLOW_RECHECK * 3, follower.recv())
            .await
            .expect("the late message shown at the next look")
            .expect("the follower runs");
        assert_eq!(m.number, hole);
        assert_eq!(shown(&m).as_deref(), Some("late"));
    }
}
