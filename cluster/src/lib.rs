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
//! - [`tuple`]: order-preserving tuple encoding of keys.
//! - [`blob`]: values larger than [`MAX_VALUE_SIZE`] split into chunks.
//! - [`conformance`]: the backend conformance suite, written once and run
//!   against every backend ([`conformance_tests!`]).

pub mod blob;
pub mod conformance;
pub mod etcd_store;
pub mod redb_store;
pub mod store;
pub mod tuple;

pub use store::{
    CommitRequest, Db, KeyValue, MAX_KEY_SIZE, MAX_TRANSACTION_SIZE, MAX_VALUE_SIZE, Mutation,
    RangeOption, SYSTEM_KEY_PREFIX, Snapshot, Store, StoreError, Transaction, TxFuture, TxnError,
    Version,
};

/// Opens a store from a URL-ish string: `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`
/// (an etcd cluster, see [`etcd_store`]), `redb:PATH` or a bare path (embedded redb).
pub async fn open(spec: &str) -> Result<Db, StoreError> {
    if spec.starts_with("etcd://") {
        let store = etcd_store::EtcdStore::open(spec).await?;
        return Ok(Db::new(std::sync::Arc::new(store)));
    }
    let path = spec.strip_prefix("redb:").unwrap_or(spec);
    let store = redb_store::RedbStore::open(std::path::Path::new(path))?;
    Ok(Db::new(std::sync::Arc::new(store)))
}
