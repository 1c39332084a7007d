use super::*;
use crate::api::ValueKind;
use crate::types::RuntimeOptions;
use capstan_proto::RequestId;

/// Every key but exactly-once answers (those of the last millisecond
/// outlive a pass that keeps none).
async fn all_keys(rt: &Runtime) -> Vec<Vec<u8>> {
    let snap = rt.db().store().snapshot().await.unwrap();
    snap.range(&RangeOption {
        begin: Vec::new(),
        end: vec![SYSTEM_KEY_PREFIX],
        limit: 0,
        reverse: false,
    })
    .await
    .unwrap()
    .into_iter()
    .map(|(k, _)| k)
    .filter(|k| first_str(k) != "d")
    .collect()
}

fn count(keys: &[Vec<u8>], first: &str) -> usize {
    keys.iter().filter(|k| first_str(k) == first).count()
}

async fn pass(rt: &Runtime) -> GcReport {
    let opts = GcOptions { keep_answers_ms: 0 };
    rt.gc(&opts, Arc::new(|_, _, _| {})).await.unwrap()
}

/// A removed directory with more names than one sweep transaction
/// takes: deleted, its names cleared a page at a time after it, and
/// the store is back to what it was. Then the state a pass killed
/// between those leaves (the directory's record gone, its swept mark
/// and names still there): the next pass clears it.
#[tokio::test]
async fn a_directory_too_large_for_one_transaction_is_cleared_after_it() {
    let store = Arc::new(capstan_cluster::mem_store::MemStore::new());
    let rt = Runtime::open(capstan_cluster::Db::new(store), RuntimeOptions::default())
        .await
        .unwrap();
    let host = rt.root_host();
    host.store(RequestId::random(), "keep", ValueKind::Text, b"k".to_vec())
        .await
        .unwrap();
    pass(&rt).await;
    let base = all_keys(&rt).await;
    let n = SWEEP_KEYS + 500;
    for round in 0..2 {
        let dir = host.mkdir(RequestId::random(), "big").await.unwrap();
        for i in 0..n {
            host.store(
                RequestId::random(),
                &format!("big.v{i}"),
                ValueKind::Text,
                format!("{round}-{i}").into_bytes(),
            )
            .await
            .unwrap();
        }
        host.remove(RequestId::random(), "big").await.unwrap();
        if round == 1 {
            // What a pass killed after deleting the directory leaves:
            // its record and stamp gone, its swept mark written.
            let (fk, rk, mark) = (
                keys::formula(&dir),
                keys::formula_ref(&dir),
                keys::swept(&dir),
            );
            rt.db()
                .transact(move |tx| {
                    let (fk, rk, mark) = (fk.clone(), rk.clone(), mark.clone());
                    Box::pin(async move {
                        tx.clear(&fk);
                        tx.clear(&rk);
                        tx.set(&mark, &[])?;
                        Ok::<_, Error>(())
                    })
                })
                .await
                .unwrap();
        }
        let r = pass(&rt).await;
        assert!(!r.interrupted, "{r:?}");
        assert_eq!(r.values, n as u64, "{r:?}");
        let now = all_keys(&rt).await;
        assert_eq!(count(&now, "gcz"), 0, "a swept mark is left");
        assert_eq!(count(&now, "n"), count(&base, "n"), "names left");
        assert_eq!(count(&now, "v"), count(&base, "v"), "chunks left");
        assert_eq!(now, base, "{r:?}");
        assert_eq!(host.cat("keep").await.unwrap().1, b"k");
    }
}
