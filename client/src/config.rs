//! Client configuration: where the brokers are, whom to trust, who we are, and the
//! bound on every queue, timeout and retry loop of the client.
//!
//! Owns: [`ClientConfig`] and its builder, and checking every value once, at
//! [`ClientConfigBuilder::build`], so that a bad value is a clear
//! [`Error::Config`] up front and never a surprise on the network. It also builds the
//! quinn/rustls client configuration, which always verifies the broker's certificate
//! against the configured CA.
//! Must not: open sockets, or offer any way to skip certificate verification.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::io::{self, TransportLimits};
use crate::liveness::{DEFAULT_LIVENESS_TIMEOUT, LIVENESS_TIMEOUT_MIN};
use crate::wire;

/// Default for [`ClientConfigBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`ClientConfigBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default lower bound of [`ClientConfigBuilder::reconnect_backoff`].
pub const DEFAULT_RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Default upper bound of [`ClientConfigBuilder::reconnect_backoff`].
pub const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Default for [`ClientConfigBuilder::outbound_queue_len_max`].
pub const DEFAULT_OUTBOUND_QUEUE_LEN_MAX: usize = 1024;
/// Default for [`ClientConfigBuilder::requests_in_flight_max`].
pub const DEFAULT_REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Largest accepted value of the two queue bounds (a typo guard, not a tuning hint).
pub const QUEUE_LEN_CEILING: usize = 1 << 20;

/// One seed address, `HOST:PORT`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeedAddr {
    /// As the user wrote it (used in errors and events).
    pub(crate) text: String,
    /// Host without IPv6 brackets: an IP literal or a DNS name. Also the TLS server name.
    pub(crate) host: String,
    /// UDP port.
    pub(crate) port: u16,
}

impl SeedAddr {
    /// Parses `HOST:PORT`, `[IPv6]:PORT`.
    pub(crate) fn parse(text: &str) -> Result<SeedAddr, Error> {
        let bad = |why: &str| {
            Error::Config {
            reason: format!("bad broker address `{text}`: {why}; expected HOST:PORT, e.g. 127.0.0.1:7400, localhost:7400 or [::1]:7400"),
        }
        };
        let trimmed = text.trim();
        let Some((host, port)) = trimmed.rsplit_once(':') else {
            return Err(bad("no port"));
        };
        let host = if let Some(inner) = host.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return Err(bad("unbalanced `[`"));
            };
            if inner.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("the part in brackets is not an IPv6 address"));
            }
            inner
        } else {
            if host.contains(':') {
                return Err(bad("an IPv6 address must be written in brackets"));
            }
            host
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        // The host is also the name the broker's certificate must carry.
        if rustls_pki_types::ServerName::try_from(host).is_err() {
            return Err(bad(
                "the host is neither an IP address nor a valid DNS name",
            ));
        }
        Ok(SeedAddr {
            text: trimmed.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for SeedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Everything a [`Publisher`](crate::Publisher) or [`Session`](crate::Session) needs to
/// connect. Build one with [`ClientConfig::builder`]; it is cheap to clone.
///
/// `Debug` never prints the token.
#[derive(Clone)]
pub struct ClientConfig {
    pub(crate) addrs: Vec<SeedAddr>,
    pub(crate) token: String,
    pub(crate) client_name: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) liveness_timeout: Duration,
    pub(crate) reconnect_backoff_min: Duration,
    pub(crate) reconnect_backoff_max: Duration,
    pub(crate) reconnect_attempts_max: Option<u32>,
    pub(crate) outbound_queue_len_max: usize,
    pub(crate) requests_in_flight_max: usize,
    pub(crate) quic: quinn::ClientConfig,
    /// Connect to the first seed first (a route to a known leader), not a random one.
    pub(crate) prefer_first: bool,
}

impl ClientConfig {
    /// A builder with the defaults (`DEFAULT_*` constants of this module).
    pub fn builder() -> ClientConfigBuilder {
        ClientConfigBuilder::default()
    }

    /// The seed addresses, as given.
    pub fn addrs(&self) -> impl Iterator<Item = &str> {
        self.addrs.iter().map(|a| a.text.as_str())
    }
    /// The name sent in `Hello` (appears in broker logs).
    pub fn client_name(&self) -> &str {
        &self.client_name
    }
    /// Bound on one connection attempt: QUIC + TLS handshake and Hello/Welcome.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// Bound on one request, from the call to its reply, retries across reconnects included.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
    /// Silence from the node, while a reply is owed, after which the client counts the
    /// node as dead and reconnects elsewhere (see [`ClientConfigBuilder::liveness_timeout`]).
    pub fn liveness_timeout(&self) -> Duration {
        self.liveness_timeout
    }
    /// Lower and upper bound of the reconnect delay.
    pub fn reconnect_backoff(&self) -> (Duration, Duration) {
        (self.reconnect_backoff_min, self.reconnect_backoff_max)
    }
    /// Reconnect passes over the seed list before giving up; `None` = never give up.
    pub fn reconnect_attempts_max(&self) -> Option<u32> {
        self.reconnect_attempts_max
    }
    /// Events a [`Session`](crate::Session) buffers for the application.
    pub fn outbound_queue_len_max(&self) -> usize {
        self.outbound_queue_len_max
    }
    /// Requests one client may have waiting for a reply at once.
    pub fn requests_in_flight_max(&self) -> usize {
        self.requests_in_flight_max
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field(
                "addrs",
                &self.addrs.iter().map(|a| &a.text).collect::<Vec<_>>(),
            )
            .field("token", &"<redacted>")
            .field("client_name", &self.client_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("liveness_timeout", &self.liveness_timeout)
            .field("reconnect_backoff_min", &self.reconnect_backoff_min)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("reconnect_attempts_max", &self.reconnect_attempts_max)
            .field("outbound_queue_len_max", &self.outbound_queue_len_max)
            .field("requests_in_flight_max", &self.requests_in_flight_max)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum CaSource {
    Pem(Vec<u8>),
    File(PathBuf),
}

/// Builds a [`ClientConfig`]; every setter takes and returns the builder.
///
/// Required: [`addrs`](Self::addrs), a CA ([`ca_pem`](Self::ca_pem) or
/// [`ca_file`](Self::ca_file)) and a [`token`](Self::token).
#[derive(Clone)]
pub struct ClientConfigBuilder {
    addrs: Vec<String>,
    ca: Option<CaSource>,
    token: Option<String>,
    client_name: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    liveness_timeout: Duration,
    reconnect_backoff_min: Duration,
    reconnect_backoff_max: Duration,
    reconnect_attempts_max: Option<u32>,
    outbound_queue_len_max: usize,
    requests_in_flight_max: usize,
    transport: TransportLimits,
}

impl Default for ClientConfigBuilder {
    fn default() -> Self {
        ClientConfigBuilder {
            addrs: Vec::new(),
            ca: None,
            token: None,
            client_name: concat!("herald-client/", env!("CARGO_PKG_VERSION")).to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            reconnect_backoff_min: DEFAULT_RECONNECT_BACKOFF_MIN,
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX,
            reconnect_attempts_max: None,
            outbound_queue_len_max: DEFAULT_OUTBOUND_QUEUE_LEN_MAX,
            requests_in_flight_max: DEFAULT_REQUESTS_IN_FLIGHT_MAX,
            transport: TransportLimits::default(),
        }
    }
}

impl fmt::Debug for ClientConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfigBuilder")
            .field("addrs", &self.addrs)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

impl ClientConfigBuilder {
    /// The seed list: `HOST:PORT` strings (`[v6]:PORT` for IPv6). The host is also the
    /// name the broker's certificate must carry. Replaces any earlier list.
    pub fn addrs<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.addrs = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// The CA certificate(s), PEM, that the broker's certificate must chain to
    /// (`herald dev` writes `DIR/dev/ca.pem`).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(CaSource::Pem(pem.into()));
        self
    }

    /// Like [`ca_pem`](Self::ca_pem), read from a file when [`build`](Self::build) runs.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(CaSource::File(path.into()));
        self
    }

    /// The JWT sent in `Hello` (`herald token` prints one).
    pub fn token(mut self, jwt: impl Into<String>) -> Self {
        self.token = Some(jwt.into());
        self
    }

    /// Free text for the broker's logs. Default `herald-client/VERSION`.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Bound on one connection attempt to one address (QUIC and TLS handshake plus
    /// Hello/Welcome). Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on one request from the call until its reply, including waiting for a
    /// free in-flight slot and retries across reconnects. At the bound the call
    /// returns [`Error::Timeout`]. Default 10 s. Also bounds how long `close` waits
    /// for the broker to finish.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long the node may stay silent while a reply is owed before the client
    /// counts it as dead, drops the connection and reconnects to the next seed,
    /// re-sending what is owed. Default [`DEFAULT_LIVENESS_TIMEOUT`]; at least
    /// [`LIVENESS_TIMEOUT_MIN`].
    ///
    /// While a reply is owed and the node has said nothing for 100 ms, the client
    /// sends a 1-byte QUIC datagram, which a live node's QUIC stack acknowledges at
    /// once however long the reply itself takes (an election, say); a dead node
    /// answers nothing. A session's idle connection sends nothing extra (it relies on
    /// the QUIC idle timeout); a publisher's connections are probed while idle too,
    /// so a write routed to one of them never waits out a timeout of its own. A node
    /// found dead by one connection is dead for every connection of the process to
    /// the same address opened before its silence began.
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// Reconnect delays grow exponentially from `min`, capped at `max`, with full
    /// jitter between `min` and the current cap. Default 100 ms .. 10 s.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff_min = min;
        self.reconnect_backoff_max = max;
        self
    }

    /// Passes over the seed list after a connection drops before the client gives up
    /// with [`Error::ReconnectExhausted`]. `None` (the default) retries forever;
    /// `Some(0)` never reconnects.
    pub fn reconnect_attempts_max(mut self, attempts: Option<u32>) -> Self {
        self.reconnect_attempts_max = attempts;
        self
    }

    /// Events (messages and notices) a [`Session`](crate::Session) buffers for the
    /// application. When the buffer is full the client stops reading from the broker,
    /// QUIC flow control pushes back, and the broker treats the session as a slow
    /// consumer (it reports `Lagged` or disconnects; the client then resyncs from its
    /// cursor, losing nothing). Replies queue behind undelivered events, so a
    /// session must be read. Default 1024.
    pub fn outbound_queue_len_max(mut self, len: usize) -> Self {
        self.outbound_queue_len_max = len;
        self
    }

    /// Requests waiting for a reply at once; a further call waits for a free slot
    /// (within its request timeout). Default 1024.
    pub fn requests_in_flight_max(mut self, n: usize) -> Self {
        self.requests_in_flight_max = n;
        self
    }

    /// QUIC windows, idle timeout and keep-alive. Default [`TransportLimits::default`].
    pub fn transport_limits(mut self, limits: TransportLimits) -> Self {
        self.transport = limits;
        self
    }

    /// Checks every value and builds the configuration (reading the CA file now).
    pub fn build(self) -> Result<ClientConfig, Error> {
        let config_err = |reason: String| Error::Config { reason };
        if self.addrs.is_empty() {
            return Err(config_err(
                "no broker address: pass at least one HOST:PORT, e.g. 127.0.0.1:7400".into(),
            ));
        }
        let addrs = self
            .addrs
            .iter()
            .map(|a| SeedAddr::parse(a))
            .collect::<Result<Vec<_>, _>>()?;

        let ca_pem = match self.ca {
            None => {
                return Err(config_err(
                    "no CA certificate: pass the PEM file the broker's certificate chains to \
                     (`herald dev` writes herald-data/dev/ca.pem)"
                        .into(),
                ))
            }
            Some(CaSource::Pem(pem)) => pem,
            Some(CaSource::File(path)) => std::fs::read(&path)
                .map_err(|e| config_err(format!("cannot read CA file {}: {e}", path.display())))?,
        };

        let token = self.token.unwrap_or_default();
        if token.trim().is_empty() {
            return Err(config_err(
                "no token: pass a JWT (`herald token --secret-file F --user ID` prints one)".into(),
            ));
        }

        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(config_err(format!("{name} must be above zero")))
            } else {
                Ok(())
            }
        };
        positive("connect_timeout", self.connect_timeout)?;
        positive("request_timeout", self.request_timeout)?;
        if self.liveness_timeout < LIVENESS_TIMEOUT_MIN {
            return Err(config_err(format!(
                "liveness_timeout is {:?}; it must be at least {LIVENESS_TIMEOUT_MIN:?} (a few probe round trips)",
                self.liveness_timeout
            )));
        }
        positive("reconnect_backoff min", self.reconnect_backoff_min)?;
        if self.reconnect_backoff_min > self.reconnect_backoff_max {
            return Err(config_err(format!(
                "reconnect_backoff: min {:?} is above max {:?}",
                self.reconnect_backoff_min, self.reconnect_backoff_max
            )));
        }
        for (name, value) in [
            ("outbound_queue_len_max", self.outbound_queue_len_max),
            ("requests_in_flight_max", self.requests_in_flight_max),
        ] {
            if value == 0 || value > QUEUE_LEN_CEILING {
                return Err(config_err(format!(
                    "{name} is {value}; it must be from 1 to {QUEUE_LEN_CEILING}"
                )));
            }
        }
        if self.transport.keep_alive_interval >= self.transport.idle_timeout {
            return Err(config_err(format!(
                "keep-alive interval {:?} must be below the idle timeout {:?}",
                self.transport.keep_alive_interval, self.transport.idle_timeout
            )));
        }

        let quic = io::client_config(&ca_pem, wire::ALPN_CLIENT, &self.transport)?;
        Ok(ClientConfig {
            addrs,
            token,
            client_name: self.client_name,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            liveness_timeout: self.liveness_timeout,
            reconnect_backoff_min: self.reconnect_backoff_min,
            reconnect_backoff_max: self.reconnect_backoff_max,
            reconnect_attempts_max: self.reconnect_attempts_max,
            outbound_queue_len_max: self.outbound_queue_len_max,
            requests_in_flight_max: self.requests_in_flight_max,
            quic,
            prefer_first: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway self-signed certificate (only parsed here, never trusted for anything).
    pub(crate) const TEST_CA_PEM: &str = include_str!("../tests/data/ca.pem");

    fn valid() -> ClientConfigBuilder {
        ClientConfig::builder()
            .addrs(["127.0.0.1:7400"])
            .ca_pem(TEST_CA_PEM)
            .token("a.b.c")
    }

    fn reason(b: ClientConfigBuilder) -> String {
        match b.build() {
            Err(Error::Config { reason }) => reason,
            Err(other) => panic!("expected a config error, got {other}"),
            Ok(c) => panic!("expected a config error, got {c:?}"),
        }
    }

    #[test]
    fn defaults_build() {
        let c = valid().build().unwrap();
        assert_eq!(c.addrs().collect::<Vec<_>>(), ["127.0.0.1:7400"]);
        assert_eq!(c.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.request_timeout(), DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.reconnect_attempts_max(), None);
        assert_eq!(c.outbound_queue_len_max(), DEFAULT_OUTBOUND_QUEUE_LEN_MAX);
        assert!(c.client_name().starts_with("herald-client/"));
    }

    #[test]
    fn debug_never_prints_the_token() {
        let c = valid().token("secret.jwt.value").build().unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("secret.jwt.value"), "{text}");
        assert!(text.contains("<redacted>"));
        let b = valid().token("secret.jwt.value");
        assert!(!format!("{b:?}").contains("secret.jwt.value"));
    }

    #[test]
    fn addresses_are_parsed_and_checked() {
        let c = valid()
            .addrs(["localhost:7400", "[::1]:7401", "10.0.0.1:1"])
            .build()
            .unwrap();
        let hosts: Vec<_> = c.addrs.iter().map(|a| (a.host.as_str(), a.port)).collect();
        assert_eq!(hosts, [("localhost", 7400), ("::1", 7401), ("10.0.0.1", 1)]);
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            ":7400",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:7400",
            "[::1:7400",
            "[nope]:7400",
            "bad host:7400",
        ] {
            let r = reason(valid().addrs([bad]));
            assert!(r.contains(bad), "{bad}: {r}");
        }
        assert!(reason(valid().addrs(Vec::<String>::new())).contains("no broker address"));
    }

    #[test]
    fn missing_ca_or_token_is_named() {
        let no_ca = ClientConfig::builder().addrs(["127.0.0.1:7400"]).token("t");
        assert!(reason(no_ca).contains("CA"));
        let no_token = ClientConfig::builder()
            .addrs(["127.0.0.1:7400"])
            .ca_pem(TEST_CA_PEM);
        assert!(reason(no_token).contains("token"));
        assert!(reason(valid().token("  ")).contains("token"));
        let missing = reason(valid().ca_file("/nonexistent/ca.pem"));
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        assert!(matches!(
            valid().ca_pem("not pem").build(),
            Err(Error::Tls(_))
        ));
    }

    #[test]
    fn bounds_are_checked() {
        assert!(reason(valid().connect_timeout(Duration::ZERO)).contains("connect_timeout"));
        assert!(reason(valid().request_timeout(Duration::ZERO)).contains("request_timeout"));
        assert!(reason(valid().liveness_timeout(Duration::from_millis(10)))
            .contains("liveness_timeout"));
        assert!(
            reason(valid().reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1)))
                .contains("min")
        );
        assert!(
            reason(valid().reconnect_backoff(Duration::ZERO, Duration::from_secs(1)))
                .contains("min")
        );
        assert!(reason(valid().outbound_queue_len_max(0)).contains("outbound_queue_len_max"));
        assert!(
            reason(valid().requests_in_flight_max(QUEUE_LEN_CEILING + 1))
                .contains("requests_in_flight_max")
        );
        let limits = TransportLimits {
            keep_alive_interval: Duration::from_secs(30),
            ..TransportLimits::default()
        };
        assert!(reason(valid().transport_limits(limits)).contains("keep-alive"));
        // Equal bounds are fine (constant delay); Some(0) disables reconnecting.
        valid()
            .reconnect_backoff(Duration::from_secs(1), Duration::from_secs(1))
            .reconnect_attempts_max(Some(0))
            .build()
            .unwrap();
    }

    #[test]
    fn ca_file_is_read_at_build() {
        let dir = std::env::temp_dir().join(format!("herald-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, TEST_CA_PEM).unwrap();
        valid().ca_file(&path).build().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
