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
