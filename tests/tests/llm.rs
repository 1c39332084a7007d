//! `capstan llm …` end to end: the real binary against a scripted LLM
//! provider on loopback (tests/src/llm_server.rs) speaking the Anthropic,
//! Ollama and OpenAI protocols.

use std::path::PathBuf;

use capstan_tests::Node;
use capstan_tests::llm_server::{LlmServer, Reply};
use serde_json::{Value, json};

const ANTHROPIC_KEY: &str = "test-anthropic-key-3f9a1c77e0b2";
const OPENAI_KEY: &str = "test-openai-key-5d21b8e4aa90";

fn key_file(node: &Node, name: &str, key: &str) -> PathBuf {
    let f = node.home().join(format!("{name}.key"));
    std::fs::write(&f, format!("{key}\n")).unwrap();
    f
}

/// The daemon's log file, as text.
fn log_text(node: &Node) -> String {
    let w = node.json(["where"]);
    std::fs::read_to_string(w["log"].as_str().expect("log path")).unwrap_or_default()
}

#[test]
fn each_protocol_round_trips_with_its_key() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    node.ok([
        "llm",
        "add",
        "local",
        "--provider",
        "ollama",
        "--url",
        &server.url(),
        "--model",
        "llama-test",
    ]);
    let f = key_file(&node, "gpt", OPENAI_KEY);
    node.ok([
        "llm",
        "add",
        "gpt",
        "--provider",
        "openai",
        "--key-file",
        f.to_str().unwrap(),
        "--url",
        &format!("{}/v1", server.url()),
        "--model",
        "gpt-test",
        "--max-tokens",
        "300",
    ]);

    server.push(Reply::text("Hello from anthropic"));
    assert_eq!(
        node.ok(["llm", "ask", "claude", "say", "hello"]),
        "Hello from anthropic\n"
    );
    server.push(Reply::text("Hello from ollama"));
    assert_eq!(
        node.ok(["llm", "ask", "local", "hi"]),
        "Hello from ollama\n"
    );
    server.push(Reply::text("Hello from openai"));
    let v = node.json(["llm", "ask", "gpt", "hi", "--system", "be brief"]);
    assert_eq!(v["text"], "Hello from openai", "{v}");
    assert_eq!(v["stop"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 12, "output_tokens": 8}));
    assert_eq!(v["provider"], "openai");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    let (a, o, p) = (&reqs[0], &reqs[1], &reqs[2]);
    assert_eq!(
        (a.method.as_str(), a.path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(a.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert!(a.header("anthropic-version").is_some());
    assert!(a.header("authorization").is_none());
    let body = a.json();
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["messages"][0]["content"][0]["text"], "say hello");
    assert_eq!(o.path, "/api/chat");
    assert!(o.header("authorization").is_none() && o.header("x-api-key").is_none());
    assert_eq!(o.json()["stream"], false);
    assert_eq!(o.json()["model"], "llama-test");
    assert_eq!(p.path, "/v1/chat/completions");
    assert_eq!(
        p.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    assert_eq!(
        p.json()["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    // OpenAI: max_completion_tokens (max_tokens is deprecated there)
    assert_eq!(p.json()["max_completion_tokens"], 300, "{}", p.body);
    assert!(p.json().get("max_tokens").is_none(), "{}", p.body);

    // Tool calls come back normalised, from each protocol.
    for name in ["claude", "local", "gpt"] {
        server.push(Reply::Tools {
            text: String::new(),
            calls: vec![("list_names".into(), json!({"dir": "inbox"}))],
        });
        let v = node.json(["llm", "ask", name, "what is there?"]);
        assert_eq!(v["stop"], "tool_use", "{name}: {v}");
        assert_eq!(v["tool_calls"][0]["name"], "list_names", "{name}: {v}");
        assert_eq!(v["tool_calls"][0]["arguments"], json!({"dir": "inbox"}));
    }

    // A provider is a formula in the host's names.
    let shown = node.json(["show", "claude"]);
    assert_eq!(shown["type"], "llm", "{shown}");
    let list = node.json(["llm", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["claude", "gpt", "local"]);
}

#[test]
fn the_key_is_never_shown() {
    let mut node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    server.push(Reply::text("fine"));
    let mut outputs = Vec::new();
    for args in [
        vec!["llm", "list"],
        vec!["--json", "llm", "list"],
        vec!["list"],
        vec!["--json", "list"],
        vec!["show", "claude"],
        vec!["--json", "show", "claude"],
        vec!["--json", "llm", "ask", "claude", "hi"],
        vec!["--json", "llm", "audit"],
    ] {
        let r = node.run(&args);
        assert!(
            r.success(),
            "{args:?} failed, so it showed nothing to check: {r}"
        );
        outputs.push(format!("{}{}", r.stdout_str(), r.stderr));
    }
    // An llm provider is not a value: `cat` says so (and shows no key).
    let r = node.run(["cat", "claude"]);
    assert_eq!(r.code, Some(1), "{r}");
    outputs.push(format!("{}{}", r.stdout_str(), r.stderr));
    let v = node.json(["llm", "list"]);
    assert_eq!(v[0]["key_set"], true, "{v}");
    assert_eq!(v[0]["provider"], "anthropic");
    assert_eq!(v[0]["model"], "claude-test");
    assert_eq!(v[0]["url"], server.url());
    // It survives a restart (the key is in the store, for any node).
    node.stop();
    node.start();
    server.push(Reply::text("still here"));
    assert_eq!(node.ok(["llm", "ask", "claude", "hi"]), "still here\n");
    assert_eq!(
        server.requests().last().unwrap().header("x-api-key"),
        Some(ANTHROPIC_KEY)
    );
    outputs.push(log_text(&node));
    for o in outputs {
        assert!(!o.contains(ANTHROPIC_KEY), "the key leaked: {o}");
        assert!(
            !o.contains(&ANTHROPIC_KEY[10..]),
            "part of the key leaked: {o}"
        );
    }
}

#[test]
fn a_bad_key_is_a_clear_error() {
    let node = Node::started();
    let server = LlmServer::start();
    server.require_key(ANTHROPIC_KEY);
    server.add_anthropic(&node, "claude", "wrong-key-0123456789abc");
    let (code, err) = node.fail(["llm", "ask", "claude", "hi"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("\"claude\"") && err.contains("rejected the API key"),
        "{err}"
    );
    assert!(
        err.contains("check the key file given to `capstan llm add`"),
        "{err}"
    );
    assert!(!err.contains("wrong-key-0123456789abc"), "{err}");
    // Not retried: a bad key does not get better.
    assert_eq!(server.requests().len(), 1);
    let audit = node.json(["llm", "audit"]);
    let outcome = audit[0]["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("error: "), "{audit}");
}

#[test]
fn rate_limits_and_server_errors_are_retried() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    server.push(Reply::Status {
        status: 429,
        message: "slow down".into(),
        retry_after: Some(0),
    });
    server.push(Reply::status(503, "overloaded"));
    server.push(Reply::text("third time lucky"));
    assert_eq!(
        node.ok(["llm", "ask", "claude", "hi"]),
        "third time lucky\n"
    );
    assert_eq!(server.requests().len(), 3);

    // Bounded: a provider that keeps failing gives up with a clear error.
    for _ in 0..4 {
        server.push(Reply::status(500, "down"));
    }
    let (_, err) = node.fail(["llm", "ask", "claude", "hi"]);
    assert!(
        err.contains("failed 4 times") && err.contains("HTTP 500"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 7);

    // Nothing listening: a clear error naming the provider.
    let gone = {
        let s = LlmServer::start();
        s.url()
    };
    node.ok([
        "llm",
        "add",
        "nowhere",
        "--provider",
        "ollama",
        "--url",
        &gone,
    ]);
    let (_, err) = node.fail(["llm", "ask", "nowhere", "hi"]);
    assert!(
        err.contains("\"nowhere\"") && err.contains("cannot be reached"),
        "{err}"
    );
}

#[test]
fn malformed_answers_are_clear_errors() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    node.ok([
        "llm",
        "add",
        "local",
        "--provider",
        "ollama",
        "--url",
        &server.url(),
    ]);
    server.push(Reply::Raw("this is not json {".into()));
    let (code, err) = node.fail(["llm", "ask", "claude", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"claude\" sent a malformed answer"), "{err}");
    server.push(Reply::Raw(r#"{"type":"message","content":"oops"}"#.into()));
    let (_, err) = node.fail(["llm", "ask", "claude", "hi"]);
    assert!(
        err.contains("malformed") && err.contains("content"),
        "{err}"
    );
    server.push(Reply::Raw(
        r#"{"message":{"content":"x","tool_calls":[{"function":{"name":"t","arguments":[1,2]}}]}}"#
            .into(),
    ));
    let (_, err) = node.fail(["llm", "ask", "local", "hi"]);
    assert!(err.contains("\"local\" sent a malformed answer"), "{err}");
    // Not retried, and the node is fine afterwards.
    assert_eq!(server.requests().len(), 3);
    server.push(Reply::text("recovered"));
    assert_eq!(node.ok(["llm", "ask", "claude", "hi"]), "recovered\n");
}

#[test]
fn credentials_are_redacted_from_replies_and_never_sent() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    server.push(Reply::text(&format!(
        "sure: AKIAIOSFODNN7EXAMPLE and {ANTHROPIC_KEY} and ghp_abcdefghijklmnopqrstuvwxyz0123456789"
    )));
    let r = node.run(["llm", "ask", "claude", "tell me secrets"]);
    assert!(r.success(), "{r}");
    let out = r.stdout_str();
    assert_eq!(
        out,
        "sure: [REDACTED:aws-access-key] and [REDACTED:configured-key] and [REDACTED:github-token]\n"
    );
    assert!(r.stderr.contains("redacted"), "{r}");
    // Tool call arguments too.
    server.push(Reply::Tools {
        text: String::new(),
        calls: vec![("send".into(), json!({"body": "key AKIAIOSFODNN7EXAMPLE"}))],
    });
    let v = node.json(["llm", "ask", "claude", "hi"]);
    assert_eq!(
        v["tool_calls"][0]["arguments"]["body"], "key [REDACTED:aws-access-key]",
        "{v}"
    );
    assert_eq!(v["redacted"], json!(["aws-access-key"]));

    // A request carrying a credential never leaves the node.
    let before = server.requests().len();
    for prompt in [
        format!("please use {ANTHROPIC_KEY}"),
        "-----BEGIN OPENSSH PRIVATE KEY----- abc".to_string(),
    ] {
        // `--`: the second prompt starts with hyphens
        let (_, err) = node.fail(["llm", "ask", "claude", "--", &prompt]);
        assert!(err.contains("looks like a credential"), "{err}");
        assert!(!err.contains(ANTHROPIC_KEY), "{err}");
    }
    assert_eq!(server.requests().len(), before);
    let audit = node.json(["llm", "audit"]);
    let outcomes: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes[..2], ["ok", "ok"]);
    assert!(outcomes[2].starts_with("refused: "), "{audit}");
    assert_eq!(audit[0]["redactions"], 3);
}

#[test]
fn budgets_refuse_calls_and_the_audit_shows_them() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    let b = node.json(["llm", "budget", "--tokens", "50"]);
    assert_eq!(b["token_limit"], 50, "{b}");
    server.push(Reply::Text {
        text: "one".into(),
        input_tokens: 30,
        output_tokens: 30,
    });
    assert_eq!(node.ok(["llm", "ask", "claude", "hi"]), "one\n");
    let b = node.json(["llm", "budget"]);
    assert_eq!(
        (b["tokens_used"].as_u64(), b["calls"].as_u64()),
        (Some(60), Some(1))
    );
    let (code, err) = node.fail(["llm", "ask", "claude", "hi again"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("budget is exhausted") && err.contains("60 of 50 tokens"),
        "{err}"
    );
    assert!(err.contains("capstan llm budget"), "{err}");
    assert_eq!(
        server.requests().len(),
        1,
        "a refused call reaches no provider"
    );

    // Raising the limit lets calls through again.
    node.ok(["llm", "budget", "--tokens", "1000"]);
    server.push(Reply::text("two"));
    assert_eq!(node.ok(["llm", "ask", "claude", "hi"]), "two\n");

    let audit = node.json(["llm", "audit"]);
    let a = audit.as_array().unwrap();
    assert_eq!(a.len(), 3, "{audit}");
    assert_eq!(a[0]["outcome"], "ok");
    assert_eq!(a[0]["provider"], "claude");
    assert_eq!(a[0]["kind"], "anthropic");
    assert_eq!(a[0]["model"], "claude-test");
    assert_eq!(
        (
            a[0]["input_tokens"].as_u64(),
            a[0]["output_tokens"].as_u64()
        ),
        (Some(30), Some(30))
    );
    assert!(a[1]["outcome"].as_str().unwrap().starts_with("refused: "));
    assert_eq!(a[2]["outcome"], "ok");
    let human = node.ok(["llm", "audit"]);
    assert_eq!(human.lines().count(), 3, "{human}");
    assert!(human.contains("claude (anthropic claude-test)"), "{human}");

    // A guest given the provider by name uses it on its own budget and log.
    node.ok(["mkguest", "helper"]);
    node.ok(["send", "helper", "use @claude"]);
    node.ok(["adopt", "0", "claude", "--as", "helper"]);
    node.ok(["llm", "budget", "helper", "--tokens", "5"]);
    let (_, err) = node.fail([
        "llm",
        "ask",
        "claude",
        "a prompt longer than five tokens, surely",
        "--as",
        "helper",
    ]);
    assert!(err.contains("budget is exhausted"), "{err}");
    let ga = node.json(["llm", "audit", "--as", "helper"]);
    assert_eq!(ga.as_array().unwrap().len(), 1, "{ga}");
    // The guest cannot raise its own budget, nor add providers.
    let (_, err) = node.fail(["llm", "budget", "--tokens", "0", "--as", "helper"]);
    assert!(err.contains("only a host"), "{err}");
    assert_eq!(node.json(["llm", "audit"]).as_array().unwrap().len(), 3);
}

#[test]
fn bad_input_changes_nothing() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    let names_before = node.names(&[]);
    let list_before = node.json(["llm", "list"]);
    let url = server.url();
    let good_key = key_file(&node, "good", ANTHROPIC_KEY);
    let empty = key_file(&node, "empty", "");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["llm", "add", "x", "--provider", "gemini", "--url", &url],
            "unknown provider",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "anthropic",
                "--key-file",
                "/nonexistent/key",
            ],
            "cannot read the key file",
        ),
        (
            vec!["llm", "add", "x", "--provider", "openai", "--url", &url],
            "needs an API key",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "anthropic",
                "--key-file",
                empty.to_str().unwrap(),
            ],
            "the key file is empty",
        ),
        (
            vec![
                "llm",
                "add",
                "claude",
                "--provider",
                "anthropic",
                "--key-file",
                good_key.to_str().unwrap(),
                "--url",
                &url,
            ],
            "already in use",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "ollama",
                "--url",
                "ftp://host",
            ],
            "invalid --url",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "ollama",
                "--url",
                "http://u:p@127.0.0.1:1",
            ],
            "must not hold credentials",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "ollama",
                "--max-tokens",
                "0",
            ],
            "invalid --max-tokens",
        ),
        (
            vec!["llm", "add", "Bad_Name", "--provider", "ollama"],
            "invalid name",
        ),
        (
            vec![
                "llm",
                "add",
                "x",
                "--provider",
                "ollama",
                "--price-input",
                "cheap",
            ],
            "invalid --price-input",
        ),
        (vec!["llm", "ask", "nosuch", "hi"], "unknown name"),
        (vec!["llm", "remove", "nosuch"], "unknown name"),
        (
            vec!["llm", "budget", "nosuch", "--tokens", "1"],
            "unknown name",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = node.fail(&args);
        assert_ne!(code, 0);
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        let (_, err) = node.fail_json(&args);
        assert!(err.contains(want), "{args:?} --json: {err}");
    }
    // Asking something that is not a provider.
    node.ok(["store", "--text", "hello", "--name", "note"]);
    let (_, err) = node.fail(["llm", "ask", "note", "hi"]);
    assert!(err.contains("not a llm provider"), "{err}");
    node.ok(["remove", "note"]);
    assert_eq!(node.names(&[]), names_before);
    assert_eq!(node.json(["llm", "list"]), list_before);
    assert!(server.requests().is_empty());
}

#[test]
fn removing_a_provider_revokes_every_name_for_it() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    node.ok(["copy", "claude", "claude2"]);
    server.push(Reply::text("via the copy"));
    assert_eq!(node.ok(["llm", "ask", "claude2", "hi"]), "via the copy\n");
    assert_eq!(node.json(["llm", "remove", "claude"]), json!({}));
    assert!(!node.names(&[]).contains("claude"));
    let (_, err) = node.fail(["llm", "ask", "claude2", "hi"]);
    assert!(err.contains("was removed"), "{err}");
    let list: Value = node.json(["llm", "list"]);
    assert_eq!(list, json!([]));
    assert_eq!(server.requests().len(), 1);
}

/// A provider that does not answer within --timeout may have received the
/// request (and bill it): it is not sent again, and the error says what
/// happened instead of "cannot be reached".
#[test]
fn a_timeout_is_not_retried_and_says_so() {
    let node = Node::started();
    let server = LlmServer::start();
    node.ok([
        "llm",
        "add",
        "slow",
        "--provider",
        "ollama",
        "--url",
        &server.url(),
        "--timeout",
        "1",
    ]);
    server.push(Reply::text("too late").after(std::time::Duration::from_secs(3)));
    let (code, err) = node.fail(["llm", "ask", "slow", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"slow\" sent no answer within 1 s"), "{err}");
    assert!(!err.contains("cannot be reached"), "{err}");
    assert_eq!(server.requests().len(), 1, "the request was sent once");
    let audit = node.json(["llm", "audit"]);
    assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
}

/// An answer refused as malformed was still paid for: the usage it
/// reported is charged and audited.
#[test]
fn a_malformed_answer_is_charged_what_it_reported() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    server.push(Reply::Raw(
        r#"{"type":"message","content":"oops","usage":{"input_tokens":40,"output_tokens":7}}"#
            .into(),
    ));
    let (_, err) = node.fail(["llm", "ask", "claude", "hi"]);
    assert!(err.contains("malformed"), "{err}");
    let audit = node.json(["llm", "audit"]);
    assert_eq!(audit[0]["input_tokens"], 40, "{audit}");
    assert_eq!(audit[0]["output_tokens"], 7, "{audit}");
    assert!(
        audit[0]["outcome"].as_str().unwrap().starts_with("error: "),
        "{audit}"
    );
    let b = node.json(["llm", "budget"]);
    assert_eq!(b["tokens_used"], 47, "{b}");
}

/// What each provider's protocol says beyond the happy path: an OpenAI
/// refusal or content filter is no answer, an unfinished Ollama answer is
/// no answer, Ollama under a /v1 URL, and 401/403 errors that say what
/// actually went wrong.
#[test]
fn provider_details_are_reported_as_what_they_are() {
    let node = Node::started();
    let server = LlmServer::start();
    let f = key_file(&node, "gpt", OPENAI_KEY);
    node.ok([
        "llm",
        "add",
        "gpt",
        "--provider",
        "openai",
        "--key-file",
        f.to_str().unwrap(),
        "--url",
        &server.url(),
    ]);
    // a refusal is surfaced, not empty text with exit 0
    server.push(Reply::Raw(
        r#"{"model":"gpt","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I cannot help with that."},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":6}}"#
            .into(),
    ));
    let (code, err) = node.fail(["llm", "ask", "gpt", "something bad"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("\"gpt\"") && err.contains("refused to answer: I cannot help with that."),
        "{err}"
    );
    server.push(Reply::Raw(
        r#"{"model":"gpt","choices":[{"index":0,"message":{"role":"assistant","content":""},"finish_reason":"content_filter"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#
            .into(),
    ));
    let (_, err) = node.fail(["llm", "ask", "gpt", "something worse"]);
    assert!(err.contains("content filter"), "{err}");
    // both were paid for
    let b = node.json(["llm", "budget"]);
    assert_eq!(b["tokens_used"], 17, "{b}");

    // Ollama: an unfinished answer is not an answer; a /v1 URL works
    node.ok([
        "llm",
        "add",
        "local",
        "--provider",
        "ollama",
        "--url",
        &format!("{}/v1", server.url()),
    ]);
    server.push(Reply::Raw(
        r#"{"model":"llama","message":{"role":"assistant","content":"Hel"},"done":false}"#.into(),
    ));
    let (_, err) = node.fail(["llm", "ask", "local", "hi"]);
    assert!(
        err.contains("malformed") && err.contains("not finished"),
        "{err}"
    );
    server.push(Reply::text("via v1"));
    assert_eq!(node.ok(["llm", "ask", "local", "hi"]), "via v1\n");
    assert_eq!(server.requests().last().unwrap().path, "/api/chat");

    // a 403 with a key the provider accepted is not a rejected key
    server.push(Reply::status(403, "no access to this model"));
    let (_, err) = node.fail(["llm", "ask", "gpt", "hi"]);
    assert!(
        err.contains("no access to this model") && err.contains("--model"),
        "{err}"
    );
    assert!(!err.contains("rejected the API key"), "{err}");

    // Ollama behind a proxy asking for a key: none was given, so the error
    // does not blame a key file
    let guarded = LlmServer::start();
    guarded.require_key("proxy-key-0123456789");
    node.ok([
        "llm",
        "add",
        "guarded",
        "--provider",
        "ollama",
        "--url",
        &guarded.url(),
    ]);
    let (_, err) = node.fail(["llm", "ask", "guarded", "hi"]);
    assert!(
        err.contains("none is configured") && err.contains("--key-file"),
        "{err}"
    );
    assert!(!err.contains("check the key file"), "{err}");
    assert!(!err.contains("rejected the API key"), "{err}");
}

/// A call reserves its share of the budget before it is made: its output
/// is capped by what is left, and calls running at once see each other's
/// reservations (one call used 150,000 tokens against a limit of 50).
#[test]
fn budgets_are_reserved_before_the_call_and_cap_its_output() {
    let node = Node::started();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", ANTHROPIC_KEY);
    node.ok(["llm", "budget", "--tokens", "50"]);
    server.push(Reply::text("short"));
    assert_eq!(node.ok(["llm", "ask", "claude", "hi"]), "short\n");
    let max = server.requests()[0].json()["max_tokens"].as_u64().unwrap();
    assert!(max < 50, "max_tokens {max} is not capped by the budget");
    let b = node.json(["llm", "budget"]);
    assert_eq!(b["tokens_used"], 20, "{b}");
    assert_eq!(b["tokens_reserved"], 0, "settled: {b}");

    // two calls at once: the first holds what is left while it runs
    node.ok(["llm", "budget", "--reset"]);
    for _ in 0..2 {
        server.push(
            Reply::Text {
                text: "slow".into(),
                input_tokens: 20,
                output_tokens: 20,
            }
            .after(std::time::Duration::from_millis(1500)),
        );
    }
    let asks: Vec<_> = (0..2)
        .map(|_| node.spawn(["llm", "ask", "claude", "hi"]))
        .collect();
    let results: Vec<_> = asks
        .into_iter()
        .map(|c| c.wait_with_output().expect("llm ask"))
        .collect();
    let ok = results.iter().filter(|r| r.status.success()).count();
    assert_eq!(ok, 1, "{results:#?}");
    let refused = results.iter().find(|r| !r.status.success()).unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("budget is exhausted"), "{err}");
    assert_eq!(server.requests().len(), 2, "one more request, not two");
    let b = node.json(["llm", "budget"]);
    assert_eq!(b["tokens_used"], 40, "{b}");
    assert_eq!(b["tokens_reserved"], 0, "{b}");
}
