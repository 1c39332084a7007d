//! [`AgentHandle`], the capability to act as one agent, and the
//! transactions it runs (fenced, journalled, batched).

use crate::error::Error;
use crate::model::{self, Ctx};
use crate::names::Path;
use crate::records::DedupAnswer;
use capstan_proto::{FormulaId, RequestId};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::node::{Inner, Runtime, load_agent};

/// The capability to act as one agent (host or guest).
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) rt: Arc<Inner>,
    pub(crate) ctx: Arc<Ctx>,
    /// In a cluster, for the handle a guest's component acts through: its
    /// writes are refused unless this node still owns the guest.
    pub(crate) fence: Option<crate::cluster::Fence>,
    /// For the handle a guest's handler acts through: the answers of its
    /// reads, written with its next write (see [`crate::guest::journal`]).
    pub(crate) journal: Option<Arc<crate::journal::Journal>>,
    /// For the handle a guest runner's handlers act through: the batch
    /// their operations run in (see [`crate::open_tx`]).
    pub(crate) open: Option<Arc<crate::open_tx::OpenTx>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentHandle({})", self.ctx.id.short())
    }
}

/// What a store transaction of a mutating operation returns, with the answer
/// recorded for exactly-once retries.
pub(crate) async fn checked_dedup(
    tx: &mut capstan_cluster::Transaction,
    agent: &FormulaId,
    req: &RequestId,
) -> Result<Option<DedupAnswer>, Error> {
    model::dedup_get(tx, agent, req).await
}

impl AgentHandle {
    /// Acting as agent `id` (for the guest host).
    pub(crate) async fn load(rt: &Arc<Inner>, id: FormulaId) -> Result<AgentHandle, Error> {
        let rec = load_agent(&rt.db, id).await?;
        Ok(AgentHandle {
            rt: rt.clone(),
            ctx: Arc::new(rec),
            fence: None,
            journal: None,
            open: None,
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.rt
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    pub fn id(&self) -> FormulaId {
        self.ctx.id
    }

    /// Whether this agent is a host.
    pub fn is_host(&self) -> bool {
        self.ctx.is_host
    }

    /// The agent (host or guest) this agent holds under `path`.
    pub async fn agent(&self, path: &str) -> Result<AgentHandle, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        let id = self
            .rt
            .db
            .read(move |tx| Box::pin(async move { model::resolve(tx, &ctx, &p).await }))
            .await?;
        if id == self.ctx.id {
            return Ok(self.clone());
        }
        if !self.ctx.is_host {
            return Err(Error::Invalid("a guest cannot act as another agent".into()));
        }
        let rec = load_agent(&self.rt.db, id).await.map_err(|e| match e {
            Error::WrongType { actual, .. } => Error::WrongType {
                name: path.to_string(),
                expected: "host or guest".into(),
                actual,
            },
            e => e,
        })?;
        let me = self.ctx.id;
        let (made, cancelled) = self
            .rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let cancelled = model::get_formula(tx, &id).await?.and_then(|f| f.cancelled);
                    Ok::<_, Error>((model::made_by(tx, &id, &me).await?, cancelled))
                })
            })
            .await?;
        if let Some(c) = cancelled {
            return Err(crate::records::cancelled_error(path, &c, ": it cannot act"));
        }
        if !made {
            return Err(Error::Invalid(format!(
                "{path} is not an agent you made: you can act only as yourself and the agents you made (and theirs)"
            )));
        }
        Ok(AgentHandle {
            rt: self.rt.clone(),
            ctx: Arc::new(rec),
            fence: None,
            journal: None,
            open: None,
        })
    }

    /// Runs a store transaction as this agent: fenced by the placement
    /// of the agent when the handle acts for a guest's component.
    pub(crate) async fn transact<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send,
        F: for<'t> Fn(
                &'t mut capstan_cluster::Transaction,
            ) -> capstan_cluster::TxFuture<'t, T, Error>
            + Send
            + Sync
            + 'static,
    {
        if let Some(open) = &self.open {
            let r = open.run(|tx| f(tx)).await;
            if let Err(Error::Fenced(why)) = &r
                && let Some(c) = self.rt.cluster.get()
            {
                c.fenced.fetch_add(1, Ordering::Relaxed);
                c.forget_owner(&self.ctx.id);
                tracing::warn!("{why}");
            }
            return r;
        }
        if self.fence.is_none() && self.journal.is_none() {
            return self.rt.db.transact(f).await;
        }
        let (fence, journal) = (self.fence.clone(), self.journal.clone());
        let f = Arc::new(f);
        let r = self
            .rt
            .db
            .transact(move |tx| {
                let (f, fence, journal) = (f.clone(), fence.clone(), journal.clone());
                Box::pin(async move {
                    if let Some(fence) = &fence {
                        fence.check(tx).await?;
                    }
                    let pending = journal.as_ref().and_then(|j| j.pending());
                    let t = f(tx).await?;
                    if let (Some(j), Some((bytes, _))) = (&journal, &pending) {
                        capstan_cluster::blob::set_blob(tx, j.key_bytes(), bytes).await?;
                    }
                    Ok((t, pending.map(|(_, g)| g)))
                })
            })
            .await;
        let r = r.map(|(t, generation)| {
            if let (Some(j), Some(g)) = (&self.journal, generation) {
                j.flushed(g);
            }
            t
        });
        if let Err(Error::Fenced(why)) = &r
            && let Some(c) = self.rt.cluster.get()
        {
            c.fenced.fetch_add(1, Ordering::Relaxed);
            c.forget_owner(&self.ctx.id);
            tracing::warn!("{why}");
        }
        r
    }

    /// A read-only transaction as this agent: inside its runner's batch when
    /// it has one (so that it sees the batch's writes), else on a snapshot.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send,
        F: for<'t> FnOnce(
                &'t mut capstan_cluster::Transaction,
            ) -> capstan_cluster::TxFuture<'t, T, Error>
            + Send,
    {
        match &self.open {
            Some(open) => open.run(f).await,
            None => self.rt.db.read(f).await,
        }
    }

    /// Runs `f` once what this agent wrote has committed: now, or after its
    /// runner's batch commits.
    pub(crate) fn after_commit(&self, f: impl FnOnce() + Send + 'static) {
        match &self.open {
            Some(open) => open.after_commit(f),
            None => f(),
        }
    }

    /// Makes what this agent's handler did so far durable (its batch, with
    /// the handler's journal).
    pub(crate) async fn make_durable(&self) -> Result<(), Error> {
        match &self.open {
            Some(open) => open.flush().await,
            None => {
                self.transact(|_| Box::pin(async { Ok::<_, Error>(()) }))
                    .await
            }
        }
    }
}

// `Runtime` is `node`'s; handing out its agents is this module's (the
// node sits below `AgentHandle`, which holds it).
impl Runtime {
    /// The root host of this node's store.
    pub fn root_host(&self) -> AgentHandle {
        AgentHandle {
            rt: self.inner().clone(),
            ctx: self.root.clone(),
            fence: None,
            journal: None,
            open: None,
        }
    }
}
