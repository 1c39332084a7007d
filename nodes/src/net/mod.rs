//! Node-to-node networking: Cap'n Proto RPC over QUIC (quinn + rustls).
//!
//! - [`identity`]: the node and cluster keys and certificates.
//! - [`tls`]: TLS 1.3 with trust by cluster id.
//! - [`members`]: links between the nodes of one cluster.
//! - [`relay`]: relayed commits: a node's busy commits go to one member,
//!   which merges the cluster's commits into fewer store requests.
//! - [`advertise`]: the addresses a node puts in locators and member records.
//! - [`traces`]: a traced operation's spans, gathered from every member.
//! - this module: [`Net`], the QUIC endpoint of a node: its bounds, `bind`
//!   and the locators it issues. It listens (with `--listen`), serves a
//!   [`Gateway`](capstan_proto::net_capnp::gateway) on every incoming
//!   connection, and dials other clusters on demand for the remote formulas
//!   an agent uses, keeping one connection per cluster and re-dialling
//!   after failures. Its parts:
//!   - `endpoint`: accepting and serving connections, the transport's
//!     limits, sockets, and which clusters are known;
//!   - `peers`: one connection per other cluster, dialled on demand, and
//!     the calls made on remote objects over it;
//!   - `serving`: the gateway and the objects served to other clusters;
//!   - `outbox`: delivering mail owed to other clusters (the shell around
//!     [`capstan_actors::rules::outbox`]).
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
pub mod relay;
pub mod tls;
pub mod traces;

mod endpoint;
mod outbox;
mod peers;
mod serving;

use endpoint::*;
use peers::*;
use serving::*;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use capnp::Error as CapError;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side};
use capstan_actors::{Caller, OutOp, OutboxItem, RemoteRec, Runtime, ValueKind};
use capstan_proto::Locator;
use capstan_proto::locator::encode32;
use capstan_proto::net_capnp::{gateway, object};

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

/// Bytes buffered on each side of an RPC stream (control socket and node
/// links): a message larger than this passes through unbuffered.
const STREAM_BUFFER: usize = 16 * 1024;

/// The two-party network of one RPC stream, read and written through
/// buffers. capnp-futures reads a message's segment table and its segments
/// with separate reads and writes them with separate writes, then flushes:
/// unbuffered, each was its own system call on the control socket (2-3 per
/// message each way: one node's `recvfrom` and `sendto` calls in 5 s of the
/// cluster bench fell from 32,000 to 15,000 buffered), and its own lock and
/// wake-up of the connection on a QUIC stream.
/// Buffered, a message is one write at its flush and one read takes every
/// message that has arrived.
pub fn rpc_network<R, W>(
    reader: R,
    writer: W,
    side: capnp_rpc::rpc_twoparty_capnp::Side,
    options: capnp::message::ReaderOptions,
) -> capnp_rpc::twoparty::VatNetwork<tokio_util::compat::Compat<tokio::io::BufReader<R>>>
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    capnp_rpc::twoparty::VatNetwork::new(
        tokio::io::BufReader::with_capacity(STREAM_BUFFER, reader).compat(),
        tokio::io::BufWriter::with_capacity(STREAM_BUFFER, writer).compat_write(),
        side,
        options,
    )
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
}

/// Why a node listening on every interface needs `--advertise`.
pub fn wildcard_message(listen: SocketAddr) -> String {
    format!(
        "listening on {listen} (every interface), the node would put {listen} in its locators, invitations and cluster record, which no other machine can dial: add --advertise HOST[:PORT], the address other nodes should dial (an address or DNS name of this machine; without :PORT, the port it listens on)"
    )
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
