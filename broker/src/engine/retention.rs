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
/// else `Some(the latest snapshot's bytes, if any)`. The decision is [`plan_unpin`]'s;
/// this carries it out.
async fn unpin(
    raft: &Raft,
    log: &LogStore,
    spans: &LogSpans,
    history_floor: FloorFn<'_>,
    snapshot_cost: Option<Option<u64>>,
) -> UnpinOutcome {
    let (applied, snapshot) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map(|l| l.index),
        )
    };
    let plan = plan_unpin(
        &GroupReading {
            spans,
            segment_of: &|index| log.segment_of(index),
            first_live: log.stats().first_index,
            applied,
            snapshot,
            snapshot_cost,
        },
        history_floor,
    );
    let upto = match plan {
        UnpinPlan::Purge { upto } => return purge(raft, upto, false).await,
        UnpinPlan::Skip(outcome) => return outcome,
        UnpinPlan::SnapshotThenPurge { upto } => upto,
    };
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

/// One group's log as [`plan_unpin`] reads it, at one moment.
struct GroupReading<'a> {
    /// The shared log's segments.
    spans: &'a LogSpans,
    /// The segment holding one of the group's live entries (`None` past its last).
    segment_of: &'a dyn Fn(u64) -> Option<u64>,
    /// The group's first live entry, if its log holds any.
    first_live: Option<u64>,
    /// The last entry it applied (0 for none).
    applied: u64,
    /// The last entry its latest snapshot covers.
    snapshot: Option<u64>,
    /// As in [`unpin`].
    snapshot_cost: Option<Option<u64>>,
}

/// What unpinning one group comes to, decided by [`plan_unpin`] without any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnpinPlan {
    /// The latest snapshot already lets the group purge past the oldest segment: purge
    /// up to `upto`.
    Purge {
        /// The last index to purge.
        upto: u64,
    },
    /// Snapshot what the group has applied, then purge up to `upto` (less if history
    /// moved meanwhile: it only moves on).
    SnapshotThenPurge {
        /// The last index to purge once the snapshot covers it.
        upto: u64,
    },
    /// Nothing is done; the outcome says why.
    Skip(UnpinOutcome),
}

/// Decides how (and whether) one group frees the oldest segment, from `reading` and
/// the history floor (the lowest index history reads, `Err` when unknown). Pure: the
/// unit tests below cover each branch.
fn plan_unpin(reading: &GroupReading<'_>, history_floor: FloorFn<'_>) -> UnpinPlan {
    let segment_of = reading.segment_of;
    let (Some(oldest), Some(first_live)) = (reading.spans.oldest(), reading.first_live) else {
        return UnpinPlan::Skip(UnpinOutcome::NotPinning);
    };
    if segment_of(first_live) != Some(oldest) {
        return UnpinPlan::Skip(UnpinOutcome::NotPinning);
    }
    let Ok(floor) = history_floor() else {
        return UnpinPlan::Skip(UnpinOutcome::Failed);
    };
    // The last index a purge may reach behind a snapshot at `covered` (none when
    // history reads entry 0).
    let purge_limit = |covered: u64| match floor {
        Some(f) => f.checked_sub(1).map(|below| covered.min(below)),
        None => Some(covered),
    };
    // Past the oldest segment: the first entry left after purging up to `upto` is not in it.
    let frees_oldest = |upto: &u64| *upto >= first_live && segment_of(upto + 1) != Some(oldest);

    // The latest snapshot may be enough (a purge asked for before and held back by
    // openraft, or a snapshot built since): no new snapshot for that.
    if let Some(upto) = reading.snapshot.and_then(purge_limit).filter(frees_oldest) {
        return UnpinPlan::Purge { upto };
    }
    // What a snapshot of everything applied would allow.
    let Some(upto) = purge_limit(reading.applied).filter(frees_oldest) else {
        return UnpinPlan::Skip(UnpinOutcome::Needed);
    };
    if let Some(last_snapshot_bytes) = reading.snapshot_cost {
        let spans = reading.spans;
        let freed_bytes = spans.bytes_before(segment_of(upto + 1).unwrap_or(u64::MAX));
        // With no snapshot yet, what stays is the best guess of what one carries.
        let expected_bytes = last_snapshot_bytes
            .unwrap_or_else(|| spans.bytes_before(u64::MAX).saturating_sub(freed_bytes));
        if freed_bytes < expected_bytes.saturating_mul(UNPIN_FREED_PER_SNAPSHOT_BYTE) {
            return UnpinPlan::Skip(UnpinOutcome::NotWorthIt);
        }
    }
    UnpinPlan::SnapshotThenPurge { upto }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries 1–100 live in segment 1, 101–200 in segment 2, 201–300 in segment 3 (the
    /// active one); each segment holds 1,000 bytes.
    fn three_segments() -> LogSpans {
        LogSpans {
            numbers: vec![1, 2, 3],
            lengths_bytes: vec![1_000, 1_000, 1_000],
            spanned_segments: [(7, 3)].into_iter().collect(),
        }
    }

    fn segment_of(index: u64) -> Option<u64> {
        (1..=300).contains(&index).then(|| (index - 1) / 100 + 1)
    }

    /// The plan for a group whose first live entry is 1, which applied `applied`,
    /// with its latest snapshot at `snapshot`, history reading from `floor`.
    fn plan(
        applied: u64,
        snapshot: Option<u64>,
        floor: Result<Option<u64>, ()>,
        snapshot_cost: Option<Option<u64>>,
    ) -> UnpinPlan {
        let spans = three_segments();
        let reading = GroupReading {
            spans: &spans,
            segment_of: &segment_of,
            first_live: Some(1),
            applied,
            snapshot,
            snapshot_cost,
        };
        plan_unpin(&reading, &move || floor)
    }

    #[test]
    fn a_group_whose_log_begins_after_the_oldest_segment_does_not_pin_it() {
        let spans = three_segments();
        for first_live in [None, Some(101)] {
            let reading = GroupReading {
                spans: &spans,
                segment_of: &segment_of,
                first_live,
                applied: 300,
                snapshot: Some(300),
                snapshot_cost: None,
            };
            assert_eq!(
                plan_unpin(&reading, &|| Ok(None)),
                UnpinPlan::Skip(UnpinOutcome::NotPinning),
                "first live entry {first_live:?}"
            );
        }
    }

    #[test]
    fn a_latest_snapshot_past_the_oldest_segment_is_purged_behind_without_a_new_one() {
        assert_eq!(
            plan(300, Some(150), Ok(None), Some(Some(10_000_000))),
            UnpinPlan::Purge { upto: 150 }
        );
        // History reading entry 180 still allows that purge: 150 < 180.
        assert_eq!(
            plan(300, Some(150), Ok(Some(180)), None),
            UnpinPlan::Purge { upto: 150 }
        );
    }

    #[test]
    fn history_reading_the_oldest_segment_keeps_it() {
        // Entry 50 is read by history: purging may reach 49, which frees nothing.
        assert_eq!(
            plan(300, Some(250), Ok(Some(50)), None),
            UnpinPlan::Skip(UnpinOutcome::Needed)
        );
        // History reading entry 1 (or 0) allows no purge at all.
        for floor in [0, 1] {
            assert_eq!(
                plan(300, Some(250), Ok(Some(floor)), None),
                UnpinPlan::Skip(UnpinOutcome::Needed),
                "floor {floor}"
            );
        }
    }

    #[test]
    fn entries_of_the_oldest_segment_not_yet_applied_keep_it() {
        // Applied up to 99: even a snapshot now cannot cover entry 100.
        assert_eq!(
            plan(99, None, Ok(None), None),
            UnpinPlan::Skip(UnpinOutcome::Needed)
        );
    }

    #[test]
    fn the_metadata_group_is_snapshotted_up_to_what_it_applied_and_history_allows() {
        assert_eq!(
            plan(260, Some(40), Ok(None), None),
            UnpinPlan::SnapshotThenPurge { upto: 260 }
        );
        // A snapshot then purges only below the floor.
        assert_eq!(
            plan(260, Some(40), Ok(Some(120)), None),
            UnpinPlan::SnapshotThenPurge { upto: 119 }
        );
    }

    #[test]
    fn a_data_group_snapshots_early_only_when_the_bytes_freed_outweigh_the_snapshot() {
        // Purging up to 260 frees segments 1 and 2: 2,000 bytes. A 500-byte snapshot
        // is worth it (2,000 >= 4 × 500); a 501-byte one is not.
        assert_eq!(
            plan(260, Some(40), Ok(None), Some(Some(500))),
            UnpinPlan::SnapshotThenPurge { upto: 260 }
        );
        assert_eq!(
            plan(260, Some(40), Ok(None), Some(Some(501))),
            UnpinPlan::Skip(UnpinOutcome::NotWorthIt)
        );
        // With no snapshot yet, what stays (segment 3, 1,000 bytes) is its expected
        // size: 2,000 < 4 × 1,000.
        assert_eq!(
            plan(260, None, Ok(None), Some(None)),
            UnpinPlan::Skip(UnpinOutcome::NotWorthIt)
        );
    }

    #[test]
    fn an_unknown_history_floor_purges_nothing() {
        assert_eq!(
            plan(300, Some(250), Err(()), None),
            UnpinPlan::Skip(UnpinOutcome::Failed)
        );
    }
}
