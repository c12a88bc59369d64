//! Per-conversation cursors: what the application has been given, and where to
//! resume after a reconnect.
//!
//! Owns: for each subscribed conversation, the next seq the application should see
//! (`resume`), which is both the `from` of a resubscription and the dedup line —
//! a delivery below it was already handed over and is dropped. Must not: do I/O or
//! know about connections; the connection code calls it, and this is what makes the
//! application's stream gapless and duplicate-free across reconnects.
//!
//! Bound: one entry per subscribed conversation; the broker caps subscriptions per
//! session (`SessionLimits::subscriptions_max`) and a refused subscribe removes its
//! entry, so the map never holds more than that plus the subscribes in flight.

use std::collections::HashMap;

/// What to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the application: it is the next one expected (or the first one
    /// of a subscription that asked for new messages only).
    Deliver,
    /// Hand it over, but it skips past `expected`: the broker promised no gaps, so
    /// this is logged as a broker bug.
    DeliverAfterGap {
        /// The seq that should have come.
        expected: u64,
    },
    /// Already handed over (a replay overlapping what was seen): drop it.
    Duplicate,
    /// No subscription for this conversation (e.g. unsubscribed meanwhile): drop it.
    NotSubscribed,
}

impl Verdict {
    /// True when the delivery goes to the application.
    pub(crate) fn delivers(self) -> bool {
        matches!(self, Verdict::Deliver | Verdict::DeliverAfterGap { .. })
    }
}

/// Cursor of one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// Next seq the application should see. `None` only for a subscription "from new
    /// messages only" whose reply has not arrived and that has seen nothing.
    resume: Option<u64>,
}

/// All cursors of one client.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    convs: HashMap<u64, Cursor>,
}

impl Cursors {
    /// The application subscribes (before the request is sent, so deliveries that
    /// race the reply are accepted). Replaces an earlier cursor of `conv`: a
    /// subscribe from an earlier seq deliberately re-reads.
    pub(crate) fn subscribe(&mut self, conv: u64, from: Option<u64>) {
        self.convs.insert(conv, Cursor { resume: from });
    }

    /// The broker confirmed a subscription; `next_seq` is where new messages start.
    /// Only fills in a cursor that has no position yet (subscribed "new only").
    pub(crate) fn subscribed(&mut self, conv: u64, next_seq: u64) {
        if let Some(c) = self.convs.get_mut(&conv) {
            if c.resume.is_none() {
                c.resume = Some(next_seq);
            }
        }
    }

    /// What `accept` would say, without recording anything.
    pub(crate) fn check(&self, conv: u64, seq: u64) -> Verdict {
        let Some(c) = self.convs.get(&conv) else {
            return Verdict::NotSubscribed;
        };
        match c.resume {
            None => Verdict::Deliver,
            Some(next) if seq < next => Verdict::Duplicate,
            Some(next) if seq == next => Verdict::Deliver,
            Some(next) => Verdict::DeliverAfterGap { expected: next },
        }
    }

    /// Decides about a delivery and, when it goes to the application, records it:
    /// the cursor moves past `seq`. Call only once the application's queue has room,
    /// so a recorded message is never lost.
    pub(crate) fn accept(&mut self, conv: u64, seq: u64) -> Verdict {
        let verdict = self.check(conv, seq);
        if verdict.delivers() {
            if let Some(c) = self.convs.get_mut(&conv) {
                c.resume = Some(seq.saturating_add(1));
            }
        }
        verdict
    }

    /// The broker said history before `first_available_seq` is gone: resume there,
    /// so a later resubscription does not ask for the lost range again.
    pub(crate) fn truncated(&mut self, conv: u64, first_available_seq: u64) {
        if let Some(c) = self.convs.get_mut(&conv) {
            c.resume = Some(
                c.resume
                    .map_or(first_available_seq, |r| r.max(first_available_seq)),
            );
        }
    }

    /// Forgets `conv` (unsubscribed by the application or the broker).
    pub(crate) fn remove(&mut self, conv: u64) -> bool {
        self.convs.remove(&conv).is_some()
    }

    /// The `from` to subscribe `conv` with now: `Some(from)` when subscribed.
    pub(crate) fn resume_from(&self, conv: u64) -> Option<Option<u64>> {
        self.convs.get(&conv).map(|c| c.resume)
    }

    /// Every subscription as `(conv, from)` for resubscribing, sorted by conv.
    pub(crate) fn resubscriptions(&self) -> Vec<(u64, Option<u64>)> {
        let mut all: Vec<_> = self.convs.iter().map(|(k, c)| (*k, c.resume)).collect();
        all.sort_unstable();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds seqs of one conversation; returns those that reach the application.
    fn feed(c: &mut Cursors, conv: u64, seqs: impl IntoIterator<Item = u64>) -> Vec<u64> {
        seqs.into_iter()
            .filter(|s| c.accept(conv, *s).delivers())
            .collect()
    }

    #[test]
    fn from_a_seq_delivers_in_order_and_drops_replayed_ones() {
        let mut c = Cursors::default();
        c.subscribe(7, Some(3));
        assert_eq!(c.check(7, 2), Verdict::Duplicate);
        assert_eq!(feed(&mut c, 7, [3, 4, 5]), [3, 4, 5]);
        assert_eq!(c.resume_from(7), Some(Some(6)));
        // Reconnect: the broker replays from 6, but an overlap (4, 5) is dropped.
        assert_eq!(feed(&mut c, 7, [4, 5, 6, 7]), [6, 7]);
        assert_eq!(c.resume_from(7), Some(Some(8)));
    }

    #[test]
    fn new_only_takes_the_position_from_the_reply_until_something_is_seen() {
        let mut c = Cursors::default();
        c.subscribe(1, None);
        assert_eq!(c.resume_from(1), Some(None));
        c.subscribed(1, 40);
        assert_eq!(c.resume_from(1), Some(Some(40)));
        // A reconnect before any message resubscribes from 40: nothing published
        // meanwhile is missed.
        assert_eq!(c.resubscriptions(), [(1, Some(40))]);
        assert_eq!(feed(&mut c, 1, [40, 41]), [40, 41]);
        // A later reply (e.g. for a resubscription) does not move a known position.
        c.subscribed(1, 45);
        assert_eq!(c.resume_from(1), Some(Some(42)));
    }

    #[test]
    fn new_only_accepts_deliveries_that_race_the_reply() {
        let mut c = Cursors::default();
        c.subscribe(1, None);
        assert_eq!(c.accept(1, 12), Verdict::Deliver);
        c.subscribed(1, 12);
        assert_eq!(c.resume_from(1), Some(Some(13)));
        assert_eq!(c.accept(1, 12), Verdict::Duplicate);
    }

    #[test]
    fn a_skipped_seq_is_flagged_but_delivered() {
        let mut c = Cursors::default();
        c.subscribe(1, Some(1));
        assert_eq!(c.accept(1, 1), Verdict::Deliver);
        assert_eq!(c.accept(1, 3), Verdict::DeliverAfterGap { expected: 2 });
        assert_eq!(c.resume_from(1), Some(Some(4)));
    }

    #[test]
    fn truncation_moves_the_resume_point_forward_only() {
        let mut c = Cursors::default();
        c.subscribe(1, Some(1));
        c.truncated(1, 100);
        assert_eq!(c.resume_from(1), Some(Some(100)));
        assert_eq!(c.accept(1, 100), Verdict::Deliver);
        c.truncated(1, 50);
        assert_eq!(c.resume_from(1), Some(Some(101)));
        c.subscribe(2, None);
        c.truncated(2, 9);
        assert_eq!(c.resume_from(2), Some(Some(9)));
    }

    #[test]
    fn unsubscribed_conversations_are_dropped_and_not_resubscribed() {
        let mut c = Cursors::default();
        c.subscribe(1, Some(1));
        c.subscribe(2, Some(5));
        assert!(c.remove(1));
        assert!(!c.remove(1));
        assert_eq!(c.check(1, 1), Verdict::NotSubscribed);
        assert_eq!(c.accept(1, 1), Verdict::NotSubscribed);
        assert_eq!(c.resume_from(1), None);
        assert_eq!(c.resubscriptions(), [(2, Some(5))]);
        // Cursors of unknown conversations are not created by broker notices.
        c.subscribed(3, 1);
        c.truncated(3, 1);
        assert_eq!(c.resume_from(3), None);
    }

    #[test]
    fn subscribing_again_replaces_the_cursor() {
        let mut c = Cursors::default();
        c.subscribe(1, Some(1));
        assert_eq!(feed(&mut c, 1, 1..=5), [1, 2, 3, 4, 5]);
        c.subscribe(1, Some(2));
        assert_eq!(feed(&mut c, 1, 2..=6), [2, 3, 4, 5, 6]);
    }

    #[test]
    fn across_many_reconnects_the_application_sees_each_seq_once_in_order() {
        // A broker that replays from the resume point after each "reconnect", with
        // an overlap of up to 3 messages and in-flight duplicates.
        let mut c = Cursors::default();
        c.subscribe(9, Some(1));
        let mut seen = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let total = 500;
        while seen.last().copied().unwrap_or(0) < total {
            let Some(Some(from)) = c.resume_from(9) else {
                panic!("lost the cursor")
            };
            let start = from.saturating_sub(rand(4)).max(1);
            let end = (from + rand(20)).min(total);
            seen.extend(feed(&mut c, 9, start..=end));
        }
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    }
}
