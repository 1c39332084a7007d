//! Calls on a node's control socket (`proto/schema/api.capnp`) made
//! directly, with request ids the test chooses: how a test sends the same
//! mutating request twice, as the CLI does when it retries after losing
//! the daemon's answer.

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use capstan_proto::api_capnp::{agent, node};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::Node;

/// Runs `f` on the root host of `n`'s daemon; the error as text.
fn with_host<T, F, Fut>(n: &Node, f: F) -> Result<T, String>
where
    F: FnOnce(agent::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, capnp::Error>>,
{
    let socket = n.json(["where"])["socket"]
        .as_str()
        .expect("where --json gives the socket")
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| format!("connect {socket}: {e}"))?;
        let (r, w) = stream.into_split();
        let network = twoparty::VatNetwork::new(
            r.compat(),
            w.compat_write(),
            Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let node: node::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(rpc);
        let host = node.host_request().send().pipeline.get_agent();
        tokio::time::timeout(std::time::Duration::from_secs(60), f(host))
            .await
            .map_err(|_| "no answer within 60 s".to_string())?
            .map_err(|e| e.to_string())
    })
}

/// `invite NAME` with request id `req`: the invitation.
pub fn invite(n: &Node, name: &str, req: [u8; 16]) -> Result<String, String> {
    let name = name.to_string();
    with_host(n, move |h| async move {
        let mut r = h.invite_request();
        r.get().set_name(name.as_str());
        r.get().set_req_id(&req);
        let a = r.send().promise.await?;
        Ok(a.get()?.get_invitation()?.to_string()?)
    })
}

/// `accept INVITATION NAME` with request id `req`: the id (hex) it answers.
pub fn accept(n: &Node, req: [u8; 16], invitation: &str, name: &str) -> Result<String, String> {
    let (invitation, name) = (invitation.to_string(), name.to_string());
    with_host(n, move |h| async move {
        let mut r = h.accept_request();
        r.get().set_req_id(&req);
        r.get().set_invitation(invitation.as_str());
        r.get().set_name(name.as_str());
        let a = r.send().promise.await?;
        Ok(a.get()?
            .get_id()?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    })
}

/// Stores each `(path, text)` as a text value, many requests in flight at
/// once on one connection (what thousands of `capstan store` runs would do,
/// without a process per value).
pub fn store_many(n: &Node, entries: &[(String, String)]) -> Result<(), String> {
    let entries = entries.to_vec();
    with_host(n, move |host| async move {
        for chunk in entries.chunks(256) {
            let mut calls = Vec::new();
            for (path, text) in chunk {
                let mut r = host.store_request();
                let mut p = r.get();
                p.set_req_id(&rand_req());
                p.set_path(path.as_str());
                p.set_kind(capstan_proto::api_capnp::ValueKind::Text);
                p.set_data(text.as_bytes());
                calls.push(r.send().promise);
            }
            for c in calls {
                c.await?;
            }
        }
        Ok(())
    })
}

fn rand_req() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let h = blake3::hash(
        &[
            t.to_le_bytes(),
            n.to_le_bytes(),
            u64::from(std::process::id()).to_le_bytes(),
        ]
        .concat(),
    );
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

/// `send` as a raw socket call: the package exactly as given (chunks and
/// `(path, edge name)` references), which the CLI's text syntax could not
/// produce when malformed; the number, or the error as text.
pub fn send_raw(
    n: &Node,
    to: &str,
    strings: &[&str],
    refs: &[(&str, &str)],
) -> Result<u64, String> {
    let to = to.to_string();
    let strings: Vec<String> = strings.iter().map(|s| s.to_string()).collect();
    let refs: Vec<(String, String)> = refs
        .iter()
        .map(|(p, e)| (p.to_string(), e.to_string()))
        .collect();
    with_host(n, move |h| async move {
        let mut r = h.send_request();
        let mut p = r.get();
        p.set_req_id(&rand_req());
        p.set_to(to.as_str());
        let mut s = p.reborrow().init_strings(strings.len() as u32);
        for (i, t) in strings.iter().enumerate() {
            s.set(i as u32, t.as_str());
        }
        let mut l = p.init_refs(refs.len() as u32);
        for (i, (path, edge)) in refs.iter().enumerate() {
            let mut x = l.reborrow().get(i as u32);
            x.set_path(path.as_str());
            x.set_edge_name(edge.as_str());
        }
        Ok(r.send().promise.await?.get()?.get_number())
    })
}
