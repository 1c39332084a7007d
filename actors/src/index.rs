//! The in-memory index of one search capability: an inverted index scored
//! with BM25 (full text), dense vectors compared by cosine (when an
//! embedding provider is set), and Reciprocal Rank Fusion of the two
//! rankings (k = 60, IronClaw's choice). Pure: no store, no clock, no I/O.
//!
//! Also one node's [`Indexes`], by search capability, each with the
//! [`State`] its refreshes keep: a leaf below [`crate::node`], whose `Inner`
//! holds them; keeping them up to date is [`crate::search`]'s.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use capstan_proto::FormulaId;

/// The RRF constant: a hit ranked `r` (1-based) in a list adds `1 / (K + r)`.
pub const RRF_K: f64 = 60.0;
/// BM25 parameters (the usual ones).
const BM25_K1: f32 = 1.2;
const BM25_B: f32 = 0.75;
/// Longest token indexed (longer runs are cut).
const MAX_TOKEN: usize = 64;
/// How many hits of each ranking take part in the fusion.
pub const FUSE_DEPTH: usize = 100;
/// Snippet width, characters.
const SNIPPET_CHARS: usize = 160;

/// One indexed document: a value under the directory (or a mail text).
#[derive(Debug, Clone)]
pub struct Doc {
    /// The name the holder uses: a path under the directory, or `mail:N`.
    pub name: String,
    /// The value's formula (values are immutable: a new id is a new value).
    pub id: FormulaId,
    /// The indexed text (capped).
    pub text: String,
    /// Whether the text was cut to the per-value cap.
    pub truncated: bool,
    len: u32,
    terms: Vec<(u32, u32)>,
    pub vector: Option<Vec<f32>>,
}

/// A hit before rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub slot: usize,
    pub score: f64,
    pub text_rank: Option<usize>,
    pub vector_rank: Option<usize>,
}

/// The index proper.
#[derive(Debug, Default)]
pub struct Index {
    docs: Vec<Option<Doc>>,
    free: Vec<usize>,
    by_name: HashMap<String, usize>,
    terms: HashMap<String, u32>,
    postings: Vec<Vec<(u32, u32)>>,
    total_len: u64,
    live: usize,
    bytes: usize,
    truncated: usize,
}

/// Lowercased alphanumeric runs (Unicode-aware), each at most [`MAX_TOKEN`]
/// bytes. `INV-2024-0042` gives `inv`, `2024`, `0042`.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                if cur.len() < MAX_TOKEN {
                    cur.push(l);
                }
            }
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Index {
    /// Documents indexed.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Documents whose text was cut to the per-value cap.
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// Bytes of text indexed.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The formula indexed under `name`, if any.
    pub fn id_of(&self, name: &str) -> Option<FormulaId> {
        self.by_name
            .get(name)
            .and_then(|&s| self.docs[s].as_ref())
            .map(|d| d.id)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    pub fn doc(&self, slot: usize) -> Option<&Doc> {
        self.docs.get(slot).and_then(|d| d.as_ref())
    }

    /// Names of documents that have no vector yet (for the embedder).
    pub fn missing_vectors(&self, limit: usize) -> Vec<(String, String)> {
        self.docs
            .iter()
            .flatten()
            .filter(|d| d.vector.is_none())
            .take(limit)
            .map(|d| (d.name.clone(), d.text.clone()))
            .collect()
    }

    pub fn set_vector(&mut self, name: &str, v: Vec<f32>) {
        if let Some(&s) = self.by_name.get(name)
            && let Some(d) = self.docs[s].as_mut()
        {
            d.vector = Some(normalize(v));
        }
    }

    /// Adds (or replaces) the document under `name`.
    pub fn insert(&mut self, name: String, id: FormulaId, text: String, truncated: bool) {
        self.remove(&name);
        let tokens = tokenize(&text);
        let mut tf: HashMap<u32, u32> = HashMap::new();
        for t in &tokens {
            let next = self.terms.len() as u32;
            let tid = *self.terms.entry(t.clone()).or_insert(next);
            if tid as usize == self.postings.len() {
                self.postings.push(Vec::new());
            }
            *tf.entry(tid).or_default() += 1;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.docs.push(None);
            self.docs.len() - 1
        });
        let mut terms: Vec<(u32, u32)> = tf.into_iter().collect();
        terms.sort_unstable();
        for &(t, n) in &terms {
            self.postings[t as usize].push((slot as u32, n));
        }
        self.total_len += tokens.len() as u64;
        self.bytes += text.len();
        self.live += 1;
        self.truncated += usize::from(truncated);
        self.by_name.insert(name.clone(), slot);
        self.docs[slot] = Some(Doc {
            name,
            id,
            text,
            truncated,
            len: tokens.len() as u32,
            terms,
            vector: None,
        });
    }

    /// Drops the document under `name`; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let Some(slot) = self.by_name.remove(name) else {
            return false;
        };
        if let Some(d) = self.docs[slot].take() {
            for (t, _) in &d.terms {
                self.postings[*t as usize].retain(|(s, _)| *s as usize != slot);
            }
            self.total_len -= u64::from(d.len);
            self.bytes -= d.text.len();
            self.live -= 1;
            self.truncated -= usize::from(d.truncated);
            self.free.push(slot);
        }
        true
    }

    /// BM25 ranking of `query`, best first, at most `depth` hits.
    pub fn text_ranking(&self, query: &str, depth: usize) -> Vec<(usize, f32)> {
        if self.live == 0 {
            return Vec::new();
        }
        let n = self.live as f32;
        let avg = (self.total_len as f32 / n).max(1.0);
        let mut q = tokenize(query);
        q.sort();
        q.dedup();
        let mut acc: HashMap<u32, f32> = HashMap::new();
        for t in &q {
            let Some(&tid) = self.terms.get(t) else {
                continue;
            };
            let posting = &self.postings[tid as usize];
            if posting.is_empty() {
                continue;
            }
            let df = posting.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(slot, tf) in posting {
                let Some(d) = self.docs[slot as usize].as_ref() else {
                    continue;
                };
                let tf = tf as f32;
                let norm = BM25_K1 * (1.0 - BM25_B + BM25_B * d.len as f32 / avg);
                *acc.entry(slot).or_default() += idf * tf * (BM25_K1 + 1.0) / (tf + norm);
            }
        }
        top(acc.into_iter().map(|(s, v)| (s as usize, v)), depth)
    }

    /// Cosine ranking against `query` (normalized here), best first.
    pub fn vector_ranking(&self, query: &[f32], depth: usize) -> Vec<(usize, f32)> {
        let q = normalize(query.to_vec());
        let scored = self.docs.iter().enumerate().filter_map(|(slot, d)| {
            let v = d.as_ref()?.vector.as_ref()?;
            (v.len() == q.len()).then(|| (slot, dot(v, &q)))
        });
        top(scored, depth)
    }

    /// Fuses the rankings by RRF and keeps the best `k`.
    pub fn fuse(text: &[(usize, f32)], vector: &[(usize, f32)], k: usize) -> Vec<Hit> {
        let mut hits: HashMap<usize, Hit> = HashMap::new();
        for (i, (slot, _)) in text.iter().enumerate() {
            let h = hits.entry(*slot).or_insert(Hit {
                slot: *slot,
                score: 0.0,
                text_rank: None,
                vector_rank: None,
            });
            h.score += 1.0 / (RRF_K + (i + 1) as f64);
            h.text_rank = Some(i + 1);
        }
        for (i, (slot, _)) in vector.iter().enumerate() {
            let h = hits.entry(*slot).or_insert(Hit {
                slot: *slot,
                score: 0.0,
                text_rank: None,
                vector_rank: None,
            });
            h.score += 1.0 / (RRF_K + (i + 1) as f64);
            h.vector_rank = Some(i + 1);
        }
        let mut out: Vec<Hit> = hits.into_values().collect();
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| {
                    a.text_rank
                        .unwrap_or(usize::MAX)
                        .cmp(&b.text_rank.unwrap_or(usize::MAX))
                })
                .then_with(|| a.slot.cmp(&b.slot))
        });
        out.truncate(k);
        out
    }
}

fn top(it: impl Iterator<Item = (usize, f32)>, depth: usize) -> Vec<(usize, f32)> {
    let mut v: Vec<(usize, f32)> = it.filter(|(_, s)| s.is_finite() && *s > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(depth);
    v
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = dot(&v, &v).sqrt();
    if n > 0.0 && n.is_finite() {
        for x in &mut v {
            *x /= n;
        }
    }
    v
}

/// A window of `text` around the first query term found in it (else its
/// start), on character boundaries, with `…` where it was cut.
pub fn snippet(text: &str, query: &str) -> String {
    let lower = text.to_lowercase();
    let start = if lower.len() == text.len() {
        tokenize(query)
            .iter()
            .filter_map(|t| lower.find(t.as_str()))
            .min()
            .unwrap_or(0)
    } else {
        0
    };
    // Back up a little so the term has context.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = chars.iter().position(|(i, _)| *i >= start).unwrap_or(0);
    let from = at.saturating_sub(SNIPPET_CHARS / 4);
    let to = (from + SNIPPET_CHARS).min(chars.len());
    let mut s: String = chars[from..to].iter().map(|(_, c)| *c).collect();
    s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if from > 0 {
        s.insert(0, '…');
    }
    if to < chars.len() {
        s.push('…');
    }
    s
}

// --- a node's indexes --------------------------------------------------------

/// Most indexes a node keeps in memory.
pub const MAX_INDEXES: usize = 64;

/// One node's indexes, by search capability.
#[derive(Default)]
pub struct Indexes(Mutex<HashMap<FormulaId, Arc<tokio::sync::Mutex<State>>>>);

impl std::fmt::Debug for Indexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Indexes")
    }
}

impl Indexes {
    pub(crate) fn get(&self, id: FormulaId) -> Arc<tokio::sync::Mutex<State>> {
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
    pub(crate) index: Index,
    /// Formulas met under the tree that are directories (to descend) or
    /// neither values nor directories (skipped).
    pub(crate) dirs: Arc<HashSet<FormulaId>>,
    pub(crate) skipped: Arc<HashSet<FormulaId>>,
    /// The directories of the tree whose change logs the index follows
    /// (`None`: the next refresh lists the tree).
    pub(crate) tracked: Option<HashMap<FormulaId, Track>>,
    /// The next inbox number to index (mail).
    pub(crate) mail_next: u64,
    /// Values not indexed for the caps, as of the last refresh.
    pub(crate) over_cap: usize,
    /// Values left for the next refresh (bounded work).
    pub(crate) behind: usize,
    /// The index's names → ids (values only), as the refresh compares them.
    pub(crate) known: Arc<HashMap<String, FormulaId>>,
    pub(crate) known_stale: bool,
    /// The store version of the last complete refresh (`None`: not yet, or
    /// it left work for the next one).
    pub(crate) scanned_version: Option<capstan_cluster::Version>,
    /// Why the last embedding call failed, if it did.
    pub(crate) embed_error: Option<String>,
    /// Whether the tree was deeper or wider than indexed.
    pub(crate) tree_cut: bool,
}

/// Change-log entries already applied: `(epoch, name)` → the logged value.
pub(crate) type Applied = HashMap<(u64, String), Vec<u8>>;

/// One directory of the tree whose change log the index follows.
#[derive(Debug, Default)]
pub(crate) struct Track {
    /// Its names under the searched directory (`""` for the top one;
    /// several when it is named more than once).
    pub(crate) prefixes: Vec<String>,
    /// The first epoch whose changes may not all be applied.
    pub(crate) from: u64,
    /// Changes of the open epoch already applied: `(epoch, name)` → the
    /// logged value.
    pub(crate) seen: Applied,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> FormulaId {
        FormulaId::random()
    }

    #[test]
    fn bm25_finds_rare_identifier() {
        let mut ix = Index::default();
        for i in 0..50 {
            ix.insert(
                format!("v{i}"),
                id(),
                format!("note number {i} about the weather"),
                false,
            );
        }
        ix.insert(
            "inv".into(),
            id(),
            "invoice INV-2024-0042 paid".into(),
            false,
        );
        let r = ix.text_ranking("INV-2024-0042", 10);
        assert_eq!(ix.doc(r[0].0).unwrap().name, "inv");
    }

    #[test]
    fn replace_and_remove_keep_counts() {
        let mut ix = Index::default();
        ix.insert("a".into(), id(), "alpha beta".into(), false);
        ix.insert("a".into(), id(), "gamma".into(), false);
        assert_eq!(ix.len(), 1);
        assert!(ix.text_ranking("alpha", 5).is_empty());
        assert_eq!(ix.text_ranking("gamma", 5).len(), 1);
        assert!(ix.remove("a"));
        assert!(ix.is_empty());
        assert_eq!(ix.bytes(), 0);
        assert!(ix.text_ranking("gamma", 5).is_empty());
    }

    #[test]
    fn rrf_rewards_agreement() {
        let text = vec![(1, 5.0), (2, 4.0), (3, 3.0)];
        let vector = vec![(3, 0.9), (4, 0.8)];
        let hits = Index::fuse(&text, &vector, 10);
        assert_eq!(hits[0].slot, 3);
        assert!((hits[0].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
        assert_eq!(hits.len(), 4);
        assert_eq!(Index::fuse(&text, &vector, 2).len(), 2);
    }

    #[test]
    fn vectors_rank_by_cosine() {
        let mut ix = Index::default();
        ix.insert("x".into(), id(), "one".into(), false);
        ix.insert("y".into(), id(), "two".into(), false);
        ix.set_vector("x", vec![1.0, 0.0]);
        ix.set_vector("y", vec![0.6, 0.8]);
        let r = ix.vector_ranking(&[0.0, 2.0], 5);
        assert_eq!(ix.doc(r[0].0).unwrap().name, "y");
    }

    #[test]
    fn snippets_cut_on_char_boundaries() {
        let t = "é".repeat(300) + " needle " + &"ü".repeat(300);
        let s = snippet(&t, "needle");
        assert!(s.contains("needle"));
        assert!(s.starts_with('…') && s.ends_with('…'));
        assert_eq!(snippet("short", "x"), "short");
    }
}
