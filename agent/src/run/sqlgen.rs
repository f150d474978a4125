//! The SQL text of applying and undoing a step, per kind (transactional, or not), assembled
//! from the shared pieces in `step::sql` so it can be read and tested without a database.
use std::fmt::Write;

use crate::step::sql::{
    SESSION_RESET, begin_fenced, push_checkpoint_delete, push_checkpoint_undoing,
    push_journal_move, push_settings, push_statements, push_verify_and_journal,
    push_verify_and_marked_journal,
};
use crate::step::{PreparedMigration, StepContext};

/// The steps of one transaction, in one query: `BEGIN`, then each step's settings, up SQL,
/// verify and journal row, which returns `STEP_DONE` = the step's position in the
/// transaction; the fence once, in the first step's settings after its timeouts (so that its
/// wait is bounded by the step's lock_timeout) and before its search_path (see
/// `push_settings`); `COMMIT` at the end when `commit`.
pub(crate) fn transaction(
    cx: &StepContext<'_>,
    steps: &[&PreparedMigration],
    commit: bool,
) -> String {
    let len: usize = steps
        .iter()
        .map(|m| 560 + m.up.iter().map(String::len).sum::<usize>())
        .sum();
    let mut out = String::with_capacity(len + 16);
    out.push_str("BEGIN;\n");
    for (position, m) in steps.iter().enumerate() {
        push_settings(&mut out, cx, m, true, (position == 0).then_some(cx.epoch));
        push_statements(&mut out, &m.up);
        push_verify_and_marked_journal(&mut out, cx, m, position);
    }
    if commit {
        out.push_str("COMMIT;\n");
        out.push_str(SESSION_RESET);
    }
    out
}

/// Before a non-transactional step's statements: session-level settings (which `RESET ALL`
/// clears afterwards), the fence between the timeouts and the search_path.
pub(crate) fn non_transactional_prologue(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::with_capacity(320);
    push_settings(&mut out, cx, m, false, Some(cx.epoch));
    out
}

/// After a non-transactional step's statements: verify and journal in one short, fenced
/// transaction. For a data change, its checkpoint goes in the same transaction.
pub(crate) fn non_transactional_epilogue(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = begin_fenced(cx);
    push_verify_and_journal(&mut out, cx, m);
    push_checkpoint_delete(&mut out, cx, m);
    out.push_str("COMMIT;\n");
    out
}

/// The whole undo of a transactional step, as one query ending in COMMIT.
pub(crate) fn transactional_undo(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::from("BEGIN;\n");
    push_settings(&mut out, cx, m, true, Some(cx.epoch));
    push_statements(&mut out, &m.down);
    push_journal_move(&mut out, cx, m);
    out.push_str("COMMIT;\n");
    out.push_str(SESSION_RESET);
    out
}

/// Before a non-transactional step's undo: its checkpoint, if any, marked undoing, in a
/// fenced transaction of its own.
pub(crate) fn non_transactional_undo_prologue(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> String {
    let mut out = begin_fenced(cx);
    push_checkpoint_undoing(&mut out, cx, m);
    out.push_str("COMMIT;\n");
    out
}

/// After a non-transactional step's down statements: the journal row moves in its own
/// fenced transaction.
pub(crate) fn non_transactional_undo_epilogue(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> String {
    let mut out = begin_fenced(cx);
    push_journal_move(&mut out, cx, m);
    push_checkpoint_delete(&mut out, cx, m);
    if m.has_prior_image() {
        // restored by now; what is left (nothing, unless the table lost rows) goes with it
        let _ = writeln!(
            out,
            "DELETE FROM flotilla.prior_images WHERE target = {} AND migration_id = {};",
            cx.tenant_lit, m.id_lit
        );
    }
    out.push_str("COMMIT;\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{backfill, context, migration, with_prior_image};

    #[test]
    fn transaction_text() {
        let m = migration(
            "m1",
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1) -- one",
            "SELECT count(*) = 1 FROM t",
        );
        let m2 = migration("m2", "ALTER TABLE t ADD COLUMN n int", "");
        let cx = context("tenant_1", "p1", 7);
        let sql = transaction(&cx, &[&m, &m2], true);
        // the first step opens the transaction and checks the fence under its lock_timeout,
        // before the tenant's search_path (the fence's cached plans keep)
        let mark = " AS step_seconds;\n";
        let (first, second) = sql.split_once(mark).unwrap();
        assert!(
            first.starts_with(
                "BEGIN;\nSET LOCAL lock_timeout = '1500ms'; SET LOCAL statement_timeout = '0ms';\n"
            ),
            "{sql}"
        );
        let (settings, rest) = first
            .split_once("SELECT flotilla.check_fence(7);\n")
            .unwrap();
        assert!(!settings.contains("search_path"), "{sql}");
        // then the tenant's schema is the one its journal rows were written in
        assert!(
            rest.starts_with(
                "SELECT flotilla.check_tenant_schema('tenant_1');\n\
                 SET LOCAL search_path TO \"tenant_1\";\n\
                 CREATE TABLE t (id int)\n;\nINSERT INTO t VALUES (1)\n;\n"
            ),
            "{sql}"
        );
        assert!(
            rest.contains("SELECT flotilla.check_verify((SELECT count(*) = 1 FROM t\n), 'm1');")
        );
        // each journal row marks its step done, by its position, with its time by the server
        assert!(
            rest.ends_with(&format!(
                "SELECT 0 AS \"flotilla.step_done\", \
                 flotilla.record_step('tenant_1', 'm1', '{}', 'p1', 7)",
                m.migration.checksum
            )),
            "{sql}"
        );
        // a later step: its own settings, no fence, no verify when it has none
        assert!(second.starts_with("SET LOCAL lock_timeout"), "{sql}");
        assert!(
            second.contains("SET LOCAL search_path TO \"tenant_1\";\nALTER TABLE"),
            "{sql}"
        );
        assert!(
            !second.contains("check_fence")
                && !second.contains("check_verify")
                && !second.contains("check_tenant_schema")
        );
        assert!(second.contains("ALTER TABLE t ADD COLUMN n int\n;\n"));
        assert!(
            second.ends_with(&format!(
                "SELECT 1 AS \"flotilla.step_done\", \
                 flotilla.record_step('tenant_1', 'm2', '{}', 'p1', 7){mark}COMMIT;\n\
                 {SESSION_RESET}",
                m2.migration.checksum
            )),
            "{sql}"
        );
        assert_eq!(sql.matches("BEGIN").count(), 1);
        // a run to prepare ends without COMMIT: its PREPARE TRANSACTION goes on its own
        let open = transaction(&cx, &[&m, &m2], false);
        assert_eq!(format!("{open}COMMIT;\n{SESSION_RESET}"), sql);
        assert_eq!(
            begin_fenced(&cx),
            "BEGIN;\nSELECT flotilla.check_fence(7);\n\
             SELECT flotilla.check_tenant_schema('tenant_1');\n"
        );
        assert_eq!(
            begin_fenced(&context("", "p1", 7)),
            "BEGIN;\nSELECT flotilla.check_fence(7);\n"
        );
    }

    #[test]
    fn shard_target_keeps_the_search_path() {
        let m = migration("m1", "CREATE TABLE t (id int)", "");
        let cx = context("", "p1", 1);
        let sql = transaction(&cx, &[&m], true);
        assert!(!sql.contains("search_path"));
        assert!(!sql.contains("check_verify"));
        assert!(!sql.contains("check_tenant_schema"));
    }

    #[test]
    fn non_transactional_pieces() {
        let m = migration("m2", "CREATE INDEX CONCURRENTLY i ON t (id)", "");
        let cx = context("t1", "p", 3);
        let pro = non_transactional_prologue(&cx, &m);
        assert!(pro.starts_with("SET lock_timeout"), "{pro}");
        assert!(
            pro.ends_with(
                "SELECT flotilla.check_fence(3);\nSELECT flotilla.check_tenant_schema('t1');\n\
                 SET search_path TO \"t1\";\n"
            ),
            "{pro}"
        );
        assert!(pro.contains("clock_timestamp()::text, false)"));
        let epi = non_transactional_epilogue(&cx, &m);
        assert!(epi.starts_with(
            "BEGIN;\nSELECT flotilla.check_fence(3);\nSELECT flotilla.check_tenant_schema('t1');\n\
             SELECT flotilla.record_step('t1', 'm2', "
        ));
        assert!(epi.ends_with("COMMIT;\n"));
    }

    #[test]
    fn undo_text() {
        let m = migration("m1", "CREATE TABLE t (id int)", "");
        let cx = context("t1", "p9", 4);
        let sql = transactional_undo(&cx, &m);
        assert!(sql.starts_with("BEGIN;\nSET LOCAL lock_timeout"), "{sql}");
        let (settings, rest) = sql.split_once("SELECT flotilla.check_fence(4);\n").unwrap();
        assert!(!settings.contains("search_path"), "{sql}");
        assert!(
            rest.starts_with(
                "SELECT flotilla.check_tenant_schema('t1');\n\
                 SET LOCAL search_path TO \"t1\";\nDROP TABLE t\n;\n"
            ),
            "{sql}"
        );
        assert!(sql.contains("DROP TABLE t\n;\n"));
        assert!(sql.contains("DELETE FROM flotilla.journal WHERE target = 't1' AND migration_id = 'm1' AND plan_id = 'p9'"));
        assert!(
            sql.contains("pg_catalog.now(), 'p9', 4 FROM d;\nCOMMIT;\n"),
            "{sql}"
        );
        let epi = non_transactional_undo_epilogue(&cx, &m);
        assert!(epi.starts_with(
            "BEGIN;\nSELECT flotilla.check_fence(4);\nSELECT flotilla.check_tenant_schema('t1');\n\
             WITH d AS"
        ));
    }

    #[test]
    fn data_change_epilogues() {
        let cx = context("t1", "p9", 4);
        let m = backfill();
        // the end: verify, journal row and checkpoint delete in one transaction
        let epi = non_transactional_epilogue(&cx, &m);
        assert!(epi.contains("flotilla.check_verify"), "{epi}");
        assert!(
            epi.ends_with(
                "DELETE FROM flotilla.checkpoints WHERE target = 't1' AND migration_id = 'm2';\nCOMMIT;\n"
            ),
            "{epi}"
        );
        assert!(
            non_transactional_undo_epilogue(&cx, &m).contains("DELETE FROM flotilla.checkpoints")
        );
        let m = with_prior_image();
        assert!(
            non_transactional_undo_epilogue(&cx, &m).contains("DELETE FROM flotilla.prior_images")
        );
        assert!(
            !non_transactional_epilogue(&cx, &m).contains("prior_images"),
            "kept once done"
        );
    }
}
