//! evaluator: a JavaScript engine (Boa) as a confined guest, the way Endo's
//! `eval` runs code in a compartment. `eval(source, slots, constants)`
//! defines each slot as a global object whose methods call the capability
//! the host bound to it (through `host.invoke`; the node answers only for
//! the slots it bound) and each constant as a global value, runs the
//! script, and answers the JSON of its completion value. A promise as the
//! result is settled first (its jobs run), so `async` code works.
//!
//! There is no clock, no network and no file system: `Date.now()` is the
//! epoch, `Math.random()` a fixed sequence (evaluations are reproducible),
//! and modules cannot be imported. Fuel, memory and a wall-clock deadline
//! bound a run (the host's limits).
wit_bindgen::generate!({ path: "../../wit/evaluator", world: "sandboxed-evaluator" });

use std::rc::Rc;

use boa_engine::context::time::FixedClock;
use boa_engine::module::IdleModuleLoader;
use boa_engine::object::ObjectInitializer;
use boa_engine::object::builtins::JsPromise;
use boa_engine::property::Attribute;
use boa_engine::{
    Context, JsError, JsNativeError, JsResult, JsString, JsValue, NativeFunction, Source,
};
use capstan::evaluator::host::{self, LogLevel};
use exports::capstan::evaluator::evaluator::{Guest, Slot};

/// Deepest recursion a script may reach (Boa's own limit, before the
/// wasm stack runs out).
const MAX_RECURSION: usize = 512;

struct Evaluator;

fn js_err(e: JsError, ctx: &mut Context) -> String {
    match e.try_native(ctx) {
        Ok(n) => n.to_string(),
        Err(_) => e.to_string(),
    }
}

fn to_json(v: &JsValue, ctx: &mut Context) -> JsResult<serde_json::Value> {
    Ok(v.to_json(ctx)?.unwrap_or(serde_json::Value::Null))
}

/// A slot method: calls the host with the arguments as a JSON array.
fn call_slot(
    _this: &JsValue,
    args: &[JsValue],
    captures: &(JsString, JsString),
    ctx: &mut Context,
) -> JsResult<JsValue> {
    let (slot, method) = captures;
    let mut list = Vec::with_capacity(args.len());
    for a in args {
        list.push(to_json(a, ctx)?);
    }
    let args_json = serde_json::Value::Array(list).to_string();
    let answer = host::invoke(
        &slot.to_std_string_escaped(),
        &method.to_std_string_escaped(),
        &args_json,
    )
    .map_err(|e| JsNativeError::error().with_message(e))?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| {
        JsNativeError::error().with_message(format!("the host answered malformed JSON: {e}"))
    })?;
    JsValue::from_json(&v, ctx)
}

fn run(source: &str, slots: Vec<Slot>, constants_json: &str) -> Result<String, String> {
    let mut ctx = Context::builder()
        .clock(Rc::new(FixedClock::from_millis(0)))
        .module_loader(Rc::new(IdleModuleLoader))
        .build()
        .map_err(|e| format!("the engine did not start: {e}"))?;
    ctx.runtime_limits_mut().set_recursion_limit(MAX_RECURSION);

    let constants: serde_json::Map<String, serde_json::Value> = if constants_json.trim().is_empty()
    {
        serde_json::Map::new()
    } else {
        serde_json::from_str(constants_json)
            .map_err(|e| format!("constants are not a JSON object: {e}"))?
    };
    for (name, value) in &constants {
        let v = JsValue::from_json(value, &mut ctx).map_err(|e| js_err(e, &mut ctx))?;
        ctx.register_global_property(JsString::from(name.as_str()), v, Attribute::READONLY)
            .map_err(|e| js_err(e, &mut ctx))?;
    }
    for slot in slots {
        let name = JsString::from(slot.name.as_str());
        let mut init = ObjectInitializer::new(&mut ctx);
        for m in &slot.methods {
            let method = JsString::from(m.as_str());
            init.function(
                NativeFunction::from_copy_closure_with_captures(
                    call_slot,
                    (name.clone(), method.clone()),
                ),
                method,
                0,
            );
        }
        init.property(
            JsString::from("kind"),
            JsString::from(slot.kind.as_str()),
            Attribute::READONLY,
        );
        let obj = init.build();
        ctx.register_global_property(name, obj, Attribute::READONLY)
            .map_err(|e| js_err(e, &mut ctx))?;
    }

    let mut value = ctx
        .eval(Source::from_bytes(source))
        .map_err(|e| js_err(e, &mut ctx))?;
    ctx.run_jobs().map_err(|e| js_err(e, &mut ctx))?;
    if let Some(obj) = value.as_object()
        && let Ok(p) = JsPromise::from_object(obj.clone())
    {
        value = match p.state() {
            boa_engine::builtins::promise::PromiseState::Fulfilled(v) => v,
            boa_engine::builtins::promise::PromiseState::Rejected(e) => {
                return Err(js_err(JsError::from_opaque(e), &mut ctx));
            }
            boa_engine::builtins::promise::PromiseState::Pending => {
                return Err("the script's promise never settled".into());
            }
        };
    }
    let json = to_json(&value, &mut ctx).map_err(|e| js_err(e, &mut ctx))?;
    Ok(json.to_string())
}

impl Guest for Evaluator {
    fn eval(source: String, slots: Vec<Slot>, constants_json: String) -> Result<String, String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        run(&source, slots, &constants_json)
    }
}

/// Entropy for Math.random: a fixed splitmix64 sequence (there is none to
/// be had on wasm32-unknown-unknown, and reproducible runs suit a sandbox).
///
/// # Safety
/// getrandom calls it with a valid, writable `dest` of `len` bytes.
#[unsafe(no_mangle)]
unsafe extern "Rust" fn __getrandom_v03_custom(
    dest: *mut u8,
    len: usize,
) -> Result<(), getrandom::Error> {
    static mut STATE: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..len {
        // SAFETY: single-threaded guest; `dest` is valid for `len` bytes.
        unsafe {
            STATE = STATE.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = STATE;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *dest.add(i) = (z ^ (z >> 31)) as u8;
        }
    }
    Ok(())
}

export!(Evaluator);
