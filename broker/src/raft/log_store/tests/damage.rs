//! Damaged files: a torn tail is cut off; a flipped byte anywhere else refuses the open,
//! naming the file, offset, group and index; a flipped byte found by a reader is an
//! error, never a wrong entry.

use std::io::Write;
use std::os::unix::fs::FileExt;

use openraft::RaftLogReader;

use super::super::{record, LogStoreConfig, LogStoreError, Wal};
use super::{
    append, assert_holds, config, entries, entry, open, record_len, sealed_entry, segment_path,
    segment_seqs,
};

/// The byte offset of record `index` in a first segment of 50-byte entries from 1.
fn offset_of(index: u64) -> u64 {
    (1..index).map(|i| record_len(&entry(1, i, 50))).sum()
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x20;
    file.write_all_at(&byte, offset).unwrap();
}

/// A log whose group 3 holds entries 1..=to.
async fn log_with(config: &LogStoreConfig, to: u64) {
    let wal = open(config).await;
    append(&wal.group(3), entries(1, to)).await;
}

#[tokio::test]
async fn a_record_cut_short_at_the_end_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    log_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let wal = open(&config).await;
    assert_holds(&wal.group(3), 1, 9);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), offset_of(10));
    append(&wal.group(3), entries(10, 12)).await;
    drop(wal);
    let wal = open(&config).await;
    assert_holds(&wal.group(3), 1, 12);
}

#[tokio::test]
async fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    log_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let garbage: Vec<u8> = (0..300u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    file.write_all(&garbage).unwrap();
    drop(file);

    let wal = open(&config).await;
    assert_holds(&wal.group(3), 1, 10);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), offset_of(11));
}

#[tokio::test]
async fn zeros_after_the_last_record_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    log_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();

    let wal = open(&config).await;
    assert_holds(&wal.group(3), 1, 10);
}

#[tokio::test]
async fn a_flipped_byte_before_an_intact_record_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    log_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let offset = offset_of(5);
    flip_byte(&path, offset + record::HEADER_LEN as u64 + 7);

    let err = Wal::open(config).await.unwrap_err();
    match &err {
        LogStoreError::Corrupt {
            file,
            offset: at,
            group,
            index,
            ..
        } => {
            assert_eq!((file, *at, *group, *index), (&path, offset, 3, 5));
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&format!("byte offset {offset}")),
        "{message}"
    );
    assert!(message.contains("group 3, log index 5"), "{message}");
    assert!(message.contains("CRC mismatch"), "{message}");
    assert!(
        message.contains("move the data directory away"),
        "{message}"
    );
}

#[tokio::test]
async fn a_flipped_length_field_before_an_intact_record_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    log_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let offset = offset_of(8);
    flip_byte(&path, offset + 1);

    let err = Wal::open(config).await.unwrap_err();
    assert!(
        matches!(err, LogStoreError::Corrupt { offset: at, index: 8, .. } if at == offset),
        "{err}"
    );
}

#[tokio::test]
async fn damage_at_the_end_of_an_older_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 1024,
        ..config(dir.path())
    };
    log_with(&config, 40).await;
    assert!(segment_seqs(&config).len() >= 3);
    // The last record of the first segment.
    let path = segment_path(&config, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    let last_len = record_len(&entry(1, 1, 50));
    flip_byte(&path, len - last_len + 40);

    let err = Wal::open(config).await.unwrap_err();
    match err {
        LogStoreError::Corrupt {
            file,
            offset: at,
            reason,
            ..
        } => {
            assert_eq!((file, at), (path, len - last_len));
            assert!(reason.contains("not the last"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[tokio::test]
async fn a_missing_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        segment_bytes_max: 1024,
        ..config(dir.path())
    };
    log_with(&config, 40).await;
    let seqs = segment_seqs(&config);
    std::fs::remove_file(segment_path(&config, seqs[1])).unwrap();

    let err = Wal::open(config).await.unwrap_err();
    match err {
        LogStoreError::Corrupt { reason, .. } => {
            assert!(
                reason.contains(&format!("segment {} is missing", seqs[1])),
                "{reason}"
            )
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[tokio::test]
async fn a_reader_never_returns_a_damaged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        cache_bytes_max: 0,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let store = wal.group(3);
    append(&store, entries(1, 10)).await;
    let offset = offset_of(3);
    flip_byte(
        &segment_path(&config, 1),
        offset + record::HEADER_LEN as u64 + 3,
    );

    let reader = store.reader();
    match reader.entry(3) {
        Err(LogStoreError::Corrupt {
            offset: at,
            group: 3,
            index: 3,
            ..
        }) => assert_eq!(at, offset),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(reader.entry(4).unwrap(), Some(entry(1, 4, 50)));
    assert!(reader.clone().try_get_log_entries(1..11).await.is_err());
    assert!(reader.clone().try_get_log_entries(4..11).await.is_ok());
}

#[tokio::test]
async fn a_reader_never_returns_another_groups_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        cache_bytes_max: 0,
        ..config(dir.path())
    };
    let wal = open(&config).await;
    let (a, b) = (wal.group(1), wal.group(2));
    append(&a, entries(1, 3)).await;
    append(&b, entries(1, 3)).await;
    // Rewrite a's record 2 as a valid record of group 2 (same length, good CRC): a read
    // of a's index 2 must notice whose record it is.
    let path = segment_path(&config, 1);
    let forged = sealed_entry(&config, 1, 2, &entry(1, 2, 50));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&forged, offset_of(2)).unwrap();
    match a.reader().entry(2) {
        Err(LogStoreError::Corrupt {
            group: 1,
            index: 2,
            reason,
            ..
        }) => {
            assert!(reason.contains("group 2"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
