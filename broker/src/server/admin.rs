//! Admin HTTP: `/healthz`, `/readyz`, `/metrics`, `/cluster`, the two changes an
//! operator makes to a cluster: `POST /cluster/nodes` (a node joins) and
//! `POST /cluster/nodes/{id}/leave` (a node is drained, then removed), and
//! `POST /drain`: this node drains before it stops (see [`super::drain`]); the answer,
//! once the drain is done, is its report.
//!
//! Owns: the node's TCP admin port. Must not: change state other than by proposing
//! those two map changes to the metadata group (from any node: they are forwarded to
//! its leader). `/healthz` never depends on other nodes (liveness); `/readyz` means this
//! node accepts sessions.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::Path;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::NodeContext;

/// Serves admin HTTP on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<NodeContext>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cluster", get(cluster))
        .route("/cluster/nodes", post(add_node))
        .route("/cluster/nodes/{id}/leave", post(leave_node))
        .route("/drain", post(drain))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("admin HTTP stopped: {e}");
    }
}

async fn drain(State(ctx): State<Arc<NodeContext>>) -> Json<super::drain::DrainReport> {
    Json(super::drain::drain(&ctx).await)
}

/// The body of `POST /cluster/nodes`.
#[derive(serde::Deserialize)]
struct NewNode {
    id: u64,
    addr: String,
}

async fn add_node(
    State(ctx): State<Arc<NodeContext>>,
    Json(node): Json<NewNode>,
) -> impl IntoResponse {
    if node.id == 0 {
        return change_refused(StatusCode::BAD_REQUEST, "node ids start at 1");
    }
    let port_ok = node
        .addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return change_refused(
            StatusCode::BAD_REQUEST,
            &format!("`{}` is not HOST:PORT (the node's QUIC address)", node.addr),
        );
    }
    let command = crate::cluster_map::MetaCommand::AddNode {
        id: node.id,
        addr: node.addr,
    };
    map_change(&ctx, command).await
}

async fn leave_node(State(ctx): State<Arc<NodeContext>>, Path(id): Path<u64>) -> impl IntoResponse {
    map_change(&ctx, crate::cluster_map::MetaCommand::Leave { id }).await
}

async fn map_change(
    ctx: &NodeContext,
    command: crate::cluster_map::MetaCommand,
) -> (StatusCode, Json<serde_json::Value>) {
    match crate::meta::driver::propose(&ctx.engine, command).await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({ "ok": true }))),
        Err(refusal) => {
            let status = match refusal.code {
                herald_client::wire::RefusalCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CONFLICT,
            };
            change_refused(status, &refusal.detail)
        }
    }
}

fn change_refused(status: StatusCode, why: &str) -> (StatusCode, Json<serde_json::Value>) {
    (
        status,
        Json(serde_json::json!({ "ok": false, "error": why })),
    )
}

async fn readyz(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    if ctx.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    ctx.metrics.observe_log(&ctx.wal.stats(), &ctx.wal.spans());
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
    let draining = ctx.engine.groups().draining();
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
                "leaving": node.leaving,
            });
            if *id == me {
                entry["ready"] = serde_json::Value::Bool(ready);
                entry["draining"] = serde_json::Value::Bool(draining);
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
                "joining": entry.joining,
                "removing": entry.removing,
            });
            if let Some(group) = hosted.get(id) {
                group_status(group, me, &mut status);
            }
            status
        })
        .collect();
    let wal = ctx.wal.stats();
    let moving = map.moving_count();
    let settled = crate::meta::placement::next_steps(&map, usize::MAX).is_empty() && moving == 0;
    serde_json::json!({
        "node_id": me,
        "ready": ready,
        "draining": draining,
        "sessions": ctx.sessions.len(),
        "map_version": map.version(),
        "moving": moving,
        "settled": settled,
        "nodes": nodes,
        "log": {
            "bytes": wal.bytes_on_disk,
            "segments": wal.segments,
            "groups": wal.groups,
            "appended_entries_total": wal.appended_entries_total,
            "fsyncs_total": wal.fsyncs_total,
            "fsync_seconds_total": wal.fsync_seconds_total,
            "fsync_us_max_recent": wal.fsync_us_max_recent,
            "segments_spanned": ctx.wal.spans().spanned_segments,
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
