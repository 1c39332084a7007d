//! The console's pages: server-rendered HTML (every text from mail, names
//! and guests escaped with [`escape`]; locator swiss numbers cut out of mail
//! text) and the two assets. The buttons are forms posted to `/endow` and
//! `/refuse`, doing what `capstan endow N --bind SLOT=PATH` and `capstan
//! reply N "refused: …"` do.
//!
//! - this module: routing, the actions posted by forms, the page layout;
//! - `inbox`: an agent's inbox section and the forms of code proposals;
//! - `views`: the names, guests, cluster and graph pages;
//! - `render`: highlighting, JSON, sizes, dates, redacted locators.

use std::collections::HashMap;
use std::fmt::Write as _;

use capstan_actors::{AgentHandle, EntryInfo, MessageBodyView, MessageView};
use capstan_proto::RequestId;
use serde_json::{Value, json};

use super::{Console, Request, Response, parse_form, percent_encode};
use crate::graph::escape;

mod inbox;
mod render;
mod views;

use inbox::*;
pub use render::*;
use views::*;

const APP_JS: &str = include_str!("../app.js");
const APP_CSS: &str = include_str!("../app.css");

/// Most messages shown (the newest).
const MAX_SHOWN: usize = 300;
/// Pages of 1,000 read to find the newest messages.
const MAX_PAGES: usize = 20;
/// Most names offered in a slot's picker.
const MAX_PICKER: usize = 1000;
/// Most agents whose placement the cluster page shows.
const MAX_PLACEMENTS: usize = 100;
/// Longest refusal reason, bytes.
const MAX_REASON: usize = 4096;

/// Answers one authorized request.
pub async fn route(c: &Console, req: &Request, csrf: &str) -> Response {
    let who = if req.method == "POST" {
        form_value(req, "as")
    } else {
        req.param("as").unwrap_or("").to_string()
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/app.js") => Response::new(200, "text/javascript; charset=utf-8", APP_JS),
        ("GET", "/app.css") => Response::new(200, "text/css; charset=utf-8", APP_CSS),
        ("GET", "/favicon.ico") => Response::text(404, "no icon"),
        ("GET", path) => {
            let handle = match c.acting(&who).await {
                Ok(h) => h,
                Err(e) => {
                    return Response::new(
                        403,
                        "text/html; charset=utf-8",
                        layout(
                            c,
                            "Not allowed",
                            "",
                            (&who, csrf),
                            &[],
                            &format!(
                                "<p class=\"err\">cannot act as {}: {}</p><p><a href=\"/\">back to the root host</a></p>",
                                escape(&who),
                                escape(&format!("{e:#}"))
                            ),
                        ),
                    );
                }
            };
            let body = match path {
                "/" => inbox_section(c, &handle, &who, csrf).await,
                "/inbox/frag" => {
                    return Response::html(inbox_section(c, &handle, &who, csrf).await);
                }
                "/names" => names_page(&handle, &who, req.param("path").unwrap_or("")).await,
                "/guests" => guests_page(&handle).await,
                "/cluster" => cluster_page(c, &handle).await,
                "/graph" => graph_page(c, &handle, &who).await,
                "/graph.svg" => {
                    return match crate::graph::gather(&c.runtime, &handle, "").await {
                        Ok(g) => Response::new(200, "image/svg+xml", crate::graph::svg(&g)),
                        Err(e) => Response::text(400, &format!("{e:#}")),
                    };
                }
                _ => return Response::text(404, "not found"),
            };
            let title = match path {
                "/" => "Inbox",
                "/names" => "Names",
                "/guests" => "Guests",
                "/cluster" => "Cluster",
                _ => "Graph",
            };
            let agents = agents(c).await;
            Response::html(layout(c, title, path, (&who, csrf), &agents, &body))
        }
        ("POST", "/endow") | ("POST", "/refuse") => {
            let fetch = req.header("x-capstan-fetch") == Some("1");
            let outcome = match c.acting(&who).await {
                Ok(h) => act(&h, req).await,
                Err(e) => Err(format!("{e:#}")),
            };
            if fetch {
                let (code, v) = match outcome {
                    Ok(t) => (200, json!({"ok": true, "text": t})),
                    Err(e) => (400, json!({"ok": false, "error": e})),
                };
                Response::new(code, "application/json", v.to_string())
            } else {
                match outcome {
                    Ok(_) => Response::redirect(&format!("/?as={}", percent_encode(&who))),
                    Err(e) => Response::text(400, &e),
                }
            }
        }
        ("POST", _) => Response::text(404, "not found"),
        _ => Response::text(405, "method not allowed"),
    }
}

fn form_value(req: &Request, name: &str) -> String {
    parse_form(&String::from_utf8_lossy(&req.body))
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Endow or refuse: what the buttons do.
async fn act(h: &AgentHandle, req: &Request) -> Result<String, String> {
    let form = parse_form(&String::from_utf8_lossy(&req.body));
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let number: u64 = get("number")
        .parse()
        .map_err(|_| "the form has no message number".to_string())?;
    // The request id the page was rendered with: a second click applies once.
    let rid = hex::decode(get("req"))
        .ok()
        .and_then(|b| RequestId::from_slice(&b).ok())
        .unwrap_or_else(RequestId::random);
    if req.path == "/endow" {
        let bindings: Vec<(String, String)> = form
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("slot.")
                    .map(|s| (s.to_string(), v.to_string()))
            })
            .collect();
        let evaluator = match get("evaluator") {
            e if e.is_empty() => "evaluator".to_string(),
            e => e,
        };
        let o = h
            .endow(rid, &evaluator, number, &bindings)
            .await
            .map_err(|e| e.to_string())?;
        let what = match &o.result {
            Ok(r) => format!("result: {r}"),
            Err(e) => format!("error: {e}"),
        };
        Ok(match o.reply {
            Some(n) => format!("endowed message {number}: {what} (sent as message {n})"),
            None => format!("endowed message {number}: {what}"),
        })
    } else {
        let mut reason = get("reason");
        if reason.trim().is_empty() {
            reason = "the host refused this proposal".into();
        }
        if reason.len() > MAX_REASON {
            return Err(format!("the reason is longer than {MAX_REASON} bytes"));
        }
        let n = h
            .send(
                rid,
                "",
                vec![format!("refused: {reason}")],
                vec![],
                Some(number),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("refused message {number} (sent as message {n})"))
    }
}

/// The agents the root host holds by name (for the selector).
async fn agents(c: &Console) -> Vec<String> {
    c.runtime
        .root_host()
        .list("")
        .await
        .map(|es| {
            es.into_iter()
                .filter(|e| !is_special(&e.name) && (e.kind == "host" || e.kind == "guest"))
                .map(|e| e.name)
                .collect()
        })
        .unwrap_or_default()
}

fn is_special(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

fn q(who: &str) -> String {
    format!("as={}", percent_encode(who))
}

/// The page around `body`: navigation and the acting-agent selector.
fn layout(
    c: &Console,
    title: &str,
    active: &str,
    (who, csrf): (&str, &str),
    agents: &[String],
    body: &str,
) -> String {
    let mut s = String::with_capacity(body.len() + 2048);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><meta name=\"csrf-token\" content=\"{}\"><title>{} — capstan console</title><link rel=\"stylesheet\" href=\"/app.css\"><script src=\"/app.js\" defer></script></head><body data-as=\"{}\"><header><strong class=\"brand\">capstan</strong><nav>",
        escape(csrf),
        escape(title),
        escape(who)
    );
    for (path, name) in [
        ("/", "Inbox"),
        ("/names", "Names"),
        ("/guests", "Guests"),
        ("/cluster", "Cluster"),
        ("/graph", "Graph"),
    ] {
        let _ = write!(
            s,
            "<a href=\"{path}?{}\"{}>{name}</a>",
            escape(&q(who)),
            if path == active {
                " class=\"active\""
            } else {
                ""
            }
        );
    }
    let _ = write!(
        s,
        "</nav><form method=\"get\" action=\"{}\" class=\"as\"><label>acting as <select name=\"as\" id=\"as-select\"><option value=\"\">root host</option>",
        if active.is_empty() { "/" } else { active }
    );
    let mut listed = false;
    for a in agents {
        let sel = if a == who {
            listed = true;
            " selected"
        } else {
            ""
        };
        let _ = write!(
            s,
            "<option value=\"{}\"{sel}>{}</option>",
            escape(a),
            escape(a)
        );
    }
    if !who.is_empty() && !listed {
        let _ = write!(
            s,
            "<option value=\"{}\" selected>{}</option>",
            escape(who),
            escape(who)
        );
    }
    let _ = write!(
        s,
        "</select></label> <button type=\"submit\">Act</button></form></header><main><h1>{}</h1><p id=\"status\" role=\"status\"></p>{body}</main><footer>node {} · console on {}</footer></body></html>",
        escape(title),
        escape(&c.paths.home_str()),
        escape(&c.cfg.addr.to_string()),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlight_escapes_everything() {
        let h = highlight("const a = \"<b>\"; // </pre><script>\nx < 2");
        assert!(!h.contains("<b>"), "{h}");
        assert!(!h.contains("<script>"), "{h}");
        assert!(h.contains("<span class=\"kw\">const</span>"), "{h}");
        assert!(h.contains("&lt;/pre&gt;"), "{h}");
    }

    #[test]
    fn swiss_numbers_are_cut() {
        let t = redact_locators("see capstan://abc/SECRETSWISS?at=1.2.3.4:5 now");
        assert_eq!(t, "see capstan://abc/[secret hidden]?at=1.2.3.4:5 now");
        assert_eq!(date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(date(1_764_892_800_000), "2025-12-05 00:00:00 UTC");
    }

    #[test]
    fn proposals_parse() {
        let p = proposal(
            "definition: slots {reader: \"x\"}\n{\"source\":\"1+1\",\"slots\":{\"reader\":\"x\"}}",
        )
        .unwrap();
        assert_eq!(p.source, "1+1");
        assert_eq!(p.slots, vec![("reader".to_string(), "x".to_string())]);
        assert!(proposal("hello").is_none());
    }
}
