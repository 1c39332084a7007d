//! Durable records as Rust values, encoded as the Cap'n Proto structs of
//! `proto/schema/records.capnp`. Decoding validates everything: a stored
//! record that does not decode is reported as corrupt, never trusted.

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capstan_proto::records_capnp as rc;
use capstan_proto::{FormulaId, RequestId};

use crate::error::Error;
use crate::types::{PromiseState, ValueKind};

/// A formula: the durable description of a thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formula {
    pub created_ms: u64,
    pub kind: FormulaKind,
    /// Why and when it was cancelled ([`crate::cancel`]); `None` while live.
    pub cancelled: Option<Cancelled>,
}

/// A formula's cancellation: see [`crate::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// "cancelled by its host" or "cancelled: its dependency … was cancelled".
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormulaKind {
    Host(AgentRec),
    Guest(AgentRec),
    Directory,
    Value(ValueRec),
    Promise(PromiseRec),
    Remote(RemoteRec),
    Invitation(InvitationRec),
    /// An LLM provider (`capstan llm add`); its key is kept apart.
    Llm(LlmProviderRec),
    /// A name held while an invitation is being accepted.
    Accepting(AcceptingRec),
}

/// A name held while `accept` redeems an invitation: see `records.capnp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptingRec {
    pub host: FormulaId,
    /// The hash of the invitation's swiss (as locators are stored).
    pub invitation: [u8; 32],
    pub cluster: [u8; 32],
    /// The request id the invitation is redeemed with.
    pub req: RequestId,
    /// The hashes of the handles offered to the inviter, one per attempt.
    pub handles: Vec<[u8; 32]>,
}

/// An LLM provider: see `records.capnp` and [`crate::llm`]. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmProviderRec {
    pub provider: String,
    pub url: String,
    pub model: String,
    pub max_tokens: u32,
    pub has_key: bool,
    pub removed: bool,
    pub host: FormulaId,
    pub price_input: u64,
    pub price_output: u64,
    pub timeout_ms: u32,
}

/// A pending invitation: see `records.capnp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationRec {
    pub host: FormulaId,
    pub dir: FormulaId,
    pub name: String,
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
            FormulaKind::Invitation(_) => "invitation",
            FormulaKind::Llm(_) => "llm",
            FormulaKind::Accepting(_) => "accepting",
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
    /// The bytes themselves for a small value (at most
    /// [`INLINE_VALUE_MAX`]): no blob then. `None`: the bytes are a blob
    /// under the value's key (larger values, and every value stored before
    /// values were inlined).
    pub inline: Option<Vec<u8>>,
}

/// Largest value kept inside its formula record rather than in a blob of
/// its own. A blob costs a stored value two more keys (its header and a
/// chunk) and a range deletion; a guest that stores a counter on every
/// message paid them on each (measured with `capstan bench --cluster`).
pub const INLINE_VALUE_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromiseRec {
    pub description: String,
    pub requester: FormulaId,
    pub state: PromiseState,
    /// Where the answer goes when the request came from another cluster.
    pub resolver: Option<RemoteRec>,
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
    /// A reference to a capability of this node's own cluster, as stored in
    /// the outbox (the cluster id and addresses are filled in when sent).
    pub fn own(swiss: [u8; 32]) -> RemoteRec {
        RemoteRec {
            cluster: [0; 32],
            swiss,
            addrs: Vec::new(),
        }
    }

    pub fn is_own(&self) -> bool {
        self.cluster == [0; 32]
    }

    pub(crate) fn write(&self, mut b: rc::remote_ref::Builder<'_>) {
        b.set_cluster_id(if self.is_own() { &[] } else { &self.cluster });
        b.set_swiss(&self.swiss);
        let mut a = b.init_addrs(self.addrs.len() as u32);
        for (i, x) in self.addrs.iter().enumerate() {
            a.set(i as u32, x.as_str());
        }
    }

    /// Reads a reference; an empty cluster id is the own cluster only when
    /// `own_allowed` (stored outbox items), never from the wire.
    pub(crate) fn read(
        r: rc::remote_ref::Reader<'_>,
        own_allowed: bool,
    ) -> Result<RemoteRec, Error> {
        let cluster = r.get_cluster_id()?;
        let cluster = if cluster.is_empty() && own_allowed {
            [0; 32]
        } else {
            <[u8; 32]>::try_from(cluster)
                .map_err(|_| Error::Corrupt("a reference's cluster id is not 32 bytes".into()))?
        };
        let swiss = <[u8; 32]>::try_from(r.get_swiss()?)
            .map_err(|_| Error::Corrupt("a reference's swiss number is not 32 bytes".into()))?;
        let list = r.get_addrs()?;
        if list.len() > 16 {
            return Err(Error::Corrupt(
                "a reference with more than 16 addresses".into(),
            ));
        }
        let mut addrs = Vec::with_capacity(list.len() as usize);
        for a in list {
            let a = text(a?)?;
            if a.len() > 256 {
                return Err(Error::Corrupt("a reference address over 256 bytes".into()));
            }
            addrs.push(a);
        }
        Ok(RemoteRec {
            cluster,
            swiss,
            addrs,
        })
    }

    /// Reads a complete reference received from another node.
    pub fn read_wire(r: rc::remote_ref::Reader<'_>) -> Result<RemoteRec, Error> {
        RemoteRec::read(r, false)
    }

    /// Writes a complete reference for another node.
    pub fn write_wire(&self, b: rc::remote_ref::Builder<'_>) {
        self.write(b)
    }

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
    /// For a handle given through invite/accept: who mail through it is from.
    pub peer: Option<FormulaId>,
    /// The locator given to a request's recipient: the only one through
    /// which the promise it designates can be settled.
    pub resolver: bool,
    /// For an invitation that was accepted: by whom (it then serves only
    /// a retry of that accept).
    pub accepted: Option<AcceptedRec>,
}

/// Who accepted an invitation, and the handle given in answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRec {
    pub cluster: [u8; 32],
    pub req: RequestId,
    /// The inviting host (what the handles given in answer designate).
    pub host: FormulaId,
}

impl LocatorRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = builder(256);
        let mut b = msg.init_root::<rc::locator_record::Builder<'_>>();
        b.set_target(self.target.as_bytes());
        b.set_created_ms(self.created_ms);
        b.set_peer(self.peer.as_ref().map(|p| &p.as_bytes()[..]).unwrap_or(&[]));
        b.set_resolver(self.resolver);
        if let Some(a) = &self.accepted {
            b.set_accepted_by(&a.cluster);
            b.set_accept_req(&a.req.0);
            b.set_accept_host(a.host.as_bytes());
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<LocatorRec, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let r = msg.get_root::<rc::locator_record::Reader<'_>>()?;
        Ok(LocatorRec {
            target: id_of(r.get_target()?)?,
            created_ms: r.get_created_ms(),
            peer: {
                let p = r.get_peer()?;
                if p.is_empty() { None } else { Some(id_of(p)?) }
            },
            resolver: r.get_resolver(),
            accepted: {
                let by = r.get_accepted_by()?;
                if by.is_empty() {
                    None
                } else {
                    let h32 = |d: &[u8]| {
                        <[u8; 32]>::try_from(d).map_err(|_| {
                            Error::Corrupt("an accepted invitation's record is damaged".into())
                        })
                    };
                    Some(AcceptedRec {
                        cluster: h32(by)?,
                        req: RequestId::from_slice(r.get_accept_req()?)
                            .map_err(|e| Error::Corrupt(format!("accepted invitation: {e}")))?,
                        host: id_of(r.get_accept_host()?)?,
                    })
                }
            },
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

pub(crate) fn options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(4 * 1024 * 1024))
        .nesting_limit(16);
    o
}

/// A builder for a record of about `bytes`, in one segment of that size.
/// (`Builder::new_default` starts with a zeroed 8 KiB segment, which
/// showed in profiles of the send path: three records a send.) A record
/// that outgrows it takes a second segment, as any capnp message can.
pub(crate) fn builder(bytes: usize) -> Builder<HeapAllocator> {
    // (24 words for the root, its pointers and rounding; at most 1 MiB at
    // once: a larger record grows by segments)
    let words = (bytes / 8 + 24).min(1 << 17);
    Builder::new(HeapAllocator::new().first_segment_words(words as u32))
}

pub(crate) fn to_bytes<A: capnp::message::Allocator>(msg: &Builder<A>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(msg)
}

pub(crate) fn id_of(data: &[u8]) -> Result<FormulaId, Error> {
    FormulaId::from_slice(data).map_err(|e| Error::Corrupt(e.to_string()))
}

pub(crate) fn text(t: capnp::text::Reader<'_>) -> Result<String, Error> {
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
        if let Some(c) = &self.cancelled {
            f.set_cancelled(c.reason.as_str());
            f.set_cancelled_ms(c.at_ms);
        }
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
                if let Some(bytes) = &v.inline {
                    b.set_inline(bytes);
                    b.set_inlined(true);
                }
            }
            FormulaKind::Promise(p) => {
                let mut b = f.init_promise();
                b.set_description(p.description.as_str());
                b.set_requester(p.requester.as_bytes());
                let mut s = b.reborrow().init_state();
                match &p.state {
                    PromiseState::Pending => s.set_pending(()),
                    PromiseState::Resolved(id) => s.set_resolved(id.as_bytes()),
                    PromiseState::Rejected(r) => s.set_rejected(r.as_str()),
                }
                if let Some(r) = &p.resolver {
                    r.write(b.init_resolver());
                }
            }
            FormulaKind::Remote(r) => r.write(f.init_remote()),
            FormulaKind::Invitation(i) => {
                let mut b = f.init_invitation();
                b.set_host(i.host.as_bytes());
                b.set_dir(i.dir.as_bytes());
                b.set_name(i.name.as_str());
            }
            FormulaKind::Accepting(a) => {
                let mut b = f.init_accepting();
                b.set_host(a.host.as_bytes());
                b.set_invitation(&a.invitation);
                b.set_cluster_id(&a.cluster);
                b.set_req_id(&a.req.0);
                let mut h = b.init_handles(a.handles.len() as u32);
                for (i, x) in a.handles.iter().enumerate() {
                    h.set(i as u32, x);
                }
            }
            FormulaKind::Llm(l) => {
                let mut b = f.init_llm();
                b.set_provider(l.provider.as_str());
                b.set_url(l.url.as_str());
                b.set_model(l.model.as_str());
                b.set_max_tokens(l.max_tokens);
                b.set_has_key(l.has_key);
                b.set_removed(l.removed);
                b.set_host(l.host.as_bytes());
                b.set_price_input(l.price_input);
                b.set_price_output(l.price_output);
                b.set_timeout_ms(l.timeout_ms);
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
                let inline = if v.get_inlined() {
                    let bytes = v.get_inline()?;
                    if bytes.len() > INLINE_VALUE_MAX || bytes.len() as u64 != v.get_size() {
                        return Err(Error::Corrupt(format!(
                            "a value record holds {} bytes inline for a value of {}",
                            bytes.len(),
                            v.get_size()
                        )));
                    }
                    Some(bytes.to_vec())
                } else {
                    None
                };
                FormulaKind::Value(ValueRec {
                    kind: kind_from(v.get_kind().map_err(|e| Error::Corrupt(e.to_string()))?),
                    size: v.get_size(),
                    hash,
                    inline,
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
                    resolver: if p.has_resolver() {
                        Some(RemoteRec::read(p.get_resolver()?, false)?)
                    } else {
                        None
                    },
                })
            }
            Which::Remote(r) => FormulaKind::Remote(RemoteRec::read(r?, false)?),
            Which::Invitation(i) => {
                let i = i?;
                FormulaKind::Invitation(InvitationRec {
                    host: id_of(i.get_host()?)?,
                    dir: id_of(i.get_dir()?)?,
                    name: text(i.get_name()?)?,
                })
            }
            Which::Accepting(a) => {
                let a = a?;
                let h32 = |d: &[u8], what: &str| {
                    <[u8; 32]>::try_from(d)
                        .map_err(|_| Error::Corrupt(format!("accepting: {what} is not 32 bytes")))
                };
                FormulaKind::Accepting(AcceptingRec {
                    host: id_of(a.get_host()?)?,
                    invitation: h32(a.get_invitation()?, "invitation")?,
                    cluster: h32(a.get_cluster_id()?, "cluster id")?,
                    req: RequestId::from_slice(a.get_req_id()?)
                        .map_err(|e| Error::Corrupt(format!("accepting: {e}")))?,
                    handles: a
                        .get_handles()?
                        .iter()
                        .map(|x| h32(x?, "handle"))
                        .collect::<Result<Vec<_>, _>>()?,
                })
            }
            Which::Llm(l) => {
                let l = l?;
                FormulaKind::Llm(LlmProviderRec {
                    provider: text(l.get_provider()?)?,
                    url: text(l.get_url()?)?,
                    model: text(l.get_model()?)?,
                    max_tokens: l.get_max_tokens(),
                    has_key: l.get_has_key(),
                    removed: l.get_removed(),
                    host: id_of(l.get_host()?)?,
                    price_input: l.get_price_input(),
                    price_output: l.get_price_output(),
                    timeout_ms: l.get_timeout_ms(),
                })
            }
        };
        let reason = if f.has_cancelled() {
            text(f.get_cancelled()?)?
        } else {
            String::new()
        };
        let cancelled = (!reason.is_empty()).then(|| Cancelled {
            reason,
            at_ms: f.get_cancelled_ms(),
        });
        Ok(Formula {
            cancelled,
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
    /// About the bytes of the encoded record (its builder's size).
    fn size_hint(&self) -> usize {
        // a text: its bytes, a NUL and padding, and a pointer
        let text = |s: &str| s.len() + 16;
        let body = match &self.body {
            BodyRec::Package {
                strings,
                names,
                ids,
            } => {
                strings.iter().map(|s| text(s)).sum::<usize>()
                    + names.iter().map(|s| text(s)).sum::<usize>()
                    + ids.len() * 40
            }
            BodyRec::Request { description, .. } => text(description) + 40,
        };
        // the fixed fields: numbers, four ids, pointers
        256 + body
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut msg = builder(self.size_hint());
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
        let mut msg = builder(96);
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

    /// When the answer was recorded (ms since the epoch).
    pub fn decode_at_ms(bytes: &[u8]) -> Result<u64, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let d = msg.get_root::<rc::dedup_record::Reader<'_>>()?;
        Ok(d.get_at_ms())
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
mod tests;

/// The error an operation on a cancelled formula answers.
pub fn cancelled_error(name: &str, c: &Cancelled, what_next: &str) -> Error {
    Error::Cancelled(format!("{name} was cancelled ({}){what_next}", c.reason))
}
