//! The device API: subscribe with cursors, receive pushes, send messages.
//!
//! Owns: [`Session`] (the connection plus the application's bounded event queue),
//! [`SessionHandle`] (the request side, cloneable, for use while another task
//! reads events) and [`SessionEvent`]. Must not: hand the application a message
//! twice or out of order, or skip one silently — per conversation the stream is
//! gapless and duplicate-free across reconnects, and retention losses arrive as
//! [`SessionEvent::Truncated`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::config::ClientConfig;
use crate::connection::{unexpected_reply, Core, CursorOp, EventItem};
use crate::error::Error;
use crate::publisher::{expect_done, history, start_publish, PublishAck};
use crate::wire::{
    HistoryPage, IdempotencyKey, Message, Principal, Refusal, Reply, Request, SessionLimits,
};

/// Something a session receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A message of a subscribed conversation. Per conversation, in seq order with
    /// no gap and no duplicate, across reconnects.
    Message(Message),
    /// The cursor was older than retention: seqs `requested_from ..
    /// first_available_seq` are gone for good; delivery goes on from
    /// `first_available_seq`.
    Truncated {
        /// The conversation.
        conv: u64,
        /// The seq asked for.
        requested_from: u64,
        /// The oldest seq still retained; delivery resumes there.
        first_available_seq: u64,
    },
    /// The broker's queue for this session overflowed and it re-sends the dropped
    /// messages from history: informational, nothing is lost.
    Lagged {
        /// Deliveries the broker dropped from its queue (and re-sends).
        dropped: u64,
    },
    /// A subscription ended without the application asking (e.g. removed from the
    /// group, or a resubscription after a reconnect was refused); `reason` says why.
    Unsubscribed {
        /// The conversation.
        conv: u64,
        /// Why.
        reason: Refusal,
    },
    /// The connection dropped and the client reconnected to `addr` and resubscribed
    /// every conversation from its cursor; messages continue where they stopped.
    Reconnected {
        /// The seed address now connected.
        addr: String,
    },
}

/// A device's (or service's) subscribing connection.
///
/// Read it with [`Session::next`] or as a [`futures_core::Stream`]; it must be read:
/// at most `outbound_queue_len_max` events wait in the client, after which the
/// client stops reading from the broker (and replies to requests wait behind the
/// unread events). The broker then handles the session as a slow consumer; the
/// client resyncs when it is read again, and nothing is lost.
///
/// The stream ends (`None`) after [`Session::close`]; when the connection ends for
/// good (a refusal, or reconnect attempts exhausted) it yields that `Err` last.
pub struct Session {
    handle: SessionHandle,
    events: mpsc::Receiver<EventItem>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("handle", &self.handle)
            .field("events_queued", &self.events.len())
            .finish()
    }
}

/// The request side of a [`Session`]: subscribe, send, history. Cheap to clone;
/// keeps the connection open while it lives.
#[derive(Clone)]
pub struct SessionHandle {
    core: Arc<Core>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.core.info();
        f.debug_struct("SessionHandle")
            .field("session_id", &info.session_id)
            .field("principal", &info.principal)
            .field("addr", &info.addr)
            .finish()
    }
}

impl Session {
    /// Connects: one pass over the seed list (starting at a random entry). Fails
    /// with the last address's error, or at once with [`Error::Refused`] if the
    /// broker refuses the token.
    pub async fn connect(config: ClientConfig) -> Result<Session, Error> {
        let (tx, events) = mpsc::channel(config.outbound_queue_len_max);
        let core = Core::connect(config, Some(tx)).await?;
        Ok(Session {
            handle: SessionHandle {
                core: Arc::new(core),
            },
            events,
        })
    }

    /// A cloneable handle for requests, e.g. to send from one task while another
    /// reads events.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    /// See [`SessionHandle::subscribe`].
    pub async fn subscribe(&self, conv: u64, from: Option<u64>) -> Result<u64, Error> {
        self.handle.subscribe(conv, from).await
    }

    /// See [`SessionHandle::unsubscribe`].
    pub async fn unsubscribe(&self, conv: u64) -> Result<(), Error> {
        self.handle.unsubscribe(conv).await
    }

    /// See [`SessionHandle::send`].
    pub async fn send(&self, conv: u64, payload: impl Into<Vec<u8>>) -> Result<PublishAck, Error> {
        self.handle.send(conv, payload).await
    }

    /// See [`SessionHandle::send_with_key`].
    pub async fn send_with_key(
        &self,
        conv: u64,
        key: IdempotencyKey,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishAck, Error> {
        self.handle.send_with_key(conv, key, payload).await
    }

    /// See [`SessionHandle::history`].
    pub async fn history(&self, conv: u64, from: u64, limit: u32) -> Result<HistoryPage, Error> {
        self.handle.history(conv, from, limit).await
    }

    /// The next event; `None` once the session is closed or ended (after its
    /// final `Err`).
    pub async fn next(&mut self) -> Option<Result<SessionEvent, Error>> {
        self.events.recv().await
    }

    /// The broker's id for the current connection (changes on reconnect).
    pub fn session_id(&self) -> u64 {
        self.handle.session_id()
    }

    /// Who the broker says we are.
    pub fn principal(&self) -> Principal {
        self.handle.principal()
    }

    /// The limits the broker announced for this session.
    pub fn limits(&self) -> SessionLimits {
        self.handle.limits()
    }

    /// Closes cleanly: stops taking events (unread ones are discarded), finishes
    /// the stream, waits for replies to requests already sent and for the broker
    /// to close (at most the request timeout), then returns. Handles get
    /// [`Error::Closed`] afterwards.
    pub async fn close(mut self) {
        self.events.close();
        self.handle.core.close().await;
    }
}

impl futures_core::Stream for Session {
    type Item = Result<SessionEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl SessionHandle {
    /// Subscribes to `conv`: from seq `from` (1 = all retained history) then live,
    /// or with `None` only messages published from now on. Returns the seq the next
    /// new message will get. The client keeps a cursor per conversation and, after
    /// a reconnect, resubscribes from the seq after the last one it handed over.
    /// Subscribing again to the same conversation restarts it from `from`.
    pub async fn subscribe(&self, conv: u64, from: Option<u64>) -> Result<u64, Error> {
        let was_subscribed = crate::connection::lock(&self.core.state.cursors)
            .resume_from(conv)
            .is_some();
        let body = Request::Subscribe { conv, from };
        let result = self
            .core
            .request(body, CursorOp::Subscribe { conv, from }, || {
                format!("subscribing to conversation {conv}")
            })
            .await;
        match result {
            Ok(Reply::Subscribed { next_seq, .. }) => Ok(next_seq),
            Ok(other) => {
                self.forget_unless(conv, was_subscribed);
                Err(unexpected_reply("Subscribe", &other))
            }
            Err(e) => {
                self.forget_unless(conv, was_subscribed);
                Err(e)
            }
        }
    }

    /// After a failed subscribe: a conversation that was not subscribed before is
    /// forgotten (not resubscribed on reconnect); one that was stays subscribed, because
    /// its earlier subscription is still live at the broker.
    fn forget_unless(&self, conv: u64, was_subscribed: bool) {
        if !was_subscribed {
            crate::connection::lock(&self.core.state.cursors).remove(conv);
        }
    }

    /// Stops receiving `conv`. Deliveries of it still in flight are dropped.
    pub async fn unsubscribe(&self, conv: u64) -> Result<(), Error> {
        let body = Request::Unsubscribe { conv };
        expect_done(
            "Unsubscribe",
            self.core
                .request(body, CursorOp::Unsubscribe { conv }, || {
                    format!("unsubscribing from conversation {conv}")
                })
                .await?,
        )
    }

    /// Publishes `payload` with an automatic idempotency key; `Ok` only once the
    /// broker acknowledged it. See [`Publisher::publish`](crate::Publisher::publish).
    pub async fn send(&self, conv: u64, payload: impl Into<Vec<u8>>) -> Result<PublishAck, Error> {
        start_publish(&self.core, conv, self.core.next_key(), payload.into(), None)
            .await?
            .ack()
            .await
    }

    /// Publishes with a caller-chosen idempotency key.
    pub async fn send_with_key(
        &self,
        conv: u64,
        key: IdempotencyKey,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishAck, Error> {
        start_publish(&self.core, conv, key, payload.into(), None)
            .await?
            .ack()
            .await
    }

    /// Reads up to `limit` stored messages from seq `from`.
    pub async fn history(&self, conv: u64, from: u64, limit: u32) -> Result<HistoryPage, Error> {
        history(&self.core, conv, from, limit).await
    }

    /// The broker's id for the current connection (changes on reconnect).
    pub fn session_id(&self) -> u64 {
        self.core.info().session_id
    }

    /// Who the broker says we are.
    pub fn principal(&self) -> Principal {
        self.core.info().principal
    }

    /// The limits the broker announced for this session.
    pub fn limits(&self) -> SessionLimits {
        self.core.info().limits
    }
}
