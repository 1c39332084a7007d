//! The QUIC endpoint: accepting and serving connections from other nodes,
//! the transport's limits, the UDP sockets and who is known.

use super::*;

impl Net {
    pub(super) async fn accept_loop(self: Rc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let ip = incoming.remote_address().ip();
            let from_ip = self.per_addr.borrow().get(&ip).copied().unwrap_or(0);
            if self.incoming.get() >= MAX_HANDSHAKES + MAX_CONNECTIONS
                || from_ip >= MAX_CONNECTIONS_PER_ADDR
            {
                tracing::warn!(remote = %incoming.remote_address(), from_ip, "refusing a connection: too many");
                incoming.refuse();
                continue;
            }
            count_up(&self.per_addr, ip);
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let remote = incoming.remote_address();
                me.incoming.set(me.incoming.get() + 1);
                if let Err(e) = me.clone().serve(incoming).await {
                    tracing::debug!(%remote, "incoming connection ended: {e:#}");
                }
                me.incoming.set(me.incoming.get() - 1);
                count_down(&me.per_addr, &ip);
            });
        }
    }

    pub(super) async fn serve(self: Rc<Self>, incoming: quinn::Incoming) -> anyhow::Result<()> {
        let conn = tokio::time::timeout(DIAL_TIMEOUT, incoming)
            .await
            .map_err(|_| anyhow!("handshake timed out"))??;
        let peer = peer_cluster(&conn)?;
        tracing::debug!(remote = %conn.remote_address(), cluster = %&encode32(&peer)[..12], "peer connected");
        if peer == self.id.cluster_id {
            // A node of this same cluster: a member link, not a peer cluster.
            return self.serve_streams(conn, peer).await;
        }
        let open = self.per_peer.borrow().get(&peer).copied().unwrap_or(0);
        if open >= MAX_CONNECTIONS_PER_PEER {
            conn.close(
                0u32.into(),
                b"too many connections from your cluster; close some and retry",
            );
            anyhow::bail!("refused: {open} connections from this cluster already");
        }
        let known = is_known(&self.known, &peer);
        if self.peer_open.get() >= MAX_CONNECTIONS
            || (!known && self.unknown_open.get() >= MAX_UNKNOWN_CONNECTIONS)
        {
            conn.close(
                0u32.into(),
                b"this node serves too many connections; retry later",
            );
            anyhow::bail!("refused: too many connections (known peer: {known})");
        }
        let unknown = if known {
            None
        } else {
            Some(Counted::new(&self.unknown_open))
        };
        let _counted = Counted::new(&self.peer_open);
        count_up(&self.per_peer, peer);
        let registered = self.register(peer, Rc::new(Peer::new(conn.clone(), false)));
        let r = self.clone().serve_streams(conn, peer).await;
        drop(unknown);
        count_down(&self.per_peer, &peer);
        // A peer that left leaves no entry behind (fresh identities would
        // otherwise grow the map without bound).
        let mut peers = self.peers.borrow_mut();
        if peers
            .get(&peer)
            .is_some_and(|p| Rc::ptr_eq(p, &registered) && !p.live())
        {
            peers.remove(&peer);
        }
        r
    }

    /// Peer clusters with an entry (a live or recently used connection).
    pub fn peer_count(&self) -> usize {
        self.peers.borrow().len()
    }

    /// Serves the gateway on every stream the other side opens on `conn`
    /// (whichever side dialled it).
    pub(super) async fn serve_streams(
        self: Rc<Self>,
        conn: quinn::Connection,
        peer: [u8; 32],
    ) -> anyhow::Result<()> {
        loop {
            let (send, recv) = conn.accept_bi().await?;
            let gateway: gateway::Client = capnp_rpc::new_client(GatewayServer {
                rt: self.rt.clone(),
                conn: conn.clone(),
                failures: Cell::new(0),
                caller: Caller {
                    cluster: peer,
                    own: self.id.cluster_id,
                },
                known: self.known.clone(),
            });
            let network = crate::net::rpc_network(recv, send, Side::Server, net_reader_options());
            let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
            tokio::task::spawn_local(async move {
                if let Err(e) = rpc.await {
                    tracing::debug!("peer RPC ended: {e}");
                }
            });
        }
    }
}

/// Ack-eliciting packets a peer may take before it acknowledges them
/// ([`transport`]).
const ACK_ELICITING_THRESHOLD: u32 = 6;

/// The transport limits of every connection.
pub(super) fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(
            Duration::from_secs(10)
                .try_into()
                .expect("10 s is a valid idle timeout"),
        ));
    // The peer acknowledges every 7th ack-eliciting packet, or after its
    // max_ack_delay (25 ms), instead of every 2nd (QUIC's ACK frequency
    // extension; a peer without it acknowledges as before). Links carry
    // calls and their answers, which carry the ACKs anyway: under the
    // sends bench, UDP datagrams per send 0.8 -> 0.44 at 3 nodes, 1.30 ->
    // 0.95 at 6 (the host on the relay); the nodes' CPU per send moved
    // within the noise. Six stays below the ~12 packets of QUIC's initial
    // window, so a bulk transfer's slow start is not held up waiting for
    // ACKs.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(acks));
    t
}

/// The socket of a node that only dials: dual-stack where the system
/// allows it (so it reaches IPv4 and IPv6 addresses), else IPv4.
pub(super) fn dial_socket() -> std::io::Result<std::net::UdpSocket> {
    let dual = || -> std::io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(s.into())
    };
    dual().or_else(|e| {
        tracing::debug!("no dual-stack socket ({e}); dialling over IPv4 only");
        std::net::UdpSocket::bind("0.0.0.0:0")
    })
}

pub(super) fn socket2_buffers(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    let s = socket2::SockRef::from(socket);
    s.set_recv_buffer_size(UDP_BUFFER)?;
    s.set_send_buffer_size(UDP_BUFFER)?;
    Ok(())
}

/// One open connection in a count, for as long as it is held.
pub(super) struct Counted<'a>(&'a Cell<usize>);

impl<'a> Counted<'a> {
    pub(super) fn new(c: &'a Cell<usize>) -> Self {
        c.set(c.get() + 1);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

pub(super) type Known = RefCell<HashMap<[u8; 32], std::time::Instant>>;

/// Whether `peer` is a known cluster (see [`KNOWN_FOR`]).
pub(super) fn is_known(known: &Known, peer: &[u8; 32]) -> bool {
    known
        .borrow()
        .get(peer)
        .is_some_and(|until| *until > std::time::Instant::now())
}

/// Marks `peer` known for [`KNOWN_FOR`]; past [`MAX_KNOWN`] clusters the
/// lapsed ones go, then the one known the shortest time.
pub(super) fn mark_known(known: &Known, peer: [u8; 32]) {
    let mut k = known.borrow_mut();
    let now = std::time::Instant::now();
    if k.len() >= MAX_KNOWN && !k.contains_key(&peer) {
        k.retain(|_, until| *until > now);
        if k.len() >= MAX_KNOWN
            && let Some(oldest) = k.iter().min_by_key(|(_, until)| **until).map(|(p, _)| *p)
        {
            k.remove(&oldest);
        }
    }
    k.insert(peer, now + KNOWN_FOR);
}

/// The cluster id of the other end of an accepted connection.
pub(super) fn peer_cluster(conn: &quinn::Connection) -> anyhow::Result<[u8; 32]> {
    let certs = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| anyhow!("the peer presented no certificates"))?;
    let ca = certs
        .get(1)
        .ok_or_else(|| anyhow!("the peer sent no cluster certificate"))?;
    Ok(identity::cluster_id_of(ca)?)
}
