//! openraft's storage test suite against [`LogStore`], with a minimal in-memory state
//! machine ([`TestSm`]) that the suite needs alongside.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    AnyError, BasicNode, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use rkyv::{Archive, Deserialize, Serialize};

use super::super::{LogStore, LogStoreConfig, LogStoreError};
use crate::raft::codec::{self, WireLogId, WireStoredMembership};
use crate::raft::{Entry, LogId, NodeId, Outcome, Response, StorageError, TypeConfig};

/// What a [`TestSm`] snapshot holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct SnapshotBody {
    last_applied: Option<WireLogId>,
    membership: WireStoredMembership,
}

#[derive(Default)]
struct SmState {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// A minimal in-memory state machine: tracks the last applied log id and membership;
/// a snapshot is the rkyv form of both.
#[derive(Clone, Default)]
pub(crate) struct TestSm {
    state: Arc<Mutex<SmState>>,
}

impl TestSm {
    fn lock(&self) -> std::sync::MutexGuard<'_, SmState> {
        self.state.lock().unwrap()
    }
}

fn sm_error(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

impl RaftSnapshotBuilder<TypeConfig> for TestSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut state = self.lock();
        let body = SnapshotBody {
            last_applied: state.last_applied.as_ref().map(WireLogId::from),
            membership: WireStoredMembership::from(&state.membership),
        };
        let data = codec::encode(&body).map_err(sm_error)?.to_vec();
        state.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("snapshot-{}", state.snapshots_built),
        };
        state.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for TestSm {
    type SnapshotBuilder = TestSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.lock();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.lock();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(membership) = entry.payload {
                state.membership = StoredMembership::new(Some(entry.log_id), membership);
            }
            responses.push(vec![Ok(Outcome::Changed)]);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> TestSm {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let body = codec::decode::<SnapshotBody>(&data).map_err(sm_error)?;
        let mut state = self.lock();
        state.last_applied = body.last_applied.map(LogId::from);
        state.membership = StoredMembership::from(body.membership);
        state.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.lock().snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

/// Keeps the store's temp directory alive for one suite test.
pub(crate) struct TempDirGuard(#[allow(dead_code)] tempfile::TempDir);

/// Opens a fresh store in a new temp directory for every suite test.
struct Builder {
    segment_bytes_max: u64,
    cache_bytes_max: usize,
}

impl StoreBuilder<TypeConfig, LogStore, TestSm, TempDirGuard> for Builder {
    async fn build(&self) -> Result<(TempDirGuard, LogStore, TestSm), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        let store = LogStore::open(LogStoreConfig {
            dir: dir.path().join("log"),
            segment_bytes_max: self.segment_bytes_max,
            cache_bytes_max: self.cache_bytes_max,
            simulate_power_loss: false,
        })
        .await
        .map_err(LogStoreError::write_logs)?;
        Ok((TempDirGuard(dir), store, TestSm::default()))
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

/// Herald's real pair: the log store with the conversation state machine
/// (snapshots carry conversations and history).
struct HeraldBuilder;

impl StoreBuilder<TypeConfig, LogStore, crate::raft::state_machine::StateMachine, TempDirGuard>
    for HeraldBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDirGuard,
            LogStore,
            crate::raft::state_machine::StateMachine,
        ),
        StorageError,
    > {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        let store = LogStore::open(LogStoreConfig {
            dir: dir.path().join("log"),
            ..LogStoreConfig::default()
        })
        .await
        .map_err(LogStoreError::write_logs)?;
        let sm = crate::raft::state_machine::StateMachine::open(
            crate::raft::state_machine::StateMachineConfig {
                dir: dir.path().join("snapshot"),
                limits: crate::store::StoreLimits::default(),
            },
            Arc::new(crate::routing::Router::new()),
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(store.reader()),
        )
        .map_err(sm_error)?;
        Ok((TempDirGuard(dir), store, sm))
    }
}

/// openraft's suite against the log store and the real state machine.
#[test]
fn openraft_storage_suite_passes_with_the_conversation_state_machine() {
    Suite::test_all(HeraldBuilder).unwrap();
}
