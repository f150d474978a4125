//! How the CLI reaches coordinators: plaintext to loopback, or TLS (`https://`) with the
//! global `--tls-ca`, `--tls-cert` and `--tls-key` (for mTLS). The files are given once
//! per process (`init`), and read when a connection is made.
use std::sync::OnceLock;
use std::time::Duration;

use flotilla_core::tls::{TlsFiles, plaintext_off_host};
use tonic::transport::Endpoint;

static TLS: OnceLock<TlsFiles> = OnceLock::new();

/// Remembers the TLS files for the operator commands' connections.
pub(super) fn init(files: TlsFiles) {
    let _ = TLS.set(files);
}

/// The TLS files given on the command line (none given: plaintext).
pub(super) fn files() -> TlsFiles {
    TLS.get()
        .cloned()
        .unwrap_or_else(|| TlsFiles::new("tls", None, None, None))
}

/// An endpoint for a coordinator address, with TLS when the files say so; an error
/// names the flag or the address.
pub(super) fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let tls = files().client_config().map_err(|e| e.to_string())?;
    // `HOST:PORT` alone (as the coordinator's --listen takes it) means https:// when
    // TLS files are given, else http://; without this, tonic fails at connect with
    // "invalid URL, scheme is missing".
    let addr = with_scheme(addr.trim(), tls.is_some());
    let addr = addr.as_str();
    let endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| format!("--coordinator `{addr}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        // a coordinator that stops answering on a connection (frozen, a host gone) ends
        // the call, a watch's stream too, rather than leave it waiting for good
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match tls {
        Some(tls) => {
            if !addr.trim().starts_with("https://") {
                eprintln!(
                    "warning: --tls-* are given but {addr} is not https://: the connection is plaintext"
                );
            }
            endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))
        }
        None if addr.trim().starts_with("https://") => Err(format!(
            "--coordinator `{addr}` is https://: give --tls-ca (and --tls-cert and --tls-key when the coordinator requires client certificates)"
        )),
        None => {
            if plaintext_off_host(addr) {
                eprintln!(
                    "warning: talking to {addr} in plaintext, off this machine: use https:// and --tls-ca"
                );
            }
            Ok(endpoint)
        }
    }
}

fn with_scheme(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::with_scheme;

    #[test]
    fn a_bare_address_gets_the_scheme_of_the_transport() {
        assert_eq!(
            with_scheme("127.0.0.1:7070", false),
            "http://127.0.0.1:7070"
        );
        assert_eq!(with_scheme("coord:7070", true), "https://coord:7070");
        assert_eq!(with_scheme("http://coord:7070", true), "http://coord:7070");
        assert_eq!(
            with_scheme("https://coord:7070", false),
            "https://coord:7070"
        );
    }
}
