//! The agent's configuration, as `main` resolves it (flags, files, environment).
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use flotilla_core::secrets::{Secret, SecretUrl};

use crate::error::AgentError;

/// Everything one agent needs: which shard it serves, how to reach it, and how to reach the
/// coordinator. The password is kept apart from the DSN so it never travels with it.
#[derive(Clone)]
pub struct AgentConfig {
    /// The shard's name, as the coordinator and the journal know it.
    pub shard: String,
    /// `postgres://user@host:port/db?...`, with no password in it (`main` refuses one: it
    /// would sit in argv). Shown redacted all the same.
    pub dsn: SecretUrl,
    /// Read by `main` from a file or the environment; shows as `***`.
    pub password: Option<Secret>,
    /// The shard's labels, for plan selectors.
    pub labels: BTreeMap<String, String>,
    /// The coordinators' addresses, e.g. `http://127.0.0.1:7070`, or several separated by
    /// commas (`http://c1:7070,http://c2:7070`): the agent dials them in turn and follows the
    /// leader a follower names. See [`AgentConfig::coordinators`].
    pub coordinator: String,
    /// A LIKE pattern on schema names (`tenant_%`): each matching schema is a tenant.
    pub tenant_pattern: Option<String>,
    /// A query whose first column is a schema name and whose optional second column holds
    /// labels (`k=v,k2=v2` text, or a json object).
    pub tenant_query: Option<String>,
    /// How many runs may hold a shard connection at once (the pool holds one more for
    /// journal reads and discovery).
    pub max_connections: u32,
    /// How often to send a heartbeat until the coordinator's Welcome says otherwise.
    pub heartbeat_interval: Duration,
    /// The first delay before reconnecting (to the coordinator or the shard).
    pub reconnect_min: Duration,
    /// The longest delay between reconnect attempts.
    pub reconnect_max: Duration,
    /// etcd endpoints (`http://127.0.0.1:2379`); empty: no liveness key in etcd.
    pub etcd: Vec<String>,
    /// The prefix of every Flotilla key in etcd (the coordinators' `--etcd-prefix`).
    pub etcd_prefix: String,
    /// How often the agent looks for tenants that appeared or vanished and reads its shard
    /// again for the coordinator's fleet view: the whole journal and every target's schema
    /// fingerprint (between times, only the targets whose runs ended), so a change made
    /// outside Flotilla shows within this.
    pub discover_interval: Duration,
    /// The TTL of the lease under the agent's liveness key (whole seconds, at least 1s);
    /// it is kept alive every third of it.
    pub lease_ttl: Duration,
    /// How often, with etcd configured, the agent resolves its Flotilla prepared
    /// transactions older than this from their decisions in etcd, connected or not (see
    /// `Agent::sweep_in_doubt`).
    pub in_doubt_sweep: Duration,
    /// TLS to the coordinators (`https://` addresses): the CA that signed their
    /// certificate and this agent's own, which names its shard (`--tls-*`).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The files `tls` was made from, read again at each of `reload` (empty: `tls` as given).
    pub tls_files: flotilla_core::tls::TlsFiles,
    /// When to read `tls_files` again (`flotilla agent`: at each SIGHUP).
    pub reload: flotilla_core::reload::ReloadRequests,
    /// etcd over TLS (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub etcd_tls: Option<tonic::transport::ClientTlsConfig>,
    /// etcd user and password (`--etcd-user`, `--etcd-password-file`).
    pub etcd_user: Option<flotilla_core::tls::Credentials>,
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
pub const DEFAULT_ETCD_PREFIX: &str = "/flotilla";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_IN_DOUBT_SWEEP: Duration = Duration::from_secs(10);

impl AgentConfig {
    /// A configuration with the defaults: no password, no labels, no tenants.
    pub fn new(
        shard: impl Into<String>,
        dsn: impl Into<SecretUrl>,
        coordinator: impl Into<String>,
    ) -> AgentConfig {
        AgentConfig {
            shard: shard.into(),
            dsn: dsn.into(),
            password: None,
            labels: BTreeMap::new(),
            coordinator: coordinator.into(),
            tenant_pattern: None,
            tenant_query: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            discover_interval: DEFAULT_DISCOVER_INTERVAL,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            etcd: Vec::new(),
            etcd_prefix: DEFAULT_ETCD_PREFIX.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            in_doubt_sweep: DEFAULT_IN_DOUBT_SWEEP,
            tls: None,
            tls_files: flotilla_core::tls::TlsFiles::new("tls", None, None, None),
            reload: flotilla_core::reload::ReloadRequests::never(),
            etcd_tls: None,
            etcd_user: None,
        }
    }

    /// The coordinator addresses, in the order given: `coordinator` split at commas, each
    /// trimmed, empty entries dropped.
    pub fn coordinators(&self) -> Vec<String> {
        parse_addresses(&self.coordinator)
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |reason: String| AgentError::Config {
            shard: self.shard.clone(),
            reason,
        };
        flotilla_core::validate_shard_name(&self.shard).map_err(bad)?;
        if self.tenant_pattern.is_some() && self.tenant_query.is_some() {
            return Err(bad("set tenant_pattern or tenant_query, not both".into()));
        }
        if self.max_connections == 0 {
            return Err(bad("max_connections must be at least 1".into()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(bad(format!(
                "reconnect_min ({:?}) must be above zero and at most reconnect_max ({:?})",
                self.reconnect_min, self.reconnect_max
            )));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(bad("heartbeat_interval must be above zero".into()));
        }
        if self.discover_interval.is_zero() {
            return Err(bad("discover_interval must be above zero".into()));
        }
        if self.coordinators().is_empty() {
            return Err(bad("no coordinator address".into()));
        }
        if self.etcd.iter().any(|e| e.trim().is_empty()) {
            return Err(bad("an etcd endpoint is empty".into()));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(bad(format!(
                "lease_ttl ({:?}) must be at least 1s",
                self.lease_ttl
            )));
        }
        Ok(())
    }

    /// The DSN with any password in it replaced, safe for logs and errors.
    pub fn redacted_dsn(&self) -> String {
        self.dsn.redacted()
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("shard", &self.shard)
            .field("dsn", &self.dsn)
            .field("password", &self.password)
            .field("labels", &self.labels)
            .field("coordinator", &redact_list(&self.coordinator))
            .field("tenant_pattern", &self.tenant_pattern)
            .field("tenant_query", &self.tenant_query)
            .field("max_connections", &self.max_connections)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("discover_interval", &self.discover_interval)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field(
                "etcd",
                &self.etcd.iter().map(|e| redact_dsn(e)).collect::<Vec<_>>(),
            )
            .field("etcd_prefix", &self.etcd_prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("tls", &self.tls.is_some())
            .field("etcd_tls", &self.etcd_tls.is_some())
            .field("etcd_user", &self.etcd_user)
            .finish()
    }
}

/// Exponential backoff between `min` and `max`, with jitter (`jitter` in [0, 1)) over the
/// upper half of the step, so a fleet of agents does not reconnect in lockstep.
pub(crate) fn backoff_delay(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let step = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let floor = (step / 2).max(min);
    floor + step.saturating_sub(floor).mul_f64(jitter.clamp(0.0, 1.0))
}

/// A comma-separated list of addresses, each with its password hidden.
pub(crate) fn redact_list(list: &str) -> String {
    parse_addresses(list)
        .iter()
        .map(|a| redact_dsn(a))
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-separated list of addresses, trimmed, without empty entries.
pub(crate) fn parse_addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// Hides passwords in a DSN, whichever way they were written: the one redactor
/// ([`flotilla_core::secrets::redact_url`]).
pub fn redact_dsn(dsn: &str) -> String {
    flotilla_core::secrets::redact_url(dsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_password() {
        assert_eq!(
            redact_dsn("postgres://app:s3cr%40t@db.example:5432/shard_0"),
            "postgres://app:<redacted>@db.example:5432/shard_0"
        );
        assert_eq!(
            redact_dsn("postgres://app@db:5432/x"),
            "postgres://app@db:5432/x"
        );
        assert_eq!(
            redact_dsn("postgres://db/x?user=a"),
            "postgres://db/x?user=a"
        );
    }

    #[test]
    fn redacts_password_parameters() {
        assert_eq!(
            redact_dsn("postgres://db/x?user=a&password=hunter2&sslmode=require"),
            "postgres://db/x?user=a&password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_dsn("host=db password='a b\\' c' dbname=s"),
            "host=db password=<redacted> dbname=s"
        );
        assert_eq!(
            redact_dsn("host=db PASSWORD=pw dbname=s"),
            "host=db PASSWORD=<redacted> dbname=s"
        );
        // not a password parameter
        assert_eq!(
            redact_dsn("postgres://db/x?nopassword=1"),
            "postgres://db/x?nopassword=1"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = AgentConfig::new("s0", "postgres://u:pw1@h/db", "http://127.0.0.1:7070");
        c.password = Some("pw2".into());
        let text = format!("{c:?}");
        assert!(!text.contains("pw1") && !text.contains("pw2"), "{text}");
        assert!(text.contains("<redacted>"));
        assert!(text.contains("password: Some(***)"), "{text}");
    }

    #[test]
    fn validates() {
        let mut c = AgentConfig::new("s0", "postgres://h/db", "http://127.0.0.1:7070");
        assert!(c.validate().is_ok());
        c.tenant_pattern = Some("t_%".into());
        c.tenant_query = Some("select 1".into());
        assert!(c.validate().unwrap_err().to_string().contains("s0"));
        let c = AgentConfig::new("bad name", "postgres://h/db", "x");
        assert!(c.validate().is_err());
        let c = AgentConfig::new("s0", "postgres://h/db", " , ");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("no coordinator")
        );
        let mut c = AgentConfig::new("s0", "postgres://h/db", "http://c");
        c.lease_ttl = Duration::from_millis(500);
        assert!(c.validate().unwrap_err().to_string().contains("lease_ttl"));
    }

    #[test]
    fn coordinator_lists() {
        let c = AgentConfig::new("s0", "postgres://h/db", "http://c1:7070");
        assert_eq!(c.coordinators(), ["http://c1:7070"]);
        let c = AgentConfig::new(
            "s0",
            "postgres://h/db",
            " http://c1:7070,http://c2:7070 ,,http://c3:7070,",
        );
        assert_eq!(
            c.coordinators(),
            ["http://c1:7070", "http://c2:7070", "http://c3:7070"]
        );
        assert!(parse_addresses("").is_empty());
        assert_eq!(
            redact_list("http://u:pw@c1:7070, http://c2:7070"),
            "http://u:<redacted>@c1:7070,http://c2:7070"
        );
    }

    #[test]
    fn backoff_grows_and_stays_in_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(0, min, max, 0.0), min);
        assert_eq!(
            backoff_delay(0, min, max, 0.999),
            Duration::from_millis(100)
        );
        assert_eq!(backoff_delay(3, min, max, 0.0), Duration::from_millis(400));
        assert!(backoff_delay(3, min, max, 0.999) <= Duration::from_millis(800));
        for attempt in [10, 31, 1000] {
            for j in [0.0, 0.5, 0.999] {
                let d = backoff_delay(attempt, min, max, j);
                assert!(
                    d >= Duration::from_millis(2500) && d <= max,
                    "{attempt} {j} {d:?}"
                );
            }
        }
    }
}
