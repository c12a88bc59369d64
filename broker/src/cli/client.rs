//! Client commands: `conv`, `pub`, `sub`, `history`, through the `herald-client` crate.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use herald_client::wire::{ConvKind, IdempotencyKey, Message};
use herald_client::{ClientConfig, Publisher, Session, SessionEvent};

/// Flags every client command takes.
#[derive(Args, Debug, Clone)]
pub struct ClientFlags {
    /// Seed nodes, HOST:PORT[,HOST:PORT…]; the client finds the right node itself.
    #[arg(
        long,
        env = "HERALD_ADDR",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    addr: Vec<String>,
    /// CA certificate to trust (default: herald-data/dev/ca.pem when it exists).
    #[arg(long, env = "HERALD_CA")]
    ca: Option<PathBuf>,
    /// Token (JWT); mint one with `herald token`.
    #[arg(
        long,
        env = "HERALD_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the token (e.g. one `herald token --out` wrote, or a mounted
    /// secret); surrounding whitespace is ignored.
    #[arg(long, env = "HERALD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ClientFlags {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let ca = match &self.ca {
            Some(path) => path.clone(),
            None => {
                let default = PathBuf::from("herald-data/dev/ca.pem");
                if !default.is_file() {
                    bail!("no CA certificate: pass --ca FILE (herald dev writes DATA/dev/ca.pem)");
                }
                default
            }
        };
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?
                .trim()
                .to_owned(),
            (None, None) => bail!(
                "no token: pass --token JWT or --token-file FILE, or set HERALD_TOKEN \
                 (mint one with `herald token`)"
            ),
        };
        Ok(ClientConfig::builder()
            .addrs(self.addr.iter().map(String::as_str))
            .ca_file(&ca)
            .token(token)
            .client_name(concat!("herald-cli/", env!("CARGO_PKG_VERSION")))
            .build()?)
    }
}

/// `herald conv create`.
#[derive(Args, Debug)]
pub struct ConvCreateArgs {
    /// Conversation id.
    #[arg(long)]
    id: u64,
    /// direct, group or channel.
    #[arg(long)]
    kind: ConvKind,
    /// Members (owners, for a channel), comma separated.
    #[arg(long, value_delimiter = ',')]
    members: Vec<u64>,
    #[command(flatten)]
    client: ClientFlags,
}

/// `herald conv add-members` / `remove-members`.
#[derive(Args, Debug)]
pub struct ConvMembersArgs {
    /// Conversation id.
    #[arg(long)]
    id: u64,
    /// User ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    members: Vec<u64>,
    #[command(flatten)]
    client: ClientFlags,
}

/// `herald pub`.
#[derive(Args, Debug)]
pub struct PubArgs {
    /// Conversation id.
    #[arg(long)]
    conv: u64,
    /// Idempotency key; a retry with the same key returns the original seq.
    /// With --count K the keys are KEY#1 … KEY#K.
    #[arg(long)]
    key: Option<String>,
    /// Publish K messages: MESSAGE #1 … MESSAGE #K.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// The message text.
    message: String,
    #[command(flatten)]
    client: ClientFlags,
}

/// `herald sub`.
#[derive(Args, Debug)]
pub struct SubArgs {
    /// Conversation ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    conv: Vec<u64>,
    /// First seq to deliver (1 = all retained history), then live; without it only new messages.
    #[arg(long)]
    from: Option<u64>,
    /// Exit after K deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// One JSON object per delivery: {"conv","seq","sender","payload"}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientFlags,
}

/// `herald history`.
#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Conversation id.
    #[arg(long)]
    conv: u64,
    /// First seq (1 = oldest retained).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Most messages to print.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientFlags,
}

pub async fn conv_create(args: ConvCreateArgs) -> anyhow::Result<()> {
    let publisher = Publisher::connect(args.client.config()?).await?;
    let created = publisher
        .create_conversation(args.id, args.kind, &args.members)
        .await?;
    println!(
        "conversation {} {}",
        args.id,
        if created { "created" } else { "already exists" }
    );
    publisher.close().await;
    Ok(())
}

pub async fn conv_members(args: ConvMembersArgs, add: bool) -> anyhow::Result<()> {
    let publisher = Publisher::connect(args.client.config()?).await?;
    if add {
        publisher.add_members(args.id, &args.members).await?;
    } else {
        publisher.remove_members(args.id, &args.members).await?;
    }
    println!(
        "conversation {}: members {}",
        args.id,
        if add { "added" } else { "removed" }
    );
    publisher.close().await;
    Ok(())
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let publisher = Publisher::connect(args.client.config()?).await?;
    for i in 1..=args.count {
        let text = if args.count == 1 {
            args.message.clone()
        } else {
            format!("{} #{i}", args.message)
        };
        let ack = match &args.key {
            Some(key) => {
                let key = if args.count == 1 {
                    key.clone()
                } else {
                    format!("{key}#{i}")
                };
                publisher
                    .publish_with_key(args.conv, IdempotencyKey::Caller(key), text)
                    .await?
            }
            None => publisher.publish(args.conv, text).await?,
        };
        println!("{}", ack.seq);
    }
    publisher.close().await;
    Ok(())
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let mut session = Session::connect(args.client.config()?).await?;
    for conv in &args.conv {
        session
            .subscribe(*conv, args.from)
            .await
            .with_context(|| format!("cannot subscribe to conversation {conv}"))?;
    }
    let mut delivered = 0u64;
    if args.count == Some(0) {
        session.close().await;
        return Ok(());
    }
    while let Some(event) = session.next().await {
        match event? {
            SessionEvent::Message(m) => {
                print_message(&m, args.json);
                delivered += 1;
                if args.count.is_some_and(|k| delivered >= k) {
                    break;
                }
            }
            SessionEvent::Truncated {
                conv,
                requested_from,
                first_available_seq,
            } => eprintln!(
                "note: conversation {conv}: messages {requested_from}..{} are past retention; continuing from {first_available_seq}",
                first_available_seq.saturating_sub(1)
            ),
            SessionEvent::Unsubscribed { conv, reason } => {
                eprintln!("note: conversation {conv}: unsubscribed by the broker: {reason}")
            }
            SessionEvent::Reconnected { addr } => {
                eprintln!("note: reconnected to {addr}; resumed from the last seq seen")
            }
            _ => {}
        }
    }
    session.close().await;
    if let Some(k) = args.count {
        if delivered < k {
            bail!("the stream ended after {delivered} of {k} deliveries");
        }
    }
    Ok(())
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let publisher = Publisher::connect(args.client.config()?).await?;
    let page = publisher.history(args.conv, args.from, args.limit).await?;
    if page.first_seq > args.from {
        eprintln!(
            "note: messages before seq {} are past retention (asked from {})",
            page.first_seq, args.from
        );
    }
    for m in &page.messages {
        print_message(m, args.json);
    }
    publisher.close().await;
    Ok(())
}

fn print_message(m: &Message, json: bool) {
    let payload = String::from_utf8_lossy(&m.payload);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "conv": m.conv,
                "seq": m.seq,
                "sender": m.sender.to_string(),
                "payload": payload,
            })
        );
    } else {
        println!("[{}#{}] {}: {}", m.conv, m.seq, m.sender, payload);
    }
}
