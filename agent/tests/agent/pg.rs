//! The agent against a real PostgreSQL and a scripted in-process coordinator.
//! Runs when `FLOTILLA_TEST_PG_URL` is set (`postgres://postgres@127.0.0.1:PORT/postgres`);
//! otherwise each test prints a note and passes.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::AssertSqlSafe;

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::coordinator_message::Body as In;

#[tokio::test]
async fn rollout_preflight_and_rollback() {
    let Some(f) = fleet("rollout", 3).await else {
        return;
    };
    let (dsn, pool) = (f.dsn.clone(), f.pool.clone());
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.shard, "shard-test");
    assert_eq!(hello.max_lanes, 4);
    let names: Vec<_> = hello.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["tenant_0000", "tenant_0001", "tenant_0002"]);

    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p1".into(),
        migrations: bench_migrations(),
        default_lock_timeout_ms: 5000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let runs = (0..3)
        .map(|i| run(i, &format!("tenant_{i:04}"), &BENCH, true))
        .collect();
    let results = s.assign("p1", 1, 2, runs).await;
    for r in results.values() {
        assert_eq!(outcomes(r), [pb::StepOutcome::Applied; 3], "{r:?}");
        assert_eq!(r.steps[0].checksum, flotilla_core::checksum(HS_UP));
    }

    // The coordinator's fleet view hears the journal: the whole after the Welcome, then
    // the rows of the targets these runs touched (three migrations on each tenant).
    s.reports_until(|reports| {
        let mut rows: BTreeMap<String, usize> = BTreeMap::new();
        for r in reports {
            if let Out::Journal(j) = r {
                if j.reset {
                    rows.clear();
                }
                for t in &j.targets {
                    rows.remove(t);
                }
                for e in &j.entries {
                    *rows.entry(e.target.clone()).or_default() += 1;
                }
            }
        }
        (0..3).all(|i| rows.get(&format!("tenant_{i:04}")) == Some(&3))
    })
    .await;
    let first = s
        .reports
        .iter()
        .find_map(|r| match r {
            Out::Journal(j) => Some(j),
            _ => None,
        })
        .expect("a journal report");
    assert!(
        first.reset,
        "the first report after the Welcome is whole: {first:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE plan_id = 'p1' AND epoch = 1"
        )
        .await,
        9
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0001.unified_satisfaction"
        )
        .await,
        0
    );
    assert_eq!(count(&pool, "SELECT epoch FROM flotilla.fence").await, 1);
    // each journal row records its step's own start, not its transaction's
    assert_eq!(
        count(
            &pool,
            "SELECT count(DISTINCT started_at) FROM flotilla.journal WHERE target = 'tenant_0000'"
        )
        .await,
        3
    );

    // again: the journal answers, nothing runs
    let runs = (0..3)
        .map(|i| run(10 + i, &format!("tenant_{i:04}"), &BENCH, true))
        .collect();
    for r in s.assign("p1", 1, 2, runs).await.values() {
        assert_eq!(outcomes(r), [pb::StepOutcome::AlreadyApplied; 3], "{r:?}");
        assert_eq!(r.steps[2].checksum, flotilla_core::checksum(VIEW_UP));
        // the plan whose rows they are: this one (a coordinator takes them as its own)
        assert!(r.steps.iter().all(|s| s.applied_by == "p1"), "{r:?}");
    }

    s.send(In::Preflight(pb::PreflightRequest {
        two_phase: false,
        request_id: 7,
        migration_ids: vec![BENCH[0].into()],
        data_migrations: Vec::new(),
        lock_relations: Vec::new(),
    }));
    let Out::Preflight(p) = s.next().await else {
        panic!("preflight reply")
    };
    assert_eq!(
        (
            p.request_id,
            p.tenants.len(),
            p.applied.len(),
            p.error.as_str()
        ),
        (7, 3, 3, "")
    );
    assert_eq!(p.applied[0].plan_id, "p1");

    let reply = s.rollback("p1", 1).await;
    assert!(reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 9);
    assert!(reply.steps.iter().all(|st| st.error.is_none()), "{reply:?}");
    // newest first per target
    let t0: Vec<_> = reply
        .steps
        .iter()
        .filter(|st| st.tenant == "tenant_0000")
        .map(|st| st.migration_id.as_str())
        .collect();
    assert_eq!(t0, [BENCH[2], BENCH[1], BENCH[0]]);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal_history WHERE rolled_back_by_plan = 'p1'"
        )
        .await,
        9
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'satisfaction_rating'").await,
        0
    );
    // the shard itself as the target: no search_path of its own, journal target ''
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p1s".into(),
        migrations: vec![migration(
            "shard_marker",
            "CREATE TABLE public.shard_marker (id int)",
            "DROP TABLE public.shard_marker",
            "",
        )],
        ..Default::default()
    }));
    let r = s
        .assign("p1s", 1, 1, vec![run(20, "", &["shard_marker"], true)])
        .await;
    assert_eq!(outcomes(&r[&20]), [pb::StepOutcome::Applied]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE target = '' AND plan_id = 'p1s'"
        )
        .await,
        1
    );
    let reply = s.rollback("p1s", 1).await;
    assert!(
        reply.complete && reply.steps.len() == 1 && reply.steps[0].tenant.is_empty(),
        "{reply:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'shard_marker'"
        )
        .await,
        0
    );

    let again = s.rollback("p1", 1).await;
    assert!(again.complete && again.steps.is_empty(), "{again:?}");
    h.stop().await;
    f.drop().await;
}

#[tokio::test]
async fn failures_fence_and_non_transactional_steps() {
    let Some(f) = fleet("failures", 2).await else {
        return;
    };
    let (dsn, pool) = (f.dsn.clone(), f.pool.clone());
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, _) = h.attach(5).await;
    let mut migrations = bench_migrations();
    migrations.push(migration(
        "bad",
        "ALTER TABLE nope ADD COLUMN x int",
        "",
        "",
    ));
    migrations.push(migration(
        "unverified",
        "CREATE TABLE marker (id int)",
        "DROP TABLE marker",
        "SELECT false",
    ));
    migrations.push(migration(
        "verify_not_boolean",
        "CREATE TABLE marker2 (id int)",
        "DROP TABLE marker2",
        "SELECT 42",
    ));
    migrations.push(migration(
        "verify_typo",
        "CREATE TABLE marker3 (id int)",
        "DROP TABLE marker3",
        "SELECT count(no_such_column) = 0 FROM marker3",
    ));
    migrations.push(migration(
        "concurrent_index_verify_typo",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_wo_typo ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_wo_typo",
        "SELECT count(*) = 1 FROM no_such_table",
    ));
    migrations.push(migration(
        "concurrent_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_wo_customer ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_wo_customer",
        "SELECT count(*) = 1 FROM pg_indexes WHERE indexname = 'idx_wo_customer' AND schemaname = current_schema()",
    ));
    migrations.push(migration("idem", "SELECT pg_sleep(0.4)", "SELECT 1", ""));
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p2".into(),
        migrations,
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));

    // applied by someone else while it ran: the journal's primary key says so
    let r = run_while_another_applies(&mut s, &pool, "p2", 5, 100, "tenant_0001").await;
    assert_eq!(outcomes(&r), [pb::StepOutcome::AlreadyApplied], "{r:?}");
    assert_eq!(r.steps[0].checksum, "theirs");
    assert_eq!(r.steps[0].applied_by, "other", "another plan's row: {r:?}");
    sqlx::raw_sql("DELETE FROM flotilla.journal")
        .execute(&pool)
        .await
        .unwrap();

    // fused: the failure takes the whole run with it
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![run(1, "tenant_0000", &[BENCH[0], "bad"], true)],
        )
        .await;
    assert_eq!(
        outcomes(&r[&1]),
        [pb::StepOutcome::NotRun, pb::StepOutcome::Failed]
    );
    let e = r[&1].steps[1].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("42P01", "up"),
        "{e:?}"
    );
    assert!(e.message.contains("nope"), "{e:?}");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );

    // unfused: what came before stays, what comes after does not run
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![run(2, "tenant_0000", &[BENCH[0], "bad", BENCH[1]], false)],
        )
        .await;
    assert_eq!(
        outcomes(&r[&2]),
        [
            pb::StepOutcome::Applied,
            pb::StepOutcome::Failed,
            pb::StepOutcome::NotRun
        ]
    );

    // verify
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![run(3, "tenant_0001", &["unverified"], true)],
        )
        .await;
    let e = r[&3].steps[0].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("FL003", "verify"),
        "{e:?}"
    );
    assert_eq!(e.message, "verify of unverified returned false");
    // a verify query that is not a boolean is named as such (not as a function the agent
    // calls that does not exist)
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![run(31, "tenant_0001", &["verify_not_boolean"], true)],
        )
        .await;
    let e = r[&31].steps[0].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("42883", "verify"),
        "{e:?}"
    );
    assert!(
        e.message.contains("returns integer, not one boolean"),
        "{e:?}"
    );
    // an error the server places in the verify query is the verify's, not the up's, in a
    // transactional step and in one that is not
    for (run_id, id, sqlstate, message) in [
        (
            32,
            "verify_typo",
            "42703",
            "verify query: column \"no_such_column\" does not exist",
        ),
        (
            33,
            "concurrent_index_verify_typo",
            "42P01",
            "verify query: relation \"no_such_table\" does not exist",
        ),
    ] {
        let r = s
            .assign("p2", 5, 2, vec![run(run_id, "tenant_0001", &[id], true)])
            .await;
        let e = r[&run_id].steps[0].error.clone().unwrap();
        assert_eq!(
            (e.sqlstate.as_str(), e.phase.as_str(), e.message.as_str()),
            (sqlstate, "verify", message),
            "{id}: {e:?}"
        );
    }

    // fence: an older epoch changes nothing
    let r = s
        .assign("p2", 4, 2, vec![run(4, "tenant_0001", &[BENCH[0]], true)])
        .await;
    let e = r[&4].steps[0].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("FL002", "fence"),
        "{e:?}"
    );
    assert_eq!(
        e.message,
        "fenced: epoch 4 is older than the shard's epoch 5"
    );

    // non-transactional, alone and in a fused run with transactional steps
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![
                run(5, "tenant_0000", &["concurrent_index"], true),
                run(
                    6,
                    "tenant_0001",
                    &[BENCH[0], "concurrent_index", BENCH[1]],
                    true,
                ),
            ],
        )
        .await;
    assert_eq!(outcomes(&r[&5]), [pb::StepOutcome::Applied]);
    assert_eq!(
        outcomes(&r[&6]),
        [pb::StepOutcome::Applied; 3],
        "{:?}",
        r[&6]
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_wo_customer'"
        )
        .await,
        2
    );
    // the session settings of a non-transactional step do not leak into the pool
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE plan_id = 'p2'"
        )
        .await,
        5
    );

    let reply = s.rollback("p2", 5).await;
    assert!(reply.complete, "{reply:?}");
    // the five applied, and the non-transactional step whose verify failed after its index
    // was built (its checkpoint says so)
    assert_eq!(reply.steps.len(), 6, "{reply:?}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_wo_typo'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_wo_customer'"
        )
        .await,
        0
    );

    // rollback of a step whose down fails stops that target and says so
    let r = s
        .assign(
            "p2",
            5,
            2,
            vec![run(7, "tenant_0000", &[BENCH[0], BENCH[1]], true)],
        )
        .await;
    assert_eq!(outcomes(&r[&7]), [pb::StepOutcome::Applied; 2]);
    sqlx::raw_sql("DROP INDEX tenant_0000.idx_repair_orders_satisfaction")
        .execute(&pool)
        .await
        .unwrap();
    let reply = s.rollback("p2", 5).await;
    assert!(!reply.complete);
    assert_eq!(reply.steps.len(), 1, "{reply:?}");
    let e = reply.steps[0].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("42704", "down"),
        "{e:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE plan_id = 'p2'"
        )
        .await,
        2
    );
    h.stop().await;
    f.drop().await;
}

#[tokio::test]
async fn halt_reconnect_and_tenant_query() {
    let Some(f) = fleet("halt", 4).await else {
        return;
    };
    let (dsn, pool) = (f.dsn.clone(), f.pool.clone());
    let mut h = Harness::start(
        |c| {
            c.tenant_pattern = None;
            c.tenant_query = Some(
                "SELECT nspname, jsonb_build_object('tier', CASE WHEN nspname < 'tenant_0002' THEN 'gold' ELSE 'free' END) \
                 FROM pg_namespace WHERE nspname LIKE 'tenant%' ORDER BY 1"
                    .into(),
            );
        },
        &dsn,
    )
    .await;
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.tenants.len(), 4);
    assert_eq!(
        hello.tenants[0].labels.get("tier").map(String::as_str),
        Some("gold")
    );
    assert_eq!(
        hello.tenants[3].labels.get("tier").map(String::as_str),
        Some("free")
    );

    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p3".into(),
        migrations: vec![migration("slow", "SELECT pg_sleep(0.3)", "SELECT 1", "")],
        ..Default::default()
    }));
    let runs = (0..4)
        .map(|i| run(i, &format!("tenant_{i:04}"), &["slow"], true))
        .collect();
    s.send(In::Assign(pb::Assign {
        plan_id: "p3".into(),
        epoch: 1,
        lanes: 1,
        runs,
    }));
    // the first run is under way (one lane: the others wait in its queue)
    wait_running(&f.pool, "pg_sleep(0.3)").await;
    s.send(In::Halt(pb::Halt {
        plan_id: "p3".into(),
    }));
    let results = s.results("p3", 4).await;
    let applied = results
        .values()
        .filter(|r| outcomes(r) == [pb::StepOutcome::Applied])
        .count();
    let not_run = results
        .values()
        .filter(|r| outcomes(r) == [pb::StepOutcome::NotRun])
        .count();
    assert_eq!((applied, not_run), (1, 3), "{results:?}");

    // the coordinator goes away; the agent comes back with a fresh Hello
    sqlx::raw_sql("CREATE SCHEMA tenant_0004")
        .execute(&pool)
        .await
        .unwrap();
    drop(s);
    let (mut s, hello) = h.attach(2).await;
    assert_eq!(hello.tenants.len(), 5);
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p3".into(),
        migrations: vec![migration("slow", "SELECT pg_sleep(0.3)", "SELECT 1", "")],
        ..Default::default()
    }));
    let r = s
        .assign("p3", 2, 2, vec![run(9, "tenant_0000", &["slow"], true)])
        .await;
    assert_eq!(outcomes(&r[&9]), [pb::StepOutcome::AlreadyApplied]);
    h.stop().await;
    f.drop().await;
}

/// The coordinated example over every tenant of a `make-fleet.sh` shard with 8 lanes, timed
/// like `baseline-psql-floor.sh` (reset the shard first). Runs when `FLOTILLA_AGENT_BENCH_DSN`
/// names such a shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rollout_over_a_fleet_shard() {
    let Ok(dsn) = std::env::var("FLOTILLA_AGENT_BENCH_DSN") else {
        println!("FLOTILLA_AGENT_BENCH_DSN is not set: skipping the rollout benchmark");
        return;
    };
    let mut h = Harness::start(|c| c.max_connections = 8, &dsn).await;
    let (mut s, hello) = h.attach(1).await;
    // as the benchmark has them: no verify
    let migrations = bench_migrations()
        .into_iter()
        .map(|m| pb::Migration {
            verify_sql: String::new(),
            ..m
        })
        .collect();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "bench".into(),
        migrations,
        ..Default::default()
    }));
    let runs: Vec<_> = hello
        .tenants
        .iter()
        .enumerate()
        .map(|(i, t)| run(i as u64, &t.name, &BENCH, true))
        .collect();
    let n = runs.len();
    let started = std::time::Instant::now();
    let results = s.assign("bench", 1, 8, runs).await;
    let secs = started.elapsed().as_secs_f64();
    assert!(
        results
            .values()
            .all(|r| outcomes(r) == [pb::StepOutcome::Applied; 3])
    );
    println!("agent rollout: {n} tenants x 3 migrations, 8 lanes: {secs:.3} s");
    h.stop().await;
}

/// A fused run's steps each report their own time, by the server's clock: the server sends
/// a query's results when the whole query is done, so the arrival of each step's mark would
/// give the first step the whole run's time and the others none.
#[tokio::test]
async fn each_step_of_a_fused_run_reports_its_own_time() {
    let Some(f) = fleet("step_times", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(5).await;
    let mut migrations = bench_migrations();
    migrations.push(migration("slow", "SELECT pg_sleep(0.3)", "SELECT 1", ""));
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p3".into(),
        migrations,
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "p3",
            5,
            1,
            vec![run(1, "tenant_0000", &[BENCH[0], "slow"], true)],
        )
        .await;
    assert_eq!(
        outcomes(&r[&1]),
        [pb::StepOutcome::Applied, pb::StepOutcome::Applied]
    );
    let ms: Vec<u64> = r[&1].steps.iter().map(|s| s.duration_ms).collect();
    assert!(ms[1] >= 300, "the sleeping step took 0.3 s: {ms:?}");
    assert!(ms[0] < 300, "the first step did not sleep: {ms:?}");
}

/// A pause holds the runs queued at the agent: none starts until the resume (runs handed
/// out before a pause ran on, and a paused plan completed). Both runs wait, and run after
/// the resume.
#[tokio::test]
async fn a_pause_holds_the_runs_queued_here_until_the_resume() {
    let Some(f) = fleet("paused_queue", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "held".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    let pause = |paused: bool| {
        In::Pause(pb::Pause {
            plan_id: "held".into(),
            paused,
            reason: String::new(),
        })
    };
    s.send(pause(true));
    s.send(In::Assign(pb::Assign {
        plan_id: "held".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![
            run(1, "tenant_0000", &BENCH, true),
            run(2, "tenant_0001", &BENCH, true),
        ],
    }));
    // while paused: heartbeats, no result (a run takes milliseconds here)
    let mut heartbeats = 0;
    while heartbeats < 5 {
        match s.inbound_next().await {
            Out::Heartbeat(_) => heartbeats += 1,
            Out::Journal(_) | Out::Schema(_) | Out::Tenants(_) => {}
            other => panic!("nothing but heartbeats while the plan is paused, got {other:?}"),
        }
    }
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0,
        "nothing applied while paused"
    );
    s.send(pause(false));
    let r = s.results("held", 2).await;
    for id in [1, 2] {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Applied; 3], "run {id}");
    }
}

/// A paused plan halted (a cancel, a rollback, a failure elsewhere under `stop`): its queued
/// runs are not run, and its lanes, which waited for a resume a halted plan never gets, end
/// and give back their slots (they held them, and the next plan's runs waited for good).
#[tokio::test]
async fn a_paused_plan_halted_gives_back_its_lanes() {
    let Some(f) = fleet("paused_halt", 4).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    for plan in ["held", "next"] {
        s.send(In::Plan(pb::PlanDefinition {
            plan_id: plan.into(),
            migrations: bench_migrations(),
            ..Default::default()
        }));
    }
    s.send(In::Pause(pb::Pause {
        plan_id: "held".into(),
        paused: true,
        reason: String::new(),
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "held".into(),
        epoch: 1,
        lanes: 4,
        runs: (0..4)
            .map(|i| run(i + 1, &format!("tenant_000{i}"), &BENCH, true))
            .collect(),
    }));
    // the lanes read the journal and wait for the resume: heartbeats only
    let mut heartbeats = 0;
    while heartbeats < 3 {
        match s.inbound_next().await {
            Out::Heartbeat(_) => heartbeats += 1,
            Out::Journal(_) | Out::Schema(_) | Out::Tenants(_) => {}
            other => panic!("nothing but heartbeats while the plan is paused, got {other:?}"),
        }
    }
    s.send(In::Halt(pb::Halt {
        plan_id: "held".into(),
    }));
    let r = s.results("held", 4).await;
    for id in 1..=4 {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::NotRun; 3], "run {id}");
    }
    // every slot free again: the next plan runs on all four
    let r = s
        .assign(
            "next",
            1,
            4,
            (0..4)
                .map(|i| run(i + 11, &format!("tenant_000{i}"), &BENCH, true))
                .collect(),
        )
        .await;
    for id in 11..=14 {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Applied; 3], "run {id}");
    }
}

/// A CREATE INDEX CONCURRENTLY that fails drops the INVALID index it left (the shard is as
/// it was), but never an index whose name was taken before it ran: there a failure
/// (42P07) is about someone else's index, INVALID from an earlier attempt by hand or still
/// being built by another session, and before, the agent dropped it.
#[tokio::test]
async fn a_failed_concurrent_index_drops_only_the_index_it_left() {
    let Some(f) = fleet("cic_invalid", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    for t in ["tenant_0000", "tenant_0001"] {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {t}.dup (x int); INSERT INTO {t}.dup VALUES (1), (1);"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    // someone's own attempt, by hand, left an INVALID index in tenant_0000
    let theirs = sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY idx_dup ON tenant_0000.dup (x)")
        .execute(&pool)
        .await;
    assert!(theirs.is_err(), "the duplicates fail the unique index");
    let invalid = "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                   WHERE c.relname = 'idx_dup' AND NOT i.indisvalid";
    assert_eq!(count(&pool, invalid).await, 1);

    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(5).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pc".into(),
        migrations: vec![migration(
            "dup_index",
            "CREATE UNIQUE INDEX CONCURRENTLY idx_dup ON dup (x)",
            "DROP INDEX CONCURRENTLY IF EXISTS idx_dup",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "pc",
            5,
            2,
            vec![
                run(1, "tenant_0000", &["dup_index"], true),
                run(2, "tenant_0001", &["dup_index"], true),
            ],
        )
        .await;
    // tenant_0000: the name was taken; the index there is left as it was
    let e = r[&1].steps[0].error.clone().unwrap();
    assert_eq!(e.sqlstate, "42P07", "{e:?}");
    // tenant_0001: the step's own INVALID index (a unique violation) is dropped
    let e = r[&2].steps[0].error.clone().unwrap();
    assert_eq!(e.sqlstate, "23505", "{e:?}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'idx_dup' AND n.nspname = 'tenant_0000'"
        )
        .await,
        1,
        "someone else's index stays"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'idx_dup' AND n.nspname = 'tenant_0001'"
        )
        .await,
        0,
        "the index the step left is dropped"
    );
    // `IF NOT EXISTS` passes over the INVALID index: the step fails, naming it, rather than
    // being recorded applied with no working index
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pc2".into(),
        migrations: vec![migration(
            "dup_index_ine",
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS idx_dup ON dup (x)",
            "DROP INDEX CONCURRENTLY IF EXISTS idx_dup",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "pc2",
            5,
            1,
            vec![run(3, "tenant_0000", &["dup_index_ine"], true)],
        )
        .await;
    assert_eq!(outcomes(&r[&3]), [pb::StepOutcome::Failed], "{:?}", r[&3]);
    let e = r[&3].steps[0].error.clone().unwrap();
    assert!(
        e.message
            .contains("\"tenant_0000\".\"idx_dup\" was there already, INVALID"),
        "{e:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE migration_id = 'dup_index_ine'"
        )
        .await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A statement that may have left part of its work committed when its lock times out is not
/// tried again by the agent: a procedure that commits inside (a retry would do the part
/// before the timeout again), and a CREATE INDEX CONCURRENTLY whose INVALID index could not
/// be dropped (its drop waits for the same session; a retry would fail on the name). Each
/// fails once, saying what is left; before, each was run three more times.
#[tokio::test]
async fn a_statement_that_may_have_committed_part_way_is_not_tried_again() {
    let Some(f) = fleet("part_way_retry", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.calls (n int);
         CREATE PROCEDURE tenant_0000.count_then_lock() LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO tenant_0000.calls VALUES (1);
           COMMIT;
           LOCK TABLE tenant_0000.work_orders IN ACCESS EXCLUSIVE MODE;
         END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pr".into(),
        migrations: vec![
            migration(
                "commits_inside",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS wo_a ON work_orders (id); \
                 CALL count_then_lock()",
                "",
                "",
            ),
            migration(
                "index_left",
                "CREATE INDEX CONCURRENTLY wo_b ON work_orders (id)",
                "DROP INDEX CONCURRENTLY IF EXISTS wo_b",
                "",
            ),
        ],
        default_lock_timeout_ms: 200,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    // a session holds tenant_0000's table: the procedure's LOCK waits on it
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tenant_0000.work_orders IN ACCESS SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let r = s
        .assign(
            "pr",
            1,
            1,
            vec![run(1, "tenant_0000", &["commits_inside"], false)],
        )
        .await;
    holder.rollback().await.unwrap();
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{:?}", r[&1]);
    let e = r[&1].steps[0].error.clone().unwrap();
    assert_eq!(e.sqlstate, "55P03", "{e:?}");
    assert!(e.message.contains("up statement 2 commits inside"), "{e:?}");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM tenant_0000.calls").await,
        1,
        "the procedure ran once"
    );

    // a session has read tenant_0001's table in a snapshot it keeps: the index build waits
    // for the snapshot, and the drop of what it left for the session's lock
    let mut holder = pool.begin().await.unwrap();
    sqlx::raw_sql(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
         SELECT count(*) FROM tenant_0001.work_orders",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let r = s
        .assign(
            "pr",
            1,
            1,
            vec![run(2, "tenant_0001", &["index_left"], false)],
        )
        .await;
    holder.rollback().await.unwrap();
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Failed], "{:?}", r[&2]);
    let e = r[&2].steps[0].error.clone().unwrap();
    assert_eq!(e.sqlstate, "55P03", "{e:?}");
    assert!(
        e.message
            .contains("the INVALID index \"tenant_0001\".\"wo_b\" it left could not be dropped"),
        "{e:?}"
    );
    h.stop().await;
    f.drop().await;
}

/// Tenant discovery never takes a system schema (a `%` pattern finds `pg_catalog` and the
/// agent's own `flotilla`, where a tenant migration's `DROP TABLE IF EXISTS journal` would
/// drop the journal), and a tenant query's name with no schema of that name (a registry
/// that says `Tenant_0001` of `tenant_0001`) is skipped, not a target whose steps all fail.
#[tokio::test]
async fn tenant_discovery_skips_system_schemas_and_names_with_no_schema() {
    let Some(f) = fleet("discovery", 2).await else {
        return;
    };
    let mut h = Harness::start(
        |c| {
            c.tenant_pattern = Some("%".into());
        },
        &f.dsn,
    )
    .await;
    let (_s, hello) = h.attach(1).await;
    let names: Vec<&str> = hello.tenants.iter().map(|t| t.name.as_str()).collect();
    for system in ["flotilla", "pg_catalog", "pg_toast", "information_schema"] {
        assert!(!names.contains(&system), "{system} is a tenant: {names:?}");
    }
    for tenant in ["tenant_0000", "tenant_0001", "public"] {
        assert!(names.contains(&tenant), "{tenant} is missing: {names:?}");
    }
    h.stop().await;

    let mut h = Harness::start(
        |c| {
            c.tenant_pattern = None;
            c.tenant_query = Some(
                "VALUES ('tenant_0000'), ('Tenant_0001'), ('ghost'), ('flotilla'), ('pg_catalog')"
                    .into(),
            );
        },
        &f.dsn,
    )
    .await;
    let (_s, hello) = h.attach(1).await;
    let names: Vec<&str> = hello.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["tenant_0000"]);
    h.stop().await;
    f.drop().await;
}

/// A tenant query that fails stops the agent before it writes anything to the shard (its
/// schema, and which shard the database is: a typo'd `--shard` beside a bad query used to
/// leave that record, and every later start under the right name was refused); and the
/// query runs READ ONLY, so one that writes fails instead of writing.
#[tokio::test]
async fn a_bad_tenant_query_stops_the_agent_before_it_writes_to_the_shard() {
    let Some(f) = fleet("bad_query", 1).await else {
        return;
    };
    sqlx::raw_sql("CREATE TABLE public.registry (name text)")
        .execute(&f.pool)
        .await
        .unwrap();
    // A query the server refuses for what it says is bad configuration (exit 2); one it
    // cannot run here (a write, in the read-only discovery) a failure of discovery.
    for (query, what, says) in [
        (
            "SELEC nspname FROM pg_namespace",
            "shard s0: invalid configuration: --tenant-query",
            "syntax error",
        ),
        (
            "INSERT INTO public.registry VALUES ('tenant_0000') RETURNING name",
            "shard s0: discovering tenants",
            "read-only transaction",
        ),
    ] {
        let mut config = flotilla_agent::AgentConfig::new("s0", &f.dsn, "http://127.0.0.1:1");
        config.tenant_pattern = None;
        config.tenant_query = Some(query.into());
        let err = flotilla_agent::start(config, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(what) && err.contains(says), "{query}: {err}");
    }
    assert_eq!(
        count(
            &f.pool,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'flotilla'"
        )
        .await,
        0,
        "nothing of the agent's on the shard"
    );
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM public.registry").await,
        0
    );
    f.drop().await;
}

/// Two rollback requests for one plan at once (the coordinator asks again on every new
/// stream, and one may come while the first still undoes) undo each step once: before, both
/// read the same journal rows and each ran the down SQL, so a counting down SQL counted two.
#[tokio::test]
async fn two_rollbacks_at_once_undo_each_step_once() {
    let Some(f) = fleet("double_undo", 1).await else {
        return;
    };
    sqlx::raw_sql("CREATE TABLE public.undos (n int); INSERT INTO public.undos VALUES (0);")
        .execute(&f.pool)
        .await
        .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pu".into(),
        migrations: vec![migration(
            "counted",
            "CREATE TABLE counted (x int)",
            "UPDATE public.undos SET n = n + 1; SELECT pg_sleep(0.3); DROP TABLE IF EXISTS counted",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("pu", 1, 1, vec![run(1, "tenant_0000", &["counted"], true)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied]);
    for _ in 0..2 {
        s.send(In::Rollback(pb::RollbackRequest {
            plan_id: "pu".into(),
            epoch: 1,
            lanes: 1,
            request: 1,
        }));
    }
    let mut undone = 0;
    for _ in 0..2 {
        match s.next().await {
            Out::Rollback(r) => {
                assert!(r.complete, "{r:?}");
                undone += r.steps.len();
            }
            other => panic!("expected a rollback reply, got {other:?}"),
        }
    }
    assert_eq!(
        undone, 1,
        "one reply undid the step, the other found it undone"
    );
    assert_eq!(
        count(&f.pool, "SELECT n::bigint FROM public.undos").await,
        1
    );
    h.stop().await;
    f.drop().await;
}

/// What a step's SQL sets for its session (a role, a search_path without LOCAL, a temporary
/// table) ends with its run: the next tenant's run on the same connection (one lane) starts
/// clean. Before, it ran as the role the last step took, and found the last tenant's
/// temporary table before making its own.
#[tokio::test]
async fn a_run_leaves_no_session_state_to_the_next_tenant() {
    let Some(f) = fleet("session_reset", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    let role = "flotilla_test_leak_role";
    fresh_superuser_role(&pool, role).await;
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "sr".into(),
        migrations: vec![
            migration(
                "leaky",
                &format!(
                    "SET ROLE {role}; SELECT set_config('search_path', 'tenant_0000', false); \
                     CREATE TEMP TABLE scratch AS SELECT current_schema()::text AS who; \
                     CREATE TABLE tenant_0000.backend AS SELECT pg_backend_pid() AS pid"
                ),
                "",
                "",
            ),
            migration(
                "reader",
                "CREATE TEMP TABLE IF NOT EXISTS scratch AS SELECT current_schema()::text AS who; \
                 CREATE TABLE seen AS SELECT (SELECT who FROM scratch) AS scratch_who, \
                 current_user::text AS role_name, pg_backend_pid() AS pid",
                "DROP TABLE IF EXISTS seen",
                "",
            ),
        ],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "sr",
            1,
            1,
            vec![
                run(1, "tenant_0000", &["leaky"], true),
                run(2, "tenant_0001", &["reader"], true),
            ],
        )
        .await;
    for id in [1, 2] {
        assert_eq!(
            outcomes(&r[&id]),
            [pb::StepOutcome::Applied],
            "{:?}",
            r[&id]
        );
    }
    let (scratch_who, role_name, same_session): (String, String, bool) = sqlx::query_as(
        "SELECT scratch_who, role_name, pid = (SELECT pid FROM tenant_0000.backend) \
         FROM tenant_0001.seen",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(same_session, "both runs on the lane's one connection");
    assert_eq!(scratch_who, "tenant_0001", "its own temporary table");
    assert_eq!(role_name, current_user(&pool).await, "the agent's own role");
    h.stop().await;
    // (the agent's sessions, and any temporary table of the role, are gone)
    drop_role(&pool, role).await;
    f.drop().await;
}

/// A rollback under the application's locks: an undo that times out on a lock is tried
/// again after a pause, as a step is, and only what timed out (a transactional undo whole,
/// a non-transactional step's down statement alone: the ones before it are done, and a
/// decrement run twice would be wrong). Before, the rollback failed at the first timeout,
/// and the next one ran the down SQL from its start.
#[tokio::test]
async fn an_undo_that_times_out_on_a_lock_is_tried_again_from_where_it_was() {
    let Some(f) = fleet("undo_lock", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.counter (n int); INSERT INTO tenant_0000.counter VALUES (0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mark = log_mark();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "ul".into(),
        migrations: vec![
            migration(
                "outside",
                "CREATE INDEX CONCURRENTLY wo_c ON work_orders (id); \
                 ALTER TABLE work_orders ADD COLUMN x int; \
                 UPDATE counter SET n = n + 1",
                "UPDATE counter SET n = n - 1; \
                 ALTER TABLE work_orders DROP COLUMN IF EXISTS x; \
                 DROP INDEX CONCURRENTLY IF EXISTS wo_c",
                "",
            ),
            migration(
                "inside",
                "ALTER TABLE work_orders ADD COLUMN y int",
                "ALTER TABLE work_orders DROP COLUMN y",
                "",
            ),
        ],
        default_lock_timeout_ms: 200,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "ul",
            1,
            2,
            vec![
                run(1, "tenant_0000", &["outside"], false),
                run(2, "tenant_0001", &["inside"], false),
            ],
        )
        .await;
    for id in [1, 2] {
        assert_eq!(
            outcomes(&r[&id]),
            [pb::StepOutcome::Applied],
            "{:?}",
            r[&id]
        );
    }
    let counter = "SELECT n::bigint FROM tenant_0000.counter";
    assert_eq!(count(&pool, counter).await, 1);

    // the application holds both tables until each undo has timed out once
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tenant_0000.work_orders, tenant_0001.work_orders IN ACCESS SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (reply, ()) = tokio::join!(s.rollback("ul", 1), async {
        wait_for_log(mark, "lock timeout in down statement 2 of step outside").await;
        wait_for_log(mark, "lock timeout in the undo of step inside").await;
        holder.rollback().await.unwrap();
    });
    assert!(reply.complete && reply.steps.len() == 2, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    assert_eq!(count(&pool, counter).await, 0, "decremented once");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'wo_c'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'work_orders' AND column_name IN ('x', 'y')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// Applies migration `id` (`up`, `down`) on tenant_0000 of a fresh shard, then rolls the
/// plan back while an application transaction has read the tenant's `work_orders` (open
/// through every attempt of the undo, rolled back after): the fleet, its agent's harness,
/// and the undo's error.
async fn undo_under_an_open_read(
    db: &str,
    id: &str,
    up: &str,
    down: &str,
) -> Option<(Fleet, Harness, pb::StepError)> {
    let f = fleet(db, 1).await?;
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "u".into(),
        migrations: vec![migration(id, up, down, "")],
        default_lock_timeout_ms: 200,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("u", 1, 1, vec![run(1, "tenant_0000", &[id], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    let mut holder = f.pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM tenant_0000.work_orders")
        .execute(&mut *holder)
        .await
        .unwrap();
    let reply = s.rollback("u", 1).await;
    holder.rollback().await.unwrap();
    let e = reply.steps[0].error.clone().expect("the undo failed");
    Some((f, h, e))
}

/// A rollback's undo that gives up waiting for its lock names the table and the session
/// that holds it, as a step's error does. Before, the lock timeout alone: the operator had
/// to find the session in pg_stat_activity during the incident.
#[tokio::test]
async fn an_undo_that_gives_up_on_a_lock_names_who_holds_it() {
    let Some((f, h, e)) = undo_under_an_open_read(
        "undo_blocker",
        "column",
        "ALTER TABLE work_orders ADD COLUMN z int",
        "ALTER TABLE work_orders DROP COLUMN z",
    )
    .await
    else {
        return;
    };
    assert!(
        e.message.contains("4 attempts")
            && e.message
                .contains("waiting for a lock on tenant_0000.work_orders held by pid"),
        "{e:?}"
    );
    h.stop().await;
    f.drop().await;
}

/// A DROP INDEX CONCURRENTLY of a rollback that gives up waiting for the application's
/// transaction has marked its index invalid already: the error says so (no query uses
/// it, every write maintains it) and what finishes it. Before, it said the lock timeout
/// alone, and the index was found invalid on the tenant by hand.
#[tokio::test]
async fn an_index_drop_cut_short_in_a_rollback_names_the_invalid_index_it_leaves() {
    let Some((f, h, e)) = undo_under_an_open_read(
        "undo_invalid",
        "index",
        "CREATE INDEX CONCURRENTLY wo_d ON work_orders (id)",
        "DROP INDEX CONCURRENTLY IF EXISTS wo_d",
    )
    .await
    else {
        return;
    };
    assert!(
        e.message.contains("lock timeout")
            && e.message
                .contains("this DROP INDEX CONCURRENTLY may have left its index INVALID")
            && e.message.contains("held by pid"),
        "who it waited for is named: {e:?}"
    );
    let pool = f.pool.clone();
    let invalid = "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                   WHERE c.relname = 'wo_d' AND NOT i.indisvalid";
    assert_eq!(count(&pool, invalid).await, 1, "as the error says");
    h.stop().await;
    f.drop().await;
}

/// A text key's values reach the batch SQL as literals that read the same whatever
/// `standard_conforming_strings` is: here the migration turns it off for its session (its
/// batches run in it) and keys end in a backslash. Before, such a key ended its literal
/// early: the batch failed on a syntax error, and a crafted key could add SQL of its own.
#[tokio::test]
async fn key_literals_hold_with_standard_conforming_strings_off() {
    let Some(f) = fleet("key_escape", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        r"CREATE TABLE tenant_0000.codes (code text PRIMARY KEY, n int NOT NULL DEFAULT 0);
          CREATE TABLE tenant_0000.victim (x int);
          INSERT INTO tenant_0000.codes (code) VALUES ('a\'), ('b\'), ('c\\d'), ('e''\'),
            ('x\''); DROP TABLE tenant_0000.victim; --');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "ke".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "codes".into(),
                key: "code".into(),
                batch_size: 1,
                batch_sql: "UPDATE codes SET n = n + 1 WHERE code > $1 AND code <= $2".into(),
                ..Default::default()
            }),
            ..migration(
                "count_codes",
                "SET standard_conforming_strings = off",
                "",
                "SELECT count(*) = 0 FROM codes WHERE n <> 1",
            )
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "ke",
            1,
            1,
            vec![run(1, "tenant_0000", &["count_codes"], false)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    assert_eq!(
        count(&pool, "SELECT sum(n)::bigint FROM tenant_0000.codes").await,
        5,
        "each row once"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM tenant_0000.victim").await,
        0,
        "the table a key's text names is still there"
    );
    h.stop().await;
    f.drop().await;
}

/// Prior images left on the shard by an earlier run of a change whose checkpoint is gone
/// (deleted by hand after another version stopped part-way, as the refusal of that version
/// says) are not mixed with a new run's: the first batch refuses to begin over them,
/// naming them, and changes nothing. Before, both runs' images were kept under the same
/// batch numbers, and an undo restored either, or NULLs for the columns one lacked.
#[tokio::test]
async fn a_change_does_not_begin_over_prior_images_of_an_earlier_run() {
    let Some(f) = fleet("orphan_images", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "oi".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: 7,
                batch_sql: "UPDATE work_orders SET priority = 'high' WHERE id > $1 AND id <= $2"
                    .into(),
                prior_image: vec!["priority".into()],
                ..Default::default()
            }),
            ..migration("escalate", "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    // an earlier version's image of batch 1, its checkpoint deleted
    sqlx::raw_sql(
        "INSERT INTO flotilla.prior_images (target, migration_id, batch, image) \
         VALUES ('tenant_0000', 'escalate', 1, '{\"id\": 1, \"priority\": \"low\"}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let high = "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'high'";
    let before = count(&pool, high).await;
    let r = s
        .assign(
            "oi",
            1,
            1,
            vec![run(1, "tenant_0000", &["escalate"], false)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{:?}", r[&1]);
    let e = r[&1].steps[0].error.as_ref().unwrap();
    assert!(
        e.message
            .contains("prior images of an earlier run of escalate")
            && e.message.contains("tenant_0000"),
        "{e:?}"
    );
    assert_eq!(count(&pool, high).await, before, "no batch done");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.prior_images").await,
        1,
        "the earlier run's image left as it was"
    );
    h.stop().await;
    f.drop().await;
}

/// A key whose only unique index is INVALID (a concurrent build that failed on
/// duplicates left it) is not unique: the change refuses it, naming the table, before any
/// batch. Before, the INVALID index passed for one, and the batches and a prior image's
/// restore keyed on values two rows share.
#[tokio::test]
async fn an_invalid_unique_index_does_not_make_a_key_unique() {
    let Some(f) = fleet("invalid_key", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.pairs (k int, v int); \
         INSERT INTO tenant_0000.pairs VALUES (1, 0), (1, 0), (2, 0);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let failed = sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY pairs_k ON tenant_0000.pairs (k)")
        .execute(&pool)
        .await;
    assert!(
        failed.is_err(),
        "the duplicates fail the build, leaving it INVALID"
    );
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "ik".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "pairs".into(),
                key: "k".into(),
                batch_size: 1,
                batch_sql: "UPDATE pairs SET v = v + 1 WHERE k > $1 AND k <= $2".into(),
                ..Default::default()
            }),
            ..migration("bump", "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("ik", 1, 1, vec![run(1, "tenant_0000", &["bump"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{:?}", r[&1]);
    let e = r[&1].steps[0].error.as_ref().unwrap();
    assert!(e.message.contains("is not unique"), "{e:?}");
    assert_eq!(
        count(&pool, "SELECT sum(v)::bigint FROM tenant_0000.pairs").await,
        0,
        "no batch ran"
    );
    h.stop().await;
    f.drop().await;
}

/// Waits until a data change's checkpoint on the shard counts `n` batches or more.
async fn batches_done(pool: &sqlx::PgPool, n: i64) {
    flotilla_testkit::wait::wait_until(&format!("{n} batch(es)"), WAIT, async || {
        Ok(count(
            pool,
            "SELECT coalesce(max(batches), 0) FROM flotilla.checkpoints",
        )
        .await
            >= n)
    })
    .await
    .unwrap();
}

/// Sends plan `plan`'s one data change `id` (`UPDATE work_orders SET priority = set`,
/// batches of `size.0` at `size.1` rows a second) and its run on tenant_0000, epoch 1.
fn start_fill(s: &Stream, plan: &str, id: &str, size: (u32, u64), set: &str) {
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: plan.into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: size.0,
                rows_per_second: size.1,
                batch_sql: format!(
                    "UPDATE work_orders SET priority = '{set}' WHERE id > $1 AND id <= $2"
                ),
                ..Default::default()
            }),
            ..migration(id, "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: plan.into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &[id], false)],
    }));
}

/// A halt cuts short a data change's wait for its rate (at 2 rows/s a batch of 2 waits 1 s,
/// a batch no more than a second of its rate): the change stops at that batch boundary, the
/// next batch not done. Before, the wait
/// ran to its end and one more batch ran after the halt (a wait for a low rate can last
/// minutes, and a pause or cancel waited as long).
#[tokio::test]
async fn a_halt_cuts_short_the_wait_for_the_rate() {
    let Some(f) = fleet("rate_halt", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    start_fill(&s, "rh", "slow_fill", (2, 2), "slow");
    // the first batch is done (a fresh change has one batch of credit); the second waits
    flotilla_testkit::wait::wait_until("the first batch", WAIT, async || {
        Ok(count(
            &pool,
            "SELECT coalesce(max(batches), 0) FROM flotilla.checkpoints",
        )
        .await
            == 1)
    })
    .await
    .unwrap();
    s.send(In::Halt(pb::Halt {
        plan_id: "rh".into(),
    }));
    let r = s.results("rh", 1).await;
    assert_ne!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'slow'"
        )
        .await,
        2,
        "one batch, none after the halt"
    );
    h.stop().await;
    f.drop().await;
}

/// A batch takes no more than one second of its change's rate: `batch_size` 1,000 at 3 rows/s
/// runs batches of 3 (the 20-row table's first batch took every row at once, past the limit:
/// in a walk-through, 200,000 rows in one batch at "5,000 rows/s", the application's p99
/// from 23 ms to 3.5 s).
#[tokio::test]
async fn a_batch_takes_no_more_than_a_second_of_the_rate() {
    let Some(f) = fleet("rate_cap", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    start_fill(&s, "rc", "capped_fill", (1000, 3), "capped");
    batches_done(&pool, 2).await;
    s.send(In::Halt(pb::Halt {
        plan_id: "rc".into(),
    }));
    let r = s.results("rc", 1).await;
    assert_ne!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    // every batch of 3 rows (the checkpoint's count with its batches, read together)
    let (rows, batches) = (
        count(&pool, "SELECT max(rows)::bigint FROM flotilla.checkpoints").await,
        count(
            &pool,
            "SELECT max(batches)::bigint FROM flotilla.checkpoints",
        )
        .await,
    );
    assert_eq!(rows, 3 * batches, "{rows} rows in {batches} batches");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'capped'"
        )
        .await,
        rows
    );
    h.stop().await;
    f.drop().await;
}

/// A rollback cut short part-way through a non-transactional step's down statements (here
/// by a down statement's SQL error) leaves on the shard how many are done, and the next
/// rollback goes on after them: the decrement is not done twice, and the `DROP INDEX
/// CONCURRENTLY` (no IF EXISTS) does not fail on the index it dropped. Before, the next
/// rollback ran the down SQL from its start.
#[tokio::test]
async fn a_rollback_cut_short_goes_on_after_the_down_statements_it_did() {
    let Some(f) = fleet("undo_resume", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.counter (n int); INSERT INTO tenant_0000.counter VALUES (0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "ur".into(),
        migrations: vec![migration(
            "outside",
            "CREATE INDEX CONCURRENTLY wo_r ON work_orders (id); \
             UPDATE counter SET n = n + 1",
            "UPDATE counter SET n = n - 1; \
             DROP INDEX CONCURRENTLY wo_r; \
             INSERT INTO undo_log VALUES ('undone')",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("ur", 1, 1, vec![run(1, "tenant_0000", &["outside"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    let counter = "SELECT n::bigint FROM tenant_0000.counter";
    let index = "SELECT count(*) FROM pg_indexes WHERE indexname = 'wo_r'";
    assert_eq!(count(&pool, counter).await, 1);
    assert_eq!(count(&pool, index).await, 1);

    // undo_log is missing: the third down statement fails, after the first two are done
    let reply = s.rollback("ur", 1).await;
    assert!(!reply.complete, "{reply:?}");
    let error = reply.steps[0].error.as_ref().expect("the undo failed");
    assert!(
        error.sqlstate == "42P01" && error.message.contains("undo_log"),
        "{error:?}"
    );
    assert_eq!(count(&pool, counter).await, 0);
    assert_eq!(count(&pool, index).await, 0);
    assert_eq!(
        count(
            &pool,
            "SELECT undone::bigint FROM flotilla.checkpoints \
             WHERE target = 'tenant_0000' AND migration_id = 'outside' AND undoing"
        )
        .await,
        2,
        "two down statements recorded done"
    );
    // and the fleet view hears it: the step cut short, after two down statements
    s.reports_until(|reports| {
        reports.iter().any(|r| {
            matches!(r, Out::Journal(j) if j.cut_short.iter().any(|c| {
                c.target == "tenant_0000" && c.migration_id == "outside" && c.undone == 2
            }))
        })
    })
    .await;

    // fixed: the next rollback does the third alone
    sqlx::raw_sql("CREATE TABLE tenant_0000.undo_log (what text)")
        .execute(&pool)
        .await
        .unwrap();
    let reply = s.rollback("ur", 2).await;
    assert!(reply.complete && reply.steps.len() == 1, "{reply:?}");
    assert!(reply.steps[0].error.is_none(), "{reply:?}");
    assert_eq!(count(&pool, counter).await, 0, "decremented once");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM tenant_0000.undo_log").await,
        1
    );
    for table in ["flotilla.journal", "flotilla.checkpoints"] {
        assert_eq!(
            count(&pool, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    h.stop().await;
    f.drop().await;
}

/// A concurrent index build in down SQL is handled as in up SQL: one that fails drops the
/// INVALID index it left (so the next rollback does not fail on its name, 42P07), and is
/// not recorded done; the statement before it, done and recorded, is not run again.
#[tokio::test]
async fn a_concurrent_index_in_down_sql_leaves_no_invalid_index() {
    let Some(f) = fleet("down_cic", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.dup (x int); \
         CREATE UNIQUE INDEX idx_dup ON tenant_0000.dup (x); \
         CREATE TABLE tenant_0000.counter (n int); INSERT INTO tenant_0000.counter VALUES (0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "dc".into(),
        migrations: vec![migration(
            "unindex",
            "DROP INDEX CONCURRENTLY idx_dup; UPDATE counter SET n = n + 1",
            "UPDATE counter SET n = n - 1; \
             CREATE UNIQUE INDEX CONCURRENTLY idx_dup ON dup (x)",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("dc", 1, 1, vec![run(1, "tenant_0000", &["unindex"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    // the application wrote duplicates since: the index cannot be built again
    sqlx::raw_sql("INSERT INTO tenant_0000.dup VALUES (1), (1)")
        .execute(&pool)
        .await
        .unwrap();
    let index = "SELECT count(*) FROM pg_class WHERE relname = 'idx_dup'";
    for epoch in [1, 2] {
        let reply = s.rollback("dc", epoch).await;
        assert!(!reply.complete, "{reply:?}");
        let error = reply.steps[0].error.as_ref().expect("the undo failed");
        assert_eq!(error.sqlstate, "23505", "rollback {epoch}: {error:?}");
        assert_eq!(count(&pool, index).await, 0, "no INVALID index left");
    }
    assert_eq!(
        count(&pool, "SELECT n::bigint FROM tenant_0000.counter").await,
        0,
        "decremented once"
    );
    // the duplicates gone, the next rollback builds the index and finishes
    sqlx::raw_sql("DELETE FROM tenant_0000.dup")
        .execute(&pool)
        .await
        .unwrap();
    let reply = s.rollback("dc", 3).await;
    assert!(
        reply.complete && reply.steps[0].error.is_none(),
        "{reply:?}"
    );
    assert_eq!(count(&pool, index).await, 1);
    assert_eq!(
        count(&pool, "SELECT n::bigint FROM tenant_0000.counter").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A rollback cut short after down statements of another version of the migration (another
/// checksum on the checkpoint) is not gone on from: which of this version's statements are
/// done is unknown, so the undo fails naming it and runs none of them.
#[tokio::test]
async fn a_rollback_does_not_go_on_from_another_versions_down_statements() {
    let Some(f) = fleet("undo_version", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.counter (n int); INSERT INTO tenant_0000.counter VALUES (0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "uv".into(),
        migrations: vec![migration(
            "outside",
            "CREATE INDEX CONCURRENTLY wo_v ON work_orders (id); \
             UPDATE counter SET n = n + 1",
            "UPDATE counter SET n = n - 1; DROP INDEX CONCURRENTLY IF EXISTS wo_v",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("uv", 1, 1, vec![run(1, "tenant_0000", &["outside"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    // as a rollback with another version's down SQL leaves it after its first statement
    sqlx::raw_sql(
        "INSERT INTO flotilla.checkpoints (target, migration_id, checksum, plan_id, last_key, \
         rows, batches, undoing, undone) \
         VALUES ('tenant_0000', 'outside', 'sha256:other', 'uv', NULL, 0, 0, true, 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let reply = s.rollback("uv", 1).await;
    assert!(!reply.complete, "{reply:?}");
    let error = reply.steps[0].error.as_ref().expect("the undo is refused");
    assert!(
        error.message.contains("another version")
            && error.message.contains("sha256:other")
            && error.message.contains("after 1 of its down statements"),
        "{error:?}"
    );
    assert_eq!(
        count(&pool, "SELECT n::bigint FROM tenant_0000.counter").await,
        1,
        "no down statement ran"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        1
    );
    h.stop().await;
    f.drop().await;
}

/// Work done outside a transaction whose record then times out on a lock (the fence row
/// held, as a prepared transaction holds it while a newer epoch is written) is recorded
/// once the lock is free, not done again: an up statement's record (the step's own retry
/// would go on from a checkpoint without it) and an undo's (the rollback would fail, and the
/// next one make only the record). Here a procedure that commits would have done its work
/// twice.
#[tokio::test]
async fn work_done_outside_a_transaction_waits_for_its_record_not_done_again() {
    let Some(f) = fleet("record_lock", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.calls (n int); CREATE TABLE tenant_0000.go (n int);
         CREATE PROCEDURE tenant_0000.count_and_wait() LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO tenant_0000.calls VALUES (1);
           COMMIT;
           WHILE NOT EXISTS (SELECT 1 FROM tenant_0000.go) LOOP
             PERFORM pg_sleep(0.01);
           END LOOP;
         END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let calls = "SELECT count(*) FROM tenant_0000.calls";
    // Once the procedure has committed its `calls` row number `n` (on its own: in a
    // transaction its COMMIT fails) and waits for `go`: holds the fence row, lets the
    // procedure end, and lets the row go once the record after it timed out waiting for it.
    let hold_the_fence_while_it_ends = async |n: i64| {
        flotilla_testkit::wait::wait_until("the procedure's row", WAIT, async || {
            Ok(count(&pool, calls).await == n)
        })
        .await
        .unwrap();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM flotilla.fence FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        sqlx::query("INSERT INTO tenant_0000.go VALUES (1)")
            .execute(&pool)
            .await
            .unwrap();
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND wait_event_type = 'Lock' AND position('check_fence' in query) > 0";
        for (what, n) in [("the record waiting", 1), ("its lock timeout", 0)] {
            flotilla_testkit::wait::wait_until(what, WAIT, async || {
                Ok(count(&pool, waiting).await == n)
            })
            .await
            .unwrap();
        }
        holder.rollback().await.unwrap();
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "rl".into(),
        migrations: vec![migration(
            "outside",
            "CREATE INDEX CONCURRENTLY wo_id ON work_orders (id); CALL count_and_wait()",
            "DROP INDEX CONCURRENTLY wo_id; CALL count_and_wait()",
            "",
        )],
        default_lock_timeout_ms: 200,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "rl".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &["outside"], false)],
    }));
    hold_the_fence_while_it_ends(1).await;
    let r = s.results("rl", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    assert_eq!(count(&pool, calls).await, 1, "the procedure ran once");
    let journal = "SELECT count(*) FROM flotilla.journal WHERE migration_id = 'outside'";
    assert_eq!(count(&pool, journal).await, 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0
    );

    // the undo: its down SQL (a DROP INDEX CONCURRENTLY, which would fail the second time,
    // and the procedure) then its record
    sqlx::query("DELETE FROM tenant_0000.go")
        .execute(&pool)
        .await
        .unwrap();
    let (reply, ()) = tokio::join!(s.rollback("rl", 1), hold_the_fence_while_it_ends(2));
    assert!(reply.complete && reply.steps.len() == 1, "{reply:?}");
    assert!(reply.steps[0].error.is_none(), "{reply:?}");
    assert_eq!(count(&pool, calls).await, 2, "the procedure ran once more");
    assert_eq!(count(&pool, journal).await, 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'wo_id'"
        )
        .await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A non-transactional step that fails on its third statement, and a data change whose
/// first batch fails after its up SQL: each leaves a checkpoint saying how far it got. Run
/// again (once what they failed on is there) each goes on after what it did (its first
/// statements again would fail: `side` exists, `filled` exists), once; a rollback undoes
/// one left part-way with its down SQL (before, both stayed applied with nothing on the
/// shard to say so, and a rollback left them).
#[tokio::test]
async fn a_step_left_part_way_goes_on_or_is_undone() {
    let Some(f) = fleet("part_way", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(3).await;
    let fill = pb::Migration {
        data: Some(pb::DataChange {
            table: "work_orders".into(),
            key: "id".into(),
            batch_size: 7,
            batch_sql:
                "UPDATE work_orders SET filled = (SELECT v FROM fill_gate) WHERE id > $1 AND id <= $2"
                    .into(),
            ..Default::default()
        }),
        ..migration(
            "fill",
            "ALTER TABLE work_orders ADD COLUMN filled int",
            "ALTER TABLE work_orders DROP COLUMN IF EXISTS filled",
            "SELECT count(*) = 0 FROM work_orders WHERE filled IS DISTINCT FROM 1",
        )
    };
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pw".into(),
        migrations: vec![
            migration(
                "parts",
                "CREATE TABLE side (id int); \
                 CREATE INDEX CONCURRENTLY side_id ON side (id); \
                 INSERT INTO gate SELECT 1",
                "DROP TABLE IF EXISTS side",
                "",
            ),
            fill,
        ],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let checkpoint = |tenant: &str, migration: &str| {
        format!(
            "SELECT statements::bigint FROM flotilla.checkpoints \
             WHERE target = '{tenant}' AND migration_id = '{migration}' AND last_key IS NULL"
        )
    };
    let r = s
        .assign(
            "pw",
            3,
            2,
            vec![
                run(1, "tenant_0000", &["parts"], false),
                run(2, "tenant_0001", &["parts"], false),
            ],
        )
        .await;
    for id in [1, 2] {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Failed], "{:?}", r[&id]);
        let e = r[&id].steps[0].error.clone().unwrap();
        assert_eq!((e.sqlstate.as_str(), e.phase.as_str()), ("42P01", "up"));
        assert!(e.message.contains("gate"), "{e:?}");
    }
    for t in ["tenant_0000", "tenant_0001"] {
        assert_eq!(count(&pool, &checkpoint(t, "parts")).await, 2, "{t}");
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'side_id'"
        )
        .await,
        2
    );

    let r = s
        .assign(
            "pw",
            3,
            2,
            vec![
                run(3, "tenant_0000", &["fill"], false),
                run(4, "tenant_0001", &["fill"], false),
            ],
        )
        .await;
    for id in [3, 4] {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Failed], "{:?}", r[&id]);
        let e = r[&id].steps[0].error.clone().unwrap();
        // the error says where: the first batch, from the start of the key to 7
        assert!(
            e.message.contains("fill_gate")
                && e.message
                    .ends_with("(batch 1: keys after the start up to 7)"),
            "{e:?}"
        );
    }
    for t in ["tenant_0000", "tenant_0001"] {
        assert_eq!(count(&pool, &checkpoint(t, "fill")).await, 1, "{t}");
    }

    // what they failed on is there now: each goes on where it stopped
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.gate (v int); \
         CREATE TABLE tenant_0000.fill_gate (v int); INSERT INTO tenant_0000.fill_gate VALUES (1);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let r = s
        .assign(
            "pw",
            3,
            1,
            vec![run(5, "tenant_0000", &["parts", "fill"], false)],
        )
        .await;
    assert_eq!(
        outcomes(&r[&5]),
        [pb::StepOutcome::Applied; 2],
        "{:?}",
        r[&5]
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM tenant_0000.gate").await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE filled = 1"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.checkpoints WHERE target = 'tenant_0000'"
        )
        .await,
        0
    );

    // the plan's rollback undoes the two steps applied on tenant_0000 and the two left
    // part-way on tenant_0001
    let reply = s.rollback("pw", 3).await;
    assert!(reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 4, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    let t1: Vec<&str> = reply
        .steps
        .iter()
        .filter(|s| s.tenant == "tenant_0001")
        .map(|s| s.migration_id.as_str())
        .collect();
    assert_eq!(t1, ["fill", "parts"], "newest first");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'side'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'filled'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A non-transactional step that failed on its third statement because the column it adds
/// was there already (with the application's data), whose down.sql pairs with its up.sql
/// statement for statement: its rollback undoes only the statements that ran. Before, the
/// whole down.sql ran, and its `DROP COLUMN foo` (the undo of the statement that failed,
/// having done nothing) dropped the column that was there before, and its data.
#[tokio::test]
async fn a_step_left_part_way_undoes_only_what_ran_when_its_down_pairs_with_its_up() {
    let Some(f) = fleet("part_way_paired", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "ALTER TABLE tenant_0000.work_orders ADD COLUMN foo int; \
         UPDATE tenant_0000.work_orders SET foo = id;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(3).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pp".into(),
        migrations: vec![migration(
            "cols",
            "ALTER TABLE work_orders ADD COLUMN bar int; \
             VACUUM work_orders; \
             ALTER TABLE work_orders ADD COLUMN foo int",
            "ALTER TABLE work_orders DROP COLUMN IF EXISTS foo; \
             SELECT 1; \
             ALTER TABLE work_orders DROP COLUMN IF EXISTS bar",
            "",
        )],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("pp", 3, 1, vec![run(1, "tenant_0000", &["cols"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{:?}", r[&1]);
    assert_eq!(r[&1].steps[0].error.clone().unwrap().sqlstate, "42701");
    let column = |name: &str| {
        format!(
            "SELECT count(*) FROM information_schema.columns \
              WHERE table_schema = 'tenant_0000' AND table_name = 'work_orders' \
                AND column_name = '{name}'"
        )
    };
    assert_eq!(count(&pool, &column("bar")).await, 1);

    let reply = s.rollback("pp", 3).await;
    assert!(reply.complete, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    assert_eq!(count(&pool, &column("bar")).await, 0, "what ran is undone");
    assert_eq!(
        count(&pool, &column("foo")).await,
        1,
        "what was there stays"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE foo = id"
        )
        .await,
        20,
        "with its data"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A data change that saves a prior image, undone after the application changed or deleted
/// some of the rows it changed: those keep the application's values (before, the undo wrote
/// the old values over them), the others are put back. A batch saved without post images
/// (by an agent of shard schema version 1: here, its post rows deleted) is put back whole,
/// as before.
#[tokio::test]
async fn undoing_a_prior_image_keeps_what_the_application_wrote_since() {
    let Some(f) = fleet("prior_kept", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(2).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pk".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: 7,
                batch_sql: "UPDATE work_orders SET priority = 'high' \
                            WHERE id > $1 AND id <= $2 AND priority <> 'top'"
                    .into(),
                filter: "priority <> 'top'".into(),
                prior_image: vec!["priority".into()],
                ..Default::default()
            }),
            ..migration("escalate", "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    // a row the filter leaves out: no image of it is saved, before or after
    sqlx::raw_sql(
        "UPDATE tenant_0000.work_orders SET priority = 'top' WHERE id = 10; \
         UPDATE tenant_0001.work_orders SET priority = 'top' WHERE id = 10;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let r = s
        .assign(
            "pk",
            2,
            2,
            vec![
                run(1, "tenant_0000", &["escalate"], false),
                run(2, "tenant_0001", &["escalate"], false),
            ],
        )
        .await;
    for id in [1, 2] {
        assert_eq!(
            outcomes(&r[&id]),
            [pb::StepOutcome::Applied],
            "{:?}",
            r[&id]
        );
    }
    for post in [false, true] {
        assert_eq!(
            count(
                &pool,
                &format!(
                    "SELECT count(*) FROM flotilla.prior_images \
                     WHERE target = 'tenant_0000' AND post = {post}"
                )
            )
            .await,
            19,
            "post {post}: the 19 rows the filter took"
        );
    }
    sqlx::raw_sql(
        "UPDATE tenant_0000.work_orders SET priority = 'urgent' WHERE id IN (3, 15); \
         DELETE FROM tenant_0000.work_orders WHERE id = 20; \
         UPDATE tenant_0001.work_orders SET priority = 'urgent' WHERE id IN (3, 15); \
         DELETE FROM flotilla.prior_images WHERE target = 'tenant_0001' AND post;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mark = log_mark();
    let reply = s.rollback("pk", 2).await;
    assert!(reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 2, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    // the reply says how many rows each target's restore left (the plan's end says it; only
    // the agent's log did)
    let kept: Vec<(&str, u64)> = reply
        .steps
        .iter()
        .map(|s| (s.tenant.as_str(), s.rows_kept))
        .collect();
    assert_eq!(kept, [("tenant_0000", 3), ("tenant_0001", 0)], "{reply:?}");
    let priorities = |t: &str| {
        format!(
            "SELECT string_agg(id || '=' || priority, ',' ORDER BY id) FROM {t}.work_orders \
             WHERE priority <> 'low'"
        )
    };
    let other: Option<String> = sqlx::query_scalar(AssertSqlSafe(priorities("tenant_0000")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(other.as_deref(), Some("3=urgent,10=top,15=urgent"));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'low'"
        )
        .await,
        16
    );
    let other: Option<String> = sqlx::query_scalar(AssertSqlSafe(priorities("tenant_0001")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        other.as_deref(),
        Some("10=top"),
        "no post images: every saved value put back"
    );
    wait_for_log(mark, "except 3 rows changed or deleted since their batch").await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.prior_images").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// The undo of a data change keeps its rate limit: 20 rows in batches of 5 at 20 rows a
/// second are put back in no less than the half second the limit allows after the first
/// batch (before, as fast as the server went: twice the limit under load, in a rollback
/// run while production was in trouble already).
#[tokio::test]
async fn undoing_a_prior_image_keeps_the_changes_rate_limit() {
    let Some(f) = fleet("prior_rate", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(2).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pr".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: 5,
                rows_per_second: 20,
                batch_sql: "UPDATE work_orders SET priority = 'high' WHERE id > $1 AND id <= $2"
                    .into(),
                prior_image: vec!["priority".into()],
                ..Default::default()
            }),
            ..migration("escalate", "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign(
            "pr",
            2,
            1,
            vec![run(1, "tenant_0000", &["escalate"], false)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    let batches = count(
        &pool,
        "SELECT count(DISTINCT batch) FROM flotilla.prior_images WHERE NOT post",
    )
    .await;
    assert_eq!(batches, 4, "20 rows in batches of 5");
    let undo = std::time::Instant::now();
    let reply = s.rollback("pr", 2).await;
    let took = undo.elapsed();
    assert!(
        reply.complete && reply.steps.iter().all(|s| s.error.is_none()),
        "{reply:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'high'"
        )
        .await,
        0,
        "every row put back"
    );
    // each batch's 5 rows paid after it, but the last's: the first from the full bucket,
    // the next two a quarter second each at 20 rows a second
    assert!(
        took >= std::time::Duration::from_millis(480),
        "the undo ran faster than the change's rate limit: {took:?}"
    );
    h.stop().await;
    f.drop().await;
}

/// A data change whose up SQL sets the session's time zone: its batches saved their post
/// images in that zone, and the undo compares under the same settings, so every row is put
/// back (before, each timestamptz read as a value the application wrote since, and all 20
/// rows were kept). The down statements after it run in the undo's own session again.
#[tokio::test]
async fn undoing_a_prior_image_compares_under_the_up_sqls_settings() {
    let Some(f) = fleet("prior_tz", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(2).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "tz".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: 7,
                batch_sql: "UPDATE work_orders SET created_at = created_at + interval '1 day' \
                            WHERE id > $1 AND id <= $2"
                    .into(),
                prior_image: vec!["created_at".into()],
                ..Default::default()
            }),
            ..migration(
                "shift",
                "SET TimeZone = 'Asia/Kolkata'",
                // run in the undo's session: the server's zone, not the up SQL's
                "CREATE TABLE undo_zone AS SELECT current_setting('TimeZone') AS zone",
                "",
            )
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let before = "SELECT string_agg(id || '=' || extract(epoch FROM created_at), ',' ORDER BY id) \
                  FROM tenant_0000.work_orders";
    let original: String = sqlx::query_scalar(before).fetch_one(&pool).await.unwrap();
    let server_zone: String = sqlx::query_scalar("SELECT current_setting('TimeZone')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(server_zone, "Asia/Kolkata", "the test needs another zone");
    let r = s
        .assign("tz", 1, 1, vec![run(1, "tenant_0000", &["shift"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    let shifted: String = sqlx::query_scalar(before).fetch_one(&pool).await.unwrap();
    assert_ne!(shifted, original);

    let reply = s.rollback("tz", 1).await;
    assert!(reply.complete, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    let restored: String = sqlx::query_scalar(before).fetch_one(&pool).await.unwrap();
    assert_eq!(restored, original, "every row put back");
    let zone: String = sqlx::query_scalar("SELECT zone FROM tenant_0000.undo_zone")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        zone, server_zone,
        "the down statements ran in the undo's own session"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.prior_images").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A data change over a float8 key whose up SQL says `SET extra_float_digits = 0` (floats
/// written with 15 digits), saving a jsonb column holding JSON `null` (NOT NULL) and a
/// nullable one holding SQL NULL and JSON `null` alike, a NOT NULL domain over jsonb and a
/// NOT NULL json column. Every row is changed exactly once
/// and the rollback puts every row back as it was. Before, each page's last key was
/// rounded (the largest row skipped, the change said applied) and the saved keys found no
/// row (most rows kept by the undo); JSON `null` came back SQL NULL (the NOT NULL column's
/// restore failed).
#[tokio::test]
async fn a_change_over_float_keys_and_json_nulls_is_done_and_undone_exactly() {
    let Some(f) = fleet("float_json", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE DOMAIN tenant_0000.djn AS jsonb NOT NULL;
         CREATE TABLE tenant_0000.fk (k float8 PRIMARY KEY, n int NOT NULL, j jsonb NOT NULL, o jsonb, s text,
                                      d tenant_0000.djn, js json NOT NULL);
         INSERT INTO tenant_0000.fk
           SELECT g / 7.0::float8 * 1000.1, g,
                  CASE WHEN g % 2 = 0 THEN 'null'::jsonb ELSE jsonb_build_object('g', g) END,
                  CASE WHEN g % 3 = 0 THEN 'null'::jsonb WHEN g % 3 = 1 THEN NULL ELSE '[1]'::jsonb END,
                  NULL,
                  CASE WHEN g % 2 = 1 THEN 'null'::jsonb ELSE '{\"d\": 1}'::jsonb END,
                  CASE WHEN g % 2 = 0 THEN 'null'::json ELSE '{\"js\": 1}'::json END
             FROM generate_series(1, 250) g;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rows = "SELECT string_agg(k::text || ':' || n || ':' || j::text || ':' || coalesce(o::text, 'SQL NULL') \
                || ':' || coalesce(s, 'SQL NULL') || ':' || d::text || ':' || js::text, ',' ORDER BY k) \
                FROM tenant_0000.fk";
    let original: String = sqlx::query_scalar(rows).fetch_one(&pool).await.unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(2).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "fj".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "fk".into(),
                key: "k".into(),
                batch_size: 40,
                batch_sql: "UPDATE fk SET n = n + 7, j = '{\"m\": 1}', o = 'null'::jsonb, \
                            s = k::text, d = '{\"m\": 2}', js = '{\"m\": 3}' WHERE k > $1 AND k <= $2"
                    .into(),
                prior_image: vec![
                    "n".into(),
                    "j".into(),
                    "o".into(),
                    "s".into(),
                    "d".into(),
                    "js".into(),
                ],
                ..Default::default()
            }),
            ..migration("fj", "SET extra_float_digits = 0", "SELECT 1", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("fj", 1, 1, vec![run(1, "tenant_0000", &["fj"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    let unchanged = count(
        &pool,
        "SELECT count(*) FROM tenant_0000.fk WHERE n <> round(k * 7 / 1000.1)::int + 7",
    )
    .await;
    assert_eq!(unchanged, 0, "every row changed exactly once");
    // the batch statements ran under the up SQL's own setting (floats as 15 digits)
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL extra_float_digits = 0")
        .execute(&mut *tx)
        .await
        .unwrap();
    let as_asked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tenant_0000.fk WHERE s = k::text AND length(s) <= 17",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        as_asked, 250,
        "s written as the up SQL's extra_float_digits says"
    );

    let reply = s.rollback("fj", 1).await;
    assert!(reply.complete, "{reply:?}");
    assert!(reply.steps.iter().all(|s| s.error.is_none()), "{reply:?}");
    let restored: String = sqlx::query_scalar(rows).fetch_one(&pool).await.unwrap();
    assert_eq!(restored, original, "every row put back as it was");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.prior_images").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// More of a step left part-way: going on in another session it runs the settings done
/// before again (`SET application_name` here; `SET ROLE` or `search_path` in life); a `DO`
/// block that COMMITs, which refuses the transaction a statement runs in, runs on its own;
/// a first statement that cannot run in a transaction is recorded (nothing done) before it
/// runs, so its failure part-way (a DO block that committed some) leaves a checkpoint a
/// rollback finds; and a rollback cut short
/// marks the checkpoint undoing, so the step does not go on from it (it would skip
/// statements the rollback undid) until a rollback finishes, and an applied step's journal
/// row is no longer taken as applied, by a run or by a preflight.
#[tokio::test]
async fn a_step_goes_on_in_a_new_session_and_never_after_a_cut_short_rollback() {
    let Some(f) = fleet("part_way_more", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(4).await;
    let non_tx = |m: pb::Migration| pb::Migration {
        tx_mode: pb::TxMode::NonTransactional as i32,
        ..m
    };
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pz".into(),
        migrations: vec![
            non_tx(migration(
                "settings",
                "SET application_name = 'replayed'; CREATE TABLE seen (v text); \
                 INSERT INTO gate2 SELECT 1; INSERT INTO seen SELECT current_setting('application_name')",
                "DROP TABLE IF EXISTS seen",
                "",
            )),
            non_tx(migration(
                "commits",
                "CREATE TABLE pt (v int); \
                 DO $$ BEGIN INSERT INTO pt VALUES (1); COMMIT; INSERT INTO pt VALUES (2); END $$",
                "DROP TABLE IF EXISTS pt",
                "",
            )),
            non_tx(migration(
                "part_first",
                "DO $$ BEGIN CREATE TABLE pf (v int); COMMIT; PERFORM 1 / 0; END $$",
                "DROP TABLE IF EXISTS pf; SELECT 1 FROM down_gate",
                "",
            )),
            non_tx(migration(
                "two_part",
                "CREATE TABLE tp (v int)",
                "DROP TABLE IF EXISTS tp; SELECT 1 FROM down_gate2",
                "",
            )),
        ],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let t = "tenant_0000";
    let r = s
        .assign("pz", 4, 1, vec![run(1, t, &["settings"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{:?}", r[&1]);
    sqlx::raw_sql("CREATE TABLE tenant_0000.gate2 (v int)")
        .execute(&pool)
        .await
        .unwrap();
    let r = s
        .assign("pz", 4, 1, vec![run(2, t, &["settings", "commits"], false)])
        .await;
    assert_eq!(
        outcomes(&r[&2]),
        [pb::StepOutcome::Applied; 2],
        "{:?}",
        r[&2]
    );
    let seen: String = sqlx::query_scalar("SELECT v FROM tenant_0000.seen")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(seen, "replayed", "the setting done before ran again");
    assert_eq!(count(&pool, "SELECT count(*) FROM tenant_0000.pt").await, 2);

    let r = s
        .assign("pz", 4, 1, vec![run(3, t, &["part_first"], false)])
        .await;
    assert_eq!(outcomes(&r[&3]), [pb::StepOutcome::Failed], "{:?}", r[&3]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.checkpoints WHERE migration_id = 'part_first' \
             AND statements = 0 AND NOT undoing"
        )
        .await,
        1,
        "recorded before it ran"
    );

    // the rollback undoes the part-way step first, and its down SQL fails part-way
    let reply = s.rollback("pz", 4).await;
    assert!(!reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 1, "{reply:?}");
    assert_eq!(reply.steps[0].migration_id, "part_first");
    assert!(reply.steps[0].error.is_some(), "{reply:?}");
    let e = failed_alone(&mut s, "pz", 4, t, "part_first").await;
    assert!(
        e.message
            .contains("a rollback of it on this target was cut short"),
        "{e:?}"
    );
    // the coordinator's fleet view hears it from the shard, to say why the target is behind
    let cut_short = |m: &str| BTreeSet::from([(t.to_string(), m.to_string(), "pz".to_string())]);
    s.reports_until(|r| cut_short_reported(r) == cut_short("part_first"))
        .await;

    sqlx::raw_sql("CREATE TABLE tenant_0000.down_gate (v int)")
        .execute(&pool)
        .await
        .unwrap();
    let reply = s.rollback("pz", 4).await;
    assert!(reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 3, "{reply:?}");
    s.reports_until(|r| cut_short_reported(r).is_empty()).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('seen', 'pt', 'pf')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0
    );

    // an applied step (its journal row) whose undo is cut short: the journal row is not
    // taken as the step applied (its table is gone), and the step waits for the rollback
    let r = s
        .assign("pz", 4, 1, vec![run(5, t, &["two_part"], false)])
        .await;
    assert_eq!(outcomes(&r[&5]), [pb::StepOutcome::Applied], "{:?}", r[&5]);
    assert_eq!(applied_in_preflight(&mut s, 8, "two_part").await, 1);
    let reply = s.rollback("pz", 4).await;
    assert!(!reply.complete, "{reply:?}");
    // nor does a preflight: a plan would skip the step and call the target done
    assert_eq!(applied_in_preflight(&mut s, 9, "two_part").await, 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'tp'"
        )
        .await,
        0,
        "the down SQL's first statement ran"
    );
    let e = failed_alone(&mut s, "pz", 6, t, "two_part").await;
    assert!(
        e.message
            .contains("a rollback of it on this target was cut short")
            && e.message.contains("roll back plan pz again"),
        "{e:?}"
    );
    s.reports_until(|r| cut_short_reported(r) == cut_short("two_part"))
        .await;
    // an edited version of the step, in another plan, is told the same (not to delete the
    // checkpoint, which would pass the journal row off as applied again)
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pz_edited".into(),
        migrations: vec![non_tx(migration(
            "two_part",
            "CREATE TABLE tp (v bigint)",
            "DROP TABLE IF EXISTS tp",
            "",
        ))],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let e = failed_alone(&mut s, "pz_edited", 7, t, "two_part").await;
    assert!(e.message.contains("roll back plan pz again"), "{e:?}");
    sqlx::raw_sql("CREATE TABLE tenant_0000.down_gate2 (v int)")
        .execute(&pool)
        .await
        .unwrap();
    let reply = s.rollback("pz", 4).await;
    assert!(reply.complete, "{reply:?}");
    s.reports_until(|r| cut_short_reported(r).is_empty()).await;
    for table in ["journal", "checkpoints"] {
        assert_eq!(
            count(&pool, &format!("SELECT count(*) FROM flotilla.{table}")).await,
            0,
            "{table}"
        );
    }
    h.stop().await;
    f.drop().await;
}

/// A step's first statement that the server refused before it began (class 42: here a
/// concurrent index build on a table that is not there) takes back the checkpoint written
/// before it: a rollback has nothing of the step to undo, and does not run its down SQL
/// (`DROP INDEX CONCURRENTLY` of an index never built, which failed, and the plan ended
/// rollback_failed over a step that did nothing). A build that failed later (a unique
/// violation) keeps it: its INVALID index was dropped here, but one the agent cannot find
/// (unnamed, or in another schema) would stay, and the rollback's down SQL covers it.
#[tokio::test]
async fn a_first_statement_refused_before_it_began_leaves_nothing_to_undo() {
    let Some(f) = fleet("first_nothing", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.dup (v int); INSERT INTO tenant_0000.dup VALUES (1), (1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(4).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pn".into(),
        migrations: vec![
            migration(
                "cic_refused",
                "CREATE INDEX CONCURRENTLY cr ON nope (id)",
                "DROP INDEX CONCURRENTLY cr",
                "",
            ),
            migration(
                "cic_late",
                "CREATE UNIQUE INDEX CONCURRENTLY cl ON dup (v)",
                "DROP INDEX CONCURRENTLY IF EXISTS cl",
                "",
            ),
        ],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let t = "tenant_0000";
    let checkpoints = "SELECT count(*) FROM flotilla.checkpoints";
    for (id, step, sqlstate, kept) in [(1, "cic_refused", "42P01", 0), (2, "cic_late", "23505", 1)]
    {
        let r = s.assign("pn", 4, 1, vec![run(id, t, &[step], false)]).await;
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Failed], "{:?}", r[&id]);
        let e = r[&id].steps[0].error.clone().unwrap();
        assert_eq!(e.sqlstate, sqlstate, "{e:?}");
        assert_eq!(count(&pool, checkpoints).await, kept, "{step}");
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('cr', 'cl')"
        )
        .await,
        0,
        "the late build's INVALID index was dropped"
    );
    let reply = s.rollback("pn", 4).await;
    assert!(reply.complete, "{reply:?}");
    let undone: Vec<&str> = reply
        .steps
        .iter()
        .map(|s| s.migration_id.as_str())
        .collect();
    assert_eq!(undone, ["cic_late"], "only the late build: {reply:?}");
    assert_eq!(count(&pool, checkpoints).await, 0);
    h.stop().await;
    f.drop().await;
}

/// The steps cut short (target, migration, plan) that the fleet-view reports heard so far
/// leave, replayed as the coordinator applies them.
fn cut_short_reported(reports: &[Out]) -> BTreeSet<(String, String, String)> {
    let mut steps = BTreeSet::new();
    for r in reports {
        if let Out::Journal(j) = r {
            if j.reset {
                steps.clear();
            }
            steps.retain(|(target, _, _)| !j.targets.contains(target));
            steps.extend(
                j.cut_short
                    .iter()
                    .map(|c| (c.target.clone(), c.migration_id.clone(), c.plan_id.clone())),
            );
        }
    }
    steps
}

/// Runs `migration` alone on `t` in `plan` (run `id`) and returns its error: it must fail.
async fn failed_alone(
    s: &mut Stream,
    plan: &str,
    id: u64,
    t: &str,
    migration: &str,
) -> pb::StepError {
    let r = s
        .assign(plan, 4, 1, vec![run(id, t, &[migration], false)])
        .await;
    assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Failed], "{:?}", r[&id]);
    r[&id].steps[0].error.clone().unwrap()
}

/// How many journal rows of `migration` a preflight answers with.
async fn applied_in_preflight(s: &mut Stream, request_id: u64, migration: &str) -> usize {
    s.send(In::Preflight(pb::PreflightRequest {
        two_phase: false,
        request_id,
        migration_ids: vec![migration.into()],
        data_migrations: Vec::new(),
        lock_relations: Vec::new(),
    }));
    loop {
        // reports the runs and the rollback left may come first
        if let Out::Preflight(p) = s.next().await {
            assert_eq!((p.request_id, p.error.as_str()), (request_id, ""));
            return p.applied.len();
        }
    }
}

/// A shard whose flotilla schema is version 1 (as de652aa's agent left it), with a data
/// change part-way (its first batch done and checkpointed): this agent upgrades the schema
/// to its version (3) at start, and the change goes on from the old checkpoint (its up SQL not
/// run again, no batch done twice) and completes.
#[tokio::test]
async fn a_version_1_shard_upgrades_with_a_data_change_in_flight() {
    let Some(f) = fleet("upgrade_v1", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let fill = pb::Migration {
        data: Some(pb::DataChange {
            table: "work_orders".into(),
            key: "id".into(),
            batch_size: 7,
            batch_sql: "UPDATE work_orders SET priority = priority || '+' \
                        WHERE id > $1 AND id <= $2"
                .into(),
            ..Default::default()
        }),
        ..migration(
            "marks",
            "CREATE TABLE up_ran (at timestamptz DEFAULT now())",
            "DROP TABLE IF EXISTS up_ran",
            "SELECT count(*) = 0 FROM work_orders WHERE priority <> 'low+'",
        )
    };
    let checksum = flotilla_core::Migration::try_from(fill.clone())
        .unwrap()
        .checksum;
    // version 1, and the change's up SQL and first batch done under it
    let v1 = format!(
        "CREATE SCHEMA flotilla; CREATE TABLE flotilla.meta (key text PRIMARY KEY, value text);\n\
         {}\n\
         CREATE TABLE tenant_0000.up_ran (at timestamptz DEFAULT now());\n\
         UPDATE tenant_0000.work_orders SET priority = priority || '+' WHERE id <= 7;\n\
         INSERT INTO flotilla.checkpoints (target, migration_id, checksum, plan_id, last_key, rows, batches) \
         VALUES ('tenant_0000', 'marks', '{checksum}', 'pv', '7', 7, 1);",
        include_str!("schema_v1.sql")
    );
    sqlx::raw_sql(AssertSqlSafe(v1))
        .execute(&pool)
        .await
        .unwrap();

    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    assert_eq!(
        count(
            &pool,
            "SELECT value::bigint FROM flotilla.meta WHERE key = 'schema_version'"
        )
        .await,
        4
    );
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pv".into(),
        migrations: vec![fill],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let r = s
        .assign("pv", 1, 1, vec![run(1, "tenant_0000", &["marks"], false)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'low+'"
        )
        .await,
        20,
        "every row changed once"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0
    );
    h.stop().await;
    f.drop().await;
}

/// A plan that stops at a failure (policy stop or all-or-nothing): once a run of it fails
/// here, its runs queued here are not run, nor those assigned after, until a retry's newer
/// definition; the coordinator's halt comes a round trip later. Before, with one lane, the
/// three tenants queued behind the failed one were applied (seen with `policy = "stop"`).
/// A plan that goes on after failures (policy continue) runs them.
#[tokio::test]
async fn a_plan_that_stops_at_a_failure_runs_nothing_queued_after_it() {
    let Some(f) = fleet("stopfail", 4).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    let failing = migration(
        "m",
        "DO $$ BEGIN IF current_schema() = 'tenant_0000' THEN PERFORM pg_sleep(0.2); \
         RAISE EXCEPTION 'boom'; END IF; END $$; CREATE TABLE stop_marker (id int)",
        "DROP TABLE stop_marker",
        "",
    );
    let define = |plan: &str, stop: bool, generation: u64| {
        In::Plan(pb::PlanDefinition {
            plan_id: plan.into(),
            migrations: vec![failing.clone()],
            default_lock_timeout_ms: 5000,
            stop_on_failure: stop,
            generation,
            ..Default::default()
        })
    };
    let runs = |from: u64| -> Vec<pb::Run> {
        (0..4)
            .map(|i| run(from + i, &format!("tenant_{i:04}"), &["m"], true))
            .collect()
    };
    s.send(define("stop", true, 1));
    let results = s.assign("stop", 1, 1, runs(1)).await;
    let by_tenant = |results: &BTreeMap<u64, pb::RunResult>, from: u64| -> Vec<pb::StepOutcome> {
        (0..4).map(|i| outcomes(&results[&(from + i)])[0]).collect()
    };
    assert_eq!(
        by_tenant(&results, 1),
        [
            pb::StepOutcome::Failed,
            pb::StepOutcome::NotRun,
            pb::StepOutcome::NotRun,
            pb::StepOutcome::NotRun
        ]
    );
    // runs sent before the coordinator heard of the failure are not run either...
    let results = s
        .assign("stop", 1, 1, vec![run(9, "tenant_0003", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&9]), [pb::StepOutcome::NotRun]);
    // ...nor after the definition is sent again on a new stream (the same generation)
    s.send(define("stop", true, 1));
    let results = s
        .assign("stop", 1, 1, vec![run(10, "tenant_0003", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&10]), [pb::StepOutcome::NotRun]);
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0,
        "nothing applied"
    );
    // a retry (a newer definition) runs them
    s.send(define("stop", true, 2));
    let results = s
        .assign("stop", 1, 1, vec![run(11, "tenant_0003", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&11]), [pb::StepOutcome::Applied]);
    // policy continue: the others run
    s.send(define("goes_on", false, 1));
    let results = s.assign("goes_on", 1, 1, runs(21)).await;
    assert_eq!(
        by_tenant(&results, 21),
        [
            pb::StepOutcome::Failed,
            pb::StepOutcome::Applied,
            pb::StepOutcome::Applied,
            pb::StepOutcome::AlreadyApplied
        ]
    );
    // a stop under epoch 1 holds for the runs of that epoch only: a new leader's runs (a
    // later epoch, its own view of the plan) run
    s.send(define("stop", true, 2));
    let results = s
        .assign("stop", 1, 1, vec![run(31, "tenant_0000", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&31]), [pb::StepOutcome::Failed]);
    let results = s
        .assign("stop", 1, 1, vec![run(32, "tenant_0001", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&32]), [pb::StepOutcome::NotRun]);
    let results = s
        .assign("stop", 2, 1, vec![run(33, "tenant_0001", &["m"], true)])
        .await;
    assert_eq!(outcomes(&results[&33]), [pb::StepOutcome::AlreadyApplied]);
}

/// A coordinator sends its outstanding runs again after a reconnect, while the first copies
/// may still run here. A second copy of a data change (its journal row is written only at
/// its end) ran beside the first on another lane: it took over the first one's checkpoint,
/// and either applied batches again or failed the step on the checkpoint's compare-and-set
/// (a plan that was succeeding, rolled back). The copy is not queued now: the first one's
/// result answers, and each row is changed once.
#[tokio::test]
async fn a_run_sent_again_while_it_runs_applies_its_change_once() {
    let Some(f) = fleet("resent_data", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "rs".into(),
        migrations: vec![pb::Migration {
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_size: 5,
                rows_per_second: 10,
                batch_sql:
                    "UPDATE work_orders SET priority = priority || '+' WHERE id > $1 AND id <= $2"
                        .into(),
                ..Default::default()
            }),
            ..migration("mark_once", "", "", "")
        }],
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let assign = pb::Assign {
        plan_id: "rs".into(),
        epoch: 1,
        lanes: 2,
        runs: vec![run(1, "tenant_0000", &["mark_once"], false)],
    };
    s.send(In::Assign(assign.clone()));
    // part-way: the first batch is done, the rate holds the next ones back
    batches_done(&pool, 1).await;
    s.send(In::Assign(assign));
    let r = s.results("rs", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{:?}", r[&1]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'low+'"
        )
        .await,
        20,
        "every row marked once"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.checkpoints").await,
        0,
        "no checkpoint of a second copy left behind"
    );
    h.stop().await;
    f.drop().await;
}

/// A data change whose journal row another run committed while this one began (here a
/// session writing it during the change's first up statement, or between its up statements
/// and its first batch) is not applied again: the first write of its checkpoint refuses
/// (FL005), its transaction with it, and the run reports the journal's version applied.
#[tokio::test]
async fn a_data_change_applied_meanwhile_by_another_run_is_not_applied_again() {
    let Some(f) = fleet("journaled_meanwhile", 2).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    let change = |up: &str| pb::Migration {
        data: Some(pb::DataChange {
            table: "work_orders".into(),
            key: "id".into(),
            batch_size: 50,
            batch_sql: "UPDATE work_orders SET priority = 'again' WHERE id > $1 AND id <= $2"
                .into(),
            ..Default::default()
        }),
        ..migration("idem", up, "", "")
    };
    // the guard of the up statements' checkpoint (the sleep is the first statement), then
    // that of the first batch's (the sleep is the second: the first one's checkpoint is
    // written before it)
    for (plan, tenant, up) in [
        ("jm1", "tenant_0000", "SELECT pg_sleep(0.4)"),
        ("jm2", "tenant_0001", "SELECT 1;\nSELECT pg_sleep(0.4)"),
    ] {
        s.send(In::Plan(pb::PlanDefinition {
            plan_id: plan.into(),
            migrations: vec![change(up)],
            default_lock_timeout_ms: 2000,
            default_statement_timeout_ms: 0,
            ..Default::default()
        }));
        let r = run_while_another_applies(&mut s, &pool, plan, 1, 1, tenant).await;
        assert_eq!(
            outcomes(&r),
            [pb::StepOutcome::AlreadyApplied],
            "{plan}: {r:?}"
        );
        assert_eq!(
            r.steps[0].checksum, "theirs",
            "{plan}: the journal's version"
        );
        assert_eq!(
            count(
                &pool,
                &format!("SELECT count(*) FROM {tenant}.work_orders WHERE priority = 'again'")
            )
            .await,
            0,
            "{plan}: no batch ran"
        );
    }
    h.stop().await;
    f.drop().await;
}

/// A tenant whose schema is another than the one its journal rows were written in (dropped
/// and made again, or restored on its own): nothing runs there, each step failing with what
/// an operator can answer; `flotilla.tenant_is_new` moves its rows to the history and its
/// migrations run again, `flotilla.tenant_kept_its_history` keeps them (a restore). Before,
/// the former rows answered ALREADY_APPLIED on a new tenant. Rows recorded in another
/// database (a restore or copy of the whole) are recorded again, nothing said.
#[tokio::test]
async fn a_tenant_whose_schema_changed_runs_nothing_until_an_operator_says_which() {
    let Some(f) = fleet("schema_changed", 2).await else {
        return;
    };
    let (dsn, pool) = (f.dsn.clone(), f.pool.clone());
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, _) = h.attach(1).await;
    let definition = |plan: &str| {
        In::Plan(pb::PlanDefinition {
            plan_id: plan.into(),
            migrations: bench_migrations(),
            default_lock_timeout_ms: 5000,
            ..Default::default()
        })
    };
    let runs = |first: u64| -> Vec<pb::Run> {
        (0..2)
            .map(|i| run(first + i, &format!("tenant_{i:04}"), &BENCH, true))
            .collect()
    };
    s.send(definition("p1"));
    for r in s.assign("p1", 1, 2, runs(0)).await.values() {
        assert_eq!(outcomes(r), [pb::StepOutcome::Applied; 3], "{r:?}");
    }
    // both tenants dropped and made again as they were before any migration
    let remake = |t: &str| {
        format!(
            "DROP SCHEMA {t} CASCADE; CREATE SCHEMA {t};
             CREATE TABLE {t}.work_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
               customer_id bigint NOT NULL, priority text NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {t}.repair_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
               customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());"
        )
    };
    sqlx::raw_sql(AssertSqlSafe(
        remake("tenant_0000") + &remake("tenant_0001"),
    ))
    .execute(&pool)
    .await
    .unwrap();
    s.send(definition("p2"));
    let results = s.assign("p2", 1, 2, runs(10)).await;
    for r in results.values() {
        assert_eq!(outcomes(r), [pb::StepOutcome::Failed; 3], "{r:?}");
        let message = &r.steps[0].error.as_ref().unwrap().message;
        assert!(
            message.contains("its schema is not the one its journal rows were written in")
                && message.contains("SELECT flotilla.tenant_is_new('"),
            "{message}"
        );
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        6,
        "nothing changed"
    );
    // Nor is anything undone there: the down SQL would run on another schema.
    let reply = s.rollback("p1", 1).await;
    assert!(!reply.complete, "{reply:?}");
    assert_eq!(reply.steps.len(), 2, "{reply:?}");
    assert!(
        reply.steps.iter().all(|st| st
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("flotilla.tenant_is_new"))),
        "{reply:?}"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        6
    );
    // tenant_0000 is new: its rows go to the history and its migrations run; tenant_0001
    // holds what its journal says: they stay, and answer.
    let moved: i64 = sqlx::query_scalar("SELECT flotilla.tenant_is_new('tenant_0000')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(moved, 3);
    sqlx::query("SELECT flotilla.tenant_kept_its_history('tenant_0001')")
        .execute(&pool)
        .await
        .unwrap();
    s.send(definition("p3"));
    let results = s.assign("p3", 1, 2, runs(20)).await;
    assert_eq!(
        outcomes(&results[&20]),
        [pb::StepOutcome::Applied; 3],
        "{:?}",
        results[&20]
    );
    assert_eq!(
        outcomes(&results[&21]),
        [pb::StepOutcome::AlreadyApplied; 3],
        "{:?}",
        results[&21]
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM flotilla.journal_history WHERE target = 'tenant_0000' \
             AND rolled_back_by_plan = 'flotilla:tenant-is-new' AND plan_id = 'p1'",
        )
        .await,
        3
    );

    // What a restore or a copy of the whole looks like: rows recorded in another database
    // (made-up OIDs). They are recorded again, nothing said; the same OIDs recorded here
    // say both schemas changed.
    let changed =
        "SELECT count(*) FROM flotilla.record_tenant_schemas(ARRAY['tenant_0000', 'tenant_0001'])";
    sqlx::raw_sql("UPDATE flotilla.tenant_schemas SET schema_oid = 1, recorded_in = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(count(&pool, changed).await, 0, "recorded again");
    assert_eq!(count(&pool, changed).await, 0, "as they are now");
    sqlx::raw_sql("UPDATE flotilla.tenant_schemas SET schema_oid = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(count(&pool, changed).await, 2);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        6
    );
    // A tenant with nothing of its schema before to answer for (no journal row, checkpoint
    // or prior image: made, dropped before any plan ran there, made again) is recorded
    // again, nothing said: it was refused as changed, the message speaking of journal rows
    // it did not have.
    sqlx::raw_sql("DELETE FROM flotilla.journal WHERE target = 'tenant_0001'")
        .execute(&pool)
        .await
        .unwrap();
    let changed_now = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT * FROM flotilla.record_tenant_schemas(ARRAY['tenant_0000', 'tenant_0001'])",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    assert_eq!(changed_now().await, ["tenant_0000"]);
    assert_eq!(
        changed_now().await,
        ["tenant_0000"],
        "tenant_0001 as it is now"
    );
    h.stop().await;
    f.drop().await;
}

/// A data change fenced by a newer coordinator term (a restart, a failover) mid-way says it
/// stopped, not failed: the new term runs it on from its checkpoint, and a status that read
/// "failed: fenced: epoch 1 is older than the shard's" for a second or two after every
/// coordinator restart paged whoever watched `data[].state`.
#[tokio::test]
async fn a_data_change_fenced_by_a_newer_term_says_it_stopped() {
    let Some(f) = fleet("fence_data", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (s, _) = h.attach(1).await;
    start_fill(&s, "fd", "fenced_fill", (2, 4), "fenced");
    batches_done(&pool, 1).await;
    // the leader changes under it: the welcome moves the fence, its next batch is refused
    drop(s);
    let (mut s, _) = h.attach(2).await;
    let ended = loop {
        if let Out::Heartbeat(hb) = s.inbound_next().await
            && let Some(d) = hb
                .data
                .into_iter()
                .find(|d| d.migration_id == "fenced_fill" && d.state != "running")
        {
            break d;
        }
    };
    assert_eq!(ended.state, "stopped", "{ended:?}");
    assert!(ended.reason.contains("newer coordinator term"), "{ended:?}");
    drop(s);
    h.stop().await;
    f.drop().await;
}

/// A tenant's schema dropped and made again under a plan under way, after the agent checked
/// its runs (queued behind another on its one lane): the step there fails (FL006, saying
/// what an operator can answer) and runs nothing. Before, the step ran on the new schema,
/// the journal mixing the two schemas' rows, while the agent's discovery said "nothing runs
/// there" (a walk-through).
#[tokio::test]
async fn a_step_on_a_schema_made_again_under_its_plan_runs_nothing() {
    let Some(f) = fleet("schema_again", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    sqlx::query("CREATE TABLE public.sa_blocker ()")
        .execute(&f.pool)
        .await
        .unwrap();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "sa".into(),
        migrations: vec![
            migration("sa_first", "CREATE TABLE sa_first (id int)", "", ""),
            migration(
                "sa_second",
                "CREATE TABLE sa_second (id int); SELECT count(*) FROM public.sa_blocker",
                "",
                "",
            ),
        ],
        default_lock_timeout_ms: 60_000,
        ..Default::default()
    }));
    let r = s
        .assign("sa", 1, 1, vec![run(1, "tenant_0001", &["sa_first"], true)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    // tenant_0000's run holds the one lane while tenant_0001's waits, checked
    let mut blocker = f.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE public.sa_blocker IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    s.send(In::Assign(pb::Assign {
        plan_id: "sa".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![
            run(2, "tenant_0000", &["sa_second"], true),
            run(3, "tenant_0001", &["sa_second"], true),
        ],
    }));
    wait_running(&f.pool, "sa_blocker").await;
    sqlx::raw_sql("DROP SCHEMA tenant_0001 CASCADE; CREATE SCHEMA tenant_0001;")
        .execute(&f.pool)
        .await
        .unwrap();
    blocker.commit().await.unwrap();
    let r = s.results("sa", 2).await;
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Applied], "{r:?}");
    assert_eq!(outcomes(&r[&3]), [pb::StepOutcome::Failed], "{r:?}");
    let e = r[&3].steps[0].error.clone().unwrap_or_default();
    assert_eq!(e.sqlstate, "FL006", "{e:?}");
    assert!(
        e.message.contains("flotilla.tenant_is_new('tenant_0001')"),
        "{e:?}"
    );
    assert_eq!(
        count(
            &f.pool,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_0001'"
        )
        .await,
        0,
        "nothing ran there"
    );
    drop(s);
    h.stop().await;
    f.drop().await;
}

/// A tenant's schema made again under its backfill (re-provisioned with the same table): the
/// next batch fails (FL006) and nothing is changed in the new schema, its journal row not
/// written. Before, the check ran once, as the step began: the batches went on in the new
/// schema and the journal row followed (the review of the check on transactional steps).
#[tokio::test]
async fn a_backfill_on_a_schema_made_again_under_it_changes_nothing_there() {
    let Some(f) = fleet("schema_again_data", 1).await else {
        return;
    };
    let pool = f.pool.clone();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    start_fill(&s, "sd", "swap_fill", (2, 4), "swapped");
    batches_done(&pool, 1).await;
    sqlx::raw_sql(
        "DROP SCHEMA tenant_0000 CASCADE; CREATE SCHEMA tenant_0000; \
         CREATE TABLE tenant_0000.work_orders (id bigserial PRIMARY KEY, priority text); \
         INSERT INTO tenant_0000.work_orders (priority) SELECT 'low' FROM generate_series(1, 20);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let r = s.results("sd", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{r:?}");
    let e = r[&1].steps[0].error.clone().unwrap_or_default();
    assert_eq!(e.sqlstate, "FL006", "{e:?}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM tenant_0000.work_orders WHERE priority = 'swapped'"
        )
        .await,
        0,
        "nothing changed in the new schema"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    drop(s);
    h.stop().await;
    f.drop().await;
}

/// An agent restarted with a narrower --tenant-pattern says at its start which tenants with
/// history it leaves out though their schemas are there (it said nothing: plans left them
/// out and the fleet's status called them gone; a walk-through).
#[tokio::test]
async fn an_agent_says_the_tenants_with_history_its_pattern_leaves_out() {
    let Some(f) = fleet("pattern_narrowed", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pn".into(),
        migrations: vec![migration("pn_m", "CREATE TABLE pn_t (id int)", "", "")],
        default_lock_timeout_ms: 2000,
        ..Default::default()
    }));
    let r = s
        .assign("pn", 1, 1, vec![run(1, "tenant_0001", &["pn_m"], true)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    drop(s);
    h.stop().await;
    let mark = log_mark();
    let mut h = Harness::start(|c| c.tenant_pattern = Some("tenant_0000".into()), &f.dsn).await;
    let (_s, _) = h.attach(2).await;
    wait_for_log(
        mark,
        "1 tenant(s) with Flotilla history are on this shard but not taken by its --tenant-pattern",
    )
    .await;
    wait_for_log(mark, "\"tenant_0001\"").await;
    h.stop().await;
    f.drop().await;
}

/// A leader of a newer term welcomes the agent while runs an earlier leader handed out are
/// still queued: they are not run (the new leader sends its own), and the shard's fence
/// moves to the new epoch as soon as the run under way lets go of it (refusing any that got
/// by), not applied under the new leader's term. Before, the fence moved only with the new leader's
/// first run: a deposed leader's queued runs went on applying for seconds after the
/// takeover (invariant 2).
#[tokio::test]
async fn a_new_leaders_welcome_fences_the_runs_an_earlier_one_left_queued() {
    let Some(f) = fleet("fence_welcome", 3).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (s, _) = h.attach(1).await;
    sqlx::query("CREATE TABLE public.fw_blocker ()")
        .execute(&f.pool)
        .await
        .unwrap();
    let mut blocker = f.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE public.fw_blocker IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "fw".into(),
        migrations: vec![migration(
            "fw_m",
            "CREATE TABLE fw_t (id int); SELECT count(*) FROM public.fw_blocker",
            "DROP TABLE fw_t",
            "",
        )],
        default_lock_timeout_ms: 60_000,
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "fw".into(),
        epoch: 1,
        lanes: 1,
        runs: (1..=3)
            .map(|i| run(i, &format!("tenant_000{}", i - 1), &["fw_m"], true))
            .collect(),
    }));
    wait_running(&f.pool, "fw_blocker").await;
    // the leader changes under run 1
    drop(s);
    let (mut s, _) = h.attach(2).await;
    let mut r = welcome_taken(&mut s).await;
    blocker.commit().await.unwrap();
    while r.len() < 3 {
        match s.next().await {
            Out::Results(res) => r.extend(res.runs.into_iter().map(|run| (run.run_id, run))),
            other => panic!("expected results, got {other:?}"),
        }
    }
    // run 1 was under way (its transaction began before the takeover): it commits; the
    // others are not run (the new leader hands out its own)
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    for id in [2, 3] {
        assert_eq!(
            outcomes(&r[&id]),
            [pb::StepOutcome::NotRun],
            "run {id}: {r:?}"
        );
    }
    // the fence moves once run 1 let go of its row (the welcome's advance waited for it)
    flotilla_testkit::wait::wait_until("the fence at the new epoch", WAIT, async || {
        Ok(count(&f.pool, "SELECT epoch FROM flotilla.fence").await == 2)
    })
    .await
    .unwrap();
    assert_eq!(
        count(
            &f.pool,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'fw_t'"
        )
        .await,
        1
    );
    drop(s);
    h.stop().await;
    f.drop().await;
}

/// A new leader sends the runs it finds outstanding under its own run ids, while an earlier
/// leader's copy may still run here: the new copy is queued once the first has ended, and
/// the journal answers for it (the first applied it). Before, it ran beside the first: its
/// statements waited on the fence row, then ran again once the first committed (an UPDATE
/// counted twice until the journal row's conflict undid it), and it reported a failure (a
/// walk-through's find).
#[tokio::test]
async fn a_new_leaders_copy_of_a_run_under_way_is_answered_by_the_first() {
    let Some(f) = fleet("leader_copy", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (s, _) = h.attach(1).await;
    sqlx::raw_sql(
        "CREATE TABLE tenant_0000.lc_counter (n int); INSERT INTO tenant_0000.lc_counter VALUES (0);
         CREATE SEQUENCE tenant_0000.lc_runs; CREATE TABLE public.lc_blocker ()",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    let mut blocker = f.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE public.lc_blocker IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let definition = pb::PlanDefinition {
        plan_id: "lc".into(),
        migrations: vec![migration(
            "lc_m",
            "SELECT nextval('lc_runs'); UPDATE lc_counter SET n = n + 1; SELECT count(*) FROM public.lc_blocker",
            "UPDATE lc_counter SET n = n - 1",
            "",
        )],
        default_lock_timeout_ms: 60_000,
        ..Default::default()
    };
    s.send(In::Plan(definition.clone()));
    s.send(In::Assign(pb::Assign {
        plan_id: "lc".into(),
        epoch: 1,
        lanes: 2,
        runs: vec![run(1, "tenant_0000", &["lc_m"], true)],
    }));
    wait_running(&f.pool, "lc_blocker").await;
    // the leader changes under run 1; the new one sends the same step as its own run
    drop(s);
    let (mut s, _) = h.attach(2).await;
    let mut r = welcome_taken(&mut s).await;
    s.send(In::Plan(definition));
    let copy = (2u64 << 32) + 1;
    let mark = log_mark();
    s.send(In::Assign(pb::Assign {
        plan_id: "lc".into(),
        epoch: 2,
        lanes: 2,
        runs: vec![run(copy, "tenant_0000", &["lc_m"], true)],
    }));
    // the copy is held back until the first ends, or (before) ran beside it, its session
    // waiting on the fence row once the fence's own wait gave up (2 s)
    let beside = flotilla_testkit::wait::wait_for("the copy handled", WAIT, async || {
        if logged_since(mark, &format!("run={copy}"))
            && logged_since(mark, "a copy of this run an earlier leader sent")
        {
            return Ok(Some(false));
        }
        let sessions = count(
            &f.pool,
            "SELECT count(*) FROM pg_stat_activity WHERE position('lc_runs' in query) > 0
                AND pid <> pg_backend_pid()",
        )
        .await;
        Ok((sessions > 1).then_some(true))
    })
    .await
    .unwrap();
    assert!(!beside, "the copy ran beside the first");
    blocker.commit().await.unwrap();
    while r.len() < 2 {
        match s.next().await {
            Out::Results(res) => r.extend(res.runs.into_iter().map(|run| (run.run_id, run))),
            other => panic!("expected results, got {other:?}"),
        }
    }
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    assert_eq!(
        outcomes(&r[&copy]),
        [pb::StepOutcome::AlreadyApplied],
        "answered by the journal: {r:?}"
    );
    assert_eq!(
        count(&f.pool, "SELECT n::bigint FROM tenant_0000.lc_counter").await,
        1,
        "counted once"
    );
    // and its statements ran once: a sequence keeps what a rolled-back copy took
    assert_eq!(
        count(&f.pool, "SELECT last_value FROM tenant_0000.lc_runs").await,
        1,
        "the step's statements ran once"
    );
    drop(s);
    h.stop().await;
    f.drop().await;
}
