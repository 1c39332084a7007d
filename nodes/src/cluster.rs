//! Clusters of nodes sharing one replicated store (issue 5), node side:
//! `capstan cluster init` (the cluster key, kept in the store), joining at
//! `capstan start --store …`, and the `cluster` commands a node answers.
//!
//! The cluster's CA key lives in the store under `("cl", "id")`, sealed
//! with the cluster's secrets key (issue 16), which is never in the store:
//! `cluster init` writes it to a file that every node is started with
//! (`start --secrets-key FILE`). A copy of the store (a backup, a snapshot
//! of etcd's disk) holds no usable secret without that file. Each node makes its own key and has it
//! certified by the CA at first start; peers outside the cluster know the
//! cluster by the CA key's hash (its cluster id), so every node serves the
//! cluster's locators.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use capstan_actors::Runtime;
use capstan_actors::cluster::{self as cl, MemberRec};
use capstan_actors::secrets::{self, SecretsKey};
use capstan_cluster::Db;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How long `cluster drain` waits for the node to give up its placements.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Placements listed by `cluster status`.
const MAX_PLACEMENTS_LISTED: usize = 100_000;

/// The cluster's CA, as stored.
#[derive(Serialize, Deserialize)]
pub struct CaRecord {
    /// PKCS#8 DER of the Ed25519 key, hex: only in stores made before the
    /// secrets key (issue 16); empty once sealed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The same key sealed with the cluster's secrets key
    /// ([`capstan_actors::secrets`]), hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed_key: String,
    /// DER of the self-signed certificate, hex.
    pub cert: String,
    pub created_ms: u64,
}

impl CaRecord {
    /// The key id of the secrets key the CA key is sealed with (None: a
    /// plaintext record of an older store).
    pub fn sealed_with(&self) -> Option<String> {
        hex::decode(&self.sealed_key)
            .ok()
            .and_then(|b| secrets::sealed_key_id(&b))
    }

    /// The CA's private key (PKCS#8 DER), opened with `key`.
    pub fn private_key(&self, key: &SecretsKey, spec: &str) -> anyhow::Result<Vec<u8>> {
        if self.sealed_key.is_empty() {
            return hex::decode(&self.key).context("cluster key");
        }
        let sealed = hex::decode(&self.sealed_key).context("sealed cluster key")?;
        key.open(&cl::identity_key(), &sealed).map_err(|e| match e {
            secrets::SecretsError::WrongKey { stored, ours } => anyhow!(
                "this node's secrets key (key id {ours}) is not the one of the cluster in {spec} (key id {stored}): start it with --secrets-key FILE, the file `capstan cluster init` wrote"
            ),
            e => anyhow!("cannot open the cluster key in {spec}: {e}"),
        })
    }
}

/// Whether a store spec names a replicated store (a cluster's).
pub fn is_replicated(spec: &str) -> bool {
    spec.starts_with("etcd://") || spec.starts_with("fdb:")
}

pub async fn read_ca(db: &Db) -> anyhow::Result<Option<CaRecord>> {
    let b = db
        .read(|tx| Box::pin(async move { tx.get(&cl::identity_key()).await }))
        .await
        .map_err(|e| anyhow!("cannot read the cluster identity: {e}"))?;
    match b {
        None => Ok(None),
        Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
            anyhow!("the cluster identity in the store is corrupt ({e}); restore the store from a backup")
        })?)),
    }
}

/// What `cluster init` did.
pub struct Init {
    pub cluster_id: String,
    pub created: bool,
    /// The secrets key file (made now, or the one given).
    pub secrets_key: std::path::PathBuf,
    pub key_made: bool,
    /// Plaintext secrets of an older store sealed now.
    pub sealed: usize,
}

/// `capstan cluster init --store SPEC [--secrets-key FILE]`: makes the
/// cluster key in the store, sealed with the cluster's secrets key, which
/// is written to `key_file` (or read from it when it exists). Again: the
/// existing cluster is reported; an older store's plaintext secrets are
/// sealed.
pub async fn init(spec: &str, key_file: &Path) -> anyhow::Result<Init> {
    if !is_replicated(spec) {
        bail!(
            "a cluster needs a replicated store: etcd://HOST:PORT[,HOST:PORT…] (or fdb:CLUSTER_FILE with the fdb feature); got {spec:?}"
        );
    }
    let given = SecretsKey::load_if_present(key_file).map_err(|e| anyhow!("{e}"))?;
    let db = capstan_cluster::open(spec)
        .await
        .map_err(|e| anyhow!("cannot open the store {spec}: {e}"))?;
    let existing = read_ca(&db).await?;
    if let Some(ca) = &existing
        && let Some(id) = ca.sealed_with()
    {
        // A cluster with its secrets key: init is only a report.
        let key = given.ok_or_else(|| {
            anyhow!(
                "{spec} already holds a cluster, whose secrets key (key id {id}) is not at {}: pass the file it was made with, --secrets-key FILE (a new key would not open its secrets)",
                key_file.display()
            )
        })?;
        ca.private_key(&key, spec)?;
        return Ok(Init {
            cluster_id: id_of(ca)?,
            created: false,
            secrets_key: key_file.to_path_buf(),
            key_made: false,
            sealed: 0,
        });
    }
    let (key, key_made) = match given {
        Some(k) => (k, false),
        None => {
            let k = SecretsKey::generate().map_err(|e| anyhow!("{e}"))?;
            // Written before anything is sealed with it: never a sealed
            // secret without its key on disk.
            k.write_new(key_file).map_err(|e| anyhow!("{e}"))?;
            (k, true)
        }
    };
    let rec = match &existing {
        // An older store: its plaintext CA key is sealed now.
        Some(ca) => CaRecord {
            key: String::new(),
            sealed_key: hex::encode(key.seal(
                &cl::identity_key(),
                &hex::decode(&ca.key).context("cluster key")?,
            )?),
            cert: ca.cert.clone(),
            created_ms: ca.created_ms,
        },
        None => {
            let (ca_key, cert) = crate::net::identity::new_cluster_ca()?;
            CaRecord {
                key: String::new(),
                sealed_key: hex::encode(key.seal(&cl::identity_key(), &ca_key)?),
                cert: hex::encode(&cert),
                created_ms: now_ms(),
            }
        }
    };
    let bytes = serde_json::to_vec(&rec)?;
    let expect_cert = existing.as_ref().map(|c| c.cert.clone());
    let created = db
        .transact(move |tx| {
            let (bytes, expect_cert) = (bytes.clone(), expect_cert.clone());
            Box::pin(async move {
                let now: Option<CaRecord> = tx
                    .get(&cl::identity_key())
                    .await?
                    .and_then(|b| serde_json::from_slice(&b).ok());
                match (now, expect_cert) {
                    (None, None) => {}
                    // Sealing an older store's record: unless another init
                    // sealed it meanwhile.
                    (Some(n), Some(c)) if n.cert == c && n.sealed_key.is_empty() => {}
                    _ => return Ok::<_, capstan_cluster::StoreError>(false),
                }
                tx.set(&cl::identity_key(), &bytes)?;
                Ok(true)
            })
        })
        .await
        .map_err(|e| anyhow!("cannot write the cluster identity: {e}"))?;
    let ca = read_ca(&db)
        .await?
        .ok_or_else(|| anyhow!("the cluster identity vanished from the store"))?;
    ca.private_key(&key, spec)?;
    let sealed = secrets::migrate_llm_keys(&db, &key)
        .await
        .map_err(|e| anyhow!("cannot seal the LLM keys in {spec}: {e}"))?;
    Ok(Init {
        cluster_id: id_of(&ca)?,
        created: created && existing.is_none(),
        secrets_key: key_file.to_path_buf(),
        key_made,
        sealed: sealed + usize::from(created && existing.is_some()),
    })
}

fn id_of(ca: &CaRecord) -> anyhow::Result<String> {
    let cert = hex::decode(&ca.cert).context("cluster certificate")?;
    let id = crate::net::identity::cluster_id_of(&cert.into())?;
    Ok(capstan_proto::locator::encode32(&id))
}

/// The secrets key a node of the cluster in `spec` starts with: the home's
/// (`<home>/identity/secrets.key`, put there by `start --secrets-key`).
pub async fn secrets_key(db: &Db, spec: &str, home: &Path) -> anyhow::Result<SecretsKey> {
    let path = secrets::home_key_path(home);
    if let Some(k) = SecretsKey::load_if_present(&path).map_err(|e| anyhow!("{e}"))? {
        return Ok(k);
    }
    match read_ca(db).await? {
        None => bail!(
            "the store {spec} holds no cluster yet; run `capstan cluster init --store {spec}` first"
        ),
        Some(ca) => match ca.sealed_with() {
            Some(id) => bail!(
                "this node has no secrets key for the cluster in {spec} (key id {id}): start it with `capstan start --store {spec} --secrets-key FILE`, FILE being the key `capstan cluster init` wrote (copy it to this machine; it is kept as {})",
                path.display()
            ),
            None => bail!(
                "the cluster in {spec} keeps its secrets in plaintext (made before secrets keys): run `capstan cluster init --store {spec}` once to make its secrets key and seal them, then start each node with --secrets-key FILE"
            ),
        },
    }
}

/// The node identity of `home` in the cluster of `db` (made on first start).
pub async fn identity(
    db: &Db,
    spec: &str,
    home: &Path,
    secrets: &SecretsKey,
) -> anyhow::Result<crate::net::identity::Identity> {
    let ca = read_ca(db).await?.ok_or_else(|| {
        anyhow!(
            "the store {spec} holds no cluster yet; run `capstan cluster init --store {spec}` first"
        )
    })?;
    if ca.sealed_with().is_none() {
        bail!(
            "the cluster in {spec} keeps its secrets in plaintext (made before secrets keys): run `capstan cluster init --store {spec}` once to make its secrets key and seal them, then start each node with --secrets-key FILE"
        );
    }
    let key = ca.private_key(secrets, spec)?;
    let cert = hex::decode(&ca.cert).context("cluster certificate")?;
    crate::net::identity::Identity::load_or_join(home, &key, &cert)
}

/// This node's id in the cluster (random, made once per home).
pub fn node_id(home: &Path) -> anyhow::Result<String> {
    let f = home.join("node-id");
    match std::fs::read_to_string(&f) {
        Ok(s) if s.trim().len() == 32 && s.trim().chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(s.trim().to_string())
        }
        Ok(_) => bail!(
            "{} is not a node id (32 hex digits); remove it to make a new one",
            f.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b).map_err(|e| anyhow!("no randomness: {e}"))?;
            let id = hex::encode(b);
            std::fs::write(&f, format!("{id}\n"))
                .with_context(|| format!("cannot write {}", f.display()))?;
            Ok(id)
        }
        Err(e) => Err(anyhow!("cannot read {}: {e}", f.display())),
    }
}

/// The node's name in the cluster: the last component of its home.
pub fn node_name(home: &Path) -> anyhow::Result<String> {
    let name = home
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!(
            "the node name comes from the home directory's name, which must be 1-64 letters, digits, '-', '_' or '.'; got {name:?}"
        );
    }
    Ok(name)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn member_json(
    m: &MemberRec,
    now: u64,
    placements: usize,
    observed: &HashMap<String, String>,
) -> Value {
    let live = m.live(now);
    json!({
        "name": m.name,
        "addr": m.addr,
        "observed": observed.get(&m.addr),
        "epoch": m.epoch,
        "pid": m.pid,
        "state": if !live { "dead" } else if m.draining { "draining" } else { "live" },
        "lease_age_ms": now.saturating_sub(m.renewed_ms),
        "expires_in_ms": m.expires_ms as i64 - now as i64,
        "up_ms": now.saturating_sub(m.started_ms),
        "placements": placements,
        // the record layouts its build reads (0: a build from before stop 30)
        "records": m.records,
        // whether it merges commits other members relay (a build from
        // before stop 32 does not)
        "relays": m.relays,
    })
}

/// Answers `cluster COMMAND [ARG]` on a node; one JSON value.
pub async fn command(
    rt: &Runtime,
    agent: &capstan_actors::AgentHandle,
    command: &str,
    arg: &str,
    observed: &HashMap<String, String>,
) -> anyhow::Result<Value> {
    let c = rt.membership().ok_or_else(|| {
        anyhow!("this node is not in a cluster (it runs on an embedded store); start it with --store etcd://… after `capstan cluster init`")
    })?;
    let db = rt.db().clone();
    let snapshot = || async {
        db.read(|tx| {
            Box::pin(async move {
                let members = cl::list_members(tx).await?;
                let placements = cl::list_placements(tx, MAX_PLACEMENTS_LISTED).await?;
                Ok::<_, capstan_actors::Error>((members, placements))
            })
        })
        .await
        .map_err(|e| anyhow!("cannot read the cluster state: {e}"))
    };
    match command {
        "status" | "members" => {
            let (members, placements) = snapshot().await?;
            let now = now_ms();
            let count = |name: &str| {
                placements
                    .iter()
                    .filter(|(_, p)| {
                        p.node == name
                            && members
                                .iter()
                                .any(|m| m.name == name && m.epoch == p.epoch && m.live(now))
                    })
                    .count()
            };
            let ms: Vec<Value> = members
                .iter()
                .map(|m| member_json(m, now, count(&m.name), observed))
                .collect();
            if command == "members" {
                return Ok(Value::Array(ms));
            }
            let store_ok = Instant::now();
            let health = db
                .read(|tx| Box::pin(async move { tx.get(&cl::identity_key()).await }))
                .await;
            Ok(json!({
                "node": c.cfg.name,
                "epoch": c.epoch(),
                "serving": c.serving(),
                "draining": c.draining(),
                "stepdowns": c.stepdowns.load(std::sync::atomic::Ordering::Relaxed),
                "fenced_writes": c.fenced.load(std::sync::atomic::Ordering::Relaxed),
                // why the last lease renewal failed (null once one succeeded)
                "lease_error": c.renewal_error(),
                "wakeups": {
                    "delivered_sent": c.deliveries_sent.load(std::sync::atomic::Ordering::Relaxed),
                    "delivered_received": c.deliveries_received.load(std::sync::atomic::Ordering::Relaxed),
                },
                "link_calls": {
                    "reserve": c.reserve_calls.load(std::sync::atomic::Ordering::Relaxed),
                    "wake": c.wake_calls.load(std::sync::atomic::Ordering::Relaxed),
                    "reserve_us": c.reserve_us.load(std::sync::atomic::Ordering::Relaxed),
                    "reserve_refused": c.reserve_refused.load(std::sync::atomic::Ordering::Relaxed),
                },
                "incarnations_here": rt.incarnations(),
                // how unheld formulas are placed (`cluster policy`), and
                // how many this node handed over to the nodes that win them
                "placement_policy": c.policy().name(),
                "handed_over": c.handed_over.load(std::sync::atomic::Ordering::Relaxed),
                // small values inside their formula records: only once every
                // live member reads them (a rolling upgrade stores blobs)
                "inline_values": c.all_read(cl::RECORDS_VERSION),
                // the member whose Txns carry the cluster's busy commits
                "commit_merger": c.commit_merger().map(|m| m.name),
                "store": db.describe(),
                "store_health": match health {
                    Ok(_) => json!({"ok": true, "read_ms": store_ok.elapsed().as_secs_f64() * 1e3}),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                },
                "members": ms,
                "placements": placements.len(),
                "store_stats": db
                    .store()
                    .stats()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect::<serde_json::Map<String, Value>>(),
            }))
        }
        "placement" => {
            if arg.is_empty() {
                bail!("cluster placement needs a NAME (a pet-name path)");
            }
            let info = agent.show(arg).await?;
            let id = info.id;
            let (members, placements) = snapshot().await?;
            let now = now_ms();
            let p = placements
                .into_iter()
                .find(|(pid, _)| *pid == id)
                .map(|(_, p)| p);
            let (node, state) = match &p {
                None => (Value::Null, "passive"),
                Some(p) => match members.iter().find(|m| m.name == p.node) {
                    Some(m) if m.epoch == p.epoch && m.live(now) => (json!(p.node), "live"),
                    _ => (json!(p.node), "stale"),
                },
            };
            Ok(json!({
                "name": arg,
                "id": id.to_string(),
                "kind": info.kind,
                "node": node,
                "state": state,
                "epoch": p.as_ref().map(|p| p.epoch),
                "since_ms": p.as_ref().map(|p| p.since_ms),
                "policy": c.policy().name(),
            }))
        }
        "drain" => {
            if arg.is_empty() {
                bail!("cluster drain needs a NODE name (see `capstan cluster members`)");
            }
            let (members, before) = snapshot().await?;
            let Some(target) = members.iter().find(|m| m.name == arg) else {
                bail!("no node called {arg:?} in this cluster; see `capstan cluster members`");
            };
            if target.name == c.cfg.name {
                bail!(
                    "a node cannot drain itself through its own socket; run `capstan cluster drain {arg}` on another node, or `capstan cluster leave` here"
                );
            }
            // Draining the last live node that is not draining would leave
            // nothing to run the agents: every node would point away.
            let now = now_ms();
            let serving_others = members
                .iter()
                .filter(|m| m.name != arg && !m.draining && m.live(now))
                .count();
            if target.live(now) && !target.draining && serving_others == 0 {
                bail!(
                    "{arg} is the last live node that is not draining: draining it would leave no node to run the agents; start another node first, or stop {arg} with `capstan cluster leave` on it"
                );
            }
            cl::set_draining(&db, arg).await?;
            let moved: Vec<_> = before
                .iter()
                .filter(|(_, p)| p.node == arg)
                .map(|(id, _)| *id)
                .collect();
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            loop {
                let (members, now_placed) = snapshot().await?;
                let now = now_ms();
                let alive = members.iter().any(|m| m.name == arg && m.live(now));
                let held = now_placed.iter().filter(|(_, p)| p.node == arg).count();
                if held == 0 || !alive {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "node {arg} still holds {held} placements after {} s; is it stuck? `capstan cluster status` shows its lease",
                        DRAIN_TIMEOUT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Bring the agents it ran back to life here (guests keep running).
            let mut adopted = 0;
            for id in &moved {
                if rt.adopt_placement(*id).await.unwrap_or(false) {
                    adopted += 1;
                }
            }
            Ok(json!({"node": arg, "drained": true, "moved": moved.len(), "adopted_here": adopted}))
        }
        "policy" => {
            let before = db
                .read(|tx| Box::pin(async move { cl::get_settings(tx).await }))
                .await
                .map_err(|e| anyhow!("cannot read the cluster's settings: {e}"))?;
            let mut after = before.clone();
            if !arg.is_empty() {
                after.placement = arg.parse().map_err(anyhow::Error::msg)?;
                if after != before {
                    cl::set_settings(&db, after.clone())
                        .await
                        .map_err(|e| anyhow!("cannot store the cluster's settings: {e}"))?;
                }
                // this node follows at once, the others at their next
                // listing of the members (about a second)
                c.refresh_members(&db)
                    .await
                    .map_err(|e| anyhow!("stored, but this node cannot read it back: {e}"))?;
            }
            Ok(json!({
                "placement": after.placement.name(),
                "changed": after != before,
            }))
        }
        "leave" => {
            rt.end_membership(true).await?;
            Ok(json!({"node": c.cfg.name, "left": true}))
        }
        other => bail!(
            "unknown cluster command {other:?}; one of status, members, placement, policy, drain, leave"
        ),
    }
}
