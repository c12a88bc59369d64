//! The conversation store as an openraft state machine.
//!
//! Owns: the replica's [`ConversationStore`], the last applied log id and membership,
//! local fan-out of every newly appended message (every replica applies the log and
//! pushes to its own sessions), history reads (resolving [`MessageRef`]s against the
//! Raft log or the snapshot this replica was built from), and snapshots: building,
//! persisting (`DIR/current.snap`), loading at start and installing from the leader
//! (building, writing and decoding snapshots live in `snapshot`).
//!
//! Must not: read a clock or decide anything a replica could decide differently: the
//! store is deterministic and every input comes from the log. Fan-out happens under
//! the state lock, so outboxes receive each conversation's messages in seq order; the
//! router never blocks, so the lock is held for microseconds per message.
//!
//! # Snapshot format
//!
//! ```text
//! current.snap:  +----------------+-----------------------------------------+
//!                | u32 LE crc32   | rkyv SnapshotImage (the transferred data) |
//!                +----------------+-----------------------------------------+
//! SnapshotImage { last_applied, membership, snapshot_id,
//!                 store: StoreImage (every ref is Snapshot(j)),
//!                 messages: [Message; n] (message j of the refs) }
//! ```
//!
//! A snapshot carries every retained message, so a replica that installs it serves
//! history without the log entries it replaces. Those messages stay in memory (the
//! "snapshot source") until the next restart; messages applied from the log are read
//! back from the log.

// openraft's trait methods return its `StorageError` (224 bytes); the helpers here
// return the same type so `?` carries it through unchanged.
#![allow(clippy::result_large_err)]

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use herald_client::wire::{Message, Refusal, RefusalCode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use rkyv::{Archive, Deserialize, Serialize};

use super::codec::{self, WireLogId, WireStoredMembership};
use super::{Entry, GroupId, LogId, NodeId, Outcome, Response, StorageError, TypeConfig};
use crate::fanout::watchers::{PushBatch, Watcher, WatcherTable};
use crate::fanout::Hub;
use crate::metrics::{GroupLabel, Metrics};
use crate::raft::network::watch::WatchEvent;
use crate::store::{
    Applied, Command, ConversationStore, History, Location, MessageRef, StoreImage, StoreLimits,
    StoredMessage,
};

/// Largest snapshot this node builds or accepts, in bytes. At the bound a build fails
/// (openraft retries later) and an install is refused: shorten retention.
pub const SNAPSHOT_BYTES_MAX: usize = 2 << 30;

/// Reads a log entry by index: how history finds messages that live in the Raft log.
pub trait EntrySource: Send + Sync + 'static {
    /// The entry at `index`; `Ok(None)` when it is purged or not yet written.
    fn entry(&self, index: u64) -> Result<Option<Entry>, String>;
}

/// The state machine's on-disk place and bounds.
#[derive(Debug, Clone)]
pub struct StateMachineConfig {
    /// The group this state machine belongs to (labels its metrics).
    pub group: GroupId,
    /// Where `current.snap` lives (created if missing).
    pub dir: PathBuf,
    /// The store's bounds (every replica must use the same).
    pub limits: StoreLimits,
}

/// A cheap handle to one replica's state machine, shared by openraft (apply) and the
/// engine (reads).
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    hub: Arc<Hub>,
    /// True while this replica leads its group: only then does apply fan out.
    leader: AtomicBool,
    /// Follows `leader` (watch streams end when it turns false).
    leader_tx: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    log: Arc<dyn EntrySource>,
    dir: PathBuf,
    limits: StoreLimits,
    group: GroupId,
    /// Held while `current.snap` is written and published as `current`, by a build
    /// and by an install: openraft runs a build as a task of its own, so an install
    /// can land while a build is under way (and openraft purges the log behind it as
    /// soon as it queues the install), and then the build must not replace the newer
    /// snapshot (see [`StateMachine::build`]).
    snapshot_file: Mutex<()>,
    /// Signalled (with `snapshot_file` held) once an install has published its
    /// snapshot: a build whose reads failed waits for it.
    snapshot_installed: Condvar,
}

struct State {
    store: ConversationStore,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// Messages of the snapshot this replica installed or loaded; `Location::Snapshot(j)`
    /// refers to `snapshot_messages[j]`.
    snapshot_messages: Arc<Vec<Message>>,
    /// The latest snapshot built or installed: what a lagging follower is sent.
    current: Option<CurrentSnapshot>,
    /// While a snapshot is being built: the lowest log index its messages live in.
    /// Herald's own purges stay below it until the build is done (openraft's purge
    /// behind an installed snapshot does not ask: see [`StateMachine::build`]).
    building_floor: Option<u64>,
    /// Nodes watching this group's conversations (while this replica leads).
    watchers: WatcherTable,
}

impl State {
    /// The lowest log index history (or a snapshot being built) still reads.
    fn history_floor(&self) -> Option<u64> {
        match (self.store.min_log_index(), self.building_floor) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Arc<Vec<u8>>,
}

/// A state lock poisoned by a panic, or a bad snapshot, as openraft's storage error.
fn sm_error(what: &str) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(what.to_string())).into()
}

impl StateMachine {
    /// Opens the state machine: loads `DIR/current.snap` if there is one (CRC and every
    /// invariant checked), else starts empty.
    pub fn open(
        config: StateMachineConfig,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        log: Arc<dyn EntrySource>,
    ) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(&config.dir).map_err(|source| SnapshotError::Io {
            path: config.dir.clone(),
            source,
        })?;
        let mut state = State {
            store: ConversationStore::new(config.limits),
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_messages: Arc::new(Vec::new()),
            current: None,
            building_floor: None,
            watchers: WatcherTable::default(),
        };
        let path = config.dir.join("current.snap");
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io {
                path: path.clone(),
                source,
            })?;
            let data = checked_body(&bytes).ok_or_else(|| SnapshotError::Corrupt {
                path: path.clone(),
                detail: "CRC mismatch or file shorter than its header".into(),
            })?;
            let (loaded, meta) =
                load_image(data, config.limits).map_err(|detail| SnapshotError::Corrupt {
                    path: path.clone(),
                    detail,
                })?;
            state = loaded;
            state.current = Some(CurrentSnapshot {
                meta,
                data: Arc::new(data.to_vec()),
            });
        }
        Ok(StateMachine {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                hub,
                leader: AtomicBool::new(false),
                leader_tx: watch::channel(false).0,
                metrics,
                log,
                dir: config.dir,
                limits: config.limits,
                group: config.group,
                snapshot_file: Mutex::new(()),
                snapshot_installed: Condvar::new(),
            }),
        })
    }

    /// True while this replica leads its group (then apply fans out).
    pub fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::Acquire)
    }

    /// Follows [`StateMachine::is_leader`].
    pub fn leader_watch(&self) -> watch::Receiver<bool> {
        self.shared.leader_tx.subscribe()
    }

    /// This replica became (or stopped being) the group's leader. On becoming leader,
    /// every conversation of the group with sessions on this node is marked with its
    /// head, so they catch up on whatever the previous leader committed but did not
    /// push; on stepping down, every watch of the group ends.
    pub fn set_leader(&self, leader: bool) {
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        let was = self.shared.leader.swap(leader, Ordering::AcqRel);
        if was == leader {
            return;
        }
        self.shared.leader_tx.send_replace(leader);
        if !leader {
            state.watchers.clear();
            return;
        }
        let hub = &self.shared.hub;
        for conv in hub.router().conversation_ids() {
            if let Ok(next) = state.store.next_seq(conv) {
                hub.mark(conv, next.saturating_sub(1));
            }
        }
    }

    /// Registers `watcher` for `convs`; returns each one's next seq (1 for one that does
    /// not exist yet): every later message of them is pushed to it.
    pub fn watch(&self, watcher: &Arc<Watcher>, convs: &[u64]) -> Vec<(u64, u64)> {
        let Ok(mut state) = self.shared.state.lock() else {
            return Vec::new();
        };
        convs
            .iter()
            .map(|conv| {
                state.watchers.add(watcher, *conv);
                (*conv, state.store.next_seq(*conv).unwrap_or(1))
            })
            .collect()
    }

    /// Adds `conv` to `watcher`'s watch and queues its head for it.
    pub fn watch_add(&self, watcher: &Arc<Watcher>, conv: u64) {
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        state.watchers.add(watcher, conv);
        let next_seq = state.store.next_seq(conv).unwrap_or(1);
        watcher.push(WatchEvent::Head { conv, next_seq }, 32);
    }

    /// Removes `conv` from a watch.
    pub fn watch_remove(&self, watcher: u64, conv: u64) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.watchers.remove(watcher, conv);
        }
    }

    /// Ends a watch.
    pub fn unwatch(&self, watcher: u64) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.watchers.remove_watcher(watcher);
        }
    }

    /// Runs `f` on the store under the state lock (authorization, next seq, counts).
    pub fn with_store<T>(&self, f: impl FnOnce(&ConversationStore) -> T) -> Result<T, Refusal> {
        Ok(f(&self.lock_refusal()?.store))
    }

    /// The last applied log index (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        self.shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.last_applied.map(|l| l.index))
            .unwrap_or(0)
    }

    /// The highest log index the Raft log may be purged up to without losing history
    /// or snapshot coverage: below every message still referenced in the log, and not
    /// beyond the latest snapshot. `None` when nothing may be purged.
    pub fn purgeable_upto(&self) -> Option<u64> {
        let state = self.shared.state.lock().ok()?;
        let snapshot_index = state.current.as_ref()?.meta.last_log_id?.index;
        let upto = match state.history_floor() {
            Some(lowest) if lowest <= snapshot_index => lowest.checked_sub(1)?,
            _ => snapshot_index,
        };
        Some(upto)
    }

    /// The size of the latest snapshot built or installed, if there is one.
    pub fn snapshot_bytes(&self) -> Option<u64> {
        let state = self.shared.state.lock().ok()?;
        Some(state.current.as_ref()?.data.len() as u64)
    }

    /// The lowest log index a retained message, or a snapshot being built, still
    /// reads (`Ok(None)` when nothing is read from the log): the log must keep it and
    /// everything after it. Refused when the state is poisoned (nothing may be purged).
    pub fn history_floor(&self) -> Result<Option<u64>, Refusal> {
        Ok(self.lock_refusal()?.history_floor())
    }

    /// Up to `limit` messages of `conv` from `from`, resolved from the log or the
    /// snapshot (the caller authorized the read).
    pub fn read(&self, conv: u64, from: u64, limit: usize) -> Result<History, Refusal> {
        let (refs, snapshot_messages) = {
            let state = self.lock_refusal()?;
            let refs = state
                .store
                .read(conv, from, limit)
                .map_err(|e| e.refusal())?;
            (refs, Arc::clone(&state.snapshot_messages))
        };
        let mut messages = Vec::with_capacity(refs.refs.len());
        for (seq, r) in refs.refs {
            match self.resolve(conv, seq, &r, &snapshot_messages) {
                Some(stored) => messages.push(Arc::new(stored)),
                // The log was purged under us (a snapshot took the message over) or
                // the entry is damaged: stop here; the caller pages on from the last.
                None if !messages.is_empty() => break,
                None => {
                    return Err(Refusal::new(
                        RefusalCode::Unavailable,
                        format!(
                            "message {seq} of conversation {conv} cannot be read from this node's log right now; retry"
                        ),
                    ))
                }
            }
        }
        Ok(History {
            messages,
            first_seq: refs.first_seq,
            next_seq: refs.next_seq,
        })
    }

    fn resolve(
        &self,
        conv: u64,
        seq: u64,
        r: &MessageRef,
        snapshot_messages: &[Message],
    ) -> Option<StoredMessage> {
        let frame_bytes_max = self.shared.limits.frame_bytes_max;
        match r.location {
            Location::Log { index, slot } => match self.shared.log.entry(index) {
                Ok(Some(Entry {
                    payload: EntryPayload::Normal(commands),
                    ..
                })) => {
                    let slot = usize::try_from(slot).ok()?;
                    let command = commands.get(slot)?.clone();
                    StoredMessage::from_publish(command, seq, r.timestamp_ms, frame_bytes_max)
                        .filter(|m| m.message.conv == conv)
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(conv, seq, index, error = %e, "cannot read a message from the log");
                    None
                }
            },
            Location::Snapshot(j) => {
                let message = snapshot_messages.get(usize::try_from(j).ok()?)?;
                (message.conv == conv && message.seq == seq)
                    .then(|| StoredMessage::new(message.clone(), frame_bytes_max).ok())?
            }
        }
    }

    fn lock_refusal(&self) -> Result<MutexGuard<'_, State>, Refusal> {
        // A poisoned lock means a panic while applying: the state may be half-changed.
        self.shared.state.lock().map_err(|_| {
            Refusal::new(
                RefusalCode::Internal,
                "conversation state is unavailable after an internal panic; restart the node",
            )
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        self.shared
            .state
            .lock()
            .map_err(|_| sm_error("state machine lock poisoned by a panic"))
    }

    /// Applies one entry under the lock: one response per command of its batch (one
    /// for a blank or membership entry).
    fn apply_entry(&self, state: &mut State, entry: Entry) -> Vec<Response> {
        state.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => vec![Ok(Outcome::Changed)],
            EntryPayload::Membership(membership) => {
                state.membership = StoredMembership::new(Some(entry.log_id), membership);
                vec![Ok(Outcome::Changed)]
            }
            EntryPayload::Normal(commands) => {
                // Only the leader fans out: one batch per watching node for the entry.
                let mut push = self.is_leader().then(PushBatch::default);
                let responses = commands
                    .iter()
                    .enumerate()
                    .map(|(slot, command)| {
                        // A batch holds at most a few thousand commands (the pipeline's bound).
                        let slot = u32::try_from(slot).unwrap_or(u32::MAX);
                        self.apply_command(state, command, entry.log_id.index, slot, push.as_mut())
                    })
                    .collect();
                if let Some(push) = push {
                    self.shared.metrics.fanout_node_copies.inc_by(push.copies);
                    push.flush();
                }
                self.update_gauges(state);
                responses
            }
        }
    }

    /// Applies one command. On the leader (`push` is `Some`), a new message goes to
    /// this node's sessions and to every node watching its conversation, and removed
    /// members' subscriptions end everywhere.
    fn apply_command(
        &self,
        state: &mut State,
        command: &Command,
        index: u64,
        slot: u32,
        push: Option<&mut PushBatch>,
    ) -> Response {
        let removal = match (command, &push) {
            (Command::RemoveMembers { conv, members }, Some(_)) => Some((*conv, members.clone())),
            _ => None,
        };
        let applied = state
            .store
            .apply(command, index, slot, push.is_some())
            .map_err(|e| e.refusal())?;
        Ok(match applied {
            Applied::Created { created } => Outcome::Created { created },
            Applied::MembersChanged | Applied::Trimmed => {
                if let Some((conv, users)) = removal {
                    self.shared.hub.revoke(conv, &users);
                    for watcher in state.watchers.of(conv) {
                        let bytes = 16 + 8 * users.len();
                        watcher.push(
                            WatchEvent::Removed {
                                conv,
                                users: users.clone(),
                            },
                            bytes,
                        );
                    }
                }
                self.update_gauges(state);
                Outcome::Changed
            }
            Applied::Published {
                seq,
                duplicate,
                stored,
            } => {
                if let (Some(stored), Some(push)) = (stored, push) {
                    // A session's lag is counted when its outbox first overflows.
                    let stats = self.shared.hub.deliver(&stored.delivery);
                    push.add(state.watchers.of(stored.delivery.conv), &stored.delivery);
                    let metrics = &self.shared.metrics;
                    metrics.sessions_lagged.inc_by(stats.overflowed);
                    metrics.publishes.inc();
                }
                Outcome::Published { seq, duplicate }
            }
        })
    }

    fn update_gauges(&self, state: &State) {
        let metrics = &self.shared.metrics;
        let label = GroupLabel::of(self.shared.group);
        metrics
            .history_messages
            .get_or_create(&label)
            .set(state.store.message_count() as i64);
        metrics
            .conversations
            .get_or_create(&label)
            .set(state.store.conversation_count() as i64);
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

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
            responses.push(this.apply_entry(&mut state, entry));
        }
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
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(sm_error(&format!(
                "refusing a snapshot of {} bytes, above the bound of {SNAPSHOT_BYTES_MAX}",
                data.len()
            )));
        }
        let (mut loaded, _) = load_image(&data, self.shared.limits)
            .map_err(|e| sm_error(&format!("the leader sent a bad snapshot: {e}")))?;
        // openraft's meta is authoritative for what the snapshot covers.
        loaded.last_applied = meta.last_log_id;
        loaded.membership = meta.last_membership.clone();
        let _file = self
            .shared
            .snapshot_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.persist(&data)?;
        loaded.current = Some(CurrentSnapshot {
            meta: meta.clone(),
            data: Arc::new(data),
        });
        let mut state = self.lock()?;
        // Watches belong to this replica, not to the snapshot.
        loaded.watchers = std::mem::take(&mut state.watchers);
        *state = loaded;
        self.update_gauges(&state);
        tracing::info!(
            last_log = ?meta.last_log_id,
            conversations = state.store.conversation_count(),
            messages = state.store.message_count(),
            "installed a snapshot from the leader"
        );
        drop(state);
        self.shared.snapshot_installed.notify_all();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.lock()?.current.clone();
        Ok(current.map(|c| Snapshot {
            meta: c.meta,
            snapshot: Box::new(Cursor::new(c.data.to_vec())),
        }))
    }
}

mod snapshot;

use snapshot::load_image;
pub(crate) use snapshot::{checked_body, persist_snapshot};
pub use snapshot::{SnapshotError, SnapshotImage};

#[cfg(test)]
mod tests;
