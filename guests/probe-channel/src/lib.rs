//! probe-channel: a channel guest for `capstan bench` whose `on-poll` does
//! nothing. A channel keeps its instance between calls, so the node's time
//! for each poll is a host → guest call on a warm instance (the agent
//! world's messages each get a fresh one).
wit_bindgen::generate!({ path: "../../wit/channel", world: "sandboxed-channel" });

use exports::capstan::channel::channel::{ChannelConfig, Guest};

struct Probe;

impl Guest for Probe {
    fn on_start(_config_json: String) -> Result<ChannelConfig, String> {
        Ok(ChannelConfig {
            poll_interval_ms: Some(100),
        })
    }
    fn on_poll() {}
    fn on_respond(_recipient: String, _text: String) -> Result<(), String> {
        Ok(())
    }
    fn on_shutdown() {}
}

export!(Probe);
