//! Node configuration: the TOML file, `HERALD_*` environment overrides, and checks.
//!
//! Owns: the [`Config`] type with its documented defaults, loading (file → env → flags,
//! applied by the caller), unknown-key warnings and `checkconfig` validation.
//! Must not: open sockets or files other than the config file itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the schema.
    #[error("config {origin} is not valid: {reason}")]
    Parse {
        /// File name or `HERALD_*` variable.
        origin: String,
        /// The parser's message (with line and column for files).
        reason: String,
    },
    /// Values parse but make no sense together; every problem is listed.
    #[error("config has {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A node's whole configuration. Every field has a default (`herald defaultconfig`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// UDP address for QUIC (clients; later also peers).
    pub listen: SocketAddr,
    /// TCP address for admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/cluster`).
    pub admin_listen: SocketAddr,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// Threads of the node's async runtime; 0 means one per core. Set it when nodes
    /// share a machine's cores (`herald dev-cluster` writes cores ÷ nodes, at least 1):
    /// measured on 2 cores with 3 nodes, the default two workers each spent twice the
    /// CPU per acked publish that one worker each did (stealing and parking), and
    /// acked half as many. Read once, at start (`herald serve`).
    pub worker_threads: usize,
    /// TLS certificate and key of this node.
    pub tls: TlsConfig,
    /// How tokens are verified.
    pub auth: AuthConfig,
    /// Limits; each says what happens when it is reached.
    pub limits: Limits,
    /// Cluster membership and peer authentication.
    pub cluster: ClusterConfig,
    /// Raft timing, snapshots and the log store.
    pub raft: RaftConfig,
    /// Graceful shutdown (SIGTERM, `herald drain`).
    pub drain: DrainConfig,
}

/// How a node drains before it stops (on SIGTERM or `herald drain`): it stops taking
/// new sessions and reports not ready, hands the leadership of every group it leads
/// to a caught-up replica, tells each session to move to another node at a random
/// moment within `sessions_spread`, waits for them to go, and stops. Whatever is left
/// when `timeout` ends is closed (clients then reconnect on their own).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DrainConfig {
    /// The whole drain takes at most this long. An orchestrator's grace period must
    /// be longer (Kubernetes: `terminationGracePeriodSeconds` ≥ this + 20 s).
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Sessions are told to reconnect elsewhere at a random moment within this
    /// window, so that 100 k sessions do not reconnect at once. Must be shorter
    /// than `timeout`.
    #[serde(with = "humantime_serde_compat")]
    pub sessions_spread: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            timeout: Duration::from_secs(30),
            sessions_spread: Duration::from_secs(10),
        }
    }
}

/// Who is in the cluster and how nodes trust each other.
///
/// The node with the lowest id in `members` initializes the cluster on its first boot
/// (empty log); every other node waits to be contacted. A node restarts from its data
/// directory afterwards. With `members` empty the node is a one-node cluster of itself
/// (`herald dev`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster, at least 1.
    pub node_id: u64,
    /// The initial voters, `"ID=HOST:PORT"` each (the QUIC address peers dial).
    pub members: Vec<String>,
    /// The shared cluster secret (peers prove they know it). Empty: the token secret
    /// file is used (fine for a one-node cluster).
    pub secret_file: PathBuf,
    /// The CA that signed every node's certificate (peers verify each other with it).
    /// Empty: `dev/ca.pem` under the data directory.
    pub ca_file: PathBuf,
    /// Data groups (Raft groups that hold conversations), fixed when the cluster is
    /// created. 0: four per member (four for a one-node cluster), so every node leads
    /// several. Every node must use the same value.
    pub groups: u32,
    /// Replicas per data group (capped at the number of members). Every node must use
    /// the same value.
    pub replication_factor: u32,
    /// This node joins a running cluster instead of forming one: it never initializes
    /// a group and waits until an operator adds it (`herald cluster add-node`); its id
    /// must not be among `members`, which may then be empty.
    pub join: bool,
    /// Take the node id from the host name instead of `node_id`: one more than the
    /// number after its last `-` (a Kubernetes StatefulSet's pod `herald-2` is node 3).
    pub node_id_from_ordinal: bool,
}

/// Data groups per member when `cluster.groups` is 0.
pub const GROUPS_PER_MEMBER_DEFAULT: u32 = 4;

impl ClusterConfig {
    /// The data group count: `groups`, or four per member when 0.
    pub fn group_count(&self) -> u32 {
        if self.groups > 0 {
            return self.groups;
        }
        let members = u32::try_from(self.members.len().max(1)).unwrap_or(u32::MAX);
        members.saturating_mul(GROUPS_PER_MEMBER_DEFAULT)
    }
}

/// Raft tuning and the log store. Every node of a cluster should use the same values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RaftConfig {
    /// How often the leader heartbeats followers.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// Election timing. openraft first honours the leader's lease, which lasts
    /// `election_timeout_max` from the last heartbeat, and then waits a random time
    /// between these (drawn once per start); so a follower starts an election after
    /// `max + random(min..max)` of silence (350–400 ms with the defaults, plus up to one
    /// of openraft's ticks of 1.5 heartbeats: 350–475 ms with 50 ms heartbeats), and a node that lost an election to a longer
    /// log waits another `2 × max`. openraft 0.9 forgets that loss only at its next
    /// election, so the `2 × max` can also hold back a node in a later failover, when it
    /// has the longest log: `max` is kept short (200 ms) so that this case, too, elects
    /// within about a second.
    #[serde(with = "humantime_serde_compat")]
    pub election_timeout_min: Duration,
    /// See `election_timeout_min`.
    #[serde(with = "humantime_serde_compat")]
    pub election_timeout_max: Duration,
    /// A write that cannot be committed (no leader, no quorum) for this long is refused
    /// with `Unavailable`; the client retries it with the same idempotency key.
    #[serde(with = "humantime_serde_compat")]
    pub write_timeout: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Roll the log to a new segment file beyond this size.
    pub log_segment_bytes_max: u64,
    /// Recent log entries kept decoded in memory (older ones are read from disk).
    pub log_cache_bytes_max: u64,
    /// Entries per append RPC to a follower.
    pub append_entries_max: u64,
    /// How often the leader proposes the retention trim and every node purges its log
    /// below the oldest message history still reads from it.
    #[serde(with = "humantime_serde_compat")]
    pub housekeeping_interval: Duration,
}

/// TLS files (PEM).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TlsConfig {
    /// Certificate chain presented to clients.
    pub cert_file: PathBuf,
    /// Private key of that certificate.
    pub key_file: PathBuf,
}

/// Token verification. Exactly one of `token_secret_file` (HS256) or
/// `token_public_key_file` (EdDSA / RS256, per `token_algorithm`) is used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AuthConfig {
    /// `HS256`, `EdDSA` or `RS256`.
    pub token_algorithm: String,
    /// HS256 secret (the file's bytes, surrounding whitespace trimmed).
    pub token_secret_file: PathBuf,
    /// Public key PEM for EdDSA / RS256.
    pub token_public_key_file: PathBuf,
}

/// Every bound of the node, with what happens at it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Limits {
    /// Largest message payload; larger publishes are refused (`PayloadTooLarge`). At most 1 MiB.
    pub payload_bytes_max: u32,
    /// Largest frame body; a larger length prefix closes the connection (`ProtocolError`).
    /// Must exceed `payload_bytes_max` by at least 1 KiB for the envelope.
    pub frame_bytes_max: u32,
    /// Deliveries queued per session; beyond it the session is told it lagged and is
    /// re-sent from history (nothing lost, nobody else slowed). The queue is allocated
    /// up front at 16 bytes per slot, so this is also 16 B × it of memory per session.
    pub session_queue_len_max: u32,
    /// How long a session's writer may stay blocked on a client that does not read before
    /// the connection is closed with `SlowConsumer` (it resyncs from its cursor on reconnect).
    #[serde(with = "humantime_serde_compat")]
    pub slow_consumer_timeout: Duration,
    /// Subscriptions per session; more are refused (`LimitReached`).
    pub subscriptions_per_session_max: u32,
    /// Open client connections per node; more are refused at the QUIC handshake.
    pub connections_max: u32,
    /// Handshakes in progress; beyond half of it, unvalidated clients get a QUIC Retry,
    /// beyond it new connection attempts are refused.
    pub handshakes_in_flight_max: u32,
    /// Time a new connection has to present a valid Hello before it is closed.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Members of a group; more are refused (`LimitReached`).
    pub group_members_max: u32,
    /// Conversations on this node; more creates are refused (`LimitReached`).
    pub conversations_max: u32,
    /// Messages kept per conversation; the oldest is evicted on append.
    pub history_messages_max: u32,
    /// Age after which messages are evicted from history.
    #[serde(with = "humantime_serde_compat")]
    pub history_retention: Duration,
    /// How long an idempotency key is remembered; a retry after that appends again.
    #[serde(with = "humantime_serde_compat")]
    pub dedup_window: Duration,
    /// Idempotency keys remembered per conversation; the oldest is forgotten first.
    pub dedup_keys_max: u32,
    /// Requests a client may have outstanding on one connection; the broker stops reading
    /// the connection's stream until replies drain.
    pub requests_in_flight_max: u32,
    /// Messages per history page (`herald history`, replay after subscribe).
    pub history_page_len_max: u32,
}

/// The most runtime threads a node may be given (far beyond any core count).
pub const WORKER_THREADS_MAX: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            data_dir: PathBuf::from("herald-data"),
            worker_threads: 0,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            cluster: ClusterConfig::default(),
            raft: RaftConfig::default(),
            drain: DrainConfig::default(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            members: Vec::new(),
            secret_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            groups: 0,
            replication_factor: 3,
            join: false,
            node_id_from_ordinal: false,
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(200),
            write_timeout: Duration::from_secs(10),
            snapshot_logs_since_last: 100_000,
            log_segment_bytes_max: 64 * 1024 * 1024,
            log_cache_bytes_max: 64 * 1024 * 1024,
            append_entries_max: 2048,
            housekeeping_interval: Duration::from_secs(60),
        }
    }
}

impl ClusterConfig {
    /// With `node_id_from_ordinal`, sets `node_id` from `hostname` (`herald-2` → 3).
    /// A node whose id is not among `members` (a StatefulSet scaled beyond its
    /// initial members) is a joining node: `join` is set for it.
    pub fn resolve_node_id(&mut self, hostname: &str) -> Result<(), String> {
        if !self.node_id_from_ordinal {
            return Ok(());
        }
        let hostname = hostname.trim();
        let ordinal = hostname
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "cluster.node_id_from_ordinal is set but the host name `{hostname}` does \
                     not end in -N (as a StatefulSet pod's does, e.g. herald-0)"
                )
            })?;
        self.node_id = ordinal
            .checked_add(1)
            .ok_or("the host name's ordinal is too large")?;
        let members = self.parsed_members()?;
        if !members.is_empty() && !members.iter().any(|(id, _)| *id == self.node_id) {
            self.join = true;
        }
        Ok(())
    }

    /// The initial voters as `(id, addr)`, parsed from `members`.
    pub fn parsed_members(&self) -> Result<Vec<(u64, String)>, String> {
        self.members
            .iter()
            .map(|m| {
                let (id, addr) = m
                    .split_once('=')
                    .ok_or_else(|| format!("cluster.members entry `{m}` is not `ID=HOST:PORT`"))?;
                let id: u64 = id.trim().parse().map_err(|_| {
                    format!(
                        "cluster.members entry `{m}`: `{id}` is not a node id (a positive integer)"
                    )
                })?;
                let addr = addr.trim();
                if id == 0 {
                    return Err(format!("cluster.members entry `{m}`: node ids start at 1"));
                }
                if !addr.contains(':') {
                    return Err(format!(
                        "cluster.members entry `{m}`: `{addr}` lacks a :PORT"
                    ));
                }
                Ok((id, addr.to_owned()))
            })
            .collect()
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: PathBuf::from("herald-data/dev/node.pem"),
            key_file: PathBuf::from("herald-data/dev/node.key"),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_algorithm: "HS256".into(),
            token_secret_file: PathBuf::from("herald-data/dev/secret"),
            token_public_key_file: PathBuf::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            payload_bytes_max: 64 * 1024,
            frame_bytes_max: herald_client::wire::DEFAULT_FRAME_BYTES_MAX,
            session_queue_len_max: 1024,
            slow_consumer_timeout: Duration::from_secs(10),
            subscriptions_per_session_max: 1000,
            connections_max: 100_000,
            handshakes_in_flight_max: 1024,
            handshake_timeout: Duration::from_secs(10),
            group_members_max: 10_000,
            conversations_max: 10_000_000,
            history_messages_max: 100_000,
            history_retention: Duration::from_secs(7 * 24 * 3600),
            dedup_window: Duration::from_secs(24 * 3600),
            dedup_keys_max: 100_000,
            requests_in_flight_max: 1024,
            history_page_len_max: 1000,
        }
    }
}

/// Durations in TOML are strings like `"10s"` or `"7days"` (humantime).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration: {e}")))
    }
}

impl Config {
    /// The defaults as commented TOML (`herald defaultconfig`).
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default())
            .unwrap_or_else(|e| format!("# cannot render defaults: {e}\n"));
        format!(
            "# Herald node configuration. Every key is optional; shown are the defaults.\n\
             # Any key can be overridden by an environment variable HERALD_<SECTION>_<KEY>,\n\
             # e.g. HERALD_LISTEN, HERALD_LIMITS_PAYLOAD_BYTES_MAX, HERALD_TLS_CERT_FILE.\n\n{body}"
        )
    }

    /// Reads `path`, then applies `HERALD_*` variables from `env`.
    /// Returns the config and warnings (unknown keys in the file or the environment).
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_and_env(&text, &path.display().to_string(), env)
    }

    /// Parses TOML text and applies `HERALD_*` overrides from `env`.
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        let mut warnings = Vec::new();
        let defaults =
            toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                origin: "defaults".into(),
                reason: e.to_string(),
            })?;
        let mut known = Vec::new();
        leaf_paths(&defaults, &mut Vec::new(), &mut known);
        let mut present = Vec::new();
        leaf_paths(&value, &mut Vec::new(), &mut present);
        for path in present.iter().filter(|p| !known.contains(p)) {
            warnings.push(format!(
                "{origin}: unknown key `{}` ignored (see `herald defaultconfig` for the keys)",
                path.join(".")
            ));
        }
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("HERALD_") else {
                continue;
            };
            let Some(path) = known.iter().find(|p| p.join("_").to_uppercase() == rest) else {
                if !CLIENT_ENV.contains(&name.as_str()) {
                    warnings.push(format!(
                        "environment variable {name} matches no config key; ignored"
                    ));
                }
                continue;
            };
            let parsed = parse_env_value(&raw, leaf(&defaults, path));
            set_leaf(&mut value, path, parsed);
        }
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        Ok((config, warnings))
    }

    /// Every problem with this config, or Ok.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.worker_threads > WORKER_THREADS_MAX {
            problems.push(format!(
                "worker_threads = {} is above {WORKER_THREADS_MAX} (0 means one per core)",
                self.worker_threads
            ));
        }
        let l = &self.limits;
        if l.payload_bytes_max == 0 || l.payload_bytes_max > 1024 * 1024 {
            problems.push(format!(
                "limits.payload_bytes_max = {} must be between 1 and 1048576 (1 MiB)",
                l.payload_bytes_max
            ));
        }
        if l.frame_bytes_max < l.payload_bytes_max.saturating_add(1024) {
            problems.push(format!(
                "limits.frame_bytes_max = {} must be at least payload_bytes_max + 1024 = {}",
                l.frame_bytes_max,
                l.payload_bytes_max.saturating_add(1024)
            ));
        }
        if l.frame_bytes_max > herald_client::wire::FRAME_BYTES_CEILING {
            problems.push(format!(
                "limits.frame_bytes_max = {} is above the ceiling of {}",
                l.frame_bytes_max,
                herald_client::wire::FRAME_BYTES_CEILING
            ));
        }
        for (name, v) in [
            ("session_queue_len_max", l.session_queue_len_max),
            (
                "subscriptions_per_session_max",
                l.subscriptions_per_session_max,
            ),
            ("connections_max", l.connections_max),
            ("handshakes_in_flight_max", l.handshakes_in_flight_max),
            ("group_members_max", l.group_members_max),
            ("conversations_max", l.conversations_max),
            ("history_messages_max", l.history_messages_max),
            ("dedup_keys_max", l.dedup_keys_max),
            ("requests_in_flight_max", l.requests_in_flight_max),
            ("history_page_len_max", l.history_page_len_max),
        ] {
            if v == 0 {
                problems.push(format!("limits.{name} must be at least 1"));
            }
        }
        if l.group_members_max < 2 {
            problems.push("limits.group_members_max must be at least 2".into());
        }
        for (name, d) in [
            ("slow_consumer_timeout", l.slow_consumer_timeout),
            ("handshake_timeout", l.handshake_timeout),
            ("history_retention", l.history_retention),
            ("dedup_window", l.dedup_window),
        ] {
            if d.is_zero() {
                problems.push(format!("limits.{name} must be longer than zero"));
            }
        }
        if self.cluster.node_id == 0 {
            problems.push("cluster.node_id must be at least 1".into());
        }
        if self.cluster.group_count() > crate::cluster_map::GROUPS_MAX {
            problems.push(format!(
                "cluster.groups = {} is above the maximum of {} (one group per slot)",
                self.cluster.group_count(),
                crate::cluster_map::GROUPS_MAX
            ));
        }
        if self.cluster.replication_factor == 0 {
            problems.push("cluster.replication_factor must be at least 1".into());
        }
        match self.cluster.parsed_members() {
            Err(problem) => problems.push(problem),
            Ok(members) if !members.is_empty() || self.cluster.join => {
                let listed = members.iter().any(|(id, _)| *id == self.cluster.node_id);
                if self.cluster.join && listed {
                    problems.push(format!(
                        "cluster.join is set but cluster.node_id = {} is among cluster.members \
                         (the initial members form the cluster; a joining node needs a new id)",
                        self.cluster.node_id
                    ));
                }
                if !self.cluster.join && !listed {
                    problems.push(format!(
                        "cluster.node_id = {} is not among cluster.members \
                         (set cluster.join = true for a node added to a running cluster)",
                        self.cluster.node_id
                    ));
                }
                let mut ids: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
                ids.sort_unstable();
                ids.dedup();
                if ids.len() != members.len() {
                    problems.push("cluster.members lists a node id twice".into());
                }
            }
            Ok(_) => {}
        }
        let r = &self.raft;
        // A follower waits `max + random(min..max)` (see RaftConfig), so `min` above one
        // heartbeat already means several missed heartbeats before an election.
        if r.heartbeat_interval.is_zero() || r.election_timeout_min <= r.heartbeat_interval {
            problems.push(format!(
                "raft.election_timeout_min ({:?}) must be more than raft.heartbeat_interval ({:?}), which must be above zero",
                r.election_timeout_min, r.heartbeat_interval
            ));
        }
        if r.election_timeout_max <= r.election_timeout_min {
            problems
                .push("raft.election_timeout_max must be above raft.election_timeout_min".into());
        }
        if r.housekeeping_interval.is_zero() {
            problems.push("raft.housekeeping_interval must be longer than zero".into());
        }
        if r.write_timeout.is_zero() {
            problems.push("raft.write_timeout must be longer than zero".into());
        }
        for (name, v) in [
            ("snapshot_logs_since_last", r.snapshot_logs_since_last),
            ("log_segment_bytes_max", r.log_segment_bytes_max),
            ("append_entries_max", r.append_entries_max),
        ] {
            if v == 0 {
                problems.push(format!("raft.{name} must be at least 1"));
            }
        }
        let d = &self.drain;
        if d.timeout.is_zero() || d.sessions_spread >= d.timeout {
            problems.push(format!(
                "drain.sessions_spread ({:?}) must be shorter than drain.timeout ({:?}), which must be above zero",
                d.sessions_spread, d.timeout
            ));
        }
        match self.auth.token_algorithm.as_str() {
            "HS256" => {
                if !self.auth.token_secret_file.is_file() {
                    problems.push(format!(
                        "auth.token_secret_file {} does not exist (HS256 needs a secret; `herald dev` creates one)",
                        self.auth.token_secret_file.display()
                    ));
                }
            }
            "EdDSA" | "RS256" => {
                if !self.auth.token_public_key_file.is_file() {
                    problems.push(format!(
                        "auth.token_public_key_file {} does not exist ({} needs a public key PEM)",
                        self.auth.token_public_key_file.display(),
                        self.auth.token_algorithm
                    ));
                }
            }
            other => problems.push(format!(
                "auth.token_algorithm = {other:?}: expected \"HS256\", \"EdDSA\" or \"RS256\""
            )),
        }
        for (name, path) in [
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
        ] {
            if !path.is_file() {
                problems.push(format!("{name} {} does not exist", path.display()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// `HERALD_*` variables read by client commands, not by the node config.
const CLIENT_ENV: &[&str] = &[
    "HERALD_TOKEN",
    "HERALD_TOKEN_FILE",
    "HERALD_ADDR",
    "HERALD_CA",
    "HERALD_ADMIN",
];

fn leaf_paths(table: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(t) => leaf_paths(t, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

fn leaf<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for p in parents {
        t = t.get(p)?.as_table()?;
    }
    t.get(last)
}

fn set_leaf(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        t = inner;
    }
    t.insert(last.clone(), value);
}

/// An environment value takes the type of the default it overrides.
fn parse_env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    match default {
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.to_owned())),
        Some(toml::Value::Boolean(_)) => raw
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .unwrap_or_else(|_| toml::Value::String(raw.to_owned())),
        // Lists come comma-separated: HERALD_CLUSTER_MEMBERS=1=a:7410,2=b:7410
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_back_to_the_defaults() {
        let (config, warnings) =
            Config::from_toml_and_env(&Config::default_toml(), "defaults", []).unwrap();
        assert_eq!(config, Config::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn env_overrides_file_and_takes_the_default_type() {
        let env = [
            (
                "HERALD_LIMITS_PAYLOAD_BYTES_MAX".to_string(),
                "1000".to_string(),
            ),
            ("HERALD_LISTEN".to_string(), "127.0.0.1:9000".to_string()),
            ("HERALD_LIMITS_DEDUP_WINDOW".to_string(), "5m".to_string()),
            ("HERALD_NO_SUCH_KEY".to_string(), "1".to_string()),
            ("HERALD_TOKEN".to_string(), "x".to_string()),
        ];
        let (config, warnings) =
            Config::from_toml_and_env("[limits]\npayload_bytes_max = 5\n", "test", env).unwrap();
        assert_eq!(config.limits.payload_bytes_max, 1000);
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(config.limits.dedup_window, Duration::from_secs(300));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("HERALD_NO_SUCH_KEY"));
    }

    #[test]
    fn unknown_keys_in_the_file_are_warned_with_their_name() {
        let (config, warnings) =
            Config::from_toml_and_env("[limits]\npayload_max = 5\n", "f.toml", []).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("limits.payload_max"), "{warnings:?}");
    }

    #[test]
    fn a_wrongly_typed_value_is_an_error_naming_the_key() {
        let err =
            Config::from_toml_and_env("[limits]\npayload_bytes_max = \"big\"\n", "f.toml", [])
                .unwrap_err()
                .to_string();
        assert!(err.contains("payload_bytes_max"), "{err}");
    }

    #[test]
    fn worker_threads_come_from_the_file_or_the_environment_and_are_bounded() {
        let (config, _) = Config::from_toml_and_env("worker_threads = 1\n", "f.toml", []).unwrap();
        assert_eq!(config.worker_threads, 1);
        let env = [("HERALD_WORKER_THREADS".to_string(), "3".to_string())];
        let (config, warnings) = Config::from_toml_and_env("", "f.toml", env).unwrap();
        assert_eq!(config.worker_threads, 3);
        assert!(warnings.is_empty(), "{warnings:?}");
        let too_many = Config {
            worker_threads: WORKER_THREADS_MAX + 1,
            ..Config::default()
        };
        let err = too_many.check().unwrap_err().to_string();
        assert!(err.contains("worker_threads"), "{err}");
    }

    #[test]
    fn check_lists_every_problem() {
        let mut config = Config::default();
        config.limits.payload_bytes_max = 0;
        config.limits.session_queue_len_max = 0;
        config.auth.token_algorithm = "none".into();
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("payload_bytes_max"), "{err}");
        assert!(err.contains("session_queue_len_max"), "{err}");
        assert!(err.contains("token_algorithm"), "{err}");
        assert!(err.contains("tls.cert_file"), "{err}");
    }

    #[test]
    fn a_joining_node_needs_a_new_id_and_a_member_must_be_listed() {
        let mut config = Config::default();
        config.cluster.node_id = 4;
        config.cluster.members = vec!["1=127.0.0.1:1".into(), "2=127.0.0.1:2".into()];
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("set cluster.join = true"), "{err}");
        config.cluster.join = true;
        let err = config.check().unwrap_err().to_string();
        assert!(!err.contains("cluster.node_id"), "{err}");
        config.cluster.node_id = 2;
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("a joining node needs a new id"), "{err}");
        // A joining node may list no members at all.
        config.cluster.node_id = 4;
        config.cluster.members.clear();
        let err = config.check().unwrap_err().to_string();
        assert!(!err.contains("cluster."), "{err}");
    }

    #[test]
    fn a_statefulset_pod_name_gives_the_node_id() {
        let mut cluster = ClusterConfig {
            node_id_from_ordinal: true,
            ..ClusterConfig::default()
        };
        cluster.resolve_node_id("herald-2\n").unwrap();
        assert_eq!(cluster.node_id, 3);
        cluster.resolve_node_id("my-herald-0").unwrap();
        assert_eq!(cluster.node_id, 1);
        let err = cluster.resolve_node_id("herald").unwrap_err();
        assert!(err.contains("does not end in -N"), "{err}");
        cluster.members = vec!["1=herald-0:7400".into(), "2=herald-1:7400".into()];
        cluster.resolve_node_id("herald-1").unwrap();
        assert!(!cluster.join, "a listed member forms the cluster");
        cluster.resolve_node_id("herald-4").unwrap();
        assert_eq!(cluster.node_id, 5);
        assert!(cluster.join, "a node beyond the members joins");
        let mut fixed = ClusterConfig::default();
        fixed.resolve_node_id("herald-7").unwrap();
        assert_eq!(fixed.node_id, 1, "without the flag the configured id stays");
    }

    #[test]
    fn the_drain_spread_must_fit_in_the_drain_timeout() {
        let mut config = Config::default();
        config.drain.sessions_spread = config.drain.timeout;
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("drain.sessions_spread"), "{err}");
    }
}
