//! The records of an agent's audit log of model calls.

use capnp::message::Builder;
use capstan_proto::records_capnp as rc;
use serde::Serialize;

use crate::error::Error;
use crate::records;

/// One entry of an agent's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub number: u64,
    pub at_ms: u64,
    /// The caller's name for the provider.
    pub provider: String,
    pub kind: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub estimated_tokens: u64,
    pub cost_micros: u64,
    /// `ok`, `error: …` or `refused: …`
    pub outcome: String,
    pub duration_ms: u64,
    pub tool_calls: u32,
    pub redactions: u32,
}

pub(super) fn encode_audit(a: &AuditEntry) -> Vec<u8> {
    let mut msg = Builder::new_default();
    let mut b = msg.init_root::<rc::llm_audit::Builder<'_>>();
    b.set_at_ms(a.at_ms);
    b.set_provider(a.provider.as_str());
    b.set_kind(a.kind.as_str());
    b.set_model(a.model.as_str());
    b.set_input_tokens(a.input_tokens);
    b.set_output_tokens(a.output_tokens);
    b.set_estimated_tokens(a.estimated_tokens);
    b.set_cost_micros(a.cost_micros);
    b.set_outcome(a.outcome.as_str());
    b.set_duration_ms(a.duration_ms);
    b.set_tool_calls(a.tool_calls);
    b.set_redactions(a.redactions);
    records::to_bytes(&msg)
}

pub(super) fn decode_audit(number: u64, bytes: &[u8]) -> Result<AuditEntry, Error> {
    let msg = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], records::options())?;
    let r = msg.get_root::<rc::llm_audit::Reader<'_>>()?;
    Ok(AuditEntry {
        number,
        at_ms: r.get_at_ms(),
        provider: records::text(r.get_provider()?)?,
        kind: records::text(r.get_kind()?)?,
        model: records::text(r.get_model()?)?,
        input_tokens: r.get_input_tokens(),
        output_tokens: r.get_output_tokens(),
        estimated_tokens: r.get_estimated_tokens(),
        cost_micros: r.get_cost_micros(),
        outcome: records::text(r.get_outcome()?)?,
        duration_ms: r.get_duration_ms(),
        tool_calls: r.get_tool_calls(),
        redactions: r.get_redactions(),
    })
}
