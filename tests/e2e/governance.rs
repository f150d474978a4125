//! Governance: the approval matrix (`coordinator --approvals FILE`), plans awaiting
//! approval touching nothing, `plan approve` / `plan reject`, and `audit list`.
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT};
use crate::ha::HaFleet;
use crate::harness::{TestDir, free_port, http, run_flotilla, wait_until};

/// The seed's matrix, by risk: staging needs none; production one; high-risk production
/// two, one of them a DBA.
const MATRIX: &str = r#"[[rule]]
environment = "staging"
risk = "*"
approvals = 0

[[rule]]
environment = "production"
risk = "*"
approvals = 1
roles = ["dba", "lead", "manager"]

[[rule]]
environment = "production"
risk = "high"
approvals = 2
roles = ["dba", "lead"]
require = ["dba"]
"#;

/// A plan of one tenant-scoped migration creating `table`, for `environment`, at `risk`.
fn plan(environment: &str, id: &str, table: &str, risk: &str) -> anyhow::Result<MigrationDir> {
    MigrationDir::one_table(environment, id, table, "", &format!("risk = \"{risk}\"\n"))
}

/// The seed's matrix written to `approvals.toml` in `files`; its path.
fn matrix_file(files: &TestDir) -> anyhow::Result<String> {
    let matrix = files.join("approvals.toml");
    std::fs::write(&matrix, MATRIX)?;
    Ok(matrix.to_string_lossy().into_owned())
}

async fn approve(fleet: &TestFleet, verb: &str, id: &str, who: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["plan", verb, id, "--output", "json"];
    args.extend_from_slice(who);
    fleet.json(&args).await
}

/// The audit trail of one plan, as `audit list --plan ID --output json` prints it.
async fn audit(fleet: &TestFleet, id: &str) -> anyhow::Result<Vec<Value>> {
    let v = fleet
        .json(&["audit", "list", "--plan", id, "--output", "json"])
        .await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// A plan with waves waiting for approval runs nothing: its waves are all pending. Its
/// first wave showed `running 2 targets: 0 applied, 0 failed, 2 to go` (stored so at the
/// submit), read as a rollout under way.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_awaiting_approval_shows_no_wave_running() -> anyhow::Result<()> {
    let files = TestDir::new("approvals")?;
    let matrix = matrix_file(&files)?;
    let fleet = TestFleet::builder(2, 2)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let dir = MigrationDir::one_table(
        "production",
        "001_waved",
        "waved",
        "\n[[waves]]\nname = \"canary\"\nselector = \"region=r0\"\n\n[[waves]]\nname = \"rest\"\nrest = true\n",
        "",
    )?;
    let id = fleet.submit(dir.path(), &["--as", "alice"]).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    let states: Vec<&str> = st["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(states, ["pending", "pending"], "{st}");
    // Rejected, it never started: still none under way.
    let out = fleet
        .cli(&["plan", "reject", &id, "--as", "bob", "--reason", "not now"])
        .await?;
    assert!(out.success(), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "rejected", "{st}");
    assert!(
        st["waves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "pending"),
        "{st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_high_risk_production_plan_waits_for_two_approvals_and_a_reject_ends_one()
-> anyhow::Result<()> {
    let files = TestDir::new("approvals")?;
    let matrix = matrix_file(&files)?;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut fleet = TestFleet::builder(2, 2)
        .metrics(metrics)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;

    // High risk in production: stored, waiting, touching nothing; --wait comes back (4).
    let dir = plan("production", "001_guarded", "guarded", "high")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--as", "alice"]).await?;
    assert_eq!(code, 4, "{out}");
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("2 approval(s) (roles dba, lead; at least one dba)"),
        "{st}"
    );
    assert!(
        st["waiting_for"][0]
            .as_str()
            .unwrap()
            .starts_with("approval: 2 approval(s)"),
        "{st}"
    );
    let id = st["plan_id"].as_str().unwrap().to_string();
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert!(!locks.to_string().contains(&id), "no lock taken: {locks}");

    // A new coordinator keeps it waiting (it is not resumed as if it ran).
    fleet.restart_coordinator().await?;
    fleet.wait_attached(2).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    // The new coordinator counts it when it starts to lead.
    wait_until("the waiting plan counted", WAIT, async || {
        let body = http::get(metrics, "/metrics").await?.body;
        Ok(body.contains("flotilla_plans_awaiting_approval 1"))
    })
    .await?;
    let listed = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert!(listed.to_string().contains("awaiting_approval"), "{listed}");
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");

    // The submitter cannot approve their own plan.
    let out = fleet
        .cli(&["plan", "approve", &id, "--as", "alice", "--role", "dba"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("alice submitted plan"), "{out}");
    // Refused, and in the plan's audit trail (it was in no audit trail).
    let trail = audit(&fleet, &id).await?;
    assert!(
        trail.iter().any(|e| e["action"] == "denied"
            && e["actor"] == "alice"
            && e["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot approve it")),
        "{trail:?}"
    );
    // A role the rule does not accept is refused, naming the roles it does.
    let out = fleet
        .cli(&["plan", "approve", &id, "--as", "bob", "--role", "dev"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("accepts dba, lead"), "{out}");

    // One approval: still waiting, and what is missing is said.
    let st = approve(
        &fleet,
        "approve",
        &id,
        &["--as", "bob", "--role", "lead", "--reason", "reviewed"],
    )
    .await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("1 more approval(s) and one from the `dba` role"),
        "{st}"
    );
    // The matrix made stricter at a restart (three approvals, one a manager's): the
    // status says what the plan waits for now (it said what it waited for at its last
    // approval), and again once the matrix is put back.
    std::fs::write(
        &matrix,
        MATRIX.replace(
            "approvals = 2\nroles = [\"dba\", \"lead\"]\nrequire = [\"dba\"]",
            "approvals = 3\nroles = [\"dba\", \"lead\", \"manager\"]\nrequire = [\"dba\", \"manager\"]",
        ),
    )?;
    fleet.restart_coordinator().await?;
    let st = fleet.status(&id).await?;
    assert_eq!(
        st["message"],
        "awaiting 2 more approval(s) and one from the `dba` role and one from the `manager` role",
        "{st}"
    );
    std::fs::write(&matrix, MATRIX)?;
    fleet.restart_coordinator().await?;
    fleet.wait_attached(2).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(
        st["message"], "awaiting 1 more approval(s) and one from the `dba` role",
        "{st}"
    );

    // The same person twice does not count twice.
    let out = fleet
        .cli(&["plan", "approve", &id, "--as", "bob", "--role", "dba"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("already"), "{out}");
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied yet");

    // The second approval (a DBA's) starts it; it completes on every target.
    let out = fleet
        .cli(&[
            "plan", "approve", &id, "--as", "carol", "--role", "dba", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 4, "2 shards x 2 tenants");

    // Who did what, when (the refused approvals too: the submitter's own, a role the rule
    // does not take, a second one).
    let trail = audit(&fleet, &id).await?;
    let seen: Vec<(String, String)> = trail
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_string(),
                e["actor"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        ("submit", "alice"),
        ("denied", "alice"),
        ("denied", "bob"),
        ("approve", "bob"),
        ("denied", "bob"),
        ("approve", "carol"),
    ];
    assert_eq!(
        seen,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "{trail:?}"
    );
    assert!(
        trail.iter().all(|e| e["at_ms"].as_u64().unwrap_or(0) > 0),
        "{trail:?}"
    );
    assert!(
        trail[3]["detail"].as_str().unwrap().contains("role lead")
            && trail[3]["detail"].as_str().unwrap().contains("reviewed"),
        "{trail:?}"
    );
    assert!(
        trail[5]["detail"].as_str().unwrap().contains("role dba"),
        "{trail:?}"
    );
    // counted as given and needed (a miscount read "2 of 1" where a required role came on
    // top of the count)
    assert!(
        trail[3]["detail"]
            .as_str()
            .unwrap()
            .contains("1 approval, 2 needed; still needs"),
        "{trail:?}"
    );

    // An environment the matrix does not name (`Production`: names are exact) is refused,
    // nothing stored: it matched no rule and went through unapproved before.
    let dir = plan("Production", "001_miscased", "miscased", "high")?;
    let before = fleet
        .json(&["plan", "list", "--output", "json"])
        .await?
        .as_array()
        .map(Vec::len);
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &dir.path().to_string_lossy(),
            "--as",
            "alice",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("unknown environment `Production`")
            && out.stderr.contains("production, staging"),
        "{out}"
    );
    let after = fleet
        .json(&["plan", "list", "--output", "json"])
        .await?
        .as_array()
        .map(Vec::len);
    assert_eq!(before, after, "nothing stored");

    // Low risk in staging needs no approval: it runs at once.
    let dir = plan("staging", "002_staging_only", "staged", "low")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--as", "alice"]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 8);

    // A reject ends a waiting plan: nothing ran, and it cannot be approved after.
    let dir = plan("production", "003_rejected", "rejected_table", "low")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--as", "alice"]).await?;
    assert_eq!(code, 4, "{out}");
    let rejected = st["plan_id"].as_str().unwrap().to_string();
    // Nothing but a decision moves a waiting plan: no rollback, no promote.
    for verb in ["rollback", "promote"] {
        let out = fleet.cli(&["plan", verb, &rejected]).await?;
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains("not running"), "{out}");
    }
    let st = approve(
        &fleet,
        "reject",
        &rejected,
        &["--as", "dave", "--reason", "not in this window"],
    )
    .await?;
    assert_eq!(st["state"], "rejected", "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("rejected by dave"),
        "{st}"
    );
    let (out, st) = fleet.watch(&rejected).await?;
    assert_eq!(
        out.code(),
        Some(1),
        "a rejected plan did not succeed: {out}"
    );
    assert_eq!(st["state"], "rejected", "{st}");
    assert_eq!(
        fleet.journal_total().await?,
        8,
        "the rejected plan ran nowhere"
    );
    let out = fleet
        .cli(&["plan", "approve", &rejected, "--as", "bob", "--role", "dba"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("not awaiting approval"), "{out}");
    let out = fleet.cli(&["plan", "rollback", &rejected]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("already ended rejected"), "{out}");
    let trail = audit(&fleet, &rejected).await?;
    let reject = trail
        .iter()
        .find(|e| e["action"] == "reject")
        .expect("the reject audited");
    assert_eq!(reject["actor"], "dave", "{trail:?}");
    assert!(
        reject["detail"]
            .as_str()
            .unwrap()
            .contains("not in this window"),
        "{trail:?}"
    );
    // bob's approve of the rejected plan: refused, and in the plan's trail (it was in none)
    let last = trail.last().expect("an audit trail");
    assert_eq!(
        (&last["action"], &last["actor"]),
        (&serde_json::json!("denied"), &serde_json::json!("bob")),
        "{trail:?}"
    );
    assert!(
        last["detail"]
            .as_str()
            .unwrap()
            .starts_with("approve: plan "),
        "{trail:?}"
    );

    // A cancel of a waiting plan ends it cancelled, nothing having run either.
    let dir = plan("production", "004_cancelled", "cancelled_table", "medium")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--as", "alice"]).await?;
    assert_eq!(code, 4, "{out}");
    let cancelled = st["plan_id"].as_str().unwrap().to_string();
    let out = fleet
        .cli(&[
            "plan", "cancel", &cancelled, "--as", "alice", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&cancelled).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["migrations"][0]["not_run"], 4, "{st}");
    assert_eq!(
        fleet.journal_total().await?,
        8,
        "the cancelled plan ran nowhere"
    );

    // Counted since the last restart: two plans held, one approval (bob's first came
    // before it), one rejection.
    let body = http::get(metrics, "/metrics").await?.body;
    for (decision, n) in [("awaiting", 2), ("approve", 1), ("reject", 1)] {
        let line = format!("flotilla_plan_approvals_total{{decision=\"{decision}\"}} {n}");
        assert!(body.contains(&line), "no `{line}` in:\n{body}");
    }
    assert!(
        body.contains("flotilla_plans_awaiting_approval 0"),
        "none waits now:\n{body}"
    );

    // `--since` in the future shows nothing; the whole trail holds both plans.
    let later = fleet
        .json(&[
            "audit",
            "list",
            "--since",
            "2999-01-01T00:00:00Z",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(later, serde_json::json!([]));
    let all = fleet
        .json(&["audit", "list", "--since", "1h", "--output", "json"])
        .await?;
    let all = all.to_string();
    assert!(all.contains(&id) && all.contains(&rejected), "{all}");
    Ok(())
}

/// With an approval matrix and no environments list, a plan's environment is the name its
/// submitter gives: a plan naming `staging` (no approval) over shards labelled
/// `env=production` is refused, naming them. Before, it ran there unapproved.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_naming_another_environment_than_its_shards_is_refused() -> anyhow::Result<()> {
    let files = TestDir::new("approvals-labels")?;
    let matrix = matrix_file(&files)?;
    let fleet = TestFleet::builder(2, 1)
        .shard_labels(&["env=production", "env=production"])
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let dir = plan("staging", "001_sneaky", "sneaky", "low")?;
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &dir.path().to_string_lossy(),
            "--as",
            "alice",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(
            "the plan is for `staging`, and 2 of its targets are labelled for another environment"
        ) && out.stderr.contains("shard_0/tenant_0000 (env=production)"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");
    // Named as its shards are, it waits for production's approval.
    let dir = plan("production", "001_sneaky", "sneaky", "low")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--as", "alice"]).await?;
    assert_eq!(code, 4, "{out}");
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    Ok(())
}

/// A plan awaiting approval whose submit found its migration applied (by an earlier plan),
/// which that plan's rollback undoes before the approval: once approved, the plan asks the
/// journals again and applies it. Before, it reported every target applied and ended
/// `completed` with none migrated.
#[tokio::test(flavor = "multi_thread")]
async fn an_approved_plan_applies_what_a_rollback_undid_while_it_waited() -> anyhow::Result<()> {
    let files = TestDir::new("approvals-undone")?;
    let matrix = matrix_file(&files)?;
    let fleet = TestFleet::builder(2, 2)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let dir = plan("production", "001_undone", "undone", "low")?;
    let first = fleet.submit(dir.path(), &["--as", "alice"]).await?;
    let st = approve(&fleet, "approve", &first, &["--as", "bob", "--role", "dba"]).await?;
    assert_ne!(st["state"], "awaiting_approval", "{st}");
    let (out, st) = fleet.watch(&first).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 4);

    // The same migration again: its submit finds all four tenants applied.
    let second = fleet.submit(dir.path(), &["--as", "alice"]).await?;
    let st = fleet.status(&second).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    let out = fleet
        .cli(&["plan", "rollback", &first, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(fleet.journal_total().await?, 0, "undone");

    approve(
        &fleet,
        "approve",
        &second,
        &["--as", "bob", "--role", "dba"],
    )
    .await?;
    let (out, st) = fleet.watch(&second).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(
        fleet.journal_total().await?,
        4,
        "applied again on all four tenants: {st}"
    );
    Ok(())
}

/// A matrix rule for an environment the coordinator's list does not hold would never
/// apply (the list refuses every plan for it): the coordinator does not start.
/// The same for an atomic plan (etcd, two-phase commit): the step its submit found applied
/// and a rollback undid while it awaited approval is asked again within its unit, prepared
/// and committed with the rest. Before, an atomic plan was never asked again: it ended
/// `completed`, every target reported applied, none migrated.
#[tokio::test(flavor = "multi_thread")]
async fn an_approved_atomic_plan_applies_what_a_rollback_undid_while_it_waited()
-> anyhow::Result<()> {
    use crate::fleet::Cli;
    let files = TestDir::new("approvals-undone-atomic")?;
    let matrix = matrix_file(&files)?;
    let fleet = crate::ha::HaFleet::builder(1, 2, 2)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let dir = plan("production", "001_undone", "undone", "low")?;
    let approve = async |id: &str| {
        fleet
            .json(&[
                "plan", "approve", id, "--as", "bob", "--role", "dba", "--output", "json",
            ])
            .await
    };
    let first = fleet
        .submit(dir.path(), &["--atomic", "--as", "alice"])
        .await?;
    approve(&first).await?;
    let (out, st) = fleet.watch(&first).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 4);

    let second = fleet
        .submit(dir.path(), &["--atomic", "--as", "alice"])
        .await?;
    let st = fleet.status(&second).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    let out = fleet
        .cli(&["plan", "rollback", &first, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(fleet.journal_total().await?, 0, "undone");

    approve(&second).await?;
    let (out, st) = fleet.watch(&second).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert!(
        st["message"]
            .as_str()
            .is_some_and(|m| m.contains("committed atomically")),
        "{st}"
    );
    assert_eq!(
        fleet.journal_total().await?,
        4,
        "applied again on all four tenants: {st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approvals_environment_missing_from_the_list_stops_the_coordinator() -> anyhow::Result<()>
{
    let files = TestDir::new("approvals-envs")?;
    let out = refused_start(&files, MATRIX, &["--environments", "staging,prod"]).await?;
    assert!(
        out.stderr
            .contains("environment(s) production not among the coordinator's environments"),
        "{out}"
    );
    Ok(())
}

/// A coordinator started with `matrix` as its approvals file (and `extra` arguments) that
/// refuses to start (exit 2) before it makes its store; its output.
async fn refused_start(
    files: &TestDir,
    matrix: &str,
    extra: &[&str],
) -> anyhow::Result<crate::harness::CommandOutput> {
    let path = files.join("approvals.toml");
    std::fs::write(&path, matrix)?;
    let store = files.join("flotilla.db");
    let listen = format!("127.0.0.1:{}", free_port());
    let (store_arg, path_arg) = (store.to_string_lossy(), path.to_string_lossy());
    let mut args = vec![
        "coordinator",
        "--listen",
        &listen,
        "--store",
        &store_arg,
        "--approvals",
        &path_arg,
    ];
    args.extend_from_slice(extra);
    let out = run_flotilla(&args, &[]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(!Path::new(&store).exists(), "nothing started: {out}");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_approvals_file_stops_the_coordinator_naming_file_and_line() -> anyhow::Result<()> {
    let files = TestDir::new("approvals-bad")?;
    let out = refused_start(
        &files,
        "[[rule]]\nenvironment = \"production\"\nrisk = \"severe\"\napprovals = 2\n",
        &[],
    )
    .await?;
    let name = files.join("approvals.toml").to_string_lossy().into_owned();
    assert!(
        out.stderr
            .contains(&format!("approvals file {name}: line 3: risk `severe`")),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_awaiting_approval_waits_under_a_new_leader_and_is_approved_through_a_follower()
-> anyhow::Result<()> {
    let files = TestDir::new("approvals-ha")?;
    let matrix = matrix_file(&files)?;
    let mut fleet = HaFleet::builder(2, 2, 2)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let standby = 1 - leader;

    let dir = plan("production", "001_ha_guarded", "ha_guarded", "high")?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = fleet
        .cli_at(
            leader,
            &["plan", "submit", &path, "--as", "alice", "--output", "json"],
        )
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let id = out.last_json()?["plan_id"].as_str().unwrap().to_string();

    // The leader hands over (SIGTERM); the new one keeps the plan waiting, touching nothing.
    fleet.coordinators[leader]
        .as_mut()
        .unwrap()
        .terminate_within(Duration::from_secs(15))
        .await?;
    fleet.coordinators[standby]
        .as_ref()
        .unwrap()
        .wait_for_log("leading: scheduling and deciding", WAIT)
        .await?;
    fleet.restart_coordinator_with(leader, &[]).await?;
    fleet.wait_attached_at(standby).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");

    // Approvals sent to the follower (the old leader, restarted) reach the leader.
    assert_eq!(fleet.leader(), Some(standby), "the standby leads now");
    let out = fleet
        .cli_at(
            leader,
            &["plan", "approve", &id, "--as", "bob", "--role", "lead"],
        )
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet
        .cli_at(
            leader,
            &[
                "plan", "approve", &id, "--as", "carol", "--role", "dba", "--wait", "--output",
                "json",
            ],
        )
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 4, "2 shards x 2 tenants");
    Ok(())
}

/// The approval that would start a plan checks the promotion gate again: its staging run
/// rolled back while the production plan waited, the approval is refused naming why, the
/// plan waits on with nothing run; staging passed again, the approval starts it. Before, the
/// approvers started a production change whose staging pass had been undone.
#[tokio::test(flavor = "multi_thread")]
async fn the_approval_that_starts_a_plan_checks_its_promotion_again() -> anyhow::Result<()> {
    let files = TestDir::new("approvals")?;
    let matrix = matrix_file(&files)?;
    let fleet = TestFleet::builder(2, 1)
        .shard_labels(&["env=staging", "env=production"])
        .coordinator_args(&[
            "--environments",
            "staging,production",
            "--approvals",
            &matrix,
        ])
        .start()
        .await?;
    let dir = MigrationDir::new()?;
    dir.migration(
        "001_loyalty",
        "",
        "CREATE TABLE loyalty (points int);",
        "DROP TABLE loyalty;",
    )?;
    let (code, staged, out) = fleet
        .submit_wait(dir.path(), &["--environment", "staging"])
        .await?;
    assert_eq!(code, 0, "{out}");
    let staged = staged["plan_id"].as_str().unwrap().to_string();
    // The same plan again in staging: nothing to do there, it completes. Its completion
    // does not stand once the plan that applied the migration is rolled back (it passed
    // the gate for a change no longer in staging).
    let (code, again, out) = fleet
        .submit_wait(dir.path(), &["--environment", "staging"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        again["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("nothing to do")),
        "{again}"
    );
    let id = fleet
        .submit(
            dir.path(),
            &["--environment", "production", "--as", "alice"],
        )
        .await?;
    assert_eq!(fleet.status(&id).await?["state"], "awaiting_approval");
    let out = fleet
        .cli(&["plan", "rollback", &staged, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");

    let out = fleet
        .cli(&["plan", "approve", &id, "--as", "bob", "--role", "dba"])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr.contains(&format!("plan {id} cannot start"))
            && out
                .stderr
                .contains("`001_loyalty` was rolled back in `staging`")
            && out.stderr.contains("it stays awaiting approval"),
        "{out}"
    );
    assert_eq!(fleet.status(&id).await?["state"], "awaiting_approval");
    assert!(
        fleet.journal(1).await?.is_empty(),
        "nothing ran in production"
    );

    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--environment", "staging"])
        .await?;
    assert_eq!(code, 0, "{out}");
    let st = approve(&fleet, "approve", &id, &["--as", "bob", "--role", "dba"]).await?;
    assert_ne!(st["state"], "awaiting_approval", "{st}");
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "completed", "{out}");
    Ok(())
}
