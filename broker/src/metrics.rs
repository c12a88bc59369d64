//! The node's Prometheus metrics.
//!
//! Owns: every metric the node exports and its rendering as OpenMetrics text.
//! Must not: use per-user, per-session or per-conversation labels (unbounded series);
//! labels are limited to small fixed sets (refusal codes, disconnect reasons).
//! Names follow BRIEF §5: `herald_` prefix, base units, `_total` on counters
//! (prometheus-client appends `_total` to counters itself).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label with one fixed, small set of values.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// e.g. a refusal code or disconnect reason.
    pub reason: String,
}

/// All metrics of a node. Cheap to clone handles out of; updated lock-free.
pub struct Metrics {
    registry: Registry,
    /// Open client connections.
    pub connections: Gauge,
    /// Client connections accepted (handshake completed).
    pub connections_accepted: Counter,
    /// Connection attempts refused at the QUIC layer (limits, flood).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Sessions that completed Hello.
    pub sessions: Gauge,
    /// Active subscriptions over all sessions.
    pub subscriptions: Gauge,
    /// Messages appended (not counting duplicates).
    pub publishes: Counter,
    /// Publishes answered from the dedup table.
    pub publish_duplicates: Counter,
    /// Requests refused, by refusal code.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Messages written to sessions (live and replayed).
    pub deliveries: Counter,
    /// Messages re-sent from history (replay after subscribe or lag).
    pub replayed: Counter,
    /// Times a session's outbound queue overflowed.
    pub sessions_lagged: Counter,
    /// Sessions disconnected by the broker, by reason.
    pub sessions_disconnected: Family<ReasonLabel, Counter>,
    /// Bytes received from clients on session streams.
    pub received_bytes: Counter,
    /// Bytes sent to clients on session streams.
    pub sent_bytes: Counter,
    /// Publish received → ack sent, seconds.
    pub publish_ack_latency_seconds: Histogram,
    /// Stream writes to sessions (each carries many frames when coalescing works).
    pub session_writes: Counter,
    /// Conversations stored.
    pub conversations: Gauge,
    /// Messages held in history.
    pub history_messages: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            sessions: Gauge::default(),
            subscriptions: Gauge::default(),
            publishes: Counter::default(),
            publish_duplicates: Counter::default(),
            refusals: Family::default(),
            deliveries: Counter::default(),
            replayed: Counter::default(),
            sessions_lagged: Counter::default(),
            sessions_disconnected: Family::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            // 10 µs .. ~10 s in 21 doubling buckets.
            publish_ack_latency_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 21)),
            session_writes: Counter::default(),
            conversations: Gauge::default(),
            history_messages: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "herald_connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "herald_connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "herald_connections_refused",
            "Connection attempts refused, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "herald_sessions",
            "Authenticated sessions",
            m.sessions.clone(),
        );
        r.register(
            "herald_subscriptions",
            "Active subscriptions",
            m.subscriptions.clone(),
        );
        r.register("herald_publishes", "Messages appended", m.publishes.clone());
        r.register(
            "herald_publish_duplicates",
            "Publishes answered from the dedup table",
            m.publish_duplicates.clone(),
        );
        r.register(
            "herald_refusals",
            "Requests refused, by refusal code",
            m.refusals.clone(),
        );
        r.register(
            "herald_deliveries",
            "Messages written to sessions",
            m.deliveries.clone(),
        );
        r.register(
            "herald_replayed",
            "Messages re-sent from history",
            m.replayed.clone(),
        );
        r.register(
            "herald_sessions_lagged",
            "Session outbound queue overflows",
            m.sessions_lagged.clone(),
        );
        r.register(
            "herald_sessions_disconnected",
            "Sessions disconnected by the broker, by reason",
            m.sessions_disconnected.clone(),
        );
        r.register(
            "herald_received_bytes",
            "Bytes received on session streams",
            m.received_bytes.clone(),
        );
        r.register(
            "herald_sent_bytes",
            "Bytes sent on session streams",
            m.sent_bytes.clone(),
        );
        r.register(
            "herald_publish_ack_latency_seconds",
            "Publish received to ack sent",
            m.publish_ack_latency_seconds.clone(),
        );
        r.register(
            "herald_session_writes",
            "Stream writes to sessions",
            m.session_writes.clone(),
        );
        r.register(
            "herald_conversations",
            "Conversations stored",
            m.conversations.clone(),
        );
        r.register(
            "herald_history_messages",
            "Messages held in history",
            m.history_messages.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a refusal under its code.
    pub fn refused(&self, code: herald_client::wire::RefusalCode) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: format!("{code:?}"),
            })
            .inc();
    }

    /// Counts a broker-initiated disconnect; `reason` is a refusal code name.
    pub fn disconnected(&self, reason: &str) {
        self.sessions_disconnected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// OpenMetrics text for `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# error rendering metrics: {e}\n");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new();
        m.publishes.inc();
        m.refused(herald_client::wire::RefusalCode::NotMember);
        let text = m.render();
        assert!(text.contains("herald_publishes_total 1"), "{text}");
        assert!(
            text.contains("herald_refusals_total{reason=\"NotMember\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("herald_publish_ack_latency_seconds_bucket"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("herald_"), "{line}");
        }
    }
}
