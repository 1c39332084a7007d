//! Installing components under pet names, making guest agents whose body
//! is one, running a tool once, listing guests (`capstan guests`) and
//! starting channel guests at node start.

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::{FormulaId, RequestId};

use super::config::{MAX_DEADLINE_MS, MAX_FUEL, MIN_DEADLINE_MS, MIN_FUEL};
use super::store::{Body, Manifest, keys, manifest_of};
use super::worlds::World;
use super::{Stats, guest_host, host};
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::model;
use crate::records::FormulaKind;
use crate::types::ValueKind;

/// Largest component accepted.
pub const MAX_COMPONENT_BYTES: usize = capstan_cluster::blob::MAX_BLOB_SIZE;
/// Most capabilities granted at install time.
pub const MAX_GRANTS: usize = 64;

/// What `install` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentInfo {
    /// The value naming the installed component.
    pub id: FormulaId,
    /// blake3 of its bytes, hex.
    pub hash: String,
    pub world: String,
    pub size: u64,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Granted capabilities: slot names.
    pub grants: Vec<String>,
}

/// One guest agent whose body is a component, as `capstan guests` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub name: String,
    pub id: FormulaId,
    /// blake3 of the component, hex.
    pub component: String,
    /// idle, running, stopped (its last message broke a limit), passive
    pub state: String,
    pub handled: u64,
    pub failures: u64,
    pub fuel_last: u64,
    pub memory_peak: u64,
    /// Nanoseconds to make the instance for the last message (fresh store,
    /// pre-instantiated component, pooling allocator).
    pub instantiate_ns_last: u64,
    /// Nanoseconds the handler of the last message ran (host calls included).
    pub call_ns_last: u64,
    pub last_error: String,
}
impl AgentHandle {
    /// Installs a component under `name`: validates it (a component of the
    /// agent or tool world at this node's version), stores its bytes
    /// content-addressed, and records the capabilities granted to it
    /// (`slot` → a path in this host's names). Bad input changes nothing.
    pub async fn install(
        &self,
        req: RequestId,
        name: &str,
        bytes: Vec<u8>,
        grants: Vec<(String, String)>,
    ) -> Result<ComponentInfo, Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can install components".into()));
        }
        crate::names::Path::parse_writable(name)?;
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(Error::TooLarge {
                what: "component".into(),
                len: bytes.len(),
                max: MAX_COMPONENT_BYTES,
            });
        }
        if grants.len() > MAX_GRANTS {
            return Err(Error::TooLarge {
                what: "grants".into(),
                len: grants.len(),
                max: MAX_GRANTS,
            });
        }
        let gh = guest_host(self.inner())?;
        let mut granted = BTreeMap::new();
        for (slot, path) in &grants {
            if !crate::names::is_pet_name(slot) {
                return Err(Error::InvalidName(slot.clone()));
            }
            let e = self.show(path).await?;
            if granted.insert(slot.clone(), e.id.to_hex()).is_some() {
                return Err(Error::Invalid(format!("slot {slot:?} is granted twice")));
            }
        }
        let hash = *blake3::hash(&bytes).as_bytes();
        let bytes = Arc::new(bytes);
        let c = {
            let (gh, bytes) = (gh.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || gh.compile(&hash, &bytes))
                .await
                .map_err(|e| Error::Unavailable(format!("compiler task failed: {e}")))??
        };
        let manifest = Manifest {
            hash: hex::encode(hash),
            world: c.world,
            size: bytes.len() as u64,
            grants: granted,
            imports: c.imports.clone(),
            exports: c.exports.clone(),
        };
        // The bytes, content-addressed (idempotent; shared by every install),
        // in steps: a component can be larger than one transaction of the
        // store (etcd's 1.5 MiB).
        capstan_cluster::blob::set_content_blob(&self.inner().db, &keys::component(&hash), &bytes)
            .await?;
        let text = format!(
            "component {} ({} bytes), world {}",
            manifest.hash,
            manifest.size,
            c.world.describe()
        );
        let id = self
            .store(req, name, ValueKind::Text, text.into_bytes())
            .await?;
        let m = serde_json::to_vec(&manifest).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.inner()
            .db
            .transact(move |tx| {
                let m = m.clone();
                Box::pin(async move {
                    tx.set(&keys::manifest(&id), &m)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        tracing::info!(name, hash = %manifest.hash, world = ?c.world, "installed a component");
        Ok(ComponentInfo {
            id,
            hash: manifest.hash,
            world: c.world.describe(),
            size: manifest.size,
            imports: manifest.imports,
            exports: manifest.exports,
            grants: manifest.grants.into_keys().collect(),
        })
    }

    /// Makes a guest agent under `path` whose body is the installed agent
    /// component `component`; the component's grants become its names.
    pub async fn mkguest_component(
        &self,
        req: RequestId,
        path: &str,
        component: &str,
        fuel: Option<u64>,
        deadline_ms: Option<u32>,
        with: &[(String, String)],
    ) -> Result<FormulaId, Error> {
        if let Some(f) = fuel
            && !(MIN_FUEL..=MAX_FUEL).contains(&f)
        {
            return Err(Error::Invalid(format!(
                "--fuel {f} is out of bounds: between {MIN_FUEL} and {MAX_FUEL}"
            )));
        }
        if let Some(d) = deadline_ms
            && !(MIN_DEADLINE_MS..=MAX_DEADLINE_MS).contains(&d)
        {
            return Err(Error::Invalid(format!(
                "--deadline-ms {d} is out of bounds: between {MIN_DEADLINE_MS} and {MAX_DEADLINE_MS}"
            )));
        }
        let (_, m) = manifest_of(self, component).await?;
        if matches!(m.world, World::Tool | World::Evaluator) {
            return Err(Error::Invalid(format!(
                "{component:?} is a {} component; a guest agent needs {} (or {})",
                m.world.describe(),
                World::Agent.describe(),
                World::Channel.describe()
            )));
        }
        if with.len() > MAX_GRANTS {
            return Err(Error::TooLarge {
                what: "--with capabilities".into(),
                len: with.len(),
                max: MAX_GRANTS,
            });
        }
        // Checked before anything is made: bad input changes nothing.
        let mut extra: Vec<(String, FormulaId)> = Vec::new();
        for (slot, target) in with {
            if !crate::names::is_pet_name(slot) {
                return Err(Error::InvalidName(slot.clone()));
            }
            if m.grants.contains_key(slot) || extra.iter().any(|(s, _)| s == slot) {
                return Err(Error::Invalid(format!(
                    "slot {slot:?} is given twice (the component's grants are {})",
                    if m.grants.is_empty() {
                        "none".to_string()
                    } else {
                        m.grants.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                )));
            }
            extra.push((slot.clone(), self.show(target).await?.id));
        }
        let id = self.mkguest(req, path).await?;
        let grants: Vec<(String, FormulaId)> = m
            .grants
            .iter()
            .map(|(s, h)| {
                Ok((
                    s.clone(),
                    h.parse::<FormulaId>()
                        .map_err(|e| Error::Corrupt(format!("grant {s}: {e}")))?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        let grants: Vec<(String, FormulaId)> = grants.into_iter().chain(extra).collect();
        let body = serde_json::to_vec(&Body {
            id: id.to_hex(),
            hash: m.hash.clone(),
            world: m.world,
            fuel,
            deadline_ms,
            granted: grants.iter().map(|(_, g)| g.to_hex()).collect(),
        })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        self.inner()
            .db
            .transact(move |tx| {
                let (body, grants) = (body.clone(), grants.clone());
                Box::pin(async move {
                    let f = model::must_formula(tx, &id).await?;
                    let FormulaKind::Guest(rec) = f.kind else {
                        return Err(Error::Corrupt("mkguest made no guest".into()));
                    };
                    for (slot, target) in &grants {
                        model::set_name(tx, &rec.pet_store, slot, target).await?;
                    }
                    tx.set(&keys::body(&id), &body)?;
                    Ok(())
                })
            })
            .await?;
        if m.world == World::Channel && self.inner().cluster.get().is_none() {
            // A channel runs as long as it exists: incarnate it now.
            crate::incarnation::agent_actor(self.inner(), id).await?;
        }
        Ok(id)
    }

    /// Runs the installed tool `name` once: `execute` with `input` (JSON).
    pub async fn run_tool(&self, name: &str, input: &str) -> Result<String, Error> {
        if !self.is_host() {
            return Err(Error::Invalid("only a host can run tools".into()));
        }
        serde_json::from_str::<serde_json::Value>(input)
            .map_err(|e| Error::Invalid(format!("--input is not valid JSON: {e}")))?;
        if input.len() > crate::types::MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "tool input".into(),
                len: input.len(),
                max: crate::types::MAX_MESSAGE_TEXT,
            });
        }
        let (_, m) = manifest_of(self, name).await?;
        host::run_tool(self.clone(), m, input.to_string()).await
    }

    /// Every guest agent with a component body, with what the node knows of it.
    pub async fn guests(&self) -> Result<Vec<GuestInfo>, Error> {
        let gh = guest_host(self.inner())?;
        let ctx = self.ctx().clone();
        let rows = self
            .inner()
            .db
            .read(move |tx| {
                let ctx = ctx.clone();
                Box::pin(async move {
                    let begin = keys::bodies();
                    let end = capstan_cluster::tuple::prefix_end(&begin);
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin,
                            end,
                            limit: 10_000,
                            reverse: false,
                        })
                        .await?;
                    let mut found = Vec::new();
                    for (_, v) in rows {
                        let body: Body = serde_json::from_slice(&v)
                            .map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
                        let id: FormulaId = body
                            .id
                            .parse()
                            .map_err(|e| Error::Corrupt(format!("guest id: {e}")))?;
                        found.push((id, body.hash));
                    }
                    let ids: Vec<FormulaId> = found.iter().map(|(id, _)| *id).collect();
                    let names = model::names_for(tx, &ctx, &ids).await?;
                    Ok::<_, Error>(
                        found
                            .into_iter()
                            .zip(names)
                            .map(|((id, hash), name)| (id, name, hash))
                            .collect::<Vec<_>>(),
                    )
                })
            })
            .await?;
        let stats = gh.stats.lock().map(|m| m.clone()).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(id, name, component)| {
                let s = stats.get(&id).cloned().unwrap_or(Stats {
                    state: "passive",
                    ..Stats::default()
                });
                GuestInfo {
                    name,
                    id,
                    component,
                    state: s.state.to_string(),
                    handled: s.handled,
                    failures: s.failures,
                    fuel_last: s.fuel_last,
                    memory_peak: s.memory_peak,
                    instantiate_ns_last: s.instantiate_ns_last,
                    call_ns_last: s.call_ns_last,
                    last_error: s.last_error,
                }
            })
            .collect())
    }
}
impl crate::node::Runtime {
    /// Incarnates every channel guest (they poll the outside system as long
    /// as they exist). Call once at node start, after `enable_guests`.
    /// Outside a cluster only: in a cluster a channel runs where it is placed.
    pub async fn start_channels(&self) -> Result<usize, Error> {
        let inner = self.inner().clone();
        if inner.guests.get().is_none() || inner.cluster.get().is_some() {
            return Ok(0);
        }
        let ids = inner
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let begin = keys::bodies();
                    let end = capstan_cluster::tuple::prefix_end(&begin);
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin,
                            end,
                            limit: 10_000,
                            reverse: false,
                        })
                        .await?;
                    let mut out = Vec::new();
                    for (_, v) in rows {
                        let body: Body = serde_json::from_slice(&v)
                            .map_err(|e| Error::Corrupt(format!("guest body: {e}")))?;
                        if body.world == World::Channel {
                            out.push(
                                body.id
                                    .parse::<FormulaId>()
                                    .map_err(|e| Error::Corrupt(format!("guest id: {e}")))?,
                            );
                        }
                    }
                    Ok::<_, Error>(out)
                })
            })
            .await?;
        for id in &ids {
            crate::incarnation::agent_actor(&inner, *id).await?;
        }
        Ok(ids.len())
    }
}
