//! `flotilla quickstart`: with nothing to bring, a throwaway PostgreSQL cluster holding
//! a small demo fleet, a coordinator and one agent per shard in this process, and the
//! coordinated example rolled across it; then it serves until Ctrl-C and cleans up.
//! With `--shard NAME=DSN` it runs a coordinator and agents for the given shards only.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::AgentConfig;
use flotilla_coordinator::CoordinatorConfig;
use flotilla_core::pb;
use flotilla_testkit::PgCluster;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::error;

use super::daemons::{check_dsn_of, shard_password, shutdown_signal};
use super::{EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, Output, QuickstartArgs};

/// The example the demo rolls, built into the binary so the quickstart runs from any
/// directory; written out beside the cluster for the user to read and submit again.
const EXAMPLE: &str = "coord-2025-001";
const EXAMPLE_FILES: &[(&str, &str)] = &[
    (
        "plan.toml",
        include_str!("../../examples/coord-2025-001/plan.toml"),
    ),
    (
        "2025.01.31_160000_hs_satisfaction_tracking/migration.toml",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160000_hs_satisfaction_tracking/migration.toml"
        ),
    ),
    (
        "2025.01.31_160000_hs_satisfaction_tracking/up.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160000_hs_satisfaction_tracking/up.sql"
        ),
    ),
    (
        "2025.01.31_160000_hs_satisfaction_tracking/down.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160000_hs_satisfaction_tracking/down.sql"
        ),
    ),
    (
        "2025.01.31_160000_hs_satisfaction_tracking/verify.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160000_hs_satisfaction_tracking/verify.sql"
        ),
    ),
    (
        "2025.01.31_160001_auto_satisfaction_tracking/migration.toml",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160001_auto_satisfaction_tracking/migration.toml"
        ),
    ),
    (
        "2025.01.31_160001_auto_satisfaction_tracking/up.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160001_auto_satisfaction_tracking/up.sql"
        ),
    ),
    (
        "2025.01.31_160001_auto_satisfaction_tracking/down.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160001_auto_satisfaction_tracking/down.sql"
        ),
    ),
    (
        "2025.01.31_160001_auto_satisfaction_tracking/verify.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160001_auto_satisfaction_tracking/verify.sql"
        ),
    ),
    (
        "2025.01.31_160002_unified_satisfaction_view/migration.toml",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160002_unified_satisfaction_view/migration.toml"
        ),
    ),
    (
        "2025.01.31_160002_unified_satisfaction_view/up.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160002_unified_satisfaction_view/up.sql"
        ),
    ),
    (
        "2025.01.31_160002_unified_satisfaction_view/down.sql",
        include_str!(
            "../../examples/coord-2025-001/2025.01.31_160002_unified_satisfaction_view/down.sql"
        ),
    ),
];

/// The industries of the seeds' platform; tenants take them in turn.
const INDUSTRIES: &[&str] = &["home_services", "automotive", "veterinary"];
const TIERS: &[&str] = &["starter", "pro", "enterprise"];
const REGIONS: &[&str] = &["eu", "us"];
/// Rows per table per tenant: enough for the view to have something to show.
const DEMO_ROWS: usize = 25;
/// How long the agents get to attach and report their tenants.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo's tenants come from a registry table, as many fleets keep them, so they
/// carry labels (industry, tier) the way an operator's `--tenant-query` would give them.
const TENANT_QUERY: &str = "SELECT schema_name, 'industry=' || industry || ',tier=' || tier \
                            FROM demo.tenants ORDER BY schema_name";

pub async fn quickstart(args: QuickstartArgs) -> u8 {
    let stop = Stop::on_signal();
    if args.shards.is_empty() {
        demo(args, stop).await
    } else {
        given_shards(args, stop).await
    }
}

/// Ctrl-C (or SIGTERM) at any point, or the quickstart giving up: every phase and
/// every component watches this.
#[derive(Clone)]
struct Stop {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Stop {
    fn on_signal() -> Stop {
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let signalled = tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = signalled.send(true);
        });
        Stop { tx, rx }
    }

    fn now(&self) {
        let _ = self.tx.send(true);
    }

    /// Resolves once a stop is asked for.
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

async fn demo(args: QuickstartArgs, stop: Stop) -> u8 {
    if args.demo_shards == 0 || args.demo_tenants == 0 {
        eprintln!("error: --demo-shards and --demo-tenants must be at least 1");
        return EXIT_BAD_INPUT;
    }
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("flotilla-quickstart-{}", std::process::id())),
    };
    // Only a new or empty directory: everything in it is ours to remove at the end.
    if let Err(e) = new_dir(&dir) {
        eprintln!("error: --dir {}: {e}", dir.display());
        return EXIT_BAD_INPUT;
    }
    println!(
        "flotilla quickstart: a throwaway PostgreSQL cluster in {}",
        dir.display()
    );
    let mut builder = PgCluster::builder()
        .dir(dir.join("postgres"))
        // One prepared transaction per tenant if an atomic plan is tried next.
        .setting(
            "max_prepared_transactions",
            (args.demo_tenants * 2).max(64).to_string(),
        );
    if let Some(port) = args.pg_port {
        builder = builder.port(port);
    }
    let started = tokio::select! {
        cluster = builder.start() => Some(cluster),
        _ = stop.wait() => None,
    };
    let mut cluster = match started {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!(
                "error: could not start PostgreSQL in {}: {e:#}\n\
                 Install the server (Debian: apt-get install postgresql; scripts/quickstart.sh does it), \
                 or set FLOTILLA_PG_BINDIR to the directory holding initdb and pg_ctl.",
                dir.display()
            );
            remove_dir(&dir, args.keep);
            return EXIT_UNAVAILABLE;
        }
        None => {
            println!("interrupted");
            remove_dir(&dir, args.keep);
            return EXIT_OK;
        }
    };
    if args.keep {
        cluster.keep();
    }
    let code = run_demo(&args, &cluster, &dir, &stop).await;
    if args.keep {
        if let Err(e) = cluster.stop().await {
            eprintln!("warning: stopping PostgreSQL: {e:#}");
        }
        println!(
            "kept {} (PostgreSQL is stopped; start it again with: {})",
            dir.display(),
            cluster.start_command()
        );
    }
    drop(cluster);
    remove_dir(&dir, args.keep);
    code
}

/// Creates `dir` (mode 0755: as root, PostgreSQL runs as `postgres` and must reach
/// its data dir inside), refusing one that holds anything.
fn new_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
        if entries.next().is_some() {
            return Err("exists and is not empty; name a new directory".into());
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

fn remove_dir(dir: &Path, keep: bool) {
    if !keep {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => println!("removed {}", dir.display()),
            Err(e) => eprintln!("warning: removing {}: {e}", dir.display()),
        }
    }
}

/// Everything between a running cluster and the stop; the components are stopped
/// before it returns (the cluster goes after them).
async fn run_demo(args: &QuickstartArgs, cluster: &PgCluster, dir: &Path, stop: &Stop) -> u8 {
    let shards: Vec<String> = (0..args.demo_shards)
        .map(|s| format!("shard_{s}"))
        .collect();
    for (s, shard) in shards.iter().enumerate() {
        let built = tokio::select! {
            built = build_shard(cluster, s, shard, args.demo_tenants) => built,
            _ = stop.wait() => return EXIT_OK,
        };
        if let Err(e) = built {
            eprintln!("error: building the demo fleet's {shard}: {e:#}");
            return EXIT_UNAVAILABLE;
        }
    }
    println!(
        "demo fleet: {} shard(s) x {} tenant schemas on 127.0.0.1:{} (tenant labels industry={} and tier={}; shard label region={})",
        args.demo_shards,
        args.demo_tenants,
        cluster.port(),
        INDUSTRIES.join("|"),
        TIERS.join("|"),
        REGIONS.join("|"),
    );
    let plan = match &args.plan {
        Some(plan) => plan.clone(),
        None => match write_example(dir) {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "error: writing the example plan into {}: {e}",
                    dir.display()
                );
                return EXIT_UNAVAILABLE;
            }
        },
    };
    let store = args.store.clone().unwrap_or_else(|| {
        dir.join("flotilla.db")
            .to_string_lossy()
            .into_owned()
            .into()
    });
    let store = match super::daemons::store_location(&store, args.store_password_file.as_deref()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let mut config = CoordinatorConfig::new(args.listen, store);
    config.metrics = Some(args.metrics);
    // A tenant added while the demo runs gets what the fleet has, by itself.
    config.catch_up_environments = vec!["*".to_string()];
    let agents = shards
        .iter()
        .enumerate()
        .map(|(s, shard)| {
            let mut config = AgentConfig::new(
                shard.clone(),
                cluster.url(shard),
                format!("http://{}", args.listen),
            );
            config.tenant_query = Some(TENANT_QUERY.to_string());
            config.labels = [("region".to_string(), REGIONS[s % REGIONS.len()].to_string())]
                .into_iter()
                .collect();
            config.max_connections = 4;
            // A tenant created while the demo runs shows (and catches up) within seconds.
            config.discover_interval = Duration::from_secs(5);
            config
        })
        .collect();
    let Some(fleet) = Components::start(config, agents, stop).await else {
        return EXIT_UNAVAILABLE;
    };
    let addr = format!("http://{}", args.listen);
    println!(
        "coordinator on {addr} (store {}), metrics on http://{}/metrics, {} agent(s)",
        fleet.store,
        args.metrics,
        shards.len()
    );
    let rollout = async {
        wait_for_fleet(&addr, &shards, args.demo_tenants).await?;
        println!("\nrolling {} across the fleet:", plan.display());
        let submit = super::SubmitArgs {
            path: plan.clone(),
            wait: true,
            request_id: None,
            dry_run: false,
            max_parallel: None,
            selector: None,
            policy: None,
            scope: None,
            no_fuse: false,
            atomic: false,
            actor: "quickstart".into(),
            promotion: Default::default(),
            output: Output::Text,
        };
        Ok::<_, String>(super::plan::submit_plan(&addr, submit).await)
    };
    let rolled = tokio::select! {
        rolled = rollout => Some(rolled),
        _ = stop.wait() => None,
    };
    let code = match rolled {
        Some(Ok((code, plan_id))) => {
            next_steps(&addr, args, cluster, &plan, plan_id.as_deref(), code);
            stop.wait().await;
            code
        }
        Some(Err(e)) => {
            eprintln!("error: {e}");
            EXIT_UNAVAILABLE
        }
        None => EXIT_OK,
    };
    stop.now();
    let stopped = fleet.stop().await;
    if code == EXIT_OK { stopped } else { code }
}

/// One shard database: tenant schemas with the two industry tables the example
/// migrates, a few rows each, and the registry the agents read tenants (and labels) from.
async fn build_shard(
    cluster: &PgCluster,
    s: usize,
    shard: &str,
    tenants: usize,
) -> anyhow::Result<()> {
    cluster.create_database(shard).await?;
    let mut sql = String::from(
        "CREATE SCHEMA demo;
         CREATE TABLE demo.tenants (schema_name text PRIMARY KEY, industry text NOT NULL, tier text NOT NULL);\n",
    );
    for t in 0..tenants {
        let n = s * tenants + t;
        let name = format!("tenant_{n:04}");
        let industry = INDUSTRIES[n % INDUSTRIES.len()];
        let tier = TIERS[(n / INDUSTRIES.len()) % TIERS.len()];
        sql.push_str(&format!(
            "CREATE SCHEMA {name};
             CREATE TABLE {name}.work_orders (id bigserial PRIMARY KEY,
               business_id uuid NOT NULL DEFAULT gen_random_uuid(), customer_id bigint NOT NULL,
               priority text NOT NULL, total_amount numeric(12,2) NOT NULL,
               created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {name}.repair_orders (id bigserial PRIMARY KEY,
               business_id uuid NOT NULL DEFAULT gen_random_uuid(), customer_id bigint NOT NULL,
               total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {name}.work_orders (customer_id, priority, total_amount)
               SELECT g % 97, (ARRAY['emergency','urgent','high','normal','low'])[1 + g % 5], g + 0.5
               FROM generate_series(1, {DEMO_ROWS}) g;
             INSERT INTO {name}.repair_orders (customer_id, total_amount)
               SELECT g % 89, g + 0.25 FROM generate_series(1, {DEMO_ROWS}) g;
             INSERT INTO demo.tenants VALUES ('{name}', '{industry}', '{tier}');\n"
        ));
    }
    cluster.psql(shard, &sql).await?;
    Ok(())
}

/// Writes the built-in example under `dir` and returns its path.
fn write_example(dir: &Path) -> std::io::Result<PathBuf> {
    let root = dir.join(EXAMPLE);
    for (path, text) in EXAMPLE_FILES {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    Ok(root)
}

/// Until every shard's agent is attached and has reported its tenants (a plan submitted
/// earlier would find no targets on a shard whose agent is still connecting).
async fn wait_for_fleet(addr: &str, shards: &[String], tenants: usize) -> Result<(), String> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(mut c) = super::call::client(addr).await {
            match c.list_fleet(pb::ListFleetRequest {}).await {
                Ok(reply) => {
                    let agents = reply.into_inner().agents;
                    let ready = shards.iter().all(|shard| {
                        agents
                            .iter()
                            .any(|a| &a.shard == shard && a.connected && a.tenants.len() == tenants)
                    });
                    if ready {
                        println!(
                            "{} agent(s) attached, {} tenants",
                            shards.len(),
                            shards.len() * tenants
                        );
                        return Ok(());
                    }
                    last = format!(
                        "{} of {} agents attached",
                        agents.iter().filter(|a| a.connected).count(),
                        shards.len()
                    );
                }
                Err(e) => last = e.message().to_string(),
            }
        }
        if started.elapsed() > ATTACH_TIMEOUT {
            return Err(format!(
                "the demo fleet's agents did not attach within {}s ({last})",
                ATTACH_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn next_steps(
    addr: &str,
    args: &QuickstartArgs,
    cluster: &PgCluster,
    plan: &Path,
    plan_id: Option<&str>,
    code: u8,
) {
    let program = program_name();
    let flotilla = if addr == "http://127.0.0.1:7070" {
        program
    } else {
        format!("{program} --coordinator {addr}")
    };
    println!();
    match (plan_id, code) {
        (Some(id), EXIT_OK) => {
            println!("The plan {id} is applied on every tenant. Try, in another terminal:")
        }
        (Some(id), _) => println!(
            "The plan {id} did not complete (exit code {code}); look at it, in another terminal:"
        ),
        (None, _) => {
            println!("The plan was not submitted (see the error above). In another terminal:")
        }
    }
    let id = plan_id.unwrap_or("PLAN_ID");
    let tries = [
        (
            format!("{flotilla} plan status {id}"),
            "per migration and target",
        ),
        (
            format!("{flotilla} fleet status"),
            "which tenant is at which migration, who is behind",
        ),
        (
            format!("{flotilla} fleet list"),
            "agents, shards, tenants and their labels",
        ),
        (
            format!("{flotilla} plan rollback {id} --wait"),
            "undo it with the down.sql files",
        ),
        (
            format!(
                "{flotilla} plan submit {} --wait --selector 'industry in (automotive)'",
                plan.display()
            ),
            "again, for one industry",
        ),
        (
            format!("curl -s http://{}/metrics | grep ^flotilla_", args.metrics),
            "what Prometheus scrapes (the coordinator's, and the agents' added up: they share this process; a deployed agent has its own --metrics, its series labelled with its shard, and without etcd its liveness reads 0)",
        ),
        (
            format!("psql {}", cluster.url("shard_0")),
            "a shard: \\dn, \\d tenant_0000.work_orders",
        ),
    ];
    for (cmd, why) in &tries {
        println!("  # {why}\n  {cmd}");
    }
    if args.keep {
        println!("Serving until Ctrl-C; then the directory stays (--keep), PostgreSQL stopped.");
    } else {
        println!("Serving until Ctrl-C; then the fleet and its directory are removed.");
    }
}

/// `flotilla` when that is this program on PATH, else this program's path (as
/// scripts/quickstart.sh runs it from target/).
fn program_name() -> String {
    let this = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("flotilla"))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
    });
    match (this, on_path) {
        (Some(this), Some(found)) if this == found => "flotilla".to_string(),
        (Some(this), _) => this.display().to_string(),
        (None, _) => "flotilla".to_string(),
    }
}

/// The coordinator and the agents of this process.
struct Components {
    store: flotilla_core::secrets::SecretUrl,
    coordinator: JoinHandle<Result<(), flotilla_coordinator::CoordinatorError>>,
    agents: Vec<JoinHandle<()>>,
}

impl Components {
    /// Starts the coordinator, waits until it serves, then starts the agents. Prints
    /// why and returns None when the coordinator cannot start (port taken, bad store).
    async fn start(
        config: CoordinatorConfig,
        agents: Vec<AgentConfig>,
        stop: &Stop,
    ) -> Option<Components> {
        let store = config.store.clone();
        let listen = config.listen;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let coordinator = tokio::spawn(flotilla_coordinator::start(
            config,
            stop.wait(),
            Some(ready_tx),
        ));
        if ready_rx.await.is_err() {
            match coordinator.await {
                Ok(Err(e)) => eprintln!(
                    "error: coordinator on {listen}: {e} (pass --listen/--metrics to use other ports)"
                ),
                _ => eprintln!("error: the coordinator on {listen} stopped before it served"),
            }
            return None;
        }
        let agents = agents
            .into_iter()
            .map(|config| {
                let stopped = stop.wait();
                tokio::spawn(async move {
                    let shard = config.shard.clone();
                    if let Err(e) = flotilla_agent::start(config, stopped).await {
                        error!(%shard, "agent: {e}");
                    }
                })
            })
            .collect();
        Some(Components {
            store,
            coordinator,
            agents,
        })
    }

    /// Waits for every component to end (after [`Stop::now`] or the signal).
    async fn stop(self) -> u8 {
        for agent in self.agents {
            let _ = agent.await;
        }
        match self.coordinator.await {
            Ok(Ok(())) => EXIT_OK,
            Ok(Err(e)) => {
                eprintln!("error: coordinator: {e}");
                EXIT_UNAVAILABLE
            }
            Err(_) => EXIT_UNAVAILABLE,
        }
    }
}

/// The agent of one `--shard NAME=DSN`: the agent's defaults (no etcd, no labels), its
/// password from FLOTILLA_SHARD_PASSWORD, checked as `flotilla agent` checks its flags.
fn given_agent(
    name: &str,
    dsn: &str,
    tenant_pattern: &str,
    coordinator: &str,
) -> Result<AgentConfig, String> {
    flotilla_core::validate_shard_name(name).map_err(|e| format!("--shard: {e}"))?;
    check_dsn_of(
        &format!("--shard {name}=DSN"),
        "FLOTILLA_SHARD_PASSWORD",
        dsn,
    )?;
    let mut config = AgentConfig::new(name, dsn, coordinator);
    config.password = shard_password(None)?;
    config.tenant_pattern = Some(tenant_pattern.to_string());
    config.tls = super::transport::files()
        .client_config()
        .map_err(|e| e.to_string())?;
    Ok(config)
}

/// `--shard NAME=DSN` split in two. The spec holds a DSN, perhaps with a password: an error
/// shows it redacted (a DSN given without its name, `postgres://app:pw@db/x?sslmode=require`,
/// split at its first `=` into a "name" that is most of the DSN).
fn shard_spec(spec: &str) -> Result<(&str, &str), String> {
    match spec.split_once('=') {
        Some((name, dsn)) if !name.contains("://") => Ok((name, dsn)),
        _ => Err(format!(
            "--shard `{}` is not NAME=DSN (the shard's name first, e.g. shard_0=postgres://app@db/shard_0)",
            flotilla_core::secrets::redact_url(spec)
        )),
    }
}

/// `--shard NAME=DSN`: a coordinator and one agent per given shard, nothing else.
async fn given_shards(args: QuickstartArgs, stop: Stop) -> u8 {
    let coordinator = format!("http://{}", args.listen);
    let mut agents = Vec::new();
    for spec in &args.shards {
        let (name, dsn) = match shard_spec(spec) {
            Ok(parts) => parts,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        };
        match given_agent(name, dsn, &args.tenant_pattern, &coordinator) {
            Ok(c) => agents.push(c),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    }
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| "flotilla-quickstart.db".into());
    let store = match super::daemons::store_location(&store, args.store_password_file.as_deref()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let mut config = CoordinatorConfig::new(args.listen, store);
    config.metrics = Some(args.metrics);
    let Some(fleet) = Components::start(config, agents, &stop).await else {
        return EXIT_UNAVAILABLE;
    };
    println!(
        "flotilla quickstart: coordinator on {coordinator}, metrics on http://{}/metrics, {} agent(s); submit with `flotilla --coordinator {coordinator} plan submit DIR --wait`",
        args.metrics,
        args.shards.len(),
    );
    // (as the demo says it: nothing else tells the operator the command stays in front)
    println!(
        "Serving until Ctrl-C; then the coordinator and its agents stop (the shards are yours)."
    );
    stop.wait().await;
    fleet.stop().await
}

#[cfg(test)]
mod tests {
    use super::{given_agent, shard_spec};

    #[test]
    fn a_shard_spec_without_its_name_is_refused_with_its_password_hidden() {
        assert_eq!(
            shard_spec("shard_0=postgres://app@db/s0?sslmode=require"),
            Ok(("shard_0", "postgres://app@db/s0?sslmode=require"))
        );
        for spec in [
            "postgres://app:hunter2@db/s0",
            "postgres://app:hunter2@db/s0?sslmode=require",
        ] {
            let e = shard_spec(spec).unwrap_err();
            assert!(e.contains("is not NAME=DSN"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn a_given_shard_gets_the_agents_defaults_and_its_flags_checks() {
        let c = given_agent(
            "shard_a",
            "postgres://app@127.0.0.1:5432/a",
            "tenant_%",
            "http://127.0.0.1:7070",
        )
        .unwrap();
        assert_eq!(c.shard, "shard_a");
        assert_eq!(c.tenant_pattern.as_deref(), Some("tenant_%"));
        // what `flotilla agent` defaults to
        assert_eq!(c.max_connections, 8);
        assert_eq!(c.lease_ttl, std::time::Duration::from_secs(10));
        assert!(c.etcd.is_empty() && c.labels.is_empty());
        let e = given_agent("a b", "postgres://app@db/a", "t_%", "http://x").unwrap_err();
        assert!(e.starts_with("--shard:"), "{e}");
        let e = given_agent("a", "postgres://app:pw@db/a", "t_%", "http://x").unwrap_err();
        assert!(e.contains("password"), "{e}");
    }
}
