//! [`LogSpans`](super::super::LogSpans): which group keeps the oldest segments alive.

use openraft::storage::RaftLogStorage;

use super::super::LogStoreConfig;
use super::{append, config, entries, log_id, open};

#[tokio::test]
async fn a_quiet_group_with_an_old_entry_pins_every_segment_until_it_purges() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (quiet, busy) = (wal.group(1), wal.group(2));
    append(&quiet, entries(1, 2)).await;
    // The busy group writes on and keeps only its last 10 entries.
    for step in 0..10 {
        let (first, last) = (step * 10 + 1, step * 10 + 10);
        append(&busy, entries(first, last)).await;
        if last > 10 {
            busy.clone().purge(log_id(1, last - 10)).await.unwrap();
        }
    }
    let before = wal.spans();
    assert!(before.segments() >= 3, "{before:?}");
    assert_eq!(before.oldest(), quiet.segment_of(1), "{before:?}");
    assert_eq!(before.pinning_oldest(), vec![1], "{before:?}");
    assert_eq!(before.spanned_segments[&1], before.segments());
    assert!(
        before.spanned_segments[&2] < before.segments(),
        "{before:?}"
    );
    assert_eq!(
        before.bytes_before(before.numbers[1]),
        before.lengths_bytes[0],
        "{before:?}"
    );
    assert_eq!(
        before.bytes_before(u64::MAX),
        wal.stats().bytes_on_disk,
        "{before:?}"
    );
    assert_eq!(busy.segment_of(1), None, "purged entries have no segment");
    assert_eq!(busy.segment_of(101), None, "nor do entries not written yet");

    quiet.clone().purge(log_id(1, 2)).await.unwrap();
    let after = wal.spans();
    assert!(
        after.segments() < before.segments(),
        "{before:?} → {after:?}"
    );
    assert!(!after.spanned_segments.contains_key(&1), "{after:?}");
    assert_eq!(after.pinning_oldest(), vec![2], "{after:?}");
    assert_eq!(after.oldest(), busy.segment_of(91), "{after:?}");
}
