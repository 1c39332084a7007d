//! Federation links: two clusters of the world exchanging mail through
//! their outboxes, as `nodes`' network layer does over QUIC
//! (`nodes/src/net/outbox.rs` delivers, `nodes/src/net/serving.rs`
//! receives), here in memory and with the seed's faults.
//!
//! Every node of either cluster runs a courier loop ([`serve_outbox`]), as
//! every node runs `run_outbox`: it lists the queues of its store's outbox
//! ([`Runtime::outbox_peers`]), delivers each queue's oldest items in order
//! ([`Runtime::outbox_for`]), removes an item once the far side answered
//! ([`Runtime::outbox_done`]), bounces it to its sender when the far side
//! refused it for good ([`Runtime::outbox_bounce`]), and stops the queue at
//! a failure that may pass, to try again after a backoff in virtual time
//! ([`next_backoff`]: doubling up to [`MAX_BACKOFF`] while nothing moves).
//! The nodes of a cluster deliver the same queue concurrently, as they do
//! for real.
//!
//! A delivery ([`Fed::send`]) may be dropped (the caller hears nothing and
//! times out), delayed, duplicated (the copy arrives later: reordered), or
//! applied with its answer lost (the caller times out and retries). The
//! far side is a live node of the other cluster drawn from the seed; it
//! restores the item's locator and calls [`Runtime::receive_deliver`] or
//! [`Runtime::receive_settle`], as `ObjectServer` does; an error the
//! runtime calls transient is a failure that may pass, any other a refusal
//! (as `wire_error` and `with_object` classify them).
//!
//! [`Fed::faulty_dedup`] is a test of the checker: the receiving side
//! hands the runtime a fresh item id for each copy it receives (it drops
//! the sender's), so a redelivered item lands twice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_actors::federation::{OUTBOX_BATCH, OUTBOX_PEERS, now_us};
use capstan_actors::rules::outbox::{EXPIRY, MAX_BACKOFF, Verdict, next_backoff, verdict};
use capstan_actors::{
    Caller, Envelope, EnvelopeBody, Error, OutOp, OutboxItem, RemoteRec, Runtime, Settlement,
};
use capstan_proto::RequestId;

use crate::links::{Directory, LinkFaults, fate};
use crate::rng::Rng;

/// The cluster ids of the two clusters (the near one runs the guests).
pub const NEAR: [u8; 32] = [0xa1; 32];
pub const FAR: [u8; 32] = [0xb2; 32];

/// How long a caller waits for a delivery's answer (`nodes`' `CALL_TIMEOUT`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a delivery failed: for good (bounce) or for now (retry).
#[derive(Debug, Clone)]
pub enum Fail {
    Refused(String),
    Transient(String),
}

fn classify(e: Error) -> Fail {
    if e.is_transient() {
        Fail::Transient(e.to_string())
    } else {
        Fail::Refused(format!("the remote node refused: {e}"))
    }
}

/// What the links between the clusters did (for the report).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FedStats {
    /// Deliveries tried (each copy counts).
    pub calls: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub answers_lost: u64,
    pub refused: u64,
    pub bounced: u64,
    pub delivered: u64,
}

/// The links between the two clusters.
pub struct Fed {
    pub near: Arc<Directory>,
    pub far: Arc<Directory>,
    pub rng: Mutex<Rng>,
    pub faults: LinkFaults,
    /// Percent of applied deliveries whose answer is lost.
    pub answer_loss_pct: u64,
    /// The reintroduced bug: the receiving side does not dedup (see the
    /// module docs).
    pub faulty_dedup: bool,
    pub stats: Mutex<FedStats>,
}

fn stats(fed: &Fed) -> std::sync::MutexGuard<'_, FedStats> {
    fed.stats.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fed {
    fn dir(&self, cluster: &[u8; 32]) -> Option<&Arc<Directory>> {
        match *cluster {
            NEAR => Some(&self.near),
            FAR => Some(&self.far),
            _ => None,
        }
    }

    fn roll(&self, pct: u64) -> bool {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .percent(pct)
    }

    fn pick(&self, n: usize) -> usize {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .below(n as u64) as usize
    }

    /// Delivers `item` from cluster `from` to the cluster it names, through
    /// the link's faults; `Ok` once the far side answered that it applied.
    pub async fn send(self: &Arc<Self>, from: [u8; 32], item: &OutboxItem) -> Result<(), Fail> {
        let f = fate(&self.rng, &self.faults);
        stats(self).calls += 1;
        if f.copies == 0 {
            stats(self).dropped += 1;
            tokio::time::sleep(f.delay + CALL_TIMEOUT).await;
            return Err(Fail::Transient("sim: the link dropped the call".into()));
        }
        if f.copies > 1 {
            // A copy that arrives later (reordered): its answer goes nowhere.
            stats(self).duplicated += 1;
            let extra = Duration::from_millis(
                1 + self.pick(4 * self.faults.max_delay.as_millis().max(1) as usize) as u64,
            );
            let (fed, item) = (self.clone(), item.clone());
            tokio::spawn(async move {
                tokio::time::sleep(f.delay + extra).await;
                let _ = fed.far_side(from, item).await;
            });
        }
        tokio::time::sleep(f.delay).await;
        let call = tokio::spawn(self.clone().far_side(from, item.clone()));
        let r = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Fail::Transient(format!("sim: the far call failed: {e}"))),
            Err(_) => Err(Fail::Transient(
                "sim: no answer within the call timeout".into(),
            )),
        };
        tracing::debug!(item = %item.id, from = from[0], op = matches!(item.op, OutOp::Deliver(_)), "delivery: {r:?}");
        if r.is_ok() && self.roll(self.answer_loss_pct) {
            stats(self).answers_lost += 1;
            tokio::time::sleep(CALL_TIMEOUT).await;
            return Err(Fail::Transient("sim: the answer was lost".into()));
        }
        match &r {
            Ok(()) => stats(self).delivered += 1,
            Err(Fail::Refused(_)) => stats(self).refused += 1,
            Err(Fail::Transient(_)) => {}
        }
        r
    }

    /// Whether the far cluster applied `item` (`Gateway.applied`, asked
    /// before a bounce), on a live node drawn from the seed, through the
    /// link's faults; `None`: it could not say (the call was dropped,
    /// nobody listens, or no answer within [`CALL_TIMEOUT`], as the nodes'
    /// call: the node asked may be killed while it answers, and a killed
    /// node's store calls never return).
    pub async fn applied(self: &Arc<Self>, item: &OutboxItem) -> Option<bool> {
        let f = fate(&self.rng, &self.faults);
        tokio::time::sleep(f.delay).await;
        if f.copies == 0 {
            return None;
        }
        let dir = self.dir(&item.to.cluster)?;
        let names = dir.names();
        if names.is_empty() {
            return None;
        }
        let rt = dir.get(&names[self.pick(names.len())])?;
        let id = item.id;
        // (spawned, as `send`'s call: the far node answers on its own,
        // whether or not the caller still waits)
        let ask = tokio::spawn(async move { rt.applied_items(&[id]).await });
        match tokio::time::timeout(CALL_TIMEOUT, ask).await {
            Ok(Ok(Ok(answer))) => answer.first().copied(),
            _ => None,
        }
    }

    /// The receiving side (`ObjectServer`: restore, check, deliver or
    /// settle) on a live node of the item's cluster drawn from the seed.
    async fn far_side(self: Arc<Self>, from: [u8; 32], item: OutboxItem) -> Result<(), Fail> {
        let own = item.to.cluster;
        let Some(dir) = self.dir(&own) else {
            return Err(Fail::Transient("sim: no such cluster".into()));
        };
        let names = dir.names();
        if names.is_empty() {
            // Nobody listens: the dial times out.
            futures::future::pending::<()>().await;
        }
        let name = &names[self.pick(names.len())];
        let Some(rt) = dir.get(name) else {
            futures::future::pending::<()>().await;
            unreachable!("pending never resolves");
        };
        let hash = capstan_actors::remote::swiss_hash(&item.to.swiss);
        let rec = rt.locator_record(hash).await.map_err(classify)?;
        let Some(rec) = rec else {
            return Err(Fail::Refused(
                "the remote node refused: unknown or revoked locator".into(),
            ));
        };
        if rec.accepted.is_some() {
            return Err(Fail::Refused(
                "the remote node refused: revoked: this invitation was accepted already".into(),
            ));
        }
        let caller = Caller { cluster: from, own };
        match &item.op {
            OutOp::Deliver(env) => {
                let Some(peer) = rec.peer else {
                    return Err(Fail::Refused(
                        "the remote node refused: this capability takes no mail".into(),
                    ));
                };
                let id = if self.faulty_dedup {
                    let b = self.rng.lock().unwrap_or_else(|e| e.into_inner()).bytes16();
                    RequestId(b)
                } else {
                    item.id
                };
                rt.receive_deliver(rec.target, peer, id, fill_env(env, from), caller)
                    .await
                    .map_err(classify)
            }
            OutOp::Settle(s) => {
                let s = match s {
                    Settlement::Resolved(r) => Settlement::Resolved(fill(r, from)),
                    other => other.clone(),
                };
                rt.receive_settle(hash, item.id, s, caller)
                    .await
                    .map(drop)
                    .map_err(classify)
            }
        }
    }
}

/// A reference of the sending cluster completed with its id, as `Net::fill`.
fn fill(r: &RemoteRec, cluster: [u8; 32]) -> RemoteRec {
    if r.is_own() {
        RemoteRec {
            cluster,
            swiss: r.swiss,
            addrs: vec![format!("sim-cluster-{:02x}", cluster[0])],
        }
    } else {
        r.clone()
    }
}

fn fill_env(env: &Envelope, cluster: [u8; 32]) -> Envelope {
    let body = match &env.body {
        EnvelopeBody::Package {
            strings,
            names,
            refs,
        } => EnvelopeBody::Package {
            strings: strings.clone(),
            names: names.clone(),
            refs: refs.iter().map(|r| fill(r, cluster)).collect(),
        },
        EnvelopeBody::Request {
            description,
            resolver,
        } => EnvelopeBody::Request {
            description: description.clone(),
            resolver: fill(resolver, cluster),
        },
    };
    Envelope {
        body,
        ..env.clone()
    }
}

/// Node `rt` of cluster `own` delivers its cluster's outbox until the node
/// dies (the task is aborted): `Net::run_outbox` with one courier at a
/// time, in virtual time.
pub async fn serve_outbox(fed: Arc<Fed>, own: [u8; 32], rt: Runtime) {
    // Per peer cluster: when it may be tried again, the backoff, the last error.
    let mut backoff: BTreeMap<[u8; 32], (tokio::time::Instant, Duration, String)> = BTreeMap::new();
    loop {
        let peers = match rt.outbox_peers(None, OUTBOX_PEERS).await {
            Ok(p) => p,
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        backoff.retain(|c, _| peers.contains(c));
        let mut wake = tokio::time::Instant::now() + MAX_BACKOFF;
        let mut delivered = false;
        for c in peers {
            let now = tokio::time::Instant::now();
            let last = match backoff.get(&c) {
                Some((next, _, _)) if *next > now => {
                    wake = wake.min(*next);
                    continue;
                }
                Some((_, _, e)) => Some(e.clone()),
                None => None,
            };
            let mut settled = 0;
            match deliver_batch(&fed, own, &rt, c, last.as_deref(), &mut settled).await {
                Ok(()) => {
                    backoff.remove(&c);
                    delivered = true;
                }
                Err(why) => {
                    let delay = next_backoff(backoff.get(&c).map(|b| b.1), settled);
                    let next = tokio::time::Instant::now() + delay;
                    wake = wake.min(next);
                    backoff.insert(c, (next, delay, why));
                }
            }
        }
        if delivered {
            // A batch went through: look again at once (more may wait).
            continue;
        }
        tokio::select! {
            biased;
            _ = rt.outbox_changed() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// `Net::deliver_batch`: up to a batch of the queue of `cluster`, in
/// order; stops at an item to retry later. `settled`: the items
/// delivered or bounced.
async fn deliver_batch(
    fed: &Arc<Fed>,
    own: [u8; 32],
    rt: &Runtime,
    cluster: [u8; 32],
    last_error: Option<&str>,
    settled: &mut usize,
) -> Result<(), String> {
    let items = rt
        .outbox_for(cluster, OUTBOX_BATCH)
        .await
        .map_err(|e| format!("cannot read the outbox: {e}"))?;
    for item in items {
        let age = Duration::from_micros(now_us().saturating_sub(item.created_us));
        let outcome = match verdict(age, EXPIRY, last_error) {
            Verdict::Deliver => fed.send(own, &item).await,
            Verdict::Expired(why) => Err(Fail::Refused(why)),
        };
        // As `nodes` does: before a bounce, ask whether an earlier try was
        // applied (its answer lost, the recipient cancelled since).
        let outcome = match outcome {
            Err(Fail::Refused(why)) => match fed.applied(&item).await {
                Some(true) => Ok(()),
                Some(false) => Err(Fail::Refused(why)),
                None => Err(Fail::Transient(format!(
                    "{why} (the far side could not say whether an earlier try was applied)"
                ))),
            },
            other => other,
        };
        match outcome {
            Ok(()) => {
                rt.outbox_done(&item)
                    .await
                    .map_err(|e| format!("cannot remove a delivered outbox item: {e}"))?;
                *settled += 1;
            }
            Err(Fail::Refused(why)) => match rt.outbox_bounce(&item, &why).await {
                Ok(()) => {
                    tracing::debug!(item = %item.id, "bounced: {why}");
                    stats(fed).bounced += 1;
                    *settled += 1;
                }
                Err(
                    e @ (Error::Store(_)
                    | Error::Unavailable(_)
                    | Error::Fenced(_)
                    | Error::Unreachable(_)
                    | Error::InboxSlotTaken { .. }),
                ) => return Err(format!("cannot bounce an outbox item: {e}")),
                Err(e) => {
                    tracing::error!(item = %item.id, "dropping an outbox item whose sender cannot be told it was refused ({why}): {e}");
                    rt.outbox_done(&item)
                        .await
                        .map_err(|e| format!("cannot remove an outbox item: {e}"))?;
                    *settled += 1;
                }
            },
            Err(Fail::Transient(why)) => return Err(why),
        }
    }
    Ok(())
}
