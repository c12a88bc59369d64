//! t30: admin HTTP — liveness, readiness, metrics and the cluster view operators rely on.

use herald_tests::DevNode;

#[test]
fn health_ready_metrics_and_cluster_answer() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    assert_eq!(node.admin_get("/healthz")?.0, 200);
    assert_eq!(node.admin_get("/readyz")?.0, 200);

    let (code, metrics) = node.admin_get("/metrics")?;
    assert_eq!(code, 200);
    for name in [
        "herald_connections ",
        "herald_sessions ",
        "herald_subscriptions ",
        "herald_publishes_total",
        "herald_deliveries_total",
        "herald_sessions_lagged_total",
        "herald_received_bytes_total",
        "herald_sent_bytes_total",
        "herald_publish_ack_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "metric {name} missing:\n{metrics}");
    }
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("herald_"),
            "un-prefixed metric line: {line}"
        );
    }

    let (code, cluster) = node.admin_get("/cluster")?;
    assert_eq!(code, 200);
    let cluster: serde_json::Value = serde_json::from_str(&cluster)?;
    assert_eq!(cluster["nodes"][0]["ready"], true);
    assert_eq!(cluster["groups"][0]["leader"], 1);
    Ok(())
}
