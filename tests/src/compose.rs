//! The 3-node Docker Compose cluster of `deploy/compose`, driven from a test.
//!
//! Owns: bringing the cluster up fresh with `deploy/compose/up.sh` (which builds the
//! image and the static binary first, writes `deploy/compose/generated/` and waits
//! for every `/readyz`) and tearing it down with `down.sh --volumes` (also on drop,
//! pass or fail); the host ports of each node; tokens minted from
//! `generated/secret` with `herald token` (the static binary the image holds); the
//! faults — `docker kill`, `docker compose start`, `docker compose stop -t GRACE`
//! (SIGTERM, then SIGKILL after the grace), `docker network disconnect`/`connect`;
//! reading each node's `/readyz` and `/cluster`; and each container's `docker logs`
//! for failure messages. Must not: sleep to synchronise (every wait polls a condition
//! with a deadline), or leave containers, the network or the volumes behind
//! (`HERALD_TEST_KEEP_CONTAINERS=1` keeps them, to debug).
//!
//! The compose project is `herald` unless `COMPOSE_PROJECT_NAME` says otherwise, and
//! the compose command is `docker compose` when that works, else `docker-compose`
//! (as `deploy/compose/lib.sh` picks). The host ports are fixed, so bringing this
//! cluster up replaces any compose cluster of `deploy/compose` already running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::cluster::admin_get_at;
use crate::shards::{group_of, leaders_in, wait_until_led, GroupInfo};
use crate::target::{test_client_config, Nodes};
use crate::DEADLINE;

/// Nodes in the compose file.
pub const NODES: u16 = 3;
/// Bound on one `docker` / compose command that is not a stop (a stop adds its grace).
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on `up.sh`: it may build the static binary and the image first.
const UP_TIMEOUT: Duration = Duration::from_secs(1800);
/// Lines of each container's log shown in a failure message.
const LOG_TAIL_LINES: usize = 60;
/// How long the leaders may take to get back to their preferred nodes after a node
/// rejoined: the leader balancer hands one group per node every 2 s, and after a
/// partition heals it took up to 28 s in runs on 2 cores.
pub const BALANCE_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(50);

/// How a stopped container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The container's exit code (0: the process exited cleanly on its own; 137: it
    /// was killed with SIGKILL).
    pub code: i64,
    /// From the stop command until the container had exited.
    pub took: Duration,
}

/// One node's container, as found after `up`.
#[derive(Debug, Clone)]
struct Container {
    id: String,
    name: String,
    /// The compose network it is attached to, and its aliases there (given back on
    /// reconnect, so peers find it by service name again).
    network: String,
    aliases: Vec<String>,
}

/// The running compose cluster; `down.sh --volumes` on drop.
pub struct Compose {
    root: PathBuf,
    here: PathBuf,
    project: String,
    compose: Vec<String>,
    herald: PathBuf,
    containers: Vec<Container>,
    /// Full logs are written here when a failure asks for them.
    logs_dir: Mutex<Option<PathBuf>>,
}

/// Fails with a clear message unless a Docker engine answers and a compose command
/// is installed.
pub async fn require_docker() -> anyhow::Result<()> {
    let info = run_output(
        tokio::process::Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        DOCKER_TIMEOUT,
    )
    .await;
    match info {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "HERALD_CONTAINER_TESTS=1 but no Docker engine answers `docker info`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("HERALD_CONTAINER_TESTS=1 but `docker` cannot be run: {e:#}"),
    }
    compose_command()
        .await
        .map(|_| ())
        .context("HERALD_CONTAINER_TESTS=1 but Compose is missing")
}

/// `docker compose` if it works, else `docker-compose` (as lib.sh picks).
async fn compose_command() -> anyhow::Result<Vec<String>> {
    let plugin = run_output(
        tokio::process::Command::new("docker").args(["compose", "version"]),
        DOCKER_TIMEOUT,
    )
    .await;
    if plugin.is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    let standalone = run_output(
        tokio::process::Command::new("docker-compose").arg("version"),
        DOCKER_TIMEOUT,
    )
    .await;
    if standalone.is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!("neither `docker compose` nor `docker-compose` is installed")
}

/// Runs `cmd` (stdin closed, output captured), killed after `timeout`.
async fn run_output(
    cmd: &mut tokio::process::Command,
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    let what = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("cannot run {what}"))?;
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{what} did not finish within {timeout:?}"))?
        .with_context(|| format!("waiting for {what}"))
}

/// Runs `cmd`; its stdout, or an error with its stderr unless it exits 0.
async fn run_ok(cmd: &mut tokio::process::Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{:?}", cmd.as_std());
    let out = run_output(cmd, timeout).await?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Compose {
    /// Tears down whatever an earlier run left (`down.sh --volumes`), then runs
    /// `deploy/compose/up.sh`: builds the static binary and `herald:latest` (cargo and
    /// docker redo only what changed), writes fresh cluster material and starts the
    /// three nodes, waiting until each is ready. The returned guard tears it all down
    /// again when dropped.
    pub async fn up() -> anyhow::Result<Compose> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the tests crate has no parent directory")?
            .to_owned();
        let here = root.join("deploy/compose");
        let herald = std::env::var_os("HERALD_BIN").map_or_else(
            || root.join("target/static/x86_64-unknown-linux-gnu/release/herald"),
            PathBuf::from,
        );
        let project =
            std::env::var("COMPOSE_PROJECT_NAME").unwrap_or_else(|_| String::from("herald"));
        let mut compose = compose_command().await?;
        compose.extend([
            "-p".into(),
            project.clone(),
            "-f".into(),
            here.join("compose.yaml").display().to_string(),
        ]);
        let mut cluster = Compose {
            root,
            here,
            project,
            compose,
            herald,
            containers: Vec::new(),
            logs_dir: Mutex::new(None),
        };
        // Never reuse a previous run's data or CA (the guard above also tears this
        // run down, however `up.sh` ends).
        let _ = cluster.down_script().await;
        let started = Instant::now();
        let up = run_output(
            tokio::process::Command::new(cluster.here.join("up.sh")).current_dir(&cluster.root),
            UP_TIMEOUT,
        )
        .await?;
        let stdout = String::from_utf8_lossy(&up.stdout);
        if !up.status.success() {
            bail!(
                "deploy/compose/up.sh failed ({}):\n{stdout}{}",
                up.status,
                String::from_utf8_lossy(&up.stderr)
            );
        }
        for line in stdout.lines().filter(|l| l.contains("ready after")) {
            println!("{}", line.trim());
        }
        println!(
            "compose cluster up (project {}) in {:.1} s",
            cluster.project,
            started.elapsed().as_secs_f64()
        );
        anyhow::ensure!(
            cluster.herald.is_file(),
            "{} does not exist after up.sh (HERALD_BIN names another)",
            cluster.herald.display()
        );
        for k in 1..=NODES {
            let container = cluster.find_container(k).await?;
            cluster.containers.push(container);
        }
        cluster.wait_all_ready().await?;
        Ok(cluster)
    }

    async fn find_container(&self, k: u16) -> anyhow::Result<Container> {
        let ps = self.compose_cmd(&["ps", "-q", &format!("node{k}")]).await?;
        let id = ps
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .with_context(|| format!("`compose ps -q node{k}` names no container"))?
            .to_owned();
        let inspect = run_ok(
            tokio::process::Command::new("docker").args(["inspect", &id]),
            DOCKER_TIMEOUT,
        )
        .await?;
        let value: serde_json::Value = serde_json::from_str(&inspect)
            .with_context(|| format!("docker inspect {id}: {inspect}"))?;
        let c = &value[0];
        let name = c["Name"]
            .as_str()
            .context("docker inspect: no Name")?
            .trim_start_matches('/')
            .to_owned();
        let networks = c["NetworkSettings"]["Networks"]
            .as_object()
            .context("docker inspect: no NetworkSettings.Networks")?;
        anyhow::ensure!(
            networks.len() == 1,
            "node{k} ({name}) is on {} networks ({:?}), expected the compose network only",
            networks.len(),
            networks.keys().collect::<Vec<_>>()
        );
        let (network, endpoint) = networks
            .iter()
            .next()
            .context("docker inspect: no network")?;
        let short_id: String = id.chars().take(12).collect();
        let aliases = endpoint["Aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            // Docker adds the short container id by itself.
            .filter(|a| *a != short_id)
            .map(str::to_owned)
            .collect();
        Ok(Container {
            id,
            name,
            network: network.clone(),
            aliases,
        })
    }

    fn container(&self, k: u16) -> &Container {
        match usize::from(k)
            .checked_sub(1)
            .and_then(|i| self.containers.get(i))
        {
            Some(c) => c,
            None => panic!("no node {k} in the {NODES}-node compose cluster"),
        }
    }

    /// Node `k`'s container name (e.g. `herald_node1_1`, or `herald-node1-1` with the
    /// compose plugin).
    pub fn container_name(&self, k: u16) -> &str {
        &self.container(k).name
    }

    /// The compose network the nodes share.
    pub fn network(&self) -> &str {
        &self.container(1).network
    }

    /// Node `k`'s admin HTTP address on the host.
    pub fn admin_addr(&self, k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7501 + 10 * k))
    }

    /// The CA file clients trust (`generated/ca.pem`).
    pub fn ca_path(&self) -> PathBuf {
        self.here.join("generated/ca.pem")
    }

    /// The token secret file (`generated/secret`).
    pub fn secret_path(&self) -> PathBuf {
        self.here.join("generated/secret")
    }

    async fn compose_cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        self.compose_cmd_within(args, DOCKER_TIMEOUT).await
    }

    async fn compose_cmd_within(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let (program, rest) = self
            .compose
            .split_first()
            .context("empty compose command")?;
        run_ok(
            tokio::process::Command::new(program)
                .args(rest)
                .args(args)
                .current_dir(&self.root),
            timeout,
        )
        .await
    }

    async fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(
            tokio::process::Command::new("docker").args(args),
            DOCKER_TIMEOUT,
        )
        .await
    }

    async fn down_script(&self) -> anyhow::Result<String> {
        run_ok(
            tokio::process::Command::new(self.here.join("down.sh"))
                .arg("--volumes")
                .current_dir(&self.root),
            DOCKER_TIMEOUT * 2,
        )
        .await
    }

    // -----------------------------------------------------------------------------
    // Faults.

    /// `docker kill` node `k`'s container (SIGKILL: no drain, no close sent).
    pub async fn kill(&self, k: u16) -> anyhow::Result<()> {
        self.docker(&["kill", &self.container(k).id])
            .await
            .map(|_| ())
    }

    /// `compose stop -t GRACE nodeK`: SIGTERM, then SIGKILL if the node has not exited
    /// after `grace`. Returns how the container ended and how long the stop took.
    pub async fn stop(&self, k: u16, grace: Duration) -> anyhow::Result<Exit> {
        let started = Instant::now();
        self.compose_cmd_within(
            &[
                "stop",
                "-t",
                &grace.as_secs().to_string(),
                &format!("node{k}"),
            ],
            DOCKER_TIMEOUT + grace,
        )
        .await?;
        let code = self.wait_exited(k).await?;
        Ok(Exit {
            code,
            took: started.elapsed(),
        })
    }

    /// `compose start nodeK` (the same container, volume and config), without waiting
    /// for it to be ready (see [`Compose::wait_ready`]).
    pub async fn start(&self, k: u16) -> anyhow::Result<()> {
        self.compose_cmd(&["start", &format!("node{k}")])
            .await
            .map(|_| ())
    }

    /// Cuts node `k`'s container off the compose network (`docker network
    /// disconnect`): its peers, and the host through its published ports, reach it no
    /// more; the process keeps running.
    pub async fn disconnect(&self, k: u16) -> anyhow::Result<()> {
        let c = self.container(k);
        self.docker(&["network", "disconnect", &c.network, &c.id])
            .await
            .map(|_| ())
    }

    /// Attaches node `k`'s container to the compose network again, with the aliases
    /// it had (its service name among them), so peers reach it as `nodeK` again.
    pub async fn connect(&self, k: u16) -> anyhow::Result<()> {
        let c = self.container(k);
        let mut args = vec!["network", "connect"];
        for alias in &c.aliases {
            args.extend(["--alias", alias.as_str()]);
        }
        args.extend([c.network.as_str(), c.id.as_str()]);
        self.docker(&args).await.map(|_| ())
    }

    /// `docker inspect` of node `k`'s container: (running, exit code).
    pub async fn state(&self, k: u16) -> anyhow::Result<(bool, i64)> {
        let out = self
            .docker(&[
                "inspect",
                "--format",
                "{{.State.Running}} {{.State.ExitCode}}",
                &self.container(k).id,
            ])
            .await?;
        let mut parts = out.split_whitespace();
        let running = parts.next() == Some("true");
        let code = parts
            .next()
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("docker inspect state of node{k}: {out:?}"))?;
        Ok((running, code))
    }

    /// Waits until node `k`'s container has exited; returns its exit code.
    pub async fn wait_exited(&self, k: u16) -> anyhow::Result<i64> {
        let until = Instant::now() + DEADLINE;
        loop {
            let (running, code) = self.state(k).await?;
            if !running {
                return Ok(code);
            }
            if Instant::now() > until {
                bail!("node {k}'s container still runs {DEADLINE:?} after it was stopped");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // -----------------------------------------------------------------------------
    // Observing.

    /// GET `path` on node `k`'s admin port: (status code, body); fails within 2 s.
    pub async fn admin_get(&self, k: u16, path: &str) -> anyhow::Result<(u16, String)> {
        admin_get_at(self.admin_addr(k), path).await
    }

    /// True when node `k`'s `/readyz` answers 200.
    pub async fn is_ready(&self, k: u16) -> bool {
        matches!(self.admin_get(k, "/readyz").await, Ok((200, _)))
    }

    /// Waits until node `k` answers 200 on `/readyz` (joined, caught up, accepting
    /// sessions); fails after [`DEADLINE`] with its container state and log.
    pub async fn wait_ready(&self, k: u16) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let until = started + DEADLINE;
        loop {
            if self.is_ready(k).await {
                return Ok(started.elapsed());
            }
            if Instant::now() > until {
                let state = self.state(k).await.map_or_else(
                    |e| format!("{e:#}"),
                    |(running, code)| format!("running {running}, exit code {code}"),
                );
                bail!(
                    "node {k} ({}) not ready after {DEADLINE:?} (container {state}); views: {}",
                    self.container_name(k),
                    self.views().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every node is ready and every group has a leader.
    pub async fn wait_all_ready(&self) -> anyhow::Result<()> {
        for k in 1..=NODES {
            self.wait_ready(k).await?;
        }
        let groups = self.groups().await?.len();
        self.wait_every_group_led(groups).await.map(|_| ())
    }

    /// Node `k`'s `/cluster` JSON.
    pub async fn status(&self, k: u16) -> anyhow::Result<serde_json::Value> {
        let (code, body) = self.admin_get(k, "/cluster").await?;
        anyhow::ensure!(code == 200, "node {k} /cluster answered {code}: {body}");
        serde_json::from_str(&body).with_context(|| format!("node {k} /cluster: {body}"))
    }

    /// The data groups of the map, from the first node that answers.
    pub async fn groups(&self) -> anyhow::Result<Vec<GroupInfo>> {
        for k in 1..=NODES {
            let Ok(status) = self.status(k).await else {
                continue;
            };
            let mut groups = Vec::new();
            for g in status["groups"].as_array().into_iter().flatten() {
                let replicas = g["replicas"]
                    .as_array()
                    .context("a group without replicas")?
                    .iter()
                    .filter_map(|r| r.as_u64().and_then(|r| u16::try_from(r).ok()))
                    .collect();
                let slot = |i: usize| g["slots"][i].as_u64().and_then(|s| u32::try_from(s).ok());
                groups.push(GroupInfo {
                    id: g["id"].as_u64().context("a group without an id")?,
                    replicas,
                    slots: slot(0).context("no slots")?..slot(1).context("no slots")?,
                });
            }
            return Ok(groups);
        }
        bail!("no node answered /cluster")
    }

    /// The leader of every group, as the nodes that answer see it: for each group,
    /// the node that reports itself its `Leader` with the highest term.
    pub async fn group_leaders(&self) -> BTreeMap<u64, u16> {
        let mut views = Vec::new();
        for k in 1..=NODES {
            if let Ok(status) = self.status(k).await {
                views.push((k, status));
            }
        }
        leaders_in(&views)
    }

    /// Waits until every one of the `groups` data groups has a leader; returns them.
    pub async fn wait_every_group_led(&self, groups: usize) -> anyhow::Result<BTreeMap<u64, u16>> {
        wait_until_led(groups, POLL, || self.group_leaders()).await
    }

    /// The group that owns conversation `conv` and the node leading it (waits until
    /// it has a leader).
    pub async fn leader_of(&self, conv: u64) -> anyhow::Result<(u64, u16)> {
        let groups = self.groups().await?;
        let group = group_of(&groups, conv)
            .with_context(|| format!("no group owns conversation {conv}: {groups:?}"))?
            .id;
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(k) = self.group_leaders().await.get(&group) {
                return Ok((group, *k));
            }
            if Instant::now() > until {
                bail!(
                    "group {group} (conversation {conv}) has no leader after {DEADLINE:?}; views: {}",
                    self.views().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every group is led by its preferred leader (the first of its
    /// replicas): the cluster's own leader balance is back after a node rejoined.
    /// Bounded by [`BALANCE_DEADLINE`]; returns how long it took.
    pub async fn wait_preferred_leaders(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let until = started + BALANCE_DEADLINE;
        loop {
            let groups = self.groups().await?;
            let leaders = self.group_leaders().await;
            let off: Vec<String> = groups
                .iter()
                .filter(|g| leaders.get(&g.id) != g.replicas.first())
                .map(|g| {
                    format!(
                        "group {} led by {:?}, preferred {:?}",
                        g.id,
                        leaders.get(&g.id),
                        g.replicas.first()
                    )
                })
                .collect();
            if off.is_empty() {
                return Ok(started.elapsed());
            }
            if Instant::now() > until {
                bail!(
                    "after {BALANCE_DEADLINE:?} not every group is led by its preferred leader: {}",
                    off.join("; ")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Groups led per node, as the nodes see it now.
    pub async fn leaders_per_node(&self) -> BTreeMap<u16, usize> {
        let mut per_node: BTreeMap<u16, usize> = (1..=NODES).map(|k| (k, 0)).collect();
        for k in self.group_leaders().await.values() {
            *per_node.entry(*k).or_default() += 1;
        }
        per_node
    }

    /// Every node's view in one line, for failure messages: ready, and per group
    /// state/leader/term.
    pub async fn views(&self) -> String {
        let mut out = Vec::new();
        for k in 1..=NODES {
            match self.status(k).await {
                Ok(s) => {
                    let groups: Vec<String> = s["groups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|g| {
                            format!(
                                "g{}:{}/leader {}/term {}",
                                g["id"], g["state"], g["leader"], g["term"]
                            )
                        })
                        .collect();
                    out.push(format!("node {k}: {}", groups.join(" ")));
                }
                Err(e) => out.push(format!("node {k}: {e:#}")),
            }
        }
        out.join("; ")
    }

    /// The last `lines` lines of node `k`'s container log (stdout and stderr).
    pub async fn log_tail(&self, k: u16, lines: usize) -> String {
        self.logs(k, Some(lines)).await
    }

    async fn logs(&self, k: u16, lines: Option<usize>) -> String {
        let Some(c) = self.containers.get(usize::from(k).saturating_sub(1)) else {
            return String::from("(no container)");
        };
        let mut cmd = tokio::process::Command::new("docker");
        cmd.arg("logs");
        if let Some(n) = lines {
            cmd.args(["--tail", &n.to_string()]);
        }
        cmd.arg(&c.id);
        match run_output(&mut cmd, DOCKER_TIMEOUT).await {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker logs failed: {e:#})"),
        }
    }

    /// Writes every container's whole log to a directory kept after the run; returns
    /// it.
    async fn save_logs(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = lock(&self.logs_dir).clone() {
            return Ok(dir);
        }
        let dir = tempfile::Builder::new()
            .prefix("herald-compose-logs-")
            .tempdir()?
            .keep();
        for k in 1..=NODES {
            std::fs::write(dir.join(format!("node{k}.log")), self.logs(k, None).await)?;
        }
        *lock(&self.logs_dir) = Some(dir.clone());
        Ok(dir)
    }

    /// `e` with the tail of every container's log attached (and the whole logs saved
    /// to a directory named in the message, since the containers go on drop).
    pub async fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        let saved = self.save_logs().await.map_or_else(
            |e| format!("(cannot save the logs: {e:#})"),
            |d| d.display().to_string(),
        );
        let mut tails = String::new();
        for k in 1..=NODES {
            tails.push_str(&format!(
                "----- node {k} ({}) -----\n{}\n",
                self.containers
                    .get(usize::from(k) - 1)
                    .map_or("?", |c| c.name.as_str()),
                self.log_tail(k, LOG_TAIL_LINES).await
            ));
        }
        anyhow!("{e:?}\n\ncontainer logs (tail; whole logs saved in {saved}):\n{tails}")
    }

    /// Passes `result` through, attaching the container logs to an error: end a test
    /// with `cluster.finish(body(&cluster).await).await`.
    pub async fn finish<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => Err(self.with_logs(e).await),
        }
    }
}

impl Nodes for Compose {
    fn ids(&self) -> Vec<u16> {
        (1..=NODES).collect()
    }

    /// `127.0.0.1:75K0`, the port compose.yaml publishes for node K.
    fn addr(&self, k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7500 + 10 * k))
    }

    fn client_config(
        &self,
        token: &str,
        seeds: &[u16],
    ) -> anyhow::Result<herald_client::ClientConfig> {
        let addrs = seeds.iter().map(|k| self.addr(*k).to_string()).collect();
        test_client_config(addrs, &self.ca_path(), token)
    }

    fn service_token(&self, name: &str) -> anyhow::Result<String> {
        crate::mint_token_with(&self.herald, &self.secret_path(), &["--service", name])
    }

    fn user_token(&self, user: u64) -> anyhow::Result<String> {
        crate::mint_token_with(
            &self.herald,
            &self.secret_path(),
            &["--user", &user.to_string()],
        )
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        // Blocking commands: the runtime may be gone by now.
        if std::thread::panicking() {
            for (i, c) in self.containers.iter().enumerate() {
                let log = std::process::Command::new("docker")
                    .args(["logs", "--tail", &LOG_TAIL_LINES.to_string(), &c.id])
                    .output()
                    .map_or_else(
                        |e| format!("(docker logs failed: {e})"),
                        |o| {
                            format!(
                                "{}{}",
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            )
                        },
                    );
                eprintln!("----- node {} ({}) -----\n{log}", i + 1, c.name);
            }
        }
        if std::env::var_os("HERALD_TEST_KEEP_CONTAINERS").is_some() {
            eprintln!(
                "HERALD_TEST_KEEP_CONTAINERS: the compose cluster (project {}) is left running; deploy/compose/down.sh --volumes removes it",
                self.project
            );
            return;
        }
        let down = std::process::Command::new(self.here.join("down.sh"))
            .arg("--volumes")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output();
        match down {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "deploy/compose/down.sh --volumes failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run deploy/compose/down.sh: {e}"),
        }
    }
}
