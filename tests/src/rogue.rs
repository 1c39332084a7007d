//! A peer that plays by its own rules: a cluster of its own (a self-signed
//! cluster key and a node certificate signed by it, as every lone node
//! makes), speaking Capstan's node-to-node protocol (`proto/schema/net.capnp`
//! over QUIC) directly instead of through a `capstan` daemon.
//!
//! As a **receiver** ([`RoguePeer::start`]) it serves a gateway whose every
//! restored object takes mail: each `deliver` is recorded and answered as
//! scripted ([`Answer`]), so a test can make a node's deliveries fail in
//! any way the protocol allows. As a **caller** ([`RoguePeer::settle_rejected`])
//! it calls what it got in that mail the way a hostile node would. Its
//! locator also works as an invitation (`accept`), taken once.
//!
//! Everything runs on a thread of its own (capnp-rpc is `!Send`: a
//! current-thread runtime with a `LocalSet`), stopped when dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp::Error as CapError;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use capstan_proto::Locator;
use capstan_proto::net_capnp::{gateway, object};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// How the rogue answers one `deliver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Takes it.
    Ok,
    /// `overloaded`: the protocol's "not now, try again later".
    Overloaded(String),
    /// `failed`: the protocol's "no, for good".
    Failed(String),
    /// Closes the connection without answering.
    Disconnect,
}

/// One `deliver` the rogue received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The outbox item's id (16 bytes): the same on every retry.
    pub id: Vec<u8>,
    /// The package's text chunks (empty for a request).
    pub strings: Vec<String>,
    /// The references it carried, as locators.
    pub refs: Vec<Locator>,
    /// How the rogue answered it.
    pub answer: Answer,
}

#[derive(Default)]
struct State {
    deliveries: Vec<Delivery>,
    script: VecDeque<Answer>,
    /// The answer once the script is used up (`None`: [`Answer::Ok`]).
    default: Option<Answer>,
    /// Every `accept` (redeemed invitation) received, in order.
    accepts: Vec<AcceptCall>,
    /// While set, `accept` calls wait before answering.
    hold_accepts: bool,
}

/// One `accept` the rogue received (as an inviter).
#[derive(Debug, Clone)]
pub struct AcceptCall {
    /// The request id the redeemer sent (empty when none).
    pub req: Vec<u8>,
    /// The handle it offered (designating its agent).
    pub handle: Locator,
    /// Whether the rogue took it (one use: only the first request id).
    pub taken: bool,
}

/// A cluster identity: `[node certificate, cluster certificate]` and the node key.
struct Identity {
    cluster_id: [u8; 32],
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Identity {
    fn new() -> Identity {
        let cluster_key = KeyPair::generate_for(&PKCS_ED25519).expect("cluster key");
        let ca_params = || {
            let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            ca.distinguished_name
                .push(DnType::CommonName, "capstan cluster");
            ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
            ca.not_after = rcgen::date_time_ymd(2124, 1, 1);
            ca
        };
        let ca_cert = ca_params().self_signed(&cluster_key).expect("CA cert");
        let node_key = KeyPair::generate_for(&PKCS_ED25519).expect("node key");
        let mut node = CertificateParams::new(vec!["capstan".to_string()]).expect("node params");
        node.distinguished_name
            .push(DnType::CommonName, "capstan node");
        node.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        node.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        node.not_before = rcgen::date_time_ymd(2024, 1, 1);
        node.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let issuer = Issuer::new(ca_params(), &cluster_key);
        let node_cert = node.signed_by(&node_key, &issuer).expect("node cert");
        Identity {
            cluster_id: *blake3::hash(cluster_key.public_key_raw()).as_bytes(),
            chain: vec![node_cert.der().clone(), ca_cert.der().clone()],
            key_der: node_key.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    fn server_config(&self) -> quinn::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .expect("server certificate");
        tls.alpn_protocols = vec![b"capstan/1".to_vec()];
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC server config"),
        ))
    }

    fn client_config(&self) -> quinn::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(self.chain.clone(), self.key())
            .expect("client certificate");
        tls.alpn_protocols = vec![b"capstan/1".to_vec()];
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client config"),
        ))
    }
}

/// A server verifier that accepts anything: the rogue does not care whom it calls.
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A hostile (or merely unreliable) peer cluster; see the module docs.
pub struct RoguePeer {
    id: Identity,
    addr: SocketAddr,
    swiss: [u8; 32],
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RoguePeer {
    /// Starts the rogue's receiving side on a loopback port.
    pub fn start() -> RoguePeer {
        let id = Identity::new();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let server = id.server_config();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rogue runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap())
                    .expect("rogue endpoint");
                addr_tx.send(endpoint.local_addr().unwrap()).unwrap();
                let accept = async {
                    while let Some(incoming) = endpoint.accept().await {
                        let st = st.clone();
                        tokio::task::spawn_local(async move {
                            if let Ok(conn) = incoming.await {
                                serve(conn, st).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
                endpoint.close(0u32.into(), b"rogue stopping");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("rogue listening");
        let mut swiss = [0u8; 32];
        swiss.copy_from_slice(&capstan_proto::FormulaId::random().0);
        RoguePeer {
            id,
            addr,
            swiss,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// A locator of the rogue's "agent" (any swiss restores it).
    pub fn locator(&self) -> String {
        Locator {
            cluster: self.id.cluster_id,
            swiss: self.swiss,
            addrs: vec![self.addr.to_string()],
        }
        .to_string()
    }

    /// The answers to the next deliveries, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// The answer once the script is used up (initially [`Answer::Ok`]).
    pub fn answer_by_default(&self, a: Answer) {
        self.state.lock().unwrap().default = Some(a);
    }

    /// Every delivery received so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().deliveries.clone()
    }

    /// Every `accept` received so far (the rogue's locator used as an
    /// invitation), in order. The rogue takes an invitation once: again
    /// only with the same request id.
    pub fn accepts(&self) -> Vec<AcceptCall> {
        self.state.lock().unwrap().accepts.clone()
    }

    /// Holds (`true`) or releases the answers to `accept` calls.
    pub fn hold_accepts(&self, hold: bool) {
        self.state.lock().unwrap().hold_accepts = hold;
    }

    /// Redeems the invitation `invitation` as this rogue cluster, offering
    /// a handle for itself, with request id `req`; the node's answer: the
    /// swiss of its handle for the rogue, or its error text.
    pub fn accept_invitation(
        &self,
        invitation: &Locator,
        req: [u8; 16],
    ) -> Result<[u8; 32], String> {
        let handle = (self.id.cluster_id, self.swiss, self.addr.to_string());
        self.call(invitation, move |o| async move {
            let mut r = o.accept_request();
            {
                let mut h = r.get().init_handle();
                h.set_cluster_id(&handle.0);
                h.set_swiss(&handle.1);
                h.reborrow().init_addrs(1).set(0, handle.2.as_str());
            }
            r.get().set_req_id(&req);
            let a = r.send().promise.await?;
            let s = a.get()?.get_swiss()?;
            s.try_into()
                .map_err(|_| CapError::failed("a swiss number is 32 bytes".into()))
        })
    }

    /// Dials the node of `target` as this rogue cluster, restores it and
    /// delivers a package to it: `text`, then one reference per entry of
    /// `refs` (each named `r0`, `r1`, …), under a fresh item id: what a
    /// peer holding `target` can send. The node's answer: `Ok`, or its
    /// error text.
    pub fn deliver(&self, target: &Locator, text: &str, refs: &[Locator]) -> Result<(), String> {
        self.deliver_item(target, capstan_proto::RequestId::random().0, text, refs)
    }

    /// [`RoguePeer::deliver`] under the item id `item` (a retry of an item
    /// uses the same id).
    pub fn deliver_item(
        &self,
        target: &Locator,
        item: [u8; 16],
        text: &str,
        refs: &[Locator],
    ) -> Result<(), String> {
        let (text, refs) = (text.to_string(), refs.to_vec());
        self.call(target, move |o| async move {
            let mut d = o.deliver_request();
            d.get().set_id(&item);
            {
                let mut e = d.get().init_envelope();
                e.set_message_id(&capstan_proto::RequestId::random().0);
                e.set_date_ms(1);
                let mut p = e.init_body().init_package();
                {
                    let mut s = p.reborrow().init_strings(refs.len() as u32 + 1);
                    s.set(0, text.as_str());
                    for i in 1..=refs.len() {
                        s.set(i as u32, "");
                    }
                }
                {
                    let mut n = p.reborrow().init_names(refs.len() as u32);
                    for i in 0..refs.len() {
                        n.set(i as u32, format!("r{i}").as_str());
                    }
                }
                let mut l = p.init_refs(refs.len() as u32);
                for (i, r) in refs.iter().enumerate() {
                    let mut x = l.reborrow().get(i as u32);
                    x.set_cluster_id(&r.cluster);
                    x.set_swiss(&r.swiss);
                    let mut a = x.init_addrs(r.addrs.len() as u32);
                    for (j, addr) in r.addrs.iter().enumerate() {
                        a.set(j as u32, addr.as_str());
                    }
                }
            }
            d.send().promise.await.map(drop)
        })
    }

    /// Dials the node of `target` as this rogue cluster, restores it and
    /// calls `settle` on it with a rejection: what a hostile peer holding
    /// `target` can do. The node's answer: `Ok`, or its error text.
    pub fn settle_rejected(&self, target: &Locator, reason: &str) -> Result<(), String> {
        let reason = reason.to_string();
        self.call(target, move |o| async move {
            let mut s = o.settle_request();
            s.get().set_id(&capstan_proto::RequestId::random().0);
            s.get().init_settlement().set_rejected(reason.as_str());
            s.send().promise.await.map(drop)
        })
    }

    /// Dials the node of `target` as this rogue cluster, opens a stream and
    /// sends only the header of a Cap'n Proto frame: one segment of `words`
    /// words (8 bytes each), then nothing. A node that refuses the claim
    /// closes the stream: the time it took. A node that believes it waits
    /// for the data: an error after `patience`.
    pub fn claim_frame(
        &self,
        target: &Locator,
        words: u32,
        patience: Duration,
    ) -> Result<Duration, String> {
        let client = self.id.client_config();
        let target = target.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rogue client runtime");
        rt.block_on(async move {
            let (_endpoint, conn) = dial(client, &target).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
            // segment count minus one, then the segment's size in words
            let mut header = Vec::new();
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&words.to_le_bytes());
            send.write_all(&header)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let t = std::time::Instant::now();
            let mut buf = [0u8; 64];
            let closed = tokio::time::timeout(patience, async {
                loop {
                    match recv.read(&mut buf).await {
                        Ok(Some(_)) => continue,
                        // finished or reset by the node: it gave up on us
                        Ok(None) | Err(_) => return,
                    }
                }
            })
            .await;
            conn.close(0u32.into(), b"done");
            match closed {
                Ok(()) => Ok(t.elapsed()),
                Err(_) => Err(format!(
                    "the node kept the stream open for {patience:?}, waiting for the {} bytes the header claimed",
                    u64::from(words) * 8
                )),
            }
        })
    }

    /// Dials the node of `target` as this rogue cluster, restores `target`
    /// and runs `f` on the capability (within 20 s); its error as text.
    fn call<T, F, Fut>(&self, target: &Locator, f: F) -> Result<T, String>
    where
        F: FnOnce(object::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, CapError>>,
    {
        let client = self.id.client_config();
        let target = target.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rogue client runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let call = async {
                let (_endpoint, conn) = dial(client, &target).await?;
                let (send, recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
                let network = twoparty::VatNetwork::new(
                    recv.compat(),
                    send.compat_write(),
                    Side::Client,
                    Default::default(),
                );
                let mut rpc = RpcSystem::new(Box::new(network), None);
                let gateway: gateway::Client = rpc.bootstrap(Side::Server);
                tokio::task::spawn_local(rpc);
                let mut r = gateway.restore_request();
                r.get().set_swiss(&target.swiss);
                let o = r.send().pipeline.get_object();
                let r = f(o).await.map_err(|e| e.to_string());
                conn.close(0u32.into(), b"done");
                r
            };
            match tokio::time::timeout(Duration::from_secs(20), call).await {
                Ok(r) => r,
                Err(_) => Err("the node did not answer within 20 s".into()),
            }
        })
    }
}

/// Dials the node of `target` from a fresh loopback endpoint with `client`
/// (the endpoint is returned: dropping it closes the connection).
async fn dial(
    client: quinn::ClientConfig,
    target: &Locator,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())
        .map_err(|e| format!("rogue endpoint: {e}"))?;
    endpoint.set_default_client_config(client);
    let addr: SocketAddr = target.addrs[0]
        .parse()
        .map_err(|e| format!("address: {e}"))?;
    let conn = endpoint
        .connect(addr, "capstan")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok((endpoint, conn))
}

impl Drop for RoguePeer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves a gateway on every stream the other side opens on `conn`.
async fn serve(conn: quinn::Connection, state: Arc<Mutex<State>>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let gw: gateway::Client = capnp_rpc::new_client(RogueGateway {
            conn: conn.clone(),
            state: state.clone(),
        });
        let network = twoparty::VatNetwork::new(
            recv.compat(),
            send.compat_write(),
            Side::Server,
            Default::default(),
        );
        let rpc = RpcSystem::new(Box::new(network), Some(gw.client));
        tokio::task::spawn_local(rpc);
    }
}

struct RogueGateway {
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
}

impl gateway::Server for RogueGateway {
    async fn restore(
        self: Rc<Self>,
        _: gateway::RestoreParams,
        mut results: gateway::RestoreResults,
    ) -> Result<(), CapError> {
        results.get().set_object(capnp_rpc::new_client(RogueObject {
            conn: self.conn.clone(),
            state: self.state.clone(),
        }));
        Ok(())
    }
}

struct RogueObject {
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
}

fn read_ref(r: capstan_proto::records_capnp::remote_ref::Reader<'_>) -> Result<Locator, CapError> {
    let mut addrs = Vec::new();
    for a in r.get_addrs()?.iter() {
        addrs.push(a?.to_string()?);
    }
    let fixed = |d: &[u8]| -> Result<[u8; 32], CapError> {
        d.try_into()
            .map_err(|_| CapError::failed("not 32 bytes".into()))
    };
    Ok(Locator {
        cluster: fixed(r.get_cluster_id()?)?,
        swiss: fixed(r.get_swiss()?)?,
        addrs,
    })
}

fn read_refs(
    list: capnp::struct_list::Reader<'_, capstan_proto::records_capnp::remote_ref::Owned>,
) -> Result<Vec<Locator>, CapError> {
    list.iter().map(read_ref).collect()
}

impl object::Server for RogueObject {
    /// What a node asks before it names a locator (`adopt-locator` checks
    /// it with its cluster): the rogue says it is an agent.
    async fn show(
        self: Rc<Self>,
        _: object::ShowParams,
        mut results: object::ShowResults,
    ) -> Result<(), CapError> {
        let mut r = results.get();
        r.set_type("host");
        r.set_detail("a peer cluster's agent");
        Ok(())
    }

    async fn accept(
        self: Rc<Self>,
        params: object::AcceptParams,
        mut results: object::AcceptResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = p.get_req_id().map(<[u8]>::to_vec).unwrap_or_default();
        let handle = read_ref(p.get_handle()?)?;
        let taken = {
            let mut st = self.state.lock().unwrap();
            let first = st.accepts.iter().find(|a| a.taken).map(|a| a.req.clone());
            let taken = match first {
                None => true,
                Some(r) => !r.is_empty() && r == req,
            };
            st.accepts.push(AcceptCall { req, handle, taken });
            taken
        };
        while self.state.lock().unwrap().hold_accepts {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !taken {
            return Err(CapError::failed(
                "unknown or revoked locator: it was cancelled, or never issued by this cluster"
                    .into(),
            ));
        }
        results
            .get()
            .set_swiss(&capstan_proto::FormulaId::random().0);
        Ok(())
    }

    async fn deliver(
        self: Rc<Self>,
        params: object::DeliverParams,
        _: object::DeliverResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let id = p.get_id()?.to_vec();
        use capstan_proto::records_capnp::envelope::body::Which;
        let (strings, refs) = match p.get_envelope()?.get_body().which()? {
            Which::Package(pk) => {
                let mut strings = Vec::new();
                for s in pk.get_strings()?.iter() {
                    strings.push(s?.to_string()?);
                }
                (strings, read_refs(pk.get_refs()?)?)
            }
            Which::Request(_) => (Vec::new(), Vec::new()),
        };
        let answer = {
            let mut st = self.state.lock().unwrap();
            let answer = st
                .script
                .pop_front()
                .or_else(|| st.default.clone())
                .unwrap_or(Answer::Ok);
            st.deliveries.push(Delivery {
                id,
                strings,
                refs,
                answer: answer.clone(),
            });
            answer
        };
        match answer {
            Answer::Ok => Ok(()),
            Answer::Overloaded(why) => Err(CapError::overloaded(why)),
            Answer::Failed(why) => Err(CapError::failed(why)),
            Answer::Disconnect => {
                self.conn.close(3u32.into(), b"rogue hangs up");
                std::future::pending().await
            }
        }
    }
}

/// Opens `per_identity` connections to the node of `target` as each of
/// `identities` fresh clusters (self-signed, as anyone can make them), from
/// the source address `bind`, and holds them for `hold`: how many the node
/// kept open. Runs on the calling thread.
pub fn flood(
    target: &Locator,
    identities: usize,
    per_identity: usize,
    bind: std::net::IpAddr,
    hold: Duration,
) -> usize {
    let addr: SocketAddr = target.addrs[0].parse().expect("locator address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("flood runtime");
    rt.block_on(async move {
        let endpoint = quinn::Endpoint::client(SocketAddr::new(bind, 0)).expect("flood endpoint");
        let mut dials = Vec::new();
        for _ in 0..identities {
            let config = Identity::new().client_config();
            for _ in 0..per_identity {
                if let Ok(connecting) = endpoint.connect_with(config.clone(), addr, "capstan") {
                    dials.push(async move {
                        tokio::time::timeout(Duration::from_secs(10), connecting)
                            .await
                            .ok()
                            .and_then(Result::ok)
                    });
                }
            }
        }
        let conns: Vec<quinn::Connection> = futures::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect();
        tokio::time::sleep(hold).await;
        let open = conns.iter().filter(|c| c.close_reason().is_none()).count();
        for c in &conns {
            c.close(0u32.into(), b"flood over");
        }
        endpoint.close(0u32.into(), b"flood over");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        open
    })
}
