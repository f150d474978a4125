//! A test fleet: one PostgreSQL cluster holding N shard databases with tenant
//! schemas, a real `flotilla coordinator`, and one real `flotilla agent` per shard.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::harness::certs::{FleetCerts, env_refs};
use crate::harness::least_privilege::{AgentLogin, create_agent_role};
use crate::harness::{
    CommandOutput, FlotillaProcess, PgCluster, TestDir, free_port, run_flotilla, wait_until,
};

pub const WAIT: Duration = Duration::from_secs(60);

/// Waits until `n` sessions on database `db` run a query holding `needle` (a step's
/// `pg_sleep(...)`: the step under way, for a fault to strike it).
pub async fn wait_running(pg: &PgCluster, db: &str, needle: &str, n: i64) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE query LIKE '%{needle}%' AND pid <> pg_backend_pid()"
    );
    wait_until(
        &format!("{n} session(s) running {needle}"),
        WAIT,
        async || Ok(pg.query_scalar::<i64>(db, &sql).await? == n),
    )
    .await
}

/// The seed's coordinated example, in dbmate's format, unchanged.
pub fn coord_dbmate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coord-dbmate")
}

pub struct TestFleet {
    pub pg: PgCluster,
    /// The running coordinator (killed on drop); see [`TestFleet::restart_coordinator`].
    pub coordinator: Option<FlotillaProcess>,
    pub agents: Vec<Option<FlotillaProcess>>,
    pub shards: Vec<String>,
    pub addr: String,
    pub tenants_per_shard: usize,
    /// The coordinator's `--store`: an absolute SQLite path in the fleet's own dir
    /// (so it outlives a coordinator process), or a postgres:// URL.
    pub store: String,
    /// The coordinator's flags, for restarts.
    coordinator_args: Vec<String>,
    /// `--tenant-query` for the agents, instead of `--tenant-pattern tenant_%`.
    tenant_query: Option<String>,
    /// More agent flags, e.g. `["--discover-interval", "1s"]`.
    agent_extra: Vec<String>,
    /// More labels per shard (by index), after `region=rN`: e.g. `env=staging`.
    shard_labels: Vec<String>,
    /// Coordinators killed by the test, kept so their logs are printed on a panic.
    old_coordinators: Vec<FlotillaProcess>,
    /// Per shard, the least-privileged login its agent uses (empty: the superuser's DSN);
    /// see [`FleetBuilder::least_privilege`].
    pub agent_logins: Vec<AgentLogin>,
    /// Under mTLS: the certificates (agents and the CLI present theirs).
    pub tls: Option<FleetCerts>,
    // Last: removed after every process is gone.
    _dir: TestDir,
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

/// SQL run on a shard database after its tenants are created: `(shard index, its tenants)`.
type ShardSql = Box<dyn Fn(usize, &[String]) -> String + Send + Sync>;

/// Options for [`TestFleet`]; `TestFleet::start(s, t)` is `TestFleet::builder(s, t).start()`.
pub struct FleetBuilder {
    shards: usize,
    tenants: usize,
    store_db: Option<String>,
    metrics: Option<SocketAddr>,
    coordinator_extra: Vec<String>,
    agent_extra: Vec<String>,
    tenant_query: Option<String>,
    shard_sql: Option<ShardSql>,
    least_privilege: bool,
    shard_labels: Vec<String>,
    tls: bool,
    pg_settings: Vec<(String, String)>,
}

impl FleetBuilder {
    /// A setting of the fleet's PostgreSQL over the harness's (which trade durability for
    /// speed: `synchronous_commit = off` loses the last commits when a backend crashes).
    pub fn pg_setting(mut self, name: &str, value: &str) -> Self {
        self.pg_settings.push((name.to_string(), value.to_string()));
        self
    }

    /// mTLS everywhere: the coordinator serves `https://` with a test CA's certificate and
    /// requires client certificates; each agent presents its shard's, the CLI an operator's.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// The control store in this PostgreSQL database of the fleet's cluster
    /// (created first): `--store postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn postgres_store(mut self, db: &str) -> Self {
        self.store_db = Some(db.to_string());
        self
    }

    /// `--metrics ADDR` for the coordinator.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// More coordinator flags, e.g. `["--lock-timeout", "1s"]`.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_extra
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// More agent flags, e.g. `["--discover-interval", "1s"]`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// More labels for each shard's agent, by shard index (`k=v,...`; after `region=rN`).
    pub fn shard_labels(mut self, labels: &[&str]) -> Self {
        self.shard_labels = labels.iter().map(|l| l.to_string()).collect();
        self
    }

    /// Agents find tenants with `--tenant-query QUERY`.
    pub fn tenant_query(mut self, query: &str) -> Self {
        self.tenant_query = Some(query.to_string());
        self
    }

    /// Agents connect as the role `deploy/sql/agent-role.sql` creates for their shard
    /// (owner of the tenant schemas and of schema flotilla, nothing more), with a password
    /// file, instead of as the superuser. Tenants the test creates later as the superuser
    /// are not the role's: run [`crate::harness::least_privilege::run_script`] again.
    pub fn least_privilege(mut self) -> Self {
        self.least_privilege = true;
        self
    }

    /// SQL for each shard database, run after its tenants exist and before its agent starts.
    pub fn shard_sql(
        mut self,
        f: impl Fn(usize, &[String]) -> String + Send + Sync + 'static,
    ) -> Self {
        self.shard_sql = Some(Box::new(f));
        self
    }

    pub async fn start(self) -> anyhow::Result<TestFleet> {
        let mut pg = PgCluster::builder();
        for (name, value) in &self.pg_settings {
            pg = pg.setting(name, value);
        }
        let pg = pg.start().await?;
        let dir = TestDir::new("fleet")?;
        let mut names = Vec::new();
        for s in 0..self.shards {
            let db = format!("shard_{s}");
            pg.create_database(&db).await?;
            let tenants: Vec<String> = (0..self.tenants)
                .map(|t| tenant_name(s, t, self.tenants))
                .collect();
            let mut sql = String::new();
            for t in &tenants {
                sql.push_str(&tenant_sql(t, 20));
            }
            if let Some(f) = &self.shard_sql {
                sql.push_str(&f(s, &tenants));
            }
            pg.psql(&db, &sql).await?;
            names.push(db);
        }
        let mut agent_logins = Vec::new();
        if self.least_privilege {
            for (s, db) in names.iter().enumerate() {
                let password = format!("agent-pw-{s}");
                agent_logins
                    .push(create_agent_role(&pg, db, "tenant_%", &password, dir.path()).await?);
            }
        }
        let store = match &self.store_db {
            Some(db) => {
                pg.create_database(db).await?;
                pg.url(db)
            }
            None => dir.join("flotilla.db").to_string_lossy().into_owned(),
        };
        let port = free_port();
        let tls = if self.tls {
            Some(FleetCerts::new()?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = format!("{scheme}://127.0.0.1:{port}");
        let mut coordinator_args = vec![
            "coordinator".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--store".into(),
            store.clone(),
        ];
        if let Some(m) = self.metrics {
            coordinator_args.extend(["--metrics".into(), m.to_string()]);
        }
        if let Some(tls) = &tls {
            coordinator_args.extend(tls.coordinator_args());
        }
        coordinator_args.extend(self.coordinator_extra);
        let mut fleet = TestFleet {
            pg,
            coordinator: None,
            agents: Vec::new(),
            shards: names,
            addr,
            tenants_per_shard: self.tenants,
            store,
            coordinator_args,
            tenant_query: self.tenant_query,
            agent_extra: self.agent_extra,
            shard_labels: self.shard_labels,
            old_coordinators: Vec::new(),
            agent_logins,
            tls,
            _dir: dir,
        };
        fleet.coordinator = Some(fleet.spawn_coordinator().await?);
        for s in 0..self.shards {
            let agent = fleet.spawn_agent(s)?;
            fleet.agents.push(Some(agent));
        }
        fleet.wait_attached(self.shards).await?;
        Ok(fleet)
    }
}

/// A fleet's command line, `flotilla --coordinator ADDR[,ADDR...] ...`, with what tests
/// do through it on every kind of fleet ([`TestFleet`], [`crate::ha::HaFleet`]).
pub trait Cli {
    async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput>;

    /// Runs a command that must succeed and print JSON (on its last line).
    async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.cli(args).await?;
        if !out.success() {
            bail!("flotilla {args:?} failed: {out}");
        }
        out.last_json()
            .with_context(|| format!("parsing JSON from {args:?}"))
    }

    /// The plan's status (`plan status ID --output json`).
    async fn status(&self, id: &str) -> anyhow::Result<Value> {
        self.json(&["plan", "status", id, "--output", "json"]).await
    }

    /// Watches the plan until it ends (`plan watch ID --output json`, whose exit code
    /// says how), then reads its status.
    async fn watch(&self, id: &str) -> anyhow::Result<(CommandOutput, Value)> {
        let out = self.cli(&["plan", "watch", id, "--output", "json"]).await?;
        Ok((out, self.status(id).await?))
    }

    /// Submits without waiting; returns the new plan's id.
    async fn submit(&self, path: &Path, extra: &[&str]) -> anyhow::Result<String> {
        let p = path.to_string_lossy().into_owned();
        let mut args = vec!["plan", "submit", p.as_str(), "--output", "json"];
        args.extend_from_slice(extra);
        let v = self.json(&args).await?;
        v["plan_id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no plan_id in {v}"))
    }
}

impl Cli for TestFleet {
    async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        TestFleet::cli(self, args).await
    }
}

impl TestFleet {
    /// `shards` shard databases with `tenants` tenant schemas each, agents attached.
    pub async fn start(shards: usize, tenants: usize) -> anyhow::Result<TestFleet> {
        Self::builder(shards, tenants).start().await
    }

    pub fn builder(shards: usize, tenants: usize) -> FleetBuilder {
        FleetBuilder {
            shards,
            tenants,
            store_db: None,
            metrics: None,
            coordinator_extra: Vec::new(),
            agent_extra: Vec::new(),
            tenant_query: None,
            shard_sql: None,
            least_privilege: false,
            shard_labels: Vec::new(),
            tls: false,
            pg_settings: Vec::new(),
        }
    }

    /// Starts a coordinator with the fleet's flags and waits until it listens.
    async fn spawn_coordinator(&self) -> anyhow::Result<FlotillaProcess> {
        self.spawn_coordinator_with(&[]).await
    }

    /// The same, with `env` (failpoints, say).
    async fn spawn_coordinator_with(
        &self,
        env: &[(&str, &str)],
    ) -> anyhow::Result<FlotillaProcess> {
        let args: Vec<&str> = self.coordinator_args.iter().map(String::as_str).collect();
        let coordinator = FlotillaProcess::spawn(&args, env)?;
        coordinator
            .wait_for_log("coordinator listening", WAIT)
            .await?;
        Ok(coordinator)
    }

    /// SIGKILLs the coordinator (a crash); its log stays readable.
    pub fn kill_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.coordinator.take() {
            c.kill()?;
            self.old_coordinators.push(c);
        }
        Ok(())
    }

    /// Kills the coordinator if it runs, then starts a new one on the same address
    /// and store; agents reconnect by themselves.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.restart_coordinator_with(&[]).await
    }

    /// [`TestFleet::restart_coordinator`] with `env` for the new one.
    pub async fn restart_coordinator_with(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill_coordinator()?;
        self.coordinator = Some(self.spawn_coordinator_with(env).await?);
        Ok(())
    }

    pub fn spawn_agent(&self, s: usize) -> anyhow::Result<FlotillaProcess> {
        self.spawn_agent_on(s, &self.agent_dsn(s))
    }

    /// [`TestFleet::spawn_agent`] with another DSN (its options, say).
    pub fn spawn_agent_on(&self, s: usize, dsn: &str) -> anyhow::Result<FlotillaProcess> {
        let labels = match self.shard_labels.get(s).filter(|l| !l.is_empty()) {
            Some(more) => format!("region=r{s},{more}"),
            None => format!("region=r{s}"),
        };
        let mut args = vec![
            "--coordinator",
            &self.addr,
            "agent",
            "--shard",
            &self.shards[s],
            "--dsn",
            dsn,
            "--labels",
            &labels,
        ];
        match &self.tenant_query {
            Some(q) => args.extend(["--tenant-query", q.as_str()]),
            None => args.extend(["--tenant-pattern", "tenant_%"]),
        }
        args.extend(self.agent_extra.iter().map(String::as_str));
        let password_file;
        if let Some(login) = self.agent_logins.get(s) {
            password_file = login.password_file.to_string_lossy().into_owned();
            args.extend(["--password-file", password_file.as_str()]);
        }
        let env = match &self.tls {
            Some(tls) => tls.client_env(&tls.agent(&self.shards[s])?),
            None => Vec::new(),
        };
        FlotillaProcess::spawn(&args, &env_refs(&env))
    }

    /// The DSN shard `s`'s agent connects with: its least-privileged role's, or the
    /// superuser's. A test spawning an agent by hand adds `--password-file` from
    /// [`TestFleet::agent_logins`] when there is one.
    pub fn agent_dsn(&self, s: usize) -> String {
        match self.agent_logins.get(s) {
            Some(login) => login.dsn.clone(),
            None => self.pg.url(&self.shards[s]),
        }
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
        let env = match &self.tls {
            Some(tls) => tls.client_env(&tls.operator),
            None => Vec::new(),
        };
        run_flotilla(&all, &env_refs(&env)).await
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
        // `--wait --output json` prints the last status alone (a script's `jq` reads one
        // object), or nothing when it was refused
        assert!(
            out.stdout.lines().count() <= 1,
            "one JSON object at most: {out}"
        );
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

    /// A plan named `id` for `environment` (`plan_extra` appended to its plan.toml) of one
    /// tenant-scoped migration `id` creating `table` (`migration_toml` its migration.toml).
    pub fn one_table(
        environment: &str,
        id: &str,
        table: &str,
        plan_extra: &str,
        migration_toml: &str,
    ) -> anyhow::Result<MigrationDir> {
        let d = MigrationDir::new()?;
        std::fs::write(
            d.path().join("plan.toml"),
            format!("name = \"{id}\"\nenvironment = \"{environment}\"\n{plan_extra}"),
        )?;
        d.migration(
            id,
            migration_toml,
            &format!("CREATE TABLE {table} (x int);"),
            &format!("DROP TABLE {table};"),
        )?;
        Ok(d)
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
