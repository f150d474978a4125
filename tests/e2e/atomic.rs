//! Issue 3: atomic commit across shards (two-phase commit), with real etcd and
//! real PostgreSQL, and faults injected at the protocol's steps.
use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, WAIT, coord_dbmate_dir};
use crate::ha::HaFleet;
use crate::harness::{wait_for, wait_until};
use crate::shards::{
    assert_fences_not_back, fences, hold, logged_blocking_migration, prepared, release,
};
use flotilla_testkit::wait::fatal;

/// Every fleet of this suite runs its agents as the role of deploy/sql/agent-role.sql: two-phase
/// commit and its recovery must work with no more than that.
async fn least_privileged(
    coordinators: usize,
    shards: usize,
    tenants: usize,
) -> anyhow::Result<HaFleet> {
    HaFleet::builder(coordinators, shards, tenants)
        .least_privilege()
        .start()
        .await
}

/// Submits COORD-2025-001 as an atomic plan without waiting; returns its id.
async fn submit_atomic(fleet: &HaFleet) -> anyhow::Result<String> {
    fleet.submit(&coord_dbmate_dir(), &["--atomic"]).await
}

/// A two-shard fleet (agents given `agent_args`) and the atomic plan submitted to it, whose
/// shard_1 agent exits as it is told to commit (failpoint, exit 88), shard_0 committed: the
/// fleet and the plan's id.
async fn shard_1_gone_at_its_commit(agent_args: &[&str]) -> anyhow::Result<(HaFleet, String)> {
    let mut fleet = HaFleet::builder(1, 2, 2)
        .least_privilege()
        .agent_args(agent_args)
        .agent_env(1, "FAILPOINTS", "agent::before_commit_prepared=return")
        .start()
        .await?;
    let id = submit_atomic(&fleet).await?;
    let exit = fleet.agents[1]
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends shard_1's agent as it is told to commit");
    assert_eq!(exit.code(), Some(88));
    wait_until("shard_0 committed", WAIT, async || {
        Ok(satisfaction_columns(&fleet, "shard_0").await? == 4)
    })
    .await?;
    Ok((fleet, id))
}

/// Restarts the (one) coordinator of a two-shard fleet with the `before_decision` failpoint
/// and submits the atomic plan: the coordinator exits (86) with every target prepared and
/// no decision written. The plan's id.
async fn submit_atomic_and_die_before_the_decision(fleet: &mut HaFleet) -> anyhow::Result<String> {
    submit_atomic_and_die_at(fleet, "coordinator::before_decision", 86).await
}

/// Restarts the (one) coordinator of a two-shard fleet with `failpoint` returning and submits
/// the atomic plan: the coordinator exits with `code` there. The plan's id.
async fn submit_atomic_and_die_at(
    fleet: &mut HaFleet,
    failpoint: &str,
    code: i32,
) -> anyhow::Result<String> {
    let failpoints = format!("{failpoint}=return");
    fleet
        .restart_coordinator_with(0, &[("FAILPOINTS", failpoints.as_str())])
        .await?;
    fleet.wait_connected(2).await?;
    let id = submit_atomic(fleet).await?;
    let status = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends it");
    assert_eq!(status.code(), Some(code));
    Ok(id)
}

async fn assert_none_prepared(fleet: &HaFleet, shards: usize) -> anyhow::Result<()> {
    for s in 0..shards {
        assert_eq!(
            prepared(&fleet.pg, s).await?,
            0,
            "shard_{s} holds a Flotilla prepared transaction"
        );
    }
    Ok(())
}

/// A refused plan leaves nothing in the store: `plan list` is empty.
pub(crate) async fn assert_no_plan_stored(fleet: &HaFleet) -> anyhow::Result<()> {
    let plans = fleet.cli(&["plan", "list", "--output", "json"]).await?;
    let plans: serde_json::Value = serde_json::from_str(plans.stdout.trim())?;
    assert_eq!(
        plans.as_array().map(Vec::len),
        Some(0),
        "nothing stored: {plans}"
    );
    Ok(())
}

async fn satisfaction_columns(fleet: &HaFleet, db: &str) -> anyhow::Result<i64> {
    satisfaction_columns_on(&fleet.pg, db).await
}

async fn satisfaction_columns_on(
    pg: &flotilla_testkit::PgCluster,
    db: &str,
) -> anyhow::Result<i64> {
    pg.query_scalar(
        db,
        "SELECT count(*) FROM information_schema.columns WHERE column_name = 'satisfaction_rating'
           AND table_name IN ('work_orders', 'repair_orders')",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_plan_commits_on_every_shard_at_once() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 3, 2).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan", "submit", &dir, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(st["state"], "completed", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("committed atomically"),
        "{st}"
    );
    // The agents' timestamps give the two-phase figures (issue 15): the decision's legs and
    // each of the 6 targets' PREPARE -> COMMIT PREPARED.
    let message = st["message"].as_str().unwrap();
    for part in [
        "first PREPARE to last COMMIT PREPARED: ",
        "last PREPARE to decision ",
        "decision to last COMMIT PREPARED ",
        "each target's PREPARE to COMMIT PREPARED: median ",
        "over 6 targets",
    ] {
        assert!(message.contains(part), "no `{part}` in: {message}");
    }
    for s in 0..3 {
        let db = format!("shard_{s}");
        // 2 tenants x 2 tables.
        assert_eq!(satisfaction_columns(&fleet, &db).await?, 4, "{db}");
        assert_eq!(fleet.journal_rows(s).await?, 6, "{db}");
    }
    assert_none_prepared(&fleet, 3).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_target_aborts_every_prepared_transaction() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 3, 2).await?;
    fleet
        .pg
        .psql(
            "shard_2",
            "ALTER TABLE tenant_0005.repair_orders ADD COLUMN satisfaction_comments text",
        )
        .await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan", "submit", &dir, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    for s in 0..3 {
        let db = format!("shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &db).await?,
            0,
            "{db}: nothing committed"
        );
        assert_eq!(fleet.journal_rows(s).await?, 0, "{db}");
    }
    assert_none_prepared(&fleet, 3).await
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_before_the_decision_means_abort_everywhere() -> anyhow::Result<()> {
    let mut fleet = least_privileged(1, 2, 2).await?;
    let epochs = fences(&fleet.pg, 2).await?;
    // Restart the coordinator with a failpoint: it exits with every target
    // prepared and no decision written.
    let id = submit_atomic_and_die_before_the_decision(&mut fleet).await?;
    // Every target is prepared, nothing committed.
    for s in 0..2 {
        let gids = fleet
            .pg
            .query_rows(
                &format!("shard_{s}"),
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'flotilla:%' AND database = current_database() ORDER BY 1",
            )
            .await?;
        assert_eq!(
            gids.len(),
            2,
            "shard_{s}: both tenants prepared, once: {gids:?}"
        );
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    // A new coordinator finds no decision: it presumes abort.
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    assert_fences_not_back(&fleet.pg, &epochs).await?;
    assert_none_prepared(&fleet, 2).await
}

/// A rollback asked of a plan the new leader has not taken over yet (still `running` in the
/// control store, its atomic unit prepared on every shard, no decision) is refused, naming
/// why: rebuilt from the store as completed, its rollback would pass over the presumed
/// abort, and the prepared transactions would stay. Once the leader takes the plan over,
/// it ends rolled back with nothing prepared.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_before_the_leader_takes_the_plan_over_is_refused() -> anyhow::Result<()> {
    let mut fleet = least_privileged(1, 2, 2).await?;
    let id = submit_atomic_and_die_before_the_decision(&mut fleet).await?;
    // a leader that cannot take its unfinished plans over yet
    let c = fleet.spawn_coordinator_with(
        0,
        &[("FAILPOINTS", "coordinator::resume_unfinished=return")],
    )?;
    c.wait_for_log("cannot continue unfinished plans yet", WAIT)
        .await?;
    fleet.coordinators[0] = Some(c);
    let out = fleet.cli(&["plan", "rollback", &id]).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr
            .contains(&format!("plan {id} is running in the control store"))
            && out
                .stderr
                .contains("not taken over by this coordinator yet"),
        "{out}"
    );
    assert_eq!(satisfaction_columns(&fleet, "shard_0").await?, 0);
    // the leader takes it over (presumed abort) and it ends rolled back
    fleet.restart_coordinator_with(0, &[]).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert_none_prepared(&fleet, 2).await
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_the_commit_decision_means_every_shard_commits()
-> anyhow::Result<()> {
    let mut fleet = least_privileged(1, 2, 2).await?;
    let epochs = fences(&fleet.pg, 2).await?;
    let id = submit_atomic_and_die_at(&mut fleet, "coordinator::after_decision", 87).await?;
    // The decision is in etcd: agents commit by themselves (they read it), and a
    // new coordinator finishes the plan.
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            4,
            "shard_{s} committed"
        );
    }
    assert_fences_not_back(&fleet.pg, &epochs).await?;
    assert_none_prepared(&fleet, 2).await
}

/// An atomic COORD-2025-001 submitted to the fleet's coordinator (without etcd), which
/// dies right after writing its commit decision (failpoint, exit 87): the plan's id.
async fn died_after_the_commit_decision(
    fleet: &mut crate::fleet::TestFleet,
) -> anyhow::Result<String> {
    fleet
        .restart_coordinator_with(&[("FAILPOINTS", "coordinator::after_decision=return")])
        .await?;
    fleet.wait_attached(2).await?;
    let id = fleet.submit(&coord_dbmate_dir(), &["--atomic"]).await?;
    let status = fleet
        .coordinator
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends it");
    assert_eq!(status.code(), Some(87));
    Ok(id)
}

/// The plan `id` watched to its end: completed, committed on both shards, nothing left
/// prepared.
async fn assert_committed_on_both_shards(
    fleet: &crate::fleet::TestFleet,
    id: &str,
) -> anyhow::Result<()> {
    let (out, st) = fleet.watch(id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns_on(&fleet.pg, &format!("shard_{s}")).await?,
            4,
            "shard_{s} committed"
        );
        assert_eq!(prepared(&fleet.pg, s).await?, 0, "shard_{s}");
    }
    Ok(())
}

/// A coordinator without etcd that dies right after its commit decision: the next one
/// (on the same control store) finds the decision there and every shard commits. Before,
/// its decisions were in its memory only: the next one presumed abort, and a shard that
/// had committed in the meantime was undone by its down SQL.
#[tokio::test(flavor = "multi_thread")]
async fn without_etcd_a_commit_decision_outlives_its_coordinator() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::start(2, 2).await?;
    let id = died_after_the_commit_decision(&mut fleet).await?;
    fleet.restart_coordinator().await?;
    assert_committed_on_both_shards(&fleet, &id).await
}

/// The same plan left committing by a coordinator of a version that kept its decisions in
/// memory (schema 5: no `decisions` table, the plan stored `committing`): the coordinator
/// that upgrades the store goes on with the commit. Before, it presumed abort and undid by
/// down SQL what shards had committed (an upgrade in the middle of a commit).
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_left_committing_by_an_older_coordinator_commits_after_the_upgrade()
-> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    let mut fleet = crate::fleet::TestFleet::start(2, 2).await?;
    let id = died_after_the_commit_decision(&mut fleet).await?;
    // the store as a coordinator of version 5 left it
    let mut store = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&fleet.store)
        .connect()
        .await?;
    for sql in [
        &format!("UPDATE plans SET state = 'committing' WHERE id = '{id}'"),
        "DROP TABLE decisions",
        "UPDATE flotilla_meta SET value = '5' WHERE key = 'schema_version'",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut store)
            .await?;
    }
    drop(store);
    fleet.restart_coordinator().await?;
    assert_committed_on_both_shards(&fleet, &id).await
}

/// Two shards whose atomic plan's coordinator died with every target prepared, before
/// (exit 86) or after (87) writing the decision, shard_1's agent not listing its prepared
/// transactions while `dir/unlisted` exists (failpoint `agent::in_doubt_unlisted`; no sweep),
/// and a new coordinator up that heard it say so. The fleet, the plan and the dir.
async fn unlisted_after(exit: i32) -> anyhow::Result<(HaFleet, String, flotilla_testkit::TestDir)> {
    let dir = flotilla_testkit::TestDir::new("unlisted")?;
    let unlisted = dir.path().join("unlisted");
    let failpoints = format!("agent::in_doubt_unlisted=return({})", unlisted.display());
    let mut fleet = HaFleet::builder(1, 2, 2)
        .least_privilege()
        // no sweep within the test: only an attach resolves
        .agent_args(&["--in-doubt-sweep", "1h"])
        .agent_env(1, "FAILPOINTS", &failpoints)
        .start()
        .await?;
    std::fs::write(&unlisted, "")?;
    let failpoint = if exit == 86 {
        "coordinator::before_decision"
    } else {
        "coordinator::after_decision"
    };
    let id = submit_atomic_and_die_at(&mut fleet, failpoint, exit).await?;
    assert!(prepared(&fleet.pg, 1).await? > 0, "shard_1 prepared");
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    c.wait_for_log("could not list its shard's prepared transactions", WAIT)
        .await?;
    fleet.coordinators[0] = Some(c);
    Ok((fleet, id, dir))
}

/// An agent that cannot list its shard's prepared transactions when it attaches (its scan
/// failed or ran out of time) says so in its Hello. Before, it sent an empty list, which a
/// new leader read as "nothing prepared there": it settled the shard's part as committed
/// and the plan ended completed, its locks released, while the shard's transactions were
/// still prepared (holding their locks, and with no coordinator to report them if that
/// database was lost). Now the plan stays committing until the agent lists them.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_settles_no_shard_whose_prepared_transactions_are_unlisted()
-> anyhow::Result<()> {
    let (fleet, id, dir) = unlisted_after(87).await?;
    let unlisted = dir.path().join("unlisted");
    wait_until("shard_0 committed", WAIT, async || {
        Ok(satisfaction_columns(&fleet, "shard_0").await? == 4)
    })
    .await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "committing", "{st}");
    assert!(prepared(&fleet.pg, 1).await? > 0, "shard_1 still prepared");

    std::fs::remove_file(&unlisted)?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // completed only once shard_1 committed too
    assert_none_prepared(&fleet, 2).await?;
    assert_eq!(satisfaction_columns(&fleet, "shard_1").await?, 4);
    Ok(())
}

/// The same under a presumed abort (the leader died with every target prepared and no
/// decision): the plan stays aborting, its locks held, until the shard that could not list
/// its prepared transactions lists them (and rolls them back). Before, the new leader took
/// the empty list for "nothing there", rolled the plan back and released its locks while
/// that shard's transaction was still prepared.
#[tokio::test(flavor = "multi_thread")]
async fn a_presumed_abort_waits_for_a_shard_whose_prepared_transactions_are_unlisted()
-> anyhow::Result<()> {
    let (fleet, id, dir) = unlisted_after(86).await?;
    let unlisted = dir.path().join("unlisted");
    wait_until("shard_0 rolled back", WAIT, async || {
        Ok(prepared(&fleet.pg, 0).await? == 0)
    })
    .await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "aborting", "{st}");
    assert!(prepared(&fleet.pg, 1).await? > 0, "shard_1 still prepared");

    std::fs::remove_file(&unlisted)?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(1), "rolled back: {out}");
    assert_none_prepared(&fleet, 2).await?;
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    Ok(())
}

/// An atomic unit whose step on a target waits for a transactional step of the unit but
/// cannot share its prepared transaction (here an index built CONCURRENTLY on the unit's
/// new table) is refused at submit, naming both and why, with nothing stored. Before, it
/// was taken, and could never succeed: the index step ran outside the prepared transaction
/// and did not see the table (the unit aborted every time).
#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_unit_that_splits_its_transaction_is_refused() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 1, 1).await?;
    let dir = crate::fleet::MigrationDir::new()?;
    dir.migration("001_t", "", "CREATE TABLE t (id int)", "DROP TABLE t")?;
    dir.migration(
        "002_idx",
        "depends_on = [\"001_t\"]\n",
        "CREATE INDEX CONCURRENTLY t_id ON t (id)",
        "DROP INDEX CONCURRENTLY t_id",
    )?;
    let p = dir.path().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &p, "--atomic"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    // (said by the lint's atomic-unit-split, as `plan lint` says it offline)
    assert!(
        out.stderr.contains("atomic-unit-split")
            && out.stderr.contains(
                "002_idx migration.toml: depends on `001_t` in the same atomic unit, but it cannot run in a transaction"
            ),
        "{out}"
    );
    let lint = fleet.cli(&["plan", "lint", &p, "--atomic"]).await?;
    assert_eq!(lint.code(), Some(1), "{lint}");
    assert!(lint.stdout.contains("atomic-unit-split"), "{lint}");
    assert_no_plan_stored(&fleet).await
}

/// One shard of `tenants` tenants whose server has `max_prepared_transactions = max`
/// (restarted with it), and an atomic submit of COORD-2025-001 on it.
async fn atomic_submit_with_max_prepared(
    tenants: usize,
    max: u32,
) -> anyhow::Result<(HaFleet, crate::harness::CommandOutput)> {
    atomic_submit_on_shards_with_max_prepared(1, tenants, max).await
}

/// `shards` shard databases of `tenants` tenants each, all on one server with
/// `max_prepared_transactions = max`, and an atomic submit of COORD-2025-001 on them.
async fn atomic_submit_on_shards_with_max_prepared(
    shards: usize,
    tenants: usize,
    max: u32,
) -> anyhow::Result<(HaFleet, crate::harness::CommandOutput)> {
    let mut fleet = least_privileged(1, shards, tenants).await?;
    fleet
        .pg
        .psql(
            "postgres",
            &format!("ALTER SYSTEM SET max_prepared_transactions = {max}"),
        )
        .await?;
    fleet.pg.restart().await?;
    fleet.wait_connected(shards).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &dir, "--atomic", "--wait"])
        .await?;
    Ok((fleet, out))
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_a_shard_without_prepared_transactions() -> anyhow::Result<()> {
    // The shard's server cannot prepare: the plan is refused before any change.
    let (fleet, out) = atomic_submit_with_max_prepared(1, 0).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("max_prepared_transactions") && out.stderr.contains("shard_0"),
        "{out}"
    );
    assert_eq!(satisfaction_columns(&fleet, "shard_0").await?, 0);
    Ok(())
}

/// An atomic plan prepares one transaction per target on a shard at once: a server whose
/// max_prepared_transactions cannot hold them refuses the plan before anything runs, naming
/// the setting and the number it needs (issue 15: 2,500 tenants on one server need 2,500).
#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_more_targets_than_the_server_can_hold_prepared() -> anyhow::Result<()> {
    let (fleet, out) = atomic_submit_with_max_prepared(4, 3).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    for part in [
        "shard shard_0: the plan prepares 4 transactions there at once",
        "max_prepared_transactions = 3 with 0 prepared now",
        "at least 4",
    ] {
        assert!(out.stderr.contains(part), "no `{part}` in: {out}");
    }
    assert_eq!(satisfaction_columns(&fleet, "shard_0").await?, 0);
    assert_no_plan_stored(&fleet).await?;
    assert_none_prepared(&fleet, 1).await
}

/// Shard databases on one server share its max_prepared_transactions: two shards of 3
/// tenants each fit alone in 4, but their 6 prepared targets do not, and the plan is
/// refused before anything runs, naming both shards, the count of each, and the number the
/// server needs (issue 15: 4 x 2,500 tenants on one server need 10,000).
#[tokio::test(flavor = "multi_thread")]
async fn preflight_adds_up_the_prepared_targets_of_shards_on_one_server() -> anyhow::Result<()> {
    let (fleet, out) = atomic_submit_on_shards_with_max_prepared(2, 3, 4).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    for part in [
        "shards shard_0, shard_1 (databases of one server): the plan prepares 6 transactions there at once (one per target; shard_0 3, shard_1 3)",
        "max_prepared_transactions = 4 with 0 prepared now",
        "at least 6",
    ] {
        assert!(out.stderr.contains(part), "no `{part}` in: {out}");
    }
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    assert_no_plan_stored(&fleet).await?;
    assert_none_prepared(&fleet, 2).await
}

/// A plan file over COORD-2025-001 whose two parallel groups each commit
/// atomically: the two table changes, then the view over them.
fn grouped_plan() -> anyhow::Result<crate::harness::TestDir> {
    grouped_plan_with(true)
}

/// The same, the view's group atomic or not.
fn grouped_plan_with(view_atomic: bool) -> anyhow::Result<crate::harness::TestDir> {
    let dir = crate::harness::TestDir::new("grouped-plan")?;
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            r#"name = "grouped"
migrations_dir = "{}"
parallel_groups = [
  {{ migrations = ["20250131160000_hs_satisfaction_tracking", "20250131160001_auto_satisfaction_tracking"], atomic = true }},
  {{ migrations = ["20250131160002_unified_satisfaction_view"], atomic = {view_atomic} }},
]
"#,
            coord_dbmate_dir().display()
        ),
    )?;
    Ok(dir)
}

async fn views(fleet: &HaFleet, db: &str) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            db,
            "SELECT count(*) FROM information_schema.views WHERE table_name = 'unified_satisfaction'",
        )
        .await
}

async fn submit_grouped(fleet: &HaFleet, plan: &crate::harness::TestDir) -> anyhow::Result<String> {
    fleet.submit(&plan.join("plan.toml"), &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn atomic_parallel_groups_commit_one_after_the_other() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 3, 2).await?;
    let plan = grouped_plan()?;
    let id = submit_grouped(&fleet, &plan).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    for s in 0..3 {
        let db = format!("shard_{s}");
        assert_eq!(satisfaction_columns(&fleet, &db).await?, 4, "{db}");
        assert_eq!(views(&fleet, &db).await?, 2, "{db}");
    }
    // One decision per group, both commit; the plan itself has none.
    for (unit, want) in [
        (format!("{id}.g1"), "commit"),
        (format!("{id}.g2"), "commit"),
    ] {
        assert_eq!(
            crate::faults::decision_in_etcd(&fleet, &unit)
                .await?
                .as_deref(),
            Some(want),
            "{unit}"
        );
    }
    assert_eq!(crate::faults::decision_in_etcd(&fleet, &id).await?, None);
    assert_none_prepared(&fleet, 3).await
}

/// An atomic group followed by one that is not: the atomic group still commits by its
/// decision. Its steps were fused with the view's into one run that was not prepared, so
/// they committed target by target with no decision at all ("nothing to prepare").
#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_group_before_a_plain_one_commits_by_its_decision() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 2, 2).await?;
    let plan = grouped_plan_with(false)?;
    let id = submit_grouped(&fleet, &plan).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(satisfaction_columns(&fleet, &db).await?, 4, "{db}");
        assert_eq!(views(&fleet, &db).await?, 2, "{db}");
    }
    assert_eq!(
        crate::faults::decision_in_etcd(&fleet, &format!("{id}.g1"))
            .await?
            .as_deref(),
        Some("commit"),
        "the atomic group's decision"
    );
    assert_eq!(
        crate::faults::decision_in_etcd(&fleet, &format!("{id}.g2")).await?,
        None,
        "the plain group has none"
    );
    assert_none_prepared(&fleet, 2).await
}

/// Both groups atomic, and after it a plain one, at `--max-parallel 1` over 2 shards: each
/// unit prepares on both shards (the lane of a shard whose targets prepared goes to the
/// other) and commits. Before, the first shard to prepare kept the one lane for its next
/// group's steps, which wait for the unit's commit, and the other shard never got one: the
/// plan stalled for good, its prepared targets holding their locks.
#[tokio::test(flavor = "multi_thread")]
async fn group_atomic_units_over_fewer_lanes_than_shards_commit() -> anyhow::Result<()> {
    let fleet = least_privileged(1, 2, 2).await?;
    let plan = grouped_plan()?;
    let id = fleet
        .submit(&plan.join("plan.toml"), &["--max-parallel", "1"])
        .await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    // its end names both groups (it said only the last one's commit)
    assert!(
        st["message"].as_str().is_some_and(|m| m
            .starts_with("every step applied, 2 atomic groups each committed atomically; the last: parallel group 2")),
        "{st}"
    );
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(satisfaction_columns(&fleet, &db).await?, 4, "{db}");
        assert_eq!(views(&fleet, &db).await?, 2, "{db}");
    }
    assert_none_prepared(&fleet, 2).await
}

/// A group-atomic plan whose last unit committed on every shard, stored with its steps
/// applied but its state still `committing` (its leader died between the two writes): the
/// next leader finishes it completed. Before, it took "not running, no unit left" for a
/// rollback under way and undid every applied step: a plan that applied everywhere ended
/// rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_left_committing_with_every_unit_applied_completes() -> anyhow::Result<()> {
    let mut fleet = least_privileged(1, 2, 2).await?;
    let plan = grouped_plan()?;
    let id = submit_grouped(&fleet, &plan).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    // the store as a leader that died before its last state write left it
    if let Some(mut c) = fleet.coordinators[0].take() {
        c.kill()?;
        fleet.retired.push(c);
    }
    fleet
        .pg
        .psql(
            "control",
            &format!("UPDATE plans SET state = 'committing' WHERE id = '{id}'"),
        )
        .await?;
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &db).await?,
            4,
            "{db}: not undone"
        );
        assert_eq!(views(&fleet, &db).await?, 2, "{db}: not undone");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_in_a_later_atomic_group_undoes_the_groups_that_committed() -> anyhow::Result<()>
{
    let fleet = least_privileged(1, 3, 2).await?;
    // The view cannot be created in one tenant: group 2 fails there.
    fleet
        .pg
        .psql(
            "shard_2",
            "CREATE TABLE tenant_0005.unified_satisfaction (x int)",
        )
        .await?;
    let plan = grouped_plan()?;
    let id = submit_grouped(&fleet, &plan).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    let failure = &st["failures"][0];
    assert_eq!(failure["tenant"], "tenant_0005", "{st}");
    // its message says group 1 committed and was undone (it said "no target commits"), in
    // the past: the plan has ended (it said "aborting" to the end)
    assert!(
        st["message"].as_str().is_some_and(|m| m.contains(
            "aborted parallel group 2: no target of it committed, and what the groups before it committed was undone"
        )),
        "{st}"
    );
    for s in 0..3 {
        let db = format!("shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &db).await?,
            0,
            "{db}: group 1 committed, then was undone"
        );
        assert_eq!(views(&fleet, &db).await?, 0, "{db}");
        assert_eq!(fleet.journal_rows(s).await?, 0, "{db}");
    }
    assert_eq!(
        crate::faults::decision_in_etcd(&fleet, &format!("{id}.g1"))
            .await?
            .as_deref(),
        Some("commit")
    );
    assert_eq!(
        crate::faults::decision_in_etcd(&fleet, &format!("{id}.g2"))
            .await?
            .as_deref(),
        Some("abort")
    );
    assert_none_prepared(&fleet, 3).await
}

/// Group 1 of the grouped plan committed on 2 shards x 2 tenants, group 2 prepared in
/// every tenant, and the coordinator dead (exit 86) before group 2's decision: the fleet,
/// the plan and the shards' fences before it.
async fn died_before_the_second_groups_decision() -> anyhow::Result<(HaFleet, String, Vec<i64>)> {
    let mut fleet = least_privileged(1, 2, 2).await?;
    let epochs = fences(&fleet.pg, 2).await?;
    // The first decision (group 1) goes through; the second ends the process.
    fleet
        .restart_coordinator_with(
            0,
            &[("FAILPOINTS", "coordinator::before_decision=1*off->return")],
        )
        .await?;
    fleet.wait_connected(2).await?;
    let plan = grouped_plan()?;
    let id = submit_grouped(&fleet, &plan).await?;
    let status = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends it");
    assert_eq!(status.code(), Some(86));
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &db).await?,
            4,
            "{db}: group 1 committed"
        );
        assert_eq!(
            prepared(&fleet.pg, s).await?,
            2,
            "{db}: group 2 prepared in both tenants"
        );
    }
    Ok((fleet, id, epochs))
}

/// The coordinator dies with group 2 prepared everywhere and no decision for it
/// (group 1 committed): a new leader presumes abort for group 2 and undoes group 1.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_before_a_groups_decision_aborts_it_and_undoes_the_rest()
-> anyhow::Result<()> {
    let (mut fleet, id, epochs) = died_before_the_second_groups_decision().await?;
    aborted_by_the_next_leader(&mut fleet, &id, &epochs).await
}

/// The same, the store holding group 1's `committing` (the plan's `running` after it not
/// stored: a store write given up), group 2's steps stored prepared on shard_0 and not on
/// shard_1 (its targets still running when the leader died). A new leader presumes abort
/// for group 2. Before, "stored committing, its unit under way" made it write commit for
/// group 2, whose targets had not all prepared.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_committing_does_not_commit_a_unit_half_prepared() -> anyhow::Result<()> {
    let (mut fleet, id, epochs) = died_before_the_second_groups_decision().await?;
    let g2 = "20250131160002_unified_satisfaction_view";
    for sql in [
        format!("UPDATE plans SET state = 'committing' WHERE id = '{id}'"),
        format!(
            "UPDATE steps SET state = 'prepared' WHERE plan_id = '{id}' AND migration_id = '{g2}' AND shard = 'shard_0'"
        ),
        format!(
            "UPDATE steps SET state = 'pending' WHERE plan_id = '{id}' AND migration_id = '{g2}' AND shard = 'shard_1'"
        ),
    ] {
        fleet.pg.psql("control", &sql).await?;
    }
    let prepared_rows: i64 = fleet
        .pg
        .query_scalar(
            "control",
            &format!("SELECT count(*) FROM steps WHERE plan_id = '{id}' AND state = 'prepared'"),
        )
        .await?;
    assert_eq!(prepared_rows, 2, "group 2 stored prepared on shard_0 only");
    aborted_by_the_next_leader(&mut fleet, &id, &epochs).await
}

/// A new leader started on the fleet [`died_before_the_second_groups_decision`] left:
/// group 2 aborted (its decision in etcd), group 1 undone, nothing left prepared.
async fn aborted_by_the_next_leader(
    fleet: &mut HaFleet,
    id: &str,
    epochs: &[i64],
) -> anyhow::Result<()> {
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let (out, st) = fleet.watch(id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(satisfaction_columns(fleet, &db).await?, 0, "{db}");
        assert_eq!(views(fleet, &db).await?, 0, "{db}");
    }
    assert_eq!(
        crate::faults::decision_in_etcd(fleet, &format!("{id}.g2"))
            .await?
            .as_deref(),
        Some("abort")
    );
    assert_fences_not_back(&fleet.pg, epochs).await?;
    assert_none_prepared(fleet, 2).await
}

/// `plan forget-shard ID --shard SHARD` with `more` flags.
async fn forget(
    fleet: &HaFleet,
    id: &str,
    shard: &str,
    more: &[&str],
) -> anyhow::Result<crate::harness::CommandOutput> {
    let mut args = vec!["plan", "forget-shard", id, "--shard", shard];
    args.extend_from_slice(more);
    fleet.cli(&args).await
}

/// A shard whose agent dies as it is told to commit, and does not come back: the plan stays
/// `committing` with its locks held (a cancel is refused naming the shard) until an admin
/// forgets the shard (`plan forget-shard`, refused without a reason, for a shard the plan
/// does not have, and while the agent's liveness key is in etcd). The plan then ends failed,
/// its failures and the audit trail saying who forgot which shard and why, its locks
/// released, the other shard committed. The forgotten shard's transactions stay prepared;
/// its agent, back, commits them from the decision in etcd.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_gone_while_committing_is_forgotten_and_commits_when_back() -> anyhow::Result<()> {
    let (mut fleet, id) = shard_1_gone_at_its_commit(&["--lease-ttl", "2s"]).await?;
    assert!(prepared(&fleet.pg, 1).await? > 0, "shard_1 left prepared");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "committing", "{st}");
    let out = fleet.cli(&["plan", "cancel", &id]).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("not yet committed on shard_1"), "{out}");
    // breaking the shard's lock is refused too, saying what ends it (it said to cancel the
    // plan, which is refused)
    let out = fleet
        .cli(&["locks", "break", "shard_1", "--reason", "stuck"])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr
            .contains("its lock goes when it ends: wait for its commit to end")
            && out.stderr.contains("`plan forget-shard`"),
        "{out}"
    );

    let out = forget(&fleet, &id, "shard_1", &[]).await?;
    assert_eq!(out.code(), Some(2), "no reason: {out}");
    let out = forget(&fleet, &id, "shard_9", &["--reason", "x"]).await?;
    assert!(out.stderr.contains("no target on shard `shard_9`"), "{out}");
    // Until the coordinator sees shard_1's liveness key expire (2 s), it is refused.
    let out = wait_for("shard_1 forgotten", WAIT, async || {
        let out = forget(
            &fleet,
            &id,
            "shard_1",
            &[
                "--reason",
                "its database is lost",
                "--as",
                "operator",
                "--wait",
                "--output",
                "json",
            ],
        )
        .await?;
        if out.code() == Some(0) {
            return Ok(Some(out));
        }
        if !out.stderr.contains("the agent of shard shard_1 is") {
            return Err(fatal(anyhow::anyhow!("refused otherwise: {out}")));
        }
        Ok(None)
    })
    .await?;
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(st["state"], "failed", "{st}");
    let message = st["message"].as_str().unwrap();
    assert!(
        message.contains("the plan committed on 1 of 2 shards; not confirmed on shard_1"),
        "{message}"
    );
    let failures = st["failures"].as_array().unwrap();
    assert!(!failures.is_empty(), "{st}");
    for f in failures {
        assert_eq!(f["shard"], "shard_1", "{f}");
        assert!(
            f["message"]
                .as_str()
                .unwrap()
                .contains("forgotten by operator (its database is lost)"),
            "{f}"
        );
    }
    let audit = fleet
        .json(&["audit", "list", "--plan", &id, "--output", "json"])
        .await?;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "forget-shard"
                && e["detail"] == "shard shard_1: its database is lost"),
        "{audit}"
    );
    wait_until("the plan's locks released", WAIT, async || {
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(locks["locks"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    assert_eq!(satisfaction_columns(&fleet, "shard_1").await?, 0);
    assert!(prepared(&fleet.pg, 1).await? > 0, "still prepared");

    // The shard comes back after all: its agent commits from the decision in etcd.
    fleet.restart_agent(1)?;
    wait_until("shard_1 committed from the decision", WAIT, async || {
        Ok(prepared(&fleet.pg, 1).await? == 0)
    })
    .await?;
    assert_eq!(satisfaction_columns(&fleet, "shard_1").await?, 4);
    // a plan that ended is not forgotten again, nor retried
    let out = forget(&fleet, &id, "shard_1", &["--reason", "x"]).await?;
    assert!(out.stderr.contains("is failed, not committing"), "{out}");
    let out = fleet.cli(&["plan", "retry", &id]).await?;
    assert!(
        out.stderr
            .contains("commits atomically and its decisions stand"),
        "{out}"
    );
    Ok(())
}

/// A forgotten shard whose agent comes back while another shard still holds the plan
/// `committing`: its agent commits from the decision in etcd, the forget is undone (its
/// failures gone), and once the last shard commits too the plan ends completed, every
/// shard committed, where it ended failed with the shard "not confirmed".
#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_shard_back_before_the_plan_ended_completes_it() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(1, 3, 2)
        .least_privilege()
        .agent_args(&["--lease-ttl", "2s"])
        .agent_env(1, "FAILPOINTS", "agent::before_commit_prepared=return")
        .agent_env(2, "FAILPOINTS", "agent::before_commit_prepared=return")
        .start()
        .await?;
    let id = submit_atomic(&fleet).await?;
    for s in [1, 2] {
        let exit = fleet.agents[s]
            .wait_exit(WAIT)
            .await
            .expect("the failpoint ends the agent as it is told to commit");
        assert_eq!(exit.code(), Some(88));
    }
    wait_until("shard_0 committed", WAIT, async || {
        Ok(satisfaction_columns(&fleet, "shard_0").await? == 4)
    })
    .await?;
    wait_for("shard_1 forgotten", WAIT, async || {
        let out = forget(&fleet, &id, "shard_1", &["--reason", "gone"]).await?;
        if out.code() == Some(0) {
            return Ok(Some(()));
        }
        if !out.stderr.contains("the agent of shard shard_1 is") {
            return Err(fatal(anyhow::anyhow!("refused otherwise: {out}")));
        }
        Ok(None)
    })
    .await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "committing", "shard_2 still to commit: {st}");
    assert!(
        st["failures"].as_array().is_some_and(|f| !f.is_empty()),
        "{st}"
    );

    fleet.restart_agent(1)?;
    wait_until("shard_1 back and committed", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok(prepared(&fleet.pg, 1).await? == 0
            && st["failures"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    assert_eq!(satisfaction_columns(&fleet, "shard_1").await?, 4);
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "committing", "shard_2 still to commit: {st}");

    fleet.restart_agent(2)?;
    let st = wait_for("the plan ended", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok((st["state"] != "committing").then_some(st))
    })
    .await?;
    assert_eq!(st["state"], "completed", "{st}");
    assert!(st["failures"].as_array().is_some_and(Vec::is_empty), "{st}");
    for s in 0..3 {
        assert_eq!(prepared(&fleet.pg, s).await?, 0, "shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            4,
            "shard_{s}"
        );
    }
    Ok(())
}

/// A plan stored committing whose decision is lost from etcd (its data wiped, or restored
/// from a snapshot older than the decision), one shard's agent away before it committed:
/// the next leader writes the commit decision again, and the plan completes committed on
/// both shards. Before, it presumed abort, and undid by down SQL the shard that had
/// committed (a plan said committed atomically, half-migrated where a down SQL failed).
#[tokio::test(flavor = "multi_thread")]
async fn a_committing_plan_whose_decision_etcd_lost_still_commits() -> anyhow::Result<()> {
    decision_lost_while_committing(true, "its commit decision is written again").await
}

/// An atomic plan committing, shard_1's agent gone as it was told to commit (a failpoint),
/// shard_0 committed; its decision is then deleted from etcd, as etcd's data lost would
/// (and the coordinator restarted, with `new_leader`), and shard_1's agent comes back: the
/// plan completes committed on both shards, the coordinator's log saying `said`, nothing
/// left prepared.
async fn decision_lost_while_committing(new_leader: bool, said: &str) -> anyhow::Result<()> {
    let (mut fleet, id) = shard_1_gone_at_its_commit(&[]).await?;
    assert_eq!(fleet.status(&id).await?["state"], "committing");
    let key = format!("/flotilla/decisions/{id}");
    assert_eq!(fleet.etcd.delete_key(&key).await?, 1, "{key} was there");
    if new_leader {
        fleet.restart_coordinator_with(0, &[]).await?;
    }
    fleet.restart_agent(1)?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "completed: {out}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            4,
            "shard_{s} committed"
        );
    }
    let c = fleet.coordinators[0].as_ref().unwrap();
    assert!(c.log().contains(said), "{}", c.log());
    assert_none_prepared(&fleet, 2).await
}

/// A cancel of an atomic plan whose abort is under way when its leader dies (shard_1's agent
/// away, its part not rolled back yet): the next leader carries out the abort it finds in
/// etcd, and the plan ends `cancelled` with the cancel's message. Before, it ended
/// `rolled_back`, its message saying the abort was presumed (the decision was found
/// written: only the plan's end was not carried over).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancels_abort_finished_by_the_next_leader_ends_cancelled() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(1, 2, 2)
        .least_privilege()
        .agent_args(&["--lease-ttl", "2s"])
        .start()
        .await?;
    let dir = MigrationDir::new()?;
    dir.migration(
        "001_slow_col",
        "",
        "ALTER TABLE work_orders ADD COLUMN slow_col int;\n\
         DO $$ BEGIN IF current_schema() IN ('tenant_0001', 'tenant_0003') THEN \
         PERFORM pg_sleep(60); END IF; END $$;",
        "ALTER TABLE work_orders DROP COLUMN slow_col",
    )?;
    let id = fleet.submit(dir.path(), &["--atomic"]).await?;
    wait_until(
        "the first tenant of each shard prepared",
        WAIT,
        async || Ok(prepared(&fleet.pg, 0).await? == 1 && prepared(&fleet.pg, 1).await? == 1),
    )
    .await?;
    fleet.agents[1].kill()?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--reason", "wrong window"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    wait_until("the abort stored", WAIT, async || {
        let stored: String = fleet
            .pg
            .query_scalar(
                "control",
                &format!("SELECT state || ' ' || ends FROM plans WHERE id = '{id}'"),
            )
            .await?;
        Ok(stored == "aborting cancelled")
    })
    .await?;
    fleet.restart_coordinator_with(0, &[]).await?;
    fleet.restart_agent(1)?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    let st = out.last_json()?;
    assert_eq!(st["state"], "cancelled", "{out}");
    let message = st["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("wrong window") && !message.contains("presumed"),
        "{st}"
    );
    for s in 0..2 {
        let n: i64 = fleet
            .pg
            .query_scalar(
                &format!("shard_{s}"),
                "SELECT count(*) FROM information_schema.columns WHERE column_name = 'slow_col'",
            )
            .await?;
        assert_eq!(n, 0, "shard_{s}");
    }
    assert_none_prepared(&fleet, 2).await
}

/// The same loss of the decision from etcd while the leader that wrote it carries it out
/// (no change of leader): the shard whose agent was away answers the commit's Resolve that
/// etcd holds no decision, and the leader writes it again; the plan completes. Before, it
/// stayed committing, the shard's prepared transactions holding their locks, until a
/// coordinator restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_decision_etcd_lost_under_its_leader_is_written_again() -> anyhow::Result<()> {
    decision_lost_while_committing(false, "the unit's commit decision was gone from etcd").await
}

/// `plan pause` of an atomic plan is refused, saying why and what to do instead: it was
/// taken and the plan said paused, while every run went on to the commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_pause_of_an_atomic_plan_is_refused_naming_cancel() -> anyhow::Result<()> {
    let fleet = HaFleet::builder(1, 1, 2).start().await?;
    let lock = hold(&fleet.pg, 0, 4712).await?;
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0000", 4712)?;
    let id = fleet.submit(d.path(), &["--atomic"]).await?;
    let out = fleet.cli(&["plan", "pause", &id]).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr.contains("commits atomically")
            && out.stderr.contains(&format!("flotilla plan cancel {id}")),
        "{out}"
    );
    let out = fleet
        .cli(&["plan", "status", &id, "--output", "json"])
        .await?;
    let st: Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(st["paused"], serde_json::json!([]), "{st}");
    release(lock, 4712).await?;
    let (out, status) = fleet.watch(&id).await?;
    assert_eq!(status["state"], "completed", "{out}");
    Ok(())
}

/// How many of shard `s`'s tenants (of a fleet of 2 a shard) have the table `table`.
async fn tables_on(fleet: &HaFleet, s: usize, table: &str) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            &format!("shard_{s}"),
            &format!("SELECT count(*) FROM information_schema.tables WHERE table_name = '{table}'"),
        )
        .await
}

/// Waits until `locks list` shows shard_0 alone locked (the other shards of a plan rolling
/// back let go of theirs).
async fn only_shard_0_locked(fleet: &impl Cli) -> anyhow::Result<()> {
    wait_until("only shard_0 still locked", WAIT, async || {
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        let shards: Vec<&str> = locks["locks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["shard"].as_str().unwrap())
            .collect();
        Ok(shards == ["shard_0"])
    })
    .await
}

/// One migration adding a table, which fails on tenant_0004 (shard_2 of a fleet of 2
/// tenants a shard) after 4 s: long enough for shard_0 to prepare and be lost.
fn failing_on_shard_2() -> anyhow::Result<MigrationDir> {
    let dir = MigrationDir::new()?;
    dir.migration(
        "001_abort_mark",
        "",
        "CREATE TABLE abort_mark (x int);
         DO $$ BEGIN
           IF current_schema() = 'tenant_0004' THEN
             PERFORM pg_sleep(4);
             RAISE EXCEPTION 'tenant_0004 fails on purpose';
           END IF;
         END $$;",
        "DROP TABLE abort_mark;",
    )?;
    Ok(dir)
}

/// An atomic unit aborting (a target failed on shard_2) while shard_0's agent is lost, its
/// targets prepared: the abort does not wait for it past `--agent-grace`. The other shards
/// roll back and let go of their locks, so a plan on shard_1 runs meanwhile; only shard_0
/// stays locked, the plan `rolling_back` naming it. Its agent back, the prepared
/// transactions are rolled back (the agent reads the abort in etcd at its start, and is
/// told it) and the plan ends rolled back, nothing of it anywhere. Before, the plan stayed `aborting` with all three shards locked until
/// the agent came back, and nothing an operator could do released them.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_lets_go_of_the_shards_it_is_done_with_while_an_agent_is_lost()
-> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(1, 3, 2)
        .least_privilege()
        .coordinator_args(&["--agent-grace", "3s"])
        .agent_args(&["--lease-ttl", "2s"])
        .start()
        .await?;
    let dir = failing_on_shard_2()?;
    let id = fleet.submit(dir.path(), &["--atomic"]).await?;
    wait_until("shard_0's two targets prepared", WAIT, async || {
        Ok(prepared(&fleet.pg, 0).await? == 2)
    })
    .await?;
    fleet.agents[0].kill()?;

    // the failure aborts the unit; shard_0's part is left to the decision after the grace
    let st = wait_for("rolling back without shard_0", WAIT, async || {
        let st = fleet.status(&id).await?;
        if st["state"] == "aborting" || st["state"] == "running" {
            return Ok(None);
        }
        if st["state"] != "rolling_back" {
            return Err(fatal(anyhow::anyhow!("{st}")));
        }
        Ok(Some(st))
    })
    .await?;
    assert_eq!(st["waiting_for"], serde_json::json!(["shard_0"]), "{st}");
    only_shard_0_locked(&fleet).await?;
    for s in 1..3 {
        assert_eq!(prepared(&fleet.pg, s).await?, 0, "shard_{s}");
        assert_eq!(tables_on(&fleet, s, "abort_mark").await?, 0, "shard_{s}");
    }
    assert_eq!(prepared(&fleet.pg, 0).await?, 2, "left to the decision");
    // another plan runs on shard_1 meanwhile
    let other = MigrationDir::new()?;
    other.migration(
        "002_other_mark",
        "",
        "CREATE TABLE other_mark (x int);",
        "DROP TABLE other_mark;",
    )?;
    let path = other.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &path,
            "--selector",
            "shard=shard_1",
            "--wait",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(tables_on(&fleet, 1, "other_mark").await?, 2);
    assert_eq!(fleet.status(&id).await?["state"], "rolling_back");

    // A new coordinator takes the plan over while another plan holds shard_2: it locks
    // shard_0 alone again (shard_1 and shard_2 were undone), and the other plan keeps
    // shard_2. Before, it was resumed `aborting` and re-took every shard, shard_2 from the
    // other plan once that plan's lease had expired with the coordinator before.
    let slow = MigrationDir::new()?;
    slow.migration(
        "003_slow_mark",
        "",
        "CREATE TABLE slow_mark (x int); SELECT pg_sleep(6);",
        "DROP TABLE slow_mark;",
    )?;
    let slow_id = fleet
        .submit(slow.path(), &["--selector", "shard=shard_2"])
        .await?;
    let holder = |locks: &Value, shard: &str| -> Option<String> {
        locks["locks"]
            .as_array()?
            .iter()
            .find(|l| l["shard"] == shard)
            .and_then(|l| l["plan_id"].as_str().map(str::to_string))
    };
    wait_until("shard_2 locked by the slow plan", WAIT, async || {
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(holder(&locks, "shard_2").as_deref() == Some(slow_id.as_str()))
    })
    .await?;
    fleet.restart_coordinator_with(0, &[]).await?;
    let st = wait_for("the slow plan ended", WAIT, async || {
        let st = fleet.status(&slow_id).await?;
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        assert_ne!(
            holder(&locks, "shard_2").as_deref(),
            Some(id.as_str()),
            "the plan taken over took shard_2 again: {locks}"
        );
        Ok(flotilla_core::state::PlanState::is_terminal_str(
            st["state"].as_str().unwrap_or_default(),
        )
        .then_some(st))
    })
    .await?;
    assert_eq!(st["state"], "completed", "{st}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "rolling_back", "{st}");
    assert_eq!(st["waiting_for"], serde_json::json!(["shard_0"]), "{st}");
    only_shard_0_locked(&fleet).await?;

    // shard_0's agent back: its part rolls back from the decision, and the plan ends
    fleet.restart_agent(0)?;
    let st = wait_for("the plan rolled back", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok((st["state"] == "rolled_back").then_some(st))
    })
    .await?;
    let shard_0_steps: Vec<&Value> = st["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["shard"] == "shard_0")
        .collect();
    assert!(shard_0_steps.is_empty(), "not failures: {st}");
    assert_eq!(prepared(&fleet.pg, 0).await?, 0);
    for s in 0..3 {
        assert_eq!(tables_on(&fleet, s, "abort_mark").await?, 0, "shard_{s}");
    }
    wait_until("every lock released", WAIT, async || {
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(locks["locks"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    Ok(())
}

/// The same without etcd (the embedded backend; agents without `--etcd` read no decision by
/// themselves): shard_0's agent back, the coordinator tells it the abort for the unit's
/// transactions its list names, and only then asks for its undo. Asked first, the agent
/// found nothing of the plan in its journal, answered that nothing was applied, and the plan
/// ended `rolled_back` with shard_0's transactions prepared for good, holding their locks.
#[tokio::test(flavor = "multi_thread")]
async fn without_etcd_a_shard_left_to_an_abort_is_told_it_when_back() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::builder(3, 2)
        .least_privilege()
        .coordinator_args(&["--agent-grace", "3s"])
        .start()
        .await?;
    let dir = failing_on_shard_2()?;
    let id = fleet.submit(dir.path(), &["--atomic"]).await?;
    let prepared_on = |s: usize| {
        let (pg, db) = (&fleet.pg, fleet.shards[s].clone());
        async move {
            pg.query_scalar::<i64>(
                &db,
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'flotilla:%' AND database = current_database()",
            )
            .await
        }
    };
    let mut seen = Value::Null;
    wait_until("shard_0's two targets prepared", WAIT, async || {
        seen = fleet.status(&id).await?;
        Ok(prepared_on(0).await? == 2)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {seen}"))?;
    fleet.agents[0].take().expect("shard_0's agent").kill()?;
    let st = wait_for("rolling back without shard_0", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok((st["state"] == "rolling_back").then_some(st))
    })
    .await?;
    assert_eq!(st["waiting_for"], serde_json::json!(["shard_0"]), "{st}");
    only_shard_0_locked(&fleet).await?;
    assert_eq!(prepared_on(0).await?, 2, "left to the abort: {st}");

    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    wait_for("the plan rolled back", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok((st["state"] == "rolled_back").then_some(st))
    })
    .await?;
    assert_eq!(prepared_on(0).await?, 0, "told the abort when back");
    for s in 0..3 {
        let n: i64 = fleet
            .pg
            .query_scalar(
                &fleet.shards[s],
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'abort_mark'",
            )
            .await?;
        assert_eq!(n, 0, "shard_{s}");
    }
    Ok(())
}
