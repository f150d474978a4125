//! The coordinator's one error enum, and how each kind maps to a gRPC status.
use flotilla_proto::PlanError;

/// gRPC metadata naming the leader's address on a follower's UNAVAILABLE.
pub const LEADER_METADATA: &str = "flotilla-leader";

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The plan itself is wrong (file, graph, SQL, selector): nothing was stored.
    #[error("invalid plan: {0}")]
    InvalidPlan(#[from] PlanError),
    /// The plan is well formed but cannot run against this fleet as it is.
    #[error("{0}")]
    Rejected(String),
    #[error("plan {0} not found")]
    PlanNotFound(String),
    /// The command does not fit the plan's state (cancel a finished plan, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("shard {shard} is unreachable: {reason}")]
    Unreachable { shard: String, reason: String },
    #[error("control store: {0}")]
    Store(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// Only the leader schedules and decides; `leader` is where it is, when known.
    #[error("not the leader{}", match .leader {
        Some(l) => format!("; the leader is {l}"),
        None => "; no coordinator leads now (an election is under way, or etcd cannot be reached or has lost its quorum); try again".into(),
    })]
    NotLeader { leader: Option<String> },
    #[error("coordination: {0}")]
    Coordination(#[from] crate::coordination::CoordinationError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            CoordinatorError::InvalidPlan(_) | CoordinatorError::InvalidRequest(_) => {
                tonic::Status::invalid_argument(msg)
            }
            CoordinatorError::Rejected(_) => tonic::Status::failed_precondition(msg),
            CoordinatorError::PlanNotFound(_) => tonic::Status::not_found(msg),
            CoordinatorError::Conflict(_) => tonic::Status::failed_precondition(msg),
            CoordinatorError::Unreachable { .. } => tonic::Status::unavailable(msg),
            CoordinatorError::ShuttingDown => tonic::Status::unavailable(msg),
            CoordinatorError::NotLeader { leader } => {
                let mut status = tonic::Status::unavailable(msg);
                if let Some(l) = leader.and_then(|l| l.parse().ok()) {
                    status.metadata_mut().insert(LEADER_METADATA, l);
                }
                status
            }
            CoordinatorError::Coordination(e) if e.is_transient() => {
                tonic::Status::unavailable(msg)
            }
            CoordinatorError::Coordination(_) => tonic::Status::internal(msg),
            CoordinatorError::Store(_) | CoordinatorError::Listen { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}
