//! How many entries an AppendEntries to one follower may carry after one timed out.
//!
//! openraft 0.9 gives every AppendEntries exactly `heartbeat_interval` (50 ms by
//! default) and, after a timeout, sends the same range again: the follower's matched
//! index only moves when a reply arrives in time. An RPC whose transfer and decoding
//! take longer than that never succeeds, however often it is sent, and the follower
//! never catches up. Seen in t60 with debug builds on a loaded 2-core host: 310 KiB
//! catch-up requests took 40–160 ms to read on the follower (transfer 9–99 ms,
//! decoding 15–60 ms), every one timed out, and a restarted node stayed behind for the
//! whole 30 s the test waits. A slow link does the same in production: 512 KiB at
//! 100 Mbit/s is 42 ms.
//!
//! Owns: remembering, per replication stream (one [`PeerClient`](super::PeerClient) per
//! group and follower), whether the previous AppendEntries finished, and choosing a
//! smaller request when it did not. The answer goes to openraft as `PayloadTooLarge`
//! with an entries hint, which openraft honours for its next 10 RPCs and then drops, so
//! a follower that became fast again gets full-size requests back. Must not: shrink
//! below one entry, shrink after a timed-out heartbeat (a slow follower, not a large
//! request), or hold anything beyond the one previous request.

/// The state of one replication stream's AppendEntries (see the module documentation).
#[derive(Debug, Default)]
pub struct AppendSizer {
    /// The entries of the AppendEntries started last, while it has not finished.
    /// Still set when the next one starts means openraft dropped it at its timeout.
    unfinished_entries: Option<u64>,
}

impl AppendSizer {
    /// Starts an AppendEntries of `entries` entries. `Some(n)`: do not send it; the
    /// previous one (of more than one entry) never finished, so ask openraft to send at
    /// most `n` (half of the smaller of the two, at least one) instead. `None`: send it,
    /// and call [`AppendSizer::finish`] when a reply or an error came back.
    pub fn start(&mut self, entries: u64) -> Option<u64> {
        let timed_out = self.unfinished_entries.take().filter(|&n| n > 1);
        match timed_out {
            Some(before) if entries > 1 => Some((before.min(entries) / 2).max(1)),
            _ => {
                self.unfinished_entries = Some(entries);
                None
            }
        }
    }

    /// The AppendEntries started last came back (with a reply or an error).
    pub fn finish(&mut self) {
        self.unfinished_entries = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_request_never_shrinks_the_next() {
        let mut sizer = AppendSizer::default();
        for entries in [0, 1, 64, 4096] {
            assert_eq!(sizer.start(entries), None);
            sizer.finish();
        }
    }

    #[test]
    fn each_timeout_halves_the_next_request_down_to_one_entry() {
        let mut sizer = AppendSizer::default();
        // 40 entries time out (start without finish); openraft retries the same range.
        assert_eq!(sizer.start(40), None);
        assert_eq!(sizer.start(40), Some(20));
        // openraft sends the 20 it was told; they time out too.
        assert_eq!(sizer.start(20), None);
        assert_eq!(sizer.start(40), Some(10));
        assert_eq!(sizer.start(10), None);
        assert_eq!(sizer.start(10), Some(5));
        assert_eq!(sizer.start(5), None);
        assert_eq!(sizer.start(5), Some(2));
        assert_eq!(sizer.start(2), None);
        assert_eq!(sizer.start(2), Some(1));
        // One entry is always sent, timed out or not.
        assert_eq!(sizer.start(1), None);
        assert_eq!(sizer.start(1), None);
        sizer.finish();
    }

    #[test]
    fn the_hint_is_half_of_the_smaller_request() {
        let mut sizer = AppendSizer::default();
        assert_eq!(sizer.start(8), None);
        // The next range is shorter than the one that timed out.
        assert_eq!(sizer.start(3), Some(1));
    }

    #[test]
    fn a_timed_out_heartbeat_or_single_entry_does_not_shrink_a_batch() {
        let mut sizer = AppendSizer::default();
        assert_eq!(sizer.start(0), None);
        assert_eq!(sizer.start(100), None);
        sizer.finish();
        assert_eq!(sizer.start(1), None);
        assert_eq!(sizer.start(100), None);
    }

    #[test]
    fn after_a_shrink_the_next_start_is_sent() {
        let mut sizer = AppendSizer::default();
        assert_eq!(sizer.start(16), None);
        assert_eq!(sizer.start(16), Some(8));
        // The refusal itself is no unfinished request.
        assert_eq!(sizer.start(8), None);
        sizer.finish();
        assert_eq!(sizer.start(16), None);
    }
}
