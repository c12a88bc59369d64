//! A minimal HTTP/1.1 client for the admin endpoints (plain HTTP on loopback or a
//! private network): one request per connection, bounded in time and size.
//!
//! Owns: talking to `/cluster` and its `POST`s. Must not: follow redirects or keep
//! connections (the admin API needs neither).

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connecting, and then reading the answer, each take at most this long.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// An admin answer larger than this is refused (a `/cluster` of 1024 groups is ~300 KiB).
const RESPONSE_BYTES_MAX: u64 = 16 << 20;

/// `GET path`; the body of a 200 answer.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = request(addr, "GET", path, None, ADMIN_TIMEOUT).await?;
    if status != 200 {
        bail!("{addr}{path} answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// `POST path` with a JSON body; the status code and the body, whatever the status
/// (the admin API explains a refusal in the body).
pub async fn post(
    addr: &str,
    path: &str,
    json: &serde_json::Value,
) -> anyhow::Result<(u16, String)> {
    request(addr, "POST", path, Some(json.to_string()), ADMIN_TIMEOUT).await
}

/// Like [`post`], waiting up to `answer_within` for the answer (a drain takes up to
/// its timeout).
pub async fn post_waiting(
    addr: &str,
    path: &str,
    json: &serde_json::Value,
    answer_within: Duration,
) -> anyhow::Result<(u16, String)> {
    request(addr, "POST", path, Some(json.to_string()), answer_within).await
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    answer_within: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::time::timeout(ADMIN_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("timed out connecting to admin HTTP at {addr}"))?
        .with_context(|| {
            format!("cannot connect to admin HTTP at {addr}; is the node running? (--admin)")
        })?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = &body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.as_deref().unwrap_or(""));
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        answer_within,
        (&mut stream)
            .take(RESPONSE_BYTES_MAX)
            .read_to_end(&mut response),
    )
    .await
    .with_context(|| format!("timed out reading {path} from {addr}"))??;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP status line from {addr}"))?;
    Ok((status, body.to_owned()))
}
