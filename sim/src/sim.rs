//! One run: the world (nodes on one store), the workload drawn from the
//! seed, a check after every step, quiescing, and the final check against
//! the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_actors::cluster::ClusterConfig;
use capstan_actors::records::{BodyRec, FormulaKind, MessageRec};
use capstan_actors::{
    AcceptStep, AgentHandle, Caller, PromiseState, RemoteRec, Runtime, RuntimeOptions,
};
use capstan_cluster::mem_store::{Faults, MemStore};
use capstan_cluster::{Db, RangeOption};
use capstan_proto::{FormulaId, RequestId};
use tokio::task::AbortHandle;

use crate::check::{Model, keys, workload_id};
use crate::federation::{FAR, Fed, NEAR, serve_outbox};
use crate::handler::{GuestSlot, lock, serve_guest};
use crate::links::{Directory, LinkFaults, serve_links};
use crate::rng::Rng;
use crate::store::{Gate, GateState, NodeStore};
use crate::{Config, Report, SimError};

mod drain;
mod fed;

/// One node of the world.
struct Node {
    name: String,
    node_id: String,
    gate: Arc<Gate>,
    runtime: Option<Runtime>,
    /// The guests acting as themselves on this node.
    guests: Vec<AgentHandle>,
    /// The node's tasks: links, handlers, and the workload's calls made
    /// through it (aborted when it is killed, as a process is).
    tasks: Vec<AbortHandle>,
    /// What this incarnation's follower of guest 0's inbox showed.
    follower: Option<Arc<Mutex<crate::follow::FollowLog>>>,
    /// This incarnation's store filling numbers in, if the run does.
    fills: Option<Arc<crate::store::Fills>>,
    /// An operator drained this incarnation (see [`drain`]).
    drained: bool,
}

/// What the workload asked and what it was told.
#[derive(Default)]
struct History {
    /// Sends: k → (guest, acknowledged).
    sends: BTreeMap<u64, (usize, bool)>,
    /// Requests acknowledged: k → (guest, promise).
    requests: BTreeMap<u64, (usize, FormulaId)>,
    /// Messages dismissed (their k).
    dismissed: BTreeSet<u64>,
    kills: u64,
    restarts: u64,
    drains: u64,
    policy_changes: u64,
    pauses: u64,
    /// Federated sends and requests: k → (to the doomed host, acknowledged).
    fed_sends: BTreeMap<u64, (bool, bool)>,
    /// The far host's requests answered: number → the calls that did.
    far_answers: BTreeMap<(bool, u64), BTreeSet<[u8; 16]>>,
    far_kills: u64,
}

/// The far cluster: its store, its nodes, and the formulas that link it
/// with the near one.
struct Far {
    mem: Arc<MemStore>,
    /// The far nodes' commit observer: the far hosts' inboxes, as guests'.
    model: Arc<Mutex<Model>>,
    dir: Arc<Directory>,
    nodes: Vec<Node>,
    /// The far root host, and a host of it that is cancelled during the run.
    host: FormulaId,
    doomed: FormulaId,
    doomed_cancelled: bool,
    /// The near host's remote formulas for the two ("far", "doomed").
    peer_far: FormulaId,
    peer_doomed: FormulaId,
}

struct World {
    cfg: Config,
    rng: Rng,
    mem: Arc<MemStore>,
    model: Arc<Mutex<Model>>,
    dir: Arc<Directory>,
    link_rng: Arc<Mutex<Rng>>,
    link_faults: LinkFaults,
    nodes: Vec<Node>,
    guest_ids: Vec<FormulaId>,
    history: Arc<Mutex<History>>,
    calls: Vec<tokio::task::JoinHandle<()>>,
    next_k: u64,
    log: blake3::Hasher,
    near_host: FormulaId,
    far: Option<Far>,
    fed: Option<Arc<Fed>>,
    /// A hash of the stores' contents at the end.
    contents: [u8; 32],
    /// Requests across that bounced, their promise still pending at the end.
    stranded: u64,
    /// Followers of guest 0's inbox checked at the end.
    followers_checked: u64,
    /// Placements handed over by nodes since killed (see [`Report::handed_over`]).
    handed_over_before: u64,
    /// Every incarnation's store that filled numbers in (for the report).
    all_fills: Vec<Arc<crate::store::Fills>>,
    /// The placement policy last set: `spread` (see [`drain`]).
    spread_now: bool,
}

fn guest_name(g: usize) -> String {
    format!("g{g}")
}

fn hist(h: &Arc<Mutex<History>>) -> std::sync::MutexGuard<'_, History> {
    lock(h)
}

/// Store faults drawn from the seed: calm, moderate or heavy.
fn store_faults(seed: u64, rng: &mut Rng, calm: bool) -> Faults {
    let level = rng.below(3) as u32;
    if calm {
        return Faults {
            read_delay_ppm: 100_000,
            commit_delay_ppm: 200_000,
            max_delay: Duration::from_millis(15),
            ..Faults::seeded(seed ^ 0x5eed)
        };
    }
    Faults {
        conflict_ppm: 10_000 * level,
        maybe_committed_ppm: 5_000 * level,
        read_delay_ppm: 50_000 + 50_000 * level,
        commit_delay_ppm: 100_000 + 100_000 * level,
        max_delay: Duration::from_millis(5 + 10 * u64::from(level)),
        ..Faults::seeded(seed ^ 0x5eed)
    }
}

/// The inbox hint's interval here: inboxes of tens of messages, so that
/// each take-over of an inbox searches from a hint (a node: every 1,024).
const SIM_HINT_EVERY: u64 = 4;

pub(crate) async fn run(cfg: Config) -> Result<Report, SimError> {
    crate::clock::start_run();
    // Every id the runtime draws on this thread comes from the seed.
    let _ids = capstan_proto::id::seed_thread(cfg.seed ^ 0x1d5_5eed);
    // And the store's retry jitter.
    let _jitter = capstan_cluster::store::seed_thread_jitter(cfg.seed ^ 0x0071_77e5);
    // (the same in every run of this process: runs replay exactly)
    capstan_actors::model::set_inbox_hint_every(SIM_HINT_EVERY);
    let r = run_inner(cfg).await;
    crate::clock::end_run();
    r
}

async fn run_inner(cfg: Config) -> Result<Report, SimError> {
    let seed = cfg.seed;
    let mut rng = Rng::new(seed);
    let faults = store_faults(seed, &mut rng, cfg.calm);
    let link_rng = Arc::new(Mutex::new(rng.fork()));
    let mut w = World {
        cfg: cfg.clone(),
        link_faults: LinkFaults {
            drop_pct: if cfg.calm { 0 } else { 5 },
            dup_pct: if cfg.calm { 0 } else { 5 },
            delay_pct: 30,
            max_delay: Duration::from_millis(50),
        },
        rng,
        mem: Arc::new(MemStore::with_faults(faults)),
        model: Arc::new(Mutex::new(Model::default())),
        dir: Arc::new(Directory::default()),
        link_rng,
        nodes: Vec::new(),
        guest_ids: Vec::new(),
        history: Arc::new(Mutex::new(History::default())),
        calls: Vec::new(),
        next_k: 0,
        log: blake3::Hasher::new(),
        near_host: FormulaId([0; 32]),
        far: None,
        fed: None,
        contents: [0; 32],
        stranded: 0,
        followers_checked: 0,
        handed_over_before: 0,
        all_fills: Vec::new(),
        spread_now: cfg.spread,
    };
    w.setup().await?;
    for step in 0..cfg.steps {
        w.step(step).await;
        let v = w.violation();
        if let Some(what) = v {
            return Err(SimError::Violation { seed, step, what });
        }
    }
    w.quiesce().await?;
    w.final_check().await?;
    Ok(w.report())
}

impl World {
    async fn setup(&mut self) -> Result<(), SimError> {
        let seed = self.cfg.seed;
        let setup = |what: String| SimError::Setup { seed, what };
        // The root and the guests, made through a plain runtime first.
        let db = Db::new(self.mem.clone());
        if self.cfg.spread {
            let spread = capstan_actors::cluster::SettingsRec {
                placement: capstan_actors::rules::placement::Policy::Spread,
            };
            capstan_actors::cluster::set_settings(&db, spread)
                .await
                .map_err(|e| setup(format!("settings: {e}")))?;
        }
        let rt = Runtime::open(db, RuntimeOptions::default())
            .await
            .map_err(|e| setup(format!("open: {e}")))?;
        let root = rt.root_host();
        self.near_host = root.id();
        for g in 0..self.cfg.guests {
            let id = root
                .mkguest(RequestId(self.rng.bytes16()), &guest_name(g))
                .await
                .map_err(|e| setup(format!("mkguest: {e}")))?;
            self.guest_ids.push(id);
        }
        if self.cfg.far_nodes > 0 {
            self.setup_far(&rt).await.map_err(setup)?;
        }
        rt.shutdown().await;
        let ids = format!("guests {:?}", self.guest_ids);
        self.note(ids);
        lock(&self.model).set_guests(&self.guest_ids);
        for i in 0..self.cfg.nodes {
            self.nodes.push(Node {
                name: format!("n{i}"),
                node_id: format!("sim-node-{i}"),
                gate: Gate::new(),
                runtime: None,
                guests: Vec::new(),
                tasks: Vec::new(),
                follower: None,
                fills: None,
                drained: false,
            });
            self.start(i).await.map_err(setup)?;
        }
        for j in 0..self.cfg.far_nodes {
            self.start_far(j).await.map_err(setup)?;
        }
        Ok(())
    }

    /// Starts (or restarts) node `i`: a fresh process on the same home.
    async fn start(&mut self, i: usize) -> Result<(), String> {
        let gate = Gate::new();
        let fills = self
            .cfg
            .fill_numbers
            .then(|| crate::store::Fills::new(self.cfg.fill_refuse_pct, self.rng.fork()));
        if let Some(f) = &fills {
            self.all_fills.push(f.clone());
        }
        let store = NodeStore {
            inner: self.mem.clone(),
            gate: gate.clone(),
            model: self.model.clone(),
            node: self.nodes[i].name.clone(),
            fills: fills.clone(),
        };
        let db = Db::new(Arc::new(store));
        let options = RuntimeOptions {
            fill_numbers: self.cfg.fill_numbers,
            ..RuntimeOptions::default()
        };
        let opened = async {
            let rt = Runtime::open(db.clone(), options).await?;
            let links = rt
                .join_cluster(ClusterConfig {
                    name: self.nodes[i].name.clone(),
                    node_id: self.nodes[i].node_id.clone(),
                    addr: format!("sim:{i}"),
                    lease: self.cfg.lease,
                })
                .await?;
            let mut guests = Vec::new();
            for g in 0..self.cfg.guests {
                guests.push(rt.root_host().agent(&guest_name(g)).await?);
            }
            Ok::<_, capstan_actors::Error>((rt, links, guests))
        };
        let (rt, links, guests) = tokio::time::timeout(Duration::from_secs(60), opened)
            .await
            .map_err(|_| format!("node {i} did not start within 60 s"))?
            .map_err(|e| format!("node {i} did not start: {e}"))?;
        let m = rt
            .membership()
            .ok_or_else(|| "no membership after joining".to_string())?;
        // (as the node's daemon does once it joined: its inboxes' numbers
        // are handed out for the commits its store fills in)
        db.store()
            .set_filler(Some(Arc::new(capstan_actors::InboxFiller(rt.clone()))));
        let node = &mut self.nodes[i];
        node.gate = gate;
        node.fills = fills;
        node.drained = false;
        node.runtime = Some(rt.clone());
        self.dir.set(&node.name, Some(rt.clone()));
        node.tasks.push(
            tokio::spawn(serve_links(
                node.name.clone(),
                links,
                self.dir.clone(),
                self.link_rng.clone(),
                self.link_faults,
            ))
            .abort_handle(),
        );
        if let Some(fed) = &self.fed {
            node.tasks
                .push(tokio::spawn(serve_outbox(fed.clone(), NEAR, rt.clone())).abort_handle());
        }
        for (g, handle) in guests.iter().enumerate() {
            let slot = GuestSlot {
                index: g,
                faulty: self.cfg.faulty_handlers,
                id: self.guest_ids[g],
                handle: handle.clone(),
            };
            node.tasks.push(
                tokio::spawn(serve_guest(db.clone(), m.clone(), slot, self.model.clone()))
                    .abort_handle(),
            );
        }
        if let Some(g0) = guests.first() {
            let (log, follower) = crate::follow::follow(g0.clone());
            node.tasks.push(follower.abort_handle());
            node.follower = Some(log);
        }
        node.guests = guests;
        Ok(())
    }

    /// A node still running whose follower's stream ended (it lost its
    /// lease) follows guest 0 again from the first message, as a person
    /// at a console would: so most runs end with followers to check.
    fn follow_again(&mut self) {
        for node in &mut self.nodes {
            let ended = node
                .follower
                .as_ref()
                .is_some_and(|l| crate::handler::lock(l).ended());
            if node.runtime.is_none() || !ended {
                continue;
            }
            if let Some(g0) = node.guests.first() {
                let (log, follower) = crate::follow::follow(g0.clone());
                node.tasks.push(follower.abort_handle());
                node.follower = Some(log);
            }
        }
    }

    fn kill(&mut self, i: usize) {
        self.handed_over_before += handed_over(&self.nodes[i..=i]);
        let node = &mut self.nodes[i];
        node.gate.kill();
        for t in node.tasks.drain(..) {
            t.abort();
        }
        // (the filler holds the runtime: let it go with the process)
        if let Some(f) = node.fills.take() {
            f.clear();
        }
        node.runtime = None;
        node.follower = None;
        node.guests.clear();
        self.dir.set(&node.name, None);
    }

    /// The first invariant broken at a commit, on either cluster.
    fn violation(&self) -> Option<String> {
        let near = lock(&self.model).violations.first().cloned();
        near.or_else(|| {
            let far = self.far.as_ref()?;
            let v = lock(&far.model).violations.first().cloned()?;
            Some(format!("far cluster: {v}"))
        })
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].runtime.is_some())
            .collect()
    }

    fn note(&mut self, line: String) {
        tracing::debug!("{line}");
        self.log.update(line.as_bytes());
        self.log.update(b"\n");
    }

    /// Spawns a workload call through node `i` (aborted if it is killed).
    fn call<F>(&mut self, i: usize, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = tokio::spawn(f);
        self.nodes[i].tasks.push(h.abort_handle());
        self.calls.push(h);
    }

    async fn step(&mut self, step: u64) {
        self.follow_again();
        if self.far.is_some() && self.rng.percent(35) {
            return self.fed_step(step).await;
        }
        let alive = self.alive();
        let i = alive[self.rng.below(alive.len() as u64) as usize];
        let g = self.rng.below(self.cfg.guests as u64) as usize;
        let roll = self.rng.below(100);
        let req = self.rng.bytes16();
        let rt = self.nodes[i].runtime.clone();
        match (roll, rt) {
            (0..45, Some(rt)) => {
                let k = self.next_k;
                self.next_k += 1;
                self.note(format!("{step}: n{i} sends k{k} to g{g}"));
                let h = self.history.clone();
                hist(&h).sends.insert(k, (g, false));
                self.call(i, async move {
                    let r = rt
                        .root_host()
                        .send(
                            RequestId(req),
                            &guest_name(g),
                            vec![format!("k{k}")],
                            vec![],
                            None,
                        )
                        .await;
                    if r.is_ok() {
                        hist(&h).sends.insert(k, (g, true));
                    }
                });
            }
            (45..60, Some(rt)) => {
                let k = self.next_k;
                self.next_k += 1;
                self.note(format!("{step}: n{i} asks g{g} r{k}"));
                let h = self.history.clone();
                self.call(i, async move {
                    let r = rt
                        .root_host()
                        .request(RequestId(req), &guest_name(g), &format!("r{k}"), None)
                        .await;
                    if let Ok((_, promise)) = r {
                        hist(&h).requests.insert(k, (g, promise));
                    }
                });
            }
            (60..66, Some(_)) => {
                // A second answer racing the handler's.
                let pick = lock(&self.model)
                    .present_numbers(g)
                    .into_iter()
                    .filter(|(_, m)| m.request)
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>();
                if pick.is_empty() {
                    return self.pass_time().await;
                }
                let n = pick[self.rng.below(pick.len() as u64) as usize];
                self.note(format!("{step}: n{i} rejects g{g}'s request {n}"));
                let (guest, model) = (self.nodes[i].guests[g].clone(), self.model.clone());
                self.call(i, async move {
                    if guest.reject(RequestId(req), n, "sim: raced").await.is_ok() {
                        lock(&model).settled(g, n, req);
                    }
                });
            }
            (66..72, Some(_)) => {
                let pick = lock(&self.model).present_numbers(g);
                if pick.is_empty() {
                    return self.pass_time().await;
                }
                let (n, m) = pick[self.rng.below(pick.len() as u64) as usize];
                self.note(format!("{step}: n{i} dismisses g{g}'s message {n}"));
                let (guest, h) = (self.nodes[i].guests[g].clone(), self.history.clone());
                self.call(i, async move {
                    if guest.dismiss(RequestId(req), n).await.is_ok() {
                        hist(&h).dismissed.insert(m.k);
                    }
                });
            }
            (72..75, Some(_)) if alive.len() > 1 && !self.cfg.calm => {
                self.note(format!("{step}: kill n{i}"));
                hist(&self.history).kills += 1;
                self.kill(i);
            }
            (75..80, _) => {
                let dead: Vec<usize> = (0..self.nodes.len())
                    .filter(|i| self.nodes[*i].runtime.is_none())
                    .collect();
                if let Some(&d) = dead.first() {
                    self.note(format!("{step}: restart n{d}"));
                    hist(&self.history).restarts += 1;
                    if let Err(e) = self.start(d).await {
                        tracing::debug!("restart failed: {e}");
                        self.kill(d);
                    }
                } else if let Some(d) = self.nodes.iter().position(|n| n.drained) {
                    self.bring_back(step, d).await;
                }
            }
            (80..83, Some(_)) if !self.cfg.calm => {
                let lease = self.cfg.lease.as_millis() as u64;
                let d = Duration::from_millis(lease / 2 + self.rng.below(lease * 3));
                self.note(format!("{step}: pause n{i} for {d:?}"));
                hist(&self.history).pauses += 1;
                self.nodes[i].gate.pause(tokio::time::Instant::now() + d);
            }
            (83..85, Some(_)) if !self.cfg.calm => self.drain(step, i, &alive),
            (85, Some(_)) if !self.cfg.calm => self.flip_policy(step, i),
            _ => {}
        }
        self.pass_time().await;
    }

    async fn pass_time(&mut self) {
        let ms = 1 + self.rng.below(self.cfg.max_step_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.calls.retain(|h| !h.is_finished());
    }

    /// Stops the workload and the faults of nodes (paused ones resume) and
    /// waits until every call returned and every present message was handled.
    async fn quiesce(&mut self) -> Result<(), SimError> {
        for n in &self.nodes {
            if matches!(n.gate.state(), GateState::Paused(_)) {
                n.gate.resume();
            }
        }
        self.revive_far().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        // With a far cluster: calm (nothing running, both outboxes empty)
        // since then, so that late copies on the links have landed.
        let mut calm_since: Option<tokio::time::Instant> = None;
        loop {
            self.calls.retain(|h| !h.is_finished());
            if let Some(what) = self.violation() {
                return Err(SimError::Violation {
                    seed: self.cfg.seed,
                    step: self.cfg.steps,
                    what: format!("while quiescing: {what}"),
                });
            }
            let (unhandled, marks): (Vec<_>, Vec<u64>) = {
                let m = lock(&self.model);
                (
                    (0..self.cfg.guests)
                        .flat_map(|g| m.unhandled(g).into_iter().map(move |(n, x)| (g, n, x.k)))
                        .collect(),
                    m.marks.clone(),
                )
            };
            let idle = self.calls.is_empty() && unhandled.is_empty() && self.outboxes_empty().await;
            if self.calls.is_empty() && !idle {
                self.bring_back_drained().await;
            }
            if idle {
                let now = tokio::time::Instant::now();
                match calm_since {
                    _ if self.far.is_none() => return Ok(()),
                    Some(t) if now - t >= 2 * crate::federation::CALL_TIMEOUT => return Ok(()),
                    Some(_) => {}
                    None => calm_since = Some(now),
                }
            } else {
                calm_since = None;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SimError::Stuck {
                    seed: self.cfg.seed,
                    what: format!(
                        "{} calls still running; present but never handled (guest, number, k): {unhandled:?}; handled marks {marks:?}; outboxes empty: {}",
                        self.calls.len(),
                        self.outboxes_empty().await
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The invariants against the store itself, after quiescing.
    async fn final_check(&mut self) -> Result<(), SimError> {
        let (seed, steps) = (self.cfg.seed, self.cfg.steps);
        let fail = move |what: String| SimError::Violation {
            seed,
            step: steps,
            what,
        };
        if let Some(v) = self.violation() {
            return Err(fail(v));
        }
        let db = Db::new(self.mem.clone());
        let guests = self.guest_ids.clone();
        let (inboxes, effects) = db
            .read(move |tx| {
                Box::pin(async move {
                    let mut inboxes = Vec::new();
                    for g in &guests {
                        let p = capstan_actors::keys::inbox(g);
                        let rows = tx
                            .snapshot_range(&RangeOption::new(
                                p.clone(),
                                capstan_cluster::tuple::prefix_end(&p),
                            ))
                            .await?;
                        let mut msgs = Vec::new();
                        for (_, v) in rows {
                            let m = capstan_actors::records::MessageRec::decode(&v)?;
                            if let Some((k, _)) = workload_id(&m) {
                                msgs.push((m.number, k));
                            }
                        }
                        inboxes.push(msgs);
                    }
                    let p = keys::effect_prefix();
                    let rows = tx
                        .snapshot_range(&RangeOption::new(
                            p.clone(),
                            capstan_cluster::tuple::prefix_end(&p),
                        ))
                        .await?;
                    let mut effects = BTreeMap::new();
                    for (k, v) in rows {
                        let mut r = capstan_cluster::tuple::TupleReader::new(&k[p.len()..]);
                        let n = r
                            .u64()
                            .map_err(|e| capstan_actors::Error::Corrupt(e.to_string()))?;
                        let c = v
                            .as_slice()
                            .try_into()
                            .map(u32::from_be_bytes)
                            .unwrap_or(u32::MAX);
                        effects.insert(n, c);
                    }
                    Ok::<_, capstan_actors::Error>((inboxes, effects))
                })
            })
            .await
            .map_err(|e| fail(format!("final read: {e}")))?;
        let mut where_k: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
        for (g, msgs) in inboxes.iter().enumerate() {
            for (n, k) in msgs {
                where_k.entry(*k).or_default().push((g, *n));
            }
        }
        let cleared = lock(&self.model).cleared.clone();
        let (sends, requests) = {
            let h = hist(&self.history);
            (h.sends.clone(), h.requests.clone())
        };
        for (k, at) in &where_k {
            if at.len() > 1 {
                return Err(fail(format!(
                    "message k{k} present {} times: {at:?}",
                    at.len()
                )));
            }
            if effects.get(k).copied().unwrap_or(0) != 1 {
                return Err(fail(format!(
                    "message k{k} present at {at:?} but handled {} times",
                    effects.get(k).copied().unwrap_or(0)
                )));
            }
        }
        for (k, c) in &effects {
            if *c > 1 {
                return Err(fail(format!("message k{k} handled {c} times")));
            }
        }
        for (k, (g, acked)) in &sends {
            if *acked && !cleared.contains(k) {
                match where_k.get(k) {
                    Some(at) if at.len() == 1 && at[0].0 == *g => {}
                    other => {
                        return Err(fail(format!(
                            "acknowledged message k{k} to g{g} lost: found at {other:?}"
                        )));
                    }
                }
            }
        }
        let requests: Vec<(u64, usize, FormulaId)> = requests
            .iter()
            .filter(|(k, _)| !cleared.contains(k))
            .map(|(k, (g, p))| (*k, *g, *p))
            .collect();
        for (k, g, promise) in requests {
            if !where_k.contains_key(&k) {
                return Err(fail(format!("acknowledged request r{k} to g{g} lost")));
            }
            let state = db
                .read(move |tx| {
                    Box::pin(async move { capstan_actors::model::must_formula(tx, &promise).await })
                })
                .await
                .map_err(|e| fail(format!("final read: {e}")))?;
            match state.kind {
                FormulaKind::Promise(p) if p.state != PromiseState::Pending => {}
                other => {
                    return Err(fail(format!(
                        "request r{k} to g{g} handled but never settled: {other:?}"
                    )));
                }
            }
        }
        // Followers look in the store at least every 2 s for what a push
        // missed (a link dropped it): give them that long, then check them.
        self.follow_again();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let logs: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| n.runtime.is_some())
            .filter_map(|n| Some((n.name.clone(), n.follower.clone()?)))
            .collect();
        let to_g0: BTreeMap<u64, bool> = sends
            .iter()
            .filter(|(_, (g, _))| *g == 0)
            .map(|(k, (_, acked))| (*k, *acked))
            .collect();
        self.followers_checked = crate::follow::check(&logs, &to_g0, &cleared).map_err(fail)?;
        self.fed_check().await.map_err(fail)
    }

    fn report(&mut self) -> Report {
        let h = hist(&self.history);
        let m = lock(&self.model);
        let mut log = self.log.clone();
        log.update(&self.mem.history_stats().version.to_be_bytes());
        log.update(&self.contents);
        let fed = self
            .fed
            .as_ref()
            .map(|f| f.stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        Report {
            seed: self.cfg.seed,
            steps: self.cfg.steps,
            sends: h.sends.len() as u64,
            acked: h.sends.values().filter(|(_, a)| *a).count() as u64,
            requests: h.requests.len() as u64,
            dismissed: h.dismissed.len() as u64,
            handled: m.handled.iter().map(|s| s.len() as u64).sum(),
            kills: h.kills,
            restarts: h.restarts,
            drains: h.drains,
            policy_changes: h.policy_changes,
            pauses: h.pauses,
            faults: self.mem.fault_counts(),
            fed_sends: h.fed_sends.len() as u64,
            fed_acked: h.fed_sends.values().filter(|(_, a)| *a).count() as u64,
            far_answers: h.far_answers.len() as u64,
            far_kills: h.far_kills,
            fed,
            guest_ids: self.guest_ids.clone(),
            fed_stranded: self.stranded,
            followers_checked: self.followers_checked,
            handed_over: self.handed_over_before + handed_over(&self.nodes),
            fills: self.all_fills.iter().map(|f| f.counts()).sum(),
            holes_closed: m.holes_closed,
            settled_passed: m.settled_passed,
            digest: u64::from_le_bytes(log.finalize().as_bytes()[..8].try_into().unwrap_or([0; 8])),
        }
    }
}

/// Placements the running ones of `nodes` handed over to the members that
/// win them (spreading), since they last started.
fn handed_over(nodes: &[Node]) -> u64 {
    nodes
        .iter()
        .filter_map(|n| n.runtime.as_ref()?.membership())
        .map(|m| m.handed_over.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}
