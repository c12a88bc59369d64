//! Damaged files: a torn tail is cut off; a flipped byte anywhere else refuses the open;
//! a flipped byte found by a reader is an error, never a wrong entry.

use std::io::Write;
use std::os::unix::fs::FileExt;

use openraft::RaftLogReader;

use super::super::{record, LogStore, LogStoreConfig, LogStoreError};
use super::{
    append, assert_holds, config, entries, entry, record_len, segment_firsts, segment_path,
};

/// The byte offset of record `index` in a segment of 50-byte entries starting at `first`.
fn offset_of(first: u64, index: u64) -> u64 {
    (first..index).map(|i| record_len(&entry(1, i, 50))).sum()
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

async fn store_with(config: &LogStoreConfig, to: u64) {
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, to)).await;
}

#[tokio::test]
async fn a_record_cut_short_at_the_end_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    store_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 1, 9);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), offset_of(1, 10));
    append(&store, entries(10, 12)).await;
    drop(store);
    let store = LogStore::open(config).await.unwrap();
    assert_holds(&store, 1, 12);
}

#[tokio::test]
async fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    store_with(&config, 10).await;
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

    let store = LogStore::open(config.clone()).await.unwrap();
    assert_holds(&store, 1, 10);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), offset_of(1, 11));
}

#[tokio::test]
async fn zeros_after_the_last_record_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    store_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();

    let store = LogStore::open(config).await.unwrap();
    assert_holds(&store, 1, 10);
}

#[tokio::test]
async fn a_flipped_byte_before_an_intact_record_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    store_with(&config, 10).await;
    let path = segment_path(&config, 1);
    let offset = offset_of(1, 5);
    flip_byte(&path, offset + record::HEADER_LEN as u64 + 7);

    let err = LogStore::open(config).await.unwrap_err();
    match &err {
        LogStoreError::Corrupt {
            file,
            offset: at,
            index,
            ..
        } => {
            assert_eq!((file, *at, *index), (&path, offset, 5));
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&format!("byte offset {offset}")),
        "{message}"
    );
    assert!(message.contains("log index 5"), "{message}");
    assert!(
        message.contains("move the data directory away"),
        "{message}"
    );
}

#[tokio::test]
async fn a_flipped_length_field_before_an_intact_record_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    store_with(&config, 10).await;
    let path = segment_path(&config, 1);
    flip_byte(&path, offset_of(1, 8) + 1);

    let err = LogStore::open(config).await.unwrap_err();
    assert!(
        matches!(err, LogStoreError::Corrupt { index: 8, .. }),
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
    store_with(&config, 40).await;
    let firsts = segment_firsts(&config);
    assert!(firsts.len() >= 3);
    // The last record of the first segment.
    let last_of_first = firsts[1] - 1;
    let offset = offset_of(1, last_of_first);
    flip_byte(&segment_path(&config, 1), offset + 30);

    let err = LogStore::open(config).await.unwrap_err();
    match err {
        LogStoreError::Corrupt {
            offset: at, index, ..
        } => assert_eq!((at, index), (offset, last_of_first)),
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
    store_with(&config, 40).await;
    let firsts = segment_firsts(&config);
    std::fs::remove_file(segment_path(&config, firsts[1])).unwrap();

    let err = LogStore::open(config).await.unwrap_err();
    assert!(
        matches!(err, LogStoreError::Corrupt { offset: 0, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_reader_never_returns_a_damaged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogStoreConfig {
        cache_bytes_max: 0,
        ..config(dir.path())
    };
    let store = LogStore::open(config.clone()).await.unwrap();
    append(&store, entries(1, 10)).await;
    let offset = offset_of(1, 3);
    flip_byte(
        &segment_path(&config, 1),
        offset + record::HEADER_LEN as u64 + 3,
    );

    let reader = store.reader();
    match reader.entry(3) {
        Err(LogStoreError::Corrupt {
            offset: at,
            index: 3,
            ..
        }) => assert_eq!(at, offset),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(reader.entry(4).unwrap(), Some(entry(1, 4, 50)));
    assert!(reader.clone().try_get_log_entries(1..11).await.is_err());
    assert!(reader.clone().try_get_log_entries(4..11).await.is_ok());
}
