//! Small values are kept inside their formula records (no blob); larger
//! ones in a blob of their own; values stored before inlining (a record
//! without bytes and a blob) still read; and a record whose inline bytes do
//! not match it is refused, not shown.

use capstan_actors::records::{Formula, FormulaKind, INLINE_VALUE_MAX, ValueRec};
use capstan_actors::{Error, Runtime, ValueKind, keys, model};
use capstan_cluster::Db;
use capstan_proto::{FormulaId, RequestId};

async fn runtime() -> Runtime {
    Runtime::in_memory().await.expect("runtime")
}

/// The keys of value `id`'s blob, and its formula.
async fn stored(db: &Db, id: FormulaId) -> (usize, Formula) {
    db.read(move |tx| {
        Box::pin(async move {
            let blob = tx.get_prefix(&keys::value(&id), 0, false).await?.len();
            Ok::<_, Error>((blob, model::must_formula(tx, &id).await?))
        })
    })
    .await
    .expect("read")
}

#[tokio::test]
async fn small_values_live_in_their_record_and_large_ones_in_a_blob() {
    let rt = runtime().await;
    let h = rt.root_host();
    let small = vec![b's'; INLINE_VALUE_MAX];
    let large = vec![b'l'; INLINE_VALUE_MAX + 1];
    let a = h
        .store(RequestId::random(), "small", ValueKind::Text, small.clone())
        .await
        .expect("store small");
    let b = h
        .store(
            RequestId::random(),
            "large",
            ValueKind::Bytes,
            large.clone(),
        )
        .await
        .expect("store large");
    let e = h
        .store(RequestId::random(), "empty", ValueKind::Text, Vec::new())
        .await
        .expect("store empty");
    assert_eq!(h.cat("small").await.unwrap(), (ValueKind::Text, small));
    assert_eq!(h.cat("large").await.unwrap(), (ValueKind::Bytes, large));
    assert_eq!(h.cat("empty").await.unwrap(), (ValueKind::Text, Vec::new()));
    let (blob, f) = stored(rt.db(), a).await;
    assert_eq!(blob, 0, "a small value has no blob");
    assert!(matches!(
        f.kind,
        FormulaKind::Value(ValueRec {
            inline: Some(_),
            ..
        })
    ));
    let (blob, f) = stored(rt.db(), b).await;
    assert!(blob >= 2, "a large value has a blob (header and chunk)");
    assert!(matches!(
        f.kind,
        FormulaKind::Value(ValueRec { inline: None, .. })
    ));
    let (blob, _) = stored(rt.db(), e).await;
    assert_eq!(blob, 0);
}

#[tokio::test]
async fn a_value_stored_before_inlining_still_reads() {
    let rt = runtime().await;
    let h = rt.root_host();
    // Make the name exist, then point it at a record in the old layout:
    // no bytes in the record, the bytes in a blob.
    h.store(RequestId::random(), "old", ValueKind::Text, b"x".to_vec())
        .await
        .unwrap();
    let data = b"written by an older Capstan".to_vec();
    let id = FormulaId::random();
    let root = rt.root_host().id();
    let (_, f) = stored(rt.db(), root).await;
    let FormulaKind::Host(a) = f.kind else {
        panic!("root is a host")
    };
    let pet_store = a.pet_store;
    let d = data.clone();
    rt.db()
        .transact(move |tx| {
            let d = d.clone();
            Box::pin(async move {
                let f = Formula {
                    created_ms: 1,
                    cancelled: None,
                    kind: FormulaKind::Value(ValueRec {
                        kind: ValueKind::Text,
                        size: d.len() as u64,
                        hash: *blake3::hash(&d).as_bytes(),
                        inline: None,
                    }),
                };
                model::put_formula(tx, &id, &f)?;
                capstan_cluster::blob::set_blob(tx, &keys::value(&id), &d).await?;
                model::set_name(tx, &pet_store, "old", &id).await?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
    assert_eq!(h.cat("old").await.unwrap(), (ValueKind::Text, data));
}

#[tokio::test]
async fn inline_bytes_that_do_not_match_their_record_are_refused() {
    let rt = runtime().await;
    let h = rt.root_host();
    let id = h
        .store(
            RequestId::random(),
            "v",
            ValueKind::Text,
            b"honest".to_vec(),
        )
        .await
        .unwrap();
    // Damage the record: other bytes of the same length (the hash no longer
    // matches), as a store that flipped bits would.
    rt.db()
        .transact(move |tx| {
            Box::pin(async move {
                let mut f = model::must_formula(tx, &id).await?;
                if let FormulaKind::Value(v) = &mut f.kind {
                    v.inline = Some(b"forged".to_vec());
                }
                model::put_formula(tx, &id, &f)?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
    let err = h.cat("v").await.expect_err("a damaged value is refused");
    assert!(err.to_string().contains("does not match its hash"), "{err}");
    // A record claiming more inline bytes than it may hold does not decode.
    let mut f = Formula {
        created_ms: 1,
        cancelled: None,
        kind: FormulaKind::Value(ValueRec {
            kind: ValueKind::Bytes,
            size: 5,
            hash: [0; 32],
            inline: Some(b"four".to_vec()),
        }),
    };
    assert!(
        Formula::decode(&f.encode()).is_err(),
        "size and bytes disagree"
    );
    f.kind = FormulaKind::Value(ValueRec {
        kind: ValueKind::Bytes,
        size: INLINE_VALUE_MAX as u64 + 1,
        hash: [0; 32],
        inline: Some(vec![0; INLINE_VALUE_MAX + 1]),
    });
    assert!(
        Formula::decode(&f.encode()).is_err(),
        "too large to be inline"
    );
}

/// In a cluster, a node keeps small values inline only once every live
/// member reads such records: beside a member of a build from before (its
/// record has no `records` field), a small value gets a blob as it did
/// then; once that member's record is gone, values are inlined again.
#[tokio::test]
async fn beside_an_older_member_small_values_get_a_blob() {
    use capstan_actors::cluster::{ClusterConfig, member_key};
    let rt = runtime().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let old = serde_json::json!({
        "name": "old", "node_id": "x", "addr": "127.0.0.1:9", "epoch": 1, "pid": 1,
        "started_ms": now, "renewed_ms": now, "expires_ms": now + 60_000, "draining": false,
    })
    .to_string()
    .into_bytes();
    rt.db()
        .transact(move |tx| {
            let old = old.clone();
            Box::pin(async move { tx.set(&member_key("old"), &old).map_err(Error::from) })
        })
        .await
        .expect("older member");
    let _links = rt
        .join_cluster(ClusterConfig {
            name: "new".into(),
            node_id: "n".into(),
            addr: "127.0.0.1:1".into(),
            lease: std::time::Duration::from_secs(5),
        })
        .await
        .expect("join");
    let h = rt.root_host();
    let a = h
        .store(RequestId::random(), "a", ValueKind::Text, b"small".to_vec())
        .await
        .expect("store");
    let (blob, f) = stored(rt.db(), a).await;
    assert!(blob > 0, "a small value was inlined beside an older member");
    assert!(matches!(
        f.kind,
        FormulaKind::Value(ValueRec { inline: None, .. })
    ));
    assert_eq!(
        h.cat("a").await.unwrap(),
        (ValueKind::Text, b"small".to_vec())
    );
    // The older member leaves; this node lists the members again within
    // its next renewals.
    rt.db()
        .transact(|tx| {
            Box::pin(async move {
                tx.clear(&member_key("old"));
                Ok::<_, Error>(())
            })
        })
        .await
        .expect("older member gone");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let b = h
            .store(RequestId::random(), "b", ValueKind::Text, b"small".to_vec())
            .await
            .expect("store");
        if stored(rt.db(), b).await.0 == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "values are still not inlined once every member reads them"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
