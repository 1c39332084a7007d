//! In process, on the in-memory store, with the real counter component
//! (guests/out, built by scripts/build-guests).

use std::time::{Duration, Instant};

use capstan_proto::RequestId;

use super::*;
use crate::guest::{GuestConfig, GuestLimits};
use crate::model;
use crate::node::Runtime;
use crate::records::{BodyRec, MessageRec};
use crate::types::{MessageBodyView, RuntimeOptions};
use capstan_cluster::StoreError;

fn counter_wasm() -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let path = root.join("guests/out/counter.wasm");
    if !path.exists() {
        let status = std::process::Command::new(root.join("scripts/build-guests"))
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("run scripts/build-guests");
        assert!(status.success(), "scripts/build-guests failed");
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn counter_guest() -> (Runtime, AgentHandle, FormulaId) {
    counter_guest_on(capstan_cluster::open("mem:").await.unwrap()).await
}

/// A runtime on `db` that runs guests.
async fn runtime_with_guests(db: capstan_cluster::Db) -> Runtime {
    runtime_with_guests_opts(db, RuntimeOptions::default()).await
}

/// [`runtime_with_guests`] with `opts`.
async fn runtime_with_guests_opts(db: capstan_cluster::Db, opts: RuntimeOptions) -> Runtime {
    let rt = Runtime::open(db, opts).await.unwrap();
    rt.enable_guests(GuestConfig {
        cache_dir: None,
        cache_bytes: None,
        limits: GuestLimits::default(),
    })
    .unwrap();
    rt
}

async fn counter_guest_on(db: capstan_cluster::Db) -> (Runtime, AgentHandle, FormulaId) {
    let rt = runtime_with_guests(db).await;
    let (host, g) = counter_on(&rt).await;
    (rt, host, g)
}

/// The counter component installed by `rt`'s root host, and a guest `c`
/// running it.
async fn counter_on(rt: &Runtime) -> (AgentHandle, FormulaId) {
    let host = rt.root_host();
    host.install(RequestId::random(), "counter", counter_wasm(), vec![])
        .await
        .unwrap();
    let g = host
        .mkguest_component(RequestId::random(), "c", "counter", None, None, &[])
        .await
        .unwrap();
    (host, g)
}

/// Writes "increment" from the host straight into slot `number` of the
/// guest's inbox (as a sender holding that reserved number commits it)
/// and wakes the runner.
async fn land(host: &AgentHandle, guest: FormulaId, number: u64) -> Result<(), Error> {
    let m = MessageRec {
        number,
        message_id: RequestId::random(),
        reply_to: None,
        from: host.id(),
        to: guest,
        date_ms: crate::clock::now_ms(),
        body: BodyRec::Package {
            strings: vec!["increment".into()],
            names: vec![],
            ids: vec![],
        },
    };
    let rec = m.clone();
    host.inner()
        .db
        .transact(move |tx| {
            let m = rec.clone();
            Box::pin(async move { model::put_message(tx, &guest, &m).await })
        })
        .await?;
    host.notify_delivered(guest, m);
    Ok(())
}

fn replies(host_inbox: &[crate::types::MessageView]) -> Vec<String> {
    host_inbox
        .iter()
        .filter(|m| m.from == "c")
        .filter_map(|m| match &m.body {
            MessageBodyView::Package { strings, .. } => Some(strings.concat()),
            _ => None,
        })
        .collect()
}

async fn wait_for_reply(host: &AgentHandle, text: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let got = replies(&host.inbox(None).await.unwrap());
        if got.iter().any(|r| r == text) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Numbers N and N + 1 reserved in order, N + 1 committed first: the
/// runner waits for N, then handles both, once each, in number order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_number_committed_first_waits_for_the_earlier_one() {
    let (_rt, host, g) = counter_guest().await;
    let n = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    let n1 = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    assert_eq!(n1, n + 1);
    land(&host, g, n1).await.unwrap();
    // The runner sees N + 1 alone for a while (well under the grace).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        replies(&host.inbox(None).await.unwrap()).is_empty(),
        "a message was handled while an earlier number was still in flight"
    );
    land(&host, g, n).await.unwrap();
    wait_for_reply(&host, "count = 2", Duration::from_secs(20)).await;
    // A sentinel through the normal path, then count everything.
    host.send(RequestId::random(), "c", vec!["get".into()], vec![], None)
        .await
        .unwrap();
    let got = wait_for_reply(&host, "count = 2", Duration::from_secs(20)).await;
    let got_sentinel = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = replies(&host.inbox(None).await.unwrap());
            if r.len() >= 3 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert!(got.contains(&"count = 1".to_string()), "{got:?}");
    assert_eq!(
        got_sentinel,
        vec!["count = 1", "count = 2", "count = 2"],
        "each increment handled once, in number order, then the sentinel"
    );
}

/// A number handed out but never written: after the grace the runner
/// closes the hole and handles what came after; the late writer of the
/// closed number is refused (it would retry with a fresh number), so
/// nothing is handled out of order or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_never_written_is_closed_after_the_grace() {
    let (_rt, host, g) = counter_guest().await;
    let lost = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    let next = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    land(&host, g, next).await.unwrap();
    let started = Instant::now();
    let got = wait_for_reply(
        &host,
        "count = 1",
        crate::rules::inbox::HOLE_GRACE + Duration::from_secs(20),
    )
    .await;
    assert_eq!(got, vec!["count = 1"]);
    assert!(
        started.elapsed() >= crate::rules::inbox::HOLE_GRACE - Duration::from_millis(50),
        "the hole was closed before its grace"
    );
    match land(&host, g, lost).await {
        Err(Error::InboxSlotTaken { number, .. }) => assert_eq!(number, lost),
        other => panic!("a write to a closed hole was not refused: {other:?}"),
    }
    // And normal mail flows on.
    increment(&host).await;
    let got = wait_for_reply(&host, "count = 2", Duration::from_secs(20)).await;
    assert_eq!(got, vec!["count = 1", "count = 2"]);
}

/// A message dismissed before the runner got to it leaves its number
/// empty below the inbox mark, where nothing can be written any more:
/// the runner passes over it at once. Here the runner waits at a gap
/// (N reserved, N + 1 written), then N + 1 is dismissed: both numbers
/// lie below the mark, the late writer of N is refused, and the next
/// message is handled without the grace (until stop 38 the runner
/// waited out all 4 s at N).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dismissed_before_it_was_handled_holds_up_nothing() {
    let (_rt, host, g) = counter_guest().await;
    let guest = host.agent("c").await.unwrap();
    let n = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    let n1 = host.reserve_admitting(g, 1, 0, None).await.unwrap();
    land(&host, g, n1).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        replies(&host.inbox(None).await.unwrap()).is_empty(),
        "N + 1 was handled while N was still in flight"
    );
    guest.dismiss(RequestId::random(), n1).await.unwrap();
    match land(&host, g, n).await {
        Err(Error::InboxSlotTaken { number, .. }) => assert_eq!(number, n),
        other => panic!("a write below the inbox mark was not refused: {other:?}"),
    }
    increment(&host).await;
    let got = wait_for_reply(&host, "count = 1", Duration::from_secs(20)).await;
    assert_eq!(got, vec!["count = 1"], "the dismissed message was handled");
    assert!(
        started.elapsed() < crate::rules::inbox::HOLE_GRACE,
        "the runner waited out the grace at numbers below the inbox mark ({:?})",
        started.elapsed()
    );
}

/// Sends one increment to the counter guest `c`.
async fn increment(host: &AgentHandle) {
    host.send(
        RequestId::random(),
        "c",
        vec!["increment".into()],
        vec![],
        None,
    )
    .await
    .unwrap();
}

/// Sends `n` increments at once and waits for the answer to the last.
async fn burst(host: &AgentHandle, n: usize) -> Vec<String> {
    let sends = (0..n).map(|_| {
        host.send(
            RequestId::random(),
            "c",
            vec!["increment".into()],
            vec![],
            None,
        )
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    wait_for_reply(host, &format!("count = {n}"), Duration::from_secs(60)).await
}

fn assert_each_once(got: &[String], n: usize) {
    let mut sorted = got.to_vec();
    sorted.sort_by_key(|r| r["count = ".len()..].parse::<usize>().unwrap_or(0));
    let want: Vec<String> = (1..=n).map(|i| format!("count = {i}")).collect();
    assert_eq!(sorted, want, "each increment answered once: {got:?}");
}

/// A burst of mail is handled in batches: each message once, in order,
/// with far fewer commits than three per message (a stored value, a
/// reply and a mark each had their own before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_handled_once_each_in_batched_commits() {
    let store = Arc::new(capstan_cluster::mem_store::MemStore::new());
    let (_rt, host, _) = counter_guest_on(capstan_cluster::Db::new(store.clone())).await;
    // wake the guest once, so the burst below lands on a runner
    host.send(RequestId::random(), "c", vec!["get".into()], vec![], None)
        .await
        .unwrap();
    wait_for_reply(&host, "count = 0", Duration::from_secs(20)).await;
    let before = store.history_stats().version;
    let n = 60;
    let got = burst(&host, n).await;
    let got: Vec<String> = got.into_iter().filter(|r| r != "count = 0").collect();
    assert_each_once(&got, n);
    let commits = store.history_stats().version - before;
    eprintln!("{commits} commits for {n} messages");
    // n commits are the senders'; the guest's share must be well under
    // one per message.
    assert!(
        commits < (n as u64) * 2,
        "{commits} commits for {n} messages: the guest's writes are not batched"
    );
}

/// What handled messages leave behind besides their effects: no
/// exactly-once records of the guest's operations (each message's mark
/// commits with them, so nothing reads them) and no reference stamps
/// of the values it stored (formulas made in the same commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handled_messages_leave_no_exactly_once_records_or_stamps() {
    let (_rt, host, g) = counter_guest().await;
    let db = host.inner().db.clone();
    let rows = |prefix: Vec<u8>| {
        let db = db.clone();
        async move {
            db.read(move |tx| {
                let p = prefix.clone();
                Box::pin(async move { Ok::<_, Error>(tx.get_prefix(&p, 0, false).await?.len()) })
            })
            .await
            .unwrap()
        }
    };
    let stamps = rows(crate::keys::formula_refs()).await;
    let n = 40;
    assert_each_once(&burst(&host, n).await, n);
    let guest = AgentHandle::load(host.inner(), g).await.unwrap();
    assert_eq!(guest.cat("count").await.unwrap().1, b"40");
    // A message whose handler spans a commit (one over FLUSH_AFTER)
    // keeps the records made before it: allow a few.
    let prefix = capstan_cluster::tuple::TupleKey::new()
        .str("d")
        .bytes(g.as_bytes())
        .into_vec();
    let records = rows(prefix).await;
    assert!(
        records < n / 4,
        "{records} exactly-once records for {n} messages"
    );
    let new_stamps = rows(crate::keys::formula_refs()).await - stamps;
    assert!(
        new_stamps < n / 4,
        "{new_stamps} stamps for {n} stored counts"
    );
}

/// The same under a store that refuses commits at random (spurious
/// conflicts, and "maybe committed" answers that did or did not apply):
/// a batch given up is handled again, and still every message is
/// handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_given_up_by_the_store_repeat_nothing() {
    let mut redone_total = 0;
    // Seeds until two of them made the runner give up a batch (each
    // run is checked whatever happened in it).
    let mut seeds_redone = 0;
    for seed in 1..=40 {
        if seeds_redone >= 2 {
            break;
        }
        let faults = capstan_cluster::mem_store::Faults {
            conflict_ppm: 250_000,
            maybe_committed_ppm: 50_000,
            ..capstan_cluster::mem_store::Faults::seeded(seed)
        };
        let store = Arc::new(capstan_cluster::mem_store::MemStore::with_faults(faults));
        let (_rt, host, g) = counter_guest_on(capstan_cluster::Db::new(store.clone())).await;
        let n = 40;
        let got = burst(&host, n).await;
        assert_each_once(&got, n);
        let guest = AgentHandle::load(host.inner(), g).await.unwrap();
        let (_, count) = guest.cat("count").await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&count),
            n.to_string(),
            "seed {seed}"
        );
        let redone = crate::guest::guest_host(host.inner())
            .ok()
            .and_then(|gh| gh.stats.lock().ok()?.get(&g).map(|s| s.batches_redone))
            .unwrap_or(0);
        redone_total += redone;
        seeds_redone += usize::from(redone > 0);
        eprintln!(
            "seed {seed}: {redone} batches redone, {:?}",
            store.fault_counts()
        );
    }
    assert!(
        redone_total > 0,
        "no batch was given up: the faults missed the runner"
    );
}

/// The in-memory store, but the next reads of one key fail (as etcd's do
/// during a leader change, when nodes take agents over).
struct FailingReads {
    inner: capstan_cluster::mem_store::MemStore,
    key: Arc<std::sync::Mutex<Vec<u8>>>,
    left: Arc<std::sync::atomic::AtomicU32>,
}

struct FailingSnapshot {
    inner: Box<dyn capstan_cluster::Snapshot>,
    key: Arc<std::sync::Mutex<Vec<u8>>>,
    left: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait::async_trait]
impl capstan_cluster::Store for FailingReads {
    fn describe(&self) -> String {
        "mem: failing reads of one key".into()
    }

    async fn snapshot(&self) -> Result<Box<dyn capstan_cluster::Snapshot>, StoreError> {
        Ok(Box::new(FailingSnapshot {
            inner: self.inner.snapshot().await?,
            key: self.key.clone(),
            left: self.left.clone(),
        }))
    }

    async fn commit(
        &self,
        req: capstan_cluster::CommitRequest,
    ) -> Result<capstan_cluster::Version, StoreError> {
        self.inner.commit(req).await
    }
}

#[async_trait::async_trait]
impl capstan_cluster::Snapshot for FailingSnapshot {
    fn version(&self) -> capstan_cluster::Version {
        self.inner.version()
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let hit = *self.key.lock().unwrap() == key;
        let take = |n: u32| n.checked_sub(1);
        if hit
            && self
                .left
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    take,
                )
                .is_ok()
        {
            return Err(StoreError::Io("injected: the store did not answer".into()));
        }
        self.inner.get(key).await
    }

    async fn range(
        &self,
        opt: &capstan_cluster::RangeOption,
    ) -> Result<Vec<capstan_cluster::KeyValue>, StoreError> {
        self.inner.range(opt).await
    }
}

/// A guest's runner that fails to start (its body could not be read) is
/// started again at the guest's next message: the incarnation had owned
/// the inbox with no runner, and nothing started one while mail came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_failed_to_start_starts_at_the_next_message() {
    let key = Arc::new(std::sync::Mutex::new(Vec::new()));
    let left = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let store = Arc::new(FailingReads {
        inner: capstan_cluster::mem_store::MemStore::new(),
        key: key.clone(),
        left: left.clone(),
    });
    let (rt, host, g) = counter_guest_on(capstan_cluster::Db::new(store.clone())).await;
    increment(&host).await;
    wait_for_reply(&host, "count = 1", Duration::from_secs(20)).await;
    rt.shutdown().await;
    drop((rt, host));

    // The node starts again; the guest's first incarnation cannot read its
    // body once.
    *key.lock().unwrap() = keys::body(&g);
    left.store(1, std::sync::atomic::Ordering::SeqCst);
    let rt = runtime_with_guests(capstan_cluster::Db::new(store)).await;
    let host = rt.root_host();
    increment(&host).await;
    let got = wait_for_reply(&host, "count = 2", Duration::from_secs(20)).await;
    assert_eq!(
        left.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the injected failure was never met, so this test checked nothing"
    );
    assert_eq!(got, vec!["count = 1", "count = 2"]);
}

/// The in-memory store, but the first commit that clears a placement once
/// armed (an incarnation giving its placement up) is held back a while.
struct SlowRelease {
    inner: capstan_cluster::mem_store::MemStore,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

/// How long [`SlowRelease`] holds the release back.
const RELEASE_HELD: Duration = Duration::from_millis(300);

#[async_trait::async_trait]
impl capstan_cluster::Store for SlowRelease {
    fn describe(&self) -> String {
        "mem: slow placement releases".into()
    }

    async fn snapshot(&self) -> Result<Box<dyn capstan_cluster::Snapshot>, StoreError> {
        self.inner.snapshot().await
    }

    async fn commit(
        &self,
        req: capstan_cluster::CommitRequest,
    ) -> Result<capstan_cluster::Version, StoreError> {
        let placements = capstan_cluster::tuple::TupleKey::new()
            .str("cl")
            .str("p")
            .into_vec();
        let releases = req.mutations.iter().any(
            |m| matches!(m, capstan_cluster::Mutation::Clear(k) if k.starts_with(&placements)),
        );
        if releases && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(RELEASE_HELD).await;
        }
        self.inner.commit(req).await
    }
}

/// In a cluster, an idle guest's incarnation is passivated and gives its
/// placement up; a message arriving meanwhile starts a new incarnation on
/// the same node. The new one must not lose the placement to the old
/// one's release landing after it started: it waits for the release and
/// claims the guest afresh. (It kept the cached "owner is me", the release
/// then cleared the placement, and its runner's next batch was fenced:
/// the message waited for the guest to be passivated and resumed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_racing_passivation_keeps_its_new_owner_placed() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = Arc::new(SlowRelease {
        inner: capstan_cluster::mem_store::MemStore::new(),
        armed: armed.clone(),
    });
    let rt = runtime_with_guests_opts(
        capstan_cluster::Db::new(store),
        RuntimeOptions {
            idle_timeout: Duration::from_millis(1000),
            ..RuntimeOptions::default()
        },
    )
    .await;
    let _links = rt
        .join_cluster(crate::cluster::ClusterConfig {
            name: "n1".into(),
            node_id: "n1-id".into(),
            addr: "test:1".into(),
            lease: Duration::from_millis(1200),
        })
        .await
        .unwrap();
    let (host, g) = counter_on(&rt).await;
    increment(&host).await;
    wait_for_reply(&host, "count = 1", Duration::from_secs(20)).await;

    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.inner().registry.agent(&g).is_some() {
        assert!(Instant::now() < deadline, "the guest was never passivated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The release is held back now: a message starts a new incarnation.
    increment(&host).await;
    wait_for_reply(&host, "count = 2", Duration::from_secs(20)).await;
    tokio::time::sleep(RELEASE_HELD).await;
    assert!(
        !armed.load(std::sync::atomic::Ordering::SeqCst),
        "no release was held back, so this test checked nothing"
    );
    // The release landed; the new incarnation (not idle yet) handles on.
    increment(&host).await;
    let got = wait_for_reply(&host, "count = 3", Duration::from_secs(20)).await;
    assert_eq!(got, vec!["count = 1", "count = 2", "count = 3"]);
    let fenced = rt
        .membership()
        .map_or(0, |c| c.fenced.load(std::sync::atomic::Ordering::Relaxed));
    let redone = crate::guest::guest_host(host.inner())
        .ok()
        .and_then(|gh| gh.stats.lock().ok()?.get(&g).map(|s| s.batches_redone))
        .unwrap_or(0);
    assert_eq!((fenced, redone), (0, 0), "writes fenced, batches redone");
}
