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

/// A server session, as a cancel names it: its pid, and when it started (text, as the
/// server wrote it).
#[derive(Debug, Clone)]
pub(super) struct Session {
    pub pid: i32,
    pub started: String,
}

/// The connection's server session.
pub(super) async fn session_of(conn: &mut sqlx::PgConnection) -> Option<Session> {
    sqlx::query_as::<_, (i32, String)>(
        "SELECT pid, backend_start::text FROM pg_catalog.pg_stat_activity
          WHERE pid = pg_catalog.pg_backend_pid()",
    )
    .fetch_optional(conn)
    .await
    .ok()
    .flatten()
    .map(|(pid, started)| Session { pid, started })
}

/// The failure of a run that did not prepare because its plan was halted: reported NOT_RUN.
pub(super) fn not_prepared() -> Failure {
    Failure::agent(data::STOPPED, format!("not prepared: {WHY}"))
}

/// Runs `run` (an atomic unit's transaction on `session`), cancelling its statement if the
/// plan is halted before it ends; a run cancelled so is reported NOT_RUN, not failed.
pub(super) async fn cancel_on_halt<F>(
    pool: &PgPool,
    session: Session,
    halts: &Halts,
    run: F,
) -> Result<(), GroupFailure>
where
    F: Future<Output = Result<(), GroupFailure>>,
{
    // Halted before it began: not begun (a cancel sent now would find no statement, and
    // the run would do all its work before it found the halt at its PREPARE).
    if halts.halted() {
        return Err(GroupFailure {
            position: 0,
            failure: not_prepared(),
            in_transaction: false,
        });
    }
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
    let (r, cancelled) = tokio::join!(run, cancel_backend(pool, &session));
    match r {
        // Not one of the PREPARE (phase `prepare`): PostgreSQL holds a cancel off while it
        // prepares, and one held so fails the statements sent with the PREPARE, the
        // transaction prepared all the same; the executor's failure path asks the server
        // whether the gid is prepared (reported PREPARED then, for the abort to roll back).
        Err(mut gf)
            if cancelled
                && gf.failure.error.sqlstate == QUERY_CANCELED
                && gf.failure.error.phase != "prepare"
                && !gf.failure.connection_lost =>
        {
            info!(
                pid = session.pid,
                "an atomic unit's run cancelled: its plan was halted"
            );
            gf.failure.error.phase = data::STOPPED.into();
            gf.failure.error.message = format!("cancelled: {WHY}");
            gf.position = 0;
            Err(gf)
        }
        other => other,
    }
}

/// `pg_cancel_backend` of the run's session, named by its pid and its start (a pid alone
/// may be another session's by now, when the run's was cut: another plan's, of this very
/// agent), on an idle connection of the pool, or one of its own when none is idle: waiting
/// for one of the pool's could wait for the very runs it would cancel. Whether the server
/// signalled the session.
async fn cancel_backend(pool: &PgPool, session: &Session) -> bool {
    const SQL: &str = "SELECT coalesce(bool_or(pg_catalog.pg_cancel_backend(pid)), false)
                         FROM pg_catalog.pg_stat_activity
                        WHERE pid = $1 AND backend_start = $2::timestamptz";
    let pid = session.pid;
    let cancel = async {
        match pool.try_acquire() {
            Some(mut conn) => {
                sqlx::query_scalar::<_, bool>(SQL)
                    .bind(pid)
                    .bind(&session.started)
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
                    .bind(&session.started)
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
