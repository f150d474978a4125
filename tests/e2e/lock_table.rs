//! Issue 15: an atomic unit's prepared targets keep their locks until the decision, in the
//! server's shared lock table (max_locks_per_transaction x (max_connections +
//! max_prepared_transactions) objects). A unit the preflight can see will not fit is refused
//! before anything runs; one that fills the table anyway (through SQL the estimate cannot
//! see) fails before PREPARE and leaves nothing behind.
use serde_json::Value;

use crate::fleet::MigrationDir;
use crate::ha::HaFleet;
use crate::shards::prepared;

/// One shard of `tenants` tenants, agents with the least-privileged role, on a server
/// restarted with a lock table of 10 x (50 + 4) = 540 objects.
async fn small_lock_table(tenants: usize) -> anyhow::Result<HaFleet> {
    let mut fleet = HaFleet::builder(1, 1, tenants)
        .least_privilege()
        .start()
        .await?;
    for setting in [
        "max_locks_per_transaction = 10",
        "max_connections = 50",
        "max_prepared_transactions = 4",
    ] {
        fleet
            .pg
            .psql("postgres", &format!("ALTER SYSTEM SET {setting}"))
            .await?;
    }
    fleet.pg.restart().await?;
    fleet.wait_connected(1).await?;
    Ok(fleet)
}

async fn submit_atomic(
    fleet: &HaFleet,
    d: &MigrationDir,
) -> anyhow::Result<crate::harness::CommandOutput> {
    let p = d.path().to_string_lossy().into_owned();
    fleet
        .cli(&[
            "plan", "submit", &p, "--atomic", "--wait", "--output", "json",
        ])
        .await
}

async fn probe_tables(fleet: &HaFleet) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'lock_probe_%'",
        )
        .await
}

/// 30 tables per tenant, each with a key (an index and a sequence) and a text column (a
/// TOAST table and index): about 150 lock table entries per prepared target, which the
/// preflight sees from the statements. 4 targets need over 600 of the server's 540.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_a_unit_the_lock_table_cannot_hold() -> anyhow::Result<()> {
    let fleet = small_lock_table(4).await?;
    let d = MigrationDir::new()?;
    let up: String = (1..=30)
        .map(|i| format!("CREATE TABLE lock_probe_{i} (id bigserial PRIMARY KEY, body text);\n"))
        .collect();
    let down: String = (1..=30)
        .map(|i| format!("DROP TABLE lock_probe_{i};\n"))
        .collect();
    d.migration("001_lock_probes", "", &up, &down)?;
    let out = submit_atomic(&fleet, &d).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    for part in [
        // 30 x 5 for the tables, 2 for the transaction id and the schema, and the fence and
        // the journal with their indexes: over 152 each
        "shard shard_0: the plan's 4 prepared targets there would hold about ",
        "max_locks_per_transaction = 10 x (max_connections = 50 + max_prepared_transactions = 4) = 540",
        "set max_locks_per_transaction to at least",
    ] {
        assert!(out.stderr.contains(part), "no `{part}` in: {out}");
    }
    assert_eq!(probe_tables(&fleet).await?, 0, "nothing ran");
    crate::atomic::assert_no_plan_stored(&fleet).await?;
    assert_eq!(prepared(&fleet.pg, 0).await?, 0);
    Ok(())
}

/// A DO block that creates tables until the lock table is full, on one tenant of two: the
/// preflight sees one statement (its estimate passes), the server says "out of shared
/// memory" while the step runs, before its PREPARE. The unit aborts: the other tenant's
/// prepared transaction (if it got that far) is rolled back, nothing is left prepared,
/// no journal row, no table, and the plan's message names the setting to raise.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_lock_table_fails_the_unit_before_prepare_and_rolls_back() -> anyhow::Result<()> {
    let fleet = small_lock_table(2).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_lock_probes",
        "",
        "CREATE TABLE lock_probe_0 (id int);\n\
         DO $$ BEGIN\n\
           IF current_schema() = 'tenant_0001' THEN\n\
             FOR i IN 1..20000 LOOP\n\
               EXECUTE format('CREATE TABLE lock_probe_%s ()', i);\n\
             END LOOP;\n\
           END IF;\n\
         END $$;\n",
        "DROP TABLE lock_probe_0;\n",
    )?;
    let out = submit_atomic(&fleet, &d).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap_or("{}"))?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    let message = st["message"].as_str().unwrap_or_default();
    for part in [
        "tenant_0001",
        "SQLSTATE 53200",
        "out of shared memory",
        "max_locks_per_transaction",
        "aborted: no target committed",
    ] {
        assert!(message.contains(part), "no `{part}` in: {message}");
    }
    assert_eq!(prepared(&fleet.pg, 0).await?, 0, "nothing left prepared");
    let journal: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT count(*) FROM flotilla.journal")
        .await?;
    assert_eq!(journal, 0, "journal clean");
    assert_eq!(probe_tables(&fleet).await?, 0, "nothing committed");
    Ok(())
}
