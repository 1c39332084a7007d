//! A bare host → guest call (the empty `on-poll` export of
//! guests/out/probe-channel.wasm) under the node's engine settings: back to
//! back, armed as the node arms each call (fuel and deadline), and on a
//! thread that never called wasm before.
//!
//!     scripts/build-guests && cargo bench -p capstan-actors --bench callpath
//!
//! `capstan bench` shows the same call inside a running node, where it
//! comes every 100 ms with cold caches.
use std::time::Instant;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

fn run(label: &str, fuel: bool, epoch: bool, pooling: bool, path: &str) -> wasmtime::Result<()> {
    let mut c = Config::new();
    c.consume_fuel(fuel);
    c.epoch_interruption(epoch);
    c.wasm_component_model(true);
    if pooling {
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(
            wasmtime::PoolingAllocationConfig::default(),
        ));
    }
    let engine = Engine::new(&c)?;
    let component = Component::from_file(&engine, path)?;
    let mut linker: Linker<()> = Linker::new(&engine);
    linker.define_unknown_imports_as_traps(&component)?;
    let mut store = Store::new(&engine, ());
    if fuel {
        store.set_fuel(u64::MAX / 2)?;
    }
    if epoch {
        store.set_epoch_deadline(1 << 40);
    }
    let inst = linker.instantiate(&mut store, &component)?;
    let iface = component
        .get_export_index(None, "capstan:channel/channel@0.2.0")
        .ok_or_else(|| wasmtime::format_err!("no channel interface"))?;
    let idx = component
        .get_export_index(Some(&iface), "on-poll")
        .ok_or_else(|| wasmtime::format_err!("no on-poll"))?;
    let f = inst.get_typed_func::<(), ()>(&mut store, idx)?;
    for _ in 0..1000 {
        f.call(&mut store, ())?;
    }
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        f.call(&mut store, ())?;
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:<40} {per:>8.0} ns per call");
    // as the node does it: fuel and deadline set before each call
    let t = Instant::now();
    for _ in 0..n {
        if fuel {
            store.set_fuel(1_000_000)?;
        }
        if epoch {
            store.set_epoch_deadline(100);
            store.epoch_deadline_trap();
        }
        f.call(&mut store, ())?;
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{:<40} {per:>8.0} ns per call", format!("{label}, armed"));
    // each call on a thread that never called wasm before
    let mut total = std::time::Duration::ZERO;
    let m = 200;
    for _ in 0..m {
        let (took, s) = std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut store = store;
                let t = Instant::now();
                f.call(&mut store, ()).unwrap();
                (t.elapsed(), store)
            })
            .join()
            .unwrap()
        });
        store = s;
        total += took;
    }
    println!(
        "{:<40} {:>8.0} ns per call",
        format!("{label}, fresh thread"),
        total.as_nanos() as f64 / m as f64
    );
    Ok(())
}

fn main() -> wasmtime::Result<()> {
    let path = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".wasm"))
        .unwrap_or_else(|| {
            format!(
                "{}/../guests/out/probe-channel.wasm",
                env!("CARGO_MANIFEST_DIR")
            )
        });
    if !std::path::Path::new(&path).exists() {
        println!("callpath: no {path}; build the guests first (scripts/build-guests)");
        return Ok(());
    }
    run("plain", false, false, false, &path)?;
    run("fuel", true, false, false, &path)?;
    run("epoch", false, true, false, &path)?;
    run("fuel + epoch", true, true, false, &path)?;
    run("fuel + epoch + pooling", true, true, true, &path)?;
    Ok(())
}
