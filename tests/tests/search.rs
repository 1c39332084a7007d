//! `capstan mksearch` / `capstan search` end to end (issue 20): the real
//! binary on a real node, thousands of stored values, embeddings from the
//! loopback model server (tests/src/llm_server.rs: its `/v1/embeddings`
//! and `/api/embed` answer with a stand-in concept-bag model, so that a
//! paraphrase lands close to the value it means).

use capstan_tests::control::store_many;
use capstan_tests::llm_server::LlmServer;
use capstan_tests::{Node, texts};
use serde_json::Value;

const KEY: &str = "test-openai-key-5d21b8e4aa90";
const PARAPHRASE: &str = "how much did the plane tickets for my trip cost";
const TARGET: &str = "trip-receipt";
const IDENT: &str = "ORD-7F3A9C-X9Q";

/// `notes` with `fillers` values of noise, distractors that share the
/// paraphrase's words but not its meaning, and the two values the tests
/// look for.
fn corpus(fillers: usize) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = (0..fillers)
        .map(|i| {
            (
                format!("notes.log-{i}"),
                format!(
                    "log entry {i}: sensor {:08x} reading nominal at station {}",
                    (i as u64).wrapping_mul(2_654_435_761) & 0xffff_ffff,
                    i % 97
                ),
            )
        })
        .collect();
    for i in 0..40 {
        v.push((
            format!("notes.team-{i}"),
            format!("how much did we spend for my team offsite number {i}? the answer is pending"),
        ));
    }
    for i in 0..20 {
        v.push((
            format!("notes.paid-{i}"),
            format!("invoice {i} was paid in full"),
        ));
    }
    v.push((
        format!("notes.{TARGET}"),
        "Booked a flight to Lisbon; the airfare came to 420 euros, charged to the card.".into(),
    ));
    v.push((
        "notes.order-shipped".into(),
        format!("Order {IDENT} shipped to warehouse 4"),
    ));
    v.push((
        "notes.sub.recipe".into(),
        "Tomato soup: simmer for forty minutes with basil".into(),
    ));
    v
}

fn add_openai(node: &Node, server: &LlmServer, name: &str) {
    let f = node.home().join(format!("{name}.key"));
    std::fs::write(&f, format!("{KEY}\n")).unwrap();
    node.ok([
        "llm",
        "add",
        name,
        "--provider",
        "openai",
        "--key-file",
        f.to_str().unwrap(),
        "--url",
        &format!("{}/v1", server.url()),
        "--model",
        "gpt-test",
    ]);
}

fn search(node: &Node, name: &str, query: &str, k: &str) -> Value {
    node.json(["search", name, query, "-k", k])
}

fn hit_names(v: &Value) -> Vec<String> {
    v["hits"]
        .as_array()
        .unwrap_or_else(|| panic!("no hits in {v}"))
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn paraphrase_finds_by_vector_and_identifier_by_full_text() {
    let node = Node::started();
    let server = LlmServer::start();
    server.require_key(KEY);
    add_openai(&node, &server, "emb");
    node.ok(["mkdir", "notes"]);
    node.ok(["mkdir", "notes.sub"]);
    let values = corpus(3000);
    store_many(&node, &values).unwrap();

    let made = node.json(["mksearch", "finder", "--over", "notes", "--embed", "emb"]);
    assert_eq!(made["name"], "finder");
    node.ok(["mksearch", "plain", "--over", "notes"]);
    assert_eq!(node.json(["show", "finder"])["type"], "value");

    // A paraphrase: no word in common with the receipt but "the"; the
    // vectors find it, and the fusion puts it first.
    let v = search(&node, "finder", PARAPHRASE, "5");
    assert_eq!(v["mode"], "fused", "{v}");
    assert!(v["indexed"].as_u64().unwrap() >= 3000, "{v}");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    assert_eq!(v["hits"][0]["vector_rank"], 1, "{v}");
    assert_eq!(v["hits"][0]["path"], format!("notes.{TARGET}"));
    assert!(
        v["hits"][0]["snippet"]
            .as_str()
            .unwrap()
            .contains("airfare"),
        "{v}"
    );
    assert!(v["hits"][0]["score"].as_f64().unwrap() > 1.0 / 61.0, "{v}");
    assert!(server.embed_calls() > 0);
    // Full text alone ranks the distractors (which share its words) first.
    let t = search(&node, "plain", PARAPHRASE, "5");
    assert_eq!(t["mode"], "text");
    assert_ne!(
        hit_names(&t).first().map(String::as_str),
        Some(TARGET),
        "{t}"
    );

    // An exact identifier: full text finds it first.
    let v = search(&node, "finder", IDENT, "3");
    assert_eq!(hit_names(&v)[0], "order-shipped", "{v}");
    assert_eq!(v["hits"][0]["text_rank"], 1, "{v}");
    let t = search(&node, "plain", IDENT, "3");
    assert_eq!(hit_names(&t)[0], "order-shipped", "{t}");

    // Subdirectories are searched; hits are names the holder can use.
    let v = search(&node, "plain", "basil soup", "1");
    assert_eq!(hit_names(&v), ["sub.recipe"]);
    assert!(node.ok(["cat", "notes.sub.recipe"]).contains("basil"));

    // A value stored after the index was built is found; a removed one is not.
    node.ok([
        "store",
        "--name",
        "notes.late-note",
        "--text",
        "Our veterinarian visit for the puppy was moved to Friday",
    ]);
    let v = search(&node, "finder", "dog check-up at the animal clinic", "3");
    assert_eq!(hit_names(&v)[0], "late-note", "{v}");
    node.ok(["remove", "notes.order-shipped"]);
    let v = search(&node, "finder", IDENT, "3");
    assert!(!hit_names(&v).contains(&"order-shipped".to_string()), "{v}");

    // The human rendering: score, path, snippet.
    let out = node.ok(["search", "finder", PARAPHRASE, "-k", "2"]);
    assert!(out.contains(&format!("notes.{TARGET}")), "{out}");
}

#[test]
fn ollama_embeddings_route() {
    let node = Node::started();
    let server = LlmServer::start();
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
    node.ok(["mkdir", "notes"]);
    node.ok(["mkdir", "notes.sub"]);
    store_many(&node, &corpus(200)).unwrap();
    node.ok([
        "mksearch",
        "finder",
        "--over",
        "notes",
        "--embed",
        "local",
        "--embed-model",
        "embed-test",
    ]);
    let v = search(&node, "finder", PARAPHRASE, "3");
    assert_eq!(v["mode"], "fused", "{v}");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    // An anthropic provider has no embeddings: refused at mksearch.
    server.add_anthropic(&node, "claude", KEY);
    let (_, err) = node.fail(["mksearch", "x", "--over", "notes", "--embed", "claude"]);
    assert!(err.contains("no embeddings"), "{err}");
}

#[test]
fn index_is_rebuilt_after_kill9_and_follows_new_values() {
    let mut node = Node::started();
    let server = LlmServer::start();
    server.require_key(KEY);
    add_openai(&node, &server, "emb");
    node.ok(["mkdir", "notes"]);
    node.ok(["mkdir", "notes.sub"]);
    store_many(&node, &corpus(500)).unwrap();
    node.ok(["mksearch", "finder", "--over", "notes", "--embed", "emb"]);
    let before = search(&node, "finder", PARAPHRASE, "3");
    assert_eq!(hit_names(&before)[0], TARGET);

    node.kill9();
    node.start();
    node.ok([
        "store",
        "--name",
        "notes.after-crash",
        "--text",
        "Concert passes: the band plays guitar songs on Saturday",
    ]);
    let v = search(&node, "finder", PARAPHRASE, "3");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    assert_eq!(
        v["indexed"].as_u64().unwrap(),
        before["indexed"].as_u64().unwrap() + 1,
        "{v}"
    );
    let v = search(&node, "finder", "live music gig featuring piano", "3");
    assert_eq!(hit_names(&v)[0], "after-crash", "{v}");
    let v = search(&node, "finder", IDENT, "1");
    assert_eq!(hit_names(&v), ["order-shipped"]);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let node = Node::started();
    node.ok(["mkdir", "notes"]);
    node.ok(["store", "--name", "notes.a", "--text", "alpha beta"]);
    node.ok(["mksearch", "finder", "--over", "notes"]);
    let names = node.names(&[]);
    let listed = node.names(&["notes"]);

    let (_, e) = node.fail(["search", "nope", "alpha"]);
    assert!(e.contains("unknown name"), "{e}");
    let (_, e) = node.fail(["search", "finder", "alpha", "-k", "0"]);
    assert!(e.contains("k must be 1 to 100"), "{e}");
    let (_, e) = node.fail(["search", "finder", "alpha", "-k", "101"]);
    assert!(e.contains("k must be 1 to 100"), "{e}");
    let huge = "word ".repeat(2000);
    let (_, e) = node.fail(["search", "finder", huge.as_str()]);
    assert!(e.contains("search query") && e.contains("4096"), "{e}");
    let (_, e) = node.fail_json(["search", "finder", "   "]);
    assert!(e.contains("empty"), "{e}");
    let (_, e) = node.fail(["search", "notes.a", "alpha"]);
    assert!(e.contains("not a search capability"), "{e}");
    let (_, e) = node.fail(["mksearch", "s2", "--over", "notes.a"]);
    assert!(e.contains("not a directory"), "{e}");
    let (_, e) = node.fail(["mksearch", "s3", "--over", "missing"]);
    assert!(e.contains("unknown name"), "{e}");
    let (_, e) = node.fail(["mksearch", "s4", "--over", "notes", "--embed", "notes.a"]);
    assert!(e.contains("not a llm provider"), "{e}");
    let (_, e) = node.fail(["mksearch", "Bad Name", "--over", "notes"]);
    assert!(e.contains("invalid name"), "{e}");

    assert_eq!(node.names(&[]), names);
    assert_eq!(node.names(&["notes"]), listed);
    let v = search(&node, "finder", "alpha", "1");
    assert_eq!(hit_names(&v), ["a"]);
}

/// The llm-agent guest granted a search capability as `search` gets a
/// `search` tool; its answer (hits with names) goes back to the model.
#[test]
fn the_llm_agent_searches_with_the_capability_it_was_granted() {
    use capstan_tests::guest_wasm;
    use capstan_tests::llm_server::Reply;
    use serde_json::json;
    const AKEY: &str = "test-anthropic-key-9b0c41d2e7f3";

    let node = Node::started();
    let server = LlmServer::start();
    server.require_key(AKEY);
    server.add_anthropic(&node, "claude", AKEY);
    node.ok(["mkdir", "notes"]);
    node.ok([
        "store",
        "--name",
        "notes.invoice",
        "--text",
        "Invoice INV-77 from ACME, due in May",
    ]);
    node.ok([
        "store",
        "--name",
        "notes.other",
        "--text",
        "Lunch with Sam on Friday",
    ]);
    node.ok(["mksearch", "finder", "--over", "notes"]);
    let wasm = guest_wasm("llm-agent");
    node.ok([
        "install",
        wasm.as_str(),
        "--name",
        "llm-agent",
        "--grant",
        "llm=claude",
    ]);
    node.ok([
        "mkguest",
        "helper",
        "--component",
        "llm-agent",
        "--with",
        "search=finder",
    ]);

    server.push(Reply::Tools {
        text: String::new(),
        calls: vec![("search".into(), json!({"query": "INV-77", "k": 2}))],
    });
    server.push(Reply::text("It is under invoice."));
    node.ok(["send", "helper", "where", "is", "the", "ACME", "invoice?"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let inbox = node.inbox(&[]);
        if inbox.iter().any(|m| {
            m["from"] == "helper"
                && texts(std::slice::from_ref(m))
                    .concat()
                    .contains("under invoice")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer: {inbox:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let first = reqs[0].json();
    assert!(
        first["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "search"),
        "{first}"
    );
    let second = reqs[1].json().to_string();
    assert!(second.contains(r#"\"name\":\"invoice\""#), "{second}");
    assert!(!second.contains(r#"\"name\":\"other\""#), "{second}");
}

/// `--mail`: the maker's inbox is searched beside the directory; a message
/// is found by a word in it (full text) and by a paraphrase (vectors), as
/// `mail:N`, N its number in the maker's inbox; mail that arrives after the
/// index was built is found too.
#[test]
fn mail_is_found_by_identifier_and_by_paraphrase() {
    let node = Node::started();
    let server = LlmServer::start();
    server.require_key(KEY);
    add_openai(&node, &server, "emb");
    node.ok(["mkdir", "notes"]);
    node.ok([
        "store",
        "--name",
        "notes.groceries",
        "--text",
        "Grocery list: eggs, milk, bread",
    ]);
    node.ok(["mkhost", "alice"]);
    let mail = |text: &str| {
        node.ok(["send", "--as", "alice", "HOST", text]);
    };
    for i in 0..30 {
        mail(&format!("status update {i}: the nightly build passed"));
    }
    for i in 0..10 {
        mail(&format!(
            "how much did we spend for my team offsite number {i}? the answer is pending"
        ));
    }
    mail("Booked a flight to Lisbon; the airfare came to 420 euros, charged to the card.");
    mail(&format!("Your parcel {IDENT} left the depot this morning"));
    node.ok([
        "mksearch", "finder", "--over", "notes", "--mail", "--embed", "emb",
    ]);
    node.ok(["mksearch", "notes-only", "--over", "notes"]);
    let number_of = |text: &str| -> String {
        let inbox = node.inbox(&[]);
        let m = inbox
            .iter()
            .find(|m| texts(std::slice::from_ref(m)).concat().contains(text))
            .unwrap_or_else(|| panic!("no message with {text:?} in {inbox:#?}"));
        format!("mail:{}", m["number"])
    };

    // By paraphrase: the vectors find the message, the fusion puts it first.
    let v = search(&node, "finder", PARAPHRASE, "5");
    assert_eq!(v["mode"], "fused", "{v}");
    assert!(v["indexed"].as_u64().unwrap() >= 43, "{v}");
    assert_eq!(hit_names(&v)[0], number_of("airfare"), "{v}");
    assert_eq!(v["hits"][0]["vector_rank"], 1, "{v}");
    assert_eq!(v["hits"][0]["path"], v["hits"][0]["name"], "{v}");
    assert!(
        v["hits"][0]["snippet"]
            .as_str()
            .unwrap()
            .contains("airfare"),
        "{v}"
    );
    // By an identifier in its text: full text finds it first.
    let v = search(&node, "finder", IDENT, "3");
    assert_eq!(hit_names(&v)[0], number_of(IDENT), "{v}");
    assert_eq!(v["hits"][0]["text_rank"], 1, "{v}");
    // The directory is searched as well.
    let v = search(&node, "finder", "eggs milk", "1");
    assert_eq!(hit_names(&v), ["groceries"], "{v}");
    // Mail that came after the index was built.
    mail("The veterinarian visit for the puppy moved to Friday");
    let v = search(&node, "finder", "dog check-up at the animal clinic", "3");
    assert_eq!(hit_names(&v)[0], number_of("veterinarian"), "{v}");
    // Without --mail, no mail is searched.
    let v = search(&node, "notes-only", IDENT, "3");
    assert!(hit_names(&v).iter().all(|n| !n.starts_with("mail:")), "{v}");
}

/// Two nodes on etcd: values stored through one are found by a search run
/// through the other (which builds its own index, then follows the
/// directory's change log as the first node writes); after `kill -9` of
/// the node that built that index, the other one answers (building its
/// own from the store).
#[test]
fn a_search_through_another_node_finds_what_was_stored_and_survives_its_kill9() {
    let Some(spec) = capstan_tests::etcd_spec("search") else {
        return;
    };
    let mut nodes = capstan_tests::start_cluster(&spec, 2, "5000");
    let server = LlmServer::start();
    server.require_key(KEY);
    add_openai(&nodes[0], &server, "emb");
    nodes[0].ok(["mkdir", "notes"]);
    nodes[0].ok(["mkdir", "notes.sub"]);
    store_many(&nodes[0], &corpus(1000)).unwrap();
    nodes[0].ok(["mksearch", "finder", "--over", "notes", "--embed", "emb"]);

    // Through node 2, which builds the index.
    let v = search(&nodes[1], "finder", PARAPHRASE, "3");
    assert_eq!(v["mode"], "fused", "{v}");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    assert!(v["indexed"].as_u64().unwrap() >= 1000, "{v}");
    let v = search(&nodes[1], "finder", IDENT, "1");
    assert_eq!(hit_names(&v), ["order-shipped"], "{v}");
    // Written through node 1 after that: node 2's index follows.
    nodes[0].ok([
        "store",
        "--name",
        "notes.late-note",
        "--text",
        "Our veterinarian visit for the puppy was moved to Friday",
    ]);
    nodes[0].ok(["remove", "notes.order-shipped"]);
    let v = search(
        &nodes[1],
        "finder",
        "dog check-up at the animal clinic",
        "3",
    );
    assert_eq!(hit_names(&v)[0], "late-note", "{v}");
    let v = search(&nodes[1], "finder", IDENT, "3");
    assert!(!hit_names(&v).contains(&"order-shipped".to_string()), "{v}");
    let indexed = v["indexed"].as_u64().unwrap();

    // The node that built that index dies; the other answers.
    nodes[1].kill9();
    let v = search(&nodes[0], "finder", PARAPHRASE, "3");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    assert_eq!(v["indexed"].as_u64().unwrap(), indexed, "{v}");
    let v = search(
        &nodes[0],
        "finder",
        "dog check-up at the animal clinic",
        "3",
    );
    assert_eq!(hit_names(&v)[0], "late-note", "{v}");
    nodes[0].ok([
        "store",
        "--name",
        "notes.sub.after-kill",
        "--text",
        "Concert passes: the band plays guitar songs on Saturday",
    ]);
    let v = search(&nodes[0], "finder", "live music gig featuring piano", "3");
    assert_eq!(hit_names(&v)[0], "sub.after-kill", "{v}");
    nodes[0].stop();
}

/// Embedding requests are charged to the searching agent's LLM budget and
/// written to its audit log, like model calls. Once the budget is spent, a
/// search that needs embeddings is refused with the budget's error (it does
/// not fall back to full text: a caller asking a vector search learns why it
/// gets none), and no request reaches the provider; a full-text capability
/// still answers; raising the budget lets the search through again.
#[test]
fn embeddings_are_charged_and_an_exhausted_budget_refuses_the_search() {
    let node = Node::started();
    let server = LlmServer::start();
    server.require_key(KEY);
    add_openai(&node, &server, "emb");
    node.ok(["mkdir", "notes"]);
    node.ok(["mkdir", "notes.sub"]);
    store_many(&node, &corpus(100)).unwrap();
    node.ok(["mksearch", "finder", "--over", "notes", "--embed", "emb"]);
    node.ok(["mksearch", "plain", "--over", "notes"]);

    let v = search(&node, "finder", PARAPHRASE, "3");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
    let b = node.json(["llm", "budget"]);
    let used = b["tokens_used"].as_u64().unwrap();
    // the documents (more than 100 values, in batches of 64) and the query
    assert!(used > 100, "{b}");
    assert!(b["calls"].as_u64().unwrap() >= 3, "{b}");
    let audit = node.json(["llm", "audit"]);
    let embeds: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "openai embeddings")
        .collect();
    assert!(embeds.len() >= 3, "{audit}");
    for e in &embeds {
        assert_eq!(e["provider"], "emb", "{e}");
        assert_eq!(e["model"], "text-embedding-3-small", "{e}");
        assert_eq!(e["outcome"], "ok", "{e}");
        assert!(e["input_tokens"].as_u64().unwrap() > 0, "{e}");
    }
    let charged: u64 = embeds
        .iter()
        .map(|e| e["input_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(charged, used, "{audit}");

    // Spent: the limit is what was used.
    node.ok(["llm", "budget", "--tokens", &used.to_string()]);
    let calls = server.embed_calls();
    let (code, err) = node.fail(["search", "finder", PARAPHRASE]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("budget is exhausted") && err.contains("embeddings"),
        "{err}"
    );
    assert!(err.contains("capstan llm budget"), "{err}");
    assert_eq!(
        server.embed_calls(),
        calls,
        "a refused request reached the provider"
    );
    let audit = node.json(["llm", "audit"]);
    let last = audit.as_array().unwrap().last().unwrap();
    assert_eq!(last["kind"], "openai embeddings", "{last}");
    assert!(
        last["outcome"].as_str().unwrap().starts_with("refused: "),
        "{last}"
    );
    // Full text needs no embeddings.
    let t = search(&node, "plain", IDENT, "1");
    assert_eq!(hit_names(&t), ["order-shipped"], "{t}");

    // Raised: vectors again.
    node.ok(["llm", "budget", "--tokens", "10000000"]);
    let v = search(&node, "finder", PARAPHRASE, "3");
    assert_eq!(v["mode"], "fused", "{v}");
    assert_eq!(hit_names(&v)[0], TARGET, "{v}");
}

/// Many writes between searches: the index follows the directory's change
/// log through closed and trimmed epochs (one capability searched after
/// every round of writes), and a second capability over the same directory
/// that was searched once, long ago, finds its log trimmed past and lists
/// the directory again: both answer with every value.
#[test]
fn the_index_follows_many_writes_and_an_index_left_behind_catches_up() {
    let node = Node::started();
    node.ok(["mkdir", "notes"]);
    node.ok(["store", "--name", "notes.first", "--text", "the first note"]);
    node.ok(["mksearch", "often", "--over", "notes"]);
    node.ok(["mksearch", "seldom", "--over", "notes"]);
    assert_eq!(hit_names(&search(&node, "seldom", "first", "1")), ["first"]);
    let rounds = 20;
    for r in 0..rounds {
        let values: Vec<(String, String)> = (0..300)
            .map(|i| {
                (
                    format!("notes.r{r}-{i}"),
                    format!("round {r} value {i} code R{r}X{i}Z"),
                )
            })
            .collect();
        store_many(&node, &values).unwrap();
        let v = search(&node, "often", &format!("R{r}X7Z"), "1");
        assert_eq!(hit_names(&v), [format!("r{r}-7")], "{v}");
        assert_eq!(v["indexed"].as_u64().unwrap(), 1 + 300 * (r + 1), "{v}");
        // a second search in the same round closes the epoch (>= 256 entries)
        let v = search(&node, "often", &format!("R{r}X299Z"), "1");
        assert_eq!(hit_names(&v), [format!("r{r}-299")], "{v}");
    }
    node.ok(["remove", "notes.r3-5"]);
    for cap in ["often", "seldom"] {
        let v = search(&node, cap, "R19X250Z", "1");
        assert_eq!(hit_names(&v), ["r19-250"], "{cap}: {v}");
        let v = search(&node, cap, "R3X5Z", "1");
        assert!(!hit_names(&v).contains(&"r3-5".to_string()), "{cap}: {v}");
        assert_eq!(v["indexed"].as_u64().unwrap(), 300 * rounds, "{cap}: {v}");
    }
}

/// The packaged local embedding model (`scripts/embed-model`, set by
/// `scripts/test`), or None (the test is skipped) when there is none and
/// none is required.
fn embed_model() -> Option<String> {
    match std::env::var("CAPSTAN_EMBED_MODEL") {
        Ok(d) if !d.is_empty() => Some(d),
        _ => {
            assert!(
                std::env::var("CAPSTAN_REQUIRE_EMBED_MODEL").as_deref() != Ok("1"),
                "CAPSTAN_REQUIRE_EMBED_MODEL=1 but CAPSTAN_EMBED_MODEL is not set (scripts/embed-model)"
            );
            eprintln!("skipped: no CAPSTAN_EMBED_MODEL (scripts/embed-model)");
            None
        }
    }
}

/// With no provider, a node started with `--embed-model` gets vectors from
/// the packaged local model: over a few thousand values, a query that
/// shares no word with the value it means finds it, an exact identifier
/// is found by full text; the same node started without the model searches full
/// text only and does not. A folder that holds no model is refused at
/// `start`, and nothing starts.
#[test]
fn the_local_model_finds_a_paraphrase_without_a_provider() {
    let Some(model) = embed_model() else { return };
    // No word in common with the value it means (nor with any other).
    const QUERY: &str = "forecast says storms near shore";
    let mut node = Node::new();
    let bad = node.home().with_file_name("no-model-here");
    std::fs::create_dir_all(&bad).unwrap();
    let r = node.run(["start", "--embed-model", bad.to_str().unwrap()]);
    assert!(!r.success());
    assert!(
        r.stderr.contains("holds no embedding model"),
        "{}",
        r.stderr
    );
    assert!(!node.run(["status"]).success(), "a daemon started anyway");

    node.start_with(&["--embed-model", &model]);
    node.ok(["mkdir", "notes"]);
    let mut values: Vec<(String, String)> = [
        ("sales", "sales increased in the north this quarter"),
        ("recipe", "the recipe needs two eggs and a cup of flour"),
        (
            "weather",
            "heavy rain is expected across the coast tomorrow",
        ),
        (
            "password",
            "to reset a forgotten password open the account settings",
        ),
        (
            "flight",
            "the flight to lisbon leaves at seven in the morning",
        ),
        ("dentist", "dentist appointment moved to thursday afternoon"),
        ("garden", "plant the tomato seedlings after the last frost"),
        ("rent", "the landlord raised the rent for next year"),
        ("order", "order ORD-7F3A9C-X9Q shipped to the warehouse"),
    ]
    .iter()
    .map(|(n, t)| (format!("notes.{n}"), t.to_string()))
    .collect();
    values.extend((0..2000).map(|i| {
        (
            format!("notes.log-{i}"),
            format!(
                "log entry {i}: sensor {:08x} reading nominal at station {}",
                (i as u64).wrapping_mul(2_654_435_761) & 0xffff_ffff,
                i % 97
            ),
        )
    }));
    store_many(&node, &values).unwrap();
    let made = node.json(["mksearch", "finder", "--over", "notes"]);
    assert_eq!(made["embed"], Value::Null, "{made}");

    let v = search(&node, "finder", QUERY, "3");
    assert_eq!(v["mode"], "fused", "{v}");
    assert!(
        v["vectors"].as_str().unwrap().starts_with("local model"),
        "{v}"
    );
    assert_eq!(hit_names(&v)[0], "weather", "{v}");
    assert_eq!(v["hits"][0]["vector_rank"], 1, "{v}");
    assert_eq!(v["hits"][0]["text_rank"], Value::Null, "{v}");
    assert!(v["indexed"].as_u64().unwrap() >= 2000, "{v}");
    // An exact identifier: full text finds it.
    let v = search(&node, "finder", IDENT, "3");
    assert_eq!(hit_names(&v)[0], "order", "{v}");
    assert_eq!(v["hits"][0]["text_rank"], 1, "{v}");
    // A value stored after the index was built gets its vector too.
    node.ok([
        "store",
        "--name",
        "notes.server",
        "--text",
        "the database server ran out of disk space overnight",
    ]);
    let v = search(&node, "finder", "the disk filled up on the db machine", "1");
    assert_eq!(hit_names(&v), ["server"], "{v}");
    assert_eq!(v["hits"][0]["vector_rank"], 1, "{v}");
    assert_eq!(v["notes"], serde_json::json!([]), "{v}");

    // Without the model: full text only, which cannot find it.
    node.kill9();
    node.start();
    let t = search(&node, "finder", QUERY, "3");
    assert_eq!(t["mode"], "text", "{t}");
    assert_eq!(t["vectors"], Value::Null, "{t}");
    assert!(!hit_names(&t).contains(&"weather".to_string()), "{t}");
}
