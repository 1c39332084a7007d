//! The tool world's host side: the store data of a tool instance (it runs
//! for a host, with only the capabilities granted at install time), its
//! imports, and running a tool's `execute`.

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::FormulaId;
use wasmtime::Store;

use super::limits::{Deadline, Limiter, arm, guest_log, stop_reason};
use crate::agent::AgentHandle;
use crate::error::Error;
use crate::guest::bindings::tool::capstan::tool::host as tool_host;
use crate::guest::bindings::tool::exports::capstan::tool::tool as tool_exports;
use crate::guest::{CallLimits, GuestHost, Manifest, World};
use crate::model;
use crate::records::FormulaKind;

/// Deepest chain of tool-invoke.
const MAX_TOOL_DEPTH: u32 = 4;

/// The store data of a tool-world instance: the tool runs for a host, with
/// only the capabilities granted at install time.
pub(crate) struct ToolState {
    host: AgentHandle,
    grants: BTreeMap<String, FormulaId>,
    depth: u32,
    logs: u32,
    limiter: Limiter,
    gh: Arc<GuestHost>,
    panic: Option<String>,
    deadline: Arc<Deadline>,
}

impl ToolState {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.gh.tokio.block_on(f)
    }
}

impl tool_host::Host for ToolState {
    fn log(&mut self, level: tool_host::LogLevel, message: String) -> wasmtime::Result<()> {
        guest_log(
            &mut self.logs,
            &mut self.panic,
            "tool",
            level as u8,
            &message,
        );
        Ok(())
    }

    fn now_millis(&mut self) -> wasmtime::Result<u64> {
        if !self.grants.contains_key("clock") {
            return Ok(0);
        }
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0))
    }

    fn workspace_read(&mut self, path: String) -> wasmtime::Result<Option<String>> {
        let Some(dir) = self.grants.get("workspace").copied() else {
            return Ok(None);
        };
        if !crate::names::is_pet_name(&path) {
            return Ok(None);
        }
        let r = self.block(self.host.inner().db.read(move |tx| {
            let path = path.clone();
            Box::pin(async move {
                let Some(id) = model::lookup(tx, &dir, &path).await? else {
                    return Ok(None);
                };
                let v = match model::must_formula(tx, &id).await?.kind {
                    FormulaKind::Value(v) => v,
                    _ => return Ok(None),
                };
                let b = model::value_bytes(tx, &id, &v).await?;
                Ok::<_, Error>(String::from_utf8(b).ok())
            })
        }));
        Ok(r.unwrap_or(None))
    }

    fn http_request(
        &mut self,
        method: String,
        url: String,
        headers_json: String,
        body: Option<Vec<u8>>,
        timeout_ms: Option<u32>,
    ) -> wasmtime::Result<Result<tool_host::HttpResponse, String>> {
        let grant = self.grants.get(crate::guest::http::HTTP_SLOT).copied();
        let deadline = self.deadline.clone();
        let r = deadline.excluding(|| {
            self.block(crate::guest::http::guest_request(
                &self.host,
                grant,
                method,
                url,
                headers_json,
                body,
                timeout_ms,
            ))
        });
        Ok(r.map(|r| tool_host::HttpResponse {
            status: r.status,
            headers_json: r.headers_json,
            body: r.body,
        }))
    }

    fn tool_invoke(
        &mut self,
        alias: String,
        params_json: String,
    ) -> wasmtime::Result<Result<String, String>> {
        let Some(id) = self.grants.get(&alias).copied() else {
            return Ok(Err(format!(
                "tool-invoke: no tool was granted to this tool under the alias {alias:?}"
            )));
        };
        if self.depth >= MAX_TOOL_DEPTH {
            return Ok(Err(format!(
                "tool-invoke: tools may call each other at most {MAX_TOOL_DEPTH} deep"
            )));
        }
        let host = self.host.clone();
        let depth = self.depth + 1;
        let prepared = self.block(async move {
            let m = host
                .inner()
                .db
                .read(move |tx| {
                    Box::pin(async move {
                        Ok::<_, Error>(tx.get(&crate::guest::keys::manifest(&id)).await?)
                    })
                })
                .await?
                .ok_or_else(|| Error::Invalid(format!("{alias:?} is not an installed tool")))?;
            let m: Manifest =
                serde_json::from_slice(&m).map_err(|e| Error::Corrupt(format!("manifest: {e}")))?;
            prepare_tool(host, m).await
        });
        // already on a blocking thread: run the nested tool right here
        Ok(prepared
            .and_then(|p| execute_tool(p, params_json, depth))
            .map_err(|e| e.to_string()))
    }

    fn secret_exists(&mut self, name: String) -> wasmtime::Result<bool> {
        Ok(self.grants.contains_key(&format!("secret-{name}")))
    }
}

/// A tool ready to run: compiled, with its grants resolved.
pub(crate) struct PreparedTool {
    host: AgentHandle,
    c: Arc<crate::guest::Compiled>,
    grants: BTreeMap<String, FormulaId>,
    gh: Arc<GuestHost>,
}

pub(crate) async fn prepare_tool(host: AgentHandle, m: Manifest) -> Result<PreparedTool, Error> {
    let (gh, c) = crate::guest::compiled_of(host.inner(), &m, World::Tool, "that").await?;
    let grants = m
        .grants
        .iter()
        .map(|(s, h)| {
            h.parse::<FormulaId>()
                .map(|id| (s.clone(), id))
                .map_err(|e| Error::Corrupt(format!("grant {s}: {e}")))
        })
        .collect::<Result<BTreeMap<_, _>, Error>>()?;
    Ok(PreparedTool {
        host,
        c,
        grants,
        gh,
    })
}

/// Runs a prepared tool's `execute` (blocking).
pub(crate) fn execute_tool(p: PreparedTool, input: String, depth: u32) -> Result<String, Error> {
    let PreparedTool {
        host,
        c,
        grants,
        gh,
    } = p;
    let Some(pre) = c.tool.as_ref() else {
        return Err(Error::Invalid("not a tool component".into()));
    };
    let limits = CallLimits::node(&gh);
    let state = ToolState {
        host,
        grants,
        depth,
        logs: 0,
        limiter: Limiter::new(&gh),
        gh: gh.clone(),
        panic: None,
        deadline: Deadline::new(),
    };
    let deadline = state.deadline.clone();
    let mut store = Store::new(&gh.engine, state);
    store.limiter(|s| &mut s.limiter);
    let req = tool_exports::Request {
        params: input,
        context: None,
    };
    let r = arm(&mut store, limits, &deadline).and_then(|_| {
        let inst = pre.instantiate(&mut store)?;
        inst.capstan_tool_tool().call_execute(&mut store, &req)
    });
    match r {
        Err(e) => Err(Error::Invalid(format!(
            "the tool was stopped: {}",
            stop_reason(&e, limits, store.data().panic.as_deref())
        ))),
        Ok(resp) => match (resp.output, resp.error) {
            (_, Some(err)) => Err(Error::Invalid(format!("the tool failed: {err}"))),
            (Some(out), None) => Ok(out),
            (None, None) => Ok(String::new()),
        },
    }
}

/// Runs an installed tool's `execute` once, for `host`.
pub(crate) async fn run_tool(
    host: AgentHandle,
    m: Manifest,
    input: String,
) -> Result<String, Error> {
    let p = prepare_tool(host, m).await?;
    tokio::task::spawn_blocking(move || execute_tool(p, input, 0))
        .await
        .map_err(|e| Error::Unavailable(format!("tool task failed: {e}")))?
}
