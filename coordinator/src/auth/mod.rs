//! Who may do what: operator roles, bearer tokens, and the one table from each operator
//! RPC to the role it needs (checked in one place, `api::auth`, before any handler runs).
//!
//! Roles are cumulative along two lines that meet at `admin`:
//! `viewer` ⊂ `operator` ⊂ `admin` and `viewer` ⊂ `approver` ⊂ `admin`. An `operator`
//! cannot approve and an `approver` cannot submit: the person who rolls a change and the
//! person who signs it off are different credentials (separation of duties), while an
//! `admin` can do both (its own plans' approval is still refused by identity).
mod operators;
mod tokens;

use std::fmt;
use std::str::FromStr;

pub use operators::{
    AddedOperator, AuthMode, Caller, CertSubject, RecentRefusals, add_operator, operator_info,
    revoke_operator,
};
pub use tokens::{Token, TokenError, hash_token};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Operator,
    Approver,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// Whether an operator in this role may call an RPC that needs `needed`.
    pub fn grants(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Admin, _) | (_, Role::Viewer) => true,
            (have, needed) => have == needed,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| format!("role `{s}` is not one of viewer, operator, approver, admin"))
    }
}

/// The role each `flotilla.v1.OperatorService` method needs: THE table. A method it does
/// not name needs `admin` (deny by default), so an RPC added without a line here is
/// safe until someone decides; a unit test fails until every method is named.
pub fn required_role(method: &str) -> Role {
    match method {
        // reading: plans, the fleet, locks, the audit trail
        "GetPlan" | "ListPlans" | "WatchPlan" | "ListFleet" | "FleetStatus" | "FleetShow"
        | "FleetDrift" | "ListLocks" | "ListAudit" | "EnvStatus" => Role::Viewer,
        // a dry run asks the agents to read, and changes nothing: as reading
        "ExplainPlan" => Role::Viewer,
        // changing plans, and the journals (a baseline records migrations as applied)
        "SubmitPlan" | "CancelPlan" | "RollbackPlan" | "PausePlan" | "ResumePlan"
        | "PromotePlan" | "HaltPlan" | "RetryPlan" | "FleetBaseline" => Role::Operator,
        // signing plans off
        "ApprovePlan" | "RejectPlan" => Role::Approver,
        // overrides and identities
        // (forgetting a shard ends a plan without that shard's commit confirmed)
        // (retiring a shard takes it out of the fleet every plan is checked against)
        "BreakLock" | "ForgetShard" | "RetireShard" | "AddOperator" | "ListOperators"
        | "RevokeOperator" => Role::Admin,
        _ => Role::Admin,
    }
}

/// Methods the table names (for the test that every RPC is classified).
#[cfg(test)]
const CLASSIFIED: &[&str] = &[
    "GetPlan",
    "ListPlans",
    "WatchPlan",
    "ListFleet",
    "FleetStatus",
    "FleetShow",
    "FleetDrift",
    "ListLocks",
    "ListAudit",
    "EnvStatus",
    "ExplainPlan",
    "FleetBaseline",
    "SubmitPlan",
    "CancelPlan",
    "RollbackPlan",
    "PausePlan",
    "ResumePlan",
    "PromotePlan",
    "HaltPlan",
    "RetryPlan",
    "ApprovePlan",
    "RejectPlan",
    "BreakLock",
    "ForgetShard",
    "RetireShard",
    "AddOperator",
    "ListOperators",
    "RevokeOperator",
];

/// An operator's name: what the audit trail records, so plain and short.
pub fn validate_operator_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "operator name `{name}`: 1 to 64 of a-z, A-Z, 0-9, `-`, `_`, `.`, `@`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn roles_are_cumulative_up_to_admin_but_operating_and_approving_are_apart() {
        use Role::*;
        for r in Role::ALL {
            assert!(r.grants(Viewer), "{r} reads");
            assert!(Admin.grants(r), "admin does {r}'s");
        }
        assert!(Operator.grants(Operator) && !Operator.grants(Approver));
        assert!(Approver.grants(Approver) && !Approver.grants(Operator));
        assert!(!Viewer.grants(Operator) && !Operator.grants(Admin) && !Approver.grants(Admin));
        assert_eq!("approver".parse::<Role>(), Ok(Approver));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("viewer, operator")
        );
    }

    /// Every method of OperatorService is named in the table (read from the compiled
    /// descriptor, so a new RPC fails here until its role is decided), and an unknown
    /// method needs admin.
    #[test]
    fn every_operator_rpc_has_its_role_decided() {
        let set = prost_types_free_descriptor_methods();
        assert!(set.contains(&"SubmitPlan".to_string()), "{set:?}");
        for m in &set {
            assert!(
                CLASSIFIED.contains(&m.as_str()),
                "OperatorService/{m} has no line in auth::required_role"
            );
        }
        assert_eq!(required_role("SomethingNew"), Role::Admin);
        assert_eq!(required_role("SubmitPlan"), Role::Operator);
        assert_eq!(required_role("ApprovePlan"), Role::Approver);
        assert_eq!(required_role("FleetStatus"), Role::Viewer);
    }

    /// The method names of `flotilla.v1.OperatorService`, decoded from the file
    /// descriptor set with prost alone (a minimal mirror of descriptor.proto's fields).
    fn prost_types_free_descriptor_methods() -> Vec<String> {
        #[derive(Clone, PartialEq, Message)]
        struct Set {
            #[prost(message, repeated, tag = "1")]
            file: Vec<File>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct File {
            #[prost(string, optional, tag = "2")]
            package: Option<String>,
            #[prost(message, repeated, tag = "6")]
            service: Vec<Service>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct Service {
            #[prost(string, optional, tag = "1")]
            name: Option<String>,
            #[prost(message, repeated, tag = "2")]
            method: Vec<Method>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct Method {
            #[prost(string, optional, tag = "1")]
            name: Option<String>,
        }
        let set = Set::decode(flotilla_core::pb::FILE_DESCRIPTOR_SET).unwrap();
        set.file
            .iter()
            .filter(|f| f.package.as_deref() == Some("flotilla.v1"))
            .flat_map(|f| &f.service)
            .filter(|s| s.name.as_deref() == Some("OperatorService"))
            .flat_map(|s| &s.method)
            .filter_map(|m| m.name.clone())
            .collect()
    }
}
