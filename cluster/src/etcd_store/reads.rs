//! Read batching for the etcd backend: concurrent single-key reads at
//! snapshot revisions share one etcd request.
//!
//! Every transaction of a busy node reads a few single keys (a name, a
//! formula, an inbox slot). Sent one request each, they cost etcd a gRPC
//! round each, and on a machine where etcd and the nodes share the cores
//! that per-request work, not the reads, is what limits throughput. So a
//! reader task takes the reads waiting in its queue and sends them as one
//! read-only Txn of Range operations, each at its own revision and marked
//! serializable: etcd serves such a Txn from the member's own state, without
//! a round of the leader and without the raft log (its compare list is empty
//! and it writes nothing). A read arriving while the reader is idle goes out
//! alone at once, so batching adds no latency at low load.
//!
//! A member that has not applied a requested revision refuses the whole Txn
//! ("future revision"); the retry on the next endpoint reads linearizably,
//! as single reads do ([`super::Inner::page`]).

use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Inner, bump, to_store_error};
use crate::etcd_rpc::{KeyValue, RangeRequest, RequestOp, Response, TxnRequest};
use crate::store::{StoreError, Version, key_after};

/// Reads sent at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Reads waiting for the reader (bounded: callers wait for room).
pub const QUEUE: usize = 8192;

struct Get {
    /// The etcd key (prefix included).
    key: Vec<u8>,
    revision: Version,
    reply: oneshot::Sender<Result<Option<KeyValue>, StoreError>>,
}

/// The reader's end of the queue.
pub(super) struct Reader {
    tx: mpsc::Sender<Get>,
}

impl Reader {
    /// Starts the reader task of `inner` (it ends when the store is dropped).
    pub fn start(inner: Weak<Inner>) -> Reader {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(inner, rx));
        Reader { tx }
    }

    /// The pair stored under the etcd key `key` at `revision`, if any.
    pub async fn get(
        &self,
        key: Vec<u8>,
        revision: Version,
    ) -> Result<Option<KeyValue>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Get {
                key,
                revision,
                reply,
            })
            .await
            .map_err(|_| StoreError::Io("the etcd store is closed".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Io("the etcd reader stopped".into())))
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Get>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(store) = inner.upgrade() else { return };
        // Etcd takes at most max-txn-ops operations in one Txn.
        let max = store.max_txn_ops;
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(g) => batch.push(g),
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            send(&store, batch).await;
            drop(permit);
        });
    }
}

async fn send(inner: &Inner, batch: Vec<Get>) {
    let started = Instant::now();
    let n = batch.len() as u64;
    if batch.len() == 1 {
        if let Some(g) = batch.into_iter().next() {
            let end = key_after(&g.key);
            let r = inner
                .page(&g.key, &end, g.revision, 1, false, false)
                .await
                .map(|resp| resp.kvs.into_iter().next());
            let _ = g.reply.send(r);
        }
        return;
    }
    let ops: Vec<RequestOp> = batch
        .iter()
        .map(|g| RequestOp {
            request: Some(crate::etcd_rpc::Request::Range(RangeRequest {
                key: g.key.clone(),
                range_end: key_after(&g.key),
                revision: i64::try_from(g.revision).unwrap_or(i64::MAX),
                limit: 1,
                ..Default::default()
            })),
        })
        .collect();
    let mut attempt = 0;
    let r = inner
        .endpoints
        .call("batched read", |kv| {
            let serializable = attempt == 0;
            attempt += 1;
            let mut success = ops.clone();
            for op in &mut success {
                if let Some(crate::etcd_rpc::Request::Range(r)) = &mut op.request {
                    r.serializable = serializable;
                }
            }
            let txn = TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            };
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(to_store_error);
    bump(&inner.counters.reads, n);
    bump(&inner.counters.read_rpcs, 1);
    bump(
        &inner.counters.read_us,
        started.elapsed().as_micros() as u64 * n,
    );
    match r {
        Ok(resp) => {
            let mut answers = resp.responses.into_iter();
            for g in batch {
                let answer = match answers.next().and_then(|r| r.response) {
                    Some(Response::Range(r)) => Ok(r.kvs.into_iter().next()),
                    _ => Err(StoreError::Io(
                        "etcd answered a batched read without a result per key".into(),
                    )),
                };
                let _ = g.reply.send(answer);
            }
        }
        // A revision compacted away fails the whole Txn: each read alone
        // then, so that only a read at such a revision fails (a fresh one
        // sharing the Txn was told "conflict", which its caller may not
        // retry).
        Err(StoreError::Conflict) => {
            let answers = futures::future::join_all(batch.iter().map(|g| {
                let end = key_after(&g.key);
                async move {
                    inner
                        .page(&g.key, &end, g.revision, 1, false, false)
                        .await
                        .map(|resp| resp.kvs.into_iter().next())
                }
            }))
            .await;
            for (g, r) in batch.into_iter().zip(answers) {
                let _ = g.reply.send(r);
            }
        }
        Err(e) => {
            for g in batch {
                let _ = g.reply.send(Err(e.clone()));
            }
        }
    }
}
