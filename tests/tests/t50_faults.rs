//! t50: faults under load — what users rely on (every acked message stored exactly once
//! at its seq, on every node; every subscriber's stream gapless, ordered and
//! duplicate-free) survives leader crashes, a power loss of the whole cluster, a paused
//! follower, a follower that lost its disk, and a corrupted log segment.
//!
//! The short version (`cargo test -p herald-tests --test t50_faults`) takes a few
//! seconds per test. The long version repeats the loops; `HERALD_FAULT_ITERATIONS`
//! (default 3) is the number of leader kills, and a third of it the number of power
//! losses and pauses:
//!
//! ```text
//! HERALD_FAULT_ITERATIONS=20 cargo test --release -p herald-tests --test t50_faults -- --nocapture
//! ```
//!
//! Failover times (leader `kill -9` → first acked publish sent after the kill) are
//! printed, not asserted: timing belongs in benches.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_client::{ConvKind, IdempotencyKey, Publisher, Session, SessionEvent};
use herald_tests::checker::{Checker, Keys};
use herald_tests::cluster::Cluster;
use herald_tests::DEADLINE;

/// Leader kills in [`leader_kill_9_under_load_loses_nothing`]; the other loops run a
/// third as often (at least once).
fn iterations() -> usize {
    herald_tests::fault_iterations()
}

/// One fault test at a time: each runs three nodes under load, and on a small machine
/// several at once would starve the nodes into spurious elections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn others(cluster: &Cluster, k: u16) -> Vec<u16> {
    cluster.ids().into_iter().filter(|n| *n != k).collect()
}

/// Waits until `condition` (async, polled) holds.
async fn wait_for<F, Fut>(what: &str, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + DEADLINE;
    while !condition().await {
        anyhow::ensure!(
            Instant::now() < until,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

fn print_times(what: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let ms = |d: &Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{what}: {} (n={}, min {}, p50 {}, max {})",
        times.iter().map(ms).collect::<Vec<_>>().join(", "),
        times.len(),
        sorted.first().map(ms).unwrap_or_default(),
        sorted.get(sorted.len() / 2).map(ms).unwrap_or_default(),
        sorted.last().map(ms).unwrap_or_default(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_9_under_load_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let mut checker = Checker::start(&cluster, 1, &[1, 2, 3], Keys::Caller).await?;
        checker.wait_more_acks(30).await?;
        let mut failovers = Vec::new();
        for round in 1..=iterations() {
            let leader = cluster.wait_leader().await?;
            checker.wait_more_acks(20).await?;
            let errors_before = checker.publisher.errors().len();
            let killed_at = Instant::now();
            cluster.kill9(leader);
            let new_leader = cluster.wait_leader_other_than(leader).await?;
            let (ack, failover) = checker
                .publisher
                .wait_ack_sent_after(killed_at, DEADLINE)
                .await
                .with_context(|| format!("round {round}: no publish acked after killing node {leader}"))?;
            println!(
                "round {round}: killed leader {leader}; node {new_leader} leads; {} acked as seq {} after {:?}",
                ack.payload, ack.seq, failover
            );
            for e in checker.publisher.errors().iter().skip(errors_before) {
                println!("  publish error meanwhile: {e}");
            }
            failovers.push(failover);
            cluster
                .restart(leader)
                .await
                .with_context(|| format!("round {round}: restarting node {leader}"))?;
            // Each round starts from a fully replicated cluster.
            cluster
                .wait_caught_up(leader)
                .await
                .with_context(|| format!("round {round}: node {leader} catching up after its restart"))?;
            checker.wait_more_acks(20).await?;
        }
        let summary = checker.check(&cluster, &cluster.ids()).await?;
        println!("leader kills: {summary:?}");
        print_times("failover (leader kill -9 -> first publish sent after it acked)", &failovers);
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_of_the_whole_cluster_keeps_every_acked_message() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = [("HERALD_TEST_POWER_LOSS", "1")];
    let cluster = Cluster::start(3, &env).await?;
    let result = async {
        let mut checker = Checker::start(&cluster, 1, &[1, 2, 3], Keys::Caller).await?;
        for round in 1..=(iterations() / 3).max(1) {
            checker.wait_more_acks(60).await?;
            let before = checker.publisher.acked_count();
            // As close to "at once" as processes allow: no node outlives another by more
            // than a kill(2) call.
            for k in cluster.ids() {
                cluster.kill9(k);
            }
            let killed_at = Instant::now();
            cluster
                .restart_all(&cluster.ids())
                .await
                .with_context(|| format!("round {round}: restarting after the power loss"))?;
            let (_, back) = checker
                .publisher
                .wait_ack_sent_after(killed_at, DEADLINE)
                .await?;
            println!(
                "power loss round {round}: {before} acked before; publishing again {back:?} after the crash"
            );
            checker.wait_more_acks(30).await?;
        }
        let summary = checker.check(&cluster, &cluster.ids()).await?;
        println!("power loss: {summary:?}");
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_catches_up_after_sigcont() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let leader = cluster.wait_leader().await?;
        let paused = others(&cluster, leader)[0];
        // The publisher's seeds leave out the node that will be paused, so the load
        // goes on while it sleeps; a subscriber sits on every node, the paused one too.
        let mut checker = Checker::start_with(
            &cluster,
            1,
            &[1, 2, 3],
            Keys::Producer,
            &others(&cluster, paused),
        )
        .await?;
        checker.wait_more_acks(30).await?;
        for round in 1..=(iterations() / 3).max(1) {
            cluster.stop_signal(paused)?;
            checker.wait_more_acks(150).await?;
            let leader = cluster.wait_leader().await?;
            let lag = cluster.group(leader).await?["lag"][paused.to_string()]
                .as_u64()
                .context("no lag for the paused node")?;
            anyhow::ensure!(lag > 0, "the leader reports lag 0 for paused node {paused}");
            cluster.resume(paused)?;
            println!("pause round {round}: node {paused} was {lag} entries behind");
            checker.wait_more_acks(30).await?;
        }
        checker.publisher.stop().await?;
        cluster.wait_caught_up(paused).await?;
        let summary = checker.check(&cluster, &cluster.ids()).await?;
        println!("paused follower: {summary:?}");
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_rejoins_from_a_snapshot_and_serves_history() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = [
        ("HERALD_RAFT_SNAPSHOT_LOGS_SINCE_LAST", "200"),
        ("HERALD_RAFT_HOUSEKEEPING_INTERVAL", "1s"),
        ("HERALD_LIMITS_HISTORY_MESSAGES_MAX", "100"),
    ];
    let cluster = Cluster::start(3, &env).await?;
    let result = async {
        let token = cluster.service_token("svc")?;
        let publisher = Publisher::connect(cluster.client_config(&token, &cluster.ids())?).await?;
        publisher
            .create_conversation(1, ConvKind::Group, &[1])
            .await?;
        // 1000 messages from 4 sequential workers: few writes share a log entry, so the
        // log grows well past the snapshot threshold.
        let workers = (0..4u64).map(|w| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..250u64 {
                    let n = w * 250 + i + 1;
                    let key = IdempotencyKey::Caller(format!("k{n}"));
                    seqs.push(
                        publisher
                            .publish_with_key(1, key, format!("m{n}"))
                            .await?
                            .seq,
                    );
                }
                anyhow::Ok(seqs)
            })
        });
        let mut seqs = Vec::new();
        for w in futures_util::future::join_all(workers).await {
            seqs.extend(w??);
        }
        seqs.sort_unstable();
        anyhow::ensure!(
            seqs == (1..=1000).collect::<Vec<_>>(),
            "acked seqs are not 1..=1000"
        );

        let leader = cluster.wait_leader().await?;
        wait_for("the leader to purge its log after a snapshot", || async {
            cluster
                .group(leader)
                .await
                .is_ok_and(|g| g["purged_index"].as_u64().is_some_and(|p| p > 0))
        })
        .await?;
        let victim = if leader == 3 { 2 } else { 3 };
        let expected = publisher.history(1, 1, 1000).await?;
        anyhow::ensure!(
            expected.first_seq == 901 && expected.messages.len() == 100,
            "retention on the cluster: first_seq {} with {} messages",
            expected.first_seq,
            expected.messages.len()
        );

        cluster.wipe(victim)?;
        cluster.restart(victim).await?;
        cluster.wait_caught_up(victim).await?;
        let group = cluster.group(victim).await?;
        anyhow::ensure!(
            group["snapshot_index"].as_u64().is_some_and(|s| s > 0),
            "node {victim} rejoined without a snapshot: {group}"
        );

        // History from the rejoined node alone, through the CLI.
        let out = cluster
            .cli(victim, &token)?
            .args([
                "history", "--conv", "1", "--from", "1", "--limit", "1000", "--json",
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "herald history failed: {stderr}");
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let got: Vec<(u64, String)> = lines
            .iter()
            .map(|v| {
                (
                    v["seq"].as_u64().unwrap_or(0),
                    v["payload"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let want: Vec<(u64, String)> = expected
            .messages
            .iter()
            .map(|m| (m.seq, String::from_utf8_lossy(&m.payload).into_owned()))
            .collect();
        anyhow::ensure!(
            got == want,
            "node {victim} history {got:?}\nexpected {want:?}"
        );
        anyhow::ensure!(
            stderr.contains("before seq 901"),
            "herald history should say messages before seq 901 are past retention: {stderr}"
        );

        // The client API on that node alone: the page and a subscription from seq 1.
        let reader = Publisher::connect(cluster.client_config(&token, &[victim])?).await?;
        let page = reader.history(1, 1, 1000).await?;
        anyhow::ensure!(
            page.first_seq == 901 && page.next_seq == 1001 && page.messages == expected.messages,
            "node {victim}: first_seq {} next_seq {} with {} messages",
            page.first_seq,
            page.next_seq,
            page.messages.len()
        );
        reader.close().await;
        let mut session =
            Session::connect(cluster.client_config(&cluster.user_token(1)?, &[victim])?).await?;
        session.subscribe(1, Some(1)).await?;
        let first = tokio::time::timeout(DEADLINE, session.next())
            .await?
            .context("session ended")??;
        anyhow::ensure!(
            first
                == SessionEvent::Truncated {
                    conv: 1,
                    requested_from: 1,
                    first_available_seq: 901
                },
            "first event from node {victim}: {first:?}"
        );
        for seq in 901..=1000u64 {
            match tokio::time::timeout(DEADLINE, session.next())
                .await?
                .context("session ended")??
            {
                SessionEvent::Message(m) if m.seq == seq => {}
                other => anyhow::bail!("expected seq {seq}, got {other:?}"),
            }
        }
        session.close().await;
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}

/// Flips one byte in the body of the record that spans the middle of `path` (never the
/// last record, which recovery may treat as a torn tail). Returns that record's offset.
fn corrupt_middle_record(path: &Path) -> anyhow::Result<u64> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let len = bytes.len();
    // The shared log's record header (log format 2), its length field first.
    const HEADER_LEN: usize = 40;
    let mut offset = 0usize;
    loop {
        let header = bytes
            .get(offset..offset + HEADER_LEN)
            .with_context(|| format!("no record spans the middle of {}", path.display()))?;
        let body_len = u32::from_le_bytes(header[..4].try_into()?) as usize;
        let end = offset + HEADER_LEN + body_len;
        if end > len / 2 && body_len > 0 {
            anyhow::ensure!(
                end < len,
                "the middle record of {} is its last one; publish more first",
                path.display()
            );
            let at = offset + HEADER_LEN + body_len / 2;
            file.seek(SeekFrom::Start(at as u64))?;
            file.write_all(&[bytes[at] ^ 0xff])?;
            file.sync_all()?;
            return Ok(offset as u64);
        }
        offset = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_record_stops_that_node_and_is_never_served() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let leader = cluster.wait_leader().await?;
        // A follower that is not node 1 (node 1 initializes a new cluster on first boot).
        let victim = others(&cluster, leader)
            .into_iter()
            .filter(|k| *k != 1)
            .max()
            .context("no follower besides node 1")?;
        let survivors = others(&cluster, victim);
        let mut checker =
            Checker::start_with(&cluster, 1, &survivors, Keys::Caller, &survivors).await?;
        checker.wait_more_acks(150).await?;
        cluster.wait_caught_up(victim).await?;
        cluster.kill9(victim);

        let log_dir = cluster.data_dir(victim).join("raft/wal");
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&log_dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segments.sort();
        let segment = segments
            .first()
            .with_context(|| format!("no segment in {}", log_dir.display()))?
            .clone();
        let offset = corrupt_middle_record(&segment)?;

        checker.wait_more_acks(20).await?;
        let (status, stderr) = cluster.restart_expect_exit(victim).await?;
        anyhow::ensure!(
            !status.success(),
            "node {victim} started on a corrupt log ({status})"
        );
        let file_name = segment
            .file_name()
            .and_then(|n| n.to_str())
            .context("segment name")?;
        for needle in [file_name, &format!("offset {offset}"), "CRC"] {
            anyhow::ensure!(
                stderr.contains(needle),
                "node {victim}'s error should name {needle:?}:\n{stderr}"
            );
        }
        anyhow::ensure!(!cluster.is_running(victim), "node {victim} still runs");
        anyhow::ensure!(
            cluster.admin_get(victim, "/healthz").await.is_err(),
            "node {victim} answers on its admin port"
        );

        // The other two keep serving, and what they store is exactly what was acked.
        checker.wait_more_acks(20).await?;
        let summary = checker.check(&cluster, &survivors).await?;
        println!("corrupt log on node {victim}: {summary:?}");
        println!(
            "node {victim} refused to start: {}",
            stderr
                .lines()
                .filter(|l| l.contains("damaged"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        Ok(())
    }
    .await;
    cluster.finish(result)
}
