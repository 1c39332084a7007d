//! The client end of the control socket: connect, act as an agent, call with
//! retries.
//!
//! A call that loses its connection before the answer (the daemon was
//! restarted, or crashed and came back) is sent again on a new connection, for
//! up to [`RETRY_FOR`], with the same request id: the node applies a mutating
//! request once and answers a retry with the first answer.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use capnp::{Error as CapError, ErrorKind};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side};
use capstan_proto::api_capnp::{agent, node};
use tokio::net::UnixStream;

use crate::home::{Paths, reader_options};
use crate::output::{Entry, Message};

/// How long a call keeps reconnecting after it lost its connection.
pub const RETRY_FOR: Duration = Duration::from_secs(10);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("no capstan daemon is running for home {0}; start one with `capstan start`")]
    NoDaemon(String),
    /// The connection broke and could not be re-established in time.
    #[error(
        "lost the connection to the capstan daemon for home {0} and it did not come back; start it with `capstan start`, then check whether this command took effect (a change is applied at most once, but its answer was lost)"
    )]
    Lost(String),
    /// The node answered with an error: of a kind when the node said
    /// which (see [`capstan_actors::ErrorKind`]).
    #[error("{message}")]
    Remote {
        kind: Option<capstan_actors::ErrorKind>,
        message: String,
    },
}

impl ClientError {
    /// The process exit status for this error (`nodes/CLI.md`): 1 bad
    /// input or any other failure, 2 no daemon, 3 not found, 4 try again
    /// later.
    pub fn exit_code(&self) -> i32 {
        use capstan_actors::ErrorKind as K;
        match self {
            ClientError::NoDaemon(_) | ClientError::Lost(_) => 2,
            ClientError::Remote { kind, .. } => match kind {
                Some(K::NotFound) => 3,
                Some(K::Retry | K::Unreachable) => 4,
                _ => 1,
            },
        }
    }

    /// The error's kind as `--json` names it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ClientError::NoDaemon(_) => "no_daemon",
            ClientError::Lost(_) => "lost",
            ClientError::Remote { kind, .. } => kind.map_or("failed", |k| k.as_str()),
        }
    }
}

/// The error a node answered with, with its kind when it gave one.
pub fn remote_error(e: &CapError) -> ClientError {
    let (kind, message) = capstan_actors::error::from_wire(e);
    ClientError::Remote { kind, message }
}

/// Whether `e` is an error a Capstan node raised with a kind (rather
/// than the transport's: a `Disconnected` of that sort is an answer, not a
/// lost connection).
fn has_kind(e: &CapError) -> bool {
    capstan_actors::error::from_wire(e).0.is_some()
}

/// Connects to the daemon's socket; the RPC system runs on the local task set.
pub async fn connect(socket: &Path) -> std::io::Result<node::Client> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, writer) = stream.into_split();
    let network = crate::net::rpc_network(reader, writer, Side::Client, reader_options());
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let node: node::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(async move {
        let _ = rpc.await;
    });
    Ok(node)
}

/// A node's answer to `ping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub version: String,
    pub pid: u32,
    pub home: String,
    pub store: String,
    pub root_host: Vec<u8>,
    pub started_ms: u64,
    pub incarnations: u32,
    pub uptime_ms: u64,
    pub connections: u32,
    pub rss_bytes: u64,
    pub store_cache_bytes: u64,
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, CapError> {
    Ok(r?.to_string()?)
}

async fn connect_node(paths: &Paths) -> Result<node::Client, ClientError> {
    connect(&paths.socket)
        .await
        .map_err(|_| ClientError::NoDaemon(paths.home_str()))
}

fn classify(paths: &Paths, e: CapError) -> ClientError {
    if e.kind == ErrorKind::Disconnected && !has_kind(&e) {
        ClientError::NoDaemon(paths.home_str())
    } else {
        remote_error(&e)
    }
}

/// `Node.ping` (no retries: used to probe).
pub async fn ping(paths: &Paths) -> Result<NodeInfo, ClientError> {
    let node = connect_node(paths).await?;
    let answer = async {
        let r = node.ping_request().send().promise.await?;
        let i = r.get()?.get_info()?;
        Ok::<_, CapError>(NodeInfo {
            version: text(i.get_version())?,
            pid: i.get_pid(),
            home: text(i.get_home())?,
            store: text(i.get_store())?,
            root_host: i.get_root_host()?.to_vec(),
            started_ms: i.get_started_ms(),
            incarnations: i.get_incarnations(),
            uptime_ms: i.get_uptime_ms(),
            connections: i.get_connections(),
            rss_bytes: i.get_rss_bytes(),
            store_cache_bytes: i.get_store_cache_bytes(),
        })
    };
    answer.await.map_err(|e| classify(paths, e))
}

/// One page of `Node.usage`: (kind, keys, bytes) per kind, and where the
/// next page starts (`None`: the scan is done). No retries (a read: `du`
/// can be run again).
pub async fn usage_page(
    paths: &Paths,
    start: &[u8],
    max_keys: u32,
) -> Result<(Vec<(String, u64, u64)>, Option<Vec<u8>>), ClientError> {
    let node = connect_node(paths).await?;
    let answer = async {
        let mut req = node.usage_request();
        req.get().set_start(start);
        req.get().set_max_keys(max_keys);
        let r = req.send().promise.await?;
        let r = r.get()?;
        let mut kinds = Vec::new();
        for k in r.get_kinds()?.iter() {
            kinds.push((text(k.get_kind())?, k.get_keys(), k.get_bytes()));
        }
        let next = if r.get_done() {
            None
        } else {
            Some(r.get_next()?.to_vec())
        };
        Ok::<_, CapError>((kinds, next))
    };
    answer.await.map_err(|e| classify(paths, e))
}

/// `Node.gc`: one garbage-collection pass; the report's fields by name.
/// No retries (a pass can be run again).
pub async fn gc(
    paths: &Paths,
    keep_answers_ms: u64,
) -> Result<Vec<(&'static str, serde_json::Value)>, ClientError> {
    let node = connect_node(paths).await?;
    let answer = async {
        let mut req = node.gc_request();
        req.get().set_keep_answers_ms(keep_answers_ms);
        let r = req.send().promise.await?;
        let r = r.get()?.get_report()?;
        Ok::<_, CapError>(vec![
            ("formulas", r.get_formulas().into()),
            ("values", r.get_values().into()),
            ("keys", r.get_keys().into()),
            ("bytes", r.get_bytes().into()),
            ("answers", r.get_answers().into()),
            ("kept", r.get_kept().into()),
            ("scanned", r.get_scanned().into()),
            ("reachable", r.get_reachable().into()),
            ("candidates", r.get_candidates().into()),
            ("interrupted", r.get_interrupted().into()),
            ("elapsed_ms", r.get_elapsed_ms().into()),
        ])
    };
    answer.await.map_err(|e| classify(paths, e))
}

/// `Node.backup`: the node writes one snapshot of its store to `path`
/// (absolute); (pairs, bytes, version). No retries: a backup can be taken
/// again.
pub async fn backup(paths: &Paths, path: &std::path::Path) -> Result<(u64, u64, u64), ClientError> {
    let node = connect_node(paths).await?;
    let answer = async {
        let mut req = node.backup_request();
        req.get().set_path(path.to_string_lossy().as_ref());
        let r = req.send().promise.await?;
        let r = r.get()?;
        Ok::<_, CapError>((r.get_pairs(), r.get_bytes(), r.get_version()))
    };
    answer.await.map_err(|e| classify(paths, e))
}

/// `Node.stop`; a connection that drops before the answer counts as stopped.
pub async fn stop(paths: &Paths) -> Result<(), ClientError> {
    let node = connect_node(paths).await?;
    match node.stop_request().send().promise.await {
        Ok(_) => Ok(()),
        Err(e) if e.kind == ErrorKind::Disconnected && !has_kind(&e) => Ok(()),
        Err(e) => Err(remote_error(&e)),
    }
}

/// A client acting as one agent.
#[derive(Debug, Clone)]
pub struct Client {
    pub paths: Paths,
    pub as_agent: Option<String>,
}

impl Client {
    pub fn new(paths: Paths, as_agent: Option<String>) -> Self {
        Client { paths, as_agent }
    }

    /// The acting agent on a connection, pipelined (no round trip).
    fn agent(&self, node: &node::Client) -> agent::Client {
        let host = node.host_request().send().pipeline.get_agent();
        match &self.as_agent {
            None => host,
            Some(path) => {
                let mut r = host.agent_request();
                r.get().set_path(path.as_str());
                r.send().pipeline.get_agent()
            }
        }
    }

    /// Calls `f` on the acting agent, reconnecting and calling again (same
    /// request ids: `f` must reuse them) while the connection breaks.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(agent::Client) -> Fut,
        Fut: Future<Output = Result<T, CapError>>,
    {
        let mut retry = Retry::new();
        let mut connected = false;
        loop {
            let node = match connect_node(&self.paths).await {
                Ok(n) => n,
                Err(e) if !connected => return Err(e),
                Err(_) => {
                    retry.wait(&self.paths).await?;
                    continue;
                }
            };
            connected = true;
            match f(self.agent(&node)).await {
                Ok(v) => return Ok(v),
                Err(e) if e.kind == ErrorKind::Disconnected && !has_kind(&e) => {
                    tracing::debug!("connection lost ({e}); retrying");
                    retry.wait(&self.paths).await?;
                }
                Err(e) => return Err(remote_error(&e)),
            }
        }
    }

    /// Streams messages numbered >= `after` into `sink` until the stream ends.
    /// Reconnects when the connection breaks; `next` says where to go on from.
    pub async fn follow(
        &self,
        sink: capstan_proto::api_capnp::message_sink::Client,
        next: impl Fn() -> u64,
    ) -> Result<(), ClientError> {
        let mut retry = Retry::new();
        let mut connected = false;
        loop {
            let node = match connect_node(&self.paths).await {
                Ok(n) => n,
                Err(e) if !connected => return Err(e),
                Err(_) => {
                    retry.wait(&self.paths).await?;
                    continue;
                }
            };
            connected = true;
            let mut req = self.agent(&node).follow_request();
            req.get().set_after(next());
            req.get().set_sink(sink.clone());
            let started = Instant::now();
            match req.send().promise.await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind == ErrorKind::Disconnected && !has_kind(&e) => {
                    tracing::debug!("follow interrupted ({e}); following again");
                    if started.elapsed() > Duration::from_secs(1) {
                        retry = Retry::new();
                    }
                    retry.wait(&self.paths).await?;
                }
                Err(e) => return Err(remote_error(&e)),
            }
        }
    }
}

/// How long a call keeps waiting once no daemon process exists at all.
const GONE_FOR: Duration = Duration::from_secs(2);

/// Bounded reconnection: exponential backoff for up to [`RETRY_FOR`], or
/// [`GONE_FOR`] once the daemon's process is gone (nobody is restarting it).
struct Retry {
    deadline: Instant,
    delay: Duration,
    gone_since: Option<Instant>,
}

impl Retry {
    fn new() -> Self {
        Retry {
            deadline: Instant::now() + RETRY_FOR,
            delay: Duration::from_millis(20),
            gone_since: None,
        }
    }

    async fn wait(&mut self, paths: &Paths) -> Result<(), ClientError> {
        let now = Instant::now();
        if daemon_process_gone(paths) {
            let since = *self.gone_since.get_or_insert(now);
            if now.duration_since(since) >= GONE_FOR {
                return Err(ClientError::Lost(paths.home_str()));
            }
        } else {
            self.gone_since = None;
        }
        if now >= self.deadline {
            return Err(ClientError::Lost(paths.home_str()));
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// True when the pid in the home's lock file names no live process. Probes
/// without taking the lock, so a daemon starting at this moment is never
/// disturbed.
fn daemon_process_gone(paths: &Paths) -> bool {
    let Ok(pid) = std::fs::read_to_string(&paths.lock) else {
        return true;
    };
    match pid.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => !Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

/// Decodes a directory entry.
pub fn read_entry(e: capstan_proto::api_capnp::entry_info::Reader<'_>) -> Result<Entry, CapError> {
    Ok(Entry {
        name: text(e.get_name())?,
        id: e.get_id()?.to_vec(),
        kind: text(e.get_type())?,
        detail: text(e.get_detail())?,
    })
}

/// Decodes a message.
pub fn read_message(
    m: capstan_proto::api_capnp::message_view::Reader<'_>,
) -> Result<Message, CapError> {
    let reply_to = m.get_reply_to()?;
    let mut strings = Vec::new();
    for s in m.get_strings()?.iter() {
        strings.push(text(s)?);
    }
    let mut names = Vec::new();
    for s in m.get_names()?.iter() {
        names.push(text(s)?);
    }
    Ok(Message {
        number: m.get_number(),
        message_id: m.get_message_id()?.to_vec(),
        reply_to: (!reply_to.is_empty()).then(|| reply_to.to_vec()),
        from: text(m.get_from())?,
        to: text(m.get_to())?,
        date_ms: m.get_date_ms(),
        kind: text(m.get_type())?,
        strings,
        names,
        description: text(m.get_description())?,
        state: text(m.get_state())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_cross_the_socket_and_pick_the_exit_status() {
        use capstan_actors::{Error, ErrorKind};
        let cases = [
            (Error::UnknownName("x".into()), ErrorKind::NotFound, 3),
            (Error::Invalid("bad".into()), ErrorKind::Invalid, 1),
            (Error::NameTaken("x".into()), ErrorKind::Refused, 1),
            (Error::Unavailable("stopping".into()), ErrorKind::Retry, 4),
            (Error::Unreachable("n2".into()), ErrorKind::Unreachable, 4),
            (Error::Corrupt("m".into()), ErrorKind::Damaged, 1),
        ];
        for (e, kind, code) in cases {
            let wire = e.to_wire();
            // as the transport delivers it to the client
            let wire = CapError {
                kind: wire.kind,
                extra: format!("remote exception: {}", wire.extra),
            };
            let c = remote_error(&wire);
            assert_eq!(c.to_string(), e.to_string(), "the message is unchanged");
            assert_eq!(c.kind_name(), kind.as_str());
            assert_eq!(c.exit_code(), code, "{e}");
            assert!(has_kind(&wire));
        }
        // A node that did not answer is an answer too, not a lost socket.
        let wire = Error::Unreachable("n2".into()).to_wire();
        assert_eq!(wire.kind, ErrorKind::Unreachable.wire());
        assert!(has_kind(&wire));
        // Untagged: the transport's own, or an older node's.
        let plain = CapError::failed("remote exception: boom".into());
        assert!(!has_kind(&plain));
        assert_eq!(remote_error(&plain).exit_code(), 1);
        assert_eq!(remote_error(&plain).kind_name(), "failed");
        // A message that merely looks like a tag keeps its text.
        let odd = CapError::failed("capstan:nonsense: x".into());
        assert_eq!(
            capstan_actors::error::from_wire(&odd).1,
            "capstan:nonsense: x"
        );
    }
}
