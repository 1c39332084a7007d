//! Issue 14's layering rules (see [`capstan_tests::layout`]) applied to
//! `actors/src` and `nodes/src`: no import circle between modules, no `.rs`
//! file over [`capstan_tests::layout::MAX_LINES`] lines, and a `# Layout`
//! section in `lib.rs`'s crate doc naming every module.
//!
//! The allow-lists name today's known violations; a listed entry that no
//! longer violates fails the test too, so the lists only shrink.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use capstan_tests::layout;

/// `actors/src` modules still allowed to sit on an import circle.
const ACTORS_ALLOWED_IN_CYCLE: &[&str] = &[];

/// Files (relative to `actors/src`) still allowed over `MAX_LINES`.
const ACTORS_ALLOWED_LONG: &[&str] = &[];

/// `nodes/src` modules still allowed to sit on an import circle.
const NODES_ALLOWED_IN_CYCLE: &[&str] = &[];

/// Files (relative to `nodes/src`) still allowed over `MAX_LINES`.
const NODES_ALLOWED_LONG: &[&str] = &[];

/// `<workspace>/<krate>/src`.
fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(krate)
        .join("src")
}

fn assert_none(problems: Vec<String>) {
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn actors_no_import_circle() {
    assert_none(layout::cycle_problems(
        &src("actors"),
        ACTORS_ALLOWED_IN_CYCLE,
    ));
}

#[test]
fn actors_no_long_module() {
    assert_none(layout::long_file_problems(
        &src("actors"),
        ACTORS_ALLOWED_LONG,
    ));
}

#[test]
fn actors_crate_doc_names_every_module() {
    assert_none(layout::layout_doc_problems(&src("actors")));
}

#[test]
fn nodes_no_import_circle() {
    assert_none(layout::cycle_problems(
        &src("nodes"),
        NODES_ALLOWED_IN_CYCLE,
    ));
}

#[test]
fn nodes_no_long_module() {
    assert_none(layout::long_file_problems(
        &src("nodes"),
        NODES_ALLOWED_LONG,
    ));
}

#[test]
fn nodes_crate_doc_names_every_module() {
    assert_none(layout::layout_doc_problems(&src("nodes")));
}

#[test]
fn the_checker_sees_edges() {
    // A guard against a checker that silently finds nothing.
    for (krate, modules, edges) in [("actors", 20, 40), ("nodes", 20, 30)] {
        let g = layout::graph(&src(krate));
        assert!(g.len() > modules, "{krate}: modules found: {}", g.len());
        let n = g.values().map(BTreeSet::len).sum::<usize>();
        assert!(n > edges, "{krate}: edges found: {n}");
    }
}

#[test]
fn bench_no_import_circle_no_long_module_and_a_layout_doc() {
    // The benchmark's crate (issue 14: out of the production binary) keeps
    // the same rules.
    assert_none(layout::cycle_problems(&src("bench"), &[]));
    assert_none(layout::long_file_problems(&src("bench"), &[]));
    assert_none(layout::layout_doc_problems(&src("bench")));
}

/// `cargo run --release -- demo`, the README's first command, needs exactly
/// one binary among the workspace's default members (cargo refuses to
/// guess between several); the simulator and the benchmark are built with
/// `-p`.
#[test]
fn the_readme_first_command_finds_one_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let defaults: BTreeSet<&str> = meta["workspace_default_members"]
        .as_array()
        .expect("cargo metadata lists the default members")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let mut bins = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        if !defaults.contains(p["id"].as_str().unwrap()) {
            continue;
        }
        for t in p["targets"].as_array().unwrap() {
            if t["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                bins.push(t["name"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(bins, ["capstan"], "binaries among the default members");
}
