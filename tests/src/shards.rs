//! Sharding helpers for [`Cluster`]: which node leads which data group, which groups own
//! which slots, and conversations chosen to land in given groups.
//!
//! Owns: reading every live node's `/cluster` and merging their views of the groups.
//! Must not: sleep to synchronise (waits poll a condition with a deadline).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_client::wire::slot_of;

use crate::cluster::Cluster;
use crate::DEADLINE;

/// A data group as the cluster map describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group id.
    pub id: u64,
    /// Nodes holding its replicas (the first is its preferred leader).
    pub replicas: Vec<u16>,
    /// The slots it owns, `start..end`.
    pub slots: std::ops::Range<u32>,
}

/// Polls `leaders` every `poll` until all `groups` data groups have one, up to
/// [`DEADLINE`]; returns them. Serves the process cluster and the compose cluster.
pub async fn wait_until_led<F, Fut>(
    groups: usize,
    poll: Duration,
    mut leaders: F,
) -> anyhow::Result<BTreeMap<u64, u16>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BTreeMap<u64, u16>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        let leaders = leaders().await;
        if leaders.len() == groups {
            return Ok(leaders);
        }
        if Instant::now() > until {
            bail!(
                "after {DEADLINE:?} only {} of {groups} groups have a leader: {leaders:?}",
                leaders.len()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// The leader of every group in the `/cluster` views of the nodes `(k, view)`: for each
/// group, the node that reports itself its `Leader` with the highest term.
pub fn leaders_in(views: &[(u16, serde_json::Value)]) -> BTreeMap<u64, u16> {
    let mut best: BTreeMap<u64, (u64, u16)> = BTreeMap::new();
    for (k, status) in views {
        for g in status["groups"].as_array().into_iter().flatten() {
            let (Some(id), term) = (g["id"].as_u64(), g["term"].as_u64().unwrap_or(0)) else {
                continue;
            };
            if g["state"] == "Leader"
                && g["leader"].as_u64() == Some(u64::from(*k))
                && best.get(&id).is_none_or(|(t, _)| term > *t)
            {
                best.insert(id, (term, *k));
            }
        }
    }
    best.into_iter().map(|(id, (_, k))| (id, k)).collect()
}

impl Cluster {
    /// The data groups of the map, from the first live node that answers.
    pub async fn groups(&self) -> anyhow::Result<Vec<GroupInfo>> {
        for k in self.live() {
            let Ok(status) = self.status(k).await else {
                continue;
            };
            let mut groups = Vec::new();
            for g in status["groups"].as_array().into_iter().flatten() {
                let replicas = g["replicas"]
                    .as_array()
                    .context("a group without replicas")?
                    .iter()
                    .filter_map(|r| r.as_u64().map(|r| r as u16))
                    .collect();
                let slot = |i: usize| g["slots"][i].as_u64().map(|s| s as u32);
                groups.push(GroupInfo {
                    id: g["id"].as_u64().context("a group without an id")?,
                    replicas,
                    slots: slot(0).context("no slots")?..slot(1).context("no slots")?,
                });
            }
            return Ok(groups);
        }
        bail!("no live node answered /cluster")
    }

    /// The leader of every group, as the live nodes see it: for each group, the node
    /// that reports itself its `Leader` with the highest term.
    pub async fn group_leaders(&self) -> BTreeMap<u64, u16> {
        let mut views = Vec::new();
        for k in self.live() {
            if let Ok(status) = self.status(k).await {
                views.push((k, status));
            }
        }
        leaders_in(&views)
    }

    /// Waits until every one of the `groups` data groups has a leader; returns them.
    pub async fn wait_every_group_led(&self, groups: usize) -> anyhow::Result<BTreeMap<u64, u16>> {
        wait_until_led(groups, Duration::from_millis(25), || self.group_leaders()).await
    }
}

/// The group of `groups` that owns conversation `conv`.
pub fn group_of(groups: &[GroupInfo], conv: u64) -> Option<&GroupInfo> {
    let slot = slot_of(conv);
    groups.iter().find(|g| g.slots.contains(&slot))
}

/// The first conversation id at or after `from` in each of `wanted` groups (in that
/// order).
pub fn conversations_in(groups: &[GroupInfo], wanted: &[u64], from: u64) -> Vec<u64> {
    wanted
        .iter()
        .map(|g| {
            (from..)
                .find(|conv| group_of(groups, *conv).is_some_and(|owner| owner.id == *g))
                .unwrap_or(from)
        })
        .collect()
}
