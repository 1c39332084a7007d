//! An operator's steps: drains, and changes of the placement policy.
//!
//! Drains, as an operator runs them: `capstan cluster drain NODE` on
//! another node marks the node draining in the store; the node sees the
//! mark at its next lease renewal, stops its incarnations and gives up its
//! placements (`capstan_actors::cluster::release_placements`), and the
//! other nodes take its guests (under `spread`, each goes to the member
//! that wins it). A drained node comes back when it is restarted (a fresh
//! start clears the mark), and wins back its guests under `spread`.

use super::*;

impl World {
    /// Drains node `i` through another live node, if a node that is not
    /// drained would still be live besides it.
    pub(super) fn drain(&mut self, step: u64, i: usize, alive: &[usize]) {
        let serving = alive.iter().filter(|j| !self.nodes[**j].drained).count();
        let Some(&via) = alive.iter().find(|j| **j != i) else {
            return;
        };
        if self.nodes[i].drained || serving < 2 {
            return;
        }
        let Some(rt) = self.nodes[via].runtime.clone() else {
            return;
        };
        self.note(format!("{step}: n{via} drains n{i}"));
        hist(&self.history).drains += 1;
        self.nodes[i].drained = true;
        let name = self.nodes[i].name.clone();
        self.call(via, async move {
            let r = capstan_actors::cluster::set_draining(rt.db(), &name).await;
            if let Err(e) = r {
                tracing::debug!("drain of {name} failed: {e}");
            }
        });
    }

    /// Changes the cluster's placement policy through node `i` (`capstan
    /// cluster policy --placement local|spread`): to `spread`, the nodes
    /// hand over what other members win; to `local`, nothing moves.
    pub(super) fn flip_policy(&mut self, step: u64, i: usize) {
        let Some(rt) = self.nodes[i].runtime.clone() else {
            return;
        };
        self.spread_now = !self.spread_now;
        let placement = if self.spread_now {
            capstan_actors::rules::placement::Policy::Spread
        } else {
            capstan_actors::rules::placement::Policy::Local
        };
        self.note(format!(
            "{step}: n{i} sets the placement policy {}",
            placement.name()
        ));
        hist(&self.history).policy_changes += 1;
        self.call(i, async move {
            let rec = capstan_actors::cluster::SettingsRec { placement };
            if let Err(e) = capstan_actors::cluster::set_settings(rt.db(), rec).await {
                tracing::debug!("policy change failed: {e}");
            }
        });
    }

    /// Brings drained node `d` back: stops it (as `kill -9` does) and starts
    /// it again on its home, which clears its drain mark.
    pub(super) async fn bring_back(&mut self, step: u64, d: usize) {
        self.note(format!("{step}: bring back n{d}"));
        hist(&self.history).restarts += 1;
        self.kill(d);
        self.nodes[d].drained = false;
        if let Err(e) = self.start(d).await {
            tracing::debug!("restart failed: {e}");
            self.kill(d);
        }
    }

    /// Brings back every live node that the store says is drained. Before
    /// quiescing: a cluster whose live nodes are all drained serves
    /// nothing until one is back. The store, not [`Node::drained`], says
    /// which: a drain's commit can land late, on the incarnation that
    /// started after the one it was asked of (as an operator's `cluster
    /// drain` racing a restart does).
    pub(super) async fn bring_back_drained(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let db = Db::new(self.mem.clone());
        let marked = db
            .read(move |tx| {
                let names = names.clone();
                Box::pin(async move {
                    let mut marked = Vec::new();
                    for (i, name) in names.iter().enumerate() {
                        let m = capstan_actors::cluster::get_member(tx, name).await?;
                        if m.is_some_and(|m| m.draining) {
                            marked.push(i);
                        }
                    }
                    Ok::<_, capstan_actors::Error>(marked)
                })
            })
            .await;
        let steps = self.cfg.steps;
        for d in marked.unwrap_or_default() {
            if self.nodes[d].runtime.is_some() {
                self.bring_back(steps, d).await;
            }
        }
    }
}
