//! References between clusters: locators this node issues (`locate`,
//! `cancel`, redeemed by `Runtime::restore`) and remote formulas adopted
//! from other clusters' locators (`adopt_locator`).
//!
//! Only `blake3(swiss)` of an issued locator is stored; the swiss number is
//! shown once, to the agent that asked for it. A remote formula stores the
//! swiss it was given: it is the bearer secret that lets this node restore
//! the capability on the other cluster. The network itself lives in
//! `nodes/`: this module only keeps the durable records.

use capstan_proto::{FormulaId, RequestId};

use crate::agent::AgentHandle;
use crate::directory::entry_detail;
use crate::error::Error;
use crate::keys;
use crate::model;
use crate::model::settle_target;
use crate::names::Path;
use crate::node::Runtime;
use crate::records::{DedupAnswer, FormulaKind, LocatorRec, RemoteRec};
use crate::types::ValueKind;

/// Kept here too: `nodes/` names it under this path.
pub use crate::keys::swiss_hash;

/// What a path names, for the network layer: a local formula or a remote one.
#[derive(Debug, Clone)]
pub enum Target {
    Local { id: FormulaId, kind: String },
    Remote { id: FormulaId, remote: RemoteRec },
}

/// What a restored capability designates, as shown to the other side.
#[derive(Debug, Clone)]
pub struct Shown {
    pub kind: String,
    pub detail: String,
}

impl AgentHandle {
    /// Issues a new locator for what `path` names; returns its swiss number.
    ///
    /// Not deduplicated: the swiss cannot be recomputed from what is stored
    /// (only its hash is), so a retried `locate` issues a second locator. An
    /// unused locator is harmless, and `cancel` revokes them all.
    pub async fn locate(&self, path: &str) -> Result<(FormulaId, [u8; 32]), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.transact(move |tx| {
                let (ctx, p) = (ctx.clone(), p.clone());
                Box::pin(async move {
                    let id = model::resolve(tx, &ctx, &p).await?;
                    let f = model::must_formula(tx, &id).await?;
                    if let FormulaKind::Remote(_) = f.kind {
                        return Err(Error::Invalid(format!(
                            "{p} is a reference to another cluster; share the locator it was adopted from instead"
                        )));
                    }
                    let swiss = crate::federation::issue_locator(tx, &id, None)?;
                    Ok((id, swiss))
                })
            })
            .await
    }

    /// Names a capability of another cluster: a remote formula under `path`.
    pub async fn adopt_locator(
        &self,
        req: RequestId,
        path: &str,
        remote: RemoteRec,
    ) -> Result<FormulaId, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(path)?;
        self.transact(move |tx| {
            let (ctx, p, remote) = (ctx.clone(), p.clone(), remote.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = model::dedup_get(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let dir = model::free_name(tx, &ctx, &p).await?;
                let id = FormulaId::random();
                model::bind_new_name(
                    tx,
                    &ctx,
                    &req,
                    (&dir, p.last()),
                    &id,
                    FormulaKind::Remote(remote),
                )
                .await?;
                Ok(id)
            })
        })
        .await
    }

    /// What `path` names: local, or a reference to another cluster.
    pub async fn target(&self, path: &str) -> Result<Target, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.rt
            .db
            .read(move |tx| {
                let (ctx, p) = (ctx.clone(), p.clone());
                Box::pin(async move {
                    let id = model::resolve(tx, &ctx, &p).await?;
                    let (tid, f) = settle_target(tx, id).await?;
                    Ok(match f.kind {
                        FormulaKind::Remote(remote) => Target::Remote { id: tid, remote },
                        other => Target::Local {
                            id: tid,
                            kind: other.type_name().into(),
                        },
                    })
                })
            })
            .await
    }
}

impl Runtime {
    /// Redeems a swiss number: the formula its locator designates, or
    /// `None` when it is unknown or revoked.
    pub async fn restore(&self, swiss: &[u8; 32]) -> Result<Option<FormulaId>, Error> {
        self.restore_hash(swiss_hash(swiss)).await
    }

    /// As [`Runtime::restore`], by hash (live capabilities re-check this way).
    pub async fn restore_hash(&self, hash: [u8; 32]) -> Result<Option<FormulaId>, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    match tx.get(&keys::locator(&hash)).await? {
                        Some(b) => Ok(Some(LocatorRec::decode(&b)?.target)),
                        None => Ok(None),
                    }
                })
            })
            .await
    }

    /// Type and detail of a formula (resolved promises followed).
    pub async fn show_formula(&self, id: FormulaId) -> Result<Shown, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    let (_, f) = settle_target(tx, id).await?;
                    Ok(Shown {
                        kind: f.kind.type_name().into(),
                        detail: entry_detail(&f),
                    })
                })
            })
            .await
    }

    /// The bytes of a stored value (resolved promises followed).
    pub async fn cat_formula(&self, id: FormulaId) -> Result<(ValueKind, Vec<u8>), Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    let (tid, f) = settle_target(tx, id).await?;
                    match f.kind {
                        FormulaKind::Value(v) => {
                            let data = crate::model::value_bytes(tx, &tid, &v).await?;
                            Ok((v.kind, data))
                        }
                        FormulaKind::Promise(crate::records::PromiseRec { state, .. }) => Err(
                            crate::model::promise_has_no_value("what this locator names", &state),
                        ),
                        other => Err(Error::WrongType {
                            name: format!("id:{}", tid.short()),
                            expected: "value".into(),
                            actual: other.type_name().into(),
                        }),
                    }
                })
            })
            .await
    }
}
