//! Admin HTTP: `/healthz`, `/readyz`, `/metrics`, `/cluster`.
//!
//! Owns: the node's TCP admin port. Must not: change state. `/healthz` never depends on
//! other nodes (liveness); `/readyz` means this node accepts sessions.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::NodeContext;

/// Serves admin HTTP on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<NodeContext>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cluster", get(cluster))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("admin HTTP stopped: {e}");
    }
}

async fn readyz(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    if ctx.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    ctx.metrics.observe_log(&ctx.wal.stats());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}

/// The cluster as this node sees it (BRIEF §5). Per-follower `lag` (entries behind the
/// leader's last log entry) is known only on the leader; other nodes report `{}`.
/// `commit_index` is the index this node has applied (openraft applies right after
/// commit); `applied_index` says the same explicitly.
async fn cluster(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    Json(cluster_status(&ctx))
}

/// `/cluster`'s JSON: every node and every group of the cluster map; the groups this
/// node hosts carry their live Raft state as this replica sees it.
pub fn cluster_status(ctx: &NodeContext) -> serde_json::Value {
    let ready = ctx.ready.load(Ordering::Acquire);
    let me = ctx.config.cluster.node_id;
    let map = ctx.engine.map();
    let hosted = ctx.engine.groups().all();
    let nodes: Vec<serde_json::Value> = map
        .nodes()
        .iter()
        .map(|(id, node)| {
            let mut entry = serde_json::json!({
                "id": id,
                "addr": node.addr,
                "groups": map.hosted_by(*id).len(),
            });
            if *id == me {
                entry["ready"] = serde_json::Value::Bool(ready);
            }
            entry
        })
        .collect();
    let groups: Vec<serde_json::Value> = map
        .groups()
        .iter()
        .map(|(id, entry)| {
            let mut status = serde_json::json!({
                "id": id,
                "replicas": entry.replicas,
                "slots": [entry.slots.start, entry.slots.end],
            });
            if let Some(group) = hosted.get(id) {
                group_status(group, me, &mut status);
            }
            status
        })
        .collect();
    let wal = ctx.wal.stats();
    serde_json::json!({
        "node_id": me,
        "ready": ready,
        "nodes": nodes,
        "log": {
            "bytes": wal.bytes_on_disk,
            "segments": wal.segments,
            "groups": wal.groups,
            "appended_entries_total": wal.appended_entries_total,
            "fsyncs_total": wal.fsyncs_total,
            "fsync_seconds_total": wal.fsync_seconds_total,
            "fsync_us_max_recent": wal.fsync_us_max_recent,
        },
        "groups": groups,
    })
}

/// Adds a hosted group's Raft state (as this replica sees it) to its `/cluster` entry.
fn group_status(group: &crate::engine::Group, me: u64, status: &mut serde_json::Value) {
    let metrics = group.raft.metrics();
    let m = metrics.borrow();
    let last_log = m.last_log_index.unwrap_or(0);
    let lag: serde_json::Map<String, serde_json::Value> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, matched)| {
                    let matched = matched.map(|l| l.index).unwrap_or(0);
                    (
                        id.to_string(),
                        serde_json::json!(last_log.saturating_sub(matched)),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let log = group.log.stats();
    let fields = serde_json::json!({
        "voters": voters,
        "leader": m.current_leader,
        "state": format!("{:?}", m.state),
        "term": m.current_term,
        "commit_index": applied,
        "applied_index": applied,
        "last_log_index": last_log,
        "snapshot_index": m.snapshot.map(|l| l.index),
        "purged_index": m.purged.map(|l| l.index),
        "log_bytes": log.bytes,
        "log_entries": log.entries,
        "first_index": log.first_index,
        "lag": lag,
    });
    if let (Some(status), serde_json::Value::Object(fields)) = (status.as_object_mut(), fields) {
        status.extend(fields);
    }
}
