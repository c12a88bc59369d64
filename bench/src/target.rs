//! The broker under test: an external one (`--addr`) or one started in this process.
//!
//! Either way the bench ends up with an address, the CA certificate to trust and the
//! HS256 token secret, from which it mints a service token for the publishers and a
//! user token per subscriber.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use herald_broker::certs::DevFiles;
use herald_broker::config::Config;
use herald_broker::server::RunningNode;
use herald_client::{ClientConfig, ClientConfigBuilder, Principal};

/// Lifetime of the tokens the bench mints (far beyond any run's timeout).
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Service name in the publishers' token.
pub const SERVICE_NAME: &str = "herald-bench";
/// Where `herald dev` keeps its files by default (used when `--addr` is given without
/// `--ca` / `--secret-file`).
const DEV_DIR: &str = "herald-data/dev";

/// How to reach the broker: flags of every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Broker to load, HOST:PORT[,HOST:PORT…]. Without it, a broker is started in this
    /// process (temporary data directory, 127.0.0.1, ephemeral ports; its defaults
    /// can be changed with HERALD_* variables, as for `herald dev`).
    #[arg(long, value_delimiter = ',')]
    pub addr: Vec<String>,
    /// CA certificate (PEM) the broker's certificate chains to. Default with --addr:
    /// herald-data/dev/ca.pem.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// HS256 token secret of the broker (to mint service and user tokens). Default
    /// with --addr: herald-data/dev/secret.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Worker threads of the in-process broker's own tokio runtime (default: one per
    /// core). By default the broker does not share a runtime with the clients, as in
    /// production where it is its own process; 0 runs it on the clients' runtime.
    #[arg(long)]
    pub broker_threads: Option<usize>,
}

/// A reachable broker and the credentials to use it.
pub struct Target {
    addrs: Vec<String>,
    ca_pem: Vec<u8>,
    secret: Vec<u8>,
    /// The in-process node, if we started one (shut down by [`Target::shutdown`]).
    node: Option<RunningNode>,
    /// The in-process node's own runtime, unless it runs on the clients' runtime.
    runtime: Option<tokio::runtime::Runtime>,
    /// Its data directory, removed on drop.
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// Connects to `--addr` or starts a node in-process. `group_members` is the group
    /// size the scenario needs: the in-process node's `limits.group_members_max` is
    /// raised to it when above the default; an external broker must allow it already.
    pub async fn prepare(args: &TargetArgs, group_members: u64) -> anyhow::Result<Target> {
        if !args.addr.is_empty() {
            if args.broker_threads.is_some() {
                bail!(
                    "--broker-threads is for the in-process broker; it makes no sense with --addr"
                );
            }
            let ca = args
                .ca
                .clone()
                .unwrap_or_else(|| Path::new(DEV_DIR).join("ca.pem"));
            let secret_file = args
                .secret_file
                .clone()
                .unwrap_or_else(|| Path::new(DEV_DIR).join("secret"));
            let ca_pem = std::fs::read(&ca).with_context(|| {
                format!(
                    "cannot read the CA certificate {} (pass --ca FILE: the ca.pem the broker's certificate chains to)",
                    ca.display()
                )
            })?;
            let secret = herald_broker::certs::read_secret(&secret_file).with_context(|| {
                format!(
                    "cannot read the token secret {} (pass --secret-file FILE: the broker's HS256 secret, to mint tokens)",
                    secret_file.display()
                )
            })?;
            return Ok(Target {
                addrs: args.addr.clone(),
                ca_pem,
                secret,
                node: None,
                runtime: None,
                _dir: None,
            });
        }
        if args.ca.is_some() || args.secret_file.is_some() {
            bail!("--ca and --secret-file only make sense with --addr (without it the bench starts its own broker)");
        }
        Self::in_process(group_members, args.broker_threads).await
    }

    async fn in_process(group_members: u64, threads: Option<usize>) -> anyhow::Result<Target> {
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir()
            .context("cannot create a temporary data directory for the in-process broker")?;
        let files = DevFiles::in_dir(&dir.path().join("dev"));
        files
            .ensure()
            .context("cannot create the in-process broker's certificates and secret")?;
        // As `herald dev` does: defaults, then HERALD_* variables, then our settings.
        let (mut config, warnings) =
            Config::from_toml_and_env("", "herald-bench (in-process broker)", std::env::vars())?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        config.listen = ([127, 0, 0, 1], 0).into();
        config.admin_listen = ([127, 0, 0, 1], 0).into();
        config.data_dir = dir.path().to_path_buf();
        config.tls.cert_file = files.node_cert.clone();
        config.tls.key_file = files.node_key.clone();
        config.auth.token_algorithm = "HS256".into();
        config.auth.token_secret_file = files.secret.clone();
        if group_members > u64::from(config.limits.group_members_max) {
            config.limits.group_members_max = u32::try_from(group_members)
                .context("the group is larger than any broker limit (u32)")?;
        }
        let runtime = if threads == Some(0) {
            None
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all().thread_name("herald-broker");
            if let Some(n) = threads {
                builder.worker_threads(n);
            }
            Some(
                builder
                    .build()
                    .context("cannot start the in-process broker's runtime")?,
            )
        };
        let node = match &runtime {
            Some(rt) => rt
                .spawn(RunningNode::start(config))
                .await
                .context("the in-process broker's start-up task failed")?,
            None => RunningNode::start(config).await,
        }
        .context("cannot start the in-process broker")?;
        let ca_pem = std::fs::read(&files.ca_pem)
            .with_context(|| format!("cannot read {}", files.ca_pem.display()))?;
        let secret = herald_broker::certs::read_secret(&files.secret)?;
        Ok(Target {
            addrs: vec![node.quic_addr.to_string()],
            ca_pem,
            secret,
            node: Some(node),
            runtime,
            _dir: Some(dir),
        })
    }

    /// Where the broker runs, for the report.
    pub fn describe(&self) -> String {
        match (&self.node, &self.runtime) {
            (Some(_), Some(rt)) => format!(
                "in-process, own runtime with {} worker threads ({})",
                rt.metrics().num_workers(),
                self.addrs.join(",")
            ),
            (Some(_), None) => format!(
                "in-process, on the clients' runtime ({})",
                self.addrs.join(",")
            ),
            (None, _) => self.addrs.join(","),
        }
    }

    /// A client configuration for `principal`, with a freshly minted token.
    pub fn client_config(&self, principal: &Principal, name: &str) -> anyhow::Result<ClientConfig> {
        self.client_config_at(&self.addrs, principal, name)
    }

    /// A publisher's configuration: as [`Target::client_config`], with room for
    /// `window` publishes in flight (`publish::run` needs a slot per started publish).
    pub fn publisher_config(
        &self,
        principal: &Principal,
        name: &str,
        window: usize,
    ) -> anyhow::Result<ClientConfig> {
        Ok(self
            .builder_at(&self.addrs, principal, name)?
            .requests_in_flight_max(window.max(herald_client::DEFAULT_REQUESTS_IN_FLIGHT_MAX))
            .build()?)
    }

    /// The same with other seeds (e.g. subscribers kept on some nodes).
    pub fn client_config_at(
        &self,
        addrs: &[String],
        principal: &Principal,
        name: &str,
    ) -> anyhow::Result<ClientConfig> {
        Ok(self.builder_at(addrs, principal, name)?.build()?)
    }

    fn builder_at(
        &self,
        addrs: &[String],
        principal: &Principal,
        name: &str,
    ) -> anyhow::Result<ClientConfigBuilder> {
        let token = herald_broker::auth::mint_hs256(&self.secret, principal, TOKEN_TTL)
            .with_context(|| format!("cannot mint a token for {principal}"))?;
        Ok(ClientConfig::builder()
            .addrs(addrs.iter().cloned())
            .ca_pem(self.ca_pem.clone())
            .token(token)
            .client_name(name)
            // A bench run is bounded by its own --timeout; do not give up earlier.
            .request_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10)))
    }

    /// Stops the in-process broker, if any (bounded by the node's own shutdown).
    pub async fn shutdown(self) {
        if let Some(node) = self.node {
            match &self.runtime {
                Some(rt) => {
                    let _ = rt.spawn(node.shutdown()).await;
                }
                None => node.shutdown().await,
            }
        }
        if let Some(rt) = self.runtime {
            // Dropping a runtime may block; from async code it must go in the background.
            rt.shutdown_background();
        }
    }
}

/// The publishers' principal.
pub fn service() -> Principal {
    Principal::Service(SERVICE_NAME.to_string())
}
