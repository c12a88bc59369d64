//! The connection core shared by [`Publisher`](crate::Publisher) and
//! [`Session`](crate::Session): one QUIC connection with one stream, kept alive
//! across failures.
//!
//! Owns:
//! * the handshake (QUIC + TLS against the configured CA, preamble, Hello/Welcome);
//! * the table of requests waiting for a reply (id → waiter), bounded by
//!   `requests_in_flight_max` through a semaphore: a caller without a free slot
//!   waits, within its request timeout;
//! * the **driver** task, which owns the writing half and the reconnect loop, and a
//!   **reader** task per connection, which dispatches `Reply` (to the waiting
//!   caller), `Deliver`/`Event` (through the cursors to the application's bounded
//!   queue) and `Goodbye` (to the driver);
//! * reconnecting: exponential backoff with jitter over the seed list,
//!   resubscribing every conversation from its cursor, and re-sending every request
//!   still waiting (publishes keep their idempotency key, so a retry never appends
//!   twice).
//!
//! Must not: return a publish as `Ok` before the broker acknowledged it; drop a
//! delivery the cursor recorded (the cursor moves only once the application's queue
//! has room for the message); retry a handshake the broker refused for a reason a
//! retry cannot fix (bad or expired token); block a caller past its request
//! timeout; or trust anything from the network (no unwrap; every bad frame ends the
//! connection and triggers a reconnect).
//!
//! Backpressure: when the application does not read its events, the reader waits
//! for room in the queue and stops reading the stream; QUIC flow control then
//! stops the broker, which handles the session as a slow consumer (`Lagged`, or
//! `Goodbye(SlowConsumer)`, after which the client reconnects and resyncs).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{ClientConfig, SeedAddr};
use crate::cursor::{Cursors, Verdict};
use crate::error::{goodbye_means_reconnect, refusal_is_transient, Error};
use crate::io::{FrameReader, FrameWriter, IoError};
use crate::session::SessionEvent;
use crate::watchdog::{Watch, Watchdog};
use crate::wire::{
    self, Event, Frame, Hello, IdempotencyKey, Message, MoveNotice, Principal, Refusal, Reply,
    Request, SessionLimits, FRAME_BYTES_CEILING,
};

/// Commands queued beyond the in-flight bound (close requests). The command queue
/// holds at most one `Send` per in-flight slot plus these.
const COMMAND_SLACK: usize = 16;
/// The driver flushes once this many bytes are queued, even if more commands wait.
const FLUSH_BYTES_MAX: usize = 256 * 1024;
/// A connection that lived this long, or answered a request, resets the reconnect
/// backoff; a shorter silent one (a node that accepts and then drops us) keeps growing it.
const STABLE_CONNECTION_AFTER: Duration = Duration::from_secs(10);
/// After closing, wait at most this long for QUIC to send its close and drain.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Stream error code for a stream we stop reading.
const STOP_CODE: u32 = 0;

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data
/// consistent, so a panic elsewhere does not make it unusable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the current connection's `Welcome` said.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub(crate) session_id: u64,
    pub(crate) principal: Principal,
    pub(crate) limits: SessionLimits,
    pub(crate) addr: String,
}

/// An item of a session's event stream.
pub(crate) type EventItem = Result<SessionEvent, Error>;

enum Command {
    /// Send the pending request with this id (unless it was sent on this connection).
    Send(u64),
    /// Drain and close; answer when done.
    Close(oneshot::Sender<()>),
}

/// Who waits for a reply.
enum Waiter {
    /// An application call.
    Caller(oneshot::Sender<Result<Reply, Error>>),
    /// The driver's resubscription after a reconnect.
    Resubscribe,
}

struct PendingRequest {
    body: Request,
    waiter: Waiter,
    /// The connection generation it was last sent on (0 = not yet).
    sent_generation: u64,
}

/// Why the client stopped for good.
#[derive(Debug, Clone)]
enum Terminal {
    Closed,
    Refused(Refusal),
    Failed(String),
}

impl Terminal {
    fn to_error(&self) -> Error {
        match self {
            Terminal::Closed => Error::Closed,
            Terminal::Refused(r) => Error::Refused(r.clone()),
            Terminal::Failed(reason) => Error::Disconnected {
                reason: reason.clone(),
            },
        }
    }
}

#[derive(Default)]
struct Pending {
    /// Ordered by id, so a resend after reconnect keeps the callers' order.
    requests: BTreeMap<u64, PendingRequest>,
    /// Set once the driver stopped; no request is accepted after that.
    terminal: Option<Terminal>,
}

/// State shared by the handles, the driver and the reader.
///
/// Lock order: `cursors` before `pending`; never the other way round. The reader
/// never holds both.
pub(crate) struct State {
    pending: Mutex<Pending>,
    pub(crate) cursors: Mutex<Cursors>,
    pub(crate) info: Mutex<SessionInfo>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Successful replies over every connection so far (tells a node that served us
    /// from one that accepted and dropped us, or only refused).
    replies: AtomicU64,
}

impl State {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// True when a request sent on connection `generation` still waits for its reply.
    pub(crate) fn reply_owed(&self, generation: u64) -> bool {
        lock(&self.pending)
            .requests
            .values()
            .any(|r| r.sent_generation == generation)
    }
}

/// What a request does to the cursors, atomically with entering the pending table
/// (so a reconnect in between can neither miss nor double a subscription).
pub(crate) enum CursorOp {
    None,
    Subscribe { conv: u64, from: Option<u64> },
    Unsubscribe { conv: u64 },
}

/// The handle side of a connection; dropping the last one closes it gracefully.
pub(crate) struct Core {
    cmd_tx: mpsc::Sender<Command>,
    pub(crate) state: Arc<State>,
    request_timeout: Duration,
    producer_id: u64,
    producer_seq: AtomicU64,
}

impl Core {
    /// Connects (one pass over the seed list) and starts the driver. `events` is the
    /// application's queue (sessions) or `None` (publishers: deliveries are dropped).
    pub(crate) async fn connect(
        config: ClientConfig,
        events: Option<mpsc::Sender<EventItem>>,
    ) -> Result<Core, Error> {
        let start = if config.prefer_first {
            0
        } else {
            rand::random_range(0..config.addrs.len())
        };
        let established = connect_pass(&config, start).await?;
        let state = Arc::new(State {
            pending: Mutex::new(Pending::default()),
            cursors: Mutex::new(Cursors::default()),
            info: Mutex::new(established.info.clone()),
            permits: Arc::new(Semaphore::new(config.requests_in_flight_max)),
            next_id: AtomicU64::new(1),
            replies: AtomicU64::new(0),
        });
        let (cmd_tx, cmd_rx) = mpsc::channel(config.requests_in_flight_max + COMMAND_SLACK);
        let request_timeout = config.request_timeout;
        let backoff = Backoff::new(config.reconnect_backoff_min, config.reconnect_backoff_max);
        let driver = Driver {
            // A lost connection is retried at the next seed first: the node it was on
            // may be dead, and a dead address costs a whole connect timeout.
            next_start: (established.seed_index + 1) % config.addrs.len().max(1),
            reconnect_now: false,
            config,
            state: Arc::clone(&state),
            cmd_rx,
            events,
            backoff,
        };
        tokio::spawn(driver.run(established));
        Ok(Core {
            cmd_tx,
            state,
            request_timeout,
            producer_id: rand::random(),
            producer_seq: AtomicU64::new(0),
        })
    }

    /// The next automatic idempotency key of this client.
    pub(crate) fn next_key(&self) -> IdempotencyKey {
        IdempotencyKey::Producer {
            producer_id: self.producer_id,
            producer_seq: self.producer_seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// The current connection's Welcome.
    pub(crate) fn info(&self) -> SessionInfo {
        lock(&self.state.info).clone()
    }

    /// Checks a payload against the session's limit before anything is sent.
    pub(crate) fn check_payload(&self, len: usize) -> Result<(), Error> {
        let max = lock(&self.state.info).limits.payload_bytes_max;
        if len > max as usize {
            return Err(Error::PayloadTooLarge { len, max });
        }
        Ok(())
    }

    /// Sends `body` and waits for its reply, across reconnects, for at most the
    /// request timeout. A `Refused` reply becomes `Err(Error::Refused)`.
    pub(crate) async fn request(
        &self,
        body: Request,
        cursor_op: CursorOp,
        what: impl Fn() -> String,
    ) -> Result<Reply, Error> {
        self.send(body, cursor_op, &what).await?.reply(what).await
    }

    /// Sends `body` (queues it for the driver, in call order) without waiting for its
    /// reply: [`Sent::reply`] waits. Waits only for one of the
    /// `requests_in_flight_max` slots, within the request timeout; the slot is held
    /// until the reply arrives or the request times out.
    pub(crate) async fn send(
        &self,
        body: Request,
        cursor_op: CursorOp,
        what: impl Fn() -> String,
    ) -> Result<Sent, Error> {
        let after = self.request_timeout;
        let deadline = Instant::now() + after;

        // Bound: `requests_in_flight_max` slots; without one we wait (within the timeout).
        let permits = Arc::clone(&self.state.permits);
        let permit = match tokio::time::timeout_at(deadline, permits.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!(
                        "{} (waiting for one of the in-flight request slots)",
                        what()
                    ),
                    after,
                })
            }
        };

        let id = self.state.next_id();
        let (tx, rx) = oneshot::channel();
        {
            let mut cursors = match cursor_op {
                CursorOp::None => None,
                _ => Some(lock(&self.state.cursors)),
            };
            let mut pending = lock(&self.state.pending);
            if let Some(t) = &pending.terminal {
                return Err(t.to_error());
            }
            if let Some(c) = cursors.as_mut() {
                match cursor_op {
                    CursorOp::Subscribe { conv, from } => c.subscribe(conv, from),
                    CursorOp::Unsubscribe { conv } => {
                        c.remove(conv);
                    }
                    CursorOp::None => {}
                }
            }
            pending.requests.insert(
                id,
                PendingRequest {
                    body,
                    waiter: Waiter::Caller(tx),
                    sent_generation: 0,
                },
            );
        }
        if self.cmd_tx.send(Command::Send(id)).await.is_err() {
            lock(&self.state.pending).requests.remove(&id);
            return Err(Error::Closed);
        }
        Ok(Sent {
            id,
            rx,
            deadline,
            after,
            state: Arc::clone(&self.state),
            _permit: permit,
        })
    }

    /// Drains and closes the connection: finishes our stream, waits (at most the
    /// request timeout) for the broker to finish, then closes. Idempotent.
    pub(crate) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A request handed to the driver, its reply not yet taken. Holds one of the
/// `requests_in_flight_max` slots until [`Sent::reply`] returns; dropped unanswered,
/// its reply (when it comes) is discarded.
pub(crate) struct Sent {
    id: u64,
    rx: oneshot::Receiver<Result<Reply, Error>>,
    deadline: Instant,
    after: Duration,
    state: Arc<State>,
    _permit: OwnedSemaphorePermit,
}

impl Sent {
    /// Waits for the reply, across reconnects, until the request's deadline (the
    /// request timeout after it was sent). `what` names the request in a timeout.
    pub(crate) async fn reply(mut self, what: impl Fn() -> String) -> Result<Reply, Error> {
        let timeout = |what: String| Error::Timeout {
            what,
            after: self.after,
        };
        match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(result)) => result,
            // The driver dropped the waiter without answering: it stopped.
            Ok(Err(_)) => Err(lock(&self.state.pending)
                .terminal
                .as_ref()
                .map_or(Error::Closed, Terminal::to_error)),
            Err(_) => {
                lock(&self.state.pending).requests.remove(&self.id);
                // The reply may have landed between the deadline and the removal.
                match self.rx.try_recv() {
                    Ok(result) => result,
                    Err(_) => Err(timeout(what())),
                }
            }
        }
    }
}

/// An open connection that passed Hello/Welcome.
struct Established {
    /// Which seed it is (`config.addrs` index).
    seed_index: usize,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    reader: FrameReader,
    writer: FrameWriter,
    info: SessionInfo,
}

/// Why the driver leaves a connection.
enum Next {
    /// The application closed (or dropped every handle).
    Stop(Stop),
    /// A reason no reconnect can fix.
    Fatal(Error),
    /// The connection is gone; reconnect.
    Lost(String),
    /// The watchdog found the node silent (dead, or cut off): reconnect, with the
    /// backoff started afresh. The node did not drop us, it died, and the next
    /// attempt goes to the next seed; a backoff grown over earlier failovers would
    /// only delay it (measured: 650 ms of a 1.38 s leader-kill failover).
    Died(String),
    /// The node asked us to move (it is draining) and we left it; reconnect at once,
    /// to another seed first.
    Moved(String),
}

enum Stop {
    Close(oneshot::Sender<()>),
    Dropped,
}

/// How a reader task ended.
enum ReaderEnd {
    Goodbye(Refusal),
    Eof,
    Failed(Error),
}

/// Owns the write side and the reconnect loop; one per client.
struct Driver {
    config: ClientConfig,
    state: Arc<State>,
    cmd_rx: mpsc::Receiver<Command>,
    events: Option<mpsc::Sender<EventItem>>,
    backoff: Backoff,
    /// Index in the seed list where the next reconnect pass starts.
    next_start: usize,
    /// The next reconnect's first attempt goes without a backoff delay (after a
    /// move: the node's notice already spread the sessions out in time).
    reconnect_now: bool,
}

impl Driver {
    async fn run(mut self, first: Established) {
        let mut current = first;
        let mut generation = 0u64;
        let mut reconnected_to: Option<String> = None;
        loop {
            generation += 1;
            *lock(&self.state.info) = current.info.clone();
            let connected_at = Instant::now();
            let replies_before = self.state.replies.load(Ordering::Relaxed);
            let session_id = current.info.session_id;
            let addr = current.info.addr.clone();
            let reason = match self.serve(current, generation, reconnected_to.take()).await {
                Next::Stop(stop) => {
                    self.finish(Terminal::Closed);
                    if let Stop::Close(done) = stop {
                        let _ = done.send(());
                    }
                    return;
                }
                Next::Fatal(error) => {
                    tracing::warn!(session_id, %addr, "herald connection ended for good: {error}");
                    self.fail(error).await;
                    return;
                }
                Next::Lost(reason) => {
                    tracing::warn!(session_id, %addr, "herald connection lost, reconnecting: {reason}");
                    // A node that served us (answered requests, or stayed up a while)
                    // died: start the backoff afresh. One that accepted and dropped us
                    // keeps growing it.
                    let served = self.state.replies.load(Ordering::Relaxed) > replies_before;
                    if served || connected_at.elapsed() >= STABLE_CONNECTION_AFTER {
                        self.backoff.reset();
                    }
                    reason
                }
                Next::Died(reason) => {
                    tracing::warn!(session_id, %addr, "herald connection lost, reconnecting: {reason}");
                    self.backoff.reset();
                    reason
                }
                Next::Moved(reason) => {
                    tracing::info!(session_id, %addr, "herald client moving to another node: {reason}");
                    self.backoff.reset();
                    self.reconnect_now = true;
                    reason
                }
            };
            match self.reconnect(reason).await {
                Ok(established) => {
                    tracing::info!(
                        session_id = established.info.session_id,
                        addr = %established.info.addr,
                        "herald client reconnected"
                    );
                    reconnected_to = Some(established.info.addr.clone());
                    current = established;
                }
                Err(Next::Stop(stop)) => {
                    self.finish(Terminal::Closed);
                    if let Stop::Close(done) = stop {
                        let _ = done.send(());
                    }
                    return;
                }
                Err(Next::Fatal(error)) => {
                    tracing::warn!("herald client stopped reconnecting: {error}");
                    self.fail(error).await;
                    return;
                }
                Err(Next::Lost(reason) | Next::Moved(reason) | Next::Died(reason)) => {
                    self.fail(Error::Disconnected { reason }).await;
                    return;
                }
            }
        }
    }

    /// Serves one connection until it ends.
    async fn serve(
        &mut self,
        established: Established,
        generation: u64,
        reconnected_to: Option<String>,
    ) -> Next {
        let Established {
            seed_index: _,
            endpoint,
            conn,
            reader,
            mut writer,
            info,
        } = established;
        // At most one move notice matters per connection; later ones are dropped.
        let (move_tx, mut move_rx) = mpsc::channel::<MoveNotice>(1);
        let ctx = ReaderCtx {
            state: Arc::clone(&self.state),
            events: self.events.clone(),
            session_id: info.session_id,
            moves: move_tx,
        };
        let mut reader_task = tokio::spawn(read_loop(reader, ctx, reconnected_to));
        // Closes the connection if the node falls silent while replies are owed; its
        // verdict, when it has one, is the reason the connection ended.
        let watchdog = Watchdog::start(
            conn.clone(),
            Arc::clone(&self.state),
            generation,
            self.config.liveness_timeout,
            // A publisher has no event queue; its idle connections are watched too.
            if self.events.is_some() {
                Watch::WhileOwed
            } else {
                Watch::Always
            },
        );
        let lost = |reason: String| match watchdog.verdict() {
            Some(verdict) => Next::Died(verdict),
            None => Next::Lost(reason),
        };

        let swept = self.sweep(&mut writer, generation).await;
        watchdog.request_sent();
        if let Err(e) = swept {
            stop_reader(reader_task).await;
            conn.close(quinn::VarInt::from_u32(0), b"write failed");
            return lost(format!("resending after connect failed: {e}"));
        }

        // When set: the node asked us to move, and this is when we leave it.
        let mut move_at: Option<(Instant, String)> = None;
        loop {
            let leave_at = move_at.as_ref().map_or_else(Instant::now, |(at, _)| *at);
            tokio::select! {
                Some(notice) = move_rx.recv(), if move_at.is_none() => {
                    let delay = move_delay(notice.within_ms, &mut rand::rng());
                    tracing::debug!(
                        session_id = info.session_id,
                        ?delay,
                        "the node asked this session to move: {}",
                        notice.detail
                    );
                    move_at = Some((Instant::now() + delay, notice.detail));
                }
                _ = tokio::time::sleep_until(leave_at), if move_at.is_some() => {
                    stop_reader(reader_task).await;
                    conn.close(quinn::VarInt::from_u32(0), b"moving to another node");
                    let detail = move_at.take().map(|(_, d)| d).unwrap_or_default();
                    return Next::Moved(detail);
                }
                end = &mut reader_task => {
                    conn.close(quinn::VarInt::from_u32(0), b"stream ended");
                    return match (reader_ended(end), watchdog.verdict()) {
                        (Next::Lost(_), Some(verdict)) => Next::Died(verdict),
                        (next, _) => next,
                    };
                }
                command = self.cmd_rx.recv() => {
                    let mut stop = None;
                    match command {
                        None => stop = Some(Stop::Dropped),
                        Some(Command::Close(done)) => stop = Some(Stop::Close(done)),
                        Some(Command::Send(id)) => self.queue_request(&mut writer, id, generation),
                    }
                    // Coalesce whatever else is waiting into the same write.
                    while stop.is_none() && writer.pending_len() < FLUSH_BYTES_MAX {
                        match self.cmd_rx.try_recv() {
                            Ok(Command::Send(id)) => self.queue_request(&mut writer, id, generation),
                            Ok(Command::Close(done)) => stop = Some(Stop::Close(done)),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => stop = Some(Stop::Dropped),
                        }
                    }
                    let flushed = writer.flush().await;
                    watchdog.request_sent();
                    if let Some(stop) = stop {
                        self.drain(writer, reader_task, conn, endpoint).await;
                        return Next::Stop(stop);
                    }
                    if let Err(e) = flushed {
                        stop_reader(reader_task).await;
                        conn.close(quinn::VarInt::from_u32(0), b"write failed");
                        return lost(e.to_string());
                    }
                }
            }
        }
    }

    /// Graceful end: finish our side, let the reader take the remaining replies
    /// until the broker closes (at most the request timeout), then close.
    async fn drain(
        &mut self,
        mut writer: FrameWriter,
        mut reader_task: JoinHandle<ReaderEnd>,
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
    ) {
        let _ = writer.finish().await;
        if tokio::time::timeout(self.config.request_timeout, &mut reader_task)
            .await
            .is_err()
        {
            tracing::debug!("the broker did not close within the request timeout; closing");
            stop_reader(reader_task).await;
        }
        conn.close(quinn::VarInt::from_u32(0), b"client closed");
        let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
    }

    /// After (re)connecting: resubscribe every cursor and (re)send every request
    /// still waiting, in id order.
    async fn sweep(&mut self, writer: &mut FrameWriter, generation: u64) -> Result<(), IoError> {
        let mut completed: Vec<(PendingRequest, Result<Reply, Error>)> = Vec::new();
        {
            let cursors = lock(&self.state.cursors);
            let mut pending = lock(&self.state.pending);
            // Resubscriptions of an earlier connection are rebuilt from the cursors.
            pending
                .requests
                .retain(|_, r| !matches!(r.waiter, Waiter::Resubscribe));
            let caller_subscribing: HashSet<u64> = pending
                .requests
                .values()
                .filter_map(|r| match r.body {
                    Request::Subscribe { conv, .. } => Some(conv),
                    _ => None,
                })
                .collect();
            for (conv, from) in cursors.resubscriptions() {
                if !caller_subscribing.contains(&conv) {
                    let id = self.state.next_id();
                    pending.requests.insert(
                        id,
                        PendingRequest {
                            body: Request::Subscribe { conv, from },
                            waiter: Waiter::Resubscribe,
                            sent_generation: 0,
                        },
                    );
                }
            }
            let mut subscribed_here = HashSet::new();
            let mut done_locally = Vec::new();
            let mut failed = Vec::new();
            for (id, request) in pending.requests.iter_mut() {
                match &mut request.body {
                    Request::Subscribe { conv, from } => {
                        // Resume from the cursor, not from where the caller started.
                        if let Some(resume) = cursors.resume_from(*conv) {
                            *from = resume;
                        }
                        subscribed_here.insert(*conv);
                    }
                    // A retried unsubscribe of something this connection never
                    // subscribed is already done.
                    Request::Unsubscribe { conv } if !subscribed_here.contains(conv) => {
                        done_locally.push(*id);
                        continue;
                    }
                    _ => {}
                }
                request.sent_generation = generation;
                if let Err(e) = queue_body(writer, *id, &mut request.body) {
                    failed.push((*id, e));
                }
            }
            for id in done_locally {
                if let Some(r) = pending.requests.remove(&id) {
                    completed.push((r, Ok(Reply::Done)));
                }
            }
            for (id, e) in failed {
                if let Some(r) = pending.requests.remove(&id) {
                    completed.push((r, Err(e)));
                }
            }
        }
        for (request, result) in completed {
            if let Waiter::Caller(tx) = request.waiter {
                let _ = tx.send(result);
            }
        }
        writer.flush().await.map(|_| ())
    }

    /// Queues the pending request `id`, unless it is gone (answered, timed out) or
    /// already went out on this connection.
    fn queue_request(&mut self, writer: &mut FrameWriter, id: u64, generation: u64) {
        let mut pending = lock(&self.state.pending);
        let Some(request) = pending.requests.get_mut(&id) else {
            return;
        };
        if request.sent_generation == generation {
            return;
        }
        request.sent_generation = generation;
        if let Err(e) = queue_body(writer, id, &mut request.body) {
            if let Some(PendingRequest {
                waiter: Waiter::Caller(tx),
                ..
            }) = pending.requests.remove(&id)
            {
                let _ = tx.send(Err(e));
            }
        }
    }

    /// Reconnects: passes over the seed list with backoff until one succeeds, the
    /// attempts run out, the broker refuses us for good, or the application closes.
    async fn reconnect(&mut self, reason: String) -> Result<Established, Next> {
        let mut last = reason;
        let mut attempts = 0u32;
        loop {
            if let Some(max) = self.config.reconnect_attempts_max {
                if attempts >= max {
                    return Err(Next::Fatal(Error::ReconnectExhausted { attempts, last }));
                }
            }
            let delay = if std::mem::take(&mut self.reconnect_now) {
                Duration::ZERO
            } else {
                self.backoff.next_delay()
            };
            tracing::debug!(
                ?delay,
                attempt = attempts + 1,
                "waiting before reconnecting"
            );
            self.until_stop(tokio::time::sleep(delay))
                .await
                .map_err(Next::Stop)?;
            attempts += 1;
            let start = self.next_start;
            let seeds = self.config.addrs.len().max(1);
            self.next_start = (start + 1) % seeds;
            let config = self.config.clone();
            match self
                .until_stop(connect_pass(&config, start))
                .await
                .map_err(Next::Stop)?
            {
                Ok(established) => {
                    self.next_start = (established.seed_index + 1) % seeds;
                    return Ok(established);
                }
                Err(e) if e.is_fatal_for_connect() => return Err(Next::Fatal(e)),
                Err(e) => {
                    tracing::warn!(attempt = attempts, "herald reconnect attempt failed: {e}");
                    last = e.to_string();
                }
            }
        }
    }

    /// Runs `fut` while watching for close; requests arriving meanwhile stay
    /// pending and go out after the reconnect.
    async fn until_stop<F: Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                command = self.cmd_rx.recv() => match command {
                    Some(Command::Send(_)) => {}
                    Some(Command::Close(done)) => return Err(Stop::Close(done)),
                    None => return Err(Stop::Dropped),
                },
            }
        }
    }

    /// Stops for good: fails every waiting request with `terminal` and ends the
    /// event stream.
    fn finish(&mut self, terminal: Terminal) {
        let requests = {
            let mut pending = lock(&self.state.pending);
            pending.terminal = Some(terminal.clone());
            std::mem::take(&mut pending.requests)
        };
        for (_, request) in requests {
            if let Waiter::Caller(tx) = request.waiter {
                let _ = tx.send(Err(terminal.to_error()));
            }
        }
        self.events = None;
    }

    /// Stops for good because of `error`, which the session's stream yields last.
    async fn fail(&mut self, error: Error) {
        let terminal = match &error {
            Error::Refused(r) => Terminal::Refused(r.clone()),
            Error::Closed => Terminal::Closed,
            other => Terminal::Failed(other.to_string()),
        };
        let events = self.events.take();
        self.finish(terminal);
        if let Some(tx) = events {
            let _ = tx.send(Err(error)).await;
        }
    }
}

/// Queues a request frame without copying its payload.
fn queue_body(writer: &mut FrameWriter, id: u64, body: &mut Request) -> Result<(), Error> {
    let frame = Frame::Request {
        id,
        body: std::mem::replace(body, Request::Unsubscribe { conv: 0 }),
    };
    let queued = writer.queue(&frame);
    if let Frame::Request { body: b, .. } = frame {
        *body = b;
    }
    queued.map_err(|e| match e {
        IoError::Wire(w) => Error::Wire(w),
        other => Error::Io(other),
    })
}

async fn stop_reader(task: JoinHandle<ReaderEnd>) {
    task.abort();
    let _ = task.await;
}

fn reader_ended(end: Result<ReaderEnd, tokio::task::JoinError>) -> Next {
    match end {
        Ok(ReaderEnd::Goodbye(r)) if goodbye_means_reconnect(r.code) => {
            Next::Lost(format!("the broker said goodbye: {r}"))
        }
        Ok(ReaderEnd::Goodbye(r)) => Next::Fatal(Error::Refused(r)),
        Ok(ReaderEnd::Eof) => Next::Lost("the broker ended the stream".into()),
        Ok(ReaderEnd::Failed(e)) => Next::Lost(e.to_string()),
        Err(e) => Next::Lost(format!("the reader task failed: {e}")),
    }
}

/// What a reader task needs.
struct ReaderCtx {
    state: Arc<State>,
    events: Option<mpsc::Sender<EventItem>>,
    session_id: u64,
    /// Move notices, to the driver (which decides when to leave).
    moves: mpsc::Sender<MoveNotice>,
}

/// When to leave a node that asked us to move: uniformly random within its window,
/// so that the node's sessions spread their reconnects over that window.
fn move_delay<R: rand::Rng + ?Sized>(within_ms: u32, rng: &mut R) -> Duration {
    Duration::from_millis(rng.random_range(0..=u64::from(within_ms)))
}

async fn read_loop(
    mut reader: FrameReader,
    mut ctx: ReaderCtx,
    reconnected_to: Option<String>,
) -> ReaderEnd {
    if let Some(addr) = reconnected_to {
        ctx.emit(SessionEvent::Reconnected { addr }).await;
    }
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return ReaderEnd::Eof,
            Err(e) => {
                reader.stop(STOP_CODE);
                return ReaderEnd::Failed(Error::Io(e));
            }
        };
        match frame {
            Frame::Reply { id, body } => {
                if let Some(end) = ctx.on_reply(id, body).await {
                    return end;
                }
            }
            Frame::Deliver(message) => ctx.on_deliver(message).await,
            Frame::Event(event) => ctx.on_event(event).await,
            Frame::Goodbye(refusal) => return ReaderEnd::Goodbye(refusal),
            // Full: a notice is already with the driver; this one adds nothing.
            Frame::Move(notice) => {
                let _ = ctx.moves.try_send(notice);
            }
            other => {
                reader.stop(STOP_CODE);
                return ReaderEnd::Failed(Error::Protocol {
                    reason: format!("unexpected {} frame after the handshake", other.kind_name()),
                });
            }
        }
    }
}

impl ReaderCtx {
    /// Waits for room in the application's queue. `None` when there is no
    /// application queue (publisher, or the application dropped its session).
    async fn room(&self) -> Option<mpsc::Permit<'_, EventItem>> {
        match &self.events {
            Some(tx) => tx.reserve().await.ok(),
            None => None,
        }
    }

    async fn emit(&mut self, event: SessionEvent) {
        if let Some(permit) = self.room().await {
            permit.send(Ok(event));
        }
    }

    async fn on_deliver(&mut self, message: Message) {
        let (conv, seq) = (message.conv, message.seq);
        if !lock(&self.state.cursors).check(conv, seq).delivers() {
            tracing::trace!(
                conv,
                seq,
                "dropping a delivery already seen or not subscribed"
            );
            return;
        }
        // Room first, then record: the cursor moves only for a message that will
        // reach the queue (an abort while waiting here loses nothing).
        let permit = self.room().await;
        let verdict = lock(&self.state.cursors).accept(conv, seq);
        if let Verdict::DeliverAfterGap { expected } = verdict {
            tracing::warn!(
                session_id = self.session_id,
                conv,
                seq,
                expected,
                "broker skipped seqs on this conversation (a broker bug); delivering anyway"
            );
        }
        if verdict.delivers() {
            if let Some(permit) = permit {
                permit.send(Ok(SessionEvent::Message(message)));
            }
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Truncated {
                conv,
                requested_from,
                first_available_seq,
            } => {
                if lock(&self.state.cursors).resume_from(conv).is_none() {
                    return;
                }
                let permit = self.room().await;
                lock(&self.state.cursors).truncated(conv, first_available_seq);
                if let Some(permit) = permit {
                    permit.send(Ok(SessionEvent::Truncated {
                        conv,
                        requested_from,
                        first_available_seq,
                    }));
                }
            }
            Event::Lagged { dropped } => {
                tracing::debug!(session_id = self.session_id, dropped, "session lagged");
                self.emit(SessionEvent::Lagged { dropped }).await;
            }
            Event::Unsubscribed { conv, reason } => {
                lock(&self.state.cursors).remove(conv);
                self.emit(SessionEvent::Unsubscribed { conv, reason }).await;
            }
        }
    }

    /// Hands a reply to its waiter. Returns an end when the connection must go.
    async fn on_reply(&mut self, id: u64, body: Reply) -> Option<ReaderEnd> {
        let request = lock(&self.state.pending).requests.remove(&id);
        let Some(request) = request else {
            tracing::debug!(id, "reply to a request nobody waits for (timed out)");
            return None;
        };
        if !matches!(body, Reply::Refused(_)) {
            // The node did work for us (a refusal, e.g. `Unavailable`, does not count:
            // it must not reset the reconnect backoff).
            self.state.replies.fetch_add(1, Ordering::Relaxed);
        }
        if let (Request::Subscribe { conv, .. }, Reply::Subscribed { next_seq, .. }) =
            (&request.body, &body)
        {
            lock(&self.state.cursors).subscribed(*conv, *next_seq);
        }
        match request.waiter {
            Waiter::Caller(tx) => {
                let _ = tx.send(match body {
                    Reply::Refused(r) => Err(Error::Refused(r)),
                    other => Ok(other),
                });
            }
            Waiter::Resubscribe => {
                let (Request::Subscribe { conv, .. }, Reply::Refused(reason)) =
                    (request.body, body)
                else {
                    return None;
                };
                if refusal_is_transient(reason.code) {
                    // The node cannot serve this conversation right now: try again
                    // (with backoff, possibly elsewhere), keeping the cursor.
                    return Some(ReaderEnd::Failed(Error::Refused(reason)));
                }
                // For good (e.g. removed from the group meanwhile): tell the application.
                lock(&self.state.cursors).remove(conv);
                self.emit(SessionEvent::Unsubscribed { conv, reason }).await;
            }
        }
        None
    }
}

/// A reply's name, for errors.
pub(crate) fn reply_kind(reply: &Reply) -> &'static str {
    match reply {
        Reply::Done => "Done",
        Reply::Created { .. } => "Created",
        Reply::Published { .. } => "Published",
        Reply::Subscribed { .. } => "Subscribed",
        Reply::History(_) => "History",
        Reply::ClusterMap(_) => "ClusterMap",
        Reply::Refused(_) => "Refused",
    }
}

/// The error for a reply of the wrong kind.
pub(crate) fn unexpected_reply(request: &str, reply: &Reply) -> Error {
    Error::Protocol {
        reason: format!(
            "the broker answered {request} with a {} reply",
            reply_kind(reply)
        ),
    }
}

/// One pass over the seed list starting at `start`: the first address that
/// completes the handshake wins. A refusal no retry can fix ends the pass at once.
async fn connect_pass(config: &ClientConfig, start: usize) -> Result<Established, Error> {
    let n = config.addrs.len();
    let mut last = None;
    for i in 0..n {
        let seed_index = (start + i) % n;
        let addr = &config.addrs[seed_index];
        match connect_once(config, addr, seed_index).await {
            Ok(established) => return Ok(established),
            Err(e) if e.is_fatal_for_connect() => return Err(e),
            Err(e) => {
                if n > 1 {
                    tracing::debug!(%addr, "cannot connect: {e}");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(Error::Config {
        reason: "no broker address".into(),
    }))
}

/// One connection attempt to one address, bounded by the connect timeout.
async fn connect_once(
    config: &ClientConfig,
    addr: &SeedAddr,
    seed_index: usize,
) -> Result<Established, Error> {
    let after = config.connect_timeout;
    match tokio::time::timeout(after, handshake(config, addr, seed_index)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect {
            addr: addr.text.clone(),
            reason: format!("no answer within {after:?} (is a broker listening there?)"),
        }),
    }
}

async fn handshake(
    config: &ClientConfig,
    addr: &SeedAddr,
    seed_index: usize,
) -> Result<Established, Error> {
    let fail = |reason: String| Error::Connect {
        addr: addr.text.clone(),
        reason,
    };
    let target = resolve(addr).await.map_err(&fail)?;
    let bind: SocketAddr = if target.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| fail(format!("cannot open a UDP socket on {bind}: {e}")))?;
    let conn = endpoint
        .connect_with(config.quic.clone(), target, &addr.host)
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(describe_connection_error(&e)))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| fail(format!("cannot open a stream: {e}")))?;
    let mut writer = FrameWriter::new(send, FRAME_BYTES_CEILING);
    let mut reader = FrameReader::new(recv, FRAME_BYTES_CEILING);
    writer.queue_encoded(&wire::preamble());
    writer.queue(&Frame::Hello(Hello {
        token: config.token.clone(),
        client_name: config.client_name.clone(),
    }))?;
    writer
        .flush()
        .await
        .map_err(|e| fail(format!("sending Hello: {e}")))?;
    reader
        .read_preamble()
        .await
        .map_err(|e| fail(format!("reading the broker's preamble: {e}")))?;
    match reader.next().await {
        Ok(Some(Frame::Welcome(welcome))) => Ok(Established {
            seed_index,
            info: SessionInfo {
                session_id: welcome.session_id,
                principal: welcome.principal,
                limits: welcome.limits,
                addr: addr.text.clone(),
            },
            endpoint,
            conn,
            reader,
            writer,
        }),
        Ok(Some(Frame::Goodbye(refusal))) => {
            conn.close(quinn::VarInt::from_u32(0), b"refused");
            Err(Error::Refused(refusal))
        }
        Ok(Some(other)) => {
            conn.close(quinn::VarInt::from_u32(0), b"protocol error");
            Err(Error::Protocol {
                reason: format!(
                    "expected Welcome or Goodbye after Hello, got {}",
                    other.kind_name()
                ),
            })
        }
        Ok(None) => Err(fail(
            "the broker ended the stream without answering Hello".into(),
        )),
        Err(e) => Err(fail(format!("waiting for Welcome: {e}"))),
    }
}

async fn resolve(addr: &SeedAddr) -> Result<SocketAddr, String> {
    let mut found = tokio::net::lookup_host((addr.host.as_str(), addr.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", addr.host))?;
    found
        .next()
        .ok_or_else(|| format!("{} resolves to no address", addr.host))
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("Certificate") {
        format!(
            "{text} (the broker's certificate does not verify against the configured CA, \
             or does not name this host; check --ca and the address)"
        )
    } else if matches!(e, quinn::ConnectionError::TimedOut) {
        format!("{text} (is a broker listening there?)")
    } else {
        text
    }
}
