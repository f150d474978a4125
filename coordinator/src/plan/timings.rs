//! How long an atomic unit's two-phase commit held its targets' locks, from the agents'
//! timestamps: each target's PREPARE TRANSACTION and COMMIT PREPARED (the same agent's
//! clock, so each hold is exact) and the decision's write (the coordinator's clock, so its
//! two legs are as exact as the clocks agree: one machine, or NTP).
//!
//! - the decision's legs: last PREPARE -> decision durable in etcd -> last COMMIT PREPARED;
//! - each target's hold beyond a plain commit: its PREPARE -> its COMMIT PREPARED;
//! - the window: first PREPARE -> last COMMIT PREPARED;
//! - the slowest target's steps (the sum of its prepared run's step times, the agent's
//!   clock): the goal for the holds is "at most 100 ms beyond it" (issue 15), since a
//!   target that prepared first waits for the slowest to prepare;
//! - each target's steps' start to its COMMIT PREPARED (its steps' time plus its hold): its
//!   DDL takes its locks, so this is what an application waits at most on that target.
use std::collections::HashMap;

/// The unit in progress's timestamps (microseconds since the Unix epoch).
#[derive(Debug, Default, Clone)]
pub struct TwoPhaseClock {
    /// Each target's PREPARE and its steps' time before it.
    prepared: HashMap<String, (i64, i64)>,
    decided_us: Option<i64>,
    /// When the last agent got its Resolve (its clock).
    last_heard_us: Option<i64>,
    /// (PREPARE, COMMIT PREPARED, steps' time) of each target resolved now.
    holds: Vec<(i64, i64, i64)>,
}

/// What a unit's commit took, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    pub targets: usize,
    pub window_us: i64,
    pub prepare_to_decision_us: Option<i64>,
    pub decision_to_commit_us: Option<i64>,
    /// Decision durable -> the last agent got its Resolve (the rest of the second leg is
    /// the agents' COMMIT PREPAREDs: PostgreSQL's work).
    pub decision_to_heard_us: Option<i64>,
    pub hold_median_us: i64,
    pub hold_p99_us: i64,
    pub hold_max_us: i64,
    /// The slowest target's steps: the sum of its prepared run's step times.
    pub slowest_run_us: i64,
    /// Each target's locks from its steps' start (its DDL takes them) to its COMMIT
    /// PREPARED: its steps' time plus its hold. What the application waits at most.
    pub locked_median_us: i64,
    pub locked_max_us: i64,
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl TwoPhaseClock {
    /// A target's transaction prepared at `at_us` (0: unknown, e.g. a resent result) after
    /// its steps ran for `run_us`.
    pub fn prepared(&mut self, gid: &str, at_us: i64, run_us: i64) {
        if at_us > 0 {
            self.prepared
                .entry(gid.to_string())
                .or_insert((at_us, run_us.max(0)));
        }
    }

    /// When the target of `gid` prepared, if its result said.
    pub fn prepared_at(&self, gid: &str) -> Option<i64> {
        self.prepared.get(gid).map(|&(at_us, _)| at_us)
    }

    pub fn decided(&mut self, at_us: i64) {
        self.decided_us.get_or_insert(at_us);
    }

    /// An agent got the decision's Resolve at `at_us` (0: unknown, an older agent).
    pub fn heard(&mut self, at_us: i64) {
        if at_us > 0 {
            let last = self.last_heard_us.get_or_insert(at_us);
            *last = (*last).max(at_us);
        }
    }

    /// A target's transaction resolved at `at_us` (0: before, by someone else).
    pub fn resolved(&mut self, gid: &str, at_us: i64) {
        if at_us <= 0 {
            return;
        }
        if let Some((p, run)) = self.prepared.remove(gid) {
            self.holds.push((p, at_us, run));
        }
    }

    /// The figures once every target resolved; None when some timestamps are missing (a
    /// coordinator took over mid-way, an agent resolved from etcd by itself).
    pub fn report(&self) -> Option<Timings> {
        if self.holds.is_empty() || !self.prepared.is_empty() {
            return None;
        }
        let first_prepare = self.holds.iter().map(|h| h.0).min()?;
        let last_prepare = self.holds.iter().map(|h| h.0).max()?;
        let last_commit = self.holds.iter().map(|h| h.1).max()?;
        let sorted = |f: &dyn Fn(&(i64, i64, i64)) -> i64| {
            let mut v: Vec<i64> = self.holds.iter().map(f).collect();
            v.sort_unstable();
            v
        };
        let holds = sorted(&|(p, c, _)| (c - p).max(0));
        let locked = sorted(&|(p, c, run)| (c - p).max(0) + run);
        let at =
            |v: &[i64], q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Timings {
            targets: holds.len(),
            window_us: (last_commit - first_prepare).max(0),
            prepare_to_decision_us: self.decided_us.map(|d| d - last_prepare),
            decision_to_commit_us: self.decided_us.map(|d| last_commit - d),
            decision_to_heard_us: self
                .decided_us
                .zip(self.last_heard_us)
                .map(|(d, h)| (h - d).max(0)),
            hold_median_us: at(&holds, 0.5),
            hold_p99_us: at(&holds, 0.99),
            hold_max_us: *holds.last()?,
            slowest_run_us: self.holds.iter().map(|h| h.2).max()?,
            locked_median_us: at(&locked, 0.5),
            locked_max_us: *locked.last()?,
        })
    }
}

fn ms(us: i64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

impl Timings {
    /// The plan's message says it so (and `scripts/bench-two-phase.sh` reads it there).
    pub fn describe(&self) -> String {
        let heard = self
            .decision_to_heard_us
            .map(|h| format!(" (the last agent had it after {})", ms(h)))
            .unwrap_or_default();
        let legs = match (self.prepare_to_decision_us, self.decision_to_commit_us) {
            (Some(a), Some(b)) => format!(
                "; last PREPARE to decision {}, decision to last COMMIT PREPARED {}{heard}",
                ms(a),
                ms(b)
            ),
            _ => String::new(),
        };
        format!(
            "first PREPARE to last COMMIT PREPARED: {:.3}s{legs}; each target's PREPARE to COMMIT PREPARED: median {}, p99 {}, max {} over {} targets; the slowest target's steps {}; each target's steps' start to COMMIT PREPARED: median {}, max {}",
            self.window_us as f64 / 1e6,
            ms(self.hold_median_us),
            ms(self.hold_p99_us),
            ms(self.hold_max_us),
            self.targets,
            ms(self.slowest_run_us),
            ms(self.locked_median_us),
            ms(self.locked_max_us)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_legs_and_window_from_the_agents_timestamps() {
        let mut c = TwoPhaseClock::default();
        for (i, gid) in ["a", "b", "c", "d"].iter().enumerate() {
            c.prepared(
                gid,
                1_000_000 + i as i64 * 10_000,
                [8_000, 12_500, 3_000, 9_000][i],
            );
        }
        assert_eq!(c.report(), None, "nothing resolved yet");
        c.decided(1_035_000); // 5 ms after the last PREPARE
        for (i, gid) in ["a", "b", "c"].iter().enumerate() {
            c.resolved(gid, 1_040_000 + i as i64 * 1_000);
        }
        assert_eq!(c.report(), None, "d is still prepared");
        c.heard(1_036_000);
        c.heard(1_038_000);
        c.resolved("d", 1_047_000);
        let t = c.report().unwrap();
        assert_eq!(t.targets, 4);
        assert_eq!(t.window_us, 47_000);
        assert_eq!(t.prepare_to_decision_us, Some(5_000));
        assert_eq!(t.decision_to_commit_us, Some(12_000));
        // holds: a 40, b 31, c 22, d 17 ms
        assert_eq!(
            (t.hold_median_us, t.hold_p99_us, t.hold_max_us),
            (22_000, 40_000, 40_000)
        );
        let text = t.describe();
        assert!(
            text.starts_with("first PREPARE to last COMMIT PREPARED: 0.047s;"),
            "{text}"
        );
        assert!(text.contains("last PREPARE to decision 5.0 ms"), "{text}");
        assert_eq!(
            t.decision_to_heard_us,
            Some(3_000),
            "the last agent to hear it"
        );
        assert!(
            text.contains(
                "decision to last COMMIT PREPARED 12.0 ms (the last agent had it after 3.0 ms)"
            ),
            "{text}"
        );
        assert!(
            text.contains("median 22.0 ms, p99 40.0 ms, max 40.0 ms over 4 targets"),
            "{text}"
        );
        assert_eq!(t.slowest_run_us, 12_500, "b's steps");
        // steps + hold: a 8 + 40, b 12.5 + 31, c 3 + 22, d 9 + 17 ms
        assert_eq!((t.locked_median_us, t.locked_max_us), (26_000, 48_000));
        assert!(
            text.ends_with(
                "; the slowest target's steps 12.5 ms; each target's steps' start to COMMIT PREPARED: median 26.0 ms, max 48.0 ms"
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_timestamps_give_no_figures() {
        let mut c = TwoPhaseClock::default();
        c.prepared("a", 0, 1_000);
        c.resolved("a", 5);
        assert_eq!(c.report(), None);
    }
}
