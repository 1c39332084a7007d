//! The control socket's Cap'n Proto objects: [`NodeServer`] (the bootstrap
//! capability) and [`AgentServer`] (one [`AgentHandle`]).
//!
//! Each method reads and validates its parameters (bad input gets a `failed`
//! error with a one-line message and changes nothing), awaits the handle and
//! maps [`capstan_actors::Error`] to `failed` with the error's message.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use capnp::Error as CapError;
use capstan_actors::{
    AgentHandle, EntryInfo, MessageBodyView, MessageView, PromiseState, RefSpec, Runtime, ValueKind,
};
use capstan_proto::RequestId;
use capstan_proto::api_capnp::{agent, message_sink, node};
use tokio::sync::Notify;

use crate::home::Paths;
use crate::net::Net;
use capstan_actors::Target;
use capstan_proto::locator::encode32;

fn failed(msg: impl Into<String>) -> CapError {
    CapError::failed(msg.into())
}

/// An object-model error as it crosses the socket: its kind and message
/// (see [`capstan_actors::error::to_wire`]).
fn actor_error(e: capstan_actors::Error) -> CapError {
    e.to_wire()
}

/// Reads a text parameter, naming it in the error.
fn text(r: capnp::Result<capnp::text::Reader<'_>>, what: &str) -> Result<String, CapError> {
    let r = r.map_err(|e| failed(format!("bad parameter {what}: {}", e.extra)))?;
    r.to_string()
        .map_err(|_| failed(format!("parameter {what} is not valid UTF-8")))
}

fn request_id(r: capnp::Result<capnp::data::Reader<'_>>) -> Result<RequestId, CapError> {
    let r = r.map_err(|e| failed(format!("bad parameter reqId: {}", e.extra)))?;
    RequestId::from_slice(r).map_err(|e| failed(format!("bad parameter reqId: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The bootstrap capability of the control socket.
pub struct NodeServer {
    runtime: Runtime,
    paths: Paths,
    started: Instant,
    started_ms: u64,
    stop: Arc<Notify>,
    net: Rc<Net>,
}

impl NodeServer {
    pub fn new(runtime: Runtime, paths: Paths, stop: Arc<Notify>, net: Rc<Net>) -> Self {
        NodeServer {
            runtime,
            paths,
            started: Instant::now(),
            started_ms: now_ms(),
            stop,
            net,
        }
    }
}

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

/// One agent, as a capability.
pub struct AgentServer {
    handle: AgentHandle,
    net: Rc<Net>,
}

impl AgentServer {
    pub fn new(handle: AgentHandle, net: Rc<Net>) -> Self {
        AgentServer { handle, net }
    }

    /// The remote formula `path` names, if it names one.
    async fn remote(&self, path: &str) -> Result<Option<capstan_actors::RemoteRec>, CapError> {
        match self.handle.target(path).await.map_err(actor_error)? {
            Target::Remote { remote, .. } => Ok(Some(remote)),
            Target::Local { .. } => Ok(None),
        }
    }
}

fn set_entry(mut b: capstan_proto::api_capnp::entry_info::Builder<'_>, e: &EntryInfo) {
    b.set_name(e.name.as_str());
    b.set_id(e.id.as_bytes());
    b.set_type(e.kind.as_str());
    b.set_detail(e.detail.as_str());
}

fn kind_to_capnp(k: ValueKind) -> capstan_proto::api_capnp::ValueKind {
    use capstan_proto::api_capnp::ValueKind as K;
    match k {
        ValueKind::Text => K::Text,
        ValueKind::Json => K::Json,
        ValueKind::Bytes => K::Bytes,
    }
}

fn kind_from_capnp(k: capstan_proto::api_capnp::ValueKind) -> ValueKind {
    use capstan_proto::api_capnp::ValueKind as K;
    match k {
        K::Text => ValueKind::Text,
        K::Json => ValueKind::Json,
        K::Bytes => ValueKind::Bytes,
    }
}

/// The state text of a promise: `pending`, `resolved`, `rejected: REASON`.
pub fn state_text(s: &PromiseState) -> String {
    match s {
        PromiseState::Pending => "pending".to_string(),
        PromiseState::Resolved(_) => "resolved".to_string(),
        PromiseState::Rejected(why) => format!("rejected: {why}"),
    }
}

/// Writes a [`MessageView`] into its Cap'n Proto form.
pub fn set_message(mut b: capstan_proto::api_capnp::message_view::Builder<'_>, m: &MessageView) {
    b.set_number(m.number);
    b.set_message_id(&m.message_id.0);
    if let Some(r) = &m.reply_to {
        b.set_reply_to(&r.0);
    }
    b.set_from(m.from.as_str());
    b.set_to(m.to.as_str());
    b.set_date_ms(m.date_ms);
    match &m.body {
        MessageBodyView::Package { strings, names } => {
            b.set_type("package");
            let mut s = b.reborrow().init_strings(list_len(strings.len()));
            for (i, t) in strings.iter().enumerate() {
                s.set(i as u32, t.as_str());
            }
            let mut n = b.reborrow().init_names(list_len(names.len()));
            for (i, t) in names.iter().enumerate() {
                n.set(i as u32, t.as_str());
            }
        }
        MessageBodyView::Request { description, state } => {
            b.set_type("request");
            b.set_description(description.as_str());
            b.set_state(state_text(state).as_str());
        }
    }
}

fn list_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl agent::Server for AgentServer {
    async fn list(
        self: Rc<Self>,
        params: agent::ListParams,
        mut results: agent::ListResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        let entries = self.handle.list(&path).await.map_err(actor_error)?;
        let mut list = results.get().init_entries(list_len(entries.len()));
        for (i, e) in entries.iter().enumerate() {
            set_entry(list.reborrow().get(i as u32), e);
        }
        Ok(())
    }

    async fn show(
        self: Rc<Self>,
        params: agent::ShowParams,
        mut results: agent::ShowResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        let mut e = self.handle.show(&path).await.map_err(actor_error)?;
        if e.kind == "special" {
            // MAIL, NONE: no formula behind them.
        } else if let Some(remote) = self.remote(&path).await? {
            let (kind, detail) = self.net.show(&remote).await.map_err(failed)?;
            e.detail = format!(
                "{kind} ({detail}) on cluster {}…",
                &encode32(&remote.cluster)[..12]
            );
        }
        set_entry(results.get().init_entry(), &e);
        Ok(())
    }

    async fn cat(
        self: Rc<Self>,
        params: agent::CatParams,
        mut results: agent::CatResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        let (kind, data) = match self.remote(&path).await? {
            Some(remote) => self.net.cat(&remote).await.map_err(failed)?,
            None => self.handle.cat(&path).await.map_err(actor_error)?,
        };
        let mut r = results.get();
        r.set_kind(kind_to_capnp(kind));
        r.set_data(&data);
        Ok(())
    }

    async fn store(
        self: Rc<Self>,
        params: agent::StoreParams,
        mut results: agent::StoreResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let kind = p
            .get_kind()
            .map(kind_from_capnp)
            .map_err(|_| failed("bad parameter kind: unknown value kind"))?;
        let data = p
            .get_data()
            .map_err(|e| failed(format!("bad parameter data: {}", e.extra)))?
            .to_vec();
        if kind == ValueKind::Text && std::str::from_utf8(&data).is_err() {
            return Err(failed("a text value must be valid UTF-8"));
        }
        if kind == ValueKind::Json
            && serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err()
        {
            return Err(failed("a json value must be valid JSON"));
        }
        let id = self
            .handle
            .store(req, &path, kind, data)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn remove(
        self: Rc<Self>,
        params: agent::RemoveParams,
        _: agent::RemoveResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        self.handle.remove(req, &path).await.map_err(actor_error)
    }

    async fn move_(
        self: Rc<Self>,
        params: agent::MoveParams,
        _: agent::MoveResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let from = text(p.get_from(), "from")?;
        let to = text(p.get_to(), "to")?;
        self.handle
            .move_name(req, &from, &to)
            .await
            .map_err(actor_error)
    }

    async fn copy(
        self: Rc<Self>,
        params: agent::CopyParams,
        _: agent::CopyResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let from = text(p.get_from(), "from")?;
        let to = text(p.get_to(), "to")?;
        self.handle
            .copy_name(req, &from, &to)
            .await
            .map_err(actor_error)
    }

    async fn mkdir(
        self: Rc<Self>,
        params: agent::MkdirParams,
        mut results: agent::MkdirResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let id = self.handle.mkdir(req, &path).await.map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn mkhost(
        self: Rc<Self>,
        params: agent::MkhostParams,
        mut results: agent::MkhostResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let id = self.handle.mkhost(req, &path).await.map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn mkguest(
        self: Rc<Self>,
        params: agent::MkguestParams,
        mut results: agent::MkguestResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let id = self.handle.mkguest(req, &path).await.map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn agent(
        self: Rc<Self>,
        params: agent::AgentParams,
        mut results: agent::AgentResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        let handle = self.handle.agent(&path).await.map_err(actor_error)?;
        let client: agent::Client =
            capnp_rpc::new_client(AgentServer::new(handle, self.net.clone()));
        results.get().set_agent(client);
        Ok(())
    }

    async fn send(
        self: Rc<Self>,
        params: agent::SendParams,
        mut results: agent::SendResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let to = text(p.get_to(), "to")?;
        let strings_r = p
            .get_strings()
            .map_err(|e| failed(format!("bad parameter strings: {}", e.extra)))?;
        let mut strings = Vec::with_capacity(strings_r.len() as usize);
        for s in strings_r.iter() {
            strings.push(text(s, "strings")?);
        }
        let refs_r = p
            .get_refs()
            .map_err(|e| failed(format!("bad parameter refs: {}", e.extra)))?;
        let mut refs = Vec::with_capacity(refs_r.len() as usize);
        for r in refs_r.iter() {
            refs.push(RefSpec {
                path: text(r.get_path(), "refs.path")?,
                edge_name: text(r.get_edge_name(), "refs.edgeName")?,
            });
        }
        if strings.len() != refs.len() + 1 {
            return Err(failed(format!(
                "a message needs one more text chunk than references: got {} chunks and {} references",
                strings.len(),
                refs.len()
            )));
        }
        let reply_to = p.get_is_reply().then(|| p.get_reply_to());
        if reply_to.is_none() && to.is_empty() {
            return Err(failed("send needs a recipient"));
        }
        let number = self
            .handle
            .send(req, &to, strings, refs, reply_to)
            .await
            .map_err(actor_error)?;
        results.get().set_number(number);
        Ok(())
    }

    async fn request(
        self: Rc<Self>,
        params: agent::RequestParams,
        mut results: agent::RequestResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let to = text(p.get_to(), "to")?;
        let description = text(p.get_description(), "description")?;
        let result_name = text(p.get_result_name(), "resultName")?;
        let result_name = (!result_name.is_empty()).then_some(result_name.as_str());
        let (number, promise) = self
            .handle
            .request(req, &to, &description, result_name)
            .await
            .map_err(actor_error)?;
        let mut r = results.get();
        r.set_number(number);
        r.set_promise(promise.as_bytes());
        Ok(())
    }

    async fn wait_request(
        self: Rc<Self>,
        params: agent::WaitRequestParams,
        mut results: agent::WaitRequestResults,
    ) -> Result<(), CapError> {
        let number = params.get()?.get_number();
        let state = self
            .handle
            .wait_request(number)
            .await
            .map_err(actor_error)?;
        let mut r = results.get();
        r.set_state(state_text(&state).as_str());
        if let PromiseState::Resolved(id) = state {
            r.set_id(id.as_bytes());
        }
        Ok(())
    }

    async fn resolve(
        self: Rc<Self>,
        params: agent::ResolveParams,
        _: agent::ResolveResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        self.handle
            .resolve(req, p.get_number(), &path)
            .await
            .map_err(actor_error)
    }

    async fn reject(
        self: Rc<Self>,
        params: agent::RejectParams,
        _: agent::RejectResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let reason = text(p.get_reason(), "reason")?;
        self.handle
            .reject(req, p.get_number(), &reason)
            .await
            .map_err(actor_error)
    }

    async fn adopt(
        self: Rc<Self>,
        params: agent::AdoptParams,
        mut results: agent::AdoptResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let edge = text(p.get_edge_name(), "edgeName")?;
        let path = text(p.get_path(), "path")?;
        let path = if path.is_empty() { edge.clone() } else { path };
        let id = self
            .handle
            .adopt(req, p.get_number(), &edge, &path)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn dismiss(
        self: Rc<Self>,
        params: agent::DismissParams,
        _: agent::DismissResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        self.handle
            .dismiss(req, p.get_number())
            .await
            .map_err(actor_error)
    }

    async fn inbox(
        self: Rc<Self>,
        params: agent::InboxParams,
        mut results: agent::InboxResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let from = p.get_from();
        let limit = match p.get_limit() {
            0 => capstan_actors::api::DEFAULT_INBOX_PAGE,
            n => n as usize,
        };
        let thread = p
            .get_thread()
            .map_err(|e| failed(format!("bad parameter thread: {}", e.extra)))?;
        let thread = if thread.is_empty() {
            None
        } else {
            Some(
                RequestId::from_slice(thread)
                    .map_err(|e| failed(format!("bad parameter thread: {e}")))?,
            )
        };
        let (messages, more) = self
            .handle
            .inbox_page(thread, from, limit)
            .await
            .map_err(actor_error)?;
        let mut r = results.get();
        r.set_more(more);
        let mut list = r.init_messages(list_len(messages.len()));
        for (i, m) in messages.iter().enumerate() {
            set_message(list.reborrow().get(i as u32), m);
        }
        Ok(())
    }

    async fn follow(
        self: Rc<Self>,
        params: agent::FollowParams,
        _: agent::FollowResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let after = p.get_after();
        let sink: message_sink::Client = p
            .get_sink()
            .map_err(|e| failed(format!("bad parameter sink: {}", e.extra)))?;
        let mut rx = self.handle.follow(after).await.map_err(actor_error)?;
        // One push at a time: the client's pace is the flow control. When a
        // push fails the client is gone; when the channel closes the node is
        // stopping or the follower was too slow and was dropped.
        while let Some(m) = rx.recv().await {
            let mut req = sink.push_request();
            set_message(req.get().init_message(), &m);
            if let Err(e) = req.send().promise.await {
                tracing::debug!("follower gone: {e}");
                return Ok(());
            }
        }
        // `disconnected`: the client reconnects and follows on from where it was.
        Err(CapError::disconnected(
            "the inbox stream ended (the node is stopping, or this follower fell too far behind)"
                .to_string(),
        ))
    }

    async fn locate(
        self: Rc<Self>,
        params: agent::LocateParams,
        mut results: agent::LocateResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        // Check first, so that a node that cannot be reached issues nothing.
        self.net.locator([0; 32]).map_err(failed)?;
        let (_, swiss) = self.handle.locate(&path).await.map_err(actor_error)?;
        let locator = self.net.fresh_locator(swiss).await.map_err(failed)?;
        results.get().set_locator(locator.to_string().as_str());
        Ok(())
    }

    async fn adopt_locator(
        self: Rc<Self>,
        params: agent::AdoptLocatorParams,
        mut results: agent::AdoptLocatorResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let locator: capstan_proto::Locator = text(p.get_locator(), "locator")?
            .parse()
            .map_err(|e: capstan_proto::LocatorError| failed(e.to_string()))?;
        if locator.cluster == self.net.cluster_id() {
            return Err(failed(
                "this locator is of this node's own cluster; use the name it was located from",
            ));
        }
        let remote = capstan_actors::RemoteRec {
            cluster: locator.cluster,
            swiss: locator.swiss,
            addrs: locator.addrs,
        };
        // Checked with its cluster before it is named: a forged or revoked
        // locator (or one whose address is another cluster's) is refused
        // now, not at its first use; an unreachable cluster names nothing.
        match self.net.check(&remote).await {
            Ok(_) => {}
            Err(crate::net::NetError::Refused(why)) => {
                return Err(failed(format!("{why}; nothing was named")));
            }
            Err(crate::net::NetError::Transient(why)) => {
                return Err(failed(format!(
                    "{why}; nothing was named (a locator is checked with its cluster before it is named: try again once that node answers)"
                )));
            }
        }
        let id = self
            .handle
            .adopt_locator(req, &path, remote)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn cancel(
        self: Rc<Self>,
        params: agent::CancelParams,
        mut results: agent::CancelResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let r = self.handle.cancel(req, &path).await.map_err(actor_error)?;
        let cancelled: Vec<serde_json::Value> = r
            .cancelled
            .iter()
            .map(|(id, t, why)| {
                serde_json::json!({"id": hex::encode(id.as_bytes()), "type": t, "reason": why})
            })
            .collect();
        let mut res = results.get();
        res.set_count(r.revoked);
        res.set_cancelled(
            serde_json::json!({"cancelled": cancelled, "rejected": r.rejected})
                .to_string()
                .as_str(),
        );
        Ok(())
    }

    async fn invite(
        self: Rc<Self>,
        params: agent::InviteParams,
        mut results: agent::InviteResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let name = text(p.get_name(), "name")?;
        // (An older client sends no request id: then a retry is not recognised.)
        let req = if p.get_req_id()?.is_empty() {
            RequestId::random()
        } else {
            request_id(p.get_req_id())?
        };
        // Check first, so that a node that cannot be reached invites no one.
        self.net.locator([0; 32]).map_err(failed)?;
        let swiss = self.handle.invite(req, &name).await.map_err(actor_error)?;
        let locator = self.net.fresh_locator(swiss).await.map_err(failed)?;
        results.get().set_invitation(locator.to_string().as_str());
        Ok(())
    }

    async fn accept(
        self: Rc<Self>,
        params: agent::AcceptParams,
        mut results: agent::AcceptResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let name = text(p.get_name(), "name")?;
        let invitation: capstan_proto::Locator = text(p.get_invitation(), "invitation")?
            .parse()
            .map_err(|e: capstan_proto::LocatorError| failed(e.to_string()))?;
        if invitation.cluster == self.net.cluster_id() {
            return Err(failed(
                "this invitation is from this node's own cluster; invitations connect different nodes",
            ));
        }
        self.net.locator([0; 32]).map_err(|_| {
            failed("accepting an invitation needs a listening node, so that the inviter can reach it: restart it with `capstan start --listen HOST:PORT`")
        })?;
        // Hold the name (and record the handle we offer) before asking the
        // inviter: a crash or a failure from here on is taken up again by
        // the same `accept`.
        let step = self
            .handle
            .begin_accept(req, &name, invitation.cluster, invitation.swiss)
            .await
            .map_err(actor_error)?;
        let (placeholder, redeem_req, handle) = match step {
            capstan_actors::AcceptStep::Done(id) => {
                results.get().set_id(id.as_bytes());
                return Ok(());
            }
            capstan_actors::AcceptStep::Redeem {
                placeholder,
                req,
                handle,
            } => (placeholder, req, handle),
        };
        let inviter = match self.net.accept(&invitation, handle, redeem_req).await {
            Ok(i) => i,
            Err(crate::net::NetError::Refused(why)) => {
                if let Err(e) = self.handle.abort_accept(&name, placeholder).await {
                    tracing::warn!("cannot free the name held for a refused invitation: {e}");
                }
                return Err(failed(why));
            }
            Err(crate::net::NetError::Transient(why)) => {
                return Err(failed(format!(
                    "{why}; {name} is held for this invitation (type `accepting`): run the same `capstan accept` again to finish, or `capstan remove {name}` to give up"
                )));
            }
        };
        let id = self
            .handle
            .finish_accept(req, placeholder, inviter)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn install(
        self: Rc<Self>,
        params: agent::InstallParams,
        mut results: agent::InstallResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let name = text(p.get_name(), "name")?;
        let bytes = p
            .get_component()
            .map_err(|e| failed(format!("bad parameter component: {}", e.extra)))?
            .to_vec();
        let mut grants = Vec::new();
        for g in p.get_grants()?.iter() {
            grants.push((text(g.get_slot(), "slot")?, text(g.get_path(), "path")?));
        }
        let info = self
            .handle
            .install(req, &name, bytes, grants)
            .await
            .map_err(actor_error)?;
        let mut b = results.get().init_info();
        b.set_id(info.id.as_bytes());
        b.set_hash(info.hash.as_str());
        b.set_world(info.world.as_str());
        b.set_size(info.size);
        for (list, items) in [(0, &info.imports), (1, &info.exports), (2, &info.grants)] {
            let mut l = match list {
                0 => b.reborrow().init_imports(list_len(items.len())),
                1 => b.reborrow().init_exports(list_len(items.len())),
                _ => b.reborrow().init_grants(list_len(items.len())),
            };
            for (i, s) in items.iter().enumerate() {
                l.set(i as u32, s.as_str());
            }
        }
        Ok(())
    }

    async fn mkguest_component(
        self: Rc<Self>,
        params: agent::MkguestComponentParams,
        mut results: agent::MkguestComponentResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let component = text(p.get_component(), "component")?;
        let fuel = Some(p.get_fuel()).filter(|f| *f != 0);
        let deadline = Some(p.get_deadline_ms()).filter(|d| *d != 0);
        let mut with = Vec::new();
        for g in p.get_with()?.iter() {
            with.push((text(g.get_slot(), "slot")?, text(g.get_path(), "path")?));
        }
        let id = self
            .handle
            .mkguest_component(req, &path, &component, fuel, deadline, &with)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn mkhttp(
        self: Rc<Self>,
        params: agent::MkhttpParams,
        mut results: agent::MkhttpResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let name = text(p.get_name(), "name")?;
        let s = p.get_spec()?;
        let texts =
            |l: capnp::text_list::Reader<'_>, what: &str| -> Result<Vec<String>, CapError> {
                l.iter().map(|t| text(t, what)).collect()
            };
        let mut headers = Vec::new();
        for h in s.get_headers()?.iter() {
            headers.push((
                text(h.get_name(), "header name")?,
                text(h.get_file(), "header file")?,
            ));
        }
        let spec = capstan_actors::guest::http::HttpSpec {
            allow: texts(s.get_allow()?, "allow")?,
            methods: texts(s.get_methods()?, "methods")?,
            headers,
            timeout_ms: s.get_timeout_ms(),
            max_bytes: s.get_max_bytes(),
            insecure_http: s.get_insecure_http(),
        };
        let id = self
            .handle
            .mkhttp(req, &name, spec)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    async fn run_tool(
        self: Rc<Self>,
        params: agent::RunToolParams,
        mut results: agent::RunToolResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let name = text(p.get_name(), "name")?;
        let input = text(p.get_input(), "input")?;
        let out = self
            .handle
            .run_tool(&name, &input)
            .await
            .map_err(actor_error)?;
        results.get().set_output(out.as_str());
        Ok(())
    }

    async fn cluster(
        self: Rc<Self>,
        params: agent::ClusterParams,
        mut results: agent::ClusterResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let command = text(p.get_command(), "command")?;
        let arg = text(p.get_arg(), "arg")?;
        if command == crate::graph::GRAPH_COMMAND {
            let g = crate::graph::gather(self.net.runtime(), &self.handle, &arg)
                .await
                .map_err(|e| failed(format!("{e:#}")))?;
            let v = serde_json::to_string(&g).map_err(|e| failed(e.to_string()))?;
            results.get().set_json(v.as_str());
            return Ok(());
        }
        let observed = self.net.observed_members();
        let v =
            crate::cluster::command(self.net.runtime(), &self.handle, &command, &arg, &observed)
                .await
                .map_err(|e| failed(format!("{e:#}")))?;
        results.get().set_json(v.to_string().as_str());
        Ok(())
    }

    async fn llm(
        self: Rc<Self>,
        params: agent::LlmParams,
        mut results: agent::LlmResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let command = text(p.get_command(), "command")?;
        let args = text(p.get_args(), "args")?;
        let secret = p
            .get_secret()
            .map_err(|e| failed(format!("bad parameter secret: {}", e.extra)))?;
        let v = crate::llm::command(&self.handle, req, &command, &args, secret)
            .await
            .map_err(failed)?;
        results.get().set_json(v.to_string().as_str());
        Ok(())
    }

    async fn routine(
        self: Rc<Self>,
        params: agent::RoutineParams,
        mut results: agent::RoutineResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let command = text(p.get_command(), "command")?;
        let args = text(p.get_args(), "args")?;
        let v = crate::routines::command(&self.handle, req, &command, &args)
            .await
            .map_err(failed)?;
        results.get().set_json(v.to_string().as_str());
        Ok(())
    }

    async fn quota(
        self: Rc<Self>,
        params: agent::QuotaParams,
        mut results: agent::QuotaResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let set = p.get_set().then(|| {
            let q = capstan_actors::quota::Quota {
                max_messages: p.get_max_messages(),
                max_bytes: p.get_max_bytes(),
            };
            (q.max_messages != 0 || q.max_bytes != 0).then_some(q)
        });
        let v = self
            .handle
            .quota(req, &path, set)
            .await
            .map_err(actor_error)?;
        let j = serde_json::json!({
            "agent": hex::encode(v.agent.as_bytes()),
            "messages": v.messages,
            "bytes": v.bytes,
            "max_messages": v.limits.max_messages,
            "max_bytes": v.limits.max_bytes,
            "default": v.default,
        });
        results.get().set_json(j.to_string().as_str());
        Ok(())
    }

    async fn search(
        self: Rc<Self>,
        params: agent::SearchParams,
        mut results: agent::SearchResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let command = text(p.get_command(), "command")?;
        let args = text(p.get_args(), "args")?;
        let v = crate::search::command(&self.handle, req, &command, &args)
            .await
            .map_err(failed)?;
        results.get().set_json(v.to_string().as_str());
        Ok(())
    }

    async fn evaluate(
        self: Rc<Self>,
        params: agent::EvaluateParams,
        mut results: agent::EvaluateResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let evaluator = text(p.get_evaluator(), "evaluator")?;
        let source = text(p.get_source(), "source")?;
        let mut bindings = Vec::new();
        for g in p.get_bindings()?.iter() {
            bindings.push((text(g.get_slot(), "slot")?, text(g.get_path(), "path")?));
        }
        let result_name = if p.has_result_name() {
            text(p.get_result_name(), "resultName")?
        } else {
            String::new()
        };
        let o = if p.get_endow() {
            self.handle
                .endow(req, &evaluator, p.get_number(), &bindings)
                .await
        } else if !result_name.is_empty() {
            self.handle
                .evaluate_as(req, &evaluator, &source, &bindings, &result_name)
                .await
        } else {
            self.handle
                .evaluate(req, &evaluator, &source, &bindings, Default::default())
                .await
        }
        .map_err(actor_error)?;
        let mut v = serde_json::json!({
            "fuel": o.fuel,
            "invokes": o.invokes,
            "instantiate_ns": o.instantiate_ns,
            "run_ns": o.run_ns,
        });
        match o.result {
            Ok(r) => v["result"] = r.into(),
            Err(e) => v["error"] = e.into(),
        }
        if let Some(n) = o.reply {
            v["reply"] = n.into();
        }
        if let Some(id) = o.stored {
            v["id"] = id.to_string().into();
        }
        results.get().set_json(v.to_string().as_str());
        Ok(())
    }

    async fn guests(
        self: Rc<Self>,
        _: agent::GuestsParams,
        mut results: agent::GuestsResults,
    ) -> Result<(), CapError> {
        let gs = self.handle.guests().await.map_err(actor_error)?;
        let mut l = results.get().init_guests(list_len(gs.len()));
        for (i, g) in gs.iter().enumerate() {
            let mut b = l.reborrow().get(i as u32);
            b.set_name(g.name.as_str());
            b.set_id(g.id.as_bytes());
            b.set_component(g.component.as_str());
            b.set_state(g.state.as_str());
            b.set_handled(g.handled);
            b.set_failures(g.failures);
            b.set_fuel_last(g.fuel_last);
            b.set_memory_peak(g.memory_peak);
            b.set_instantiate_ns_last(g.instantiate_ns_last);
            b.set_call_ns_last(g.call_ns_last);
            b.set_last_error(g.last_error.as_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        assert_eq!(state_text(&PromiseState::Pending), "pending");
        assert_eq!(
            state_text(&PromiseState::Rejected("no".into())),
            "rejected: no"
        );
    }
}
