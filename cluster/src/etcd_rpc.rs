//! A small etcd v3 client: the messages and calls of etcd's gRPC API that
//! [`crate::etcd_store`] uses (`KV.Range`, `KV.Txn`, `KV.Compact`,
//! `Lease.LeaseGrant`),
//! written out as prost messages.
//!
//! Why not the `etcd-client` crate: its build script compiles etcd's `.proto`
//! files with `protoc`, so a machine with only the Rust toolchain could not
//! build Capstan at all (not even the embedded-store demo). The subset here is
//! written by hand from etcd's `rpc.proto` and `kv.proto` (field numbers and
//! types as there; the wire format of these messages is frozen by etcd's
//! compatibility promise), needs no code generation, and is tested against a
//! real etcd by the etcd conformance suite. Owning the client also lets the
//! store build its batched transactions directly.
//!
//! Every request is sent with the `hasleader: true` metadata etcd's own client
//! sends for "require leader": a member that lost its leader answers at once
//! (`Unavailable`) instead of waiting for an election.

use std::sync::Arc;
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `RangeRequest.SortOrder`.
pub mod sort_order {
    pub const NONE: i32 = 0;
    pub const ASCEND: i32 = 1;
    pub const DESCEND: i32 = 2;
}

/// `RangeRequest.SortTarget`.
pub mod sort_target {
    pub const KEY: i32 = 0;
}

/// `etcdserverpb.RangeRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub limit: i64,
    #[prost(int64, tag = "4")]
    pub revision: i64,
    #[prost(int32, tag = "5")]
    pub sort_order: i32,
    #[prost(int32, tag = "6")]
    pub sort_target: i32,
    /// Served by the member from its own state, without a round of the
    /// leader (safe for reads at a fixed revision the member has applied).
    #[prost(bool, tag = "7")]
    pub serializable: bool,
    #[prost(bool, tag = "8")]
    pub keys_only: bool,
    #[prost(bool, tag = "9")]
    pub count_only: bool,
}

/// `etcdserverpb.RangeResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(bool, tag = "3")]
    pub more: bool,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.DeleteRangeRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

/// `etcdserverpb.DeleteRangeResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

/// `etcdserverpb.RequestOp`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RequestOp {
    #[prost(oneof = "Request", tags = "1, 2, 3, 4")]
    pub request: Option<Request>,
}

/// `RequestOp.request`.
#[derive(Clone, PartialEq, ::prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    #[prost(message, tag = "2")]
    Put(PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeRequest),
    #[prost(message, tag = "4")]
    Txn(TxnRequest),
}

/// `etcdserverpb.ResponseOp`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ResponseOp {
    #[prost(oneof = "Response", tags = "1, 2, 3, 4")]
    pub response: Option<Response>,
}

/// `ResponseOp.response`.
#[derive(Clone, PartialEq, ::prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Range(RangeResponse),
    #[prost(message, tag = "2")]
    Put(PutResponse),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeResponse),
    #[prost(message, tag = "4")]
    Txn(TxnResponse),
}

/// `Compare.CompareResult`.
pub mod compare_result {
    pub const EQUAL: i32 = 0;
    pub const GREATER: i32 = 1;
    pub const LESS: i32 = 2;
    pub const NOT_EQUAL: i32 = 3;
}

/// `Compare.CompareTarget`.
pub mod compare_target {
    pub const CREATE: i32 = 1;
    pub const MOD: i32 = 2;
}

/// `etcdserverpb.Compare`.
#[derive(Clone, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Compare {
    #[prost(int32, tag = "1")]
    pub result: i32,
    #[prost(int32, tag = "2")]
    pub target: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    #[prost(oneof = "TargetUnion", tags = "4, 5, 6, 7, 8")]
    pub target_union: Option<TargetUnion>,
    #[prost(bytes = "vec", tag = "64")]
    pub range_end: Vec<u8>,
}

/// `Compare.target_union`.
#[derive(Clone, PartialEq, Eq, Hash, ::prost::Oneof)]
pub enum TargetUnion {
    #[prost(int64, tag = "4")]
    Version(i64),
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    #[prost(bytes, tag = "7")]
    Value(Vec<u8>),
    #[prost(int64, tag = "8")]
    Lease(i64),
}

impl Compare {
    /// `mod_revision(key) <op> revision`.
    pub fn mod_revision(key: Vec<u8>, result: i32, revision: i64) -> Compare {
        Compare {
            result,
            target: compare_target::MOD,
            key,
            target_union: Some(TargetUnion::ModRevision(revision)),
            range_end: Vec::new(),
        }
    }

    /// `create_revision(key) <op> revision`.
    pub fn create_revision(key: Vec<u8>, result: i32, revision: i64) -> Compare {
        Compare {
            result,
            target: compare_target::CREATE,
            key,
            target_union: Some(TargetUnion::CreateRevision(revision)),
            range_end: Vec::new(),
        }
    }

    /// The same comparison over every key of `[key, end)`.
    pub fn with_range(mut self, end: Vec<u8>) -> Compare {
        self.range_end = end;
        self
    }
}

impl RequestOp {
    pub fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
        RequestOp {
            request: Some(Request::Put(PutRequest { key, value, lease })),
        }
    }

    /// Deletes `key`, or every key of `[key, end)` when `end` is not empty.
    pub fn delete(key: Vec<u8>, end: Vec<u8>) -> RequestOp {
        RequestOp {
            request: Some(Request::DeleteRange(DeleteRangeRequest {
                key,
                range_end: end,
            })),
        }
    }

    pub fn get(key: Vec<u8>) -> RequestOp {
        RequestOp {
            request: Some(Request::Range(RangeRequest {
                key,
                ..Default::default()
            })),
        }
    }

    pub fn txn(txn: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(Request::Txn(txn)),
        }
    }
}

/// `etcdserverpb.TxnRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

/// `etcdserverpb.TxnResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct TxnResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

/// `etcdserverpb.AuthenticateRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct AuthenticateRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub password: String,
}

/// `etcdserverpb.AuthenticateResponse` (its header is not read).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct AuthenticateResponse {
    #[prost(string, tag = "2")]
    pub token: String,
}

/// `etcdserverpb.LeaseGrantRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    #[prost(int64, tag = "2")]
    pub id: i64,
}

/// `etcdserverpb.LeaseGrantResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

/// `etcdserverpb.CompactionRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CompactionRequest {
    #[prost(int64, tag = "1")]
    pub revision: i64,
    #[prost(bool, tag = "2")]
    pub physical: bool,
}

/// `etcdserverpb.CompactionResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CompactionResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The server answered with a gRPC status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The connection could not be made or broke.
    #[error("transport error: {0}")]
    Transport(String),
    /// No answer in time (the outcome of a write is unknown).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Options of a connection to one etcd member.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// The transport's own per-request timeout (a backstop).
    pub timeout: Duration,
    pub keep_alive: Duration,
    pub max_decoding_bytes: usize,
    /// TLS (an `https://` URL): the CA's PEM, and this client's
    /// certificate and key PEM if the members require one.
    pub tls: Option<TlsFiles>,
    /// An etcd user and its password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

/// PEM files of a TLS connection.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// A connection to one etcd member (cheap to clone; calls multiplex on one
/// HTTP/2 connection, reconnected lazily after a failure).
#[derive(Clone)]
pub struct EtcdClient {
    grpc: tonic::client::Grpc<Channel>,
    auth: Option<Arc<Auth>>,
}

/// A user's credentials and the token the member gave for them (etcd's
/// simple tokens are the member's own: each client authenticates itself).
struct Auth {
    user: String,
    password: String,
    token: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdClient")
    }
}

const RANGE: &str = "/etcdserverpb.KV/Range";
const TXN: &str = "/etcdserverpb.KV/Txn";
const COMPACT: &str = "/etcdserverpb.KV/Compact";
const LEASE_GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";

impl EtcdClient {
    /// A client of the member at `url` (`http://HOST:PORT`). Connects on
    /// first use: an unreachable member fails its first call, not this.
    pub fn new(url: &str, o: &ConnectOptions) -> Result<EtcdClient, RpcError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| RpcError::Transport(format!("bad etcd endpoint {url:?}: {e}")))?
            .connect_timeout(o.connect_timeout)
            .timeout(o.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(o.keep_alive)
            .keep_alive_timeout(o.keep_alive)
            .keep_alive_while_idle(true);
        let endpoint = match &o.tls {
            None => endpoint,
            Some(t) => {
                let mut cfg = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca));
                if let Some((cert, key)) = &t.identity {
                    cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                endpoint.tls_config(cfg).map_err(|e| {
                    RpcError::Transport(format!("bad TLS settings for etcd endpoint {url:?}: {e}"))
                })?
            }
        };
        let channel = endpoint.connect_lazy();
        Ok(EtcdClient {
            grpc: tonic::client::Grpc::new(channel).max_decoding_message_size(o.max_decoding_bytes),
            auth: o.user.as_ref().map(|(user, password)| {
                Arc::new(Auth {
                    user: user.clone(),
                    password: password.clone(),
                    token: std::sync::Mutex::new(None),
                })
            }),
        })
    }

    /// The member's token for this client's user (asked once, and again
    /// when `stale` is the one it refused).
    async fn token(&self, auth: &Auth, stale: Option<&str>) -> Result<String, RpcError> {
        {
            let t = auth.token.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = t.as_ref()
                && Some(t.as_str()) != stale
            {
                return Ok(t.clone());
            }
        }
        let r: AuthenticateResponse = self
            .call(
                AUTHENTICATE,
                AuthenticateRequest {
                    name: auth.user.clone(),
                    password: auth.password.clone(),
                },
                None,
            )
            .await?;
        *auth.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.token.clone());
        Ok(r.token)
    }

    async fn unary<Q, R>(&self, path: &'static str, msg: Q) -> Result<R, RpcError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let Some(auth) = &self.auth else {
            return self.call(path, msg, None).await;
        };
        let token = self.token(auth, None).await?;
        match self.call(path, msg.clone(), Some(&token)).await {
            // A member restarted, or the token expired: once more, afresh.
            Err(RpcError::Status(s)) if s.message().contains("invalid auth token") => {
                let token = self.token(auth, Some(&token)).await?;
                self.call(path, msg, Some(&token)).await
            }
            r => r,
        }
    }

    async fn call<Q, R>(
        &self,
        path: &'static str,
        msg: Q,
        token: Option<&str>,
    ) -> Result<R, RpcError>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| RpcError::Transport(e.to_string()))?;
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        if let Some(t) = token {
            req.metadata_mut().insert(
                "token",
                t.parse().map_err(|_| {
                    RpcError::Transport("etcd gave an auth token that is no header value".into())
                })?,
            );
        }
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        grpc.unary(req, PathAndQuery::from_static(path), codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(RpcError::Status)
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, RpcError> {
        self.unary(RANGE, req).await
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, RpcError> {
        self.unary(TXN, req).await
    }

    /// Compacts the history before `revision` (not waiting for the
    /// members' backends to free the space: `physical` false).
    pub async fn compact(&self, revision: i64) -> Result<CompactionResponse, RpcError> {
        self.unary(
            COMPACT,
            CompactionRequest {
                revision,
                physical: false,
            },
        )
        .await
    }

    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrantResponse, RpcError> {
        self.unary(LEASE_GRANT, LeaseGrantRequest { ttl, id: 0 })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The protobuf encoding of `Compare{result: LESS, target: MOD, key: "k",
    /// mod_revision: 7, range_end: "l"}` and of a put, worked out by hand
    /// from rpc.proto's field numbers (tag 64 takes a two-byte key): it pins
    /// the field numbers. That etcd reads them so is shown by the etcd
    /// conformance suite, which runs against a live cluster.
    #[test]
    fn compare_encodes_like_etcd() {
        let c =
            Compare::mod_revision(b"k".to_vec(), compare_result::LESS, 7).with_range(b"l".to_vec());
        assert_eq!(
            c.encode_to_vec(),
            vec![
                0x08, 0x02, 0x10, 0x02, 0x1a, 0x01, b'k', 0x30, 0x07, 0x82, 0x04, 0x01, b'l'
            ]
        );
        let op = RequestOp::put(b"a".to_vec(), b"b".to_vec(), 0);
        assert_eq!(
            op.encode_to_vec(),
            vec![0x12, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b']
        );
    }
}
