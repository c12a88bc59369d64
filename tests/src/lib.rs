//! Harness for tests that run the real `herald` binary over real QUIC.
//!
//! Owns: building the binary once per test process, starting `herald dev` nodes on free
//! loopback ports with a private data directory, minting tokens through the CLI, and a
//! raw protocol client ([`RawClient`]) for tests that must misbehave on purpose (garbage
//! bytes, oversized frames, a reader that never reads).
//! Must not: sleep to synchronise — everything waits on a condition with a deadline
//! ([`wait_until`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use herald_client::io::{client_config, TransportLimits};
use herald_client::wire::{self, Frame, Hello, Request};

pub mod checker;
pub mod cluster;
pub mod compose;
pub mod scaling;
pub mod shards;
pub mod target;

/// Rounds of a fault loop: `HERALD_FAULT_ITERATIONS` (the long runs `.ci/run` does
/// when time allows use 20), else 3.
pub fn fault_iterations() -> usize {
    std::env::var("HERALD_FAULT_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// Logs the test process's own client (publishers, sessions) to stderr, with
/// `HERALD_TEST_CLIENT_LOG` as the filter (e.g. `herald_client=debug`); does nothing
/// when it is unset. The nodes' logs are set apart, by `HERALD_TEST_RUST_LOG`.
pub fn init_client_log() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if let Ok(filter) = std::env::var("HERALD_TEST_CLIENT_LOG") {
            // A second subscriber (another harness set one) is not an error here.
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The path of the `herald` binary, built (once per process) with the profile of this test.
pub fn herald_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_herald().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_herald() -> anyhow::Result<PathBuf> {
    // target/<profile>/deps/<test-binary> → target/<profile>/herald
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory from the test binary")?
        .to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--workspace --tests` resolves features as `cargo test` does (dev-dependencies
    // included), so the dependencies built for the tests are reused rather than built a
    // second time.
    cmd.args([
        "build",
        "--quiet",
        "--workspace",
        "--tests",
        "--bin",
        "herald",
    ]);
    // The variables cargo sets for this test process (CARGO_MANIFEST_DIR, CARGO_PKG_*,
    // …) would reach build scripts that watch them (ring's does) and make this build
    // and the next `cargo test` rebuild half the dependency tree in turn.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_") && !matches!(name.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR")
        {
            cmd.env_remove(name.as_ref());
        }
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo to build herald")?;
    if !status.success() {
        bail!("building the herald binary failed");
    }
    let bin = profile_dir.join("herald");
    if !bin.is_file() {
        bail!("built herald but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Mints a token with `herald token --secret-file SECRET WHO…` (e.g. `--service x`).
pub fn mint_token(secret: &Path, who: &[&str]) -> anyhow::Result<String> {
    mint_token_with(&herald_binary()?, secret, who)
}

/// Like [`mint_token`], with the `herald` binary at `herald` (e.g. the static one the
/// container image holds).
pub fn mint_token_with(herald: &Path, secret: &Path, who: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(herald)
        .arg("token")
        .arg("--secret-file")
        .arg(secret)
        .args(who)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!(
            "herald token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Picks a free UDP port and a free TCP port on loopback.
pub fn free_ports() -> anyhow::Result<(u16, u16)> {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((udp.local_addr()?.port(), tcp.local_addr()?.port()))
}

/// A `herald dev` process on free loopback ports; killed on drop.
pub struct DevNode {
    child: Child,
    /// Its data directory (deleted on drop).
    pub dir: tempfile::TempDir,
    /// QUIC address.
    pub quic_addr: SocketAddr,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
}

impl DevNode {
    /// Starts `herald dev` with default limits.
    pub fn start() -> anyhow::Result<DevNode> {
        Self::start_with_env(&[])
    }

    /// Starts `herald dev` with extra `HERALD_*` variables (e.g. smaller limits).
    pub fn start_with_env(env: &[(&str, &str)]) -> anyhow::Result<DevNode> {
        let dir = tempfile::tempdir()?;
        let (quic, admin) = free_ports()?;
        let mut cmd = Command::new(herald_binary()?);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{quic}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("cannot start herald dev")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("listening ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let line = rx
            .recv_timeout(DEADLINE)
            .context("herald dev did not print its `listening` line in time")?;
        let mut quic_addr = None;
        let mut admin_addr = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("quic=") {
                quic_addr = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("admin=") {
                admin_addr = Some(a.parse()?);
            }
        }
        Ok(DevNode {
            child,
            dir,
            quic_addr: quic_addr.context("no quic= in the listening line")?,
            admin_addr: admin_addr.context("no admin= in the listening line")?,
        })
    }

    /// The CA file clients must trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("dev/ca.pem")
    }

    /// The HS256 secret file.
    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("dev/secret")
    }

    /// Mints a service token with `herald token`.
    pub fn service_token(&self, name: &str) -> anyhow::Result<String> {
        self.mint(&["--service", name])
    }

    /// Mints a user token with `herald token`.
    pub fn user_token(&self, user: u64) -> anyhow::Result<String> {
        self.mint(&["--user", &user.to_string()])
    }

    fn mint(&self, who: &[&str]) -> anyhow::Result<String> {
        mint_token(&self.secret_path(), who)
    }

    /// A client config for this node with `token`.
    pub fn client_config(&self, token: &str) -> anyhow::Result<herald_client::ClientConfig> {
        Ok(herald_client::ClientConfig::builder()
            .addrs([self.quic_addr.to_string().as_str()])
            .ca_file(self.ca_path())
            .token(token.to_owned())
            .client_name("herald-tests")
            .build()?)
    }

    /// A `herald` CLI command aimed at this node, authenticated with `token`.
    pub fn cli(&self, token: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(herald_binary()?);
        cmd.env("HERALD_ADDR", self.quic_addr.to_string())
            .env("HERALD_CA", self.ca_path())
            .env("HERALD_TOKEN", token)
            .env("RUST_LOG", "warn");
        Ok(cmd)
    }

    /// GET a path on the admin HTTP port; returns (status code, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.admin_addr)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin_addr
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        parse_http_response(&response)
    }
}

/// Splits a raw HTTP/1.1 response into (status code, body).
pub fn parse_http_response(response: &str) -> anyhow::Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok((code, body.to_owned()))
}

impl Drop for DevNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `deadline` passes.
pub async fn wait_until<F: FnMut() -> bool>(
    what: &str,
    deadline: Duration,
    mut condition: F,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    while !condition() {
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Like [`wait_until`] with an async condition (e.g. one that asks a node) and the
/// default [`DEADLINE`].
pub async fn wait_until_async<F, Fut>(what: &str, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + DEADLINE;
    while !condition().await {
        if Instant::now() > until {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A protocol-level client that does exactly what a test tells it, including wrong things.
pub struct RawClient {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The sending half of the session stream.
    pub send: quinn::SendStream,
    /// The receiving half of the session stream.
    pub recv: quinn::RecvStream,
    _endpoint: quinn::Endpoint,
}

impl RawClient {
    /// Connects and opens the session stream; sends nothing yet.
    pub async fn connect(node: &DevNode) -> anyhow::Result<RawClient> {
        Self::connect_to(node.quic_addr, &node.ca_path()).await
    }

    /// Like [`RawClient::connect`], to any node: its QUIC address and the CA file it
    /// chains to (e.g. a [`cluster::Cluster`] node).
    pub async fn connect_to(addr: SocketAddr, ca_path: &Path) -> anyhow::Result<RawClient> {
        let ca = std::fs::read(ca_path)?;
        let config = client_config(&ca, wire::ALPN_CLIENT, &TransportLimits::default())?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(addr, "127.0.0.1")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(RawClient {
            conn,
            send,
            recv,
            _endpoint: endpoint,
        })
    }

    /// Connects, sends the preamble and Hello, and reads the broker's preamble and answer.
    pub async fn hello(node: &DevNode, token: &str) -> anyhow::Result<(RawClient, Frame)> {
        Self::hello_to(node.quic_addr, &node.ca_path(), token).await
    }

    /// Like [`RawClient::hello`], to any node (see [`RawClient::connect_to`]).
    pub async fn hello_to(
        addr: SocketAddr,
        ca_path: &Path,
        token: &str,
    ) -> anyhow::Result<(RawClient, Frame)> {
        let mut client = Self::connect_to(addr, ca_path).await?;
        client.send.write_all(&wire::preamble()).await?;
        client
            .write_frame(&Frame::Hello(Hello {
                token: token.to_owned(),
                client_name: "raw".into(),
            }))
            .await?;
        let mut preamble = [0u8; wire::PREAMBLE_LEN];
        client.recv.read_exact(&mut preamble).await?;
        wire::parse_preamble(preamble)?;
        let answer = client.read_frame().await?.context("no answer to Hello")?;
        Ok((client, answer))
    }

    /// Connects and says Hello as `token`, expecting a Welcome.
    pub async fn welcomed(node: &DevNode, token: &str) -> anyhow::Result<RawClient> {
        Self::welcomed_to(node.quic_addr, &node.ca_path(), token).await
    }

    /// Like [`RawClient::welcomed`], to any node (see [`RawClient::connect_to`]).
    pub async fn welcomed_to(
        addr: SocketAddr,
        ca_path: &Path,
        token: &str,
    ) -> anyhow::Result<RawClient> {
        let (client, answer) = Self::hello_to(addr, ca_path, token).await?;
        anyhow::ensure!(
            matches!(answer, Frame::Welcome(_)),
            "expected Welcome, got {answer:?}"
        );
        Ok(client)
    }

    /// Sends a request and returns its reply body (other frames before it are skipped).
    pub async fn call(&mut self, id: u64, body: Request) -> anyhow::Result<wire::Reply> {
        self.request(id, body).await?;
        match self
            .read_until(|f| matches!(f, Frame::Reply { id: i, .. } if *i == id))
            .await?
        {
            Frame::Reply { body, .. } => Ok(body),
            other => bail!("unexpected {other:?}"),
        }
    }

    /// Subscribes to `conv` from `from` and returns the reply.
    pub async fn subscribe(
        &mut self,
        id: u64,
        conv: u64,
        from: Option<u64>,
    ) -> anyhow::Result<wire::Reply> {
        self.call(id, Request::Subscribe { conv, from }).await
    }

    /// Creates group `conv` with `members` (request id `u64::MAX`, never used by tests);
    /// returns whether this call created it.
    pub async fn create_group(&mut self, conv: u64, members: Vec<u64>) -> anyhow::Result<bool> {
        let reply = self
            .call(
                u64::MAX,
                Request::CreateConversation {
                    conv,
                    kind: wire::ConvKind::Group,
                    members,
                },
            )
            .await?;
        match reply {
            wire::Reply::Created { created } => Ok(created),
            other => bail!("create refused: {other:?}"),
        }
    }

    /// Publishes `count` messages to `conv`, pipelined, with request ids and caller keys
    /// `first_id..`; payloads are `m<id>` padded with `padding_bytes` of `x`. Returns the
    /// acked seqs in ack order.
    pub async fn publish_many(
        &mut self,
        conv: u64,
        first_id: u64,
        count: u64,
        padding_bytes: usize,
    ) -> anyhow::Result<Vec<u64>> {
        for id in first_id..first_id + count {
            let mut payload = format!("m{id}").into_bytes();
            payload.resize(payload.len() + padding_bytes, b'x');
            self.request(
                id,
                Request::Publish {
                    conv,
                    key: wire::IdempotencyKey::Caller(format!("k{id}")),
                    payload,
                },
            )
            .await?;
        }
        let mut seqs = Vec::new();
        while seqs.len() < count as usize {
            match self
                .read_until(|f| matches!(f, Frame::Reply { .. }))
                .await?
            {
                Frame::Reply {
                    body: wire::Reply::Published { seq, .. },
                    ..
                } => seqs.push(seq),
                other => bail!("publish failed: {other:?}"),
            }
        }
        Ok(seqs)
    }

    /// Writes one frame.
    pub async fn write_frame(&mut self, frame: &Frame) -> anyhow::Result<()> {
        let bytes = wire::encode_frame(frame, wire::FRAME_BYTES_CEILING)?;
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// Writes a request.
    pub async fn request(&mut self, id: u64, body: Request) -> anyhow::Result<()> {
        self.write_frame(&Frame::Request { id, body }).await
    }

    /// Reads one frame (after the preamble), `None` at end of stream.
    pub async fn read_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        let mut header = [0u8; wire::FRAME_HEADER_LEN];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = wire::parse_frame_header(header, wire::FRAME_BYTES_CEILING, 0)? as usize;
        let mut body = vec![0u8; len];
        self.recv.read_exact(&mut body).await?;
        Ok(Some(wire::decode_body(&body, 0)?))
    }

    /// Reads frames until one matches, with the test deadline.
    pub async fn read_until(
        &mut self,
        mut matches: impl FnMut(&Frame) -> bool,
    ) -> anyhow::Result<Frame> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.read_frame().await? {
                    Some(f) if matches(&f) => return Ok(f),
                    Some(_) => continue,
                    None => bail!("stream ended before the expected frame"),
                }
            }
        })
        .await
        .context("timed out waiting for a frame")?
    }
}
