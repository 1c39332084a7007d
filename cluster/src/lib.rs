//! Capstan's durable state.
//!
//! # Layout
//!
//! - [`store`]: the [`Store`] trait every backend implements (snapshot reads at a
//!   version + an optimistic commit of read-conflict ranges and mutations), the
//!   [`Db`] handle with FoundationDB-style retried transaction closures
//!   ([`Db::transact`]), and [`Transaction`] (read-your-writes, size limits).
//! - [`redb_store`]: the embedded backend (redb, single committer thread, group
//!   commit: one fsync per batch of transactions).
//! - [`etcd_store`]: the replicated backend on an etcd cluster (serializable
//!   commits by comparing mod revisions, endpoint rotation, commit markers for
//!   "maybe committed" outcomes, coarsened read sets beyond 128 compares).
//! - [`etcd_rpc`]: the etcd v3 gRPC calls the etcd backend uses, as hand-written
//!   prost messages over tonic (no protoc at build time).
//! - `fdb_store` (cargo feature `fdb`): the backend on a FoundationDB cluster
//!   (snapshots at FoundationDB read versions, commits with its read-conflict
//!   ranges, commit markers for "maybe committed" outcomes).
//! - [`mem_store`]: the in-memory backend for tests and simulations (`mem:`):
//!   a multi-version map with the same serializable commits, bounded history,
//!   and seeded fault injection (spurious conflicts, "maybe committed"
//!   outcomes, delays, a stopped store).
//! - [`tuple`](mod@tuple): order-preserving tuple encoding of keys.
//! - [`backup`]: a whole store to a checked file (one consistent snapshot)
//!   and back into an empty store (`capstan backup` / `restore`).
//! - [`blob`]: values larger than [`MAX_VALUE_SIZE`] split into chunks.
//! - [`conformance`]: the backend conformance suite, written once and run
//!   against every backend ([`conformance_tests!`]).
//! - [`relay`]: relayed commits: a node hands groups of its commits to
//!   another member, which merges them with its own into one store request.
//! - [`trace`]: the spans of one traced operation's hops, kept per process
//!   and gathered across the cluster (`capstan send --trace`).

pub mod backup;
pub mod blob;
pub mod conformance;
pub mod etcd_rpc;
pub mod etcd_store;
#[cfg(feature = "fdb")]
pub mod fdb_store;
pub mod mem_store;
pub mod redb_store;
pub mod relay;
pub mod store;
pub mod trace;
pub mod tuple;

pub use store::{
    Checkpoint, CommitRequest, Db, KeyValue, MAX_KEY_SIZE, MAX_TRANSACTION_SIZE, MAX_VALUE_SIZE,
    Mutation, RangeOption, ReadFacts, SYSTEM_KEY_PREFIX, Snapshot, Store, StoreError, Transaction,
    TxFuture, TxnError, Version,
};

/// Opens a store from a URL-ish string: `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`
/// (an etcd cluster, see [`etcd_store`]), `fdb:[CLUSTER_FILE][?prefix=NAME]` (a
/// FoundationDB cluster, `fdb_store`; only in builds with the cargo feature
/// `fdb`), `redb:PATH` or a bare path (embedded redb), or `mem:` (a fresh, empty
/// in-memory store without faults, see [`mem_store`]: nothing outlives the
/// returned handle, and every `mem:` is a store of its own).
pub async fn open(spec: &str) -> Result<Db, StoreError> {
    if spec.starts_with("etcd://") {
        let store = etcd_store::EtcdStore::open(spec).await?;
        return Ok(Db::new(std::sync::Arc::new(store)));
    }
    if spec.starts_with("fdb:") {
        return open_fdb(spec).await;
    }
    if let Some(rest) = spec.strip_prefix("mem:") {
        if !rest.is_empty() {
            return Err(StoreError::Io(format!(
                "store spec {spec:?}: `mem:` takes nothing after the colon (for a redb file of that name, write redb:{spec})"
            )));
        }
        return Ok(Db::new(std::sync::Arc::new(mem_store::MemStore::new())));
    }
    let path = spec.strip_prefix("redb:").unwrap_or(spec);
    let store = redb_store::RedbStore::open(std::path::Path::new(path))?;
    Ok(Db::new(std::sync::Arc::new(store)))
}

#[cfg(feature = "fdb")]
async fn open_fdb(spec: &str) -> Result<Db, StoreError> {
    let store = fdb_store::FdbStore::open(spec).await?;
    Ok(Db::new(std::sync::Arc::new(store)))
}

#[cfg(not(feature = "fdb"))]
async fn open_fdb(spec: &str) -> Result<Db, StoreError> {
    Err(StoreError::Io(format!(
        "store spec {spec:?} needs the FoundationDB backend, which this build does not include; rebuild with `--features fdb` (e.g. cargo build -p capstan --features fdb; it needs FoundationDB's client library libfdb_c)"
    )))
}

#[cfg(all(test, not(feature = "fdb")))]
mod tests {
    #[tokio::test]
    async fn fdb_specs_need_the_feature() {
        for spec in ["fdb:", "fdb:/etc/foundationdb/fdb.cluster"] {
            let Err(e) = crate::open(spec).await else {
                panic!("{spec} opened without the fdb feature");
            };
            assert!(e.to_string().contains("--features fdb"), "{spec}: {e}");
        }
    }
}
