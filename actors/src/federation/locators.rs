//! Locators: sturdy references to this node's formulas, issued by swiss
//! number (only its hash is stored), and how references cross between
//! clusters in either direction.

use capstan_cluster::Transaction;
use capstan_proto::FormulaId;

use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::keys::swiss_hash;
use crate::model;
use crate::node::Runtime;
use crate::records::{Formula, FormulaKind, LocatorRec, RemoteRec};

/// Issues a locator for `target` inside a transaction; returns its swiss.
pub(crate) fn issue_locator(
    tx: &mut Transaction,
    target: &FormulaId,
    peer: Option<FormulaId>,
) -> Result<[u8; 32], Error> {
    let mut swiss = [0u8; 32];
    capstan_proto::id::fill_random(&mut swiss)
        .map_err(|e| Error::Unavailable(format!("no randomness for a swiss number: {e}")))?;
    record_locator(tx, &swiss, target, peer)?;
    Ok(swiss)
}

/// Issues the locator that answers request `promise`, for its recipient on
/// another cluster (the only locator through which it can be settled).
pub(super) fn issue_resolver(tx: &mut Transaction, promise: &FormulaId) -> Result<[u8; 32], Error> {
    let mut swiss = [0u8; 32];
    capstan_proto::id::fill_random(&mut swiss)
        .map_err(|e| Error::Unavailable(format!("no randomness for a swiss number: {e}")))?;
    put_locator(
        tx,
        &swiss,
        LocatorRec {
            target: *promise,
            created_ms: now_ms(),
            peer: None,
            resolver: true,
            accepted: None,
        },
    )?;
    Ok(swiss)
}

/// Records `swiss` (by its hash only) as a locator of `target`.
pub(crate) fn record_locator(
    tx: &mut Transaction,
    swiss: &[u8; 32],
    target: &FormulaId,
    peer: Option<FormulaId>,
) -> Result<(), Error> {
    put_locator(
        tx,
        swiss,
        LocatorRec {
            target: *target,
            created_ms: now_ms(),
            peer,
            resolver: false,
            accepted: None,
        },
    )
}

fn put_locator(tx: &mut Transaction, swiss: &[u8; 32], rec: LocatorRec) -> Result<(), Error> {
    let hash = swiss_hash(swiss);
    tx.set(&keys::locator(&hash), &rec.encode())?;
    tx.set(&keys::locator_of(&rec.target, &hash), &[])?;
    // The write barrier of garbage collection, blind (this path does not
    // read): a new stamp, and the target rescued should a pass have
    // condemned it (the pass then stops; see `crate::gc`).
    let stamp = swiss_hash(&hash);
    tx.set(&keys::formula_ref(&rec.target), &stamp[..8])?;
    tx.clear(&keys::condemned(&rec.target));
    tx.set(&keys::gc_rescued(), &stamp[..8])?;
    Ok(())
}

/// How a formula travels in a message to another cluster: a remote formula
/// as the reference it holds, anything else as a new locator of this node.
pub(crate) async fn wire_ref(tx: &mut Transaction, id: &FormulaId) -> Result<RemoteRec, Error> {
    let f = model::must_formula(tx, id).await?;
    match f.kind {
        FormulaKind::Remote(r) => Ok(r),
        _ => Ok(RemoteRec::own(issue_locator(tx, id, None)?)),
    }
}

/// The formula a reference from another cluster becomes here: the local
/// formula when it designates this cluster, else a new remote formula.
pub(super) async fn adopt_ref(
    tx: &mut Transaction,
    r: &RemoteRec,
    own: &[u8; 32],
) -> Result<FormulaId, Error> {
    if r.cluster == *own {
        // (as a call through the locator is checked: an invitation that was
        // accepted designates what its redeemer was given, which a
        // reference passed in a message must not reach)
        return match tx.get(&keys::locator(&swiss_hash(&r.swiss))).await? {
            Some(b) => match LocatorRec::decode(&b)? {
                rec if rec.accepted.is_none() => Ok(rec.target),
                _ => Err(Error::Invalid(
                    "the message carries a reference to this node that is revoked (an invitation accepted already)".into(),
                )),
            },
            None => Err(Error::Invalid(
                "the message carries a reference to this node that is unknown or revoked".into(),
            )),
        };
    }
    let id = FormulaId::random();
    model::put_formula(
        tx,
        &id,
        &Formula {
            created_ms: now_ms(),
            cancelled: None,
            kind: FormulaKind::Remote(r.clone()),
        },
    )?;
    Ok(id)
}

/// The hashes in index keys `("locf", target, hash)`.
pub(super) fn index_hash(k: &[u8]) -> Result<[u8; 32], Error> {
    let mut r = capstan_cluster::tuple::TupleReader::new(k);
    let hash = (|| {
        r.str()?;
        r.bytes()?;
        r.bytes()
    })()
    .map_err(|e| Error::Corrupt(format!("locator index key: {e}")))?;
    hash.as_slice()
        .try_into()
        .map_err(|_| Error::Corrupt("locator index key".into()))
}

impl Runtime {
    /// A locator record by the hash of its swiss number.
    pub async fn locator_record(&self, hash: [u8; 32]) -> Result<Option<LocatorRec>, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    match tx.get(&keys::locator(&hash)).await? {
                        Some(b) => Ok(Some(LocatorRec::decode(&b)?)),
                        None => Ok(None),
                    }
                })
            })
            .await
    }
}
