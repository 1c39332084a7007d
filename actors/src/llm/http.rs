//! One model call over HTTP: the request, bounded retries with backoff, a
//! bounded answer, and errors that name the provider and say what to do.

use std::sync::OnceLock;
use std::time::Duration;

use super::safety::LeakScanner;
use super::types::{ChatRequest, ChatResponse, Usage};
use super::wire;
use super::{LlmError, ProviderConfig, ProviderKind, Secret};

/// Largest answer body read from a provider.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// Most retries of one call (after the first attempt).
pub const MAX_RETRIES: u32 = 3;
/// The first backoff; doubled each retry.
pub const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between two attempts (also caps `Retry-After`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// Time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's HTTP client (a connection pool; rustls, no proxies from
/// the environment: a node's model traffic goes where it is configured).
fn client() -> Result<&'static reqwest::Client, LlmError> {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(c) = C.get() {
        return Ok(c);
    }
    let c = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("capstan/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| LlmError::Config(format!("cannot make an HTTP client: {e}")))?;
    Ok(C.get_or_init(|| c))
}

/// The outcome of one attempt.
enum Attempt {
    Done(ChatResponse),
    /// Safe and worth another try (429, 5xx, no connection made), after at
    /// least this long.
    Retry(LlmError, Option<Duration>),
    Fail(LlmError),
}

/// Calls the provider: `name` is how the caller names it (for errors).
/// Retries up to [`MAX_RETRIES`] times what is safe to send again: a
/// connection that could not be made (nothing was sent), 429 and 5xx (the
/// provider refused the work). A timeout or an answer that broke off is
/// not retried: the provider may have done (and billed) the work.
pub async fn call(
    name: &str,
    cfg: &ProviderConfig,
    key: Option<&Secret>,
    req: &ChatRequest,
    scanner: &LeakScanner,
) -> Result<ChatResponse, LlmError> {
    let max_tokens = req
        .max_tokens
        .map_or(cfg.max_tokens, |m| m.min(cfg.max_tokens))
        .max(1);
    let body = wire::request_body(cfg.kind, &cfg.model, max_tokens, req);
    let url = wire::endpoint(cfg.kind, &cfg.url);
    let mut delay = BASE_BACKOFF;
    let mut attempt = 0;
    loop {
        match attempt_once(name, cfg, key, &url, &body, scanner).await {
            Attempt::Done(r) => return Ok(r),
            Attempt::Fail(e) => return Err(e),
            Attempt::Retry(e, after) => {
                if attempt >= MAX_RETRIES {
                    return Err(LlmError::GaveUp {
                        provider: name.to_string(),
                        attempts: attempt + 1,
                        last: Box::new(e),
                    });
                }
                let wait = after.unwrap_or(delay).min(MAX_BACKOFF);
                tracing::info!(
                    provider = name,
                    attempt,
                    ?wait,
                    "model call failed ({e}); retrying"
                );
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

async fn attempt_once(
    name: &str,
    cfg: &ProviderConfig,
    key: Option<&Secret>,
    url: &str,
    body: &serde_json::Value,
    scanner: &LeakScanner,
) -> Attempt {
    let client = match client() {
        Ok(c) => c,
        Err(e) => return Attempt::Fail(e),
    };
    let mut rb = client
        .post(url)
        .timeout(cfg.timeout)
        .header("content-type", "application/json")
        .json(body);
    match (cfg.kind, key) {
        (ProviderKind::Anthropic, Some(k)) => {
            rb = rb
                .header("x-api-key", k.expose())
                .header("anthropic-version", wire::ANTHROPIC_VERSION);
        }
        (ProviderKind::Anthropic, None) => {
            rb = rb.header("anthropic-version", wire::ANTHROPIC_VERSION);
        }
        (_, Some(k)) => rb = rb.bearer_auth(k.expose()),
        (_, None) => {}
    }
    let provider = name.to_string();
    let mut resp = match rb.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            // No connection: nothing was sent, so sending again is safe
            // (a connect timeout is a connect error too).
            let what = format!("cannot connect to {} ({})", cfg.url, error_chain(&e));
            return Attempt::Retry(
                LlmError::Unreachable {
                    provider,
                    detail: scanner.redact(&what),
                },
                None,
            );
        }
        Err(e) if e.is_timeout() => {
            return Attempt::Fail(LlmError::Timeout {
                provider,
                secs: cfg.timeout.as_secs(),
            });
        }
        Err(e) => {
            // The request may have reached the provider: not sent again.
            let what = format!("the request failed ({})", error_chain(&e));
            return Attempt::Fail(LlmError::Unreachable {
                provider,
                detail: scanner.redact(&what),
            });
        }
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut bytes = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if bytes.len() + c.len() > MAX_RESPONSE_BYTES {
                    return Attempt::Fail(LlmError::Malformed {
                        provider,
                        detail: format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
                        usage: Usage::default(),
                    });
                }
                bytes.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Attempt::Fail(LlmError::Timeout {
                    provider,
                    secs: cfg.timeout.as_secs(),
                });
            }
            Err(e) => {
                // The provider got the request and answered: not sent again.
                return Attempt::Fail(LlmError::Unreachable {
                    provider,
                    detail: scanner.redact(&format!("the answer broke off ({})", error_chain(&e))),
                });
            }
        }
    }
    if status.is_success() {
        return match wire::parse_response(cfg.kind, &bytes) {
            Ok(r) => match wire::withheld(&r) {
                None => Attempt::Done(r),
                Some(detail) => Attempt::Fail(LlmError::Withheld {
                    provider,
                    detail: scanner.redact(&detail),
                    usage: r.usage,
                }),
            },
            Err(detail) => Attempt::Fail(LlmError::Malformed {
                provider,
                detail: scanner.redact(&detail),
                usage: wire::reported_usage(cfg.kind, &bytes),
            }),
        };
    }
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| wire::error_message(cfg.kind, &v))
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                .trim()
                .to_string()
        });
    let message = scanner.redact(&message);
    let code = status.as_u16();
    match code {
        401 | 403 if key.is_none() => Attempt::Fail(LlmError::NoKey {
            provider,
            status: code,
            message,
        }),
        401 => Attempt::Fail(LlmError::BadKey {
            provider,
            status: code,
            message,
        }),
        // The key was recognised; what it may do is another matter.
        403 => Attempt::Fail(LlmError::Forbidden { provider, message }),
        429 => Attempt::Retry(
            LlmError::Status {
                provider,
                status: code,
                message: format!("rate limited: {message}"),
            },
            retry_after,
        ),
        500..=599 => Attempt::Retry(
            LlmError::Status {
                provider,
                status: code,
                message,
            },
            retry_after,
        ),
        404 => Attempt::Fail(LlmError::Status {
            provider,
            status: code,
            message: format!(
                "not found at {url} ({message}); check the --url and --model given to `capstan llm add`"
            ),
        }),
        _ => Attempt::Fail(LlmError::Status {
            provider,
            status: code,
            message,
        }),
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut n = 0;
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
        n += 1;
        if n > 4 {
            break;
        }
    }
    s
}
