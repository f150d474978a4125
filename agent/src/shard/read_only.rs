//! A read on one target for the coordinator's questions (a dry run's sizes, a wave's SQL
//! gate): in a READ ONLY transaction, with time limits, and with names resolved as a step
//! resolves them (the tenant's schema first, or the shard's own search_path).
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::step::quote_ident;

/// Begins the read-only transaction on `tenant` ("" = the shard itself): statements end
/// after `statement_timeout`, and lock waits after `lock_timeout` when one is given. The
/// caller rolls it back (there is nothing to keep).
pub(crate) async fn begin_read_only(
    pool: &PgPool,
    tenant: &str,
    statement_timeout: Duration,
    lock_timeout: Option<Duration>,
) -> Result<Transaction<'static, Postgres>, String> {
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    let mut setup = format!(
        "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = {};",
        statement_timeout.as_millis()
    );
    if let Some(lock_timeout) = lock_timeout {
        setup.push_str(&format!(
            " SET LOCAL lock_timeout = {};",
            lock_timeout.as_millis()
        ));
    }
    if !tenant.is_empty() {
        setup.push_str(&format!(
            " SET LOCAL search_path TO {};",
            quote_ident(tenant)
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tx)
}

/// A failed read as the operator reads it: the database's message and its SQLSTATE.
pub(crate) fn read_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!(
            "{}{}",
            db.message(),
            db.code()
                .map(|c| format!(" (SQLSTATE {c})"))
                .unwrap_or_default()
        ),
        _ => e.to_string(),
    }
}
