//! The routing table: conversation → the outboxes of the local sessions subscribed to it.
//!
//! Owns: the subscriber lists and the local fan-out loop. Must not: block fan-out on
//! subscribe/unsubscribe, take a lock while offering, touch sockets, clocks or the store.
//!
//! # Layout
//!
//! `DashMap<conv, Arc<Conversation>>`; a conversation holds an
//! `ArcSwap<Subscribers>` (the immutable snapshot fan-out reads) and a writer mutex
//! (only subscribe/unsubscribe take it). A snapshot is a list of chunks of at most
//! [`SUBSCRIBER_CHUNK_LEN`] outboxes, all full but the last; a change copies the chunk
//! vector (`len / SUBSCRIBER_CHUNK_LEN` pointers) and the one or two chunks it edits, so
//! churn on a channel with a million local followers stays cheap. Removal moves the
//! last subscriber into the freed position; a per-conversation `session → position`
//! index (writer side only) finds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use super::{Delivery, Offer, Outbox};

/// Subscriber lists are stored in chunks of this many outboxes. The bound on what one
/// subscribe/unsubscribe copies: one or two chunks plus one pointer per chunk.
pub const SUBSCRIBER_CHUNK_LEN: usize = 1024;

/// Tuning of a [`Router`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterConfig {
    /// A conversation with at least this many local subscribers is fanned out on up to
    /// [`fanout_threads_max`](Self::fanout_threads_max) threads (scoped threads started
    /// per fan-out; below this the start-up would cost more than it saves).
    pub parallel_fanout_min_subscribers: usize,
    /// Most threads one fan-out uses, the caller's included. 1 = never split.
    pub fanout_threads_max: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            parallel_fanout_min_subscribers: 65_536,
            fanout_threads_max: std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(4),
        }
    }
}

/// What one fan-out did, by [`Offer`] outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanoutStats {
    /// Queued for a session.
    pub queued: u64,
    /// Dropped at a full outbox that had not lagged before: one per newly lagging session.
    pub overflowed: u64,
    /// Dropped at a full outbox that had already lagged.
    pub dropped: u64,
    /// Not offered: the outbox is closed (its session is going away).
    pub closed: u64,
}

impl FanoutStats {
    /// Outboxes offered to (every outcome).
    pub fn offered(&self) -> u64 {
        self.queued + self.overflowed + self.dropped + self.closed
    }

    fn add(&mut self, other: FanoutStats) {
        self.queued += other.queued;
        self.overflowed += other.overflowed;
        self.dropped += other.dropped;
        self.closed += other.closed;
    }
}

/// conversation → the outboxes of local sessions subscribed to it.
#[derive(Debug, Default)]
pub struct Router {
    conversations: DashMap<u64, Arc<Conversation>>,
    config: RouterConfig,
}

impl Router {
    /// An empty router with the default [`RouterConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty router with `config`.
    pub fn with_config(config: RouterConfig) -> Self {
        Self {
            conversations: DashMap::new(),
            config,
        }
    }

    /// Subscribes `outbox` to `conv`; false if that session was already subscribed.
    ///
    /// Never blocks fan-out: builds a new snapshot and swaps it in. Concurrent
    /// subscribe/unsubscribe of one conversation serialise on its writer mutex.
    pub fn subscribe(&self, conv: u64, outbox: &Arc<Outbox>) -> bool {
        self.subscribe_many(conv, std::slice::from_ref(outbox)) == 1
    }

    /// Subscribes every outbox of `outboxes` to `conv` with one snapshot swap; returns
    /// how many were not subscribed before (duplicates are skipped).
    pub fn subscribe_many(&self, conv: u64, outboxes: &[Arc<Outbox>]) -> usize {
        if outboxes.is_empty() {
            return 0;
        }
        // Retries only when the entry we found was emptied and removed before we locked
        // it, i.e. only while other threads keep making progress on this conversation.
        loop {
            let entry = self.entry_or_insert(conv);
            let mut writer = lock(&entry.writer);
            if writer.removed {
                continue;
            }
            let current = entry.subscribers.load_full();
            let mut added = Vec::with_capacity(outboxes.len());
            for outbox in outboxes {
                let position = current.len + added.len();
                if let std::collections::hash_map::Entry::Vacant(vacant) =
                    writer.positions.entry(outbox.session_id())
                {
                    vacant.insert(position);
                    added.push(Arc::clone(outbox));
                }
            }
            let count = added.len();
            if count > 0 {
                entry
                    .subscribers
                    .store(Arc::new(current.with_appended(added)));
            } else if current.len == 0 {
                // Nothing subscribed to a conversation we just created: do not leave an
                // empty entry behind.
                self.remove_entry(conv, &entry, &mut writer);
            }
            return count;
        }
    }

    /// Unsubscribes `session_id` from `conv`; false if it was not subscribed. Removes the
    /// conversation's entry with its last subscriber.
    pub fn unsubscribe(&self, conv: u64, session_id: u64) -> bool {
        let Some(entry) = self.entry(conv) else {
            return false;
        };
        let mut writer = lock(&entry.writer);
        if writer.removed {
            return false;
        }
        let Some(position) = writer.positions.remove(&session_id) else {
            return false;
        };
        let current = entry.subscribers.load_full();
        let (next, moved) = current.without(position);
        if let Some(moved) = moved {
            writer.positions.insert(moved, position);
        }
        let now_empty = next.len == 0;
        entry.subscribers.store(Arc::new(next));
        if now_empty {
            self.remove_entry(conv, &entry, &mut writer);
        }
        true
    }

    /// Offers `delivery` to every outbox subscribed to `delivery.conv` and counts the
    /// outcomes.
    ///
    /// Takes no lock: a dashmap shard read guard is held only to clone the
    /// conversation's `Arc`, then the subscriber snapshot is loaded from an `ArcSwap`.
    /// Subscribers that join or leave during the call may or may not get it; everyone
    /// subscribed throughout gets it exactly once. Lists of at least
    /// [`RouterConfig::parallel_fanout_min_subscribers`] are split across threads; the
    /// call returns when every outbox was offered. This is CPU work proportional to the
    /// subscriber count (tens of ms for a million): run huge fan-outs off the async
    /// reactor threads.
    pub fn fan_out(&self, delivery: &Arc<Delivery>) -> FanoutStats {
        let Some(entry) = self.entry(delivery.conv) else {
            return FanoutStats::default();
        };
        let snapshot = entry.subscribers.load_full();
        drop(entry);
        let threads = self.threads_for(snapshot.len);
        if threads <= 1 {
            return offer_chunks(&snapshot.chunks, delivery);
        }
        fan_out_parallel(&snapshot.chunks, delivery, threads)
    }

    /// Local sessions subscribed to `conv`.
    pub fn subscriber_count(&self, conv: u64) -> usize {
        self.entry(conv)
            .map_or(0, |entry| entry.subscribers.load().len)
    }

    /// Conversations with at least one local subscriber.
    pub fn conversation_count(&self) -> usize {
        self.conversations.len()
    }

    /// The conversations with at least one local subscriber (a moment's view).
    pub fn conversation_ids(&self) -> Vec<u64> {
        self.conversations
            .iter()
            .map(|entry| *entry.key())
            .collect()
    }

    fn threads_for(&self, subscribers: usize) -> usize {
        if subscribers < self.config.parallel_fanout_min_subscribers.max(1) {
            return 1;
        }
        let chunks = subscribers.div_ceil(SUBSCRIBER_CHUNK_LEN);
        self.config.fanout_threads_max.min(chunks)
    }

    /// The conversation's entry; the shard guard lives only for the `Arc` clone.
    fn entry(&self, conv: u64) -> Option<Arc<Conversation>> {
        self.conversations
            .get(&conv)
            .map(|entry| Arc::clone(entry.value()))
    }

    fn entry_or_insert(&self, conv: u64) -> Arc<Conversation> {
        if let Some(entry) = self.entry(conv) {
            return entry;
        }
        Arc::clone(
            self.conversations
                .entry(conv)
                .or_insert_with(|| Arc::new(Conversation::new()))
                .value(),
        )
    }

    /// Marks `entry` removed and takes it out of the map, under its writer lock, so a
    /// subscriber that found it before sees `removed` and retries with a fresh entry.
    fn remove_entry(&self, conv: u64, entry: &Arc<Conversation>, writer: &mut WriterState) {
        writer.removed = true;
        self.conversations
            .remove_if(&conv, |_, present| Arc::ptr_eq(present, entry));
    }
}

/// One conversation's local subscribers.
#[derive(Debug)]
struct Conversation {
    /// What fan-out reads.
    subscribers: ArcSwap<Subscribers>,
    /// Serialises subscribe/unsubscribe of this conversation; fan-out never takes it.
    writer: Mutex<WriterState>,
}

impl Conversation {
    fn new() -> Self {
        Self {
            subscribers: ArcSwap::from_pointee(Subscribers::default()),
            writer: Mutex::new(WriterState::default()),
        }
    }
}

#[derive(Debug, Default)]
struct WriterState {
    /// Taken out of the map: subscribers must retry with a fresh entry.
    removed: bool,
    /// session → position in the snapshot; one entry per subscriber.
    positions: HashMap<u64, usize>,
}

/// An immutable snapshot of a subscriber list: chunks of [`SUBSCRIBER_CHUNK_LEN`]
/// outboxes, all full except the last, none empty.
#[derive(Debug, Default)]
struct Subscribers {
    chunks: Vec<Arc<[Arc<Outbox>]>>,
    len: usize,
}

impl Subscribers {
    /// This list with `added` appended.
    fn with_appended(&self, added: Vec<Arc<Outbox>>) -> Subscribers {
        let mut chunks = self.chunks.clone();
        let mut tail: Vec<Arc<Outbox>> = match chunks.last() {
            Some(last) if last.len() < SUBSCRIBER_CHUNK_LEN => {
                let mut tail =
                    Vec::with_capacity(SUBSCRIBER_CHUNK_LEN.min(last.len() + added.len()));
                tail.extend(last.iter().cloned());
                chunks.pop();
                tail
            }
            _ => Vec::new(),
        };
        let len = self.len + added.len();
        for outbox in added {
            if tail.len() == SUBSCRIBER_CHUNK_LEN {
                chunks.push(Arc::from(std::mem::take(&mut tail)));
            }
            tail.push(outbox);
        }
        if !tail.is_empty() {
            chunks.push(Arc::from(tail));
        }
        Subscribers { chunks, len }
    }

    /// This list without the outbox at `position`: the last one moves into its place.
    /// Returns the new list and the session id of the moved outbox, if one moved.
    fn without(&self, position: usize) -> (Subscribers, Option<u64>) {
        let Some(last_position) = self.len.checked_sub(1) else {
            return (Subscribers::default(), None);
        };
        let mut chunks = self.chunks.clone();
        let last_chunk_index = last_position / SUBSCRIBER_CHUNK_LEN;
        let mut last_chunk: Vec<Arc<Outbox>> = match chunks.get(last_chunk_index) {
            Some(chunk) => chunk.to_vec(),
            None => Vec::new(),
        };
        let tail = last_chunk.pop();
        let mut moved = None;
        if let Some(tail) = tail.filter(|_| position < last_position) {
            let (chunk_index, slot) = (
                position / SUBSCRIBER_CHUNK_LEN,
                position % SUBSCRIBER_CHUNK_LEN,
            );
            moved = Some(tail.session_id());
            if chunk_index == last_chunk_index {
                if let Some(place) = last_chunk.get_mut(slot) {
                    *place = tail;
                }
            } else if let Some(chunk) = chunks.get_mut(chunk_index) {
                let mut edited = chunk.to_vec();
                if let Some(place) = edited.get_mut(slot) {
                    *place = tail;
                }
                *chunk = Arc::from(edited);
            }
        }
        chunks.truncate(last_chunk_index);
        if !last_chunk.is_empty() {
            chunks.push(Arc::from(last_chunk));
        }
        (
            Subscribers {
                chunks,
                len: last_position,
            },
            moved,
        )
    }
}

/// Offers `delivery` to every outbox of `chunks` on this thread.
fn offer_chunks(chunks: &[Arc<[Arc<Outbox>]>], delivery: &Arc<Delivery>) -> FanoutStats {
    let mut stats = FanoutStats::default();
    for chunk in chunks {
        for outbox in chunk.iter() {
            match outbox.offer(delivery) {
                Offer::Queued => stats.queued += 1,
                Offer::Overflowed => stats.overflowed += 1,
                Offer::Dropped => stats.dropped += 1,
                Offer::Closed => stats.closed += 1,
            }
        }
    }
    stats
}

/// Splits `chunks` into `threads` contiguous parts; the caller takes the first, scoped
/// threads the rest. Each helper offers its own `Arc<Delivery>` (same bytes, one
/// allocation per helper) so that the threads do not fight over one reference count's
/// cache line.
fn fan_out_parallel(
    chunks: &[Arc<[Arc<Outbox>]>],
    delivery: &Arc<Delivery>,
    threads: usize,
) -> FanoutStats {
    let per_thread = chunks.len().div_ceil(threads.max(1)).max(1);
    let mut parts = chunks.chunks(per_thread);
    let first = parts.next().unwrap_or(&[]);
    std::thread::scope(|scope| {
        let helpers: Vec<_> = parts
            .map(|part| {
                let own = Arc::new(Delivery::clone(delivery));
                scope.spawn(move || offer_chunks(part, &own))
            })
            .collect();
        let mut stats = offer_chunks(first, delivery);
        for helper in helpers {
            match helper.join() {
                Ok(part) => stats.add(part),
                // offer_chunks does not panic; if it ever did, re-raise it here rather
                // than report a partial fan-out as complete.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        stats
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The writer state is updated before the snapshot is swapped and nothing in between
    // can panic short of allocation failure (which aborts), so a poisoned lock still
    // guards consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(conv: u64, seq: u64) -> Arc<Delivery> {
        Arc::new(Delivery::new(conv, seq, Bytes::from_static(b"frame")))
    }

    fn outbox(session_id: u64, capacity: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(session_id, capacity))
    }

    fn drained(outbox: &Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        outbox.drain_into(&mut out, usize::MAX);
        out.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn subscribe_unsubscribe_and_duplicates() {
        let router = Router::new();
        let a = outbox(1, 8);
        let b = outbox(2, 8);
        assert!(router.subscribe(10, &a));
        assert!(!router.subscribe(10, &a));
        assert!(router.subscribe(10, &b));
        assert!(router.subscribe(11, &a));
        assert_eq!(router.subscriber_count(10), 2);
        assert_eq!(router.subscriber_count(11), 1);
        assert_eq!(router.conversation_count(), 2);
        assert!(router.unsubscribe(10, 1));
        assert!(!router.unsubscribe(10, 1));
        assert!(!router.unsubscribe(12, 1));
        assert_eq!(router.subscriber_count(10), 1);
        let stats = router.fan_out(&delivery(10, 1));
        assert_eq!(stats.queued, 1);
        assert_eq!(drained(&b), vec![1]);
        assert!(drained(&a).is_empty());
    }

    #[test]
    fn entry_removed_with_last_subscriber() {
        let router = Router::new();
        let a = outbox(1, 8);
        let b = outbox(2, 8);
        router.subscribe(10, &a);
        router.subscribe(10, &b);
        router.unsubscribe(10, 2);
        assert_eq!(router.conversation_count(), 1);
        router.unsubscribe(10, 1);
        assert_eq!(router.conversation_count(), 0);
        assert_eq!(router.subscriber_count(10), 0);
        assert_eq!(router.fan_out(&delivery(10, 1)), FanoutStats::default());
        assert_eq!(router.subscribe_many(10, &[]), 0);
        assert_eq!(router.conversation_count(), 0);
        // A fresh subscribe recreates it.
        assert!(router.subscribe(10, &a));
        assert_eq!(router.fan_out(&delivery(10, 2)).queued, 1);
        assert_eq!(drained(&a), vec![2]);
    }

    #[test]
    fn full_outbox_does_not_affect_others() {
        let router = Router::new();
        let slow = outbox(1, 2);
        let fast = outbox(2, 64);
        router.subscribe(10, &slow);
        router.subscribe(10, &fast);
        let mut totals = Vec::new();
        for seq in 1..=5 {
            totals.push(router.fan_out(&delivery(10, seq)));
        }
        let sum = totals.iter().fold(FanoutStats::default(), |mut acc, s| {
            acc.add(*s);
            acc
        });
        assert_eq!(
            sum,
            FanoutStats {
                queued: 7,
                overflowed: 1,
                dropped: 2,
                closed: 0
            }
        );
        assert_eq!(totals[2].overflowed, 1);
        assert_eq!(slow.take_dropped(), 3);
        assert_eq!(drained(&slow), vec![1, 2]);
        assert_eq!(drained(&fast), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn fan_out_to_closed_outbox_reports_closed() {
        let router = Router::new();
        let open = outbox(1, 8);
        let closed = outbox(2, 8);
        router.subscribe(10, &open);
        router.subscribe(10, &closed);
        closed.close();
        let stats = router.fan_out(&delivery(10, 1));
        assert_eq!(
            stats,
            FanoutStats {
                queued: 1,
                overflowed: 0,
                dropped: 0,
                closed: 1
            }
        );
        assert_eq!(stats.offered(), 2);
    }

    #[test]
    fn fan_out_only_reaches_the_conversation() {
        let router = Router::new();
        let a = outbox(1, 8);
        let b = outbox(2, 8);
        router.subscribe(10, &a);
        router.subscribe(11, &b);
        router.fan_out(&delivery(11, 1));
        assert!(drained(&a).is_empty());
        assert_eq!(drained(&b), vec![1]);
    }

    /// Many chunks: removal from the middle, from the last chunk, and down to empty keep
    /// exactly the remaining sessions, each once.
    #[test]
    fn large_lists_stay_consistent_through_churn() {
        let router = Router::new();
        let total = SUBSCRIBER_CHUNK_LEN * 3 + 17;
        let outboxes: Vec<_> = (0..total as u64).map(|id| outbox(id, 4)).collect();
        assert_eq!(router.subscribe_many(10, &outboxes[..100]), 100);
        for o in &outboxes[100..] {
            assert!(router.subscribe(10, o));
        }
        assert_eq!(router.subscribe_many(10, &outboxes[..10]), 0);
        assert_eq!(router.subscriber_count(10), total);
        // Remove every third session, in an order that hits every chunk.
        let mut remaining: Vec<u64> = Vec::new();
        for id in (0..total as u64).rev() {
            if id % 3 == 0 {
                assert!(router.unsubscribe(10, id));
            } else {
                remaining.push(id);
            }
        }
        assert_eq!(router.subscriber_count(10), remaining.len());
        let stats = router.fan_out(&delivery(10, 1));
        assert_eq!(stats.queued, remaining.len() as u64);
        for (id, o) in outboxes.iter().enumerate() {
            let expected: Vec<u64> = if id % 3 == 0 { vec![] } else { vec![1] };
            assert_eq!(drained(o), expected, "session {id}");
        }
        for id in remaining {
            assert!(router.unsubscribe(10, id));
        }
        assert_eq!(router.conversation_count(), 0);
    }

    #[test]
    fn parallel_fan_out_reaches_everyone_in_order() {
        let router = Router::with_config(RouterConfig {
            parallel_fanout_min_subscribers: 1,
            fanout_threads_max: 3,
        });
        let total = SUBSCRIBER_CHUNK_LEN * 4 + 5;
        let outboxes: Vec<_> = (0..total as u64).map(|id| outbox(id, 8)).collect();
        router.subscribe_many(10, &outboxes);
        for seq in 1..=3 {
            assert_eq!(router.fan_out(&delivery(10, seq)).queued, total as u64);
        }
        for o in &outboxes {
            assert_eq!(drained(o), vec![1, 2, 3]);
        }
    }

    /// Fan-out runs while another thread churns subscriptions: every outbox subscribed
    /// throughout gets every delivery, in order; churned ones get an ordered subset.
    #[test]
    fn fan_out_during_churn() {
        const DELIVERIES: u64 = 2_000;
        const STEADY: u64 = 300;
        let router = Arc::new(Router::new());
        let steady: Vec<_> = (0..STEADY).map(|id| outbox(id, 4096)).collect();
        router.subscribe_many(10, &steady[..STEADY as usize / 2]);
        for o in &steady[STEADY as usize / 2..] {
            router.subscribe(10, o);
        }
        let churned: Vec<_> = (1_000..1_200).map(|id| outbox(id, 4096)).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churner = {
            let router = Arc::clone(&router);
            let churned = churned.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for o in &churned {
                        router.subscribe(10, o);
                    }
                    for o in churned.iter().rev() {
                        router.unsubscribe(10, o.session_id());
                    }
                    // Another conversation that keeps being created and removed.
                    router.subscribe(11, &churned[0]);
                    router.unsubscribe(11, churned[0].session_id());
                    rounds += 1;
                }
                rounds
            })
        };
        let publisher = {
            let router = Arc::clone(&router);
            std::thread::spawn(move || {
                for seq in 1..=DELIVERIES {
                    let stats = router.fan_out(&delivery(10, seq));
                    assert!(stats.queued >= STEADY);
                    assert_eq!(stats.overflowed + stats.dropped + stats.closed, 0);
                }
            })
        };
        publisher.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = churner.join().unwrap();
        assert!(rounds > 0);
        let all: Vec<u64> = (1..=DELIVERIES).collect();
        for o in &steady {
            assert_eq!(drained(o), all, "session {}", o.session_id());
        }
        for o in &churned {
            let got = drained(o);
            assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order");
        }
        assert_eq!(router.subscriber_count(10), STEADY as usize);
        assert_eq!(router.conversation_count(), 1);
    }
}
