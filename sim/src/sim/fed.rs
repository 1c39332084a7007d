//! The federated part of a run: the far cluster (its setup, its nodes), the
//! workload's federated operations, waiting for both outboxes to drain,
//! and the federation invariants against both stores.

use super::*;

/// What one inbox holds, as the federation checks read it.
#[derive(Debug, Default)]
struct InboxView {
    /// Workload messages `f{k}` / requests `q{k}` → their numbers here, and
    /// for requests the promise.
    mail: BTreeMap<u64, Vec<(u64, Option<FormulaId>)>>,
    /// Bounce notices, by the peer they came from.
    bounces: BTreeMap<FormulaId, u64>,
}

/// `f12` or `q12` → 12.
fn fed_k(text: &str) -> Option<u64> {
    text.strip_prefix('f')
        .or_else(|| text.strip_prefix('q'))?
        .parse()
        .ok()
}

async fn read_inbox(db: &Db, who: FormulaId) -> Result<InboxView, capstan_actors::Error> {
    db.read(move |tx| {
        Box::pin(async move {
            let p = capstan_actors::keys::inbox(&who);
            let rows = tx
                .snapshot_range(&RangeOption::new(
                    p.clone(),
                    capstan_cluster::tuple::prefix_end(&p),
                ))
                .await?;
            let mut v = InboxView::default();
            for (_, b) in rows {
                let Ok(m) = MessageRec::decode(&b) else {
                    continue;
                };
                match &m.body {
                    BodyRec::Package { strings, .. } => {
                        let s = strings.first().map(String::as_str).unwrap_or("");
                        if s.starts_with("[undeliverable]") {
                            *v.bounces.entry(m.from).or_default() += 1;
                        } else if let Some(k) = fed_k(s) {
                            v.mail.entry(k).or_default().push((m.number, None));
                        }
                    }
                    BodyRec::Request {
                        description,
                        promise,
                    } => {
                        if let Some(k) = fed_k(description) {
                            v.mail
                                .entry(k)
                                .or_default()
                                .push((m.number, Some(*promise)));
                        }
                    }
                }
            }
            Ok(v)
        })
    })
    .await
}

async fn promise_state(db: &Db, p: FormulaId) -> Result<PromiseState, capstan_actors::Error> {
    let f = db
        .read(move |tx| Box::pin(async move { capstan_actors::model::must_formula(tx, &p).await }))
        .await?;
    match f.kind {
        FormulaKind::Promise(p) => Ok(p.state),
        other => Err(capstan_actors::Error::Corrupt(format!(
            "not a promise: {}",
            other.type_name()
        ))),
    }
}

/// A hash of every key and value of a store.
async fn contents(mem: &Arc<MemStore>) -> Result<[u8; 32], capstan_actors::Error> {
    Db::new(mem.clone())
        .read(|tx| {
            Box::pin(async move {
                let rows = tx
                    .snapshot_range(&RangeOption::new(vec![], vec![0xff; 4]))
                    .await?;
                let mut h = blake3::Hasher::new();
                let members = capstan_cluster::tuple::TupleKey::new()
                    .str("cl")
                    .str("m")
                    .into_vec();
                for (k, mut v) in rows {
                    // A member record names the process (its pid): not the run's.
                    if k.starts_with(&members)
                        && let Ok(mut j) = serde_json::from_slice::<serde_json::Value>(&v)
                        && let Some(o) = j.as_object_mut()
                    {
                        o.remove("pid");
                        v = serde_json::to_vec(&j).unwrap_or_default();
                    }
                    h.update(&(k.len() as u64).to_be_bytes());
                    h.update(&k);
                    h.update(&(v.len() as u64).to_be_bytes());
                    h.update(&v);
                }
                Ok(*h.finalize().as_bytes())
            })
        })
        .await
}

impl World {
    /// The far cluster's store and formulas, linked with the near host by
    /// two invitations, as `capstan invite` / `capstan accept` do: the near
    /// root host knows the far root host as "far" and a far host "doomed"
    /// (which the workload cancels) as "doomed".
    pub(super) async fn setup_far(&mut self, near: &Runtime) -> Result<(), String> {
        let seed = self.cfg.seed;
        let faults = store_faults(seed ^ 0xfa5, &mut self.rng, self.cfg.calm);
        let mem = Arc::new(MemStore::with_faults(faults));
        let far = Runtime::open(Db::new(mem.clone()), RuntimeOptions::default())
            .await
            .map_err(|e| format!("open far: {e}"))?;
        let far_root = far.root_host();
        far_root
            .mkhost(RequestId(self.rng.bytes16()), "doomed")
            .await
            .map_err(|e| format!("mkhost: {e}"))?;
        let doomed = far_root
            .agent("doomed")
            .await
            .map_err(|e| format!("doomed: {e}"))?;
        let peer_far = self.link(near, &far_root, "far").await?;
        let peer_doomed = self.link(near, &doomed, "doomed").await?;
        if !self.cfg.cancel_midrun {
            // Every message to it bounces.
            far_root
                .cancel(RequestId(self.rng.bytes16()), "doomed")
                .await
                .map_err(|e| format!("cancel doomed: {e}"))?;
        }
        // Its model checks, at every commit, the two hosts' inboxes (mail
        // present once, no slot written twice).
        let model = Arc::new(Mutex::new(Model::new(&[far_root.id(), doomed.id()])));
        self.far = Some(Far {
            mem,
            model,
            dir: Arc::new(Directory::default()),
            nodes: Vec::new(),
            host: far_root.id(),
            doomed: doomed.id(),
            doomed_cancelled: !self.cfg.cancel_midrun,
            peer_far,
            peer_doomed,
        });
        far.shutdown().await;
        let far = self.far.as_ref().expect("just set");
        self.fed = Some(Arc::new(Fed {
            near: self.dir.clone(),
            far: far.dir.clone(),
            rng: Mutex::new(self.rng.fork()),
            faults: LinkFaults {
                drop_pct: 10,
                dup_pct: 10,
                delay_pct: 40,
                max_delay: Duration::from_millis(200),
            },
            answer_loss_pct: 10,
            faulty_dedup: self.cfg.faulty_far_dedup,
            stats: Mutex::new(Default::default()),
        }));
        Ok(())
    }

    /// The near root host invites `acceptor` (a far host) under `name`;
    /// the invitation is redeemed as the nodes do it. Returns the near
    /// host's remote formula for the acceptor.
    async fn link(
        &mut self,
        near: &Runtime,
        acceptor: &AgentHandle,
        name: &str,
    ) -> Result<FormulaId, String> {
        let swiss = near
            .root_host()
            .invite(RequestId(self.rng.bytes16()), name)
            .await
            .map_err(|e| format!("invite: {e}"))?;
        let hash = capstan_actors::remote::swiss_hash(&swiss);
        let inv = near
            .locator_record(hash)
            .await
            .map_err(|e| format!("locator: {e}"))?
            .ok_or("the invitation's locator is missing")?
            .target;
        let req = RequestId(self.rng.bytes16());
        let step = acceptor
            .begin_accept(req, "near", NEAR, swiss)
            .await
            .map_err(|e| format!("begin_accept: {e}"))?;
        let AcceptStep::Redeem {
            placeholder,
            req: redeem,
            handle,
        } = step
        else {
            return Err("begin_accept: already done".into());
        };
        let handle = RemoteRec {
            cluster: FAR,
            swiss: handle,
            addrs: vec!["sim-cluster-b2".into()],
        };
        let caller = Caller {
            cluster: FAR,
            own: NEAR,
        };
        let back = near
            .accept_invitation(inv, hash, caller, redeem, handle)
            .await
            .map_err(|e| format!("accept_invitation: {e}"))?;
        let inviter = RemoteRec {
            cluster: NEAR,
            swiss: back,
            addrs: vec!["sim-cluster-a1".into()],
        };
        acceptor
            .finish_accept(req, placeholder, inviter)
            .await
            .map_err(|e| format!("finish_accept: {e}"))?;
        Ok(inv)
    }

    /// Starts (or restarts) far node `j`.
    pub(super) async fn start_far(&mut self, j: usize) -> Result<(), String> {
        let far = self.far.as_mut().ok_or("no far cluster")?;
        let fed = self.fed.clone().ok_or("no federation")?;
        if far.nodes.len() <= j {
            far.nodes.push(Node {
                name: format!("m{j}"),
                node_id: format!("sim-far-node-{j}"),
                gate: Gate::new(),
                runtime: None,
                guests: Vec::new(),
                tasks: Vec::new(),
                follower: None,
                fills: None,
                drained: false,
            });
        }
        let gate = Gate::new();
        let store = NodeStore {
            inner: far.mem.clone(),
            gate: gate.clone(),
            model: far.model.clone(),
            node: far.nodes[j].name.clone(),
            fills: None,
        };
        let cfg = ClusterConfig {
            name: far.nodes[j].name.clone(),
            node_id: far.nodes[j].node_id.clone(),
            addr: format!("simfar:{j}"),
            lease: self.cfg.lease,
        };
        let opened = async {
            let rt = Runtime::open(Db::new(Arc::new(store)), RuntimeOptions::default()).await?;
            let links = rt.join_cluster(cfg).await?;
            Ok::<_, capstan_actors::Error>((rt, links))
        };
        let (rt, links) = tokio::time::timeout(Duration::from_secs(60), opened)
            .await
            .map_err(|_| format!("far node {j} did not start within 60 s"))?
            .map_err(|e| format!("far node {j} did not start: {e}"))?;
        let node = &mut far.nodes[j];
        node.gate = gate;
        node.runtime = Some(rt.clone());
        far.dir.set(&node.name, Some(rt.clone()));
        node.tasks.push(
            tokio::spawn(serve_links(
                node.name.clone(),
                links,
                far.dir.clone(),
                self.link_rng.clone(),
                self.link_faults,
            ))
            .abort_handle(),
        );
        node.tasks
            .push(tokio::spawn(serve_outbox(fed, FAR, rt)).abort_handle());
        Ok(())
    }

    fn kill_far(&mut self, j: usize) {
        let Some(far) = self.far.as_mut() else {
            return;
        };
        let node = &mut far.nodes[j];
        node.gate.kill();
        for t in node.tasks.drain(..) {
            t.abort();
        }
        node.runtime = None;
        far.dir.set(&node.name, None);
    }

    fn far_alive(&self) -> Vec<usize> {
        self.far
            .as_ref()
            .map(|f| {
                (0..f.nodes.len())
                    .filter(|j| f.nodes[*j].runtime.is_some())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One federated operation of the workload.
    pub(super) async fn fed_step(&mut self, step: u64) {
        let alive = self.alive();
        let i = alive[self.rng.below(alive.len() as u64) as usize];
        let roll = self.rng.below(100);
        let req = self.rng.bytes16();
        let far_alive = self.far_alive();
        let j = far_alive[self.rng.below(far_alive.len() as u64) as usize];
        let rt = self.nodes[i].runtime.clone().expect("alive");
        match roll {
            0..55 => {
                let k = self.next_k;
                self.next_k += 1;
                let doomed = roll >= 40;
                let to = if doomed { "doomed" } else { "far" };
                let ask = roll.is_multiple_of(3);
                let what = if ask { "asks" } else { "sends" };
                self.note(format!("{step}: n{i} {what} {to} f/q{k}"));
                let h = self.history.clone();
                hist(&h).fed_sends.insert(k, (doomed, false));
                self.call(i, async move {
                    let host = rt.root_host();
                    let r = if ask {
                        host.request(RequestId(req), to, &format!("q{k}"), None)
                            .await
                            .map(drop)
                    } else {
                        host.send(RequestId(req), to, vec![format!("f{k}")], vec![], None)
                            .await
                            .map(drop)
                    };
                    if r.is_ok() {
                        hist(&h).fed_sends.insert(k, (doomed, true));
                    }
                });
            }
            55..75 => {
                // The far side answers a request, sometimes twice at once.
                let doomed = roll >= 70;
                let (mem, who) = {
                    let far = self.far.as_ref().expect("federated");
                    (far.mem.clone(), if doomed { far.doomed } else { far.host })
                };
                let Ok(view) = read_inbox(&Db::new(mem), who).await else {
                    return self.pass_time().await;
                };
                let asked: Vec<u64> = view
                    .mail
                    .values()
                    .flatten()
                    .filter(|(_, p)| p.is_some())
                    .map(|(n, _)| *n)
                    .collect();
                if asked.is_empty() {
                    return self.pass_time().await;
                }
                let n = asked[self.rng.below(asked.len() as u64) as usize];
                let mut answerers = vec![j];
                if self.rng.percent(30) {
                    answerers.extend(far_alive.iter().filter(|x| **x != j));
                }
                for (c, j) in answerers.into_iter().enumerate() {
                    let req = if c == 0 { req } else { self.rng.bytes16() };
                    self.note(format!(
                        "{step}: m{j} answers request {n} (doomed: {doomed})"
                    ));
                    let far = self.far.as_mut().expect("federated");
                    let Some(rt) = far.nodes[j].runtime.clone() else {
                        continue;
                    };
                    let h = self.history.clone();
                    let handle = async move {
                        let host = rt.root_host();
                        if doomed {
                            host.agent("doomed").await
                        } else {
                            Ok(host)
                        }
                    };
                    let t = tokio::spawn(async move {
                        let Ok(a) = handle.await else {
                            return;
                        };
                        if a.reject(RequestId(req), n, "sim: the far side says no")
                            .await
                            .is_ok()
                        {
                            hist(&h)
                                .far_answers
                                .entry((doomed, n))
                                .or_default()
                                .insert(req);
                        }
                    });
                    far.nodes[j].tasks.push(t.abort_handle());
                    self.calls.push(t);
                }
            }
            75..78 => {
                let far = self.far.as_mut().expect("federated");
                if far.doomed_cancelled {
                    return self.pass_time().await;
                }
                let Some(rt) = far.nodes[j].runtime.clone() else {
                    return self.pass_time().await;
                };
                far.doomed_cancelled = true;
                self.note(format!("{step}: m{j} cancels the doomed host"));
                let t = tokio::spawn(async move {
                    // Retried until it went through (a store fault may fail it).
                    for _ in 0..20 {
                        if rt
                            .root_host()
                            .cancel(RequestId(req), "doomed")
                            .await
                            .is_ok()
                        {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
                let far = self.far.as_mut().expect("federated");
                far.nodes[j].tasks.push(t.abort_handle());
                self.calls.push(t);
            }
            78..86 if far_alive.len() > 1 => {
                self.note(format!("{step}: kill m{j}"));
                hist(&self.history).far_kills += 1;
                self.kill_far(j);
            }
            86..95 => {
                let dead = self
                    .far
                    .as_ref()
                    .and_then(|f| (0..f.nodes.len()).find(|j| f.nodes[*j].runtime.is_none()));
                if let Some(d) = dead {
                    self.note(format!("{step}: restart m{d}"));
                    if let Err(e) = self.start_far(d).await {
                        tracing::debug!("far restart failed: {e}");
                        self.kill_far(d);
                    }
                }
            }
            _ => {}
        }
        self.pass_time().await
    }

    /// Before quiescing: every far node runs again.
    pub(super) async fn revive_far(&mut self) -> Result<(), SimError> {
        let dead: Vec<usize> = self
            .far
            .as_ref()
            .map(|f| {
                (0..f.nodes.len())
                    .filter(|j| f.nodes[*j].runtime.is_none())
                    .collect()
            })
            .unwrap_or_default();
        for d in dead {
            self.note(format!("quiesce: restart m{d}"));
            self.start_far(d).await.map_err(|what| SimError::Stuck {
                seed: self.cfg.seed,
                what,
            })?;
        }
        Ok(())
    }

    /// Whether both outboxes are empty (true without a far cluster).
    pub(super) async fn outboxes_empty(&self) -> bool {
        let Some(far) = &self.far else {
            return true;
        };
        for mem in [&self.mem, &far.mem] {
            let empty = Db::new(mem.clone())
                .read(|tx| {
                    Box::pin(async move {
                        let p = capstan_actors::keys::outbox_all();
                        let rows = tx.get_prefix(&p, 1, false).await?;
                        Ok::<_, capstan_actors::Error>(rows.is_empty())
                    })
                })
                .await;
            if !matches!(empty, Ok(true)) {
                return false;
            }
        }
        true
    }

    /// The federation invariants, against both stores after quiescing.
    pub(super) async fn fed_check(&mut self) -> Result<(), String> {
        let near_db = Db::new(self.mem.clone());
        self.contents = contents(&self.mem).await.map_err(|e| e.to_string())?;
        let Some(far) = &self.far else {
            return Ok(());
        };
        let far_db = Db::new(far.mem.clone());
        let far_contents = contents(&far.mem).await.map_err(|e| e.to_string())?;
        let mut h = blake3::Hasher::new();
        h.update(&self.contents);
        h.update(&far_contents);
        self.contents = *h.finalize().as_bytes();
        let read = |e: capstan_actors::Error| format!("final read: {e}");
        let near = read_inbox(&near_db, self.near_host).await.map_err(read)?;
        let at_far = read_inbox(&far_db, far.host).await.map_err(read)?;
        let at_doomed = read_inbox(&far_db, far.doomed).await.map_err(read)?;
        let (sends, answers) = {
            let h = hist(&self.history);
            (h.fed_sends.clone(), h.far_answers.clone())
        };
        // Delivered at most once, and to the host it was sent to.
        for (doomed, view) in [(false, &at_far), (true, &at_doomed)] {
            for (k, at) in &view.mail {
                if at.len() > 1 {
                    return Err(format!(
                        "federated message f/q{k} delivered {} times (numbers {:?})",
                        at.len(),
                        at.iter().map(|x| x.0).collect::<Vec<_>>()
                    ));
                }
                match sends.get(k) {
                    Some((d, _)) if *d == doomed => {}
                    other => {
                        return Err(format!(
                            "federated message f/q{k} landed at the {} host, but was sent as {other:?}",
                            if doomed { "doomed" } else { "far" }
                        ));
                    }
                }
            }
        }
        // Every acknowledged send is on the far side, or bounced back; none
        // both (by count: bounce notices do not name the message).
        for (doomed, view, peer) in [
            (false, &at_far, far.peer_far),
            (true, &at_doomed, far.peer_doomed),
        ] {
            let tried: Vec<(u64, bool)> = sends
                .iter()
                .filter(|(_, (d, _))| *d == doomed)
                .map(|(k, (_, acked))| (*k, *acked))
                .collect();
            let lost: Vec<u64> = tried
                .iter()
                .filter(|(k, acked)| *acked && !view.mail.contains_key(k))
                .map(|(k, _)| *k)
                .collect();
            let bounced = near.bounces.get(&peer).copied().unwrap_or(0);
            let delivered = view.mail.len() as u64;
            if lost.len() as u64 > bounced {
                return Err(format!(
                    "acknowledged federated messages lost: {lost:?} are not at the {} host and only {bounced} bounce notices came back",
                    if doomed { "doomed" } else { "far" }
                ));
            }
            if delivered + bounced > tried.len() as u64 {
                return Err(format!(
                    "{} federated messages sent to the {} host, but {delivered} delivered and {bounced} bounced: delivered and bounced, or bounced twice",
                    tried.len(),
                    if doomed { "doomed" } else { "far" }
                ));
            }
            if !doomed && bounced > 0 {
                return Err(format!(
                    "{bounced} messages to the far host bounced, which never refuses"
                ));
            }
        }
        // A request across clusters: settled at most once, and the
        // settlement reaches the requester once.
        for (n, by) in &answers {
            if by.len() > 1 {
                return Err(format!(
                    "far request {n:?} settled by {} different calls",
                    by.len()
                ));
            }
        }
        for view in [&at_far, &at_doomed] {
            if !view.bounces.is_empty() {
                return Err(format!(
                    "answers of the far side bounced (settled twice, or refused): {:?}",
                    view.bounces
                ));
            }
        }
        // A request that was not delivered (it bounced) is rejected at the
        // requester: nobody waits on it forever.
        for (k, (doomed, _)) in &sends {
            let view = if *doomed { &at_doomed } else { &at_far };
            let Some(p) = near.mail.get(k).and_then(|v| v.iter().find_map(|x| x.1)) else {
                continue;
            };
            if !view.mail.contains_key(k)
                && promise_state(&near_db, p).await.map_err(read)? == PromiseState::Pending
            {
                self.stranded += 1;
            }
        }
        if self.stranded > 0 {
            return Err(format!(
                "{} requests across clusters bounced and their promises are still pending: their requesters would wait forever",
                self.stranded
            ));
        }
        for (doomed, view) in [(false, &at_far), (true, &at_doomed)] {
            for (k, at) in &view.mail {
                let Some(far_promise) = at[0].1 else {
                    continue;
                };
                let far_state = promise_state(&far_db, far_promise).await.map_err(read)?;
                let near_promise = near
                    .mail
                    .get(k)
                    .and_then(|v| v.iter().find_map(|x| x.1))
                    .ok_or(format!(
                        "request q{k} delivered but the requester has no copy"
                    ))?;
                let near_state = promise_state(&near_db, near_promise).await.map_err(read)?;
                let settled = |s: &PromiseState| *s != PromiseState::Pending;
                if settled(&far_state) != settled(&near_state) {
                    return Err(format!(
                        "request q{k} to the {} host: settled there as {far_state:?}, at the requester as {near_state:?}",
                        if doomed { "doomed" } else { "far" }
                    ));
                }
            }
        }
        Ok(())
    }
}
