//! Agents that connect as the least-privileged role of `deploy/sql/agent-role.sql` instead
//! of the cluster's superuser: the role the README tells operators to create, so the suites
//! that run with it prove that it is enough (DDL on the tenants, batched data changes,
//! two-phase commit and its recovery).
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use flotilla_testkit::PgCluster;
use flotilla_testkit::postgres::PgBins;

/// The script, as shipped.
pub fn agent_role_sql() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/agent-role.sql")
}

/// How an agent logs in as its shard's role.
#[derive(Debug, Clone)]
pub struct AgentLogin {
    pub role: String,
    /// `postgres://ROLE@127.0.0.1:PORT/DB`, without the password.
    pub dsn: String,
    /// A file holding the password (the `--password-file`).
    pub password_file: PathBuf,
}

/// The role of shard database `db`: `flotilla_agent_<db>`.
pub fn role_of(db: &str) -> String {
    format!("flotilla_agent_{db}")
}

/// Runs `deploy/sql/agent-role.sql` on `db` as the superuser, with `-v role=...`,
/// `-v tenant_pattern=...`, `-v restrict_connect=on` and the password in
/// FLOTILLA_AGENT_PASSWORD (as the script reads it); writes the password into
/// `secrets_dir/<db>.password`.
pub async fn create_agent_role(
    pg: &PgCluster,
    db: &str,
    tenant_pattern: &str,
    password: &str,
    secrets_dir: &Path,
) -> anyhow::Result<AgentLogin> {
    let role = role_of(db);
    run_script(pg, db, &role, tenant_pattern, Some(password)).await?;
    let password_file = secrets_dir.join(format!("{db}.password"));
    std::fs::write(&password_file, format!("{password}\n"))
        .with_context(|| format!("writing {}", password_file.display()))?;
    Ok(AgentLogin {
        dsn: format!("postgres://{role}@127.0.0.1:{}/{db}", pg.port()),
        role,
        password_file,
    })
}

/// The script itself, through psql; its output (a summary line) on success.
pub async fn run_script(
    pg: &PgCluster,
    db: &str,
    role: &str,
    tenant_pattern: &str,
    password: Option<&str>,
) -> anyhow::Result<String> {
    let psql = PgBins::locate()?.psql;
    let port = pg.port().to_string();
    let mut cmd = tokio::process::Command::new(psql);
    cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", db])
        .args(["-v", &format!("role={role}")])
        .args(["-v", &format!("tenant_pattern={tenant_pattern}")])
        .args(["-v", "restrict_connect=on"])
        .arg("-f")
        .arg(agent_role_sql())
        .env_remove("PGPASSWORD")
        .env_remove("FLOTILLA_AGENT_PASSWORD")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(password) = password {
        cmd.env("FLOTILLA_AGENT_PASSWORD", password);
    }
    let out = cmd.output().await.context("running psql")?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!(
            "agent-role.sql on {db} failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}
