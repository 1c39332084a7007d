//! A scripted LLM provider on 127.0.0.1 for tests: a real HTTP/1.1 server
//! (std threads, one request per connection) that speaks the Anthropic
//! Messages, Ollama chat and OpenAI chat-completions protocols, chosen by
//! the request path, and answers from a script.
//!
//! - [`LlmServer::push`] queues the next answers: text, tool calls, an HTTP
//!   error status (optionally with `Retry-After`), or a raw body (for
//!   malformed answers). With an empty script it answers 500.
//!   [`Reply::after`] sends one late (a slow model).
//! - [`LlmServer::require_key`]: requests without that key (`x-api-key` for
//!   Anthropic, `Authorization: Bearer` otherwise) get the provider's 401,
//!   without consuming the script.
//! - [`LlmServer::requests`]: every request received (method, path,
//!   headers, body), so tests can check what reached the provider.
//! - Embeddings (`POST /v1/embeddings`, `POST /api/embed`) are answered
//!   outside the script by a stand-in model, [`concept_embedding`]: a bag
//!   of concepts, so that paraphrases come out close. It is not a real
//!   embedding model; it makes vector search testable and deterministic.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A text answer with the token usage to report.
    Text {
        text: String,
        input_tokens: u64,
        output_tokens: u64,
    },
    /// Tool calls `(name, arguments)`, with optional text.
    Tools {
        text: String,
        calls: Vec<(String, Value)>,
    },
    /// An HTTP error with the provider's error body.
    Status {
        status: u16,
        message: String,
        retry_after: Option<u64>,
    },
    /// HTTP 200 with exactly this body.
    Raw(String),
    /// The reply, sent after this long (a slow model).
    Slow(Duration, Box<Reply>),
}

impl Reply {
    pub fn text(t: &str) -> Reply {
        Reply::Text {
            text: t.to_string(),
            input_tokens: 12,
            output_tokens: 8,
        }
    }

    /// `self`, sent after `delay`.
    pub fn after(self, delay: Duration) -> Reply {
        Reply::Slow(delay, Box::new(self))
    }

    pub fn status(status: u16, message: &str) -> Reply {
        Reply::Status {
            status,
            message: message.to_string(),
            retry_after: None,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    requests: Vec<Recorded>,
    key: Option<String>,
    /// Embedding requests answered (not kept in `requests`: there are many).
    embed_calls: u64,
}

/// The server; stops when dropped.
pub struct LlmServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LlmServer {
    pub fn start() -> LlmServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake LLM server");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        LlmServer {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn push(&self, r: Reply) {
        self.state.lock().unwrap().script.push_back(r);
    }

    pub fn require_key(&self, key: &str) {
        self.state.lock().unwrap().key = Some(key.to_string());
    }

    /// Configures this server on `node` as the Anthropic provider `name`
    /// (model `claude-test`) with `key`, read from a key file in the
    /// node's home as a host would give it.
    pub fn add_anthropic(&self, node: &crate::Node, name: &str, key: &str) {
        let f = node.home().join(format!("{name}.key"));
        std::fs::write(&f, format!("{key}\n")).unwrap();
        node.ok([
            "llm",
            "add",
            name,
            "--provider",
            "anthropic",
            "--key-file",
            f.to_str().unwrap(),
            "--url",
            &self.url(),
            "--model",
            "claude-test",
        ]);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many embedding requests (`/v1/embeddings`, `/api/embed`) it answered.
    pub fn embed_calls(&self) -> u64 {
        self.state.lock().unwrap().embed_calls
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // the wake-up connection of Drop
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let rec = Recorded {
        method,
        path: path.clone(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    if path == "/v1/embeddings" || path == "/api/embed" {
        let mut st = state.lock().unwrap();
        let authorized = match &st.key {
            None => true,
            Some(k) => rec.header("authorization") == Some(format!("Bearer {k}").as_str()),
        };
        let body = rec.body;
        st.embed_calls += 1;
        drop(st);
        if !authorized {
            return respond(conn, 401, "{\"error\":\"invalid api key\"}", None);
        }
        return match embeddings_answer(&path, &body) {
            Ok(b) => respond(conn, 200, &b, None),
            Err(e) => respond(conn, 400, &json!({"error": e}).to_string(), None),
        };
    }
    let proto = match path.as_str() {
        "/v1/messages" => Proto::Anthropic,
        "/api/chat" => Proto::Ollama,
        "/v1/chat/completions" => Proto::OpenAi,
        _ => {
            state.lock().unwrap().requests.push(rec);
            return respond(conn, 404, "{\"error\":\"no such endpoint\"}", None);
        }
    };
    let reply = {
        let mut st = state.lock().unwrap();
        let authorized = match &st.key {
            None => true,
            Some(k) => match proto {
                Proto::Anthropic => rec.header("x-api-key") == Some(k.as_str()),
                _ => rec.header("authorization") == Some(format!("Bearer {k}").as_str()),
            },
        };
        st.requests.push(rec);
        if authorized {
            st.script
                .pop_front()
                .unwrap_or_else(|| Reply::status(500, "the test script is exhausted"))
        } else {
            Reply::status(401, "invalid x-api-key")
        }
    };
    let reply = match reply {
        Reply::Slow(delay, r) => {
            thread::sleep(delay);
            *r
        }
        r => r,
    };
    let (status, body, retry_after) = render(proto, reply);
    respond(conn, status, &body, retry_after)
}

/// The stand-in embedding model's concepts: a text's vector counts, per
/// concept, the words of the text that belong to it (plural `s` dropped).
/// Paraphrases that use other words for the same things come out close;
/// texts with none of these words get the zero vector. A stand-in for a
/// real model, deterministic so that tests can say what must be found.
pub const CONCEPTS: &[&[&str]] = &[
    &[
        "invoice", "bill", "payment", "paid", "pay", "cost", "price", "charge", "charged", "money",
        "euro", "dollar", "fare", "airfare", "expense", "refund", "fee",
    ],
    &[
        "flight", "plane", "airplane", "airport", "trip", "travel", "journey", "vacation",
        "holiday", "ticket", "booked", "booking", "hotel", "airline",
    ],
    &[
        "recipe",
        "cook",
        "cooking",
        "dinner",
        "meal",
        "food",
        "bake",
        "kitchen",
        "lunch",
        "soup",
        "breakfast",
    ],
    &[
        "doctor",
        "dentist",
        "medicine",
        "health",
        "sick",
        "illness",
        "hospital",
        "appointment",
        "physician",
        "clinic",
    ],
    &[
        "car",
        "vehicle",
        "automobile",
        "engine",
        "mechanic",
        "tire",
        "tyre",
        "garage",
    ],
    &[
        "dog",
        "cat",
        "pet",
        "puppy",
        "kitten",
        "vet",
        "veterinarian",
        "animal",
    ],
    &[
        "music", "song", "concert", "guitar", "piano", "band", "melody",
    ],
    &[
        "house",
        "home",
        "apartment",
        "flat",
        "rent",
        "landlord",
        "lease",
        "tenant",
    ],
    &[
        "weather",
        "rain",
        "sunny",
        "forecast",
        "temperature",
        "storm",
        "snow",
    ],
    &[
        "code", "bug", "software", "program", "compile", "deploy", "server", "crash",
    ],
];

/// The stand-in embedding of `text` (see [`CONCEPTS`]).
pub fn concept_embedding(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; CONCEPTS.len()];
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = w.to_lowercase();
        let stem = w.strip_suffix('s').unwrap_or(&w);
        for (i, c) in CONCEPTS.iter().enumerate() {
            if c.contains(&w.as_str()) || c.contains(&stem) {
                v[i] += 1.0;
            }
        }
    }
    v
}

/// The answer to an embeddings request: OpenAI's `/v1/embeddings` or
/// Ollama's `/api/embed`, both with `input` a text or a list of texts.
fn embeddings_answer(path: &str, body: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("bad JSON: {e}"))?;
    let inputs: Vec<String> = match &v["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or("input must hold texts")
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("input is missing".into()),
    };
    let vecs: Vec<Vec<f32>> = inputs.iter().map(|t| concept_embedding(t)).collect();
    // Usage as the providers report it: a token per word.
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    Ok(if path == "/api/embed" {
        json!({"model": v["model"], "embeddings": vecs, "prompt_eval_count": tokens}).to_string()
    } else {
        let data: Vec<Value> = vecs
            .into_iter()
            .enumerate()
            .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
            .collect();
        json!({"object": "list", "model": v["model"], "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        .to_string()
    })
}

#[derive(Clone, Copy)]
enum Proto {
    Anthropic,
    Ollama,
    OpenAi,
}

fn render(proto: Proto, reply: Reply) -> (u16, String, Option<u64>) {
    match reply {
        Reply::Raw(body) => (200, body, None),
        Reply::Slow(_, r) => render(proto, *r),
        Reply::Status {
            status,
            message,
            retry_after,
        } => {
            let body = match proto {
                Proto::Anthropic => {
                    json!({"type": "error", "error": {"type": "error", "message": message}})
                }
                Proto::Ollama => json!({"error": message}),
                Proto::OpenAi => json!({"error": {"message": message, "type": "error"}}),
            };
            (status, body.to_string(), retry_after)
        }
        Reply::Text {
            text,
            input_tokens,
            output_tokens,
        } => (
            200,
            answer(proto, &text, &[], input_tokens, output_tokens).to_string(),
            None,
        ),
        Reply::Tools { text, calls } => {
            (200, answer(proto, &text, &calls, 20, 10).to_string(), None)
        }
    }
}

fn answer(proto: Proto, text: &str, calls: &[(String, Value)], input: u64, output: u64) -> Value {
    match proto {
        Proto::Anthropic => {
            let mut content = Vec::new();
            if !text.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
            for (i, (name, args)) in calls.iter().enumerate() {
                content.push(json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": args}));
            }
            json!({
                "id": "msg_test", "type": "message", "role": "assistant", "model": "fake-anthropic",
                "content": content,
                "stop_reason": if calls.is_empty() { "end_turn" } else { "tool_use" },
                "usage": {"input_tokens": input, "output_tokens": output},
            })
        }
        Proto::Ollama => {
            let mut message = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                message["tool_calls"] = calls
                    .iter()
                    .map(|(name, args)| json!({"function": {"name": name, "arguments": args}}))
                    .collect();
            }
            json!({
                "model": "fake-ollama", "message": message, "done": true, "done_reason": "stop",
                "prompt_eval_count": input, "eval_count": output,
            })
        }
        Proto::OpenAi => {
            let mut message = json!({"role": "assistant",
                "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                message["tool_calls"] = calls
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({"id": format!("call_{i}"), "type": "function",
                               "function": {"name": name, "arguments": args.to_string()}})
                    })
                    .collect();
            }
            json!({
                "id": "chatcmpl-test", "object": "chat.completion", "model": "fake-openai",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": if calls.is_empty() { "stop" } else { "tool_calls" }}],
                "usage": {"prompt_tokens": input, "completion_tokens": output},
            })
        }
    }
}

fn respond(
    mut conn: TcpStream,
    status: u16,
    body: &str,
    retry_after: Option<u64>,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(s) = retry_after {
        head.push_str(&format!("retry-after: {s}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}
