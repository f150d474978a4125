//! The protocol both sides speak beyond the protobuf messages: the gids of prepared
//! transactions, the etcd key layout, commit decisions, the gRPC metadata a follower
//! answers with, and the SQLSTATEs Flotilla acts on. One definition, used by the
//! coordinator and the agent alike, so the two can never drift apart.
pub mod gid;
pub mod keys;
pub mod sqlstate;

use std::fmt;
use std::str::FromStr;

/// In `PlanStatus.paused` (and plan locks' shard lists): every shard of the plan.
pub const ALL_SHARDS: &str = "*";

/// How an agent's answer to a commit's Resolve says etcd holds no decision key for the unit
/// (the coordinator writes its commit decision again on it: etcd's data was lost under it).
pub const NO_DECISION_KEY: &str = "no commit decision in etcd (no key";

/// The state of a `DataProgress` that is a schema step's, not a data change's: waiting to
/// try its lock again after a lock timeout (its reason says the attempt and who held the
/// lock). Shown apart from data changes, and gone once the step ends.
pub const LOCK_WAIT: &str = "lock_wait";

/// The largest gRPC message any side takes (tonic's default is 4 MiB): a plan carries its
/// migrations' SQL, and one with a large seed migration or a long Flyway history is over
/// 4 MiB. The CLI sends it, the coordinator takes it, and the coordinator's stream hands
/// it to every agent; all three agree, or the plan fails late with "decoded message
/// length too large" at whichever side did not.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// gRPC metadata naming the leader's address on a follower's UNAVAILABLE.
pub const LEADER_METADATA: &str = "flotilla-leader";
/// [`LEADER_METADATA`]'s value on a read answered while no coordinator leads (from the
/// control store alone).
pub const NO_LEADER: &str = "none";

/// gRPC metadata on a refusal, saying why in a form meant for programs (the message is
/// for people): `not-leader` when a follower refuses what only the leader does.
pub const REFUSAL_METADATA: &str = "flotilla-refusal";
/// [`REFUSAL_METADATA`]'s value when a follower refuses.
pub const REFUSAL_NOT_LEADER: &str = "not-leader";

/// Whether a status is a follower's refusal ([`REFUSAL_METADATA`] = `not-leader`), and the
/// leader's address when it named one.
pub fn not_leader(status: &tonic::Status) -> Option<Option<String>> {
    let refusal = status.metadata().get(REFUSAL_METADATA)?.to_str().ok()?;
    (refusal == REFUSAL_NOT_LEADER).then(|| {
        status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|l| !l.is_empty())
    })
}

/// The outcome of an atomic unit (an atomic plan, or one atomic parallel group of a
/// plan), as its decision key in etcd holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Commit,
    Abort,
}

impl Decision {
    /// How it is stored in etcd: `commit` or `abort`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }

    /// The statement that carries it out on a prepared transaction.
    pub fn sql(self) -> &'static str {
        match self {
            Decision::Commit => "COMMIT PREPARED",
            Decision::Abort => "ROLLBACK PREPARED",
        }
    }

    pub fn is_commit(self) -> bool {
        self == Decision::Commit
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision key whose value is neither `commit` nor `abort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable decision {0:?} (expected \"commit\" or \"abort\")")]
pub struct UnreadableDecision(pub String);

impl FromStr for Decision {
    type Err = UnreadableDecision;

    fn from_str(s: &str) -> Result<Decision, UnreadableDecision> {
        match s {
            "commit" => Ok(Decision::Commit),
            "abort" => Ok(Decision::Abort),
            other => Err(UnreadableDecision(other.to_string())),
        }
    }
}

/// What the preflight found missing for a data migration on a target (`DataProblem.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataProblemKind {
    /// The table does not exist (an earlier step may create it).
    NoTable,
    /// A key or prior-image column does not exist (an earlier step may add it).
    NoColumn,
    /// The key is not unique, or of a type that cannot order batches.
    Shape,
    /// PostgreSQL refuses the change's filter, batch SQL or key as written (planned with
    /// EXPLAIN, nothing run); its name: the name PostgreSQL says does not exist, else the
    /// table's (an earlier step, or the change's own up SQL, may create or alter it).
    Statement,
    /// The check itself failed.
    Error,
}

impl DataProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataProblemKind::NoTable => "no_table",
            DataProblemKind::NoColumn => "no_column",
            DataProblemKind::Shape => "shape",
            DataProblemKind::Statement => "statement",
            DataProblemKind::Error => "error",
        }
    }
}

impl FromStr for DataProblemKind {
    type Err = String;
    fn from_str(s: &str) -> Result<DataProblemKind, String> {
        [
            DataProblemKind::NoTable,
            DataProblemKind::NoColumn,
            DataProblemKind::Shape,
            DataProblemKind::Statement,
            DataProblemKind::Error,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("unknown data problem kind {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip() {
        for d in [Decision::Commit, Decision::Abort] {
            assert_eq!(d.as_str().parse::<Decision>(), Ok(d));
        }
        assert_eq!(
            "maybe".parse::<Decision>(),
            Err(UnreadableDecision("maybe".into()))
        );
    }

    #[test]
    fn a_refusal_is_read_from_metadata_not_from_the_message() {
        let mut status = tonic::Status::unavailable("anything at all");
        assert_eq!(not_leader(&status), None);
        status
            .metadata_mut()
            .insert(REFUSAL_METADATA, REFUSAL_NOT_LEADER.parse().unwrap());
        assert_eq!(not_leader(&status), Some(None));
        status
            .metadata_mut()
            .insert(LEADER_METADATA, "http://10.0.0.2:7070".parse().unwrap());
        assert_eq!(
            not_leader(&status),
            Some(Some("http://10.0.0.2:7070".into()))
        );
    }
}
