//! Step 1 of a pass: the mark (one snapshot read a page at a time) and
//! the reachability walk.

use super::*;

/// What the mark knows of one formula.
#[derive(Debug, Clone, Copy)]
pub(super) struct Info {
    pub(super) collectable: bool,
    pub(super) kind: Shape,
}

/// Which of a formula's key families the sweep must clear besides its
/// record, stamp and mark (see [`families`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// Value chunks `("v", id, …)`.
    Value,
    /// A value whose bytes are in its record (no chunks, ever: a value
    /// gets none after it is written).
    InlineValue,
    /// Names `("n", id, …)` and the change log `("dchg", id, …)`: a
    /// directory may get names after the mark's snapshot from a writer
    /// that holds its id, so these are always read.
    Directory,
    /// Neither (promises, remote references, kinds never collected).
    Other,
}

/// What the mark read from one snapshot.
#[derive(Default)]
pub(super) struct Graph {
    /// Every formula.
    pub(super) formulas: HashMap<FormulaId, Info>,
    /// Eval results with recorded dependencies (`("evd", id)`).
    pub(super) with_deps: HashSet<FormulaId>,
    /// Formulas deleted by an earlier pass with keys left to clear.
    pub(super) swept: Vec<FormulaId>,
    pub(super) edges: HashMap<FormulaId, Vec<FormulaId>>,
    pub(super) roots: Vec<FormulaId>,
    pub(super) stamps: HashMap<FormulaId, Vec<u8>>,
    pub(super) condemned: Vec<FormulaId>,
    pub(super) rescued: Option<Vec<u8>>,
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {e}"))
}

pub(super) fn id_in_key(key: &[u8], skip_strs: usize) -> Result<FormulaId, Error> {
    let tag = first_tag(key);
    let mut r = if skip_strs == 1 && key.first() == Some(&0x02) && key.len() > tag.len() + 1 {
        // The common case, without decoding the family's name.
        TupleReader::new(&key[tag.len() + 2..])
    } else {
        let mut r = TupleReader::new(key);
        for _ in 0..skip_strs {
            r.str().map_err(|e| corrupt("key", e))?;
        }
        r
    };
    let b = r.bytes().map_err(|e| corrupt("key", e))?;
    FormulaId::from_slice(&b).map_err(|e| corrupt("key", e))
}

/// Reads `[begin, end)` of `snap` a page at a time.
pub(super) async fn scan(
    snap: &dyn Snapshot,
    begin: Vec<u8>,
    end: Vec<u8>,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut begin = begin;
    loop {
        let rows = snap
            .range(&RangeOption {
                begin: begin.clone(),
                end: end.clone(),
                limit: PAGE,
                reverse: false,
            })
            .await?;
        for (k, v) in &rows {
            f(k, v)?;
        }
        tokio::task::yield_now().await;
        match rows.last() {
            Some((k, _)) if rows.len() == PAGE => begin = key_after(k),
            _ => return Ok(()),
        }
    }
}

/// Formula ids found in bytes that are not decoded here: raw 32-byte ids
/// and 64-character lowercase hex.
pub(super) fn ids_in(bytes: &[u8], known: &HashMap<FormulaId, Info>, out: &mut Vec<FormulaId>) {
    if bytes.len() >= 32 {
        for w in bytes.windows(32) {
            let id = FormulaId(w.try_into().unwrap_or([0; 32]));
            if known.contains_key(&id) {
                out.push(id);
            }
        }
    }
    let is_hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    let mut i = 0;
    while i + 64 <= bytes.len() {
        if !is_hex(&bytes[i]) {
            i += 1;
            continue;
        }
        let run = bytes[i..].iter().take_while(|c| is_hex(c)).count();
        if run >= 64 {
            for s in 0..=run - 64 {
                if let Ok(b) = hex::decode(&bytes[i + s..i + s + 64]) {
                    let id = FormulaId(b.try_into().unwrap_or([0; 32]));
                    if known.contains_key(&id) {
                        out.push(id);
                    }
                }
            }
        }
        i += run.max(1);
    }
}

/// Formula ids that are elements of a tuple key (escaped there, so not
/// found by a search of the raw bytes when an id holds a zero byte).
pub(super) fn ids_in_key(key: &[u8], known: &HashMap<FormulaId, Info>, out: &mut Vec<FormulaId>) {
    let mut rest = key;
    while !rest.is_empty() {
        let mut r = TupleReader::new(rest);
        if let Ok(b) = r.bytes() {
            if let Ok(id) = FormulaId::from_slice(&b)
                && known.contains_key(&id)
            {
                out.push(id);
            }
        } else {
            r = TupleReader::new(rest);
            if r.str().is_err() {
                r = TupleReader::new(rest);
                if r.u64().is_err() {
                    return;
                }
            }
        }
        rest = r.rest();
    }
}

pub(super) fn first_str(key: &[u8]) -> String {
    TupleReader::new(key).str().unwrap_or_default()
}

/// The first element of a tuple key when it is a string, as its encoded
/// bytes (no allocation: the mark calls it for every key of the store). The
/// key families' names hold no zero byte, so the first zero ends it.
pub(super) fn first_tag(key: &[u8]) -> &[u8] {
    match key.split_first() {
        Some((0x02, rest)) => &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())],
        _ => &[],
    }
}

pub(super) async fn mark(snap: &dyn Snapshot) -> Result<Graph, Error> {
    let mut g = Graph::default();
    if let Some(b) = snap.get(&keys::root_host()).await? {
        g.roots
            .push(FormulaId::from_slice(&b).map_err(|e| corrupt("root host id", e))?);
    }
    g.rescued = snap.get(&keys::gc_rescued()).await?;
    // Formulas first: the generic scan below looks ids up among them.
    let fp = keys::formulas();
    let mut formulas = Vec::new();
    scan(snap, fp.clone(), prefix_end(&fp), |k, v| {
        let id = id_in_key(k, 1)?;
        formulas.push((id, Formula::decode(v)?));
        Ok(())
    })
    .await?;
    for (id, f) in formulas {
        let mut e = Vec::new();
        let collectable = match &f.kind {
            FormulaKind::Host(a) | FormulaKind::Guest(a) => {
                e.push(a.pet_store);
                e.extend(a.host);
                false
            }
            FormulaKind::Directory | FormulaKind::Value(_) | FormulaKind::Remote(_) => true,
            FormulaKind::Promise(p) => {
                e.push(p.requester);
                match &p.state {
                    PromiseState::Resolved(t) => {
                        e.push(*t);
                        true
                    }
                    PromiseState::Rejected(_) => true,
                    // Someone may wait for it.
                    PromiseState::Pending => false,
                }
            }
            FormulaKind::Invitation(i) => {
                e.push(i.host);
                e.push(i.dir);
                false
            }
            FormulaKind::Accepting(a) => {
                e.push(a.host);
                // (given up: kept only while a name holds it)
                f.cancelled.is_some()
            }
            FormulaKind::Llm(l) => {
                e.push(l.host);
                false
            }
        };
        if !collectable {
            g.roots.push(id);
        }
        let kind = match f.kind {
            FormulaKind::Value(v) if v.inline.is_some() => Shape::InlineValue,
            FormulaKind::Value(_) => Shape::Value,
            FormulaKind::Directory => Shape::Directory,
            _ => Shape::Other,
        };
        g.formulas.insert(id, Info { collectable, kind });
        g.edges.entry(id).or_default().extend(e);
    }
    // Everything else, subspace by subspace.
    let mut begin = Vec::new();
    let end = vec![SYSTEM_KEY_PREFIX];
    loop {
        let rows = snap
            .range(&RangeOption {
                begin: begin.clone(),
                end: end.clone(),
                limit: PAGE,
                reverse: false,
            })
            .await?;
        let Some((last, _)) = rows.last() else { break };
        let full = rows.len() == PAGE;
        let mut next = key_after(last);
        for (k, v) in &rows {
            let first = first_tag(k);
            match first {
                // Decoded above, or holding no references (value chunks,
                // reverse name index, exactly-once records, inbox marks
                // and hints,
                // locators by target, guest components, provider keys,
                // cancel events).
                b"f" | b"v" | b"r" | b"d" | b"mark" | b"mhi" | b"locf" | b"gc" | b"llmk"
                | b"cnl" => {
                    next = prefix_end(
                        &TupleKey::new()
                            .str(&String::from_utf8_lossy(first))
                            .into_vec(),
                    );
                    break;
                }
                b"n" => {
                    let dir = id_in_key(k, 1)?;
                    let target = crate::records::decode_name_entry(v)?;
                    g.edges.entry(dir).or_default().push(target);
                }
                b"m" => {
                    let agent = id_in_key(k, 1)?;
                    let m = MessageRec::decode(v)?;
                    let e = g.edges.entry(agent).or_default();
                    e.push(m.from);
                    e.push(m.to);
                    match m.body {
                        BodyRec::Package { ids, .. } => e.extend(ids),
                        BodyRec::Request { promise, .. } => e.push(promise),
                    }
                }
                b"loc" => {
                    let l = LocatorRec::decode(v)?;
                    g.roots.push(l.target);
                    g.roots.extend(l.peer);
                    g.roots.extend(l.accepted.map(|a| a.host));
                }
                b"fref" => {
                    g.stamps.insert(id_in_key(k, 1)?, v.to_vec());
                }
                // An eval result keeps what it was computed from.
                b"evd" => {
                    let result = id_in_key(k, 1)?;
                    g.with_deps.insert(result);
                    g.edges
                        .entry(result)
                        .or_default()
                        .extend(keys::decode_eval_deps(v));
                }
                b"gcx" => g.condemned.push(id_in_key(k, 1)?),
                b"gcz" => g.swept.push(id_in_key(k, 1)?),
                b"meta" => {}
                // Placements, outbox items, guest bodies, manifests and
                // journals, LLM records, cluster records, anything newer:
                // any formula id in them is a root.
                _ => {
                    ids_in_key(k, &g.formulas, &mut g.roots);
                    ids_in(k, &g.formulas, &mut g.roots);
                    ids_in(v, &g.formulas, &mut g.roots);
                }
            }
        }
        if !full && next == key_after(last) {
            break;
        }
        begin = next;
        tokio::task::yield_now().await;
    }
    Ok(g)
}

/// The formulas reachable from `from` along `edges`, limited to `within` if
/// given. Yields to other tasks every [`WALK_SLICE`] formulas.
pub(super) async fn reach(
    from: impl IntoIterator<Item = FormulaId>,
    edges: &HashMap<FormulaId, Vec<FormulaId>>,
    within: Option<&HashSet<FormulaId>>,
) -> HashSet<FormulaId> {
    let mut seen = HashSet::new();
    let mut queue: VecDeque<FormulaId> = VecDeque::new();
    for r in from {
        if within.is_none_or(|w| w.contains(&r)) && seen.insert(r) {
            queue.push_back(r);
        }
    }
    let mut visited = 0usize;
    while let Some(id) = queue.pop_front() {
        for t in edges.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
            if within.is_none_or(|w| w.contains(t)) && seen.insert(*t) {
                queue.push_back(*t);
            }
        }
        visited += 1;
        if visited.is_multiple_of(WALK_SLICE) {
            tokio::task::yield_now().await;
        }
    }
    seen
}
