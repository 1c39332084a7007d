//! The inbox section of an agent's page: its newest messages, and for a
//! code proposal (an `eval` an agent asks its host to run) the forms that
//! endow it.

use super::*;

/// A code proposal (`definition: …` then its JSON on the next line).
pub(super) struct Proposal {
    pub(super) source: String,
    pub(super) slots: Vec<(String, String)>,
    pub(super) values: Option<Value>,
}

pub(super) fn proposal(text: &str) -> Option<Proposal> {
    let rest = text.strip_prefix("definition:")?;
    let (_, j) = rest.split_once('\n')?;
    let v: Value = serde_json::from_str(j).ok()?;
    let source = v["source"].as_str()?.to_string();
    let slots = v["slots"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, d)| (k.clone(), d.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let values = v
        .get("values")
        .filter(|x| !x.is_null() && x.as_object().is_none_or(|o| !o.is_empty()))
        .cloned();
    Some(Proposal {
        source,
        slots,
        values,
    })
}

/// The newest messages of the inbox (at most [`MAX_SHOWN`]), in order,
/// and whether newer ones are left to read (a long inbox is read
/// [`MAX_PAGES`] pages a request). Reading starts where the last window
/// began (numbers only grow), so each view reads little.
pub(super) async fn newest(
    c: &Console,
    h: &AgentHandle,
) -> Result<(Vec<MessageView>, bool), String> {
    let start = c.inbox_start(h.id());
    let mut out: Vec<MessageView> = Vec::new();
    let mut from = start;
    let mut left = false;
    for i in 0..MAX_PAGES {
        let (page, more) = h
            .inbox_page(None, from, 1000)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(last) = page.last() {
            from = last.number + 1;
        }
        out.extend(page);
        if out.len() > MAX_SHOWN {
            out.drain(..out.len() - MAX_SHOWN);
        }
        if !more {
            break;
        }
        left = i + 1 == MAX_PAGES;
    }
    c.set_inbox_start(h.id(), out.first().map_or(start, |m| m.number));
    Ok((out, left))
}

/// The inbox as threads, newest activity first: the section the page
/// shows and live updates replace.
pub(super) async fn inbox_section(c: &Console, h: &AgentHandle, who: &str, csrf: &str) -> String {
    let (msgs, left) = match newest(c, h).await {
        Ok(m) => m,
        Err(e) => {
            return format!(
                "<section id=\"inbox\" data-next=\"0\"><p class=\"err\">{}</p></section>",
                escape(&e)
            );
        }
    };
    let next = msgs.last().map_or(0, |m| m.number + 1);
    let by_id: HashMap<RequestId, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.message_id, i))
        .collect();
    // The thread of each message: the first of its reply chain shown.
    let mut root = vec![0usize; msgs.len()];
    for (i, m) in msgs.iter().enumerate() {
        let mut r = i;
        let mut cur = m.reply_to;
        for _ in 0..64 {
            match cur.and_then(|id| by_id.get(&id).copied()) {
                Some(j) if j < r => {
                    r = j;
                    cur = msgs[j].reply_to;
                }
                _ => break,
            }
        }
        root[i] = r;
    }
    let mut threads: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut pos: HashMap<usize, usize> = HashMap::new();
    for (i, &r) in root.iter().enumerate() {
        match pos.get(&r) {
            Some(&t) => threads[t].1.push(i),
            None => {
                pos.insert(r, threads.len());
                threads.push((r, vec![i]));
            }
        }
    }
    threads.sort_by_key(|(_, ms)| std::cmp::Reverse(*ms.last().unwrap_or(&0)));
    // Answered proposals: a later message from SELF replying to them.
    let answered: HashMap<RequestId, u64> = msgs
        .iter()
        .filter(|m| m.from == "SELF")
        .filter_map(|m| m.reply_to.map(|r| (r, m.number)))
        .collect();
    let names = if h.is_host() {
        h.list("").await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut s = format!(
        "<section id=\"inbox\" data-next=\"{next}\">{}",
        if msgs.is_empty() {
            "<p class=\"empty\">The inbox is empty.</p>"
        } else {
            ""
        }
    );
    if left {
        s.push_str("<p class=\"pending\">This inbox is long: older messages are shown; reload to read on to the newest.</p>");
    }
    // The proposals waiting for a decision, linked to their place.
    let pending: Vec<u64> = msgs
        .iter()
        .filter(|m| m.from != "SELF" && !answered.contains_key(&m.message_id))
        .filter(|m| proposal(&message_text(m)).is_some())
        .map(|m| m.number)
        .collect();
    if !pending.is_empty() {
        let _ = write!(
            s,
            "<p class=\"pending\">{} code proposal{} waiting for your decision:",
            pending.len(),
            if pending.len() == 1 { "" } else { "s" }
        );
        for n in &pending {
            let _ = write!(s, " <a href=\"#m-{n}\">message {n}</a>");
        }
        s.push_str("</p>");
    }
    for (_, ms) in &threads {
        s.push_str("<div class=\"thread\">");
        for &i in ms {
            let m = &msgs[i];
            let text = redact_locators(&message_text(m));
            let _ = write!(
                s,
                "<article class=\"msg\" id=\"m-{n}\" data-number=\"{n}\"><div class=\"meta\"><span class=\"num\">{n}.</span> from <b>{}</b> to <b>{}</b> <time>{}</time></div>",
                escape(&m.from),
                escape(&m.to),
                date(m.date_ms),
                n = m.number,
            );
            match proposal(&text).filter(|_| m.from != "SELF") {
                Some(p) => {
                    let first = text.lines().next().unwrap_or("");
                    let _ = write!(
                        s,
                        "<div class=\"proposal\" data-number=\"{}\"><p class=\"text\">{}</p><pre class=\"code\"><code>{}</code></pre>",
                        m.number,
                        escape(first),
                        highlight(&p.source)
                    );
                    if let Some(v) = &p.values {
                        let _ = write!(
                            s,
                            "<p>with stored results: <code>{}</code></p>",
                            escape(&v.to_string())
                        );
                    }
                    match answered.get(&m.message_id) {
                        Some(r) => {
                            let _ = write!(s, "<p class=\"answered\">answered (message {r})</p>");
                        }
                        None if h.is_host() => {
                            s.push_str(&proposal_forms(m.number, &p, &names, who, csrf));
                        }
                        None => s.push_str(
                            "<p class=\"answered\">pending: only a host can endow code</p>",
                        ),
                    }
                    s.push_str("</div>");
                }
                None => {
                    let _ = write!(s, "<div class=\"text\">{}</div>", escape(&text));
                }
            }
            s.push_str("</article>");
        }
        s.push_str("</div>");
    }
    s.push_str("</section>");
    s
}

pub(super) fn hidden(s: &mut String, name: &str, value: &str) {
    let _ = write!(
        s,
        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
        escape(value)
    );
}

/// The Endow form (a picker per slot) and the Refuse form.
pub(super) fn proposal_forms(
    number: u64,
    p: &Proposal,
    names: &[EntryInfo],
    who: &str,
    csrf: &str,
) -> String {
    let mut s = format!(
        "<form method=\"post\" action=\"/endow\" class=\"act endow\" data-key=\"{number}\">"
    );
    hidden(&mut s, "csrf", csrf);
    hidden(&mut s, "as", who);
    hidden(&mut s, "number", &number.to_string());
    hidden(&mut s, "req", &RequestId::random().to_hex());
    if p.slots.is_empty() {
        s.push_str("<p>No capabilities needed.</p>");
    }
    for (slot, description) in &p.slots {
        let _ = write!(
            s,
            "<label class=\"slot\"><span><code>{}</code> — {}</span><select name=\"slot.{}\" data-slot=\"{}\"><option value=\"\">choose a name…</option>",
            escape(slot),
            escape(description),
            escape(slot),
            escape(slot),
        );
        for e in names
            .iter()
            .filter(|e| e.kind != "special")
            .take(MAX_PICKER)
        {
            let _ = write!(
                s,
                "<option value=\"{}\">{} ({})</option>",
                escape(&e.name),
                escape(&e.name),
                escape(&e.kind)
            );
        }
        s.push_str("</select></label>");
    }
    s.push_str("<button type=\"submit\" class=\"endow-button\">Endow</button></form>");
    s.push_str("<form method=\"post\" action=\"/refuse\" class=\"act refuse\">");
    hidden(&mut s, "csrf", csrf);
    hidden(&mut s, "as", who);
    hidden(&mut s, "number", &number.to_string());
    hidden(&mut s, "req", &RequestId::random().to_hex());
    s.push_str("<input type=\"text\" name=\"reason\" placeholder=\"reason (optional)\" maxlength=\"4096\"><button type=\"submit\" class=\"refuse-button\">Refuse</button></form>");
    s
}
