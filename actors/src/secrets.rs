//! Secrets at rest (issue 16): values of the store that are secrets (LLM API
//! keys, a cluster's CA private key) are sealed with AES-256-GCM under a
//! *secrets key* that is never in the store.
//!
//! - A lone node's key is `<home>/identity/secrets.key` (made at first start).
//! - A cluster's key is made by `capstan cluster init`, written to a file,
//!   and given to every node (`capstan start --secrets-key FILE`, copied to
//!   `<home>/identity/secrets.key`).
//!
//! A sealed value is `MAGIC (4) | key id (8) | nonce (12) | ciphertext+tag`.
//! The nonce is random per write; the associated data is a fixed label and
//! the record's store key, so a sealed value copied under another key does
//! not open. The key id (a hash of the key) lets a node with the wrong key
//! say so instead of reporting a corrupt record. A value without the magic
//! is a plaintext one written before this existed: it is read as is and
//! sealed by [`migrate_llm_keys`] (and by the next write).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// The first bytes of every sealed value.
pub const MAGIC: &[u8; 4] = b"CSE1";
const KEY_ID_LEN: usize = 8;
const HEADER: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN;
const AAD_LABEL: &[u8] = b"capstan secret v1\0";
/// The file name of a home's secrets key, under `<home>/identity/`.
pub const KEY_FILE: &str = "secrets.key";

/// What went wrong with a secret; each message says what to do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SecretsError {
    #[error(
        "this node has no secrets key, and the store holds secrets sealed with one (key id {key_id}): start the node with `capstan start --secrets-key FILE` (the file `capstan cluster init` wrote, or a backup of <home>/identity/secrets.key)"
    )]
    NoKey { key_id: String },
    #[error(
        "a secret in the store was sealed with another secrets key (key id {stored}) than this node's (key id {ours}): start the node with the right one (`capstan start --secrets-key FILE`)"
    )]
    WrongKey { stored: String, ours: String },
    #[error(
        "a sealed secret in the store does not open with this node's secrets key (damaged, or moved to another record): restore the store from a backup"
    )]
    Damaged,
    #[error("{0}")]
    KeyFile(String),
}

/// A secrets key (256 bits).
#[derive(Clone)]
pub struct SecretsKey {
    key: [u8; 32],
    id: [u8; KEY_ID_LEN],
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("id", &self.id_hex())
            .finish_non_exhaustive()
    }
}

fn key_id_of(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let h = blake3::derive_key("capstan secrets key id v1", key);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&h[..KEY_ID_LEN]);
    id
}

fn aad(record_key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_LABEL.len() + record_key.len());
    a.extend_from_slice(AAD_LABEL);
    a.extend_from_slice(record_key);
    a
}

/// Whether a stored value is sealed (else: plaintext of an older store).
pub fn is_sealed(value: &[u8]) -> bool {
    value.len() >= HEADER && value.starts_with(MAGIC)
}

/// The key id a sealed value names (hex), if it is sealed.
pub fn sealed_key_id(value: &[u8]) -> Option<String> {
    is_sealed(value).then(|| hex::encode(&value[MAGIC.len()..MAGIC.len() + KEY_ID_LEN]))
}

impl SecretsKey {
    /// A fresh random key.
    pub fn generate() -> Result<SecretsKey, SecretsError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| SecretsError::KeyFile(format!("no randomness for a secrets key: {e}")))?;
        Ok(SecretsKey::from_bytes(key))
    }

    pub fn from_bytes(key: [u8; 32]) -> SecretsKey {
        SecretsKey {
            id: key_id_of(&key),
            key,
        }
    }

    /// The key's id: a hash of it (hex), safe to show.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// The file's text: `capstan-secrets-key-v1 HEX` and a newline.
    pub fn to_file_text(&self) -> String {
        format!("capstan-secrets-key-v1 {}\n", hex::encode(self.key))
    }

    pub fn parse(text: &str, what: &Path) -> Result<SecretsKey, SecretsError> {
        let bad = || {
            SecretsError::KeyFile(format!(
                "{} is not a capstan secrets key (one line: capstan-secrets-key-v1 and 64 hex digits)",
                what.display()
            ))
        };
        let hexkey = text
            .trim()
            .strip_prefix("capstan-secrets-key-v1 ")
            .ok_or_else(bad)?;
        let bytes = hex::decode(hexkey.trim()).map_err(|_| bad())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(SecretsKey::from_bytes(key))
    }

    /// Reads the key in `path`.
    pub fn load(path: &Path) -> Result<SecretsKey, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SecretsError::KeyFile(format!(
                "cannot read the secrets key {}: {e}",
                path.display()
            ))
        })?;
        SecretsKey::parse(&text, path)
    }

    /// Reads the key in `path`, if the file exists.
    pub fn load_if_present(path: &Path) -> Result<Option<SecretsKey>, SecretsError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => SecretsKey::load(path).map(Some),
        }
    }

    /// Writes the key to `path` (mode 0600; its directory made 0700), never
    /// over an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), SecretsError> {
        let err = |e: std::io::Error| {
            SecretsError::KeyFile(format!(
                "cannot write the secrets key {}: {e}",
                path.display()
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(self.to_file_text().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        Ok(())
    }

    /// The key of a home, `<home>/identity/secrets.key`, made if missing.
    pub fn load_or_create(path: &Path) -> Result<SecretsKey, SecretsError> {
        if let Some(k) = SecretsKey::load_if_present(path)? {
            return Ok(k);
        }
        let k = SecretsKey::generate()?;
        k.write_new(path)?;
        tracing::info!(file = %path.display(), key_id = %k.id_hex(), "made a secrets key (keep a copy: backups need it to restore secrets)");
        Ok(k)
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is AES-256's key length: this cannot fail.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 256-bit AES key"))
    }

    /// Seals `plaintext` for the store under `record_key`.
    pub fn seal(&self, record_key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| SecretsError::KeyFile(format!("no randomness for a nonce: {e}")))?;
        let mut buf = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(record_key)),
                &mut buf,
            )
            .map_err(|_| SecretsError::Damaged)?;
        let mut out = Vec::with_capacity(HEADER + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens a sealed value stored under `record_key`.
    pub fn open(&self, record_key: &[u8], value: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if !is_sealed(value) {
            return Err(SecretsError::Damaged);
        }
        let id = &value[MAGIC.len()..MAGIC.len() + KEY_ID_LEN];
        if id != self.id {
            return Err(SecretsError::WrongKey {
                stored: hex::encode(id),
                ours: self.id_hex(),
            });
        }
        let nonce: [u8; NONCE_LEN] = value[MAGIC.len() + KEY_ID_LEN..HEADER]
            .try_into()
            .map_err(|_| SecretsError::Damaged)?;
        let mut buf = value[HEADER..].to_vec();
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(record_key)),
                &mut buf,
            )
            .map_err(|_| SecretsError::Damaged)?;
        Ok(plain.to_vec())
    }
}

/// Reads a stored secret: a sealed one is opened with `key` (none: a clear
/// error); a plaintext one (an older store) is returned as is.
pub fn read(
    key: Option<&SecretsKey>,
    record_key: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, SecretsError> {
    if !is_sealed(value) {
        return Ok(value.to_vec());
    }
    match key {
        Some(k) => k.open(record_key, value),
        None => Err(SecretsError::NoKey {
            key_id: sealed_key_id(value).unwrap_or_default(),
        }),
    }
}

/// The path of a home's secrets key.
pub fn home_key_path(home: &Path) -> PathBuf {
    home.join("identity").join(KEY_FILE)
}

/// Seals every plaintext LLM key of the store (an older store); returns
/// how many. Sealed ones are checked to open with `key`.
pub async fn migrate_llm_keys(
    db: &capstan_cluster::Db,
    key: &SecretsKey,
) -> Result<usize, crate::Error> {
    let key = std::sync::Arc::new(key.clone());
    db.transact(move |tx| {
        let key = key.clone();
        Box::pin(async move {
            let rows = tx
                .get_prefix(&crate::keys::llm_keys(), 100_000, false)
                .await?;
            let mut n = 0;
            for (k, v) in rows {
                if is_sealed(&v) {
                    key.open(&k, &v)
                        .map_err(|e| crate::Error::Secrets(e.to_string()))?;
                } else {
                    let sealed = key
                        .seal(&k, &v)
                        .map_err(|e| crate::Error::Secrets(e.to_string()))?;
                    tx.set(&k, &sealed)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = SecretsKey::generate().unwrap();
        let a = k.seal(b"rec-a", b"sk-secret").unwrap();
        let b = k.seal(b"rec-a", b"sk-secret").unwrap();
        assert_ne!(a, b, "random nonces");
        assert!(!a.windows(9).any(|w| w == b"sk-secret"));
        assert_eq!(k.open(b"rec-a", &a).unwrap(), b"sk-secret");
        assert_eq!(k.open(b"rec-b", &a), Err(SecretsError::Damaged));
        let other = SecretsKey::generate().unwrap();
        assert!(matches!(
            other.open(b"rec-a", &a),
            Err(SecretsError::WrongKey { .. })
        ));
        assert!(matches!(
            read(None, b"rec-a", &a),
            Err(SecretsError::NoKey { .. })
        ));
        assert_eq!(read(None, b"rec-a", b"plain").unwrap(), b"plain");
        let mut bad = a.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(b"rec-a", &bad), Err(SecretsError::Damaged));
    }

    #[test]
    fn key_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("identity").join(KEY_FILE);
        let k = SecretsKey::load_or_create(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(SecretsKey::load_or_create(&p).unwrap().id, k.id);
        assert!(k.write_new(&p).is_err(), "never over an existing key");
        std::fs::write(d.path().join("junk"), "nope").unwrap();
        let e = SecretsKey::load(&d.path().join("junk")).unwrap_err();
        assert!(e.to_string().contains("not a capstan secrets key"), "{e}");
    }
}
