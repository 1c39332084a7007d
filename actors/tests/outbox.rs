//! Issue 16: the outbox is a queue per peer cluster, each readable on its
//! own, listed in turn (so that no peer's backlog hides another's mail).

use std::sync::Arc;

use capstan_actors::{RemoteRec, Runtime, RuntimeOptions};
use capstan_cluster::Db;
use capstan_cluster::mem_store::MemStore;
use capstan_proto::RequestId;

#[tokio::test]
async fn each_peer_cluster_has_a_queue_of_its_own() {
    let rt = Runtime::open(
        Db::new(Arc::new(MemStore::new())),
        RuntimeOptions::default(),
    )
    .await
    .unwrap();
    let root = rt.root_host();
    // Three peer clusters; the first with a long backlog.
    let clusters = [[1u8; 32], [2u8; 32], [3u8; 32]];
    for (i, c) in clusters.iter().enumerate() {
        let remote = RemoteRec {
            cluster: *c,
            swiss: [9; 32],
            addrs: vec!["127.0.0.1:9".into()],
        };
        root.adopt_locator(RequestId::random(), &format!("peer{i}"), remote)
            .await
            .unwrap();
    }
    for n in 0..100 {
        let text = format!("backlog {n}");
        root.send(RequestId::random(), "peer0", vec![text], vec![], None)
            .await
            .unwrap();
    }
    for (i, text) in [(2, "for peer2"), (1, "for peer1")] {
        root.send(
            RequestId::random(),
            &format!("peer{i}"),
            vec![text.into()],
            vec![],
            None,
        )
        .await
        .unwrap();
    }

    assert_eq!(rt.outbox_peers(None, 10).await.unwrap(), clusters.to_vec());
    // Listed in turn, wrapping around.
    assert_eq!(
        rt.outbox_peers(None, 2).await.unwrap(),
        vec![clusters[0], clusters[1]]
    );
    assert_eq!(
        rt.outbox_peers(Some(clusters[1]), 2).await.unwrap(),
        vec![clusters[2], clusters[0]]
    );
    // Each queue on its own, oldest first.
    let q0 = rt.outbox_for(clusters[0], 10).await.unwrap();
    assert_eq!(q0.len(), 10);
    assert!(q0.windows(2).all(|w| w[0].created_us <= w[1].created_us));
    assert!(q0.iter().all(|i| i.to.cluster == clusters[0]));
    let q1 = rt.outbox_for(clusters[1], 10).await.unwrap();
    assert_eq!(q1.len(), 1);
    // Delivered items leave their queue; an empty queue is no longer listed.
    rt.outbox_done(&q1[0]).await.unwrap();
    assert!(rt.outbox_for(clusters[1], 10).await.unwrap().is_empty());
    assert_eq!(
        rt.outbox_peers(None, 10).await.unwrap(),
        vec![clusters[0], clusters[2]]
    );
}
