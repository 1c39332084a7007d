//! Search as a capability (issue 20): `mksearch NAME --over PATH` makes a
//! capability that answers `search(query, k)` over the values under a
//! directory (values stored by agents, `store_result` outputs, and with
//! `--mail` the texts of the maker's inbox).
//!
//! # The capability
//!
//! Like an http capability, it is a text value describing it (no secret)
//! plus a record `("gsr", value id)` holding the [`SearchSpec`]: the
//! directory's formula id, the maker, and the embedding provider (an `llm`
//! formula). Whoever holds the value (copied, granted to a guest as slot
//! `search`) may search; the hits are names under the directory
//! (`notes.invoice-42`) or `mail:N`, with a score and a snippet.
//!
//! # The index is derived data
//!
//! Nothing of the index is stored: each node keeps an in-memory index per
//! search capability ([`Indexes`]) and builds it from the store on first
//! use, so after `kill -9`, a restart or on another node of a cluster the
//! first search rebuilds it: it lists the directory tree (one read
//! transaction), reads and indexes the values.
//!
//! After that, the index follows the directories' *change logs* instead
//! of listing the tree again. A directory that a search capability covers
//! is *watched*: a record `("dchg", dir)` holds its current *epoch*, and
//! every write of a name in it ([`model::set_name`], [`model::remove_name`])
//! reads that record and writes `("dchg", dir, epoch, name)` → the new id
//! (empty: removed) in the same transaction: a blind write, one per name and
//! epoch, so writers never conflict with each other. A refresh reads the
//! entries of the epochs it has not closed, skips the ones it already
//! applied, looks up the names they name in the same snapshot and indexes
//! what changed: the cost of a search right after a write is that of the
//! names written since, not of the directory. Epochs keep what a refresh
//! reads again small: once a directory has [`CLOSE_EPOCH_AT`] open entries,
//! a refresh *closes* its epoch (a transaction that writes epoch + 1); a
//! writer that read the old epoch and commits later conflicts on the
//! record and writes again under the new one, so that after the close no
//! entry of an older epoch can appear, and the entries of closed epochs
//! need not be read again. Closed epochs older than [`KEEP_EPOCHS`] are
//! trimmed (the record keeps the trim floor). Whenever the logs do not
//! say enough (an index that is new, behind the trim floor, a
//! subdirectory that came or went, more than [`MAX_CHANGES`] entries), the
//! refresh lists the tree as the first search does. The logs are exact on
//! every node (they are in the store, read in serializable snapshots), so
//! an index on any node follows the writes of any other; with nothing
//! committed anywhere since the last refresh, a search reads nothing. Bytes
//! values, and values over the caps, are not indexed. The work of one
//! refresh is bounded ([`MAX_NEW_PER_REFRESH`] values read,
//! [`MAX_EMBED_PER_REFRESH`] texts embedded); what is left is done by the
//! next searches, and the answer says so in its notes.
//!
//! Bounds: at most [`MAX_DOCS`] values and [`MAX_INDEX_BYTES`] bytes of text
//! per index (what is over is not indexed, with a note in every answer),
//! the first [`MAX_TEXT_PER_VALUE`] bytes of each value, [`MAX_DEPTH`]
//! levels of subdirectories, [`MAX_INDEXES`] indexes per node.
//!
//! # Ranking
//!
//! Full text: BM25 over lowercased alphanumeric tokens ([`index`]).
//! Vectors: cosine over embeddings from the provider given at `mksearch
//! --embed LLM` (OpenAI-compatible `POST /v1/embeddings`, or Ollama `POST
//! /api/embed`), or, for a capability made without one, from the node's
//! local model ([`crate::embed_model`], `start --embed-model DIR`; see [`embed`]). The
//! two rankings are fused by Reciprocal Rank Fusion with k = 60. With
//! neither the search is full text only. If the provider or the model
//! fails, the answer is full text with the failure in its notes.
//!
//! Each embedding request is charged to the LLM budget of the searching
//! agent and written to its audit log, as a model call is
//! ([`crate::llm`]): the query's, and those embedding new values for the
//! index (the search that needs them pays for them). A request the budget
//! refuses is not made, and the search fails with the budget's error
//! rather than falling back to full text.

mod embed;
pub mod index;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use capstan_cluster::tuple::{TupleKey, TupleReader};
use capstan_proto::{FormulaId, RequestId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{AgentHandle, ValueKind};
use crate::error::Error;
use crate::names::Path;
use crate::records::{BodyRec, FormulaKind};
use crate::{keys, model};

pub use crate::embed_model::LocalModel;
use embed::{EmbedError, Source};
pub use index::{Index, RRF_K};

/// Largest `k`.
pub const MAX_K: u32 = 100;
/// Longest query, bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most documents in one index.
pub const MAX_DOCS: usize = 50_000;
/// Most bytes of text in one index.
pub const MAX_INDEX_BYTES: usize = 64 << 20;
/// Bytes of one value that are indexed (the rest is cut, with a note).
pub const MAX_TEXT_PER_VALUE: usize = 16 * 1024;
/// Deepest subdirectory indexed below the directory.
pub const MAX_DEPTH: usize = 8;
/// Most names listed per refresh (directories and values together).
pub const MAX_LISTED: usize = 100_000;
/// Most new or changed values read by one refresh.
pub const MAX_NEW_PER_REFRESH: usize = 20_000;
/// Most texts embedded by one refresh.
pub const MAX_EMBED_PER_REFRESH: usize = 20_000;
/// Texts per embedding request, and bytes of each text sent.
const EMBED_BATCH: usize = 64;
const MAX_EMBED_TEXT: usize = 2000;
/// Most mail messages indexed per refresh.
const MAX_MAIL_PER_REFRESH: usize = 5_000;
/// Values read per read transaction.
const READ_BATCH: usize = 256;
/// Open change-log entries of a directory after which a refresh closes
/// its epoch (see the module docs).
const CLOSE_EPOCH_AT: usize = 256;
/// Closed epochs of a change log kept for readers that are behind.
const KEEP_EPOCHS: u64 = 16;
/// Most change-log entries one refresh reads per directory (more: the
/// tree is listed instead).
const MAX_CHANGES: usize = 20_000;
/// Most directories whose epochs one transaction closes.
const MAX_CLOSE: usize = 1024;
/// Most indexes a node keeps in memory.
pub const MAX_INDEXES: usize = 64;
/// The slot a guest's search capability is granted under.
pub const SEARCH_SLOT: &str = "search";
/// Largest embedding answer.
const MAX_EMBED_RESPONSE: usize = 32 << 20;
/// Longest embedding vector accepted.
const MAX_DIM: usize = crate::embed_model::MAX_DIM;

/// What a search capability searches; stored at `("gsr", value id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchSpec {
    /// The directory, as its maker named it (shown; hits are paths under it).
    pub over: String,
    /// The directory's formula, hex.
    pub dir: String,
    /// The maker (a host), hex: whose inbox `mail` indexes.
    pub maker: String,
    /// Index the maker's mail texts too.
    pub mail: bool,
    /// The embedding provider (an `llm` formula), hex, and its name.
    pub embed: Option<String>,
    pub embed_name: Option<String>,
    /// The embedding model (default: the provider's kind's usual one).
    pub embed_model: Option<String>,
}

pub(crate) fn key(value: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("gsr")
        .bytes(value.as_bytes())
        .into_vec()
}

fn hex_id(s: &str) -> Result<FormulaId, Error> {
    hex::decode(s)
        .ok()
        .and_then(|b| FormulaId::from_slice(&b).ok())
        .ok_or_else(|| Error::Corrupt(format!("search capability: bad id {s:?}")))
}

/// One node's indexes, by search capability.
#[derive(Default)]
pub struct Indexes(Mutex<HashMap<FormulaId, Arc<tokio::sync::Mutex<State>>>>);

impl std::fmt::Debug for Indexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Indexes")
    }
}

impl Indexes {
    fn get(&self, id: FormulaId) -> Arc<tokio::sync::Mutex<State>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get(&id) {
            return s.clone();
        }
        if m.len() >= MAX_INDEXES {
            // Drop one that nobody is using (it is rebuilt on its next use).
            if let Some(k) = m
                .iter()
                .find(|(_, s)| Arc::strong_count(s) == 1)
                .map(|(k, _)| *k)
            {
                m.remove(&k);
            }
        }
        m.entry(id).or_default().clone()
    }
}

/// An index and what the refresh remembers.
#[derive(Default)]
pub struct State {
    index: Index,
    /// Formulas met under the tree that are directories (to descend) or
    /// neither values nor directories (skipped).
    dirs: Arc<HashSet<FormulaId>>,
    skipped: Arc<HashSet<FormulaId>>,
    /// The directories of the tree whose change logs the index follows
    /// (`None`: the next refresh lists the tree).
    tracked: Option<HashMap<FormulaId, Track>>,
    /// The next inbox number to index (mail).
    mail_next: u64,
    /// Values not indexed for the caps, as of the last refresh.
    over_cap: usize,
    /// Values left for the next refresh (bounded work).
    behind: usize,
    /// The index's names → ids (values only), as the refresh compares them.
    known: Arc<HashMap<String, FormulaId>>,
    known_stale: bool,
    /// The store version of the last complete refresh (`None`: not yet, or
    /// it left work for the next one).
    scanned_version: Option<capstan_cluster::Version>,
    /// Why the last embedding call failed, if it did.
    embed_error: Option<String>,
    /// Whether the tree was deeper or wider than indexed.
    tree_cut: bool,
}

/// One hit as the holder sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchHit {
    /// A name under the directory (`notes.x`), or `mail:N`.
    pub name: String,
    /// The same as the maker names it (`PATH.notes.x`), or `mail:N`.
    pub path: String,
    /// RRF score.
    pub score: f64,
    pub snippet: String,
    pub text_rank: Option<usize>,
    pub vector_rank: Option<usize>,
}

/// A search's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchAnswer {
    pub query: String,
    pub k: u32,
    pub over: String,
    pub hits: Vec<SearchHit>,
    /// Documents and bytes indexed.
    pub indexed: usize,
    pub bytes: usize,
    /// "fused" (text + vector), "text" (no provider), or "text (vector
    /// unavailable)".
    pub mode: String,
    /// Where the vectors come from on the node that answered (`provider
    /// NAME`, `local model DIR (N dimensions)`), `None` for full text only.
    pub vectors: Option<String>,
    /// Truncations, caps and failures worth knowing.
    pub notes: Vec<String>,
    /// Time spent refreshing the index and ranking, microseconds.
    pub refresh_us: u64,
    pub rank_us: u64,
}

impl SearchAnswer {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Checks a query and `k` (before anything is read).
pub fn check_query(query: &str, k: u32) -> Result<(), Error> {
    if k == 0 || k > MAX_K {
        return Err(Error::Invalid(format!(
            "k must be 1 to {MAX_K}, got {k}; pass -k N"
        )));
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(Error::TooLarge {
            what: "search query".into(),
            len: query.len(),
            max: MAX_QUERY_BYTES,
        });
    }
    if query.trim().is_empty() {
        return Err(Error::Invalid(
            "the search query is empty; give some words to look for".into(),
        ));
    }
    Ok(())
}

impl AgentHandle {
    /// Makes a search capability `name` over the directory `over` (see the
    /// module docs). `embed`: an llm provider in this host's names.
    pub async fn mksearch(
        &self,
        req: RequestId,
        name: &str,
        over: &str,
        mail: bool,
        embed: Option<&str>,
        embed_model: Option<&str>,
    ) -> Result<FormulaId, Error> {
        if !self.is_host() {
            return Err(Error::Invalid(
                "only a host can make search capabilities".into(),
            ));
        }
        Path::parse_writable(name)?;
        let over_p = Path::parse(over)?;
        if let Some(m) = embed_model
            && (m.is_empty()
                || m.len() > 256
                || m.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(Error::Invalid(format!(
                "invalid --embed-model {m:?}: 1-256 characters without spaces"
            )));
        }
        if embed_model.is_some() && embed.is_none() {
            return Err(Error::Invalid(
                "--embed-model needs --embed LLM (an llm provider; see capstan llm add)".into(),
            ));
        }
        let ctx = self.ctx.clone();
        let embed_p = embed.map(Path::parse).transpose()?;
        let (dir, provider) = self
            .read(move |tx| {
                Box::pin(async move {
                    let id = model::resolve(tx, &ctx, &over_p).await?;
                    let (dir, f) = crate::api::settle_target(tx, id).await?;
                    if !matches!(f.kind, FormulaKind::Directory) {
                        return Err(Error::WrongType {
                            name: over_p.to_string(),
                            expected: "directory (make one with capstan mkdir)".into(),
                            actual: f.kind.type_name().into(),
                        });
                    }
                    let provider = match &embed_p {
                        None => None,
                        Some(p) => {
                            let id = model::resolve(tx, &ctx, p).await?;
                            let (pid, f) = crate::api::settle_target(tx, id).await?;
                            match f.kind {
                                FormulaKind::Llm(rec) => {
                                    if rec.removed {
                                        return Err(Error::Invalid(format!(
                                            "the LLM provider {p} was removed; add one with capstan llm add"
                                        )));
                                    }
                                    if rec.provider == "anthropic" {
                                        return Err(Error::Invalid(format!(
                                            "{p} is an anthropic provider, which has no embeddings API; give an openai or ollama provider"
                                        )));
                                    }
                                    Some(pid)
                                }
                                other => {
                                    return Err(Error::WrongType {
                                        name: p.to_string(),
                                        expected: "llm provider (see capstan llm add)".into(),
                                        actual: other.type_name().into(),
                                    });
                                }
                            }
                        }
                    };
                    Ok((dir, provider))
                })
            })
            .await?;
        let spec = SearchSpec {
            over: over.to_string(),
            dir: dir.to_hex(),
            maker: self.id().to_hex(),
            mail,
            embed: provider.map(|p| p.to_hex()),
            embed_name: embed.map(str::to_string),
            embed_model: embed_model.map(str::to_string),
        };
        let text = format!(
            "search capability over {over}{}; {}",
            if mail {
                " and the mail of its maker"
            } else {
                ""
            },
            match (embed, embed_model) {
                (Some(e), Some(m)) => format!("full text and vectors from {e} ({m})"),
                (Some(e), None) => format!("full text and vectors from {e}"),
                _ => "full text, and vectors from the local model of a node started with --embed-model".to_string(),
            }
        );
        let record = serde_json::to_vec(&spec).map_err(|e| Error::Corrupt(e.to_string()))?;
        let id = self
            .store(req, name, ValueKind::Text, text.into_bytes())
            .await?;
        self.inner()
            .db
            .transact(move |tx| {
                let record = record.clone();
                Box::pin(async move {
                    tx.set(&key(&id), &record)?;
                    // From now on, writes into the directory log their
                    // changes for the index (see the module docs).
                    let at = keys::dir_watch(&dir);
                    if tx.get(&at).await?.is_none() {
                        tx.set(&at, &model::encode_watch(1, 1))?;
                    }
                    Ok::<_, Error>(())
                })
            })
            .await?;
        tracing::info!(name, over, mail, "made a search capability");
        Ok(id)
    }

    /// The search capability this agent names `name`.
    pub async fn search_spec(&self, name: &str) -> Result<(FormulaId, SearchSpec), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(name)?;
        self.read(move |tx| {
            Box::pin(async move {
                let id = model::resolve(tx, &ctx, &p).await?;
                let (id, f) = crate::api::settle_target(tx, id).await?;
                match tx.get(&key(&id)).await? {
                    Some(b) => {
                        let spec: SearchSpec = serde_json::from_slice(&b)
                            .map_err(|e| Error::Corrupt(format!("search capability: {e}")))?;
                        Ok((id, spec))
                    }
                    None => Err(Error::WrongType {
                        name: p.to_string(),
                        expected: "search capability (see capstan mksearch)".into(),
                        actual: f.kind.type_name().into(),
                    }),
                }
            })
        })
        .await
    }

    /// Searches with the capability this agent names `name`: the best `k`
    /// hits for `query` (see the module docs).
    pub async fn search(&self, name: &str, query: &str, k: u32) -> Result<SearchAnswer, Error> {
        check_query(query, k)?;
        let (id, spec) = self.search_spec(name).await?;
        let state = self.inner().search.get(id);
        let mut st = state.lock().await;
        let t0 = std::time::Instant::now();
        refresh(self, &spec, &mut st).await?;
        let source = Source::of(self, &spec)?;
        let qv = match &source {
            Some(src) if !st.index.is_empty() => {
                match src.embed(self, &spec, &[query.to_string()]).await {
                    Ok(mut v) => v.pop(),
                    Err(EmbedError::Failed(e)) => {
                        st.embed_error = Some(e);
                        None
                    }
                    Err(EmbedError::Refused(r)) => return Err(refused(r)),
                }
            }
            _ => None,
        };
        let t1 = std::time::Instant::now();
        let text = st.index.text_ranking(query, index::FUSE_DEPTH);
        let vector = qv
            .as_deref()
            .map(|q| st.index.vector_ranking(q, index::FUSE_DEPTH))
            .unwrap_or_default();
        let hits = Index::fuse(&text, &vector, k as usize);
        let hits = hits
            .into_iter()
            .filter_map(|h| {
                let d = st.index.doc(h.slot)?;
                Some(SearchHit {
                    path: if d.name.starts_with("mail:") {
                        d.name.clone()
                    } else {
                        format!("{}.{}", spec.over, d.name)
                    },
                    name: d.name.clone(),
                    score: h.score,
                    snippet: index::snippet(&d.text, query),
                    text_rank: h.text_rank,
                    vector_rank: h.vector_rank,
                })
            })
            .collect();
        let rank_us = t1.elapsed().as_micros() as u64;
        let mut notes = Vec::new();
        if st.over_cap > 0 {
            notes.push(format!(
                "{} values are not indexed: an index holds at most {MAX_DOCS} values and {MAX_INDEX_BYTES} bytes of text; search a smaller directory",
                st.over_cap
            ));
        }
        if st.behind > 0 {
            notes.push(format!(
                "{} new values are not indexed yet; the next searches index them",
                st.behind
            ));
        }
        if st.index.truncated() > 0 {
            notes.push(format!(
                "{} values are longer than {MAX_TEXT_PER_VALUE} bytes: only their start is indexed",
                st.index.truncated()
            ));
        }
        if st.tree_cut {
            notes.push(format!(
                "the directory is deeper than {MAX_DEPTH} levels or holds more than {MAX_LISTED} names: the rest is not indexed"
            ));
        }
        let mode = match (&source, &qv, &st.embed_error) {
            (None, _, _) => "text".to_string(),
            (Some(_), Some(_), None) => "fused".to_string(),
            (Some(_), _, Some(e)) => {
                notes.push(format!(
                    "vector search unavailable ({e}); these are full-text results"
                ));
                if qv.is_some() {
                    "fused".to_string()
                } else {
                    "text".to_string()
                }
            }
            (Some(_), None, None) => "text".to_string(),
        };
        let vectors = source.as_ref().map(|s| s.describe(&spec));
        Ok(SearchAnswer {
            query: query.to_string(),
            k,
            over: spec.over.clone(),
            hits,
            indexed: st.index.len(),
            bytes: st.index.bytes(),
            mode,
            vectors,
            notes,
            refresh_us: (t1 - t0).as_micros() as u64,
            rank_us,
        })
    }
}

/// A value under the tree that the index lacks (or has with another id).
struct Fresh {
    name: String,
    id: FormulaId,
}

/// Change-log entries already applied: `(epoch, name)` → the logged value.
type Applied = HashMap<(u64, String), Vec<u8>>;

/// One directory of the tree whose change log the index follows.
#[derive(Debug, Default)]
struct Track {
    /// Its names under the searched directory (`""` for the top one;
    /// several when it is named more than once).
    prefixes: Vec<String>,
    /// The first epoch whose changes may not all be applied.
    from: u64,
    /// Changes of the open epoch already applied: `(epoch, name)` → the
    /// logged value.
    seen: Applied,
}

/// What a full listing found.
struct Listing {
    version: capstan_cluster::Version,
    listed: Vec<String>,
    seen_known: usize,
    fresh: Vec<Fresh>,
    new_dirs: HashSet<FormulaId>,
    new_skipped: HashSet<FormulaId>,
    cut: bool,
    /// The directories walked, with their names and change epochs (`None`:
    /// not watched yet).
    tracks: HashMap<FormulaId, (Vec<String>, Option<u64>)>,
}

/// Why the change logs cannot bring the index up to date.
struct Relist(&'static str);

/// Brings `st` up to date with the store (bounded work; see module docs).
async fn refresh(h: &AgentHandle, spec: &SearchSpec, st: &mut State) -> Result<(), Error> {
    let dir = hex_id(&spec.dir)?;
    let version = match st.tracked.is_some() {
        true => match follow(h, st).await? {
            Ok(v) => v,
            Err(Relist(why)) => {
                tracing::debug!(over = %spec.over, why, "search: listing the directory again");
                st.tracked = None;
                list_all(h, spec, dir, st).await?
            }
        },
        false => list_all(h, spec, dir, st).await?,
    };
    let Some(version) = version else {
        return Ok(());
    };
    // Mail and vectors (steps 4 and 5).
    finish(h, spec, st, version).await
}

/// Lists the whole tree and compares it with the index (the first search,
/// and whenever the change logs cannot be followed); starts following the
/// change logs of the directories listed. `None`: nothing changed since
/// the last complete refresh.
async fn list_all(
    h: &AgentHandle,
    spec: &SearchSpec,
    dir: FormulaId,
    st: &mut State,
) -> Result<Option<capstan_cluster::Version>, Error> {
    // The index's names and ids, shared with the read (rebuilt only after
    // a full listing that changed the index; the change logs keep it).
    if st.known_stale {
        st.known = Arc::new(
            st.index
                .names()
                .filter(|n| !n.starts_with("mail:"))
                .filter_map(|n| st.index.id_of(n).map(|id| (n.clone(), id)))
                .collect(),
        );
        st.known_stale = false;
    }
    // Close the epochs of the directories known so far: the entries
    // written before the listing are then never read.
    let mut known_dirs: Vec<FormulaId> = st.dirs.iter().copied().collect();
    known_dirs.push(dir);
    known_dirs.truncate(MAX_CLOSE);
    close_epochs(h, known_dirs).await?;
    let mut watched_now = false;
    let l = loop {
        let l = list_tree(h, spec, dir, st).await?;
        let Some(l) = l else {
            return Ok(None);
        };
        // Directories nobody watched yet: watch them, then list again, so
        // that every change after the listing is in a log the index reads.
        let unwatched: Vec<FormulaId> = l
            .tracks
            .iter()
            .filter(|(_, (_, e))| e.is_none())
            .map(|(d, _)| *d)
            .collect();
        if unwatched.is_empty() || watched_now {
            break l;
        }
        watch(h, unwatched).await?;
        watched_now = true;
    };
    let Listing {
        version,
        listed,
        seen_known,
        fresh,
        new_dirs,
        new_skipped,
        cut,
        tracks,
    } = l;
    Arc::make_mut(&mut st.dirs).extend(new_dirs);
    Arc::make_mut(&mut st.skipped).extend(new_skipped);
    st.tree_cut = cut;
    // Drop what is gone (only when some indexed name was not seen).
    if seen_known < st.known.len() {
        let listed: HashSet<String> = listed.into_iter().collect();
        let gone: Vec<String> = st
            .index
            .names()
            .filter(|n| !n.starts_with("mail:") && !listed.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            st.index.remove(&n);
        }
        st.known_stale = true;
    }
    if !fresh.is_empty() {
        st.known_stale = true;
    }
    st.tracked = tracks
        .into_iter()
        .map(|(d, (prefixes, epoch))| {
            epoch.map(|from| {
                (
                    d,
                    Track {
                        prefixes,
                        from,
                        seen: HashMap::new(),
                    },
                )
            })
        })
        .collect::<Option<HashMap<_, _>>>();
    index_fresh(h, st, fresh, true).await?;
    if st.known_stale {
        st.known = Arc::new(
            st.index
                .names()
                .filter(|n| !n.starts_with("mail:"))
                .filter_map(|n| st.index.id_of(n).map(|id| (n.clone(), id)))
                .collect(),
        );
        st.known_stale = false;
    }
    Ok(Some(version))
}

/// Starts the change logs of `dirs` (epoch 1) where none is kept yet.
async fn watch(h: &AgentHandle, dirs: Vec<FormulaId>) -> Result<(), Error> {
    let dirs = Arc::new(dirs);
    h.inner()
        .db
        .transact(move |tx| {
            let dirs = dirs.clone();
            Box::pin(async move {
                for d in dirs.iter() {
                    let at = keys::dir_watch(d);
                    if tx.get(&at).await?.is_none() {
                        tx.set(&at, &model::encode_watch(1, 1))?;
                    }
                }
                Ok::<_, Error>(())
            })
        })
        .await
}

/// Closes the current epoch of the change logs of `dirs` (see the module
/// docs) and trims the epochs older than [`KEEP_EPOCHS`].
async fn close_epochs(h: &AgentHandle, bump: Vec<FormulaId>) -> Result<(), Error> {
    if bump.is_empty() {
        return Ok(());
    }
    let bump = Arc::new(bump);
    h.inner()
        .db
        .transact(move |tx| {
            let bump = bump.clone();
            Box::pin(async move {
                for d in bump.iter() {
                    let at = keys::dir_watch(d);
                    let Some(w) = tx.get(&at).await? else {
                        continue;
                    };
                    let (e, floor) = model::decode_watch(&w)?;
                    let next = e.saturating_add(1);
                    let keep_from = next.saturating_sub(KEEP_EPOCHS).max(floor);
                    tx.set(&at, &model::encode_watch(next, keep_from))?;
                    if keep_from > floor {
                        tx.clear_range(
                            &keys::dir_changes_from(d, 0),
                            &keys::dir_changes_from(d, keep_from),
                        );
                    }
                }
                Ok::<_, Error>(())
            })
        })
        .await?;
    Ok(())
}

/// One snapshot's listing of the tree (see [`list_all`]).
async fn list_tree(
    h: &AgentHandle,
    spec: &SearchSpec,
    dir: FormulaId,
    st: &State,
) -> Result<Option<Listing>, Error> {
    let known = st.known.clone();
    let dirs = st.dirs.clone();
    let skipped = st.skipped.clone();
    let over = spec.over.clone();
    let last = st.scanned_version;
    h.inner()
        .db
        .read(move |tx| {
            let (known, dirs, skipped, over) =
                (known.clone(), dirs.clone(), skipped.clone(), over.clone());
            Box::pin(async move {
                // Nothing committed anywhere since the last listing: the
                // tree is as it was.
                let version = tx.read_version();
                if last == Some(version) {
                    return Ok(None);
                }
                if model::get_formula(tx, &dir).await?.is_none() {
                    return Err(Error::Invalid(format!(
                        "the directory {over} this search capability covers is gone; make another with capstan mksearch"
                    )));
                }
                let mut l = Listing {
                    version,
                    listed: Vec::new(),
                    seen_known: 0,
                    fresh: Vec::new(),
                    new_dirs: HashSet::new(),
                    new_skipped: HashSet::new(),
                    cut: false,
                    tracks: HashMap::new(),
                };
                let mut listed = 0usize;
                let mut queue = vec![(dir, String::new(), 0usize)];
                while let Some((d, prefix, depth)) = queue.pop() {
                    match l.tracks.get_mut(&d) {
                        Some(t) => t.0.push(prefix.clone()),
                        None => {
                            let epoch = match tx.get(&keys::dir_watch(&d)).await? {
                                Some(w) => Some(model::decode_watch(&w)?.0),
                                None => None,
                            };
                            l.tracks.insert(d, (vec![prefix.clone()], epoch));
                        }
                    }
                    let rows = model::list_dir(tx, &d, MAX_LISTED - listed).await?;
                    listed += rows.len();
                    if listed >= MAX_LISTED {
                        l.cut = true;
                    }
                    for (n, id) in rows {
                        let name = if prefix.is_empty() { n } else { format!("{prefix}.{n}") };
                        if known.get(&name) == Some(&id) {
                            l.seen_known += 1;
                            l.listed.push(name);
                            continue;
                        }
                        if dirs.contains(&id) || l.new_dirs.contains(&id) {
                            if depth < MAX_DEPTH {
                                queue.push((id, name, depth + 1));
                            } else {
                                l.cut = true;
                            }
                            continue;
                        }
                        if skipped.contains(&id) || l.new_skipped.contains(&id) {
                            continue;
                        }
                        let Some(f) = model::get_formula(tx, &id).await? else {
                            continue;
                        };
                        match f.kind {
                            FormulaKind::Directory => {
                                l.new_dirs.insert(id);
                                if depth < MAX_DEPTH {
                                    queue.push((id, name, depth + 1));
                                } else {
                                    l.cut = true;
                                }
                            }
                            FormulaKind::Value(v) if v.kind != ValueKind::Bytes => {
                                l.listed.push(name.clone());
                                l.fresh.push(Fresh { name, id });
                            }
                            _ => {
                                l.new_skipped.insert(id);
                            }
                        }
                    }
                }
                Ok::<_, Error>(Some(l))
            })
        })
        .await
}

/// What one read of the change logs found.
struct Followed {
    version: capstan_cluster::Version,
    /// Per directory: its epoch in the snapshot, and the entries of that
    /// epoch read (the ones of older epochs are closed: never read again).
    epochs: Vec<(FormulaId, u64, Applied)>,
    fresh: Vec<Fresh>,
    gone: Vec<String>,
    skipped: Vec<FormulaId>,
}

/// Brings the index up to date from the change logs of the directories it
/// follows: reads only the names changed since the last refresh. `Ok(None)`:
/// nothing changed; `Err(Relist)`: the logs do not say enough (a directory
/// came, went or was trimmed past): list the tree.
async fn follow(
    h: &AgentHandle,
    st: &mut State,
) -> Result<Result<Option<capstan_cluster::Version>, Relist>, Error> {
    let Some(tracked) = st.tracked.as_ref() else {
        return Ok(Err(Relist("not following")));
    };
    // Close the epochs of directories with many open entries, so that the
    // entries read again by each refresh stay few: a writer that read the
    // old epoch and has not committed yet conflicts and writes again
    // under the new one. Older epochs are trimmed (a reader still behind
    // them lists the tree).
    let bump: Vec<FormulaId> = tracked
        .iter()
        .filter(|(_, t)| t.seen.len() >= CLOSE_EPOCH_AT)
        .map(|(d, _)| *d)
        .collect();
    close_epochs(h, bump).await?;
    let want: Vec<(FormulaId, u64, Vec<String>)> = tracked
        .iter()
        .map(|(d, t)| (*d, t.from, t.prefixes.clone()))
        .collect();
    let want = Arc::new(want);
    // What the refresh needs of the state, without copying it: the
    // entries already applied, the index's ids, the kinds met.
    let seen: Arc<HashMap<FormulaId, Applied>> = Arc::new(
        tracked
            .iter()
            .filter(|(_, t)| !t.seen.is_empty())
            .map(|(d, t)| (*d, t.seen.clone()))
            .collect(),
    );
    let known = st.known.clone();
    let dirs = st.dirs.clone();
    let skipped = st.skipped.clone();
    let prefixes: Arc<HashSet<String>> = Arc::new(
        tracked
            .values()
            .flat_map(|t| t.prefixes.iter().cloned())
            .collect(),
    );
    let last = st.scanned_version;
    let read = h
        .inner()
        .db
        .read(move |tx| {
            let (want, seen, known, dirs, skipped, prefixes) = (
                want.clone(),
                seen.clone(),
                known.clone(),
                dirs.clone(),
                skipped.clone(),
                prefixes.clone(),
            );
            Box::pin(async move {
                let version = tx.read_version();
                if last == Some(version) {
                    return Ok(Ok(None));
                }
                let mut out = Followed {
                    version,
                    epochs: Vec::new(),
                    fresh: Vec::new(),
                    gone: Vec::new(),
                    skipped: Vec::new(),
                };
                let mut changed: Vec<(FormulaId, String)> = Vec::new();
                for (d, from, _) in want.iter() {
                    let Some(w) = tx.get(&keys::dir_watch(d)).await? else {
                        return Ok(Err(Relist("a directory is no longer watched")));
                    };
                    let (epoch, floor) = model::decode_watch(&w)?;
                    if *from < floor || epoch < *from {
                        return Ok(Err(Relist("the change log was trimmed")));
                    }
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin: keys::dir_changes_from(d, *from),
                            end: capstan_cluster::tuple::prefix_end(&keys::dir_watch(d)),
                            limit: MAX_CHANGES + 1,
                            reverse: false,
                        })
                        .await?;
                    if rows.len() > MAX_CHANGES {
                        return Ok(Err(Relist("too many changes")));
                    }
                    let mut open = Applied::new();
                    for (k, v) in rows {
                        let mut r = TupleReader::new(&k);
                        let (e, name) =
                            (|| -> Result<(u64, String), capstan_cluster::tuple::TupleError> {
                                r.str()?;
                                r.bytes()?;
                                Ok((r.u64()?, r.str()?))
                            })()
                            .map_err(|e| Error::Corrupt(format!("a directory change: {e}")))?;
                        let applied = seen
                            .get(d)
                            .and_then(|s| s.get(&(e, name.clone())))
                            .is_some_and(|old| *old == v);
                        if e >= epoch {
                            open.insert((e, name.clone()), v);
                        }
                        if !applied {
                            changed.push((*d, name));
                        }
                    }
                    out.epochs.push((*d, epoch, open));
                }
                changed.sort();
                changed.dedup();
                if changed.len() > MAX_NEW_PER_REFRESH {
                    return Ok(Err(Relist("too many changes")));
                }
                let ahead: Vec<Vec<u8>> = changed.iter().map(|(d, n)| keys::name(d, n)).collect();
                tx.prefetch(&ahead).await?;
                let by_dir: HashMap<FormulaId, &Vec<String>> =
                    want.iter().map(|(d, _, p)| (*d, p)).collect();
                for (d, n) in changed {
                    let now = model::lookup(tx, &d, &n).await?;
                    for p in by_dir.get(&d).copied().into_iter().flatten() {
                        let name = if p.is_empty() {
                            n.clone()
                        } else {
                            format!("{p}.{n}")
                        };
                        if prefixes.contains(&name) {
                            return Ok(Err(Relist("a subdirectory changed")));
                        }
                        let Some(id) = now else {
                            out.gone.push(name);
                            continue;
                        };
                        if known.get(&name) == Some(&id) {
                            continue;
                        }
                        if dirs.contains(&id) {
                            return Ok(Err(Relist("a subdirectory came")));
                        }
                        if skipped.contains(&id) {
                            out.gone.push(name);
                            continue;
                        }
                        match model::get_formula(tx, &id).await?.map(|f| f.kind) {
                            Some(FormulaKind::Directory) => {
                                return Ok(Err(Relist("a subdirectory came")));
                            }
                            Some(FormulaKind::Value(v)) if v.kind != ValueKind::Bytes => {
                                out.fresh.push(Fresh { name, id });
                            }
                            Some(_) => {
                                out.skipped.push(id);
                                out.gone.push(name);
                            }
                            None => out.gone.push(name),
                        }
                    }
                }
                Ok::<_, Error>(Ok(Some(out)))
            })
        })
        .await?;
    let out = match read {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(Ok(None)),
        Err(r) => return Ok(Err(r)),
    };
    if let Some(tracked) = st.tracked.as_mut() {
        for (d, epoch, open) in out.epochs {
            if let Some(t) = tracked.get_mut(&d) {
                t.from = epoch;
                t.seen = open;
            }
        }
    }
    if !out.skipped.is_empty() {
        Arc::make_mut(&mut st.skipped).extend(out.skipped);
    }
    for n in &out.gone {
        if st.index.remove(n) {
            Arc::make_mut(&mut st.known).remove(n);
        }
    }
    index_fresh(h, st, out.fresh, false).await?;
    Ok(Ok(Some(out.version)))
}

/// Reads and indexes the values `fresh`, within the caps and the bound;
/// keeps `known` in step when it is not to be rebuilt.
async fn index_fresh(
    h: &AgentHandle,
    st: &mut State,
    fresh: Vec<Fresh>,
    full: bool,
) -> Result<(), Error> {
    let room = MAX_DOCS.saturating_sub(st.index.len());
    let mut over_cap = 0usize;
    let todo: Vec<Fresh> = if fresh.len() > room {
        over_cap = fresh.len() - room;
        fresh.into_iter().take(room).collect()
    } else {
        fresh
    };
    st.behind = todo.len().saturating_sub(MAX_NEW_PER_REFRESH);
    if st.behind > 0 {
        // What is left is found by the next full listing.
        st.tracked = None;
    }
    for batch in todo
        .into_iter()
        .take(MAX_NEW_PER_REFRESH)
        .collect::<Vec<_>>()
        .chunks(READ_BATCH)
    {
        let ids: Vec<FormulaId> = batch.iter().map(|f| f.id).collect();
        let texts = h
            .inner()
            .db
            .read(move |tx| {
                let ids = ids.clone();
                Box::pin(async move {
                    let mut out = Vec::with_capacity(ids.len());
                    for id in &ids {
                        let t = match model::get_formula(tx, id).await? {
                            Some(f) => match f.kind {
                                FormulaKind::Value(v) => {
                                    let b = crate::api::value_bytes(tx, id, &v).await?;
                                    String::from_utf8(b).ok()
                                }
                                _ => None,
                            },
                            None => None,
                        };
                        out.push(t);
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await?;
        for (f, t) in batch.iter().zip(texts) {
            let Some(t) = t else {
                // Not text (any more): not indexed under that name.
                if st.index.remove(&f.name) && !st.known_stale {
                    Arc::make_mut(&mut st.known).remove(&f.name);
                }
                continue;
            };
            if st.index.bytes() + t.len().min(MAX_TEXT_PER_VALUE) > MAX_INDEX_BYTES {
                over_cap += 1;
                continue;
            }
            let (t, cut) = cap_text(t);
            st.index.insert(f.name.clone(), f.id, t, cut);
            if !st.known_stale {
                Arc::make_mut(&mut st.known).insert(f.name.clone(), f.id);
            }
        }
    }
    // A full listing counts every value over the caps; following the
    // change logs adds the new ones.
    st.over_cap = if full {
        over_cap
    } else {
        st.over_cap + over_cap
    };
    Ok(())
}

/// Steps 4 and 5 of a refresh: mail texts, vectors.
async fn finish(
    h: &AgentHandle,
    spec: &SearchSpec,
    st: &mut State,
    version: capstan_cluster::Version,
) -> Result<(), Error> {
    // 4. Mail texts.
    if spec.mail {
        let maker = hex_id(&spec.maker)?;
        let from = st.mail_next;
        let rows = h
            .inner()
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let prefix = keys::inbox(&maker);
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin: keys::message(&maker, from),
                            end: capstan_cluster::tuple::prefix_end(&prefix),
                            limit: MAX_MAIL_PER_REFRESH,
                            reverse: false,
                        })
                        .await?;
                    let mut out = Vec::new();
                    for (_, v) in rows {
                        out.push(crate::records::MessageRec::decode(&v)?);
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await?;
        for m in rows {
            st.mail_next = st.mail_next.max(m.number + 1);
            let text = match &m.body {
                BodyRec::Package { strings, .. } => strings.join(""),
                BodyRec::Request { description, .. } => description.clone(),
                #[allow(unreachable_patterns)]
                _ => continue,
            };
            if text.trim().is_empty() || st.index.len() >= MAX_DOCS {
                continue;
            }
            let (t, cut) = cap_text(text);
            st.index.insert(
                format!("mail:{}", m.number),
                FormulaId::derived("mail", &m.number.to_be_bytes()),
                t,
                cut,
            );
        }
    }
    // 5. Vectors for what lacks them.
    if let Some(src) = Source::of(h, spec)? {
        let missing = st.index.missing_vectors(MAX_EMBED_PER_REFRESH);
        st.embed_error = None;
        for batch in missing.chunks(EMBED_BATCH) {
            let texts: Vec<String> = batch.iter().map(|(_, t)| t.clone()).collect();
            match src.embed(h, spec, &texts).await {
                Ok(vs) => {
                    for ((name, _), v) in batch.iter().zip(vs) {
                        st.index.set_vector(name, v);
                    }
                }
                Err(EmbedError::Failed(e)) => {
                    st.embed_error = Some(e);
                    break;
                }
                Err(EmbedError::Refused(r)) => {
                    // Tried again by the next search.
                    st.scanned_version = None;
                    return Err(refused(r));
                }
            }
        }
    }
    // The next search skips the listing if nothing was committed since,
    // unless work is left (values over the per-refresh bound, vectors
    // that could not be had).
    st.scanned_version = (st.behind == 0 && st.embed_error.is_none()).then_some(version);
    Ok(())
}

/// The error of a search whose embeddings the budget refused.
fn refused(why: String) -> Error {
    Error::Invalid(format!(
        "{why}; this search capability needs embeddings for its vector search (a capability made without --embed searches full text only)"
    ))
}

fn cap_text(mut t: String) -> (String, bool) {
    if t.len() <= MAX_TEXT_PER_VALUE {
        return (t, false);
    }
    let mut at = MAX_TEXT_PER_VALUE;
    while !t.is_char_boundary(at) {
        at -= 1;
    }
    t.truncate(at);
    (t, true)
}
