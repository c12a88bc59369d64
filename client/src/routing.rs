//! Where a [`Publisher`](crate::Publisher)'s writes go: the cluster map it caches, and
//! one connection per group leader it writes to.
//!
//! Owns: the cached map (slot → group, group → leader, node → address), leader hints
//! from replies (`Published { leader }`), and the lazily opened connection to each
//! leader node, each with its own reconnect and retry (the [`Core`] of a connection).
//! Must not: be needed for correctness: any node accepts any write and forwards it to
//! the group's leader, so a missing, stale or unreachable route only costs a hop.
//!
//! | bound | value | at the bound |
//! |---|---|---|
//! | [`ROUTES_MAX`] | leader connections per publisher | writes to further nodes go through the seed connection |
//! | [`MAP_NODES_MAX`], [`MAP_GROUPS_MAX`] | size of a map accepted | the map is ignored (no routing) |
//! | [`REFRESH_AFTER`] | age of the map | it is fetched again in the background |
//! | [`DOWN_FOR`] | after a node could not be reached | writes for it go through the seed connection |
//!
//! A route is opened in the background: the write that first needs it goes through the
//! seed connection, so opening a route (which may try every seed, each up to the
//! connect timeout, when the leader's address is unreachable from here) never delays a
//! write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ClientConfig, SeedAddr};
use crate::connection::{lock, Core};
use crate::wire::{slot_of, ClusterMapView, SLOT_COUNT};

/// Leader connections one publisher keeps, at most.
pub const ROUTES_MAX: usize = 64;
/// Nodes in a map, at most (a larger one is ignored).
pub const MAP_NODES_MAX: usize = 4096;
/// Groups in a map, at most (one per slot).
pub const MAP_GROUPS_MAX: usize = SLOT_COUNT as usize;
/// A map older than this is fetched again (in the background, on the next write).
pub const REFRESH_AFTER: Duration = Duration::from_secs(10);
/// A node that could not be reached is not tried again for this long.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

/// The cached map.
#[derive(Debug)]
struct Routing {
    /// Group of each slot.
    by_slot: Vec<u32>,
    /// Leader of each group, when known.
    leaders: HashMap<u32, u64>,
    /// Address of each node.
    addrs: HashMap<u64, String>,
    fetched: Instant,
}

enum Route {
    Up(Arc<Core>),
    /// Being opened by a background task.
    Opening,
    Down(Instant),
}

/// Routes of one publisher (see the module documentation).
pub(crate) struct Routes {
    base: ClientConfig,
    map: Mutex<Option<Routing>>,
    routes: tokio::sync::Mutex<HashMap<u64, Route>>,
}

impl Routes {
    /// Routes built on `base` (seeds, credentials, timeouts of the publisher).
    pub(crate) fn new(base: ClientConfig) -> Self {
        Routes {
            base,
            map: Mutex::new(None),
            routes: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the cached map with `view`; an inconsistent view is ignored (no
    /// routing until a good one arrives).
    pub(crate) fn install(&self, view: ClusterMapView) {
        let routing = match parse(view) {
            Ok(routing) => Some(routing),
            Err(why) => {
                tracing::debug!("ignoring the cluster map: {why}");
                None
            }
        };
        *lock(&self.map) = routing;
    }

    /// True when there is no map or it is older than [`REFRESH_AFTER`].
    pub(crate) fn stale(&self) -> bool {
        lock(&self.map)
            .as_ref()
            .is_none_or(|m| m.fetched.elapsed() > REFRESH_AFTER)
    }

    /// The group of `conv` and its leader, when known.
    pub(crate) fn leader_of(&self, conv: u64) -> Option<(u32, u64)> {
        let map = lock(&self.map);
        let map = map.as_ref()?;
        let group = *map.by_slot.get(slot_of(conv) as usize)?;
        map.leaders.get(&group).map(|leader| (group, *leader))
    }

    /// A node said `leader` leads the group of `conv`.
    pub(crate) fn note_leader(&self, conv: u64, leader: u64) {
        let mut map = lock(&self.map);
        if let Some(map) = map.as_mut() {
            if let Some(group) = map.by_slot.get(slot_of(conv) as usize).copied() {
                if map.addrs.contains_key(&leader) {
                    map.leaders.insert(group, leader);
                }
            }
        }
    }

    /// The connection to `node` when it is open; `None` when it is not (unknown,
    /// recently unreachable, too many routes, or being opened — the first use starts
    /// opening it in the background): use the seed connection meanwhile.
    pub(crate) async fn core_for(self: &Arc<Self>, node: u64) -> Option<Arc<Core>> {
        let addr = lock(&self.map).as_ref()?.addrs.get(&node)?.clone();
        let mut routes = self.routes.lock().await;
        match routes.get(&node) {
            Some(Route::Up(core)) => return Some(core.clone()),
            Some(Route::Opening) => return None,
            Some(Route::Down(since)) if since.elapsed() < DOWN_FOR => return None,
            _ => {}
        }
        if routes.len() >= ROUTES_MAX && !routes.contains_key(&node) {
            return None;
        }
        let Ok(config) = self.config_for(&addr) else {
            routes.insert(node, Route::Down(Instant::now()));
            return None;
        };
        routes.insert(node, Route::Opening);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let route = match Core::connect(config, None).await {
                Ok(core) => Route::Up(Arc::new(core)),
                Err(e) => {
                    tracing::debug!(node, %addr, "cannot open a route to the leader: {e}");
                    Route::Down(Instant::now())
                }
            };
            let mut routes = this.routes.lock().await;
            // Closed meanwhile (`close` took every route): do not leave a connection.
            if matches!(routes.get(&node), Some(Route::Opening)) {
                routes.insert(node, route);
            } else if let Route::Up(core) = route {
                drop(routes);
                core.close().await;
            }
        });
        None
    }

    /// The publisher's config, with `addr` tried first (then the seeds, for
    /// reconnects).
    fn config_for(&self, addr: &str) -> Result<ClientConfig, crate::Error> {
        let mut config = self.base.clone();
        let first = SeedAddr::parse(addr)?;
        config.addrs.retain(|a| a != &first);
        config.addrs.insert(0, first);
        config.prefer_first = true;
        Ok(config)
    }

    /// Closes every route.
    pub(crate) async fn close(&self) {
        let routes: Vec<Route> = self.routes.lock().await.drain().map(|(_, r)| r).collect();
        for route in routes {
            if let Route::Up(core) = route {
                core.close().await;
            }
        }
    }
}

/// Checks a map view and indexes it.
fn parse(view: ClusterMapView) -> Result<Routing, String> {
    if view.nodes.len() > MAP_NODES_MAX || view.groups.len() > MAP_GROUPS_MAX {
        return Err(format!(
            "{} nodes and {} groups is above the bounds",
            view.nodes.len(),
            view.groups.len()
        ));
    }
    let addrs: HashMap<u64, String> = view.nodes.into_iter().map(|n| (n.id, n.addr)).collect();
    let mut by_slot = vec![u32::MAX; SLOT_COUNT as usize];
    let mut leaders = HashMap::new();
    for group in view.groups {
        if group.slot_start >= group.slot_end || group.slot_end > SLOT_COUNT {
            return Err(format!(
                "group {} owns slots {}..{}",
                group.id, group.slot_start, group.slot_end
            ));
        }
        for slot in group.slot_start..group.slot_end {
            by_slot[slot as usize] = group.id;
        }
        if let Some(leader) = group.leader.filter(|l| addrs.contains_key(l)) {
            leaders.insert(group.id, leader);
        }
    }
    if let Some(slot) = by_slot.iter().position(|g| *g == u32::MAX) {
        return Err(format!("slot {slot} has no group"));
    }
    Ok(Routing {
        by_slot,
        leaders,
        addrs,
        fetched: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{GroupView, NodeView};

    fn view() -> ClusterMapView {
        ClusterMapView {
            nodes: (1..=3)
                .map(|id| NodeView {
                    id,
                    addr: format!("127.0.0.1:74{id}0"),
                })
                .collect(),
            groups: vec![
                GroupView {
                    id: 1,
                    slot_start: 0,
                    slot_end: 2048,
                    leader: Some(2),
                },
                GroupView {
                    id: 2,
                    slot_start: 2048,
                    slot_end: 4096,
                    leader: None,
                },
            ],
        }
    }

    #[test]
    fn a_map_routes_conversations_to_leaders_and_takes_hints() {
        let routing = parse(view()).unwrap();
        assert_eq!(routing.leaders.get(&1), Some(&2));
        let low = (0u64..).find(|c| slot_of(*c) < 2048).unwrap();
        let high = (0u64..).find(|c| slot_of(*c) >= 2048).unwrap();
        assert_eq!(routing.by_slot[slot_of(low) as usize], 1);
        assert_eq!(routing.by_slot[slot_of(high) as usize], 2);
    }

    #[test]
    fn an_inconsistent_map_is_refused() {
        let mut holes = view();
        holes.groups.pop();
        assert!(parse(holes).unwrap_err().contains("slot 2048"));
        let mut bad = view();
        bad.groups[0].slot_end = 5000;
        assert!(parse(bad).is_err());
    }
}
