//! The client side of a daemon's life: `start` (spawn `start --foreground`
//! in the background and wait until it answers), `stop`, and waiting for its
//! exit.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::{self, ClientError, NodeInfo};
use crate::daemon::net_config;
use crate::home::{HomeLock, Paths, create_private_dir, log_tail};
use crate::net::advertise::Advertise;

/// How long `start` waits for the daemon to answer, and `stop` for it to exit.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(10);

/// `capstan start`: spawns `capstan start --foreground` detached and waits until it answers.
#[allow(clippy::too_many_arguments)] // one per `start` flag
pub async fn start(
    paths: &Paths,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<&Advertise>,
    store: Option<&str>,
    metrics: Option<std::net::SocketAddr>,
    metrics_public: bool,
    console: crate::console::Flags,
    gc_interval: Option<u64>,
    store_cache_bytes: Option<u64>,
    compiled_cache_bytes: Option<u64>,
    embed_model: Option<&std::path::Path>,
) -> anyhow::Result<NodeInfo> {
    match client::ping(paths).await {
        Ok(info) => bail!(
            "a capstan daemon already runs for home {} (pid {})",
            paths.home_str(),
            info.pid
        ),
        Err(ClientError::NoDaemon(_)) => {}
        Err(e) => return Err(e.into()),
    }
    // Refused here, before the home or its log is touched.
    net_config(paths, listen, advertise.cloned())?;
    crate::metrics::config(paths, metrics, metrics_public)?;
    crate::console::config(paths, console.addr, console.public)?;
    create_private_dir(&paths.home)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("cannot open the log {}", paths.log.display()))?;
    let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("start")
        .arg("--foreground")
        .arg("--home")
        .arg(&paths.home);
    if let Some(a) = listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    if let Some(a) = advertise {
        cmd.arg("--advertise").arg(a.to_string());
    }
    if let Some(s) = store {
        cmd.arg("--store").arg(s);
    }
    if let Some(a) = metrics {
        cmd.arg("--metrics").arg(a.to_string());
    }
    if metrics_public {
        cmd.arg("--metrics-public");
    }
    console.args(&mut cmd);
    if let Some(secs) = gc_interval {
        cmd.arg("--gc-interval").arg(secs.to_string());
    }
    if let Some(n) = store_cache_bytes {
        cmd.arg("--store-cache-bytes").arg(n.to_string());
    }
    if let Some(n) = compiled_cache_bytes {
        cmd.arg("--compiled-cache-bytes").arg(n.to_string());
    }
    if let Some(d) = embed_model {
        cmd.arg("--embed-model").arg(d);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot spawn the daemon")?;

    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Ok(info) = client::ping(paths).await {
            return Ok(info);
        }
        let new_log = || {
            let tail = log_tail(paths, 5);
            let since = std::fs::metadata(&paths.log).map(|m| m.len()).unwrap_or(0);
            if since > log_offset {
                tail
            } else {
                String::new()
            }
        };
        if let Ok(Some(status)) = child.try_wait() {
            // Strip the tracing prefix for a one-line message where we can.
            let tail = new_log();
            let last_line = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            let last = last_line.trim_start_matches("capstan: ").to_string();
            if last.starts_with("a capstan daemon already runs") {
                bail!("{last}");
            }
            // The daemon said why it stopped: that line alone (the log has
            // the rest).
            if last_line.starts_with("capstan: ") {
                bail!(
                    "the daemon did not start: {last} (details in {})",
                    paths.log.display()
                );
            }
            bail!(
                "the daemon exited ({status}) before answering; last lines of {}: {}",
                paths.log.display(),
                tail.replace('\n', " | ")
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the daemon (pid {}) did not answer within {} s; last lines of {}: {}",
                child.id(),
                LIFECYCLE_TIMEOUT.as_secs(),
                paths.log.display(),
                new_log().replace('\n', " | ")
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// `capstan stop`: asks the daemon to stop and waits until it has exited.
pub async fn stop(paths: &Paths) -> anyhow::Result<u32> {
    let info = client::ping(paths).await?;
    client::stop(paths).await?;
    wait_exit(paths, info.pid, LIFECYCLE_TIMEOUT).await?;
    Ok(info.pid)
}

/// Waits until the daemon holding the home lock has exited.
pub async fn wait_exit(paths: &Paths, pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !HomeLock::is_free(paths) {
        if Instant::now() >= deadline {
            bail!(
                "the daemon (pid {pid}) did not exit within {} s; see {} or kill it with `kill -9 {pid}`",
                timeout.as_secs(),
                paths.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
