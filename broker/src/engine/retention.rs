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

/// How long housekeeping waits for a snapshot it asked for; past it the group is
/// reported [`UnpinOutcome::Failed`], and a later round purges behind the snapshot once
/// it is there (openraft ignores a second request while one is being built).
const UNPIN_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// What unpinning did about one group that pinned the oldest segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpinOutcome {
    /// Asked openraft to purge the group's log up to `upto`, past the oldest segment
    /// (openraft may hold a purge back while a replication still reads the entries).
    /// `snapshotted`: a snapshot was taken first, because the latest one did not
    /// reach that far.
    PurgeRequested {
        /// The last index to purge.
        upto: u64,
        /// True when an early snapshot was taken for it.
        snapshotted: bool,
    },
    /// A message history still reads, or an entry not applied yet, is in the oldest
    /// segment: the group must keep it.
    Needed,
    /// The group has no live entry in the oldest segment any more (it purged since the
    /// spans were read), or its log is empty.
    NotPinning,
    /// An early snapshot would cost too much for the bytes it frees (a data group's
    /// snapshot carries its dedup table and retained messages; see
    /// [`UNPIN_FREED_PER_SNAPSHOT_BYTE`]).
    NotWorthIt,
    /// The group could not be snapshotted or purged now (stopped, poisoned, or the
    /// snapshot took longer than [`UNPIN_SNAPSHOT_WAIT`]); a later round tries again.
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

    /// Once `wal` holds [`UNPIN_SEGMENTS_MIN`] segments or more, for every group with a
    /// live entry in the oldest segment (housekeeping calls it, after
    /// [`Engine::purge_log`]): if its latest snapshot already lets it purge past that
    /// segment, asks for that purge; else, if a snapshot of what it has applied would,
    /// and for a data group that is worth its cost, snapshots it now and purges behind
    /// the snapshot. Returns what was done per pinning group.
    pub async fn unpin_log(&self, wal: &Wal) -> Vec<(GroupId, UnpinOutcome)> {
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
                unpin(&meta.raft, &meta.log, &spans, &|| Ok(None), None).await
            } else {
                let Some(group) = self.groups.get(id) else {
                    continue;
                };
                let floor = || group.sm.history_floor().map_err(|_| ());
                let cost = Some(group.sm.snapshot_bytes());
                unpin(&group.raft, &group.log, &spans, &floor, cost).await
            };
            match outcome {
                UnpinOutcome::PurgeRequested {
                    upto,
                    snapshotted: true,
                } => tracing::info!(
                    group = id,
                    upto,
                    "snapshotted early to purge the log past its oldest segment"
                ),
                UnpinOutcome::Failed => {
                    tracing::warn!(group = id, "cannot unpin the oldest log segment now")
                }
                _ => tracing::debug!(group = id, ?outcome, "unpinning the oldest log segment"),
            }
            done.push((id, outcome));
        }
        done
    }
}

/// What [`unpin`] reads the history floor with: `Err` when it cannot be known (then
/// nothing is purged).
type FloorFn<'a> = &'a (dyn Fn() -> Result<Option<u64>, ()> + Sync);

/// Frees the oldest segment of one group's entries if it can: see [`Engine::unpin_log`].
/// `history_floor` is the lowest index history reads (read again after a snapshot).
/// `snapshot_cost` is `None` for a snapshot too small to weigh (the metadata group's),
/// else `Some(the latest snapshot's bytes, if any)`.
async fn unpin(
    raft: &Raft,
    log: &LogStore,
    spans: &LogSpans,
    history_floor: FloorFn<'_>,
    snapshot_cost: Option<Option<u64>>,
) -> UnpinOutcome {
    let (Some(oldest), Some(first_live)) = (spans.oldest(), log.stats().first_index) else {
        return UnpinOutcome::NotPinning;
    };
    if log.segment_of(first_live) != Some(oldest) {
        return UnpinOutcome::NotPinning;
    }
    let Ok(floor) = history_floor() else {
        return UnpinOutcome::Failed;
    };
    let (applied, snapshot) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map(|l| l.index),
        )
    };
    // The last index a purge may reach behind a snapshot at `covered` (none when
    // history reads entry 0).
    let purge_limit = |covered: u64| match floor {
        Some(f) => f.checked_sub(1).map(|below| covered.min(below)),
        None => Some(covered),
    };
    // Past the oldest segment: the first entry left after purging up to `upto` is not in it.
    let frees_oldest = |upto: &u64| *upto >= first_live && log.segment_of(upto + 1) != Some(oldest);

    // The latest snapshot may be enough (a purge asked for before and held back by
    // openraft, or a snapshot built since): no new snapshot for that.
    if let Some(upto) = snapshot.and_then(purge_limit).filter(frees_oldest) {
        return purge(raft, upto, false).await;
    }
    // What a snapshot of everything applied would allow.
    let Some(upto) = purge_limit(applied).filter(frees_oldest) else {
        return UnpinOutcome::Needed;
    };
    if let Some(last_snapshot_bytes) = snapshot_cost {
        let freed_bytes = spans.bytes_before(log.segment_of(upto + 1).unwrap_or(u64::MAX));
        // With no snapshot yet, what stays is the best guess of what one carries.
        let expected_bytes = last_snapshot_bytes
            .unwrap_or_else(|| spans.bytes_before(u64::MAX).saturating_sub(freed_bytes));
        if freed_bytes < expected_bytes.saturating_mul(UNPIN_FREED_PER_SNAPSHOT_BYTE) {
            return UnpinOutcome::NotWorthIt;
        }
    }
    if let Err(e) = raft.trigger().snapshot().await {
        tracing::warn!(error = %e, "cannot ask for a snapshot");
        return UnpinOutcome::Failed;
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
        return UnpinOutcome::Failed;
    }
    // History only moves on while the snapshot is built, never back.
    let Ok(floor) = history_floor() else {
        return UnpinOutcome::Failed;
    };
    let upto = match floor {
        Some(f) => upto.min(f.saturating_sub(1)),
        None => upto,
    };
    purge(raft, upto, true).await
}

/// Asks openraft to purge `raft`'s log up to `upto`.
async fn purge(raft: &Raft, upto: u64, snapshotted: bool) -> UnpinOutcome {
    match raft.trigger().purge_log(upto).await {
        Ok(()) => UnpinOutcome::PurgeRequested { upto, snapshotted },
        Err(e) => {
            tracing::warn!(error = %e, upto, "cannot purge the log");
            UnpinOutcome::Failed
        }
    }
}
