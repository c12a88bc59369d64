//! Keeping the node's shared log short: the retention trim, purging each group's log
//! behind what history still reads, and unpinning the oldest segment.
//!
//! Owns: when each group's log is purged, and when a group is snapshotted early so that
//! it can purge. Segments retire oldest first (see `raft::log_store`), so one group
//! with a live entry in the oldest segment keeps the whole log on disk: the metadata
//! group, whose log holds no history, might otherwise keep its bootstrap entries in
//! segment 1 for good; a data group's purge stops at its latest snapshot, which
//! `raft.snapshot_logs_since_last` may put far back.
//! Must not: touch files (the log store retires segments) or decide what history keeps
//! (the store's limits do: a message history still reads pins its entry, by design).

use std::time::{Duration, Instant};

use super::{now_ms, Engine};
use crate::raft::log_store::{LogSpans, LogStore, Wal};
use crate::raft::{GroupId, Raft, META_GROUP};
use crate::store::Command;

/// Housekeeping unpins the oldest segment only once the log holds at least this many
/// segments. Why 3: the active segment and two full ones; below that the log is
/// already within a few segments of its live data, and early snapshots would buy
/// little.
pub const UNPIN_SEGMENTS_MIN: usize = 3;

/// A data group is snapshotted early only when the bytes that frees are at least this
/// many times the snapshot's expected size (its latest snapshot's, else the segments it
/// keeps). Why 4: the early snapshots then write at most a quarter of what the log
/// takes in (a 100,000-key dedup table alone is a 4.4 MB snapshot), and the log stays
/// within about 4 snapshots' size of its live data.
pub const UNPIN_FREED_PER_SNAPSHOT_BYTE: u64 = 4;

/// How long housekeeping waits for a snapshot it asked for; past it the next round
/// purges whatever the snapshot covers by then.
const UNPIN_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// What unpinning did about one group that pinned the oldest segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpin {
    /// Snapshotted (if its snapshot did not cover enough) and purged past the oldest
    /// segment up to this index.
    Purged(u64),
    /// A message history still reads, or an entry not applied yet, is in the oldest
    /// segment: the group must keep it.
    Needed,
    /// An early snapshot would cost too much for the segments it frees (a data group's
    /// snapshot carries its dedup table and retained messages; see
    /// [`UNPIN_FREED_PER_SNAPSHOT_BYTE`]).
    NotWorthIt,
    /// The group could not be snapshotted or purged now (stopped, or the snapshot took
    /// longer than the wait); the next round tries again.
    Failed,
}

impl Engine {
    /// Proposes the retention trim in every group this node leads (housekeeping calls
    /// it).
    pub async fn trim_expired(&self) {
        for group in self.groups.all().values() {
            if !group.is_leader(self.node_id) {
                continue;
            }
            let answer = group
                .pipeline
                .submit(
                    Command::Trim { now_ms: now_ms() },
                    Instant::now() + self.write_timeout,
                )
                .await;
            if let Err(refusal) = answer.wait().await {
                tracing::warn!(group = group.id, "retention trim not committed: {refusal}");
            }
        }
    }

    /// Lets each group's log go below the oldest message history still reads from it,
    /// up to its latest snapshot (housekeeping calls it).
    pub async fn purge_log(&self) {
        for group in self.groups.all().values() {
            if let Some(upto) = group.sm.purgeable_upto() {
                if let Err(e) = group.raft.trigger().purge_log(upto).await {
                    tracing::warn!(group = group.id, "cannot purge the log up to {upto}: {e}");
                }
            }
        }
    }

    /// Once `wal` holds [`UNPIN_SEGMENTS_MIN`] segments or more: every group with a live
    /// entry in the oldest segment that could purge past it given a snapshot of what
    /// it has applied is snapshotted now (unless its snapshot already covers that) and
    /// purged (housekeeping calls it, after [`Engine::purge_log`]). Returns what was
    /// done per pinning group.
    pub async fn unpin_log(&self, wal: &Wal) -> Vec<(GroupId, Unpin)> {
        let spans = wal.spans();
        if spans.segments() < UNPIN_SEGMENTS_MIN {
            return Vec::new();
        }
        let mut done = Vec::new();
        for id in spans.pinning_oldest() {
            let outcome = if id == META_GROUP {
                let Some(meta) = self.groups.meta() else {
                    continue;
                };
                // Its log holds no history: everything applied may go.
                unpin(&meta.raft, &meta.log, &spans, &|| None, None).await
            } else {
                let Some(group) = self.groups.get(id) else {
                    continue;
                };
                unpin(
                    &group.raft,
                    &group.log,
                    &spans,
                    &|| group.sm.history_floor(),
                    Some(group.sm.snapshot_bytes()),
                )
                .await
            };
            match outcome {
                Unpin::Purged(upto) => {
                    tracing::info!(group = id, upto, "purged the log past the oldest segment")
                }
                Unpin::Failed => {
                    tracing::warn!(group = id, "cannot unpin the oldest log segment now")
                }
                Unpin::Needed | Unpin::NotWorthIt => {
                    tracing::debug!(
                        group = id,
                        ?outcome,
                        "the group keeps the oldest log segment"
                    )
                }
            }
            done.push((id, outcome));
        }
        done
    }
}

/// Frees the oldest segment of one group's entries if it can: see [`Engine::unpin_log`].
/// `history_floor` is the lowest index history reads (re-read after the snapshot).
/// `snapshot_cost` is `None` for a snapshot too small to weigh (the metadata group's),
/// else `Some(the latest snapshot's bytes, if any)`.
async fn unpin(
    raft: &Raft,
    log: &LogStore,
    spans: &LogSpans,
    history_floor: &(dyn Fn() -> Option<u64> + Sync),
    snapshot_cost: Option<Option<u64>>,
) -> Unpin {
    let (Some(oldest), Some(first_live)) = (spans.oldest(), log.stats().first_index) else {
        return Unpin::Needed;
    };
    let (applied, snapshot) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map(|l| l.index),
        )
    };
    // The first entry that stays after a snapshot of everything applied and a purge
    // behind it.
    let keep_from = history_floor().map_or(applied + 1, |floor| floor.min(applied + 1));
    let keep_segment = log.segment_of(keep_from);
    if keep_from <= first_live || keep_segment == Some(oldest) {
        return Unpin::Needed;
    }
    if let Some(last_snapshot_bytes) = snapshot_cost {
        if snapshot.is_none_or(|s| s + 1 < keep_from) {
            let freed = keep_segment.map_or_else(
                || spans.bytes_before(u64::MAX),
                |seg| spans.bytes_before(seg),
            );
            // With no snapshot yet, what stays is the best guess of what it carries.
            let expected =
                last_snapshot_bytes.unwrap_or_else(|| spans.bytes_before(u64::MAX) - freed);
            if freed < expected.saturating_mul(UNPIN_FREED_PER_SNAPSHOT_BYTE) {
                return Unpin::NotWorthIt;
            }
        }
    }
    let upto = keep_from - 1;
    if snapshot.is_none_or(|s| s < upto) {
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "cannot ask for a snapshot");
            return Unpin::Failed;
        }
        let covered = raft
            .wait(Some(UNPIN_SNAPSHOT_WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= upto),
                "a snapshot covering the oldest segment",
            )
            .await;
        if let Err(e) = covered {
            tracing::warn!(error = %e, upto, "no snapshot covering the oldest segment yet");
            return Unpin::Failed;
        }
    }
    // History may have moved on while the snapshot was built; it never moves back.
    let upto = history_floor().map_or(upto, |floor| upto.min(floor.saturating_sub(1)));
    match raft.trigger().purge_log(upto).await {
        Ok(()) => Unpin::Purged(upto),
        Err(e) => {
            tracing::warn!(error = %e, upto, "cannot purge the log");
            Unpin::Failed
        }
    }
}
