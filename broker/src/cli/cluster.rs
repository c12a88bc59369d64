//! Cluster changes: `herald cluster add-node` and `herald cluster remove-node`.
//!
//! Owns: turning the two commands into `POST /cluster/nodes` and
//! `POST /cluster/nodes/{id}/leave` on any node's admin HTTP (the node forwards the
//! change to the metadata leader), and, with `--wait`, following `/cluster` until the
//! cluster has carried the change out. Must not: move replicas itself — the metadata
//! leader plans and carries out every move.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::http;

/// How often `--wait` looks at `/cluster`.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often `--wait` prints progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// `herald cluster add-node`.
#[derive(Args, Debug)]
pub struct AddNodeArgs {
    /// The new node's id (its `cluster.node_id`; not one in the cluster map).
    #[arg(long)]
    id: u64,
    /// The new node's QUIC address as the other nodes dial it (HOST:PORT).
    #[arg(long)]
    addr: String,
    #[command(flatten)]
    common: ChangeArgs,
}

/// `herald cluster remove-node`.
#[derive(Args, Debug)]
pub struct RemoveNodeArgs {
    /// The node to drain and remove.
    #[arg(long)]
    id: u64,
    #[command(flatten)]
    common: ChangeArgs,
}

/// What both changes take.
#[derive(Args, Debug)]
pub struct ChangeArgs {
    /// Admin HTTP address(es) of nodes already in the cluster, HOST:PORT[,HOST:PORT…];
    /// the first that answers takes the change.
    #[arg(long, env = "HERALD_ADMIN", default_value = "127.0.0.1:7401")]
    admin: String,
    /// Wait until the cluster has moved every replica the change calls for.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (e.g. 10m).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Adds a node: the metadata leader makes it a member of the metadata group, then
/// moves replicas onto it (a bounded number at a time) until replica counts and
/// preferred leaders are balanced.
pub async fn add_node(args: AddNodeArgs) -> anyhow::Result<()> {
    let body = serde_json::json!({ "id": args.id, "addr": args.addr });
    let admin = change(&args.common.admin, "/cluster/nodes", &body).await?;
    println!("node {} ({}) added to the cluster map", args.id, args.addr);
    if args.common.wait {
        wait_until(&admin, args.common.timeout, |view| {
            node_of(view, args.id).is_some()
        })
        .await?;
        println!(
            "node {} holds its share of replicas; the cluster is settled",
            args.id
        );
    } else {
        println!("replicas move to it in the background; follow with `herald status`");
    }
    Ok(())
}

/// Removes a node: it is marked leaving, its replicas move to the other nodes, then
/// the metadata leader removes it from the map. Stop its process afterwards.
pub async fn remove_node(args: RemoveNodeArgs) -> anyhow::Result<()> {
    let path = format!("/cluster/nodes/{}/leave", args.id);
    let admin = change(&args.common.admin, &path, &serde_json::json!({})).await?;
    println!(
        "node {} is leaving: its replicas move to the other nodes",
        args.id
    );
    if args.common.wait {
        let own = http::get(&admin, "/cluster")
            .await
            .ok()
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|view| view["node_id"] == args.id);
        if own {
            eprintln!(
                "warning: --admin {admin} is node {} itself, which stops following the map once removed; \
                 give another node's admin address to see the end",
                args.id
            );
        }
        wait_until(&admin, args.common.timeout, |view| {
            node_of(view, args.id).is_none()
        })
        .await?;
        println!(
            "node {} holds no replicas and left the cluster; stop its process",
            args.id
        );
    } else {
        println!("follow with `herald status`; stop the node once it is no longer listed");
    }
    Ok(())
}

/// Sends one change to the first admin address that answers; returns that address.
async fn change(admin: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<String> {
    let mut failures = Vec::new();
    for addr in admin.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match http::post(addr, path, body).await {
            Ok((200, _)) => return Ok(addr.to_owned()),
            Ok((status, answer)) => {
                let why = serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| answer.trim().to_owned());
                if status == 503 {
                    // That node cannot reach the metadata leader; another may.
                    failures.push(format!("{addr}: {why}"));
                    continue;
                }
                bail!("the cluster refused the change: {why}");
            }
            Err(e) => failures.push(format!("{addr}: {e:#}")),
        }
    }
    bail!(
        "no admin address took the change:\n  {}",
        failures.join("\n  ")
    )
}

fn node_of(view: &serde_json::Value, id: u64) -> Option<&serde_json::Value> {
    view["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
}

/// Polls `/cluster` on `admin` until `done` holds and the cluster reports itself
/// settled (no move in flight, none planned), printing progress.
async fn wait_until(
    admin: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_problem = String::new();
    loop {
        match http::get(admin, "/cluster").await {
            Ok(body) => {
                let view: serde_json::Value = serde_json::from_str(&body)
                    .with_context(|| format!("{admin}/cluster did not return JSON"))?;
                if done(&view) && view["settled"] == true {
                    return Ok(());
                }
                if last_progress.elapsed() >= PROGRESS_INTERVAL {
                    last_progress = Instant::now();
                    println!(
                        "  {:>4}s: {} replica move(s) in flight, map version {}",
                        started.elapsed().as_secs(),
                        view["moving"],
                        view["map_version"]
                    );
                }
            }
            Err(e) => last_problem = format!("{e:#}"),
        }
        if started.elapsed() >= timeout {
            bail!(
                "the cluster did not settle within {}{}",
                humantime::format_duration(timeout),
                if last_problem.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last_problem})")
                }
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
