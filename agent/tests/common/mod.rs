//! What the PostgreSQL tests share: a throwaway fleet database and a scripted coordinator.
#![allow(dead_code)]
pub mod etcd;

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_agent::AgentConfig;
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Out;
use flotilla_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use flotilla_proto::pb::coordinator_message::Body as In;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::mpsc;
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
}

/// A fresh database `agent_<name>` with `tenants` tenant schemas (and one schema that is not
/// a tenant); None (with a note) when no PostgreSQL is configured.
pub async fn fleet(name: &str, tenants: usize) -> Option<Fleet> {
    let Ok(admin_url) = std::env::var("FLOTILLA_TEST_PG_URL") else {
        println!("FLOTILLA_TEST_PG_URL is not set: skipping the PostgreSQL test `{name}`");
        return None;
    };
    let db = format!("agent_{name}");
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("CREATE DATABASE {db}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .expect("create database");
    }
    let dsn = format!(
        "{}/{db}",
        admin_url.rsplit_once('/').expect("a database in the url").0
    );
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
    Some(Fleet {
        dsn,
        pool,
        admin_url,
        db,
    })
}

impl Fleet {
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("admin connection");
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
                body => return body,
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

    pub async fn rollback(&mut self, plan: &str, epoch: u64) -> pb::RollbackReply {
        self.send(In::Rollback(pb::RollbackRequest {
            plan_id: plan.into(),
            epoch,
            lanes: 2,
        }));
        match self.next().await {
            Out::Rollback(r) => r,
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

pub fn outcomes(r: &pb::RunResult) -> Vec<pb::StepOutcome> {
    r.steps
        .iter()
        .map(|s| pb::StepOutcome::try_from(s.outcome).unwrap())
        .collect()
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
