//! Two-phase commit on the agent: PREPARE, Resolve, in-doubt transactions at restart, and
//! the two-phase preflight. Needs `FLOTILLA_TEST_PG_URL` on a cluster started with
//! `max_prepared_transactions` above 0 (otherwise each test prints a note and passes); the
//! etcd test also an etcd binary; the `max_prepared_transactions = 0` checks a second cluster
//! without it, named by `FLOTILLA_TEST_PG_URL_NO_2PC`.

use std::time::Duration;

use crate::common::*;
use etcd_client::Client;
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::coordinator_message::Body as In;
use flotilla_testkit::Etcd;
use sqlx::Connection;

fn define(s: &Stream, plan: &str, migrations: Vec<pb::Migration>) {
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: plan.into(),
        migrations,
        default_lock_timeout_ms: 2000,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
}

/// A migration creating (and dropping) `table`, in the schema of the run's target.
fn table(id: &str, table: &str) -> pb::Migration {
    migration(
        id,
        &format!("CREATE TABLE {table} (id int)"),
        &format!("DROP TABLE {table}"),
        "",
    )
}

/// Whether the table or view exists (and is visible: committed).
async fn table_exists(f: &Fleet, schema: &str, table: &str) -> bool {
    let sql = format!(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = '{schema}' AND c.relname = '{table}'"
    );
    count(&f.pool, &sql).await == 1
}

async fn journal(f: &Fleet, plan: &str) -> i64 {
    count(
        &f.pool,
        &format!("SELECT count(*) FROM flotilla.journal WHERE plan_id = '{plan}'"),
    )
    .await
}

/// For each (plan, gid): defines the plan with one migration creating `<plan>_t`, and
/// prepares it on tenant_0000 under that gid (run ids 1, 2, ...).
async fn prepare_each(s: &mut Stream, gids: &[(&str, &str)]) {
    for (i, (plan, gid)) in gids.iter().enumerate() {
        let id = format!("{plan}_m");
        define(s, plan, vec![table(&id, &format!("{plan}_t"))]);
        let run_id = i as u64 + 1;
        let r = s
            .assign(
                plan,
                1,
                1,
                vec![prepared_run(run_id, "tenant_0000", &[&id], gid)],
            )
            .await;
        assert_eq!(outcomes(&r[&run_id]), [pb::StepOutcome::Prepared], "{r:?}");
    }
}

fn error(r: &pb::RunResult, step: usize) -> pb::StepError {
    r.steps[step].error.clone().expect("a step error")
}

#[tokio::test]
async fn prepare_commit_abort_and_resend() {
    let Some(f) = fleet_2pc("tpc", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert!(hello.in_doubt.is_empty(), "{:?}", hello.in_doubt);

    // prepared: PREPARED with the checksums, held in pg_prepared_xacts, nothing visible yet;
    // sent twice in one go, the copy is dropped (the one result answers both)
    define(&s, "pc", bench_migrations());
    let gid = "flotilla:pc:1:1:tenant_0000";
    s.send(In::Assign(pb::Assign {
        plan_id: "pc".into(),
        epoch: 1,
        lanes: 2,
        runs: vec![
            prepared_run(1, "tenant_0000", &BENCH, gid),
            prepared_run(1, "tenant_0000", &BENCH, gid),
        ],
    }));
    let r = s.results("pc", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared; 3], "{r:?}");
    assert_eq!(r[&1].steps[0].checksum, flotilla_core::checksum(HS_UP));
    assert_eq!(r[&1].steps[2].checksum, flotilla_core::checksum(VIEW_UP));
    assert_eq!(prepared_gids(&f.pool).await, [gid]);
    assert_eq!(journal(&f, "pc").await, 0);
    assert!(!table_exists(&f, "tenant_0000", "unified_satisfaction").await);

    // resent: PREPARED again without a second transaction (a second one would wait for the
    // first one's locks, then fail)
    let started = std::time::Instant::now();
    let r = s
        .assign(
            "pc",
            1,
            1,
            vec![prepared_run(1, "tenant_0000", &BENCH, gid)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared; 3], "{r:?}");
    assert_eq!(r[&1].steps[1].checksum, flotilla_core::checksum(AUTO_UP));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(prepared_gids(&f.pool).await, [gid]);

    // other work at the same epoch is not held up by the prepared transaction's hold on
    // the fence row
    define(&s, "plain", vec![table("marker", "marker")]);
    let r = s
        .assign(
            "plain",
            1,
            1,
            vec![run(2, "tenant_0001", &["marker"], true)],
        )
        .await;
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Applied], "{r:?}");

    // commit: the change and its journal rows show
    let reply = s.resolve("pc", true, 1, &[gid]).await;
    assert_eq!((reply.plan_id.as_str(), reply.commit), ("pc", true));
    assert_eq!(reply.resolved, [gid], "{reply:?}");
    assert!(reply.failed.is_empty(), "{reply:?}");
    assert!(prepared_gids(&f.pool).await.is_empty());
    assert_eq!(journal(&f, "pc").await, 3);
    assert!(table_exists(&f, "tenant_0000", "unified_satisfaction").await);
    // a repeat is resolved too, and the run resent after it finds the journal
    let again = s.resolve("pc", true, 1, &[gid]).await;
    assert_eq!(again.resolved, [gid], "{again:?}");
    assert!(again.failed.is_empty(), "{again:?}");
    let r = s
        .assign(
            "pc",
            1,
            1,
            vec![prepared_run(1, "tenant_0000", &BENCH, gid)],
        )
        .await;
    assert_eq!(
        outcomes(&r[&1]),
        [pb::StepOutcome::AlreadyApplied; 3],
        "{r:?}"
    );
    assert!(prepared_gids(&f.pool).await.is_empty());

    // a second plan, aborted: nothing of it is left
    define(
        &s,
        "pa",
        vec![
            table("aborted", "aborted_t"),
            table("aborted2", "aborted_t2"),
        ],
    );
    let gid_a = "flotilla:pa:3:1:tenant_0001";
    let gid_b = "flotilla:pa:4:1:tenant_0000";
    let r = s
        .assign(
            "pa",
            1,
            2,
            vec![
                prepared_run(3, "tenant_0001", &["aborted", "aborted2"], gid_a),
                prepared_run(4, "tenant_0000", &["aborted", "aborted2"], gid_b),
            ],
        )
        .await;
    assert_eq!(outcomes(&r[&3]), [pb::StepOutcome::Prepared; 2], "{r:?}");
    assert_eq!(outcomes(&r[&4]), [pb::StepOutcome::Prepared; 2], "{r:?}");
    // The abort names one; the other, prepared while the decision was on its way (a run
    // the agent went on with while cut off), goes with it: the abort is the unit's.
    let reply = s.resolve("pa", false, 1, &[gid_a]).await;
    assert_eq!(reply.resolved, [gid_a, gid_b], "{reply:?}");
    assert!(!reply.commit);
    assert!(prepared_gids(&f.pool).await.is_empty());
    assert!(!table_exists(&f, "tenant_0001", "aborted_t").await);
    assert!(!table_exists(&f, "tenant_0000", "aborted_t").await);
    assert_eq!(journal(&f, "pa").await, 0);

    // failures before or at PREPARE are reported as ever, and nothing stays prepared
    let mut migrations = bench_migrations();
    migrations.push(migration(
        "bad",
        "ALTER TABLE nope ADD COLUMN x int",
        "",
        "",
    ));
    migrations.push(migration(
        "temp",
        "CREATE TEMP TABLE scratch (id int)",
        "",
        "",
    ));
    migrations.push(migration(
        "concurrent_index",
        "CREATE INDEX CONCURRENTLY idx_wo_customer ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY idx_wo_customer",
        "",
    ));
    define(&s, "pf", migrations);
    let r = s
        .assign(
            "pf",
            1,
            1,
            vec![
                prepared_run(
                    10,
                    "tenant_0001",
                    &[BENCH[0], "bad"],
                    "flotilla:pf:10:1:tenant_0001",
                ),
                prepared_run(
                    11,
                    "tenant_0001",
                    &[BENCH[0], "temp"],
                    "flotilla:pf:11:1:tenant_0001",
                ),
            ],
        )
        .await;
    assert_eq!(
        outcomes(&r[&10]),
        [pb::StepOutcome::NotRun, pb::StepOutcome::Failed]
    );
    let e = error(&r[&10], 1);
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("42P01", "up"),
        "{e:?}"
    );
    // PREPARE itself fails (a temporary table): phase prepare
    assert_eq!(
        outcomes(&r[&11]),
        [pb::StepOutcome::NotRun, pb::StepOutcome::Failed],
        "{r:?}"
    );
    let e = error(&r[&11], 1);
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("0A000", "prepare"),
        "{e:?}"
    );
    assert!(prepared_gids(&f.pool).await.is_empty());
    assert_eq!(journal(&f, "pf").await, 0);

    // runs that cannot be prepared fail in phase prepare before anything runs
    let r = s
        .assign(
            "pf",
            1,
            1,
            vec![
                prepared_run(12, "tenant_0001", &[BENCH[0]], "pf:12:1:tenant_0001"),
                prepared_run(
                    13,
                    "tenant_0001",
                    &[BENCH[0]],
                    "flotilla:pc:13:1:tenant_0001",
                ),
                prepared_run(
                    14,
                    "tenant_0001",
                    &[BENCH[0], "concurrent_index"],
                    "flotilla:pf:14:1:tenant_0001",
                ),
                prepared_run(
                    15,
                    "tenant_0001",
                    &[BENCH[0]],
                    &format!("flotilla:pf:15:1:{}", "x".repeat(200)),
                ),
            ],
        )
        .await;
    for (id, says) in [
        (12, "does not start with `flotilla:`"),
        (13, "does not belong to plan pf"),
        (
            14,
            "migration `concurrent_index` cannot run in a transaction",
        ),
        (15, "fewer than 200"),
    ] {
        assert_eq!(
            outcomes(&r[&id])[0],
            pb::StepOutcome::Failed,
            "{:?}",
            r[&id]
        );
        let e = error(&r[&id], 0);
        assert_eq!(e.phase, "prepare", "{e:?}");
        assert!(e.message.contains(says), "{id}: {e:?}");
    }
    assert!(prepared_gids(&f.pool).await.is_empty());
    assert_eq!(journal(&f, "pf").await, 0);

    // the two-phase preflight: this cluster can prepare, and its probe is gone after it
    s.send(In::Preflight(pb::PreflightRequest {
        request_id: 5,
        migration_ids: Vec::new(),
        two_phase: true,
        data_migrations: Vec::new(),
        lock_relations: Vec::new(),
    }));
    let Out::Preflight(p) = s.next().await else {
        panic!("preflight reply")
    };
    assert_eq!(
        (p.request_id, p.two_phase_error.as_str(), p.error.as_str()),
        (5, "", "")
    );
    assert!(prepared_gids(&f.pool).await.is_empty());
    h.stop().await;
    f.drop().await;
}

#[tokio::test]
async fn in_doubt_listed_fenced_and_foreign_untouched() {
    let Some(f) = fleet_2pc("tpc_doubt", 1).await else {
        return;
    };
    // another application's prepared transaction in the same database
    let mut other = sqlx::PgConnection::connect(&f.dsn).await.unwrap();
    sqlx::raw_sql(
        "BEGIN; CREATE TABLE public.foreign_t (id int); PREPARE TRANSACTION 'other-app-1'",
    )
    .execute(&mut other)
    .await
    .unwrap();

    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert!(hello.in_doubt.is_empty(), "{:?}", hello.in_doubt);
    define(&s, "pd", vec![table("t1", "t1"), table("t2", "t2")]);
    let gid = "flotilla:pd:1:1:tenant_0000";
    let r = s
        .assign(
            "pd",
            1,
            1,
            vec![prepared_run(1, "tenant_0000", &["t1"], gid)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared]);

    // without etcd, every Flotilla transaction still prepared is listed at each connect
    drop(s);
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.in_doubt, [gid]);
    define(&s, "pd", vec![table("t1", "t1"), table("t2", "t2")]);

    // a Resolve touches only the plan's own Flotilla transactions
    let reply = s
        .resolve(
            "pd",
            true,
            1,
            &["other-app-1", "flotilla:px:1:1:tenant_0000"],
        )
        .await;
    assert!(reply.resolved.is_empty(), "{reply:?}");
    assert_eq!(reply.failed.len(), 2, "{reply:?}");
    assert!(reply.failed[0].starts_with("other-app-1: "), "{reply:?}");

    // a newer epoch cannot be written while an older epoch's transaction is prepared: its
    // steps fail on their fence check, saying why
    let r = s
        .assign("pd", 2, 1, vec![run(5, "tenant_0000", &["t2"], true)])
        .await;
    assert_eq!(outcomes(&r[&5]), [pb::StepOutcome::Failed], "{r:?}");
    let e = r[&5].steps[0].error.clone().unwrap();
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("55P03", "fence"),
        "{e:?}"
    );
    assert!(e.detail.contains("prepared transaction"), "{e:?}");
    assert_eq!(count(&f.pool, "SELECT epoch FROM flotilla.fence").await, 1);
    // resolved (from epoch 1, the shard's), the new epoch goes ahead
    let reply = s.resolve("pd", false, 1, &[gid]).await;
    assert_eq!(reply.resolved, [gid], "{reply:?}");
    assert!(!table_exists(&f, "tenant_0000", "t1").await);

    // a coordinator older than the shard's fence decides nothing
    let gid2 = "flotilla:pd:2:2:tenant_0000";
    let r = s
        .assign(
            "pd",
            2,
            1,
            vec![prepared_run(2, "tenant_0000", &["t2"], gid2)],
        )
        .await;
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Prepared], "{r:?}");
    let reply = s.resolve("pd", false, 1, &[gid2]).await;
    assert!(reply.resolved.is_empty(), "{reply:?}");
    assert_eq!(
        reply.failed,
        [format!(
            "{gid2}: fenced: epoch 1 is older than the shard's epoch 2"
        )]
    );
    assert_eq!(prepared_gids(&f.pool).await, [gid2, "other-app-1"]);
    // from the shard's epoch it goes through; a gid already resolved counts as resolved
    let reply = s.resolve("pd", false, 2, &[gid, gid2]).await;
    assert_eq!(reply.resolved, [gid, gid2], "{reply:?}");
    assert!(!table_exists(&f, "tenant_0000", "t2").await);

    // restarted: the foreign transaction is neither listed nor resolved
    h.stop().await;
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (_s, hello) = h.attach(2).await;
    assert!(hello.in_doubt.is_empty(), "{:?}", hello.in_doubt);
    h.stop().await;
    assert_eq!(prepared_gids(&f.pool).await, ["other-app-1"]);
    sqlx::raw_sql("ROLLBACK PREPARED 'other-app-1'")
        .execute(&mut other)
        .await
        .unwrap();
    f.drop().await;
}

const PREFIX: &str = "/flotilla-2pc-test";

async fn put_decision(client: &mut Client, plan: &str, decision: &str) {
    client
        .put(format!("{PREFIX}/decisions/{plan}"), decision, None)
        .await
        .unwrap();
}

/// A leader of a newer term welcomes the agent while an earlier term's atomic runs are
/// here: those still queued are not run (NOT_RUN: the new leader presumes their unit
/// aborted; run on, each PREPAREd after that and held its target's locks with the plan
/// said rolled back), and the one under way, which PREPAREs after the change, is rolled
/// back as soon as the abort is in etcd (before, it waited for the periodic sweep).
#[tokio::test]
async fn an_earlier_terms_atomic_runs_do_not_outlive_its_presumed_abort() {
    let Some(etcd) = Etcd::start_or_skip("an_earlier_terms_atomic_runs").await else {
        return;
    };
    let Some(f) = fleet_2pc("tpc_term", 3).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    let mut h = Harness::start(
        move |c| {
            c.etcd = vec![endpoint.clone()];
            c.etcd_prefix = format!("{PREFIX}/");
            c.lease_ttl = Duration::from_secs(3);
            // the sweep stays out of it: what resolves here is the new term's check
            c.in_doubt_sweep = Duration::from_secs(600);
        },
        &f.dsn,
    )
    .await;
    let (s, _) = h.attach(1).await;
    // the first run waits on a lock the test holds, so the term changes under it
    sqlx::query("CREATE TABLE public.pt_blocker ()")
        .execute(&f.pool)
        .await
        .unwrap();
    let mut blocker = f.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE public.pt_blocker IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pt".into(),
        migrations: vec![migration(
            "pt_m",
            "CREATE TABLE pt_t (id int); SELECT count(*) FROM public.pt_blocker",
            "DROP TABLE pt_t",
            "",
        )],
        default_lock_timeout_ms: 60_000,
        ..Default::default()
    }));
    let gid = |i: u64| format!("flotilla:pt:1:{i}:tenant_000{}", i - 1);
    s.send(In::Assign(pb::Assign {
        plan_id: "pt".into(),
        epoch: 1,
        lanes: 1,
        runs: (1..=3)
            .map(|i| prepared_run(i, &format!("tenant_000{}", i - 1), &["pt_m"], &gid(i)))
            .collect(),
    }));
    wait_running(&f.pool, "pt_blocker").await;
    // the leader changes: the stream ends, a leader of term 2 welcomes the agent
    drop(s);
    let (mut s, _) = h.attach(2).await;
    // Run 1 goes on once the agent has taken the welcome
    let mut r = welcome_taken(&mut s).await;
    blocker.commit().await.unwrap();
    while r.len() < 3 {
        match s.next().await {
            Out::Results(res) => r.extend(res.runs.into_iter().map(|run| (run.run_id, run))),
            other => panic!("expected results, got {other:?}"),
        }
    }
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared], "{r:?}");
    for id in [2, 3] {
        assert_eq!(
            outcomes(&r[&id]),
            [pb::StepOutcome::NotRun],
            "run {id}: {r:?}"
        );
    }
    assert_eq!(prepared_gids(&f.pool).await, [gid(1)]);
    // the new leader's presumed abort, in etcd: the transaction prepared for term 1 goes
    put_decision(&mut client, "pt", "abort").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !prepared_gids(&f.pool).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still prepared: {:?}",
            prepared_gids(&f.pool).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for tenant in ["tenant_0000", "tenant_0001", "tenant_0002"] {
        assert!(!table_exists(&f, tenant, "pt_t").await, "{tenant}");
    }
    drop(s);
    h.stop().await;
    f.drop().await;
    drop(etcd);
}

/// A prepared transaction nobody resolves while the agent stays connected (the case: a
/// run in flight when the leader changed PREPAREs after the new leader presumed abort, so
/// no Resolve comes for it): the agent's periodic sweep resolves it from its decision in
/// etcd, on the same stream, with no reconnect (before, it held its target's locks until
/// the agent's next connect), once two passes a period apart found the decision. One
/// without a decision stays prepared for the leader.
#[tokio::test]
async fn a_prepared_transaction_nobody_resolves_is_swept_from_its_decision() {
    let Some(etcd) = Etcd::start_or_skip("a_prepared_transaction_nobody_resolves_is_swept").await
    else {
        return;
    };
    let Some(f) = fleet_2pc("tpc_sweep", 1).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    let mut h = Harness::start(
        move |c| {
            c.etcd = vec![endpoint.clone()];
            c.etcd_prefix = format!("{PREFIX}/");
            c.lease_ttl = Duration::from_secs(3);
            c.in_doubt_sweep = Duration::from_millis(300);
        },
        &f.dsn,
    )
    .await;
    let (mut s, _) = h.attach(1).await;
    let gids = [
        ("sa", "flotilla:sa:1:1:tenant_0000"),
        ("sc", "flotilla:sc:2:1:tenant_0000"),
        ("su", "flotilla:su:3:1:tenant_0000"),
    ];
    prepare_each(&mut s, &gids).await;
    let mark = log_mark();
    let decided = tokio::time::Instant::now();
    put_decision(&mut client, "sa", "abort").await;
    put_decision(&mut client, "sc", "commit").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while prepared_gids(&f.pool).await != [gids[2].1] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not swept in time: {:?}",
            prepared_gids(&f.pool).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a pass resolves only what the pass a period before also found decided: never
    // within a period of the decision (the coordinator's own Resolve has that long)
    assert!(
        decided.elapsed() >= Duration::from_millis(250),
        "swept {:?} after the decision",
        decided.elapsed()
    );
    wait_for_log(mark, "resolved a prepared transaction left behind").await;
    assert!(!table_exists(&f, "tenant_0000", "sa_t").await);
    assert!(table_exists(&f, "tenant_0000", "sc_t").await);
    assert_eq!(journal(&f, "sc").await, 1);
    // the same stream still serves: the sweep needed no reconnect
    define(&s, "sn", vec![table("sn_m", "sn_t")]);
    let r = s
        .assign("sn", 1, 1, vec![run(4, "tenant_0000", &["sn_m"], true)])
        .await;
    assert_eq!(outcomes(&r[&4]), [pb::StepOutcome::Applied], "{r:?}");
    // undecided: still the leader's
    assert_eq!(prepared_gids(&f.pool).await, [gids[2].1]);
    put_decision(&mut client, "su", "abort").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !prepared_gids(&f.pool).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "su not swept in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
    f.drop().await;
    drop(etcd);
}

#[tokio::test]
async fn in_doubt_resolved_from_etcd() {
    // Plan ids of their own: gids are unique across the whole server, and
    // prepare_commit_abort_and_resend prepares flotilla:pc:... on the same server.
    let Some(etcd) = Etcd::start_or_skip("in_doubt_resolved_from_etcd").await else {
        return;
    };
    let Some(f) = fleet_2pc("tpc_etcd", 1).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    let with_etcd = move |c: &mut flotilla_agent::AgentConfig| {
        c.etcd = vec![endpoint.clone()];
        c.etcd_prefix = format!("{PREFIX}/");
        c.lease_ttl = Duration::from_secs(3);
        // here the decisions are applied at (re)connects only: the periodic sweep has a
        // test of its own
        c.in_doubt_sweep = Duration::from_secs(3600);
    };
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();

    let mut h = Harness::start(with_etcd.clone(), &f.dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert!(hello.in_doubt.is_empty());
    let gids = [
        ("pe", "flotilla:pe:1:1:tenant_0000"),
        ("pa", "flotilla:pa:2:1:tenant_0000"),
        ("pn", "flotilla:pn:3:1:tenant_0000"),
        ("px", "flotilla:px:4:1:tenant_0000"),
    ];
    prepare_each(&mut s, &gids).await;
    // with etcd, a commit needs the decision there
    let reply = s.resolve("pn", true, 1, &[gids[2].1]).await;
    assert!(reply.resolved.is_empty(), "{reply:?}");
    assert!(
        reply.failed[0].starts_with(&format!("{}: no commit decision in etcd", gids[2].1)),
        "{reply:?}"
    );
    put_decision(&mut client, "pn", "abort").await;
    let reply = s.resolve("pn", true, 1, &[gids[2].1]).await;
    assert!(
        reply.failed[0].contains("no commit decision in etcd"),
        "{reply:?}"
    );
    client
        .delete(format!("{PREFIX}/decisions/pn"), None)
        .await
        .unwrap();
    assert_eq!(prepared_gids(&f.pool).await.len(), 4);
    h.stop().await;

    // decided while the agent was away: a fresh agent applies the decisions at start and
    // lists only the undecided one
    put_decision(&mut client, "pe", "commit").await;
    put_decision(&mut client, "pa", "abort").await;
    let mut h = Harness::start(with_etcd.clone(), &f.dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.in_doubt, [gids[2].1, gids[3].1]);
    assert!(table_exists(&f, "tenant_0000", "pe_t").await);
    assert_eq!(journal(&f, "pe").await, 1);
    assert!(!table_exists(&f, "tenant_0000", "pa_t").await);
    assert_eq!(journal(&f, "pa").await, 0);
    assert_eq!(prepared_gids(&f.pool).await, [gids[2].1, gids[3].1]);

    // with the decision, the coordinator's commit goes through
    put_decision(&mut client, "pn", "commit").await;
    let reply = s.resolve("pn", true, 1, &[gids[2].1]).await;
    assert_eq!(reply.resolved, [gids[2].1], "{reply:?}");
    assert_eq!(journal(&f, "pn").await, 1);
    h.stop().await;

    // no coordinator up at all: the agent resolves from etcd alone, once the decision is there
    let mark = log_mark();
    let h = Harness::start(
        {
            let with_etcd = with_etcd.clone();
            move |c| {
                with_etcd(c);
                c.coordinator = "http://127.0.0.1:1".into();
            }
        },
        &f.dsn,
    )
    .await;
    // its start-up pass read etcd and left px in doubt (no decision yet)
    wait_for_log(mark, &format!("gids=[\"{}\"]", gids[3].1)).await;
    assert_eq!(prepared_gids(&f.pool).await, [gids[3].1]);
    put_decision(&mut client, "px", "commit").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !prepared_gids(&f.pool).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "px was not committed in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(table_exists(&f, "tenant_0000", "px_t").await);
    // the agent never attached: it stops all the same
    h.stop().await;
    f.drop().await;
    drop(etcd);
}

#[tokio::test]
async fn preflight_and_prepare_without_max_prepared_transactions() {
    let Ok(url) = std::env::var("FLOTILLA_TEST_PG_URL_NO_2PC") else {
        flotilla_testkit::skip(
            "preflight_and_prepare_without_max_prepared_transactions",
            "FLOTILLA_TEST_PG_URL_NO_2PC (a cluster with max_prepared_transactions = 0) is not set",
        );
        return;
    };
    let f = fleet_on(&url, "tpc_off", 1).await;
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Preflight(pb::PreflightRequest {
        request_id: 1,
        migration_ids: Vec::new(),
        two_phase: true,
        data_migrations: Vec::new(),
        lock_relations: Vec::new(),
    }));
    let Out::Preflight(p) = s.next().await else {
        panic!("preflight reply")
    };
    assert_eq!(
        p.two_phase_error,
        "shard shard-test: max_prepared_transactions = 0; two-phase commit needs it above 0 (postgresql.conf, restart)"
    );
    assert_eq!(p.error, "");
    // not asked: not checked
    s.send(In::Preflight(pb::PreflightRequest {
        request_id: 2,
        migration_ids: Vec::new(),
        two_phase: false,
        data_migrations: Vec::new(),
        lock_relations: Vec::new(),
    }));
    let Out::Preflight(p) = s.next().await else {
        panic!("preflight reply")
    };
    assert_eq!(p.two_phase_error, "");

    // a run to prepare fails at its PREPARE and leaves nothing
    define(&s, "p0", bench_migrations());
    let r = s
        .assign(
            "p0",
            1,
            1,
            vec![prepared_run(
                1,
                "tenant_0000",
                &BENCH,
                "flotilla:p0:1:1:tenant_0000",
            )],
        )
        .await;
    assert_eq!(
        outcomes(&r[&1]),
        [
            pb::StepOutcome::NotRun,
            pb::StepOutcome::NotRun,
            pb::StepOutcome::Failed
        ],
        "{r:?}"
    );
    let e = error(&r[&1], 2);
    assert_eq!(
        (e.sqlstate.as_str(), e.phase.as_str()),
        ("55000", "prepare"),
        "{e:?}"
    );
    assert_eq!(journal(&f, "p0").await, 0);
    assert!(!table_exists(&f, "tenant_0000", "unified_satisfaction").await);
    h.stop().await;
    f.drop().await;
}

/// An atomic unit's runs on a shard start together: a lane takes one once every lane of the
/// plan has its connection. Each new session here waits a second after it authenticated
/// (`post_auth_delay`), so lanes that each started as their own connection opened would
/// start their runs a second apart (the first lane's connection opens for the journal read,
/// the others' only when they take a run).
#[tokio::test]
async fn an_atomic_units_runs_start_together() {
    runs_start_together("together", "").await;
}

/// The same with two of the three lanes' tasks first running 1.5 s after they were spawned
/// (failpoint `agent::lane_start`), as on a loaded machine, and runs that take a second:
/// the lane that read the journal waits for them instead of starting its run alone (seen
/// in CI before the lanes counted from their spawn: runs 1 s apart).
#[cfg(feature = "testing")]
#[tokio::test]
async fn an_atomic_units_runs_wait_for_late_lanes() {
    if !alone_in_child_process("two_phase::an_atomic_units_runs_wait_for_late_lanes") {
        return;
    }
    fail::cfg("agent::lane_start", "1*off->return(1500)").unwrap();
    runs_start_together("late_lanes", "; SELECT pg_sleep(1)").await;
}

/// Three atomic runs on a shard whose every new session takes a second to open; asserts
/// that they started within half a second of each other. `then` follows the runs' INSERT.
async fn runs_start_together(name: &str, then: &str) {
    let Some(f) = fleet_2pc(name, 3).await else {
        return;
    };
    sqlx::query("CREATE TABLE public.run_starts (target text, at timestamptz)")
        .execute(&f.pool)
        .await
        .unwrap();
    let sep = if f.dsn.contains('?') { '&' } else { '?' };
    let dsn = format!("{}{sep}options=-c%20post_auth_delay%3D1", f.dsn);
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, _) = h.attach(1).await;
    // the agent's sessions from its start closed (its lock session stays): the lanes open
    // their own
    let agent_sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'flotilla-agent'";
    flotilla_testkit::wait::wait_until("the agent's idle sessions closed", WAIT, async || {
        Ok(count(&f.pool, agent_sessions).await <= 1)
    })
    .await
    .expect("idle sessions closed");
    define(
        &s,
        name,
        vec![migration(
            "start",
            &format!(
                "INSERT INTO public.run_starts SELECT current_schema(), clock_timestamp(){then}"
            ),
            "SELECT 1",
            "",
        )],
    );
    let gids: Vec<String> = (0..3)
        .map(|t| format!("flotilla:{name}:{}:1:tenant_{t:04}", t + 1))
        .collect();
    let runs = (0..3)
        .map(|t| {
            prepared_run(
                t as u64 + 1,
                &format!("tenant_{t:04}"),
                &["start"],
                &gids[t],
            )
        })
        .collect();
    let r = s.assign(name, 1, 3, runs).await;
    for id in 1..=3 {
        assert_eq!(outcomes(&r[&id]), [pb::StepOutcome::Prepared], "{r:?}");
    }
    // the rows are inside the prepared transactions
    let gid_refs: Vec<&str> = gids.iter().map(String::as_str).collect();
    let reply = s.resolve(name, true, 1, &gid_refs).await;
    assert_eq!(reply.resolved.len(), 3, "{reply:?}");
    let (n, spread): (i64, f64) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM max(at) - min(at))::float8 FROM public.run_starts",
    )
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert_eq!(n, 3);
    assert!(
        spread < 0.5,
        "the runs started {spread:.3} s apart (a connection takes 1 s to open here)"
    );
    h.stop().await;
    f.drop().await;
}

/// A prepared run's session settings end with its PREPARE TRANSACTION (the session reset
/// rides after it, as after a COMMIT): the next run on the lane's one connection runs as the
/// agent's own role, not the one the prepared run's SQL took.
#[tokio::test]
async fn a_prepared_run_leaves_no_session_state_to_the_next_run() {
    let Some(f) = fleet_2pc("tpc_reset", 2).await else {
        return;
    };
    let role = "flotilla_test_prepared_role";
    fresh_superuser_role(&f.pool, role).await;
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    define(
        &s,
        "pr",
        vec![
            migration("leaky", &format!("SET ROLE {role}"), "", ""),
            migration(
                "reader",
                "CREATE TABLE seen AS SELECT current_user::text AS role_name",
                "DROP TABLE IF EXISTS seen",
                "",
            ),
        ],
    );
    let gid = "flotilla:pr:1:1:tenant_0000";
    let r = s
        .assign(
            "pr",
            1,
            1,
            vec![
                prepared_run(1, "tenant_0000", &["leaky"], gid),
                run(2, "tenant_0001", &["reader"], true),
            ],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared], "{r:?}");
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Applied], "{r:?}");
    let seen: String = sqlx::query_scalar("SELECT role_name FROM tenant_0001.seen")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(
        seen,
        current_user(&f.pool).await,
        "the agent's own role after the PREPARE"
    );
    let reply = s.resolve("pr", false, 1, &[gid]).await;
    assert_eq!(reply.resolved, [gid], "{reply:?}");
    h.stop().await;
    drop_role(&f.pool, role).await;
    f.drop().await;
}

/// An abort from a coordinator the shard's fence has seen deposed decides nothing, and
/// stops nothing: the plan's queued runs stay queued and its running ones are not waited
/// for. Before, the abort halted the plan (dropping its queued runs as not run, waiting for
/// those in flight) before it checked the fence.
#[tokio::test]
async fn a_stale_abort_stops_none_of_the_plans_runs() {
    let Some(f) = fleet_2pc("stale_abort", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(2).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "sa".into(),
        migrations: vec![
            migration("slow", "SELECT pg_sleep(1)", "SELECT 1", ""),
            migration(
                "quick",
                "CREATE TABLE quick (i int)",
                "DROP TABLE quick",
                "",
            ),
        ],
        ..Default::default()
    }));
    // one lane: the second run waits in the queue behind the first
    s.send(In::Assign(pb::Assign {
        plan_id: "sa".into(),
        epoch: 2,
        lanes: 1,
        runs: vec![
            run(1, "tenant_0000", &["slow"], true),
            run(2, "tenant_0001", &["quick"], true),
        ],
    }));
    wait_running(&f.pool, "pg_sleep(1)").await;
    let reply = s
        .resolve("sa", false, 1, &["flotilla:sa:1:1:tenant_0000"])
        .await;
    assert!(reply.resolved.is_empty(), "{reply:?}");
    assert!(
        reply.failed[0].contains("fenced: epoch 1 is older than the shard's epoch 2"),
        "{reply:?}"
    );
    let r = s.results("sa", 2).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied], "{r:?}");
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Applied], "{r:?}");
    h.stop().await;
    f.drop().await;
}

/// A new epoch's runs queued while an older epoch's prepared transaction held the shard's
/// fence row (so the fence could not be advanced then), which is resolved before they
/// start: the fence is advanced on its own before each runs. Before, the first step's own
/// fence check wrote the new epoch inside its transaction and PREPAREd holding the fence
/// row, and the unit's other step timed out waiting for it (the unit aborted).
#[cfg(feature = "testing")]
#[tokio::test]
async fn the_fence_is_advanced_before_runs_queued_while_it_was_held() {
    if !alone_in_child_process(
        "two_phase::the_fence_is_advanced_before_runs_queued_while_it_was_held",
    ) {
        return;
    }
    let Some(f) = fleet_2pc("fence_held", 3).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    // epoch 1's transaction, prepared: it holds the fence row (FOR SHARE)
    define(&s, "old", vec![table("o", "old_t")]);
    let old = "flotilla:old:1:1:tenant_0002";
    let r = s
        .assign(
            "old",
            1,
            1,
            vec![prepared_run(1, "tenant_0002", &["o"], old)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared], "{r:?}");
    // the leader of epoch 2 takes over (the prepared transaction, without etcd, stays in
    // doubt for it)
    drop(s);
    let (mut s, _) = h.attach(2).await;
    // epoch 2's unit, queued while the fence cannot move; its lanes start 1.5 s later
    fail::cfg("agent::lane_start", "return(1500)").unwrap();
    define(&s, "new", vec![table("n", "new_t")]);
    let gids = [
        "flotilla:new:1:2:tenant_0000",
        "flotilla:new:2:2:tenant_0001",
    ];
    let mark = log_mark();
    s.send(In::Assign(pb::Assign {
        plan_id: "new".into(),
        epoch: 2,
        lanes: 2,
        runs: vec![
            prepared_run(1, "tenant_0000", &["n"], gids[0]),
            prepared_run(2, "tenant_0001", &["n"], gids[1]),
        ],
    }));
    wait_for_log(mark, "could not advance the shard's fence").await;
    // the old transaction resolved before they start
    let reply = s.resolve("old", false, 1, &[old]).await;
    assert_eq!(reply.resolved, [old], "{reply:?}");
    let r = s.results("new", 2).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared], "{r:?}");
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Prepared], "{r:?}");
    let reply = s.resolve("new", false, 2, &gids).await;
    assert_eq!(reply.resolved.len(), 2, "{reply:?}");
    assert_eq!(count(&f.pool, "SELECT epoch FROM flotilla.fence").await, 2);
    h.stop().await;
    f.drop().await;
}

/// A target of an atomic unit whose lock does not come within its lock_timeout fails at
/// once, not after the retries a plain step gets: the unit's targets prepared meanwhile
/// would hold their locks through every pause (an application blocked on all of them for
/// one contended table). Its error says why, and who held the lock.
#[tokio::test]
async fn an_atomic_target_does_not_wait_for_its_lock_again() {
    let Some(f) = fleet_2pc("tpc_lock", 1).await else {
        return;
    };
    sqlx::raw_sql("CREATE TABLE tenant_0000.held (id int)")
        .execute(&f.pool)
        .await
        .unwrap();
    let mut holder = f.pool.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE tenant_0000.held IN ACCESS SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "lk".into(),
        migrations: vec![migration(
            "alter",
            "ALTER TABLE held ADD COLUMN x int",
            "ALTER TABLE held DROP COLUMN x",
            "",
        )],
        default_lock_timeout_ms: 200,
        default_statement_timeout_ms: 0,
        ..Default::default()
    }));
    let gid = "flotilla:lk:1:1:tenant_0000";
    let r = s
        .assign(
            "lk",
            1,
            1,
            vec![prepared_run(1, "tenant_0000", &["alter"], gid)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Failed], "{r:?}");
    let e = error(&r[&1], 0);
    assert_eq!(e.sqlstate, "55P03", "{e:?}");
    assert!(
        e.message
            .contains("not tried again: it is a target of an atomic unit")
            && !e.message.contains("attempts"),
        "{e:?}"
    );
    assert!(!table_has_column(&f, "held", "x").await, "nothing applied");
    holder.rollback().await.unwrap();
    h.stop().await;
    f.drop().await;
}

async fn table_has_column(f: &Fleet, table: &str, column: &str) -> bool {
    count(
        &f.pool,
        &format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'tenant_0000' \
             AND table_name = '{table}' AND column_name = '{column}'"
        ),
    )
    .await
        == 1
}

/// An atomic unit's abort reaching the agent while a run of the unit is in its statement:
/// the statement is cancelled, the run reported NOT_RUN (stopped, not failed) with nothing
/// of it prepared or left, and the target that had prepared is rolled back. Before, the
/// run went on to the end of its statement (a minute here), then prepared, and the Resolve
/// waited for it, the prepared target's locks held all along.
#[tokio::test]
async fn an_atomic_run_halted_while_it_runs_is_cancelled() {
    let Some(f) = fleet_2pc("tpc_halt", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    define(
        &s,
        "hc",
        vec![
            migration(
                "slow",
                "CREATE TABLE slow_t (id int); SELECT pg_sleep(60)",
                "DROP TABLE slow_t",
                "",
            ),
            table("quick", "quick_t"),
        ],
    );
    let quick = "flotilla:hc:1:1:tenant_0001";
    let r = s
        .assign(
            "hc",
            1,
            1,
            vec![prepared_run(1, "tenant_0001", &["quick"], quick)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared], "{r:?}");
    s.send(In::Assign(pb::Assign {
        plan_id: "hc".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![prepared_run(
            2,
            "tenant_0000",
            &["slow"],
            "flotilla:hc:2:1:tenant_0000",
        )],
    }));
    wait_running(&f.pool, "pg_sleep(60)").await;
    // the abort's Resolve, the run in flight: it halts the plan (the run's statement is
    // cancelled), and its reply follows the run's result
    s.send(In::Resolve(pb::Resolve {
        plan_id: "hc".into(),
        commit: false,
        epoch: 1,
        gids: vec![quick.to_string()],
    }));
    let r = s.results("hc", 1).await;
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::NotRun], "{r:?}");
    let e = error(&r[&2], 0);
    assert!(
        e.phase == "stopped" && e.message.starts_with("cancelled: the plan was halted"),
        "{e:?}"
    );
    let reply = match s.next().await {
        Out::Resolve(r) => r,
        other => panic!("expected the resolve reply, got {other:?}"),
    };
    assert_eq!(reply.resolved, [quick], "{reply:?}");
    assert!(prepared_gids(&f.pool).await.is_empty());
    assert!(!table_exists(&f, "tenant_0000", "slow_t").await);
    assert!(!table_exists(&f, "tenant_0001", "quick_t").await);
    assert_eq!(journal(&f, "hc").await, 0);
    h.stop().await;
    f.drop().await;
}
