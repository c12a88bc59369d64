//! openraft's storage test suite against one group's [`LogStore`] together with Herald's
//! real conversation state machine (snapshots carry conversations and history). The
//! shared log also holds another group's entries, appended before every suite test, so
//! the group's view must skip them.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageIOError};

use super::super::{LogStore, LogStoreConfig, LogStoreError, Wal};
use crate::raft::state_machine::{StateMachine, StateMachineConfig};
use crate::raft::{StorageError, TypeConfig};

/// Keeps the store's temp directory alive for one suite test.
pub(crate) struct TempDirGuard(#[allow(dead_code)] tempfile::TempDir);

/// Opens a fresh store and state machine in a new temp directory for every suite test.
struct Builder {
    segment_bytes_max: u64,
    cache_bytes_max: usize,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDirGuard> for Builder {
    async fn build(&self) -> Result<(TempDirGuard, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        let wal = Wal::open(LogStoreConfig {
            dir: dir.path().join("wal"),
            segment_bytes_max: self.segment_bytes_max,
            cache_bytes_max: self.cache_bytes_max,
            simulate_power_loss: false,
            ..LogStoreConfig::default()
        })
        .await
        .map_err(LogStoreError::write_logs)?;
        // A neighbour group, so the suite's group shares segments with another.
        let neighbour = wal.group(9);
        neighbour
            .append_notify(super::entries(1, 20))
            .await
            .map_err(LogStoreError::write_logs)?
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)))?
            .map_err(LogStoreError::write_logs)?;
        let store = wal.group(1);
        let sm = StateMachine::open(
            StateMachineConfig {
                group: 1,
                dir: dir.path().join("snapshot"),
                limits: crate::store::StoreLimits::default(),
            },
            crate::fanout::Hub::new(Arc::new(crate::routing::Router::new())),
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(store.reader()),
        )
        .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
        Ok((TempDirGuard(dir), store, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    let defaults = LogStoreConfig::default();
    Suite::test_all(Builder {
        segment_bytes_max: defaults.segment_bytes_max,
        cache_bytes_max: defaults.cache_bytes_max,
    })
    .unwrap();
}

/// The same with segments of about two records and no cache: every read is a
/// CRC-checked `pread`, and truncate and purge cross segment boundaries.
#[test]
fn openraft_storage_suite_passes_with_tiny_segments_and_no_cache() {
    Suite::test_all(Builder {
        segment_bytes_max: 256,
        cache_bytes_max: 0,
    })
    .unwrap();
}
