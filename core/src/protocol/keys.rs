//! The etcd key layout, as plain string builders.
//!
//! Everything lives under one prefix (default `/flotilla`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/leader/<lease hex>` | the coordinator's advertised gRPC address | the coordinator's session lease (written by etcd's election API; the leader is the key with the lowest create revision, and that revision is the epoch) |
//! | `<prefix>/locks/<shard>` | the id of the plan holding the shard | the plan's lease |
//! | `<prefix>/plans/<plan_id>/lease` | the plan lease's id, decimal | the plan's lease |
//! | `<prefix>/decisions/<group>` | `commit` or `abort` | none: decisions outlive every coordinator, agents read them to resolve in-doubt prepared transactions |
//! | `<prefix>/agents/<shard>` | free for the agent (e.g. its instance id or version) | the agent's own lease |
//! | `<prefix>/store` | the identity of the control store the group's coordinators share (written by the first to start) | none |
//!
//! The coordinator writes these keys and the agent reads some of them (its liveness
//! key, decisions): both build them here.

/// The prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/flotilla";

/// The election's name (etcd's election API puts candidates under `<name>/`).
pub const LEADER: &str = "leader";
pub const LOCKS: &str = "locks";
pub const PLANS: &str = "plans";
pub const DECISIONS: &str = "decisions";
pub const AGENTS: &str = "agents";

/// `prefix` without trailing slashes (`/flotilla/` and `/flotilla` are the same
/// prefix).
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// `<prefix>/leader`: the election name passed to campaign/observe/leader.
pub fn election(prefix: &str) -> String {
    format!("{}/{LEADER}", normalize_prefix(prefix))
}

/// `<prefix>/store`: which control store the coordinators of this group share.
pub fn store(prefix: &str) -> String {
    format!("{}/store", normalize_prefix(prefix))
}

/// `<prefix>/locks/`: every shard lock.
pub fn locks_prefix(prefix: &str) -> String {
    format!("{}/{LOCKS}/", normalize_prefix(prefix))
}

/// `<prefix>/locks/<shard>`
pub fn lock(prefix: &str, shard: &str) -> String {
    format!("{}{shard}", locks_prefix(prefix))
}

/// `<prefix>/plans/`
pub fn plans_prefix(prefix: &str) -> String {
    format!("{}/{PLANS}/", normalize_prefix(prefix))
}

/// `<prefix>/plans/<plan_id>/lease`
pub fn plan_lease(prefix: &str, plan_id: &str) -> String {
    format!("{}{plan_id}/lease", plans_prefix(prefix))
}

/// `<prefix>/decisions/`
pub fn decisions_prefix(prefix: &str) -> String {
    format!("{}/{DECISIONS}/", normalize_prefix(prefix))
}

/// `<prefix>/decisions/<group>`
pub fn decision(prefix: &str, group: &str) -> String {
    format!("{}{group}", decisions_prefix(prefix))
}

/// `<prefix>/agents/`: the liveness keys of all agents.
pub fn agents_prefix(prefix: &str) -> String {
    format!("{}/{AGENTS}/", normalize_prefix(prefix))
}

/// `<prefix>/agents/<shard>`: put by the shard's agent under its own lease.
pub fn agent(prefix: &str, shard: &str) -> String {
    format!("{}{shard}", agents_prefix(prefix))
}

/// The part of `key` after `prefix` (a shard name, a plan id), if `key` is
/// under it and the rest is not empty.
pub fn strip<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    key.strip_prefix(prefix).filter(|rest| !rest.is_empty())
}

/// The plan id of a `<prefix>/plans/<plan_id>/lease` key.
pub fn plan_of_lease_key<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    strip(key, &plans_prefix(prefix))?
        .strip_suffix("/lease")
        .filter(|plan| !plan.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(election("/flotilla"), "/flotilla/leader");
        assert_eq!(election("/flotilla/"), "/flotilla/leader");
        assert_eq!(lock("/flotilla", "shard_0"), "/flotilla/locks/shard_0");
        assert_eq!(plan_lease("/f", "p1"), "/f/plans/p1/lease");
        assert_eq!(decision("/f", "g"), "/f/decisions/g");
        assert_eq!(agent("/f", "shard_1"), "/f/agents/shard_1");
        assert_eq!(
            strip("/f/agents/shard_1", &agents_prefix("/f")),
            Some("shard_1")
        );
        assert_eq!(strip("/f/agents/", &agents_prefix("/f")), None);
        assert_eq!(plan_of_lease_key("/f/plans/p1/lease", "/f"), Some("p1"));
        assert_eq!(plan_of_lease_key("/f/plans/p1/other", "/f"), None);
    }
}
