//! Transactional building blocks of the object model: formulas, pet-name
//! tables with their reverse index, path resolution, inbox records and
//! exactly-once answers. Each function works inside one store transaction;
//! none does I/O of its own, so operations compose atomically.

use capstan_cluster::Transaction;
use capstan_cluster::tuple::TupleReader;
use capstan_proto::{FormulaId, RequestId};

use crate::error::Error;
use crate::keys;
use crate::names::{self, Path, Special};
use crate::records::{
    AgentRec, DedupAnswer, Formula, FormulaKind, MessageRec, PromiseRec, ValueRec,
};
use crate::types::PromiseState;

/// Who is acting: an agent and its record.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub id: FormulaId,
    pub rec: AgentRec,
    pub is_host: bool,
}

impl Ctx {
    /// The agent's host; the root host is its own host.
    pub fn host(&self) -> FormulaId {
        self.rec.host.unwrap_or(self.id)
    }
}

pub async fn get_formula(tx: &mut Transaction, id: &FormulaId) -> Result<Option<Formula>, Error> {
    match tx.get(&keys::formula(id)).await? {
        Some(b) => Ok(Some(Formula::decode(&b)?)),
        None => Ok(None),
    }
}

/// A formula that must exist (it is referenced by another record).
pub async fn must_formula(tx: &mut Transaction, id: &FormulaId) -> Result<Formula, Error> {
    get_formula(tx, id)
        .await?
        .ok_or_else(|| Error::Corrupt(format!("formula {} is referenced but missing", id.short())))
}

pub fn put_formula(tx: &mut Transaction, id: &FormulaId, f: &Formula) -> Result<(), Error> {
    tx.set(&keys::formula(id), &f.encode())?;
    Ok(())
}

/// The write barrier of garbage collection (see [`crate::gc`]): every
/// transaction that writes a reference to `id` calls this. It checks (a
/// conflict-checked read) that the formula still exists, rewrites its
/// reference stamp, and rescues it if a collection pass condemned it.
pub async fn note_ref(tx: &mut Transaction, id: &FormulaId) -> Result<(), Error> {
    note_refs(tx, std::slice::from_ref(id)).await
}

/// [`note_ref`] for several formulas, with one round of reads.
pub async fn note_refs(tx: &mut Transaction, ids: &[FormulaId]) -> Result<(), Error> {
    let mut ahead = Vec::with_capacity(ids.len());
    for id in ids {
        ahead.push(keys::formula(id));
        // Condemned marks are rare (a gc pass racing this writer): taken as
        // absent without a read where reads cost a round trip; the commit
        // checks it, and a conflict runs the transaction again on a fresh
        // snapshot, where the mark is read and cleared below.
        tx.expect_absent(&keys::condemned(id));
    }
    tx.prefetch(&ahead).await?;
    let mut stamp = [0u8; 8];
    capstan_proto::id::fill_random(&mut stamp)
        .map_err(|e| Error::Unavailable(format!("no randomness: {e}")))?;
    for id in ids {
        if tx.get(&keys::formula(id)).await?.is_none() {
            return Err(Error::Invalid(format!(
                "{} no longer exists: it was collected as garbage (nothing referred to it)",
                id.short()
            )));
        }
        tx.set(&keys::formula_ref(id), &stamp)?;
        let ck = keys::condemned(id);
        if tx.get(&ck).await?.is_some() {
            tx.clear(&ck);
            tx.set(&keys::gc_rescued(), &stamp)?;
        }
    }
    Ok(())
}

pub async fn lookup(
    tx: &mut Transaction,
    dir: &FormulaId,
    name: &str,
) -> Result<Option<FormulaId>, Error> {
    match tx.get(&keys::name(dir, name)).await? {
        Some(b) => Ok(Some(crate::records::decode_name_entry(&b)?)),
        None => Ok(None),
    }
}

/// Resolves a path in the acting agent's names. Paths descend through
/// directories only, never into another agent's names.
pub async fn resolve(tx: &mut Transaction, ctx: &Ctx, path: &Path) -> Result<FormulaId, Error> {
    let mut cur = resolve_first(tx, ctx, &path.segments[0], path).await?;
    for seg in &path.segments[1..] {
        let dir = descend(tx, &cur, path).await?;
        cur = lookup(tx, &dir, seg)
            .await?
            .ok_or_else(|| Error::UnknownName(path.to_string()))?;
    }
    Ok(cur)
}

async fn resolve_first(
    tx: &mut Transaction,
    ctx: &Ctx,
    first: &str,
    path: &Path,
) -> Result<FormulaId, Error> {
    if names::is_special_form(first) {
        return Ok(match names::special(first)? {
            Special::SelfAgent => ctx.id,
            Special::Host => ctx.host(),
        });
    }
    lookup(tx, &ctx.rec.pet_store, first)
        .await?
        .ok_or_else(|| Error::UnknownName(path.to_string()))
}

async fn descend(tx: &mut Transaction, id: &FormulaId, path: &Path) -> Result<FormulaId, Error> {
    let f = must_formula(tx, id).await?;
    match f.kind {
        FormulaKind::Directory => Ok(*id),
        other => Err(Error::WrongType {
            name: path.to_string(),
            expected: "directory".into(),
            actual: other.type_name().into(),
        }),
    }
}

/// The directory that holds (or will hold) the last segment of `path`.
/// The directory that is to hold the last segment of `p`, if that name is
/// free there ([`Error::NameTaken`] if not): the first half of making and
/// naming a new formula (the second is [`bind_new_name`]).
pub async fn free_name(tx: &mut Transaction, ctx: &Ctx, p: &Path) -> Result<FormulaId, Error> {
    let dir = parent_dir(tx, ctx, p).await?;
    if lookup(tx, &dir, p.last()).await?.is_some() {
        return Err(Error::NameTaken(p.to_string()));
    }
    Ok(dir)
}

/// Binds a new formula to a free name: writes formula `id` of `kind`,
/// names it `name` in `dir` and records `id` as the exactly-once answer of
/// the acting agent's request `req`. Every request that makes and names a
/// new formula ends with this, so a retry of it finds the formula it made.
pub async fn bind_new_name(
    tx: &mut Transaction,
    ctx: &Ctx,
    req: &RequestId,
    (dir, name): (&FormulaId, &str),
    id: &FormulaId,
    kind: FormulaKind,
) -> Result<(), Error> {
    let now = crate::clock::now_ms();
    put_formula(
        tx,
        id,
        &Formula {
            created_ms: now,
            cancelled: None,
            kind,
        },
    )?;
    set_name_new(tx, dir, name, id).await?;
    dedup_put(tx, &ctx.id, req, DedupAnswer::Id(*id), now)?;
    Ok(())
}

pub async fn parent_dir(tx: &mut Transaction, ctx: &Ctx, path: &Path) -> Result<FormulaId, Error> {
    let parent = path.parent();
    if parent.is_empty() {
        return Ok(ctx.rec.pet_store);
    }
    let ppath = Path {
        segments: parent.to_vec(),
    };
    let id = resolve(tx, ctx, &ppath).await?;
    descend(tx, &id, &ppath).await
}

/// Deepest chain of agents making agents that [`made_by`] follows.
pub const MAX_AGENT_DEPTH: usize = 64;

/// Whether agent `id` was made by agent `maker`, directly or through agents
/// `maker` made (following each agent's host up, at most
/// [`MAX_AGENT_DEPTH`] steps). An agent is not made by itself.
pub async fn made_by(
    tx: &mut Transaction,
    id: &FormulaId,
    maker: &FormulaId,
) -> Result<bool, Error> {
    let mut cur = *id;
    for _ in 0..MAX_AGENT_DEPTH {
        let f = must_formula(tx, &cur).await?;
        match f.kind.agent().and_then(|a| a.host) {
            Some(h) if h == *maker => return Ok(true),
            Some(h) => cur = h,
            None => return Ok(false),
        }
    }
    Ok(false)
}

/// Whether a name at `path` would be inside directory `id`: some directory
/// on the way to it (the parent of its last segment, or one above) is `id`.
pub async fn is_inside(
    tx: &mut Transaction,
    ctx: &Ctx,
    path: &Path,
    id: &FormulaId,
) -> Result<bool, Error> {
    let parent = path.parent();
    for n in 1..=parent.len() {
        let prefix = Path {
            segments: parent[..n].to_vec(),
        };
        if resolve(tx, ctx, &prefix).await? == *id {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes `name → id` in `dir`, keeping the reverse index; returns the id it replaced.
pub async fn set_name(
    tx: &mut Transaction,
    dir: &FormulaId,
    name: &str,
    id: &FormulaId,
) -> Result<Option<FormulaId>, Error> {
    set_name_as(tx, dir, name, id, false).await
}

/// [`set_name`] for a formula `id` this transaction made (under a fresh
/// random id), which spares two writes:
/// - no reference stamp for `id` (nor the check that it is not condemned):
///   the collector condemns only formulas its mark saw unreachable, and a
///   mark either predates this commit (the formula did not exist) or sees
///   it named. Should it become unreachable later, a writer that then
///   refers to it stamps it, and the stamp differs from none.
/// - its reverse entry is a key the store cannot hold yet, set with
///   [`Transaction::set_fresh`]: when the same transaction names another
///   formula instead (a guest's batch storing a counter once per message),
///   unnaming it takes the set back instead of deleting a key the store
///   never had.
pub async fn set_name_new(
    tx: &mut Transaction,
    dir: &FormulaId,
    name: &str,
    id: &FormulaId,
) -> Result<Option<FormulaId>, Error> {
    set_name_as(tx, dir, name, id, true).await
}

async fn set_name_as(
    tx: &mut Transaction,
    dir: &FormulaId,
    name: &str,
    id: &FormulaId,
    made_here: bool,
) -> Result<Option<FormulaId>, Error> {
    let watch = keys::dir_watch(dir);
    tx.prefetch(&[keys::name(dir, name), watch.clone()]).await?;
    let old = lookup(tx, dir, name).await?;
    if let Some(old) = &old {
        tx.clear(&keys::reverse(dir, old, name));
    }
    if old.as_ref() != Some(id) {
        log_change(tx, dir, &watch, name, Some(id)).await?;
    }
    // Naming a formula references it, and writing into a directory
    // references the directory (a writer may hold either in memory).
    if made_here {
        note_refs(tx, &[*dir]).await?;
    } else {
        note_refs(tx, &[*dir, *id]).await?;
    }
    tx.set(
        &keys::name(dir, name),
        &crate::records::encode_name_entry(id),
    )?;
    if made_here {
        tx.set_fresh(&keys::reverse(dir, id, name), &[])?;
    } else {
        tx.set(&keys::reverse(dir, id, name), &[])?;
    }
    Ok(old)
}

/// Removes `name` from `dir`; returns what it named.
pub async fn remove_name(
    tx: &mut Transaction,
    dir: &FormulaId,
    name: &str,
) -> Result<Option<FormulaId>, Error> {
    let watch = keys::dir_watch(dir);
    tx.prefetch(&[keys::name(dir, name), watch.clone()]).await?;
    let old = lookup(tx, dir, name).await?;
    if let Some(old) = &old {
        tx.clear(&keys::name(dir, name));
        tx.clear(&keys::reverse(dir, old, name));
        log_change(tx, dir, &watch, name, None).await?;
    }
    Ok(old)
}

/// A watched directory's epoch and trim floor (see `crate::search`).
pub fn decode_watch(b: &[u8]) -> Result<(u64, u64), Error> {
    if b.len() != 16 {
        return Err(Error::Corrupt(format!(
            "a directory's change epoch is {} bytes, not 16",
            b.len()
        )));
    }
    let (e, f) = b.split_at(8);
    Ok((
        u64::from_be_bytes(e.try_into().unwrap_or_default()),
        u64::from_be_bytes(f.try_into().unwrap_or_default()),
    ))
}

pub fn encode_watch(epoch: u64, floor: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&epoch.to_be_bytes());
    b[8..].copy_from_slice(&floor.to_be_bytes());
    b
}

/// Writes the change of `name` into the change log of `dir` if a search
/// capability watches it (`crate::search`): a blind write under the
/// directory's current epoch, whose read makes the transaction conflict
/// with a reader that closes the epoch meanwhile (so the change lands in
/// an epoch the reader has not closed). One entry per name and epoch.
async fn log_change(
    tx: &mut Transaction,
    dir: &FormulaId,
    watch: &[u8],
    name: &str,
    id: Option<&FormulaId>,
) -> Result<(), Error> {
    if let Some(w) = tx.get(watch).await? {
        let (epoch, _) = decode_watch(&w)?;
        tx.set(
            &keys::dir_change(dir, epoch, name),
            id.map_or(&[][..], |id| &id.as_bytes()[..]),
        )?;
    }
    Ok(())
}

/// Every `(name, id)` of a directory, in name order. Bounded by `limit` (0 = all).
pub async fn list_dir(
    tx: &mut Transaction,
    dir: &FormulaId,
    limit: usize,
) -> Result<Vec<(String, FormulaId)>, Error> {
    let prefix = keys::names_of_dir(dir);
    let rows = tx.get_prefix(&prefix, limit, false).await?;
    let mut out = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let mut r = TupleReader::new(&k);
        let name = (|| -> Result<String, capstan_cluster::tuple::TupleError> {
            r.str()?;
            r.bytes()?;
            r.str()
        })()
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        out.push((name, crate::records::decode_name_entry(&v)?));
    }
    Ok(out)
}

/// The name the acting agent uses for `id`: SELF, HOST, a pet name, or `id:<short hex>`.
pub async fn name_for(tx: &mut Transaction, ctx: &Ctx, id: &FormulaId) -> Result<String, Error> {
    if *id == ctx.id {
        return Ok("SELF".into());
    }
    if *id == ctx.host() {
        return Ok("HOST".into());
    }
    let rows = tx
        .get_prefix(&keys::reverse_of(&ctx.rec.pet_store, id), 1, false)
        .await?;
    if let Some((k, _)) = rows.first() {
        let mut r = TupleReader::new(k);
        let name = (|| -> Result<String, capstan_cluster::tuple::TupleError> {
            r.str()?;
            r.bytes()?;
            r.bytes()?;
            r.str()
        })()
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        return Ok(name);
    }
    Ok(format!("id:{}", id.short()))
}

/// [`name_for`] of many formulas: one listing of the agent's names (up to
/// [`NAMES_LISTED`]) instead of a read per formula; a formula not found in
/// a listing that was cut short is looked up alone.
pub async fn names_for(
    tx: &mut Transaction,
    ctx: &Ctx,
    ids: &[FormulaId],
) -> Result<Vec<String>, Error> {
    let rows = tx
        .get_prefix(&keys::reverse_in(&ctx.rec.pet_store), NAMES_LISTED, false)
        .await?;
    let complete = rows.len() < NAMES_LISTED;
    let mut first: std::collections::HashMap<FormulaId, String> = Default::default();
    for (k, _) in rows {
        let mut r = TupleReader::new(&k);
        let (target, name) =
            (|| -> Result<(Vec<u8>, String), capstan_cluster::tuple::TupleError> {
                r.str()?;
                r.bytes()?;
                Ok((r.bytes()?, r.str()?))
            })()
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let target = FormulaId::from_slice(&target).map_err(|e| Error::Corrupt(e.to_string()))?;
        // Keys come in name order per target: the first is name_for's.
        first.entry(target).or_insert(name);
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(if *id == ctx.id {
            "SELF".into()
        } else if *id == ctx.host() {
            "HOST".into()
        } else if let Some(n) = first.get(id) {
            n.clone()
        } else if complete {
            format!("id:{}", id.short())
        } else {
            name_for(tx, ctx, id).await?
        });
    }
    Ok(out)
}

/// Names [`names_for`] lists at most.
pub const NAMES_LISTED: usize = 10_000;

pub async fn get_message(
    tx: &mut Transaction,
    agent: &FormulaId,
    number: u64,
) -> Result<MessageRec, Error> {
    match tx.get(&keys::message(agent, number)).await? {
        Some(b) => MessageRec::decode(&b),
        None => Err(Error::UnknownMessage(number)),
    }
}

/// The promise of request message `m` (an error naming `m` if it is not a
/// request).
pub fn promise_of_request(m: &MessageRec) -> Result<FormulaId, Error> {
    match &m.body {
        crate::records::BodyRec::Request { promise, .. } => Ok(*promise),
        other => Err(Error::WrongMessage {
            number: m.number,
            expected: "request".into(),
            actual: other.type_name().into(),
        }),
    }
}

/// The state of promise `id`.
pub async fn promise_state(
    tx: &mut Transaction,
    id: &FormulaId,
) -> Result<crate::types::PromiseState, Error> {
    match must_formula(tx, id).await?.kind {
        FormulaKind::Promise(p) => Ok(p.state),
        other => Err(Error::Corrupt(format!(
            "expected a promise, found a {}",
            other.type_name()
        ))),
    }
}

/// Writes a new message into a free slot of `agent`'s inbox. A slot that is
/// taken, or below the inbox mark (a dismissed number), fails with
/// [`Error::InboxSlotTaken`]: the number came from a stale sequence (for
/// example a cluster node that lost ownership of the inbox), and the caller
/// reserves another. Both reads are conflict-checked, so two writers of one
/// number cannot both commit.
pub async fn put_message(
    tx: &mut Transaction,
    agent: &FormulaId,
    m: &MessageRec,
) -> Result<(), Error> {
    let key = keys::message(agent, m.number);
    let below_mark = match tx.get(&keys::inbox_mark(agent)).await? {
        Some(b) => m.number < inbox_mark_value(&b)?,
        None => false,
    };
    if below_mark || tx.get(&key).await?.is_some() {
        return Err(Error::InboxSlotTaken {
            agent: agent.short(),
            number: m.number,
        });
    }
    match &m.body {
        crate::records::BodyRec::Package { ids, .. } => note_refs(tx, ids).await?,
        crate::records::BodyRec::Request { promise, .. } => note_ref(tx, promise).await?,
    }
    tx.set(&key, &m.encode())?;
    if writes_hint(m.number) {
        // (a blind write: no send reads the hint, so none conflicts on it)
        tx.set(&keys::inbox_hint(agent), &m.number.to_be_bytes())?;
    }
    Ok(())
}

/// All messages of an inbox numbered `from` or above, in number order.
pub async fn list_messages(
    tx: &mut Transaction,
    agent: &FormulaId,
    from: u64,
) -> Result<Vec<MessageRec>, Error> {
    list_messages_page(tx, agent, from, 0).await
}

/// At most `limit` messages (0: no limit) of an inbox numbered `from` or
/// above, in number order: one bounded range read.
pub async fn list_messages_page(
    tx: &mut Transaction,
    agent: &FormulaId,
    from: u64,
    limit: usize,
) -> Result<Vec<MessageRec>, Error> {
    let begin = keys::message(agent, from);
    let end = capstan_cluster::tuple::prefix_end(&keys::inbox(agent));
    let rows = tx
        .get_range(capstan_cluster::RangeOption {
            begin,
            end,
            limit,
            reverse: false,
        })
        .await?;
    rows.iter().map(|(_, v)| MessageRec::decode(v)).collect()
}

pub async fn dedup_get(
    tx: &mut Transaction,
    agent: &FormulaId,
    req: &RequestId,
) -> Result<Option<DedupAnswer>, Error> {
    match tx.get(&keys::dedup(agent, req)).await? {
        Some(b) => Ok(Some(DedupAnswer::decode(&b)?)),
        None => Ok(None),
    }
}

pub fn dedup_put(
    tx: &mut Transaction,
    agent: &FormulaId,
    req: &RequestId,
    answer: DedupAnswer,
    now_ms: u64,
) -> Result<(), Error> {
    tx.set(&keys::dedup(agent, req), &answer.encode(now_ms))?;
    Ok(())
}

/// Pairs a listing reads per page ([`scan_prefix`]).
pub const SCAN_PAGE: usize = 2_000;

/// Every pair under `prefix`, listed in pages without read conflicts.
pub(crate) async fn scan_prefix(
    db: &capstan_cluster::Db,
    prefix: Vec<u8>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
    let end = capstan_cluster::tuple::prefix_end(&prefix);
    let mut begin = prefix;
    let mut out = Vec::new();
    loop {
        let (b, e) = (begin.clone(), end.clone());
        let rows = db
            .read(move |tx| {
                let (b, e) = (b.clone(), e.clone());
                Box::pin(async move {
                    Ok::<_, Error>(
                        tx.snapshot_range(&capstan_cluster::RangeOption {
                            begin: b,
                            end: e,
                            limit: SCAN_PAGE,
                            reverse: false,
                        })
                        .await?,
                    )
                })
            })
            .await?;
        let full = rows.len() == SCAN_PAGE;
        if let Some((k, _)) = rows.last() {
            begin = capstan_cluster::store::key_after(k);
        }
        out.extend(rows);
        if !full {
            return Ok(out);
        }
    }
}

/// Why `cat` of a promise that is not resolved shows nothing: pending (an
/// answer may still come) or rejected (none ever will, and why).
pub(crate) fn promise_has_no_value(name: &str, state: &PromiseState) -> Error {
    match state {
        PromiseState::Rejected(reason) => Error::Invalid(format!(
            "{name} is a request that was rejected: {reason}; it has no value"
        )),
        _ => Error::Invalid(format!(
            "{name} is a request that is still pending; nothing to show yet (its answer lands here once resolved)"
        )),
    }
}

/// The bytes of value `id`, checked against its record: kept in the
/// record itself (small values) or in a blob under the value's key.
pub(crate) async fn value_bytes(
    tx: &mut capstan_cluster::Transaction,
    id: &FormulaId,
    v: &ValueRec,
) -> Result<Vec<u8>, Error> {
    let data = match &v.inline {
        Some(bytes) => bytes.clone(),
        None => capstan_cluster::blob::get_blob(tx, &keys::value(id))
            .await?
            .ok_or_else(|| Error::Corrupt(format!("value {} has no bytes", id.short())))?,
    };
    if data.len() as u64 != v.size || *blake3::hash(&data).as_bytes() != v.hash {
        return Err(Error::Corrupt(format!(
            "value {} does not match its hash",
            id.short()
        )));
    }
    Ok(data)
}

/// Writes the formula of a new value `id` holding `data` of `kind`: the
/// bytes inside the record when they are at most
/// [`crate::records::INLINE_VALUE_MAX`], else in a blob of their own.
/// `hash` is blake3 of `data`. `id` must be fresh: a small value's record
/// is written without clearing a blob the id might have. `inline`: whether
/// small values may live in their record ([`crate::node::Inner::inline_values`]);
/// if not, every value gets a blob, as before stop 30.
pub(crate) async fn put_value(
    tx: &mut Transaction,
    id: &FormulaId,
    kind: crate::types::ValueKind,
    (data, hash): (&[u8], [u8; 32]),
    created_ms: u64,
    inline: bool,
) -> Result<(), Error> {
    let small = inline && data.len() <= crate::records::INLINE_VALUE_MAX;
    let f = Formula {
        created_ms,
        cancelled: None,
        kind: FormulaKind::Value(ValueRec {
            kind,
            size: data.len() as u64,
            hash,
            inline: small.then(|| data.to_vec()),
        }),
    };
    put_formula(tx, id, &f)?;
    if !small {
        capstan_cluster::blob::set_blob(tx, &keys::value(id), data).await?;
    }
    Ok(())
}

/// Follows resolved promises to what they resolved to (bounded chain).
pub(crate) async fn settle_target(
    tx: &mut capstan_cluster::Transaction,
    mut id: FormulaId,
) -> Result<(FormulaId, Formula), Error> {
    for _ in 0..16 {
        let f = must_formula(tx, &id).await?;
        match &f.kind {
            FormulaKind::Promise(PromiseRec {
                state: PromiseState::Resolved(t),
                ..
            }) => id = *t,
            _ => return Ok((id, f)),
        }
    }
    Err(Error::Corrupt("promise chain longer than 16".into()))
}

mod numbers;
pub use numbers::*;

#[cfg(test)]
mod tests;
