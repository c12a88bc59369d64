//! Bringing a node's Raft groups up: the shared log, the peer network, the metadata
//! group (group 0, whose state is the cluster map), and — as the map places them here —
//! the data groups, each with its state machine and openraft instance.
//!
//! Owns: the mapping from [`Config`] to openraft's config and to the initial cluster
//! map, where the Raft data lives under the data directory (`raft/wal` for every
//! group's log, `raft/meta/snapshot`, `raft/groups/<id>/snapshot`), and the rules that
//! decide who initializes: the metadata group by its lowest-id initial member on its
//! first boot; a data group by its first replica, only while the group still has the
//! replicas it was created with (generation 0) and its log is empty. A replica added
//! later always joins through the group's leader. So no two nodes race to form two
//! groups.
//! Must not: serve clients, or touch conversation state beyond opening it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;

use super::NodeError;
use crate::cluster_map::{ClusterMap, SharedMap};
use crate::config::Config;
use crate::engine::{Group, GroupSet, MetaGroup, Pipeline};
use crate::fanout::Hub;
use crate::meta::state_machine::MetaStateMachine;
use crate::metrics::Metrics;
use crate::raft::log_store::{LogStoreConfig, Wal};
use crate::raft::network::{PeerNetwork, PeerNetworkConfig, PeerServerContext};
use crate::raft::state_machine::{StateMachine, StateMachineConfig};
use crate::raft::{GroupId, NodeId, Raft, META_GROUP};
use crate::store::StoreLimits;

/// Concurrent RPC streams a peer connection may open (appends, votes, snapshot chunks
/// and forwarded writes); beyond it the peer waits for a stream to finish.
const PEER_STREAMS_MAX: u32 = 1024;
/// How long a follower waits for a forwarded batch before it redials and retries.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to establish a peer connection before the peer counts as unreachable.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The metadata group snapshots after this many entries (its log is then purged).
const META_SNAPSHOT_LOGS: u64 = 1000;

/// Set to `1` (tests only) to open the log store in power-loss simulation mode.
pub const POWER_LOSS_ENV: &str = "HERALD_TEST_POWER_LOSS";

/// The started Raft side of this node and what the rest of the node needs from it.
pub struct Replication {
    /// The groups this node hosts (data groups join as the map places them).
    pub groups: GroupSet,
    /// The node's view of the cluster map (follows the metadata group).
    pub map: SharedMap,
    /// Dials peers (also used to forward writes to leaders).
    pub peers: PeerNetwork,
    /// What serving an incoming peer connection needs.
    pub peer_server: Arc<PeerServerContext<GroupSet>>,
    /// The node's shared log (for stats).
    pub wal: Wal,
    /// Starts and stops data groups (the reconciler uses it).
    pub factory: GroupFactory,
    /// The map a new cluster starts with (from the config).
    pub initial: ClusterMap,
}

/// What starting a data group needs.
pub struct GroupFactory {
    node_id: NodeId,
    wal: Wal,
    raft_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    peers: PeerNetwork,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    limits: StoreLimits,
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

/// Opens storage and the peer network, starts the metadata group (initializing it on
/// the first boot of the lowest-id initial member), and returns what the node needs to
/// start its data groups as the map places them.
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
        fsync_observer: {
            let histogram = metrics.raft_fsync_latency_seconds.clone();
            crate::raft::log_store::FsyncObserver::new(move |took| {
                histogram.observe(took.as_secs_f64())
            })
        },
    })
    .await
    .map_err(|e| NodeError::Storage(e.to_string()))?;

    let members = initial_members(config, quic_addr)?;
    // A joining node never bootstraps a map: it learns the running cluster's.
    let initial = if config.cluster.join {
        ClusterMap::default()
    } else {
        ClusterMap::initial(
            &members
                .iter()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            config.cluster.group_count(),
            config.cluster.replication_factor,
        )
        .map_err(|e| NodeError::Config(crate::config::ConfigError::Invalid(vec![e.to_string()])))?
    };

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

    let raft_config = Arc::new(raft_config(&config.raft, None)?);
    let meta_config = Arc::new(raft_config_for_meta(&config.raft)?);

    // The metadata group: every node runs it; the lowest-id initial members (as many
    // as `voters_wanted`) are its voters, everybody else follows as a learner. A
    // joining node never initializes it: the metadata leader adds it once an operator
    // put it into the map.
    let meta_log = wal.group(META_GROUP);
    let meta_sm = MetaStateMachine::open(raft_dir.join("meta/snapshot"))
        .map_err(|e| NodeError::Storage(format!("metadata group: {e}")))?;
    let meta_network = peers.for_group(META_GROUP);
    let meta_outvoted = meta_network.outvoted();
    let meta_raft = Raft::new(
        node_id,
        meta_config,
        meta_network,
        meta_log.clone(),
        meta_sm.clone(),
    )
    .await
    .map_err(|e| NodeError::Storage(format!("cannot start the metadata group: {e}")))?;
    crate::raft::reelect::spawn(meta_raft.clone(), meta_outvoted, META_GROUP);
    let voters: BTreeMap<NodeId, BasicNode> = members
        .iter()
        .take(crate::meta::voters_wanted(members.len()))
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    if !config.cluster.join && voters.keys().next() == Some(&node_id) {
        initialize_if_new(&meta_raft, META_GROUP, voters).await?;
    }
    let groups = GroupSet::new(Vec::new());
    groups.set_meta(MetaGroup {
        pipeline: Pipeline::start(
            META_GROUP,
            meta_raft.clone(),
            peers.clone(),
            node_id,
            metrics.clone(),
        ),
        raft: meta_raft,
        sm: meta_sm.clone(),
        log: meta_log,
        contact: Default::default(),
    });
    let map: SharedMap = Arc::new(arc_swap::ArcSwap::new(meta_sm.map()));
    let peer_server = Arc::new(PeerServerContext {
        groups: groups.clone(),
        secret,
        streams_max: PEER_STREAMS_MAX,
    });
    let factory = GroupFactory {
        node_id,
        wal: wal.clone(),
        raft_dir,
        raft_config,
        peers: peers.clone(),
        hub,
        metrics,
        limits: store_limits(&config.limits),
    };
    Ok(Replication {
        groups,
        map,
        peers,
        peer_server,
        wal,
        factory,
        initial,
    })
}

impl GroupFactory {
    /// Starts data group `group` as `map` places it: opens its log and state machine,
    /// starts its openraft instance, and initializes it if this node is its first
    /// replica, the group still has its original replicas, and its log is empty. The
    /// group's forwarding pipeline (`pipeline`) becomes the replica's, so writes
    /// queued in it keep their order.
    pub async fn start(
        &self,
        group: GroupId,
        map: &ClusterMap,
        pipeline: Pipeline,
    ) -> Result<Group, NodeError> {
        let log = self.wal.group(group);
        let sm = StateMachine::open(
            StateMachineConfig {
                group,
                dir: self.group_dir(group).join("snapshot"),
                limits: self.limits,
            },
            self.hub.clone(),
            self.metrics.clone(),
            Arc::new(log.reader()),
        )
        .map_err(|e| NodeError::Storage(format!("group {group}: {e}")))?;
        let network = self.peers.for_group(group);
        let outvoted = network.outvoted();
        let raft = Raft::new(
            self.node_id,
            self.raft_config.clone(),
            network,
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Storage(format!("cannot start raft for group {group}: {e}")))?;
        crate::raft::reelect::spawn(raft.clone(), outvoted, group);
        if let Some(entry) = map.group(group) {
            if entry.generation == 0 && entry.replicas.first() == Some(&self.node_id) {
                let members: BTreeMap<NodeId, BasicNode> = entry
                    .replicas
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
                if let Err(e) = initialize_if_new(&raft, group, members).await {
                    // Not left running: a retry opens the group again.
                    let _ = raft.shutdown().await;
                    return Err(e);
                }
            }
        }
        pipeline.host(raft.clone());
        Ok(Group {
            id: group,
            pipeline,
            raft,
            sm,
            log,
            contact: Default::default(),
        })
    }

    /// Stops a data group this node no longer hosts and forgets its data: its log
    /// leaves the shared log, its snapshot directory is removed.
    pub async fn stop(&self, group: Arc<Group>) {
        let id = group.id;
        let _ = group.raft.shutdown().await;
        group.sm.set_leader(false);
        if let Err(e) = self.wal.drop_group(id).await {
            tracing::warn!(group = id, error = %e, "cannot drop the group's log");
        }
        let dir = self.group_dir(id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(group = id, error = %e, dir = %dir.display(), "cannot remove the group's directory");
            }
        }
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.raft_dir.join(format!("groups/{group}"))
    }
}

/// openraft's settings from Herald's (a data group's unless `keep` says how many
/// entries to keep after a snapshot).
fn raft_config(
    r: &crate::config::RaftConfig,
    keep: Option<(u64, u64)>,
) -> Result<openraft::Config, NodeError> {
    let (snapshot_logs, keep_logs) = match keep {
        Some((snapshot_logs, keep_logs)) => (snapshot_logs, keep_logs),
        // Never purge on openraft's own schedule: the log holds history, so the engine
        // purges only below the oldest message still read from it.
        None => (r.snapshot_logs_since_last, u64::MAX),
    };
    openraft::Config {
        cluster_name: "herald".into(),
        heartbeat_interval: r.heartbeat_interval.as_millis() as u64,
        election_timeout_min: r.election_timeout_min.as_millis() as u64,
        election_timeout_max: r.election_timeout_max.as_millis() as u64,
        max_payload_entries: r.append_entries_max,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs),
        max_in_snapshot_log_to_keep: keep_logs,
        install_snapshot_timeout: 30_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Storage(format!("raft settings are not usable: {e}")))
}

/// The metadata group's settings: its log holds no history, so openraft snapshots it
/// often and purges it behind the snapshot (it must not pin the shared log).
fn raft_config_for_meta(r: &crate::config::RaftConfig) -> Result<openraft::Config, NodeError> {
    raft_config(r, Some((META_SNAPSHOT_LOGS, META_SNAPSHOT_LOGS / 10)))
}

/// Initializes `raft` (group `group`) with `members` unless it was initialized
/// before (its log or vote is not empty).
async fn initialize_if_new(
    raft: &Raft,
    group: GroupId,
    members: BTreeMap<NodeId, BasicNode>,
) -> Result<(), NodeError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Storage(format!("raft of group {group} stopped: {e}")))?;
    if initialized {
        return Ok(());
    }
    tracing::info!(group, ?members, "first boot: initializing the group");
    if let Err(e) = raft.initialize(members).await {
        // Another path got there first (e.g. a peer already replicated to us).
        tracing::info!(group, "group not initialized by this node: {e}");
    }
    Ok(())
}
