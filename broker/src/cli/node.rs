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

pub async fn status(admin: &str, json: bool) -> anyhow::Result<()> {
    let body = http_get(admin, "/cluster").await?;
    let cluster: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("{admin}/cluster did not return JSON"))?;
    if json {
        println!("{cluster:#}");
        return Ok(());
    }
    println!("NODE  ADDR                   READY");
    for n in cluster["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<22} {}",
            n["id"],
            n["addr"].as_str().unwrap_or("?"),
            n["ready"]
        );
    }
    println!();
    println!("GROUP  LEADER  TERM  COMMIT  REPLICAS  LAG");
    for g in cluster["groups"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<7} {:<5} {:<7} {:<9} {}",
            g["id"], g["leader"], g["term"], g["commit_index"], g["replicas"], g["lag"]
        );
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
