//! The Matrix channel (guests/matrix-channel) end to end against a real
//! Synapse homeserver (scripts/synapse; `scripts/test` starts it and sets
//! `CAPSTAN_SYNAPSE_URL`). A person is a test client logged in as a second
//! Matrix user; the agent is guests/llm-agent with the scripted model
//! server. Skipped without `CAPSTAN_SYNAPSE_URL` or with Synapse not
//! answering, unless `CAPSTAN_REQUIRE_SYNAPSE=1`: then they fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use capstan_tests::llm_server::{LlmServer, Reply};
use capstan_tests::{Node, guest_wasm};
use serde_json::{Value, json};

const KEY: &str = "test-anthropic-key-5be0a1c3d7f9";
/// A generous bound for a debug build on a busy machine; not a timing check.
const ROOM_TIMEOUT: Duration = Duration::from_secs(120);

/// The homeserver's base URL, or None (the test is skipped) when there is
/// none and none is required.
fn synapse() -> Option<String> {
    let required = std::env::var("CAPSTAN_REQUIRE_SYNAPSE").as_deref() == Ok("1");
    let url = match std::env::var("CAPSTAN_SYNAPSE_URL") {
        Ok(u) if !u.is_empty() => u.trim_end_matches('/').to_string(),
        _ => {
            assert!(
                !required,
                "CAPSTAN_REQUIRE_SYNAPSE=1 but CAPSTAN_SYNAPSE_URL is not set: run scripts/synapse start"
            );
            eprintln!("skipped: no CAPSTAN_SYNAPSE_URL (scripts/synapse start)");
            return None;
        }
    };
    match http(&url, "GET", "/_matrix/client/versions", None, None) {
        Ok((200, _)) => Some(url),
        other => {
            assert!(
                !required,
                "CAPSTAN_REQUIRE_SYNAPSE=1 but Synapse does not answer at {url}: {other:?}"
            );
            eprintln!("skipped: Synapse does not answer at {url}: {other:?}");
            None
        }
    }
}

/// A tiny blocking HTTP/1.1 client for loopback (the test's Matrix user).
fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {base}"))?;
    let mut s = TcpStream::connect(hostport).map_err(|e| format!("connect {hostport}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A Matrix user of the test homeserver.
struct User {
    id: String,
    token: String,
}

/// Registers (scripts/synapse register, with the shared secret) and logs in.
fn user(hs: &str, name: &str) -> User {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/synapse");
    let password = format!("pw-{name}-2f8a");
    let out = std::process::Command::new(&script)
        .args(["register", name, &password])
        .output()
        .expect("run scripts/synapse register");
    assert!(
        out.status.success(),
        "scripts/synapse register {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, v) = http(
        hs,
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(&json!({"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": name}, "password": password})),
    )
    .unwrap();
    assert_eq!(status, 200, "login {name}: {v}");
    User {
        id: v["user_id"].as_str().unwrap().to_string(),
        token: v["access_token"].as_str().unwrap().to_string(),
    }
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{}", std::process::id(), t % 1_000_000_000)
}

impl User {
    fn call(&self, hs: &str, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = http(hs, method, path, Some(&self.token), body).unwrap();
        assert!(
            (200..300).contains(&status),
            "{method} {path} as {}: {status} {v}",
            self.id
        );
        v
    }

    /// A private room with `invite` invited; its id.
    fn create_room(&self, hs: &str, invite: &str) -> String {
        let v = self.call(
            hs,
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(&json!({"preset": "private_chat", "invite": [invite]})),
        );
        v["room_id"].as_str().unwrap().to_string()
    }

    fn say(&self, hs: &str, room: &str, text: &str) {
        let path = format!(
            "/_matrix/client/v3/rooms/{room}/send/m.room.message/t{}",
            unique()
        );
        self.call(
            hs,
            "PUT",
            &path,
            Some(&json!({"msgtype": "m.text", "body": text})),
        );
    }

    /// The room's text messages, oldest first (read with /messages).
    fn timeline(&self, hs: &str, room: &str) -> Vec<Value> {
        let v = self.call(
            hs,
            "GET",
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=500"),
            None,
        );
        let mut out: Vec<Value> = v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Waits for a message from `sender` whose body contains `needle`.
    fn wait_for(&self, hs: &str, room: &str, sender: &str, needle: &str) -> Value {
        let deadline = Instant::now() + ROOM_TIMEOUT;
        loop {
            let t = self.timeline(hs, room);
            if let Some(e) = t.iter().find(|e| {
                e["sender"] == sender
                    && e["content"]["body"]
                        .as_str()
                        .is_some_and(|b| b.contains(needle))
            }) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no message from {sender} containing {needle:?} in {room}: {t:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_member(&self, hs: &str, room: &str, member: &str) {
        let deadline = Instant::now() + ROOM_TIMEOUT;
        loop {
            let v = self.call(
                hs,
                "GET",
                &format!("/_matrix/client/v3/rooms/{room}/joined_members"),
                None,
            );
            if v["joined"].get(member).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{member} did not join {room}: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A node whose llm-agent `helper` (the scripted model) is reached from a
/// Matrix room through the channel `bridge`, logged in as `bot`; `alice`
/// invited the bot to `room` and it joined.
struct Setup {
    hs: String,
    node: Node,
    server: LlmServer,
    bot: User,
    alice: User,
    room: String,
}

fn setup() -> Option<Setup> {
    let hs = synapse()?;
    let u = unique();
    let bot = user(&hs, &format!("bot-{u}"));
    let alice = user(&hs, &format!("alice-{u}"));
    let room = alice.create_room(&hs, &bot.id);

    let server = LlmServer::start();
    let node = Node::started();
    server.require_key(KEY);
    server.add_anthropic(&node, "claude", KEY);
    let agent = guest_wasm("llm-agent");
    node.ok([
        "install",
        agent.as_str(),
        "--name",
        "llm-agent",
        "--grant",
        "llm=claude",
    ]);
    node.ok(["mkguest", "helper", "--component", "llm-agent"]);

    // the bot's access token: a credential header of the http capability
    let key = node.home().join("matrix-token");
    std::fs::write(&key, format!("Bearer {}", bot.token)).unwrap();
    let header = format!("Authorization={}", key.display());
    let allow = format!("{hs}/_matrix/client/");
    node.ok([
        "mkhttp",
        "matrix",
        "--allow",
        allow.as_str(),
        "--method",
        "GET,POST,PUT",
        "--header-file",
        header.as_str(),
        "--timeout-ms",
        "30000",
        "--insecure-http",
    ]);
    let config = json!({"homeserver": hs, "agent": "helper"}).to_string();
    node.ok([
        "store",
        "--text",
        config.as_str(),
        "--name",
        "matrix-config",
    ]);
    let channel = guest_wasm("matrix-channel");
    let info = node.json([
        "install",
        channel.as_str(),
        "--name",
        "matrix-channel",
        "--grant",
        "http=matrix",
        "--grant",
        "config=matrix-config",
    ]);
    assert_eq!(info["world"], "capstan:channel/sandboxed-channel@0.2.0");
    node.ok([
        "mkguest",
        "bridge",
        "--component",
        "matrix-channel",
        "--with",
        "helper=helper",
    ]);
    // the invitation is accepted by the channel
    alice.wait_member(&hs, &room, &bot.id);
    Some(Setup {
        hs,
        node,
        server,
        bot,
        alice,
        room,
    })
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or("")
}

/// A person writes in a room; the LLM agent answers in the room, with the
/// Markdown of its answer as HTML beside the plain body; the bot's token
/// reached the homeserver only through the http capability.
#[test]
fn a_person_in_a_room_talks_with_the_llm_agent() {
    let Some(s) = setup() else { return };
    s.server
        .push(Reply::text("Paris is the capital of **France**."));
    s.alice
        .say(&s.hs, &s.room, "What is the capital of France?");
    let e = s
        .alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "Paris is the capital");
    assert_eq!(body(&e), "Paris is the capital of **France**.");
    assert_eq!(e["content"]["format"], "org.matrix.custom.html", "{e}");
    assert_eq!(
        e["content"]["formatted_body"], "Paris is the capital of <strong>France</strong>.",
        "{e}"
    );
    // the model saw the person's words, and who wrote them
    let reqs = s.server.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert!(
        reqs[0].body.contains("What is the capital of France?"),
        "{}",
        reqs[0].body
    );
    assert!(reqs[0].body.contains(&s.alice.id), "{}", reqs[0].body);
    // plain text goes without formatted_body
    s.server.push(Reply::text("You are welcome."));
    s.alice.say(&s.hs, &s.room, "Thanks!");
    let e = s
        .alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "You are welcome.");
    assert!(e["content"].get("formatted_body").is_none(), "{e}");
    // nothing the node stored holds the bot's token
    let names = s.node.ok(["list", "--as", "bridge"]);
    assert!(names.contains("state-sync"), "{names}");
    let state = s.node.ok(["cat", "--as", "bridge", "state-sync"]);
    assert!(!state.contains(&s.bot.token), "{state}");
}

/// The agent proposes code; the proposal reaches the host as usual; the
/// host's `endow` runs it and the agent's answer goes back to the room.
#[test]
fn a_proposal_from_a_room_is_endowed_by_the_host_and_answered_in_the_room() {
    let Some(s) = setup() else { return };
    let evaluator = guest_wasm("evaluator");
    s.node
        .ok(["install", evaluator.as_str(), "--name", "evaluator"]);
    s.server.push(Reply::Tools {
        text: "Let me compute that.".into(),
        calls: vec![(
            "define_code".into(),
            json!({"source": "6 * 7", "slots": {}}),
        )],
    });
    s.alice.say(&s.hs, &s.room, "What is six times seven?");
    // the proposal reaches the host
    let deadline = Instant::now() + ROOM_TIMEOUT;
    let proposal = loop {
        let inbox = s.node.inbox(&[]);
        if let Some(m) = inbox.iter().find(|m| {
            m["from"] == "helper"
                && capstan_tests::texts(std::slice::from_ref(*m))
                    .concat()
                    .contains("definition: slots")
        }) {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "no proposal: {inbox:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let n = proposal["number"].as_u64().unwrap().to_string();
    s.server.push(Reply::text("Six times seven is 42."));
    let v = s.node.json(["endow", n.as_str()]);
    assert_eq!(v["result"], "42", "{v}");
    let e = s
        .alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "Six times seven is 42.");
    assert_eq!(body(&e), "Six times seven is 42.");
    let t = s.alice.timeline(&s.hs, &s.room);
    let bot_said: Vec<&str> = t
        .iter()
        .filter(|e| e["sender"] == s.bot.id.as_str())
        .map(body)
        .collect();
    assert_eq!(bot_said, vec!["Six times seven is 42."], "{t:#?}");
}

/// kill -9 of the node while the agent's model call for a room message is
/// in flight; after the restart the conversation goes on, and the room's
/// timeline (read after a sentinel) holds every message exactly once.
#[test]
fn kill_9_mid_conversation_loses_and_repeats_nothing_in_the_room() {
    let Some(mut s) = setup() else { return };
    s.server.push(Reply::text("Answer one."));
    s.alice.say(&s.hs, &s.room, "Question one?");
    s.alice.wait_for(&s.hs, &s.room, &s.bot.id, "Answer one.");

    // the model answers slowly: the node dies while it is asked
    s.server
        .push(Reply::text("Answer two.").after(Duration::from_secs(5)));
    s.server.push(Reply::text("Answer two."));
    s.alice.say(&s.hs, &s.room, "Question two?");
    let deadline = Instant::now() + ROOM_TIMEOUT;
    while s.server.requests().len() < 2 {
        assert!(Instant::now() < deadline, "the model was not asked again");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.node.kill9();
    // a message written while the node is down is not lost
    s.alice.say(&s.hs, &s.room, "Written while you were down?");
    s.server.push(Reply::text("Answer while down."));
    s.node.start();
    s.alice.wait_for(&s.hs, &s.room, &s.bot.id, "Answer two.");
    s.alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "Answer while down.");

    // the sentinel: once its answer is in the room, nothing else may come
    s.server.push(Reply::text("Sentinel seen."));
    s.alice.say(&s.hs, &s.room, "Sentinel.");
    s.alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "Sentinel seen.");
    std::thread::sleep(Duration::from_secs(2));

    let t = s.alice.timeline(&s.hs, &s.room);
    let said: Vec<(String, String)> = t
        .iter()
        .map(|e| {
            (
                e["sender"].as_str().unwrap_or("").to_string(),
                body(e).to_string(),
            )
        })
        .collect();
    let (a, b) = (s.alice.id.clone(), s.bot.id.clone());
    let expected: Vec<(String, String)> = [
        (&a, "Question one?"),
        (&b, "Answer one."),
        (&a, "Question two?"),
        (&a, "Written while you were down?"),
        (&b, "Answer two."),
        (&b, "Answer while down."),
        (&a, "Sentinel."),
        (&b, "Sentinel seen."),
    ]
    .iter()
    .map(|(w, m)| (w.to_string(), m.to_string()))
    .collect();
    assert_eq!(said, expected, "the room's timeline");
    // each room message reached the model once, but the turn the kill cut
    // short: asked again after the restart (Q1, Q2 twice, the one written
    // while down, the sentinel); and the channel never stopped
    assert_eq!(s.server.requests().len(), 5, "{:#?}", s.server.requests());
    let g = s.node.json(["guests"]);
    let bridge = g
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "bridge")
        .cloned()
        .unwrap_or_else(|| panic!("bridge not listed: {g}"));
    assert_eq!(bridge["failures"], 0, "{bridge}");
}

/// The channel accepts an invitation to a second room and answers each room
/// in its own room; the host can post to a room by naming it.
#[test]
fn invitations_are_accepted_and_each_room_gets_its_own_answers() {
    let Some(s) = setup() else { return };
    let second = s.alice.create_room(&s.hs, &s.bot.id);
    s.alice.wait_member(&s.hs, &second, &s.bot.id);
    s.server.push(Reply::text("Hello, second room."));
    s.alice.say(&s.hs, &second, "Anyone in the second room?");
    s.alice
        .wait_for(&s.hs, &second, &s.bot.id, "Hello, second room.");
    s.server.push(Reply::text("Hello, first room."));
    s.alice.say(&s.hs, &s.room, "And in the first?");
    s.alice
        .wait_for(&s.hs, &s.room, &s.bot.id, "Hello, first room.");
    // each answer went to its own room only
    let first: Vec<String> = s
        .alice
        .timeline(&s.hs, &s.room)
        .iter()
        .map(|e| body(e).to_string())
        .collect();
    assert_eq!(first, vec!["And in the first?", "Hello, first room."]);
    // the host names a room (`@@!room` on the CLI: a literal `@`)
    let to = format!("@@{second} A note from the host.");
    s.node.ok(["send", "bridge", to.as_str()]);
    s.alice
        .wait_for(&s.hs, &second, &s.bot.id, "A note from the host.");
    let second_said: Vec<String> = s
        .alice
        .timeline(&s.hs, &second)
        .iter()
        .map(|e| body(e).to_string())
        .collect();
    assert_eq!(
        second_said,
        vec![
            "Anyone in the second room?",
            "Hello, second room.",
            "A note from the host."
        ]
    );
}
