//! wrong-version: a guest built against capstan:agent@0.2.0, which this node
//! does not speak. Installing it must be refused, naming both versions.
wit_bindgen::generate!({ path: "wit", world: "agent" });

use capstan::agent::host;

struct Wrong;

impl Guest for Wrong {
    fn on_message(msg: Message) -> Result<(), String> {
        host::reply(msg.number, "should never run")?;
        Ok(())
    }
}

export!(Wrong);
