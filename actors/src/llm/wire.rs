//! The three wire protocols, as pure functions: a [`ChatRequest`] to a JSON
//! body, a JSON answer to a [`ChatResponse`]. No I/O here.
//!
//! - Anthropic Messages: `POST /v1/messages`; the system prompt is a
//!   top-level field; content is a list of blocks (`text`, `tool_use`,
//!   `tool_result`); tool results travel in a `user` turn.
//! - Ollama chat: `POST /api/chat` with `stream: false`; tool calls have no
//!   ids (we number them) and arguments are objects; results are `tool`
//!   messages carrying the tool's name.
//! - OpenAI-compatible chat completions: `POST /v1/chat/completions`; tool
//!   call arguments are a JSON *string*; results are `tool` messages with
//!   `tool_call_id`.

use serde_json::{Map, Value, json};

use super::ProviderKind;
use super::types::{ChatMessage, ChatRequest, ChatResponse, StopReason, ToolCall, Usage};

/// Most tool calls accepted in one answer.
pub const MAX_TOOL_CALLS: usize = 64;

/// The version header Anthropic's API requires.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The endpoint of `kind` under the base `url`.
pub fn endpoint(kind: ProviderKind, url: &str) -> String {
    let base = url.trim_end_matches('/');
    match kind {
        ProviderKind::Anthropic => {
            if base.ends_with("/v1") {
                format!("{base}/messages")
            } else {
                format!("{base}/v1/messages")
            }
        }
        // Ollama's native API is not under /v1 (that is its OpenAI-compatible one)
        ProviderKind::Ollama => format!("{}/api/chat", base.trim_end_matches("/v1")),
        ProviderKind::OpenAi => {
            if base.ends_with("/v1") {
                format!("{base}/chat/completions")
            } else {
                format!("{base}/v1/chat/completions")
            }
        }
    }
}

/// The JSON body of a request.
pub fn request_body(kind: ProviderKind, model: &str, max_tokens: u32, req: &ChatRequest) -> Value {
    match kind {
        ProviderKind::Anthropic => anthropic_body(model, max_tokens, req),
        ProviderKind::Ollama => ollama_body(model, max_tokens, req),
        ProviderKind::OpenAi => openai_body(model, max_tokens, req),
    }
}

fn anthropic_body(model: &str, max_tokens: u32, req: &ChatRequest) -> Value {
    // Anthropic wants alternating turns: consecutive user-side blocks
    // (text and tool results) are merged into one user turn.
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    let mut push = |role: &'static str, block: Value| {
        if matches!(turns.last(), Some((r, _)) if *r == role) {
            if let Some((_, blocks)) = turns.last_mut() {
                blocks.push(block);
            }
        } else {
            turns.push((role, vec![block]));
        }
    };
    for m in &req.messages {
        match m {
            ChatMessage::User { text, .. } => push("user", json!({"type": "text", "text": text})),
            ChatMessage::Assistant { text, tool_calls } => {
                if !text.is_empty() {
                    push("assistant", json!({"type": "text", "text": text}));
                }
                for c in tool_calls {
                    push(
                        "assistant",
                        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}),
                    );
                }
            }
            ChatMessage::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => push(
                "user",
                json!({"type": "tool_result", "tool_use_id": call_id, "content": content, "is_error": is_error}),
            ),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let mut body = json!({"model": model, "max_tokens": max_tokens, "messages": messages});
    if let Some(s) = &req.system {
        body["system"] = json!(s);
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(
                |t| json!({"name": t.name, "description": t.description, "input_schema": t.schema}),
            )
            .collect();
    }
    body
}

fn function_tools(req: &ChatRequest) -> Value {
    req.tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.schema}})
        })
        .collect()
}

fn ollama_body(model: &str, max_tokens: u32, req: &ChatRequest) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = &req.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    for m in &req.messages {
        messages.push(match m {
            ChatMessage::User { text, .. } => json!({"role": "user", "content": text}),
            ChatMessage::Assistant { text, tool_calls } => {
                let mut v = json!({"role": "assistant", "content": text});
                if !tool_calls.is_empty() {
                    v["tool_calls"] = tool_calls
                        .iter()
                        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
                        .collect();
                }
                v
            }
            ChatMessage::ToolResult { name, content, .. } => {
                json!({"role": "tool", "content": content, "tool_name": name})
            }
        });
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": false,
        "options": {"num_predict": max_tokens},
    });
    if !req.tools.is_empty() {
        body["tools"] = function_tools(req);
    }
    body
}

fn openai_body(model: &str, max_tokens: u32, req: &ChatRequest) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = &req.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    for m in &req.messages {
        messages.push(match m {
            ChatMessage::User { text, .. } => json!({"role": "user", "content": text}),
            ChatMessage::Assistant { text, tool_calls } => {
                let mut v = json!({"role": "assistant",
                    "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
                if !tool_calls.is_empty() {
                    v["tool_calls"] = tool_calls
                        .iter()
                        .map(|c| {
                            json!({"id": c.id, "type": "function", "function": {
                                "name": c.name, "arguments": c.arguments.to_string()}})
                        })
                        .collect();
                }
                v
            }
            ChatMessage::ToolResult {
                call_id, content, ..
            } => json!({"role": "tool", "tool_call_id": call_id, "content": content}),
        });
    }
    // `max_tokens` is deprecated there, and refused by reasoning models
    let mut body =
        json!({"model": model, "messages": messages, "max_completion_tokens": max_tokens});
    if !req.tools.is_empty() {
        body["tools"] = function_tools(req);
    }
    body
}

/// What was wrong with a provider's answer (the caller names the provider).
pub type Malformed = String;

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, Malformed> {
    v.get(name)
        .ok_or_else(|| format!("the answer has no \"{name}\" field"))
}

fn str_field<'a>(v: &'a Value, name: &str) -> Result<&'a str, Malformed> {
    field(v, name)?
        .as_str()
        .ok_or_else(|| format!("\"{name}\" is not a string"))
}

fn count(v: &Value, name: &str) -> u64 {
    v.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// Tool arguments must be a JSON object (a string holding one is accepted).
fn arguments(v: &Value, what: &str) -> Result<Value, Malformed> {
    match v {
        Value::Object(_) => Ok(v.clone()),
        Value::Null => Ok(Value::Object(Map::new())),
        Value::String(s) if s.trim().is_empty() => Ok(Value::Object(Map::new())),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(o @ Value::Object(_)) => Ok(o),
            _ => Err(format!("{what}: tool call arguments are not a JSON object")),
        },
        _ => Err(format!("{what}: tool call arguments are not a JSON object")),
    }
}

fn check_calls(calls: &[ToolCall]) -> Result<(), Malformed> {
    if calls.len() > MAX_TOOL_CALLS {
        return Err(format!(
            "{} tool calls in one answer (at most {MAX_TOOL_CALLS})",
            calls.len()
        ));
    }
    for c in calls {
        if c.name.is_empty() || c.name.len() > 128 {
            return Err("a tool call without a valid name".into());
        }
    }
    Ok(())
}

/// Parses a successful (HTTP 2xx) answer.
pub fn parse_response(kind: ProviderKind, body: &[u8]) -> Result<ChatResponse, Malformed> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not valid JSON ({e})"))?;
    if !v.is_object() {
        return Err("the answer is not a JSON object".into());
    }
    let r = match kind {
        ProviderKind::Anthropic => parse_anthropic(&v),
        ProviderKind::Ollama => parse_ollama(&v),
        ProviderKind::OpenAi => parse_openai(&v),
    }?;
    check_calls(&r.tool_calls)?;
    Ok(r)
}

fn parse_anthropic(v: &Value) -> Result<ChatResponse, Malformed> {
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return Err(format!(
            "the answer is an error: {}",
            error_message(ProviderKind::Anthropic, v).unwrap_or_default()
        ));
    }
    let content = field(v, "content")?
        .as_array()
        .ok_or("\"content\" is not a list")?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(str_field(block, "text")?),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: str_field(block, "id")?.to_string(),
                name: str_field(block, "name")?.to_string(),
                arguments: arguments(block.get("input").unwrap_or(&Value::Null), "tool_use")?,
            }),
            Some(_) => {} // thinking, redacted_thinking, …: not for us
            None => return Err("a content block without a \"type\"".into()),
        }
    }
    let stop = match v.get("stop_reason").and_then(Value::as_str) {
        Some("end_turn") | None => StopReason::EndTurn,
        Some("tool_use") => StopReason::ToolUse,
        Some("max_tokens") => StopReason::MaxTokens,
        Some("stop_sequence") => StopReason::StopSequence,
        Some(other) => StopReason::Other(other.to_string()),
    };
    let usage = v.get("usage").cloned().unwrap_or(Value::Null);
    Ok(ChatResponse {
        text,
        tool_calls,
        stop,
        usage: Usage {
            input_tokens: count(&usage, "input_tokens"),
            output_tokens: count(&usage, "output_tokens"),
        },
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

fn parse_ollama(v: &Value) -> Result<ChatResponse, Malformed> {
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(format!("the answer is an error: {e}"));
    }
    if v.get("done") == Some(&Value::Bool(false)) {
        return Err(
            "the answer is not finished (\"done\": false): a streamed part, not a whole answer"
                .into(),
        );
    }
    let message = field(v, "message")?;
    if !message.is_object() {
        return Err("\"message\" is not an object".into());
    }
    let text = match message.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("\"message.content\" is not a string".into()),
    };
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls
            .as_array()
            .ok_or("\"message.tool_calls\" is not a list")?;
        for (i, c) in calls.iter().enumerate() {
            let f = field(c, "function")?;
            tool_calls.push(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("call_{i}")),
                name: str_field(f, "name")?.to_string(),
                arguments: arguments(f.get("arguments").unwrap_or(&Value::Null), "tool call")?,
            });
        }
    }
    let stop = if !tool_calls.is_empty() {
        StopReason::ToolUse
    } else {
        match v.get("done_reason").and_then(Value::as_str) {
            Some("stop") | None => StopReason::EndTurn,
            Some("length") => StopReason::MaxTokens,
            Some(other) => StopReason::Other(other.to_string()),
        }
    };
    Ok(ChatResponse {
        text,
        tool_calls,
        stop,
        usage: Usage {
            input_tokens: count(v, "prompt_eval_count"),
            output_tokens: count(v, "eval_count"),
        },
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

fn parse_openai(v: &Value) -> Result<ChatResponse, Malformed> {
    if v.get("error").is_some_and(|e| !e.is_null()) {
        return Err(format!(
            "the answer is an error: {}",
            error_message(ProviderKind::OpenAi, v).unwrap_or_default()
        ));
    }
    let choices = field(v, "choices")?
        .as_array()
        .ok_or("\"choices\" is not a list")?;
    let choice = choices.first().ok_or("\"choices\" is empty")?;
    let message = field(choice, "message")?;
    let text = match message.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("\"message.content\" is not a string".into()),
    };
    // The model declined: its refusal is the answer, and the call fails.
    if let Some(r) = message.get("refusal").and_then(Value::as_str)
        && !r.trim().is_empty()
    {
        return Ok(ChatResponse {
            text: r.to_string(),
            tool_calls: Vec::new(),
            stop: StopReason::Other(REFUSAL.into()),
            usage: openai_usage(v),
            model: v
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls
            .as_array()
            .ok_or("\"message.tool_calls\" is not a list")?;
        for (i, c) in calls.iter().enumerate() {
            let f = field(c, "function")?;
            tool_calls.push(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("call_{i}")),
                name: str_field(f, "name")?.to_string(),
                arguments: arguments(f.get("arguments").unwrap_or(&Value::Null), "tool call")?,
            });
        }
    }
    let stop = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("stop") | None => {
            if tool_calls.is_empty() {
                StopReason::EndTurn
            } else {
                StopReason::ToolUse
            }
        }
        Some("tool_calls") | Some("function_call") => StopReason::ToolUse,
        Some("length") => StopReason::MaxTokens,
        Some(other) => StopReason::Other(other.to_string()),
    };
    Ok(ChatResponse {
        text,
        tool_calls,
        stop,
        usage: openai_usage(v),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

fn openai_usage(v: &Value) -> Usage {
    let u = v.get("usage").cloned().unwrap_or(Value::Null);
    Usage {
        input_tokens: count(&u, "prompt_tokens"),
        output_tokens: count(&u, "completion_tokens"),
    }
}

/// The stop reason of an answer the model declined to give (OpenAI's
/// `refusal`, Anthropic's `stop_reason: "refusal"`).
pub const REFUSAL: &str = "refusal";
/// The stop reason of an answer a provider's content filter withheld.
pub const CONTENT_FILTER: &str = "content_filter";

/// Why an answer is no answer: the model refused, or a filter withheld it.
pub fn withheld(r: &ChatResponse) -> Option<String> {
    match &r.stop {
        StopReason::Other(s) if s == REFUSAL => Some(if r.text.trim().is_empty() {
            "the model refused to answer".to_string()
        } else {
            format!("the model refused to answer: {}", r.text)
        }),
        StopReason::Other(s) if s == CONTENT_FILTER => {
            Some("its content filter withheld the answer (finish_reason content_filter)".into())
        }
        _ => None,
    }
}

/// The usage an answer reports, as far as it can be read (for an answer
/// refused as malformed: the provider billed it all the same).
pub fn reported_usage(kind: ProviderKind, body: &[u8]) -> Usage {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Usage::default();
    };
    match kind {
        ProviderKind::Anthropic => {
            let u = v.get("usage").cloned().unwrap_or(Value::Null);
            Usage {
                input_tokens: count(&u, "input_tokens"),
                output_tokens: count(&u, "output_tokens"),
            }
        }
        ProviderKind::Ollama => Usage {
            input_tokens: count(&v, "prompt_eval_count"),
            output_tokens: count(&v, "eval_count"),
        },
        ProviderKind::OpenAi => openai_usage(&v),
    }
}

/// The message of a provider's error body, if it has one we recognise
/// (shortened to 300 characters).
pub fn error_message(kind: ProviderKind, v: &Value) -> Option<String> {
    let m = match kind {
        ProviderKind::Anthropic | ProviderKind::OpenAi => v
            .get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .and_then(Value::as_str),
        ProviderKind::Ollama => v.get("error").and_then(Value::as_str),
    }?;
    Some(m.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::types::ToolDef;

    fn conversation() -> ChatRequest {
        ChatRequest {
            system: Some("be brief".into()),
            messages: vec![
                ChatMessage::user("how many?"),
                ChatMessage::Assistant {
                    text: "let me look".into(),
                    tool_calls: vec![ToolCall {
                        id: "t1".into(),
                        name: "count".into(),
                        arguments: json!({"what": "inbox"}),
                    }],
                },
                ChatMessage::ToolResult {
                    call_id: "t1".into(),
                    name: "count".into(),
                    content: "3".into(),
                    is_error: false,
                },
                ChatMessage::user("and?"),
            ],
            tools: vec![ToolDef {
                name: "count".into(),
                description: "counts".into(),
                schema: json!({"type": "object"}),
            }],
            max_tokens: None,
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint(ProviderKind::Anthropic, "http://h:1/"),
            "http://h:1/v1/messages"
        );
        assert_eq!(
            endpoint(ProviderKind::OpenAi, "http://h:1/v1"),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            endpoint(ProviderKind::Ollama, "http://h:1"),
            "http://h:1/api/chat"
        );
        assert_eq!(
            endpoint(ProviderKind::Ollama, "http://h:1/v1/"),
            "http://h:1/api/chat"
        );
    }

    #[test]
    fn anthropic_request_merges_user_turns_and_keeps_system_apart() {
        let b = request_body(ProviderKind::Anthropic, "m", 100, &conversation());
        assert_eq!(b["system"], "be brief");
        assert_eq!(b["max_tokens"], 100);
        let msgs = b["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1]["content"][1]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][1]["input"]["what"], "inbox");
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
        assert_eq!(msgs[2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(msgs[2]["content"][1]["text"], "and?");
        assert_eq!(b["tools"][0]["input_schema"]["type"], "object");
    }

    #[test]
    fn openai_and_ollama_requests() {
        let b = request_body(ProviderKind::OpenAi, "m", 7, &conversation());
        let msgs = b["messages"].as_array().unwrap();
        assert_eq!(msgs[0]["role"], "system");
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"],
            "{\"what\":\"inbox\"}"
        );
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(msgs[3]["tool_call_id"], "t1");
        assert_eq!(b["tools"][0]["function"]["name"], "count");
        let b = request_body(ProviderKind::Ollama, "m", 7, &conversation());
        assert_eq!(b["stream"], false);
        let msgs = b["messages"].as_array().unwrap();
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"]["what"],
            "inbox"
        );
        assert_eq!(msgs[3]["tool_name"], "count");
    }

    #[test]
    fn parses_answers_of_each_protocol() {
        let a = br#"{"type":"message","model":"claude-x","content":[{"type":"text","text":"hi "},{"type":"tool_use","id":"tu1","name":"count","input":{"a":1}}],"stop_reason":"tool_use","usage":{"input_tokens":10,"output_tokens":5}}"#;
        let r = parse_response(ProviderKind::Anthropic, a).unwrap();
        assert_eq!(r.text, "hi ");
        assert_eq!(r.tool_calls[0].id, "tu1");
        assert_eq!(r.stop, StopReason::ToolUse);
        assert_eq!(r.usage.total(), 15);
        let o = br#"{"model":"llama","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"count","arguments":{"a":1}}}]},"done":true,"prompt_eval_count":3,"eval_count":4}"#;
        let r = parse_response(ProviderKind::Ollama, o).unwrap();
        assert_eq!(r.tool_calls[0].id, "call_0");
        assert_eq!(r.stop, StopReason::ToolUse);
        assert_eq!(r.usage.output_tokens, 4);
        let p = br#"{"model":"gpt","choices":[{"message":{"content":null,"tool_calls":[{"id":"c9","type":"function","function":{"name":"count","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let r = parse_response(ProviderKind::OpenAi, p).unwrap();
        assert_eq!(r.tool_calls[0].arguments, json!({"a": 1}));
        assert_eq!(r.stop, StopReason::ToolUse);
    }

    #[test]
    fn refusals_filters_and_unfinished_answers() {
        let p = br#"{"choices":[{"message":{"content":null,"refusal":"no"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let r = parse_response(ProviderKind::OpenAi, p).unwrap();
        assert_eq!(withheld(&r).unwrap(), "the model refused to answer: no");
        assert_eq!(r.usage.total(), 3);
        let p = br#"{"choices":[{"message":{"content":""},"finish_reason":"content_filter"}]}"#;
        assert!(withheld(&parse_response(ProviderKind::OpenAi, p).unwrap()).is_some());
        let a = br#"{"content":[],"stop_reason":"refusal"}"#;
        assert!(withheld(&parse_response(ProviderKind::Anthropic, a).unwrap()).is_some());
        let o = br#"{"message":{"content":"Hel"},"done":false}"#;
        assert!(parse_response(ProviderKind::Ollama, o).is_err());
        let b = request_body(ProviderKind::OpenAi, "m", 7, &conversation());
        assert_eq!(b["max_completion_tokens"], 7);
        assert!(b.get("max_tokens").is_none());
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for kind in [
            ProviderKind::Anthropic,
            ProviderKind::Ollama,
            ProviderKind::OpenAi,
        ] {
            for body in [
                &b"not json"[..],
                b"[]",
                b"{}",
                b"{\"content\":5}",
                b"{\"message\":\"x\"}",
                b"{\"choices\":[]}",
                b"{\"choices\":[{\"message\":{\"content\":1}}]}",
                b"{\"content\":[{\"type\":\"tool_use\",\"id\":\"x\",\"name\":\"n\",\"input\":[1]}]}",
            ] {
                assert!(parse_response(kind, body).is_err(), "{kind:?} {body:?}");
            }
        }
    }
}
