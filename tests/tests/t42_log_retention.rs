//! t42: a node's log stays short in a stable cluster. Segments retire oldest first, so
//! a group with an old live entry — the metadata group's bootstrap entries, or a data
//! group whose last snapshot is far back — would keep every segment on disk; the
//! housekeeping snapshots such a group early and purges it (`engine::retention`).

use std::time::{Duration, Instant};

use anyhow::Context;
use herald_client::{ConvKind, Publisher};
use herald_tests::cluster::Cluster;
use herald_tests::DEADLINE;

/// 256 KiB segments: the run below writes about 25 of them.
const SEGMENT_BYTES: u64 = 256 * 1024;
const HISTORY_MESSAGES: u64 = 20;
const MESSAGES: u64 = 1600;
const PAYLOAD_BYTES: usize = 4096;
/// What a short log may hold: the history (80 KiB: one or two segments), then up to
/// `UNPIN_FREED_PER_SNAPSHOT_BYTE` (4) times the data group's snapshot (about 100 KiB:
/// history and 1,600 dedup keys), about 2 segments, before it is snapshotted early,
/// and the active segment.
const SEGMENTS_MAX: u64 = 8;

/// `(segments, bytes)` of node `k`'s shared log, from `/cluster`.
async fn log_size(cluster: &Cluster, k: u16) -> anyhow::Result<(u64, u64)> {
    let status = cluster.status(k).await?;
    let log = &status["log"];
    Ok((
        log["segments"].as_u64().context("no log.segments")?,
        log["bytes"].as_u64().context("no log.bytes")?,
    ))
}

/// Waits until every node's log holds at most [`SEGMENTS_MAX`] segments.
async fn wait_short_logs(cluster: &Cluster) -> anyhow::Result<()> {
    let until = Instant::now() + DEADLINE;
    for k in cluster.ids() {
        loop {
            let (segments, bytes) = log_size(cluster, k).await?;
            if segments <= SEGMENTS_MAX {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "node {k}'s log still holds {segments} segments ({bytes} bytes) after {DEADLINE:?}: {}",
                cluster.status(k).await?["log"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The last [`HISTORY_MESSAGES`] messages, read from node `k`.
async fn check_history(cluster: &Cluster, k: u16, token: &str) -> anyhow::Result<()> {
    let reader = Publisher::connect(cluster.client_config(token, &[k])?).await?;
    let first = MESSAGES - HISTORY_MESSAGES + 1;
    let mut messages = Vec::new();
    // A page holds what fits in one frame: page on from the last message.
    let mut from = 1;
    loop {
        let page = reader.history(1, from, 1000).await?;
        anyhow::ensure!(
            page.first_seq == first,
            "node {k}: history starts at seq {}, not {first}",
            page.first_seq
        );
        let Some(last) = page.messages.last().map(|m| m.seq) else {
            break;
        };
        messages.extend(page.messages);
        from = last + 1;
    }
    reader.close().await;
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    anyhow::ensure!(
        seqs == (first..=MESSAGES).collect::<Vec<_>>(),
        "node {k}: history is {seqs:?}"
    );
    for m in &messages {
        anyhow::ensure!(
            m.payload == payload(m.seq),
            "node {k}: seq {} has the wrong payload",
            m.seq
        );
    }
    Ok(())
}

fn payload(seq: u64) -> Vec<u8> {
    vec![(seq % 251) as u8; PAYLOAD_BYTES]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_cluster_retires_old_segments_and_keeps_its_history() -> anyhow::Result<()> {
    let segment_bytes = SEGMENT_BYTES.to_string();
    let history = HISTORY_MESSAGES.to_string();
    let cluster = Cluster::start(
        3,
        &[
            ("HERALD_RAFT_LOG_SEGMENT_BYTES_MAX", &segment_bytes),
            ("HERALD_LIMITS_HISTORY_MESSAGES_MAX", &history),
            // The data group never snapshots on openraft's schedule in this run.
            ("HERALD_RAFT_SNAPSHOT_LOGS_SINCE_LAST", "1000000"),
            ("HERALD_RAFT_HOUSEKEEPING_INTERVAL", "200ms"),
        ],
    )
    .await?;
    let result = async {
        let token = cluster.service_token("svc")?;
        let publisher = Publisher::connect(cluster.client_config(&token, &cluster.ids())?).await?;
        publisher
            .create_conversation(1, ConvKind::Group, &[1])
            .await?;
        // Ten at a time, in seq order per batch.
        for batch in 0..MESSAGES / 10 {
            let acks = futures_util::future::join_all(
                (1..=10).map(|i| publisher.publish(1, payload(batch * 10 + i))),
            )
            .await;
            for ack in acks {
                ack?;
            }
        }
        publisher.close().await;
        let written = MESSAGES * PAYLOAD_BYTES as u64;
        anyhow::ensure!(
            written > 3 * SEGMENTS_MAX * SEGMENT_BYTES,
            "the run must write well past the short-log bound"
        );
        wait_short_logs(&cluster).await?;
        for k in cluster.ids() {
            check_history(&cluster, k, &token).await?;
        }

        // A node restarted from its shortened log serves the same history.
        let leader = cluster.wait_leader().await?;
        let k = cluster
            .ids()
            .into_iter()
            .find(|k| *k != leader)
            .context("no follower")?;
        cluster.kill9(k);
        cluster.restart(k).await?;
        cluster.wait_caught_up(k).await?;
        check_history(&cluster, k, &token).await?;
        let (segments, _) = log_size(&cluster, k).await?;
        anyhow::ensure!(
            segments <= SEGMENTS_MAX,
            "node {k} restarted with {segments} segments"
        );
        Ok(())
    }
    .await;
    cluster.finish(result)
}
