//! The cluster's `spread` section: guest components made and mailed
//! through one node, under each placement policy (`capstan cluster policy`).
//! Under `local` they all live on that node, the one their clients reach;
//! under `spread` rendezvous hashing places them over every node. The rows
//! say how fast the counters handle their mail, where they lived, and how
//! busy each node was.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::bail;
use capstan_proto::api_capnp::agent;
use serde_json::{Value, json};

use super::calls::{concurrently, guests_handled, install, mkguest_component, send};
use super::process::{CpuMeter, etcd_pids};
use super::sends::{store_cost, store_counters};
use super::{Row, step};

/// `capstan cluster COMMAND ARG` through `a`: its JSON answer.
async fn cluster_json(a: &agent::Client, command: &str, arg: &str) -> anyhow::Result<Value> {
    let mut r = a.cluster_request();
    r.get().set_command(command);
    r.get().set_arg(arg);
    let answer = r.send().promise.await?;
    Ok(serde_json::from_str(answer.get()?.get_json()?.to_str()?)?)
}

/// Placements the nodes handed over so far (`cluster status`).
async fn handed_over(hosts: &[agent::Client]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for h in hosts {
        sum += cluster_json(h, "status", "").await?["handed_over"]
            .as_u64()
            .unwrap_or(0);
    }
    Ok(sum)
}

/// Waits until the nodes have handed over nothing for [`QUIET`] (at most
/// [`SETTLE_MAX`]): how many they handed over meanwhile, and how long
/// until the last (None: they did not settle in time).
async fn settle(hosts: &[agent::Client]) -> anyhow::Result<Option<(u64, Duration)>> {
    const QUIET: Duration = Duration::from_secs(5);
    const SETTLE_MAX: Duration = Duration::from_secs(180);
    let start = Instant::now();
    let first = handed_over(hosts).await?;
    let (mut last, mut last_change) = (first, start);
    while last_change.elapsed() < QUIET {
        if start.elapsed() > SETTLE_MAX {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = handed_over(hosts).await?;
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    Ok(Some((last - first, last_change - start)))
}

/// Both policies' rows; leaves the cluster's policy `local`. `conns`: the
/// senders, with the node each is connected to (those of node 0 send).
#[allow(clippy::too_many_arguments)]
pub(super) async fn spread_rows(
    hosts: &[agent::Client],
    conns: &Rc<Vec<(usize, agent::Client)>>,
    node_pids: &[u32],
    spec: &str,
    counter: &Path,
    total: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = hosts.len();
    install(&hosts[0], counter, "spread-counter", &[]).await?;
    let senders: Rc<Vec<agent::Client>> = Rc::new(
        conns
            .iter()
            .filter(|(node, _)| *node == 0)
            .map(|(_, a)| a.clone())
            .collect(),
    );
    for policy in ["local", "spread"] {
        step(
            false,
            &format!("cluster: guests made and mailed through n1 ({policy})"),
        );
        cluster_json(&hosts[0], "policy", policy).await?;
        // Under spread the nodes first hand over what others win of the
        // earlier sections' agents: measured apart, once that settled.
        let settled = match policy {
            "spread" => settle(hosts).await?,
            _ => None,
        };
        let guests = 8 * n;
        let names: Vec<String> = (0..guests).map(|i| format!("{policy}-k{i}")).collect();
        for k in &names {
            mkguest_component(&hosts[0], k, "spread-counter").await?;
            send(&hosts[0], k, "get").await?;
        }
        // where they live, by node
        let mut on: BTreeMap<String, usize> = BTreeMap::new();
        for k in &names {
            let p = cluster_json(&hosts[0], "placement", k).await?;
            *on.entry(p["node"].as_str().unwrap_or("-").to_string())
                .or_default() += 1;
        }
        let set: HashSet<String> = names.iter().cloned().collect();
        let start = guests_handled(hosts, &set).await?;
        let before = store_counters(hosts).await?;
        let cpu = CpuMeter::start(node_pids.to_vec(), etcd_pids(spec));
        let each: Vec<CpuMeter> = node_pids
            .iter()
            .map(|p| CpuMeter::start(vec![*p], Vec::new()))
            .collect();
        let t = Instant::now();
        let (s2, names2) = (senders.clone(), Rc::new(names.clone()));
        concurrently(
            total,
            senders.len(),
            move |i| {
                let a = s2[i % s2.len()].clone();
                let k = names2[i % names2.len()].clone();
                async move { send(&a, &k, "increment").await.map(drop) }
            },
            "cluster increment through n1",
        )
        .await?;
        loop {
            let done = guests_handled(hosts, &set).await?.saturating_sub(start);
            if done >= total as u64 {
                break;
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the counters handled {done} of {total} increments within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = t.elapsed();
        let rate = total as f64 / elapsed.as_secs_f64();
        let (cost, _) = store_cost(&before, &store_counters(hosts).await?, total);
        let (cpu_text, cpu_json) = cpu.per_op(total);
        let busy: Vec<f64> = each
            .iter()
            .map(|m| m.share(elapsed).1["nodes_pct"].as_f64().unwrap_or(0.0))
            .collect();
        let lived = on
            .iter()
            .map(|(node, k)| format!("{node} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let busy_text = busy
            .iter()
            .enumerate()
            .map(|(i, b)| format!("n{} {b:.0} %", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(Row {
            what: format!(
                "cluster: guest messages/s, {guests} counters made and mailed through n1 only, placement {policy}"
            ),
            value: format!(
                "{rate:.0} /s (counters on {lived}; each node busy {busy_text} of a core; CPU per message: {cpu_text})"
            ),
            target: "",
            endo: "",
            json: json!({"per_s": rate, "policy": policy, "guests": guests, "lived_on": on,
                "busy_pct": busy, "cpu": cpu_json}),
        });
        if let Some((moved, took)) = settled.filter(|(m, _)| *m > 0) {
            rows.push(Row {
                what: format!("cluster: … placements handed over as the policy became {policy}"),
                value: format!(
                    "{moved} of the earlier sections' agents, in {:.1} s",
                    took.as_secs_f64()
                ),
                target: "",
                endo: "",
                json: json!({"handed_over": moved, "seconds": took.as_secs_f64()}),
            });
        }
        rows.push(Row {
            what: format!("cluster: … store work per message ({policy})"),
            value: cost,
            target: "",
            endo: "",
            json: json!(null),
        });
    }
    cluster_json(&hosts[0], "policy", "local").await?;
    Ok(())
}
