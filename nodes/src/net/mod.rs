//! Node-to-node networking: Cap'n Proto RPC over QUIC (quinn + rustls).
//!
//! - [`identity`]: the node and cluster keys and certificates.
//! - [`tls`]: TLS 1.3 with trust by cluster id.
//! - this module: [`Net`], the QUIC endpoint of a node. It listens (with
//!   `--listen`), serves a [`Gateway`](capstan_proto::net_capnp::gateway) on
//!   every incoming connection, and dials other clusters on demand for the
//!   remote formulas an agent uses, keeping one connection per cluster and
//!   re-dialling after failures.
//!
//! # Threads
//!
//! The endpoint, its connections and their RPC systems run on the daemon's
//! one thread (a current-thread runtime with a `LocalSet`), next to the
//! control socket: quinn and capnp-rpc on the same thread avoid a cross-
//! thread wake-up per packet (2.5× faster in ANCHORS.md). The UDP socket
//! gets 4 MiB buffers.
//!
//! # Bounds
//!
//! At most [`MAX_CONNECTIONS`] incoming connections from other clusters,
//! of them at most [`MAX_UNKNOWN_CONNECTIONS`] from clusters this node does
//! not know (a cluster is known for [`KNOWN_FOR`] once it restored one of
//! this cluster's locators, or once this node dialled it: federation
//! peers), so that anyone minting fresh identities cannot shut federation
//! out; connections of this node's own cluster (member links: only its key
//! can make them) are not counted. At most [`MAX_CONNECTIONS_PER_ADDR`]
//! from one IP address, [`MAX_HANDSHAKES`] handshakes at once, and
//! [`MAX_CONNECTIONS_PER_PEER`] from one peer cluster, 4 streams each (a
//! peer that leaves leaves no entry behind),
//! Cap'n Proto messages of at most [`MAX_NET_MESSAGE_BYTES`] (the largest a
//! node sends: a value read over the network; a frame claiming more is
//! refused from its header, before anything is allocated for it), a failed
//! restore costs the caller [`RESTORE_FAILURE_DELAY`] and
//! [`MAX_RESTORE_FAILURES`] of them close its connection. The outbox is
//! delivered by at most [`capstan_actors::rules::outbox::COURIERS`] couriers at a time, one per
//! peer cluster, each taking up to a batch of its queue per turn.

pub mod advertise;
pub mod identity;
pub mod members;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use capnp::Error as CapError;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use capstan_actors::{Caller, OutOp, OutboxItem, RemoteRec, Runtime, ValueKind};
use capstan_proto::Locator;
use capstan_proto::locator::encode32;
use capstan_proto::net_capnp::{gateway, object};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use identity::Identity;

pub const MAX_CONNECTIONS: usize = 256;
/// Most of [`MAX_CONNECTIONS`] that clusters this node does not know may
/// hold (the rest is kept for known peers).
pub const MAX_UNKNOWN_CONNECTIONS: usize = 192;
/// Most incoming connections before their handshake is done (a hard bound
/// on what the accept loop holds before knowing who calls).
pub const MAX_HANDSHAKES: usize = 512;
/// How long a cluster stays known after it restored a locator here, or
/// after this node dialled it.
pub const KNOWN_FOR: Duration = Duration::from_secs(3600);
/// Most clusters remembered as known.
const MAX_KNOWN: usize = 4096;
/// Most incoming connections from one IP address: a host minting fresh
/// cluster identities cannot take every connection slot.
pub const MAX_CONNECTIONS_PER_ADDR: usize = 64;
/// Most incoming connections from one peer cluster (nodes of this node's
/// own cluster are not counted: only its key can make them).
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// Largest Cap'n Proto message read from another node: a value of
/// [`capstan_actors::api::MAX_VALUE_BYTES`] (8 MiB) read over the network,
/// with its framing and room to spare. (The control socket, which only the
/// node's own user reaches, reads up to 64 MiB.)
pub const MAX_NET_MESSAGE_BYTES: usize = 12 * 1024 * 1024;

/// Reader options of every node-to-node stream (both ends).
pub fn net_reader_options() -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_NET_MESSAGE_BYTES / 8));
    o
}
pub const MAX_RESTORE_FAILURES: u32 = 16;
pub const RESTORE_FAILURE_DELAY: Duration = Duration::from_millis(50);
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// A call without an answer for this long counts as a lost connection (a
/// killed peer is otherwise only noticed at the idle timeout).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_PING: usize = 64 * 1024;
/// Most addresses put in one locator.
pub const MAX_LOCATOR_ADDRS: usize = capstan_proto::locator::MAX_ADDRS;
pub use capstan_actors::rules::outbox::EXPIRY as OUTBOX_EXPIRY;
use capstan_actors::rules::outbox::{Schedule, Verdict};

/// Why a call to another node failed, by the kind of the Cap'n Proto
/// error (never by its text): `disconnected` (and a call without an answer
/// in time) or `overloaded` is [`NetError::Transient`]; anything else the
/// other side answered is [`NetError::Refused`]. A node answers
/// `overloaded` for its own transient failures ([`wire_error`]).
#[derive(Debug, Clone)]
pub enum NetError {
    /// Could not reach it, lost the connection, or it answered "not now"
    /// (its store failed, it lost its cluster lease, …): try again later.
    Transient(String),
    /// It refused for good (revoked, unknown, invalid): trying again will
    /// not help.
    Refused(String),
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Transient(s) | NetError::Refused(s) => f.write_str(s),
        }
    }
}

/// An error of this node for a caller of another cluster: `overloaded`
/// when the same call may succeed later ([`capstan_actors::Error::is_transient`]),
/// else `failed` (a refusal for good). Mail senders retry the first and
/// bounce the second.
///
/// The message carries the error's kind as on the control socket
/// ([`capstan_actors::Error::to_wire`]), but the exception type follows the
/// rule above: between clusters `disconnected` means only that the
/// connection broke (the caller then drops it), never an answer.
pub fn wire_error(e: capstan_actors::Error) -> CapError {
    CapError {
        kind: if e.is_transient() {
            capnp::ErrorKind::Overloaded
        } else {
            capnp::ErrorKind::Failed
        },
        extra: e.to_wire().extra,
    }
}
const UDP_BUFFER: usize = 4 * 1024 * 1024;

fn failed(msg: impl Into<String>) -> CapError {
    CapError::failed(msg.into())
}

/// A connection to another cluster (dialled by either side), with the
/// capabilities restored on it.
struct Peer {
    conn: quinn::Connection,
    /// Whether this node dialled it.
    mine: bool,
    /// Our client of the other side's gateway, on a stream we open.
    gateway: RefCell<Option<gateway::Client>>,
    opening: tokio::sync::Mutex<()>,
    objects: RefCell<HashMap<[u8; 32], object::Client>>,
}

impl Peer {
    fn new(conn: quinn::Connection, mine: bool) -> Peer {
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
    async fn gateway(&self) -> Result<gateway::Client, String> {
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
        let network = twoparty::VatNetwork::new(
            recv.compat(),
            send.compat_write(),
            Side::Client,
            net_reader_options(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let gateway: gateway::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(async move {
            let _ = rpc.await;
        });
        *self.gateway.borrow_mut() = Some(gateway.clone());
        Ok(gateway)
    }

    fn live(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

/// Whether a connection between clusters `me` and `them` is the one both
/// keep when each dialled the other: the one dialled by the smaller id.
fn preferred(me: &[u8; 32], them: &[u8; 32], mine: bool) -> bool {
    let dialler = if mine { me } else { them };
    dialler == me.min(them)
}

/// How long a duplicate connection is kept for calls already on it.
const DUPLICATE_GRACE: Duration = Duration::from_secs(3);

/// One more open connection counted under `key`.
fn count_up<K: std::hash::Hash + Eq>(counts: &RefCell<HashMap<K, usize>>, key: K) {
    *counts.borrow_mut().entry(key).or_default() += 1;
}

/// One fewer under `key`; a key with none left is dropped (the map holds
/// only what is open).
fn count_down<K: std::hash::Hash + Eq>(counts: &RefCell<HashMap<K, usize>>, key: &K) {
    let mut counts = counts.borrow_mut();
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The QUIC side of a node.
pub struct Net {
    rt: Runtime,
    id: Rc<Identity>,
    endpoint: quinn::Endpoint,
    /// Addresses put in locators (the listen address), empty if not listening.
    advertised: Vec<String>,
    /// The address bound for other nodes, if listening.
    bound: Option<SocketAddr>,
    peers: RefCell<HashMap<[u8; 32], Rc<Peer>>>,
    /// One dial at a time per cluster (a dead cluster's dial timeout does
    /// not hold up dials to others); an entry lives while it is dialled.
    dialing: RefCell<HashMap<[u8; 32], Rc<tokio::sync::Mutex<()>>>>,
    incoming: Rc<Cell<usize>>,
    /// Incoming connections open per remote IP address and per peer
    /// cluster (see [`MAX_CONNECTIONS_PER_ADDR`], [`MAX_CONNECTIONS_PER_PEER`]).
    per_addr: RefCell<HashMap<std::net::IpAddr, usize>>,
    per_peer: RefCell<HashMap<[u8; 32], usize>>,
    /// Peer clusters known, until when (see [`KNOWN_FOR`]).
    known: Rc<RefCell<HashMap<[u8; 32], std::time::Instant>>>,
    /// Incoming connections from other clusters: all, and unknown ones.
    peer_open: Cell<usize>,
    unknown_open: Cell<usize>,
    /// Links to the other nodes of this cluster.
    links: members::Links,
}

impl Net {
    /// Binds the endpoint: a listener on `listen`, or a dial-only endpoint.
    /// Locators name `advertise` (its entries without a port get the bound
    /// port), or else the bound address, which must not be a wildcard.
    pub fn bind(
        rt: Runtime,
        id: Identity,
        listen: Option<SocketAddr>,
        advertise: Option<&advertise::Advertise>,
    ) -> anyhow::Result<Rc<Net>> {
        let id = Rc::new(id);
        let socket = match listen {
            Some(addr) => std::net::UdpSocket::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (UDP)"))?,
            None => dial_socket().context("cannot open a UDP socket")?,
        };
        let sock = socket2_buffers(&socket);
        if let Err(e) = sock {
            tracing::warn!("cannot raise UDP buffers: {e}");
        }
        let server = if listen.is_some() {
            let tls = tls::server_config(&id)?;
            let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
                .map_err(|e| anyhow!("QUIC TLS configuration: {e}"))?;
            let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
            cfg.transport_config(Arc::new(transport()));
            Some(cfg)
        } else {
            None
        };
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            server,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let bound = match listen {
            Some(_) => Some(endpoint.local_addr()?),
            None => None,
        };
        let advertised = match (listen, advertise) {
            (None, _) => Vec::new(),
            (Some(_), Some(a)) => a.addrs(endpoint.local_addr()?.port()),
            (Some(_), None) => {
                let bound = endpoint.local_addr()?;
                if bound.ip().is_unspecified() {
                    anyhow::bail!("{}", wildcard_message(bound));
                }
                vec![bound.to_string()]
            }
        };
        let net = Rc::new(Net {
            rt,
            id,
            endpoint,
            advertised,
            bound,
            peers: RefCell::new(HashMap::new()),
            dialing: RefCell::new(HashMap::new()),
            incoming: Rc::new(Cell::new(0)),
            per_addr: RefCell::new(HashMap::new()),
            per_peer: RefCell::new(HashMap::new()),
            known: Rc::new(RefCell::new(HashMap::new())),
            peer_open: Cell::new(0),
            unknown_open: Cell::new(0),
            links: members::Links::default(),
        });
        if listen.is_some() {
            tokio::task::spawn_local(net.clone().accept_loop());
        }
        Ok(net)
    }

    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    pub fn cluster_id(&self) -> [u8; 32] {
        self.id.cluster_id
    }

    /// The addresses other nodes dial (put in locators, invitations and
    /// the cluster record); empty if not listening.
    pub fn listen_addrs(&self) -> &[String] {
        &self.advertised
    }

    /// The address bound for other nodes (the port the system chose for
    /// port 0), if listening.
    pub fn bound_addr(&self) -> Option<SocketAddr> {
        self.bound
    }

    /// The locator text for a swiss number of this node.
    pub fn locator(&self, swiss: [u8; 32]) -> Result<Locator, String> {
        if self.advertised.is_empty() {
            return Err("this node does not listen for other nodes, so its locators could not be redeemed; restart it with `capstan start --listen HOST:PORT`".into());
        }
        // In a cluster every live node serves every locator: list them all,
        // this node first, so a peer reconnects to a survivor by itself.
        let mut addrs = self.advertised.clone();
        if let Some(c) = self.rt.membership() {
            for m in c.members() {
                if !addrs.contains(&m.addr) && addrs.len() < MAX_LOCATOR_ADDRS {
                    addrs.push(m.addr);
                }
            }
        }
        Ok(Locator {
            cluster: self.id.cluster_id,
            swiss,
            addrs,
        })
    }

    /// [`Net::locator`] with the cluster's members read from the store
    /// first (a locator lives on; it should name every node there is).
    pub async fn fresh_locator(&self, swiss: [u8; 32]) -> Result<Locator, String> {
        if let Some(c) = self.rt.membership()
            && let Err(e) = c.refresh_members(self.rt.db()).await
        {
            tracing::debug!("locator with the members of the last renewal: {e}");
        }
        self.locator(swiss)
    }

    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(Duration::from_millis(300), self.endpoint.wait_idle()).await;
    }

    // --- serving ----------------------------------------------------------------------

    async fn accept_loop(self: Rc<Self>) {
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

    async fn serve(self: Rc<Self>, incoming: quinn::Incoming) -> anyhow::Result<()> {
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
    async fn serve_streams(
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
            let network = twoparty::VatNetwork::new(
                recv.compat(),
                send.compat_write(),
                Side::Server,
                net_reader_options(),
            );
            let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
            tokio::task::spawn_local(async move {
                if let Err(e) = rpc.await {
                    tracing::debug!("peer RPC ended: {e}");
                }
            });
        }
    }

    // --- dialling ----------------------------------------------------------------------

    /// The connection to `remote`'s cluster: the one either side already
    /// opened, else a new one dialled now.
    async fn peer(self: &Rc<Self>, remote: &RemoteRec) -> Result<Rc<Peer>, String> {
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
    async fn dial_once(
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
    fn register(&self, cluster: [u8; 32], new: Rc<Peer>) -> Rc<Peer> {
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

    fn live_peer(&self, cluster: &[u8; 32]) -> Option<Rc<Peer>> {
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
    fn drop_peer(&self, cluster: &[u8; 32], peer: &Rc<Peer>) {
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

    async fn dial(&self, remote: &RemoteRec) -> Result<Peer, String> {
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
    async fn object(
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

    fn forget(&self, remote: &RemoteRec, peer: &Peer) {
        let key = *blake3::hash(&remote.swiss).as_bytes();
        peer.objects.borrow_mut().remove(&key);
    }

    /// Runs `call` on the remote capability; on a broken connection, dials
    /// again once; a failed capability (revoked) is forgotten.
    async fn with_object<T, F, Fut>(
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
                            crate::client::clean_message(&e)
                        )));
                    }
                    if e.kind == capnp::ErrorKind::Overloaded {
                        return Err(NetError::Transient(format!(
                            "the remote node could not take it now: {}",
                            crate::client::clean_message(&e)
                        )));
                    }
                    return Err(NetError::Refused(format!(
                        "the remote node refused: {}",
                        crate::client::clean_message(&e)
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
    fn fill(&self, r: &RemoteRec) -> RemoteRec {
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

    /// Delivers one outbox item.
    pub async fn send_item(self: &Rc<Self>, item: &OutboxItem) -> Result<(), NetError> {
        let fill = |r: &RemoteRec| self.fill(r);
        let has_own = match &item.op {
            OutOp::Deliver(e) => match &e.body {
                capstan_actors::EnvelopeBody::Package { refs, .. } => {
                    refs.iter().any(RemoteRec::is_own)
                }
                capstan_actors::EnvelopeBody::Request { .. } => true,
            },
            OutOp::Settle(capstan_actors::Settlement::Resolved(r)) => r.is_own(),
            OutOp::Settle(_) => false,
        };
        if has_own && self.advertised.is_empty() {
            return Err(NetError::Refused("it carries references to this node, which does not listen for other nodes; restart it with `capstan start --listen HOST:PORT`".into()));
        }
        let fill = &fill;
        match &item.op {
            OutOp::Deliver(env) => {
                self.with_object(&item.to, |o| async move {
                    let mut r = o.deliver_request();
                    r.get().set_id(&item.id.0);
                    env.write(r.get().init_envelope(), fill);
                    r.send().promise.await.map(drop)
                })
                .await
            }
            OutOp::Settle(st) => {
                self.with_object(&item.to, |o| async move {
                    let mut r = o.settle_request();
                    r.get().set_id(&item.id.0);
                    st.write(r.get().init_settlement(), fill);
                    r.send().promise.await.map(drop)
                })
                .await
            }
        }
    }

    /// Delivers the outbox for as long as the node runs. The outbox is a
    /// queue per peer cluster, and each queue with mail gets a courier of
    /// its own (at most [`capstan_actors::rules::outbox::COURIERS`] at a time, taken in turn): it
    /// delivers up to a batch in order, removing each item once the far
    /// side acknowledged it and bouncing to its sender an item the far side
    /// refused; a cluster that cannot be reached is retried with
    /// exponential backoff (capped at [`capstan_actors::rules::outbox::MAX_BACKOFF`]). So a dead or
    /// slow peer delays only its own mail.
    ///
    /// Only a refusal for good bounces at once ([`NetError::Refused`]);
    /// an item that keeps failing otherwise ([`NetError::Transient`]) is
    /// retried until it is `expiry` old ([`OUTBOX_EXPIRY`] unless set
    /// otherwise), then bounced once with the last error.
    pub async fn run_outbox(self: Rc<Self>, expiry: Duration) {
        match self.rt.migrate_outbox().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("moved {n} outbox items into queues per peer cluster"),
            Err(e) => tracing::warn!("cannot move the outbox of an earlier version: {e}"),
        }
        // Which queues get a courier when (see capstan_actors::rules::outbox);
        // this loop only lists the queues, runs the couriers and sleeps.
        let schedule = Rc::new(RefCell::new(Schedule::default()));
        let done = Rc::new(tokio::sync::Notify::new());
        // Where the next listing of queues starts (when one listing cannot
        // hold them all).
        let mut after: Option<[u8; 32]> = None;
        loop {
            let peers = match self
                .rt
                .outbox_peers(after, capstan_actors::federation::OUTBOX_PEERS)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("cannot read the outbox: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let complete = peers.len() < capstan_actors::federation::OUTBOX_PEERS;
            after = if complete {
                None
            } else {
                peers.last().copied()
            };
            let plan = schedule
                .borrow_mut()
                .plan(&peers, complete, std::time::Instant::now());
            for c in plan.start {
                tokio::task::spawn_local(self.clone().courier(
                    c,
                    expiry,
                    schedule.clone(),
                    done.clone(),
                ));
            }
            let wake = tokio::time::Instant::from_std(plan.wake);
            tokio::select! {
                _ = self.rt.outbox_changed() => {}
                _ = done.notified() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// One turn of the courier of peer cluster `cluster`: delivers up to a
    /// batch of its queue, then records how it went and wakes the outbox loop.
    async fn courier(
        self: Rc<Self>,
        cluster: [u8; 32],
        expiry: Duration,
        schedule: Rc<RefCell<Schedule>>,
        done: Rc<tokio::sync::Notify>,
    ) {
        let last_error = schedule.borrow().last_error(&cluster).map(str::to_string);
        let r = self
            .deliver_batch(cluster, expiry, last_error.as_deref())
            .await;
        schedule
            .borrow_mut()
            .finished(cluster, r, std::time::Instant::now());
        done.notify_one();
    }

    /// Delivers up to a batch of the queue of `cluster`, in order; stops
    /// at an item to retry later, with why. An item older than `expiry`
    /// is bounced instead (with `last_error`, the queue's last failure).
    async fn deliver_batch(
        self: &Rc<Self>,
        cluster: [u8; 32],
        expiry: Duration,
        last_error: Option<&str>,
    ) -> Result<(), String> {
        let items = self
            .rt
            .outbox_for(cluster, capstan_actors::federation::OUTBOX_BATCH)
            .await
            .map_err(|e| {
                tracing::warn!("cannot read the outbox: {e}");
                format!("cannot read the outbox: {e}")
            })?;
        for item in items {
            let age = Duration::from_micros(
                capstan_actors::federation::now_us().saturating_sub(item.created_us),
            );
            let outcome = match capstan_actors::rules::outbox::verdict(age, expiry, last_error) {
                Verdict::Deliver => self.send_item(&item).await,
                Verdict::Expired(why) => Err(NetError::Refused(why)),
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = self.rt.outbox_done(&item).await {
                        tracing::warn!("cannot remove a delivered outbox item: {e}");
                        return Err(format!("cannot remove a delivered outbox item: {e}"));
                    }
                }
                Err(NetError::Refused(why)) => {
                    tracing::info!(item = %item.id, "outbox item bounced: {why}");
                    match self.rt.outbox_bounce(&item, &why).await {
                        Ok(()) => {}
                        // The store failed: try again later.
                        Err(
                            e @ (capstan_actors::Error::Store(_)
                            | capstan_actors::Error::Unavailable(_)
                            | capstan_actors::Error::Fenced(_)
                            | capstan_actors::Error::Unreachable(_)
                            | capstan_actors::Error::InboxSlotTaken { .. }),
                        ) => {
                            tracing::warn!("cannot bounce an outbox item: {e}");
                            return Err(format!("cannot bounce an outbox item: {e}"));
                        }
                        // Its sender cannot be told (its record is gone or
                        // damaged): drop it rather than block the queue.
                        Err(e) => {
                            tracing::error!(item = %item.id, "dropping an outbox item whose sender cannot be told it was refused ({why}): {e}");
                            if let Err(e) = self.rt.outbox_done(&item).await {
                                return Err(format!("cannot remove an outbox item: {e}"));
                            }
                        }
                    }
                }
                Err(NetError::Transient(why)) => {
                    tracing::debug!(item = %item.id, "outbox delivery postponed: {why}");
                    return Err(why);
                }
            }
        }
        Ok(())
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

/// The transport limits of every connection.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(
            Duration::from_secs(10)
                .try_into()
                .expect("10 s is a valid idle timeout"),
        ));
    t
}

/// Why a node listening on every interface needs `--advertise`.
pub fn wildcard_message(listen: SocketAddr) -> String {
    format!(
        "listening on {listen} (every interface), the node would put {listen} in its locators, invitations and cluster record, which no other machine can dial: add --advertise HOST[:PORT], the address other nodes should dial (an address or DNS name of this machine; without :PORT, the port it listens on)"
    )
}

/// The socket of a node that only dials: dual-stack where the system
/// allows it (so it reaches IPv4 and IPv6 addresses), else IPv4.
fn dial_socket() -> std::io::Result<std::net::UdpSocket> {
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

fn socket2_buffers(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    let s = socket2::SockRef::from(socket);
    s.set_recv_buffer_size(UDP_BUFFER)?;
    s.set_send_buffer_size(UDP_BUFFER)?;
    Ok(())
}

/// One open connection in a count, for as long as it is held.
struct Counted<'a>(&'a Cell<usize>);

impl<'a> Counted<'a> {
    fn new(c: &'a Cell<usize>) -> Self {
        c.set(c.get() + 1);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

type Known = RefCell<HashMap<[u8; 32], std::time::Instant>>;

/// Whether `peer` is a known cluster (see [`KNOWN_FOR`]).
fn is_known(known: &Known, peer: &[u8; 32]) -> bool {
    known
        .borrow()
        .get(peer)
        .is_some_and(|until| *until > std::time::Instant::now())
}

/// Marks `peer` known for [`KNOWN_FOR`]; past [`MAX_KNOWN`] clusters the
/// lapsed ones go, then the one known the shortest time.
fn mark_known(known: &Known, peer: [u8; 32]) {
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
fn peer_cluster(conn: &quinn::Connection) -> anyhow::Result<[u8; 32]> {
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

/// The bootstrap object of an incoming connection.
struct GatewayServer {
    rt: Runtime,
    conn: quinn::Connection,
    failures: Cell<u32>,
    caller: Caller,
    /// The node's known clusters: a caller that restores a locator joins.
    known: Rc<Known>,
}

impl gateway::Server for GatewayServer {
    async fn restore(
        self: Rc<Self>,
        params: gateway::RestoreParams,
        mut results: gateway::RestoreResults,
    ) -> Result<(), CapError> {
        let swiss = params.get()?.get_swiss()?;
        let swiss: [u8; 32] = swiss
            .try_into()
            .map_err(|_| failed("a swiss number is 32 bytes"))?;
        let hash = capstan_actors::remote::swiss_hash(&swiss);
        match self.rt.locator_record(hash).await {
            Ok(Some(rec)) => {
                if self.caller.cluster != self.caller.own {
                    mark_known(&self.known, self.caller.cluster);
                }
                results
                    .get()
                    .set_object(capnp_rpc::new_client(ObjectServer {
                        rt: self.rt.clone(),
                        hash,
                        target: rec.target,
                        peer: rec.peer,
                        caller: self.caller,
                    }));
                Ok(())
            }
            Ok(None) => {
                let n = self.failures.get() + 1;
                self.failures.set(n);
                tracing::info!(remote = %self.conn.remote_address(), failures = n, "restore of an unknown or revoked locator");
                tokio::time::sleep(RESTORE_FAILURE_DELAY).await;
                if n >= MAX_RESTORE_FAILURES {
                    self.conn.close(1u32.into(), b"too many failed restores");
                }
                Err(failed(
                    "unknown or revoked locator: it was cancelled, or never issued by this cluster",
                ))
            }
            Err(e) => Err(wire_error(e)),
        }
    }

    async fn ping(
        self: Rc<Self>,
        params: gateway::PingParams,
        mut results: gateway::PingResults,
    ) -> Result<(), CapError> {
        let p = params.get()?.get_payload()?;
        if p.len() > MAX_PING {
            return Err(failed(format!("ping payload over {MAX_PING} bytes")));
        }
        results.get().set_payload(p);
        Ok(())
    }

    async fn member(
        self: Rc<Self>,
        _: gateway::MemberParams,
        mut results: gateway::MemberResults,
    ) -> Result<(), CapError> {
        // Only a node presenting this cluster's key is a member; another
        // cluster's node (or a lone node) gets nothing.
        if self.caller.cluster != self.caller.own || self.rt.membership().is_none() {
            return Err(failed(
                "the member interface is only for nodes of this cluster",
            ));
        }
        results
            .get()
            .set_member(capnp_rpc::new_client(members::MemberServer {
                rt: self.rt.clone(),
            }));
        Ok(())
    }
}

/// A capability restored from a locator; every call re-checks the locator.
struct ObjectServer {
    rt: Runtime,
    hash: [u8; 32],
    target: capstan_proto::FormulaId,
    /// Who this handle was given to (invite/accept), if anyone.
    peer: Option<capstan_proto::FormulaId>,
    caller: Caller,
}

impl ObjectServer {
    async fn check(&self) -> Result<(), CapError> {
        match self.rt.locator_record(self.hash).await {
            Ok(Some(r)) if r.target == self.target && r.accepted.is_none() => Ok(()),
            Ok(Some(r)) if r.accepted.is_some() => Err(failed(
                "revoked: this invitation was accepted already (it works once)",
            )),
            Ok(_) => Err(failed(
                "revoked: the locator of this capability was cancelled",
            )),
            Err(e) => Err(wire_error(e)),
        }
    }
}

impl object::Server for ObjectServer {
    async fn show(
        self: Rc<Self>,
        _: object::ShowParams,
        mut results: object::ShowResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let s = self
            .rt
            .show_formula(self.target)
            .await
            .map_err(wire_error)?;
        let mut r = results.get();
        r.set_type(s.kind.as_str());
        r.set_detail(s.detail.as_str());
        Ok(())
    }

    async fn cat(
        self: Rc<Self>,
        _: object::CatParams,
        mut results: object::CatResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let (kind, data) = self.rt.cat_formula(self.target).await.map_err(wire_error)?;
        let mut r = results.get();
        r.set_kind(match kind {
            ValueKind::Text => capstan_proto::net_capnp::ValueKind::Text,
            ValueKind::Json => capstan_proto::net_capnp::ValueKind::Json,
            ValueKind::Bytes => capstan_proto::net_capnp::ValueKind::Bytes,
        });
        r.set_data(&data);
        Ok(())
    }

    async fn deliver(
        self: Rc<Self>,
        params: object::DeliverParams,
        _: object::DeliverResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let p = params.get()?;
        let item = item_id(p.get_id()?)?;
        let env = capstan_actors::Envelope::read(p.get_envelope()?, false)
            .map_err(|e| failed(format!("bad envelope: {e}")))?;
        let Some(peer) = self.peer else {
            return Err(failed(
                "this capability takes no mail: only handles made by `capstan invite`/`accept` do",
            ));
        };
        self.rt
            .receive_deliver(self.target, peer, item, env, self.caller)
            .await
            .map_err(wire_error)
    }

    async fn settle(
        self: Rc<Self>,
        params: object::SettleParams,
        _: object::SettleResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let p = params.get()?;
        let item = item_id(p.get_id()?)?;
        let s = capstan_actors::Settlement::read(p.get_settlement()?, false)
            .map_err(|e| failed(format!("bad settlement: {e}")))?;
        // Authority is checked there: only the locator given to the
        // request's recipient settles (not any locator of the promise).
        self.rt
            .receive_settle(self.hash, item, s, self.caller)
            .await
            .map(drop)
            .map_err(wire_error)
    }

    async fn accept(
        self: Rc<Self>,
        params: object::AcceptParams,
        mut results: object::AcceptResults,
    ) -> Result<(), CapError> {
        // (The locator is checked there: an accepted invitation still
        // answers its redeemer's retry.)
        let p = params.get()?;
        let handle = capstan_actors::RemoteRec::read_wire(p.get_handle()?)
            .map_err(|e| failed(format!("bad handle: {e}")))?;
        // A caller without a request id cannot retry (an older node).
        let req = match p.get_req_id()? {
            [] => capstan_proto::RequestId::random(),
            r => item_id(r)?,
        };
        let swiss = self
            .rt
            .accept_invitation(self.target, self.hash, self.caller, req, handle)
            .await
            .map_err(wire_error)?;
        results.get().set_swiss(&swiss);
        Ok(())
    }
}

fn item_id(d: &[u8]) -> Result<capstan_proto::RequestId, CapError> {
    capstan_proto::RequestId::from_slice(d).map_err(|_| failed("an item id is 16 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_actors::Error;

    #[test]
    fn transient_failures_cross_the_wire_as_overloaded_refusals_as_failed() {
        let store = capstan_cluster::StoreError::Conflict;
        for e in [
            Error::Store(store),
            Error::Fenced("node n1 does not hold its cluster lease right now".into()),
            Error::Unavailable("the node is shutting down".into()),
            Error::Unreachable("no answer".into()),
            Error::Corrupt("a record".into()),
        ] {
            assert_eq!(
                wire_error(e.clone()).kind,
                capnp::ErrorKind::Overloaded,
                "{e}"
            );
        }
        for e in [
            Error::Invalid("revoked: the locator of this capability was cancelled".into()),
            Error::UnknownName("x".into()),
            Error::TooLarge {
                what: "message text".into(),
                len: 2,
                max: 1,
            },
            Error::Store(capstan_cluster::StoreError::ValueTooLarge { len: 2, max: 1 }),
        ] {
            assert_eq!(wire_error(e.clone()).kind, capnp::ErrorKind::Failed, "{e}");
        }
    }
}
