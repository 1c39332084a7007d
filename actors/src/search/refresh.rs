//! Keeping an index up to date (see the module docs of [`super`]): the
//! first listing of the tree, following the directories' change logs,
//! closing epochs, indexing fresh values, mail texts and vectors.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::*;
use crate::index::{Applied, State, Track};

/// A value under the tree that the index lacks (or has with another id).
pub(super) struct Fresh {
    pub(super) name: String,
    pub(super) id: FormulaId,
}

/// What a full listing found.
pub(super) struct Listing {
    pub(super) version: capstan_cluster::Version,
    pub(super) listed: Vec<String>,
    pub(super) seen_known: usize,
    pub(super) fresh: Vec<Fresh>,
    pub(super) new_dirs: HashSet<FormulaId>,
    pub(super) new_skipped: HashSet<FormulaId>,
    pub(super) cut: bool,
    /// The directories walked, with their names and change epochs (`None`:
    /// not watched yet).
    pub(super) tracks: HashMap<FormulaId, (Vec<String>, Option<u64>)>,
}

/// Why the change logs cannot bring the index up to date.
pub(super) struct Relist(&'static str);

/// Brings `st` up to date with the store (bounded work; see module docs).
pub(super) async fn refresh(
    h: &AgentHandle,
    spec: &SearchSpec,
    st: &mut State,
) -> Result<(), Error> {
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
pub(super) async fn list_all(
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
pub(super) async fn watch(h: &AgentHandle, dirs: Vec<FormulaId>) -> Result<(), Error> {
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
pub(super) async fn close_epochs(h: &AgentHandle, bump: Vec<FormulaId>) -> Result<(), Error> {
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
pub(super) async fn list_tree(
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
pub(super) struct Followed {
    pub(super) version: capstan_cluster::Version,
    /// Per directory: its epoch in the snapshot, and the entries of that
    /// epoch read (the ones of older epochs are closed: never read again).
    pub(super) epochs: Vec<(FormulaId, u64, Applied)>,
    pub(super) fresh: Vec<Fresh>,
    pub(super) gone: Vec<String>,
    pub(super) skipped: Vec<FormulaId>,
}

/// Brings the index up to date from the change logs of the directories it
/// follows: reads only the names changed since the last refresh. `Ok(None)`:
/// nothing changed; `Err(Relist)`: the logs do not say enough (a directory
/// came, went or was trimmed past): list the tree.
pub(super) async fn follow(
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
pub(super) async fn index_fresh(
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
                                    let b = crate::model::value_bytes(tx, id, &v).await?;
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
pub(super) async fn finish(
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
pub(super) fn refused(why: String) -> Error {
    Error::Invalid(format!(
        "{why}; this search capability needs embeddings for its vector search (a capability made without --embed searches full text only)"
    ))
}

pub(super) fn cap_text(mut t: String) -> (String, bool) {
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
