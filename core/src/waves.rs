//! Progressive rollouts: a plan's targets split into waves that run one after the other,
//! each with its own parallelism, bake time, error budget and gate. A plan without waves
//! is one wave of every target, as before waves existed.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::model::{FailurePolicy, PlanError};
use crate::pb;
use crate::selector::Selector;

/// The longest bake: a week is longer than any bake anyone means; it also keeps end
/// times in range.
pub const MAX_BAKE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Which of the plan's targets a wave takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// Targets whose shard and tenant labels match (no earlier wave may take one of them).
    Selector(Selector),
    /// A share of the targets no earlier wave took, in (0, 100].
    Percent(f64),
    /// That many of the targets no earlier wave took.
    Count(u32),
    /// Every target no earlier wave took.
    Rest,
}

/// An error budget: how many targets may fail before the wave (or plan) halts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Targets(u32),
    /// A share of the wave's (or plan's) targets, rounded down.
    Percent(f64),
}

impl Budget {
    /// Failed targets allowed among `total`.
    pub fn allowed(&self, total: usize) -> usize {
        match *self {
            Budget::Targets(n) => n as usize,
            // p * total / 100 (not p / 100 * total): 29% of 100 is 29, not 28.999999999999996
            Budget::Percent(p) => (p * total as f64 / 100.0 + 1e-9).floor() as usize,
        }
    }

    pub fn is_zero(&self) -> bool {
        match *self {
            Budget::Targets(n) => n == 0,
            Budget::Percent(p) => p == 0.0,
        }
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a share like \"2%\""))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("`{s}` is outside 0%..100%"));
            }
            return Ok(Budget::Percent(p));
        }
        s.parse::<u32>()
            .map(Budget::Targets)
            .map_err(|_| format!("`{s}` is neither a number of targets nor a share like \"2%\""))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Targets(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What a plan does when a wave's failures go past its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBudgetExhausted {
    /// Stop where it is: what applied stays, the plan ends halted.
    #[default]
    Halt,
    /// Undo every applied step, as all-or-nothing does.
    Rollback,
}

impl OnBudgetExhausted {
    pub fn as_str(self) -> &'static str {
        match self {
            OnBudgetExhausted::Halt => "halt",
            OnBudgetExhausted::Rollback => "rollback",
        }
    }
}

/// A SQL gate of a wave: run on every target of the wave after its bake.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    /// One query returning one value (a number, or a boolean).
    pub sql: String,
    /// A number (a boolean counts 1/0) at most this passes; None: the value must be true.
    pub max: Option<f64>,
}

impl Check {
    /// Whether `value` (as the agent read it, text) passes; Err says why not.
    pub fn judge(&self, value: &str) -> Result<(), String> {
        let v = value.trim();
        let number = match v {
            "true" | "t" => Some(1.0),
            "false" | "f" => Some(0.0),
            "" => None,
            _ => v.parse::<f64>().ok(),
        };
        match (self.max, number) {
            // PostgreSQL's NaN and ±Infinity parse: NaN read "more than its max", and
            // -Infinity passed any max
            (_, Some(n)) if !n.is_finite() => Err(format!("returned {v}, not a finite number")),
            (_, None) if v.is_empty() => {
                Err("returned no value (NULL or empty), not a number or a boolean".to_string())
            }
            (_, None) => Err(format!("returned {v:?}, not a number or a boolean")),
            (None, Some(n)) if n == 1.0 && matches!(v, "true" | "t") => Ok(()),
            (None, Some(_)) => Err(format!("returned {v}, expected true")),
            (Some(max), Some(n)) if n <= max => Ok(()),
            (Some(max), Some(n)) => Err(format!("returned {n}, more than its max {max}")),
        }
    }
}

/// A Prometheus gate: an instant query whose value must stay within `min`..=`max`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromGate {
    /// `http://host:port` of the Prometheus server.
    pub url: String,
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// How often it is evaluated during the bake.
    pub interval: Duration,
}

impl PromGate {
    /// Whether `value` passes; Err says why not.
    pub fn judge(&self, value: f64) -> Result<(), String> {
        // NaN compares false with any bound: it passed both (a ratio of two rates with no
        // traffic, 0/0, widened the rollout over an application serving nothing). No value
        // is no data, which fails a gate; so does an infinite one (x/0).
        if !value.is_finite() {
            return Err(format!(
                "{} = {value}, not a finite number (no data to judge by: a ratio over no traffic, say)",
                self.query
            ));
        }
        if let Some(max) = self.max
            && value > max
        {
            return Err(format!("{} = {value}, more than its max {max}", self.query));
        }
        if let Some(min) = self.min
            && value < min
        {
            return Err(format!("{} = {value}, less than its min {min}", self.query));
        }
        Ok(())
    }
}

/// What a plan does when a wave's SQL gate is breached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnGateFailure {
    #[default]
    Halt,
    Rollback,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    pub name: String,
    pub take: Take,
    /// None: the plan's.
    pub max_parallel: Option<u32>,
    pub max_parallel_per_shard: Option<u32>,
    pub bake: Duration,
    /// None: the plan's.
    pub budget: Option<Budget>,
    pub manual_gate: bool,
    pub optional: bool,
    pub checks: Vec<Check>,
    pub prometheus: Option<PromGate>,
}

/// A plan's rollout: its waves (none: one wave of every target) and its error budget.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rollout {
    pub waves: Vec<Wave>,
    /// The plan's budget over all its targets (policy continue); None: no limit.
    pub budget: Option<Budget>,
    pub on_budget_exhausted: OnBudgetExhausted,
    pub on_gate_failure: OnGateFailure,
    /// After the last wave: how long the last Prometheus gate keeps being evaluated; a
    /// breach then rolls the plan back (post-deploy monitoring).
    pub watch: Duration,
}

/// The name of the stage after the last wave while the plan is watched.
pub const WATCH: &str = "watch";

impl Rollout {
    /// Whether any budget is set (the plan's or a wave's): failures within it end the plan
    /// `completed_with_failures` rather than `failed`.
    pub fn budgeted(&self) -> bool {
        self.budget.is_some() || self.waves.iter().any(|w| w.budget.is_some())
    }

    /// Builds and checks the rollout of a plan on receipt: its `waves`, its budget
    /// (`max_failures`) and `on_budget_exhausted`, under the plan's `policy`.
    pub fn from_pb(
        waves_pb: &[pb::Wave],
        max_failures: &str,
        on_budget_exhausted: &str,
        on_gate_failure: &str,
        watch_ms: u64,
        policy: FailurePolicy,
    ) -> Result<Rollout, PlanError> {
        let on_gate_failure = match on_gate_failure.trim() {
            "" | "halt" => OnGateFailure::Halt,
            "rollback" => OnGateFailure::Rollback,
            other => {
                return Err(PlanError::Field {
                    field: "on_gate_failure".into(),
                    reason: format!("`{other}`: use halt or rollback"),
                });
            }
        };
        let budget = parse_budget(max_failures, "max_failures")?;
        let on_budget_exhausted = match on_budget_exhausted.trim() {
            "" | "halt" => OnBudgetExhausted::Halt,
            "rollback" => OnBudgetExhausted::Rollback,
            other => {
                return Err(PlanError::Field {
                    field: "on_budget_exhausted".into(),
                    reason: format!("`{other}`: use halt or rollback"),
                });
            }
        };
        let mut waves: Vec<Wave> = Vec::with_capacity(waves_pb.len());
        let mut rest_at: Option<String> = None;
        for w in waves_pb {
            let wave = Wave::from_pb(w)?;
            if waves.iter().any(|x| x.name == wave.name) {
                return Err(wave_error(&wave.name, "two waves have this name"));
            }
            if let Some(rest) = &rest_at {
                return Err(wave_error(
                    &wave.name,
                    &format!("it comes after `{rest}`, which takes every target left"),
                ));
            }
            if wave.take == Take::Rest {
                rest_at = Some(wave.name.clone());
            }
            waves.push(wave);
        }
        if watch_ms > 0 {
            if watch_ms > 7 * 24 * 3_600_000 {
                return Err(PlanError::Field {
                    field: "watch".into(),
                    reason: format!("{watch_ms}ms is longer than a week"),
                });
            }
            if !waves.iter().any(|w| w.prometheus.is_some()) {
                return Err(PlanError::Field {
                    field: "watch".into(),
                    reason: "a watch after the last wave needs a wave with a [waves.prometheus] gate to keep evaluating".into(),
                });
            }
        }
        if waves.iter().any(|w| w.name == WATCH) && watch_ms > 0 {
            return Err(wave_error(
                WATCH,
                "the stage after the last wave has this name; name the wave otherwise",
            ));
        }
        let rollout = Rollout {
            waves,
            budget,
            on_budget_exhausted,
            on_gate_failure,
            watch: Duration::from_millis(watch_ms),
        };
        // Only `continue` goes on past a failure; under the others the budget is 0.
        if policy != FailurePolicy::Continue {
            let given = std::iter::once((None, rollout.budget))
                .chain(rollout.waves.iter().map(|w| (Some(&w.name), w.budget)))
                .find(|(_, b)| b.is_some_and(|b| !b.is_zero()));
            if let Some((wave, Some(b))) = given {
                let place = wave.map_or("the plan".to_string(), |w| format!("wave `{w}`"));
                return Err(PlanError::Field {
                    field: "max_failures".into(),
                    reason: format!(
                        "{place} allows {b} failed targets, but policy {} stops at the first failure (its budget is 0); use policy = \"continue\"",
                        policy.as_str()
                    ),
                });
            }
        }
        Ok(rollout)
    }

    /// The wire form (stored with the plan, so a rebuild sees the same rollout).
    pub fn to_pb(&self, p: &mut pb::PlanSpec) {
        p.waves = self.waves.iter().map(Wave::to_pb).collect();
        p.max_failures = self.budget.map(|b| b.to_string()).unwrap_or_default();
        p.on_budget_exhausted = self.on_budget_exhausted.as_str().to_string();
        p.watch_ms = self.watch.as_millis() as u64;
        p.on_gate_failure = match self.on_gate_failure {
            OnGateFailure::Halt => "halt",
            OnGateFailure::Rollback => "rollback",
        }
        .to_string();
    }
}

fn wave_error(wave: &str, reason: &str) -> PlanError {
    PlanError::Wave {
        wave: wave.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_budget(s: &str, field: &str) -> Result<Option<Budget>, PlanError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|reason| PlanError::Field {
        field: field.into(),
        reason,
    })
}

/// Checks one wave alone, as the plan's model will (a file's reader says it at the wave's
/// line), and as a new plan's gates must read ([`gates_read`]).
pub fn check_wave(w: &pb::Wave) -> Result<(), PlanError> {
    Wave::from_pb(w)?;
    gates_read(w)
}

/// A new plan's SQL gates read: a statement that writes is refused by its kind at submit
/// (and by a file's reader), rather than when the gate runs after the wave's bake (in a
/// read-only transaction, with an error that did not say why). Not part of the model's own
/// check, which a stored plan is read with again: a plan stored before this check must
/// still be rebuilt, retried and rolled back.
pub fn gates_read(w: &pb::Wave) -> Result<(), PlanError> {
    let name = w.name.trim();
    for (i, c) in w.checks.iter().enumerate() {
        let sql = c.sql.trim().trim_end_matches(';').trim();
        let check_name = if c.name.trim().is_empty() {
            format!("check {}", i + 1)
        } else {
            c.name.trim().to_string()
        };
        match crate::lint::analyze(sql) {
            Ok(statements) => {
                if let Some(kind) = statements
                    .first()
                    .map(|s| s.kind.as_str())
                    .filter(|k| *k != "SELECT")
                {
                    return Err(wave_error(
                        name,
                        &format!(
                            "{check_name}'s sql is {kind}: a gate is a query that reads (SELECT ...)"
                        ),
                    ));
                }
            }
            Err(e) => return Err(wave_error(name, &format!("{check_name}'s sql: {e}"))),
        }
        if c.has_max && !c.max.is_finite() {
            return Err(wave_error(
                name,
                &format!(
                    "{check_name}'s max = {} is not a finite number: no value could pass",
                    c.max
                ),
            ));
        }
    }
    // A bound of NaN compares false with every value: `max = nan` let every value through
    // (the gate passed all, the rollout widened unchecked).
    if let Some(p) = &w.prometheus {
        for (bound, set, value) in [("max", p.has_max, p.max), ("min", p.has_min, p.min)] {
            if set && !value.is_finite() {
                return Err(wave_error(
                    name,
                    &format!(
                        "prometheus {bound} = {value} is not a finite number: the gate would judge nothing"
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Wave {
    fn from_pb(w: &pb::Wave) -> Result<Wave, PlanError> {
        let name = w.name.trim().to_string();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(PlanError::Field {
                field: "waves.name".into(),
                reason: format!(
                    "{:?}: a wave needs a name of 1-64 printable characters",
                    w.name
                ),
            });
        }
        let mut takes: Vec<Take> = Vec::new();
        if !w.selector.trim().is_empty() {
            let s = Selector::parse(&w.selector)
                .map_err(|e| wave_error(&name, &format!("selector: {e}")))?;
            takes.push(Take::Selector(s));
        }
        if w.percent != 0.0 {
            if !(w.percent > 0.0 && w.percent <= 100.0) {
                return Err(wave_error(
                    &name,
                    &format!("percent = {} is outside (0, 100]", w.percent),
                ));
            }
            takes.push(Take::Percent(w.percent));
        }
        if w.count > 0 {
            takes.push(Take::Count(w.count));
        }
        if w.rest {
            takes.push(Take::Rest);
        }
        let take = match takes.len() {
            1 => takes.remove(0),
            0 => {
                return Err(wave_error(
                    &name,
                    "it takes no targets: give one of selector, percent, count or rest = true",
                ));
            }
            _ => {
                return Err(wave_error(
                    &name,
                    "give only one of selector, percent, count or rest = true",
                ));
            }
        };
        if w.bake_ms > MAX_BAKE.as_millis() as u64 {
            return Err(wave_error(
                &name,
                &format!("bake of {}ms is longer than a week", w.bake_ms),
            ));
        }
        for (field, v) in [
            ("max_parallel", w.max_parallel),
            ("max_parallel_per_shard", w.max_parallel_per_shard),
        ] {
            if v > crate::model::MAX_PARALLEL {
                return Err(wave_error(
                    &name,
                    &format!("{field} = {v} is more than {}", crate::model::MAX_PARALLEL),
                ));
            }
        }
        let budget = parse_budget(&w.max_failures, "max_failures")
            .map_err(|e| wave_error(&name, &e.to_string()))?;
        let mut checks = Vec::with_capacity(w.checks.len());
        for (i, c) in w.checks.iter().enumerate() {
            let sql = c.sql.trim().trim_end_matches(';').trim().to_string();
            let check_name = if c.name.trim().is_empty() {
                format!("check {}", i + 1)
            } else {
                c.name.trim().to_string()
            };
            if sql.is_empty() {
                return Err(wave_error(
                    &name,
                    &format!("{check_name} has no sql: a gate needs a query"),
                ));
            }
            // the gate reads one value from one query, on every target of the wave
            match crate::sql::split_statements(&sql) {
                Ok(statements) if statements.len() == 1 => {}
                Ok(statements) => {
                    return Err(wave_error(
                        &name,
                        &format!(
                            "{check_name}'s sql holds {} statements: a gate is one query",
                            statements.len()
                        ),
                    ));
                }
                Err(e) => return Err(wave_error(&name, &format!("{check_name}'s sql: {e}"))),
            }
            checks.push(Check {
                name: check_name,
                sql,
                max: c.has_max.then_some(c.max),
            });
        }
        let prometheus = match &w.prometheus {
            None => None,
            Some(p) => {
                let url = p.url.trim().trim_end_matches('/').to_string();
                if !url.starts_with("http://") {
                    return Err(wave_error(
                        &name,
                        &format!(
                            "prometheus url {:?}: give http://host:port (https is not supported yet)",
                            p.url
                        ),
                    ));
                }
                // The coordinator writes the url into an HTTP request line by hand: a control
                // character or a space would let the plan add headers or a second request
                // (to any address the coordinator reaches), and user:password@ has no place.
                let authority = url["http://".len()..].split('/').next().unwrap_or("");
                if url.chars().any(|c| c.is_control() || c.is_whitespace())
                    || authority.contains('@')
                    || authority.is_empty()
                {
                    return Err(wave_error(
                        &name,
                        &format!(
                            "prometheus url {:?}: give http://host:port[/path], with no spaces, control characters or user@",
                            p.url
                        ),
                    ));
                }
                if p.query.trim().is_empty() {
                    return Err(wave_error(&name, "prometheus gate has no query"));
                }
                if !p.has_max && !p.has_min {
                    return Err(wave_error(
                        &name,
                        "prometheus gate needs max or min: the bound the query must stay within",
                    ));
                }
                Some(PromGate {
                    url,
                    query: p.query.trim().to_string(),
                    max: p.has_max.then_some(p.max),
                    min: p.has_min.then_some(p.min),
                    interval: Duration::from_millis(if p.interval_ms == 0 {
                        15_000
                    } else {
                        p.interval_ms.max(1_000)
                    }),
                })
            }
        };
        Ok(Wave {
            name,
            take,
            max_parallel: (w.max_parallel > 0).then_some(w.max_parallel),
            max_parallel_per_shard: (w.max_parallel_per_shard > 0)
                .then_some(w.max_parallel_per_shard),
            bake: Duration::from_millis(w.bake_ms),
            budget,
            manual_gate: w.manual_gate,
            optional: w.optional,
            checks,
            prometheus,
        })
    }

    fn to_pb(&self) -> pb::Wave {
        let mut w = pb::Wave {
            name: self.name.clone(),
            max_parallel: self.max_parallel.unwrap_or(0),
            max_parallel_per_shard: self.max_parallel_per_shard.unwrap_or(0),
            bake_ms: self.bake.as_millis() as u64,
            max_failures: self.budget.map(|b| b.to_string()).unwrap_or_default(),
            manual_gate: self.manual_gate,
            optional: self.optional,
            checks: self
                .checks
                .iter()
                .map(|c| pb::WaveCheck {
                    name: c.name.clone(),
                    sql: c.sql.clone(),
                    has_max: c.max.is_some(),
                    max: c.max.unwrap_or(0.0),
                })
                .collect(),
            prometheus: self.prometheus.as_ref().map(|p| pb::PrometheusGate {
                url: p.url.clone(),
                query: p.query.clone(),
                has_max: p.max.is_some(),
                max: p.max.unwrap_or(0.0),
                has_min: p.min.is_some(),
                min: p.min.unwrap_or(0.0),
                interval_ms: p.interval.as_millis() as u64,
            }),
            ..Default::default()
        };
        match &self.take {
            Take::Selector(s) => w.selector = s.to_string(),
            Take::Percent(p) => w.percent = *p,
            Take::Count(n) => w.count = *n,
            Take::Rest => w.rest = true,
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(name: &str) -> pb::Wave {
        pb::Wave {
            name: name.into(),
            rest: true,
            ..Default::default()
        }
    }

    fn rollout(waves: Vec<pb::Wave>, policy: FailurePolicy) -> Result<Rollout, PlanError> {
        Rollout::from_pb(&waves, "", "", "", 0, policy)
    }

    #[test]
    fn checks_judge_numbers_and_booleans() {
        let at_most = |max| Check {
            name: "c".into(),
            sql: "SELECT 1".into(),
            max: Some(max),
        };
        assert!(at_most(0.0).judge("0").is_ok());
        assert!(at_most(0.0).judge("false").is_ok());
        assert!(
            at_most(0.0)
                .judge("3")
                .unwrap_err()
                .contains("returned 3, more than its max 0")
        );
        assert!(at_most(1.5).judge("1.25").is_ok());
        assert!(at_most(1.0).judge("").unwrap_err().contains("not a number"));
        let truthy = Check {
            max: None,
            ..at_most(0.0)
        };
        assert!(truthy.judge("true").is_ok());
        assert!(truthy.judge("false").unwrap_err().contains("expected true"));
        assert!(truthy.judge("1").is_err(), "a number is not a boolean");
        for v in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(
                at_most(1.0).judge(v).unwrap_err(),
                format!("returned {v}, not a finite number")
            );
        }
        // SQL NULL reads as "": no value, said so (it read `returned "", not a number`)
        assert_eq!(
            at_most(1.0).judge("").unwrap_err(),
            "returned no value (NULL or empty), not a number or a boolean"
        );
    }

    /// A Prometheus gate's value that is not a finite number fails it: NaN passed both
    /// bounds (every comparison with it is false), and a canary's error ratio over no
    /// traffic (0/0) widened the rollout.
    #[test]
    fn a_prometheus_gate_fails_on_nan_and_infinity() {
        let gate = |min, max| PromGate {
            url: "http://p".into(),
            query: "ratio".into(),
            max,
            min,
            interval: Duration::from_secs(1),
        };
        for g in [
            gate(None, Some(0.05)),
            gate(Some(0.0), None),
            gate(Some(0.0), Some(1.0)),
        ] {
            for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let e = g.judge(v).unwrap_err();
                assert!(e.contains("not a finite number"), "{v}: {e}");
            }
            assert!(g.judge(0.01).is_ok());
        }
        assert_eq!(
            gate(None, Some(0.05)).judge(f64::NAN).unwrap_err(),
            "ratio = NaN, not a finite number (no data to judge by: a ratio over no traffic, say)"
        );
    }

    #[test]
    fn a_gate_needs_its_query_and_bounds() {
        let mut w = wave("g");
        w.checks = vec![pb::WaveCheck {
            name: "empty".into(),
            sql: " ; ".into(),
            ..Default::default()
        }];
        let e = rollout(vec![w], FailurePolicy::AllOrNothing).unwrap_err();
        assert!(e.to_string().contains("wave `g`: empty has no sql"), "{e}");
        let mut w = wave("g");
        w.checks = vec![pb::WaveCheck {
            name: "two".into(),
            sql: "DELETE FROM t; SELECT 1".into(),
            ..Default::default()
        }];
        let e = rollout(vec![w], FailurePolicy::AllOrNothing).unwrap_err();
        assert!(
            e.to_string()
                .contains("wave `g`: two's sql holds 2 statements: a gate is one query"),
            "{e}"
        );
        let mut w = wave("g");
        w.checks = vec![pb::WaveCheck {
            name: "writes".into(),
            sql: "DELETE FROM work_orders RETURNING 1".into(),
            ..Default::default()
        }];
        // refused for a new plan; a stored one is still read (rebuilt, retried, undone)
        let e = gates_read(&w).unwrap_err();
        assert!(
            e.to_string()
                .contains("wave `g`: writes's sql is DELETE: a gate is a query that reads"),
            "{e}"
        );
        assert!(rollout(vec![w], FailurePolicy::AllOrNothing).is_ok());
        // a bound that is not a finite number: refused for a new plan (NaN let every value
        // through a Prometheus gate); a stored one is still read
        let mut w = wave("n");
        w.checks = vec![pb::WaveCheck {
            name: "nan".into(),
            sql: "SELECT 1".into(),
            has_max: true,
            max: f64::NAN,
        }];
        let e = gates_read(&w).unwrap_err().to_string();
        assert!(
            e.contains("wave `n`: nan's max = NaN is not a finite number"),
            "{e}"
        );
        let mut w = wave("n");
        w.prometheus = Some(pb::PrometheusGate {
            url: "http://p:9090".into(),
            query: "up".into(),
            has_min: true,
            min: f64::NEG_INFINITY,
            ..Default::default()
        });
        let e = gates_read(&w).unwrap_err().to_string();
        assert!(
            e.contains("wave `n`: prometheus min = -inf is not a finite number"),
            "{e}"
        );
        assert!(rollout(vec![w], FailurePolicy::AllOrNothing).is_ok());
        let prom = |url: &str, query: &str, has_max: bool| {
            let mut w = wave("p");
            w.prometheus = Some(pb::PrometheusGate {
                url: url.into(),
                query: query.into(),
                has_max,
                max: 0.1,
                ..Default::default()
            });
            rollout(vec![w], FailurePolicy::AllOrNothing)
        };
        let e = prom("http://p:9090", "", true).unwrap_err().to_string();
        assert!(e.contains("prometheus gate has no query"), "{e}");
        let e = prom("http://p:9090", "up", false).unwrap_err().to_string();
        assert!(e.contains("needs max or min"), "{e}");
        let e = prom("https://p", "up", true).unwrap_err().to_string();
        assert!(e.contains("https is not supported yet"), "{e}");
        let r = prom("http://p:9090/", "up", true).unwrap();
        assert_eq!(r.waves[0].prometheus.as_ref().unwrap().url, "http://p:9090");
        // written into a request line by hand: nothing that could add a header or a request
        for bad in [
            "http://p:9090/x\r\nHost: etcd:2379",
            "http://p:9090/a b",
            "http://user:pw@p:9090",
            "http:///path",
        ] {
            let e = prom(bad, "up", true).unwrap_err().to_string();
            assert!(
                e.contains("no spaces, control characters or user@"),
                "{bad:?}: {e}"
            );
        }
        assert!(prom("http://prometheus.monitoring:9090/prom", "up", true).is_ok());
        // a watch needs a Prometheus gate to keep evaluating
        let e = Rollout::from_pb(
            &[wave("w")],
            "",
            "",
            "",
            60_000,
            FailurePolicy::AllOrNothing,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("needs a wave with a [waves.prometheus] gate"),
            "{e}"
        );
    }

    #[test]
    fn budgets_read_as_targets_or_shares() {
        assert_eq!("3".parse::<Budget>(), Ok(Budget::Targets(3)));
        assert_eq!(" 2% ".parse::<Budget>(), Ok(Budget::Percent(2.0)));
        assert_eq!(Budget::Percent(2.0).allowed(250), 5);
        assert_eq!(Budget::Percent(2.0).allowed(49), 0);
        for (p, n) in [(29.0, 29), (57.0, 57), (58.0, 58), (7.0, 7), (14.0, 14)] {
            assert_eq!(Budget::Percent(p).allowed(100), n, "{p}% of 100");
        }
        assert!("150%".parse::<Budget>().is_err());
        assert!("many".parse::<Budget>().is_err());
    }

    #[test]
    fn a_wave_takes_targets_one_way_only() {
        let canary = pb::Wave {
            name: "canary".into(),
            selector: "tier=internal".into(),
            percent: 5.0,
            ..Default::default()
        };
        let e = rollout(vec![canary], FailurePolicy::Continue).unwrap_err();
        assert!(e.to_string().contains("wave `canary`"), "{e}");
        assert!(e.to_string().contains("only one of"), "{e}");
        for bad in [0.0001 - 1.0, 150.0] {
            let w = pb::Wave {
                name: "w".into(),
                percent: bad,
                ..Default::default()
            };
            let e = rollout(vec![w], FailurePolicy::Continue).unwrap_err();
            assert!(e.to_string().contains("outside (0, 100]"), "{e}");
        }
        let none = pb::Wave {
            name: "empty".into(),
            ..Default::default()
        };
        let e = rollout(vec![none], FailurePolicy::Continue).unwrap_err();
        assert!(e.to_string().contains("takes no targets"), "{e}");
    }

    #[test]
    fn names_are_unique_and_nothing_follows_rest() {
        let e = rollout(vec![wave("a"), wave("a")], FailurePolicy::Continue).unwrap_err();
        assert!(e.to_string().contains("two waves"), "{e}");
        let e = rollout(vec![wave("all"), wave("more")], FailurePolicy::Continue).unwrap_err();
        assert!(e.to_string().contains("comes after `all`"), "{e}");
    }

    #[test]
    fn budgets_need_the_continue_policy() {
        let mut w = wave("w");
        w.max_failures = "2".into();
        let e = rollout(vec![w.clone()], FailurePolicy::AllOrNothing).unwrap_err();
        assert!(e.to_string().contains("wave `w` allows 2"), "{e}");
        let r = rollout(vec![w], FailurePolicy::Continue).unwrap();
        assert_eq!(r.waves[0].budget, Some(Budget::Targets(2)));
        assert!(r.budgeted());
        let mut zero = wave("z");
        zero.max_failures = "0".into();
        assert!(rollout(vec![zero], FailurePolicy::AllOrNothing).is_ok());
    }

    #[test]
    fn the_wire_form_reads_back() {
        let w = pb::Wave {
            name: "quarter".into(),
            percent: 25.0,
            max_parallel: 4,
            max_parallel_per_shard: 2,
            bake_ms: 1500,
            max_failures: "2%".into(),
            manual_gate: true,
            ..Default::default()
        };
        let r = rollout(vec![w, wave("rest")], FailurePolicy::Continue).unwrap();
        let mut p = pb::PlanSpec::default();
        r.to_pb(&mut p);
        let back = Rollout::from_pb(
            &p.waves,
            &p.max_failures,
            &p.on_budget_exhausted,
            &p.on_gate_failure,
            p.watch_ms,
            FailurePolicy::Continue,
        );
        assert_eq!(back.unwrap(), r);
    }
}
