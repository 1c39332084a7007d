//! `capstan graph` and the web console (`capstan start --console`,
//! `capstan console`): the graph in its three formats; the console over
//! plain HTTP (tokens, sessions, CSRF, escaping); and in a real headless
//! Chromium driven through WebDriver (chromedriver): a code proposal made by
//! the LLM agent (its model is the scripted server) is endowed with a click
//! and the agent's answer arrives in the thread without a reload.
//! Screenshots of every page (1280x800 and 390 wide) go to
//! `<target>/console-screenshots/`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capstan_tests::llm_server::{LlmServer, Reply};
use capstan_tests::{Node, texts};
use serde_json::{Value, json};

const KEY: &str = "test-anthropic-key-1f0c9e77aa31";
/// A generous bound for "it happened" (a busy 2-core machine compiles the
/// guests and runs a browser): not a timing check.
const WAIT: Duration = Duration::from_secs(180);

/// A guest component: the one scripts/test's guest phase built into
/// guests/out, else built now (scripts/build-guests).
fn wasm(name: &str) -> String {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guests/out")
        .join(format!("{name}.wasm"));
    if built.exists() {
        built.display().to_string()
    } else {
        capstan_tests::guest_wasm(name)
    }
}

// --- plain HTTP ---------------------------------------------------------------

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    // Read up to the end of the head, then Content-Length bytes (or to
    // the end of the stream when there is none).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut want: Option<usize> = None;
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            if want.is_none() {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                want = Some(
                    head.lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .map_or(usize::MAX, |n| end + 4 + n),
                );
            }
            if raw.len() >= want.unwrap_or(usize::MAX) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // The server may reset after answering an oversized request.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("{method} {addr}{path}: {e}"),
        }
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&b[..nl]).to_string();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
}

/// The console address and a fresh one-time URL's path (`/?token=…`).
fn console_url(node: &Node) -> (String, String) {
    let url = node.ok(["console"]).trim().to_string();
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (addr, path) = rest.split_at(rest.find('/').expect("a path"));
    (addr.to_string(), path.to_string())
}

/// The CSRF token a page carries (`<meta name="csrf-token">`).
fn meta_csrf(html: &str) -> String {
    let m = "name=\"csrf-token\" content=\"";
    let at = html
        .find(m)
        .unwrap_or_else(|| panic!("no csrf-token in {html}"));
    let rest = &html[at + m.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

// --- the graph ----------------------------------------------------------------

#[test]
fn the_graph_shows_holders_grants_values_and_locators_in_json_dot_and_svg() {
    let mut node = Node::new();
    node.start_with(&["--listen", "127.0.0.1:0"]);
    node.ok(["store", "--text", "hello", "--name", "greeting"]);
    node.ok(["mkdir", "docs"]);
    node.ok(["store", "--text", "a note", "--name", "docs.readme"]);
    node.ok(["mkhost", "alice"]);
    node.ok([
        "store", "--text", "alice's", "--name", "diary", "--as", "alice",
    ]);
    let counter = wasm("counter");
    node.ok(["install", counter.as_str(), "--name", "counter"]);
    node.ok([
        "mkguest",
        "bot",
        "--component",
        "counter",
        "--with",
        "note=greeting",
    ]);
    node.ok(["locate", "greeting"]);

    let g = node.json(["graph", "--format", "json"]);
    let nodes = g["nodes"].as_array().expect("nodes");
    let edges = g["edges"].as_array().expect("edges");
    let id = |label: &str| -> String {
        nodes
            .iter()
            .find(|n| n["label"] == label)
            .unwrap_or_else(|| panic!("no node {label}: {g:#}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let kind = |label: &str| {
        nodes.iter().find(|n| n["label"] == label).unwrap()["type"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let has_edge = |from: &str, to: &str, name: &str| {
        edges
            .iter()
            .any(|e| e["from"] == from && e["to"] == to && e["name"] == name)
    };
    let (me, greeting) = (id("SELF"), id("greeting"));
    assert_eq!(g["root"], me.as_str());
    assert_eq!(kind("bot"), "guest");
    assert_eq!(kind("alice"), "host");
    assert_eq!(kind("docs"), "directory");
    assert_eq!(kind("greeting"), "value");
    assert!(has_edge(&me, &greeting, "greeting"), "{g:#}");
    assert!(has_edge(&me, &id("docs"), "docs"), "{g:#}");
    assert!(has_edge(&id("docs"), &id("readme"), "readme"), "{g:#}");
    assert!(has_edge(&id("alice"), &id("diary"), "diary"), "{g:#}");
    // the guest's grant: bot holds greeting as "note"
    assert!(has_edge(&id("bot"), &greeting, "note"), "{g:#}");
    let gnode = nodes.iter().find(|n| n["label"] == "greeting").unwrap();
    assert_eq!(gnode["locators"], 1, "{g:#}");
    assert_eq!(g["locators_out"], 1);
    assert_eq!(g["truncated"], false);
    // every edge joins drawn nodes
    for e in edges {
        for end in ["from", "to"] {
            assert!(nodes.iter().any(|n| n["id"] == e[end]), "{e}");
        }
    }
    // --json is the JSON format
    assert_eq!(node.json(["graph"]), g);

    let dot = node.ok(["graph"]);
    assert!(dot.starts_with("digraph capstan {"), "{dot}");
    for n in nodes {
        assert!(dot.contains(n["id"].as_str().unwrap()), "{dot}");
    }
    assert_eq!(dot.matches(" -> ").count(), edges.len(), "{dot}");
    assert!(
        dot.contains(&format!(
            "\"{}\" -> \"{greeting}\" [label=\"note\"]",
            id("bot")
        )),
        "{dot}"
    );
    assert!(dot.contains("1 locator out"), "{dot}");

    let svg = node.ok(["graph", "--format", "svg"]);
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("class=\"node\"").count(), nodes.len());
    assert_eq!(svg.matches("class=\"edge\"").count(), edges.len());
    for label in [
        "greeting", "bot", "alice", "docs", "readme", "diary", "note",
    ] {
        assert!(
            svg.contains(&format!(">{label}<")),
            "{label} not drawn: {svg}"
        );
    }

    // from one agent: alice's own names
    let a = node.json(["graph", "alice"]);
    assert_eq!(a["root"], id("alice").as_str());
    assert_eq!(a["nodes"].as_array().unwrap().len(), 2, "{a:#}");
    // a value is no place to start
    let (_, e) = node.fail(["graph", "greeting"]);
    assert!(e.contains("names a value"), "{e}");
}

// --- the console ----------------------------------------------------------------

/// A node serving the console, with provider `claude` (the scripted
/// server), the evaluator, and a guest `helper` running llm-agent.
fn console_node(server: &LlmServer) -> Node {
    let mut node = Node::new();
    node.start_with(&["--console", "127.0.0.1:0"]);
    server.require_key(KEY);
    server.add_anthropic(&node, "claude", KEY);
    let agent = wasm("llm-agent");
    node.ok([
        "install",
        agent.as_str(),
        "--name",
        "llm-agent",
        "--grant",
        "llm=claude",
    ]);
    let evaluator = wasm("evaluator");
    node.ok(["install", evaluator.as_str(), "--name", "evaluator"]);
    node.ok(["mkguest", "helper", "--component", "llm-agent"]);
    node
}

fn wait_mail(node: &Node, from: &str, needle: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let inbox = node.inbox(&[]);
        if let Some(m) = inbox.iter().find(|m| {
            m["from"] == from && texts(std::slice::from_ref(*m)).concat().contains(needle)
        }) {
            return m.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no message from {from} containing {needle:?}: {inbox:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const EVIL: &str = "hi <script>window.pwned = 1</script><img src=x onerror=\"window.pwned=2\"> <a href=\"javascript:window.pwned=3\">click</a> capstan://abc/SWISSSECRET?at=1.2.3.4:5";

#[test]
fn the_console_needs_its_token_refuses_forged_posts_and_escapes_mail() {
    let mut node = Node::new();
    let (_, e) = node.fail(["start", "--console", "0.0.0.0:0"]);
    assert!(e.contains("--console-public"), "{e}");
    node.start_with(&["--console", "127.0.0.1:0"]);
    node.ok(["send", "SELF", EVIL]);
    let (addr, path) = console_url(&node);

    // no token, a wrong token, no cookie: 401
    for p in ["/", "/names", "/app.js", "/events", "/graph.svg"] {
        let a = http(&addr, "GET", p, &[], "");
        assert_eq!(a.status, 401, "{p}: {}", a.body);
    }
    let bad = http(
        &addr,
        "GET",
        &format!("/?token={}", "0".repeat(64)),
        &[],
        "",
    );
    assert_eq!(bad.status, 401);
    let forged = http(
        &addr,
        "GET",
        "/",
        &[("Cookie", "capstan_console_1=abc")],
        "",
    );
    assert_eq!(forged.status, 401);
    // the token redeems once; the redirect drops it from the URL
    let first = http(&addr, "GET", &path, &[], "");
    assert_eq!(first.status, 303);
    assert_eq!(first.header("location"), Some("/"));
    let cookie = first
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(http(&addr, "GET", &path, &[], "").status, 401);
    let ck = [("Cookie", cookie.as_str())];

    // a page: the mail escaped, no secret, strict CSP
    let page = http(&addr, "GET", "/", &ck, "");
    assert_eq!(page.status, 200, "{}", page.body);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!page.body.contains("<script>window"), "{}", page.body);
    assert!(!page.body.contains("<img"), "{}", page.body);
    assert!(!page.body.contains("href=\"javascript:"), "{}", page.body);
    assert!(
        page.body
            .contains("&lt;script&gt;window.pwned = 1&lt;/script&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("SWISSSECRET"), "{}", page.body);
    for p in [
        "/names",
        "/guests",
        "/cluster",
        "/graph",
        "/graph.svg",
        "/app.js",
        "/app.css",
    ] {
        let a = http(&addr, "GET", p, &ck, "");
        assert_eq!(a.status, 200, "{p}: {}", a.body);
    }
    // another host's Host header (DNS rebinding) is refused
    let mut evil_host = http(&addr, "GET", "/", &ck, "");
    assert_eq!(evil_host.status, 200);
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: evil.example:80\r\n{}: {}\r\nConnection: close\r\n\r\n",
            ck[0].0, ck[0].1
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        evil_host.body = raw;
    }
    assert!(
        evil_host.body.starts_with("HTTP/1.1 403"),
        "{}",
        evil_host.body
    );

    // POSTs: without the CSRF token, with a wrong one, from another origin: 403
    let origin = format!("http://{addr}");
    let form = [
        ("Cookie", cookie.as_str()),
        ("Origin", origin.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let refuse = "number=0&reason=no";
    let a = http(&addr, "POST", "/refuse", &form, refuse);
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &addr,
        "POST",
        "/refuse",
        &form,
        &format!("{refuse}&csrf={}", "1".repeat(64)),
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let csrf = meta_csrf(&http(&addr, "GET", "/", &ck, "").body);
    let cross = [
        ("Cookie", cookie.as_str()),
        ("Origin", "http://evil.example"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let a = http(
        &addr,
        "POST",
        "/refuse",
        &cross,
        &format!("{refuse}&csrf={csrf}"),
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &addr,
        "POST",
        "/refuse",
        &ck,
        &format!("{refuse}&csrf={csrf}"),
    );
    assert_eq!(a.status, 403, "no Origin: {}", a.body);
    // nothing was sent by any of them
    assert_eq!(node.inbox(&[]).len(), 1);
    // with both, the refusal is the reply `capstan reply` would send
    let fetch = [
        ("Cookie", cookie.as_str()),
        ("Origin", origin.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Capstan-Fetch", "1"),
    ];
    let a = http(
        &addr,
        "POST",
        "/refuse",
        &fetch,
        &format!("number=0&reason=not+now&csrf={csrf}"),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let inbox = node.inbox(&[]);
    assert_eq!(
        texts(&inbox).last().unwrap(),
        "refused: not now",
        "{inbox:#?}"
    );
    assert_eq!(inbox.last().unwrap()["reply_to"], inbox[0]["message_id"]);
    // without the script's header: plain text (a success redirects to the inbox)
    let a = http(
        &addr,
        "POST",
        "/endow",
        &form,
        &format!("number=0&csrf={csrf}"),
    );
    assert_eq!(
        a.status, 400,
        "message 0 is not a proposal for you: {}",
        a.body
    );
    assert!(a.body.contains("one you sent"), "{}", a.body);

    // acting as an agent the root host did not make is refused
    node.ok(["mkhost", "alice"]);
    node.ok(["mkhost", "bob", "--as", "alice"]);
    let a = http(&addr, "GET", "/?as=alice", &ck, "");
    assert_eq!(a.status, 200, "{}", a.body);
    let a = http(&addr, "GET", "/?as=alice.bob", &ck, "");
    assert_eq!(a.status, 403, "{}", a.body);
    // `capstan console --as alice` opens acting as alice
    let url = node.ok(["console", "--as", "alice"]);
    let path = url.trim().split_once(addr.as_str()).unwrap().1.to_string();
    assert!(path.starts_with("/?as=alice&token="), "{url}");
    let a = http(&addr, "GET", &path, &[], "");
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/?as=alice"));

    // an oversized request is not served
    let big = "x".repeat(70 * 1024);
    let a = http(&addr, "POST", "/refuse", &form, &big);
    assert_eq!(a.status, 413);

    // `capstan console` on a node without one says how to get one
    node.stop();
    std::fs::remove_file(node.home().join("console")).unwrap();
    node.start();
    let (_, e) = node.fail(["console"]);
    assert!(e.contains("--console"), "{e}");
}

// --- WebDriver ------------------------------------------------------------------

/// chromedriver (and the Chromium it starts), ended when dropped: the
/// session is deleted, then chromedriver's process group and any process
/// still using this driver's own profile directory are killed.
struct Driver {
    child: Child,
    base: String,
    session: String,
    profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn chromium_binary() -> Option<PathBuf> {
    [
        "/usr/lib/chromium/chromium",
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Driver {
    fn start() -> Option<Driver> {
        let chromium = chromium_binary()?;
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn chromedriver")
        };
        let profile = tempfile::Builder::new()
            .prefix("capstan-console-chromium-")
            .tempdir()
            .unwrap();
        let mut d = Driver {
            child,
            base: format!("127.0.0.1:{port}"),
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(&d.base).is_err() {
            assert!(Instant::now() < deadline, "chromedriver does not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,800",
                         format!("--user-data-dir={}", d.profile.path().display())],
            }
        }}});
        let v = d.raw("POST", "/session", Some(caps));
        d.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Some(d)
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers: &[(&str, &str)] = if method == "POST" {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let a = http(&self.base, method, path, headers, &body);
        let v: Value = serde_json::from_str(&a.body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {}", a.body));
        assert!(
            a.status == 200,
            "WebDriver {method} {path} {body}: {} {}",
            a.status,
            v
        );
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().expect("an element id").to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, script: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.js(script) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen; the page: {}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn size(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    fn screenshot(&self, file: &Path) {
        let v = self.cmd("GET", "/screenshot", None);
        let png = data_encoding::BASE64
            .decode(v.as_str().expect("base64").as_bytes())
            .expect("a base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(file, png).unwrap();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = TcpStream::connect(&self.base).map(|_| {
                http(
                    &self.base,
                    "DELETE",
                    &format!("/session/{}", self.session),
                    &[],
                    "",
                )
            });
        }
        // The child is not reaped until wait(): its pid (= its group) is still ours.
        if let Ok(None) = self.child.try_wait() {
            signal(-(self.child.id() as i32));
        }
        let _ = self.child.wait();
        // Browser processes of this driver's own profile (a unique
        // directory), if any outlived the session and left the group.
        let mark = self.profile.path().display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&mark) {
                    signal(pid);
                }
            }
        }
    }
}

/// SIGKILL to `pid` (negative: a process group).
#[allow(unsafe_code)]
fn signal(pid: i32) {
    assert!(pid != 0 && pid != -1, "refusing to signal {pid}");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn in_a_browser_a_proposal_is_endowed_with_a_click_and_the_answer_arrives_live() {
    if chromium_binary().is_none() {
        // scripts/test installs chromium and chromium-driver (apt).
        panic!("chromium is not installed: apt-get install chromium chromium-driver");
    }
    let server = LlmServer::start();
    let node = console_node(&server);
    node.ok(["store", "--text", "forty-two", "--name", "answer"]);
    node.ok(["send", "SELF", EVIL]);
    node.ok(["send", "helper", "how many messages are in my inbox?"]);
    server.push(Reply::Tools {
        text: "I need to read your inbox.".into(),
        calls: vec![(
            "define_code".into(),
            json!({"source": "// count them\nconst n = reader.inbox().length; n", "slots": {"reader": "an inbox reader <b>bold</b>"}}),
        )],
    });
    let proposal = wait_mail(&node, "helper", "definition: slots");
    let n = proposal["number"].as_u64().unwrap();
    server.push(Reply::text(
        "The answer arrived: <script>window.pwned=4</script>",
    ));

    let Some(d) = Driver::start() else {
        panic!("chromedriver is not installed: apt-get install chromium-driver");
    };
    let (addr, path) = console_url(&node);
    d.go(&format!("http://{addr}{path}"));
    // the token left the address bar
    let here = d.cmd("GET", "/url", None);
    assert_eq!(here, json!(format!("http://{addr}/")));
    d.wait_for(
        "return document.body.dataset.live === 'on'",
        "the live updates starting",
    );
    // the proposal with its code, slot description and picker
    let sel = format!(".proposal[data-number='{n}'] select[name='slot.reader']");
    d.find(&sel);
    let page = d
        .js("return document.body.innerText")
        .as_str()
        .unwrap()
        .to_string();
    assert!(page.contains("const n = reader.inbox().length"), "{page}");
    assert!(page.contains("an inbox reader <b>bold</b>"), "{page}");
    assert!(
        page.contains(&format!(
            "1 code proposal waiting for your decision: message {n}"
        )),
        "{page}"
    );
    // the mail's script, image handler and link did nothing
    assert_eq!(d.js("return typeof window.pwned"), json!("undefined"));
    assert_eq!(
        d.js("return document.querySelectorAll('a[href^=\"javascript:\" i], img, main script').length"),
        json!(0)
    );
    assert!(!page.contains("SWISSSECRET"), "{page}");
    assert!(
        page.contains("<script>window.pwned = 1</script>"),
        "shown as text: {page}"
    );

    std::fs::create_dir_all(screenshots_dir()).unwrap();
    let shots = screenshots_dir();
    d.screenshot(&shots.join("inbox-proposal-1280.png"));

    // pick SELF for the slot, Endow; no reload (a marker survives)
    d.js("window.__capstanMarker = 7; return true");
    d.click(&format!("{sel} option[value='SELF']"));
    d.click(&format!(".proposal[data-number='{n}'] .endow-button"));
    d.wait_for(
        "return document.body.innerText.includes('The answer arrived: <script>window.pwned=4</script>')",
        "the agent's answer arriving in the page",
    );
    assert_eq!(
        d.js("return window.__capstanMarker"),
        json!(7),
        "the page was reloaded"
    );
    assert_eq!(d.js("return typeof window.pwned"), json!("undefined"));
    let status = d.js("return document.getElementById('status').textContent");
    assert!(
        status.as_str().unwrap().contains("endowed message"),
        "{status}"
    );
    // the decision and the answer are in the proposal's thread
    let thread = d.js(&format!(
        "return document.getElementById('m-{n}').closest('.thread').innerText"
    ));
    let thread = thread.as_str().unwrap();
    assert!(thread.contains("result: "), "{thread}");
    assert!(thread.contains("The answer arrived"), "{thread}");
    assert!(thread.contains("answered (message"), "{thread}");
    let page = d.js("return document.body.innerText");
    assert!(
        !page.as_str().unwrap().contains("waiting for your decision"),
        "{page}"
    );
    // exactly what `capstan endow` does: the agent got `result: …`
    let answer = wait_mail(&node, "helper", "The answer arrived");
    assert!(answer["reply_to"].is_string(), "{answer}");
    let (_, e) = node.fail(["endow", &n.to_string(), "--bind", "reader=SELF"]);
    assert!(e.contains("already answered"), "{e}");

    // a POST without the CSRF token, from the page itself, is refused
    let code = d.cmd(
        "POST",
        "/execute/async",
        Some(json!({"script": "const done = arguments[0]; fetch('/refuse', {method: 'POST', body: new URLSearchParams({number: '0'})}).then(r => done(r.status)).catch(e => done(String(e)));", "args": []})),
    );
    assert_eq!(code, json!(403));

    // the selector acts as an agent the root host made, as --as does
    d.go(&format!("http://{addr}/names"));
    d.click("#as-select option[value='helper']");
    d.wait_for(
        "return document.body.dataset.as === 'helper' && location.pathname === '/names'",
        "acting as helper",
    );
    let names = d.js("return document.querySelector('table.names').innerText");
    let names = names.as_str().unwrap();
    assert!(
        names.contains("llm") && names.contains("conversation"),
        "{names}"
    );
    assert!(
        !names.contains("evaluator"),
        "the host's names are not the guest's: {names}"
    );

    // every page, wide and narrow
    for (page, url) in [
        ("inbox", "/"),
        ("names", "/names"),
        ("guests", "/guests"),
        ("cluster", "/cluster"),
        ("graph", "/graph"),
        ("inbox-as-helper", "/?as=helper"),
    ] {
        for (w, h) in [(1280, 800), (390, 844)] {
            d.size(w, h);
            d.go(&format!("http://{addr}{url}"));
            d.wait_for(
                "return document.readyState === 'complete'",
                "the page loading",
            );
            d.screenshot(&shots.join(format!("{page}-{w}.png")));
        }
        if page == "graph" {
            // the picture: the host, the guest and its grant, the values
            let nodes = d.js("return document.querySelectorAll('svg.capstan-graph g.node').length");
            assert!(nodes.as_u64().unwrap() >= 5, "{nodes}");
            let text = d.js("return document.querySelector('svg.capstan-graph').textContent");
            for name in ["helper", "answer", "claude", "evaluator"] {
                assert!(text.as_str().unwrap().contains(name), "{name}: {text}");
            }
        }
    }
}

/// The cluster page of a node in a cluster (a real etcd: needs
/// `CAPSTAN_ETCD_ENDPOINTS`, which the test command sets; skipped without
/// it unless `CAPSTAN_REQUIRE_ETCD=1`): members with their leases, and
/// where the agents live.
#[test]
fn the_cluster_page_shows_members_leases_and_placements() {
    let eps = match std::env::var("CAPSTAN_ETCD_ENDPOINTS") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            assert!(
                std::env::var("CAPSTAN_REQUIRE_ETCD").as_deref() != Ok("1"),
                "CAPSTAN_REQUIRE_ETCD=1 but CAPSTAN_ETCD_ENDPOINTS is not set"
            );
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            return;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let spec = format!("etcd://{eps}/capstan-e2e/console-{nanos}");
    let mut n = Node::named("n1").with_env("CAPSTAN_LEASE_MS", "5000");
    n.json(["cluster", "init", "--store", &spec]);
    n.start_with(&[
        "--store",
        &spec,
        "--listen",
        "127.0.0.1:0",
        "--console",
        "127.0.0.1:0",
    ]);
    n.ok(["mkhost", "alice"]);
    n.ok(["send", "alice", "hello"]);
    let placed = Instant::now() + WAIT;
    while n.json(["cluster", "placement", "alice"])["state"] != "live" {
        assert!(Instant::now() < placed, "alice was never placed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (addr, path) = console_url(&n);
    let first = http(&addr, "GET", &path, &[], "");
    let cookie = first
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = http(&addr, "GET", "/cluster", &[("Cookie", cookie.as_str())], "");
    assert_eq!(page.status, 200, "{}", page.body);
    for needle in [
        "Members and leases",
        "<td>n1</td>",
        "<td>live</td>",
        "expires_in_ms",
        "Placements of your agents",
        "<td>alice</td>",
    ] {
        assert!(page.body.contains(needle), "{needle}: {}", page.body);
    }
    if let Some(d) = Driver::start() {
        let (addr, path) = console_url(&n);
        d.go(&format!("http://{addr}{path}"));
        let shots = screenshots_dir();
        for (w, h) in [(1280, 800), (390, 844)] {
            d.size(w, h);
            d.go(&format!("http://{addr}/cluster"));
            d.wait_for(
                "return document.readyState === 'complete'",
                "the page loading",
            );
            d.screenshot(&shots.join(format!("cluster-in-a-cluster-{w}.png")));
        }
    }
}
