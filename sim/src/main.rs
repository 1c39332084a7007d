//! `capstan-sim`: runs the simulation (see the `capstan_sim` crate docs).
//! With `--seed` one seed (replayed exactly); without, seeds from `--from`
//! on until `--seeds` ran or the `--total-steps` budget is spent; any
//! failure prints its seed and exits 1.

use std::time::Instant;

use anyhow::Result;
use capstan_sim::{Config, run};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "capstan-sim", about = "Seeded simulation of a Capstan cluster")]
struct Args {
    /// Run this seed only.
    #[arg(long)]
    seed: Option<u64>,
    /// Workload steps per seed.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Guests.
    #[arg(long, default_value_t = 3)]
    guests: usize,
    /// Without --seed: the first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Without --seed: how many seeds.
    #[arg(long, default_value_t = 500)]
    seeds: u64,
    /// Without --seed: stop once this many steps ran in all (0: no budget).
    #[arg(long, default_value_t = 0)]
    total_steps: u64,
    /// Nodes of the far cluster federated with the first (0: none); by
    /// default 2 in one seed of four (seed % 4 == 1), else none.
    #[arg(long)]
    far_nodes: Option<usize>,
    /// A test of the checker: the far side does not dedup redelivered mail.
    #[arg(long)]
    faulty_far_dedup: bool,
    /// Cancel the far "doomed" host before the workload instead of during
    /// it (every message to it then bounces).
    #[arg(long)]
    cancel_first: bool,
    /// Whether the store fills in senders' numbers (`on`, `off`); by
    /// default on in two seeds of three (seed % 3 != 0).
    #[arg(long, value_parser = ["on", "off"])]
    fill: Option<String>,
    /// The cluster's placement policy (`local`, `spread`); by default
    /// spread in even seeds.
    #[arg(long, value_parser = ["local", "spread"])]
    placement: Option<String>,
    /// Percent of commits with numbers to fill that the store refuses.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    fill_refuse_pct: u64,
    /// No faults that leave numbers unwritten (no store conflicts, lost
    /// answers, dropped member calls, kills or pauses): holes must not occur.
    #[arg(long)]
    calm: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let cfg = |seed| Config {
        steps: a.steps,
        nodes: a.nodes.max(1),
        guests: a.guests.max(1),
        far_nodes: a.far_nodes.unwrap_or(Config::new(seed).far_nodes),
        faulty_far_dedup: a.faulty_far_dedup,
        cancel_midrun: !a.cancel_first,
        fill_numbers: a
            .fill
            .as_deref()
            .map_or(Config::new(seed).fill_numbers, |f| f == "on"),
        fill_refuse_pct: a.fill_refuse_pct,
        calm: a.calm,
        spread: a
            .placement
            .as_deref()
            .map_or(Config::new(seed).spread, |p| p == "spread"),
        ..Config::new(seed)
    };
    let replay = |seed: u64| {
        let mut line = format!(
            "capstan-sim --seed {seed} --steps {} --nodes {} --guests {}",
            a.steps, a.nodes, a.guests
        );
        if let Some(f) = a.far_nodes {
            line += &format!(" --far-nodes {f}");
        }
        if a.faulty_far_dedup {
            line += " --faulty-far-dedup";
        }
        if a.cancel_first {
            line += " --cancel-first";
        }
        if let Some(f) = &a.fill {
            line += &format!(" --fill {f}");
        }
        if a.fill_refuse_pct != 10 {
            line += &format!(" --fill-refuse-pct {}", a.fill_refuse_pct);
        }
        if a.calm {
            line += " --calm";
        }
        if let Some(p) = &a.placement {
            line += &format!(" --placement {p}");
        }
        line
    };
    if let Some(seed) = a.seed {
        let r = run(&cfg(seed))?;
        println!("{r:?}");
        return Ok(());
    }
    let started = Instant::now();
    let (mut steps, mut ran) = (0u64, 0u64);
    for seed in a.from..a.from.saturating_add(a.seeds) {
        if a.total_steps > 0 && steps >= a.total_steps {
            break;
        }
        match run(&cfg(seed)) {
            Ok(r) => {
                steps += r.steps;
                ran += 1;
            }
            Err(e) => {
                println!("FAILED seed {seed} (replay: {}): {e}", replay(seed));
                println!(
                    "after {ran} passing seeds, {steps} steps, {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                std::process::exit(1);
            }
        }
        if ran.is_multiple_of(100) {
            eprintln!(
                "{ran} seeds, {steps} steps, {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ok: {ran} seeds ({} to {}), {steps} steps in {secs:.1} s ({:.1} seeds/s, {:.0} steps/s)",
        a.from,
        a.from + ran.saturating_sub(1),
        ran as f64 / secs,
        steps as f64 / secs
    );
    Ok(())
}
