//! Snapshots of a data group's state machine: building one (the store cloned under the
//! state lock, everything else after it), the image it carries, writing
//! `DIR/current.snap` durably, and decoding one (see the format in [`super`]).
//!
//! Must not: change the state beyond publishing a built snapshot as current (and the
//! build's `building_floor` while it runs), or replace a snapshot that covers more (an
//! install may land during a build).

// openraft's trait methods return its `StorageError` (224 bytes); the helpers here
// return the same type so `?` carries it through unchanged.
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use super::*;

/// How long a build whose log reads failed waits for an install to publish its
/// snapshot. openraft purges the log behind an install as soon as it queues it, before
/// the state machine has it, so a concurrent build can find its entries gone; the
/// install then follows. Why 30 s: openraft's `install_snapshot_timeout` here.
const OVERTAKING_INSTALL_WAIT: Duration = Duration::from_secs(30);

/// The header of a data group's snapshot data (see [`codec::encode_snapshot`]).
const SNAPSHOT_MAGIC: &[u8; 8] = b"HRLDSNAP";

/// The data-group snapshot format this build writes and reads. 2: the header, and the
/// dedup table stored as runs ([`crate::store::DedupRunImage`]); 1 (no header): one
/// record per key.
const SNAPSHOT_FORMAT: u32 = 2;

/// What a snapshot carries (see the module doc).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapshotImage {
    /// The last log entry the snapshot includes.
    pub last_applied: Option<WireLogId>,
    /// The membership as of `last_applied`.
    pub membership: WireStoredMembership,
    /// Unique per build: `<term>-<index>-<build count>`.
    pub snapshot_id: String,
    /// Conversation state; every history ref is `Snapshot(j)`.
    pub store: StoreImage,
    /// Retained messages, indexed by the refs.
    pub messages: Vec<Message>,
}

impl StateMachine {
    /// Builds a snapshot of the current state. Only copying the store holds the lock
    /// (applies wait for it): a clone is flat copies of its queues, where its image
    /// looks up every idempotency key (15–30 ms with 100,000 keys, release, 2-core
    /// host, 2026-12-02). The image, resolving the retained messages and encoding
    /// happen after, while [`State::building_floor`] keeps Herald's own purges below
    /// the entries they live in. Memory: one copy of the store for the build's
    /// duration. An install that lands meanwhile wins: the build then returns the
    /// installed snapshot, also when the install's purge made its reads fail.
    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let (store, snapshot_messages, last_applied, membership) = {
            let mut state = self.lock()?;
            state.building_floor = state.store.min_log_index();
            (
                state.store.clone(),
                Arc::clone(&state.snapshot_messages),
                state.last_applied,
                state.membership.clone(),
            )
        };
        let locked = started.elapsed();
        let encoded = self.encode(store.image(), &snapshot_messages, last_applied, &membership);
        drop(store);
        // openraft builds one snapshot of a group at a time: nobody else set the floor.
        self.lock()?.building_floor = None;
        let mut file = self
            .shared
            .snapshot_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let wait_until = Instant::now() + OVERTAKING_INSTALL_WAIT;
        loop {
            if let Some(newer) = self.current_if_beyond(last_applied)? {
                // An install overtook this build: the installed snapshot is the one to keep.
                tracing::info!(
                    group = self.shared.group,
                    built = ?last_applied,
                    installed = ?newer.meta.last_log_id,
                    "a snapshot build was overtaken by an install; keeping the installed one"
                );
                return Ok(newer);
            }
            let now = Instant::now();
            if encoded.is_ok() || now >= wait_until {
                break;
            }
            // The reads failed: an install's purge may have come first (see
            // OVERTAKING_INSTALL_WAIT).
            file = self
                .shared
                .snapshot_installed
                .wait_timeout(file, wait_until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let (data, snapshot_id) = encoded?;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.persist(&data)?;
        tracing::info!(
            group = self.shared.group,
            last_log = ?meta.last_log_id,
            bytes = data.len(),
            locked_us = locked.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "built a snapshot"
        );
        let data = Arc::new(data);
        self.lock()?.current = Some(CurrentSnapshot {
            meta: meta.clone(),
            data: Arc::clone(&data),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        })
    }

    /// The current snapshot, if it covers more than `last_applied`.
    fn current_if_beyond(
        &self,
        last_applied: Option<LogId>,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let newer = self
            .lock()?
            .current
            .clone()
            .filter(|c| c.meta.last_log_id > last_applied);
        // Copied outside the state lock (up to SNAPSHOT_BYTES_MAX).
        Ok(newer.map(|c| Snapshot {
            meta: c.meta,
            snapshot: Box::new(Cursor::new(c.data.to_vec())),
        }))
    }

    /// The encoded snapshot of `image` (refs resolved into messages) and its id.
    fn encode(
        &self,
        mut image: StoreImage,
        snapshot_messages: &[Message],
        last_applied: Option<LogId>,
        membership: &StoredMembership<NodeId, BasicNode>,
    ) -> Result<(Vec<u8>, String), StorageError> {
        let mut messages = Vec::new();
        for conv in &mut image.conversations {
            let first_seq = conv.next_seq - conv.history.len() as u64;
            for (i, r) in conv.history.iter_mut().enumerate() {
                let seq = first_seq + i as u64;
                let stored = self
                    .resolve(conv.id, seq, r, snapshot_messages)
                    .ok_or_else(|| {
                        sm_error(&format!(
                            "cannot build a snapshot: message {seq} of conversation {} is unreadable",
                            conv.id
                        ))
                    })?;
                r.location = Location::Snapshot(messages.len() as u64);
                messages.push(stored.message);
            }
        }
        let snapshot_id = match last_applied {
            Some(l) => format!(
                "{}-{}-{}",
                l.leader_id.term,
                l.index,
                crate::engine::now_ms()
            ),
            None => format!("0-0-{}", crate::engine::now_ms()),
        };
        let snapshot = SnapshotImage {
            last_applied: last_applied.as_ref().map(WireLogId::from),
            membership: WireStoredMembership::from(membership),
            snapshot_id: snapshot_id.clone(),
            store: image,
            messages,
        };
        let data = codec::encode_snapshot(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, &snapshot)
            .map_err(|e| sm_error(&e.to_string()))?;
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(sm_error(&format!(
                "snapshot of {} bytes is above the bound of {SNAPSHOT_BYTES_MAX}; shorten history retention",
                data.len()
            )));
        }
        Ok((data, snapshot_id))
    }

    /// Writes `DIR/current.snap` durably (see [`persist_snapshot`]).
    pub(super) fn persist(&self, data: &[u8]) -> Result<(), StorageError> {
        persist_snapshot(&self.shared.dir, data)
    }
}

/// Writes `dir/current.snap` durably: CRC + `data` to a temp file, fsync, rename,
/// fsync the directory. Shared with the metadata group's snapshots.
pub(crate) fn persist_snapshot(dir: &std::path::Path, data: &[u8]) -> Result<(), StorageError> {
    let io =
        |e: std::io::Error| -> StorageError { StorageIOError::write_snapshot(None, &e).into() };
    let tmp = dir.join("current.snap.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&crc32fast::hash(data).to_le_bytes())
        .map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, dir.join("current.snap")).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// The body of a snapshot file whose CRC matches, or `None`.
pub(crate) fn checked_body(bytes: &[u8]) -> Option<&[u8]> {
    let (crc, body) = bytes.split_first_chunk::<4>()?;
    (u32::from_le_bytes(*crc) == crc32fast::hash(body)).then_some(body)
}

/// Decodes snapshot data into a state (with `current` unset) and its meta.
pub(super) fn load_image(
    data: &[u8],
    limits: StoreLimits,
) -> Result<(State, SnapshotMeta<NodeId, BasicNode>), String> {
    let image: SnapshotImage =
        codec::decode_snapshot("data-group", SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, data)
            .map_err(|e| e.to_string())?;
    let refs: usize = image
        .store
        .conversations
        .iter()
        .map(|c| c.history.len())
        .sum();
    if refs != image.messages.len() {
        return Err(format!(
            "the snapshot refers to {refs} messages but carries {}",
            image.messages.len()
        ));
    }
    let store = ConversationStore::from_image(limits, image.store)?;
    let last_applied = image.last_applied.map(LogId::from);
    let membership: StoredMembership<NodeId, BasicNode> = image.membership.into();
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership.clone(),
        snapshot_id: image.snapshot_id,
    };
    Ok((
        State {
            store,
            last_applied,
            membership,
            snapshot_messages: Arc::new(image.messages),
            current: None,
            building_floor: None,
            watchers: WatcherTable::default(),
        },
        meta,
    ))
}

/// A snapshot file could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or creating the snapshot directory or file failed.
    #[error("cannot read snapshot {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is damaged.
    #[error("snapshot {path} is damaged ({detail}); move the data directory away and restart the node so it rejoins from the cluster")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        // Building reads the log and writes a file: keep it off the async workers.
        tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(|e| sm_error(&format!("snapshot build task failed: {e}")))?
    }
}
