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
