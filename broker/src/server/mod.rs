//! A running node: the QUIC endpoint, its accept loop, admin HTTP, and shutdown.
//!
//! Owns: binding the node's one UDP port and one TCP admin port, admission control for
//! new connections (connection and handshake bounds, QUIC Retry under a flood),
//! periodic housekeeping, and orderly shutdown. Must not: interpret frames (see
//! [`session`]) or change conversation state (see [`crate::engine`]).

pub mod admin;
mod balance;
pub mod cluster;
pub mod drain;
mod readiness;
mod reconcile;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_client::io::TransportLimits;

use crate::auth::{TokenAlgorithm, TokenVerifier};
use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates or the token secret could not be loaded.
    #[error(transparent)]
    Cert(#[from] crate::certs::CertError),
    /// The token key could not be loaded.
    #[error("cannot load the token key: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// The Raft log, snapshot or openraft itself could not start.
    #[error("cannot start replication: {0}")]
    Storage(String),
    /// Another process holds the data directory.
    #[error("the data directory {} is in use by another herald process (pid {holder}); two nodes on one directory would corrupt its log: stop the other one, or give this one its own --data-dir", dir.display())]
    DataDirInUse {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The data directory's lock file could not be created or locked.
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    DataDirLock {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A port could not be bound.
    #[error("cannot bind {what} on {addr}: {source}; is another herald running? pick another with --listen/--admin")]
    Bind {
        /// QUIC or admin HTTP.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Everything a session task needs, shared by all of them.
pub struct NodeContext {
    /// The node's configuration.
    pub config: Config,
    /// Conversation state and local fan-out.
    pub engine: Arc<Engine>,
    /// Verifies client tokens.
    pub verifier: TokenVerifier,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// True while the node accepts sessions (`/readyz`).
    pub ready: AtomicBool,
    /// Live sessions per user (to end subscriptions of removed members).
    pub sessions: session::Registry,
    /// What serving a peer (node-to-node) connection needs.
    pub peer_server: Arc<crate::raft::network::PeerServerContext<crate::engine::GroupSet>>,
    /// The node's shared log of all groups (fsync stats).
    pub wal: crate::raft::log_store::Wal,
    /// Which of the node's groups are ready.
    pub readiness: readiness::Readiness,
    /// The node's drain, once begun (at most one per process; see [`drain`]).
    pub drain: tokio::sync::OnceCell<drain::DrainReport>,
    session_ids: AtomicU64,
    /// Held while anything of this node may still write to the data directory.
    _data_dir_lock: std::fs::File,
}

impl NodeContext {
    /// A fresh id for a session (unique in this process).
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// A node that has bound its ports and is serving.
pub struct RunningNode {
    /// The QUIC address actually bound (useful with port 0).
    pub quic_addr: SocketAddr,
    /// The admin HTTP address actually bound.
    pub admin_addr: SocketAddr,
    /// Shared state (for in-process tests and benches).
    pub context: Arc<NodeContext>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Binds the ports and starts serving. Returns once the node is ready.
    pub async fn start(config: Config) -> Result<RunningNode, NodeError> {
        config.check()?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let verifier = match config.auth.token_algorithm.as_str() {
            "EdDSA" | "RS256" => {
                let pem = std::fs::read(&config.auth.token_public_key_file).map_err(|source| {
                    crate::certs::CertError::Io {
                        action: "cannot read token public key",
                        path: config.auth.token_public_key_file.clone(),
                        source,
                    }
                })?;
                let alg = if config.auth.token_algorithm == "EdDSA" {
                    TokenAlgorithm::EdDsa
                } else {
                    TokenAlgorithm::Rs256
                };
                TokenVerifier::from_public_key_pem(alg, &pem)?
            }
            _ => TokenVerifier::hs256(&crate::certs::read_secret(&config.auth.token_secret_file)?),
        };
        let transport = TransportLimits::default();
        let server_config =
            crate::certs::server_config(&config.tls.cert_file, &config.tls.key_file, &transport)?;
        let reset_key =
            crate::certs::stateless_reset_key(&config.data_dir.join("node/stateless-reset.key"))?;
        let bind_error = |source| NodeError::Bind {
            what: "QUIC (UDP)",
            addr: config.listen,
            source,
        };
        let socket = bind_udp(config.listen).map_err(bind_error)?;
        // Connection ids this node hands out must validate again after a restart:
        // otherwise the new process silently drops packets of connections to the old
        // one, instead of answering them with a stateless reset. Peers and clients
        // would then keep those dead connections until their idle timeout.
        let cid_key = crate::certs::connection_id_key(&reset_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // quinn sends at most one stateless reset per interval (20 ms by default): after
        // a restart, thousands of clients' stale connections would wait their turn for
        // seconds. A reset is always smaller than the packet that provoked it, so a
        // shorter interval amplifies nothing; it bounds only the CPU spent on resets.
        endpoint_config.min_reset_interval(Duration::from_millis(1));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let quic_addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
            what: "QUIC (UDP)",
            addr: config.listen,
            source,
        })?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| NodeError::Bind {
                what: "admin HTTP (TCP)",
                addr: config.admin_listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Bind {
                what: "admin HTTP (TCP)",
                addr: config.admin_listen,
                source,
            })?;
        let metrics = Arc::new(Metrics::new());
        let hub = crate::fanout::Hub::new(Arc::new(crate::routing::Router::new()));
        let replication =
            cluster::start(&config, &endpoint, quic_addr, hub.clone(), metrics.clone()).await?;
        let engine = Engine::new(
            crate::engine::EngineConfig {
                node_id: config.cluster.node_id,
                payload_bytes_max: config.limits.payload_bytes_max,
                frame_bytes_max: config.limits.frame_bytes_max,
                write_timeout: config.raft.write_timeout,
            },
            replication.groups.clone(),
            replication.map.clone(),
            hub.clone(),
            replication.peers.clone(),
            metrics.clone(),
        );
        let cluster::Replication {
            peer_server,
            wal,
            factory,
            initial,
            ..
        } = replication;
        let engine = Arc::new(engine);
        let context = Arc::new(NodeContext {
            engine: engine.clone(),
            peer_server,
            wal,
            readiness: readiness::Readiness::default(),
            drain: tokio::sync::OnceCell::new(),
            config,
            verifier,
            metrics,
            ready: AtomicBool::new(false),
            sessions: session::Registry::default(),
            session_ids: AtomicU64::new(1),
            _data_dir_lock: data_dir_lock,
        });
        // Removed members' sessions end on this node, whoever removed them where.
        let weak = Arc::downgrade(&context);
        hub.set_revoker(Box::new(move |conv, users| {
            if let Some(ctx) = weak.upgrade() {
                ctx.sessions.revoke(conv, users);
            }
        }));
        readiness::track_meta(context.clone());
        let driver = crate::meta::driver::Driver {
            node_id: context.config.cluster.node_id,
            engine: engine.clone(),
            initial,
        };
        let tasks = vec![
            tokio::spawn(admin::serve(admin_listener, context.clone())),
            tokio::spawn(accept_loop(endpoint.clone(), context.clone())),
            tokio::spawn(housekeeping(context.clone())),
            tokio::spawn(reconcile::run(context.clone(), factory)),
            tokio::spawn(driver.run()),
            tokio::spawn(balance::run(context.clone())),
        ];
        if context.config.cluster.members.is_empty() && !context.config.cluster.join {
            // A one-node cluster (`herald dev`) bootstraps itself at once: answer only
            // when it can take writes, as before replication.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !context.ready.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tracing::info!(%quic_addr, %admin_addr, node_id = context.config.cluster.node_id, "node serving; ready once it has a leader and has caught up");
        Ok(RunningNode {
            quic_addr,
            admin_addr,
            context,
            endpoint,
            tasks,
        })
    }

    /// Drains the node (see [`drain`]): no new sessions, leaderships handed away,
    /// sessions moved. The node keeps running (draining) until [`RunningNode::shutdown`].
    pub async fn drain(&self) -> drain::DrainReport {
        drain::drain(&self.context).await
    }

    /// Stops accepting, closes every connection, and waits (bounded) for them to go.
    pub async fn shutdown(self) {
        self.context.ready.store(false, Ordering::Release);
        self.endpoint.close(
            quinn::VarInt::from_u32(session::close_code::SHUTDOWN),
            b"node shutting down; reconnect to another node",
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        for task in self.tasks {
            task.abort();
        }
        for group in self.context.engine.groups().all().values() {
            let _ = group.raft.shutdown().await;
        }
        if let Some(meta) = self.context.engine.groups().meta() {
            let _ = meta.raft.shutdown().await;
        }
    }
}

/// Name of the lock file in the data directory.
pub const DATA_DIR_LOCK_FILE: &str = "herald.lock";

/// Takes the data directory for this process (an exclusive `flock` on
/// `DATA/herald.lock`, released by the OS when the process ends, even on `kill -9`).
/// Two nodes on one directory would interleave appends to the same log and vote files.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, NodeError> {
    use std::io::{Read, Seek, Write};
    let lock_error = |source| NodeError::DataDirLock {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(lock_error)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(DATA_DIR_LOCK_FILE))
        .map_err(lock_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(NodeError::DataDirInUse {
                dir: dir.to_owned(),
                holder: holder.trim().to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(lock_error(e)),
    }
    // For the operator who finds the directory locked: who holds it.
    file.set_len(0).map_err(lock_error)?;
    file.rewind().map_err(lock_error)?;
    writeln!(file, "{}", std::process::id()).map_err(lock_error)?;
    Ok(file)
}

/// Socket buffer sizes for the node's UDP port. Linux's defaults (~200 KiB) overflow
/// when a fan-out burst to many connections meets their ACKs: the drops showed up as
/// congestion events and multi-second tail stalls in `herald-bench fanout`.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Binds the QUIC port with enlarged socket buffers (the kernel may clamp them to
/// `net.core.rmem_max`/`wmem_max`; a warning says so).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    let recv = socket.recv_buffer_size().unwrap_or(0);
    if recv < UDP_BUFFER_BYTES {
        tracing::warn!(
            "UDP receive buffer is {recv} bytes, below the {UDP_BUFFER_BYTES} asked for; \
             raise net.core.rmem_max to avoid packet drops under bursts"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<NodeContext>) {
    let handshakes = Arc::new(AtomicU64::new(0));
    let limits = ctx.config.limits.clone();
    while let Some(incoming) = endpoint.accept().await {
        let open = ctx.metrics.connections.get().max(0) as u64;
        let in_flight = handshakes.load(Ordering::Relaxed);
        // Connections still in their handshake count too, so the bound holds.
        if open + in_flight >= u64::from(limits.connections_max) {
            refused(&ctx, "connections_max");
            incoming.refuse();
            continue;
        }
        if in_flight >= u64::from(limits.handshakes_in_flight_max) {
            refused(&ctx, "handshakes_in_flight_max");
            incoming.refuse();
            continue;
        }
        if in_flight >= u64::from(limits.handshakes_in_flight_max / 2)
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            // Under a handshake flood, make clients prove their address first.
            let _ = incoming.retry();
            continue;
        }
        handshakes.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            session::serve_connection(ctx, incoming, move || {
                handshakes.fetch_sub(1, Ordering::Relaxed);
            })
            .await;
        });
    }
}

fn refused(ctx: &NodeContext, reason: &str) {
    ctx.metrics
        .connections_refused
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: reason.to_owned(),
        })
        .inc();
}

/// Every `raft.housekeeping_interval`: the leader proposes the retention trim; every node purges its log
/// below what history still reads, and snapshots early any group that alone keeps the oldest segment
/// from retiring (see `engine::retention`).
async fn housekeeping(ctx: Arc<NodeContext>) {
    let mut tick = tokio::time::interval(ctx.config.raft.housekeeping_interval);
    loop {
        tick.tick().await;
        ctx.engine.trim_expired().await;
        ctx.engine.purge_log().await;
        ctx.engine.unpin_log(&ctx.wal).await;
    }
}
