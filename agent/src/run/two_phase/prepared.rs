//! The shard's prepared transactions: which of Flotilla's are there, COMMIT or ROLLBACK
//! PREPARED of one, and the preflight's probe of whether the shard can prepare at all.
use std::collections::HashSet;

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;
use tracing::{info, instrument, warn};

use super::gid::probe_gid;
use super::{Decision, TwoPhaseError};
use crate::error::{SQLSTATE_UNDEFINED_OBJECT, classify};
use crate::run::conn::recover;
use crate::step::quote_literal;

/// Flotilla's prepared transactions in the current database, oldest first.
const LIST_PREPARED: &str = "SELECT gid FROM pg_catalog.pg_prepared_xacts \
     WHERE gid LIKE 'flotilla:%' AND database = pg_catalog.current_database() ORDER BY prepared";

/// Flotilla's prepared transactions in the current database, oldest first.
pub(crate) async fn list_prepared(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(LIST_PREPARED).fetch_all(pool).await
}

/// [`list_prepared`], only those prepared more than `age` ago (by the shard's clock).
pub(crate) async fn list_prepared_before(
    pool: &PgPool,
    age: std::time::Duration,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts \
         WHERE gid LIKE 'flotilla:%' AND database = pg_catalog.current_database() \
           AND prepared < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $1) \
         ORDER BY prepared",
    )
    .bind(age.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Which of `gids` are prepared in the current database.
pub(crate) async fn prepared_among(
    pool: &PgPool,
    gids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts \
         WHERE gid = ANY($1) AND database = pg_catalog.current_database()",
    )
    .bind(gids)
    .fetch_all(pool)
    .await?;
    Ok(found.into_iter().collect())
}

/// What COMMIT/ROLLBACK PREPARED did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// Resolved now.
    Now,
    /// Not prepared (any more): resolved before, by us or by someone else.
    Before,
}

/// COMMIT PREPARED or ROLLBACK PREPARED one gid (quoted), outside any transaction, on a pool
/// or a connection. Err: the message, with its SQLSTATE.
pub(crate) async fn finish<'e>(
    on: impl sqlx::PgExecutor<'e>,
    gid_lit: &str,
    decision: Decision,
) -> Result<Finished, TwoPhaseError> {
    // Fault tests: the agent dies as it is told to commit, its transactions left prepared
    // (a shard that never comes back to commit its part: `plan forget-shard`).
    if decision == Decision::Commit {
        fail::fail_point!("agent::before_commit_prepared", |_| {
            tracing::error!("failpoint agent::before_commit_prepared: exiting");
            std::process::exit(88)
        });
    }
    let sql = format!("{} {gid_lit}", decision.sql());
    match sqlx::raw_sql(AssertSqlSafe(sql)).execute(on).await {
        Ok(_) => Ok(Finished::Now),
        Err(e) => {
            let f = classify(&e, "resolve");
            if f.error.sqlstate == SQLSTATE_UNDEFINED_OBJECT {
                Ok(Finished::Before)
            } else {
                Err(TwoPhaseError::Finish {
                    message: f.error.message,
                    sqlstate: f.error.sqlstate,
                })
            }
        }
    }
}

/// How many transactions the shard's server can hold prepared, and holds now, and which
/// server that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrepareCapacity {
    pub max_prepared: u32,
    pub prepared_now: u32,
    /// The server (cluster) the shard database lives on, the same for every database of
    /// it: shard databases on one server share its max_prepared_transactions and lock
    /// table, so the coordinator adds up their prepared targets. Empty when it cannot be
    /// read: the shard is then checked alone.
    pub server: String,
}

/// Names the server: its system identifier (set by initdb; a physical replica shares it)
/// and the postmaster's start time (two servers cloned from one base backup differ there).
/// pg_control_system() is executable by any role by default; a server that revoked it is
/// reported as unknown.
const SERVER_SQL: &str = "SELECT s.system_identifier::text || '@' || \
     extract(epoch FROM pg_catalog.pg_postmaster_start_time())::text \
     FROM pg_catalog.pg_control_system() s";

/// Whether this shard can take part in two-phase commit: `max_prepared_transactions`
/// above 0, and the role can prepare (a probe transaction, prepared and rolled back).
/// Ok: how many it can hold; Err: why not, naming the shard and the setting or the SQLSTATE.
#[instrument(skip_all, fields(shard = %shard))]
pub(crate) async fn check_two_phase(
    pool: &PgPool,
    shard: &str,
) -> Result<PrepareCapacity, TwoPhaseError> {
    let show = |setting: &'static str| async move {
        sqlx::raw_sql(AssertSqlSafe(format!("SHOW {setting}")))
            .fetch_one(pool)
            .await
            .and_then(|row| sqlx::Row::try_get::<String, _>(&row, 0))
            .map_err(|source| TwoPhaseError::Setting {
                shard: shard.to_string(),
                setting,
                source,
            })
    };
    let max = show("max_prepared_transactions").await?;
    let max_prepared = max.trim().parse::<u32>().unwrap_or(0);
    if max_prepared == 0 {
        return Err(TwoPhaseError::NoPreparedTransactions {
            shard: shard.to_string(),
            value: max.trim().to_string(),
        });
    }
    match show("max_locks_per_transaction").await {
        Ok(locks) => {
            info!(max_prepared_transactions = %max, max_locks_per_transaction = %locks, "two-phase commit settings")
        }
        Err(e) => warn!(error = %e, "max_locks_per_transaction cannot be read"),
    }
    // The limit is the server's: transactions prepared in any of its databases count, but
    // for the preflight probes (prepared and rolled back at once), which the other shard
    // databases of the server may hold this very moment for this very plan's preflight.
    let probes = format!(
        "{}{}:%",
        flotilla_core::protocol::gid::PREFIX,
        flotilla_core::protocol::gid::PREFLIGHT_UNIT
    );
    let prepared_now: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_prepared_xacts WHERE gid NOT LIKE $1",
    )
    .bind(probes)
    .fetch_one(pool)
    .await
    .map_err(|source| TwoPhaseError::Setting {
        shard: shard.to_string(),
        setting: "pg_prepared_xacts",
        source,
    })?;
    let server = match sqlx::query_scalar::<_, String>(SERVER_SQL)
        .fetch_one(pool)
        .await
    {
        Ok(server) => server,
        Err(error) => {
            warn!(%error, "cannot tell which server this shard is on: its prepared targets are counted alone");
            String::new()
        }
    };
    let capacity = PrepareCapacity {
        max_prepared,
        prepared_now: u32::try_from(prepared_now).unwrap_or(u32::MAX),
        server,
    };
    let gid = probe_gid();
    let lit = quote_literal(&gid)?;
    let mut conn = pool
        .acquire()
        .await
        .map_err(|source| TwoPhaseError::ProbeConnection {
            shard: shard.to_string(),
            source,
        })?;
    let prepared = sqlx::raw_sql(AssertSqlSafe(format!("BEGIN; PREPARE TRANSACTION {lit}")))
        .execute(&mut *conn)
        .await;
    if let Err(e) = prepared {
        if recover(&mut conn, true).await {
            conn.close_on_drop();
        }
        let f = classify(&e, "prepare");
        return Err(TwoPhaseError::CannotPrepare {
            shard: shard.to_string(),
            message: f.error.message,
            sqlstate: f.error.sqlstate,
        });
    }
    drop(conn);
    match finish(pool, &lit, Decision::Abort).await {
        Ok(_) => Ok(capacity),
        Err(e) => Err(TwoPhaseError::ProbeRollback {
            shard: shard.to_string(),
            gid,
            source: Box::new(e),
        }),
    }
}

/// How often the shard's prepared transactions are counted and aged for the metrics.
const CENSUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Counts Flotilla's prepared transactions on the shard and ages the oldest, for the
/// metrics, every few seconds until `stop`: a transaction left prepared holds its locks
/// and blocks vacuum, and its age is what an operator is alerted on. The count also
/// corrects the gauge the agent keeps as it prepares and resolves.
pub(crate) async fn census(pool: PgPool, stop: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(CENSUS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let found: Result<(i64, f64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(prepared))::float8, 0) \
             FROM pg_catalog.pg_prepared_xacts \
             WHERE gid LIKE 'flotilla:%' AND database = pg_catalog.current_database()",
        )
        .fetch_one(&pool)
        .await;
        match found {
            Ok((held, oldest)) => crate::metrics::prepared_census(
                held,
                std::time::Duration::from_secs_f64(oldest.max(0.0)),
            ),
            // the shard may be away for a moment; the next round tells
            Err(error) => tracing::debug!(%error, "counting prepared transactions failed"),
        }
    }
}
