//! Durable records as Rust values, encoded as the Cap'n Proto structs of
//! `proto/schema/records.capnp`. Decoding validates everything: a stored
//! record that does not decode is reported as corrupt, never trusted.

use capnp::message::{Builder, ReaderOptions};
use capstan_proto::records_capnp as rc;
use capstan_proto::{FormulaId, RequestId};

use crate::api::{PromiseState, ValueKind};
use crate::error::Error;

/// A formula: the durable description of a thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formula {
    pub created_ms: u64,
    pub kind: FormulaKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormulaKind {
    Host(AgentRec),
    Guest(AgentRec),
    Directory,
    Value(ValueRec),
    Promise(PromiseRec),
    Remote(RemoteRec),
}

impl FormulaKind {
    /// The type name shown to users.
    pub fn type_name(&self) -> &'static str {
        match self {
            FormulaKind::Host(_) => "host",
            FormulaKind::Guest(_) => "guest",
            FormulaKind::Directory => "directory",
            FormulaKind::Value(_) => "value",
            FormulaKind::Promise(_) => "promise",
            FormulaKind::Remote(_) => "remote",
        }
    }
    pub fn agent(&self) -> Option<&AgentRec> {
        match self {
            FormulaKind::Host(a) | FormulaKind::Guest(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRec {
    pub pet_store: FormulaId,
    pub host: Option<FormulaId>,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRec {
    pub kind: ValueKind,
    pub size: u64,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromiseRec {
    pub description: String,
    pub requester: FormulaId,
    pub state: PromiseState,
}

/// A capability of another cluster, adopted from a locator.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteRec {
    pub cluster: [u8; 32],
    pub swiss: [u8; 32],
    pub addrs: Vec<String>,
}

impl std::fmt::Debug for RemoteRec {
    // The swiss number is a bearer secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRec")
            .field("cluster", &hex::encode(&self.cluster[..4]))
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl RemoteRec {
    pub fn locator(&self) -> capstan_proto::Locator {
        capstan_proto::Locator {
            cluster: self.cluster,
            swiss: self.swiss,
            addrs: self.addrs.clone(),
        }
    }
}

/// A locator this node issued (stored under the blake3 of its swiss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorRec {
    pub target: FormulaId,
    pub created_ms: u64,
}

impl LocatorRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut b = msg.init_root::<rc::locator_record::Builder<'_>>();
        b.set_target(self.target.as_bytes());
        b.set_created_ms(self.created_ms);
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<LocatorRec, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let r = msg.get_root::<rc::locator_record::Reader<'_>>()?;
        Ok(LocatorRec {
            target: id_of(r.get_target()?)?,
            created_ms: r.get_created_ms(),
        })
    }
}

/// A message in one inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRec {
    pub number: u64,
    pub message_id: RequestId,
    pub reply_to: Option<RequestId>,
    pub from: FormulaId,
    pub to: FormulaId,
    pub date_ms: u64,
    pub body: BodyRec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRec {
    Package {
        strings: Vec<String>,
        names: Vec<String>,
        ids: Vec<FormulaId>,
    },
    Request {
        description: String,
        promise: FormulaId,
    },
}

impl BodyRec {
    pub fn type_name(&self) -> &'static str {
        match self {
            BodyRec::Package { .. } => "package",
            BodyRec::Request { .. } => "request",
        }
    }
}

/// The first answer to a mutating request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupAnswer {
    None,
    Id(FormulaId),
    Number(u64),
}

fn options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(4 * 1024 * 1024))
        .nesting_limit(16);
    o
}

fn to_bytes<A: capnp::message::Allocator>(msg: &Builder<A>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(msg)
}

fn id_of(data: &[u8]) -> Result<FormulaId, Error> {
    FormulaId::from_slice(data).map_err(|e| Error::Corrupt(e.to_string()))
}

fn text(t: capnp::text::Reader<'_>) -> Result<String, Error> {
    t.to_string()
        .map_err(|e| Error::Corrupt(format!("invalid UTF-8 in record: {e}")))
}

fn kind_to(k: ValueKind) -> rc::ValueKind {
    match k {
        ValueKind::Text => rc::ValueKind::Text,
        ValueKind::Json => rc::ValueKind::Json,
        ValueKind::Bytes => rc::ValueKind::Bytes,
    }
}

fn kind_from(k: rc::ValueKind) -> ValueKind {
    match k {
        rc::ValueKind::Text => ValueKind::Text,
        rc::ValueKind::Json => ValueKind::Json,
        rc::ValueKind::Bytes => ValueKind::Bytes,
    }
}

impl Formula {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut f = msg.init_root::<rc::formula::Builder<'_>>();
        f.set_created_ms(self.created_ms);
        let set_agent = |mut b: rc::agent::Builder<'_>, a: &AgentRec| {
            b.set_pet_store(a.pet_store.as_bytes());
            b.set_host(a.host.as_ref().map(|h| &h.as_bytes()[..]).unwrap_or(&[]));
            b.set_label(a.label.as_str());
        };
        match &self.kind {
            FormulaKind::Host(a) => set_agent(f.init_host(), a),
            FormulaKind::Guest(a) => set_agent(f.init_guest(), a),
            FormulaKind::Directory => f.set_directory(()),
            FormulaKind::Value(v) => {
                let mut b = f.init_value();
                b.set_kind(kind_to(v.kind));
                b.set_size(v.size);
                b.set_hash(&v.hash);
            }
            FormulaKind::Promise(p) => {
                let mut b = f.init_promise();
                b.set_description(p.description.as_str());
                b.set_requester(p.requester.as_bytes());
                let mut s = b.init_state();
                match &p.state {
                    PromiseState::Pending => s.set_pending(()),
                    PromiseState::Resolved(id) => s.set_resolved(id.as_bytes()),
                    PromiseState::Rejected(r) => s.set_rejected(r.as_str()),
                }
            }
            FormulaKind::Remote(r) => {
                let mut b = f.init_remote();
                b.set_cluster_id(&r.cluster);
                b.set_swiss(&r.swiss);
                let mut a = b.init_addrs(r.addrs.len() as u32);
                for (i, x) in r.addrs.iter().enumerate() {
                    a.set(i as u32, x.as_str());
                }
            }
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<Formula, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let f = msg.get_root::<rc::formula::Reader<'_>>()?;
        let agent = |a: rc::agent::Reader<'_>| -> Result<AgentRec, Error> {
            let host = a.get_host()?;
            Ok(AgentRec {
                pet_store: id_of(a.get_pet_store()?)?,
                host: if host.is_empty() {
                    None
                } else {
                    Some(id_of(host)?)
                },
                label: text(a.get_label()?)?,
            })
        };
        use rc::formula::Which;
        let kind = match f.which().map_err(|e| Error::Corrupt(e.to_string()))? {
            Which::Host(a) => FormulaKind::Host(agent(a?)?),
            Which::Guest(a) => FormulaKind::Guest(agent(a?)?),
            Which::Directory(()) => FormulaKind::Directory,
            Which::Value(v) => {
                let v = v?;
                let hash = <[u8; 32]>::try_from(v.get_hash()?)
                    .map_err(|_| Error::Corrupt("value hash is not 32 bytes".into()))?;
                FormulaKind::Value(ValueRec {
                    kind: kind_from(v.get_kind().map_err(|e| Error::Corrupt(e.to_string()))?),
                    size: v.get_size(),
                    hash,
                })
            }
            Which::Promise(p) => {
                let p = p?;
                use rc::promise::state::Which as S;
                let state = match p
                    .get_state()
                    .which()
                    .map_err(|e| Error::Corrupt(e.to_string()))?
                {
                    S::Pending(()) => PromiseState::Pending,
                    S::Resolved(id) => PromiseState::Resolved(id_of(id?)?),
                    S::Rejected(r) => PromiseState::Rejected(text(r?)?),
                };
                FormulaKind::Promise(PromiseRec {
                    description: text(p.get_description()?)?,
                    requester: id_of(p.get_requester()?)?,
                    state,
                })
            }
            Which::Remote(r) => {
                let r = r?;
                let b32 = |d: &[u8], what: &str| {
                    <[u8; 32]>::try_from(d)
                        .map_err(|_| Error::Corrupt(format!("remote {what} is not 32 bytes")))
                };
                let mut addrs = Vec::new();
                for a in r.get_addrs()? {
                    addrs.push(text(a?)?);
                }
                FormulaKind::Remote(RemoteRec {
                    cluster: b32(r.get_cluster_id()?, "cluster id")?,
                    swiss: b32(r.get_swiss()?, "swiss")?,
                    addrs,
                })
            }
        };
        Ok(Formula {
            created_ms: f.get_created_ms(),
            kind,
        })
    }
}

/// Encodes a directory entry.
pub fn encode_name_entry(id: &FormulaId) -> Vec<u8> {
    let mut msg = Builder::new_default();
    msg.init_root::<rc::name_entry::Builder<'_>>()
        .set_id(id.as_bytes());
    to_bytes(&msg)
}

/// Decodes a directory entry.
pub fn decode_name_entry(bytes: &[u8]) -> Result<FormulaId, Error> {
    let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
    id_of(msg.get_root::<rc::name_entry::Reader<'_>>()?.get_id()?)
}

impl MessageRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut m = msg.init_root::<rc::message::Builder<'_>>();
        m.set_number(self.number);
        m.set_message_id(&self.message_id.0);
        m.set_reply_to(self.reply_to.as_ref().map(|r| &r.0[..]).unwrap_or(&[]));
        m.set_from(self.from.as_bytes());
        m.set_to(self.to.as_bytes());
        m.set_date_ms(self.date_ms);
        let body = m.init_body();
        match &self.body {
            BodyRec::Package {
                strings,
                names,
                ids,
            } => {
                let mut p = body.init_package();
                let mut s = p.reborrow().init_strings(strings.len() as u32);
                for (i, x) in strings.iter().enumerate() {
                    s.set(i as u32, x.as_str());
                }
                let mut n = p.reborrow().init_names(names.len() as u32);
                for (i, x) in names.iter().enumerate() {
                    n.set(i as u32, x.as_str());
                }
                let mut d = p.init_ids(ids.len() as u32);
                for (i, x) in ids.iter().enumerate() {
                    d.set(i as u32, x.as_bytes());
                }
            }
            BodyRec::Request {
                description,
                promise,
            } => {
                let mut r = body.init_request();
                r.set_description(description.as_str());
                r.set_promise(promise.as_bytes());
            }
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<MessageRec, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let m = msg.get_root::<rc::message::Reader<'_>>()?;
        let rid = |d: &[u8]| RequestId::from_slice(d).map_err(|e| Error::Corrupt(e.to_string()));
        let reply = m.get_reply_to()?;
        use rc::message::body::Which;
        let body = match m
            .get_body()
            .which()
            .map_err(|e| Error::Corrupt(e.to_string()))?
        {
            Which::Package(p) => {
                let strings = p
                    .get_strings()?
                    .iter()
                    .map(|t| text(t?))
                    .collect::<Result<Vec<_>, _>>()?;
                let names = p
                    .get_names()?
                    .iter()
                    .map(|t| text(t?))
                    .collect::<Result<Vec<_>, _>>()?;
                let ids = p
                    .get_ids()?
                    .iter()
                    .map(|d| id_of(d?))
                    .collect::<Result<Vec<_>, _>>()?;
                if strings.len() != ids.len() + 1 || names.len() != ids.len() {
                    return Err(Error::Corrupt(
                        "package with mismatched strings and references".into(),
                    ));
                }
                BodyRec::Package {
                    strings,
                    names,
                    ids,
                }
            }
            Which::Request(r) => BodyRec::Request {
                description: text(r.get_description()?)?,
                promise: id_of(r.get_promise()?)?,
            },
        };
        Ok(MessageRec {
            number: m.get_number(),
            message_id: rid(m.get_message_id()?)?,
            reply_to: if reply.is_empty() {
                None
            } else {
                Some(rid(reply)?)
            },
            from: id_of(m.get_from()?)?,
            to: id_of(m.get_to()?)?,
            date_ms: m.get_date_ms(),
            body,
        })
    }
}

impl DedupAnswer {
    pub fn encode(&self, at_ms: u64) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut d = msg.init_root::<rc::dedup_record::Builder<'_>>();
        d.set_at_ms(at_ms);
        let mut a = d.init_answer();
        match self {
            DedupAnswer::None => a.set_none(()),
            DedupAnswer::Id(id) => a.set_id(id.as_bytes()),
            DedupAnswer::Number(n) => a.set_number(*n),
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<DedupAnswer, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let d = msg.get_root::<rc::dedup_record::Reader<'_>>()?;
        use rc::dedup_record::answer::Which;
        Ok(
            match d
                .get_answer()
                .which()
                .map_err(|e| Error::Corrupt(e.to_string()))?
            {
                Which::None(()) => DedupAnswer::None,
                Which::Id(id) => DedupAnswer::Id(id_of(id?)?),
                Which::Number(n) => DedupAnswer::Number(n),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let a = AgentRec {
            pet_store: FormulaId::random(),
            host: Some(FormulaId::random()),
            label: "alice".into(),
        };
        for kind in [
            FormulaKind::Host(AgentRec {
                host: None,
                ..a.clone()
            }),
            FormulaKind::Guest(a.clone()),
            FormulaKind::Directory,
            FormulaKind::Value(ValueRec {
                kind: ValueKind::Json,
                size: 3,
                hash: [7; 32],
            }),
            FormulaKind::Promise(PromiseRec {
                description: "need \u{1F600}".into(),
                requester: FormulaId::random(),
                state: PromiseState::Rejected("no".into()),
            }),
        ] {
            let f = Formula {
                created_ms: 5,
                kind,
            };
            assert_eq!(Formula::decode(&f.encode()).unwrap(), f);
        }
        let m = MessageRec {
            number: 9,
            message_id: RequestId::random(),
            reply_to: None,
            from: FormulaId::random(),
            to: FormulaId::random(),
            date_ms: 1,
            body: BodyRec::Package {
                strings: vec!["a\n\"".into(), "".into()],
                names: vec!["x".into()],
                ids: vec![FormulaId::random()],
            },
        };
        assert_eq!(MessageRec::decode(&m.encode()).unwrap(), m);
        assert!(Formula::decode(b"garbage!").is_err());
        assert!(MessageRec::decode(&[]).is_err());
        assert_eq!(
            DedupAnswer::decode(&DedupAnswer::Number(4).encode(1)).unwrap(),
            DedupAnswer::Number(4)
        );
    }
}
