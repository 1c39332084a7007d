//! Member links in memory: the work a node's runtime hands its links
//! ([`LinkOp`], served by QUIC in `nodes`) is carried here to the target
//! node's runtime directly, through the seed's faults: a reservation call
//! may be dropped (answered "unreachable" after a timeout) or delayed; a
//! wake-up (delivered, settled, interest) may be dropped, delayed or
//! duplicated, and so reordered. A call to a node that is down is never
//! answered (the caller notices the node died from its lease, as over
//! QUIC).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_actors::cluster::LinkOp;
use capstan_actors::{Error, Runtime};
use tokio::sync::mpsc;

use crate::rng::Rng;

/// Fault rates of the links, in percent, and the longest delay.
#[derive(Debug, Clone, Copy)]
pub struct LinkFaults {
    pub drop_pct: u64,
    pub dup_pct: u64,
    pub delay_pct: u64,
    pub max_delay: Duration,
}

/// The live nodes' runtimes by name, as links find them.
#[derive(Default)]
pub struct Directory {
    nodes: Mutex<Vec<(String, Runtime)>>,
}

/// How long a call to a node that is down goes unanswered before the link
/// gives up, as a node's QUIC link does (`nodes`' `RESERVE_TIMEOUT`). It
/// used to be never: the caller then relied on seeing the node's lease
/// lapse, and a call that reached a node's name while the node was
/// restarting (its new lease live, its runtime not yet up) waited forever
/// on a live node (seed 246 of 150 steps, once the cluster spread guests).
pub const UNANSWERED_AFTER: Duration = Duration::from_millis(1500);

impl Directory {
    pub fn set(&self, name: &str, rt: Option<Runtime>) {
        let mut n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.retain(|(k, _)| k != name);
        if let Some(rt) = rt {
            n.push((name.to_string(), rt));
        }
    }

    /// The names of the live nodes, in the order they (re)started.
    pub fn names(&self) -> Vec<String> {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.iter().map(|(k, _)| k.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<Runtime> {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.iter().find(|(k, _)| k == name).map(|(_, rt)| rt.clone())
    }
}

/// What happens to one message on a link.
pub(crate) struct Fate {
    pub(crate) copies: usize,
    pub(crate) delay: Duration,
}

pub(crate) fn fate(rng: &Mutex<Rng>, f: &LinkFaults) -> Fate {
    let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
    let copies = if r.percent(f.drop_pct) {
        0
    } else if r.percent(f.dup_pct) {
        2
    } else {
        1
    };
    let delay = if r.percent(f.delay_pct) && !f.max_delay.is_zero() {
        Duration::from_millis(1 + r.below(f.max_delay.as_millis() as u64))
    } else {
        Duration::ZERO
    };
    Fate { copies, delay }
}

/// Serves node `me`'s link work until the node dies (the task is aborted).
pub async fn serve_links(
    me: String,
    mut rx: mpsc::Receiver<LinkOp>,
    dir: Arc<Directory>,
    rng: Arc<Mutex<Rng>>,
    faults: LinkFaults,
) {
    while let Some(op) = rx.recv().await {
        match op {
            LinkOp::Reserve {
                node,
                agent,
                count,
                at_least,
                admit,
                reply,
                ..
            } => {
                let f = fate(&rng, &faults);
                let dir = dir.clone();
                let me = me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(f.delay).await;
                    if f.copies == 0 {
                        // A call timeout.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = reply.send(Err(Error::Unreachable(format!(
                            "sim: the link to {} dropped the call",
                            node.name
                        ))));
                        return;
                    }
                    let Some(rt) = dir.get(&node.name) else {
                        tokio::time::sleep(UNANSWERED_AFTER).await;
                        let _ = reply.send(Err(Error::Unreachable(format!(
                            "sim: node {} did not answer within {} ms",
                            node.name,
                            UNANSWERED_AFTER.as_millis()
                        ))));
                        return;
                    };
                    let r = rt
                        .serve_reserve(agent, u64::from(count), at_least, admit)
                        .await;
                    let r = match r {
                        Ok((first, interested)) => {
                            if let Some(caller) = dir.get(&me) {
                                caller.learn_interest(agent, interested);
                            }
                            Ok(first)
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                });
            }
            LinkOp::Delivered {
                to,
                agent,
                number,
                record,
                ..
            } => {
                for m in to {
                    let f = fate(&rng, &faults);
                    for _ in 0..f.copies {
                        let (dir, record) = (dir.clone(), record.clone());
                        let name = m.name.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(f.delay).await;
                            if let Some(rt) = dir.get(&name) {
                                let _ = rt.wake_delivered_with(agent, number, &record).await;
                            }
                        });
                    }
                }
            }
            LinkOp::Settled { to, promise } => {
                for m in to {
                    let f = fate(&rng, &faults);
                    for _ in 0..f.copies {
                        let dir = dir.clone();
                        let name = m.name.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(f.delay).await;
                            if let Some(rt) = dir.get(&name) {
                                let _ = rt.wake_settled(promise).await;
                            }
                        });
                    }
                }
            }
            LinkOp::Interest {
                node,
                agent,
                gone,
                seq,
            } => {
                // Delayed, dropped and duplicated like any call: a
                // withdrawal may land after a later renewal (a follower
                // that started again meanwhile) and must not cost that
                // follower a message.
                let f = fate(&rng, &faults);
                for _ in 0..f.copies {
                    let (dir, me) = (dir.clone(), me.clone());
                    let name = node.name.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(f.delay).await;
                        if let Some(rt) = dir.get(&name) {
                            rt.note_interest(agent, me, gone, seq);
                        }
                    });
                }
            }
        }
    }
}
