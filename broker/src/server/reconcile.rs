//! The node follows the cluster map: it runs exactly the data groups the map places on
//! it.
//!
//! Owns: one task that, on every new version of the map (and every
//! [`RECONCILE_INTERVAL`], to retry what failed), installs the map as the node's view,
//! starts the groups the map places here (a replica, or a replica joining through a
//! move) and stops — and forgets the data of — the groups it no longer does.
//! Must not: change the map, or stop a group the map still places here.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::GroupFactory;
use super::readiness;
use super::NodeContext;
use crate::cluster_map::ClusterMap;

/// Reconcile again at least this often (a group that failed to start is retried).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// Runs until the node stops.
pub async fn run(ctx: Arc<NodeContext>, factory: GroupFactory) {
    let Some(meta) = ctx.engine.groups().meta() else {
        return;
    };
    let mut watch = meta.sm.map_watch();
    loop {
        let map = watch.borrow_and_update().clone();
        ctx.engine.set_map(map.clone());
        reconcile(&ctx, &factory, &map).await;
        readiness::recompute(&ctx);
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}

async fn reconcile(ctx: &Arc<NodeContext>, factory: &GroupFactory, map: &ClusterMap) {
    let me = ctx.config.cluster.node_id;
    let want: BTreeSet<_> = map.hosted_by(me).into_iter().collect();
    let groups = ctx.engine.groups();
    let running = groups.all();
    for id in &want {
        if running.contains_key(id) {
            continue;
        }
        // The group's one queue on this node: the replica takes over the forwarding
        // queue (created now if there was none, so writes arriving meanwhile join it).
        let queue = ctx.engine.forwarding_pipeline(*id);
        match factory.start(*id, map, queue).await {
            Ok(group) => {
                tracing::info!(group = id, "started a replica of the group");
                groups.insert(group);
                ctx.engine.hosted(*id);
                if let Some(group) = groups.get(*id) {
                    readiness::track(ctx.clone(), group);
                }
            }
            Err(e) => tracing::warn!(group = id, error = %e, "cannot start the group; retrying"),
        }
    }
    for (id, group) in running.iter() {
        if want.contains(id) {
            continue;
        }
        tracing::info!(
            group = id,
            "the map no longer places the group here; stopping it"
        );
        // Its queue goes on forwarding to the leader: no queued write fails.
        ctx.engine.unhosting(*id, &group.pipeline);
        groups.remove(*id);
        factory.stop(group.clone()).await;
    }
}
