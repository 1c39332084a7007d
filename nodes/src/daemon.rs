//! The node daemon: home layout, `run` (serve the control socket: `capstan
//! start --foreground`), `start` (spawn that in the background) and `stop`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use capstan_actors::{Runtime, RuntimeOptions};
use capstan_cluster::StoreError;
use capstan_proto::api_capnp::node;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, Semaphore};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tracing::{info, warn};

use crate::client::{self, ClientError, NodeInfo};
use crate::net::advertise::Advertise;
use crate::server::NodeServer;

/// Most client connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest Cap'n Proto message accepted on the control socket.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Longest socket path used inside the home; longer ones go to `/tmp`.
const MAX_SOCKET_PATH: usize = 100;
/// How long `start` waits for the daemon to answer, and `stop` for it to exit.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reader options of every control-socket connection (both ends).
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_MESSAGE_BYTES / 8));
    o
}

/// The files of a node's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub store: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    pub lock: PathBuf,
}

impl Paths {
    /// The paths of `home` (default `$CAPSTAN_HOME`, then `~/.capstan`), made absolute.
    pub fn resolve(home: Option<PathBuf>) -> anyhow::Result<Paths> {
        let home = match home {
            Some(h) if !h.as_os_str().is_empty() => h,
            _ => {
                let base = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        anyhow!("cannot find the home directory: set --home DIR or CAPSTAN_HOME")
                    })?;
                PathBuf::from(base).join(".capstan")
            }
        };
        let home = std::path::absolute(&home)
            .with_context(|| format!("bad home directory {}", home.display()))?;
        Ok(Paths::new(home, &uid()))
    }

    /// The layout of `home` (absolute).
    pub fn new(home: PathBuf, uid: &str) -> Paths {
        let mut socket = home.join("capstan.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            let hash = blake3::hash(home.as_os_str().as_encoded_bytes());
            let short = &hash.to_hex()[..16];
            socket = PathBuf::from(format!("/tmp/capstan-{uid}/{short}.sock"));
        }
        Paths {
            store: home.join("store.redb"),
            log: home.join("capstan.log"),
            pid_file: home.join("capstan.pid"),
            lock: home.join("capstan.lock"),
            socket,
            home,
        }
    }

    pub fn home_str(&self) -> String {
        self.home.display().to_string()
    }
}

/// The current user's id (the owner of `/proc/self`), for the `/tmp` socket directory.
fn uid() -> String {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "user".to_string())
}

/// Creates a directory (and parents) with mode 0700 if it does not exist.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}

/// Takes group and other permissions off the home and the files Capstan
/// keeps in it (homes made by earlier versions were created with the
/// default umask: a world-readable store and log). Only Capstan's own
/// entries are touched (a home may be a directory that holds other
/// things). Best effort: a failure is logged.
fn make_private(home: &Path) {
    fn tighten(path: &Path) {
        let Ok(m) = std::fs::symlink_metadata(path) else {
            return;
        };
        if m.file_type().is_symlink() || m.mode() & 0o077 == 0 {
            return;
        }
        let mode = std::fs::Permissions::from_mode(m.mode() & 0o700);
        if let Err(e) = std::fs::set_permissions(path, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot take group and other permissions off");
        }
    }
    tighten(home);
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("capstan.")
            || name.starts_with("store")
            || matches!(
                name.as_str(),
                "identity" | "compiled" | "listen" | "advertise" | "metrics"
            );
        if !ours {
            continue;
        }
        tighten(&e.path());
        if matches!(name.as_str(), "identity" | "compiled")
            && let Ok(inner) = std::fs::read_dir(e.path())
        {
            for f in inner.flatten() {
                tighten(&f.path());
            }
        }
    }
}

/// The daemon's exclusive lock on its home (`capstan.lock`, holding its pid).
#[derive(Debug)]
pub struct HomeLock {
    _file: File,
}

/// Why the home lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("a capstan daemon already runs for home {home} (pid {pid})")]
    Held { home: String, pid: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl HomeLock {
    /// Takes the lock and writes our pid into it.
    pub fn acquire(paths: &Paths) -> Result<HomeLock, LockError> {
        let io = |source| LockError::Io {
            path: paths.lock.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&paths.lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                writeln!(file, "{}", std::process::id()).map_err(io)?;
                Ok(HomeLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                Err(LockError::Held {
                    home: paths.home_str(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// True when no process holds the lock (the daemon has exited).
    pub fn is_free(paths: &Paths) -> bool {
        match File::open(&paths.lock) {
            Ok(f) => match f.try_lock() {
                Ok(()) => {
                    let _ = f.unlock();
                    true
                }
                Err(_) => false,
            },
            Err(_) => true,
        }
    }
}

/// The pid named in a store's `Locked` detail ("… held by pid N").
fn pid_in(detail: &str) -> String {
    detail
        .rsplit("pid ")
        .next()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// `capstan start --foreground`: serves the node in the foreground until SIGTERM, SIGINT or `Node.stop`.
/// Must run inside a [`tokio::task::LocalSet`].
#[allow(clippy::too_many_arguments)] // one per `start` flag
pub async fn run(
    paths: Paths,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<Advertise>,
    store: Option<String>,
    metrics: Option<std::net::SocketAddr>,
    metrics_public: bool,
    console: crate::console::Flags,
    gc_interval: Option<u64>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // Checked before anything is made or written.
    let (listen, advertise_given) = (listen, advertise.is_some());
    let (listen_eff, advertise) = net_config(&paths, listen, advertise)?;
    let metrics = crate::metrics::config(&paths, metrics, metrics_public)?;
    let console = crate::console::config(&paths, console.addr, console.public)?;
    create_private_dir(&paths.home)?;
    make_private(&paths.home);
    // The home lock is released by the kernel when this process exits, never
    // earlier: `capstan stop` waits for it, and a `start` that follows must
    // not find the store still open (tasks of the local set, or the tokio
    // runtime's teardown, can hold the store after this function returns).
    std::mem::forget(HomeLock::acquire(&paths)?);
    if let Some(dir) = paths.socket.parent()
        && dir != paths.home
    {
        create_private_dir(dir)?;
        // A shared directory in /tmp: it must be ours and private.
        let m = std::fs::metadata(dir)?;
        if m.uid().to_string() != uid() || m.mode() & 0o077 != 0 {
            bail!(
                "the socket directory {} is not private to this user (owner uid {}, mode {:o}); remove it or use a shorter --home",
                dir.display(),
                m.uid(),
                m.mode() & 0o777
            );
        }
    }
    if std::fs::symlink_metadata(&paths.socket).is_ok() {
        if UnixStream::connect(&paths.socket).await.is_ok() {
            bail!(
                "another process answers on the socket {}; is a daemon of another home using it?",
                paths.socket.display()
            );
        }
        std::fs::remove_file(&paths.socket).with_context(|| {
            format!("cannot remove the stale socket {}", paths.socket.display())
        })?;
    }

    let spec = match store {
        Some(s) => {
            std::fs::write(paths.home.join("store-spec"), format!("{s}\n")).with_context(|| {
                format!("cannot write {}", paths.home.join("store-spec").display())
            })?;
            Some(s)
        }
        None => remembered_store(&paths)?,
    };
    let store = spec
        .clone()
        .unwrap_or_else(|| paths.store.to_string_lossy().to_string());
    let clustered = crate::cluster::is_replicated(&store);
    let db = capstan_cluster::open(&store).await.map_err(|e| match e {
        StoreError::Locked { detail, .. } => anyhow!(
            "a capstan daemon already runs for home {} (pid {})",
            paths.home_str(),
            pid_in(&detail)
        ),
        e => anyhow!("cannot open the store: {e}"),
    })?;
    // A cluster's store must have been made by `cluster init`: check before
    // writing anything to it.
    let (identity, secrets) = if clustered {
        if listen.is_none() && remembered_listen(&paths)?.is_none() {
            bail!(
                "a node of a cluster must listen for the other nodes: add --listen HOST:PORT (e.g. 127.0.0.1:7501)"
            );
        }
        let secrets = crate::cluster::secrets_key(&db, &store, &paths.home).await?;
        (
            Some(crate::cluster::identity(&db, &store, &paths.home, &secrets).await?),
            secrets,
        )
    } else {
        (None, lone_secrets_key(&db, &paths).await?)
    };
    // Plaintext secrets of an older store are sealed now; sealed ones must
    // open with this key (else: a clear error, nothing started).
    match capstan_actors::secrets::migrate_llm_keys(&db, &secrets).await {
        Ok(0) => {}
        Ok(n) => info!(keys = n, "sealed the plaintext LLM keys of the store"),
        Err(e) => bail!("cannot use the LLM keys of the store: {e}"),
    }
    info!(key_id = %secrets.id_hex(), "secrets key");
    let runtime = Runtime::open(
        db,
        RuntimeOptions {
            secrets: Some(secrets),
            ..RuntimeOptions::default()
        },
    )
    .await
    .map_err(|e| anyhow!("cannot start the object model: {e}"))?;
    runtime
        .enable_guests(capstan_actors::guest::GuestConfig {
            cache_dir: Some(paths.home.join("compiled")),
            cache_bytes: COMPILED_CACHE_BYTES.get().copied(),
            ..Default::default()
        })
        .map_err(|e| anyhow!("cannot start the guest host: {e}"))?;
    match runtime.start_channels().await {
        Ok(0) => {}
        Ok(n) => info!(channels = n, "started the channel guests"),
        Err(e) => tracing::warn!("channel guests not started: {e}"),
    }

    let listen = listen_eff;
    let identity = match identity {
        Some(id) => id,
        None => crate::net::identity::Identity::load_or_create(&paths.home)?,
    };
    let net = crate::net::Net::bind(runtime.clone(), identity, listen, advertise.as_ref())?;
    if let Some(addr) = net.bound_addr() {
        std::fs::write(paths.home.join("listen"), format!("{addr}\n"))
            .with_context(|| format!("cannot write {}", paths.home.join("listen").display()))?;
        if let Some(a) = advertise.as_ref().filter(|_| advertise_given) {
            std::fs::write(paths.home.join("advertise"), format!("{a}\n")).with_context(|| {
                format!("cannot write {}", paths.home.join("advertise").display())
            })?;
        }
        let advertised = net.listen_addrs().join(",");
        info!(%addr, %advertised, cluster = %capstan_proto::locator::encode32(&net.cluster_id()), "listening for other nodes (QUIC)");
    }
    let links = if clustered {
        let addr = net
            .listen_addrs()
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("a cluster node needs a listen address"))?;
        let cfg = capstan_actors::cluster::ClusterConfig {
            name: crate::cluster::node_name(&paths.home)?,
            node_id: crate::cluster::node_id(&paths.home)?,
            addr,
            lease: lease_from_env()?,
        };
        let rx = runtime
            .join_cluster(cfg)
            .await
            .map_err(|e| anyhow!("cannot join the cluster: {e}"))?;
        Some(tokio::task::spawn_local(net.clone().run_links(rx)))
    } else {
        None
    };

    // Guests cut short by a crash (or with mail no node ran) go on.
    runtime.start_guest_resumer();
    // Routines: mail on a schedule, fired by this node where it owns them.
    runtime.start_routines();

    // Mail owed to other clusters, including what was queued before a crash.
    let outbox = tokio::task::spawn_local(net.clone().run_outbox(outbox_expiry_from_env()?));
    if let Some(secs) = gc_interval {
        tokio::task::spawn_local(collect_every(runtime.clone(), Duration::from_secs(secs)));
    }

    // Bound before the control socket answers: once `start` sees the daemon
    // answer, the home names the metrics address it serves.
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let metrics_task = match metrics {
        Some(cfg) => {
            let l = crate::metrics::bind(cfg).await?;
            let cfg = crate::metrics::bound(&l, cfg)?;
            crate::metrics::remember(&paths, cfg)?;
            info!(addr = %cfg.addr, "metrics at {}", crate::metrics::url(cfg.addr));
            Some(crate::metrics::spawn(
                l,
                std::rc::Rc::new(crate::metrics::Sources {
                    runtime: runtime.clone(),
                    net: net.clone(),
                    started,
                    control: permits.clone(),
                    control_max: MAX_CONNECTIONS,
                }),
            ))
        }
        None => None,
    };
    let console_task = match console {
        Some(cfg) => Some(crate::console::serve_on(cfg, runtime.clone(), &paths).await?),
        None => None,
    };

    let listener = UnixListener::bind(&paths.socket)
        .with_context(|| format!("cannot listen on {}", paths.socket.display()))?;
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", paths.socket.display()))?;
    std::fs::write(&paths.pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write {}", paths.pid_file.display()))?;
    info!(
        pid = std::process::id(),
        home = %paths.home.display(),
        socket = %paths.socket.display(),
        "capstan daemon ready"
    );

    let stop = Arc::new(Notify::new());
    let node: node::Client = capnp_rpc::new_client(NodeServer::new(
        runtime.clone(),
        paths.clone(),
        stop.clone(),
        net.clone(),
    ));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Handling SIGHUP keeps a daemon started from a terminal alive when it closes.
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => info!("SIGHUP ignored"),
            _ = stop.notified() => { info!("stopping"); break; }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => serve(stream, node.clone(), permit),
                    Err(_) => warn!("{MAX_CONNECTIONS} connections already open; refusing one"),
                },
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&paths.socket);
    if clustered {
        // Give the placements away now rather than when the lease lapses.
        if let Err(e) = runtime.end_membership(false).await {
            warn!("could not hand over this node's work: {e}");
        }
    }
    if let Some(l) = links {
        l.abort();
    }
    if let Some(m) = metrics_task {
        m.abort();
    }
    if let Some(c) = console_task {
        c.abort();
    }
    outbox.abort();
    net.close().await;
    runtime.shutdown().await;
    let _ = std::fs::remove_file(&paths.pid_file);
    info!("capstan daemon stopped");
    Ok(())
}

/// The lease of a cluster node: `CAPSTAN_LEASE_MS` (250–60000), default 2000.
fn lease_from_env() -> anyhow::Result<Duration> {
    match std::env::var("CAPSTAN_LEASE_MS") {
        Err(_) => Ok(capstan_actors::cluster::DEFAULT_LEASE),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if (250..=60_000).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => bail!(
                "CAPSTAN_LEASE_MS must be a number of milliseconds from 250 to 60000; got {v:?}"
            ),
        },
    }
}

/// How long undeliverable mail to another cluster is retried:
/// `CAPSTAN_OUTBOX_EXPIRY_MS` (1000 to 30 days), default 24 h.
fn outbox_expiry_from_env() -> anyhow::Result<Duration> {
    const MAX_MS: u64 = 30 * 24 * 3600 * 1000;
    match std::env::var("CAPSTAN_OUTBOX_EXPIRY_MS") {
        Err(_) => Ok(crate::net::OUTBOX_EXPIRY),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if (1000..=MAX_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => bail!(
                "CAPSTAN_OUTBOX_EXPIRY_MS must be a number of milliseconds from 1000 to {MAX_MS} (30 days); got {v:?}"
            ),
        },
    }
}

/// The store a command works on: `given`, else the one a previous
/// `start --store` left in the home, else the home's `store.redb`.
pub fn store_spec(paths: &Paths, given: Option<&str>) -> anyhow::Result<String> {
    Ok(match given {
        Some(s) => s.to_string(),
        None => {
            remembered_store(paths)?.unwrap_or_else(|| paths.store.to_string_lossy().to_string())
        }
    })
}

/// The store spec a previous `--store` left in the home, if any.
fn remembered_store(paths: &Paths) -> anyhow::Result<Option<String>> {
    let file = paths.home.join("store-spec");
    match std::fs::read_to_string(&file) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// Where the node listens for other nodes and what it advertises to them:
/// the values given, else those earlier starts left in the home. Refuses
/// `--advertise` without a listen address, and a wildcard listen address
/// (`0.0.0.0`, `::`) without `--advertise`: nobody could dial it.
pub fn net_config(
    paths: &Paths,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<Advertise>,
) -> anyhow::Result<(Option<std::net::SocketAddr>, Option<Advertise>)> {
    let listen = match listen {
        Some(a) => Some(a),
        None => remembered_listen(paths)?,
    };
    let advertise = match advertise {
        Some(a) => Some(a),
        None => remembered_advertise(paths)?,
    };
    match (listen, &advertise) {
        (None, Some(_)) => bail!(
            "--advertise names the address other nodes dial, so the node must listen: add --listen HOST:PORT"
        ),
        (Some(l), None) if l.ip().is_unspecified() => {
            bail!("{}", crate::net::wildcard_message(l))
        }
        _ => Ok((listen, advertise)),
    }
}

/// The addresses a previous `--advertise` left in the home, if any.
fn remembered_advertise(paths: &Paths) -> anyhow::Result<Option<Advertise>> {
    let file = paths.home.join("advertise");
    match std::fs::read_to_string(&file) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Advertise::parse(s.trim()).map(Some).map_err(|e| {
            anyhow!(
                "{} holds no valid addresses ({e}); fix it, or remove it and pass --advertise",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// The addresses other nodes dial, as the home remembers them (the listen
/// address, or what `--advertise` named with its bound port), if any.
pub fn advertised(paths: &Paths) -> Option<Vec<String>> {
    let listen = remembered_listen(paths).ok()??;
    match remembered_advertise(paths).ok()? {
        Some(a) => Some(a.addrs(listen.port())),
        None => Some(vec![listen.to_string()]),
    }
}

/// The listen address a previous `--listen` left in the home, if any.
fn remembered_listen(paths: &Paths) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let file = paths.home.join("listen");
    match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            anyhow!(
                "{} does not hold a HOST:PORT; fix it, or remove it and pass --listen",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// Serves one client connection on the local task set.
fn serve(stream: UnixStream, node: node::Client, permit: tokio::sync::OwnedSemaphorePermit) {
    let (reader, writer) = stream.into_split();
    let network = twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        Side::Server,
        reader_options(),
    );
    let rpc = RpcSystem::new(Box::new(network), Some(node.client));
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            tracing::debug!("connection ended: {e}");
        }
        drop(permit);
    });
}

/// The last `n` lines of the log, for error messages.
fn log_tail(paths: &Paths, n: usize) -> String {
    let text = std::fs::read(&paths.log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `start --compiled-cache-bytes` of this daemon (set before [`run`]).
pub static COMPILED_CACHE_BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

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

/// A lone node's secrets key: `<home>/identity/secrets.key`, made at first
/// start, unless the store already holds secrets sealed with another key (a
/// restored backup): then the node says which key it needs.
async fn lone_secrets_key(
    db: &capstan_cluster::Db,
    paths: &Paths,
) -> anyhow::Result<capstan_actors::secrets::SecretsKey> {
    use capstan_actors::secrets::{self, SecretsKey};
    let path = secrets::home_key_path(&paths.home);
    if let Some(k) = SecretsKey::load_if_present(&path).map_err(|e| anyhow!("{e}"))? {
        return Ok(k);
    }
    let sealed = db
        .read(|tx| {
            Box::pin(async move {
                let rows = tx
                    .get_prefix(&capstan_actors::keys::llm_keys(), 100_000, false)
                    .await?;
                Ok::<_, capstan_cluster::StoreError>(
                    rows.iter().find_map(|(_, v)| secrets::sealed_key_id(v)),
                )
            })
        })
        .await
        .map_err(|e| anyhow!("cannot read the store: {e}"))?;
    if let Some(id) = sealed {
        bail!(
            "this node has no secrets key ({} is missing) and its store holds secrets sealed with one (key id {id}): start it with `capstan start --secrets-key FILE`, FILE a copy of the secrets key of the home the store comes from",
            path.display()
        );
    }
    SecretsKey::load_or_create(&path).map_err(|e| anyhow!("{e}"))
}

/// `start --secrets-key FILE`: copies the key to `<home>/identity/secrets.key`
/// (mode 0600), where the node reads it from then on. The same key again
/// changes nothing; another one is refused (nothing changed).
pub fn install_secrets_key(paths: &Paths, file: &std::path::Path) -> anyhow::Result<()> {
    use capstan_actors::secrets::{self, SecretsKey};
    let key = SecretsKey::load(file).map_err(|e| anyhow!("--secrets-key: {e}"))?;
    let dest = secrets::home_key_path(&paths.home);
    match SecretsKey::load_if_present(&dest).map_err(|e| anyhow!("{e}"))? {
        Some(have) if have.id_hex() == key.id_hex() => Ok(()),
        Some(have) => bail!(
            "{} already holds another secrets key (key id {}) than {} (key id {}): a home keeps one secrets key; use a fresh --home, or move that file away if no store needs it",
            dest.display(),
            have.id_hex(),
            file.display(),
            key.id_hex()
        ),
        None => {
            create_private_dir(&paths.home)?;
            key.write_new(&dest).map_err(|e| anyhow!("{e}"))?;
            info!(file = %dest.display(), key_id = %key.id_hex(), "installed the secrets key");
            Ok(())
        }
    }
}

/// Background garbage collection (`start --gc-interval SECS`): a pass every
/// `every`, one at a time; a failed pass is logged and tried again later.
async fn collect_every(runtime: Runtime, every: Duration) {
    tracing::info!(
        every_s = every.as_secs(),
        "background garbage collection on"
    );
    loop {
        tokio::time::sleep(every).await;
        let opts = capstan_actors::gc::GcOptions::default();
        match runtime.gc(&opts, std::sync::Arc::new(|_, _, _| {})).await {
            Ok(r) => tracing::info!(
                formulas = r.formulas,
                keys = r.keys,
                bytes = r.bytes,
                ms = r.elapsed_ms,
                "background gc pass"
            ),
            Err(e) => tracing::warn!(error = %e, "background gc pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = Paths::new(PathBuf::from("/h"), "1000");
        assert_eq!(p.socket, PathBuf::from("/h/capstan.sock"));
        assert_eq!(p.store, PathBuf::from("/h/store.redb"));
        assert_eq!(p.pid_file, PathBuf::from("/h/capstan.pid"));
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let p = Paths::new(long, "1000");
        let s = p.socket.to_string_lossy().to_string();
        assert!(s.starts_with("/tmp/capstan-1000/"), "{s}");
        assert!(s.ends_with(".sock") && s.len() == "/tmp/capstan-1000/".len() + 16 + 5);
    }

    #[test]
    fn pid_from_store_lock_detail() {
        assert_eq!(pid_in("/h/store.redb.lock is held by pid 42"), "42");
        assert_eq!(pid_in("redb reports the database already open"), "unknown");
    }

    #[test]
    fn home_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path().to_path_buf(), "0");
        assert!(HomeLock::is_free(&paths));
        let lock = HomeLock::acquire(&paths).unwrap();
        // flock locks belong to open file descriptions, so a second open conflicts.
        assert!(!HomeLock::is_free(&paths));
        let e = HomeLock::acquire(&paths).unwrap_err().to_string();
        assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        drop(lock);
        assert!(HomeLock::is_free(&paths));
    }
}
