//! `flotilla operator add|list|revoke`: operator identities. Through the coordinator
//! (an admin's credential), or with `--store URL` straight in the control store, with no
//! coordinator and no credential: that is how the first admin is made (whoever can write
//! the store can do anything anyway), and how a lost admin token is replaced.
use flotilla_coordinator::auth;
use flotilla_coordinator::store::Store;
use flotilla_core::pb;
use serde_json::{Value, json};

use super::call::{ask_leader, call_any};
use super::{EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, OperatorCommand, Output};

pub async fn run(addr: &str, cmd: OperatorCommand) -> u8 {
    match cmd {
        OperatorCommand::Add {
            name,
            role,
            approval_roles,
            store,
            create,
            token_out,
            output,
        } => {
            // The token's file first: one that cannot be made (there already, a directory
            // missing) refuses the command before the operator exists; the operator was
            // added and its token, shown only once, lost.
            let mut file = match token_out.as_deref().map(create_private) {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    eprintln!(
                        "error: --token-out {}: {e}; no operator was added",
                        token_out
                            .as_deref()
                            .unwrap_or_else(|| std::path::Path::new(""))
                            .display()
                    );
                    return EXIT_BAD_INPUT;
                }
            };
            let forget_file = || {
                if let Some(path) = token_out.as_deref() {
                    let _ = std::fs::remove_file(path);
                }
            };
            let added =
                match store {
                    Some(location) => {
                        let store = match open(&location, create).await {
                            Ok(s) => s,
                            Err(code) => {
                                forget_file();
                                return code;
                            }
                        };
                        let by = format!("{} (--store)", whoami());
                        match auth::add_operator(&store, &name, &role, &approval_roles, &by).await {
                            Ok(a) => a.to_pb(),
                            Err(e) => {
                                forget_file();
                                return refused(&e.to_string(), &e.into());
                            }
                        }
                    }
                    None => {
                        let req = pb::AddOperatorRequest {
                            name,
                            role,
                            approval_roles,
                        };
                        match ask_leader(addr, req, |mut c, req| async move {
                            c.add_operator(req).await
                        })
                        .await
                        {
                            Ok((_, r)) => r,
                            Err(code) => {
                                forget_file();
                                return code;
                            }
                        }
                    }
                };
            let into = token_out.as_deref().zip(file.as_mut());
            show_added(&added, into, output)
        }
        OperatorCommand::List { store, output } => {
            let operators = match store {
                Some(location) => match open(&location, false).await {
                    Ok(s) => match s.operators().await {
                        Ok(rows) => rows.iter().map(auth::operator_info).collect::<Vec<_>>(),
                        Err(e) => {
                            eprintln!("error: {e}");
                            return EXIT_UNAVAILABLE;
                        }
                    },
                    Err(code) => return code,
                },
                None => {
                    return call_any(
                        addr,
                        pb::ListOperatorsRequest {},
                        |mut c, req| async move { c.list_operators(req).await },
                        |r| {
                            show_list(&r.operators, output);
                            EXIT_OK
                        },
                    )
                    .await;
                }
            };
            show_list(&operators, output);
            EXIT_OK
        }
        OperatorCommand::Revoke { name, store } => {
            let revoked = match store {
                Some(location) => {
                    let store = match open(&location, false).await {
                        Ok(s) => s,
                        Err(code) => return code,
                    };
                    let by = format!("{} (--store)", whoami());
                    match auth::revoke_operator(&store, &name, &by).await {
                        Ok(row) => auth::operator_info(&row),
                        Err(e) => return refused(&e.to_string(), &e.into()),
                    }
                }
                None => {
                    let req = pb::RevokeOperatorRequest { name };
                    match ask_leader(addr, req, |mut c, req| async move {
                        c.revoke_operator(req).await
                    })
                    .await
                    {
                        Ok((_, r)) => r,
                        Err(code) => return code,
                    }
                }
            };
            println!(
                "operator {} revoked: its token no longer works (recorded in the audit trail)",
                revoked.name
            );
            EXIT_OK
        }
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

async fn open(location: &str, create: bool) -> Result<Store, u8> {
    // The same rules as the coordinator's --store: no password in argv (a password file,
    // FLOTILLA_STORE_PASSWORD or a pgpass file), a sqlite:// URL created when missing.
    let url = flotilla_core::secrets::SecretUrl::new(location);
    let url = super::daemons::store_location(&url, None).map_err(|e| {
        eprintln!("error: {e}");
        super::EXIT_BAD_INPUT
    })?;
    // A SQLite store is created where it is missing, as a coordinator's first start does:
    // here a mistyped path would make a store no coordinator reads, and report success.
    if let Some(path) = sqlite_path(url.expose())
        && !path.exists()
        && !create
    {
        eprintln!(
            "error: --store {}: no control store there: check the path, it must be the \
             coordinator's --store (to make a new store before the coordinator's first \
             start, add --create)",
            path.display()
        );
        return Err(super::EXIT_BAD_INPUT);
    }
    Store::open(&url).await.map_err(|e| {
        eprintln!("error: --store: {e}");
        EXIT_UNAVAILABLE
    })
}

/// The file of a SQLite store location (a path, or `sqlite://PATH` with or without query
/// parameters); None for a PostgreSQL one.
fn sqlite_path(location: &str) -> Option<std::path::PathBuf> {
    if ["postgres://", "postgresql://"]
        .iter()
        .any(|p| location.starts_with(p))
    {
        return None;
    }
    let path = location
        .strip_prefix("sqlite://")
        .or_else(|| location.strip_prefix("sqlite:"))
        .unwrap_or(location);
    let path = path.split('?').next().unwrap_or(path);
    (path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// A refusal from the domain, with the exit code its gRPC status would give.
fn refused(message: &str, status: &tonic::Status) -> u8 {
    eprintln!("error: {message}");
    match status.code() {
        tonic::Code::Internal | tonic::Code::Unavailable => EXIT_UNAVAILABLE,
        _ => EXIT_BAD_INPUT,
    }
}

/// The new operator, and its token once: into `token_out` (created 0600, for scripts)
/// or on stdout.
fn show_added(
    r: &pb::AddOperatorResponse,
    token_out: Option<(&std::path::Path, &mut std::fs::File)>,
    output: Output,
) -> u8 {
    use std::io::Write;
    let op = r.operator.clone().unwrap_or_default();
    let token_out = match token_out {
        Some((path, file)) => {
            if let Err(e) = writeln!(file, "{}", r.token).and_then(|()| file.sync_all()) {
                eprintln!(
                    "error: --token-out {}: {e}; operator {} was added: revoke it and add it again",
                    path.display(),
                    op.name
                );
                return EXIT_UNAVAILABLE;
            }
            Some(path)
        }
        None => None,
    };
    let shown_token = match token_out {
        Some(_) => Value::Null,
        None => Value::String(r.token.clone()),
    };
    if output == Output::Json {
        println!(
            "{}",
            json!({"name": op.name, "role": op.role, "approval_roles": op.approval_roles, "token": shown_token})
        );
        return EXIT_OK;
    }
    let approves = match op.approval_roles.is_empty() {
        true => String::new(),
        false => format!(" (approves as {})", op.approval_roles.join(", ")),
    };
    println!("operator {} added as {}{approves}", op.name, op.role);
    if op.certificates_from_ms > 0 {
        println!(
            "the name was a revoked operator's: client certificates of {} valid from before now were that operator's and are refused; issue a new one",
            op.name
        );
    }
    match token_out {
        Some(path) => println!(
            "its token is in {} (shown nowhere else; the coordinator keeps only a hash): give it to {} for --token-file",
            path.display(),
            op.name
        ),
        None => println!(
            "its token, shown this once (the coordinator keeps only a hash); save it to a file for --token-file:\n{}",
            r.token
        ),
    }
    EXIT_OK
}

/// A new file only its owner reads (0600); one already there is refused.
fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

fn show_list(operators: &[pb::OperatorInfo], output: Output) {
    let at = |ms: u64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    };
    if output == Output::Json {
        let v: Vec<Value> = operators
            .iter()
            .map(|o| {
                json!({
                    "name": o.name,
                    "role": o.role,
                    "approval_roles": o.approval_roles,
                    "created_at_ms": o.created_at_ms,
                    "created_by": o.created_by,
                    "revoked_at_ms": o.revoked_at_ms,
                    "certificates_from_ms": o.certificates_from_ms,
                    "active": o.revoked_at_ms == 0,
                })
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    if operators.is_empty() {
        println!(
            "no operators (authentication is off unless the coordinator runs with --auth required)"
        );
        return;
    }
    println!(
        "{:<20} {:<9} {:<16} {:<26} {:<20} STATE",
        "NAME", "ROLE", "APPROVES AS", "CREATED", "BY"
    );
    for o in operators {
        let state = match (o.revoked_at_ms, o.certificates_from_ms) {
            (0, 0) => "active".to_string(),
            (0, from) => format!(
                "active (a revoked name given again: certificates valid from {} on)",
                at(from)
            ),
            (ms, _) => format!("revoked {}", at(ms)),
        };
        println!(
            "{:<20} {:<9} {:<16} {:<26} {:<20} {state}",
            o.name,
            o.role,
            if o.approval_roles.is_empty() {
                "-".to_string()
            } else {
                o.approval_roles.join(",")
            },
            at(o.created_at_ms),
            o.created_by
        );
    }
}
