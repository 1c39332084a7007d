//! `capstan backup` and `capstan restore`: a whole store to a checked file
//! and back (the format and its guarantees: `capstan_cluster::backup`).
//!
//! A backup is taken by the running node when there is one (it holds the
//! embedded store's file lock, and its snapshot is consistent while it
//! serves), else by opening the store here. A restore never runs beside a
//! node: it needs the node stopped, and writes only into an empty store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use capstan_cluster::StoreError;
use capstan_cluster::backup::Summary;
use serde_json::json;

use crate::client::{self, ClientError};
use crate::home::{Paths, store_spec};
use crate::output::{bytes_human, print_json};

/// Progress is shown once an operation has run this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// Progress on stderr: `what` with the pairs and bytes so far, once the
/// operation has taken more than [`PROGRESS_AFTER`].
struct Progress {
    what: &'static str,
    started: Instant,
    shown: bool,
}

impl Progress {
    fn new(what: &'static str) -> Self {
        Progress {
            what,
            started: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, s: &Summary) {
        if self.started.elapsed() < PROGRESS_AFTER {
            return;
        }
        self.shown = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} {} pairs, {} ({:.0} s)…",
            self.what,
            s.pairs,
            bytes_human(s.bytes as usize),
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }

    fn done(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

fn absolute(file: &Path) -> anyhow::Result<PathBuf> {
    if file.is_absolute() {
        return Ok(file.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(file))
}

fn report(verb: &str, file: &Path, s: &Summary, store: &str, json: bool) {
    if json {
        print_json(&json!({
            "file": file.display().to_string(),
            "store": store,
            "pairs": s.pairs,
            "bytes": s.bytes,
            "version": s.version,
        }));
    } else {
        println!(
            "{verb} {} pairs ({}) {} {} (store version {})",
            s.pairs,
            bytes_human(s.bytes as usize),
            if verb == "backed up" { "from" } else { "into" },
            store,
            s.version
        );
        println!("file: {}", file.display());
    }
}

/// Opens the store for this command, saying what to do when it cannot.
async fn open(paths: &Paths, spec: &str) -> anyhow::Result<capstan_cluster::Db> {
    capstan_cluster::open(spec).await.map_err(|e| match e {
        StoreError::Locked { .. } => anyhow!(
            "the store {spec} is in use by a capstan daemon of home {}; stop it first (`capstan stop`)",
            paths.home_str()
        ),
        e => anyhow!("cannot open the store: {e}"),
    })
}

pub async fn backup(
    paths: &Paths,
    file: &Path,
    store: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let file = absolute(file)?;
    if file.is_dir() {
        bail!("{} is a directory; name the backup file", file.display());
    }
    match client::ping(paths).await {
        Ok(info) => {
            if store.is_some() {
                bail!(
                    "--store is for a home whose node is stopped; the node of {} is running and backs up its own store ({})",
                    paths.home_str(),
                    info.store
                );
            }
            let (pairs, bytes, version) = crate::output::with_progress(
                "the node is writing the backup",
                client::backup(paths, &file),
            )
            .await?;
            let s = Summary {
                pairs,
                bytes,
                version,
            };
            report("backed up", &file, &s, &info.store, json);
            Ok(())
        }
        Err(ClientError::NoDaemon(_)) => {
            let spec = store_spec(paths, store)?;
            let db = open(paths, &spec).await?;
            let mut progress = Progress::new("written");
            let s = capstan_cluster::backup::write(&db, &file, |s| progress.update(s)).await;
            progress.done();
            let s = s.map_err(|e| anyhow!("backup failed: {e}"))?;
            report("backed up", &file, &s, &db.describe(), json);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn restore(
    paths: &Paths,
    file: &Path,
    store: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let file = absolute(file)?;
    match client::ping(paths).await {
        Ok(info) => bail!(
            "the capstan daemon of {} (pid {}) is running; stop it first (`capstan stop`): a backup is restored only into a stopped node's empty store",
            paths.home_str(),
            info.pid
        ),
        Err(ClientError::NoDaemon(_)) => {}
        Err(e) => return Err(e.into()),
    }
    // Check the file before opening (or creating) the store, so a bad
    // backup leaves no new empty store behind either.
    capstan_cluster::backup::verify(&file).map_err(|e| anyhow!("{e}"))?;
    let spec = store_spec(paths, store)?;
    std::fs::create_dir_all(&paths.home)
        .with_context(|| format!("cannot create the home {}", paths.home_str()))?;
    let db = open(paths, &spec).await?;
    let mut progress = Progress::new("restored");
    let s = capstan_cluster::backup::restore(&db, &file, |s| progress.update(s)).await;
    progress.done();
    let s = s.map_err(|e| anyhow!("restore failed: {e}"))?;
    report("restored", &file, &s, &db.describe(), json);
    if !json {
        println!("start the node with `capstan start`");
    }
    Ok(())
}
