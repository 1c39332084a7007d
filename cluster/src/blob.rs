//! Values larger than one store value, split into chunks.
//!
//! A blob under `prefix` owns every key starting with `prefix`:
//!
//! - `prefix + tuple(u64 0)`: the header: format byte `1`, total length (u64
//!   big-endian), chunk size (u32 big-endian), blake3 hash of the data (32 bytes);
//! - `prefix + tuple(u64 i)` for `i` in `1..=chunks`: the data, in chunks of
//!   [`CHUNK_SIZE`] bytes (the last one shorter).
//!
//! Reading checks the chunk layout, the length and the hash: a mismatch is
//! [`StoreError::Corrupt`].

use crate::store::{MAX_KEY_SIZE, MAX_TRANSACTION_SIZE, SYSTEM_KEY_PREFIX};
use crate::tuple::{TupleKey, TupleReader, prefix_end};
use crate::{StoreError, Transaction};

/// Largest blob accepted.
pub const MAX_BLOB_SIZE: usize = 8 * 1024 * 1024;
/// Size of every chunk but the last.
pub const CHUNK_SIZE: usize = 64 * 1024;

const FORMAT: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 4 + 32;
/// Length of the tuple-encoded index appended to the prefix.
const INDEX_LEN: usize = 9;

fn key(prefix: &[u8], index: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(TupleKey::new().u64(index).as_bytes());
    k
}

fn corrupt(prefix: &[u8], detail: String) -> StoreError {
    StoreError::Corrupt {
        path: format!("value data at key {}", escape(prefix)),
        detail: format!(
            "{detail}: the store is damaged; stop the node, {}",
            crate::redb_store::RESTORE_HINT
        ),
    }
}

fn escape(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// The limits every blob write checks first (nothing written on error).
fn check(prefix: &[u8], data: &[u8]) -> Result<(), StoreError> {
    if data.len() > MAX_BLOB_SIZE {
        return Err(StoreError::BlobTooLarge {
            len: data.len(),
            max: MAX_BLOB_SIZE,
        });
    }
    if prefix.first() == Some(&SYSTEM_KEY_PREFIX) {
        return Err(StoreError::ReservedKey);
    }
    if prefix.len() + INDEX_LEN > MAX_KEY_SIZE {
        return Err(StoreError::KeyTooLarge {
            len: prefix.len() + INDEX_LEN,
            max: MAX_KEY_SIZE,
        });
    }
    Ok(())
}

/// Writes `data` under `prefix` (replacing any previous blob there).
///
/// Errors (nothing written): [`StoreError::BlobTooLarge`] above [`MAX_BLOB_SIZE`],
/// [`StoreError::ReservedKey`] for a system prefix, [`StoreError::KeyTooLarge`] for a
/// prefix too long, [`StoreError::TransactionTooLarge`] if the transaction cannot hold it.
pub async fn set_blob(tx: &mut Transaction, prefix: &[u8], data: &[u8]) -> Result<(), StoreError> {
    check(prefix, data)?;
    let chunks = data.len().div_ceil(CHUNK_SIZE);
    let end = prefix_end(prefix);
    // Size check up front, so that an error leaves the transaction unchanged.
    let needed = prefix.len()
        + end.len()
        + (chunks + 1) * (prefix.len() + INDEX_LEN)
        + HEADER_LEN
        + data.len();
    if tx.size() + needed > MAX_TRANSACTION_SIZE {
        return Err(StoreError::TransactionTooLarge {
            len: tx.size() + needed,
            max: MAX_TRANSACTION_SIZE,
        });
    }
    tx.clear_range(prefix, &end);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.push(FORMAT);
    header.extend_from_slice(&(data.len() as u64).to_be_bytes());
    header.extend_from_slice(&(CHUNK_SIZE as u32).to_be_bytes());
    header.extend_from_slice(blake3::hash(data).as_bytes());
    tx.set(&key(prefix, 0), &header)?;
    for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
        tx.set(&key(prefix, i as u64 + 1), chunk)?;
    }
    Ok(())
}

/// Most chunk bytes [`set_content_blob`] writes per transaction: well under
/// etcd's request limit (1.5 MiB by default) and its 128 operations.
pub const STEP_BYTES: usize = 512 * 1024;

/// Writes a blob whose `prefix` is derived from the hash of `data` (content
/// addressed: whatever is there is the same bytes) in several transactions,
/// so that a blob larger than one transaction of the store (etcd: 1.5 MiB)
/// fits: the chunks in steps of [`STEP_BYTES`], then the header. Readers see
/// nothing until the header commits. Nothing is cleared, so concurrent
/// writers of the same content cannot undo each other; an interrupted write
/// leaves chunks without a header, which a later write of the same content
/// completes. Does nothing if the blob is already there.
pub async fn set_content_blob(
    db: &crate::Db,
    prefix: &[u8],
    data: &[u8],
) -> Result<(), StoreError> {
    check(prefix, data)?;
    let header_key = key(prefix, 0);
    let present = {
        let k = header_key.clone();
        db.read(move |tx| Box::pin(async move { tx.get(&k).await }))
            .await?
            .is_some()
    };
    if present {
        return Ok(());
    }
    let per_step = (STEP_BYTES / CHUNK_SIZE).max(1);
    let chunks: Vec<(u64, &[u8])> = data
        .chunks(CHUNK_SIZE)
        .enumerate()
        .map(|(i, c)| (i as u64 + 1, c))
        .collect();
    for step in chunks.chunks(per_step) {
        let writes: Vec<(Vec<u8>, Vec<u8>)> = step
            .iter()
            .map(|(i, c)| (key(prefix, *i), c.to_vec()))
            .collect();
        db.transact(move |tx| {
            let writes = writes.clone();
            Box::pin(async move {
                for (k, v) in &writes {
                    tx.set(k, v)?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await?;
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.push(FORMAT);
    header.extend_from_slice(&(data.len() as u64).to_be_bytes());
    header.extend_from_slice(&(CHUNK_SIZE as u32).to_be_bytes());
    header.extend_from_slice(blake3::hash(data).as_bytes());
    db.transact(move |tx| {
        let (k, h) = (header_key.clone(), header.clone());
        Box::pin(async move {
            tx.set(&k, &h)?;
            Ok::<_, StoreError>(())
        })
    })
    .await
}

/// Reads the blob under `prefix`; [`StoreError::Corrupt`] if it does not check out.
pub async fn get_blob(tx: &mut Transaction, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(header) = tx.get(&key(prefix, 0)).await? else {
        return Ok(None);
    };
    if header.len() != HEADER_LEN || header[0] != FORMAT {
        return Err(corrupt(
            prefix,
            format!("bad header ({} bytes)", header.len()),
        ));
    }
    let len = u64::from_be_bytes(
        header[1..9]
            .try_into()
            .map_err(|_| corrupt(prefix, "header".into()))?,
    );
    let chunk_size = u32::from_be_bytes(
        header[9..13]
            .try_into()
            .map_err(|_| corrupt(prefix, "header".into()))?,
    );
    let hash = &header[13..45];
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_BLOB_SIZE)
        .ok_or_else(|| corrupt(prefix, format!("length {len} exceeds the blob limit")))?;
    if chunk_size == 0 {
        return Err(corrupt(prefix, "chunk size 0".into()));
    }
    let chunk_size = chunk_size as usize;
    let chunks = len.div_ceil(chunk_size);
    // Most values fit one chunk: read it as a single key (a backend with a
    // cache of recent values, etcd's, then serves a value this node just
    // wrote without a round trip; a range never is). The length and the
    // hash below check it as they check a listing of chunks; a chunk
    // beyond the header's count could only come from a damaged store, and
    // is then not seen (set_blob clears the whole prefix).
    let rows = if chunks <= 1 {
        let mut rows = Vec::with_capacity(1);
        if chunks == 1 {
            let k = key(prefix, 1);
            match tx.get(&k).await? {
                Some(v) => rows.push((k, v)),
                None => return Err(corrupt(prefix, "chunk 1 missing".into())),
            }
        }
        rows
    } else {
        tx.get_prefix(prefix, 0, false).await?
    };
    let mut data = Vec::with_capacity(len);
    let mut expected = 1u64;
    let header_key = key(prefix, 0);
    for (k, v) in rows.iter().filter(|(k, _)| *k != header_key) {
        let mut r = TupleReader::new(&k[prefix.len()..]);
        let index = r
            .u64()
            .ok()
            .filter(|_| r.is_empty())
            .ok_or_else(|| corrupt(prefix, format!("unexpected key {}", escape(k))))?;
        if index != expected {
            return Err(corrupt(
                prefix,
                format!("chunk {expected} missing (found {index})"),
            ));
        }
        let is_last = index as usize == chunks;
        if index as usize > chunks || (!is_last && v.len() != chunk_size) {
            return Err(corrupt(
                prefix,
                format!("chunk {index} has {} bytes", v.len()),
            ));
        }
        data.extend_from_slice(v);
        expected += 1;
    }
    if data.len() != len || (expected - 1) as usize != chunks {
        return Err(corrupt(
            prefix,
            format!("{} bytes found, {len} expected", data.len()),
        ));
    }
    if blake3::hash(&data).as_bytes() != hash {
        return Err(corrupt(prefix, "blake3 hash mismatch".into()));
    }
    Ok(Some(data))
}

/// Removes the blob under `prefix` (every key starting with `prefix`).
pub fn clear_blob(tx: &mut Transaction, prefix: &[u8]) {
    tx.clear_prefix(prefix);
}
