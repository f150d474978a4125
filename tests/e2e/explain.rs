//! The dry run (`plan explain`, `plan submit --dry-run`): over real shards it reports each
//! statement's lock, the sizes of the tables it touches as PostgreSQL has them, the waves
//! and targets a submit would choose, and an estimate from recorded history; and it changes
//! nothing: the shards' catalogs and journals, the control store's plans and audit trail,
//! and the plan locks are the same before and after.
use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT};
use crate::ha::HaFleet;
use crate::harness::http::post_json;

/// Two migrations: one whose ALTER TABLE takes ACCESS EXCLUSIVE, one whose concurrent
/// index build takes SHARE UPDATE EXCLUSIVE.
fn plan() -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    std::fs::write(d.path().join("plan.toml"), "name = \"explained\"\n")?;
    d.migration(
        "001_loyalty",
        "",
        "-- a column the loyalty programme needs\nALTER TABLE work_orders ADD COLUMN loyalty_tier text;",
        "ALTER TABLE work_orders DROP COLUMN loyalty_tier;",
    )?;
    d.migration(
        "002_repair_customer",
        "",
        "CREATE INDEX CONCURRENTLY repair_orders_customer ON repair_orders (customer_id);",
        "DROP INDEX CONCURRENTLY repair_orders_customer;",
    )?;
    Ok(d)
}

/// Everything a dry run must leave alone, as one comparable text.
async fn observed(fleet: &TestFleet) -> anyhow::Result<String> {
    let mut all = fleet.fingerprint().await?;
    for s in 0..fleet.shards.len() {
        all.push_str(&format!("journal {s}: {:?}\n", fleet.journal(s).await?));
    }
    all.push_str(&observed_store(fleet).await?);
    Ok(all)
}

/// A dry run with a shard away that the plan selects targets on: shown all the same (JSON
/// on stdout), and exit 3 as the submit now (it exited 0, and a pipeline gating on it
/// passed a plan the submit then refused).
async fn explained_unavailable(fleet: &TestFleet, args: &[&str]) -> anyhow::Result<Value> {
    let out = fleet.cli(args).await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr
            .contains("error: a submit now would be refused: shard_1: "),
        "{out}"
    );
    out.last_json()
}

fn migration<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["migrations"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == id))
        .unwrap_or_else(|| panic!("migration {id} in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_reports_locks_sizes_and_waves_and_changes_nothing() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    // Row estimates come from the statistics: give the tables some.
    for db in &fleet.shards {
        fleet.pg.psql(db, "ANALYZE").await?;
    }
    let dir = plan()?;
    std::fs::write(
        dir.path().join("plan.toml"),
        "name = \"explained\"\n\n[[waves]]\nname = \"canary\"\nselector = \"region=r0\"\n\n[[waves]]\nname = \"rest\"\nrest = true\nmax_parallel = 3\n",
    )?;
    // An index built without CONCURRENTLY: the lint on disk warns of it whatever the table's
    // size; the dry run knows the table is small.
    dir.migration(
        "003_priority",
        "",
        "CREATE INDEX work_orders_priority ON work_orders (priority);",
        "DROP INDEX work_orders_priority;",
    )?;
    // A table the plan creates: not there yet on any target.
    dir.migration(
        "005_tiers",
        "",
        "CREATE TABLE loyalty_tiers (name text PRIMARY KEY);",
        "DROP TABLE loyalty_tiers;",
    )?;
    // A data change at 10 rows a second: its batch's lock, its table's rows at that rate.
    dir.migration(
        "004_fill",
        "kind = \"data\"\nirreversible = true\n\n[data]\ntable = \"repair_orders\"\nkey = \"id\"\nrows_per_second = 10\nbatch = \"UPDATE repair_orders SET total_amount = total_amount WHERE id > $1 AND id <= $2\"\n",
        "",
        "",
    )?;
    let path = dir.path().to_string_lossy().into_owned();
    let before = observed(&fleet).await?;

    let v = fleet
        .json(&["plan", "explain", &path, "--output", "json"])
        .await?;
    assert_eq!(v["targets"], 4, "{v}");
    assert_eq!(v["steps"], 20, "{v}");
    assert_eq!(v["already_applied"], 0, "{v}");
    assert_eq!(v["unknown_shards"].as_array().map(Vec::len), Some(0), "{v}");
    // Only the data change has an estimate: 20 rows at its limit of 10 a second, 4 targets
    // at once.
    assert_eq!(v["estimate_ms"], 2000, "{v}");
    assert!(
        v["estimate_basis"]
            .as_str()
            .unwrap()
            .contains("4 migration(s) with no history not counted"),
        "{v}"
    );
    // The waves a submit would choose: shard_0's tenants first (its agent's region=r0).
    assert_eq!(v["waves"][0]["name"], "canary", "{v}");
    assert_eq!(
        v["waves"][0]["targets"],
        serde_json::json!(["shard_0/tenant_0000", "shard_0/tenant_0001"]),
        "{v}"
    );
    assert_eq!(v["waves"][1]["name"], "rest", "{v}");
    // a wave's own parallelism, which wins over the plan's
    assert_eq!(v["waves"][0]["max_parallel"], 0, "{v}");
    assert_eq!(v["waves"][1]["max_parallel"], 3, "{v}");
    assert_eq!(
        v["waves"][1]["targets"],
        serde_json::json!(["shard_1/tenant_0002", "shard_1/tenant_0003"]),
        "{v}"
    );

    let alter = migration(&v, "001_loyalty");
    assert_eq!(alter["scope"], "tenant", "{alter}");
    let stmt = &alter["statements"][0];
    assert_eq!(stmt["line"], 2, "{stmt}");
    assert_eq!(stmt["kind"], "ALTER TABLE", "{stmt}");
    assert_eq!(stmt["locks"][0]["relation"], "work_orders", "{stmt}");
    assert_eq!(stmt["locks"][0]["mode"], "ACCESS EXCLUSIVE", "{stmt}");
    assert_eq!(alter["estimate_basis"], "no history", "{alter}");

    let index = migration(&v, "002_repair_customer");
    assert_eq!(index["tx_mode"], "non-transactional", "{index}");
    let lock = &index["statements"][0]["locks"][0];
    assert_eq!(lock["relation"], "repair_orders", "{index}");
    assert_eq!(lock["mode"], "SHARE UPDATE EXCLUSIVE", "{index}");

    let plain = migration(&v, "003_priority");
    let lock = &plain["statements"][0]["locks"][0];
    assert_eq!(lock["relation"], "work_orders", "{plain}");
    assert_eq!(lock["mode"], "SHARE", "{plain}");
    let offline = fleet.cli(&["plan", "lint", &path]).await?;
    assert!(
        offline
            .stdout
            .contains("warning[index-not-concurrent] 003_priority"),
        "{offline}"
    );
    assert_eq!(
        plain["findings"].as_array().map(Vec::len),
        Some(0),
        "{plain}"
    );

    let tiers = &migration(&v, "005_tiers")["relations"][0];
    assert_eq!(tiers["relation"], "loyalty_tiers", "{tiers}");
    assert_eq!(
        (&tiers["present"], &tiers["missing"]),
        (&0.into(), &4.into()),
        "{tiers}"
    );
    assert_eq!(tiers["targets"][0]["state"], "missing", "{tiers}");

    let fill = migration(&v, "004_fill");
    assert_eq!(fill["statements"][0]["kind"], "UPDATE", "{fill}");
    let lock = &fill["statements"][0]["locks"][0];
    assert_eq!(lock["relation"], "repair_orders", "{fill}");
    assert_eq!(lock["mode"], "ROW EXCLUSIVE", "{fill}");
    assert_eq!(fill["relations"][0]["present"], 4, "{fill}");
    assert_eq!(fill["step_estimate_ms"], 2000, "{fill}");
    assert_eq!(
        fill["estimate_basis"],
        "20 rows (median estimate) at 10 rows/s: its rate limit (no recorded rate)",
        "{fill}"
    );

    // Sizes and row estimates as PostgreSQL has them for each tenant's table.
    for (m, table) in [(alter, "work_orders"), (index, "repair_orders")] {
        let rel = &m["relations"][0];
        assert_eq!(rel["relation"], table, "{rel}");
        assert_eq!(rel["present"], 4, "{rel}");
        let mut sizes = Vec::new();
        for t in rel["targets"].as_array().expect("per target") {
            let target = t["target"].as_str().unwrap();
            let (shard, tenant) = target.split_once('/').expect("tenant target");
            let bytes: i64 = fleet
                .pg
                .query_scalar(
                    shard,
                    &format!("SELECT pg_total_relation_size('{tenant}.{table}')"),
                )
                .await?;
            assert_eq!(t["state"], "present", "{t}");
            assert_eq!(t["bytes"], bytes, "{target}: {t}");
            // the fixture puts 20 rows in each table
            assert_eq!(t["rows"], 20, "{target}: {t}");
            sizes.push(bytes);
        }
        sizes.sort();
        assert_eq!(rel["bytes"]["min"], sizes[0], "{rel}");
        assert_eq!(rel["bytes"]["max"], sizes[3], "{rel}");
        assert_eq!(rel["rows"]["median"], 20, "{rel}");
    }

    // The same through submit --dry-run, as text.
    let out = fleet
        .cli(&["plan", "submit", &path, "--dry-run"])
        .await?
        .expect_success()?;
    assert!(out.stdout.contains("nothing was changed"), "{out}");
    assert!(
        out.stdout.contains("takes ACCESS EXCLUSIVE on work_orders"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("takes SHARE UPDATE EXCLUSIVE on repair_orders"),
        "{out}"
    );
    assert!(out.stdout.contains("estimated duration: 2s ("), "{out}");
    assert!(out.stdout.contains("estimate: no history"), "{out}");

    // A plan whose lint finds an error: shown all the same, and exit 2, as its submit.
    let refused = plan()?;
    refused.migration(
        "003_drop_notes",
        "",
        "ALTER TABLE work_orders DROP COLUMN notes;",
        "ALTER TABLE work_orders ADD COLUMN notes text;",
    )?;
    let refused_path = refused.path().to_string_lossy().to_string();
    let out = fleet.cli(&["plan", "explain", &refused_path]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stdout
            .contains("lint error destructive-drop (up.sql:1)")
            && out.stdout.contains("takes ACCESS EXCLUSIVE on work_orders"),
        "{out}"
    );
    assert!(
        out.stderr.contains(
            "a submit would refuse this plan: the lint found errors (shown above: each \
             migration's findings)"
        ),
        "{out}"
    );
    // in JSON, the findings are in the JSON (stderr said "shown above" of nothing there)
    let out = fleet
        .cli(&["plan", "explain", &refused_path, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("the lint found errors (in the JSON: each migration's findings)"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert!(v.to_string().contains("destructive-drop"), "{v}");
    let submit = fleet.cli(&["plan", "submit", &refused_path]).await?;
    assert_eq!(
        submit.code(),
        Some(2),
        "the submit refuses it as well: {submit}"
    );

    assert_eq!(
        observed(&fleet).await?,
        before,
        "the dry run changed something"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_estimates_from_history_and_names_an_absent_shard() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 2).await?;
    let dir = plan()?;
    let path = dir.path().to_string_lossy().into_owned();
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");

    // Run again: every step is applied already, and the recorded durations estimate it.
    let v = fleet
        .json(&["plan", "explain", &path, "--output", "json"])
        .await?;
    assert_eq!(v["already_applied"], 8, "{v}");
    let alter = migration(&v, "001_loyalty");
    assert!(
        alter["estimate_basis"]
            .as_str()
            .unwrap()
            .starts_with("median of 4 recorded steps of this migration"),
        "{alter}"
    );

    // One shard's agent gone: its targets are shown from what the coordinator knew, their
    // sizes unknown, the shard named; the other shard's are read.
    kill_agent(&mut fleet, 1, 1).await?;
    let before = observed_store(&fleet).await?;
    let v = explained_unavailable(&fleet, &["plan", "explain", &path, "--output", "json"]).await?;
    assert_eq!(v["targets"], 4, "{v}");
    let unknown = v["unknown_shards"].to_string();
    assert!(
        unknown.contains("shard_1: its agent is not attached"),
        "{v}"
    );
    let rel = &migration(&v, "001_loyalty")["relations"][0];
    assert_eq!(rel["present"], 2, "{rel}");
    assert_eq!(rel["unknown"], 2, "{rel}");
    for t in rel["targets"].as_array().unwrap() {
        let on_gone = t["target"].as_str().unwrap().starts_with("shard_1/");
        assert_eq!(
            t["state"],
            if on_gone { "unknown" } else { "present" },
            "{t}"
        );
    }
    assert_eq!(
        observed_store(&fleet).await?,
        before,
        "the dry run changed something"
    );
    Ok(())
}

/// A shard with no tenants whose agent went away: a plan of scope auto selects tenants (the
/// other shards have some), none on it, so it is submitted (before, the gone shard alone
/// made scope auto pick the shard itself, and every such plan, and `fleet baseline`, which
/// checks the same way, was refused as touching an unreachable shard). A migration of
/// scope shard still is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_shard_gone_away_does_not_refuse_a_plan_of_its_tenants() -> anyhow::Result<()> {
    let mut fleet = TestFleet::builder(3, 1)
        .shard_sql(|s, tenants| {
            if s == 2 {
                tenants
                    .iter()
                    .map(|t| format!("DROP SCHEMA {t} CASCADE;"))
                    .collect()
            } else {
                String::new()
            }
        })
        .start()
        .await?;
    kill_agent(&mut fleet, 2, 2).await?;
    let dir = plan()?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["targets"], 2, "{st}");
    let shard_scoped = MigrationDir::new()?;
    shard_scoped.migration(
        "001_shard_table",
        "scope = \"shard\"\n",
        "CREATE TABLE IF NOT EXISTS public.shard_note (id int);",
        "DROP TABLE public.shard_note;",
    )?;
    let out = fleet
        .cli(&["plan", "submit", &shard_scoped.path().to_string_lossy()])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("shard shard_2 is unreachable"), "{out}");
    Ok(())
}

/// A shard decommissioned for good (its agent gone, tenants and all): every plan of its
/// tenants is refused as touching it, until an admin retires it (`fleet retire`, refused
/// without a reason, for an unknown shard, and while its agent is attached); then it is out
/// of the fleet, plans run on the others, and the audit trail says who and why.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_retired_for_good_leaves_the_fleet() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 1).await?;
    let out = fleet
        .cli(&["fleet", "retire", "shard_1", "--reason", "decommissioned"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("the agent of shard shard_1 is attached"),
        "{out}"
    );
    kill_agent(&mut fleet, 1, 1).await?;
    let dir = plan()?;
    let out = fleet
        .cli(&["plan", "submit", &dir.path().to_string_lossy()])
        .await?;
    assert_eq!(out.code(), Some(3), "refused while shard_1 counts: {out}");
    assert!(out.stderr.contains("shard shard_1 is unreachable"), "{out}");
    let out = fleet.cli(&["fleet", "retire", "shard_1"]).await?;
    assert_eq!(out.code(), Some(2), "no reason: {out}");
    let out = fleet
        .cli(&["fleet", "retire", "shard_9", "--reason", "x"])
        .await?;
    assert!(out.stderr.contains("no shard `shard_9`"), "{out}");
    let out = fleet
        .cli(&["fleet", "retire", "shard_1", "--reason", "decommissioned"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let v = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["targets"], 1, "{st}");
    let audit = fleet.json(&["audit", "list", "--output", "json"]).await?;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "retire-shard"
                && e["detail"].as_str().unwrap_or("").contains("shard shard_1")),
        "{audit}"
    );
    Ok(())
}

/// Kills shard `s`'s agent and waits until the coordinator lists `left` agents connected.
async fn kill_agent(fleet: &mut TestFleet, s: usize, left: usize) -> anyhow::Result<()> {
    if let Some(mut agent) = fleet.agents[s].take() {
        agent.kill()?;
    }
    fleet.wait_attached(left).await
}

/// The control store's plans, audit trail and the plan locks (the shard of a killed agent
/// cannot be read through it).
async fn observed_store(fleet: &TestFleet) -> anyhow::Result<String> {
    let mut all = String::new();
    for args in [
        ["plan", "list", "--output", "json"].as_slice(),
        &["audit", "list", "--output", "json"],
        &["locks", "list", "--output", "json"],
    ] {
        all.push_str(&format!("{args:?}: {}\n", fleet.json(args).await?));
    }
    Ok(all)
}

/// Every key in etcd (names only, base64 as the gateway gives them).
async fn etcd_keys(fleet: &HaFleet) -> anyhow::Result<Vec<String>> {
    // from "\0" to the end of the keyspace: everything
    let resp = post_json(
        fleet.etcd.client_addr(),
        "/v3/kv/range",
        r#"{"key":"AA==","range_end":"AA==","keys_only":true}"#,
    )
    .await?;
    let v: Value = serde_json::from_str(&resp.body)?;
    let mut keys: Vec<String> = v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv["key"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    Ok(keys)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_over_etcd_writes_no_key_and_takes_no_lock() -> anyhow::Result<()> {
    let fleet = HaFleet::start(2, 1, 2).await?;
    fleet.wait_connected(1).await?;
    let dir = plan()?;
    let path = dir.path().to_string_lossy().into_owned();
    // Both coordinators' election keys, the agent's liveness key and the group's control
    // store, once all are written (the standby's campaign and the agent's lease can follow
    // its attach).
    let keys =
        crate::harness::wait_for("the coordinators' and the agent's keys", WAIT, async || {
            let keys = etcd_keys(&fleet).await?;
            Ok((keys.len() == 4).then_some(keys))
        })
        .await?;
    // Through both coordinators' addresses: a follower names the leader, the CLI goes there.
    let v = fleet
        .json(&["plan", "explain", &path, "--output", "json"])
        .await?;
    assert_eq!(v["targets"], 2, "{v}");
    assert_eq!(
        migration(&v, "001_loyalty")["relations"][0]["present"],
        2,
        "{v}"
    );
    assert_eq!(etcd_keys(&fleet).await?, keys, "the dry run wrote to etcd");
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert_eq!(locks["backend"], "etcd", "{locks}");
    assert_eq!(
        locks["locks"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "{locks}"
    );
    Ok(())
}

/// An environment whose every shard's agent is away: the dry run shows the plan over them
/// from what the coordinator knew, naming them, as it does when some are away (it said the
/// environment had no shard while the submit said which one was unreachable); the submit
/// refuses, naming the shard.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_over_an_environment_whose_shards_are_all_away_names_them() -> anyhow::Result<()>
{
    let mut fleet = TestFleet::builder(2, 2)
        .shard_labels(&["env=staging", "env=production"])
        .coordinator_args(&["--environments", "staging,production"])
        .start()
        .await?;
    let dir = plan()?;
    let path = dir.path().to_string_lossy().into_owned();
    kill_agent(&mut fleet, 1, 1).await?;
    // (production's gate would refuse first: nothing completed in staging)
    let production = |verb: &'static str| {
        [
            "plan",
            verb,
            path.as_str(),
            "--environment",
            "production",
            "--skip-promotion-check",
            "--reason",
            "dry run",
        ]
    };
    let mut explain = production("explain").to_vec();
    explain.extend(["--output", "json"]);
    let v = explained_unavailable(&fleet, &explain).await?;
    assert_eq!(v["targets"], 2, "{v}");
    assert!(
        v["unknown_shards"]
            .to_string()
            .contains("shard_1: its agent is not attached"),
        "{v}"
    );
    let out = fleet.cli(&production("submit")).await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("shard shard_1"), "{out}");
    Ok(())
}
