//! Code proposals: an `eval` an agent asks its host to run, as the text of
//! a message (`definition:` …), parsed and recognised.

use super::*;

/// What a code proposal mailed by the LLM agent carries after its first line.
#[derive(Debug, Deserialize)]
pub(super) struct Proposal {
    pub(super) source: String,
    #[serde(default)]
    pub(super) slots: BTreeMap<String, String>,
    /// Stored results the code composes (`chain_eval`): global constants.
    #[serde(default)]
    pub(super) values: BTreeMap<String, Value>,
}

/// Parses the text of a proposal message.
pub(super) fn parse_proposal(text: &str) -> Result<Proposal, Error> {
    let Some(rest) = text.strip_prefix(PROPOSAL_PREFIX) else {
        return Err(Error::Invalid(format!(
            "that message is not a code proposal (it does not start with {PROPOSAL_PREFIX:?}); answer it with `capstan reply`"
        )));
    };
    let json = rest.split_once('\n').map(|(_, j)| j).unwrap_or("");
    let p: Proposal = serde_json::from_str(json).map_err(|e| {
        Error::Invalid(format!(
            "the proposal's JSON is malformed ({e}); reject it with `capstan reply N \"…\"`"
        ))
    })?;
    if p.source.len() > MAX_SOURCE {
        return Err(Error::TooLarge {
            what: "proposed source".into(),
            len: p.source.len(),
            max: MAX_SOURCE,
        });
    }
    Ok(p)
}

/// Whether `m` is a code proposal (`definition: slots {…}`).
pub(super) fn is_proposal(m: &crate::records::MessageRec) -> bool {
    matches!(&m.body, BodyRec::Package { strings, .. }
        if strings.first().is_some_and(|t| t.starts_with("definition:")))
}
