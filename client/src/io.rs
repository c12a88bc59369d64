//! Frames over QUIC streams, and the QUIC/TLS settings both ends share.
//!
//! Owns: moving [`wire`](crate::wire) frames across a quinn stream (preamble, length-checked
//! reads, batched writes) and building the rustls/quinn configs for chat-sized traffic.
//! Must not: interpret frames (that is the caller's job) or retry anything.

use std::sync::Arc;
use std::time::Duration;

use crate::wire::{self, Frame, FrameDecoder, WireError, PREAMBLE_LEN};

/// Errors moving frames over a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The bytes on the stream broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Reading from the stream failed (connection lost, reset, …).
    #[error("reading from the QUIC stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Reading the preamble failed.
    #[error("reading the preamble failed: {0}")]
    ReadExact(#[from] quinn::ReadExactError),
    /// Writing to the stream failed.
    #[error("writing to the QUIC stream failed: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Size of one read from a stream into the decoder. Small on purpose: every connection
/// holds one, and a million mostly idle sessions must not cost a million large buffers;
/// quinn hands over what it has buffered in pieces of this size, so throughput holds.
const READ_CHUNK_BYTES: usize = 8 * 1024;
/// A writer buffer that grew past this during a burst is released after the flush.
const WRITE_BUFFER_KEEP_BYTES: usize = 64 * 1024;

/// Reads frames from the receiving half of a stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    chunk: Vec<u8>,
}

impl FrameReader {
    /// Wraps `recv`; frames above `frame_bytes_max` are refused.
    pub fn new(recv: quinn::RecvStream, frame_bytes_max: u32) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(frame_bytes_max),
            chunk: vec![0; READ_CHUNK_BYTES],
        }
    }

    /// Reads and checks the peer's preamble. Call once, before [`FrameReader::next`].
    pub async fn read_preamble(&mut self) -> Result<u16, IoError> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        self.recv.read_exact(&mut preamble).await?;
        Ok(wire::parse_preamble(preamble)?)
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, IoError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.recv.read(&mut self.chunk).await? {
                Some(n) => self.decoder.extend(&self.chunk[..n]),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Bytes of complete frames read so far (after the preamble).
    pub fn frame_bytes_read(&self) -> u64 {
        self.decoder.offset()
    }

    /// Stops the peer from sending more (best effort).
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes frames to the sending half of a stream, many per write.
pub struct FrameWriter {
    send: quinn::SendStream,
    frame_bytes_max: u32,
    buffer: Vec<u8>,
}

impl FrameWriter {
    /// Wraps `send`; frames above `frame_bytes_max` are refused before sending.
    pub fn new(send: quinn::SendStream, frame_bytes_max: u32) -> Self {
        FrameWriter {
            send,
            frame_bytes_max,
            buffer: Vec::new(),
        }
    }

    /// Sends the preamble right away.
    pub async fn write_preamble(&mut self) -> Result<(), IoError> {
        self.send.write_all(&wire::preamble()).await?;
        Ok(())
    }

    /// Encodes `frame` into the pending buffer (sent by [`FrameWriter::flush`]).
    pub fn queue(&mut self, frame: &Frame) -> Result<(), IoError> {
        wire::encode_frame_into(frame, self.frame_bytes_max, &mut self.buffer)?;
        Ok(())
    }

    /// Appends bytes that already hold complete encoded frames.
    pub fn queue_encoded(&mut self, frames: &[u8]) {
        self.buffer.extend_from_slice(frames);
    }

    /// Bytes waiting for [`FrameWriter::flush`].
    pub fn pending_len(&self) -> usize {
        self.buffer.len()
    }

    /// Writes everything pending in one stream write.
    pub async fn flush(&mut self) -> Result<usize, IoError> {
        let n = self.buffer.len();
        if n > 0 {
            self.send.write_all(&self.buffer).await?;
            self.buffer.clear();
            if self.buffer.capacity() > WRITE_BUFFER_KEEP_BYTES {
                self.buffer = Vec::new();
            }
        }
        Ok(n)
    }

    /// Queues `frame` and flushes.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), IoError> {
        self.queue(frame)?;
        self.flush().await?;
        Ok(())
    }

    /// Finishes the stream after flushing (the peer sees a clean end).
    pub async fn finish(&mut self) -> Result<(), IoError> {
        self.flush().await?;
        let _ = self.send.finish();
        Ok(())
    }
}

/// Unreliable-datagram bytes buffered per connection, each way (liveness probes only).
pub const DATAGRAM_BUFFER_BYTES: usize = 256;

/// QUIC transport settings sized for many small chat sessions, not bulk transfer
/// (shared/LESSONS.md: quinn's defaults give each connection megabytes of window).
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Receive window of one stream.
    pub stream_window_bytes: u32,
    /// Receive window of one connection (all streams).
    pub connection_window_bytes: u32,
    /// Send buffer of one connection.
    pub send_window_bytes: u64,
    /// Close the connection after this long without any packet.
    pub idle_timeout: Duration,
    /// Send a keep-alive this often; below the idle timeout and below NAT bindings (~30 s).
    pub keep_alive_interval: Duration,
    /// Streams a peer may open at once.
    pub concurrent_bidi_streams: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            stream_window_bytes: 256 * 1024,
            connection_window_bytes: 512 * 1024,
            send_window_bytes: 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            concurrent_bidi_streams: 4,
        }
    }
}

impl TransportLimits {
    /// The quinn transport config for these limits.
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_window_bytes));
        t.receive_window(quinn::VarInt::from_u32(self.connection_window_bytes));
        t.send_window(self.send_window_bytes);
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.concurrent_bidi_streams));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        // Cannot fail: 30 s is far below the VarInt range of IdleTimeout.
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        t.keep_alive_interval(Some(self.keep_alive_interval));
        // Datagrams only carry the client's liveness probes (see `liveness`), which
        // nobody reads: the few bytes buffered hold a handful; older ones are dropped.
        // quinn's default would let a peer park 1.25 MB of them per connection.
        t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES));
        t.datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
        t
    }
}

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file held no certificate.
    #[error(
        "no PEM certificate found in the CA file; expected a `-----BEGIN CERTIFICATE-----` block"
    )]
    NoCertificate,
    /// A PEM block could not be parsed.
    #[error("cannot parse PEM: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration refused: {0}")]
    Quic(String),
}

/// Parses every certificate in a PEM file.
pub fn parse_certificates(
    pem: &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// The ring crypto provider, used everywhere (no process-wide default needed).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn client config that trusts exactly the CAs in `ca_pem` and offers `alpn`.
/// There is deliberately no way to skip server verification.
pub fn client_config(
    ca_pem: &[u8],
    alpn: &[u8],
    limits: &TransportLimits,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certificates(ca_pem)? {
        roots.add(cert)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(limits.transport_config()));
    Ok(config)
}
