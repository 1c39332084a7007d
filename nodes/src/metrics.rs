//! The daemon's Prometheus endpoint (`capstan start --metrics HOST:PORT`):
//! `GET /metrics` over plain HTTP/1.1, text exposition format 0.0.4, read
//! from the daemon's own state at each request (nothing is sampled in the
//! background). One request per connection (`Connection: close`).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are closed
//! unanswered); a request head over [`MAX_REQUEST`] bytes, or not complete
//! within [`REQUEST_TIMEOUT`], is dropped; at most [`MAX_GUESTS`] guests are
//! listed, and a response body stays under [`MAX_BODY`] bytes.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use capstan_actors::Runtime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::home::Paths;
use crate::net::Net;

/// Most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers), bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request, and to take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most guests listed (`capstan_guest_*`); `capstan_guests` counts them all.
pub const MAX_GUESTS: usize = 1000;
/// Largest response body, bytes: guests past it are left out.
pub const MAX_BODY: usize = 1 << 20;
/// How long a request waits for the store to list the guests; past it the
/// guest families are left out of the answer.
pub const GUESTS_TIMEOUT: Duration = Duration::from_secs(1);
/// The file of the home remembering the metrics address.
const FILE: &str = "metrics";

/// Where the daemon serves metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub addr: SocketAddr,
    /// Given with --metrics-public: a non-loopback address is allowed.
    pub public: bool,
}

impl MetricsConfig {
    /// Refuses a non-loopback address unless public.
    pub fn check(self) -> anyhow::Result<MetricsConfig> {
        if !self.public && !self.addr.ip().is_loopback() {
            bail!(
                "--metrics {} is not a loopback address: anyone who reaches it reads this node's counters and guest names; use 127.0.0.1:PORT (or [::1]:PORT), or add --metrics-public",
                self.addr
            );
        }
        Ok(self)
    }
}

/// The URL of the endpoint at `addr`.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

/// What the daemon serves metrics on: the address given (checked), else the
/// one an earlier start left in the home. `--metrics-public` alone applies to
/// a remembered address, and is refused when there is none.
pub fn config(
    paths: &Paths,
    given: Option<SocketAddr>,
    public: bool,
) -> anyhow::Result<Option<MetricsConfig>> {
    crate::served::choose(paths, FILE, "--metrics", given, public)?
        .map(|(addr, public)| MetricsConfig { addr, public }.check())
        .transpose()
}

/// The address (and public mark) an earlier `--metrics` left in the home.
fn remembered(paths: &Paths) -> anyhow::Result<Option<MetricsConfig>> {
    Ok(crate::served::remembered(paths, FILE, "--metrics")?
        .map(|(addr, public)| MetricsConfig { addr, public }))
}

/// Remembers the bound address (and public mark) for later starts.
pub fn remember(paths: &Paths, cfg: MetricsConfig) -> anyhow::Result<()> {
    crate::served::remember(paths, FILE, cfg.addr, cfg.public)
}

/// The URL a started daemon serves metrics on, as the home remembers it.
pub fn serving(paths: &Paths) -> Option<String> {
    remembered(paths).ok().flatten().map(|c| url(c.addr))
}

/// What the metrics are read from.
pub struct Sources {
    pub runtime: Runtime,
    pub net: Rc<Net>,
    pub started: Instant,
    /// The control socket's connection permits (open = max − available).
    pub control: Arc<Semaphore>,
    pub control_max: usize,
}

/// Binds `cfg.addr`; errors name the address.
pub async fn bind(cfg: MetricsConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| anyhow!("cannot serve metrics on {}: {e}", cfg.addr))
}

/// Serves `listener` on the local task set until the task is aborted.
pub fn spawn(listener: TcpListener, src: Rc<Sources>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let src = src.clone();
                        tokio::task::spawn_local(async move {
                            serve(stream, &src).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        debug!(%peer, "{MAX_CONNECTIONS} metrics connections open; closing one")
                    }
                },
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// One connection: one request, one answer, closed.
async fn serve(mut stream: TcpStream, src: &Sources) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(h)) => h,
        // Too large, too slow, or closed early: dropped unanswered.
        Ok(None) | Err(_) => return,
    };
    let response = match route(&head) {
        Route::Metrics => {
            let body = render(src).await;
            response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", &body)
        }
        Route::NotFound => response(404, "Not Found", "text/plain", "not found: GET /metrics\n"),
        Route::NotAllowed => response(
            405,
            "Method Not Allowed",
            "text/plain",
            "method not allowed: GET /metrics\n",
        ),
        Route::Bad => response(400, "Bad Request", "text/plain", "bad request\n"),
    };
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        debug!("metrics response not sent: {e}");
    }
}

/// The request head (up to the blank line), or None when the client closed
/// first or it is over [`MAX_REQUEST`] bytes.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end(&buf) {
            return (end <= MAX_REQUEST).then(|| String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
}

/// The length of the head through its blank line, if complete.
fn find_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
    Bad,
}

fn route(head: &str) -> Route {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Route::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        (_, "/metrics") => Route::NotAllowed,
        _ => Route::NotFound,
    }
}

fn response(code: u16, reason: &str, content_type: &str, body: &str) -> String {
    let allow = if code == 405 { "Allow: GET\r\n" } else { "" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The exposition text being written.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(&sample_line(name, labels, value));
    }
    /// A family of one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn sample_line(name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) -> String {
    let mut s = String::from(name);
    if !labels.is_empty() {
        s.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{k}=\"{}\"", escape_label(v));
        }
        s.push('}');
    }
    let _ = writeln!(s, " {value}");
    s
}

/// A label value escaped for the text format (`\\`, `\"`, `\n`).
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A store counter's name as a metric name part (`[a-z0-9_]`).
fn metric_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The metrics, read now.
async fn render(src: &Sources) -> String {
    let mut t = Text(String::with_capacity(4096));
    t.family(
        "capstan_build_info",
        "gauge",
        "The capstan version this node runs (always 1).",
    );
    t.sample(
        "capstan_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    t.one(
        "capstan_process_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        format!("{:.3}", src.started.elapsed().as_secs_f64()),
    );
    t.one(
        "capstan_incarnations",
        "gauge",
        "Live incarnations (agents and guests in memory) on this node.",
        src.runtime.incarnations(),
    );
    t.one(
        "capstan_control_connections",
        "gauge",
        "Open connections on the control socket (CLI clients).",
        src.control_max
            .saturating_sub(src.control.available_permits()),
    );
    t.one(
        "capstan_node_connections",
        "gauge",
        "Open QUIC connections to and from other nodes.",
        src.net.connections(),
    );
    t.one(
        "capstan_peer_clusters",
        "gauge",
        "Other clusters with a connection entry (entries of peers that left are dropped).",
        src.net.peer_count(),
    );

    // The store's own counters (those of `capstan cluster status`).
    for (name, value) in src.runtime.db().store().stats() {
        let metric = format!("capstan_store_{}_total", metric_part(name));
        t.one(
            &metric,
            "counter",
            &format!("Store counter `{name}` since the node started."),
            value,
        );
    }

    if let Some(c) = src.runtime.membership() {
        use std::sync::atomic::Ordering::Relaxed;
        t.one(
            "capstan_cluster_members_live",
            "gauge",
            "Live cluster members seen at this node's last lease renewal (itself included).",
            c.members().len(),
        );
        t.one(
            "capstan_cluster_serving",
            "gauge",
            "1 while this node holds its cluster lease.",
            u8::from(c.serving()),
        );
        t.one(
            "capstan_cluster_draining",
            "gauge",
            "1 while this node is draining.",
            u8::from(c.draining()),
        );
        t.one(
            "capstan_cluster_epoch",
            "gauge",
            "This node's membership epoch.",
            c.epoch(),
        );
        t.one(
            "capstan_cluster_lease_renewals_total",
            "counter",
            "Lease renewals that succeeded.",
            c.renewals.load(Relaxed),
        );
        t.one(
            "capstan_cluster_lease_renewal_failures_total",
            "counter",
            "Lease renewals that failed (store error or timeout).",
            c.renewal_failures.load(Relaxed),
        );
        t.one(
            "capstan_cluster_delivery_wakeups_sent_total",
            "counter",
            "Wake-ups for committed messages sent to other members (one per member told).",
            c.deliveries_sent.load(Relaxed),
        );
        t.one(
            "capstan_cluster_delivery_wakeups_received_total",
            "counter",
            "Wake-ups for committed messages received from other members.",
            c.deliveries_received.load(Relaxed),
        );
        t.one(
            "capstan_cluster_reserve_calls_total",
            "counter",
            "Reservations of inbox numbers asked of a remote owner.",
            c.reserve_calls.load(Relaxed),
        );
        t.one(
            "capstan_cluster_reserve_refused_total",
            "counter",
            "Reservations asked of a remote owner that it refused (not the owner any more, or failing).",
            c.reserve_refused.load(Relaxed),
        );
        t.one(
            "capstan_cluster_reserve_microseconds_total",
            "counter",
            "Time the reservations asked of a remote owner took until answered, in µs summed.",
            c.reserve_us.load(Relaxed),
        );
        t.one(
            "capstan_cluster_wake_calls_total",
            "counter",
            "Wake calls made to other members (each carries many wake-ups).",
            c.wake_calls.load(Relaxed),
        );
        t.one(
            "capstan_cluster_stepdowns_total",
            "counter",
            "Times this node lost its lease and stepped down.",
            c.stepdowns.load(Relaxed),
        );
        t.one(
            "capstan_cluster_fenced_writes_total",
            "counter",
            "Writes refused because this node no longer owned the formula.",
            c.fenced.load(Relaxed),
        );
    }

    // The guests are read from the store: a node cut off from its store
    // still answers with the rest (its lease and serving state matter most
    // then) instead of waiting for the store's own retries.
    let guests = tokio::time::timeout(GUESTS_TIMEOUT, src.runtime.root_host().guests()).await;
    match guests {
        Err(_) => debug!("metrics: the store did not list the guests within {GUESTS_TIMEOUT:?}"),
        Ok(Err(e)) => debug!("metrics: cannot list the guests: {e}"),
        Ok(Ok(guests)) => {
            t.one(
                "capstan_guests",
                "gauge",
                "Guest agents with a component body.",
                guests.len(),
            );
            // Both lines of a guest, for the guests that fit.
            let mut handled = String::new();
            let mut failures = String::new();
            let budget = MAX_BODY.saturating_sub(t.0.len() + 1024);
            let mut listed = 0usize;
            for g in guests.iter().take(MAX_GUESTS) {
                let h = sample_line(
                    "capstan_guest_handled_total",
                    &[("guest", &g.name)],
                    g.handled,
                );
                let f = sample_line(
                    "capstan_guest_failures_total",
                    &[("guest", &g.name)],
                    g.failures,
                );
                if handled.len() + failures.len() + h.len() + f.len() > budget {
                    break;
                }
                handled.push_str(&h);
                failures.push_str(&f);
                listed += 1;
            }
            t.one(
                "capstan_guests_listed",
                "gauge",
                &format!(
                    "Guests listed below (at most {MAX_GUESTS}, and what fits in {MAX_BODY} bytes)."
                ),
                listed,
            );
            t.family(
                "capstan_guest_handled_total",
                "counter",
                "Messages a guest handled on this node since it started.",
            );
            t.0.push_str(&handled);
            t.family(
                "capstan_guest_failures_total",
                "counter",
                "Messages (or channel calls) that stopped a guest on this node since it started (a trap, a limit broken).",
            );
            t.0.push_str(&failures);
        }
    }
    t.0
}

/// The address a listener bound (port 0 resolved).
pub fn bound(listener: &TcpListener, cfg: MetricsConfig) -> anyhow::Result<MetricsConfig> {
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow!("cannot read the metrics address: {e}"))?;
    Ok(MetricsConfig { addr, ..cfg })
}

/// This process's resident memory (`VmRSS` of /proc/self/status), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route("GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(route("garbage"), Route::Bad);
    }

    #[test]
    fn lines_and_escapes() {
        assert_eq!(
            sample_line("m", &[("guest", "a\"b\\c\nd")], 3),
            "m{guest=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
        assert_eq!(sample_line("m", &[], 1), "m 1\n");
        assert_eq!(metric_part("read_us"), "read_us");
        assert_eq!(metric_part("A-b"), "a_b");
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn loopback_only_unless_public() {
        let c = |a: &str, public| MetricsConfig {
            addr: a.parse().unwrap(),
            public,
        };
        assert!(c("127.0.0.1:0", false).check().is_ok());
        assert!(c("[::1]:9464", false).check().is_ok());
        let e = c("0.0.0.0:0", false).check().unwrap_err().to_string();
        assert!(e.contains("--metrics-public"), "{e}");
        assert!(c("0.0.0.0:0", true).check().is_ok());
    }
}
