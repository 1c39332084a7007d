//! Steps 3 and 4 of a pass, and what follows: sweep transactions, the
//! clearing of what a sweep left, marks cleared, exactly-once answers
//! expired.

use super::*;

/// What the sweep of one condemned formula clears besides its record,
/// stamp and mark.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub(super) kind: Shape,
    /// An eval result with recorded dependencies.
    pub(super) deps: bool,
    /// The length of its reference stamp as the mark read it, if it has
    /// one: the sweep clears the stamp without reading it (a stamp that
    /// changed since means a writer rescued the formula, which the sweep
    /// sees in the rescue key it reads).
    pub(super) stamp: Option<usize>,
}

/// The key families of formula `id` that the sweep clears, by what the mark
/// knows of it: its reverse names, locators and cancel event always; a value's chunks (none
/// for a value kept in its record), a
/// directory's names and change log, an eval result's dependencies. (A
/// value gets no names, and nothing gets chunks or dependencies, after it
/// is written; only a directory can gain keys after the mark, from a
/// writer holding its id: its families are always read.)
pub(super) fn families(id: &FormulaId, plan: Option<Plan>) -> Vec<Vec<u8>> {
    let mut f = vec![
        TupleKey::new().str("r").bytes(id.as_bytes()).into_vec(),
        keys::locators_of(id),
        keys::cancel_event(id),
    ];
    let Some(plan) = plan else {
        // Unknown to the mark (a pass that died left it): everything.
        f.push(keys::value(id));
        f.push(keys::names_of_dir(id));
        f.push(keys::dir_watch(id));
        f.push(keys::eval_deps(id));
        return f;
    };
    match plan.kind {
        Shape::Value => f.push(keys::value(id)),
        Shape::Directory => {
            f.push(keys::names_of_dir(id));
            f.push(keys::dir_watch(id));
        }
        Shape::InlineValue | Shape::Other => {}
    }
    if plan.deps {
        f.push(keys::eval_deps(id));
    }
    f
}

/// Candidates with the reference stamps the mark read.
pub(super) type StampBatch = Vec<(FormulaId, Option<Vec<u8>>)>;

/// What one sweep transaction did.
#[derive(Debug, Default)]
pub(super) struct Swept {
    /// Formulas of the offered range it took (a prefix).
    pub(super) took: usize,
    pub(super) formulas: u64,
    pub(super) values: u64,
    pub(super) keys: u64,
    pub(super) bytes: u64,
    /// Deleted, with a family too large for this transaction: cleared
    /// after it ([`clear_swept`]).
    pub(super) left: Vec<FormulaId>,
}

/// One sweep transaction over `condemned[range]` (a prefix of it, as many
/// as fit: see the module docs); `None` if a writer rescued a condemned
/// formula since the mark (nothing is deleted then).
pub(super) async fn sweep_some(
    db: capstan_cluster::Db,
    condemned: Arc<Vec<FormulaId>>,
    range: std::ops::Range<usize>,
    plans: Arc<HashMap<FormulaId, Plan>>,
    rescued: Arc<Option<Vec<u8>>>,
    limit: usize,
) -> Result<Option<Swept>, Error> {
    let reads_limit = limit.saturating_sub(1);
    let t0 = Instant::now();
    let r = db
        .transact(move |tx| {
            let (condemned, range, plans, rescued) = (
                condemned.clone(),
                range.clone(),
                plans.clone(),
                rescued.clone(),
            );
            Box::pin(async move {
                if tx.get(&keys::gc_rescued()).await? != *rescued {
                    return Ok::<_, Error>(None);
                }
                let batch = &condemned[range];
                let mut ahead = Vec::new();
                for id in batch {
                    ahead.push(keys::condemned(id));
                    ahead.push(keys::formula(id));
                }
                tx.prefetch(&ahead).await?;
                let mut sw = Swept::default();
                let mut reads = 1usize;
                for id in batch {
                    if sw.took > 0
                        && (sw.keys as usize >= SWEEP_KEYS
                            || tx.mutation_count() + SWEEP_WRITES_PER_FORMULA > limit
                            || reads + SWEEP_READS_PER_FORMULA > reads_limit)
                    {
                        break;
                    }
                    sw.took += 1;
                    reads += SWEEP_READS_PER_FORMULA;
                    let ck = keys::condemned(id);
                    if tx.get(&ck).await?.is_none() {
                        continue;
                    }
                    tx.clear(&ck);
                    sw.keys += 1;
                    sw.bytes += ck.len() as u64;
                    let fk = keys::formula(id);
                    let Some(f) = tx.get(&fk).await? else {
                        continue;
                    };
                    let plan = plans.get(id).copied();
                    let rk = keys::formula_ref(id);
                    tx.clear(&rk);
                    if let Some(n) = plan.and_then(|p| p.stamp) {
                        sw.keys += 1;
                        sw.bytes += (rk.len() + n) as u64;
                    }
                    tx.clear(&fk);
                    sw.formulas += 1;
                    sw.keys += 1;
                    sw.bytes += (fk.len() + f.len()) as u64;
                    if plan.is_some_and(|p| matches!(p.kind, Shape::Value | Shape::InlineValue)) {
                        sw.values += 1;
                    }
                    let mut big = false;
                    for prefix in families(id, plan) {
                        let rows = tx
                            .snapshot_range(&RangeOption {
                                begin: prefix.clone(),
                                end: prefix_end(&prefix),
                                limit: SWEEP_KEYS + 1,
                                reverse: false,
                            })
                            .await?;
                        if rows.len() > SWEEP_KEYS {
                            // Too many for one transaction: after it.
                            big = true;
                        } else if !rows.is_empty() {
                            sw.keys += rows.len() as u64;
                            sw.bytes += size_of(&rows);
                            tx.clear_prefix(&prefix);
                        }
                    }
                    if big {
                        tx.set(&keys::swept(id), &[])?;
                        sw.left.push(*id);
                    }
                }
                Ok(Some(sw))
            })
        })
        .await?;
    if let Some(sw) = &r {
        tracing::debug!(
            took = sw.took,
            keys = sw.keys,
            us = t0.elapsed().as_micros() as u64,
            "gc: sweep transaction"
        );
    }
    Ok(r)
}

/// Clears the keys left of formula `id`, deleted by a sweep that found
/// too many for its transaction (its `("gcz", id)` mark says so), a page
/// per transaction, then the mark. Nobody writes them any more: a writer
/// that holds the id finds no formula and fails. Returns the keys and
/// bytes cleared.
pub(super) async fn clear_swept(
    db: &capstan_cluster::Db,
    id: FormulaId,
    limit: usize,
) -> Result<(u64, u64), Error> {
    let page = SWEEP_KEYS.min(limit.saturating_sub(1)).max(1);
    let (mut nkeys, mut bytes) = (0u64, 0u64);
    for prefix in families(&id, None) {
        loop {
            let prefix = Arc::new(prefix.clone());
            let (n, b) = db
                .transact(move |tx| {
                    let prefix = prefix.clone();
                    Box::pin(async move {
                        let rows = tx
                            .snapshot_range(&RangeOption {
                                begin: prefix.to_vec(),
                                end: prefix_end(&prefix),
                                limit: page,
                                reverse: false,
                            })
                            .await?;
                        if let Some((last, _)) = rows.last() {
                            tx.clear_range(&prefix, &key_after(last));
                        }
                        Ok::<_, Error>((rows.len() as u64, size_of(&rows)))
                    })
                })
                .await?;
            nkeys += n;
            bytes += b;
            // Between transactions, the node's requests run.
            tokio::task::yield_now().await;
            if n < page as u64 {
                break;
            }
        }
    }
    let k = keys::swept(&id);
    db.transact(move |tx| {
        let k = k.clone();
        Box::pin(async move {
            tx.clear(&k);
            Ok::<_, Error>(())
        })
    })
    .await?;
    tracing::debug!(id = %id.short(), keys = nkeys, "gc: cleared what a sweep left");
    Ok((nkeys + 1, bytes))
}

/// Clears the condemned marks of `ids` (the formulas are kept).
pub(super) async fn clear_marks(db: &capstan_cluster::Db, ids: &[FormulaId]) -> Result<(), Error> {
    for batch in ids.chunks(ANSWER_BATCH.min(write_limit(db))) {
        let batch = Arc::new(batch.to_vec());
        db.transact(move |tx| {
            let batch = batch.clone();
            Box::pin(async move {
                for id in batch.iter() {
                    tx.clear(&keys::condemned(id));
                }
                Ok::<_, Error>(())
            })
        })
        .await?;
    }
    Ok(())
}

/// Drops exactly-once records older than the retention.
pub(super) async fn expire_answers(
    db: &capstan_cluster::Db,
    opts: &GcOptions,
    progress: &Progress,
    report: &mut GcReport,
) -> Result<(), Error> {
    let now = crate::clock::now_ms();
    let cutoff = now.saturating_sub(opts.keep_answers_ms);
    for prefix in [keys::dedup_all(), TupleKey::new().str("in").into_vec()] {
        let end = prefix_end(&prefix);
        let mut begin = prefix.clone();
        loop {
            progress(GcPhase::Answers, report.answers, 0);
            let rows = db
                .store()
                .snapshot()
                .await?
                .range(&RangeOption {
                    begin: begin.clone(),
                    end: end.clone(),
                    limit: PAGE,
                    reverse: false,
                })
                .await?;
            let Some((last, _)) = rows.last() else { break };
            let full = rows.len() == PAGE;
            begin = key_after(last);
            let mut old = Vec::new();
            for (k, v) in rows {
                let at = if first_str(&k) == "d" {
                    DedupAnswer::decode_at_ms(&v)?
                } else {
                    // (8 bytes of milliseconds, a refused item's a byte more)
                    v.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(u64::MAX, u64::from_be_bytes)
                };
                if at < cutoff {
                    old.push((k, v));
                }
            }
            for batch in old.chunks(ANSWER_BATCH.min(write_limit(db))) {
                let ks: Arc<Vec<Vec<u8>>> =
                    Arc::new(batch.iter().map(|(k, _)| k.clone()).collect());
                db.transact(move |tx| {
                    let ks = ks.clone();
                    Box::pin(async move {
                        for k in ks.iter() {
                            tx.clear(k);
                        }
                        Ok::<_, Error>(())
                    })
                })
                .await?;
                report.answers += batch.len() as u64;
                report.keys += batch.len() as u64;
                report.bytes += size_of(batch);
                tokio::task::yield_now().await;
            }
            tokio::task::yield_now().await;
            if !full {
                break;
            }
        }
    }
    Ok(())
}
