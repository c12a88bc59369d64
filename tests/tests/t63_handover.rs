//! Leader handover under load, in a binary of its own.
//!
//! What users rely on: after a node comes back, its groups return to it without a
//! failed handover, so writes are held for tens of milliseconds, not for a 2 s
//! handover timeout, and no acked write is lost or duplicated.
//!
//! Alone in its binary because cargo runs test binaries one after another but the
//! tests of one binary side by side: sharing a 2-core host with t60's 12-group
//! cluster, every node's fsync took 35–48 ms and AppendEntries 60–76 ms (openraft
//! gives each 50 ms), so elections failed for want of CPU and disk, not because of a
//! handover bug (2026-12-02, debug build; ARCHITECTURE.md, "Seen and not fixed").

use anyhow::Context;
use herald_client::{ConvKind, Publisher};
use herald_tests::checker::{Checker, Keys, SteadyPublisher};
use herald_tests::cluster::Cluster;

/// A leader hands a group back to its preferred replica at the first try while writes
/// keep coming. A batch still on its way into the leader's log when the candidate asked
/// for votes used to make the candidate's log the shorter one: its vote was refused, the
/// old leader was elected again, and writes stayed held (seen in t70 as ~2 s gaps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_under_load_succeeds_at_the_first_try() -> anyhow::Result<()> {
    const CYCLES: usize = 3;
    let balance_log = [("RUST_LOG", "warn,herald_broker::server::balance=info")];
    let cluster = Cluster::start(3, &balance_log).await?;
    let result = async {
        let groups = cluster.groups().await?;
        let preferred = groups
            .first()
            .and_then(|g| g.replicas.first().copied())
            .context("no data group")?;
        let mut checker = Checker::start(&cluster, 61, &[1, 2, 3], Keys::Caller).await?;
        // More writers, so that batches are in flight whenever a handover starts.
        let service = cluster.service_token("load")?;
        let mut load = Vec::new();
        for conv in 62..70 {
            let publisher =
                Publisher::connect(cluster.client_config(&service, &cluster.ids())?).await?;
            publisher
                .create_conversation(conv, ConvKind::Group, &[1])
                .await?;
            load.push(SteadyPublisher::start(publisher, conv, Keys::Caller));
        }
        checker.wait_more_acks(50).await?;
        for cycle in 1..=CYCLES {
            cluster.kill9(preferred);
            let other = cluster.wait_leader_other_than(preferred).await?;
            checker.wait_more_acks(50).await?;
            cluster.restart(preferred).await?;
            let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while cluster.leader().await != Some(preferred) {
                anyhow::ensure!(
                    std::time::Instant::now() < until,
                    "cycle {cycle}: node {other} did not hand the group back to node {preferred}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            checker.wait_more_acks(50).await?;
        }
        for mut publisher in load {
            publisher.stop().await?;
        }
        let summary = checker.check(&cluster, &cluster.ids()).await?;
        println!("{summary:?}");
        let mut handed_back = 0;
        let mut failed = Vec::new();
        for k in cluster.ids() {
            let log = std::fs::read_to_string(cluster.log_path(k)).unwrap_or_default();
            handed_back += log.matches("handed leadership back").count();
            failed.extend(
                log.lines()
                    .filter(|l| l.contains("leadership handover did not happen"))
                    .map(|l| format!("node {k}: {l}")),
            );
        }
        anyhow::ensure!(
            handed_back >= CYCLES,
            "{handed_back} handovers for {CYCLES} returns"
        );
        anyhow::ensure!(
            failed.is_empty(),
            "handovers failed:\n{}",
            failed.join("\n")
        );
        Ok(())
    }
    .await;
    cluster.finish(result)
}
