//! Scale-out and scale-in, real processes: a 3-node cluster of 12 data groups grows to
//! 5 nodes and shrinks back to 3 with `herald cluster add-node` / `remove-node` while
//! publishers write to conversations in many groups and subscribers read them.
//!
//! What users rely on: publishing and delivery go on through every move (each group's
//! replicas move by Raft membership change: learner, caught up, voter, old replica
//! out), and at the end the checker passes for every conversation — every acked
//! message stored exactly once, in order, with no gap, on every node, and delivered to
//! every subscriber in order without duplicates. After each change every group has 3
//! replicas, replica counts are within one of each other, and no node leads more than
//! ceil(groups / nodes) + 1 groups.

use std::collections::BTreeMap;

use anyhow::Context;
use herald_tests::checker::{Checker, Keys};
use herald_tests::cluster::Cluster;
use herald_tests::shards::conversations_in;

const GROUPS: usize = 12;

/// Every group has 3 distinct replicas, all on members, and replica counts differ by
/// at most one between members.
async fn check_placement(cluster: &Cluster, when: &str) -> anyhow::Result<BTreeMap<u16, usize>> {
    let ids = cluster.ids();
    for group in cluster.groups().await? {
        let mut distinct = group.replicas.clone();
        distinct.sort_unstable();
        distinct.dedup();
        anyhow::ensure!(
            group.replicas.len() == 3 && distinct.len() == 3,
            "{when}: group {} has replicas {:?}, want 3 distinct",
            group.id,
            group.replicas
        );
        anyhow::ensure!(
            group.replicas.iter().all(|r| ids.contains(r)),
            "{when}: group {} has replicas {:?} outside the cluster {ids:?}",
            group.id,
            group.replicas
        );
    }
    let counts = cluster.replica_counts().await?;
    let (min, max) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    anyhow::ensure!(
        max <= min + 1,
        "{when}: replicas per node {counts:?} are not balanced"
    );
    Ok(counts)
}

/// No member leads more than ceil(groups / nodes) + 1 groups (waits for the balancer).
async fn check_leaders(cluster: &Cluster, when: &str) -> anyhow::Result<BTreeMap<u16, usize>> {
    let nodes = cluster.ids().len();
    let max = GROUPS.div_ceil(nodes) + 1;
    cluster
        .wait_leaders_at_most(GROUPS, max)
        .await
        .with_context(|| format!("{when}: leaders not balanced"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_to_five_and_back_to_three_under_load_loses_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start_growable(5, 3, GROUPS as u32, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        anyhow::ensure!(groups.len() == GROUPS, "{} groups", groups.len());
        cluster.wait_every_group_led(GROUPS).await?;
        // Six conversations in six groups; subscribers on two of the initial nodes each
        // (they stay), the publisher seeded with the initial nodes and routed by the map.
        let wanted: Vec<u64> = groups.iter().step_by(2).map(|g| g.id).collect();
        let convs = conversations_in(&groups, &wanted, 20_000);
        let initial = cluster.ids();
        let mut checkers = Vec::new();
        for (i, conv) in convs.iter().enumerate() {
            let nodes = [initial[i % 3], initial[(i + 1) % 3]];
            checkers.push(Checker::start(&cluster, *conv, &nodes, Keys::Caller).await?);
        }
        for checker in &checkers {
            checker.wait_more_acks(10).await?;
        }
        let progress = |what: String| {
            let checkers = &checkers;
            async move {
                for checker in checkers {
                    checker.wait_more_acks(5).await.with_context(|| {
                        format!("{what}: conversation {} stalled", checker.conv)
                    })?;
                }
                anyhow::Ok(())
            }
        };

        for k in [4, 5] {
            let took = cluster.add_node(k, 1).await?;
            progress(format!("after adding node {k}")).await?;
            let counts = check_placement(&cluster, &format!("after adding node {k}")).await?;
            println!("added node {k} in {took:?}; replicas per node {counts:?}");
        }
        let leads = check_leaders(&cluster, "at 5 nodes").await?;
        println!("at 5 nodes, leaders per node {leads:?}");
        anyhow::ensure!(
            leads[&4] > 0 && leads[&5] > 0,
            "the new nodes lead nothing: {leads:?}"
        );

        for k in [5, 4] {
            let took = cluster.remove_node(k, 1).await?;
            progress(format!("after removing node {k}")).await?;
            let counts = check_placement(&cluster, &format!("after removing node {k}")).await?;
            println!("removed node {k} in {took:?}; replicas per node {counts:?}");
        }
        let leads = check_leaders(&cluster, "back at 3 nodes").await?;
        println!("back at 3 nodes, leaders per node {leads:?}");

        for checker in &mut checkers {
            checker.publisher.stop().await?;
        }
        for checker in &mut checkers {
            let summary = checker
                .check(&cluster, &initial)
                .await
                .with_context(|| format!("conversation {}", checker.conv))?;
            println!("conversation {}: {summary:?}", checker.conv);
            for e in checker.publisher.errors() {
                println!("  publish error (retried): {e}");
            }
        }
        Ok(())
    }
    .await;
    cluster.finish(result)
}

/// Runs `herald cluster ARGS` against node 1; (exit success, stdout + stderr).
fn cluster_cli(cluster: &Cluster, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = cluster.cli(1, "")?.arg("cluster").args(args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_break_the_cluster_are_refused_with_a_reason() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 3, &[]).await?;
    let result = async {
        // Three nodes, replication factor 3: none may leave.
        let (ok, text) = cluster_cli(&cluster, &["remove-node", "--id", "3"])?;
        anyhow::ensure!(
            !ok,
            "removing a node below the replication factor succeeded: {text}"
        );
        anyhow::ensure!(
            text.contains("fewer nodes than the replication factor 3"),
            "unexpected refusal: {text}"
        );
        // A node id already in use, at another address.
        let other = "127.0.0.1:9";
        let (ok, text) = cluster_cli(&cluster, &["add-node", "--id", "2", "--addr", other])?;
        anyhow::ensure!(!ok, "re-adding node 2 elsewhere succeeded: {text}");
        anyhow::ensure!(
            text.contains("node 2 is already in the cluster"),
            "unexpected refusal: {text}"
        );
        // Not an address.
        let (ok, text) = cluster_cli(&cluster, &["add-node", "--id", "7", "--addr", "nowhere"])?;
        anyhow::ensure!(!ok, "a bad address was taken: {text}");
        anyhow::ensure!(
            text.contains("is not HOST:PORT"),
            "unexpected refusal: {text}"
        );
        // Nothing changed.
        let status = cluster.status(1).await?;
        let nodes = status["nodes"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(nodes == 3, "the map has {nodes} nodes: {status}");
        anyhow::ensure!(status["settled"] == true, "not settled: {status}");
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_onto_a_node_that_never_comes_are_called_off_when_it_is_removed() -> anyhow::Result<()>
{
    let cluster = Cluster::start_growable(4, 3, GROUPS as u32, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        let convs = conversations_in(&groups, &[groups[0].id, groups[5].id], 30_000);
        let mut checkers = Vec::new();
        for conv in convs {
            checkers.push(Checker::start(&cluster, conv, &[1, 2], Keys::Caller).await?);
        }
        for checker in &checkers {
            checker.wait_more_acks(10).await?;
        }
        // Node 4 is added but its process never starts: moves onto it cannot finish.
        let addr = cluster.addr(4).to_string();
        let (ok, text) = cluster_cli(&cluster, &["add-node", "--id", "4", "--addr", &addr])?;
        anyhow::ensure!(ok, "add-node failed: {text}");
        herald_tests::wait_until_async("a move onto node 4 in flight", || async {
            cluster
                .status(1)
                .await
                .is_ok_and(|s| s["moving"].as_u64().unwrap_or(0) > 0)
        })
        .await?;
        for checker in &checkers {
            checker.wait_more_acks(5).await?;
        }
        // Removing it calls the moves off and drops it from the map.
        let took = cluster.remove_node(4, 1).await?;
        println!("removed the absent node 4 in {took:?}");
        let status = cluster.status(1).await?;
        anyhow::ensure!(status["settled"] == true, "not settled: {status}");
        let nodes: Vec<u64> = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["id"].as_u64())
            .collect();
        anyhow::ensure!(nodes == [1, 2, 3], "nodes {nodes:?}");
        check_placement(&cluster, "after calling the moves off").await?;
        for checker in &checkers {
            checker.wait_more_acks(5).await?;
        }
        for checker in &mut checkers {
            let summary = checker.check(&cluster, &[1, 2, 3]).await?;
            anyhow::ensure!(
                summary.publish_errors == 0,
                "conversation {}: publishes failed: {:?}",
                checker.conv,
                checker.publisher.errors()
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result)
}
