//! The fleet's versions end to end: `fleet status` and `fleet show` answered by the leader
//! from its copy of the agents' journals, over real shards and agents.
use anyhow::Context;
use serde_json::Value;

use crate::fleet::{MigrationDir, TestFleet, WAIT, coord_dbmate_dir, tenant_sql};
use crate::harness::wait_for;

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
    let s = status_when(&fleet, "one cohort of 24 targets", &[], |s| {
        s["targets"] == 24 && cohorts(s).len() == 1
    })
    .await?;
    assert_eq!(s["behind"], 0);
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
    let s = status_when(&fleet, "two cohorts (16 + 8)", &[], |s| {
        cohorts(s).len() == 2 && cohorts(s)[1]["targets"].as_array().unwrap().len() == 8
    })
    .await?;
    assert_eq!(s["behind"], 0);
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
    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    let s = status_when(&fleet, "the new tenant behind", &[], |s| s["behind"] == 1).await?;
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
