//! Stopping a running evaluation when what it depends on is cancelled:
//! a watcher reads its dependencies every [`WATCH_DEPS`] (on whichever
//! node cancelled them: the marks are in the store) and trips the run's
//! [`StopFlag`], which the guest's next epoch tick turns into a trap.

use std::sync::Arc;

use capstan_proto::FormulaId;

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::{keys, model};

/// How often a running evaluation looks whether one of its dependencies
/// was cancelled.
const WATCH_DEPS: std::time::Duration = std::time::Duration::from_millis(200);

/// How often a capability call that waits (an http request) looks whether
/// the run must stop.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Why a running evaluation must stop, once it must.
#[derive(Default)]
pub(crate) struct StopFlag {
    set: std::sync::atomic::AtomicBool,
    why: std::sync::Mutex<Option<String>>,
}

impl StopFlag {
    pub(super) fn stop(&self, why: String) {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.set.store(true, std::sync::atomic::Ordering::Release);
    }

    pub(super) fn is_set(&self) -> bool {
        self.set.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the run must stop; why.
    pub(super) async fn stopped(&self) -> String {
        loop {
            if let Some(why) = self.why() {
                return why;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    /// At an epoch tick of the run: a trap once it must stop.
    pub(super) fn tick(&self) -> wasmtime::Result<()> {
        if self.is_set() {
            Err(wasmtime::Trap::Interrupt.into())
        } else {
            Ok(())
        }
    }

    pub(super) fn why(&self) -> Option<String> {
        if !self.is_set() {
            return None;
        }
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Trips `stop` once one of `deps` (the formulas a run's slots hold, and
/// its evaluator) is cancelled or gone; runs until aborted.
pub(super) async fn watch_deps(
    host: AgentHandle,
    deps: Vec<(FormulaId, String)>,
    stop: Arc<StopFlag>,
) {
    // A cancel from now on counts (and one a second before the run
    // started: it raced the run's reads of its slots).
    let since = crate::clock::now_ms().saturating_sub(1000);
    let deps = Arc::new(deps);
    loop {
        tokio::time::sleep(WATCH_DEPS).await;
        let d = deps.clone();
        let found = host
            .inner()
            .db
            .read(move |tx| {
                let d = d.clone();
                Box::pin(async move {
                    for (id, path) in d.iter() {
                        if let Some(v) = tx.get(&keys::cancel_event(id)).await?
                            && let Some((at, why)) = keys::decode_cancel_event(&v)
                            && at >= since
                        {
                            return Ok(Some(format!(
                                "{path} was cancelled ({why}): the evaluation depending on it was stopped"
                            )));
                        }
                        match model::get_formula(tx, id).await? {
                            None => {
                                return Ok::<_, Error>(Some(format!(
                                    "{path} no longer exists (collected as garbage): the evaluation was stopped"
                                )));
                            }
                            Some(f) => {
                                if let Some(c) = &f.cancelled {
                                    return Ok(Some(
                                        crate::records::cancelled_error(
                                            path,
                                            c,
                                            ": the evaluation depending on it was stopped",
                                        )
                                        .to_string(),
                                    ));
                                }
                            }
                        }
                    }
                    Ok(None)
                })
            })
            .await;
        match found {
            Ok(Some(why)) => {
                stop.stop(why);
                return;
            }
            Ok(None) => {}
            // The store is unavailable for now: look again later.
            Err(e) => tracing::debug!("eval: cannot check the dependencies: {e}"),
        }
    }
}

impl super::EvalState {
    /// `block` for a capability call that may wait long: it ends early
    /// with an error when the run must stop.
    pub(super) fn block_stoppable<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        let stop = self.stop.clone();
        self.gh.tokio.block_on(async move {
            tokio::select! {
                r = f => r,
                why = stop.stopped() => Err(why),
            }
        })
    }
}
