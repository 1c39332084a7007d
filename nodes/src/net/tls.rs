//! TLS for node-to-node QUIC: TLS 1.3 only, ALPN `capstan/1`, both sides
//! present `[node certificate, cluster certificate]`.
//!
//! Trust is by cluster id, never by address or name: a dialler names the
//! cluster it expects (from the locator) and accepts the peer only if the
//! peer's node certificate is signed by a cluster certificate whose key
//! hashes to that id. A listener accepts any cluster (federation) and
//! learns the caller's cluster id the same way.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::identity::{Identity, cluster_id_of_anchor};

pub const ALPN: &[u8] = b"capstan/1";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a peer's chain; returns its cluster id.
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<[u8; 32], rustls::Error> {
    let ca = intermediates
        .first()
        .ok_or_else(|| rustls::Error::General("the peer sent no cluster certificate".into()))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone().into_owned())?;
    let cluster = cluster_id_of_anchor(&roots.roots[0])?;
    let parsed = ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], now, algs.all)?;
    Ok(cluster)
}

/// Verifies either side of a connection.
#[derive(Debug)]
pub struct PeerVerifier {
    /// For a dialler: the cluster the locator names.
    expect: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = verify_chain(end_entity, intermediates, now, self.algs())?;
        match self.expect {
            Some(want) if want != got => Err(rustls::Error::General(format!(
                "the node at this address belongs to cluster {}, not to cluster {} named by the locator",
                capstan_proto::locator::encode32(&got),
                capstan_proto::locator::encode32(&want)
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs().supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, now, self.algs())?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs().supported_schemes()
    }
}

/// The listener's TLS configuration.
pub fn server_config(id: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        expect: None,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key_der())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A dialler's TLS configuration for a peer of cluster `expect`.
pub fn client_config(id: &Identity, expect: [u8; 32]) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        expect: Some(expect),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key_der())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
