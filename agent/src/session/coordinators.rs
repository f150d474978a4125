//! Which coordinator to dial next. With several coordinators (HA), only the etcd-elected
//! leader takes agents: a follower refuses `Attach` with UNAVAILABLE, says so in the
//! protocol's refusal metadata, and, when it knows, names the leader's address in the
//! `flotilla-leader` metadata. The agent dials the configured addresses in turn, follows the
//! leader a refusal names (even one that is not in its list), and backs off only once a
//! whole round of the list failed. With TLS configured, a named leader whose address is not
//! https:// is not followed: the follower read it from the leader's key in etcd (the leader's
//! `--advertise`, or whatever was written there), and following it would open the agent's
//! stream in plaintext.
use flotilla_core::protocol;
use tonic::{Code, Status};

/// When `status` is a follower's refusal: `Some(the leader it named, if any)`, as named
/// (the scheme a bare `host:port` lacks is the rotation's to add: see [`Rotation::refused`]).
/// Read from the metadata (the protocol's), never from the message, which is for people.
pub(crate) fn refusal(status: &Status) -> Option<Option<String>> {
    if status.code() != Code::Unavailable {
        return None;
    }
    protocol::not_leader(status).map(|leader| {
        leader
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
    })
}

/// An address as an endpoint URI: `host:port` becomes `https://host:port` under TLS,
/// `http://host:port` without (as the CLI reads a bare address).
fn with_scheme(address: &str, tls: bool) -> String {
    match address.contains("://") {
        true => address.to_string(),
        false if tls => format!("https://{address}"),
        false => format!("http://{address}"),
    }
}

/// A named leader the agent does not follow: TLS is configured and its address is not
/// https://. Says which address, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{follower} redirected the agent to the leader at {leader} (read from the leader's key in \
     etcd: its --advertise), which is not https://: with --tls-* given, the agent does not \
     follow a redirect to plaintext (its stream would go unencrypted); give the leader an \
     https:// --advertise"
)]
pub(crate) struct Downgrade {
    pub follower: String,
    pub leader: String,
}

/// The order in which the session dials coordinators.
#[derive(Debug)]
pub(crate) struct Rotation {
    addresses: Vec<String>,
    /// The index of the next address of the list to dial.
    next: usize,
    /// A leader named by a refusal: dialed before the list goes on.
    redirect: Option<String>,
    /// Leaders followed this round, each at most once (two followers naming each other from
    /// stale views must not keep the agent bouncing without ever backing off).
    followed: Vec<String>,
    /// Addresses of the list dialed this round.
    tried: usize,
    /// TLS is configured: a named leader must be https://.
    tls: bool,
}

impl Rotation {
    /// `addresses` must not be empty (the configuration is validated first); `tls`: the
    /// agent has TLS files (its connections to https:// addresses are TLS).
    pub fn new(addresses: Vec<String>, tls: bool) -> Rotation {
        assert!(!addresses.is_empty(), "at least one coordinator address");
        Rotation {
            addresses,
            next: 0,
            redirect: None,
            followed: Vec::new(),
            tried: 0,
            tls,
        }
    }

    /// The address to dial now: the leader a refusal named, else the next one of the list.
    pub fn next_address(&mut self) -> String {
        if let Some(leader) = self.redirect.take() {
            return leader;
        }
        let address = self.addresses[self.next].clone();
        self.next = (self.next + 1) % self.addresses.len();
        self.tried += 1;
        address
    }

    /// `address` refused the agent as not the leader, naming `leader` (when it knows it).
    /// Returns whether that leader is dialed next; [`Downgrade`] (and the list goes on)
    /// when TLS is configured and the leader named is not https://.
    pub fn refused(&mut self, address: &str, leader: Option<String>) -> Result<bool, Downgrade> {
        let Some(leader) = leader.map(|l| with_scheme(&l, self.tls)) else {
            return Ok(false);
        };
        if self.tls && !flotilla_core::tls::is_https(&leader) {
            return Err(Downgrade {
                follower: flotilla_core::secrets::redact_url(address),
                leader: flotilla_core::secrets::redact_url(&leader),
            });
        }
        if leader == address || self.followed.contains(&leader) {
            return Ok(false);
        }
        self.followed.push(leader.clone());
        self.redirect = Some(leader);
        Ok(true)
    }

    /// Every address of the list was dialed since the round began, and no named leader is
    /// left to try: time to back off.
    pub fn round_failed(&self) -> bool {
        self.redirect.is_none() && self.tried >= self.addresses.len()
    }

    /// Starts a round: after a backoff, or once a coordinator welcomed the agent.
    pub fn new_round(&mut self) {
        self.tried = 0;
        self.followed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn list(addresses: &[&str]) -> Rotation {
        Rotation::new(addresses.iter().map(|a| a.to_string()).collect(), false)
    }

    #[test]
    fn dials_the_list_in_turn_and_backs_off_after_a_round() {
        let mut r = list(&["http://a", "http://b", "http://c"]);
        assert_eq!(r.next_address(), "http://a");
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://b");
        assert_eq!(r.next_address(), "http://c");
        assert!(r.round_failed());
        r.new_round();
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://a");

        let mut one = list(&["http://a"]);
        assert_eq!(one.next_address(), "http://a");
        assert!(one.round_failed());
        one.new_round();
        assert_eq!(one.next_address(), "http://a");
    }

    #[test]
    fn follows_the_named_leader_once_per_round() {
        let mut r = list(&["http://a", "http://b", "http://c"]);
        assert_eq!(r.next_address(), "http://a");
        // a names a leader outside the list: it is dialed next, before b
        assert_eq!(r.refused("http://a", Some("http://z".into())), Ok(true));
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://z");
        // z names b (stale): followed, then the list goes on after b
        assert_eq!(r.refused("http://z", Some("http://b".into())), Ok(true));
        assert_eq!(r.next_address(), "http://b");
        // b names z again: already followed this round, so the list goes on
        assert_eq!(r.refused("http://b", Some("http://z".into())), Ok(false));
        assert_eq!(r.next_address(), "http://b");
        assert_eq!(r.next_address(), "http://c");
        // no leader named, or itself: nothing to follow
        assert_eq!(r.refused("http://c", None), Ok(false));
        assert_eq!(r.refused("http://c", Some("http://c".into())), Ok(false));
        assert!(r.round_failed());
        r.new_round();
        assert_eq!(r.refused("http://a", Some("http://z".into())), Ok(true));
        assert_eq!(r.next_address(), "http://z");
    }

    #[test]
    fn a_named_leader_postpones_the_backoff() {
        let mut r = list(&["http://a"]);
        assert_eq!(r.next_address(), "http://a");
        assert_eq!(r.refused("http://a", Some("http://b".into())), Ok(true));
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://b");
        assert!(r.round_failed());
    }

    /// Under TLS, a follower naming a plaintext leader (a mis-set --advertise, or the
    /// leader's key overwritten in etcd) is not followed: it was, and the agent opened its
    /// stream in plaintext. The refusal names the address and where it came from; the list
    /// goes on (its https:// addresses), and backs off after the round as without a leader.
    #[test]
    fn under_tls_a_redirect_to_plaintext_is_not_followed() {
        let mut r = Rotation::new(vec!["https://a".into(), "https://b".into()], true);
        assert_eq!(r.next_address(), "https://a");
        let refused = r
            .refused("https://a", Some("http://z:7070".into()))
            .unwrap_err();
        assert_eq!(refused.leader, "http://z:7070");
        let said = refused.to_string();
        assert!(
            said.starts_with("https://a redirected the agent to the leader at http://z:7070")
                && said.contains("leader's key in etcd")
                && said.contains("not https://"),
            "{said}"
        );
        assert_eq!(r.next_address(), "https://b");
        assert!(r.round_failed());
        // a bare HOST:PORT is https:// under TLS (as the CLI reads it), and followed
        assert_eq!(r.refused("https://b", Some("z:7070".into())), Ok(true));
        assert_eq!(r.next_address(), "https://z:7070");
        // without TLS files there is nothing to downgrade
        let mut plain = list(&["http://a"]);
        assert_eq!(plain.refused("http://a", Some("z:7070".into())), Ok(true));
        assert_eq!(plain.next_address(), "http://z:7070");
    }

    #[test]
    fn reads_refusals_from_metadata() {
        let refused = |leader: Option<&'static str>| {
            let mut status = Status::unavailable("not the leader");
            status.metadata_mut().insert(
                protocol::REFUSAL_METADATA,
                MetadataValue::from_static(protocol::REFUSAL_NOT_LEADER),
            );
            if let Some(l) = leader {
                status
                    .metadata_mut()
                    .insert(protocol::LEADER_METADATA, MetadataValue::from_static(l));
            }
            status
        };
        assert_eq!(refusal(&refused(None)), Some(None));
        assert_eq!(
            refusal(&refused(Some(" 10.0.0.2:7070 "))),
            Some(Some("10.0.0.2:7070".into()))
        );
        assert_eq!(
            refusal(&refused(Some("https://c2:7070"))),
            Some(Some("https://c2:7070".into()))
        );
        // the message alone says nothing to a program
        assert_eq!(refusal(&Status::unavailable("not the leader")), None);
        assert_eq!(refusal(&Status::unavailable("shutting down")), None);
    }
}
