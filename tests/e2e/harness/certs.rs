//! A fleet's certificates for the TLS tests: one CA (the test kit's [`TestCa`]), the
//! coordinator's server certificate, an agent certificate per shard naming it
//! (`flotilla-agent:<shard>`), and an operator's; and the flags or environment that hand
//! them to `flotilla`.
use flotilla_testkit::tls::{CertFiles, CertSpec, TestCa};

pub struct FleetCerts {
    pub ca: TestCa,
    /// The coordinator's server certificate (127.0.0.1 and localhost).
    pub server: CertFiles,
    /// An operator's client certificate (CN `alice`, no shard).
    pub operator: CertFiles,
}

impl FleetCerts {
    pub fn new() -> anyhow::Result<FleetCerts> {
        let ca = TestCa::new("fleet")?;
        let server = ca.issue("coordinator", &CertSpec::server("coordinator"))?;
        let operator = ca.issue("operator", &CertSpec::client("alice", &[]))?;
        Ok(FleetCerts {
            ca,
            server,
            operator,
        })
    }

    /// The coordinator's `--tls-cert`, `--tls-key` and `--tls-ca` (mTLS).
    pub fn coordinator_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.server.cert.to_string_lossy().into_owned(),
            "--tls-key".into(),
            self.server.key.to_string_lossy().into_owned(),
            "--tls-ca".into(),
            self.ca.ca_path().to_string_lossy().into_owned(),
        ]
    }

    /// The certificate of the agent of `shard` (file `agent-<shard>`).
    pub fn agent(&self, shard: &str) -> anyhow::Result<CertFiles> {
        self.ca.issue(
            &format!("agent-{shard}"),
            &CertSpec::client(
                &format!("agent-{shard}"),
                &[&format!("flotilla-agent:{shard}")],
            ),
        )
    }

    /// `FLOTILLA_TLS_CERT`, `FLOTILLA_TLS_KEY` and `FLOTILLA_TLS_CA` for a client
    /// holding `files` and trusting this fleet's CA.
    pub fn client_env(&self, files: &CertFiles) -> Vec<(String, String)> {
        vec![
            (
                "FLOTILLA_TLS_CERT".into(),
                files.cert.to_string_lossy().into_owned(),
            ),
            (
                "FLOTILLA_TLS_KEY".into(),
                files.key.to_string_lossy().into_owned(),
            ),
            (
                "FLOTILLA_TLS_CA".into(),
                self.ca.ca_path().to_string_lossy().into_owned(),
            ),
        ]
    }
}

/// `&[(String, String)]` as the `&[(&str, &str)]` that spawning takes.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
