@0xe2027c91d68f9114;
# Durable records of Capstan: formulas, directory entries, messages.
# Stored as store values; evolve only by adding fields (Cap'n Proto rules).
# Ids are 32 bytes (256 bits); every `Data` field named `*id` holds one.

struct Formula {
  createdMs @0 :UInt64;
  union {
    host @1 :Agent;
    guest @2 :Agent;
    directory @3 :Void;
    value @4 :StoredValue;
    promise @5 :Promise;
    remote @6 :RemoteRef;
    invitation @7 :Invitation;
    llm @8 :LlmProvider;
    accepting @9 :Accepting;
  }
  # Set once the formula was cancelled (`capstan cancel`, directly or as a
  # dependent of a cancelled formula): why, in words ("cancelled by its
  # host", "cancelled: its dependency … was cancelled"); empty while live.
  # A cancelled formula stays cancelled (across restarts and nodes).
  cancelled @10 :Text;
  cancelledMs @11 :UInt64;
}

# On the accepting node, while `capstan accept` redeems an invitation: the
# name the inviter will have here, held so that nothing else takes it. It
# becomes a `remote` for the inviter (this same formula) once the inviter
# answered; accepting the same invitation again goes on with this one.
struct Accepting {
  host @0 :Data;          # the accepting agent
  invitation @1 :Data;    # hash of the invitation's swiss (as for locators)
  clusterId @2 :Data;     # the inviter's cluster id
  reqId @3 :Data;         # the request id the invitation is redeemed with (16 bytes)
  # Hashes of the handles offered to the inviter (locators of `host`, one
  # per attempt; the inviter keeps the first it took, so all stay valid).
  handles @4 :List(Data);
}

# A pending invitation (`capstan invite NAME`): its locator is redeemed once
# by the invited node (`capstan accept`), which turns this formula into a
# remote reference to the invited node's agent (the same formula id, so
# every name of the invitation, copies included, then names that agent).
struct Invitation {
  host @0 :Data;          # the inviting host agent
  dir @1 :Data;           # the directory holding the invitation's name
  name @2 :Text;
}

# A reference to a capability of another cluster (or another lone node),
# adopted from a locator: capstan://<cluster-id>/<swiss>?at=<addrs>.
struct RemoteRef {
  clusterId @0 :Data;     # blake3 of the cluster's public key (32 bytes)
  swiss @1 :Data;         # the bearer secret (32 bytes)
  addrs @2 :List(Text);   # host:port hints, tried in order
}

# A locator issued by this node: stored under blake3(swiss); the swiss
# itself is never stored here.
struct LocatorRecord {
  target @0 :Data;        # the formula it designates
  createdMs @1 :UInt64;
  # For a handle given to another node through invite/accept: the remote
  # formula naming that node's agent here. Mail arriving through this
  # locator is from that formula. Empty otherwise (such a locator takes no mail).
  peer @2 :Data;
  # The locator sent with a request to its recipient on another cluster
  # (the envelope's `resolver`): the only kind through which `target`, the
  # requester's promise, can be settled. Every other locator of a promise
  # (`locate`, a reference in a message) only reads it.
  resolver @3 :Bool;
  # An invitation that was accepted: its target is now the remote formula
  # for the invited agent, and this locator serves only a retry of that
  # accept (the same cluster with the same request id), which gets the
  # same answer. Empty `acceptedBy` otherwise.
  acceptedBy @4 :Data;    # the accepting node's cluster id
  acceptReq @5 :Data;     # the request id it accepted with
  acceptHost @6 :Data;    # the inviting host (what the handles given in answer designate)
}

struct Agent {
  # The agent's pet store (a directory formula).
  petStore @0 :Data;
  # The host that made this agent (empty for the root host).
  host @1 :Data;
  # Display label given at creation (the creator's pet name for it).
  label @2 :Text;
}

enum ValueKind {
  text @0;
  json @1;
  bytes @2;
}

struct StoredValue {
  kind @0 :ValueKind;
  size @1 :UInt64;
  # blake3 of the bytes; the bytes are a chunked blob under the value's key,
  # unless `inlined`.
  hash @2 :Data;
  # A small value's bytes, kept in the record itself (no blob): when
  # `inlined` is set. Records written before this field have no bytes here
  # and a blob.
  inline @3 :Data;
  inlined @4 :Bool;
}

struct Promise {
  # The request's description, and the agent that asked.
  description @0 :Text;
  requester @1 :Data;
  state :union {
    pending @2 :Void;
    resolved @3 :Data;   # id of the formula the promise resolved to
    rejected @4 :Text;   # the reason
  }
  # For a request that came from another cluster: where its answer goes
  # (the requester's promise there). Absent for local requests.
  resolver @5 :RemoteRef;
}

struct NameEntry {
  id @0 :Data;
}

struct Message {
  number @0 :UInt64;
  messageId @1 :Data;    # 16 random bytes
  replyTo @2 :Data;      # messageId of the message this replies to; empty if none
  from @3 :Data;         # agent id of the sender
  to @4 :Data;           # agent id of the recipient
  dateMs @5 :UInt64;
  body :union {
    package :group {
      # text chunks interleaved with references: strings.len() == ids.len() + 1
      strings @6 :List(Text);
      names @7 :List(Text);   # suggested (edge) names, one per reference
      ids @8 :List(Data);
    }
    request :group {
      description @9 :Text;
      promise @10 :Data;
    }
  }
}

# The first answer to a mutating request, kept so that a retried request
# (same request id) applies once and returns the same answer.
struct DedupRecord {
  atMs @0 :UInt64;
  answer :union {
    none @1 :Void;
    id @2 :Data;
    number @3 :UInt64;
  }
}

# Federated mail ---------------------------------------------------------------
# In a stored OutboxItem, a RemoteRef with an empty clusterId designates this
# node's own cluster (the node fills in its id and addresses when sending);
# on the wire every RemoteRef is complete.

# A message for an agent of another cluster (also the wire form).
struct Envelope {
  messageId @0 :Data;     # 16 bytes, the same on both sides
  replyTo @1 :Data;       # empty if none
  dateMs @2 :UInt64;
  body :union {
    package :group {
      strings @3 :List(Text);
      names @4 :List(Text);
      refs @5 :List(RemoteRef);
    }
    request :group {
      description @6 :Text;
      resolver @7 :RemoteRef;   # the requester's promise: settle it to answer
    }
  }
}

# The answer to a request from another cluster.
struct Settlement {
  union {
    resolved @0 :RemoteRef;
    rejected @1 :Text;
  }
}

# Something this node owes another cluster, committed with the change that
# produced it and removed once the other side acknowledged it. The receiver
# deduplicates by `id`, so a retried delivery applies once.
struct OutboxItem {
  id @0 :Data;            # 16 random bytes
  sender @1 :Data;        # the local agent that sent it
  peer @2 :Data;          # the local formula naming the other side (for bounces)
  to @3 :RemoteRef;       # the capability it is delivered to
  createdUs @4 :UInt64;   # microseconds since the epoch: outbox order
  union {
    deliver @5 :Envelope;
    settle @6 :Settlement;
  }
}

# LLM providers (issue 6) ------------------------------------------------------

# An LLM provider configured by a host (`capstan llm add NAME`): a formula, so
# that a pet name designates it and it can be granted to a guest like any
# other capability. The API key is NOT in it: it is in a private record
# ("llmk", formula id) that only a model call reads, so showing, listing,
# mailing or copying the formula never reveals it.
struct LlmProvider {
  provider @0 :Text;        # anthropic | ollama | openai
  url @1 :Text;             # the server's base URL
  model @2 :Text;
  maxTokens @3 :UInt32;     # most output tokens per call
  hasKey @4 :Bool;          # whether a key record exists
  removed @5 :Bool;         # `capstan llm remove`: key erased, calls refused
  host @6 :Data;            # the host that configured it
  priceInput @7 :UInt64;    # micro-USD per million input tokens (0: free)
  priceOutput @8 :UInt64;   # micro-USD per million output tokens
  timeoutMs @9 :UInt32;     # one HTTP request's time limit
}

# The LLM budget of one agent ("llmb", agent): refused over a limit (0: none).
struct LlmBudget {
  tokenLimit @0 :UInt64;
  tokensUsed @1 :UInt64;
  costLimit @2 :UInt64;     # micro-USD
  costUsed @3 :UInt64;
  calls @4 :UInt64;
  # What the node does with incoming text that looks like a prompt
  # injection: "warn" (or empty: the default), "block" or "ask".
  injection @5 :Text;
  # Held by calls in flight (reserved before the call, settled after it):
  # their input estimate plus the output tokens they may use, and its cost.
  tokensReserved @6 :UInt64;
  costReserved @7 :UInt64;
}

# One model call of an agent ("llma", agent, sequence number): the audit log.
struct LlmAudit {
  atMs @0 :UInt64;
  provider @1 :Text;        # the caller's name for the provider
  kind @2 :Text;            # anthropic | ollama | openai
  model @3 :Text;
  inputTokens @4 :UInt64;
  outputTokens @5 :UInt64;
  estimatedTokens @6 :UInt64;
  costMicros @7 :UInt64;
  outcome @8 :Text;         # ok | error: … | refused: …
  durationMs @9 :UInt64;
  toolCalls @10 :UInt32;
  redactions @11 :UInt32;   # credentials redacted from the reply
}
