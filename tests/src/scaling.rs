//! Scaling helpers for [`Cluster`]: adding a joining node and removing a node with
//! the real `herald cluster add-node` / `remove-node` commands, and reading replica
//! and leader counts per node.
//!
//! Owns: running those commands (with `--wait`, bounded by [`SCALE_DEADLINE`]) and
//! keeping the harness's member list in step. Must not: sleep to synchronise (waits
//! poll a condition with a deadline).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::Cluster;
use crate::DEADLINE;

/// How long adding or removing a node may take in a test (every replica move copies
/// a group; a few seconds each, two at a time).
pub const SCALE_DEADLINE: Duration = Duration::from_secs(240);

impl Cluster {
    /// Starts joining node `k` and adds it with `herald cluster add-node --wait`
    /// through node `via`'s admin port; returns how long the command took (every move
    /// onto `k` done, the plan settled). Then waits until `k` is ready.
    pub async fn add_node(&self, k: u16, via: u16) -> anyhow::Result<Duration> {
        self.start_process(k).await?;
        let started = Instant::now();
        self.cluster_command(
            via,
            &[
                "add-node",
                "--id",
                &k.to_string(),
                "--addr",
                &self.addr(k).to_string(),
            ],
        )
        .await
        .with_context(|| format!("adding node {k}"))?;
        let took = started.elapsed();
        self.set_member(k, true);
        self.wait_ready(k).await?;
        Ok(took)
    }

    /// Removes node `k` with `herald cluster remove-node --wait` through node `via`'s
    /// admin port (its replicas move away first), then stops its process; returns how
    /// long the command took.
    pub async fn remove_node(&self, k: u16, via: u16) -> anyhow::Result<Duration> {
        anyhow::ensure!(
            via != k,
            "remove node {k} through another node's admin port"
        );
        let started = Instant::now();
        self.cluster_command(via, &["remove-node", "--id", &k.to_string()])
            .await
            .with_context(|| format!("removing node {k}"))?;
        let took = started.elapsed();
        self.set_member(k, false);
        self.kill9(k);
        Ok(took)
    }

    /// Runs `herald cluster ARGS --wait` against node `via`; fails with its output
    /// unless it exits 0.
    async fn cluster_command(&self, via: u16, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.cli(via, "")?;
        cmd.arg("cluster")
            .args(args)
            .arg("--wait")
            .arg("--timeout")
            .arg(format!("{}s", SCALE_DEADLINE.as_secs()));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .context("cannot run herald cluster")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "herald cluster {} failed ({}):\n{stdout}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Replicas per node as the map places them (members with none count as 0).
    pub async fn replica_counts(&self) -> anyhow::Result<BTreeMap<u16, usize>> {
        let mut counts: BTreeMap<u16, usize> = self.ids().into_iter().map(|k| (k, 0)).collect();
        for group in self.groups().await? {
            for r in group.replicas {
                *counts.entry(r).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Waits until the leaders of all `groups` groups are spread so that no member
    /// leads more than `max`; returns the count per member.
    pub async fn wait_leaders_at_most(
        &self,
        groups: usize,
        max: usize,
    ) -> anyhow::Result<BTreeMap<u16, usize>> {
        let until = Instant::now() + DEADLINE;
        loop {
            let leaders = self.group_leaders().await;
            let mut per_node: BTreeMap<u16, usize> =
                self.ids().into_iter().map(|k| (k, 0)).collect();
            for k in leaders.values() {
                *per_node.entry(*k).or_default() += 1;
            }
            if leaders.len() == groups && per_node.values().all(|c| *c <= max) {
                return Ok(per_node);
            }
            if Instant::now() > until {
                bail!(
                    "after {DEADLINE:?} leaders per node are {per_node:?} ({} of {groups} groups led), want at most {max} each",
                    leaders.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
