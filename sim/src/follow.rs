//! Followers (`capstan inbox --follow`) in the simulation: every node
//! follows guest 0's inbox from its start, as a person's console would, and
//! after quiescing each follower still running must have shown every
//! acknowledged message to guest 0 that was not dismissed, once.
//!
//! A follower learns of messages pushed over the member links (which drop,
//! delay, duplicate and reorder here) and by looking in the store now and
//! then; numbers commit out of order (store delays, retries, a sender killed
//! after reserving its number leaves a hole). A follower whose stream ends
//! (its node lost its lease and restarted the inbox's actor) is not
//! checked: a console then says so and the person follows again, from the
//! first message, as the simulation does at its node's next step
//! ([`FollowLog::ended`]); the one that follows again is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use capstan_actors::{AgentHandle, MessageBodyView};

use crate::handler::lock;

/// What one follower showed.
#[derive(Default)]
pub(crate) struct FollowLog {
    /// The workload's texts (`k…`) shown.
    shown: BTreeSet<String>,
    /// Texts shown more than once.
    twice: Vec<String>,
    /// Why the stream ended, if it did.
    ended: Option<String>,
}

impl FollowLog {
    /// Whether the stream ended (the follower is not checked).
    pub(crate) fn ended(&self) -> bool {
        self.ended.is_some()
    }
}

/// Follows `guest`'s inbox from its first message, noting what is shown;
/// the caller keeps the task with the node's (aborted when it is killed).
pub(crate) fn follow(guest: AgentHandle) -> (Arc<Mutex<FollowLog>>, tokio::task::JoinHandle<()>) {
    let log = Arc::new(Mutex::new(FollowLog::default()));
    let l = log.clone();
    let task = tokio::spawn(async move {
        let mut rx = match guest.follow(0).await {
            Ok(rx) => rx,
            Err(e) => {
                lock(&l).ended = Some(format!("follow: {e}"));
                return;
            }
        };
        while let Some(m) = rx.recv().await {
            if let MessageBodyView::Package { strings, .. } = &m.body
                && let Some(text) = strings.first()
                && text.starts_with('k')
            {
                let mut l = lock(&l);
                if !l.shown.insert(text.clone()) {
                    l.twice.push(text.clone());
                }
            }
        }
        lock(&l).ended = Some("the stream ended".into());
    });
    (log, task)
}

/// Checks the followers still running (`logs`, by node name) against the
/// sends to guest 0 (`k` → acknowledged) less those dismissed: how many
/// followers were checked, or what one missed.
pub(crate) fn check(
    logs: &[(String, Arc<Mutex<FollowLog>>)],
    sends: &BTreeMap<u64, bool>,
    cleared: &BTreeSet<u64>,
) -> Result<u64, String> {
    let mut checked = 0;
    for (node, log) in logs {
        let l = lock(log);
        if let Some(t) = l.twice.first() {
            return Err(format!("node {node}'s follower showed message {t} twice"));
        }
        if l.ended.is_some() {
            continue;
        }
        checked += 1;
        let missed: Vec<u64> = sends
            .iter()
            .filter(|(k, acked)| **acked && !cleared.contains(k))
            .map(|(k, _)| *k)
            .filter(|k| !l.shown.contains(&format!("k{k}")))
            .collect();
        if !missed.is_empty() {
            return Err(format!(
                "node {node}'s follower of g0 never showed acknowledged messages {missed:?}"
            ));
        }
    }
    Ok(checked)
}
