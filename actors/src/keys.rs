//! Key layout: every key is a tuple whose first element names the subspace.
//!
//! | key | value |
//! |---|---|
//! | `("meta", "root-host")` | root host id (32 bytes) |
//! | `("f", id)` | `Formula` |
//! | `("n", dir, name)` | `NameEntry` (forward pet-name table) |
//! | `("r", dir, target, name)` | empty (reverse index: names of an id) |
//! | `("dchg", dir)` | a watched directory's change epoch and trim floor, two u64 big-endian (present while a search capability covers it; see `crate::search`) |
//! | `("dchg", dir, epoch, name)` | the name's formula id (32 bytes), or empty when removed: a change to a watched directory |
//! | `("m", agent, number)` | `Message` (an agent's inbox) |
//! | `("v", id, …)` | the bytes of a stored value (a chunked blob) |
//! | `("d", agent, request-id)` | `DedupRecord` (exactly-once answers) |
//! | `("mark", agent)` | next message number floor, u64 big-endian (after dismissals) |
//! | `("mhi", agent)` | a message number once written in the inbox, u64 big-endian: every [`crate::model::INBOX_HINT_EVERY`]th number (where the search for the inbox's last message starts) |
//! | `("loc", blake3(swiss))` | `LocatorRecord` (a locator this node issued) |
//! | `("locf", target, blake3(swiss))` | empty (the locators of a formula, for `cancel`) |
//! | `("outq", peer-cluster, created-µs, item-id)` | `OutboxItem` (owed to another cluster: a queue per peer cluster, in send order) |
//! | `("out", created-µs, item-id)` | `OutboxItem` in the single queue of earlier versions (moved to `outq` at start) |
//! | `("in", item-id)` | receive time, u64 ms (an item from another cluster was applied) |
//! | `("llmk", provider)` | an LLM provider's API key (UTF-8): private, read only by model calls |
//! | `("llmb", agent)` | `LlmBudget`: an agent's token and cost budget |
//! | `("llma", agent, n)` | `LlmAudit`: model call `n` of an agent (the audit log) |
//! | `("llmn", agent)` | next audit number of an agent, u64 big-endian |
//! | `("fref", id)` | reference stamp: random bytes rewritten by every write of a reference to `id` (see `crate::gc`) |
//! | `("gcx", id)` | empty: `id` is condemned by a collection pass |
//! | `("cnl", id)` | when `id` was last cancelled (u64 ms, big-endian) and why (UTF-8): evaluations running on it stop |
//! | `("gcz", id)` | empty: `id` was deleted by a collection pass, some of its keys are left to clear (see `crate::gc`) |
//! | `("meta", "gc-rescued")` | random bytes rewritten when a writer rescues a condemned formula |
//! | `("evd", id)` | the formulas eval result `id` depends on: 32-byte ids, concatenated (see `crate::guest::eval`) |

use capstan_cluster::tuple::TupleKey;
use capstan_proto::{FormulaId, RequestId};

pub fn root_host() -> Vec<u8> {
    TupleKey::new().str("meta").str("root-host").into_vec()
}

pub fn formula(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("f").bytes(id.as_bytes()).into_vec()
}

pub fn name(dir: &FormulaId, name: &str) -> Vec<u8> {
    TupleKey::new()
        .str("n")
        .bytes(dir.as_bytes())
        .str(name)
        .into_vec()
}

pub fn names_of_dir(dir: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("n").bytes(dir.as_bytes()).into_vec()
}

/// A watched directory's change epoch (see `crate::search`): also the
/// prefix of its change log.
pub fn dir_watch(dir: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("dchg").bytes(dir.as_bytes()).into_vec()
}

/// The changes of `dir` in `epoch` start here.
pub fn dir_changes_from(dir: &FormulaId, epoch: u64) -> Vec<u8> {
    TupleKey::new()
        .str("dchg")
        .bytes(dir.as_bytes())
        .u64(epoch)
        .into_vec()
}

/// The change of `name` in `dir` during `epoch`.
pub fn dir_change(dir: &FormulaId, epoch: u64, name: &str) -> Vec<u8> {
    TupleKey::new()
        .str("dchg")
        .bytes(dir.as_bytes())
        .u64(epoch)
        .str(name)
        .into_vec()
}

pub fn reverse(dir: &FormulaId, target: &FormulaId, name: &str) -> Vec<u8> {
    TupleKey::new()
        .str("r")
        .bytes(dir.as_bytes())
        .bytes(target.as_bytes())
        .str(name)
        .into_vec()
}

/// Every reverse entry of `dir` (all its names, by target).
pub fn reverse_in(dir: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("r").bytes(dir.as_bytes()).into_vec()
}

pub fn reverse_of(dir: &FormulaId, target: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("r")
        .bytes(dir.as_bytes())
        .bytes(target.as_bytes())
        .into_vec()
}

pub fn message(agent: &FormulaId, number: u64) -> Vec<u8> {
    TupleKey::new()
        .str("m")
        .bytes(agent.as_bytes())
        .u64(number)
        .into_vec()
}

/// The number of a [`message`] key (`None`: not one).
pub fn message_number(key: &[u8]) -> Option<u64> {
    let mut r = capstan_cluster::tuple::TupleReader::new(key);
    (r.str().ok()? == "m").then_some(())?;
    r.bytes().ok()?;
    r.u64().ok()
}

pub fn inbox(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("m").bytes(agent.as_bytes()).into_vec()
}

pub fn value(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("v").bytes(id.as_bytes()).into_vec()
}

pub fn dedup(agent: &FormulaId, req: &RequestId) -> Vec<u8> {
    TupleKey::new()
        .str("d")
        .bytes(agent.as_bytes())
        .bytes(&req.0)
        .into_vec()
}

/// One past the highest message number ever used in an inbox whose top messages were dismissed.
pub fn inbox_mark(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("mark")
        .bytes(agent.as_bytes())
        .into_vec()
}

/// Where the search for an inbox's last message starts (see
/// [`crate::model::next_message_number`]).
pub fn inbox_hint(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("mhi")
        .bytes(agent.as_bytes())
        .into_vec()
}

pub fn locator(hash: &[u8; 32]) -> Vec<u8> {
    TupleKey::new().str("loc").bytes(hash).into_vec()
}

pub fn locator_of(target: &FormulaId, hash: &[u8; 32]) -> Vec<u8> {
    TupleKey::new()
        .str("locf")
        .bytes(target.as_bytes())
        .bytes(hash)
        .into_vec()
}

pub fn locators_of(target: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("locf")
        .bytes(target.as_bytes())
        .into_vec()
}

/// An item of the outbox queue of peer cluster `cluster`.
pub fn outbox(cluster: &[u8; 32], created_us: u64, id: &RequestId) -> Vec<u8> {
    TupleKey::new()
        .str("outq")
        .bytes(cluster)
        .u64(created_us)
        .bytes(&id.0)
        .into_vec()
}

/// The outbox queue of one peer cluster.
pub fn outbox_of(cluster: &[u8; 32]) -> Vec<u8> {
    TupleKey::new().str("outq").bytes(cluster).into_vec()
}

/// Every outbox queue.
pub fn outbox_all() -> Vec<u8> {
    TupleKey::new().str("outq").into_vec()
}

/// The single outbox queue of earlier versions (`("out", created-µs, id)`).
pub fn outbox_legacy() -> Vec<u8> {
    TupleKey::new().str("out").into_vec()
}

pub fn inbound(id: &RequestId) -> Vec<u8> {
    TupleKey::new().str("in").bytes(&id.0).into_vec()
}

/// An LLM provider's API key (never shown; see `crate::llm`).
pub fn llm_key(provider: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("llmk")
        .bytes(provider.as_bytes())
        .into_vec()
}

/// Every LLM provider key of this store (for the leak scanner).
pub fn llm_keys() -> Vec<u8> {
    TupleKey::new().str("llmk").into_vec()
}

pub fn llm_budget(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("llmb")
        .bytes(agent.as_bytes())
        .into_vec()
}

pub fn llm_audit(agent: &FormulaId, n: u64) -> Vec<u8> {
    TupleKey::new()
        .str("llma")
        .bytes(agent.as_bytes())
        .u64(n)
        .into_vec()
}

pub fn llm_audits(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("llma")
        .bytes(agent.as_bytes())
        .into_vec()
}

pub fn llm_audit_next(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("llmn")
        .bytes(agent.as_bytes())
        .into_vec()
}

/// The reference stamp of a formula: rewritten (random bytes) by every
/// transaction that writes a reference to it (a name, a message, a promise
/// resolution, a locator). A collection pass compares it with what its mark
/// snapshot read: a change means the formula was referenced since.
pub fn formula_ref(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("fref").bytes(id.as_bytes()).into_vec()
}

/// Every reference stamp.
pub fn formula_refs() -> Vec<u8> {
    TupleKey::new().str("fref").into_vec()
}

/// A formula condemned by a collection pass (empty value): a writer that
/// references it clears this and bumps [`gc_rescued`].
pub fn condemned(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("gcx").bytes(id.as_bytes()).into_vec()
}

/// Every condemned formula.
pub fn condemned_all() -> Vec<u8> {
    TupleKey::new().str("gcx").into_vec()
}

/// When formula `id` was last cancelled, and why (see
/// [`encode_cancel_event`]).
pub fn cancel_event(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("cnl").bytes(id.as_bytes()).into_vec()
}

/// A [`cancel_event`] record: the time (u64 ms, big-endian) and the reason.
pub fn encode_cancel_event(at_ms: u64, why: &str) -> Vec<u8> {
    let mut v = at_ms.to_be_bytes().to_vec();
    v.extend_from_slice(why.as_bytes());
    v
}

/// The time and reason of a [`cancel_event`] record (`None`: damaged).
pub fn decode_cancel_event(v: &[u8]) -> Option<(u64, String)> {
    let at = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    Some((at, String::from_utf8_lossy(&v[8..]).into_owned()))
}

/// A formula deleted by a collection pass whose keys (names, chunks, …)
/// were too many for the transaction that deleted it: cleared a page at a
/// time after it, by that pass or, after a crash, by the next one.
pub fn swept(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("gcz").bytes(id.as_bytes()).into_vec()
}

/// Every [`swept`] mark.
pub fn swept_all() -> Vec<u8> {
    TupleKey::new().str("gcz").into_vec()
}

/// Rewritten (random bytes) whenever a writer rescues a condemned formula:
/// a pass that sees it change deletes nothing more.
pub fn gc_rescued() -> Vec<u8> {
    TupleKey::new().str("meta").str("gc-rescued").into_vec()
}

/// What eval result `id` depends on (its slots' formulas and the
/// evaluator): cancelling one of them cancels it.
pub fn eval_deps(id: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("evd").bytes(id.as_bytes()).into_vec()
}

/// Every eval result's dependencies.
pub fn eval_deps_all() -> Vec<u8> {
    TupleKey::new().str("evd").into_vec()
}

/// The ids in an [`eval_deps`] record.
pub fn decode_eval_deps(v: &[u8]) -> Vec<FormulaId> {
    v.chunks_exact(32)
        .filter_map(|c| FormulaId::from_slice(c).ok())
        .collect()
}

/// Every formula record.
pub fn formulas() -> Vec<u8> {
    TupleKey::new().str("f").into_vec()
}

/// Every exactly-once record.
pub fn dedup_all() -> Vec<u8> {
    TupleKey::new().str("d").into_vec()
}

/// The hash under which an issued locator is stored.
pub fn swiss_hash(swiss: &[u8; 32]) -> [u8; 32] {
    *blake3::keyed_hash(&derive_key(), swiss).as_bytes()
}

fn derive_key() -> [u8; 32] {
    blake3::derive_key("capstan 2026 locator swiss hash", b"")
}
