//! [`NodeServer`]'s methods: the bootstrap capability of the control socket.

use std::rc::Rc;
use std::time::Instant;

use capnp::Error as CapError;
use capstan_proto::api_capnp::{agent, node};

use super::{AgentServer, NodeServer, actor_error, failed, list_len};

impl node::Server for NodeServer {
    async fn ping(
        self: Rc<Self>,
        _: node::PingParams,
        mut results: node::PingResults,
    ) -> Result<(), CapError> {
        let mut info = results.get().init_info();
        info.set_version(env!("CARGO_PKG_VERSION"));
        info.set_pid(std::process::id());
        info.set_home(self.paths.home.to_string_lossy().as_ref());
        info.set_store(self.runtime.db().describe().as_str());
        info.set_root_host(self.runtime.root_host().id().as_bytes());
        info.set_started_ms(self.started_ms);
        info.set_incarnations(u32::try_from(self.runtime.incarnations()).unwrap_or(u32::MAX));
        info.set_uptime_ms(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        info.set_connections(u32::try_from(self.net.connections()).unwrap_or(u32::MAX));
        info.set_rss_bytes(crate::metrics::rss_bytes().unwrap_or(0));
        let store = self.runtime.db().describe();
        if store.starts_with("redb") {
            info.set_store_cache_bytes(capstan_cluster::redb_store::cache_bytes());
        }
        Ok(())
    }

    async fn host(
        self: Rc<Self>,
        _: node::HostParams,
        mut results: node::HostResults,
    ) -> Result<(), CapError> {
        let client: agent::Client =
            capnp_rpc::new_client(AgentServer::new(self.runtime.root_host(), self.net.clone()));
        results.get().set_agent(client);
        Ok(())
    }

    async fn usage(
        self: Rc<Self>,
        params: node::UsageParams,
        mut results: node::UsageResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let start = p
            .get_start()
            .map_err(|e| failed(format!("bad parameter start: {}", e.extra)))?
            .to_vec();
        let page = self
            .runtime
            .usage_page(&start, p.get_max_keys() as usize)
            .await
            .map_err(actor_error)?;
        let mut r = results.get();
        match &page.next {
            Some(next) => r.set_next(next),
            None => r.set_done(true),
        }
        let mut list = r.init_kinds(list_len(page.kinds.len()));
        for (i, (kind, u)) in capstan_actors::usage::KINDS
            .iter()
            .zip(page.kinds.iter())
            .enumerate()
        {
            let mut k = list.reborrow().get(i as u32);
            k.set_kind(*kind);
            k.set_keys(u.keys);
            k.set_bytes(u.bytes);
        }
        Ok(())
    }

    async fn backup(
        self: Rc<Self>,
        params: node::BackupParams,
        mut results: node::BackupResults,
    ) -> Result<(), CapError> {
        let path = params
            .get()?
            .get_path()?
            .to_str()
            .map_err(|_| failed("the backup path is not UTF-8"))?
            .to_string();
        let path = std::path::PathBuf::from(path);
        if !path.is_absolute() {
            return Err(failed(format!(
                "the backup path {} must be absolute (the node may run in another directory)",
                path.display()
            )));
        }
        tracing::info!(path = %path.display(), "backup started");
        let started = Instant::now();
        let mut last_log = Instant::now();
        let summary = capstan_cluster::backup::write(self.runtime.db(), &path, |s| {
            if last_log.elapsed() >= std::time::Duration::from_secs(5) {
                last_log = Instant::now();
                tracing::info!(pairs = s.pairs, bytes = s.bytes, "backup in progress");
            }
        })
        .await
        .map_err(|e| failed(format!("backup failed: {e}")))?;
        tracing::info!(
            path = %path.display(),
            pairs = summary.pairs,
            bytes = summary.bytes,
            version = summary.version,
            ms = started.elapsed().as_millis() as u64,
            "backup written"
        );
        let mut r = results.get();
        r.set_pairs(summary.pairs);
        r.set_bytes(summary.bytes);
        r.set_version(summary.version);
        Ok(())
    }

    async fn gc(
        self: Rc<Self>,
        params: node::GcParams,
        mut results: node::GcResults,
    ) -> Result<(), CapError> {
        let keep = params.get()?.get_keep_answers_ms();
        tracing::info!(keep_answers_ms = keep, "gc pass started");
        let last_log = std::sync::Mutex::new(Instant::now());
        let progress: capstan_actors::gc::Progress =
            std::sync::Arc::new(move |phase, done, total| {
                let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= std::time::Duration::from_secs(5) {
                    *last = Instant::now();
                    tracing::info!(?phase, done, total, "gc in progress");
                }
            });
        let opts = capstan_actors::gc::GcOptions {
            keep_answers_ms: keep,
        };
        let rep = self
            .runtime
            .gc(&opts, progress)
            .await
            .map_err(actor_error)?;
        let mut r = results.get().init_report();
        r.set_scanned(rep.scanned);
        r.set_reachable(rep.reachable);
        r.set_candidates(rep.candidates);
        r.set_formulas(rep.formulas);
        r.set_values(rep.values);
        r.set_kept(rep.kept);
        r.set_answers(rep.answers);
        r.set_keys(rep.keys);
        r.set_bytes(rep.bytes);
        r.set_interrupted(rep.interrupted);
        r.set_elapsed_ms(rep.elapsed_ms);
        Ok(())
    }

    async fn stop(
        self: Rc<Self>,
        _: node::StopParams,
        _: node::StopResults,
    ) -> Result<(), CapError> {
        tracing::info!("stop requested over the control socket");
        // Answer first, then stop: give the answer a moment to be written.
        let stop = self.stop.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stop.notify_one();
        });
        Ok(())
    }
}
