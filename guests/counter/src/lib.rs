//! counter: an agent-world guest. `increment` adds one to a counter kept as
//! a stored value in the guest's own names (so it survives restarts) and
//! replies with the new count; `get` replies with the count.
//! `increment slowly N` stores the new count, tells its host so, works for
//! N loop rounds and only then replies: a handler that can be cut short
//! between its effects (tests kill its node there).
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;

struct Counter;

fn current() -> Result<u64, String> {
    Ok(match host::read_text("count")? {
        Some(t) => t.trim().parse().map_err(|e| format!("count is not a number: {e}"))?,
        None => 0,
    })
}

impl Guest for Counter {
    fn on_message(msg: Message) -> Result<(), String> {
        panic_log::install(|m| host::log(capstan::agent::types::LogLevel::Error, m));
        match msg.text.trim() {
            "increment" => {
                let n = current()? + 1;
                host::store_text("count", &n.to_string())?;
                host::reply(msg.number, &format!("count = {n}"))?;
            }
            t if t.starts_with("increment slowly ") => {
                let rounds: u64 = t["increment slowly ".len()..]
                    .trim()
                    .parse()
                    .map_err(|e| format!("increment slowly N: N is not a number: {e}"))?;
                let n = current()? + 1;
                host::store_text("count", &n.to_string())?;
                host::send("HOST", &format!("stored count {n}; working"))?;
                let mut x = 0u64;
                for i in 0..rounds {
                    x = core::hint::black_box(x.wrapping_add(i));
                }
                host::reply(msg.number, &format!("count = {n}"))?;
            }
            "get" => {
                let n = current()?;
                host::reply(msg.number, &format!("count = {n}"))?;
            }
            other => {
                host::reply(
                    msg.number,
                    &format!("unknown command {other:?}; say increment or get"),
                )?;
            }
        }
        Ok(())
    }
}

export!(Counter);
