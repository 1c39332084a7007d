//! `capstan graph`: the capability graph seen from one agent (or one of its
//! directories) — the holders (agents, directories), what each holds (its
//! names, each an edge to a formula), what guests were granted (a guest's
//! names are its grants) and how many locators of each formula are out.
//!
//! The node gathers the graph ([`gather`], acting with the caller's
//! authority: an agent's names are read only for agents it made, as `--as`
//! does) and the CLI renders it: JSON, Graphviz dot text, or SVG drawn here
//! ([`svg`], a layered layout: a column per distance from the start, no
//! graphviz needed). The console shows the same SVG.
//!
//! Bounds: at most [`MAX_HOLDERS`] holders are listed and [`MAX_EDGES`]
//! edges kept; past them the graph says `truncated`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use anyhow::{anyhow, bail};
use capstan_actors::{AgentHandle, Runtime};
use capstan_proto::FormulaId;
use serde::{Deserialize, Serialize};

/// Most holders (agents and directories) whose names are listed.
pub const MAX_HOLDERS: usize = 500;
/// Most edges (names) kept.
pub const MAX_EDGES: usize = 5000;
/// Locators counted per formula (a count past it shows as this).
const MAX_LOCATORS_COUNTED: usize = 1000;

/// One formula of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The formula id, hex.
    pub id: String,
    /// The first name it was found under (the start: `SELF` or its path).
    pub label: String,
    /// host, guest, directory, value, promise, remote, …
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: String,
    /// Its names were listed (an agent made by the start, or a directory).
    pub holder: bool,
    /// Locators issued for it that are not cancelled.
    pub locators: u64,
}

/// A name: holder `from` names formula `to` as `name` (for a guest: the
/// slot it was granted it under).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub name: String,
}

/// The capability graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    /// The id of the start.
    pub root: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// The sum of the nodes' locators.
    pub locators_out: u64,
    /// Holders or edges were left out (past the bounds).
    pub truncated: bool,
}

struct Holder {
    handle: AgentHandle,
    /// A directory path in the handle's names; "" for its own names.
    dir: String,
    id: FormulaId,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}.{name}")
    }
}

/// Special names (`SELF`, `HOST`, `MAIL`, …) are not drawn: every agent has them.
fn is_special(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

/// The graph seen by `handle` from `path` (an agent it made or a directory
/// in its names; "" for its own names).
pub async fn gather(rt: &Runtime, handle: &AgentHandle, path: &str) -> anyhow::Result<Graph> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: HashMap<FormulaId, usize> = HashMap::new();
    let mut edges: Vec<Edge> = Vec::new();
    let mut truncated = false;

    let start = if path.is_empty() {
        let me = handle
            .list("")
            .await?
            .into_iter()
            .find(|e| e.name == "SELF")
            .ok_or_else(|| anyhow!("cannot read SELF"))?;
        nodes.push(Node {
            id: me.id.to_hex(),
            label: "SELF".into(),
            kind: me.kind,
            detail: me.detail,
            holder: true,
            locators: 0,
        });
        Holder {
            handle: handle.clone(),
            dir: String::new(),
            id: me.id,
        }
    } else {
        let e = handle.show(path).await?;
        let holder = match e.kind.as_str() {
            "directory" => Holder {
                handle: handle.clone(),
                dir: path.to_string(),
                id: e.id,
            },
            "host" | "guest" => Holder {
                handle: handle.agent(path).await?,
                dir: String::new(),
                id: e.id,
            },
            other => {
                bail!("{path} names a {other}; a graph starts at an agent you made or a directory")
            }
        };
        nodes.push(Node {
            id: e.id.to_hex(),
            label: path.to_string(),
            kind: e.kind,
            detail: e.detail,
            holder: true,
            locators: 0,
        });
        holder
    };
    index.insert(start.id, 0);
    let root = start.id.to_hex();
    let mut listed: HashSet<FormulaId> = HashSet::from([start.id]);
    let mut queue = VecDeque::from([start]);
    let mut holders = 0usize;

    while let Some(h) = queue.pop_front() {
        if holders >= MAX_HOLDERS {
            truncated = true;
            break;
        }
        holders += 1;
        let entries = match h.handle.list(&h.dir).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!("graph: cannot list {}: {e}", h.dir);
                continue;
            }
        };
        for e in entries {
            if is_special(&e.name) {
                continue;
            }
            if edges.len() >= MAX_EDGES {
                truncated = true;
                break;
            }
            let i = *index.entry(e.id).or_insert_with(|| {
                nodes.push(Node {
                    id: e.id.to_hex(),
                    label: e.name.clone(),
                    kind: e.kind.clone(),
                    detail: e.detail.clone(),
                    holder: false,
                    locators: 0,
                });
                nodes.len() - 1
            });
            edges.push(Edge {
                from: h.id.to_hex(),
                to: e.id.to_hex(),
                name: e.name.clone(),
            });
            if listed.contains(&e.id) {
                continue;
            }
            let path = join(&h.dir, &e.name);
            let next = match e.kind.as_str() {
                "directory" => Some(Holder {
                    handle: h.handle.clone(),
                    dir: path,
                    id: e.id,
                }),
                // Only agents this holder made: the authority of --as.
                "host" | "guest" => match h.handle.agent(&path).await {
                    Ok(a) => Some(Holder {
                        handle: a,
                        dir: String::new(),
                        id: e.id,
                    }),
                    Err(_) => None,
                },
                _ => None,
            };
            if let Some(n) = next {
                listed.insert(e.id);
                nodes[i].holder = true;
                queue.push_back(n);
            }
        }
    }
    if !queue.is_empty() {
        truncated = true;
    }

    // The locators out, a page of nodes per read.
    let ids: Vec<FormulaId> = index.keys().copied().collect();
    let mut counts: HashMap<FormulaId, u64> = HashMap::new();
    for chunk in ids.chunks(256) {
        let chunk = chunk.to_vec();
        let got = rt
            .db()
            .read(move |tx| {
                Box::pin(async move {
                    let mut out = Vec::new();
                    for id in chunk {
                        let rows = tx
                            .get_prefix(
                                &capstan_actors::keys::locators_of(&id),
                                MAX_LOCATORS_COUNTED,
                                false,
                            )
                            .await?;
                        if !rows.is_empty() {
                            out.push((id, rows.len() as u64));
                        }
                    }
                    Ok::<_, capstan_actors::Error>(out)
                })
            })
            .await?;
        counts.extend(got);
    }
    let mut locators_out = 0;
    for (id, n) in counts {
        if let Some(&i) = index.get(&id) {
            nodes[i].locators = n;
            locators_out += n;
        }
    }
    Ok(Graph {
        root,
        nodes,
        edges,
        locators_out,
        truncated,
    })
}

/// The output formats of `capstan graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Dot,
    Svg,
    Json,
}

/// A dot string literal's contents.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Fill colour by kind.
fn color(kind: &str) -> &'static str {
    match kind {
        "host" => "#dbeafe",
        "guest" => "#fde68a",
        "directory" => "#e5e7eb",
        "value" => "#dcfce7",
        "promise" => "#fce7f3",
        "remote" => "#ede9fe",
        "llm" => "#ffedd5",
        _ => "#ffffff",
    }
}

fn subtitle(n: &Node) -> String {
    let mut s = n.kind.clone();
    if n.locators > 0 {
        let _ = write!(
            s,
            ", {} locator{} out",
            n.locators,
            if n.locators == 1 { "" } else { "s" }
        );
    }
    s
}

/// Graphviz dot text.
pub fn dot(g: &Graph) -> String {
    let mut s = String::from(
        "digraph capstan {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    for n in &g.nodes {
        let _ = writeln!(
            s,
            "  \"{}\" [label=\"{}\\n{}\", fillcolor=\"{}\"{}{}];",
            n.id,
            dot_escape(&n.label),
            dot_escape(&subtitle(n)),
            color(&n.kind),
            if n.id == g.root { ", penwidth=2" } else { "" },
            if n.locators > 0 {
                ", color=\"#b91c1c\""
            } else {
                ""
            },
        );
    }
    for e in &g.edges {
        let _ = writeln!(
            s,
            "  \"{}\" -> \"{}\" [label=\"{}\"];",
            e.from,
            e.to,
            dot_escape(&e.name)
        );
    }
    if g.truncated {
        s.push_str("  truncated [shape=plaintext, label=\"(truncated)\"];\n");
    }
    s.push_str("}\n");
    s
}

/// Text for HTML and SVG: `& < > " '` escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

const CHAR_W: usize = 7;
const BOX_H: usize = 38;
const ROW_GAP: usize = 22;
const COL_GAP: usize = 170;
const MARGIN: usize = 30;

/// The graph drawn as SVG: a column per distance from the start (breadth
/// first over the names), nodes in the order found, straight edges between
/// columns and curved ones otherwise, each labelled with its name.
pub fn svg(g: &Graph) -> String {
    let idx: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut out_edges: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for e in &g.edges {
        if let (Some(&a), Some(&b)) = (idx.get(e.from.as_str()), idx.get(e.to.as_str())) {
            out_edges.entry(a).or_default().push(b);
        }
    }
    // Layers: breadth-first distance from the start.
    let mut layer = vec![usize::MAX; g.nodes.len()];
    if let Some(&r) = idx.get(g.root.as_str()) {
        layer[r] = 0;
        let mut q = VecDeque::from([r]);
        while let Some(a) = q.pop_front() {
            for &b in out_edges.get(&a).into_iter().flatten() {
                if layer[b] == usize::MAX {
                    layer[b] = layer[a] + 1;
                    q.push_back(b);
                }
            }
        }
    }
    let deepest = layer.iter().filter(|&&l| l != usize::MAX).max().copied();
    for l in layer.iter_mut() {
        if *l == usize::MAX {
            *l = deepest.map_or(0, |d| d + 1);
        }
    }
    let layers = layer.iter().max().map_or(0, |m| m + 1);
    let mut columns: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (i, &l) in layer.iter().enumerate() {
        columns[l].push(i);
    }
    let label = |n: &Node| clip(&n.label, 40);
    let sub = |n: &Node| clip(&subtitle(n), 40);
    let width_of = |n: &Node| label(n).chars().count().max(sub(n).chars().count()) * CHAR_W + 24;
    // Positions: (x, y, w).
    let mut pos = vec![(0usize, 0usize, 0usize); g.nodes.len()];
    let mut x = MARGIN;
    let mut height = 0usize;
    for col in &columns {
        let w = col
            .iter()
            .map(|&i| width_of(&g.nodes[i]))
            .max()
            .unwrap_or(0);
        for (row, &i) in col.iter().enumerate() {
            let y = MARGIN + row * (BOX_H + ROW_GAP);
            pos[i] = (x, y, w);
            height = height.max(y + BOX_H);
        }
        x += w + COL_GAP;
    }
    let width = x.saturating_sub(COL_GAP) + MARGIN;
    let height = height + MARGIN + if g.truncated { 20 } else { 0 };

    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"capstan-graph\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker></defs>\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    for e in &g.edges {
        let (Some(&a), Some(&b)) = (idx.get(e.from.as_str()), idx.get(e.to.as_str())) else {
            continue;
        };
        let (ax, ay, aw) = pos[a];
        let (bx, by, bw) = pos[b];
        let (y1, y2) = (ay + BOX_H / 2, by + BOX_H / 2);
        let name = escape(&clip(&e.name, 30));
        if layer[b] == layer[a] + 1 {
            // To the next column: straight, the label just before the target
            // (where the fanned-out lines are apart).
            let (x1, x2) = (ax + aw, bx);
            let lx = x2.saturating_sub(8);
            let ly =
                y1 as i64 + (y2 as i64 - y1 as i64) * (lx - x1) as i64 / (x2 - x1).max(1) as i64;
            let _ = writeln!(
                s,
                "<g class=\"edge\"><line x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" stroke=\"#555\" marker-end=\"url(#arrow)\"/><text x=\"{lx}\" y=\"{}\" text-anchor=\"end\" fill=\"#333\" font-size=\"10\">{name}</text></g>",
                (ly - 4).max(0),
            );
        } else if layer[b] == layer[a] {
            // Within a column: an arc out to the right of it.
            let (x1, x2) = (ax + aw, bx + bw);
            let bulge = x1.max(x2) + 30 + y1.abs_diff(y2) / 4;
            let _ = writeln!(
                s,
                "<g class=\"edge\"><path d=\"M {x1} {y1} Q {bulge} {} {x2} {y2}\" fill=\"none\" stroke=\"#888\" stroke-dasharray=\"4 3\" marker-end=\"url(#arrow)\"/><text x=\"{}\" y=\"{}\" fill=\"#555\" font-size=\"10\">{name}</text></g>",
                (y1 + y2) / 2,
                (x1.max(x2) + bulge) / 2 + 2,
                (y1 + y2) / 2 + 4,
            );
        } else {
            // Back or long edges: a curve over the top.
            let (x1, x2) = (ax + aw / 2, bx + bw / 2);
            let (y1, y2) = (ay, by);
            let cy = y1.min(y2).saturating_sub(30);
            let _ = writeln!(
                s,
                "<g class=\"edge\"><path d=\"M {x1} {y1} Q {} {cy} {x2} {y2}\" fill=\"none\" stroke=\"#888\" stroke-dasharray=\"4 3\" marker-end=\"url(#arrow)\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\" font-size=\"10\">{name}</text></g>",
                (x1 + x2) / 2,
                (x1 + x2) / 2,
                (y1.min(y2) + cy) / 2 + 4,
            );
        }
    }
    for (i, n) in g.nodes.iter().enumerate() {
        let (x, y, w) = pos[i];
        let stroke = if n.locators > 0 { "#b91c1c" } else { "#374151" };
        let sw = if n.id == g.root { 2.5 } else { 1.0 };
        let _ = writeln!(
            s,
            "<g class=\"node\" data-id=\"{}\" data-type=\"{}\"><title>{} ({}, {}{})</title><rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{BOX_H}\" rx=\"6\" fill=\"{}\" stroke=\"{stroke}\" stroke-width=\"{sw}\"/><text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text><text x=\"{}\" y=\"{}\" fill=\"#444\" font-size=\"10\">{}</text></g>",
            escape(&n.id),
            escape(&n.kind),
            escape(&n.label),
            escape(&n.kind),
            escape(&n.detail),
            if n.holder { ", holder" } else { "" },
            color(&n.kind),
            x + 10,
            y + 16,
            escape(&label(n)),
            x + 10,
            y + 31,
            escape(&sub(n)),
        );
    }
    if g.truncated {
        let _ = writeln!(
            s,
            "<text x=\"{MARGIN}\" y=\"{}\" fill=\"#b91c1c\">(truncated: more than {MAX_HOLDERS} holders or {MAX_EDGES} names)</text>",
            height - 10
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `capstan graph`: asks the node for the graph and prints it.
pub async fn run(
    client: &crate::client::Client,
    path: Option<String>,
    format: Option<Format>,
    json: bool,
) -> anyhow::Result<()> {
    let format = format.unwrap_or(if json { Format::Json } else { Format::Dot });
    let path = path.unwrap_or_default();
    let text = client
        .call(|a| {
            let path = path.clone();
            async move {
                let mut r = a.cluster_request();
                r.get().set_command(GRAPH_COMMAND);
                r.get().set_arg(path.as_str());
                let answer = r.send().promise.await?;
                Ok(answer.get()?.get_json()?.to_string()?)
            }
        })
        .await?;
    let g: Graph =
        serde_json::from_str(&text).map_err(|e| anyhow!("the node sent bad JSON: {e}"))?;
    match format {
        Format::Json => crate::output::print_json(&serde_json::to_value(&g)?),
        Format::Dot => print!("{}", dot(&g)),
        Format::Svg => print!("{}", svg(&g)),
    }
    Ok(())
}

/// The command of the control socket's JSON `cluster` call that answers
/// the graph (it needs no cluster; the call is the socket's JSON channel).
pub const GRAPH_COMMAND: &str = "graph";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Graph {
        let n = |id: &str, label: &str, kind: &str, locators| Node {
            id: id.into(),
            label: label.into(),
            kind: kind.into(),
            detail: String::new(),
            holder: kind == "host" || kind == "guest",
            locators,
        };
        Graph {
            root: "a".into(),
            nodes: vec![
                n("a", "SELF", "host", 0),
                n("b", "bot<script>", "guest", 0),
                n("c", "greeting", "value", 2),
            ],
            edges: vec![
                Edge {
                    from: "a".into(),
                    to: "b".into(),
                    name: "bot<script>".into(),
                },
                Edge {
                    from: "a".into(),
                    to: "c".into(),
                    name: "greeting".into(),
                },
                Edge {
                    from: "b".into(),
                    to: "c".into(),
                    name: "g\"x".into(),
                },
            ],
            locators_out: 2,
            truncated: false,
        }
    }

    #[test]
    fn dot_and_svg_draw_every_node_and_edge_escaped() {
        let g = sample();
        let d = dot(&g);
        assert!(d.contains("\"a\" -> \"b\" [label=\"bot<script>\"]"), "{d}");
        assert!(d.contains("label=\"g\\\"x\""), "{d}");
        assert!(d.contains("2 locators out"), "{d}");
        let s = svg(&g);
        assert!(!s.contains("<script>"), "{s}");
        assert!(s.contains("bot&lt;script&gt;"), "{s}");
        assert_eq!(s.matches("class=\"node\"").count(), 3);
        assert_eq!(s.matches("class=\"edge\"").count(), 3);
        assert!(s.starts_with("<svg"));
    }
}
