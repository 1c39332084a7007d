//! old-channel: a channel built against capstan:channel@0.1.0 (before
//! `http-request`), which this node no longer runs. Installing it must be
//! refused, naming both versions.
wit_bindgen::generate!({ path: "wit", world: "sandboxed-channel" });

use exports::capstan::channel::channel::{ChannelConfig, Guest};

struct Old;

impl Guest for Old {
    fn on_start(_config_json: String) -> Result<ChannelConfig, String> {
        Ok(ChannelConfig {
            poll_interval_ms: None,
        })
    }
    fn on_poll() {}
    fn on_respond(_recipient: String, _text: String) -> Result<(), String> {
        Ok(())
    }
    fn on_shutdown() {}
}

export!(Old);
