//! Command-line interface: flags, and which command does what.
//!
//! Exit codes: 0 success; 1 the plan failed or was rolled back; 2 bad input
//! (files, flags, a plan the coordinator refused, a command not allowed); 3 Flotilla
//! could not do it (coordinator unreachable, a daemon failed to start); 4 the plan waits
//! for a person (a wave's manual gate, or its approvals).
//!
//! Identity: until operator credentials land, `--actor` (alias `--as`, default $USER) names
//! who asks, on submit as on every command, so a submitter's own approval is refused; and
//! `--role` says in which role an approver approves.
mod daemons;
mod fleet;
mod logging;
mod manual;
mod plan;
mod quickstart;
mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use logging::LogFormat;

pub const EXIT_OK: u8 = 0;
pub const EXIT_PLAN_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_UNAVAILABLE: u8 = 3;
/// `--wait` or `watch` came back because the plan waits for a person: at a wave's manual
/// gate (`flotilla plan promote` lets it go on), or for its approvals (`flotilla plan
/// approve`).
pub const EXIT_WAITING: u8 = 4;
/// `fleet drift` found a target whose schema is not its cohort's (for CI and alerts).
pub const EXIT_DRIFT: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "Roll schema and data migrations across fleets of PostgreSQL shards and tenants",
    long_about = "Roll schema and data migrations across fleets of PostgreSQL shards and tenants: \
all of a coordinated change lands, or none of it does.\n\n\
One binary holds every part: `flotilla coordinator` holds plans, schedules their steps \
(migration x target) and decides commit or abort (run two or more with --etcd for high \
availability: one leads); `flotilla agent` runs beside each shard database and applies the \
steps it is given; the other commands are the operator's, and talk to the coordinators over \
gRPC. `flotilla quickstart` runs a coordinator and its agents in one process to try it out.",
    after_long_help = "Exit codes: 0 success; 1 the plan failed or was rolled back; 2 bad input \
(nothing was changed); 3 Flotilla could not do it (coordinator unreachable, a daemon failed to \
start); 4 the plan waits for a person (a wave's manual gate, or its approvals).\n\n\
`flotilla COMMAND --help` tells more of each command; `flotilla man` prints the manual page."
)]
pub struct Cli {
    /// The coordinator's gRPC address (operator commands).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Runtime worker threads (default: one for an agent and the operator commands,
    /// one per core for the coordinator). An agent mostly waits on its shard; a
    /// second thread only adds context switches next to the database it serves.
    #[arg(long, global = true, env = "FLOTILLA_THREADS")]
    pub threads: Option<usize>,
    /// Log filter, e.g. `info` or `flotilla_agent=debug` (also RUST_LOG; default `info`,
    /// `warn` for the quickstart, whose own output tells the story).
    #[arg(long, global = true, env = "FLOTILLA_LOG")]
    pub log: Option<String>,
    /// Log line format on stderr: `text`, or `json` (one object a line, with plan,
    /// step, shard, tenant and epoch as top-level fields where a line concerns them).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a coordinator.
    Coordinator(CoordinatorArgs),
    /// Run the agent of one shard database.
    Agent(AgentArgs),
    /// Submit, inspect and control plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Inspect the fleet of agents, shards and tenants.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Plan locks on shards: who holds them; break one (audited).
    #[command(subcommand)]
    Locks(LocksCommand),
    /// The audit trail: who submitted, approved, rejected, promoted, cancelled... what.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Try Flotilla with nothing to bring: a throwaway PostgreSQL fleet, a coordinator
    /// and its agents in this process, and the coordinated example rolled across it.
    Quickstart(QuickstartArgs),
    /// Print a shell completion script, e.g. `flotilla completions bash > /etc/bash_completion.d/flotilla`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `flotilla man | man -l -`), or write one page per command.
    Man {
        /// Write `flotilla.1`, `flotilla-plan-submit.1`, ... into this directory instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to listen on for operators and agents.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Control store: a SQLite file (embedded default) or a postgres:// URL.
    #[arg(long, env = "FLOTILLA_STORE", default_value = "flotilla.db")]
    pub store: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Default lock_timeout for steps whose migration does not set one.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,
    /// Default statement_timeout for steps (0s = none).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,
    /// etcd endpoints (comma-separated): leader election, plan locks, agent
    /// liveness, decisions. Without it, one coordinator runs with an embedded backend.
    #[arg(long, env = "FLOTILLA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The address followers tell operators and agents to use for this coordinator
    /// (default http://<listen>).
    #[arg(long)]
    pub advertise: Option<String>,
    /// TTL of the leadership and plan leases in etcd.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How long an agent may be gone before its runs in flight fail.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub agent_grace: Duration,
    /// Environments (comma-separated, `*` = every one) whose completed plans catch up
    /// tenants that appear later, as plans with `catch_up = true` do.
    #[arg(long, env = "FLOTILLA_CATCH_UP", value_delimiter = ',')]
    pub catch_up_environments: Vec<String>,
    /// On SIGTERM or Ctrl-C: how long to hand leadership over and let agents' and
    /// watches' streams end before stopping anyway (logging what was still open).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// The approval matrix: a TOML file of `[[rule]]`s (environment, risk, approvals,
    /// roles, require); a plan whose rule needs approvals waits in `awaiting_approval`.
    /// Checked at start: an error names the file and line.
    #[arg(long, env = "FLOTILLA_APPROVALS")]
    pub approvals: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The shard's name in the fleet.
    #[arg(long)]
    pub shard: String,
    /// The shard database, without a password: postgres://user@host:port/db.
    #[arg(long, env = "FLOTILLA_SHARD_DSN")]
    pub dsn: String,
    /// A file holding the shard password (one line).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Labels of the shard, k=v,k2=v2; tenants inherit them.
    #[arg(long, default_value = "")]
    pub labels: String,
    /// Tenant schemas: a LIKE pattern on schema names, e.g. `tenant_%`.
    #[arg(long)]
    pub tenant_pattern: Option<String>,
    /// Tenant schemas: a query returning the schema name and optionally labels (k=v,... or a JSON object).
    #[arg(long)]
    pub tenant_query: Option<String>,
    /// Connections to the shard, i.e. the most steps running at once.
    #[arg(long, default_value_t = 8)]
    pub max_connections: u32,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// etcd endpoints (comma-separated): the agent keeps a liveness key there
    /// under a lease, so the leader sees when it is gone.
    #[arg(long, env = "FLOTILLA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// TTL of the agent's liveness lease.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How often to look for tenants that appeared or vanished (new ones are caught up
    /// when a plan or the coordinator asks for it) and read the shard again for the
    /// coordinator's fleet view (the whole journal, every target's schema fingerprint).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub discover_interval: Duration,
}

#[derive(Args, Debug)]
pub struct QuickstartArgs {
    /// Where the demo's throwaway PostgreSQL cluster, plan and store go: a new or empty
    /// directory (default: a new one under the system's temp dir). Removed at exit.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the demo's directory at exit (PostgreSQL stopped; the command that starts
    /// it again is printed).
    #[arg(long)]
    pub keep: bool,
    /// Shard databases in the demo fleet.
    #[arg(long, default_value_t = 3)]
    pub demo_shards: usize,
    /// Tenant schemas per shard in the demo fleet.
    #[arg(long, default_value_t = 20)]
    pub demo_tenants: usize,
    /// The plan to roll across the demo fleet (default: the built-in copy of
    /// examples/coord-2025-001, written into the demo's directory).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// No demo: a coordinator and one agent per shard given as NAME=DSN (password from
    /// FLOTILLA_SHARD_PASSWORD); repeat per shard.
    #[arg(long = "shard")]
    pub shards: Vec<String>,
    /// Tenant schemas on the --shard databases, as for `flotilla agent`.
    #[arg(long, default_value = "tenant_%")]
    pub tenant_pattern: String,
    /// Address for the embedded coordinator.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where the process serves Prometheus metrics (coordinator and agents).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: SocketAddr,
    /// Control store for the embedded coordinator (default: flotilla.db in the demo's
    /// directory; flotilla-quickstart.db with --shard).
    #[arg(long)]
    pub store: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Submit a plan: a migration directory, or a plan file.
    Submit(SubmitArgs),
    /// Check a plan on disk without submitting it.
    Lint {
        path: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show a plan's state and progress.
    Status {
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Follow a plan's progress until it ends.
    Watch {
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List recent plans.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Stop a running plan (under all-or-nothing, what it applied is undone).
    Cancel(CommandArgs),
    /// Undo every step a plan applied, in reverse dependency order.
    Rollback(CommandArgs),
    /// Pause a running plan, or one shard of it (`--shard`): data changes stop at their
    /// next batch boundary and no new step starts until `plan resume`.
    Pause(PauseArgs),
    /// Resume a paused plan, or one paused shard of it.
    Resume(PauseArgs),
    /// Let a plan waiting at a wave's manual gate go on to its next wave (audited).
    Promote(DecideArgs),
    /// Stop a running plan where it is: no new step starts, what applied stays; the plan
    /// ends halted (audited).
    Halt(DecideArgs),
    /// Run again the failed and not-run steps of a failed, halted or completed_with_failures
    /// plan, after fixing their cause: the same plan, checksums, waves and budget (audited).
    Retry(RetryArgs),
    /// Approve a plan awaiting approval (audited; never its submitter, and only in a role
    /// its approval rule accepts): the last approval it needs starts it.
    Approve(ApprovalArgs),
    /// Reject a plan awaiting approval (audited): it ends `rejected`, nothing having run.
    Reject(ApprovalArgs),
}

#[derive(Args, Debug)]
pub struct ApprovalArgs {
    pub id: String,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who approves or rejects (recorded in the audit trail; never the plan's submitter).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// The role you approve in (e.g. dba); the plan's approval rule says which count.
    #[arg(long, env = "FLOTILLA_ROLE", default_value = "")]
    pub role: String,
    /// After the last approval: wait until the plan ends.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Entries of the audit trail, oldest first: when, who, what, which plan, detail.
    List {
        /// Only this plan's.
        #[arg(long)]
        plan: Option<String>,
        /// Only since then: a duration back from now (`2h`, `1day`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the latest).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    pub id: String,
    /// Only this target (`shard` or `shard/tenant`); may be given more than once.
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Wait until the plan ends.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct DecideArgs {
    pub id: String,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who decides (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Wait until the plan ends (or waits at its next gate).
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    pub id: String,
    /// Only this shard of the plan.
    #[arg(long)]
    pub shard: Option<String>,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    pub path: PathBuf,
    /// Wait until the plan ends; exit 1 if it failed or was rolled back.
    #[arg(long)]
    pub wait: bool,
    /// Most targets migrating at once (overrides the plan file).
    #[arg(long)]
    pub max_parallel: Option<u32>,
    /// Label selector for targets (overrides the plan file).
    #[arg(long)]
    pub selector: Option<String>,
    /// Failure policy: all-or-nothing, stop, continue (overrides the plan file).
    #[arg(long)]
    pub policy: Option<String>,
    /// Default scope for migrations that do not say: shard or tenant.
    #[arg(long)]
    pub scope: Option<String>,
    /// Run each step in its own transaction instead of one per target.
    #[arg(long)]
    pub no_fuse: bool,
    /// Commit atomically across shards: every target's transactional steps end in
    /// PREPARE TRANSACTION and one decision commits or aborts them all.
    #[arg(long)]
    pub atomic: bool,
    /// Who submits (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct CommandArgs {
    pub id: String,
    /// Cancel only this shard of the plan (policies stop and continue; the other shards go
    /// on). Not for rollback.
    #[arg(long)]
    pub shard: Option<String>,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Wait until the plan ends.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum LocksCommand {
    /// Shards locked by running plans, with the plan and its lease.
    List {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Delete a shard's lock whoever holds it (recorded in the audit trail).
    Break {
        shard: String,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
        /// Who breaks it (recorded in the audit trail).
        #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
        actor: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Agents, their shards, tenants and labels, connected or not.
    List {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Where the fleet is: targets grouped by what their journals hold, what they lack of
    /// completed plans, checksum mismatches, and the last failures.
    Status {
        /// Only the targets this label selector takes, e.g. `industry in (automotive)`.
        #[arg(long)]
        selector: Option<String>,
        /// A migration directory (or plan file): journal rows whose checksum is not its
        /// files' are reported as mismatches.
        #[arg(long)]
        against: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Schema drift: within each cohort (targets with the same migrations applied), the
    /// schema fingerprints the agents read from the catalog, and the targets whose shape is
    /// not the majority's, with what differs. Exits 1 when there is drift, 0 when none.
    Drift {
        /// Only the targets this label selector takes, e.g. `region in (eu)`.
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// One target: its journal, pending migrations, labels, mismatches, last failure.
    Show {
        /// `shard/tenant`, `shard` (the shard itself), or a tenant name on one shard only.
        target: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

impl Cli {
    pub fn worker_threads(&self) -> Option<usize> {
        match (&self.command, self.threads) {
            (_, Some(n)) => Some(n.max(1)),
            (Command::Coordinator(_) | Command::Quickstart(_), None) => None,
            (_, None) => Some(1),
        }
    }
}

pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Quickstart(_) => "warn",
        _ => "info",
    };
    logging::init(cli.log.as_deref().unwrap_or(default), cli.log_format);
}

pub async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Coordinator(args) => daemons::coordinator(args).await,
        Command::Agent(args) => daemons::agent(args, &cli.coordinator).await,
        Command::Quickstart(args) => quickstart::quickstart(args).await,
        Command::Plan(cmd) => plan::run(&cli.coordinator, cmd).await,
        Command::Fleet(FleetCommand::List { output }) => {
            plan::fleet_list(&cli.coordinator, output).await
        }
        Command::Fleet(FleetCommand::Status {
            selector,
            against,
            output,
        }) => fleet::status(&cli.coordinator, selector, against, output).await,
        Command::Fleet(FleetCommand::Drift { selector, output }) => {
            fleet::drift(&cli.coordinator, selector, output).await
        }
        Command::Fleet(FleetCommand::Show { target, output }) => {
            fleet::show(&cli.coordinator, target, output).await
        }
        Command::Locks(cmd) => plan::locks(&cli.coordinator, cmd).await,
        Command::Audit(AuditCommand::List {
            plan,
            since,
            limit,
            output,
        }) => plan::audit(&cli.coordinator, plan, since, limit, output).await,
        Command::Completions { shell } => manual::completions(shell),
        Command::Man { out_dir } => manual::man(out_dir.as_deref()),
    }
}
