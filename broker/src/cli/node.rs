//! Node commands: `dev`, `serve`, `checkconfig`, `token`, `status`, `drain`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use herald_broker::certs::DevFiles;
use herald_broker::config::Config;
use herald_broker::server::RunningNode;
use herald_client::wire::Principal;

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
    /// Write the token to this file (created or replaced, readable by its owner only)
    /// instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Data groups (Raft groups holding conversations); default: four per node, so
    /// every node leads several.
    #[arg(long)]
    groups: Option<u32>,
    /// Replicas per data group (capped at the number of nodes).
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Only the first M nodes form the cluster; the others are written as joining
    /// nodes (`cluster.join`), added later with `herald cluster add-node`. Default: all.
    #[arg(long)]
    initial: Option<u16>,
    /// Put node K on host K of this list (e.g. compose services node1,node2,node3)
    /// instead of 127.0.0.1: every node listens on 0.0.0.0 at QUIC port P and admin
    /// P+1, peers dial HOST_K:P, and the node certificate also names these hosts.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
}

/// Writes the CA, the node certificate (shared by the local nodes: it names
/// 127.0.0.1 and localhost, and the `--hosts`), the cluster and token secrets and one
/// config per node, then prints how to start them. Existing files are kept, so
/// re-running is harmless.
pub fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 9, got {}", args.nodes);
    }
    let initial = args.initial.unwrap_or(args.nodes);
    if !(1..=args.nodes).contains(&initial) {
        bail!(
            "--initial must be between 1 and --nodes ({}), got {initial}",
            args.nodes
        );
    }
    let groups = args
        .groups
        .unwrap_or(u32::from(initial) * herald_broker::config::GROUPS_PER_MEMBER_DEFAULT);
    if groups == 0 || groups > herald_broker::cluster_map::GROUPS_MAX {
        bail!(
            "--groups must be between 1 and {}, got {groups}",
            herald_broker::cluster_map::GROUPS_MAX
        );
    }
    if args.replication_factor == 0 {
        bail!("--replication-factor must be at least 1");
    }
    let on_hosts = !args.hosts.is_empty();
    if on_hosts && args.hosts.len() != usize::from(args.nodes) {
        bail!(
            "--hosts names {} host(s) but --nodes is {}: give one host per node",
            args.hosts.len(),
            args.nodes
        );
    }
    if let Some(bad) = args
        .hosts
        .iter()
        .find(|h| h.is_empty() || h.contains(':') || h.contains(char::is_whitespace))
    {
        bail!("--hosts entry `{bad}` is not a host name or IPv4 address");
    }
    // Node K's QUIC port: on distinct hosts every node uses P, on one host P+10(K-1).
    let quic_port = |k: u16| {
        if on_hosts {
            u32::from(args.base_port)
        } else {
            u32::from(args.base_port) + 10 * (u32::from(k) - 1)
        }
    };
    if quic_port(args.nodes) + 1 > u32::from(u16::MAX) {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let quic_port = |k: u16| quic_port(k) as u16;
    let host = |k: u16| {
        if on_hosts {
            args.hosts[usize::from(k) - 1].clone()
        } else {
            "127.0.0.1".to_owned()
        }
    };
    let dir = &args.data_dir;
    let files = DevFiles::in_dir(dir);
    if on_hosts {
        ensure_host_certificate(&files, &args.hosts)
            .with_context(|| format!("cannot prepare {}", dir.display()))?;
    }
    files
        .ensure()
        .with_context(|| format!("cannot prepare {}", dir.display()))?;
    let cluster_secret = dir.join("cluster-secret");
    if !cluster_secret.is_file() {
        std::fs::write(&cluster_secret, herald_broker::certs::random_secret())
            .with_context(|| format!("cannot write {}", cluster_secret.display()))?;
    }
    let members: Vec<String> = (1..=initial)
        .map(|k| format!("{k}={}:{}", host(k), quic_port(k)))
        .collect();
    let ip = if on_hosts {
        [0, 0, 0, 0]
    } else {
        [127, 0, 0, 1]
    };
    // Nodes on this one machine share its cores: one runtime thread per core each
    // would have them steal and park against each other (see `Config::worker_threads`).
    let worker_threads = if on_hosts {
        0
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / usize::from(args.nodes)).max(1)
    };
    let mut commands = Vec::new();
    for k in 1..=args.nodes {
        let mut config = Config {
            listen: SocketAddr::from((ip, quic_port(k))),
            admin_listen: SocketAddr::from((ip, quic_port(k) + 1)),
            data_dir: dir.join(format!("node{k}")),
            worker_threads,
            ..Config::default()
        };
        config.tls.cert_file = files.node_cert.clone();
        config.tls.key_file = files.node_key.clone();
        config.auth.token_secret_file = files.secret.clone();
        config.cluster.node_id = u64::from(k);
        config.cluster.members = members.clone();
        config.cluster.secret_file = cluster_secret.clone();
        config.cluster.ca_file = files.ca_pem.clone();
        config.cluster.groups = groups;
        config.cluster.replication_factor = args.replication_factor;
        config.cluster.join = k > initial;
        let text = toml::to_string_pretty(&config).context("cannot render a node config")?;
        let path = dir.join(format!("node{k}.toml"));
        let place = if on_hosts {
            format!(", on host {}", host(k))
        } else {
            String::new()
        };
        let role = if k > initial {
            "; it joins once added: herald cluster add-node"
        } else {
            ""
        };
        std::fs::write(
            &path,
            format!(
                "# Node {k}{place} of a {}-node Herald cluster (herald dev-cluster{role}).\n\n{text}",
                args.nodes
            ),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        let on = if on_hosts {
            format!("(on {}) ", host(k))
        } else {
            String::new()
        };
        commands.push(format!("{on}herald serve --config {}", path.display()));
    }
    let addrs: Vec<String> = (1..=initial)
        .map(|k| format!("{}:{}", host(k), quic_port(k)))
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
    for c in &commands[..usize::from(initial)] {
        println!("  {c}");
    }
    if initial < args.nodes {
        println!(
            "Nodes {}..={} join later: start one, then add it:",
            initial + 1,
            args.nodes
        );
        for k in initial + 1..=args.nodes {
            println!("  {}", commands[usize::from(k) - 1]);
            println!(
                "  herald cluster add-node --admin {}:{} --id {k} --addr {}:{} --wait",
                host(1),
                quic_port(1) + 1,
                host(k),
                quic_port(k)
            );
        }
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
    println!("  herald status --admin {}:{}", host(1), quic_port(1) + 1);
    Ok(())
}

/// With `--hosts`: the CA and a node certificate naming the hosts as well as
/// localhost and 127.0.0.1 (`DevFiles::ensure` then only adds the token secret).
/// The names are kept in `DIR/node.hosts`; an existing certificate made for other
/// names is refused rather than silently kept.
fn ensure_host_certificate(files: &DevFiles, hosts: &[String]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = vec!["localhost", "127.0.0.1", "::1"];
    names.extend(hosts.iter().map(String::as_str));
    let listing = names.join("\n") + "\n";
    let record = files.node_cert.with_file_name("node.hosts");
    if files.node_cert.is_file() {
        let recorded = std::fs::read_to_string(&record).unwrap_or_default();
        if recorded != listing {
            bail!(
                "{} was made for other host names than --hosts {}; \
                 use another --data-dir or delete that directory's node.pem and node.key",
                files.node_cert.display(),
                hosts.join(",")
            );
        }
        return Ok(());
    }
    if let Some(dir) = files.node_cert.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let pki = herald_broker::certs::generate_pki(&names)?;
    let write = |path: &std::path::Path, text: &str, private: bool| -> anyhow::Result<()> {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
        }
        Ok(())
    };
    write(&files.ca_pem, &pki.ca_pem, false)?;
    write(&files.node_key, &pki.node_key_pem, true)?;
    write(&files.node_cert, &pki.node_cert_pem, false)?;
    write(&record, &listing, false)?;
    Ok(())
}

/// The config file, then `HERALD_*` variables, then the node id from the host name
/// when `cluster.node_id_from_ordinal` asks for it. Returns the warnings too.
/// A node's config file with `HERALD_*` overrides applied and the node id resolved,
/// and the warnings to log.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<(Config, Vec<String>)> {
    let (mut config, warnings) = Config::load(path, std::env::vars())?;
    if config.cluster.node_id_from_ordinal {
        // Kubernetes and Docker set HOSTNAME; the kernel's name is the fallback.
        let hostname = match std::env::var("HOSTNAME") {
            Ok(name) if !name.trim().is_empty() => name,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("cannot read the host name (cluster.node_id_from_ordinal)")?,
        };
        config
            .cluster
            .resolve_node_id(&hostname)
            .map_err(anyhow::Error::msg)?;
    }
    Ok((config, warnings))
}

/// Runs a node from its loaded config (`load_config`, done before the runtime starts
/// because the config sizes the runtime).
pub async fn serve(loaded: anyhow::Result<(Config, Vec<String>)>) -> anyhow::Result<()> {
    let (config, warnings) = loaded?;
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
    // Drain first (bounded by drain.timeout); a second signal stops at once.
    tokio::select! {
        _ = node.drain() => {}
        _ = tokio::signal::ctrl_c() => tracing::warn!("second signal: stopping without finishing the drain"),
        _ = term.recv() => tracing::warn!("second signal: stopping without finishing the drain"),
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// `herald drain`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The admin HTTP address of the node to drain (one node).
    #[arg(long, default_value = "127.0.0.1:7401")]
    admin: String,
    /// Give up waiting for the node's answer after this long (the node's own
    /// `drain.timeout` bounds the drain itself).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `herald drain --admin A`: asks the node to drain (`POST /drain`) and prints its
/// report once done. The node then refuses sessions until it is stopped; a SIGTERM
/// afterwards stops it at once. Kubernetes runs this as the `preStop` hook.
pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let (status, body) =
        super::http::post_waiting(&args.admin, "/drain", &serde_json::json!({}), args.timeout)
            .await?;
    if status != 200 {
        bail!("{}/drain answered {status}: {}", args.admin, body.trim());
    }
    let report: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("{}/drain did not answer JSON: {body}", args.admin))?;
    println!(
        "node {} drained in {} ms: handed over {} group leadership(s){}, asked {} session(s) to move, {} still connected",
        report["node_id"],
        report["took_ms"],
        report["handed_over"].as_array().map_or(0, Vec::len),
        match report["still_leading"].as_array() {
            Some(g) if !g.is_empty() => format!(" (still leading {g:?})"),
            _ => String::new(),
        },
        report["sessions_asked"],
        report["sessions_left"],
    );
    Ok(())
}

pub fn checkconfig(path: PathBuf) -> anyhow::Result<()> {
    let (config, warnings) = load_config(&path)?;
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
    let token = herald_broker::auth::mint_hs256(&secret, &principal, args.ttl)?;
    match args.out {
        None => println!("{token}"),
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot write the token to {}", path.display()))?;
            writeln!(file, "{token}")
                .with_context(|| format!("cannot write the token to {}", path.display()))?;
        }
    }
    Ok(())
}

/// `herald status --admin A[,B…]`: asks every admin address given; node readiness
/// and each group's state come from the nodes themselves, a group's follower lag from
/// its leader (only the leader knows it). Unreachable nodes are listed as such.
pub async fn status(admin: &str, json: bool) -> anyhow::Result<()> {
    let mut views = Vec::new();
    let mut unreachable = Vec::new();
    for addr in admin.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match super::http::get(addr, "/cluster").await {
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
    let views: Vec<&serde_json::Value> = views.iter().map(|(_, v)| v).collect();
    let groups = merged_groups(first, &views);
    if json {
        let mut merged = first.clone();
        merged["groups"] = serde_json::Value::Array(groups);
        println!("{merged:#}");
        return Ok(());
    }
    let settled = if first["settled"] == true {
        "settled".to_owned()
    } else {
        format!("{} replica move(s) in flight", first["moving"])
    };
    println!("cluster map version {}: {settled}", first["map_version"]);
    println!();
    println!("NODE  ADDR                   READY  GROUPS  LEADS  STATE");
    for n in first["nodes"].as_array().into_iter().flatten() {
        let own = views.iter().find(|v| v["node_id"] == n["id"]);
        let leads = groups.iter().filter(|g| g["leader"] == n["id"]).count();
        let ready = own.map_or("?".to_owned(), |v| v["ready"].to_string());
        let state = if n["leaving"] == true {
            "leaving"
        } else {
            "active"
        };
        println!(
            "{:<5} {:<22} {:<6} {:<7} {:<6} {state}",
            n["id"].to_string(),
            n["addr"].as_str().unwrap_or("?"),
            ready,
            n["groups"].to_string(),
            leads
        );
    }
    println!();
    println!("GROUP  SLOTS       LEADER  TERM  COMMIT  APPLIED  REPLICAS  MOVE     LAG");
    for g in &groups {
        let lag = if g["state"] == "Leader" {
            g["lag"].to_string()
        } else if g["leader"].is_null() {
            "(no leader known to the nodes asked)".to_owned()
        } else {
            "(known on the leader; add its --admin)".to_owned()
        };
        let slots = format!("{}..{}", g["slots"][0], g["slots"][1]);
        // A replica move in flight: "+NEW -OLD".
        let moving = if g["joining"].is_null() {
            "-".to_owned()
        } else {
            format!("+{} -{}", g["joining"], g["removing"])
        };
        let replicas = g["replicas"].to_string();
        println!(
            "{:<6} {:<11} {:<7} {:<5} {:<7} {:<8} {replicas:<9} {moving:<8} {lag}",
            g["id"].to_string(),
            slots,
            g["leader"].to_string(),
            g["term"].to_string(),
            g["commit_index"].to_string(),
            g["applied_index"].to_string(),
        );
    }
    for u in unreachable {
        println!("unreachable: {u}");
    }
    Ok(())
}

/// Every group of the map, each as the best-informed node asked sees it: its leader's
/// view (which has the lag), else the replica with the highest term, else the map's
/// entry alone.
fn merged_groups(
    first: &serde_json::Value,
    views: &[&serde_json::Value],
) -> Vec<serde_json::Value> {
    let mut merged = Vec::new();
    for entry in first["groups"].as_array().into_iter().flatten() {
        let id = &entry["id"];
        let seen: Vec<&serde_json::Value> = views
            .iter()
            .flat_map(|v| v["groups"].as_array().into_iter().flatten())
            .filter(|g| &g["id"] == id && !g["state"].is_null())
            .collect();
        let best = seen
            .iter()
            .find(|g| g["state"] == "Leader")
            .or_else(|| seen.iter().max_by_key(|g| g["term"].as_u64().unwrap_or(0)))
            .copied()
            .unwrap_or(entry);
        merged.push(best.clone());
    }
    merged
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Parser)]
    struct DevCluster {
        #[command(flatten)]
        args: DevClusterArgs,
    }

    fn run(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<()> {
        let mut argv = vec!["herald", "--data-dir", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        dev_cluster(DevCluster::try_parse_from(argv)?.args)
    }

    /// Whether the node certificate in `dir` is valid, for the CA in `dir`, as `name`.
    fn cert_names(dir: &std::path::Path, name: &str) -> bool {
        let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
        let node = CertificateDer::from_pem_file(dir.join("node.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            herald_client::io::crypto_provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &node,
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn hosts_put_node_k_on_host_k_and_into_the_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let hosts = ["--hosts", "node1,node2,node3", "--base-port", "7400"];
        run(&dir, &hosts).unwrap();
        let (config, warnings) = Config::load(&dir.join("node2.toml"), Vec::new()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        config.check().unwrap();
        assert_eq!(config.listen, SocketAddr::from(([0, 0, 0, 0], 7400)));
        assert_eq!(config.admin_listen, SocketAddr::from(([0, 0, 0, 0], 7401)));
        assert_eq!(config.cluster.node_id, 2);
        assert_eq!(
            config.cluster.members,
            ["1=node1:7400", "2=node2:7400", "3=node3:7400"]
        );
        for name in ["node1", "node2", "node3", "localhost", "127.0.0.1"] {
            assert!(cert_names(&dir, name), "certificate lacks {name}");
        }
        assert!(!cert_names(&dir, "node4"));
        // Re-running keeps the files; other hosts are refused, not silently ignored.
        let ca = std::fs::read(dir.join("ca.pem")).unwrap();
        run(&dir, &hosts).unwrap();
        assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
        let err = format!("{:#}", run(&dir, &["--hosts", "a,b,c"]).unwrap_err());
        assert!(err.contains("other host names"), "{err}");
    }

    #[test]
    fn without_hosts_nodes_share_loopback_and_bad_hosts_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        run(&dir, &["--nodes", "2"]).unwrap();
        let (config, _) = Config::load(&dir.join("node2.toml"), Vec::new()).unwrap();
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 7420)));
        assert_eq!(
            config.cluster.members,
            ["1=127.0.0.1:7410", "2=127.0.0.1:7420"]
        );
        assert!(!cert_names(&dir, "node1"));
        // A certificate made without --hosts does not name them: refused, not kept.
        let err = format!(
            "{:#}",
            run(&dir, &["--nodes", "2", "--hosts", "a,b"]).unwrap_err()
        );
        assert!(err.contains("other host names"), "{err}");
        let other = tmp.path().join("d");
        let err = run(&other, &["--hosts", "a,b"]).unwrap_err().to_string();
        assert!(err.contains("one host per node"), "{err}");
        let err = run(&other, &["--nodes", "2", "--hosts", "a,b:1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`b:1`"), "{err}");
    }

    #[test]
    fn initial_writes_the_later_nodes_as_joining_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        run(&dir, &["--nodes", "5", "--initial", "3"]).unwrap();
        let members = ["1=127.0.0.1:7410", "2=127.0.0.1:7420", "3=127.0.0.1:7430"];
        for k in 1..=5u64 {
            let (config, warnings) =
                Config::load(&dir.join(format!("node{k}.toml")), Vec::new()).unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            config.check().unwrap();
            assert_eq!(config.cluster.members, members, "node {k}");
            assert_eq!(config.cluster.join, k > 3, "node {k}");
            // Groups are sized for the initial members: four each.
            assert_eq!(config.cluster.groups, 12, "node {k}");
        }
        let err = run(&tmp.path().join("d"), &["--nodes", "3", "--initial", "4"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--initial must be between 1 and --nodes"),
            "{err}"
        );
    }
}
