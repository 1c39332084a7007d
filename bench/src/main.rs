//! `capstan-bench`: the command line of the benchmark (`capstan bench ARGS`
//! runs it with `--capstan` naming itself). See the library's docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

/// The allocator of the `capstan` binary (see its `main.rs`): the bench's
/// clients share the machine's cores with the daemons they measure, so they
/// allocate as cheaply as the daemons do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure Capstan end to end on temporary homes and print a table.
///
/// Spawns daemons of the `capstan` binary, drives them over the control
/// socket and prints cold start, durable send latency and throughput,
/// request round trips, listing, restart after kill -9 and memory per guest.
#[derive(Debug, Parser)]
#[command(name = "capstan bench", bin_name = "capstan bench", version)]
struct Args {
    /// The `capstan` binary to measure (default: the one beside this executable).
    #[arg(long, value_name = "PATH", env = "CAPSTAN_BIN")]
    capstan: Option<PathBuf>,
    /// Small sizes (seconds instead of a minute), for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Where to put the temporary homes (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The built guest components for the guest section (scripts/build-guests).
    #[arg(long, value_name = "DIR", default_value = "guests/out")]
    guests: PathBuf,
    /// Measure a 3-node cluster on this replicated store instead
    /// (etcd://HOST:PORT,…; scripts/etcd-cluster start), under a fresh prefix.
    #[arg(long, value_name = "SPEC")]
    cluster: Option<String>,
    /// With --cluster: how many nodes to start (1 to 16).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
    /// How many sends the send rows make (default 2,000 per phase; 200
    /// with --quick): more gives steadier figures and time to profile.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    sends: Option<u32>,
    /// How many clients send at once in the send rows (default 64; with
    /// --cluster split evenly over the nodes): a machine with more cores
    /// needs more to keep its nodes busy (scripts/scale-out).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    senders: Option<u32>,
    /// With --cluster: trace one in 500 of the host's sends (each hop on
    /// the node that did it: reservations, commit, relay, etcd's Txn,
    /// wake-ups), print the hops' medians as a row and write every traced
    /// send's spans to FILE as a Chrome trace (open it in Perfetto).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    trace: Option<PathBuf>,
    /// Only a soak: N sends into one guest's inbox in 20 rounds, each
    /// round's messages dismissed and a gc pass run; prints the store's
    /// size and the daemon's memory after each round (both stay flat).
    #[arg(long, value_name = "N")]
    soak: Option<usize>,
    /// With --soak: keep the messages (no dismissals, no gc), to see
    /// the daemon's memory per stored message.
    #[arg(long, requires = "soak")]
    soak_keep: bool,
    /// With --soak: the daemon's `start --store-cache-bytes`.
    #[arg(long, value_name = "BYTES", requires = "soak")]
    store_cache_bytes: Option<u64>,
    /// Only the gc row: N unreachable formulas, one gc pass timed, the
    /// slowest concurrent send during it (100000 for the target).
    #[arg(long, value_name = "N")]
    gc_formulas: Option<usize>,
    /// Measure one section alone: `search` (search latency over
    /// 10,000 values; 500 with --quick); with --cluster: `store`,
    /// `sends`, `round-trips`, `guests`, `spread` (guests made and mailed
    /// through one node, under each placement policy) or `failover`.
    #[arg(long, value_name = "SECTION", value_parser = ["search", "store", "sends", "round-trips", "guests", "spread", "failover"])]
    only: Option<String>,
    /// With `--only search`: the bench node's `start --embed-model`.
    #[arg(long, value_name = "DIR")]
    embed_model: Option<PathBuf>,
    /// Machine-readable output: one JSON value on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let json = args.json;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            if json {
                capstan::app::print_error_json("failed", &message, 1);
            }
            eprintln!("capstan bench: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    capstan::app::init_logging(false);
    if let Some(p) = a.capstan {
        capstan_bench::set_capstan_exe(p);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    if a.soak.is_some() || a.gc_formulas.is_some() {
        return local.block_on(&rt, async move {
            if let Some(n) = a.gc_formulas {
                capstan_bench::gc_row(a.dir.clone(), n, a.json).await?;
            }
            if let Some(n) = a.soak {
                capstan_bench::soak(a.dir, n, a.soak_keep, a.store_cache_bytes, a.json).await?;
            }
            Ok(())
        });
    }
    let mut sizes = if a.quick {
        capstan_bench::Sizes::quick()
    } else {
        capstan_bench::Sizes::full()
    };
    if let Some(n) = a.sends {
        sizes.sends = n as usize;
    }
    if let Some(n) = a.senders {
        sizes.senders = n as usize;
    }
    sizes.trace = a.trace;
    local.block_on(
        &rt,
        capstan_bench::run(
            sizes,
            a.dir,
            a.guests,
            a.cluster,
            a.nodes.into(),
            a.only,
            a.embed_model,
            a.json,
        ),
    )
}
