//! The other pages: names, guests, the cluster and the capability graph.

use super::*;

pub(super) async fn names_page(h: &AgentHandle, who: &str, path: &str) -> String {
    let mut s = String::new();
    // Breadcrumb.
    let _ = write!(
        s,
        "<p class=\"crumbs\"><a href=\"/names?{}\">names</a>",
        escape(&q(who))
    );
    let mut acc = String::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        if !acc.is_empty() {
            acc.push('.');
        }
        acc.push_str(part);
        let _ = write!(
            s,
            " . <a href=\"/names?{}&amp;path={}\">{}</a>",
            escape(&q(who)),
            escape(&percent_encode(&acc)),
            escape(part)
        );
    }
    s.push_str("</p>");
    match h.list(path).await {
        Ok(entries) => {
            s.push_str("<div class=\"scroll\"><table class=\"names\"><thead><tr><th>name</th><th>type</th><th>detail</th><th>id</th></tr></thead><tbody>");
            for e in entries {
                let full = if path.is_empty() {
                    e.name.clone()
                } else {
                    format!("{path}.{}", e.name)
                };
                let name = if e.kind == "directory" && !is_special(&e.name) {
                    format!(
                        "<a href=\"/names?{}&amp;path={}\">{}</a>",
                        escape(&q(who)),
                        escape(&percent_encode(&full)),
                        escape(&e.name)
                    )
                } else {
                    escape(&e.name)
                };
                let id = if e.kind == "special" {
                    String::new()
                } else {
                    e.id.short()
                };
                let _ = write!(
                    s,
                    "<tr><td>{name}</td><td><span class=\"type t-{}\">{}</span></td><td class=\"detail\">{}</td><td><code>{}</code></td></tr>",
                    escape(&e.kind),
                    escape(&e.kind),
                    escape(&redact_locators(&e.detail)),
                    escape(&id)
                );
            }
            s.push_str("</tbody></table></div>");
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">{}</p>", escape(&e.to_string()));
        }
    }
    s
}

pub(super) async fn guests_page(h: &AgentHandle) -> String {
    match h.guests().await {
        Ok(gs) if gs.is_empty() => {
            "<p class=\"empty\">No guest with a component body.</p>".to_string()
        }
        Ok(gs) => {
            let mut s = String::from(
                "<div class=\"scroll\"><table class=\"guests\"><thead><tr><th>name</th><th>state</th><th>handled</th><th>failures</th><th>fuel (last)</th><th>memory (peak)</th><th>last error</th></tr></thead><tbody>",
            );
            for g in gs {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
                    escape(&g.name),
                    escape(&g.state),
                    g.handled,
                    g.failures,
                    g.fuel_last,
                    bytes(g.memory_peak),
                    escape(&g.last_error)
                );
            }
            s.push_str("</tbody></table></div>");
            s
        }
        Err(e) => format!("<p class=\"err\">{}</p>", escape(&e.to_string())),
    }
}

pub(super) async fn cluster_page(c: &Console, h: &AgentHandle) -> String {
    if c.runtime.membership().is_none() {
        return "<p class=\"empty\">This node is not in a cluster (it runs on an embedded store).</p>".to_string();
    }
    let (mut s, node) =
        match crate::cluster::command(&c.runtime, h, "status", "", &Default::default()).await {
            Ok(mut v) => {
                // Members (with their leases) as a table of their own.
                let members = v.as_object_mut().and_then(|o| o.remove("members"));
                let mut s = String::new();
                if let Some(m) = members {
                    s.push_str("<h2>Members and leases</h2>");
                    s.push_str(&json_html(&m));
                }
                (s, v)
            }
            Err(e) => return format!("<p class=\"err\">{}</p>", escape(&format!("{e:#}"))),
        };
    // Where the agents in your names live (at most MAX_PLACEMENTS of them).
    let agents: Vec<String> = h
        .list("")
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !is_special(&e.name) && (e.kind == "host" || e.kind == "guest"))
        .map(|e| e.name)
        .take(MAX_PLACEMENTS)
        .collect();
    let mut rows = Vec::new();
    for a in &agents {
        if let Ok(v) =
            crate::cluster::command(&c.runtime, h, "placement", a, &Default::default()).await
        {
            rows.push(v);
        }
    }
    s.push_str("<h2>Placements of your agents</h2>");
    if rows.is_empty() {
        s.push_str("<p class=\"empty\">No agent in your names.</p>");
    } else {
        s.push_str(&json_html(&Value::Array(rows)));
    }
    s.push_str("<h2>This node</h2>");
    s.push_str(&json_html(&node));
    s
}

pub(super) async fn graph_page(c: &Console, h: &AgentHandle, who: &str) -> String {
    match crate::graph::gather(&c.runtime, h, "").await {
        Ok(g) => format!(
            "<p>{} formulas, {} names, {} locators out{}. <a href=\"/graph.svg?{}\">SVG</a></p><div class=\"graph\">{}</div>",
            g.nodes.len(),
            g.edges.len(),
            g.locators_out,
            if g.truncated { " (truncated)" } else { "" },
            escape(&q(who)),
            crate::graph::svg(&g)
        ),
        Err(e) => format!("<p class=\"err\">{}</p>", escape(&format!("{e:#}"))),
    }
}
