//! bigmail (hostile): tries to mail its host a 1 MiB message. The maximum
//! message size stops it.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;

struct BigMail;

impl Guest for BigMail {
    fn on_message(_msg: Message) -> Result<(), String> {
        let huge = "x".repeat(1 << 20);
        host::send("HOST", &huge)?;
        Ok(())
    }
}

export!(BigMail);
