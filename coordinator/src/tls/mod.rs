//! The coordinator's listener with TLS: its certificate, and, when a CA is given, client
//! certificates required and checked against it (mTLS).
//!
//! The handshake is done here (rustls, as tonic's own `tls-ring` does) rather than by
//! tonic's `ServerTlsConfig`, for one reason: tonic drops a failed handshake with a debug
//! line, and a client refused for its certificate (none, a foreign CA, expired) must be
//! audited. The streams handed to tonic are `tokio_rustls` server streams, for which tonic
//! fills in `TlsConnectInfo`, so `Request::peer_certs()` (see `api::peer`) works as with
//! tonic's own TLS.
//!
//! The server configuration is taken per connection from what the files held at the last
//! (re)load: a reload (SIGHUP, [`ServerTls::reload`]) swaps it whole, certificate, key and CA, for the
//! handshakes after it; connections already open keep theirs. A reload whose files are bad
//! changes nothing (the coordinator goes on serving the certificate it had).
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_core::tls::TlsFiles;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::error::CoordinatorError;

mod expiry;
mod serving;

pub(crate) use expiry::unix_now;
pub use expiry::{WARN_WITHIN, follow};
pub use serving::ServingCertificate;

/// A client that connects and says nothing must not hold a handshake slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS: the server's identity and, with a CA, required client certificates;
/// read again from its files by [`ServerTls::reload`].
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    serving: Arc<RwLock<Arc<serving::Serving>>>,
    /// Whether clients must present a certificate signed by the CA.
    pub client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .field("certificate", &self.certificate())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads `--tls-cert`, `--tls-key` and (optionally) `--tls-ca`. None when no file is
    /// given; a CA alone is refused (a server needs its own certificate).
    pub fn load(files: &TlsFiles) -> Result<Option<ServerTls>, CoordinatorError> {
        if files.is_empty() {
            return Ok(None);
        }
        let serving = serving::build(files)?;
        Ok(Some(ServerTls {
            files: files.clone(),
            client_auth: serving.client_auth,
            serving: Arc::new(RwLock::new(Arc::new(serving))),
        }))
    }

    /// Reads the files again and, when they make a server configuration, serves new
    /// handshakes with it; otherwise changes nothing and says why (the flag, the file and
    /// what is wrong). Whether client certificates are required is the flags' (a CA file
    /// given or not), so it cannot change here.
    pub fn reload(&self) -> Result<ServingCertificate, CoordinatorError> {
        let serving = serving::build(&self.files)?;
        let certificate = serving.certificate.clone();
        crate::metrics::tls_certificate_expiry(certificate.not_after);
        *self.serving.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(serving);
        Ok(certificate)
    }

    /// The certificate new handshakes are served with.
    pub fn certificate(&self) -> ServingCertificate {
        self.current().certificate.clone()
    }

    fn current(&self) -> Arc<serving::Serving> {
        self.serving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor with the configuration of the last (re)load.
    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().config.clone())
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
            // (the configuration of the last reload, taken at accept)
            let (acceptor, tx, refused) = (tls.acceptor(), tx.clone(), refused.clone());
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
