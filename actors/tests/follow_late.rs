//! A follower (`capstan inbox --follow`) shows every acknowledged message,
//! also one whose commit lands late, after later-numbered messages of the
//! same inbox: inbox numbers are handed out in order but commit in any
//! order. Here every other commit of the store is held back for up to
//! 400 ms, so many numbers land after their successors; the follower must
//! not give them up as holes and then refuse them when they arrive. And a
//! follower that cannot read the store for a while (to render what it was
//! told of) waits it out instead of ending.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use capstan_actors::{Runtime, RuntimeOptions};
use capstan_cluster::Db;
use capstan_cluster::mem_store::{Faults, MemStore};
use capstan_proto::RequestId;

/// A runtime on `store` whose root host made guest "g" (the tests mail it)
/// and follows its own inbox from the start.
async fn following(
    store: &Arc<MemStore>,
) -> (
    Runtime,
    capstan_actors::AgentHandle,
    tokio::sync::mpsc::Receiver<capstan_actors::MessageView>,
) {
    let rt = Runtime::open(Db::new(store.clone()), RuntimeOptions::default())
        .await
        .expect("runtime");
    let root = rt.root_host();
    root.mkguest(RequestId::random(), "g")
        .await
        .expect("mkguest");
    let follower = root.follow(0).await.expect("follow");
    (rt, root, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_shows_a_message_whose_commit_lands_after_later_ones() {
    let store = Arc::new(MemStore::with_faults(Faults {
        commit_delay_ppm: 500_000,
        max_delay: Duration::from_millis(400),
        ..Faults::seeded(11)
    }));
    let (_rt, root, mut follower) = following(&store).await;

    let mut acknowledged = BTreeSet::new();
    // Rounds of concurrent sends, so that the follower's looks (soon after
    // a miss, then less often) meet holes of late commits again and again.
    for round in 0..6 {
        let mut sends = Vec::new();
        for i in 0..12 {
            let root = root.clone();
            sends.push(tokio::spawn(async move {
                root.send(
                    RequestId::random(),
                    "g",
                    vec![format!("round {round} message {i}")],
                    vec![],
                    None,
                )
                .await
            }));
        }
        for s in sends {
            acknowledged.insert(s.await.expect("task").expect("send"));
        }
    }
    assert!(
        store.fault_counts().commit_delays > 20,
        "the store held commits back"
    );

    let mut shown = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !acknowledged.is_subset(&shown) {
        match tokio::time::timeout_at(deadline, follower.recv()).await {
            Ok(Some(m)) => {
                assert!(shown.insert(m.number), "message {} shown twice", m.number);
            }
            Ok(None) => panic!("the follower stopped"),
            Err(_) => break,
        }
    }
    let missing: Vec<u64> = acknowledged.difference(&shown).copied().collect();
    assert!(
        missing.is_empty(),
        "acknowledged messages the follower never showed: {missing:?} (of {})",
        acknowledged.len()
    );
}

/// A follower told of a message while the store cannot be read (a leader
/// election, a dropped connection) renders it once the store answers again,
/// instead of ending its stream (a client then had to reconnect).
#[tokio::test(flavor = "current_thread")]
async fn a_follower_rides_out_a_store_outage_while_it_renders() {
    let store = Arc::new(MemStore::new());
    let (_rt, root, mut follower) = following(&store).await;
    let n = root
        .send(RequestId::random(), "g", vec!["hello".into()], vec![], None)
        .await
        .expect("send");
    // One thread: the follower cannot render the push before this task
    // yields, so its reads meet the outage.
    store.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let refused = store.fault_counts().refused_while_stopped;
    store.start();
    assert!(refused > 0, "the follower read the store during the outage");
    let m = tokio::time::timeout(Duration::from_secs(10), follower.recv())
        .await
        .expect("the message shown within 10 s")
        .expect("the follower still runs");
    assert_eq!(m.number, n);
}
