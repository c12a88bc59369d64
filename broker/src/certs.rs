//! Certificates and secrets for zero-config use, and loading TLS files for a node.
//!
//! Owns: generating a development CA, node certificates signed by it, and token secrets
//! (`herald dev`); turning PEM files into a quinn server config. Must not: ever build a
//! client config that skips verification (clients trust exactly the CA file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_client::io::{crypto_provider, TransportLimits};
use herald_client::wire::{ALPN_CLIENT, ALPN_PEER};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors creating or loading certificates and secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// rcgen could not generate a certificate.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file did not hold what it should.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls or quinn refused the certificate and key.
    #[error("TLS refused the certificate/key: {0}")]
    Tls(String),
}

/// The files `herald dev` keeps under `DATA/dev/`.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// The CA clients trust (`--ca`).
    pub ca_pem: PathBuf,
    /// The node's certificate (signed by the CA).
    pub node_cert: PathBuf,
    /// The node's private key.
    pub node_key: PathBuf,
    /// The HS256 token secret.
    pub secret: PathBuf,
}

impl DevFiles {
    /// The paths under `dir` (usually `DATA/dev`).
    pub fn in_dir(dir: &Path) -> Self {
        DevFiles {
            ca_pem: dir.join("ca.pem"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node.key"),
            secret: dir.join("secret"),
        }
    }

    /// Creates whatever is missing; keeps what exists, so restarting `herald dev` keeps
    /// the CA that clients already trust and the secret their tokens were signed with.
    pub fn ensure(&self) -> Result<(), CertError> {
        if let Some(dir) = self.ca_pem.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
                action: "cannot create directory",
                path: dir.to_owned(),
                source,
            })?;
        }
        if !(self.ca_pem.is_file() && self.node_cert.is_file() && self.node_key.is_file()) {
            let pki = generate_pki(&["localhost", "127.0.0.1", "::1"])?;
            write_file(&self.ca_pem, pki.ca_pem.as_bytes(), false)?;
            write_file(&self.node_cert, pki.node_cert_pem.as_bytes(), false)?;
            write_file(&self.node_key, pki.node_key_pem.as_bytes(), true)?;
        }
        if !self.secret.is_file() {
            write_file(&self.secret, random_secret().as_bytes(), true)?;
        }
        Ok(())
    }
}

/// A freshly generated CA and one node certificate signed by it (PEM text).
pub struct GeneratedPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The node certificate.
    pub node_cert_pem: String,
    /// The node's private key.
    pub node_key_pem: String,
}

/// Generates a CA and a node certificate for `names` (DNS names or IP addresses).
pub fn generate_pki(names: &[&str]) -> Result<GeneratedPki, CertError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Herald development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let node_key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Herald node");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_cert = params.signed_by(&node_key, &ca_cert, &ca_key)?;
    Ok(GeneratedPki {
        ca_pem: ca_cert.pem(),
        node_cert_pem: node_cert.pem(),
        node_key_pem: node_key.serialize_pem(),
    })
}

/// 32 random bytes, hex-encoded: an HS256 secret.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut out = String::with_capacity(65);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('\n');
    out
}

/// Length of the QUIC stateless-reset key.
const RESET_KEY_BYTES: usize = 64;

/// The key of the node's connection-id generator, derived from its stateless-reset key
/// so that it, too, survives restarts: a restarted node recognizes the ids it handed
/// out before and answers their packets with a stateless reset (quinn's ids carry a
/// check hash keyed by this, not a secret: the key only has to be stable).
pub fn connection_id_key(reset_key: &ring::hmac::Key) -> u64 {
    let tag = ring::hmac::sign(reset_key, b"herald connection id generator");
    let mut first = [0u8; 8];
    // Invariant: an HMAC-SHA256 tag is 32 bytes, so the first 8 exist.
    first.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// The node's QUIC stateless-reset key, created once and kept in `path`.
///
/// Keeping it across restarts lets a restarted node answer packets of connections it no
/// longer knows with a stateless reset, so clients notice within one round trip instead
/// of waiting for the idle timeout (with the connection-id key of
/// [`connection_id_key`], without which the restarted node would not recognize the
/// ids and would drop the packets silently).
pub fn stateless_reset_key(path: &Path) -> Result<ring::hmac::Key, CertError> {
    let key = match std::fs::read(path) {
        Ok(bytes) if bytes.len() == RESET_KEY_BYTES => bytes,
        Ok(bytes) => {
            return Err(CertError::Pem {
                path: path.to_owned(),
                reason: format!(
                    "holds {} bytes, expected {RESET_KEY_BYTES}; delete it to make a new one",
                    bytes.len()
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
                    action: "cannot create directory",
                    path: dir.to_owned(),
                    source,
                })?;
            }
            let key: [u8; RESET_KEY_BYTES] = std::array::from_fn(|_| rand::random());
            write_file(path, &key, true)?;
            key.to_vec()
        }
        Err(source) => {
            return Err(CertError::Io {
                action: "cannot read",
                path: path.to_owned(),
                source,
            })
        }
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))
}

/// Reads a secret file: its bytes with surrounding whitespace trimmed.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, CertError> {
    let raw = std::fs::read(path).map_err(|source| CertError::Io {
        action: "cannot read token secret",
        path: path.to_owned(),
        source,
    })?;
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() {
        return Err(CertError::Pem {
            path: path.to_owned(),
            reason: "the token secret file is empty".into(),
        });
    }
    Ok(trimmed.to_vec())
}

/// The quinn server config for a node: its certificate and key, ALPNs for clients and
/// peers, and transport limits sized for chat.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    limits: &TransportLimits,
) -> Result<quinn::ServerConfig, CertError> {
    let cert_pem = read_file(cert_file, "cannot read certificate")?;
    let key_pem = read_file(key_file, "cannot read private key")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: cert_file.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::Pem {
            path: cert_file.to_owned(),
            reason: "no `-----BEGIN CERTIFICATE-----` block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::Pem {
        path: key_file.to_owned(),
        reason: format!("no private key found: {e}"),
    })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN_CLIENT.to_vec(), ALPN_PEER.to_vec()];
    // 0-RTT is off: a replayed publish would be deduplicated, but a replayed subscribe
    // or membership change is not worth the risk for a few milliseconds.
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(limits.transport_config()));
    Ok(config)
}

fn read_file(path: &Path, action: &'static str) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io {
        action,
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        action: "cannot write",
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, bytes).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_files_are_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = DevFiles::in_dir(&dir.path().join("dev"));
        files.ensure().unwrap();
        let ca = std::fs::read(&files.ca_pem).unwrap();
        let secret = read_secret(&files.secret).unwrap();
        assert_eq!(secret.len(), 64);
        files.ensure().unwrap();
        assert_eq!(std::fs::read(&files.ca_pem).unwrap(), ca);
        assert_eq!(read_secret(&files.secret).unwrap(), secret);
        server_config(
            &files.node_cert,
            &files.node_key,
            &TransportLimits::default(),
        )
        .unwrap();
        herald_client::io::client_config(&ca, ALPN_CLIENT, &TransportLimits::default()).unwrap();
    }

    #[test]
    fn the_reset_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node/stateless-reset.key");
        stateless_reset_key(&path).unwrap();
        let first = std::fs::read(&path).unwrap();
        stateless_reset_key(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first);
        std::fs::write(&path, b"short").unwrap();
        let err = stateless_reset_key(&path).err().unwrap().to_string();
        assert!(err.contains("expected 64"), "{err}");
    }

    #[test]
    fn a_missing_key_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = server_config(
            &dir.path().join("nope.pem"),
            &dir.path().join("nope.key"),
            &TransportLimits::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
