//! [`AgentServer`]'s methods, one per `Agent` call of the control socket
//! (the bodies of the calls between clusters are in `federation`, those of
//! the guest calls in `guests`).

use std::rc::Rc;

use capnp::Error as CapError;
use capstan_actors::{PromiseState, RefSpec, ValueKind};
use capstan_proto::RequestId;
use capstan_proto::api_capnp::{agent, message_sink};
use capstan_proto::locator::encode32;

use super::{
    AgentServer, actor_error, failed, kind_from_capnp, kind_to_capnp, list_len, request_id,
    set_entry, set_message, state_text, text,
};

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
        // the package's shape and bounds: `capstan_actors::rules::mail`
        let reply_to = p.get_is_reply().then(|| p.get_reply_to());
        if reply_to.is_none() && to.is_empty() {
            return Err(failed("send needs a recipient"));
        }
        let traced = [p.get_trace()];
        let timer = capstan_cluster::trace::Timer::start_one(traced[0]);
        let sent = capstan_cluster::trace::scope(
            &traced,
            self.handle.send(req, &to, strings, refs, reply_to),
        )
        .await;
        timer.done("send", || match &sent {
            Ok(n) => format!("to {to:?}: number {n} in the sender's inbox"),
            Err(e) => format!("to {to:?}: {e}"),
        });
        let number = sent.map_err(actor_error)?;
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
        results: agent::LocateResults,
    ) -> Result<(), CapError> {
        self.serve_locate(params, results).await
    }

    async fn adopt_locator(
        self: Rc<Self>,
        params: agent::AdoptLocatorParams,
        results: agent::AdoptLocatorResults,
    ) -> Result<(), CapError> {
        self.serve_adopt_locator(params, results).await
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
        results: agent::InviteResults,
    ) -> Result<(), CapError> {
        self.serve_invite(params, results).await
    }

    async fn accept(
        self: Rc<Self>,
        params: agent::AcceptParams,
        results: agent::AcceptResults,
    ) -> Result<(), CapError> {
        self.serve_accept(params, results).await
    }

    async fn install(
        self: Rc<Self>,
        params: agent::InstallParams,
        results: agent::InstallResults,
    ) -> Result<(), CapError> {
        self.serve_install(params, results).await
    }

    async fn mkguest_component(
        self: Rc<Self>,
        params: agent::MkguestComponentParams,
        results: agent::MkguestComponentResults,
    ) -> Result<(), CapError> {
        self.serve_mkguest_component(params, results).await
    }

    async fn mkhttp(
        self: Rc<Self>,
        params: agent::MkhttpParams,
        results: agent::MkhttpResults,
    ) -> Result<(), CapError> {
        self.serve_mkhttp(params, results).await
    }

    async fn run_tool(
        self: Rc<Self>,
        params: agent::RunToolParams,
        results: agent::RunToolResults,
    ) -> Result<(), CapError> {
        self.serve_run_tool(params, results).await
    }

    async fn cluster(
        self: Rc<Self>,
        params: agent::ClusterParams,
        mut results: agent::ClusterResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let command = text(p.get_command(), "command")?;
        let arg = text(p.get_arg(), "arg")?;
        if command == "trace" {
            let id = capstan_cluster::trace::parse_id(&arg).map_err(failed)?;
            let v = self.net.gather_spans(id).await;
            results.get().set_json(v.to_string().as_str());
            return Ok(());
        }
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
        results: agent::EvaluateResults,
    ) -> Result<(), CapError> {
        self.serve_evaluate(params, results).await
    }

    async fn guests(
        self: Rc<Self>,
        _: agent::GuestsParams,
        results: agent::GuestsResults,
    ) -> Result<(), CapError> {
        self.serve_guests(results).await
    }
}
