@0xbb11b9b440974971;
using R = import "records.capnp";
# The node-to-node API, spoken by Cap'n Proto RPC over QUIC (ALPN
# "capstan/1", TLS 1.3, both sides present certificates chaining to their
# cluster key). The bootstrap object of every connection is a Gateway.

interface Gateway {
  # Redeems the swiss number of a locator: the capability it designates.
  # Unknown or revoked swiss numbers fail with "unknown or revoked locator";
  # repeated failures on one connection close it.
  restore @0 (swiss :Data) -> (object :Object);
  # Echoes its payload (at most 64 KiB): liveness and benchmarks.
  ping @1 (payload :Data) -> (payload :Data);
  # The member interface of this node, for another node of the same cluster
  # (fails for callers whose certificate chains to another cluster key).
  member @2 () -> (member :Member);
  # Which of these outbox item ids (16 bytes each, at most 256) this
  # cluster applied (mail delivered, an answer settled). A sender whose
  # item was refused asks before bouncing it: an earlier try may have been
  # applied with its answer lost, and the recipient cancelled since (its
  # locator then refuses the retry), and mail must not be both delivered
  # and bounced. Ids are unguessable, so the answer tells a caller nothing
  # about items it did not send.
  applied @3 (items :List(Data)) -> (applied :List(Bool));
}

# What the nodes of one cluster (sharing one replicated store) ask each
# other. State lives in the store; these calls only route the work that
# needs the formula's single owner, and wake incarnations on other nodes.
interface Member {
  # Reserves `count` consecutive numbers in the inbox of `agent` (32 bytes),
  # which this node must own (else fails with "not the owner"); numbers
  # below `atLeast` are never handed out (the caller saw them taken).
  # `interested`: the members that follow the agent's inbox (see
  # `interest`), to whom the caller sends its wake-up once it committed.
  # `quotaBytes` and `quotaCount` (both 0: none) ask the owner to admit
  # `quotaCount` messages (0: one, as callers before it was added ask) of
  # about `quotaBytes` bytes in all under the inbox's quota first, all or
  # none; a full inbox fails with "inbox of … is full (…)" (see
  # actors/src/quota.rs). A batch of a node's reservations in one inbox
  # goes as one call.
  # `traces`: the traced operations (see `spans`) the numbers are for.
  reserve @0 (agent :Data, count :UInt32, atLeast :UInt64, quotaBytes :UInt64, quotaCount :UInt32, traces :List(UInt64)) -> (first :UInt64, interested :List(Text));
  # Message `number` was committed to `agent`'s inbox: wake its followers
  # and its guest, if incarnated here.
  delivered @1 (agent :Data, number :UInt64) -> ();
  # The request whose promise is `promise` was settled: wake its waiters here.
  settled @2 (promise :Data) -> ();
  # Many wake-ups in one call (what `delivered` and `settled` say, for each
  # entry): a sender coalesces the wake-ups it has for one member while its
  # previous call to that member is in flight, so a busy cluster makes a few
  # calls per member, not one per message. `revision`: the latest store
  # revision the caller knew committed when it called (at least that of
  # every commit the wake-ups tell of; 0: unknown): the member's next
  # snapshots may be taken at it instead of asking the store for its latest.
  wake @3 (delivered :List(Delivery), settled :List(Data), revision :UInt64) -> ();
  # Member `node` has followers of `agent`'s inbox, which this node owns:
  # tell the nodes that reserve numbers in it to wake `node` too (for the
  # next few minutes; renewed while the followers last). `gone`: its last
  # follower ended, stop waking it (a member that predates the field takes
  # it as a renewal, and its interest lapses on its own). `seq`: the call's
  # order among the caller's interest calls, which it makes in the
  # background (they may arrive out of order): the owner ignores a call
  # older than one it already took (0: unordered, a caller that predates
  # the field).
  interest @4 (agent :Data, node :Text, gone :Bool, seq :UInt64) -> ();
  # Commits `group` (a group of the caller's commits, encoded by the store:
  # cluster/src/etcd_store/relay.rs) with this node's next commits to the
  # shared store, in one request. `answer`: the store's answer to it,
  # encoded likewise. `unapplied` (non-empty): nothing of the group was
  # applied, and why (refused, or the store refused it); the caller commits
  # it itself. A failed call leaves the outcome unknown: the caller resolves
  # it by the group's commit marker. A member that predates the method
  # answers "unimplemented": nothing applied.
  # `traces`: the traced operations whose commits are in the group.
  relay @5 (group :Data, traces :List(UInt64)) -> (answer :Data, unapplied :Text);
  # The spans this node recorded of the traced operation `trace` (see
  # cluster/src/trace.rs; none when it recorded none, or forgot them).
  spans @6 (trace :UInt64) -> (spans :List(TraceSpan));
  # `relay` of a group with numbers for this node to fill in first
  # (cluster/src/etcd_store/relay.rs): each of `fills` gets as many
  # consecutive numbers of its sequence (an inbox this node owns: `scope`
  # is the agent's 32-byte id) as it has placeholders, written over them in
  # the group. `filled`: each fill's first number and the members following
  # that inbox (see `reserve`). `unapplied` starting "no fill: ": nothing
  # applied, this node fills none of them in (it does not own the inbox);
  # the caller commits with numbers of its own. A member that predates the
  # method answers "unimplemented": the same.
  relayFilled @7 (group :Data, traces :List(UInt64), fills :List(GroupFill)) -> (answer :Data, unapplied :Text, filled :List(FillAnswer));
}

# Numbers of one sequence to fill in a relayed group, by their placeholders.
struct GroupFill {
  scope @0 :Data;
  placeholders @1 :List(UInt64);
}

# What a filled sequence got: its first number, and the members following it.
struct FillAnswer {
  first @0 :UInt64;
  notes @1 :List(Text);
}

# One hop of a traced operation, as the node that did it recorded it.
struct TraceSpan {
  name @0 :Text;
  # Microseconds since the Unix epoch on that node's clock.
  startUs @1 :UInt64;
  durUs @2 :UInt64;
  detail @3 :Text;
}

# Message `number` was committed to `agent`'s inbox (see `Member.wake`).
# `record`: the message as stored (a MessageRec), so that the member can push
# it to followers without reading it back from the store; empty for large
# messages (then the member reads it).
struct Delivery {
  agent @0 :Data;
  number @1 :UInt64;
  record @2 :Data;
  # The traced operation that committed it (0: none).
  trace @3 :UInt64;
}

enum ValueKind {
  text @0;
  json @1;
  bytes @2;
}

# A capability restored from a locator. Every call re-checks the locator:
# once it is cancelled, calls fail with "revoked".
interface Object {
  # What it designates: type (value, host, guest, directory, …) and a detail.
  show @0 () -> (type :Text, detail :Text);
  # A stored value's bytes.
  cat @1 () -> (kind :ValueKind, data :Data);
  # Mail for the agent this designates, from the peer it was handed to
  # (only handles made by invite/accept take mail). `id` (16 bytes)
  # deduplicates: a retried delivery applies once.
  deliver @2 (id :Data, envelope :R.Envelope) -> ();
  # Answers the request whose promise this designates (applies once per id).
  # Only through the locator sent to the request's recipient (the envelope's
  # `resolver`); any other locator of the promise only reads it and fails.
  settle @3 (id :Data, settlement :R.Settlement) -> ();
  # Redeems an invitation: `handle` designates the accepting node's agent;
  # the answer is a handle (swiss) for the inviting agent. One use: only the
  # same caller cluster with the same `reqId` (16 bytes) redeems it again,
  # getting the same answer (the same formula on the inviting side, now
  # designating `handle`, with a fresh swiss; the previous one is revoked).
  accept @4 (handle :R.RemoteRef, reqId :Data) -> (swiss :Data);
}
