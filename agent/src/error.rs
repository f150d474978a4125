//! The crate's error type, and the one place where shard errors become step errors: every
//! SQLSTATE the agent tells apart is named here.
use flotilla_core::pb;
use sqlx::postgres::PgDatabaseError;

/// A SQL error as an operator reads it: the server's message (sqlx's rendering of a server
/// error adds " at line N", a line of PostgreSQL's C source, which readers took for a line
/// of their SQL); `sql`, when given, is the text sent, and the line of it the server's error
/// points at is named. Anything else as sqlx says it.
pub fn sql_error_text(e: &sqlx::Error, sql: Option<&str>) -> String {
    let sqlx::Error::Database(db) = e else {
        return e.to_string();
    };
    let line = sql.zip(db.try_downcast_ref::<PgDatabaseError>().and_then(
        |pg| match pg.position()? {
            sqlx::postgres::PgErrorPosition::Original(at) => Some(at),
            _ => None,
        },
    ));
    match line {
        // the position counts characters from 1
        Some((sql, at)) => {
            let before: String = sql.chars().take(at.saturating_sub(1)).collect();
            format!(
                "line {}: {}",
                before.matches('\n').count() + 1,
                db.message()
            )
        }
        None => db.message().to_string(),
    }
}

/// A sqlx error shown as [`sql_error_text`] says it (no " at line N" of PostgreSQL's
/// source), for log lines and messages that name one.
pub struct Shown<'a>(pub &'a sqlx::Error);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&sql_error_text(self.0, None))
    }
}

/// What can stop an agent. Each message names the shard and what failed; none holds a password.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("shard {shard}: invalid configuration: {reason}")]
    Config { shard: String, reason: String },
    #[error("shard {shard}: cannot connect to {host}:{port}/{database}: {}", sql_error_text(.error, None))]
    ShardConnect {
        shard: String,
        host: String,
        port: u16,
        database: String,
        error: sqlx::Error,
    },
    #[error("shard {shard}: {what}: {}", sql_error_text(.error, None))]
    Shard {
        shard: String,
        what: &'static str,
        error: sqlx::Error,
    },
    #[error(
        "shard {shard}: its flotilla schema is version {found}, newer than the {supported} this agent knows; upgrade the agent"
    )]
    SchemaTooNew {
        shard: String,
        found: String,
        supported: u32,
    },
    /// The shard's agent lock (a session-level advisory lock) is held by another session.
    #[error(
        "shard {shard}: another Flotilla agent is already attached to this shard database{holder}; \
         stop it first (only one agent may serve a shard)"
    )]
    ShardTaken {
        shard: String,
        /// ` (session pid …, application_name …, client …)` when the shard lets us read it.
        holder: String,
    },
    /// The database's flotilla schema was recorded for another shard: a DSN copied from
    /// another agent's configuration, pointing at the wrong database. Acting on it would move
    /// that shard's fence and write into its journal.
    #[error(
        "shard {shard}: database {database} belongs to shard {recorded} (flotilla.meta says so); \
         check --dsn and --shard: an agent acts only on its own shard's fence and journal"
    )]
    WrongShard {
        shard: String,
        recorded: String,
        database: String,
    },
    #[error("shard {shard}: coordinator {address}: {reason}")]
    Coordinator {
        shard: String,
        address: String,
        reason: String,
    },
}

// The SQLSTATEs are the protocol's (one definition for the coordinator and the agent).
pub(crate) use flotilla_core::protocol::sqlstate::UNDEFINED_OBJECT as SQLSTATE_UNDEFINED_OBJECT;
use flotilla_core::protocol::sqlstate::{
    ALREADY_JOURNALED as SQLSTATE_ALREADY_JOURNALED, CLASS_AUTH as SQLSTATE_CLASS_AUTH,
    CLASS_INSUFFICIENT_RESOURCES as SQLSTATE_CLASS_RESOURCES, CONFLICTS as SQLSTATE_CONFLICTS,
    LOCK_NOT_AVAILABLE as SQLSTATE_LOCK_NOT_AVAILABLE, SERVER_GONE as SQLSTATE_SERVER_GONE,
    UNIQUE_VIOLATION as SQLSTATE_UNIQUE_VIOLATION,
};
pub use flotilla_core::protocol::sqlstate::{
    FENCED as SQLSTATE_FENCED, VERIFY_FAILED as SQLSTATE_VERIFY,
};
/// Why a step's fence check can time out: the older epoch's transactions hold the fence row.
const FENCE_HELD: &str = "the shard's fence row is held by a transaction of an older epoch: a step still \
     running, or a prepared transaction waiting for its plan's decision (see pg_prepared_xacts); \
     a newer epoch can be written once it ends";
const JOURNAL_PKEY: &str = "journal_pkey";

/// A step that did not go through, with what we know about why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub error: pb::StepError,
    /// Another session committed the same step first (its journal row is there).
    pub concurrent_apply: bool,
    /// The connection is gone or unusable: the outcome of what was in flight is unknown.
    pub connection_lost: bool,
    /// What failed may have left part of its work committed (a procedure or DO block that
    /// commits inside, an INVALID index that could not be dropped): not tried again by the
    /// agent after a lock timeout, which would do that part again or trip on it.
    pub part_way: bool,
}

impl Failure {
    /// A failure found by the agent itself, not reported by the shard.
    pub fn agent(phase: &str, message: impl Into<String>) -> Failure {
        Failure {
            error: pb::StepError {
                sqlstate: String::new(),
                message: message.into(),
                detail: String::new(),
                phase: phase.into(),
            },
            concurrent_apply: false,
            connection_lost: false,
            part_way: false,
        }
    }
}

impl Failure {
    /// Undone by a serialization failure or a deadlock: worth doing again.
    pub fn is_conflict(&self) -> bool {
        SQLSTATE_CONFLICTS.contains(&self.error.sqlstate.as_str())
    }

    /// The shard's server went away (or its connection did): what was in flight is undone
    /// or unknown, and the server may answer again later.
    pub fn server_gone(&self) -> bool {
        self.connection_lost || SQLSTATE_SERVER_GONE.contains(&self.error.sqlstate.as_str())
    }

    pub fn is_lock_timeout(&self) -> bool {
        self.error.sqlstate == SQLSTATE_LOCK_NOT_AVAILABLE
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The shard refused the agent's credentials.
pub(crate) fn is_auth_failure(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| c.starts_with(SQLSTATE_CLASS_AUTH))
}

/// The TLS the DSN asks for failed (`sslmode=require` and a server without TLS, a server
/// certificate that `verify-ca`/`verify-full` refuses, an `sslrootcert` not readable): a
/// configuration to fix, which trying again cannot.
pub(crate) fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        // the handshake's own refusal (a certificate not trusted, a name that does not
        // match) comes up through the socket as an I/O error
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    }
}

/// The DSN's database is not on the server (invalid_catalog_name): a configuration to fix,
/// not a shard still starting.
pub(crate) fn is_missing_database(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some("3D000")
}

/// A lock_timeout gave up.
pub(crate) fn is_lock_timeout(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some(SQLSTATE_LOCK_NOT_AVAILABLE)
}

/// Maps a shard error to a step error. `phase` is what was running ("up" or "down") when the
/// error is not one of ours (fence, verify, journal) and not a lost connection.
pub(crate) fn classify(e: &sqlx::Error, phase: &str) -> Failure {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let pg = db.try_downcast_ref::<PgDatabaseError>();
            let constraint = pg.and_then(PgDatabaseError::constraint).or(db.constraint());
            let concurrent_apply = (code == SQLSTATE_UNIQUE_VIOLATION
                && constraint == Some(JOURNAL_PKEY))
                || code == SQLSTATE_ALREADY_JOURNALED;
            // a lock timeout inside the fence check: waiting for an older epoch to end
            let fence_held = code == SQLSTATE_LOCK_NOT_AVAILABLE
                && pg
                    .and_then(PgDatabaseError::r#where)
                    .is_some_and(|w| w.contains("flotilla.check_fence"));
            // a verify query of another type than boolean: the check's call does not resolve
            let verify_type = (code == "42883")
                .then(|| db.message().strip_prefix("function flotilla.check_verify("))
                .flatten()
                .and_then(|rest| rest.split_once(", unknown)"))
                .map(|(ty, _)| ty.to_string());
            let phase = match code.as_str() {
                SQLSTATE_FENCED => "fence",
                SQLSTATE_VERIFY => "verify",
                _ if verify_type.is_some() => "verify",
                _ if fence_held => "fence",
                _ if concurrent_apply => "journal",
                _ => phase,
            };
            // The server's HINT (what to do, often the most useful part of a migration's
            // own RAISE ... USING HINT) goes with the detail, where the failure shows it.
            let detail = if fence_held {
                FENCE_HELD.to_string()
            } else {
                let detail = pg.and_then(PgDatabaseError::detail).unwrap_or_default();
                match pg.and_then(PgDatabaseError::hint) {
                    Some(hint) if !code.starts_with(SQLSTATE_CLASS_RESOURCES) => {
                        if detail.is_empty() {
                            format!("HINT: {hint}")
                        } else {
                            format!("{detail}\nHINT: {hint}")
                        }
                    }
                    _ => detail.to_string(),
                }
            };
            // "out of shared memory" says nothing of the cause; the hint names the setting
            // (max_locks_per_transaction when the lock table is full), and the plan's
            // message is the step's message.
            let message = match pg.and_then(PgDatabaseError::hint) {
                _ if verify_type.is_some() => format!(
                    "the verify query returns {}, not one boolean (e.g. `SELECT count(*) = 0 FROM ...`)",
                    verify_type.as_deref().unwrap_or_default()
                ),
                Some(hint) if code.starts_with(SQLSTATE_CLASS_RESOURCES) => {
                    format!("{} ({hint})", db.message())
                }
                _ => db.message().to_string(),
            };
            Failure {
                error: pb::StepError {
                    sqlstate: code,
                    message,
                    detail,
                    phase: phase.into(),
                },
                concurrent_apply,
                connection_lost: false,
                part_way: false,
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Failure {
            error: pb::StepError {
                sqlstate: String::new(),
                message: e.to_string(),
                detail: String::new(),
                phase: "connect".into(),
            },
            concurrent_apply: false,
            connection_lost: true,
            part_way: false,
        },
        other => Failure::agent(phase, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_connect_errors() {
        let e = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        let f = classify(&e, "up");
        assert_eq!(f.error.phase, "connect");
        assert_eq!(f.error.sqlstate, "");
        assert!(f.connection_lost && !f.concurrent_apply);
        assert!(classify(&sqlx::Error::PoolTimedOut, "down").connection_lost);
    }

    #[test]
    fn other_errors_keep_the_phase() {
        let f = classify(&sqlx::Error::RowNotFound, "down");
        assert_eq!(f.error.phase, "down");
        assert!(!f.connection_lost);
    }

    #[test]
    fn messages_name_the_shard() {
        let e = AgentError::ShardConnect {
            shard: "s1".into(),
            host: "db".into(),
            port: 5432,
            database: "shard_1".into(),
            error: sqlx::Error::PoolTimedOut,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("shard s1: cannot connect to db:5432/shard_1"),
            "{text}"
        );
        let e = AgentError::ShardTaken {
            shard: "s1".into(),
            holder: " (session pid 7)".into(),
        };
        assert!(
            e.to_string().starts_with(
                "shard s1: another Flotilla agent is already attached to this shard database (session pid 7); "
            ),
            "{e}"
        );
    }
}
