//! One subscriber: a session that reads a conversation, checks its order and records
//! publish → delivery latency.

use std::sync::Arc;

use futures_util::future::FutureExt;
use herald_client::{Session, SessionEvent};
use tokio::sync::watch;

use crate::clock::{read_stamp, Clock};
use crate::progress::Counters;
use crate::stats::ShardedHistogram;

/// Order violations kept verbatim per subscriber (the rest are only counted).
const VIOLATIONS_KEPT: usize = 3;
/// Latency samples buffered before they go into the shared histogram.
const LATENCY_BATCH: usize = 64;

/// What a subscriber expects.
#[derive(Debug, Clone, Copy)]
pub struct SubscribePlan {
    /// The conversation.
    pub conv: u64,
    /// The seq of the first message (`next_seq` from the subscribe reply).
    pub first_seq: u64,
    /// Messages to receive before it is done.
    pub messages: u64,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct SubscribeResult {
    /// New messages of the conversation received (duplicates not counted).
    pub received: u64,
    /// Seq not exactly one above the previous one (gap, duplicate or going back).
    pub order_violations: u64,
    /// The first few violations, described.
    pub violation_samples: Vec<String>,
    /// `Lagged` notices (the broker's queue for the session overflowed).
    pub lagged: u64,
    /// Reconnects of the session.
    pub reconnects: u64,
    /// `Truncated` notices (history lost before delivery; also counted as violations).
    pub truncated: u64,
    /// Messages of other conversations or without a timestamp (ignored).
    pub foreign: u64,
    /// Why the session ended early, if it did.
    pub error: Option<String>,
    /// Clock reading of the last counted message (0 if none).
    pub last_delivery_ns: u64,
}

/// Reads `session` until `plan.messages` arrived, the session ends, or `stop` turns
/// true. Progress slot `index` follows the received count; latencies go into shard
/// `index` of `latency`.
pub async fn run(
    mut session: Session,
    plan: SubscribePlan,
    clock: Clock,
    index: usize,
    progress: Arc<Counters>,
    latency: Arc<ShardedHistogram>,
    mut stop: watch::Receiver<bool>,
) -> (Session, SubscribeResult) {
    let mut state = State {
        plan,
        clock,
        next_seq: plan.first_seq,
        result: SubscribeResult::default(),
        batch: Vec::with_capacity(LATENCY_BATCH),
    };
    'outer: while state.result.received < plan.messages {
        let mut event = tokio::select! {
            biased;
            event = session.next() => event,
            _ = stop.changed() => break,
        };
        // Handle everything already queued before going back to the select.
        loop {
            match event {
                None => {
                    state.result.error = Some("the session's stream ended".into());
                    break 'outer;
                }
                Some(Err(e)) => {
                    state.result.error = Some(e.to_string());
                    break 'outer;
                }
                Some(Ok(ev)) => {
                    if let Err(reason) = state.on_event(ev) {
                        state.result.error = Some(reason);
                        break 'outer;
                    }
                }
            }
            if state.batch.len() >= LATENCY_BATCH {
                latency.record(index, &state.batch);
                state.batch.clear();
            }
            if state.result.received >= plan.messages {
                break;
            }
            match session.next().now_or_never() {
                Some(next) => event = next,
                None => break,
            }
        }
        latency.record(index, &state.batch);
        state.batch.clear();
        progress.set(index, state.result.received);
    }
    latency.record(index, &state.batch);
    progress.set(index, state.result.received);
    (session, state.result)
}

struct State {
    plan: SubscribePlan,
    clock: Clock,
    /// The seq the next message must have.
    next_seq: u64,
    result: SubscribeResult,
    batch: Vec<u64>,
}

impl State {
    fn on_event(&mut self, event: SessionEvent) -> Result<(), String> {
        match event {
            SessionEvent::Message(m) => {
                if m.conv != self.plan.conv {
                    self.result.foreign += 1;
                    return Ok(());
                }
                let now = self.clock.now_ns();
                if m.seq != self.next_seq {
                    self.violation(format!(
                        "conversation {}: got seq {} where {} was due ({})",
                        m.conv,
                        m.seq,
                        self.next_seq,
                        if m.seq < self.next_seq {
                            "duplicate or out of order"
                        } else {
                            "gap"
                        }
                    ));
                    if m.seq < self.next_seq {
                        return Ok(());
                    }
                }
                self.next_seq = m.seq + 1;
                self.result.received += 1;
                self.result.last_delivery_ns = now;
                match read_stamp(&m.payload) {
                    Some(sent) => self.batch.push(now.saturating_sub(sent) / 1000),
                    None => self.result.foreign += 1,
                }
                Ok(())
            }
            SessionEvent::Lagged { .. } => {
                self.result.lagged += 1;
                Ok(())
            }
            SessionEvent::Reconnected { .. } => {
                self.result.reconnects += 1;
                Ok(())
            }
            SessionEvent::Truncated {
                conv,
                requested_from,
                first_available_seq,
            } => {
                self.result.truncated += 1;
                if conv == self.plan.conv {
                    self.violation(format!(
                        "conversation {conv}: history truncated, seqs {requested_from}..{first_available_seq} lost before delivery"
                    ));
                    self.next_seq = self.next_seq.max(first_available_seq);
                }
                Ok(())
            }
            SessionEvent::Unsubscribed { conv, reason } => {
                if conv == self.plan.conv {
                    Err(format!("unsubscribed from conversation {conv}: {reason}"))
                } else {
                    Ok(())
                }
            }
            // Event kinds added to the client later do not concern this bench.
            _ => Ok(()),
        }
    }

    fn violation(&mut self, what: String) {
        self.result.order_violations += 1;
        if self.result.violation_samples.len() < VIOLATIONS_KEPT {
            self.result.violation_samples.push(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_client::{Message, Principal};

    fn state(first_seq: u64) -> State {
        State {
            plan: SubscribePlan {
                conv: 7,
                first_seq,
                messages: 10,
            },
            clock: Clock::start(),
            next_seq: first_seq,
            result: SubscribeResult::default(),
            batch: Vec::new(),
        }
    }

    fn message(conv: u64, seq: u64) -> SessionEvent {
        SessionEvent::Message(Message {
            conv,
            seq,
            sender: Principal::Service("t".into()),
            timestamp_ms: 0,
            payload: crate::clock::stamped_payload(16, 0),
        })
    }

    #[test]
    fn in_order_messages_count_and_record_latency() {
        let mut s = state(5);
        for seq in 5..8 {
            s.on_event(message(7, seq)).unwrap();
        }
        assert_eq!(s.result.received, 3);
        assert_eq!(s.result.order_violations, 0);
        assert_eq!(s.batch.len(), 3);
        assert!(s.result.last_delivery_ns > 0);
    }

    #[test]
    fn gaps_duplicates_and_reordering_are_violations() {
        let mut s = state(1);
        s.on_event(message(7, 1)).unwrap();
        s.on_event(message(7, 3)).unwrap(); // gap: 2 missing, still counted
        s.on_event(message(7, 3)).unwrap(); // duplicate: not counted
        s.on_event(message(7, 2)).unwrap(); // going back: not counted
        s.on_event(message(7, 4)).unwrap();
        assert_eq!(s.result.received, 3);
        assert_eq!(s.result.order_violations, 3);
        assert_eq!(s.result.violation_samples.len(), 3);
        assert!(
            s.result.violation_samples[0].contains("gap"),
            "{:?}",
            s.result.violation_samples
        );
        assert!(s.result.violation_samples[1].contains("duplicate"));
    }

    #[test]
    fn other_conversations_and_notices_are_not_messages() {
        let mut s = state(1);
        s.on_event(message(8, 1)).unwrap();
        s.on_event(SessionEvent::Lagged { dropped: 3 }).unwrap();
        s.on_event(SessionEvent::Reconnected { addr: "x".into() })
            .unwrap();
        assert_eq!(s.result.received, 0);
        assert_eq!(s.result.foreign, 1);
        assert_eq!(s.result.lagged, 1);
        assert_eq!(s.result.reconnects, 1);
        let refusal = herald_client::Refusal::new(herald_client::RefusalCode::NotMember, "removed");
        assert!(s
            .on_event(SessionEvent::Unsubscribed {
                conv: 7,
                reason: refusal
            })
            .is_err());
    }
}
