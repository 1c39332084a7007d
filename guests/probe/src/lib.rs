//! probe: an agent-world guest for `capstan bench`, measuring the host's
//! call paths from inside. Each message is one handler call that mails
//! nothing (the node's guest stats time it):
//!
//! - `noop`: returns at once (a bare host → guest call);
//! - `kind N`: N calls of `capability.kind()` on the capability it holds as
//!   `doc` (a guest → capability call through the handle table);
//! - `read N`: N calls of `capability.read()` on it (a capability call
//!   that reads a stored value from the store).
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;

struct Probe;

impl Guest for Probe {
    fn on_message(msg: Message) -> Result<(), String> {
        let mut words = msg.text.split_whitespace();
        let (what, n) = (
            words.next().unwrap_or(""),
            words.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0),
        );
        match what {
            "kind" => {
                let c = host::lookup("doc")?;
                for _ in 0..n {
                    std::hint::black_box(c.kind());
                }
            }
            "read" => {
                let c = host::lookup("doc")?;
                for _ in 0..n {
                    std::hint::black_box(c.read()?);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

export!(Probe);
