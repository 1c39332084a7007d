//! Plaintext LLM keys of an older store are sealed by the migration, and a
//! sealed key opens only with its secrets key, under its own record key.

use std::sync::Arc;

use capstan_actors::secrets::{self, SecretsKey};
use capstan_actors::{Error, keys};
use capstan_cluster::Db;
use capstan_cluster::mem_store::MemStore;
use capstan_proto::FormulaId;

#[tokio::test]
async fn plaintext_keys_are_sealed_once_and_a_wrong_key_is_refused() {
    let db = Db::new(Arc::new(MemStore::new()));
    let (a, b) = (FormulaId::random(), FormulaId::random());
    db.transact(move |tx| {
        Box::pin(async move {
            tx.set(&keys::llm_key(&a), b"plain-key-a")?;
            tx.set(&keys::llm_key(&b), b"plain-key-b")?;
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    let key = SecretsKey::generate().unwrap();
    assert_eq!(secrets::migrate_llm_keys(&db, &key).await.unwrap(), 2);
    assert_eq!(secrets::migrate_llm_keys(&db, &key).await.unwrap(), 0);
    let rows = db
        .read(|tx| Box::pin(async move { tx.get_prefix(&keys::llm_keys(), 10, false).await }))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (k, v) in &rows {
        assert!(secrets::is_sealed(v));
        let plain = key.open(k, v).unwrap();
        assert!(plain.starts_with(b"plain-key-"));
        assert!(!v.windows(9).any(|w| w == b"plain-key"));
    }
    // A value moved under another record does not open.
    assert!(key.open(&rows[1].0, &rows[0].1).is_err());
    let other = SecretsKey::generate().unwrap();
    let e = secrets::migrate_llm_keys(&db, &other).await.unwrap_err();
    assert!(e.to_string().contains("another secrets key"), "{e}");
    let e = secrets::read(None, &rows[0].0, &rows[0].1).unwrap_err();
    assert!(e.to_string().contains("--secrets-key"), "{e}");
}
