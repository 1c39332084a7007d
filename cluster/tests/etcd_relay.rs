//! Relayed commits ([`capstan_cluster::relay`]) against a real etcd cluster:
//! the whole conformance suite on a client that relays every commit through
//! another client of the same store, and the hostile cases: the relay whose
//! answer is lost, the group that reaches etcd after its sender gave up on
//! it, the relay that refuses, and a group that reaches outside the store.
//!
//! Needs `CAPSTAN_ETCD_ENDPOINTS` like `etcd_conformance.rs` (skipped
//! without it unless `CAPSTAN_REQUIRE_ETCD=1`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use capstan_cluster::conformance::{get, increment, runtime as rt, set, unique};
use capstan_cluster::etcd_store::{EtcdStore, RECENT_RELAY};
use capstan_cluster::relay::{
    CommitRelay, FillAnswer, FillFuture, FilledFuture, Filler, GroupFill, RelayError, RelayFuture,
};
use capstan_cluster::store::Filled;
use capstan_cluster::{Db, Store, StoreError};

fn endpoints() -> Option<String> {
    capstan_cluster::conformance::etcd_endpoints()
}

fn etcd_enabled() -> bool {
    endpoints().is_some()
}

fn spec_for(tag: &str) -> String {
    format!(
        "etcd://{}/capstan-test/relay-{tag}?max-request-bytes=16777216",
        endpoints().expect("endpoints")
    )
}

/// What a test relay does with a group.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Hands it to the other client and returns its answer.
    Faithful,
    /// Hands it over, then loses the answer.
    LoseAnswer,
    /// Keeps it (to hand over later) and says the outcome is unknown.
    Hold,
    /// Says it was not applied, without handing it over.
    Refuse,
    /// A relay from before senders gathered shared compares: refuses a
    /// group with a member nested in another, hands the others over.
    Old,
}

/// Whether the group `g` has a member nested in another (shared compares
/// gathered above it), and how many operations (members and gatherings)
/// it has besides its marker's put.
fn shape_of(g: &[u8]) -> (bool, usize) {
    use capstan_cluster::etcd_rpc::{Request, TxnRequest};
    let txn = <TxnRequest as prost::Message>::decode(g).expect("a group is a Txn");
    let gathered = txn.success.iter().any(|op| match &op.request {
        Some(Request::Txn(m)) => m
            .success
            .iter()
            .any(|o| matches!(o.request, Some(Request::Txn(_)))),
        _ => false,
    });
    (gathered, txn.success.len() - 1)
}

/// A relay to another client of the same store, in this process.
struct TestRelay {
    to: Arc<dyn Store>,
    mode: Mode,
    calls: AtomicUsize,
    held: Mutex<Vec<Vec<u8>>>,
    /// Groups handed over: whether each had gathered members, and its
    /// operations besides its marker's put.
    handed: Mutex<Vec<(bool, usize)>>,
}

impl TestRelay {
    fn new(to: Arc<dyn Store>, mode: Mode) -> Arc<TestRelay> {
        Arc::new(TestRelay {
            to,
            mode,
            calls: AtomicUsize::new(0),
            held: Mutex::new(Vec::new()),
            handed: Mutex::new(Vec::new()),
        })
    }
}

impl CommitRelay for TestRelay {
    fn relay(&self, group: Vec<u8>) -> Option<RelayFuture> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let to = self.to.clone();
        match self.mode {
            Mode::Old if shape_of(&group).0 => Some(Box::pin(async {
                Err(RelayError::NotApplied(
                    "refused a relayed group: a member puts and deletes only".into(),
                ))
            })),
            Mode::Faithful | Mode::Old => {
                self.handed.lock().unwrap().push(shape_of(&group));
                Some(Box::pin(async move { to.commit_relayed(group).await }))
            }
            Mode::LoseAnswer => Some(Box::pin(async move {
                let _ = to.commit_relayed(group).await;
                Err(RelayError::Unknown("the answer was lost".into()))
            })),
            Mode::Hold => {
                self.held.lock().unwrap().push(group);
                Some(Box::pin(async {
                    Err(RelayError::Unknown("no answer".into()))
                }))
            }
            Mode::Refuse => Some(Box::pin(async {
                Err(RelayError::NotApplied("refused".into()))
            })),
        }
    }

    fn eager(&self) -> bool {
        true
    }

    fn relay_filled(&self, group: Vec<u8>, fills: Vec<GroupFill>) -> Option<FilledFuture> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let to = self.to.clone();
        match self.mode {
            Mode::Faithful | Mode::Old => Some(Box::pin(async move {
                to.commit_relayed_filled(group, fills).await
            })),
            Mode::LoseAnswer => Some(Box::pin(async move {
                let _ = to.commit_relayed_filled(group, fills).await;
                Err(RelayError::Unknown("the answer was lost".into()))
            })),
            Mode::Hold => {
                self.held.lock().unwrap().push(group);
                Some(Box::pin(async {
                    Err(RelayError::Unknown("no answer".into()))
                }))
            }
            Mode::Refuse => Some(Box::pin(async {
                Err(RelayError::NoFill("refused".into()))
            })),
        }
    }
}

/// Hands out the numbers of every sequence from 100 up, one counter for
/// all, and says "n9" with them; or refuses sequences named "other".
struct CountingFiller(AtomicUsize);

impl Filler for CountingFiller {
    fn fill(&self, scope: &[u8], count: u32) -> FillFuture {
        let first = 100 + self.0.fetch_add(count as usize, Ordering::Relaxed) as u64;
        let mine = scope != b"other";
        Box::pin(async move {
            match mine {
                true => Ok(FillAnswer {
                    first,
                    notes: vec!["n9".into()],
                }),
                false => Err("not the owner".into()),
            }
        })
    }
}

/// Commits, as `db`, the key `m/` + the number filled in for `scope`
/// (big-endian), valued with it both ways: the placeholder and where the
/// number lands.
async fn put_filled(db: &Db, scope: &'static [u8]) -> Result<(u64, Filled), StoreError> {
    let filled = Filled::default();
    let f2 = filled.clone();
    let p = db
        .transact(move |tx| {
            let p = tx.fill(scope, &f2);
            Box::pin(async move {
                let key = [b"m/".as_slice(), &p.to_be_bytes()].concat();
                tx.expect_absent(&key);
                let value = [p.to_le_bytes(), p.to_be_bytes()].concat();
                tx.set(&key, &value)?;
                tx.set(
                    &[b"d/".as_slice(), &p.to_le_bytes()[..4]].concat(),
                    b"record",
                )?;
                Ok::<_, StoreError>(p)
            })
        })
        .await?;
    Ok((p, filled))
}

/// The key `put_filled` wrote for `number`, and whether its value holds it.
async fn filled_key(db: &Db, number: u64) -> Option<bool> {
    let key = [b"m/".as_slice(), &number.to_be_bytes()].concat();
    get(db, &key)
        .await
        .unwrap()
        .map(|v| v == [number.to_le_bytes(), number.to_be_bytes()].concat())
}

/// Two clients of the store `tag`: the first relays every commit through
/// the second in `mode` (and the relay, to look at what it did).
async fn pair(tag: &str, mode: Mode) -> (Db, Db, Arc<TestRelay>) {
    let spec = spec_for(tag);
    let proxy: Arc<dyn Store> = Arc::new(EtcdStore::open(&spec).await.unwrap());
    let sender = EtcdStore::open(&spec).await.unwrap();
    let relay = TestRelay::new(proxy.clone(), mode);
    sender.set_relay(Some(relay.clone()));
    (Db::new(Arc::new(sender)), Db::new(proxy), relay)
}

async fn open_relayed(dir: PathBuf) -> Result<Db, StoreError> {
    let tag = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("scratch")
        .to_string();
    Ok(pair(&tag, Mode::Faithful).await.0)
}

capstan_cluster::conformance_tests!(open_relayed, enabled: etcd_enabled);

async fn counter(db: &Db, key: &[u8]) -> u64 {
    capstan_cluster::conformance::counter(db, key)
        .await
        .unwrap()
}

/// Two relaying clients and the relay itself increment one counter at
/// once: the groups merged into the relay's Txns never lose an update.
#[test]
fn relayed_and_local_commits_on_one_counter_lose_nothing() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let tag = unique("counter");
        let (a, proxy, relay) = pair(&tag, Mode::Faithful).await;
        let b = EtcdStore::open(&spec_for(&tag)).await.unwrap();
        b.set_relay(Some(TestRelay::new(proxy.store().clone(), Mode::Faithful)));
        let b = Db::new(Arc::new(b));
        let mut tasks = Vec::new();
        for db in [a, b, proxy.clone()] {
            for _ in 0..4 {
                let db = db.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..10 {
                        increment(&db, b"n").await.unwrap();
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(counter(&proxy, b"n").await, 120);
        assert!(
            relay.calls.load(Ordering::Relaxed) > 0,
            "nothing was relayed"
        );
    });
}

/// The relay applies a group and its answer is lost: the sender resolves
/// it by its marker, finds it applied, and does not apply it again.
#[test]
fn a_lost_answer_is_resolved_as_applied_once() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("lost"), Mode::LoseAnswer).await;
        for _ in 0..5 {
            increment(&a, b"n").await.unwrap();
            // (a failed relay pauses relaying; wait it out so each goes there)
            tokio::time::sleep(capstan_cluster::etcd_store::RELAY_PAUSE).await;
        }
        assert_eq!(counter(&proxy, b"n").await, 5);
        assert_eq!(relay.calls.load(Ordering::Relaxed), 5);
    });
}

/// The relay keeps a group and says nothing useful; the sender fences the
/// group's marker and commits on its own. The group reaches etcd later
/// through the relay: it fails its compare, and nothing is applied twice.
#[test]
fn a_group_that_lands_late_is_fenced() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("late"), Mode::Hold).await;
        increment(&a, b"n").await.unwrap();
        set(&a, b"other", b"x").await.unwrap();
        assert_eq!(counter(&proxy, b"n").await, 1);
        let held = std::mem::take(&mut *relay.held.lock().unwrap());
        assert_eq!(held.len(), 1, "the first commit went to the relay");
        let answer = proxy.store().commit_relayed(held[0].clone()).await.unwrap();
        let resp =
            <capstan_cluster::etcd_rpc::TxnResponse as prost::Message>::decode(answer.as_slice())
                .unwrap();
        assert!(!resp.succeeded, "a fenced group must not apply");
        assert_eq!(counter(&proxy, b"n").await, 1);
    });
}

/// A relay that refuses (an older member, a full queue): the sender commits
/// the group itself.
#[test]
fn a_refused_group_is_committed_by_its_sender() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("refused"), Mode::Refuse).await;
        increment(&a, b"n").await.unwrap();
        assert_eq!(counter(&proxy, b"n").await, 1);
        assert_eq!(relay.calls.load(Ordering::Relaxed), 1);
    });
}

/// A relay from before gathering (a cluster being upgraded) refuses a
/// group whose members share compares gathered: that group is committed by
/// its sender, and the sender's next groups go as their members were, which
/// the old relay takes. Every commit lands once.
#[test]
fn an_older_relay_is_sent_groups_it_takes() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("older"), Mode::Old).await;
        set(&a, b"shared", b"v").await.unwrap();
        // Concurrent commits that each read "shared" and write a key of
        // their own: batched together, their compare of "shared" gathered.
        let burst = |round: usize| {
            let a = a.clone();
            async move {
                let tasks: Vec<_> = (0..24)
                    .map(|i| {
                        let a = a.clone();
                        tokio::spawn(async move {
                            let key = format!("k{round}-{i}").into_bytes();
                            a.transact(move |tx| {
                                let key = key.clone();
                                Box::pin(async move {
                                    let v = tx.get(b"shared").await?.unwrap_or_default();
                                    tx.set(&key, &v)
                                })
                            })
                            .await
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            }
        };
        let stat = |name: &str| {
            a.store()
                .stats()
                .into_iter()
                .find(|(k, _)| *k == name)
                .map_or(0, |(_, v)| v)
        };
        let mut round = 0;
        let (mut shared, mut compares) = (0, 0);
        while relay.calls.load(Ordering::Relaxed) == relay.handed.lock().unwrap().len() {
            assert!(round < 20, "no gathered group reached the relay");
            (shared, compares) = (stat("compares_shared"), stat("commit_compares"));
            burst(round).await;
            round += 1;
        }
        // The burst whose gathered group was refused: its members were
        // committed again by the sender, and what that Txn shares is counted
        // once (each commit makes one compare, sent at least once per Txn).
        let (shared, compares) = (
            stat("compares_shared") - shared,
            stat("commit_compares") - compares,
        );
        assert!(
            shared < compares,
            "{shared} compares counted as shared of the {compares} the refused burst made"
        );
        // (the refusal paused relaying: wait it out)
        tokio::time::sleep(capstan_cluster::etcd_store::RELAY_PAUSE).await;
        let refused =
            |r: &TestRelay| r.calls.load(Ordering::Relaxed) - r.handed.lock().unwrap().len();
        let handed_before = relay.handed.lock().unwrap().len();
        let refused_before = refused(&relay);
        let last = round + 6;
        for r in round..last {
            burst(r).await;
        }
        let handed = relay.handed.lock().unwrap().clone();
        assert_eq!(
            refused(&relay),
            refused_before,
            "the relay refused groups again"
        );
        assert!(
            handed[handed_before..].iter().any(|(_, ops)| *ops > 1),
            "no group of several members was relayed after the refusal"
        );
        assert!(
            handed[handed_before..].iter().all(|(g, _)| !g),
            "a gathered group went to the relay that refused one"
        );
        for r in 0..last {
            for i in 0..24 {
                let key = format!("k{r}-{i}").into_bytes();
                assert_eq!(get(&proxy, &key).await.unwrap(), Some(b"v".to_vec()));
            }
        }
    });
}

/// A relayed group that reaches outside the store (another prefix), is
/// not a group, or is garbage: refused, and nothing is written.
#[test]
fn a_group_outside_the_store_is_refused() {
    if !etcd_enabled() {
        return;
    }
    use capstan_cluster::etcd_rpc::{Compare, RequestOp, TxnRequest, compare_result};
    use prost::Message;
    rt().block_on(async {
        let (tag, other) = (unique("own"), unique("other"));
        let proxy = EtcdStore::open(&spec_for(&tag)).await.unwrap();
        let victim = capstan_cluster::open(&spec_for(&other)).await.unwrap();
        let marker = format!("capstan-test/relay-{tag}/c/m1").into_bytes();
        let member = |key: Vec<u8>| TxnRequest {
            compare: vec![],
            success: vec![RequestOp::put(key, b"evil".to_vec(), 0)],
            failure: vec![],
        };
        let group = |members: Vec<TxnRequest>, marker: &[u8]| {
            let mut success: Vec<RequestOp> = members.into_iter().map(RequestOp::txn).collect();
            success.push(RequestOp::put(marker.to_vec(), b"c".to_vec(), 0));
            TxnRequest {
                compare: vec![Compare::create_revision(
                    marker.to_vec(),
                    compare_result::EQUAL,
                    0,
                )],
                success,
                failure: vec![],
            }
            .encode_to_vec()
        };
        // `m` under `levels` Txns that each check a compare (of the store's)
        let gathered = |m: TxnRequest, levels: usize| {
            (0..levels).fold(m, |m, _| TxnRequest {
                compare: vec![Compare::create_revision(
                    format!("capstan-test/relay-{tag}/d/shared").into_bytes(),
                    compare_result::EQUAL,
                    0,
                )],
                success: vec![RequestOp::txn(m)],
                failure: vec![],
            })
        };
        let outside = format!("capstan-test/relay-{other}/d/x").into_bytes();
        let own = format!("capstan-test/relay-{tag}/d/x").into_bytes();
        let bad = [
            group(vec![member(outside.clone())], &marker),
            // the marker under another prefix
            group(
                vec![member(own.clone())],
                format!("capstan-test/relay-{other}/c/m2").as_bytes(),
            ),
            // the guard is the relay's to put
            group(
                vec![member(format!("capstan-test/relay-{tag}/g").into_bytes())],
                &marker,
            ),
            b"\xff\xff not a Txn".to_vec(),
            // a gathering of members under shared compares that puts
            // outside the store
            group(vec![gathered(member(outside.clone()), 1)], &marker),
            // gatherings deeper than a sender makes
            group(vec![gathered(member(own.clone()), 3)], &marker),
        ];
        for g in bad {
            match proxy.commit_relayed(g).await {
                Err(RelayError::NotApplied(_)) => {}
                other => panic!("a bad group was not refused: {other:?}"),
            }
        }
        assert_eq!(get(&victim, b"x").await.unwrap(), None);
        let own_db = Db::new(Arc::new(proxy));
        assert_eq!(get(&own_db, b"x").await.unwrap(), None);
        // the same group inside the store is taken, its member gathered two
        // levels deep (as a sender gathers members sharing compares)
        own_db
            .store()
            .commit_relayed(group(vec![gathered(member(own), 2)], &marker))
            .await
            .unwrap();
        assert_eq!(get(&own_db, b"x").await.unwrap(), Some(b"evil".to_vec()));
    });
}

/// Commits whose numbers the relay fills in: each gets the filler's next
/// number written over its placeholder in its key and its value (both byte
/// orders), concurrent ones distinct numbers; the placeholder itself is
/// nowhere in the store, and the sender learns each number and what the
/// filler said with it.
#[test]
fn the_relay_fills_numbers_in_from_its_filler() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("fill"), Mode::Faithful).await;
        proxy
            .store()
            .set_filler(Some(Arc::new(CountingFiller(AtomicUsize::new(0)))));
        assert!(a.store().fills());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move { put_filled(&a, b"seq").await }));
        }
        let mut numbers = Vec::new();
        for t in tasks {
            let (placeholder, filled) = t.await.unwrap().unwrap();
            assert!(placeholder >> 63 == 1, "a placeholder has its top bit set");
            let got = filled.get().expect("the relay said which number");
            assert_eq!(got.notes, vec!["n9".to_string()]);
            assert_eq!(filled_key(&proxy, got.number).await, Some(true));
            assert_eq!(filled_key(&proxy, placeholder).await, None);
            numbers.push(got.number);
        }
        numbers.sort();
        assert_eq!(
            numbers,
            (100..108).collect::<Vec<_>>(),
            "one number each, none twice"
        );
        assert!(relay.calls.load(Ordering::Relaxed) >= 1);
    });
}

/// A relay that fills nothing in (no filler; one that does not own the
/// sequence; one that refuses): the commit fails with `FillUnavailable`,
/// nothing of it written, and the relay stays in use for other commits.
#[test]
fn a_commit_no_relay_fills_writes_nothing() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("nofill"), Mode::Faithful).await;
        let e = put_filled(&a, b"seq").await.err();
        assert!(matches!(e, Some(StoreError::FillUnavailable(_))), "{e:?}");
        proxy
            .store()
            .set_filler(Some(Arc::new(CountingFiller(AtomicUsize::new(0)))));
        let e = put_filled(&a, b"other").await.err();
        assert!(matches!(e, Some(StoreError::FillUnavailable(_))), "{e:?}");
        for n in 100..102 {
            assert_eq!(filled_key(&proxy, n).await, None, "nothing written");
        }
        // (not paused: the next commit is relayed again)
        let before = relay.calls.load(Ordering::Relaxed);
        set(&a, b"plain", b"x").await.unwrap();
        assert_eq!(relay.calls.load(Ordering::Relaxed), before + 1);
        let (b, _, _) = pair(&unique("refuse"), Mode::Refuse).await;
        let e = put_filled(&b, b"seq").await.err();
        assert!(matches!(e, Some(StoreError::FillUnavailable(_))), "{e:?}");
    });
}

/// The relay fills a number in and applies the group, and its answer is
/// lost: the sender settles the commit by its marker as applied, without
/// the number (its caller reads what it wrote to learn it), and the number
/// is in the store once.
#[test]
fn a_filled_commit_whose_answer_is_lost_applies_once() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, _) = pair(&unique("fill-lost"), Mode::LoseAnswer).await;
        proxy
            .store()
            .set_filler(Some(Arc::new(CountingFiller(AtomicUsize::new(0)))));
        let (_, filled) = put_filled(&a, b"seq").await.unwrap();
        assert!(filled.get().is_none(), "the answer was lost");
        assert_eq!(filled_key(&proxy, 100).await, Some(true));
        let rows = proxy
            .read(|tx| {
                Box::pin(async move {
                    tx.get_range(capstan_cluster::RangeOption::new(
                        b"m/".to_vec(),
                        b"m0".to_vec(),
                    ))
                    .await
                })
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "applied once");
    });
}

/// A store with no relay (etcd alone, and the in-memory store) takes no
/// commit with numbers to fill in: refused before anything is sent.
#[test]
fn a_store_without_a_relay_refuses_numbers_to_fill() {
    rt().block_on(async {
        let mem = Db::new(Arc::new(capstan_cluster::mem_store::MemStore::new()));
        let e = put_filled(&mem, b"seq").await.err();
        assert!(matches!(e, Some(StoreError::FillUnavailable(_))), "{e:?}");
        let direct = mem
            .store()
            .commit(capstan_cluster::CommitRequest {
                mutations: vec![capstan_cluster::Mutation::Set(b"k".to_vec(), b"v".to_vec())],
                fills: vec![capstan_cluster::store::Fill {
                    scope: b"seq".to_vec(),
                    placeholder: 1 << 63,
                    filled: Filled::default(),
                }],
                ..Default::default()
            })
            .await;
        assert!(
            matches!(direct, Err(StoreError::FillUnavailable(_))),
            "{direct:?}"
        );
        assert_eq!(get(&mem, b"k").await, Ok(None));
        if !etcd_enabled() {
            return;
        }
        let alone = Db::new(Arc::new(
            EtcdStore::open(&spec_for(&unique("alone"))).await.unwrap(),
        ));
        let e = put_filled(&alone, b"seq").await.err();
        assert!(matches!(e, Some(StoreError::FillUnavailable(_))), "{e:?}");
    });
}

/// A group whose numbers to fill in are not all in it (a placeholder the
/// group lacks, or one named twice) is refused before any number is taken:
/// the filler hands out nothing and nothing is written. The same group
/// with its own placeholders applies, once.
#[test]
fn a_group_naming_placeholders_it_lacks_is_refused() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, proxy, relay) = pair(&unique("fill-bad"), Mode::Hold).await;
        let filler = Arc::new(CountingFiller(AtomicUsize::new(0)));
        proxy.store().set_filler(Some(filler.clone()));
        // (the relay holds the group and says nothing: the sender fences it
        // and, its numbers unfilled, fails the commit)
        let held_commit = put_filled(&a, b"seq").await;
        assert!(held_commit.is_err(), "{held_commit:?}");
        let group = relay.held.lock().unwrap().pop().expect("the group");
        let stranger = 0x8000_0000_dead_beef_u64;
        for fills in [
            vec![GroupFill {
                scope: b"seq".to_vec(),
                placeholders: vec![stranger],
            }],
            vec![GroupFill {
                scope: b"seq".to_vec(),
                placeholders: vec![stranger, stranger],
            }],
        ] {
            let r = proxy
                .store()
                .commit_relayed_filled(group.clone(), fills)
                .await;
            assert!(matches!(r, Err(RelayError::NotApplied(_))), "{r:?}");
        }
        assert_eq!(filler.0.load(Ordering::Relaxed), 0, "no number was taken");
        for n in 100..103 {
            assert_eq!(filled_key(&proxy, n).await, None, "nothing written");
        }
    });
}

/// A client counts as relaying while a group is at the relay and for
/// [`RECENT_RELAY`] after its last one was answered (so that a node under
/// a steady load has its senders' numbers filled in between two groups),
/// and no longer once it has relayed nothing for a while (an idle node's
/// lone commits go to etcd directly).
#[test]
fn a_client_counts_as_relaying_briefly_after_its_last_group() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (a, _proxy, relay) = pair(&unique("recent"), Mode::Faithful).await;
        assert!(!a.store().relaying_now(), "nothing was relayed yet");
        increment(&a, b"r").await.unwrap();
        let answered = std::time::Instant::now();
        // (past the moment the group's answer reaches its waiter, when the
        // group may still count as at the relay)
        tokio::time::sleep(RECENT_RELAY / 4).await;
        let now = a.store().relaying_now();
        assert!(
            relay.calls.load(Ordering::Relaxed) > 0,
            "nothing was relayed"
        );
        // (only when this thread was not held up past the window itself)
        if answered.elapsed() < RECENT_RELAY / 2 {
            assert!(now, "a group answered a moment ago: still relaying");
        }
        tokio::time::sleep(RECENT_RELAY * 3).await;
        assert!(
            !a.store().relaying_now(),
            "nothing relayed for {:?}: no longer relaying",
            RECENT_RELAY * 3
        );
    });
}
