//! A local multi-node Herald cluster of real `herald serve` processes, for tests.
//!
//! Owns: picking a free loopback port range, writing the cluster files with
//! `herald dev-cluster`, starting, killing (`SIGKILL`), pausing (`SIGSTOP`/`SIGCONT`),
//! wiping and restarting nodes, reading each node's `/cluster` view, and each node's
//! stderr log (`DIR/nodeK.stderr.log`, appended across restarts) for failure messages.
//! Must not: sleep to synchronise — every wait polls a condition with a deadline — or
//! leave a process behind: every child is killed on drop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::target::{test_client_config, Nodes};
use crate::{herald_binary, DEADLINE};

/// How long one admin HTTP request may take (a paused node never answers).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of each node's log shown in a failure message.
const LOG_TAIL_LINES: usize = 40;
/// Port ranges tried before giving up.
const PORT_ATTEMPTS: usize = 50;
/// Ports are picked below the Linux ephemeral range (32768+), where the clients' own
/// sockets land, so a node never collides with a test's outgoing connection.
const PORT_RANGE: std::ops::Range<u32> = 12_000..32_000;

/// One node's process and addresses.
struct Node {
    quic: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
    paused: bool,
    /// In the cluster: an initial member, or a joining node once added (and until
    /// removed). [`Cluster::ids`] lists only members.
    member: bool,
}

/// What became of a spawned node.
enum Spawned {
    /// It printed its `listening` line.
    Listening(Child),
    /// It exited first.
    Exited(ExitStatus),
}

/// A running N-node cluster; every node is killed on drop.
pub struct Cluster {
    dir: PathBuf,
    /// Deleted on drop unless a failure asked to keep it (see [`Cluster::finish`]).
    tempdir: Option<tempfile::TempDir>,
    keep_dir: std::sync::atomic::AtomicBool,
    base_port: u16,
    env: Vec<(String, String)>,
    nodes: Mutex<Vec<Node>>,
}

impl Cluster {
    /// Writes an `n`-node cluster of ONE data group with `herald dev-cluster` on a free
    /// port range, starts every node with `herald serve` (with `env` added,
    /// `RUST_LOG=warn` unless `env` sets it), and waits until every node is ready. One
    /// group keeps "the leader" meaningful for the replication tests; sharding tests use
    /// [`Cluster::start_sharded`].
    pub async fn start(n: u16, env: &[(&str, &str)]) -> anyhow::Result<Cluster> {
        Self::start_sharded(n, 1, env).await
    }

    /// The same with `groups` data groups (replication factor 3).
    pub async fn start_sharded(
        n: u16,
        groups: u32,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        Self::start_growable(n, n, groups, env).await
    }

    /// Writes `total` nodes of which the first `initial` form the cluster (with
    /// `groups` data groups) and start now; nodes `initial+1..=total` are joining nodes
    /// (`cluster.join`), started later and added with `herald cluster add-node` (see
    /// [`Cluster::add_node`]).
    pub async fn start_growable(
        total: u16,
        initial: u16,
        groups: u32,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            (1..=9).contains(&total),
            "a cluster has 1 to 9 nodes, not {total}"
        );
        anyhow::ensure!(
            (1..=total).contains(&initial),
            "{initial} initial nodes of {total}"
        );
        crate::init_client_log();
        let mut last = None;
        for _ in 0..3 {
            let cluster = Self::write(total, initial, groups, env)?;
            match cluster.spawn_all().await {
                Ok(()) => {}
                Err(e) if cluster.logs_tail().contains("in use") => {
                    // Another process took a port between the probe and the bind.
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(cluster.with_logs(e)),
            }
            let ready = cluster.wait_all_ready().await;
            return cluster.finish(ready.map(|_| ())).map(|()| cluster);
        }
        Err(last.unwrap_or_else(|| anyhow!("no free port range found")))
    }

    fn write(n: u16, initial: u16, groups: u32, env: &[(&str, &str)]) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("herald-cluster-")
            .tempdir()?;
        let base_port = free_port_range(n)?;
        let out = Command::new(herald_binary()?)
            .arg("dev-cluster")
            .arg("--nodes")
            .arg(n.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--base-port")
            .arg(base_port.to_string())
            .arg("--groups")
            .arg(groups.to_string())
            .arg("--initial")
            .arg(initial.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .context("cannot run herald dev-cluster")?;
        if !out.status.success() {
            bail!(
                "herald dev-cluster failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let nodes = (1..=n)
            .map(|k| {
                let quic_port = base_port + 10 * (k - 1);
                Node {
                    quic: SocketAddr::from(([127, 0, 0, 1], quic_port)),
                    admin: SocketAddr::from(([127, 0, 0, 1], quic_port + 1)),
                    child: None,
                    paused: false,
                    member: k <= initial,
                }
            })
            .collect();
        let mut own_env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !own_env.iter().any(|(k, _)| k == "RUST_LOG") {
            // HERALD_TEST_RUST_LOG sets the nodes' filter when a run needs their story.
            let filter = std::env::var("HERALD_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into());
            own_env.push(("RUST_LOG".into(), filter));
        }
        // Plain text logs (no colour escapes) in the log files.
        own_env.push(("NO_COLOR".into(), "1".into()));
        Ok(Cluster {
            dir: dir.path().to_owned(),
            tempdir: Some(dir),
            // HERALD_TEST_KEEP_DIR keeps every cluster's logs and data, pass or fail.
            keep_dir: std::sync::atomic::AtomicBool::new(
                std::env::var_os("HERALD_TEST_KEEP_DIR").is_some(),
            ),
            base_port,
            env: own_env,
            nodes: Mutex::new(nodes),
        })
    }

    fn nodes(&self) -> MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of nodes in the cluster (members; joining nodes count once added).
    pub fn len(&self) -> u16 {
        self.nodes().iter().filter(|n| n.member).count() as u16
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Ids of the nodes in the cluster (members), in order.
    pub fn ids(&self) -> Vec<u16> {
        self.nodes()
            .iter()
            .enumerate()
            .filter(|(_, n)| n.member)
            .map(|(i, _)| i as u16 + 1)
            .collect()
    }

    /// Marks node `k` in or out of the cluster (after adding or removing it).
    pub(crate) fn set_member(&self, k: u16, member: bool) {
        self.node(k, |n| n.member = member);
    }

    /// The cluster's directory (CA, secrets, configs, `nodeK/` data, `nodeK.stderr.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first QUIC port; node K listens on `base_port + 10(K-1)`.
    pub fn base_port(&self) -> u16 {
        self.base_port
    }

    /// Node `k`'s data directory.
    pub fn data_dir(&self, k: u16) -> PathBuf {
        self.dir.join(format!("node{k}"))
    }

    /// Node `k`'s config file.
    pub fn config_path(&self, k: u16) -> PathBuf {
        self.dir.join(format!("node{k}.toml"))
    }

    /// Node `k`'s stderr log (all its runs, each headed by a `=== start` line).
    pub fn log_path(&self, k: u16) -> PathBuf {
        self.dir.join(format!("node{k}.stderr.log"))
    }

    /// The CA file clients trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The token secret file.
    pub fn secret_path(&self) -> PathBuf {
        self.dir.join("secret")
    }

    /// The cluster (node-to-node) secret file.
    pub fn cluster_secret_path(&self) -> PathBuf {
        self.dir.join("cluster-secret")
    }

    fn node<T>(&self, k: u16, f: impl FnOnce(&mut Node) -> T) -> T {
        let mut nodes = self.nodes();
        let index = usize::from(k).checked_sub(1).filter(|i| *i < nodes.len());
        match index {
            Some(i) => f(&mut nodes[i]),
            None => panic!("no node {k} in a {}-node cluster", nodes.len()),
        }
    }

    /// Node `k`'s QUIC address.
    pub fn addr(&self, k: u16) -> SocketAddr {
        self.node(k, |n| n.quic)
    }

    /// Node `k`'s admin HTTP address.
    pub fn admin_addr(&self, k: u16) -> SocketAddr {
        self.node(k, |n| n.admin)
    }

    /// Every node's QUIC address, in id order (client seeds).
    pub fn addrs(&self) -> Vec<String> {
        self.nodes().iter().map(|n| n.quic.to_string()).collect()
    }

    /// The QUIC addresses of `ids`, in that order.
    pub fn addrs_of(&self, ids: &[u16]) -> Vec<String> {
        ids.iter().map(|k| self.addr(*k).to_string()).collect()
    }

    /// True while node `k`'s process runs (paused or not).
    pub fn is_running(&self, k: u16) -> bool {
        self.node(k, |n| n.child.is_some())
    }

    /// Nodes that run and are not paused.
    pub fn live(&self) -> Vec<u16> {
        self.nodes()
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_some() && !n.paused)
            .map(|(i, _)| i as u16 + 1)
            .collect()
    }

    /// Node `k`'s process id, while it runs.
    pub fn pid(&self, k: u16) -> Option<u32> {
        self.node(k, |n| n.child.as_ref().map(Child::id))
    }

    // -----------------------------------------------------------------------------
    // Processes.

    async fn spawn_all(&self) -> anyhow::Result<()> {
        let ids = self.ids();
        let extra: Vec<(&str, &str)> = Vec::new();
        let mut waits = Vec::new();
        for k in &ids {
            waits.push((*k, self.spawn(*k, &extra)?));
        }
        for (k, rx) in waits {
            self.await_listening(k, rx).await?;
        }
        Ok(())
    }

    /// Starts node `k`'s process; the receiver gets its `listening` line (or closes when
    /// the process exits first).
    fn spawn(
        &self,
        k: u16,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<String>> {
        anyhow::ensure!(!self.is_running(k), "node {k} is already running");
        let log_path = self.log_path(k);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let extra_text: Vec<String> = extra_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            log,
            "=== start of node {k} (extra env: {}) ===",
            extra_text.join(" ")
        )?;
        let mut cmd = Command::new(herald_binary()?);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path(k))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        for (key, value) in extra_env {
            cmd.env(key, value);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {k}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("listening ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        self.node(k, |n| {
            n.child = Some(child);
            n.paused = false;
        });
        Ok(rx)
    }

    /// Waits for node `k`'s `listening` line and checks its addresses.
    async fn await_listening(
        &self,
        k: u16,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> anyhow::Result<()> {
        match self.await_spawn(k, &mut rx).await? {
            Spawned::Listening(child) => {
                self.node(k, |n| n.child = Some(child));
                Ok(())
            }
            Spawned::Exited(status) => bail!(
                "node {k} exited ({status}) before it was listening; its log:\n{}",
                self.log_tail(k, LOG_TAIL_LINES)
            ),
        }
    }

    async fn await_spawn(
        &self,
        k: u16,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> anyhow::Result<Spawned> {
        let line = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .with_context(|| {
                format!("node {k} did not print its `listening` line in {DEADLINE:?}")
            })?;
        let mut child = self
            .node(k, |n| n.child.take())
            .with_context(|| format!("node {k} was killed while starting"))?;
        let Some(line) = line else {
            // stdout closed: the process is exiting.
            let status = child.wait()?;
            return Ok(Spawned::Exited(status));
        };
        let (want_quic, want_admin) = (self.addr(k), self.admin_addr(k));
        let mut quic = None;
        let mut admin = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("quic=") {
                quic = a.parse::<SocketAddr>().ok();
            } else if let Some(a) = part.strip_prefix("admin=") {
                admin = a.parse::<SocketAddr>().ok();
            }
        }
        if quic != Some(want_quic) || admin != Some(want_admin) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "node {k} printed `listening {line}`, expected quic={want_quic} admin={want_admin}"
            );
        }
        Ok(Spawned::Listening(child))
    }

    /// `kill -9` node `k` and reaps it. Killing a node that is not running is a no-op.
    pub fn kill9(&self, k: u16) {
        if let Some(mut child) = self.node(k, |n| {
            n.paused = false;
            n.child.take()
        }) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills node `k` and removes its data directory.
    pub fn wipe(&self, k: u16) -> anyhow::Result<()> {
        self.kill9(k);
        let dir = self.data_dir(k);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        Ok(())
    }

    /// Starts node `k`'s process and waits for its `listening` line only (a joining
    /// node is ready once it was added).
    pub async fn start_process(&self, k: u16) -> anyhow::Result<()> {
        let rx = self.spawn(k, &[])?;
        self.await_listening(k, rx).await
    }

    /// Restarts node `k` (same config and environment) and waits until it is ready and
    /// knows a leader.
    pub async fn restart(&self, k: u16) -> anyhow::Result<()> {
        self.restart_with_env(k, &[]).await
    }

    /// Like [`Cluster::restart`], with `extra` variables for this run only.
    pub async fn restart_with_env(&self, k: u16, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let rx = self.spawn(k, extra)?;
        self.await_listening(k, rx).await?;
        self.wait_ready(k).await
    }

    /// Restarts every node in `ids` at once (a quorum must come back together), then
    /// waits until each is ready and they agree on a leader.
    pub async fn restart_all(&self, ids: &[u16]) -> anyhow::Result<()> {
        let mut waits = Vec::new();
        for k in ids {
            waits.push((*k, self.spawn(*k, &[])?));
        }
        for (k, rx) in waits {
            self.await_listening(k, rx).await?;
        }
        for k in ids {
            self.wait_ready(*k).await?;
        }
        self.wait_leader().await.map(|_| ())
    }

    /// Restarts node `k` expecting it to fail: waits until the process exits and
    /// returns its exit status and what it wrote to stderr in this run.
    pub async fn restart_expect_exit(&self, k: u16) -> anyhow::Result<(ExitStatus, String)> {
        let log_start = std::fs::metadata(self.log_path(k)).map_or(0, |m| m.len());
        let mut rx = self.spawn(k, &[])?;
        // A node that fails at open may or may not print `listening` first; either way
        // it must exit on its own.
        let outcome = tokio::time::timeout(DEADLINE, async {
            loop {
                let exited = self.node(k, |n| {
                    n.child
                        .as_mut()
                        .map(|c| c.try_wait().ok().flatten())
                        .unwrap_or(None)
                });
                if let Some(status) = exited {
                    return status;
                }
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let stderr = read_from(&self.log_path(k), log_start);
        match outcome {
            Ok(status) => {
                self.node(k, |n| n.child = None);
                Ok((status, stderr))
            }
            Err(_) => {
                let status = self.node(k, |n| n.child.is_some());
                bail!(
                    "node {k} was expected to exit but still runs after {DEADLINE:?} (running: {status}); its stderr:\n{}",
                    tail(&stderr, LOG_TAIL_LINES)
                )
            }
        }
    }

    /// Pauses node `k` with `SIGSTOP` (it stays in memory, answers nothing).
    pub fn stop_signal(&self, k: u16) -> anyhow::Result<()> {
        self.signal(k, "-STOP")?;
        self.node(k, |n| n.paused = true);
        Ok(())
    }

    /// Sends node `k` `SIGTERM`: it drains, then exits on its own.
    pub fn terminate(&self, k: u16) -> anyhow::Result<()> {
        self.signal(k, "-TERM")
    }

    /// Resumes a paused node with `SIGCONT`.
    pub fn resume(&self, k: u16) -> anyhow::Result<()> {
        self.signal(k, "-CONT")?;
        self.node(k, |n| n.paused = false);
        Ok(())
    }

    fn signal(&self, k: u16, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid(k)
            .with_context(|| format!("node {k} is not running"))?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed: {status}");
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // Observing.

    /// GET `path` on node `k`'s admin port: (status code, body).
    pub async fn admin_get(&self, k: u16, path: &str) -> anyhow::Result<(u16, String)> {
        admin_get_at(self.admin_addr(k), path).await
    }

    /// Node `k`'s `/cluster` JSON.
    pub async fn status(&self, k: u16) -> anyhow::Result<serde_json::Value> {
        let (code, body) = self.admin_get(k, "/cluster").await?;
        anyhow::ensure!(code == 200, "node {k} /cluster answered {code}: {body}");
        serde_json::from_str(&body).with_context(|| format!("node {k} /cluster: {body}"))
    }

    /// Node `k`'s view of the first data group (`groups[0]` of `/cluster`: the only one
    /// of a [`Cluster::start`] cluster).
    pub async fn group(&self, k: u16) -> anyhow::Result<serde_json::Value> {
        let status = self.status(k).await?;
        Ok(status["groups"][0].clone())
    }

    /// True when node `k`'s `/readyz` answers 200.
    pub async fn is_ready(&self, k: u16) -> bool {
        matches!(self.admin_get(k, "/readyz").await, Ok((200, _)))
    }

    /// The leader, as the live nodes see it: the node that reports itself `Leader` with
    /// the highest term. `None` while there is none.
    pub async fn leader(&self) -> Option<u16> {
        let mut best: Option<(u64, u16)> = None;
        for k in self.live() {
            let Ok(g) = self.group(k).await else { continue };
            let term = g["term"].as_u64().unwrap_or(0);
            if g["state"] == "Leader"
                && g["leader"].as_u64() == Some(u64::from(k))
                && best.is_none_or(|(t, _)| term > t)
            {
                best = Some((term, k));
            }
        }
        best.map(|(_, k)| k)
    }

    /// Waits until there is a leader; returns it.
    pub async fn wait_leader(&self) -> anyhow::Result<u16> {
        self.wait_leader_where("a leader", |_| true).await
    }

    /// Waits until a node other than `k` leads; returns it.
    pub async fn wait_leader_other_than(&self, k: u16) -> anyhow::Result<u16> {
        self.wait_leader_where(&format!("a leader other than node {k}"), |l| l != k)
            .await
    }

    async fn wait_leader_where(&self, what: &str, ok: impl Fn(u16) -> bool) -> anyhow::Result<u16> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.leader().await.filter(|l| ok(*l)) {
                return Ok(l);
            }
            if Instant::now() > until {
                bail!(
                    "timed out after {DEADLINE:?} waiting for {what}; views: {}",
                    self.views().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Every live node's group view in one line, for failure messages.
    pub async fn views(&self) -> String {
        let mut out = Vec::new();
        for k in self.ids() {
            if !self.live().contains(&k) {
                out.push(format!("node {k}: down or paused"));
                continue;
            }
            match self.group(k).await {
                Ok(g) => out.push(format!(
                    "node {k}: state={} leader={} term={} applied={} last_log={}",
                    g["state"], g["leader"], g["term"], g["applied_index"], g["last_log_index"]
                )),
                Err(e) => out.push(format!("node {k}: {e:#}")),
            }
        }
        out.join("; ")
    }

    /// Waits until node `k` is ready (`/readyz` 200) and follows the current leader.
    pub async fn wait_ready(&self, k: u16) -> anyhow::Result<()> {
        let until = Instant::now() + DEADLINE;
        loop {
            if !self.is_running(k) {
                bail!(
                    "node {k} is not running; its log:\n{}",
                    self.log_tail(k, LOG_TAIL_LINES)
                );
            }
            let exited = self.node(k, |n| {
                n.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
            });
            if let Some(status) = exited {
                self.node(k, |n| n.child = None);
                bail!(
                    "node {k} exited ({status}); its log:\n{}",
                    self.log_tail(k, LOG_TAIL_LINES)
                );
            }
            if self.is_ready(k).await {
                // A restarted node may name a stale leader (itself, from its persisted
                // vote) at first: wait until it follows the leader the live nodes agree on.
                if let (Ok(g), Some(leader)) = (self.group(k).await, self.leader().await) {
                    // A node without a replica of the first group has no view of it.
                    if g["state"].is_null() || g["leader"].as_u64() == Some(u64::from(leader)) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > until {
                bail!(
                    "node {k} not ready after {DEADLINE:?}; views: {}",
                    self.views().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until every node is ready and all report the same leader, which reports
    /// itself `Leader`.
    pub async fn wait_all_ready(&self) -> anyhow::Result<u16> {
        for k in self.ids() {
            self.wait_ready(k).await?;
        }
        let until = Instant::now() + DEADLINE;
        loop {
            let mut leaders = BTreeMap::new();
            let mut answered = 0;
            for k in self.ids() {
                if let Ok(g) = self.group(k).await {
                    answered += 1;
                    // Only the first group's replicas have a view of it.
                    if !g["state"].is_null() {
                        leaders.insert(k, g["leader"].as_u64());
                    }
                }
            }
            let first = leaders.values().next().copied().flatten();
            if answered == usize::from(self.len()) && leaders.values().all(|l| *l == first) {
                if let Some(l) = first {
                    let l = l as u16;
                    if self.leader().await == Some(l) {
                        return Ok(l);
                    }
                }
            }
            if Instant::now() > until {
                bail!(
                    "the nodes do not agree on a leader after {DEADLINE:?}: {}",
                    self.views().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until node `k` has applied everything the leader had applied when this
    /// was called.
    pub async fn wait_caught_up(&self, k: u16) -> anyhow::Result<()> {
        let leader = self.wait_leader().await?;
        let target = self.group(leader).await?["applied_index"]
            .as_u64()
            .context("no applied_index")?;
        self.wait_applied(k, target).await
    }

    /// Waits until node `k` has applied at least `index`.
    pub async fn wait_applied(&self, k: u16, index: u64) -> anyhow::Result<()> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Ok(g) = self.group(k).await {
                if g["applied_index"].as_u64().unwrap_or(0) >= index {
                    return Ok(());
                }
            }
            if Instant::now() > until {
                bail!(
                    "node {k} did not apply index {index} within {DEADLINE:?}: {}",
                    self.views().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    // -----------------------------------------------------------------------------
    // Clients.

    /// Mints a service token with `herald token`.
    pub fn service_token(&self, name: &str) -> anyhow::Result<String> {
        self.mint(&["--service", name])
    }

    /// Mints a user token with `herald token`.
    pub fn user_token(&self, user: u64) -> anyhow::Result<String> {
        self.mint(&["--user", &user.to_string()])
    }

    fn mint(&self, who: &[&str]) -> anyhow::Result<String> {
        crate::mint_token(&self.secret_path(), who)
    }

    /// A client config with `token` and the seeds `seeds` (node ids, in that order):
    /// the settings of [`test_client_config`] (reconnect backoff 50 ms .. 1 s, requests
    /// wait up to 20 s, QUIC idle timeout 5 s so a client notices a `kill -9`ed node).
    pub fn client_config(
        &self,
        token: &str,
        seeds: &[u16],
    ) -> anyhow::Result<herald_client::ClientConfig> {
        test_client_config(self.addrs_of(seeds), &self.ca_path(), token)
    }

    /// A `herald` CLI command aimed at node `k` (`HERALD_ADDR` its QUIC address,
    /// `HERALD_ADMIN` its admin address), authenticated with `token`.
    pub fn cli(&self, k: u16, token: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(herald_binary()?);
        cmd.env("HERALD_ADDR", self.addr(k).to_string())
            .env("HERALD_ADMIN", self.admin_addr(k).to_string())
            .env("HERALD_CA", self.ca_path())
            .env("HERALD_TOKEN", token)
            .env("RUST_LOG", "warn");
        Ok(cmd)
    }

    // -----------------------------------------------------------------------------
    // Logs.

    /// The last `lines` lines of node `k`'s stderr log.
    pub fn log_tail(&self, k: u16, lines: usize) -> String {
        tail(&read_from(&self.log_path(k), 0), lines)
    }

    /// The tail of every node's log, headed by the node, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        // Every node that ever ran (removed and joining ones too).
        let written = self.nodes().len() as u16;
        for k in (1..=written).filter(|k| self.log_path(*k).exists()) {
            out.push_str(&format!(
                "----- node {k} ({}) -----\n{}\n",
                self.log_path(k).display(),
                self.log_tail(k, LOG_TAIL_LINES)
            ));
        }
        out
    }

    /// Keeps the cluster directory (logs, data) after the drop, e.g. to debug a test.
    pub fn keep_dir(&self) {
        self.keep_dir.store(true, Ordering::Relaxed);
    }

    /// `e` with the tail of every node's log attached; the cluster directory (whole
    /// logs, data) is kept for a post-mortem and named in the message.
    pub fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        self.keep_dir.store(true, Ordering::Relaxed);
        anyhow!(
            "{e:?}\n\nnode logs (tail; whole logs and data kept in {}):\n{}",
            self.dir.display(),
            self.logs_tail()
        )
    }

    /// Passes `result` through, attaching the node logs to an error: end a test with
    /// `cluster.finish(body(&cluster).await)`.
    pub fn finish<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        result.map_err(|e| self.with_logs(e))
    }
}

impl Nodes for Cluster {
    fn ids(&self) -> Vec<u16> {
        Cluster::ids(self)
    }

    fn addr(&self, k: u16) -> SocketAddr {
        Cluster::addr(self, k)
    }

    fn client_config(
        &self,
        token: &str,
        seeds: &[u16],
    ) -> anyhow::Result<herald_client::ClientConfig> {
        Cluster::client_config(self, token, seeds)
    }

    fn service_token(&self, name: &str) -> anyhow::Result<String> {
        Cluster::service_token(self, name)
    }

    fn user_token(&self, user: u64) -> anyhow::Result<String> {
        Cluster::user_token(self, user)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_dir.store(true, Ordering::Relaxed);
            eprintln!(
                "node logs (tail; whole logs and data kept in {}):\n{}",
                self.dir.display(),
                self.logs_tail()
            );
        }
        let mut nodes = self.nodes();
        for node in nodes.iter_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        drop(nodes);
        if self.keep_dir.load(Ordering::Relaxed) {
            if let Some(dir) = self.tempdir.take() {
                let _ = dir.keep();
            }
        }
    }
}

/// GET `path` from an admin HTTP address: (status code, body). Bounded by 2 s, so a
/// paused node makes it fail rather than hang.
pub async fn admin_get_at(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let response = tokio::time::timeout(ADMIN_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    })
    .await
    .with_context(|| format!("{addr}{path} did not answer within {ADMIN_TIMEOUT:?}"))??;
    crate::parse_http_response(&String::from_utf8_lossy(&response))
}

/// A base port P such that, for K = 1..=n, UDP P+10(K-1) and TCP P+10(K-1)+1 are free
/// on loopback. Starts at a pseudo-random place (process id, time, a counter) so that
/// tests running at once rarely probe the same range.
fn free_port_range(n: u16) -> anyhow::Result<u16> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let span = 10 * u32::from(n);
    let slots = (PORT_RANGE.end - PORT_RANGE.start) / span;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919));
    for attempt in 0..PORT_ATTEMPTS as u32 {
        let slot = seed.wrapping_add(attempt.wrapping_mul(104_729)) % slots;
        let base = PORT_RANGE.start + slot * span;
        let Ok(base) = u16::try_from(base) else {
            continue;
        };
        if ports_free(base, n) {
            return Ok(base);
        }
    }
    bail!("no free range of {n} port pairs found in {PORT_RANGE:?} after {PORT_ATTEMPTS} tries")
}

fn ports_free(base: u16, n: u16) -> bool {
    (0..n).all(|i| {
        let quic = base + 10 * i;
        std::net::UdpSocket::bind(("127.0.0.1", quic)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", quic + 1)).is_ok()
    })
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The last `lines` lines of `text`, each cut to 400 bytes.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| {
            let mut end = l.len().min(400);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            &l[..end]
        })
        .collect::<Vec<_>>()
        .join("\n")
}
