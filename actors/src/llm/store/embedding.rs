//! Embedding requests charged like model calls: reserved in the calling
//! agent's budget before, settled and audited after.

use super::*;

/// An embedding request in flight (see [`embedding_begin`]).
#[derive(Debug)]
pub(crate) struct EmbeddingCall {
    entry: AuditEntry,
    reservation: safety::Reservation,
    price_input: u64,
    price_output: u64,
    started: Instant,
}

/// Before an embedding request to the provider `rec` (named `name`) for
/// `input_bytes` bytes of text: reserves its estimate in the calling
/// agent's budget, as a model call does. `Ok(Err(text))`: refused (over
/// budget), with the refusal in the agent's audit log and `text` saying why.
pub(crate) async fn embedding_begin(
    h: &AgentHandle,
    name: &str,
    rec: &LlmProviderRec,
    model: &str,
    input_bytes: usize,
) -> Result<Result<EmbeddingCall, String>, Error> {
    let cfg = ProviderConfig::from_rec(rec)?;
    let estimate = safety::estimate_tokens(input_bytes);
    let mut entry = AuditEntry {
        number: 0,
        at_ms: now_ms(),
        provider: name.to_string(),
        kind: format!("{} embeddings", cfg.kind.as_str()),
        model: model.to_string(),
        input_tokens: 0,
        output_tokens: 0,
        estimated_tokens: estimate,
        cost_micros: 0,
        outcome: String::new(),
        duration_ms: 0,
        tool_calls: 0,
        redactions: 0,
    };
    // An embedding has no answer tokens: the reservation is the estimate
    // (and the one token `reserve` always leaves room for).
    match reserve(h, estimate, 0, &cfg).await? {
        Ok(reservation) => Ok(Ok(EmbeddingCall {
            entry,
            reservation,
            price_input: cfg.price_input,
            price_output: cfg.price_output,
            started: Instant::now(),
        })),
        Err(over) => {
            entry.outcome = outcome_text(&format!("refused: {over}"));
            record(h, entry, 0, 0, None).await?;
            Ok(Err(format!(
                "refused to call LLM provider {name:?} for embeddings: {over}; the agent's host can raise it with `capstan llm budget`"
            )))
        }
    }
}

/// After an embedding request: `Ok(tokens)` (as the provider reported
/// them; `None`: charged the estimate) or `Err(why)`; records usage and
/// one audit entry.
pub(crate) async fn embedding_end(
    h: &AgentHandle,
    call: EmbeddingCall,
    result: Result<Option<u64>, &str>,
) -> Result<Budget, Error> {
    let EmbeddingCall {
        mut entry,
        reservation,
        price_input,
        price_output,
        started,
    } = call;
    entry.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let tokens = match result {
        Ok(t) => {
            let t = t.filter(|t| *t > 0).unwrap_or(entry.estimated_tokens);
            entry.input_tokens = t;
            entry.outcome = "ok".into();
            t
        }
        Err(why) => {
            entry.outcome = outcome_text(&format!("error: {why}"));
            0
        }
    };
    let cost = safety::cost_micros(tokens, 0, price_input, price_output);
    entry.cost_micros = cost;
    record(h, entry, tokens, cost, Some(reservation)).await
}
