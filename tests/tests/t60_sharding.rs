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
use herald_tests::DEADLINE;

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

/// A session on a node that holds no replica of its conversation's group receives
/// everything in order, with no gap and no duplicate, through a leader change of that
/// group: the leader pushes to the node, and the node re-finds the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_node_without_a_replica_follows_a_leader_change() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(5, 5, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        cluster.wait_every_group_led(groups.len()).await?;
        // A group and a node outside its replicas.
        let (group, outsider) = groups
            .iter()
            .find_map(|g| {
                cluster
                    .ids()
                    .into_iter()
                    .find(|k| !g.replicas.contains(k))
                    .map(|k| (g.clone(), k))
            })
            .context("every node hosts every group")?;
        let conv = conversations_in(&groups, &[group.id], 7000)[0];
        println!(
            "conversation {conv} in group {} (replicas {:?}); subscriber on node {outsider}",
            group.id, group.replicas
        );
        let mut checker = Checker::start(&cluster, conv, &[outsider], Keys::Caller).await?;
        checker.wait_more_acks(40).await?;
        anyhow::ensure!(
            checker.subscribers[0].last_seq() > 0,
            "nothing reached the session on node {outsider}"
        );

        let old = cluster.group_leaders().await[&group.id];
        anyhow::ensure!(old != outsider, "the outsider leads group {}", group.id);
        cluster.kill9(old);
        let until = std::time::Instant::now() + herald_tests::DEADLINE;
        let new = loop {
            if let Some(l) = cluster.group_leaders().await.get(&group.id) {
                if *l != old {
                    break *l;
                }
            }
            anyhow::ensure!(
                std::time::Instant::now() < until,
                "group {} elected no new leader",
                group.id
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        };
        println!("group {} leader {old} killed; node {new} leads", group.id);
        // The session resumes: a message acked after the election reaches it.
        checker.wait_more_acks(1).await?;
        let target = checker.publisher.acked().last().map_or(0, |a| a.seq);
        let killed_at = std::time::Instant::now();
        checker.subscribers[0]
            .wait_seq(target, herald_tests::DEADLINE)
            .await?;
        println!(
            "the session on node {outsider} had seq {target} {:?} after the election was seen",
            killed_at.elapsed()
        );
        checker.wait_more_acks(40).await?;

        let live: Vec<u16> = cluster.ids().into_iter().filter(|k| *k != old).collect();
        let summary = checker.check(&cluster, &live).await?;
        println!("{summary:?}");
        let notes = checker.subscribers[0].notes();
        anyhow::ensure!(
            !notes.iter().any(|n| n.contains("reconnect")),
            "the session left node {outsider}: {notes:?}"
        );
        // The new leader pushed copies to the outsider.
        let (_, metrics) = cluster.admin_get(new, "/metrics").await?;
        let copies = metrics
            .lines()
            .find_map(|l| l.strip_prefix("herald_fanout_node_copies_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        anyhow::ensure!(copies > 0.0, "node {new} pushed no copies to other nodes");
        Ok(())
    }
    .await;
    cluster.finish(result)
}

/// Leaders start on each group's preferred node (spread evenly), move away when that
/// node dies, and come back once it has returned and caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_are_balanced_and_return_after_a_node_comes_back() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 12, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        let preferred: BTreeMap<u64, u16> = groups.iter().map(|g| (g.id, g.replicas[0])).collect();
        let per_node_max = 12usize.div_ceil(3) + 1;
        let balanced = |leaders: &BTreeMap<u64, u16>| {
            let mut leads = BTreeMap::<u16, usize>::new();
            for l in leaders.values() {
                *leads.entry(*l).or_default() += 1;
            }
            leads
        };
        let wait_preferred = |what: &'static str| {
            let (cluster, preferred) = (&cluster, &preferred);
            async move {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(40);
                loop {
                    let leaders = cluster.group_leaders().await;
                    if &leaders == preferred {
                        return anyhow::Ok(leaders);
                    }
                    anyhow::ensure!(
                        std::time::Instant::now() < until,
                        "{what}: leaders {leaders:?}, preferred {preferred:?}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        };
        let leaders = wait_preferred("at start").await?;
        let leads = balanced(&leaders);
        anyhow::ensure!(leads.values().all(|n| *n == 4), "{leads:?}");

        // Node 1 dies: its four groups go to the others, within the bound.
        cluster.kill9(1);
        let until = std::time::Instant::now() + herald_tests::DEADLINE;
        let leaders = loop {
            let leaders = cluster.group_leaders().await;
            if leaders.len() == 12 && !leaders.values().any(|l| *l == 1) {
                break leaders;
            }
            anyhow::ensure!(
                std::time::Instant::now() < until,
                "no full leadership without node 1: {leaders:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        // (While it is down, its groups go to whichever replica wins each election.)
        println!("without node 1: {:?}", balanced(&leaders));

        // It returns: the leaders hand its groups back.
        cluster.restart(1).await?;
        let leaders = wait_preferred("after node 1 returned").await?;
        let leads = balanced(&leaders);
        println!("node 1 back: {leads:?}");
        anyhow::ensure!(leads.values().all(|n| *n <= per_node_max), "{leads:?}");
        Ok(())
    }
    .await;
    cluster.finish(result)
}

/// A publisher that knows the cluster map sends each conversation's writes straight to
/// its group's leader: once it has the map, no node forwards anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_go_straight_to_the_group_leader() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 12, &[]).await?;
    let result = async {
        let groups = cluster.groups().await?;
        let leaders = cluster.wait_every_group_led(12).await?;
        // Conversations in groups led by every node.
        let wanted: Vec<u64> = groups.iter().take(6).map(|g| g.id).collect();
        let convs = conversations_in(&groups, &wanted, 20_000);
        let led_by: std::collections::BTreeSet<u16> = wanted.iter().map(|g| leaders[g]).collect();
        anyhow::ensure!(led_by.len() == 3, "the groups are led by {led_by:?}");
        // One seed only: routes to the other leaders come from the map.
        let token = cluster.service_token("router")?;
        let publisher =
            herald_client::Publisher::connect(cluster.client_config(&token, &[1])?).await?;
        for conv in &convs {
            publisher
                .create_conversation(*conv, herald_client::ConvKind::Group, &[1])
                .await?;
        }
        // Forwarded writes and the sum of every group's term over every node, from
        // each node's /metrics.
        let counters = || async {
            let (mut forwarded, mut terms) = (0.0, 0.0);
            for k in cluster.ids() {
                let (_, text) = cluster.admin_get(k, "/metrics").await?;
                for line in text.lines() {
                    let value = || line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok());
                    if line.starts_with("herald_writes_forwarded_total ") {
                        forwarded += value().unwrap_or(0.0);
                    } else if line.starts_with("herald_raft_term{") {
                        terms += value().unwrap_or(0.0);
                    }
                }
            }
            anyhow::Ok((forwarded, terms))
        };
        // Warm up: the map arrives and routes open (in the background, while the
        // first writes for each leader go through the seed connection); wait until a
        // whole round goes out without a forward.
        let warm_until = std::time::Instant::now() + DEADLINE;
        loop {
            let (start, _) = counters().await?;
            for conv in &convs {
                publisher.publish(*conv, "warm-up").await?;
            }
            if counters().await?.0 == start {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < warm_until,
                "routes to the leaders never opened: publishes still forwarded after {DEADLINE:?}"
            );
        }
        // A leader change during the rounds makes forwarding right (the publisher's
        // route is stale until the map says otherwise): seen once on a 2-core host
        // running two clusters, an election in one of the 12 groups. Such an attempt
        // proves nothing either way and is run again, up to three times.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let (before, terms_before) = counters().await?;
            for round in 0..20 {
                for conv in &convs {
                    let ack = publisher.publish(*conv, format!("a{attempt}-m{round}")).await?;
                    anyhow::ensure!(!ack.duplicate, "{ack:?}");
                }
            }
            let (after, terms_after) = counters().await?;
            println!(
                "attempt {attempt}: writes forwarded: {before} before, {} during the rounds; terms {terms_before} -> {terms_after}",
                after - before
            );
            if terms_after != terms_before && attempt < ATTEMPTS {
                continue;
            }
            anyhow::ensure!(
                terms_after == terms_before,
                "a leader changed during each of {ATTEMPTS} attempts (terms {terms_before} -> {terms_after})"
            );
            anyhow::ensure!(
                after == before,
                "{} of 120 routed publishes were forwarded between nodes while no leader changed",
                after - before
            );
            break;
        }
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}
