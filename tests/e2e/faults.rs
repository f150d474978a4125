//! Fault tests of atomic plans and plan locks: coordinators, agents, a postmaster and etcd
//! members die at chosen steps of the two-phase commit. Each test ends by checking the
//! invariants: no Flotilla prepared transaction left on any shard, every tenant's schema as
//! expected (all or nothing), and no shard's fence epoch ever went backwards.
use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, WAIT, coord_dbmate_dir, tenant_name, wait_running};
use crate::ha::HaFleet;
use crate::harness::http::post_json;
use crate::harness::wait_until;
use crate::shards::{
    assert_fences_not_back, blocked, blocking_sql, fences, hold, prepared, prepared_gids, release,
    shard,
};

/// Tables, indexes, views and sequences of every tenant schema, with their columns.
async fn catalog(fleet: &HaFleet, s: usize) -> anyhow::Result<Vec<Vec<String>>> {
    fleet
        .pg
        .query_rows(
            &shard(s),
            "SELECT n.nspname, c.relname, c.relkind::text,
                    coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                                        ORDER BY a.attnum), '')
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE n.nspname LIKE 'tenant_%'
              GROUP BY 1, 2, 3 ORDER BY 1, 2",
        )
        .await
}

async fn catalogs(fleet: &HaFleet, shards: usize) -> anyhow::Result<Vec<Vec<Vec<String>>>> {
    let mut out = Vec::new();
    for s in 0..shards {
        out.push(catalog(fleet, s).await?);
    }
    Ok(out)
}

/// The shard's journal, with what a second application would change (seq, epoch, times).
async fn journal(fleet: &HaFleet, s: usize) -> anyhow::Result<Vec<Vec<String>>> {
    fleet
        .pg
        .query_rows(
            &shard(s),
            "SELECT target, migration_id, checksum, plan_id, epoch::text, started_at::text,
                    finished_at::text, seq::text
               FROM flotilla.journal ORDER BY 1, 2",
        )
        .await
}

/// Columns named `column` in the shard's tenant schemas.
async fn columns(fleet: &HaFleet, s: usize, column: &str) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            &shard(s),
            &format!(
                "SELECT count(*) FROM information_schema.columns
                  WHERE table_schema LIKE 'tenant_%' AND column_name = '{column}'"
            ),
        )
        .await
}

/// The sum of one counter (`running`, `pending`, ...) over the plan's migrations.
fn progress(st: &Value, field: &str) -> u64 {
    st["migrations"]
        .as_array()
        .map(|ms| ms.iter().filter_map(|m| m[field].as_u64()).sum())
        .unwrap_or(0)
}

/// A plan that ended has no step left pending or running, in its status as stored.
#[track_caller]
fn assert_settled(st: &Value) {
    assert!(
        progress(st, "pending") == 0 && progress(st, "running") == 0,
        "an ended plan with steps still open: {st}"
    );
}

/// No Flotilla prepared transaction on any shard, and no fence went backwards.
async fn assert_invariants(fleet: &HaFleet, shards: usize, before: &[i64]) -> anyhow::Result<()> {
    for s in 0..shards {
        let gids = prepared_gids(&fleet.pg, s).await?;
        assert!(
            gids.is_empty(),
            "shard_{s} holds Flotilla prepared transactions: {gids:?}"
        );
    }
    assert_fences_not_back(&fleet.pg, before).await
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether etcd holds `key` now.
pub(crate) async fn etcd_has(fleet: &HaFleet, key: &str) -> anyhow::Result<bool> {
    let resp = post_json(
        fleet.etcd.client_addr(),
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes())),
    )
    .await?;
    let v: Value = serde_json::from_str(&resp.body)?;
    Ok(v["kvs"].as_array().is_some_and(|k| !k.is_empty()))
}

/// The plan's decision in etcd (`commit`/`abort`), read through member 0's JSON gateway.
pub(crate) async fn decision_in_etcd(
    fleet: &HaFleet,
    plan: &str,
) -> anyhow::Result<Option<String>> {
    let key = base64(format!("/flotilla/decisions/{plan}").as_bytes());
    let resp = post_json(
        fleet.etcd.client_addr(),
        "/v3/kv/range",
        &format!(r#"{{"key":"{key}"}}"#),
    )
    .await?;
    let v: Value = serde_json::from_str(&resp.body)?;
    let Some(kv) = v["kvs"].as_array().and_then(|k| k.first()) else {
        return Ok(None);
    };
    let value = kv["value"].as_str().unwrap_or_default();
    Ok(Some(
        match value {
            v if v == base64(b"commit") => "commit",
            v if v == base64(b"abort") => "abort",
            other => other,
        }
        .to_string(),
    ))
}

/// Item 4: the commit decision is written, then the coordinator dies before any shard heard
/// it. One agent, restarted while no coordinator is up, commits its shard from the decision
/// in etcd; a new coordinator has the rest commit; a second round of restarts changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_decision_outlives_its_coordinator_and_one_agent_commits_alone()
-> anyhow::Result<()> {
    // agents as the role of deploy/sql/agent-role.sql: in-doubt recovery needs no more
    let mut fleet = HaFleet::builder(1, 3, 2).least_privilege().start().await?;
    fleet
        .restart_coordinator_with(0, &[("FAILPOINTS", "coordinator::after_decision=return")])
        .await?;
    fleet.wait_connected(3).await?;
    let before = fences(&fleet.pg, 3).await?;

    // tenant_0000 (shard_0) blocks on a lock the test holds, so every other target prepares
    // first; the two agents of shard_1 and shard_2 are frozen once their votes are in.
    let d = MigrationDir::new()?;
    d.migration(
        "001_work_rating",
        "",
        &blocking_sql(
            "ALTER TABLE work_orders ADD COLUMN satisfaction_rating integer",
            "tenant_0000",
            41,
        ),
        "ALTER TABLE work_orders DROP COLUMN satisfaction_rating",
    )?;
    d.migration(
        "002_repair_rating",
        "",
        "ALTER TABLE repair_orders ADD COLUMN satisfaction_rating integer",
        "ALTER TABLE repair_orders DROP COLUMN satisfaction_rating",
    )?;
    let lock = hold(&fleet.pg, 0, 41).await?;
    let id = fleet.submit(d.path(), &["--atomic"]).await?;
    wait_until(
        "every target but tenant_0000 prepared, and its vote in",
        WAIT,
        async || {
            let counts = (
                prepared(&fleet.pg, 0).await?,
                prepared(&fleet.pg, 1).await?,
                prepared(&fleet.pg, 2).await?,
            );
            if counts != (1, 2, 2) || blocked(&fleet.pg, 0).await? != 1 {
                return Ok(false);
            }
            let st = fleet.status(&id).await?;
            Ok(progress(&st, "running") == 2 && progress(&st, "pending") == 0)
        },
    )
    .await?;
    fleet.agents[1].stop()?;
    fleet.agents[2].stop()?;
    release(lock, 41).await?;
    let exit = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends the coordinator after the decision");
    assert_eq!(exit.code(), Some(87));
    assert_eq!(
        decision_in_etcd(&fleet, &id).await?.as_deref(),
        Some("commit")
    );

    // No coordinator is up. shard_0's agent, restarted, reads the decision and commits.
    fleet.restart_agent(0)?;
    wait_until("shard_0 committed by its agent alone", WAIT, async || {
        Ok(prepared(&fleet.pg, 0).await? == 0)
    })
    .await?;
    assert_eq!(columns(&fleet, 0, "satisfaction_rating").await?, 4);
    assert_eq!(journal(&fleet, 0).await?.len(), 4);
    let resolved_alone = fleet
        .retired
        .iter()
        .chain(std::iter::once(&fleet.agents[0]))
        .any(|a| {
            a.log()
                .contains("resolved an in-doubt prepared transaction from its decision in etcd")
        });
    assert!(resolved_alone, "shard_0's agent resolved from etcd");
    // The frozen shards still hold their votes, invisible.
    for s in 1..3 {
        assert_eq!(prepared(&fleet.pg, s).await?, 2, "shard_{s}");
        assert_eq!(columns(&fleet, s, "satisfaction_rating").await?, 0);
    }

    // A coordinator comes back, the frozen agents wake up: the rest commits.
    fleet.restart_coordinator_with(0, &[]).await?;
    fleet.agents[1].cont()?;
    fleet.agents[2].cont()?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    assert_settled(&st);
    for s in 0..3 {
        assert_eq!(
            columns(&fleet, s, "satisfaction_rating").await?,
            4,
            "shard_{s}: both tables of both tenants"
        );
        assert_eq!(journal(&fleet, s).await?.len(), 4, "shard_{s}");
    }
    assert_invariants(&fleet, 3, &before).await?;

    // Recovery again: every agent and the coordinator restart; nothing changes.
    let mut journals = Vec::new();
    for s in 0..3 {
        journals.push(journal(&fleet, s).await?);
    }
    let schemas = catalogs(&fleet, 3).await?;
    let fences_done = fences(&fleet.pg, 3).await?;
    for s in 0..3 {
        fleet.restart_agent(s)?;
    }
    fleet.restart_coordinator_with(0, &[]).await?;
    fleet.wait_connected(3).await?;
    for (s, before) in journals.iter().enumerate() {
        assert_eq!(&journal(&fleet, s).await?, before, "shard_{s} journal");
    }
    assert_eq!(catalogs(&fleet, 3).await?, schemas);
    let again = fleet.status(&id).await?;
    assert_eq!(again["state"], "completed", "{again}");
    assert_settled(&again);
    assert_eq!(again["migrations"], st["migrations"]);
    assert_invariants(&fleet, 3, &fences_done).await
}

/// Item 5a: an agent dies right after its PREPARE, before its vote reaches the coordinator.
/// Restarted without the failpoint, it lists the gid in doubt; the plan ends by one decision
/// that every shard follows.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_between_prepare_and_its_vote() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(1, 2, 2)
        .least_privilege()
        .agent_env(1, "FAILPOINTS", "agent::after_prepare_before_report=return")
        .start()
        .await?;
    let before = fences(&fleet.pg, 2).await?;
    let id = fleet.submit(&coord_dbmate_dir(), &["--atomic"]).await?;
    let exit = fleet.agents[1]
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends shard_1's agent after its PREPARE");
    assert_eq!(exit.code(), Some(86));
    let in_doubt = prepared_gids(&fleet.pg, 1).await?;
    assert!(!in_doubt.is_empty(), "a prepared transaction is left");
    assert!(
        in_doubt
            .iter()
            .all(|g| g.starts_with(&format!("flotilla:{id}:"))),
        "{in_doubt:?}"
    );
    assert_eq!(columns(&fleet, 1, "satisfaction_rating").await?, 0);

    fleet.restart_agent(1)?;
    fleet.agents[1]
        .wait_for_log("prepared transactions in doubt", WAIT)
        .await?;
    let log = fleet.agents[1].log();
    for g in &in_doubt {
        assert!(log.contains(g.as_str()), "the agent lists {g}:\n{log}");
    }
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    let st = fleet.status(&id).await?;
    // What the code does: the restarted agent's in-doubt vote counts, the run resent with its
    // gid answers PREPARED, and the plan commits everywhere.
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_settled(&st);
    assert_eq!(
        decision_in_etcd(&fleet, &id).await?.as_deref(),
        Some("commit")
    );
    // Every shard agrees: 2 tenants x 2 tables each, 3 journal rows per tenant.
    for s in 0..2 {
        assert_eq!(
            fleet
                .pg
                .query_scalar::<i64>(
                    &shard(s),
                    "SELECT count(*) FROM information_schema.columns
                      WHERE column_name = 'satisfaction_rating'
                        AND table_name IN ('work_orders', 'repair_orders')"
                )
                .await?,
            4,
            "shard_{s}"
        );
        assert_eq!(journal(&fleet, s).await?.len(), 6, "shard_{s}");
    }
    assert_invariants(&fleet, 2, &before).await
}

/// Item 5b: every target prepared, the coordinator dies before the decision, and the
/// postmaster crashes: the prepared transactions survive crash recovery, and the new
/// coordinator's presumed abort rolls them back.
#[tokio::test(flavor = "multi_thread")]
async fn prepared_transactions_survive_a_postmaster_crash_and_are_presumed_aborted()
-> anyhow::Result<()> {
    let mut fleet = HaFleet::start(1, 2, 2).await?;
    fleet
        .restart_coordinator_with(0, &[("FAILPOINTS", "coordinator::before_decision=return")])
        .await?;
    fleet.wait_connected(2).await?;
    let before = fences(&fleet.pg, 2).await?;
    let schemas = catalogs(&fleet, 2).await?;
    let id = fleet.submit(&coord_dbmate_dir(), &["--atomic"]).await?;
    let exit = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends the coordinator before the decision");
    assert_eq!(exit.code(), Some(86));
    let mut gids = Vec::new();
    for s in 0..2 {
        let g = prepared_gids(&fleet.pg, s).await?;
        assert_eq!(g.len(), 2, "shard_{s}: both tenants prepared: {g:?}");
        gids.push(g);
    }

    fleet.pg.kill_postmaster().await?;
    fleet.pg.restart().await?;
    for (s, before) in gids.iter().enumerate() {
        assert_eq!(
            &prepared_gids(&fleet.pg, s).await?,
            before,
            "shard_{s}: prepared transactions survive crash recovery"
        );
        assert_eq!(columns(&fleet, s, "satisfaction_rating").await?, 0);
    }
    assert_eq!(decision_in_etcd(&fleet, &id).await?, None);

    fleet.restart_coordinator_with(0, &[]).await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert_settled(&st);
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("presumed abort"),
        "{st}"
    );
    assert_eq!(
        decision_in_etcd(&fleet, &id).await?.as_deref(),
        Some("abort")
    );
    for s in 0..2 {
        assert!(journal(&fleet, s).await?.is_empty(), "shard_{s}");
    }
    assert_eq!(catalogs(&fleet, 2).await?, schemas, "nothing committed");
    assert_invariants(&fleet, 2, &before).await
}

/// The etcd member that leads the raft group now.
async fn etcd_raft_leader(fleet: &HaFleet) -> anyhow::Result<usize> {
    let cluster = fleet.etcd.cluster();
    for i in 0..cluster.len() {
        let Ok(resp) = post_json(cluster.client_addr(i), "/v3/maintenance/status", "{}").await
        else {
            continue;
        };
        let v: Value = serde_json::from_str(&resp.body)?;
        if v["header"]["member_id"] == v["leader"] && !v["leader"].is_null() {
            return Ok(i);
        }
    }
    anyhow::bail!("no etcd member says it leads")
}

/// Item 8: a three-member etcd. One member killed while an atomic plan is mid-way: the
/// coordinator keeps its leadership and the plan completes. Two of three stopped while a
/// plan waits for its decision: the coordinator loses leadership, a new submit fails
/// clearly, nothing commits; once the members are back, the waiting plan ends by the one
/// decision that stands (everywhere the same), and a new plan completes.
#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_plan_rides_out_one_etcd_member_and_commits_nothing_without_quorum()
-> anyhow::Result<()> {
    // etcd's raft timings scaled down with the 2s leases (production: 10s leases, 1s
    // election timeout), so raft elections stay well inside one lease.
    let mut fleet = HaFleet::builder(1, 2, 2)
        .etcd_members(3)
        .etcd_args(&["--heartbeat-interval=50", "--election-timeout=500"])
        .agent_args(&["--lease-ttl", "2s"])
        .start()
        .await?;
    let before = fences(&fleet.pg, 2).await?;

    // One member down mid-plan.
    let a = MigrationDir::new()?;
    a.migration(
        "001_a_work",
        "",
        &blocking_sql(
            "ALTER TABLE work_orders ADD COLUMN a_col integer",
            "tenant_0001",
            43,
        ),
        "ALTER TABLE work_orders DROP COLUMN a_col",
    )?;
    a.migration(
        "002_a_repair",
        "",
        "ALTER TABLE repair_orders ADD COLUMN a_col integer",
        "ALTER TABLE repair_orders DROP COLUMN a_col",
    )?;
    let lock = hold(&fleet.pg, 0, 43).await?;
    let id_a = fleet.submit(a.path(), &["--atomic"]).await?;
    wait_until("plan A mid-way", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1
            && prepared(&fleet.pg, 0).await? == 1
            && prepared(&fleet.pg, 1).await? == 2)
    })
    .await?;
    // A follower of the raft group: its clients (the coordinator's lease keep-alive among
    // them, maybe) move to the other members. (The raft leader's death takes an election,
    // which a 2s lease may not outlive: the coordinator then steps down, and the plan is
    // presumed aborted, consistently; with the default 10s leases it rides that out too.)
    let down = (etcd_raft_leader(&fleet).await? + 1) % 3;
    let log_at_kill = fleet.coordinators[0].as_ref().unwrap().log().len();
    fleet.etcd.cluster_mut().kill_member(down)?;
    release(lock, 43).await?;
    let out = fleet
        .cli(&["plan", "watch", &id_a, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let log = fleet.coordinators[0].as_ref().unwrap().log();
    assert!(
        !log[log_at_kill..].contains("lost leadership"),
        "the coordinator kept its leadership:\n{}",
        &log[log_at_kill..]
    );
    for s in 0..2 {
        assert_eq!(columns(&fleet, s, "a_col").await?, 4, "shard_{s}");
    }
    assert_invariants(&fleet, 2, &before).await?;
    fleet.etcd.cluster_mut().restart_member(down).await?;

    // Two of three down while plan B waits for its decision.
    let mid = fences(&fleet.pg, 2).await?;
    let schemas = catalogs(&fleet, 2).await?;
    let b = MigrationDir::new()?;
    b.migration(
        "001_b_work",
        "",
        &blocking_sql(
            "ALTER TABLE work_orders ADD COLUMN b_col integer",
            "tenant_0001",
            44,
        ),
        "ALTER TABLE work_orders DROP COLUMN b_col",
    )?;
    let lock = hold(&fleet.pg, 0, 44).await?;
    let id_b = fleet.submit(b.path(), &["--atomic"]).await?;
    wait_until("plan B mid-way", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1
            && prepared(&fleet.pg, 0).await? == 1
            && prepared(&fleet.pg, 1).await? == 2)
    })
    .await?;
    let leader_log_len = fleet.coordinators[0].as_ref().unwrap().log().len();
    let gone = [(down + 1) % 3, (down + 2) % 3];
    for &m in &gone {
        fleet.etcd.cluster_mut().stop_member(m).await?;
    }
    release(lock, 44).await?;
    // The last target prepares, but no decision can be written: leadership is lost.
    wait_until("the coordinator to lose leadership", WAIT, async || {
        let log = fleet.coordinators[0].as_ref().unwrap().log();
        Ok(log[leader_log_len..].contains("lost leadership"))
    })
    .await?;
    wait_until("every target of plan B prepared", WAIT, async || {
        Ok(prepared(&fleet.pg, 0).await? == 2 && prepared(&fleet.pg, 1).await? == 2)
    })
    .await?;
    // A new atomic plan is refused, clearly, and changes nothing.
    let c = MigrationDir::new()?;
    c.migration(
        "001_c_work",
        "",
        "ALTER TABLE work_orders ADD COLUMN c_col integer",
        "ALTER TABLE work_orders DROP COLUMN c_col",
    )?;
    let p = c.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &p, "--atomic", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains("no coordinator leads") && out.stderr.contains("quorum"),
        "the error says why: {out}"
    );
    for s in 0..2 {
        assert_eq!(columns(&fleet, s, "b_col").await?, 0, "shard_{s}");
        assert_eq!(columns(&fleet, s, "c_col").await?, 0, "shard_{s}");
    }
    assert_eq!(
        catalogs(&fleet, 2).await?,
        schemas,
        "no partial schema anywhere"
    );

    // The members come back: a leader again, plan B presumed aborted, a new plan completes.
    for &m in &gone {
        fleet.etcd.cluster_mut().restart_member(m).await?;
    }
    // Plan B ends by the one decision that stands: presumed abort, unless the commit the
    // old term tried to write (its outcome unknown when the quorum went) was applied once
    // the quorum came back. Either way every shard agrees.
    let out = fleet
        .cli(&["plan", "watch", &id_b, "--output", "json"])
        .await?;
    let st = fleet.status(&id_b).await?;
    let decision = decision_in_etcd(&fleet, &id_b).await?;
    let committed = match decision.as_deref() {
        Some("commit") => {
            assert_eq!(out.code(), Some(0), "{out}");
            assert_eq!(st["state"], "completed", "{st}");
            true
        }
        Some("abort") => {
            assert_eq!(out.code(), Some(1), "{out}");
            assert_eq!(st["state"], "rolled_back", "{st}");
            assert_eq!(catalogs(&fleet, 2).await?, schemas, "plan B left nothing");
            false
        }
        other => panic!("plan B ended without a decision ({other:?}): {st}"),
    };
    assert_settled(&st);
    for s in 0..2 {
        let expect = if committed { 2 } else { 0 };
        assert_eq!(columns(&fleet, s, "b_col").await?, expect, "shard_{s}");
    }
    assert_invariants(&fleet, 2, &mid).await?;
    fleet.wait_connected(2).await?;
    let out = fleet
        .cli(&[
            "plan", "submit", &p, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        assert_eq!(columns(&fleet, s, "c_col").await?, 2, "shard_{s}");
    }
    assert_invariants(&fleet, 2, &mid).await
}

/// Item 9: an atomic plan whose first migration cannot run in a transaction (it commits
/// outside 2PC), then a transactional one that fails on one tenant of another shard: the
/// plan aborts, and the index is undone everywhere by its down SQL.
#[tokio::test(flavor = "multi_thread")]
async fn a_non_transactional_step_is_undone_when_another_shard_fails() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 2, 2).await?;
    let failing = tenant_name(1, 1, 2);
    fleet
        .pg
        .psql(
            "shard_1",
            &format!("ALTER TABLE {failing}.work_orders ADD COLUMN priority_score integer"),
        )
        .await?;
    let before = fences(&fleet.pg, 2).await?;
    let schemas = catalogs(&fleet, 2).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_idx_x",
        "",
        "CREATE INDEX CONCURRENTLY idx_x ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_x",
    )?;
    d.migration(
        "002_priority_score",
        "",
        "ALTER TABLE work_orders ADD COLUMN priority_score integer",
        "ALTER TABLE work_orders DROP COLUMN priority_score",
    )?;
    let p = d.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan", "submit", &p, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st = out.last_json()?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert_settled(
        &fleet
            .status(st["plan_id"].as_str().unwrap_or_default())
            .await?,
    );
    let failures = st["failures"].as_array().cloned().unwrap_or_default();
    assert!(
        failures
            .iter()
            .any(|f| f["tenant"] == failing.as_str() && f["sqlstate"] == "42701"),
        "the duplicate column on {failing} is named: {st}"
    );
    for s in 0..2 {
        let idx: i64 = fleet
            .pg
            .query_scalar(
                &shard(s),
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_x'",
            )
            .await?;
        assert_eq!(idx, 0, "shard_{s}: idx_x is gone");
        assert!(journal(&fleet, s).await?.is_empty(), "shard_{s}");
    }
    // The index was built somewhere and undone there, not just never built.
    let mut undone = 0i64;
    for s in 0..2 {
        undone += fleet
            .pg
            .query_scalar::<i64>(
                &shard(s),
                "SELECT count(*) FROM flotilla.journal_history WHERE migration_id = '001_idx_x'",
            )
            .await?;
    }
    assert!(undone > 0, "001_idx_x was applied and rolled back");
    assert_eq!(catalogs(&fleet, 2).await?, schemas, "catalog as before");
    assert_invariants(&fleet, 2, &before).await
}

/// Item 11: a plan blocked mid-way holds its shards; a second plan on the same shards waits
/// for them and says so; an operator breaks one lock (audited), which halts the plan that
/// held it; both plans then end.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_waits_for_the_shard_locks_of_a_blocked_plan() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 2, 2).await?;
    let before = fences(&fleet.pg, 2).await?;
    let first = MigrationDir::new()?;
    first.migration(
        "001_first",
        "",
        &blocking_sql("CREATE TABLE first_log (x int)", "tenant_0001", 77),
        "DROP TABLE first_log",
    )?;
    let second = MigrationDir::new()?;
    second.migration(
        "001_second",
        "",
        "CREATE TABLE second_log (x int)",
        "DROP TABLE second_log",
    )?;
    let lock = hold(&fleet.pg, 0, 77).await?;
    let id1 = fleet.submit(first.path(), &[]).await?;
    wait_until("the first plan blocked", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    let id2 = fleet.submit(second.path(), &[]).await?;
    let st = crate::harness::wait_for("the second plan to wait for locks", WAIT, async || {
        let st = fleet.status(&id2).await?;
        let msg = st["message"].as_str().unwrap_or_default();
        Ok(msg.contains("waiting for shard locks").then_some(st))
    })
    .await?;
    let msg = st["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&id1), "names the first plan: {st}");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(progress(&st, "pending"), 4, "nothing of it ran: {st}");

    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    let held: Vec<(String, String)> = locks["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["shard"].as_str().unwrap_or_default().to_string(),
                l["plan_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        held,
        vec![
            ("shard_0".to_string(), id1.clone()),
            ("shard_1".into(), id1.clone())
        ],
        "{locks}"
    );

    // An override with no reason is refused, nothing broken (the audit trail needs why).
    let out = fleet
        .cli(&["locks", "break", "shard_0", "--reason", " "])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("needs --reason TEXT"), "{out}");
    let out = fleet.cli(&["locks", "break", "shard_0"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--reason"), "{out}");
    // a shard name that cannot be one is bad input (it was taken for etcd's refusal, exit 3)
    let out = fleet.cli(&["locks", "break", "", "--reason", "x"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("invalid shard name"), "{out}");
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert!(locks.to_string().contains("shard_0"), "still held: {locks}");
    let out = fleet
        .cli(&["locks", "break", "shard_0", "--reason", "test"])
        .await?;
    assert!(out.success(), "{out}");
    let audit = fleet
        .pg
        .query_rows(
            "control",
            "SELECT action, plan_id, detail FROM audit WHERE action = 'break-lock'",
        )
        .await?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0][1], id1, "{audit:?}");
    assert!(audit[0][2].contains("shard_0") && audit[0][2].contains("test"));
    // shard_1 is still the first plan's: the second plan (it wants both) still waits.
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    let shards: Vec<&str> = locks["locks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["plan_id"] == id1.as_str())
        .filter_map(|l| l["shard"].as_str())
        .collect();
    assert_eq!(shards, vec!["shard_1"], "{locks}");
    let st = fleet.status(&id2).await?;
    assert_eq!(progress(&st, "pending"), 4, "{st}");

    // The plan whose lock is broken is halted (it would run beside the next plan to take
    // the shard): what applied stays, the run in flight ends; it ends halted, saying why.
    release(lock, 77).await?;
    let out = fleet
        .cli(&["plan", "watch", &id1, "--output", "json"])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id1).await?;
    assert_eq!(st["state"], "halted", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("its lock on shard shard_0 was broken: test"),
        "{st}"
    );
    assert_settled(&st);
    let out = fleet
        .cli(&["plan", "watch", &id2, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_settled(&fleet.status(&id2).await?);
    for s in 0..2 {
        for t in 0..2 {
            let tenant = tenant_name(s, t, 2);
            let n: i64 = fleet
                .pg
                .query_scalar(
                    &shard(s),
                    &format!(
                        "SELECT count(*) FROM pg_tables WHERE schemaname = '{tenant}'
                            AND tablename IN ('first_log', 'second_log')"
                    ),
                )
                .await?;
            assert_eq!(n, 2, "{tenant}");
        }
    }
    wait_until("every lock released", WAIT, async || {
        let v = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(v["locks"].as_array().is_some_and(|l| l.is_empty()))
    })
    .await?;
    assert_invariants(&fleet, 2, &before).await
}

/// Waits until plan `id`'s message (its lock wait) says `what`; its status then.
async fn lock_wait_says(fleet: &HaFleet, id: &str, what: String) -> anyhow::Result<Value> {
    crate::harness::wait_for("the plan's lock wait", WAIT, async || {
        let st = fleet.status(id).await?;
        let msg = st["message"].as_str().unwrap_or_default();
        Ok(msg.contains(&what).then_some(st))
    })
    .await
}

/// Plans waiting for shard locks take them in submit order: a plan needing a shard that a
/// plan submitted before it also waits for queues behind that plan, even with the shard
/// free (before, it took the shard at once: a second plan on a table the first creates ran
/// first and failed); a plan on other shards goes on meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn plans_waiting_for_shard_locks_take_them_in_submit_order() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 3, 1).await?;
    let before = fences(&fleet.pg, 3).await?;
    let holder = MigrationDir::new()?;
    holder.migration(
        "001_holder",
        "",
        &blocking_sql("CREATE TABLE holder_log (x int)", &tenant_name(0, 0, 1), 78),
        "DROP TABLE holder_log",
    )?;
    let creates = MigrationDir::new()?;
    creates.migration(
        "001_queue_log",
        "",
        "CREATE TABLE queue_log (x int)",
        "DROP TABLE queue_log",
    )?;
    let alters = MigrationDir::new()?;
    alters.migration(
        "002_queue_log_y",
        "",
        "ALTER TABLE queue_log ADD COLUMN y int",
        "ALTER TABLE queue_log DROP COLUMN y",
    )?;
    let elsewhere = MigrationDir::new()?;
    elsewhere.migration(
        "001_elsewhere",
        "",
        "CREATE TABLE elsewhere_log (x int)",
        "DROP TABLE elsewhere_log",
    )?;
    let lock = hold(&fleet.pg, 0, 78).await?;
    let p1 = fleet
        .submit(holder.path(), &["--selector", "shard=shard_0"])
        .await?;
    wait_until("the first plan blocked on shard_0", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    let p2 = fleet
        .submit(
            creates.path(),
            &["--selector", "shard in (shard_0, shard_1)"],
        )
        .await?;
    lock_wait_says(&fleet, &p2, format!("shard shard_0 is locked by plan {p1}")).await?;
    // shard_1 is free, but the plan submitted before this one waits for it too
    let p3 = fleet
        .submit(alters.path(), &["--selector", "shard=shard_1"])
        .await?;
    let st = lock_wait_says(
        &fleet,
        &p3,
        format!("plan {p2}, queued before it, waits for shard shard_1 too"),
    )
    .await?;
    assert_eq!(progress(&st, "pending"), 1, "nothing of it ran: {st}");
    // a plan on a shard no one waits for runs meanwhile
    let p4 = fleet
        .submit(elsewhere.path(), &["--selector", "shard=shard_2"])
        .await?;
    let out = fleet
        .cli(&["plan", "watch", &p4, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&p3).await?;
    assert_eq!(progress(&st, "pending"), 1, "still queued: {st}");

    release(lock, 78).await?;
    for id in [&p1, &p2, &p3] {
        let out = fleet
            .cli(&["plan", "watch", id, "--output", "json"])
            .await?;
        assert_eq!(out.code(), Some(0), "{id}: {out}");
        let st = fleet.status(id).await?;
        assert_eq!(st["state"], "completed", "{st}");
        assert_settled(&st);
    }
    // on shard_1, the table came first and its column after, in submit order
    let order = fleet
        .pg
        .query_rows(
            &shard(1),
            "SELECT migration_id FROM flotilla.journal ORDER BY finished_at, migration_id",
        )
        .await?;
    assert_eq!(
        order,
        vec![
            vec!["001_queue_log".to_string()],
            vec!["002_queue_log_y".into()]
        ],
    );
    assert_invariants(&fleet, 3, &before).await
}

/// A plan retried queues from when the retry was asked, behind plans submitted since its
/// first submit, under a new leader too: before, it went ahead of them by its first
/// submit's time (two walk-throughs).
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_plan_queues_from_its_retry() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(1, 1, 1).await?;
    let dir = |id: &str, table: &str, up: &str| -> anyhow::Result<MigrationDir> {
        let d = MigrationDir::new()?;
        d.migration(id, "", up, &format!("DROP TABLE {table}"))?;
        Ok(d)
    };
    let holder = dir(
        "001_holder",
        "holder_log",
        &blocking_sql("CREATE TABLE holder_log (x int)", &tenant_name(0, 0, 1), 79),
    )?;
    let retried = dir(
        "002_retried",
        "retried_log",
        "CREATE TABLE retried_log (x int)",
    )?;
    let since = dir("003_since", "since_log", "CREATE TABLE since_log (x int)")?;
    let lock = hold(&fleet.pg, 0, 79).await?;
    let p1 = fleet.submit(holder.path(), &[]).await?;
    wait_until("the first plan blocked", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    let p2 = fleet.submit(retried.path(), &[]).await?;
    lock_wait_says(&fleet, &p2, format!("shard shard_0 is locked by plan {p1}")).await?;
    let out = fleet
        .cli(&["plan", "halt", &p2, "--reason", "later"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let p3 = fleet.submit(since.path(), &[]).await?;
    lock_wait_says(&fleet, &p3, format!("shard shard_0 is locked by plan {p1}")).await?;
    let out = fleet.cli(&["plan", "retry", &p2]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    lock_wait_says(
        &fleet,
        &p2,
        format!("plan {p3}, queued before it, waits for shard shard_0 too"),
    )
    .await?;
    // and so under a new leader (it queued the retried plan by its first submit again)
    fleet.restart_coordinator_with(0, &[]).await?;
    fleet.wait_connected(1).await?;
    lock_wait_says(
        &fleet,
        &p2,
        format!("plan {p3}, queued before it, waits for shard shard_0 too"),
    )
    .await?;
    release(lock, 79).await?;
    for id in [&p1, &p3, &p2] {
        let out = fleet
            .cli(&["plan", "watch", id, "--output", "json"])
            .await?;
        assert_eq!(out.code(), Some(0), "{id}: {out}");
    }
    let order = fleet
        .pg
        .query_rows(
            &shard(0),
            "SELECT migration_id FROM flotilla.journal ORDER BY finished_at, migration_id",
        )
        .await?;
    assert_eq!(
        order,
        vec![
            vec!["001_holder".to_string()],
            vec!["003_since".into()],
            vec!["002_retried".into()]
        ],
    );
    Ok(())
}

/// A clean restart of a shard's server (`pg_ctl restart -m fast`, as for a minor upgrade)
/// while a step runs ends the step's session with 57P01, as `pg_terminate_backend` does; the
/// agent tells the two apart by the server's uptime: the step is not run (its transaction
/// went with the server), it runs again once the server is back, and the plan completes.
/// Before, the step failed and the plan was rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_cut_short_by_a_server_restart_runs_again() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::start(1, 2).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_slow_table",
        "",
        "CREATE TABLE restarted (id int);\nSELECT pg_sleep(3)",
        "DROP TABLE restarted",
    )?;
    let id = fleet.submit(d.path(), &[]).await?;
    let shard = fleet.shards[0].clone();
    wait_running(&fleet.pg, &shard, "pg_sleep(3)", 2).await?;
    fleet.pg.restart().await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "completed", "{st}\n{out}");
    let made: i64 = fleet
        .pg
        .query_scalar(
            &shard,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'restarted'",
        )
        .await?;
    assert_eq!(made, 2, "on both tenants");
    Ok(())
}

/// Another of the shard server's processes crashes while a step runs (here one killed with
/// SIGKILL): the server ends every session and recovers; the step is not run and
/// runs again. When that happens under the same step again and again, the step is taken
/// for the cause (a statement that crashes the server would otherwise run, and crash it,
/// for good): the third time it fails, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_under_a_step_runs_it_again_but_not_for_good() -> anyhow::Result<()> {
    // Commits durable as in production: the harness's `synchronous_commit = off` lost the
    // agent's flotilla schema, committed just before the first crash. The agent as the
    // role of deploy/sql/agent-role.sql: what tells a reset apart must be readable by it.
    let fleet = crate::fleet::TestFleet::builder(1, 1)
        .pg_setting("synchronous_commit", "on")
        .least_privilege()
        .start()
        .await?;
    let shard = fleet.shards[0].clone();
    // A server up for longer than a second beyond what the step will have run, as a
    // production server is: a crash's reset keeps the postmaster's start time, and a
    // fresh test server's short uptime alone made the agent see a restart (in CI a third
    // crash 1.3 s after the server's start was taken as the session ended by the server,
    // and the step failed as a connection error).
    wait_until("the shard's server up for 3 s", WAIT, async || {
        let up = fleet
            .pg
            .query_scalar::<f64>(
                &shard,
                "SELECT extract(epoch FROM clock_timestamp() - pg_postmaster_start_time())::float8",
            )
            .await?;
        Ok(up >= 3.0)
    })
    .await?;
    let d = MigrationDir::new()?;
    d.migration("001_sleeps", "", "SELECT pg_sleep(30)", "SELECT 1")?;
    let id = fleet.submit(d.path(), &[]).await?;
    for crash in 1..=3 {
        wait_running(&fleet.pg, &shard, "pg_sleep(30)", 1).await?;
        // a bystander's backend crashes: the server resets every session
        let pool = fleet.pg.pool(&shard).await?;
        let (pid, step): (i32, i32) = sqlx::query_as(
            "SELECT pg_backend_pid(), (SELECT pid FROM pg_stat_activity \
              WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid() LIMIT 1)",
        )
        .fetch_one(&pool)
        .await?;
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        assert!(killed.success(), "crash {crash}");
        drop(pool);
        // The reset has ended the step's session before the next crash is looked for: on a
        // busy machine that session was still listed during the reset, the next kill fell
        // into the same reset, and the step counted two crashes as one (and ran on to its
        // end).
        wait_until("the step's session ended by the reset", WAIT, async || {
            let left = fleet
                .pg
                .query_scalar::<i64>(
                    &shard,
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {step}"),
                )
                .await;
            Ok(left.is_ok_and(|n| n == 0))
        })
        .await?;
        if crash < 3 {
            let st = fleet.status(&id).await?;
            assert_eq!(st["state"], "running", "crash {crash}: {st}");
        }
    }
    let (_, st) = fleet.watch(&id).await?;
    assert_ne!(st["state"], "completed", "{st}");
    let failures = st["failures"].to_string();
    // (the step's session ends with 57P02, or its connection with the server: the server's
    // start time, reset by the crash's recovery, says which)
    assert!(
        failures.contains("went down under this step 3 times"),
        "{st}"
    );
    Ok(())
}

/// A shard whose database stops answering its agent: a submit is refused at once, naming
/// the shard and why, rather than after the preflight's 30 s ("no preflight answer"); once
/// the database answers again, the agent takes its lock back and the plan runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_whose_database_does_not_answer_its_agent_refuses_a_submit_at_once()
-> anyhow::Result<()> {
    // (a discover interval no test outlasts: the report after the database answers again
    // is the one that follows the lock taken back)
    let fleet = crate::fleet::TestFleet::builder(1, 1)
        .agent_args(&["--discover-interval", "1h"])
        .start()
        .await?;
    let d = MigrationDir::new()?;
    d.migration("001_t", "", "CREATE TABLE t (x int)", "DROP TABLE t")?;
    let dir = d.path().to_string_lossy().into_owned();
    let unreported = async || -> anyhow::Result<serde_json::Value> {
        // (exit 3 while its one shard is not reported: nothing known of the fleet)
        let out = fleet.cli(&["fleet", "status", "--output", "json"]).await?;
        let s = out.last_json()?;
        let none_reported = s["targets"] == 0 && s["unreported_shards"] != serde_json::json!([]);
        assert_eq!(out.code(), Some(if none_reported { 3 } else { 0 }), "{out}");
        Ok(s["unreported_shards"].clone())
    };
    wait_until("the shard reported", WAIT, async || {
        Ok(unreported().await? == serde_json::json!([]))
    })
    .await?;
    crate::shards::cut_off(&fleet.pg, "shard_0", true).await?;
    // The fleet's state does not count its targets as last heard (they may change under
    // another agent or a hand meanwhile), and `fleet list` says why: the agent is attached
    // but its database does not answer it. Before, both said all was well.
    wait_until("the shard not reported", WAIT, async || {
        Ok(unreported().await? == serde_json::json!(["shard_0"]))
    })
    .await?;
    let agents = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    assert_eq!(agents[0]["connected"], true, "{agents}");
    assert_eq!(agents[0]["shard_unreachable"], true, "{agents}");
    // (its own message, not the preflight's "no preflight answer within 30s")
    let out = crate::harness::wait_for(
        "a submit refused for the agent's lost lock",
        WAIT,
        async || {
            let out = fleet.cli(&["plan", "submit", &dir]).await?;
            Ok(out
                .stderr
                .contains("its agent does not hold the shard's agent lock now")
                .then_some(out))
        },
    )
    .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("shard shard_0"), "{out}");
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(
        plans.as_array().map(Vec::len),
        Some(0),
        "nothing stored: {plans}"
    );
    crate::shards::cut_off(&fleet.pg, "shard_0", false).await?;
    wait_until(
        "the plan runs once the database answers",
        WAIT,
        async || {
            let out = fleet.cli(&["plan", "submit", &dir, "--wait"]).await?;
            Ok(out.code() == Some(0))
        },
    )
    .await?;
    assert_eq!(fleet.journal_total().await?, 1);
    // Back on its shard, the agent reports the whole again at once (not at its next
    // discover interval, 30 s here).
    wait_until("the shard reported again", WAIT, async || {
        Ok(unreported().await? == serde_json::json!([]))
    })
    .await?;
    let agents = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    assert_eq!(agents[0]["shard_unreachable"], false, "{agents}");
    Ok(())
}

/// An agent gone is "last seen" at its last heartbeat, not at its attach: the store's row
/// took the time only when the agent attached or its tenants changed, and `fleet list` of an
/// agent stopped seconds before said it was last seen that long before (hours, for an agent
/// attached for hours).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_gone_is_last_seen_at_its_last_heartbeat() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::start(1, 1).await?;
    let seen = async |fleet: &crate::fleet::TestFleet| -> anyhow::Result<(bool, i64)> {
        let agents = fleet.json(&["fleet", "list", "--output", "json"]).await?;
        Ok((
            agents[0]["connected"] == true,
            agents[0]["last_seen_ms"].as_i64().unwrap_or_default(),
        ))
    };
    let (_, attached) = seen(&fleet).await?;
    // heartbeats (every second) move it on while attached
    let heard = crate::harness::wait_for("two heartbeats after the attach", WAIT, async || {
        let (connected, at) = seen(&fleet).await?;
        Ok((connected && at >= attached + 2_000).then_some(at))
    })
    .await?;
    let status = fleet.agents[0].take().expect("the agent").kill()?;
    assert!(!status.success(), "killed: {status}");
    let gone = crate::harness::wait_for("the agent detached", WAIT, async || {
        let (connected, at) = seen(&fleet).await?;
        Ok((!connected).then_some(at))
    })
    .await?;
    assert!(
        gone >= heard,
        "last seen {gone} ms, before a heartbeat heard at {heard} ms (attached at {attached})"
    );
    // as text: away, for how long (it said "gone", as if retired for good)
    let out = fleet.cli(&["fleet", "list"]).await?;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("shard_0") && l.contains(" away ")),
        "{out}"
    );
    Ok(())
}

/// A second coordinator without etcd on a running one's control store is refused at start
/// (exit 2, naming the store), on a SQLite file and on a PostgreSQL store: both would lead,
/// the second's start fenced the first's writes while its agents stayed with it, and its
/// plans ran on and reported ended with nothing stored. The first goes on; killed, its claim
/// goes with it and a coordinator starts on the store again.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_coordinator_without_etcd_on_one_store_is_refused() -> anyhow::Result<()> {
    for postgres in [false, true] {
        let builder = crate::fleet::TestFleet::builder(1, 1);
        let builder = if postgres {
            builder.postgres_store("control")
        } else {
            builder
        };
        let mut fleet = builder.start().await?;
        // The store as an older version left it (the running coordinator upgraded it at
        // its start): the refused one, a newer version started by mistake, changes
        // nothing. Before, it upgraded the store first, and the older one could not start
        // on it again.
        let older = "UPDATE flotilla_meta SET value = '5' WHERE key = 'schema_version'";
        let version = "SELECT value FROM flotilla_meta WHERE key = 'schema_version'";
        if postgres {
            fleet.pg.psql("control", older).await?;
        } else {
            use sqlx::ConnectOptions;
            let mut db = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&fleet.store)
                .connect()
                .await?;
            sqlx::query(older).execute(&mut db).await?;
        }
        let listen = format!("127.0.0.1:{}", crate::harness::free_port());
        let out = crate::harness::run_flotilla(
            &["coordinator", "--listen", &listen, "--store", &fleet.store],
            &[],
        )
        .await?;
        assert_eq!(out.code(), Some(2), "postgres {postgres}: {out}");
        assert!(
            out.stderr
                .contains("is served by another coordinator without etcd"),
            "postgres {postgres}: {out}"
        );
        let now: String = if postgres {
            fleet.pg.query_scalar("control", version).await?
        } else {
            use sqlx::ConnectOptions;
            let mut db = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&fleet.store)
                .connect()
                .await?;
            sqlx::query_scalar(version).fetch_one(&mut db).await?
        };
        assert_eq!(
            now, "5",
            "postgres {postgres}: not upgraded by the refused one"
        );
        assert!(!out.stderr.contains("schema upgraded"), "{out}");
        let dir = coord_dbmate_dir().to_string_lossy().into_owned();
        let out = fleet.cli(&["plan", "submit", &dir, "--wait"]).await?;
        assert_eq!(out.code(), Some(0), "postgres {postgres}: {out}");
        // SIGKILLed, the first leaves no claim behind
        fleet.restart_coordinator().await?;
        fleet.wait_attached(1).await?;
        let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
        assert_eq!(plans.as_array().map(Vec::len), Some(1), "{plans}");
    }
    Ok(())
}

/// A coordinator started on a new control store beside a fleet a store before led: its
/// epoch (1) is below what the shard's fence has seen, and every step it sent failed
/// "fenced", nothing saying why or what to do (an operator restarted it six times to climb).
/// The agent's attach is refused, naming the shard's epoch and the remedy; without etcd the
/// store's epoch is raised, and the next start leads above the shard's.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_store_beside_a_fleet_led_before_is_told_and_raised() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::start(1, 1).await?;
    // epochs climb past the new store's first: each start takes the next
    for _ in 0..2 {
        fleet.restart_coordinator().await?;
        fleet.wait_attached(1).await?;
    }
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &dir, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    fleet.kill_coordinator()?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", fleet.store));
    }
    fleet.restart_coordinator().await?;
    fleet
        .coordinator
        .as_ref()
        .expect("running")
        .wait_for_log("has seen epoch", WAIT)
        .await?;
    let log = fleet.coordinator.as_ref().expect("running").log();
    assert!(
        log.contains("this store's epoch is raised to") && log.contains("restart this coordinator"),
        "{log}"
    );
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    let other = MigrationDir::new()?;
    other.migration(
        "001_after_the_new_store",
        "",
        "ALTER TABLE work_orders ADD COLUMN after_new_store int;",
        "ALTER TABLE work_orders DROP COLUMN after_new_store;",
    )?;
    let (code, st, out) = fleet.submit_wait(other.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    Ok(())
}

/// A plan taken over by a new coordinator lists the failures its term before saw (from
/// their step rows), and its end counts them: it listed none while its waves counted them,
/// and said "1 step(s) failed" of two (rollouts walk-through).
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_taken_over_keeps_its_failures() -> anyhow::Result<()> {
    let mut fleet = crate::fleet::TestFleet::start(1, 2).await?;
    let (failing, blocked) = (
        crate::fleet::tenant_name(0, 0, 2),
        crate::fleet::tenant_name(0, 1, 2),
    );
    let d = MigrationDir::new()?;
    d.migration(
        "001_half",
        "",
        &crate::shards::blocking_sql(
            &format!(
                "DO $$ BEGIN IF current_schema() = '{failing}' THEN \
                 RAISE EXCEPTION 'refused on {failing}'; END IF; END $$"
            ),
            &blocked,
            4242,
        ),
        "SELECT 1",
    )?;
    let held = crate::shards::hold(&fleet.pg, 0, 4242).await?;
    let id = fleet.submit(d.path(), &["--policy", "continue"]).await?;
    wait_until("one failed, one blocked", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok(st["failures"].as_array().map(Vec::len) == Some(1)
            && crate::shards::blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "running", "{st}");
    let failures = st["failures"].as_array().cloned().unwrap_or_default();
    assert_eq!(failures.len(), 1, "{st}");
    assert!(
        failures[0]
            .to_string()
            .contains(&format!("refused on {failing}")),
        "{st}"
    );
    crate::shards::release(held, 4242).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(st["message"], "1 step(s) failed", "{st}");
    assert_eq!(st["failures"].as_array().map(Vec::len), Some(1), "{st}");
    Ok(())
}

/// A plan with work left on a shard whose database stops answering its agent says so in
/// its status (`waiting_for`: `database: shard_0 (...)`): what runs there stands still, and
/// its last progress is not live. Before, only `fleet list` said so, and the plan's status
/// showed the last rate and ETA as if the change went on.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_waiting_on_a_database_that_does_not_answer_its_agent_says_so() -> anyhow::Result<()>
{
    let fleet = crate::fleet::TestFleet::builder(1, 3)
        .agent_args(&["--discover-interval", "1h"])
        .start()
        .await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_z",
        "",
        "SELECT pg_sleep(1.1); ALTER TABLE work_orders ADD COLUMN z int",
        "ALTER TABLE work_orders DROP COLUMN z",
    )?;
    let id = fleet.submit(d.path(), &["--max-parallel", "1"]).await?;
    let out = fleet.cli(&["plan", "pause", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let waits_on_database = async || -> anyhow::Result<bool> {
        let st = fleet.status(&id).await?;
        Ok(st["waiting_for"].as_array().is_some_and(|w| {
            w.iter().any(|w| {
                w.as_str()
                    .is_some_and(|w| w.starts_with("database: shard_0"))
            })
        }))
    };
    // (runs handed out before the pause wait on the agent, counted running)
    wait_until("the pause taken, steps left", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok(st["paused"] == serde_json::json!(["*"])
            && st["migrations"][0]["applied"].as_u64() < Some(3))
    })
    .await?;
    assert!(!waits_on_database().await?);
    crate::shards::cut_off(&fleet.pg, "shard_0", true).await?;
    wait_until("the status naming the database", WAIT, waits_on_database).await?;
    let text = fleet.cli(&["plan", "status", &id]).await?;
    assert!(
        text.stdout.contains(
            "waiting for database: shard_0 (attached, but its database does not answer its agent"
        ),
        "{text}"
    );
    crate::shards::cut_off(&fleet.pg, "shard_0", false).await?;
    wait_until("the database answering again", WAIT, async || {
        Ok(!waits_on_database().await?)
    })
    .await?;
    let out = fleet.cli(&["plan", "resume", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    // Steps over a second are no news: the driver's "slow statement" warning, with the
    // whole SQL of each, is kept out of the log unless asked for.
    let log = fleet.agents[0].as_ref().unwrap().log();
    assert!(!log.contains("slow statement"), "{log}");
    Ok(())
}

/// One member of a three-member etcd killed (a follower: no election): the coordinator takes
/// it out of the members it sends requests to, and plans run one after the other as if it
/// were there, each releasing its shard locks as it ends (the next one never waits for
/// them). Before, a share of every request still went to the dead member: lock releases
/// failed for half a minute, and the next plan waited out the locks' lease. A coordinator
/// started with the member dead starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_etcd_member_is_passed_over() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(1, 2, 2)
        .etcd_members(3)
        .etcd_args(&["--heartbeat-interval=50", "--election-timeout=500"])
        .start()
        .await?;
    let down = (etcd_raft_leader(&fleet).await? + 1) % 3;
    let at_kill = fleet.coordinators[0].as_ref().unwrap().log().len();
    fleet.etcd.cluster_mut().kill_member(down)?;
    fleet.coordinators[0]
        .as_ref()
        .unwrap()
        .wait_for_log("etcd member does not answer", WAIT)
        .await?;
    for i in 0..3 {
        let dir = MigrationDir::new()?;
        dir.migration(
            &format!("00{i}_col_{i}"),
            "",
            &format!("ALTER TABLE work_orders ADD COLUMN col_{i} integer"),
            &format!("ALTER TABLE work_orders DROP COLUMN col_{i}"),
        )?;
        let p = dir.path().to_string_lossy().into_owned();
        let out = fleet
            .cli(&["plan", "submit", &p, "--wait", "--output", "json"])
            .await?;
        assert_eq!(out.code(), Some(0), "{out}");
        // its locks go with it (released just after it ended, within moments): none is
        // left for the next plan to wait out
        wait_until(
            &format!("plan {i}'s locks released"),
            std::time::Duration::from_secs(3),
            async || {
                let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
                Ok(locks["locks"].as_array().is_some_and(Vec::is_empty))
            },
        )
        .await?;
    }
    let log = fleet.coordinators[0].as_ref().unwrap().log();
    assert!(
        !log[at_kill..].contains("releasing shard locks failed"),
        "{}",
        &log[at_kill..]
    );
    // A coordinator restarted with the member still dead starts, each time: its first
    // requests that go to the dead member are asked again of the others. Before, about two
    // starts in five exited 3 ("etcd ... is unavailable: tcp connect error").
    for _ in 0..4 {
        fleet.restart_coordinator_with(0, &[]).await?;
    }
    Ok(())
}

/// A plan cancelled while it waits for the shard locks of a blocked plan ends cancelled at
/// once, nothing of it run (it waited for the other plan to let go: 13 s in a walk-through),
/// and never takes the locks afterwards: the blocked plan, let go, completes, and no lock is
/// left. The same for an atomic plan (aborting, it had nothing to decide).
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_cancelled_while_it_waits_for_locks_ends_at_once() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 2, 2).await?;
    let first = MigrationDir::new()?;
    first.migration(
        "001_first",
        "",
        &blocking_sql("CREATE TABLE first_log (x int)", "tenant_0001", 78),
        "DROP TABLE first_log",
    )?;
    let lock = hold(&fleet.pg, 0, 78).await?;
    let id1 = fleet.submit(first.path(), &[]).await?;
    wait_until("the first plan blocked", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    for (table, extra) in [
        ("second_log", &[][..]),
        ("third_log", &["--atomic"][..]),
        ("fourth_log", &["--policy", "stop"][..]),
    ] {
        let dir = MigrationDir::new()?;
        dir.migration(
            &format!("001_{table}"),
            "",
            &format!("CREATE TABLE {table} (x int)"),
            &format!("DROP TABLE {table}"),
        )?;
        let id = fleet.submit(dir.path(), extra).await?;
        crate::harness::wait_for("the plan to wait for locks", WAIT, async || {
            let st = fleet.status(&id).await?;
            let msg = st["message"].as_str().unwrap_or_default();
            Ok(msg.contains("waiting for shard locks").then_some(st))
        })
        .await?;
        let out = fleet
            .cli(&["plan", "cancel", &id, "--wait", "--output", "json"])
            .await?;
        assert_eq!(out.code(), Some(0), "{out}");
        let st = out.last_json()?;
        assert_eq!(st["state"], "cancelled", "{st}");
        assert!(
            st["message"]
                .as_str()
                .is_some_and(|m| m.contains("ended before it held its shard locks")),
            "{st}"
        );
        // the first plan still holds its locks: the cancel did not wait for them
        assert_eq!(fleet.status(&id1).await?["state"], "running");
    }
    release(lock, 78).await?;
    let out = fleet
        .cli(&["plan", "watch", &id1, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    wait_until("no lock left", WAIT, async || {
        let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(locks["locks"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    for s in 0..2 {
        let n: i64 = fleet
            .pg
            .query_scalar(
                &shard(s),
                "SELECT count(*) FROM pg_class
                  WHERE relname IN ('second_log', 'third_log', 'fourth_log')",
            )
            .await?;
        assert_eq!(n, 0, "shard_{s}: nothing of the cancelled plans ran");
    }
    Ok(())
}
