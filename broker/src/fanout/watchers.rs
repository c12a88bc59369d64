//! The leader side of watch streams: which nodes watch which conversations of a group
//! this node leads, and the push of every committed message to them.
//!
//! Owns: [`Watcher`] (one per open watch stream: a bounded queue of events and the
//! stream task that writes them), [`WatcherTable`] (conversation → watchers, kept in
//! the group's state machine so registering and computing a head happen atomically with
//! apply), [`PushBatch`] (one entry's messages, one event per watcher), and
//! [`serve_watch`].
//! Must not: block apply: a push is a non-blocking queue offer; a watcher whose queue
//! is full is ended (its node reopens the watch and catches up from history).
//!
//! | bound | value | at the bound |
//! |---|---|---|
//! | [`WATCH_QUEUE_EVENTS_MAX`] | events queued per watcher | the watch is ended with `Closing` |
//! | [`WATCH_QUEUE_BYTES_MAX`] | frame bytes queued per watcher | the watch is ended with `Closing` |
//! | [`WATCH_CONVS_MAX`] | conversations per watch | further `Add`s are ignored; the watch is ended |
//! | [`WATCH_BATCH_BYTES_MAX`] | frame bytes per `Messages` event | the batch is split |

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::engine::Group;
use crate::raft::network::frame::{
    encode_frame, read_frame, write_frame_open, PeerReply, WATCH_CONVS_MAX,
};
use crate::raft::network::watch::{
    PushedMessage, WatchControl, WatchEvent, WATCH_BATCH_BYTES_MAX, WATCH_CONTROL_BYTES_MAX,
    WATCH_EVENT_BYTES_MAX, WATCH_HEARTBEAT,
};
use crate::raft::NodeId;
use crate::routing::Delivery;

/// Events queued for one watcher, at most.
pub const WATCH_QUEUE_EVENTS_MAX: usize = 1024;
/// Frame bytes queued for one watcher, at most.
pub const WATCH_QUEUE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// One open watch stream, as the leader sees it.
pub struct Watcher {
    /// Unique on this node.
    pub id: u64,
    /// The watching node.
    pub node: NodeId,
    /// Events with the bytes each was counted as.
    queue: mpsc::Sender<(WatchEvent, usize)>,
    queued_bytes: AtomicUsize,
    overflowed: AtomicBool,
    wake: Notify,
}

impl Watcher {
    /// A watcher of `node` and the receiving end of its queue.
    pub fn new(node: NodeId) -> (Arc<Watcher>, mpsc::Receiver<(WatchEvent, usize)>) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let (queue, rx) = mpsc::channel(WATCH_QUEUE_EVENTS_MAX);
        let watcher = Arc::new(Watcher {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            node,
            queue,
            queued_bytes: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        (watcher, rx)
    }

    /// Offers an event of about `bytes` frame bytes; at a bound the watcher is ended.
    pub fn push(&self, event: WatchEvent, bytes: usize) {
        if self.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let queued = self
            .queued_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        if queued > WATCH_QUEUE_BYTES_MAX || self.queue.try_send((event, bytes)).is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    fn written(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Which watchers watch which conversation of one group (kept under the group's state
/// lock).
#[derive(Default)]
pub struct WatcherTable {
    by_conv: HashMap<u64, Vec<Arc<Watcher>>>,
    convs_of: HashMap<u64, HashSet<u64>>,
}

impl WatcherTable {
    /// `watcher` watches `conv` from now on; false if it already did or is at its bound.
    pub fn add(&mut self, watcher: &Arc<Watcher>, conv: u64) -> bool {
        let convs = self.convs_of.entry(watcher.id).or_default();
        if convs.len() >= WATCH_CONVS_MAX || !convs.insert(conv) {
            return false;
        }
        self.by_conv.entry(conv).or_default().push(watcher.clone());
        true
    }

    /// `watcher` stops watching `conv`.
    pub fn remove(&mut self, watcher: u64, conv: u64) {
        if let Some(convs) = self.convs_of.get_mut(&watcher) {
            convs.remove(&conv);
        }
        self.drop_from(conv, watcher);
    }

    /// `watcher` is gone.
    pub fn remove_watcher(&mut self, watcher: u64) {
        for conv in self.convs_of.remove(&watcher).unwrap_or_default() {
            self.drop_from(conv, watcher);
        }
    }

    fn drop_from(&mut self, conv: u64, watcher: u64) {
        if let Some(list) = self.by_conv.get_mut(&conv) {
            list.retain(|w| w.id != watcher);
            if list.is_empty() {
                self.by_conv.remove(&conv);
            }
        }
    }

    /// The watchers of `conv`.
    pub fn of(&self, conv: u64) -> &[Arc<Watcher>] {
        self.by_conv.get(&conv).map_or(&[], Vec::as_slice)
    }

    /// Every watcher ends (this node stepped down: their streams close on their own).
    pub fn clear(&mut self) {
        self.by_conv.clear();
        self.convs_of.clear();
    }

    /// Open watches.
    pub fn watcher_count(&self) -> usize {
        self.convs_of.len()
    }
}

/// One log entry's messages, gathered per watcher and pushed as one event each.
#[derive(Default)]
pub struct PushBatch {
    per_watcher: HashMap<u64, (Arc<Watcher>, Vec<PushedMessage>, usize)>,
    /// Copies queued for other nodes (one per watching node and message).
    pub copies: u64,
}

impl PushBatch {
    /// Adds `delivery` for each of `watchers`.
    pub fn add(&mut self, watchers: &[Arc<Watcher>], delivery: &Delivery) {
        for watcher in watchers {
            let (_, messages, bytes) = self
                .per_watcher
                .entry(watcher.id)
                .or_insert_with(|| (watcher.clone(), Vec::new(), 0));
            if *bytes >= WATCH_BATCH_BYTES_MAX {
                let full = std::mem::take(messages);
                watcher.push(WatchEvent::Messages(full), *bytes);
                *bytes = 0;
            }
            messages.push(PushedMessage {
                conv: delivery.conv,
                seq: delivery.seq,
                frame: delivery.frame.to_vec(),
                stored_ms: delivery.stored_ms,
            });
            *bytes += delivery.frame.len() + 24;
            self.copies += 1;
        }
    }

    /// Queues every gathered batch.
    pub fn flush(self) {
        for (_, (watcher, messages, bytes)) in self.per_watcher {
            if !messages.is_empty() {
                watcher.push(WatchEvent::Messages(messages), bytes);
            }
        }
    }
}

/// Serves one watch stream of `group` (this node must lead it) until either side ends
/// it. `peer` is the watching node.
pub async fn serve_watch(
    group: &Group,
    peer: NodeId,
    convs: Vec<u64>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    if !group.sm.is_leader() {
        let reply = PeerReply::NotLeader {
            leader: group.leader_addr(),
        };
        crate::raft::network::server::send_reply(&mut send, &reply).await;
        return;
    }
    let (watcher, mut events) = Watcher::new(peer);
    let heads = group.sm.watch(&watcher, &convs);
    let reply = PeerReply::Watching { heads };
    let opened = match encode_frame(&reply, "reply", reply.bytes_max()) {
        Ok(bytes) => write_frame_open(&mut send, &bytes, "reply").await.is_ok(),
        Err(e) => {
            tracing::warn!(group = group.id, error = %e, "cannot encode a watch reply");
            false
        }
    };
    if !opened {
        group.sm.unwatch(watcher.id);
        return;
    }
    // Controls are read in a task of their own: a read cut short by `select!` would lose
    // the bytes it had taken.
    let (controls_tx, mut controls) = mpsc::channel::<WatchControl>(64);
    let reader = tokio::spawn(async move {
        while let Ok(control) =
            read_frame::<WatchControl>(&mut recv, "watch control", WATCH_CONTROL_BYTES_MAX).await
        {
            if controls_tx.send(control).await.is_err() {
                return;
            }
        }
    });
    let mut leader = group.sm.leader_watch();
    let mut heartbeat = tokio::time::interval(WATCH_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat_frame =
        encode_frame(&WatchEvent::Heartbeat, "watch event", WATCH_EVENT_BYTES_MAX).ok();
    let closing = loop {
        tokio::select! {
            biased;
            () = watcher.wake.notified() => break Some("the watcher fell too far behind; reopen the watch and catch up from history"),
            changed = leader.changed() => {
                if changed.is_err() || !*leader.borrow_and_update() {
                    break Some("this node no longer leads the group");
                }
            }
            event = events.recv() => {
                let Some((event, counted)) = event else { break None };
                let bytes = match encode_frame(&event, "watch event", WATCH_EVENT_BYTES_MAX) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        tracing::warn!(group = group.id, peer, error = %e, "cannot encode a watch event; ending the watch");
                        break Some("an event could not be encoded");
                    }
                };
                if write_frame_open(&mut send, &bytes, "watch event").await.is_err() {
                    break None;
                }
                watcher.written(counted);
                heartbeat.reset();
            }
            _ = heartbeat.tick() => {
                if let Some(bytes) = &heartbeat_frame {
                    if write_frame_open(&mut send, bytes, "watch event").await.is_err() {
                        break None;
                    }
                }
            }
            control = controls.recv() => match control {
                Some(WatchControl::Add(conv)) => group.sm.watch_add(&watcher, conv),
                Some(WatchControl::Remove(conv)) => group.sm.watch_remove(watcher.id, conv),
                None => break None,
            },
        }
    };
    group.sm.unwatch(watcher.id);
    reader.abort();
    if let Some(reason) = closing {
        tracing::debug!(group = group.id, peer, reason, "ending a watch");
        if let Ok(bytes) = encode_frame(
            &WatchEvent::Closing(reason.into()),
            "watch event",
            WATCH_EVENT_BYTES_MAX,
        ) {
            let _ = write_frame_open(&mut send, &bytes, "watch event").await;
        }
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(conv: u64, seq: u64, len: usize) -> Delivery {
        Delivery::new(conv, seq, bytes::Bytes::from(vec![7u8; len]))
    }

    #[test]
    fn the_table_tracks_conversations_per_watcher() {
        let (a, _ra) = Watcher::new(2);
        let (b, _rb) = Watcher::new(3);
        let mut table = WatcherTable::default();
        assert!(table.add(&a, 10));
        assert!(!table.add(&a, 10), "twice is once");
        assert!(table.add(&b, 10));
        assert!(table.add(&a, 11));
        assert_eq!(table.of(10).len(), 2);
        table.remove(a.id, 10);
        assert_eq!(
            table.of(10).iter().map(|w| w.id).collect::<Vec<_>>(),
            [b.id]
        );
        table.remove_watcher(a.id);
        assert!(table.of(11).is_empty());
        assert_eq!(table.watcher_count(), 1);
        table.clear();
        assert!(table.of(10).is_empty());
    }

    #[tokio::test]
    async fn a_batch_sends_one_event_per_watcher_in_order() {
        let (a, mut ra) = Watcher::new(2);
        let (b, mut rb) = Watcher::new(3);
        let mut batch = PushBatch::default();
        batch.add(&[a.clone(), b.clone()], &delivery(1, 1, 10));
        batch.add(std::slice::from_ref(&a), &delivery(2, 5, 10));
        batch.add(&[a.clone(), b.clone()], &delivery(1, 2, 10));
        assert_eq!(batch.copies, 5);
        batch.flush();
        let Some((WatchEvent::Messages(got), _)) = ra.recv().await else {
            panic!("no batch for a")
        };
        let seqs: Vec<_> = got.iter().map(|m| (m.conv, m.seq)).collect();
        assert_eq!(seqs, [(1, 1), (2, 5), (1, 2)]);
        let Some((WatchEvent::Messages(got), _)) = rb.recv().await else {
            panic!("no batch for b")
        };
        assert_eq!(got.len(), 2);
        assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_ended_not_waited_for() {
        let (w, _rx) = Watcher::new(2);
        for _ in 0..WATCH_QUEUE_EVENTS_MAX {
            w.push(WatchEvent::Closing(String::new()), 1);
        }
        assert!(!w.overflowed.load(Ordering::Relaxed));
        // One more does not block: it ends the watcher.
        w.push(WatchEvent::Closing(String::new()), 1);
        assert!(w.overflowed.load(Ordering::Relaxed));
        tokio::time::timeout(std::time::Duration::from_secs(1), w.wake.notified())
            .await
            .expect("the stream task is woken to end the watch");
    }

    #[test]
    fn large_batches_are_split() {
        let (w, mut rx) = Watcher::new(2);
        let mut batch = PushBatch::default();
        let big = WATCH_BATCH_BYTES_MAX / 2 + 1;
        for seq in 1..=3 {
            batch.add(std::slice::from_ref(&w), &delivery(1, seq, big));
        }
        batch.flush();
        let mut events = 0;
        while let Ok((WatchEvent::Messages(m), _)) = rx.try_recv() {
            assert!(m.iter().map(|m| m.frame.len()).sum::<usize>() <= WATCH_BATCH_BYTES_MAX + big);
            events += 1;
        }
        assert_eq!(events, 2);
    }
}
