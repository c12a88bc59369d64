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
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}

/// One node, one group, until the replication issue: the shape of BRIEF §5 already.
async fn cluster(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let ready = ctx.ready.load(Ordering::Acquire);
    Json(serde_json::json!({
        "nodes": [{"id": 1, "addr": ctx.config.listen.to_string(), "ready": ready}],
        "groups": [{
            "id": 0,
            "replicas": [1],
            "leader": 1,
            "term": 0,
            "commit_index": ctx.metrics.publishes.get(),
            "lag": {}
        }]
    }))
}
