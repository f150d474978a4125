//! Throwaway certificate authorities for the TLS tests: a CA, and certificates it signs
//! (servers for 127.0.0.1 and localhost, clients with a common name and URI SANs, expired
//! ones), written as PEM files in the CA's own temp dir.
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::TestDir;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Its notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// What a certificate says: its common name and subject alternative names, and whether
/// it expired long ago.
#[derive(Debug, Clone, Default)]
pub struct CertSpec {
    pub common_name: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub expired: bool,
    /// Valid from now (the current second) rather than from long ago.
    pub from_now: bool,
    /// Valid until this long from now (whole seconds) rather than for good (rcgen's 4096).
    pub valid_for: Option<std::time::Duration>,
}

impl CertSpec {
    /// A server certificate for this machine: `localhost` and 127.0.0.1.
    pub fn server(common_name: &str) -> CertSpec {
        CertSpec {
            common_name: common_name.into(),
            dns: vec!["localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ..CertSpec::default()
        }
    }

    /// A client certificate with a common name and URI SANs (e.g.
    /// `flotilla-agent:shard_0`).
    pub fn client(common_name: &str, uris: &[&str]) -> CertSpec {
        CertSpec {
            common_name: common_name.into(),
            uris: uris.iter().map(|u| u.to_string()).collect(),
            ..CertSpec::default()
        }
    }

    /// The same certificate, valid from the current second (as a CA that issues it now
    /// says; by default a test certificate is valid from long ago).
    pub fn from_now(mut self) -> CertSpec {
        self.from_now = true;
        self
    }

    /// The same certificate, expiring `after` from now (whole seconds): one that expires
    /// while a test runs.
    pub fn valid_for(mut self, after: std::time::Duration) -> CertSpec {
        self.valid_for = Some(after);
        self
    }

    /// The same certificate, valid only in 2020.
    pub fn expired(mut self) -> CertSpec {
        self.expired = true;
        self
    }
}

/// A certificate authority of its own, in its own temp dir (`ca.pem` and what it issues).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
    dir: TestDir,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let dir = TestDir::new(&format!("ca-{name}"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).with_context(|| format!("writing {}", ca.display()))?;
        Ok(TestCa {
            issuer: Issuer::new(params, key),
            ca,
            dir,
        })
    }

    /// The CA's certificate (PEM), what the other side trusts.
    pub fn ca_path(&self) -> PathBuf {
        self.ca.clone()
    }

    /// A certificate signed by this CA, written as `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, spec: &CertSpec) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.clone());
        for dns in &spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970");
        let epoch_plus = |d: std::time::Duration| {
            rcgen::date_time_ymd(1970, 1, 1)
                + std::time::Duration::from_secs(since_epoch.as_secs() + d.as_secs())
        };
        if spec.from_now {
            params.not_before = epoch_plus(std::time::Duration::ZERO);
        }
        if let Some(valid_for) = spec.valid_for {
            params.not_after = epoch_plus(valid_for);
        }
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let not_after = params.not_after.unix_timestamp();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
            not_after,
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
