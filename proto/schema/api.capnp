@0x90715505424bea21;
# The control-socket API of a Capstan node: what `capstan` CLI commands call.
# Any Cap'n Proto implementation can drive a node through it. The bootstrap
# capability of the socket is a `Node`.
#
# Conventions:
# - `reqId` (16 random bytes, chosen by the caller) on every mutating call: a
#   retry with the same id after an unknown outcome applies once and returns
#   the first answer.
# - Paths are pet-name paths `a.b.c` in the acting agent's names, or special
#   names (SELF, HOST, MAIL, NONE, ...).
# - Errors are Cap'n Proto exceptions whose description is a one-line,
#   user-facing message.

interface Node {
  ping @0 () -> (info :NodeInfo);
  # The root host of this node.
  host @1 () -> (agent :Agent);
  # Stop the node (graceful): answers, then exits.
  stop @2 () -> ();
  # What the store holds (`capstan du`), a page of the key space at a time:
  # scans at most `maxKeys` keys (0 = 10000; at most 100000) from `start`
  # (empty = the first key) and counts them by kind. Call again from `next`
  # until `done`.
  usage @3 (start :Data, maxKeys :UInt32) -> (kinds :List(KindUsage), next :Data, done :Bool);
  # Write every key of one snapshot of the store to `path` (absolute, on
  # the node's machine; `capstan backup`): consistent while the node serves.
  # The file is replaced only once the new one is whole.
  backup @4 (path :Text) -> (pairs :UInt64, bytes :UInt64, version :UInt64);
  # One garbage-collection pass (`capstan gc`): deletes the formulas no root
  # reaches, and exactly-once answers older than `keepAnswersMs` (the CLI
  # sends a day unless told otherwise; 0 drops them all).
  gc @5 (keepAnswersMs :UInt64) -> (report :GcReport);
}

struct GcReport {
  scanned @0 :UInt64;      # formulas in the mark snapshot
  reachable @1 :UInt64;
  candidates @2 :UInt64;   # unreachable, of collectable kinds
  formulas @3 :UInt64;     # deleted
  values @4 :UInt64;       # of which values
  kept @5 :UInt64;         # candidates referenced during the pass (and what they reach)
  answers @6 :UInt64;      # exactly-once answers dropped
  keys @7 :UInt64;         # keys deleted in all
  bytes @8 :UInt64;        # bytes deleted in all (keys and values)
  interrupted @9 :Bool;    # stopped early by a concurrent writer: run again
  elapsedMs @10 :UInt64;
}

struct KindUsage {
  kind @0 :Text;        # formulas, values, names, messages, dedup, journals, outbox, locators, others
  keys @1 :UInt64;
  bytes @2 :UInt64;     # keys and values together
}

struct NodeInfo {
  version @0 :Text;
  pid @1 :UInt32;
  home @2 :Text;
  store @3 :Text;
  rootHost @4 :Data;
  startedMs @5 :UInt64;
  incarnations @6 :UInt32;
  uptimeMs @7 :UInt64;
  connections @8 :UInt32;   # open QUIC connections to other nodes
  rssBytes @9 :UInt64;      # the daemon's resident memory (VmRSS), 0 if unknown
  storeCacheBytes @10 :UInt64;  # the budget of the store's page cache (redb; 0: none kept)
}

enum ValueKind {
  text @0;
  json @1;
  bytes @2;
}

struct EntryInfo {
  name @0 :Text;
  id @1 :Data;
  type @2 :Text;        # host, guest, directory, value, promise
  # For values: kind and size. For promises: pending/resolved/rejected.
  detail @3 :Text;
}

struct MessageView {
  number @0 :UInt64;
  messageId @1 :Data;
  replyTo @2 :Data;
  from @3 :Text;        # the viewer's name for the sender (SELF, HOST, pet name, or hex id)
  to @4 :Text;          # the viewer's name for the recipient
  dateMs @5 :UInt64;
  type @6 :Text;        # package | request
  # package: text chunks and references (strings.len() == names.len() + 1)
  strings @7 :List(Text);
  names @8 :List(Text);
  # request: description and state ("pending", "resolved", "rejected: <reason>")
  description @9 :Text;
  state @10 :Text;
}

interface MessageSink {
  push @0 (message :MessageView) -> ();
}

interface Agent {
  # Names ---------------------------------------------------------------
  list @0 (path :Text) -> (entries :List(EntryInfo));        # path "" = own names
  show @1 (path :Text) -> (entry :EntryInfo);
  cat @2 (path :Text) -> (kind :ValueKind, data :Data);      # a stored value's bytes
  store @3 (reqId :Data, path :Text, kind :ValueKind, data :Data) -> (id :Data);
  remove @4 (reqId :Data, path :Text) -> ();
  move @5 (reqId :Data, from :Text, to :Text) -> ();
  copy @6 (reqId :Data, from :Text, to :Text) -> ();
  mkdir @7 (reqId :Data, path :Text) -> (id :Data);
  mkhost @8 (reqId :Data, path :Text) -> (id :Data);
  mkguest @9 (reqId :Data, path :Text) -> (id :Data);
  # An agent (host or guest) held by this agent under `path`.
  agent @10 (path :Text) -> (agent :Agent);

  # Mail ----------------------------------------------------------------
  # strings/refs: text chunks interleaved with references; each ref is a
  # path in this agent's names plus the name suggested to the recipient.
  # `trace` (0: none): trace the send's hops across the cluster under this
  # id (`cluster` command `trace` gathers them; cluster/src/trace.rs).
  send @11 (reqId :Data, to :Text, strings :List(Text), refs :List(Ref), replyTo :UInt64, isReply :Bool, trace :UInt64) -> (number :UInt64);
  # Ask `to` for something; `resultName` (optional) receives the answer.
  request @12 (reqId :Data, to :Text, description :Text, resultName :Text) -> (number :UInt64, promise :Data);
  # Wait until the promise of request `number` in this inbox is settled.
  waitRequest @13 (number :UInt64) -> (state :Text, id :Data);
  resolve @14 (reqId :Data, number :UInt64, path :Text) -> ();
  reject @15 (reqId :Data, number :UInt64, reason :Text) -> ();
  adopt @16 (reqId :Data, number :UInt64, edgeName :Text, path :Text) -> (id :Data);
  dismiss @17 (reqId :Data, number :UInt64) -> ();
  # thread: a messageId (16 bytes) to show only that thread; empty = all.
  # A page: at most `limit` messages (0 = 1000; at most 10000) numbered
  # `from` or above, in number order; `more`: later messages follow (the next
  # page starts at the last number + 1).
  inbox @18 (thread :Data, from :UInt64, limit :UInt32) -> (messages :List(MessageView), more :Bool);
  # Streams every message numbered >= `after` (existing ones first, then new
  # ones as they arrive) into `sink` until the caller drops it.
  follow @19 (after :UInt64, sink :MessageSink) -> ();

  # References between clusters (see net.capnp).
  # Issues a new locator for what `path` names (needs a listening node).
  locate @20 (path :Text) -> (locator :Text);
  # Names a capability of another cluster, from its locator.
  adoptLocator @21 (reqId :Data, path :Text, locator :Text) -> (id :Data);
  # Revokes every locator of what `path` names; returns how many.
  cancel @22 (reqId :Data, path :Text) -> (count :UInt64, cancelled :Text);
  # `count`: locators revoked; `cancelled`: a JSON array of the formulas
  # cancelled with it, [{"id","type","reason"}], and `rejected` pending
  # requests, as {"cancelled":[…],"rejected":N} (see nodes/CLI.md).
  # Invites another node's agent under `name`; returns the invitation locator.
  # Retried with the same `reqId`: the same invitation (a fresh locator of
  # it: only hashes are stored), while it is not accepted.
  invite @23 (name :Text, reqId :Data) -> (invitation :Text);
  # Accepts another node's invitation, naming its agent `name` here. `name`
  # is reserved (type `accepting`) before the inviter is asked; retried with
  # the same `reqId`, or run again with the same invitation and name after a
  # failure or a crash, it goes on with the first attempt.
  accept @24 (reqId :Data, invitation :Text, name :Text) -> (id :Data);

  # Guests (WebAssembly components) ---------------------------------------
  # Install a component under `name` (stored content-addressed); `grants`
  # name capabilities (paths in this host's names) given to it.
  install @25 (reqId :Data, name :Text, component :Data, grants :List(Grant)) -> (info :ComponentInfo);
  # Make a guest agent whose body is the installed agent (or channel)
  # component `component`. `fuel` (per call) and `deadlineMs` (wall-clock
  # per call) override the node's limits for this guest; 0 = the node's.
  # `with`: capabilities for this guest alone (slot = a name it gets, path
  # in this host's names), beside the component's install-time grants.
  mkguestComponent @26 (reqId :Data, path :Text, component :Text, fuel :UInt64, deadlineMs :UInt32, with :List(Grant)) -> (id :Data);
  # Run the installed tool `name` once: execute with `input` (JSON).
  runTool @27 (name :Text, input :Text) -> (output :Text);
  # The guest agents with a component body, and what the node knows of them.
  guests @28 () -> (guests :List(GuestInfo));
  # Cluster operations (`capstan cluster …`): `command` is one of status,
  # members, placement (arg: a pet-name path), drain (arg: a node name),
  # leave or trace (arg: a trace id, 16 hex digits: the spans every live
  # member recorded of it); the answer is one JSON value (see nodes/CLI.md).
  cluster @29 (command :Text, arg :Text) -> (json :Text);
  # Make an HTTP capability under `name`: what a component granted it
  # (`install … --grant http=NAME`) may reach, and the credential headers
  # the node injects (read from key files; the guest never sees them).
  mkhttp @30 (reqId :Data, name :Text, spec :HttpSpec) -> (id :Data);
  # LLM providers (`capstan llm …`): `command` is add, list, remove, ask,
  # audit or budget; `args` is one JSON object (see nodes/CLI.md), the answer
  # one JSON value. `secret` carries the API key for `add` only (read from
  # the key file by the CLI); it is never echoed, logged or shown.
  llm @31 (reqId :Data, command :Text, args :Text, secret :Data) -> (json :Text);
  # JavaScript run by the installed evaluator component `evaluator`, with
  # `bindings` filling its slots (paths in this host's names). endow =
  # false: `capstan eval` of `source`; endow = true: `capstan endow` of the
  # code proposal in message `number` (its slots must all be bound; the
  # answer is mailed back as a reply). The answer is one JSON object:
  # {"result": JSON text} or {"error": text}, with "fuel", "invokes",
  # "instantiate_ns", "run_ns" and, for endow, "reply" (see nodes/CLI.md).
  # A non-empty `resultName` (eval only) also stores the result as a JSON
  # value under that path: an eval result, which depends on what the slots
  # held and dies with it (`capstan cancel`); the answer then has "id".
  evaluate @32 (reqId :Data, evaluator :Text, source :Text, bindings :List(Grant), endow :Bool, number :UInt64, resultName :Text) -> (json :Text);
  # Routines (`capstan routine …`): `command` is add, list or remove;
  # `args` is one JSON object (see nodes/CLI.md), the answer one JSON value.
  routine @33 (reqId :Data, command :Text, args :Text) -> (json :Text);
  # The inbox quota of the agent at `path` (`capstan quota`): with `set`,
  # replaces its limits (0 = the default) first; hosts only. The answer is
  # one JSON object: {"agent", "messages", "bytes", "max_messages",
  # "max_bytes", "default"}.
  quota @34 (reqId :Data, path :Text, set :Bool, maxMessages :UInt64, maxBytes :UInt64) -> (json :Text);
  # Search capabilities (`capstan mksearch`, `capstan search`): `command`
  # is make or query; `args` is one JSON object (see nodes/CLI.md), the
  # answer one JSON value.
  search @35 (reqId :Data, command :Text, args :Text) -> (json :Text);
}

struct HttpSpec {
  allow @0 :List(Text);         # URL prefixes: scheme://host:port/path-prefix
  methods @1 :List(Text);       # allowed methods, upper case; empty = GET
  headers @2 :List(HttpHeader); # credential headers injected by the node
  timeoutMs @3 :UInt32;         # cap on one request; 0 = the default
  maxBytes @4 :UInt64;          # cap on one response body; 0 = the default
  insecureHttp @5 :Bool;        # credentials may go to http:// prefixes (in clear)
}

struct HttpHeader {
  name @0 :Text;        # e.g. Authorization
  file @1 :Text;        # absolute path of the key file holding its value
}

struct Grant {
  slot @0 :Text;        # the name the component knows the capability by
  path @1 :Text;        # what it designates, in the installing host's names
}

struct ComponentInfo {
  id @0 :Data;          # the value naming the component
  hash @1 :Text;        # blake3 of its bytes, hex
  world @2 :Text;       # e.g. capstan:agent/agent@0.1.0
  size @3 :UInt64;
  imports @4 :List(Text);
  exports @5 :List(Text);
  grants @6 :List(Text);
}

struct GuestInfo {
  name @0 :Text;
  id @1 :Data;
  component @2 :Text;   # blake3, hex
  state @3 :Text;       # idle | running | stopped | passive
  handled @4 :UInt64;
  failures @5 :UInt64;
  fuelLast @6 :UInt64;
  memoryPeak @7 :UInt64;
  lastError @8 :Text;
  instantiateNsLast @9 :UInt64;   # making the instance for the last message
  callNsLast @10 :UInt64;         # its handler, host calls included
}

struct Ref {
  path @0 :Text;
  edgeName @1 :Text;
}
