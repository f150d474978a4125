//! The shard connection a run holds: one query as a simple-query string, cleaning the
//! session up after a failure, and waiting for a server that went away to come back.
use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgPool};
use tracing::warn;

use crate::step::sql::SESSION_RESET;

/// Runs `sql` (one or several statements) in one round trip.
pub(crate) async fn execute(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// Brings the connection back to a clean session after a failure: out of its transaction,
/// and reset (a failed transaction undid what it set, but not a session advisory lock, and
/// a failure after a COMMIT or PREPARE comes before the reset that follows them). True when
/// that failed (the connection must be closed, not pooled).
pub(crate) async fn recover(conn: &mut PgConnection, in_transaction: bool) -> bool {
    let sql = if in_transaction {
        format!("ROLLBACK;\n{SESSION_RESET}")
    } else {
        SESSION_RESET.to_owned()
    };
    match sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
        Ok(_) => false,
        Err(error) => {
            warn!(%error, "cleaning up after a failed step failed; dropping the connection");
            true
        }
    }
}

/// Waits (at most a minute, backing off up to 2s) until the shard's server answers again.
pub(crate) async fn wait_for_server(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    while Instant::now() < deadline {
        if sqlx::query("SELECT 1").execute(pool).await.is_ok() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    warn!("the shard's server did not answer again within a minute");
}
