//! What the coordinator serves TLS with, built from its files (`--tls-cert`, `--tls-key`,
//! `--tls-ca`): at start, and again at each reload (SIGHUP). A build either succeeds whole
//! or changes nothing, and its errors name the flag, the file and what is wrong.
use std::sync::Arc;

use flotilla_core::tls::TlsFiles;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::CoordinatorError;

/// The certificate served, as logs, `/readyz` and the expiry metric name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingCertificate {
    /// `--tls-cert`'s path.
    pub file: String,
    /// Its leaf's subject (`CN=...`).
    pub subject: String,
    /// Its leaf's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl ServingCertificate {
    /// notAfter as a date (RFC 2822, as the start's refusal of an expired one says it).
    pub fn not_after_shown(&self) -> String {
        x509_parser::time::ASN1Time::from_timestamp(self.not_after)
            .ok()
            .and_then(|t| t.to_rfc2822().ok())
            .unwrap_or_else(|| self.not_after.to_string())
    }

    /// How long until it expires (negative: expired that long ago), at `now` (Unix seconds).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// A server configuration and the certificate it serves.
pub(super) struct Serving {
    pub config: Arc<rustls::ServerConfig>,
    pub certificate: ServingCertificate,
    /// Whether clients must present a certificate signed by the CA.
    pub client_auth: bool,
}

fn invalid(reason: String) -> CoordinatorError {
    CoordinatorError::Tls(reason)
}

/// A server certificate every client would refuse: outside its validity, or with an extended
/// key usage that does not allow serving TLS. Refused at start: the coordinator served it,
/// said SERVING, and every client failed with "certificate expired". Otherwise, its subject
/// and notAfter.
fn server_certificate_usable(der: &CertificateDer<'_>) -> Result<(String, i64), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("not a certificate rustls or x509 can read ({e})"))?;
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
    Ok((subject, cert.validity().not_after.timestamp()))
}

/// Reads `files` (which hold a certificate and key: see `ServerTls::load`) and builds what
/// serving TLS with them takes.
pub(super) fn build(files: &TlsFiles) -> Result<Serving, CoordinatorError> {
    let bad = |e: flotilla_core::tls::TlsError| invalid(e.to_string());
    let Some(identity) = files.identity_pem().map_err(bad)? else {
        return Err(invalid(
            "--tls-ca is given without --tls-cert and --tls-key: the coordinator needs its own certificate to serve TLS".into(),
        ));
    };
    let shown = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let (cert_path, key_path) = (shown(&files.cert), shown(&files.key));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&identity.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("--tls-cert {cert_path}: {e}")))?;
    let Some(leaf) = certs.first() else {
        return Err(invalid(format!(
            "--tls-cert {cert_path}: no CERTIFICATE block"
        )));
    };
    let (subject, not_after) = server_certificate_usable(leaf)
        .map_err(|why| invalid(format!("--tls-cert {cert_path}: {why}")))?;
    let key = PrivateKeyDer::from_pem_slice(&identity.key)
        .map_err(|e| invalid(format!("--tls-key {key_path}: no private key ({e})")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?;
    let (builder, client_auth) = match files.ca_pem().map_err(bad)? {
        Some(ca) => {
            let ca_path = shown(&files.ca);
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&ca) {
                let cert = cert.map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(format!("--tls-ca {ca_path}: {e}")))?;
            (builder.with_client_cert_verifier(verifier), true)
        }
        None => (builder.with_no_client_auth(), false),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(format!(
            "--tls-cert {cert_path} and --tls-key {key_path}: {e}"
        ))
    })?;
    // gRPC is HTTP/2 only; tonic's clients ask for it by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Serving {
        config: Arc::new(config),
        certificate: ServingCertificate {
            file: cert_path,
            subject,
            not_after,
        },
        client_auth,
    })
}
