//! Sharding: many Raft groups over the cluster's nodes, real processes.
//!
//! What users rely on: every conversation lives in exactly one group; a publish to any
//! conversation through any node is acked once durable in its group, and every
//! subscriber of it receives everything in order, with no gap and no duplicate.

use std::collections::BTreeMap;

use anyhow::Context;
use herald_tests::checker::{Checker, Keys};
use herald_tests::cluster::Cluster;
use herald_tests::shards::{conversations_in, group_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_groups_on_three_nodes_each_carry_their_conversations() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 12, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        anyhow::ensure!(groups.len() == 12, "{groups:?}");
        // The slots are split among the groups, all of them, once.
        let mut slots: Vec<_> = groups.iter().map(|g| g.slots.clone()).collect();
        slots.sort_by_key(|r| r.start);
        anyhow::ensure!(slots.first().map(|r| r.start) == Some(0), "{slots:?}");
        anyhow::ensure!(slots.last().map(|r| r.end) == Some(4096), "{slots:?}");
        anyhow::ensure!(
            slots.windows(2).all(|w| w[0].end == w[1].start),
            "{slots:?}"
        );
        // Three replicas each, on three nodes: every node hosts every group.
        anyhow::ensure!(groups.iter().all(|g| g.replicas.len() == 3), "{groups:?}");
        let leaders = cluster.wait_every_group_led(12).await?;
        let mut leads = BTreeMap::<u16, usize>::new();
        for leader in leaders.values() {
            *leads.entry(*leader).or_default() += 1;
        }
        println!("leaders per node: {leads:?}");

        // Four conversations in four different groups, each checked end to end with a
        // subscriber on every node.
        let wanted: Vec<u64> = groups.iter().step_by(3).map(|g| g.id).collect();
        let convs = conversations_in(&groups, &wanted, 1000);
        let mut checkers = Vec::new();
        for conv in &convs {
            let group = group_of(&groups, *conv).context("no group")?;
            println!("conversation {conv} is in group {}", group.id);
            checkers.push(Checker::start(&cluster, *conv, &cluster.ids(), Keys::Caller).await?);
        }
        for checker in &checkers {
            checker.wait_more_acks(30).await?;
        }
        // Stop every publisher first, so the checks do not wait on each other's load.
        for checker in &mut checkers {
            checker.publisher.stop().await?;
        }
        for checker in &mut checkers {
            let summary = checker.check(&cluster, &cluster.ids()).await?;
            println!("conversation {}: {summary:?}", checker.conv);
        }
        Ok(())
    }
    .await;
    cluster.finish(result)
}
