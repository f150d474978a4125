//! `flotilla coordinator`, `flotilla agent`: thin wrappers over each library's
//! `start(config, shutdown)`.
use std::path::Path;

use flotilla_agent::AgentConfig;
use flotilla_coordinator::CoordinatorConfig;
use flotilla_core::secrets::{Secret, SecretUrl};
use tracing::{error, info, warn};

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

/// Reload requests at each SIGHUP, installed first thing: from then on SIGHUP reads the
/// TLS files again and never ends the daemon (its default action did, TLS on or off).
fn reload_on_sighup() -> flotilla_core::reload::ReloadRequests {
    flotilla_core::reload::ReloadRequests::on_sighup().unwrap_or_else(|e| {
        warn!("cannot listen for SIGHUP ({e}): the TLS files are read at start only");
        flotilla_core::reload::ReloadRequests::never()
    })
}

pub async fn coordinator(args: CoordinatorArgs, tls: flotilla_core::tls::TlsFiles) -> u8 {
    let reload = reload_on_sighup();
    let store = match store_location(&args.store, args.store_password_file.as_deref()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let mut config = CoordinatorConfig::new(args.listen, store);
    config.tls = tls;
    config.reload = reload;
    config.insecure = args.insecure;
    config.etcd_tls = args.etcd_security.files();
    config.etcd_user = match etcd_credentials(&args.etcd_security) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if let Some(path) = &args.agent_identities {
        match flotilla_coordinator::identity::AgentIdentities::load_mapping(path) {
            Ok(m) => config.agent_identities = m,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    }
    config.metrics = args.metrics;
    config.health_listen = args.health_listen;
    config.lock_timeout = args.lock_timeout;
    config.statement_timeout = args.statement_timeout;
    config.etcd = args.etcd;
    config.advertise = args.advertise;
    config.lease_ttl = args.lease_ttl;
    config.agent_grace = args.agent_grace;
    // (an empty entry, `--catch-up-environments ''` or a trailing comma, is no environment:
    // it matched the plans that name none, and caught tenants up on them)
    config.catch_up_environments = args
        .catch_up_environments
        .into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    config.shutdown_grace = args.shutdown_grace;
    config.auth = match args.auth {
        super::AuthArg::Auto => flotilla_coordinator::auth::AuthMode::Auto,
        super::AuthArg::Required => flotilla_coordinator::auth::AuthMode::Required,
    };
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
    // Checked before anything starts, as the approval matrix is: a wrong list would let
    // plans past the promotion gate, or onto another environment's shards.
    let environments = match &args.environments_file {
        Some(path) => {
            flotilla_coordinator::environments::Environments::load(path, &args.environment_label)
        }
        None => flotilla_coordinator::environments::Environments::new(
            &args.environments,
            &args.environment_label,
        ),
    };
    match environments {
        Ok(e) => {
            if !e.is_empty() {
                info!(environments = %e.names(), label = %e.label, "environments");
            }
            config.environments = e;
        }
        Err(e) => {
            eprintln!("error: --environments: {e}");
            return EXIT_BAD_INPUT;
        }
    }
    // A rule for an environment the list does not hold never applies (the list refuses
    // every plan for it): a matrix saying `prod` beside `--environments ...,production`
    // would hold no production plan for approval.
    if !config.environments.is_empty()
        && let Some(path) = &args.approvals
    {
        let unknown: Vec<&str> = config
            .approvals
            .environments()
            .into_iter()
            .filter(|e| config.environments.position(e).is_none())
            .collect();
        if !unknown.is_empty() {
            eprintln!(
                "error: approvals file {}: environment(s) {} not among the coordinator's environments ({})",
                path.display(),
                unknown.join(", "),
                config.environments.names()
            );
            return EXIT_BAD_INPUT;
        }
    }
    match flotilla_coordinator::start(config, shutdown_signal(), None).await {
        Ok(()) => EXIT_OK,
        // wrong TLS files, an exposed plaintext listener, a store the etcd group does not
        // share, a store another coordinator without etcd serves, a store a newer
        // coordinator upgraded (trying again cannot help: systemd's unit does not restart
        // on 2): bad input, nothing started
        Err(
            e @ (flotilla_coordinator::CoordinatorError::Tls(_)
            | flotilla_coordinator::CoordinatorError::Coordination(
                flotilla_coordinator::coordination::CoordinationError::StoreNotShared { .. },
            )
            | flotilla_coordinator::CoordinatorError::Store(
                flotilla_coordinator::store::StoreError::InUse { .. }
                | flotilla_coordinator::store::StoreError::NewerSchema { .. },
            )),
        ) => {
            error!("coordinator: {e}");
            eprintln!("error: {e}");
            EXIT_BAD_INPUT
        }
        Err(e) => {
            error!("coordinator: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

/// A password from `file` (its first line, read as every password file is: see
/// `flotilla_core::credential_files`) or else from the environment variable `env`; never
/// argv. A file others on the host can read is used, with a warning.
fn read_password(flag: &str, file: Option<&Path>, env: &str) -> Result<Option<Secret>, String> {
    if let Some(path) = file {
        let password = flotilla_core::credential_files::read_password(flag, path)
            .map_err(|e| e.to_string())?;
        warn_if_open_to_others(flag, path);
        return Ok(Some(Secret::new(password)));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|p| !p.is_empty())
        .map(Secret::new))
}

/// A daemon's credential file (password, key) that other users of the host can read: said
/// in its log, and used (as `--token-file` is: see `credential_files::exposure_warning`).
pub(super) fn warn_if_open_to_others(flag: &str, path: &Path) {
    if let Some(warning) = flotilla_core::credential_files::exposure_warning(flag, path) {
        warn!(file = %path.display(), "{warning}");
    }
}

/// The etcd user and password (`--etcd-user`, `--etcd-password-file`), with a warning for
/// an etcd credential file (the password's, `--etcd-key`) others on the host can read.
fn etcd_credentials(
    args: &super::EtcdSecurityArgs,
) -> Result<Option<flotilla_core::tls::Credentials>, String> {
    let credentials = args.credentials()?;
    for (flag, file) in [
        ("--etcd-password-file", &args.etcd_password_file),
        ("--etcd-key", &args.etcd_key),
    ] {
        if let Some(path) = file {
            warn_if_open_to_others(flag, path);
        }
    }
    Ok(credentials)
}

/// The shard password: a file (`--password-file`), or FLOTILLA_SHARD_PASSWORD; never argv.
pub(super) fn shard_password(file: Option<&Path>) -> Result<Option<Secret>, String> {
    read_password("--password-file", file, "FLOTILLA_SHARD_PASSWORD")
}

/// The control store's address with its password, which comes from
/// `--store-password-file` or FLOTILLA_STORE_PASSWORD: a password written into `--store`
/// would sit in argv (or the environment a unit file shows), so it is refused.
pub(super) fn store_location(
    store: &SecretUrl,
    password_file: Option<&Path>,
) -> Result<SecretUrl, String> {
    if let Some(user) = empty_password_user(store.expose()) {
        return Err(format!(
            "--store has a `:` after the user `{user}` but no password: write `{user}@` (the \
             password comes from --store-password-file or FLOTILLA_STORE_PASSWORD, or a pgpass \
             file)"
        ));
    }
    if let Some((scheme, _)) = store.expose().split_once("://")
        && !matches!(scheme, "sqlite" | "postgres" | "postgresql")
    {
        return Err(format!(
            "--store {store}: `{scheme}://` is not a control store (a SQLite path, \
             sqlite://PATH, or postgres://USER@HOST/DATABASE)"
        ));
    }
    if store.has_password() {
        return Err(format!(
            "--store {store} holds a password; pass it with --store-password-file or \
             FLOTILLA_STORE_PASSWORD (or a pgpass file) instead"
        ));
    }
    let is_pg = ["postgres://", "postgresql://"]
        .iter()
        .any(|p| store.expose().starts_with(p));
    let password = read_password(
        "--store-password-file",
        password_file,
        "FLOTILLA_STORE_PASSWORD",
    )?;
    match password {
        Some(password) if is_pg => Ok(store.with_password(&password)),
        Some(_) if password_file.is_some() => Err(format!(
            "--store-password-file is for a postgres:// store, and --store {store} is not one"
        )),
        _ => Ok(store.clone()),
    }
}

/// The user of a `scheme://user:@host` URL: a `:` with nothing after it, read as a
/// password (an empty one) where none was meant.
fn empty_password_user(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, password) = userinfo.split_once(':')?;
    password.is_empty().then_some(user)
}

/// A DSN with a password in it would sit in argv, visible to every local user.
pub(super) fn check_dsn(dsn: &str) -> Result<(), String> {
    check_dsn_of("--dsn", "--password-file or FLOTILLA_SHARD_PASSWORD", dsn)
}

/// [`check_dsn`] of a DSN given by `flag` (the quickstart's `--shard NAME=DSN`), whose
/// password comes from `source`.
pub(super) fn check_dsn_of(flag: &str, source: &str, dsn: &str) -> Result<(), String> {
    let rest = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("{flag} must be a postgres:// URL"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((user, password)) = userinfo.split_once(':')
    {
        if password.is_empty() {
            return Err(format!(
                "{flag} has a `:` after the user `{user}` but no password: write `{user}@` (the \
                 password comes from {source}, or a pgpass file)"
            ));
        }
        return Err(format!(
            "{flag} holds a password; pass it with {source} instead"
        ));
    }
    // (any case, percent-encoded or not: the driver decodes `pass%77ord`, and logs a key it
    // does not know, `Password`, with its value)
    if SecretUrl::new(dsn).has_password() {
        return Err(format!(
            "{flag} holds a password parameter; pass it with {source} instead"
        ));
    }
    Ok(())
}

fn agent_config(args: &AgentArgs, coordinator: &str) -> Result<AgentConfig, String> {
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
    config.password = shard_password(args.password_file.as_deref())?;
    config.labels = labels;
    config.tenant_pattern = args.tenant_pattern.clone();
    config.tenant_query = args.tenant_query.clone();
    config.max_connections = args.max_connections;
    config.etcd = args.etcd.clone();
    config.lease_ttl = args.lease_ttl;
    config.discover_interval = args.discover_interval;
    config.in_doubt_sweep = args.in_doubt_sweep;
    let tls = super::transport::files();
    // A certificate issued for another shard: the coordinator refuses the attach, but the
    // agent had claimed the database under this --shard first (`flotilla.meta`), and the
    // agent started right afterwards, under the certificate's name, was refused there.
    if let Some(identity) = tls.identity_pem().map_err(|e| e.to_string())?
        && let Some(problem) =
            flotilla_core::tls::agent_certificate_problem(&identity.cert, &args.shard)
    {
        return Err(problem);
    }
    config.tls = tls.client_config().map_err(|e| e.to_string())?;
    if let Some(warning) = tls.client_certificate_warning() {
        warn!("{warning}");
    }
    // read again at each SIGHUP (a renewed certificate, without a restart)
    config.tls_files = tls;
    config.etcd_tls = args
        .etcd_security
        .files()
        .client_config()
        .map_err(|e| e.to_string())?;
    config.etcd_user = etcd_credentials(&args.etcd_security)?;
    Ok(config)
}

pub async fn agent(args: AgentArgs, coordinator: &str) -> u8 {
    let reload = reload_on_sighup();
    // One exporter serves whatever the process records (here: flotilla_agent_*).
    if let Err(e) = flotilla_coordinator::metrics::install_agent(args.metrics, &args.shard) {
        eprintln!("error: --metrics: {e}");
        return EXIT_BAD_INPUT;
    }
    flotilla_coordinator::metrics::set_readiness(flotilla_agent::metrics::readiness);
    let mut config = match agent_config(&args, coordinator) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    config.reload = reload;
    match flotilla_agent::start(config, shutdown_signal()).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            error!("agent: {e}");
            match e {
                // restarting cannot fix a wrong --shard/--dsn pair
                flotilla_agent::AgentError::Config { .. }
                | flotilla_agent::AgentError::WrongShard { .. } => EXIT_BAD_INPUT,
                _ => EXIT_UNAVAILABLE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SecretUrl, check_dsn, check_dsn_of, shard_password, store_location};

    /// Every password file is read by its first line, as `--etcd-password-file` was: a note
    /// under the agent's password was sent with it, and the server refused it for good
    /// ("saslprep ProhibitedCharacter('\n')", the agent retrying "not reachable" forever).
    #[test]
    fn a_password_file_gives_its_first_line_only() {
        let dir = flotilla_testkit::TestDir::new("password-first-line").unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "pw\n# rotated 2026-12-01\n").unwrap();
        let password = shard_password(Some(&file)).unwrap().expect("a password");
        assert_eq!(password.expose(), "pw");
        std::fs::write(&file, "canary 9\r\n# rotated 2026-12-01\r\n").unwrap();
        let url = store_location(&SecretUrl::new("postgres://f@db/control"), Some(&file)).unwrap();
        assert_eq!(url.expose(), "postgres://f:canary%209@db/control");
        // blank lines above the password are skipped, as in every credential file, and a
        // password may begin with `#`; a file of nothing else is refused, naming the flag
        // and the file
        std::fs::write(&file, "\n#shard-1pw\nrotated\n").unwrap();
        let password = shard_password(Some(&file)).unwrap().expect("a password");
        assert_eq!(password.expose(), "#shard-1pw");
        std::fs::write(&file, "\n \n").unwrap();
        let e = shard_password(Some(&file)).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "--password-file {}: the file is empty",
                file.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_store_with_a_password_is_refused_and_the_file_supplies_it() {
        let e =
            store_location(&SecretUrl::new("postgres://f:canary9@db/control"), None).unwrap_err();
        assert!(e.contains("--store-password-file"), "{e}");
        assert!(!e.contains("canary9"), "{e}");
        let e = store_location(&SecretUrl::new("postgres://f@db/c?password=canary9"), None)
            .unwrap_err();
        assert!(!e.contains("canary9"), "{e}");

        let dir = flotilla_testkit::TestDir::new("store-password").unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "canary 9\n").unwrap();
        let url = store_location(&SecretUrl::new("postgres://f@db/control"), Some(&file)).unwrap();
        assert_eq!(url.expose(), "postgres://f:canary%209@db/control");
        assert!(!url.to_string().contains("canary"));
        let e = store_location(&SecretUrl::new("flotilla.db"), Some(&file)).unwrap_err();
        assert!(e.contains("not one"), "{e}");
        let e = store_location(
            &SecretUrl::new("postgres://f@db/c"),
            Some(&dir.join("none")),
        )
        .unwrap_err();
        assert!(e.contains("--store-password-file"), "{e}");
        // an empty file (a secret not mounted yet) is an error, not "no password"
        std::fs::write(&file, "\n").unwrap();
        let e =
            store_location(&SecretUrl::new("postgres://f@db/control"), Some(&file)).unwrap_err();
        assert!(e.contains("the file is empty"), "{e}");
    }

    #[test]
    fn dsn_with_password_is_refused() {
        assert!(check_dsn("postgres://app:secret@db:5432/shard").is_err());
        assert!(check_dsn("postgres://app@db:5432/shard?password=x").is_err());
        for dsn in [
            "postgres://app@db/shard?pass%77ord=CanaryPw",
            "postgres://app@db/shard?Password=LeakI9",
            "postgres://app@db/shard?sslmode=require&sslpassword=k3y",
        ] {
            let e = check_dsn(dsn).unwrap_err();
            assert!(e.contains("holds a password parameter"), "{dsn}: {e}");
        }
        let e = store_location(
            &SecretUrl::new("postgres://f@db/control?pass%77ord=CanaryPw"),
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("holds a password") && !e.contains("CanaryPw"),
            "{e}"
        );
        assert!(check_dsn("postgres://app@db:5432/shard").is_ok());
        assert!(check_dsn("mysql://x").is_err());
        // the quickstart's names its own flag and where its password comes from (it said
        // `--dsn`, which it has not)
        let e = check_dsn_of(
            "--shard s0=DSN",
            "FLOTILLA_SHARD_PASSWORD",
            "postgres://app:secret@db/shard",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "--shard s0=DSN holds a password; pass it with FLOTILLA_SHARD_PASSWORD instead"
        );
        // a `:` with no password after it is named as such, not as a password
        let e = check_dsn("postgres://app:@db:5432/shard").unwrap_err();
        assert!(
            e.contains("a `:` after the user `app` but no password: write `app@`"),
            "{e}"
        );
        let e = store_location(&SecretUrl::new("postgres://f:@db/control"), None).unwrap_err();
        assert!(
            e.contains("--store has a `:` after the user `f` but no password"),
            "{e}"
        );
    }
}
