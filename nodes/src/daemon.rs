//! The node daemon, `capstan start --foreground` ([`run`]): lock the home,
//! open the store, serve the control socket, the network and the background
//! loops, shut down gracefully. The home's layout is [`crate::home`]'s;
//! starting and stopping a daemon from a command, [`crate::lifecycle`]'s.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side};
use capstan_actors::{Runtime, RuntimeOptions};
use capstan_cluster::StoreError;
use capstan_proto::api_capnp::node;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use crate::home::{
    HomeLock, Paths, create_private_dir, make_private, pid_in, reader_options,
    remembered_advertise, remembered_listen, remembered_store, uid,
};
use crate::net::advertise::Advertise;
use crate::server::NodeServer;

/// Most client connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;

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
            embed_model: EMBED_MODEL.get().cloned(),
            fill_numbers: fill_numbers(),
            idle_timeout: idle_from_env()?,
        },
    )
    .await
    .map_err(|e| anyhow!("cannot start the object model: {e}"))?;
    if let Some(m) = EMBED_MODEL.get().cloned() {
        // Read now, so that the first search does not wait for it.
        tokio::spawn(async move {
            match m.warm().await {
                Ok(took) => info!(
                    model = %m.describe(),
                    ms = took.as_millis() as u64,
                    "local embedding model read"
                ),
                Err(e) => tracing::warn!("{e}; searches without a provider are full text only"),
            }
        });
    }
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
        // Busy commits go to one member, which merges them with its own
        // (see capstan_cluster::relay).
        if let Some(m) = runtime.membership() {
            let (calls, relays) = tokio::sync::mpsc::channel(crate::net::relay::RELAY_QUEUE);
            tokio::task::spawn_local(net.clone().run_relays(relays));
            runtime.db().store().set_relay(Some(std::sync::Arc::new(
                crate::net::relay::NetRelay::new(m, calls),
            )));
            // and the relay, if it is this node, fills in the numbers of
            // the inboxes it owns for the others' sends
            runtime.db().store().set_filler(Some(std::sync::Arc::new(
                capstan_actors::InboxFiller(runtime.clone()),
            )));
        }
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

/// How long an incarnation with nothing to do stays in memory before it
/// is passivated: `CAPSTAN_IDLE_MS` (1000 to 24 h), default 60 s.
fn idle_from_env() -> anyhow::Result<Duration> {
    const MAX_MS: u64 = 24 * 3600 * 1000;
    match std::env::var("CAPSTAN_IDLE_MS") {
        Err(_) => Ok(RuntimeOptions::default().idle_timeout),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if (1000..=MAX_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => bail!(
                "CAPSTAN_IDLE_MS must be a number of milliseconds from 1000 to {MAX_MS} (24 h); got {v:?}"
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

/// Serves one client connection on the local task set.
fn serve(stream: UnixStream, node: node::Client, permit: tokio::sync::OwnedSemaphorePermit) {
    let (reader, writer) = stream.into_split();
    let network = crate::net::rpc_network(reader, writer, Side::Server, reader_options());
    let rpc = RpcSystem::new(Box::new(network), Some(node.client));
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            tracing::debug!("connection ended: {e}");
        }
        drop(permit);
    });
}

/// `start --embed-model` of this daemon (set before [`run`]).
pub static EMBED_MODEL: std::sync::OnceLock<std::sync::Arc<capstan_actors::search::LocalModel>> =
    std::sync::OnceLock::new();

/// `start --compiled-cache-bytes` of this daemon (set before [`run`]).
pub static COMPILED_CACHE_BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

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

/// Whether the relay fills in the numbers of this node's senders' own
/// copies (`RuntimeOptions::fill_numbers`): on unless `CAPSTAN_FILL_NUMBERS=0`.
fn fill_numbers() -> bool {
    std::env::var("CAPSTAN_FILL_NUMBERS").map_or(true, |v| v != "0")
}
