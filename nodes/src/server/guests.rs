//! The guest calls, [`AgentServer`]'s side: `install`, `mkguestComponent`,
//! `mkhttp`, `runTool`, `evaluate` and `guests` (the `Agent` methods in
//! `adapter` call these).

use capnp::Error as CapError;
use capstan_proto::api_capnp::agent;

use super::{AgentServer, actor_error, failed, list_len, request_id, text};

impl AgentServer {
    pub(super) async fn serve_install(
        &self,
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

    pub(super) async fn serve_mkguest_component(
        &self,
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

    pub(super) async fn serve_mkhttp(
        &self,
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

    pub(super) async fn serve_run_tool(
        &self,
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

    pub(super) async fn serve_evaluate(
        &self,
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

    pub(super) async fn serve_guests(
        &self,
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
