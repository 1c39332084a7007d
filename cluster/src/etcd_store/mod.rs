//! The replicated backend: an etcd (v3 API, 3.4+) cluster.
//!
//! # Spec
//!
//! `etcd://HOST:PORT[,HOST:PORT…][/PREFIX][?max-request-bytes=N&max-txn-ops=N&commit-snapshot-age-ms=N&history-ms=N]`, e.g.
//! `etcd://127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379/capstan`
//! (what `scripts/etcd-cluster start` prints, plus a prefix). `PREFIX` defaults
//! to `capstan`; it may contain `A-Z a-z 0-9 . _ - /`. Stores with different
//! prefixes are independent (the tests give each check a fresh one); prefixes
//! must not nest (`a` and `a/d/x`). `max-request-bytes` is the largest request
//! the cluster accepts (etcd's `--max-request-bytes`, default 1.5 MiB;
//! `scripts/etcd-cluster` starts members with 16 MiB, enough for a 10 MB
//! transaction). `commit-snapshot-age-ms` (default 250, 0 to 60000) is how
//! old a revision this client saw may be to start a transaction that will
//! commit ([`Store::snapshot_for_commit`]): older, or 0, and it reads the
//! latest revision first. `history-ms` (default 600000, ten minutes; 0 to
//! a week) is how long etcd's history is kept before the store compacts it
//! ([`compact`]); 0: the store never compacts (the operator does).
//!
//! # Layout
//!
//! - `PREFIX/d/KEY`: the value of user key `KEY` (raw bytes, no header);
//! - `PREFIX/c/ID`: commit markers (below);
//! - `PREFIX/g`: the deletion guard (below);
//! - `PREFIX/k`: when and to which revision the history was last compacted
//!   ([`compact`]);
//! - `PREFIX/m`: never written; read to learn the current revision.
//!
//! # Versions and snapshots
//!
//! A [`Version`] is an etcd revision. A snapshot is the current revision `R`
//! (one linearizable read); its reads are linearizable range reads at revision
//! `R`, paged ([`PAGE`] pairs, later pages up to [`MAX_PAGE`]) so that no
//! response approaches the gRPC message limit. A revision etcd has
//! compacted away fails the read with
//! [`StoreError::Conflict`], which [`crate::Db::transact`] retries on a new
//! snapshot (FoundationDB's `transaction_too_old`).
//!
//! The store compacts revisions older than its history ([`compact`]; etcd
//! itself only when started with `--auto-compaction-*`): the history (or
//! etcd's retention, if shorter) bounds how long a transaction may take.
//!
//! # Serializable commits
//!
//! A commit is one etcd Txn. It must apply only if nothing in the read-conflict
//! ranges changed after `R`. A compare `mod_revision(range) < R + 1` catches
//! keys created or modified after `R`, but not keys deleted after `R` (a
//! deleted key is not in the range any more). So the committer first reads, at
//! revision `R`, the keys that existed in each (merged) read-conflict range and
//! their mod revisions (keys only), and the Txn compares:
//!
//! - for a single-key range `[k, k\0)`: `mod_revision(k) == m`, where `m` is
//!   its mod revision at `R` (0 when absent): any later put or delete changes it;
//! - for a wider range: `mod_revision(range) < R + 1` (nothing created or
//!   modified after `R`) **and** `mod_revision(k) == m` for every key `k` that
//!   existed in it at `R` (nothing deleted: a deleted key compares as 0, a
//!   deleted-then-recreated one has a newer mod revision).
//!
//! The mod revisions of keys read by snapshot gets are remembered (bounded,
//! keyed by revision and key: a fact about revision `R` never changes), so a
//! transaction of point reads needs no extra read at commit.
//!
//! Every change after `R` to a key of a read range is a create, a modify or a
//! delete of a key that either existed at `R` (caught by its equality compare)
//! or did not (then it exists at commit time with a newer mod revision, or was
//! created and deleted again, which leaves the state the transaction read: no
//! conflict needed). Etcd evaluates all compares and applies the writes
//! atomically in one raft entry, so the check and the writes are one step:
//! the commit is serializable at its commit revision.
//!
//! ## More than 128 compares
//!
//! Etcd takes at most `--max-txn-ops` (128 by default) compares, and as many
//! operations, in one Txn, and nested Txns share that budget along their path
//! (etcd 3.4 checks a nested Txn against what its parents left), so nesting
//! does not raise it. When the precise compares above would exceed it (one
//! compare goes to the commit marker), the read set is coarsened instead, and
//! stays correct:
//!
//! - every commit that deletes anything also puts the **deletion guard**
//!   `PREFIX/g` (one more operation);
//! - a coarse read set compares `mod_revision(PREFIX/g) < R + 1` (no deletion
//!   at all since `R`) plus one range compare `mod_revision(range) < R + 1` per
//!   group of consecutive merged read ranges (each group replaced by its hull:
//!   a superset of what was read), at most 127 in all.
//!
//! Creations and modifications in the read set are caught by the range
//! compares, deletions by the guard. The price is false conflicts: a
//! transaction with a coarse read set conflicts with any deletion committed
//! after its snapshot, and with writes in the gaps between its ranges; it is
//! retried by [`crate::Db::transact`] like any conflict. Transactions with
//! small read sets (the common case: point reads and short ranges) never look
//! at the guard, so the guard's writes do not make them conflict.
//!
//! Writes are not split: a commit needing more than `max-txn-ops` operations
//! (its puts and deletes, the marker, the guard) fails with
//! [`StoreError::TooManyWrites`] before anything is sent. The spec's
//! `max-txn-ops=N` option tells the client about a cluster started with a
//! larger `--max-txn-ops`.
//!
//! ## Request size
//!
//! A request larger than `max-request-bytes` (estimated before sending:
//! keys, values and a per-operation overhead) fails with
//! [`StoreError::TransactionTooLarge`] and nothing is sent; so does a request
//! the cluster itself refuses as too large. Large values go through
//! [`crate::blob`] (100 KB chunks), which keeps each value small but not the
//! transaction: a 3 MiB blob needs a cluster started with a larger
//! `--max-request-bytes` (as `scripts/etcd-cluster` does) and the same figure in
//! the spec.
//!
//! # Endpoints
//!
//! One gRPC connection per endpoint ([`crate::etcd_rpc`]; a balanced channel does not
//! move off a dead endpoint). Requests go to the current endpoint; a
//! connection failure, no answer within [`REQUEST_TIMEOUT`] (more for large
//! commits) or a member without leader (requests require one, so such a member
//! answers at once) moves the current endpoint to the next one and retries, at
//! most [`MAX_ATTEMPTS`] times within [`RETRY_BUDGET`], with backoff. When every
//! attempt failed the error names the endpoints and says how to start a
//! cluster. A request forwarded to a leader that is then killed gets no answer:
//! the timeout bounds that stall (measured: 2.9–3.1 s without any commit after
//! `kill -9` of the leader, election included, on a 2-core machine at load ~12).
//!
//! # "Maybe committed"
//!
//! Each commit carries a unique marker key `PREFIX/c/ID`: the Txn's first
//! compare is `create_revision(marker) == 0` and its innermost success branch
//! puts the marker (value `c`, attached to a lease of [`MARKER_TTL`] renewed by
//! granting a new lease every [`LEASE_ROTATION`], so markers delete themselves).
//! When a Txn fails without a definite answer (connection dropped, timeout,
//! leader change), the committer resolves it on the next endpoint with a Txn
//! `if create_revision(marker) == 0 then put marker = "a" (aborted, no lease) else get marker`:
//! if the marker was absent, the abort marker now fences the lost Txn (should it
//! still reach the leader, its first compare fails) and the commit reports
//! [`StoreError::Conflict`] (not applied: `Db::transact` runs it again); if the
//! marker says `c`, the commit was applied, at the marker's revision. Nothing
//! is ever applied twice. Resolution is itself idempotent and retried on the
//! other endpoints; only if it cannot finish within [`RESOLVE_DEADLINE`] of the
//! first send (so before the marker's lease could expire) is the outcome
//! reported as [`StoreError::MaybeCommitted`]. Abort markers are rare (one per
//! ambiguous failure) and a few bytes each; they are kept.

mod batch;
mod cache;
pub mod compact;
mod hoist;
mod reads;
mod relay;
pub use relay::RELAY_PAUSE;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::etcd_rpc::{
    Compare, ConnectOptions, EtcdClient, RangeRequest, RangeResponse, RequestOp, Response,
    ResponseHeader, RpcError, TlsFiles, TxnRequest, compare_result, sort_order, sort_target,
};

use crate::store::{
    CommitRequest, KeyValue, Mutation, RangeOption, ReadFacts, Snapshot, Store, StoreError,
    Version, key_after,
};

/// Default key prefix of a store.
pub const DEFAULT_PREFIX: &str = "capstan";
/// Etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// Etcd's default `--max-txn-ops`: compares, and operations per branch, of one Txn.
pub const MAX_TXN_OPS: usize = 128;
/// Pairs asked for by the first page of a range read.
pub const PAGE: usize = 64;
/// Most pairs asked for by a later page of the same read: each page asks
/// four times as many as the one before, up to this. Etcd 3.4 walks a
/// range request's whole `[begin, end)` in its index whatever the limit,
/// so a read of N pairs in pages of P costs N²/2P key visits: pages of 64
/// made a listing of 40,000 messages take seconds of etcd CPU. 512 pairs
/// of the largest key and value stay below the decoding limit.
pub const MAX_PAGE: usize = 512;
const _: () = assert!(
    MAX_PAGE * (crate::store::MAX_VALUE_SIZE + crate::store::MAX_KEY_SIZE + 4096)
        < MAX_DECODING_BYTES
);
/// Keys per page when reading the keys of a read-conflict range.
const KEYS_PAGE: usize = 2_000;
/// How long a client still counts as relaying after its last relayed
/// group was answered ([`Store::relaying_now`]). Under a steady load a
/// node's groups come and go: between two, its next sends would reserve
/// their own copies' numbers from the owner (a call each batch, and a
/// commit of their own) instead of having the relay fill them in; an idle
/// node (a commit now and then) still sends its lone commits to etcd
/// directly. Measured with `capstan bench --cluster --nodes 6` (sends row,
/// the relay owning the host's inbox): reservation calls per send 0.038
/// without it, 0.015-0.028 with it. (The 0.31 calls per send some runs
/// show come from where the host's inbox lives: owned by another node than
/// the relay, the relay reserves each group's numbers from its owner.)
pub const RECENT_RELAY: Duration = Duration::from_millis(20);
/// Largest gRPC response accepted.
const MAX_DECODING_BYTES: usize = 64 * 1024 * 1024;
/// Attempts of one request across the endpoints before giving up.
pub const MAX_ATTEMPTS: u32 = 24;
/// Time budget of one request across its attempts.
pub const RETRY_BUDGET: Duration = Duration::from_secs(20);
/// Time after which a small request is given up on and retried elsewhere (or,
/// for a commit, resolved): a request forwarded to a leader that died hangs
/// until it times out, so this bounds the stall when the leader is lost.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// How recent the revision of a snapshot for commit must be (see
/// [`Store::snapshot_for_commit`]): older, a commit would more likely
/// conflict than save the round trip. Longer than a node's lease renewal
/// interval (200 ms by default), so that an idle node's renewals chain on
/// each other's revisions (and its cached member record) instead of each
/// reading etcd's latest revision and its record first.
pub const COMMIT_SNAPSHOT_AGE: Duration = Duration::from_millis(250);
/// Extra time allowed per byte of a commit: 1 s per 8 MB.
const TIMEOUT_PER_MB: Duration = Duration::from_millis(125);
/// The transport's own timeout, a backstop.
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of establishing a connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time to live of the lease commit markers are attached to.
pub const MARKER_TTL: Duration = Duration::from_secs(60);
/// A new marker lease is granted when the current one is this old.
pub const LEASE_ROTATION: Duration = Duration::from_secs(20);
/// Resolving an ambiguous commit must finish within this time of its first send
/// (well before a marker written at that send could expire).
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes counted per operation or compare on top of its keys and value.
const OP_OVERHEAD: usize = 32;

const MARKER_COMMITTED: &[u8] = b"c";
const MARKER_ABORTED: &[u8] = b"a";

/// What a spec (`etcd://…`) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints, `HOST:PORT` (or `http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// Key prefix of the store (without trailing `/`).
    pub prefix: String,
    /// Largest request the cluster accepts.
    pub max_request_bytes: usize,
    /// Most compares, and most operations, of one Txn (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Whether the spec named `max-txn-ops`; if not, opening the store asks
    /// the cluster whether it takes [`PROBED_TXN_OPS`] (see
    /// [`EtcdStore::open_config`]).
    pub max_txn_ops_given: bool,
    /// How recent a revision this client saw must be to serve as a snapshot
    /// for commit ([`Store::snapshot_for_commit`]); `commit-snapshot-age-ms`,
    /// default [`COMMIT_SNAPSHOT_AGE`]; 0 reads the latest revision always.
    pub commit_snapshot_age: Duration,
    /// How long etcd's history is kept before the store compacts it
    /// ([`compact`]); `history-ms`, default [`compact::DEFAULT_HISTORY`];
    /// 0: the store never compacts (the operator does).
    pub history: Duration,
    /// TLS to the members (`cacert`, with `cert` and `key` for etcd's
    /// `--client-cert-auth`): none, plain HTTP/2.
    pub tls: Option<EtcdTls>,
    /// An etcd user (`user=NAME&password-file=PATH`), for an etcd with
    /// `auth enable`: the name and the path of the file holding its password.
    pub user: Option<(String, String)>,
}

/// The files of a TLS connection to etcd (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub cacert: String,
    /// This client's certificate and key, if the members require one.
    pub cert: Option<(String, String)>,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…][/PREFIX][?OPTION=N&…]`, options
    /// `max-request-bytes`, `max-txn-ops`, `commit-snapshot-age-ms`,
    /// `history-ms`, and for
    /// TLS `cacert=PATH` with `cert=PATH&key=PATH` (PEM files).
    pub fn parse(spec: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Io(format!(
                "bad etcd store spec {spec:?}: {why}; expected etcd://HOST:PORT[,HOST:PORT…][/PREFIX][?max-request-bytes=N]"
            ))
        };
        let rest = spec
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, p.trim_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(bad("the prefix may only contain A-Z a-z 0-9 . _ - /"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let h = h.trim();
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(bad(&format!("endpoint {h:?} has no :PORT")));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("endpoint {h:?} is not HOST:PORT")));
            }
            endpoints.push(h.to_string());
        }
        let mut max_request_bytes = DEFAULT_MAX_REQUEST_BYTES;
        let mut max_txn_ops = MAX_TXN_OPS;
        let mut max_txn_ops_given = false;
        let mut commit_snapshot_age = COMMIT_SNAPSHOT_AGE;
        let mut history = compact::DEFAULT_HISTORY;
        let (mut cacert, mut cert, mut key) = (None, None, None);
        let (mut user, mut password_file) = (None, None);
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("max-request-bytes", n)) => {
                    max_request_bytes = n
                        .parse()
                        .ok()
                        .filter(|n| *n >= 4096)
                        .ok_or_else(|| bad("max-request-bytes must be a number ≥ 4096"))?;
                }
                Some(("max-txn-ops", n)) => {
                    max_txn_ops = n
                        .parse()
                        .ok()
                        .filter(|n| *n >= 8)
                        .ok_or_else(|| bad("max-txn-ops must be a number ≥ 8"))?;
                    max_txn_ops_given = true;
                }
                Some(("commit-snapshot-age-ms", n)) => {
                    commit_snapshot_age = n
                        .parse()
                        .ok()
                        .filter(|n| *n <= 60_000)
                        .map(Duration::from_millis)
                        .ok_or_else(|| {
                            bad("commit-snapshot-age-ms must be a number from 0 to 60000")
                        })?;
                }
                Some(("history-ms", n)) => {
                    history = n
                        .parse()
                        .ok()
                        .map(Duration::from_millis)
                        .filter(|h| *h <= compact::MAX_HISTORY)
                        .ok_or_else(|| {
                            bad("history-ms must be a number of milliseconds up to a week (604800000); 0 never compacts")
                        })?;
                }
                Some(("cacert", p)) if !p.is_empty() => cacert = Some(p.to_string()),
                Some(("cert", p)) if !p.is_empty() => cert = Some(p.to_string()),
                Some(("key", p)) if !p.is_empty() => key = Some(p.to_string()),
                Some(("user", u)) if !u.is_empty() => user = Some(u.to_string()),
                Some(("password-file", p)) if !p.is_empty() => password_file = Some(p.to_string()),
                _ => return Err(bad(&format!("unknown option {kv:?}"))),
            }
        }
        let tls = match (cacert, cert, key) {
            (None, None, None) => None,
            (Some(cacert), None, None) => Some(EtcdTls { cacert, cert: None }),
            (Some(cacert), Some(c), Some(k)) => Some(EtcdTls {
                cacert,
                cert: Some((c, k)),
            }),
            (None, _, _) => {
                return Err(bad(
                    "cert= and key= need cacert=PATH too (the CA of the members' certificates)",
                ));
            }
            _ => return Err(bad("cert=PATH and key=PATH go together")),
        };
        if tls.is_some() && endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(bad("an http:// endpoint with TLS options"));
        }
        let user = match (user, password_file) {
            (None, None) => None,
            (Some(u), Some(p)) => Some((u, p)),
            _ => return Err(bad("user=NAME and password-file=PATH go together")),
        };
        Ok(EtcdConfig {
            user,
            tls,
            endpoints,
            prefix: prefix.to_string(),
            max_request_bytes,
            max_txn_ops,
            max_txn_ops_given,
            commit_snapshot_age,
            history,
        })
    }

    /// The spec back (`etcd://…/PREFIX`).
    pub fn spec(&self) -> String {
        let mut s = format!("etcd://{}/{}", self.endpoints.join(","), self.prefix);
        let mut options = Vec::new();
        if self.max_request_bytes != DEFAULT_MAX_REQUEST_BYTES {
            options.push(format!("max-request-bytes={}", self.max_request_bytes));
        }
        if self.max_txn_ops_given {
            options.push(format!("max-txn-ops={}", self.max_txn_ops));
        }
        if self.commit_snapshot_age != COMMIT_SNAPSHOT_AGE {
            options.push(format!(
                "commit-snapshot-age-ms={}",
                self.commit_snapshot_age.as_millis()
            ));
        }
        if self.history != compact::DEFAULT_HISTORY {
            options.push(format!("history-ms={}", self.history.as_millis()));
        }
        if let Some(t) = &self.tls {
            options.push(format!("cacert={}", t.cacert));
            if let Some((c, k)) = &t.cert {
                options.push(format!("cert={c}&key={k}"));
            }
        }
        if let Some((u, p)) = &self.user {
            options.push(format!("user={u}&password-file={p}"));
        }
        if !options.is_empty() {
            s.push('?');
            s.push_str(&options.join("&"));
        }
        s
    }
}

/// How a failed etcd request is handled.
#[derive(Debug)]
enum Failure {
    /// The endpoint or the cluster may be unavailable: try the next endpoint.
    /// For a write, the outcome is unknown.
    Transient(String),
    /// A definite answer: retrying elsewhere will not change it.
    Definite(StoreError),
    /// The read revision was compacted.
    Compacted,
    /// The lease of a commit marker expired: grant a new one and retry.
    LeaseNotFound,
    /// Etcd's database is full (alarm NOSPACE; the message says what to
    /// do). Not a definite refusal for a write: the Txn that crossed the
    /// quota is applied and answered so all the same (etcd's quota
    /// applier), while later ones are refused before they are proposed.
    /// Either way it was answered, so its commit marker settles it.
    NoSpace(String),
}

fn classify(e: RpcError, what: &str) -> Failure {
    match e {
        RpcError::Status(s) => {
            let msg = s.message();
            let code = i32::from(s.code());
            if msg.contains("required revision has been compacted") {
                Failure::Compacted
            } else if msg.contains("requested lease not found") {
                Failure::LeaseNotFound
            } else if msg.contains("database space exceeded") {
                // etcd refuses every write once its database reaches its
                // quota (alarm NOSPACE)
                Failure::NoSpace(format!(
                    "etcd refused the {what}: its database is full (alarm NOSPACE: the members' --quota-backend-bytes, 2 GiB unless set, is reached), so it takes no write at all; nothing was written. Free space and clear the alarm: etcdctl compact REVISION (the current one, from etcdctl endpoint status -w json), etcdctl defrag --cluster, etcdctl alarm disarm; or restart the members with a larger --quota-backend-bytes, then etcdctl alarm disarm"
                ))
            } else if msg.contains("request is too large") || code == tonic_code::RESOURCE_EXHAUSTED
            {
                Failure::Definite(StoreError::Io(format!(
                    "etcd refused the {what} as too large ({msg}); split the transaction, or start etcd with a larger --max-request-bytes and give the same figure in the spec (?max-request-bytes=N)"
                )))
            } else if msg.contains("too many operations in txn request")
                || msg.contains("duplicate key given in txn request")
                || code == tonic_code::INVALID_ARGUMENT
                || code == tonic_code::PERMISSION_DENIED
                || code == tonic_code::UNAUTHENTICATED
            {
                let hint = if msg.contains("user name is empty") {
                    "; the etcd cluster has authentication enabled: name a user in the store spec, ?user=NAME&password-file=PATH"
                } else if msg.contains("authentication failed") {
                    "; check user= and the password in password-file= of the store spec"
                } else if code == tonic_code::PERMISSION_DENIED {
                    "; give the etcd user (user= in the store spec) read and write permission on the store's prefix"
                } else {
                    ""
                };
                Failure::Definite(StoreError::Io(format!(
                    "etcd refused the {what}: {msg}{hint}"
                )))
            } else {
                // Unavailable, deadline exceeded, leader changed, no leader, request
                // timed out, future revision on a lagging member, …
                Failure::Transient(format!("{}: {msg}", s.code()))
            }
        }
        RpcError::Transport(e) => Failure::Transient(format!("transport error: {e}")),
        RpcError::Timeout(after) => Failure::Transient(format!("no answer within {after:?}")),
    }
}

/// The error of a request given up on after `after`.
fn timed_out(after: Duration) -> RpcError {
    RpcError::Timeout(after)
}

/// gRPC status codes compared against.
mod tonic_code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The endpoints and one client per endpoint; requests rotate on failure.
struct Endpoints {
    names: Vec<String>,
    clients: Vec<EtcdClient>,
    current: AtomicUsize,
    /// What to check when no member answers, by the spec's TLS options.
    hint: &'static str,
}

impl Endpoints {
    async fn connect(
        names: &[String],
        tls: Option<&EtcdTls>,
        user: Option<&(String, String)>,
    ) -> Result<Self, StoreError> {
        let read = |what: &str, p: &str| {
            std::fs::read(p).map_err(|e| {
                StoreError::Io(format!(
                    "cannot read the etcd {what} {p:?} (from the store spec): {e}"
                ))
            })
        };
        let tls_files = match tls {
            None => None,
            Some(t) => Some(TlsFiles {
                ca: read("CA certificate (cacert=)", &t.cacert)?,
                identity: match &t.cert {
                    None => None,
                    Some((c, k)) => Some((
                        read("client certificate (cert=)", c)?,
                        read("client key (key=)", k)?,
                    )),
                },
            }),
        };
        let options = ConnectOptions {
            connect_timeout: CONNECT_TIMEOUT,
            timeout: TRANSPORT_TIMEOUT,
            keep_alive: Duration::from_secs(2),
            max_decoding_bytes: MAX_DECODING_BYTES,
            tls: tls_files,
            user: match user {
                None => None,
                Some((u, p)) => {
                    let pw = String::from_utf8(read("password file (password-file=)", p)?)
                        .map_err(|_| {
                            StoreError::Io(format!(
                                "the etcd password file {p:?} is not UTF-8 text"
                            ))
                        })?;
                    let pw = pw.trim_end_matches(['\n', '\r']).to_string();
                    if pw.is_empty() {
                        return Err(StoreError::Io(format!(
                            "the etcd password file {p:?} is empty"
                        )));
                    }
                    Some((u.clone(), pw))
                }
            },
        };
        let mut clients = Vec::new();
        for name in names {
            let url = if name.contains("://") {
                name.clone()
            } else if tls.is_some() {
                format!("https://{name}")
            } else {
                format!("http://{name}")
            };
            clients.push(EtcdClient::new(&url, &options).map_err(|e| {
                StoreError::Io(format!("cannot set up the etcd endpoint {name}: {e}"))
            })?);
        }
        Ok(Endpoints {
            names: names.to_vec(),
            clients,
            current: AtomicUsize::new(0),
            hint: match tls {
                None => {
                    " If the etcd cluster serves TLS, name its CA in the spec: ?cacert=PATH (and, if it requires client certificates, &cert=PATH&key=PATH)."
                }
                Some(t) if t.cert.is_none() => {
                    " If the etcd cluster requires client certificates (--client-cert-auth), add &cert=PATH&key=PATH to the spec; check that cacert= names the CA of its certificates."
                }
                Some(_) => {
                    " Check that cacert= names the CA of the members' certificates, that they are valid for the endpoint's host name or IP address, and that the etcd cluster trusts cert=."
                }
            },
        })
    }

    /// The endpoint requests go to now.
    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.names.len()
    }

    fn unreachable(&self, attempts: u32, last: &str) -> StoreError {
        StoreError::Io(format!(
            "cannot reach the etcd cluster at {} ({attempts} attempts; last error: {last}); is the etcd cluster running? scripts/etcd-cluster start.{}",
            self.names.join(","),
            self.hint
        ))
    }

    /// Runs `op` on the current endpoint, moving to the next one on transient
    /// failures (bounded). Only for requests that are safe to repeat.
    async fn call<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut(EtcdClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, RpcError>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let i = self.current.load(Ordering::Relaxed) % self.names.len();
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, op(self.clients[i].clone()))
                .await
                .unwrap_or_else(|_| Err(timed_out(REQUEST_TIMEOUT)));
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) => match classify(e, what) {
                    Failure::Transient(msg) => {
                        self.failed(i, &msg);
                        if attempt >= MAX_ATTEMPTS || started.elapsed() >= RETRY_BUDGET {
                            return Err(Failure::Definite(self.unreachable(attempt, &msg)));
                        }
                        // A full round of endpoints failed: back off before the next.
                        if (attempt as usize).is_multiple_of(self.names.len()) {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_millis(500));
                        }
                    }
                    other => return Err(other),
                },
            }
        }
    }

    /// Endpoint `i` failed: move the current endpoint past it (once, even if
    /// several requests saw it fail).
    fn failed(&self, i: usize, msg: &str) {
        let n = self.names.len();
        let cur = self.current.load(Ordering::Relaxed);
        if cur % n == i
            && self
                .current
                .compare_exchange(cur, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::debug!(endpoint = %self.names[i], next = %self.names[(i + 1) % n], error = msg, "etcd endpoint failed; rotating");
        }
    }
}

/// Most (revision, key) → mod revision facts remembered.
const OBSERVED_MAX: usize = 16_384;

/// Mod revisions of single keys at given revisions, as seen by snapshot gets
/// (0: absent). Such a fact never changes, so every transaction reading at that
/// revision may use it; bounded, oldest forgotten first.
#[derive(Default)]
struct Observed {
    facts: std::collections::HashMap<(Version, Vec<u8>), i64>,
    order: std::collections::VecDeque<(Version, Vec<u8>)>,
}

impl Observed {
    fn record(&mut self, revision: Version, key: &[u8], mod_revision: i64) {
        let id = (revision, key.to_vec());
        if self.facts.insert(id.clone(), mod_revision).is_none() {
            self.order.push_back(id);
            while self.order.len() > OBSERVED_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.facts.remove(&old);
                }
            }
        }
    }
    fn get(&self, revision: Version, key: &[u8]) -> Option<i64> {
        self.facts.get(&(revision, key.to_vec())).copied()
    }
}

/// Most revisions a revision learned from a peer may lie ahead of the latest
/// this client saw itself ([`Store::learn_version`]).
const MAX_LEARNED_AHEAD: u64 = 1 << 20;

struct Inner {
    config: EtcdConfig,
    /// Most operations of one Txn: the spec's `max-txn-ops`, or what the
    /// cluster was found to take when the store opened.
    max_txn_ops: usize,
    committer: batch::Committer,
    reader: reads::Reader,
    describe: String,
    endpoints: Endpoints,
    data: Vec<u8>,
    markers: Vec<u8>,
    meta: Vec<u8>,
    guard: Vec<u8>,
    /// The record of the last compaction (`PREFIX/k`, see [`compact`]).
    compacted_key: Vec<u8>,
    /// Mod revisions seen by snapshot gets, so commits need not read them again.
    observed: std::sync::Mutex<Observed>,
    /// Values seen, for snapshots that are not fresh (see [`cache`]).
    cache: std::sync::Mutex<cache::ValueCache>,
    lease: Mutex<Option<(i64, Instant)>>,
    /// Snapshots waiting for a read of the current revision (see
    /// [`Inner::snapshot_revision`]).
    revisions: std::sync::Mutex<RevisionReads>,
    /// The runtime the store was opened on: its own tasks run there, not on
    /// a caller's runtime, which may end first.
    runtime: tokio::runtime::Handle,
    /// The highest revision this client saw (a revision read or a commit),
    /// and when (ms since `started`): the version of a snapshot for commit.
    latest: AtomicU64,
    latest_at_ms: AtomicU64,
    started: Instant,
    counters: Counters,
    /// Where this client relays its busy batches ([`relay`]), and until
    /// when it commits alone after a relay failed.
    relay: std::sync::RwLock<Option<Arc<dyn crate::relay::CommitRelay>>>,
    /// Who hands out the numbers relayed groups ask this member to fill in
    /// ([`crate::relay::Filler`]); none: such groups are refused.
    filler: std::sync::RwLock<Option<Arc<dyn crate::relay::Filler>>>,
    /// Relayed groups of this client not answered yet.
    relaying: std::sync::atomic::AtomicUsize,
    /// When the last relayed group was answered (ms after `started`, plus
    /// one; 0: never).
    relayed_at_ms: AtomicU64,
    relay_paused_until: relay::Until,
    /// Until when groups go to the relay with no shared compares gathered
    /// (a relay refused one that had: an older member, [`relay`]).
    flat_groups_until: relay::Until,
}

/// What the store did so far (see [`Store::stats`]).
#[derive(Default)]
struct Counters {
    /// Snapshots taken, and the linearizable revision reads serving them.
    snapshots: AtomicU64,
    revision_reads: AtomicU64,
    /// Reads at a snapshot revision, the etcd requests carrying them (one
    /// per batch of single-key reads, one per page of a range), and the
    /// reads' time in µs (summed over reads).
    reads: AtomicU64,
    read_rpcs: AtomicU64,
    read_us: AtomicU64,
    /// Commits asked for, and those that conflicted.
    commits: AtomicU64,
    conflicts: AtomicU64,
    /// Txn requests carrying commits (one per batch), and their time in µs.
    commit_txns: AtomicU64,
    /// Single-key reads answered from the cache, and keys taken as absent
    /// without a read ([`crate::Transaction::expect_absent`]).
    cache_hits: AtomicU64,
    assumed_absent: AtomicU64,
    commit_us: AtomicU64,
    /// What the commits asked etcd for (whether they applied or not): keys
    /// put, deletions (a key or a range each) and compares (the commit
    /// markers' not counted): where a commit's etcd work goes.
    commit_puts: AtomicU64,
    commit_deletes: AtomicU64,
    commit_compares: AtomicU64,
    /// Of those compares, the ones not sent because another commit of the
    /// same Txn checks them ([`hoist`]).
    compares_shared: AtomicU64,
    /// Groups of this client's commits sent through its relay, groups it
    /// committed for other members, and relayed groups that failed (not
    /// applied, or resolved by their marker).
    relayed_out: AtomicU64,
    relayed_in: AtomicU64,
    relay_failures: AtomicU64,
    /// Where a commit's time goes, in µs summed: from handing it to the
    /// committer to its outcome (counted by `commit_waits`, for every
    /// commit that went to etcd, alone, batched or relayed), a relayed
    /// group's round trip to its relay (by `relayed_out`), and the time a
    /// group another member relayed spent here (by `relayed_in`).
    commit_waits: AtomicU64,
    commit_wait_us: AtomicU64,
    relay_us: AtomicU64,
    relayed_in_us: AtomicU64,
    /// Numbers this member filled in for the groups other members relayed
    /// (`Transaction::fill`), and commits of this client whose numbers a
    /// relay filled in.
    filled_in: AtomicU64,
    commits_filled: AtomicU64,
    /// Compactions of etcd's history this client made, and the revision
    /// it last compacted to ([`compact`]).
    compactions: AtomicU64,
    compacted_to: AtomicU64,
}

/// A small deterministic generator for the randomized tests of this
/// module's parts (xorshift): each call gives a number in `0..n`.
#[cfg(test)]
fn test_rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Callers waiting for the current revision, and whether a read runs.
#[derive(Default)]
struct RevisionReads {
    running: bool,
    waiting: Vec<tokio::sync::oneshot::Sender<Result<Version, StoreError>>>,
}

/// The task reading revisions for waiting snapshots
/// ([`Inner::snapshot_revision`]): if it ends before its work is done
/// (its runtime shut down), nobody is left waiting on it and the next
/// caller leads again. `None` once it finished its work.
struct RevisionReader(Option<Arc<Inner>>);

impl RevisionReader {
    fn finished(&mut self) {
        self.0 = None;
    }
}

impl Drop for RevisionReader {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take()
            && let Ok(mut r) = inner.revisions.lock()
        {
            r.running = false;
            // Dropped senders: their snapshots fail ("the etcd revision
            // reader stopped") instead of waiting forever.
            r.waiting.clear();
        }
    }
}

/// The etcd backend (see the module docs).
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl EtcdStore {
    /// Opens the store of `spec` (`etcd://…`, see the module docs) and checks
    /// that the cluster answers.
    pub async fn open(spec: &str) -> Result<Self, StoreError> {
        Self::open_config(EtcdConfig::parse(spec)?).await
    }

    /// Opens the store described by `config` and checks that the cluster answers.
    ///
    /// Unless the spec names `max-txn-ops`, asks the cluster (one read-only
    /// Txn of [`PROBED_TXN_OPS`] reads of one absent key) whether its
    /// members were started with a `--max-txn-ops` that large, as
    /// `scripts/etcd-cluster` starts them, and then batches commits and
    /// reads up to that many operations per Txn; otherwise etcd's default.
    pub async fn open_config(config: EtcdConfig) -> Result<Self, StoreError> {
        let endpoints =
            Endpoints::connect(&config.endpoints, config.tls.as_ref(), config.user.as_ref())
                .await?;
        let prefix = config.prefix.clone();
        let p = prefix.as_bytes();
        let max_txn_ops = if config.max_txn_ops_given {
            config.max_txn_ops
        } else {
            probe_txn_ops(&endpoints, &[p, b"/m/probe"].concat()).await
        };
        let inner = Arc::new_cyclic(|weak| Inner {
            max_txn_ops,
            committer: batch::Committer::start(weak.clone()),
            reader: reads::Reader::start(weak.clone()),
            describe: config.spec(),
            data: [p, b"/d/"].concat(),
            markers: [p, b"/c/"].concat(),
            meta: [p, b"/m"].concat(),
            guard: [p, b"/g"].concat(),
            compacted_key: [p, b"/k"].concat(),
            config,
            endpoints,
            lease: Mutex::new(None),
            observed: std::sync::Mutex::new(Observed::default()),
            cache: std::sync::Mutex::new(cache::ValueCache::default()),
            revisions: std::sync::Mutex::new(RevisionReads::default()),
            runtime: tokio::runtime::Handle::current(),
            latest: AtomicU64::new(0),
            latest_at_ms: AtomicU64::new(0),
            started: Instant::now(),
            counters: Counters::default(),
            relay: std::sync::RwLock::new(None),
            filler: std::sync::RwLock::new(None),
            relaying: std::sync::atomic::AtomicUsize::new(0),
            relayed_at_ms: AtomicU64::new(0),
            relay_paused_until: relay::Until::default(),
            flat_groups_until: relay::Until::default(),
        });
        let store = EtcdStore { inner };
        store.inner.current_revision().await?;
        compact::start(&store.inner);
        Ok(store)
    }

    /// The configuration this store was opened with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }
}

fn to_store_error(f: Failure) -> StoreError {
    match f {
        Failure::Definite(e) => e,
        Failure::NoSpace(msg) => StoreError::Io(msg),
        Failure::Compacted => {
            tracing::debug!("read revision compacted; the transaction will be retried");
            StoreError::Conflict
        }
        Failure::LeaseNotFound => StoreError::Io("etcd lease not found".into()),
        Failure::Transient(msg) => StoreError::Io(msg),
    }
}

fn rev(r: i64) -> Version {
    u64::try_from(r).unwrap_or(0)
}

fn header_revision(h: Option<&ResponseHeader>) -> Result<Version, StoreError> {
    h.map(|h| rev(h.revision))
        .ok_or_else(|| StoreError::Io("etcd response without header".into()))
}

impl Inner {
    fn dk(&self, key: &[u8]) -> Vec<u8> {
        [self.data.as_slice(), key].concat()
    }

    /// The current revision for a new snapshot. Concurrent callers share
    /// reads (FoundationDB batches its read versions the same way): a caller
    /// arriving while a read is in flight waits for the *next* read, which
    /// starts after it arrived, so every snapshot still sees every commit
    /// acknowledged before it was asked for (linearizable).
    async fn snapshot_revision(self: &Arc<Self>) -> Result<Version, StoreError> {
        bump(&self.counters.snapshots, 1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut r = self
                .revisions
                .lock()
                .map_err(|_| StoreError::Io("etcd store state poisoned by a panic".into()))?;
            r.waiting.push(tx);
            !std::mem::replace(&mut r.running, true)
        };
        if lead {
            // On the store's own runtime, not the caller's: a caller on a
            // runtime that ends (the collector's thread) would take the
            // reader down with it, and every later snapshot would wait for
            // it. Should the reader end before its work is done anyway (its
            // runtime shut down), the guard hands the lead to the next
            // caller and fails those waiting (they get an error, not a wait).
            let mut guard = RevisionReader(Some(self.clone()));
            self.runtime.spawn(async move {
                let Some(inner) = guard.0.clone() else { return };
                loop {
                    let waiting = match inner.revisions.lock() {
                        Ok(mut r) if r.waiting.is_empty() => {
                            r.running = false;
                            // Done: the next caller leads (maybe already).
                            guard.finished();
                            return;
                        }
                        Ok(mut r) => std::mem::take(&mut r.waiting),
                        Err(_) => return,
                    };
                    let got = inner.current_revision().await;
                    for w in waiting {
                        let _ = w.send(got.clone());
                    }
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Io("the etcd revision reader stopped".into())))
    }

    /// Notes revision `v` as seen now.
    fn saw(&self, v: Version) {
        let prev = self.latest.fetch_max(v, Ordering::AcqRel);
        if v >= prev {
            let now = self.started.elapsed().as_millis() as u64;
            self.latest_at_ms.fetch_max(now, Ordering::AcqRel);
        }
    }

    /// The latest revision seen, if seen within the configured age
    /// ([`EtcdConfig::commit_snapshot_age`]).
    fn recent_revision(&self) -> Option<Version> {
        let at = self.latest_at_ms.load(Ordering::Acquire);
        let now = self.started.elapsed().as_millis() as u64;
        let v = self.latest.load(Ordering::Acquire);
        let age = self.config.commit_snapshot_age.as_millis() as u64;
        (v > 0 && age > 0 && now.saturating_sub(at) <= age).then_some(v)
    }

    async fn current_revision(&self) -> Result<Version, StoreError> {
        bump(&self.counters.revision_reads, 1);
        let key = self.meta.clone();
        let resp = self
            .endpoints
            .call("revision read", |kv| {
                let req = RangeRequest {
                    key: key.clone(),
                    count_only: true,
                    ..Default::default()
                };
                async move { kv.range(req).await }
            })
            .await
            .map_err(to_store_error)?;
        let v = header_revision(resp.header.as_ref())?;
        self.saw(v);
        Ok(v)
    }

    /// One page of `[begin, end)` (etcd keys) at `revision`.
    async fn page(
        &self,
        begin: &[u8],
        end: &[u8],
        revision: Version,
        limit: usize,
        reverse: bool,
        keys_only: bool,
    ) -> Result<RangeResponse, StoreError> {
        let req = RangeRequest {
            key: begin.to_vec(),
            range_end: end.to_vec(),
            revision: i64::try_from(revision).unwrap_or(i64::MAX),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            sort_order: if reverse {
                sort_order::DESCEND
            } else {
                sort_order::NONE
            },
            sort_target: sort_target::KEY,
            keys_only,
            ..Default::default()
        };
        // A read at a fixed revision needs no round of the leader: the
        // revision came from a linearizable read, and what a member has
        // applied at it never changes. The first attempt reads the member's
        // own state; a member that has not applied the revision yet refuses
        // ("future revision"), and later attempts read linearizably.
        let mut attempt = 0;
        let started = Instant::now();
        let r = self
            .endpoints
            .call("range read", |kv| {
                let mut req = req.clone();
                req.serializable = attempt == 0 && revision > 0;
                attempt += 1;
                async move { kv.range(req).await }
            })
            .await
            .map_err(to_store_error);
        bump(&self.counters.reads, 1);
        bump(&self.counters.read_rpcs, 1);
        bump(&self.counters.read_us, started.elapsed().as_micros() as u64);
        r
    }

    /// The keys of `[begin, end)` (user keys) at `revision` with their mod
    /// revisions (`None` when there are more than `max`), as far as they are
    /// known without a read (what the snapshot served, the revisions
    /// observed, a listing of the snapshot): `None` when a read is needed.
    fn keys_known(
        &self,
        begin: &[u8],
        end: &[u8],
        revision: Version,
        max: usize,
        facts: Option<&Facts>,
    ) -> Result<Option<Option<KeyRevisions>>, StoreError> {
        if end == key_after(begin).as_slice() {
            // What the snapshot served (maybe from the cache) first: the
            // compare must hold the mod revision of the value it served.
            let served = facts.and_then(|f| f.keys.lock().ok()?.get(begin).copied());
            let seen = match served {
                Some(m) => Some(m),
                None => self
                    .observed
                    .lock()
                    .map_err(|_| StoreError::Io("etcd store state poisoned by a panic".into()))?
                    .get(revision, begin),
            };
            if let Some(m) = seen {
                return Ok(Some(Some(if m == 0 {
                    Vec::new()
                } else {
                    vec![(self.dk(begin), m)]
                })));
            }
        }
        // A listing of the same snapshot read the range whole: its rows are
        // the keys there at `revision` (the snapshot's), as a read now would
        // return them.
        if let Some(rows) = facts.and_then(|f| f.listed(begin, end)) {
            return Ok(Some((rows.len() <= max).then(|| {
                rows.into_iter().map(|(k, m)| (self.dk(&k), m)).collect()
            })));
        }
        Ok(None)
    }

    /// [`keys_known`](Self::keys_known)'s answer read from etcd.
    async fn keys_read(
        &self,
        begin: &[u8],
        end: &[u8],
        revision: Version,
        max: usize,
    ) -> Result<Option<KeyRevisions>, StoreError> {
        tracing::trace!(target: "capstan_cluster::reads", kind = %key_kind(begin), "revisions for a commit's compares");
        let mut lo = self.dk(begin);
        let hi = self.dk(end);
        let mut out = Vec::new();
        loop {
            let want = (max + 1 - out.len()).min(KEYS_PAGE);
            let resp = self.page(&lo, &hi, revision, want, false, true).await?;
            for kv in &resp.kvs {
                out.push((kv.key.clone(), kv.mod_revision));
            }
            if out.len() > max {
                return Ok(None);
            }
            match resp.kvs.last() {
                Some(last) if resp.more => lo = key_after(&last.key),
                _ => return Ok(Some(out)),
            }
        }
    }

    async fn lease(&self, renew: bool) -> Result<i64, StoreError> {
        let mut guard = self.lease.lock().await;
        if let Some((id, granted)) = *guard
            && !renew
            && granted.elapsed() < LEASE_ROTATION
        {
            return Ok(id);
        }
        let ttl = i64::try_from(MARKER_TTL.as_secs()).unwrap_or(60);
        let resp = self
            .endpoints
            .call("lease grant", |kv| async move { kv.lease_grant(ttl).await })
            .await
            .map_err(to_store_error)?;
        *guard = Some((resp.id, Instant::now()));
        Ok(resp.id)
    }

    /// At most `budget` compares proving that nothing in `read_conflicts`
    /// changed after `read_version`, their estimated size in bytes, and whether
    /// they are coarse (then they include the deletion guard's compare).
    async fn read_compares(
        &self,
        req: &CommitRequest,
        budget: usize,
    ) -> Result<(Vec<Compare>, usize, bool), StoreError> {
        let ranges = merge_ranges(req.read_conflicts.clone());
        let next = i64::try_from(req.read_version).unwrap_or(i64::MAX - 1) + 1;
        let facts = req
            .facts
            .0
            .as_ref()
            .and_then(|f| f.clone().downcast::<Facts>().ok());
        // Precise: one compare per single key, per range and per key of a range.
        if ranges.len() <= budget {
            // Most ranges are known without a read (a commit's single keys,
            // from the cache): only the others are read, at once. (Joining
            // a read future per range allocated them all, for every commit.)
            let mut known = Vec::with_capacity(ranges.len());
            for (b, e) in &ranges {
                known.push(self.keys_known(b, e, req.read_version, budget, facts.as_deref())?);
            }
            let unknown: Vec<usize> = (0..known.len()).filter(|i| known[*i].is_none()).collect();
            if !unknown.is_empty() {
                let read = futures::future::try_join_all(unknown.iter().map(|&i| {
                    let (b, e) = &ranges[i];
                    self.keys_read(b, e, req.read_version, budget)
                }))
                .await?;
                for (i, keys) in unknown.into_iter().zip(read) {
                    known[i] = Some(keys);
                }
            }
            // (every entry is known now; one that was not would read as
            // too many keys: the coarse compares below, still safe)
            let mut fetched: Vec<Option<KeyRevisions>> =
                known.into_iter().map(Option::flatten).collect();
            // A range merged from a key's read and a wider one: the key is
            // compared with the revision of the value the snapshot served
            // (maybe an older one, from the cache), not with its revision at
            // the snapshot, else a stale value passes the commit.
            for ((b, e), keys) in ranges.iter().zip(fetched.iter_mut()) {
                if *e != key_after(b)
                    && let Some(keys) = keys
                {
                    for (k, m) in served_in(facts.as_deref(), b, e) {
                        let k = self.dk(&k);
                        match keys.iter_mut().find(|(x, _)| *x == k) {
                            Some(entry) => entry.1 = m,
                            None => keys.push((k, m)),
                        }
                    }
                }
            }
            let needed: Option<usize> = ranges
                .iter()
                .zip(&fetched)
                .map(|((b, e), keys)| {
                    let keys = keys.as_ref()?.len();
                    Some(if *e == key_after(b) { 1 } else { 1 + keys })
                })
                .sum();
            if needed.is_some_and(|n| n <= budget) {
                let mut compares = Vec::new();
                let mut size = 0;
                for ((b, e), keys) in ranges.iter().zip(fetched) {
                    let keys = keys.unwrap_or_default();
                    size += b.len() + e.len() + 2 * (self.data.len() + OP_OVERHEAD);
                    if *e == key_after(b) {
                        let m = keys.first().map(|(_, m)| *m).unwrap_or(0);
                        compares.push(Compare::mod_revision(self.dk(b), compare_result::EQUAL, m));
                    } else {
                        compares.push(
                            Compare::mod_revision(self.dk(b), compare_result::LESS, next)
                                .with_range(self.dk(e)),
                        );
                        for (k, m) in keys {
                            size += k.len() + OP_OVERHEAD;
                            compares.push(Compare::mod_revision(k, compare_result::EQUAL, m));
                        }
                    }
                }
                return Ok((compares, size, false));
            }
        }
        // Coarse: the deletion guard, one compare per key the snapshot
        // served (the revision of the value served: see above), and one
        // range compare per group of consecutive ranges (covering the gaps
        // between them too).
        let served = served_in(facts.as_deref(), &[], &[]);
        if served.len() + 2 > budget {
            // (too many to check each: a fresh snapshot serves none)
            return Err(StoreError::Conflict);
        }
        let groups = coarsen(ranges, budget - 1 - served.len());
        tracing::debug!(
            ranges = groups.len(),
            "read set too large for precise compares; using range compares and the deletion guard"
        );
        let mut compares = vec![Compare::mod_revision(
            self.guard.clone(),
            compare_result::LESS,
            next,
        )];
        let mut size = self.guard.len() + OP_OVERHEAD;
        for (k, m) in served {
            size += k.len() + self.data.len() + OP_OVERHEAD;
            compares.push(Compare::mod_revision(self.dk(&k), compare_result::EQUAL, m));
        }
        for (b, e) in groups {
            size += b.len() + e.len() + 2 * (self.data.len() + OP_OVERHEAD);
            compares.push(
                Compare::mod_revision(self.dk(&b), compare_result::LESS, next)
                    .with_range(self.dk(&e)),
            );
        }
        Ok((compares, size, true))
    }

    /// Prepares `req` as a batch member and hands it to the committer.
    async fn commit(&self, mut req: CommitRequest) -> Result<Version, StoreError> {
        crate::redb_store::validate(&req)?;
        // Numbers a relay fills in: their placeholders are in no key the
        // cache may learn, and the member is settled by a key without one.
        let fills = std::mem::take(&mut req.fills);
        let placeholder_in = |b: &[u8]| {
            fills
                .iter()
                .any(|f| crate::store::holds_placeholder(b, f.placeholder))
        };
        let (deletes, puts) = normalize(&req.mutations);
        let writes_needed = deletes.len() + puts.len() + 1 + usize::from(!deletes.is_empty());
        if writes_needed > self.max_txn_ops {
            return Err(StoreError::TooManyWrites {
                len: writes_needed,
                max: self.max_txn_ops,
            });
        }
        // One compare is the marker's.
        let (compares, mut size, coarse) = self.read_compares(&req, self.max_txn_ops - 1).await?;
        // The marker's compare is added where the commit is sent (alone, or
        // in a batch that has its own marker: see [`batch`]).
        let marker = self.new_marker();
        // What the cache learns from the outcome (see [`cache`]).
        let single_reads: Vec<Vec<u8>> = req
            .read_conflicts
            .iter()
            .filter(|(b, e)| *e == key_after(b))
            .map(|(b, _)| b.clone())
            .collect();
        let learn_puts: Vec<(Vec<u8>, Option<Vec<u8>>)> = puts
            .iter()
            .filter(|(k, v)| !placeholder_in(k) && !placeholder_in(v))
            .map(|(k, v)| (k.clone(), (v.len() <= cache::MAX_VALUE).then(|| v.clone())))
            .collect();
        let learn_deletes = deletes.clone();
        let mut writes: Vec<RequestOp> = Vec::new();
        let mut written: Vec<KeyRange> = Vec::with_capacity(deletes.len() + puts.len());
        for (b, e) in &deletes {
            size += b.len() + e.len() + 2 * self.data.len() + OP_OVERHEAD;
            if *e == key_after(b) {
                writes.push(RequestOp::delete(self.dk(b), Vec::new()));
            } else {
                writes.push(RequestOp::delete(self.dk(b), self.dk(e)));
            }
            written.push((b.clone(), e.clone()));
        }
        let first_put = puts.keys().find(|k| !placeholder_in(k)).map(|k| self.dk(k));
        if !fills.is_empty() && first_put.is_none() {
            return Err(StoreError::FillUnavailable(
                "a commit with numbers to fill in needs a key without them".into(),
            ));
        }
        for (k, v) in puts {
            size += k.len() + v.len() + self.data.len() + OP_OVERHEAD;
            written.push((k.clone(), key_after(&k)));
            writes.push(RequestOp::put(self.dk(&k), v, 0));
        }
        size += marker.len() * 2 + OP_OVERHEAD;
        if size > self.config.max_request_bytes {
            return Err(StoreError::TransactionTooLarge {
                len: size,
                max: self.config.max_request_bytes,
            });
        }
        tracing::trace!(compares = compares.len(), coarse, "queueing an etcd commit");
        bump(
            &self.counters.commit_puts,
            (writes.len() - deletes.len()) as u64,
        );
        bump(&self.counters.commit_deletes, deletes.len() as u64);
        bump(&self.counters.commit_compares, compares.len() as u64);
        let shape = batch::Shape {
            reads: merge_ranges(req.read_conflicts),
            writes: written,
            ops: (compares.len() + 1).max(writes.len() + 1),
            deletes: !deletes.is_empty(),
            size,
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        let member = batch::Member {
            compares,
            writes,
            marker,
            first_put,
            shape,
            reply: batch::Reply::Local(reply),
            traced: batch::traced_now(),
            fills,
        };
        let queued = Instant::now();
        let r = self.committer.commit(member, rx).await;
        bump(&self.counters.commit_waits, 1);
        bump(
            &self.counters.commit_wait_us,
            queued.elapsed().as_micros() as u64,
        );
        if let Ok(mut c) = self.cache.lock() {
            match &r {
                Ok(v) => {
                    let m = i64::try_from(*v).unwrap_or(i64::MAX);
                    for (b, e) in &learn_deletes {
                        if *e == key_after(b) {
                            c.learn(b, None, 0, *v);
                        } else {
                            c.forget_range(b, e);
                        }
                    }
                    for (k, value) in &learn_puts {
                        match value {
                            Some(value) => c.learn(k, Some(value), m, *v),
                            None => c.forget(k),
                        }
                    }
                }
                Err(StoreError::Conflict) => {
                    // something it read changed: read it afresh next time
                    for k in &single_reads {
                        c.forget(k);
                    }
                }
                Err(_) => {
                    // maybe applied, maybe not
                    for k in single_reads.iter().chain(learn_puts.iter().map(|(k, _)| k)) {
                        c.forget(k);
                    }
                    for (b, e) in &learn_deletes {
                        c.forget_range(b, e);
                    }
                }
            }
        }
        r
    }

    /// A fresh commit marker key (module docs).
    fn new_marker(&self) -> Vec<u8> {
        [self.markers.as_slice(), &random_id()].concat()
    }

    /// Whether the etcd key `key` was written at revision `at` (a batch
    /// applied at `at`: did this member's success branch run?): `at` if so,
    /// [`StoreError::Conflict`] if not (the member was not applied),
    /// [`StoreError::MaybeCommitted`] when it cannot be read.
    async fn modified_at(&self, key: &[u8], at: Version) -> Result<Version, StoreError> {
        match self.page(key, &key_after(key), at, 1, false, true).await {
            Ok(r) if r.kvs.first().is_some_and(|kv| rev(kv.mod_revision) == at) => Ok(at),
            Ok(_) => Err(StoreError::Conflict),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether a commit of a resolved batch applied");
                Err(StoreError::MaybeCommitted)
            }
        }
    }

    /// One key (etcd's, linearizable), through the endpoints.
    async fn get_key(
        &self,
        what: &str,
        key: &[u8],
    ) -> Result<Option<crate::etcd_rpc::KeyValue>, Failure> {
        let key = key.to_vec();
        let resp = self
            .endpoints
            .call(what, |kv| {
                let req = RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                };
                async move { kv.range(req).await }
            })
            .await?;
        Ok(resp.kvs.into_iter().next())
    }

    /// A commit marker as it stands, read (not fenced): `Ok(None)` absent,
    /// else whether it says committed, at its revision.
    async fn read_marker(&self, marker: &[u8]) -> Result<Option<(bool, Version)>, StoreError> {
        let kv = self
            .get_key("commit marker read", marker)
            .await
            .map_err(to_store_error)?;
        Ok(kv.map(|kv| (kv.value == MARKER_COMMITTED, rev(kv.mod_revision))))
    }

    /// Settles a commit whose Txn etcd answered with NOSPACE by its marker,
    /// read (a write could not be made): present, the Txn applied (it
    /// crossed the quota); absent, it was refused before it was proposed,
    /// so it never applies (`why` is the error).
    async fn settle_answered(&self, marker: &[u8], why: String) -> Result<Version, StoreError> {
        match self.read_marker(marker).await {
            Ok(Some((true, at))) => {
                tracing::info!("a commit etcd answered with NOSPACE was applied");
                Ok(at)
            }
            Ok(Some((false, _))) => Err(StoreError::Conflict),
            Ok(None) => Err(StoreError::Io(why)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the marker of a commit etcd answered with NOSPACE");
                Err(StoreError::MaybeCommitted)
            }
        }
    }

    /// Decides an ambiguous commit by its marker: fences it if absent.
    async fn resolve(&self, marker: &[u8], sent: Instant) -> Result<Version, StoreError> {
        let txn = TxnRequest {
            compare: vec![Compare::create_revision(
                marker.to_vec(),
                compare_result::EQUAL,
                0,
            )],
            success: vec![RequestOp::put(marker.to_vec(), MARKER_ABORTED.to_vec(), 0)],
            failure: vec![RequestOp::get(marker.to_vec())],
        };
        let resp = tokio::time::timeout(
            RESOLVE_DEADLINE.saturating_sub(sent.elapsed()),
            self.endpoints.call("commit resolution", |kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            }),
        )
        .await;
        let resp = match resp {
            Ok(Ok(r)) => r,
            // etcd is full: no abort marker can fence the commit, but one
            // that applied is known by its marker
            Ok(Err(Failure::NoSpace(_))) => {
                return match self.read_marker(marker).await {
                    Ok(Some((true, at))) => Ok(at),
                    Ok(Some((false, _))) => Err(StoreError::Conflict),
                    // absent: it may still be in flight, and cannot be fenced
                    Ok(None) | Err(_) => Err(StoreError::MaybeCommitted),
                };
            }
            Ok(Err(f)) => {
                tracing::warn!(error = %to_store_error(f), "cannot resolve an ambiguous commit");
                return Err(StoreError::MaybeCommitted);
            }
            Err(_) => {
                tracing::warn!("resolving an ambiguous commit took too long");
                return Err(StoreError::MaybeCommitted);
            }
        };
        if resp.succeeded {
            tracing::info!("ambiguous commit was not applied; fenced it, the transaction retries");
            return Err(StoreError::Conflict);
        }
        for r in resp.responses {
            if let Some(Response::Range(g)) = r.response
                && let Some(kv) = g.kvs.first()
            {
                return if kv.value == MARKER_COMMITTED {
                    tracing::info!("ambiguous commit was applied");
                    Ok(rev(kv.mod_revision))
                } else {
                    // Fenced by an earlier resolution of this same commit.
                    Err(StoreError::Conflict)
                };
            }
        }
        Err(StoreError::MaybeCommitted)
    }
}

/// At most `max` ranges covering `ranges` (sorted, disjoint): consecutive
/// ranges are grouped and each group replaced by its hull.
fn coarsen(ranges: Vec<(Vec<u8>, Vec<u8>)>, max: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    if ranges.len() <= max {
        return ranges;
    }
    let per = ranges.len().div_ceil(max);
    ranges
        .chunks(per)
        .map(|g| (g[0].0.clone(), g[g.len() - 1].1.clone()))
        .collect()
}

/// Sorted, disjoint, non-adjacent ranges covering `ranges`.
fn merge_ranges(mut ranges: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    ranges.retain(|(b, e)| b < e);
    ranges.sort();
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(ranges.len());
    for (b, e) in ranges {
        match out.last_mut() {
            Some(last) if b <= last.1 => {
                if e > last.1 {
                    last.1 = e;
                }
            }
            _ => out.push((b, e)),
        }
    }
    out
}

/// A key range `[begin, end)`.
type KeyRange = (Vec<u8>, Vec<u8>);

/// The net effect of `mutations` applied in order: ranges to delete (disjoint,
/// not containing any key to put) and then keys to put. Etcd refuses a Txn
/// that puts a key twice or inside a range it deletes.
fn normalize(mutations: &[Mutation]) -> (Vec<KeyRange>, BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut puts: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut cleared = Vec::new();
    for m in mutations {
        match m {
            Mutation::Set(k, v) => {
                puts.insert(k.clone(), v.clone());
            }
            Mutation::Clear(_) | Mutation::ClearRange(..) => {
                let (b, e) = m.written_range();
                if b >= e {
                    continue;
                }
                let mut tail = puts.split_off(&b);
                let mut after = tail.split_off(&e);
                puts.append(&mut after);
                cleared.push((b, e));
            }
        }
    }
    let mut deletes = Vec::new();
    for (b, e) in merge_ranges(cleared) {
        let mut lo = b;
        for k in puts.range(lo.clone()..e.clone()).map(|(k, _)| k) {
            if lo < *k {
                deletes.push((lo.clone(), k.clone()));
            }
            lo = key_after(k);
        }
        if lo < e {
            deletes.push((lo, e));
        }
    }
    (deletes, puts)
}

/// A fresh id for a commit marker: unique among every client of the etcd
/// (not secret). A random 64-bit prefix drawn once per process and a
/// counter, in hex: blake3 of the pid, the time and a counter, with a
/// `getpid` system call each time, was one of the costs of every commit.
fn random_id() -> Vec<u8> {
    use std::hash::BuildHasher;
    use std::sync::atomic::AtomicU64;
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // (the standard library's per-process random keys, the pid and
        // the time: distinct processes draw distinct prefixes)
        std::collections::hash_map::RandomState::new().hash_one((std::process::id(), nanos))
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::with_capacity(32);
    for b in prefix.to_be_bytes().into_iter().chain(n.to_be_bytes()) {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let version = self.inner.snapshot_revision().await?;
        Ok(Box::new(EtcdSnapshot {
            inner: self.inner.clone(),
            version,
            facts: None,
        }))
    }

    async fn snapshot_for_commit(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let Some(version) = self.inner.recent_revision() else {
            return self.snapshot().await;
        };
        bump(&self.inner.counters.snapshots, 1);
        Ok(Box::new(EtcdSnapshot {
            inner: self.inner.clone(),
            version,
            facts: Some(Arc::default()),
        }))
    }

    async fn snapshot_remembering(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let version = self.inner.snapshot_revision().await?;
        Ok(Box::new(EtcdSnapshot {
            inner: self.inner.clone(),
            version,
            facts: Some(Arc::default()),
        }))
    }

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        let started = Instant::now();
        bump(&self.inner.counters.commits, 1);
        let r = self.inner.commit(req).await;
        if let Ok(v) = &r {
            self.inner.saw(*v);
        }
        if r == Err(StoreError::Conflict) {
            bump(&self.inner.counters.conflicts, 1);
        }
        tracing::trace!(elapsed = ?started.elapsed(), ok = r.is_ok(), "etcd commit");
        r
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.counters()
    }

    fn seen_version(&self) -> Option<Version> {
        Some(self.inner.latest.load(Ordering::Acquire)).filter(|v| *v > 0)
    }

    fn learn_version(&self, version: Version) {
        // A revision etcd has not reached (a peer's bug) would make the
        // snapshots for commit of the next `commit_snapshot_age` read a
        // future revision, which every member refuses: errors, never a
        // wrong answer. Bounded anyway: nothing far ahead of what this
        // client saw itself is taken.
        let latest = self.inner.latest.load(Ordering::Acquire);
        if latest > 0 && version <= latest.saturating_add(MAX_LEARNED_AHEAD) {
            self.inner.saw(version);
        }
    }

    fn max_commit_writes(&self) -> usize {
        // the marker and the guard take two of a Txn's operations
        self.inner.max_txn_ops.saturating_sub(3)
    }

    fn set_relay(&self, relay: Option<Arc<dyn crate::relay::CommitRelay>>) {
        if let Ok(mut r) = self.inner.relay.write() {
            *r = relay;
        }
    }

    fn fills(&self) -> bool {
        let relaying = self.inner.relay.read().is_ok_and(|r| r.is_some());
        relaying && !self.inner.relay_paused()
    }

    fn relaying_now(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.inner.relaying.load(Relaxed) > 0 {
            return true;
        }
        let at = self.inner.relayed_at_ms.load(Relaxed);
        at != 0
            && (self.inner.started.elapsed().as_millis() as u64 + 1)
                <= at + RECENT_RELAY.as_millis() as u64
    }

    fn set_filler(&self, filler: Option<Arc<dyn crate::relay::Filler>>) {
        if let Ok(mut f) = self.inner.filler.write() {
            *f = filler;
        }
    }

    async fn commit_relayed_filled(
        &self,
        group: Vec<u8>,
        fills: Vec<crate::relay::GroupFill>,
    ) -> Result<(Vec<u8>, Vec<crate::relay::FillAnswer>), crate::relay::RelayError> {
        self.inner.commit_relayed_filled(group, fills).await
    }

    async fn commit_relayed(&self, group: Vec<u8>) -> Result<Vec<u8>, crate::relay::RelayError> {
        self.inner.commit_relayed(group).await
    }
}

impl EtcdStore {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("snapshots", get(&c.snapshots)),
            ("revision_reads", get(&c.revision_reads)),
            ("reads", get(&c.reads)),
            ("read_rpcs", get(&c.read_rpcs)),
            ("read_us", get(&c.read_us)),
            ("commits", get(&c.commits)),
            ("conflicts", get(&c.conflicts)),
            ("commit_txns", get(&c.commit_txns)),
            ("commit_us", get(&c.commit_us)),
            ("cache_hits", get(&c.cache_hits)),
            ("assumed_absent", get(&c.assumed_absent)),
            ("commit_puts", get(&c.commit_puts)),
            ("commit_deletes", get(&c.commit_deletes)),
            ("commit_compares", get(&c.commit_compares)),
            ("compares_shared", get(&c.compares_shared)),
            ("relayed_out", get(&c.relayed_out)),
            ("relayed_in", get(&c.relayed_in)),
            ("relay_failures", get(&c.relay_failures)),
            ("commit_waits", get(&c.commit_waits)),
            ("commit_wait_us", get(&c.commit_wait_us)),
            ("relay_us", get(&c.relay_us)),
            ("relayed_in_us", get(&c.relayed_in_us)),
            ("filled_in", get(&c.filled_in)),
            ("commits_filled", get(&c.commits_filled)),
            ("compactions", get(&c.compactions)),
            ("compacted_to", get(&c.compacted_to)),
        ]
    }
}

/// Operations per Txn a store tries when its spec does not say (see
/// [`EtcdStore::open_config`]).
pub const PROBED_TXN_OPS: usize = 1024;

/// [`PROBED_TXN_OPS`] if the cluster takes a Txn of that many operations,
/// else etcd's default [`MAX_TXN_OPS`].
async fn probe_txn_ops(endpoints: &Endpoints, key: &[u8]) -> usize {
    let op = RequestOp {
        request: Some(crate::etcd_rpc::Request::Range(
            crate::etcd_rpc::RangeRequest {
                key: key.to_vec(),
                limit: 1,
                keys_only: true,
                serializable: true,
                ..Default::default()
            },
        )),
    };
    let txn = TxnRequest {
        compare: Vec::new(),
        success: vec![op; PROBED_TXN_OPS],
        failure: Vec::new(),
    };
    match endpoints
        .call("probe of --max-txn-ops", |kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    {
        Ok(_) => {
            tracing::debug!(ops = PROBED_TXN_OPS, "the etcd cluster takes large Txns");
            PROBED_TXN_OPS
        }
        Err(e) => {
            tracing::debug!("the etcd cluster takes etcd's default Txn size ({e:?})");
            MAX_TXN_OPS
        }
    }
}

/// The first element of a tuple key, for the read trace
/// (`CAPSTAN_LOG=capstan_cluster::reads=trace`): which kinds of record a
/// workload reads from etcd.
fn key_kind(key: &[u8]) -> String {
    crate::tuple::TupleReader::new(key)
        .str()
        .unwrap_or_else(|_| format!("{:02x?}", &key[..key.len().min(4)]))
}

/// Most rows of a listing whose mod revisions a snapshot notes as facts.
const NOTED_ROWS: usize = 256;

/// Most spans a snapshot keeps as listed ([`Facts::spans`]).
const MAX_SPANS: usize = 16;

/// Keys (etcd's, with the data prefix) and their mod revisions.
type KeyRevisions = Vec<(Vec<u8>, i64)>;

/// What a snapshot that is not fresh learned for its commit's compares.
#[derive(Default)]
struct Facts {
    /// Mod revisions of the single keys it served (0: absent): from the
    /// cache they need not be the mod revisions at the snapshot's revision
    /// (see [`cache`]).
    keys: std::sync::Mutex<std::collections::HashMap<Vec<u8>, i64>>,
    /// Spans of user keys `[begin, end)` a listing of this snapshot read
    /// whole from etcd at the snapshot's revision, with every key in them
    /// and its mod revision (at most [`NOTED_ROWS`] rows, [`MAX_SPANS`]
    /// spans): the compares of a range the transaction read are made from
    /// them, with no second read of the range's keys at commit (a guest
    /// runner's batch lists its inbox and then commits: that read was most
    /// of a guest message's etcd reads).
    spans: std::sync::Mutex<Vec<Span>>,
}

/// The single keys `facts` says the snapshot served in `[begin, end)` (an
/// empty `end`: no end), with the mod revisions of the values served.
fn served_in(facts: Option<&Facts>, begin: &[u8], end: &[u8]) -> Vec<(Vec<u8>, i64)> {
    let Some(keys) = facts.and_then(|f| f.keys.lock().ok()) else {
        return Vec::new();
    };
    let mut out: Vec<(Vec<u8>, i64)> = keys
        .iter()
        .filter(|(k, _)| k.as_slice() >= begin && (end.is_empty() || k.as_slice() < end))
        .map(|(k, m)| (k.clone(), *m))
        .collect();
    out.sort();
    out
}

/// A span a listing read whole ([`Facts::spans`]).
struct Span {
    begin: Vec<u8>,
    end: Vec<u8>,
    /// User keys in `[begin, end)`, in order, with their mod revisions.
    rows: Vec<(Vec<u8>, i64)>,
}

impl Facts {
    /// The keys of `[begin, end)` with their mod revisions, if spans read
    /// whole cover it (one, or several end to end: a transaction lists a
    /// long range in chunks and records one read of it all).
    fn listed(&self, begin: &[u8], end: &[u8]) -> Option<Vec<(Vec<u8>, i64)>> {
        let spans = self.spans.lock().ok()?;
        let mut rows = Vec::new();
        let mut at = begin.to_vec();
        loop {
            let span = spans
                .iter()
                .filter(|s| s.begin <= at && at < s.end)
                .max_by(|a, b| a.end.cmp(&b.end))?;
            rows.extend(
                span.rows
                    .iter()
                    .filter(|(k, _)| *k >= at && k.as_slice() < end)
                    .cloned(),
            );
            if span.end.as_slice() >= end {
                return Some(rows);
            }
            at = span.end.clone();
        }
    }
}

struct EtcdSnapshot {
    inner: Arc<Inner>,
    version: Version,
    /// `Some` when its checked reads may be answered from the cache
    /// ([`Store::snapshot_for_commit`], at a recently seen revision rather
    /// than the latest, and [`Store::snapshot_remembering`]): then what it
    /// read counts only once a commit validated it.
    facts: Option<Arc<Facts>>,
}

impl EtcdSnapshot {
    /// The value of `key` at this snapshot's revision, read from etcd, and
    /// its mod revision (0: absent); the cache learns it.
    async fn fetch(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        tracing::trace!(target: "capstan_cluster::reads", kind = %key_kind(key), "get");
        let kv = self
            .inner
            .reader
            .get(self.inner.dk(key), self.version)
            .await?;
        let m = kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
        if let Ok(mut seen) = self.inner.observed.lock() {
            seen.record(self.version, key, m);
        }
        if let Ok(mut c) = self.inner.cache.lock() {
            c.learn(
                key,
                kv.as_ref().map(|kv| kv.value.as_slice()),
                m,
                self.version,
            );
        }
        Ok((kv.map(|kv| kv.value), m))
    }

    /// Notes a listed row's mod revision, unless a checked read of this
    /// snapshot already served the key: that read may have come from the
    /// cache (an older value), and its commit must compare against the
    /// revision of the value it served, not the listing's.
    fn note_unless_served(&self, key: &[u8], mod_revision: i64) {
        if let Some(f) = &self.facts
            && let Ok(mut f) = f.keys.lock()
        {
            f.entry(key.to_vec()).or_insert(mod_revision);
        }
    }

    fn note(&self, key: &[u8], mod_revision: i64) {
        if let Some(f) = &self.facts
            && let Ok(mut f) = f.keys.lock()
        {
            f.insert(key.to_vec(), mod_revision);
        }
    }

    /// Notes that a listing read `[begin, end)` whole at this snapshot's
    /// revision: `rows` are every key in it (see [`Facts::spans`]).
    fn note_span(&self, begin: &[u8], end: &[u8], rows: Vec<(Vec<u8>, i64)>) {
        if self.version == 0 || begin >= end {
            return;
        }
        if let Some(f) = &self.facts
            && let Ok(mut spans) = f.spans.lock()
            && spans.len() < MAX_SPANS
        {
            spans.push(Span {
                begin: begin.to_vec(),
                end: end.to_vec(),
                rows,
            });
        }
    }
}

#[async_trait::async_trait]
impl Snapshot for EtcdSnapshot {
    fn version(&self) -> Version {
        self.version
    }

    fn is_fresh(&self) -> bool {
        self.facts.is_none()
    }

    fn assume_absent(&self, key: &[u8]) -> bool {
        if self.facts.is_none() {
            return false;
        }
        bump(&self.inner.counters.assumed_absent, 1);
        self.note(key, 0);
        true
    }

    fn facts(&self) -> ReadFacts {
        ReadFacts(
            self.facts
                .clone()
                .map(|f| f as Arc<dyn std::any::Any + Send + Sync>),
        )
    }

    /// A value the transaction was told of (a guest runner's message, from
    /// its listing on an earlier snapshot): when the cache holds exactly
    /// this value, its mod revision is the one the commit compares, as if
    /// the cache had served the read (a changed key fails the compare).
    fn primed(&self, key: &[u8], value: &[u8]) {
        if self.facts.is_none() {
            return;
        }
        let known = self.inner.cache.lock().ok().and_then(|c| {
            c.get(key)
                .filter(|e| e.value.as_deref() == Some(value))
                .map(|e| e.mod_revision)
        });
        if let Some(m) = known {
            self.note(key, m);
        }
    }

    async fn get_checked(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.facts.is_some() {
            let hit = self
                .inner
                .cache
                .lock()
                .ok()
                .and_then(|c| c.get(key).cloned());
            if let Some(e) = hit {
                bump(&self.inner.counters.cache_hits, 1);
                self.note(key, e.mod_revision);
                return Ok(e.value);
            }
        }
        let (value, m) = self.fetch(key).await?;
        self.note(key, m);
        Ok(value)
    }

    /// Never from the cache: an unchecked read must be what the snapshot's
    /// revision holds. Its revision is noted only for a key no checked read
    /// of this snapshot served: that read may have served an older value
    /// from the cache, and the commit compares against what it served.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let (value, m) = self.fetch(key).await?;
        self.note_unless_served(key, m);
        Ok(value)
    }

    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        if opt.begin >= opt.end {
            return Ok(Vec::new());
        }
        tracing::trace!(target: "capstan_cluster::reads", kind = %key_kind(&opt.begin), "range");
        let strip = self.inner.data.len();
        let mut lo = self.inner.dk(&opt.begin);
        let mut hi = self.inner.dk(&opt.end);
        let mut out: Vec<KeyValue> = Vec::new();
        // Every row with its mod revision while the listing is short enough
        // to note as a span read whole (see [`Facts::spans`]).
        let mut listed: Option<Vec<(Vec<u8>, i64)>> = self.facts.is_some().then(Vec::new);
        let mut page = PAGE;
        loop {
            let want = if opt.limit == 0 {
                page
            } else {
                (opt.limit - out.len()).min(page)
            };
            page = (page * 4).min(MAX_PAGE);
            let resp = self
                .inner
                .page(&lo, &hi, self.version, want, opt.reverse, false)
                .await?;
            let more = resp.more;
            let kvs = resp.kvs;
            let last = kvs.last().map(|kv| kv.key.clone());
            // A short listing on a snapshot whose commit may compare what
            // it read: the rows' mod revisions are facts of this snapshot,
            // so a later checked read of one of these keys (a runner's
            // message, primed from its listing) is compared by the commit
            // without reading the key's revision first.
            let short = out.len() + kvs.len() <= NOTED_ROWS;
            let note = self.facts.is_some() && short;
            if !note {
                listed = None;
            }
            // A short listing's rows are values seen at this revision: the
            // cache learns them (a runner primes its next transaction with
            // the messages it listed: see `primed`).
            let mut cache = short.then(|| self.inner.cache.lock().ok()).flatten();
            for kv in kvs {
                if note {
                    self.note_unless_served(&kv.key[strip..], kv.mod_revision);
                }
                if let Some(c) = &mut cache {
                    c.learn(
                        &kv.key[strip..],
                        Some(&kv.value),
                        kv.mod_revision,
                        self.version,
                    );
                }
                if let Some(l) = &mut listed {
                    l.push((kv.key[strip..].to_vec(), kv.mod_revision));
                }
                out.push((kv.key[strip..].to_vec(), kv.value));
            }
            let done = opt.limit != 0 && out.len() >= opt.limit;
            match last {
                Some(last) if more && !done => {
                    if opt.reverse {
                        hi = last;
                    } else {
                        lo = key_after(&last);
                    }
                }
                last => {
                    if let Some(mut rows) = listed {
                        // Read whole: the range, or (cut short by the limit
                        // with more beyond) up to the last row returned.
                        let cut = last.filter(|_| more).map(|l| l[strip..].to_vec());
                        let (begin, end) = match (cut, opt.reverse) {
                            (None, _) => (opt.begin.clone(), opt.end.clone()),
                            (Some(l), false) => (opt.begin.clone(), key_after(&l)),
                            (Some(l), true) => (l, opt.end.clone()),
                        };
                        if opt.reverse {
                            rows.reverse();
                        }
                        self.note_span(&begin, &end, rows);
                    }
                    return Ok(out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans read whole answer for a range they cover, alone or end to end,
    /// with exactly the rows inside it; a range reaching past them, or over
    /// a gap between them, is not answered (the commit reads it).
    #[test]
    fn listed_spans_answer_only_for_what_they_cover() {
        let facts = Facts::default();
        let span = |b: &str, e: &str, rows: &[(&str, i64)]| Span {
            begin: b.as_bytes().to_vec(),
            end: e.as_bytes().to_vec(),
            rows: rows
                .iter()
                .map(|(k, m)| (k.as_bytes().to_vec(), *m))
                .collect(),
        };
        facts.spans.lock().unwrap().extend([
            span("a", "d", &[("a", 1), ("b", 2), ("c", 3)]),
            span("d", "f", &[("e", 5)]),
            span("h", "k", &[("i", 9)]),
        ]);
        let keys = |b: &str, e: &str| {
            facts.listed(b.as_bytes(), e.as_bytes()).map(|rows| {
                rows.into_iter()
                    .map(|(k, m)| (String::from_utf8(k).unwrap(), m))
                    .collect::<Vec<_>>()
            })
        };
        let own = |v: &[(&str, i64)]| Some(v.iter().map(|(k, m)| (k.to_string(), *m)).collect());
        assert_eq!(keys("b", "c"), own(&[("b", 2)]));
        assert_eq!(keys("b", "e\0"), own(&[("b", 2), ("c", 3), ("e", 5)]));
        assert_eq!(
            keys("a", "f"),
            own(&[("a", 1), ("b", 2), ("c", 3), ("e", 5)])
        );
        assert_eq!(keys("c0", "d"), own(&[]));
        assert_eq!(keys("e", "g"), None, "past the spans");
        assert_eq!(keys("a", "i"), None, "over the gap f..h");
        assert_eq!(keys("0", "b"), None, "before the spans");
    }

    fn r(a: &str, b: &str) -> (Vec<u8>, Vec<u8>) {
        (a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    #[test]
    fn tls_options() {
        let s = "etcd://127.0.0.1:2379/t?cacert=/e/ca.pem&cert=/e/c.pem&key=/e/k.pem";
        let c = EtcdConfig::parse(s).unwrap();
        assert_eq!(
            c.tls,
            Some(EtcdTls {
                cacert: "/e/ca.pem".into(),
                cert: Some(("/e/c.pem".into(), "/e/k.pem".into())),
            })
        );
        assert_eq!(c.spec(), s);
        let s = "etcd://h:1/capstan?user=root&password-file=/e/pw";
        let c = EtcdConfig::parse(s).unwrap();
        assert_eq!(c.user, Some(("root".into(), "/e/pw".into())));
        assert_eq!(c.spec(), s);
        let c = EtcdConfig::parse("etcd://h:1?cacert=/ca.pem").unwrap();
        assert_eq!(c.tls.unwrap().cert, None);
        for (bad, why) in [
            ("etcd://h:1?cert=/c&key=/k", "need cacert"),
            ("etcd://h:1?cacert=/ca&cert=/c", "go together"),
            ("etcd://h:1?cacert=/ca&key=/k", "go together"),
            ("etcd://http://h:1?cacert=/ca", ""),
            ("etcd://h:1?cacert=", "unknown option"),
            ("etcd://h:1?user=root", "go together"),
            ("etcd://h:1?password-file=/p", "go together"),
        ] {
            let e = EtcdConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn spec_parsing() {
        let c =
            EtcdConfig::parse("etcd://127.0.0.1:2379,127.0.0.1:22379/t/x?max-request-bytes=9000")
                .unwrap();
        assert_eq!(c.endpoints, vec!["127.0.0.1:2379", "127.0.0.1:22379"]);
        assert_eq!(c.prefix, "t/x");
        assert_eq!(c.max_request_bytes, 9000);
        assert_eq!(
            c.spec(),
            "etcd://127.0.0.1:2379,127.0.0.1:22379/t/x?max-request-bytes=9000"
        );
        let c = EtcdConfig::parse("etcd://localhost:2379").unwrap();
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(c.commit_snapshot_age, COMMIT_SNAPSHOT_AGE);
        let c = EtcdConfig::parse("etcd://h:1/p?commit-snapshot-age-ms=0").unwrap();
        assert_eq!(c.commit_snapshot_age, Duration::ZERO);
        assert_eq!(c.spec(), "etcd://h:1/p?commit-snapshot-age-ms=0");
        assert_eq!(c.history, compact::DEFAULT_HISTORY);
        let c = EtcdConfig::parse("etcd://h:1/p?history-ms=0").unwrap();
        assert_eq!(c.history, Duration::ZERO);
        assert_eq!(c.spec(), "etcd://h:1/p?history-ms=0");
        for bad in [
            "etcd://h:1?history-ms=604800001",
            "etcd://h:1?history-ms=-1",
            "etcd://h:1?history-ms=1h",
        ] {
            let e = EtcdConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("history-ms must be"), "{bad}: {e}");
        }
        for bad in [
            "redb:/x",
            "etcd://",
            "etcd://host",
            "etcd://host:99999",
            "etcd://h:1/a b",
            "etcd://h:1?x=1",
            "etcd://h:1?max-request-bytes=1",
            "etcd://h:1?commit-snapshot-age-ms=60001",
        ] {
            let e = EtcdConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("etcd://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(vec![
                r("c", "d"),
                r("a", "b"),
                r("b", "c"),
                r("x", "x"),
                r("e", "f")
            ]),
            vec![r("a", "d"), r("e", "f")]
        );
    }

    #[test]
    fn normalize_orders_clears_before_sets() {
        let m = vec![
            Mutation::Set(b"a".to_vec(), b"1".to_vec()),
            Mutation::ClearRange(b"a".to_vec(), b"z".to_vec()),
            Mutation::Set(b"c".to_vec(), b"2".to_vec()),
            Mutation::Set(b"c".to_vec(), b"3".to_vec()),
            Mutation::Clear(b"q".to_vec()),
            Mutation::Set(b"q".to_vec(), b"4".to_vec()),
            Mutation::Clear(b"zz".to_vec()),
        ];
        let (deletes, puts) = normalize(&m);
        assert_eq!(
            deletes,
            vec![r("a", "c"), r("c\0", "q"), r("q\0", "z"), r("zz", "zz\0")]
        );
        assert_eq!(
            puts.into_iter().collect::<Vec<_>>(),
            vec![
                (b"c".to_vec(), b"3".to_vec()),
                (b"q".to_vec(), b"4".to_vec())
            ]
        );
    }

    #[test]
    fn coarsening_covers_and_bounds() {
        let ranges: Vec<_> = (0..10u8).map(|i| (vec![i * 2], vec![i * 2 + 1])).collect();
        let c = coarsen(ranges.clone(), 3);
        assert_eq!(
            c,
            vec![
                (vec![0], vec![7]),
                (vec![8], vec![15]),
                (vec![16], vec![19])
            ]
        );
        assert_eq!(coarsen(ranges.clone(), 10), ranges);
    }

    #[test]
    fn marker_ids_are_distinct_hex_of_one_length() {
        let ids: Vec<Vec<u8>> = (0..10_000).map(|_| random_id()).collect();
        assert!(ids.iter().all(|i| {
            i.len() == 32
                && i.iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        }));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }

    /// Against a live cluster (`CAPSTAN_ETCD_ENDPOINTS`; skipped without it):
    /// an ambiguous commit that never applied is fenced by its resolution (its
    /// Txn arriving late is refused), one that applied is reported committed.
    #[tokio::test]
    async fn ambiguous_commits_resolve_by_marker() {
        let Ok(eps) = std::env::var("CAPSTAN_ETCD_ENDPOINTS") else {
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            return;
        };
        let prefix = String::from_utf8(random_id()).unwrap();
        let store = EtcdStore::open(&format!("etcd://{eps}/capstan-test/resolve-{prefix}"))
            .await
            .unwrap();
        let inner = &store.inner;
        let txn_for = |marker: &[u8], key: &[u8]| TxnRequest {
            compare: vec![Compare::create_revision(
                marker.to_vec(),
                compare_result::EQUAL,
                0,
            )],
            success: vec![
                RequestOp::put(inner.dk(key), b"x".to_vec(), 0),
                RequestOp::put(marker.to_vec(), MARKER_COMMITTED.to_vec(), 0),
            ],
            failure: Vec::new(),
        };
        // Lost before reaching etcd: fenced, and the late Txn changes nothing.
        let lost = [inner.markers.as_slice(), &random_id()].concat();
        assert_eq!(
            inner.resolve(&lost, Instant::now()).await,
            Err(StoreError::Conflict)
        );
        let late = inner.endpoints.clients[0]
            .clone()
            .txn(txn_for(&lost, b"late"))
            .await
            .unwrap();
        assert!(!late.succeeded, "a fenced commit applied");
        assert_eq!(
            inner.resolve(&lost, Instant::now()).await,
            Err(StoreError::Conflict)
        );
        // Applied before the connection dropped: reported at its revision.
        let applied = [inner.markers.as_slice(), &random_id()].concat();
        let resp = inner.endpoints.clients[0]
            .clone()
            .txn(txn_for(&applied, b"applied"))
            .await
            .unwrap();
        assert!(resp.succeeded);
        let revision = rev(resp.header.unwrap().revision);
        assert_eq!(inner.resolve(&applied, Instant::now()).await, Ok(revision));
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.get(b"late").await.unwrap(), None);
        assert_eq!(snap.get(b"applied").await.unwrap(), Some(b"x".to_vec()));
    }
}
