//! The node's conversation engine: the one place where requests change state.
//!
//! Owns: the [`ConversationStore`] behind a mutex (the stand-in for the Raft group's
//! apply loop: commands apply one at a time, in order), fan-out of every newly stored
//! message to the [`Router`] *inside* that order, the wall clock for timestamps, and the
//! mapping of store errors to wire refusals.
//! Must not: touch sockets or sessions; it hands [`Delivery`](crate::routing::Delivery)s
//! to the router and nothing more. Fan-out happens under the store lock so that deliveries
//! enter every outbox in seq order; the router never blocks, so the lock is held for
//! microseconds per message even with thousands of local subscribers.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use herald_client::wire::{ConvKind, IdempotencyKey, Principal, Refusal, RefusalCode};

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::store::{Action, Applied, Command, ConversationStore, History, StoreLimits};

/// Conversation state, local fan-out and metrics of one node.
pub struct Engine {
    store: Mutex<ConversationStore>,
    router: Router,
    metrics: Arc<Metrics>,
    payload_bytes_max: u32,
}

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The message's seq (the original one for a duplicate).
    pub seq: u64,
    /// True when the idempotency key was seen before and nothing was appended.
    pub duplicate: bool,
}

impl Engine {
    /// An empty engine with the node's limits.
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        let store_limits = StoreLimits {
            group_members_max: limits.group_members_max as usize,
            history_messages_max: limits.history_messages_max as usize,
            history_retention_ms: duration_ms(limits.history_retention),
            dedup_window_ms: duration_ms(limits.dedup_window),
            dedup_keys_max: limits.dedup_keys_max as usize,
            conversations_max: limits.conversations_max as usize,
            frame_bytes_max: limits.frame_bytes_max,
        };
        Engine {
            store: Mutex::new(ConversationStore::new(store_limits)),
            router: Router::new(),
            metrics,
            payload_bytes_max: limits.payload_bytes_max,
        }
    }

    /// The local routing table.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Creates a conversation (idempotent). Returns whether this call created it.
    pub fn create(
        &self,
        principal: &Principal,
        conv: u64,
        kind: ConvKind,
        members: Vec<u64>,
    ) -> Result<bool, Refusal> {
        self.manage(
            principal,
            conv,
            Command::CreateConversation {
                conv,
                kind,
                members,
            },
        )
        .map(|applied| matches!(applied, Applied::Created { created: true }))
    }

    /// Adds members.
    pub fn add_members(
        &self,
        principal: &Principal,
        conv: u64,
        members: Vec<u64>,
    ) -> Result<(), Refusal> {
        self.manage(principal, conv, Command::AddMembers { conv, members })
            .map(|_| ())
    }

    /// Removes members.
    pub fn remove_members(
        &self,
        principal: &Principal,
        conv: u64,
        members: Vec<u64>,
    ) -> Result<(), Refusal> {
        self.manage(principal, conv, Command::RemoveMembers { conv, members })
            .map(|_| ())
    }

    fn manage(
        &self,
        principal: &Principal,
        conv: u64,
        command: Command,
    ) -> Result<Applied, Refusal> {
        let mut store = self.lock()?;
        if matches!(command, Command::CreateConversation { .. }) {
            // Creating needs only the role check; everything else needs the conversation.
            if !matches!(principal, Principal::Service(_)) {
                return Err(self.refuse(Refusal::new(
                    RefusalCode::RoleNotAllowed,
                    "only services may create conversations; use a service token",
                )));
            }
        } else {
            store
                .authorize(principal, Action::Manage, conv)
                .map_err(|e| self.refuse(e.refusal()))?;
        }
        let applied = store.apply(command).map_err(|e| self.refuse(e.refusal()))?;
        self.metrics
            .conversations
            .set(store.conversation_count() as i64);
        Ok(applied)
    }

    /// Appends a message (or finds its duplicate) and fans it out to local sessions.
    pub fn publish(
        &self,
        principal: &Principal,
        conv: u64,
        key: IdempotencyKey,
        payload: Vec<u8>,
    ) -> Result<PublishOutcome, Refusal> {
        if payload.len() > self.payload_bytes_max as usize {
            return Err(self.refuse(Refusal::new(
                RefusalCode::PayloadTooLarge,
                format!(
                    "payload of {} bytes is above the limit of {} bytes (limits.payload_bytes_max)",
                    payload.len(),
                    self.payload_bytes_max
                ),
            )));
        }
        let mut store = self.lock()?;
        store
            .authorize(principal, Action::Publish, conv)
            .map_err(|e| self.refuse(e.refusal()))?;
        let applied = store
            .apply(Command::Publish {
                conv,
                sender: principal.clone(),
                key,
                payload,
                timestamp_ms: now_ms(),
            })
            .map_err(|e| self.refuse(e.refusal()))?;
        match applied {
            Applied::Published {
                seq,
                duplicate,
                stored,
            } => {
                if let Some(stored) = stored {
                    // Under the store lock: outboxes receive each conversation's
                    // messages in seq order. The router never blocks.
                    // A session's lag is counted here, when its outbox first overflows
                    // (a stalled writer may never get to recover and count it).
                    let stats = self.router.fan_out(&stored.delivery);
                    self.metrics.sessions_lagged.inc_by(stats.overflowed);
                    self.metrics.publishes.inc();
                    self.metrics
                        .history_messages
                        .set(store.message_count() as i64);
                }
                if duplicate {
                    self.metrics.publish_duplicates.inc();
                }
                Ok(PublishOutcome { seq, duplicate })
            }
            other => Err(Refusal::new(
                RefusalCode::Internal,
                format!("publish applied as {other:?}; this is a bug"),
            )),
        }
    }

    /// Checks that `principal` may do `action` in `conv`.
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        conv: u64,
    ) -> Result<(), Refusal> {
        self.lock()?
            .authorize(principal, action, conv)
            .map_err(|e| self.refuse(e.refusal()))
    }

    /// Reads history (the caller has authorized the read).
    pub fn read(&self, conv: u64, from: u64, limit: usize) -> Result<History, Refusal> {
        self.lock()?
            .read(conv, from, limit)
            .map_err(|e| e.refusal())
    }

    /// The seq the next message of `conv` will get.
    pub fn next_seq(&self, conv: u64) -> Result<u64, Refusal> {
        self.lock()?.next_seq(conv).map_err(|e| e.refusal())
    }

    /// Evicts expired history and dedup keys; updates gauges.
    pub fn trim_expired(&self) {
        if let Ok(mut store) = self.lock() {
            store.trim_expired(now_ms());
            self.metrics
                .history_messages
                .set(store.message_count() as i64);
            self.metrics
                .conversations
                .set(store.conversation_count() as i64);
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, ConversationStore>, Refusal> {
        // A poisoned lock means a panic while applying a command: the state may be
        // half-changed, so refuse rather than serve it.
        self.store.lock().map_err(|_| {
            Refusal::new(
                RefusalCode::Internal,
                "conversation state is unavailable after an internal panic; restart the node",
            )
        })
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.metrics.refused(refusal.code);
        refusal
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
