//! The lock table: each case is a statement and the locks PostgreSQL documents for it.

use super::LockMode::*;
use super::*;
use crate::pb;

fn one(sql: &str) -> StatementInfo {
    let mut all = analyze(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(all.len(), 1, "{sql}");
    all.remove(0)
}

fn locks(sql: &str) -> Vec<(String, LockMode)> {
    one(sql)
        .locks
        .into_iter()
        .map(|l| (l.relation, l.mode))
        .collect()
}

fn lock(relation: &str, mode: LockMode) -> (String, LockMode) {
    (relation.to_string(), mode)
}

/// A statement, its kind, and its locks.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, LockMode)]);

#[test]
fn lock_levels_follow_postgres_documentation() {
    let cases: &[Case] = &[
        (
            "ALTER TABLE t ADD COLUMN c int",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE app.t DROP COLUMN c",
            "ALTER TABLE",
            &[("app.t", AccessExclusive)],
        ),
        (
            "ALTER TABLE t ALTER COLUMN c TYPE bigint",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE t ALTER COLUMN c SET NOT NULL",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE t ALTER COLUMN c SET STATISTICS 500",
            "ALTER TABLE",
            &[("t", ShareUpdateExclusive)],
        ),
        (
            "ALTER TABLE t VALIDATE CONSTRAINT c_check",
            "ALTER TABLE",
            &[("t", ShareUpdateExclusive)],
        ),
        (
            "ALTER TABLE t SET (fillfactor = 70)",
            "ALTER TABLE",
            &[("t", ShareUpdateExclusive)],
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT c CHECK (c > 0) NOT VALID",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (cid) REFERENCES app.customers (id)",
            "ALTER TABLE",
            &[
                ("orders", ShareRowExclusive),
                ("app.customers", ShareRowExclusive),
            ],
        ),
        (
            "ALTER TABLE orders ADD COLUMN cid int REFERENCES customers (id)",
            "ALTER TABLE",
            &[
                ("orders", AccessExclusive),
                ("customers", ShareRowExclusive),
            ],
        ),
        (
            // Several actions: the strongest lock on the table.
            "ALTER TABLE t ALTER COLUMN c SET STATISTICS 100, ADD COLUMN d int",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE t DISABLE TRIGGER trg",
            "ALTER TABLE",
            &[("t", ShareRowExclusive)],
        ),
        (
            "ALTER TABLE p ATTACH PARTITION p1 FOR VALUES FROM (1) TO (10)",
            "ALTER TABLE",
            &[("p", ShareUpdateExclusive), ("p1", AccessExclusive)],
        ),
        (
            "ALTER TABLE t RENAME TO u",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER TABLE t RENAME COLUMN a TO b",
            "ALTER TABLE",
            &[("t", AccessExclusive)],
        ),
        (
            "ALTER INDEX i RENAME TO j",
            "ALTER INDEX",
            &[("i", ShareUpdateExclusive)],
        ),
        ("CREATE INDEX i ON t (c)", "CREATE INDEX", &[("t", Share)]),
        (
            "CREATE UNIQUE INDEX i ON app.t (c)",
            "CREATE INDEX",
            &[("app.t", Share)],
        ),
        (
            "CREATE INDEX CONCURRENTLY i ON t (c)",
            "CREATE INDEX CONCURRENTLY",
            &[("t", ShareUpdateExclusive)],
        ),
        ("DROP INDEX i", "DROP INDEX", &[("i", AccessExclusive)]),
        (
            "DROP INDEX CONCURRENTLY app.i",
            "DROP INDEX CONCURRENTLY",
            &[("app.i", ShareUpdateExclusive)],
        ),
        (
            "DROP TABLE a, app.b",
            "DROP TABLE",
            &[("a", AccessExclusive), ("app.b", AccessExclusive)],
        ),
        ("DROP SCHEMA s CASCADE", "DROP SCHEMA", &[]),
        (
            "DROP TRIGGER trg ON app.t",
            "DROP TRIGGER",
            &[("app.t", AccessExclusive)],
        ),
        ("TRUNCATE t", "TRUNCATE", &[("t", AccessExclusive)]),
        (
            "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            "CREATE TRIGGER",
            &[("t", ShareRowExclusive)],
        ),
        (
            "CREATE TABLE o (id int, cid int REFERENCES c (id))",
            "CREATE TABLE",
            &[("o", AccessExclusive), ("c", ShareRowExclusive)],
        ),
        (
            "INSERT INTO t (a) VALUES (1)",
            "INSERT",
            &[("t", RowExclusive)],
        ),
        (
            "INSERT INTO t SELECT * FROM s JOIN app.u USING (id)",
            "INSERT",
            &[
                ("t", RowExclusive),
                ("s", AccessShare),
                ("app.u", AccessShare),
            ],
        ),
        (
            "UPDATE t SET a = 1 FROM s WHERE s.id = t.id",
            "UPDATE",
            &[("t", RowExclusive), ("s", AccessShare)],
        ),
        (
            "DELETE FROM t WHERE id IN (SELECT id FROM s)",
            "DELETE",
            &[("t", RowExclusive), ("s", AccessShare)],
        ),
        (
            "WITH x AS (SELECT 1) SELECT * FROM x, t",
            "SELECT",
            &[("t", AccessShare)],
        ),
        ("SELECT * FROM t FOR UPDATE", "SELECT", &[("t", RowShare)]),
        ("LOCK TABLE t IN SHARE MODE", "LOCK TABLE", &[("t", Share)]),
        ("LOCK t", "LOCK TABLE", &[("t", AccessExclusive)]),
        ("VACUUM t", "VACUUM", &[("t", ShareUpdateExclusive)]),
        ("VACUUM FULL t", "VACUUM FULL", &[("t", AccessExclusive)]),
        ("ANALYZE t", "ANALYZE", &[("t", ShareUpdateExclusive)]),
        ("REINDEX TABLE t", "REINDEX", &[("t", Share)]),
        (
            "REINDEX TABLE CONCURRENTLY t",
            "REINDEX CONCURRENTLY",
            &[("t", ShareUpdateExclusive)],
        ),
        (
            "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
            "REFRESH MATERIALIZED VIEW CONCURRENTLY",
            &[("mv", Exclusive)],
        ),
        ("CLUSTER t USING i", "CLUSTER", &[("t", AccessExclusive)]),
        (
            "COMMENT ON COLUMN app.t.c IS 'x'",
            "COMMENT",
            &[("app.t", ShareUpdateExclusive)],
        ),
        (
            "CREATE EXTENSION IF NOT EXISTS pgcrypto",
            "CREATE EXTENSION",
            &[],
        ),
        ("CREATE SCHEMA s", "CREATE SCHEMA", &[]),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE FUNCTION",
            &[],
        ),
    ];
    for (sql, kind, expected) in cases {
        let info = one(sql);
        assert_eq!(info.kind, *kind, "{sql}");
        let expected: Vec<_> = expected.iter().map(|(r, m)| lock(r, *m)).collect();
        assert_eq!(locks(sql), expected, "{sql}");
    }
}

#[test]
fn lines_and_text_skip_leading_comments() {
    let sql = "-- header\nCREATE TABLE a (id int);\n\n/* block\n comment */\n  ALTER TABLE a\n    ADD COLUMN b int;\n-- trailing only\n";
    let all = analyze(sql).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[0].line, all[0].text.as_str()),
        (2, "CREATE TABLE a (id int)")
    );
    assert_eq!(all[1].line, 6);
    assert_eq!(all[1].text, "ALTER TABLE a\n    ADD COLUMN b int");
}

#[test]
fn parse_errors_name_the_statement_line() {
    let sql =
        "CREATE TABLE a (id int);\n\n-- typo below\nALTER TABEL a ADD COLUMN b int;\nSELECT 1;\n";
    let err = analyze(sql).unwrap_err();
    assert_eq!(err.line, 4, "{err}");
    assert!(err.message.contains("syntax error"), "{err}");
    assert!(err.to_string().starts_with("line 4: "), "{err}");

    let err = analyze("SELECT 1;\nSELECT 'open\n").unwrap_err();
    assert_eq!(err.line, 2, "{err}");
}

#[test]
fn empty_and_comment_only_files_have_no_statements() {
    assert!(analyze("").unwrap().is_empty());
    assert!(analyze("-- nothing\n/* here */\n").unwrap().is_empty());
}

#[test]
fn lock_modes_display_as_postgres_names_them() {
    assert_eq!(AccessExclusive.to_string(), "ACCESS EXCLUSIVE");
    assert_eq!(ShareUpdateExclusive.to_string(), "SHARE UPDATE EXCLUSIVE");
    assert!(AccessExclusive > Share && Share > ShareUpdateExclusive);
    assert_eq!(
        serde_json::to_string(&RowExclusive).unwrap(),
        "\"ROW EXCLUSIVE\""
    );
}

// --- The rules on plans built in code: what the fixture directory cannot show. ---

fn migration(id: &str, up: &str, down: &str) -> pb::Migration {
    pb::Migration {
        id: id.into(),
        up_sql: up.into(),
        down_sql: down.into(),
        ..Default::default()
    }
}

fn plan(migrations: Vec<pb::Migration>, atomic: bool) -> crate::PlanSpec {
    crate::PlanSpec::try_from(pb::PlanSpec {
        name: "lint".into(),
        migrations,
        atomic,
        ..Default::default()
    })
    .expect("valid plan")
}

fn rules_of(findings: &[Finding]) -> Vec<(&str, Severity, u32)> {
    findings
        .iter()
        .map(|f| (f.rule.as_str(), f.severity, f.line))
        .collect()
}

#[test]
fn concurrently_in_an_atomic_unit_is_said() {
    let ms = || {
        vec![
            migration(
                "001_a",
                "ALTER TABLE orders ADD COLUMN note text",
                "ALTER TABLE orders DROP COLUMN note",
            ),
            migration(
                "002_idx",
                "-- alone in its migration\nCREATE INDEX CONCURRENTLY idx_orders_note ON orders (note)",
                "DROP INDEX CONCURRENTLY idx_orders_note",
            ),
        ]
    };
    let atomic = lint_plan(&plan(ms(), true), &LintOptions::default());
    assert_eq!(
        rules_of(&atomic),
        vec![(CONCURRENTLY_IN_TRANSACTION, Severity::Warning, 2)],
        "{atomic:#?}"
    );
    assert_eq!(atomic[0].migration, "002_idx");
    // Alone in its migration, outside an atomic unit: nothing to say.
    assert!(lint_plan(&plan(ms(), false), &LintOptions::default()).is_empty());
}

#[test]
fn index_rule_uses_table_sizes_when_given() {
    let p = plan(
        vec![pb::Migration {
            // (a shard's: `app.big` is no other tenant's table)
            scope: pb::Scope::Shard as i32,
            ..migration(
                "001_idx",
                "CREATE INDEX idx_a ON app.big (x);\nCREATE INDEX idx_b ON small (x);\nCREATE INDEX idx_c ON unmeasured (x);",
                "DROP INDEX idx_c; DROP INDEX idx_b; DROP INDEX app.idx_a;",
            )
        }],
        false,
    );
    // Without sizes: a warning for every existing table.
    let plain = lint_plan(&p, &LintOptions::default());
    assert_eq!(
        rules_of(&plain),
        vec![
            (INDEX_NOT_CONCURRENT, Severity::Warning, 1),
            (INDEX_NOT_CONCURRENT, Severity::Warning, 2),
            (INDEX_NOT_CONCURRENT, Severity::Warning, 3),
        ]
    );
    let sizes = [
        ("app.big".to_string(), 5u64 << 30),
        ("small".to_string(), 8 << 10),
    ];
    let options = LintOptions {
        table_bytes: Some(sizes.into_iter().collect()),
        ..LintOptions::default()
    };
    let sized = lint_plan(&p, &options);
    assert_eq!(
        rules_of(&sized),
        vec![
            (INDEX_NOT_CONCURRENT, Severity::Error, 1),
            (INDEX_NOT_CONCURRENT, Severity::Warning, 3),
        ],
        "{sized:#?}"
    );
    assert!(
        sized[0].message.contains("5120 MiB"),
        "{}",
        sized[0].message
    );
}

#[test]
fn ignores_travel_on_the_wire_and_need_a_known_rule_and_a_reason() {
    let mut m = migration("001_idx", "CREATE INDEX i ON t (x)", "DROP INDEX i");
    m.lint_ignore = vec![pb::LintIgnore {
        rule: INDEX_NOT_CONCURRENT.into(),
        reason: "t is tiny".into(),
    }];
    let p = plan(vec![m.clone()], false);
    assert!(lint_plan(&p, &LintOptions::default()).is_empty());
    // And back to the wire unchanged.
    let back = pb::Migration::from(&p.migrations[0]);
    assert_eq!(back.lint_ignore, m.lint_ignore);

    for (rule, reason, says) in [
        (
            "index-not-concurent",
            "t is tiny",
            "unknown rule `index-not-concurent`",
        ),
        (INDEX_NOT_CONCURRENT, "  ", "without a reason"),
    ] {
        let mut bad = m.clone();
        bad.lint_ignore[0] = pb::LintIgnore {
            rule: rule.into(),
            reason: reason.into(),
        };
        let err = crate::PlanSpec::try_from(pb::PlanSpec {
            name: "lint".into(),
            migrations: vec![bad],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(says) && err.contains("001_idx"), "{err}");
    }
}

#[test]
fn parse_errors_cannot_be_ignored_and_stop_the_other_rules() {
    let mut m = migration(
        "001_bad",
        "DROP TABLE t;\nALTER TABEL t ADD COLUMN c int",
        "CREATE TABLE t (id int)",
    );
    m.lint_ignore = vec![pb::LintIgnore {
        rule: PARSE_ERROR.into(),
        reason: "try".into(),
    }];
    let findings = lint_plan(&plan(vec![m], false), &LintOptions::default());
    assert_eq!(rules_of(&findings), vec![(PARSE_ERROR, Severity::Error, 2)]);
}

#[test]
fn risk_high_allows_drops_and_drops_of_new_tables_are_not_destructive() {
    let mut m = migration(
        "001_drop",
        "DROP TABLE old;\nCREATE TABLE tmp (id int);\nDROP TABLE tmp;",
        "CREATE TABLE old (id int)",
    );
    let low = lint_plan(&plan(vec![m.clone()], false), &LintOptions::default());
    assert_eq!(rules_of(&low), vec![(DESTRUCTIVE_DROP, Severity::Error, 1)]);
    m.risk = "high".into();
    assert!(lint_plan(&plan(vec![m], false), &LintOptions::default()).is_empty());
}

#[test]
fn down_covers_what_up_creates_through_tables_and_schemas() {
    let m = pb::Migration {
        scope: pb::Scope::Shard as i32,
        ..migration(
            "001_schema",
            "CREATE SCHEMA reports;\nCREATE TABLE reports.daily (id int);\nCREATE INDEX idx_daily ON reports.daily (id);\nCREATE TABLE extra (id int);\nALTER TABLE extra ADD COLUMN n int;\nCREATE VIEW v AS SELECT 1;\nCREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';",
            "DROP VIEW v;\nDROP TABLE IF EXISTS public.extra;\nDROP SCHEMA reports CASCADE;",
        )
    };
    let findings = lint_plan(&plan(vec![m], false), &LintOptions::default());
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn the_splitter_agrees_with_postgres_parser_on_statement_boundaries() {
    // The agent runs what the splitter cuts (psql's rules); the lint reads what the
    // parser parses: on SQL that quotes, nests and comments, both must see the same statements.
    let sql = r#"
-- a comment; with a semicolon
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN NEW.updated_at := now(); RETURN NEW; END;
$body$;
CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql
BEGIN ATOMIC
  SELECT a + b;
END;
CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO log VALUES (1); INSERT INTO log VALUES (2));
INSERT INTO t (s) VALUES ('it''s; fine'), (E'back\'slash;'), ($$dollar; quoted$$);
/* block /* nested; */ comment */ SELECT ";odd;name" FROM t;
DO $$ BEGIN PERFORM 1; END $$
"#;
    let split = crate::sql::split_statements(sql).unwrap();
    let parsed = analyze(sql).unwrap();
    assert_eq!(parsed.len(), split.len(), "{split:#?}\n{parsed:#?}");
    for (s, p) in split.iter().zip(&parsed) {
        // The splitter keeps a statement's leading comments; the parser's text starts at
        // its first token.
        assert!(
            s.ends_with(&p.text),
            "splitter: {s:?}\nparser: {:?}",
            p.text
        );
    }
    let kinds: Vec<&str> = parsed.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "CREATE FUNCTION",
            "CREATE FUNCTION",
            "CREATE RULE",
            "INSERT",
            "SELECT",
            "DO"
        ]
    );
}

#[test]
fn a_dropped_column_takes_its_indexes_and_constraints_with_it() {
    let m = migration(
        "001_cols",
        "ALTER TABLE orders ADD COLUMN c int, ADD COLUMN d int, ADD CONSTRAINT c_positive CHECK (c > 0 AND d IS NOT NULL);\n\
         ALTER TABLE orders ADD CONSTRAINT orders_d_fk FOREIGN KEY (d) REFERENCES t (id) NOT VALID;\n\
         CREATE INDEX CONCURRENTLY idx_orders_lower_c ON orders (lower(c::text)) WHERE d > 0;",
        "ALTER TABLE orders DROP COLUMN d, DROP COLUMN c;",
    );
    let findings = lint_plan(&plan(vec![m], false), &LintOptions::default());
    let down: Vec<_> = findings
        .iter()
        .filter(|f| f.rule == DOWN_INCOMPLETE)
        .collect();
    assert!(down.is_empty(), "{down:#?}");

    // A column the index is not on does not take it.
    let m = migration(
        "001_cols",
        "ALTER TABLE orders ADD COLUMN c int;\nCREATE INDEX CONCURRENTLY idx_orders_e ON orders (e);",
        "ALTER TABLE orders DROP COLUMN c;",
    );
    let findings = lint_plan(&plan(vec![m], false), &LintOptions::default());
    let down: Vec<_> = findings
        .iter()
        .filter(|f| f.rule == DOWN_INCOMPLETE)
        .map(|f| (f.line, f.message.as_str()))
        .collect();
    assert_eq!(
        down,
        [(
            2,
            "creates index idx_orders_e, which down.sql does not drop"
        )]
    );
}

/// A data change's batch and filter are SQL too: one that does not parse is a parse error
/// of migration.toml, named by its key (it failed only at the first batch).
#[test]
fn a_data_changes_batch_and_filter_are_parsed() {
    let data = |batch: &str, filter: &str| pb::Migration {
        data: Some(pb::DataChange {
            table: "customers".into(),
            key: "id".into(),
            batch_sql: batch.into(),
            filter: filter.into(),
            ..Default::default()
        }),
        ..migration("001_fill", "", "UPDATE customers SET n = 0")
    };
    let good = "UPDATE customers SET n = n + 1 WHERE id > $1 AND id <= $2";
    let found = lint_plan(
        &plan(vec![data(good, "n IS NULL")], false),
        &LintOptions::default(),
    );
    assert!(found.iter().all(|f| f.rule != PARSE_ERROR), "{found:#?}");
    let bad = "UPDATE customers SET n = n + 1 WHERE id > $1 AND id <= $2 AND (";
    let found = lint_plan(&plan(vec![data(bad, "")], false), &LintOptions::default());
    assert!(
        found.iter().any(|f| f.rule == PARSE_ERROR
            && f.file == "migration.toml"
            && f.message.starts_with("[data] batch: syntax error")),
        "{found:#?}"
    );
    let found = lint_plan(
        &plan(vec![data(good, "n IS NUL")], false),
        &LintOptions::default(),
    );
    assert!(
        found
            .iter()
            .any(|f| f.rule == PARSE_ERROR && f.message.starts_with("[data] filter: ")),
        "{found:#?}"
    );
}

/// down.sql that drops what up.sql did not create would drop, at a rollback, what the fleet had
/// before the migration (a warning); what up.sql created (or what holds it, or what PostgreSQL named for
/// it, or an `OR REPLACE` object) is not flagged, nor anything when up.sql hides what it
/// creates in a DO block, nor a migration that says the loss is meant.
#[test]
fn a_down_that_drops_what_up_did_not_create_is_warned_of() {
    let found = |m: pb::Migration| -> Vec<(u32, String)> {
        lint_plan(&plan(vec![m], false), &LintOptions::default())
            .into_iter()
            .filter(|f| f.rule == DOWN_DROPS_EXISTING)
            .map(|f| (f.line, f.message))
            .collect()
    };
    assert_eq!(
        found(migration(
            "001_col",
            "ALTER TABLE orders ADD COLUMN c int;",
            "ALTER TABLE orders DROP COLUMN c, DROP COLUMN d;\nDROP TABLE orders;\nDROP INDEX IF EXISTS idx_orders_old;",
        )),
        [
            (
                1,
                "drops column orders.d, which up.sql does not create: a rollback would drop something that existed before the migration".to_string()
            ),
            (
                2,
                "drops table orders, which up.sql does not create: a rollback would drop something that existed before the migration".to_string()
            ),
            (
                3,
                "drops index idx_orders_old, which up.sql does not create: a rollback would drop something that existed before the migration".to_string()
            ),
        ]
    );
    for (up, down) in [
        // what up created, and what it holds
        (
            "CREATE TABLE t (id int);\nCREATE INDEX idx_t ON t (id);\nCREATE SCHEMA s;\nCREATE TABLE s.x (id int);",
            "DROP INDEX idx_t;\nALTER TABLE t DROP COLUMN id;\nDROP TABLE t;\nDROP TABLE s.x;\nDROP SCHEMA s;",
        ),
        // a serial column's sequence
        (
            "ALTER TABLE orders ADD COLUMN n serial;",
            "ALTER TABLE orders DROP COLUMN n;\nDROP SEQUENCE IF EXISTS orders_n_seq;",
        ),
        // names PostgreSQL gave
        (
            "ALTER TABLE orders ADD PRIMARY KEY (id);\nCREATE INDEX ON orders (total);",
            "ALTER TABLE orders DROP CONSTRAINT orders_pkey;\nDROP INDEX orders_total_idx;",
        ),
        // OR REPLACE
        (
            "CREATE OR REPLACE VIEW v AS SELECT 1;\nCREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';",
            "DROP VIEW v;\nDROP FUNCTION f();",
        ),
        // hidden in a DO block
        (
            "DO $$ BEGIN EXECUTE 'CREATE TABLE t2 (id int)'; END $$;",
            "DROP TABLE t2;",
        ),
        // a table built under another name and swapped in
        (
            "CREATE TABLE orders_new (id int);\nALTER TABLE orders RENAME TO orders_old;\nALTER TABLE orders_new RENAME TO orders;",
            "DROP TABLE orders;\nALTER TABLE orders_old RENAME TO orders;",
        ),
        // the enum recipe: down renames the type away, makes it again, drops the old one
        (
            "ALTER TYPE order_status ADD VALUE 'refunded';",
            "ALTER TYPE order_status RENAME TO order_status_old;\nCREATE TYPE order_status AS ENUM ('new', 'paid');\nALTER TABLE orders ALTER COLUMN status TYPE order_status USING status::text::order_status;\nDROP TYPE order_status_old;",
        ),
        // a table up.sql created, emptied
        ("CREATE TABLE t3 (id int);", "TRUNCATE t3;\nDROP TABLE t3;"),
        // down's own scratch table
        (
            "ALTER TABLE orders ADD COLUMN c int;",
            "CREATE TABLE keep_c AS SELECT id, c FROM orders;\nALTER TABLE orders DROP COLUMN c;\nDROP TABLE keep_c;",
        ),
        // a foreign table, a range type, a base type and its shell
        (
            "CREATE FOREIGN TABLE remote_orders (id int) SERVER billing;\nCREATE TYPE price_range AS RANGE (subtype = numeric);\nCREATE TYPE money2;\nCREATE TYPE money2 (INPUT = money2_in, OUTPUT = money2_out);",
            "DROP FOREIGN TABLE remote_orders;\nDROP TYPE price_range;\nDROP TYPE money2 CASCADE;",
        ),
        // tables named by the remote server
        (
            "IMPORT FOREIGN SCHEMA billing LIMIT TO (invoices) FROM SERVER billing INTO public;",
            "DROP FOREIGN TABLE invoices;",
        ),
    ] {
        assert!(
            found(migration("001_x", up, down)).is_empty(),
            "{up} / {down}"
        );
    }
    // a column up.sql only renamed is what existed before; a NOT NULL column names nothing;
    // a function called in up.sql may create what it does not name
    assert_eq!(
        found(migration(
            "001_x",
            "ALTER TABLE users RENAME COLUMN name TO full_name;\nALTER TABLE orders ADD COLUMN c int NOT NULL DEFAULT 0;",
            "ALTER TABLE users DROP COLUMN full_name;\nDROP INDEX orders_customer_id_idx;\nALTER TABLE orders DROP COLUMN c;",
        ))
        .len(),
        2
    );
    assert_eq!(
        found(migration("001_t", "ALTER TABLE orders ADD COLUMN c int;", "ALTER TABLE orders DROP COLUMN c;\nTRUNCATE orders;")),
        [(2, "truncates table orders, which up.sql does not create: a rollback would empty something that existed before the migration".to_string())]
    );
    assert_eq!(
        found(migration(
            "001_ext",
            "CREATE EXTENSION IF NOT EXISTS pg_trgm;\nALTER TABLE orders ADD COLUMN email citext;",
            "ALTER TABLE orders DROP COLUMN email;\nDROP EXTENSION IF EXISTS pg_trgm;\nDROP EXTENSION citext CASCADE;",
        )),
        [(3, "drops extension citext, which up.sql does not create: a rollback would drop something that existed before the migration".to_string())]
    );
    assert!(
        found(migration(
            "001_geo",
            "SELECT AddGeometryColumn('places', 'geom', 4326, 'POINT', 2);",
            "ALTER TABLE places DROP COLUMN geom;",
        ))
        .is_empty()
    );
    // named without the schema up.sql gave it: in a tenant's search_path, the tenant's own
    let elsewhere = migration(
        "001_audit",
        "CREATE TABLE audit.events (id int);\nCREATE INDEX events_id ON audit.events (id);",
        "DROP INDEX events_id;\nDROP TABLE events;",
    );
    assert_eq!(
        found(elsewhere.clone()),
        [
            (1, "drops index events_id without its schema, but up.sql creates index audit.events_id: run in a tenant's search_path, a rollback would drop the tenant's own and leave that one".to_string()),
            (2, "drops table events without its schema, but up.sql creates table audit.events: run in a tenant's search_path, a rollback would drop the tenant's own and leave that one".to_string()),
        ]
    );
    // a step of the shard itself runs in the server's search_path: not said
    let shard = pb::Migration {
        scope: pb::Scope::Shard as i32,
        ..elsewhere
    };
    assert!(found(shard).is_empty());
    let meant = pb::Migration {
        destructive: true,
        ..migration(
            "001_x",
            "ALTER TABLE orders ADD COLUMN c int;",
            "DROP TABLE orders;",
        )
    };
    assert!(found(meant).is_empty());
}

#[test]
fn a_unit_split_across_its_prepared_transaction_is_an_error() {
    let non_tx = |m: pb::Migration| pb::Migration {
        tx_mode: pb::TxMode::NonTransactional as i32,
        ..m
    };
    let after = |m: pb::Migration, deps: &[&str]| pb::Migration {
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..m
    };
    let ms = || {
        vec![
            migration(
                "001_table",
                "CREATE TABLE notes (id int)",
                "DROP TABLE notes",
            ),
            after(
                non_tx(migration(
                    "002_idx",
                    "CREATE INDEX CONCURRENTLY notes_id ON notes (id)",
                    "DROP INDEX CONCURRENTLY notes_id",
                )),
                &["001_table"],
            ),
            after(
                migration(
                    "003_view",
                    "CREATE VIEW notes_v AS SELECT id FROM notes",
                    "DROP VIEW notes_v",
                ),
                &["001_table", "002_idx"],
            ),
        ]
    };
    let split: Vec<(String, String)> = lint_plan(&plan(ms(), true), &LintOptions::default())
        .into_iter()
        .filter(|f| f.rule == ATOMIC_UNIT_SPLIT)
        .map(|f| (f.migration, f.message))
        .collect();
    assert_eq!(split.len(), 2, "{split:#?}");
    assert_eq!(split[0].0, "002_idx");
    assert!(
        split[0].1.contains("`001_table`") && split[0].1.contains("cannot run in a transaction"),
        "{split:#?}"
    );
    assert_eq!(split[1].0, "003_view");
    assert!(
        split[1].1.contains("also waits for `002_idx`"),
        "{split:#?}"
    );
    // A migration with a selector of its own may have no step where the other has one:
    // left to the submit, which sees the fleet (an error here would refuse it there too).
    let mut selected = ms();
    selected[1].selector = "tier=b".into();
    selected[2].depends_on = vec!["001_table".into()];
    assert!(
        !lint_plan(&plan(selected, true), &LintOptions::default())
            .iter()
            .any(|f| f.rule == ATOMIC_UNIT_SPLIT)
    );
    // Not atomic: each step commits on its own, and the next sees it.
    assert!(
        !lint_plan(&plan(ms(), false), &LintOptions::default())
            .iter()
            .any(|f| f.rule == ATOMIC_UNIT_SPLIT)
    );
}

/// A non-transactional migration of several statements whose down.sql does not pair with
/// its up.sql: a step left part-way is undone by the whole down.sql. Paired (a `SELECT 1`
/// for the VACUUM), or transactional, or one statement: nothing to say.
#[test]
fn an_unpaired_down_of_a_non_transactional_migration_is_said() {
    let up = "ALTER TABLE orders ADD COLUMN bar int;\nVACUUM orders;\nALTER TABLE orders ADD COLUMN foo int";
    let unpaired = lint_plan(
        &plan(
            vec![migration(
                "001_cols",
                up,
                "ALTER TABLE orders DROP COLUMN foo;\nALTER TABLE orders DROP COLUMN bar",
            )],
            false,
        ),
        &LintOptions::default(),
    );
    let said: Vec<&Finding> = unpaired
        .iter()
        .filter(|f| f.rule == DOWN_UNPAIRED)
        .collect();
    assert_eq!(said.len(), 1, "{unpaired:#?}");
    assert_eq!(said[0].severity, Severity::Warning);
    assert!(
        said[0].message.starts_with("3 up statements, 2 down"),
        "{said:?}"
    );
    let paired = lint_plan(
        &plan(
            vec![migration(
                "001_cols",
                up,
                "ALTER TABLE orders DROP COLUMN foo;\nSELECT 1;\nALTER TABLE orders DROP COLUMN bar",
            )],
            false,
        ),
        &LintOptions::default(),
    );
    assert!(
        paired.iter().all(|f| f.rule != DOWN_UNPAIRED),
        "{paired:#?}"
    );
    let transactional = lint_plan(
        &plan(
            vec![migration(
                "001_cols",
                "ALTER TABLE orders ADD COLUMN bar int;\nALTER TABLE orders ADD COLUMN foo int",
                "ALTER TABLE orders DROP COLUMN foo, DROP COLUMN bar",
            )],
            false,
        ),
        &LintOptions::default(),
    );
    assert!(
        transactional.iter().all(|f| f.rule != DOWN_UNPAIRED),
        "{transactional:#?}"
    );
}

/// A tenant's migration acting outside the tenant's schema: an error on tenants, a warning
/// where the scope depends on the fleet (auto), nothing on shards; what is only read or
/// referred to in another schema, and temporary tables, are fine.
#[test]
fn a_tenant_migration_outside_its_schema_is_said() {
    let up = "CREATE TABLE notes (id int, kind public.citext, ev int REFERENCES public.events);\n\
              INSERT INTO notes SELECT id, 'x', id FROM public.events;\n\
              CREATE TEMP TABLE scratch (id int);\n\
              CREATE TABLE public.events_archive (id int);\n\
              CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE sql AS 'SELECT NULL';\n\
              CREATE INDEX idx_ev ON public.events (id);\n\
              SELECT pg_catalog.set_config('search_path', '', false);\n\
              SET LOCAL search_path = public;\n\
              CREATE EXTENSION IF NOT EXISTS pgcrypto;\n\
              CREATE SCHEMA reporting;\n\
              ALTER TYPE public.mood ADD VALUE 'meh';\n\
              DROP TRIGGER IF EXISTS touch_notes ON notes;\n\
              DROP POLICY IF EXISTS own_rows ON public.events;\n\
              ALTER TABLE notes SET SCHEMA public;\n\
              COMMENT ON TABLE notes IS 'not set_config(''search_path'', x) here';";
    let down = "DROP TABLE notes; DROP TABLE public.events_archive; DROP FUNCTION public.touch(); \
                DROP INDEX public.idx_ev; DROP SCHEMA reporting;";
    let lint = |scope: Option<pb::Scope>| {
        let mut m = migration("001_a", up, down);
        m.scope = scope.map_or(pb::Scope::Unspecified as i32, |s| s as i32);
        let mut m = vec![m];
        m[0].lint_ignore = [
            "destructive-drop",
            "down-drops-existing",
            "index-not-concurrent",
        ]
        .into_iter()
        .map(|r| pb::LintIgnore {
            rule: r.into(),
            reason: "not this test's".into(),
        })
        .collect();
        lint_plan(&plan(m, false), &LintOptions::default())
            .into_iter()
            .filter(|f| f.rule == TENANT_ESCAPE)
            .collect::<Vec<_>>()
    };
    let (tenant, down): (Vec<_>, Vec<_>) = lint(Some(pb::Scope::Tenant))
        .into_iter()
        .partition(|f| f.file == "up.sql");
    // down.sql's drops of public.events_archive, public.touch, public.idx_ev and the schema
    assert_eq!(down.len(), 4, "{down:#?}");
    assert_eq!(
        tenant.iter().map(|f| f.line).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8, 9, 10, 11, 13, 14],
        "{tenant:#?}"
    );
    assert!(tenant.iter().all(|f| f.severity == Severity::Error));
    assert!(
        tenant[0].message.contains("public.events_archive"),
        "{tenant:#?}"
    );
    assert!(tenant[5].message.contains("pgcrypto") && tenant[5].hint.contains("WITH SCHEMA"));
    let auto = lint(None);
    assert_eq!(auto.len(), tenant.len() + down.len(), "{auto:#?}");
    assert!(
        auto.iter()
            .all(|f| f.severity == Severity::Warning && f.message.contains("scope auto"))
    );
    assert!(lint(Some(pb::Scope::Shard)).is_empty());
}

/// A partitioned table's partitions, made `PARTITION OF` it or attached to it, go with it
/// (and their constraints): a down.sql dropping the parent undoes them. Before, each
/// partition and its constraint was a `down-incomplete` error, refusing a right migration.
#[test]
fn partitions_go_with_their_partitioned_table() {
    let up = "CREATE TABLE events (id bigint, at date NOT NULL) PARTITION BY RANGE (at);\n\
              CREATE TABLE events_2026_01 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');\n\
              CREATE TABLE events_2026_02 (id bigint, at date NOT NULL, CONSTRAINT events_2026_02_range CHECK (at >= '2026-02-01' AND at < '2026-03-01'));\n\
              ALTER TABLE events ATTACH PARTITION events_2026_02 FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');";
    let whole = lint_plan(
        &plan(
            vec![migration("001_events", up, "DROP TABLE events;")],
            false,
        ),
        &LintOptions::default(),
    );
    assert!(whole.is_empty(), "{whole:#?}");
    // dropping a partition alone leaves the parent and the other partition made
    let part = lint_plan(
        &plan(
            vec![migration("001_events", up, "DROP TABLE events_2026_01;")],
            false,
        ),
        &LintOptions::default(),
    );
    assert_eq!(
        rules_of(&part),
        vec![
            (DOWN_INCOMPLETE, Severity::Error, 1),
            (DOWN_INCOMPLETE, Severity::Error, 3),
        ],
        "{part:#?}"
    );
}

/// The walk-through's misses: writes to a shared table (a warning: a tenant's own row in one
/// is fine), policies, privileges, comments and ownership of shared objects and schemas,
/// database-wide statements, `SELECT ... INTO public.x`, and all of it in down.sql too (a
/// tenant's rollback dropped a shared table for the whole shard). Unqualified ones, and a
/// search_path that keeps the tenant's schema first, are fine.
#[test]
fn a_tenant_migration_writing_or_granting_outside_its_schema_is_said() {
    let up = "INSERT INTO public.countries VALUES ('IT', 'Italy');\n\
              CREATE POLICY p ON public.countries USING (true);\n\
              GRANT USAGE ON SCHEMA public TO reporting;\n\
              GRANT SELECT ON ALL TABLES IN SCHEMA public TO reporting;\n\
              COMMENT ON TABLE public.countries IS 'shared';\n\
              CREATE PUBLICATION pub FOR TABLE customers;\n\
              SELECT * INTO public.copied FROM customers;\n\
              TRUNCATE public.audit_template;\n\
              SELECT set_config('search_path', current_schema() || ', public', true);\n\
              COMMENT ON COLUMN customers.note IS 'tenant''s';\n\
              GRANT SELECT ON customers TO reporting;\n\
              INSERT INTO customers SELECT * FROM public.seed_customers;";
    let down =
        "DELETE FROM public.countries WHERE code = 'IT';\nDROP TABLE IF EXISTS public.plans;";
    let mut m = migration("001_a", up, down);
    m.scope = pb::Scope::Tenant as i32;
    m.lint_ignore = [
        "destructive-drop",
        "down-drops-existing",
        "down-incomplete",
        "unbatched-data-change",
        "delete-not-undone",
    ]
    .into_iter()
    .map(|r| pb::LintIgnore {
        rule: r.into(),
        reason: "not this test's".into(),
    })
    .collect();
    let found: Vec<(String, Severity, u32)> =
        lint_plan(&plan(vec![m], false), &LintOptions::default())
            .into_iter()
            .filter(|f| f.rule == TENANT_ESCAPE)
            .map(|f| (f.file, f.severity, f.line))
            .collect();
    let up_at = |line, severity| ("up.sql".to_string(), severity, line);
    assert_eq!(
        found,
        [
            up_at(1, Severity::Warning),
            up_at(2, Severity::Error),
            up_at(3, Severity::Error),
            up_at(4, Severity::Error),
            up_at(5, Severity::Error),
            up_at(6, Severity::Error),
            up_at(7, Severity::Error),
            up_at(8, Severity::Warning),
            ("down.sql".to_string(), Severity::Warning, 1),
            ("down.sql".to_string(), Severity::Error, 2),
        ],
        "{found:#?}"
    );
}

/// The walk-through's `down-incomplete` false positives: an idempotent re-create (`DROP
/// TRIGGER IF EXISTS t ON x; CREATE TRIGGER t ...`), a sequence `OWNED BY` a table down.sql
/// drops, a trigger whose function down.sql drops CASCADE, and temporary objects
/// (`pg_temp.x`, `CREATE TEMP VIEW`) need no drop of their own in down.sql.
#[test]
fn remade_owned_and_temporary_objects_need_no_drop_in_down() {
    let up = "DROP TRIGGER IF EXISTS orders_touch ON orders;\n\
              CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION public.touch();\n\
              DROP FUNCTION IF EXISTS tenant_name();\n\
              CREATE FUNCTION tenant_name() RETURNS text LANGUAGE sql AS 'SELECT current_schema()';\n\
              CREATE TABLE credit_notes (id bigint);\n\
              CREATE SEQUENCE credit_notes_id_seq OWNED BY credit_notes.id;\n\
              CREATE TABLE pg_temp.scratch (id int);\n\
              CREATE TEMP VIEW tv AS SELECT 1;\n\
              CREATE FUNCTION wo_guard() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';\n\
              CREATE TRIGGER wo_guard BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION wo_guard();";
    let m = pb::Migration {
        scope: pb::Scope::Shard as i32,
        ..migration(
            "001_a",
            up,
            "DROP TABLE credit_notes;\nDROP FUNCTION wo_guard() CASCADE;",
        )
    };
    let found: Vec<Finding> = lint_plan(&plan(vec![m], false), &LintOptions::default())
        .into_iter()
        .filter(|f| f.rule == DOWN_INCOMPLETE)
        .collect();
    assert!(found.is_empty(), "{found:#?}");
    // a sequence owned by nothing down.sql drops is still asked for
    let m = pb::Migration {
        scope: pb::Scope::Shard as i32,
        ..migration(
            "001_a",
            "CREATE TABLE a (id int);\nCREATE SEQUENCE a_seq OWNED BY a.id;",
            "SELECT 1;",
        )
    };
    let found = lint_plan(&plan(vec![m], false), &LintOptions::default());
    assert_eq!(
        rules_of(&found),
        vec![
            (DOWN_INCOMPLETE, Severity::Error, 1),
            (DOWN_INCOMPLETE, Severity::Error, 2)
        ],
        "{found:#?}"
    );
}

/// search_path set however `set_config` and its setting's name are written: dollar-quoted,
/// escape strings (`E'search\\_path'`, octal), Unicode escapes, a constant continued on the
/// next line, schema-qualified or quoted names, a comment before the parenthesis, computed
/// (what it names may be it), inside another statement (`WHERE`, `VALUES`, a CTE,
/// `PREPARE`), `public` ahead of the tenant's schema, any `UPDATE pg_settings`, `RESET ALL`,
/// `DISCARD ALL`. Before, only the text `'search_path'` was looked for: `set_config(
/// $$search_path$$, $$public$$, true)` went through, and the plan's table landed in `public`
/// once for the whole shard. Another setting (by name, or computed so that it cannot be
/// search_path), another schema's `set_config`, a mention in a string, and the ways of
/// keeping the tenant's schema first (`current_schema() || ...`, `quote_ident(...)`,
/// `format(...)`, `pg_catalog.current_schema()`, a comment between the arguments) are fine.
#[test]
fn search_path_set_in_any_spelling_is_said() {
    let flagged = [
        "SELECT set_config($$search_path$$, $$public$$, true);",
        "SELECT pg_catalog.set_config(E'SEARCH_PATH', 'public', false);",
        "SELECT set_config('search_' || 'path', 'public', true);",
        "INSERT INTO notes SELECT 1 WHERE set_config($x$search_path$x$, 'public', true) IS NOT NULL;",
        "UPDATE pg_settings SET setting = 'public' WHERE name = 'search_path';",
        "SELECT * FROM (VALUES (set_config('search_path', 'public', true))) v;",
        "WITH x AS (UPDATE pg_settings SET setting = 'public' WHERE name = 'search_path' RETURNING 1) SELECT * FROM x;",
        "SELECT set_config('search_path', 'public, ' || current_schema(), true); -- current_schema",
        "RESET ALL;",
        "DISCARD ALL;",
        "PREPARE sp AS SELECT set_config('search_path', 'public', true);",
        "UPDATE pg_settings SET setting = '5s' WHERE name LIKE 'search%';",
        "SELECT set_config /* x */ ('search_path', 'public', true);",
        "SELECT \"set_config\"('search_path', 'public', true);",
        "SELECT \"pg_catalog\".set_config('search_path', 'public', true);",
        "SELECT set_config(E'search\\_path', 'public', true);",
        "SELECT set_config(E'search\\137path', 'public', true);",
        "SELECT set_config(U&'search\\005Fpath', 'public', true);",
        "SELECT set_config('search_'\n'path', 'public', true);",
    ];
    let fine = [
        "SELECT set_config('statement_timeout', '5s', true);",
        "SELECT 'set_config($$search_path$$, x)';",
        "SELECT set_config($$search_path$$, current_schema() || ', public', true);",
        "SELECT set_config('search_path', quote_ident(current_schema()) || ', public', true);",
        "SELECT set_config('search_path', format('%I, public', current_schema()), true);",
        "SELECT set_config('search_path', pg_catalog.current_schema() || ', public', true);",
        "SELECT set_config('search_path', -- the tenant first\n current_schema() || ', public', true);",
        "SELECT set_config('app.' || 'tenant', 'x', true);",
        "SELECT myschema.set_config('search_path', 'public', true);",
    ];
    let up = flagged
        .iter()
        .chain(&fine)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("\n")
        + "\nCREATE TABLE notes (id int);";
    let mut m = migration("001_a", &up, "DROP TABLE notes;");
    m.scope = pb::Scope::Tenant as i32;
    let found: Vec<u32> = lint_plan(&plan(vec![m], false), &LintOptions::default())
        .into_iter()
        .filter(|f| f.rule == TENANT_ESCAPE && f.severity == Severity::Error)
        .map(|f| f.line)
        .collect();
    // each flagged statement on its line (the split constant's spans two: its first counts)
    let mut expected = Vec::new();
    let mut line = 1;
    for s in &flagged {
        expected.push(line);
        line += 1 + s.matches('\n').count() as u32;
    }
    assert_eq!(found, expected, "{found:?}");
}

/// A type, a domain or an extension dropped with CASCADE (their columns go), and a type
/// change `USING` a constant (`USING NULL` emptied the column), are destructive; a type
/// change that reads the column (however: arrays, CASE, subscripts, COLLATE), a view's or a
/// function's CASCADE (the usual way to change one) and a DROP without CASCADE are not.
#[test]
fn cascades_and_using_expressions_that_replace_values_are_destructive() {
    let up = "DROP DOMAIN d CASCADE;\n\
              DROP TYPE mood CASCADE;\n\
              ALTER TABLE t ALTER COLUMN v TYPE int USING NULL;\n\
              ALTER TABLE t ALTER COLUMN w TYPE int USING '0'::int;\n\
              ALTER TABLE t ALTER COLUMN a TYPE int USING a::int;\n\
              ALTER TABLE t ALTER COLUMN b TYPE int USING trim(b)::int;\n\
              ALTER TABLE t ALTER COLUMN c TYPE int USING CASE WHEN c = '' THEN NULL ELSE c::int END;\n\
              ALTER TABLE t ALTER COLUMN e TYPE bigint;\n\
              DROP FUNCTION f();\n\
              ALTER TABLE t ALTER COLUMN g TYPE text[] USING ARRAY[g];\n\
              ALTER TABLE t ALTER COLUMN h TYPE bool USING CASE h WHEN 'y' THEN true ELSE false END;\n\
              ALTER TABLE t ALTER COLUMN i TYPE int USING (string_to_array(i, '-'))[1]::int;\n\
              DROP VIEW IF EXISTS v CASCADE;\n\
              DROP FUNCTION IF EXISTS f2(int) CASCADE;";
    let mut m = migration("001_a", up, "SELECT 1;");
    m.lint_ignore = ["down-incomplete", "table-rewrite", "down-drops-existing"]
        .into_iter()
        .map(|r| pb::LintIgnore {
            rule: r.into(),
            reason: "not this test's".into(),
        })
        .collect();
    let found: Vec<u32> = lint_plan(&plan(vec![m], false), &LintOptions::default())
        .into_iter()
        .filter(|f| f.rule == DESTRUCTIVE_DROP)
        .map(|f| f.line)
        .collect();
    assert_eq!(found, [1, 2, 3, 4], "{found:?}");
}
