//! Transport security shared by the coordinator, the agent and the CLI: TLS material read
//! from PEM files (`--tls-cert`, `--tls-key`, `--tls-ca`; `--etcd-cert`, ... for etcd),
//! the client side of a TLS connection, and what counts as loopback (plaintext is for
//! loopback development only).
//!
//! The server side (the coordinator's listener, which audits refused handshakes) lives in
//! the coordinator; the client side is tonic's own `ClientTlsConfig`, which is also what
//! etcd-client takes.
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The URI SAN prefix that names an agent's shard in its certificate:
/// `flotilla-agent:<shard>`.
pub const AGENT_URI_PREFIX: &str = "flotilla-agent:";

/// Why TLS material could not be used; names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {reason}")]
    File {
        flag: String,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// PEM files for one side of TLS connections; `flags` names them in errors (`tls` for
/// `--tls-cert`/`--tls-key`/`--tls-ca`, `etcd` for `--etcd-cert`/...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub flags: &'static str,
    /// This side's certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The CA that signs the other side's certificate: a server requires client
    /// certificates signed by it; a client trusts only servers signed by it.
    pub ca: Option<PathBuf>,
}

/// A certificate and its key, as PEM text.
pub struct IdentityPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl TlsFiles {
    pub fn new(
        flags: &'static str,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> TlsFiles {
        TlsFiles {
            flags,
            cert,
            key,
            ca,
        }
    }

    /// Nothing given: plaintext.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    fn flag(&self, which: &str) -> String {
        format!("--{}-{which}", self.flags)
    }

    /// Reads one PEM file, refusing one that holds no PEM block (a DER file or a
    /// path mixed up with another is the usual mistake).
    fn read(&self, which: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
        let bad = |reason: String| TlsError::File {
            flag: self.flag(which),
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(bad("not a PEM file (no -----BEGIN line)".into()));
        }
        Ok(bytes)
    }

    /// This side's certificate and key: both or neither, and the key the certificate's.
    pub fn identity_pem(&self) -> Result<Option<IdentityPem>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert_path), Some(key_path)) => {
                let cert = self.read("cert", cert_path)?;
                let key = self.read("key", key_path)?;
                if let Err(reason) = keys_match(&cert, &key) {
                    return Err(TlsError::Invalid(format!(
                        "{} {} and {} {} do not go together: {reason}",
                        self.flag("cert"),
                        cert_path.display(),
                        self.flag("key"),
                        key_path.display()
                    )));
                }
                Ok(Some(IdentityPem { cert, key }))
            }
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Invalid(format!(
                "{} is given without {}",
                self.flag("cert"),
                self.flag("key")
            ))),
            (None, Some(_)) => Err(TlsError::Invalid(format!(
                "{} is given without {}",
                self.flag("key"),
                self.flag("cert")
            ))),
        }
    }

    /// What a client says of its own certificate before it connects: expired or not valid
    /// yet, naming the file and the date (the coordinator's refusal reached the CLI as
    /// "connection closed" or "broken pipe", and the agent's without the file or dates).
    /// Said, not refused: the coordinator refuses it, and audits the refusal.
    pub fn client_certificate_warning(&self) -> Option<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = self.cert.as_ref()?;
        let pem = std::fs::read(path).ok()?;
        let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
        let problem = validity_problem(leaf.as_ref())?;
        Some(format!(
            "{} {}: {problem}: the coordinator refuses it; renew it",
            self.flag("cert"),
            path.display()
        ))
    }

    /// The CA certificate(s), as PEM text.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        self.ca.as_ref().map(|p| self.read("ca", p)).transpose()
    }

    /// The client side of a TLS connection (None when no file is given). A client
    /// needs the CA to trust the server: there are no built-in roots, a Flotilla
    /// deployment has its own CA.
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if self.is_empty() {
            return Ok(None);
        }
        let Some(ca) = self.ca_pem()? else {
            return Err(TlsError::Invalid(format!(
                "{} is needed with {} and {}: the CA that signed the server's certificate",
                self.flag("ca"),
                self.flag("cert"),
                self.flag("key")
            )));
        };
        // read here, not at the handshake: a CA file half-written when the agent reloads it
        // was taken, and every connection after failed until the next reload
        let certificates = {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            CertificateDer::pem_slice_iter(&ca).collect::<Result<Vec<_>, _>>()
        };
        match certificates {
            Ok(found) if !found.is_empty() => {}
            Ok(_) => {
                return Err(TlsError::Invalid(format!(
                    "{} {}: holds no PEM certificate",
                    self.flag("ca"),
                    self.ca
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
            Err(e) => {
                return Err(TlsError::Invalid(format!(
                    "{} {}: not a PEM certificate: {e}",
                    self.flag("ca"),
                    self.ca
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
        }
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(id) = self.identity_pem()? {
            config = config.identity(Identity::from_pem(id.cert, id.key));
        }
        Ok(Some(config))
    }
}

/// Why a certificate (DER) is outside its validity now: expired, or not valid yet (a
/// clock behind), naming its subject and the date; None when it is valid, or cannot be
/// read (rustls says what it cannot read, where it reads it).
pub fn validity_problem(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    if validity.is_valid() {
        return None;
    }
    let subject = cert.subject().to_string();
    let when = |t: x509_parser::time::ASN1Time| {
        t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
    };
    let now = x509_parser::time::ASN1Time::now();
    Some(if now > validity.not_after {
        format!(
            "the certificate ({subject}) expired {}",
            when(validity.not_after)
        )
    } else {
        format!(
            "the certificate ({subject}) is not valid before {}",
            when(validity.not_before)
        )
    })
}

/// Why an agent of `shard` cannot present the certificate `cert_pem` (PEM): it names several
/// shards, or another one (its `flotilla-agent:` URI SANs); the coordinator would refuse it.
/// None when it names this shard, or none (a common name mapped by `--agent-identities`).
pub fn agent_certificate_problem(cert_pem: &[u8], shard: &str) -> Option<String> {
    let named = certificate_shards(cert_pem);
    if named.len() > 1 {
        return Some(format!(
            "--tls-cert names several shards ({}: its flotilla-agent: URI SANs); the coordinator refuses a certificate that stands for more than one shard: give the certificate issued for {shard} alone",
            named.join(", ")
        ));
    }
    (!named.is_empty() && !named.iter().any(|n| n == shard)).then(|| {
        format!(
            "--tls-cert names shard {} (its flotilla-agent: URI SAN), and this agent is --shard {shard}: the coordinator would refuse it; give the certificate issued for {shard}",
            named.join(", ")
        )
    })
}

/// The subject of the first certificate (the leaf) of `cert_pem`, as logs name it; `?` when
/// it cannot be read.
pub fn certificate_subject(cert_pem: &[u8]) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    CertificateDer::pem_slice_iter(cert_pem)
        .next()
        .and_then(Result::ok)
        .and_then(|der| {
            X509Certificate::from_der(der.as_ref())
                .ok()
                .map(|(_, c)| c.subject().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// The shards a certificate names as an agent's (`flotilla-agent:<shard>` URI SANs of its
/// first certificate, the leaf); empty when it names none or cannot be read.
pub fn certificate_shards(cert_pem: &[u8]) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(cert_pem).next() else {
        return Vec::new();
    };
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let mut shards: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix("flotilla-agent:").map(str::to_string),
            _ => None,
        })
        .collect();
    shards.sort();
    shards.dedup();
    shards
}

/// Whether `key_pem` is the private key of `cert_pem`'s first certificate (a mismatch,
/// a key from another pair, said only "transport error" at the first connection). A key or
/// certificate that cannot be read here is left to the TLS library to name.
fn keys_match(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Ok(certs) = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>() else {
        return Ok(());
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(key_pem) else {
        return Ok(());
    };
    let Ok(signing) = rustls::crypto::ring::sign::any_supported_type(&key) else {
        return Ok(());
    };
    match rustls::sign::CertifiedKey::new(certs, signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            "the key is not the certificate's (its public key differs): give the key issued with this certificate".into(),
        ),
        _ => Ok(()),
    }
}

/// A user name and password (etcd's `--etcd-user` and `--etcd-password-file`). The
/// password comes from a file, never argv, and `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl Credentials {
    /// `user` with the password on the first line of `path` (`flag` names the file's
    /// flag in errors, which never hold the password).
    pub fn from_file(user: &str, flag: &str, path: &Path) -> Result<Credentials, TlsError> {
        let password =
            crate::credential_files::read_password(flag, path).map_err(|e| TlsError::File {
                flag: e.flag,
                path: e.path,
                reason: e.reason,
            })?;
        if user.trim().is_empty() {
            return Err(TlsError::Invalid(format!(
                "{flag} is given without a user name"
            )));
        }
        Ok(Credentials {
            user: user.trim().to_string(),
            password,
        })
    }
}

/// What to say when an etcd password (`--etcd-user`, `--etcd-password-file`) would travel
/// in plaintext: to `http://` endpoints, and to bare `host:port` ones without TLS files
/// (etcd-client speaks TLS to `https://` ones and, given TLS options, to bare ones). Said,
/// not refused, as a plaintext connection to a coordinator is: etcd on this machine, or on a
/// network the operator trusts, is theirs to decide. `tls`: `--etcd-ca` (or a client
/// certificate) is given. Names the endpoints, without passwords written into them.
pub fn etcd_password_in_plaintext(endpoints: &[String], tls: bool) -> Option<String> {
    let plaintext: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .filter(|e| match e.split_once("://") {
            Some((scheme, _)) => !scheme.eq_ignore_ascii_case("https"),
            None => !tls,
        })
        .map(crate::secrets::redact_url)
        .collect();
    (!plaintext.is_empty()).then(|| {
        format!(
            "the etcd password (--etcd-password-file) is sent in plaintext to {}: anyone on the \
             path can read it; use https:// endpoints with --etcd-ca",
            plaintext.join(", ")
        )
    })
}

/// The host of an address such as `http://host:port`, `https://[::1]:7070` or
/// `host:port` (brackets removed).
pub fn address_host(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Whether `host` is this machine only: `localhost`, 127.0.0.0/8, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a connection to `address` would travel in plaintext off this machine:
/// not `https://`, and not to a loopback host.
pub fn plaintext_off_host(address: &str) -> bool {
    !is_https(address) && !is_loopback_host(address_host(address.trim()))
}

/// Whether `address` is an `https://` one, its scheme in any case (`HTTPS://` was taken for
/// plaintext, refused as "not https://").
pub fn is_https(address: &str) -> bool {
    address
        .trim()
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate with the key of another pair is named as such when the files are
    /// read (it said "transport error" at the first connection); its own key passes.
    #[test]
    fn a_key_of_another_certificate_is_named() {
        let dir = std::env::temp_dir().join(format!("flotilla-keys-match-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        for (name, text) in [
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
            ("other.pem", other.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let files = |key: &str| TlsFiles {
            flags: "tls",
            cert: Some(dir.join("cert.pem")),
            key: Some(dir.join(key)),
            ca: None,
        };
        assert!(files("key.pem").identity_pem().unwrap().is_some());
        let Err(e) = files("other.pem").identity_pem() else {
            panic!("a key of another pair was taken");
        };
        let e = e.to_string();
        assert!(
            e.contains("do not go together: the key is not the certificate's"),
            "{e}"
        );
        assert!(
            e.starts_with("--tls-cert ") && e.contains("--tls-key "),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loopback_hosts_are_recognised_in_every_spelling() {
        assert!(is_loopback_host(address_host("http://127.0.0.1:7070")));
        assert!(is_loopback_host(address_host("http://localhost:7070")));
        assert!(is_loopback_host(address_host("http://[::1]:7070")));
        assert!(is_loopback_host(address_host("127.0.0.2:7070")));
        assert!(!is_loopback_host(address_host("http://10.0.0.1:7070")));
        assert!(!is_loopback_host(address_host("http://coordinator:7070")));
        assert!(!plaintext_off_host("https://coordinator:7070"));
        assert!(plaintext_off_host("http://coordinator:7070"));
        assert!(!plaintext_off_host("http://127.0.0.1:7070"));
    }

    /// An etcd password going to a plaintext endpoint is named with the endpoint (it went
    /// without a word, while the coordinator warned of its own plaintext listener).
    #[test]
    fn an_etcd_password_to_a_plaintext_endpoint_is_said() {
        let list = |l: &[&str]| l.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        let w =
            etcd_password_in_plaintext(&list(&["http://etcd-1:2379", "https://etcd-2:2379"]), true)
                .expect("said");
        assert!(w.contains("in plaintext to http://etcd-1:2379:"), "{w}");
        assert!(!w.contains("etcd-2"), "{w}");
        // a bare endpoint is plaintext without TLS files, TLS with them
        let w = etcd_password_in_plaintext(&list(&["etcd-1:2379"]), false).expect("said");
        assert!(w.contains("etcd-1:2379"), "{w}");
        assert_eq!(
            etcd_password_in_plaintext(&list(&["etcd-1:2379"]), true),
            None
        );
        assert_eq!(
            etcd_password_in_plaintext(&list(&["https://etcd-1:2379"]), false),
            None
        );
        // a password written into the endpoint is not repeated
        let w = etcd_password_in_plaintext(&list(&["http://u:canary9@etcd:2379"]), false)
            .expect("said");
        assert!(!w.contains("canary9"), "{w}");
    }

    #[test]
    fn half_an_identity_or_a_client_without_ca_is_refused_naming_the_flags() {
        let files = TlsFiles::new("tls", Some("/nonexistent/cert.pem".into()), None, None);
        let e = files.identity_pem().err().expect("refused").to_string();
        assert!(e.contains("--tls-cert") && e.contains("--tls-key"), "{e}");
        let e = TlsFiles::new("etcd", Some("c".into()), Some("k".into()), None)
            .client_config()
            .expect_err("refused")
            .to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        let e = TlsFiles::new("tls", None, None, Some("/nonexistent/ca.pem".into()))
            .client_config()
            .expect_err("refused")
            .to_string();
        assert!(e.contains("--tls-ca /nonexistent/ca.pem"), "{e}");
    }

    /// A CA file that holds no certificate (half-written when an agent reloads it) is
    /// refused when read, naming it: it was taken, and every handshake after failed.
    #[test]
    fn a_ca_file_without_a_certificate_is_refused_when_read() {
        let dir = std::env::temp_dir().join(format!("flotilla-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, says) in [
            ("empty.pem", "", "not a PEM file"),
            (
                "key-only.pem",
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
                "holds no PEM certificate",
            ),
            (
                "half.pem",
                "-----BEGIN CERTIFICATE-----\nMIIB",
                "not a PEM certificate",
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let e = TlsFiles::new("tls", None, None, Some(path.clone()))
                .client_config()
                .expect_err("refused")
                .to_string();
            assert!(
                e.contains(&format!("--tls-ca {}: {says}", path.display())),
                "{name}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
