//! Issue 3: coordinators in HA over real etcd, plan locks, fenced agents.
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{
    Cli, MigrationDir, WAIT, coord_dbmate_dir, tenant_name, tenant_sql, wait_running,
};
use crate::harness::certs::{FleetCerts, env_refs};
use crate::harness::least_privilege::{AgentLogin, create_agent_role};
use crate::harness::{
    CommandOutput, Etcd, FlotillaProcess, PgCluster, TestDir, free_port, run_flotilla, wait_for,
    wait_until,
};
use crate::shards::{assert_logged_once, blocked, hold, logged_blocking_migration, release};

pub struct HaFleet {
    pub pg: PgCluster,
    pub etcd: Etcd,
    pub coordinators: Vec<Option<FlotillaProcess>>,
    pub addrs: Vec<String>,
    pub agents: Vec<FlotillaProcess>,
    pub store: String,
    pub ports: Vec<u16>,
    /// Extra flags for every coordinator spawned (e.g. `--agent-grace 5s`).
    pub coordinator_args: Vec<String>,
    /// Extra flags for every agent spawned (e.g. `--lease-ttl 2s`).
    pub agent_args: Vec<String>,
    /// Processes replaced by a restart, kept so their logs print on a panic.
    pub retired: Vec<FlotillaProcess>,
    /// The coordinators' `--lease-ttl`.
    pub lease_ttl: String,
    /// Per shard, the least-privileged login its agent uses (empty: the superuser's DSN);
    /// see [`HaFleetBuilder::least_privilege`].
    pub agent_logins: Vec<AgentLogin>,
    /// Where the agents' password files are (with `least_privilege`).
    _secrets: Option<TestDir>,
    /// Under mTLS: the certificates (agents and the CLI present theirs).
    pub tls: Option<FleetCerts>,
}

const TTL: &str = "2s";

/// Options for [`HaFleet`]; `HaFleet::start(c, s, t)` is
/// `HaFleet::builder(c, s, t).start()`.
pub struct HaFleetBuilder {
    coordinators: usize,
    shards: usize,
    tenants: usize,
    etcd_members: usize,
    etcd_args: Vec<String>,
    coordinator_args: Vec<String>,
    agent_args: Vec<String>,
    agent_env: Vec<(usize, String, String)>,
    lease_ttl: String,
    least_privilege: bool,
    tls: bool,
}

impl HaFleetBuilder {
    /// The coordinators' `--lease-ttl` (default 2s).
    pub fn lease_ttl(mut self, ttl: &str) -> Self {
        self.lease_ttl = ttl.to_string();
        self
    }

    /// An etcd cluster of `n` members (default 1); every process gets every endpoint.
    pub fn etcd_members(mut self, n: usize) -> Self {
        self.etcd_members = n;
        self
    }

    /// Flags for every etcd member, e.g. `["--election-timeout=500"]`.
    pub fn etcd_args(mut self, args: &[&str]) -> Self {
        self.etcd_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// More flags for every coordinator, e.g. `["--agent-grace", "5s"]`.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// More flags for every agent, e.g. `["--lease-ttl", "2s"]`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Agents connect as the role `deploy/sql/agent-role.sql` creates for their shard,
    /// with a password file, instead of as the superuser.
    pub fn least_privilege(mut self) -> Self {
        self.least_privilege = true;
        self
    }

    /// An environment variable for the first agent of shard `s` only (e.g. FAILPOINTS);
    /// agents spawned later with [`HaFleet::spawn_agent`] do not get it.
    pub fn agent_env(mut self, s: usize, key: &str, value: &str) -> Self {
        self.agent_env.push((s, key.to_string(), value.to_string()));
        self
    }

    /// mTLS everywhere, as [`crate::fleet::FleetBuilder::tls`]: `https://` coordinators
    /// (each advertising its `https://` address), agents and the CLI with certificates.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub async fn start(self) -> anyhow::Result<HaFleet> {
        let (coordinators, shards, tenants) = (self.coordinators, self.shards, self.tenants);
        let pg = PgCluster::start().await?;
        let etcd_args: Vec<&str> = self.etcd_args.iter().map(String::as_str).collect();
        let etcd = Etcd::start_members(self.etcd_members.max(1), &etcd_args).await?;
        for s in 0..shards {
            let db = format!("shard_{s}");
            pg.create_database(&db).await?;
            let sql: String = (0..tenants)
                .map(|t| tenant_sql(&tenant_name(s, t, tenants), 5))
                .collect();
            pg.psql(&db, &sql).await?;
        }
        let mut agent_logins = Vec::new();
        let mut secrets = None;
        if self.least_privilege {
            let dir = TestDir::new("agent-secrets")?;
            for s in 0..shards {
                let db = format!("shard_{s}");
                let password = format!("agent-pw-{s}");
                agent_logins
                    .push(create_agent_role(&pg, &db, "tenant_%", &password, dir.path()).await?);
            }
            secrets = Some(dir);
        }
        pg.create_database("control").await?;
        let store = pg.url("control");
        let ports: Vec<u16> = (0..coordinators).map(|_| free_port()).collect();
        let tls = if self.tls {
            Some(FleetCerts::new()?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addrs: Vec<String> = ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect();
        let mut fleet = HaFleet {
            pg,
            etcd,
            coordinators: Vec::new(),
            addrs,
            agents: Vec::new(),
            store,
            ports,
            coordinator_args: self.coordinator_args,
            agent_args: self.agent_args,
            retired: Vec::new(),
            lease_ttl: self.lease_ttl,
            agent_logins,
            _secrets: secrets,
            tls,
        };
        for i in 0..coordinators {
            let c = fleet.spawn_coordinator(i)?;
            fleet.coordinators.push(Some(c));
        }
        for c in fleet.coordinators.iter().flatten() {
            c.wait_for_log("coordinator listening", WAIT).await?;
        }
        for s in 0..shards {
            let envs: Vec<(&str, &str)> = self
                .agent_env
                .iter()
                .filter(|(i, _, _)| *i == s)
                .map(|(_, k, v)| (k.as_str(), v.as_str()))
                .collect();
            let a = fleet.spawn_agent_with(s, &envs)?;
            fleet.agents.push(a);
        }
        fleet.wait_connected(shards).await?;
        // The leader welcomes agents as soon as etcd elects it; its engine logs that it
        // leads a moment later (and `leader()` reads that log line), so the tests that
        // ask for the leader right after start wait for it here.
        wait_until("a coordinator leads", WAIT, async || {
            Ok(fleet.leader().is_some())
        })
        .await?;
        Ok(fleet)
    }
}

impl HaFleet {
    pub async fn start(
        coordinators: usize,
        shards: usize,
        tenants: usize,
    ) -> anyhow::Result<HaFleet> {
        Self::builder(coordinators, shards, tenants).start().await
    }

    pub fn builder(coordinators: usize, shards: usize, tenants: usize) -> HaFleetBuilder {
        HaFleetBuilder {
            coordinators,
            shards,
            tenants,
            etcd_members: 1,
            etcd_args: Vec::new(),
            coordinator_args: Vec::new(),
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            lease_ttl: TTL.to_string(),
            least_privilege: false,
            tls: false,
        }
    }

    /// Every etcd endpoint, comma-separated (the `--etcd` value).
    pub fn etcd_endpoints(&self) -> String {
        self.etcd.endpoints().join(",")
    }

    /// Waits until `n` agents are attached to the leader.
    pub async fn wait_connected(&self, n: usize) -> anyhow::Result<()> {
        wait_until(
            &format!("{n} agents attached to the leader"),
            WAIT,
            async || {
                let v = self.json(&["fleet", "list", "--output", "json"]).await?;
                Ok(v.as_array()
                    .map(|a| a.iter().filter(|x| x["connected"] == true).count())
                    == Some(n))
            },
        )
        .await
    }

    pub fn spawn_coordinator(&self, i: usize) -> anyhow::Result<FlotillaProcess> {
        self.spawn_coordinator_with(i, &[])
    }

    /// A coordinator with extra environment (e.g. FAILPOINTS).
    pub fn spawn_coordinator_with(
        &self,
        i: usize,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<FlotillaProcess> {
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let etcd = self.etcd_endpoints();
        let mut args = vec![
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &self.store,
            "--etcd",
            &etcd,
            "--lease-ttl",
            &self.lease_ttl,
        ];
        let tls_args = self
            .tls
            .as_ref()
            .map(FleetCerts::coordinator_args)
            .unwrap_or_default();
        args.extend(tls_args.iter().map(String::as_str));
        args.extend(self.coordinator_args.iter().map(String::as_str));
        FlotillaProcess::spawn(&args, envs)
    }

    pub fn spawn_agent(&self, s: usize) -> anyhow::Result<FlotillaProcess> {
        self.spawn_agent_with(s, &[])
    }

    /// An agent for shard `s` with extra environment (e.g. FAILPOINTS).
    pub fn spawn_agent_with(
        &self,
        s: usize,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<FlotillaProcess> {
        let all = self.addrs.join(",");
        let dsn = match self.agent_logins.get(s) {
            Some(login) => login.dsn.clone(),
            None => self.pg.url(&format!("shard_{s}")),
        };
        let shard = format!("shard_{s}");
        let etcd = self.etcd_endpoints();
        let mut args = vec![
            "--coordinator",
            &all,
            "agent",
            "--shard",
            &shard,
            "--dsn",
            &dsn,
            "--tenant-pattern",
            "tenant_%",
            "--etcd",
            &etcd,
        ];
        args.extend(self.agent_args.iter().map(String::as_str));
        let password_file;
        if let Some(login) = self.agent_logins.get(s) {
            password_file = login.password_file.to_string_lossy().into_owned();
            args.extend(["--password-file", password_file.as_str()]);
        }
        let mut env = match &self.tls {
            Some(tls) => tls.client_env(&tls.agent(&shard)?),
            None => Vec::new(),
        };
        env.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        FlotillaProcess::spawn(&args, &env_refs(&env))
    }

    /// Kills shard `s`'s agent (SIGKILL; a no-op if it has exited) and starts a new
    /// one without extra environment; the old one's log is kept for a panic.
    pub fn restart_agent(&mut self, s: usize) -> anyhow::Result<()> {
        self.agents[s].kill()?;
        let fresh = self.spawn_agent(s)?;
        let old = std::mem::replace(&mut self.agents[s], fresh);
        self.retired.push(old);
        Ok(())
    }

    /// Kills coordinator `i` (if it runs) and starts it again with `envs`; waits
    /// until it listens.
    pub async fn restart_coordinator_with(
        &mut self,
        i: usize,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        if let Some(mut old) = self.coordinators[i].take() {
            old.kill()?;
            self.retired.push(old);
        }
        let c = self.spawn_coordinator_with(i, envs)?;
        c.wait_for_log("coordinator listening", WAIT).await?;
        self.coordinators[i] = Some(c);
        Ok(())
    }

    /// Runs a CLI command against every coordinator address (reads go to the first
    /// that answers; writes follow the leader).
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        let all = self.addrs.join(",");
        let mut v = vec!["--coordinator", all.as_str()];
        v.extend_from_slice(args);
        run_flotilla(&v, &env_refs(&self.cli_env())).await
    }

    pub async fn cli_at(&self, i: usize, args: &[&str]) -> anyhow::Result<CommandOutput> {
        let mut v = vec!["--coordinator", self.addrs[i].as_str()];
        v.extend_from_slice(args);
        run_flotilla(&v, &env_refs(&self.cli_env())).await
    }

    /// Under mTLS, the operator's certificate for the CLI.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        match &self.tls {
            Some(tls) => tls.client_env(&tls.operator),
            None => Vec::new(),
        }
    }

    /// Index of the coordinator that leads now (its log says so last).
    pub fn leader(&self) -> Option<usize> {
        self.coordinators.iter().enumerate().find_map(|(i, c)| {
            let log = c.as_ref()?.log();
            let lead = log.rfind("leading: scheduling and deciding");
            let follow = log.rfind("following");
            match (lead, follow) {
                (Some(l), Some(f)) if l > f => Some(i),
                (Some(_), None) => Some(i),
                _ => None,
            }
        })
    }

    /// Until coordinator `i` lists every agent as connected (after a change of leader,
    /// the agents find the new one).
    pub async fn wait_attached_at(&self, i: usize) -> anyhow::Result<()> {
        let n = self.agents.len();
        wait_until(
            &format!("{n} agent(s) attached to coordinator {i}"),
            WAIT,
            async || {
                let out = self
                    .cli_at(i, &["fleet", "list", "--output", "json"])
                    .await?;
                Ok(out.stdout.matches("\"connected\":true").count() == n)
            },
        )
        .await
    }

    /// Journal rows on shard `s` (database `shard_{s}`).
    pub async fn journal_rows(&self, s: usize) -> anyhow::Result<i64> {
        self.pg
            .query_scalar(
                &format!("shard_{s}"),
                "SELECT count(*) FROM flotilla.journal",
            )
            .await
    }

    /// Journal rows on every shard.
    pub async fn journal_total(&self) -> anyhow::Result<i64> {
        let mut n = 0;
        for s in 0..self.agents.len() {
            n += self.journal_rows(s).await?;
        }
        Ok(n)
    }
}

impl Cli for HaFleet {
    async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        HaFleet::cli(self, args).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_sends_writes_to_the_leader_and_locks_are_held_while_running()
-> anyhow::Result<()> {
    let fleet = HaFleet::start(2, 2, 2).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;

    // A write sent to the follower is refused there and carried to the leader.
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli_at(
            follower,
            &["plan", "submit", &dir, "--wait", "--output", "json"],
        )
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let status: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["steps"], 12);

    // Locks are released when the plan ends; the backend is etcd.
    wait_until("locks released", WAIT, async || {
        let v = fleet.json(&["locks", "list", "--output", "json"]).await?;
        Ok(v["backend"] == "etcd" && v["locks"].as_array().is_some_and(|l| l.is_empty()))
    })
    .await?;

    // Agents hold liveness keys; the fence in each shard carries the leader's epoch.
    let epoch: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT epoch FROM flotilla.fence")
        .await?;
    assert!(epoch > 0, "the fence holds the etcd epoch");
    Ok(())
}

/// The leader's term ends right after a submitted plan was stored, before the submit
/// checked its term (failpoint: the coordinator resigns there, and the other one takes
/// over): the plan landed before the new leader fenced the store, and the new leader
/// continues it. The submit answers with the plan; before, it answered "not the leader",
/// and the CLI, following that refusal to the new leader, submitted the plan a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_stored_as_its_leaders_term_ends_is_submitted_once() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(2, 2, 2).await?;
    for i in [0, 1] {
        fleet
            .restart_coordinator_with(
                i,
                &[("FAILPOINTS", "coordinator::term_ends_after_flush=1*return")],
            )
            .await?;
    }
    let leader = wait_for("a leader", WAIT, async || Ok(fleet.leader())).await?;
    fleet.wait_attached_at(leader).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli_at(leader, &["plan", "submit", &dir, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let submitted: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    let id = submitted["plan_id"]
        .as_str()
        .expect("a plan id")
        .to_string();
    let resigned = fleet.coordinators[leader].as_ref().expect("runs");
    resigned
        .wait_for_log("the term leading now continues from them", WAIT)
        .await?;
    wait_until("the other coordinator leads", WAIT, async || {
        Ok(fleet.leader() == Some(1 - leader))
    })
    .await?;
    let st = wait_for("the plan ended", WAIT, async || {
        let st = fleet.status(&id).await?;
        Ok(
            flotilla_core::state::PlanState::is_terminal_str(st["state"].as_str().unwrap_or(""))
                .then_some(st),
        )
    })
    .await?;
    assert_eq!(st["state"], "completed", "{st}");
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    let plans = plans.as_array().expect("a list");
    assert_eq!(plans.len(), 1, "submitted once: {plans:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_fenced_and_the_plan_completes_once() -> anyhow::Result<()>
{
    let mut fleet = HaFleet::start(2, 2, 3).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let standby = 1 - leader;

    // One tenant blocks on an advisory lock the test holds, so the plan is mid-way
    // when the leader is paused.
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0001", 77)?;
    d.migration(
        "002_more",
        "",
        "INSERT INTO applied_log VALUES ('002')",
        "DELETE FROM applied_log WHERE step = '002'",
    )?;
    let lock = hold(&fleet.pg, 0, 77).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until(
        "tenant_0001 blocked while the plan runs",
        WAIT,
        async || {
            let waiting = blocked(&fleet.pg, 0).await?;
            Ok(waiting == 1)
        },
    )
    .await?;
    // The running plan holds locks on both shards.
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert_eq!(locks["locks"].as_array().unwrap().len(), 2, "{locks}");

    // Pause the leader past its lease: the standby takes over with a newer epoch.
    let old_epoch: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT epoch FROM flotilla.fence")
        .await?;
    fleet.coordinators[leader].as_ref().unwrap().stop()?;
    fleet.coordinators[standby]
        .as_ref()
        .unwrap()
        .wait_for_log("leading: scheduling and deciding", Duration::from_secs(30))
        .await?;
    fleet.wait_attached_at(standby).await?;
    release(lock, 77).await?;

    let watched = fleet
        .cli_at(standby, &["plan", "watch", &id, "--output", "json"])
        .await;
    let out = match watched {
        Ok(out) => out,
        Err(e) => {
            // What the new leader and the agents were doing: the plan did not end.
            eprintln!(
                "new leader's log:\n{}",
                fleet.coordinators[standby].as_ref().unwrap().log_tail(60)
            );
            for agent in &fleet.agents {
                eprintln!("agent log:\n{}", agent.log_tail(40));
            }
            return Err(e);
        }
    };
    assert_eq!(out.code(), Some(0), "{out}");

    // The old leader resumes: it finds itself deposed and changes nothing.
    fleet.coordinators[leader].as_ref().unwrap().cont()?;
    fleet.coordinators[leader]
        .as_ref()
        .unwrap()
        .wait_for_log("following", Duration::from_secs(30))
        .await?;
    let new_epoch: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT epoch FROM flotilla.fence")
        .await?;
    assert!(
        new_epoch > old_epoch,
        "the fence moved to the new leader's epoch ({old_epoch} -> {new_epoch})"
    );
    // The new leader fenced the control store too, before it read the plan to continue:
    // whatever the old one still had queued is refused there, and the plan's end stands.
    let store_fence: String = fleet
        .pg
        .query_scalar(
            "control",
            "SELECT value FROM flotilla_meta WHERE key = 'leader_fence'",
        )
        .await?;
    assert!(
        store_fence.starts_with(&format!("{new_epoch} etcd ")),
        "the control store's fence: {store_fence}"
    );
    let stored: String = fleet
        .pg
        .query_scalar(
            "control",
            &format!("SELECT state FROM plans WHERE id = '{id}'"),
        )
        .await?;
    assert_eq!(stored, "completed", "the plan's end in the control store");
    // Every step is the plan's own, those the leader before saw applied and those its
    // runs sent again found in the journals alike: none "already applied" (no other plan
    // ran), and a rollback would undo them all.
    let st = fleet
        .json(&["plan", "status", &id, "--output", "json"])
        .await?;
    for m in st["migrations"].as_array().unwrap() {
        assert_eq!(
            (m["applied"].as_u64(), m["already_applied"].as_u64()),
            (Some(6), Some(0)),
            "{st}"
        );
    }

    // Exactly once on every tenant.
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(fleet.journal_rows(s).await?, 6, "{db}");
        for t in 0..3 {
            let tenant = tenant_name(s, t, 3);
            assert_logged_once(&fleet.pg, &db, &tenant, &["001", "002"]).await?;
        }
    }
    let _ = &mut fleet.agents;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_for_the_same_shard_is_refused() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 1, 1).await?;
    let mut second = fleet.spawn_agent(0)?;
    let status = second
        .wait_exit(WAIT)
        .await
        .expect("the second agent exits");
    assert!(!status.success());
    assert!(
        second.log().contains("another Flotilla agent"),
        "{}",
        second.log()
    );
    // The first one still serves the shard.
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &dir, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_with_sigterm_hands_over_at_once_and_its_agents_follow()
-> anyhow::Result<()> {
    // A lease long enough that waiting it out could not pass for a handover.
    let ttl = Duration::from_secs(30);
    let mut fleet = HaFleet::builder(2, 2, 3)
        .lease_ttl(&format!("{}s", ttl.as_secs()))
        .start()
        .await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let standby = 1 - leader;

    // A plan mid-way (one tenant blocks on an advisory lock the test holds), watched by
    // an operator on the leader: both kinds of long-lived stream are open.
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0001", 78)?;
    d.migration(
        "002_more",
        "",
        "INSERT INTO applied_log VALUES ('002')",
        "DELETE FROM applied_log WHERE step = '002'",
    )?;
    let lock = hold(&fleet.pg, 0, 78).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until(
        "tenant_0001 blocked while the plan runs",
        WAIT,
        async || Ok(blocked(&fleet.pg, 0).await? == 1),
    )
    .await?;
    let leader_addr = fleet.addrs[leader].clone();
    let mut watch = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &leader_addr,
            "plan",
            "watch",
            &id,
            "--output",
            "json",
        ],
        &[],
    )?;
    watch.wait_for_log("\"plan_id\"", WAIT).await?;

    // SIGTERM: the leader exits cleanly and soon, well inside its shutdown grace (10s).
    let stopped_at = tokio::time::Instant::now();
    let old = fleet.coordinators[leader].as_mut().unwrap();
    let status = old.terminate_within(Duration::from_secs(5)).await?;
    let log = old.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("leadership released"), "{log}");
    assert!(
        !log.contains("did not finish in time"),
        "the streams ended by themselves: {log}"
    );

    // The standby leads long before the old leader's lease could have expired.
    fleet.coordinators[standby]
        .as_ref()
        .unwrap()
        .wait_for_log("leading: scheduling and deciding", ttl / 3)
        .await?;
    assert!(stopped_at.elapsed() < ttl / 2, "{:?}", stopped_at.elapsed());

    // The watcher is told the coordinator stopped rather than shown a last status as
    // the plan's end (exit 3: unavailable).
    let watched = watch
        .wait_exit(WAIT)
        .await
        .expect("the watch ends with its coordinator");
    assert_eq!(watched.code(), Some(3), "{}", watch.log());
    assert!(watch.log().contains("shutting down"), "{}", watch.log());

    // The agents find the new leader; the plan in flight completes there, once.
    fleet.wait_attached_at(standby).await?;
    release(lock, 78).await?;
    let out = fleet
        .cli_at(standby, &["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        let db = format!("shard_{s}");
        for t in 0..3 {
            assert_logged_once(&fleet.pg, &db, &tenant_name(s, t, 3), &["001", "002"]).await?;
        }
    }

    // A plan submitted afterwards (to every address: the old one is gone) completes.
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &dir, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let status: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(status["state"], "completed", "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_whose_hand_over_stalls_still_stops_within_its_grace() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(2, 1, 1)
        .coordinator_args(&["--shutdown-grace", "1s"])
        .start()
        .await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let standby = 1 - leader;
    fleet
        .restart_coordinator_with(
            standby,
            &[("FAILPOINTS", "coordinator::stall_hand_over=return")],
        )
        .await?;

    // The leader hands over normally; the standby, stalled when its turn comes, leads.
    let status = fleet.coordinators[leader]
        .as_mut()
        .unwrap()
        .terminate_within(Duration::from_secs(5))
        .await?;
    assert_eq!(status.code(), Some(0));
    fleet.coordinators[standby]
        .as_ref()
        .unwrap()
        .wait_for_log("leading: scheduling and deciding", WAIT)
        .await?;
    fleet.wait_attached_at(standby).await?;

    // Its hand-over never ends: it stops anyway once the grace is over, naming the
    // stream still open, and exits cleanly.
    let stalled = fleet.coordinators[standby].as_mut().unwrap();
    let status = stalled.terminate_within(Duration::from_secs(5)).await?;
    let log = stalled.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("leadership not handed over in time"), "{log}");
    assert!(
        log.contains("graceful shutdown did not finish in time"),
        "{log}"
    );
    assert!(log.contains("the agent stream of shard shard_0"), "{log}");
    Ok(())
}

/// A plan the control store refuses to take for good (here a trigger of the store's own
/// refusing its row) is answered as not stored, naming it, and nothing of it runs. Before,
/// the writer gave its writes up (logged) and the plan ran all the same, its status "not
/// found" once it ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_the_store_does_not_take_is_not_run() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 1, 2).await?;
    fleet
        .pg
        .psql(
            "control",
            "CREATE FUNCTION refuse_plan() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'this store takes no plan named refuse-me'; END $$;
             CREATE TRIGGER refuse_plan BEFORE INSERT ON plans
               FOR EACH ROW WHEN (NEW.name = 'refuse-me') EXECUTE FUNCTION refuse_plan();",
        )
        .await?;
    let dir = crate::harness::TestDir::new("refused-plan")?;
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            "name = \"refuse-me\"\nmigrations_dir = \"{}\"\n",
            coord_dbmate_dir().display()
        ),
    )?;
    let p = dir.join("plan.toml").to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &p]).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("was not stored"), "{out}");
    assert_eq!(fleet.journal_total().await?, 0, "nothing ran");
    Ok(())
}

/// A halt the coordinator answered is in the store before the answer: with the store slow
/// (failpoint `coordinator::store_write=return(1500)`) and the leader killed right after the
/// answer, the next leader finishes the stop and the plan ends halted, its second step not
/// run everywhere. Before, the answer went out with the halt still queued for the store, and the next
/// leader ran the plan to completed.
#[tokio::test(flavor = "multi_thread")]
async fn a_halt_answered_survives_the_leaders_death() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(1, 2, 2).await?;
    fleet
        .restart_coordinator_with(
            0,
            &[("FAILPOINTS", "coordinator::store_write=return(1500)")],
        )
        .await?;
    fleet.wait_connected(2).await?;
    let dir = MigrationDir::new()?;
    dir.migration("001_slow", "", "SELECT pg_sleep(1)", "SELECT 1")?;
    dir.migration(
        "002_after",
        "depends_on = [\"001_slow\"]\n",
        "CREATE TABLE after_halt (id int)",
        "DROP TABLE after_halt",
    )?;
    let id = fleet
        .submit(dir.path(), &["--max-parallel", "1", "--no-fuse"])
        .await?;
    // (the CLI waits by itself while the coordinator says no one leads yet)
    let out = fleet
        .cli(&["plan", "halt", &id, "--reason", "night"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // killed as soon as it answered; the next leader reads the store
    fleet.restart_coordinator_with(0, &[]).await?;
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "halted", "{st}");
    let after = st["migrations"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == "002_after").cloned())
        .unwrap_or_default();
    // (a target may have gone on to it while the halt was being stored)
    assert!(
        after["applied"].as_u64() < Some(4),
        "not run to its end: {st}"
    );
    Ok(())
}

/// A write sent right after the leader was killed reaches the next leader: the follower
/// first asked names the dead one (its term lasts until its lease runs out), and the CLI
/// asks again until another leads. Before, it failed at once "cannot reach a coordinator",
/// naming the dead leader, with the other coordinator up.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_right_after_the_leader_died_reaches_the_next_one() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(2, 1, 1).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    if let Some(mut c) = fleet.coordinators[leader].take() {
        c.kill()?;
        fleet.retired.push(c);
    }
    // a write the leader answers by itself (no agent needed: they may not have attached to
    // the new leader yet): a cancel of a plan nobody submitted, answered "not found" there
    let out = fleet.cli(&["plan", "cancel", "p-nobodys"]).await?;
    assert!(
        !out.stderr.contains("cannot reach a coordinator"),
        "the next leader answered: {out}"
    );
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("not found"), "{out}");
    Ok(())
}

/// A plan's status or watch asked of a follower comes from the leader: the follower reads
/// the control store (behind the leader's state by its write window, and without what only
/// the leader holds) and names the leader in its answer, and the CLI asks there. Here the
/// shard whose agent went away mid-step, which only the leader names.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_read_through_a_follower_is_the_leaders() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(2, 1, 1).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;
    let dir = MigrationDir::new()?;
    dir.migration("001_slow", "", "SELECT pg_sleep(30)", "SELECT 1")?;
    let id = fleet.submit(dir.path(), &[]).await?;
    wait_running(&fleet.pg, "shard_0", "pg_sleep(30)", 1).await?;
    fleet.agents[0].kill()?;
    let waits_on_shard = |st: &Value| {
        st["waiting_for"]
            .as_array()
            .is_some_and(|w| w.iter().any(|s| s == "shard_0"))
    };
    wait_until("the leader to name the away shard", WAIT, async || {
        let out = fleet
            .cli_at(leader, &["plan", "status", &id, "--output", "json"])
            .await?;
        Ok(out.last_json().is_ok_and(|st| waits_on_shard(&st)))
    })
    .await?;
    let out = fleet
        .cli_at(follower, &["plan", "status", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = out.last_json()?;
    assert!(waits_on_shard(&st), "the leader's status: {st}");
    // and the list: the store says running for a paused plan, the leader paused
    let out = fleet.cli_at(leader, &["plan", "pause", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet
        .cli_at(follower, &["plan", "list", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let plans: Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(plans[0]["plan_id"], id.as_str(), "{plans}");
    assert_eq!(plans[0]["state"], "paused", "the leader's list: {plans}");
    Ok(())
}

/// A `plan watch` asked of a follower follows the plan at the leader, and when that leader
/// is killed mid-plan it takes the watch up at the next coordinator: it ends when the plan
/// does, with its exit code (0: completed), not with the dead leader's stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_through_a_follower_outlives_the_leader() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(2, 1, 1).await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;
    let dir = MigrationDir::new()?;
    dir.migration("001_slow", "", "SELECT pg_sleep(4)", "SELECT 1")?;
    let id = fleet.submit(dir.path(), &[]).await?;
    let addr = fleet.addrs[follower].clone();
    let watched = id.clone();
    let watch = tokio::spawn(async move {
        run_flotilla(
            &[
                "--coordinator",
                &addr,
                "plan",
                "watch",
                &watched,
                "--output",
                "json",
            ],
            &[],
        )
        .await
    });
    wait_running(&fleet.pg, "shard_0", "pg_sleep(4)", 1).await?;
    if let Some(mut c) = fleet.coordinators[leader].take() {
        c.kill()?;
        fleet.retired.push(c);
    }
    let out = watch.await??;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed", "{st}");
    Ok(())
}

/// A coordinator given another control store than its etcd group's (a SQLite file by
/// mistake) is refused at start, naming both, and changes nothing. Before, it joined the
/// election and, once it led, served an empty store: no plans, no operators, and
/// authentication off.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_with_another_store_than_its_group_is_refused() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 1, 1).await?;
    let files = TestDir::new("other-store")?;
    let other = files.join("other.db").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let etcd = fleet.etcd_endpoints();
    let out = run_flotilla(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &other,
            "--etcd",
            &etcd,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("keep their state in control store")
            && out
                .stderr
                .contains("this coordinator's --store is another one"),
        "{out}"
    );
    // The group goes on with its own store.
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &dir, "--wait"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(())
}

/// An agent whose liveness lease expired while etcd was frozen (SIGSTOP past the lease's
/// TTL) puts its key again under a new lease once etcd answers. Before, it asked etcd to
/// keep the expired lease alive for good ("lease not found"): its key missing, the shard
/// counted away, its `/readyz` 503, minutes after etcd was back.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_puts_its_liveness_key_again_after_its_lease_expired_in_a_frozen_etcd()
-> anyhow::Result<()> {
    let fleet = HaFleet::builder(1, 1, 1)
        .agent_args(&["--lease-ttl", "2s"])
        .start()
        .await?;
    let key = "/flotilla/agents/shard_0";
    wait_until("the agent's liveness key", WAIT, async || {
        crate::faults::etcd_has(&fleet, key).await
    })
    .await?;
    let agent = &fleet.agents[0];
    fleet.etcd.pause()?;
    agent
        .wait_for_log("the agent's liveness keep-alive broke", WAIT)
        .await?;
    // A frozen etcd cannot be asked anything: the lease's TTL passing is the clock's alone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.etcd.resume()?;
    agent
        .wait_for_log("expired while etcd was out of reach", WAIT)
        .await?;
    wait_until("the liveness key put again", WAIT, async || {
        crate::faults::etcd_has(&fleet, key).await
    })
    .await?;
    Ok(())
}
