//! Regenerates `proto/src/generated/*.rs` from `proto/schema/*.capnp`.
//! Run through `scripts/gen-proto`; needs the `capnp` tool (Debian: capnproto).

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema = root.join("schema");
    let out = root.join("src").join("generated");
    std::fs::create_dir_all(&out).expect("create output dir");
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(&schema).output_path(&out);
    let mut files: Vec<_> = std::fs::read_dir(&schema)
        .expect("read schema dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "capnp"))
        .collect();
    files.sort();
    for f in &files {
        cmd.file(f);
    }
    cmd.run()
        .expect("capnp compile (is the capnp tool installed?)");
    println!(
        "generated {} schema files into {}",
        files.len(),
        out.display()
    );
}
