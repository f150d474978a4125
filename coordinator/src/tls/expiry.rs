//! The serving certificate over time: read again at each reload request (SIGHUP), and its
//! notAfter watched, so that one expiring while the coordinator runs is said before (a
//! warning, daily from [`WARN_WITHIN`] before), and after (an error, `/readyz` not ready,
//! see [`ServingCertificate::expired`]); `flotilla_tls_certificate_expiry_timestamp_seconds`
//! holds its notAfter for alerts. Before, it went unnoticed: `/readyz` ready, no metric,
//! every new handshake refused by its client.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_core::reload::ReloadRequests;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use super::{ServerTls, ServingCertificate};

/// How long before its notAfter the serving certificate is warned about.
pub const WARN_WITHIN: Duration = Duration::from_secs(14 * 24 * 3600);

/// How often a certificate that is about to expire, or has, is said again.
const SAY_EVERY: Duration = Duration::from_secs(24 * 3600);

/// How often the time left is looked at (the warning's cadence is [`SAY_EVERY`]).
const CHECK_EVERY: Duration = Duration::from_secs(600);

/// Now, in seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl ServingCertificate {
    /// Why the coordinator is not ready for this certificate at `now` (Unix seconds): it
    /// expired, and every client refuses it (past its notAfter second: valid through it, as
    /// clients check it).
    pub fn expired(&self, now: i64) -> Option<String> {
        (self.seconds_left(now) < 0).then(|| {
            format!(
                "the serving certificate (--tls-cert {}, {}) expired {}: clients refuse every new connection; renew it and send the coordinator SIGHUP",
                self.file,
                self.subject,
                self.not_after_shown()
            )
        })
    }

    /// What to say of it at `now`: an error once it expired, a warning within
    /// [`WARN_WITHIN`] of its notAfter, nothing before.
    fn due(&self, now: i64) -> Option<Said> {
        if let Some(why) = self.expired(now) {
            return Some(Said::Expired(why));
        }
        let left = self.seconds_left(now);
        (left <= WARN_WITHIN.as_secs() as i64).then(|| {
            Said::Expiring(format!(
                "the serving certificate (--tls-cert {}, {}) expires {} (in {}): renew it and send the coordinator SIGHUP",
                self.file,
                self.subject,
                self.not_after_shown(),
                humantime::format_duration(Duration::from_secs(left.max(0) as u64))
            ))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    Expiring(String),
    Expired(String),
}

/// What was said last, of which certificate, when: a certificate is said again after
/// [`SAY_EVERY`], when it turns from expiring to expired, or when another one is served.
#[derive(Default)]
struct LastSaid(Option<(ServingCertificate, bool, Instant)>);

impl LastSaid {
    fn say(&mut self, certificate: &ServingCertificate, now: i64, at: Instant) {
        let Some(said) = certificate.due(now) else {
            self.0 = None;
            return;
        };
        let expired = matches!(said, Said::Expired(_));
        if let Some((before, was_expired, when)) = &self.0
            && before == certificate
            && *was_expired == expired
            && at.duration_since(*when) < SAY_EVERY
        {
            return;
        }
        match said {
            Said::Expiring(what) => warn!(
                subject = %certificate.subject,
                not_after = %certificate.not_after_shown(),
                "{what}"
            ),
            Said::Expired(what) => error!(
                subject = %certificate.subject,
                not_after = %certificate.not_after_shown(),
                "{what}"
            ),
        }
        self.0 = Some((certificate.clone(), expired, at));
    }
}

/// Reloads `tls` at each of `reloads` and watches its certificate's notAfter, until the
/// process ends.
pub fn follow(tls: ServerTls, mut reloads: ReloadRequests) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut said = LastSaid::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = reloads.next() => reload(&tls),
            }
            said.say(&tls.certificate(), unix_now(), Instant::now());
        }
    })
}

/// One reload, said: the new certificate, or why the files were not taken (the old one is
/// still served).
fn reload(tls: &ServerTls) {
    let before = tls.certificate();
    match tls.reload() {
        Ok(now) => info!(
            subject = %now.subject,
            not_after = %now.not_after_shown(),
            file = %now.file,
            "TLS files reloaded: new connections are served the certificate {} (valid until {})",
            now.subject,
            now.not_after_shown()
        ),
        Err(e) => error!(
            subject = %before.subject,
            not_after = %before.not_after_shown(),
            "reloading the TLS files failed, nothing changed: still serving the certificate {} (valid until {}): {e}",
            before.subject,
            before.not_after_shown()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: i64) -> ServingCertificate {
        ServingCertificate {
            file: "/etc/flotilla/coordinator.pem".into(),
            subject: "CN=coordinator".into(),
            not_after,
        }
    }

    const DAY: i64 = 24 * 3600;

    #[test]
    fn a_certificate_is_said_within_two_weeks_of_expiry_and_once_expired() {
        let now = 1_800_000_000;
        assert_eq!(certificate(now + 15 * DAY).due(now), None);
        let Some(Said::Expiring(w)) = certificate(now + 3 * DAY).due(now) else {
            panic!("not warned")
        };
        assert!(
            w.contains("--tls-cert /etc/flotilla/coordinator.pem, CN=coordinator")
                && w.contains("(in 3days)")
                && w.contains("SIGHUP"),
            "{w}"
        );
        let Some(Said::Expired(e)) = certificate(now - 1).due(now) else {
            panic!("not said expired")
        };
        assert!(e.contains("expired") && e.contains("CN=coordinator"), "{e}");
        assert_eq!(certificate(now).expired(now), None);
        assert!(certificate(now - 1).expired(now).is_some());
    }

    /// Daily, not at every check: again after a day, at once when it turns expired or
    /// another certificate is served.
    #[test]
    fn a_certificate_is_said_again_daily_or_when_it_changes() {
        let now = 1_800_000_000;
        let at = Instant::now();
        let mut said = LastSaid::default();
        let soon = certificate(now + 3 * DAY);
        said.say(&soon, now, at);
        let first = said.0.clone().expect("said").2;
        said.say(&soon, now + 600, at + Duration::from_secs(600));
        assert_eq!(said.0.clone().unwrap().2, first, "said again within a day");
        let later = at + SAY_EVERY + Duration::from_secs(1);
        said.say(&soon, now + DAY, later);
        assert_eq!(
            said.0.clone().unwrap().2,
            later,
            "not said again after a day"
        );
        let expired_at = later + Duration::from_secs(1);
        said.say(&soon, now + 3 * DAY + 1, expired_at);
        assert_eq!(said.0.clone().unwrap(), (soon.clone(), true, expired_at));
        let renewed = certificate(now + 90 * DAY);
        said.say(&renewed, now + 3 * DAY + 1, expired_at);
        assert!(said.0.is_none());
    }
}
