//! The outbox: what this node owes to other clusters, queued per peer
//! cluster in the sending transaction, listed for the network layer, and
//! removed once delivered or bounced back to its sender.

use std::sync::Arc;

use capstan_cluster::Transaction;
use capstan_proto::RequestId;

use super::envelope::{Envelope, EnvelopeBody, OutOp, OutboxItem};
use super::locators::{issue_resolver, wire_ref};
use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::model;
use crate::node::Runtime;
use crate::records::{BodyRec, MessageRec, RemoteRec};

/// Most outbox items of one peer cluster handed to the network layer at once.
pub const OUTBOX_BATCH: usize = 64;
/// Most peer clusters with mail listed at once ([`Runtime::outbox_peers`]).
pub const OUTBOX_PEERS: usize = 1024;

/// Microseconds since the epoch (outbox order).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The envelope of a message to another cluster, its references made
/// into locators (inside the sending transaction).
pub(crate) async fn envelope_of(tx: &mut Transaction, m: &MessageRec) -> Result<Envelope, Error> {
    let body = match &m.body {
        BodyRec::Package {
            strings,
            names,
            ids,
        } => {
            let mut refs = Vec::with_capacity(ids.len());
            for id in ids {
                refs.push(wire_ref(tx, id).await?);
            }
            EnvelopeBody::Package {
                strings: strings.clone(),
                names: names.clone(),
                refs,
            }
        }
        BodyRec::Request {
            description,
            promise,
        } => EnvelopeBody::Request {
            description: description.clone(),
            resolver: RemoteRec::own(issue_resolver(tx, promise)?),
        },
    };
    Ok(Envelope {
        message_id: m.message_id,
        reply_to: m.reply_to,
        date_ms: m.date_ms,
        body,
    })
}

/// Queues an item in the outbox (inside the caller's transaction).
pub(crate) fn enqueue(tx: &mut Transaction, item: &OutboxItem) -> Result<(), Error> {
    tx.set(&item.key(), &item.encode())?;
    Ok(())
}

impl Runtime {
    /// The peer clusters that have mail in the outbox: at most `limit`, in
    /// id order starting after `after` and wrapping around (so that a
    /// caller going on from the last one it got sees them all in turn).
    /// Each queue costs one key read, however long it is.
    pub async fn outbox_peers(
        &self,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> Result<Vec<[u8; 32]>, Error> {
        self.db()
            .read(move |tx| {
                Box::pin(async move {
                    let all = keys::outbox_all();
                    let end = capstan_cluster::tuple::prefix_end(&all);
                    let start = match &after {
                        Some(c) => capstan_cluster::tuple::prefix_end(&keys::outbox_of(c)),
                        None => all.clone(),
                    };
                    let mut out: Vec<[u8; 32]> = Vec::new();
                    // From `start` to the end, then from the beginning up to `start`.
                    for (mut cursor, stop) in [(start.clone(), end), (all, start)] {
                        while out.len() < limit && cursor < stop {
                            let rows = tx
                                .get_range(
                                    capstan_cluster::RangeOption::new(cursor.clone(), stop.clone())
                                        .with_limit(1),
                                )
                                .await?;
                            let Some((k, _)) = rows.into_iter().next() else {
                                break;
                            };
                            let mut r = capstan_cluster::tuple::TupleReader::new(&k);
                            let c = (|| {
                                r.str()?;
                                r.bytes()
                            })()
                            .map_err(|e| Error::Corrupt(format!("outbox key: {e}")))?;
                            let c: [u8; 32] = c
                                .as_slice()
                                .try_into()
                                .map_err(|_| Error::Corrupt("outbox key: cluster id".into()))?;
                            if !out.contains(&c) {
                                out.push(c);
                            }
                            cursor = capstan_cluster::tuple::prefix_end(&keys::outbox_of(&c));
                        }
                    }
                    Ok(out)
                })
            })
            .await
    }

    /// The oldest items of the queue of peer cluster `cluster` (at most
    /// `limit`). A corrupt item, which could never be delivered, is
    /// dropped (and logged) so that it does not block the ones behind it.
    pub async fn outbox_for(
        &self,
        cluster: [u8; 32],
        limit: usize,
    ) -> Result<Vec<OutboxItem>, Error> {
        let (items, corrupt) = self
            .db()
            .read(move |tx| {
                Box::pin(async move {
                    let rows = tx
                        .get_prefix(&keys::outbox_of(&cluster), limit, false)
                        .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    let mut corrupt = Vec::new();
                    for (k, v) in rows {
                        match OutboxItem::decode(&v) {
                            Ok(i) if i.key() == k => out.push(i),
                            Ok(_) => {
                                tracing::error!(key = %hex::encode(&k), "dropping an outbox item stored under another key than its own");
                                corrupt.push(k);
                            }
                            Err(e) => {
                                tracing::error!(key = %hex::encode(&k), "dropping a corrupt outbox item: {e}");
                                corrupt.push(k);
                            }
                        }
                    }
                    Ok::<_, Error>((out, corrupt))
                })
            })
            .await?;
        if !corrupt.is_empty() {
            let corrupt = Arc::new(corrupt);
            self.db()
                .transact(move |tx| {
                    let corrupt = corrupt.clone();
                    Box::pin(async move {
                        for k in corrupt.iter() {
                            tx.clear(k);
                        }
                        Ok::<_, Error>(())
                    })
                })
                .await?;
        }
        Ok(items)
    }

    /// Moves the items of the single outbox queue of earlier versions into
    /// the queues per peer cluster (at start; nothing to do afterwards).
    /// Returns how many it moved.
    pub async fn migrate_outbox(&self) -> Result<usize, Error> {
        let mut moved = 0;
        loop {
            let n = self
                .db()
                .transact(|tx| {
                    Box::pin(async move {
                        let rows = tx
                            .get_prefix(&keys::outbox_legacy(), OUTBOX_BATCH, false)
                            .await?;
                        for (k, v) in &rows {
                            tx.clear(k);
                            match OutboxItem::decode(v) {
                                Ok(i) => tx.set(&i.key(), v)?,
                                Err(e) => {
                                    tracing::error!(key = %hex::encode(k), "dropping a corrupt outbox item: {e}")
                                }
                            }
                        }
                        Ok::<_, Error>(rows.len())
                    })
                })
                .await?;
            moved += n;
            if n < OUTBOX_BATCH {
                return Ok(moved);
            }
        }
    }

    /// Removes a delivered item.
    pub async fn outbox_done(&self, item: &OutboxItem) -> Result<(), Error> {
        let key = item.key();
        self.db()
            .transact(move |tx| {
                let key = key.clone();
                Box::pin(async move {
                    tx.clear(&key);
                    Ok::<_, Error>(())
                })
            })
            .await
    }

    /// Removes an item the far side refused for good, and tells its sender
    /// why with a message in its inbox (from the peer it was meant for).
    pub async fn outbox_bounce(&self, item: &OutboxItem, reason: &str) -> Result<(), Error> {
        let key = item.key();
        let what = match &item.op {
            OutOp::Deliver(e) => match e.body {
                EnvelopeBody::Request { .. } => "request",
                EnvelopeBody::Package { .. } => "message",
            },
            OutOp::Settle(_) => "answer",
        };
        let text = format!("[undeliverable] your {what} could not be delivered: {reason}");
        // A request that cannot be delivered will never be answered: its
        // promise (found through the resolver locator the request carries)
        // is rejected with the reason, as a cancel would, so whoever waits
        // on it learns now instead of never.
        let promise_locator = match &item.op {
            OutOp::Deliver(Envelope {
                body: EnvelopeBody::Request { resolver, .. },
                ..
            }) if resolver.is_own() => Some(keys::locator(&keys::swiss_hash(&resolver.swiss))),
            _ => None,
        };
        // Kept within a rejection reason's bound (rules::mail): a char is
        // at most 4 bytes.
        let why: String = format!("undeliverable: {reason}")
            .chars()
            .take(crate::types::MAX_MESSAGE_TEXT / 4)
            .collect();
        let (sender, peer) = (item.sender, item.peer);
        let agent = self.handle_for(sender).await?;
        let m = agent
            .with_fresh_number(sender, |number| {
                let (key, text) = (key.clone(), text.clone());
                let (promise_locator, why) = (promise_locator.clone(), why.clone());
                self.db().transact(move |tx| {
                    let (key, text) = (key.clone(), text.clone());
                    let (promise_locator, why) = (promise_locator.clone(), why.clone());
                    Box::pin(async move {
                        if tx.get(&key).await?.is_none() {
                            return Ok::<_, Error>(None);
                        }
                        tx.clear(&key);
                        let mut settled = None;
                        if let Some(lk) = &promise_locator
                            && let Some(b) = tx.get(lk).await?
                        {
                            let promise = crate::records::LocatorRec::decode(&b)?.target;
                            let mut f = model::must_formula(tx, &promise).await?;
                            if let crate::records::FormulaKind::Promise(p) = &mut f.kind
                                && let Ok(state) = crate::rules::mail::settle(&p.state, Err(why))
                            {
                                p.state = state.clone();
                                model::put_formula(tx, &promise, &f)?;
                                settled = Some((promise, state));
                            }
                        }
                        let m = MessageRec {
                            number,
                            message_id: RequestId::random(),
                            reply_to: None,
                            from: peer,
                            to: sender,
                            date_ms: now_ms(),
                            body: BodyRec::Package {
                                strings: vec![text],
                                names: vec![],
                                ids: vec![],
                            },
                        };
                        model::put_message(tx, &sender, &m).await?;
                        Ok(Some((m, settled)))
                    })
                })
            })
            .await?;
        if let Some((m, settled)) = m {
            agent.notify_delivered(sender, m);
            if let Some((promise, state)) = settled {
                crate::node::notify_settled(self.inner(), promise, state);
            }
        }
        Ok(())
    }

    /// Resolves once new outbox items may be waiting.
    pub async fn outbox_changed(&self) {
        self.inner().outbox.notified().await
    }
}
