//! One client connection: handshake, request handling, and the session's writer.
//!
//! Owns: the connection's single bidirectional stream. The *reader* (this task) decodes
//! requests, authorizes and executes them through the [`Engine`], and hands replies to the
//! *writer* task, which alone writes to the stream. The writer owns the session's
//! per-conversation cursors (last seq sent), so ordering is decided in one place:
//!
//! * a live delivery with `seq == cursor + 1` is sent; `seq <= cursor` is skipped (a
//!   duplicate); `seq > cursor + 1` means a gap, which the writer fills from history first;
//! * subscribe with `from` sets `cursor = from - 1` and replays history up to the present,
//!   then live deliveries continue from the cursor — no gap and no duplicate at the switch;
//! * when the outbox overflowed (the session lagged), the writer tells the client and
//!   re-sends from history starting at each cursor.
//!
//! The writer coalesces every queued frame into one stream write. If the client stops
//! reading for longer than `slow_consumer_timeout`, the connection is closed with
//! `SlowConsumer`; the client reconnects and resumes from its cursors.
//!
//! Must not: block the fan-out path (it only ever reads its own outbox), or trust any
//! byte from the client before the wire module validated it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::io::{FrameReader, FrameWriter, IoError};
use herald_client::wire::Principal;
use herald_client::wire::{
    Event, Frame, Hello, HistoryPage, MoveNotice, Refusal, RefusalCode, Reply, Request,
    SessionLimits, Welcome, WireError,
};
use tokio::sync::mpsc;

use super::NodeContext;
use crate::engine::{MemberChange, PublishOutcome, Submitted};
use crate::routing::{Delivery, Outbox};
use crate::store::Action;

/// Application close codes on the QUIC connection.
pub mod close_code {
    /// Normal close.
    pub const NORMAL: u32 = 0;
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// Handshake refused (auth, version).
    pub const REFUSED: u32 = 2;
    /// The client did not read fast enough.
    pub const SLOW_CONSUMER: u32 = 3;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 4;
}

/// Deliveries drained from the outbox per writer pass (one stream write).
const DRAIN_BATCH_LEN_MAX: usize = 1024;
/// Bytes the writer buffers (replay or live) before it flushes.
const REPLAY_FLUSH_BYTES: usize = 256 * 1024;

/// What the reader asks the writer to do, in order.
pub(crate) enum Control {
    Reply {
        id: u64,
        body: Reply,
    },
    Subscribe {
        id: u64,
        conv: u64,
        from: Option<u64>,
    },
    Unsubscribe {
        id: u64,
        conv: u64,
    },
    /// The user was removed from `conv`: end the subscription and say why.
    Revoke {
        conv: u64,
        reason: Refusal,
    },
    Goodbye(Refusal),
    /// The node is draining: ask the client to move to another node.
    Move(MoveNotice),
}

/// The live sessions on this node: all of them (a drain asks each to move), and each
/// user's (removing a member ends that user's subscriptions). Bounded by the number of
/// open connections (`connections_max`).
#[derive(Default)]
pub struct Registry {
    by_user: dashmap::DashMap<u64, Vec<(u64, mpsc::Sender<Control>)>>,
    all: dashmap::DashMap<u64, mpsc::Sender<Control>>,
}

impl Registry {
    fn register(&self, principal: &Principal, session_id: u64, control: mpsc::Sender<Control>) {
        if let Principal::User(user) = principal {
            self.by_user
                .entry(*user)
                .or_default()
                .push((session_id, control.clone()));
        }
        self.all.insert(session_id, control);
    }

    fn unregister(&self, principal: &Principal, session_id: u64) {
        self.all.remove(&session_id);
        let Principal::User(user) = principal else {
            return;
        };
        if let dashmap::Entry::Occupied(mut e) = self.by_user.entry(*user) {
            e.get_mut().retain(|(id, _)| *id != session_id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    /// Sessions open on this node.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Asks every open session to move (see [`MoveNotice`]); returns how many were
    /// asked. A session whose control queue is full is asked by a task of its own, so
    /// a drain never waits on one slow session.
    pub(crate) fn move_all(&self, notice: &MoveNotice) -> usize {
        let sessions: Vec<mpsc::Sender<Control>> =
            self.all.iter().map(|e| e.value().clone()).collect();
        for control in &sessions {
            let message = Control::Move(notice.clone());
            if let Err(mpsc::error::TrySendError::Full(message)) = control.try_send(message) {
                let control = control.clone();
                tokio::spawn(async move {
                    let _ = control.send(message).await;
                });
            }
        }
        sessions.len()
    }

    /// Ends `users`' subscriptions to `conv` on this node.
    pub(crate) fn revoke(&self, conv: u64, users: &[u64]) {
        for user in users {
            let Some(sessions) = self.by_user.get(user) else {
                continue;
            };
            for (_, control) in sessions.iter() {
                let message = Control::Revoke {
                    conv,
                    reason: Refusal::new(
                        RefusalCode::NotMember,
                        format!("user {user} was removed from conversation {conv}"),
                    ),
                };
                // At the bound (the session's control queue is full) hand it to a task
                // rather than block the request that removed the member.
                if let Err(mpsc::error::TrySendError::Full(message)) = control.try_send(message) {
                    let control = control.clone();
                    tokio::spawn(async move {
                        let _ = control.send(message).await;
                    });
                }
            }
        }
    }
}

/// Serves one accepted connection until it closes.
/// `handshake_done` runs once the QUIC handshake has finished, either way.
pub async fn serve_connection(
    ctx: Arc<NodeContext>,
    connecting: quinn::Incoming,
    handshake_done: impl FnOnce(),
) {
    let remote = connecting.remote_address();
    let started = Instant::now();
    // Counts how the handshake (QUIC, then Hello → Welcome) ended, and how long it took.
    let handshake_ended = |result: &'static str| {
        ctx.metrics
            .handshakes
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
        ctx.metrics
            .handshake_latency_seconds
            .observe(started.elapsed().as_secs_f64());
    };
    let handshake = tokio::time::timeout(ctx.config.limits.handshake_timeout, connecting).await;
    handshake_done();
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "QUIC handshake failed: {e}");
            handshake_ended("failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "QUIC handshake timed out");
            handshake_ended("timeout");
            return;
        }
    };
    ctx.metrics.connections_accepted.inc();
    ctx.metrics.connections.inc();
    let _open = scopeguard(&ctx, |c| {
        c.metrics.connections.dec();
    });
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(herald_client::wire::ALPN_PEER) {
        // Another node: it must prove the cluster secret before any RPC is served.
        crate::raft::network::serve_peer(conn, ctx.peer_server.clone()).await;
        return;
    }
    if alpn.as_deref() != Some(herald_client::wire::ALPN_CLIENT) {
        handshake_ended("refused");
        conn.close(
            quinn::VarInt::from_u32(close_code::REFUSED),
            b"unknown ALPN: clients speak herald/1, nodes herald-peer/1",
        );
        return;
    }
    let limits = &ctx.config.limits;
    let stream = tokio::time::timeout(limits.handshake_timeout, conn.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(s)) => s,
        _ => {
            handshake_ended("timeout");
            conn.close(
                quinn::VarInt::from_u32(close_code::PROTOCOL_ERROR),
                b"no stream opened within the handshake timeout",
            );
            return;
        }
    };
    let mut reader = FrameReader::new(recv, limits.frame_bytes_max);
    let mut writer = FrameWriter::new(send, limits.frame_bytes_max);
    let hello = tokio::time::timeout(limits.handshake_timeout, async {
        reader.read_preamble().await?;
        reader.next().await
    })
    .await;
    let hello = match hello {
        Ok(Ok(Some(Frame::Hello(hello)))) => hello,
        Ok(Ok(Some(_))) => {
            refuse(
                &conn,
                &mut writer,
                RefusalCode::NotAuthenticated,
                "the first frame must be Hello".into(),
            )
            .await;
            handshake_ended("refused");
            return;
        }
        Ok(Ok(None)) => {
            handshake_ended("failed");
            return;
        }
        Ok(Err(IoError::Wire(e @ WireError::UnsupportedVersion { .. }))) => {
            refuse(
                &conn,
                &mut writer,
                RefusalCode::UnsupportedVersion,
                e.to_string(),
            )
            .await;
            handshake_ended("refused");
            return;
        }
        Ok(Err(IoError::Wire(e))) => {
            refuse(
                &conn,
                &mut writer,
                RefusalCode::ProtocolError,
                e.to_string(),
            )
            .await;
            handshake_ended("refused");
            return;
        }
        Ok(Err(_)) => {
            handshake_ended("failed");
            return;
        }
        Err(_) => {
            refuse(
                &conn,
                &mut writer,
                RefusalCode::NotAuthenticated,
                "no Hello within the handshake timeout".into(),
            )
            .await;
            handshake_ended("timeout");
            return;
        }
    };
    let principal = match authenticate(&ctx, &hello) {
        Ok(p) => p,
        Err(refusal) => {
            ctx.metrics.refused(refusal.code);
            let _ = writer.write_preamble().await;
            let _ = writer.send(&Frame::Goodbye(refusal.clone())).await;
            let _ = writer.finish().await;
            close_after_flush(&conn, close_code::REFUSED, &refusal.detail).await;
            handshake_ended("refused");
            return;
        }
    };
    let session_id = ctx.next_session_id();
    let welcome = Frame::Welcome(Welcome {
        session_id,
        principal: principal.clone(),
        limits: SessionLimits {
            frame_bytes_max: limits.frame_bytes_max,
            payload_bytes_max: limits.payload_bytes_max,
            subscriptions_max: limits.subscriptions_per_session_max,
        },
    });
    if writer.write_preamble().await.is_err() || writer.send(&welcome).await.is_err() {
        handshake_ended("failed");
        return;
    }
    handshake_ended("ok");
    ctx.metrics.sessions.inc();
    tracing::debug!(session_id, %principal, %remote, connection_id = conn.stable_id(), "session started");

    let outbox = Arc::new(Outbox::new(
        session_id,
        limits.session_queue_len_max as usize,
    ));
    let (control_tx, control_rx) = mpsc::channel(limits.requests_in_flight_max as usize);
    let session_writer = SessionWriter {
        ctx: ctx.clone(),
        conn: conn.clone(),
        writer,
        outbox: outbox.clone(),
        control: control_rx,
        cursors: HashMap::default(),
        batch: Vec::new(),
        session_id,
        principal: principal.clone(),
    };
    let writer_task = tokio::spawn(session_writer.run());
    ctx.sessions
        .register(&principal, session_id, control_tx.clone());
    if ctx.engine.groups().draining() {
        // Began draining while this session shook hands: it missed the notice.
        let _ = control_tx.try_send(Control::Move(super::drain::notice(&ctx)));
    }

    let reason = read_requests(&ctx, &principal, &mut reader, &control_tx).await;
    if let Some(refusal) = reason {
        tracing::info!(session_id, %principal, %remote, "closing session: {refusal}");
        ctx.metrics.disconnected("ProtocolError");
        let _ = control_tx.send(Control::Goodbye(refusal)).await;
    }
    ctx.sessions.unregister(&principal, session_id);
    drop(control_tx);
    let _ = writer_task.await;
    ctx.metrics.sessions.dec();
    tracing::debug!(session_id, "session ended");
}

/// Reads and executes requests until the stream ends. Returns a refusal if the client
/// broke the protocol (the writer then says Goodbye and closes).
///
/// Reads (history, subscribe) run here, in order. Writes are queued here, in order,
/// and answered by the session's reply task once committed.
async fn read_requests(
    ctx: &Arc<NodeContext>,
    principal: &Principal,
    reader: &mut FrameReader,
    control: &mpsc::Sender<Control>,
) -> Option<Refusal> {
    let mut counted_bytes = reader.frame_bytes_read();
    // Writes are queued on the engine in the order they arrive; one task per session
    // waits for their commits in that same order and replies, so replies to writes
    // come back in request order too. At `requests_in_flight_max` waiting writes the
    // reader stops reading the stream.
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<(u64, Instant, Write)>(ctx.config.limits.requests_in_flight_max as usize);
    {
        let ctx = ctx.clone();
        let principal = principal.clone();
        let control = control.clone();
        tokio::spawn(async move {
            while let Some((id, started, write)) = pending_rx.recv().await {
                let is_publish = matches!(write, Write::Publish(..));
                let control_msg = finish_write(&ctx.engine, id, write).await;
                log_refusal(&principal, &control_msg);
                if control.send(control_msg).await.is_err() {
                    return;
                }
                if is_publish {
                    ctx.metrics
                        .publish_ack_latency_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
            }
        });
    }
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(IoError::Wire(e)) => {
                return Some(Refusal::new(RefusalCode::ProtocolError, e.to_string()));
            }
            Err(_) => return None,
        };
        let (id, body) = match frame {
            Frame::Request { id, body } => (id, body),
            other => {
                return Some(Refusal::new(
                    RefusalCode::ProtocolError,
                    format!("expected a Request frame, got {}", other.kind_name()),
                ));
            }
        };
        let read = reader.frame_bytes_read();
        ctx.metrics.received_bytes.inc_by(read - counted_bytes);
        counted_bytes = read;
        if is_write(&body) {
            let started = Instant::now();
            let write = submit_write(ctx, principal, body).await;
            if pending_tx.send((id, started, write)).await.is_err() {
                return None;
            }
        } else {
            let control_msg = execute_read(ctx, principal, id, body).await;
            log_refusal(principal, &control_msg);
            if control.send(control_msg).await.is_err() {
                return None;
            }
        }
    }
}

fn log_refusal(principal: &Principal, control_msg: &Control) {
    if let Control::Reply {
        id,
        body: Reply::Refused(r),
    } = control_msg
    {
        tracing::debug!(%principal, "request {id} refused: {r}");
    }
}

/// Requests that change state and so go through the Raft log.
fn is_write(body: &Request) -> bool {
    matches!(
        body,
        Request::CreateConversation { .. }
            | Request::AddMembers { .. }
            | Request::RemoveMembers { .. }
            | Request::Publish { .. }
    )
}

fn reply(id: u64, r: Result<Reply, Refusal>) -> Control {
    Control::Reply {
        id,
        body: r.unwrap_or_else(Reply::Refused),
    }
}

/// A write queued on the engine's pipeline (or refused before it was queued).
enum Write {
    Create(Result<Submitted<bool>, Refusal>),
    Members(Result<Submitted<()>, Refusal>),
    Remove(Result<Submitted<()>, Refusal>),
    Publish(Result<Submitted<PublishOutcome>, Refusal>, u64),
    ReadRequest,
}

/// Checks and queues one write request.
async fn submit_write(ctx: &NodeContext, principal: &Principal, body: Request) -> Write {
    let engine = &ctx.engine;
    match body {
        Request::CreateConversation {
            conv,
            kind,
            members,
        } => Write::Create(engine.create(principal, conv, kind, members).await),
        Request::AddMembers { conv, members } => Write::Members(
            engine
                .change_members(principal, conv, members, MemberChange::Add)
                .await,
        ),
        Request::RemoveMembers { conv, members } => Write::Remove(
            engine
                .change_members(principal, conv, members, MemberChange::Remove)
                .await,
        ),
        Request::Publish { conv, key, payload } => {
            Write::Publish(engine.publish(principal, conv, key, payload).await, conv)
        }
        _ => Write::ReadRequest,
    }
}

/// Waits for a queued write's commit and builds its reply.
async fn finish_write(engine: &crate::engine::Engine, id: u64, write: Write) -> Control {
    async fn wait<T>(submitted: Result<Submitted<T>, Refusal>) -> Result<T, Refusal> {
        submitted?.wait().await
    }
    match write {
        Write::Create(s) => reply(id, wait(s).await.map(|created| Reply::Created { created })),
        Write::Members(s) => reply(id, wait(s).await.map(|()| Reply::Done)),
        // The group's leader ends the removed members' subscriptions on every node
        // when it applies the removal.
        Write::Remove(s) => reply(id, wait(s).await.map(|()| Reply::Done)),
        Write::Publish(s, conv) => {
            let result = wait(s).await;
            reply(
                id,
                result.map(|o| Reply::Published {
                    seq: o.seq,
                    duplicate: o.duplicate,
                    leader: engine.leader_hint(conv),
                }),
            )
        }
        Write::ReadRequest => reply(
            id,
            Err(Refusal::new(
                RefusalCode::Internal,
                "a read reached the write path; this is a bug",
            )),
        ),
    }
}

/// Runs one read request on this replica; subscriptions go to the writer.
async fn execute_read(ctx: &NodeContext, principal: &Principal, id: u64, body: Request) -> Control {
    let engine = &ctx.engine;
    let reply = |r: Result<Reply, Refusal>| reply(id, r);
    match body {
        Request::History { conv, from, limit } => {
            let page = async {
                engine
                    .authorize(principal, Action::ReadHistory, conv)
                    .await?;
                let limit = limit.min(ctx.config.limits.history_page_len_max) as usize;
                engine.read(conv, from.max(1), None, limit).await
            };
            reply(page.await.map(|h| {
                // A page must fit one frame: stop before the encoded messages would
                // exceed half the frame maximum (rkyv's envelope is small; half leaves
                // ample room). The client asks again from the last seq it got.
                let messages = h.messages_within(ctx.config.limits.frame_bytes_max as usize / 2);
                Reply::History(HistoryPage {
                    messages,
                    first_seq: h.first_seq,
                    next_seq: h.next_seq,
                })
            }))
        }
        Request::Subscribe { conv, from } => {
            match engine.authorize(principal, Action::Subscribe, conv).await {
                Ok(()) => Control::Subscribe { id, conv, from },
                Err(r) => reply(Err(r)),
            }
        }
        Request::Unsubscribe { conv } => Control::Unsubscribe { id, conv },
        Request::ClusterMap => reply(Ok(Reply::ClusterMap(engine.cluster_view()))),
        Request::CreateConversation { .. }
        | Request::AddMembers { .. }
        | Request::RemoveMembers { .. }
        | Request::Publish { .. } => reply(Err(Refusal::new(
            RefusalCode::Internal,
            "a write reached the read path; this is a bug",
        ))),
    }
}

fn authenticate(ctx: &NodeContext, hello: &Hello) -> Result<Principal, Refusal> {
    if ctx.engine.groups().draining() {
        return Err(Refusal::new(
            RefusalCode::Unavailable,
            format!(
                "node {} is draining (shutting down); connect to another node",
                ctx.config.cluster.node_id
            ),
        ));
    }
    ctx.verifier.verify(&hello.token).map_err(|e| e.refusal())
}

/// The single writer of a session's stream.
struct SessionWriter {
    ctx: Arc<NodeContext>,
    conn: quinn::Connection,
    writer: FrameWriter,
    outbox: Arc<Outbox>,
    control: mpsc::Receiver<Control>,
    /// conversation → last seq sent on this stream. Bounded by `subscriptions_per_session_max`.
    cursors: HashMap<u64, u64, BuildConvHasher>,
    batch: Vec<Arc<Delivery>>,
    session_id: u64,
    principal: Principal,
}

/// Why the writer stopped.
enum Stop {
    /// The reader is done and everything is flushed.
    Done,
    /// Writing failed (connection gone) or the client was too slow.
    Failed,
}

impl SessionWriter {
    async fn run(mut self) {
        let stop = self.pump().await;
        for conv in self.cursors.keys() {
            self.ctx.engine.router().unsubscribe(*conv, self.session_id);
            self.ctx.engine.unwatch(*conv);
        }
        self.ctx
            .metrics
            .subscriptions
            .dec_by(self.cursors.len() as i64);
        self.outbox.close();
        match stop {
            Stop::Done => {
                let _ = self.writer.finish().await;
                close_after_flush(&self.conn, close_code::NORMAL, "bye").await;
            }
            // Close at once so the reader stops and the client reconnects and resyncs,
            // rather than keeping a connection whose subscriptions are gone.
            Stop::Failed => self.conn.close(
                quinn::VarInt::from_u32(close_code::PROTOCOL_ERROR),
                b"session writer stopped; reconnect and resubscribe",
            ),
        }
    }

    async fn pump(&mut self) -> Stop {
        loop {
            // 1. Everything the reader asked for, in order.
            loop {
                match self.control.try_recv() {
                    Ok(c) => {
                        if let Err(stop) = self.handle_control(c).await {
                            return stop;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return match self.flush().await {
                            Ok(()) => Stop::Done,
                            Err(stop) => stop,
                        };
                    }
                }
            }
            // 2. A lagged session re-sends from history at each cursor.
            let dropped = self.outbox.take_dropped();
            if dropped > 0 {
                if let Err(stop) = self.recover_from_lag(dropped).await {
                    return stop;
                }
            }
            // 3. Live deliveries, coalesced into one write.
            self.batch.clear();
            let queued = self.outbox.len();
            if queued > 0 {
                self.ctx.metrics.session_queue_len.observe(queued as f64);
            }
            self.outbox.drain_into(&mut self.batch, DRAIN_BATCH_LEN_MAX);
            let batch = std::mem::take(&mut self.batch);
            let mut sent = 0;
            for delivery in &batch {
                match self.deliver_live(delivery).await {
                    Ok(true) => sent += 1,
                    Ok(false) => {}
                    Err(stop) => return stop,
                }
                // Bound the writer's buffer, whatever the frame sizes.
                if self.writer.pending_len() >= REPLAY_FLUSH_BYTES {
                    if let Err(stop) = self.flush().await {
                        return stop;
                    }
                }
            }
            // One shared-counter update per batch, not per delivery; the fan-out
            // latency of the batch's oldest message stands for the batch.
            self.ctx.metrics.deliveries.inc_by(sent);
            if let Some(oldest) = batch.iter().find(|d| d.stored_ms > 0) {
                let now_ms = crate::engine::now_ms();
                let latency_ms = now_ms.saturating_sub(oldest.stored_ms);
                self.ctx
                    .metrics
                    .fanout_latency_seconds
                    .observe(latency_ms as f64 / 1e3);
            }
            self.batch = batch;
            if let Err(stop) = self.flush().await {
                return stop;
            }
            if !self.batch.is_empty() || !self.control.is_empty() {
                continue;
            }
            // 4. Nothing to do: wait for the reader or the router.
            tokio::select! {
                biased;
                c = self.control.recv() => match c {
                    Some(c) => if let Err(stop) = self.handle_control(c).await { return stop },
                    None => return match self.flush().await { Ok(()) => Stop::Done, Err(s) => s },
                },
                () = self.outbox.wait() => {}
            }
        }
    }

    async fn handle_control(&mut self, control: Control) -> Result<(), Stop> {
        match control {
            Control::Reply { id, body } => self.queue(&Frame::Reply { id, body }),
            Control::Subscribe { id, conv, from } => self.subscribe(id, conv, from).await,
            Control::Unsubscribe { id, conv } => {
                if self.cursors.remove(&conv).is_some() {
                    self.ctx.engine.router().unsubscribe(conv, self.session_id);
                    self.ctx.engine.unwatch(conv);
                    self.ctx.metrics.subscriptions.dec();
                }
                self.queue(&Frame::Reply {
                    id,
                    body: Reply::Done,
                })
            }
            Control::Revoke { conv, reason } => {
                // A channel follower needs no membership: only revoke where it matters.
                if self.cursors.contains_key(&conv)
                    && self
                        .ctx
                        .engine
                        .authorize(&self.principal, Action::Subscribe, conv)
                        .await
                        .is_err()
                {
                    self.cursors.remove(&conv);
                    self.ctx.engine.router().unsubscribe(conv, self.session_id);
                    self.ctx.engine.unwatch(conv);
                    self.ctx.metrics.subscriptions.dec();
                    self.queue(&Frame::Event(Event::Unsubscribed { conv, reason }))?;
                }
                Ok(())
            }
            Control::Move(notice) => {
                self.ctx.metrics.sessions_moved.inc();
                self.queue(&Frame::Move(notice))
            }
            Control::Goodbye(refusal) => {
                self.queue(&Frame::Goodbye(refusal.clone()))?;
                self.flush().await?;
                let _ = self.writer.finish().await;
                close_after_flush(&self.conn, close_code::PROTOCOL_ERROR, &refusal.detail).await;
                Err(Stop::Failed)
            }
        }
    }

    async fn subscribe(&mut self, id: u64, conv: u64, from: Option<u64>) -> Result<(), Stop> {
        let limit = self.ctx.config.limits.subscriptions_per_session_max as usize;
        if !self.cursors.contains_key(&conv) && self.cursors.len() >= limit {
            self.ctx.metrics.refused(RefusalCode::LimitReached);
            let refusal = Refusal::new(
                RefusalCode::LimitReached,
                format!("this session already has {limit} subscriptions (limits.subscriptions_per_session_max); unsubscribe first"),
            );
            return self.queue(&Frame::Reply {
                id,
                body: Reply::Refused(refusal),
            });
        }
        // Authorize again here: a member removal may have been handled (as a Revoke)
        // between the reader's check and this point, and must win.
        if let Err(refusal) = self
            .ctx
            .engine
            .authorize(&self.principal, Action::Subscribe, conv)
            .await
        {
            return self.queue(&Frame::Reply {
                id,
                body: Reply::Refused(refusal),
            });
        }
        // Into the router first, then the head: every message from the head on reaches
        // the outbox, everything before it is in history.
        let new = self.ctx.engine.router().subscribe(conv, &self.outbox);
        let next_seq = match self.ctx.engine.watch(conv).await {
            Ok(n) => n,
            Err(r) => {
                if new && !self.cursors.contains_key(&conv) {
                    self.ctx.engine.router().unsubscribe(conv, self.session_id);
                    self.ctx.engine.unwatch(conv);
                }
                return self.queue(&Frame::Reply {
                    id,
                    body: Reply::Refused(r),
                });
            }
        };
        let start = from.map(|f| f.max(1)).unwrap_or(next_seq);
        // The watch's head can come from a cache of what an earlier leader pushed
        // (this node may have been elected a moment ago), so the refusal compares with
        // the replica's own head, and only where that head is final.
        // Only a cursor beyond the head pays the quorum round of `true_head_of`.
        let true_head = if start > next_seq {
            self.ctx.engine.true_head_of(conv).await
        } else {
            None
        };
        if let Some(next_seq) = true_head.filter(|head| start > *head) {
            // The client claims messages the leader never had (e.g. state lost with a
            // restart): say so instead of silently skipping seqs below its cursor. On
            // another node the head may trail the node the client saw them on, and so
            // may it on a leader just elected, until it has applied an entry of its own
            // term (a subscriber reconnecting at a failover meets exactly that; t50
            // caught it): there the subscription waits at the cursor (live deliveries
            // up to it are skipped).
            if new && !self.cursors.contains_key(&conv) {
                self.ctx.engine.router().unsubscribe(conv, self.session_id);
                self.ctx.engine.unwatch(conv);
            }
            self.ctx.metrics.refused(RefusalCode::InvalidRequest);
            let refusal = Refusal::new(
                RefusalCode::InvalidRequest,
                format!(
                    "cannot subscribe to conversation {conv} from seq {start}: its next seq is {next_seq}"
                ),
            );
            return self.queue(&Frame::Reply {
                id,
                body: Reply::Refused(refusal),
            });
        }
        if new {
            self.ctx.metrics.subscriptions.inc();
        }
        self.cursors.insert(conv, start - 1);
        self.queue(&Frame::Reply {
            id,
            body: Reply::Subscribed { conv, next_seq },
        })?;
        // Catch up to the head now: messages below it never reach the outbox.
        self.catch_up(conv, Some(next_seq - 1)).await
    }

    /// Sends one live delivery if it is next for its conversation; true if sent.
    async fn deliver_live(&mut self, delivery: &Arc<Delivery>) -> Result<bool, Stop> {
        let Some(cursor) = self.cursors.get_mut(&delivery.conv) else {
            return Ok(false); // unsubscribed since it was queued
        };
        if delivery.is_marker() {
            // Everything up to `seq` exists (a leader change, a reopened watch): catch
            // up from history if this session is behind it.
            if delivery.seq > *cursor {
                self.catch_up(delivery.conv, Some(delivery.seq)).await?;
            }
            return Ok(false);
        }
        if delivery.seq == *cursor + 1 {
            // The common case: one map lookup, no history read.
            *cursor = delivery.seq;
            self.writer.queue_encoded(&delivery.frame);
            return Ok(true);
        }
        if delivery.seq <= *cursor {
            return Ok(false); // already sent (replay overlap)
        }
        self.catch_up(delivery.conv, Some(delivery.seq - 1)).await?;
        match self.cursors.get_mut(&delivery.conv) {
            Some(cursor) if *cursor + 1 == delivery.seq => {
                *cursor = delivery.seq;
                self.writer.queue_encoded(&delivery.frame);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sends history from `cursor + 1` up to `until` (inclusive) or to the present.
    async fn catch_up(&mut self, conv: u64, until: Option<u64>) -> Result<(), Stop> {
        let page_len = self.ctx.config.limits.history_page_len_max as usize;
        loop {
            let Some(&cursor) = self.cursors.get(&conv) else {
                return Ok(());
            };
            if until.is_some_and(|u| cursor >= u) {
                return Ok(());
            }
            let want = until.map_or(page_len, |u| ((u - cursor) as usize).min(page_len));
            let history = match self.ctx.engine.read(conv, cursor + 1, until, want).await {
                Ok(h) => h,
                Err(_) => return Ok(()), // conversation gone: nothing to replay
            };
            let mut cursor = cursor;
            if history.first_seq > cursor + 1 {
                self.queue(&Frame::Event(Event::Truncated {
                    conv,
                    requested_from: cursor + 1,
                    first_available_seq: history.first_seq,
                }))?;
                cursor = history.first_seq - 1;
            }
            let mut sent = 0;
            for stored in &history.messages {
                if stored.message.seq == cursor + 1 && until.is_none_or(|u| stored.message.seq <= u)
                {
                    self.writer.queue_encoded(&stored.delivery.frame);
                    cursor = stored.message.seq;
                    sent += 1;
                    if self.writer.pending_len() >= REPLAY_FLUSH_BYTES {
                        self.cursors.insert(conv, cursor);
                        self.flush().await?;
                    }
                }
            }
            self.cursors.insert(conv, cursor);
            self.ctx.metrics.deliveries.inc_by(sent);
            self.ctx.metrics.replayed.inc_by(sent);
            if sent == 0 || history.messages.len() < want {
                return Ok(());
            }
        }
    }

    async fn recover_from_lag(&mut self, dropped: u64) -> Result<(), Stop> {
        tracing::info!(
            session_id = self.session_id,
            connection_id = self.conn.stable_id(),
            dropped,
            "session lagged: outbound queue full; re-sending from history"
        );
        self.queue(&Frame::Event(Event::Lagged { dropped }))?;
        let convs: Vec<u64> = self.cursors.keys().copied().collect();
        for conv in convs {
            self.catch_up(conv, None).await?;
        }
        Ok(())
    }

    fn queue(&mut self, frame: &Frame) -> Result<(), Stop> {
        self.writer.queue(frame).map_err(|e| {
            tracing::error!(session_id = self.session_id, "cannot encode frame: {e}");
            Stop::Failed
        })
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.writer.pending_len() == 0 {
            return Ok(());
        }
        let timeout = self.ctx.config.limits.slow_consumer_timeout;
        match tokio::time::timeout(timeout, self.writer.flush()).await {
            Ok(Ok(n)) => {
                self.ctx.metrics.sent_bytes.inc_by(n as u64);
                self.ctx.metrics.session_writes.inc();
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Failed),
            Err(_) => {
                tracing::warn!(
                    session_id = self.session_id,
                    connection_id = self.conn.stable_id(),
                    "disconnecting slow consumer: no progress writing for {timeout:?}"
                );
                self.ctx.metrics.disconnected("SlowConsumer");
                self.conn.close(
                    quinn::VarInt::from_u32(close_code::SLOW_CONSUMER),
                    b"slow consumer: resubscribe from your cursor",
                );
                Err(Stop::Failed)
            }
        }
    }
}

async fn refuse(
    conn: &quinn::Connection,
    writer: &mut FrameWriter,
    code: RefusalCode,
    detail: String,
) {
    let _ = writer.write_preamble().await;
    let _ = writer
        .send(&Frame::Goodbye(Refusal::new(code, detail.clone())))
        .await;
    let _ = writer.finish().await;
    close_after_flush(conn, close_code::PROTOCOL_ERROR, &detail).await;
}

/// Gives the peer a moment to read what was sent, then closes.
async fn close_after_flush(conn: &quinn::Connection, code: u32, reason: &str) {
    // The peer closes first once it has read our finished stream; otherwise close
    // after a short grace period so a misbehaving peer cannot hold the connection.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    let reason = &reason.as_bytes()[..reason.len().min(200)];
    conn.close(quinn::VarInt::from_u32(code), reason);
}

/// Conversation ids are chosen by backends, not by attackers of this map's memory (it is
/// per session and bounded by `subscriptions_per_session_max`), so a multiplicative hash
/// replaces SipHash on the per-delivery path.
#[derive(Default, Clone, Copy)]
struct BuildConvHasher;

impl std::hash::BuildHasher for BuildConvHasher {
    type Hasher = ConvHasher;
    fn build_hasher(&self) -> ConvHasher {
        ConvHasher(0)
    }
}

/// See [`BuildConvHasher`].
struct ConvHasher(u64);

impl std::hash::Hasher for ConvHasher {
    fn finish(&self) -> u64 {
        // The multiply mixes upwards; fold the high half down for bucket indexes.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Runs `f` when dropped.
fn scopeguard<'a, T, F>(value: &'a T, f: F) -> impl Drop + 'a
where
    F: FnOnce(&'a T) + 'a,
{
    struct Guard<'a, T, F: FnOnce(&'a T)>(&'a T, Option<F>);
    impl<'a, T, F: FnOnce(&'a T)> Drop for Guard<'a, T, F> {
        fn drop(&mut self) {
            if let Some(f) = self.1.take() {
                f(self.0);
            }
        }
    }
    Guard(value, Some(f))
}
