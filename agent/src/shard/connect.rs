//! The shard's connection pool: options from the DSN (the password set apart), and waiting
//! for a shard that is still starting.
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{instrument, warn};

use super::keepalive::{SERVER_KEEPALIVES, arm_open_sockets};
use crate::config::{AgentConfig, backoff_delay};
use crate::error::{AgentError, is_auth_failure, is_missing_database, is_tls_failure};

/// Where the shard is, for error messages (never with the password).
fn describe(options: &PgConnectOptions) -> (String, u16, String) {
    let host = match options.get_socket() {
        Some(path) => path.display().to_string(),
        None => options.get_host().to_string(),
    };
    (
        host,
        options.get_port(),
        options.get_database().unwrap_or("").to_string(),
    )
}

/// Connection options from the DSN, with the password set apart from it.
pub(crate) fn connect_options(config: &AgentConfig) -> Result<PgConnectOptions, AgentError> {
    let mut options =
        PgConnectOptions::from_str(config.dsn.expose()).map_err(|e| AgentError::Config {
            shard: config.shard.clone(),
            // sqlx's parse errors name what is wrong, not the DSN itself
            reason: format!("invalid dsn {}: {e}", config.redacted_dsn()),
        })?;
    if let Some(password) = &config.password {
        options = options.password(password.expose());
    }
    let params = dsn_params(config.dsn.expose());
    let param = |names: &[&str]| {
        params
            .iter()
            .rev()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    };
    // A certificate file the DSN names and the agent cannot read is a configuration to fix:
    // it was "not reachable yet", retried for good, and named no file.
    for (names, what) in [
        (
            &["sslrootcert", "ssl-root-cert", "ssl-ca"][..],
            "sslrootcert",
        ),
        (&["sslcert", "ssl-cert"][..], "sslcert"),
        (&["sslkey", "ssl-key"][..], "sslkey"),
    ] {
        // (no TLS asked: its files are not read, as libpq does not)
        if matches!(options.get_ssl_mode(), PgSslMode::Disable) {
            break;
        }
        let Some(path) = param(names) else { continue };
        let why = if path == "system" && what == "sslrootcert" {
            Some("`system` is not supported: leave sslrootcert out to verify against the system's roots".to_string())
        } else {
            std::fs::File::open(path).err().map(|e| e.to_string())
        };
        if let Some(why) = why {
            return Err(AgentError::Config {
                shard: config.shard.clone(),
                reason: format!("{what} {path} in the dsn: {why}"),
            });
        }
    }
    if may_fall_back(&options) && fell_back(&config.shard) {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    // the server's side of each connection notices a vanished agent (see `keepalive`),
    // unless the DSN's own options say otherwise
    let own = options.get_options().unwrap_or_default().to_owned();
    let keepalives = SERVER_KEEPALIVES
        .into_iter()
        .filter(|(name, _)| !own.contains(name));
    // quote_literal relies on it; it is the default, but a server may say otherwise
    Ok(options
        .application_name("flotilla-agent")
        .options([("standard_conforming_strings", "on")])
        .options(keepalives))
}

/// The DSN's query parameters (`?k=v&...`), percent-decoded, in order. (The driver keeps
/// its certificate paths without a getter, and renders them only through `to_url_lossy`,
/// which panics on a user name holding an `@`, as managed services' do.)
fn dsn_params(dsn: &str) -> Vec<(String, String)> {
    let Some((_, query)) = dsn.split_once('?') else {
        return Vec::new();
    };
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match (bytes[i], bytes.get(i + 1..i + 3)) {
                (b'%', Some(hex)) => match u8::from_str_radix(&String::from_utf8_lossy(hex), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                },
                (b'+', _) => out.push(b' '),
                (b, _) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('#')
        .next()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

/// The shards whose server's TLS could not be spoken under `prefer`: every connection of
/// their agent (its pool, its shard lock's) is plaintext from then on. By shard: the
/// quickstart runs several agents in one process.
static PLAINTEXT_FALLBACK: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn fell_back(shard: &str) -> bool {
    PLAINTEXT_FALLBACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|s| s == shard)
}

/// Whether `options` may fall back to plaintext when the server's TLS cannot be spoken, as
/// libpq's do: under `prefer` only (the default, said or not: `PGSSLMODE` counts too), never
/// under a mode that asks for TLS.
fn may_fall_back(options: &PgConnectOptions) -> bool {
    matches!(options.get_ssl_mode(), PgSslMode::Prefer)
}

/// How often a backend running a statement for the agent asks whether the agent is still
/// there (`client_connection_check_interval`, PostgreSQL 14 and later).
const CONNECTION_CHECK: &str = "1000";

/// `options` with `client_connection_check_interval` asked of the server (14 and later:
/// an older one refuses a setting it does not know, so `server_version_num` decides; None
/// also when the server refused the setting on the probe connection), unless the DSN's own
/// options set it. Without it, a statement whose agent was killed
/// (kill -9, an OOM kill, a pod gone) ran to its end: for minutes, holding the locks it
/// took (ACCESS EXCLUSIVE for most DDL) against the tenant's traffic and against the run of
/// the same step by the agent started in its place, which then failed on its lock_timeout.
/// With it the server ends such a statement, and its transaction, within a second of the
/// agent's socket closing (a host that vanished: once the keepalives give up on it).
fn check_connection(options: PgConnectOptions, server_version: Option<u32>) -> PgConnectOptions {
    let own = options.get_options().unwrap_or_default();
    if server_version.is_none_or(|v| v < 140_000)
        || own.contains("client_connection_check_interval")
    {
        return options;
    }
    options.options([("client_connection_check_interval", CONNECTION_CHECK)])
}

/// Opens one connection to the shard, its socket armed with keepalives (see `keepalive`).
pub(crate) async fn open(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let conn = PgConnection::connect_with(options).await?;
    arm_open_sockets();
    Ok(conn)
}

/// How long a connection may sit unused in the pool before it is closed. Every session
/// open on the server costs CPU while others change the catalog, idle or not: each one
/// replays every catalog invalidation the DDL of the migrations sends (PostgreSQL signals
/// the idle ones to catch up). Measured with the 1,000-tenant floor (`baseline-psql-floor.sh`,
/// 2 sessions per shard database): 3 more idle sessions per database made it 15-20% slower.
/// A rollout's lanes hold their connections while their plan has runs queued; the ones a
/// shard used only while others had finished, and those of the short reads between runs,
/// go once unused this long rather than after sqlx's 10 minutes.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds the pool and waits until the shard answers, backing off while it is starting.
/// Authentication failures and a database that does not exist do not get better by
/// waiting: they end the agent.
#[instrument(skip_all, fields(shard = %config.shard))]
pub(crate) async fn connect(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> Result<Option<PgPool>, AgentError> {
    let mut options = connect_options(config)?;
    let (host, port, database) = describe(&options);
    let mut may_fall_back = may_fall_back(&options);
    let mut attempt = 0u32;
    loop {
        // one bare connection first: the pool would retry a refused connection silently
        let error = match open(&options).await {
            Ok(mut conn) => {
                // a probe: the server answered; which start of it this is, for a step cut
                // short later (`server_start`)
                super::server_start::note(&mut conn).await;
                // asked of the server first: one whose platform cannot check a connection
                // (Windows; PostgreSQL 14 off Linux) refuses the setting, and in the startup
                // options that refusal would fail every connection of the pool
                let checks = sqlx::raw_sql(AssertSqlSafe(format!(
                    "SET client_connection_check_interval = {CONNECTION_CHECK}"
                )))
                .execute(&mut conn)
                .await
                .is_ok();
                let options =
                    check_connection(options, conn.server_version_num().filter(|_| checks));
                let _ = conn.close().await;
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections + 1)
                    .min_connections(0)
                    .idle_timeout(POOL_IDLE_TIMEOUT)
                    .acquire_timeout(Duration::from_secs(15))
                    .after_connect(|_, _| {
                        Box::pin(async {
                            arm_open_sockets();
                            Ok(())
                        })
                    })
                    .connect_lazy_with(options);
                return Ok(Some(pool));
            }
            Err(e) => e,
        };
        if is_tls_failure(&error) && std::mem::take(&mut may_fall_back) {
            // (the default, `prefer`: the server offered TLS and its handshake failed)
            warn!(%host, port, %database, error = %crate::error::Shown(&error), "the shard's TLS handshake failed under the default sslmode (prefer): connecting in plaintext, as libpq does; say sslmode=require (or verify-full) in the dsn to insist on TLS");
            PLAINTEXT_FALLBACK
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(config.shard.clone());
            options = options.ssl_mode(PgSslMode::Disable);
            continue;
        }
        if is_auth_failure(&error) || is_missing_database(&error) || is_tls_failure(&error) {
            return Err(AgentError::ShardConnect {
                shard: config.shard.clone(),
                host,
                port,
                database,
                error,
            });
        }
        let delay = backoff_delay(
            attempt,
            config.reconnect_min,
            config.reconnect_max,
            rand::random(),
        );
        warn!(%host, port, %database, error = %crate::error::Shown(&error), attempt, ?delay, "shard not reachable yet, retrying");
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DSN's TLS files are read at start (a missing one named, not retried for good);
    /// only `prefer` (said or not) may fall back to plaintext.
    #[test]
    fn tls_settings_of_the_dsn_are_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("flotilla-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not read here").unwrap();
        let ca = ca.display().to_string();
        let options = |dsn: &str| connect_options(&AgentConfig::new("s0", dsn, "http://c"));
        let o = options(&format!(
            "postgres://app@db/x?sslmode=verify-full&sslrootcert={ca}"
        ))
        .unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
        assert!(!may_fall_back(&o));
        let o = options("postgres://app@db/x?sslmode=require").unwrap();
        assert!(!may_fall_back(&o));
        for dsn in ["postgres://app@db/x", "postgres://app@db/x?sslmode=prefer"] {
            assert!(may_fall_back(&options(dsn).unwrap()), "{dsn}");
        }
        // no TLS asked: its files are not read (libpq does not either)
        assert!(options("postgres://app@db/x?sslmode=disable&sslrootcert=/nowhere/ca").is_ok());
        let e = options("postgres://app@db/x?sslmode=verify-full&sslrootcert=/nowhere/ca%2Epem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslrootcert /nowhere/ca.pem in the dsn"), "{e}");
        let e = options("postgres://app@db/x?sslkey=/nowhere/k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslkey /nowhere/k"), "{e}");
        let e = options("postgres://app@db/x?sslrootcert=system")
            .unwrap_err()
            .to_string();
        assert!(e.contains("leave sslrootcert out"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dsn_password_stays_apart() {
        let mut c = AgentConfig::new("s0", "postgres://app@db.internal:6543/shard_0", "http://c");
        c.password = Some("hunter2".into());
        let o = connect_options(&c).unwrap();
        assert_eq!(
            describe(&o),
            ("db.internal".to_string(), 6543, "shard_0".to_string())
        );
        let c = AgentConfig::new("s0", "postgres://app:pw@db:notaport/x", "http://c");
        let e = connect_options(&c).unwrap_err().to_string();
        assert!(!e.contains("pw@"), "{e}");
    }

    /// The server is asked to probe the agent's side of each connection, unless the DSN
    /// set a keepalive of its own (which is kept: ours would come after it, and win).
    #[test]
    fn the_server_is_asked_for_keepalives_unless_the_dsn_sets_them() {
        let c = AgentConfig::new("s0", "postgres://app@db:5432/shard_0", "http://c");
        let o = connect_options(&c).unwrap();
        let options = o.get_options().unwrap();
        for (name, value) in SERVER_KEEPALIVES {
            assert!(options.contains(&format!("-c {name}={value}")), "{options}");
        }
        let c = AgentConfig::new(
            "s0",
            "postgres://app@db:5432/shard_0?options[tcp_keepalives_idle]=120",
            "http://c",
        );
        let o = connect_options(&c).unwrap();
        let options = o.get_options().unwrap();
        assert!(options.contains("-c tcp_keepalives_idle=120"), "{options}");
        assert!(!options.contains("tcp_keepalives_idle=15"), "{options}");
        assert!(options.contains("-c tcp_keepalives_count=3"), "{options}");
    }

    /// The connection check is asked of servers that know it (14 and later; an older one
    /// would refuse the connection), and not over the DSN's own.
    #[test]
    fn the_connection_check_is_asked_of_servers_that_know_it() {
        let c = AgentConfig::new("s0", "postgres://app@db:5432/shard_0", "http://c");
        let check = "-c client_connection_check_interval=1000";
        let asked = |version| {
            let o = check_connection(connect_options(&c).unwrap(), version);
            o.get_options().unwrap_or_default().contains(check)
        };
        assert!(asked(Some(150_004)));
        assert!(asked(Some(140_000)));
        assert!(!asked(Some(130_011)));
        assert!(!asked(None));
        let own = AgentConfig::new(
            "s0",
            "postgres://app@db:5432/shard_0?options[client_connection_check_interval]=5000",
            "http://c",
        );
        let o = check_connection(connect_options(&own).unwrap(), Some(150_004));
        let options = o.get_options().unwrap();
        assert!(
            options.contains("client_connection_check_interval=5000"),
            "{options}"
        );
        assert!(!options.contains(check), "{options}");
    }
}
