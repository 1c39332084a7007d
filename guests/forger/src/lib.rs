//! forger (hostile): calls a capability handle it was never given (a forged
//! handle number). The host's resource table refuses it.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host::Capability;

struct Forger;

impl Guest for Forger {
    fn on_message(_msg: Message) -> Result<(), String> {
        // SAFETY: deliberately unsound: this guest is hostile.
        let forged = unsafe { Capability::from_handle(7) };
        let _ = forged.read();
        Ok(())
    }
}

export!(Forger);
