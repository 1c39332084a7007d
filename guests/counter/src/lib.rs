//! counter: an agent-world guest. `increment` adds one to a counter kept as
//! a stored value in the guest's own names (so it survives restarts) and
//! replies with the new count; `get` replies with the count.
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
