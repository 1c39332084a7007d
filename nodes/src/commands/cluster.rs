//! `capstan cluster status|members|placement|drain|leave|trace` (not `init`,
//! which runs without a daemon: [`crate::cluster::init`]): calls the node's
//! `cluster` command and renders its JSON answer.

use anyhow::Context;
use serde_json::Value;

use crate::cluster::DRAIN_TIMEOUT;

/// `capstan cluster status|members|placement|drain|leave` (not init).
pub(super) async fn run(
    client: &crate::client::Client,
    command: crate::cli::ClusterCommand,
    json: bool,
) -> anyhow::Result<()> {
    use crate::cli::ClusterCommand as C;
    if let C::Trace { id, chrome, .. } = &command {
        let id = capstan_cluster::trace::parse_id(id).map_err(anyhow::Error::msg)?;
        let v = super::trace::fetch(client, id).await?;
        if v["spans"].as_array().is_none_or(|s| s.is_empty()) {
            anyhow::bail!(
                "no node recorded trace {}: check the id (`capstan send --trace` prints it); each node keeps only its latest {} spans, and a restarted node none",
                capstan_cluster::trace::format_id(id),
                capstan_cluster::trace::MAX_SPANS
            );
        }
        return super::trace::show(&v, chrome.as_deref(), json);
    }
    let (cmd, arg) = match &command {
        C::Init { .. } => unreachable!("cluster init runs without a daemon"),
        C::Status { .. } => ("status", String::new()),
        C::Members { .. } => ("members", String::new()),
        C::Placement { name, .. } => ("placement", name.clone()),
        C::Policy { placement, .. } => ("policy", placement.clone().unwrap_or_default()),
        C::Drain { node, .. } => ("drain", node.clone()),
        C::Leave { .. } => ("leave", String::new()),
        C::Trace { .. } => unreachable!("answered above"),
    };
    let what = format!(
        "draining {arg}: waiting for it to give up its incarnations (at most {} s)",
        DRAIN_TIMEOUT.as_secs()
    );
    let call = client.call(|a| {
        let arg = arg.clone();
        async move {
            let mut r = a.cluster_request();
            r.get().set_command(cmd);
            r.get().set_arg(arg.as_str());
            let answer = r.send().promise.await?;
            Ok(answer.get()?.get_json()?.to_string()?)
        }
    });
    let text = if cmd == "drain" {
        crate::output::with_progress(&what, call).await?
    } else {
        call.await?
    };
    let v: Value = serde_json::from_str(&text).context("the node sent bad JSON")?;
    if cmd == "leave" {
        crate::lifecycle::stop(&client.paths).await?;
    }
    if json {
        crate::output::print_json(&v);
        return Ok(());
    }
    match cmd {
        "status" => {
            println!(
                "node {} epoch {} {}{}",
                v["node"].as_str().unwrap_or("?"),
                v["epoch"],
                if v["serving"].as_bool() == Some(true) {
                    "serving"
                } else {
                    "NOT serving (no lease)"
                },
                if v["draining"].as_bool() == Some(true) {
                    ", draining"
                } else {
                    ""
                }
            );
            if let Some(e) = v["lease_error"].as_str() {
                println!("lease: the last renewal failed: {e}");
            }
            println!(
                "store {} ({})",
                v["store"].as_str().unwrap_or("?"),
                if v["store_health"]["ok"].as_bool() == Some(true) {
                    format!(
                        "ok, read {:.1} ms",
                        v["store_health"]["read_ms"].as_f64().unwrap_or(0.0)
                    )
                } else {
                    format!(
                        "FAILING: {}",
                        v["store_health"]["error"].as_str().unwrap_or("?")
                    )
                }
            );
            // etcd only: the history this node compacted (the nodes take turns)
            if let Some(n) = v["store_stats"]["compactions"].as_u64() {
                match v["store_stats"]["compacted_to"].as_u64() {
                    Some(to) if n > 0 => println!(
                        "store history: compacted {n} times by this node, last below revision {to}"
                    ),
                    _ => println!(
                        "store history: not compacted by this node yet (the nodes take turns, once the history has passed)"
                    ),
                }
            }
            println!(
                "placements {} ({}), incarnations here {}, step-downs {}, fenced writes {}",
                v["placements"],
                match v["placement_policy"].as_str() {
                    Some("spread") => "spread over the live nodes",
                    _ => "each on the node that first needed it",
                },
                v["incarnations_here"],
                v["stepdowns"],
                v["fenced_writes"]
            );
            match v["commit_merger"].as_str() {
                Some(m) if Some(m) == v["node"].as_str() => println!(
                    "busy commits: the other members relay theirs to this node, which merges them into its store requests"
                ),
                Some(m) => println!(
                    "busy commits: relayed to {m}, which merges the cluster's into its store requests"
                ),
                None => println!("busy commits: each node sends its own (no member merges them)"),
            }
            if v["inline_values"].as_bool() == Some(false) {
                println!(
                    "small values go to blobs: a live member reads no values inside their records (RECORDS 0: an older build); upgrade it"
                );
            }
            print_members(&v["members"]);
        }
        "members" => print_members(&v),
        "placement" => match v["node"].as_str() {
            Some(node) => println!(
                "{} ({}) lives on {node} ({}, epoch {})",
                v["name"].as_str().unwrap_or("?"),
                v["kind"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                v["epoch"]
            ),
            None => println!(
                "{} ({}) is not incarnated anywhere; the next call incarnates it on {}",
                v["name"].as_str().unwrap_or("?"),
                v["kind"].as_str().unwrap_or("?"),
                match v["policy"].as_str() {
                    Some("spread") => "the node the cluster's spreading picks",
                    _ => "the caller's node",
                }
            ),
        },
        "policy" => println!(
            "placement policy: {}{}",
            v["placement"].as_str().unwrap_or("?"),
            match (v["changed"].as_bool(), v["placement"].as_str()) {
                (Some(true), Some("spread")) =>
                    " (set; every node follows within about a second, and hands over, a few at a time, the agents another node now wins)",
                (Some(true), _) =>
                    " (set; every node follows within about a second; agents stay where they are)",
                _ => "",
            }
        ),
        "drain" => println!(
            "drained {}: {} incarnations moved ({} now here); it can stop now",
            v["node"].as_str().unwrap_or("?"),
            v["moved"],
            v["adopted_here"]
        ),
        _ => println!(
            "{} left the cluster and stopped",
            v["node"].as_str().unwrap_or("?")
        ),
    }
    Ok(())
}

fn print_members(ms: &Value) {
    println!(
        "{:<16} {:<22} {:<22} {:<9} {:>6} {:>10} {:>10} {:>7}",
        "NODE", "ADVERTISED", "OBSERVED", "STATE", "EPOCH", "LEASE AGE", "PLACEMENTS", "RECORDS"
    );
    for m in ms.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
        println!(
            "{:<16} {:<22} {:<22} {:<9} {:>6} {:>8}ms {:>10} {:>7}",
            m["name"].as_str().unwrap_or("?"),
            m["addr"].as_str().unwrap_or("?"),
            m["observed"].as_str().unwrap_or("-"),
            m["state"].as_str().unwrap_or("?"),
            m["epoch"],
            m["lease_age_ms"],
            m["placements"],
            m["records"]
        );
    }
}
