//! The metadata group's state machine: the cluster map, replicated.
//!
//! Owns: the [`ClusterMap`] as of the last applied entry of group 0, its snapshots
//! (`DIR/current.snap`: CRC + rkyv [`MetaSnapshot`]), and a watch channel that tells the
//! node every new version of the map.
//! Must not: act on the map (the node's reconciler starts and stops groups; the meta
//! leader's driver plans moves); read a clock.

// openraft's trait methods return its `StorageError` (224 bytes).
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use herald_client::wire::{Refusal, RefusalCode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use rkyv::{Archive, Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster_map::{ClusterMap, MapImage};
use crate::raft::codec::{self, WireLogId, WireStoredMembership};
use crate::raft::state_machine::{checked_body, persist_snapshot, SnapshotError};
use crate::raft::{Entry, LogId, NodeId, Outcome, Response, StorageError, TypeConfig};
use crate::store::Command;

/// What a metadata snapshot carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MetaSnapshot {
    /// The last entry it includes.
    pub last_applied: Option<WireLogId>,
    /// The metadata group's membership as of that entry.
    pub membership: WireStoredMembership,
    /// Unique per build.
    pub snapshot_id: String,
    /// The map.
    pub map: MapImage,
}

/// Bound on a metadata snapshot (a map of 4096 nodes and groups is far below).
pub const META_SNAPSHOT_BYTES_MAX: usize = 64 << 20;

/// The header of a metadata snapshot's data (see [`codec::encode_snapshot`]).
const META_SNAPSHOT_MAGIC: &[u8; 8] = b"HRLDMETA";

/// The metadata snapshot format this build writes and reads. 2: the header; 1 (no
/// header): the same body.
const META_SNAPSHOT_FORMAT: u32 = 2;

/// The latest snapshot: its meta and bytes.
type CurrentSnapshot = (SnapshotMeta<NodeId, BasicNode>, Arc<Vec<u8>>);

struct State {
    map: ClusterMap,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    current: Option<CurrentSnapshot>,
    builds: u64,
}

struct Shared {
    state: Mutex<State>,
    map_tx: watch::Sender<Arc<ClusterMap>>,
    dir: PathBuf,
    /// Held while `current.snap` is written and published as `current`, by a build and
    /// by an install: openraft runs a build as a task of its own, so an install can
    /// land while a build is under way, and the older build must not replace it.
    snapshot_file: Mutex<()>,
}

/// The metadata group's state machine (cheap to clone).
#[derive(Clone)]
pub struct MetaStateMachine {
    shared: Arc<Shared>,
}

fn sm_error(what: &str) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(what.to_string())).into()
}

impl MetaStateMachine {
    /// Opens the state machine in `dir`, from its snapshot if there is one.
    pub fn open(dir: PathBuf) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(&dir).map_err(|source| SnapshotError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut state = State {
            map: ClusterMap::default(),
            last_applied: None,
            membership: StoredMembership::default(),
            current: None,
            builds: 0,
        };
        let path = dir.join("current.snap");
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io {
                path: path.clone(),
                source,
            })?;
            let corrupt = |detail: String| SnapshotError::Corrupt {
                path: path.clone(),
                detail,
            };
            let data = checked_body(&bytes)
                .ok_or_else(|| corrupt("CRC mismatch or file shorter than its header".into()))?;
            let (loaded, meta) = load(data).map_err(corrupt)?;
            state.map = loaded.map;
            state.last_applied = loaded.last_applied;
            state.membership = loaded.membership;
            state.current = Some((meta, Arc::new(data.to_vec())));
        }
        let (map_tx, _) = watch::channel(Arc::new(state.map.clone()));
        Ok(MetaStateMachine {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                map_tx,
                dir,
                snapshot_file: Mutex::new(()),
            }),
        })
    }

    /// The map as of the last applied entry.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.shared.map_tx.borrow().clone()
    }

    /// Follows every new version of the map.
    pub fn map_watch(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.shared.map_tx.subscribe()
    }

    /// The last applied log index (0 before anything).
    pub fn applied_index(&self) -> u64 {
        self.shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.last_applied.map(|l| l.index))
            .unwrap_or(0)
    }

    /// The latest snapshot's last index, if any (the log may be purged up to it).
    pub fn snapshot_index(&self) -> Option<u64> {
        let state = self.shared.state.lock().ok()?;
        state.current.as_ref()?.0.last_log_id.map(|l| l.index)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        self.shared
            .state
            .lock()
            .map_err(|_| sm_error("metadata state lock poisoned by a panic"))
    }

    fn publish(&self, state: &State) {
        if self.shared.map_tx.borrow().version() != state.map.version() {
            self.shared.map_tx.send_replace(Arc::new(state.map.clone()));
        }
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, data) = {
            let mut state = self.lock()?;
            state.builds += 1;
            let snapshot_id = match state.last_applied {
                Some(l) => format!("meta-{}-{}-{}", l.leader_id.term, l.index, state.builds),
                None => format!("meta-0-0-{}", state.builds),
            };
            let snapshot = MetaSnapshot {
                last_applied: state.last_applied.as_ref().map(WireLogId::from),
                membership: WireStoredMembership::from(&state.membership),
                snapshot_id: snapshot_id.clone(),
                map: state.map.image(),
            };
            let data = codec::encode_snapshot(META_SNAPSHOT_MAGIC, META_SNAPSHOT_FORMAT, &snapshot)
                .map_err(|e| sm_error(&e.to_string()))?;
            if data.len() > META_SNAPSHOT_BYTES_MAX {
                return Err(sm_error("the metadata snapshot is above its bound"));
            }
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id,
            };
            (meta, data)
        };
        let _file = self
            .shared
            .snapshot_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((newer, newer_data)) = self
            .lock()?
            .current
            .clone()
            .filter(|(newer, _)| newer.last_log_id > meta.last_log_id)
        {
            // An install overtook this build: the installed snapshot is the one to keep.
            return Ok(Snapshot {
                meta: newer,
                snapshot: Box::new(Cursor::new(newer_data.to_vec())),
            });
        }
        persist_snapshot(&self.shared.dir, &data)?;
        let data = Arc::new(data);
        self.lock()?.current = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        })
    }
}

/// A loaded snapshot: the state it restores.
struct Loaded {
    map: ClusterMap,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
}

fn load(data: &[u8]) -> Result<(Loaded, SnapshotMeta<NodeId, BasicNode>), String> {
    let snapshot: MetaSnapshot =
        codec::decode_snapshot("metadata", META_SNAPSHOT_MAGIC, META_SNAPSHOT_FORMAT, data)
            .map_err(|e| e.to_string())?;
    let map = ClusterMap::from_image(snapshot.map)?;
    let last_applied = snapshot.last_applied.map(LogId::from);
    let membership: StoredMembership<NodeId, BasicNode> = snapshot.membership.into();
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership.clone(),
        snapshot_id: snapshot.snapshot_id,
    };
    Ok((
        Loaded {
            map,
            last_applied,
            membership,
        },
        meta,
    ))
}

impl RaftStateMachine<TypeConfig> for MetaStateMachine {
    type SnapshotBuilder = MetaStateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.lock()?;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let this = self.clone();
        let mut state = this.lock()?;
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            responses.push(match entry.payload {
                EntryPayload::Blank => vec![Ok(Outcome::Changed)],
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    vec![Ok(Outcome::Changed)]
                }
                EntryPayload::Normal(commands) => commands
                    .iter()
                    .cloned()
                    .map(|command| match command {
                        Command::Meta(change) => state.map.apply(change).map(|()| Outcome::Changed),
                        _ => Err(Refusal::new(
                            RefusalCode::Internal,
                            "a conversation command reached the metadata group; this is a bug",
                        )),
                    })
                    .collect::<Vec<Response>>(),
            });
        }
        this.publish(&state);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
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
        if data.len() > META_SNAPSHOT_BYTES_MAX {
            return Err(sm_error("refusing a metadata snapshot above its bound"));
        }
        let (loaded, _) = load(&data)
            .map_err(|e| sm_error(&format!("the leader sent a bad metadata snapshot: {e}")))?;
        let _file = self
            .shared
            .snapshot_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        persist_snapshot(&self.shared.dir, &data)?;
        let mut state = self.lock()?;
        state.map = loaded.map;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.current = Some((meta.clone(), Arc::new(data)));
        self.publish(&state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.lock()?.current.clone();
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MetaStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(|e| sm_error(&format!("metadata snapshot build failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_map::MetaCommand;
    use openraft::CommittedLeaderId;

    fn entry(index: u64, command: MetaCommand) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Meta(command)])),
        }
    }

    #[tokio::test]
    async fn the_map_is_applied_watched_and_survives_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = MetaStateMachine::open(dir.path().to_owned()).unwrap();
        let mut watch = sm.map_watch();
        let members = (1..=3)
            .map(|id| (id, format!("127.0.0.1:74{id}0")))
            .collect();
        let initial = ClusterMap::initial(&members, 6, 3).unwrap();
        let out = sm
            .apply(vec![
                entry(1, MetaCommand::Bootstrap(initial.image())),
                entry(
                    2,
                    MetaCommand::AddNode {
                        id: 4,
                        addr: "127.0.0.1:7440".into(),
                    },
                ),
                entry(3, MetaCommand::RemoveNode { id: 1 }),
            ])
            .await
            .unwrap();
        assert!(out[0][0].is_ok() && out[1][0].is_ok());
        assert!(out[2][0].is_err(), "node 1 still holds replicas");
        watch.changed().await.unwrap();
        let map = watch.borrow().clone();
        assert_eq!(map.groups(), initial.groups());
        assert!(map.nodes().contains_key(&4));

        sm.build_snapshot().await.unwrap();
        let reopened = MetaStateMachine::open(dir.path().to_owned()).unwrap();
        assert_eq!(*reopened.map(), *map);
        assert_eq!(reopened.applied_index(), 3);
    }
}
