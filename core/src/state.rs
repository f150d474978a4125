//! The states of plans and steps, with the one string each has in the control store,
//! on the wire (`PlanSummary.state`) and in metrics. Matches over them are exhaustive:
//! a new state cannot be forgotten in a status count or a metric.
use std::fmt;
use std::str::FromStr;

/// Where a plan is. Terminal states are those a plan never leaves by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlanState {
    /// Stored and waiting for the approvals its environment and risk need (the
    /// coordinator's approval matrix): no lock taken, nothing sent to any shard.
    AwaitingApproval,
    Running,
    /// Stop policy or an operator's cancel: waiting for in-flight runs before ending.
    Stopping,
    /// Atomic units: every target prepared; the commit decision is (being) written and
    /// agents commit their prepared transactions.
    Committing,
    /// Atomic units: a step failed; in-flight runs finish, then the abort decision,
    /// ROLLBACK PREPARED everywhere, then the rollback of what committed.
    Aborting,
    /// Undoing applied steps.
    RollingBack,
    Completed,
    /// Every wave done; some targets failed, within the error budget (listed in failures).
    CompletedWithFailures,
    Failed,
    /// Stopped where it was (an operator's `plan halt`, or an error budget past its limit
    /// under `on_budget_exhausted = "halt"`): what applied stays.
    Halted,
    RolledBack,
    RollbackFailed,
    Cancelled,
    /// An approver said no while it was awaiting approval: nothing ran.
    Rejected,
}

impl PlanState {
    pub const ALL: [PlanState; 14] = [
        PlanState::AwaitingApproval,
        PlanState::Running,
        PlanState::Stopping,
        PlanState::Committing,
        PlanState::Aborting,
        PlanState::RollingBack,
        PlanState::Completed,
        PlanState::CompletedWithFailures,
        PlanState::Failed,
        PlanState::Halted,
        PlanState::RolledBack,
        PlanState::RollbackFailed,
        PlanState::Cancelled,
        PlanState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PlanState::AwaitingApproval => "awaiting_approval",
            PlanState::Running => "running",
            PlanState::Stopping => "stopping",
            PlanState::Committing => "committing",
            PlanState::Aborting => "aborting",
            PlanState::RollingBack => "rolling_back",
            PlanState::Completed => "completed",
            PlanState::CompletedWithFailures => "completed_with_failures",
            PlanState::Failed => "failed",
            PlanState::Halted => "halted",
            PlanState::RolledBack => "rolled_back",
            PlanState::RollbackFailed => "rollback_failed",
            PlanState::Cancelled => "cancelled",
            PlanState::Rejected => "rejected",
        }
    }

    pub fn is_terminal(self) -> bool {
        match self {
            PlanState::Completed
            | PlanState::CompletedWithFailures
            | PlanState::Halted
            | PlanState::Failed
            | PlanState::RolledBack
            | PlanState::RollbackFailed
            | PlanState::Cancelled
            | PlanState::Rejected => true,
            PlanState::AwaitingApproval
            | PlanState::Running
            | PlanState::Stopping
            | PlanState::Committing
            | PlanState::Aborting
            | PlanState::RollingBack => false,
        }
    }

    /// Whether a wire or stored state string names a terminal state (`paused`, the
    /// operator's view of a running plan, is not one).
    pub fn is_terminal_str(s: &str) -> bool {
        s.parse::<PlanState>().is_ok_and(PlanState::is_terminal)
    }
}

/// The operator's view of a running plan paused as a whole (`PlanSummary.state`); never
/// stored: the plan is `running` underneath.
pub const PAUSED: &str = "paused";
/// The operator's view of a running plan waiting at a wave's manual gate for `plan promote`.
pub const WAITING: &str = "waiting";

/// Where one wave of a plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaveState {
    /// An earlier wave is not done.
    Pending,
    Running,
    /// Its targets are done; waiting for the bake time to pass.
    Baking,
    /// Baked; the agents run its SQL gates on its targets.
    Checking,
    /// Baked; waiting at its manual gate for `plan promote`.
    Waiting,
    Done,
    /// The plan stopped during it (halt, budget, failure under all-or-nothing).
    Halted,
}

impl WaveState {
    pub const ALL: [WaveState; 7] = [
        WaveState::Pending,
        WaveState::Running,
        WaveState::Baking,
        WaveState::Checking,
        WaveState::Waiting,
        WaveState::Done,
        WaveState::Halted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "pending",
            WaveState::Running => "running",
            WaveState::Baking => "baking",
            WaveState::Checking => "checking",
            WaveState::Waiting => "waiting",
            WaveState::Done => "done",
            WaveState::Halted => "halted",
        }
    }
}

impl FromStr for WaveState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<WaveState, UnknownState> {
        WaveState::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "wave",
                value: s.to_string(),
            })
    }
}

/// Where one step (migration x target) is, as the control store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepState {
    Pending,
    Running,
    Applied,
    /// The shard's journal already held it (with the same checksum).
    AlreadyApplied,
    Failed,
    RolledBack,
    NotRun,
    /// In a prepared transaction on its shard, waiting for its unit's decision.
    Prepared,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Applied => "applied",
            StepState::AlreadyApplied => "already_applied",
            StepState::Failed => "failed",
            StepState::RolledBack => "rolled_back",
            StepState::NotRun => "not_run",
            StepState::Prepared => "prepared",
        }
    }
}

/// A state string that names no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state {value:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

impl FromStr for PlanState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<PlanState, UnknownState> {
        PlanState::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "plan",
                value: s.to_string(),
            })
    }
}

impl FromStr for StepState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<StepState, UnknownState> {
        [
            StepState::Pending,
            StepState::Running,
            StepState::Applied,
            StepState::AlreadyApplied,
            StepState::Failed,
            StepState::RolledBack,
            StepState::NotRun,
            StepState::Prepared,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| UnknownState {
            kind: "step",
            value: s.to_string(),
        })
    }
}

impl fmt::Display for PlanState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_one_string_that_reads_back() {
        for p in PlanState::ALL {
            assert_eq!(p.as_str().parse::<PlanState>(), Ok(p));
        }
        assert!(PlanState::is_terminal_str("rolled_back"));
        assert!(!PlanState::is_terminal_str(PAUSED));
        assert!(!PlanState::is_terminal_str("committing"));
        assert!(!PlanState::is_terminal_str("awaiting_approval"));
        assert!(PlanState::is_terminal_str("rejected"));
        assert!("nonsense".parse::<StepState>().is_err());
        assert_eq!(
            "already_applied".parse::<StepState>(),
            Ok(StepState::AlreadyApplied)
        );
    }
}
