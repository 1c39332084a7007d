//! LLM access held by hosts (issue 6): providers, model calls, safety.
//!
//! # A provider is a formula; its key is not
//!
//! `capstan llm add claude …` makes an `llm` formula named `claude` in the
//! host's own names. We chose a pet-name-visible formula over a host-private
//! table because a provider must be *grantable*: the agent guest is given
//! "an LLM capability named claude" exactly as it is given any other
//! capability (`mkguest helper --agent llm --with llm=claude` puts the same
//! formula under `llm` in the guest's names), and whoever holds the name can
//! make calls — charged to the caller's own budget and written to the
//! caller's audit log. `capstan list`/`show` show it as type `llm`.
//!
//! The formula holds no secret (provider, URL, model, limits, "a key is
//! set"). The API key lives in a separate record `("llmk", formula id)`
//! that only [`AgentHandle::llm_chat`] reads, right before the HTTP call:
//! no command, message, log line, error or stored value contains it.
//! Copying, mailing or granting the formula passes the *use* of the key,
//! never the key. `capstan llm remove` (by the host that added it) erases
//! the key and marks the formula removed, so every name for it — copies,
//! grants — stops working at once.
//!
//! # A call
//!
//! [`AgentHandle::llm_chat`] (the API the agent guest's host uses):
//! 1. resolves the provider in the caller's names, reads config and key;
//! 2. blocks the request if it carries a credential (the configured keys
//!    of this node and well-known key shapes: [`safety::LeakScanner`]);
//! 3. refuses it if the estimate (request text / 4 tokens) would take the
//!    caller over its budget ([`safety::Budget`]);
//! 4. calls the provider ([`http::call`]: bounded time, size and retries);
//! 5. redacts credentials from the answer (text and tool arguments);
//! 6. records actual usage in the budget and one audit entry, in one
//!    transaction. Refusals and failures are audited too.
//!
//! Embedding requests (made by search capabilities, [`crate::search`]) go
//! through the same budget and audit log ([`store::embedding_begin`] and
//! [`store::embedding_end`]): reserved before, settled after, audited with
//! kind `"<provider> embeddings"`.

mod audit;
pub mod http;
pub mod safety;
pub mod store;
pub mod types;
pub mod wire;

use std::time::Duration;

use capstan_proto::{FormulaId, RequestId};
use serde::Serialize;

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::records::LlmProviderRec;

pub use audit::AuditEntry;
pub use safety::{Budget, InjectionPolicy, LeakMode, LeakScanner, Screened};
pub use types::{ChatMessage, ChatRequest, ChatResponse, StopReason, ToolCall, ToolDef, Usage};

/// The wire protocol of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Anthropic Messages API.
    Anthropic,
    /// Ollama's chat API.
    Ollama,
    /// An OpenAI-compatible chat-completions endpoint.
    #[serde(rename = "openai")]
    OpenAi,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Ollama => "ollama",
            ProviderKind::OpenAi => "openai",
        }
    }

    pub fn default_url(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Ollama => "http://127.0.0.1:11434",
            ProviderKind::OpenAi => "https://api.openai.com",
        }
    }

    pub fn default_model(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "claude-sonnet-4-5",
            ProviderKind::Ollama => "llama3.2",
            ProviderKind::OpenAi => "gpt-4o-mini",
        }
    }

    /// Whether calls need an API key.
    pub fn needs_key(self) -> bool {
        !matches!(self, ProviderKind::Ollama)
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "anthropic" => Ok(ProviderKind::Anthropic),
            "ollama" => Ok(ProviderKind::Ollama),
            "openai" => Ok(ProviderKind::OpenAi),
            _ => Err(Error::Invalid(format!(
                "unknown provider {s:?}: use anthropic, ollama or openai"
            ))),
        }
    }
}

/// An API key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([hidden])")
    }
}

/// Longest API key accepted.
pub const MAX_KEY_BYTES: usize = 4096;

impl Secret {
    /// Validates a key as read from a key file (surrounding whitespace is
    /// dropped; it must be one printable line, usable as an HTTP header).
    pub fn new(raw: &[u8]) -> Result<Secret, Error> {
        let s = std::str::from_utf8(raw)
            .map_err(|_| Error::Invalid("the key file is not UTF-8 text".into()))?
            .trim();
        if s.is_empty() {
            return Err(Error::Invalid("the key file is empty".into()));
        }
        if s.len() > MAX_KEY_BYTES {
            return Err(Error::Invalid(format!(
                "the key file holds {} bytes; an API key is at most {MAX_KEY_BYTES}",
                s.len()
            )));
        }
        if s.chars()
            .any(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
        {
            return Err(Error::Invalid(
                "the key file must hold one API key: printable ASCII without spaces or line breaks"
                    .into(),
            ));
        }
        Ok(Secret(s.to_string()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// A provider's configuration, as calls use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub url: String,
    pub model: String,
    pub max_tokens: u32,
    pub timeout: Duration,
    /// micro-USD per million input tokens.
    pub price_input: u64,
    /// micro-USD per million output tokens.
    pub price_output: u64,
}

/// Largest `--max-tokens`.
pub const MAX_OUTPUT_TOKENS: u32 = 1_000_000;
/// Default `--max-tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Default time limit of one HTTP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest time limit of one HTTP request.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest request (all text together).
pub const MAX_REQUEST_TEXT: usize = 4 << 20;
/// Most messages in one request.
pub const MAX_MESSAGES: usize = 10_000;
/// Most tools in one request.
pub const MAX_TOOLS: usize = 128;

/// What `llm add` is given (all optional but the provider kind).
#[derive(Debug, Clone, Default)]
pub struct ProviderSpec {
    pub kind: String,
    pub url: Option<String>,
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub timeout_secs: Option<u64>,
    /// micro-USD per million tokens.
    pub price_input: Option<u64>,
    pub price_output: Option<u64>,
}

impl ProviderSpec {
    /// Checks the spec and fills in defaults.
    pub fn validate(&self, has_key: bool) -> Result<ProviderConfig, Error> {
        let kind: ProviderKind = self.kind.parse()?;
        if kind.needs_key() && !has_key {
            return Err(Error::Invalid(format!(
                "a {} provider needs an API key: give --key-file PATH",
                kind.as_str()
            )));
        }
        let url = self
            .url
            .clone()
            .unwrap_or_else(|| kind.default_url().to_string());
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| Error::Invalid(format!("invalid --url {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(Error::Invalid(format!(
                "invalid --url {url:?}: use http://HOST[:PORT] or https://HOST[:PORT]"
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Error::Invalid(
                "the --url must not hold credentials; give the key with --key-file".into(),
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() || url.len() > 2048 {
            return Err(Error::Invalid(format!(
                "invalid --url {url:?}: a base URL without query or fragment, at most 2048 bytes"
            )));
        }
        let model = self
            .model
            .clone()
            .unwrap_or_else(|| kind.default_model().to_string());
        if model.is_empty()
            || model.len() > 256
            || model.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::Invalid(format!(
                "invalid --model {model:?}: 1-256 characters without spaces"
            )));
        }
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 || max_tokens > MAX_OUTPUT_TOKENS {
            return Err(Error::Invalid(format!(
                "invalid --max-tokens {max_tokens}: 1 to {MAX_OUTPUT_TOKENS}"
            )));
        }
        let timeout = match self.timeout_secs {
            None => DEFAULT_TIMEOUT,
            Some(s) if (1..=MAX_TIMEOUT.as_secs()).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                return Err(Error::Invalid(format!(
                    "invalid --timeout {s}: 1 to {} seconds",
                    MAX_TIMEOUT.as_secs()
                )));
            }
        };
        Ok(ProviderConfig {
            kind,
            url: url.trim_end_matches('/').to_string(),
            model,
            max_tokens,
            timeout,
            price_input: self.price_input.unwrap_or(0),
            price_output: self.price_output.unwrap_or(0),
        })
    }
}

impl ProviderConfig {
    pub(crate) fn from_rec(rec: &LlmProviderRec) -> Result<ProviderConfig, Error> {
        Ok(ProviderConfig {
            kind: rec
                .provider
                .parse()
                .map_err(|_| Error::Corrupt(format!("unknown LLM provider {:?}", rec.provider)))?,
            url: rec.url.clone(),
            model: rec.model.clone(),
            max_tokens: rec.max_tokens.clamp(1, MAX_OUTPUT_TOKENS),
            timeout: Duration::from_millis(u64::from(rec.timeout_ms))
                .clamp(Duration::from_secs(1), MAX_TIMEOUT),
            price_input: rec.price_input,
            price_output: rec.price_output,
        })
    }
}

/// What `capstan list` shows for a provider.
pub fn detail(rec: &LlmProviderRec) -> String {
    if rec.removed {
        return format!("{} (removed)", rec.provider);
    }
    format!(
        "{} {} at {}{}",
        rec.provider,
        rec.model,
        rec.url,
        if rec.has_key { ", key set" } else { "" }
    )
}

/// Why a model call failed. Messages name the provider (as the caller
/// names it) and say what to do; none contains a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    #[error(
        "LLM provider {provider:?} rejected the API key (HTTP {status}: {message}); check the key file given to `capstan llm add`"
    )]
    BadKey {
        provider: String,
        status: u16,
        message: String,
    },
    #[error(
        "LLM provider {provider:?} asks for an API key (HTTP {status}: {message}) and none is configured; add it again with --key-file (`capstan llm add … --key-file PATH`)"
    )]
    NoKey {
        provider: String,
        status: u16,
        message: String,
    },
    #[error(
        "LLM provider {provider:?} denied access (HTTP 403: {message}); the key may not use this model or endpoint: check the --model given to `capstan llm add` and the key's permissions"
    )]
    Forbidden { provider: String, message: String },
    #[error("LLM provider {provider:?} gave no answer: {detail}")]
    Withheld {
        provider: String,
        detail: String,
        /// The tokens the call reported using (it was paid for).
        usage: Usage,
    },
    #[error("LLM provider {provider:?} answered HTTP {status}: {message}")]
    Status {
        provider: String,
        status: u16,
        message: String,
    },
    #[error(
        "LLM provider {provider:?} cannot be reached: {detail}; check that it runs and the --url given to `capstan llm add`"
    )]
    Unreachable { provider: String, detail: String },
    #[error(
        "LLM provider {provider:?} sent no answer within {secs} s (the --timeout given to `capstan llm add`); the request was not repeated, since the provider may have received it"
    )]
    Timeout { provider: String, secs: u64 },
    #[error("LLM provider {provider:?} sent a malformed answer: {detail}")]
    Malformed {
        provider: String,
        detail: String,
        /// The tokens the answer reported using (it was paid for).
        usage: Usage,
    },
    #[error("LLM provider {provider:?} failed {attempts} times; last: {last}")]
    GaveUp {
        provider: String,
        attempts: u32,
        last: Box<LlmError>,
    },
    #[error("{0}")]
    Config(String),
}

impl LlmError {
    /// The tokens a failed call reported using (a malformed answer's).
    pub fn usage(&self) -> Usage {
        match self {
            LlmError::Malformed { usage, .. } | LlmError::Withheld { usage, .. } => *usage,
            LlmError::GaveUp { last, .. } => last.usage(),
            _ => Usage::default(),
        }
    }
}

/// The answer to [`AgentHandle::llm_chat`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlmReply {
    /// The model's answer, credentials redacted.
    pub response: ChatResponse,
    /// The provider kind and model configured.
    pub provider: ProviderKind,
    pub model: String,
    /// Tokens estimated before the call (input only).
    pub estimated_tokens: u64,
    /// What the call cost, micro-USD (0 without prices).
    pub cost_micros: u64,
    /// Credentials redacted from the answer, by kind.
    pub redacted: Vec<&'static str>,
    /// The caller's budget after the call.
    pub budget: Budget,
}

/// A provider as `capstan llm list` shows it (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderInfo {
    pub name: String,
    pub id: String,
    pub provider: String,
    pub url: String,
    pub model: String,
    pub max_tokens: u32,
    pub timeout_secs: u64,
    pub key_set: bool,
    pub price_input_micros: u64,
    pub price_output_micros: u64,
}

impl ProviderInfo {
    pub(crate) fn new(name: String, id: FormulaId, rec: &LlmProviderRec) -> Self {
        ProviderInfo {
            name,
            id: id.to_string(),
            provider: rec.provider.clone(),
            url: rec.url.clone(),
            model: rec.model.clone(),
            max_tokens: rec.max_tokens,
            timeout_secs: u64::from(rec.timeout_ms) / 1000,
            key_set: rec.has_key,
            price_input_micros: rec.price_input,
            price_output_micros: rec.price_output,
        }
    }
}

/// Checks a request's shape and size before anything else.
pub fn check_request(req: &ChatRequest) -> Result<(), Error> {
    if req.messages.is_empty() {
        return Err(Error::Invalid(
            "a model call needs at least one message".into(),
        ));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(Error::Invalid(format!(
            "{} messages in one model call; at most {MAX_MESSAGES} (compact the conversation)",
            req.messages.len()
        )));
    }
    if req.tools.len() > MAX_TOOLS {
        return Err(Error::Invalid(format!(
            "{} tools in one model call; at most {MAX_TOOLS}",
            req.tools.len()
        )));
    }
    for t in &req.tools {
        if t.name.is_empty()
            || t.name.len() > 64
            || !t
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Invalid(format!(
                "invalid tool name {:?}: 1-64 letters, digits, '_' or '-'",
                t.name
            )));
        }
        if !t.schema.is_object() {
            return Err(Error::Invalid(format!(
                "the input schema of tool {:?} is not a JSON object",
                t.name
            )));
        }
    }
    let len = req.text_len();
    if len > MAX_REQUEST_TEXT {
        return Err(Error::TooLarge {
            what: "model request".into(),
            len,
            max: MAX_REQUEST_TEXT,
        });
    }
    Ok(())
}

impl AgentHandle {
    /// `capstan llm add`: configures a provider under `name` in this host's
    /// names, with its key (if any) in the private key record.
    pub async fn llm_add(
        &self,
        req: RequestId,
        name: &str,
        spec: &ProviderSpec,
        key: Option<Secret>,
    ) -> Result<FormulaId, Error> {
        store::add(self, req, name, spec, key).await
    }

    /// `capstan llm list`: the providers named in this agent's own names.
    pub async fn llm_list(&self) -> Result<Vec<ProviderInfo>, Error> {
        store::list(self).await
    }

    /// `capstan llm remove`: removes the name; by the host that added the
    /// provider, also erases its key, so every other name for it stops working.
    pub async fn llm_remove(&self, req: RequestId, name: &str) -> Result<(), Error> {
        store::remove(self, req, name).await
    }

    /// One model call through the provider this agent names `provider`
    /// (a pet-name path), charged to this agent's budget and audited in its
    /// log. The answer's credentials are redacted. This is what the agent
    /// guest's host calls for a guest holding an LLM capability.
    pub async fn llm_chat(&self, provider: &str, req: ChatRequest) -> Result<LlmReply, Error> {
        store::chat(self, provider, req).await
    }

    /// The newest `limit` entries of this agent's audit log, oldest first.
    pub async fn llm_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        store::audit(self, limit).await
    }

    /// The budget of the agent `agent` names (`SELF` or one of this host's agents).
    pub async fn llm_budget(&self, agent: &str) -> Result<Budget, Error> {
        store::budget(self, agent).await
    }

    /// Sets limits of the budget of `agent` (`SELF` or an agent this host
    /// made); `None` keeps a limit, `Some(0)` removes it; `reset` zeroes
    /// what was used.
    pub async fn llm_set_budget(
        &self,
        req: RequestId,
        agent: &str,
        tokens: Option<u64>,
        cost: Option<u64>,
        reset: bool,
        injection: Option<InjectionPolicy>,
    ) -> Result<Budget, Error> {
        store::set_budget(self, req, agent, tokens, cost, reset, injection).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_validated() {
        let spec = |kind: &str, url: Option<&str>| ProviderSpec {
            kind: kind.into(),
            url: url.map(str::to_string),
            ..ProviderSpec::default()
        };
        assert!(spec("gemini", None).validate(true).is_err());
        assert!(spec("anthropic", None).validate(false).is_err());
        let c = spec("ollama", None).validate(false).unwrap();
        assert_eq!(c.url, "http://127.0.0.1:11434");
        assert_eq!(c.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(spec("openai", Some("ftp://x")).validate(true).is_err());
        assert!(
            spec("openai", Some("http://user:pw@x"))
                .validate(true)
                .is_err()
        );
        assert!(spec("openai", Some("not a url")).validate(true).is_err());
        let mut s = spec("openai", Some("http://127.0.0.1:9/"));
        assert_eq!(s.validate(true).unwrap().url, "http://127.0.0.1:9");
        s.max_tokens = Some(0);
        assert!(s.validate(true).is_err());
        s.max_tokens = None;
        s.model = Some("has space".into());
        assert!(s.validate(true).is_err());
    }

    #[test]
    fn secrets_are_checked_and_hidden() {
        let k = Secret::new(b"  sk-test-123\n").unwrap();
        assert_eq!(k.expose(), "sk-test-123");
        assert_eq!(format!("{k:?}"), "Secret([hidden])");
        assert!(Secret::new(b"").is_err());
        assert!(Secret::new(b"two words").is_err());
        assert!(Secret::new(&[0xff, 0xfe]).is_err());
        assert!(Secret::new(&[b'a'; MAX_KEY_BYTES + 1]).is_err());
    }

    #[test]
    fn requests_are_bounded() {
        assert!(check_request(&ChatRequest::default()).is_err());
        assert!(check_request(&ChatRequest::prompt("hi")).is_ok());
        let mut r = ChatRequest::prompt("hi");
        r.tools.push(ToolDef {
            name: "bad name".into(),
            description: String::new(),
            schema: serde_json::json!({}),
        });
        assert!(check_request(&r).is_err());
        let r = ChatRequest::prompt("x".repeat(MAX_REQUEST_TEXT + 1));
        assert!(matches!(check_request(&r), Err(Error::TooLarge { .. })));
    }
}
