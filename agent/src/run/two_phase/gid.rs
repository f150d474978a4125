//! The shape of Flotilla's prepare gids.
use flotilla_core::protocol::gid;

use super::TwoPhaseError;
use crate::step::quote_literal;

/// Checks a run's prepare gid and returns it quoted: `flotilla:`, shorter than 200 bytes, and
/// its unit is the run's plan or one of its groups (in-doubt resolution reads that unit's
/// decision). The shape is the protocol's ([`gid`]).
pub(crate) fn validate_gid(g: &str, plan_id: &str) -> Result<String, TwoPhaseError> {
    gid::validate(g, plan_id)?;
    Ok(quote_literal(g)?)
}

/// The decision unit of a Flotilla gid (the plan, or `<plan>.g<N>`).
pub(crate) fn plan_of_gid(g: &str) -> Option<&str> {
    gid::unit_of(g)
}

/// The preflight's probe gid: `flotilla:preflight:<hex>` (three fields, never a run's).
pub(super) fn probe_gid() -> String {
    gid::probe(rand::random::<u64>())
}

pub(crate) fn is_probe(g: &str) -> bool {
    gid::is_probe(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids() {
        assert_eq!(
            validate_gid("flotilla:p1:7:3:tenant_1", "p1").unwrap(),
            "'flotilla:p1:7:3:tenant_1'"
        );
        // the shard itself: an empty target
        assert!(validate_gid("flotilla:p1:7:3:", "p1").is_ok());
        assert!(
            validate_gid("other:p1:7:3:t", "p1")
                .unwrap_err()
                .to_string()
                .contains("does not start with `flotilla:`")
        );
        assert!(
            validate_gid("flotilla:p2:7:3:t", "p1")
                .unwrap_err()
                .to_string()
                .contains("does not belong to plan p1")
        );
        let long = format!("flotilla:p1:7:3:{}", "x".repeat(183));
        assert_eq!(long.len(), 199);
        assert!(validate_gid(&long, "p1").is_ok());
        let too_long = format!("{long}x");
        assert!(
            validate_gid(&too_long, "p1")
                .unwrap_err()
                .to_string()
                .contains("200")
        );
        assert!(validate_gid("flotilla:p1:1:1:a\0b", "p1").is_err());
        assert_eq!(
            validate_gid("flotilla:p1:1:1:it's", "p1").unwrap(),
            "'flotilla:p1:1:1:it''s'"
        );

        // An atomic parallel group's unit.
        assert!(validate_gid("flotilla:p1.g2:7:3:t", "p1").is_ok());
        assert!(validate_gid("flotilla:p1.g:7:3:t", "p1").is_err());
        assert!(validate_gid("flotilla:p1.gx:7:3:t", "p1").is_err());
        assert!(validate_gid("flotilla:p12:7:3:t", "p1").is_err());
        assert_eq!(plan_of_gid("flotilla:p1.g2:7:3:t"), Some("p1.g2"));
        assert_eq!(plan_of_gid("flotilla:p1:7:3:t"), Some("p1"));
        assert_eq!(plan_of_gid("flotilla:p1"), Some("p1"));
        assert_eq!(plan_of_gid("flotilla::7"), None);
        assert_eq!(plan_of_gid("other-app-1"), None);
    }

    #[test]
    fn probes_are_told_apart_from_runs() {
        let gid = probe_gid();
        assert!(
            gid.starts_with("flotilla:preflight:") && is_probe(&gid),
            "{gid}"
        );
        assert!(!is_probe("flotilla:preflight:1:1:t"));
        assert!(!is_probe("flotilla:preflight:"));
        assert!(!is_probe("flotilla:p1:1:1:t"));
    }
}
