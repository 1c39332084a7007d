//! An agent's names: list, show, cat, store, remove, move, copy and the
//! `mk*` commands, and what a name's entry says.

use crate::error::Error;
use crate::keys;
use crate::model::{self, promise_has_no_value, settle_target, value_bytes};
use crate::names::{HOST_ONLY_SPECIALS, Path};
use crate::records::{AgentRec, DedupAnswer, Formula, FormulaKind, PromiseRec};
use capstan_proto::{FormulaId, RequestId};
use std::sync::Arc;

use crate::agent::{AgentHandle, checked_dedup};
use crate::clock::now_ms;
use crate::types::{EntryInfo, MAX_LIST, MAX_VALUE_BYTES, ValueKind, state_text};

pub(crate) fn entry_detail(f: &Formula) -> String {
    if let Some(c) = &f.cancelled {
        return c.reason.clone();
    }
    match &f.kind {
        FormulaKind::Value(v) => {
            let k = match v.kind {
                ValueKind::Text => "text",
                ValueKind::Json => "json",
                ValueKind::Bytes => "bytes",
            };
            format!("{k}, {} bytes", v.size)
        }
        FormulaKind::Promise(p) => state_text(&p.state),
        FormulaKind::Host(a) | FormulaKind::Guest(a) => a.label.clone(),
        FormulaKind::Directory => String::new(),
        FormulaKind::Remote(r) => format!(
            "cluster {} at {}",
            &capstan_proto::locator::encode32(&r.cluster)[..12],
            r.addrs.join(",")
        ),
        FormulaKind::Invitation(_) => "pending: not accepted yet".into(),
        FormulaKind::Accepting(_) => "accepting an invitation: waiting for the inviter".into(),
        FormulaKind::Llm(l) => crate::llm::detail(l),
    }
}

/// The `list` entry of a special name of [`HOST_ONLY_SPECIALS`]: type
/// `special`, and an id of zeros (it names no formula).
fn unvalued_special(name: &str) -> EntryInfo {
    let detail = HOST_ONLY_SPECIALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .unwrap_or("not a value");
    EntryInfo {
        name: name.into(),
        id: FormulaId([0; 32]),
        kind: "special".into(),
        detail: detail.into(),
    }
}

impl AgentHandle {
    pub async fn list(&self, path: &str) -> Result<Vec<EntryInfo>, Error> {
        let ctx = self.ctx.clone();
        let path = if path.is_empty() {
            None
        } else {
            Some(Path::parse(path)?)
        };
        self.read(move |tx| {
            Box::pin(async move {
                let (dir, specials) = match &path {
                    None => (ctx.rec.pet_store, true),
                    Some(p) => {
                        let id = model::resolve(tx, &ctx, p).await?;
                        match model::must_formula(tx, &id).await?.kind {
                            FormulaKind::Directory => (id, false),
                            other => {
                                return Err(Error::WrongType {
                                    name: p.to_string(),
                                    expected: "directory".into(),
                                    actual: other.type_name().into(),
                                });
                            }
                        }
                    }
                };
                let mut out = Vec::new();
                if specials {
                    for (name, id) in [("HOST", ctx.host()), ("SELF", ctx.id)] {
                        let f = model::must_formula(tx, &id).await?;
                        out.push(EntryInfo {
                            name: name.into(),
                            id,
                            kind: f.kind.type_name().into(),
                            detail: entry_detail(&f),
                        });
                    }
                    if ctx.is_host {
                        out.extend(HOST_ONLY_SPECIALS.iter().map(|(n, _)| unvalued_special(n)));
                    }
                }
                for (name, id) in model::list_dir(tx, &dir, MAX_LIST).await? {
                    let f = model::must_formula(tx, &id).await?;
                    out.push(EntryInfo {
                        name,
                        id,
                        kind: f.kind.type_name().into(),
                        detail: entry_detail(&f),
                    });
                }
                Ok(out)
            })
        })
        .await
    }

    pub async fn show(&self, path: &str) -> Result<EntryInfo, Error> {
        if self.ctx.is_host && HOST_ONLY_SPECIALS.iter().any(|(n, _)| *n == path) {
            return Ok(unvalued_special(path));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.read(move |tx| {
            Box::pin(async move {
                let id = model::resolve(tx, &ctx, &p).await?;
                let f = model::must_formula(tx, &id).await?;
                let (tid, tf) = settle_target(tx, id).await?;
                let mut detail = entry_detail(&f);
                if tid != id {
                    detail = format!(
                        "resolved to {} ({}, {})",
                        tid.short(),
                        tf.kind.type_name(),
                        entry_detail(&tf)
                    );
                }
                Ok(EntryInfo {
                    name: p.to_string(),
                    id,
                    kind: f.kind.type_name().into(),
                    detail,
                })
            })
        })
        .await
    }

    pub async fn cat(&self, path: &str) -> Result<(ValueKind, Vec<u8>), Error> {
        self.cat_value(path).await.map(|(_, k, d)| (k, d))
    }

    /// What `path` designates, settled, when it is a value: its formula,
    /// kind and bytes.
    pub(crate) async fn cat_value(
        &self,
        path: &str,
    ) -> Result<(FormulaId, ValueKind, Vec<u8>), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.read(move |tx| {
            Box::pin(async move {
                let id = model::resolve(tx, &ctx, &p).await?;
                let (tid, f) = settle_target(tx, id).await?;
                match f.kind {
                    FormulaKind::Value(v) => {
                        if let Some(c) = &f.cancelled {
                            return Err(crate::records::cancelled_error(&p.to_string(), c, ""));
                        }
                        let data = value_bytes(tx, &tid, &v).await?;
                        Ok((tid, v.kind, data))
                    }
                    FormulaKind::Promise(PromiseRec { state, .. }) => {
                        Err(promise_has_no_value(&p.to_string(), &state))
                    }
                    other => Err(Error::WrongType {
                        name: p.to_string(),
                        expected: "value".into(),
                        actual: other.type_name().into(),
                    }),
                }
            })
        })
        .await
    }

    /// The bytes of value formula `id` (values never change).
    pub(crate) async fn value_by_id(&self, id: FormulaId) -> Result<(ValueKind, Vec<u8>), Error> {
        self.read(move |tx| {
            Box::pin(async move {
                match model::must_formula(tx, &id).await?.kind {
                    FormulaKind::Value(v) => Ok((v.kind, value_bytes(tx, &id, &v).await?)),
                    other => Err(Error::Corrupt(format!(
                        "{} is a {}, not a value",
                        id.short(),
                        other.type_name()
                    ))),
                }
            })
        })
        .await
    }

    pub async fn store(
        &self,
        req: RequestId,
        path: &str,
        kind: ValueKind,
        data: Vec<u8>,
    ) -> Result<FormulaId, Error> {
        let p = Path::parse_writable(path)?;
        if data.len() > MAX_VALUE_BYTES {
            return Err(Error::TooLarge {
                what: "value".into(),
                len: data.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        match kind {
            ValueKind::Text => {
                std::str::from_utf8(&data)
                    .map_err(|e| Error::Invalid(format!("text is not valid UTF-8: {e}")))?;
            }
            ValueKind::Json => {
                serde_json::from_slice::<serde_json::Value>(&data)
                    .map_err(|e| Error::Invalid(format!("invalid JSON: {e}")))?;
            }
            ValueKind::Bytes => {}
        }
        let ctx = self.ctx.clone();
        let data = Arc::new(data);
        let hash = *blake3::hash(&data).as_bytes();
        let id = FormulaId::random();
        let inline = self.rt.inline_values();
        self.transact(move |tx| {
            let (ctx, p, data) = (ctx.clone(), p.clone(), data.clone());
            Box::pin(async move {
                // The exactly-once record and, for a name in the agent's own
                // directory, the entry replaced: one round.
                let mut ahead = vec![keys::dedup(&ctx.id, &req)];
                if p.parent().is_empty() {
                    ahead.push(keys::name(&ctx.rec.pet_store, p.last()));
                }
                tx.prefetch(&ahead).await?;
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                model::put_value(tx, &id, kind, (&data, hash), now_ms(), inline).await?;
                model::set_name_new(tx, &dir, p.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now_ms())?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn remove(&self, req: RequestId, path: &str) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(path)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                    return Ok(());
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                let id = model::remove_name(tx, &dir, p.last())
                    .await?
                    .ok_or_else(|| Error::UnknownName(p.to_string()))?;
                crate::federation::give_up_accept(tx, &ctx.id, &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await
    }

    async fn relink(&self, req: RequestId, from: &str, to: &str, keep: bool) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let src = if keep {
            Path::parse(from)?
        } else {
            Path::parse_writable(from)?
        };
        let dst = Path::parse_writable(to)?;
        self.transact(move |tx| {
            let (ctx, src, dst) = (ctx.clone(), src.clone(), dst.clone());
            Box::pin(async move {
                if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                    return Ok(());
                }
                let id = model::resolve(tx, &ctx, &src).await?;
                let dst_dir = model::parent_dir(tx, &ctx, &dst).await?;
                if !keep {
                    let src_dir = model::parent_dir(tx, &ctx, &src).await?;
                    if src_dir == dst_dir && src.last() == dst.last() {
                        return Ok(());
                    }
                    if model::is_inside(tx, &ctx, &dst, &id).await? {
                        return Err(Error::Invalid(format!(
                            "cannot move {src} into itself ({dst}); nothing was changed"
                        )));
                    }
                    model::remove_name(tx, &src_dir, src.last()).await?;
                }
                model::set_name(tx, &dst_dir, dst.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await
    }

    pub async fn move_name(&self, req: RequestId, from: &str, to: &str) -> Result<(), Error> {
        self.relink(req, from, to, false).await
    }

    pub async fn copy_name(&self, req: RequestId, from: &str, to: &str) -> Result<(), Error> {
        self.relink(req, from, to, true).await
    }

    /// Creates a formula under `path` unless one of the same type is there
    /// already (then answers it: these commands are idempotent).
    async fn make(
        &self,
        req: RequestId,
        path: &str,
        what: &'static str,
    ) -> Result<FormulaId, Error> {
        if what != "directory" && !self.ctx.is_host {
            return Err(Error::Invalid(format!(
                "only a host can make a {what}; a guest has only what it was given"
            )));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(path)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                // A cancelled agent makes nothing (read here, so a cancel racing this conflicts).
                if let Some(c) = model::must_formula(tx, &ctx.id).await?.cancelled {
                    return Err(crate::records::cancelled_error(
                        "this agent",
                        &c,
                        ": nothing was made",
                    ));
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                if let Some(existing) = model::lookup(tx, &dir, p.last()).await? {
                    let f = model::must_formula(tx, &existing).await?;
                    if f.kind.type_name() == what {
                        return Ok(existing);
                    }
                    return Err(Error::NameTaken(p.to_string()));
                }
                let now = now_ms();
                let id = FormulaId::random();
                let kind = if what == "directory" {
                    FormulaKind::Directory
                } else {
                    let store = FormulaId::random();
                    model::put_formula(
                        tx,
                        &store,
                        &Formula {
                            created_ms: now,
                            cancelled: None,
                            kind: FormulaKind::Directory,
                        },
                    )?;
                    let rec = AgentRec {
                        pet_store: store,
                        host: Some(ctx.id),
                        label: p.last().to_string(),
                    };
                    if what == "host" {
                        FormulaKind::Host(rec)
                    } else {
                        FormulaKind::Guest(rec)
                    }
                };
                model::bind_new_name(tx, &ctx, &req, (&dir, p.last()), &id, kind).await?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn mkdir(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "directory").await
    }

    pub async fn mkhost(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "host").await
    }

    pub async fn mkguest(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "guest").await
    }
}
