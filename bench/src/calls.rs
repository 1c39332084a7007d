//! The calls the rows make over a control socket (one RPC each, or an
//! inbox scan; the guest calls and a follower of an inbox), and how they are
//! run and timed ([`concurrently`], [`stats`], [`ms`]).

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capnp::Error as CapError;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::{agent, node};

use capstan::client;
use capstan::home::Paths;

/// Percentiles of a sample, in microseconds.
pub(super) struct Stats {
    pub(super) p50: f64,
    pub(super) p99: f64,
}

pub(super) fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    Stats {
        p50: at(0.5),
        p99: at(0.99),
    }
}

pub(super) fn ms(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{:.0} µs", us)
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// A connection acting as the root host (pipelined: no extra round trip).
pub(super) async fn host(paths: &Paths) -> anyhow::Result<agent::Client> {
    let node: node::Client = client::connect(&paths.socket).await?;
    Ok(node.host_request().send().pipeline.get_agent())
}

pub(super) fn as_agent(host: &agent::Client, path: &str) -> agent::Client {
    let mut r = host.agent_request();
    r.get().set_path(path);
    r.send().pipeline.get_agent()
}

pub(super) async fn send(a: &agent::Client, to: &str, text: &str) -> Result<u64, CapError> {
    send_traced(a, to, text, 0).await
}

/// [`send`] traced under `trace` (0: not traced; see `capstan_cluster::trace`).
pub(super) async fn send_traced(
    a: &agent::Client,
    to: &str,
    text: &str,
    trace: u64,
) -> Result<u64, CapError> {
    let mut r = a.send_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_to(to);
    p.reborrow().init_strings(1).set(0, text);
    p.reborrow().init_refs(0);
    p.set_trace(trace);
    Ok(r.send().promise.await?.get()?.get_number())
}

pub(super) async fn mkguest(a: &agent::Client, path: &str) -> Result<(), CapError> {
    let mut r = a.mkguest_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path(path);
    r.send().promise.await?;
    Ok(())
}

pub(super) async fn mkhost(a: &agent::Client, path: &str) -> Result<(), CapError> {
    let mut r = a.mkhost_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path(path);
    r.send().promise.await?;
    Ok(())
}

pub(super) async fn store_text(a: &agent::Client, path: &str, text: &str) -> Result<(), CapError> {
    let mut r = a.store_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_path(path);
    p.set_kind(capstan_proto::api_capnp::ValueKind::Text);
    p.set_data(text.as_bytes());
    r.send().promise.await?;
    Ok(())
}

pub(super) async fn remove(a: &agent::Client, path: &str) -> Result<(), CapError> {
    let mut r = a.remove_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_path(path);
    r.send().promise.await?;
    Ok(())
}

pub(super) async fn list_len(a: &agent::Client) -> Result<u32, CapError> {
    let mut r = a.list_request();
    r.get().set_path("");
    Ok(r.send().promise.await?.get()?.get_entries()?.len())
}

/// The number of messages and the highest message number of `a`'s inbox,
/// read a page of 10000 at a time.
async fn inbox_scan(a: &agent::Client) -> Result<(u32, Option<u64>), CapError> {
    let (mut count, mut last, mut from) = (0u32, None, 0u64);
    loop {
        let mut r = a.inbox_request();
        r.get().set_from(from);
        r.get().set_limit(10_000);
        let answer = r.send().promise.await?;
        let answer = answer.get()?;
        let messages = answer.get_messages()?;
        count += messages.len();
        if let Some(n) = messages.iter().map(|m| m.get_number()).max() {
            last = Some(n);
            from = n + 1;
        }
        if !answer.get_more() {
            return Ok((count, last));
        }
    }
}

pub(super) async fn inbox_len(a: &agent::Client) -> Result<u32, CapError> {
    Ok(inbox_scan(a).await?.0)
}

pub(super) async fn last_inbox_number(a: &agent::Client) -> Result<Option<u64>, CapError> {
    Ok(inbox_scan(a).await?.1)
}

/// Runs `jobs` futures made by `make(i)` with at most `width` in flight;
/// returns each one's latency.
pub(super) async fn concurrently<F, Fut>(
    jobs: usize,
    width: usize,
    make: F,
    progress: &str,
) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(usize) -> Fut + 'static,
    Fut: std::future::Future<Output = Result<(), CapError>> + 'static,
{
    let make = Rc::new(make);
    let next = Rc::new(std::cell::Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..width.max(1) {
        let make = make.clone();
        let next = next.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.get();
                if i >= jobs {
                    break;
                }
                next.set(i + 1);
                let t = Instant::now();
                make(i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, CapError>(lat)
        }));
    }
    let mut all = Vec::with_capacity(jobs);
    for t in tasks {
        all.extend(t.await?.with_context(|| format!("{progress} failed"))?);
    }
    Ok(all)
}

/// Installs the component `file` under `name` (grants none).
pub(super) async fn install(
    a: &agent::Client,
    file: &Path,
    name: &str,
    grants: &[(&str, &str)],
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut r = a.install_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_name(name);
    r.get().set_component(&bytes);
    let mut gl = r.get().init_grants(grants.len() as u32);
    for (i, (slot, path)) in grants.iter().enumerate() {
        let mut g = gl.reborrow().get(i as u32);
        g.set_slot(*slot);
        g.set_path(*path);
    }
    r.send()
        .promise
        .await
        .with_context(|| format!("installing {}", file.display()))?;
    Ok(())
}

pub(super) async fn mkguest_component(
    a: &agent::Client,
    path: &str,
    component: &str,
) -> anyhow::Result<()> {
    let mut r = a.mkguest_component_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path(path);
    r.get().set_component(component);
    r.send().promise.await?;
    Ok(())
}

pub(super) async fn run_tool(
    a: &agent::Client,
    name: &str,
    input: &str,
) -> Result<String, CapError> {
    let mut r = a.run_tool_request();
    r.get().set_name(name);
    r.get().set_input(input);
    Ok(r.send().promise.await?.get()?.get_output()?.to_string()?)
}

/// What the node's guest stats say of the guest `name`.
pub(super) struct GuestStat {
    pub(super) handled: u64,
    pub(super) failures: u64,
    /// Nanoseconds to make the instance for its last message.
    pub(super) instantiate_ns: u64,
    /// Nanoseconds its last call ran.
    pub(super) call_ns: u64,
}

pub(super) async fn guest_stat(a: &agent::Client, name: &str) -> Result<GuestStat, CapError> {
    let answer = a.guests_request().send().promise.await?;
    for g in answer.get()?.get_guests()?.iter() {
        if g.get_name()?.to_str()? == name {
            return Ok(GuestStat {
                handled: g.get_handled(),
                failures: g.get_failures(),
                instantiate_ns: g.get_instantiate_ns_last(),
                call_ns: g.get_call_ns_last(),
            });
        }
    }
    Err(CapError::failed(format!("guest {name} is not listed")))
}

/// Sends `text` to the guest `name` and waits until it handled it; the
/// nanoseconds its handler ran (the node's guest stats).
pub(super) async fn probe_call(a: &agent::Client, name: &str, text: &str) -> anyhow::Result<u64> {
    let before = guest_stat(a, name).await?;
    send(a, name, text).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = guest_stat(a, name).await?;
        if now.failures > before.failures {
            bail!("the probe guest failed on {text:?}; see `capstan guests`");
        }
        if now.handled > before.handled {
            return Ok(now.call_ns);
        }
        if Instant::now() > deadline {
            bail!("the probe guest did not handle {text:?} within 60 s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The highest message number the node pushed to a follower (`follow`).
struct Seen(Rc<std::cell::Cell<Option<u64>>>);

impl capstan_proto::api_capnp::message_sink::Server for Seen {
    async fn push(
        self: Rc<Self>,
        params: capstan_proto::api_capnp::message_sink::PushParams,
        _: capstan_proto::api_capnp::message_sink::PushResults,
    ) -> Result<(), CapError> {
        let n = params.get()?.get_message()?.get_number();
        if self.0.get().is_none_or(|m| n > m) {
            self.0.set(Some(n));
        }
        Ok(())
    }
}

/// Follows `a`'s inbox for as long as the connection lives: the waits
/// below then cost no call (polling `inbox` would read the whole inbox,
/// and that grows with every round trip measured).
pub(super) fn follow_inbox(a: &agent::Client, after: u64) -> Follow {
    let seen = Rc::new(std::cell::Cell::new(None));
    let sink: capstan_proto::api_capnp::message_sink::Client =
        capnp_rpc::new_client(Seen(seen.clone()));
    let mut r = a.follow_request();
    r.get().set_after(after);
    r.get().set_sink(sink);
    let task = tokio::task::spawn_local(async move {
        let _ = r.send().promise.await;
    });
    Follow { seen, task }
}

/// A follower of an inbox ([`follow_inbox`]): the highest number it was
/// pushed. Dropping it ends the follow (the call is cancelled), so that a
/// row's follower does not go on rendering the next rows' messages.
pub(super) struct Follow {
    seen: Rc<std::cell::Cell<Option<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Follow {
    type Target = Rc<std::cell::Cell<Option<u64>>>;
    fn deref(&self) -> &Self::Target {
        &self.seen
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the followed inbox has a message numbered `number` or later
/// (asking the node itself every 5 s, should the follower have been
/// dropped for falling behind); returns the highest number there then.
/// (An inbox's numbers need not be dense: one reserved and never written
/// is a hole, `rules::inbox`.)
pub(super) async fn wait_inbox(
    seen: &Rc<std::cell::Cell<Option<u64>>>,
    a: &agent::Client,
    number: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut asked = Instant::now();
    loop {
        if let Some(n) = seen.get().filter(|n| *n >= number) {
            return Ok(n);
        }
        if asked.elapsed() > Duration::from_millis(5000) {
            asked = Instant::now();
            if let Some(n) = last_inbox_number(a).await?.filter(|n| *n >= number) {
                return Ok(n);
            }
        }
        if Instant::now() > deadline {
            bail!("no guest answer within 60 s (message {number} of the host's inbox)");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// `eval` over the socket: the node's JSON answer.
pub(super) async fn eval(
    a: &agent::Client,
    source: &str,
    bindings: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    let mut r = a.evaluate_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_evaluator("evaluator");
    r.get().set_source(source);
    let mut gl = r.get().init_bindings(bindings.len() as u32);
    for (i, (slot, path)) in bindings.iter().enumerate() {
        let mut g = gl.reborrow().get(i as u32);
        g.set_slot(*slot);
        g.set_path(*path);
    }
    let answer = r.send().promise.await?;
    let text = answer.get()?.get_json()?.to_string()?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(e) = v.get("error") {
        bail!("eval failed: {e}");
    }
    Ok(v)
}

/// How many messages the guests named in `names` handled, over every node:
/// one `guests` call per node (each lists every guest with what that node
/// handled), not one per guest, so that polling does not load the nodes.
pub(super) async fn guests_handled(
    hosts: &[agent::Client],
    names: &std::collections::HashSet<String>,
) -> Result<u64, CapError> {
    let mut sum = 0;
    for h in hosts {
        let answer = h.guests_request().send().promise.await?;
        for g in answer.get()?.get_guests()?.iter() {
            if names.contains(g.get_name()?.to_str()?) {
                sum += g.get_handled();
            }
        }
    }
    Ok(sum)
}
