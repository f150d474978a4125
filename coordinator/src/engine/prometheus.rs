//! Prometheus gates: an instant query through the HTTP API (`/api/v1/query`), its first
//! series' value. A server that does not answer, an error, or no data is a failed gate,
//! never a wait: a rollout does not hang on its monitoring.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one query may take, connection included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A Prometheus answer larger than this is not what a gate asks for.
const MAX_ANSWER: usize = 1 << 20;

/// The value of `query` on the Prometheus at `url` (`http://host:port`), now.
pub async fn query(url: &str, query: &str) -> Result<f64, String> {
    tokio::time::timeout(QUERY_TIMEOUT, query_once(url, query))
        .await
        .map_err(|_| format!("Prometheus at {url} did not answer within {QUERY_TIMEOUT:?}"))?
}

async fn query_once(url: &str, query: &str) -> Result<f64, String> {
    let host = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("Prometheus url {url:?} is not http://host:port"))?;
    let (authority, base) = match host.split_once('/') {
        Some((a, path)) => (a, format!("/{path}")),
        None => (host, String::new()),
    };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("Prometheus at {url} is unreachable: {e}"))?;
    let request = format!(
        "GET {base}/api/v1/query?query={} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        percent_encode(query)
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Prometheus at {url}: {e}"))?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .await
        .map_err(|e| format!("Prometheus at {url}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("Prometheus at {url} answered no HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    // A chunked body (Prometheus sends one for large answers) is undone here.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("Prometheus at {url} answered {status} and no JSON: {e}"))?;
    if json["status"] != "success" {
        return Err(format!(
            "Prometheus at {url} refused the query {query:?}: {}",
            json["error"].as_str().unwrap_or("no reason given")
        ));
    }
    value_of(&json["data"]).ok_or_else(|| format!("{query} returned no data at {url}"))
}

/// The value of an instant query's data: a scalar, or the first series of a vector.
fn value_of(data: &serde_json::Value) -> Option<f64> {
    let pair = match data["resultType"].as_str()? {
        "scalar" => &data["result"],
        "vector" => &data["result"].as_array()?.first()?["value"],
        _ => return None,
    };
    pair.get(1)?.as_str()?.parse().ok()
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vectors_and_scalars() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"0.25"]}]}"#,
        )
        .unwrap();
        assert_eq!(value_of(&v), Some(0.25));
        let s: serde_json::Value =
            serde_json::from_str(r#"{"resultType":"scalar","result":[1700000000.1,"3"]}"#).unwrap();
        assert_eq!(value_of(&s), Some(3.0));
        let empty: serde_json::Value =
            serde_json::from_str(r#"{"resultType":"vector","result":[]}"#).unwrap();
        assert_eq!(value_of(&empty), None);
        assert_eq!(
            percent_encode("rate(x[5m]) > 0"),
            "rate%28x%5B5m%5D%29%20%3E%200"
        );
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_failed_gate_not_a_hang() {
        // A port nothing listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = query(&format!("http://127.0.0.1:{port}"), "up")
            .await
            .unwrap_err();
        assert!(e.contains("unreachable"), "{e}");
    }
}
