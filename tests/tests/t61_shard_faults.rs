//! Faults in a sharded cluster, real processes: 5 nodes, 32 groups, replication factor
//! 3. While steady publishers write to conversations in many groups (each through any
//! node) and subscribers on every node read them, a random node is killed (`kill -9`)
//! and restarted again and again. After that, the checker of the replication tests
//! passes for every conversation: every acked message is stored exactly once, in
//! order, with no gap, on every live node, and every subscriber's stream holds them all
//! in order with no duplicate.
//!
//! The default run does 3 kill-and-restart rounds; `HERALD_FAULT_ITERATIONS` sets how
//! many (the long version, which `.ci/run` runs when time allows, does 20):
//!
//! ```text
//! HERALD_FAULT_ITERATIONS=20 cargo test -p herald-tests --test t61_shard_faults -- --nocapture
//! ```

use anyhow::Context;
use herald_tests::checker::{Checker, Keys};
use herald_tests::cluster::Cluster;
use herald_tests::shards::conversations_in;

use herald_tests::fault_iterations as iterations;

/// A small deterministic generator (the test must not need a seed to reproduce).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_node_kills_in_32_groups_lose_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(5, 32, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        anyhow::ensure!(groups.len() == 32, "{} groups", groups.len());
        cluster.wait_every_group_led(32).await?;
        // Eight conversations in eight groups spread over the slot range; two
        // subscribers each, on different nodes (node i and i+2).
        let wanted: Vec<u64> = groups.iter().step_by(4).map(|g| g.id).collect();
        let convs = conversations_in(&groups, &wanted, 10_000);
        let ids = cluster.ids();
        let mut checkers = Vec::new();
        for (i, conv) in convs.iter().enumerate() {
            let nodes = [ids[i % ids.len()], ids[(i + 2) % ids.len()]];
            checkers.push(Checker::start(&cluster, *conv, &nodes, Keys::Caller).await?);
        }
        for checker in &checkers {
            checker.wait_more_acks(10).await?;
        }

        let mut rng = Lcg(0x5eed);
        for round in 1..=iterations() {
            let victim = ids[rng.below(ids.len() as u64) as usize];
            cluster.kill9(victim);
            // Publishing goes on without it: every conversation makes progress.
            for checker in &checkers {
                checker.wait_more_acks(5).await.with_context(|| {
                    format!(
                        "round {round}: conversation {} stalled with node {victim} down",
                        checker.conv
                    )
                })?;
            }
            cluster
                .restart(victim)
                .await
                .with_context(|| format!("round {round}: node {victim} did not come back"))?;
            println!("round {round}: killed and restarted node {victim}");
        }
        for checker in &checkers {
            checker.wait_more_acks(5).await?;
        }
        // Every node is back: stop every publisher, then check each conversation on
        // every node and every subscriber.
        for checker in &mut checkers {
            checker.publisher.stop().await?;
        }
        for checker in &mut checkers {
            let summary = checker
                .check(&cluster, &ids)
                .await
                .with_context(|| format!("conversation {}", checker.conv))?;
            println!("conversation {}: {summary:?}", checker.conv);
        }
        Ok(())
    }
    .await;
    cluster.finish(result)
}
