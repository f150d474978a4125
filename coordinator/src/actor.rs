//! Who asked for an operator action, and why: one place that names an unnamed actor,
//! words the reason, and writes the audit trail's row.
use crate::store::{Audit, StoreOp};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// The operator's name (`operator` when the request did not say).
    pub name: String,
    /// Why, as the operator put it (may be empty).
    pub reason: String,
}

impl Actor {
    pub fn new(name: &str, reason: &str) -> Actor {
        let name = name.trim();
        Actor {
            name: if name.is_empty() {
                "operator".into()
            } else {
                name.to_string()
            },
            reason: reason.trim().to_string(),
        }
    }

    /// `what`, then `: <reason>` when a reason was given (just the reason when `what` is empty).
    /// Adds to the reason recorded with what the actor asked (e.g. the later plans an
    /// `--ignore-later-plans` went past).
    pub fn add_reason(&mut self, more: &str) {
        self.reason = if self.reason.is_empty() {
            more.to_string()
        } else {
            format!("{}; {more}", self.reason)
        };
    }

    pub fn explain(&self, what: &str) -> String {
        match (what.is_empty(), self.reason.is_empty()) {
            (_, true) => what.to_string(),
            (true, false) => self.reason.clone(),
            (false, false) => format!("{what}: {}", self.reason),
        }
    }

    /// The audit trail's row for `action` on `plan_id`, its detail `what` with the reason.
    pub fn audit(&self, action: &'static str, plan_id: &str, what: &str) -> StoreOp {
        StoreOp::Audit(Audit {
            actor: self.name.clone(),
            action,
            plan_id: plan_id.to_string(),
            detail: self.explain(what),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnamed_actor_is_the_operator_and_reasons_follow_a_colon() {
        let a = Actor::new("  ", "");
        assert_eq!(a.name, "operator");
        assert_eq!(a.explain("shard s1"), "shard s1");
        let b = Actor::new("alice", " bad deploy ");
        assert_eq!(b.explain("shard s1"), "shard s1: bad deploy");
        assert_eq!(b.explain(""), "bad deploy");
    }
}
