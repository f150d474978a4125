//! `[[waves]]` tables of a plan file and the plan's error budget: what the file says,
//! into the wire spec. Whether the waves make sense together (one way to take targets,
//! shares in range, budgets only under `continue`) is the core model's check.
use flotilla_core::pb;
use serde::Deserialize;
use toml::Spanned;

/// One `[[waves]]` table. Unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaveTable {
    name: Spanned<String>,
    selector: Option<String>,
    percent: Option<f64>,
    count: Option<u32>,
    #[serde(default)]
    rest: bool,
    max_parallel: Option<Spanned<u32>>,
    max_parallel_per_shard: Option<Spanned<u32>>,
    /// A duration (`10m`, `30s`).
    bake: Option<Spanned<String>>,
    max_failures: Option<Spanned<BudgetEntry>>,
    /// `manual`: wait for `flotilla plan promote` after the bake.
    gate: Option<Spanned<String>>,
    #[serde(default)]
    optional: bool,
    /// `[[waves.check]]`: SQL gates run on every target of the wave after its bake.
    #[serde(default)]
    check: Vec<Spanned<CheckTable>>,
    /// `[waves.prometheus]`: a query that must stay within bounds during the bake and at
    /// the gate.
    prometheus: Option<Spanned<PrometheusTable>>,
}

/// A `[waves.prometheus]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PrometheusTable {
    url: String,
    query: String,
    max: Option<f64>,
    min: Option<f64>,
    /// How often during the bake (a duration; default 15s).
    interval: Option<String>,
}

/// One `[[waves.check]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckTable {
    name: Option<String>,
    /// One query returning one value.
    sql: String,
    /// The highest value that passes; without it the value must be true.
    max: Option<f64>,
}

/// `max_failures = 3` or `max_failures = "2%"`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a number of targets (max_failures = 3) or a share (max_failures = \"2%\")"
)]
pub(super) enum BudgetEntry {
    Targets(u32),
    Text(String),
}

impl BudgetEntry {
    pub(super) fn to_wire(&self) -> String {
        match self {
            BudgetEntry::Targets(n) => n.to_string(),
            BudgetEntry::Text(s) => s.trim().to_string(),
        }
    }
}

/// Checks what can be checked of a budget in the file (its form), so the error has a line.
pub(super) fn budget(
    entry: &Spanned<BudgetEntry>,
) -> Result<String, (std::ops::Range<usize>, String)> {
    let wire = entry.get_ref().to_wire();
    wire.parse::<flotilla_core::waves::Budget>()
        .map(|_| wire.clone())
        .map_err(|e| (entry.span(), format!("max_failures: {e}")))
}

/// A wave table as the wire has it; errors carry the span they are about.
pub(super) fn wave(w: &WaveTable) -> Result<pb::Wave, (std::ops::Range<usize>, String)> {
    let name = w.name.get_ref().clone();
    let bake_ms = match &w.bake {
        None => 0,
        Some(b) => humantime::parse_duration(b.get_ref().trim())
            .map_err(|e| {
                (
                    b.span(),
                    format!(
                        "wave `{name}`: bake `{}`: {e} (e.g. \"10m\", \"30s\")",
                        b.get_ref()
                    ),
                )
            })
            .and_then(|d| {
                // (said here, on the bake's line and in its own words: the plan's check
                // said it at the wave's name, in milliseconds)
                if d > flotilla_core::waves::MAX_BAKE {
                    Err((
                        b.span(),
                        format!(
                            "wave `{name}`: bake `{}` is longer than a week",
                            b.get_ref().trim()
                        ),
                    ))
                } else {
                    Ok(d)
                }
            })?
            .as_millis() as u64,
    };
    let manual_gate = match &w.gate {
        None => false,
        Some(g) if g.get_ref().trim() == "manual" => true,
        Some(g) => {
            return Err((
                g.span(),
                format!(
                    "wave `{name}`: unknown gate `{}`: use gate = \"manual\"",
                    g.get_ref()
                ),
            ));
        }
    };
    let max_failures = match &w.max_failures {
        None => String::new(),
        Some(b) => budget(b).map_err(|(span, e)| (span, format!("wave `{name}`: {e}")))?,
    };
    let prometheus = match &w.prometheus {
        None => None,
        Some(p) => {
            let span = p.span();
            let p = p.get_ref();
            let interval_ms = match &p.interval {
                None => 0,
                Some(i) => humantime::parse_duration(i.trim())
                    .map_err(|e| {
                        (
                            span.clone(),
                            format!("wave `{name}`: prometheus interval `{i}`: {e}"),
                        )
                    })?
                    .as_millis() as u64,
            };
            Some(pb::PrometheusGate {
                url: p.url.clone(),
                query: p.query.clone(),
                has_max: p.max.is_some(),
                max: p.max.unwrap_or(0.0),
                has_min: p.min.is_some(),
                min: p.min.unwrap_or(0.0),
                interval_ms,
            })
        }
    };
    // 0 is "not set" on the wire: said here, where the file gave it
    for (key, value) in [
        ("max_parallel", &w.max_parallel),
        ("max_parallel_per_shard", &w.max_parallel_per_shard),
    ] {
        if let Some(v) = value
            && *v.get_ref() == 0
        {
            return Err((
                v.span(),
                format!("wave `{name}`: {key} must be at least 1 (leave it out for the plan's)"),
            ));
        }
    }
    if let Some(p) = &w.prometheus {
        let gate = p.get_ref();
        if let (Some(min), Some(max)) = (gate.min, gate.max)
            && min > max
        {
            return Err((
                p.span(),
                format!(
                    "wave `{name}`: prometheus min = {min} is above max = {max}: no value could pass the gate"
                ),
            ));
        }
        if gate.interval.is_some() && prometheus.as_ref().is_some_and(|g| g.interval_ms < 1_000) {
            return Err((
                p.span(),
                format!("wave `{name}`: prometheus interval must be at least 1s"),
            ));
        }
    }
    if w.percent == Some(0.0) || w.count == Some(0) {
        return Err((
            w.name.span(),
            format!(
                "wave `{name}`: percent and count must be above 0 (an empty wave: leave it out, or optional = true with a selector)"
            ),
        ));
    }
    let wave = pb::Wave {
        name,
        selector: w.selector.clone().unwrap_or_default(),
        percent: w.percent.unwrap_or(0.0),
        count: w.count.unwrap_or(0),
        rest: w.rest,
        max_parallel: w.max_parallel.as_ref().map_or(0, |v| *v.get_ref()),
        max_parallel_per_shard: w
            .max_parallel_per_shard
            .as_ref()
            .map_or(0, |v| *v.get_ref()),
        bake_ms,
        max_failures,
        manual_gate,
        optional: w.optional,
        checks: w
            .check
            .iter()
            .map(|c| {
                let c = c.get_ref();
                pb::WaveCheck {
                    name: c.name.clone().unwrap_or_default(),
                    sql: c.sql.clone(),
                    has_max: c.max.is_some(),
                    max: c.max.unwrap_or(0.0),
                }
            })
            .collect(),
        prometheus,
    };
    // What the model says of one wave alone (a share out of range, two ways to take
    // targets, a gate's query or address), said at the wave's line; what it says of the
    // waves together (names twice, a wave after `rest`) comes with the plan.
    flotilla_core::waves::check_wave(&wave).map_err(|e| (w.name.span(), e.to_string()))?;
    Ok(wave)
}

impl WaveTable {
    pub(super) fn named(&self, name: &str) -> bool {
        self.name.get_ref().trim() == name
    }

    pub(super) fn name_span(&self) -> std::ops::Range<usize> {
        self.name.span()
    }
}

/// What the waves say together, at the later wave's line (the model says the same of the
/// wire spec, naming the wave only): a name given twice, a wave after one that takes every
/// target left.
pub(super) fn follows(
    before: &[pb::Wave],
    w: &WaveTable,
    wave: &pb::Wave,
) -> Result<(), (std::ops::Range<usize>, String)> {
    let name = wave.name.trim();
    if before.iter().any(|b| b.name.trim() == name) {
        return Err((
            w.name.span(),
            format!("wave `{name}`: two waves have this name"),
        ));
    }
    if let Some(rest) = before.iter().find(|b| b.rest) {
        return Err((
            w.name.span(),
            format!(
                "wave `{name}`: it comes after `{}`, which takes every target left",
                rest.name.trim()
            ),
        ));
    }
    Ok(())
}
