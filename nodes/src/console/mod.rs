//! The web console (`capstan start --console HOST:PORT`, `capstan console`):
//! plain HTTP/1.1 served by the daemon, server-rendered pages (see
//! [`pages`]) and one small vanilla JavaScript file, both embedded in the
//! binary. It acts with the root host's authority, or as an agent the root
//! host made (the `as` parameter of every page: the authority of `--as`).
//!
//! # Access
//!
//! Every request needs a session: `capstan console` mints a one-time token
//! (32 random bytes) and leaves blake3 of it in `<home>/console-tokens/`
//! (the home is private to its user, like the control socket); the first
//! request carrying `?token=…` consumes it (the file is removed), gets an
//! `HttpOnly; SameSite=Strict` session cookie and is redirected to the same
//! page without the token. Anything else without a live session is 401.
//! Buttons are forms posted with the session's CSRF token; a POST also needs
//! an `Origin` naming this console. On a loopback address the `Host` header
//! must name a loopback host (no DNS rebinding). Pages carry a strict
//! Content-Security-Policy: only the console's own script runs.
//!
//! # Bounds
//!
//! At most [`MAX_CONNECTIONS`] connections at once, [`MAX_STREAMS`] of them
//! live-update streams (server-sent events, each at most [`STREAM_LIFETIME`];
//! the browser reconnects); a request head over [`MAX_HEAD`] bytes or a body
//! over [`MAX_BODY`], or a request not complete within [`REQUEST_TIMEOUT`],
//! is dropped; at most [`MAX_SESSIONS`] sessions (the oldest goes).

pub mod pages;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use capstan_actors::{AgentHandle, Runtime};
use capstan_proto::FormulaId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::home::Paths;

/// Most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;
/// Most live-update streams at once (a refused one gets 503).
pub const MAX_STREAMS: usize = 8;
/// How long a live-update stream lasts before the server ends it.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body (a posted form), bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client has to send its request, and to take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most sessions kept.
pub const MAX_SESSIONS: usize = 64;
/// A session unused this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// How long a token from `capstan console` stays redeemable.
pub const TOKEN_LIFETIME_MS: u64 = 10 * 60 * 1000;
/// Tokens waiting to be redeemed (older ones are removed).
const MAX_TOKENS: usize = 64;
/// The file of the home remembering the console address.
const FILE: &str = "console";
/// The directory of the home holding blake3 of the tokens not yet redeemed.
const TOKENS: &str = "console-tokens";

/// Where the daemon serves the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub addr: SocketAddr,
    /// Given with --console-public: a non-loopback address is allowed.
    pub public: bool,
}

impl ConsoleConfig {
    /// Refuses a non-loopback address unless public.
    pub fn check(self) -> anyhow::Result<ConsoleConfig> {
        if !self.public && !self.addr.ip().is_loopback() {
            bail!(
                "--console {} is not a loopback address: whoever reaches it could try to use this node's agents; use 127.0.0.1:PORT (or [::1]:PORT), or add --console-public",
                self.addr
            );
        }
        Ok(self)
    }
}

/// `start --console HOST:PORT [--console-public]` as given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub addr: Option<SocketAddr>,
    pub public: bool,
}

impl Flags {
    /// The same flags for the `start --foreground` that `start` spawns.
    pub fn args(self, cmd: &mut std::process::Command) {
        if let Some(a) = self.addr {
            cmd.arg("--console").arg(a.to_string());
        }
        if self.public {
            cmd.arg("--console-public");
        }
    }
}

/// Binds `cfg.addr`, remembers the bound address in the home and serves
/// the console there (a task of the local set).
pub async fn serve_on(
    cfg: ConsoleConfig,
    runtime: Runtime,
    paths: &Paths,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let l = bind(cfg).await?;
    let cfg = bound(&l, cfg)?;
    remember(paths, cfg)?;
    tracing::info!(addr = %cfg.addr, "console at http://{}/ (`capstan console` prints a URL with a token)", cfg.addr);
    Ok(spawn(l, Rc::new(Console::new(runtime, paths.clone(), cfg))))
}

/// What the daemon serves the console on: the address given (checked), else
/// the one an earlier start left in the home.
pub fn config(
    paths: &Paths,
    given: Option<SocketAddr>,
    public: bool,
) -> anyhow::Result<Option<ConsoleConfig>> {
    crate::served::choose(paths, FILE, "--console", given, public)?
        .map(|(addr, public)| ConsoleConfig { addr, public }.check())
        .transpose()
}

fn remembered(paths: &Paths) -> anyhow::Result<Option<ConsoleConfig>> {
    Ok(crate::served::remembered(paths, FILE, "--console")?
        .map(|(addr, public)| ConsoleConfig { addr, public }))
}

/// Remembers the bound address (and public mark) for later starts.
pub fn remember(paths: &Paths, cfg: ConsoleConfig) -> anyhow::Result<()> {
    crate::served::remember(paths, FILE, cfg.addr, cfg.public)
}

/// The console address the home remembers (a started daemon serves it).
pub fn serving(paths: &Paths) -> Option<SocketAddr> {
    remembered(paths).ok().flatten().map(|c| c.addr)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("operating system random generator failed");
    hex::encode(b)
}

/// Mints a one-time token for the console of `paths`' daemon and returns
/// the URL that redeems it. The token itself is not stored, only blake3 of it.
/// With `as_agent`, the URL opens the console acting as that agent.
pub fn mint_url(paths: &Paths, addr: SocketAddr, as_agent: Option<&str>) -> anyhow::Result<String> {
    let dir = paths.home.join(TOKENS);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    // Expired tokens, and the oldest past MAX_TOKENS, are removed.
    let now = now_ms();
    let mut live: Vec<(u64, std::path::PathBuf)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            let exp = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            match exp {
                Some(t) if t > now => live.push((t, p)),
                _ => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
    live.sort();
    while live.len() >= MAX_TOKENS {
        let (_, p) = live.remove(0);
        let _ = std::fs::remove_file(p);
    }
    let token = random_hex(32);
    let file = dir.join(blake3::hash(token.as_bytes()).to_hex().as_str());
    std::fs::write(&file, format!("{}\n", now + TOKEN_LIFETIME_MS))
        .map_err(|e| anyhow!("cannot write {}: {e}", file.display()))?;
    Ok(match as_agent {
        Some(a) => format!("http://{addr}/?as={}&token={token}", percent_encode(a)),
        None => format!("http://{addr}/?token={token}"),
    })
}

/// Redeems `token` once: true when it was minted and has not expired.
fn redeem(home: &std::path::Path, token: &str) -> bool {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let file = home
        .join(TOKENS)
        .join(blake3::hash(token.as_bytes()).to_hex().as_str());
    let Ok(text) = std::fs::read_to_string(&file) else {
        return false;
    };
    // Removed first: a token works once even when two requests race.
    if std::fs::remove_file(&file).is_err() {
        return false;
    }
    text.trim().parse::<u64>().is_ok_and(|t| t > now_ms())
}

/// A browser session.
struct Session {
    csrf: String,
    created: Instant,
    used: Instant,
}

/// What the console serves from.
pub struct Console {
    pub runtime: Runtime,
    pub paths: Paths,
    pub cfg: ConsoleConfig,
    sessions: RefCell<HashMap<String, Session>>,
    streams: Arc<Semaphore>,
    /// Per agent, the number the inbox window last began at.
    inbox_starts: RefCell<HashMap<FormulaId, u64>>,
}

impl Console {
    pub fn new(runtime: Runtime, paths: Paths, cfg: ConsoleConfig) -> Console {
        Console {
            runtime,
            paths,
            cfg,
            sessions: RefCell::new(HashMap::new()),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            inbox_starts: RefCell::new(HashMap::new()),
        }
    }

    /// Where reading `agent`'s inbox for a page starts (0: the first time).
    pub fn inbox_start(&self, agent: FormulaId) -> u64 {
        self.inbox_starts.borrow().get(&agent).copied().unwrap_or(0)
    }

    pub fn set_inbox_start(&self, agent: FormulaId, from: u64) {
        let mut m = self.inbox_starts.borrow_mut();
        if m.len() >= MAX_SESSIONS * 16 && !m.contains_key(&agent) {
            m.clear();
        }
        m.insert(agent, from);
    }

    fn cookie_name(&self) -> String {
        format!("capstan_console_{}", self.cfg.addr.port())
    }

    /// A new session: (id, csrf).
    fn open_session(&self) -> String {
        let mut s = self.sessions.borrow_mut();
        s.retain(|_, v| v.used.elapsed() < SESSION_IDLE);
        while s.len() >= MAX_SESSIONS {
            let oldest = s
                .iter()
                .min_by_key(|(_, v)| v.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => s.remove(&k),
                None => break,
            };
        }
        let id = random_hex(32);
        s.insert(
            id.clone(),
            Session {
                csrf: random_hex(32),
                created: Instant::now(),
                used: Instant::now(),
            },
        );
        id
    }

    /// The CSRF token of the live session `id`.
    fn session(&self, id: &str) -> Option<String> {
        let mut s = self.sessions.borrow_mut();
        let live = s.get(id).is_some_and(|v| v.used.elapsed() < SESSION_IDLE);
        if !live {
            s.remove(id);
            return None;
        }
        let v = s.get_mut(id)?;
        v.used = Instant::now();
        Some(v.csrf.clone())
    }

    /// The agent the console acts as: the root host, or `path` (an agent
    /// the root host made: the authority of `--as`).
    pub async fn acting(&self, path: &str) -> anyhow::Result<AgentHandle> {
        let root = self.runtime.root_host();
        if path.is_empty() {
            Ok(root)
        } else {
            Ok(root.agent(path).await?)
        }
    }
}

/// Binds `cfg.addr`; errors name the address.
pub async fn bind(cfg: ConsoleConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| anyhow!("cannot serve the console on {}: {e}", cfg.addr))
}

/// The address a listener bound (port 0 resolved).
pub fn bound(listener: &TcpListener, cfg: ConsoleConfig) -> anyhow::Result<ConsoleConfig> {
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow!("cannot read the console address: {e}"))?;
    Ok(ConsoleConfig { addr, ..cfg })
}

/// Serves `listener` on the local task set until the task is aborted.
pub fn spawn(listener: TcpListener, console: Rc<Console>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let c = console.clone();
                        tokio::task::spawn_local(async move {
                            serve(stream, &c).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        debug!(%peer, "{MAX_CONNECTIONS} console connections open; closing one")
                    }
                },
                Err(e) => {
                    warn!("console accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A parsed request.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// A response.
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(code: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            code,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn text(code: u16, body: &str) -> Response {
        Response::new(code, "text/plain; charset=utf-8", format!("{body}\n"))
    }
    pub fn html(body: String) -> Response {
        Response::new(200, "text/html; charset=utf-8", body)
    }
    pub fn redirect(to: &str) -> Response {
        let mut r = Response::text(303, "see other");
        r.headers.push(("Location".into(), to.to_string()));
        r
    }
    fn head(&self) -> String {
        let reason = match self.code {
            200 => "OK",
            303 => "See Other",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut h = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nX-Frame-Options: DENY\r\nContent-Security-Policy: {CSP}\r\n",
            self.code, self.content_type
        );
        for (k, v) in &self.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h
    }
}

/// Only the console's own script and style; nothing inline, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Reads the head (through its blank line) and the body (Content-Length).
async fn read_request(stream: &mut TcpStream) -> Result<Request, u16> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await.map_err(|_| 0u16)?;
        if n == 0 {
            return Err(0);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(413);
        }
    };
    if end > MAX_HEAD {
        return Err(413);
    }
    let head = String::from_utf8(buf[..end].to_vec()).map_err(|_| 400u16)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(400);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: parse_form(query),
        ..Default::default()
    };
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or(400u16)?;
        req.headers
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = match req.header("content-length") {
        Some(v) => v.parse().map_err(|_| 400u16)?,
        None => 0,
    };
    if req.header("transfer-encoding").is_some() {
        return Err(400);
    }
    if len > MAX_BODY {
        return Err(413);
    }
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.map_err(|_| 0u16)?;
        if n == 0 {
            return Err(0);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    req.body = body;
    Ok(req)
}

/// `application/x-www-form-urlencoded` pairs (also a query string).
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query or form value, percent-encoded (all but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the Host header names this console (loopback consoles only
/// answer loopback names: a DNS-rebinding page cannot reach them).
fn host_ok(c: &Console, req: &Request) -> bool {
    if c.cfg.public {
        return true;
    }
    let Some(host) = req.header("host") else {
        return false;
    };
    let port = c.cfg.addr.port().to_string();
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    p == port && matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

/// One connection: one request, one answer (or one event stream), closed.
async fn serve(mut stream: TcpStream, c: &Rc<Console>) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(0)) | Err(_) => return,
        Ok(Err(code)) => {
            let _ = write_response(&mut stream, Response::text(code, "bad request")).await;
            return;
        }
    };
    let response = match authorize(c, &req) {
        Err(r) => r,
        Ok(Auth::Redirect(r)) => r,
        Ok(Auth::Session { csrf }) => {
            if req.method == "GET" && req.path == "/events" {
                stream_events(stream, c, &req).await;
                return;
            }
            pages::route(c, &req, &csrf).await
        }
    };
    if let Err(e) = write_response(&mut stream, response).await {
        debug!("console response not sent: {e}");
    }
}

async fn write_response(stream: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let mut out = r.head();
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&r.body).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

enum Auth {
    Session { csrf: String },
    Redirect(Response),
}

/// Checks the Host, the session (or redeems a token), and for a POST the
/// Origin and CSRF token.
fn authorize(c: &Console, req: &Request) -> Result<Auth, Response> {
    if !host_ok(c, req) {
        return Err(Response::text(
            403,
            "forbidden: this console answers only to its own address",
        ));
    }
    if let Some(token) = req.param("token") {
        if req.method != "GET" || !redeem(&c.paths.home, token) {
            return Err(Response::text(
                401,
                "unauthorized: this token is unknown, used or expired; run `capstan console` for a new URL",
            ));
        }
        let id = c.open_session();
        let rest: Vec<String> = req
            .query
            .iter()
            .filter(|(k, _)| k != "token")
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        let to = if rest.is_empty() {
            req.path.clone()
        } else {
            format!("{}?{}", req.path, rest.join("&"))
        };
        let mut r = Response::redirect(&to);
        r.headers.push((
            "Set-Cookie".into(),
            format!(
                "{}={id}; HttpOnly; SameSite=Strict; Path=/",
                c.cookie_name()
            ),
        ));
        return Ok(Auth::Redirect(r));
    }
    let csrf = req
        .cookie(&c.cookie_name())
        .and_then(|id| c.session(&id))
        .ok_or_else(|| {
            Response::text(
                401,
                "unauthorized: open the URL printed by `capstan console` (its token is used once)",
            )
        })?;
    match req.method.as_str() {
        "GET" => {}
        "POST" => {
            let host = req.header("host").unwrap_or("");
            // https too: a public console may sit behind a TLS proxy.
            let origin_ok = req.header("origin").is_some_and(|o| {
                !host.is_empty()
                    && (o == format!("http://{host}") || o == format!("https://{host}"))
            });
            if !origin_ok {
                return Err(Response::text(
                    403,
                    "forbidden: a POST must come from the console's own pages (Origin)",
                ));
            }
            let form = parse_form(&String::from_utf8_lossy(&req.body));
            let sent = form.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v);
            if sent.is_none_or(|s| !constant_eq(s.as_bytes(), csrf.as_bytes())) {
                return Err(Response::text(
                    403,
                    "forbidden: the form's CSRF token is missing or wrong; reload the page",
                ));
            }
        }
        _ => return Err(Response::text(405, "method not allowed")),
    }
    Ok(Auth::Session { csrf })
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /events?as=PATH&after=N`: a server-sent event `mail` (data: its
/// number) for each message of the acting agent's inbox numbered N or above.
async fn stream_events(mut stream: TcpStream, c: &Rc<Console>, req: &Request) {
    let Ok(_permit) = c.streams.clone().try_acquire_owned() else {
        let _ = write_response(
            &mut stream,
            Response::text(503, "too many live streams; try again"),
        )
        .await;
        return;
    };
    let who = req.param("as").unwrap_or("");
    let after: u64 = req.param("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let mut rx = match c.acting(who).await {
        Ok(h) => match h.follow(after).await {
            Ok(rx) => rx,
            Err(e) => {
                let _ = write_response(&mut stream, Response::text(400, &e.to_string())).await;
                return;
            }
        },
        Err(e) => {
            let _ = write_response(&mut stream, Response::text(400, &format!("{e:#}"))).await;
            return;
        }
    };
    let head = Response::new(200, "text/event-stream", Vec::new()).head();
    let head = format!("{head}Connection: close\r\n\r\nretry: 2000\n\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let end = tokio::time::Instant::now() + STREAM_LIFETIME;
    loop {
        let ev = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => format!("event: mail\ndata: {}\n\n", m.number),
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(15)) => ": ping\n\n".to_string(),
            _ = tokio::time::sleep_until(end) => return,
        };
        let w = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(ev.as_bytes())).await;
        if !matches!(w, Ok(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_encoding() {
        assert_eq!(
            parse_form("a=1&b=x+y%3Cz&c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y<z".into()),
                ("c".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
        assert_eq!(percent_encode("a.b c&"), "a.b%20c%26");
        assert!(constant_eq(b"ab", b"ab"));
        assert!(!constant_eq(b"ab", b"ac"));
    }

    #[test]
    fn loopback_only_unless_public() {
        let c = |a: &str, public| ConsoleConfig {
            addr: a.parse().unwrap(),
            public,
        };
        assert!(c("127.0.0.1:0", false).check().is_ok());
        let e = c("0.0.0.0:0", false).check().unwrap_err().to_string();
        assert!(e.contains("--console-public"), "{e}");
        assert!(c("0.0.0.0:0", true).check().is_ok());
    }
}
