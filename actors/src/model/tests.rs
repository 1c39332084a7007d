use super::*;

/// A guest is behind when its inbox holds a message at or above the
/// number it handles next, and only then: not for a message of the
/// inbox beside it, nor for a dismissal's mark alone.
#[tokio::test]
async fn has_message_from_asks_of_one_inbox_only() {
    let db = capstan_cluster::open("mem:").await.unwrap();
    let agent = FormulaId([7; 32]);
    let after = FormulaId([8; 32]);
    db.transact(move |tx| {
        Box::pin(async move {
            tx.set(&keys::message(&agent, 5), b"five")?;
            tx.set(&keys::message(&agent, 9), b"nine")?;
            tx.set(&keys::message(&after, 100), b"not alice's")?;
            tx.set(&keys::inbox_mark(&agent), &50u64.to_be_bytes())?;
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    for (from, expect) in [
        (0, true),
        (6, true),
        (9, true),
        (10, false),
        (u64::MAX, false),
    ] {
        let got = db
            .read(move |tx| Box::pin(async move { has_message_from(tx, &agent, from).await }))
            .await
            .unwrap();
        assert_eq!(got, expect, "a message at or above {from}");
    }
    // the mark still counts for the next number to hand out
    let next = db
        .read(move |tx| Box::pin(async move { next_message_number(tx, &agent).await }))
        .await
        .unwrap();
    assert_eq!(next, 50);
}

/// Every 1,024th message written records its number as the inbox's hint,
/// and the next number is right whether the read starts at the hint, finds
/// nothing at or above it (those messages gone), or the hint is damaged.
#[tokio::test]
async fn the_next_number_is_found_from_the_hint_or_without_it() {
    let db = capstan_cluster::open("mem:").await.unwrap();
    let agent = FormulaId([9; 32]);
    let next = |db: capstan_cluster::Db| async move {
        db.read(move |tx| Box::pin(async move { next_message_number(tx, &agent).await }))
            .await
            .unwrap()
    };
    let hint = |db: capstan_cluster::Db| async move {
        db.read(move |tx| {
            Box::pin(async move { Ok::<_, Error>(tx.get(&keys::inbox_hint(&agent)).await?) })
        })
        .await
        .unwrap()
    };
    for from in (0..2500u64).step_by(250) {
        db.transact(move |tx| {
            Box::pin(async move {
                for n in from..from + 250 {
                    let m = MessageRec {
                        number: n,
                        message_id: RequestId([1; 16]),
                        reply_to: None,
                        from: agent,
                        to: agent,
                        date_ms: 1,
                        body: crate::records::BodyRec::Package {
                            strings: vec![format!("m{n}")],
                            names: vec![],
                            ids: vec![],
                        },
                    };
                    put_message(tx, &agent, &m).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
    }
    assert_eq!(hint(db.clone()).await, Some(2048u64.to_be_bytes().to_vec()));
    assert_eq!(next(db.clone()).await, 2500);
    // the messages from the hint on are gone: the whole inbox is read
    db.transact(move |tx| {
        Box::pin(async move {
            tx.clear_range(
                &keys::message(&agent, 2000),
                &capstan_cluster::tuple::prefix_end(&keys::inbox(&agent)),
            );
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(next(db.clone()).await, 2000);
    // a hint of the wrong size is passed over; one below the last
    // message still finds it
    for bytes in [b"bad".to_vec(), 1024u64.to_be_bytes().to_vec()] {
        db.transact(move |tx| {
            let bytes = bytes.clone();
            Box::pin(async move {
                tx.set(&keys::inbox_hint(&agent), &bytes)?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
        assert_eq!(next(db.clone()).await, 2000);
    }
}
