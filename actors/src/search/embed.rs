//! Where a search's vectors come from: the embedding provider given at
//! `mksearch --embed LLM` (an `llm` formula: OpenAI-compatible `POST
//! /v1/embeddings` or Ollama `POST /api/embed`, charged to the searching
//! agent's LLM budget), or, for a capability made without one, the node's
//! local model ([`crate::embed_model`], `start --embed-model DIR`), which costs
//! nothing and calls nobody. Without either the search is full text only.

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::FormulaId;
use serde_json::{Value, json};

use super::{MAX_DIM, MAX_EMBED_RESPONSE, MAX_EMBED_TEXT, SearchSpec, hex_id};
use crate::agent::AgentHandle;
use crate::embed_model::LocalModel;
use crate::error::Error;
use crate::records::FormulaKind;
use crate::{keys, model};

/// The vectors of one search capability on this node.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// The capability's provider (an `llm` formula).
    Provider(FormulaId),
    /// The node's local model (the capability names no provider).
    Local(Arc<LocalModel>),
}

impl Source {
    /// The source of `spec`'s vectors on the node of `h`, if any.
    pub(super) fn of(h: &AgentHandle, spec: &SearchSpec) -> Result<Option<Source>, Error> {
        Ok(match &spec.embed {
            Some(p) => Some(Source::Provider(hex_id(p)?)),
            None => h.inner().opts.embed_model.clone().map(Source::Local),
        })
    }

    /// For answers: where the vectors come from.
    pub(super) fn describe(&self, spec: &SearchSpec) -> String {
        match self {
            Source::Provider(p) => {
                let name = spec.embed_name.clone().unwrap_or_else(|| p.short());
                match &spec.embed_model {
                    Some(m) => format!("provider {name} ({m})"),
                    None => format!("provider {name}"),
                }
            }
            Source::Local(m) => format!("local model {}", m.describe()),
        }
    }

    /// Embeds `texts` (one vector each, in order).
    pub(super) async fn embed(
        &self,
        h: &AgentHandle,
        spec: &SearchSpec,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self {
            Source::Provider(p) => embed_provider(h, spec, *p, texts).await,
            Source::Local(m) => {
                let inputs: Vec<String> = texts.iter().map(|t| cut_embed_text(t)).collect();
                m.embed(inputs).await.map_err(EmbedError::Failed)
            }
        }
    }
}

fn cut_embed_text(t: &str) -> String {
    if t.len() <= MAX_EMBED_TEXT {
        return t.to_string();
    }
    let mut at = MAX_EMBED_TEXT;
    while !t.is_char_boundary(at) {
        at -= 1;
    }
    t[..at].to_string()
}

fn http() -> Result<&'static reqwest::Client, String> {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(c) = C.get() {
        return Ok(c);
    }
    let c = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("capstan/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    Ok(C.get_or_init(|| c))
}

/// Why embeddings could not be had.
#[derive(Debug)]
pub(super) enum EmbedError {
    /// The searching agent's LLM budget refused the request: the search
    /// fails with this (see the module docs).
    Refused(String),
    /// The provider failed: text for the answer's notes (the search falls
    /// back to full text).
    Failed(String),
}

impl From<String> for EmbedError {
    fn from(s: String) -> Self {
        EmbedError::Failed(s)
    }
}

/// Embeds `texts` with the provider `provider` (an `llm` formula): one
/// request, charged to the searching agent's LLM budget and written to its
/// audit log like a model call.
async fn embed_provider(
    h: &AgentHandle,
    spec: &SearchSpec,
    provider: FormulaId,
    texts: &[String],
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let name = spec.embed_name.clone().unwrap_or_else(|| provider.short());
    let secrets = h.inner().opts.secrets.clone();
    let prep = h
        .inner()
        .db
        .read(move |tx| {
            let secrets = secrets.clone();
            Box::pin(async move {
                let f = model::must_formula(tx, &provider).await?;
                let FormulaKind::Llm(rec) = f.kind else {
                    return Err(Error::Corrupt(
                        "the embedding provider is not an llm formula".into(),
                    ));
                };
                let at = keys::llm_key(&provider);
                let key = match tx.get(&at).await? {
                    Some(b) => Some(
                        String::from_utf8(
                            crate::secrets::read(secrets.as_ref(), &at, &b)
                                .map_err(|e| Error::Invalid(e.to_string()))?,
                        )
                        .map_err(|_| Error::Corrupt("the provider's key is not text".into()))?,
                    ),
                    None => None,
                };
                Ok::<_, Error>((rec, key))
            })
        })
        .await
        .map_err(|e| format!("embedding provider {name}: {e}"))?;
    let (rec, key) = prep;
    if rec.removed {
        return Err(EmbedError::Failed(format!(
            "the embedding provider {name} was removed; make the search again with another --embed"
        )));
    }
    let model = spec.embed_model.clone().unwrap_or_else(|| {
        if rec.provider == "ollama" {
            "nomic-embed-text".into()
        } else {
            "text-embedding-3-small".into()
        }
    });
    let bytes: usize = texts.iter().map(|t| t.len().min(MAX_EMBED_TEXT)).sum();
    let call = match crate::llm::store::embedding_begin(h, &name, &rec, &model, bytes).await {
        Ok(Ok(c)) => c,
        Ok(Err(refused)) => return Err(EmbedError::Refused(refused)),
        Err(e) => {
            return Err(EmbedError::Failed(format!(
                "embedding provider {name}: {e}"
            )));
        }
    };
    let r = call_embeddings(&name, &rec, key.as_ref(), &model, texts).await;
    let charged = crate::llm::store::embedding_end(
        h,
        call,
        match &r {
            Ok((_, tokens)) => Ok(*tokens),
            Err(e) => Err(e.as_str()),
        },
    )
    .await;
    if let Err(e) = charged {
        tracing::warn!(provider = %name, "could not record an embedding request in the LLM budget: {e}");
    }
    r.map(|(v, _)| v).map_err(EmbedError::Failed)
}

/// The HTTP request of [`embed_provider`]: the vectors, and the tokens the
/// provider says it used.
async fn call_embeddings(
    name: &str,
    rec: &crate::records::LlmProviderRec,
    key: Option<&String>,
    model: &str,
    texts: &[String],
) -> Result<(Vec<Vec<f32>>, Option<u64>), String> {
    let base = rec.url.trim_end_matches('/');
    let inputs: Vec<String> = texts.iter().map(|t| cut_embed_text(t)).collect();
    let (url, body) = if rec.provider == "ollama" {
        (
            format!("{}/api/embed", base.trim_end_matches("/v1")),
            json!({"model": model, "input": inputs}),
        )
    } else {
        let url = if base.ends_with("/v1") {
            format!("{base}/embeddings")
        } else {
            format!("{base}/v1/embeddings")
        };
        (url, json!({"model": model, "input": inputs}))
    };
    let mut rb = http()?
        .post(&url)
        .timeout(Duration::from_millis(
            u64::from(rec.timeout_ms).clamp(1000, 120_000),
        ))
        .json(&body);
    if let Some(k) = &key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| format!("embedding provider {name} at {url}: {}", e.without_url()))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| {
        format!(
            "embedding provider {name}: the answer broke off: {}",
            e.without_url()
        )
    })?;
    if bytes.len() > MAX_EMBED_RESPONSE {
        return Err(format!(
            "embedding provider {name}: the answer is over {MAX_EMBED_RESPONSE} bytes"
        ));
    }
    if !status.is_success() {
        let mut t = String::from_utf8_lossy(&bytes).to_string();
        if let Some(k) = &key {
            t = t.replace(k.as_str(), "[REDACTED]");
        }
        t.truncate(t.floor_char_boundary(300));
        return Err(format!("embedding provider {name} answered {status}: {t}"));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("embedding provider {name} sent bad JSON: {e}"))?;
    let vecs: Vec<&Value> = if let Some(a) = v["embeddings"].as_array() {
        a.iter().collect()
    } else if let Some(a) = v["data"].as_array() {
        let mut a: Vec<&Value> = a.iter().collect();
        a.sort_by_key(|d| d["index"].as_u64().unwrap_or(0));
        a.into_iter().map(|d| &d["embedding"]).collect()
    } else {
        return Err(format!(
            "embedding provider {name}: the answer has neither `data` nor `embeddings`"
        ));
    };
    if vecs.len() != texts.len() {
        return Err(format!(
            "embedding provider {name}: asked for {} embeddings, got {}",
            texts.len(),
            vecs.len()
        ));
    }
    // OpenAI: usage.prompt_tokens; Ollama: prompt_eval_count.
    let tokens = v["usage"]["prompt_tokens"]
        .as_u64()
        .or_else(|| v["usage"]["total_tokens"].as_u64())
        .or_else(|| v["prompt_eval_count"].as_u64());
    let vecs = vecs
        .into_iter()
        .map(|e| {
            let a = e
                .as_array()
                .filter(|a| !a.is_empty() && a.len() <= MAX_DIM)
                .ok_or_else(|| format!("embedding provider {name}: an embedding is not a list of 1 to {MAX_DIM} numbers"))?;
            a.iter()
                .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| format!("embedding provider {name}: an embedding holds a non-number")))
                .collect()
        })
        .collect::<Result<Vec<Vec<f32>>, String>>()?;
    Ok((vecs, tokens))
}
