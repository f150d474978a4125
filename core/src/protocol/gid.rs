//! Gids of Flotilla's prepared transactions: `flotilla:<unit>:<run>:<epoch>:<target>`.
//!
//! The unit is what one decision in etcd covers: the plan id for an atomic plan, or
//! `<plan>.g<N>` for its atomic parallel group N (plan ids hold no dot). The coordinator
//! builds gids; the agent checks them on receipt and, after a restart, reads the unit
//! back from the gids it finds prepared to look up their decision. Only gids with
//! Flotilla's prefix are ever touched: other applications' prepared transactions are theirs.
use std::fmt;

/// Every gid Flotilla prepares starts with it.
pub const PREFIX: &str = "flotilla:";
/// PostgreSQL's GIDSIZE is 200 bytes with the terminating NUL.
pub const MAX_BYTES: usize = 199;
/// The unit field of the preflight's probe gids (`flotilla:preflight:<hex>`).
pub const PREFLIGHT_UNIT: &str = "preflight";

/// The gid of a run's prepared transaction: the prefix, the unit, the run (its steps),
/// the epoch and the target, cut to PostgreSQL's limit (the target is last, so what is
/// cut never changes the unit, run or epoch).
pub fn gid(unit: &str, run_id: u64, epoch: u64, target: &impl fmt::Display) -> String {
    let mut g = format!("{PREFIX}{unit}:{run_id}:{epoch}:{target}");
    if g.len() > MAX_BYTES {
        let mut cut = MAX_BYTES;
        while !g.is_char_boundary(cut) {
            cut -= 1;
        }
        g.truncate(cut);
    }
    g
}

/// The decision unit of atomic parallel group `group` (0-based) of a plan.
pub fn group_unit(plan_id: &str, group: usize) -> String {
    format!("{plan_id}.g{}", group + 1)
}

/// The decision unit of a Flotilla gid: its second `:`-separated field.
pub fn unit_of(gid: &str) -> Option<&str> {
    let unit = gid.strip_prefix(PREFIX)?.split(':').next()?;
    (!unit.is_empty()).then_some(unit)
}

/// Whether `unit` decides for plan `plan_id`: the plan itself, or one of its groups.
pub fn unit_belongs_to(unit: &str, plan_id: &str) -> bool {
    unit == plan_id
        || unit
            .strip_prefix(plan_id)
            .and_then(|rest| rest.strip_prefix(".g"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The preflight's probe gid for a random `nonce`: three fields, never a run's.
pub fn probe(nonce: u64) -> String {
    format!("{PREFIX}{PREFLIGHT_UNIT}:{nonce:016x}")
}

pub fn is_probe(gid: &str) -> bool {
    gid.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix(PREFLIGHT_UNIT))
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(':'))
}

/// Why a run's prepare gid was refused on receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GidError {
    #[error("prepare gid {0:?} does not start with `{PREFIX}`")]
    Prefix(String),
    #[error("prepare gid is {0} bytes long; PostgreSQL takes fewer than 200")]
    TooLong(usize),
    #[error(
        "prepare gid {gid:?} does not belong to plan {plan_id} \
         (expected flotilla:<plan>[.g<group>]:<run>:<epoch>:<target>)"
    )]
    OtherPlan { gid: String, plan_id: String },
}

/// Checks a run's prepare gid: the prefix, PostgreSQL's length limit, and a unit of the
/// run's own plan (in-doubt resolution reads that unit's decision).
pub fn validate(gid: &str, plan_id: &str) -> Result<(), GidError> {
    if !gid.starts_with(PREFIX) {
        return Err(GidError::Prefix(gid.escape_debug().to_string()));
    }
    if gid.len() > MAX_BYTES {
        return Err(GidError::TooLong(gid.len()));
    }
    if !unit_of(gid).is_some_and(|unit| unit_belongs_to(unit, plan_id)) {
        return Err(GidError::OtherPlan {
            gid: gid.to_string(),
            plan_id: plan_id.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gid_names_its_unit_and_fits_postgres() {
        let g = gid("p1.g2", 7, 3, &"shard_0/tenant_1");
        assert_eq!(g, "flotilla:p1.g2:7:3:shard_0/tenant_1");
        assert_eq!(unit_of(&g), Some("p1.g2"));
        assert_eq!(validate(&g, "p1"), Ok(()));
        let long = gid("p1", 1, 1, &"é".repeat(200));
        assert!(long.len() <= MAX_BYTES, "{}", long.len());
        assert_eq!(unit_of(&long), Some("p1"));
        assert_eq!(group_unit("p1", 0), "p1.g1");
    }

    #[test]
    fn gids_of_other_plans_and_applications_are_refused() {
        assert!(matches!(
            validate("other:p1:1", "p1"),
            Err(GidError::Prefix(_))
        ));
        assert!(matches!(
            validate("flotilla:p2:1:1:s", "p1"),
            Err(GidError::OtherPlan { .. })
        ));
        assert!(matches!(
            validate("flotilla:p1.gx:1:1:s", "p1"),
            Err(GidError::OtherPlan { .. })
        ));
        assert!(matches!(
            validate(&format!("flotilla:p1:{}", "x".repeat(200)), "p1"),
            Err(GidError::TooLong(_))
        ));
        assert_eq!(unit_of("flotilla::1"), None);
        assert_eq!(unit_of("x:p1"), None);
    }

    #[test]
    fn probes_are_told_apart_from_runs() {
        let p = probe(0xabc);
        assert!(is_probe(&p), "{p}");
        assert!(!is_probe("flotilla:preflight:1:2:s"));
        assert!(!is_probe("flotilla:p1:1:2:s"));
    }
}
