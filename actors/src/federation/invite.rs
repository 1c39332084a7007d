//! Invitations: `invite` on the inviting side, `begin_accept`,
//! `finish_accept` and `abort_accept` on the accepting side, and
//! redeeming an invitation for a caller from another cluster.

use capstan_proto::{FormulaId, RequestId};

use super::Caller;
use super::locators::{index_hash, issue_locator, record_locator};
use crate::agent::AgentHandle;
use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::keys::swiss_hash;
use crate::model;
use crate::names::Path;
use crate::node::Runtime;
use crate::records::{
    AcceptedRec, AcceptingRec, DedupAnswer, Formula, FormulaKind, InvitationRec, LocatorRec,
    RemoteRec,
};

/// Most attempts at accepting one invitation under one name (each offers
/// the inviter a new handle).
pub const MAX_ACCEPT_ATTEMPTS: usize = 16;

/// What [`AgentHandle::begin_accept`] found to do.
#[derive(Debug, Clone)]
pub enum AcceptStep {
    /// This request was answered already: the inviter's formula here.
    Done(FormulaId),
    /// Ask the inviter: redeem the invitation with request id `req`,
    /// offering `handle` (a new locator of this agent); then
    /// [`AgentHandle::finish_accept`] (or [`AgentHandle::abort_accept`]
    /// when refused for good) with `placeholder`.
    Redeem {
        placeholder: FormulaId,
        req: RequestId,
        handle: [u8; 32],
    },
}

impl AgentHandle {
    /// Invites another node's agent under `name`: an invitation formula
    /// and a one-use locator for it; returns the swiss number. Applies
    /// once per `req`: a retry answers a fresh locator of the same
    /// invitation while it is pending (only hashes of swiss numbers are
    /// stored, so the first one cannot be shown again; accepting either
    /// voids the other).
    pub async fn invite(&self, req: RequestId, name: &str) -> Result<[u8; 32], Error> {
        if !self.ctx.is_host {
            return Err(Error::Invalid(
                "only a host can invite; a guest has only what it was given".into(),
            ));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(name)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                match model::dedup_get(tx, &ctx.id, &req).await? {
                    Some(DedupAnswer::Id(prev)) => {
                        return match model::must_formula(tx, &prev).await?.kind {
                            FormulaKind::Invitation(_) => issue_locator(tx, &prev, None),
                            _ => Err(Error::Invalid(format!(
                                "the invitation {p} was accepted already; it works once"
                            ))),
                        };
                    }
                    Some(_) => {
                        return Err(Error::Invalid(
                            "request id reused for another operation".into(),
                        ));
                    }
                    None => {}
                }
                let dir = model::free_name(tx, &ctx, &p).await?;
                let id = FormulaId::random();
                let kind = FormulaKind::Invitation(InvitationRec {
                    host: ctx.id,
                    dir,
                    name: p.last().to_string(),
                });
                model::bind_new_name(tx, &ctx, &req, (&dir, p.last()), &id, kind).await?;
                issue_locator(tx, &id, None)
            })
        })
        .await
    }

    /// The first step of accepting the invitation of cluster `cluster`
    /// whose swiss is `invitation` under `name`, before the inviter is
    /// asked: holds `name` (a formula of type `accepting`, which becomes
    /// the inviter's `remote` once it answered) and records a new handle
    /// for the inviter. Accepting the same invitation under the same name
    /// again (a retry, or a new attempt after a failure or a crash) goes
    /// on with the first attempt: the inviter is asked with its request id.
    pub async fn begin_accept(
        &self,
        req: RequestId,
        name: &str,
        cluster: [u8; 32],
        invitation: [u8; 32],
    ) -> Result<AcceptStep, Error> {
        if !self.ctx.is_host {
            return Err(Error::Invalid("only a host can accept invitations".into()));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(name)?;
        let inv = swiss_hash(&invitation);
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                match model::dedup_get(tx, &ctx.id, &req).await? {
                    Some(DedupAnswer::Id(prev)) => return Ok(AcceptStep::Done(prev)),
                    Some(_) => {
                        return Err(Error::Invalid(
                            "request id reused for another operation".into(),
                        ));
                    }
                    None => {}
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                let mut handle = [0u8; 32];
                capstan_proto::id::fill_random(&mut handle).map_err(|e| {
                    Error::Unavailable(format!("no randomness for a swiss number: {e}"))
                })?;
                let (placeholder, rec) = match model::lookup(tx, &dir, p.last()).await? {
                    None => {
                        let id = FormulaId::random();
                        let rec = AcceptingRec {
                            host: ctx.id,
                            invitation: inv,
                            cluster,
                            req,
                            handles: Vec::new(),
                        };
                        // The formula before its name (a name must name
                        // a formula: see `model::note_ref`).
                        model::put_formula(
                            tx,
                            &id,
                            &Formula {
                                created_ms: now_ms(),
                                cancelled: None,
                                kind: FormulaKind::Accepting(rec.clone()),
                            },
                        )?;
                        model::set_name(tx, &dir, p.last(), &id).await?;
                        (id, rec)
                    }
                    Some(id) => match model::must_formula(tx, &id).await?.kind {
                        FormulaKind::Accepting(a) if a.host == ctx.id && a.invitation == inv => {
                            if a.handles.len() >= MAX_ACCEPT_ATTEMPTS {
                                return Err(Error::Invalid(format!(
                                    "{p} was tried {MAX_ACCEPT_ATTEMPTS} times already; `capstan remove {p}` gives it up"
                                )));
                            }
                            (id, a)
                        }
                        _ => return Err(Error::NameTaken(p.to_string())),
                    },
                };
                let mut rec = rec;
                rec.handles.push(swiss_hash(&handle));
                let req = rec.req;
                model::put_formula(
                    tx,
                    &placeholder,
                    &Formula {
                        created_ms: now_ms(),
                        cancelled: None,
                        kind: FormulaKind::Accepting(rec),
                    },
                )?;
                // Mail through the handle is from the placeholder (the
                // inviter's formula here, once it answered).
                record_locator(tx, &handle, &ctx.id, Some(placeholder))?;
                Ok(AcceptStep::Redeem {
                    placeholder,
                    req,
                    handle,
                })
            })
        })
        .await
    }

    /// After the inviter answered with `inviter` (its handle for us): the
    /// placeholder becomes the inviter's remote formula. Applies once per
    /// `req`.
    pub async fn finish_accept(
        &self,
        req: RequestId,
        placeholder: FormulaId,
        inviter: RemoteRec,
    ) -> Result<FormulaId, Error> {
        let ctx = self.ctx.clone();
        self.transact(move |tx| {
            let (ctx, inviter) = (ctx.clone(), inviter.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = model::dedup_get(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let now = now_ms();
                let held = model::must_formula(tx, &placeholder).await?;
                if held.cancelled.is_some() {
                    return Err(Error::Invalid(
                        "the name held for this invitation was removed meanwhile, which gave the accept up; nothing was named (the inviter's handle for you is revoked here)".into(),
                    ));
                }
                match held.kind {
                    FormulaKind::Accepting(a) if a.host == ctx.id => {
                        model::put_formula(
                            tx,
                            &placeholder,
                            &Formula {
                                created_ms: now,
                                cancelled: None,
                                kind: FormulaKind::Remote(inviter),
                            },
                        )?;
                        if a.req != req {
                            model::dedup_put(
                                tx,
                                &ctx.id,
                                &a.req,
                                DedupAnswer::Id(placeholder),
                                now,
                            )?;
                        }
                    }
                    // Another attempt finished first.
                    FormulaKind::Remote(_) => {}
                    other => {
                        return Err(Error::Corrupt(format!(
                            "the name held for an invitation became a {}",
                            other.type_name()
                        )));
                    }
                }
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(placeholder), now)?;
                Ok(placeholder)
            })
        })
        .await
    }

    /// The inviter refused for good: frees the name held for the
    /// invitation and revokes the handles offered (see also
    /// [`give_up_accept`]: the name removed by hand).
    pub async fn abort_accept(&self, name: &str, placeholder: FormulaId) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(name)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                let FormulaKind::Accepting(a) = model::must_formula(tx, &placeholder).await?.kind
                else {
                    return Ok(());
                };
                revoke_handles(tx, &ctx.id, &a.handles);
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                if model::lookup(tx, &dir, p.last()).await? == Some(placeholder) {
                    model::remove_name(tx, &dir, p.last()).await?;
                }
                tx.clear(&keys::formula(&placeholder));
                Ok(())
            })
        })
        .await
    }
}

impl Runtime {
    /// Redeems an invitation (`invitation` restored from locator `hash`)
    /// for the caller, with its request id `req`: the invitation formula
    /// becomes a remote formula for the accepting agent (`handle`), so that
    /// every name of the invitation names that agent, and the answer is a
    /// handle (swiss) for the inviting host. One use: every other locator
    /// of the invitation is revoked, and this one serves only the same
    /// caller retrying with the same `req`, which gets the same answer
    /// (the same formula, with a fresh handle; the earlier stay valid).
    pub async fn accept_invitation(
        &self,
        invitation: FormulaId,
        hash: [u8; 32],
        caller: Caller,
        req: RequestId,
        mut handle: RemoteRec,
    ) -> Result<[u8; 32], Error> {
        if handle.cluster != caller.cluster {
            return Err(Error::Invalid(
                "the handle offered belongs to another cluster than the caller's".into(),
            ));
        }
        if handle.addrs.is_empty() {
            return Err(Error::Invalid(
                "the accepting node gave no address; it must listen (`capstan start --listen`)"
                    .into(),
            ));
        }
        handle.addrs.truncate(16);
        self.db()
            .transact(move |tx| {
                let handle = handle.clone();
                Box::pin(async move {
                    let rec = match tx.get(&keys::locator(&hash)).await? {
                        Some(b) => LocatorRec::decode(&b)?,
                        None => {
                            return Err(Error::Invalid(
                                "unknown or revoked locator: it was cancelled, or never issued by this cluster".into(),
                            ));
                        }
                    };
                    if rec.target != invitation {
                        return Err(Error::Invalid("this locator is not an invitation".into()));
                    }
                    if let Some(acc) = &rec.accepted {
                        if acc.cluster == caller.cluster && acc.req == req {
                            // The same redeemer again: the same answer.
                            return issue_locator(tx, &acc.host, Some(invitation));
                        }
                        return Err(Error::Invalid(
                            "this invitation was already used: an invitation works once; ask the inviter for a new one (`capstan invite NAME`)".into(),
                        ));
                    }
                    let f = model::must_formula(tx, &invitation).await?;
                    let FormulaKind::Invitation(inv) = f.kind else {
                        return Err(Error::Invalid("this locator is not an invitation".into()));
                    };
                    // One use: the invitation's other locators die.
                    let rows = tx
                        .get_prefix(&keys::locators_of(&invitation), 0, false)
                        .await?;
                    for (k, _) in rows {
                        let h = index_hash(&k)?;
                        if h != hash {
                            tx.clear(&keys::locator(&h));
                            tx.clear(&k);
                        }
                    }
                    model::put_formula(
                        tx,
                        &invitation,
                        &Formula {
                            created_ms: now_ms(),
                            cancelled: None,
                            kind: FormulaKind::Remote(handle),
                        },
                    )?;
                    tx.set(
                        &keys::locator(&hash),
                        &LocatorRec {
                            accepted: Some(AcceptedRec {
                                cluster: caller.cluster,
                                req,
                                host: inv.host,
                            }),
                            ..rec
                        }
                        .encode(),
                    )?;
                    issue_locator(tx, &inv.host, Some(invitation))
                })
            })
            .await
    }
}

/// A name `host` removed named `id`: when that is a name held for an
/// accept (`accepting`), the accept is given up, as the error of an
/// unfinished `accept` says: the handles offered to the inviter are
/// revoked and the placeholder is cancelled, so the inviter's mail through
/// them bounces rather than waits for an accept nobody will finish (it
/// held up all of the inviter cluster's mail to this one), and an answer
/// arriving later names nothing. Anything else is left alone.
pub(crate) async fn give_up_accept(
    tx: &mut capstan_cluster::Transaction,
    host: &FormulaId,
    id: &FormulaId,
) -> Result<(), Error> {
    let mut f = model::must_formula(tx, id).await?;
    let FormulaKind::Accepting(a) = &f.kind else {
        return Ok(());
    };
    if a.host != *host || f.cancelled.is_some() {
        return Ok(());
    }
    revoke_handles(tx, host, &a.handles);
    f.cancelled = Some(crate::records::Cancelled {
        reason: "the accept was given up (its name removed)".into(),
        at_ms: now_ms(),
    });
    model::put_formula(tx, id, &f)
}

/// Revokes the handles (hashes of their swiss numbers) that `host`
/// offered an inviter for an accept.
fn revoke_handles(tx: &mut capstan_cluster::Transaction, host: &FormulaId, handles: &[[u8; 32]]) {
    for h in handles {
        tx.clear(&keys::locator(h));
        tx.clear(&keys::locator_of(host, h));
    }
}
