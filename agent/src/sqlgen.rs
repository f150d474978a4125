//! The SQL text the agent sends to a shard, assembled in one place so it can be read and
//! tested without a database. Everything variable in it is quoted here: identifiers with
//! `quote_ident`, values with `quote_literal`, numbers formatted from integers.
use std::fmt::Write;

use flotilla_proto::{Migration, TxMode};

pub(crate) use flotilla_proto::sql::quote_ident;

/// `flotilla_proto::sql::quote_literal`, with the reason as text (it names the value).
/// Safe because the agent's connections run with `standard_conforming_strings = on`.
pub(crate) fn quote_literal(value: &str) -> Result<String, String> {
    flotilla_proto::sql::quote_literal(value)
        .map_err(|e| format!("{:?}: {e}", value.escape_debug().to_string()))
}

/// A migration made ready to run: statements split and constant literals quoted once per
/// plan definition, not once per step.
#[derive(Debug)]
pub(crate) struct PreparedMigration {
    pub migration: Migration,
    pub up: Vec<String>,
    pub down: Vec<String>,
    pub id_lit: String,
    pub checksum_lit: String,
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

impl PreparedMigration {
    pub fn new(
        migration: Migration,
        default_lock_timeout_ms: u64,
        default_statement_timeout_ms: u64,
    ) -> Result<PreparedMigration, String> {
        let split = |sql: &str, what: &str| {
            flotilla_proto::sql::split_statements(sql)
                .map_err(|e| format!("migration `{}`: {what} SQL: {e}", migration.id))
        };
        let up = split(&migration.up_sql, "up")?;
        let down = split(&migration.down_sql, "down")?;
        let ms = |d: Option<std::time::Duration>, default: u64| {
            d.map_or(default, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            })
        };
        Ok(PreparedMigration {
            id_lit: quote_literal(migration.id.as_str())?,
            checksum_lit: quote_literal(&migration.checksum)?,
            lock_timeout_ms: ms(migration.lock_timeout, default_lock_timeout_ms),
            statement_timeout_ms: ms(migration.statement_timeout, default_statement_timeout_ms),
            up,
            down,
            migration,
        })
    }

    pub fn id(&self) -> &str {
        self.migration.id.as_str()
    }

    /// A data change that saves the old values of its columns, restored when it is undone.
    pub fn has_prior_image(&self) -> bool {
        self.migration
            .data
            .as_ref()
            .is_some_and(|d| !d.prior_image.is_empty())
    }

    pub fn is_transactional(&self) -> bool {
        self.migration.tx_mode == TxMode::Transactional
    }
}

/// Where and under which plan and epoch a step runs.
pub(crate) struct StepContext<'a> {
    /// `""` for the shard itself.
    pub tenant: &'a str,
    pub tenant_lit: &'a str,
    pub plan_lit: &'a str,
    pub epoch: u64,
}

/// Joins statements so that a trailing `-- comment` can never swallow the separator.
fn push_statements(out: &mut String, statements: &[String]) {
    for s in statements {
        out.push_str(s);
        out.push_str("\n;\n");
    }
}

/// Opens a step transaction and checks the fence in it.
pub(crate) fn begin_fenced(epoch: u64) -> String {
    format!("BEGIN;\nSELECT flotilla.check_fence({epoch});\n")
}

/// Checks the fence. It comes after the step's settings, so that its wait for the fence row
/// is bounded by the step's lock_timeout: a transaction of an older epoch holds the row until
/// it ends, and a prepared one until its plan's decision, however long that takes.
fn push_fence(out: &mut String, epoch: u64) {
    let _ = writeln!(out, "SELECT flotilla.check_fence({epoch});");
}

/// `SET [LOCAL] search_path/lock_timeout/statement_timeout` for one step.
fn push_settings(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration, local: bool) {
    let scope = if local { "SET LOCAL" } else { "SET" };
    if !cx.tenant.is_empty() {
        let _ = writeln!(out, "{scope} search_path TO {};", quote_ident(cx.tenant));
    }
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
}

/// The verify check (if any) and the journal row: the step's proof that it is applied.
fn push_verify_and_journal(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration) {
    if let Some(verify) = &m.migration.verify_sql {
        let _ = writeln!(
            out,
            "SELECT flotilla.check_verify(({verify}\n), {});",
            m.id_lit
        );
    }
    let _ = writeln!(
        out,
        "INSERT INTO flotilla.journal (target, migration_id, checksum, plan_id, epoch, started_at, finished_at) \
         VALUES ({}, {}, {}, {}, {}, pg_catalog.current_setting('flotilla.step_started')::timestamptz, pg_catalog.clock_timestamp());",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit, cx.epoch
    );
}

/// One transactional step, inside an open transaction: settings, up SQL, verify, journal.
pub(crate) fn transactional_step(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::with_capacity(512 + m.up.iter().map(String::len).sum::<usize>());
    push_settings(&mut out, cx, m, true);
    push_statements(&mut out, &m.up);
    push_verify_and_journal(&mut out, cx, m);
    out
}

/// The first transactional step of a transaction: `BEGIN`, its settings, the fence, then as
/// [`transactional_step`].
pub(crate) fn first_transactional_step(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::with_capacity(560 + m.up.iter().map(String::len).sum::<usize>());
    out.push_str("BEGIN;\n");
    push_settings(&mut out, cx, m, true);
    push_fence(&mut out, cx.epoch);
    push_statements(&mut out, &m.up);
    push_verify_and_journal(&mut out, cx, m);
    out
}

/// Before a non-transactional step's statements: session-level settings (which `RESET ALL`
/// clears afterwards), then the fence.
pub(crate) fn non_transactional_prologue(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::with_capacity(320);
    push_settings(&mut out, cx, m, false);
    push_fence(&mut out, cx.epoch);
    out
}

/// After a non-transactional step's statements: verify and journal in one short, fenced
/// transaction. For a data change, its checkpoint goes in the same transaction.
pub(crate) fn non_transactional_epilogue(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = begin_fenced(cx.epoch);
    push_verify_and_journal(&mut out, cx, m);
    push_checkpoint_delete(&mut out, cx, m);
    out.push_str("COMMIT;\n");
    out
}

/// A data change's checkpoint goes when its journal row is written or moved.
fn push_checkpoint_delete(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration) {
    if m.migration.data.is_some() {
        let _ = writeln!(
            out,
            "DELETE FROM flotilla.checkpoints WHERE target = {} AND migration_id = {};",
            cx.tenant_lit, m.id_lit
        );
    }
}

/// The bounds of one batch, as SQL: the checkpoint's text before (`NULL`: none yet) and after
/// it, and the key's exclusive lower and inclusive upper bounds (`$1`, `$2` of the batch SQL).
pub(crate) struct BatchBounds<'a> {
    pub prev_lit: &'a str,
    pub last_lit: &'a str,
    pub lower_lit: &'a str,
    pub upper_lit: &'a str,
    /// Rows in the batch.
    pub rows: i64,
    /// The batch's number on the target (1 = the first), which keys its prior image.
    pub number: i64,
}

/// One batch of a data change as one query: a short fenced transaction that moves the
/// checkpoint, saves the prior image of the batch's rows (when asked for), runs the batch SQL
/// with `$1`/`$2` bound, and commits. Checkpoint first: a concurrent copy of the same batch
/// waits on the checkpoint row, then fails instead of running it twice. The session already
/// holds the step's search_path and timeouts.
pub(crate) fn data_batch(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    b: &BatchBounds<'_>,
) -> Result<String, String> {
    let d = m
        .migration
        .data
        .as_ref()
        .ok_or_else(|| format!("migration `{}` is not a data change", m.id()))?;
    let mut out = if d.prior_image.is_empty() {
        begin_fenced(cx.epoch)
    } else {
        // one snapshot for the image and the change: a row changed by another session in
        // between would otherwise be saved stale (the batch retries a serialization failure)
        format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT flotilla.check_fence({});\n",
            cx.epoch
        )
    };
    let _ = writeln!(
        out,
        "SELECT flotilla.advance_checkpoint({}, {}, {}, {}, {}, {}, {});",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit, b.prev_lit, b.last_lit, b.rows
    );
    if !d.prior_image.is_empty() {
        // the rows the batch works on (the page's rows: its bounds and filter), as they are
        let pairs: Vec<String> = d
            .columns()
            .iter()
            .map(|c| {
                format!(
                    "{}, {}",
                    quote_literal(c).expect("an identifier"),
                    quote_ident(c)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "INSERT INTO flotilla.prior_images (target, migration_id, batch, image) \
             SELECT {}, {}, {}, pg_catalog.jsonb_build_object({}) FROM {} \
             WHERE {key} > {} AND {key} <= {}{};",
            cx.tenant_lit,
            m.id_lit,
            b.number,
            pairs.join(", "),
            d.table_sql(),
            b.lower_lit,
            b.upper_lit,
            data_filter(d),
            key = d.key_sql(),
        );
    }
    for statement in &d.batch {
        let bound = flotilla_proto::sql::bind_parameters(statement, &[b.lower_lit, b.upper_lit])
            .map_err(|e| format!("migration `{}`: batch SQL: {e}", m.id()))?;
        out.push_str(&bound);
        out.push_str("\n;\n");
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// Restores the prior image of one batch (`number`) of a data change and deletes it, in one
/// fenced transaction: each saved row's columns are written back where its key still is.
/// `types`: the SQL type (`format_type`) of each key and image column, by name, so that the
/// image is read back as exactly those columns (other columns of the table play no part).
pub(crate) fn prior_image_restore(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    number: i64,
    types: &[(String, String)],
) -> Result<String, String> {
    let d = m
        .migration
        .data
        .as_ref()
        .filter(|d| !d.prior_image.is_empty())
        .ok_or_else(|| format!("migration `{}` saves no prior image", m.id()))?;
    let mut columns = Vec::new();
    for c in &d.columns() {
        let (_, t) = types
            .iter()
            .find(|(n, _)| n == c)
            .ok_or_else(|| format!("table {} has no column {c} to restore", d.table_sql()))?;
        // `t` is the catalog's format_type: already valid (and quoted) SQL
        columns.push(format!("{} {t}", quote_ident(c)));
    }
    let set: Vec<String> = d
        .prior_image
        .iter()
        .map(|c| format!("{q} = r.{q}", q = quote_ident(c)))
        .collect();
    let on: Vec<String> = d
        .key
        .iter()
        .map(|c| format!("t.{q} = r.{q}", q = quote_ident(c)))
        .collect();
    let mut out = begin_fenced(cx.epoch);
    let _ = writeln!(
        out,
        "UPDATE {table} AS t SET {set} FROM (SELECT r.* FROM flotilla.prior_images p, \
         LATERAL pg_catalog.jsonb_to_record(p.image) AS r({columns}) \
         WHERE p.target = {} AND p.migration_id = {} AND p.batch = {number}) AS r WHERE {on};",
        cx.tenant_lit,
        m.id_lit,
        table = d.table_sql(),
        set = set.join(", "),
        columns = columns.join(", "),
        on = on.join(" AND "),
    );
    let _ = writeln!(
        out,
        "DELETE FROM flotilla.prior_images WHERE target = {} AND migration_id = {} AND batch = {number};",
        cx.tenant_lit, m.id_lit
    );
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// The next page of keys after `lower_lit`: how many rows (at most the batch size) and the
/// last key, as a checkpoint stores it (text; a JSON array of texts for a composite key).
/// Keyset pagination over the key's index; only the last key is turned into text. An empty
/// page is `(0, NULL)`.
pub(crate) fn data_page(m: &PreparedMigration, lower_lit: &str, limit: u32) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    let key = d.key_sql();
    let filter = data_filter(d);
    let table = d.table_sql();
    let cols = flotilla_proto::DataChange::column_list(&d.key);
    if d.key.len() == 1 {
        // the page's last key by the page's own order (no max(): uuid has none, and a
        // search_path could make it another type's). The text is named `last`: an output
        // column named `k` would make `ORDER BY k` sort the text ('9' after '10').
        return Some(format!(
            "WITH page AS MATERIALIZED (SELECT {key} AS k FROM {table} WHERE {key} > {lower_lit}{filter} \
             ORDER BY {cols} LIMIT {limit}) \
             SELECT (SELECT count(*) FROM page)::bigint, (SELECT k::text AS last FROM page ORDER BY k DESC LIMIT 1)"
        ));
    }
    let ks: Vec<String> = (1..=d.key.len()).map(|i| format!("k{i}")).collect();
    let select: Vec<String> = d
        .key
        .iter()
        .zip(&ks)
        .map(|(c, k)| format!("{} AS {k}", quote_ident(c)))
        .collect();
    let texts: Vec<String> = ks.iter().map(|k| format!("{k}::text")).collect();
    let order: Vec<String> = ks.iter().map(|k| format!("{k} DESC")).collect();
    // a row with a NULL in its key compares as unknown or, when an earlier column decides,
    // as greater: keep it out of every page, as a one-column key's NULL is
    let not_null: String = d
        .key
        .iter()
        .map(|c| format!(" AND {} IS NOT NULL", quote_ident(c)))
        .collect();
    Some(format!(
        "WITH page AS MATERIALIZED (SELECT {select} FROM {table} WHERE {key} > {lower_lit}{not_null}{filter} \
         ORDER BY {cols} LIMIT {limit}) \
         SELECT (SELECT count(*) FROM page)::bigint, \
         (SELECT pg_catalog.jsonb_build_array({texts})::text AS last FROM page ORDER BY {order} LIMIT 1)",
        select = select.join(", "),
        texts = texts.join(", "),
        order = order.join(", "),
    ))
}

/// ` AND (<filter>)` of a data change, or nothing (a newline ends a trailing comment).
fn data_filter(d: &flotilla_proto::DataChange) -> String {
    d.filter
        .as_ref()
        .map(|f| format!(" AND ({f}\n)"))
        .unwrap_or_default()
}

/// The planner's view of the rows still to do after `lower_lit` (EXPLAIN: its first line
/// carries `rows=N`), for the progress's estimated total.
pub(crate) fn data_estimate(m: &PreparedMigration, lower_lit: &str) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    Some(format!(
        "EXPLAIN SELECT 1 FROM {} WHERE {} > {lower_lit}{}",
        d.table_sql(),
        d.key_sql(),
        data_filter(d)
    ))
}

/// Moves a step's journal row to the history: the undo's proof, in the undo's transaction.
fn push_journal_move(out: &mut String, cx: &StepContext<'_>, m: &PreparedMigration) {
    let _ = writeln!(
        out,
        "WITH d AS (DELETE FROM flotilla.journal WHERE target = {} AND migration_id = {} AND plan_id = {} RETURNING *) \
         INSERT INTO flotilla.journal_history (target, migration_id, checksum, plan_id, epoch, started_at, finished_at, \
         rolled_back_at, rolled_back_by_plan, rolled_back_epoch) \
         SELECT target, migration_id, checksum, plan_id, epoch, started_at, finished_at, pg_catalog.now(), {}, {} FROM d;",
        cx.tenant_lit, m.id_lit, cx.plan_lit, cx.plan_lit, cx.epoch
    );
}

/// The whole undo of a transactional step, as one query ending in COMMIT.
pub(crate) fn transactional_undo(cx: &StepContext<'_>, m: &PreparedMigration) -> String {
    let mut out = String::from("BEGIN;\n");
    push_settings(&mut out, cx, m, true);
    push_fence(&mut out, cx.epoch);
    push_statements(&mut out, &m.down);
    push_journal_move(&mut out, cx, m);
    out.push_str("COMMIT;\n");
    out
}

/// After a non-transactional step's down statements: the journal row moves in its own
/// fenced transaction.
pub(crate) fn non_transactional_undo_epilogue(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> String {
    let mut out = begin_fenced(cx.epoch);
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
    use flotilla_proto::pb;

    fn migration(id: &str, up: &str, verify: &str) -> PreparedMigration {
        let m = Migration::try_from(pb::Migration {
            id: id.into(),
            up_sql: up.into(),
            down_sql: "DROP TABLE t".into(),
            verify_sql: verify.into(),
            lock_timeout_ms: 1500,
            ..Default::default()
        })
        .unwrap();
        PreparedMigration::new(m, 5000, 0).unwrap()
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("tenant_1"), "\"tenant_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert!(quote_literal("a\0b").is_err());
    }

    #[test]
    fn transactional_step_text() {
        let m = migration(
            "m1",
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1) -- one",
            "SELECT count(*) = 1 FROM t",
        );
        let cx = StepContext {
            tenant: "tenant_1",
            tenant_lit: "'tenant_1'",
            plan_lit: "'p1'",
            epoch: 7,
        };
        let sql = transactional_step(&cx, &m);
        assert!(
            sql.starts_with("SET LOCAL search_path TO \"tenant_1\";\n"),
            "{sql}"
        );
        assert!(
            sql.contains("SET LOCAL lock_timeout = '1500ms'; SET LOCAL statement_timeout = '0ms';")
        );
        assert!(
            sql.contains("CREATE TABLE t (id int)\n;\nINSERT INTO t VALUES (1)\n;\n"),
            "{sql}"
        );
        assert!(
            sql.contains("SELECT flotilla.check_verify((SELECT count(*) = 1 FROM t\n), 'm1');")
        );
        assert!(sql.contains(&format!(
            "VALUES ('tenant_1', 'm1', '{}', 'p1', 7, ",
            m.migration.checksum
        )));
        assert!(!sql.contains("BEGIN") && !sql.contains("COMMIT"));
        assert!(!sql.contains("check_fence"));
        assert_eq!(begin_fenced(7), "BEGIN;\nSELECT flotilla.check_fence(7);\n");
        // the first step opens the transaction and checks the fence under its lock_timeout
        let first = first_transactional_step(&cx, &m);
        assert!(
            first.starts_with("BEGIN;\nSET LOCAL search_path"),
            "{first}"
        );
        let (settings, rest) = first
            .split_once("SELECT flotilla.check_fence(7);\n")
            .unwrap();
        assert!(
            settings.contains("SET LOCAL lock_timeout = '1500ms'"),
            "{first}"
        );
        assert!(rest.starts_with("CREATE TABLE t (id int)\n;\n"), "{first}");
        // otherwise the same as a later step
        assert_eq!(
            first.replacen("SELECT flotilla.check_fence(7);\n", "", 1),
            format!("BEGIN;\n{sql}")
        );
    }

    #[test]
    fn shard_target_keeps_the_search_path() {
        let m = migration("m1", "CREATE TABLE t (id int)", "");
        let cx = StepContext {
            tenant: "",
            tenant_lit: "''",
            plan_lit: "'p1'",
            epoch: 1,
        };
        let sql = transactional_step(&cx, &m);
        assert!(!sql.contains("search_path"));
        assert!(!sql.contains("check_verify"));
    }

    #[test]
    fn non_transactional_pieces() {
        let m = migration("m2", "CREATE INDEX CONCURRENTLY i ON t (id)", "");
        let cx = StepContext {
            tenant: "t1",
            tenant_lit: "'t1'",
            plan_lit: "'p'",
            epoch: 3,
        };
        let pro = non_transactional_prologue(&cx, &m);
        assert!(
            pro.starts_with("SET search_path TO \"t1\";\nSET lock_timeout"),
            "{pro}"
        );
        assert!(pro.ends_with("SELECT flotilla.check_fence(3);\n"), "{pro}");
        assert!(pro.contains("clock_timestamp()::text, false)"));
        let epi = non_transactional_epilogue(&cx, &m);
        assert!(
            epi.starts_with(
                "BEGIN;\nSELECT flotilla.check_fence(3);\nINSERT INTO flotilla.journal"
            )
        );
        assert!(epi.ends_with("COMMIT;\n"));
    }

    #[test]
    fn undo_text() {
        let m = migration("m1", "CREATE TABLE t (id int)", "");
        let cx = StepContext {
            tenant: "t1",
            tenant_lit: "'t1'",
            plan_lit: "'p9'",
            epoch: 4,
        };
        let sql = transactional_undo(&cx, &m);
        assert!(
            sql.starts_with("BEGIN;\nSET LOCAL search_path TO \"t1\";"),
            "{sql}"
        );
        let (settings, rest) = sql.split_once("SELECT flotilla.check_fence(4);\n").unwrap();
        assert!(settings.contains("SET LOCAL lock_timeout"), "{sql}");
        assert!(rest.starts_with("DROP TABLE t\n;\n"), "{sql}");
        assert!(sql.contains("DROP TABLE t\n;\n"));
        assert!(sql.contains("DELETE FROM flotilla.journal WHERE target = 't1' AND migration_id = 'm1' AND plan_id = 'p9'"));
        assert!(
            sql.contains("pg_catalog.now(), 'p9', 4 FROM d;\nCOMMIT;\n"),
            "{sql}"
        );
        let epi = non_transactional_undo_epilogue(&cx, &m);
        assert!(epi.starts_with("BEGIN;\nSELECT flotilla.check_fence(4);\nWITH d AS"));
    }

    #[test]
    fn data_batch_text() {
        let m = Migration::try_from(pb::Migration {
            id: "m2".into(),
            down_sql: "SELECT 1".into(),
            verify_sql: "SELECT true".into(),
            data: Some(pb::DataChange {
                table: "app.customers".into(),
                key: "id".into(),
                batch_size: 7,
                rows_per_second: 0,
                batch_sql: "UPDATE customers SET n = n + 1 WHERE id > $1 AND id <= $2".into(),
                filter: "n = 0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let m = PreparedMigration::new(m, 5000, 0).unwrap();
        let cx = StepContext {
            tenant: "t1",
            tenant_lit: "'t1'",
            plan_lit: "'p9'",
            epoch: 4,
        };
        let bounds = BatchBounds {
            prev_lit: "NULL",
            last_lit: "'7'",
            lower_lit: "'-9223372036854775808'",
            upper_lit: "'7'",
            rows: 7,
            number: 1,
        };
        let sql = data_batch(&cx, &m, &bounds).unwrap();
        let ck = quote_literal(&m.migration.checksum).unwrap();
        assert_eq!(
            sql,
            format!(
                "BEGIN;\nSELECT flotilla.check_fence(4);\n\
                 SELECT flotilla.advance_checkpoint('t1', 'm2', {ck}, 'p9', NULL, '7', 7);\n\
                 UPDATE customers SET n = n + 1 WHERE id >  '-9223372036854775808'  AND id <=  '7' \n;\n\
                 COMMIT;\n"
            )
        );
        let page = data_page(&m, "'7'", 7).unwrap();
        assert_eq!(
            page,
            "WITH page AS MATERIALIZED (SELECT \"id\" AS k FROM \"app\".\"customers\" WHERE \"id\" > '7' \
             AND (n = 0\n) ORDER BY \"id\" LIMIT 7) SELECT (SELECT count(*) FROM page)::bigint, \
             (SELECT k::text AS last FROM page ORDER BY k DESC LIMIT 1)"
        );
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
    }

    #[test]
    fn composite_key_and_prior_image_text() {
        let m = Migration::try_from(pb::Migration {
            id: "m3".into(),
            data: Some(pb::DataChange {
                table: "contacts".into(),
                key: "region, id".into(),
                batch_size: 25,
                batch_sql:
                    "UPDATE contacts SET phone = '+' WHERE (region, id) > $1 AND (region, id) <= $2"
                        .into(),
                filter: "phone !~ '^[+]'".into(),
                prior_image: vec!["phone".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let m = PreparedMigration::new(m, 5000, 0).unwrap();
        assert!(m.has_prior_image());
        let page = data_page(&m, "ROW('a'::text, '1'::integer)", 25).unwrap();
        assert_eq!(
            page,
            "WITH page AS MATERIALIZED (SELECT \"region\" AS k1, \"id\" AS k2 FROM \"contacts\" \
             WHERE (\"region\", \"id\") > ROW('a'::text, '1'::integer) AND \"region\" IS NOT NULL \
             AND \"id\" IS NOT NULL AND (phone !~ '^[+]'\n) \
             ORDER BY \"region\", \"id\" LIMIT 25) SELECT (SELECT count(*) FROM page)::bigint, \
             (SELECT pg_catalog.jsonb_build_array(k1::text, k2::text)::text AS last FROM page ORDER BY k1 DESC, k2 DESC LIMIT 1)"
        );
        let cx = StepContext {
            tenant: "t1",
            tenant_lit: "'t1'",
            plan_lit: "'p'",
            epoch: 2,
        };
        let bounds = BatchBounds {
            prev_lit: "'[\"a\", \"1\"]'",
            last_lit: "'[\"b\", \"9\"]'",
            lower_lit: "ROW('a'::text, '1'::integer)",
            upper_lit: "ROW('b'::text, '9'::integer)",
            rows: 25,
            number: 4,
        };
        let sql = data_batch(&cx, &m, &bounds).unwrap();
        // checkpoint, then the prior image of the batch's rows, then the change
        let cp = sql.find("advance_checkpoint").unwrap();
        let image = sql.find("INSERT INTO flotilla.prior_images").unwrap();
        let change = sql.find("UPDATE contacts").unwrap();
        assert!(cp < image && image < change, "{sql}");
        assert!(
            sql.contains(
                "SELECT 't1', 'm3', 4, pg_catalog.jsonb_build_object('region', \"region\", 'id', \"id\", 'phone', \"phone\") \
                 FROM \"contacts\" WHERE (\"region\", \"id\") > ROW('a'::text, '1'::integer) \
                 AND (\"region\", \"id\") <= ROW('b'::text, '9'::integer) AND (phone !~ '^[+]'\n);"
            ),
            "{sql}"
        );
        let types = [
            ("region".to_string(), "text".to_string()),
            ("id".to_string(), "integer".to_string()),
            ("phone".to_string(), "character varying(20)".to_string()),
        ];
        assert!(prior_image_restore(&cx, &m, 4, &types[..2]).is_err());
        let restore = prior_image_restore(&cx, &m, 4, &types).unwrap();
        assert!(restore.starts_with("BEGIN;\nSELECT flotilla.check_fence(2);\nUPDATE \"contacts\" AS t SET \"phone\" = r.\"phone\""), "{restore}");
        assert!(
            restore.contains(
                "jsonb_to_record(p.image) AS r(\"region\" text, \"id\" integer, \"phone\" character varying(20))"
            ),
            "{restore}"
        );
        assert!(
            restore.contains("WHERE t.\"region\" = r.\"region\" AND t.\"id\" = r.\"id\";"),
            "{restore}"
        );
        assert!(restore.ends_with("AND batch = 4;\nCOMMIT;\n"), "{restore}");
        assert!(
            non_transactional_undo_epilogue(&cx, &m).contains("DELETE FROM flotilla.prior_images")
        );
        assert!(
            !non_transactional_epilogue(&cx, &m).contains("prior_images"),
            "kept once done"
        );
    }
}
