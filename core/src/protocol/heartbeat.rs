//! When a heartbeat is worth sending. Each side of an agent's stream counts any message
//! from the other as word that it is alive (three intervals of silence end the stream), so
//! a heartbeat right after another message adds nothing but a message to handle: during a
//! rollout the coordinator's assignments and the agent's results go more often than once
//! an interval, and at 64 agents the heartbeats both ways were most of what grew with the
//! fleet in the coordinator's CPU per step.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a stream last carried a message other than a heartbeat.
#[derive(Debug)]
pub struct LastWord {
    origin: Instant,
    /// Milliseconds from `origin` to the last message, plus one; zero for none yet.
    at_ms: AtomicU64,
}

impl Default for LastWord {
    fn default() -> Self {
        LastWord {
            origin: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }
}

impl LastWord {
    /// A message other than a heartbeat went out now.
    pub fn sent(&self) {
        self.sent_at(Instant::now());
    }

    fn sent_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.at_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// Whether a heartbeat of this `interval` is due: nothing else went out in the last
    /// half interval. The other side then hears something at least every one and a half
    /// intervals, well within its three.
    pub fn heartbeat_due(&self, interval: Duration) -> bool {
        self.heartbeat_due_at(Instant::now(), interval)
    }

    fn heartbeat_due_at(&self, now: Instant, interval: Duration) -> bool {
        match self.at_ms.load(Ordering::Relaxed) {
            0 => true,
            at => {
                let since = now.saturating_duration_since(self.origin).as_millis() as u64;
                since.saturating_sub(at - 1) >= (interval / 2).as_millis() as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_due_after_half_an_interval_of_nothing_else() {
        let interval = Duration::from_secs(1);
        let word = LastWord::default();
        let t0 = word.origin;
        assert!(word.heartbeat_due_at(t0, interval), "nothing sent yet");
        word.sent_at(t0 + Duration::from_millis(100));
        assert!(!word.heartbeat_due_at(t0 + Duration::from_millis(100), interval));
        assert!(!word.heartbeat_due_at(t0 + Duration::from_millis(599), interval));
        assert!(word.heartbeat_due_at(t0 + Duration::from_millis(600), interval));
        // a message at the origin itself still counts
        let word = LastWord::default();
        word.sent_at(word.origin);
        assert!(!word.heartbeat_due_at(word.origin + Duration::from_millis(499), interval));
        assert!(word.heartbeat_due_at(word.origin + Duration::from_millis(500), interval));
    }
}
