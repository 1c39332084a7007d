//! Connections to other clusters: one per cluster (the preferred one when
//! both sides dialled), dialled on demand, and the calls made on the objects
//! restored over them.

use super::*;

/// A connection to another cluster (dialled by either side), with the
/// capabilities restored on it.
pub(super) struct Peer {
    pub(super) conn: quinn::Connection,
    /// Whether this node dialled it.
    pub(super) mine: bool,
    /// Our client of the other side's gateway, on a stream we open.
    pub(super) gateway: RefCell<Option<gateway::Client>>,
    pub(super) opening: tokio::sync::Mutex<()>,
    pub(super) objects: RefCell<HashMap<[u8; 32], object::Client>>,
}

impl Peer {
    pub(super) fn new(conn: quinn::Connection, mine: bool) -> Peer {
        Peer {
            conn,
            mine,
            gateway: RefCell::new(None),
            opening: tokio::sync::Mutex::new(()),
            objects: RefCell::new(HashMap::new()),
        }
    }

    /// The other side's gateway: a Cap'n Proto client on a stream of this
    /// connection, opened on first use.
    pub(super) async fn gateway(&self) -> Result<gateway::Client, String> {
        if let Some(g) = self.gateway.borrow().clone() {
            return Ok(g);
        }
        let _guard = self.opening.lock().await;
        if let Some(g) = self.gateway.borrow().clone() {
            return Ok(g);
        }
        let (send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| format!("{}: {e}", self.conn.remote_address()))?;
        let network = crate::net::rpc_network(recv, send, Side::Client, net_reader_options());
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let gateway: gateway::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(async move {
            let _ = rpc.await;
        });
        *self.gateway.borrow_mut() = Some(gateway.clone());
        Ok(gateway)
    }

    pub(super) fn live(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

/// Whether a connection between clusters `me` and `them` is the one both
/// keep when each dialled the other: the one dialled by the smaller id.
pub(super) fn preferred(me: &[u8; 32], them: &[u8; 32], mine: bool) -> bool {
    let dialler = if mine { me } else { them };
    dialler == me.min(them)
}

/// How long a duplicate connection is kept for calls already on it.
pub(super) const DUPLICATE_GRACE: Duration = Duration::from_secs(3);

/// One more open connection counted under `key`.
pub(super) fn count_up<K: std::hash::Hash + Eq>(counts: &RefCell<HashMap<K, usize>>, key: K) {
    *counts.borrow_mut().entry(key).or_default() += 1;
}

/// One fewer under `key`; a key with none left is dropped (the map holds
/// only what is open).
pub(super) fn count_down<K: std::hash::Hash + Eq>(counts: &RefCell<HashMap<K, usize>>, key: &K) {
    let mut counts = counts.borrow_mut();
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

impl Net {
    /// The connection to `remote`'s cluster: the one either side already
    /// opened, else a new one dialled now.
    pub(super) async fn peer(self: &Rc<Self>, remote: &RemoteRec) -> Result<Rc<Peer>, String> {
        if let Some(p) = self.live_peer(&remote.cluster) {
            return Ok(p);
        }
        let lock = self
            .dialing
            .borrow_mut()
            .entry(remote.cluster)
            .or_default()
            .clone();
        let r = self.dial_once(remote, &lock).await;
        let mut dialing = self.dialing.borrow_mut();
        if Rc::strong_count(&lock) == 2 {
            // (only the map and this call hold it: nobody else waits)
            dialing.remove(&remote.cluster);
        }
        r
    }

    /// [`Net::peer`] under the dial lock of the cluster.
    pub(super) async fn dial_once(
        self: &Rc<Self>,
        remote: &RemoteRec,
        lock: &tokio::sync::Mutex<()>,
    ) -> Result<Rc<Peer>, String> {
        let _guard = lock.lock().await;
        if let Some(p) = self.live_peer(&remote.cluster) {
            return Ok(p);
        }
        let p = Rc::new(self.dial(remote).await?);
        let me = self.clone();
        let (conn, cluster) = (p.conn.clone(), remote.cluster);
        tokio::task::spawn_local(async move {
            if let Err(e) = me.serve_streams(conn, cluster).await {
                tracing::debug!("outgoing connection ended: {e:#}");
            }
        });
        Ok(self.register(remote.cluster, p))
    }

    /// Records a new connection to `cluster`; returns the one to use. When
    /// both nodes dialled each other, both keep the same one (see
    /// [`preferred`]) and close the other after [`DUPLICATE_GRACE`].
    pub(super) fn register(&self, cluster: [u8; 32], new: Rc<Peer>) -> Rc<Peer> {
        let mut peers = self.peers.borrow_mut();
        let (keep, drop) = match peers.get(&cluster) {
            // Another node of that cluster (a cluster of several nodes shares
            // one cluster id): a different connection, not a duplicate. Keep
            // both open; calls use the one this node dialled, if any.
            Some(old)
                if old.live()
                    && !Rc::ptr_eq(old, &new)
                    && old.conn.remote_address() != new.conn.remote_address() =>
            {
                if !old.mine || new.mine {
                    peers.insert(cluster, new.clone());
                }
                return new;
            }
            Some(old) if old.live() && !Rc::ptr_eq(old, &new) => {
                let me = &self.id.cluster_id;
                if preferred(me, &cluster, old.mine) && !preferred(me, &cluster, new.mine) {
                    (old.clone(), new)
                } else {
                    (new, old.clone())
                }
            }
            _ => {
                peers.insert(cluster, new.clone());
                return new;
            }
        };
        peers.insert(cluster, keep.clone());
        tracing::debug!(cluster = %&encode32(&cluster)[..12], "two connections to one cluster: closing one");
        tokio::task::spawn_local(async move {
            tokio::time::sleep(DUPLICATE_GRACE).await;
            drop.conn.close(0u32.into(), b"duplicate connection");
        });
        keep
    }

    pub(super) fn live_peer(&self, cluster: &[u8; 32]) -> Option<Rc<Peer>> {
        let mut peers = self.peers.borrow_mut();
        match peers.get(cluster) {
            Some(p) if p.live() => Some(p.clone()),
            Some(_) => {
                peers.remove(cluster);
                None
            }
            None => None,
        }
    }

    /// Forgets `peer` as the connection to `cluster` (not a newer one).
    pub(super) fn drop_peer(&self, cluster: &[u8; 32], peer: &Rc<Peer>) {
        let mut peers = self.peers.borrow_mut();
        if peers.get(cluster).is_some_and(|p| Rc::ptr_eq(p, peer)) {
            peers.remove(cluster);
        }
    }

    /// The peer address of this node's link to each member it has one to,
    /// by the member's advertised address ([`members::Links::observed`]).
    pub fn observed_members(&self) -> std::collections::HashMap<String, String> {
        self.links.observed()
    }

    /// Open QUIC connections, whichever side dialled (one per other
    /// cluster in use, plus duplicates and refused ones still closing).
    pub fn connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    pub(super) async fn dial(&self, remote: &RemoteRec) -> Result<Peer, String> {
        let tls = tls::client_config(&self.id, remote.cluster).map_err(|e| e.to_string())?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC TLS configuration: {e}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(Arc::new(transport()));
        let cluster = &encode32(&remote.cluster)[..12];
        let mut errors = Vec::new();
        // Every address of the locator is dialled at once and the first
        // handshake wins: a dead node of a cluster (whose address may come
        // first) costs nothing instead of a whole dial timeout.
        let mut dials = futures::stream::FuturesUnordered::new();
        for a in &remote.addrs {
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(a.as_str()).await {
                Ok(it) => it.collect(),
                Err(e) => {
                    errors.push(format!("{a}: {e}"));
                    continue;
                }
            };
            for addr in addrs {
                match self.endpoint.connect_with(cfg.clone(), addr, "capstan") {
                    Ok(connecting) => dials.push(async move {
                        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                            Ok(Ok(c)) => Ok((addr, c)),
                            Ok(Err(e)) => Err(format!("{addr}: {e}")),
                            Err(_) => Err(format!(
                                "{addr}: no answer within {} s",
                                DIAL_TIMEOUT.as_secs()
                            )),
                        }
                    }),
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
        }
        while let Some(r) = futures::StreamExt::next(&mut dials).await {
            match r {
                Ok((addr, conn)) => {
                    // the other handshakes still running are dropped (abandoned)
                    drop(dials);
                    let peer = Peer::new(conn, true);
                    peer.gateway().await?;
                    tracing::debug!(%addr, cluster, "connected to peer");
                    // A cluster this node mails or calls: its own calls back
                    // get a connection even while unknown ones fill the node.
                    if remote.cluster != self.id.cluster_id {
                        mark_known(&self.known, remote.cluster);
                    }
                    return Ok(peer);
                }
                Err(e) => errors.push(e),
            }
        }
        Err(format!(
            "cannot reach cluster {cluster}… ({}); is its node running?",
            errors.join("; ")
        ))
    }

    /// The capability a remote formula designates (restored once per
    /// connection, then reused: a live capability).
    pub(super) async fn object(
        self: &Rc<Self>,
        remote: &RemoteRec,
    ) -> Result<(Rc<Peer>, object::Client), String> {
        let peer = self.peer(remote).await?;
        let key = *blake3::hash(&remote.swiss).as_bytes();
        if let Some(o) = peer.objects.borrow().get(&key) {
            return Ok((peer.clone(), o.clone()));
        }
        let gateway = peer.gateway().await?;
        let mut r = gateway.restore_request();
        r.get().set_swiss(&remote.swiss);
        // Pipelined: the object is usable before restore answers.
        let o = r.send().pipeline.get_object();
        peer.objects.borrow_mut().insert(key, o.clone());
        Ok((peer, o))
    }

    /// Whether the cluster of `remote` applied outbox item `item`
    /// (`Gateway.applied`; a version without the call answers false).
    /// `None`: it could not say now (unreachable, no answer in time).
    pub(super) async fn applied(
        self: &Rc<Self>,
        remote: &RemoteRec,
        item: capstan_proto::RequestId,
    ) -> Option<bool> {
        let peer = self.peer(remote).await.ok()?;
        let gateway = peer.gateway().await.ok()?;
        let mut r = gateway.applied_request();
        r.get().init_items(1).set(0, &item.0);
        match tokio::time::timeout(CALL_TIMEOUT, r.send().promise)
            .await
            .ok()?
        {
            Ok(answer) => answer.get().ok()?.get_applied().ok()?.iter().next(),
            Err(e) if e.kind == capnp::ErrorKind::Unimplemented => Some(false),
            Err(_) => None,
        }
    }

    pub(super) fn forget(&self, remote: &RemoteRec, peer: &Peer) {
        let key = *blake3::hash(&remote.swiss).as_bytes();
        peer.objects.borrow_mut().remove(&key);
    }

    /// Runs `call` on the remote capability; on a broken connection, dials
    /// again once; a failed capability (revoked) is forgotten.
    pub(super) async fn with_object<T, F, Fut>(
        self: &Rc<Self>,
        remote: &RemoteRec,
        call: F,
    ) -> Result<T, NetError>
    where
        F: Fn(object::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, CapError>>,
    {
        for attempt in 0..2 {
            let (peer, o) = self.object(remote).await.map_err(NetError::Transient)?;
            let answer = match tokio::time::timeout(CALL_TIMEOUT, call(o)).await {
                Ok(a) => a,
                Err(_) => {
                    peer.conn.close(2u32.into(), b"call timed out");
                    Err(CapError::disconnected(format!(
                        "no answer within {} s",
                        CALL_TIMEOUT.as_secs()
                    )))
                }
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(e) if e.kind == capnp::ErrorKind::Disconnected && attempt == 0 => {
                    self.forget(remote, &peer);
                    self.drop_peer(&remote.cluster, &peer);
                    continue;
                }
                Err(e) => {
                    self.forget(remote, &peer);
                    if e.kind == capnp::ErrorKind::Disconnected {
                        self.drop_peer(&remote.cluster, &peer);
                        return Err(NetError::Transient(format!(
                            "lost the connection to cluster {}…: {}",
                            &encode32(&remote.cluster)[..12],
                            clean_message(&e)
                        )));
                    }
                    if e.kind == capnp::ErrorKind::Overloaded {
                        return Err(NetError::Transient(format!(
                            "the remote node could not take it now: {}",
                            clean_message(&e)
                        )));
                    }
                    return Err(NetError::Refused(format!(
                        "the remote node refused: {}",
                        clean_message(&e)
                    )));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    pub async fn cat(self: &Rc<Self>, remote: &RemoteRec) -> Result<(ValueKind, Vec<u8>), String> {
        self.with_object(remote, |o| async move {
            let answer = o.cat_request().send().promise.await?;
            let r = answer.get()?;
            let kind = match r.get_kind()? {
                capstan_proto::net_capnp::ValueKind::Text => ValueKind::Text,
                capstan_proto::net_capnp::ValueKind::Json => ValueKind::Json,
                capstan_proto::net_capnp::ValueKind::Bytes => ValueKind::Bytes,
            };
            Ok((kind, r.get_data()?.to_vec()))
        })
        .await
        .map_err(|e| e.to_string())
    }

    pub async fn show(self: &Rc<Self>, remote: &RemoteRec) -> Result<(String, String), String> {
        self.check(remote).await.map_err(|e| e.to_string())
    }

    /// Restores `remote` on its cluster and asks what it designates (type
    /// and detail): whether the locator is real, and whether its cluster can
    /// be reached now.
    pub async fn check(self: &Rc<Self>, remote: &RemoteRec) -> Result<(String, String), NetError> {
        self.with_object(remote, |o| async move {
            let answer = o.show_request().send().promise.await?;
            let r = answer.get()?;
            Ok((r.get_type()?.to_string()?, r.get_detail()?.to_string()?))
        })
        .await
    }

    /// A reference of this node's own cluster made complete for the wire.
    pub(super) fn fill(&self, r: &RemoteRec) -> RemoteRec {
        if r.is_own() {
            RemoteRec {
                cluster: self.id.cluster_id,
                swiss: r.swiss,
                addrs: self.advertised.clone(),
            }
        } else {
            r.clone()
        }
    }

    /// Redeems an invitation: hands the inviter a handle (`handle_swiss`,
    /// already meaning this node's agent once recorded) and returns the
    /// inviter's handle for us.
    pub async fn accept(
        self: &Rc<Self>,
        invitation: &Locator,
        handle_swiss: [u8; 32],
        req: capstan_proto::RequestId,
    ) -> Result<RemoteRec, NetError> {
        if self.advertised.is_empty() {
            return Err(NetError::Refused("accepting an invitation needs a listening node, so that the inviter can reach it: restart it with `capstan start --listen HOST:PORT`".into()));
        }
        let remote = RemoteRec {
            cluster: invitation.cluster,
            swiss: invitation.swiss,
            addrs: invitation.addrs.clone(),
        };
        let handle = self.fill(&RemoteRec::own(handle_swiss));
        let swiss = self
            .with_object(&remote, |o| {
                let handle = handle.clone();
                async move {
                    let mut r = o.accept_request();
                    handle.write_wire(r.get().init_handle());
                    r.get().set_req_id(&req.0);
                    let answer = r.send().promise.await?;
                    let s: [u8; 32] = answer
                        .get()?
                        .get_swiss()?
                        .try_into()
                        .map_err(|_| failed("a swiss number is 32 bytes"))?;
                    Ok(s)
                }
            })
            .await?;
        Ok(RemoteRec {
            cluster: invitation.cluster,
            swiss,
            addrs: invitation.addrs.clone(),
        })
    }

    /// The gateway of `remote`'s cluster (benchmarks).
    pub async fn gateway(self: &Rc<Self>, remote: &RemoteRec) -> Result<gateway::Client, String> {
        self.peer(remote).await?.gateway().await
    }

    /// `Gateway.ping` round trip to `remote`'s cluster (benchmarks).
    pub async fn ping(
        self: &Rc<Self>,
        remote: &RemoteRec,
        payload: &[u8],
    ) -> Result<usize, String> {
        let gateway = self.peer(remote).await?.gateway().await?;
        let mut r = gateway.ping_request();
        r.get().set_payload(payload);
        let answer = r.send().promise.await.map_err(|e| e.to_string())?;
        let n = answer
            .get()
            .and_then(|a| a.get_payload())
            .map_err(|e| e.to_string())?
            .len();
        Ok(n)
    }
}

/// The message of a remote error, without the transport's prefixes or
/// its kind.
fn clean_message(e: &capnp::Error) -> String {
    capstan_actors::error::from_wire(e).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_prefixes_are_stripped() {
        let e =
            capnp::Error::failed("remote exception: remote exception: unknown name \"x\"".into());
        assert_eq!(clean_message(&e), "unknown name \"x\"");
        let e = capnp::Error::failed(String::new());
        assert_eq!(clean_message(&e), "Failed");
    }
}
