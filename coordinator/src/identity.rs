//! Agent identity: under mTLS, an agent's certificate must name the shard it says it is,
//! by a URI SAN `flotilla-agent:<shard>` or by its common name in the mapping file
//! (`--agent-identities`). An agent holding shard A's certificate that says it is shard B
//! is refused (PERMISSION_DENIED) and audited: a stolen or copied certificate reaches one
//! shard at most.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use flotilla_core::tls::AGENT_URI_PREFIX;
use tracing::warn;

use crate::api::peer::PeerCert;
use crate::error::CoordinatorError;
use crate::service::Coordinator;
use crate::store::{Audit, StoreOp};

/// The audit trail's action for an agent refused for its certificate.
pub const AGENT_REFUSED: &str = "agent-refused";
/// The audit trail's action for a connection refused in the TLS handshake.
pub const TLS_REFUSED: &str = "tls-refused";

/// Which certificates may attach as which shard.
#[derive(Debug, Clone, Default)]
pub struct AgentIdentities {
    /// Whether agents' certificates are checked at all: only under mTLS (a CA given).
    pub required: bool,
    /// Certificate common name to shard, for certificates without a URI SAN.
    pub by_common_name: BTreeMap<String, String>,
}

impl AgentIdentities {
    /// Reads the mapping file: TOML, `"<common name>" = "<shard>"` per line.
    pub fn load_mapping(path: &Path) -> Result<BTreeMap<String, String>, CoordinatorError> {
        let bad = |reason: String| {
            CoordinatorError::Tls(format!("--agent-identities {}: {reason}", path.display()))
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let map: BTreeMap<String, String> =
            toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for (cn, shard) in &map {
            flotilla_core::validate_shard_name(shard)
                .map_err(|e| bad(format!("common name `{cn}`: {e}")))?;
        }
        Ok(map)
    }

    /// The shards a certificate names: its `flotilla-agent:` URI SANs, else its common
    /// name's entry in the mapping.
    pub fn shards_of(&self, cert: &PeerCert) -> Vec<String> {
        let mut by_san: Vec<String> = cert
            .uri_sans
            .iter()
            .filter_map(|uri| uri.strip_prefix(AGENT_URI_PREFIX))
            .map(str::to_string)
            .collect();
        by_san.sort();
        by_san.dedup();
        if !by_san.is_empty() {
            return by_san;
        }
        cert.common_name
            .as_ref()
            .and_then(|cn| self.by_common_name.get(cn))
            .cloned()
            .into_iter()
            .collect()
    }

    /// Ok when `cert` may attach as `shard`; else why not.
    pub fn check(&self, shard: &str, cert: Option<&PeerCert>) -> Result<(), String> {
        if !self.required {
            return Ok(());
        }
        let Some(cert) = cert else {
            return Err(format!(
                "an agent saying it is shard {shard} presented no client certificate"
            ));
        };
        let named = self.shards_of(cert);
        let holder = cert.display_name();
        // One certificate, one shard: one naming several let whoever holds it attach as
        // any of them (and an agent's stolen key stand for more than its own shard).
        if named.len() > 1 {
            return Err(format!(
                "certificate {holder} names several shards ({}); an agent's certificate stands for one shard: issue one per shard",
                named.join(", ")
            ));
        }
        if named.iter().any(|s| s == shard) {
            return Ok(());
        }
        if named.is_empty() {
            Err(format!(
                "certificate {holder} names no shard (no URI SAN {AGENT_URI_PREFIX}<shard>, and its common name is not in --agent-identities); it may not attach as shard {shard}"
            ))
        } else {
            Err(format!(
                "certificate {holder} is shard {}'s; it may not attach as shard {shard}",
                named.join(", ")
            ))
        }
    }
}

impl Coordinator {
    /// Admits an agent saying it is `shard` with `cert`, or refuses it (audited, nothing
    /// else changed: no agent row, no attachment).
    pub fn admit_agent(
        &self,
        shard: &str,
        cert: Option<&PeerCert>,
        from: Option<SocketAddr>,
    ) -> Result<(), CoordinatorError> {
        let Err(reason) = self.inner.agent_identities.check(shard, cert) else {
            return Ok(());
        };
        crate::metrics::connection_refused("wrong_shard");
        // Named as a certificate, not as the operator a common name may also be: the row
        // read "root agent-refused", as if admin root had done something.
        let actor = format!(
            "certificate {}",
            cert.map_or_else(|| "unknown".into(), PeerCert::display_name)
        );
        if self.first_certificate_refusal(from, &actor, AGENT_REFUSED, &reason) {
            let from = from.map_or_else(|| "an unknown address".into(), |a| a.to_string());
            warn!(shard, %from, "agent refused: {reason}");
            self.write_unfenced(StoreOp::Audit(Audit {
                actor,
                action: AGENT_REFUSED,
                plan_id: String::new(),
                detail: format!("{reason} (from {from})"),
            }));
        }
        Err(CoordinatorError::NotAllowed(reason))
    }

    /// Audits a connection refused in the TLS handshake for its certificate.
    pub fn audit_tls_refusal(&self, from: SocketAddr, reason: String) {
        if self.first_certificate_refusal(Some(from), "unknown", TLS_REFUSED, &reason) {
            warn!(peer = %from, "TLS connection refused: {reason}");
            self.write_unfenced(StoreOp::Audit(Audit {
                actor: "unknown".into(),
                action: TLS_REFUSED,
                plan_id: String::new(),
                detail: format!("{reason} (from {from})"),
            }));
        }
    }

    /// Whether this certificate refusal is the first like it from its host in the window:
    /// a refused agent retries every few seconds, and anyone reaching the port can open
    /// connections without a certificate, so repeats are counted (the metric) but not
    /// written, and the store cannot be filled with them.
    fn first_certificate_refusal(
        &self,
        from: Option<SocketAddr>,
        actor: &str,
        action: &str,
        reason: &str,
    ) -> bool {
        let host = from.map_or_else(String::new, |a| a.ip().to_string());
        self.inner.refusals_seen.first_within(
            format!("{host} {actor} {action} {}", numbers_as_one(reason)),
            crate::auth::RecentRefusals::CERTIFICATE_WINDOW,
        )
    }
}

/// A refusal's reason with each run of digits as `#`: an expired certificate's says the
/// time of each handshake ("verification time 1796579017 (UNIX) ... (89833417 seconds
/// ago)"), and every retry of an agent left running with one was written as a new row.
fn numbers_as_one(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    for c in reason.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason of an expired certificate's refusal changes at each handshake (the time
    /// in it): the same refusal all the same, written once in the window.
    #[test]
    fn refusals_that_differ_only_in_their_times_are_one() {
        let at = |now: u64, ago: u64| {
            format!(
                "invalid peer certificate: certificate expired: verification time {now} (UNIX), \
                 but certificate is not valid after 1706745600 ({ago} seconds ago)"
            )
        };
        assert_eq!(
            numbers_as_one(&at(1796579017, 89833417)),
            numbers_as_one(&at(1796579021, 89833421))
        );
        let seen = crate::auth::RecentRefusals::default();
        let key =
            |reason: &str| format!("127.0.0.1 unknown tls-refused {}", numbers_as_one(reason));
        let window = crate::auth::RecentRefusals::CERTIFICATE_WINDOW;
        assert!(seen.first_within(key(&at(1796579017, 89833417)), window));
        assert!(!seen.first_within(key(&at(1796579099, 89833499)), window));
        assert!(seen.first_within(key("invalid peer certificate: UnknownIssuer"), window));
    }

    fn cert(cn: Option<&str>, uris: &[&str]) -> PeerCert {
        PeerCert {
            common_name: cn.map(str::to_string),
            uri_sans: uris.iter().map(|u| u.to_string()).collect(),
            dns_sans: Vec::new(),
            valid_from_s: 0,
        }
    }

    #[test]
    fn a_certificate_attaches_only_as_the_shard_it_names() {
        let ids = AgentIdentities {
            required: true,
            by_common_name: BTreeMap::from([("agent-b.example".into(), "b".into())]),
        };
        let a = cert(Some("agent-a"), &["flotilla-agent:a"]);
        assert!(ids.check("a", Some(&a)).is_ok());
        let e = ids.check("b", Some(&a)).unwrap_err();
        assert!(e.contains("shard a's") && e.contains("as shard b"), "{e}");
        let b = cert(Some("agent-b.example"), &[]);
        assert!(ids.check("b", Some(&b)).is_ok());
        assert!(ids.check("a", Some(&b)).is_err());
        let operator = cert(Some("alice"), &[]);
        assert!(
            ids.check("a", Some(&operator))
                .unwrap_err()
                .contains("names no shard")
        );
        assert!(ids.check("a", None).is_err());
        let both = cert(Some("agent-ab"), &["flotilla-agent:a", "flotilla-agent:b"]);
        for shard in ["a", "b"] {
            let e = ids.check(shard, Some(&both)).unwrap_err();
            assert!(e.contains("names several shards (a, b)"), "{e}");
        }
        let twice = cert(Some("agent-a"), &["flotilla-agent:a", "flotilla-agent:a"]);
        assert!(ids.check("a", Some(&twice)).is_ok());
        let off = AgentIdentities::default();
        assert!(off.check("a", None).is_ok());
    }
}
