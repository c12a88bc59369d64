//! What survives a restart, with several groups sharing the log: entries, votes,
//! truncate, purge and drop; retiring old segments without losing any group's state;
//! acked entries across a simulated power cut; and group commit across groups.

use std::io::Write;
use std::sync::Arc;

use openraft::storage::{LogState, RaftLogStorage};

use super::super::{LogStore, LogStoreConfig, LogStoreError};
use super::{
    append, assert_holds, config, entries, entry, log_id, open, record_len, sealed_entry,
    segment_path, segment_seqs,
};
use crate::raft::Vote;

async fn log_state(store: &LogStore) -> LogState<crate::raft::TypeConfig> {
    store.clone().get_log_state().await.unwrap()
}

#[tokio::test]
async fn reopen_returns_every_groups_entries_vote_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    // Interleaved appends of two groups, rolling several segments.
    for chunk in (1..=120).collect::<Vec<u64>>().chunks(7) {
        append(&a, entries(chunk[0], chunk[chunk.len() - 1])).await;
        append(&b, entries(chunk[0] + 1000, chunk[chunk.len() - 1] + 1000)).await;
    }
    // The committed id is written without waiting; the vote after it waits for the
    // writer, so both are on disk before the log is dropped.
    a.clone()
        .save_committed(Some(log_id(1, 100)))
        .await
        .unwrap();
    a.clone()
        .save_vote(&Vote::new_committed(4, 2))
        .await
        .unwrap();
    b.clone().save_vote(&Vote::new(5, 3)).await.unwrap();
    assert!(
        segment_seqs(&config).len() > 3,
        "the test should roll segments"
    );
    drop((wal, a, b));

    let wal = open(&config).await;
    assert_eq!(wal.groups(), vec![1, 2]);
    let (a, b) = (wal.group(1), wal.group(2));
    assert_holds(&a, 1, 120);
    assert_holds(&b, 1001, 1120);
    assert_eq!(
        a.clone().read_vote().await.unwrap(),
        Some(Vote::new_committed(4, 2))
    );
    assert_eq!(b.clone().read_vote().await.unwrap(), Some(Vote::new(5, 3)));
    assert_eq!(
        a.clone().read_committed().await.unwrap(),
        Some(log_id(1, 100))
    );
    assert_eq!(b.clone().read_committed().await.unwrap(), None);
    assert_eq!(
        log_state(&a).await,
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, 120)),
        }
    );
    // The reopened logs take their next index.
    append(&a, entries(121, 125)).await;
    append(&b, entries(1121, 1122)).await;
    assert_holds(&a, 1, 125);
    assert_holds(&b, 1001, 1122);
}

#[tokio::test]
async fn truncate_and_purge_of_one_group_survive_reopen_and_leave_the_other_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        cache_bytes_max: 0,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    append(&a, entries(1, 200)).await;
    append(&b, entries(1, 50)).await;
    a.clone().truncate(log_id(1, 150)).await.unwrap();
    a.clone().purge(log_id(1, 40)).await.unwrap();
    assert_holds(&a, 41, 149);
    assert_holds(&b, 1, 50);
    drop((wal, a, b));

    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    assert_holds(&a, 41, 149);
    assert_holds(&b, 1, 50);
    assert_eq!(
        log_state(&a).await,
        LogState {
            last_purged_log_id: Some(log_id(1, 40)),
            last_log_id: Some(log_id(1, 149)),
        }
    );
    // A new leader's entries replace the truncated ones, also after another reopen.
    let replacement: Vec<_> = (150..=160).map(|i| entry(2, i, 50)).collect();
    append(&a, replacement.clone()).await;
    drop((wal, a, b));
    let wal = open(&config).await;
    let a = wal.group(1);
    assert_eq!(a.reader().entries(150, 161, u64::MAX).unwrap(), replacement);
    assert_eq!(a.reader().entry(149).unwrap(), Some(entry(1, 149, 50)));
}

#[tokio::test]
async fn truncate_everything_and_append_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 1024,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let a = wal.group(1);
    append(&a, entries(1, 60)).await;
    a.clone().truncate(log_id(1, 30)).await.unwrap();
    append(&a, entries(30, 70)).await;
    assert_holds(&a, 1, 70);
    a.clone().truncate(log_id(1, 1)).await.unwrap();
    assert_eq!(log_state(&a).await.last_log_id, None);
    append(&a, entries(1, 5)).await;
    drop((wal, a));
    let wal = open(&config).await;
    assert_holds(&wal.group(1), 1, 5);
}

#[tokio::test]
async fn old_segments_are_retired_once_no_group_needs_them_and_state_survives() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    // Both groups' votes and b's only entries live in the first segment.
    a.clone()
        .save_vote(&Vote::new_committed(3, 1))
        .await
        .unwrap();
    b.clone()
        .save_vote(&Vote::new_committed(6, 2))
        .await
        .unwrap();
    append(&b, entries(1, 3)).await;
    for i in (1..=200).step_by(10) {
        append(&a, entries(i, i + 9)).await;
    }
    let before = segment_seqs(&config);
    assert!(before.len() >= 5, "{before:?}");
    // a alone cannot retire segment 1: b still has live entries there.
    a.clone().purge(log_id(1, 180)).await.unwrap();
    assert_eq!(segment_seqs(&config)[0], 1);
    // Once b's entries are purged too, every segment before a's live entries goes.
    b.clone().purge(log_id(1, 3)).await.unwrap();
    let after = segment_seqs(&config);
    assert!(
        after[0] > 1 && after.len() < before.len(),
        "{before:?} -> {after:?}"
    );
    drop((wal, a, b));

    // The votes and purge points were in the deleted segment; the roll checkpoints kept
    // them.
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    assert_eq!(
        a.clone().read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 1))
    );
    assert_eq!(
        b.clone().read_vote().await.unwrap(),
        Some(Vote::new_committed(6, 2))
    );
    assert_holds(&a, 181, 200);
    assert_eq!(
        log_state(&b).await,
        LogState {
            last_purged_log_id: Some(log_id(1, 3)),
            last_log_id: Some(log_id(1, 3)),
        }
    );
    append(&b, entries(4, 6)).await;
    assert_holds(&b, 4, 6);
}

#[tokio::test]
async fn a_dropped_group_is_gone_after_reopen_and_frees_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    append(&b, entries(1, 5)).await;
    b.clone().save_vote(&Vote::new(2, 2)).await.unwrap();
    for i in (1..=100).step_by(10) {
        append(&a, entries(i, i + 9)).await;
    }
    a.clone().purge(log_id(1, 90)).await.unwrap();
    assert_eq!(segment_seqs(&config)[0], 1, "b pins the first segment");
    wal.drop_group(2).await.unwrap();
    assert_eq!(wal.groups(), vec![1]);
    assert!(segment_seqs(&config)[0] > 1);
    drop((wal, a, b));

    let wal = open(&config).await;
    assert_eq!(wal.groups(), vec![1]);
    let b = wal.group(2);
    assert_eq!(log_state(&b).await.last_log_id, None);
    assert_eq!(b.clone().read_vote().await.unwrap(), None);
    assert_holds(&wal.group(1), 91, 100);
}

#[tokio::test]
async fn purge_past_the_end_empties_the_log_and_it_restarts_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let wal = open(&config).await;
    let a = wal.group(1);
    append(&a, entries(1, 10)).await;
    a.clone().purge(log_id(3, 500)).await.unwrap();
    let empty = LogState {
        last_purged_log_id: Some(log_id(3, 500)),
        last_log_id: Some(log_id(3, 500)),
    };
    assert_eq!(log_state(&a).await, empty);
    drop((wal, a));

    let wal = open(&config).await;
    let a = wal.group(1);
    assert_eq!(log_state(&a).await, empty);
    assert_eq!(a.reader().entry(500).unwrap(), None);
    append(&a, entries(501, 510)).await;
    drop((wal, a));
    let wal = open(&config).await;
    assert_holds(&wal.group(1), 501, 510);
}

#[tokio::test]
async fn appends_that_leave_a_hole_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(&config(dir.path())).await;
    let a = wal.group(4);
    append(&a, entries(1, 3)).await;
    let err = a.append_notify(entries(5, 6)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogStoreError::NotContiguous {
                group: 4,
                expected: 4,
                got: 5
            }
        ),
        "{err}"
    );
    let err = a
        .append_notify(vec![entry(1, 4, 1), entry(1, 6, 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogStoreError::NotContiguous {
                expected: 5,
                got: 6,
                ..
            }
        ),
        "{err}"
    );
    assert_holds(&a, 1, 3);
}

#[tokio::test]
async fn on_an_empty_log_entries_up_to_the_purged_index_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let wal = open(&config).await;
    let a = wal.group(1);
    a.clone().purge(log_id(1, 5)).await.unwrap();
    append(&a, entries(3, 8)).await;
    assert_holds(&a, 6, 8);
    drop((wal, a));
    let wal = open(&config).await;
    let a = wal.group(1);
    assert_holds(&a, 6, 8);
    assert_eq!(log_state(&a).await.last_purged_log_id, Some(log_id(1, 5)));
}

/// The crash test: entries whose callback fired survive a power cut; bytes written
/// after the last fsync (here: two more valid records and a new segment) are gone.
#[tokio::test]
async fn acked_entries_survive_a_simulated_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        simulate_power_loss: true,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    append(&a, entries(1, 20)).await;
    append(&b, entries(1, 5)).await;
    let acked_len = (1..=20).map(|i| record_len(&entry(1, i, 50))).sum::<u64>()
        + (1..=5).map(|i| record_len(&entry(1, i, 50))).sum::<u64>();
    // No clean shutdown: the log is dropped with nothing flushed on the way out.
    drop((wal, a, b));

    // Written but never fsync'ed: valid records after the durable length, and a segment
    // the manifest does not know.
    let path = segment_path(&config, 1);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for i in 21..=22 {
        file.write_all(&sealed_entry(&config, 1, 1, &entry(1, i, 50)))
            .unwrap();
    }
    drop(file);
    std::fs::write(
        segment_path(&config, 2),
        sealed_entry(&config, 2, 1, &entry(1, 23, 50)),
    )
    .unwrap();

    let wal = open(&config).await;
    assert_holds(&wal.group(1), 1, 20);
    assert_holds(&wal.group(2), 1, 5);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), acked_len);
    assert_eq!(segment_seqs(&config), vec![1]);

    // Without the simulation the same bytes would have been taken as data: the mode is
    // what throws them away.
    drop(wal);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&sealed_entry(&config, 1, 1, &entry(1, 21, 50)))
        .unwrap();
    drop(file);
    let wal = open(&LogStoreConfig {
        simulate_power_loss: false,
        ..config
    })
    .await;
    assert_holds(&wal.group(1), 1, 21);
}

/// A committed hint costs no fsync of its own: the writer writes it and the next
/// append's fsync makes it durable (openraft saves the committed id after every commit;
/// an fsync per hint doubled the node's fsyncs and made appends wait behind them).
#[tokio::test]
async fn a_committed_hint_rides_on_the_next_appends_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        simulate_power_loss: true,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let a = wal.group(1);
    append(&a, entries(1, 5)).await;
    // What one append costs alone (power-loss mode also fsyncs its manifest).
    let fsyncs_before = wal.stats().fsyncs_total;
    append(&a, entries(6, 6)).await;
    let append_fsyncs = wal.stats().fsyncs_total - fsyncs_before;
    let fsyncs_before = wal.stats().fsyncs_total;
    let path = segment_path(&config, 1);
    let len_before = std::fs::metadata(&path).unwrap().len();
    a.clone().save_committed(Some(log_id(1, 5))).await.unwrap();
    // The hint is alone in the writer's queue: wait until its bytes are in the file.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&path).unwrap().len() == len_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the committed hint was never written"
        );
        tokio::task::yield_now().await;
    }
    append(&a, entries(7, 7)).await;
    assert_eq!(
        wal.stats().fsyncs_total - fsyncs_before,
        append_fsyncs,
        "the hint and the append after it should share one fsync"
    );
    // Durable with that append: it survives a simulated power cut.
    drop((wal, a));
    let wal = open(&config).await;
    let a = wal.group(1);
    assert_holds(&a, 1, 7);
    assert_eq!(
        a.clone().read_committed().await.unwrap(),
        Some(log_id(1, 5))
    );
}

/// One fsync covers the appends of many groups: 16 groups append concurrently, each
/// waiting for its own durability, and the log fsyncs far fewer times than it appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_of_many_groups_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(&config(dir.path())).await;
    let (groups, appenders_per_group, per_appender) = (16u32, 4u64, 10u64);
    let mut tasks = Vec::new();
    for group in 1..=groups {
        let store = wal.group(group);
        let next = Arc::new(tokio::sync::Mutex::new(1u64));
        for _ in 0..appenders_per_group {
            let (store, next) = (store.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_appender {
                    let durable = {
                        // Indexes must be queued in order; durability is awaited outside.
                        let mut next = next.lock().await;
                        let rx = store
                            .append_notify(vec![entry(1, *next, 50)])
                            .await
                            .unwrap();
                        *next += 1;
                        rx
                    };
                    durable.await.unwrap().unwrap();
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let per_group = appenders_per_group * per_appender;
    let total = u64::from(groups) * per_group;
    let stats = wal.stats();
    assert_eq!(stats.appended_entries_total, total);
    assert!(
        stats.fsyncs_total * 4 < total,
        "{} fsyncs for {total} appends of {groups} groups: no group commit",
        stats.fsyncs_total
    );
    for group in 1..=groups {
        assert_holds(&wal.group(group), 1, per_group);
    }
}
