//! The fleet's versions end to end: `fleet status`, `fleet show` and `fleet drift` answered
//! by the leader from its copy of the agents' journals and schema fingerprints, over real
//! shards and agents.
use anyhow::Context;
use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT, coord_dbmate_dir, tenant_sql};
use crate::harness::{CommandOutput, free_port, http, wait_for, wait_until};

const FIRST_HEAD: &str = "20250131160002";
const LOYALTY: &str = "20250301000000_loyalty_tier";

async fn status(fleet: &TestFleet, extra: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["fleet", "status", "--output", "json"];
    args.extend_from_slice(extra);
    fleet.cli(&args).await?.expect_success()?.last_json()
}

fn cohorts(s: &Value) -> &Vec<Value> {
    s["cohorts"].as_array().expect("cohorts is a list")
}

/// Until `fleet status` (with `extra`) says what `done` wants: reports follow results by a
/// moment, so every expectation waits for its condition.
async fn status_when(
    fleet: &TestFleet,
    what: &str,
    extra: &[&str],
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    let found = wait_for(what, WAIT, async || {
        let s = status(fleet, extra).await?;
        let ok = done(&s);
        last = s.clone();
        Ok(ok.then_some(s))
    })
    .await;
    found.with_context(|| format!("last fleet status: {last:#}"))
}

#[tokio::test]
async fn fleet_status_groups_targets_by_their_journals_and_names_what_each_lacks()
-> anyhow::Result<()> {
    let mut fleet = TestFleet::start(3, 8).await?;

    // One plan over every tenant: one cohort, nobody behind.
    let (code, _, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out:?}");
    // The view follows the journals by up to a second (the agents' report gap): before the
    // plan's rows arrive, every target is in one cohort too, of nothing applied, all behind.
    let s = status_when(&fleet, "one cohort of 24 targets, none behind", &[], |s| {
        s["targets"] == 24 && cohorts(s).len() == 1 && s["behind"] == 0
    })
    .await?;
    let c = &cohorts(&s)[0];
    assert!(c["head"].as_str().unwrap().starts_with(FIRST_HEAD), "{c}");
    assert_eq!(c["applied"], 3);
    assert!(s["mismatches"].as_array().unwrap().is_empty());

    // A second plan, version 2.5.0, to the tenants of one region: two cohorts.
    let dir = MigrationDir::new()?;
    dir.migration(
        LOYALTY,
        "",
        "ALTER TABLE work_orders ADD COLUMN loyalty_tier text;",
        "ALTER TABLE work_orders DROP COLUMN loyalty_tier;",
    )?;
    std::fs::write(
        dir.path().join("plan.toml"),
        "name = \"loyalty\"\nversion = \"2.5.0\"\n",
    )?;
    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--selector", "region in (r0)"])
        .await?;
    assert_eq!(code, 0, "{out:?}");
    // At once: what the plan applied is in the view when the plan has ended (before, the
    // agents' reports followed by up to a second, and the targets it had just migrated
    // showed behind).
    let s = status(&fleet, &[]).await?;
    assert!(
        cohorts(&s).len() == 2
            && cohorts(&s)[1]["targets"].as_array().unwrap().len() == 8
            && s["behind"] == 0,
        "two cohorts (16 + 8), none behind: {s:#}"
    );
    let ahead = cohorts(&s).iter().find(|c| c["head"] == LOYALTY).unwrap();
    assert_eq!(ahead["version"], "2.5.0");
    assert_eq!(ahead["applied"], 4);
    assert!(
        ahead["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_str().unwrap().starts_with("shard_0/")),
        "{ahead}"
    );

    // A tenant created afterwards on shard_0 is behind by every migration its labels give it.
    fleet
        .pg
        .psql(&fleet.shards[0], &tenant_sql("tenant_0999", 3))
        .await?;
    drop(fleet.agents[0].take());
    // Its agent gone, the shard is not reported (its targets were counted up to date as last
    // heard, however long the agent was away), and its targets are not counted.
    let s = status_when(&fleet, "shard_0 not reported", &[], |s| {
        s["unreported_shards"] == serde_json::json!(["shard_0"])
    })
    .await?;
    assert_eq!(s["targets"], 16, "{s:#}");
    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    let s = status_when(&fleet, "the new tenant behind", &[], |s| s["behind"] == 1).await?;
    assert!(
        s["unreported_shards"].as_array().is_none_or(Vec::is_empty),
        "{s:#}"
    );
    assert_eq!(s["targets"], 25);
    let behind = cohorts(&s)
        .iter()
        .find(|c| !c["pending"].as_array().unwrap().is_empty())
        .unwrap();
    assert_eq!(
        behind["targets"],
        serde_json::json!(["shard_0/tenant_0999"])
    );
    assert_eq!(behind["pending"].as_array().unwrap().len(), 4, "{behind}");
    assert_eq!(behind["pending"][3], LOYALTY);
    assert_eq!(behind["head"], "");

    // One target's page: its journal in order, with its plans; the new one's pending.
    let show = fleet
        .cli(&["fleet", "show", "tenant_0000", "--output", "json"])
        .await?
        .expect_success()?
        .last_json()?;
    assert_eq!(show["shard"], "shard_0");
    assert_eq!(show["version"], "2.5.0");
    let journal = show["journal"].as_array().unwrap();
    assert_eq!(journal.len(), 4);
    assert_eq!(journal[3]["migration"], LOYALTY);
    assert_ne!(journal[0]["plan_id"], journal[3]["plan_id"]);
    assert_eq!(show["labels"]["region"], "r0");
    let new = fleet
        .cli(&["fleet", "show", "shard_0/tenant_0999", "--output", "json"])
        .await?
        .expect_success()?
        .last_json()?;
    assert!(new["journal"].as_array().unwrap().is_empty());
    assert_eq!(new["pending"].as_array().unwrap().len(), 4);

    // An applied migration's file edited afterwards: compared with the files, the targets
    // that applied it are named.
    std::fs::write(
        dir.path().join(LOYALTY).join("up.sql"),
        "ALTER TABLE work_orders ADD COLUMN loyalty_tier text NOT NULL DEFAULT 'none';",
    )?;
    let against = dir.path().to_string_lossy().into_owned();
    let s = status(&fleet, &["--against", &against]).await?;
    let mismatches = s["mismatches"].as_array().unwrap();
    assert_eq!(mismatches.len(), 8, "{s:#}");
    assert!(mismatches.iter().all(|m| m["migration"] == LOYALTY
        && m["plan_id"] == ""
        && m["target"].as_str().unwrap().starts_with("shard_0/")));
    let text = fleet
        .cli(&["fleet", "status", "--against", &against])
        .await?
        .expect_success()?
        .stdout;
    assert!(text.contains("checksum mismatches"), "{text}");
    assert!(
        text.contains(&format!("shard_0/tenant_0000: {LOYALTY}")),
        "{text}"
    );

    // A selection; and bad input is refused by name.
    let r1 = status(&fleet, &["--selector", "region in (r1)"]).await?;
    assert_eq!(r1["targets"], 8);
    let out = fleet.cli(&["fleet", "show", "tenant_7777"]).await?;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("`tenant_7777`"), "{out:?}");
    let out = fleet
        .cli(&["fleet", "status", "--selector", "region in ("])
        .await?;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--selector"), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn a_tenant_that_appears_catches_up_on_the_plans_that_ask_and_one_that_vanishes_is_gone()
-> anyhow::Result<()> {
    let fleet = TestFleet::builder(2, 3)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    // Two migrations in a plan that asks for catch-up; one more in a plan that does not.
    let notes = MigrationDir::new()?;
    notes.migration(
        "001_work_order_note",
        "",
        "ALTER TABLE work_orders ADD COLUMN note text;",
        "ALTER TABLE work_orders DROP COLUMN note;",
    )?;
    notes.migration(
        "002_repair_order_note",
        "",
        "ALTER TABLE repair_orders ADD COLUMN note text;",
        "ALTER TABLE repair_orders DROP COLUMN note;",
    )?;
    std::fs::write(
        notes.path().join("plan.toml"),
        "name = \"notes\"\nversion = \"3.1.0\"\ncatch_up = true\n",
    )?;
    let loyalty = MigrationDir::new()?;
    loyalty.migration(
        "003_loyalty",
        "",
        "ALTER TABLE work_orders ADD COLUMN loyalty_tier text;",
        "ALTER TABLE work_orders DROP COLUMN loyalty_tier;",
    )?;
    for dir in [&notes, &loyalty] {
        let (code, _, out) = fleet.submit_wait(dir.path(), &[]).await?;
        assert_eq!(code, 0, "{out:?}");
    }

    // A tenant created on shard_1 afterwards: found by its agent, caught up without an
    // operator on the plan that asks for it, and shown behind by the other.
    fleet
        .pg
        .psql(&fleet.shards[1], &tenant_sql("tenant_0900", 2))
        .await?;
    let plan = catch_up_ended(&fleet, "catch-up-shard_1/tenant_0900").await?;
    assert_eq!(plan["state"], "completed", "{plan}");
    assert_eq!(plan["targets"], 1, "{plan}");
    let columns = fleet
        .pg
        .query_rows(
            &fleet.shards[1],
            "SELECT table_name || '.' || column_name FROM information_schema.columns
              WHERE table_schema = 'tenant_0900' AND column_name IN ('note', 'loyalty_tier')
              ORDER BY 1",
        )
        .await?;
    assert_eq!(
        columns,
        vec![
            vec!["repair_orders.note".to_string()],
            vec!["work_orders.note".to_string()]
        ]
    );
    let s = status_when(&fleet, "the new tenant behind by 003 only", &[], |s| {
        cohorts(s).iter().any(|c| {
            c["targets"] == serde_json::json!(["shard_1/tenant_0900"])
                && c["pending"] == serde_json::json!(["003_loyalty"])
        })
    })
    .await?;
    assert_eq!(s["behind"], 1);
    // At its plan's version, as the tenants that ran the plan are (the catch-up plan had
    // none of its own, and the tenant showed none).
    let show = fleet_show(&fleet, "shard_1/tenant_0900").await?;
    assert_eq!(show["version"], "3.1.0", "{show}");

    // A tenant dropped from shard_0: gone, not an error; its journal rows stay.
    fleet
        .pg
        .psql(&fleet.shards[0], "DROP SCHEMA tenant_0001 CASCADE")
        .await?;
    let s = status_when(&fleet, "tenant_0001 gone", &[], |s| {
        s["gone"] == serde_json::json!(["shard_0/tenant_0001"])
    })
    .await?;
    assert_eq!(s["targets"], 6, "{s:#}");
    // a selection lists the gone tenants it takes only
    let other = status(&fleet, &["--selector", "shard = shard_1"]).await?;
    assert_eq!(other["gone"], serde_json::json!([]), "{other:#}");
    let kept = fleet
        .pg
        .query_rows(
            &fleet.shards[0],
            "SELECT count(*) FROM flotilla.journal WHERE target = 'tenant_0001'",
        )
        .await?;
    assert_eq!(kept, vec![vec!["3".to_string()]]);
    // `fleet show` of the target `fleet status` names gone shows what it held (it was "no
    // tenant" before), by its full name and by its tenant name alone.
    for name in ["shard_0/tenant_0001", "tenant_0001"] {
        let show = fleet_show(&fleet, name).await?;
        assert_eq!(show["gone"], true, "{show}");
        assert_eq!(show["journal"].as_array().map(Vec::len), Some(3), "{show}");
        assert_eq!(show["pending"], serde_json::json!([]), "{show}");
    }

    // Made again under its name: another schema than its journal's. What is applied there
    // is not known (a new tenant, or one restored on its own), so a plan over it is refused,
    // naming the answers; before, the old rows answered and the catch-up said every step
    // applied, with the schema holding none of them. Told it is new, it is caught up.
    fleet
        .pg
        .psql(&fleet.shards[0], &tenant_sql("tenant_0001", 2))
        .await?;
    let notes_dir = notes.path().to_string_lossy().into_owned();
    let out = crate::harness::wait_for("the plan refused over the tenant", WAIT, async || {
        let out = fleet
            .cli(&[
                "plan",
                "submit",
                &notes_dir,
                "--selector",
                "tenant = tenant_0001",
            ])
            .await?;
        Ok(out
            .stderr
            .contains("its schema is not the one its journal rows were written in")
            .then_some(out))
    })
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("SELECT flotilla.tenant_is_new('tenant_0001')"),
        "{out}"
    );
    // Its catch-up plan was refused too (the tenant appeared again): `fleet show` says why
    // it is behind (before, the coordinator's log alone).
    let failure = crate::harness::wait_for("the catch-up refusal shown", WAIT, async || {
        let f = fleet_show(&fleet, "shard_0/tenant_0001").await?["last_failure"].clone();
        Ok((!f.is_null()).then_some(f))
    })
    .await?;
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the catch-up plan `catch-up-shard_0/tenant_0001` was not accepted")
            && message.contains("its schema is not the one its journal rows were written in"),
        "{failure}"
    );
    // `fleet status` sets it apart (it counted it up to date, its schema empty), and `fleet
    // show` says why nothing is known to be pending there.
    let s = status_when(&fleet, "tenant_0001 set apart", &[], |s| {
        s["schema_changed"] == serde_json::json!(["shard_0/tenant_0001"])
    })
    .await?;
    assert!(
        cohorts(&s).iter().all(|c| !c["targets"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("shard_0/tenant_0001"))),
        "{s:#}"
    );
    let show = fleet_show(&fleet, "shard_0/tenant_0001").await?;
    assert_eq!(show["schema_changed"], true, "{show}");
    assert_eq!(show["pending"], serde_json::json!([]), "{show}");
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "SELECT flotilla.tenant_is_new('tenant_0001')",
        )
        .await?;
    // Said new, it is caught up as a new tenant is, on the plans that ask (it was left
    // behind: a plan over it by hand was the only way).
    let st = catch_up_ended(&fleet, "catch-up-shard_0/tenant_0001").await?;
    assert_eq!(st["state"], "completed", "{st}");
    let columns = fleet
        .pg
        .query_rows(
            &fleet.shards[0],
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = 'tenant_0001' AND column_name = 'note'",
        )
        .await?;
    assert_eq!(columns, vec![vec!["2".to_string()]], "{st}");
    let moved = fleet
        .pg
        .query_rows(
            &fleet.shards[0],
            "SELECT count(*) FROM flotilla.journal_history WHERE target = 'tenant_0001'
                AND rolled_back_by_plan = 'flotilla:tenant-is-new'",
        )
        .await?;
    assert_eq!(moved, vec![vec!["3".to_string()]]);
    // Applied there, the refusal is no longer why it is behind.
    let show = fleet_show(&fleet, "shard_0/tenant_0001").await?;
    assert!(show["last_failure"].is_null(), "{show}");
    Ok(())
}

/// Tenants found in one pass get only what the completed plans select for each of them
/// (before, every migration selected for any one of them ran on all), whatever they are
/// named (before, a name no selector word can hold, `tenant_X y`, made the catch-up plan
/// invalid, and no tenant of the pass was caught up).
#[tokio::test]
async fn catch_up_follows_each_new_tenants_selection_whatever_its_name() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let notes = MigrationDir::new()?;
    notes.migration(
        "001_work_order_note",
        "",
        "ALTER TABLE work_orders ADD COLUMN note text;",
        "ALTER TABLE work_orders DROP COLUMN note;",
    )?;
    std::fs::write(
        notes.path().join("plan.toml"),
        "name = \"notes\"\ncatch_up = true\nselector = \"tenant notin (tenant_0901)\"\n",
    )?;
    let (code, _, out) = fleet.submit_wait(notes.path(), &[]).await?;
    assert_eq!(code, 0, "{out:?}");

    // three tenants in one transaction: the agent finds them in one pass
    let sql = ["tenant_0900", "tenant_0901", "\"tenant_X y\""]
        .map(|t| tenant_sql(t, 1))
        .join("\n");
    fleet
        .pg
        .psql(&fleet.shards[0], &format!("BEGIN;\n{sql}\nCOMMIT;"))
        .await?;
    let plan = catch_up_ended(&fleet, "catch-up-shard_0-2-tenants").await?;
    assert_eq!(plan["state"], "completed", "{plan}");
    assert_eq!(plan["targets"], 2, "{plan}");
    let noted = fleet
        .pg
        .query_rows(
            &fleet.shards[0],
            "SELECT table_schema FROM information_schema.columns
              WHERE column_name = 'note' AND table_schema LIKE 'tenant_09%' OR table_schema = 'tenant_X y'
                AND column_name = 'note'
              ORDER BY 1",
        )
        .await?;
    assert_eq!(
        noted,
        vec![
            vec!["tenant_0900".to_string()],
            vec!["tenant_X y".to_string()]
        ],
        "tenant_0901, which the plan's selector leaves out, has no note"
    );
    // Shown with its label quoted as a selector takes it: `tenant=tenant_X y` read as two
    // words (and a name with a comma as two labels).
    let out = fleet
        .cli(&["fleet", "show", "shard_0/tenant_X y"])
        .await?
        .expect_success()?;
    assert!(out.stdout.contains(r#"tenant="tenant_X y""#), "{out}");
    Ok(())
}

/// A tenant that appears while a plan that asks for catch-up runs is not among that
/// plan's targets (fixed at its submit) and no completed plan gives it anything yet: it
/// is kept, and caught up once the plan completes. Before, it stayed behind for good.
#[tokio::test]
async fn a_tenant_that_appears_while_the_plan_runs_is_caught_up_when_it_completes()
-> anyhow::Result<()> {
    appears_while_the_plan_runs(false).await
}

/// The same with the coordinator killed once it kept the tenant, and started again: the
/// tenant is kept in the control store, and the next leader catches it up when the plan
/// completes. Before, it was kept in the leader's memory only, and stayed behind.
#[tokio::test]
async fn a_tenant_kept_for_a_catch_up_outlives_its_leader() -> anyhow::Result<()> {
    appears_while_the_plan_runs(true).await
}

async fn appears_while_the_plan_runs(restart: bool) -> anyhow::Result<()> {
    use crate::shards::{blocked, hold, logged_blocking_migration, release};
    let builder = TestFleet::builder(1, 2).agent_args(&["--discover-interval", "1s"]);
    // (a PostgreSQL store with a restart, to read what it keeps)
    let builder = if restart {
        builder.postgres_store("control")
    } else {
        builder
    };
    let mut fleet = builder.start().await?;
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0000", 93)?;
    std::fs::write(
        d.path().join("plan.toml"),
        "name = \"logged\"\ncatch_up = true\n",
    )?;
    let lock = hold(&fleet.pg, 0, 93).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until(
        "tenant_0000 blocked while the plan runs",
        WAIT,
        async || Ok(blocked(&fleet.pg, 0).await? == 1),
    )
    .await?;
    fleet
        .pg
        .psql(&fleet.shards[0], &tenant_sql("tenant_0900", 2))
        .await?;
    fleet
        .coordinator
        .as_ref()
        .unwrap()
        .wait_for_log(
            "new tenants kept for the catch-up after the plans under way",
            WAIT,
        )
        .await?;
    if restart {
        // once the store has it (the row the log line's write put there)
        wait_until("the tenant kept in the store", WAIT, async || {
            let n: i64 = fleet
                .pg
                .query_scalar(
                    "control",
                    "SELECT count(*) FROM catch_up_kept WHERE tenant = 'tenant_0900'",
                )
                .await
                .unwrap_or(0);
            Ok(n == 1)
        })
        .await?;
        // (the next leader reads them before it takes the plan over)
        fleet.restart_coordinator().await?;
    }
    release(lock, 93).await?;
    let (out, _) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = catch_up_ended(&fleet, "catch-up-shard_0/tenant_0900").await?;
    assert_eq!(plan["state"], "completed", "{plan}");
    crate::shards::assert_logged_once(&fleet.pg, &fleet.shards[0], "tenant_0900", &["001"]).await?;
    if restart {
        // taken once its catch-up was submitted
        wait_until("the kept tenant taken from the store", WAIT, async || {
            let n: i64 = fleet
                .pg
                .query_scalar("control", "SELECT count(*) FROM catch_up_kept")
                .await?;
            Ok(n == 0)
        })
        .await?;
    }
    Ok(())
}

/// A tenant dropped while a plan runs (tenants are deleted all the time in a SaaS fleet):
/// its steps are not run there, and the plan completes, naming it. Before, its step failed
/// for want of a schema ("no schema has been selected to create in") and the plan rolled
/// every other tenant back.
#[tokio::test]
async fn a_tenant_dropped_while_the_plan_runs_is_passed_over_not_failed() -> anyhow::Result<()> {
    use crate::shards::{assert_logged_once, blocked, hold, logged_blocking_migration, release};
    let fleet = TestFleet::start(1, 3).await?;
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0000", 94)?;
    d.migration(
        "002_more",
        "",
        "INSERT INTO applied_log VALUES ('002')",
        "DELETE FROM applied_log WHERE step = '002'",
    )?;
    let lock = hold(&fleet.pg, 0, 94).await?;
    let id = fleet.submit(d.path(), &["--max-parallel", "1"]).await?;
    wait_until(
        "tenant_0000 blocked while the plan runs",
        WAIT,
        async || Ok(blocked(&fleet.pg, 0).await? == 1),
    )
    .await?;
    fleet
        .pg
        .psql(&fleet.shards[0], "DROP SCHEMA tenant_0001 CASCADE")
        .await?;
    release(lock, 94).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    let message = st["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("1 target(s) gone from their shards")
            && message.contains("shard_0/tenant_0001"),
        "{st}"
    );
    for tenant in ["tenant_0000", "tenant_0002"] {
        assert_logged_once(&fleet.pg, &fleet.shards[0], tenant, &["001", "002"]).await?;
    }
    let rows: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT count(*) FROM flotilla.journal WHERE target = 'tenant_0001'",
        )
        .await?;
    assert_eq!(rows, 0, "nothing recorded for the gone tenant");
    Ok(())
}

/// A plan submitted again after the plan that followed it (as after a store made anew):
/// a tenant that appears is caught up with the migrations in the order the fleet ran them,
/// the `CREATE TABLE` of the first before the `ALTER TABLE` of the second. Before, the
/// first plan's migration moved behind the second's, and the catch-up failed and was
/// rolled back, the tenant left with nothing.
#[tokio::test]
async fn a_plan_submitted_again_keeps_its_place_in_a_catch_up() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let first = MigrationDir::new()?;
    first.migration(
        "001_make_foo",
        "",
        "CREATE TABLE foo (id int);",
        "DROP TABLE foo;",
    )?;
    std::fs::write(
        first.path().join("plan.toml"),
        "name = \"make\"\ncatch_up = true\n",
    )?;
    let second = MigrationDir::new()?;
    second.migration(
        "002_alter_foo",
        "",
        "ALTER TABLE foo ADD COLUMN bar int;",
        "ALTER TABLE foo DROP COLUMN bar;",
    )?;
    std::fs::write(
        second.path().join("plan.toml"),
        "name = \"alter\"\ncatch_up = true\n",
    )?;
    for dir in [&first, &second, &first] {
        let (code, _, out) = fleet.submit_wait(dir.path(), &[]).await?;
        assert_eq!(code, 0, "{out:?}");
    }
    fleet
        .pg
        .psql(&fleet.shards[0], &tenant_sql("tenant_0900", 2))
        .await?;
    let plan = catch_up_ended(&fleet, "catch-up-shard_0/tenant_0900").await?;
    assert_eq!(plan["state"], "completed", "{plan}");
    let columns = fleet
        .pg
        .query_rows(
            &fleet.shards[0],
            "SELECT column_name FROM information_schema.columns
              WHERE table_schema = 'tenant_0900' AND table_name = 'foo' ORDER BY 1",
        )
        .await?;
    assert_eq!(
        columns,
        vec![vec!["bar".to_string()], vec!["id".to_string()]]
    );
    Ok(())
}

/// The catch-up plan `name` (in `plan list`) once it ended.
async fn catch_up_ended(fleet: &TestFleet, name: &str) -> anyhow::Result<Value> {
    wait_for(
        &format!("the catch-up plan {name} to end"),
        WAIT,
        async || {
            let list = fleet
                .cli(&["plan", "list", "--output", "json"])
                .await?
                .expect_success()?
                .last_json()?;
            let found = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name)
                .cloned();
            Ok(found.filter(|p| {
                flotilla_core::state::PlanState::is_terminal_str(p["state"].as_str().unwrap_or(""))
            }))
        },
    )
    .await
}

/// `fleet drift --output json`: its exit code and answer.
async fn drift(fleet: &TestFleet) -> anyhow::Result<(i32, Value, CommandOutput)> {
    let out = fleet.cli(&["fleet", "drift", "--output", "json"]).await?;
    let code = out.code().unwrap_or(-1);
    let json = out.last_json()?;
    Ok((code, json, out))
}

/// Until `fleet drift` says what `done` wants: the agents read their catalog on their
/// refresh (`--discover-interval`) and after runs, so every expectation waits for it.
async fn drift_when(
    fleet: &TestFleet,
    what: &str,
    done: impl Fn(i32, &Value) -> bool,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    let found = wait_for(what, WAIT, async || {
        let (code, d, _) = drift(fleet).await?;
        let ok = done(code, &d);
        last = d.clone();
        Ok(ok.then_some(d))
    })
    .await;
    found.with_context(|| format!("last fleet drift: {last:#}"))
}

/// The value of one sample (`name{labels}`) in Prometheus text.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn fleet_drift_names_a_column_added_by_hand_and_require_no_drift_refuses_the_plan()
-> anyhow::Result<()> {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let fleet = TestFleet::builder(3, 8)
        .metrics(metrics)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let (code, _, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out:?}");

    // One plan over every tenant: one cohort, one shape, exit 0.
    // (the journals' copy catches up with the plan's last runs a moment after it ends)
    let d = drift_when(
        &fleet,
        "24 targets in one cohort of one shape",
        |code, d| {
            code == 0
                && d["targets"] == 24
                && d["cohorts"].as_array().map(Vec::len) == Some(1)
                && d["cohorts"][0]["head"]
                    .as_str()
                    .is_some_and(|h| h.starts_with(FIRST_HEAD))
        },
    )
    .await?;
    assert_eq!(d["drifted"], 0);
    assert_eq!(
        d["cohorts"][0]["shapes"].as_array().unwrap().len(),
        1,
        "{d:#}"
    );
    assert_eq!(d["shards"].as_array().unwrap().len(), 3, "{d:#}");
    let text = fleet.cli(&["fleet", "drift"]).await?;
    assert_eq!(text.code(), Some(0), "{text}");
    assert!(text.stdout.contains("no drift"), "{text}");

    // A column added by hand to one tenant: named with its table, exit 1.
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "ALTER TABLE tenant_0003.work_orders ADD COLUMN loyalty_tier text",
        )
        .await?;
    let d = drift_when(&fleet, "tenant_0003 drifted", |code, d| {
        code == 1 && d["drifted"] == 1 && d["cohorts"].as_array().map(Vec::len) == Some(1)
    })
    .await?;
    let cohort = &d["cohorts"][0];
    assert_eq!(cohort["majority"], 23, "{d:#}");
    let drifted = &cohort["drifted"][0];
    assert_eq!(drifted["target"], "shard_0/tenant_0003");
    assert_eq!(
        drifted["extra"],
        serde_json::json!(["column work_orders.loyalty_tier text"])
    );
    assert!(drifted["missing"].as_array().unwrap().is_empty(), "{d:#}");
    let text = fleet.cli(&["fleet", "drift"]).await?;
    assert_eq!(text.code(), Some(1), "{text}");
    assert!(
        text.stdout.contains(
            "shard_0/tenant_0003: column work_orders.loyalty_tier text, not in the majority's shape (23 targets)"
        ),
        "{text}"
    );
    let show = fleet
        .cli(&["fleet", "show", "shard_0/tenant_0003", "--output", "json"])
        .await?
        .expect_success()?
        .last_json()?;
    assert_eq!(show["fingerprint"], drifted["fingerprint"], "{show:#}");
    assert_eq!(
        show["drift"]["diff"],
        serde_json::json!([
            "shard_0/tenant_0003: column work_orders.loyalty_tier text, not in the majority's shape (23 targets)"
        ])
    );
    let head = cohort["head"].as_str().unwrap().to_string();
    let series = format!("flotilla_drifted_targets{{cohort=\"{head}\"}}");
    wait_until("the drift metric at 1", WAIT, async || {
        let scrape = http::get(metrics, "/metrics").await?;
        Ok(sample(&scrape.body, &series) == Some(1.0))
    })
    .await?;

    // A plan with require_no_drift = true over the drifted tenant is refused by name, and
    // nothing is changed; without it, the same plan runs with a warning.
    let dir = MigrationDir::new()?;
    dir.migration(
        "20250401000000_notes",
        "",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
        "DROP TABLE notes;",
    )?;
    std::fs::write(
        dir.path().join("plan.toml"),
        "name = \"notes\"\nrequire_no_drift = true\n",
    )?;
    let rows = fleet.journal_total().await?;
    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--selector", "region in (r0)"])
        .await?;
    assert_eq!(code, 2, "{out:?}");
    assert!(out.stderr.contains("shard_0/tenant_0003"), "{out:?}");
    assert!(out.stderr.contains("require_no_drift"), "{out:?}");
    assert_eq!(fleet.journal_total().await?, rows);
    let plans = fleet
        .cli(&["plan", "list", "--output", "json"])
        .await?
        .expect_success()?
        .last_json()?;
    assert_eq!(plans.as_array().map(Vec::len), Some(1), "{plans:#}");
    std::fs::write(dir.path().join("plan.toml"), "name = \"notes\"\n")?;
    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--selector", "region in (r0)"])
        .await?;
    assert_eq!(code, 0, "{out:?}");
    assert!(out.stderr.contains("warning:"), "{out:?}");
    assert!(out.stderr.contains("shard_0/tenant_0003"), "{out:?}");

    // The tenant still differs from the 7 others of its new cohort; its column dropped,
    // there is no drift left.
    let d = drift_when(
        &fleet,
        "tenant_0003 drifted in its new cohort",
        |code, d| {
            code == 1
                && d["cohorts"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["head"] == "20250401000000_notes" && c["majority"] == 7)
                })
        },
    )
    .await?;
    assert_eq!(d["drifted"], 1, "{d:#}");
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "ALTER TABLE tenant_0003.work_orders DROP COLUMN loyalty_tier",
        )
        .await?;
    drift_when(&fleet, "no drift left", |code, d| {
        code == 0 && d["drifted"] == 0
    })
    .await?;

    // A shard's agent away: its targets are not compared, and "no drift" is not said of
    // the fleet (exit 3, naming it). Before, it exited 0, also with every agent away.
    let mut fleet = fleet;
    fleet.agents[2].take().expect("shard_2's agent").kill()?;
    let d = drift_when(&fleet, "shard_2 not reported", |code, d| {
        code == 3 && d["unreported_shards"] == serde_json::json!(["shard_2"])
    })
    .await?;
    assert_eq!(
        (d["drifted"].clone(), d["targets"].clone()),
        (0.into(), 16.into())
    );
    let out = fleet
        .cli(&["fleet", "drift", "--selector", "shard notin (shard_2)"])
        .await?;
    assert_eq!(
        out.code(),
        Some(0),
        "shard_2 is outside the selection: {out:?}"
    );
    // a selection that reaches it (the shard by name, one of its tenants) does not find it
    // clean (it did: the selection read only the shards that reported)
    for selector in ["shard=shard_2", "tenant=tenant_0016"] {
        let out = fleet
            .cli(&["fleet", "drift", "--selector", selector])
            .await?;
        assert_eq!(out.code(), Some(3), "{selector}: {out:?}");
    }
    let (_, _, out) = drift(&fleet).await?;
    assert!(
        out.stderr.contains("no drift among the 16 target(s) compared, but not every shard was: shards not reported (their agents away): shard_2"),
        "{out:?}"
    );
    Ok(())
}

/// A non-transactional step whose rollback is cut short (its down SQL fails after its first
/// statement) is not applied, whatever its journal row says: the fleet view does not list it
/// as applied, and says why from the shard (the checkpoint marked undoing), also after the
/// coordinator that heard the rollback's reply is gone. A rollback that finishes clears it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_cut_short_on_a_shard_outlives_the_coordinator() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 1).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_index",
        "",
        "CREATE INDEX CONCURRENTLY idx_wo_cut_short ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_wo_cut_short;\nSELECT 1 FROM down_gate",
    )?;
    d.migration(
        "002_refused",
        "",
        "DO $$ BEGIN RAISE EXCEPTION 'refused here'; END $$",
        "SELECT 1",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_ne!(code, 0, "{out}");
    assert_eq!(status["state"], "rollback_failed", "{status}");
    let id = status["plan_id"].as_str().unwrap().to_string();
    let target = "shard_0/tenant_0000";

    fleet.kill_coordinator()?;
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    let mut last = Value::Null;
    wait_until("the shard's journal heard again", WAIT, async || {
        last = fleet_show(&fleet, target).await?;
        Ok(last["reported"] == true && !last["last_failure"].is_null())
    })
    .await
    .with_context(|| format!("{last}"))?;
    let failure = &last["last_failure"];
    assert_eq!(failure["migration"], "001_index", "{last}");
    assert_eq!(failure["plan_id"], id.as_str(), "{last}");
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "the rollback of plan {id} began to undo this step and did not finish"
        )) && message.contains(&format!("flotilla plan rollback {id}")),
        "{last}"
    );
    assert!(
        last["journal"]
            .as_array()
            .is_some_and(|j| !j.iter().any(|e| e.to_string().contains("001_index"))),
        "the step counts as not applied: {last}"
    );

    roll_back_through_the_down_gate(&fleet, &id).await?;
    // The cut short undo is no failure any more; the plan's own failure (002 refused) is
    // the target's last again, as on any target whose plan failed there and was rolled back:
    // only that step applied there, or another plan's step, clears it.
    wait_until("the rollback's failure cleared", WAIT, async || {
        last = fleet_show(&fleet, target).await?;
        Ok(last["last_failure"]["migration"] == "002_refused")
    })
    .await
    .with_context(|| format!("{last}"))?;
    assert_eq!(last["last_failure"]["message"], "refused here", "{last}");
    Ok(())
}

/// `fleet show TARGET` as JSON.
async fn fleet_show(fleet: &TestFleet, target: &str) -> anyhow::Result<Value> {
    fleet
        .cli(&["fleet", "show", target, "--output", "json"])
        .await?
        .expect_success()?
        .last_json()
}

/// Lets tenant_0000's down SQL through (its `down_gate` table) and rolls plan `id` back
/// again, to its end.
async fn roll_back_through_the_down_gate(fleet: &TestFleet, id: &str) -> anyhow::Result<()> {
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "CREATE TABLE tenant_0000.down_gate (v int)",
        )
        .await?;
    let out = fleet
        .cli(&["plan", "rollback", id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(())
}

/// A rollback that cannot undo a step on a target leaves that target part-way back: `fleet
/// show` gives that step, its plan and the down SQL's error as the target's last failure
/// (not the failure elsewhere that started the rollback); the target whose step failed
/// keeps its own. Rolled back again once the down SQL can run, the target's failure goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_cut_short_is_the_targets_last_failure() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 2).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_first",
        "",
        "ALTER TABLE work_orders ADD COLUMN first_mark int",
        "DO $$ BEGIN IF to_regclass('down_gate') IS NULL THEN \
           RAISE EXCEPTION 'first_mark stays here'; END IF; END $$;\n\
         ALTER TABLE work_orders DROP COLUMN first_mark",
    )?;
    d.migration(
        "002_second",
        "",
        "DO $$ BEGIN IF current_schema() = 'tenant_0001' THEN \
           RAISE EXCEPTION 'second_mark refused here'; END IF; END $$;\n\
         ALTER TABLE work_orders ADD COLUMN second_mark int",
        "ALTER TABLE work_orders DROP COLUMN second_mark",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_ne!(code, 0, "{out}");
    assert_eq!(status["state"], "rollback_failed", "{status}");
    let id = status["plan_id"].as_str().unwrap();
    let last_failure = async |target: &str| -> anyhow::Result<Value> {
        Ok(fleet_show(&fleet, target).await?["last_failure"].clone())
    };
    let cut_short = last_failure("shard_0/tenant_0000").await?;
    assert_eq!(cut_short["migration"], "001_first", "{cut_short}");
    assert_eq!(cut_short["plan_id"], id, "{cut_short}");
    let message = cut_short["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("the rollback of plan {id} could not undo it"))
            && message.contains("first_mark stays here"),
        "{cut_short}"
    );
    let failed = last_failure("shard_0/tenant_0001").await?;
    assert_eq!(failed["migration"], "002_second", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("second_mark refused here")),
        "{failed}"
    );
    // the failure outlives the coordinator (it was kept in memory only: a restart lost it)
    let id = id.to_string();
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    let after = fleet_show(&fleet, "shard_0/tenant_0001").await?["last_failure"].clone();
    assert_eq!(after["migration"], "002_second", "{after}");
    assert_eq!(after["plan_id"], id.as_str(), "{after}");

    roll_back_through_the_down_gate(&fleet, &id).await?;
    assert_eq!(fleet.status(&id).await?["state"], "rolled_back");
    let cleared = fleet_show(&fleet, "shard_0/tenant_0000").await?["last_failure"].clone();
    assert!(cleared.is_null(), "{cleared}");
    Ok(())
}

/// A tenant renamed (`ALTER SCHEMA ... RENAME`) is not a new tenant: its schema is the one
/// recorded under its old name, whose journal rows say what is applied there. Before, its
/// catch-up ran every migration again under the new name (a data change applied twice),
/// and `fleet status` said it was up to date. Now it is set apart as a changed schema, a
/// plan over it is refused naming the two ways out, and moved back it is its old self.
#[tokio::test]
async fn a_renamed_tenant_is_not_caught_up_as_a_new_one() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 2)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let d = logged_everywhere(&fleet).await?;
    let shard = &fleet.shards[0];
    fleet
        .pg
        .psql(shard, "ALTER SCHEMA tenant_0001 RENAME TO tenant_0001r")
        .await?;
    let s = status_when(&fleet, "the renamed tenant set apart", &[], |s| {
        s["schema_changed"] == serde_json::json!(["shard_0/tenant_0001r"])
    })
    .await?;
    assert_eq!(
        s["gone"],
        serde_json::json!(["shard_0/tenant_0001"]),
        "{s:#}"
    );
    assert_eq!(
        s["renamed"],
        serde_json::json!({"shard_0/tenant_0001r": "tenant_0001"}),
        "{s:#}"
    );
    // its catch-up (it appeared) is refused, naming it, and ran nothing
    let failure = wait_for("the catch-up refusal shown", WAIT, async || {
        let f = fleet_show(&fleet, "shard_0/tenant_0001r").await?["last_failure"].clone();
        Ok((!f.is_null()).then_some(f))
    })
    .await?;
    let said = "tenant \"tenant_0001r\" of shard shard_0 is tenant \"tenant_0001\" renamed";
    assert!(
        failure["message"].as_str().unwrap().contains(said),
        "{failure}"
    );
    crate::shards::assert_logged_once(&fleet.pg, shard, "tenant_0001r", &["001"]).await?;
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &d.path().to_string_lossy(),
            "--selector",
            "tenant = tenant_0001r",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(said)
            && out
                .stderr
                .contains("ALTER SCHEMA \"tenant_0001r\" RENAME TO \"tenant_0001\""),
        "{out}"
    );
    // A new schema under the old name meanwhile: an answer for the old name would cut the
    // renamed tenant off from its history (its migrations then ran again there), and is
    // refused, naming where the history's schema is.
    fleet.pg.psql(shard, "CREATE SCHEMA tenant_0001").await?;
    let refused = fleet
        .pg
        .psql(
            shard,
            "SELECT flotilla.tenant_kept_its_history('tenant_0001')",
        )
        .await
        .expect_err("refused");
    assert!(
        format!("{refused:#}").contains(
            "the schema recorded for tenant_0001 is on this shard as tenant_0001r, which holds its history"
        ),
        "{refused:#}"
    );
    fleet.pg.psql(shard, "DROP SCHEMA tenant_0001").await?;
    // renamed back, it is what its journal says: nothing pending, nothing set apart
    fleet
        .pg
        .psql(shard, "ALTER SCHEMA tenant_0001r RENAME TO tenant_0001")
        .await?;
    status_when(&fleet, "the tenant back under its name", &[], |s| {
        s["schema_changed"] == serde_json::json!([])
            && s["gone"] == serde_json::json!([])
            && s["behind"] == 0
    })
    .await?;
    crate::shards::assert_logged_once(&fleet.pg, shard, "tenant_0001", &["001"]).await?;
    // Back, it appeared again: its catch-up has nothing to do and is no plan (one said
    // "nothing to do" in the plan list, and waited for an approver under an approval rule).
    fleet
        .coordinator
        .as_ref()
        .expect("coordinator")
        .wait_for_log("nothing to catch up", WAIT)
        .await?;
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert!(
        !plans.to_string().contains("catch-up-shard_0/tenant_0001"),
        "{plans}"
    );

    // Two tenants swapped (through a third name): each holds the other's schema, and is
    // said so (it read as a changed schema, whose `tenant_kept_its_history` answer put the
    // other tenant's history on it). Swapped back, all is as it was.
    let swap = "ALTER SCHEMA tenant_0000 RENAME TO swap_tmp; \
                ALTER SCHEMA tenant_0001 RENAME TO tenant_0000; \
                ALTER SCHEMA swap_tmp RENAME TO tenant_0001";
    fleet
        .pg
        .psql(shard, &format!("BEGIN; {swap}; COMMIT"))
        .await?;
    status_when(&fleet, "the swapped tenants set apart", &[], |s| {
        s["renamed"]
            == serde_json::json!({
                "shard_0/tenant_0000": "tenant_0001",
                "shard_0/tenant_0001": "tenant_0000"
            })
    })
    .await?;
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &d.path().to_string_lossy(),
            "--selector",
            "tenant = tenant_0000",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("tenant \"tenant_0000\" of shard shard_0 is tenant \"tenant_0001\" renamed"),
        "{out}"
    );
    fleet
        .pg
        .psql(shard, &format!("BEGIN; {swap}; COMMIT"))
        .await?;
    status_when(&fleet, "the tenants back under their names", &[], |s| {
        s["schema_changed"] == serde_json::json!([]) && s["behind"] == 0
    })
    .await?;
    for t in ["tenant_0000", "tenant_0001"] {
        crate::shards::assert_logged_once(&fleet.pg, shard, t, &["001"]).await?;
    }
    Ok(())
}

/// `fleet show` takes a tenant's name as it is: one that ends in a space was trimmed to
/// another name ("shard `shard_0` has no tenant `tenant_trail`"). A name pasted with a
/// space around it is still found.
#[tokio::test]
async fn fleet_show_takes_a_tenant_name_ending_in_a_space_as_it_is() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .shard_sql(|_, _| "CREATE SCHEMA \"tenant_trail \"".to_string())
        .start()
        .await?;
    let show = fleet_show(&fleet, "shard_0/tenant_trail ").await?;
    assert_eq!(show["tenant"], "tenant_trail ", "{show}");
    let show = fleet_show(&fleet, " shard_0/tenant_0000 ").await?;
    assert_eq!(show["tenant"], "tenant_0000", "{show}");
    Ok(())
}

/// A tenant moved to another shard (dumped there, dropped here) holds what its old shard's
/// journal says: its catch-up on the new shard is held back, saying so and how to record
/// what it holds. Before, it ran its migrations again there (a data change twice).
#[tokio::test]
async fn a_tenant_moved_to_another_shard_is_not_caught_up_as_a_new_one() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(2, 1)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let _dir = logged_everywhere(&fleet).await?;
    let moved = fleet.tenants(0)[0].clone();
    let (from, to) = (&fleet.shards[0], &fleet.shards[1]);
    // the fleet's view has what its journal holds (the plan's results come first)
    status_when(&fleet, "every target up to date", &[], |s| {
        s["behind"] == 0 && cohorts(s).len() == 1 && cohorts(s)[0]["applied"] == 1
    })
    .await?;
    // as pg_dump | psql would: the schema and what it holds, restored there first (a copy,
    // or the first half of a move)
    fleet.pg.psql(to, &tenant_sql(&moved, 2)).await?;
    fleet
        .pg
        .psql(
            to,
            &format!(
                "CREATE TABLE {moved}.applied_log (step text); \
                 INSERT INTO {moved}.applied_log VALUES ('001')"
            ),
        )
        .await?;
    let target = format!("{to}/{moved}");
    let failure = wait_for("the held catch-up shown", WAIT, async || {
        let f = match fleet_show(&fleet, &target).await {
            Ok(show) => show["last_failure"].clone(),
            // (not discovered there yet)
            Err(_) => Value::Null,
        };
        Ok((!f.is_null()).then_some(f))
    })
    .await?;
    let message = failure["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "tenant \"{moved}\" appeared on shard {to} while the journal of shard {from}, where it is too, holds its rows: copied, or being moved, from {from}?"
        )) && message.contains("flotilla fleet baseline"),
        "{failure}"
    );
    // then dropped where it was: the move done, nothing more happens
    fleet
        .pg
        .psql(from, &format!("DROP SCHEMA {moved} CASCADE"))
        .await?;
    status_when(&fleet, "the old place gone", &[], |s| {
        s["gone"] == serde_json::json!([format!("{from}/{moved}")])
    })
    .await?;
    // no catch-up plan ran: its log holds the one row it came with
    crate::shards::assert_logged_once(&fleet.pg, to, &moved, &["001"]).await?;
    let list = fleet.cli(&["plan", "list", "--output", "json"]).await?;
    assert!(!list.stdout.contains("catch-up-"), "{list}");
    Ok(())
}

/// A control store lost and made anew (or restored from an older backup) does not know the
/// plans the shards' journals record: `fleet status` says so, naming them, rather than count
/// the fleet up to date by the plans it knows (a tenant new since was caught up on those
/// only, and showed up to date).
#[tokio::test]
async fn fleet_status_names_the_plans_the_journals_hold_and_the_store_does_not()
-> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 2).await?;
    let (code, st, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    let s = status_when(&fleet, "the plan's rows heard", &[], |s| s["behind"] == 0).await?;
    assert_eq!(s["unknown_plans"], serde_json::json!([]), "{s:#}");

    fleet.kill_coordinator()?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", fleet.store));
    }
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    let s = status_when(&fleet, "the unknown plan named", &[], |s| {
        s["unknown_plans"] == serde_json::json!([id.clone()])
    })
    .await?;
    assert_eq!(s["completed_plans"], 0, "{s:#}");
    let out = fleet.cli(&["fleet", "status"]).await?;
    assert!(
        out.stdout.contains(&format!(
            "the shards' journals record 1 plan(s) this control store does not know ({id})"
        )),
        "{out}"
    );
    Ok(())
}

/// A plan that asks for catch-up, of one migration logging itself in each tenant's
/// `applied_log` (a second run would show), run over the fleet; its directory.
async fn logged_everywhere(fleet: &TestFleet) -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    d.migration(
        "001_log",
        "",
        "CREATE TABLE IF NOT EXISTS applied_log (step text); INSERT INTO applied_log VALUES ('001')",
        "DROP TABLE applied_log",
    )?;
    std::fs::write(
        d.path().join("plan.toml"),
        "name = \"logged\"\ncatch_up = true\n",
    )?;
    let (code, _, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    Ok(d)
}

/// Newest first, at once: `plan rollback B --wait` then `plan rollback A --wait`, as the
/// README says to undo two plans. The second was refused for "later plans" naming B, just
/// rolled back, for a second or more (the leader's copy of the journals waited for the
/// agents' reports), and `fleet status` said the fleet was at B's head meanwhile.
#[tokio::test]
async fn the_plan_before_one_just_rolled_back_rolls_back_at_once() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let (a, b) = (MigrationDir::new()?, MigrationDir::new()?);
    a.migration(
        "20250701000000_t_a",
        "",
        "CREATE TABLE t_a (x int)",
        "DROP TABLE t_a",
    )?;
    b.migration(
        "20250701000001_t_b",
        "",
        "CREATE TABLE t_b (x int)",
        "DROP TABLE t_b",
    )?;
    let mut ids = Vec::new();
    for d in [&a, &b] {
        let (code, st, out) = fleet.submit_wait(d.path(), &[]).await?;
        assert_eq!(
            (code, st["state"].as_str()),
            (0, Some("completed")),
            "{out}"
        );
        ids.push(st["plan_id"].as_str().context("plan_id")?.to_string());
    }
    let out = fleet.cli(&["plan", "rollback", &ids[1], "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = status(&fleet, &[]).await?;
    let heads: Vec<&str> = cohorts(&st)
        .iter()
        .filter_map(|c| c["head"].as_str())
        .collect();
    assert!(
        heads.iter().all(|h| !h.contains("t_b")),
        "B's head right after its rollback: {st}"
    );
    let out = fleet.cli(&["plan", "rollback", &ids[0], "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for (s, _) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            let tables: i64 = fleet
                .pg
                .query_scalar(
                    &fleet.shards[s],
                    &format!(
                        "SELECT count(*) FROM pg_tables WHERE schemaname = '{tenant}' \
                         AND tablename IN ('t_a', 't_b')"
                    ),
                )
                .await?;
            assert_eq!(tables, 0, "{tenant}");
        }
    }
    Ok(())
}

/// A plan that asked for catch-up, rolled back after a tenant that appeared got its
/// migration from a catch-up plan: refused, naming the catch-up plan (the rollback undid the
/// plan's own targets and said rolled_back, its table and the rows written since left on the
/// new tenant alone). The catch-up rolled back first, the plan rolls back, and nothing of it
/// is left anywhere.
#[tokio::test]
async fn a_rollback_that_would_leave_its_migration_on_caught_up_tenants_is_refused()
-> anyhow::Result<()> {
    let fleet = TestFleet::builder(2, 2)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    // The same migration in two plans, one per region, each asking for catch-up.
    let mut ids = Vec::new();
    for region in ["r0", "r1"] {
        let ledger = MigrationDir::new()?;
        ledger.migration(
            "014_ledger",
            "",
            "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)",
            "DROP TABLE ledger",
        )?;
        std::fs::write(
            ledger.path().join("plan.toml"),
            format!(
                "name = \"ledger {region}\"\ncatch_up = true\nselector = \"region = {region}\"\n"
            ),
        )?;
        let (code, st, out) = fleet.submit_wait(ledger.path(), &[]).await?;
        assert_eq!(code, 0, "{out}");
        ids.push(st["plan_id"].as_str().context("plan_id")?.to_string());
    }
    let plan_id = ids[0].clone();
    // A new tenant in each region: each caught up on its region's plan.
    for s in 0..2 {
        fleet
            .pg
            .psql(&fleet.shards[s], &tenant_sql(&format!("tenant_090{s}"), 1))
            .await?;
    }
    catch_up_ended(&fleet, "catch-up-shard_1/tenant_0901").await?;
    let catch_up = catch_up_ended(&fleet, "catch-up-shard_0/tenant_0900").await?;
    assert_eq!(catch_up["state"], "completed", "{catch_up}");
    let catch_up_id = catch_up["plan_id"].as_str().context("plan_id")?.to_string();
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "INSERT INTO tenant_0900.ledger VALUES (1, 10)",
        )
        .await?;

    let out = fleet.cli(&["plan", "rollback", &plan_id, "--wait"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "catch-up plan {catch_up_id}: 014_ledger on shard_0/tenant_0900"
        )) && out.stderr.contains("--ignore-later-plans"),
        "{out}"
    );
    // (the other region's catch-up is its plan's, not this one's)
    assert!(!out.stderr.contains("tenant_0901"), "{out}");
    let ledgers = async || -> anyhow::Result<i64> {
        fleet
            .pg
            .query_scalar(
                &fleet.shards[0],
                "SELECT count(*) FROM pg_tables WHERE tablename = 'ledger'",
            )
            .await
    };
    assert_eq!(ledgers().await?, 3, "nothing undone by the refusal");
    assert_eq!(fleet.status(&plan_id).await?["state"], "completed");

    let out = fleet
        .cli(&["plan", "rollback", &catch_up_id, "--wait"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet.cli(&["plan", "rollback", &plan_id, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ledgers().await?, 0);
    Ok(())
}

/// A coordinator that knows no shard (a fresh one; a script pointed at the wrong one): `fleet
/// status` and `fleet drift` exit 3 saying nothing is known. They said "0 targets" and "no
/// drift", exit 0: a fleet up to date and clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_that_knows_no_shard_says_nothing_is_known() -> anyhow::Result<()> {
    use crate::harness::{FlotillaProcess, TestDir, run_flotilla};
    let files = TestDir::new("no-shard")?;
    let store = files.join("flotilla.db").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = format!("http://{listen}");
    let coordinator = FlotillaProcess::spawn(
        &["coordinator", "--listen", &listen, "--store", &store],
        &[],
    )?;
    coordinator
        .wait_for_log("coordinator listening", WAIT)
        .await?;
    for what in [["fleet", "status"], ["fleet", "drift"]] {
        for output in ["text", "json"] {
            let mut args = vec!["--coordinator", addr.as_str()];
            args.extend(what);
            args.extend(["--output", output]);
            let out = run_flotilla(&args, &[]).await?;
            assert_eq!(out.code(), Some(3), "{what:?} {output}: {out}");
            assert!(
                out.stderr.contains("this coordinator knows no shard"),
                "{what:?} {output}: {out}"
            );
            if output == "json" {
                let v: Value = serde_json::from_str(out.stdout.trim())?;
                assert_eq!(v["known_shards"], 0, "{v}");
            }
        }
    }
    Ok(())
}
