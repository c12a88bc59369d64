//! The service API: create conversations, manage members, publish, read history.
//!
//! Owns: [`Publisher`] (a cheap, cloneable handle on one connection) and
//! [`PublishAck`]. Must not: report a publish as `Ok` unless the broker
//! acknowledged it (the ack means durable on a quorum), or invent an idempotency
//! key per retry — a retry always reuses the key of the first attempt.

use std::sync::Arc;

use crate::config::ClientConfig;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::connection::{unexpected_reply, Core, CursorOp, Sent};
use crate::error::Error;
use crate::routing::Routes;
use crate::wire::{
    ConvKind, HistoryPage, IdempotencyKey, Principal, Reply, Request, SessionLimits,
};

/// The broker's acknowledgement of a publish: the message is durable on a quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishAck {
    /// The message's seq in its conversation.
    pub seq: u64,
    /// True when the key was seen before: nothing was appended and `seq` is the
    /// original message's.
    pub duplicate: bool,
}

/// A backend service's connection to Herald.
///
/// Cloning is cheap and every clone shares the connection (and the automatic
/// idempotency key sequence); calls from many tasks at once are pipelined on it, up
/// to `requests_in_flight_max`. The connection reconnects by itself (see the crate
/// docs); dropping the last clone closes it in the background, [`Publisher::close`]
/// closes it and waits.
#[derive(Clone)]
pub struct Publisher {
    core: Arc<Core>,
    routes: Arc<Routes>,
    refreshing: Arc<AtomicBool>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.core.info();
        f.debug_struct("Publisher")
            .field("session_id", &info.session_id)
            .field("principal", &info.principal)
            .field("addr", &info.addr)
            .finish()
    }
}

impl Publisher {
    /// Connects: one pass over the seed list (starting at a random entry); the first
    /// broker that completes the handshake wins. Fails with the last address's error,
    /// or at once with [`Error::Refused`] if the broker refuses the token.
    pub async fn connect(config: ClientConfig) -> Result<Publisher, Error> {
        let core = Arc::new(Core::connect(config.clone(), None).await?);
        let publisher = Publisher {
            core,
            routes: Arc::new(Routes::new(config)),
            refreshing: Arc::new(AtomicBool::new(false)),
        };
        // Fetched in the background: until it arrives (or if the broker cannot answer)
        // writes go through this connection and the node forwards them.
        publisher.refresh_in_background();
        Ok(publisher)
    }

    /// The connection to send a write of `conv` on: its group leader's when the map
    /// names one and it can be reached, else the seed connection.
    /// Fetches the map again unless a fetch is already under way.
    fn refresh_in_background(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (core, routes, flag) = (
            self.core.clone(),
            self.routes.clone(),
            self.refreshing.clone(),
        );
        tokio::spawn(async move {
            refresh_map(&core, &routes).await;
            flag.store(false, Ordering::Release);
        });
    }

    async fn route(&self, conv: u64) -> Arc<Core> {
        if self.routes.stale() {
            self.refresh_in_background();
        }
        match self.routes.leader_of(conv) {
            Some((_, leader)) => self
                .routes
                .core_for(leader)
                .await
                .unwrap_or_else(|| self.core.clone()),
            None => self.core.clone(),
        }
    }

    async fn start_routed(
        &self,
        conv: u64,
        key: IdempotencyKey,
        payload: Vec<u8>,
    ) -> Result<PublishInFlight, Error> {
        let core = self.route(conv).await;
        start_publish(&core, conv, key, payload, Some(self.routes.clone())).await
    }

    /// Creates a conversation; `Ok(false)` when it already exists with the same kind
    /// and members (creation is idempotent), [`Error::Refused`] with
    /// `ConversationConflict` when it exists otherwise.
    pub async fn create_conversation(
        &self,
        conv: u64,
        kind: ConvKind,
        members: &[u64],
    ) -> Result<bool, Error> {
        let body = Request::CreateConversation {
            conv,
            kind,
            members: members.to_vec(),
        };
        match self
            .core
            .request(body, CursorOp::None, || {
                format!("creating conversation {conv}")
            })
            .await?
        {
            Reply::Created { created } => Ok(created),
            other => Err(unexpected_reply("CreateConversation", &other)),
        }
    }

    /// Adds members (owners, for a channel); present ones are ignored.
    pub async fn add_members(&self, conv: u64, members: &[u64]) -> Result<(), Error> {
        let body = Request::AddMembers {
            conv,
            members: members.to_vec(),
        };
        expect_done(
            "AddMembers",
            self.core
                .request(body, CursorOp::None, || {
                    format!("adding members to conversation {conv}")
                })
                .await?,
        )
    }

    /// Removes members; absent ones are ignored.
    pub async fn remove_members(&self, conv: u64, members: &[u64]) -> Result<(), Error> {
        let body = Request::RemoveMembers {
            conv,
            members: members.to_vec(),
        };
        expect_done(
            "RemoveMembers",
            self.core
                .request(body, CursorOp::None, || {
                    format!("removing members from conversation {conv}")
                })
                .await?,
        )
    }

    /// Publishes with an automatic key (this publisher's random producer id and the
    /// next producer seq). `Ok` only once the broker acknowledged it. Retried on
    /// reconnect with the same key within the request timeout, so it is appended at
    /// most once; on [`Error::Timeout`] it may or may not be stored — use
    /// [`Publisher::publish_with_key`] when the caller must be able to find out.
    pub async fn publish(
        &self,
        conv: u64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishAck, Error> {
        self.start_publish(conv, payload).await?.ack().await
    }

    /// Sends a publish (automatic key, as [`Publisher::publish`]) and returns without
    /// waiting for its acknowledgement: [`PublishInFlight::ack`] waits. Lets one task
    /// keep many publishes in flight without a future per publish: publishes started
    /// from one task go out in the order they were started, and those on one
    /// connection are acknowledged in that order. Waits only for one of the
    /// `requests_in_flight_max` slots (within the request timeout); a started publish
    /// holds its slot until its ack is taken or it times out, and dropping it unawaited
    /// does not call it off.
    pub async fn start_publish(
        &self,
        conv: u64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishInFlight, Error> {
        self.start_routed(conv, self.core.next_key(), payload.into())
            .await
    }

    /// Publishes with a caller-chosen key (e.g. a payment id): publishing the same
    /// key again inside the broker's dedup window returns the original seq with
    /// `duplicate: true` and appends nothing.
    pub async fn publish_with_key(
        &self,
        conv: u64,
        key: IdempotencyKey,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishAck, Error> {
        self.start_routed(conv, key, payload.into())
            .await?
            .ack()
            .await
    }

    /// Reads up to `limit` stored messages from seq `from` (1 = oldest retained).
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

    /// Closes the connection for every clone: finishes the stream, waits for
    /// replies to requests already sent and for the broker to close (at most the
    /// request timeout), then returns. Later calls on any clone get
    /// [`Error::Closed`].
    pub async fn close(self) {
        self.routes.close().await;
        self.core.close().await;
    }
}

pub(crate) fn expect_done(request: &str, reply: Reply) -> Result<(), Error> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(unexpected_reply(request, &other)),
    }
}

/// Fetches the cluster map on `core` into `routes` (failures leave the old one).
async fn refresh_map(core: &Core, routes: &Routes) {
    match core
        .request(Request::ClusterMap, CursorOp::None, || {
            "fetching the cluster map".to_owned()
        })
        .await
    {
        Ok(Reply::ClusterMap(view)) => routes.install(view),
        Ok(other) => tracing::debug!("the broker answered the map request with {other:?}"),
        Err(e) => tracing::debug!("cannot fetch the cluster map: {e}"),
    }
}

/// Sends a publish on `core`. The ack's leader hint goes to `routes` (a publisher's;
/// a session has none).
pub(crate) async fn start_publish(
    core: &Core,
    conv: u64,
    key: IdempotencyKey,
    payload: Vec<u8>,
    routes: Option<Arc<Routes>>,
) -> Result<PublishInFlight, Error> {
    core.check_payload(payload.len())?;
    let body = Request::Publish {
        conv,
        key: key.clone(),
        payload,
    };
    let sent = core
        .send(body, CursorOp::None, || publish_what(conv, &key))
        .await?;
    Ok(PublishInFlight {
        sent,
        conv,
        key,
        routes,
    })
}

/// A publish sent and not yet acknowledged (see [`Publisher::start_publish`]).
#[must_use = "a started publish is acknowledged through `ack`"]
pub struct PublishInFlight {
    sent: Sent,
    conv: u64,
    key: IdempotencyKey,
    routes: Option<Arc<Routes>>,
}

impl std::fmt::Debug for PublishInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishInFlight")
            .field("conv", &self.conv)
            .field("key", &self.key)
            .finish()
    }
}

impl PublishInFlight {
    /// Waits for the broker's acknowledgement, as [`Publisher::publish`] does after
    /// sending: across reconnects (the same key is resent), until the request timeout
    /// counted from the start.
    pub async fn ack(self) -> Result<PublishAck, Error> {
        let PublishInFlight {
            sent,
            conv,
            key,
            routes,
        } = self;
        match sent.reply(|| publish_what(conv, &key)).await? {
            Reply::Published {
                seq,
                duplicate,
                leader,
            } => {
                if let (Some(leader), Some(routes)) = (leader, routes) {
                    routes.note_leader(conv, leader);
                }
                Ok(PublishAck { seq, duplicate })
            }
            other => Err(unexpected_reply("Publish", &other)),
        }
    }
}

fn publish_what(conv: u64, key: &IdempotencyKey) -> String {
    format!("publish to conversation {conv} with key {key:?}")
}

pub(crate) async fn history(
    core: &Core,
    conv: u64,
    from: u64,
    limit: u32,
) -> Result<HistoryPage, Error> {
    let body = Request::History { conv, from, limit };
    match core
        .request(body, CursorOp::None, || {
            format!("reading history of conversation {conv}")
        })
        .await?
    {
        Reply::History(page) => Ok(page),
        other => Err(unexpected_reply("History", &other)),
    }
}
