//! The cluster's records in the store: members and placements (JSON), their
//! keys, and the transactions that read and write them.

use capstan_cluster::tuple::TupleKey;
use capstan_cluster::{Db, Transaction};
use capstan_proto::FormulaId;
use serde::{Deserialize, Serialize};

use super::MAX_MEMBERS;
use crate::error::Error;

pub fn identity_key() -> Vec<u8> {
    TupleKey::new().str("cl").str("id").into_vec()
}
/// The key of the cluster's settings ([`SettingsRec`]).
pub fn settings_key() -> Vec<u8> {
    TupleKey::new().str("cl").str("cfg").into_vec()
}
/// The key of member `name`'s record.
pub fn member_key(name: &str) -> Vec<u8> {
    TupleKey::new().str("cl").str("m").str(name).into_vec()
}
pub(super) fn members_prefix() -> Vec<u8> {
    TupleKey::new().str("cl").str("m").into_vec()
}
pub(super) fn placement_key(id: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("cl")
        .str("p")
        .bytes(id.as_bytes())
        .into_vec()
}
fn placements_prefix() -> Vec<u8> {
    TupleKey::new().str("cl").str("p").into_vec()
}

/// A node of the cluster, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRec {
    pub name: String,
    /// Random per home: a restarted node recognises its own record.
    pub node_id: String,
    /// Its QUIC address (HOST:PORT).
    pub addr: String,
    pub epoch: u64,
    pub pid: u32,
    pub started_ms: u64,
    pub renewed_ms: u64,
    pub expires_ms: u64,
    pub draining: bool,
    /// The newest record layout the node reads ([`RECORDS_VERSION`]; 0: a
    /// node from before it was recorded).
    #[serde(default)]
    pub records: u32,
    /// Whether the node commits groups other members relay to it
    /// (`Member.relay`; false in records of older builds): see
    /// [`crate::cluster::Membership::commit_relay`].
    #[serde(default)]
    pub relays: bool,
}

/// The record layouts this build reads, as its member record advertises
/// them: 1, values kept inside their formula record (stop 30). A node
/// writes a layout only once every live member reads it, so that a cluster
/// upgraded one node at a time never holds records one of its nodes takes
/// for damaged ([`crate::cluster::Membership::all_read`]).
pub const RECORDS_VERSION: u32 = 1;

impl MemberRec {
    pub fn live(&self, now_ms: u64) -> bool {
        self.view().live(now_ms)
    }

    /// What the placement decisions ([`crate::rules::placement`]) see of it.
    pub fn view(&self) -> crate::rules::placement::Member<'_> {
        crate::rules::placement::Member {
            name: &self.name,
            epoch: self.epoch,
            expires_ms: self.expires_ms,
            draining: self.draining,
        }
    }
}

/// Settings every member follows (`capstan cluster policy`); absent: the
/// defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsRec {
    #[serde(default)]
    pub placement: crate::rules::placement::Policy,
}

/// The cluster's settings as stored (the defaults when none are), read at
/// the snapshot: no read conflict (a lease renewal reads them too, and a
/// change of them must not make it retry).
pub async fn get_settings(tx: &mut Transaction) -> Result<SettingsRec, Error> {
    match tx.snapshot_get(&settings_key()).await? {
        Some(b) => decode("settings", &b),
        None => Ok(SettingsRec::default()),
    }
}

/// Stores the cluster's settings; members follow them within about a
/// second (at their next listing of the members).
pub async fn set_settings(db: &Db, rec: SettingsRec) -> Result<(), Error> {
    db.transact(move |tx| {
        let rec = rec.clone();
        Box::pin(async move {
            tx.set(&settings_key(), &encode(&rec))?;
            Ok::<_, Error>(())
        })
    })
    .await
}

/// The owner of a formula, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRec {
    pub node: String,
    pub epoch: u64,
    pub since_ms: u64,
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("{what} record: {e}")))
}
pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("cluster records serialise")
}

pub async fn get_member(tx: &mut Transaction, name: &str) -> Result<Option<MemberRec>, Error> {
    match tx.get(&member_key(name)).await? {
        Some(b) => Ok(Some(decode("member", &b)?)),
        None => Ok(None),
    }
}

pub async fn get_placement(
    tx: &mut Transaction,
    id: &FormulaId,
) -> Result<Option<PlacementRec>, Error> {
    match tx.get(&placement_key(id)).await? {
        Some(b) => Ok(Some(decode("placement", &b)?)),
        None => Ok(None),
    }
}

/// Removes the placement record of `id` (inside the caller's transaction).
pub fn clear_placement(tx: &mut Transaction, id: &FormulaId) {
    tx.clear(&placement_key(id));
}

/// Every member record, live or not.
pub async fn list_members(tx: &mut Transaction) -> Result<Vec<MemberRec>, Error> {
    let p = members_prefix();
    let rows = tx.get_prefix(&p, MAX_MEMBERS, false).await?;
    rows.iter().map(|(_, v)| decode("member", v)).collect()
}

/// Every placement record.
pub async fn list_placements(
    tx: &mut Transaction,
    limit: usize,
) -> Result<Vec<(FormulaId, PlacementRec)>, Error> {
    let p = placements_prefix();
    let rows = tx.get_prefix(&p, limit, false).await?;
    rows.iter()
        .map(|(k, v)| Ok((placement_id(k)?, decode("placement", v)?)))
        .collect()
}

/// Up to `limit` placement records from the formula `from` on (None: the
/// first), read at the snapshot (no read conflict), and where the next
/// page starts (None: this was the last).
pub async fn placements_page(
    db: &Db,
    from: Option<FormulaId>,
    limit: usize,
) -> Result<(Vec<(FormulaId, PlacementRec)>, Option<FormulaId>), Error> {
    let p = placements_prefix();
    let end = capstan_cluster::tuple::prefix_end(&p);
    let begin = from.map_or(p, |id| placement_key(&id));
    let rows = db
        .read(move |tx| {
            let range = capstan_cluster::RangeOption {
                begin: begin.clone(),
                end: end.clone(),
                // one more than asked: where the next page starts
                limit: limit + 1,
                reverse: false,
            };
            Box::pin(async move { Ok::<_, Error>(tx.snapshot_range(&range).await?) })
        })
        .await?;
    let mut page = rows
        .iter()
        .map(|(k, v)| Ok((placement_id(k)?, decode("placement", v)?)))
        .collect::<Result<Vec<(FormulaId, PlacementRec)>, Error>>()?;
    let next = (page.len() > limit).then(|| page.pop().expect("more than limit rows").0);
    Ok((page, next))
}

/// Placements cleared per transaction by [`release_placements`]: a check
/// and a deletion each, well within etcd's default 128 operations a Txn.
const RELEASE_BATCH: usize = 50;

/// Clears every placement that names the node `name` (a drain, a stop),
/// however many there are: pages through them at the snapshot, then clears
/// each in a transaction that reads it again, so that one another node
/// claimed meanwhile stays its. Returns how many it cleared.
pub async fn release_placements(db: &Db, name: &str) -> Result<usize, Error> {
    let (mut from, mut cleared) = (None, 0);
    loop {
        let (page, next) = placements_page(db, from, 256).await?;
        let mine: Vec<FormulaId> = page
            .into_iter()
            .filter(|(_, p)| p.node == name)
            .map(|(id, _)| id)
            .collect();
        for chunk in mine.chunks(RELEASE_BATCH) {
            let (chunk, name) = (chunk.to_vec(), name.to_string());
            cleared += db
                .transact(move |tx| {
                    let (chunk, name) = (chunk.clone(), name.clone());
                    Box::pin(async move {
                        let mut n = 0;
                        for id in &chunk {
                            if get_placement(tx, id).await?.is_some_and(|p| p.node == name) {
                                clear_placement(tx, id);
                                n += 1;
                            }
                        }
                        Ok::<_, Error>(n)
                    })
                })
                .await?;
        }
        match next {
            Some(n) => from = Some(n),
            None => return Ok(cleared),
        }
    }
}

/// The formula a placement key is of.
fn placement_id(key: &[u8]) -> Result<FormulaId, Error> {
    let mut r = capstan_cluster::tuple::TupleReader::new(key);
    (|| {
        r.str().ok()?;
        r.str().ok()?;
        FormulaId::from_slice(&r.bytes().ok()?).ok()
    })()
    .ok_or_else(|| Error::Corrupt("placement key".into()))
}

/// Every placement (listed in pages, without read conflicts).
pub async fn all_placements(
    db: &Db,
) -> Result<std::collections::HashMap<FormulaId, PlacementRec>, Error> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in crate::model::scan_prefix(db, placements_prefix()).await? {
        out.insert(placement_id(&k)?, decode::<PlacementRec>("placement", &v)?);
    }
    Ok(out)
}

/// Marks node `name` draining (its lease loop then gives up its
/// placements); `Ok(false)` if there is no such node.
pub async fn set_draining(db: &Db, name: &str) -> Result<bool, Error> {
    let name = name.to_string();
    db.transact(move |tx| {
        let name = name.clone();
        Box::pin(async move {
            let Some(mut m) = get_member(tx, &name).await? else {
                return Ok(false);
            };
            if !m.draining {
                m.draining = true;
                tx.set(&member_key(&name), &encode(&m))?;
            }
            Ok(true)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` placements of distinct formulas (ids drawn from their
    /// index), each on the node `node_of(index)`.
    async fn placed(db: &Db, count: u32, node_of: fn(u32) -> &'static str) -> Vec<FormulaId> {
        let ids: Vec<FormulaId> = (0..count)
            .map(|i| FormulaId::from_slice(blake3::hash(&i.to_le_bytes()).as_bytes()).unwrap())
            .collect();
        for (c, chunk) in ids.chunks(100).enumerate() {
            let chunk = chunk.to_vec();
            db.transact(move |tx| {
                let chunk = chunk.clone();
                Box::pin(async move {
                    for (i, id) in chunk.iter().enumerate() {
                        let rec = PlacementRec {
                            node: node_of((c * 100 + i) as u32).into(),
                            epoch: 1,
                            since_ms: 0,
                        };
                        tx.set(&placement_key(id), &encode(&rec))?;
                    }
                    Ok::<_, Error>(())
                })
            })
            .await
            .unwrap();
        }
        ids
    }

    /// Paging through placements sees each once, in pages of the size
    /// asked, and says when it is done.
    #[tokio::test]
    async fn placement_pages_cover_every_placement_once() {
        let db = capstan_cluster::open("mem:").await.unwrap();
        let ids = placed(&db, 600, |_| "n1").await;
        // a member record beside them is not a placement
        db.transact(|tx| {
            Box::pin(async move {
                tx.set(&member_key("n1"), b"{}")?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
        let (mut seen, mut from, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) = placements_page(&db, from, 256).await.unwrap();
            pages += 1;
            assert!(page.len() <= 256);
            seen.extend(page.into_iter().map(|(id, _)| id));
            from = next;
            if from.is_none() {
                break;
            }
        }
        assert_eq!(pages, 3);
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want, "each placement once, in id order");
    }

    /// A drain gives up every placement of the node, however many, and
    /// none of another node's.
    #[tokio::test]
    async fn releasing_clears_every_placement_of_the_node_only() {
        let db = capstan_cluster::open("mem:").await.unwrap();
        // one in seven is another node's
        placed(&db, 700, |i| if i % 7 == 0 { "n2" } else { "n1" }).await;
        assert_eq!(release_placements(&db, "n1").await.unwrap(), 600);
        let (mut left, mut from) = (Vec::new(), None);
        loop {
            let (page, next) = placements_page(&db, from, 256).await.unwrap();
            left.extend(page);
            from = next;
            if from.is_none() {
                break;
            }
        }
        assert_eq!(left.len(), 100);
        assert!(left.iter().all(|(_, p)| p.node == "n2"));
        // again: nothing left to clear
        assert_eq!(release_placements(&db, "n1").await.unwrap(), 0);
    }
}
