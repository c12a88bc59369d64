//! Tests of the log store: openraft's suite on one group's log ([`suite`]), durability and
//! recovery with several groups interleaved ([`durability`]), damage ([`damage`]), and
//! ignored measurements ([`measure`]).

mod damage;
mod durability;
mod measure;
mod recycle;
mod spans;
mod suite;

use std::path::{Path, PathBuf};

use herald_client::wire::{IdempotencyKey, Principal};
use openraft::{CommittedLeaderId, EntryPayload};

use super::{record, segment, LogStore, LogStoreConfig, Wal};
use crate::raft::{Entry, GroupId, LogId};
use crate::store::Command;

/// A config for a log in `dir/wal`, with roomy segments and cache.
pub(super) fn config(dir: &Path) -> LogStoreConfig {
    LogStoreConfig {
        dir: dir.join("wal"),
        ..LogStoreConfig::default()
    }
}

/// Opens the shared log.
pub(super) async fn open(config: &LogStoreConfig) -> Wal {
    Wal::open(config.clone()).await.unwrap()
}

/// A log id of leader 1.
pub(super) fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A publish entry at `index` with `payload_len` payload bytes.
pub(super) fn entry(term: u64, index: u64, payload_len: usize) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Publish {
            conv: 7,
            sender: Principal::Service("svc".into()),
            key: IdempotencyKey::Caller(format!("k{index}")),
            payload: vec![(index % 251) as u8; payload_len],
            timestamp_ms: index,
        }])),
    }
}

/// Entries `from..=to` of term 1, 50-byte payloads.
pub(super) fn entries(from: u64, to: u64) -> Vec<Entry> {
    (from..=to).map(|i| entry(1, i, 50)).collect()
}

/// Appends and waits until durable.
pub(super) async fn append(store: &LogStore, entries: Vec<Entry>) {
    store
        .append_notify(entries)
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
}

/// The encoded record length of `entry` (the same in every group).
pub(super) fn record_len(entry: &Entry) -> u64 {
    record::encode_entry(1, entry).unwrap().len() as u64
}

/// The record of `entry` of `group` as the writer of `config`'s log would write it to
/// segment `seg` (sealed with the directory's key): for tests that forge log bytes.
pub(super) fn sealed_entry(
    config: &LogStoreConfig,
    seg: u64,
    group: GroupId,
    entry: &Entry,
) -> Vec<u8> {
    let key = super::format::open_or_create(&config.dir, true, &super::Stats::default()).unwrap();
    record::encode_entry(group, entry).unwrap().seal(seg, key)
}

/// The path of segment `seq` of the log of `config`.
pub(super) fn segment_path(config: &LogStoreConfig, seq: u64) -> PathBuf {
    config.dir.join(segment::file_name(seq))
}

/// The segment files of `config`'s log, by number.
pub(super) fn segment_seqs(config: &LogStoreConfig) -> Vec<u64> {
    segment::list(&config.dir)
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
}

/// Asserts the group's log reads exactly `from..=to` as written by [`entries`].
pub(super) fn assert_holds(store: &LogStore, from: u64, to: u64) {
    let reader = store.reader();
    for index in from..=to {
        assert_eq!(
            reader.entry(index).unwrap(),
            Some(entry(1, index, 50)),
            "group {} index {index}",
            store.group_id()
        );
    }
    assert_eq!(reader.entry(to + 1).unwrap(), None);
    if from > 0 {
        assert_eq!(reader.entry(from - 1).unwrap(), None);
    }
    assert_eq!(
        reader.entries(0, u64::MAX, u64::MAX).unwrap(),
        entries(from, to)
    );
    let stats = store.stats();
    assert_eq!(
        (stats.first_index, stats.last_index),
        (Some(from), Some(to)),
        "group {}",
        store.group_id()
    );
}
