//! `--log-format json`: every line an object, what it concerns as fields.
use anyhow::{Context, bail};
use serde_json::Value;

use super::lone_coordinator;
use crate::fleet::{WAIT, coord_dbmate_dir, tenant_name, tenant_sql};
use crate::harness::{FlotillaProcess, PgCluster, TestDir, run_flotilla, wait_until};

/// Every line of a process's log (stdout and stderr) as a JSON object.
fn json_lines(who: &str, log: &str) -> anyhow::Result<Vec<serde_json::Map<String, Value>>> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => Ok(o),
            _ => bail!("{who}: not a JSON object: {l}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_carry_plan_step_shard_and_epoch_as_fields() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let dir = TestDir::new("operability-logs")?;
    pg.create_database("shard_0").await?;
    let sql: String = (0..2)
        .map(|t| tenant_sql(&tenant_name(0, t, 2), 5))
        .collect();
    pg.psql("shard_0", &sql).await?;

    // The flag for one, the environment for the other.
    let (mut coordinator, addr) = lone_coordinator(
        &dir,
        &[
            "--log-format",
            "json",
            "--log",
            "info,flotilla_coordinator=debug",
        ],
    )
    .await?;
    let dsn = pg.url("shard_0");
    let mut agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &addr,
            "--log",
            "info,flotilla_agent=debug",
            "agent",
            "--shard",
            "shard_0",
            "--dsn",
            &dsn,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[("FLOTILLA_LOG_FORMAT", "json")],
    )?;
    wait_until("the agent attached", WAIT, async || {
        let out = run_flotilla(
            &["--coordinator", &addr, "fleet", "list", "--output", "json"],
            &[],
        )
        .await?;
        Ok(out.stdout.contains("\"connected\":true"))
    })
    .await?;
    let plan_dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = run_flotilla(
        &[
            "--coordinator",
            &addr,
            "plan",
            "submit",
            &plan_dir,
            "--wait",
            "--output",
            "json",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let status = out.last_json()?;
    assert_eq!(status["state"], "completed", "{status}");
    let plan = status["plan_id"].as_str().context("plan_id")?.to_string();
    let steps = status["steps"].as_u64().context("steps")?;
    // Stopped first, so their logs are complete; the coordinator first, which lets
    // its attached agent go rather than wait for it.
    coordinator.terminate().await?;
    agent.terminate().await?;

    let coordinator_lines = json_lines("coordinator", &coordinator.log())?;
    let agent_lines = json_lines("agent", &agent.log())?;
    for line in coordinator_lines.iter().chain(&agent_lines) {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.contains_key(key), "no {key} in {line:?}");
        }
    }

    // The coordinator's epoch (embedded backend: from its store), and the plan's
    // lines: the engine's carry the epoch of the term that ran them.
    let epoch = coordinator_lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("coordination backend"))
        })
        .and_then(|l| l.get("epoch").cloned())
        .context("no epoch in the coordinator's start line")?;
    let ended = coordinator_lines
        .iter()
        .find(|l| {
            l.get("plan") == Some(&Value::from(plan.as_str()))
                && l.get("state") == Some(&Value::from("completed"))
        })
        .context("no line for the plan's end")?;
    assert_eq!(ended.get("epoch"), Some(&epoch), "{ended:?}");

    // The leader's line about each step's result: the step, where, and its epoch.
    let results: Vec<_> = coordinator_lines
        .iter()
        .filter(|l| l["message"] == "step result")
        .collect();
    assert_eq!(
        results.len() as u64,
        steps,
        "one `step result` line per step"
    );
    for line in results {
        assert_eq!(
            line.get("plan"),
            Some(&Value::from(plan.as_str())),
            "{line:?}"
        );
        assert_eq!(line.get("shard"), Some(&Value::from("shard_0")), "{line:?}");
        assert_eq!(line.get("state"), Some(&Value::from("applied")), "{line:?}");
        assert!(
            line.get("step")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{line:?}"
        );
        assert_eq!(line.get("epoch"), Some(&epoch), "{line:?}");
    }

    // Every step the agent applied has a line with the step, its plan, shard,
    // tenant and the epoch it ran under, as fields.
    let done: Vec<_> = agent_lines
        .iter()
        .filter(|l| l["message"] == "step done")
        .collect();
    assert_eq!(done.len() as u64, steps, "one `step done` line per step");
    for line in done {
        assert_eq!(
            line.get("plan"),
            Some(&Value::from(plan.as_str())),
            "{line:?}"
        );
        assert_eq!(line.get("shard"), Some(&Value::from("shard_0")), "{line:?}");
        assert!(
            line.get("step")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{line:?}"
        );
        assert!(
            line.get("tenant")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("tenant_")),
            "{line:?}"
        );
        assert_eq!(line.get("epoch"), Some(&epoch), "{line:?}");
    }
    Ok(())
}
