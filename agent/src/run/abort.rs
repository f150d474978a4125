//! A run of an atomic unit whose plan is halted while it runs (the unit aborts: a failure
//! elsewhere, a cancel, a rollback): it does not prepare, and the statement it is in is
//! cancelled. Its transaction could only be rolled back at its end, and until then it holds
//! its tables' locks against the tenant's application, for as long as its slowest statement
//! (an `ALTER TABLE` rewriting a big table, a lock wait up to its `lock_timeout`) takes.
//!
//! The cancel (`pg_cancel_backend`) must reach no other statement than the run's own: it is
//! sent while the run's future holds its connection, and the run is not over before the
//! cancel has been answered, so the signal is the server's before anything else can be sent
//! on that session. A cancel that finds the session between statements is ignored by the
//! server (as one sent after a query ended is).
use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tracing::{info, warn};

use super::executor::GroupFailure;
use super::job::Halts;
use crate::data;
use crate::error::Failure;

/// PostgreSQL's `query_canceled`.
const QUERY_CANCELED: &str = "57014";
/// How long the cancel's own connection may take to open (when the pool has none idle):
/// past it the run goes on to its end, and rolls back there.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

const WHY: &str = "the plan was halted while the run's transaction was open (its atomic unit \
                   aborts: a failure elsewhere, a cancel, a rollback); rolled back, nothing of \
                   it applied";

/// The failure of a run that did not prepare because its plan was halted: reported NOT_RUN.
pub(super) fn not_prepared() -> Failure {
    Failure::agent(data::STOPPED, format!("not prepared: {WHY}"))
}

/// Runs `run` (an atomic unit's transaction on the session `pid`), cancelling its statement
/// if the plan is halted before it ends; a run cancelled so is reported NOT_RUN, not failed.
pub(super) async fn cancel_on_halt<F>(
    pool: &PgPool,
    pid: i32,
    halts: &Halts,
    run: F,
) -> Result<(), GroupFailure>
where
    F: Future<Output = Result<(), GroupFailure>>,
{
    let mut run = std::pin::pin!(run);
    let mut control = halts.control.clone();
    let at_queue = halts.at_queue;
    let halted = async {
        loop {
            if control.borrow_and_update().halts != at_queue {
                return;
            }
            if control.changed().await.is_err() {
                // the plan is gone: nothing will halt it now
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        biased;
        r = &mut run => return r,
        () = halted => {}
    }
    // Both to their ends: the run goes on being read while the cancel is on its way (a
    // run whose results wait unread would hold its locks for the cancel's connection), and
    // it is over only once the cancel was answered.
    let (r, cancelled) = tokio::join!(run, cancel_backend(pool, pid));
    match r {
        Err(mut gf)
            if cancelled
                && gf.failure.error.sqlstate == QUERY_CANCELED
                && !gf.failure.connection_lost =>
        {
            info!(pid, "an atomic unit's run cancelled: its plan was halted");
            gf.failure.error.phase = data::STOPPED.into();
            gf.failure.error.message = format!("cancelled: {WHY}");
            gf.position = 0;
            Err(gf)
        }
        other => other,
    }
}

/// `pg_cancel_backend(pid)`, on an idle connection of the pool, or one of its own when
/// none is idle: waiting for one of the pool's could wait for the very runs it would
/// cancel. Whether the server signalled the session.
async fn cancel_backend(pool: &PgPool, pid: i32) -> bool {
    const SQL: &str = "SELECT pg_catalog.pg_cancel_backend($1)";
    let cancel = async {
        match pool.try_acquire() {
            Some(mut conn) => {
                sqlx::query_scalar::<_, bool>(SQL)
                    .bind(pid)
                    .fetch_one(&mut *conn)
                    .await
            }
            None => {
                let options = pool.connect_options();
                // (only the connecting is bounded: a cancel dropped once sent could still
                // reach the session after the run, at another statement)
                let mut conn = tokio::time::timeout(CANCEL_WAIT, crate::shard::open(&options))
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                let r = sqlx::query_scalar::<_, bool>(SQL)
                    .bind(pid)
                    .fetch_one(&mut conn)
                    .await;
                let _ = sqlx::Connection::close(conn).await;
                r
            }
        }
    };
    match cancel.await {
        Ok(signalled) => signalled,
        Err(e) => {
            warn!(
                pid,
                "cancelling a halted atomic run's statement failed: {e}"
            );
            false
        }
    }
}
