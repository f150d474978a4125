//! Command-line interface: flags, and which command does what.
//!
//! Exit codes: 0 success; 1 the plan failed or was rolled back; 2 bad input
//! (files, flags, a plan the coordinator refused, a command not allowed); 3 Flotilla
//! could not do it (coordinator unreachable, a daemon failed to start); 4 the plan waits
//! for a person (a wave's manual gate, or its approvals).
//!
//! Identity: with `--token-file` (or FLOTILLA_TOKEN_FILE) every request carries the
//! operator's bearer token and the coordinator takes who acts, and an approver's roles,
//! from it. With authentication off, `--actor` (alias `--as`, default $USER) names who
//! asks, on submit as on every command, so a submitter's own approval is refused; and
//! `--role` says in which role an approver approves.
mod baseline;
mod call;
mod daemons;
mod env;
mod explain;
mod fleet;
mod logging;
mod manual;
mod operators;
mod plan;
mod plan_test;
mod quickstart;
mod render;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use flotilla_core::secrets::SecretUrl;

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
/// `plan lint` found an error (a warning alone exits 0).
pub const EXIT_LINT_ERRORS: u8 = 1;

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
    /// The coordinator's gRPC address, or a comma-separated list of them. For operator
    /// commands a bare HOST:PORT means https:// when --tls-ca is given, else http://.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Runtime worker threads (default: one for an agent and the operator commands,
    /// one per core for the coordinator). An agent mostly waits on its shard; a
    /// second thread only adds context switches next to the database it serves. With
    /// one, everything runs on the process's own thread.
    #[arg(long, global = true, env = "FLOTILLA_THREADS")]
    pub threads: Option<usize>,
    /// A file holding the operator's bearer token (from `flotilla operator add`), sent
    /// with every operator command. Never the token itself on the command line.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
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
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// TLS on gRPC: the coordinator's listener, and the agent's and operator commands'
/// connections to it (`https://` addresses).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process: the coordinator's server certificate, or an
    /// agent's or operator's client certificate (an agent's names its shard: URI SAN
    /// `flotilla-agent:<shard>`).
    #[arg(long, global = true, env = "FLOTILLA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "FLOTILLA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: on the coordinator, client certificates signed by it are
    /// required (mTLS); on an agent or the CLI, the coordinator's certificate must be
    /// signed by it.
    #[arg(long, global = true, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> flotilla_core::tls::TlsFiles {
        flotilla_core::tls::TlsFiles::new(
            "tls",
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )
    }
}

/// etcd over TLS and with a user (coordinator and agent).
#[derive(Args, Debug, Clone, Default)]
pub struct EtcdSecurityArgs {
    /// PEM CA certificate that signed etcd's server certificates (`https://` endpoints).
    #[arg(long, env = "FLOTILLA_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key), when etcd requires one.
    #[arg(long, env = "FLOTILLA_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "FLOTILLA_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd with auth enabled); the password comes from --etcd-password-file.
    #[arg(long, env = "FLOTILLA_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (its first line that is not blank); never on the command line.
    #[arg(long, env = "FLOTILLA_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    pub fn files(&self) -> flotilla_core::tls::TlsFiles {
        flotilla_core::tls::TlsFiles::new(
            "etcd",
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
            self.etcd_ca.clone(),
        )
    }

    /// The etcd user and password, read from the file.
    pub fn credentials(&self) -> Result<Option<flotilla_core::tls::Credentials>, String> {
        match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(path)) => {
                flotilla_core::tls::Credentials::from_file(user, "--etcd-password-file", path)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(None),
        }
    }
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
    /// Environments (the coordinator's --environments): their shards, latest plans, and
    /// the migrations that have completed in each.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Operator identities: add one (its token is shown once), list, revoke (admin).
    #[command(subcommand)]
    Operator(OperatorCommand),
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
    /// Control store: a SQLite file or sqlite:// URL (embedded default; created when
    /// missing), or a postgres:// URL without a password (see --store-password-file).
    #[arg(long, env = "FLOTILLA_STORE", default_value = "flotilla.db")]
    pub store: SecretUrl,
    /// A file holding the password of a postgres:// store (its first line that is not blank); else
    /// FLOTILLA_STORE_PASSWORD, else a pgpass file. Never in --store: argv is readable by
    /// every local user.
    #[arg(long)]
    pub store_password_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464): `/metrics`, with
    /// `/healthz` and `/readyz` (the leader, its store answering) for HTTP probes.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Also serve the gRPC health service alone (grpc.health.v1.Health), in plaintext, on
    /// this address (e.g. 0.0.0.0:7071): for probes that present no client certificate
    /// (Kubernetes' grpc probes, load balancers) when --listen requires one. It tells only
    /// SERVING or NOT_SERVING per service.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Default lock_timeout for steps whose migration does not set one (at least 1ms).
    #[arg(long, default_value = "10s", value_parser = step_lock_timeout)]
    pub lock_timeout: Duration,
    /// Default statement_timeout for steps (0s = none).
    #[arg(long, default_value = "0s", value_parser = step_statement_timeout)]
    pub statement_timeout: Duration,
    /// etcd endpoints (comma-separated): leader election, plan locks, agent
    /// liveness, decisions. Without it, one coordinator runs with an embedded backend.
    #[arg(long, env = "FLOTILLA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The address followers tell operators and agents to use for this coordinator
    /// (default http://<listen>, or https://<listen> with --tls-cert).
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
    /// Environments in promotion order, comma-separated (e.g. dev,staging,production): a
    /// plan for one touches only its shards, and only once its migrations completed in the
    /// one before. Without it (and --environments-file), a plan's environment is a name only.
    #[arg(
        long,
        env = "FLOTILLA_ENVIRONMENTS",
        value_delimiter = ',',
        conflicts_with = "environments_file"
    )]
    pub environments: Vec<String>,
    /// The environments from a TOML file: `environments = ["dev", "staging", "production"]`
    /// and optionally `label = "env"`. Checked at start.
    #[arg(long, env = "FLOTILLA_ENVIRONMENTS_FILE")]
    pub environments_file: Option<PathBuf>,
    /// The shard label (agent `--labels`) whose value names a shard's environment.
    #[arg(long, default_value = "env")]
    pub environment_label: String,
    /// When operators must authenticate: `auto` once the control store holds an operator
    /// (`flotilla operator add`; a warning at start until then), `required` always.
    #[arg(long, env = "FLOTILLA_AUTH", value_enum, default_value = "auto")]
    pub auth: AuthArg,
    /// Under mTLS, a TOML file mapping certificate common names to shards
    /// (`"agent-eu-1.example.com" = "eu-1"`), for agent certificates without a
    /// `flotilla-agent:<shard>` URI SAN.
    #[arg(long, env = "FLOTILLA_AGENT_IDENTITIES")]
    pub agent_identities: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback --listen address (refused without it):
    /// only behind a network that is itself private and trusted.
    #[arg(long, env = "FLOTILLA_INSECURE")]
    pub insecure: bool,
    #[command(flatten)]
    pub etcd_security: EtcdSecurityArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum AuthArg {
    Auto,
    Required,
}

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Add an operator; its bearer token is shown once (the coordinator keeps a hash).
    /// The first admin: `flotilla operator add NAME --role admin --store URL`.
    Add {
        /// The operator's name (what the audit trail records): letters, digits, `-_.@`.
        name: String,
        /// viewer (read), operator (submit, pause, resume, cancel, retry, promote,
        /// rollback, halt), approver (approve, reject), admin (all, lock breaks, forget-shard, operators).
        #[arg(long)]
        role: String,
        /// A role of the approval matrix this operator approves in (e.g. dba); repeat or
        /// comma-separate. Needs role approver or admin.
        #[arg(long = "approval-role", value_delimiter = ',')]
        approval_roles: Vec<String>,
        /// Write straight into this control store (SQLite path or postgres:// URL) instead
        /// of asking a coordinator: for the first admin, needing no credential.
        #[arg(long)]
        store: Option<String>,
        /// With --store: make the SQLite store when the file does not exist yet (before the
        /// coordinator's first start); without it a missing file is refused, a mistyped path
        /// would make a store no coordinator reads.
        #[arg(long, requires = "store")]
        create: bool,
        /// Write the token into this new file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Operators, their roles and whether they are revoked.
    List {
        /// Read this control store directly instead of asking a coordinator.
        #[arg(long)]
        store: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Revoke an operator: its token stops working at once (audited).
    Revoke {
        /// The operator to revoke.
        name: String,
        /// Write straight into this control store instead of asking a coordinator.
        #[arg(long)]
        store: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The shard's name in the fleet.
    #[arg(long)]
    pub shard: String,
    /// The shard database, without a password: postgres://user@host:port/db.
    #[arg(long, env = "FLOTILLA_SHARD_DSN")]
    pub dsn: String,
    /// A file holding the shard password (its first line that is not blank).
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
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465): `/metrics`, with
    /// `/healthz` and `/readyz` (attached to the leader). One port per agent: agents of
    /// several shards on one host each need their own.
    #[arg(long, env = "FLOTILLA_METRICS")]
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
    /// With --etcd: how often the agent resolves, from their decisions in etcd, Flotilla's
    /// prepared transactions left prepared a whole period after their decision (one the
    /// coordinator missed), connected or not.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub in_doubt_sweep: Duration,
    #[command(flatten)]
    pub etcd_security: EtcdSecurityArgs,
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
    /// The port the demo's PostgreSQL listens on, 127.0.0.1 only (default: a free one).
    #[arg(long)]
    pub pg_port: Option<u16>,
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
    /// directory; flotilla-quickstart.db with --shard), as for `flotilla coordinator`.
    #[arg(long)]
    pub store: Option<SecretUrl>,
    /// A file holding the password of a postgres:// --store (its first line that is not blank).
    #[arg(long)]
    pub store_password_file: Option<PathBuf>,
}

/// Optional lint rule sets (`plan lint --rules`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RuleSet {
    /// Migration ids as <version>_<snake_case_description>, and a description given.
    Naming,
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
    /// The dry run: what a submit would do, touching nothing. The coordinator resolves the
    /// plan's targets and waves, the agents read the sizes of the relations its statements
    /// lock; prints the statements, their locks, sizes, waves and an estimated duration.
    /// The same as `plan submit PATH --dry-run`.
    // (a submit's own flags do not apply to a dry run: kept out of its help)
    #[command(
        mut_arg("wait", |a| a.hide(true)),
        mut_arg("request_id", |a| a.hide(true)),
        mut_arg("dry_run", |a| a.hide(true))
    )]
    Explain(SubmitArgs),
    /// Check a plan on disk without submitting it: its files, its graph, and the lint's
    /// rules on its SQL (read with PostgreSQL's parser). Exits 1 when the lint finds an
    /// error (the coordinator would refuse the plan), 0 with warnings only.
    Lint {
        path: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Lint as `plan submit --atomic` would run it (one atomic unit): what an atomic
        /// unit cannot hold is an error.
        #[arg(long)]
        atomic: bool,
        /// Optional rule sets to check as well: `naming` (the naming standards: id is
        /// <version>_<description>, a description is given).
        #[arg(long, value_enum, value_delimiter = ',')]
        rules: Vec<RuleSet>,
        /// Default scope for migrations that do not say, as `plan submit --scope` gives it:
        /// shard, tenant or auto (the lint says then what depends on the fleet as warnings:
        /// `tenant-escape`).
        #[arg(long)]
        scope: Option<String>,
    },
    /// Rehearse a plan on a scratch database, without a coordinator (for CI): each
    /// migration up, verify, down (the schema must be as before up), up and verify again,
    /// and its `[test]` checked. Exit 1 names the migration and what differs.
    Test(TestArgs),
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
        /// The newest this many (1 to 1000; the coordinator keeps no more in one answer).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Stop a running plan (under all-or-nothing, what it applied is undone).
    Cancel(CancelArgs),
    /// Undo every step a plan applied, in reverse dependency order.
    Rollback(RollbackArgs),
    /// Pause a running plan, or one shard of it (`--shard`): data changes stop at their
    /// next batch boundary and no new step starts until `plan resume`.
    Pause(PauseArgs),
    /// Resume a paused plan, or one paused shard of it.
    Resume(PauseArgs),
    /// Let a plan waiting at a wave's manual gate go on to its next wave (audited).
    Promote(PromoteArgs),
    /// Stop a running plan where it is: no new step starts, what applied stays; the plan
    /// ends halted (audited).
    Halt(DecideArgs),
    /// Stop waiting for one shard of a plan that is committing its atomic decision, when that
    /// shard's agent is gone for good (admin; audited): its part fails as not confirmed, the
    /// plan ends failed once the other shards have committed, and its locks are released.
    /// The decision stays in etcd: an agent that comes back commits the shard's part from it.
    /// A plan rolling back likewise stops waiting for the shard: what it applied there is not
    /// undone (a failure each), and the plan ends rollback_failed once the others are undone.
    ForgetShard(ForgetShardArgs),
    /// Run again the failed and not-run steps of a failed, halted or completed_with_failures
    /// plan, after fixing their cause: the same plan, checksums, waves and budget (audited).
    Retry(RetryArgs),
    /// Approve a plan awaiting approval (audited; never its submitter, and only in a role
    /// its approval rule accepts): the last approval it needs starts it.
    Approve(ApprovalArgs),
    /// Reject a plan awaiting approval (audited): it ends `rejected`, nothing having run.
    Reject(RejectArgs),
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

/// `plan reject`: no role (any operator who may approve may reject, and the plan's rule
/// counts approvals only) and nothing to wait for (the plan ends at once).
#[derive(Args, Debug)]
pub struct RejectArgs {
    pub id: String,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who rejects (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
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
        /// At most this many (the latest; at least 1).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
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
    /// Run again though other plans applied migrations on the targets since this plan was
    /// submitted (refused otherwise, naming them: its steps would apply older migrations
    /// over theirs); recorded in the audit trail.
    #[arg(long)]
    pub ignore_later_plans: bool,
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
pub struct PromoteArgs {
    #[command(flatten)]
    pub decide: DecideArgs,
    /// Only this wave's gate: a promote sent again (a pipeline's retry) once that wave has
    /// passed changes nothing, and one sent before it waits at its gate is refused. Without
    /// it, whichever wave waits is promoted (a retry could release the next wave's gate).
    #[arg(long)]
    pub wave: Option<String>,
}

#[derive(Args, Debug)]
pub struct ForgetShardArgs {
    pub id: String,
    /// The shard whose agent will not come back.
    #[arg(long)]
    pub shard: String,
    /// Why (recorded in the audit trail and in the plan's failures).
    #[arg(long)]
    pub reason: String,
    /// Who forgets it (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Wait until the plan ends (`failed`, once the other shards have committed).
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
    /// This submission's id (default: a new one per invocation). A submit sent again with
    /// the id of one that stored its plan answers with that plan instead of starting a
    /// second: give the same id to every attempt of a pipeline that retries the command.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Submit nothing: show what the plan would do (as `plan explain`).
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// Most targets migrating at once, 1 to 10000 (overrides the plan file).
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
    #[command(flatten)]
    pub promotion: PromotionArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Which environment a plan is for, and the promotion gate's audited override.
#[derive(Args, Debug, Default, Clone)]
pub struct PromotionArgs {
    /// The environment the plan is for (overrides the plan file's `environment`).
    #[arg(long)]
    pub environment: Option<String>,
    /// Admit the plan although its migrations have not all completed in the environment
    /// before its own; needs --reason, and is recorded in the audit trail.
    #[arg(long, requires = "reason")]
    pub skip_promotion_check: bool,
    /// Why the promotion check is skipped (recorded in the audit trail).
    #[arg(long, requires = "skip_promotion_check")]
    pub reason: Option<String>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// A migration directory or a plan file.
    pub path: PathBuf,
    /// The scratch database, without a password: postgres://user@host:port/db. It must
    /// hold no `flotilla` schema (not a shard); what the test creates there is removed.
    #[arg(long, env = "FLOTILLA_TEST_DSN")]
    pub dsn: String,
    /// A file holding the database password (its first line that is not blank); or FLOTILLA_SHARD_PASSWORD.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Run tenant-scoped migrations in this existing schema (kept) instead of a scratch
    /// tenant schema created and dropped by the test.
    #[arg(long)]
    pub tenant: Option<String>,
    /// SQL run in the tenant schema before the first migration: the tables the plan's
    /// migrations expect (e.g. a schema dump of one tenant).
    #[arg(long)]
    pub seed: Option<PathBuf>,
    /// Default scope for migrations that do not say: shard or tenant (overrides the plan file).
    #[arg(long)]
    pub scope: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Per environment, in promotion order: its shards, its latest plans, and the
    /// migrations that have completed there.
    Status {
        /// Latest plans shown per environment (1 to 1000).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        plans: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub id: String,
    /// Cancel only this shard of the plan (policies stop and continue; the other shards go
    /// on).
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

#[derive(Args, Debug)]
pub struct RollbackArgs {
    pub id: String,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks (recorded in the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Rollback of a plan that ended only: undo with the down.sql of this plan directory's
    /// migrations (the plan's, by id, with the same up SQL) instead of the stored ones, for
    /// a rollback that failed on a down.sql fixed since. Stored and audited.
    #[arg(long, value_name = "DIR")]
    pub down_from: Option<PathBuf>,
    /// Roll back a plan that ended though later plans applied migrations on its targets
    /// after it (refused otherwise, naming them: its down SQL may take their changes with
    /// it); recorded in the audit trail.
    #[arg(long)]
    pub ignore_later_plans: bool,
    /// Wait until the plan ends.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// A cancel or a rollback, as sent: each takes only its own flags (`--shard` is a cancel's,
/// `--down-from` a rollback's; both showed in each one's help, refused when given).
#[derive(Debug)]
pub struct CommandArgs {
    pub id: String,
    pub shard: Option<String>,
    pub reason: String,
    pub actor: String,
    pub down_from: Option<PathBuf>,
    pub ignore_later_plans: bool,
    pub wait: bool,
    pub output: Output,
}

impl From<CancelArgs> for CommandArgs {
    fn from(a: CancelArgs) -> Self {
        CommandArgs {
            id: a.id,
            shard: a.shard,
            reason: a.reason,
            actor: a.actor,
            down_from: None,
            ignore_later_plans: false,
            wait: a.wait,
            output: a.output,
        }
    }
}

impl From<RollbackArgs> for CommandArgs {
    fn from(a: RollbackArgs) -> Self {
        CommandArgs {
            id: a.id,
            shard: None,
            reason: a.reason,
            actor: a.actor,
            down_from: a.down_from,
            ignore_later_plans: a.ignore_later_plans,
            wait: a.wait,
            output: a.output,
        }
    }
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
        /// Why (recorded in the audit trail; required: breaking a plan's lock overrides it).
        #[arg(long)]
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
    /// Adopt a fleet another tool migrated: record in each target's journal the migrations
    /// its dbmate, golang-migrate or Flyway history says ran there (or every migration up
    /// to one, --up-to), running none of them. Refused, writing nothing, when a history is
    /// dirty or failed anywhere.
    Baseline(BaselineArgs),
    /// Admin: take a shard whose agent is gone for good (its database decommissioned) out of
    /// the fleet, so plans stop counting it as unreachable. Refused while its agent is
    /// attached or alive, and while a plan not ended has steps there. Audited.
    Retire {
        shard: String,
        /// Why (recorded in the audit trail; required).
        #[arg(long)]
        reason: String,
        /// Who retires it (recorded in the audit trail).
        #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
        actor: String,
    },
    /// One target: its journal, pending migrations, labels, mismatches, last failure.
    Show {
        /// `shard/tenant`, `shard` (the shard itself), or a tenant name on one shard only.
        target: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct BaselineArgs {
    /// The migration directory (or plan file) the other tool ran.
    pub path: PathBuf,
    /// Whose history to read: dbmate, golang-migrate, flyway, or auto (the table found on
    /// each target).
    #[arg(long, default_value = "auto", value_parser = ["auto", "dbmate", "golang-migrate", "flyway"])]
    pub from: String,
    /// Read no history: take every migration up to this id as applied (a fleet migrated by
    /// hand).
    #[arg(long)]
    pub up_to: Option<String>,
    /// Only the targets this label selector takes.
    #[arg(long)]
    pub selector: Option<String>,
    /// Say per target what would be recorded and what would stay pending; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who records it (the audit trail).
    #[arg(long, visible_alias = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Why (the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// A step's default lock_timeout: at least 1ms (0 is PostgreSQL's "wait forever": a step
/// would wait for its lock with the application's queries queued behind it) and at most
/// PostgreSQL's limit (a longer one fails every step's `SET`).
fn step_lock_timeout(text: &str) -> Result<Duration, String> {
    let d = step_statement_timeout(text)?;
    if d < Duration::from_millis(1) {
        return Err(
            "must be at least 1ms: 0 would let a step wait for its lock forever, the application's queries queued behind it"
                .into(),
        );
    }
    Ok(d)
}

/// A step's default statement_timeout: 0 for none, at most PostgreSQL's limit.
fn step_statement_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| e.to_string())?;
    match flotilla_core::timeout_over_limit(d.as_millis()) {
        Some(why) => Err(why),
        None => Ok(d),
    }
}

impl Cli {
    /// Whether this is a command that prints and ends (not a daemon: the coordinator, an
    /// agent, the quickstart), whose output may go to `head`.
    pub fn prints_and_ends(&self) -> bool {
        !matches!(
            self.command,
            Command::Coordinator(_) | Command::Agent(_) | Command::Quickstart(_)
        )
    }

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
        // the quickstart's and `plan test`'s own output tells the story
        Command::Quickstart(_) | Command::Plan(PlanCommand::Test(_)) => "warn",
        _ => "info",
    };
    logging::init(cli.log.as_deref().unwrap_or(default), cli.log_format);
}

pub async fn run(cli: Cli) -> u8 {
    let operator_command = matches!(
        cli.command,
        Command::Plan(_)
            | Command::Fleet(_)
            | Command::Env(_)
            | Command::Locks(_)
            | Command::Audit(_)
            | Command::Operator(_)
    );
    if operator_command && let Err(e) = call::set_credential(cli.token_file.as_deref()) {
        eprintln!("error: {e}");
        return EXIT_BAD_INPUT;
    }
    // The key of this process's certificate, as the other credential files: said once,
    // in a daemon's log or on an operator command's stderr.
    if let Some(key) = &cli.tls.tls_key {
        if matches!(cli.command, Command::Coordinator(_) | Command::Agent(_)) {
            daemons::warn_if_open_to_others("--tls-key", key);
        } else if let Some(w) = flotilla_core::credential_files::exposure_warning("--tls-key", key)
        {
            eprintln!("warning: {w}");
        }
    }
    transport::init(cli.tls.files());
    match cli.command {
        Command::Operator(cmd) => operators::run(&cli.coordinator, cmd).await,
        Command::Coordinator(args) => daemons::coordinator(args, cli.tls.files()).await,
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
        Command::Fleet(FleetCommand::Baseline(args)) => {
            baseline::baseline(&cli.coordinator, args).await
        }
        Command::Fleet(FleetCommand::Show { target, output }) => {
            fleet::show(&cli.coordinator, target, output).await
        }
        Command::Fleet(FleetCommand::Retire {
            shard,
            reason,
            actor,
        }) => fleet::retire(&cli.coordinator, shard, reason, actor).await,
        Command::Locks(cmd) => plan::locks(&cli.coordinator, cmd).await,
        Command::Audit(AuditCommand::List {
            plan,
            since,
            limit,
            output,
        }) => plan::audit(&cli.coordinator, plan, since, limit, output).await,
        Command::Env(EnvCommand::Status { plans, output }) => {
            env::status(&cli.coordinator, plans, output).await
        }
        Command::Completions { shell } => manual::completions(shell),
        Command::Man { out_dir } => manual::man(out_dir.as_deref()),
    }
}

#[cfg(test)]
mod step_timeout_tests {
    use super::*;

    #[test]
    fn a_coordinators_step_timeouts_are_ones_postgresql_takes() {
        assert_eq!(step_lock_timeout("10s"), Ok(Duration::from_secs(10)));
        assert!(
            step_lock_timeout("0s")
                .unwrap_err()
                .contains("at least 1ms")
        );
        assert!(
            step_lock_timeout("30days")
                .unwrap_err()
                .contains("over PostgreSQL's limit")
        );
        assert_eq!(step_statement_timeout("0s"), Ok(Duration::ZERO));
        assert!(step_statement_timeout("25days").is_err());
        assert!(step_statement_timeout("soon").is_err());
        // and through clap, as an operator types it
        let refused = Cli::try_parse_from(["flotilla", "coordinator", "--lock-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--lock-timeout"), "{refused}");
    }

    /// A cancel takes `--shard` and a rollback `--down-from`, each only its own (both showed
    /// in each one's help, and were refused when given).
    #[test]
    fn cancel_and_rollback_take_only_their_own_flags() {
        let ok = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(ok(&["flotilla", "plan", "cancel", "p1", "--shard", "s0"]).is_ok());
        assert!(ok(&["flotilla", "plan", "rollback", "p1", "--down-from", "d"]).is_ok());
        let e = ok(&["flotilla", "plan", "rollback", "p1", "--shard", "s0"]).unwrap_err();
        assert!(e.contains("--shard"), "{e}");
        let e = ok(&["flotilla", "plan", "cancel", "p1", "--down-from", "d"]).unwrap_err();
        assert!(e.contains("--down-from"), "{e}");
    }

    /// `plan list --limit` is 1 to 1000: 0 listed 50 and 5000 listed 1000, saying nothing.
    #[test]
    fn plan_list_limits_are_what_they_list() {
        let parsed = |n: &str| {
            Cli::try_parse_from(["flotilla", "plan", "list", "--limit", n])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parsed("1").is_ok());
        assert!(parsed("1000").is_ok());
        for n in ["0", "1001"] {
            let e = parsed(n).unwrap_err();
            assert!(e.contains("--limit") && e.contains("1..=1000"), "{e}");
        }
        // its siblings: `audit list --limit 0` listed everything, `env status --plans 0`
        // showed 5 plans
        let refused = |args: &[&str]| Cli::try_parse_from(args).map(|_| ()).is_err();
        assert!(refused(&["flotilla", "audit", "list", "--limit", "0"]));
        assert!(!refused(&["flotilla", "audit", "list", "--limit", "5000"]));
        assert!(refused(&["flotilla", "env", "status", "--plans", "0"]));
        assert!(!refused(&["flotilla", "env", "status", "--plans", "3"]));
    }
}
