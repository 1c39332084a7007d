//! Sending mail: resolving the recipient and the references, then one
//! transaction that writes both copies of a message.
//!
//! Each copy has a number in its inbox, handed out by the inbox's owner
//! (`crate::reserve`). On a node of a cluster that neither owns the
//! sender's inbox nor merges the nodes' busy commits (the relay), the
//! sender's own copy takes its number as the relay merges the commit
//! instead (`capstan_cluster::Transaction::fill`): no call to the owner
//! before the commit (the relay reserves the numbers of a whole group at
//! once, itself when it owns the inbox), the number still from the inbox's
//! one sequence, handed out after the send began and before it is answered
//! (real-time order holds). When no relay fills it in (none now, an older
//! member), the send reserves it as every other send does and commits again.
//! Only while the node already has commits at the relay, or had one
//! answered a moment ago (a commit to fill always goes there); on by
//! default (`CAPSTAN_FILL_NUMBERS=0` on a node turns it off): see
//! [`AgentHandle::may_fill_own`].

use crate::error::Error;
use crate::keys;
use crate::model::{self, Ctx};
use crate::names::Path;
use crate::records::{BodyRec, DedupAnswer, FormulaKind, MessageRec, RemoteRec};
use capstan_cluster::StoreError;
use capstan_proto::{FormulaId, RequestId};
use std::sync::Arc;

use crate::agent::{AgentHandle, checked_dedup};
use crate::clock::now_ms;
use crate::types::{MAX_SLOT_RETRIES, RefSpec};

/// What a message's transaction writes besides its copies: the body (and
/// the promise a request makes), given the transaction and the sender.
pub(crate) trait PostBody:
    for<'t> Fn(
        &'t mut capstan_cluster::Transaction,
        &Arc<Ctx>,
    ) -> capstan_cluster::TxFuture<'t, (BodyRec, Option<FormulaId>), Error>
    + Send
    + Sync
    + 'static
{
}

impl<F> PostBody for F where
    F: for<'t> Fn(
            &'t mut capstan_cluster::Transaction,
            &Arc<Ctx>,
        ) -> capstan_cluster::TxFuture<'t, (BodyRec, Option<FormulaId>), Error>
        + Send
        + Sync
        + 'static
{
}
/// Who a message goes to, as its sender named it.
struct Recipient {
    to_path: Option<Path>,
    to_name: String,
    reply_to: Option<u64>,
    refs: Vec<Path>,
}

/// A resolved recipient: the agent, the id of the message replied to, the
/// remote record of an agent of another cluster; and, when it was read on a
/// snapshot that may miss the latest commits, the recipient to resolve
/// again in the posting transaction.
pub(crate) struct Resolved {
    target: FormulaId,
    reply_id: Option<RequestId>,
    remote: Option<RemoteRec>,
    recheck: Option<Arc<Recipient>>,
}

/// The keys [`resolve_recipient`] reads for `r` when it resolves to
/// `target` by a plain name or a reply (others are read as it goes).
fn recipient_keys(ctx: &Ctx, r: &Recipient, target: &FormulaId) -> Vec<Vec<u8>> {
    let mut out = vec![keys::formula(target)];
    if let Some(n) = r.reply_to {
        out.push(keys::message(&ctx.id, n));
    }
    if let Some(p) = &r.to_path
        && let [first] = p.segments.as_slice()
        && !crate::names::is_special_form(first)
    {
        out.push(keys::name(&ctx.rec.pet_store, first));
    }
    out
}

/// Resolves `r` as `ctx` sees it in `tx` (see [`AgentHandle::recipient`]).
async fn resolve_recipient(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    r: &Recipient,
) -> Result<(FormulaId, Option<RequestId>, Option<RemoteRec>), Error> {
    let (to_path, reply_to, refs) = (&r.to_path, r.reply_to, &r.refs);
    let to_name = r.to_name.clone();
    for p in refs {
        resolve_reference(tx, ctx, p).await?;
    }
    let mut reply_id = None;
    let mut target = None;
    if let Some(n) = reply_to {
        let m = model::get_message(tx, &ctx.id, n).await?;
        reply_id = Some(m.message_id);
        target = Some(if m.from == ctx.id { m.to } else { m.from });
    }
    if let Some(p) = to_path {
        target = Some(model::resolve(tx, ctx, p).await?);
    }
    let target = target.ok_or_else(|| Error::Invalid("a message needs a recipient".into()))?;
    let f = model::must_formula(tx, &target).await?;
    if let Some(c) = &f.cancelled {
        let name = if to_name.is_empty() {
            "the recipient"
        } else {
            to_name.as_str()
        };
        return Err(crate::records::cancelled_error(
            name,
            c,
            ": nothing was sent",
        ));
    }
    if let FormulaKind::Remote(r) = f.kind {
        // An agent of another cluster (its side checks).
        return Ok((target, reply_id, Some(r)));
    }
    if f.kind.agent().is_none() {
        return Err(Error::WrongType {
            name: to_name,
            expected: "host or guest".into(),
            actual: f.kind.type_name().into(),
        });
    }
    Ok((target, reply_id, None))
}

/// What a reference `@p` in a message's text designates; an unknown name
/// is an error that says how to write a literal `@`.
async fn resolve_reference(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    p: &Path,
) -> Result<FormulaId, Error> {
    model::resolve(tx, ctx, p).await.map_err(|e| match e {
        Error::UnknownName(_) => Error::Invalid(format!(
            "the reference @{p} names nothing: you have no name {:?} (see `capstan list`); write @@{p} for a literal @",
            p.to_string()
        )),
        other => other,
    })
}

impl AgentHandle {
    /// Resolves the recipient (an agent) of a message and validates it, and
    /// checks that the references a message will carry resolve — before any
    /// inbox number is reserved, so that a refused message leaves no gap in
    /// the numbering. (The posting transaction resolves them again: a name
    /// removed in between still fails cleanly there.)
    ///
    /// Outside a guest's batch it reads a snapshot for commit (no round trip
    /// for the latest version, see [`capstan_cluster::Store::snapshot_for_commit`]):
    /// then the answer carries the recipient to resolve again in the posting
    /// transaction, whose commit validates it; an error read there is
    /// checked on the latest version before it is returned.
    pub(crate) async fn recipient(
        &self,
        to: &str,
        reply_to: Option<u64>,
        refs: &[Path],
    ) -> Result<Resolved, Error> {
        let to_path = if to.is_empty() {
            None
        } else {
            Some(Path::parse(to)?)
        };
        if to_path.is_none() && reply_to.is_none() {
            return Err(Error::Invalid("a message needs a recipient".into()));
        }
        let spec = Arc::new(Recipient {
            to_path,
            to_name: to.to_string(),
            reply_to,
            refs: refs.to_vec(),
        });
        if self.open.is_none() {
            let (ctx, s) = (self.ctx.clone(), spec.clone());
            let (r, fresh) = self
                .rt
                .db
                .read_for_commit(move |tx| {
                    Box::pin(async move { Ok::<_, Error>(resolve_recipient(tx, &ctx, &s).await) })
                })
                .await?;
            match r {
                Ok((target, reply_id, remote)) => {
                    return Ok(Resolved {
                        target,
                        reply_id,
                        remote,
                        recheck: (!fresh).then_some(spec),
                    });
                }
                Err(e) if fresh => return Err(e),
                Err(_) => {}
            }
        }
        self.recipient_fresh(spec).await
    }

    /// [`recipient`](Self::recipient) on the latest version (or in the
    /// guest's batch).
    async fn recipient_fresh(&self, spec: Arc<Recipient>) -> Result<Resolved, Error> {
        let ctx = self.ctx.clone();
        let (target, reply_id, remote) = self
            .read(move |tx| Box::pin(async move { resolve_recipient(tx, &ctx, &spec).await }))
            .await?;
        Ok(Resolved {
            target,
            reply_id,
            remote,
            recheck: None,
        })
    }

    /// Sends a package; returns its number in the sender's own inbox.
    pub async fn send(
        &self,
        req: RequestId,
        to: &str,
        strings: Vec<String>,
        refs: Vec<RefSpec>,
        reply_to: Option<u64>,
    ) -> Result<u64, Error> {
        let names: Vec<String> = refs.iter().map(|r| r.edge_name.clone()).collect();
        crate::rules::mail::check_package(&strings, &names, refs.len())?;
        let text_len: usize = strings.iter().map(String::len).sum();
        let paths = refs
            .iter()
            .map(|r| Path::parse(&r.path))
            .collect::<Result<Vec<_>, _>>()?;
        let size =
            crate::quota::message_size(text_len, names.iter().map(String::len).sum(), names.len());
        let to_name = to;
        let timer = capstan_cluster::trace::Timer::start();
        let to = self.recipient(to, reply_to, &paths).await;
        timer.done("recipient resolved", || match &to {
            Ok(r) => format!("{to_name:?} is {}", r.target.short()),
            Err(e) => format!("{to_name:?}: {e}"),
        });
        let to = to?;
        let (n, _) = self
            .post(req, to, size, move |tx, ctx| {
                let (paths, strings, names, ctx) =
                    (paths.clone(), strings.clone(), names.clone(), ctx.clone());
                Box::pin(async move {
                    let mut ids = Vec::with_capacity(paths.len());
                    for p in &paths {
                        ids.push(resolve_reference(tx, &ctx, p).await?);
                    }
                    Ok((
                        BodyRec::Package {
                            strings,
                            names,
                            ids,
                        },
                        None,
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        Ok(n)
    }

    /// Sends a text package only while the key `alive` exists, checked in
    /// the message's own transaction (a routine's fire: removing the routine
    /// conflicts with a fire in flight, so none lands after the removal).
    pub(crate) async fn send_while(
        &self,
        req: RequestId,
        to: &str,
        text: String,
        alive: Vec<u8>,
    ) -> Result<u64, Error> {
        crate::rules::mail::check_text("message text", &text)?;
        let size = crate::quota::message_size(text.len(), 0, 0);
        let to_name = to;
        let to = self.recipient(to, None, &[]).await?;
        let (n, _) = self
            .post(req, to, size, move |tx, _ctx| {
                let (text, alive) = (text.clone(), alive.clone());
                Box::pin(async move {
                    if tx.get(&alive).await?.is_none() {
                        return Err(Error::Invalid("the routine was removed".into()));
                    }
                    Ok((
                        BodyRec::Package {
                            strings: vec![text],
                            names: vec![],
                            ids: vec![],
                        },
                        None,
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        Ok(n)
    }

    /// The common path of send and request: reserve numbers in both inboxes,
    /// then one transaction writes both copies and the exactly-once record.
    /// `size`: about the bytes of the message, admitted under the
    /// recipient's inbox quota by its owner as it reserves the number.
    pub(crate) async fn post<F: PostBody>(
        &self,
        req: RequestId,
        to: Resolved,
        size: u64,
        body: F,
    ) -> Result<(u64, Option<FormulaId>), Error> {
        let body = Arc::new(body);
        let r = match self.post_to(req, &to, size, body.clone()).await {
            // read on an old snapshot, the recipient changed since: resolve
            // it again on the latest version
            Err(Error::RecipientMoved) if let Some(spec) = to.recheck => {
                let to = self.recipient_fresh(spec).await?;
                self.post_to(req, &to, size, body).await
            }
            r => r,
        };
        match r {
            // a retry of a send that was applied before the inbox filled up
            Err(e @ Error::InboxFull { .. }) => {
                let me = self.ctx.id;
                let earlier = self
                    .read(move |tx| Box::pin(async move { model::dedup_get(tx, &me, &req).await }))
                    .await?;
                match earlier {
                    Some(DedupAnswer::Number(n)) => Ok((n, None)),
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    /// Whether a send of this agent to `target` may have its own copy's
    /// number filled in by the relay (`Transaction::fill`): in a cluster
    /// whose relay is another member and whose owner of this agent's inbox
    /// is not this node, for a plain handle (no guest's batch, fence or
    /// journal), to another local agent. The commit then goes to the relay,
    /// which reserves the number from the inbox's own sequence (itself,
    /// when it owns the inbox; else with one call to the owner for its
    /// group) as it merges the commit: real-time order holds (the number is
    /// handed out after the send began, before it is answered), and the
    /// sender neither calls the owner nor waits for it before committing.
    /// On with `RuntimeOptions::fill_numbers` (the daemon's default;
    /// `CAPSTAN_FILL_NUMBERS=0` turns it off), and only while this node
    /// already has commits at the relay, or had a group answered in the
    /// last 20 ms (under a steady load, between two groups; the etcd
    /// backend's `RECENT_RELAY`): a commit to
    /// fill always goes to the relay, a hop more when the node would have
    /// sent it to etcd itself (filling on every send cost the guests' bench
    /// about 7 %; gated, it is even there and saves the nodes 10-20 % of
    /// their CPU per send under a burst). A send whose number the relay
    /// does not fill after all (none relays now) reserves it and commits
    /// again keeping the recipient's number it holds (`post_to`).
    fn may_fill_own(&self, target: FormulaId, remote: bool) -> bool {
        if !self.rt.opts.fill_numbers {
            return false;
        }
        if self.open.is_some() || self.fence.is_some() || self.journal.is_some() {
            return false;
        }
        let store = self.rt.db.store();
        // (only while this node already relays: a commit to fill always
        // goes to the relay, a hop more when this node would not relay it)
        if remote || target == self.ctx.id || !store.relaying_now() || !store.fills() {
            return false;
        }
        let Some(c) = self.rt.cluster.get() else {
            return false;
        };
        // (the relay is another member; this node does not own the inbox
        // either, else it reserves the number itself, without a call)
        c.commit_relay().is_some()
            && c.cached_owner(&self.ctx.id)
                .is_some_and(|o| o.name != c.cfg.name)
    }

    /// The number of this agent's copy of the message sent under `req`, as
    /// its exactly-once record says (a send that applied).
    async fn own_number_of(&self, req: RequestId) -> Result<u64, Error> {
        let me = self.ctx.id;
        let earlier = self
            .read(move |tx| Box::pin(async move { model::dedup_get(tx, &me, &req).await }))
            .await?;
        match earlier {
            Some(DedupAnswer::Number(n)) if n < model::PLACEHOLDER_NUMBERS => Ok(n),
            _ => Err(Error::Corrupt(
                "a send applied without its number recorded".into(),
            )),
        }
    }

    async fn post_to<F: PostBody>(
        &self,
        req: RequestId,
        to: &Resolved,
        size: u64,
        body: Arc<F>,
    ) -> Result<(u64, Option<FormulaId>), Error> {
        let (target, reply_id, recheck) = (to.target, to.reply_id, to.recheck.clone());
        let remote = to.remote.clone();
        let me = self.ctx.id;
        let remote_target = remote.is_some();
        let remote = Arc::new(remote);
        let message_id = RequestId::random();
        let date_ms = now_ms();
        // Numbers from a stale sequence (a cluster node that lost the inbox)
        // are refused by the store; retry with fresh ones above them.
        let (mut own_min, mut their_min) = (0, 0);
        let mut tries = 0;
        // The sender's own copy may take its number from the relay, as it
        // merges the commit (module docs).
        let mut fill_own = self.may_fill_own(target, remote_target);
        // A number reserved for an attempt that wrote nothing and stays
        // good for the next one (that attempt failed for the other copy's
        // number, or for want of a relay to fill in the own): reserving a
        // fresh one instead would leave a hole in that inbox, which its
        // guest runner waits at for the whole grace (crate::rules::inbox).
        let (mut keep_theirs, mut keep_own) = (None, None);
        let result = loop {
            tries += 1;
            if tries > MAX_SLOT_RETRIES {
                return Err(Error::Unavailable(
                    "inbox numbers kept colliding with used ones; try again".into(),
                ));
            }
            // The recipient's number first: its owner may refuse (a full
            // inbox, see crate::quota) before anything is reserved here.
            let theirs = if target == me || remote_target {
                None
            } else if let Some(n) = keep_theirs.take() {
                Some(n)
            } else {
                Some(
                    self.reserve_one_admitting(target, their_min, Some(size))
                        .await?,
                )
            };
            let own = match (fill_own, keep_own.take()) {
                (true, _) => None,
                (false, Some(n)) => Some(n),
                (false, None) => Some(self.reserve_one(me, own_min).await?),
            };
            let their_reserved = theirs;
            let Some(theirs) = theirs.or(own) else {
                return Err(Error::Invalid(
                    "internal: a number to fill in for a copy to oneself".into(),
                ));
            };
            let filled: capstan_cluster::store::Filled = Default::default();
            let ctx = self.ctx.clone();
            let (body, remote, recheck) = (body.clone(), remote.clone(), recheck.clone());
            let f2 = filled.clone();
            let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let r = self
                .transact(move |tx| {
                    let (ctx, body, remote, recheck) =
                        (ctx.clone(), body.clone(), remote.clone(), recheck.clone());
                    // A filled number gets one try: run again (its commit
                    // conflicted, perhaps with a slot a stale sequence
                    // handed out twice), the send reserves its number,
                    // which skips such slots (`own_min`).
                    let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let own = match own {
                        Some(n) => n,
                        None if run == 0 => tx.fill(ctx.id.as_bytes(), &f2),
                        None => {
                            return Box::pin(async {
                                Err(Error::Store(StoreError::FillUnavailable(
                                    "the commit with a filled number ran again".into(),
                                )))
                            });
                        }
                    };
                    Box::pin(async move {
                        // A fresh request id and freshly reserved inbox slots
                        // are absent: on a first, possibly stale attempt they
                        // are checked by the commit instead of read (a retry,
                        // or a slot a stale sequence handed out, conflicts,
                        // and the attempt after reads them).
                        tx.expect_absent(&keys::dedup(&ctx.id, &req));
                        tx.expect_absent(&keys::message(&ctx.id, own));
                        if target != ctx.id && remote.is_none() {
                            tx.expect_absent(&keys::message(&target, theirs));
                        }
                        // Everything this transaction reads for sure, in one
                        // round (with what the recipient's check reads).
                        let mut ahead = vec![
                            keys::dedup(&ctx.id, &req),
                            keys::inbox_mark(&ctx.id),
                            keys::message(&ctx.id, own),
                        ];
                        if target != ctx.id && remote.is_none() {
                            ahead.push(keys::inbox_mark(&target));
                            ahead.push(keys::message(&target, theirs));
                        }
                        if let Some(r) = &recheck {
                            ahead.extend(recipient_keys(&ctx, r, &target));
                        }
                        tx.prefetch(&ahead).await?;
                        if let Some(r) = &recheck {
                            match resolve_recipient(tx, &ctx, r).await {
                                Ok((t, _, _)) if t == target => {}
                                Err(e @ Error::Store(_)) => return Err(e),
                                _ => return Err(Error::RecipientMoved),
                            }
                        }
                        match checked_dedup(tx, &ctx.id, &req).await? {
                            Some(DedupAnswer::Number(n)) => return Ok((n, None, None)),
                            Some(_) => {
                                return Err(Error::Invalid(
                                    "request id reused for another operation".into(),
                                ));
                            }
                            None => {}
                        }
                        let (b, created) = body(tx, &ctx).await?;
                        let mine = MessageRec {
                            number: own,
                            message_id,
                            reply_to: reply_id,
                            from: ctx.id,
                            to: target,
                            date_ms,
                            body: b,
                        };
                        model::put_message(tx, &ctx.id, &mine).await?;
                        if let Some(to) = remote.as_ref() {
                            let env = crate::federation::envelope_of(tx, &mine).await?;
                            crate::federation::enqueue(
                                tx,
                                &crate::federation::OutboxItem {
                                    id: RequestId::random(),
                                    sender: ctx.id,
                                    peer: target,
                                    to: to.clone(),
                                    created_us: crate::federation::now_us(),
                                    op: crate::federation::OutOp::Deliver(env),
                                },
                            )?;
                            model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Number(own), date_ms)?;
                            return Ok((own, created, Some((mine, None))));
                        }
                        let copy = (target != ctx.id).then(|| MessageRec {
                            number: theirs,
                            ..mine.clone()
                        });
                        if let Some(c) = &copy {
                            model::put_message(tx, &target, c).await?;
                        }
                        model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Number(own), date_ms)?;
                        Ok((own, created, Some((mine, copy))))
                    })
                })
                .await;
            match r {
                // no relay fills numbers in now: reserve one
                Err(Error::Store(StoreError::FillUnavailable(why))) if own.is_none() => {
                    tracing::debug!("own number not filled in ({why}); reserving it");
                    fill_own = false;
                    keep_theirs = their_reserved;
                }
                Err(Error::InboxSlotTaken { number, .. })
                    if Some(number) == own && own_min <= number =>
                {
                    own_min = number + 1;
                    keep_theirs = their_reserved;
                }
                Err(Error::InboxSlotTaken { number, .. })
                    if number == theirs && their_min <= number =>
                {
                    their_min = number + 1;
                    // (a copy to oneself has one number: it is the taken one)
                    keep_own = own.filter(|_| their_reserved.is_some());
                }
                r => break (r?, filled),
            }
        };
        let ((mut n, created, mut delivered), filled) = result;
        if n >= model::PLACEHOLDER_NUMBERS {
            // the relay filled the number in: it says which, or (its answer
            // lost, the commit settled as applied) the exactly-once record does
            n = match filled.get() {
                Some(f) => {
                    if let Some(c) = self.rt.cluster.get() {
                        c.learn_interest(me, f.notes.clone());
                    }
                    f.number
                }
                None => self.own_number_of(req).await?,
            };
            if let Some((mine, _)) = &mut delivered {
                mine.number = n;
            }
        }
        if let (Some(open), Some(_)) = (&self.open, &delivered) {
            open.own_copy(n);
        }
        if let Some((mine, copy)) = delivered {
            let me_h = self.clone();
            self.after_commit(move || {
                if remote_target {
                    me_h.rt.outbox.notify_one();
                }
                me_h.notify_delivered(me, mine);
                if let Some(c) = copy {
                    me_h.notify_delivered(target, c);
                }
            });
        }
        Ok((n, created))
    }
}
