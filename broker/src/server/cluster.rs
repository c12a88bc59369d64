//! Bringing a node's Raft groups up: the shared log, a state machine per group, the
//! peer network, one openraft instance per group the cluster map places here, and the
//! one-time initialization of a new cluster's groups.
//!
//! Owns: the mapping from [`Config`] to openraft's config and to the cluster map, where
//! the Raft data lives under the data directory (`raft/wal` for every group's log,
//! `raft/groups/<id>/snapshot`), and the rule that decides who initializes a group: its
//! first replica, on its first boot only (the group's log and vote are empty), so no two
//! nodes race to form two groups.
//! Must not: serve clients, or touch conversation state beyond opening it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;

use super::NodeError;
use crate::cluster_map::ClusterMap;
use crate::config::Config;
use crate::engine::{Group, GroupSet, Pipeline};
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::raft::log_store::{LogStoreConfig, Wal};
use crate::raft::network::{PeerNetwork, PeerNetworkConfig, PeerServerContext};
use crate::raft::state_machine::{StateMachine, StateMachineConfig};
use crate::raft::{GroupId, NodeId, Raft};
use crate::store::StoreLimits;

/// Concurrent RPC streams a peer connection may open (appends, votes, snapshot chunks
/// and forwarded writes); beyond it the peer waits for a stream to finish.
const PEER_STREAMS_MAX: u32 = 1024;
/// How long a follower waits for a forwarded batch before it redials and retries.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to establish a peer connection before the peer counts as unreachable.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Set to `1` (tests only) to open the log store in power-loss simulation mode.
pub const POWER_LOSS_ENV: &str = "HERALD_TEST_POWER_LOSS";

/// The started Raft groups of this node and what the rest of the node needs from them.
pub struct Replication {
    /// The groups this node hosts.
    pub groups: GroupSet,
    /// The cluster map they were started from.
    pub map: Arc<ClusterMap>,
    /// Dials peers (also used to forward writes to leaders).
    pub peers: PeerNetwork,
    /// What serving an incoming peer connection needs.
    pub peer_server: Arc<PeerServerContext<GroupSet>>,
    /// The node's shared log (for stats).
    pub wal: Wal,
}

/// Transport settings of node-to-node connections: a dead peer's connection must end
/// within seconds (QUIC uses the smaller idle timeout of both ends), so RPCs to a
/// restarted node go to its new process instead of timing out on the old connection;
/// keep-alives keep live peer connections open. Few connections, so cheap.
fn peer_transport() -> herald_client::io::TransportLimits {
    herald_client::io::TransportLimits {
        idle_timeout: PEER_IDLE_TIMEOUT,
        keep_alive_interval: PEER_KEEP_ALIVE,
        ..herald_client::io::TransportLimits::default()
    }
}

/// Idle timeout of peer connections.
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive interval of peer connections (well below the idle timeout).
const PEER_KEEP_ALIVE: Duration = Duration::from_millis(500);

/// The store bounds that follow from the node's limits.
pub fn store_limits(limits: &crate::config::Limits) -> StoreLimits {
    StoreLimits {
        group_members_max: limits.group_members_max as usize,
        history_messages_max: limits.history_messages_max as usize,
        history_retention_ms: duration_ms(limits.history_retention),
        dedup_window_ms: duration_ms(limits.dedup_window),
        dedup_keys_max: limits.dedup_keys_max as usize,
        conversations_max: limits.conversations_max as usize,
        frame_bytes_max: limits.frame_bytes_max,
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The initial voters: `cluster.members`, or this node alone at `quic_addr`.
pub fn initial_members(
    config: &Config,
    quic_addr: SocketAddr,
) -> Result<BTreeMap<NodeId, BasicNode>, NodeError> {
    let members = config
        .cluster
        .parsed_members()
        .map_err(|p| NodeError::Config(crate::config::ConfigError::Invalid(vec![p])))?;
    if members.is_empty() {
        return Ok(BTreeMap::from([(
            config.cluster.node_id,
            BasicNode {
                addr: quic_addr.to_string(),
            },
        )]));
    }
    Ok(members
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect())
}

/// Opens storage, starts one openraft instance per group this node hosts, and
/// initializes each group of a brand-new cluster on its first replica.
pub async fn start(
    config: &Config,
    endpoint: &quinn::Endpoint,
    quic_addr: SocketAddr,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
) -> Result<Replication, NodeError> {
    let node_id = config.cluster.node_id;
    let raft_dir = config.data_dir.join("raft");
    let simulate_power_loss = std::env::var(POWER_LOSS_ENV).is_ok_and(|v| v == "1");
    if simulate_power_loss {
        tracing::warn!(
            "{POWER_LOSS_ENV}=1: the log store simulates power loss on restart (tests only)"
        );
    }
    let wal = Wal::open(LogStoreConfig {
        dir: raft_dir.join("wal"),
        segment_bytes_max: config.raft.log_segment_bytes_max,
        cache_bytes_max: usize::try_from(config.raft.log_cache_bytes_max).unwrap_or(usize::MAX),
        simulate_power_loss,
    })
    .await
    .map_err(|e| NodeError::Storage(e.to_string()))?;

    let members = initial_members(config, quic_addr)?;
    let map = ClusterMap::initial(
        &members
            .iter()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect(),
        config.cluster.group_count(),
        config.cluster.replication_factor,
    )
    .map_err(|e| NodeError::Config(crate::config::ConfigError::Invalid(vec![e.to_string()])))?;
    let map = Arc::new(map);

    let secret_file = if config.cluster.secret_file.as_os_str().is_empty() {
        &config.auth.token_secret_file
    } else {
        &config.cluster.secret_file
    };
    let secret = crate::certs::read_secret(secret_file)?;
    let ca_file = if config.cluster.ca_file.as_os_str().is_empty() {
        config.data_dir.join("dev/ca.pem")
    } else {
        config.cluster.ca_file.clone()
    };
    let ca_pem = std::fs::read(&ca_file).map_err(|source| crate::certs::CertError::Io {
        action: "cannot read the cluster CA (cluster.ca_file)",
        path: ca_file.clone(),
        source,
    })?;
    let client_config = herald_client::io::client_config(
        &ca_pem,
        herald_client::wire::ALPN_PEER,
        &peer_transport(),
    )
    .map_err(|e| NodeError::Storage(format!("cannot build the peer TLS config: {e}")))?;
    let peers = PeerNetwork::new(PeerNetworkConfig {
        node_id,
        secret: secret.clone(),
        endpoint: endpoint.clone(),
        client_config,
        connect_timeout: PEER_CONNECT_TIMEOUT,
        // A forwarded batch normally commits in milliseconds; past this the follower
        // redials and retries (the commands are idempotent) instead of waiting out
        // the whole write timeout on a connection that may be dead.
        rpc_timeout: config.raft.write_timeout.min(FORWARD_TIMEOUT),
    });

    let raft_config = Arc::new(raft_config(&config.raft)?);
    let hosted = map.hosted_by(node_id);
    for stale in wal.groups() {
        if !hosted.contains(&stale) {
            tracing::warn!(
                group = stale,
                "the log holds a group the cluster map does not place on this node; ignoring it"
            );
        }
    }
    let mut groups = Vec::with_capacity(hosted.len());
    for group in hosted {
        let log = wal.group(group);
        let sm = StateMachine::open(
            StateMachineConfig {
                group,
                dir: raft_dir.join(format!("groups/{group}/snapshot")),
                limits: store_limits(&config.limits),
            },
            hub.clone(),
            metrics.clone(),
            Arc::new(log.reader()),
        )
        .map_err(|e| NodeError::Storage(format!("group {group}: {e}")))?;
        let raft = Raft::new(
            node_id,
            raft_config.clone(),
            peers.for_group(group),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Storage(format!("cannot start raft for group {group}: {e}")))?;
        let replicas = map
            .group(group)
            .map(|g| g.replicas.clone())
            .unwrap_or_default();
        initialize_once(&raft, group, node_id, &replicas, &map).await?;
        groups.push(Group {
            id: group,
            pipeline: Pipeline::start(group, raft.clone(), peers.clone(), node_id, metrics.clone()),
            raft,
            sm,
            log,
        });
    }
    let groups = GroupSet::new(groups);
    let peer_server = Arc::new(PeerServerContext {
        groups: groups.clone(),
        secret,
        streams_max: PEER_STREAMS_MAX,
    });
    Ok(Replication {
        groups,
        map,
        peers,
        peer_server,
        wal,
    })
}

/// openraft's settings from Herald's.
fn raft_config(r: &crate::config::RaftConfig) -> Result<openraft::Config, NodeError> {
    openraft::Config {
        cluster_name: "herald".into(),
        heartbeat_interval: r.heartbeat_interval.as_millis() as u64,
        election_timeout_min: r.election_timeout_min.as_millis() as u64,
        election_timeout_max: r.election_timeout_max.as_millis() as u64,
        max_payload_entries: r.append_entries_max,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        // Never purge on openraft's own schedule: the log holds history, so the engine
        // purges only below the oldest message still read from it.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: 30_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Storage(format!("raft settings are not usable: {e}")))
}

/// Initializes a group of a brand-new cluster: only its first replica does, and only
/// while the group has never been initialized here (empty log and vote), so no two
/// nodes race to form two groups.
async fn initialize_once(
    raft: &Raft,
    group: GroupId,
    node_id: NodeId,
    replicas: &[NodeId],
    map: &ClusterMap,
) -> Result<(), NodeError> {
    if replicas.first() != Some(&node_id) {
        return Ok(());
    }
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Storage(format!("raft of group {group} stopped: {e}")))?;
    if initialized {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = replicas
        .iter()
        .filter_map(|id| {
            map.addr(*id).map(|addr| {
                (
                    *id,
                    BasicNode {
                        addr: addr.to_owned(),
                    },
                )
            })
        })
        .collect();
    tracing::info!(
        group,
        ?members,
        "first boot of the group's first replica: initializing it"
    );
    if let Err(e) = raft.initialize(members).await {
        // Another path got there first (e.g. a peer already replicated to us).
        tracing::info!(group, "group not initialized by this node: {e}");
    }
    Ok(())
}
