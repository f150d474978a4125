//! A step that cannot get its lock within lock_timeout gives up, so it never queues
//! in front of the table's traffic for longer, and is tried again after a pause (the
//! lock_timeout-with-retries pattern of GitLab and strong_migrations). Meanwhile another
//! connection looks at who blocks it, so the final error names them.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool};
use tracing::warn;

use super::conn::execute;
use crate::error::{Failure, is_lock_timeout};
use crate::step::PreparedMigration;

/// Attempts after the first when a step's lock times out (a data step's from its checkpoint).
pub(super) const LOCK_RETRIES: u32 = 3;
/// The pause before the first retry; it doubles after each.
pub(super) const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The pause before retry number `attempt` (from 1).
pub(super) fn retry_pause(attempt: u32) -> Duration {
    LOCK_RETRY_PAUSE * 2u32.pow(attempt - 1)
}

/// Runs `sql` (a whole transaction ending in COMMIT, or one statement that is all or
/// nothing on its own), and after a lock timeout, which left nothing of it done, runs it
/// again after the pauses a step's lock timeout gets, out of the failed transaction first.
/// Only `sql` runs again, not what came before it: the records of work done outside a
/// transaction (an up statement, an undo) use it, since running the work again would do it
/// twice (a `CREATE INDEX CONCURRENTLY` would fail on its own index, a procedure that
/// commits would do its work twice, a `DROP INDEX CONCURRENTLY` would fail on the index it
/// dropped); so do an undo's down statements, one by one. `transaction`: `sql` opens one
/// (a ROLLBACK ends it after a failure; after a statement on its own there is none to end).
/// On failure: the last error and how many attempts were made.
pub(super) async fn retry_lock_timeouts(
    conn: &mut PgConnection,
    sql: &str,
    transaction: bool,
    what: &str,
) -> Result<(), (sqlx::Error, u32)> {
    retry_lock_timeouts_watched(conn, sql, transaction, what, None, None)
        .await
        .map_err(|(e, attempts, _)| (e, attempts))
}

/// An undo waiting to try its lock again, on the agent's board as a step's wait is (state
/// `lock_wait`, with why): a rollback blocked behind an application's lock for a minute
/// showed nothing in `plan status` until it failed. Taken off the board when dropped.
pub(super) struct UndoWaitShown<'a> {
    publish: crate::data::Publish<'a>,
    tenant: &'a str,
    migration: &'a str,
    lock_timeout_ms: u64,
    shown: bool,
}

impl<'a> UndoWaitShown<'a> {
    pub(super) fn new(
        publish: crate::data::Publish<'a>,
        tenant: &'a str,
        m: &'a PreparedMigration,
    ) -> UndoWaitShown<'a> {
        UndoWaitShown {
            publish,
            tenant,
            migration: m.id(),
            lock_timeout_ms: m.lock_timeout_ms,
            shown: false,
        }
    }

    /// Before attempt `attempt + 1` (from the second), after `pause`.
    fn show(&mut self, attempt: u32, pause: Duration) {
        self.publish.lock_wait(
            self.tenant,
            self.migration,
            format!(
                "its undo's lock timed out (lock_timeout {}ms); attempt {} of {} in {:.1}s",
                self.lock_timeout_ms,
                attempt + 1,
                LOCK_RETRIES + 1,
                pause.as_secs_f64()
            ),
        );
        self.shown = true;
    }
}

impl Drop for UndoWaitShown<'_> {
    fn drop(&mut self) {
        if self.shown {
            self.publish
                .board
                .forget(self.publish.plan_id, self.migration, self.tenant);
        }
    }
}

/// The session's backend pid, for a [`BlockerWatch`] of it from another session.
pub(super) async fn backend_pid(conn: &mut PgConnection) -> Option<i32> {
    sqlx::query_scalar("SELECT pg_catalog.pg_backend_pid()")
        .fetch_one(conn)
        .await
        .ok()
}

/// [`retry_lock_timeouts`], its last attempt watched for who blocks it (`watch`: the pool
/// to look from, the step): on a lock timeout the error names them, as a step's does. The
/// session's pid is asked only once a lock timed out (nothing is added where none does).
pub(super) async fn retry_lock_timeouts_watched(
    conn: &mut PgConnection,
    sql: &str,
    transaction: bool,
    what: &str,
    watch: Option<(&PgPool, &PreparedMigration)>,
    mut shown: Option<&mut UndoWaitShown<'_>>,
) -> Result<(), (sqlx::Error, u32, Option<String>)> {
    let mut attempt = 0u32;
    loop {
        let watching = match watch {
            Some((pool, m)) if attempt == LOCK_RETRIES => backend_pid(conn)
                .await
                .map(|pid| BlockerWatch::start(pool, pid, m, true)),
            _ => None,
        };
        let outcome = execute(conn, sql.to_owned()).await;
        let blocker = match watching {
            Some(w) => w.finish().await,
            None => None,
        };
        let e = match outcome {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !is_lock_timeout(&e) || attempt == LOCK_RETRIES {
            return Err((e, attempt + 1, blocker));
        }
        if transaction && let Err(e) = execute(conn, "ROLLBACK".into()).await {
            return Err((e, attempt + 1, None));
        }
        attempt += 1;
        let pause = retry_pause(attempt);
        warn!(
            attempt,
            ?pause,
            "lock timeout in {what}; trying it again after a pause"
        );
        if let Some(shown) = shown.as_deref_mut() {
            shown.show(attempt, pause);
        }
        tokio::time::sleep(pause).await;
    }
}

/// A failure's message, with how many attempts a lock timeout had when it is one that
/// was tried again.
pub(super) fn with_attempts(failure: &Failure, attempts: u32, lock_timeout_ms: u64) -> String {
    if attempts > 1 && failure.is_lock_timeout() {
        format!(
            "{} ({attempts} attempts, each within lock_timeout {lock_timeout_ms}ms)",
            failure.error.message
        )
    } else {
        failure.error.message.clone()
    }
}

/// The table waited for, the table of the row waited for (a row lock is waited for on the
/// holder's transaction with the row's tuple lock held, or, behind another waiter for the
/// row, on the tuple lock itself), then the blocking session's pid,
/// user, application, state, seconds its transaction is open, and its last query.
type BlockerRow = (
    Option<String>,
    Option<String>,
    i32,
    String,
    String,
    String,
    f64,
    String,
);

/// Watches a step's backend from another connection while it may wait for a lock: from
/// half its lock_timeout on, it records which table the step waits for and which sessions
/// block it, for the error that names them: those it waits for and, one step further, those
/// they wait for (behind another waiter for a row, the step waits for that waiter, which
/// waits for the session that holds the row: the one to look at), the longest open first.
/// It looks more than once and keeps the last it saw: a look still running when the lock
/// timed out finds the step no longer waiting (one look at 3/4 of the lock_timeout, on a
/// loaded machine, took the rest of it and the error named nobody).
///
/// Its connection is its own, not the pool's: held through the attempt, a pooled one
/// would take the pool's one spare slot from every other lane's watch and from a lane or
/// a preflight that needs a connection meanwhile.
pub(super) struct BlockerWatch {
    task: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    seen: Arc<Mutex<Option<String>>>,
}

impl BlockerWatch {
    /// `contended`: the step timed out on its lock before.
    pub(super) fn start(
        pool: &PgPool,
        pid: i32,
        m: &PreparedMigration,
        contended: bool,
    ) -> BlockerWatch {
        let options = pool.connect_options();
        let lock_timeout = Duration::from_millis(m.lock_timeout_ms.max(10));
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut conn: Option<PgConnection> = None;
            let looks = async {
                // A step that timed out on its lock before has its connection opened at
                // once (on a loaded machine, opening one took a third of a 200 ms
                // lock_timeout); one watched from its first attempt (an atomic unit's
                // every target) opens one only if it runs that long.
                if !contended {
                    tokio::time::sleep(lock_timeout / 2).await;
                }
                conn = crate::shard::open(&options).await.ok();
                let Some(c) = conn.as_mut() else { return };
                // At 1/2, 3/4 and 7/8 of the lock_timeout: the first while the step
                // surely waits still, the later ones for sessions that joined the queue
                // since.
                for eighths in [4u32, 6, 7] {
                    tokio::time::sleep_until(started + lock_timeout * eighths / 8).await;
                    if let Some(found) = blockers_of(c, pid).await {
                        *record.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
                    }
                }
            };
            tokio::select! {
                () = looks => {}
                _ = &mut stopped => {}
            }
            // closed politely (a dropped socket is a log line on the shard's server)
            if let Some(c) = conn {
                let _ = sqlx::Connection::close(c).await;
            }
        });
        BlockerWatch {
            task,
            stop: Some(stop),
            seen,
        }
    }

    /// What it last saw while the step was waiting.
    pub(super) async fn finish(mut self) -> Option<String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for BlockerWatch {
    /// A run dropped mid-attempt (the agent stopping) does not leave its watch looking.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which table the session `pid` waits for and who blocks it, if it waits.
async fn blockers_of(conn: &mut PgConnection, pid: i32) -> Option<String> {
    let rows: Vec<BlockerRow> = sqlx::query_as(
        "SELECT CASE WHEN w.locktype <> 'tuple' THEN w.relation::pg_catalog.regclass::text END, \
           CASE WHEN w.locktype = 'tuple' THEN w.relation::pg_catalog.regclass::text \
           ELSE (SELECT t.relation::pg_catalog.regclass::text FROM pg_catalog.pg_locks t \
             WHERE t.pid = w.pid AND t.locktype = 'tuple' AND t.granted LIMIT 1) END, \
           a.pid, coalesce(a.usename::text, ''), \
           coalesce(a.application_name, ''), coalesce(a.state, ''), \
           coalesce(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start), 0)::float8, \
           pg_catalog.left(coalesce(a.query, ''), 120) \
         FROM pg_catalog.pg_locks w \
         CROSS JOIN LATERAL (SELECT p FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS d(p) \
           UNION SELECT pg_catalog.unnest(pg_catalog.pg_blocking_pids(d.p)) \
           FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS d(p)) AS b(pid) \
         JOIN pg_catalog.pg_stat_activity a ON a.pid = b.pid \
         WHERE w.pid = $1 AND NOT w.granted ORDER BY a.xact_start",
    )
    .bind(pid)
    .fetch_all(conn)
    .await
    .ok()?;
    let (table, row_of, ..) = rows.first()?;
    let what = match (table, row_of) {
        (Some(table), _) => table.clone(),
        (None, Some(table)) => format!("a row of {table}"),
        (None, None) => "an object".into(),
    };
    let blockers: Vec<String> = rows
        .iter()
        .map(|(_, _, pid, user, app, state, secs, query)| {
            format!(
                "pid {pid} (user {user}{}, {state}, transaction open {secs:.0}s, last query: {query})",
                if app.is_empty() { String::new() } else { format!(", application {app}") }
            )
        })
        .collect();
    Some(format!(
        "waiting for a lock on {what} held by {}",
        blockers.join("; ")
    ))
}
