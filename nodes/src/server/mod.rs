//! The control socket's Cap'n Proto objects: [`NodeServer`] (the bootstrap
//! capability) and [`AgentServer`] (one [`AgentHandle`]).
//!
//! Each method reads and validates its parameters (bad input gets a `failed`
//! error with a one-line message and changes nothing), awaits the handle and
//! maps [`capstan_actors::Error`] to `failed` with the error's message.
//!
//! - this module: the two objects and the conversions both use;
//! - `bootstrap`: [`NodeServer`]'s methods (`ping`, `host`, `usage`, `backup`,
//!   `gc`, `stop`);
//! - `adapter`: [`AgentServer`]'s methods, one per `Agent` call; the bodies of
//!   the calls between clusters are in `federation` (`locate`,
//!   `adoptLocator`, `invite`, `accept`), those of the guest calls in
//!   `guests` (`install`, `mkguestComponent`, `mkhttp`, `runTool`,
//!   `evaluate`, `guests`).

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use capnp::Error as CapError;
use capstan_actors::{
    AgentHandle, EntryInfo, MessageBodyView, MessageView, PromiseState, Runtime, ValueKind,
};
use capstan_proto::RequestId;
use tokio::sync::Notify;

use crate::home::Paths;
use crate::net::Net;
use capstan_actors::Target;

mod adapter;
mod bootstrap;
mod federation;
mod guests;

fn failed(msg: impl Into<String>) -> CapError {
    CapError::failed(msg.into())
}

/// An object-model error as it crosses the socket: its kind and message
/// (see [`capstan_actors::error::to_wire`]).
fn actor_error(e: capstan_actors::Error) -> CapError {
    e.to_wire()
}

/// Reads a text parameter, naming it in the error.
fn text(r: capnp::Result<capnp::text::Reader<'_>>, what: &str) -> Result<String, CapError> {
    let r = r.map_err(|e| failed(format!("bad parameter {what}: {}", e.extra)))?;
    r.to_string()
        .map_err(|_| failed(format!("parameter {what} is not valid UTF-8")))
}

fn request_id(r: capnp::Result<capnp::data::Reader<'_>>) -> Result<RequestId, CapError> {
    let r = r.map_err(|e| failed(format!("bad parameter reqId: {}", e.extra)))?;
    RequestId::from_slice(r).map_err(|e| failed(format!("bad parameter reqId: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The bootstrap capability of the control socket.
pub struct NodeServer {
    runtime: Runtime,
    paths: Paths,
    started: Instant,
    started_ms: u64,
    stop: Arc<Notify>,
    net: Rc<Net>,
}

impl NodeServer {
    pub fn new(runtime: Runtime, paths: Paths, stop: Arc<Notify>, net: Rc<Net>) -> Self {
        NodeServer {
            runtime,
            paths,
            started: Instant::now(),
            started_ms: now_ms(),
            stop,
            net,
        }
    }
}

/// One agent, as a capability.
pub struct AgentServer {
    handle: AgentHandle,
    net: Rc<Net>,
}

impl AgentServer {
    pub fn new(handle: AgentHandle, net: Rc<Net>) -> Self {
        AgentServer { handle, net }
    }

    /// The remote formula `path` names, if it names one.
    async fn remote(&self, path: &str) -> Result<Option<capstan_actors::RemoteRec>, CapError> {
        match self.handle.target(path).await.map_err(actor_error)? {
            Target::Remote { remote, .. } => Ok(Some(remote)),
            Target::Local { .. } => Ok(None),
        }
    }
}

fn set_entry(mut b: capstan_proto::api_capnp::entry_info::Builder<'_>, e: &EntryInfo) {
    b.set_name(e.name.as_str());
    b.set_id(e.id.as_bytes());
    b.set_type(e.kind.as_str());
    b.set_detail(e.detail.as_str());
}

fn kind_to_capnp(k: ValueKind) -> capstan_proto::api_capnp::ValueKind {
    use capstan_proto::api_capnp::ValueKind as K;
    match k {
        ValueKind::Text => K::Text,
        ValueKind::Json => K::Json,
        ValueKind::Bytes => K::Bytes,
    }
}

fn kind_from_capnp(k: capstan_proto::api_capnp::ValueKind) -> ValueKind {
    use capstan_proto::api_capnp::ValueKind as K;
    match k {
        K::Text => ValueKind::Text,
        K::Json => ValueKind::Json,
        K::Bytes => ValueKind::Bytes,
    }
}

/// The state text of a promise: `pending`, `resolved`, `rejected: REASON`.
pub fn state_text(s: &PromiseState) -> String {
    match s {
        PromiseState::Pending => "pending".to_string(),
        PromiseState::Resolved(_) => "resolved".to_string(),
        PromiseState::Rejected(why) => format!("rejected: {why}"),
    }
}

/// Writes a [`MessageView`] into its Cap'n Proto form.
pub fn set_message(mut b: capstan_proto::api_capnp::message_view::Builder<'_>, m: &MessageView) {
    b.set_number(m.number);
    b.set_message_id(&m.message_id.0);
    if let Some(r) = &m.reply_to {
        b.set_reply_to(&r.0);
    }
    b.set_from(m.from.as_str());
    b.set_to(m.to.as_str());
    b.set_date_ms(m.date_ms);
    match &m.body {
        MessageBodyView::Package { strings, names } => {
            b.set_type("package");
            let mut s = b.reborrow().init_strings(list_len(strings.len()));
            for (i, t) in strings.iter().enumerate() {
                s.set(i as u32, t.as_str());
            }
            let mut n = b.reborrow().init_names(list_len(names.len()));
            for (i, t) in names.iter().enumerate() {
                n.set(i as u32, t.as_str());
            }
        }
        MessageBodyView::Request { description, state } => {
            b.set_type("request");
            b.set_description(description.as_str());
            b.set_state(state_text(state).as_str());
        }
    }
}

fn list_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        assert_eq!(state_text(&PromiseState::Pending), "pending");
        assert_eq!(
            state_text(&PromiseState::Rejected("no".into())),
            "rejected: no"
        );
    }
}
