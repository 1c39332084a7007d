//! Bounded reads (issue 18): `Runtime::usage_page` counts every key once,
//! whatever the page size; inbox pages and `follow` page through an inbox.

use std::sync::Arc;

use capstan_actors::usage::{KINDS, UsagePage};
use capstan_actors::{Runtime, RuntimeOptions, keys};
use capstan_cluster::mem_store::MemStore;
use capstan_cluster::{Db, StoreError};
use capstan_proto::FormulaId;

async fn scan(rt: &Runtime, max_keys: usize) -> (UsagePage, usize) {
    let mut total = UsagePage::default();
    let mut start = Vec::new();
    let mut calls = 0;
    loop {
        let page = rt.usage_page(&start, max_keys).await.expect("usage page");
        calls += 1;
        total.add(&page);
        match page.next {
            Some(next) => start = next,
            None => return (total, calls),
        }
    }
}

fn keys_of(p: &UsagePage, kind: &str) -> u64 {
    p.kinds[KINDS.iter().position(|k| *k == kind).unwrap()].keys
}

#[tokio::test]
async fn pages_count_every_key_once() {
    let db = Db::new(Arc::new(MemStore::new()));
    let rt = Runtime::open(db.clone(), RuntimeOptions::default())
        .await
        .expect("runtime");
    let (base, _) = scan(&rt, 0).await;
    let agent = FormulaId([9; 32]);
    db.transact(|tx| {
        Box::pin(async move {
            for n in 0..700u64 {
                tx.set(&keys::message(&agent, n), b"0123456789")?;
            }
            tx.set(b"\x01raw", b"x")?;
            Ok::<_, StoreError>(())
        })
    })
    .await
    .expect("write");
    let (full, calls) = scan(&rt, 0).await;
    assert_eq!(calls, 1);
    assert_eq!(keys_of(&full, "messages"), keys_of(&base, "messages") + 700);
    assert_eq!(keys_of(&full, "others"), keys_of(&base, "others") + 1);
    for max in [1, 7, 100, 256, 257, 1000] {
        let (paged, calls) = scan(&rt, max).await;
        assert_eq!(paged.kinds, full.kinds, "pages of {max}");
        let total: u64 = full.kinds.iter().map(|k| k.keys).sum();
        assert_eq!(calls as u64, total / max as u64 + 1, "pages of {max}");
    }
}

/// An inbox larger than one page: `inbox_page` pages through it in order,
/// says when more follow, refuses bad sizes; `follow` streams its whole
/// history (read a page at a time) in order.
#[tokio::test]
async fn inbox_pages_and_follow_history() {
    let db = Db::new(Arc::new(MemStore::new()));
    let rt = Runtime::open(db, RuntimeOptions::default())
        .await
        .expect("runtime");
    let host = rt.root_host();
    for i in 0..1100 {
        host.send(
            capstan_proto::RequestId::random(),
            "SELF",
            vec![format!("m{i}")],
            vec![],
            None,
        )
        .await
        .expect("send");
    }
    let mut all = Vec::new();
    let mut from = 0;
    loop {
        let (page, more) = host.inbox_page(None, from, 300).await.expect("page");
        assert!(page.len() <= 300);
        all.extend(page.iter().map(|m| m.number));
        if !more {
            break;
        }
        from = page.last().unwrap().number + 1;
    }
    let total = all.len();
    assert!(total >= 1100, "{total}");
    assert!(all.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    assert_eq!(
        host.inbox(None).await.unwrap().len(),
        1000,
        "the default page"
    );
    for bad in [0, 10_001] {
        assert!(matches!(
            host.inbox_page(None, 0, bad).await,
            Err(capstan_actors::Error::Invalid(_))
        ));
    }

    let mut rx = host.follow(0).await.expect("follow");
    let mut streamed = Vec::new();
    while streamed.len() < total {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("history in time")
            .expect("a message");
        streamed.push(m.number);
    }
    assert_eq!(streamed, all);
}
