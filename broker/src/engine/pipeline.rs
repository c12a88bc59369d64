//! A group's write pipeline: every write of every session to that group's
//! conversations, in arrival order, to the group's leader in batches.
//!
//! Owns: one FIFO queue per group on this node and one task that takes the writes waiting in it as a
//! batch and commits them in order, as ONE log entry: proposed on the leader, or sent
//! as one `ForwardBatch` RPC to the leader from a follower (which proposes it as one
//! entry). openraft 0.9 waits for each log append to be durable before it takes the
//! next, so an entry per write would cost an fsync per write. One batch
//! forwarded from a follower is in flight at a time, two on the leader; writes arriving
//! meanwhile form the next batch, so the batch grows with the load and one fsync
//! covers many writes. Writes of one session enter
//! the queue in the order the session sent them, so they get seqs in that order.
//!
//! Writes a batch could not commit (the leader changed or is unreachable) go back to
//! the front of the queue, in order, and are retried once a leader is known: every
//! command is idempotent (publishes by their key), so a retry never applies twice.
//! A write still uncommitted at its deadline is answered `Unavailable`.
//!
//! A pipeline outlives the group's replica on this node: when a move takes the
//! replica away ([`Pipeline::unhost`]) the same queue goes on, forwarding to the
//! group's leader, and when a replica arrives ([`Pipeline::host`]) the queue that was
//! forwarding starts proposing locally once this node leads. So a move never fails a
//! queued write and never lets two queues of one group race (which could reorder a
//! session's writes).
//!
//! Must not: reorder writes, or hold a write past its deadline.
//!
//! | bound | value | at the bound |
//! |---|---|---|
//! | [`QUEUE_LEN_MAX`] | writes waiting | submitting waits (the session stops reading requests) |
//! | [`LOCAL_BATCHES_IN_FLIGHT`] | batches proposed on the leader, not yet committed | the next batch waits (and grows) |
//! | [`BATCH_LEN_MAX`] | writes per batch | the rest wait for the next batch |
//! | [`BATCH_BYTES_MAX`] | payload bytes per batch | the rest wait for the next batch |
//! | a hold ([`Pipeline::hold`]) | until its deadline | local proposals resume |
//! | [`FORWARDED_IN_FLIGHT_MAX`] | batches forwarded to this node (the leader) being proposed | the next forwarded batch waits |
//!
//! A handover ([`Pipeline::hold`], then [`Pipeline::settle`]) needs the leader's log to
//! stop growing: a batch still on its way into Raft when the candidate's vote request
//! arrives makes the leader's log longer than the candidate's, the vote is refused, and
//! the old leader is elected again. A race by construction (the handover reads "caught
//! up" from Raft's metrics, which do not count batches still queued in Raft), and one
//! possible cause of the failed hand-backs seen in t70; no test reproduced it. So a hold
//! stops local proposals *and* batches forwarded here by other nodes, and `settle`
//! waits for every batch already proposed.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::wire::{Refusal, RefusalCode};
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::Leaders;
use crate::metrics::Metrics;
use crate::raft::network::{ForwardBatchReply, PeerError, PeerNetwork};
use crate::raft::{Batch, GroupId, NodeId, Raft, Response};
use crate::store::Command;

/// Writes waiting for a batch, over all sessions of the node.
pub const QUEUE_LEN_MAX: usize = 65_536;
/// Writes per batch.
pub const BATCH_LEN_MAX: usize = 4096;
/// Payload bytes per batch (keeps a forwarded batch well under the peer frame limit).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Batches proposed on the leader and not yet committed. Two let the next batch's
/// local fsync overlap the previous batch's replication (openraft 0.9 appends one
/// entry at a time, waiting for each to be durable).
pub const LOCAL_BATCHES_IN_FLIGHT: usize = 2;
/// Batches other nodes forwarded to this node being proposed here at once (one per
/// forwarding node and group at a time, so this is only a backstop).
pub const FORWARDED_IN_FLIGHT_MAX: usize = 256;
/// Pause before retrying writes that found no usable leader.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// One write waiting to be committed.
struct Pending {
    command: Command,
    waiter: Waiter,
}

/// Who waits for a write, and until when: a [`Pending`] without its command, while
/// the command is in a batch being committed (the batch owns the commands, shared
/// with Raft, so proposing one copies nothing; a write that must be retried gets a
/// copy of its command back, see [`answer`]).
struct Waiter {
    deadline: Instant,
    reply: oneshot::Sender<Response>,
    /// Why the last attempt failed, for the refusal at the deadline.
    problem: Option<String>,
    /// Arrival order in this pipeline (set when the task takes it from the queue):
    /// retried writes go back in this order.
    order: u64,
}

/// Submits writes to the pipeline task.
#[derive(Clone)]
pub struct Pipeline {
    queue: mpsc::Sender<Pending>,
    /// Where the task learns the leader: this node's replica, or hints.
    source: Arc<watch::Sender<LeaderSource>>,
    /// While set (and in the future), this node proposes nothing locally: writes wait
    /// (leadership is being handed over; see `server::balance`).
    hold: Arc<watch::Sender<Option<Instant>>>,
    /// Local batches proposed and not yet settled ([`LOCAL_BATCHES_IN_FLIGHT`] permits).
    in_flight: Arc<Semaphore>,
    /// Forwarded batches being proposed ([`FORWARDED_IN_FLIGHT_MAX`] permits).
    forwarded: Arc<Semaphore>,
}

impl Pipeline {
    /// Starts the pipeline task of `group` on this node, which hosts a replica of it.
    pub fn start(
        group: GroupId,
        raft: Raft,
        peers: PeerNetwork,
        node_id: NodeId,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_with(group, LeaderSource::Local(raft), peers, node_id, metrics)
    }

    /// Starts the pipeline task of `group` on a node without a replica of it: writes
    /// are forwarded to the leader `leaders` points at.
    pub fn start_remote(
        group: GroupId,
        leaders: Arc<Leaders>,
        peers: PeerNetwork,
        node_id: NodeId,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_with(
            group,
            LeaderSource::Remote(leaders),
            peers,
            node_id,
            metrics,
        )
    }

    fn start_with(
        group: GroupId,
        source: LeaderSource,
        peers: PeerNetwork,
        node_id: NodeId,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_LEN_MAX);
        let hold = Arc::new(watch::channel(None).0);
        let source = Arc::new(watch::channel(source).0);
        let in_flight = Arc::new(Semaphore::new(LOCAL_BATCHES_IN_FLIGHT));
        tokio::spawn(run(
            rx,
            group,
            source.subscribe(),
            peers,
            node_id,
            LocalGate {
                hold: hold.subscribe(),
                in_flight: in_flight.clone(),
            },
            metrics,
        ));
        Pipeline {
            queue,
            source,
            hold,
            in_flight,
            forwarded: Arc::new(Semaphore::new(FORWARDED_IN_FLIGHT_MAX)),
        }
    }

    /// This node now hosts a replica of the group (`raft`): propose locally whenever
    /// it leads.
    pub fn host(&self, raft: Raft) {
        self.source.send_replace(LeaderSource::Local(raft));
    }

    /// This node no longer hosts a replica: forward every queued and future write to
    /// the leader `leaders` points at. Writes in flight on the stopped replica come
    /// back and are forwarded too (they are idempotent).
    pub fn unhost(&self, leaders: Arc<Leaders>) {
        self.source.send_replace(LeaderSource::Remote(leaders));
    }

    /// Proposes nothing locally until `until` (or [`Pipeline::release`]): writes queue
    /// up and go to whichever node leads afterwards. Bounded by `until`, so a hold that
    /// is never released ends by itself.
    pub fn hold(&self, until: Instant) {
        self.hold.send_replace(Some(until));
    }

    /// Ends a [`Pipeline::hold`].
    pub fn release(&self) {
        self.hold.send_replace(None);
    }

    /// During a hold: waits until every batch proposed here (local or forwarded) has its
    /// outcome, so the group's log no longer grows; `false` if `deadline` came first.
    pub async fn settle(&self, deadline: Instant) -> bool {
        let all = async {
            settle(&self.in_flight).await;
            let forwarded = self
                .forwarded
                .acquire_many(FORWARDED_IN_FLIGHT_MAX as u32)
                .await;
            drop(forwarded);
        };
        tokio::time::timeout_at(deadline.into(), all).await.is_ok()
    }

    /// Proposes a batch another node forwarded here with `propose`, once no hold is
    /// on (a hold ends by its deadline, so the wait is bounded).
    pub async fn propose_forwarded<T>(&self, propose: impl Future<Output = T>) -> T {
        let mut hold = self.hold.subscribe();
        let permit = loop {
            wait_unheld(&mut hold).await;
            let permit = self.forwarded.clone().acquire_owned().await;
            // Checked again with the permit: a hold set meanwhile waits for this
            // batch (in `settle`) or this batch waits for it, never neither.
            if !is_held(&hold) {
                break permit;
            }
        };
        let result = propose.await;
        drop(permit);
        result
    }

    /// Queues `command` (waiting while the queue is full) and returns where its
    /// answer will arrive: committed, refused by the state machine, or `Unavailable`
    /// at `deadline`. Writes are committed in the order they were queued.
    pub async fn submit(&self, command: Command, deadline: Instant) -> Answer {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            command,
            waiter: Waiter {
                deadline,
                reply,
                problem: None,
                order: 0,
            },
        };
        if self.queue.send(pending).await.is_err() {
            let (reply, answer) = oneshot::channel();
            let _ = reply.send(Err(stopped()));
            return Answer(answer);
        }
        Answer(answer)
    }
}

/// Where a queued write's answer arrives.
pub struct Answer(oneshot::Receiver<Response>);

impl Answer {
    /// Waits for the answer.
    pub async fn wait(self) -> Response {
        self.0.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> Refusal {
    Refusal::new(
        RefusalCode::Unavailable,
        "the node is shutting down; retry on another node",
    )
}

/// Where a pipeline learns who leads its group.
#[derive(Clone)]
enum LeaderSource {
    /// This node's replica (its Raft metrics).
    Local(Raft),
    /// Hints and the cluster map (no replica here).
    Remote(Arc<Leaders>),
}

impl LeaderSource {
    /// The leader to send to and its address.
    fn leader(&self, group: GroupId) -> (Option<NodeId>, Option<String>) {
        match self {
            LeaderSource::Local(raft) => leader(raft),
            LeaderSource::Remote(leaders) => {
                let best = leaders.best(group);
                (best, best.and_then(|n| leaders.addr(n)))
            }
        }
    }

    /// `tried` could not be reached.
    fn unreachable(&self, node: NodeId) {
        if let LeaderSource::Remote(leaders) = self {
            leaders.unreachable(node);
        }
    }

    /// A forward to `tried` was answered `NotLeader(hint)` or failed.
    fn redirect(&self, group: GroupId, tried: NodeId, hint: Option<NodeId>) {
        if let LeaderSource::Remote(leaders) = self {
            match hint.filter(|h| *h != tried) {
                Some(hint) => leaders.note(group, Some(hint)),
                None => leaders.failed(group, tried),
            }
        }
    }

    /// Resolves once the leader is no longer `leader`, as far as this source can tell.
    async fn leadership_leaves(&self, leader: NodeId) {
        match self {
            LeaderSource::Local(raft) => leadership_leaves(raft, leader).await,
            // No replica to watch: the RPC's own timeout bounds the wait.
            LeaderSource::Remote(_) => std::future::pending().await,
        }
    }
}

/// What lets the pipeline task propose locally: no hold, and a free slot.
struct LocalGate {
    hold: watch::Receiver<Option<Instant>>,
    in_flight: Arc<Semaphore>,
}

async fn run(
    mut rx: mpsc::Receiver<Pending>,
    group: GroupId,
    mut sources: watch::Receiver<LeaderSource>,
    peers: PeerNetwork,
    node_id: NodeId,
    gate: LocalGate,
    metrics: Arc<Metrics>,
) {
    let LocalGate {
        mut hold,
        in_flight,
    } = gate;
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    // Batches proposed on this node (the leader) are awaited in tasks, at most
    // LOCAL_BATCHES_IN_FLIGHT at once; what they could not commit comes back here.
    // Unbounded, but it only ever holds writes already counted in QUEUE_LEN_MAX.
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Vec<Pending>>();
    let mut next_order = 0u64;
    loop {
        if waiting.is_empty() {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => admit(&mut waiting, p, &mut next_order),
                    None => return,
                },
                Some(retry) = retry_rx.recv() => requeue(&mut waiting, retry),
            }
        }
        let mut retried = false;
        while let Ok(retry) = retry_rx.try_recv() {
            requeue(&mut waiting, retry);
            retried = true;
        }
        if retried {
            // Leadership moved. Nothing new goes out until every batch still in
            // flight here has its outcome (they failed too, or committed): otherwise a
            // later write could commit before an earlier one's retry.
            settle(&in_flight).await;
            while let Ok(retry) = retry_rx.try_recv() {
                requeue(&mut waiting, retry);
            }
            // Give the election a moment.
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        while waiting.len() < BATCH_LEN_MAX {
            match rx.try_recv() {
                Ok(p) => admit(&mut waiting, p, &mut next_order),
                Err(_) => break,
            }
        }
        expire(&mut waiting);
        // Per batch: a move may have brought or taken away this node's replica.
        let source = sources.borrow_and_update().clone();
        let (leader, addr) = source.leader(group);
        let local_raft = match &source {
            LeaderSource::Local(raft) if leader == Some(node_id) => Some(raft),
            _ => None,
        };
        if let Some(raft) = local_raft {
            // A hold (leadership handover): wait until it ends, then look again at who
            // leads.
            if is_held(&hold) {
                wait_unheld(&mut hold).await;
                // Leadership may have moved meanwhile.
                continue;
            }
            // Wait for a slot before taking the batch, so it grows meanwhile.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            // Checked again with the slot: a hold set meanwhile either sees this batch
            // in flight (and `settle` waits for it) or stops it here.
            if is_held(&hold) {
                drop(permit);
                continue;
            }
            while waiting.len() < BATCH_LEN_MAX {
                match rx.try_recv() {
                    Ok(p) => admit(&mut waiting, p, &mut next_order),
                    Err(_) => break,
                }
            }
            let batch = take_batch(&mut waiting);
            if batch.is_empty() {
                continue;
            }
            let (commands, waiters) = split(batch);
            // Proposed here, in order; awaited in a task.
            let count = commands.len();
            let proposed_at = Instant::now();
            let proposed = raft.client_write_ff(commands.clone()).await.ok();
            let retry_tx = retry_tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let results = match proposed {
                    Some(rx) => {
                        let results = committed(rx, count).await;
                        metrics
                            .raft_commit_latency_seconds
                            .observe(proposed_at.elapsed().as_secs_f64());
                        results
                    }
                    None => vec![None; count],
                };
                let retry = answer(waiters, &commands, results, None);
                if !retry.is_empty() {
                    let _ = retry_tx.send(retry);
                }
                drop(permit);
            });
            continue;
        }
        if in_flight.available_permits() < LOCAL_BATCHES_IN_FLIGHT {
            // This node stopped leading (or lost its replica) with batches in flight:
            // their outcome first, so nothing forwarded overtakes them.
            settle(&in_flight).await;
            continue;
        }
        let batch = take_batch(&mut waiting);
        if batch.is_empty() {
            continue;
        }
        let (commands, waiters) = split(batch);
        metrics.writes_forwarded.inc_by(commands.len() as u64);
        let (results, problem) = match (leader, addr) {
            (Some(id), Some(addr)) => {
                // Give up on this leader as soon as this node sees leadership move (a
                // dead leader would otherwise hold the batch for the whole RPC timeout);
                // the retry is safe, every command being idempotent.
                let forwarded_at = Instant::now();
                tokio::select! {
                    reply = peers.forward_batch(group, id, &addr, commands.clone()) => match reply {
                        Ok(ForwardBatchReply::Done(results)) => (results, None),
                        Ok(ForwardBatchReply::NotLeader(hint)) => {
                            source.redirect(group, id, hint.map(|(h, _)| h));
                            (
                                Vec::new(),
                                Some(format!("node {id} is not the leader of group {group}")),
                            )
                        }
                        Err(e) => {
                            if matches!(e, PeerError::Timeout { .. }) {
                                // Maybe a connection to a process that is gone: redial.
                                peers.disconnect(id);
                            }
                            if e.is_unreachable() || matches!(e, PeerError::Timeout { .. }) {
                                source.unreachable(id);
                            }
                            source.redirect(group, id, None);
                            (
                                Vec::new(),
                                Some(format!(
                                    "cannot reach leader {id} after {:?}: {e}",
                                    forwarded_at.elapsed()
                                )),
                            )
                        }
                    },
                    () = source.leadership_leaves(id) => (
                        Vec::new(),
                        Some(format!(
                            "leader {id} was lost while the batch was in flight (after {:?})",
                            forwarded_at.elapsed()
                        )),
                    ),
                }
            }
            (Some(id), None) => (
                Vec::new(),
                Some(format!("leader {id} has no known address")),
            ),
            (None, _) => (
                Vec::new(),
                Some("no leader is known (an election is running)".into()),
            ),
        };
        if let Some(problem) = &problem {
            tracing::debug!(
                group,
                writes = waiters.len(),
                "forwarding a batch failed: {problem}"
            );
        }
        let retry = answer(waiters, &commands, results, problem);
        if !retry.is_empty() {
            requeue(&mut waiting, retry);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Takes a write from the queue: it is the newest.
fn admit(waiting: &mut VecDeque<Pending>, mut pending: Pending, next_order: &mut u64) {
    pending.waiter.order = *next_order;
    *next_order += 1;
    waiting.push_back(pending);
}

/// Puts writes to retry back among the waiting ones, in arrival order (retries of
/// several failed batches may come back in any order).
fn requeue(waiting: &mut VecDeque<Pending>, retry: Vec<Pending>) {
    let mut retry = retry.into_iter().peekable();
    let mut merged = VecDeque::with_capacity(waiting.len() + retry.len());
    for pending in waiting.drain(..) {
        while let Some(earlier) = retry.next_if(|r| r.waiter.order < pending.waiter.order) {
            merged.push_back(earlier);
        }
        merged.push_back(pending);
    }
    merged.extend(retry);
    *waiting = merged;
}

/// The end of the hold `hold` says is on, if it has not passed.
fn hold_end(hold: Option<Instant>) -> Option<Instant> {
    hold.filter(|until| *until > Instant::now())
}

/// A hold is on.
fn is_held(hold: &watch::Receiver<Option<Instant>>) -> bool {
    hold_end(*hold.borrow()).is_some()
}

/// Returns once no hold is on.
async fn wait_unheld(hold: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let held = *hold.borrow_and_update();
        let Some(until) = hold_end(held) else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            _ = hold.changed() => {}
        }
    }
}

/// Waits until no batch proposed here is in flight (each has been answered or sent
/// back to retry).
async fn settle(in_flight: &Semaphore) {
    if let Ok(all) = in_flight.acquire_many(LOCAL_BATCHES_IN_FLIGHT as u32).await {
        drop(all);
    }
}

/// Answers each write that got a result; returns the others, to retry.
fn answer(
    waiters: Vec<Waiter>,
    commands: &Batch,
    results: Vec<Option<Response>>,
    problem: Option<String>,
) -> Vec<Pending> {
    let mut results = results.into_iter();
    let mut retry = Vec::new();
    for (mut waiter, command) in waiters.into_iter().zip(commands.iter()) {
        match results.next().flatten() {
            Some(response) => {
                let _ = waiter.reply.send(response);
            }
            None => {
                waiter.problem = problem
                    .clone()
                    .or_else(|| Some("leadership moved while the write was in flight".into()));
                retry.push(Pending {
                    command: command.clone(),
                    waiter,
                });
            }
        }
    }
    retry
}

/// A batch's commands (shared, ready to propose) and their waiters, in order.
fn split(batch: Vec<Pending>) -> (Batch, Vec<Waiter>) {
    let (commands, waiters): (Vec<Command>, Vec<Waiter>) =
        batch.into_iter().map(|p| (p.command, p.waiter)).unzip();
    (Batch::new(commands), waiters)
}

/// Answers writes whose deadline passed.
fn expire(waiting: &mut VecDeque<Pending>) {
    let now = Instant::now();
    if !waiting.iter().any(|p| p.waiter.deadline <= now) {
        return;
    }
    let mut kept = VecDeque::with_capacity(waiting.len());
    for pending in waiting.drain(..) {
        if pending.waiter.deadline <= now {
            let problem = pending
                .waiter
                .problem
                .unwrap_or_else(|| "the node could not keep up".into());
            let _ = pending.waiter.reply.send(Err(Refusal::new(
                RefusalCode::Unavailable,
                format!(
                    "the write was not committed in time ({problem}); the cluster may have lost its quorum; retry with the same idempotency key"
                ),
            )));
        } else {
            kept.push_back(pending);
        }
    }
    *waiting = kept;
}

/// The next batch from the front, bounded by count and payload bytes (at least one).
fn take_batch(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(front) = waiting.front() {
        let size = match &front.command {
            Command::Publish { payload, .. } => payload.len(),
            _ => 64,
        };
        if !batch.is_empty() && (batch.len() >= BATCH_LEN_MAX || bytes + size > BATCH_BYTES_MAX) {
            break;
        }
        bytes += size;
        if let Some(p) = waiting.pop_front() {
            batch.push(p);
        }
    }
    batch
}

/// Waits for a batch proposed on this node to commit. All `None` when it was not
/// committed here (leadership moved).
async fn committed(
    rx: oneshot::Receiver<
        Result<
            openraft::raft::ClientWriteResponse<crate::raft::TypeConfig>,
            ClientWriteError<NodeId, openraft::BasicNode>,
        >,
    >,
    count: usize,
) -> Vec<Option<Response>> {
    match rx.await {
        Ok(Ok(written)) if written.data.len() == count => {
            written.data.into_iter().map(Some).collect()
        }
        Ok(Ok(written)) => {
            let refusal = Refusal::new(
                RefusalCode::Internal,
                format!(
                    "the state machine answered {} responses to a batch of {count}; this is a bug",
                    written.data.len()
                ),
            );
            vec![Some(Err(refusal)); count]
        }
        Ok(Err(ClientWriteError::ForwardToLeader(_))) | Err(_) => vec![None; count],
        Ok(Err(e)) => {
            let refusal = Refusal::new(
                RefusalCode::Internal,
                format!("raft refused the write: {e}"),
            );
            vec![Some(Err(refusal)); count]
        }
    }
}

/// Resolves once this node no longer believes `leader` leads (an election started or
/// another node won); never, while it does.
async fn leadership_leaves(raft: &Raft, leader: NodeId) {
    let mut metrics = raft.metrics();
    loop {
        if metrics.borrow_and_update().current_leader != Some(leader) {
            return;
        }
        if metrics.changed().await.is_err() {
            // Raft stopped: the RPC's own timeout ends the wait.
            std::future::pending::<()>().await;
        }
    }
}

/// The current leader and its QUIC address, as this node knows them. A node that
/// names itself but is no longer in the leader state (removed from the group, or
/// stepping down) knows no leader.
pub fn leader(raft: &Raft) -> (Option<NodeId>, Option<String>) {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let leader = m
        .current_leader
        .filter(|l| *l != m.id || m.state == openraft::ServerState::Leader);
    let addr = leader.and_then(|id| {
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    });
    (leader, addr)
}
