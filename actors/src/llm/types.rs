//! The normalised chat API: what every provider protocol is translated to
//! and from. Serializable, so an agent can checkpoint its conversation.

use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum ChatMessage {
    /// Text from the user (the agent's mail, an operator's prompt).
    User {
        text: String,
        /// From outside (mail from others, a fetched page): the model gets
        /// it as data, spotlighted (see [`crate::llm::safety::Spotlight`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        untrusted: bool,
    },
    /// A model turn: text and/or tool calls.
    Assistant {
        #[serde(default)]
        text: String,
        #[serde(default)]
        tool_calls: Vec<ToolCall>,
    },
    /// The result of one tool call of the previous assistant turn.
    ToolResult {
        call_id: String,
        /// The tool's name (Ollama matches results by name, not id).
        name: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
}

impl ChatMessage {
    pub fn user(text: impl Into<String>) -> Self {
        ChatMessage::User {
            text: text.into(),
            untrusted: false,
        }
    }

    /// All text of the message (for estimates and scans).
    pub fn text_len(&self) -> usize {
        match self {
            ChatMessage::User { text, .. } => text.len(),
            ChatMessage::Assistant { text, tool_calls } => {
                text.len()
                    + tool_calls
                        .iter()
                        .map(|c| c.name.len() + c.arguments.to_string().len())
                        .sum::<usize>()
            }
            ChatMessage::ToolResult { content, name, .. } => content.len() + name.len(),
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    /// JSON schema of the tool's input (an object schema).
    pub schema: serde_json::Value,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call (synthesised for Ollama, which has none).
    pub id: String,
    pub name: String,
    /// The arguments: a JSON object.
    pub arguments: serde_json::Value,
}

/// A request to a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The system prompt.
    #[serde(default)]
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Vec<ToolDef>,
    /// Most output tokens; default (and upper bound): the provider's configured maximum.
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

impl ChatRequest {
    /// A one-shot request with one user message.
    pub fn prompt(text: impl Into<String>) -> Self {
        ChatRequest {
            messages: vec![ChatMessage::user(text)],
            ..ChatRequest::default()
        }
    }

    /// Bytes of text in the request: system, messages, tool definitions.
    pub fn text_len(&self) -> usize {
        self.system.as_ref().map_or(0, String::len)
            + self
                .messages
                .iter()
                .map(ChatMessage::text_len)
                .sum::<usize>()
            + self
                .tools
                .iter()
                .map(|t| t.name.len() + t.description.len() + t.schema.to_string().len())
                .sum::<usize>()
    }

    /// Every piece of text a credential could hide in (for the outgoing scan).
    pub fn texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = &self.system {
            out.push(s.clone());
        }
        for m in &self.messages {
            match m {
                ChatMessage::User { text, .. } => out.push(text.clone()),
                ChatMessage::Assistant { text, tool_calls } => {
                    out.push(text.clone());
                    for c in tool_calls {
                        out.push(c.arguments.to_string());
                    }
                }
                ChatMessage::ToolResult { content, .. } => out.push(content.clone()),
            }
        }
        out
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It finished its turn.
    EndTurn,
    /// It wants the results of its tool calls.
    ToolUse,
    /// It hit the output token limit.
    MaxTokens,
    /// A stop sequence.
    StopSequence,
    /// Anything else the provider said (kept verbatim).
    Other(String),
}

impl StopReason {
    pub fn as_str(&self) -> &str {
        match self {
            StopReason::EndTurn => "end_turn",
            StopReason::ToolUse => "tool_use",
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopSequence => "stop_sequence",
            StopReason::Other(s) => s,
        }
    }
}

/// Tokens a call used, as the provider reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// Its text (possibly empty when it only calls tools).
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub stop: StopReason,
    pub usage: Usage,
    /// The model that answered (as the provider named it).
    pub model: String,
}

impl ChatResponse {
    /// The assistant message to append to the conversation.
    pub fn to_message(&self) -> ChatMessage {
        ChatMessage::Assistant {
            text: self.text.clone(),
            tool_calls: self.tool_calls.clone(),
        }
    }
}
