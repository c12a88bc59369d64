//! The watching side of two-level fan-out: which conversations this node's sessions
//! need, registered with the leader of each one's group.
//!
//! Owns: one task per group with locally subscribed conversations. While this node
//! leads the group, its own apply feeds the router and the task only answers heads.
//! Otherwise the task keeps one watch stream open at the group's leader (found through
//! [`Leaders`]), adds and removes conversations on it, hands every pushed message to the
//! [`Hub`], and when the stream breaks reopens it at the current leader and marks every
//! watched conversation with its new head, so sessions catch up from history.
//! Must not: decide what a session receives (its writer does, by seq); block on a
//! session; keep a conversation watched that no local session subscribes to.
//!
//! | bound | value | at the bound |
//! |---|---|---|
//! | tasks | one per group with local subscribers | — (bounded by the group count) |
//! | [`CONTROL_QUEUE_LEN_MAX`] | adds/removes waiting per group task | `ensure` waits |
//! | [`ENSURE_TIMEOUT`] | waiting for a head | `Unavailable` |
//! | [`REOPEN_BACKOFF_MIN`]..[`REOPEN_BACKOFF_MAX`] | between attempts to reopen a watch | retried forever while anything is watched |

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use herald_client::wire::{Refusal, RefusalCode};
use tokio::sync::{mpsc, oneshot};

use super::Hub;
use crate::engine::{Group, GroupSet, Leaders};
use crate::raft::network::frame::{encode_frame, read_frame, write_frame_open};
use crate::raft::network::watch::{
    WatchControl, WatchEvent, WATCH_CONTROL_BYTES_MAX, WATCH_EVENT_BYTES_MAX, WATCH_SILENCE_MAX,
};
use crate::raft::network::{PeerError, PeerNetwork, WatchOpen};
use crate::raft::GroupId;
use crate::routing::Delivery;

/// Adds and removes queued for one group's task.
pub const CONTROL_QUEUE_LEN_MAX: usize = 1024;
/// How long `ensure` waits for the leader to register a conversation.
pub const ENSURE_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause before reopening a broken watch.
pub const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest pause between attempts to reopen a watch.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(1);

enum Control {
    Add {
        conv: u64,
        reply: oneshot::Sender<u64>,
    },
    Remove {
        conv: u64,
    },
}

/// This node's interest in conversations (see the module documentation). Cheap to
/// clone.
#[derive(Clone)]
pub struct Interest {
    inner: Arc<Inner>,
}

struct Inner {
    groups: GroupSet,
    leaders: Arc<Leaders>,
    peers: PeerNetwork,
    hub: Arc<Hub>,
    tasks: Mutex<HashMap<GroupId, mpsc::Sender<Control>>>,
}

impl Interest {
    /// Interest over this node's groups and peers.
    pub fn new(groups: GroupSet, leaders: Arc<Leaders>, peers: PeerNetwork, hub: Arc<Hub>) -> Self {
        Interest {
            inner: Arc::new(Inner {
                groups,
                leaders,
                peers,
                hub,
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Makes sure every message of `conv` (in `group`) from now on reaches this node's
    /// router; returns the seq the next message will get, as the leader registered it.
    /// Messages below it are in history. Call after the session is in the router.
    pub async fn ensure(&self, group: GroupId, conv: u64) -> Result<u64, Refusal> {
        let (reply, head) = oneshot::channel();
        self.send(group, Control::Add { conv, reply }).await?;
        match tokio::time::timeout(ENSURE_TIMEOUT, head).await {
            Ok(Ok(head)) => Ok(head),
            Ok(Err(_)) => Err(unavailable(group, "the watch task stopped")),
            Err(_) => Err(unavailable(
                group,
                &format!("no leader registered the conversation within {ENSURE_TIMEOUT:?}"),
            )),
        }
    }

    /// Hands `control` to the group's task, starting one (with `control` already
    /// queued, so it never starts idle) when there is none or the last one just ended.
    async fn send(&self, group: GroupId, control: Control) -> Result<(), Refusal> {
        let mut control = control;
        for _ in 0..3 {
            let existing = {
                let mut tasks = self
                    .inner
                    .tasks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match tasks.get(&group).filter(|t| !t.is_closed()) {
                    Some(task) => task.clone(),
                    None => {
                        let (tx, rx) = mpsc::channel(CONTROL_QUEUE_LEN_MAX);
                        // A new channel has room: the control is queued before the task
                        // can look at it.
                        let _ = tx.try_send(control);
                        tasks.insert(group, tx);
                        let inner = self.inner.clone();
                        tokio::spawn(async move { inner.run(group, rx).await });
                        return Ok(());
                    }
                }
            };
            match existing.send(control).await {
                Ok(()) => return Ok(()),
                // That task ended between the lookup and the send: start a new one.
                Err(mpsc::error::SendError(back)) => control = back,
            }
        }
        Err(unavailable(group, "the watch task could not be started"))
    }

    /// No local session may need `conv` any more: stop watching it once none does.
    pub fn release(&self, group: GroupId, conv: u64) {
        let task = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .cloned();
        if let Some(task) = task {
            // At the bound the release is dropped: the conversation stays watched until
            // the next release or the end of the watch (pushes to it go nowhere).
            let _ = task.try_send(Control::Remove { conv });
        }
    }
}

fn unavailable(group: GroupId, why: &str) -> Refusal {
    Refusal::new(
        RefusalCode::Unavailable,
        format!("cannot follow group {group}: {why}; retry"),
    )
}

/// What one group's task knows.
#[derive(Default)]
struct Watched {
    /// Conversation → the next seq this node knows of.
    heads: BTreeMap<u64, u64>,
    /// Adds waiting for the leader's head.
    waiting: HashMap<u64, Vec<oneshot::Sender<u64>>>,
}

impl Watched {
    fn is_idle(&self) -> bool {
        self.heads.is_empty() && self.waiting.is_empty()
    }

    fn convs(&self) -> Vec<u64> {
        let mut convs: Vec<u64> = self.heads.keys().copied().collect();
        convs.extend(self.waiting.keys().filter(|c| !self.heads.contains_key(c)));
        convs
    }

    fn answer(&mut self, conv: u64, head: u64) {
        let known = self.heads.entry(conv).or_insert(head);
        *known = (*known).max(head);
        for reply in self.waiting.remove(&conv).unwrap_or_default() {
            let _ = reply.send(*known);
        }
    }
}

/// Why a phase of the task ended.
enum Next {
    /// Look again at who leads.
    Again,
    /// Nothing is watched any more, or the node is stopping.
    Exit,
}

impl Inner {
    async fn run(self: Arc<Self>, group: GroupId, mut rx: mpsc::Receiver<Control>) {
        let mut watched = Watched::default();
        let mut backoff = REOPEN_BACKOFF_MIN;
        loop {
            if watched.is_idle() {
                // Nothing watched: end, unless a control is already queued. Leaving the
                // map under its lock means an `ensure` that raced in finds a closed
                // channel and starts a new task.
                {
                    let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
                    if rx.is_empty() {
                        tasks.remove(&group);
                        return;
                    }
                }
                match rx.recv().await {
                    Some(control) => {
                        let local = self.groups.get(group).filter(|g| g.sm.is_leader());
                        self.control_offline(control, &mut watched, local.as_deref());
                    }
                    None => return,
                }
                continue;
            }
            let next = match self.groups.get(group).filter(|g| g.sm.is_leader()) {
                Some(local) => self.lead(&local, &mut rx, &mut watched).await,
                None => match self.follow(group, &mut rx, &mut watched).await {
                    Ok(next) => {
                        backoff = REOPEN_BACKOFF_MIN;
                        next
                    }
                    Err(problem) => {
                        tracing::debug!(group, %problem, "cannot open a watch; retrying");
                        let pause = self.pause(backoff, &mut rx, &mut watched).await;
                        backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
                        pause
                    }
                },
            };
            if matches!(next, Next::Exit) {
                self.tasks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&group);
                return;
            }
        }
    }

    /// Handles a control while no watch is open (leading, or between attempts):
    /// `local` is this node's replica when it leads the group.
    fn control_offline(&self, control: Control, watched: &mut Watched, local: Option<&Group>) {
        match control {
            Control::Add { conv, reply } => match (watched.heads.get(&conv), local) {
                (_, Some(local)) => {
                    let head = local.next_seq(conv);
                    watched.heads.insert(conv, head);
                    let _ = reply.send(head);
                }
                (Some(head), None) => {
                    let _ = reply.send(*head);
                }
                (None, None) => watched.waiting.entry(conv).or_default().push(reply),
            },
            Control::Remove { conv } => {
                if self.hub.router().subscriber_count(conv) == 0 {
                    watched.heads.remove(&conv);
                }
            }
        }
    }

    /// This node leads the group: its own apply feeds the router; answer heads from
    /// the local state until it steps down.
    async fn lead(
        &self,
        local: &Group,
        rx: &mut mpsc::Receiver<Control>,
        watched: &mut Watched,
    ) -> Next {
        let mut leader = local.sm.leader_watch();
        for (conv, replies) in std::mem::take(&mut watched.waiting) {
            let head = local.next_seq(conv);
            watched.heads.insert(conv, head);
            for reply in replies {
                let _ = reply.send(head);
            }
        }
        loop {
            tokio::select! {
                control = rx.recv() => match control {
                    Some(control) => {
                        self.control_offline(control, watched, Some(local));
                        if watched.is_idle() {
                            return Next::Again;
                        }
                    }
                    None => return Next::Exit,
                },
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() {
                        return Next::Again;
                    }
                }
            }
        }
    }

    /// Waits `pause` before the next attempt, still taking controls.
    async fn pause(
        &self,
        pause: Duration,
        rx: &mut mpsc::Receiver<Control>,
        watched: &mut Watched,
    ) -> Next {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return Next::Again,
                control = rx.recv() => match control {
                    Some(control) => {
                        self.control_offline(control, watched, None);
                        if watched.is_idle() {
                            return Next::Again;
                        }
                    }
                    None => return Next::Exit,
                },
            }
        }
    }

    /// Opens a watch at the group's leader and follows it until it breaks.
    async fn follow(
        &self,
        group: GroupId,
        rx: &mut mpsc::Receiver<Control>,
        watched: &mut Watched,
    ) -> Result<Next, String> {
        let Some(target) = self.leaders.best(group) else {
            return Err(format!("group {group} has no replica on another node"));
        };
        let addr = self
            .leaders
            .addr(target)
            .ok_or_else(|| format!("node {target} has no address in the map"))?;
        let opened = self
            .peers
            .open_watch(group, target, &addr, watched.convs())
            .await;
        let (heads, mut send, recv) = match opened {
            Ok(WatchOpen::Opened { heads, send, recv }) => (heads, send, recv),
            Ok(WatchOpen::NotLeader(hint)) => {
                let hinted = hint.map(|(id, _)| id).filter(|id| *id != target);
                self.leaders.note(group, hinted);
                if hinted.is_none() {
                    self.leaders.failed(group, target);
                }
                return Err(format!("node {target} does not lead group {group}"));
            }
            Err(e) => {
                if matches!(e, PeerError::Timeout { .. }) {
                    self.peers.disconnect(target);
                }
                if e.is_unreachable() || matches!(e, PeerError::Timeout { .. }) {
                    self.leaders.unreachable(target);
                }
                self.leaders.failed(group, target);
                return Err(e.to_string());
            }
        };
        self.leaders.note(group, Some(target));
        tracing::debug!(group, leader = target, convs = heads.len(), "watching");
        for (conv, head) in heads {
            watched.answer(conv, head);
            // Whatever was committed while no watch was open is in history.
            self.hub.mark(conv, head.saturating_sub(1));
        }
        // Events are read in a task of their own: a read cut short by `select!` would
        // lose the bytes it had taken.
        let (events_tx, mut events) = mpsc::channel::<WatchEvent>(64);
        let mut recv = recv;
        let reader = tokio::spawn(async move {
            while let Ok(event) =
                read_frame::<WatchEvent>(&mut recv, "watch event", WATCH_EVENT_BYTES_MAX).await
            {
                if events_tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let mut local_leader = self.groups.get(group).map(|g| g.sm.leader_watch());
        let mut heard = tokio::time::Instant::now();
        let next = loop {
            tokio::select! {
                control = rx.recv() => match control {
                    Some(Control::Add { conv, reply }) => {
                        if let Some(head) = watched.heads.get(&conv) {
                            let _ = reply.send(*head);
                            continue;
                        }
                        let first = !watched.waiting.contains_key(&conv);
                        watched.waiting.entry(conv).or_default().push(reply);
                        if first && send_control(&mut send, WatchControl::Add(conv)).await.is_err() {
                            break Next::Again;
                        }
                    }
                    Some(Control::Remove { conv }) => {
                        if self.hub.router().subscriber_count(conv) == 0
                            && watched.heads.remove(&conv).is_some()
                            && send_control(&mut send, WatchControl::Remove(conv)).await.is_err()
                        {
                            break Next::Again;
                        }
                        if watched.is_idle() {
                            break Next::Again;
                        }
                    }
                    None => break Next::Exit,
                },
                () = tokio::time::sleep_until(heard + WATCH_SILENCE_MAX) => {
                    tracing::debug!(group, leader = target, "the leader went silent; reopening the watch");
                    self.leaders.unreachable(target);
                    self.leaders.failed(group, target);
                    break Next::Again;
                }
                event = events.recv() => match event {
                    Some(WatchEvent::Heartbeat) => heard = tokio::time::Instant::now(),
                    Some(WatchEvent::Messages(messages)) => {
                        heard = tokio::time::Instant::now();
                        for m in messages {
                            if let Some(head) = watched.heads.get_mut(&m.conv) {
                                *head = (*head).max(m.seq + 1);
                            }
                            self.hub.deliver(&Arc::new(
                                Delivery::new(m.conv, m.seq, Bytes::from(m.frame)).with_stored_ms(m.stored_ms),
                            ));
                        }
                    }
                    Some(WatchEvent::Head { conv, next_seq }) => {
                        heard = tokio::time::Instant::now();
                        watched.answer(conv, next_seq);
                    }
                    Some(WatchEvent::Removed { conv, users }) => {
                        heard = tokio::time::Instant::now();
                        self.hub.revoke(conv, &users);
                    }
                    Some(WatchEvent::Closing(reason)) => {
                        tracing::debug!(group, leader = target, %reason, "the leader ended the watch");
                        self.leaders.failed(group, target);
                        break Next::Again;
                    }
                    None => {
                        // The stream died with its connection: the leader is gone.
                        self.leaders.unreachable(target);
                        self.leaders.failed(group, target);
                        break Next::Again;
                    }
                },
                changed = wait_leader(&mut local_leader) => {
                    if changed {
                        break Next::Again;
                    }
                }
            }
        };
        reader.abort();
        let _ = send.finish();
        Ok(next)
    }
}

/// Resolves when this node's own replica becomes leader (true) or its watch ends
/// (false); never when the node hosts no replica.
async fn wait_leader(local: &mut Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    match local {
        Some(rx) => loop {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if *rx.borrow_and_update() {
                return true;
            }
        },
        None => std::future::pending().await,
    }
}

async fn send_control(send: &mut quinn::SendStream, control: WatchControl) -> Result<(), String> {
    let bytes = encode_frame(&control, "watch control", WATCH_CONTROL_BYTES_MAX)
        .map_err(|e| e.to_string())?;
    write_frame_open(send, &bytes, "watch control")
        .await
        .map_err(|e| e.to_string())
}
