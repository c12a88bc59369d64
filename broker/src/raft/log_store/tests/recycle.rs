//! Recycled segment files: a retired segment becomes a later one, its old records read as
//! the end of the log, and damage inside a recycled segment is still damage.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::super::{record, segment, writer, LogStoreConfig, LogStoreError};
use super::{append, assert_holds, config, entries, log_id, open, segment_path, segment_seqs};

/// The inodes of the spare files in the log directory.
fn spare_inodes(config: &LogStoreConfig) -> BTreeSet<u64> {
    segment::list_spares(&config.dir)
        .unwrap()
        .into_iter()
        .map(|(_, path)| std::fs::metadata(path).unwrap().ino())
        .collect()
}

fn inode(config: &LogStoreConfig, seq: u64) -> u64 {
    std::fs::metadata(segment_path(config, seq)).unwrap().ino()
}

/// Appends 10 entries at a time, keeps the last 20, reopens after every step; with 2 KiB
/// segments nearly every step rolls into a recycled file. Returns how many steps ended
/// with the newest segment a recycled file.
async fn append_purge_reopen(config: &LogStoreConfig, steps: u64) -> usize {
    let mut former_spares = BTreeSet::new();
    let mut recycled_newest = 0;
    for step in 0..steps {
        let wal = open(config).await;
        let a = wal.group(1);
        let (first, last) = (step * 10 + 1, step * 10 + 10);
        append(&a, entries(first, last)).await;
        if last > 20 {
            openraft::storage::RaftLogStorage::purge(&mut a.clone(), log_id(1, last - 20))
                .await
                .unwrap();
        }
        former_spares.extend(spare_inodes(config));
        assert!(
            former_spares.len() <= 2 * steps as usize,
            "inodes are reused, not created without end"
        );
        let spares = segment::list_spares(&config.dir).unwrap().len();
        assert!(spares <= writer::SPARE_SEGMENTS_MAX, "{spares} spares");
        let seqs = segment_seqs(config);
        let newest = *seqs.last().unwrap();
        if former_spares.contains(&inode(config, newest)) {
            recycled_newest += 1;
        }
        drop((wal, a));
        let wal = open(config).await;
        assert_holds(&wal.group(1), last.saturating_sub(19).max(1), last);
    }
    recycled_newest
}

/// 30 append/purge/reopen steps with 2 KiB segments: at least 10 must end in a
/// recycled file, and every reopen must read exactly the live entries.
async fn thirty_steps_recycle(simulate_power_loss: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        simulate_power_loss,
        ..config(dir.path())
    };
    let recycled = append_purge_reopen(&config, 30).await;
    assert!(
        recycled >= 10,
        "only {recycled} of 30 steps ended in a recycled file"
    );
}

#[tokio::test]
async fn retired_segments_become_new_ones_and_their_old_records_read_as_the_end() {
    thirty_steps_recycle(false).await;
}

#[tokio::test]
async fn recycling_survives_simulated_power_loss() {
    thirty_steps_recycle(true).await;
}

/// A recycled file holds valid-looking records of its previous life after its own; a
/// flipped byte among its own records must still refuse the open, not be taken for the
/// end of the log.
#[tokio::test]
async fn a_flipped_byte_in_a_recycled_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 2048,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let a = wal.group(1);
    let mut spares = BTreeSet::new();
    let mut newest = 0;
    for step in 0..20u64 {
        append(&a, entries(step * 10 + 1, step * 10 + 10)).await;
        if step >= 2 {
            openraft::storage::RaftLogStorage::purge(&mut a.clone(), log_id(1, step * 10 - 10))
                .await
                .unwrap();
        }
        spares.extend(spare_inodes(&config));
        newest = *segment_seqs(&config).last().unwrap();
        if step > 5 && spares.contains(&inode(&config, newest)) {
            break;
        }
    }
    assert!(
        spares.contains(&inode(&config, newest)),
        "no step ended in a recycled file"
    );
    drop((wal, a));
    // The newest segment starts with the roll's checkpoint (the purge point), then
    // entries: damage the first record's body.
    let path = segment_path(&config, newest);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xff], record::HEADER_LEN as u64 + 3)
        .unwrap();
    drop(file);
    match super::super::Wal::open(config.clone()).await {
        Err(LogStoreError::Corrupt {
            file,
            offset: 0,
            reason,
            ..
        }) => {
            assert_eq!(file, path);
            assert!(reason.contains("intact record follows"), "{reason}");
        }
        other => panic!("expected Corrupt at offset 0, got {other:?}"),
    }
}
