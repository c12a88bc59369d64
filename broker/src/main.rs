//! `herald`: run a node, mint tokens, and talk to a cluster from a shell.
//!
//! Every command prints errors to stderr with a reason a person can act on and exits
//! non-zero. The command-line surface is BRIEF §5; keep README.md in step with it.

mod cli;

/// mimalloc instead of the system allocator: profiles of the fan-out path showed
/// glibc malloc/free at ~17% of CPU (buffers freed on other threads than allocated them).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Herald: message delivery over QUIC. Run a node (`herald dev`), mint tokens, and
/// publish and subscribe from a shell.
#[derive(Parser, Debug)]
#[command(name = "herald", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One node, zero config: creates DATA/dev/ca.pem and DATA/dev/secret and serves.
    Dev {
        /// Where to keep data, certificates and the token secret.
        #[arg(long, default_value = "herald-data")]
        data_dir: PathBuf,
        /// QUIC (UDP) address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: std::net::SocketAddr,
        /// Admin HTTP (TCP) address.
        #[arg(long, default_value = "127.0.0.1:7401")]
        admin: std::net::SocketAddr,
    },
    /// Run a node from a config file (TOML; HERALD_* environment variables override it).
    Serve {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write everything a local N-node cluster needs and print the commands that start it.
    ///
    /// Without `--hosts` the nodes share this machine, and each config gets its share
    /// of the cores (`worker_threads` = cores ÷ nodes, at least 1).
    DevCluster(cli::node::DevClusterArgs),
    /// Print the default configuration as TOML.
    Defaultconfig,
    /// Check a config file and report every problem.
    Checkconfig {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Mint a token signed with the HS256 secret.
    Token(cli::node::TokenArgs),
    /// Drain a running node before stopping it: it refuses new sessions, hands its
    /// Raft leaderships to other replicas and tells its sessions to move (SIGTERM
    /// does the same, then exits).
    Drain(cli::node::DrainArgs),
    /// Create conversations and change their members (service token).
    #[command(subcommand)]
    Conv(ConvCommand),
    /// Publish messages; prints each acked seq on its own line.
    Pub(cli::client::PubArgs),
    /// Subscribe and print deliveries.
    Sub(cli::client::SubArgs),
    /// Read stored messages.
    History(cli::client::HistoryArgs),
    /// Nodes, groups, leaders and lag (from the admin HTTP `/cluster`).
    Status(StatusArgs),
    /// Add or remove nodes; replicas move by Raft membership change, a few at a time.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Add a node (start it first, with the cluster's secrets and `cluster.node_id`);
    /// replicas then move to it until the cluster is balanced.
    AddNode(cli::cluster::AddNodeArgs),
    /// Drain a node (its replicas move to the others), then remove it from the map.
    RemoveNode(cli::cluster::RemoveNodeArgs),
}

#[derive(Subcommand, Debug)]
enum ConvCommand {
    /// Create a conversation (idempotent).
    Create(cli::client::ConvCreateArgs),
    /// Add members.
    AddMembers(cli::client::ConvMembersArgs),
    /// Remove members.
    RemoveMembers(cli::client::ConvMembersArgs),
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Admin HTTP address(es) of nodes, HOST:PORT[,HOST:PORT…]: each node reports its
    /// own state; follower lag comes from the leader.
    #[arg(long, env = "HERALD_ADMIN", default_value = "127.0.0.1:7401")]
    admin: String,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

/// The runtime threads a loaded `herald serve` config asks for (`worker_threads`, or
/// `HERALD_WORKER_THREADS`); `None` for the default (one per core), and for a value
/// out of bounds (the config check then reports it).
fn worker_threads(config: &herald_broker::config::Config) -> Option<usize> {
    (1..=herald_broker::config::WORKER_THREADS_MAX)
        .contains(&config.worker_threads)
        .then_some(config.worker_threads)
}

fn main() -> ExitCode {
    // First, before the allocator has mapped much (see `memory`).
    let thp = herald_broker::memory::disable_transparent_huge_pages();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = thp {
        tracing::info!(error = %e, "cannot turn transparent huge pages off; keeping the kernel's default");
    }
    // `herald serve`'s config is read once, here: it sizes the runtime.
    let mut serve_config = match &cli.command {
        Command::Serve { config } => Some(cli::node::load_config(config)),
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = serve_config
        .as_ref()
        .and_then(|loaded| loaded.as_ref().ok())
        .and_then(|(config, _)| worker_threads(config))
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev {
                data_dir,
                listen,
                admin,
            } => cli::node::dev(data_dir, listen, admin).await,
            Command::Serve { config } => match serve_config.take() {
                Some(loaded) => cli::node::serve(loaded).await,
                // Loaded above for every `serve`; kept total rather than assumed.
                None => cli::node::serve(cli::node::load_config(&config)).await,
            },
            Command::DevCluster(args) => cli::node::dev_cluster(args),
            Command::Defaultconfig => {
                print!("{}", herald_broker::config::Config::default_toml());
                Ok(())
            }
            Command::Checkconfig { config } => cli::node::checkconfig(config),
            Command::Token(args) => cli::node::token(args),
            Command::Drain(args) => cli::node::drain(args).await,
            Command::Conv(ConvCommand::Create(args)) => cli::client::conv_create(args).await,
            Command::Conv(ConvCommand::AddMembers(args)) => {
                cli::client::conv_members(args, true).await
            }
            Command::Conv(ConvCommand::RemoveMembers(args)) => {
                cli::client::conv_members(args, false).await
            }
            Command::Pub(args) => cli::client::publish(args).await,
            Command::Sub(args) => cli::client::subscribe(args).await,
            Command::History(args) => cli::client::history(args).await,
            Command::Status(args) => cli::node::status(&args.admin, args.json).await,
            Command::Cluster(ClusterCommand::AddNode(args)) => cli::cluster::add_node(args).await,
            Command::Cluster(ClusterCommand::RemoveNode(args)) => {
                cli::cluster::remove_node(args).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
