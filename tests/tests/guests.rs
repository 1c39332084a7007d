//! Guests as WebAssembly components, end to end: real `capstan` daemons
//! running real components built from guests/ by scripts/build-guests.

use std::time::{Duration, Instant};

use capstan_tests::{Node, guest_wasm, texts};
use serde_json::Value;

/// How long a test waits for a guest's mail before giving up (a generous
/// bound for a debug build on a busy 2-core machine; not a timing check).
const MAIL_TIMEOUT: Duration = Duration::from_secs(120);

fn wasm(name: &str) -> String {
    guest_wasm(name)
}

/// Waits until the root host's inbox has a message from `from` whose text
/// contains `needle`; returns that text.
fn wait_mail(node: &Node, from: &str, needle: &str) -> String {
    let deadline = Instant::now() + MAIL_TIMEOUT;
    loop {
        let inbox = node.inbox(&[]);
        for m in &inbox {
            let text = texts(std::slice::from_ref(m)).concat();
            if m["from"].as_str() == Some(from) && text.contains(needle) {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no message from {from} containing {needle:?}; inbox: {inbox:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count_mail(node: &Node, from: &str, needle: &str) -> usize {
    node.inbox(&[])
        .iter()
        .filter(|m| {
            m["from"].as_str() == Some(from)
                && texts(std::slice::from_ref(*m)).concat().contains(needle)
        })
        .count()
}

fn install(node: &Node, file: &str, name: &str, grants: &[&str]) -> Value {
    let path = wasm(file);
    let mut args = vec!["install", path.as_str(), "--name", name];
    for g in grants {
        args.push("--grant");
        args.push(g);
    }
    node.json(args)
}

fn guest(node: &Node, name: &str) -> Value {
    let v = node.json(["guests"]);
    v.as_array()
        .expect("guests --json is an array")
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("guest {name} not listed: {v}"))
}

#[test]
fn counter_answers_by_mail_and_survives_kill_9() {
    let mut node = Node::started();
    let info = install(&node, "counter", "counter", &[]);
    assert_eq!(info["world"], "capstan:agent/agent@0.1.0");
    assert!(
        info["exports"]
            .as_array()
            .unwrap()
            .contains(&Value::from("on-message"))
    );
    assert_eq!(info["hash"].as_str().unwrap().len(), 64);
    node.ok(["mkguest", "bot", "--component", "counter"]);

    node.ok(["send", "bot", "increment"]);
    wait_mail(&node, "bot", "count = 1");
    node.ok(["send", "bot", "increment"]);
    wait_mail(&node, "bot", "count = 2");
    let g = guest(&node, "bot");
    assert_eq!(g["handled"], 2, "{g}");
    assert_eq!(g["failures"], 0, "{g}");
    assert_eq!(g["state"], "idle", "{g}");
    assert!(g["fuel_last"].as_u64().unwrap() > 0, "{g}");
    assert!(g["memory_peak"].as_u64().unwrap() > 0, "{g}");
    let table = node.ok(["guests"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("bot "))
        .unwrap_or_else(|| panic!("no row for bot:\n{table}"));
    assert!(row.contains("idle"), "{table}");

    node.kill9();
    node.start();
    node.ok(["send", "bot", "increment"]);
    let t = wait_mail(&node, "bot", "count = 3");
    assert_eq!(t, "count = 3");
    // the count is the guest's own stored value
    assert_eq!(node.ok(["cat", "--as", "bot", "count"]).trim(), "3");
    // exactly once: one answer per increment
    assert_eq!(count_mail(&node, "bot", "count = "), 3);
}

/// Rounds of work `increment slowly` does between storing the count and
/// replying: a few seconds, so the test can kill the node in between.
const SLOW_ROUNDS: &str = "1500000000";

/// A handler cut short by `kill -9` between its effects (the count stored,
/// the host told, no reply yet) runs again after the restart, and its
/// effects are not repeated: the count is 1 not 2, the host was told once,
/// and the one answer says `count = 1`.
#[test]
fn a_handler_cut_short_by_kill_9_is_not_repeated() {
    let mut node = Node::started();
    install(&node, "counter", "counter", &[]);
    node.ok([
        "mkguest",
        "bot",
        "--component",
        "counter",
        "--fuel",
        "100000000000",
        "--deadline-ms",
        "60000",
    ]);
    node.ok(["send", "bot", &format!("increment slowly {SLOW_ROUNDS}")]);
    wait_mail(&node, "bot", "stored count 1; working");
    let g = guest(&node, "bot");
    assert_eq!(g["handled"], 0, "the handler finished before the kill: {g}");
    node.kill9();
    node.start();
    let t = wait_mail(&node, "bot", "count = ");
    assert_eq!(t, "count = 1");
    assert_eq!(node.ok(["cat", "--as", "bot", "count"]).trim(), "1");
    assert_eq!(count_mail(&node, "bot", "stored count"), 1);
    assert_eq!(count_mail(&node, "bot", "count = "), 1);
    // and the guest goes on from there
    node.ok(["send", "bot", "increment"]);
    wait_mail(&node, "bot", "count = 2");
    assert_eq!(count_mail(&node, "bot", "count = "), 2);
}

#[test]
fn echo_tool_runs_in_ironclaws_contract() {
    let node = Node::started();
    let info = install(&node, "echo-tool", "echo-tool", &[]);
    assert_eq!(info["world"], "capstan:tool/sandboxed-tool@0.1.0");
    let v = node.json(["run", "echo-tool", "--input", r#"{"text":"hi"}"#]);
    assert_eq!(v["output"]["echo"], "hi", "{v}");
    assert_eq!(v["output"]["length"], 2, "{v}");
    assert_eq!(
        node.ok(["run", "echo-tool", "--input", r#"{"text":"héllo"}"#])
            .trim(),
        r#"{"echo":"héllo","length":5}"#
    );
    // the tool's own error, bad JSON, unknown names, the wrong world: clear errors
    let (_, e) = node.fail(["run", "echo-tool", "--input", r#"{"other":1}"#]);
    assert!(e.contains("the tool failed: expected parameters"), "{e}");
    let (_, e) = node.fail(["run", "echo-tool", "--input", "{not json"]);
    assert!(e.contains("not valid JSON"), "{e}");
    let (_, e) = node.fail(["run", "nothing-here", "--input", "{}"]);
    assert!(e.contains("unknown name"), "{e}");
    install(&node, "counter", "counter", &[]);
    let (_, e) = node.fail(["run", "counter", "--input", "{}"]);
    assert!(e.contains("not a tool"), "{e}");
    let (_, e) = node.fail(["mkguest", "t", "--component", "echo-tool"]);
    assert!(
        e.contains("a guest agent needs capstan:agent/agent@0.1.0"),
        "{e}"
    );
    node.ok(["store", "--text", "just text", "--name", "plain"]);
    let (_, e) = node.fail(["mkguest", "p", "--component", "plain"]);
    assert!(e.contains("not an installed component"), "{e}");
    assert!(!node.names(&[]).contains("p"));
}

#[test]
fn summarizer_reads_a_granted_value_and_mails_its_host() {
    let node = Node::started();
    node.ok([
        "store",
        "--text",
        "Capstan notes\nguests are components\nthey hold only what they were given",
        "--name",
        "shared-docs",
    ]);
    let info = install(&node, "summarizer", "summarizer", &["doc=shared-docs"]);
    assert_eq!(info["grants"], serde_json::json!(["doc"]));
    node.ok(["mkguest", "summ", "--component", "summarizer"]);
    // the grant is the guest's name `doc`: its only power besides its own names
    assert!(node.names(&["--as", "summ"]).contains("doc"));
    node.ok(["send", "summ", "please summarize"]);
    let t = wait_mail(&node, "summ", "summary of doc");
    assert!(t.contains("3 lines"), "{t}");
    assert!(t.contains("first line: Capstan notes"), "{t}");
    // granting something that does not exist changes nothing
    let (_, e) = node.fail([
        "install",
        wasm("summarizer").as_str(),
        "--name",
        "s2",
        "--grant",
        "doc=missing",
    ]);
    assert!(e.contains("unknown name"), "{e}");
    assert!(!node.names(&[]).contains("s2"));
}

/// A hostile guest is stopped alone: its host is mailed why, another guest
/// still answers, and the hostile one starts afresh on its next message.
fn hostile(file: &str, reason: &str) {
    let node = Node::started();
    install(&node, file, file, &[]);
    install(&node, "counter", "counter", &[]);
    node.ok(["mkguest", "bad", "--component", file]);
    node.ok(["mkguest", "good", "--component", "counter"]);
    node.ok(["send", "bad", "go"]);
    node.ok(["send", "good", "increment"]);
    let t = wait_mail(&node, "bad", "guest stopped while handling message");
    assert!(t.contains(reason), "{t}");
    wait_mail(&node, "good", "count = 1");
    let g = guest(&node, "bad");
    assert_eq!(g["state"], "stopped", "{g}");
    assert!(g["last_error"].as_str().unwrap().contains(reason), "{g}");
    assert_eq!(guest(&node, "good")["failures"], 0);
    // it runs again (and is stopped again) on its next message
    node.ok(["send", "bad", "again"]);
    let deadline = Instant::now() + MAIL_TIMEOUT;
    // (a second failure in a row is an episode: reported as "keeps failing")
    while count_mail(&node, "bad", "guest stopped") + count_mail(&node, "bad", "keeps failing") < 2
    {
        assert!(Instant::now() < deadline, "no second stop report");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(guest(&node, "bad")["failures"], 2);
    node.ok(["send", "good", "increment"]);
    wait_mail(&node, "good", "count = 2");
    // the node still answers
    node.ok(["ping"]);
}

#[test]
fn hostile_infinite_loop_is_stopped_by_fuel() {
    hostile("spin", "fuel limit");
}

#[test]
fn hostile_memory_bomb_is_stopped_by_the_memory_limit() {
    hostile("membomb", "memory limit");
}

#[test]
fn hostile_huge_message_is_stopped_by_the_message_limit() {
    hostile("bigmail", "message size limit");
}

#[test]
fn hostile_forged_handle_is_refused() {
    hostile("forger", "it used a handle it does not hold");
}

#[test]
fn incompatible_world_version_is_refused() {
    let node = Node::started();
    let path = wasm("wrong-version");
    let (_, e) = node.fail(["install", path.as_str(), "--name", "wrong"]);
    assert!(e.contains("capstan:agent@0.2.0"), "{e}");
    assert!(e.contains("capstan:agent@0.1.0"), "{e}");
    assert!(!node.names(&[]).contains("wrong"));
    // not a component at all
    let junk = node.home().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let (_, e) = node.fail(["install", junk.to_str().unwrap(), "--name", "junk"]);
    assert!(e.contains("not a valid WebAssembly component"), "{e}");
    assert!(!node.names(&[]).contains("junk"));
    // no such file; a tool run without its input
    let (code, e) = node.fail(["install", "/nonexistent/x.wasm", "--name", "x"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("cannot read /nonexistent/x.wasm"), "{e}");
    let (code, e) = node.fail(["run", "echo-tool"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("--input"), "{e}");
    assert_eq!(node.json(["guests"]), serde_json::json!([]));
}

#[test]
fn hostile_panic_is_reported_with_its_message() {
    hostile(
        "panicker",
        "it panicked: index out of bounds: the len is 3 but the index is 7",
    );
}

/// A guest past its wall-clock deadline (with fuel to spare) is stopped
/// alone, and its host is told it ran past its deadline.
#[test]
fn a_guest_past_its_deadline_is_stopped_alone() {
    let node = Node::started();
    install(&node, "spin", "spin", &[]);
    install(&node, "counter", "counter", &[]);
    // bounds are checked, and a refused guest is not made
    let (_, e) = node.fail(["mkguest", "x", "--component", "spin", "--deadline-ms", "5"]);
    assert!(e.contains("--deadline-ms 5 is out of bounds"), "{e}");
    let (_, e) = node.fail(["mkguest", "x", "--component", "spin", "--fuel", "10"]);
    assert!(e.contains("--fuel 10 is out of bounds"), "{e}");
    let (_, e) = node.fail(["mkguest", "x", "--fuel", "10000000"]);
    assert!(e.contains("--component"), "{e}");
    assert!(!node.names(&[]).contains("x"));
    node.ok([
        "mkguest",
        "slow",
        "--component",
        "spin",
        "--fuel",
        "100000000000",
        "--deadline-ms",
        "300",
    ]);
    node.ok(["mkguest", "good", "--component", "counter"]);
    node.ok(["send", "slow", "go"]);
    node.ok(["send", "good", "increment"]);
    let t = wait_mail(&node, "slow", "guest stopped while handling message");
    assert!(
        t.contains("it ran past its deadline of 300 ms of wall-clock time"),
        "{t}"
    );
    wait_mail(&node, "good", "count = 1");
    let g = guest(&node, "slow");
    assert_eq!(g["state"], "stopped", "{g}");
    assert!(
        g["last_error"].as_str().unwrap().contains("deadline"),
        "{g}"
    );
    // it did not run out of fuel: it was stopped by the clock
    assert!(g["fuel_last"].as_u64().unwrap() < 100_000_000_000, "{g}");
    node.ok(["send", "good", "increment"]);
    wait_mail(&node, "good", "count = 2");
    node.ok(["ping"]);
}

/// A tiny HTTP/1.1 server on 127.0.0.1 for the tests: the "outside world"
/// of the http capability and of the chat channel. It records every request.
mod web {
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub path: String,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Request {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    #[derive(Default)]
    pub struct State {
        pub requests: Vec<Request>,
        /// Lines `SENDER\tTEXT` handed out by GET /poll.
        pub queue: VecDeque<String>,
    }

    pub struct Server {
        pub port: u16,
        pub state: Arc<Mutex<State>>,
    }

    impl Server {
        pub fn start() -> Server {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let state = Arc::new(Mutex::new(State::default()));
            let st = state.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = serve(s, port, &st);
                    });
                }
            });
            Server { port, state }
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }

        pub fn requests(&self) -> Vec<Request> {
            self.state.lock().unwrap().requests.clone()
        }

        pub fn queue(&self, line: &str) {
            self.state.lock().unwrap().queue.push_back(line.to_string());
        }
    }

    fn serve(s: TcpStream, port: u16, st: &Mutex<State>) -> std::io::Result<()> {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.trim().to_string(), v.trim().to_string());
                if n.eq_ignore_ascii_case("content-length") {
                    len = v.parse().unwrap_or(0);
                }
                headers.push((n, v));
            }
        }
        let mut body = vec![0; len.min(1 << 20)];
        r.read_exact(&mut body)?;
        let req = Request {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let auth = req.header("authorization").unwrap_or("none").to_string();
        let (status, extra, body): (&str, String, Vec<u8>) =
            match (req.method.as_str(), req.path.as_str()) {
                (_, "/api/echo") => (
                    "200 OK",
                    String::new(),
                    format!("hello; you sent authorization {auth}").into_bytes(),
                ),
                (_, "/api/echo64") => {
                    use base64::Engine as _;
                    let text = format!("you sent authorization {auth}");
                    let b64 = base64::engine::general_purpose::STANDARD.encode(text);
                    (
                        "200 OK",
                        String::new(),
                        format!("encoded: {b64}").into_bytes(),
                    )
                }
                (_, p) if p.starts_with("/api/go?to=") => (
                    "302 Found",
                    format!("Location: {}\r\n", &p["/api/go?to=".len()..]),
                    Vec::new(),
                ),
                (_, "/api/big") => ("200 OK", String::new(), vec![b'x'; 200_000]),
                (_, "/api/redirect") => (
                    "302 Found",
                    format!("Location: http://127.0.0.1:{port}/admin\r\n"),
                    Vec::new(),
                ),
                ("GET", "/poll") => {
                    let lines: Vec<String> = st.lock().unwrap().queue.drain(..).collect();
                    ("200 OK", String::new(), lines.join("\n").into_bytes())
                }
                ("POST", "/send") => ("200 OK", String::new(), b"ok".to_vec()),
                _ => ("200 OK", String::new(), b"secret admin page".to_vec()),
            };
        st.lock().unwrap().requests.push(req);
        let mut w = s;
        write!(
            w,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )?;
        w.write_all(&body)?;
        w.flush()
    }
}

#[test]
fn http_capability_allows_only_its_allowlist_and_hides_its_credential() {
    let server = web::Server::start();
    let other = web::Server::start();
    let node = Node::started();
    let key = node.home().join("api-key");
    std::fs::write(&key, "Bearer s3cret-token-4242\n").unwrap();
    let key_arg = format!("Authorization={}", key.display());
    let prefix = server.url("/api/");

    // bad capabilities are refused and change nothing
    let (_, e) = node.fail(["mkhttp", "bad", "--allow", "ftp://127.0.0.1/"]);
    assert!(e.contains("only http and https"), "{e}");
    let (_, e) = node.fail(["mkhttp", "bad", "--allow", &prefix, "--method", "BREW"]);
    assert!(e.contains("unknown method"), "{e}");
    let (_, e) = node.fail([
        "mkhttp",
        "bad",
        "--allow",
        &prefix,
        "--header-file",
        "Authorization=/nonexistent/key",
    ]);
    assert!(e.contains("/nonexistent/key"), "{e}");
    let (_, e) = node.fail([
        "mkhttp",
        "bad",
        "--allow",
        &prefix,
        "--timeout-ms",
        "999999",
    ]);
    assert!(e.contains("--timeout-ms 999999 is too long"), "{e}");
    // credentials over plain http need --insecure-http
    let (_, e) = node.fail([
        "mkhttp",
        "bad",
        "--allow",
        &prefix,
        "--header-file",
        &key_arg,
    ]);
    assert!(
        e.contains("would be sent in clear") && e.contains("--insecure-http"),
        "{e}"
    );
    assert!(!node.names(&[]).contains("bad"));

    node.ok([
        "mkhttp",
        "api",
        "--allow",
        &prefix,
        "--method",
        "GET",
        "--header-file",
        &key_arg,
        "--max-bytes",
        "10000",
        "--insecure-http",
        "--allow",
        &other.url("/api/"),
    ]);
    // the capability's description names the header, never its value
    let desc = node.ok(["cat", "api"]);
    assert!(desc.contains("Authorization"), "{desc}");
    assert!(!desc.contains("s3cret"), "{desc}");

    install(&node, "http-fetch", "fetch", &["http=api"]);
    let run = |url: &str, method: &str| {
        let input = format!(r#"{{"url":"{url}","method":"{method}"}}"#);
        node.run(["run", "fetch", "--input", input.as_str()])
    };

    // allowed: the node injected the credential; the tool never saw it
    let r = run(&server.url("/api/echo"), "GET");
    assert!(r.success(), "{}", r.stderr);
    let out = r.stdout_str();
    assert!(out.contains(r#""status":200"#), "{out}");
    assert!(out.contains("you sent authorization [REDACTED]"), "{out}");
    assert!(!out.contains("s3cret"), "{out}");
    let reqs = server.requests();
    let echo = reqs
        .iter()
        .find(|q| q.path == "/api/echo")
        .expect("reached");
    assert_eq!(
        echo.header("authorization"),
        Some("Bearer s3cret-token-4242")
    );

    // an echo encoded in base64 is redacted too
    let r = run(&server.url("/api/echo64"), "GET");
    assert!(r.success(), "{}", r.stderr);
    let out = r.stdout_str();
    assert!(out.contains("[REDACTED]"), "{out}");
    {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode("s3cret-token-4242");
        assert!(!out.contains(&token[..12]), "{out}");
    }

    // a redirect to another allowlisted origin is followed without the
    // credential (it is bound to the request's origin)
    let to_other = server.url(&format!("/api/go?to={}", other.url("/api/echo")));
    let r = run(&to_other, "GET");
    assert!(r.success(), "{}", r.stderr);
    assert!(
        r.stdout_str().contains("you sent authorization none"),
        "{}",
        r.stdout_str()
    );
    let at_other = other.requests();
    assert_eq!(at_other.len(), 1, "the redirect was followed once");
    assert_eq!(
        at_other[0].header("authorization"),
        None,
        "the credential crossed origins"
    );
    // a redirect back to the same origin keeps it
    let same = server.url(&format!("/api/go?to={}", server.url("/api/echo")));
    let r = run(&same, "GET");
    assert!(
        r.stdout_str().contains("you sent authorization [REDACTED]"),
        "{}",
        r.stdout_str()
    );
    // a path with an encoded separator is refused before any request
    let before = server.requests().len();
    let r = run(&server.url("/api/..%2Fadmin"), "GET");
    assert!(r.stderr.contains("encoded"), "{}", r.stderr);
    assert_eq!(server.requests().len(), before);

    // outside the allowlist: another path, another port; a redirect out of it
    let other_before = other.requests().len();
    let before = server.requests().len();
    let r = run(&server.url("/admin"), "GET");
    assert!(!r.success());
    assert!(
        r.stderr
            .contains("outside this http capability's allowlist"),
        "{}",
        r.stderr
    );
    let r = run(&other.url("/admin"), "GET");
    assert!(
        r.stderr
            .contains("outside this http capability's allowlist"),
        "{}",
        r.stderr
    );
    let third = web::Server::start();
    let r = run(&third.url("/api/echo"), "GET");
    assert!(
        r.stderr
            .contains("outside this http capability's allowlist"),
        "{}",
        r.stderr
    );
    assert!(
        third.requests().is_empty(),
        "a server off the allowlist was reached"
    );
    assert_eq!(other.requests().len(), other_before);
    assert_eq!(
        server.requests().len(),
        before,
        "a refused URL reached the server"
    );
    let r = run(&server.url("/api/redirect"), "GET");
    assert!(!r.success());
    assert!(
        r.stderr.contains("a redirect to")
            && r.stderr
                .contains("is outside this http capability's allowlist"),
        "{}",
        r.stderr
    );
    assert!(!server.requests().iter().any(|q| q.path == "/admin"));
    // a method it does not allow
    let r = run(&server.url("/api/echo"), "POST");
    assert!(
        r.stderr
            .contains("method POST is not allowed by this http capability"),
        "{}",
        r.stderr
    );
    // a response larger than it allows
    let r = run(&server.url("/api/big"), "GET");
    assert!(!r.success());
    assert!(
        r.stderr
            .contains("this http capability allows at most 10000"),
        "{}",
        r.stderr
    );

    // a tool granted nothing cannot reach anything
    install(&node, "http-fetch", "bare-fetch", &[]);
    let input = format!(r#"{{"url":"{}"}}"#, server.url("/api/echo"));
    let (_, e) = node.fail(["run", "bare-fetch", "--input", input.as_str()]);
    assert!(e.contains("no http capability was granted"), "{e}");
    // nor can one granted something that is not an http capability
    node.ok(["store", "--text", "plain", "--name", "plain"]);
    install(&node, "http-fetch", "odd-fetch", &["http=plain"]);
    let (_, e) = node.fail(["run", "odd-fetch", "--input", input.as_str()]);
    assert!(e.contains("is not an http capability"), "{e}");
}

/// A channel guest bridges an outside chat server (polled over http) and
/// Capstan mail, both ways, and keeps doing so after a kill -9.
#[test]
fn http_channel_bridges_an_outside_chat_server() {
    let server = web::Server::start();
    let mut node = Node::started();
    node.ok([
        "mkhttp",
        "chat",
        "--allow",
        &server.url("/"),
        "--method",
        "GET,POST",
    ]);
    let config = format!(r#"{{"url":"{}"}}"#, server.url("/"));
    node.ok([
        "store",
        "--text",
        config.as_str(),
        "--name",
        "bridge-config",
    ]);
    let info = install(
        &node,
        "http-channel",
        "http-channel",
        &["http=chat", "config=bridge-config"],
    );
    assert_eq!(info["world"], "capstan:channel/sandboxed-channel@0.2.0");
    node.ok(["mkguest", "bridge", "--component", "http-channel"]);

    // outside → Capstan: a message queued on the chat server reaches the host
    server.queue("alice\thello from outside");
    let t = wait_mail(&node, "bridge", "hello from outside");
    assert_eq!(t, "alice: hello from outside");

    // Capstan → outside: mail to the channel is posted to the chat server
    // `@@` is a literal `@`: a leading `@user` names the outside recipient
    node.ok(["send", "bridge", "@@alice hi back"]);
    node.ok(["send", "bridge", "to everyone"]);
    let deadline = Instant::now() + MAIL_TIMEOUT;
    loop {
        let sent: Vec<String> = server
            .requests()
            .iter()
            .filter(|q| q.method == "POST" && q.path == "/send")
            .map(|q| q.body.clone())
            .collect();
        if sent.len() >= 2 {
            assert_eq!(sent, vec!["alice\thi back", "\tto everyone"]);
            break;
        }
        assert!(Instant::now() < deadline, "nothing posted: {sent:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let g = guest(&node, "bridge");
    assert_eq!(g["failures"], 0, "{g}");

    // after kill -9 the node starts the channel again by itself
    node.kill9();
    node.start();
    server.queue("bob\tstill there?");
    wait_mail(&node, "bridge", "bob: still there?");
    assert_eq!(count_mail(&node, "bridge", "alice: hello from outside"), 1);
}

#[test]
fn channel_of_an_older_world_version_is_refused() {
    let node = Node::started();
    let path = wasm("old-channel");
    let (_, e) = node.fail(["install", path.as_str(), "--name", "old"]);
    assert!(e.contains("capstan:channel@0.1.0"), "{e}");
    assert!(e.contains("capstan:channel@0.2.0"), "{e}");
    assert!(!node.names(&[]).contains("old"));
}

/// `mkguest --with SLOT=PATH` gives one guest a capability of its own,
/// beside the component's install-time grants; bad input makes nothing.
#[test]
fn mkguest_with_gives_one_guest_its_own_capabilities() {
    let node = Node::started();
    node.ok(["store", "--text", "for bot one", "--name", "note"]);
    install(&node, "counter", "counter", &[]);
    node.ok([
        "mkguest",
        "one",
        "--component",
        "counter",
        "--with",
        "doc=note",
    ]);
    // `--agent` is the same as `--component`
    node.ok(["mkguest", "two", "--agent", "counter"]);
    assert!(node.names(&["--as", "one"]).contains("doc"));
    assert!(!node.names(&["--as", "two"]).contains("doc"));
    assert_eq!(node.ok(["cat", "--as", "one", "doc"]).trim(), "for bot one");

    for (with, why) in [
        ("doc=nothing-here", "nothing-here"),
        ("Doc=note", "Doc"),
        ("no-equals", "SLOT=PATH"),
    ] {
        let (_, e) = node.fail(["mkguest", "three", "--component", "counter", "--with", with]);
        assert!(e.contains(why), "{with}: {e}");
    }
    let (_, e) = node.fail([
        "mkguest",
        "three",
        "--component",
        "counter",
        "--with",
        "a=note",
        "--with",
        "a=note",
    ]);
    assert!(e.contains("given twice"), "{e}");
    assert!(!node.names(&[]).contains("three"), "nothing was made");
}

/// Every message is handled by a fresh instance whose memory starts as the
/// component's image, however the node recycled the memory slot that an
/// earlier instance, of this guest or another, dirtied. The residue guest
/// writes into every page of a 6 MiB zeroed static and must find it zero
/// again each time: both of the node's ways of resetting a slot are
/// crossed (up to 4 MiB of dirty pages written over where the kernel can
/// list them, the rest given back to the kernel).
#[test]
fn every_message_starts_from_fresh_guest_memory() {
    let node = Node::started();
    install(&node, "residue", "residue", &[]);
    node.ok(["mkguest", "r1", "--component", "residue"]);
    node.ok(["mkguest", "r2", "--component", "residue"]);
    for round in 1..=3 {
        for g in ["r1", "r2"] {
            node.ok(["send", g, "residue"]);
            let deadline = Instant::now() + MAIL_TIMEOUT;
            while count_mail(&node, g, "residue: ") < round {
                assert!(
                    Instant::now() < deadline,
                    "no answer from {g} in round {round}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for g in ["r1", "r2"] {
        assert_eq!(
            count_mail(&node, g, "residue: dirty"),
            0,
            "{:#?}",
            node.inbox(&[])
        );
        assert_eq!(count_mail(&node, g, "residue: clean"), 3);
    }
}
