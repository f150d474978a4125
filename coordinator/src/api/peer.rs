//! Who is on the other end of a request, from its TLS client certificate: parsed here
//! once, for agent identity (the shard a certificate names) and operator identity (a
//! certificate's subject).
use std::net::SocketAddr;

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a client certificate says about its holder. The certificate was verified
/// against the CA during the handshake; this is only what it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// URI subject alternative names (e.g. `flotilla-agent:eu-1`).
    pub uri_sans: Vec<String>,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// Its validity's start (notBefore), in seconds since the epoch.
    pub valid_from_s: i64,
}

impl PeerCert {
    /// Parses a DER certificate; None if it does not parse (it could not have been
    /// verified then, so this does not happen past the handshake).
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut out = PeerCert {
            common_name,
            valid_from_s: cert.validity().not_before.timestamp(),
            ..PeerCert::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => out.uri_sans.push((*uri).to_string()),
                    GeneralName::DNSName(dns) => out.dns_sans.push((*dns).to_string()),
                    _ => {}
                }
            }
        }
        Some(out)
    }

    /// How logs and the audit trail name the holder: the common name, else the first
    /// URI SAN, else `unknown`.
    pub fn display_name(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.uri_sans.first().cloned())
            .unwrap_or_else(|| "unknown".into())
    }
}

/// The subject of the client certificate a request came with (its leaf certificate);
/// None over plaintext or without a client certificate.
pub fn peer_subject<T>(req: &Request<T>) -> Option<PeerCert> {
    let certs = req.peer_certs()?;
    PeerCert::from_der(certs.first()?.as_ref())
}

/// Where a request came from, for the audit trail.
pub fn peer_address<T>(req: &Request<T>) -> Option<SocketAddr> {
    req.remote_addr()
}

#[cfg(test)]
mod tests {
    use flotilla_testkit::tls::{CertSpec, TestCa};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::PeerCert;

    #[test]
    fn a_certificate_gives_its_common_name_and_subject_alternative_names() {
        let ca = TestCa::new("peer").unwrap();
        let mut spec = CertSpec::client("agent-eu-1", &["flotilla-agent:eu-1"]);
        spec.dns = vec!["db-eu-1.internal".into()];
        let files = ca.issue("agent", &spec).unwrap();
        let der = CertificateDer::from_pem_file(&files.cert).unwrap();
        let cert = PeerCert::from_der(der.as_ref()).unwrap();
        assert_eq!(cert.common_name.as_deref(), Some("agent-eu-1"));
        assert_eq!(cert.uri_sans, vec!["flotilla-agent:eu-1"]);
        assert_eq!(cert.dns_sans, vec!["db-eu-1.internal"]);
        assert_eq!(cert.display_name(), "agent-eu-1");
        assert_eq!(PeerCert::from_der(b"not a certificate"), None);
    }
}
