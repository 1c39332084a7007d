//! What arrives from another cluster: mail for one of this node's agents,
//! and the answers to requests this node sent. Each applies once per
//! outbox item id.

use capstan_proto::{FormulaId, RequestId};

use super::Caller;
use super::envelope::{Envelope, EnvelopeBody, Settlement};
use super::locators::adopt_ref;
use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::model;
use crate::node::Runtime;
use crate::records::{BodyRec, Formula, FormulaKind, LocatorRec, MessageRec, PromiseRec};

/// Most item ids one [`Runtime::applied_items`] answers.
pub const MAX_APPLIED_QUERY: usize = 256;

/// The record of an item under its id (`keys::inbound`): when, as 8 bytes
/// of milliseconds (what `gc` expires it by), and for an item refused for
/// good (see [`Runtime::receive_deliver`]) one byte more.
fn inbound_value(applied: bool) -> Vec<u8> {
    let mut v = now_ms().to_be_bytes().to_vec();
    if !applied {
        v.push(b'x');
    }
    v
}

/// Whether an item's record says it was refused for good.
fn inbound_refused(v: &[u8]) -> bool {
    v.len() == 9
}

/// What a try of an item already recorded gets: nothing to do when it was
/// applied; the refusal again when it was refused.
fn refused_before(v: &[u8]) -> Result<(), Error> {
    if inbound_refused(v) {
        return Err(Error::Invalid(
            "refused: this item was refused for good before (its sender bounces it)".into(),
        ));
    }
    Ok(())
}

/// Whether mail through a handle given to `peer` (its formula here) may
/// come from a node of cluster `caller`: the handle was given to that
/// cluster's agent (invite/accept), and mail through it is from `peer`. A
/// handle passed on to a third cluster carries none of that cluster's mail
/// as if from `peer` (its holder), and a peer cancelled here sends no more.
fn check_peer(f: Formula, caller: &[u8; 32]) -> Result<(), Error> {
    if let Some(c) = &f.cancelled {
        return Err(Error::Invalid(format!(
            "revoked: mail from this sender is refused here ({})",
            c.reason
        )));
    }
    let given_to = match &f.kind {
        FormulaKind::Remote(r) => r.cluster,
        FormulaKind::Accepting(a) => a.cluster,
        _ => return Err(Error::Corrupt("a handle's peer is not remote".into())),
    };
    if given_to != *caller {
        return Err(Error::Invalid(
            "refused: this handle takes mail only from the cluster it was given to, and it was passed on; ask its holder to introduce you (`capstan invite`)".into(),
        ));
    }
    if matches!(f.kind, FormulaKind::Accepting(_)) {
        return Err(Error::Unavailable(
            "this node is still accepting the invitation; try again later".into(),
        ));
    }
    Ok(())
}

impl Runtime {
    /// Which of `items` (outbox item ids of another cluster) this cluster
    /// applied: delivered, or settled. A sender asks before bouncing an
    /// item the far side refused, as a try may have been applied with its
    /// answer lost (see `Gateway.applied`). At most [`MAX_APPLIED_QUERY`].
    pub async fn applied_items(&self, items: &[RequestId]) -> Result<Vec<bool>, Error> {
        if items.len() > MAX_APPLIED_QUERY {
            return Err(Error::TooLarge {
                what: "item ids".into(),
                len: items.len(),
                max: MAX_APPLIED_QUERY,
            });
        }
        let keys: Vec<Vec<u8>> = items.iter().map(keys::inbound).collect();
        self.db()
            .read(move |tx| {
                let keys = keys.clone();
                Box::pin(async move {
                    let mut out = Vec::with_capacity(keys.len());
                    for k in &keys {
                        out.push(tx.get(k).await?.is_some_and(|v| !inbound_refused(&v)));
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await
    }

    /// Mail from another cluster for agent `to`, from the remote formula
    /// `peer` (the handle's record says who it was given to). Applies once
    /// per `item` id.
    pub async fn receive_deliver(
        &self,
        to: FormulaId,
        peer: FormulaId,
        item: RequestId,
        env: Envelope,
        caller: Caller,
    ) -> Result<(), Error> {
        match self.deliver_item(to, peer, item, env, caller).await {
            Err(e) if !e.is_transient() => self.refuse_item(item, e).await,
            r => r,
        }
    }

    /// A refusal for good of item `item` (its sender bounces it): recorded
    /// under the item's id, in a transaction that conflicts with one
    /// applying the same item, so that a try of it still in flight (from
    /// another node of the sending cluster, or an earlier try of this one)
    /// can no longer land: mail is delivered or bounced, never both. When
    /// such a try applied first, the item was delivered: `Ok`.
    async fn refuse_item(&self, item: RequestId, why: Error) -> Result<(), Error> {
        let why_text = why.to_string();
        let applied = self
            .db()
            .transact(move |tx| {
                Box::pin(async move {
                    match tx.get(&keys::inbound(&item)).await? {
                        Some(v) => Ok(!inbound_refused(&v)),
                        None => {
                            tx.set(&keys::inbound(&item), &inbound_value(false))?;
                            Ok::<_, Error>(false)
                        }
                    }
                })
            })
            .await;
        match applied {
            Ok(true) => Ok(()),
            Ok(false) => Err(why),
            Err(e) => {
                // (not recorded: the sender tries again later, and is told
                // the refusal again, then recorded)
                tracing::debug!("a refusal of an item not recorded ({e}): {why_text}");
                Err(Error::Unavailable(format!(
                    "{why_text} (not recorded yet: try again)"
                )))
            }
        }
    }

    /// [`Runtime::receive_deliver`] without recording a refusal.
    async fn deliver_item(
        &self,
        to: FormulaId,
        peer: FormulaId,
        item: RequestId,
        env: Envelope,
        caller: Caller,
    ) -> Result<(), Error> {
        let db = self.db().clone();
        let earlier = db
            .read(move |tx| {
                Box::pin(async move { Ok::<_, Error>(tx.get(&keys::inbound(&item)).await?) })
            })
            .await?;
        if let Some(v) = earlier {
            return refused_before(&v);
        }
        let agent = self.handle_for(to).await?;
        let (own, from_cluster) = (caller.own, caller.cluster);
        // Admitted under the recipient's quota: a full inbox refuses for
        // good, and the sender's node bounces the mail to its sender.
        let size = match &env.body {
            EnvelopeBody::Package {
                strings,
                names,
                refs,
            } => crate::quota::message_size(
                strings.iter().map(String::len).sum(),
                names.iter().map(String::len).sum(),
                refs.len(),
            ),
            EnvelopeBody::Request { description, .. } => {
                crate::quota::message_size(description.len(), 0, 1)
            }
        };
        let delivered = agent
            .with_fresh_number_admitting(to, Some(size), |number| {
                let env = env.clone();
                db.transact(move |tx| {
                    let env = env.clone();
                    Box::pin(async move {
                        if let Some(v) = tx.get(&keys::inbound(&item)).await? {
                            return refused_before(&v).map(|()| None);
                        }
                        // Checked in the transaction that applies the item:
                        // a delivery whose locator check passed before the
                        // recipient was cancelled must not land after it
                        // (its sender is told it bounced).
                        if let Some(c) = model::must_formula(tx, &to).await?.cancelled {
                            return Err(Error::Invalid(format!(
                                "revoked: the recipient was cancelled ({})",
                                c.reason
                            )));
                        }
                        check_peer(model::must_formula(tx, &peer).await?, &from_cluster)?;
                        let body = match env.body {
                            EnvelopeBody::Package {
                                strings,
                                names,
                                refs,
                            } => {
                                let mut ids = Vec::with_capacity(refs.len());
                                for r in &refs {
                                    ids.push(adopt_ref(tx, r, &own).await?);
                                }
                                BodyRec::Package {
                                    strings,
                                    names,
                                    ids,
                                }
                            }
                            EnvelopeBody::Request {
                                description,
                                resolver,
                            } => {
                                let promise = FormulaId::random();
                                model::put_formula(
                                    tx,
                                    &promise,
                                    &Formula {
                                        created_ms: now_ms(),
                                        cancelled: None,
                                        kind: FormulaKind::Promise(PromiseRec {
                                            description: description.clone(),
                                            requester: peer,
                                            state: crate::PromiseState::Pending,
                                            resolver: Some(resolver),
                                        }),
                                    },
                                )?;
                                BodyRec::Request {
                                    description,
                                    promise,
                                }
                            }
                        };
                        let m = MessageRec {
                            number,
                            message_id: env.message_id,
                            reply_to: env.reply_to,
                            from: peer,
                            to,
                            date_ms: env.date_ms,
                            body,
                        };
                        model::put_message(tx, &to, &m).await?;
                        tx.set(&keys::inbound(&item), &inbound_value(true))?;
                        Ok(Some(m))
                    })
                })
            })
            .await?;
        if let Some(m) = delivered {
            agent.notify_delivered(to, m);
        }
        Ok(())
    }

    /// The answer to a request this node sent, through the locator whose
    /// swiss hashes to `hash`: settles the promise it designates. Only the
    /// locator sent to the request's recipient may (anyone else holding the
    /// promise can only read it). Applies once per `item` id.
    pub async fn receive_settle(
        &self,
        hash: [u8; 32],
        item: RequestId,
        s: Settlement,
        caller: Caller,
    ) -> Result<FormulaId, Error> {
        let own = caller.own;
        let (promise, state) = self
            .db()
            .transact(move |tx| {
                let s = s.clone();
                Box::pin(async move {
                    let rec = match tx.get(&keys::locator(&hash)).await? {
                        Some(b) => LocatorRec::decode(&b)?,
                        None => {
                            return Err(Error::Invalid(
                                "revoked: the locator of this capability was cancelled".into(),
                            ));
                        }
                    };
                    if !rec.resolver {
                        return Err(Error::Invalid(
                            "this capability cannot answer the request: only the one given to the request's recipient can (a reference to a request's result only reads it)".into(),
                        ));
                    }
                    let promise = rec.target;
                    if tx.get(&keys::inbound(&item)).await?.is_some() {
                        return Ok((promise, None));
                    }
                    let mut f = model::must_formula(tx, &promise).await?;
                    let FormulaKind::Promise(p) = &mut f.kind else {
                        return Err(Error::Invalid(
                            "this capability is not a request's promise".into(),
                        ));
                    };
                    let settled =
                        |_| Error::Invalid("the request is already settled".into());
                    crate::rules::mail::pending(&p.state).map_err(settled)?;
                    let outcome = match s {
                        Settlement::Resolved(r) => Ok(adopt_ref(tx, &r, &own).await?),
                        Settlement::Rejected(why) => Err(why),
                    };
                    p.state = crate::rules::mail::settle(&p.state, outcome).map_err(settled)?;
                    let state = p.state.clone();
                    if let crate::PromiseState::Resolved(t) = &state {
                        model::note_ref(tx, t).await?;
                    }
                    model::put_formula(tx, &promise, &f)?;
                    tx.set(&keys::inbound(&item), &now_ms().to_be_bytes())?;
                    Ok((promise, Some(state)))
                })
            })
            .await?;
        if let Some(state) = state {
            crate::node::notify_settled(self.inner(), promise, state);
        }
        Ok(promise)
    }
}
