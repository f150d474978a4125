//! Two-phase commit on this shard (invariant 4): the lower half that the executor, the
//! scheduler and the resolver share.
//!
//! A run with a `prepare_gid` ends in `PREPARE TRANSACTION '<gid>'` instead of COMMIT (see
//! `run::executor`); its change and journal rows then wait, invisible, for the plan's
//! decision, which `run::resolve` applies.
//! - `gid`: the shape of Flotilla's gids.
//! - `prepared`: the shard's prepared transactions: which are there, COMMIT/ROLLBACK
//!   PREPARED, and the preflight probe.
//! - `lock_table`: the server's shared lock table and what the plan's relations take in
//!   it on each target, for the preflight.
//! - `decisions`: plans' decisions as their keys in etcd hold them, read through every
//!   member in turn.
//!
//! Only gids starting with `flotilla:` are ever touched: other applications' prepared
//! transactions are theirs. Gids read `flotilla:<plan>:<run>:<epoch>:<target>`; the plan
//! field names the decision key (`<prefix>/decisions/<plan>`, as the coordinator's
//! `coordination::keys::decision` builds it).
use crate::etcd::EtcdError;

mod decisions;
mod gid;
mod lock_table;
mod prepared;

pub(crate) use decisions::{Decisions, decision_key};
pub(crate) use gid::{is_probe, plan_of_gid, validate_gid};
pub(crate) use lock_table::{LockTable, named_relation_locks, read_lock_table};
pub(crate) use prepared::{
    Finished, census, check_two_phase, finish, list_prepared, list_prepared_before, prepared_among,
};

/// A unit's decision, as its key in etcd holds it (the protocol's one definition).
pub(crate) use flotilla_core::protocol::Decision;

/// Now on this agent's clock, in microseconds since the Unix epoch: when a transaction
/// prepared and when it was resolved. Both ends of a target's lock hold come from the same
/// clock, so the hold is exact; the decision's legs compare with the coordinator's clock.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Why a two-phase operation on this shard did not go through. The messages reach the
/// coordinator (a Resolve's failed gids, a preflight's answer) as they are.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TwoPhaseError {
    /// A run's gid that is not Flotilla's, too long, or of another plan (other
    /// applications' prepared transactions are theirs: Flotilla touches only its own).
    #[error(transparent)]
    Gid(#[from] flotilla_core::protocol::gid::GidError),
    #[error(transparent)]
    Quote(#[from] crate::step::BuildError),
    /// COMMIT/ROLLBACK PREPARED failed (the SQLSTATE is empty when the connection was lost).
    #[error("{message}{}", sqlstate_suffix(.sqlstate))]
    Finish { message: String, sqlstate: String },
    #[error("etcd at {endpoints} unreachable: {source}")]
    EtcdUnreachable {
        endpoints: String,
        source: EtcdError,
    },
    #[error("reading {key} from etcd at {endpoints}: {source}")]
    EtcdRead {
        key: String,
        endpoints: String,
        source: EtcdError,
    },
    #[error("shard {shard}: reading {setting}: {source}")]
    Setting {
        shard: String,
        setting: &'static str,
        source: sqlx::Error,
    },
    #[error(
        "shard {shard}: max_prepared_transactions = {value}; two-phase commit needs it above 0 (postgresql.conf, restart)"
    )]
    NoPreparedTransactions { shard: String, value: String },
    #[error("shard {shard}: no connection for the two-phase probe: {source}")]
    ProbeConnection { shard: String, source: sqlx::Error },
    #[error("shard {shard}: cannot prepare a transaction: {message} (SQLSTATE {sqlstate})")]
    CannotPrepare {
        shard: String,
        message: String,
        sqlstate: String,
    },
    #[error("shard {shard}: cannot roll back the prepared probe {gid}: {source}")]
    ProbeRollback {
        shard: String,
        gid: String,
        source: Box<TwoPhaseError>,
    },
}

fn sqlstate_suffix(sqlstate: &str) -> String {
    if sqlstate.is_empty() {
        String::new()
    } else {
        format!(" (SQLSTATE {sqlstate})")
    }
}
