//! Progressive rollouts (issue 10): waves in order with their bakes, the same targets on
//! re-submit, a failing canary that stops the rollout before the next wave touches
//! anything, error budgets, a manual gate that survives a new coordinator, `plan halt`,
//! and bad wave definitions refused at submit.
use std::collections::BTreeMap;

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, tenant_name};
use crate::rollout::assert_refused;

/// Tenants labelled by a directory table: the first tenant of each shard is
/// `tier=internal`, the others `tier=customer`.
const TENANT_QUERY: &str = "SELECT schema_name, 'tier=' || tier FROM public.tenant_directory";

const MARK_UP: &str =
    "CREATE TABLE rollout_mark (at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO rollout_mark DEFAULT VALUES;";
const MARK_DOWN: &str = "DROP TABLE rollout_mark;";

/// 3 shards x 8 tenants with tier labels; `conflicts` (shard, tenant index) already have
/// a `rollout_mark` table, so the migration fails there.
async fn fleet(conflicts: &[(usize, usize)]) -> anyhow::Result<TestFleet> {
    let conflicts = conflicts.to_vec();
    TestFleet::builder(3, 8)
        .shard_sql(move |s, tenants| {
            let mut sql =
                String::from("CREATE TABLE public.tenant_directory (schema_name text, tier text);");
            for (i, t) in tenants.iter().enumerate() {
                let tier = if i == 0 { "internal" } else { "customer" };
                sql.push_str(&format!(
                    "INSERT INTO public.tenant_directory VALUES ('{t}', '{tier}');"
                ));
                if conflicts.contains(&(s, i)) {
                    sql.push_str(&format!("CREATE TABLE {t}.rollout_mark (x int);"));
                }
            }
            sql
        })
        .tenant_query(TENANT_QUERY)
        .start()
        .await
}

/// One migration that records when it ran, with `plan` as its plan.toml.
fn plan_dir(plan: &str) -> anyhow::Result<MigrationDir> {
    let dir = MigrationDir::new()?;
    dir.migration("001_rollout_mark", "", MARK_UP, MARK_DOWN)?;
    std::fs::write(dir.path().join("plan.toml"), plan)?;
    Ok(dir)
}

fn waves(st: &Value) -> Vec<Value> {
    st["waves"].as_array().cloned().unwrap_or_default()
}

fn wave_targets(w: &Value) -> Vec<String> {
    let mut v: Vec<String> = w["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// When each tenant's migration ran (epoch ms), by `shard_N/tenant_NNNN`; tenants where
/// it did not run are absent.
async fn marks(fleet: &TestFleet) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (s, db) in fleet.shards.iter().enumerate() {
        for t in fleet.tenants(s) {
            let exists: String = fleet
                .pg
                .query_scalar(
                    db,
                    &format!(
                        "SELECT count(*) FROM information_schema.columns
                         WHERE table_schema = '{t}' AND table_name = 'rollout_mark' AND column_name = 'at'"
                    ),
                )
                .await?;
            if exists == "0" {
                continue;
            }
            let at: f64 = fleet
                .pg
                .query_scalar(
                    db,
                    &format!("SELECT extract(epoch FROM min(at)) * 1000 FROM {t}.rollout_mark"),
                )
                .await?;
            out.insert(format!("{db}/{t}"), at);
        }
    }
    Ok(out)
}

const THREE_WAVES: &str = r#"name = "three-waves"

[[waves]]
name = "canary"
selector = "tier=internal"
bake = "2s"

[[waves]]
name = "quarter"
percent = 25
bake = "1s"

[[waves]]
name = "rest"
rest = true
"#;

#[tokio::test(flavor = "multi_thread")]
async fn waves_run_in_order_bake_and_pick_the_same_targets_again() -> anyhow::Result<()> {
    let fleet = fleet(&[]).await?;
    let dir = plan_dir(THREE_WAVES)?;
    let (code, st, out) = fleet
        .submit_wait(dir.path(), &["--max-parallel", "6"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    let w = waves(&st);
    let names: Vec<&str> = w.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["canary", "quarter", "rest"]);
    assert!(w.iter().all(|w| w["state"] == "done"), "{st}");
    // The canary is the internal tenants; the quarter a quarter of the rest (21 -> 6),
    // two per shard; the rest the other 15.
    let canary = wave_targets(&w[0]);
    let internal: Vec<String> = (0..3)
        .map(|s| format!("shard_{s}/{}", tenant_name(s, 0, 8)))
        .collect();
    assert_eq!(canary, internal);
    let quarter = wave_targets(&w[1]);
    assert_eq!(quarter.len(), 6, "{quarter:?}");
    for s in 0..3 {
        let on = quarter
            .iter()
            .filter(|t| t.starts_with(&format!("shard_{s}/")))
            .count();
        assert_eq!(on, 2, "spread over the shards: {quarter:?}");
    }
    assert_eq!(wave_targets(&w[2]).len(), 15);

    // Each wave ran after the one before had finished and baked.
    let at = marks(&fleet).await?;
    assert_eq!(at.len(), 24, "{at:?}");
    let span = |targets: &[String]| {
        let v: Vec<f64> = targets.iter().map(|t| at[t]).collect();
        (
            v.iter().cloned().fold(f64::MAX, f64::min),
            v.iter().cloned().fold(f64::MIN, f64::max),
        )
    };
    let (_, canary_end) = span(&canary);
    let (quarter_start, quarter_end) = span(&quarter);
    let (rest_start, _) = span(&wave_targets(&w[2]));
    assert!(
        quarter_start >= canary_end + 2000.0,
        "the quarter started {}ms after the canary ended; its bake is 2s",
        quarter_start - canary_end
    );
    assert!(
        rest_start >= quarter_end + 1000.0,
        "the rest started {}ms after the quarter ended; its bake is 1s",
        rest_start - quarter_end
    );

    // The same plan again picks the same targets for each wave (everything is applied
    // already, so it completes at once).
    let (code, again, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let w2 = waves(&again);
    for i in 0..3 {
        assert_eq!(wave_targets(&w2[i]), wave_targets(&w[i]), "wave {i}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_canary_stops_the_rollout_before_the_next_wave() -> anyhow::Result<()> {
    // shard_1's internal tenant fails; all-or-nothing undoes the canary.
    let fleet = fleet(&[(1, 0)]).await?;
    let dir = plan_dir(THREE_WAVES)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    let w = waves(&st);
    assert_eq!(w[0]["state"], "halted", "{st}");
    assert_eq!(w[1]["state"], "pending", "{st}");
    assert_eq!(w[2]["state"], "pending", "{st}");
    // No tenant outside the canary was touched: no table, no journal row.
    let at = marks(&fleet).await?;
    assert!(at.is_empty(), "{at:?}");
    assert_eq!(fleet.journal_total().await?, 0);
    let failure = &st["failures"][0];
    assert_eq!(
        failure["target"],
        format!("shard_1/{}", tenant_name(1, 0, 8))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_budget_halts_past_it_and_failures_within_it_complete() -> anyhow::Result<()> {
    // Three tenants fail; a budget of 2 halts the wave at the third failure.
    let fleet = fleet(&[(0, 3), (1, 4), (2, 5)]).await?;
    let plan = r#"name = "budget"
policy = "continue"

[[waves]]
name = "all"
rest = true
max_failures = 2
"#;
    let dir = plan_dir(plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "halted", "{st}");
    let message = st["message"].as_str().unwrap();
    assert!(
        message.contains("wave `all`: its error budget of 2")
            && message.contains("was passed when 3 of its 24 targets had failed"),
        "{message}"
    );
    assert_eq!(st["failures"].as_array().unwrap().len(), 3, "{st}");
    assert_eq!(waves(&st)[0]["state"], "halted");

    // Two failing tenants, within the budget: every other tenant applies, and the plan
    // completes with its failures listed.
    let mut fleet = crate::fleet::TestFleet::builder(3, 8)
        .shard_sql(|s, tenants| {
            let mut sql =
                String::from("CREATE TABLE public.tenant_directory (schema_name text, tier text);");
            for t in tenants {
                sql.push_str(&format!(
                    "INSERT INTO public.tenant_directory VALUES ('{t}', 'customer');"
                ));
            }
            if s < 2 {
                sql.push_str(&format!(
                    "CREATE TABLE {}.rollout_mark (x int);",
                    tenants[2]
                ));
            }
            sql
        })
        .tenant_query(TENANT_QUERY)
        .start()
        .await?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "failures within the budget still exit 1: {out}");
    assert_eq!(st["state"], "completed_with_failures", "{st}");
    let failed: Vec<&str> = st["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            format!("shard_0/{}", tenant_name(0, 2, 8)),
            format!("shard_1/{}", tenant_name(1, 2, 8))
        ]
    );
    let w = &waves(&st)[0];
    assert_eq!(
        (w["applied"].as_u64(), w["failed"].as_u64()),
        (Some(22), Some(2)),
        "{w}"
    );
    assert_eq!(w["max_failures"], 2);
    let before = marks(&fleet).await?;
    assert_eq!(before.len(), 22);

    // A new coordinator finds an ended plan ended: nothing resumed, nothing undone.
    let id = st["plan_id"].as_str().unwrap().to_string();
    fleet.restart_coordinator().await?;
    fleet.wait_attached(3).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed_with_failures", "{st}");
    assert_eq!(marks(&fleet).await?, before);
    Ok(())
}

/// Waves: the internal tier's canary behind a manual gate, then the rest.
const CANARY_GATED: &str = r#"
[[waves]]
name = "canary"
selector = "tier=internal"
gate = "manual"

[[waves]]
name = "rest"
rest = true
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_gate_waits_for_promote_across_a_new_coordinator() -> anyhow::Result<()> {
    let mut fleet = fleet(&[]).await?;
    let plan = format!("name = \"gated\"\n{CANARY_GATED}");
    let dir = plan_dir(&plan)?;
    // --wait comes back at the gate (exit 4), the plan waiting, naming the wave.
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 4, "{out}");
    assert_eq!(st["state"], "waiting", "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("wave `canary`"),
        "{st}"
    );
    assert_eq!(
        st["waiting_for"],
        serde_json::json!(["promotion: wave canary (plan promote)"]),
        "{st}"
    );
    let id = st["plan_id"].as_str().unwrap().to_string();
    assert_eq!(marks(&fleet).await?.len(), 3, "only the canary ran");
    // `plan list` says so too (the store says running; the engine knows it waits)
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans[0]["plan_id"], id.as_str(), "{plans}");
    assert_eq!(plans[0]["state"], "waiting", "{plans}");

    // A new coordinator (a new leader, rebuilding from the store) keeps it waiting.
    fleet.restart_coordinator().await?;
    fleet.wait_attached(3).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "waiting", "{st}");
    assert_eq!(waves(&st)[0]["state"], "waiting", "{st}");
    // and says why, as before (its message was empty under the new leader)
    assert!(
        st["message"].as_str().unwrap().contains(&format!(
            "wave `canary` is done and baked; waiting for `flotilla plan promote {id}`"
        )),
        "{st}"
    );
    let canary = marks(&fleet).await?;
    assert_eq!(canary.len(), 3, "still only the canary");
    // A rest wave wrongly sent by the new leader may not have run yet at this check: the
    // marks' times below tell after the fact that none of it started before the promote.
    let promoted_ms: f64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT extract(epoch FROM clock_timestamp()) * 1000",
        )
        .await?;

    // Promote: the rest goes, and the plan completes.
    let out = fleet
        .cli(&[
            "plan",
            "promote",
            &id,
            "--reason",
            "canary looks fine",
            "--wait",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    let all = marks(&fleet).await?;
    assert_eq!(all.len(), 24);
    for (target, at) in &all {
        if !canary.contains_key(target) {
            assert!(
                *at >= promoted_ms,
                "{target} ran at {at} ms, before the promote at {promoted_ms} ms"
            );
        }
    }
    // Promoting again is refused: nothing waits.
    let out = fleet.cli(&["plan", "promote", &id]).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("already ended completed"), "{out}");

    // `plan halt` at the gate: the plan ends halted, the rest untouched.
    let dir = MigrationDir::new()?;
    dir.migration(
        "002_second_mark",
        "",
        "CREATE TABLE second_mark (x int);",
        "DROP TABLE second_mark;",
    )?;
    std::fs::write(dir.path().join("plan.toml"), plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 4, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    let out = fleet
        .cli(&[
            "plan",
            "halt",
            &id,
            "--reason",
            "not today",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // the halt ended the plan at once (nothing in flight): it answers with the plan as
    // stored, not an empty status (`plan  ()  state: `)
    let answered = out.last_json()?;
    assert_eq!(answered["state"], "halted", "{answered}");
    assert_eq!(answered["plan_id"], id.as_str(), "{answered}");
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "halted", "{st}");
    let seconds = tables_named(&fleet.pg, 3, "second_mark").await?;
    assert_eq!(seconds, 3, "only the canary has the second change");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_waves_are_refused_by_name_and_change_nothing() -> anyhow::Result<()> {
    let fleet = fleet(&[]).await?;
    let cases: [(&str, &[&str]); 8] = [
        (
            "[[waves]]\nname = \"a\"\nselector = \"tier=internal\"\n[[waves]]\nname = \"b\"\nselector = \"tenant=tenant_0000\"\n[[waves]]\nname = \"c\"\nrest = true\n",
            &["waves `a` and `b` both select", "shard_0/tenant_0000"],
        ),
        (
            "[[waves]]\nname = \"nobody\"\nselector = \"tier=staff\"\n[[waves]]\nname = \"rest\"\nrest = true\n",
            &["wave `nobody` selects no target"],
        ),
        (
            "[[waves]]\nname = \"canary\"\nselector = \"tier=internal\"\n",
            &["21 targets are in no wave", "rest = true"],
        ),
        (
            "[[waves]]\nname = \"huge\"\npercent = 150\n",
            &["wave `huge`", "outside (0, 100]"],
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\nbake = \"a while\"\n",
            &["plan.toml:4", "wave `w`: bake `a while`"],
        ),
        // on the bake's line, in its own words (it was the wave's name line, in ms)
        (
            "[[waves]]\nname = \"w\"\nrest = true\nbake = \"9999999d\"\n",
            &[
                "plan.toml:4",
                "wave `w`: bake `9999999d` is longer than a week",
            ],
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\n[[waves.check]]\nname = \"c\"\nsql = \"\"\n",
            &["wave `w`: c has no sql"],
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\n[waves.prometheus]\nurl = \"http://127.0.0.1:9\"\nquery = \"up\"\n",
            &["wave `w`: prometheus gate needs max or min"],
        ),
    ];
    for (plan, expect) in cases {
        let dir = plan_dir(plan)?;
        assert_refused(&fleet, dir.path(), &[], expect).await?;
    }
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_retry_runs_only_the_failed_targets_once_fixed() -> anyhow::Result<()> {
    let fleet = fleet(&[(0, 3), (2, 6)]).await?;
    let plan = r#"name = "retry"
policy = "continue"

[[waves]]
name = "canary"
selector = "tier=internal"

[[waves]]
name = "rest"
rest = true
"#;
    let dir = plan_dir(plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "failed", "{st}");
    // the canary's failures stopped nothing (no max_failures): said at submit
    assert!(
        out.stderr.contains(
            "failures in wave `canary` stop nothing: the next wave starts whatever failed there"
        ),
        "{out}"
    );
    let id = st["plan_id"].as_str().unwrap().to_string();
    let before = marks(&fleet).await?;
    assert_eq!(before.len(), 22);
    let first = format!("shard_0/{}", tenant_name(0, 3, 8));
    let second = format!("shard_2/{}", tenant_name(2, 6, 8));
    // `fleet status` lists the one failure of both targets once, naming them in order
    let out = fleet.cli(&["fleet", "status"]).await?;
    assert!(
        out.stdout.contains(&format!(
            "failed last (2 target(s)):\n  2 targets: 001_rollout_mark in plan {id} [42P07]: \
             relation \"rollout_mark\" already exists\n    {first}, {second}\n"
        )),
        "{out}"
    );

    // The cause is fixed on both tenants; the operator retries one of them first.
    for (s, t) in [(0, 3), (2, 6)] {
        fleet
            .pg
            .psql(
                &fleet.shards[s],
                &format!("DROP TABLE {}.rollout_mark", tenant_name(s, t, 8)),
            )
            .await?;
    }
    let out = fleet
        .cli(&[
            "plan", "retry", &id, "--target", &first, "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(1), "the other target still failed: {out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "failed", "{st}");
    let failed: Vec<&str> = st["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["target"].as_str().unwrap())
        .collect();
    assert_eq!(failed, [second.as_str()], "{st}");
    let now = marks(&fleet).await?;
    assert_eq!(now.len(), 23);
    assert!(now.contains_key(&first));

    // Then every target with work left: only the second runs; nothing applied moves.
    let out = fleet.cli(&["plan", "retry", &id, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    let after = marks(&fleet).await?;
    assert_eq!(after.len(), 24);
    for (t, at) in &before {
        assert_eq!(after[t], *at, "{t} ran again");
    }
    assert_eq!(after[&first], now[&first], "{first} ran again");

    // Nothing is left to retry, and a plan that did not fail is refused.
    let out = fleet.cli(&["plan", "retry", &id]).await?;
    assert_eq!(out.code(), Some(2), "refused, nothing changed: {out}");
    assert!(out.stderr.contains("completed; retry runs again"), "{out}");
    let out = fleet
        .cli(&["plan", "retry", &id, "--target", "shard_9/nobody"])
        .await?;
    assert!(out.stderr.contains("completed"), "{out}");
    Ok(())
}

/// A retried `continue` plan that fails again says what failed, and one that then completes
/// says so: the retry's note ("retry of 1 step requested by ...") was its message to the end,
/// the cause gone from what a script reads of `plan status`.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_that_fails_again_says_what_failed() -> anyhow::Result<()> {
    let fleet = fleet(&[(1, 2)]).await?;
    let dir = plan_dir("name = \"again\"\npolicy = \"continue\"\n")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    let failed = format!("failed on shard_1/{}", tenant_name(1, 2, 8));
    let message = |st: &Value| st["message"].as_str().unwrap_or_default().to_string();
    assert!(message(&st).contains(&failed), "{st}");

    let out = fleet.cli(&["plan", "retry", &id, "--wait"]).await?;
    assert_eq!(out.code(), Some(1), "it fails again: {out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "failed", "{st}");
    assert!(
        message(&st).starts_with("step 001_rollout_mark ") && message(&st).contains(&failed),
        "the cause, not the retry's note: {st}"
    );

    fleet
        .pg
        .psql(
            &fleet.shards[1],
            &format!("DROP TABLE {}.rollout_mark", tenant_name(1, 2, 8)),
        )
        .await?;
    let out = fleet.cli(&["plan", "retry", &id, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    assert!(message(&st).starts_with("every step applied"), "{st}");
    Ok(())
}

/// How many tenants on `shard_0`..`shard_{shards-1}` have a table named `table`.
async fn tables_named(
    pg: &crate::harness::PgCluster,
    shards: usize,
    table: &str,
) -> anyhow::Result<i64> {
    let mut n = 0;
    for s in 0..shards {
        let c: i64 = pg
            .query_scalar(
                &format!("shard_{s}"),
                &format!(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = '{table}'"
                ),
            )
            .await?;
        n += c;
    }
    Ok(n)
}

/// A rollback of a running plan sent to the follower is carried to the leader, which holds
/// the plan (here waiting at a manual gate): the plan rolls back. The follower holds no plan
/// in memory; when it refused such a plan as not taken over before sending the operator to
/// the leader, every rollback sent there failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_sent_to_the_follower_reaches_the_leader() -> anyhow::Result<()> {
    let fleet = crate::ha::HaFleet::start(2, 2, 3).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;
    let (id, _dir) = waiting_at_a_manual_gate(&fleet, "gated-follower").await?;
    let out = fleet.cli_at(follower, &["plan", "rollback", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    crate::harness::wait_until("the plan rolled back", crate::fleet::WAIT, async || {
        Ok(fleet.status(&id).await?["state"] == "rolled_back")
    })
    .await?;
    assert_eq!(tables_named(&fleet.pg, 2, "rollout_mark").await?, 0);
    Ok(())
}

/// Submits to an HA fleet a plan named `name` whose canary wave (2 targets) waits at a
/// manual gate, and waits until it does. The plan's id, and its directory (kept while the
/// caller needs it).
async fn waiting_at_a_manual_gate(
    fleet: &crate::ha::HaFleet,
    name: &str,
) -> anyhow::Result<(String, MigrationDir)> {
    let plan = format!(
        r#"name = "{name}"

[[waves]]
name = "canary"
count = 2
gate = "manual"

[[waves]]
name = "rest"
rest = true
"#
    );
    let dir = plan_dir(&plan)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    crate::harness::wait_until(
        "the plan waits at the canary's gate",
        crate::fleet::WAIT,
        async || Ok(fleet.status(&id).await?["state"] == "waiting"),
    )
    .await?;
    Ok((id, dir))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_gate_keeps_waiting_when_the_leader_is_killed() -> anyhow::Result<()> {
    let mut fleet = crate::ha::HaFleet::start(2, 2, 3).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let standby = 1 - leader;
    let (id, _dir) = waiting_at_a_manual_gate(&fleet, "gated-ha").await?;
    assert_eq!(
        tables_named(&fleet.pg, 2, "rollout_mark").await?,
        2,
        "only the canary ran"
    );

    // The leader dies; the standby leads, rebuilds the plan, and it still waits.
    fleet.coordinators[leader].as_mut().unwrap().kill()?;
    fleet.coordinators[standby]
        .as_ref()
        .unwrap()
        .wait_for_log(
            "leading: scheduling and deciding",
            std::time::Duration::from_secs(30),
        )
        .await?;
    fleet.wait_attached_at(standby).await?;
    let out = fleet
        .cli_at(standby, &["plan", "status", &id, "--output", "json"])
        .await?;
    let st = out.last_json()?;
    assert_eq!(st["state"], "waiting", "{st}");
    assert_eq!(
        tables_named(&fleet.pg, 2, "rollout_mark").await?,
        2,
        "still only the canary"
    );
    // (a rest wave wrongly sent may not have run yet at that check: the journal's start
    // times below tell after the fact)
    let promoted_ms: f64 = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT extract(epoch FROM clock_timestamp()) * 1000",
        )
        .await?;

    // Promoted on the new leader, the rest goes and the plan completes.
    let out = fleet
        .cli_at(
            standby,
            &["plan", "promote", &id, "--wait", "--output", "json"],
        )
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(tables_named(&fleet.pg, 2, "rollout_mark").await?, 6);
    let mut before = 0;
    for s in 0..2 {
        let n: i64 = fleet
            .pg
            .query_scalar(
                &format!("shard_{s}"),
                &format!(
                    "SELECT count(*) FROM flotilla.journal
                     WHERE started_at < to_timestamp({promoted_ms} / 1000.0)"
                ),
            )
            .await?;
        before += n;
    }
    assert_eq!(
        before, 2,
        "only the canary's steps started before the promote"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_gates_pass_or_stop_the_rollout_naming_the_value() -> anyhow::Result<()> {
    let fleet = fleet(&[]).await?;
    let gated = |extra: &str| {
        format!(
            r#"name = "sql-gates"
{extra}
[[waves]]
name = "canary"
selector = "tier=internal"

[[waves.check]]
name = "marks"
sql = "SELECT count(*) FROM rollout_mark"
max = 1

[[waves]]
name = "rest"
rest = true
"#
        )
    };
    // One mark per tenant: the gate passes and the rest goes.
    let dir = plan_dir(&gated(""))?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let gate = waves(&st)[0]["gate"].as_str().unwrap().to_string();
    assert!(gate.contains("`marks` highest 1 of max 1"), "{st}");
    assert_eq!(marks(&fleet).await?.len(), 24);

    // A second mark: the canary's gate is breached, the plan halts before the rest, and
    // the status names the check, the target and the value.
    let dir = MigrationDir::new()?;
    dir.migration(
        "002_second_mark",
        "",
        "INSERT INTO rollout_mark DEFAULT VALUES;",
        "DELETE FROM rollout_mark WHERE at = (SELECT max(at) FROM rollout_mark);",
    )?;
    std::fs::write(dir.path().join("plan.toml"), gated(""))?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "halted", "{st}");
    let message = st["message"].as_str().unwrap();
    assert!(
        message.contains("wave `canary` failed its gate: check `marks` on shard_"),
        "{message}"
    );
    assert!(
        message.contains("returned 2, more than its max 1"),
        "{message}"
    );
    let w = waves(&st);
    assert_eq!(w[0]["state"], "halted", "{st}");
    assert!(
        w[0]["gate"].as_str().unwrap().contains("returned 2"),
        "{st}"
    );
    assert_eq!(w[1]["state"], "pending", "{st}");
    let rows = |s: usize, t: usize| {
        let tenant = tenant_name(s, t, 8);
        let db = fleet.shards[s].clone();
        let pg = &fleet.pg;
        async move {
            pg.query_scalar::<i64>(&db, &format!("SELECT count(*) FROM {tenant}.rollout_mark"))
                .await
        }
    };
    assert_eq!(rows(0, 0).await?, 2, "the canary has the second mark");
    assert_eq!(rows(0, 1).await?, 1, "the rest does not");

    // Under on_gate_failure = "rollback" the canary's change is undone.
    let dir = MigrationDir::new()?;
    dir.migration(
        "003_probe",
        "",
        "CREATE TABLE gate_probe (x int); INSERT INTO gate_probe VALUES (5);",
        "DROP TABLE gate_probe;",
    )?;
    let plan = gated("on_gate_failure = \"rollback\"").replace(
        "SELECT count(*) FROM rollout_mark",
        "SELECT max(x) FROM gate_probe",
    );
    std::fs::write(dir.path().join("plan.toml"), plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("returned 5, more than its max 1"),
        "{st}"
    );
    assert_eq!(
        tables_named(&fleet.pg, 3, "gate_probe").await?,
        0,
        "the canary's change is undone on every shard"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prometheus_gate_watches_the_bake_and_an_unreachable_one_fails_fast() -> anyhow::Result<()>
{
    use crate::harness::prometheus::{Exporter, Prometheus};
    let fleet = fleet(&[]).await?;
    let exporter = Exporter::start(0.0).await?;
    let prom = Prometheus::start(exporter.addr).await?;
    let plan = |url: &str, bake: &str| {
        format!(
            r#"name = "prom-gate"

[[waves]]
name = "canary"
selector = "tier=internal"
bake = "{bake}"

[waves.prometheus]
url = "{url}"
query = "flotilla_test_error_ratio"
max = 0.05
interval = "1s"

[[waves]]
name = "rest"
rest = true
"#
        )
    };
    // Healthy: the gate passes and the rest goes.
    let dir = plan_dir(&plan(&prom.url(), "2s"))?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        waves(&st)[0]["gate"]
            .as_str()
            .unwrap()
            .contains("flotilla_test_error_ratio = 0"),
        "{st}"
    );

    // The error ratio rises during the canary's bake: the probe during the bake fails the
    // wave, naming the query and the value; the rest is not touched.
    let dir = MigrationDir::new()?;
    dir.migration(
        "002_prom_probe",
        "",
        "CREATE TABLE prom_probe (x int);",
        "DROP TABLE prom_probe;",
    )?;
    std::fs::write(dir.path().join("plan.toml"), plan(&prom.url(), "1h"))?;
    let id = fleet.submit(dir.path(), &[]).await?;
    crate::harness::wait_until("the canary bakes", crate::fleet::WAIT, async || {
        Ok(waves(&fleet.status(&id).await?)[0]["state"] == "baking")
    })
    .await?;
    exporter.set(0.5);
    prom.wait_for_value(0.5).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "halted", "{st}");
    let message = st["message"].as_str().unwrap();
    assert!(
        message.contains("flotilla_test_error_ratio = 0.5, more than its max 0.05"),
        "{message}"
    );
    let probes = tables_named(&fleet.pg, 3, "prom_probe").await?;
    assert_eq!(probes, 3, "only the canary has the change");

    // A Prometheus nobody runs: the gate fails at once, naming it (not a hang).
    let gone = format!("http://127.0.0.1:{}", crate::harness::free_port());
    let dir = MigrationDir::new()?;
    dir.migration(
        "003_gone",
        "",
        "CREATE TABLE gone_probe (x int);",
        "DROP TABLE gone_probe;",
    )?;
    std::fs::write(dir.path().join("plan.toml"), plan(&gone, "0s"))?;
    // warned at submit, in the plan's first message
    let p = dir.path().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &p]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout
            .contains("warning: wave `canary`'s gate cannot be evaluated now"),
        "{out}"
    );
    assert!(out.stdout.contains("is unreachable"), "{out}");
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "halted", "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("is unreachable"),
        "{st}"
    );
    // One that takes connections and never answers: the submit's probe gives up after its
    // own 2 s (a warning), not the gate's timeout, which held every submit back 10 s.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let silent_url = format!("http://{}", silent.local_addr()?);
    std::fs::write(dir.path().join("plan.toml"), plan(&silent_url, "0s"))?;
    let out = fleet
        .cli(&["plan", "submit", &p, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("did not answer within 2s"), "{out}");
    let silenced = out.last_json()?["plan_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    fleet.cli(&["plan", "cancel", &silenced]).await?;
    let (_, st) = fleet.watch(&silenced).await?;
    assert_ne!(st["state"], "running", "{st}");
    drop(silent);

    // No data to judge by (an error ratio over no traffic, 0/0): NaN fails the gate; it
    // passed both bounds before, and the rest went.
    exporter.set(f64::NAN);
    prom.wait_for_value(f64::NAN).await?;
    let dir = MigrationDir::new()?;
    dir.migration(
        "005_nan",
        "",
        "CREATE TABLE nan_probe (x int);",
        "DROP TABLE nan_probe;",
    )?;
    std::fs::write(dir.path().join("plan.toml"), plan(&prom.url(), "0s"))?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(st["state"], "halted", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("flotilla_test_error_ratio = NaN, not a finite number"),
        "{st}"
    );
    let probes = tables_named(&fleet.pg, 3, "nan_probe").await?;
    assert_eq!(probes, 3, "only the canary has the change");

    // Post-deploy monitoring: after the last wave the gate keeps watching; the ratio rises
    // and the whole plan is rolled back, on every tenant.
    exporter.set(0.0);
    prom.wait_for_value(0.0).await?;
    let dir = MigrationDir::new()?;
    dir.migration(
        "004_watched",
        "",
        "CREATE TABLE watched (x int);",
        "DROP TABLE watched;",
    )?;
    let watched = plan(&prom.url(), "0s").replace(
        "name = \"prom-gate\"",
        "name = \"prom-gate\"\nwatch = \"1h\"",
    );
    std::fs::write(dir.path().join("plan.toml"), watched)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    crate::harness::wait_until(
        "the plan is watched after its last wave",
        crate::fleet::WAIT,
        async || {
            let w = waves(&fleet.status(&id).await?);
            Ok(w.len() == 3 && w[2]["name"] == "watch" && w[2]["state"] == "baking")
        },
    )
    .await?;
    assert_eq!(
        tables_named(&fleet.pg, 3, "watched").await?,
        24,
        "every wave applied"
    );
    exporter.set(0.5);
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("wave `watch` failed its gate"),
        "{st}"
    );
    assert_eq!(
        tables_named(&fleet.pg, 3, "watched").await?,
        0,
        "rolled back everywhere"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bake_keeps_its_end_across_a_new_coordinator() -> anyhow::Result<()> {
    let mut fleet = fleet(&[]).await?;
    let plan = r#"name = "baked"

[[waves]]
name = "canary"
selector = "tier=internal"
bake = "15s"

[[waves]]
name = "rest"
rest = true
"#;
    let dir = plan_dir(plan)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    crate::harness::wait_until("the canary bakes", crate::fleet::WAIT, async || {
        Ok(waves(&fleet.status(&id).await?)[0]["state"] == "baking")
    })
    .await?;
    let until = waves(&fleet.status(&id).await?)[0]["bake_until_ms"]
        .as_u64()
        .expect("a bake end");

    // A new coordinator rebuilds the plan: the same bake end, not a new bake.
    fleet.restart_coordinator().await?;
    fleet.wait_attached(3).await?;
    let st = fleet.status(&id).await?;
    let w = &waves(&st)[0];
    assert_eq!(w["state"], "baking", "{st}");
    assert_eq!(
        w["bake_until_ms"].as_u64(),
        Some(until),
        "the same bake end: {st}"
    );
    // a watch (text, not a terminal) says the canary bakes and when its bake ends (the
    // bake long enough to outlast the restart on a loaded machine)
    let text = fleet.cli(&["plan", "watch", &id]).await?;
    assert_eq!(text.code(), Some(0), "{text}");
    assert!(
        text.stdout.lines().any(|l| l.contains("wave canary")
            && l.contains("baking")
            && l.contains("bake ends in")),
        "{text}"
    );
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    // Nothing of the rest ran before the bake's end.
    let at = marks(&fleet).await?;
    let rest = wave_targets(&waves(&st)[1]);
    let first_rest = rest.iter().map(|t| at[t]).fold(f64::MAX, f64::min);
    assert!(
        first_rest >= until as f64,
        "the rest started before the bake ended"
    );
    Ok(())
}

/// `plan promote --wave`: a promote sent again for a wave already past (a pipeline's retry)
/// changes nothing, and the next wave still waits at its own gate; one for a wave not at
/// its gate yet, or that the plan does not have, is refused. Before, a retried promote
/// released the next wave's gate.
#[tokio::test(flavor = "multi_thread")]
async fn a_promote_sent_again_for_its_wave_does_not_pass_the_next_gate() -> anyhow::Result<()> {
    let fleet = fleet(&[]).await?;
    let plan = r#"name = "two-gates"

[[waves]]
name = "canary"
selector = "tier=internal"
gate = "manual"

[[waves]]
name = "early"
count = 3
gate = "manual"

[[waves]]
name = "rest"
rest = true
"#;
    let dir = plan_dir(plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 4, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    for (wave, says) in [
        (
            "early",
            "wave `early` has not started; wave `canary` is waiting",
        ),
        (
            "nope",
            "has no wave `nope` (its waves: canary, early, rest)",
        ),
    ] {
        let out = fleet.cli(&["plan", "promote", &id, "--wave", wave]).await?;
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains(says), "{out}");
    }
    let out = fleet
        .cli(&["plan", "promote", &id, "--wave", "canary", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(4), "at the next gate: {out}");
    let st = fleet.status(&id).await?;
    assert_eq!(waves(&st)[1]["state"], "waiting", "{st}");
    // the retry: nothing changes, the early wave still waits
    let out = fleet
        .cli(&["plan", "promote", &id, "--wave", "canary"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "waiting", "{st}");
    assert_eq!(waves(&st)[1]["state"], "waiting", "{st}");
    assert_eq!(
        marks(&fleet).await?.len(),
        6,
        "the canary and the early wave only"
    );
    let out = fleet
        .cli(&["plan", "promote", &id, "--wave", "early", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(marks(&fleet).await?.len(), 24);
    // the retry of the last gate's promote once the plan completed: nothing to do (it was
    // refused, "already ended"); an empty --wave (an unset variable) is refused
    let out = fleet
        .cli(&["plan", "promote", &id, "--wave", "early"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet.cli(&["plan", "promote", &id, "--wave", ""]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--wave is empty"), "{out}");
    Ok(())
}

/// A plan under policy `stop` cancelled at a wave's manual gate (nothing out) ends
/// cancelled and lets go of its shard locks. Before, its state was set cancelled at once,
/// from where no end is settled: it stayed in the coordinator's memory, its locks held for
/// as long as the coordinator led.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_plan_cancelled_at_a_gate_ends_and_lets_go_of_its_locks() -> anyhow::Result<()> {
    let fleet = fleet(&[]).await?;
    let plan = format!("name = \"gated-stop\"\npolicy = \"stop\"\n{CANARY_GATED}");
    let dir = plan_dir(&plan)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 4, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    let out = fleet
        .cli(&["plan", "cancel", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.last_json()?["state"], "cancelled", "{out}");
    crate::harness::wait_until(
        "the plan's locks released",
        crate::fleet::WAIT,
        async || {
            let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
            Ok(locks["locks"].as_array().is_some_and(Vec::is_empty))
        },
    )
    .await?;
    // ended: its status comes from the store, as any ended plan's
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans[0]["state"], "cancelled", "{plans}");
    assert_eq!(marks(&fleet).await?.len(), 3, "only the canary ran");
    Ok(())
}
