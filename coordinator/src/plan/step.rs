//! A step's status inside a plan in motion: the stored [`StepState`] plus the run it is
//! out in, so a late answer of an earlier run can be told apart.
use flotilla_core::state::StepState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Pending,
    Running(u64),
    Applied,
    AlreadyApplied,
    Failed,
    RolledBack,
    NotRun,
    /// In a prepared transaction on its shard, waiting for the plan's decision.
    Prepared,
}

impl StepStatus {
    /// What the control store and the status keep of it.
    pub fn state(self) -> StepState {
        match self {
            StepStatus::Pending => StepState::Pending,
            StepStatus::Running(_) => StepState::Running,
            StepStatus::Applied => StepState::Applied,
            StepStatus::AlreadyApplied => StepState::AlreadyApplied,
            StepStatus::Failed => StepState::Failed,
            StepStatus::RolledBack => StepState::RolledBack,
            StepStatus::NotRun => StepState::NotRun,
            StepStatus::Prepared => StepState::Prepared,
        }
    }

    /// A stored state, read back by a new leader.
    pub fn from_stored(state: StepState) -> StepStatus {
        match state {
            StepState::Applied => StepStatus::Applied,
            StepState::AlreadyApplied => StepStatus::AlreadyApplied,
            StepState::Failed => StepStatus::Failed,
            StepState::RolledBack => StepStatus::RolledBack,
            StepState::NotRun => StepStatus::NotRun,
            StepState::Prepared => StepStatus::Prepared,
            // "running" after a restart is unknown: the agent's journal decides.
            StepState::Pending | StepState::Running => StepStatus::Pending,
        }
    }

    /// Not settled: prepared, pending or running.
    pub fn open(self) -> bool {
        matches!(
            self,
            StepStatus::Prepared | StepStatus::Pending | StepStatus::Running(_)
        )
    }

    /// Still to run or running: what keeps its shard's lanes (see `ShardRun::to_run`).
    pub fn to_run(self) -> bool {
        matches!(self, StepStatus::Pending | StepStatus::Running(_))
    }

    /// Done as far as its dependents go (a prepared step counts within its unit).
    pub fn done(self) -> bool {
        matches!(
            self,
            StepStatus::Applied | StepStatus::AlreadyApplied | StepStatus::Prepared
        )
    }
}
