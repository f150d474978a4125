//! The coordination layer's one error enum, and how etcd client errors map onto it.
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinationError {
    /// etcd did not answer (refused, unreachable, timed out): nothing was
    /// written, or the call only read.
    #[error("etcd at {endpoints} is unavailable: {reason}")]
    Unavailable { endpoints: String, reason: String },
    /// A write was sent but its answer never came: it may or may not have
    /// happened. Re-read (`locks`, `decision`) before acting on it.
    #[error("outcome of {what} is unknown (etcd at {endpoints}: {reason}); re-read before acting")]
    Indeterminate {
        what: String,
        endpoints: String,
        reason: String,
    },
    /// The caller's epoch is not the current leader's: this coordinator was
    /// deposed (or never led under that epoch). Stop scheduling and deciding.
    #[error("not the leader: the epoch given is no longer the leader's")]
    NotLeader,
    /// A shard lock is held by another plan.
    #[error("shard {shard} is locked by plan {plan_id}")]
    LockHeld { shard: String, plan_id: String },
    /// A name that cannot be a key (empty), or arguments etcd cannot take in
    /// one transaction.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// etcd answered with an error, or with something this layer did not write.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The control store, which holds a coordinator's decisions without etcd, did not
    /// record or read one: the decision may have been recorded. Re-read before acting.
    #[error("the control store could not record or read {what}: {reason}; re-read before acting")]
    Store { what: String, reason: String },
    /// The coordinators of one etcd group keep their state in one control store; this one
    /// was given another.
    #[error(
        "the coordinators on etcd at {endpoints} keep their state in control store {group} ({key}); this coordinator's --store is another one ({store}): give every coordinator of the group the same store (a shared PostgreSQL database). If this store replaces the group's for good, delete {key} first"
    )]
    StoreNotShared {
        endpoints: String,
        key: String,
        group: String,
        store: String,
    },
}

impl From<flotilla_core::protocol::UnreadableDecision> for CoordinationError {
    fn from(e: flotilla_core::protocol::UnreadableDecision) -> CoordinationError {
        CoordinationError::Etcd(e.to_string())
    }
}

impl CoordinationError {
    /// Whether the call may succeed if repeated later (etcd down or slow).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CoordinationError::Unavailable { .. }
                | CoordinationError::Indeterminate { .. }
                | CoordinationError::Store { .. }
        )
    }
}

/// Whether an etcd client error means "could not talk to etcd" rather than
/// "etcd refused".
pub(crate) fn is_connectivity(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
            // tonic reports a connection it could not make as Unknown with a
            // transport message.
            Code::Unknown => {
                let msg = status.message().to_ascii_lowercase();
                msg.contains("transport") || msg.contains("connect") || msg.contains("not ready")
            }
            _ => false,
        },
        _ => false,
    }
}

/// etcd's answer while its members elect a leader (`etcdserver: leader changed`, `no
/// leader`): gone once one is elected, a second or so.
pub(crate) fn is_electing(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message();
            msg.contains("leader changed") || msg.contains("no leader")
        }
        _ => false,
    }
}

/// Maps etcd errors for one cluster (named by its endpoints in messages).
#[derive(Debug, Clone)]
pub(crate) struct ErrorContext {
    pub endpoints: String,
}

impl ErrorContext {
    /// For reads and for writes etcd certainly refused.
    pub fn read(&self, e: etcd_client::Error) -> CoordinationError {
        if is_connectivity(&e) {
            CoordinationError::Unavailable {
                endpoints: self.endpoints.clone(),
                reason: e.to_string(),
            }
        } else {
            CoordinationError::Etcd(e.to_string())
        }
    }

    /// For writes: a connectivity failure leaves the outcome unknown.
    pub fn write(&self, what: &str, e: etcd_client::Error) -> CoordinationError {
        if is_connectivity(&e) {
            CoordinationError::Indeterminate {
                what: what.to_string(),
                endpoints: self.endpoints.clone(),
                reason: e.to_string(),
            }
        } else {
            CoordinationError::Etcd(e.to_string())
        }
    }

    pub fn read_timeout(&self, after: Duration) -> CoordinationError {
        CoordinationError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason: format!("no answer within {after:?}"),
        }
    }

    pub fn write_timeout(&self, what: &str, after: Duration) -> CoordinationError {
        CoordinationError::Indeterminate {
            what: what.to_string(),
            endpoints: self.endpoints.clone(),
            reason: format!("no answer within {after:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectivity_errors_are_told_apart_from_refusals() {
        let ctx = ErrorContext {
            endpoints: "http://127.0.0.1:1".into(),
        };
        let down = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("connection refused"));
        assert!(matches!(
            ctx.write("decide g", down),
            CoordinationError::Indeterminate { .. }
        ));
        let down = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("connection refused"));
        let err = ctx.read(down);
        assert!(err.to_string().contains("http://127.0.0.1:1"), "{err}");
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ));
        assert!(matches!(ctx.read(refused), CoordinationError::Etcd(_)));
    }

    #[test]
    fn an_election_is_told_apart_from_an_etcd_that_is_down() {
        let status = |m: &str| etcd_client::Error::GRpcStatus(tonic::Status::unavailable(m));
        assert!(is_electing(&status("etcdserver: leader changed")));
        assert!(is_electing(&status("etcdserver: no leader")));
        assert!(!is_electing(&status("connection refused")));
    }
}
