//! t45: graceful drain — what an operator relies on when a node is stopped on purpose
//! (`herald drain`, SIGTERM, a Kubernetes `preStop`): the node stops taking sessions
//! and reports not ready, hands every leadership to another replica, asks its sessions
//! to move, and exits; publishing goes on, and every subscriber — the ones that were on
//! the drained node included — sees every acked message once, in order, with no gap.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_tests::checker::{Checker, Keys, Summary};
use herald_tests::cluster::Cluster;
use herald_tests::{herald_binary, DEADLINE};

/// Conversation the checker uses.
const CONV: u64 = 45;
/// A short spread keeps the test quick; the moves are still spread over it.
const ENV: &[(&str, &str)] = &[
    ("HERALD_DRAIN_SESSIONS_SPREAD", "2s"),
    ("HERALD_DRAIN_TIMEOUT", "15s"),
    // The drain report is logged at info.
    ("RUST_LOG", "warn,herald_broker::server::drain=info"),
];

/// The data groups node `k` leads, as `/cluster` on node `k` reports them.
async fn groups_led_by(cluster: &Cluster, k: u16) -> anyhow::Result<Vec<u64>> {
    let status = cluster.status(k).await?;
    Ok(status["groups"]
        .as_array()
        .context("no groups in /cluster")?
        .iter()
        .filter(|g| g["leader"] == k)
        .filter_map(|g| g["id"].as_u64())
        .collect())
}

/// Every node of `cluster` but `k`.
fn all_but(cluster: &Cluster, k: u16) -> Vec<u16> {
    cluster.ids().into_iter().filter(|n| *n != k).collect()
}

/// Waits until node `k`'s process has exited (it is then reaped with `kill9`).
async fn wait_exited(cluster: &Cluster, k: u16, within: Duration) -> anyhow::Result<Duration> {
    let pid = cluster.pid(k).context("the node is not running")?;
    let started = Instant::now();
    loop {
        // A child that exited stays a zombie (state Z) until reaped.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if stat.is_empty() || state == Some(Some('Z')) {
            cluster.kill9(k);
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "node {k} still runs {within:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The longest time between two consecutive acks whose publishes were sent after `from`.
fn longest_ack_gap(checker: &Checker, from: Instant) -> Duration {
    let acked = checker.publisher.acked();
    acked
        .windows(2)
        .filter(|w| w[1].started >= from)
        .map(|w| w[1].at.saturating_duration_since(w[0].at))
        .max()
        .unwrap_or_default()
}

fn describe(summary: &Summary) -> String {
    format!(
        "{} acked ({} as duplicates), {} stored, deliveries per subscriber {:?}",
        summary.acked, summary.duplicate_acks, summary.stored, summary.delivered
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_drain_hands_over_refuses_sessions_and_moves_them_without_a_gap(
) -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 6, ENV).await?;
    let result = async {
        cluster.wait_all_ready().await?;
        let mut checker = Checker::start(&cluster, CONV, &[1, 2, 3], Keys::Caller).await?;
        checker.wait_more_acks(30).await?;
        // Drain a node that leads groups (leader balance spreads them over all three).
        let mut drained = 0;
        for k in cluster.ids() {
            if !groups_led_by(&cluster, k).await?.is_empty() {
                drained = k;
                break;
            }
        }
        anyhow::ensure!(
            drained != 0,
            "no node leads a group:\n{}",
            cluster.views().await
        );
        let others = all_but(&cluster, drained);

        let started = Instant::now();
        let output = Command::new(herald_binary()?)
            .args(["drain", "--admin", &cluster.admin_addr(drained).to_string()])
            .output()
            .context("cannot run herald drain")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::ensure!(
            output.status.success(),
            "herald drain failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        println!(
            "t45 herald drain: {} ({:?})",
            stdout.trim(),
            started.elapsed()
        );
        anyhow::ensure!(
            stdout.contains("0 still connected") && !stdout.contains("still leading"),
            "the drain left sessions or leaderships behind: {stdout}"
        );

        // Not ready, draining, leading nothing; the others lead every group.
        let (code, _) = cluster.admin_get(drained, "/readyz").await?;
        anyhow::ensure!(code == 503, "a draining node answered /readyz with {code}");
        let status = cluster.status(drained).await?;
        anyhow::ensure!(status["draining"] == true, "/cluster: {status}");
        anyhow::ensure!(status["sessions"] == 0, "/cluster: {status}");
        let led = groups_led_by(&cluster, drained).await?;
        anyhow::ensure!(led.is_empty(), "the drained node still leads {led:?}");
        let (_, metrics) = cluster.admin_get(drained, "/metrics").await?;
        anyhow::ensure!(
            metrics.contains("herald_draining 1"),
            "metrics lack herald_draining 1"
        );
        anyhow::ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("herald_sessions_moved_total") && !l.ends_with(" 0")),
            "no session was counted as moved"
        );

        // A new session on the draining node is refused with a reason to go elsewhere.
        let token = cluster.service_token("t45")?;
        let refused = cluster
            .cli(drained, &token)?
            .args(["history", "--conv", &CONV.to_string(), "--from", "1"])
            .output()
            .context("cannot run herald history")?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        anyhow::ensure!(
            !refused.status.success() && stderr.contains("draining"),
            "a session on the draining node was not refused as draining: {stderr}"
        );

        // Publishing went on, and goes on; the node then stops at once on SIGTERM.
        checker.wait_more_acks(30).await?;
        cluster.terminate(drained)?;
        let took = wait_exited(&cluster, drained, Duration::from_secs(10)).await?;
        println!("t45 drained node exited {took:?} after SIGTERM");
        checker.wait_more_acks(30).await?;
        let gap = longest_ack_gap(&checker, started);
        let summary = checker.check(&cluster, &others).await?;
        println!(
            "t45 drain by command: longest gap between acks {} ms; {}",
            gap.as_millis(),
            describe(&summary)
        );
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_leader_and_exits_within_the_drain_timeout() -> anyhow::Result<()> {
    let cluster = Cluster::start_sharded(3, 6, ENV).await?;
    let result = async {
        cluster.wait_all_ready().await?;
        let mut checker = Checker::start(&cluster, CONV, &[1, 2, 3], Keys::Caller).await?;
        checker.wait_more_acks(30).await?;
        // A node that leads groups (the one `wait_leader` names).
        let drained = cluster.wait_leader().await?;
        let others = all_but(&cluster, drained);
        let started = Instant::now();
        cluster.terminate(drained)?;
        // drain.timeout is 15 s; the node must be gone by then (plus the stop itself).
        let took = wait_exited(&cluster, drained, Duration::from_secs(20)).await?;
        let log = cluster.log_tail(drained, 40);
        anyhow::ensure!(
            log.contains("drained"),
            "node {drained} did not log its drain report:\n{log}"
        );
        anyhow::ensure!(
            !log.contains("still_leading=[") || log.contains("still_leading=[]"),
            "node {drained} stopped while still leading groups:\n{log}"
        );
        checker.wait_more_acks(30).await?;
        let gap = longest_ack_gap(&checker, started);
        let summary = checker.check(&cluster, &others).await?;
        println!(
            "t45 SIGTERM: exited after {} ms; longest gap between acks {} ms; {}",
            took.as_millis(),
            gap.as_millis(),
            describe(&summary)
        );
        anyhow::ensure!(
            took < DEADLINE,
            "the node took {took:?} to exit after SIGTERM"
        );
        Ok(())
    }
    .await;
    cluster.finish(result)
}
