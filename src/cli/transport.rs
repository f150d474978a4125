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
    // (once a command, which may open several endpoints: a redirect, a watch taken up)
    static CERTIFICATE_SAID: std::sync::Once = std::sync::Once::new();
    CERTIFICATE_SAID.call_once(|| {
        if let Some(warning) = files().client_certificate_warning() {
            eprintln!("warning: {warning}");
        }
    });
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
            if !flotilla_core::tls::is_https(addr) {
                eprintln!(
                    "warning: --tls-* are given but {addr} is not https://: the connection is plaintext"
                );
            }
            endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))
        }
        None if flotilla_core::tls::is_https(addr) => Err(format!(
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

/// Whether the CLI may connect to `leader`, an address a coordinator named (a follower's
/// redirect to the leader, which it read from the leader's key in etcd: the leader's
/// `--advertise`, or whatever was written there). Once TLS is configured, not to a
/// plaintext one: the operator's bearer token and the request would follow a mis-set
/// `--advertise http://...`, or an overwritten key, unencrypted. (An address the operator
/// typed as http:// beside --tls-* is their own choice: [`endpoint`] warns and goes on.)
pub(super) fn may_follow(leader: &str) -> Result<(), String> {
    refuse_downgrade(leader, !files().is_empty())
}

fn refuse_downgrade(leader: &str, tls: bool) -> Result<(), String> {
    if !tls || flotilla_core::tls::is_https(&with_scheme(leader.trim(), true)) {
        return Ok(());
    }
    Err(format!(
        "a follower's redirect names the leader at {} (read from the leader's key in etcd: \
         its --advertise), which is not https://: with --tls-* given, a redirect is not \
         followed to plaintext (the credential and the request would travel unencrypted); give \
         the leader an https:// --advertise, or its https:// address with --coordinator",
        flotilla_core::secrets::redact_url(leader.trim())
    ))
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
    use super::{refuse_downgrade, with_scheme};

    /// With TLS configured, a coordinator's redirect to a plaintext address is refused,
    /// naming the address and where it came from (it was followed, with a warning, and the
    /// token and plan went in plaintext); an https:// one, or a bare HOST:PORT (https://
    /// under TLS), is followed; without TLS there is nothing to downgrade.
    #[test]
    fn a_redirect_does_not_downgrade_tls_to_plaintext() {
        let e = refuse_downgrade("http://10.0.0.2:7070", true).unwrap_err();
        assert!(e.contains("the leader at http://10.0.0.2:7070"), "{e}");
        assert!(e.contains("redirect") && e.contains("etcd"), "{e}");
        assert!(e.contains("not https://"), "{e}");
        let e = refuse_downgrade(" http://u:secret@c2:7070 ", true).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(refuse_downgrade("https://c2:7070", true), Ok(()));
        // its scheme in any case (HTTPS:// was refused as "not https://")
        assert_eq!(refuse_downgrade("HTTPS://c2:7070", true), Ok(()));
        assert!(refuse_downgrade("HTTP://c2:7070", true).is_err());
        assert_eq!(refuse_downgrade("c2:7070", true), Ok(()));
        assert_eq!(refuse_downgrade("http://c2:7070", false), Ok(()));
    }

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
