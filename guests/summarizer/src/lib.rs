//! summarizer: on any message, reads the value granted to it as `doc` and
//! mails its host a summary (lines, words, bytes, first line).
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;

struct Summarizer;

impl Guest for Summarizer {
    fn on_message(_msg: Message) -> Result<(), String> {
        panic_log::install(|m| host::log(capstan::agent::types::LogLevel::Error, m));
        let doc = host::lookup("doc")?;
        let bytes = doc.read()?;
        let text = String::from_utf8_lossy(&bytes);
        let first = text.lines().next().unwrap_or("").chars().take(80).collect::<String>();
        let summary = format!(
            "summary of doc: {} lines, {} words, {} bytes; first line: {first}",
            text.lines().count(),
            text.split_whitespace().count(),
            bytes.len()
        );
        host::send("HOST", &summary)?;
        Ok(())
    }
}

export!(Summarizer);
