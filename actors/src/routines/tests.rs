use super::*;

#[test]
fn every_parses_and_bounds() {
    assert_eq!(
        Schedule::every("30s").unwrap(),
        Schedule::Every { ms: 30_000 }
    );
    assert_eq!(
        Schedule::every("5m").unwrap(),
        Schedule::Every { ms: 300_000 }
    );
    assert_eq!(
        Schedule::every("1h").unwrap(),
        Schedule::Every { ms: 3_600_000 }
    );
    for bad in [
        "0s",
        "",
        "s",
        "10",
        "5x",
        "1.5s",
        "-1s",
        "400d",
        "99999999999999999999s",
    ] {
        assert!(Schedule::every(bad).is_err(), "{bad}");
    }
}

#[test]
fn every_ticks_are_aligned_and_missed_ones_fire_once() {
    let s = Schedule::Every { ms: 1000 };
    assert_eq!(s.next_after(1500), Some(2000));
    assert_eq!(s.next_after(2000), Some(3000));
    assert_eq!(s.latest_due(2000, 2999), None);
    assert_eq!(s.latest_due(2000, 9500), Some(9000));
}

#[test]
fn cron_parses_and_matches() {
    for bad in [
        "* * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "a * * * *",
        "* * 31 2 *",
    ] {
        assert!(Schedule::cron(bad).is_err(), "{bad}");
    }
    let c = Cron::parse("*/15 2 * * *").unwrap();
    // 1970-01-01T00:00 → 02:00, 02:15, …
    assert_eq!(c.next_after(0), Some(2 * 3_600_000));
    assert_eq!(
        c.next_after(2 * 3_600_000),
        Some(2 * 3_600_000 + 15 * 60_000)
    );
    assert_eq!(
        c.next_after(2 * 3_600_000 + 45 * 60_000),
        Some(DAY_MS + 2 * 3_600_000)
    );
    // Mondays at 09:30: 1970-01-05 was a Monday
    let m = Cron::parse("30 9 * * 1").unwrap();
    assert_eq!(
        m.next_after(0),
        Some(4 * DAY_MS + 9 * 3_600_000 + 30 * 60_000)
    );
    // Sunday as 7
    let s = Cron::parse("0 0 * * 7").unwrap();
    assert_eq!(s.next_after(0), Some(3 * DAY_MS));
    let sched = Schedule::Cron {
        expr: "* * * * *".into(),
    };
    assert_eq!(sched.latest_due(0, 10 * 60_000 + 5), Some(10 * 60_000));
    assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc_text(1_764_899_403_000), "2025-12-05T01:50:03Z");
}

async fn host_and_alice() -> (crate::Runtime, AgentHandle) {
    let db = capstan_cluster::open("mem:").await.unwrap();
    let rt = crate::Runtime::open(db, crate::RuntimeOptions::default())
        .await
        .unwrap();
    let host = rt.root_host();
    host.mkhost(RequestId::random(), "alice").await.unwrap();
    (rt, host)
}

/// A tick fired twice (a retry, or an ex-owner and its successor)
/// lands once; the next tick lands again.
#[tokio::test]
async fn a_tick_fired_twice_is_delivered_once() {
    let (rt, host) = host_and_alice().await;
    let r = host
        .routine_add(
            RequestId::random(),
            "beat",
            "alice",
            Schedule::Every { ms: 1000 },
            "ping",
        )
        .await
        .unwrap();
    let inner = rt.inner().clone();
    let tick = r.last_tick_ms + 1000;
    fire(&inner, &r, tick).await.unwrap();
    fire(&inner, &r, tick).await.unwrap();
    let alice = host.agent("alice").await.unwrap();
    assert_eq!(alice.inbox(None).await.unwrap().len(), 1);
    fire(&inner, &r, tick + 1000).await.unwrap();
    assert_eq!(alice.inbox(None).await.unwrap().len(), 2);
    let l = host.routine_list().await.unwrap();
    assert_eq!(l[0].last_tick_ms, tick + 1000);
    // removed: a fire in flight delivers nothing
    host.routine_remove("beat").await.unwrap();
    fire(&inner, &r, tick + 2000).await.unwrap();
    assert_eq!(alice.inbox(None).await.unwrap().len(), 2);
}

/// At most [`MAX_ROUTINES_PER_HOST`] routines per host; the one past it
/// is refused and adds nothing.
#[tokio::test]
async fn a_host_has_at_most_its_bound_of_routines() {
    let (_rt, host) = host_and_alice().await;
    for i in 0..MAX_ROUTINES_PER_HOST {
        host.routine_add(
            RequestId::random(),
            &format!("r{i}"),
            "alice",
            Schedule::Every { ms: 3_600_000 },
            "x",
        )
        .await
        .unwrap();
    }
    let e = host
        .routine_add(
            RequestId::random(),
            "one-more",
            "alice",
            Schedule::Every { ms: 3_600_000 },
            "x",
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the most it may have"), "{e}");
    assert_eq!(
        host.routine_list().await.unwrap().len(),
        MAX_ROUTINES_PER_HOST
    );
}

#[test]
fn fire_requests_differ_per_tick() {
    let id = FormulaId::random();
    assert_eq!(fire_request(&id, 1000), fire_request(&id, 1000));
    assert_ne!(fire_request(&id, 1000), fire_request(&id, 2000));
}
