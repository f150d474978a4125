//! Which coordinator to dial next. With several coordinators (HA), only the etcd-elected
//! leader takes agents: a follower refuses `Attach` with UNAVAILABLE, says so in the
//! protocol's refusal metadata, and, when it knows, names the leader's address in the
//! `flotilla-leader` metadata. The agent dials the configured addresses in turn, follows the
//! leader a refusal names (even one that is not in its list), and backs off only once a
//! whole round of the list failed.
use flotilla_core::protocol;
use tonic::{Code, Status};

/// When `status` is a follower's refusal: `Some(the leader it named, if any)`. Read from
/// the metadata (the protocol's), never from the message, which is for people.
pub(crate) fn refusal(status: &Status) -> Option<Option<String>> {
    if status.code() != Code::Unavailable {
        return None;
    }
    protocol::not_leader(status).map(|leader| {
        leader
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .map(|l| with_scheme(&l))
    })
}

/// An address as an endpoint URI: `host:port` becomes `http://host:port`.
pub(crate) fn with_scheme(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
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
}

impl Rotation {
    /// `addresses` must not be empty (the configuration is validated first).
    pub fn new(addresses: Vec<String>) -> Rotation {
        assert!(!addresses.is_empty(), "at least one coordinator address");
        Rotation {
            addresses,
            next: 0,
            redirect: None,
            followed: Vec::new(),
            tried: 0,
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
    /// Returns whether that leader is dialed next.
    pub fn refused(&mut self, address: &str, leader: Option<String>) -> bool {
        match leader {
            Some(leader) if leader != address && !self.followed.contains(&leader) => {
                self.followed.push(leader.clone());
                self.redirect = Some(leader);
                true
            }
            _ => false,
        }
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
        Rotation::new(addresses.iter().map(|a| a.to_string()).collect())
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
        assert!(r.refused("http://a", Some("http://z".into())));
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://z");
        // z names b (stale): followed, then the list goes on after b
        assert!(r.refused("http://z", Some("http://b".into())));
        assert_eq!(r.next_address(), "http://b");
        // b names z again: already followed this round, so the list goes on
        assert!(!r.refused("http://b", Some("http://z".into())));
        assert_eq!(r.next_address(), "http://b");
        assert_eq!(r.next_address(), "http://c");
        // no leader named, or itself: nothing to follow
        assert!(!r.refused("http://c", None));
        assert!(!r.refused("http://c", Some("http://c".into())));
        assert!(r.round_failed());
        r.new_round();
        assert!(r.refused("http://a", Some("http://z".into())));
        assert_eq!(r.next_address(), "http://z");
    }

    #[test]
    fn a_named_leader_postpones_the_backoff() {
        let mut r = list(&["http://a"]);
        assert_eq!(r.next_address(), "http://a");
        assert!(r.refused("http://a", Some("http://b".into())));
        assert!(!r.round_failed());
        assert_eq!(r.next_address(), "http://b");
        assert!(r.round_failed());
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
            refusal(&refused(Some("10.0.0.2:7070"))),
            Some(Some("http://10.0.0.2:7070".into()))
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
