//! A test fleet: one PostgreSQL cluster holding N shard databases with tenant
//! schemas, a real `flotilla coordinator`, and one real `flotilla agent` per shard.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::harness::{
    CommandOutput, FlotillaProcess, PgCluster, free_port, run_flotilla, wait_until,
};

pub const WAIT: Duration = Duration::from_secs(60);

/// The seed's coordinated example, in dbmate's format, unchanged.
pub fn coord_dbmate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coord-dbmate")
}

pub struct TestFleet {
    pub pg: PgCluster,
    /// Kept alive for the test's duration (killed on drop).
    pub _coordinator: FlotillaProcess,
    pub agents: Vec<Option<FlotillaProcess>>,
    pub shards: Vec<String>,
    pub addr: String,
    pub tenants_per_shard: usize,
}

/// SQL creating one tenant schema with the two industry tables of the seed.
pub fn tenant_sql(name: &str, rows: usize) -> String {
    format!(
        "CREATE SCHEMA {name};
         CREATE TABLE {name}.work_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
           customer_id bigint NOT NULL, priority text NOT NULL, total_amount numeric(12,2) NOT NULL,
           created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE {name}.repair_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
           customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO {name}.work_orders (customer_id, priority, total_amount)
           SELECT g % 97, 'normal', g + 0.5 FROM generate_series(1, {rows}) g;
         INSERT INTO {name}.repair_orders (customer_id, total_amount)
           SELECT g % 89, g + 0.25 FROM generate_series(1, {rows}) g;"
    )
}

pub fn tenant_name(shard: usize, t: usize, per_shard: usize) -> String {
    format!("tenant_{:04}", shard * per_shard + t)
}

impl TestFleet {
    /// `shards` shard databases with `tenants` tenant schemas each, agents attached.
    pub async fn start(shards: usize, tenants: usize) -> anyhow::Result<TestFleet> {
        let pg = PgCluster::start().await?;
        let mut names = Vec::new();
        for s in 0..shards {
            let db = format!("shard_{s}");
            pg.create_database(&db).await?;
            let mut sql = String::new();
            for t in 0..tenants {
                sql.push_str(&tenant_sql(&tenant_name(s, t, tenants), 20));
            }
            pg.psql(&db, &sql).await?;
            names.push(db);
        }
        let port = free_port();
        let addr = format!("http://127.0.0.1:{port}");
        let listen = format!("127.0.0.1:{port}");
        let coordinator = FlotillaProcess::spawn(
            &["coordinator", "--listen", &listen, "--store", "flotilla.db"],
            &[],
        )?;
        coordinator
            .wait_for_log("coordinator listening", WAIT)
            .await?;
        let mut fleet = TestFleet {
            pg,
            _coordinator: coordinator,
            agents: Vec::new(),
            shards: names,
            addr,
            tenants_per_shard: tenants,
        };
        for s in 0..shards {
            let agent = fleet.spawn_agent(s)?;
            fleet.agents.push(Some(agent));
        }
        fleet.wait_attached(shards).await?;
        Ok(fleet)
    }

    pub fn spawn_agent(&self, s: usize) -> anyhow::Result<FlotillaProcess> {
        let dsn = self.pg.url(&self.shards[s]);
        FlotillaProcess::spawn(
            &[
                "--coordinator",
                &self.addr,
                "agent",
                "--shard",
                &self.shards[s],
                "--dsn",
                &dsn,
                "--tenant-pattern",
                "tenant_%",
                "--labels",
                &format!("region=r{s}"),
            ],
            &[],
        )
    }

    pub async fn wait_attached(&self, n: usize) -> anyhow::Result<()> {
        wait_until(&format!("{n} agents attached"), WAIT, async || {
            let v = self.json(&["fleet", "list", "--output", "json"]).await?;
            let connected = v
                .as_array()
                .map(|a| a.iter().filter(|x| x["connected"] == true).count());
            Ok(connected == Some(n))
        })
        .await
    }

    /// Runs `flotilla --coordinator ADDR args...`.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        let mut all = vec!["--coordinator", self.addr.as_str()];
        all.extend_from_slice(args);
        run_flotilla(&all, &[]).await
    }

    /// Runs a command that must succeed and print JSON.
    pub async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.cli(args).await?;
        if !out.success() {
            bail!("flotilla {args:?} failed: {out}");
        }
        let last = out.stdout.lines().last().unwrap_or("");
        serde_json::from_str(last).with_context(|| format!("parsing JSON from {args:?}: {out}"))
    }

    /// Submits and waits; returns (exit code, final status JSON).
    pub async fn submit_wait(
        &self,
        path: &Path,
        extra: &[&str],
    ) -> anyhow::Result<(i32, Value, CommandOutput)> {
        let p = path.to_string_lossy().into_owned();
        let mut args = vec!["plan", "submit", p.as_str(), "--wait", "--output", "json"];
        args.extend_from_slice(extra);
        let out = self.cli(&args).await?;
        let code = out.code().unwrap_or(-1);
        let status = out
            .stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Ok((code, status, out))
    }

    pub fn tenants(&self, s: usize) -> Vec<String> {
        (0..self.tenants_per_shard)
            .map(|t| tenant_name(s, t, self.tenants_per_shard))
            .collect()
    }

    /// Every tenant schema's shape (columns, indexes, views, constraints) on every
    /// shard, outside Flotilla's own schema: equal fingerprints mean equal schemas.
    pub async fn fingerprint(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        for db in &self.shards {
            let rows = self
                .pg
                .query_rows(
                    db,
                    "SELECT 'col', table_schema, table_name || '.' || column_name || ':' || data_type
                       FROM information_schema.columns WHERE table_schema LIKE 'tenant_%'
                     UNION ALL SELECT 'idx', schemaname, indexname || ':' || indexdef FROM pg_indexes
                       WHERE schemaname LIKE 'tenant_%'
                     UNION ALL SELECT 'view', schemaname, viewname FROM pg_views WHERE schemaname LIKE 'tenant_%'
                     UNION ALL SELECT 'con', n.nspname, c.conname || ':' || pg_get_constraintdef(c.oid)
                       FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname LIKE 'tenant_%'
                     ORDER BY 1, 2, 3",
                )
                .await?;
            out.push_str(&format!("== {db}\n"));
            for r in rows {
                out.push_str(&r.join(" "));
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// Journal rows on a shard: (target, migration, checksum, plan).
    pub async fn journal(&self, s: usize) -> anyhow::Result<Vec<Vec<String>>> {
        self.pg
            .query_rows(
                &self.shards[s],
                "SELECT target, migration_id, checksum, plan_id FROM flotilla.journal ORDER BY 1, 2",
            )
            .await
    }

    pub async fn journal_total(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for s in 0..self.shards.len() {
            n += self.journal(s).await?.len();
        }
        Ok(n)
    }
}

/// Writes a migration directory of Flotilla's native format.
pub struct MigrationDir {
    pub dir: tempfile::TempDir,
}

impl MigrationDir {
    pub fn new() -> anyhow::Result<MigrationDir> {
        Ok(MigrationDir {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn migration(&self, id: &str, toml: &str, up: &str, down: &str) -> anyhow::Result<()> {
        let d = self.dir.path().join(id);
        std::fs::create_dir_all(&d)?;
        if !toml.is_empty() {
            std::fs::write(d.join("migration.toml"), toml)?;
        }
        std::fs::write(d.join("up.sql"), up)?;
        std::fs::write(d.join("down.sql"), down)?;
        Ok(())
    }
}
