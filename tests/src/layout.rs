//! Issue 14's layering rules for a crate's `src` directory, checked on the
//! source text (`tests/tests/layout.rs` applies them to `actors/src` and
//! `nodes/src`):
//!
//! - no import circle between modules. A module is a top-level module
//!   (`api`, `federation`, `guest`, ...) or a submodule of a directory module
//!   (`guest::runner`, `llm::store`, ...). An edge is any `crate::a::b` path
//!   (grouped `use crate::{a, b}` included) or `super::x` path in a file,
//!   tests included; a path naming a submodule counts for that submodule,
//!   otherwise for the top-level module. Two graphs are checked: the
//!   top-level modules (a directory module such as `guest` stands for all
//!   its files), and, inside each directory, its child modules among
//!   themselves (`guest::channel` → `guest::runner`). Edges between a
//!   `mod.rs` and its own children are not counted: the parent owns them.
//! - no `.rs` file over [`MAX_LINES`] lines.
//! - `lib.rs`'s crate doc opens with a `# Layout` section naming every module.
//!
//! Each check takes allow-lists of today's known violations; a listed entry
//! that no longer violates is a problem too, so the lists only shrink.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a `.rs` file may be.
pub const MAX_LINES: usize = 800;

/// The module graph of the crate whose sources are under `src`: module →
/// the modules it refers to (see the module docs for what counts).
pub fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    graph_of(&tree(src))
}

/// The import circles under `src` through a module not in
/// `allowed_in_cycle`, and the entries of `allowed_in_cycle` on no circle.
pub fn cycle_problems(src: &Path, allowed_in_cycle: &[&str]) -> Vec<String> {
    let g = graph(src);
    let cycles = cycles(&g);
    let mut problems = Vec::new();
    let mut in_cycle = BTreeSet::new();
    for c in &cycles {
        let edges: Vec<String> = c
            .iter()
            .flat_map(|a| {
                g[a].iter()
                    .filter(|b| c.contains(b))
                    .map(move |b| format!("{a} → {b}"))
            })
            .collect();
        let new: Vec<&String> = c
            .iter()
            .filter(|m| !allowed_in_cycle.contains(&m.as_str()))
            .collect();
        if !new.is_empty() {
            problems.push(format!(
                "import circle through {c:?} (not allowed: {new:?}); edges: {edges:?}"
            ));
        }
        in_cycle.extend(c.iter().cloned());
    }
    for m in allowed_in_cycle {
        if !in_cycle.contains(*m) {
            problems.push(format!(
                "{m} is on no circle now: take it off the allow-list"
            ));
        }
    }
    problems
}

/// The files under `src` (named relative to it, `/`-separated) over
/// [`MAX_LINES`] and not in `allowed_long`, and the entries of
/// `allowed_long` that are gone or no longer long.
pub fn long_file_problems(src: &Path, allowed_long: &[&str]) -> Vec<String> {
    let t = tree(src);
    let mut problems = Vec::new();
    let names: BTreeSet<String> = t.files.values().map(|(rel, _)| slashed(rel)).collect();
    for (rel, text) in t.files.values() {
        let name = slashed(rel);
        let n = text.lines().count();
        let allowed = allowed_long.contains(&name.as_str());
        if n > MAX_LINES && !allowed {
            problems.push(format!("{name} has {n} lines (over {MAX_LINES})"));
        }
        if n <= MAX_LINES && allowed {
            problems.push(format!(
                "{name} has {n} lines now: take it off the allow-list"
            ));
        }
    }
    for f in allowed_long {
        if !names.contains(*f) {
            problems.push(format!("{f} is gone: take it off the allow-list"));
        }
    }
    problems
}

/// The modules declared in `src/lib.rs` that its crate doc's `# Layout`
/// section does not name (as `` `module` ``), or the missing section.
pub fn layout_doc_problems(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let Some(layout) = doc.find("# Layout").map(|i| &doc[i..]) else {
        return vec!["lib.rs's crate doc has no # Layout section".to_string()];
    };
    let missing: Vec<String> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').to_string())
        })
        .filter(|m| !layout.contains(&format!("`{m}`")))
        .collect();
    if missing.is_empty() {
        Vec::new()
    } else {
        vec![format!("lib.rs's Layout section does not name {missing:?}")]
    }
}

fn slashed(rel: &Path) -> String {
    rel.to_string_lossy().replace('\\', "/")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `guest/runner.rs` → `guest::runner`; `guest/mod.rs` → `guest`;
/// `lib.rs` → `` (the crate root).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// Strips `//` comments (doc comments included) so links in docs do not count.
fn code_lines(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The module a path `first::second...` (already stripped of `crate::`)
/// names, given the set of known modules.
fn target(modules: &BTreeSet<String>, first: &str, second: &str) -> Option<String> {
    let sub = format!("{first}::{second}");
    if modules.contains(&sub) {
        Some(sub)
    } else if modules.contains(first) {
        Some(first.to_string())
    } else {
        None
    }
}

/// Module-level references of one file.
fn references(modules: &BTreeSet<String>, me: &str, code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let paths = |prefix: &str| -> Vec<(String, String)> {
        let mut v = Vec::new();
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first segment of each item
                // at depth 0 of the group.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 && c == ',' {
                        push_item(&mut v, &item);
                        item.clear();
                    } else {
                        item.push(c);
                    }
                }
                push_item(&mut v, &item);
            } else {
                let first = ident_at(rest);
                let after = &rest[first.len()..];
                let second = after.strip_prefix("::").map(ident_at).unwrap_or("");
                v.push((first.to_string(), second.to_string()));
            }
        }
        v
    };
    for (a, b) in paths("crate::") {
        if let Some(t) = target(modules, &a, &b) {
            out.insert(t);
        }
    }
    // `super::x` from `p::me` names `p::x` or `p`; from a top-level module
    // (inside an inline `mod tests`) it names the module itself.
    let parent = me.rsplit_once("::").map(|(p, _)| p);
    if let Some(p) = parent {
        for (a, _) in paths("super::") {
            if let Some(t) = target(modules, p, &a) {
                out.insert(t);
            }
        }
    }
    out.remove(me);
    out
}

fn push_item(v: &mut Vec<(String, String)>, item: &str) {
    let item = item.trim();
    let first = ident_at(item);
    if first.is_empty() || first == "self" {
        return;
    }
    let after = &item[first.len()..];
    let second = after.strip_prefix("::").map(ident_at).unwrap_or("");
    v.push((first.to_string(), second.to_string()));
}

struct Tree {
    /// module → its file's text
    files: BTreeMap<String, (PathBuf, String)>,
}

fn tree(root: &Path) -> Tree {
    let mut paths = Vec::new();
    rs_files(root, &mut paths);
    let mut files = BTreeMap::new();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let text = std::fs::read_to_string(&p).unwrap();
        files.insert(module_of(&rel), (rel, text));
    }
    Tree { files }
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap()
}

/// Two graphs in one: top-level modules (a directory module counts as all
/// its files), and, inside each directory, its child modules as siblings.
fn graph_of(t: &Tree) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = t.files.keys().filter(|m| !m.is_empty()).cloned().collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, (_, text)) in &t.files {
        if m.is_empty() {
            continue;
        }
        g.entry(top(m).to_string()).or_default();
        for r in references(&modules, m, &code_lines(text)) {
            if top(&r) != top(m) {
                g.entry(top(m).to_string())
                    .or_default()
                    .insert(top(&r).to_string());
            } else if m.contains("::") && r.contains("::") {
                g.entry(m.clone()).or_default().insert(r);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct St<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        on: BTreeSet<&'a str>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}
