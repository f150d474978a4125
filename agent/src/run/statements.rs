//! A non-transactional step's up statements (or a data change's, before its first batch),
//! each committed with the step's checkpoint: a statement that can run in a transaction
//! runs in one, fenced, that also records it done (`flotilla.advance_statements`), so it is
//! done exactly once; one that cannot (`CREATE INDEX CONCURRENTLY`, ...) runs on its own and
//! is recorded right after. A step that fails, halts or loses its agent part-way then goes
//! on after its last statement done when it runs again, and a rollback of its plan finds
//! the checkpoint and undoes it with its down SQL (before, the statements done before a
//! failure stayed applied with nothing on the shard to say so). A step whose first
//! statement cannot run in a transaction records its checkpoint (nothing done) before it,
//! so a rollback finds the step however that statement ended (taken back when it failed
//! leaving nothing). Settings done before
//! (`SET ...`) are run again when the step goes on in another session.
use flotilla_core::sql::{
    first_non_transactional, is_concurrent_index_drop, is_session_setting, may_commit_part_way,
    quote_ident,
};
use sqlx::postgres::{PgConnection, PgPool};
use tracing::{info, warn};

use super::conn::execute;
use super::invalid_index::{drop_invalid_index, index_name_taken, invalid_index};
use super::lock_wait::{retry_lock_timeouts, retry_lock_timeouts_watched, with_attempts};
use crate::error::{Failure, classify};
use crate::step::sql::{begin_fenced, push_advance_statements, push_advance_undone};
use crate::step::{PreparedMigration, StepContext};

/// PostgreSQL's "cannot run inside a transaction block" (active_sql_transaction), and
/// "invalid transaction termination" (a procedure or DO block that COMMITs, called inside
/// one): either way the transaction and everything in it were undone.
const SQLSTATES_NOT_IN_TRANSACTION: [&str; 2] = ["25001", "2D000"];

/// A statement that failed, and whether the session may be left inside its transaction.
pub(super) struct StatementFailure {
    pub failure: Failure,
    pub in_transaction: bool,
}

/// Runs the step's up statements after the first `done` (done by an earlier run, as its
/// checkpoint says; `fresh`: the step had no checkpoint before this run). The session holds
/// the step's settings and has checked its fence.
pub(super) async fn run_up_statements(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    done: usize,
    fresh: bool,
) -> Result<(), StatementFailure> {
    if done > 0 {
        info!(
            step = m.id(),
            tenant = cx.tenant,
            done,
            of = m.up.len(),
            "going on after the up statements its checkpoint says are done"
        );
    }
    let fail = |e: &sqlx::Error, in_transaction| StatementFailure {
        failure: classify(e, "up"),
        in_transaction,
    };
    replay_session_settings(conn, m.up.iter().take(done))
        .await
        .map_err(|e| fail(&e, false))?;
    for (k, statement) in m.up.iter().enumerate().skip(done) {
        let advance = advance_sql(cx, m, k, k + 1);
        // refused a transaction block though the splitter took it for one that runs in
        // one: a procedure or DO block that commits inside
        let mut commits_inside = false;
        if first_non_transactional(std::slice::from_ref(statement)).is_none() {
            let mut sql = begin_fenced(cx);
            sql.push_str(statement);
            sql.push_str("\n;\n");
            sql.push_str(&advance);
            sql.push_str("COMMIT;\n");
            match execute(conn, sql).await {
                Ok(()) => continue,
                Err(e) if refuses_transaction(&e) => {
                    commits_inside = true;
                    // a statement that refuses a transaction block which the splitter does
                    // not know: it runs on its own, as below
                    if let Err(e) = execute(conn, "ROLLBACK".into()).await {
                        return Err(fail(&e, true));
                    }
                }
                Err(e) => return Err(fail(&e, true)),
            }
        }
        if k == 0 {
            // Nothing recorded yet: the checkpoint comes first, so that a rollback finds the
            // step (and runs its down SQL) even if the agent dies before this statement's
            // record, whether or not the statement committed.
            let pending = format!("{}{}COMMIT;\n", begin_fenced(cx), advance_sql(cx, m, 0, 0));
            execute(conn, pending).await.map_err(|e| fail(&e, true))?;
        }
        if let Err(failure) =
            run_on_its_own(conn, m, statement, k, "up", commits_inside, false, None).await
        {
            if k == 0 && fresh && left_nothing(&failure, statement, commits_inside) {
                forget_pending(conn, cx, m).await;
            }
            return Err(StatementFailure {
                failure,
                in_transaction: false,
            });
        }
        // Done and committed: a crash before this records it leaves it to run again (a
        // statement outside a transaction cannot commit with its record).
        let record = format!("{}{advance}COMMIT;\n", begin_fenced(cx));
        let what = format!("the record of up statement {} of step {}", k + 1, m.id());
        if let Err((e, attempts)) = retry_lock_timeouts(conn, &record, true, &what).await {
            // The statement is done and not recorded: not a failure for the step's own
            // retry, which would run the statement again from its checkpoint.
            let mut failure = classify(&e, "up");
            failure.part_way = true;
            failure.error.message = format!(
                "up statement {} ran outside a transaction, and its record (the step's \
                 checkpoint) did not commit: {}; the step runs that statement again when it \
                 goes on",
                k + 1,
                with_attempts(&failure, attempts, m.lock_timeout_ms)
            );
            return Err(StatementFailure {
                failure,
                in_transaction: true,
            });
        }
    }
    Ok(())
}

/// Whether the first up statement, run on its own, failed leaving nothing done, as far as
/// can be known: refused before it began (class 42: a name, a column, a syntax the server
/// would not take), or a statement that is one transaction (undone whole). Not a concurrent
/// index build or drop that failed later (an INVALID index may stay where the agent could
/// not find it: an unnamed index, a table in another schema), a procedure or DO block that
/// committed inside, or a lost connection.
fn left_nothing(failure: &Failure, statement: &str, commits_inside: bool) -> bool {
    if failure.part_way || failure.server_gone() || commits_inside {
        return false;
    }
    failure.error.sqlstate.starts_with("42")
        || !(may_commit_part_way(statement) || is_concurrent_index_drop(statement))
}

/// The checkpoint written before the first up statement (nothing done) goes again when that
/// statement left nothing: else a rollback took the step for begun and ran its down SQL,
/// which fails where it is not idempotent (`DROP INDEX` of an index never built), and the
/// plan ended rollback_failed over a step that did nothing. Only the checkpoint as written
/// (nothing done, nothing undone); if it cannot go, it stays, and a rollback runs the down SQL
/// as before.
async fn forget_pending(conn: &mut PgConnection, cx: &StepContext<'_>, m: &PreparedMigration) {
    let sql = format!(
        "{}DELETE FROM flotilla.checkpoints WHERE target = {} AND migration_id = {} \
         AND statements = 0 AND undone = 0 AND NOT undoing AND last_key IS NULL AND batches = 0;\nCOMMIT;\n",
        begin_fenced(cx),
        cx.tenant_lit,
        m.id_lit
    );
    if let Err(e) = execute(conn, sql).await {
        let _ = execute(conn, "ROLLBACK".into()).await;
        warn!(step = m.id(), tenant = cx.tenant, error = %e,
              "could not take back the checkpoint of a step whose first statement did nothing; a rollback runs its down SQL");
    }
}

/// Runs the down statements of a non-transactional step a rollback undoes, after the first
/// `undone` (done by a rollback cut short, as its checkpoint says), each recorded as the up
/// statements are: one that can run in a transaction commits with its record, fenced; one
/// that cannot runs on its own and is recorded right after. A lock timeout is waited out by
/// what timed out alone, after the pauses a step gets, unless it may have committed part of
/// its work first (`may_commit_part_way`). The session holds the step's settings and has
/// checked its fence. On failure, the session may be inside a transaction.
/// A step left part-way (a checkpoint, no journal row) whose `down.sql` pairs with its
/// `up.sql` statement for statement (as many statements: the last down statement undoes the
/// first up statement, and so on, `SELECT 1` for one with nothing to undo): only the down
/// statements of the up statements that ran are run, and those of the others recorded as
/// passed over (`undone`, so a rollback cut short goes on from there). The whole `down.sql`
/// also undid what never ran: an up statement that failed because its column was there
/// already had that column, and its data, dropped by the undo of a statement that did
/// nothing. The failed statement's own is run when it may have left work (a concurrent
/// index build's INVALID index, a procedure that committed part of its work). Unpaired, the
/// whole `down.sql` runs, as for an applied step (it undoes the step as a whole). Returns
/// the down statements done or passed over.
pub(super) async fn pass_over_never_run(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    undone: usize,
) -> Result<usize, Failure> {
    let n = m.up.len();
    if n == 0 || m.down.len() != n {
        return Ok(undone);
    }
    let row: Option<(i32, bool)> = sqlx::query_as(
        "SELECT c.statements, EXISTS (SELECT 1 FROM flotilla.journal j \
                 WHERE j.target = c.target AND j.migration_id = c.migration_id) \
           FROM flotilla.checkpoints c WHERE c.target = $1 AND c.migration_id = $2",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| classify(&e, "down"))?;
    let Some((done, applied)) = row else {
        return Ok(undone);
    };
    if applied {
        return Ok(undone);
    }
    let mut ran = usize::try_from(done).unwrap_or(0).min(n);
    if ran < n {
        let failed = &m.up[ran];
        if first_non_transactional(std::slice::from_ref(failed)).is_some()
            || may_commit_part_way(failed)
        {
            ran += 1;
        }
    }
    let pass = n - ran;
    if undone >= pass {
        return Ok(undone);
    }
    info!(
        step = m.id(),
        tenant = cx.tenant,
        ran,
        of = n,
        "left part-way: only the down statements of the up statements that ran are run"
    );
    let mut sql = begin_fenced(cx);
    push_advance_undone(&mut sql, cx, m, undone, pass);
    sql.push_str("COMMIT;\n");
    let what = format!(
        "the record of the down statements passed over of step {}",
        m.id()
    );
    retry_lock_timeouts(conn, &sql, true, &what)
        .await
        .map_err(|(e, attempts)| {
            let mut failure = classify(&e, "down");
            failure.error.message = with_attempts(&failure, attempts, m.lock_timeout_ms);
            failure
        })?;
    Ok(pass)
}

/// `watch`: the pool to watch a statement's last lock wait from (a rollback's), naming who
/// blocks it when it gives up.
pub(super) async fn run_down_statements(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    undone: usize,
    watch: Option<&PgPool>,
) -> Result<(), Failure> {
    if undone > 0 {
        info!(
            step = m.id(),
            tenant = cx.tenant,
            undone,
            of = m.down.len(),
            "going on after the down statements its checkpoint says are done"
        );
    }
    let fail = |e: &sqlx::Error, attempts: u32| {
        let mut failure = classify(e, "down");
        failure.error.message = with_attempts(&failure, attempts, m.lock_timeout_ms);
        failure
    };
    replay_session_settings(conn, m.down.iter().take(undone))
        .await
        .map_err(|e| fail(&e, 1))?;
    for (k, statement) in m.down.iter().enumerate().skip(undone) {
        let mut advance = String::new();
        push_advance_undone(&mut advance, cx, m, k, k + 1);
        let what = format!("down statement {} of step {}", k + 1, m.id());
        let mut commits_inside = false;
        if first_non_transactional(std::slice::from_ref(statement)).is_none() {
            let mut sql = begin_fenced(cx);
            sql.push_str(statement);
            sql.push_str("\n;\n");
            sql.push_str(&advance);
            sql.push_str("COMMIT;\n");
            match retry_lock_timeouts(conn, &sql, true, &what).await {
                Ok(()) => continue,
                Err((e, _)) if refuses_transaction(&e) => {
                    // a procedure or DO block that commits inside: it runs on its own, below
                    commits_inside = true;
                    execute(conn, "ROLLBACK".into())
                        .await
                        .map_err(|e| fail(&e, 1))?;
                }
                Err((e, attempts)) => return Err(fail(&e, attempts)),
            }
        }
        let retry = !commits_inside && !may_commit_part_way(statement);
        run_on_its_own(conn, m, statement, k, "down", commits_inside, retry, watch)
            .await
            .map_err(|mut failure| {
                // A DROP INDEX CONCURRENTLY that gave up waiting for the transactions on its
                // table may have marked its index invalid already (it does before it waits):
                // no query uses it, every write still maintains it.
                let words: Vec<&str> = statement.split_whitespace().collect();
                if failure.is_lock_timeout()
                    && words
                        .join(" ")
                        .to_ascii_uppercase()
                        .starts_with("DROP INDEX CONCURRENTLY")
                {
                    failure.error.message = format!(
                        "{}; this DROP INDEX CONCURRENTLY may have left its index INVALID on \
                         the tenant (no query uses it, every write still maintains it): \
                         `plan rollback` again once the lock is free finishes the drop",
                        failure.error.message
                    );
                }
                failure
            })?;
        // Done and committed: a crash before this records it leaves it to run again.
        let record = format!("{}{advance}COMMIT;\n", begin_fenced(cx));
        let what = format!("the record of down statement {} of step {}", k + 1, m.id());
        if let Err((e, attempts)) = retry_lock_timeouts(conn, &record, true, &what).await {
            let mut failure = fail(&e, attempts);
            failure.error.message = format!(
                "down statement {} ran outside a transaction, and its record (the step's \
                 checkpoint) did not commit: {}; a rollback runs that statement again",
                k + 1,
                failure.error.message
            );
            return Err(failure);
        }
    }
    Ok(())
}

/// Runs up or down statement `k` (`phase`) on its own, outside a transaction, the session
/// out of any: a concurrent index build that fails drops the INVALID index it left (unless
/// one of its name was there before), and one that passes over an INVALID index of its name
/// (`IF NOT EXISTS`) fails naming it, so neither is recorded done with no working index.
/// `commits_inside`: it refused a transaction block (a procedure or DO block that commits),
/// so what it committed before an error stays. `retry`: a lock timeout is tried again after
/// the pauses a step gets (only for a statement that is all or nothing). A failure that may
/// have left work committed is `part_way`.
#[allow(clippy::too_many_arguments)]
async fn run_on_its_own(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    statement: &str,
    k: usize,
    phase: &str,
    commits_inside: bool,
    retry: bool,
    watch: Option<&PgPool>,
) -> Result<(), Failure> {
    let taken = index_name_taken(conn, statement).await;
    let ran = if retry {
        let what = format!("{phase} statement {} of step {}", k + 1, m.id());
        let watch = watch.map(|pool| (pool, m));
        retry_lock_timeouts_watched(conn, statement, false, &what, watch, None).await
    } else {
        execute(conn, statement.to_owned())
            .await
            .map_err(|e| (e, 1, None))
    };
    if let Err((e, attempts, blocker)) = ran {
        let mut failure = classify(&e, phase);
        failure.error.message = with_attempts(&failure, attempts, m.lock_timeout_ms);
        if let Some(b) = blocker {
            failure.error.message = format!("{}; {b}", failure.error.message);
        }
        let left = if taken {
            Ok(())
        } else {
            drop_invalid_index(conn, statement).await
        };
        if let Err(left) = left {
            failure.part_way = true;
            failure.error.message = format!("{}; {left}", failure.error.message);
        } else if commits_inside {
            failure.part_way = true;
            failure.error.message = format!(
                "{}; {phase} statement {} commits inside (it refused a transaction block), so \
                 what it committed before the error stays: not tried again by the agent",
                failure.error.message,
                k + 1
            );
        }
        return Err(failure);
    }
    // `IF NOT EXISTS` passes over an index of that name, INVALID or not: an INVALID one
    // (a build that failed before, or one under way in another session) is no index
    if taken && let Some((schema, index)) = invalid_index(conn, statement).await {
        return Err(Failure::agent(
            phase,
            format!(
                "{phase} statement {} made no index: {}.{} was there already, INVALID (a \
                 build that failed before, or one under way in another session); drop it \
                 (DROP INDEX CONCURRENTLY) and run the {} again",
                k + 1,
                quote_ident(&schema),
                quote_ident(&index),
                if phase == "down" { "rollback" } else { "step" }
            ),
        ));
    }
    Ok(())
}

/// Runs again the session settings (`SET ROLE`, `SET search_path`) among statements done by
/// an earlier run: they lived in the session that ran them, and the statements after them
/// expect them in this one.
pub(super) async fn replay_session_settings<'a>(
    conn: &mut PgConnection,
    done: impl Iterator<Item = &'a String>,
) -> Result<(), sqlx::Error> {
    for statement in done.filter(|s| is_session_setting(s)) {
        execute(conn, statement.clone()).await?;
    }
    Ok(())
}

/// The statement refused to run inside a transaction block.
fn refuses_transaction(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| SQLSTATES_NOT_IN_TRANSACTION.contains(&c.as_ref())))
}

/// `SELECT flotilla.advance_statements(...)` from `prev` to `done` statements.
fn advance_sql(cx: &StepContext<'_>, m: &PreparedMigration, prev: usize, done: usize) -> String {
    let mut out = String::new();
    push_advance_statements(&mut out, cx, m, prev, done);
    out
}
