//! Issue 18: a dependent made while a cancel runs is not missed. A host's
//! guest made between the cancel's first scan and its marks is found by
//! the scan that follows the marks and cancelled; one made after the marks
//! is refused.

use std::sync::{Arc, Mutex};

use capstan_actors::cancel::ScanHook;
use capstan_actors::{Error, Runtime, model};
use capstan_proto::{FormulaId, RequestId};

async fn runtime() -> Runtime {
    Runtime::in_memory().await.expect("runtime")
}

/// The cancel mark's reason of formula `id`, if it is cancelled.
async fn cancelled(rt: &Runtime, id: FormulaId) -> Option<String> {
    rt.db()
        .read(move |tx| Box::pin(async move { model::must_formula(tx, &id).await }))
        .await
        .unwrap()
        .cancelled
        .map(|c| c.reason)
}

/// Cancels host `h`, making guest `late` as `h` when the cancel reaches
/// `round`; what making it answered.
async fn cancel_making_a_guest_at(rt: &Runtime, round: u32) -> Result<FormulaId, Error> {
    let root = rt.root_host();
    root.mkhost(RequestId::random(), "h").await.unwrap();
    let h = root.agent("h").await.unwrap();
    h.mkguest(RequestId::random(), "early").await.unwrap();
    let made: Arc<Mutex<Option<Result<FormulaId, Error>>>> = Arc::new(Mutex::new(None));
    let m2 = made.clone();
    // (A Mutex makes the hook Sync whatever the handle is.)
    let h = Mutex::new(h);
    let hook: ScanHook = Arc::new(move |r| {
        if r == round {
            let h = h.lock().unwrap().clone();
            let got = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(async move { h.mkguest(RequestId::random(), "late").await })
            });
            *m2.lock().unwrap() = Some(got);
        }
    });
    let report = root
        .cancel_observed(RequestId::random(), "h", Some(hook))
        .await
        .expect("cancel");
    let got = made
        .lock()
        .unwrap()
        .take()
        .expect("the cancel reached the round");
    if let Ok(late) = &got {
        assert!(
            report.cancelled.iter().any(|(id, _, _)| id == late),
            "{report:?}"
        );
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_made_before_the_marks_is_cancelled_too() {
    let rt = runtime().await;
    let late = cancel_making_a_guest_at(&rt, 0)
        .await
        .expect("made before h was marked");
    let why = cancelled(&rt, late).await.expect("late is cancelled");
    assert!(why.contains("its dependency h"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_made_after_the_marks_is_refused() {
    let rt = runtime().await;
    let e = cancel_making_a_guest_at(&rt, 1).await.unwrap_err();
    assert!(matches!(e, Error::Cancelled(_)), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
}
