//! Host bindings generated from `wit/` (wasmtime `bindgen!`). Every import
//! is trappable: a host function can stop the guest (a limit was broken)
//! as well as answer it an error value.

/// The agent world, `capstan:agent@0.1.0`, as its superset `llm-agent`
/// (agent components that do not import `llm` link against it too).
pub mod agent {
    wasmtime::component::bindgen!({
        path: "../wit/agent",
        world: "llm-agent",
        imports: { default: trappable },
        with: { "capstan:agent/host.capability": crate::guest::CapabilityRep },
    });
}

/// The tool world, `capstan:tool@0.1.0` (IronClaw's tool contract).
pub mod tool {
    wasmtime::component::bindgen!({
        path: "../wit/tool",
        world: "sandboxed-tool",
        imports: { default: trappable },
    });
}

/// The channel world, `capstan:channel@0.2.0` (IronClaw's channel contract,
/// reduced).
pub mod channel {
    wasmtime::component::bindgen!({
        path: "../wit/channel",
        world: "sandboxed-channel",
        imports: { default: trappable },
    });
}

/// The evaluator world, `capstan:evaluator@0.1.0` (a JavaScript engine as a
/// guest; see `eval.rs`).
pub mod evaluator {
    wasmtime::component::bindgen!({
        path: "../wit/evaluator",
        world: "sandboxed-evaluator",
        imports: { default: trappable },
    });
}
