//! A node's identity: its Ed25519 key and certificate, and the cluster key
//! that signed it. A lone node is its own cluster: on first start it makes
//! both keys. `cluster-id = blake3(cluster public key)` (the raw 32-byte
//! Ed25519 key).
//!
//! Files, under `<home>/identity/` (directory 0700, files 0600, DER):
//! `cluster.key`, `cluster.crt` (self-signed CA), `node.key`, `node.crt`
//! (signed by the cluster key; usable as TLS server and client).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo's contents
/// (AlgorithmIdentifier 1.3.101.112, then the BIT STRING header).
const ED25519_SPKI_CONTENTS: [u8; 10] =
    [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// This node's credentials.
pub struct Identity {
    pub cluster_id: [u8; 32],
    /// `[node certificate, cluster certificate]`.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field(
                "cluster_id",
                &capstan_proto::locator::encode32(&self.cluster_id),
            )
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Loads the identity of `home`, making a new lone-node cluster on first use.
    pub fn load_or_create(home: &Path) -> anyhow::Result<Identity> {
        let dir = home.join("identity");
        let files = ["cluster.key", "cluster.crt", "node.key", "node.crt"].map(|f| dir.join(f));
        let present = files.iter().filter(|f| f.exists()).count();
        if present == 0 {
            create(&dir, &files)?;
        } else if present != files.len() {
            bail!(
                "the node identity in {} is incomplete ({present} of 4 files); restore it from a backup, or remove the directory to make a new identity (peers will no longer recognise this node)",
                dir.display()
            );
        }
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let cluster_crt = CertificateDer::from(read(&files[1])?);
        let node_key = PrivatePkcs8KeyDer::from(read(&files[2])?);
        let node_crt = CertificateDer::from(read(&files[3])?);
        let cluster_id = cluster_id_of(&cluster_crt)
            .with_context(|| format!("bad cluster certificate {}", files[1].display()))?;
        Ok(Identity {
            cluster_id,
            chain: vec![node_crt, cluster_crt],
            key: node_key,
        })
    }
}

impl Identity {
    /// The identity of `home` as a node of the cluster whose CA is
    /// (`ca_key`, `ca_cert`): made on first start; a home that belongs to
    /// another cluster is refused.
    pub fn load_or_join(home: &Path, ca_key: &[u8], ca_cert: &[u8]) -> anyhow::Result<Identity> {
        let dir = home.join("identity");
        let files = ["cluster.key", "cluster.crt", "node.key", "node.crt"].map(|f| dir.join(f));
        let want = cluster_id_of(&CertificateDer::from(ca_cert.to_vec()))
            .context("bad cluster certificate in the store")?;
        if !files.iter().any(|f| f.exists()) {
            write_identity(&dir, &files, ca_key, ca_cert)?;
            tracing::info!(dir = %dir.display(), "certified this node's key with the cluster key");
        }
        let id = Identity::load_or_create(home)?;
        if id.cluster_id != want {
            bail!(
                "the home {} belongs to another cluster ({}…) than the store's ({}…); use a fresh --home for this cluster",
                home.display(),
                &capstan_proto::locator::encode32(&id.cluster_id)[..12],
                &capstan_proto::locator::encode32(&want)[..12]
            );
        }
        Ok(id)
    }
}

fn create(dir: &Path, files: &[PathBuf; 4]) -> anyhow::Result<()> {
    let (ca_key, ca_cert) = new_cluster_ca()?;
    write_identity(dir, files, &ca_key, &ca_cert)?;
    tracing::info!(dir = %dir.display(), "made a new node identity (a lone-node cluster)");
    Ok(())
}

/// The parameters of every cluster CA certificate (fixed, so that a node can
/// be certified with the CA key alone).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
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
    Ok(ca)
}

/// A new cluster key and its self-signed CA certificate (both DER).
pub fn new_cluster_ca() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let cluster_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let ca_cert = ca_params()?.self_signed(&cluster_key)?;
    Ok((cluster_key.serialize_der(), ca_cert.der().to_vec()))
}

/// Writes a node key certified by the cluster key `ca_key` (with `ca_cert`).
fn write_identity(
    dir: &Path,
    files: &[PathBuf; 4],
    ca_key: &[u8],
    ca_cert: &[u8],
) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let cluster_key = KeyPair::try_from(ca_key).context("the cluster key is not a PKCS#8 key")?;
    let node_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut node = CertificateParams::new(vec!["capstan".to_string()])?;
    node.distinguished_name
        .push(DnType::CommonName, "capstan node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node.not_before = rcgen::date_time_ymd(2024, 1, 1);
    node.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let issuer = Issuer::new(ca_params()?, &cluster_key);
    let node_cert = node.signed_by(&node_key, &issuer)?;

    // Keys first, certificates last: a crash in between leaves an
    // incomplete set, which the next start reports instead of trusting.
    write_private(&files[0], ca_key)?;
    write_private(&files[2], &node_key.serialize_der())?;
    write_private(&files[1], ca_cert)?;
    write_private(&files[3], node_cert.der())?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The cluster id of a cluster certificate: blake3 of its Ed25519 key.
pub fn cluster_id_of(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone().into_owned())?;
    let anchor = roots
        .roots
        .first()
        .ok_or_else(|| rustls::Error::General("no cluster certificate".into()))?;
    cluster_id_of_anchor(anchor)
}

pub fn cluster_id_of_anchor(anchor: &TrustAnchor<'_>) -> Result<[u8; 32], rustls::Error> {
    let spki: &[u8] = anchor.subject_public_key_info.as_ref();
    let raw = match spki.len() {
        42 if spki[..10] == ED25519_SPKI_CONTENTS => &spki[10..],
        44 if spki[2..12] == ED25519_SPKI_CONTENTS => &spki[12..],
        _ => {
            return Err(rustls::Error::General(
                "the cluster key is not an Ed25519 key".into(),
            ));
        }
    };
    Ok(*blake3::hash(raw).as_bytes())
}
