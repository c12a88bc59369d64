//! Node commands: `dev`, `serve`, `checkconfig`, `token`, `status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use herald_broker::certs::DevFiles;
use herald_broker::config::Config;
use herald_broker::server::RunningNode;
use herald_client::wire::Principal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `herald token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The HS256 secret file (e.g. herald-data/dev/secret).
    #[arg(long)]
    secret_file: PathBuf,
    /// Mint a user token for this user id.
    #[arg(long, conflicts_with = "service", required_unless_present = "service")]
    user: Option<u64>,
    /// Mint a service token for this service name.
    #[arg(long)]
    service: Option<String>,
    /// How long the token is valid (e.g. 1h, 30m, 7days).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

pub async fn dev(data_dir: PathBuf, listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let files = DevFiles::in_dir(&data_dir.join("dev"));
    files
        .ensure()
        .with_context(|| format!("cannot prepare {}", data_dir.join("dev").display()))?;
    // Defaults, then HERALD_* variables (e.g. HERALD_LIMITS_PAYLOAD_BYTES_MAX), then flags.
    let (mut config, warnings) = Config::from_toml_and_env("", "herald dev", std::env::vars())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    config.listen = listen;
    config.admin_listen = admin;
    config.data_dir = data_dir.clone();
    config.tls.cert_file = files.node_cert.clone();
    config.tls.key_file = files.node_key.clone();
    config.auth.token_secret_file = files.secret.clone();
    let node = RunningNode::start(config).await?;
    println!("Herald dev node is ready.");
    println!("  QUIC (clients):  {}", node.quic_addr);
    println!("  admin HTTP:      http://{}", node.admin_addr);
    println!(
        "  CA certificate:  {}   (clients: --ca)",
        files.ca_pem.display()
    );
    println!(
        "  token secret:    {}   (herald token --secret-file …)",
        files.secret.display()
    );
    println!("Try, in another shell:");
    println!(
        "  export HERALD_TOKEN=$(herald token --secret-file {} --service cli)",
        files.secret.display()
    );
    println!("  herald conv create --id 1 --kind group --members 1,2");
    println!("  herald sub --conv 1 --from 1 &   herald pub --conv 1 hello");
    println!(
        "listening quic={} admin={}",
        node.quic_addr, node.admin_addr
    );
    run_until_signal(node).await
}

/// `herald dev-cluster`.
#[derive(Args, Debug)]
pub struct DevClusterArgs {
    /// Number of nodes (1 to 9).
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Where the files go; node K keeps its data in DIR/nodeK.
    #[arg(long, default_value = "herald-data/cluster")]
    data_dir: PathBuf,
    /// Node K listens for QUIC on 127.0.0.1:P+10(K-1) and admin HTTP on the port after it.
    #[arg(long, default_value_t = 7410)]
    base_port: u16,
    /// Raft groups (sharding is a later issue: only 1 is supported today).
    #[arg(long, default_value_t = 1)]
    groups: u32,
}

/// Writes the CA, the node certificate (shared by the local nodes: it names
/// 127.0.0.1 and localhost), the cluster and token secrets and one config per node,
/// then prints how to start them. Existing files are kept, so re-running is harmless.
pub fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 9, got {}", args.nodes);
    }
    if args.groups != 1 {
        bail!("--groups {}: this build runs one Raft group per cluster; sharding over many groups is not built yet", args.groups);
    }
    let top = u32::from(args.base_port) + 10 * (u32::from(args.nodes) - 1) + 1;
    if top > u32::from(u16::MAX) {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let dir = &args.data_dir;
    let files = DevFiles::in_dir(dir);
    files
        .ensure()
        .with_context(|| format!("cannot prepare {}", dir.display()))?;
    let cluster_secret = dir.join("cluster-secret");
    if !cluster_secret.is_file() {
        std::fs::write(&cluster_secret, herald_broker::certs::random_secret())
            .with_context(|| format!("cannot write {}", cluster_secret.display()))?;
    }
    let quic_port = |k: u16| args.base_port + 10 * (k - 1);
    let members: Vec<String> = (1..=args.nodes)
        .map(|k| format!("{k}=127.0.0.1:{}", quic_port(k)))
        .collect();
    let mut commands = Vec::new();
    for k in 1..=args.nodes {
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], quic_port(k))),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], quic_port(k) + 1)),
            data_dir: dir.join(format!("node{k}")),
            ..Config::default()
        };
        config.tls.cert_file = files.node_cert.clone();
        config.tls.key_file = files.node_key.clone();
        config.auth.token_secret_file = files.secret.clone();
        config.cluster.node_id = u64::from(k);
        config.cluster.members = members.clone();
        config.cluster.secret_file = cluster_secret.clone();
        config.cluster.ca_file = files.ca_pem.clone();
        let text = toml::to_string_pretty(&config).context("cannot render a node config")?;
        let path = dir.join(format!("node{k}.toml"));
        std::fs::write(
            &path,
            format!(
                "# Node {k} of a local {}-node Herald cluster (herald dev-cluster).\n\n{text}",
                args.nodes
            ),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        commands.push(format!("herald serve --config {}", path.display()));
    }
    let addrs: Vec<String> = (1..=args.nodes)
        .map(|k| format!("127.0.0.1:{}", quic_port(k)))
        .collect();
    println!("Wrote a {}-node cluster to {}.", args.nodes, dir.display());
    println!(
        "  CA certificate (clients: --ca): {}",
        files.ca_pem.display()
    );
    println!(
        "  token secret:                   {}",
        files.secret.display()
    );
    println!(
        "  cluster secret (nodes only):    {}",
        cluster_secret.display()
    );
    println!("Start each node (node 1 initializes the cluster on its first boot):");
    for c in &commands {
        println!("  {c}");
    }
    println!("Then, e.g.:");
    println!(
        "  export HERALD_TOKEN=$(herald token --secret-file {} --service cli)",
        files.secret.display()
    );
    println!(
        "  herald pub --addr {} --ca {} --conv 1 hello",
        addrs.join(","),
        files.ca_pem.display()
    );
    println!("  herald status --admin 127.0.0.1:{}", quic_port(1) + 1);
    Ok(())
}

pub async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let (config, warnings) = Config::load(&path, std::env::vars())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let node = RunningNode::start(config).await?;
    println!(
        "listening quic={} admin={}",
        node.quic_addr, node.admin_addr
    );
    run_until_signal(node).await
}

async fn run_until_signal(node: RunningNode) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

pub fn checkconfig(path: PathBuf) -> anyhow::Result<()> {
    let (config, warnings) = Config::load(&path, std::env::vars())?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    config.check()?;
    println!("{}: OK", path.display());
    Ok(())
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = herald_broker::certs::read_secret(&args.secret_file)?;
    let principal = match (args.user, args.service) {
        (Some(id), None) => Principal::User(id),
        (None, Some(name)) if !name.is_empty() => Principal::Service(name),
        _ => bail!("give exactly one of --user ID or --service NAME"),
    };
    println!(
        "{}",
        herald_broker::auth::mint_hs256(&secret, &principal, args.ttl)?
    );
    Ok(())
}

/// `herald status --admin A[,B…]`: asks every admin address given; node readiness
/// and state come from each node itself, group lag from the leader (only the leader
/// knows it). Unreachable nodes are listed as such.
pub async fn status(admin: &str, json: bool) -> anyhow::Result<()> {
    let mut views = Vec::new();
    let mut unreachable = Vec::new();
    for addr in admin.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match http_get(addr, "/cluster").await {
            Ok(body) => {
                let view: serde_json::Value = serde_json::from_str(&body)
                    .with_context(|| format!("{addr}/cluster did not return JSON"))?;
                views.push((addr.to_owned(), view));
            }
            Err(e) => unreachable.push(format!("{addr}: {e:#}")),
        }
    }
    let Some((_, first)) = views.first() else {
        bail!("no admin address answered:\n  {}", unreachable.join("\n  "));
    };
    // The leader's view has the follower lag; fall back to the first answer.
    let leader_view = views
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["groups"][0]["state"] == "Leader")
        .unwrap_or(first);
    if json {
        println!("{leader_view:#}");
        return Ok(());
    }
    println!("NODE  ADDR                   READY  STATE      TERM  APPLIED");
    for n in leader_view["nodes"].as_array().into_iter().flatten() {
        let own = views
            .iter()
            .map(|(_, v)| v)
            .find(|v| v["node_id"] == n["id"]);
        let (ready, state, term, applied) = match own {
            Some(v) => (
                v["ready"].to_string(),
                v["groups"][0]["state"].as_str().unwrap_or("?").to_owned(),
                v["groups"][0]["term"].to_string(),
                v["groups"][0]["applied_index"].to_string(),
            ),
            None => ("?".into(), "(not asked)".into(), "?".into(), "?".into()),
        };
        println!(
            "{:<5} {:<22} {:<6} {:<10} {:<5} {}",
            n["id"].to_string(),
            n["addr"].as_str().unwrap_or("?"),
            ready,
            state,
            term,
            applied
        );
    }
    println!();
    println!("GROUP  LEADER  TERM  COMMIT  REPLICAS  LAG");
    for g in leader_view["groups"].as_array().into_iter().flatten() {
        let lag = if g["state"] == "Leader" {
            g["lag"].to_string()
        } else {
            "(known on the leader; add its --admin)".to_owned()
        };
        println!(
            "{:<6} {:<7} {:<5} {:<7} {:<9} {}",
            g["id"].to_string(),
            g["leader"].to_string(),
            g["term"].to_string(),
            g["commit_index"].to_string(),
            g["replicas"].to_string(),
            lag
        );
    }
    for u in unreachable {
        println!("unreachable: {u}");
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET (admin endpoints are plain HTTP on loopback or a private network).
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| format!("timed out connecting to admin HTTP at {addr}"))?
            .with_context(|| {
                format!("cannot connect to admin HTTP at {addr}; is the node running? (--admin)")
            })?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("timed out reading {path} from {addr}"))??;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr}{path} answered {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_owned())
}
