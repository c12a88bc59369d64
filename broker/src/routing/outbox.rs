//! One session's bounded outbound queue.
//!
//! Owns: the queued deliveries of one session, the count of deliveries dropped at the
//! bound, and the wake-up of that session's writer task. Many producers (fan-out on any
//! thread) offer; one consumer (the session's writer) waits and drains. Must not: block
//! a producer, allocate on the offer path, read a clock, or decide what a lagging session
//! is told (the session writer does that, from [`Outbox::take_dropped`]).
//!
//! # The state word
//!
//! Everything the writer waits for lives in one `AtomicU64`, so that a producer's single
//! read-modify-write both publishes its event and learns whether the writer is parked,
//! and the writer's single read-modify-write both parks and learns whether there is
//! anything to do. Operations on one atomic are totally ordered, so a wake-up cannot be
//! lost between "check" and "park" — no fences, no second location.
//!
//! ```text
//!  bit 0      CLOSED   set once by close()
//!  bit 1      PARKED   the writer is (about to be) asleep in wait(); producers clear it
//!                      and notify, so only the first producer after a park pays for it
//!  bits 2..32 dropped  deliveries dropped at the bound since take_dropped(), saturating
//!  bits 32..64 queued  pushes counted minus pops counted (i32, wrapping: a pop may be
//!                      counted before its push, making it briefly negative)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use super::Delivery;

/// Largest outbox capacity; larger requests are clamped to it. The bound keeps the
/// `queued` field of the state word (32 bits) far from wrapping and the preallocated
/// ring (16 bytes per slot) of one session at or under 16 MiB.
pub const OUTBOX_CAPACITY_MAX: usize = 1 << 20;

/// The dropped counter saturates here (about 1 billion); beyond it drops are still
/// reported by [`Offer::Dropped`] but no longer counted until the next
/// [`Outbox::take_dropped`]. The session has lagged either way.
pub const OUTBOX_DROPPED_MAX: u64 = (1 << 30) - 1;

const CLOSED: u64 = 1;
const PARKED: u64 = 1 << 1;
const DROPPED_SHIFT: u32 = 2;
const DROPPED_ONE: u64 = 1 << DROPPED_SHIFT;
const DROPPED_MASK: u64 = OUTBOX_DROPPED_MAX << DROPPED_SHIFT;
const QUEUED_SHIFT: u32 = 32;
const QUEUED_ONE: u64 = 1 << QUEUED_SHIFT;

/// What happened to one offered delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued; the writer will drain it.
    Queued,
    /// Queue full: dropped, and the first drop since the last
    /// [`Outbox::take_dropped`]. The caller logs/counts "session lagged".
    Overflowed,
    /// Queue full again: dropped; the session had already lagged.
    Dropped,
    /// The outbox is closed (its session is going away): not queued, not counted.
    Closed,
}

/// One session's bounded outbound queue.
///
/// Multi-producer: [`offer`](Self::offer) may run on any thread, concurrently. Single
/// consumer: [`wait`](Self::wait), [`drain_into`](Self::drain_into) and
/// [`take_dropped`](Self::take_dropped) belong to the session's writer task (a second
/// concurrent consumer stays memory-safe and loses nothing, but may wake spuriously).
///
/// Memory: a fixed ring of `capacity` slots of 16 bytes, allocated up front so that
/// offering never allocates, plus 640 bytes for the outbox in its `Arc` (the ring's
/// head and tail sit on their own cache lines so producers and the writer do not
/// contend).
#[derive(Debug)]
pub struct Outbox {
    /// Producers touch the tail line of the ring, the ring's slot, and `state`.
    queue: ArrayQueue<Arc<Delivery>>,
    state: AtomicU64,
    session_id: u64,
    notify: Notify,
}

impl Outbox {
    /// An empty, open outbox for `session_id` holding at most `capacity` deliveries.
    ///
    /// `capacity` is clamped to `1..=`[`OUTBOX_CAPACITY_MAX`]; its slots are allocated
    /// now.
    pub fn new(session_id: u64, capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity.clamp(1, OUTBOX_CAPACITY_MAX)),
            state: AtomicU64::new(0),
            session_id,
            notify: Notify::new(),
        }
    }

    /// The session this outbox belongs to.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// How many deliveries it holds at most.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Queues `delivery` (one `Arc` clone) for the writer.
    ///
    /// Never blocks, never allocates. At the bound the delivery is dropped and counted
    /// ([`Offer::Overflowed`] for the first drop since the last
    /// [`take_dropped`](Self::take_dropped), [`Offer::Dropped`] after that) and the
    /// writer is woken so that it can tell its session. The waker is touched only when
    /// the writer is parked, so a burst costs one notification, not one per delivery.
    #[inline]
    pub fn offer(&self, delivery: &Arc<Delivery>) -> Offer {
        if self.state.load(Ordering::Relaxed) & CLOSED != 0 {
            return Offer::Closed;
        }
        match self.queue.push(Arc::clone(delivery)) {
            Ok(()) => {
                // Release: the push happens-before a writer that sees this count.
                let prev = self.state.fetch_add(QUEUED_ONE, Ordering::AcqRel);
                if prev & PARKED != 0 {
                    self.unpark();
                }
                Offer::Queued
            }
            Err(_rejected) => self.overflow(),
        }
    }

    /// The full-queue path: count the drop, wake a parked writer.
    #[cold]
    fn overflow(&self) -> Offer {
        let mut current = self.state.load(Ordering::Relaxed);
        // Retries only while other threads change the word under us; each failed
        // compare-exchange means another thread made progress.
        loop {
            if current & CLOSED != 0 {
                return Offer::Closed;
            }
            let dropped = (current & DROPPED_MASK) >> DROPPED_SHIFT;
            let counted = if dropped < OUTBOX_DROPPED_MAX {
                current + DROPPED_ONE
            } else {
                current
            };
            match self.state.compare_exchange_weak(
                current,
                counted & !PARKED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(prev) => {
                    if prev & PARKED != 0 {
                        self.notify.notify_one();
                    }
                    return if dropped == 0 {
                        Offer::Overflowed
                    } else {
                        Offer::Dropped
                    };
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Clears PARKED; whoever clears it notifies (one notification per park).
    #[cold]
    fn unpark(&self) {
        if self.state.fetch_and(!PARKED, Ordering::AcqRel) & PARKED != 0 {
            self.notify.notify_one();
        }
    }

    /// Moves up to `max` queued deliveries into `out`, oldest first; returns how many.
    ///
    /// Pushing into `out` may grow it: reserve it once in the writer, not per call.
    pub fn drain_into(&self, out: &mut Vec<Arc<Delivery>>, max: usize) -> usize {
        let mut moved: usize = 0;
        while moved < max {
            match self.queue.pop() {
                Some(delivery) => {
                    out.push(delivery);
                    moved += 1;
                }
                None => break,
            }
        }
        if moved > 0 {
            // Wrapping, modulo 2^32 like the field itself.
            self.state
                .fetch_sub((moved as u64) << QUEUED_SHIFT, Ordering::AcqRel);
        }
        moved
    }

    /// Deliveries dropped at the bound since the last call (and resets the count to 0).
    /// Non-zero means the session lagged: the writer tells it so and re-sends from history.
    pub fn take_dropped(&self) -> u64 {
        let prev = self.state.fetch_and(!DROPPED_MASK, Ordering::AcqRel);
        (prev & DROPPED_MASK) >> DROPPED_SHIFT
    }

    /// Resolves when the queue is non-empty, something was dropped, or the outbox is
    /// closed (possibly also spuriously: the caller re-checks by draining).
    ///
    /// No lost wake-ups: the writer registers with the notifier, then sets PARKED and
    /// reads the state in one atomic step; a producer that adds after that step sees
    /// PARKED and notifies, one that added before it is seen in the state. Cancel-safe:
    /// dropping the future at worst leaves PARKED set, which costs one spurious
    /// notification.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let prev = self.state.fetch_or(PARKED, Ordering::AcqRel);
            if is_ready(prev) {
                self.state.fetch_and(!PARKED, Ordering::Relaxed);
                return;
            }
            notified.await;
            if is_ready(self.state.load(Ordering::Acquire)) {
                return;
            }
        }
    }

    /// Closes the outbox: later offers return [`Offer::Closed`]; what is queued stays
    /// drainable; a waiting writer wakes.
    pub fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Deliveries queued now.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Something for the writer to do: queued deliveries, drops to report, or closed.
fn is_ready(state: u64) -> bool {
    let queued = (state >> QUEUED_SHIFT) as u32 as i32;
    queued > 0 || state & (DROPPED_MASK | CLOSED) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64) -> Arc<Delivery> {
        Arc::new(Delivery::new(
            7,
            seq,
            bytes::Bytes::from(seq.to_le_bytes().to_vec()),
        ))
    }

    fn seqs(out: &[Arc<Delivery>]) -> Vec<u64> {
        out.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn fifo_order() {
        let outbox = Outbox::new(1, 8);
        for seq in 1..=5 {
            assert_eq!(outbox.offer(&delivery(seq)), Offer::Queued);
        }
        assert_eq!(outbox.len(), 5);
        let mut out = Vec::new();
        assert_eq!(outbox.drain_into(&mut out, 2), 2);
        assert_eq!(outbox.drain_into(&mut out, 100), 3);
        assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5]);
        assert!(outbox.is_empty());
        assert_eq!(outbox.drain_into(&mut out, 100), 0);
    }

    #[test]
    fn overflow_reports_once_then_dropped_and_counts() {
        let outbox = Outbox::new(1, 2);
        assert_eq!(outbox.offer(&delivery(1)), Offer::Queued);
        assert_eq!(outbox.offer(&delivery(2)), Offer::Queued);
        assert_eq!(outbox.offer(&delivery(3)), Offer::Overflowed);
        assert_eq!(outbox.offer(&delivery(4)), Offer::Dropped);
        assert_eq!(outbox.offer(&delivery(5)), Offer::Dropped);
        assert_eq!(outbox.take_dropped(), 3);
        assert_eq!(outbox.take_dropped(), 0);
        // Still full: the next drop is a new lag, reported as such.
        assert_eq!(outbox.offer(&delivery(6)), Offer::Overflowed);
        let mut out = Vec::new();
        outbox.drain_into(&mut out, 10);
        assert_eq!(seqs(&out), vec![1, 2]);
        assert_eq!(outbox.offer(&delivery(7)), Offer::Queued);
        assert_eq!(outbox.take_dropped(), 1);
    }

    #[test]
    fn dropped_deliveries_are_released() {
        let outbox = Outbox::new(1, 1);
        let first = delivery(1);
        let second = delivery(2);
        outbox.offer(&first);
        assert_eq!(outbox.offer(&second), Offer::Overflowed);
        assert_eq!(Arc::strong_count(&first), 2);
        assert_eq!(Arc::strong_count(&second), 1);
    }

    #[test]
    fn capacity_is_clamped() {
        assert_eq!(Outbox::new(1, 0).capacity(), 1);
        assert_eq!(Outbox::new(1, 3).capacity(), 3);
    }

    #[test]
    fn closed_outbox_refuses_and_stays_drainable() {
        let outbox = Outbox::new(1, 4);
        outbox.offer(&delivery(1));
        outbox.close();
        assert!(outbox.is_closed());
        assert_eq!(outbox.offer(&delivery(2)), Offer::Closed);
        let mut out = Vec::new();
        assert_eq!(outbox.drain_into(&mut out, 10), 1);
        assert_eq!(outbox.take_dropped(), 0);
    }

    #[tokio::test]
    async fn wait_returns_at_once_when_ready() {
        let outbox = Outbox::new(1, 1);
        outbox.offer(&delivery(1));
        outbox.wait().await;
        outbox.offer(&delivery(2)); // dropped
        let mut out = Vec::new();
        outbox.drain_into(&mut out, 10);
        outbox.wait().await; // the drop is pending
        assert_eq!(outbox.take_dropped(), 1);
        outbox.close();
        outbox.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wait_loses_no_wake_up() {
        const DELIVERIES: u64 = 20_000;
        let outbox = Arc::new(Outbox::new(1, 16));
        let consumer = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move {
                let mut received = Vec::with_capacity(DELIVERIES as usize);
                let mut batch = Vec::with_capacity(16);
                while (received.len() as u64) < DELIVERIES {
                    outbox.wait().await;
                    outbox.drain_into(&mut batch, 16);
                    received.extend(batch.drain(..).map(|d| d.seq));
                    assert_eq!(outbox.take_dropped(), 0);
                }
                received
            })
        };
        let producer = {
            let outbox = Arc::clone(&outbox);
            std::thread::spawn(move || {
                for seq in 1..=DELIVERIES {
                    let delivery = delivery(seq);
                    // The queue is small: back off while it is full instead of dropping,
                    // so that every wake-up path (parked, not parked) is exercised.
                    while outbox.len() >= outbox.capacity() {
                        std::thread::yield_now();
                    }
                    assert_eq!(outbox.offer(&delivery), Offer::Queued);
                }
            })
        };
        producer.join().unwrap();
        let received = consumer.await.unwrap();
        assert_eq!(received, (1..=DELIVERIES).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn close_wakes_a_parked_writer() {
        let outbox = Arc::new(Outbox::new(1, 4));
        let waiter = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { outbox.wait().await })
        };
        tokio::task::yield_now().await;
        outbox.close();
        waiter.await.unwrap();
    }
}
