//! What the PostgreSQL tests share: a throwaway fleet database and a scripted coordinator.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use flotilla_agent::AgentConfig;
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::agent_service_server::{AgentService, AgentServiceServer};
use flotilla_core::pb::coordinator_message::Body as In;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(20);

// The coordinated example's three migrations (shared/bench/coord-2025-001).
pub const HS_UP: &str = "ALTER TABLE work_orders
  ADD COLUMN satisfaction_rating integer CHECK (satisfaction_rating >= 1 AND satisfaction_rating <= 5),
  ADD COLUMN satisfaction_comments text,
  ADD COLUMN satisfaction_survey_sent_at timestamptz,
  ADD COLUMN satisfaction_response_method text;
CREATE INDEX idx_work_orders_satisfaction ON work_orders (business_id, satisfaction_rating, created_at DESC)
  WHERE satisfaction_rating IS NOT NULL;";
pub const HS_DOWN: &str = "DROP INDEX idx_work_orders_satisfaction;
ALTER TABLE work_orders
  DROP COLUMN satisfaction_rating, DROP COLUMN satisfaction_comments,
  DROP COLUMN satisfaction_survey_sent_at, DROP COLUMN satisfaction_response_method;";
pub const AUTO_UP: &str = "ALTER TABLE repair_orders
  ADD COLUMN satisfaction_rating integer CHECK (satisfaction_rating >= 1 AND satisfaction_rating <= 5),
  ADD COLUMN satisfaction_comments text,
  ADD COLUMN satisfaction_survey_sent_at timestamptz,
  ADD COLUMN satisfaction_response_method text;
CREATE INDEX idx_repair_orders_satisfaction ON repair_orders (business_id, satisfaction_rating, created_at DESC)
  WHERE satisfaction_rating IS NOT NULL;";
pub const AUTO_DOWN: &str = "DROP INDEX idx_repair_orders_satisfaction;
ALTER TABLE repair_orders
  DROP COLUMN satisfaction_rating, DROP COLUMN satisfaction_comments,
  DROP COLUMN satisfaction_survey_sent_at, DROP COLUMN satisfaction_response_method;";
pub const VIEW_UP: &str = "CREATE VIEW unified_satisfaction AS
  SELECT business_id, 'home_services' AS industry, id AS transaction_id, customer_id,
         satisfaction_rating, satisfaction_comments, created_at AS transaction_date, total_amount AS transaction_value
    FROM work_orders WHERE satisfaction_rating IS NOT NULL
  UNION ALL
  SELECT business_id, 'automotive', id, customer_id,
         satisfaction_rating, satisfaction_comments, created_at, total_amount
    FROM repair_orders WHERE satisfaction_rating IS NOT NULL;";
pub const VIEW_DOWN: &str = "DROP VIEW unified_satisfaction;";

pub fn migration(id: &str, up: &str, down: &str, verify: &str) -> pb::Migration {
    pb::Migration {
        id: id.into(),
        up_sql: up.into(),
        down_sql: down.into(),
        verify_sql: verify.into(),
        ..Default::default()
    }
}

pub fn bench_migrations() -> Vec<pb::Migration> {
    vec![
        migration("20250131160000_hs", HS_UP, HS_DOWN, ""),
        migration("20250131160001_auto", AUTO_UP, AUTO_DOWN, ""),
        migration(
            "20250131160002_view",
            VIEW_UP,
            VIEW_DOWN,
            "SELECT count(*) = 0 FROM unified_satisfaction",
        ),
    ]
}

/// A throwaway database with tenant schemas, dropped by `drop`.
pub struct Fleet {
    pub dsn: String,
    pub pool: PgPool,
    admin_url: String,
    db: String,
    _turn: SemaphorePermit<'static>,
}

/// How many fleets (tests on the PostgreSQL server) run at once. All tests share one
/// process, and each fleet holds a dozen or so sessions (the test's pool, the agent's pool
/// and its lock session): unbounded, a many-core machine would run every test at once
/// and pass a server's `max_connections` (100 in scripts/test.sh).
static FLEETS_AT_ONCE: Semaphore = Semaphore::const_new(4);

/// A fresh database `agent_<name>` with `tenants` tenant schemas (and one schema that is not
/// a tenant); None (with a note) when no PostgreSQL is configured, a failure under
/// `FLOTILLA_TEST_NO_SKIP` (see `flotilla_testkit::skip`).
pub async fn fleet(name: &str, tenants: usize) -> Option<Fleet> {
    let Ok(admin_url) = std::env::var("FLOTILLA_TEST_PG_URL") else {
        flotilla_testkit::skip(name, "FLOTILLA_TEST_PG_URL is not set (a PostgreSQL test)");
        return None;
    };
    Some(fleet_on(&admin_url, name, tenants).await)
}

/// [`fleet`] with two-phase commit: None (with a note) when no PostgreSQL is configured or
/// its `max_prepared_transactions` is 0.
pub async fn fleet_2pc(name: &str, tenants: usize) -> Option<Fleet> {
    let f = fleet(name, tenants).await?;
    let max: String = sqlx::query_scalar("SELECT current_setting('max_prepared_transactions')")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    if max == "0" {
        flotilla_testkit::skip(
            name,
            "FLOTILLA_TEST_PG_URL's cluster has max_prepared_transactions = 0, and this is a \
             two-phase commit test (start it with -c max_prepared_transactions=20)",
        );
        f.drop().await;
        return None;
    }
    Some(f)
}

/// `postgres://…/<db>` on the same server as `admin_url`.
fn dsn_for(admin_url: &str, db: &str) -> String {
    format!(
        "{}/{db}",
        admin_url.rsplit_once('/').expect("a database in the url").0
    )
}

/// Rolls back the prepared transactions left in `db` (a database holding any cannot be
/// dropped); ROLLBACK PREPARED must run in their own database.
async fn clear_prepared(admin: &mut sqlx::PgConnection, admin_url: &str, db: &str) {
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE database = $1")
            .bind(db)
            .fetch_one(&mut *admin)
            .await
            .expect("prepared transactions");
    if left == 0 {
        return;
    }
    let mut conn = sqlx::PgConnection::connect(&dsn_for(admin_url, db))
        .await
        .expect("connection to the fleet database");
    let gids: Vec<String> =
        sqlx::query_scalar("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for gid in gids {
        let sql = format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"));
        let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
    }
    let _ = conn.close().await;
}

/// [`fleet`] on the server of `admin_url`.
pub async fn fleet_on(admin_url: &str, name: &str, tenants: usize) -> Fleet {
    let turn = FLEETS_AT_ONCE.acquire().await.expect("never closed");
    let admin_url = admin_url.to_string();
    let db = format!("agent_{name}");
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    clear_prepared(&mut admin, &admin_url, &db).await;
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("CREATE DATABASE {db}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .expect("create database");
    }
    let dsn = dsn_for(&admin_url, &db);
    let pool = PgPool::connect(&dsn).await.expect("test pool");
    let mut sql = String::from("CREATE SCHEMA not_a_tenant;");
    for t in 0..tenants {
        let n = format!("tenant_{t:04}");
        sql.push_str(&format!(
            "CREATE SCHEMA {n};
             CREATE TABLE {n}.work_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
               customer_id bigint NOT NULL, priority text NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {n}.repair_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
               customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {n}.work_orders (customer_id, priority, total_amount) SELECT g, 'low', g FROM generate_series(1, 20) g;"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .expect("fleet");
    Fleet {
        dsn,
        pool,
        admin_url,
        db,
        _turn: turn,
    }
}

impl Fleet {
    /// The database dropped and made again, empty, under the same name (as a restore from a
    /// dump begins); the test's pool on the new one.
    pub async fn replace(&mut self) {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("admin connection");
        for sql in [
            format!("DROP DATABASE {} WITH (FORCE)", self.db),
            format!("CREATE DATABASE {}", self.db),
        ] {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .expect("drop and create the database");
        }
        self.pool = PgPool::connect(&self.dsn).await.expect("the new database");
    }

    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("admin connection");
        clear_prepared(&mut admin, &self.admin_url, &self.db).await;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .expect("drop database");
    }
}

/// A coordinator that hands each attached stream to the test.
pub struct Scripted {
    streams: mpsc::UnboundedSender<Stream>,
}

pub struct Stream {
    pub inbound: Streaming<pb::AgentMessage>,
    pub out: mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
    /// The fleet-view reports (journal, schema, tenants) seen so far, in order: they
    /// come on their own schedule, so `next` sets them aside.
    pub reports: Vec<Out>,
}

#[tonic::async_trait]
impl AgentService for Scripted {
    type AttachStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;
    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (out, rx) = mpsc::unbounded_channel();
        let _ = self.streams.send(Stream {
            inbound: request.into_inner(),
            out,
            reports: Vec::new(),
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

impl Stream {
    pub fn send(&self, body: In) {
        self.out
            .send(Ok(pb::CoordinatorMessage { body: Some(body) }))
            .expect("agent stream open");
    }

    /// The next message that is not a heartbeat.
    pub async fn next(&mut self) -> Out {
        loop {
            let msg = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("agent message in time")
                .expect("stream ok")
                .expect("stream open");
            match msg.body.expect("body") {
                Out::Heartbeat(_) => continue,
                report @ (Out::Journal(_) | Out::Schema(_) | Out::Tenants(_)) => {
                    self.reports.push(report)
                }
                body => return body,
            }
        }
    }

    /// The next message of any kind, heartbeats and reports included.
    pub async fn inbound_next(&mut self) -> Out {
        tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("agent message in time")
            .expect("stream ok")
            .expect("stream open")
            .body
            .expect("body")
    }

    /// Reads on until the fleet-view reports seen so far satisfy `done` (heartbeats are
    /// skipped; anything else is unexpected here).
    pub async fn reports_until(&mut self, done: impl Fn(&[Out]) -> bool) {
        while !done(&self.reports) {
            let msg = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("a report in time")
                .expect("stream ok")
                .expect("stream open");
            match msg.body.expect("body") {
                Out::Heartbeat(_) => {}
                report @ (Out::Journal(_) | Out::Schema(_) | Out::Tenants(_)) => {
                    self.reports.push(report)
                }
                other => panic!("expected a report, got {other:?}"),
            }
        }
    }

    /// Results until `n` runs of `plan` are in, by run id.
    pub async fn results(&mut self, plan: &str, n: usize) -> BTreeMap<u64, pb::RunResult> {
        let mut runs = BTreeMap::new();
        while runs.len() < n {
            match self.next().await {
                Out::Results(r) => {
                    assert_eq!(r.plan_id, plan);
                    runs.extend(r.runs.into_iter().map(|run| (run.run_id, run)));
                }
                other => panic!("expected results, got {other:?}"),
            }
        }
        runs
    }

    pub async fn assign(
        &mut self,
        plan: &str,
        epoch: u64,
        lanes: u32,
        runs: Vec<pb::Run>,
    ) -> BTreeMap<u64, pb::RunResult> {
        let n = runs.len();
        self.send(In::Assign(pb::Assign {
            plan_id: plan.into(),
            epoch,
            lanes,
            runs,
        }));
        self.results(plan, n).await
    }

    /// Sends a Resolve and waits for its reply.
    pub async fn resolve(
        &mut self,
        plan: &str,
        commit: bool,
        epoch: u64,
        gids: &[&str],
    ) -> pb::ResolveReply {
        self.send(In::Resolve(pb::Resolve {
            plan_id: plan.into(),
            commit,
            epoch,
            gids: gids.iter().map(|g| g.to_string()).collect(),
        }));
        match self.next().await {
            Out::Resolve(r) => r,
            other => panic!("expected a resolve reply, got {other:?}"),
        }
    }

    /// Asks for a rollback (request number `epoch`) and returns its reply, which tells the
    /// request it answers.
    pub async fn rollback(&mut self, plan: &str, epoch: u64) -> pb::RollbackReply {
        self.send(In::Rollback(pb::RollbackRequest {
            plan_id: plan.into(),
            epoch,
            lanes: 2,
            request: 1000 + epoch,
        }));
        match self.next().await {
            Out::Rollback(r) => {
                assert_eq!(r.request, 1000 + epoch, "the request it answers: {r:?}");
                r
            }
            other => panic!("expected a rollback reply, got {other:?}"),
        }
    }
}

pub struct Harness {
    streams: mpsc::UnboundedReceiver<Stream>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    agent: tokio::task::JoinHandle<Result<(), flotilla_agent::AgentError>>,
}

impl Harness {
    pub async fn start(configure: impl FnOnce(&mut AgentConfig), dsn: &str) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, streams) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(Scripted { streams: tx }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut config = AgentConfig::new("shard-test", dsn, format!("http://{addr}"));
        config.tenant_pattern = Some("tenant_%".into());
        config.max_connections = 4;
        config.heartbeat_interval = Duration::from_millis(200);
        config.reconnect_min = Duration::from_millis(20);
        config.reconnect_max = Duration::from_millis(200);
        configure(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(flotilla_agent::start(config, async move {
            let _ = stopped.await;
        }));
        Harness {
            streams,
            stop: Some(stop),
            agent,
        }
    }

    /// The next stream, after its Hello, welcomed with `epoch`.
    pub async fn attach(&mut self, epoch: u64) -> (Stream, pb::Hello) {
        let mut s = tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("agent attaches")
            .unwrap();
        let Out::Hello(hello) = s.next().await else {
            panic!("Hello first")
        };
        s.send(In::Welcome(pb::Welcome {
            epoch,
            heartbeat_interval_ms: 100,
        }));
        (s, hello)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.agent)
            .await
            .expect("agent stops")
            .unwrap()
            .expect("agent ok");
    }
}

pub fn run(id: u64, tenant: &str, migrations: &[&str], fused: bool) -> pb::Run {
    pb::Run {
        prepare_gid: String::new(),
        run_id: id,
        tenant: tenant.into(),
        migrations: migrations.iter().map(|m| m.to_string()).collect(),
        fused,
    }
}

/// A run whose transaction ends in PREPARE TRANSACTION '<gid>'.
pub fn prepared_run(id: u64, tenant: &str, migrations: &[&str], gid: &str) -> pb::Run {
    pb::Run {
        prepare_gid: gid.into(),
        ..run(id, tenant, migrations, true)
    }
}

/// The gids prepared in the pool's database, sorted.
pub async fn prepared_gids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

pub fn outcomes(r: &pb::RunResult) -> Vec<pb::StepOutcome> {
    r.steps
        .iter()
        .map(|s| pb::StepOutcome::try_from(s.outcome).unwrap())
        .collect()
}

/// A superuser role that logs in nowhere, made afresh (a run that failed before its end
/// left it behind), for a step that takes it with `SET ROLE`. Roles are the cluster's, not
/// the test database's: [`drop_role`] at the end.
pub async fn fresh_superuser_role(pool: &PgPool, role: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} SUPERUSER NOLOGIN"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// Drops `role` and what it owns in the pool's database.
pub async fn drop_role(pool: &PgPool, role: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// The role the pool's sessions run as.
pub async fn current_user(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

pub const BENCH: [&str; 3] = [
    "20250131160000_hs",
    "20250131160001_auto",
    "20250131160002_view",
];

/// Set in the child process of [`alone_in_child_process`]: the test it runs.
const ALONE: &str = "FLOTILLA_AGENT_TEST_ALONE";

/// Failpoints (crate `fail`) are process-wide: a test that arms them would also fail the
/// steps of whichever test of this binary runs at the same time, and those tests would
/// take its one-shot failpoints. Such a test starts with
/// `if !alone_in_child_process("module::test") { return; }`: in the test run this starts the
/// binary again running only `test` (its full path), asserts that the child ran it and
/// passed, and returns false; in that child it returns true and the test goes on, alone.
pub fn alone_in_child_process(test: &str) -> bool {
    if std::env::var_os(ALONE).is_some_and(|t| t == test) {
        return true;
    }
    let out = run_in_child(test, &[(ALONE, test)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "`{test}` in its own process ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{stdout}");
    false
}

/// Runs only `test` (its full path, `module::name`) in a child process of this binary,
/// with `envs` added to its environment.
pub fn run_in_child(test: &str, envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(envs.iter().copied())
        .output()
        .expect("run the child process")
}

/// What the agents of this test process log (they run in it), kept so that a test can
/// wait for a state change whose only outside sign is its log line.
static LOG: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

#[derive(Clone)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts keeping the process's log (once); returns how long it is now, to search after.
pub fn log_mark() -> usize {
    let buffer = LOG.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = LogBuffer(buffer.clone());
        // another subscriber may be set already (then nothing is kept, and the wait fails
        // with a message saying so)
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    });
    buffer.lock().expect("log buffer").len()
}

/// Whether a line containing `needle` was logged after `mark`.
pub fn logged_since(mark: usize, needle: &str) -> bool {
    let buffer = LOG.get().expect("log_mark first");
    let log = buffer.lock().expect("log buffer");
    String::from_utf8_lossy(&log[mark.min(log.len())..]).contains(needle)
}

/// Waits (at most [`WAIT`]) until a line containing `needle` is logged after `mark`.
pub async fn wait_for_log(mark: usize, needle: &str) {
    let buffer = LOG.get().expect("log_mark first");
    flotilla_testkit::wait::wait_until(&format!("a log line with `{needle}`"), WAIT, async || {
        let log = buffer.lock().expect("log buffer");
        Ok(String::from_utf8_lossy(&log[mark.min(log.len())..]).contains(needle))
    })
    .await
    .expect("logged");
}

/// Waits (at most [`WAIT`]) until another session in `pool`'s database is running a
/// statement whose text contains `sql`: a run the agent started is under way.
pub async fn wait_running(pool: &sqlx::PgPool, sql: &str) {
    flotilla_testkit::wait::wait_until(&format!("a session running `{sql}`"), WAIT, async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'active'
               AND pid <> pg_backend_pid() AND position($1 in query) > 0",
        )
        .bind(sql)
        .fetch_one(pool)
        .await?;
        Ok(n > 0)
    })
    .await
    .expect("running");
}

/// Assigns `run_id`, one run of migration `idem` (a `pg_sleep(0.4)`) on `tenant`, and while
/// it runs writes that step's journal row as another session would (checksum `theirs`);
/// returns the run's result.
pub async fn run_while_another_applies(
    s: &mut Stream,
    pool: &PgPool,
    plan: &str,
    epoch: u64,
    run_id: u64,
    tenant: &str,
) -> pb::RunResult {
    s.send(In::Assign(pb::Assign {
        plan_id: plan.into(),
        epoch,
        lanes: 1,
        runs: vec![run(run_id, tenant, &["idem"], true)],
    }));
    wait_running(pool, "pg_sleep(0.4)").await;
    sqlx::query(
        "INSERT INTO flotilla.journal (target, migration_id, checksum, plan_id, epoch, started_at, finished_at) \
         VALUES ($1, 'idem', 'theirs', 'other', $2, now(), now())",
    )
    .bind(tenant)
    .bind(epoch as i64)
    .execute(pool)
    .await
    .unwrap();
    s.results(plan, 1)
        .await
        .remove(&run_id)
        .expect("the run's result")
}

/// Waits until the agent has taken the welcome of the stream `s` came with: a preflight
/// sent after it is answered after it (a stream's messages are handled in order). The
/// results that came meanwhile, by run id.
pub async fn welcome_taken(s: &mut Stream) -> std::collections::BTreeMap<u64, pb::RunResult> {
    s.send(In::Preflight(pb::PreflightRequest {
        request_id: 9,
        ..Default::default()
    }));
    let mut r = std::collections::BTreeMap::new();
    loop {
        match s.next().await {
            Out::Preflight(_) => return r,
            Out::Results(res) => r.extend(res.runs.into_iter().map(|run| (run.run_id, run))),
            other => panic!("expected results or the preflight's answer, got {other:?}"),
        }
    }
}
