//! What the delivery checker needs from a cluster under test, whatever runs it: a
//! [`Cluster`](crate::cluster::Cluster) of local processes or a
//! [`Compose`](crate::compose::Compose) cluster of containers.
//!
//! Owns: the [`Nodes`] trait and the client settings every test client uses
//! ([`test_client_config`]). Must not: start, stop or observe nodes — that belongs to
//! the types that implement it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A cluster the checker can talk to: node ids, their client addresses, client
/// configs and tokens.
pub trait Nodes {
    /// Ids of the nodes in the cluster, in order.
    fn ids(&self) -> Vec<u16>;

    /// Node `k`'s QUIC address as clients reach it.
    fn addr(&self, k: u16) -> SocketAddr;

    /// A client config with `token` and the seeds `seeds` (node ids, in that order).
    fn client_config(
        &self,
        token: &str,
        seeds: &[u16],
    ) -> anyhow::Result<herald_client::ClientConfig>;

    /// A service token (`role: service`, `sub: name`).
    fn service_token(&self, name: &str) -> anyhow::Result<String>;

    /// A user token for `user`.
    fn user_token(&self, user: u64) -> anyhow::Result<String>;
}

/// The client config every test client uses: seeds `addrs` (in that order), the CA in
/// `ca`, `token`. Reconnect backoff is 50 ms .. 1 s and requests wait up to 20 s, so a
/// client rides out a failover or a whole-cluster restart. The QUIC idle timeout is
/// 5 s (keep-alive 1 s) instead of the default 30 s: a node killed with `kill -9` (or a
/// container cut off its network) sends no close, so this is how soon its clients
/// notice and move to another seed.
pub fn test_client_config(
    addrs: Vec<String>,
    ca: &Path,
    token: &str,
) -> anyhow::Result<herald_client::ClientConfig> {
    Ok(herald_client::ClientConfig::builder()
        .addrs(addrs)
        .ca_file(ca)
        .token(token.to_owned())
        .client_name("herald-tests")
        .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .request_timeout(Duration::from_secs(20))
        .transport_limits(herald_client::io::TransportLimits {
            idle_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            ..herald_client::io::TransportLimits::default()
        })
        .build()?)
}
