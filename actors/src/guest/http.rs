//! The `http` capability: what a tool or channel granted it may reach over
//! HTTP, in the IronClaw way. The host holds an allowlist of URL prefixes
//! (scheme, host and port must match exactly; the path by prefix, on
//! path-segment boundaries: `/v1` allows `/v1` and `/v1/x`, never
//! `/v1-admin`), the allowed methods, a timeout cap, a response size cap,
//! and credential headers whose values it reads from key files at request
//! time and injects on the way out: the guest never sees them, and a
//! response that echoes one (as is, or base64-, hex- or percent-encoded)
//! gets it replaced by `[REDACTED]`.
//!
//! Credentials are bound to the allowlist's origins and to https: a
//! capability with credential headers may allow `http://` prefixes only
//! when made with `--insecure-http` (a test server on loopback). Redirects
//! are followed here, one hop at a time, each checked against the
//! allowlist; a hop to another origin than the request's goes without the
//! credentials. A path with an encoded separator (`%2F`, `%5C`) or an
//! encoded dot segment is refused (servers that decode it would see
//! another path than the one checked), and a response in a content coding
//! (gzip, …) is refused when credentials were sent, since it cannot be
//! checked for them.
//!
//! `mkhttp NAME` stores a text value describing the capability (no secret
//! in it) and a record `("gh", value id)` holding the [`HttpSpec`]; granting
//! that value to a component as slot `http` is what enables `http-request`.

use std::time::Duration;

use capstan_cluster::tuple::TupleKey;
use capstan_proto::{FormulaId, RequestId};
use serde::{Deserialize, Serialize};

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::types::ValueKind;

/// Most URL prefixes in one capability.
pub const MAX_ALLOW: usize = 32;
/// Most credential headers in one capability.
pub const MAX_CREDENTIALS: usize = 8;
/// Largest key file, bytes.
pub const MAX_KEY_FILE: u64 = 8 * 1024;
/// Default and largest timeout of one request, ms.
pub const DEFAULT_TIMEOUT_MS: u32 = 10_000;
pub const MAX_TIMEOUT_MS: u32 = 60_000;
/// Default and largest response body, bytes.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
pub const MAX_MAX_BYTES: u64 = 16 << 20;
/// Largest request body a guest may send, bytes.
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// Most extra headers a guest may set, and the largest `headers-json`.
const MAX_GUEST_HEADERS: usize = 32;
const MAX_HEADERS_JSON: usize = 16 * 1024;
/// Most redirects followed (each inside the allowlist).
const MAX_REDIRECTS: usize = 5;
/// The slot a component's http capability is granted under.
pub const HTTP_SLOT: &str = "http";
const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
const REDACTED: &[u8] = b"[REDACTED]";

/// What an `http` capability allows; stored at `("gh", value id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSpec {
    /// Normalized URL prefixes (`scheme://host:port/path-prefix`).
    pub allow: Vec<String>,
    /// Allowed methods, upper case.
    pub methods: Vec<String>,
    /// Credential headers: (header name, absolute path of its key file).
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u32,
    pub max_bytes: u64,
    /// Credentials may go to `http://` prefixes (in clear): `--insecure-http`.
    #[serde(default)]
    pub insecure_http: bool,
}

pub(crate) fn key(value: &FormulaId) -> Vec<u8> {
    TupleKey::new().str("gh").bytes(value.as_bytes()).into_vec()
}

/// One allowlist entry, parsed.
struct Prefix {
    scheme: String,
    host: String,
    port: u16,
    path: String,
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let u = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{s:?}: only http and https URLs can be allowed"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!("{s:?}: a URL prefix may not carry credentials"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "{s:?}: a URL prefix may not have a query or fragment"
        ));
    }
    let host = u
        .host_str()
        .ok_or_else(|| format!("{s:?}: the URL has no host"))?
        .to_ascii_lowercase();
    let port = u
        .port_or_known_default()
        .ok_or_else(|| format!("{s:?}: the URL has no port"))?;
    Ok(Prefix {
        scheme: u.scheme().to_string(),
        host,
        port,
        path: u.path().to_string(),
    })
}

impl Prefix {
    fn normalized(&self) -> String {
        format!("{}://{}:{}{}", self.scheme, self.host, self.port, self.path)
    }

    fn allows(&self, u: &reqwest::Url) -> bool {
        u.scheme() == self.scheme
            && u.host_str().map(|h| h.to_ascii_lowercase()).as_deref() == Some(self.host.as_str())
            && u.port_or_known_default() == Some(self.port)
            && u.username().is_empty()
            && u.password().is_none()
            && under(u.path(), &self.path)
    }
}

/// Whether `path` is `prefix` or below it, on a path-segment boundary.
fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why a URL's path cannot be checked against a prefix: an encoded
/// separator or dot segment, which a server that decodes it reads as
/// another path.
fn ambiguous_path(u: &reqwest::Url) -> Option<&'static str> {
    let path = u.path().to_ascii_lowercase();
    if path.contains("%2f") || path.contains("%5c") {
        return Some("an encoded '/' or '\\' in the path");
    }
    let dotty = path.split('/').any(|seg| {
        let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        seg.contains('%') && (decoded == "." || decoded == "..")
    });
    dotty.then_some("an encoded '.' or '..' path segment")
}

/// `scheme://host:port` of a URL.
fn origin(u: &reqwest::Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or("").to_ascii_lowercase(),
        u.port_or_known_default().unwrap_or(0)
    )
}

fn allowed(spec: &HttpSpec, u: &reqwest::Url) -> bool {
    spec.allow
        .iter()
        .filter_map(|p| parse_prefix(p).ok())
        .any(|p| p.allows(u))
}

/// Reads a key file: the header value (surrounding whitespace trimmed).
fn read_key(name: &str, path: &str) -> Result<String, String> {
    let p = std::path::Path::new(path);
    let meta = std::fs::metadata(p)
        .map_err(|e| format!("the key file of header {name} ({path}) cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "the key file of header {name} ({path}) is not a file"
        ));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(format!(
            "the key file of header {name} ({path}) has {} bytes; at most {MAX_KEY_FILE}",
            meta.len()
        ));
    }
    let v = std::fs::read_to_string(p)
        .map_err(|e| format!("the key file of header {name} ({path}) cannot be read: {e}"))?;
    let v = v.trim().to_string();
    if v.is_empty() {
        return Err(format!("the key file of header {name} ({path}) is empty"));
    }
    reqwest::header::HeaderValue::from_str(&v).map_err(|_| {
        format!("the key file of header {name} ({path}) does not hold a valid header value")
    })?;
    Ok(v)
}

/// Validates and normalizes what `mkhttp` was given.
pub fn validate(
    allow: &[String],
    methods: &[String],
    headers: &[(String, String)],
    timeout_ms: u32,
    max_bytes: u64,
    insecure_http: bool,
) -> Result<HttpSpec, Error> {
    let bad = |m: String| Error::Invalid(m);
    if allow.is_empty() {
        return Err(bad(
            "an http capability needs at least one --allow URL prefix".into(),
        ));
    }
    if allow.len() > MAX_ALLOW {
        return Err(Error::TooLarge {
            what: "allowed URL prefixes".into(),
            len: allow.len(),
            max: MAX_ALLOW,
        });
    }
    let allow = allow
        .iter()
        .map(|s| parse_prefix(s).map(|p| p.normalized()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let mut ms = Vec::new();
    for m in methods {
        let m = m.trim().to_ascii_uppercase();
        if !METHODS.contains(&m.as_str()) {
            return Err(bad(format!(
                "unknown method {m:?}; allowed are {}",
                METHODS.join(", ")
            )));
        }
        if !ms.contains(&m) {
            ms.push(m);
        }
    }
    if ms.is_empty() {
        ms.push("GET".to_string());
    }
    if headers.len() > MAX_CREDENTIALS {
        return Err(Error::TooLarge {
            what: "credential headers".into(),
            len: headers.len(),
            max: MAX_CREDENTIALS,
        });
    }
    let mut hs = Vec::new();
    for (name, path) in headers {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("{name:?} is not a valid header name")))?;
        if !std::path::Path::new(path).is_absolute() {
            return Err(bad(format!(
                "the key file of header {name} must be an absolute path, got {path:?}"
            )));
        }
        read_key(name, path).map_err(bad)?;
        if hs
            .iter()
            .any(|(n, _): &(String, String)| n.eq_ignore_ascii_case(name))
        {
            return Err(bad(format!("header {name} is given twice")));
        }
        hs.push((name.clone(), path.clone()));
    }
    if !hs.is_empty()
        && !insecure_http
        && let Some(clear) = allow.iter().find(|p| p.starts_with("http://"))
    {
        return Err(bad(format!(
            "the credential headers would be sent in clear to {clear}; allow https URLs, or pass --insecure-http (for example for a server on loopback)"
        )));
    }
    let timeout_ms = match timeout_ms {
        0 => DEFAULT_TIMEOUT_MS,
        t if t > MAX_TIMEOUT_MS => {
            return Err(bad(format!(
                "--timeout-ms {t} is too long; at most {MAX_TIMEOUT_MS}"
            )));
        }
        t => t,
    };
    let max_bytes = match max_bytes {
        0 => DEFAULT_MAX_BYTES,
        b if b > MAX_MAX_BYTES => {
            return Err(bad(format!(
                "--max-bytes {b} is too large; at most {MAX_MAX_BYTES}"
            )));
        }
        b => b,
    };
    Ok(HttpSpec {
        allow,
        methods: ms,
        headers: hs,
        timeout_ms,
        max_bytes,
        insecure_http,
    })
}

impl AgentHandle {
    /// Makes an `http` capability under `name` (see the module docs).
    pub async fn mkhttp(
        &self,
        req: RequestId,
        name: &str,
        spec: HttpSpec,
    ) -> Result<FormulaId, Error> {
        if !self.is_host() {
            return Err(Error::Invalid(
                "only a host can make http capabilities".into(),
            ));
        }
        crate::names::Path::parse_writable(name)?;
        let spec = validate(
            &spec.allow,
            &spec.methods,
            &spec.headers,
            spec.timeout_ms,
            spec.max_bytes,
            spec.insecure_http,
        )?;
        let text = format!(
            "http capability: {} to {}; timeout {} ms, responses up to {} bytes{}",
            spec.methods.join(","),
            spec.allow.join(" "),
            spec.timeout_ms,
            spec.max_bytes,
            if spec.headers.is_empty() {
                String::new()
            } else {
                format!(
                    "; injects {}",
                    spec.headers
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        let record = serde_json::to_vec(&spec).map_err(|e| Error::Corrupt(e.to_string()))?;
        let id = self
            .store(req, name, ValueKind::Text, text.into_bytes())
            .await?;
        self.inner()
            .db
            .transact(move |tx| {
                let record = record.clone();
                Box::pin(async move {
                    tx.set(&key(&id), &record)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        tracing::info!(name, "made an http capability");
        Ok(id)
    }
}

/// The http capability behind formula `id`, if it is one.
pub(crate) async fn spec_of(agent: &AgentHandle, id: FormulaId) -> Result<Option<HttpSpec>, Error> {
    let b = agent
        .inner()
        .db
        .read(move |tx| Box::pin(async move { Ok::<_, Error>(tx.get(&key(&id)).await?) }))
        .await?;
    b.map(|b| {
        serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("http capability: {e}")))
    })
    .transpose()
}

/// An answer to a guest's request.
pub(crate) struct Response {
    pub status: u16,
    pub headers_json: String,
    pub body: Vec<u8>,
}

/// The ways a secret may come back in a response: as is, base64 (standard
/// and URL-safe, at each of the three alignments inside a longer encoded
/// text), hex (either case) and percent-encoded. Longest first.
fn secret_forms(secrets: &[String]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut forms: Vec<Vec<u8>> = Vec::new();
    for s in secrets {
        let b = s.as_bytes();
        forms.push(b.to_vec());
        forms.push(hex::encode(b).into_bytes());
        forms.push(hex::encode_upper(b).into_bytes());
        let pct = percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        forms.push(pct.into_bytes());
        for e in &engines {
            // After `pad` bytes of other data, the secret's bytes start
            // (8*pad) bits into a base64 quantum; the characters that depend
            // only on the secret are those from the next whole quantum
            // position on, up to the last full character.
            for pad in 0..3usize {
                let mut buf = vec![0u8; pad];
                buf.extend_from_slice(b);
                let enc = e.encode(&buf);
                let skip = (pad * 8).div_ceil(6);
                let full = (buf.len() * 8) / 6;
                if full > skip + 8 {
                    forms.push(enc.as_bytes()[skip..full].to_vec());
                }
            }
        }
    }
    forms.retain(|f| f.len() >= 8 || secrets.iter().any(|s| s.as_bytes() == f.as_slice()));
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    forms
}

fn redact(data: &[u8], secrets: &[String]) -> Vec<u8> {
    let mut out = data.to_vec();
    for s in secret_forms(secrets) {
        let s = s.as_slice();
        if s.is_empty() || out.len() < s.len() {
            continue;
        }
        let mut r = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(s) {
                r.extend_from_slice(REDACTED);
                i += s.len();
            } else {
                r.push(out[i]);
                i += 1;
            }
        }
        out = r;
    }
    out
}

/// Makes one request for a guest through the capability `spec`. Every
/// refusal is an error text for the guest.
pub(crate) async fn request(
    spec: &HttpSpec,
    method: &str,
    url: &str,
    headers_json: &str,
    body: Option<Vec<u8>>,
    timeout_ms: Option<u32>,
) -> Result<Response, String> {
    let method_u = method.to_ascii_uppercase();
    let what = format!("http-request {method_u} {url}");
    if !spec.methods.contains(&method_u) {
        return Err(format!(
            "{what}: method {method_u} is not allowed by this http capability (allowed: {})",
            spec.methods.join(", ")
        ));
    }
    let u = reqwest::Url::parse(url).map_err(|e| format!("{what}: not a URL: {e}"))?;
    if let Some(why) = ambiguous_path(&u) {
        return Err(format!(
            "{what}: the URL has {why}, which servers may read as another path; send it unencoded"
        ));
    }
    if !allowed(spec, &u) {
        return Err(format!(
            "{what}: the URL is outside this http capability's allowlist ({})",
            spec.allow.join(" ")
        ));
    }
    if let Some(b) = &body
        && b.len() > MAX_REQUEST_BODY
    {
        return Err(format!(
            "{what}: the request body has {} bytes; at most {MAX_REQUEST_BODY}",
            b.len()
        ));
    }
    // The guest's own headers: a JSON object of strings.
    let mut headers = reqwest::header::HeaderMap::new();
    let hj = headers_json.trim();
    if hj.len() > MAX_HEADERS_JSON {
        return Err(format!(
            "{what}: headers-json has {} bytes; at most {MAX_HEADERS_JSON}",
            hj.len()
        ));
    }
    if !hj.is_empty() {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(hj)
            .map_err(|e| format!("{what}: headers-json is not a JSON object: {e}"))?;
        if v.len() > MAX_GUEST_HEADERS {
            return Err(format!(
                "{what}: {} headers; at most {MAX_GUEST_HEADERS}",
                v.len()
            ));
        }
        for (k, v) in v {
            let Some(v) = v.as_str() else {
                return Err(format!("{what}: header {k} must have a string value"));
            };
            if spec.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(&k)) {
                return Err(format!(
                    "{what}: header {k} is set by the http capability itself"
                ));
            }
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{what}: {k:?} is not a valid header name"))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("{what}: header {k} has an invalid value"))?;
            headers.insert(name, value);
        }
    }
    // The credentials, read now (a rotated key file takes effect at once).
    let mut credentials = reqwest::header::HeaderMap::new();
    let mut secrets = Vec::new();
    for (name, path) in &spec.headers {
        let v = read_key(name, path).map_err(|e| format!("{what}: {e}"))?;
        let hn = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{what}: bad credential header name {name}"))?;
        let mut hv = reqwest::header::HeaderValue::from_str(&v)
            .map_err(|_| format!("{what}: bad credential header value"))?;
        hv.set_sensitive(true);
        credentials.insert(hn, hv);
        // A bearer token may be echoed without its scheme: redact both.
        if let Some((_, token)) = v.split_once(' ')
            && token.len() >= 8
        {
            secrets.push(token.to_string());
        }
        secrets.push(v);
    }
    let timeout = Duration::from_millis(
        timeout_ms
            .unwrap_or(spec.timeout_ms)
            .clamp(1, spec.timeout_ms)
            .into(),
    );
    // Redirects are followed below, a hop at a time (credentials depend on
    // each hop's origin).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut method = reqwest::Method::from_bytes(method_u.as_bytes())
        .map_err(|_| format!("{what}: bad method"))?;
    let describe = |e: reqwest::Error| {
        let mut s = format!("{what}: ");
        if e.is_timeout() {
            s.push_str(&format!("timed out after {} ms", timeout.as_millis()));
        } else {
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            let mut parts = Vec::new();
            while let Some(x) = src {
                parts.push(x.to_string());
                src = x.source();
            }
            s.push_str(&parts.join(": "));
        }
        s
    };
    let first_origin = origin(&u);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut hop = u;
    let mut body = body;
    let mut sent_credentials = false;
    let mut redirects = 0usize;
    let mut resp = loop {
        let with_credentials = !credentials.is_empty()
            && origin(&hop) == first_origin
            && (hop.scheme() == "https" || spec.insecure_http);
        let mut hs = headers.clone();
        if with_credentials {
            hs.extend(credentials.clone());
            sent_credentials = true;
        }
        let mut rb = client.request(method.clone(), hop.clone()).headers(hs);
        if let Some(b) = &body {
            rb = rb.body(b.clone());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let r = tokio::time::timeout(left, rb.send())
            .await
            .map_err(|_| format!("{what}: timed out after {} ms", timeout.as_millis()))?
            .map_err(describe)?;
        if !r.status().is_redirection() {
            break r;
        }
        let Some(location) = r.headers().get(reqwest::header::LOCATION) else {
            break r;
        };
        if redirects >= MAX_REDIRECTS {
            return Err(format!("{what}: more than {MAX_REDIRECTS} redirects"));
        }
        redirects += 1;
        let next = location
            .to_str()
            .ok()
            .and_then(|l| hop.join(l).ok())
            .ok_or_else(|| format!("{what}: a redirect to an invalid location"))?;
        if ambiguous_path(&next).is_some() || !allowed(spec, &next) {
            return Err(format!(
                "{what}: a redirect to {next} is outside this http capability's allowlist"
            ));
        }
        // What browsers do: 303, and 301/302 after a POST, go on as a GET
        // without the body; 307 and 308 repeat the request.
        let status = r.status().as_u16();
        if status == 303 || ((status == 301 || status == 302) && method == reqwest::Method::POST) {
            if method != reqwest::Method::HEAD {
                method = reqwest::Method::GET;
            }
            body = None;
        }
        hop = next;
    };
    if sent_credentials
        && let Some(coding) = resp.headers().get(reqwest::header::CONTENT_ENCODING)
        && !coding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(format!(
            "{what}: the response is in a content coding ({}), which this http capability cannot check for its credentials; ask the server for an uncompressed answer",
            String::from_utf8_lossy(coding.as_bytes())
        ));
    }
    let max = spec.max_bytes;
    if let Some(n) = resp.content_length()
        && n > max
    {
        return Err(format!(
            "{what}: the response body has {n} bytes; this http capability allows at most {max}"
        ));
    }
    let status = resp.status().as_u16();
    let mut hmap = serde_json::Map::new();
    for (k, v) in resp.headers() {
        if let Ok(v) = v.to_str() {
            hmap.insert(k.as_str().to_string(), serde_json::Value::String(v.into()));
        }
    }
    let mut data = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if data.len() as u64 + c.len() as u64 > max {
                    return Err(format!(
                        "{what}: the response body is larger than {max} bytes, the most this http capability allows"
                    ));
                }
                data.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => return Err(describe(e)),
        }
    }
    let headers_json = serde_json::Value::Object(hmap).to_string();
    Ok(Response {
        status,
        headers_json: String::from_utf8_lossy(&redact(headers_json.as_bytes(), &secrets))
            .into_owned(),
        body: redact(&data, &secrets),
    })
}

/// What a guest's `http-request` import does: finds its `http` grant and
/// makes the request (on the node's runtime; the caller blocks).
pub(crate) async fn guest_request(
    agent: &AgentHandle,
    grant: Option<FormulaId>,
    method: String,
    url: String,
    headers_json: String,
    body: Option<Vec<u8>>,
    timeout_ms: Option<u32>,
) -> Result<Response, String> {
    let Some(id) = grant else {
        return Err(format!(
            "http-request {method} {url}: no http capability was granted (grant one: capstan mkhttp NAME --allow URL-PREFIX, then install … --grant http=NAME)"
        ));
    };
    let spec = match spec_of(agent, id).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(format!(
                "http-request {method} {url}: what was granted as `http` is not an http capability (see capstan mkhttp)"
            ));
        }
        Err(e) => return Err(format!("http-request {method} {url}: {e}")),
    };
    request(&spec, &method, &url, &headers_json, body, timeout_ms).await
}

#[cfg(test)]
mod tests;
