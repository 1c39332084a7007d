//! What travels between clusters: envelopes of messages, settlements of
//! requests and the outbox items that carry them, written as Cap'n Proto
//! records and read back with their limits checked.

use capnp::message::Builder;
use capstan_proto::records_capnp as rc;
use capstan_proto::{FormulaId, RequestId};

use crate::error::Error;
use crate::keys;
use crate::records::{RemoteRec, id_of, options, text, to_bytes};

/// A message for an agent of another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: RequestId,
    pub reply_to: Option<RequestId>,
    pub date_ms: u64,
    pub body: EnvelopeBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeBody {
    Package {
        strings: Vec<String>,
        names: Vec<String>,
        refs: Vec<RemoteRec>,
    },
    Request {
        description: String,
        resolver: RemoteRec,
    },
}

/// The answer to a request from another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Resolved(RemoteRec),
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutOp {
    Deliver(Envelope),
    Settle(Settlement),
}

/// Something owed to another cluster; see `records.capnp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: RequestId,
    pub sender: FormulaId,
    pub peer: FormulaId,
    pub to: RemoteRec,
    pub created_us: u64,
    pub op: OutOp,
}

impl Envelope {
    /// Writes the envelope; own-cluster references are completed by `fill`.
    pub fn write(&self, mut b: rc::envelope::Builder<'_>, fill: &dyn Fn(&RemoteRec) -> RemoteRec) {
        b.set_message_id(&self.message_id.0);
        b.set_reply_to(self.reply_to.as_ref().map(|r| &r.0[..]).unwrap_or(&[]));
        b.set_date_ms(self.date_ms);
        let body = b.init_body();
        match &self.body {
            EnvelopeBody::Package {
                strings,
                names,
                refs,
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
                let mut r = p.init_refs(refs.len() as u32);
                for (i, x) in refs.iter().enumerate() {
                    fill(x).write(r.reborrow().get(i as u32));
                }
            }
            EnvelopeBody::Request {
                description,
                resolver,
            } => {
                let mut r = body.init_request();
                r.set_description(description.as_str());
                fill(resolver).write(r.init_resolver());
            }
        }
    }

    /// Reads and validates an envelope (`own_allowed`: from the outbox).
    pub fn read(r: rc::envelope::Reader<'_>, own_allowed: bool) -> Result<Envelope, Error> {
        let rid = |d: &[u8]| RequestId::from_slice(d).map_err(|e| Error::Corrupt(e.to_string()));
        let reply = r.get_reply_to()?;
        use rc::envelope::body::Which;
        let body = match r
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
                let list = p.get_refs()?;
                // the same rules as a local send (checked before the
                // references are read: their count bounds the work)
                crate::rules::mail::check_package(&strings, &names, list.len() as usize)
                    .map_err(malformed)?;
                let refs = list
                    .iter()
                    .map(|x| RemoteRec::read(x, own_allowed))
                    .collect::<Result<Vec<_>, _>>()?;
                EnvelopeBody::Package {
                    strings,
                    names,
                    refs,
                }
            }
            Which::Request(q) => {
                let description = text(q.get_description()?)?;
                crate::rules::mail::check_text("description", &description)?;
                EnvelopeBody::Request {
                    description,
                    resolver: RemoteRec::read(q.get_resolver()?, own_allowed)?,
                }
            }
        };
        Ok(Envelope {
            message_id: rid(r.get_message_id()?)?,
            reply_to: if reply.is_empty() {
                None
            } else {
                Some(rid(reply)?)
            },
            date_ms: r.get_date_ms(),
            body,
        })
    }
}

impl Settlement {
    pub fn write(&self, b: rc::settlement::Builder<'_>, fill: &dyn Fn(&RemoteRec) -> RemoteRec) {
        match self {
            Settlement::Resolved(r) => fill(r).write(b.init_resolved()),
            Settlement::Rejected(why) => {
                let mut b = b;
                b.set_rejected(why.as_str())
            }
        }
    }

    pub fn read(r: rc::settlement::Reader<'_>, own_allowed: bool) -> Result<Settlement, Error> {
        use rc::settlement::Which;
        Ok(
            match r.which().map_err(|e| Error::Corrupt(e.to_string()))? {
                Which::Resolved(x) => Settlement::Resolved(RemoteRec::read(x?, own_allowed)?),
                Which::Rejected(t) => {
                    let t = text(t?)?;
                    crate::rules::mail::check_text("reason", &t)?;
                    Settlement::Rejected(t)
                }
            },
        )
    }
}

impl OutboxItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = Builder::new_default();
        let mut b = msg.init_root::<rc::outbox_item::Builder<'_>>();
        b.set_id(&self.id.0);
        b.set_sender(self.sender.as_bytes());
        b.set_peer(self.peer.as_bytes());
        self.to.write(b.reborrow().init_to());
        b.set_created_us(self.created_us);
        let same = |r: &RemoteRec| r.clone();
        match &self.op {
            OutOp::Deliver(e) => e.write(b.init_deliver(), &same),
            OutOp::Settle(s) => s.write(b.init_settle(), &same),
        }
        to_bytes(&msg)
    }

    pub fn decode(bytes: &[u8]) -> Result<OutboxItem, Error> {
        let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], options())?;
        let r = msg.get_root::<rc::outbox_item::Reader<'_>>()?;
        use rc::outbox_item::Which;
        let op = match r.which().map_err(|e| Error::Corrupt(e.to_string()))? {
            Which::Deliver(e) => OutOp::Deliver(Envelope::read(e?, true)?),
            Which::Settle(s) => OutOp::Settle(Settlement::read(s?, true)?),
        };
        Ok(OutboxItem {
            id: RequestId::from_slice(r.get_id()?).map_err(|e| Error::Corrupt(e.to_string()))?,
            sender: id_of(r.get_sender()?)?,
            peer: id_of(r.get_peer()?)?,
            to: RemoteRec::read(r.get_to()?, false)?,
            created_us: r.get_created_us(),
            op,
        })
    }

    /// Where it is stored: in the queue of the peer cluster it goes to, in
    /// creation order, so delivery keeps send order per destination.
    pub fn key(&self) -> Vec<u8> {
        keys::outbox(&self.to.cluster, self.created_us, &self.id)
    }
}

/// A rule of mail broken by what another cluster sent: a malformed
/// envelope (bounds and bad names keep their own kinds).
fn malformed(e: Error) -> Error {
    match e {
        Error::Invalid(m) => Error::Corrupt(m),
        other => other,
    }
}
