//! Durable commit throughput (1 and 64 concurrent committers) and snapshot read
//! latency of the embedded store. Each commit is a `transact` setting one key,
//! acknowledged only once fsynced (group commit batches concurrent ones).

use std::time::{Duration, Instant};

use capstan_cluster::{Db, StoreError};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn commits(db: &Db, rt: &tokio::runtime::Runtime, concurrency: u64, total: u64) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..concurrency {
            let db = db.clone();
            let n = total / concurrency + u64::from(t < total % concurrency);
            tasks.push(tokio::spawn(async move {
                for i in 0..n {
                    let key = format!("bench/{t}/{i}").into_bytes();
                    db.transact(move |tx| {
                        let key = key.clone();
                        Box::pin(async move { tx.set(&key, b"value") })
                    })
                    .await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(
        std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt
        .block_on(capstan_cluster::open(
            dir.path().join("bench.redb").to_str().unwrap(),
        ))
        .unwrap();

    let mut g = c.benchmark_group("durable_commit");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for concurrency in [1u64, 64] {
        g.bench_function(format!("concurrency_{concurrency}"), |b| {
            b.iter_custom(|iters| commits(&db, &rt, concurrency, iters))
        });
    }
    g.finish();

    rt.block_on(async {
        db.transact(|tx| Box::pin(async move { tx.set(b"bench/read", b"value") }))
            .await
            .unwrap();
    });
    let store = db.store().clone();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("get", |b| {
        let snap = rt.block_on(store.snapshot()).unwrap();
        b.iter(|| rt.block_on(snap.get(b"bench/read")).unwrap())
    });
    g.bench_function("snapshot_and_get", |b| {
        b.iter(|| {
            rt.block_on(async {
                store
                    .snapshot()
                    .await
                    .unwrap()
                    .get(b"bench/read")
                    .await
                    .unwrap()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
