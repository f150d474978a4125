//! The pieces every step query is made of: settings, the fence check, the statements, the
//! verify check and the journal row, and their undo. Each query the agent sends is a
//! simple-query string built from these, so a whole step, or a whole transaction of steps,
//! costs one round trip. Everything
//! variable in it is quoted: identifiers with `quote_ident`, values with `quote_literal`,
//! numbers formatted from integers.
use std::fmt::Write;

use super::{PreparedMigration, StepContext, quote_ident};

/// Joins statements so that a trailing `-- comment` can never swallow the separator.
pub(crate) fn push_statements(out: &mut String, statements: &[String]) {
    for s in statements {
        out.push_str(s);
        out.push_str("\n;\n");
    }
}

/// Ends a connection's use by one transaction of a run (or an undo, or a non-transactional
/// step), before the pool hands it to the next tenant's run. What a migration's SQL sets
/// for the session outlives its COMMIT (and its PREPARE TRANSACTION): a `SET` without
/// LOCAL, `set_config(.., false)`, a `SET ROLE` or `SET SESSION AUTHORIZATION`, a temporary
/// table, a session advisory lock, a `LISTEN`. Each step sets its own timeouts and
/// search_path, but a shard-level step, a gate's check or a read on that connection would
/// resolve names in the last tenant's schema, run as the role the last step took, or find
/// the last tenant's temporary table before its own table (a `CREATE TEMP TABLE IF NOT
/// EXISTS` would keep the last tenant's rows). `RESET ALL` leaves the role and the session
/// authorization (PostgreSQL exempts them); their resets, allowed to any user, go back to
/// what the connection started with (a role set in its options or by `ALTER ROLE ... SET
/// role` included). The agent's own session lock is on a connection outside the pool. Not
/// reset: SQL-level prepared statements (`DEALLOCATE ALL` would drop sqlx's cache with
/// them). About 20 us of the server's time, in the run's own round trip. After a failure
/// `conn::recover` runs it (an abort undoes what the transaction set, but not a session
/// advisory lock).
pub(crate) const SESSION_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;\nRESET ROLE;\n\
     RESET ALL;\nDISCARD TEMP;\nSELECT pg_catalog.pg_advisory_unlock_all();\nUNLISTEN *;\n";

/// Opens a step transaction and checks the fence in it, and, for a tenant, that its schema
/// is still the one its journal rows were written in (a backfill of hours, a schema made
/// again under it: its batches and its journal row went on in the new schema).
pub(crate) fn begin_fenced(cx: &StepContext<'_>) -> String {
    let mut out = format!("BEGIN;\nSELECT flotilla.check_fence({});\n", cx.epoch);
    push_tenant_check(&mut out, cx);
    out
}

/// `flotilla.check_tenant_schema` of the step's tenant (none for the shard's own steps).
fn push_tenant_check(out: &mut String, cx: &StepContext<'_>) {
    if !cx.tenant.is_empty() {
        let _ = writeln!(
            out,
            "SELECT flotilla.check_tenant_schema({});",
            cx.tenant_lit
        );
    }
}

/// Checks the fence.
fn push_fence(out: &mut String, epoch: u64) {
    let _ = writeln!(out, "SELECT flotilla.check_fence({epoch});");
}

/// `SET [LOCAL] lock_timeout/statement_timeout/search_path` for one step, and the fence check
/// when `fence` names the epoch.
///
/// The fence comes after the timeouts, so that its wait for the fence row is bounded by the
/// step's lock_timeout (a transaction of an older epoch holds the row until it ends, and a
/// prepared one until its plan's decision, however long that takes), and before the
/// tenant's search_path: `check_fence`'s two queries keep their cached plans only while the
/// search_path they were planned under is the current one, so called after a different
/// tenant's path at every run they were parsed and planned again each time (measured with
/// pg_stat_statements on one session: 39 us a call against 12 us). This covers the fence of
/// every transactional step and undo, the bulk of a rollout; the fenced transactions inside a
/// non-transactional step (its statements, batches and epilogue) run under the tenant's path
/// it set for the session, and plan `check_fence` once per step, not per batch.
pub(crate) fn push_settings(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    local: bool,
    fence: Option<u64>,
) {
    let scope = if local { "SET LOCAL" } else { "SET" };
    let _ = writeln!(
        out,
        "{scope} lock_timeout = '{}ms'; {scope} statement_timeout = '{}ms';",
        m.lock_timeout_ms, m.statement_timeout_ms
    );
    // when the step started, for its journal row (now() would be the transaction's start)
    let _ = writeln!(
        out,
        "SELECT pg_catalog.set_config('flotilla.step_started', pg_catalog.clock_timestamp()::text, {local});"
    );
    if let Some(epoch) = fence {
        push_fence(out, epoch);
        // with the fence, once a transaction: a tenant whose schema changed under a plan
        // under way runs nothing of it (`flotilla.check_tenant_schema`)
        push_tenant_check(out, cx);
    }
    if !cx.tenant.is_empty() {
        let _ = writeln!(out, "{scope} search_path TO {};", quote_ident(cx.tenant));
    }
}

/// The column a transactional step's journal row comes with (`SELECT <position> AS ...,
/// flotilla.record_step(...)`): the mark, in the results of a run's steps sent as one query,
/// that the step at that position is done. A name no migration's own rows carry.
pub(crate) const STEP_DONE: &str = "flotilla.step_done";

/// The verify check (if any) and the journal row: the step's proof that it is applied.
pub(crate) fn push_verify_and_journal(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) {
    push_verify(out, m);
    out.push_str("SELECT ");
    push_record_step(out, cx, m);
    out.push_str(";\n");
}

/// As [`push_verify_and_journal`], the journal row returning [`STEP_DONE`] = `position` and
/// the step's own time in seconds, by the server's clock (its row's start and finish): the
/// server sends a query's results when the whole query is done, not statement by statement,
/// so their arrival cannot time the steps.
pub(crate) fn push_verify_and_marked_journal(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    position: usize,
) {
    push_verify(out, m);
    let _ = write!(out, "SELECT {position} AS \"{STEP_DONE}\", ");
    push_record_step(out, cx, m);
    out.push_str(" AS step_seconds;\n");
}

/// The verify check, if the step has one.
fn push_verify(out: &mut String, m: &PreparedMigration) {
    if let Some(verify) = &m.migration.verify_sql {
        out.push_str(&verify_call(verify, &m.id_lit));
        out.push('\n');
    }
}

/// What comes before the verify query's parentheses in [`verify_call`].
pub(crate) const VERIFY_CALL_PREFIX: &str = "SELECT flotilla.check_verify(";

/// The statement that checks a step's verify query (`id_lit`: the step's quoted id), as
/// the step's SQL holds it: where a failure lies in its `(verify\n)`, the verify failed.
pub(crate) fn verify_call(verify: &str, id_lit: &str) -> String {
    format!("{VERIFY_CALL_PREFIX}({verify}\n), {id_lit});")
}

/// The call that writes the step's journal row and returns its seconds
/// (`flotilla.record_step`, whose INSERT keeps its plan across the steps' search_paths),
/// written into the step's query (no string of its own: this runs at every step).
fn push_record_step(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration) {
    let _ = write!(
        out,
        "flotilla.record_step({}, {}, {}, {}, {})",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit, cx.epoch
    );
}

/// Records in the caller's transaction that the first `done` up statements of the step are
/// done (`prev` were before): see `flotilla.advance_statements`.
pub(crate) fn push_advance_statements(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    prev: usize,
    done: usize,
) {
    let _ = writeln!(
        out,
        "SELECT flotilla.advance_statements({}, {}, {}, {}, {prev}, {done});",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit
    );
}

/// Before a rollback undoes anything of a non-transactional step: its checkpoint (written
/// here if it has none: the step was applied, its journal row says so) is marked undoing,
/// so that a rollback cut short leaves a mark a run heeds: the journal row is not taken as
/// the step applied, and the step does not go on from statements or batches undone in part.
/// Until a down statement is done (`undone`), the checkpoint takes this version's checksum:
/// `undone` counts the down statements of the version it names.
pub(crate) fn push_checkpoint_undoing(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) {
    let _ = writeln!(
        out,
        "INSERT INTO flotilla.checkpoints AS c (target, migration_id, checksum, plan_id, last_key, \
         rows, batches, statements, undoing, updated_at) \
         VALUES ({}, {}, {}, {}, NULL, 0, 0, 0, true, pg_catalog.clock_timestamp()) \
         ON CONFLICT (target, migration_id) DO UPDATE SET undoing = true, updated_at = EXCLUDED.updated_at, \
         checksum = CASE WHEN c.undone = 0 THEN EXCLUDED.checksum ELSE c.checksum END;",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit
    );
}

/// `SELECT flotilla.advance_undone(...)`: the first `done` down statements of a step a
/// rollback undoes are done (`prev` were before).
pub(crate) fn push_advance_undone(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    prev: usize,
    done: usize,
) {
    let _ = writeln!(
        out,
        "SELECT flotilla.advance_undone({}, {}, {}, {prev}, {done});",
        cx.tenant_lit, m.id_lit, m.checksum_lit
    );
}

/// A non-transactional step's checkpoint (its data change's batches, its up statements)
/// goes when its journal row is written or moved.
pub(crate) fn push_checkpoint_delete(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) {
    if !m.is_transactional() {
        let _ = writeln!(
            out,
            "DELETE FROM flotilla.checkpoints WHERE target = {} AND migration_id = {};",
            cx.tenant_lit, m.id_lit
        );
    }
}

/// Moves a step's journal row to the history: the undo's proof, in the undo's transaction.
pub(crate) fn push_journal_move(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration) {
    let _ = writeln!(
        out,
        "WITH d AS (DELETE FROM flotilla.journal WHERE target = {} AND migration_id = {} AND plan_id = {} RETURNING *) \
         INSERT INTO flotilla.journal_history (target, migration_id, checksum, plan_id, epoch, started_at, finished_at, \
         rolled_back_at, rolled_back_by_plan, rolled_back_epoch) \
         SELECT target, migration_id, checksum, plan_id, epoch, started_at, finished_at, pg_catalog.now(), {}, {} FROM d;",
        cx.tenant_lit, m.id_lit, cx.plan_lit, cx.plan_lit, cx.epoch
    );
}
