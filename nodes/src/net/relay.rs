//! Relayed commits between the members of a cluster
//! ([`capstan_cluster::relay`]): this node's [`NetRelay`] sends the store's
//! groups of busy commits to the member [`Membership::commit_relay`] names,
//! which commits them with its own (`Member.relay`, served in
//! [`super::members`]).
//!
//! The store runs on any thread and the member links on the daemon's one
//! (capnp-rpc is single-threaded), so a group goes to the link task through
//! a bounded queue ([`RELAY_QUEUE`]; full, the store commits the group
//! itself). What a failed call means is the store's to decide: a call that
//! never left (the member unreachable, older than the method) applied
//! nothing; any other failure leaves the outcome unknown, and the store
//! resolves the group by its commit marker.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capstan_actors::cluster::Membership;
use capstan_cluster::relay::{
    CommitRelay, FillAnswer, FilledFuture, GroupFill, NO_FILL, RelayError, RelayFuture,
};
use tokio::sync::{mpsc, oneshot};

use super::Net;

/// Largest group relayed (a larger one is committed by its node): well
/// inside the largest Cap'n Proto message a member takes
/// ([`super::MAX_NET_MESSAGE_BYTES`]).
pub const MAX_RELAYED_GROUP_BYTES: usize = 4 << 20;
/// Most members named as following an inbox in a filled number's answer.
pub const MAX_FILL_NOTES: usize = 64;
/// Groups waiting for the link task.
pub const RELAY_QUEUE: usize = 1024;
/// Longest a relay call is kept (the store gives up on it sooner, and
/// resolves it by its marker; the call ends with it).
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

/// A group on its way to the link task.
pub struct RelayCall {
    addr: String,
    group: Vec<u8>,
    /// The traced operations whose commits are in the group.
    traces: Vec<u64>,
    /// Numbers for the relay to fill in (none: a plain `relay` call).
    fills: Vec<GroupFill>,
    reply: oneshot::Sender<RelayAnswer>,
}

/// A relay call's answer: the store's encoded answer and the numbers filled in.
type RelayAnswer = Result<(Vec<u8>, Vec<FillAnswer>), RelayError>;

/// This node's relay, which the store calls.
pub struct NetRelay {
    membership: Arc<Membership>,
    calls: mpsc::Sender<RelayCall>,
}

impl NetRelay {
    pub fn new(membership: Arc<Membership>, calls: mpsc::Sender<RelayCall>) -> NetRelay {
        NetRelay { membership, calls }
    }

    /// Queues `group` for the link task (`None`: too large, no relay, the
    /// queue full).
    fn queue(&self, group: Vec<u8>, fills: Vec<GroupFill>) -> Option<FilledFuture> {
        if group.len() > MAX_RELAYED_GROUP_BYTES {
            return None;
        }
        let to = self.membership.commit_relay()?;
        let (reply, rx) = oneshot::channel();
        self.calls
            .try_send(RelayCall {
                addr: to.addr,
                group,
                traces: capstan_cluster::trace::current(),
                fills,
                reply,
            })
            .ok()?;
        Some(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(RelayError::Unknown("the node's link task stopped".into())))
        }))
    }
}

impl CommitRelay for NetRelay {
    fn relay(&self, group: Vec<u8>) -> Option<RelayFuture> {
        let call = self.queue(group, Vec::new())?;
        Some(Box::pin(
            async move { call.await.map(|(answer, _)| answer) },
        ))
    }

    fn relay_filled(&self, group: Vec<u8>, fills: Vec<GroupFill>) -> Option<FilledFuture> {
        self.queue(group, fills)
    }
}

impl Net {
    /// Makes the relay calls the store asks for until the store closes.
    pub async fn run_relays(self: Rc<Self>, mut rx: mpsc::Receiver<RelayCall>) {
        while let Some(c) = rx.recv().await {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let RelayCall {
                    addr,
                    group,
                    traces,
                    fills,
                    mut reply,
                } = c;
                // The store stops waiting after its own limit and resolves
                // the group by its marker: so does this call then.
                tokio::select! {
                    r = me.relay_at(&addr, &group, &traces, &fills) => {
                        let _ = reply.send(r);
                    }
                    () = reply.closed() => {}
                }
            });
        }
    }

    async fn relay_at(
        self: &Rc<Self>,
        addr: &str,
        group: &[u8],
        traces: &[u64],
        fills: &[GroupFill],
    ) -> RelayAnswer {
        let m = self
            .member(addr)
            .await
            .map_err(|e| RelayError::NotApplied(format!("member {addr} is unreachable: {e}")))?;
        let call = async {
            if fills.is_empty() {
                let mut r = m.relay_request();
                r.get().set_group(group);
                super::traces::write_traces(traces, |n| r.get().init_traces(n));
                let a = r.send().promise.await?;
                let a = a.get()?;
                let unapplied = a.get_unapplied()?.to_str()?.to_string();
                return Ok::<_, capnp::Error>((a.get_answer()?.to_vec(), unapplied, Vec::new()));
            }
            let mut r = m.relay_filled_request();
            r.get().set_group(group);
            super::traces::write_traces(traces, |n| r.get().init_traces(n));
            let mut fl = r.get().init_fills(fills.len() as u32);
            for (i, f) in fills.iter().enumerate() {
                let mut o = fl.reborrow().get(i as u32);
                o.set_scope(&f.scope);
                let mut p = o.init_placeholders(f.placeholders.len() as u32);
                for (j, x) in f.placeholders.iter().enumerate() {
                    p.set(j as u32, *x);
                }
            }
            let a = r.send().promise.await?;
            let a = a.get()?;
            let unapplied = a.get_unapplied()?.to_str()?.to_string();
            let mut filled = Vec::new();
            for f in a.get_filled()?.iter().take(fills.len()) {
                let mut notes = Vec::new();
                for n in f.get_notes()?.iter().take(MAX_FILL_NOTES) {
                    notes.push(n?.to_str()?.to_string());
                }
                filled.push(FillAnswer {
                    first: f.get_first(),
                    notes,
                });
            }
            Ok((a.get_answer()?.to_vec(), unapplied, filled))
        };
        match tokio::time::timeout(RELAY_TIMEOUT, call).await {
            Ok(Ok((_, unapplied, _))) if unapplied.starts_with(NO_FILL) => Err(RelayError::NoFill(
                unapplied.trim_start_matches(NO_FILL).to_string(),
            )),
            Ok(Ok((_, unapplied, _))) if !unapplied.is_empty() => {
                Err(RelayError::NotApplied(unapplied))
            }
            Ok(Ok((answer, _, filled))) => Ok((answer, filled)),
            Ok(Err(e)) if e.kind == capnp::ErrorKind::Unimplemented && !fills.is_empty() => Err(
                RelayError::NoFill(format!("member {addr} predates filled numbers")),
            ),
            Ok(Err(e)) if e.kind == capnp::ErrorKind::Unimplemented => Err(RelayError::NotApplied(
                format!("member {addr} predates relayed commits"),
            )),
            Ok(Err(e)) => {
                if e.kind == capnp::ErrorKind::Disconnected {
                    self.links.drop_link(addr);
                }
                Err(RelayError::Unknown(format!("member {addr}: {e}")))
            }
            Err(_) => {
                self.links.drop_link(addr);
                Err(RelayError::Unknown(format!("member {addr} did not answer")))
            }
        }
    }
}
