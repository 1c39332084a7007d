//! What the store holds of components and guests: a component's bytes
//! (content-addressed), its manifest, a guest's body, and their keys.

use std::collections::BTreeMap;

use capstan_cluster::tuple::TupleKey;
use capstan_proto::FormulaId;
use serde::{Deserialize, Serialize};

use super::worlds::World;
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::node::Inner;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub hash: String,
    pub world: World,
    pub size: u64,
    /// slot → formula id (hex)
    pub grants: BTreeMap<String, String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Body {
    /// The guest's id, hex.
    pub id: String,
    pub hash: String,
    /// Its world (agent or channel); older records: agent.
    #[serde(default = "agent_world")]
    pub world: World,
    /// Fuel per call, if not the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Wall-clock deadline per call, ms, if not the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u32>,
    /// The ids (hex) of the capabilities it was granted when made: it is
    /// cancelled with any of them (see `crate::cancel`). Older records:
    /// none (then the component's install grants count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted: Vec<String>,
}

fn agent_world() -> World {
    World::Agent
}
pub(crate) mod keys {
    use super::*;
    pub fn component(hash: &[u8; 32]) -> Vec<u8> {
        TupleKey::new().str("gc").bytes(hash).into_vec()
    }
    pub fn manifest(value: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gm").bytes(value.as_bytes()).into_vec()
    }
    pub fn body(guest: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gb").bytes(guest.as_bytes()).into_vec()
    }
    pub fn manifest_all() -> Vec<u8> {
        TupleKey::new().str("gm").into_vec()
    }
    pub fn bodies() -> Vec<u8> {
        TupleKey::new().str("gb").into_vec()
    }
    pub fn next(guest: &FormulaId) -> Vec<u8> {
        TupleKey::new().str("gk").bytes(guest.as_bytes()).into_vec()
    }
}
pub(crate) fn parse_hash(s: &str) -> Result<[u8; 32], Error> {
    let v = hex::decode(s).map_err(|e| Error::Corrupt(format!("component hash: {e}")))?;
    v.try_into()
        .map_err(|_| Error::Corrupt("component hash is not 32 bytes".into()))
}

pub(crate) async fn component_bytes(rt: &Inner, hash: [u8; 32]) -> Result<Vec<u8>, Error> {
    rt.db
        .read(move |tx| {
            Box::pin(async move {
                capstan_cluster::blob::get_blob(tx, &keys::component(&hash))
                    .await?
                    .ok_or_else(|| Error::Corrupt("an installed component has no bytes".into()))
            })
        })
        .await
}
pub(crate) use parse_hash as hash_from_hex;
/// The manifest of the installed component named `path` in `agent`'s names.
pub(super) async fn manifest_of(
    agent: &AgentHandle,
    path: &str,
) -> Result<(FormulaId, Manifest), Error> {
    let e = agent.show(path).await?;
    let id = e.id;
    let m = agent
        .inner()
        .db
        .read(move |tx| {
            Box::pin(async move {
                match tx.get(&keys::manifest(&id)).await? {
                    Some(b) => Ok(Some(b)),
                    None => Ok::<_, Error>(None),
                }
            })
        })
        .await?;
    let m = m.ok_or_else(|| {
        Error::Invalid(format!(
            "{path:?} is not an installed component; see `capstan install`"
        ))
    })?;
    let m: Manifest =
        serde_json::from_slice(&m).map_err(|e| Error::Corrupt(format!("manifest: {e}")))?;
    Ok((id, m))
}
