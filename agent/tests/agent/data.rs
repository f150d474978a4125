//! Data changes written wrong, or over names only quotes can spell: what the preflight says
//! of their SQL before anything runs, what a step's failure says of the part that failed,
//! and a backfill (and its undo) over a mixed-case table and key.

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::coordinator_message::Body as In;

/// A data change over tenant_0000.work_orders as written in `dir/migration.toml`: `filter`
/// and batch SQL `batch` (`$1`/`$2` the key's bounds).
fn work_orders_change(id: &str, filter: &str, batch: &str) -> pb::Migration {
    pb::Migration {
        source: format!("migrations/{id}"),
        data: Some(pb::DataChange {
            table: "work_orders".into(),
            key: "id".into(),
            batch_size: 5,
            batch_sql: batch.into(),
            filter: filter.into(),
            ..Default::default()
        }),
        ..migration(id, "", "", "")
    }
}

/// The work_orders rows of tenant_0000 the changes here would mark `done`.
async fn done(pool: &sqlx::PgPool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'done'",
    )
    .await
}

const MARK_DONE: &str = "UPDATE work_orders SET priority = 'done' WHERE id > $1 AND id <= $2";

/// A filter, or a batch SQL, naming a column the table does not have: the step fails
/// saying which part failed, naming the data change and its file, with PostgreSQL's
/// message, and no row changed. Before, the step said only `column "..." does not exist`
/// (a filter's and a batch's alike), naming neither the part nor the file.
#[tokio::test]
async fn a_failed_filter_or_batch_sql_says_which_part_and_where() {
    let Some(f) = fleet("data_part_failed", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pf".into(),
        migrations: vec![
            work_orders_change("bad_filter", "priorty = 'low'", MARK_DONE),
            work_orders_change(
                "bad_batch",
                "priority = 'low'",
                "UPDATE work_orders SET priorty = 'done' WHERE id > $1 AND id <= $2",
            ),
            // planned fine; fails at run time on a later page, whose query runs in the
            // first batch's transaction (it was named the batch SQL's alone)
            work_orders_change(
                "late_filter",
                "CASE WHEN id > 8 THEN priority::int > 0 ELSE true END",
                MARK_DONE,
            ),
        ],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "pf",
            1,
            1,
            vec![
                run(1, "tenant_0000", &["bad_filter"], false),
                run(2, "tenant_0000", &["bad_batch"], false),
                run(3, "tenant_0000", &["late_filter"], false),
            ],
        )
        .await;
    for (run, sqlstate, message) in [
        (
            1,
            "42703",
            "data migration `bad_filter` (migrations/bad_filter/migration.toml): \
             its filter failed: column \"priorty\" does not exist",
        ),
        (
            2,
            "42703",
            "data migration `bad_batch` (migrations/bad_batch/migration.toml): \
             its batch SQL failed: column \"priorty\" of relation \"work_orders\" does not exist",
        ),
        (
            3,
            "22P02",
            "data migration `late_filter` (migrations/late_filter/migration.toml): \
             its batch SQL or its filter (the next page's, in the batch's transaction) failed: \
             invalid input syntax for type integer: \"low\"",
        ),
    ] {
        assert_eq!(
            outcomes(&r[&run]),
            [pb::StepOutcome::Failed],
            "{:?}",
            r[&run]
        );
        let e = r[&run].steps[0].error.as_ref().unwrap();
        assert!(e.message.starts_with(message), "{e:?}");
        assert_eq!(e.sqlstate, sqlstate, "PostgreSQL's own code: {e:?}");
    }
    assert_eq!(done(&pool).await, 0, "no row changed");
    h.stop().await;
    f.drop().await;
}

/// Sends a preflight asking for `migrations`' checks and returns its data problems on
/// tenant_0000 (the shard itself has no work_orders: its problem is the missing table).
async fn preflight_problems(
    s: &mut Stream,
    migrations: Vec<pb::Migration>,
) -> Vec<pb::DataProblem> {
    s.send(In::Preflight(pb::PreflightRequest {
        request_id: 45,
        migration_ids: migrations.iter().map(|m| m.id.clone()).collect(),
        data_migrations: migrations,
        ..Default::default()
    }));
    loop {
        if let Out::Preflight(p) = s.next().await {
            assert_eq!(p.request_id, 45);
            let mut found: Vec<pb::DataProblem> = p
                .data_problems
                .into_iter()
                .filter(|p| p.tenant == "tenant_0000")
                .collect();
            found.sort_by(|a, b| a.migration_id.cmp(&b.migration_id));
            return found;
        }
    }
}

/// The preflight plans each data change's filter and batch SQL on the target (EXPLAIN in
/// a read-only transaction rolled back) and names the part PostgreSQL refuses, with its
/// message and the missing name (the coordinator lets a name an earlier migration mentions
/// through); a change written right has no problem, and nothing changed. Before, only the
/// table and key were looked at: a typo'd filter was first seen by the change's first
/// batch, after the plan's earlier migrations had applied everywhere.
#[tokio::test]
async fn the_preflight_plans_a_changes_filter_and_batch_sql() {
    let Some(f) = fleet("data_preflight_sql", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    let problems = preflight_problems(
        &mut s,
        vec![
            work_orders_change("a_bad_filter", "priorty = 'low'", MARK_DONE),
            work_orders_change(
                "b_bad_batch",
                "",
                "UPDATE work_orders SET priority = normalise(priority) WHERE id > $1 AND id <= $2",
            ),
            work_orders_change("c_typed_wrong", "total_amount", MARK_DONE),
            work_orders_change("d_right", "priority = 'low'", MARK_DONE),
        ],
    )
    .await;
    let seen: Vec<(&str, &str, &str, &str)> = problems
        .iter()
        .map(|p| {
            (
                p.migration_id.as_str(),
                p.kind.as_str(),
                p.name.as_str(),
                p.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "a_bad_filter",
                "statement",
                "priorty",
                "its filter is refused by PostgreSQL: column \"priorty\" does not exist \
                 (planned with EXPLAIN on the target, nothing run)"
            ),
            (
                "b_bad_batch",
                "statement",
                "normalise",
                "its batch SQL is refused by PostgreSQL: function normalise(text) does not exist \
                 (planned with EXPLAIN on the target, nothing run)"
            ),
            (
                "c_typed_wrong",
                "statement",
                "work_orders",
                "its filter is refused by PostgreSQL: argument of AND must be type boolean, \
                 not type numeric (planned with EXPLAIN on the target, nothing run)"
            ),
        ],
        "{problems:?}"
    );
    assert_eq!(done(&pool).await, 0, "nothing ran");
    h.stop().await;
    f.drop().await;
}

/// A table, key and prior-image column that only quotes can spell (`"Orders"`,
/// `"OrderId"`, `"Status"`), written as PostgreSQL would: the preflight finds them, the
/// backfill walks the table in batches and is done, and its undo puts the old values back.
/// Before, a quoted name was refused (`must be a column name`), and an unquoted one
/// folded to lower case, which named another table.
#[tokio::test]
async fn a_mixed_case_table_and_key_are_backfilled_and_undone() {
    let Some(f) = fleet("data_mixed_case", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.\"Orders\" (\"OrderId\" bigint PRIMARY KEY, \"Status\" text NOT NULL); \
         INSERT INTO tenant_0000.\"Orders\" SELECT g, CASE WHEN g % 5 = 0 THEN 'held' ELSE 'new' END \
           FROM generate_series(1, 23) g; \
         CREATE TABLE tenant_0000.orders (orderid bigint PRIMARY KEY, status text NOT NULL); \
         INSERT INTO tenant_0000.orders SELECT g, 'new' FROM generate_series(1, 5) g;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let change = pb::Migration {
        source: "migrations/ship".into(),
        data: Some(pb::DataChange {
            table: "\"Orders\"".into(),
            key: "\"OrderId\"".into(),
            batch_size: 4,
            filter: "\"Status\" = 'new'".into(),
            prior_image: vec!["\"Status\"".into()],
            batch_sql: "UPDATE \"Orders\" SET \"Status\" = 'shipped' \
                        WHERE \"OrderId\" > $1 AND \"OrderId\" <= $2 AND \"Status\" = 'new'"
                .into(),
            ..Default::default()
        }),
        ..migration("ship", "", "", "")
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    let problems = preflight_problems(&mut s, vec![change.clone()]).await;
    assert!(problems.is_empty(), "{problems:?}");
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "mc".into(),
        migrations: vec![change],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("mc", 1, 1, vec![run(1, "tenant_0000", &["ship"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    let shipped = "SELECT count(*) FROM tenant_0000.\"Orders\" WHERE \"Status\" = 'shipped'";
    assert_eq!(count(&pool, shipped).await, 19, "every row the filter took");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.prior_images WHERE migration_id = 'ship' AND NOT post"
        )
        .await,
        19
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.orders WHERE status = 'new'"
        )
        .await,
        5,
        "the lower-case table beside it is another table, untouched"
    );
    let reply = s.rollback("mc", 1).await;
    assert!(reply.complete, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    assert_eq!(count(&pool, shipped).await, 0, "the old values put back");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.\"Orders\" WHERE \"Status\" = 'new'"
        )
        .await,
        19
    );
    h.stop().await;
    f.drop().await;
}
