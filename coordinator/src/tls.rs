//! The coordinator's listener with TLS: its certificate, and, when a CA is given, client
//! certificates required and checked against it (mTLS).
//!
//! The handshake is done here (rustls, as tonic's own `tls-ring` does) rather than by
//! tonic's `ServerTlsConfig`, for one reason: tonic drops a failed handshake with a debug
//! line, and a client refused for its certificate (none, a foreign CA, expired) must be
//! audited. The streams handed to tonic are `tokio_rustls` server streams, for which tonic
//! fills in `TlsConnectInfo`, so `Request::peer_certs()` (see `api::peer`) works as with
//! tonic's own TLS.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::tls::TlsFiles;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::error::CoordinatorError;

/// A client that connects and says nothing must not hold a handshake slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS: the server's identity and, with a CA, required client certificates.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    /// Whether clients must present a certificate signed by the CA.
    pub client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

fn invalid(reason: String) -> CoordinatorError {
    CoordinatorError::Tls(reason)
}

/// A server certificate every client would refuse: outside its validity, or with an extended
/// key usage that does not allow serving TLS. Refused at start: the coordinator served it,
/// said SERVING, and every client failed with "certificate expired".
fn server_certificate_usable(der: &CertificateDer<'_>) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        // rustls says what it cannot read, when it reads it
        return Ok(());
    };
    if let Some(problem) = flotilla_core::tls::validity_problem(der.as_ref()) {
        return Err(problem);
    }
    let subject = cert.subject().to_string();
    if let Ok(Some(eku)) = cert.extended_key_usage()
        && !eku.value.any
        && !eku.value.server_auth
    {
        return Err(format!(
            "the certificate ({subject}) is not for a server: its extended key usage lacks serverAuth"
        ));
    }
    Ok(())
}

impl ServerTls {
    /// Reads `--tls-cert`, `--tls-key` and (optionally) `--tls-ca`. None when no file is
    /// given; a CA alone is refused (a server needs its own certificate).
    pub fn load(files: &TlsFiles) -> Result<Option<ServerTls>, CoordinatorError> {
        if files.is_empty() {
            return Ok(None);
        }
        let bad = |e: flotilla_core::tls::TlsError| invalid(e.to_string());
        let Some(identity) = files.identity_pem().map_err(bad)? else {
            return Err(invalid(
                "--tls-ca is given without --tls-cert and --tls-key: the coordinator needs its own certificate to serve TLS".into(),
            ));
        };
        let cert_path = files.cert.as_ref().map(|p| p.display().to_string());
        let key_path = files.key.as_ref().map(|p| p.display().to_string());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&identity.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                invalid(format!(
                    "--tls-cert {}: {e}",
                    cert_path.clone().unwrap_or_default()
                ))
            })?;
        if certs.is_empty() {
            return Err(invalid(format!(
                "--tls-cert {}: no CERTIFICATE block",
                cert_path.unwrap_or_default()
            )));
        }
        server_certificate_usable(&certs[0]).map_err(|why| {
            invalid(format!(
                "--tls-cert {}: {why}",
                cert_path.clone().unwrap_or_default()
            ))
        })?;
        let key = PrivateKeyDer::from_pem_slice(&identity.key).map_err(|e| {
            invalid(format!(
                "--tls-key {}: no private key ({e})",
                key_path.clone().unwrap_or_default()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?;
        let (builder, client_auth) = match files.ca_pem().map_err(bad)? {
            Some(ca) => {
                let ca_path = files
                    .ca
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&ca) {
                    let cert = cert.map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
                (builder.with_client_cert_verifier(verifier), true)
            }
            None => (builder.with_no_client_auth(), false),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            invalid(format!(
                "--tls-cert {} and --tls-key {}: {e}",
                files
                    .cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                key_path.unwrap_or_default()
            ))
        })?;
        // gRPC is HTTP/2 only; tonic's clients ask for it by ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(ServerTls {
            config: Arc::new(config),
            client_auth,
        }))
    }
}

/// Why a client's handshake failed, when the failure is the client's certificate (none,
/// an unknown issuer, expired, ...): that is a refusal worth auditing. Other failures
/// (a port scan, a client that went away, a client that distrusts us) are not.
fn certificate_refusal(e: &std::io::Error) -> Option<(&'static str, String)> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::NoCertificatesPresented => {
            Some(("no_certificate", "no client certificate".into()))
        }
        rustls::Error::InvalidCertificate(reason) => Some((
            "bad_certificate",
            format!("client certificate refused: {reason}"),
        )),
        _ => None,
    }
}

/// Accepts TCP connections on `listener` and hands tonic those whose TLS handshake
/// succeeded; each handshake runs on its own task, so a slow client delays no one.
/// `refused(peer, reason)` is called for each client refused for its certificate.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    refused: impl Fn(SocketAddr, String) + Send + Sync + 'static,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls.config);
    let refused = Arc::new(refused);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // the server stopped: stop accepting
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // e.g. out of file descriptors: a pause instead of a busy loop
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, refused) = (acceptor.clone(), tx.clone(), refused.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => match certificate_refusal(&e) {
                        Some((label, reason)) => {
                            // said (and audited) once per host and reason in a while
                            debug!(%peer, "TLS connection refused: {reason}");
                            crate::metrics::connection_refused(label);
                            refused(peer, reason);
                        }
                        None => debug!(%peer, "TLS handshake failed: {e}"),
                    },
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
