//! The node's Prometheus metrics.
//!
//! Owns: every metric the node exports and its rendering as OpenMetrics text.
//! Must not: use per-user, per-session or per-conversation labels (unbounded series);
//! labels are limited to small fixed sets (refusal codes, disconnect reasons, the Raft
//! groups this node hosts).
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

/// How a client handshake ended: `ok`, `refused`, `timeout` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// One of the four outcomes.
    pub result: &'static str,
}

/// The Raft group a series belongs to (a small set: the groups this node hosts).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    /// The group id.
    pub group: u32,
}

impl GroupLabel {
    /// The label of `group`.
    pub fn of(group: u32) -> Self {
        GroupLabel { group }
    }
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
    /// Client handshakes (QUIC + Hello) by outcome.
    pub handshakes: Family<ResultLabel, Counter>,
    /// Connection accepted → Welcome sent (or refused), seconds.
    pub handshake_latency_seconds: Histogram,
    /// Sessions that completed Hello.
    pub sessions: Gauge,
    /// Active subscriptions over all sessions.
    pub subscriptions: Gauge,
    /// Messages appended (not counting duplicates), in the groups this node leads.
    pub publishes: Counter,
    /// Copies of messages pushed to other nodes (one per watching node and message).
    pub fanout_node_copies: Counter,
    /// Client writes this node forwarded to another node (the group's leader).
    pub writes_forwarded: Counter,
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
    /// Sessions told to move to another node (drain).
    pub sessions_moved: Counter,
    /// 1 while the node drains (refuses sessions, hands leaderships away).
    pub draining: Gauge,
    /// A session's outbound queue length, observed at each delivery queued to it.
    pub session_queue_len: Histogram,
    /// Message stored by the group's leader (its timestamp) → written to a session on
    /// this node, seconds. Across nodes it includes their clock difference.
    pub fanout_latency_seconds: Histogram,
    /// Bytes received from clients on session streams.
    pub received_bytes: Counter,
    /// Bytes sent to clients on session streams.
    pub sent_bytes: Counter,
    /// Publish received → ack sent, seconds.
    pub publish_ack_latency_seconds: Histogram,
    /// Stream writes to sessions (each carries many frames when coalescing works).
    pub session_writes: Counter,
    /// Conversations stored, per group.
    pub conversations: Family<GroupLabel, Gauge>,
    /// Messages held in history, per group.
    pub history_messages: Family<GroupLabel, Gauge>,
    /// Raft: the current term, per group.
    pub raft_term: Family<GroupLabel, Gauge>,
    /// Raft: 1 while this node leads the group, else 0.
    pub raft_leader: Family<GroupLabel, Gauge>,
    /// Raft: times this node saw the leader change (including to "none").
    pub raft_leader_changes: Family<GroupLabel, Counter>,
    /// Raft: the last log index on this node.
    pub raft_last_log_index: Family<GroupLabel, Gauge>,
    /// Raft: the last index applied to the state machine.
    pub raft_applied_index: Family<GroupLabel, Gauge>,
    /// Raft: entries held in the group's log on this node (not yet purged).
    pub raft_log_entries: Family<GroupLabel, Gauge>,
    /// Raft: a batch of writes handed to Raft on the leader → committed and applied,
    /// seconds.
    pub raft_commit_latency_seconds: Histogram,
    /// Raft log store: each fsync, seconds.
    pub raft_fsync_latency_seconds: Histogram,
    /// Raft log store: bytes in segment files.
    pub raft_log_bytes: Gauge,
    /// Raft log store: segment files.
    pub raft_log_segments: Gauge,
    /// Raft log store: per group, the segments from the one holding its first live
    /// entry to the newest (a group spanning them all keeps the oldest from retiring).
    pub raft_log_segments_spanned: Family<GroupLabel, Gauge>,
    /// Raft log store: fsync/fdatasync calls.
    pub raft_fsyncs: Counter,
    /// Raft log store: seconds spent in them.
    pub raft_fsync_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Raft log store: the slowest of the last 256 fsyncs, seconds.
    pub raft_fsync_seconds_max_recent: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            handshakes: Family::default(),
            handshake_latency_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 18)),
            sessions: Gauge::default(),
            subscriptions: Gauge::default(),
            publishes: Counter::default(),
            fanout_node_copies: Counter::default(),
            writes_forwarded: Counter::default(),
            publish_duplicates: Counter::default(),
            refusals: Family::default(),
            deliveries: Counter::default(),
            replayed: Counter::default(),
            sessions_lagged: Counter::default(),
            sessions_disconnected: Family::default(),
            sessions_moved: Counter::default(),
            draining: Gauge::default(),
            // 1 .. 65536 in 17 doubling buckets (the queue bound defaults to 1024).
            session_queue_len: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            // 100 µs .. ~26 s in 19 doubling buckets.
            fanout_latency_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 19)),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            // 10 µs .. ~10 s in 21 doubling buckets.
            publish_ack_latency_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 21)),
            session_writes: Counter::default(),
            conversations: Family::default(),
            history_messages: Family::default(),
            raft_term: Family::default(),
            raft_leader: Family::default(),
            raft_leader_changes: Family::default(),
            raft_last_log_index: Family::default(),
            raft_applied_index: Family::default(),
            raft_log_entries: Family::default(),
            raft_commit_latency_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 21)),
            raft_fsync_latency_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 18)),
            raft_log_bytes: Gauge::default(),
            raft_log_segments: Gauge::default(),
            raft_log_segments_spanned: Family::default(),
            raft_fsyncs: Counter::default(),
            raft_fsync_seconds: Counter::default(),
            raft_fsync_seconds_max_recent: Gauge::default(),
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
            "herald_handshakes",
            "Client handshakes by result (ok, refused, timeout, failed)",
            m.handshakes.clone(),
        );
        r.register(
            "herald_handshake_latency_seconds",
            "Client connection accepted to Welcome (or refusal) sent",
            m.handshake_latency_seconds.clone(),
        );
        r.register(
            "herald_sessions_moved",
            "Sessions told to move to another node (drain)",
            m.sessions_moved.clone(),
        );
        r.register(
            "herald_draining",
            "1 while the node drains",
            m.draining.clone(),
        );
        r.register(
            "herald_session_queue_len",
            "A session's outbound queue length at each delivery queued to it",
            m.session_queue_len.clone(),
        );
        r.register(
            "herald_fanout_latency_seconds",
            "Message stored by the group leader to written to a session here",
            m.fanout_latency_seconds.clone(),
        );
        r.register(
            "herald_raft_log_entries",
            "Entries held in the group's log here (not yet purged)",
            m.raft_log_entries.clone(),
        );
        r.register(
            "herald_raft_commit_latency_seconds",
            "Batch handed to Raft on the leader to committed and applied",
            m.raft_commit_latency_seconds.clone(),
        );
        r.register(
            "herald_raft_fsync_latency_seconds",
            "Each fsync of the log store",
            m.raft_fsync_latency_seconds.clone(),
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
            "herald_fanout_node_copies",
            "Copies of messages pushed to other nodes' watch streams (one per watching node and message)",
            m.fanout_node_copies.clone(),
        );
        r.register(
            "herald_writes_forwarded",
            "Client writes forwarded to the leader of their group on another node (counted per attempt)",
            m.writes_forwarded.clone(),
        );
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
        r.register(
            "herald_raft_term",
            "Raft: current term",
            m.raft_term.clone(),
        );
        r.register(
            "herald_raft_leader",
            "Raft: 1 while this node leads",
            m.raft_leader.clone(),
        );
        r.register(
            "herald_raft_leader_changes",
            "Raft: leader changes this node saw",
            m.raft_leader_changes.clone(),
        );
        r.register(
            "herald_raft_last_log_index",
            "Raft: last log index on this node",
            m.raft_last_log_index.clone(),
        );
        r.register(
            "herald_raft_applied_index",
            "Raft: last index applied to the state machine",
            m.raft_applied_index.clone(),
        );
        r.register(
            "herald_raft_log_bytes",
            "Raft log store: bytes in segment files",
            m.raft_log_bytes.clone(),
        );
        r.register(
            "herald_raft_log_segments",
            "Raft log store: segment files",
            m.raft_log_segments.clone(),
        );
        r.register(
            "herald_raft_log_segments_spanned",
            "Raft log store: segments from the one holding the group's first live entry to the newest (equal to herald_raft_log_segments: the group keeps the oldest from retiring)",
            m.raft_log_segments_spanned.clone(),
        );
        r.register(
            "herald_raft_fsyncs",
            "Raft log store: fsync calls",
            m.raft_fsyncs.clone(),
        );
        r.register(
            "herald_raft_fsync_seconds",
            "Raft log store: seconds spent in fsync",
            m.raft_fsync_seconds.clone(),
        );
        r.register(
            "herald_raft_fsync_seconds_max_recent",
            "Raft log store: slowest of the last 256 fsyncs",
            m.raft_fsync_seconds_max_recent.clone(),
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

    /// Takes in the log store's counters and spans (at scrape time: they live in the
    /// store).
    pub fn observe_log(
        &self,
        stats: &crate::raft::log_store::LogStats,
        spans: &crate::raft::log_store::LogSpans,
    ) {
        self.raft_log_bytes
            .set(i64::try_from(stats.bytes_on_disk).unwrap_or(i64::MAX));
        self.raft_log_segments
            .set(i64::try_from(stats.segments).unwrap_or(i64::MAX));
        // Groups that left this node or hold nothing live drop out.
        self.raft_log_segments_spanned.clear();
        for (group, spanned) in &spans.spanned_segments {
            self.raft_log_segments_spanned
                .get_or_create(&GroupLabel::of(*group))
                .set(i64::try_from(*spanned).unwrap_or(i64::MAX));
        }
        // Counters only move forward: add what the store counted since the last scrape.
        self.raft_fsyncs
            .inc_by(stats.fsyncs_total.saturating_sub(self.raft_fsyncs.get()));
        let seconds = stats.fsync_seconds_total - self.raft_fsync_seconds.get();
        if seconds > 0.0 {
            self.raft_fsync_seconds.inc_by(seconds);
        }
        self.raft_fsync_seconds_max_recent
            .set(stats.fsync_us_max_recent as f64 / 1e6);
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
        let stats = crate::raft::log_store::LogStats {
            bytes_on_disk: 4096,
            segments: 1,
            groups: 1,
            fsyncs_total: 7,
            fsync_seconds_total: 0.5,
            fsync_us_max_recent: 2500,
            appended_entries_total: 9,
        };
        let spans = crate::raft::log_store::LogSpans {
            numbers: vec![4],
            lengths_bytes: vec![4096],
            spanned_segments: [(0, 1)].into(),
        };
        // Twice: a scrape adds only what the store counted since the last one.
        m.observe_log(&stats, &spans);
        let text = m.render();
        m.observe_log(&stats, &spans);
        assert_eq!(text, m.render());
        assert!(text.contains("herald_raft_fsyncs_total 7"), "{text}");
        assert!(
            text.contains("herald_raft_fsync_seconds_total 0.5"),
            "{text}"
        );
        assert!(
            text.contains("herald_raft_fsync_seconds_max_recent 0.0025"),
            "{text}"
        );
        assert!(text.contains("herald_raft_log_bytes 4096"), "{text}");
        assert!(text.contains("herald_raft_log_segments 1"), "{text}");
        assert!(
            text.contains("herald_raft_log_segments_spanned{group=\"0\"} 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("herald_"), "{line}");
        }
    }
}
