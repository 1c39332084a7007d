//! The command line's entry: parse the arguments, set up logging and the
//! runtime, dispatch to the command, and turn errors into `capstan:
//! <message>` and an exit status (`nodes/CLI.md`).
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::client::{Client, ClientError};
use crate::home::Paths;
use crate::output::{duration_human, print_json};
use crate::{
    backup, cli, client, cluster, commands, console, daemon, demo, du, home, lifecycle, metrics,
    net,
};

/// The whole command line: parse, run, and turn a failure into one line
/// `capstan: <message>` (and a JSON error with `--json`) and an exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let code = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    1
                } else {
                    0
                };
                let _ = e.print();
                return ExitCode::from(code);
            }
            let message = usage_message(&e.to_string());
            if std::env::args().any(|a| a == "--json") {
                print_error_json("invalid", &message, 1);
            }
            eprintln!("capstan: {message}");
            return ExitCode::from(1);
        }
    };
    let json = cli.json || cli.command.json();
    // Everything Capstan creates in a home (store, log, keys, pid files,
    // backups) is for this user alone: files 0600, directories 0700.
    private_umask();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let client = e.downcast_ref::<ClientError>();
            let code = client.map(ClientError::exit_code).unwrap_or(1);
            let message = one_line(&format!("{e:#}"));
            if json {
                let kind = client.map(ClientError::kind_name).unwrap_or("failed");
                print_error_json(kind, &message, code);
            }
            eprintln!("capstan: {message}");
            ExitCode::from(code as u8)
        }
    }
}

/// With `--json`, a failure is also one JSON value on stdout (the
/// message is on stderr as always): `{"error":{"kind":…,"message":…,"exit":N}}`.
pub fn print_error_json(kind: &str, message: &str, exit: i32) {
    print_json(&json!({"error": {"kind": kind, "message": message, "exit": exit}}));
}

/// Sets the file-creation mask to 0o077 (see `main`).
#[allow(unsafe_code)]
fn private_umask() {
    // SAFETY: umask(2) only sets this process's file-creation mask; it
    // cannot fail and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// A clap error on one line: its first paragraph, plus where to find help
/// (`capstan send --help` when the usage names a subcommand).
fn usage_message(rendered: &str) -> String {
    let first: Vec<&str> = rendered
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = first.join(" ");
    let first = joined.strip_prefix("error: ").unwrap_or(&joined);
    let command: Vec<&str> = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
        .map(|u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['<', '[', '-']))
                .collect()
        })
        .unwrap_or_default();
    let command = if command.is_empty() {
        "capstan".to_string()
    } else {
        command.join(" ")
    };
    let first = if first.is_empty() {
        "invalid arguments"
    } else {
        first
    };
    format!("{first}; see `{command} --help`")
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json || cli.command.json();
    if let Command::Demo { .. } = cli.command {
        return demo::run();
    }
    if let Command::Bench { args } = cli.command {
        return forward_bench(args);
    }
    let paths = Paths::resolve(cli.home)?;
    if let Command::Where { .. } = cli.command {
        print_where(&paths, json);
        return Ok(());
    }
    let is_daemon = matches!(
        cli.command,
        Command::Start {
            foreground: true,
            ..
        }
    );
    init_logging(is_daemon);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        match cli.command {
            Command::Start {
                foreground: true,
                listen,
                advertise,
                store,
                secrets_key,
                metrics,
                metrics_public,
                console,
                console_public,
                gc_interval,
                store_cache_bytes,
                compiled_cache_bytes,
                embed_model,
                ..
            } => {
                if let Some(f) = &secrets_key {
                    home::install_secrets_key(&paths, f)?;
                }
                if let Some(d) = &embed_model {
                    let m = capstan_actors::search::LocalModel::open(d)
                        .map_err(|e| anyhow::anyhow!("start --embed-model: {e}"))?;
                    let _ = daemon::EMBED_MODEL.set(std::sync::Arc::new(m));
                }
                if let Some(n) = store_cache_bytes {
                    capstan_cluster::redb_store::set_cache_bytes(n);
                }
                if let Some(n) = compiled_cache_bytes {
                    let _ = daemon::COMPILED_CACHE_BYTES.set(n);
                }
                daemon::run(
                    paths,
                    listen,
                    parse_advertise(advertise)?,
                    store,
                    metrics,
                    metrics_public,
                    console::Flags {
                        addr: console,
                        public: console_public,
                    },
                    gc_interval,
                )
                .await
            }
            Command::Start {
                listen,
                advertise,
                store,
                secrets_key,
                metrics,
                metrics_public,
                console,
                console_public,
                gc_interval,
                store_cache_bytes,
                compiled_cache_bytes,
                embed_model,
                ..
            } => {
                let advertise = parse_advertise(advertise)?;
                if let Some(d) = &embed_model {
                    // Refused here, before anything starts.
                    capstan_actors::search::LocalModel::open(d)
                        .map_err(|e| anyhow::anyhow!("start --embed-model: {e}"))?;
                }
                if let Some(f) = &secrets_key {
                    home::install_secrets_key(&paths, f)?;
                }
                let info = lifecycle::start(
                    &paths,
                    listen,
                    advertise.as_ref(),
                    store.as_deref(),
                    metrics,
                    metrics_public,
                    console::Flags {
                        addr: console,
                        public: console_public,
                    },
                    gc_interval,
                    store_cache_bytes,
                    compiled_cache_bytes,
                    embed_model.as_deref(),
                )
                .await?;
                let metrics_url = metrics::serving(&paths);
                let console_url = match console::serving(&paths) {
                    Some(addr) => Some(console::mint_url(&paths, addr, None)?),
                    None => None,
                };
                if json {
                    let mut v = json!({
                        "pid": info.pid,
                        "home": paths.home_str(),
                        "socket": paths.socket.display().to_string(),
                    });
                    if let Some(u) = &metrics_url {
                        v["metrics"] = json!(u);
                    }
                    if let Some(u) = &console_url {
                        v["console"] = json!(u);
                    }
                    print_json(&v);
                } else {
                    println!(
                        "started capstan daemon (pid {}) for {}",
                        info.pid,
                        paths.home_str()
                    );
                    if let Some(addrs) = home::advertised(&paths) {
                        println!("other nodes reach it at {} (QUIC)", addrs.join(", "));
                    }
                    if let Some(u) = &metrics_url {
                        println!("metrics at {u}");
                    }
                    if let Some(u) = &console_url {
                        println!("console at {u} (the token works once)");
                    }
                }
                Ok(())
            }
            Command::Console { .. } => {
                client::ping(&paths).await?;
                let addr = console::serving(&paths).ok_or_else(|| {
                    anyhow::anyhow!(
                        "this node serves no console; restart it with `capstan start --console 127.0.0.1:PORT` (port 0: any free port)"
                    )
                })?;
                // With --as, the console opens acting as that agent.
                let url = console::mint_url(&paths, addr, cli.as_agent.as_deref())?;
                if json {
                    print_json(&json!({"url": url}));
                } else {
                    println!("{url}");
                }
                Ok(())
            }
            Command::Cluster {
                command: cli::ClusterCommand::Init {
                    store, secrets_key, ..
                },
            } => {
                let key_file = match secrets_key {
                    Some(f) => std::path::absolute(&f)
                        .map_err(|e| anyhow::anyhow!("bad path {}: {e}", f.display()))?,
                    None => capstan_actors::secrets::home_key_path(&paths.home),
                };
                let r = cluster::init(&store, &key_file).await?;
                let (id, created) = (&r.cluster_id, r.created);
                let kf = r.secrets_key.display().to_string();
                if json {
                    print_json(&json!({"store": store, "cluster_id": id, "created": created,
                        "secrets_key": kf, "secrets_key_made": r.key_made, "sealed": r.sealed}));
                } else {
                    if created {
                        println!("made cluster {id} in {store}");
                    } else if r.sealed > 0 {
                        println!("{store} holds cluster {id}; sealed its {} plaintext secret(s) with the secrets key", r.sealed);
                    } else {
                        println!("{store} already holds cluster {id}; nothing changed");
                    }
                    if r.key_made {
                        println!("the cluster's secrets key is in {kf} (mode 0600): it is not in the store.");
                    } else {
                        println!("the cluster's secrets key: {kf}");
                    }
                    println!("copy it to every node's machine and keep a copy offline: without it no node can start and");
                    println!("a backup's secrets cannot be restored.");
                    println!("start nodes with (each its own home and port):");
                    println!("  capstan start --home n1 --store {store} --listen 127.0.0.1:7501 --secrets-key {kf}");
                    println!("  capstan start --home n2 --store {store} --listen 127.0.0.1:7502 --secrets-key {kf}");
                    println!("then: capstan --node n1 cluster status");
                }
                Ok(())
            }
            Command::Stop { .. } => {
                let pid = lifecycle::stop(&paths).await?;
                if json {
                    print_json(&json!({"stopped": true}));
                } else {
                    println!(
                        "stopped capstan daemon (pid {pid}) for {}",
                        paths.home_str()
                    );
                }
                Ok(())
            }
            Command::Ping { .. } => {
                let info = client::ping(&paths).await?;
                if json {
                    print_json(&json!({
                        "pid": info.pid,
                        "version": info.version,
                        "uptime_ms": info.uptime_ms,
                    }));
                } else {
                    println!(
                        "capstan daemon {} (pid {}) for {} answers; up {}",
                        info.version,
                        info.pid,
                        paths.home_str(),
                        duration_human(info.uptime_ms)
                    );
                }
                Ok(())
            }
            Command::Du { .. } => du::du(&paths, json).await,
            Command::Gc { keep_answers, .. } => du::gc(&paths, keep_answers, json).await,
            Command::Backup { file, store, .. } => {
                backup::backup(&paths, &file, store.as_deref(), json).await
            }
            Command::Restore { file, store, .. } => {
                backup::restore(&paths, &file, store.as_deref(), json).await
            }
            Command::Status { .. } => {
                let info = client::ping(&paths).await?;
                let metrics_url = metrics::serving(&paths);
                if json {
                    let mut v = json!({
                        "pid": info.pid,
                        "uptime_ms": info.uptime_ms,
                        "store": info.store,
                        "incarnations": info.incarnations,
                        "connections": info.connections,
                        "rss_bytes": info.rss_bytes,
                        "store_cache_bytes": info.store_cache_bytes,
                        "root_host": hex::encode(&info.root_host),
                    });
                    if let Some(u) = &metrics_url {
                        v["metrics"] = json!(u);
                    }
                    if let Some(a) = console::serving(&paths) {
                        v["console"] = json!(format!("http://{a}/"));
                    }
                    print_json(&v);
                } else {
                    println!("home          {}", paths.home_str());
                    println!("pid           {}", info.pid);
                    println!("version       {}", info.version);
                    println!("uptime        {}", duration_human(info.uptime_ms));
                    println!("store         {}", info.store);
                    println!("incarnations  {}", info.incarnations);
                    println!("connections   {}", info.connections);
                    println!("memory        {} resident", bytes_human(info.rss_bytes));
                    if info.store_cache_bytes > 0 {
                        println!(
                            "store cache   {} budget (start --store-cache-bytes)",
                            bytes_human(info.store_cache_bytes)
                        );
                    }
                    if let Some(addr) = listening_on(&paths) {
                        println!("listening on  {addr} (QUIC)");
                        if let Some(addrs) = home::advertised(&paths)
                            && addrs != [addr]
                        {
                            println!("advertised    {}", addrs.join(", "));
                        }
                    }
                    if let Some(u) = &metrics_url {
                        println!("metrics       {u}");
                    }
                    if let Some(a) = console::serving(&paths) {
                        println!("console       http://{a}/ (`capstan console` prints a URL to open)");
                    }
                    println!("root host     {}", hex::encode(&info.root_host));
                }
                Ok(())
            }
            command => {
                let client = Client::new(paths, cli.as_agent);
                commands::run(&client, command, json).await
            }
        }
    })
}

/// `12.3 MiB`.
fn bytes_human(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / MIB)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

/// The value of `start --advertise`, checked before anything is done.
fn parse_advertise(text: Option<String>) -> anyhow::Result<Option<net::advertise::Advertise>> {
    text.map(|t| net::advertise::Advertise::parse(&t).map_err(|e| anyhow::anyhow!("{e}")))
        .transpose()
}

/// The address the node listens on for other nodes: what its last start
/// with `--listen` bound (`<home>/listen`), if any.
fn listening_on(paths: &Paths) -> Option<String> {
    let addr = std::fs::read_to_string(paths.home.join("listen")).ok()?;
    let addr = addr.trim();
    (!addr.is_empty()).then(|| addr.to_string())
}

fn print_where(paths: &Paths, json: bool) {
    let shown = |p: &std::path::Path| p.display().to_string();
    if json {
        print_json(&json!({
            "home": shown(&paths.home),
            "socket": shown(&paths.socket),
            "store": shown(&paths.store),
            "log": shown(&paths.log),
            "pid_file": shown(&paths.pid_file),
        }));
    } else {
        println!("home      {}", shown(&paths.home));
        println!("socket    {}", shown(&paths.socket));
        println!("store     {}", shown(&paths.store));
        println!("log       {}", shown(&paths.log));
        println!("pid file  {}", shown(&paths.pid_file));
    }
}

/// Logs go to stderr: the daemon logs at `info` (`start` sends them to
/// `capstan.log`), commands only warnings. `CAPSTAN_LOG` overrides (env-filter syntax).
pub fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSTAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// `capstan bench ARGS`: runs `capstan-bench ARGS` (the benchmark lives in
/// its own crate, `bench/`, so that its process manager and model server do
/// not ship in this binary), found beside this executable or on `PATH`,
/// with `--capstan` naming this executable: the daemons it measures are
/// this very binary. Exits with the benchmark's status.
fn forward_bench(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
    let beside = exe.with_file_name("capstan-bench");
    let bench = if beside.exists() {
        beside
    } else {
        std::path::PathBuf::from("capstan-bench")
    };
    let status = std::process::Command::new(&bench)
        .arg("--capstan")
        .arg(&exe)
        .args(&args)
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run {}: {e}; build it with `cargo build --release -p capstan-bench` (it goes beside {})",
                bench.display(),
                exe.display()
            )
        })?;
    if status.success() {
        return Ok(());
    }
    // the benchmark printed its own error; keep its exit status
    std::process::exit(status.code().unwrap_or(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_one_line() {
        let e = Cli::try_parse_from(["capstan", "send"]).unwrap_err();
        let m = usage_message(&e.to_string());
        assert!(!m.contains('\n'), "{m}");
        assert_eq!(
            m,
            "the following required arguments were not provided: <TO> <TEXT>...; see `capstan send --help`"
        );
        let e = Cli::try_parse_from(["capstan", "frobnicate"]).unwrap_err();
        let m = usage_message(&e.to_string());
        assert_eq!(
            m,
            "unrecognized subcommand 'frobnicate'; see `capstan --help`"
        );
        assert_eq!(one_line("a\n\n  b\n"), "a b");
    }
}
