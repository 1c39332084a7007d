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
//! search capability ([`crate::index::Indexes`]) and builds it from the store on first
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
//! levels of subdirectories, [`crate::index::MAX_INDEXES`] indexes per node.
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
mod refresh;

use capstan_cluster::tuple::{TupleKey, TupleReader};
use capstan_proto::{FormulaId, RequestId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::names::Path;
use crate::records::{BodyRec, FormulaKind};
use crate::types::ValueKind;
use crate::{keys, model};

pub use crate::embed_model::LocalModel;
use crate::index;
pub use crate::index::{Index, RRF_K};
use embed::{EmbedError, Source};
use refresh::*;

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
                    let (dir, f) = crate::model::settle_target(tx, id).await?;
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
                            let (pid, f) = crate::model::settle_target(tx, id).await?;
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
                let (id, f) = crate::model::settle_target(tx, id).await?;
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
