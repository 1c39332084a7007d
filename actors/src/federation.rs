//! Mail between clusters: invitations, the outbox, and what arrives from
//! other clusters.
//!
//! # The model
//!
//! `invite NAME` makes an invitation formula under NAME and a one-use
//! locator for it. The invited node's `accept` redeems it over the network
//! (`Object.accept`), handing over a *handle*: a locator for its own agent
//! whose record names the remote formula standing for the inviter there.
//! The inviter answers with a handle for itself, recorded the same way. Each
//! side then holds a remote formula for the other agent, and mail that
//! arrives through a handle is attributed to the formula it names — a peer
//! cannot claim to be anyone else.
//!
//! Both steps are retry-safe and crash-safe. `invite` applies once per
//! request id. `accept` first holds its name with an `accepting` formula
//! (which records the request id it redeems with) and records the handle
//! it offers, in one transaction; then asks the inviter; then turns the
//! placeholder into the inviter's remote formula. A retry, or the same
//! accept run again after a failure or a crash, goes on with the same
//! placeholder and request id. The inviter turns the invitation formula
//! itself into the remote formula for the accepting agent (so every name
//! of it, copies included, names that agent), and answers the same
//! redeemer retrying with the same request id the same way.
//!
//! Sending to a remote formula is the local send with one difference: the
//! recipient's copy is not written into an inbox here but into this node's
//! outbox, in the same transaction as the sender's own copy. References in
//! the message travel as locators issued in that transaction (or, for
//! references that are themselves remote, as the locator they came from, so
//! a capability passed A → B → C is invoked by C on A directly). The
//! network layer (`nodes/`) delivers outbox items in order per destination,
//! removes each once the far side acknowledged it, and retries after
//! failures; the far side deduplicates by the item's id, so a delivery that
//! was applied but whose answer was lost applies once. A request carries a
//! locator for the requester's promise; resolving it on the far side queues
//! a settlement back the same way.
//!
//! Nothing here is live: a message in an inbox must survive restarts of
//! either node, so it holds sturdy references (locators), which the network
//! layer turns into live Cap'n Proto capabilities when used.

use std::sync::Arc;

use capnp::message::Builder;
use capstan_cluster::Transaction;
use capstan_proto::records_capnp as rc;
use capstan_proto::{FormulaId, RequestId};

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::keys;
use crate::model::{self, Ctx};
use crate::names::Path;
use crate::node::{Runtime, now_ms};
use crate::records::{
    AcceptedRec, AcceptingRec, BodyRec, DedupAnswer, Formula, FormulaKind, InvitationRec,
    LocatorRec, MessageRec, PromiseRec, RemoteRec, id_of, options, text, to_bytes,
};
use crate::remote::swiss_hash;

/// Most outbox items of one peer cluster handed to the network layer at once.
pub const OUTBOX_BATCH: usize = 64;
/// Most peer clusters with mail listed at once ([`Runtime::outbox_peers`]).
pub const OUTBOX_PEERS: usize = 1024;

/// A message for an agent of another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: RequestId,
    pub reply_to: Option<RequestId>,
    pub date_ms: u64,
    pub body: EnvelopeBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeBody {
    Package {
        strings: Vec<String>,
        names: Vec<String>,
        refs: Vec<RemoteRec>,
    },
    Request {
        description: String,
        resolver: RemoteRec,
    },
}

/// The answer to a request from another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Resolved(RemoteRec),
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutOp {
    Deliver(Envelope),
    Settle(Settlement),
}

/// Something owed to another cluster; see `records.capnp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: RequestId,
    pub sender: FormulaId,
    pub peer: FormulaId,
    pub to: RemoteRec,
    pub created_us: u64,
    pub op: OutOp,
}

impl Envelope {
    /// Writes the envelope; own-cluster references are completed by `fill`.
    pub fn write(&self, mut b: rc::envelope::Builder<'_>, fill: &dyn Fn(&RemoteRec) -> RemoteRec) {
        b.set_message_id(&self.message_id.0);
        b.set_reply_to(self.reply_to.as_ref().map(|r| &r.0[..]).unwrap_or(&[]));
        b.set_date_ms(self.date_ms);
        let body = b.init_body();
        match &self.body {
            EnvelopeBody::Package {
                strings,
                names,
                refs,
            } => {
                let mut p = body.init_package();
                let mut s = p.reborrow().init_strings(strings.len() as u32);
                for (i, x) in strings.iter().enumerate() {
                    s.set(i as u32, x.as_str());
                }
                let mut n = p.reborrow().init_names(names.len() as u32);
                for (i, x) in names.iter().enumerate() {
                    n.set(i as u32, x.as_str());
                }
                let mut r = p.init_refs(refs.len() as u32);
                for (i, x) in refs.iter().enumerate() {
                    fill(x).write(r.reborrow().get(i as u32));
                }
            }
            EnvelopeBody::Request {
                description,
                resolver,
            } => {
                let mut r = body.init_request();
                r.set_description(description.as_str());
                fill(resolver).write(r.init_resolver());
            }
        }
    }

    /// Reads and validates an envelope (`own_allowed`: from the outbox).
    pub fn read(r: rc::envelope::Reader<'_>, own_allowed: bool) -> Result<Envelope, Error> {
        let rid = |d: &[u8]| RequestId::from_slice(d).map_err(|e| Error::Corrupt(e.to_string()));
        let reply = r.get_reply_to()?;
        use rc::envelope::body::Which;
        let body = match r
            .get_body()
            .which()
            .map_err(|e| Error::Corrupt(e.to_string()))?
        {
            Which::Package(p) => {
                let strings = p
                    .get_strings()?
                    .iter()
                    .map(|t| text(t?))
                    .collect::<Result<Vec<_>, _>>()?;
                let names = p
                    .get_names()?
                    .iter()
                    .map(|t| text(t?))
                    .collect::<Result<Vec<_>, _>>()?;
                let list = p.get_refs()?;
                if list.len() as usize > crate::types::MAX_MESSAGE_REFS {
                    return Err(Error::TooLarge {
                        what: "references".into(),
                        len: list.len() as usize,
                        max: crate::types::MAX_MESSAGE_REFS,
                    });
                }
                let refs = list
                    .iter()
                    .map(|x| RemoteRec::read(x, own_allowed))
                    .collect::<Result<Vec<_>, _>>()?;
                if strings.len() != refs.len() + 1 || names.len() != refs.len() {
                    return Err(Error::Corrupt(
                        "a package needs one more text chunk than references, and a name per reference".into(),
                    ));
                }
                let len: usize = strings.iter().map(String::len).sum();
                if len > crate::types::MAX_MESSAGE_TEXT {
                    return Err(Error::TooLarge {
                        what: "message text".into(),
                        len,
                        max: crate::types::MAX_MESSAGE_TEXT,
                    });
                }
                for n in &names {
                    if !crate::names::is_pet_name(n) {
                        return Err(Error::InvalidName(n.clone()));
                    }
                }
                EnvelopeBody::Package {
                    strings,
                    names,
                    refs,
                }
            }
            Which::Request(q) => {
                let description = text(q.get_description()?)?;
                if description.len() > crate::types::MAX_MESSAGE_TEXT {
                    return Err(Error::TooLarge {
                        what: "description".into(),
                        len: description.len(),
                        max: crate::types::MAX_MESSAGE_TEXT,
                    });
                }
                EnvelopeBody::Request {
                    description,
                    resolver: RemoteRec::read(q.get_resolver()?, own_allowed)?,
                }
            }
        };
        Ok(Envelope {
            message_id: rid(r.get_message_id()?)?,
            reply_to: if reply.is_empty() {
                None
            } else {
                Some(rid(reply)?)
            },
            date_ms: r.get_date_ms(),
            body,
        })
    }
}

impl Settlement {
    pub fn write(&self, b: rc::settlement::Builder<'_>, fill: &dyn Fn(&RemoteRec) -> RemoteRec) {
        match self {
            Settlement::Resolved(r) => fill(r).write(b.init_resolved()),
            Settlement::Rejected(why) => {
                let mut b = b;
                b.set_rejected(why.as_str())
            }
        }
    }

    pub fn read(r: rc::settlement::Reader<'_>, own_allowed: bool) -> Result<Settlement, Error> {
        use rc::settlement::Which;
        Ok(
            match r.which().map_err(|e| Error::Corrupt(e.to_string()))? {
                Which::Resolved(x) => Settlement::Resolved(RemoteRec::read(x?, own_allowed)?),
                Which::Rejected(t) => {
                    let t = text(t?)?;
                    if t.len() > crate::types::MAX_MESSAGE_TEXT {
                        return Err(Error::TooLarge {
                            what: "reason".into(),
                            len: t.len(),
                            max: crate::types::MAX_MESSAGE_TEXT,
                        });
                    }
                    Settlement::Rejected(t)
                }
            },
        )
    }
}

impl OutboxItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut b = msg.init_root::<rc::outbox_item::Builder<'_>>();
        b.set_id(&self.id.0);
        b.set_sender(self.sender.as_bytes());
        b.set_peer(self.peer.as_bytes());
        self.to.write(b.reborrow().init_to());
        b.set_created_us(self.created_us);
        let same = |r: &RemoteRec| r.clone();
        match &self.op {
            OutOp::Deliver(e) => e.write(b.init_deliver(), &same),
            OutOp::Settle(s) => s.write(b.init_settle(), &same),
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<OutboxItem, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let r = msg.get_root::<rc::outbox_item::Reader<'_>>()?;
        use rc::outbox_item::Which;
        let op = match r.which().map_err(|e| Error::Corrupt(e.to_string()))? {
            Which::Deliver(e) => OutOp::Deliver(Envelope::read(e?, true)?),
            Which::Settle(s) => OutOp::Settle(Settlement::read(s?, true)?),
        };
        Ok(OutboxItem {
            id: RequestId::from_slice(r.get_id()?).map_err(|e| Error::Corrupt(e.to_string()))?,
            sender: id_of(r.get_sender()?)?,
            peer: id_of(r.get_peer()?)?,
            to: RemoteRec::read(r.get_to()?, false)?,
            created_us: r.get_created_us(),
            op,
        })
    }

    /// Where it is stored: in the queue of the peer cluster it goes to, in
    /// creation order, so delivery keeps send order per destination.
    pub fn key(&self) -> Vec<u8> {
        keys::outbox(&self.to.cluster, self.created_us, &self.id)
    }
}

/// Issues a locator for `target` inside a transaction; returns its swiss.
pub(crate) fn issue_locator(
    tx: &mut Transaction,
    target: &FormulaId,
    peer: Option<FormulaId>,
) -> Result<[u8; 32], Error> {
    let mut swiss = [0u8; 32];
    getrandom::fill(&mut swiss)
        .map_err(|e| Error::Unavailable(format!("no randomness for a swiss number: {e}")))?;
    record_locator(tx, &swiss, target, peer)?;
    Ok(swiss)
}

/// Issues the locator that answers request `promise`, for its recipient on
/// another cluster (the only locator through which it can be settled).
fn issue_resolver(tx: &mut Transaction, promise: &FormulaId) -> Result<[u8; 32], Error> {
    let mut swiss = [0u8; 32];
    getrandom::fill(&mut swiss)
        .map_err(|e| Error::Unavailable(format!("no randomness for a swiss number: {e}")))?;
    put_locator(
        tx,
        &swiss,
        LocatorRec {
            target: *promise,
            created_ms: now_ms(),
            peer: None,
            resolver: true,
            accepted: None,
        },
    )?;
    Ok(swiss)
}

/// Records `swiss` (by its hash only) as a locator of `target`.
pub(crate) fn record_locator(
    tx: &mut Transaction,
    swiss: &[u8; 32],
    target: &FormulaId,
    peer: Option<FormulaId>,
) -> Result<(), Error> {
    put_locator(
        tx,
        swiss,
        LocatorRec {
            target: *target,
            created_ms: now_ms(),
            peer,
            resolver: false,
            accepted: None,
        },
    )
}

fn put_locator(tx: &mut Transaction, swiss: &[u8; 32], rec: LocatorRec) -> Result<(), Error> {
    let hash = swiss_hash(swiss);
    tx.set(&keys::locator(&hash), &rec.encode())?;
    tx.set(&keys::locator_of(&rec.target, &hash), &[])?;
    // The write barrier of garbage collection, blind (this path does not
    // read): a new stamp, and the target rescued should a pass have
    // condemned it (the pass then stops; see `crate::gc`).
    let stamp = swiss_hash(&hash);
    tx.set(&keys::formula_ref(&rec.target), &stamp[..8])?;
    tx.clear(&keys::condemned(&rec.target));
    tx.set(&keys::gc_rescued(), &stamp[..8])?;
    Ok(())
}

/// How a formula travels in a message to another cluster: a remote formula
/// as the reference it holds, anything else as a new locator of this node.
pub(crate) async fn wire_ref(tx: &mut Transaction, id: &FormulaId) -> Result<RemoteRec, Error> {
    let f = model::must_formula(tx, id).await?;
    match f.kind {
        FormulaKind::Remote(r) => Ok(r),
        _ => Ok(RemoteRec::own(issue_locator(tx, id, None)?)),
    }
}

/// The formula a reference from another cluster becomes here: the local
/// formula when it designates this cluster, else a new remote formula.
async fn adopt_ref(
    tx: &mut Transaction,
    r: &RemoteRec,
    own: &[u8; 32],
) -> Result<FormulaId, Error> {
    if r.cluster == *own {
        return match tx.get(&keys::locator(&swiss_hash(&r.swiss))).await? {
            Some(b) => Ok(LocatorRec::decode(&b)?.target),
            None => Err(Error::Invalid(
                "the message carries a reference to this node that is unknown or revoked".into(),
            )),
        };
    }
    let id = FormulaId::random();
    model::put_formula(
        tx,
        &id,
        &Formula {
            created_ms: now_ms(),
            cancelled: None,
            kind: FormulaKind::Remote(r.clone()),
        },
    )?;
    Ok(id)
}

/// Microseconds since the epoch (outbox order).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The envelope of a message to another cluster, its references made
/// into locators (inside the sending transaction).
pub(crate) async fn envelope_of(tx: &mut Transaction, m: &MessageRec) -> Result<Envelope, Error> {
    let body = match &m.body {
        BodyRec::Package {
            strings,
            names,
            ids,
        } => {
            let mut refs = Vec::with_capacity(ids.len());
            for id in ids {
                refs.push(wire_ref(tx, id).await?);
            }
            EnvelopeBody::Package {
                strings: strings.clone(),
                names: names.clone(),
                refs,
            }
        }
        BodyRec::Request {
            description,
            promise,
        } => EnvelopeBody::Request {
            description: description.clone(),
            resolver: RemoteRec::own(issue_resolver(tx, promise)?),
        },
    };
    Ok(Envelope {
        message_id: m.message_id,
        reply_to: m.reply_to,
        date_ms: m.date_ms,
        body,
    })
}

/// Queues an item in the outbox (inside the caller's transaction).
pub(crate) fn enqueue(tx: &mut Transaction, item: &OutboxItem) -> Result<(), Error> {
    tx.set(&item.key(), &item.encode())?;
    Ok(())
}

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

/// The hashes in index keys `("locf", target, hash)`.
fn index_hash(k: &[u8]) -> Result<[u8; 32], Error> {
    let mut r = capstan_cluster::tuple::TupleReader::new(k);
    let hash = (|| {
        r.str()?;
        r.bytes()?;
        r.bytes()
    })()
    .map_err(|e| Error::Corrupt(format!("locator index key: {e}")))?;
    hash.as_slice()
        .try_into()
        .map_err(|_| Error::Corrupt("locator index key".into()))
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
                getrandom::fill(&mut handle).map_err(|e| {
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
                match model::must_formula(tx, &placeholder).await?.kind {
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
    /// invitation and revokes the handles offered.
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
                for h in &a.handles {
                    tx.clear(&keys::locator(h));
                    tx.clear(&keys::locator_of(&ctx.id, h));
                }
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

/// Who is on the other end of a call from another cluster.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The authenticated cluster of the calling node.
    pub cluster: [u8; 32],
    /// This node's own cluster.
    pub own: [u8; 32],
}

impl Runtime {
    /// A locator record by the hash of its swiss number.
    pub async fn locator_record(&self, hash: [u8; 32]) -> Result<Option<LocatorRec>, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    match tx.get(&keys::locator(&hash)).await? {
                        Some(b) => Ok(Some(LocatorRec::decode(&b)?)),
                        None => Ok(None),
                    }
                })
            })
            .await
    }

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
        let db = self.db().clone();
        if db
            .read(move |tx| {
                Box::pin(
                    async move { Ok::<_, Error>(tx.get(&keys::inbound(&item)).await?.is_some()) },
                )
            })
            .await?
        {
            return Ok(());
        }
        let agent = self.handle_for(to).await?;
        let own = caller.own;
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
                        if tx.get(&keys::inbound(&item)).await?.is_some() {
                            return Ok(None);
                        }
                        match model::must_formula(tx, &peer).await?.kind {
                            FormulaKind::Remote(_) => {}
                            FormulaKind::Accepting(_) => {
                                return Err(Error::Unavailable(
                                    "this node is still accepting the invitation; try again later"
                                        .into(),
                                ));
                            }
                            _ => {
                                return Err(Error::Corrupt("a handle's peer is not remote".into()));
                            }
                        }
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
                        tx.set(&keys::inbound(&item), &now_ms().to_be_bytes())?;
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
                    if p.state != crate::PromiseState::Pending {
                        return Err(Error::Invalid("the request is already settled".into()));
                    }
                    p.state = match s {
                        Settlement::Resolved(r) => {
                            crate::PromiseState::Resolved(adopt_ref(tx, &r, &own).await?)
                        }
                        Settlement::Rejected(why) => crate::PromiseState::Rejected(why),
                    };
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
            crate::promises::notify_settled(self.inner(), promise, state);
        }
        Ok(promise)
    }

    /// The peer clusters that have mail in the outbox: at most `limit`, in
    /// id order starting after `after` and wrapping around (so that a
    /// caller going on from the last one it got sees them all in turn).
    /// Each queue costs one key read, however long it is.
    pub async fn outbox_peers(
        &self,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> Result<Vec<[u8; 32]>, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    let all = keys::outbox_all();
                    let end = capstan_cluster::tuple::prefix_end(&all);
                    let start = match &after {
                        Some(c) => capstan_cluster::tuple::prefix_end(&keys::outbox_of(c)),
                        None => all.clone(),
                    };
                    let mut out: Vec<[u8; 32]> = Vec::new();
                    // From `start` to the end, then from the beginning up to `start`.
                    for (mut cursor, stop) in [(start.clone(), end), (all, start)] {
                        while out.len() < limit && cursor < stop {
                            let rows = tx
                                .get_range(
                                    capstan_cluster::RangeOption::new(cursor.clone(), stop.clone())
                                        .with_limit(1),
                                )
                                .await?;
                            let Some((k, _)) = rows.into_iter().next() else {
                                break;
                            };
                            let mut r = capstan_cluster::tuple::TupleReader::new(&k);
                            let c = (|| {
                                r.str()?;
                                r.bytes()
                            })()
                            .map_err(|e| Error::Corrupt(format!("outbox key: {e}")))?;
                            let c: [u8; 32] = c
                                .as_slice()
                                .try_into()
                                .map_err(|_| Error::Corrupt("outbox key: cluster id".into()))?;
                            if !out.contains(&c) {
                                out.push(c);
                            }
                            cursor = capstan_cluster::tuple::prefix_end(&keys::outbox_of(&c));
                        }
                    }
                    Ok(out)
                })
            })
            .await
    }

    /// The oldest items of the queue of peer cluster `cluster` (at most
    /// `limit`). A corrupt item, which could never be delivered, is
    /// dropped (and logged) so that it does not block the ones behind it.
    pub async fn outbox_for(
        &self,
        cluster: [u8; 32],
        limit: usize,
    ) -> Result<Vec<OutboxItem>, Error> {
        let (items, corrupt) = self
            .db()
            .read(move |tx| {
                Box::pin(async move {
                    let rows = tx
                        .get_prefix(&keys::outbox_of(&cluster), limit, false)
                        .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    let mut corrupt = Vec::new();
                    for (k, v) in rows {
                        match OutboxItem::decode(&v) {
                            Ok(i) if i.key() == k => out.push(i),
                            Ok(_) => {
                                tracing::error!(key = %hex::encode(&k), "dropping an outbox item stored under another key than its own");
                                corrupt.push(k);
                            }
                            Err(e) => {
                                tracing::error!(key = %hex::encode(&k), "dropping a corrupt outbox item: {e}");
                                corrupt.push(k);
                            }
                        }
                    }
                    Ok::<_, Error>((out, corrupt))
                })
            })
            .await?;
        if !corrupt.is_empty() {
            let corrupt = Arc::new(corrupt);
            self.db()
                .transact(move |tx| {
                    let corrupt = corrupt.clone();
                    Box::pin(async move {
                        for k in corrupt.iter() {
                            tx.clear(k);
                        }
                        Ok::<_, Error>(())
                    })
                })
                .await?;
        }
        Ok(items)
    }

    /// Moves the items of the single outbox queue of earlier versions into
    /// the queues per peer cluster (at start; nothing to do afterwards).
    /// Returns how many it moved.
    pub async fn migrate_outbox(&self) -> Result<usize, Error> {
        let mut moved = 0;
        loop {
            let n = self
                .db()
                .transact(|tx| {
                    Box::pin(async move {
                        let rows = tx
                            .get_prefix(&keys::outbox_legacy(), OUTBOX_BATCH, false)
                            .await?;
                        for (k, v) in &rows {
                            tx.clear(k);
                            match OutboxItem::decode(v) {
                                Ok(i) => tx.set(&i.key(), v)?,
                                Err(e) => {
                                    tracing::error!(key = %hex::encode(k), "dropping a corrupt outbox item: {e}")
                                }
                            }
                        }
                        Ok::<_, Error>(rows.len())
                    })
                })
                .await?;
            moved += n;
            if n < OUTBOX_BATCH {
                return Ok(moved);
            }
        }
    }

    /// Removes a delivered item.
    pub async fn outbox_done(&self, item: &OutboxItem) -> Result<(), Error> {
        let key = item.key();
        self.db()
            .transact(move |tx| {
                let key = key.clone();
                Box::pin(async move {
                    tx.clear(&key);
                    Ok::<_, Error>(())
                })
            })
            .await
    }

    /// Removes an item the far side refused for good, and tells its sender
    /// why with a message in its inbox (from the peer it was meant for).
    pub async fn outbox_bounce(&self, item: &OutboxItem, reason: &str) -> Result<(), Error> {
        let key = item.key();
        let what = match &item.op {
            OutOp::Deliver(e) => match e.body {
                EnvelopeBody::Request { .. } => "request",
                EnvelopeBody::Package { .. } => "message",
            },
            OutOp::Settle(_) => "answer",
        };
        let text = format!("[undeliverable] your {what} could not be delivered: {reason}");
        let (sender, peer) = (item.sender, item.peer);
        let agent = self.handle_for(sender).await?;
        let m = agent
            .with_fresh_number(sender, |number| {
                let (key, text) = (key.clone(), text.clone());
                self.db().transact(move |tx| {
                    let (key, text) = (key.clone(), text.clone());
                    Box::pin(async move {
                        if tx.get(&key).await?.is_none() {
                            return Ok::<_, Error>(None);
                        }
                        tx.clear(&key);
                        let m = MessageRec {
                            number,
                            message_id: RequestId::random(),
                            reply_to: None,
                            from: peer,
                            to: sender,
                            date_ms: now_ms(),
                            body: BodyRec::Package {
                                strings: vec![text],
                                names: vec![],
                                ids: vec![],
                            },
                        };
                        model::put_message(tx, &sender, &m).await?;
                        Ok(Some(m))
                    })
                })
            })
            .await?;
        if let Some(m) = m {
            agent.notify_delivered(sender, m);
        }
        Ok(())
    }

    /// Resolves once new outbox items may be waiting.
    pub async fn outbox_changed(&self) {
        self.inner().outbox.notified().await
    }

    async fn handle_for(&self, id: FormulaId) -> Result<AgentHandle, Error> {
        let ctx: Ctx = crate::node::load_agent(self.db(), id).await?;
        Ok(AgentHandle {
            rt: self.inner().clone(),
            ctx: Arc::new(ctx),
            fence: None,
            journal: None,
            open: None,
        })
    }
}
