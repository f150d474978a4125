//! A minimal HTTP/1.0 client over plain TCP (health checks and etcd's JSON
//! gateway), so the suite needs no HTTP client dependency.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Per-request deadline.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Sends `method path` to `addr` with an optional JSON body; returns status
/// and body. One connection per request (HTTP/1.0, `Connection: close`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    tokio::time::timeout(HTTP_TIMEOUT, request_inner(addr, method, path, json_body))
        .await
        .with_context(|| format!("{method} http://{addr}{path} timed out after {HTTP_TIMEOUT:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = json_body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw);
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}: {raw:?}");
    };
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed HTTP status line from {addr}: {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    request(addr, "GET", path, None).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<HttpResponse> {
    request(addr, "POST", path, Some(body)).await
}
