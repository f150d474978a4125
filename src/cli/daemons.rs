//! `flotilla coordinator`, `flotilla agent`: thin wrappers over each library's
//! `start(config, shutdown)`.
use flotilla_agent::AgentConfig;
use flotilla_coordinator::CoordinatorConfig;
use tracing::{error, info};

use super::{AgentArgs, CoordinatorArgs, EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE};

/// Resolves on SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutting down");
}

pub async fn coordinator(args: CoordinatorArgs) -> u8 {
    let mut config = CoordinatorConfig::new(args.listen, args.store);
    config.metrics = args.metrics;
    config.lock_timeout = args.lock_timeout;
    config.statement_timeout = args.statement_timeout;
    config.etcd = args.etcd;
    config.advertise = args.advertise;
    config.lease_ttl = args.lease_ttl;
    config.agent_grace = args.agent_grace;
    config.catch_up_environments = args.catch_up_environments;
    config.shutdown_grace = args.shutdown_grace;
    if let Some(path) = &args.approvals {
        // Checked before anything starts: a coordinator with a wrong matrix would let
        // unapproved plans through, or hold every plan.
        match flotilla_coordinator::approvals::Matrix::load(path) {
            Ok(m) => {
                info!(rules = m.rules.len(), file = %path.display(), "approval matrix loaded");
                config.approvals = m;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    }
    match flotilla_coordinator::start(config, shutdown_signal(), None).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            error!("coordinator: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

/// The shard password: a file, or FLOTILLA_SHARD_PASSWORD; never argv.
fn shard_password(args: &AgentArgs) -> Result<Option<String>, String> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--password-file {}: {e}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(std::env::var("FLOTILLA_SHARD_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty()))
}

/// A DSN with a password in it would sit in argv, visible to every local user.
fn check_dsn(dsn: &str) -> Result<(), String> {
    let rest = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
        .ok_or_else(|| "--dsn must be a postgres:// URL".to_string())?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        return Err("--dsn holds a password; pass it with --password-file or FLOTILLA_SHARD_PASSWORD instead".into());
    }
    if dsn.contains("password=") {
        return Err("--dsn holds a password parameter; pass it with --password-file or FLOTILLA_SHARD_PASSWORD instead".into());
    }
    Ok(())
}

pub(super) fn agent_config(args: &AgentArgs, coordinator: &str) -> Result<AgentConfig, String> {
    flotilla_core::validate_shard_name(&args.shard).map_err(|e| format!("--shard: {e}"))?;
    check_dsn(&args.dsn)?;
    let labels = flotilla_core::parse_labels(&args.labels).map_err(|e| format!("--labels: {e}"))?;
    if args.max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    let mut config = AgentConfig::new(
        args.shard.clone(),
        args.dsn.clone(),
        coordinator.to_string(),
    );
    config.password = shard_password(args)?;
    config.labels = labels;
    config.tenant_pattern = args.tenant_pattern.clone();
    config.tenant_query = args.tenant_query.clone();
    config.max_connections = args.max_connections;
    config.etcd = args.etcd.clone();
    config.lease_ttl = args.lease_ttl;
    config.discover_interval = args.discover_interval;
    Ok(config)
}

pub async fn agent(args: AgentArgs, coordinator: &str) -> u8 {
    // One exporter serves whatever the process records (here: flotilla_agent_*).
    if let Err(e) = flotilla_coordinator::metrics::install_agent(args.metrics, &args.shard) {
        eprintln!("error: --metrics: {e}");
        return EXIT_BAD_INPUT;
    }
    let config = match agent_config(&args, coordinator) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    match flotilla_agent::start(config, shutdown_signal()).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            error!("agent: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_dsn;

    #[test]
    fn dsn_with_password_is_refused() {
        assert!(check_dsn("postgres://app:secret@db:5432/shard").is_err());
        assert!(check_dsn("postgres://app@db:5432/shard?password=x").is_err());
        assert!(check_dsn("postgres://app@db:5432/shard").is_ok());
        assert!(check_dsn("mysql://x").is_err());
    }
}
