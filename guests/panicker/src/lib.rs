//! panicker (hostile): indexes past the end of a vector on any message. On
//! wasm32-unknown-unknown a panic is a bare `unreachable` trap; the panic
//! hook (panic-log) forwards the message to the host first, so the host's
//! stop report says what happened.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;
use capstan::agent::types::LogLevel;

struct Panicker;

impl Guest for Panicker {
    fn on_message(msg: Message) -> Result<(), String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let v = [1u8, 2, 3];
        let i = core::hint::black_box(msg.text.len() + 5);
        let x = v[i];
        host::reply(msg.number, &format!("unreachable: {x}"))?;
        Ok(())
    }
}

export!(Panicker);
