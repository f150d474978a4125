//! The shard database: the pool, the flotilla schema, tenant discovery and journal reads.
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use flotilla_proto::pb;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::session::backoff_delay;

/// The schema version this agent installs and understands.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_SQL: &str = include_str!("schema.sql");

/// One journal row, as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalRow {
    pub target: String,
    pub migration_id: String,
    pub checksum: String,
}

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
    let mut options = PgConnectOptions::from_str(&config.dsn).map_err(|e| AgentError::Config {
        shard: config.shard.clone(),
        // sqlx's parse errors name what is wrong, not the DSN itself
        reason: format!("invalid dsn {}: {e}", config.redacted_dsn()),
    })?;
    if let Some(password) = &config.password {
        options = options.password(password);
    }
    // quote_literal relies on it; it is the default, but a server may say otherwise
    Ok(options
        .application_name("flotilla-agent")
        .options([("standard_conforming_strings", "on")]))
}

/// Builds the pool and waits until the shard answers, backing off while it is starting.
/// Authentication failures do not get better by waiting: they end the agent.
#[instrument(skip_all, fields(shard = %config.shard))]
pub(crate) async fn connect(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> Result<Option<PgPool>, AgentError> {
    let options = connect_options(config)?;
    let (host, port, database) = describe(&options);
    let mut attempt = 0u32;
    loop {
        // one bare connection first: the pool would retry a refused connection silently
        let error = match PgConnection::connect_with(&options).await {
            Ok(conn) => {
                let _ = conn.close().await;
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections + 1)
                    .min_connections(0)
                    .acquire_timeout(Duration::from_secs(15))
                    .connect_lazy_with(options);
                return Ok(Some(pool));
            }
            Err(e) => e,
        };
        let auth_failed = matches!(&error, sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("28")));
        if auth_failed {
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
        warn!(%host, port, %database, %error, attempt, ?delay, "shard not reachable yet, retrying");
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Ok(None),
        }
    }
}

/// Installs or upgrades the flotilla schema, once at a time across agents.
#[instrument(skip_all, fields(shard = %shard))]
pub(crate) async fn install_schema(pool: &PgPool, shard: &str) -> Result<(), AgentError> {
    let err = |what, error| AgentError::Shard {
        shard: shard.to_string(),
        what,
        error,
    };
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| err("opening the schema transaction", e))?;
    sqlx::raw_sql(
        "SELECT pg_advisory_xact_lock(hashtext('flotilla.schema'));
         CREATE SCHEMA IF NOT EXISTS flotilla;
         CREATE TABLE IF NOT EXISTS flotilla.meta (key text PRIMARY KEY, value text);",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| err("installing the flotilla schema", e))?;
    let found: Option<String> =
        sqlx::query_scalar("SELECT value FROM flotilla.meta WHERE key = 'schema_version'")
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| err("reading the flotilla schema version", e))?
            .flatten();
    if let Some(found) = found
        && found.parse::<u32>().map_or(true, |v| v > SCHEMA_VERSION)
    {
        return Err(AgentError::SchemaTooNew {
            shard: shard.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    sqlx::raw_sql(SCHEMA_SQL)
        .execute(&mut *tx)
        .await
        .map_err(|e| err("installing the flotilla schema", e))?;
    tx.commit()
        .await
        .map_err(|e| err("committing the flotilla schema", e))?;
    info!(version = SCHEMA_VERSION, "flotilla schema ready");
    Ok(())
}

/// How the agent finds the tenants of its shard.
#[derive(Debug, Clone)]
pub(crate) enum TenantSource {
    None,
    Pattern(String),
    Query(String),
}

impl TenantSource {
    pub fn from_config(config: &AgentConfig) -> TenantSource {
        match (&config.tenant_pattern, &config.tenant_query) {
            (Some(p), _) => TenantSource::Pattern(p.clone()),
            (None, Some(q)) => TenantSource::Query(q.clone()),
            (None, None) => TenantSource::None,
        }
    }
}

/// Lists the shard's tenants, sorted by name; invalid names are skipped with a warning.
#[instrument(skip_all, fields(shard = %shard))]
pub(crate) async fn discover_tenants(
    pool: &PgPool,
    shard: &str,
    source: &TenantSource,
) -> Result<Vec<pb::Tenant>, sqlx::Error> {
    let found: Vec<(String, Option<String>)> = match source {
        TenantSource::None => Vec::new(),
        TenantSource::Pattern(pattern) => sqlx::query_scalar::<_, String>(
            "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname LIKE $1 ORDER BY nspname",
        )
        .bind(pattern)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|name| (name, None))
        .collect(),
        // The operator's own query. Simple-query results come as text whatever their type,
        // so a json/jsonb labels column reads as its text form.
        TenantSource::Query(query) => sqlx::raw_sql(AssertSqlSafe(query.as_str()))
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|row: &PgRow| {
                let name: Option<String> = row.try_get_unchecked(0).ok()?;
                let labels = if row.len() > 1 { row.try_get_unchecked(1).ok()? } else { None };
                Some((name?, labels))
            })
            .collect(),
    };
    let mut tenants = BTreeMap::new();
    for (name, labels) in found {
        if let Err(reason) = flotilla_proto::validate_tenant_name(&name) {
            warn!(schema = %name.escape_debug(), %reason, "skipping schema: not a valid tenant name");
            continue;
        }
        let labels = match parse_tenant_labels(labels.as_deref().unwrap_or("")) {
            Ok(labels) => labels,
            Err(reason) => {
                warn!(schema = %name, %reason, "skipping tenant: its labels do not parse");
                continue;
            }
        };
        tenants.insert(
            name.clone(),
            pb::Tenant {
                name,
                labels: labels.into_iter().collect(),
            },
        );
    }
    Ok(tenants.into_values().collect())
}

/// Tenant labels as the tenant query gives them: `k=v,k2=v2`, or a json object.
pub(crate) fn parse_tenant_labels(raw: &str) -> Result<BTreeMap<String, String>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(BTreeMap::new());
    }
    if raw.starts_with('{') {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).map_err(|e| format!("labels are not a json object: {e}"))?;
        let text = map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>();
        // the same key rules as every other label
        for kv in &text {
            if kv.contains(',') {
                return Err(format!("label `{kv}` holds a comma"));
            }
        }
        return flotilla_proto::parse_labels(&text.join(","));
    }
    flotilla_proto::parse_labels(raw)
}

/// How long advancing the fence waits for the fence row. A prepared transaction holds it
/// (FOR SHARE) until it is resolved, however long that takes: a newer epoch cannot be written
/// meanwhile, and the steps of that epoch fail on their own fence check until it is.
const FENCE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// Moves the shard's fence up to `epoch` in a transaction of its own. Step
/// transactions then only read the fence row (FOR SHARE); were the first step of
/// a new epoch to advance it, every other step would queue behind that one
/// step's whole transaction, however long it runs.
pub(crate) async fn advance_fence(pool: &PgPool, epoch: u64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(FENCE_LOCK_TIMEOUT).execute(&mut *tx).await?;
    sqlx::query("SELECT flotilla.check_fence($1)")
        .bind(epoch as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The newest epoch the shard has seen, read without taking the row's lock.
pub(crate) async fn read_fence(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM flotilla.fence")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(epoch).unwrap_or(0))
}

/// Journal rows for any of `targets` × `migrations`: one read for a whole batch of runs.
pub(crate) async fn read_applied(
    pool: &PgPool,
    targets: &[String],
    migrations: &[String],
) -> Result<Vec<JournalRow>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT target, migration_id, checksum FROM flotilla.journal \
         WHERE target = ANY($1) AND migration_id = ANY($2)",
    )
    .bind(targets)
    .bind(migrations)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(target, migration_id, checksum)| JournalRow {
            target,
            migration_id,
            checksum,
        })
        .collect())
}

/// Journal rows of the given migrations, on every target, for a preflight.
pub(crate) async fn read_for_preflight(
    pool: &PgPool,
    migrations: &[String],
) -> Result<Vec<pb::AppliedStep>, sqlx::Error> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT target, migration_id, checksum, plan_id FROM flotilla.journal \
         WHERE migration_id = ANY($1) ORDER BY target, seq",
    )
    .bind(migrations)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(tenant, migration_id, checksum, plan_id)| pb::AppliedStep {
                tenant,
                migration_id,
                checksum,
                plan_id,
            },
        )
        .collect())
}

/// The journal rows a plan applied, per target in reverse order of application.
pub(crate) async fn read_plan_rows(
    pool: &PgPool,
    plan_id: &str,
) -> Result<BTreeMap<String, Vec<String>>, sqlx::Error> {
    // A data change the plan left part-way (failed, halted) has a checkpoint of the plan and
    // no journal row: it is the newest change on its target, so it is undone first.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT target, migration_id FROM ( \
           SELECT target, migration_id, 0 AS part, 0::bigint AS seq FROM flotilla.checkpoints c \
            WHERE plan_id = $1 AND NOT EXISTS (SELECT 1 FROM flotilla.journal j \
              WHERE j.target = c.target AND j.migration_id = c.migration_id) \
           UNION ALL \
           SELECT target, migration_id, 1, seq FROM flotilla.journal WHERE plan_id = $1) r \
         ORDER BY target, part, seq DESC",
    )
    .bind(plan_id)
    .fetch_all(pool)
    .await?;
    let mut by_target: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (target, migration) in rows {
        by_target.entry(target).or_default().push(migration);
    }
    Ok(by_target)
}

/// How many journal rows of a plan are left on the shard, with the checkpoints of data
/// changes it left part-way.
pub(crate) async fn count_plan_rows(pool: &PgPool, plan_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM flotilla.journal WHERE plan_id = $1) \
              + (SELECT count(*) FROM flotilla.checkpoints WHERE plan_id = $1)",
    )
    .bind(plan_id)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_as_text() {
        let l = parse_tenant_labels(" tier=gold, region=eu ").unwrap();
        assert_eq!(l.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(l.len(), 2);
        assert!(parse_tenant_labels("").unwrap().is_empty());
        assert!(parse_tenant_labels("novalue").is_err());
    }

    #[test]
    fn labels_as_json() {
        let l = parse_tenant_labels(r#"{"tier": "gold", "size": 3, "beta": true, "gone": null}"#)
            .unwrap();
        assert_eq!(l.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(l.get("size").map(String::as_str), Some("3"));
        assert_eq!(l.get("beta").map(String::as_str), Some("true"));
        assert!(!l.contains_key("gone"));
        assert!(parse_tenant_labels("{not json").is_err());
        assert!(parse_tenant_labels(r#"{"bad key": "x"}"#).is_err());
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
}
