//! What survives a restart: entries, the vote, truncate and purge; acked entries across a
//! simulated power cut; and group commit.

use std::io::Write;
use std::sync::Arc;

use openraft::storage::{LogState, RaftLogStorage};

use super::super::{LogStore, LogStoreConfig, LogStoreError};
use super::{
    append, assert_holds, config, entries, entry, log_id, record_len, segment_firsts, segment_path,
};
use crate::raft::Vote;

async fn log_state(store: &LogStore) -> LogState<crate::raft::TypeConfig> {
    store.clone().get_log_state().await.unwrap()
}

#[tokio::test]
async fn reopen_returns_the_same_entries_vote_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let store = LogStore::open(config.clone()).await.unwrap();
    for chunk in (1..=120).collect::<Vec<u64>>().chunks(7) {
        append(&store, entries(chunk[0], chunk[chunk.len() - 1])).await;
    }
    let mut raft = store.clone();
    // The committed id is written without waiting; the vote after it waits for the
    // writer, so both are on disk before the store is dropped.
    raft.save_committed(Some(log_id(1, 100))).await.unwrap();
    raft.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
    assert!(
        segment_firsts(&config).len() > 3,
        "the test should roll segments"
    );
    drop((store, raft));

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 1, 120);
    let mut raft = store.clone();
    assert_eq!(
        raft.read_vote().await.unwrap(),
        Some(Vote::new_committed(4, 2))
    );
    assert_eq!(raft.read_committed().await.unwrap(), Some(log_id(1, 100)));
    assert_eq!(
        log_state(&store).await,
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, 120)),
        }
    );
    // The reopened log takes the next index.
    append(&store, entries(121, 125)).await;
    assert_holds(&store, 1, 125);
}

#[tokio::test]
async fn truncate_and_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        cache_bytes_max: 0,
        ..config(dir.path())
    };
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, 200)).await;
    let mut raft = store.clone();
    raft.truncate(log_id(1, 150)).await.unwrap();
    raft.purge(log_id(1, 40)).await.unwrap();
    assert_holds(&store, 41, 149);
    let firsts = segment_firsts(&config);
    assert!(
        firsts[0] <= 41 && firsts[1] > 41,
        "wholly purged segments are deleted: {firsts:?}"
    );
    assert!(
        *firsts.last().unwrap() < 150,
        "segments past the truncation are deleted: {firsts:?}"
    );
    drop((store, raft));

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 41, 149);
    assert_eq!(
        log_state(&store).await,
        LogState {
            last_purged_log_id: Some(log_id(1, 40)),
            last_log_id: Some(log_id(1, 149)),
        }
    );
    // A new leader's entries replace the truncated ones.
    let replacement: Vec<_> = (150..=160).map(|i| entry(2, i, 50)).collect();
    append(&store, replacement.clone()).await;
    drop(store);
    let store = LogStore::open(config).await.unwrap();
    assert_eq!(
        store.reader().entries(150, 161, u64::MAX).unwrap(),
        replacement
    );
    assert_eq!(store.reader().entry(149).unwrap(), Some(entry(1, 149, 50)));
}

#[tokio::test]
async fn truncate_to_the_first_entry_of_a_segment_and_append_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 1024,
        ..config(dir.path())
    };
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, 60)).await;
    let firsts = segment_firsts(&config);
    let cut = firsts[2];
    store.clone().truncate(log_id(1, cut)).await.unwrap();
    assert_eq!(segment_firsts(&config), firsts[..2].to_vec());
    append(&store, entries(cut, 70)).await;
    assert_holds(&store, 1, 70);
    store.clone().truncate(log_id(1, 1)).await.unwrap();
    assert_eq!(log_state(&store).await.last_log_id, None);
    assert!(segment_firsts(&config).is_empty());
    append(&store, entries(1, 5)).await;
    drop(store);
    let store = LogStore::open(config).await.unwrap();
    assert_holds(&store, 1, 5);
}

#[tokio::test]
async fn purge_past_the_end_empties_the_log_and_it_restarts_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, 10)).await;
    store.clone().purge(log_id(3, 500)).await.unwrap();
    let empty = LogState {
        last_purged_log_id: Some(log_id(3, 500)),
        last_log_id: Some(log_id(3, 500)),
    };
    assert_eq!(log_state(&store).await, empty);
    assert!(segment_firsts(&config).is_empty());
    drop(store);

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_eq!(log_state(&store).await, empty);
    assert_eq!(store.reader().entry(500).unwrap(), None);
    append(&store, entries(501, 510)).await;
    drop(store);
    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 501, 510);
    assert_eq!(segment_firsts(&config), vec![501]);
}

#[tokio::test]
async fn appends_that_leave_a_hole_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(config(dir.path())).await.unwrap();
    append(&store, entries(1, 3)).await;
    let err = store.append_notify(entries(5, 6)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogStoreError::NotContiguous {
                expected: 4,
                got: 5
            }
        ),
        "{err}"
    );
    let err = store
        .append_notify(vec![entry(1, 4, 1), entry(1, 6, 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogStoreError::NotContiguous {
                expected: 5,
                got: 6
            }
        ),
        "{err}"
    );
    assert_holds(&store, 1, 3);
}

#[tokio::test]
async fn on_an_empty_log_entries_up_to_the_purged_index_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = LogStore::open(config.clone()).await.unwrap();
    store.clone().purge(log_id(1, 5)).await.unwrap();
    append(&store, entries(3, 8)).await;
    assert_holds(&store, 6, 8);
    drop(store);
    let store = LogStore::open(config).await.unwrap();
    assert_holds(&store, 6, 8);
    assert_eq!(
        log_state(&store).await.last_purged_log_id,
        Some(log_id(1, 5))
    );
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
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, 20)).await;
    let acked_len = (1..=20).map(|i| record_len(&entry(1, i, 50))).sum::<u64>();
    // No clean shutdown: the store is dropped with nothing flushed on the way out.
    drop(store);

    // Written but never fsync'ed: valid records after the durable length, and a segment
    // the manifest does not know.
    let path = segment_path(&config, 1);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for i in 21..=22 {
        file.write_all(&super::super::record::encode(&entry(1, i, 50)).unwrap())
            .unwrap();
    }
    drop(file);
    std::fs::write(
        segment_path(&config, 23),
        super::super::record::encode(&entry(1, 23, 50)).unwrap(),
    )
    .unwrap();

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 1, 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), acked_len);
    assert_eq!(segment_firsts(&config), vec![1]);

    // Without the simulation the same bytes would have been taken as data: the mode is
    // what throws them away.
    drop(store);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&super::super::record::encode(&entry(1, 21, 50)).unwrap())
        .unwrap();
    drop(file);
    let store = LogStore::open(LogStoreConfig {
        simulate_power_loss: false,
        ..config
    })
    .await
    .unwrap();
    assert_holds(&store, 1, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(config(dir.path())).await.unwrap();
    let next = Arc::new(tokio::sync::Mutex::new(1u64));
    let (appenders, per_appender) = (64u64, 20u64);
    let mut tasks = Vec::new();
    for _ in 0..appenders {
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
    for task in tasks {
        task.await.unwrap();
    }
    let total = appenders * per_appender;
    let stats = store.stats();
    assert_eq!(stats.appended_entries_total, total);
    assert!(
        stats.fsyncs_total < total,
        "{} fsyncs for {total} appends: no group commit",
        stats.fsyncs_total
    );
    assert_holds(&store, 1, total);
}
